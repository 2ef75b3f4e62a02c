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
