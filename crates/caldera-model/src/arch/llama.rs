//! `llama` (Llama 2/3, SmolLM2, Mistral) and `qwen3` (Qwen3 dense: per-head q/k RMSNorm).
//! Pre-norm decoder: x += o(attn(rope(q), rope(k), v)); x += down(silu(gate) * up).
//! HF sources: transformers `modeling_llama.py`, `modeling_qwen3.py`.

use super::{bind_standard_layer, ArchDef, Common};
use crate::config::{Activation, LayerSpec, Mixer, RopeStyle};
use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::hf_names::{common_meta, map_common, permute_for_interleaved_rope, Translation};
use crate::Model;

pub static LLAMA: ArchDef = ArchDef {
    name: "llama",
    hf_model_types: &["llama", "mistral"],
    build: build_llama,
    hf_translate: translate_llama,
};

pub static QWEN3: ArchDef = ArchDef {
    name: "qwen3",
    hf_model_types: &["qwen3"],
    build: build_qwen3,
    hf_translate: translate_qwen3,
};

fn build_llama(f: &ModelFile) -> Result<Model> {
    // GGUF llama stores q/k rows permuted for adjacent-pair RoPE.
    build(f, "llama", RopeStyle::Interleaved, false)
}

fn build_qwen3(f: &ModelFile) -> Result<Model> {
    build(f, "qwen3", RopeStyle::Neox, true)
}

fn build(f: &ModelFile, arch: &'static str, style: RopeStyle, qk_norm: bool) -> Result<Model> {
    let c = Common::read(f, arch)?;
    let rope = c.rope(f, style, c.rope_theta)?;
    let spec = LayerSpec {
        mixer: Some(Mixer::Attention(c.attn(Some(rope), qk_norm))),
        ffn: Some(c.dense(Activation::SwiGlu)),
    };
    let specs = vec![spec; c.n_layers];
    let layers = specs
        .iter()
        .enumerate()
        .map(|(i, s)| bind_standard_layer(f, i, s, c.d_model, false))
        .collect::<Result<Vec<_>>>()?;
    c.assemble(f, specs, layers)
}

fn check_rope(t: &Translation) -> Result<()> {
    let (_, ty, _) = crate::hf_names::rope_params(t.text_cfg(), None);
    if ty != "default" {
        return Err(ModelError::Invalid(format!(
            "rope_type '{ty}' is not supported for {} yet",
            t.arch
        )));
    }
    Ok(())
}

fn translate_llama(t: &mut Translation) -> Result<()> {
    check_rope(t)?;
    common_meta(t)?;
    let _ = map_common(t, false);
    let n_heads = t.req_u64("num_attention_heads")? as usize;
    let n_kv = t.u64("num_key_value_heads").map_or(n_heads, |v| v as usize);
    for rt in t.tensors.iter_mut() {
        if rt.name.ends_with("attn_q.weight") {
            permute_for_interleaved_rope(rt, n_heads)?;
        } else if rt.name.ends_with("attn_k.weight") {
            permute_for_interleaved_rope(rt, n_kv)?;
        }
    }
    Ok(())
}

fn translate_qwen3(t: &mut Translation) -> Result<()> {
    check_rope(t)?;
    common_meta(t)?;
    let _ = map_common(t, false);
    Ok(())
}
