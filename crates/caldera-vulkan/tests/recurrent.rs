//! The recurrent mixers' decode kernels (`gdn_decode`, `mamba2_decode`,
//! `shortconv_decode`) against their CPU twins, caldera-cpu's `gdn::mix`, `mamba2::mix`
//! and `shortconv::mix`, on fresh random inputs: odd head counts and sizes, both
//! GatedDeltaNet head orders and gate layouts, several tiles per head, norm groups over
//! several heads, several steps from a random state so it carries over, then the state
//! itself. The prefill ops against the CPU and the decode ops token by token; Mamba2's
//! through both SSM kernels (`mamba2_chunk` against `SsmForm::Chunked(64)`, `mamba2_scan`
//! against `SsmForm::Recurrent`), over several chunks from a random state, then decode
//! and a second prefill step continuing from the state it leaves. Each case runs with
//! subgroup and shared-memory reductions and a small workgroup. Skips without a Vulkan
//! device unless `CALDERA_REQUIRE_VULKAN=1`.

mod common;

use caldera_cpu::gdn::{self, GdnState};
use caldera_cpu::mamba2::{self, Mamba2State, SsmForm, SSD_CHUNK};
use caldera_cpu::pool::ThreadPool;
use caldera_cpu::shortconv::{self, ShortConvState};
use caldera_format::{GgmlType, TensorBytes};
use caldera_model::blocks::gdn::{GdnGates, GdnHeadOrder, GdnSpec, GdnWeights};
use caldera_model::blocks::mamba2::{Mamba2Spec, Mamba2Weights};
use caldera_model::blocks::shortconv::{ShortConvSpec, ShortConvWeights};
use caldera_model::Weight;
use caldera_vulkan::ops::Q8Acts;
use caldera_vulkan::recurrent::{
    history_from_ring, mamba2_ssm_from_device, mamba2_ssm_to_device, ring_from_history, GdnDecode,
    GdnPrefill, Mamba2Decode, Mamba2Prefill, Mamba2Ssm, PrefillIo, RecurrentIo, RecurrentState,
    ShortConvDecode, ShortConvPrefill, DEFAULT_TILE,
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
    /// The int8 copy of `out` (values, scales), when the case asks for it.
    q8: Option<(Buffer, Buffer)>,
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
            q8: None,
        }
    }

    /// [`Steps::new`], the op also writing `out` as int8 blocks.
    fn with_q8(ctx: &Context, proj_len: usize, out_len: usize) -> Steps {
        let mut s = Steps::new(ctx, proj_len, out_len);
        let mk = |n: usize| ctx.create_buffer(n as u64, MemoryKind::Device).unwrap();
        s.q8 = Some((mk(out_len), mk(out_len / 8)));
        s
    }

    /// With `q8`: the int8 copy of `out` dequantizes to `out` within half a step.
    fn check_q8(&self, ctx: &Context, out: &[f32], what: &str) {
        let Some((q, d)) = &self.q8 else { return };
        let q = ctx.read_buffer(q, 0, out.len() as u64).unwrap();
        let d = ctx.read_f32(d, out.len() / 32).unwrap();
        for (i, &v) in out.iter().enumerate() {
            let deq = q[i] as i8 as f64 * d[i / 32] as f64;
            assert!(
                (deq - v as f64).abs() <= 0.51 * d[i / 32] as f64 + 1e-7,
                "{what}: int8 output [{i}] {deq} for {v}"
            );
        }
    }

    fn io<'a>(&'a self, state: &'a RecurrentState) -> RecurrentIo<'a> {
        RecurrentIo {
            proj: &self.proj,
            out: &self.out,
            state,
            step: &self.step,
            q8: self.q8.as_ref().map(|(q, d)| Q8Acts { q, d, ss: None }),
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
    /// Also write int8 output blocks (dv a multiple of 32).
    q8: bool,
}

/// A random layer of `c`'s shape (projections unused) and a random state.
fn gdn_layer(rng: &mut StdRng, c: &GdnCase) -> (GdnSpec, GdnWeights, GdnState) {
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
    let mut st = GdnState::new(&spec);
    st.conv = random_vec(rng, st.conv.len(), 1.0);
    st.ssm = random_vec(rng, st.ssm.len(), 0.5);
    (spec, w, st)
}

/// `st` on the device, for the token at `pos`.
fn gdn_device_state(ctx: &Context, spec: &GdnSpec, st: &GdnState, pos: usize) -> RecurrentState {
    let state = RecurrentState::gdn(ctx, spec).unwrap();
    let ring = ring_from_history(&st.conv, spec.conv_kernel, spec.conv_dim(), pos as u64);
    ctx.write_buffer(&state.conv, 0, &f32_bytes(&ring.unwrap()))
        .unwrap();
    let ssm = state.ssm.as_ref().unwrap();
    ctx.write_buffer(ssm, 0, &f32_bytes(&st.ssm)).unwrap();
    state
}

/// One random projection row of a GatedDeltaNet layer: qkv, z, b|a.
fn gdn_row(rng: &mut StdRng, spec: &GdnSpec) -> Vec<f32> {
    let mut row = random_vec(rng, spec.conv_dim(), 1.0);
    row.extend(random_vec(rng, spec.value_dim(), 2.0));
    row.extend(random_vec(rng, 2 * spec.n_v_heads, 2.0));
    row
}

/// The CPU twin over `m` projection rows of `ld` values: the outputs, `[m × n_v·dv]`.
#[allow(clippy::too_many_arguments)]
fn gdn_cpu(
    pool: &ThreadPool,
    spec: &GdnSpec,
    w: &GdnWeights,
    st: &mut GdnState,
    rows: &[f32],
    ld: usize,
    m: usize,
    eps: f32,
) -> Vec<f32> {
    let (nv, cd, vd) = (spec.n_v_heads, spec.conv_dim(), spec.value_dim());
    let (mut qkv, mut z, mut gates) = (Vec::new(), Vec::new(), Vec::new());
    for row in rows.chunks(ld).take(m) {
        qkv.extend_from_slice(&row[..cd]);
        z.extend_from_slice(&row[cd..cd + vd]);
        gates.extend_from_slice(&row[cd + vd..cd + vd + 2 * nv]);
    }
    let (b, a) = match w.gates {
        GdnGates::Fused(_) => gdn::split_fused_ba(spec, &gates, m),
        GdnGates::Separate { .. } => {
            let (mut b, mut a) = (Vec::new(), Vec::new());
            for g in gates.chunks_exact(2 * nv) {
                b.extend_from_slice(&g[..nv]);
                a.extend_from_slice(&g[nv..]);
            }
            (b, a)
        }
    };
    let mut o = vec![0f32; m * vd];
    gdn::mix(pool, spec, w, st, &mut qkv, &z, b, a, m, eps, &mut o).unwrap();
    o
}

fn gdn_case(ctx: &Context, rng: &mut StdRng, pool: &ThreadPool, c: &GdnCase, steps: usize) {
    let (spec, w, mut st) = gdn_layer(rng, c);
    let (nv, cd, vd) = (c.n_v, spec.conv_dim(), spec.value_dim());
    let eps = 1e-6;
    let state = gdn_device_state(ctx, &spec, &st, c.pos0);
    let ssm = state.ssm.as_ref().unwrap();
    let dev = if c.q8 {
        Steps::with_q8(ctx, cd + vd + 2 * nv, vd)
    } else {
        Steps::new(ctx, cd + vd + 2 * nv, vd)
    };
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
        let proj = gdn_row(rng, &spec);
        let got = dev.run(ctx, &rec, &proj, c.pos0 + t);
        let want = gdn_cpu(pool, &spec, &w, &mut st, &proj, proj.len(), 1, eps);
        assert_close(&got, &want, 1e-4, &format!("{what}: step {t} output"));
        dev.check_q8(ctx, &got, &what);
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
        q8: false,
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
            q8: true,
            ..base
        },
        // One tile per head (at workgroups of 64), int8 output.
        GdnCase {
            n_k: 1,
            n_v: 3,
            dk: 20,
            dv: 32,
            tile: 32,
            pos0: 4,
            q8: true,
            ..base
        },
    ];
    for ctx in &contexts() {
        for c in &cases {
            gdn_case(ctx, &mut rng, &pool, c, 5);
        }
    }
}

/// One prefill step of `m` tokens (rows `ld` apart, room for `max_tokens`) against the
/// CPU (which runs `delta_chunked`) and against the decode kernel token by token.
#[allow(clippy::too_many_arguments)]
fn gdn_prefill_case(
    ctx: &Context,
    rng: &mut StdRng,
    pool: &ThreadPool,
    c: &GdnCase,
    m: usize,
    max_tokens: usize,
) {
    let (spec, w, st0) = gdn_layer(rng, c);
    let (cd, vd) = (spec.conv_dim(), spec.value_dim());
    let row = cd + vd + 2 * c.n_v;
    let ld = row + 3;
    let eps = 1e-6;
    let mut rows = Vec::with_capacity(max_tokens * ld);
    for _ in 0..max_tokens {
        rows.extend(gdn_row(rng, &spec));
        rows.extend([0.0; 3]);
    }
    let what = format!(
        "gdn prefill of {m} tokens at {}: {}/{} heads, dk {}, dv {}, kernel {}, {:?}, fused {} \
         ({})",
        c.pos0,
        c.n_k,
        c.n_v,
        c.dk,
        c.dv,
        c.kern,
        c.order,
        c.fused,
        describe(ctx)
    );

    // The prefill op.
    let state = gdn_device_state(ctx, &spec, &st0, c.pos0);
    let proj = ctx.upload_f32(&rows).unwrap();
    let out = ctx
        .create_buffer((max_tokens * vd * 4) as u64, MemoryKind::Device)
        .unwrap();
    let step = ctx
        .upload(&words(&[m as u32, c.pos0 as u32, 0, 1]))
        .unwrap();
    let io = PrefillIo {
        proj: &proj,
        ld_proj: ld as u64,
        out: &out,
        state: &state,
        step: &step,
        max_tokens: max_tokens as u64,
    };
    let op = GdnPrefill::new(ctx, &spec, &w, eps, &io).unwrap();
    let rec = ctx.record(|r| op.record(r)).unwrap();
    ctx.submit(&rec).unwrap();
    let got = ctx.read_f32(&out, m * vd).unwrap();
    let s_got = ctx
        .read_f32(state.ssm.as_ref().unwrap(), st0.ssm.len())
        .unwrap();
    let ring = ctx.read_f32(&state.conv, c.kern * cd).unwrap();
    let hist = history_from_ring(&ring, c.kern, cd, (c.pos0 + m) as u64).unwrap();

    // The CPU, all tokens at once.
    let mut st = st0.clone();
    let want = gdn_cpu(pool, &spec, &w, &mut st, &rows, ld, m, eps);
    assert_close(&got, &want, 2e-4, &format!("{what}: outputs vs CPU"));
    assert_close(&s_got, &st.ssm, 2e-4, &format!("{what}: state vs CPU"));
    assert_eq!(hist, st.conv, "{what}: conv history");

    // The decode kernel, token by token.
    let dstate = gdn_device_state(ctx, &spec, &st0, c.pos0);
    let dev = Steps::new(ctx, row, vd);
    let dop = GdnDecode::new(ctx, &spec, &w, eps, &dev.io(&dstate)).unwrap();
    let drec = ctx.record(|r| dop.record(r)).unwrap();
    let mut steps = Vec::with_capacity(m * vd);
    for t in 0..m {
        steps.extend(dev.run(ctx, &drec, &rows[t * ld..t * ld + row], c.pos0 + t));
    }
    let s_dec = ctx
        .read_f32(dstate.ssm.as_ref().unwrap(), st0.ssm.len())
        .unwrap();
    assert_close(
        &got,
        &steps,
        2e-4,
        &format!("{what}: outputs vs decode steps"),
    );
    assert_close(
        &s_got,
        &s_dec,
        2e-4,
        &format!("{what}: state vs decode steps"),
    );
}

#[test]
fn gdn_prefill_matches_cpu_and_decode() {
    let mut rng = rng("gdn_prefill");
    let pool = ThreadPool::new(1);
    let base = GdnCase {
        n_k: 2,
        n_v: 4,
        dk: 24,
        dv: 40,
        kern: 4,
        order: GdnHeadOrder::Grouped,
        fused: false,
        bias: true,
        tile: DEFAULT_TILE,
        pos0: 0,
        q8: false,
    };
    let tiled = GdnCase {
        n_k: 3,
        n_v: 3,
        dk: 37,
        dv: 70,
        kern: 3,
        order: GdnHeadOrder::Tiled,
        fused: true,
        bias: false,
        pos0: 11,
        ..base
    };
    let ctxs = contexts();
    for (i, ctx) in ctxs.iter().enumerate() {
        // Chunks: one partial, one whole, whole + partial, three; fewer tokens than the
        // conv kernel; larger key heads on the first context only (lavapipe is slow).
        for (c, m, max_tokens) in [
            (&base, 5, 8),
            (&tiled, 64, 64),
            (&base, 70, 72),
            (&tiled, 2, 32),
        ] {
            gdn_prefill_case(ctx, &mut rng, &pool, c, m, max_tokens);
        }
        if i == 0 {
            let big = GdnCase {
                dk: 128,
                dv: 128,
                pos0: 500,
                ..base
            };
            gdn_prefill_case(ctx, &mut rng, &pool, &big, 130, 130);
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
    /// Also write int8 output blocks (d_inner / G a multiple of 32).
    q8: bool,
}

/// A random layer of `c`'s shape (projections unused) and a random state.
fn mamba2_layer(rng: &mut StdRng, c: &Mamba2Case) -> (Mamba2Spec, Mamba2Weights, Mamba2State) {
    let spec = Mamba2Spec {
        n_heads: c.heads,
        head_dim: c.hp,
        d_state: c.ns,
        n_groups: c.groups,
        d_conv: c.kern,
        dt_min: c.dt_min,
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
    let mut st = Mamba2State::new(&spec);
    st.conv = random_vec(rng, st.conv.len(), 1.0);
    st.ssm = random_vec(rng, st.ssm.len(), 0.5);
    (spec, w, st)
}

/// `st` on the device, for the token at `pos`.
fn mamba2_device_state(
    ctx: &Context,
    spec: &Mamba2Spec,
    st: &Mamba2State,
    pos: usize,
) -> RecurrentState {
    let state = RecurrentState::mamba2(ctx, spec).unwrap();
    let ring = ring_from_history(&st.conv, spec.d_conv, spec.conv_dim(), pos as u64);
    ctx.write_buffer(&state.conv, 0, &f32_bytes(&ring.unwrap()))
        .unwrap();
    let s_dev = mamba2_ssm_to_device(spec, &st.ssm).unwrap();
    ctx.write_buffer(state.ssm.as_ref().unwrap(), 0, &f32_bytes(&s_dev))
        .unwrap();
    state
}

/// One random `in_proj` row of a Mamba2 layer: z, xBC, dt.
fn mamba2_row(rng: &mut StdRng, spec: &Mamba2Spec) -> Vec<f32> {
    let mut row = random_vec(rng, spec.d_inner(), 2.0);
    row.extend(random_vec(rng, spec.conv_dim(), 1.0));
    row.extend(random_vec(rng, spec.n_heads, 2.0));
    row
}

fn mamba2_case(ctx: &Context, rng: &mut StdRng, pool: &ThreadPool, c: &Mamba2Case, steps: usize) {
    let (spec, w, mut st) = mamba2_layer(rng, c);
    let (di, cd, rows) = (spec.d_inner(), spec.conv_dim(), spec.in_proj_rows());
    let eps = 1e-5;
    let state = mamba2_device_state(ctx, &spec, &st, c.pos0);
    let ssm = state.ssm.as_ref().unwrap();
    let dev = if c.q8 {
        Steps::with_q8(ctx, rows, di)
    } else {
        Steps::new(ctx, rows, di)
    };
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
        let proj = mamba2_row(rng, &spec);
        let got = dev.run(ctx, &rec, &proj, c.pos0 + t);
        let mut want = vec![0f32; di];
        mamba2::mix(pool, &spec, &w, &mut st, &proj, 1, eps, &mut want).unwrap();
        assert_close(&got, &want, 1e-4, &format!("{what}: step {t} output"));
        dev.check_q8(ctx, &got, &what);
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
        q8: false,
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
            q8: true,
            ..base
        },
        // One head per group in one workgroup (at workgroups of 64), int8 output.
        Mamba2Case {
            heads: 2,
            hp: 32,
            ns: 16,
            groups: 2,
            tile: 32,
            pos0: 6,
            q8: true,
            ..base
        },
    ];
    for ctx in &contexts() {
        for c in &cases {
            mamba2_case(ctx, &mut rng, &pool, c, 5);
        }
    }
}

/// A prefill op's buffers: `max_tokens` rows of `ld` projections (random, `row` used),
/// `width` outputs each, and the step values.
struct PrefillBufs {
    rows: Vec<f32>,
    ld: usize,
    proj: Buffer,
    out: Buffer,
    step: Buffer,
    max_tokens: usize,
}

impl PrefillBufs {
    fn new(
        ctx: &Context,
        mut row: impl FnMut() -> Vec<f32>,
        ld: usize,
        width: usize,
        max_tokens: usize,
    ) -> PrefillBufs {
        let mut rows = Vec::with_capacity(max_tokens * ld);
        for _ in 0..max_tokens {
            let r = row();
            rows.extend_from_slice(&r);
            rows.resize(rows.len() + ld - r.len(), 0.0);
        }
        PrefillBufs {
            proj: ctx.upload_f32(&rows).unwrap(),
            out: ctx
                .create_buffer((max_tokens * width * 4) as u64, MemoryKind::Device)
                .unwrap(),
            step: ctx.upload(&words(&[0, 0, 0, 1])).unwrap(),
            rows,
            ld,
            max_tokens,
        }
    }

    fn io<'a>(&'a self, state: &'a RecurrentState) -> PrefillIo<'a> {
        PrefillIo {
            proj: &self.proj,
            ld_proj: self.ld as u64,
            out: &self.out,
            state,
            step: &self.step,
            max_tokens: self.max_tokens as u64,
        }
    }

    /// Runs `rec` over the first `m` rows at position `pos`; returns `m` rows of `width`.
    fn run(&self, ctx: &Context, rec: &Recording, m: usize, pos: usize, width: usize) -> Vec<f32> {
        ctx.write_buffer(&self.step, 0, &words(&[m as u32, pos as u32, 0, 1]))
            .unwrap();
        ctx.submit(rec).unwrap();
        ctx.read_f32(&self.out, m * width).unwrap()
    }

    /// Fresh random rows.
    fn refill(&mut self, ctx: &Context, mut row: impl FnMut() -> Vec<f32>) {
        for r in self.rows.chunks_mut(self.ld) {
            let v = row();
            r[..v.len()].copy_from_slice(&v);
        }
        ctx.write_buffer(&self.proj, 0, &f32_bytes(&self.rows))
            .unwrap();
    }
}

/// Mamba2 prefill steps through `ssm`, from a random state: a step of `m` tokens (room
/// for `max_tokens`) against the CPU twin (`mamba2::mix_with` in the kernel's form) and
/// against the decode kernel token by token (outputs and state); then two decode steps
/// continuing from the prefill's state and a second prefill step of `m2` tokens
/// continuing from theirs, both against the CPU.
#[allow(clippy::too_many_arguments)]
fn mamba2_prefill_case(
    ctx: &Context,
    rng: &mut StdRng,
    pool: &ThreadPool,
    c: &Mamba2Case,
    ssm: Mamba2Ssm,
    m: usize,
    m2: usize,
    max_tokens: usize,
) {
    let (spec, w, st0) = mamba2_layer(rng, c);
    let (di, cd, row) = (spec.d_inner(), spec.conv_dim(), spec.in_proj_rows());
    let eps = 1e-5;
    let form = match ssm {
        Mamba2Ssm::Chunk => SsmForm::Chunked(SSD_CHUNK),
        Mamba2Ssm::Scan => SsmForm::Recurrent,
    };
    let mut bufs = PrefillBufs::new(ctx, || mamba2_row(rng, &spec), row + 5, di, max_tokens);
    let what = format!(
        "mamba2 prefill ({ssm:?}) of {m} + {m2} tokens at {}: {} heads of {}, state {}, {} \
         groups, kernel {}, dt_min {} ({})",
        c.pos0,
        c.heads,
        c.hp,
        c.ns,
        c.groups,
        c.kern,
        c.dt_min,
        describe(ctx)
    );
    let read_state = |state: &RecurrentState| {
        let s = ctx
            .read_f32(state.ssm.as_ref().unwrap(), st0.ssm.len())
            .unwrap();
        mamba2_ssm_from_device(&spec, &s).unwrap()
    };
    let rows_of = |bufs: &PrefillBufs, m: usize| {
        let mut proj = Vec::with_capacity(m * row);
        for r in bufs.rows.chunks(bufs.ld).take(m) {
            proj.extend_from_slice(&r[..row]);
        }
        proj
    };
    let state = mamba2_device_state(ctx, &spec, &st0, c.pos0);
    let op = Mamba2Prefill::with_ssm(ctx, &spec, &w, eps, &bufs.io(&state), ssm).unwrap();
    let rec = ctx.record(|r| op.record(r)).unwrap();
    let got = bufs.run(ctx, &rec, m, c.pos0, di);
    let s_got = read_state(&state);
    let ring = ctx.read_f32(&state.conv, c.kern * cd).unwrap();
    let hist = history_from_ring(&ring, c.kern, cd, (c.pos0 + m) as u64).unwrap();

    // The CPU twin, all tokens at once.
    let mut st = st0.clone();
    let proj = rows_of(&bufs, m);
    let mut want = vec![0f32; m * di];
    mamba2::mix_with(pool, &spec, &w, &mut st, &proj, m, eps, form, &mut want).unwrap();
    assert_close(&got, &want, 1e-4, &format!("{what}: outputs vs CPU"));
    assert_close(&s_got, &st.ssm, 1e-4, &format!("{what}: state vs CPU"));
    assert_eq!(hist, st.conv, "{what}: conv history");

    // The decode kernel, token by token, from the same state.
    let dstate = mamba2_device_state(ctx, &spec, &st0, c.pos0);
    let dev = Steps::new(ctx, row, di);
    let dop = Mamba2Decode::new(ctx, &spec, &w, eps, &dev.io(&dstate)).unwrap();
    let drec = ctx.record(|r| dop.record(r)).unwrap();
    let mut steps = Vec::with_capacity(m * di);
    for t in 0..m {
        steps.extend(dev.run(ctx, &drec, &proj[t * row..(t + 1) * row], c.pos0 + t));
    }
    assert_close(
        &got,
        &steps,
        5e-5,
        &format!("{what}: outputs vs decode steps"),
    );
    assert_close(
        &s_got,
        &read_state(&dstate),
        5e-5,
        &format!("{what}: state vs decode steps"),
    );

    // Decode continues from the prefill's state.
    let cont = Steps::new(ctx, row, di);
    let cop = Mamba2Decode::new(ctx, &spec, &w, eps, &cont.io(&state)).unwrap();
    let crec = ctx.record(|r| cop.record(r)).unwrap();
    let mut pos = c.pos0 + m;
    for i in 0..2 {
        let proj = mamba2_row(rng, &spec);
        let got = cont.run(ctx, &crec, &proj, pos);
        let mut want = vec![0f32; di];
        mamba2::mix(pool, &spec, &w, &mut st, &proj, 1, eps, &mut want).unwrap();
        assert_close(&got, &want, 1e-4, &format!("{what}: decode step {i} after"));
        pos += 1;
    }

    // And a second prefill step (the same recording) from there.
    bufs.refill(ctx, || mamba2_row(rng, &spec));
    let got = bufs.run(ctx, &rec, m2, pos, di);
    let proj = rows_of(&bufs, m2);
    let mut want = vec![0f32; m2 * di];
    mamba2::mix_with(pool, &spec, &w, &mut st, &proj, m2, eps, form, &mut want).unwrap();
    assert_close(&got, &want, 1e-4, &format!("{what}: second step vs CPU"));
    assert_close(
        &read_state(&state),
        &st.ssm,
        1e-4,
        &format!("{what}: state after the second step vs CPU"),
    );
}

#[test]
fn mamba2_prefill_matches_cpu_and_decode() {
    let mut rng = rng("mamba2_prefill");
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
        q8: false,
    };
    // Two channel tiles of `mamba2_chunk` (the second partial), three state slices (the
    // last of one row), one head per group.
    let wide = Mamba2Case {
        heads: 4,
        hp: 40,
        ns: 33,
        groups: 4,
        kern: 3,
        dt_min: 0.05,
        bias: false,
        pos0: 17,
        ..base
    };
    // One group over every head.
    let one_group = Mamba2Case {
        heads: 3,
        hp: 16,
        ns: 20,
        groups: 1,
        pos0: 5,
        ..base
    };
    // Nemotron-H's head and state sizes.
    let nemotron = Mamba2Case {
        heads: 4,
        hp: 64,
        ns: 128,
        groups: 2,
        pos0: 300,
        ..base
    };
    let ctxs = contexts();
    for (i, ctx) in ctxs.iter().enumerate() {
        // Fewer tokens than the conv kernel; a partial chunk; one whole chunk; a whole
        // and a partial one; four chunks; then the second steps.
        for (c, m, m2, max_tokens) in [
            (&base, 2, 5, 8),
            (&wide, 32, 32, 32),
            (&one_group, 64, 1, 64),
            (&base, 70, 75, 75),
            (&one_group, 200, 131, 200),
        ] {
            mamba2_prefill_case(ctx, &mut rng, &pool, c, Mamba2Ssm::Chunk, m, m2, max_tokens);
        }
        // The token-by-token kernel (CALDERA_VK_MAMBA2_SCAN=1), and larger sizes, on the
        // first context only (lavapipe is slow).
        if i == 0 {
            for (c, m, m2, max_tokens) in [(&base, 2, 5, 8), (&wide, 70, 32, 75)] {
                mamba2_prefill_case(ctx, &mut rng, &pool, c, Mamba2Ssm::Scan, m, m2, max_tokens);
            }
            mamba2_prefill_case(
                ctx,
                &mut rng,
                &pool,
                &nemotron,
                Mamba2Ssm::Chunk,
                130,
                64,
                130,
            );
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

/// Two short-conv prefill steps (the second continuing the first's state) against the
/// CPU.
fn shortconv_prefill_case(
    ctx: &Context,
    rng: &mut StdRng,
    channels: usize,
    kern: usize,
    steps: [usize; 2],
) {
    let spec = ShortConvSpec {
        channels,
        l_cache: kern,
    };
    let w = ShortConvWeights {
        in_proj: unused_weight(3 * channels, 1),
        conv: random_vec(rng, channels * kern, 0.7),
        conv_bias: Some(random_vec(rng, channels, 0.3)),
        out_proj: unused_weight(1, channels),
    };
    let max_tokens = steps[0].max(steps[1]) + 1;
    let row = 3 * channels;
    let mut bufs = PrefillBufs::new(
        ctx,
        || random_vec(rng, row, 1.5),
        row + 2,
        channels,
        max_tokens,
    );
    let state = RecurrentState::short_conv(ctx, &spec).unwrap();
    let op = ShortConvPrefill::new(ctx, &spec, &w, &bufs.io(&state)).unwrap();
    let rec = ctx.record(|r| op.record(r)).unwrap();
    let mut st = ShortConvState::new(&spec);
    let mut pos = 0;
    for (i, m) in steps.into_iter().enumerate() {
        if i > 0 {
            bufs.refill(ctx, || random_vec(rng, row, 1.5));
        }
        let got = bufs.run(ctx, &rec, m, pos, channels);
        let mut proj = Vec::with_capacity(m * row);
        for r in bufs.rows.chunks(bufs.ld).take(m) {
            proj.extend_from_slice(&r[..row]);
        }
        let mut want = vec![0f32; m * channels];
        shortconv::mix(&spec, &w, &mut st, &proj, m, &mut want).unwrap();
        let what = format!(
            "short conv prefill of {m} tokens at {pos}: {channels} channels, kernel {kern} ({})",
            describe(ctx)
        );
        assert_close(&got, &want, 1e-5, &what);
        let hist = ctx.read_f32(&state.conv, st.inputs().len()).unwrap();
        assert_eq!(hist, st.inputs(), "{what}: state");
        pos += m;
    }
}

#[test]
fn shortconv_prefill_matches_cpu() {
    let mut rng = rng("shortconv_prefill");
    for ctx in &contexts() {
        for (channels, kern, steps) in [(37, 3, [5, 1]), (130, 4, [2, 9]), (70, 1, [3, 4])] {
            shortconv_prefill_case(ctx, &mut rng, channels, kern, steps);
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
    // Int8 output blocks of 32 would straddle value heads of 8.
    let q8 = Steps::with_q8(&ctx, cd + vd + 8, vd);
    assert!(GdnDecode::new(&ctx, &spec, &w, 1e-6, &q8.io(&state)).is_err());
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
