//! Mamba2 on the CPU: a chunked (SSD) prefill of T tokens gives the same logits as T
//! single recurrent steps, for T across the SSD chunk boundary (64), on random
//! `nemotron_h` models (Mamba2, MoE, attention without RoPE and relu² MLP layers).

use std::path::Path;
use std::sync::Arc;

use caldera_cpu::{CpuBackend, Logits};
use caldera_format::gguf::GgufValue;
use caldera_format::{quant, GgmlType, TensorBytes};
use caldera_model::file::RawTensor;
use caldera_model::{Mixer, Model, ModelFile};
use rand::{Rng, SeedableRng};

/// Layer kinds as in `hybrid_override_pattern`.
const PATTERN: &str = "ME*M-";

struct Sizes {
    d: usize,
    heads: usize,
    head_dim: usize,
    groups: usize,
    state: usize,
    conv: usize,
    vocab: usize,
    ty: GgmlType,
}

fn random_model(s: &Sizes, seed: u64) -> Model {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let a = "nemotron_h";
    let u = |n: usize| GgufValue::U32(n as u32);
    let (attn_heads, kv, attn_hd): (usize, i32, usize) = (4, 2, 8);
    let (ff, n_exp, exp_ff, sh_ff): (usize, usize, usize, usize) = (40, 4, 24, 16);
    let kinds: Vec<char> = PATTERN.chars().collect();
    let kv_arr: Vec<i32> = kinds
        .iter()
        .map(|&k| if k == '*' { kv } else { 0 })
        .collect();
    let ff_arr: Vec<i32> = kinds
        .iter()
        .map(|&k| match k {
            '-' => ff as i32,
            'E' => exp_ff as i32,
            _ => 0,
        })
        .collect();
    let d_inner = s.heads * s.head_dim;
    let meta = vec![
        (
            "general.architecture".to_string(),
            GgufValue::String(a.into()),
        ),
        (format!("{a}.block_count"), u(kinds.len())),
        (format!("{a}.embedding_length"), u(s.d)),
        (format!("{a}.attention.head_count"), u(attn_heads)),
        (
            format!("{a}.attention.head_count_kv"),
            GgufValue::i32_array(&kv_arr),
        ),
        (
            format!("{a}.feed_forward_length"),
            GgufValue::i32_array(&ff_arr),
        ),
        (format!("{a}.attention.key_length"), u(attn_hd)),
        (format!("{a}.attention.value_length"), u(attn_hd)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            GgufValue::F32(1e-5),
        ),
        (format!("{a}.ssm.conv_kernel"), u(s.conv)),
        (format!("{a}.ssm.state_size"), u(s.state)),
        (format!("{a}.ssm.group_count"), u(s.groups)),
        (format!("{a}.ssm.inner_size"), u(d_inner)),
        (format!("{a}.ssm.time_step_rank"), u(s.heads)),
        (format!("{a}.ssm.time_step_min"), GgufValue::F32(1e-3)),
        (format!("{a}.expert_count"), u(n_exp)),
        (format!("{a}.expert_used_count"), u(2)),
        (format!("{a}.expert_feed_forward_length"), u(exp_ff)),
        (format!("{a}.expert_shared_feed_forward_length"), u(sh_ff)),
        (format!("{a}.expert_weights_norm"), GgufValue::Bool(true)),
        (format!("{a}.expert_weights_scale"), GgufValue::F32(1.5)),
    ];
    let mut tensors = Vec::new();
    let mut add = |name: String, dims: Vec<u64>, ty: GgmlType, lo: f32, hi: f32| {
        let n: u64 = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
        // Rows that are not whole blocks of the type stay F32.
        let ty = if dims[0].is_multiple_of(32) {
            ty
        } else {
            GgmlType::F32
        };
        let data = quant::quantize(ty, &v).expect("quantize");
        tensors.push(RawTensor {
            name,
            ty,
            dims,
            data: TensorBytes::from_vec(data),
        });
    };
    let f32t = GgmlType::F32;
    let d = s.d as u64;
    let conv_dim = (d_inner + 2 * s.groups * s.state) as u64;
    let in_rows = d_inner as u64 + conv_dim + s.heads as u64;
    let h = s.heads as u64;
    add(
        "token_embd.weight".into(),
        vec![d, s.vocab as u64],
        s.ty,
        -1.0,
        1.0,
    );
    add("output_norm.weight".into(), vec![d], f32t, 0.9, 1.1);
    add(
        "output.weight".into(),
        vec![d, s.vocab as u64],
        s.ty,
        -0.3,
        0.3,
    );
    for (i, &k) in kinds.iter().enumerate() {
        let p = |n: &str| format!("blk.{i}.{n}");
        add(p("attn_norm.weight"), vec![d], f32t, 0.9, 1.1);
        match k {
            'M' => {
                add(p("ssm_in.weight"), vec![d, in_rows], s.ty, -0.3, 0.3);
                add(
                    p("ssm_conv1d.weight"),
                    vec![s.conv as u64, conv_dim],
                    f32t,
                    -0.5,
                    0.5,
                );
                add(p("ssm_conv1d.bias"), vec![conv_dim], f32t, -0.2, 0.2);
                // dt ≈ softplus(±2): decays from strong to weak, some clamped at dt_min.
                add(p("ssm_dt.bias"), vec![h], f32t, -8.0, 1.0);
                add(p("ssm_a"), vec![1, h], f32t, -4.0, -0.2);
                add(p("ssm_d"), vec![1, h], f32t, 0.0, 1.0);
                add(
                    p("ssm_norm.weight"),
                    vec![(d_inner / s.groups) as u64, s.groups as u64],
                    f32t,
                    0.8,
                    1.2,
                );
                add(
                    p("ssm_out.weight"),
                    vec![d_inner as u64, d],
                    s.ty,
                    -0.3,
                    0.3,
                );
            }
            '*' => {
                let q = (attn_heads * attn_hd) as u64;
                let kvd = (kv as usize * attn_hd) as u64;
                add(p("attn_q.weight"), vec![d, q], s.ty, -0.3, 0.3);
                add(p("attn_k.weight"), vec![d, kvd], s.ty, -0.3, 0.3);
                add(p("attn_v.weight"), vec![d, kvd], s.ty, -0.3, 0.3);
                add(p("attn_output.weight"), vec![q, d], s.ty, -0.3, 0.3);
            }
            '-' => {
                add(p("ffn_up.weight"), vec![d, ff as u64], s.ty, -0.3, 0.3);
                add(p("ffn_down.weight"), vec![ff as u64, d], s.ty, -0.3, 0.3);
            }
            'E' => {
                let (n, ef, sf) = (n_exp as u64, exp_ff as u64, sh_ff as u64);
                add(p("ffn_gate_inp.weight"), vec![d, n], f32t, -0.5, 0.5);
                add(p("exp_probs_b.bias"), vec![n], f32t, -0.1, 0.1);
                add(p("ffn_up_exps.weight"), vec![d, ef, n], s.ty, -0.3, 0.3);
                add(p("ffn_down_exps.weight"), vec![ef, d, n], s.ty, -0.3, 0.3);
                add(p("ffn_up_shexp.weight"), vec![d, sf], s.ty, -0.3, 0.3);
                add(p("ffn_down_shexp.weight"), vec![sf, d], s.ty, -0.3, 0.3);
            }
            _ => unreachable!(),
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

fn sizes(ty: GgmlType) -> Sizes {
    Sizes {
        d: 32,
        heads: 6,
        head_dim: 8,
        groups: 2,
        state: 12,
        conv: 4,
        vocab: 53,
        ty,
    }
}

/// Prefill of `t` tokens (after `before` tokens fed as steps) vs. the same tokens as steps.
fn check(s: &Sizes, t: usize, before: usize, threads: usize) {
    let model = Arc::new(random_model(s, 5));
    assert!(model
        .config
        .layers
        .iter()
        .any(|l| matches!(l.mixer, Some(Mixer::Mamba2(_)))));
    let be = CpuBackend::new(model, threads);
    let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64 + 100 * before as u64);
    let toks: Vec<u32> = (0..before + t)
        .map(|_| rng.gen_range(0..s.vocab as u32))
        .collect();
    let cap = before + t + 1;
    let mut row = Vec::new();

    let mut a = be.new_session(cap).unwrap();
    for &tok in &toks[..before] {
        be.forward(&mut a, &[tok], Logits::Last, &mut row).unwrap();
    }
    let mut all = Vec::new();
    be.forward(&mut a, &toks[before..], Logits::All, &mut all)
        .unwrap();
    assert_eq!(all.len(), t * s.vocab);

    let mut b = be.new_session(cap).unwrap();
    for (i, &tok) in toks.iter().enumerate() {
        be.forward(&mut b, &[tok], Logits::Last, &mut row).unwrap();
        if i >= before {
            let j = i - before;
            let e = rel_l2(&row, &all[j * s.vocab..(j + 1) * s.vocab]);
            assert!(
                e <= 1e-5,
                "{:?} T={t} after {before}: token {j}: chunked prefill vs steps error {e:.3e}",
                s.ty
            );
        }
    }
    // The carried states agree too: one more step from each gives the same logits.
    let next = 7 % s.vocab as u32;
    let (mut ra, mut rb) = (Vec::new(), Vec::new());
    be.forward(&mut a, &[next], Logits::Last, &mut ra).unwrap();
    be.forward(&mut b, &[next], Logits::Last, &mut rb).unwrap();
    let e = rel_l2(&ra, &rb);
    assert!(
        e <= 1e-5,
        "T={t}: step after prefill vs steps error {e:.3e}"
    );
}

#[test]
fn chunked_prefill_equals_steps_across_chunk_boundaries() {
    let s = sizes(GgmlType::F32);
    for t in [1, 63, 64, 65, 130] {
        check(&s, t, 0, 2);
    }
}

#[test]
fn chunked_prefill_continues_a_carried_state() {
    let s = sizes(GgmlType::F32);
    check(&s, 70, 5, 3);
    check(&s, 2, 3, 1);
}

#[test]
fn quantized_weights_prefill_equals_steps() {
    check(&sizes(GgmlType::Q8_0), 65, 0, 2);
}

#[test]
fn snapshot_restores_the_recurrent_state() {
    let s = sizes(GgmlType::F32);
    let be = CpuBackend::new(Arc::new(random_model(&s, 9)), 2);
    let toks: Vec<u32> = (0..20).map(|i| (i * 7 % s.vocab) as u32).collect();
    let mut sess = be.new_session(64).unwrap();
    let mut out = Vec::new();
    be.forward(&mut sess, &toks, Logits::Last, &mut out)
        .unwrap();
    assert!(!sess.can_truncate());
    let snap = sess.clone();
    let mut first = Vec::new();
    be.forward(&mut sess, &[3, 4], Logits::All, &mut first)
        .unwrap();
    let mut again = snap.clone();
    let mut second = Vec::new();
    be.forward(&mut again, &[3, 4], Logits::All, &mut second)
        .unwrap();
    assert_eq!(first, second);
}
