//! A prompt run as one prefill and the same prompt run one token at a time give the
//! same logits, for random tiny models of each architecture and weight type, with odd
//! sizes, across the prefill chunk boundary, with sliding windows.

use std::path::Path;
use std::sync::Arc;

use caldera_cpu::{CpuBackend, Logits};
use caldera_format::gguf::GgufValue;
use caldera_format::{quant, GgmlType, TensorBytes};
use caldera_model::file::RawTensor;
use caldera_model::{Model, ModelFile};
use rand::{Rng, SeedableRng};

struct Spec {
    arch: &'static str,
    d: usize,
    heads: usize,
    kv: usize,
    head_dim: usize,
    ff: usize,
    vocab: usize,
    layers: usize,
    ty: GgmlType,
    window: Option<usize>,
}

fn random_model(s: &Spec, seed: u64) -> Model {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let a = s.arch;
    let u = |n: usize| GgufValue::U32(n as u32);
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            GgufValue::String(a.into()),
        ),
        (format!("{a}.block_count"), u(s.layers)),
        (format!("{a}.embedding_length"), u(s.d)),
        (format!("{a}.feed_forward_length"), u(s.ff)),
        (format!("{a}.attention.head_count"), u(s.heads)),
        (format!("{a}.attention.head_count_kv"), u(s.kv)),
        (format!("{a}.attention.key_length"), u(s.head_dim)),
        (format!("{a}.attention.value_length"), u(s.head_dim)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            GgufValue::F32(1e-6),
        ),
        (format!("{a}.rope.freq_base"), GgufValue::F32(10000.0)),
    ];
    if let Some(w) = s.window {
        meta.push((format!("{a}.attention.sliding_window"), u(w)));
    }
    let mut tensors = Vec::new();
    let mut add = |name: String,
                   dims: Vec<u64>,
                   ty: GgmlType,
                   rng: &mut rand::rngs::StdRng,
                   scale: f32,
                   offset: f32| {
        let n: u64 = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| offset + scale * rng.gen_range(-1.0f32..1.0))
            .collect();
        let data = quant::quantize(ty, &v).expect("quantize");
        tensors.push(RawTensor {
            name,
            ty,
            dims,
            data: TensorBytes::from_vec(data),
        });
    };
    let (d, hd) = (s.d as u64, s.head_dim as u64);
    let q = s.heads as u64 * hd;
    let kv = s.kv as u64 * hd;
    let ff = s.ff as u64;
    add(
        "token_embd.weight".into(),
        vec![d, s.vocab as u64],
        s.ty,
        &mut rng,
        1.0,
        0.0,
    );
    add(
        "output_norm.weight".into(),
        vec![d],
        GgmlType::F32,
        &mut rng,
        0.1,
        1.0,
    );
    for i in 0..s.layers {
        let p = |n: &str| format!("blk.{i}.{n}");
        add(
            p("attn_norm.weight"),
            vec![d],
            GgmlType::F32,
            &mut rng,
            0.1,
            1.0,
        );
        add(p("attn_q.weight"), vec![d, q], s.ty, &mut rng, 0.3, 0.0);
        add(p("attn_k.weight"), vec![d, kv], s.ty, &mut rng, 0.3, 0.0);
        add(p("attn_v.weight"), vec![d, kv], s.ty, &mut rng, 0.3, 0.0);
        add(
            p("attn_output.weight"),
            vec![q, d],
            s.ty,
            &mut rng,
            0.3,
            0.0,
        );
        add(
            p("ffn_norm.weight"),
            vec![d],
            GgmlType::F32,
            &mut rng,
            0.1,
            1.0,
        );
        add(p("ffn_gate.weight"), vec![d, ff], s.ty, &mut rng, 0.3, 0.0);
        add(p("ffn_up.weight"), vec![d, ff], s.ty, &mut rng, 0.3, 0.0);
        add(p("ffn_down.weight"), vec![ff, d], s.ty, &mut rng, 0.3, 0.0);
        if a != "llama" {
            add(
                p("attn_q_norm.weight"),
                vec![hd],
                GgmlType::F32,
                &mut rng,
                0.1,
                1.0,
            );
            add(
                p("attn_k_norm.weight"),
                vec![hd],
                GgmlType::F32,
                &mut rng,
                0.1,
                1.0,
            );
        }
        if a == "gemma3" {
            add(
                p("post_attention_norm.weight"),
                vec![d],
                GgmlType::F32,
                &mut rng,
                0.1,
                1.0,
            );
            add(
                p("post_ffw_norm.weight"),
                vec![d],
                GgmlType::F32,
                &mut rng,
                0.1,
                1.0,
            );
        }
    }
    let file = ModelFile::new(Path::new("random"), "gguf", meta, tensors).expect("model file");
    Model::from_file(&file).expect("model")
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

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
