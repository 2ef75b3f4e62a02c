//! Weights bound to a model's layers: views into the mapped file, never copies.

use caldera_format::{GgmlType, TensorBytes};

/// A 2-D weight stored row-major as `rows` rows of `cols` elements (GGUF dims
/// `[cols, rows]`); each row is a whole number of `ty` blocks.
#[derive(Clone, Debug)]
pub struct Weight {
    pub name: String,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: TensorBytes,
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

/// Attention block: `norm` → q/k/v → (q/k norm, RoPE) → attention → o → (`post_norm`).
pub struct AttnWeights {
    pub norm: Vec<f32>,
    pub q: Weight,
    pub k: Weight,
    pub v: Weight,
    pub o: Weight,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    /// Gemma's "sandwich" norm applied to the block output before the residual add.
    pub post_norm: Option<Vec<f32>>,
}

/// Gated MLP: `norm` → act(gate) * up → down → (`post_norm`).
pub struct FfnWeights {
    pub norm: Vec<f32>,
    pub gate: Weight,
    pub up: Weight,
    pub down: Weight,
    pub post_norm: Option<Vec<f32>>,
}

pub struct Layer {
    pub attn: AttnWeights,
    pub ffn: FfnWeights,
}

pub struct ModelWeights {
    /// `[vocab, d_model]` rows are token embeddings.
    pub tok_embd: Weight,
    pub layers: Vec<Layer>,
    pub output_norm: Vec<f32>,
    /// `[vocab, d_model]`; the embedding matrix itself when tied.
    pub output: Weight,
}

impl ModelWeights {
    /// Bytes of all weights (the output matrix counted once when tied).
    pub fn total_bytes(&self) -> usize {
        let mut n = self.tok_embd.data.len();
        if self.output.name != self.tok_embd.name {
            n += self.output.data.len();
        }
        for l in &self.layers {
            for w in [
                &l.attn.q,
                &l.attn.k,
                &l.attn.v,
                &l.attn.o,
                &l.ffn.gate,
                &l.ffn.up,
                &l.ffn.down,
            ] {
                n += w.data.len();
            }
        }
        n
    }
}
