//! Gated short convolution (LFM2): `[B, C, x] = in_proj(h)` (three blocks of `channels`
//! rows, in that order), `y = C * conv(B * x)` where `conv` is a causal depthwise
//! convolution of kernel length `l_cache` over time (one kernel per channel, optional
//! bias), then `out = out_proj(y)`. Its per-sequence state is the last `l_cache - 1`
//! inputs `B * x` of every channel.
//!
//! GGUF names (llama.cpp's): `blk.{i}.shortconv.in_proj` (`[d_model, 3 * channels]`),
//! `blk.{i}.shortconv.conv` (`[l_cache, channels]`: row `c` holds channel `c`'s kernel,
//! oldest tap first, the last tap multiplying the current input), optional
//! `blk.{i}.shortconv.conv.bias` (`channels`), `blk.{i}.shortconv.out_proj`
//! (`[channels, d_model]`); the projections may carry `.bias`.

use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::weights::Weight;

#[derive(Clone, Debug)]
pub struct ShortConvSpec {
    /// Convolved channels (the hidden size in LFM2).
    pub channels: usize,
    /// Kernel length (`shortconv.l_cache`, HF `conv_L_cache`); at least 1.
    pub l_cache: usize,
}

pub struct ShortConvWeights {
    /// `[3 * channels, d_model]`: rows `0..c` are B, `c..2c` are C, `2c..3c` are x.
    pub in_proj: Weight,
    /// `channels * l_cache` values, channel-major: `conv[ch * l_cache + k]` multiplies the
    /// input `l_cache - 1 - k` steps back.
    pub conv: Vec<f32>,
    /// `channels` values added to the convolution, if the model has them.
    pub conv_bias: Option<Vec<f32>>,
    /// `[d_model, channels]`.
    pub out_proj: Weight,
}

impl ShortConvWeights {
    pub fn bind(
        f: &ModelFile,
        layer: usize,
        spec: &ShortConvSpec,
        d_model: usize,
    ) -> Result<ShortConvWeights> {
        let p = |s: &str| format!("blk.{layer}.{s}");
        let (c, l) = (spec.channels, spec.l_cache);
        if c == 0 || l == 0 {
            return Err(ModelError::Invalid(format!(
                "layer {layer}: short conv with {c} channels and kernel length {l}"
            )));
        }
        let rows = c
            .checked_mul(3)
            .ok_or_else(|| ModelError::Invalid(format!("layer {layer}: {c} channels")))?;
        let taps = c
            .checked_mul(l)
            .ok_or_else(|| ModelError::Invalid(format!("layer {layer}: conv size overflows")))?;
        let name = p("shortconv.conv.weight");
        let t = f
            .tensor(&name)
            .ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
        // [l, c] as llama.cpp stores it; [l, 1, c] as an unsqueezed HF kernel also loads.
        let dims_ok = match t.dims.as_slice() {
            [a, b] => *a == l as u64 && *b == c as u64,
            [a, 1, b] => *a == l as u64 && *b == c as u64,
            _ => false,
        };
        if !dims_ok {
            return Err(ModelError::BadTensor {
                name,
                msg: format!("expected dims [{l}, {c}], found {:?}", t.dims),
            });
        }
        Ok(ShortConvWeights {
            in_proj: f.weight(&p("shortconv.in_proj.weight"), rows, d_model)?,
            conv: f.vector(&name, taps)?,
            conv_bias: f.opt_vector(&p("shortconv.conv.bias"), c)?,
            out_proj: f.weight(&p("shortconv.out_proj.weight"), d_model, c)?,
        })
    }
}
