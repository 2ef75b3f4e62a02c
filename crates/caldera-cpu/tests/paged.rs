//! The paged KV cache: attention through page tables of odd page sizes equals one
//! contiguous page; the pool's counts, its bound and its errors; copy on write; the
//! prefix cache (reuse gives a cold run's logits; eviction when pages are needed).

mod common;

use std::sync::Arc;

use caldera_cpu::paged::KvConfig;
use caldera_cpu::{CpuBackend, CpuError, Logits, Session};
use caldera_format::GgmlType;
use caldera_model::Model;
use common::{random_model, rel_l2, Spec};
use rand::{Rng, SeedableRng};

fn spec(arch: &'static str, window: Option<usize>, layers: usize) -> Spec {
    Spec {
        arch,
        d: 64,
        heads: 4,
        kv: 2,
        head_dim: 16,
        ff: 96,
        vocab: 53,
        layers,
        ty: GgmlType::F32,
        window,
    }
}

fn backend(model: &Arc<Model>, page_tokens: usize, max: Option<usize>, prefix: bool) -> CpuBackend {
    CpuBackend::with_kv(
        model.clone(),
        2,
        &KvConfig {
            page_tokens,
            max_pages: max,
            prefix_cache: prefix,
            snapshots: 0,
        },
    )
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(0..vocab as u32)).collect()
}

/// Logits of every position: `toks` in pieces of `pieces` tokens (prefill chunks, then
/// decode steps).
fn run(be: &CpuBackend, s: &mut Session, toks: &[u32], pieces: &[usize]) -> Vec<f32> {
    let mut all = Vec::new();
    let mut out = Vec::new();
    let mut i = 0;
    let mut k = 0;
    while i < toks.len() {
        let n = pieces.get(k).copied().unwrap_or(1).min(toks.len() - i);
        be.forward(s, &toks[i..i + n], Logits::All, &mut out)
            .expect("forward");
        all.extend_from_slice(&out);
        i += n;
        k += 1;
    }
    all
}

#[test]
fn page_tables_equal_one_contiguous_page() {
    for (sp, n) in [
        (spec("llama", None, 2), 300),
        (spec("gemma3", Some(5), 6), 41),
        (spec("qwen3", None, 2), 45),
    ] {
        let model = Arc::new(random_model(&sp, 3));
        let toks = tokens(n, sp.vocab, 5);
        let pieces = [17, 1, 1, 260, 3];
        let contiguous = {
            let be = backend(&model, 4096, None, false);
            let mut s = be.new_session(n).unwrap();
            let r = run(&be, &mut s, &toks, &pieces);
            assert_eq!(s.pages(), 1);
            r
        };
        for pt in [1, 3, 7, 16] {
            let be = backend(&model, pt, None, false);
            let mut s = be.new_session(n).unwrap();
            let paged = run(&be, &mut s, &toks, &pieces);
            let e = rel_l2(&paged, &contiguous);
            assert!(e <= 1e-5, "{} page {pt}: error {e:.3e}", sp.arch);
            assert_eq!(s.pages(), n.div_ceil(pt));
        }
    }
}

#[test]
fn pages_are_counted_bounded_and_given_back() {
    let sp = spec("llama", None, 2);
    let model = Arc::new(random_model(&sp, 3));
    let be = backend(&model, 8, Some(4), false);
    let pool = be.kv_pool().clone();
    let mut out = Vec::new();
    let mut a = be.new_session(64).unwrap();
    be.forward(&mut a, &tokens(20, sp.vocab, 1), Logits::Last, &mut out)
        .unwrap();
    assert_eq!(
        (a.pages(), pool.stats().in_use, pool.stats().free()),
        (3, 3, 1)
    );
    assert!(a.truncate(8));
    assert_eq!((a.pages(), pool.stats().in_use), (1, 1));
    // Another sequence takes the rest; the next page fails with an error, not a panic,
    // and the failed call leaves the sequence as it was.
    let mut b = be.new_session(64).unwrap();
    be.forward(&mut b, &tokens(24, sp.vocab, 2), Logits::Last, &mut out)
        .unwrap();
    assert_eq!(pool.stats().free(), 0);
    let err = be
        .forward(&mut a, &tokens(9, sp.vocab, 3), Logits::Last, &mut out)
        .unwrap_err();
    assert!(matches!(err, CpuError::KvFull { pages: 4, .. }), "{err}");
    assert_eq!(a.len(), 8);
    drop(b);
    assert_eq!(pool.stats().in_use, 1);
    be.forward(&mut a, &tokens(9, sp.vocab, 3), Logits::Last, &mut out)
        .unwrap();
    assert_eq!(a.len(), 17);
    drop(a);
    let st = pool.stats();
    assert_eq!((st.in_use, st.free(), st.total), (0, 4, 4));
    assert!(st.allocated <= 4);
}

#[test]
fn clones_share_pages_and_copy_on_write() {
    let sp = spec("qwen3", None, 2);
    let model = Arc::new(random_model(&sp, 4));
    let be = backend(&model, 5, None, false);
    let pool = be.kv_pool().clone();
    let toks = tokens(30, sp.vocab, 9);
    let mut a = be.new_session(64).unwrap();
    let mut out = Vec::new();
    be.forward(&mut a, &toks[..13], Logits::Last, &mut out)
        .unwrap();
    let mut b = a.clone();
    assert_eq!(pool.stats().in_use, 3);
    let ra = run(&be, &mut a, &toks[13..20], &[7]);
    let rb = run(&be, &mut b, &toks[13..], &[2, 15]);
    // The shared partial page was copied: a and b now differ after position 13.
    assert_eq!(pool.stats().in_use, 3 + 2 + 3);
    let mut c = be.new_session(64).unwrap();
    let cold = run(&be, &mut c, &toks, &[13, 17]);
    let v = sp.vocab;
    assert!(rel_l2(&ra, &cold[13 * v..20 * v]) <= 1e-6);
    assert!(rel_l2(&rb, &cold[13 * v..]) <= 1e-6);
}

#[test]
fn prefix_reuse_equals_a_cold_run() {
    let sp = spec("llama", None, 2);
    let model = Arc::new(random_model(&sp, 6));
    let v = sp.vocab;
    let be = backend(&model, 8, Some(40), true);
    let pool = be.kv_pool().clone();
    let system = tokens(45, v, 21);
    let mut p1 = system.clone();
    p1.extend(tokens(10, v, 22));
    let mut p2 = system.clone();
    p2.extend(tokens(12, v, 23));
    let mut out = Vec::new();
    {
        let mut a = be.new_session(128).unwrap();
        be.forward(&mut a, &p1, Logits::Last, &mut out).unwrap();
        // 55 tokens: 6 full pages published.
        assert_eq!(pool.stats().cached, 6);
    }
    let st = pool.stats();
    assert_eq!((st.in_use, st.cached), (0, 6));
    let mut b = be.new_session(128).unwrap();
    // 45 shared tokens: 5 whole pages.
    assert_eq!(b.reuse_prefix(&p2, p2.len() - 1), 40);
    assert_eq!((b.len(), pool.stats().in_use), (40, 5));
    let warm = run(&be, &mut b, &p2[40..], &[17]);
    let cold_be = backend(&model, 8, None, false);
    let mut c = cold_be.new_session(128).unwrap();
    let cold = run(&cold_be, &mut c, &p2, &[57]);
    let e = rel_l2(&warm, &cold[40 * v..]);
    assert!(e <= 1e-6, "reused vs cold: {e:.3e}");
    // The limit is respected and a session that holds other tokens takes nothing.
    let mut d = be.new_session(128).unwrap();
    assert_eq!(d.reuse_prefix(&p2, 20), 16);
    let mut other = be.new_session(128).unwrap();
    be.forward(&mut other, &p1[1..9], Logits::Last, &mut out)
        .unwrap();
    assert_eq!(other.reuse_prefix(&p2, 50), 8);
}

#[test]
fn cached_pages_are_evicted_when_needed() {
    let sp = spec("llama", None, 2);
    let model = Arc::new(random_model(&sp, 8));
    let v = sp.vocab;
    let be = backend(&model, 4, Some(6), true);
    let pool = be.kv_pool().clone();
    let mut out = Vec::new();
    let p1 = tokens(17, v, 1);
    let p2 = tokens(20, v, 2);
    {
        let mut a = be.new_session(64).unwrap();
        be.forward(&mut a, &p1, Logits::Last, &mut out).unwrap();
    }
    assert_eq!(pool.stats().cached, 4);
    // 20 tokens need 5 pages: 2 free, 3 evicted from the cache (leaves first).
    let mut b = be.new_session(64).unwrap();
    be.forward(&mut b, &p2, Logits::Last, &mut out).unwrap();
    let st = pool.stats();
    assert_eq!(st.in_use, 5);
    assert!(st.cached <= 6);
    // What is left of p1's chain is its first page.
    let mut c = be.new_session(64).unwrap();
    assert_eq!(c.reuse_prefix(&p1, 16), 4);
}

#[test]
fn a_bounded_pool_can_take_its_memory_up_front() {
    let sp = spec("llama", None, 2);
    let model = Arc::new(random_model(&sp, 3));
    let be = backend(&model, 8, Some(5), true);
    let pool = be.kv_pool().clone();
    pool.preallocate().unwrap();
    let st = pool.stats();
    assert_eq!((st.allocated, st.in_use, st.free()), (5, 0, 5));
    let mut s = be.new_session(64).unwrap();
    let mut out = Vec::new();
    be.forward(&mut s, &tokens(40, sp.vocab, 1), Logits::Last, &mut out)
        .unwrap();
    assert_eq!((pool.stats().allocated, pool.stats().in_use), (5, 5));
    // 8 KiB of f32 K and V per position of this model.
    assert_eq!(pool.page_bytes(), 2 * 2 * 2 * 16 * 8 * 4);
}

/// Random forwards, truncates, clones, drops and prefix reuses over a small bounded pool
/// with a prefix cache: every session's next logits equal a cold run of its tokens, a
/// full pool is an error that changes nothing, and every page comes back at the end.
#[test]
fn random_operations_keep_pages_and_contents_consistent() {
    let mut sp = spec("llama", None, 2);
    sp.d = 32;
    sp.ff = 48;
    let model = Arc::new(random_model(&sp, 12));
    let v = sp.vocab;
    let be = backend(&model, 4, Some(40), true);
    let cold_be = backend(&model, 64, None, false);
    let pool = be.kv_pool().clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    // Three documents: prompts start with one of them, so chains get shared.
    let docs: Vec<Vec<u32>> = (0..3).map(|i| tokens(40, v, 50 + i)).collect();
    let mut sessions: Vec<Session> = Vec::new();
    let mut out = Vec::new();
    let mut full_errors = 0;
    let mut reused = 0;
    for step in 0..400 {
        let op = rng.gen_range(0..10);
        if sessions.is_empty() || (op == 0 && sessions.len() < 5) {
            let mut s = be.new_session(64).unwrap();
            let d = &docs[rng.gen_range(0..3)];
            let limit = rng.gen_range(0..=d.len());
            let n = s.reuse_prefix(d, limit);
            assert!(n <= limit && n.is_multiple_of(4));
            assert_eq!(s.tokens(), &d[..n]);
            reused += n;
            sessions.push(s);
            continue;
        }
        let i = rng.gen_range(0..sessions.len());
        match op {
            1 if sessions.len() < 5 => {
                let c = sessions[i].clone();
                sessions.push(c);
            }
            2 => {
                sessions.swap_remove(i);
            }
            3 => {
                let s = &mut sessions[i];
                let n = rng.gen_range(0..=s.len());
                assert!(s.truncate(n));
                assert_eq!(s.len(), n);
            }
            _ => {
                let s = &mut sessions[i];
                let room = 64 - s.len();
                if room == 0 {
                    assert!(s.truncate(0));
                    continue;
                }
                let n = rng.gen_range(1..=room.min(20));
                // Mostly continue a document, sometimes leave it.
                let d = &docs[rng.gen_range(0..3)];
                let toks: Vec<u32> = (0..n)
                    .map(|j| {
                        let p = s.len() + j;
                        if p < d.len() && rng.gen_range(0..4) > 0 {
                            d[p]
                        } else {
                            rng.gen_range(0..v as u32)
                        }
                    })
                    .collect();
                let before = s.tokens().to_vec();
                match be.forward(s, &toks, Logits::Last, &mut out) {
                    Ok(()) => {
                        let mut cold = cold_be.new_session(64).unwrap();
                        let mut all = before.clone();
                        all.extend_from_slice(&toks);
                        let mut want = Vec::new();
                        cold_be
                            .forward(&mut cold, &all, Logits::Last, &mut want)
                            .unwrap();
                        let e = rel_l2(&out, &want);
                        assert!(e <= 1e-5, "step {step}: error {e:.3e}");
                        assert_eq!(s.tokens(), &all[..]);
                    }
                    Err(CpuError::KvFull { .. }) => {
                        full_errors += 1;
                        assert_eq!(s.tokens(), &before[..]);
                    }
                    Err(e) => panic!("step {step}: {e}"),
                }
            }
        }
        let st = pool.stats();
        let held: usize = sessions.iter().map(|s| s.pages()).sum();
        assert!(
            st.in_use <= held && st.allocated <= 40,
            "step {step}: {st:?}"
        );
    }
    eprintln!("{full_errors} calls found the pool full; {reused} tokens reused");
    assert!(full_errors > 0 && reused > 0);
    sessions.clear();
    let st = pool.stats();
    assert_eq!((st.in_use, st.free()), (0, 40), "{st:?}");
}
