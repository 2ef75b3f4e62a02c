//! Small ops that some architectures add around the standard layer: bias adds (gpt-oss's
//! biased projections), the layer output scale and the per-layer input gate and inputs
//! of Gemma 4 (`rows_ext.comp`, `ple_in.comp`), and the selection of a prefill step's
//! logits row (`rows_ext.comp`). Each is one dispatch over a step's
//! tokens; their CPU twins are in `tests/extras.rs`.

use crate::context::Context;
use crate::error::{Result, VkError};
use crate::kernels::Kernel;
use crate::memory::Buffer;
use crate::ops::push_words;
use crate::record::{Binding, Recorder};

fn u32_of(v: u64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| VkError::Invalid(format!("{what} = {v} does not fit in 32 bits")))
}

/// What [`RowsExt`] does to each value `y[t * ld_y + y_off + i]`, `i < n`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RowExt {
    /// `y += src[i]`: a projection's bias.
    Bias,
    /// `y *= s`: Gemma 4's layer output scale.
    Scale(f32),
    /// `y = gelu_tanh(y) * src[t * ld_src + src_off + i]`: Gemma 4's per-layer input gate.
    GeluMul { ld_src: u64, src_off: u64 },
    /// `y = src[(step[2] + t) * ld_src + src_off + i]`: the rows of the tokens whose
    /// logits are wanted (from the step values' `[2]` on), e.g. a prefill step's one
    /// selected row for the LM head's decode mat-vec. `src` must hold every row the
    /// step values can select.
    Select { ld_src: u64, src_off: u64 },
}

/// Elementwise over `n` values of the rows of a step's tokens (`step[0]` of them, at most
/// `max_tokens`): `rows_ext.comp`, one dispatch.
pub struct RowsExt {
    binding: Binding,
    push: Vec<u8>,
    groups: u64,
}

/// Where a [`RowsExt`] works: `y` rows `ld_y` apart from `y_off`; `src` (the bias or
/// the per-layer inputs; unread for `Scale`); the step values.
pub struct RowsIo<'a> {
    pub y: &'a Buffer,
    pub ld_y: u64,
    pub y_off: u64,
    pub src: &'a Buffer,
    pub step: &'a Buffer,
    pub max_tokens: u64,
}

impl RowsExt {
    pub fn new(ctx: &Context, op: RowExt, n: u64, io: &RowsIo<'_>) -> Result<RowsExt> {
        let t = io.max_tokens;
        let (mode, ld_src, src_off, scale, src_need) = match op {
            RowExt::Bias => (0u32, 0, 0, 0.0f32, n),
            RowExt::Scale(s) => (1, 0, 0, s, 0),
            RowExt::GeluMul { ld_src, src_off } => (
                2,
                ld_src,
                src_off,
                0.0,
                (t.max(1) - 1) * ld_src + src_off + n,
            ),
            RowExt::Select { ld_src, src_off } => (
                3,
                ld_src,
                src_off,
                0.0,
                (t.max(1) - 1) * ld_src + src_off + n,
            ),
        };
        if n == 0
            || t == 0
            || io.ld_y < io.y_off + n
            || io.y.size() < ((t - 1) * io.ld_y + io.y_off + n) * 4
            || io.src.size() < src_need * 4
            || io.step.size() < 4
        {
            return Err(VkError::Invalid(format!(
                "{op:?} over {t} rows of {n} (stride {}): buffers too small",
                io.ld_y
            )));
        }
        let binding = ctx.bind(Kernel::RowsExt, &[io.y, io.src, io.step])?;
        let push = push_words(&[
            u32_of(n, "values per row")?,
            u32_of(io.ld_y, "row stride")?,
            u32_of(io.y_off, "row offset")?,
            u32_of(ld_src, "source stride")?,
            u32_of(src_off, "source offset")?,
            mode,
            u32_of(t, "rows")?,
            scale.to_bits(),
        ]);
        let wg = ctx.tuning().workgroup_size as u64;
        Ok(RowsExt {
            binding,
            push,
            groups: t * n.div_ceil(wg),
        })
    }

    /// Records the dispatch (no barrier after).
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        r.dispatch(&self.binding, &self.push, self.groups)
    }
}

/// The constants of Gemma 4's per-layer inputs (`caldera_model::weights::PerLayerInputs`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PleShape {
    pub n_layers: usize,
    /// Width of one layer's input.
    pub dpl: usize,
    pub eps: f32,
    pub proj_scale: f32,
    pub tok_scale: f32,
    pub input_scale: f32,
}

/// Gemma 4's per-layer inputs, in place over `pli` (`[token][layer][dpl]`, the model
/// projection of the embeddings): `(rmsnorm(pli * proj_scale) * norm + tok * tok_scale)
/// * input_scale`, `tok` the tokens' per-layer embedding rows (same layout):
/// `ple_in.comp`, one workgroup per (token, layer).
pub struct PleIn {
    binding: Binding,
    push: Vec<u8>,
    groups: u64,
}

impl PleIn {
    pub fn new(
        ctx: &Context,
        s: &PleShape,
        pli: &Buffer,
        tok: &Buffer,
        norm: &Buffer,
        step: &Buffer,
        max_tokens: u64,
    ) -> Result<PleIn> {
        let row = (s.n_layers * s.dpl) as u64;
        let need = max_tokens * row * 4;
        if s.n_layers == 0
            || s.dpl == 0
            || max_tokens == 0
            || pli.size() < need
            || tok.size() < need
            || norm.size() < s.dpl as u64 * 4
            || step.size() < 4
        {
            return Err(VkError::Invalid(format!(
                "per-layer inputs of {max_tokens} tokens x {} layers x {}: buffers too small",
                s.n_layers, s.dpl
            )));
        }
        let binding = ctx.bind(Kernel::PleIn, &[pli, tok, norm, step])?;
        let push = push_words(&[
            u32_of(s.n_layers as u64, "layers")?,
            u32_of(s.dpl as u64, "per-layer width")?,
            s.eps.to_bits(),
            s.proj_scale.to_bits(),
            s.tok_scale.to_bits(),
            s.input_scale.to_bits(),
        ]);
        Ok(PleIn {
            binding,
            push,
            groups: max_tokens * s.n_layers as u64,
        })
    }

    /// Records the dispatch (no barrier after).
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        r.dispatch(&self.binding, &self.push, self.groups)
    }
}
