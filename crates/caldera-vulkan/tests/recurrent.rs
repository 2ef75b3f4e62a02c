//! The recurrent mixers' decode kernels (`gdn_decode`, `mamba2_decode`,
//! `shortconv_decode`) against their CPU twins, caldera-cpu's `gdn::mix`, `mamba2::mix`
//! and `shortconv::mix`, on fresh random inputs: odd head counts and sizes, both
//! GatedDeltaNet head orders and gate layouts, several tiles per head, norm groups over
//! several heads, several steps from a random state so it carries over, then the state
//! itself. Each case runs with subgroup and shared-memory reductions and a small
//! workgroup. Skips without a Vulkan device unless `CALDERA_REQUIRE_VULKAN=1`.

mod common;

use caldera_cpu::gdn::{self, GdnState};
use caldera_cpu::mamba2::{self, Mamba2State};
use caldera_cpu::pool::ThreadPool;
use caldera_cpu::shortconv::{self, ShortConvState};
use caldera_format::{GgmlType, TensorBytes};
use caldera_model::blocks::gdn::{GdnGates, GdnHeadOrder, GdnSpec, GdnWeights};
use caldera_model::blocks::mamba2::{Mamba2Spec, Mamba2Weights};
use caldera_model::blocks::shortconv::{ShortConvSpec, ShortConvWeights};
use caldera_model::Weight;
use caldera_vulkan::recurrent::{
    history_from_ring, mamba2_ssm_from_device, mamba2_ssm_to_device, ring_from_history, GdnDecode,
    Mamba2Decode, RecurrentIo, RecurrentState, ShortConvDecode, DEFAULT_TILE,
};
use caldera_vulkan::testing::test_context;
use caldera_vulkan::{Buffer, Context, ContextOptions, MemoryKind, Recording};
use common::{random_vec, rng, words};
use rand::rngs::StdRng;
use rand::Rng;

/// Subgroup and shared-memory reductions at the default workgroup size, and subgroup
/// reductions in workgroups of 16.
fn contexts() -> Vec<Context> {
    let mut v = Vec::new();
    for (shared, wg) in [(false, None), (true, None), (false, Some(16))] {
        let opts = ContextOptions {
            force_shared_reduce: shared,
            workgroup_size: wg,
            ..Default::default()
        };
        match test_context("recurrent kernels", &opts) {
            Some(c) => v.push(c),
            None => return Vec::new(),
        }
    }
    v
}

fn describe(ctx: &Context) -> String {
    let t = ctx.tuning();
    format!(
        "wg {}, subgroup {} (size {}..={})",
        t.workgroup_size,
        t.subgroup_reduce,
        ctx.info().subgroup_min,
        ctx.info().subgroup_max
    )
}

/// A projection the mixers never read (the kernels start after the projections).
fn unused_weight(rows: usize, cols: usize) -> Weight {
    Weight {
        name: "unused".into(),
        ty: GgmlType::F32,
        rows,
        cols,
        data: TensorBytes::from_vec(vec![0; rows * cols * 4]),
        bias: None,
    }
}

/// Negative decay rates `-exp(u)`, u in [-1, 1).
fn decay_rates(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| -rng.gen_range(-1.0f32..1.0).exp()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Every value within `tol · (|want| + rms(want))`.
fn assert_close(got: &[f32], want: &[f32], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let rms = (want.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / want.len() as f64).sqrt();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w as f64).abs();
        assert!(
            err <= tol * (w.abs() as f64 + rms),
            "{what}: [{i}] got {g}, want {w} (rms {rms:.3e})"
        );
    }
}

/// The device side of a case: the op's buffers and its recorded step.
struct Steps {
    proj: Buffer,
    out: Buffer,
    step: Buffer,
    out_len: usize,
}

impl Steps {
    fn new(ctx: &Context, proj_len: usize, out_len: usize) -> Steps {
        let buf = |n: usize| {
            ctx.create_buffer((n * 4) as u64, MemoryKind::Device)
                .unwrap()
        };
        Steps {
            proj: buf(proj_len),
            out: buf(out_len),
            step: ctx.upload(&words(&[1, 0, 0, 1])).unwrap(),
            out_len,
        }
    }

    fn io<'a>(&'a self, state: &'a RecurrentState) -> RecurrentIo<'a> {
        RecurrentIo {
            proj: &self.proj,
            out: &self.out,
            state,
            step: &self.step,
        }
    }

    /// Runs the recorded step for the token at `pos` with projections `proj`.
    fn run(&self, ctx: &Context, rec: &Recording, proj: &[f32], pos: usize) -> Vec<f32> {
        ctx.write_buffer(&self.proj, 0, &f32_bytes(proj)).unwrap();
        ctx.write_buffer(&self.step, 0, &words(&[1, pos as u32, 0, 1]))
            .unwrap();
        ctx.submit(rec).unwrap();
        ctx.read_f32(&self.out, self.out_len).unwrap()
    }
}

struct GdnCase {
    n_k: usize,
    n_v: usize,
    dk: usize,
    dv: usize,
    kern: usize,
    order: GdnHeadOrder,
    fused: bool,
    bias: bool,
    tile: usize,
    pos0: usize,
}

fn gdn_case(ctx: &Context, rng: &mut StdRng, pool: &ThreadPool, c: &GdnCase, steps: usize) {
    let spec = GdnSpec {
        n_k_heads: c.n_k,
        n_v_heads: c.n_v,
        head_k_dim: c.dk,
        head_v_dim: c.dv,
        conv_kernel: c.kern,
        head_order: c.order,
    };
    let (nv, cd, vd) = (c.n_v, spec.conv_dim(), spec.value_dim());
    let gates = if c.fused {
        GdnGates::Fused(unused_weight(2 * nv, 1))
    } else {
        GdnGates::Separate {
            beta: unused_weight(nv, 1),
            alpha: unused_weight(nv, 1),
        }
    };
    let w = GdnWeights {
        qkv: unused_weight(cd, 1),
        gate: unused_weight(vd, 1),
        gates,
        conv: random_vec(rng, cd * c.kern, 0.7),
        conv_bias: c.bias.then(|| random_vec(rng, cd, 0.3)),
        dt_bias: random_vec(rng, nv, 1.0),
        a: decay_rates(rng, nv),
        norm: random_vec(rng, c.dv, 1.5),
        out: unused_weight(1, vd),
    };
    let eps = 1e-6;
    let mut st = GdnState::new(&spec);
    st.conv = random_vec(rng, st.conv.len(), 1.0);
    st.ssm = random_vec(rng, st.ssm.len(), 0.5);

    let state = RecurrentState::gdn(ctx, &spec).unwrap();
    let ring = ring_from_history(&st.conv, c.kern, cd, c.pos0 as u64).unwrap();
    ctx.write_buffer(&state.conv, 0, &f32_bytes(&ring)).unwrap();
    let ssm = state.ssm.as_ref().unwrap();
    ctx.write_buffer(ssm, 0, &f32_bytes(&st.ssm)).unwrap();
    let dev = Steps::new(ctx, cd + vd + 2 * nv, vd);
    let op = GdnDecode::with_tile(ctx, &spec, &w, eps, &dev.io(&state), c.tile).unwrap();
    let rec = ctx.record(|r| op.record(r)).unwrap();
    let what = format!(
        "gdn {}/{} heads, dk {}, dv {}, kernel {}, {:?}, fused {}, bias {}, tile {} ({})",
        c.n_k,
        c.n_v,
        c.dk,
        c.dv,
        c.kern,
        c.order,
        c.fused,
        c.bias,
        c.tile,
        describe(ctx)
    );
    for t in 0..steps {
        let mut proj = random_vec(rng, cd, 1.0);
        proj.extend(random_vec(rng, vd, 2.0));
        proj.extend(random_vec(rng, 2 * nv, 2.0));
        let got = dev.run(ctx, &rec, &proj, c.pos0 + t);

        let mut qkv = proj[..cd].to_vec();
        let gates = &proj[cd + vd..];
        let (b, a) = if c.fused {
            gdn::split_fused_ba(&spec, gates, 1)
        } else {
            (gates[..nv].to_vec(), gates[nv..].to_vec())
        };
        let mut want = vec![0f32; vd];
        gdn::mix(
            pool,
            &spec,
            &w,
            &mut st,
            &mut qkv,
            &proj[cd..cd + vd],
            b,
            a,
            1,
            eps,
            &mut want,
        )
        .unwrap();
        assert_close(&got, &want, 1e-4, &format!("{what}: step {t} output"));
    }
    let s_got = ctx.read_f32(ssm, st.ssm.len()).unwrap();
    assert_close(&s_got, &st.ssm, 1e-4, &format!("{what}: state"));
    let ring = ctx.read_f32(&state.conv, c.kern * cd).unwrap();
    let hist = history_from_ring(&ring, c.kern, cd, (c.pos0 + steps) as u64).unwrap();
    assert_eq!(hist, st.conv, "{what}: conv history");
}

#[test]
fn gdn_decode_matches_cpu() {
    let mut rng = rng("gdn_decode");
    let pool = ThreadPool::new(1);
    let base = GdnCase {
        n_k: 2,
        n_v: 6,
        dk: 24,
        dv: 40,
        kern: 4,
        order: GdnHeadOrder::Grouped,
        fused: false,
        bias: true,
        tile: DEFAULT_TILE,
        pos0: 0,
    };
    let cases = [
        GdnCase { ..base },
        GdnCase {
            n_k: 3,
            n_v: 3,
            dk: 17,
            dv: 13,
            order: GdnHeadOrder::Tiled,
            fused: true,
            bias: false,
            tile: 13,
            pos0: 9,
            ..base
        },
        GdnCase {
            n_k: 2,
            n_v: 4,
            dk: 33,
            dv: 50,
            kern: 3,
            order: GdnHeadOrder::Tiled,
            tile: 7,
            pos0: 5,
            ..base
        },
        GdnCase {
            n_k: 1,
            n_v: 2,
            dk: 8,
            dv: 12,
            kern: 1,
            fused: true,
            tile: 5,
            pos0: 2,
            ..base
        },
        GdnCase {
            n_k: 2,
            n_v: 4,
            dk: 128,
            dv: 128,
            pos0: 1000,
            ..base
        },
    ];
    for ctx in &contexts() {
        for c in &cases {
            gdn_case(ctx, &mut rng, &pool, c, 5);
        }
    }
}

struct Mamba2Case {
    heads: usize,
    hp: usize,
    ns: usize,
    groups: usize,
    kern: usize,
    dt_min: f32,
    bias: bool,
    tile: usize,
    pos0: usize,
}

fn mamba2_case(ctx: &Context, rng: &mut StdRng, pool: &ThreadPool, c: &Mamba2Case, steps: usize) {
    let spec = Mamba2Spec {
        n_heads: c.heads,
        head_dim: c.hp,
        d_state: c.ns,
        n_groups: c.groups,
        d_conv: c.kern,
        dt_min: c.dt_min,
        chunk: 64,
    };
    let (di, cd, rows) = (spec.d_inner(), spec.conv_dim(), spec.in_proj_rows());
    let w = Mamba2Weights {
        in_proj: unused_weight(rows, 1),
        conv: random_vec(rng, cd * c.kern, 0.7),
        conv_bias: c.bias.then(|| random_vec(rng, cd, 0.3)),
        dt_bias: random_vec(rng, c.heads, 1.0),
        a: decay_rates(rng, c.heads),
        d: random_vec(rng, c.heads, 1.0),
        norm: random_vec(rng, di, 1.5),
        out_proj: unused_weight(1, di),
    };
    let eps = 1e-5;
    let mut st = Mamba2State::new(&spec);
    st.conv = random_vec(rng, st.conv.len(), 1.0);
    st.ssm = random_vec(rng, st.ssm.len(), 0.5);

    let state = RecurrentState::mamba2(ctx, &spec).unwrap();
    let ring = ring_from_history(&st.conv, c.kern, cd, c.pos0 as u64).unwrap();
    ctx.write_buffer(&state.conv, 0, &f32_bytes(&ring)).unwrap();
    let ssm = state.ssm.as_ref().unwrap();
    let s_dev = mamba2_ssm_to_device(&spec, &st.ssm).unwrap();
    ctx.write_buffer(ssm, 0, &f32_bytes(&s_dev)).unwrap();
    let dev = Steps::new(ctx, rows, di);
    let op = Mamba2Decode::with_tile(ctx, &spec, &w, eps, &dev.io(&state), c.tile).unwrap();
    let rec = ctx.record(|r| op.record(r)).unwrap();
    let what = format!(
        "mamba2 {} heads of {}, state {}, {} groups, kernel {}, dt_min {}, bias {}, tile {} \
         ({})",
        c.heads,
        c.hp,
        c.ns,
        c.groups,
        c.kern,
        c.dt_min,
        c.bias,
        c.tile,
        describe(ctx)
    );
    for t in 0..steps {
        let mut proj = random_vec(rng, di, 2.0);
        proj.extend(random_vec(rng, cd, 1.0));
        proj.extend(random_vec(rng, c.heads, 2.0));
        let got = dev.run(ctx, &rec, &proj, c.pos0 + t);
        let mut want = vec![0f32; di];
        mamba2::mix(pool, &spec, &w, &mut st, &proj, 1, eps, &mut want).unwrap();
        assert_close(&got, &want, 1e-4, &format!("{what}: step {t} output"));
    }
    let s_got = ctx.read_f32(ssm, st.ssm.len()).unwrap();
    let s_got = mamba2_ssm_from_device(&spec, &s_got).unwrap();
    assert_close(&s_got, &st.ssm, 1e-4, &format!("{what}: state"));
    let ring = ctx.read_f32(&state.conv, c.kern * cd).unwrap();
    let hist = history_from_ring(&ring, c.kern, cd, (c.pos0 + steps) as u64).unwrap();
    assert_eq!(hist, st.conv, "{what}: conv history");
}

#[test]
fn mamba2_decode_matches_cpu() {
    let mut rng = rng("mamba2_decode");
    let pool = ThreadPool::new(1);
    let base = Mamba2Case {
        heads: 6,
        hp: 10,
        ns: 12,
        groups: 2,
        kern: 4,
        dt_min: 0.0,
        bias: true,
        tile: DEFAULT_TILE,
        pos0: 0,
    };
    let cases = [
        // Three heads per norm group, one tile per head.
        Mamba2Case { ..base },
        // One head per group, several tiles per head.
        Mamba2Case {
            heads: 4,
            hp: 24,
            ns: 16,
            groups: 4,
            kern: 3,
            dt_min: 0.05,
            tile: 7,
            pos0: 7,
            ..base
        },
        // One group over every head, no conv bias.
        Mamba2Case {
            heads: 8,
            hp: 7,
            ns: 33,
            groups: 1,
            bias: false,
            pos0: 3,
            ..base
        },
        // A norm group within one workgroup; kernel 1 (no history).
        Mamba2Case {
            heads: 3,
            hp: 16,
            ns: 8,
            groups: 3,
            kern: 1,
            tile: 16,
            pos0: 1,
            ..base
        },
        // Nemotron-H's head and state sizes.
        Mamba2Case {
            heads: 4,
            hp: 64,
            ns: 128,
            groups: 2,
            pos0: 999,
            ..base
        },
    ];
    for ctx in &contexts() {
        for c in &cases {
            mamba2_case(ctx, &mut rng, &pool, c, 5);
        }
    }
}

fn shortconv_case(ctx: &Context, rng: &mut StdRng, channels: usize, kern: usize, bias: bool) {
    let spec = ShortConvSpec {
        channels,
        l_cache: kern,
    };
    let w = ShortConvWeights {
        in_proj: unused_weight(3 * channels, 1),
        conv: random_vec(rng, channels * kern, 0.7),
        conv_bias: bias.then(|| random_vec(rng, channels, 0.3)),
        out_proj: unused_weight(1, channels),
    };
    let mut st = ShortConvState::new(&spec);
    let state = RecurrentState::short_conv(ctx, &spec).unwrap();
    let dev = Steps::new(ctx, 3 * channels, channels);
    let op = ShortConvDecode::new(ctx, &spec, &w, &dev.io(&state)).unwrap();
    let rec = ctx.record(|r| op.record(r)).unwrap();
    let what = format!(
        "short conv of {channels} channels, kernel {kern}, bias {bias} ({})",
        describe(ctx)
    );
    for t in 0..kern + 3 {
        let proj = random_vec(rng, 3 * channels, 1.5);
        let got = dev.run(ctx, &rec, &proj, t);
        let mut want = vec![0f32; channels];
        shortconv::mix(&spec, &w, &mut st, &proj, 1, &mut want).unwrap();
        assert_close(&got, &want, 1e-5, &format!("{what}: step {t}"));
    }
    let hist = st.inputs();
    let got = ctx.read_f32(&state.conv, hist.len()).unwrap();
    assert_eq!(got, hist, "{what}: state");
}

#[test]
fn shortconv_decode_matches_cpu() {
    let mut rng = rng("shortconv_decode");
    for ctx in &contexts() {
        for (channels, kern, bias) in [(37, 3, true), (130, 4, false), (200, 1, true)] {
            shortconv_case(ctx, &mut rng, channels, kern, bias);
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let Some(ctx) = test_context("recurrent kernels", &ContextOptions::default()) else {
        return;
    };
    let spec = GdnSpec {
        n_k_heads: 2,
        n_v_heads: 4,
        head_k_dim: 16,
        head_v_dim: 8,
        conv_kernel: 4,
        head_order: GdnHeadOrder::Grouped,
    };
    let (cd, vd) = (spec.conv_dim(), spec.value_dim());
    let w = GdnWeights {
        qkv: unused_weight(cd, 1),
        gate: unused_weight(vd, 1),
        gates: GdnGates::Fused(unused_weight(8, 1)),
        conv: vec![0.0; cd * 4],
        conv_bias: None,
        dt_bias: vec![0.0; 4],
        a: vec![-1.0; 4],
        norm: vec![1.0; 8],
        out: unused_weight(1, vd),
    };
    let state = RecurrentState::gdn(&ctx, &spec).unwrap();
    let dev = Steps::new(&ctx, cd + vd + 8, vd);
    assert!(GdnDecode::new(&ctx, &spec, &w, 1e-6, &dev.io(&state)).is_ok());
    // A proj buffer without the gates.
    let short = Steps::new(&ctx, cd + vd, vd);
    assert!(GdnDecode::new(&ctx, &spec, &w, 1e-6, &short.io(&state)).is_err());
    // Key heads too large for shared memory.
    let big = GdnSpec {
        head_k_dim: 600,
        ..spec.clone()
    };
    assert!(GdnDecode::new(&ctx, &big, &w, 1e-6, &dev.io(&state)).is_err());
    // Value heads that do not group over the key heads.
    let odd = GdnSpec {
        n_v_heads: 3,
        ..spec.clone()
    };
    assert!(GdnDecode::new(&ctx, &odd, &w, 1e-6, &dev.io(&state)).is_err());
    // A short conv state for another kernel length.
    let sc = ShortConvSpec {
        channels: 16,
        l_cache: 3,
    };
    let sw = ShortConvWeights {
        in_proj: unused_weight(48, 1),
        conv: vec![0.0; 48],
        conv_bias: None,
        out_proj: unused_weight(1, 16),
    };
    let small = RecurrentState::short_conv(
        &ctx,
        &ShortConvSpec {
            channels: 16,
            l_cache: 2,
        },
    )
    .unwrap();
    let sdev = Steps::new(&ctx, 48, 16);
    assert!(ShortConvDecode::new(&ctx, &sc, &sw, &sdev.io(&small)).is_err());
    // Mamba2 groups that do not divide the heads.
    let ms = Mamba2Spec {
        n_heads: 4,
        head_dim: 8,
        d_state: 8,
        n_groups: 3,
        d_conv: 4,
        dt_min: 0.0,
        chunk: 64,
    };
    let mw = Mamba2Weights {
        in_proj: unused_weight(1, 1),
        conv: vec![],
        conv_bias: None,
        dt_bias: vec![],
        a: vec![],
        d: vec![],
        norm: vec![],
        out_proj: unused_weight(1, 1),
    };
    assert!(Mamba2Decode::new(&ctx, &ms, &mw, 1e-6, &sdev.io(&small)).is_err());
}
