//! Mamba2 on the CPU: the SSM's chunked (SSD) form equals its recurrent form on random
//! inputs (outputs and state); a prefill of T tokens gives the same logits as T single
//! steps, for T across the SSD chunk boundary (64), on random `nemotron_h` models
//! (Mamba2, MoE, attention without RoPE and relu² MLP layers).

use std::path::Path;
use std::sync::Arc;

use caldera_cpu::mamba2::{self, SsmForm, SSD_CHUNK};
use caldera_cpu::pool::ThreadPool;
use caldera_cpu::{CpuBackend, Logits};
use caldera_format::gguf::GgufValue;
use caldera_format::{quant, GgmlType, TensorBytes};
use caldera_model::blocks::mamba2::Mamba2Spec;
use caldera_model::file::RawTensor;
use caldera_model::{Mixer, Model, ModelFile};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn ssm_spec(heads: usize, head_dim: usize, state: usize, groups: usize) -> Mamba2Spec {
    Mamba2Spec {
        n_heads: heads,
        head_dim,
        d_state: state,
        n_groups: groups,
        d_conv: 4,
        dt_min: 0.0,
    }
}

/// Random SSM inputs for `m` tokens: xBC, dt (softplus of [-4, 2)), A (`-exp([-1, 1))`),
/// D, and a nonzero state.
struct SsmCase {
    xbc: Vec<f32>,
    dt: Vec<f32>,
    a: Vec<f32>,
    d: Vec<f32>,
    s0: Vec<f32>,
}

fn ssm_case(rng: &mut StdRng, spec: &Mamba2Spec, m: usize) -> SsmCase {
    let nh = spec.n_heads;
    let mut v = |n: usize, lo: f32, hi: f32| -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(lo..hi)).collect()
    };
    SsmCase {
        xbc: v(m * spec.conv_dim(), -1.0, 1.0),
        dt: v(m * nh, -4.0, 2.0)
            .into_iter()
            .map(|u| u.exp().ln_1p())
            .collect(),
        a: v(nh, -1.0, 1.0).into_iter().map(|u| -u.exp()).collect(),
        d: v(nh, -1.0, 1.0),
        s0: v(nh * spec.head_dim * spec.d_state, -0.5, 0.5),
    }
}

/// Runs the SSM of `c` over `m` tokens in `form`: (outputs, final state).
fn run_ssm(
    pool: &ThreadPool,
    spec: &Mamba2Spec,
    c: &SsmCase,
    m: usize,
    form: SsmForm,
) -> (Vec<f32>, Vec<f32>) {
    let mut s = c.s0.clone();
    let mut y = vec![0f32; m * spec.d_inner()];
    mamba2::ssm(
        pool, spec, &c.a, &c.d, &c.xbc, &c.dt, m, form, &mut s, &mut y,
    )
    .unwrap();
    (y, s)
}

#[test]
fn chunked_ssm_equals_recurrent() {
    let pool = ThreadPool::new(2);
    // (heads, head size, state size, groups): groups of 3, 1 and 2 heads; one group.
    let shapes = [
        (6, 10, 12, 2),
        (4, 7, 33, 4),
        (3, 16, 5, 1),
        (4, 64, 128, 2),
    ];
    for (si, &(h, p, n, g)) in shapes.iter().enumerate() {
        let spec = ssm_spec(h, p, n, g);
        for m in [1usize, 63, 64, 65, 200] {
            let mut rng = StdRng::seed_from_u64(1000 * si as u64 + m as u64);
            let c = ssm_case(&mut rng, &spec, m);
            let (y_rec, s_rec) = run_ssm(&pool, &spec, &c, m, SsmForm::Recurrent);
            for q in [SSD_CHUNK, 17] {
                let (y, s) = run_ssm(&pool, &spec, &c, m, SsmForm::Chunked(q));
                let di = spec.d_inner();
                for t in 0..m {
                    let e = rel_l2(&y[t * di..(t + 1) * di], &y_rec[t * di..(t + 1) * di]);
                    assert!(
                        e <= 1e-5,
                        "{h} heads of {p}, state {n}, {g} groups, T={m}, chunk {q}: token {t}: \
                         chunked vs recurrent {e:.3e}"
                    );
                }
                let e = rel_l2(&s, &s_rec);
                assert!(
                    e <= 1e-5,
                    "{h} heads of {p}, state {n}, {g} groups, T={m}, chunk {q}: state {e:.3e}"
                );
            }
        }
    }
    // A chunk of 0 tokens is an error, not a hang.
    let spec = ssm_spec(2, 4, 4, 1);
    let c = ssm_case(&mut StdRng::seed_from_u64(1), &spec, 3);
    let mut s = c.s0.clone();
    let mut y = vec![0f32; 3 * spec.d_inner()];
    let form = SsmForm::Chunked(0);
    assert!(mamba2::ssm(&pool, &spec, &c.a, &c.d, &c.xbc, &c.dt, 3, form, &mut s, &mut y).is_err());
}

/// Times both forms of the SSM at Nemotron-H-8B's mixer sizes (128 heads of 64, state
/// 128, 8 groups) over a 512-token prompt on two threads:
/// `cargo test -p caldera-cpu --test mamba2 ssm_forms_timing -- --ignored --nocapture`.
#[test]
#[ignore]
fn ssm_forms_timing() {
    let pool = ThreadPool::new(2);
    let spec = ssm_spec(128, 64, 128, 8);
    let m = 512;
    let c = ssm_case(&mut StdRng::seed_from_u64(3), &spec, m);
    for form in [
        SsmForm::Recurrent,
        SsmForm::Chunked(SSD_CHUNK),
        SsmForm::Chunked(32),
        SsmForm::Recurrent,
        SsmForm::Chunked(SSD_CHUNK),
    ] {
        let reps = 3;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            std::hint::black_box(run_ssm(&pool, &spec, &c, m, form));
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
        println!("{form:?}: {ms:.1} ms per layer for {m} tokens");
    }
}

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
                "{:?} T={t} after {before}: token {j}: prefill vs steps error {e:.3e}",
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
fn prefill_equals_steps_across_chunk_boundaries() {
    let s = sizes(GgmlType::F32);
    for t in [1, 63, 64, 65, 130] {
        check(&s, t, 0, 2);
    }
}

#[test]
fn prefill_continues_a_carried_state() {
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
