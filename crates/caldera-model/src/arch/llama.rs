//! `llama` (Llama 2/3, SmolLM2, Mistral) and `qwen3` (Qwen3 dense: per-head q/k RMSNorm).
//! Pre-norm decoder: x += o(attn(rope(q), rope(k), v)); x += down(silu(gate) * up).
//! HF sources: transformers `modeling_llama.py`, `modeling_qwen3.py`.

use super::{bind_io, bind_layer, Common};
use crate::config::{Activation, ModelConfig, RopeStyle};
use crate::error::Result;
use crate::file::ModelFile;
use crate::weights::ModelWeights;
use crate::Model;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Llama,
    Qwen3,
}

pub fn build(f: &ModelFile, v: Variant) -> Result<Model> {
    let arch = match v {
        Variant::Llama => "llama",
        Variant::Qwen3 => "qwen3",
    };
    let c = Common::read(f, arch)?;
    // GGUF llama stores q/k rows permuted for adjacent-pair RoPE; qwen3 keeps NeoX halves.
    let style = match v {
        Variant::Llama => RopeStyle::Interleaved,
        Variant::Qwen3 => RopeStyle::Neox,
    };
    let rope = c.rope(f, style, c.rope_theta)?;
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    let spec = c.layer_spec(rope, None, v == Variant::Qwen3, Activation::SwiGlu, scale);
    let layers_spec = vec![spec; c.n_layers];
    let layers = layers_spec
        .iter()
        .enumerate()
        .map(|(i, s)| bind_layer(f, i, s, c.d_model, false))
        .collect::<Result<Vec<_>>>()?;
    let (tok_embd, output_norm, output) = bind_io(f, &c)?;
    Ok(Model {
        config: ModelConfig {
            arch: arch.into(),
            d_model: c.d_model,
            vocab_size: c.vocab_size,
            norm_eps: c.norm_eps,
            context_length: c.context_length,
            embed_scale: None,
            final_logit_softcap: None,
            layers: layers_spec,
        },
        weights: ModelWeights {
            tok_embd,
            layers,
            output_norm,
            output,
        },
    })
}
