//! Whole attention-transformer models (`llama`, `qwen3`, `gemma3`: every layer attention
//! + dense gated MLP) on one device, behind [`caldera_model::Runner`].
//!
//! [`VkModel`] holds the weights, uploaded once in their quantized form; adjacent
//! projections of the same type and width (q|k|v, gate|up) become one tensor so they run
//! as one mat-vec. [`VkRunner`] is one sequence: its f32 KV cache, scratch buffers and
//! recordings. A step of `m` tokens is a [`Recording`] made once per (bucket, logits)
//! shape and replayed with ONE submit: the step values (`m`, first position, logits rows)
//! and the input embeddings live in host-visible buffers written before the submit; no
//! allocation, descriptor update or pipeline creation happens per token.
//!
//! Decode (one token) per layer of llama / qwen3: q|k|v mat-vec (one dispatch per weight
//! type), `attn_decode` (q/k norm, RoPE, KV write, split attention, int8 output),
//! o-proj with the residual add, gate|up with the GLU, down with the residual add; each
//! int8 mat-vec quantizes the next one's input block by block (`MV_TAIL`; only the first
//! layer's input needs a `quant_x`); weight types without int8 kernels read f32 x and
//! norm it themselves (`mv.glsl`). Prefill (steps of up to CHUNK tokens): norm + QKV
//! (`Mm`: the tiled matmul), `rope_kv`, attention (`PrefillAttention`: flash attention
//! over the cache), o-proj + residual, norm + gate|up, GLU + down + residual.
//! Gemma's post-norms add one `add_norm` dispatch each.

use std::collections::HashMap;
use std::sync::Arc;

use caldera_format::quant;
use caldera_format::GgmlType;
use caldera_model::{
    Activation, AttnSpec, FfnSpec, FfnWeights, Logits, Mixer, MixerWeights, Model, RopeSpec,
    RopeStyle, RunError, Weight,
};

use crate::context::Context;
use crate::error::{Result, VkError};
use crate::kernels::{attn_split, Kernel};
use crate::memory::{Buffer, DeviceTensor, MemoryKind};
use crate::ops::{
    push_words, AttnIo, AttnShape, GluAct, Mm, MmIo, MmMode, Mv, MvMode, MvTail, Mvq,
    PrefillAttention, Q8Acts, QuantX,
};
use crate::record::{Binding, Recorder, Recording};

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

struct VkLayer {
    attn: AttnSpec,
    d_ff: usize,
    act: GluAct,
    norm: Option<Buffer>,
    /// q | k | v output rows (one Proj per run of equal types).
    qkv: Vec<Proj>,
    q_norm: Option<Buffer>,
    k_norm: Option<Buffer>,
    o: Proj,
    post_norm: Option<Buffer>,
    ffn_norm: Option<Buffer>,
    /// gate and up rows interleaved (row 2i gate i, row 2i + 1 up i), pieces of whole pairs.
    gate_up: Proj,
    down: Proj,
    ffn_post_norm: Option<Buffer>,
}

/// A model's weights on one device, shared by every sequence ([`VkRunner`]) on it.
pub struct VkModel {
    ctx: Context,
    model: Arc<Model>,
    layers: Vec<VkLayer>,
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
            if w.bias.is_some() {
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

impl VkModel {
    /// Uploads `model`'s weights to the device of `ctx`. Fails for architectures whose
    /// blocks this backend does not run yet.
    pub fn new(ctx: Context, model: Arc<Model>) -> Result<VkModel> {
        let cfg = &model.config;
        let w = &model.weights;
        if model.extras.per_layer_inputs.is_some() {
            return Err(unsupported("per-layer inputs".into()));
        }
        if model
            .extras
            .layers
            .iter()
            .any(|e| e.v_norm || e.kv_from.is_some() || e.out_scale.is_some())
        {
            return Err(unsupported(
                "v norm, shared KV or layer output scales".into(),
            ));
        }
        let mut layers = Vec::with_capacity(cfg.layers.len());
        for (li, (spec, lw)) in cfg.layers.iter().zip(&w.layers).enumerate() {
            let (Some(Mixer::Attention(a)), Some(MixerWeights::Attention(aw))) =
                (&spec.mixer, &lw.mixer)
            else {
                return Err(unsupported(format!("layer {li}: non-attention mixers")));
            };
            let (Some(FfnSpec::Dense { d_ff, act }), Some(FfnWeights::Dense(fw))) =
                (&spec.ffn, &lw.ffn)
            else {
                return Err(unsupported(format!("layer {li}: MoE or missing MLPs")));
            };
            let act = match act {
                Activation::SwiGlu => GluAct::Silu,
                Activation::GeluTanhGlu => GluAct::GeluTanh,
                other => return Err(unsupported(format!("layer {li}: activation {other:?}"))),
            };
            let Some(gate) = &fw.gate else {
                return Err(unsupported(format!("layer {li}: ungated MLPs")));
            };
            if a.sinks || a.q_gate {
                return Err(unsupported(format!("layer {li}: attention sinks or gates")));
            }
            if a.n_kv_heads == 0
                || a.n_heads % a.n_kv_heads != 0
                || a.head_dim > 256
                || a.head_dim % 4 != 0
            {
                return Err(unsupported(format!(
                    "layer {li}: {} heads over {} kv heads of {}",
                    a.n_heads, a.n_kv_heads, a.head_dim
                )));
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
            if aw.q.rows != qd || aw.k.rows != kvd || aw.v.rows != kvd || aw.o.cols != qd {
                return Err(VkError::Invalid(format!("layer {li}: attention shapes")));
            }
            if gate.rows != *d_ff || fw.up.rows != *d_ff || fw.down.cols != *d_ff {
                return Err(VkError::Invalid(format!("layer {li}: MLP shapes")));
            }
            let o = upload_proj(&ctx, &[&aw.o])?.remove(0);
            let down = upload_proj(&ctx, &[&fw.down])?.remove(0);
            layers.push(VkLayer {
                attn: a.clone(),
                d_ff: *d_ff,
                act,
                norm: upload_norm(&ctx, &lw.norm)?,
                qkv: upload_proj(&ctx, &[&aw.q, &aw.k, &aw.v])?,
                q_norm: upload_norm(&ctx, &aw.q_norm)?,
                k_norm: upload_norm(&ctx, &aw.k_norm)?,
                o,
                post_norm: upload_norm(&ctx, &lw.post_norm)?,
                ffn_norm: upload_norm(&ctx, &lw.ffn_norm)?,
                gate_up: upload_glu(&ctx, gate, &fw.up)?,
                down,
                ffn_post_norm: upload_norm(&ctx, &lw.ffn_post_norm)?,
            });
        }
        let output = upload_proj(&ctx, &[&w.output])?.remove(0);
        let output_norm = ctx.upload_f32(&w.output_norm)?;
        let mut weight_bytes = output.t.rows * output.t.row_bytes;
        for l in &layers {
            for p in l.qkv.iter().chain([&l.gate_up, &l.o, &l.down]) {
                weight_bytes += p.t.rows * p.t.row_bytes;
            }
        }
        let widest = layers
            .iter()
            .flat_map(|l| l.qkv.iter().chain([&l.gate_up, &l.o, &l.down]))
            .chain([&output])
            .map(|p| p.k)
            .max()
            .unwrap_or(1);
        let ones = ctx.upload_f32(&vec![1.0; widest])?;
        Ok(VkModel {
            ctx,
            model,
            layers,
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

/// One sequence on a [`VkModel`]: KV caches, scratch buffers, recorded steps.
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
    qkv: Buffer,
    att: Buffer,
    gu: Buffer,
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
    kv: Vec<(Buffer, Buffer)>,
    /// RoPE table per layer (shared between layers with equal specs).
    rope: Vec<Option<Buffer>>,
    /// Logits of one row (device, host-visible copy) and of `all_rows` rows.
    logits1: (Buffer, Buffer),
    logits_all: Option<(Buffer, Buffer)>,
    all_rows: usize,
    steps: HashMap<(usize, bool), Step>,
    stats: StepStats,
    embed_row: Vec<f32>,
    embed_bytes: Vec<u8>,
    /// `CALDERA_VK_TRACE` set: print each step's time (read once, not per token).
    trace: bool,
    /// Decode mat-vecs quantize the next input block by block (`MV_TAIL`) instead of a
    /// `quant_x` dispatch: 5-6 dispatches per layer instead of 8-9.
    /// `CALDERA_VK_FUSE_QUANT=0` turns it off.
    fuse_quant: bool,
    /// `CALDERA_VK_PROFILE=1`: decode steps write GPU timestamps after every op.
    profile: bool,
    /// Device nanoseconds per op label (total, count) over `profile_steps` decode steps.
    profile_ns: HashMap<&'static str, (f64, u64)>,
    profile_steps: u64,
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
        for l in &m.layers {
            let a = &l.attn;
            max_qkv = max_qkv.max((a.n_heads + 2 * a.n_kv_heads) * a.head_dim);
            max_q = max_q.max(a.n_heads * a.head_dim);
            max_ff = max_ff.max(l.d_ff);
        }
        // The widest scratch row decides how many tokens a step holds.
        let widest_row = d.max(max_qkv).max(2 * max_ff) as u64 * 4;
        let mut chunk = CHUNK;
        while chunk > MIN_CHUNK && chunk as u64 * widest_row > ctx.max_buffer_bytes() {
            chunk /= 2;
        }
        let step = ctx.create_buffer(16, MemoryKind::Upload)?;
        let step_dev = ctx.create_buffer(16, MemoryKind::Device)?;
        let x_in = ctx.create_buffer((chunk * d * 4) as u64, MemoryKind::Upload)?;
        let x = dev(chunk * d, "the residual stream")?;
        let tmp = dev(chunk * d, "a scratch buffer")?;
        let qkv = dev(chunk * max_qkv, "the q/k/v rows")?;
        let att = dev(chunk * max_q, "the attention output")?;
        let gu = dev(chunk * 2 * max_ff, "the gate/up rows")?;
        let widest = d.max(max_q).max(max_ff);
        let mut part_len = 1usize;
        let mut counts = 1usize;
        for l in &m.layers {
            let a = &l.attn;
            if a.head_dim > 256 {
                return Err(unsupported(format!("attention heads of {}", a.head_dim)));
            }
            let splits = cap.div_ceil(attn_split(cap));
            part_len = part_len.max(a.n_heads * splits * (a.head_dim + 2));
            counts = counts.max(a.n_kv_heads * (a.n_heads / a.n_kv_heads).div_ceil(8));
        }
        let attn_part = dev(part_len, "the attention partials")?;
        let attn_count = ctx.upload(&vec![0u8; counts * 4])?;
        let tail_count = ctx.upload(&vec![0u8; widest.div_ceil(32) * 4])?;
        let xq = [
            dev(widest.div_ceil(4), "the quantized activations")?,
            dev(widest.div_ceil(4), "the quantized activations")?,
        ];
        let xd = [
            dev(widest.div_ceil(32), "the activation scales")?,
            dev(widest.div_ceil(32), "the activation scales")?,
        ];
        let xss = [
            dev(widest.div_ceil(32), "the activation sums of squares")?,
            dev(widest.div_ceil(32), "the activation sums of squares")?,
        ];
        let mut kv = Vec::with_capacity(m.layers.len());
        let mut rope: Vec<Option<Buffer>> = Vec::with_capacity(m.layers.len());
        for (li, l) in m.layers.iter().enumerate() {
            let kvd = l.attn.n_kv_heads * l.attn.head_dim;
            let n = cap
                .checked_mul(kvd)
                .ok_or_else(|| VkError::Invalid("KV cache size overflows".into()))?;
            // f16: two values per 4-byte word.
            let words = if ctx.tuning().kv_f16 {
                n.div_ceil(2)
            } else {
                n
            };
            kv.push((
                dev(words, "a layer's K cache")?,
                dev(words, "a layer's V cache")?,
            ));
            let table = match &l.attn.rope {
                None => None,
                Some(spec) => {
                    let prev = m.layers[..li].iter().zip(&rope).find(|(pl, b)| {
                        b.is_some() && pl.attn.rope.as_ref().is_some_and(|r| same_rope(r, spec))
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
        let vocab = cfg.vocab_size;
        let logits1 = (
            dev(vocab, "a logits row")?,
            ctx.create_buffer((vocab * 4) as u64, MemoryKind::Readback)?,
        );
        let all_rows =
            (ctx.max_buffer_bytes() / (vocab as u64 * 4)).clamp(1, chunk as u64) as usize;
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
            xq,
            xd,
            xss,
            tail_count,
            attn_part,
            attn_count,
            kv,
            rope,
            logits1,
            logits_all: None,
            all_rows,
            steps: HashMap::new(),
            embed_row: vec![0.0; d],
            embed_bytes: Vec::with_capacity(chunk * d * 4),
            trace: std::env::var_os("CALDERA_VK_TRACE").is_some(),
            profile: std::env::var("CALDERA_VK_PROFILE").is_ok_and(|v| v == "1"),
            fuse_quant: std::env::var("CALDERA_VK_FUSE_QUANT").map_or(true, |v| v != "0"),
            profile_ns: HashMap::new(),
            profile_steps: 0,
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

    /// Records the step for `bucket` tokens; `all` selects the all-rows logits buffer.
    fn record_step(&mut self, bucket: usize, all: bool) -> Result<Step> {
        let m = self.m.clone();
        let ctx = &m.ctx;
        let cfg = &m.model.config;
        let d = cfg.d_model;
        let eps = cfg.norm_eps;
        let b = bucket as u64;
        // One token: the decode mat-vecs (mv.glsl); more: the batched ones (mm.glsl).
        let decode = bucket == 1;
        let mut ops: Vec<(&'static str, Op)> = Vec::new();
        let wg_bind = |k: Kernel, bufs: &[&Buffer]| ctx.bind(k, bufs);
        // Decode: xq / xd already hold the next q|k|v input (the previous layer's down
        // mat-vec quantized it).
        let mut qs = QState::default();
        for (li, l) in m.layers.iter().enumerate() {
            let a = &l.attn;
            let (hd, nh, nkv) = (a.head_dim, a.n_heads, a.n_kv_heads);
            let ld_qkv = (nh + 2 * nkv) * hd;
            // norm + q|k|v
            let mut group = Vec::new();
            if decode {
                let projs: Vec<(&Proj, u64)> = l.qkv.iter().map(|p| (p, p.offset as u64)).collect();
                self.push_decode_mv(
                    &mut ops,
                    "qkv",
                    &projs,
                    &self.x,
                    l.norm.as_ref(),
                    &self.qkv,
                    MvMode::default(),
                    &mut qs,
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
                    gam: Some(l.norm.as_ref().unwrap_or(&m.ones)),
                    step: &self.step_dev,
                    max_tokens: b,
                };
                let mode = MmMode {
                    norm: l.norm.is_some(),
                    eps,
                    ..Default::default()
                };
                group.push(Mm::new(ctx, p.ty, &p.t, p.k as u64, &io, mode)?);
            }
            if !decode {
                ops.push(("qkv", Op::Mm(group)));
            }
            // q/k norm + RoPE + KV write
            let (kc, vc) = &self.kv[li];
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
            // Decode: one kernel for norm + RoPE + KV write + attention, which also
            // quantizes its output for the o-projection when that runs on int8.
            let o_q8 = decode && self.q8_input(&l.o) && hd.is_multiple_of(32);
            if decode {
                let gsize = nh / nkv;
                let hpw = gsize.min(8);
                let n_chunks = gsize.div_ceil(hpw);
                let split = attn_split(self.cap);
                let max_splits = self.cap.div_ceil(split);
                let binding = wg_bind(
                    Kernel::AttnDecode,
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
                    ],
                )?;
                let q8_flag = if o_q8 { 16 } else { 0 };
                // Profiling only: CALDERA_VK_ATTN_STOP=1|2 ends attention after its q/k
                // preparation | its softmax-weighted values (wrong output).
                let stop = std::env::var("CALDERA_VK_ATTN_STOP")
                    .ok()
                    .and_then(|v| v.parse::<u32>().ok())
                    .unwrap_or(0)
                    .min(3);
                let q8_flag = q8_flag | (stop << 8);
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
                qs = QState {
                    cur: qs.cur,
                    ready: o_q8,
                    xnorm: false,
                };
                let next = (self.fuse_quant && self.q8_input(&l.gate_up)).then_some(NextInput {
                    norm: l.ffn_norm.as_ref(),
                    n: d,
                });
                self.push_out_proj(
                    &mut ops,
                    "o",
                    &l.o,
                    &self.att,
                    (nh * hd) as u64,
                    None,
                    l.post_norm.as_ref(),
                    b,
                    &mut qs,
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
                    ],
                )?;
                let push = push_words(&[
                    u32_of(nh, "heads")?,
                    u32_of(nkv, "kv heads")?,
                    u32_of(hd, "head size")?,
                    u32_of(n_rot, "rotated dims")?,
                    flags,
                    u32_of(ld_qkv, "qkv width")?,
                    eps.to_bits(),
                ]);
                ops.push(("rope_kv", Op::Kernel(binding, push, b * (nh + nkv) as u64)));
                // attention
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
                    out: &self.att,
                    step: &self.step_dev,
                    max_tokens: b,
                };
                let att = PrefillAttention::new(ctx, &shape, &io)?;
                ops.push(("attention", Op::Attention(att)));
                // o-proj + residual (through the post-norm when there is one)
                self.push_out_proj(
                    &mut ops,
                    "o",
                    &l.o,
                    &self.att,
                    (nh * hd) as u64,
                    None,
                    l.post_norm.as_ref(),
                    b,
                    &mut QState::default(),
                    None,
                )?;
            }
            // norm + gate|up (decode: with the GLU, into gu[0 .. d_ff])
            let p = &l.gate_up;
            if decode {
                let mode = MvMode {
                    glu: Some(l.act),
                    ..Default::default()
                };
                let next = (self.fuse_quant && self.q8_input(&l.down)).then_some(NextInput {
                    norm: None,
                    n: l.d_ff,
                });
                self.push_decode_mv(
                    &mut ops,
                    "gate_up",
                    &[(p, 0)],
                    &self.x,
                    l.ffn_norm.as_ref(),
                    &self.gu,
                    mode,
                    &mut qs,
                    next,
                )?;
            } else {
                let io = MmIo {
                    x: &self.x,
                    ld_x: d as u64,
                    y: &self.gu,
                    ld_y: 2 * l.d_ff as u64,
                    y_offset: 0,
                    gam: Some(l.ffn_norm.as_ref().unwrap_or(&m.ones)),
                    step: &self.step_dev,
                    max_tokens: b,
                };
                let mode = MmMode {
                    norm: l.ffn_norm.is_some(),
                    eps,
                    ..Default::default()
                };
                ops.push((
                    "gate_up",
                    Op::Mm(vec![Mm::new(ctx, p.ty, &p.t, p.k as u64, &io, mode)?]),
                ));
            }
            // (GLU +) down + residual
            let (ld, glu) = if decode {
                (l.d_ff as u64, None)
            } else {
                (2 * l.d_ff as u64, Some(l.act))
            };
            // Decode: down quantizes the next q|k|v input (or the head's).
            let next = if !decode || !self.fuse_quant {
                None
            } else if let Some(nl) = m.layers.get(li + 1) {
                nl.qkv
                    .iter()
                    .any(|p| self.q8_input(p) && p.k == d)
                    .then_some(NextInput {
                        norm: nl.norm.as_ref(),
                        n: d,
                    })
            } else {
                self.q8_input(&m.output).then_some(NextInput {
                    norm: Some(&m.output_norm),
                    n: d,
                })
            };
            self.push_out_proj(
                &mut ops,
                "down",
                &l.down,
                &self.gu,
                ld,
                glu,
                l.ffn_post_norm.as_ref(),
                b,
                &mut qs,
                next,
            )?;
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
        if decode {
            let mode = MvMode {
                softcap: cfg.final_logit_softcap,
                ..Default::default()
            };
            self.push_decode_mv(
                &mut ops,
                "head",
                &[(&m.output, 0)],
                &self.x,
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
            let head = Mm::new(ctx, m.output.ty, &m.output.t, m.output.k as u64, &io, mode)?;
            ops.push(("head", Op::Mm(vec![head])));
        }
        let in_bytes = (bucket * d * 4) as u64;
        let out_bytes = (rows * cfg.vocab_size * 4) as u64;
        // Prefill steps are profiled only to print with CALDERA_VK_TRACE.
        let profiled = self.profile && (decode || self.trace);
        let rec = ctx.record_with(profiled, |r: &mut Recorder<'_>| {
            r.copy(&self.x_in, &self.x, in_bytes)?;
            r.copy(&self.step, &self.step_dev, 16)?;
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
                }
                r.barrier();
                r.mark(label);
            }
            r.copy(ldev, lhost, out_bytes)?;
            r.mark("output");
            Ok(())
        })?;
        Ok(Step { rec })
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
        if b == 1 {
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
            ops.push((
                label,
                Op::Mm(vec![Mm::new(ctx, p.ty, &p.t, p.k as u64, &io, mode)?]),
            ));
        }
        if let Some(pn) = post_norm {
            let binding = ctx.bind(Kernel::AddNorm, &[&self.x, &self.tmp, pn, &self.step_dev])?;
            let push = push_words(&[u32_of(cfg.d_model, "d_model")?, cfg.norm_eps.to_bits()]);
            ops.push(("add_norm", Op::Kernel(binding, push, b)));
        }
        Ok(())
    }

    /// Runs one step of `tokens` (at most `self.chunk`) at position `self.len`; logits of
    /// tokens `first..` are appended to `out` when `first` is given.
    fn run_step(&mut self, tokens: &[u32], first: Option<usize>, out: &mut Vec<f32>) -> Result<()> {
        let n = tokens.len();
        let bucket = if n == 1 { 1 } else { self.chunk };
        let want = first.map_or(0, |f| n - f);
        let all = want > 1;
        let key = (bucket, all);
        if !self.steps.contains_key(&key) {
            let s = self.record_step(bucket, all)?;
            if bucket == 1 {
                self.stats.decode_dispatches = s.rec.dispatches();
            }
            self.steps.insert(key, s);
        }
        let cfg = &self.m.model.config;
        let w = &self.m.model.weights.tok_embd;
        self.embed_bytes.clear();
        for &t in tokens {
            quant::dequantize(w.ty, w.row(t as usize), &mut self.embed_row)
                .map_err(|e| VkError::Invalid(format!("token embedding {t}: {e}")))?;
            let sc = cfg.embed_scale.unwrap_or(1.0);
            for v in &self.embed_row {
                self.embed_bytes.extend_from_slice(&(v * sc).to_le_bytes());
            }
        }
        let ctx = &self.m.ctx;
        ctx.write_mapped(&self.x_in, 0, &self.embed_bytes)?;
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
        let step = &self.steps[&key];
        let t0 = std::time::Instant::now();
        ctx.submit(&step.rec)?;
        let times = step.rec.profile()?;
        if let (Some(times), true) = (&times, bucket > 1) {
            // CALDERA_VK_TRACE + CALDERA_VK_PROFILE: device time of a prefill step by op.
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
            eprintln!("prefill step of {n} tokens: {}", list.join(", "));
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
        Ok(())
    }
}

enum Op {
    Mm(Vec<Mm>),
    Mv(Vec<DecodeMv>),
    Quant(QuantX),
    Attention(PrefillAttention),
    Kernel(Binding, Vec<u8>, u64),
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

    fn len(&self) -> usize {
        self.len
    }

    fn truncate(&mut self, n: usize) -> bool {
        // The KV cache keeps every position; later tokens overwrite what follows n.
        self.len = self.len.min(n);
        true
    }

    fn forward(
        &mut self,
        tokens: &[u32],
        logits: Logits,
        out: &mut Vec<f32>,
    ) -> std::result::Result<(), RunError> {
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
            self.run_step(c, first, out)?;
        }
        Ok(())
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
        format!(
            "vulkan, {} ({}){per_token}",
            info.name,
            info.device_type.name()
        )
    }
}
