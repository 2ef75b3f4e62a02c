//! Prefix reuse across the slots of a `VkBatch`: a runner takes a prompt's prefix that
//! another slot's pages hold (its table names them too: no new pages; the partly filled
//! last one is copied when the runner first writes into it) or that its own pages still
//! hold past its length, and continues from it with the logits of a runner that
//! computed the whole prompt itself; a prefix overwritten since (truncated and
//! rewritten, decoded over) is not lent. On the qwen3 fixture with f16, f32 and q8_0
//! caches, gpt-oss and Gemma 4 (also with a KV-shared layer and heads of 512). Hybrids
//! (GatedDeltaNet, Mamba2, short conv) lend nothing by pages, but a
//! batch with prompt snapshots restores one (its states copied into the slot, its pages
//! shared) for a prompt that continues it, with a cold run's logits; snapshots survive
//! their slot's next sequence, are not used by a prompt that leaves them or past the
//! limit, and give their pages back when evicted (the LRU bound, or a pool running
//! short). And `caldera serve --backend vulkan` with two slots sharing a long system
//! prompt: a prefix-cache hit across slots, and the answer of a cold server; and a
//! synthetic hybrid served with a prompt snapshot per slot (in the memory plan), a later
//! prompt continuing an earlier one restoring its snapshot (a hit in /metrics). Runs on
//! the test device (lavapipe by default) and skips without one unless
//! `CALDERA_REQUIRE_VULKAN=1`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::sync::Arc;

use caldera_model::{Logits, Model, Runner};
use caldera_vulkan::{BatchMm, Context, ContextOptions, KvType, VkBatch, VkModel, VkRunner};
use common::{argmax, fixtures, model, rel_l2, vulkan_device as device};
use serde_json::{json, Value};

/// `n` tokens of a sequence named by `seed`.
fn tokens(vocab: usize, seed: usize, n: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104729 + 17) % vocab) as u32)
        .collect()
}

fn cat(a: &[u32], b: &[u32]) -> Vec<u32> {
    [a, b].concat()
}

/// Runs `r` (holding `prompt[..r.len()]`) through the rest of `prompt` and checks every
/// new row's logits against a runner with its own cache that computed all of `prompt`.
fn continues_as_cold(vk: &Arc<VkModel>, r: &mut VkRunner, prompt: &[u32], tol: f32, what: &str) {
    let held = r.len();
    assert!(held < prompt.len(), "{what}");
    let (mut warm, mut cold) = (Vec::new(), Vec::new());
    r.forward(&prompt[held..], Logits::All, &mut warm).unwrap();
    let mut fresh = VkRunner::new(vk.clone(), r.capacity()).expect("runner");
    // Computed from scratch in its own cache (the rows of the reused part are not
    // needed: an LM head over every row costs lavapipe minutes on a large vocabulary).
    fresh
        .forward(&prompt[..held], Logits::Last, &mut cold)
        .unwrap();
    fresh
        .forward(&prompt[held..], Logits::All, &mut cold)
        .unwrap();
    let vocab = vk.model().config.vocab_size;
    assert_eq!(warm.len(), cold.len(), "{what}");
    for (i, (w, c)) in warm.chunks(vocab).zip(cold.chunks(vocab)).enumerate() {
        let e = rel_l2(c, w);
        assert!(
            e < tol,
            "{what}: position {}: relative L2 {e:e} against a cold prefill",
            held + i
        );
    }
    // And a decode step after it.
    let t = argmax(&warm[warm.len() - vocab..]);
    r.forward(&[t], Logits::Last, &mut warm).unwrap();
    fresh.forward(&[t], Logits::Last, &mut cold).unwrap();
    let e = rel_l2(&cold, &warm);
    assert!(e < tol, "{what}: decode after reuse: relative L2 {e:e}");
}

fn open(dev: usize, kv: KvType) -> Option<Arc<VkModel>> {
    open_fixture(dev, "qwen3", kv)
}

fn open_fixture(dev: usize, name: &str, kv: KvType) -> Option<Arc<VkModel>> {
    let fx = fixtures()?;
    let (_file, model) = Model::open(&fx.join(name)).expect("model");
    let opts = ContextOptions {
        kv_type: Some(kv),
        force_f32_acts: true,
        ..Default::default()
    };
    let ctx = Context::with_options(dev, &opts).expect("device");
    Some(Arc::new(
        VkModel::new(ctx, Arc::new(model)).expect("upload"),
    ))
}

fn scenario(vk: &Arc<VkModel>, tol: f32) {
    let vocab = vk.model().config.vocab_size;
    let batch = VkBatch::new(vk.clone(), 3, 160).expect("batch");
    let p = tokens(vocab, 1, 40);
    let (x, y, z) = (
        tokens(vocab, 2, 9),
        tokens(vocab, 3, 12),
        tokens(vocab, 4, 10),
    );
    assert!(x[0] != y[0] && z[0] != p[20]);

    // A prefills P + X; B takes P from A's region and continues with Y.
    let mut a = batch.runner().expect("runner");
    let mut out = Vec::new();
    a.forward(&cat(&p, &x), Logits::Last, &mut out).unwrap();
    let mut b = batch.runner().expect("runner");
    let py = cat(&p, &y);
    assert!(b.shares_prefixes());
    let free = batch.free_pages();
    assert_eq!(b.reuse_prefix(&py, py.len() - 1), p.len());
    assert_eq!(batch.free_pages(), free, "a reused prefix shares A's pages");
    assert_eq!(b.len(), p.len());
    continues_as_cold(vk, &mut b, &py, tol, "B after P from A");

    // A and B decode together (the batched step); C takes all of A's tokens so far,
    // decoded ones included, from A's region (a limit below the prompt's end holds).
    let ta = argmax(&out);
    let mut ob = Vec::new();
    batch
        .step(&mut [(&mut a, ta, &mut out), (&mut b, 5, &mut ob)])
        .expect("batched step");
    let mut held_a = cat(&cat(&p, &x), &[ta]);
    let mut c = batch.runner().expect("runner");
    let long = cat(&held_a, &tokens(vocab, 5, 6));
    assert_eq!(c.reuse_prefix(&long, long.len() - 1), held_a.len());
    continues_as_cold(
        vk,
        &mut c,
        &long,
        tol,
        "C after A's prompt and decoded token",
    );
    assert_eq!(
        c.reuse_prefix(&long, 20),
        c.len(),
        "a longer sequence stays"
    );

    // A goes back to 20 positions and writes Z (10 tokens) over P[20..30]: its region
    // holds P[..20] + Z, and positions 30.. (computed after P[20..30]) are stale. B is
    // emptied and writes W over its whole region. A new sequence after C leaves, asking
    // for P[..20] + Z + P[30..40] + .., takes 30 positions from A, not 40.
    a.truncate(20);
    held_a.truncate(20);
    a.forward(&z, Logits::Last, &mut out).unwrap();
    held_a.extend_from_slice(&z);
    assert!(b.truncate(0));
    b.forward(&tokens(vocab, 6, 60), Logits::Last, &mut ob)
        .unwrap();
    drop(c);
    // C's slot still holds what C computed (positions past A's first 20 included): the
    // new sequence lands there and would find A's old prompt in its own region, so
    // overwrite it first through a runner that then leaves.
    let mut d = batch.runner().expect("runner");
    d.forward(&tokens(vocab, 7, 45), Logits::Last, &mut ob)
        .unwrap();
    drop(d);
    let mut e = batch.runner().expect("runner");
    let pw = [&p[..20], &z, &p[30..], &tokens(vocab, 8, 10)].concat();
    assert_eq!(
        e.reuse_prefix(&pw, pw.len() - 1),
        30,
        "only P[..20] + Z is held"
    );
    continues_as_cold(vk, &mut e, &pw, tol, "E after P[..20] + Z from A");

    // A sequence emptied by the scheduler (truncate(0)) takes its own region's tokens
    // back without a copy; a dropped runner's region is lent to a new one.
    assert!(a.truncate(0));
    let more = cat(&held_a, &tokens(vocab, 9, 7));
    assert_eq!(a.reuse_prefix(&more, more.len() - 1), held_a.len());
    continues_as_cold(vk, &mut a, &more, tol, "A after emptying");
    drop(a);
    let mut f = batch.runner().expect("runner");
    let after = cat(&more, &tokens(vocab, 10, 5));
    let got = f.reuse_prefix(&after, after.len() - 1);
    assert_eq!(got, more.len(), "a dropped runner's region is lent");
    continues_as_cold(vk, &mut f, &after, tol, "F after A's region");

    // A copy that starts past a prefix the sequence holds itself: B computes the first
    // 20 tokens, then takes the next ones from F's region (a copy at an offset, whole
    // q8_0 blocks).
    assert!(b.truncate(0));
    b.forward(&after[..20], Logits::Last, &mut ob).unwrap();
    assert_eq!(b.reuse_prefix(&after, after.len() - 1), after.len() - 1);
    continues_as_cold(vk, &mut b, &after, tol, "B after its own 20 and F's rest");
}

/// f16 (the default) and f32 caches: within float rounding of a cold prefill.
#[test]
fn vulkan_prefix_reuse_across_slots() {
    let Some(dev) = device() else { return };
    for kv in [KvType::F16, KvType::F32] {
        let Some(vk) = open(dev, kv) else { return };
        scenario(&vk, 1e-4);
    }
}

/// gpt-oss (attention sinks, biased q|k|v and o, sliding-window layers: batched, so its
/// slots share a pool) lends prefixes as qwen3 does; an f32 cache, as its verify test.
#[test]
fn vulkan_prefix_reuse_across_slots_gpt_oss() {
    let Some(dev) = device() else { return };
    let Some(vk) = open_fixture(dev, "gpt_oss", KvType::F32) else {
        return;
    };
    scenario(&vk, 1e-4);
}

/// Gemma 4 (per-layer inputs, v norm; then with layer 2 reading layer 1's cache and
/// heads of 512, [`common::gemma4_shared_wide`]: the shared layer's columns read the
/// pages its source's table names, copied on write with them) lends prefixes as qwen3
/// does; f32 caches.
#[test]
fn vulkan_prefix_reuse_across_slots_gemma4() {
    let Some(dev) = device() else { return };
    let Some(vk) = open_fixture(dev, "gemma4", KvType::F32) else {
        return;
    };
    scenario(&vk, 1e-4);
    let Some(fx) = fixtures() else { return };
    let opts = ContextOptions {
        kv_type: Some(KvType::F32),
        force_f32_acts: true,
        ..Default::default()
    };
    let ctx = Context::with_options(dev, &opts).expect("device");
    let model = common::gemma4_shared_wide(&fx);
    let vk = Arc::new(VkModel::new(ctx, Arc::new(model)).expect("upload"));
    scenario(&vk, 1e-4);
}

/// A hybrid (qwen3_5: GatedDeltaNet + attention) batches, but its recurrent states are
/// not in the regions: its runners share no prefixes and take none from another slot;
/// a sequence prefilled after another computed the same prefix runs as a cold one.
#[test]
fn vulkan_prefix_hybrid_lends_nothing() {
    let Some(dev) = device() else { return };
    let Some(vk) = open_fixture(dev, "qwen3_5", KvType::F16) else {
        return;
    };
    let vocab = vk.model().config.vocab_size;
    let batch = VkBatch::new(vk.clone(), 2, 96).expect("batch");
    let (p, x, y) = (
        tokens(vocab, 1, 40),
        tokens(vocab, 2, 9),
        tokens(vocab, 3, 12),
    );
    let mut a = batch.runner().expect("runner");
    let mut out = Vec::new();
    a.forward(&cat(&p, &x), Logits::Last, &mut out).unwrap();
    let mut b = batch.runner().expect("runner");
    assert!(!a.shares_prefixes() && !b.shares_prefixes());
    let py = cat(&p, &y);
    assert_eq!(b.reuse_prefix(&py, py.len() - 1), 0);
    assert_eq!(b.len(), 0);
    continues_as_cold(&vk, &mut b, &py[..py.len() - 1], 1e-4, "hybrid");
}

/// Prompt snapshots of a hybrid: A's prompt (37 positions: the last of its 3 pages
/// partly filled) is snapshotted, then A decodes over that page (copied on write) and
/// leaves; B takes A's slot with another prompt (fresh pages, zeroed states); C, on the
/// other slot, takes nothing for a prompt that leaves the snapshot inside it or a limit
/// short of it, then restores it for a prompt continuing it and runs the rest, a decode
/// step alone and batched steps beside B with a cold runner's logits.
fn snapshot_restores(vk: &Arc<VkModel>, tol: f32, what: &str) {
    let vocab = vk.model().config.vocab_size;
    let batch = VkBatch::with_snapshots(vk.clone(), 2, 96, 12, 2, BatchMm::Auto).expect("batch");
    assert_eq!(batch.snapshots(), 2, "{what}");
    let start = batch.free_pages();
    let (p, x, y, q) = (
        tokens(vocab, 1, 37),
        tokens(vocab, 2, 9),
        tokens(vocab, 3, 12),
        tokens(vocab, 4, 30),
    );
    let mut out = Vec::new();
    let mut a = batch.runner().expect("runner");
    a.forward(&p, Logits::Last, &mut out).unwrap();
    a.checkpoint();
    assert_eq!(batch.snapshot_count(), 1, "{what}");
    assert_eq!(
        batch.free_pages(),
        start - 3,
        "{what}: the snapshot shares A's pages"
    );
    a.forward(&x, Logits::Last, &mut out).unwrap();
    assert_eq!(
        batch.free_pages(),
        start - 4,
        "{what}: A copies the shared last page"
    );
    drop(a);
    // B in A's slot: a sequence of its own from zeros, over pages of its own.
    let mut b = batch.runner().expect("runner");
    b.forward(&q, Logits::Last, &mut out).unwrap();
    let mut c = batch.runner().expect("runner");
    assert!(!c.shares_prefixes(), "{what}");
    let py = cat(&p, &y);
    let mut off = py.clone();
    off[20] = (off[20] + 1) % vocab as u32;
    assert_eq!(
        c.reuse_prefix(&off, off.len() - 1),
        0,
        "{what}: diverges inside"
    );
    assert_eq!(
        c.reuse_prefix(&py, 36),
        0,
        "{what}: limit short of the snapshot"
    );
    assert_eq!(c.reuse_prefix(&py, py.len() - 1), 37, "{what}: restored");
    assert_eq!(c.len(), 37);
    // The rest of the prompt, every row against a cold run.
    let (mut warm, mut cold) = (Vec::new(), Vec::new());
    c.forward(&py[37..], Logits::All, &mut warm).unwrap();
    let mut fresh = VkRunner::new(vk.clone(), c.capacity()).expect("runner");
    fresh.forward(&p, Logits::Last, &mut cold).unwrap();
    fresh.forward(&py[37..], Logits::All, &mut cold).unwrap();
    assert_eq!(warm.len(), cold.len());
    for (i, (w, f)) in warm.chunks(vocab).zip(cold.chunks(vocab)).enumerate() {
        let e = rel_l2(f, w);
        assert!(e < tol, "{what}: position {}: relative L2 {e:e}", 37 + i);
    }
    // A decode step alone, then batched steps beside B.
    let mut t = argmax(&warm[warm.len() - vocab..]);
    let mut tb = argmax(&out);
    let mut lb = Vec::new();
    c.forward(&[t], Logits::Last, &mut warm).unwrap();
    fresh.forward(&[t], Logits::Last, &mut cold).unwrap();
    for k in 0..4 {
        let e = rel_l2(&cold, &warm);
        assert!(
            e < tol,
            "{what}: decode {k} after the snapshot: relative L2 {e:e}"
        );
        t = argmax(&cold);
        batch
            .step(&mut [(&mut b, tb, &mut lb), (&mut c, t, &mut warm)])
            .expect("batched step");
        tb = argmax(&lb);
        fresh.forward(&[t], Logits::Last, &mut cold).unwrap();
    }
    let e = rel_l2(&cold, &warm);
    assert!(
        e < tol,
        "{what}: batched decode after the snapshot: relative L2 {e:e}"
    );
    // The snapshot is still there, and the same prompt again only marks it used.
    c.truncate(0);
    c.forward(&p, Logits::Last, &mut out).unwrap();
    c.checkpoint();
    assert_eq!(batch.snapshot_count(), 1, "{what}");
}

/// Hybrids' prompt snapshots (GatedDeltaNet: qwen3_5, Mamba2: nemotron_h, short conv:
/// lfm2) restore exactly: see `snapshot_restores`.
#[test]
fn vulkan_prefix_hybrid_snapshots_restore() {
    let Some(dev) = device() else { return };
    for name in ["qwen3_5", "nemotron_h", "lfm2"] {
        let Some(vk) = open_fixture(dev, name, KvType::F16) else {
            return;
        };
        snapshot_restores(&vk, 1e-4, name);
    }
}

/// Snapshots give their pages back: evicted by the LRU bound (every page no sequence
/// names goes free) or when a prefill needs pages that only snapshots and idle slots
/// hold (the prefill runs; nothing fails).
#[test]
fn vulkan_prefix_hybrid_snapshots_evict() {
    let Some(dev) = device() else { return };
    let Some(vk) = open_fixture(dev, "qwen3_5", KvType::F16) else {
        return;
    };
    let vocab = vk.model().config.vocab_size;
    let batch = VkBatch::with_snapshots(vk.clone(), 2, 64, 6, 1, BatchMm::Auto).expect("batch");
    assert_eq!(batch.free_pages(), 6);
    let (p, q) = (tokens(vocab, 1, 40), tokens(vocab, 2, 40));
    let mut out = Vec::new();
    let mut a = batch.runner().expect("runner");
    a.forward(&p, Logits::Last, &mut out).unwrap();
    a.checkpoint();
    assert_eq!(batch.free_pages(), 3);
    // A starts over with another prompt: its pages are the snapshot's, so it takes
    // three fresh ones.
    assert!(a.truncate(0));
    a.forward(&q, Logits::Last, &mut out).unwrap();
    assert_eq!(batch.free_pages(), 0);
    // The bound (1): A's new snapshot evicts the first, whose pages go back.
    a.checkpoint();
    assert_eq!(batch.snapshot_count(), 1);
    assert_eq!(
        batch.free_pages(),
        3,
        "the evicted snapshot's pages are free"
    );
    assert!(batch.evict_snapshot());
    assert!(!batch.evict_snapshot());
    assert_eq!(batch.free_pages(), 3, "A still holds its pages");
    a.checkpoint();
    drop(a);
    // B needs 4 pages: 3 free, A's slot's pages (the snapshot's too) come back.
    let mut b = batch.runner().expect("runner");
    let r = tokens(vocab, 3, 64);
    b.forward(&r, Logits::Last, &mut out).unwrap();
    assert_eq!(batch.snapshot_count(), 0);
    assert_eq!(batch.free_pages(), 2);
    let mut fresh = VkRunner::new(vk.clone(), 64).expect("runner");
    let mut cold = Vec::new();
    fresh.forward(&r, Logits::Last, &mut cold).unwrap();
    let e = rel_l2(&cold, &out);
    assert!(e < 1e-4, "after evictions: relative L2 {e:e}");
}

/// A q8_0 cache: blocks copied whole (heads of 128 in the fixture); a copy is exact, the
/// cold run rounds the same values, so within the batch tests' q8_0 tolerance.
#[test]
fn vulkan_prefix_reuse_across_slots_q8_0() {
    let Some(dev) = device() else { return };
    let Some(vk) = open(dev, KvType::Q8_0) else {
        return;
    };
    scenario(&vk, 1e-3);
}

/// Sliding-window layers (Gemma 3's form: every other layer windowed, here to 16
/// positions on the qwen3 fixture): a prefix longer than the window is copied whole (the
/// caches hold every position; the window is a mask), and the rows after it, whose
/// windowed layers see only its last positions, match a cold run. (Gemma 3 270M itself,
/// a 560-token prefix past its 512-position window, matched within 1e-3 too, but takes
/// lavapipe minutes.)
#[test]
fn vulkan_prefix_reuse_past_a_sliding_window() {
    let (Some(dev), Some(fx)) = (device(), fixtures()) else {
        return;
    };
    let (_file, mut m) = Model::open(&fx.join("qwen3")).expect("model");
    let mut windowed = 0;
    for l in m.config.layers.iter_mut().step_by(2) {
        if let Some(caldera_model::Mixer::Attention(a)) = &mut l.mixer {
            a.window = Some(16);
            windowed += 1;
        }
    }
    assert!(windowed > 0);
    let opts = ContextOptions {
        force_f32_acts: true,
        ..Default::default()
    };
    let ctx = Context::with_options(dev, &opts).expect("device");
    let vk = Arc::new(VkModel::new(ctx, Arc::new(m)).expect("upload"));
    let vocab = vk.model().config.vocab_size;
    let batch = VkBatch::new(vk.clone(), 2, 96).expect("batch");
    let p = tokens(vocab, 1, 40);
    let mut a = batch.runner().expect("runner");
    let mut out = Vec::new();
    a.forward(&cat(&p, &tokens(vocab, 2, 4)), Logits::Last, &mut out)
        .unwrap();
    let mut b = batch.runner().expect("runner");
    let py = cat(&p, &tokens(vocab, 3, 24));
    assert_eq!(b.reuse_prefix(&py, py.len() - 1), p.len());
    continues_as_cold(&vk, &mut b, &py, 1e-4, "past a window of 16");
    // The window changes the answer (it is in force): a full-attention run differs.
    let (_file, full) = Model::open(&fx.join("qwen3")).expect("model");
    let ctx = Context::with_options(dev, &opts).expect("device");
    let full = Arc::new(VkModel::new(ctx, Arc::new(full)).expect("upload"));
    let mut r = VkRunner::new(full, 96).expect("runner");
    let (mut lf, mut lw) = (Vec::new(), Vec::new());
    r.forward(&py, Logits::Last, &mut lf).unwrap();
    let mut w = VkRunner::new(vk.clone(), 96).expect("runner");
    w.forward(&py, Logits::Last, &mut lw).unwrap();
    assert!(rel_l2(&lf, &lw) > 1e-3, "the window makes no difference");
}

/// A running `caldera serve`, killed when dropped.
struct Serve {
    child: Child,
    addr: String,
    /// Standard error up to the listening line (the memory plan, the backend).
    log: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(path: &std::path::Path, dev: usize, slots: u32) -> Serve {
    let mut child = common::bin()
        .arg("serve")
        .arg(path)
        .args(["--backend", "vulkan", "--port", "0", "--ctx", "512"])
        // A page pool smaller than the slots' whole contexts (2 x 512 / 16 = 64 pages).
        .args(["--kv-pages", "48"])
        .args(["--device", &dev.to_string(), "--slots", &slots.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("caldera serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    let addr = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            panic!("caldera serve ended before serving:\n{seen}");
        };
        seen.push_str(&line);
        seen.push('\n');
        if let Some(at) = line.find("on http://") {
            let rest = &line[at + "on http://".len()..];
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    assert!(
        seen.contains("slots decode in batched steps"),
        "the slots share a VkBatch:\n{seen}"
    );
    // The memory plan: the batch's page pool, as --kv-pages says.
    assert!(
        seen.contains("Vulkan KV pool 48 pages x 16 tokens = 768 tokens"),
        "the memory plan shows the page pool:\n{seen}"
    );
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Serve {
        child,
        addr,
        log: seen,
    }
}

/// One HTTP/1.1 request (`Connection: close`); the status and the body.
fn http(addr: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("a response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut r = rest;
        while let Some((len, tail)) = r.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            r = &tail[n + 2..];
        }
        out
    } else {
        rest.to_owned()
    };
    (status, body)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

const SYSTEM: &str = "You are a meticulous assistant for a shipping company. Answer in one \
    short sentence, in plain English, without lists, and say so when you do not know. The \
    company runs ferries between three islands and a mainland port.";

fn ask(addr: &str, q: &str) -> String {
    let b = json!({
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
        "max_tokens": 5,
        "temperature": 0,
    });
    let (status, body) = http(addr, "POST", "/v1/chat/completions", Some(&b));
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Two slots on Vulkan, with a page pool smaller than their two contexts, sharing a
/// long system prompt: the second request runs on the other (least recently used) slot
/// and takes the system prompt from the first one's pages (a prefix-cache hit counted by
/// /metrics, the tokens shown by /slots); a later request on that slot continues from
/// the shared prompt and answers as the cold first request did; emptied slots give their
/// pages back.
#[test]
fn vulkan_serve_reuses_a_system_prompt_across_slots() {
    let (Some(dev), Some(path)) = (device(), model("SmolLM2-135M-Instruct.Q4_1.gguf")) else {
        return;
    };
    let s = serve(&path, dev, 2);
    let metrics = || http(&s.addr, "GET", "/metrics", None).1;
    // Once every slot is idle (a response may come before the scheduler publishes).
    let slots = || -> Value {
        let t0 = std::time::Instant::now();
        loop {
            let v: Value = serde_json::from_str(&http(&s.addr, "GET", "/slots", None).1).unwrap();
            let idle = v.as_array().unwrap().iter().all(|s| s["state"] == "idle");
            if idle || t0.elapsed().as_secs() > 20 {
                return v;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    // Cold, on slot 0.
    let cold = ask(&s.addr, "What do the ferries carry?");
    let m = metrics();
    assert_eq!(metric(&m, "caldera_prefix_cache_misses_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "caldera_prefix_cache_hits_total"), 0.0, "{m}");
    // Slot 1 takes the system prompt from slot 0's region.
    ask(&s.addr, "How many islands are there?");
    let sl = slots();
    assert_eq!(sl[1]["requests"], 1, "{sl}");
    let reused = sl[1]["reused_tokens"].as_u64().unwrap();
    assert!(reused >= 30, "{sl}");
    let m = metrics();
    assert_eq!(metric(&m, "caldera_prefix_cache_hits_total"), 1.0, "{m}");
    assert_eq!(
        metric(&m, "caldera_prefix_cache_reused_tokens_total"),
        reused as f64
    );
    // Slot 0 now answers something else (over its first question); the first question
    // again goes to slot 1 and continues from the system prompt copied there.
    ask(&s.addr, "Where is the port?");
    let warm = ask(&s.addr, "What do the ferries carry?");
    assert_eq!(warm, cold, "an answer after reuse equals the cold one");
    let sl = slots();
    assert_eq!(sl[1]["requests"], 2, "{sl}");
    assert!(sl[1]["reused_tokens"].as_u64().unwrap() >= reused, "{sl}");
    let m = metrics();
    assert_eq!(metric(&m, "caldera_prefix_cache_misses_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "caldera_prefix_cache_hits_total"), 3.0, "{m}");
    assert_eq!(
        metric(&m, "caldera_kv_pages_free"),
        metric(&m, "caldera_kv_pages_total"),
        "{m}"
    );
}

/// A hybrid (`caldera synth --arch qwen35 --shape tiny`: GatedDeltaNet + attention) on
/// Vulkan keeps one prompt snapshot per slot (the memory plan counts their states): a
/// request whose prompt continues an earlier one's (whose slot cannot rewind past the
/// tokens it generated) restores the earlier prompt's snapshot, a prefix-cache hit
/// counted by /metrics with its tokens.
#[test]
fn vulkan_serve_hybrid_restores_a_prompt_snapshot() {
    let Some(dev) = device() else { return };
    let tmp = common::TempDir::new("vk-serve-snapshot");
    let synth = tmp.0.join("qwen35-tiny.gguf");
    let o = common::bin()
        .args(["synth", "--arch", "qwen35", "--shape", "tiny"])
        .arg(&synth)
        .output()
        .expect("running caldera synth");
    assert!(o.status.success(), "synth: {}", common::text(&o));
    let s = serve(&synth, dev, 2);
    assert!(s.log.contains("up to 2 prompt snapshots"), "{}", s.log);
    assert!(
        s.log.contains(" x 4; total"),
        "2 slots + 2 snapshots:\n{}",
        s.log
    );
    let complete = |prompt: &str| {
        let b = json!({"prompt": prompt, "max_tokens": 3, "temperature": 0});
        let (status, body) = http(&s.addr, "POST", "/v1/completions", Some(&b));
        assert_eq!(status, 200, "{body}");
    };
    let metrics = || http(&s.addr, "GET", "/metrics", None).1;
    let p = "The ferries run between three islands and a mainland port, every morning and \
             every evening, all year round, whatever the weather.";
    complete(p);
    let m = metrics();
    assert_eq!(metric(&m, "caldera_prefix_cache_misses_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "caldera_prefix_cache_hits_total"), 0.0, "{m}");
    complete(&format!("{p} They carry cars and people."));
    let m = metrics();
    assert_eq!(metric(&m, "caldera_prefix_cache_hits_total"), 1.0, "{m}");
    let reused = metric(&m, "caldera_prefix_cache_reused_tokens_total");
    assert!(reused >= 20.0, "the first prompt's snapshot: {m}");
}
