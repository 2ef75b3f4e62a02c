//! Mamba2 mixer on the CPU (the math is in `caldera_model::blocks::mamba2`).
//!
//! Prefill (`m > 1`) runs the chunked SSD form: within a chunk of `Q` tokens the output is
//! a masked quadratic form `y_t = Σ_{s≤t} exp(c_t - c_s)·dt_s·(C_t·B_s)·x_s` (with `c` the
//! running sum of `dt·A`), plus the carried state's contribution `exp(c_t)·S·C_t`; the state
//! is then advanced once per chunk. Decode (`m = 1`) runs the recurrent step.

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

/// The mixer between its projections, for `m` tokens continuing from `state`: `proj`
/// is `in_proj`'s output (`[m × (d_inner + conv_dim + H)]`: z, xBC, dt); writes `y`
/// (`[m × d_inner]`, the out-projection's input). Reads only `w`'s vectors; sizes that
/// do not match `spec` are an error.
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

    let ys = SyncPtr(y.as_mut_ptr());
    let ss = SyncPtr(state.ssm.as_mut_ptr());
    let (xbc, dt) = (&xbc, &dt);
    pool.run(nh, |hh| {
        // SAFETY: head `hh` alone touches state rows `hh·P·N..(hh+1)·P·N` and the output
        // columns `hh·P..(hh+1)·P` of every token.
        let s = unsafe {
            std::slice::from_raw_parts_mut(
                ss.get().add(hh * spec.head_dim * spec.d_state),
                spec.head_dim * spec.d_state,
            )
        };
        let io = HeadIo { xbc, dt, y: ys };
        if m == 1 {
            step_head(spec, w, hh, &io, s);
        } else {
            chunked_head(spec, w, hh, m, &io, s);
        }
    });

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

/// What every head reads (`xbc` `[m, conv_dim]`, `dt` `[m, H]`) and writes (`y` `[m, d_inner]`).
struct HeadIo<'a> {
    xbc: &'a [f32],
    dt: &'a [f32],
    y: SyncPtr,
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
        // SAFETY: see `forward`: each head writes only its own columns.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.y.get().add(t * spec.d_inner() + hh * spec.head_dim),
                spec.head_dim,
            )
        }
    }
}

/// One token, one head: `S = exp(dt·A)·S + dt·x ⊗ B`, `y = S·C + D·x`.
fn step_head(spec: &Mamba2Spec, w: &Mamba2Weights, hh: usize, io: &HeadIo, s: &mut [f32]) {
    let n = spec.d_state;
    let grp = hh / (spec.n_heads / spec.n_groups);
    let dt = io.dt[hh];
    let decay = (dt * w.a[hh]).exp();
    let (x, b, c) = (io.x(spec, 0, hh), io.b(spec, 0, grp), io.c(spec, 0, grp));
    let y = io.y(spec, 0, hh);
    for (pp, srow) in s.chunks_exact_mut(n).enumerate() {
        let dx = dt * x[pp];
        for (sv, &bv) in srow.iter_mut().zip(b) {
            *sv = *sv * decay + dx * bv;
        }
        y[pp] = ops::dot(srow, c) + w.d[hh] * x[pp];
    }
}

/// `m` tokens, one head, in chunks of `spec.chunk`, starting from state `s`.
fn chunked_head(
    spec: &Mamba2Spec,
    w: &Mamba2Weights,
    hh: usize,
    m: usize,
    io: &HeadIo,
    s: &mut [f32],
) {
    let (n, p, nh) = (spec.d_state, spec.head_dim, spec.n_heads);
    let grp = hh / (nh / spec.n_groups);
    let a = w.a[hh];
    let dskip = w.d[hh];
    let q = spec.chunk;
    let mut cum = vec![0f32; q];
    let mut sc = vec![0f32; p];
    let mut t0 = 0;
    while t0 < m {
        let len = q.min(m - t0);
        let mut acc = 0f32;
        for (i, cv) in cum[..len].iter_mut().enumerate() {
            acc += io.dt[(t0 + i) * nh + hh] * a;
            *cv = acc;
        }
        for i in 0..len {
            let t = t0 + i;
            let c = io.c(spec, t, grp);
            // The carried state's contribution: exp(c_i) · S·C_t.
            let dec = cum[i].exp();
            for (pp, srow) in s.chunks_exact(n).enumerate() {
                sc[pp] = dec * ops::dot(srow, c);
            }
            // The quadratic (intra-chunk) part.
            for j in 0..=i {
                let u = t0 + j;
                let coef =
                    (cum[i] - cum[j]).exp() * io.dt[u * nh + hh] * ops::dot(c, io.b(spec, u, grp));
                ops::axpy(coef, io.x(spec, u, hh), &mut sc);
            }
            let x = io.x(spec, t, hh);
            let y = io.y(spec, t, hh);
            for ((yv, &sv), &xv) in y.iter_mut().zip(&sc).zip(x) {
                *yv = sv + dskip * xv;
            }
        }
        // Advance the state to the end of the chunk.
        let last = cum[len - 1];
        let total = last.exp();
        s.iter_mut().for_each(|v| *v *= total);
        for (j, &cj) in cum[..len].iter().enumerate() {
            let u = t0 + j;
            let wgt = (last - cj).exp() * io.dt[u * nh + hh];
            let (x, b) = (io.x(spec, u, hh), io.b(spec, u, grp));
            for (pp, srow) in s.chunks_exact_mut(n).enumerate() {
                ops::axpy(wgt * x[pp], b, srow);
            }
        }
        t0 += len;
    }
}
