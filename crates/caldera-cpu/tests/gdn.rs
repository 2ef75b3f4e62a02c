//! GatedDeltaNet: the chunked delta rule equals the recurrent step, token by token; and
//! random Qwen3.5 / Qwen3-Next hybrids give the same logits for one prefill, for single
//! steps, and for a prefill continued across `forward` calls, across chunk boundaries.

use std::path::Path;
use std::sync::Arc;

use caldera_cpu::gdn::{delta_chunked, delta_step, DELTA_CHUNK};
use caldera_cpu::{CpuBackend, Logits};
use caldera_format::gguf::GgufValue;
use caldera_format::{quant, GgmlType, TensorBytes};
use caldera_model::file::RawTensor;
use caldera_model::{Model, ModelFile};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn normalized(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm * scale).collect()
}

#[test]
fn chunked_delta_rule_equals_steps() {
    let (dk, dv) = (24, 40);
    for &t_len in &[1usize, 63, 64, 65, 130] {
        let mut rng = StdRng::seed_from_u64(t_len as u64);
        let mut q = Vec::new();
        let mut k = Vec::new();
        for _ in 0..t_len {
            q.extend(normalized(&mut rng, dk, 1.0 / (dk as f32).sqrt()));
            k.extend(normalized(&mut rng, dk, 1.0));
        }
        let v: Vec<f32> = (0..t_len * dv).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let g: Vec<f32> = (0..t_len).map(|_| -rng.gen_range(0.0f32..0.3)).collect();
        let beta: Vec<f32> = (0..t_len).map(|_| rng.gen_range(0.05f32..0.95)).collect();
        let s0: Vec<f32> = (0..dk * dv).map(|_| rng.gen_range(-0.5..0.5)).collect();

        let mut s_chunk = s0.clone();
        let mut o_chunk = vec![0f32; t_len * dv];
        delta_chunked(&mut s_chunk, &q, &k, &v, &g, &beta, &mut o_chunk);

        let mut s_step = s0.clone();
        let mut o_step = vec![0f32; t_len * dv];
        let mut scratch = Vec::new();
        for t in 0..t_len {
            delta_step(
                &mut s_step,
                &q[t * dk..(t + 1) * dk],
                &k[t * dk..(t + 1) * dk],
                &v[t * dv..(t + 1) * dv],
                g[t],
                beta[t],
                &mut o_step[t * dv..(t + 1) * dv],
                &mut scratch,
            );
        }
        for t in 0..t_len {
            let e = rel_l2(
                &o_chunk[t * dv..(t + 1) * dv],
                &o_step[t * dv..(t + 1) * dv],
            );
            assert!(e <= 1e-5, "T={t_len}: token {t}: chunked vs step {e:.3e}");
        }
        let e = rel_l2(&s_chunk, &s_step);
        assert!(e <= 1e-5, "T={t_len}: final state {e:.3e}");
    }
    assert_eq!(DELTA_CHUNK, 64);
}

struct Spec {
    arch: &'static str,
    d: usize,
    heads: usize,
    kv: usize,
    head_dim: usize,
    rope_dims: usize,
    ff: usize,
    vocab: usize,
    layers: usize,
    n_k: usize,
    n_v: usize,
    dk: usize,
    dv: usize,
    kernel: usize,
    /// MoE (n_experts, n_used, expert ff, shared ff) instead of a dense MLP.
    moe: Option<(usize, usize, usize, usize)>,
    /// `ssm_ba` fused (Qwen3-Next) instead of `ssm_beta` + `ssm_alpha`.
    fused_ba: bool,
}

fn random_model(s: &Spec, seed: u64) -> Model {
    let mut rng = StdRng::seed_from_u64(seed);
    let a = s.arch;
    let u = |n: usize| GgufValue::U32(n as u32);
    let meta = vec![
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
        (format!("{a}.rope.dimension_count"), u(s.rope_dims)),
        (format!("{a}.ssm.conv_kernel"), u(s.kernel)),
        (format!("{a}.ssm.state_size"), u(s.dk)),
        (format!("{a}.ssm.group_count"), u(s.n_k)),
        (format!("{a}.ssm.time_step_rank"), u(s.n_v)),
        (format!("{a}.ssm.inner_size"), u(s.n_v * s.dv)),
        (format!("{a}.full_attention_interval"), u(3)),
        (format!("{a}.expert_count"), u(s.moe.map_or(0, |m| m.0))),
        (
            format!("{a}.expert_used_count"),
            u(s.moe.map_or(0, |m| m.1)),
        ),
        (
            format!("{a}.expert_feed_forward_length"),
            u(s.moe.map_or(0, |m| m.2)),
        ),
        (
            format!("{a}.expert_shared_feed_forward_length"),
            u(s.moe.map_or(0, |m| m.3)),
        ),
    ];
    let mut tensors = Vec::new();
    let mut add = |name: String, dims: Vec<u64>, rng: &mut StdRng, scale: f32, offset: f32| {
        let n: u64 = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| offset + scale * rng.gen_range(-1.0f32..1.0))
            .collect();
        let data = quant::quantize(GgmlType::F32, &v).expect("quantize");
        tensors.push(RawTensor {
            name,
            ty: GgmlType::F32,
            dims,
            data: TensorBytes::from_vec(data),
        });
    };
    let d = s.d as u64;
    let (kd, vd) = ((s.n_k * s.dk) as u64, (s.n_v * s.dv) as u64);
    let cd = 2 * kd + vd;
    let nv = s.n_v as u64;
    add(
        "token_embd.weight".into(),
        vec![d, s.vocab as u64],
        &mut rng,
        1.0,
        0.0,
    );
    add("output_norm.weight".into(), vec![d], &mut rng, 0.1, 1.0);
    add(
        "output.weight".into(),
        vec![d, s.vocab as u64],
        &mut rng,
        0.3,
        0.0,
    );
    for i in 0..s.layers {
        let p = |n: &str| format!("blk.{i}.{n}");
        add(p("attn_norm.weight"), vec![d], &mut rng, 0.1, 1.0);
        add(p("post_attention_norm.weight"), vec![d], &mut rng, 0.1, 1.0);
        if (i + 1) % 3 == 0 {
            let hd = s.head_dim as u64;
            let q = s.heads as u64 * hd;
            let kv = s.kv as u64 * hd;
            add(p("attn_q.weight"), vec![d, 2 * q], &mut rng, 0.3, 0.0);
            add(p("attn_k.weight"), vec![d, kv], &mut rng, 0.3, 0.0);
            add(p("attn_v.weight"), vec![d, kv], &mut rng, 0.3, 0.0);
            add(p("attn_output.weight"), vec![q, d], &mut rng, 0.3, 0.0);
            add(p("attn_q_norm.weight"), vec![hd], &mut rng, 0.1, 1.0);
            add(p("attn_k_norm.weight"), vec![hd], &mut rng, 0.1, 1.0);
        } else {
            add(p("attn_qkv.weight"), vec![d, cd], &mut rng, 0.3, 0.0);
            add(p("attn_gate.weight"), vec![d, vd], &mut rng, 0.3, 0.0);
            if s.fused_ba {
                add(p("ssm_ba.weight"), vec![d, 2 * nv], &mut rng, 0.3, 0.0);
            } else {
                add(p("ssm_beta.weight"), vec![d, nv], &mut rng, 0.3, 0.0);
                add(p("ssm_alpha.weight"), vec![d, nv], &mut rng, 0.3, 0.0);
            }
            add(
                p("ssm_conv1d.weight"),
                vec![s.kernel as u64, cd],
                &mut rng,
                0.5,
                0.0,
            );
            add(p("ssm_dt.bias"), vec![nv], &mut rng, 0.5, 0.0);
            // -exp(A_log) for A in roughly (0.1, 1)
            add(p("ssm_a"), vec![nv], &mut rng, 0.45, -0.55);
            add(p("ssm_norm.weight"), vec![s.dv as u64], &mut rng, 0.1, 1.0);
            add(p("ssm_out.weight"), vec![vd, d], &mut rng, 0.3, 0.0);
        }
        match s.moe {
            None => {
                let ff = s.ff as u64;
                add(p("ffn_gate.weight"), vec![d, ff], &mut rng, 0.3, 0.0);
                add(p("ffn_up.weight"), vec![d, ff], &mut rng, 0.3, 0.0);
                add(p("ffn_down.weight"), vec![ff, d], &mut rng, 0.3, 0.0);
            }
            Some((n, _, ff, sff)) => {
                let (n, ff, sff) = (n as u64, ff as u64, sff as u64);
                add(p("ffn_gate_inp.weight"), vec![d, n], &mut rng, 0.3, 0.0);
                add(
                    p("ffn_gate_exps.weight"),
                    vec![d, ff, n],
                    &mut rng,
                    0.3,
                    0.0,
                );
                add(p("ffn_up_exps.weight"), vec![d, ff, n], &mut rng, 0.3, 0.0);
                add(
                    p("ffn_down_exps.weight"),
                    vec![ff, d, n],
                    &mut rng,
                    0.3,
                    0.0,
                );
                add(p("ffn_gate_shexp.weight"), vec![d, sff], &mut rng, 0.3, 0.0);
                add(p("ffn_up_shexp.weight"), vec![d, sff], &mut rng, 0.3, 0.0);
                add(p("ffn_down_shexp.weight"), vec![sff, d], &mut rng, 0.3, 0.0);
                add(
                    p("ffn_gate_inp_shexp.weight"),
                    vec![d, 1],
                    &mut rng,
                    0.3,
                    0.0,
                );
            }
        }
    }
    let file = ModelFile::new(Path::new("random"), "gguf", meta, tensors).expect("model file");
    Model::from_file(&file).expect("model")
}

fn qwen35(n_k: usize, n_v: usize) -> Spec {
    Spec {
        arch: "qwen35",
        d: 72,
        heads: 4,
        kv: 2,
        head_dim: 16,
        rope_dims: 4,
        ff: 88,
        vocab: 61,
        layers: 3,
        n_k,
        n_v,
        dk: 12,
        dv: 20,
        kernel: 4,
        moe: None,
        fused_ba: false,
    }
}

/// One prefill of `n` tokens against `n` single steps, and against a prefill split in two
/// `forward` calls.
fn check(s: &Spec, n: usize, threads: usize) {
    let be = CpuBackend::new(Arc::new(random_model(s, 5)), threads);
    let mut rng = StdRng::seed_from_u64(n as u64 + 100);
    let toks: Vec<u32> = (0..n).map(|_| rng.gen_range(0..s.vocab as u32)).collect();
    let v = s.vocab;

    let mut all = Vec::new();
    let mut a = be.new_session(n).unwrap();
    be.forward(&mut a, &toks, Logits::All, &mut all).unwrap();
    assert_eq!(all.len(), n * v);

    let mut b = be.new_session(n).unwrap();
    let mut row = Vec::new();
    for (i, &t) in toks.iter().enumerate() {
        be.forward(&mut b, &[t], Logits::Last, &mut row).unwrap();
        let e = rel_l2(&row, &all[i * v..(i + 1) * v]);
        assert!(
            e <= 1e-5,
            "{} T={n}: token {i}: prefill vs steps {e:.3e}",
            s.arch
        );
    }

    // Prefill continued across calls: a first part, then the rest.
    let cut = n / 2 + 1;
    if cut < n {
        let mut c = be.new_session(n).unwrap();
        let mut first = Vec::new();
        be.forward(&mut c, &toks[..cut], Logits::All, &mut first)
            .unwrap();
        let mut second = Vec::new();
        be.forward(&mut c, &toks[cut..], Logits::All, &mut second)
            .unwrap();
        first.extend(second);
        let e = rel_l2(&first, &all);
        assert!(e <= 1e-5, "{} T={n}: split prefill {e:.3e}", s.arch);
    }
}

#[test]
fn qwen35_prefill_equals_steps_across_chunks() {
    let s = qwen35(2, 4);
    for &n in &[1usize, 63, 64, 65, 130] {
        check(&s, n, 2);
    }
}

#[test]
fn qwen35_equal_key_and_value_heads() {
    check(&qwen35(3, 3), 70, 3);
}

#[test]
fn qwen3next_fused_ba_moe_prefill_equals_steps() {
    let mut s = qwen35(1, 3);
    s.arch = "qwen3next";
    s.fused_ba = true;
    s.moe = Some((6, 2, 24, 32));
    check(&s, 66, 2);
}

#[test]
fn snapshot_continues_like_the_original() {
    let s = qwen35(2, 4);
    let be = CpuBackend::new(Arc::new(random_model(&s, 9)), 2);
    let toks: Vec<u32> = (0..40).map(|i| (i * 7 % s.vocab) as u32).collect();
    let mut a = be.new_session(64).unwrap();
    let mut out = Vec::new();
    be.forward(&mut a, &toks[..30], Logits::Last, &mut out)
        .unwrap();
    let mut b = a.clone();
    let mut ra = Vec::new();
    let mut rb = Vec::new();
    be.forward(&mut a, &toks[30..], Logits::All, &mut ra)
        .unwrap();
    be.forward(&mut b, &toks[30..], Logits::All, &mut rb)
        .unwrap();
    assert_eq!(ra, rb);
}
