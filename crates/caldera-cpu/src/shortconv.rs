//! Short-conv mixer on the CPU (LFM2): `[B, C, x] = in_proj(h)`, `bx = B * x`, a causal
//! depthwise convolution over time of `bx` continuing the sequence's state, `y = C * conv`,
//! `out = out_proj(y)`. A chunk of `m` tokens is convolved at once over the state's
//! `l_cache - 1` rows followed by the chunk's rows; the last `l_cache - 1` rows become the
//! new state. Prefill and single steps do the same arithmetic in the same order.

use caldera_model::blocks::shortconv::{ShortConvSpec, ShortConvWeights};

use crate::ctx::Ctx;
use crate::forward::CpuError;

/// Per-sequence state of one short-conv layer: the last `l_cache - 1` convolution inputs
/// (`B * x`), oldest first, time-major (`prev[t * channels + ch]`); zeros at the start.
#[derive(Clone, Debug)]
pub struct ShortConvState {
    prev: Vec<f32>,
}

impl ShortConvState {
    pub fn new(spec: &ShortConvSpec) -> ShortConvState {
        ShortConvState {
            prev: vec![0.0; spec.l_cache.saturating_sub(1) * spec.channels],
        }
    }

    /// The stored inputs, `(l_cache - 1) × channels`, oldest row first.
    pub fn inputs(&self) -> &[f32] {
        &self.prev
    }
}

/// `out[m × d_model]` = short-conv mixer over `h[m × d_model]` (already normed), continuing
/// and then advancing `state`.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    ctx: &mut Ctx,
    spec: &ShortConvSpec,
    w: &ShortConvWeights,
    state: &mut ShortConvState,
    h: &[f32],
    m: usize,
    _eps: f32,
    out: &mut [f32],
) -> Result<(), CpuError> {
    let c = spec.channels;
    if m == 0 {
        return Ok(());
    }
    let mut bcx = vec![0f32; m * 3 * c];
    ctx.matmul(&w.in_proj, h, m, &mut bcx)?;

    let mut y = vec![0f32; m * c];
    mix(spec, w, state, &bcx, m, &mut y)?;
    ctx.matmul(&w.out_proj, &y, m, out)?;
    Ok(())
}

/// The mixer between its projections, for `m` tokens continuing from `state`: `bcx` is
/// `in_proj`'s output (`[m × 3·channels]`: B, C, x); writes `y` (`[m × channels]`, the
/// out-projection's input). Sizes that do not match `spec` are an error.
pub fn mix(
    spec: &ShortConvSpec,
    w: &ShortConvWeights,
    state: &mut ShortConvState,
    bcx: &[f32],
    m: usize,
    y: &mut [f32],
) -> Result<(), CpuError> {
    let c = spec.channels;
    let l = spec.l_cache;
    let hist = l.saturating_sub(1);
    if c == 0
        || l == 0
        || w.conv.len() != c * l
        || w.conv_bias.as_ref().is_some_and(|b| b.len() != c)
        || state.prev.len() != hist * c
        || bcx.len() != m * 3 * c
        || y.len() != m * c
    {
        return Err(CpuError::Unsupported(format!(
            "short conv of {c} channels, kernel {l}: weights, inputs or state of the wrong size"
        )));
    }
    // ext: the state's rows then this chunk's B * x rows, time-major.
    let mut ext = Vec::with_capacity((hist + m) * c);
    ext.extend_from_slice(&state.prev);
    for row in bcx.chunks_exact(3 * c) {
        let (b, rest) = row.split_at(c);
        let x = &rest[c..];
        ext.extend(b.iter().zip(x).map(|(b, x)| b * x));
    }

    for (t, yr) in y.chunks_exact_mut(c).enumerate() {
        let gate = &bcx[t * 3 * c + c..t * 3 * c + 2 * c];
        for ch in 0..c {
            let k = &w.conv[ch * l..(ch + 1) * l];
            let mut acc = w.conv_bias.as_ref().map_or(0.0, |b| b[ch]);
            for (j, &kj) in k.iter().enumerate() {
                acc += kj * ext[(t + j) * c + ch];
            }
            yr[ch] = gate[ch] * acc;
        }
    }
    state.prev.copy_from_slice(&ext[m * c..]);
    Ok(())
}
