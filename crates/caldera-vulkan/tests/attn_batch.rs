//! `attn_batch` and `attn_dec_batch` (batched decode attention: per column q/k norm,
//! RoPE, the KV write into its own slot of the pooled caches, split attention over that
//! slot; `attn_dec_batch` also with few blocks of many tiles) against a CPU
//! twin on fresh random inputs: 1, 3, 8 and 16 columns over pools of odd slot counts
//! whose caches are pages in scrambled order (odd table strides, spare pages),
//! each column at its own position in its own slot, dispatched over the column count's
//! bucket (the padding columns must do nothing); several head layouts, positions that
//! need one and many splits, windows, softcap, both RoPE styles, the output gate,
//! gpt-oss's attention sinks (`attn_batch`), Gemma 4's v norm, KV-shared layers (q only
//! in the row, the token's k / v read from the pool, nothing written) and heads of 512
//! (with partial RoPE), the
//! f16, f32 and q8_0 KV formats and both reduction variants; the int8 output for the
//! o-projection (8 and 16 columns: each column's blocks of 32 as `quant_rows` makes
//! them from the f32 output). The whole pool is read back: only each column's (slot,
//! position) row (through its table) may change, to the token's k / v in the cache's
//! rounding. Skips
//! without a Vulkan device unless `CALDERA_REQUIRE_VULKAN=1`.

mod common;

use caldera_vulkan::kernels::{attn_dec_shape, attn_split};
use caldera_vulkan::testing::test_context;
use caldera_vulkan::{Context, ContextOptions, Kernel, KvType, MemoryKind};
use common::{
    kv_row_mismatch, random_vec, read_kv, rms, rng, rope, rope_table, upload_kv, words, Pages, PAGE,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

#[derive(Clone, Copy)]
struct Case {
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    n_rot: usize,
    interleaved: bool,
    qk_norm: bool,
    window: usize,
    softcap: f32,
    cap: usize,
    gate: bool,
    /// gpt-oss's attention sinks (`attn_batch` only).
    sinks: bool,
    /// Gemma 4: the token's v RMS-normalized (no weights) before use and caching.
    v_norm: bool,
    /// Gemma 4 KV sharing: the row holds q only; the token's k / v are the pool's.
    nokv: bool,
    cols: usize,
    slots: usize,
}

/// One column's output (n_heads * hd) and its new (k, v) rows per kv head, by the CPU.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn twin(
    c: &Case,
    qkv: &[f32],
    kc: &[f32],
    vc: &[f32],
    qn: &[f32],
    kn: &[f32],
    table: &[f32],
    sinks: Option<&[f32]>,
    pos: usize,
) -> (Vec<f64>, Vec<(Vec<f64>, Vec<f64>)>) {
    let (nh, nkv, hd) = (c.n_heads, c.n_kv, c.hd);
    let kvd = nkv * hd;
    let eps = 1e-6f64;
    let scale = 1.0 / (hd as f64).sqrt();
    let gsize = nh / nkv;
    let lo = if c.window > 0 && pos + 1 > c.window {
        pos + 1 - c.window
    } else {
        0
    };
    let mut kv_new = Vec::new();
    for g in 0..nkv {
        if c.nokv {
            // The position's rows are already in the pool (the source layer's).
            let row = |cache: &[f32]| -> Vec<f64> {
                (0..hd)
                    .map(|i| cache[pos * kvd + g * hd + i] as f64)
                    .collect()
            };
            kv_new.push((row(kc), row(vc)));
            continue;
        }
        let mut k: Vec<f64> = (0..hd).map(|i| qkv[nh * hd + g * hd + i] as f64).collect();
        if c.qk_norm {
            rms(&mut k, kn, eps);
        }
        rope(&mut k, table, c.n_rot, c.interleaved, pos);
        let mut v: Vec<f64> = (0..hd)
            .map(|i| qkv[nh * hd + kvd + g * hd + i] as f64)
            .collect();
        if c.v_norm {
            rms(&mut v, &vec![1.0; hd], eps);
        }
        kv_new.push((k, v));
    }
    let gate_at = (nh + 2 * nkv) * hd;
    let mut out = vec![0f64; nh * hd];
    for h in 0..nh {
        let g = h / gsize;
        let mut q: Vec<f64> = (0..hd).map(|i| qkv[h * hd + i] as f64).collect();
        if c.qk_norm {
            rms(&mut q, qn, eps);
        }
        rope(&mut q, table, c.n_rot, c.interleaved, pos);
        let (kg, vg) = &kv_new[g];
        let mut s = Vec::new();
        for p in lo..=pos {
            let krow: Vec<f64> = if p == pos {
                kg.clone()
            } else {
                (0..hd).map(|i| kc[p * kvd + g * hd + i] as f64).collect()
            };
            let mut x = q.iter().zip(&krow).map(|(a, b)| a * b).sum::<f64>() * scale;
            if c.softcap > 0.0 {
                x = c.softcap as f64 * (x / c.softcap as f64).tanh();
            }
            s.push(x);
        }
        let m = s.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let mut l: f64 = e.iter().sum();
        if let Some(sk) = sinks {
            l += (sk[h] as f64 - m).exp();
        }
        for (j, p) in (lo..=pos).enumerate() {
            for i in 0..hd {
                let v = if p == pos {
                    vg[i]
                } else {
                    vc[p * kvd + g * hd + i] as f64
                };
                out[h * hd + i] += e[j] / l * v;
            }
        }
        if c.gate {
            for i in 0..hd {
                out[h * hd + i] /= 1.0 + (-(qkv[gate_at + h * hd + i] as f64)).exp();
            }
        }
    }
    (out, kv_new)
}

/// `attn_batch`, or `attn_dec_batch` with at most this many blocks per (kv head, chunk)
/// (0: the default).
#[derive(Clone, Copy, Debug)]
enum Launch {
    Old,
    New { blocks: usize },
}

fn run(ctx: &Context, rng: &mut StdRng, c: &Case, launch: Launch) {
    let (nh, nkv, hd) = (c.n_heads, c.n_kv, c.hd);
    let kvd = nkv * hd;
    let gates = if c.gate { nh } else { 0 };
    let ld = if c.nokv {
        nh * hd
    } else {
        (nh + 2 * nkv + gates) * hd
    };
    let kv = ctx.tuning().kv;
    // A pool of pages, each slot's in scrambled order (and spare pages of junk), the
    // tables `slot_pages` entries apart (an odd stride, more than a slot needs).
    let pages = Pages::scrambled(rng, c.slots, c.cap, 5);
    let slot_pages = c.cap.div_ceil(PAGE) + 3;
    let table_b = ctx.upload(&pages.table_bytes(slot_pages)).unwrap();
    let n_pool = pages.n_pages * PAGE * kvd;
    let bucket = c.cols.next_power_of_two();
    // Rows for the whole bucket: the padding rows hold random values too.
    let qkv = random_vec(rng, bucket * ld, 1.0);
    let mut kc = random_vec(rng, n_pool, 1.0);
    let mut vc = random_vec(rng, n_pool, 1.0);
    let (kc_b, vc_b) = (upload_kv(ctx, &mut kc), upload_kv(ctx, &mut vc));
    let qn = random_vec(rng, hd, 1.5);
    let kn = random_vec(rng, hd, 1.5);
    let table = rope_table(c.cap, c.n_rot);
    let sinks = random_vec(rng, nh, 2.0);
    // Distinct slots in random order, positions at random (the last column at the end
    // of its slot).
    let mut slots: Vec<usize> = (0..c.slots).collect();
    slots.shuffle(rng);
    let cols: Vec<(usize, usize)> = (0..c.cols)
        .map(|i| {
            let pos = if i + 1 == c.cols {
                c.cap - 1
            } else {
                rng.gen_range(0..c.cap)
            };
            (slots[i], pos)
        })
        .collect();
    // Device.
    let up = |v: &[f32]| ctx.upload_f32(v).unwrap();
    let qkv_b = up(&qkv);
    let (qn_b, kn_b, rope_b, sinks_b) = (up(&qn), up(&kn), up(&table), up(&sinks));
    let out = ctx
        .create_buffer((bucket * nh * hd * 4) as u64, MemoryKind::Device)
        .unwrap();
    // Step values: live columns, then (slot, position) per column; the padding
    // columns' words point at slot 0, position 0 (which they must not write).
    let mut sv = vec![c.cols as u32, 0, 0, c.cols as u32, 0, 0, 0, 0];
    for i in 0..bucket {
        let (s, p) = cols.get(i).copied().unwrap_or((0, 0));
        sv.extend([s as u32, p as u32]);
    }
    let step = ctx.upload(&words(&sv)).unwrap();
    let gsize = nh / nkv;
    let (kernel, hpw, n_chunks, split, max_splits) = match launch {
        Launch::Old => {
            let split = attn_split(c.cap);
            let hpw = gsize.min(8);
            let n_chunks = gsize.div_ceil(hpw);
            (
                Kernel::AttnBatch,
                hpw,
                n_chunks,
                split,
                c.cap.div_ceil(split),
            )
        }
        Launch::New { blocks } => {
            let wg = ctx.tuning().workgroup_size;
            let sh = attn_dec_shape(gsize, hd, wg, c.cap, 8, 0, blocks)
                .unwrap_or_else(|| panic!("attn_dec: no layout for hd {hd} at workgroup {wg}"));
            (
                Kernel::AttnDecBatch,
                sh.hpw,
                sh.n_chunks,
                sh.split,
                sh.blocks,
            )
        }
    };
    // (hd + 4 per head and block: attn_dec_batch's column stride; attn_batch's is hd + 2.)
    let part = ctx
        .create_buffer(
            (bucket * nh * max_splits * (hd + 4) * 4) as u64,
            MemoryKind::Device,
        )
        .unwrap();
    let count = ctx.upload(&vec![0u8; bucket * nkv * n_chunks * 4]).unwrap();
    // attn_batch's int8 output (flag 16) on even column counts; zeroed buffers otherwise
    // stay so (attn_dec_batch has no int8 output: 10 bindings, flag 16 unset).
    let old = kernel == Kernel::AttnBatch;
    let q8 = old && c.cols.is_multiple_of(2);
    let xq = ctx.upload(&vec![0u8; bucket * nh * hd]).unwrap();
    let xd = ctx.upload(&vec![0u8; bucket * nh * hd / 8]).unwrap();
    let bufs = [
        &qkv_b, &kc_b, &vc_b, &out, &step, &qn_b, &kn_b, &rope_b, &part, &count, &xq, &xd, &sinks_b,
    ];
    // The page tables after the kernel's other bindings.
    let mut bufs = bufs[..kernel.desc().bindings as usize - 1].to_vec();
    bufs.push(&table_b);
    let binding = ctx.bind(kernel, &bufs).unwrap();
    let mut flags = if q8 { 4u32 | 16 } else { 4u32 };
    if c.qk_norm {
        flags |= 3;
    }
    if c.interleaved {
        flags |= 8;
    }
    if c.gate {
        flags |= 32;
    }
    assert!(!c.sinks || old, "attn_dec_batch has no sinks");
    if c.sinks {
        flags |= 1024;
    }
    if c.v_norm {
        flags |= 64;
    }
    if c.nokv {
        flags |= 128;
    }
    let eps = 1e-6f32;
    let scale = 1.0 / (hd as f32).sqrt();
    let push = words(&[
        nh as u32,
        nkv as u32,
        hd as u32,
        c.n_rot as u32,
        flags,
        ld as u32,
        c.window as u32,
        hpw as u32,
        n_chunks as u32,
        max_splits as u32,
        split as u32,
        eps.to_bits(),
        scale.to_bits(),
        c.softcap.to_bits(),
        slot_pages as u32,
    ]);
    let groups = (bucket * nkv * n_chunks * max_splits) as u64;
    let rec = ctx.record(|r| r.dispatch(&binding, &push, groups)).unwrap();
    // Twice: the split counts must be back at zero (and the KV write is idempotent).
    for _ in 0..2 {
        ctx.submit(&rec).unwrap();
    }
    let got = ctx.read_f32(&out, bucket * nh * hd).unwrap();
    let xq_got = ctx.read_buffer(&xq, 0, (bucket * nh * hd) as u64).unwrap();
    let xd_got = ctx.read_f32(&xd, bucket * nh * hd / 32).unwrap();
    let kc_got = read_kv(ctx, &kc_b, n_pool);
    let vc_got = read_kv(ctx, &vc_b, n_pool);
    let what = format!(
        "{} of {} slots, {nh}/{nkv} heads of {hd}, cap {}, window {}, softcap {}, norm {}, \
         interleaved {}, gate {}, sinks {}, v norm {}, no kv {}, {launch:?} (subgroup {}, kv \
         {kv})",
        c.cols,
        c.slots,
        c.cap,
        c.window,
        c.softcap,
        c.qk_norm,
        c.interleaved,
        c.gate,
        c.sinks,
        c.v_norm,
        c.nokv,
        ctx.tuning().subgroup_reduce,
    );
    // Whether each pool value is in a column's written row.
    let mut written = vec![false; n_pool];
    for (ci, &(slot, pos)) in cols.iter().enumerate() {
        let kcs = &pages.gather(&kc, slot, c.cap, kvd);
        let vcs = &pages.gather(&vc, slot, c.cap, kvd);
        let row = &qkv[ci * ld..(ci + 1) * ld];
        let sk = c.sinks.then_some(&sinks[..]);
        let (want, kv_new) = twin(c, row, kcs, vcs, &qn, &kn, &table, sk, pos);
        for i in 0..nh * hd {
            let g = got[ci * nh * hd + i] as f64;
            assert!(
                (g - want[i]).abs() <= 1e-4,
                "{what}: column {ci} (slot {slot}, pos {pos}): out[{i}] = {g}, want {}",
                want[i]
            );
        }
        // The int8 blocks: got's values quantized as quant_rows does (one step apart at
        // most where the device's division rounds differently).
        for b in 0..nh * hd / 32 {
            let at = ci * nh * hd + 32 * b;
            let vals = &got[at..at + 32];
            let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
            let (d, qd) = (xd_got[at / 32], amax / 127.0);
            if !q8 {
                assert!(d == 0.0 && xq_got[at..at + 32].iter().all(|&q| q == 0));
                continue;
            }
            assert!(
                (d - qd).abs() <= 1e-6 * qd,
                "{what}: column {ci} block {b}: d = {d}, want {qd}"
            );
            let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            for (i, &v) in vals.iter().enumerate() {
                let want = (v * id).round_ties_even().clamp(-127.0, 127.0) as i32;
                let q = xq_got[at + i] as i8 as i32;
                assert!(
                    (q - want).abs() <= 1,
                    "{what}: column {ci}: q8[{}] = {q}, want {want}",
                    32 * b + i
                );
            }
        }
        // The column's rows as written (rounded to the cache's type); a KV-shared
        // column writes nothing.
        for (g, (k, v)) in kv_new.iter().enumerate().filter(|_| !c.nokv) {
            let at = pages.row(slot, pos) * kvd + g * hd;
            for (name, pool, want) in [("k", &kc_got, k), ("v", &vc_got, v)] {
                let row = &pool[at..at + hd];
                if let Some(i) = kv_row_mismatch(ctx, row, want) {
                    panic!(
                        "{what}: column {ci} (slot {slot}, pos {pos}): {name} [{g}][{i}] = {}, \
                         want {}",
                        row[i], want[i]
                    );
                }
            }
            written[at..at + hd].fill(true);
        }
    }
    // Every other cache value untouched (as uploaded: the same rounding read back).
    for i in (0..n_pool).filter(|&i| !written[i]) {
        for (name, gv, wv) in [("k", kc_got[i], kc[i]), ("v", vc_got[i], vc[i])] {
            assert!(
                gv == wv,
                "{what}: {name} pool [{i}] (row {}, value {}) = {gv}, want {wv}",
                i / kvd,
                i % kvd
            );
        }
    }
}

/// The test devices: subgroup / shared-memory reductions, f16 / f32 / q8_0 KV cache;
/// None without a device.
fn contexts() -> Option<Vec<Context>> {
    let mut ctxs = Vec::new();
    for (shared, kv) in [
        (false, KvType::F16),
        (true, KvType::F32),
        (false, KvType::Q8_0),
    ] {
        let opts = ContextOptions {
            force_shared_reduce: shared,
            kv_type: Some(kv),
            ..Default::default()
        };
        ctxs.push(test_context("attn_batch", &opts)?);
    }
    Some(ctxs)
}

#[test]
fn attn_batch_matches_cpu() {
    let mut rng = rng("attn_batch");
    let Some(ctxs) = contexts() else { return };
    for ctx in &ctxs {
        for (cols, slots) in [(1, 3), (3, 5), (8, 11), (16, 17)] {
            for (n_heads, n_kv, hd, n_rot) in [
                (8, 2, 64, 64),
                (4, 4, 32, 16),
                (20, 2, 96, 96),
                (16, 2, 128, 128),
            ] {
                for (cap, window) in [(37, 0), (161, 0), (161, 45)] {
                    for (interleaved, qk_norm, softcap, gate, sinks) in [
                        (false, true, 0.0, false, false),
                        (true, false, 30.0, true, false),
                        (false, false, 0.0, false, true),
                    ] {
                        let c = Case {
                            n_heads,
                            n_kv,
                            hd,
                            n_rot,
                            interleaved,
                            qk_norm,
                            window,
                            softcap,
                            cap,
                            gate,
                            sinks,
                            v_norm: false,
                            nokv: false,
                            cols,
                            slots,
                        };
                        run(ctx, &mut rng, &c, Launch::Old);
                        if sinks {
                            // attn_dec_batch has none (the batched step takes attn_batch).
                            continue;
                        }
                        run(ctx, &mut rng, &c, Launch::New { blocks: 0 });
                        run(ctx, &mut rng, &c, Launch::New { blocks: 2 });
                    }
                }
            }
        }
    }
}

/// Gemma 4's attention in the batched kernels: v norm, KV-shared layers (q only, the
/// pool's rows at the token's position, nothing written) and global layers with heads of
/// 512 and partial RoPE (sliding ones of 64 beside them), odd column and slot counts.
#[test]
fn attn_batch_gemma4_matches_cpu() {
    let mut rng = rng("attn_batch_gemma4");
    let Some(ctxs) = contexts() else { return };
    for ctx in &ctxs {
        for (cols, slots) in [(3, 5), (16, 17)] {
            // (heads, kv heads, head size, rotated dims, window)
            for (n_heads, n_kv, hd, n_rot, window) in [(8, 4, 512, 128, 0), (6, 2, 64, 64, 23)] {
                for (qk_norm, v_norm, nokv) in [
                    (true, true, false),
                    (true, false, true),
                    (false, true, false),
                ] {
                    let c = Case {
                        n_heads,
                        n_kv,
                        hd,
                        n_rot,
                        interleaved: false,
                        qk_norm,
                        window,
                        softcap: 0.0,
                        cap: 83,
                        gate: false,
                        sinks: false,
                        v_norm,
                        nokv,
                        cols,
                        slots,
                    };
                    run(ctx, &mut rng, &c, Launch::Old);
                    let wg = ctx.tuning().workgroup_size;
                    if attn_dec_shape(n_heads / n_kv, hd, wg, c.cap, 8, 0, 0).is_some() {
                        run(ctx, &mut rng, &c, Launch::New { blocks: 0 });
                        run(ctx, &mut rng, &c, Launch::New { blocks: 2 });
                    }
                }
            }
        }
    }
}
