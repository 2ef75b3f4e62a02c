//! `gemma3` (Gemma 3 text): embeddings scaled by sqrt(d_model); sandwich norms (pre and
//! post norm around both attention and MLP); per-head q/k RMSNorm; GeGLU (tanh GELU);
//! sliding-window layers (local RoPE base 10000) with every 6th layer global (the file's
//! base); attention scale 1/sqrt(head_dim). GGUF norm weights already hold (1 + w).
//! HF source: transformers `modeling_gemma3.py`.

use super::{bind_io, bind_layer, Common};
use crate::config::{Activation, ModelConfig, RopeStyle};
use crate::error::Result;
use crate::file::ModelFile;
use crate::weights::ModelWeights;
use crate::Model;

/// Every `PATTERN`-th layer (1-based) attends globally.
const PATTERN: usize = 6;
const LOCAL_ROPE_THETA: f32 = 10000.0;

pub fn build(f: &ModelFile) -> Result<Model> {
    let c = Common::read(f, "gemma3")?;
    let window = f
        .get_u64("gemma3.attention.sliding_window")
        .map(|w| w as usize);
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    let mut specs = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let global = (i + 1) % PATTERN == 0 || window.is_none();
        let (theta, win) = if global {
            (c.rope_theta, None)
        } else {
            (LOCAL_ROPE_THETA, window)
        };
        let mut rope = c.rope(f, RopeStyle::Neox, theta)?;
        if !global {
            rope.linear_scale = 1.0; // scaling applies to global layers only
        }
        specs.push(c.layer_spec(rope, win, true, Activation::GeluTanhGlu, scale));
    }
    let layers = specs
        .iter()
        .enumerate()
        .map(|(i, s)| bind_layer(f, i, s, c.d_model, true))
        .collect::<Result<Vec<_>>>()?;
    let (tok_embd, output_norm, output) = bind_io(f, &c)?;
    Ok(Model {
        config: ModelConfig {
            arch: "gemma3".into(),
            d_model: c.d_model,
            vocab_size: c.vocab_size,
            norm_eps: c.norm_eps,
            context_length: c.context_length,
            embed_scale: Some((c.d_model as f32).sqrt()),
            final_logit_softcap: f.get_f32("gemma3.final_logit_softcapping"),
            layers: specs,
        },
        weights: ModelWeights {
            tok_embd,
            layers,
            output_norm,
            output,
        },
    })
}
