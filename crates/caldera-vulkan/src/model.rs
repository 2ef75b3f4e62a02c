//! Whole models on one device, behind [`caldera_model::Runner`]: every layer an optional
//! token mixer (attention, GatedDeltaNet, Mamba2, short conv) and an optional MLP (gated
//! dense, ungated relu², mixture of experts), each `x += post_norm(block(norm(x)))`.
//!
//! [`VkModel`] holds the weights, uploaded once in their quantized form; adjacent
//! projections of the same type and width (q|k|v, a recurrent mixer's inputs, gate|up)
//! become one tensor so they run as one mat-vec. [`VkRunner`] is one sequence: its f32
//! KV caches and recurrent states, scratch buffers and recordings. A step of `m` tokens
//! is a [`Recording`] made once per (bucket, logits) shape and replayed with ONE submit:
//! the step values (`m`, first position, logits rows) and the input embeddings live in
//! host-visible buffers written before the submit; no allocation, descriptor update or
//! pipeline creation happens per token.
//!
//! Decode (one token) per layer of llama / qwen3: q|k|v mat-vec (one dispatch per weight
//! type), `attn_decode` (q/k norm, RoPE, KV write, split attention, int8 output; or
//! `attn_dec`, `CALDERA_VK_ATTN_DEC=1`),
//! o-proj with the residual add, gate|up with the GLU, down with the residual add; each
//! int8 mat-vec quantizes the next one's input block by block (`MV_TAIL`; only the first
//! layer's input needs a `quant_x`); weight types without int8 kernels read f32 x and
//! norm it themselves (`mv.glsl`). Prefill (steps of up to CHUNK tokens): norm + QKV
//! (`Mm`: the tiled matmul), `rope_kv`, attention (`PrefillAttention`: flash attention
//! over the cache), o-proj + residual, norm + gate|up, GLU + down + residual.
//! Gemma's post-norms add one `add_norm` dispatch each.
//!
//! A recurrent mixer runs its input projections side by side into one row (the layout
//! of `recurrent.rs`), its decode op (one dispatch) or prefill op (whole chunk, on the
//! GPU), then its out-projection + residual. Its state lives in the runner, which
//! therefore cannot rewind except to the start (`truncate(0)` zeroes it). A relu² MLP
//! applies the activation in the up mat-vec (decode) or in `rows_act` (prefill); a MoE
//! runs `moe.rs` over its stacked experts: the router, the routing on the GPU and
//! mat-vecs over the chosen experts only (ids read from device memory), [`MoeFfn`] in
//! decode and [`MoeSteps`] (the same kernels over every token of the step) in prefill.
//! Qwen3.5's gated
//! attention uploads the gate rows of its q projection after v (`q | k | v | gate`):
//! `attn_decode` gates its output itself, prefill through `rows_act`.
//!
//! Gemma 4 and gpt-oss's attention: a KV-shared layer (`LayerExtras::kv_from`) uploads
//! its q projection only and reads its source layer's cache buffers (`attn_decode` /
//! `attn_batch` `F_NOKV`; `rope_kv` over q heads only); v norm is a flag of
//! `attn_decode` / `attn_batch` / `rope_kv`,
//! attention sinks a buffer of `attn_decode` / `PrefillAttention`; per-layer inputs,
//! layer output scales and biases are small ops of `extras.rs` around the layer.

use std::collections::HashMap;
use std::sync::Arc;

use caldera_format::quant;
use caldera_format::GgmlType;
use caldera_format::TensorBytes;
use caldera_model::blocks::gdn::GdnGates;
use caldera_model::blocks::moe::{MoeSpec, MoeWeights, RouterKind};
use caldera_model::weights::LayerExtras;
use caldera_model::{
    Activation, AttnSpec, AttnWeights, FfnSpec, FfnWeights, Logits, Mixer, MixerWeights, Model,
    RopeSpec, RopeStyle, RunError, Weight,
};

use crate::context::Context;
use crate::error::{Result, VkError};
use crate::extras::{PleIn, PleShape, RowExt, RowsExt, RowsIo};
use crate::kernels::{attn_dec_shape, attn_split, AttnDecShape, Kernel};
use crate::memory::{Buffer, DeviceTensor, MemoryKind};
use crate::moe::{MoeDevice, MoeFfn, MoeIo, MoeScratch, MoeSteps, MAX_EXPERTS, MAX_USED};
use crate::ops::{
    push_words, AttnIo, AttnShape, GluAct, HalfRows, Mm, MmIo, MmMode, Mv, MvMode, MvTail, Mvc,
    Mvq, Mvqn, PrefillAttention, Q8Acts, QuantRows, QuantX, RowAct, RowsAct,
};
use crate::record::{Binding, Recorder, Recording};
use crate::recurrent::{
    GdnDecode, GdnPrefill, Mamba2Decode, Mamba2Prefill, PrefillIo, RecurrentCols, RecurrentIo,
    RecurrentState, ShortConvDecode, ShortConvPrefill,
};

/// Most tokens per prefill step (the prefill bucket): the tiled matmul works on 64
/// tokens at a time, and a long step gives the GPU enough workgroups. A runner takes
/// fewer (down to [`MIN_CHUNK`]) when the scratch rows of that many tokens would not fit
/// one buffer of the device.
pub const CHUNK: usize = 512;
/// The fewest tokens per prefill step a runner accepts.
pub const MIN_CHUNK: usize = 32;

fn unsupported(what: String) -> VkError {
    VkError::Invalid(format!("the Vulkan backend does not run {what} yet"))
}

fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| VkError::Invalid(format!("{what} = {v} does not fit in 32 bits")))
}

/// A projection: one or more weights of one type and width, uploaded as one tensor.
struct Proj {
    ty: GgmlType,
    k: usize,
    /// First output element of this tensor within the fused output row.
    offset: usize,
    t: DeviceTensor,
}

impl Proj {
    fn bytes(&self) -> u64 {
        self.t.rows * self.t.row_bytes
    }
}

/// Attention on the device.
struct VkAttn {
    attn: AttnSpec,
    /// q | k | v (| gate, with `AttnSpec::q_gate`) output rows (one Proj per run of equal
    /// types). The gates come last so that q, k and v sit where the kernels expect them.
    qkv: Vec<Proj>,
    q_norm: Option<Buffer>,
    k_norm: Option<Buffer>,
    o: Proj,
    /// v heads are RMS-normalized (no weights) before caching (Gemma 4).
    v_norm: bool,
    /// The layer reads this earlier layer's KV cache and has no k / v of its own: `qkv`
    /// is q only (Gemma 4 KV sharing).
    kv_from: Option<usize>,
    /// A learned logit per query head joining the softmax (gpt-oss).
    sinks: Option<Buffer>,
    /// The q | k | v biases (zeros for an unbiased part), and the o-projection's.
    qkv_bias: Option<Buffer>,
    o_bias: Option<Buffer>,
}

impl VkAttn {
    /// Values of one token's q | k | v (| gate) row.
    fn ld_qkv(&self) -> usize {
        let a = &self.attn;
        if self.kv_from.is_some() {
            return a.n_heads * a.head_dim;
        }
        let gates = if a.q_gate { a.n_heads } else { 0 };
        (a.n_heads + 2 * a.n_kv_heads + gates) * a.head_dim
    }
}

/// Query heads per workgroup of `attn_decode` for groups of `gsize` query heads of `hd`:
/// at most 8, and their q rows fit the kernel's `Q_CAP` (2048 values).
fn decode_hpw(gsize: usize, hd: usize) -> usize {
    gsize.min(8).min(2048 / hd.max(1)).max(1)
}

/// Gemma 4's per-layer input block of one layer: `x += post_norm(proj(gelu_tanh(gate x)
/// * input_l))`.
struct VkPle {
    gate: Proj,
    proj: Proj,
    post_norm: Buffer,
}

/// Gemma 4's per-layer inputs: the model projection of the embeddings (the per-layer
/// token embeddings are looked up on the host, as the main ones), its norm and scales.
struct VkPleIn {
    model_proj: Proj,
    norm: Buffer,
    shape: PleShape,
}

/// A recurrent mixer (GatedDeltaNet, Mamba2, short conv) on the device: its input
/// projections write side by side into one row of `row` values, laid out as its op's
/// `proj` (`recurrent.rs`); the op writes `width` values, the input of `out`. The op's
/// vectors (conv taps, gates, norms) are read from the model's weights when a step is
/// recorded.
struct VkRecurrent {
    spec: Mixer,
    input: Vec<Proj>,
    row: usize,
    width: usize,
    /// Whether the decode op can write its output as int8 blocks for `out`.
    q8_out: bool,
    out: Proj,
}

/// What an MLP does between its up and down projections.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MlpAct {
    /// `act(gate) * up`: gate and up rows interleaved in `up` (row 2i gate i, 2i + 1 up
    /// i), pieces of whole pairs.
    Glu(GluAct),
    /// `relu(up)²`, no gate.
    Relu2,
}

struct VkMlp {
    d_ff: usize,
    act: MlpAct,
    up: Proj,
    down: Proj,
}

impl VkMlp {
    /// Values per token of the up projection's output.
    fn up_width(&self) -> usize {
        match self.act {
            MlpAct::Glu(_) => 2 * self.d_ff,
            MlpAct::Relu2 => self.d_ff,
        }
    }
}

enum VkMixer {
    Attention(VkAttn),
    Recurrent(VkRecurrent),
}

enum VkFfn {
    Dense(VkMlp),
    /// Stacked experts (`moe.rs`): decode runs [`MoeFfn`], prefill [`MoeSteps`].
    Moe(Box<MoeDevice>),
}

impl VkFfn {
    fn mlps(&self) -> Vec<&VkMlp> {
        match self {
            VkFfn::Dense(m) => vec![m],
            VkFfn::Moe(_) => Vec::new(),
        }
    }
}

struct VkLayer {
    norm: Option<Buffer>,
    mixer: Option<VkMixer>,
    post_norm: Option<Buffer>,
    ffn_norm: Option<Buffer>,
    ffn: Option<VkFfn>,
    ffn_post_norm: Option<Buffer>,
    /// Gemma 4's per-layer input block, after the FFN.
    ple: Option<VkPle>,
    /// The residual stream is multiplied by this at the end of the layer (Gemma 4).
    out_scale: Option<f32>,
}

impl VkLayer {
    /// Every projection of the layer.
    fn projs(&self) -> Vec<&Proj> {
        let mut v: Vec<&Proj> = Vec::new();
        match &self.mixer {
            Some(VkMixer::Attention(a)) => v.extend(a.qkv.iter().chain([&a.o])),
            Some(VkMixer::Recurrent(r)) => v.extend(r.input.iter().chain([&r.out])),
            None => {}
        }
        if let Some(f) = &self.ffn {
            for m in f.mlps() {
                v.extend([&m.up, &m.down]);
            }
        }
        if let Some(p) = &self.ple {
            v.extend([&p.gate, &p.proj]);
        }
        v
    }

    /// The norm and the projections of the mixer's first mat-vec.
    fn mixer_input(&self) -> Option<(Option<&Buffer>, Vec<&Proj>)> {
        let projs = match self.mixer.as_ref()? {
            VkMixer::Attention(a) => a.qkv.iter().collect(),
            VkMixer::Recurrent(r) => r.input.iter().collect(),
        };
        Some((self.norm.as_ref(), projs))
    }

    /// The norm and the projections of the FFN's first mat-vec that a decode mat-vec
    /// before it may quantize the input of (none for a MoE: see [`VkLayer::ffn_moe`]).
    fn ffn_input(&self) -> Option<(Option<&Buffer>, Vec<&Proj>)> {
        let projs = match self.ffn.as_ref()? {
            VkFfn::Dense(m) => vec![&m.up],
            VkFfn::Moe(_) => Vec::new(),
        };
        Some((self.ffn_norm.as_ref(), projs))
    }

    /// The FFN's MoE block, if it is one.
    fn ffn_moe(&self) -> Option<&MoeDevice> {
        match self.ffn.as_ref()? {
            VkFfn::Moe(m) => Some(m),
            VkFfn::Dense(_) => None,
        }
    }
}

/// A model's weights on one device, shared by every sequence ([`VkRunner`]) on it.
pub struct VkModel {
    ctx: Context,
    model: Arc<Model>,
    layers: Vec<VkLayer>,
    ple: Option<VkPleIn>,
    output_norm: Buffer,
    output: Proj,
    /// Ones, as wide as the widest projection input (the `gam` of un-normed mat-vecs).
    ones: Buffer,
    /// Bytes of weights uploaded.
    weight_bytes: u64,
}

fn upload_norm(ctx: &Context, w: &Option<Vec<f32>>) -> Result<Option<Buffer>> {
    w.as_ref().map(|v| ctx.upload_f32(v)).transpose()
}

/// Uploads `ws` (the output rows of one fused projection, in order): each maximal run of
/// the same type becomes one tensor.
fn upload_proj(ctx: &Context, ws: &[&Weight]) -> Result<Vec<Proj>> {
    upload_proj_biased(ctx, ws, false)
}

/// [`upload_proj`], leaving the weights' biases to the caller when `biased` (else a
/// bias is refused).
fn upload_proj_biased(ctx: &Context, ws: &[&Weight], biased: bool) -> Result<Vec<Proj>> {
    let mut out = Vec::new();
    let mut i = 0;
    let mut offset = 0;
    while i < ws.len() {
        let (ty, k) = (ws[i].ty, ws[i].cols);
        let mut j = i;
        while j < ws.len() && ws[j].ty == ty && ws[j].cols == k {
            j += 1;
        }
        for w in &ws[i..j] {
            if w.bias.is_some() && !biased {
                return Err(unsupported(format!("biased projections ({})", w.name)));
            }
            if Kernel::mm_for(w.ty, false).is_none() {
                return Err(unsupported(format!("tensor type {} ({})", w.ty, w.name)));
            }
        }
        let row_bytes = ty
            .row_bytes(k as u64)
            .ok_or_else(|| VkError::Invalid(format!("{}: rows of {k} {ty}", ws[i].name)))?;
        let parts: Vec<&[u8]> = ws[i..j].iter().map(|w| w.bytes()).collect();
        if parts
            .iter()
            .zip(&ws[i..j])
            .any(|(p, w)| Some(p.len() as u64) != (w.rows as u64).checked_mul(row_bytes))
        {
            return Err(VkError::Invalid(format!(
                "{}: size does not match its shape",
                ws[i].name
            )));
        }
        let t = ctx.upload_rows_concat(&parts, row_bytes)?;
        let rows = t.rows as usize;
        out.push(Proj { ty, k, offset, t });
        offset += rows;
        i = j;
    }
    Ok(out)
}

/// Uploads a gated MLP's gate and up weights as one tensor of interleaved rows (gate i,
/// up i), so one decode mat-vec makes `act(gate) * up` and a prefill mat-vec writes the
/// pairs its down projection reads. Both must be of one type and width.
fn upload_glu(ctx: &Context, gate: &Weight, up: &Weight) -> Result<Proj> {
    if gate.ty != up.ty || gate.cols != up.cols || gate.rows != up.rows {
        return Err(unsupported(format!(
            "gate and up projections of different types or shapes ({} {}, {} {})",
            gate.name, gate.ty, up.name, up.ty
        )));
    }
    for w in [gate, up] {
        if w.bias.is_some() {
            return Err(unsupported(format!("biased projections ({})", w.name)));
        }
    }
    let (ty, k) = (gate.ty, gate.cols);
    if Kernel::mm_for(ty, false).is_none() {
        return Err(unsupported(format!("tensor type {ty} ({})", gate.name)));
    }
    let rb = ty
        .row_bytes(k as u64)
        .ok_or_else(|| VkError::Invalid(format!("{}: rows of {k} {ty}", gate.name)))?
        as usize;
    let (g, u) = (gate.bytes(), up.bytes());
    if g.len() != gate.rows * rb || u.len() != up.rows * rb {
        return Err(VkError::Invalid(format!(
            "{}: size does not match its shape",
            gate.name
        )));
    }
    let mut both = Vec::with_capacity(2 * g.len());
    for (gr, ur) in g.chunks_exact(rb).zip(u.chunks_exact(rb)) {
        both.extend_from_slice(gr);
        both.extend_from_slice(ur);
    }
    let t = ctx.upload_rows_grouped(&[&both], rb as u64, 2)?;
    Ok(Proj {
        ty,
        k,
        offset: 0,
        t,
    })
}

/// `q`'s rows (per head: hd query rows, then hd gate rows) as two weights, the queries
/// and the gates, so that the gates can follow k and v in the fused projection.
fn split_q_gate(q: &Weight, nh: usize, hd: usize) -> Result<(Weight, Weight)> {
    if q.bias.is_some() {
        return Err(unsupported(format!("biased projections ({})", q.name)));
    }
    let bytes = q.bytes();
    if q.rows != 2 * nh * hd || q.rows == 0 || !bytes.len().is_multiple_of(q.rows) {
        return Err(VkError::Invalid(format!(
            "{}: {} rows for {nh} gated heads of {hd}",
            q.name, q.rows
        )));
    }
    let rb = bytes.len() / q.rows;
    let (mut qa, mut ga) = (
        Vec::with_capacity(bytes.len() / 2),
        Vec::with_capacity(bytes.len() / 2),
    );
    for head in bytes.chunks_exact(2 * hd * rb) {
        qa.extend_from_slice(&head[..hd * rb]);
        ga.extend_from_slice(&head[hd * rb..]);
    }
    let part = |name: &str, data: Vec<u8>| Weight {
        name: format!("{} ({name})", q.name),
        ty: q.ty,
        rows: nh * hd,
        cols: q.cols,
        data: TensorBytes::from_vec(data),
        bias: None,
    };
    Ok((part("queries", qa), part("gates", ga)))
}

/// The checks and uploads of one attention mixer.
fn upload_attention(
    ctx: &Context,
    li: usize,
    a: &AttnSpec,
    aw: &AttnWeights,
    ex: &LayerExtras,
) -> Result<VkAttn> {
    if a.n_kv_heads == 0
        || !a.n_heads.is_multiple_of(a.n_kv_heads)
        || a.head_dim > 512
        || !a.head_dim.is_multiple_of(4)
    {
        return Err(unsupported(format!(
            "layer {li}: {} heads over {} kv heads of {}",
            a.n_heads, a.n_kv_heads, a.head_dim
        )));
    }
    if let Some(why) = ctx.tuning().kv.unsupported_head(a.head_dim) {
        return Err(unsupported(format!("layer {li}: {why}")));
    }
    if let Some(r) = &a.rope {
        if r.n_dims % 2 != 0 || r.n_dims > a.head_dim {
            return Err(VkError::Invalid(format!(
                "layer {li}: RoPE over {} dims",
                r.n_dims
            )));
        }
    }
    let qd = a.n_heads * a.head_dim;
    let kvd = a.n_kv_heads * a.head_dim;
    let q_rows = if a.q_gate { 2 * qd } else { qd };
    if aw.q.rows != q_rows || aw.k.rows != kvd || aw.v.rows != kvd || aw.o.cols != qd {
        return Err(VkError::Invalid(format!("layer {li}: attention shapes")));
    }
    let sinks = match (a.sinks, &aw.sinks) {
        (false, _) => None,
        (true, Some(v)) if v.len() == a.n_heads => Some(ctx.upload_f32(v)?),
        (true, _) => {
            return Err(VkError::Invalid(format!(
                "layer {li}: attention sinks are not one per head"
            )))
        }
    };
    let biased = [&aw.q, &aw.k, &aw.v].iter().any(|w| w.bias.is_some());
    if (biased || aw.o.bias.is_some()) && (a.q_gate || ex.kv_from.is_some()) {
        return Err(unsupported(format!(
            "layer {li}: biased projections with gated or KV-shared attention"
        )));
    }
    if ex.kv_from.is_some() && a.q_gate {
        return Err(unsupported(format!(
            "layer {li}: gated KV-shared attention"
        )));
    }
    let qkv_bias = if biased {
        let mut b = Vec::with_capacity(qd + 2 * kvd);
        for w in [&aw.q, &aw.k, &aw.v] {
            match &w.bias {
                Some(v) if v.len() == w.rows => b.extend_from_slice(v),
                Some(_) => return Err(VkError::Invalid(format!("{}: bias size", w.name))),
                None => b.resize(b.len() + w.rows, 0.0),
            }
        }
        Some(ctx.upload_f32(&b)?)
    } else {
        None
    };
    let o_bias = match &aw.o.bias {
        Some(v) if v.len() == aw.o.rows => Some(ctx.upload_f32(v)?),
        Some(_) => return Err(VkError::Invalid(format!("{}: bias size", aw.o.name))),
        None => None,
    };
    let qkv = if ex.kv_from.is_some() {
        upload_proj(ctx, &[&aw.q])?
    } else if a.q_gate {
        let (q, gate) = split_q_gate(&aw.q, a.n_heads, a.head_dim)?;
        upload_proj(ctx, &[&q, &aw.k, &aw.v, &gate])?
    } else {
        upload_proj_biased(ctx, &[&aw.q, &aw.k, &aw.v], true)?
    };
    Ok(VkAttn {
        attn: a.clone(),
        qkv,
        q_norm: upload_norm(ctx, &aw.q_norm)?,
        k_norm: upload_norm(ctx, &aw.k_norm)?,
        o: upload_proj_biased(ctx, &[&aw.o], true)?.remove(0),
        v_norm: ex.v_norm,
        kv_from: ex.kv_from,
        sinks,
        qkv_bias,
        o_bias,
    })
}

/// The uploads of one recurrent mixer: its input projections in its op's `proj` order,
/// and its out-projection.
fn upload_recurrent(
    ctx: &Context,
    li: usize,
    spec: &Mixer,
    mw: &MixerWeights,
    d: usize,
) -> Result<VkRecurrent> {
    let (input, row, width, q8_out, out): (Vec<&Weight>, usize, usize, bool, &Weight) =
        match (spec, mw) {
            (Mixer::GatedDeltaNet(s), MixerWeights::GatedDeltaNet(w)) => {
                let mut input = vec![&w.qkv, &w.gate];
                match &w.gates {
                    GdnGates::Separate { beta, alpha } => input.extend([beta, alpha]),
                    GdnGates::Fused(ba) => input.push(ba),
                }
                let vd = s.value_dim();
                let row = s.conv_dim() + vd + 2 * s.n_v_heads;
                (input, row, vd, s.head_v_dim.is_multiple_of(32), &w.out)
            }
            (Mixer::Mamba2(s), MixerWeights::Mamba2(w)) => {
                let di = s.d_inner();
                let unit = di / s.n_groups.max(1);
                let q8 = unit.is_multiple_of(32) && di.is_multiple_of(s.n_groups.max(1));
                (vec![&w.in_proj], s.in_proj_rows(), di, q8, &w.out_proj)
            }
            (Mixer::ShortConv(s), MixerWeights::ShortConv(w)) => (
                vec![&w.in_proj],
                3 * s.channels,
                s.channels,
                false,
                &w.out_proj,
            ),
            _ => return Err(VkError::Invalid(format!("layer {li}: mismatched mixer"))),
        };
    let rows: usize = input.iter().map(|w| w.rows).sum();
    if rows != row || input.iter().any(|w| w.cols != d) || out.cols != width || out.rows != d {
        return Err(VkError::Invalid(format!(
            "layer {li}: recurrent mixer projection shapes"
        )));
    }
    Ok(VkRecurrent {
        spec: spec.clone(),
        input: upload_proj(ctx, &input)?,
        row,
        width,
        q8_out,
        out: upload_proj(ctx, &[out])?.remove(0),
    })
}

/// An MLP `down(act(gate x, up x))` of activation `act`.
fn upload_mlp(
    ctx: &Context,
    what: &str,
    gate: Option<&Weight>,
    up: &Weight,
    down: &Weight,
    act: Activation,
) -> Result<VkMlp> {
    let d_ff = up.rows;
    if down.cols != d_ff || gate.is_some_and(|g| g.rows != d_ff || g.cols != up.cols) {
        return Err(VkError::Invalid(format!("{what}: MLP shapes")));
    }
    let (act, up) = match (act, gate) {
        (Activation::Relu2, _) => (MlpAct::Relu2, upload_proj(ctx, &[up])?.remove(0)),
        (Activation::SwiGlu, Some(g)) => (MlpAct::Glu(GluAct::Silu), upload_glu(ctx, g, up)?),
        (Activation::GeluTanhGlu, Some(g)) => {
            (MlpAct::Glu(GluAct::GeluTanh), upload_glu(ctx, g, up)?)
        }
        (other, _) => {
            return Err(unsupported(format!(
                "{what}: activation {other:?} (gate {})",
                gate.is_some()
            )))
        }
    };
    Ok(VkMlp {
        d_ff,
        act,
        up,
        down: upload_proj(ctx, &[down])?.remove(0),
    })
}

fn upload_moe(ctx: &Context, li: usize, spec: &MoeSpec, w: &MoeWeights) -> Result<MoeDevice> {
    let n = spec.n_experts as u64;
    if n == 0 || n > MAX_EXPERTS || spec.n_used == 0 || spec.n_used as u64 > n.min(MAX_USED) {
        return Err(unsupported(format!(
            "layer {li}: {} of {n} experts",
            spec.n_used
        )));
    }
    if w.selection_bias.is_some() && !matches!(spec.router, RouterKind::Sigmoid { .. }) {
        return Err(unsupported(format!(
            "layer {li}: a selection bias without a sigmoid router"
        )));
    }
    MoeDevice::upload(ctx, spec, w).map_err(|e| VkError::Invalid(format!("layer {li}: {e}")))
}

impl VkModel {
    /// Uploads `model`'s weights to the device of `ctx`. Fails for architectures whose
    /// blocks this backend does not run yet.
    pub fn new(ctx: Context, model: Arc<Model>) -> Result<VkModel> {
        let cfg = &model.config;
        let w = &model.weights;
        let d = cfg.d_model;
        let n_layers = cfg.layers.len();
        let no_extras = LayerExtras::default();
        let ple = match &model.extras.per_layer_inputs {
            None => None,
            Some(pl) => {
                let row = n_layers * pl.d;
                if pl.layers.len() != n_layers
                    || pl.model_proj.rows != row
                    || pl.model_proj.cols != d
                    || pl.tok_embd.cols != row
                    || pl.proj_norm.len() != pl.d
                {
                    return Err(VkError::Invalid("per-layer input shapes".into()));
                }
                Some(VkPleIn {
                    model_proj: upload_proj(&ctx, &[&pl.model_proj])?.remove(0),
                    norm: ctx.upload_f32(&pl.proj_norm)?,
                    shape: PleShape {
                        n_layers,
                        dpl: pl.d,
                        eps: cfg.norm_eps,
                        proj_scale: pl.proj_scale,
                        tok_scale: pl.tok_scale,
                        input_scale: pl.input_scale,
                    },
                })
            }
        };
        let mut layers: Vec<VkLayer> = Vec::with_capacity(n_layers);
        for (li, (spec, lw)) in cfg.layers.iter().zip(&w.layers).enumerate() {
            let ex = model.extras.layers.get(li).unwrap_or(&no_extras);
            if (ex.v_norm || ex.kv_from.is_some())
                && !matches!(spec.mixer, Some(Mixer::Attention(_)))
            {
                return Err(VkError::Invalid(format!(
                    "layer {li}: v norm or KV sharing without attention"
                )));
            }
            if let Some(src) = ex.kv_from {
                // The source must be an earlier attention layer with the same cache rows.
                let same = match (layers.get(src).and_then(|l| l.mixer.as_ref()), &spec.mixer) {
                    (Some(VkMixer::Attention(sa)), Some(Mixer::Attention(a))) => {
                        sa.kv_from.is_none()
                            && sa.attn.n_kv_heads == a.n_kv_heads
                            && sa.attn.head_dim == a.head_dim
                    }
                    _ => false,
                };
                if !same {
                    return Err(VkError::Invalid(format!(
                        "layer {li}: its KV source layer {src} is not an earlier attention \
                         layer of the same KV shape"
                    )));
                }
            }
            let mixer = match (&spec.mixer, &lw.mixer) {
                (None, None) => None,
                (Some(Mixer::Attention(a)), Some(MixerWeights::Attention(aw))) => {
                    Some(VkMixer::Attention(upload_attention(&ctx, li, a, aw, ex)?))
                }
                (Some(mixer), Some(mw)) => Some(VkMixer::Recurrent(upload_recurrent(
                    &ctx, li, mixer, mw, d,
                )?)),
                _ => return Err(VkError::Invalid(format!("layer {li}: mismatched mixer"))),
            };
            let ffn = match (&spec.ffn, &lw.ffn) {
                (None, None) => None,
                (Some(FfnSpec::Dense { d_ff, act }), Some(FfnWeights::Dense(fw))) => {
                    if fw.up.rows != *d_ff {
                        return Err(VkError::Invalid(format!("layer {li}: MLP shapes")));
                    }
                    let what = format!("layer {li}");
                    Some(VkFfn::Dense(upload_mlp(
                        &ctx,
                        &what,
                        fw.gate.as_ref(),
                        &fw.up,
                        &fw.down,
                        *act,
                    )?))
                }
                (Some(FfnSpec::Moe(ms)), Some(FfnWeights::Moe(mw))) => {
                    if lw.ffn_post_norm.is_some() {
                        return Err(unsupported(format!(
                            "layer {li}: a post-norm after a mixture of experts"
                        )));
                    }
                    Some(VkFfn::Moe(Box::new(upload_moe(&ctx, li, ms, mw)?)))
                }
                _ => return Err(VkError::Invalid(format!("layer {li}: mismatched MLP"))),
            };
            if let Some(VkMixer::Attention(a)) = &mixer {
                if a.o_bias.is_some() && lw.post_norm.is_some() {
                    return Err(unsupported(format!(
                        "layer {li}: a biased o-projection before a post-norm"
                    )));
                }
            }
            let ple = match model.extras.per_layer_inputs.as_ref() {
                None => None,
                Some(pl) => {
                    let b = &pl.layers[li];
                    if b.gate.rows != pl.d
                        || b.gate.cols != d
                        || b.proj.rows != d
                        || b.proj.cols != pl.d
                        || b.post_norm.len() != d
                    {
                        return Err(VkError::Invalid(format!(
                            "layer {li}: per-layer input block shapes"
                        )));
                    }
                    Some(VkPle {
                        gate: upload_proj(&ctx, &[&b.gate])?.remove(0),
                        proj: upload_proj(&ctx, &[&b.proj])?.remove(0),
                        post_norm: ctx.upload_f32(&b.post_norm)?,
                    })
                }
            };
            layers.push(VkLayer {
                norm: upload_norm(&ctx, &lw.norm)?,
                mixer,
                post_norm: upload_norm(&ctx, &lw.post_norm)?,
                ffn_norm: upload_norm(&ctx, &lw.ffn_norm)?,
                ffn,
                ffn_post_norm: upload_norm(&ctx, &lw.ffn_post_norm)?,
                ple,
                out_scale: ex.out_scale,
            });
        }
        let output = upload_proj(&ctx, &[&w.output])?.remove(0);
        let output_norm = ctx.upload_f32(&w.output_norm)?;
        let all: Vec<&Proj> = layers
            .iter()
            .flat_map(|l| l.projs())
            .chain([&output])
            .chain(ple.as_ref().map(|p| &p.model_proj))
            .collect();
        let experts: u64 = layers
            .iter()
            .filter_map(|l| match &l.ffn {
                Some(VkFfn::Moe(m)) => Some(m.bytes()),
                _ => None,
            })
            .sum();
        let weight_bytes = all.iter().map(|p| p.bytes()).sum::<u64>() + experts;
        let widest = all.iter().map(|p| p.k).max().unwrap_or(1);
        let ones = ctx.upload_f32(&vec![1.0; widest])?;
        Ok(VkModel {
            ctx,
            model,
            layers,
            ple,
            output_norm,
            output,
            ones,
            weight_bytes,
        })
    }

    pub fn context(&self) -> &Context {
        &self.ctx
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Bytes of weights held on the device.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Bytes of K and V cache that a runner of `tokens` positions holds (in the
    /// context's [`crate::KvType`]; layers reading another layer's cache hold none).
    pub fn kv_cache_bytes(&self, tokens: usize) -> u64 {
        let kv = self.ctx.tuning().kv;
        self.layers
            .iter()
            .map(|l| match &l.mixer {
                Some(VkMixer::Attention(a)) if a.kv_from.is_none() => {
                    let kvd = a.attn.n_kv_heads * a.attn.head_dim;
                    2 * kv.bytes(tokens as u64 * kvd as u64)
                }
                _ => 0,
            })
            .sum()
    }

    /// Per layer, the (conv, S) values per sequence of its recurrent state (`None`
    /// without a recurrent mixer).
    pub(crate) fn state_sizes(&self) -> Result<Vec<Option<(usize, usize)>>> {
        self.layers
            .iter()
            .map(|l| match &l.mixer {
                Some(VkMixer::Recurrent(r)) => RecurrentState::sizes(&r.spec).map(Some),
                _ => Ok(None),
            })
            .collect()
    }

    /// Per layer, the K (= V) values per position of its cache (`None` without one: no
    /// attention, or a layer reading an earlier layer's cache, Gemma 4's KV sharing).
    pub(crate) fn kv_widths(&self) -> Vec<Option<usize>> {
        self.layers
            .iter()
            .map(|l| match &l.mixer {
                Some(VkMixer::Attention(a)) if a.kv_from.is_none() => {
                    Some(a.attn.n_kv_heads * a.attn.head_dim)
                }
                _ => None,
            })
            .collect()
    }
}

/// Counts of what one runner did (for `bench`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepStats {
    /// Dispatches in the recorded one-token (decode) step; 0 before the first decode.
    pub decode_dispatches: u32,
    /// Queue submits per decode step.
    pub decode_submits: u32,
    /// Layers of the model.
    pub layers: u32,
    /// Steps (submits of a recording) and tokens run so far.
    pub steps: u64,
    pub tokens: u64,
}

/// The recorded ops of one step shape.
struct Step {
    rec: Recording,
}

/// One sequence on a [`VkModel`]: KV caches, recurrent states, scratch buffers, recorded
/// steps.
pub struct VkRunner {
    m: Arc<VkModel>,
    cap: usize,
    len: usize,
    /// Host-visible step values: `[tokens, first position, first logits token, logits tokens]`.
    step: Buffer,
    /// Their device copy, made at the start of every step: kernels read it (not the
    /// host-visible one, which would be a bus read per workgroup).
    step_dev: Buffer,
    /// Tokens per prefill step (a power of two, MIN_CHUNK..=CHUNK): scratch rows.
    chunk: usize,
    /// Host-visible input embeddings, `chunk` rows of d_model.
    x_in: Buffer,
    x: Buffer,
    tmp: Buffer,
    /// Attention's q | k | v rows, or a recurrent mixer's projection rows.
    qkv: Buffer,
    /// The mixer's output rows (the out-projection's input).
    att: Buffer,
    gu: Buffer,
    /// Scratch of the MoE layers' prefill steps.
    moe: Option<MoeScratch>,
    /// Stored-output counts per block of 32 of the decode mat-vecs that quantize the
    /// next input (`MV_TAIL`).
    tail_count: Buffer,
    /// Decode attention's per-split partials and its per-(kv head, chunk) counts.
    attn_part: Buffer,
    attn_count: Buffer,
    /// Int8 activations of the decode mat-vecs, two pairs (a mat-vec reads one and
    /// quantizes the next input into the other): values, scales, per-block sums of
    /// squares.
    xq: [Buffer; 2],
    xd: [Buffer; 2],
    xss: [Buffer; 2],
    /// The block sums of int8 pair 0's values in a batched step (`quant_rows` writes
    /// them for the `Mvqn` right after it, which reads them instead of summing itself).
    xsum: Buffer,
    /// A batched step's columns in f16 for the cooperative-matrix mat-vecs ([`Mvc`]:
    /// all 16 columns of the widest input; one word where they do not run).
    xh: Buffer,
    /// K and V caches of the attention layers: pools of pages (`kv.glsl`'s paging).
    kv: Vec<Option<(Buffer, Buffer)>>,
    /// The page table the kernels bind (u32 page ids; the identity for a runner with
    /// caches of its own; a [`VkBatch`](crate::VkBatch) sequence's: a view of its slot's
    /// entries of the batch's table; the batched runner's: every slot's).
    kv_table: Buffer,
    /// Where the step copies `kv_table` from at its start (host-visible buffer, byte
    /// offset, bytes): the batch's host copy of the tables, which it updates as pages
    /// are taken and given back (`None` for the identity table).
    kv_table_src: Option<(Buffer, u64, u64)>,
    /// The recurrent mixers' states (zeroed at position 0).
    states: Vec<Option<RecurrentState>>,
    /// RoPE table per layer (shared between layers with equal specs).
    rope: Vec<Option<Buffer>>,
    /// Gemma 4's per-layer inputs.
    ple: Option<PleBufs>,
    /// Logits of one row (device, host-visible copy) and of `all_rows` rows.
    logits1: (Buffer, Buffer),
    logits_all: Option<(Buffer, Buffer)>,
    all_rows: usize,
    /// Greedy steps' token ids (device, host-visible copy; u32 per logits row, `all_rows`
    /// of them), made by the first greedy recording.
    ids: Option<(Buffer, Buffer)>,
    /// Recorded steps by (bucket, logits rows, greedy: `argmax` on the device and only
    /// the ids copied back).
    steps: HashMap<(usize, Head, bool), Step>,
    stats: StepStats,
    embed_row: Vec<f32>,
    embed_bytes: Vec<u8>,
    /// `CALDERA_VK_TRACE` set: print each step's time (read once, not per token).
    trace: bool,
    /// Decode mat-vecs quantize the next input block by block (`MV_TAIL`) instead of a
    /// `quant_x` dispatch: 5-6 dispatches per layer instead of 8-9.
    /// `CALDERA_VK_FUSE_QUANT=0` turns it off.
    fuse_quant: bool,
    /// Whether the gate|up mat-vec quantizes the down projection's input in its tail
    /// (with `fuse_quant`); `CALDERA_VK_FUSE_GLU_QUANT=0` runs a `quant_x` instead.
    fuse_glu_quant: bool,
    /// Decode MoE blocks route in the router mat-vec's dispatch (`mvr_*`), take their
    /// input quantized by the mat-vec before (its tail with the block's norm) and
    /// quantize their output for the next one (the last down projection's tail): 3
    /// dispatches per MoE block without a shared expert instead of 5, and no `quant`
    /// before the next layer. `CALDERA_VK_MOE_UNFUSED=1` runs the earlier sequence
    /// (router mat-vec + `quant_x`, `moe_route`, gate|up, down; the next layer's
    /// `quant_x`).
    moe_fused: bool,
    /// A step's LM head over one row runs the decode mat-vecs (see `record_step`);
    /// `CALDERA_VK_HEAD_MM=1` keeps the step's matmul (`mm.glsl` over the row) there.
    head_mm: bool,
    /// `CALDERA_VK_PROFILE=1`: decode steps write GPU timestamps after every op.
    profile: bool,
    /// Profiling only: `CALDERA_VK_ATTN_STOP=1|2` ends decode attention after its q/k
    /// preparation | its softmax-weighted values (wrong output); read once.
    attn_stop: u32,
    /// Decode attention's launch shape: query heads per workgroup (at most 8) and
    /// positions per split (8 to 128); `CALDERA_VK_ATTN_HPW` / `CALDERA_VK_ATTN_SPLIT`
    /// override the defaults (8, and [`attn_split`] of the capacity) for tuning. The
    /// split is `attn_decode`'s (and `attn_batch`'s); `attn_dec` takes its own below.
    attn_hpw: usize,
    attn_split: usize,
    /// Single-sequence `attn_decode` on a group that fits one workgroup: chunks of
    /// `attn_hpw_small` query heads (`CALDERA_VK_ATTN_HPW_SMALL`, default 2), merged
    /// into one chunk per kv head from `attn_merge` splits in use on
    /// (`CALDERA_VK_ATTN_MERGE`, default 8; 0: never merge, the chunks of
    /// `CALDERA_VK_ATTN_HPW` throughout as before).
    attn_hpw_small: usize,
    attn_merge: usize,
    /// Single-sequence `attn_decode`: at most this many splits per (kv head, chunk)
    /// where longer splits (up to 128 positions) fit, chosen per step from the context
    /// (flags bits 24-31; `CALDERA_VK_ATTN_TARGET`, 0: the fixed `attn_split`).
    attn_target: usize,
    /// Decode attention runs `attn_dec` (lane-parallel, block size picked on the device;
    /// `attn_dec_batch` in batched steps) with `CALDERA_VK_ATTN_DEC=1` where the device
    /// can run it (shared memory) and a layer's layout fits it ([`attn_dec_shape`]);
    /// else `attn_decode` (`attn_batch`), the default: `attn_dec` measured slower on the
    /// H200 at short contexts and no faster at 4k (docs/BENCHMARKS.md, session 5). Its
    /// knobs: `CALDERA_VK_ATTN_SPLIT` (fewest positions per block, rounded up to its
    /// tile; default one tile) and `CALDERA_VK_ATTN_SPLITS` (most blocks per kv head and
    /// chunk; default [`crate::kernels::ATTN_DEC_BLOCKS`]), both 0 here when unset.
    attn_new: bool,
    attn_dec_split: usize,
    attn_dec_blocks: usize,
    /// Device nanoseconds per op label (total, count) over `profile_steps` decode steps.
    profile_ns: HashMap<&'static str, (f64, u64)>,
    profile_steps: u64,
    /// The batched-decode runner of a [`VkBatch`](crate::VkBatch): its steps are
    /// columns of different sequences (`attn_batch` over the pooled caches).
    batch: Option<BatchMode>,
    /// The pool slot of a [`VkBatch`](crate::VkBatch) whose page table this runner's
    /// KV caches go through (freed when the runner is dropped).
    pub(crate) lease: Option<crate::batch::SlotLease>,
}

/// A page table that a [`VkBatch`](crate::VkBatch) keeps: the device buffer (or view)
/// the kernels bind, and where each step copies it from (a host-visible buffer, byte
/// offset, bytes).
pub(crate) struct PageTable {
    pub(crate) dev: Buffer,
    pub(crate) host: Buffer,
    pub(crate) host_at: u64,
    pub(crate) bytes: u64,
}

/// Where a runner's KV caches and recurrent states come from.
pub(crate) enum KvSource {
    /// Its own buffers (and an identity page table).
    Own,
    /// Per layer, the page pools of a batch (`None` for layers without attention), the
    /// sequence's page table in it, and views of its slot's recurrent states (`None`
    /// without a recurrent mixer).
    Views {
        kv: Vec<Option<(Buffer, Buffer)>>,
        states: Vec<Option<RecurrentState>>,
        table: PageTable,
    },
    /// A batched-decode runner of up to `cols` columns over the whole pools and every
    /// slot's page table (`slot_pages` entries a slot), and per recurrent layer its
    /// state pools and their (conv, S) values per slot.
    Batch {
        pool: Vec<Option<(Buffer, Buffer)>>,
        states: Vec<Option<RecurrentState>>,
        state_strides: Vec<(usize, usize)>,
        slots: usize,
        cols: usize,
        slot_pages: u32,
        table: PageTable,
        mm: BatchMm,
    },
}

/// Which mat-vec kernels a batched decode step's weights go through
/// (`CALDERA_VK_BATCH_MM`): `auto` (default) and `mvq`: the batched int8 mat-vec
/// (`quant_rows` + `mvqm`: each weight block read once per 8 columns, int8 dot
/// products as the single-sequence decode) for the types it has (Q4_0, Q8_0, Q4_K,
/// Q6_K; where the context quantizes activations), else the tiled matmul; `mmt`: the
/// tiled matmul for every weight (one pass for up to 64 columns, each weight block
/// dequantized once into shared memory, but a whole 64-token tile of arithmetic);
/// `mm`: the batched mat-vec (`mm.glsl`, 8 columns per pass, f32 activations; on the
/// H100 it ran a 12288 x 4096 matmul at 0.25 TFLOP/s against mmt's 24.8). Chosen by
/// reasoning, not measurement of this step: this switch is there to time them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchMm {
    Auto,
    Rowwise,
    Tiled,
    Q8,
}

impl BatchMm {
    pub fn from_env() -> BatchMm {
        match std::env::var("CALDERA_VK_BATCH_MM").as_deref() {
            Ok("mm") => BatchMm::Rowwise,
            Ok("mmt") => BatchMm::Tiled,
            Ok("mvq") => BatchMm::Q8,
            _ => BatchMm::Auto,
        }
    }
}

struct BatchMode {
    cols: usize,
    /// Page-table entries per pool slot.
    slot_pages: u32,
    /// Per layer, the (conv, S) values per pool slot of its recurrent state pools.
    state_strides: Vec<(usize, usize)>,
    slots: usize,
    mm: BatchMm,
}

impl BatchMode {
    fn rowwise(&self, tokens: u64) -> bool {
        match self.mm {
            BatchMm::Rowwise => true,
            BatchMm::Tiled => false,
            BatchMm::Auto | BatchMm::Q8 => tokens <= 1,
        }
    }
}

/// A runner's buffers for Gemma 4's per-layer inputs.
struct PleBufs {
    /// Host-visible per-layer token embeddings of the step's tokens (`[token][layer *
    /// dpl]`), and their device copy made at the start of every step.
    tok_in: Buffer,
    tok: Buffer,
    /// The per-layer inputs (`ple_in`), same layout.
    pli: Buffer,
    /// One layer's gate rows (`[token][dpl]`).
    g: Buffer,
    /// One dequantized embedding row.
    row_buf: Vec<f32>,
}

/// (cos, sin) pairs for positions `0..cap`, as the CPU reference computes them.
fn rope_table(spec: &RopeSpec, cap: usize) -> Vec<f32> {
    let half = spec.n_dims / 2;
    let mut out = Vec::with_capacity(cap * half * 2);
    for pos in 0..cap {
        let p = pos as f64 / spec.linear_scale as f64;
        for i in 0..half {
            let mut inv_freq = (spec.theta as f64).powf(-(2.0 * i as f64) / spec.n_dims as f64);
            if let Some(ff) = &spec.freq_factors {
                inv_freq /= ff.get(i).copied().unwrap_or(1.0) as f64;
            }
            let (s, c) = (p * inv_freq).sin_cos();
            out.push((c * spec.mscale as f64) as f32);
            out.push((s * spec.mscale as f64) as f32);
        }
    }
    out
}

fn same_rope(a: &RopeSpec, b: &RopeSpec) -> bool {
    a.style == b.style
        && a.n_dims == b.n_dims
        && a.theta == b.theta
        && a.linear_scale == b.linear_scale
        && a.freq_factors == b.freq_factors
        && a.mscale == b.mscale
}

impl VkRunner {
    /// A sequence of up to `cap` tokens.
    pub fn new(m: Arc<VkModel>, cap: usize) -> Result<VkRunner> {
        Self::build(m, cap, KvSource::Own)
    }

    /// A runner whose KV caches come from `src`.
    pub(crate) fn build(m: Arc<VkModel>, cap: usize, src: KvSource) -> Result<VkRunner> {
        let ctx = &m.ctx;
        let cfg = &m.model.config;
        let d = cfg.d_model;
        let cap = cap.max(1);
        let dev = |n: usize, what: &str| -> Result<Buffer> {
            let bytes = (n.max(1) as u64)
                .checked_mul(4)
                .ok_or_else(|| VkError::Invalid(format!("{what}: size overflows")))?;
            if bytes > ctx.max_buffer_bytes() {
                return Err(VkError::Invalid(format!(
                    "{what} needs {bytes} bytes, more than one buffer may hold on {} ({}); \
                     use a smaller context (--ctx)",
                    ctx.info().name,
                    ctx.max_buffer_bytes()
                )));
            }
            ctx.create_buffer(bytes, MemoryKind::Device)
        };
        let mut max_qkv = 0;
        let mut max_q = 0;
        let mut max_ff = 0;
        let mut max_in = d;
        let mut moe_row = 0usize;
        for l in &m.layers {
            match &l.mixer {
                Some(VkMixer::Attention(a)) => {
                    max_qkv = max_qkv.max(a.ld_qkv());
                    max_q = max_q.max(a.attn.n_heads * a.attn.head_dim);
                }
                Some(VkMixer::Recurrent(r)) => {
                    max_qkv = max_qkv.max(r.row);
                    max_q = max_q.max(r.width);
                }
                None => {}
            }
            if let Some(f) = &l.ffn {
                for mlp in f.mlps() {
                    max_ff = max_ff.max(mlp.d_ff);
                }
                if let VkFfn::Moe(moe) = f {
                    // h per (token, slot), and the grouped down projection's outputs.
                    let row = moe.up.outputs().max(moe.d_model) as usize;
                    moe_row = moe_row.max(moe.spec.n_used * row);
                }
            }
            max_in = max_in.max(l.projs().iter().map(|p| p.k).max().unwrap_or(0));
        }
        // The widest scratch row decides how many tokens a step holds.
        let widest_row = d.max(max_qkv).max(2 * max_ff).max(moe_row) as u64 * 4;
        let mut chunk = CHUNK;
        while chunk > MIN_CHUNK && chunk as u64 * widest_row > ctx.max_buffer_bytes() {
            chunk /= 2;
        }
        // A batched runner: one scratch row per column; step values [8 + 2 c ..] hold
        // column c's slot and position.
        let (cols_mult, step_bytes) = match &src {
            KvSource::Batch { cols, .. } => {
                chunk = *cols;
                (*cols, (8 + 2 * *cols) as u64 * 4)
            }
            _ => (1, 16),
        };
        let step = ctx.create_buffer(step_bytes, MemoryKind::Upload)?;
        let step_dev = ctx.create_buffer(step_bytes, MemoryKind::Device)?;
        let x_in = ctx.create_buffer((chunk * d * 4) as u64, MemoryKind::Upload)?;
        let x = dev(chunk * d, "the residual stream")?;
        let tmp = dev(chunk * d, "a scratch buffer")?;
        let qkv = dev(chunk * max_qkv, "the q/k/v rows")?;
        let att = dev(chunk * max_q, "the attention output")?;
        let gu = dev(chunk * 2 * max_ff, "the gate/up rows")?;
        let moe_blocks: Vec<&MoeDevice> = m
            .layers
            .iter()
            .filter_map(|l| match &l.ffn {
                Some(VkFfn::Moe(moe)) => Some(&**moe),
                _ => None,
            })
            .collect();
        // Grouped by expert in prefill steps (unless CALDERA_VK_MOE_PAIRS=1). A batched
        // runner's decode steps keep the per-pair mat-vecs unless
        // CALDERA_VK_MOE_GROUPED_BATCH=1: with 1-16 columns a tile holds one or two
        // pairs, and the grouped matmul has not been timed against them on a GPU yet.
        let grouped = crate::moe::grouped_default()
            && (!matches!(src, KvSource::Batch { .. })
                || std::env::var("CALDERA_VK_MOE_GROUPED_BATCH").is_ok_and(|v| v == "1"));
        let moe = MoeScratch::with_grouping(ctx, &moe_blocks, chunk as u64, grouped)?;
        let widest = max_in.max(max_q).max(max_ff);
        let env_usize = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
        let attn_hpw = env_usize("CALDERA_VK_ATTN_HPW").unwrap_or(8).clamp(1, 8);
        let attn_hpw_small = env_usize("CALDERA_VK_ATTN_HPW_SMALL")
            .unwrap_or(2)
            .clamp(1, 8);
        let attn_merge = env_usize("CALDERA_VK_ATTN_MERGE").unwrap_or(8).min(255);
        let attn_target = env_usize("CALDERA_VK_ATTN_TARGET").unwrap_or(16).min(255);
        let split =
            env_usize("CALDERA_VK_ATTN_SPLIT").map_or(attn_split(cap), |v| v.clamp(8, 128) / 8 * 8);
        let attn_new = Kernel::AttnDec.fits(ctx.info())
            && std::env::var("CALDERA_VK_ATTN_DEC").is_ok_and(|v| v == "1");
        let attn_dec_split = env_usize("CALDERA_VK_ATTN_SPLIT").unwrap_or(0).min(1 << 16);
        let attn_dec_blocks = env_usize("CALDERA_VK_ATTN_SPLITS").unwrap_or(0).min(4096);
        let wg = ctx.tuning().workgroup_size;
        let mut part_len = 1usize;
        let mut counts = 1usize;
        for l in &m.layers {
            let Some(VkMixer::Attention(at)) = &l.mixer else {
                continue;
            };
            let a = &at.attn;
            let splits = cap.div_ceil(split);
            part_len = part_len.max(a.n_heads * splits * (a.head_dim + 2));
            let gsize = a.n_heads / a.n_kv_heads;
            let hpw = decode_hpw(gsize, a.head_dim)
                .min(attn_hpw)
                .min(attn_hpw_small);
            counts = counts.max(a.n_kv_heads * gsize.div_ceil(hpw));
            let shape = attn_dec_shape(
                gsize,
                a.head_dim,
                wg,
                cap,
                attn_hpw,
                attn_dec_split,
                attn_dec_blocks,
            );
            if let (true, Some(sh)) = (attn_new, shape) {
                // (attn_dec_batch: hd + 4 per head and block, so columns stay vec4-aligned.)
                part_len = part_len.max(a.n_heads * sh.blocks * (a.head_dim + 4));
                counts = counts.max(a.n_kv_heads * sh.n_chunks);
            }
        }
        let attn_part = dev(part_len * cols_mult, "the attention partials")?;
        let attn_count = ctx.upload(&vec![0u8; counts * cols_mult * 4])?;
        let tail_count = ctx.upload(&vec![0u8; widest.div_ceil(32) * 4])?;
        let xq = [
            dev(widest.div_ceil(4) * cols_mult, "the quantized activations")?,
            dev(widest.div_ceil(4) * cols_mult, "the quantized activations")?,
        ];
        let xd = [
            dev(widest.div_ceil(32) * cols_mult, "the activation scales")?,
            dev(widest.div_ceil(32) * cols_mult, "the activation scales")?,
        ];
        let xss = [
            dev(widest.div_ceil(32), "the activation sums of squares")?,
            dev(widest.div_ceil(32), "the activation sums of squares")?,
        ];
        let xsum = dev(widest.div_ceil(32) * cols_mult, "the activation block sums")?;
        let xh = if matches!(src, KvSource::Batch { .. }) && ctx.tuning().mvc.is_some() {
            dev(
                widest.div_ceil(2) * Mvc::MAX_COLS as usize,
                "the f16 activations",
            )?
        } else {
            dev(1, "the f16 activations")?
        };
        let mut kv = Vec::with_capacity(m.layers.len());
        let mut states = Vec::with_capacity(m.layers.len());
        let mut rope: Vec<Option<Buffer>> = Vec::with_capacity(m.layers.len());
        for (li, l) in m.layers.iter().enumerate() {
            let state = match (&l.mixer, &src) {
                (
                    Some(VkMixer::Recurrent(_)),
                    KvSource::Views { states, .. } | KvSource::Batch { states, .. },
                ) => Some(states.get(li).cloned().flatten().ok_or_else(|| {
                    VkError::Invalid(format!("layer {li}: no pooled recurrent state"))
                })?),
                (Some(VkMixer::Recurrent(r)), KvSource::Own) => Some(match &r.spec {
                    Mixer::GatedDeltaNet(s) => RecurrentState::gdn(ctx, s)?,
                    Mixer::Mamba2(s) => RecurrentState::mamba2(ctx, s)?,
                    Mixer::ShortConv(s) => RecurrentState::short_conv(ctx, s)?,
                    Mixer::Attention(_) => {
                        return Err(VkError::Invalid(format!("layer {li}: mismatched mixer")))
                    }
                }),
                _ => None,
            };
            states.push(state);
            let Some(VkMixer::Attention(at)) = &l.mixer else {
                kv.push(None);
                rope.push(None);
                continue;
            };
            let shared = at.kv_from.and_then(|src| kv.get(src).cloned().flatten());
            if let Some(cache) = shared {
                kv.push(Some(cache));
            } else {
                let kvd = at.attn.n_kv_heads * at.attn.head_dim;
                // Whole pages, in the identity table's order.
                let n = (crate::kv::table_entries(cap) * crate::kv::KV_PAGE)
                    .checked_mul(kvd)
                    .ok_or_else(|| VkError::Invalid("KV cache size overflows".into()))?;
                let words = (ctx.tuning().kv.bytes(n as u64) / 4) as usize;
                let caches = match &src {
                    KvSource::Own => (
                        dev(words, "a layer's K cache")?,
                        dev(words, "a layer's V cache")?,
                    ),
                    KvSource::Views { kv: v, .. } | KvSource::Batch { pool: v, .. } => {
                        v.get(li).cloned().flatten().ok_or_else(|| {
                            VkError::Invalid(format!("layer {li}: no pooled KV cache"))
                        })?
                    }
                };
                kv.push(Some(caches));
            }
            let table = match &at.attn.rope {
                None => None,
                Some(spec) => {
                    let prev = m.layers[..li].iter().zip(&rope).find(|(pl, b)| {
                        b.is_some()
                            && matches!(&pl.mixer, Some(VkMixer::Attention(pa))
                                if pa.attn.rope.as_ref().is_some_and(|r| same_rope(r, spec)))
                    });
                    match prev {
                        Some((_, b)) => b.clone(),
                        None => {
                            let t = rope_table(spec, cap);
                            if (t.len() as u64 * 4) > ctx.max_buffer_bytes() {
                                return Err(VkError::Invalid(format!(
                                    "a RoPE table for {cap} positions is larger than one \
                                     buffer may be; use a smaller context (--ctx)"
                                )));
                            }
                            Some(ctx.upload_f32(&t)?)
                        }
                    }
                }
            };
            rope.push(table);
        }
        let ple = match &m.ple {
            None => None,
            Some(p) => {
                let row = p.shape.n_layers * p.shape.dpl;
                Some(PleBufs {
                    tok_in: ctx.create_buffer((chunk * row * 4) as u64, MemoryKind::Upload)?,
                    tok: dev(chunk * row, "the per-layer token embeddings")?,
                    pli: dev(chunk * row, "the per-layer inputs")?,
                    g: dev(chunk * p.shape.dpl, "the per-layer gates")?,
                    row_buf: vec![0.0; row],
                })
            }
        };
        let vocab = cfg.vocab_size;
        let logits1 = (
            dev(vocab, "a logits row")?,
            ctx.create_buffer((vocab * 4) as u64, MemoryKind::Readback)?,
        );
        let all_rows = match &src {
            KvSource::Batch { cols, .. } => *cols,
            _ => (ctx.max_buffer_bytes() / (vocab as u64 * 4)).clamp(1, chunk as u64) as usize,
        };
        let (batch, table) = match src {
            KvSource::Batch {
                cols,
                slot_pages,
                state_strides,
                slots,
                mm,
                table,
                ..
            } => (
                Some(BatchMode {
                    cols,
                    slot_pages,
                    state_strides,
                    slots,
                    mm,
                }),
                Some(table),
            ),
            KvSource::Views { table, .. } => (None, Some(table)),
            KvSource::Own => (None, None),
        };
        let (kv_table, kv_table_src) = match table {
            Some(t) => (t.dev, Some((t.host, t.host_at, t.bytes))),
            None => {
                let ids: Vec<u8> = (0..crate::kv::table_entries(cap) as u32)
                    .flat_map(u32::to_le_bytes)
                    .collect();
                (ctx.upload(&ids)?, None)
            }
        };
        Ok(VkRunner {
            stats: StepStats {
                decode_submits: 1,
                layers: m.layers.len() as u32,
                ..Default::default()
            },
            m,
            cap,
            len: 0,
            chunk,
            step,
            step_dev,
            x_in,
            x,
            tmp,
            qkv,
            att,
            gu,
            moe,
            xq,
            xd,
            xss,
            xsum,
            xh,
            tail_count,
            attn_part,
            attn_count,
            kv,
            kv_table,
            kv_table_src,
            states,
            rope,
            ple,
            logits1,
            logits_all: None,
            all_rows,
            ids: None,
            steps: HashMap::new(),
            embed_row: vec![0.0; d],
            embed_bytes: Vec::with_capacity(chunk * d * 4),
            trace: std::env::var_os("CALDERA_VK_TRACE").is_some(),
            profile: std::env::var("CALDERA_VK_PROFILE").is_ok_and(|v| v == "1"),
            attn_hpw,
            attn_split: split,
            attn_hpw_small,
            attn_merge,
            attn_target,
            attn_new,
            attn_dec_split,
            attn_dec_blocks,
            attn_stop: std::env::var("CALDERA_VK_ATTN_STOP")
                .ok()
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0)
                .min(3),
            fuse_quant: std::env::var("CALDERA_VK_FUSE_QUANT").map_or(true, |v| v != "0"),
            fuse_glu_quant: std::env::var("CALDERA_VK_FUSE_GLU_QUANT").map_or(true, |v| v != "0"),
            moe_fused: std::env::var("CALDERA_VK_MOE_UNFUSED").map_or(true, |v| v != "1"),
            head_mm: std::env::var("CALDERA_VK_HEAD_MM").is_ok_and(|v| v == "1"),
            profile_ns: HashMap::new(),
            profile_steps: 0,
            batch,
            lease: None,
        })
    }

    /// What this runner has done, and the shape of its recorded decode step.
    pub fn stats(&self) -> StepStats {
        self.stats
    }

    /// With `CALDERA_VK_PROFILE=1`: device microseconds per decode step by op kind
    /// (summed over the layers), in the order of the largest first.
    pub fn profile(&self) -> Vec<(String, f64)> {
        let steps = self.profile_steps.max(1) as f64;
        let mut v: Vec<(String, f64)> = self
            .profile_ns
            .iter()
            .map(|(k, (ns, _))| (k.to_string(), ns / steps / 1e3))
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }

    /// Records the step for `bucket` tokens; `head` says which logits rows it makes
    /// (none: no LM head, nothing copied back); `greedy` ends it with `argmax` over its
    /// logits rows and copies back only their token ids ([`crate::sample::Argmax`]), not
    /// the rows.
    fn record_step(&mut self, bucket: usize, head: Head, greedy: bool) -> Result<Step> {
        let all = head == Head::All;
        let m = self.m.clone();
        let ctx = &m.ctx;
        let cfg = &m.model.config;
        let d = cfg.d_model;
        let eps = cfg.norm_eps;
        // One token: the decode mat-vecs (mv.glsl); more: the batched ones (mm.glsl).
        let decode = self.is_decode(bucket);
        let mut ops: Vec<(&'static str, Op)> = Vec::new();
        // Decode: xq / xd already hold the next q|k|v input (the previous layer's down
        // mat-vec quantized it).
        let mut qs = QState::default();
        self.push_ple_inputs(&mut ops, bucket, &mut qs)?;
        for (li, l) in m.layers.iter().enumerate() {
            match &l.mixer {
                Some(VkMixer::Attention(a)) => {
                    self.push_attention(&mut ops, li, l, a, bucket, &mut qs)?
                }
                Some(VkMixer::Recurrent(r)) => {
                    self.push_recurrent(&mut ops, li, l, r, bucket, &mut qs)?
                }
                None => {}
            }
            match &l.ffn {
                Some(VkFfn::Dense(mlp)) => {
                    let next = if decode {
                        self.next_input(li, false)
                    } else {
                        None
                    };
                    let out = MlpOut {
                        post_norm: l.ffn_post_norm.as_ref(),
                        next,
                    };
                    self.push_mlp(&mut ops, mlp, l.ffn_norm.as_ref(), out, bucket, &mut qs)?;
                }
                Some(VkFfn::Moe(moe)) => {
                    self.push_moe(&mut ops, li, moe, l.ffn_norm.as_ref(), bucket, &mut qs)?
                }
                None => {}
            }
            self.push_layer_end(&mut ops, li, l, bucket, &mut qs)?;
        }
        // final norm + LM head on the selected tokens
        if all && self.logits_all.is_none() {
            let n = self.all_rows * cfg.vocab_size;
            self.logits_all = Some((
                ctx.create_buffer((n * 4) as u64, MemoryKind::Device)?,
                ctx.create_buffer((n * 4) as u64, MemoryKind::Readback)?,
            ));
        }
        let (ldev, lhost, rows) = match (&self.logits_all, all) {
            (Some((dv, hv)), true) => (dv, hv, self.all_rows),
            _ => (&self.logits1.0, &self.logits1.1, 1),
        };
        // A batched decode step has at most `bucket` rows: copying the whole all-rows
        // buffer back (a prefill chunk's worth) would cost more than the step.
        let rows = if self.batch.is_some() {
            rows.min(bucket)
        } else {
            rows
        };
        // A head over one row runs as decode's does, on the decode mat-vecs, not a
        // matmul over one row (on lavapipe `mm.glsl` took 12.7 s for gemma-3's head,
        // decode's mat-vec 0.8 s): a prefill step's selected row (copied into `tmp`,
        // free by now), or a one-column batched step's row 0 where its kernel choice is
        // automatic and would take `mm.glsl` (f32 activations; the int8 one keeps
        // `mvqm`). `CALDERA_VK_HEAD_MM=1` keeps the matmuls.
        let k_out = m.output.k as u64;
        let one_row = !decode
            && rows == 1
            && !self.head_mm
            && self.batch.as_ref().is_none_or(|bm| {
                matches!(bm.mm, BatchMm::Auto | BatchMm::Q8)
                    && !self.batch_q8(m.output.ty, k_out, 1)
            });
        if head == Head::None {
            // An earlier chunk of a long prompt: no logits wanted.
        } else if decode || one_row {
            let x = if one_row && self.batch.is_none() {
                let io = RowsIo {
                    y: &self.tmp,
                    ld_y: d as u64,
                    y_off: 0,
                    src: &self.x,
                    step: &self.step_dev,
                    max_tokens: 1,
                };
                let sel = RowExt::Select {
                    ld_src: d as u64,
                    src_off: 0,
                };
                ops.push(("head_row", Op::Ext(RowsExt::new(ctx, sel, d as u64, &io)?)));
                &self.tmp
            } else {
                &self.x
            };
            if one_row {
                // Nothing before quantized the head's input (a batched step's int8
                // buffers hold another op's).
                qs = QState::default();
            }
            let mode = MvMode {
                softcap: cfg.final_logit_softcap,
                ..Default::default()
            };
            self.push_decode_mv(
                &mut ops,
                "head",
                &[(&m.output, 0)],
                x,
                Some(&m.output_norm),
                ldev,
                mode,
                &mut qs,
                None,
            )?;
        } else {
            let io = MmIo {
                x: &self.x,
                ld_x: d as u64,
                y: ldev,
                ld_y: cfg.vocab_size as u64,
                y_offset: 0,
                gam: Some(&m.output_norm),
                step: &self.step_dev,
                max_tokens: rows as u64,
            };
            let mode = MmMode {
                norm: true,
                softcap: cfg.final_logit_softcap,
                token_select: true,
                eps,
                ..Default::default()
            };
            let mm = self.mm(ctx, m.output.ty, &m.output.t, m.output.k as u64, &io, mode)?;
            ops.push(("head", Op::Mm(vec![mm])));
        }
        let in_bytes = (bucket * d * 4) as u64;
        let out_bytes = (rows * cfg.vocab_size * 4) as u64;
        if greedy && self.ids.is_none() {
            let n = (self.all_rows.max(1) * 4) as u64;
            self.ids = Some((
                ctx.create_buffer(n, MemoryKind::Device)?,
                ctx.create_buffer(n, MemoryKind::Readback)?,
            ));
        }
        let argmax = match (&self.ids, greedy) {
            (Some((ids, _)), true) => {
                let v = cfg.vocab_size as u64;
                Some(crate::sample::Argmax::new(
                    ctx,
                    ldev,
                    ids,
                    v,
                    v,
                    rows as u64,
                )?)
            }
            _ => None,
        };
        // Prefill steps are profiled only to print with CALDERA_VK_TRACE.
        let profiled = self.profile && (decode || self.trace);
        let rec = ctx.record_with(profiled, |r: &mut Recorder<'_>| {
            // The step's inputs, independent copies behind one pair of barriers.
            let mut inputs = vec![
                (&self.x_in, 0, &self.x, 0, in_bytes),
                (&self.step, 0, &self.step_dev, 0, self.step.size()),
            ];
            if let Some((host, at, bytes)) = &self.kv_table_src {
                inputs.push((host, *at, &self.kv_table, 0, *bytes));
            }
            if let (Some(pb), Some(p)) = (&self.ple, &m.ple) {
                let row = (p.shape.n_layers * p.shape.dpl * 4) as u64;
                inputs.push((&pb.tok_in, 0, &pb.tok, 0, bucket as u64 * row));
            }
            r.copies(&inputs)?;
            r.mark("input");
            for (label, op) in &ops {
                match op {
                    Op::Mm(group) => {
                        for mm in group {
                            mm.record(r)?;
                        }
                    }
                    Op::Mv(group) => {
                        for mv in group {
                            match mv {
                                DecodeMv::F32(op) => op.record(r)?,
                                DecodeMv::Q8(op) => op.record(r)?,
                            }
                        }
                    }
                    Op::Quant(q) => q.record(r)?,
                    Op::Attention(a) => a.record(r)?,
                    Op::Kernel(binding, push, groups) => r.dispatch(binding, push, *groups)?,
                    Op::Rec(op) => op.record(r)?,
                    Op::Act(op) => op.record(r)?,
                    Op::MoeDecode(op) => op.record(r)?,
                    Op::MoePrefill(op) => op.record(r)?,
                    Op::Ext(op) => op.record(r)?,
                    Op::Ple(op) => op.record(r)?,
                }
                r.barrier();
                r.mark(label);
            }
            match (&argmax, &self.ids) {
                (Some(a), Some((ids, ids_host))) => {
                    // (The copy's own barrier orders it after the argmax.)
                    a.record(r)?;
                    r.mark("argmax");
                    r.copy(ids, ids_host, (rows * 4) as u64)?;
                }
                _ if head == Head::None => {}
                _ => r.copy(ldev, lhost, out_bytes)?,
            }
            r.mark("output");
            Ok(())
        })?;
        Ok(Step { rec })
    }

    /// Whether a step of `bucket` tokens is a single-sequence decode step (the decode
    /// mat-vecs and `attn_decode`); a batched runner's steps never are.
    fn is_decode(&self, bucket: usize) -> bool {
        bucket == 1 && self.batch.is_none()
    }

    /// A mat-vec over the step's tokens: a [`Mm`]; in a batched decode step, the
    /// batched int8 mat-vec ([`Mvqn`]) where the weight type has one (and the context
    /// quantizes activations), else the kernel [`BatchMm`] says.
    fn mm(
        &self,
        ctx: &Context,
        ty: GgmlType,
        w: &crate::memory::DeviceTensor,
        k: u64,
        io: &MmIo<'_>,
        mode: MmMode,
    ) -> Result<AnyMm> {
        self.mm_in(ctx, ty, w, k, io, mode, false, false)
    }

    /// Whether a batched decode step's mat-vec of `ty` over `k` inputs and `tokens`
    /// columns runs on int8 activations (`quant_rows` + [`Mvqn`]).
    fn batch_q8(&self, ty: GgmlType, k: u64, tokens: u64) -> bool {
        self.batch.as_ref().is_some_and(|bm| {
            matches!(bm.mm, BatchMm::Auto | BatchMm::Q8)
                && self.m.ctx.tuning().q8_acts
                && Mvqn::supports(ty)
                && k.is_multiple_of(32)
                && tokens <= Mvqn::MAX_COLS
        })
    }

    /// Whether a batched decode step's mat-vec of `ty` over `k` inputs and `tokens`
    /// columns runs on cooperative matrices (`half_rows` + [`Mvc`]): with
    /// [`BatchMm::Auto`], where the int8 one does not run (weight types without `mvqm`:
    /// F16, BF16, Q4_1, Q5_0, Q5_1, Q5_K, IQ4_XS; or f32 activations) and the context
    /// runs them ([`Tuning::mvc`](crate::kernels::Tuning::mvc)); never for f32 weights.
    /// Else those take the tiled matmul, which on the H100 ran a qwen3 8b step of 2-8
    /// columns in ~55 ms against ~15 ms for `mvc` (docs/BENCHMARKS.md, session 11).
    fn batch_coop(&self, ty: GgmlType, k: u64, tokens: u64) -> bool {
        !self.batch_q8(ty, k, tokens)
            && self.batch.as_ref().is_some_and(|bm| {
                matches!(bm.mm, BatchMm::Auto)
                // f32 weights keep their precision (the fixtures' exactness checks).
                && ty != GgmlType::F32
                && tokens <= Mvc::MAX_COLS
                && self.xh.size() >= Mvc::MAX_COLS * k * 2
                && Mvc::usable(&self.m.ctx, ty, k)
            })
    }

    /// [`Self::mm`]; with `q8_ready`, a batched int8 mat-vec's input is already in
    /// int8 buffer pair 0 (quantized by the op before: an earlier member of the group
    /// on the same input, or `attn_batch`), so no `quant_rows` runs for it (and the
    /// int8 mat-vec runs: the f32 input may not exist); with `half_ready`, an earlier
    /// member of the group left the same input in f16 for a cooperative-matrix one.
    #[allow(clippy::too_many_arguments)]
    fn mm_in(
        &self,
        ctx: &Context,
        ty: GgmlType,
        w: &crate::memory::DeviceTensor,
        k: u64,
        io: &MmIo<'_>,
        mode: MmMode,
        q8_ready: bool,
        half_ready: bool,
    ) -> Result<AnyMm> {
        let Some(bm) = &self.batch else {
            return Ok(AnyMm::Mm(Mm::new(ctx, ty, w, k, io, mode)?));
        };
        if !q8_ready && self.batch_coop(ty, k, io.max_tokens) {
            let gam = if mode.norm { io.gam } else { None };
            let hr = if half_ready {
                None
            } else {
                Some(HalfRows::new(
                    ctx,
                    k,
                    io.x,
                    io.ld_x,
                    gam,
                    mode.glu,
                    mode.eps,
                    &self.xh,
                    io.step,
                    io.max_tokens,
                )?)
            };
            let mv = Mvc::new(
                ctx,
                ty,
                w,
                k,
                &self.xh,
                io.y,
                io.ld_y,
                io.y_offset,
                mode.add,
                mode.softcap,
                io.step,
                io.max_tokens,
            )?;
            return Ok(AnyMm::Coop(hr, mv));
        }
        if self.batch_q8(ty, k, io.max_tokens) {
            let acts = self.acts(0, false);
            let gam = if mode.norm { io.gam } else { None };
            // The block sums only where this op's own quant_rows writes the input (an
            // earlier producer, e.g. attn_batch or a recurrent mixer, does not).
            let sums = (!q8_ready).then_some(&self.xsum);
            let qr = if q8_ready {
                None
            } else {
                Some(QuantRows::new(
                    ctx,
                    k,
                    io.x,
                    io.ld_x,
                    gam,
                    mode.glu,
                    mode.eps,
                    &acts,
                    sums,
                    io.step,
                    io.max_tokens,
                )?)
            };
            let mv = Mvqn::new(
                ctx,
                ty,
                w,
                k,
                &acts,
                sums,
                io.y,
                io.ld_y,
                io.y_offset,
                mode.add,
                mode.softcap,
                io.step,
                io.max_tokens,
            )?;
            return Ok(AnyMm::Q8(qr, mv));
        }
        let rowwise = bm.rowwise(io.max_tokens);
        Ok(AnyMm::Mm(Mm::new(
            ctx,
            ty,
            w,
            k,
            io,
            MmMode { rowwise, ..mode },
        )?))
    }

    /// Attention over the step's tokens: norm + q|k|v, then (decode) `attn_decode` or
    /// (prefill) `rope_kv` and `attention` (and the output gate), then the o-projection
    /// + residual.
    #[allow(clippy::too_many_arguments)]
    fn push_attention(
        &self,
        ops: &mut Vec<(&'static str, Op)>,
        li: usize,
        layer: &VkLayer,
        l: &VkAttn,
        bucket: usize,
        qs: &mut QState,
    ) -> Result<()> {
        let m = &self.m;
        let ctx = &m.ctx;
        let d = m.model.config.d_model;
        let eps = m.model.config.norm_eps;
        let b = bucket as u64;
        let decode = self.is_decode(bucket);
        let wg_bind = |k: Kernel, bufs: &[&Buffer]| ctx.bind(k, bufs);
        let a = &l.attn;
        let (hd, nh, nkv) = (a.head_dim, a.n_heads, a.n_kv_heads);
        let ld_qkv = l.ld_qkv();
        // norm + q|k|v
        let mut group = Vec::new();
        if decode {
            let projs: Vec<(&Proj, u64)> = l.qkv.iter().map(|p| (p, p.offset as u64)).collect();
            self.push_decode_mv(
                ops,
                "qkv",
                &projs,
                &self.x,
                layer.norm.as_ref(),
                &self.qkv,
                MvMode::default(),
                qs,
                None,
            )?;
        }
        for p in &l.qkv {
            if decode {
                break;
            }
            let io = MmIo {
                x: &self.x,
                ld_x: d as u64,
                y: &self.qkv,
                ld_y: ld_qkv as u64,
                y_offset: p.offset as u64,
                gam: Some(layer.norm.as_ref().unwrap_or(&m.ones)),
                step: &self.step_dev,
                max_tokens: b,
            };
            let mode = MmMode {
                norm: layer.norm.is_some(),
                eps,
                ..Default::default()
            };
            // A batched step quantizes (or halves) the normed input once for every
            // member of a kind.
            let same = l.qkv.first().is_some_and(|f| f.k == p.k);
            let (ready, half) = AnyMm::prepared(&group, same);
            group.push(self.mm_in(ctx, p.ty, &p.t, p.k as u64, &io, mode, ready, half)?);
        }
        if !decode {
            ops.push(("qkv", Op::Mm(group)));
        }
        if let Some(bias) = &l.qkv_bias {
            let io = RowsIo {
                y: &self.qkv,
                ld_y: ld_qkv as u64,
                y_off: 0,
                src: bias,
                step: &self.step_dev,
                max_tokens: b,
            };
            let n = ((nh + 2 * nkv) * hd) as u64;
            ops.push((
                "qkv_bias",
                Op::Ext(RowsExt::new(ctx, RowExt::Bias, n, &io)?),
            ));
        }
        // q/k norm + RoPE + KV write
        let Some((kc, vc)) = &self.kv[li] else {
            return Err(VkError::Invalid(format!("layer {li}: no KV cache")));
        };
        let dummy = &self.x;
        let rope_buf = self.rope[li].as_ref().unwrap_or(dummy);
        let mut flags = 0u32;
        if l.q_norm.is_some() {
            flags |= 1;
        }
        if l.k_norm.is_some() {
            flags |= 2;
        }
        let n_rot = a.rope.as_ref().map_or(0, |r| r.n_dims);
        if let Some(r) = &a.rope {
            flags |= 4;
            if r.style == RopeStyle::Interleaved {
                flags |= 8;
            }
        }
        if l.v_norm {
            flags |= 64;
        }
        // Decode: one kernel for norm + RoPE + KV write + attention (+ output gate),
        // which also quantizes its output for the o-projection when that runs on int8.
        let o_q8 = decode && self.q8_input(&l.o) && hd.is_multiple_of(32);
        if let (false, Some(bm)) = (decode, &self.batch) {
            // Batched decode: every column attends over its own slot of the pools.
            let gsize = nh / nkv;
            let (kernel, hpw, n_chunks, split, max_splits, _) =
                self.attn_launch(gsize, hd, true, l.sinks.is_some());
            let slot_pages = bm.slot_pages;
            let bufs = [
                &self.qkv,
                kc,
                vc,
                &self.att,
                &self.step_dev,
                l.q_norm.as_ref().unwrap_or(dummy),
                l.k_norm.as_ref().unwrap_or(dummy),
                rope_buf,
                &self.attn_part,
                &self.attn_count,
                &self.xq[0],
                &self.xd[0],
                l.sinks.as_ref().unwrap_or(dummy),
            ];
            // The o-projection on int8: attn_batch quantizes its output into pair 0;
            // attn_dec_batch has no int8 output yet (the o-projection quantizes its
            // input itself then).
            let dec = kernel == Kernel::AttnDecBatch;
            // The page tables follow the kernel's other bindings.
            let mut bufs = bufs[..kernel.desc().bindings as usize - 1].to_vec();
            bufs.push(&self.kv_table);
            let binding = wg_bind(kernel, &bufs)?;
            let o_q8 = !dec
                && self.batch_q8(l.o.ty, l.o.k as u64, b)
                && hd.is_multiple_of(32)
                && l.o.k == nh * hd;
            // (A KV-shared layer's kc / vc are its source layer's pools, read only.)
            let gate_flag = if a.q_gate { 32 } else { 0 }
                | if o_q8 { 16 } else { 0 }
                | if l.kv_from.is_some() { 128 } else { 0 }
                | if l.sinks.is_some() { 1024 } else { 0 };
            let push = push_words(&[
                u32_of(nh, "heads")?,
                u32_of(nkv, "kv heads")?,
                u32_of(hd, "head size")?,
                u32_of(n_rot, "rotated dims")?,
                flags | gate_flag | (self.attn_stop << 8),
                u32_of(ld_qkv, "qkv width")?,
                u32_of(a.window.unwrap_or(0).min(u32::MAX as usize), "window")?,
                hpw as u32,
                n_chunks as u32,
                u32_of(max_splits, "attention splits")?,
                split as u32,
                eps.to_bits(),
                a.scale.to_bits(),
                a.softcap.unwrap_or(0.0).to_bits(),
                slot_pages,
            ]);
            let groups = (bucket * nkv * n_chunks * max_splits) as u64;
            ops.push(("attention", Op::Kernel(binding, push, groups)));
            self.push_out_proj(
                ops,
                "o",
                &l.o,
                &self.att,
                (nh * hd) as u64,
                None,
                layer.post_norm.as_ref(),
                b,
                &mut QState {
                    cur: 0,
                    ready: o_q8,
                    xnorm: false,
                },
                None,
            )?;
            return self.push_o_bias(ops, l, b, qs);
        }
        if decode {
            let gsize = nh / nkv;
            let (kernel, hpw, n_chunks, split, max_splits, merge_flag) =
                self.attn_launch(gsize, hd, false, l.sinks.is_some());
            let binding = wg_bind(
                kernel,
                &[
                    &self.qkv,
                    kc,
                    vc,
                    &self.att,
                    &self.step_dev,
                    l.q_norm.as_ref().unwrap_or(dummy),
                    l.k_norm.as_ref().unwrap_or(dummy),
                    rope_buf,
                    &self.xq[qs.cur],
                    &self.xd[qs.cur],
                    &self.attn_part,
                    &self.attn_count,
                    l.sinks.as_ref().unwrap_or(dummy),
                    &self.kv_table,
                ],
            )?;
            let q8_flag = if o_q8 { 16 } else { 0 };
            let gate_flag = if a.q_gate { 32 } else { 0 };
            let nokv_flag = if l.kv_from.is_some() { 128 } else { 0 };
            let sinks_flag = if l.sinks.is_some() { 1024 } else { 0 };
            let q8_flag =
                q8_flag | gate_flag | nokv_flag | sinks_flag | merge_flag | (self.attn_stop << 8);
            let push = push_words(&[
                u32_of(nh, "heads")?,
                u32_of(nkv, "kv heads")?,
                u32_of(hd, "head size")?,
                u32_of(n_rot, "rotated dims")?,
                flags | q8_flag,
                u32_of(ld_qkv, "qkv width")?,
                u32_of(a.window.unwrap_or(0).min(u32::MAX as usize), "window")?,
                hpw as u32,
                n_chunks as u32,
                u32_of(max_splits, "attention splits")?,
                split as u32,
                eps.to_bits(),
                a.scale.to_bits(),
                a.softcap.unwrap_or(0.0).to_bits(),
            ]);
            let groups = (nkv * n_chunks * max_splits) as u64;
            ops.push(("attention", Op::Kernel(binding, push, groups)));
            *qs = QState {
                cur: qs.cur,
                ready: o_q8,
                xnorm: false,
            };
            let next = self.next_input(li, true).filter(|_| l.o_bias.is_none());
            self.push_out_proj(
                ops,
                "o",
                &l.o,
                &self.att,
                (nh * hd) as u64,
                None,
                layer.post_norm.as_ref(),
                b,
                qs,
                next,
            )?;
        }
        if !decode {
            let binding = wg_bind(
                Kernel::RopeKv,
                &[
                    &self.qkv,
                    kc,
                    vc,
                    l.q_norm.as_ref().unwrap_or(dummy),
                    l.k_norm.as_ref().unwrap_or(dummy),
                    rope_buf,
                    &self.step_dev,
                    &self.kv_table,
                ],
            )?;
            // A KV-shared layer rotates its q heads only.
            let own_kv = if l.kv_from.is_some() { 0 } else { nkv };
            let push = push_words(&[
                u32_of(nh, "heads")?,
                u32_of(own_kv, "kv heads")?,
                u32_of(hd, "head size")?,
                u32_of(n_rot, "rotated dims")?,
                flags,
                u32_of(ld_qkv, "qkv width")?,
                eps.to_bits(),
            ]);
            let groups = b * (nh + own_kv) as u64;
            ops.push(("rope_kv", Op::Kernel(binding, push, groups)));
            // attention (flash attention where the device fits it)
            let shape = AttnShape {
                n_heads: nh,
                n_kv: nkv,
                head_dim: hd,
                window: a.window.unwrap_or(0),
                scale: a.scale,
                softcap: a.softcap,
            };
            let io = AttnIo {
                qkv: &self.qkv,
                ld_qkv: ld_qkv as u64,
                k_cache: kc,
                v_cache: vc,
                table: &self.kv_table,
                out: &self.att,
                step: &self.step_dev,
                max_tokens: b,
                sinks: l.sinks.as_ref(),
            };
            let att = PrefillAttention::new(ctx, &shape, &io)?;
            ops.push(("attention", Op::Attention(att)));
            if a.q_gate {
                // The output gate: the gates follow v in each q|k|v|gate row.
                let act = RowAct::Gate {
                    ld_src: ld_qkv as u64,
                    src_off: ((nh + 2 * nkv) * hd) as u64,
                };
                let qd = (nh * hd) as u64;
                let op = RowsAct::new(ctx, act, qd, &self.att, qd, &self.qkv, &self.step_dev, b)?;
                ops.push(("attn_gate", Op::Act(op)));
            }
            // o-proj + residual (through the post-norm when there is one)
            self.push_out_proj(
                ops,
                "o",
                &l.o,
                &self.att,
                (nh * hd) as u64,
                None,
                layer.post_norm.as_ref(),
                b,
                &mut QState::default(),
                None,
            )?;
        }
        self.push_o_bias(ops, l, b, qs)
    }

    /// An attention layer's o-projection bias, after the residual add (no post-norm:
    /// refused at upload), over the step's rows.
    fn push_o_bias(
        &self,
        ops: &mut Vec<(&'static str, Op)>,
        l: &VkAttn,
        b: u64,
        qs: &mut QState,
    ) -> Result<()> {
        let Some(bias) = &l.o_bias else {
            return Ok(());
        };
        let d = self.m.model.config.d_model;
        let io = RowsIo {
            y: &self.x,
            ld_y: d as u64,
            y_off: 0,
            src: bias,
            step: &self.step_dev,
            max_tokens: b,
        };
        ops.push((
            "o_bias",
            Op::Ext(RowsExt::new(&self.m.ctx, RowExt::Bias, d as u64, &io)?),
        ));
        *qs = QState {
            cur: qs.cur,
            ready: false,
            xnorm: false,
        };
        Ok(())
    }

    /// Gemma 4's per-layer inputs of the step's tokens, before the first layer: the model
    /// projection of the (scaled) embeddings, then `ple_in` (norm, the per-layer token
    /// embeddings copied in by the step, the scales).
    fn push_ple_inputs(
        &self,
        ops: &mut Vec<(&'static str, Op)>,
        bucket: usize,
        qs: &mut QState,
    ) -> Result<()> {
        let (Some(p), Some(pb)) = (&self.m.ple, &self.ple) else {
            return Ok(());
        };
        let ctx = &self.m.ctx;
        let d = self.m.model.config.d_model;
        let row = (p.shape.n_layers * p.shape.dpl) as u64;
        let b = bucket as u64;
        if self.is_decode(bucket) {
            let mp = [(&p.model_proj, 0u64)];
            let mode = MvMode::default();
            self.push_decode_mv(ops, "ple", &mp, &self.x, None, &pb.pli, mode, qs, None)?;
        } else {
            let io = MmIo {
                x: &self.x,
                ld_x: d as u64,
                y: &pb.pli,
                ld_y: row,
                y_offset: 0,
                gam: Some(&self.m.ones),
                step: &self.step_dev,
                max_tokens: b,
            };
            let mode = MmMode {
                eps: p.shape.eps,
                ..Default::default()
            };
            // (A batched step: every column's projection in one mat-vec.)
            let mm = self.mm(ctx, p.model_proj.ty, &p.model_proj.t, d as u64, &io, mode)?;
            ops.push(("ple", Op::Mm(vec![mm])));
        }
        let op = PleIn::new(ctx, &p.shape, &pb.pli, &pb.tok, &p.norm, &self.step_dev, b)?;
        ops.push(("ple_in", Op::Ple(op)));
        Ok(())
    }

    /// The end of layer `li`: Gemma 4's per-layer input block (gate, gelu * input,
    /// projection, post-norm + residual) and the layer output scale.
    fn push_layer_end(
        &self,
        ops: &mut Vec<(&'static str, Op)>,
        li: usize,
        l: &VkLayer,
        bucket: usize,
        qs: &mut QState,
    ) -> Result<()> {
        let m = &self.m;
        let ctx = &m.ctx;
        let d = m.model.config.d_model;
        let b = bucket as u64;
        if let (Some(pl), Some(p), Some(pb)) = (&l.ple, &m.ple, &self.ple) {
            let dpl = p.shape.dpl as u64;
            if self.is_decode(bucket) {
                let g = [(&pl.gate, 0u64)];
                let mode = MvMode::default();
                self.push_decode_mv(ops, "ple_gate", &g, &self.x, None, &pb.g, mode, qs, None)?;
            } else {
                let io = MmIo {
                    x: &self.x,
                    ld_x: d as u64,
                    y: &pb.g,
                    ld_y: dpl,
                    y_offset: 0,
                    gam: Some(&m.ones),
                    step: &self.step_dev,
                    max_tokens: b,
                };
                let mode = MmMode {
                    eps: p.shape.eps,
                    ..Default::default()
                };
                let mm = self.mm(ctx, pl.gate.ty, &pl.gate.t, d as u64, &io, mode)?;
                ops.push(("ple_gate", Op::Mm(vec![mm])));
            }
            let act = RowExt::GeluMul {
                ld_src: (p.shape.n_layers as u64) * dpl,
                src_off: li as u64 * dpl,
            };
            let io = RowsIo {
                y: &pb.g,
                ld_y: dpl,
                y_off: 0,
                src: &pb.pli,
                step: &self.step_dev,
                max_tokens: b,
            };
            ops.push(("ple_act", Op::Ext(RowsExt::new(ctx, act, dpl, &io)?)));
            *qs = QState {
                cur: qs.cur,
                ready: false,
                xnorm: false,
            };
            let post = Some(&pl.post_norm);
            self.push_out_proj(
                ops, "ple_proj", &pl.proj, &pb.g, dpl, None, post, b, qs, None,
            )?;
        }
        if let Some(sc) = l.out_scale {
            let io = RowsIo {
                y: &self.x,
                ld_y: d as u64,
                y_off: 0,
                src: &self.x,
                step: &self.step_dev,
                max_tokens: b,
            };
            ops.push((
                "out_scale",
                Op::Ext(RowsExt::new(ctx, RowExt::Scale(sc), d as u64, &io)?),
            ));
            *qs = QState {
                cur: qs.cur,
                ready: false,
                xnorm: false,
            };
        }
        Ok(())
    }

    /// A recurrent mixer over the step's tokens: norm + its input projections, its decode
    /// or prefill op, the out-projection + residual.
    #[allow(clippy::too_many_arguments)]
    fn push_recurrent(
        &self,
        ops: &mut Vec<(&'static str, Op)>,
        li: usize,
        layer: &VkLayer,
        r: &VkRecurrent,
        bucket: usize,
        qs: &mut QState,
    ) -> Result<()> {
        let m = &self.m;
        let ctx = &m.ctx;
        let d = m.model.config.d_model;
        let eps = m.model.config.norm_eps;
        let b = bucket as u64;
        let decode = self.is_decode(bucket);
        let state = self.states[li]
            .as_ref()
            .ok_or_else(|| VkError::Invalid(format!("layer {li}: no recurrent state")))?;
        let mw = m.model.weights.layers[li].mixer.as_ref();
        let mismatch = || VkError::Invalid(format!("layer {li}: mismatched mixer"));
        // norm + input projections, side by side in one row
        if decode {
            let projs: Vec<(&Proj, u64)> = r.input.iter().map(|p| (p, p.offset as u64)).collect();
            self.push_decode_mv(
                ops,
                "mixer_in",
                &projs,
                &self.x,
                layer.norm.as_ref(),
                &self.qkv,
                MvMode::default(),
                qs,
                None,
            )?;
        } else {
            let mut group = Vec::new();
            for p in &r.input {
                let io = MmIo {
                    x: &self.x,
                    ld_x: d as u64,
                    y: &self.qkv,
                    ld_y: r.row as u64,
                    y_offset: p.offset as u64,
                    gam: Some(layer.norm.as_ref().unwrap_or(&m.ones)),
                    step: &self.step_dev,
                    max_tokens: b,
                };
                let mode = MmMode {
                    norm: layer.norm.is_some(),
                    eps,
                    ..Default::default()
                };
                // A batched step quantizes (or halves) the normed input once for every
                // member of a kind.
                let same = r.input.first().is_some_and(|f| f.k == p.k);
                let (ready, half) = AnyMm::prepared(&group, same);
                group.push(self.mm_in(ctx, p.ty, &p.t, p.k as u64, &io, mode, ready, half)?);
            }
            ops.push(("mixer_in", Op::Mm(group)));
        }
        // the mixer
        let batched = self.batch.as_ref().filter(|_| !decode);
        let o_q8 = match batched {
            None => decode && r.q8_out && self.q8_input(&r.out),
            Some(_) => r.q8_out && r.out.k == r.width && self.batch_q8(r.out.ty, r.out.k as u64, b),
        };
        let (label, op) = if let Some(bm) = batched {
            // A batched decode step: every column on its own slot's state.
            let (conv_stride, ssm_stride) = *bm.state_strides.get(li).ok_or_else(|| {
                VkError::Invalid(format!("layer {li}: no pooled recurrent state"))
            })?;
            let cols = RecurrentCols {
                cols: bucket,
                ld_proj: r.row,
                slots: bm.slots,
                conv_stride,
                ssm_stride,
            };
            let io = RecurrentIo {
                proj: &self.qkv,
                out: &self.att,
                state,
                step: &self.step_dev,
                q8: o_q8.then(|| self.acts(0, false)),
            };
            match (&r.spec, mw) {
                (Mixer::GatedDeltaNet(s), Some(MixerWeights::GatedDeltaNet(w))) => (
                    "gdn",
                    RecOp::GdnDecode(GdnDecode::batched(ctx, s, w, eps, &io, &cols)?),
                ),
                (Mixer::Mamba2(s), Some(MixerWeights::Mamba2(w))) => (
                    "mamba2",
                    RecOp::Mamba2Decode(Mamba2Decode::batched(ctx, s, w, eps, &io, &cols)?),
                ),
                (Mixer::ShortConv(s), Some(MixerWeights::ShortConv(w))) => (
                    "shortconv",
                    RecOp::ShortConvDecode(ShortConvDecode::batched(ctx, s, w, &io, &cols)?),
                ),
                _ => return Err(mismatch()),
            }
        } else if decode {
            let io = RecurrentIo {
                proj: &self.qkv,
                out: &self.att,
                state,
                step: &self.step_dev,
                q8: o_q8.then(|| self.acts(qs.cur, false)),
            };
            match (&r.spec, mw) {
                (Mixer::GatedDeltaNet(s), Some(MixerWeights::GatedDeltaNet(w))) => (
                    "gdn",
                    RecOp::GdnDecode(GdnDecode::new(ctx, s, w, eps, &io)?),
                ),
                (Mixer::Mamba2(s), Some(MixerWeights::Mamba2(w))) => (
                    "mamba2",
                    RecOp::Mamba2Decode(Mamba2Decode::new(ctx, s, w, eps, &io)?),
                ),
                (Mixer::ShortConv(s), Some(MixerWeights::ShortConv(w))) => (
                    "shortconv",
                    RecOp::ShortConvDecode(ShortConvDecode::new(ctx, s, w, &io)?),
                ),
                _ => return Err(mismatch()),
            }
        } else {
            let io = PrefillIo {
                proj: &self.qkv,
                ld_proj: r.row as u64,
                out: &self.att,
                state,
                step: &self.step_dev,
                max_tokens: b,
            };
            match (&r.spec, mw) {
                (Mixer::GatedDeltaNet(s), Some(MixerWeights::GatedDeltaNet(w))) => (
                    "gdn",
                    RecOp::GdnPrefill(GdnPrefill::new(ctx, s, w, eps, &io)?),
                ),
                (Mixer::Mamba2(s), Some(MixerWeights::Mamba2(w))) => (
                    "mamba2",
                    RecOp::Mamba2Prefill(Mamba2Prefill::new(ctx, s, w, eps, &io)?),
                ),
                (Mixer::ShortConv(s), Some(MixerWeights::ShortConv(w))) => (
                    "shortconv",
                    RecOp::ShortConvPrefill(ShortConvPrefill::new(ctx, s, w, &io)?),
                ),
                _ => return Err(mismatch()),
            }
        };
        ops.push((label, Op::Rec(op)));
        // out-projection + residual (a batched step's input may be quantized already)
        let mut prefill_qs = QState {
            cur: 0,
            ready: batched.is_some() && o_q8,
            xnorm: false,
        };
        let (qs, next) = if decode {
            *qs = QState {
                cur: qs.cur,
                ready: o_q8,
                xnorm: false,
            };
            (qs, self.next_input(li, true))
        } else {
            (&mut prefill_qs, None)
        };
        self.push_out_proj(
            ops,
            "mixer_out",
            &r.out,
            &self.att,
            r.width as u64,
            None,
            layer.post_norm.as_ref(),
            b,
            qs,
            next,
        )
    }

    /// An MLP over the step's tokens on input `x` normed by `norm`: up (gate|up), the
    /// activation, down into `out`.
    fn push_mlp(
        &self,
        ops: &mut Vec<(&'static str, Op)>,
        mlp: &VkMlp,
        norm: Option<&Buffer>,
        out: MlpOut<'_>,
        bucket: usize,
        qs: &mut QState,
    ) -> Result<()> {
        let m = &self.m;
        let ctx = &m.ctx;
        let d = m.model.config.d_model;
        let eps = m.model.config.norm_eps;
        let b = bucket as u64;
        let decode = self.is_decode(bucket);
        let glu = match mlp.act {
            MlpAct::Glu(act) => Some(act),
            MlpAct::Relu2 => None,
        };
        // norm + up (decode: with the activation, into gu[0 .. d_ff])
        let p = &mlp.up;
        if decode {
            let mode = MvMode {
                glu,
                relu2: mlp.act == MlpAct::Relu2,
                ..Default::default()
            };
            let next = (self.fuse_quant && self.fuse_glu_quant && self.q8_input(&mlp.down))
                .then_some(NextInput {
                    norm: None,
                    n: mlp.d_ff,
                });
            self.push_decode_mv(
                ops,
                "gate_up",
                &[(p, 0)],
                &self.x,
                norm,
                &self.gu,
                mode,
                qs,
                next,
            )?;
            if !qs.ready {
                // The down projection's quant_x writes the other pair: this one still holds
                // the MLP's input, which a MoE's next expert reads again.
                qs.cur = 1 - qs.cur;
            }
        } else {
            let io = MmIo {
                x: &self.x,
                ld_x: d as u64,
                y: &self.gu,
                ld_y: mlp.up_width() as u64,
                y_offset: 0,
                gam: Some(norm.unwrap_or(&m.ones)),
                step: &self.step_dev,
                max_tokens: b,
            };
            let mode = MmMode {
                norm: norm.is_some(),
                eps,
                ..Default::default()
            };
            ops.push((
                "gate_up",
                Op::Mm(vec![self.mm(ctx, p.ty, &p.t, p.k as u64, &io, mode)?]),
            ));
            if mlp.act == MlpAct::Relu2 {
                let ff = mlp.d_ff as u64;
                let act = RowsAct::new(
                    ctx,
                    RowAct::Relu2,
                    ff,
                    &self.gu,
                    ff,
                    &self.gu,
                    &self.step_dev,
                    b,
                )?;
                ops.push(("act", Op::Act(act)));
            }
        }
        // (GLU +) down (+ residual)
        let (ld, glu) = if decode {
            (mlp.d_ff as u64, None)
        } else {
            (mlp.up_width() as u64, glu)
        };
        let MlpOut { post_norm, next } = out;
        self.push_out_proj(
            ops, "down", &mlp.down, &self.gu, ld, glu, post_norm, b, qs, next,
        )
    }

    /// A mixture of experts over the step's tokens on input `x` normed by `norm`, its
    /// output added to x: decode runs [`MoeFfn`] (the chosen experts only, int8 where
    /// the types allow; with `moe_fused`, on the int8 input the mat-vec before left in
    /// `qs` and quantizing its output for the next block), prefill [`MoeSteps`].
    fn push_moe(
        &self,
        ops: &mut Vec<(&'static str, Op)>,
        li: usize,
        moe: &MoeDevice,
        norm: Option<&Buffer>,
        bucket: usize,
        qs: &mut QState,
    ) -> Result<()> {
        let m = &self.m;
        let ctx = &m.ctx;
        let eps = m.model.config.norm_eps;
        let gam = norm.unwrap_or(&m.ones);
        if self.is_decode(bucket) {
            let q8 = ctx.tuning().q8_acts;
            let fused = self.moe_fused;
            // The mat-vec before quantized the block's input (next_input asked for it
            // with the block's norm).
            let input =
                (fused && qs.ready && qs.xnorm && norm.is_some()).then(|| self.acts(qs.cur, true));
            let next = self
                .next_input(li, false)
                .filter(|_| fused && moe.int8_output(q8));
            let tail = next.as_ref().map(|n| MvTail {
                count: &self.tail_count,
                out: self.acts(1 - qs.cur, n.norm.is_some()),
                gam: n.norm,
                n: n.n as u64,
            });
            let io = MoeIo {
                x: &self.x,
                gam,
                eps,
                y: &self.x,
                add: true,
                input,
                next: tail.as_ref(),
                fuse_route: fused,
            };
            let op = MoeFfn::new(ctx, moe, &io, q8)?;
            ops.push(("moe", Op::MoeDecode(op)));
            *qs = match next {
                // The last down projection quantized the next block's input.
                Some(n) => QState {
                    cur: 1 - qs.cur,
                    ready: true,
                    xnorm: n.norm.is_some(),
                },
                // The block leaves f32 output: the next int8 mat-vec quantizes it first.
                None => QState {
                    cur: qs.cur,
                    ready: false,
                    xnorm: false,
                },
            };
        } else {
            let scratch = self
                .moe
                .as_ref()
                .ok_or_else(|| VkError::Invalid("a MoE layer without MoE scratch".into()))?;
            let op = MoeSteps::new(ctx, moe, &self.x, gam, eps, &self.step_dev, scratch)?;
            ops.push(("moe", Op::MoePrefill(op)));
        }
        Ok(())
    }

    /// What a decode mat-vec finishing a block of layer `li` (its mixer with
    /// `after_mixer`, else its MLP) may quantize for the block after it: the input of
    /// the layer's MLP, of the next layer, or of the head.
    fn next_input(&self, li: usize, after_mixer: bool) -> Option<NextInput<'_>> {
        if !self.fuse_quant {
            return None;
        }
        let m = &self.m;
        let d = m.model.config.d_model;
        let l = &m.layers[li];
        if !after_mixer && (l.ple.is_some() || l.out_scale.is_some()) {
            // The layer's end changes x after its FFN.
            return None;
        }
        // The block after: its norm, projections and, for a MoE, the block.
        let block = match (after_mixer, l.ffn_input()) {
            (true, Some((norm, projs))) => Some((norm, projs, l.ffn_moe())),
            _ => m.layers.get(li + 1).map(|nl| match nl.mixer_input() {
                Some((norm, projs)) => (norm, projs, None),
                None => nl
                    .ffn_input()
                    .map_or((None, Vec::new(), None), |(n, p)| (n, p, nl.ffn_moe())),
            }),
        };
        match block {
            Some((norm, projs, moe)) => {
                // A MoE block reads it (normed) where the fused sequence runs.
                let moe_q8 = moe.is_some_and(|mb| {
                    self.moe_fused
                        && norm.is_some()
                        && mb.d_model == d as u64
                        && mb.int8_input(m.ctx.tuning().q8_acts)
                });
                (moe_q8 || projs.iter().any(|p| self.q8_input(p) && p.k == d))
                    .then_some(NextInput { norm, n: d })
            }
            None => self.q8_input(&m.output).then_some(NextInput {
                norm: Some(&m.output_norm),
                n: d,
            }),
        }
    }

    /// Query heads per workgroup of decode attention (`attn_decode`, `attn_batch`) for
    /// groups of `gsize` heads of `hd`: what shared memory allows, at most the
    /// `CALDERA_VK_ATTN_HPW` knob.
    fn decode_hpw(&self, gsize: usize, hd: usize) -> usize {
        decode_hpw(gsize, hd).min(self.attn_hpw)
    }

    /// `attn_dec`'s launch shape for groups of `gsize` query heads of `hd`, or `None`
    /// where single-sequence decode attention runs `attn_decode` (see `attn_new`).
    fn dec_shape(&self, gsize: usize, hd: usize) -> Option<AttnDecShape> {
        if !self.attn_new {
            return None;
        }
        let wg = self.m.ctx.tuning().workgroup_size;
        attn_dec_shape(
            gsize,
            hd,
            wg,
            self.cap,
            self.attn_hpw,
            self.attn_dec_split,
            self.attn_dec_blocks,
        )
    }

    /// The decode attention kernel (batched or not) for groups of `gsize` query heads of
    /// `hd` and its launch: (kernel, query heads per workgroup, head chunks, positions
    /// per split, splits, the flag bits that merge the chunks from `attn_merge` splits on).
    fn attn_launch(
        &self,
        gsize: usize,
        hd: usize,
        batched: bool,
        sinks: bool,
    ) -> (Kernel, usize, usize, usize, usize, u32) {
        // attn_dec_batch has no sinks: a batched step with them takes attn_batch.
        let dec = if batched && sinks {
            None
        } else {
            self.dec_shape(gsize, hd)
        };
        if let Some(sh) = dec {
            let k = if batched {
                Kernel::AttnDecBatch
            } else {
                Kernel::AttnDec
            };
            return (k, sh.hpw, sh.n_chunks, sh.split, sh.blocks, 0);
        }
        let full = self.decode_hpw(gsize, hd);
        // A single sequence's group that fits one workgroup runs in small chunks that
        // the kernel merges into the whole group from attn_merge splits on (flags bits
        // 16-23); a group that does not fit is never merged.
        let chunked = !batched && self.attn_merge > 0 && full == gsize;
        let hpw = if chunked {
            full.min(self.attn_hpw_small)
        } else {
            full
        };
        let merge_flag = if chunked && hpw < gsize {
            (self.attn_merge as u32) << 16
        } else {
            0
        };
        let target_flag = if batched {
            0
        } else {
            (self.attn_target as u32) << 24
        };
        let split = self.attn_split;
        let k = if batched {
            Kernel::AttnBatch
        } else {
            Kernel::AttnDecode
        };
        let splits = self.cap.div_ceil(split);
        (
            k,
            hpw,
            gsize.div_ceil(hpw),
            split,
            splits,
            merge_flag | target_flag,
        )
    }

    /// Whether the decode mat-vec of `p` runs on int8 activations.
    fn q8_input(&self, p: &Proj) -> bool {
        self.m.ctx.tuning().q8_acts && Mvq::supports(p.ty) && p.k.is_multiple_of(32)
    }

    /// Int8 activation buffers of pair `i`, with its sums of squares when `ss`.
    fn acts(&self, i: usize, ss: bool) -> Q8Acts<'_> {
        Q8Acts {
            q: &self.xq[i],
            d: &self.xd[i],
            ss: ss.then_some(&self.xss[i]),
        }
    }

    /// Decode mat-vecs of `projs` (each with the output offset its rows write at) on
    /// input `x`, normed by `norm` when given. When the context quantizes activations
    /// and a projection's type has an int8 kernel, those read the int8 input of `qs`:
    /// prepared by the mat-vec before (`qs.ready`), or by a QuantX (with the norm) pushed
    /// here; the others read x in f32 and norm it themselves. With `next`, a single int8
    /// mat-vec writing the whole vector from 0 also quantizes its output for the next
    /// mat-vec into the other buffer pair, and `qs` says so afterwards.
    #[allow(clippy::too_many_arguments)]
    fn push_decode_mv(
        &self,
        ops: &mut Vec<(&'static str, Op)>,
        label: &'static str,
        projs: &[(&Proj, u64)],
        x: &Buffer,
        norm: Option<&Buffer>,
        y: &Buffer,
        mode: MvMode,
        qs: &mut QState,
        next: Option<NextInput<'_>>,
    ) -> Result<()> {
        let ctx = &self.m.ctx;
        let eps = self.m.model.config.norm_eps;
        let k = projs.first().map_or(0, |p| p.0.k);
        let q8 = |p: &Proj| self.q8_input(p) && p.k == k;
        let cur = qs.cur;
        let acts = self.acts(cur, qs.ready && qs.xnorm);
        if !qs.ready && projs.iter().any(|(p, _)| q8(p)) {
            let qx = QuantX::new(ctx, k as u64, x, norm, eps, &acts)?;
            ops.push(("quant", Op::Quant(qx)));
        }
        let next = next.filter(|_| projs.len() == 1 && q8(projs[0].0) && projs[0].1 == 0);
        let mut group = Vec::new();
        for &(p, off) in projs {
            if q8(p) {
                let tail = next.as_ref().map(|n| MvTail {
                    count: &self.tail_count,
                    out: self.acts(1 - cur, n.norm.is_some()),
                    gam: n.norm,
                    n: n.n as u64,
                });
                let m = MvMode { eps, ..mode };
                let op =
                    Mvq::with_tail(ctx, p.ty, &p.t, p.k as u64, &acts, y, off, m, tail.as_ref())?;
                group.push(DecodeMv::Q8(op));
            } else {
                let m = MvMode {
                    norm: norm.is_some(),
                    eps,
                    ..mode
                };
                let op = Mv::new(ctx, p.ty, &p.t, p.k as u64, x, y, off, norm, m)?;
                group.push(DecodeMv::F32(op));
            }
        }
        ops.push((label, Op::Mv(group)));
        *qs = match next {
            Some(n) => QState {
                cur: 1 - cur,
                ready: true,
                xnorm: n.norm.is_some(),
            },
            None => QState {
                cur,
                ready: false,
                xnorm: false,
            },
        };
        Ok(())
    }

    /// `y (+)= W input` with the residual add: straight into x, or through `tmp` and the
    /// post-norm kernel when the layer has one.
    #[allow(clippy::too_many_arguments)]
    fn push_out_proj(
        &self,
        ops: &mut Vec<(&'static str, Op)>,
        label: &'static str,
        p: &Proj,
        x: &Buffer,
        ld_x: u64,
        glu: Option<GluAct>,
        post_norm: Option<&Buffer>,
        b: u64,
        qs: &mut QState,
        next: Option<NextInput<'_>>,
    ) -> Result<()> {
        let ctx = &self.m.ctx;
        let cfg = &self.m.model.config;
        let d = cfg.d_model as u64;
        let y = if post_norm.is_some() {
            &self.tmp
        } else {
            &self.x
        };
        if self.is_decode(b as usize) {
            // Decode: a plain mat-vec over the input's first row.
            let mode = MvMode {
                add: post_norm.is_none(),
                ..Default::default()
            };
            // With a post-norm the output is not x yet: nothing to prepare.
            let next = next.filter(|_| post_norm.is_none());
            self.push_decode_mv(ops, label, &[(p, 0)], x, None, y, mode, qs, next)?;
        } else {
            let io = MmIo {
                x,
                ld_x,
                y,
                ld_y: d,
                y_offset: 0,
                gam: Some(&self.m.ones),
                step: &self.step_dev,
                max_tokens: b,
            };
            let mode = MmMode {
                glu,
                add: post_norm.is_none(),
                eps: cfg.norm_eps,
                ..Default::default()
            };
            // A batched step's input may be quantized already (`attn_batch`).
            let ready = qs.ready && self.batch.is_some();
            ops.push((
                label,
                Op::Mm(vec![
                    self.mm_in(ctx, p.ty, &p.t, p.k as u64, &io, mode, ready, false)?
                ]),
            ));
        }
        if let Some(pn) = post_norm {
            let binding = ctx.bind(Kernel::AddNorm, &[&self.x, &self.tmp, pn, &self.step_dev])?;
            let push = push_words(&[u32_of(cfg.d_model, "d_model")?, cfg.norm_eps.to_bits()]);
            ops.push(("add_norm", Op::Kernel(binding, push, b)));
        }
        Ok(())
    }

    /// Writes the input embeddings of `tokens` into `x_in`.
    fn write_embeddings(&mut self, tokens: impl Iterator<Item = u32>) -> Result<()> {
        let cfg = &self.m.model.config;
        let w = &self.m.model.weights.tok_embd;
        self.embed_bytes.clear();
        for t in tokens {
            quant::dequantize(w.ty, w.row(t as usize), &mut self.embed_row)
                .map_err(|e| VkError::Invalid(format!("token embedding {t}: {e}")))?;
            let sc = cfg.embed_scale.unwrap_or(1.0);
            for v in &self.embed_row {
                self.embed_bytes.extend_from_slice(&(v * sc).to_le_bytes());
            }
        }
        self.m.ctx.write_mapped(&self.x_in, 0, &self.embed_bytes)
    }

    /// Gemma 4: writes the per-layer token embeddings of `tokens` (one per step row, or
    /// per column of a batched step) into `tok_in`; nothing for other models.
    fn write_ple_tokens(&mut self, tokens: impl Iterator<Item = u32>) -> Result<()> {
        let (Some(pb), Some(pl)) = (&mut self.ple, &self.m.model.extras.per_layer_inputs) else {
            return Ok(());
        };
        let w = &pl.tok_embd;
        self.embed_bytes.clear();
        for t in tokens {
            if t as usize >= w.rows {
                return Err(VkError::Invalid(format!(
                    "token {t} is outside the per-layer embeddings ({} rows)",
                    w.rows
                )));
            }
            quant::dequantize(w.ty, w.row(t as usize), &mut pb.row_buf)
                .map_err(|e| VkError::Invalid(format!("per-layer token embedding {t}: {e}")))?;
            for v in &pb.row_buf {
                self.embed_bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
        self.m.ctx.write_mapped(&pb.tok_in, 0, &self.embed_bytes)
    }

    /// Whether `CALDERA_VK_TRACE` asked for step timings on stderr.
    pub(crate) fn trace(&self) -> bool {
        self.trace
    }

    /// Columns a batched runner's step takes at most (0 for other runners).
    pub(crate) fn batch_cols(&self) -> usize {
        self.batch.as_ref().map_or(0, |b| b.cols)
    }

    /// A batched decode step (batched runners only): column c decodes token `cols[c].2`
    /// of the sequence in pool slot `cols[c].0` at position `cols[c].1`; `out` receives
    /// the columns' logits rows, in order. Runs in the recording of the smallest bucket
    /// (power of two) holding the columns; the padding columns do nothing. Column c's
    /// logits are then [`VkRunner::batch_logits`]`(c)`.
    pub(crate) fn run_batch(&mut self, cols: &[(u32, u32, u32)], greedy: bool) -> Result<()> {
        let max = self.batch_cols();
        let n = cols.len();
        if n == 0 || n > max {
            return Err(VkError::Invalid(format!(
                "a batched step of {n} sequences on a batch of up to {max}"
            )));
        }
        let bucket = n.next_power_of_two();
        let key = (bucket, Head::All, greedy);
        if !self.steps.contains_key(&key) {
            let s = self.record_step(bucket, Head::All, greedy)?;
            self.steps.insert(key, s);
        }
        self.write_embeddings(cols.iter().map(|c| c.2))?;
        // Gemma 4: each column's per-layer token embeddings (its own token's).
        self.write_ple_tokens(cols.iter().map(|c| c.2))?;
        // The step values: [n, 0, 0, n (logits rows), 0 x 4], then (slot, position) per
        // column (reusing the embedding bytes' buffer: no allocation per step).
        let words = [n as u32, 0, 0, n as u32, 0, 0, 0, 0]
            .into_iter()
            .chain(cols.iter().flat_map(|&(slot, pos, _)| [slot, pos]));
        self.embed_bytes.clear();
        for w in words {
            self.embed_bytes.extend_from_slice(&w.to_le_bytes());
        }
        let ctx = &self.m.ctx;
        ctx.write_mapped(&self.step, 0, &self.embed_bytes)?;
        let t0 = std::time::Instant::now();
        ctx.submit(&self.steps[&key].rec)?;
        if self.trace {
            eprintln!(
                "batched step of {n} sequences (bucket {bucket}, {} dispatches): {:?}",
                self.steps[&key].rec.dispatches(),
                t0.elapsed()
            );
            // With CALDERA_VK_PROFILE too: its device time by op.
            if let Some(times) = self.steps[&key].rec.profile()? {
                eprintln!("batched step by op: {}", profile_line(&times));
            }
        }
        self.stats.steps += 1;
        self.stats.tokens += n as u64;
        Ok(())
    }

    /// Replaces `out` with the logits of column `c` of the last batched step.
    pub(crate) fn batch_logits(&self, c: usize, out: &mut Vec<f32>) -> Result<()> {
        let host = self
            .logits_all
            .as_ref()
            .map(|l| &l.1)
            .ok_or_else(|| VkError::Invalid("the all-rows logits buffer is missing".into()))?;
        let vocab = self.m.model.config.vocab_size;
        out.clear();
        self.m
            .ctx
            .read_mapped_f32(host, (c * vocab * 4) as u64, vocab, out)
    }

    /// The token id of column `c` of the last batched step, recorded greedy.
    pub(crate) fn batch_argmax(&self, c: usize) -> Result<u32> {
        self.read_id(c)
    }

    /// Row `c`'s id from the last greedy step's readback.
    fn read_id(&self, c: usize) -> Result<u32> {
        let host = self
            .ids
            .as_ref()
            .map(|l| &l.1)
            .ok_or_else(|| VkError::Invalid("no greedy step has run".into()))?;
        self.m.ctx.read_mapped_u32(host, (c * 4) as u64)
    }

    /// That `tokens` fit after the sequence's and are in the vocabulary.
    fn check_tokens(&self, tokens: &[u32]) -> std::result::Result<(), RunError> {
        let vocab = self.m.model.config.vocab_size;
        let need = self.len + tokens.len();
        if need > self.cap {
            return Err(format!(
                "context is full: {need} tokens needed, the sequence holds {}",
                self.cap
            )
            .into());
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(format!("token id {id} is outside the vocabulary of {vocab}").into());
        }
        Ok(())
    }

    /// Counts a token decoded by a batched step for this sequence.
    pub(crate) fn advance(&mut self) {
        self.len += 1;
        self.stats.steps += 1;
        self.stats.tokens += 1;
    }

    /// Runs one step of `tokens` (at most `self.chunk`) at position `self.len`; logits of
    /// tokens `first..` are appended to `out` when `first` is given, or with `greedy`
    /// (one row wanted: `first` the last token) only that row's argmax is found, on the
    /// device, and returned.
    fn run_step(
        &mut self,
        tokens: &[u32],
        first: Option<usize>,
        out: &mut Vec<f32>,
        greedy: bool,
    ) -> Result<Option<u32>> {
        let n = tokens.len();
        let bucket = if n == 1 { 1 } else { self.chunk };
        let want = first.map_or(0, |f| n - f);
        let all = want > 1;
        let head = match want {
            0 => Head::None,
            1 => Head::One,
            _ => Head::All,
        };
        let greedy = greedy && want == 1;
        let key = (bucket, head, greedy);
        if !self.steps.contains_key(&key) {
            let s = self.record_step(bucket, head, greedy)?;
            if bucket == 1 && head != Head::None {
                self.stats.decode_dispatches = s.rec.dispatches();
            }
            self.steps.insert(key, s);
        }
        self.write_embeddings(tokens.iter().copied())?;
        self.write_ple_tokens(tokens.iter().copied())?;
        let cfg = &self.m.model.config;
        let ctx = &self.m.ctx;
        let vals = [
            n as u32,
            self.len as u32,
            first.unwrap_or(0) as u32,
            want as u32,
        ];
        let mut bytes = [0u8; 16];
        for (dst, v) in bytes.chunks_exact_mut(4).zip(vals) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        ctx.write_mapped(&self.step, 0, &bytes)?;
        if let Some(l) = &self.lease {
            // Pages for every position the step writes (an error, before anything ran,
            // when the pool has none left), copies of shared ones it writes into.
            l.batch.prepare(l.slot, self.len, self.len + n)?;
        }
        let step = &self.steps[&key];
        let t0 = std::time::Instant::now();
        ctx.submit(&step.rec)?;
        if let Some(l) = &self.lease {
            l.batch.note_written(l.slot, self.len, tokens);
        }
        let times = step.rec.profile()?;
        if let (Some(times), true) = (&times, bucket > 1) {
            // CALDERA_VK_TRACE + CALDERA_VK_PROFILE: device time of a prefill step by op.
            eprintln!("prefill step of {n} tokens: {}", profile_line(times));
        } else if let Some(times) = times {
            for (label, ns) in times {
                let e = self.profile_ns.entry(label).or_insert((0.0, 0));
                e.0 += ns;
                e.1 += 1;
            }
            self.profile_steps += 1;
        }
        if self.trace {
            eprintln!("step of {n} tokens (bucket {bucket}): {:?}", t0.elapsed());
        }
        self.len += n;
        self.stats.steps += 1;
        self.stats.tokens += n as u64;
        if greedy {
            return self.read_id(0).map(Some);
        }
        if want > 0 {
            let host = if all {
                self.logits_all.as_ref().map(|l| &l.1).ok_or_else(|| {
                    VkError::Invalid("the all-rows logits buffer is missing".into())
                })?
            } else {
                &self.logits1.1
            };
            ctx.read_mapped_f32(host, 0, want * cfg.vocab_size, out)?;
        }
        Ok(None)
    }
}

/// The logits rows a recorded step's LM head makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Head {
    /// None: no LM head (an earlier chunk of a prompt).
    None,
    /// One row (`logits1`): decode's, or a prefill step's selected token.
    One,
    /// The all-rows buffer (several tokens of a prompt, or a batched step's columns).
    All,
}

enum Op {
    Mm(Vec<AnyMm>),
    Mv(Vec<DecodeMv>),
    Quant(QuantX),
    Attention(PrefillAttention),
    Kernel(Binding, Vec<u8>, u64),
    Rec(RecOp),
    Act(RowsAct),
    MoeDecode(MoeFfn),
    MoePrefill(MoeSteps),
    Ext(crate::extras::RowsExt),
    Ple(crate::extras::PleIn),
}

/// A mat-vec over a step's tokens: [`Mm`], or in a batched decode step on int8
/// activations, the columns' quantization and the batched int8 mat-vec.
enum AnyMm {
    Mm(Mm),
    /// The columns' quantization (none where an op before left the input quantized)
    /// and the batched int8 mat-vec.
    Q8(Option<QuantRows>, Mvqn),
    /// The columns in f16 (none where an earlier member of the group halved the same
    /// input) and the cooperative-matrix mat-vec.
    Coop(Option<HalfRows>, Mvc),
}

impl AnyMm {
    /// Whether an earlier member of `group` left its input (the same one where `same`)
    /// prepared: int8 (`quant_rows`), f16 (`half_rows`).
    fn prepared(group: &[AnyMm], same: bool) -> (bool, bool) {
        let any = |f: fn(&AnyMm) -> bool| same && group.iter().any(f);
        (
            any(|g| matches!(g, AnyMm::Q8(..))),
            any(|g| matches!(g, AnyMm::Coop(..))),
        )
    }

    fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        match self {
            AnyMm::Mm(m) => m.record(r),
            AnyMm::Q8(q, m) => {
                // Members of a group share the int8 buffers: one after another (those
                // reading the same input, quantized once, need no barrier between).
                if let Some(q) = q {
                    r.barrier();
                    q.record(r)?;
                    r.barrier();
                }
                m.record(r)
            }
            AnyMm::Coop(h, m) => {
                if let Some(h) = h {
                    r.barrier();
                    h.record(r)?;
                    r.barrier();
                }
                m.record(r)
            }
        }
    }
}

/// A recurrent mixer's op (`recurrent.rs`).
enum RecOp {
    GdnDecode(GdnDecode),
    GdnPrefill(GdnPrefill),
    Mamba2Decode(Mamba2Decode),
    Mamba2Prefill(Mamba2Prefill),
    ShortConvDecode(ShortConvDecode),
    ShortConvPrefill(ShortConvPrefill),
}

impl RecOp {
    fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        match self {
            RecOp::GdnDecode(op) => op.record(r),
            RecOp::GdnPrefill(op) => op.record(r),
            RecOp::Mamba2Decode(op) => op.record(r),
            RecOp::Mamba2Prefill(op) => op.record(r),
            RecOp::ShortConvDecode(op) => op.record(r),
            RecOp::ShortConvPrefill(op) => op.record(r),
        }
    }
}

/// Where an MLP's down projection writes: added to the residual stream x (through the
/// post-norm when there is one); a decode mat-vec may quantize `next` from it.
struct MlpOut<'a> {
    post_norm: Option<&'a Buffer>,
    next: Option<NextInput<'a>>,
}

/// Where a decode step's int8 mat-vec input is: buffer pair `cur`, `ready` when the
/// mat-vec before quantized it (else a QuantX will), `xnorm` when it still needs the
/// norm's 1 / rms (from its per-block sums of squares).
#[derive(Clone, Copy, Default)]
struct QState {
    cur: usize,
    ready: bool,
    xnorm: bool,
}

/// The input of the mat-vec after this one, which a decode mat-vec may quantize for it
/// (`MV_TAIL`): `n` values of its output, through the RMSNorm by `norm`.
#[derive(Clone, Copy)]
struct NextInput<'a> {
    norm: Option<&'a Buffer>,
    n: usize,
}

/// A decode mat-vec on f32 activations, or on the int8 ones of the step's QuantX.
enum DecodeMv {
    F32(Mv),
    Q8(Mvq),
}

impl caldera_model::Runner for VkRunner {
    fn capacity(&self) -> usize {
        self.cap
    }

    fn stats(&self) -> caldera_model::RunnerStats {
        let s = self.stats;
        caldera_model::RunnerStats {
            decode_dispatches: (s.decode_dispatches > 0).then_some(s.decode_dispatches),
            decode_submits: Some(s.decode_submits),
            layers: s.layers,
            profile: self.profile(),
        }
    }

    fn measure_bandwidth(&mut self) -> Option<f64> {
        self.m.ctx.measure_copy_bandwidth().ok()
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }

    fn len(&self) -> usize {
        self.len
    }

    /// A sequence of a [`VkBatch`](crate::VkBatch) takes the longest prefix of `tokens`
    /// that its pool holds (`VkBatch::reuse`: its own pages' positions past its length,
    /// or another slot's pages, which its table then names too); with recurrent layers,
    /// the longest prompt snapshot `tokens` continues (`VkBatch::restore`: its states
    /// copied into the slot's, its pages shared).
    fn reuse_prefix(&mut self, tokens: &[u32], limit: usize) -> usize {
        let Some(l) = &self.lease else {
            return self.len;
        };
        if self.states.iter().any(Option::is_some) {
            match l
                .batch
                .restore(l.slot, self.len, tokens, limit.min(self.cap))
            {
                Ok(n) => {
                    if self.trace && n > self.len {
                        eprintln!("restored a prompt snapshot of {n} positions");
                    }
                    self.len = n;
                }
                Err(e) => {
                    // The slot's states may be half copied: start over (a lost device
                    // fails the next step).
                    if self.trace {
                        eprintln!("restoring a prompt snapshot failed: {e}");
                    }
                    let _ = RecurrentState::reset_all(&self.m.ctx, self.states.iter().flatten());
                    self.len = 0;
                    l.batch.note_len(l.slot, 0);
                }
            }
            return self.len;
        }
        // A failed reuse (a lost device writing the table) leaves the sequence as it was;
        // its next step reports the error.
        if let Ok(n) = l.batch.reuse(l.slot, self.len, tokens, limit.min(self.cap)) {
            if self.trace && n > self.len {
                eprintln!("reused {} positions of the pool", n - self.len);
            }
            self.len = n;
        }
        self.len
    }

    /// A sequence of a [`VkBatch`](crate::VkBatch) with recurrent layers: a snapshot of
    /// the prompt it holds now (`VkBatch::snapshot`), for later sequences whose prompt
    /// starts with it. Nothing for other runners (their pages are shared as they are).
    fn checkpoint(&mut self) {
        let Some(l) = &self.lease else {
            return;
        };
        if self.states.iter().all(Option::is_none) {
            return;
        }
        // A failed copy (a lost device) keeps no snapshot; the next step reports it.
        match l.batch.snapshot(l.slot, self.len) {
            Ok(true) if self.trace => {
                eprintln!("prompt snapshot of {} positions", self.len);
            }
            Err(e) if self.trace => eprintln!("a prompt snapshot failed: {e}"),
            _ => {}
        }
    }

    /// A sequence of a [`VkBatch`](crate::VkBatch): what it computed stays in its pages
    /// for any sequence's `reuse_prefix` after it is emptied, until a step writes over it
    /// or the pool takes them back.
    fn shares_prefixes(&self) -> bool {
        // Not with recurrent states: a slot's states hold only its own sequence's latest
        // position, so an idle slot keeps its sequence for its own next request (its
        // prompt's snapshot serves the other slots, as on the CPU).
        self.lease.is_some() && self.states.iter().all(Option::is_none)
    }

    fn truncate(&mut self, n: usize) -> bool {
        if n >= self.len {
            return true;
        }
        if self.states.iter().all(Option::is_none) {
            // The KV cache keeps every position; later tokens overwrite what follows n
            // (a batch sequence's pages past n stay lendable, and are the first its
            // batch takes back when the pool runs short: `VkBatch::reuse`).
            self.len = n;
            if let Some(l) = &self.lease {
                l.batch.note_len(l.slot, n);
            }
            return true;
        }
        // Recurrent states keep only the latest position: they cannot rewind, but they
        // can start over.
        if n != 0 {
            return false;
        }
        if RecurrentState::reset_all(&self.m.ctx, self.states.iter().flatten()).is_err() {
            return false;
        }
        self.len = 0;
        if let Some(l) = &self.lease {
            l.batch.note_len(l.slot, 0);
        }
        true
    }

    fn forward(
        &mut self,
        tokens: &[u32],
        logits: Logits,
        out: &mut Vec<f32>,
    ) -> std::result::Result<(), RunError> {
        self.check_tokens(tokens)?;
        out.clear();
        let chunk = match logits {
            Logits::All => self.all_rows.min(self.chunk),
            Logits::Last => self.chunk,
        };
        let n_chunks = tokens.len().div_ceil(chunk);
        for (ci, c) in tokens.chunks(chunk).enumerate() {
            let first = match logits {
                Logits::All => Some(0),
                Logits::Last if ci + 1 == n_chunks => Some(c.len() - 1),
                Logits::Last => None,
            };
            self.run_step(c, first, out, false)?;
        }
        Ok(())
    }

    /// [`Self::forward`] with [`Logits::Last`], the last row reduced to its argmax on
    /// the device (`argmax.comp`): 4 bytes come back instead of the row.
    fn forward_argmax(&mut self, tokens: &[u32]) -> std::result::Result<Option<u32>, RunError> {
        self.check_tokens(tokens)?;
        if tokens.is_empty() || !crate::sample::device_argmax() {
            return Ok(None);
        }
        let mut out = Vec::new();
        let n_chunks = tokens.len().div_ceil(self.chunk);
        let mut id = None;
        for (ci, c) in tokens.chunks(self.chunk).enumerate() {
            let first = (ci + 1 == n_chunks).then(|| c.len() - 1);
            id = self.run_step(c, first, &mut out, first.is_some())?;
        }
        Ok(id)
    }

    fn describe(&self) -> String {
        let info = self.m.ctx.info();
        let s = self.stats;
        let per_token = if s.decode_dispatches > 0 {
            format!(
                ", decode {} dispatches / 1 submit per token",
                s.decode_dispatches
            )
        } else {
            String::new()
        };
        let coop = match self.m.ctx.tuning().coopmat_mm {
            Some(c) => format!(", coopmat {}x{}x{} prefill", c.m, c.n, c.k),
            None => String::new(),
        };
        format!(
            "vulkan, {} ({}), {} KV cache{coop}{per_token}",
            info.name,
            info.device_type.name(),
            self.m.ctx.tuning().kv
        )
    }
}

/// "label N us, ..." from a step's timestamps, each label's time summed over the layers
/// in order of first appearance.
fn profile_line(times: &[(&'static str, f64)]) -> String {
    let mut by: Vec<(&str, f64)> = Vec::new();
    for &(label, ns) in times {
        match by.iter_mut().find(|e| e.0 == label) {
            Some(e) => e.1 += ns,
            None => by.push((label, ns)),
        }
    }
    let list: Vec<String> = by
        .iter()
        .map(|(l, ns)| format!("{l} {:.0} us", ns / 1e3))
        .collect();
    list.join(", ")
}
