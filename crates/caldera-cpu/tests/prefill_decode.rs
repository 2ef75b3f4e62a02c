//! A prompt run as one prefill and the same prompt run one token at a time give the
//! same logits, for random tiny models of each architecture and weight type, with odd
//! sizes, across the prefill chunk boundary, with sliding windows.

mod common;

use std::sync::Arc;

use caldera_cpu::{CpuBackend, Logits};
use caldera_format::GgmlType;
use common::{random_model, rel_l2, Spec};
use rand::{Rng, SeedableRng};

fn check(s: &Spec, n_tokens: usize, threads: usize) {
    let model = Arc::new(random_model(s, 7));
    let be = CpuBackend::new(model, threads);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let toks: Vec<u32> = (0..n_tokens)
        .map(|_| rng.gen_range(0..s.vocab as u32))
        .collect();
    let mut all = Vec::new();
    let mut a = be.new_session(n_tokens).unwrap();
    be.forward(&mut a, &toks, Logits::All, &mut all).unwrap();
    let mut b = be.new_session(n_tokens).unwrap();
    let mut row = Vec::new();
    for (i, &t) in toks.iter().enumerate() {
        be.forward(&mut b, &[t], Logits::Last, &mut row).unwrap();
        let e = rel_l2(&row, &all[i * s.vocab..(i + 1) * s.vocab]);
        assert!(
            e <= 1e-5,
            "{} {:?}: token {i}: prefill vs step error {e:.3e}",
            s.arch,
            s.ty
        );
    }
    // `Last` returns the final row of `All`.
    let mut c = be.new_session(n_tokens).unwrap();
    let mut last = Vec::new();
    be.forward(&mut c, &toks, Logits::Last, &mut last).unwrap();
    assert!(rel_l2(&last, &all[(n_tokens - 1) * s.vocab..]) <= 1e-6);
}

fn spec(arch: &'static str, ty: GgmlType, window: Option<usize>) -> Spec {
    Spec {
        arch,
        d: 96,
        heads: 6,
        kv: 2,
        head_dim: 32,
        ff: 160,
        vocab: 67,
        layers: 2,
        ty,
        window,
    }
}

#[test]
fn llama_f32_prefill_equals_steps_across_chunks() {
    check(&spec("llama", GgmlType::F32, None), 300, 2);
}

#[test]
fn qwen3_q8_0_prefill_equals_steps() {
    check(&spec("qwen3", GgmlType::Q8_0, None), 37, 3);
}

#[test]
fn gemma3_windowed_prefill_equals_steps() {
    let mut s = spec("gemma3", GgmlType::F16, Some(5));
    s.layers = 6; // five sliding layers and one global
    check(&s, 29, 2);
}

#[test]
fn context_overflow_and_bad_tokens_are_errors() {
    let s = spec("llama", GgmlType::F32, None);
    let be = CpuBackend::new(Arc::new(random_model(&s, 1)), 1);
    let mut sess = be.new_session(4).unwrap();
    let mut out = Vec::new();
    assert!(be
        .forward(&mut sess, &[1, 2, 3, 4, 5], Logits::Last, &mut out)
        .is_err());
    assert!(be
        .forward(&mut sess, &[999], Logits::Last, &mut out)
        .is_err());
    assert!(be
        .forward(&mut sess, &[1, 2], Logits::Last, &mut out)
        .is_ok());
}
