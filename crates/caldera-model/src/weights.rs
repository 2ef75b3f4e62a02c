//! Weights bound to a model's layers: views into the mapped file, never copies (small
//! vectors such as norms and biases are f32 copies).

use caldera_format::{GgmlType, TensorBytes};

pub use crate::blocks::gdn::GdnWeights;
pub use crate::blocks::mamba2::Mamba2Weights;
pub use crate::blocks::moe::{ExpertWeights, MoeWeights};
pub use crate::blocks::shortconv::ShortConvWeights;

/// A 2-D weight stored row-major as `rows` rows of `cols` elements (GGUF dims
/// `[cols, rows]`); each row is a whole number of `ty` blocks. `y = W x (+ bias)`.
#[derive(Clone, Debug)]
pub struct Weight {
    pub name: String,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: TensorBytes,
    /// `rows` values added to the product, when the file has `<name>.bias`.
    pub bias: Option<Vec<f32>>,
}

impl Weight {
    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.rows.max(1)
    }

    /// The raw blocks of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data.as_slice()[r * rb..(r + 1) * rb]
    }

    pub fn bytes(&self) -> &[u8] {
        self.data.as_slice()
    }
}

/// Attention: q/k/v → (q/k norm, RoPE) → attention → o.
pub struct AttnWeights {
    pub q: Weight,
    pub k: Weight,
    pub v: Weight,
    pub o: Weight,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    /// One logit per head (gpt-oss sinks).
    pub sinks: Option<Vec<f32>>,
}

/// A dense MLP: down(act(gate x, up x)); no gate for ungated activations.
pub struct DenseFfn {
    pub gate: Option<Weight>,
    pub up: Weight,
    pub down: Weight,
}

// One per layer: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum MixerWeights {
    Attention(AttnWeights),
    GatedDeltaNet(GdnWeights),
    Mamba2(Mamba2Weights),
    ShortConv(ShortConvWeights),
}

#[allow(clippy::large_enum_variant)]
pub enum FfnWeights {
    Dense(DenseFfn),
    Moe(MoeWeights),
}

/// One layer: `x += post_norm(mixer(norm(x)))`, then `x += ffn_post_norm(ffn(ffn_norm(x)))`.
pub struct Layer {
    pub norm: Option<Vec<f32>>,
    pub mixer: Option<MixerWeights>,
    pub post_norm: Option<Vec<f32>>,
    pub ffn_norm: Option<Vec<f32>>,
    pub ffn: Option<FfnWeights>,
    pub ffn_post_norm: Option<Vec<f32>>,
}

pub struct ModelWeights {
    /// `[vocab, d_model]` rows are token embeddings.
    pub tok_embd: Weight,
    pub layers: Vec<Layer>,
    pub output_norm: Vec<f32>,
    /// `[vocab, d_model]`; the embedding matrix itself when tied.
    pub output: Weight,
}

/// Per-layer input embeddings (Gemma 4 "PLE"). Every layer `l` gets its own `d`-wide
/// input per token:
/// `pli[l] = (rmsnorm(P x * proj_scale)[l] * proj_norm + E[t][l] * tok_scale) * input_scale`,
/// where `x` is the scaled token embedding, `P` is `model_proj` `[n_layers * d, d_model]`
/// and `E` is `tok_embd` `[vocab_pl, n_layers * d]` (layer-major within a row). After
/// layer `l`'s FFN residual, `x += rmsnorm(proj(gelu_tanh(gate x) * pli[l])) * post_norm`
/// (see [`PerLayerBlock`]).
pub struct PerLayerInputs {
    /// Width of one layer's input.
    pub d: usize,
    pub tok_embd: Weight,
    pub tok_scale: f32,
    pub model_proj: Weight,
    pub proj_scale: f32,
    /// `d` values.
    pub proj_norm: Vec<f32>,
    pub input_scale: f32,
    /// One per layer.
    pub layers: Vec<PerLayerBlock>,
}

/// One layer's use of its per-layer input.
pub struct PerLayerBlock {
    /// `[d, d_model]`
    pub gate: Weight,
    /// `[d_model, d]`
    pub proj: Weight,
    /// `d_model` values.
    pub post_norm: Vec<f32>,
}

/// Per-layer parts only some architectures have; `Default` is none of them.
#[derive(Clone, Debug, Default)]
pub struct LayerExtras {
    /// v heads are RMS-normalized without a scale before caching (Gemma 4).
    pub v_norm: bool,
    /// The layer has no k/v of its own: it attends over the KV cache of this earlier
    /// layer (Gemma 4 KV sharing). Its own k/v weights are unused.
    pub kv_from: Option<usize>,
    /// The residual stream is multiplied by this at the end of the layer.
    pub out_scale: Option<f32>,
}
