//! Mamba2 mixer on the CPU (the math is in `caldera_model::blocks::mamba2`).
//!
//! The SSM has two forms ([`SsmForm`]): the recurrent step token after token, and the
//! chunked SSD form: within a chunk of `Q` tokens the output is a masked quadratic form
//! `y_t = Σ_{s≤t} exp(c_t - c_s)·dt_s·(C_t·B_s)·x_s` (with `c` the running sum of `dt·A`),
//! plus the carried state's contribution `exp(c_t)·S·C_t`; the state is then advanced
//! once per chunk. They agree to float rounding; [`mix`] runs the recurrent form (faster
//! here, [`default_form`]) and the chunked one is the twin of the GPU prefill kernel.

use caldera_model::blocks::mamba2::{Mamba2Spec, Mamba2Weights};

use crate::ctx::Ctx;
use crate::forward::CpuError;
use crate::ops;
use crate::pool::{SyncPtr, ThreadPool};

/// Per-sequence recurrent state of one Mamba2 layer (f32).
#[derive(Clone, Debug)]
pub struct Mamba2State {
    /// The last `K-1` inputs of the convolution, `[K-1, conv_dim]`, oldest first.
    pub conv: Vec<f32>,
    /// The SSM state, `[H, P, N]`.
    pub ssm: Vec<f32>,
}

impl Mamba2State {
    pub fn new(spec: &Mamba2Spec) -> Mamba2State {
        Mamba2State {
            conv: vec![0.0; spec.d_conv.saturating_sub(1) * spec.conv_dim()],
            ssm: vec![0.0; spec.d_inner() * spec.d_state],
        }
    }
}

fn softplus(x: f32) -> f32 {
    // torch's softplus (threshold 20): linear above, log1p(exp(x)) below.
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// `out[m × d]` = Mamba2 mixer over `h[m × d]`, advancing `state` by `m` tokens.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    ctx: &mut Ctx,
    spec: &Mamba2Spec,
    w: &Mamba2Weights,
    state: &mut Mamba2State,
    h: &[f32],
    m: usize,
    eps: f32,
    out: &mut [f32],
) -> Result<(), CpuError> {
    let di = spec.d_inner();
    let cd = spec.conv_dim();
    let rows = spec.in_proj_rows();
    if w.in_proj.rows != rows
        || state.ssm.len() != di * spec.d_state
        || state.conv.len() != spec.d_conv.saturating_sub(1) * cd
    {
        return Err(CpuError::Unsupported(
            "mamba2: weights or state do not match the layer spec".into(),
        ));
    }
    let mut proj = vec![0f32; m * rows];
    ctx.matmul(&w.in_proj, h, m, &mut proj)?;
    let mut y = vec![0f32; m * di];
    mix(ctx.pool, spec, w, state, &proj, m, eps, &mut y)?;
    ctx.matmul(&w.out_proj, &y, m, out)
}

/// Chunk length of the chunked (SSD) form of the GPU prefill (`mamba2_chunk.comp`),
/// whose CPU twin is [`SsmForm::Chunked`]`(SSD_CHUNK)`.
pub const SSD_CHUNK: usize = 64;

/// How the SSM runs over the tokens of a call. Both forms compute the same values up to
/// float rounding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SsmForm {
    /// Token after token: `S = exp(dt·A)·S + dt·x ⊗ B`, `y = S·C + D·x`.
    Recurrent,
    /// In chunks of this many tokens (at least 1), the SSD form: with `c_t` the running
    /// sum of `dt·A` inside the chunk and `S` the state entering it,
    /// `y_t = exp(c_t)·S·C_t + Σ_{j≤t} exp(c_t - c_j)·(C_t·B_j)·dt_j·x_j + D·x_t`, and the
    /// state leaving it `exp(c_L)·S + Σ_j exp(c_L - c_j)·dt_j·x_j ⊗ B_j`.
    Chunked(usize),
}

/// The form [`mix`] runs for `m` tokens: the recurrent one, also for prefill. At
/// Nemotron-H-8B's mixer sizes over 512 tokens on two cores the chunked form took
/// 1.2-1.6x as long (`tests/mamba2.rs`, `ssm_forms_timing`; docs/BENCHMARKS.md): on
/// the CPU it does more arithmetic (the `C·B` products) and the recurrent form's
/// per-head state already stays in cache. The chunked form is the GPU prefill kernel's
/// twin.
pub fn default_form(_m: usize) -> SsmForm {
    SsmForm::Recurrent
}

/// The mixer between its projections, for `m` tokens continuing from `state`: `proj`
/// is `in_proj`'s output (`[m × (d_inner + conv_dim + H)]`: z, xBC, dt); writes `y`
/// (`[m × d_inner]`, the out-projection's input). Reads only `w`'s vectors; sizes that
/// do not match `spec` are an error. The SSM runs in [`default_form`].
#[allow(clippy::too_many_arguments)]
pub fn mix(
    pool: &ThreadPool,
    spec: &Mamba2Spec,
    w: &Mamba2Weights,
    state: &mut Mamba2State,
    proj: &[f32],
    m: usize,
    eps: f32,
    y: &mut [f32],
) -> Result<(), CpuError> {
    mix_with(pool, spec, w, state, proj, m, eps, default_form(m), y)
}

/// [`mix`] with the SSM in `form`.
#[allow(clippy::too_many_arguments)]
pub fn mix_with(
    pool: &ThreadPool,
    spec: &Mamba2Spec,
    w: &Mamba2Weights,
    state: &mut Mamba2State,
    proj: &[f32],
    m: usize,
    eps: f32,
    form: SsmForm,
    y: &mut [f32],
) -> Result<(), CpuError> {
    let di = spec.d_inner();
    let cd = spec.conv_dim();
    let rows = spec.in_proj_rows();
    let nh = spec.n_heads;
    spec.validate()
        .map_err(|e| CpuError::Unsupported(e.to_string()))?;
    if proj.len() != m * rows
        || y.len() != m * di
        || state.ssm.len() != di * spec.d_state
        || state.conv.len() != spec.d_conv.saturating_sub(1) * cd
        || w.conv.len() != cd * spec.d_conv
        || w.conv_bias.as_ref().is_some_and(|c| c.len() != cd)
        || w.dt_bias.len() != nh
        || w.a.len() != nh
        || w.d.len() != nh
        || w.norm.len() != di
    {
        return Err(CpuError::Unsupported(
            "mamba2: inputs, weights or state that do not match the layer spec".into(),
        ));
    }

    let xbc = conv(spec, w, state, proj, m);

    let mut dt = vec![0f32; m * nh];
    for t in 0..m {
        let src = &proj[t * rows + di + cd..(t + 1) * rows];
        for (hh, v) in dt[t * nh..(t + 1) * nh].iter_mut().enumerate() {
            *v = softplus(src[hh] + w.dt_bias[hh]).max(spec.dt_min);
        }
    }

    ssm(
        pool,
        spec,
        &w.a,
        &w.d,
        &xbc,
        &dt,
        m,
        form,
        &mut state.ssm,
        y,
    )?;

    // Gate, then RMSNorm within each group, times the norm weight.
    let gs = di / spec.n_groups;
    for t in 0..m {
        let z = &proj[t * rows..t * rows + di];
        let yr = &mut y[t * di..(t + 1) * di];
        for (v, &zv) in yr.iter_mut().zip(z) {
            *v *= ops::silu(zv);
        }
        for (yg, wg) in yr.chunks_exact_mut(gs).zip(w.norm.chunks_exact(gs)) {
            let ms: f32 = yg.iter().map(|v| v * v).sum::<f32>() / gs as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for (v, &g) in yg.iter_mut().zip(wg) {
                *v = *v * inv * g;
            }
        }
    }
    Ok(())
}

/// The SSM of a Mamba2 layer over `m` tokens, every head, in `form`: from `xbc`
/// (`[m × conv_dim]`, x | B | C after the conv and SiLU) and `dt` (`[m × H]`, after
/// softplus, bias and the `dt_min` clamp), with `a` (`A`, per head) and `d` (the skip,
/// per head), advancing `ssm` (`[H][P][N]`) and writing `y` (`[m × d_inner]`, before the
/// gate and norm). Heads run in parallel on `pool`.
#[allow(clippy::too_many_arguments)]
pub fn ssm(
    pool: &ThreadPool,
    spec: &Mamba2Spec,
    a: &[f32],
    d: &[f32],
    xbc: &[f32],
    dt: &[f32],
    m: usize,
    form: SsmForm,
    ssm: &mut [f32],
    y: &mut [f32],
) -> Result<(), CpuError> {
    let (nh, p, n) = (spec.n_heads, spec.head_dim, spec.d_state);
    spec.validate()
        .map_err(|e| CpuError::Unsupported(e.to_string()))?;
    if xbc.len() != m * spec.conv_dim()
        || dt.len() != m * nh
        || a.len() != nh
        || d.len() != nh
        || ssm.len() != nh * p * n
        || y.len() != m * spec.d_inner()
        || form == SsmForm::Chunked(0)
    {
        return Err(CpuError::Unsupported(
            "mamba2 SSM: inputs or state that do not match the layer spec".into(),
        ));
    }
    let ys = SyncPtr(y.as_mut_ptr());
    let ss = SyncPtr(ssm.as_mut_ptr());
    pool.run(nh, |hh| {
        // SAFETY: head `hh` alone touches state rows `hh·P·N..(hh+1)·P·N` and the output
        // columns `hh·P..(hh+1)·P` of every token.
        let s = unsafe { std::slice::from_raw_parts_mut(ss.get().add(hh * p * n), p * n) };
        let io = HeadIo {
            xbc,
            dt,
            y: ys,
            a: a[hh],
            d: d[hh],
        };
        match form {
            SsmForm::Recurrent => steps_head(spec, hh, m, &io, s),
            SsmForm::Chunked(q) => chunked_head(spec, hh, m, q, &io, s),
        }
    });
    Ok(())
}

/// Causal depthwise convolution (with bias) of the `xBC` rows of `proj`, then SiLU;
/// returns `[m, conv_dim]` and keeps the last `K-1` inputs in `state.conv`.
fn conv(
    spec: &Mamba2Spec,
    w: &Mamba2Weights,
    state: &mut Mamba2State,
    proj: &[f32],
    m: usize,
) -> Vec<f32> {
    let (di, cd, rows, k) = (
        spec.d_inner(),
        spec.conv_dim(),
        spec.in_proj_rows(),
        spec.d_conv,
    );
    let hist = k - 1;
    // Input at relative time `tau` (negative: from the carried state).
    let input = |st: &[f32], tau: isize, c: usize| -> f32 {
        if tau >= 0 {
            proj[tau as usize * rows + di + c]
        } else {
            st[(hist as isize + tau) as usize * cd + c]
        }
    };
    let mut out = vec![0f32; m * cd];
    for t in 0..m {
        let row = &mut out[t * cd..(t + 1) * cd];
        for (c, o) in row.iter_mut().enumerate() {
            let taps = &w.conv[c * k..(c + 1) * k];
            let mut acc = w.conv_bias.as_ref().map_or(0.0, |b| b[c]);
            for (j, &wj) in taps.iter().enumerate() {
                acc += wj * input(&state.conv, t as isize + j as isize - hist as isize, c);
            }
            *o = ops::silu(acc);
        }
    }
    if hist > 0 {
        let old = state.conv.clone();
        for r in 0..hist {
            let tau = m as isize - hist as isize + r as isize;
            for c in 0..cd {
                state.conv[r * cd + c] = input(&old, tau, c);
            }
        }
    }
    out
}

/// What every head reads (`xbc` `[m, conv_dim]`, `dt` `[m, H]`, its `A` and `D`) and
/// writes (`y` `[m, d_inner]`).
struct HeadIo<'a> {
    xbc: &'a [f32],
    dt: &'a [f32],
    y: SyncPtr,
    a: f32,
    d: f32,
}

impl HeadIo<'_> {
    fn x(&self, spec: &Mamba2Spec, t: usize, hh: usize) -> &[f32] {
        let o = t * spec.conv_dim() + hh * spec.head_dim;
        &self.xbc[o..o + spec.head_dim]
    }

    fn b(&self, spec: &Mamba2Spec, t: usize, grp: usize) -> &[f32] {
        let o = t * spec.conv_dim() + spec.d_inner() + grp * spec.d_state;
        &self.xbc[o..o + spec.d_state]
    }

    fn c(&self, spec: &Mamba2Spec, t: usize, grp: usize) -> &[f32] {
        let o = t * spec.conv_dim() + spec.d_inner() + (spec.n_groups + grp) * spec.d_state;
        &self.xbc[o..o + spec.d_state]
    }

    /// Output row of head `hh` at token `t`.
    #[allow(clippy::mut_from_ref)]
    fn y(&self, spec: &Mamba2Spec, t: usize, hh: usize) -> &mut [f32] {
        // SAFETY: see `ssm`: each head writes only its own columns.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.y.get().add(t * spec.d_inner() + hh * spec.head_dim),
                spec.head_dim,
            )
        }
    }
}

/// `m` tokens, one head, token after token: `S = exp(dt·A)·S + dt·x ⊗ B`,
/// `y = S·C + D·x` (`s`: the head's `[P][N]`).
fn steps_head(spec: &Mamba2Spec, hh: usize, m: usize, io: &HeadIo, s: &mut [f32]) {
    let (n, nh) = (spec.d_state, spec.n_heads);
    let grp = hh / (nh / spec.n_groups);
    for t in 0..m {
        let dt = io.dt[t * nh + hh];
        let decay = (dt * io.a).exp();
        let (x, b, c) = (io.x(spec, t, hh), io.b(spec, t, grp), io.c(spec, t, grp));
        let y = io.y(spec, t, hh);
        for (pp, srow) in s.chunks_exact_mut(n).enumerate() {
            let dx = dt * x[pp];
            for (sv, &bv) in srow.iter_mut().zip(b) {
                *sv = *sv * decay + dx * bv;
            }
            y[pp] = ops::dot(srow, c) + io.d * x[pp];
        }
    }
}

/// `m` tokens, one head, in chunks of `q` tokens (the SSD form, [`SsmForm::Chunked`]),
/// in the order of `mamba2_chunk.comp`: per chunk the decayed products
/// `L[t][j] = exp(c_t - c_j)·dt_j·(C_t·B_j)` (`j ≤ t`), then every output from the state
/// entering the chunk, then the state leaving it.
fn chunked_head(spec: &Mamba2Spec, hh: usize, m: usize, q: usize, io: &HeadIo, s: &mut [f32]) {
    let (n, nh) = (spec.d_state, spec.n_heads);
    let grp = hh / (nh / spec.n_groups);
    let q = q.min(m);
    let mut cum = vec![0f32; q];
    let mut lmat = vec![0f32; q * q];
    let mut t0 = 0;
    while t0 < m {
        let len = q.min(m - t0);
        let dt = |j: usize| io.dt[(t0 + j) * nh + hh];
        let mut acc = 0f32;
        for (i, cv) in cum[..len].iter_mut().enumerate() {
            acc += dt(i) * io.a;
            *cv = acc;
        }
        for i in 0..len {
            let c = io.c(spec, t0 + i, grp);
            for j in 0..=i {
                lmat[i * q + j] =
                    (cum[i] - cum[j]).exp() * dt(j) * ops::dot(c, io.b(spec, t0 + j, grp));
            }
        }
        for i in 0..len {
            let t = t0 + i;
            let c = io.c(spec, t, grp);
            let y = io.y(spec, t, hh);
            // The carried state's contribution, exp(c_i)·S·C_t.
            let dec = cum[i].exp();
            for (yv, srow) in y.iter_mut().zip(s.chunks_exact(n)) {
                *yv = dec * ops::dot(srow, c);
            }
            // The chunk's own tokens.
            for j in 0..=i {
                ops::axpy(lmat[i * q + j], io.x(spec, t0 + j, hh), y);
            }
            ops::axpy(io.d, io.x(spec, t, hh), y);
        }
        // The state leaving the chunk.
        let last = cum[len - 1];
        let total = last.exp();
        s.iter_mut().for_each(|v| *v *= total);
        for (j, &cj) in cum[..len].iter().enumerate() {
            let wgt = (last - cj).exp() * dt(j);
            let (x, b) = (io.x(spec, t0 + j, hh), io.b(spec, t0 + j, grp));
            for (srow, &xv) in s.chunks_exact_mut(n).zip(x) {
                ops::axpy(wgt * xv, b, srow);
            }
        }
        t0 += len;
    }
}
