//! `gemma3` (Gemma 3 text): embeddings scaled by sqrt(d_model); sandwich norms (pre and
//! post norm around both attention and MLP); per-head q/k RMSNorm; GeGLU (tanh GELU);
//! sliding-window layers (local RoPE base 10000) with every 6th layer global (the file's
//! base); attention scale 1/sqrt(head_dim). GGUF norm weights already hold (1 + w).
//! HF source: transformers `modeling_gemma3.py`.

use super::{bind_io, bind_standard_layer, ArchDef, Common};
use crate::config::{Activation, LayerSpec, Mixer, ModelConfig, RopeStyle};
use crate::error::Result;
use crate::file::ModelFile;
use crate::hf_names::{add_to_tensors, common_meta, map_common, Translation};
use crate::weights::ModelWeights;
use crate::Model;

pub static GEMMA3: ArchDef = ArchDef {
    name: "gemma3",
    hf_model_types: &["gemma3_text", "gemma3"],
    build,
    hf_translate: translate,
};

/// Every `PATTERN`-th layer (1-based) attends globally.
const PATTERN: usize = 6;
const LOCAL_ROPE_THETA: f32 = 10000.0;

fn build(f: &ModelFile) -> Result<Model> {
    let c = Common::read(f, "gemma3")?;
    let window = f
        .get_u64("gemma3.attention.sliding_window")
        .map(|w| w as usize);
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
        let mut attn = c.attn(Some(rope), true);
        attn.window = win;
        specs.push(LayerSpec {
            mixer: Some(Mixer::Attention(attn)),
            ffn: Some(c.dense(Activation::GeluTanhGlu)),
        });
    }
    let layers = specs
        .iter()
        .enumerate()
        .map(|(i, s)| bind_standard_layer(f, i, s, c.d_model, true))
        .collect::<Result<Vec<_>>>()?;
    let (tok_embd, output_norm, output) = bind_io(f, c.vocab_size, c.d_model)?;
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
        extras: Default::default(),
    })
}

fn translate(t: &mut Translation) -> Result<()> {
    common_meta(t)?;
    if let Some(w) = t.u64("sliding_window") {
        t.set_u32("attention.sliding_window", w);
    }
    let _ = map_common(t, true);
    // Gemma's RMSNorm multiplies by (1 + w); GGUF stores 1 + w.
    add_to_tensors(t, |n| n.ends_with("norm.weight"), 1.0)
}
