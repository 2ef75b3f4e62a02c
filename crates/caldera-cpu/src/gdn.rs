//! GatedDeltaNet mixer on the CPU: projections, causal depthwise conv with state + SiLU,
//! L2-normed q/k, the gated delta rule, gated RMSNorm, output projection.
//!
//! The delta rule runs in two forms that compute the same function:
//! - [`delta_step`]: one token (decode);
//! - [`delta_chunked`]: prefill in chunks of [`DELTA_CHUNK`] tokens. Within a chunk the
//!   recurrence is rewritten (WY / UT-transform form, as in the fla library): with `G_t` the
//!   cumulative log-decay inside the chunk and `S0` the state entering it, the new values
//!   `u_t = β_t (v_t - e^{G_t} S0ᵀk_t) - Σ_{j<t} β_t e^{G_t-G_j} (k_t·k_j) u_j` are one
//!   unit lower-triangular solve; the outputs are
//!   `o_t = e^{G_t} S0ᵀq_t + Σ_{j≤t} e^{G_t-G_j} (q_t·k_j) u_j` and the state leaving the
//!   chunk is `e^{G_L} S0 + Σ_j e^{G_L-G_j} k_j u_jᵀ`. Every exponent is ≤ 0.

use caldera_model::blocks::gdn::{GdnGates, GdnSpec, GdnWeights};

use crate::ctx::Ctx;
use crate::forward::CpuError;
use crate::ops;
use crate::pool::{SyncPtr, ThreadPool};

/// Tokens per chunk of the chunked delta rule.
pub const DELTA_CHUNK: usize = 64;

/// Added to the squared norm when L2-normalizing q and k (as transformers and fla do).
const L2_EPS: f32 = 1e-6;

/// Per-sequence recurrent state of one GatedDeltaNet layer.
#[derive(Clone)]
pub struct GdnState {
    /// The last `conv_kernel - 1` conv inputs (the pre-activation qkv rows), oldest first:
    /// `[(conv_kernel - 1) × conv_dim]`; zeros before the first token.
    pub conv: Vec<f32>,
    /// For each value head in order, `S [head_k_dim × head_v_dim]` row-major.
    pub ssm: Vec<f32>,
}

impl GdnState {
    pub fn new(spec: &GdnSpec) -> GdnState {
        GdnState {
            conv: vec![0.0; spec.conv_kernel.saturating_sub(1) * spec.conv_dim()],
            ssm: vec![0.0; spec.n_v_heads * spec.head_k_dim * spec.head_v_dim],
        }
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `log(1 + e^x)`, linear above 20 (torch's default threshold).
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// `y += a * x` in f64.
fn axpy64(a: f64, x: &[f64], y: &mut [f64]) {
    for (yv, &xv) in y.iter_mut().zip(x) {
        *yv += a * xv;
    }
}

fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// One token of the gated delta rule for one value head. `s` is `S [dk × dv]`; `q` is
/// already normalized and scaled, `k` normalized; `g` is the log-decay (≤ 0). Computed
/// in f64, stored in f32.
#[allow(clippy::too_many_arguments)]
pub fn delta_step(
    s: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: f32,
    beta: f32,
    out: &mut [f32],
    scratch: &mut Vec<f64>,
) {
    let dv = v.len();
    let decay = (g as f64).exp();
    scratch.clear();
    scratch.extend(s.iter().map(|&x| x as f64 * decay));
    scratch.extend(v.iter().map(|&x| x as f64));
    scratch.resize(s.len() + 2 * dv, 0.0);
    let (st, rest) = scratch.split_at_mut(s.len());
    let (delta, o) = rest.split_at_mut(dv);
    // delta = beta (v - Sᵀk)
    for (a, row) in st.chunks_exact(dv).enumerate() {
        axpy64(-(k[a] as f64), row, delta);
    }
    delta.iter_mut().for_each(|x| *x *= beta as f64);
    // S += k ⊗ delta; o = Sᵀq
    for (a, row) in st.chunks_exact_mut(dv).enumerate() {
        axpy64(k[a] as f64, delta, row);
        axpy64(q[a] as f64, row, o);
    }
    for (d, &x) in s.iter_mut().zip(st.iter()) {
        *d = x as f32;
    }
    for (d, &x) in out.iter_mut().zip(o.iter()) {
        *d = x as f32;
    }
}

/// The gated delta rule over `T = g.len()` tokens of one value head, in chunks of
/// [`DELTA_CHUNK`]. `q`, `k`: `[T × dk]`; `v`, `out`: `[T × dv]`; `s`: `S [dk × dv]`,
/// updated to the state after the last token. Computed in f64, stored in f32.
pub fn delta_chunked(
    s: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &[f32],
    beta: &[f32],
    out: &mut [f32],
) {
    let t_all = g.len();
    if t_all == 0 {
        return;
    }
    let dk = q.len() / t_all;
    let dv = v.len() / t_all;
    let c = DELTA_CHUNK.min(t_all);
    let mut st = widen(s);
    let mut cum = vec![0f64; c];
    let mut u = vec![0f64; c * dv];
    let mut sk = vec![0f64; c * dv];
    let mut oc = vec![0f64; c * dv];
    let mut kk = vec![0f64; c * c];
    let mut s_new = vec![0f64; dk * dv];
    let mut t0 = 0;
    while t0 < t_all {
        let l = DELTA_CHUNK.min(t_all - t0);
        let qc = widen(&q[t0 * dk..(t0 + l) * dk]);
        let kc = widen(&k[t0 * dk..(t0 + l) * dk]);
        let vc = &v[t0 * dv..(t0 + l) * dv];
        let bc = &beta[t0..t0 + l];
        let mut acc = 0f64;
        for (cg, &gv) in cum.iter_mut().zip(&g[t0..t0 + l]) {
            acc += gv as f64;
            *cg = acc;
        }
        // S0ᵀk_t → sk, S0ᵀq_t → oc (scaled by e^{G_t} below).
        for t in 0..l {
            let skt = &mut sk[t * dv..(t + 1) * dv];
            let ot = &mut oc[t * dv..(t + 1) * dv];
            skt.fill(0.0);
            ot.fill(0.0);
            for (a, row) in st.chunks_exact(dv).enumerate() {
                axpy64(kc[t * dk + a], row, skt);
                axpy64(qc[t * dk + a], row, ot);
            }
        }
        // k_t·k_j for j < t.
        for t in 0..l {
            let kt = &kc[t * dk..(t + 1) * dk];
            for j in 0..t {
                kk[t * c + j] = dot64(kt, &kc[j * dk..(j + 1) * dk]);
            }
        }
        // New values: forward substitution of the unit lower-triangular system.
        for t in 0..l {
            let et = cum[t].exp();
            let bt = bc[t] as f64;
            let (done, rest) = u.split_at_mut(t * dv);
            let ut = &mut rest[..dv];
            for ((uv, &vv), &sv) in ut
                .iter_mut()
                .zip(&vc[t * dv..(t + 1) * dv])
                .zip(&sk[t * dv..(t + 1) * dv])
            {
                *uv = bt * (vv as f64 - et * sv);
            }
            for j in 0..t {
                let coef = bt * (cum[t] - cum[j]).exp() * kk[t * c + j];
                axpy64(-coef, &done[j * dv..(j + 1) * dv], ut);
            }
        }
        // Outputs.
        for t in 0..l {
            let et = cum[t].exp();
            let qt = &qc[t * dk..(t + 1) * dk];
            let ot = &mut oc[t * dv..(t + 1) * dv];
            ot.iter_mut().for_each(|x| *x *= et);
            for j in 0..=t {
                let coef = (cum[t] - cum[j]).exp() * dot64(qt, &kc[j * dk..(j + 1) * dk]);
                axpy64(coef, &u[j * dv..(j + 1) * dv], ot);
            }
        }
        for (d, &x) in out[t0 * dv..(t0 + l) * dv].iter_mut().zip(&oc[..l * dv]) {
            *d = x as f32;
        }
        // State leaving the chunk.
        let gl = cum[l - 1];
        let el = gl.exp();
        for (a, (row_new, row_old)) in s_new
            .chunks_exact_mut(dv)
            .zip(st.chunks_exact(dv))
            .enumerate()
        {
            for (n, &o) in row_new.iter_mut().zip(row_old) {
                *n = el * o;
            }
            for j in 0..l {
                let coef = (gl - cum[j]).exp() * kc[j * dk + a];
                axpy64(coef, &u[j * dv..(j + 1) * dv], row_new);
            }
        }
        std::mem::swap(&mut st, &mut s_new);
        t0 += l;
    }
    for (d, &x) in s.iter_mut().zip(&st) {
        *d = x as f32;
    }
}

/// `b` and `a` projections in value-head order: (`[m × n_v]`, `[m × n_v]`).
fn gates(
    ctx: &mut Ctx,
    spec: &GdnSpec,
    w: &GdnWeights,
    h: &[f32],
    m: usize,
) -> Result<(Vec<f32>, Vec<f32>), CpuError> {
    let nv = spec.n_v_heads;
    match &w.gates {
        GdnGates::Separate { beta, alpha } => {
            let mut b = vec![0f32; m * nv];
            let mut a = vec![0f32; m * nv];
            ctx.matmul(beta, h, m, &mut b)?;
            ctx.matmul(alpha, h, m, &mut a)?;
            Ok((b, a))
        }
        GdnGates::Fused(ba) => {
            let mut x = vec![0f32; m * 2 * nv];
            ctx.matmul(ba, h, m, &mut x)?;
            Ok(split_fused_ba(spec, &x, m))
        }
    }
}

/// The fused `ssm_ba` projection's output (`[m × 2·n_v]`: per key head, the `b` of its
/// `r = n_v / n_k` value heads, then their `a`) as (`b`, `a`) in value-head order.
pub fn split_fused_ba(spec: &GdnSpec, x: &[f32], m: usize) -> (Vec<f32>, Vec<f32>) {
    let nv = spec.n_v_heads;
    let r = nv / spec.n_k_heads;
    let mut b = vec![0f32; m * nv];
    let mut a = vec![0f32; m * nv];
    for t in 0..m {
        for j in 0..nv {
            let (grp, i) = (j / r, j % r);
            b[t * nv + j] = x[t * 2 * nv + grp * 2 * r + i];
            a[t * nv + j] = x[t * 2 * nv + grp * 2 * r + r + i];
        }
    }
    (b, a)
}

/// `out[m × d]` = GatedDeltaNet over `h[m × d]`, continuing from `state`.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    ctx: &mut Ctx,
    spec: &GdnSpec,
    w: &GdnWeights,
    state: &mut GdnState,
    h: &[f32],
    m: usize,
    eps: f32,
    out: &mut [f32],
) -> Result<(), CpuError> {
    let mut qkv = vec![0f32; m * spec.conv_dim()];
    ctx.matmul(&w.qkv, h, m, &mut qkv)?;
    let mut z = vec![0f32; m * spec.value_dim()];
    ctx.matmul(&w.gate, h, m, &mut z)?;
    let (b, a) = gates(ctx, spec, w, h, m)?;
    let mut o = vec![0f32; m * spec.value_dim()];
    mix(ctx.pool, spec, w, state, &mut qkv, &z, b, a, m, eps, &mut o)?;
    ctx.matmul(&w.out, &o, m, out)
}

/// The mixer between its projections, for `m` tokens continuing from `state`: the
/// causal conv + SiLU of `qkv` (`[m × conv_dim]`, overwritten by the conv's outputs,
/// q and k then L2-normed), the gates from `b` and `a` (`[m × n_v]`, value-head order),
/// the delta rule, and the gated RMSNorm by `z` (`[m × n_v·dv]`) into `o`
/// (`[m × n_v·dv]`, the out-projection's input). Reads only `w`'s vectors; sizes that
/// do not match `spec` are an error.
#[allow(clippy::too_many_arguments)]
pub fn mix(
    pool: &ThreadPool,
    spec: &GdnSpec,
    w: &GdnWeights,
    state: &mut GdnState,
    qkv: &mut [f32],
    z: &[f32],
    b: Vec<f32>,
    a: Vec<f32>,
    m: usize,
    eps: f32,
    o: &mut [f32],
) -> Result<(), CpuError> {
    let (nk, nv, dk, dv) = (
        spec.n_k_heads,
        spec.n_v_heads,
        spec.head_k_dim,
        spec.head_v_dim,
    );
    let (kd, vd, cd, kern) = (
        spec.key_dim(),
        spec.value_dim(),
        spec.conv_dim(),
        spec.conv_kernel,
    );
    let hist = kern.saturating_sub(1);
    if nk == 0
        || dk == 0
        || dv == 0
        || !nv.is_multiple_of(nk)
        || qkv.len() != m * cd
        || z.len() != m * vd
        || b.len() != m * nv
        || a.len() != m * nv
        || o.len() != m * vd
        || state.conv.len() != hist * cd
        || state.ssm.len() != nv * dk * dv
        || w.conv.len() != cd * kern
        || w.conv_bias.as_ref().is_some_and(|c| c.len() != cd)
        || w.dt_bias.len() != nv
        || w.a.len() != nv
        || w.norm.len() != dv
    {
        return Err(CpuError::Unsupported(
            "gdn: inputs, weights or state that do not match the layer spec".into(),
        ));
    }
    // Causal depthwise conv over [history; new rows], then SiLU.
    let mut xe = Vec::with_capacity((hist + m) * cd);
    xe.extend_from_slice(&state.conv);
    xe.extend_from_slice(qkv);
    let mut taps = vec![0f32; kern * cd];
    for c in 0..cd {
        for i in 0..kern {
            taps[i * cd + c] = w.conv[c * kern + i];
        }
    }
    for t in 0..m {
        let row = &mut qkv[t * cd..(t + 1) * cd];
        match &w.conv_bias {
            Some(bias) => row.copy_from_slice(bias),
            None => row.fill(0.0),
        }
        for i in 0..kern {
            let x = &xe[(t + i) * cd..(t + i + 1) * cd];
            for ((o, &wv), &xv) in row.iter_mut().zip(&taps[i * cd..(i + 1) * cd]).zip(x) {
                *o += wv * xv;
            }
        }
        row.iter_mut().for_each(|v| *v = ops::silu(*v));
    }
    state.conv.copy_from_slice(&xe[m * cd..]);

    // L2-normalize q and k per head; scale q by 1/sqrt(dk).
    let q_scale = 1.0 / (dk as f32).sqrt();
    for t in 0..m {
        let row = &mut qkv[t * cd..t * cd + 2 * kd];
        for (hi, head) in row.chunks_exact_mut(dk).enumerate() {
            let ss: f32 = head.iter().map(|x| x * x).sum();
            let mut inv = 1.0 / (ss + L2_EPS).sqrt();
            if hi < nk {
                inv *= q_scale;
            }
            head.iter_mut().for_each(|x| *x *= inv);
        }
    }
    // beta and the log-decay g, per token and value head.
    let mut beta = b;
    beta.iter_mut().for_each(|x| *x = sigmoid(*x));
    let mut g = a;
    for row in g.chunks_exact_mut(nv) {
        for (j, x) in row.iter_mut().enumerate() {
            *x = w.a[j] * softplus(*x + w.dt_bias[j]);
        }
    }

    // The delta rule, one task per value head.
    let optr = SyncPtr(o.as_mut_ptr());
    let sptr = SyncPtr(state.ssm.as_mut_ptr());
    let (qkv, beta, g) = (&*qkv, &beta, &g);
    pool.run(nv, |j| {
        let kh = spec.key_head(j);
        // SAFETY: task j touches only value head j's state and output columns.
        let s = unsafe { std::slice::from_raw_parts_mut(sptr.get().add(j * dk * dv), dk * dv) };
        let qh = |t: usize| &qkv[t * cd + kh * dk..][..dk];
        let kh_ = |t: usize| &qkv[t * cd + kd + kh * dk..][..dk];
        let vh = |t: usize| &qkv[t * cd + 2 * kd + j * dv..][..dv];
        if m == 1 {
            // SAFETY: as above.
            let ot = unsafe { std::slice::from_raw_parts_mut(optr.get().add(j * dv), dv) };
            let mut scratch = Vec::new();
            delta_step(s, qh(0), kh_(0), vh(0), g[j], beta[j], ot, &mut scratch);
            return;
        }
        let mut qs = Vec::with_capacity(m * dk);
        let mut ks = Vec::with_capacity(m * dk);
        let mut vs = Vec::with_capacity(m * dv);
        let mut gs = Vec::with_capacity(m);
        let mut bs = Vec::with_capacity(m);
        for t in 0..m {
            qs.extend_from_slice(qh(t));
            ks.extend_from_slice(kh_(t));
            vs.extend_from_slice(vh(t));
            gs.push(g[t * nv + j]);
            bs.push(beta[t * nv + j]);
        }
        let mut oh = vec![0f32; m * dv];
        delta_chunked(s, &qs, &ks, &vs, &gs, &bs, &mut oh);
        for t in 0..m {
            // SAFETY: as above; row t, head j.
            let ot = unsafe { std::slice::from_raw_parts_mut(optr.get().add(t * vd + j * dv), dv) };
            ot.copy_from_slice(&oh[t * dv..(t + 1) * dv]);
        }
    });

    // Gated RMSNorm per value head: rmsnorm(o) * w * silu(z).
    for (oh, zh) in o.chunks_exact_mut(dv).zip(z.chunks_exact(dv)) {
        let ss: f32 = oh.iter().map(|x| x * x).sum::<f32>() / dv as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((x, &nw), &zv) in oh.iter_mut().zip(&w.norm).zip(zh) {
            *x = *x * inv * nw * ops::silu(zv);
        }
    }
    Ok(())
}
