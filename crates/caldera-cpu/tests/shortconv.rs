//! Short-conv (LFM2) layers: a prompt run as one prefill and the same prompt run one
//! token at a time give the same logits, on random tiny `lfm2` / `lfm2moe` models with
//! short-conv and attention layers; a cloned session continues exactly as the original.

use std::path::Path;
use std::sync::Arc;

use caldera_cpu::{CpuBackend, KvConfig, LayerState, Logits};
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
    ff: usize,
    vocab: usize,
    /// Per layer: true = attention, false = short conv.
    attn: Vec<bool>,
    l_cache: usize,
    ty: GgmlType,
    /// Conv and projection biases on the short-conv layers.
    biases: bool,
    /// (experts, used, expert ff, leading dense layers) for `lfm2moe`.
    moe: Option<(usize, usize, usize, usize)>,
}

fn random_model(s: &Spec, seed: u64) -> Model {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let a = s.arch;
    let u = |n: usize| GgufValue::U32(n as u32);
    let kv: Vec<i32> = s
        .attn
        .iter()
        .map(|&x| if x { s.kv as i32 } else { 0 })
        .collect();
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            GgufValue::String(a.into()),
        ),
        (format!("{a}.block_count"), u(s.attn.len())),
        (format!("{a}.embedding_length"), u(s.d)),
        (format!("{a}.feed_forward_length"), u(s.ff)),
        (format!("{a}.attention.head_count"), u(s.heads)),
        (
            format!("{a}.attention.head_count_kv"),
            GgufValue::i32_array(&kv),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            GgufValue::F32(1e-5),
        ),
        (format!("{a}.rope.freq_base"), GgufValue::F32(10000.0)),
        (format!("{a}.shortconv.l_cache"), u(s.l_cache)),
    ];
    if let Some((n, k, eff, dense)) = s.moe {
        meta.push((format!("{a}.expert_count"), u(n)));
        meta.push((format!("{a}.expert_used_count"), u(k)));
        meta.push((format!("{a}.expert_feed_forward_length"), u(eff)));
        meta.push((format!("{a}.leading_dense_block_count"), u(dense)));
        meta.push((format!("{a}.expert_gating_func"), u(2)));
    }
    let mut tensors = Vec::new();
    let mut add = |name: String, dims: Vec<u64>, ty: GgmlType, scale: f32, offset: f32| {
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
    let d = s.d as u64;
    let hd = (s.d / s.heads) as u64;
    let kvd = s.kv as u64 * hd;
    let ff = s.ff as u64;
    let f32t = GgmlType::F32;
    add(
        "token_embd.weight".into(),
        vec![d, s.vocab as u64],
        s.ty,
        1.0,
        0.0,
    );
    add("token_embd_norm.weight".into(), vec![d], f32t, 0.1, 1.0);
    for (i, &attn) in s.attn.iter().enumerate() {
        let p = |n: &str| format!("blk.{i}.{n}");
        add(p("attn_norm.weight"), vec![d], f32t, 0.1, 1.0);
        add(p("ffn_norm.weight"), vec![d], f32t, 0.1, 1.0);
        if attn {
            add(p("attn_q.weight"), vec![d, d], s.ty, 0.3, 0.0);
            add(p("attn_k.weight"), vec![d, kvd], s.ty, 0.3, 0.0);
            add(p("attn_v.weight"), vec![d, kvd], s.ty, 0.3, 0.0);
            add(p("attn_output.weight"), vec![d, d], s.ty, 0.3, 0.0);
            add(p("attn_q_norm.weight"), vec![hd], f32t, 0.1, 1.0);
            add(p("attn_k_norm.weight"), vec![hd], f32t, 0.1, 1.0);
        } else {
            add(
                p("shortconv.in_proj.weight"),
                vec![d, 3 * d],
                s.ty,
                0.3,
                0.0,
            );
            add(p("shortconv.out_proj.weight"), vec![d, d], s.ty, 0.3, 0.0);
            add(
                p("shortconv.conv.weight"),
                vec![s.l_cache as u64, d],
                f32t,
                0.5,
                0.0,
            );
            if s.biases {
                add(p("shortconv.conv.bias"), vec![d], f32t, 0.2, 0.0);
                add(p("shortconv.in_proj.bias"), vec![3 * d], f32t, 0.2, 0.0);
                add(p("shortconv.out_proj.bias"), vec![d], f32t, 0.2, 0.0);
            }
        }
        match s.moe {
            Some((n, _, eff, dense)) if i >= dense => {
                let (n, eff) = (n as u64, eff as u64);
                add(p("ffn_gate_inp.weight"), vec![d, n], s.ty, 0.5, 0.0);
                add(p("exp_probs_b.bias"), vec![n], f32t, 0.3, 0.0);
                add(p("ffn_gate_exps.weight"), vec![d, eff, n], s.ty, 0.3, 0.0);
                add(p("ffn_up_exps.weight"), vec![d, eff, n], s.ty, 0.3, 0.0);
                add(p("ffn_down_exps.weight"), vec![eff, d, n], s.ty, 0.3, 0.0);
            }
            _ => {
                add(p("ffn_gate.weight"), vec![d, ff], s.ty, 0.3, 0.0);
                add(p("ffn_up.weight"), vec![d, ff], s.ty, 0.3, 0.0);
                add(p("ffn_down.weight"), vec![ff, d], s.ty, 0.3, 0.0);
            }
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

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(0..vocab as u32)).collect()
}

/// Prefill of `t` tokens vs `t` single steps: every row within 1e-5.
fn check(be: &CpuBackend, vocab: usize, t: usize) {
    let toks = tokens(t, vocab, 11 + t as u64);
    let mut all = Vec::new();
    let mut a = be.new_session(t).unwrap();
    be.forward(&mut a, &toks, Logits::All, &mut all).unwrap();
    let mut b = be.new_session(t).unwrap();
    let mut row = Vec::new();
    for (i, &tok) in toks.iter().enumerate() {
        be.forward(&mut b, &[tok], Logits::Last, &mut row).unwrap();
        let e = rel_l2(&row, &all[i * vocab..(i + 1) * vocab]);
        assert!(e <= 1e-5, "T={t}: token {i}: prefill vs step error {e:.3e}");
    }
    // The conv states agree too.
    for (la, lb) in a.layers().iter().zip(b.layers()) {
        if let (LayerState::ShortConv(x), LayerState::ShortConv(y)) = (la, lb) {
            assert_eq!(x.inputs().len(), y.inputs().len());
            assert!(
                x.inputs().is_empty() || rel_l2(x.inputs(), y.inputs()) <= 1e-5,
                "T={t}: conv states differ"
            );
        }
    }
}

fn lfm2(ty: GgmlType) -> Spec {
    Spec {
        arch: "lfm2",
        d: 96,
        heads: 6,
        kv: 2,
        ff: 160,
        vocab: 67,
        attn: vec![false, true, false, false],
        l_cache: 3,
        ty,
        biases: false,
        moe: None,
    }
}

#[test]
fn lfm2_prefill_equals_steps() {
    let s = lfm2(GgmlType::F32);
    let be = CpuBackend::new(Arc::new(random_model(&s, 7)), 2);
    for t in [1, 2, 3, 63, 130, 260] {
        check(&be, s.vocab, t);
    }
}

#[test]
fn lfm2_q8_0_with_biases_and_long_kernel_prefill_equals_steps() {
    let mut s = lfm2(GgmlType::Q8_0);
    s.biases = true;
    s.l_cache = 5;
    s.attn = vec![true, false, false];
    let be = CpuBackend::new(Arc::new(random_model(&s, 3)), 3);
    for t in [1, 2, 3, 4, 5, 6, 63] {
        check(&be, s.vocab, t);
    }
}

#[test]
fn lfm2_kernel_of_one_has_no_state() {
    let mut s = lfm2(GgmlType::F32);
    s.l_cache = 1;
    let be = CpuBackend::new(Arc::new(random_model(&s, 5)), 2);
    for t in [1, 3, 40] {
        check(&be, s.vocab, t);
    }
}

#[test]
fn lfm2moe_prefill_equals_steps() {
    let mut s = lfm2(GgmlType::F16);
    s.arch = "lfm2moe";
    s.moe = Some((6, 2, 48, 1));
    s.attn = vec![false, false, true, false];
    let be = CpuBackend::new(Arc::new(random_model(&s, 9)), 2);
    for t in [1, 2, 3, 63, 130] {
        check(&be, s.vocab, t);
    }
}

#[test]
fn cloned_session_continues_like_the_original() {
    let s = lfm2(GgmlType::F32);
    let be = CpuBackend::new(Arc::new(random_model(&s, 13)), 2);
    let toks = tokens(20, s.vocab, 1);
    let mut a = be.new_session(32).unwrap();
    let mut out = Vec::new();
    be.forward(&mut a, &toks[..12], Logits::Last, &mut out)
        .unwrap();
    let mut b = a.clone();
    let (mut ra, mut rb) = (Vec::new(), Vec::new());
    be.forward(&mut a, &toks[12..], Logits::All, &mut ra)
        .unwrap();
    be.forward(&mut b, &toks[12..], Logits::All, &mut rb)
        .unwrap();
    assert_eq!(ra, rb);
    // A session that never saw the prefix differs: the state carries it.
    let mut c = be.new_session(32).unwrap();
    let mut rc = Vec::new();
    be.forward(&mut c, &toks[12..], Logits::All, &mut rc)
        .unwrap();
    assert!(rel_l2(&rc, &ra) > 1e-3);
}

/// Prompt snapshots of a hybrid model: no page sharing (recurrent state is outside the
/// pages), but a later prompt that continues a snapshotted one starts from a copy of it
/// and gives a cold run's logits; snapshots give their pages back when pages run out.
#[test]
fn prompt_snapshots_equal_a_cold_run() {
    let s = lfm2(GgmlType::F32);
    let model = Arc::new(random_model(&s, 17));
    let kv = KvConfig {
        page_tokens: 4,
        max_pages: Some(8),
        prefix_cache: true,
        snapshots: 2,
    };
    let be = CpuBackend::with_kv(model.clone(), 2, &kv);
    assert!(!be.kv_pool().prefix_cache() && be.snapshots_on());
    let p = tokens(13, s.vocab, 3);
    let mut q = p.clone();
    q.extend(tokens(9, s.vocab, 4));
    let mut out = Vec::new();
    {
        let mut a = be.new_session(32).unwrap();
        be.forward(&mut a, &p, Logits::Last, &mut out).unwrap();
        be.snapshot(&a);
        // The copy holds a's 4 pages too (shared).
        assert_eq!(be.kv_pool().stats().in_use, 4);
    }
    assert_eq!(be.snapshot_count(), 1);
    let mut b = be.new_session(32).unwrap();
    // A prompt that leaves the snapshot's tokens takes nothing.
    let mut other = q.clone();
    other[5] = (other[5] + 1) % s.vocab as u32;
    assert_eq!(be.restore_snapshot(&mut b, &other, 21), 0);
    assert_eq!(be.restore_snapshot(&mut b, &q, 12), 0);
    assert_eq!(be.restore_snapshot(&mut b, &q, 21), 13);
    let mut warm = Vec::new();
    be.forward(&mut b, &q[13..], Logits::All, &mut warm)
        .unwrap();
    let cold_be = CpuBackend::new(model, 2);
    let mut c = cold_be.new_session(32).unwrap();
    let mut cold = Vec::new();
    cold_be.forward(&mut c, &q, Logits::All, &mut cold).unwrap();
    let e = rel_l2(&warm, &cold[13 * s.vocab..]);
    assert!(e <= 1e-6, "snapshot vs cold: {e:.3e}");
    // b holds 6 pages (one copied on write), the snapshot 4 (3 shared with b): a
    // session needing 4 more pages evicts the snapshot instead of failing.
    assert_eq!(be.kv_pool().stats().in_use, 7);
    drop(b);
    let mut d = be.new_session(32).unwrap();
    be.forward(&mut d, &tokens(32, s.vocab, 5), Logits::Last, &mut out)
        .unwrap();
    assert_eq!(be.snapshot_count(), 0);
}
