//! Hugging Face folder → GGUF conventions: metadata keys from `config.json`, tensor
//! names, and the transforms llama.cpp's converter applies (q/k row permutation for
//! `llama`, +1 folded into Gemma norm weights). `convert` writes the same result.

use caldera_format::gguf::GgufValue;
use caldera_format::hf::HfModel;
use caldera_format::{GgmlType, TensorBytes};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::file::{ModelFile, RawTensor, TokenizerSource};

/// HF `model_type` → GGUF architecture string.
pub fn gguf_arch(model_type: &str) -> Option<&'static str> {
    Some(match model_type {
        "llama" | "mistral" => "llama",
        "qwen3" => "qwen3",
        "gemma3_text" | "gemma3" => "gemma3",
        _ => return None,
    })
}

fn cfg_u64(cfg: &Value, key: &str) -> Option<u64> {
    cfg.get(key).and_then(Value::as_u64)
}

fn cfg_f64(cfg: &Value, key: &str) -> Option<f64> {
    cfg.get(key).and_then(Value::as_f64)
}

/// The rope parameters of `config.json` (transformers 5 `rope_parameters`, or the older
/// top-level `rope_theta` + `rope_scaling`).
fn rope_params(cfg: &Value) -> (Option<f64>, Option<&Value>) {
    if let Some(rp) = cfg.get("rope_parameters").filter(|v| v.is_object()) {
        // Per-layer-type dicts (gemma) keep the full-attention entry as the main one.
        let main = rp.get("full_attention").unwrap_or(rp);
        return (main.get("rope_theta").and_then(Value::as_f64), Some(main));
    }
    (
        cfg_f64(cfg, "rope_theta"),
        cfg.get("rope_scaling").filter(|v| v.is_object()),
    )
}

/// Translates an HF folder into a [`ModelFile`] with GGUF metadata and tensor names.
pub fn translate(hf: &HfModel) -> Result<ModelFile> {
    let cfg = &hf.config;
    let model_type = cfg
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| ModelError::Invalid("config.json has no \"model_type\"".into()))?;
    let arch = gguf_arch(model_type).ok_or_else(|| {
        ModelError::UnsupportedArch(model_type.to_owned(), "llama, qwen3, gemma3_text".into())
    })?;
    let req = |key: &str| {
        cfg_u64(cfg, key).ok_or_else(|| ModelError::MissingKey(format!("config.json: {key}")))
    };
    let n_layers = req("num_hidden_layers")?;
    let d_model = req("hidden_size")?;
    let n_heads = req("num_attention_heads")?;
    let n_kv = cfg_u64(cfg, "num_key_value_heads").unwrap_or(n_heads);
    let head_dim = match cfg_u64(cfg, "head_dim") {
        Some(h) => h,
        None => d_model
            .checked_div(n_heads)
            .ok_or_else(|| ModelError::Invalid("num_attention_heads is 0".into()))?,
    };
    let (theta, rope) = rope_params(cfg);
    if let Some(rope) = rope {
        let ty = rope
            .get("rope_type")
            .or_else(|| rope.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if ty != "default" {
            return Err(ModelError::Invalid(format!(
                "rope_type '{ty}' is not supported yet"
            )));
        }
    }

    let mut meta: Vec<(String, GgufValue)> = Vec::new();
    let mut put = |k: String, v: GgufValue| meta.push((k, v));
    let u32v = |n: u64| GgufValue::U32(n.min(u32::MAX as u64) as u32);
    put(
        "general.architecture".into(),
        GgufValue::String(arch.into()),
    );
    put(
        "general.name".into(),
        GgufValue::String(hf.dir.display().to_string()),
    );
    put(format!("{arch}.block_count"), u32v(n_layers));
    put(format!("{arch}.embedding_length"), u32v(d_model));
    put(
        format!("{arch}.feed_forward_length"),
        u32v(req("intermediate_size")?),
    );
    put(format!("{arch}.attention.head_count"), u32v(n_heads));
    put(format!("{arch}.attention.head_count_kv"), u32v(n_kv));
    put(format!("{arch}.attention.key_length"), u32v(head_dim));
    put(format!("{arch}.attention.value_length"), u32v(head_dim));
    put(
        format!("{arch}.context_length"),
        u32v(cfg_u64(cfg, "max_position_embeddings").unwrap_or(4096)),
    );
    put(format!("{arch}.vocab_size"), u32v(req("vocab_size")?));
    let eps = cfg_f64(cfg, "rms_norm_eps").unwrap_or(1e-6);
    put(
        format!("{arch}.attention.layer_norm_rms_epsilon"),
        GgufValue::F32(eps as f32),
    );
    put(
        format!("{arch}.rope.freq_base"),
        GgufValue::F32(theta.unwrap_or(10000.0) as f32),
    );
    put(format!("{arch}.rope.dimension_count"), u32v(head_dim));
    if arch == "gemma3" {
        if let Some(w) = cfg_u64(cfg, "sliding_window") {
            put(format!("{arch}.attention.sliding_window"), u32v(w));
        }
    }

    let tie = cfg
        .get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut tensors = Vec::new();
    for t in &hf.tensors {
        let Some(name) = gguf_name(arch, &t.name) else {
            continue; // rotary caches and other non-weights
        };
        if tie && name == "output.weight" {
            continue;
        }
        let ty = t.ty;
        let dims: Vec<u64> = t.shape.iter().rev().map(|&d| d as u64).collect();
        let mut data = t.data.clone();
        let mut ty_out = ty;
        if arch == "llama" && (name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight")) {
            let heads = if name.ends_with("attn_q.weight") {
                n_heads
            } else {
                n_kv
            };
            data = permute_rows_for_interleaved_rope(&data, ty, &t.shape, heads as usize).map_err(
                |msg| ModelError::BadTensor {
                    name: t.name.clone(),
                    msg,
                },
            )?;
        }
        if arch == "gemma3" && name.ends_with("norm.weight") {
            // Gemma's RMSNorm multiplies by (1 + w); GGUF stores 1 + w.
            let n: usize = t.shape.iter().product();
            let mut v = vec![0f32; n];
            caldera_format::quant::dequantize(ty, data.as_slice(), &mut v)?;
            let bytes: Vec<u8> = v.iter().flat_map(|x| (x + 1.0).to_le_bytes()).collect();
            data = TensorBytes::from_vec(bytes);
            ty_out = GgmlType::F32;
        }
        tensors.push(RawTensor {
            name,
            ty: ty_out,
            dims,
            data,
        });
    }

    let mut f = ModelFile::new(&hf.dir, "hf", meta, tensors)?;
    f.chat_template = hf.chat_template();
    if let Some(json) = &hf.tokenizer_json {
        f.tokenizer = TokenizerSource::HfJson {
            json: json.clone(),
            config: hf.tokenizer_config.clone(),
        };
    }
    Ok(f)
}

/// The GGUF name of an HF tensor, or `None` for tensors that are not weights we use.
pub fn gguf_name(arch: &str, hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (idx, rest) = rest.split_once('.')?;
    let layer: usize = idx.parse().ok()?;
    let gemma = arch == "gemma3";
    let short = match rest {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "post_attention_layernorm.weight" if gemma => "post_attention_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "pre_feedforward_layernorm.weight" => "ffn_norm.weight",
        "post_feedforward_layernorm.weight" => "post_ffw_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}"))
}

/// Reorders the rows of a q or k projection (`shape` = [heads*head_dim, cols], HF order)
/// so that RoPE on adjacent pairs equals HF's rotate-half RoPE: within each head, new
/// row `2i + a` is old row `a * head_dim/2 + i`.
fn permute_rows_for_interleaved_rope(
    data: &TensorBytes,
    ty: GgmlType,
    shape: &[usize],
    heads: usize,
) -> std::result::Result<TensorBytes, String> {
    let [rows, cols] = shape else {
        return Err(format!("expected a 2-D tensor, found shape {shape:?}"));
    };
    let (rows, cols) = (*rows, *cols);
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(format!(
            "{rows} rows do not split into {heads} heads of even size"
        ));
    }
    let row_bytes =
        ty.row_bytes(cols as u64)
            .ok_or_else(|| format!("{cols} columns are not whole {ty} blocks"))? as usize;
    let src = data.as_slice();
    if src.len() != row_bytes * rows {
        return Err("tensor byte size does not match its shape".into());
    }
    let hd = rows / heads;
    let mut out = vec![0u8; src.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for a in 0..2 {
                let old = h * hd + a * hd / 2 + i;
                let new = h * hd + 2 * i + a;
                out[new * row_bytes..(new + 1) * row_bytes]
                    .copy_from_slice(&src[old * row_bytes..(old + 1) * row_bytes]);
            }
        }
    }
    Ok(TensorBytes::from_vec(out))
}
