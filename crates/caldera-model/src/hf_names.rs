//! Hugging Face folder → GGUF conventions. Each architecture's `hf_translate` (in its
//! `arch/*.rs` file) writes GGUF metadata keys from `config.json` and GGUF tensors from
//! the HF tensors, applying the transforms llama.cpp's converter applies; the helpers
//! here cover what most architectures share. `convert` writes the same result.

use caldera_format::gguf::GgufValue;
use caldera_format::hf::{HfModel, HfTensor};
use caldera_format::{quant, GgmlType, TensorBytes};
use serde_json::Value;

use crate::arch;
use crate::error::{ModelError, Result};
use crate::file::{ModelFile, RawTensor, TokenizerSource};

/// What a translation produces: GGUF metadata and tensors.
pub struct Translation<'a> {
    pub hf: &'a HfModel,
    /// The GGUF architecture string.
    pub arch: &'static str,
    pub meta: Vec<(String, GgufValue)>,
    pub tensors: Vec<RawTensor>,
}

impl<'a> Translation<'a> {
    pub fn cfg(&self) -> &Value {
        &self.hf.config
    }

    /// The text config: `text_config` for multimodal wrappers, else the whole config.
    pub fn text_cfg(&self) -> &Value {
        self.hf.config.get("text_config").unwrap_or(&self.hf.config)
    }

    pub fn u64(&self, key: &str) -> Option<u64> {
        self.text_cfg().get(key).and_then(Value::as_u64)
    }

    pub fn f64(&self, key: &str) -> Option<f64> {
        self.text_cfg().get(key).and_then(Value::as_f64)
    }

    pub fn bool(&self, key: &str) -> Option<bool> {
        self.text_cfg().get(key).and_then(Value::as_bool)
    }

    pub fn req_u64(&self, key: &str) -> Result<u64> {
        self.u64(key)
            .ok_or_else(|| ModelError::MissingKey(format!("config.json: {key}")))
    }

    /// Sets `{arch}.{key}` (or `key` when it starts with "general." / "tokenizer.").
    pub fn set(&mut self, key: &str, v: GgufValue) {
        let k = if key.starts_with("general.") || key.starts_with("tokenizer.") {
            key.to_owned()
        } else {
            format!("{}.{key}", self.arch)
        };
        self.meta.retain(|(old, _)| *old != k);
        self.meta.push((k, v));
    }

    pub fn set_u32(&mut self, key: &str, n: u64) {
        self.set(key, GgufValue::U32(n.min(u32::MAX as u64) as u32));
    }

    pub fn set_f32(&mut self, key: &str, x: f64) {
        self.set(key, GgufValue::F32(x as f32));
    }

    pub fn tie_embeddings(&self) -> bool {
        self.bool("tie_word_embeddings")
            .or_else(|| {
                self.cfg()
                    .get("tie_word_embeddings")
                    .and_then(Value::as_bool)
            })
            .unwrap_or(false)
    }

    /// Adds an HF tensor under a GGUF name, as it is (dims reversed to GGUF order).
    pub fn push(&mut self, name: String, t: &HfTensor) {
        self.tensors.push(RawTensor {
            name,
            ty: t.ty,
            dims: t.shape.iter().rev().map(|&d| d as u64).collect(),
            data: t.data.clone(),
        });
    }

    /// Adds f32 values under a GGUF name with GGUF dims.
    pub fn push_f32(&mut self, name: String, dims: Vec<u64>, values: &[f32]) {
        let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensors.push(RawTensor {
            name,
            ty: GgmlType::F32,
            dims,
            data: TensorBytes::from_vec(bytes),
        });
    }

    /// Adds raw bytes of type `ty` under a GGUF name with GGUF dims.
    pub fn push_bytes(&mut self, name: String, ty: GgmlType, dims: Vec<u64>, bytes: Vec<u8>) {
        self.tensors.push(RawTensor {
            name,
            ty,
            dims,
            data: TensorBytes::from_vec(bytes),
        });
    }
}

/// An HF tensor's values as f32.
pub fn to_f32(t: &HfTensor) -> Result<Vec<f32>> {
    let mut v = vec![0f32; t.shape.iter().product()];
    quant::dequantize(t.ty, t.data.as_slice(), &mut v).map_err(|e| ModelError::BadTensor {
        name: t.name.clone(),
        msg: e.to_string(),
    })?;
    Ok(v)
}

/// Translates an HF folder into a [`ModelFile`] with GGUF metadata and tensor names.
pub fn translate(hf: &HfModel) -> Result<ModelFile> {
    let model_type = hf
        .config
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| ModelError::Invalid("config.json has no \"model_type\"".into()))?;
    let def = arch::ARCHS
        .iter()
        .find(|d| d.hf_model_types.contains(&model_type))
        .ok_or_else(|| {
            let known: Vec<&str> = arch::ARCHS
                .iter()
                .flat_map(|d| d.hf_model_types.iter().copied())
                .collect();
            ModelError::UnsupportedArch(model_type.to_owned(), known.join(", "))
        })?;
    let mut t = Translation {
        hf,
        arch: def.name,
        meta: Vec::new(),
        tensors: Vec::new(),
    };
    t.set("general.architecture", GgufValue::String(def.name.into()));
    t.set(
        "general.name",
        GgufValue::String(hf.dir.display().to_string()),
    );
    (def.hf_translate)(&mut t)?;
    let mut f = ModelFile::new(&hf.dir, "hf", t.meta, t.tensors)?;
    f.chat_template = hf.chat_template();
    if let Some(json) = &hf.tokenizer_json {
        f.tokenizer = TokenizerSource::HfJson {
            json: json.clone(),
            config: hf.tokenizer_config.clone(),
        };
    }
    Ok(f)
}

/// RoPE settings of `config.json`: (theta, rope_type, the parameters object). Handles
/// transformers 5 `rope_parameters` (per layer type for some models: `layer_type` picks
/// one), and the older top-level `rope_theta` + `rope_scaling`.
pub fn rope_params<'v>(
    cfg: &'v Value,
    layer_type: Option<&str>,
) -> (Option<f64>, String, Option<&'v Value>) {
    let params = match cfg.get("rope_parameters").filter(|v| v.is_object()) {
        Some(rp) => {
            let per_type = layer_type
                .and_then(|lt| rp.get(lt))
                .filter(|v| v.is_object());
            Some(per_type.unwrap_or(rp))
        }
        None => cfg.get("rope_scaling").filter(|v| v.is_object()),
    };
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .or_else(|| cfg.get("rope_theta").and_then(Value::as_f64));
    let ty = params
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_owned();
    (theta, ty, params)
}

/// The metadata every attention transformer has: block count, sizes, heads, eps, RoPE
/// base and dims (with `partial_rotary_factor`), context length, vocab size.
pub fn common_meta(t: &mut Translation) -> Result<()> {
    let n_layers = t.req_u64("num_hidden_layers")?;
    let d_model = t.req_u64("hidden_size")?;
    let n_heads = t.req_u64("num_attention_heads")?;
    let n_kv = t.u64("num_key_value_heads").unwrap_or(n_heads);
    let head_dim = match t.u64("head_dim") {
        Some(h) => h,
        None => d_model
            .checked_div(n_heads)
            .ok_or_else(|| ModelError::Invalid("num_attention_heads is 0".into()))?,
    };
    let (theta, rope_type, params) = rope_params(t.text_cfg(), None);
    let partial = params
        .and_then(|p| p.get("partial_rotary_factor"))
        .and_then(Value::as_f64)
        .or_else(|| t.f64("partial_rotary_factor"))
        .unwrap_or(1.0);
    t.set_u32("block_count", n_layers);
    t.set_u32("embedding_length", d_model);
    if let Some(ff) = t.u64("intermediate_size") {
        t.set_u32("feed_forward_length", ff);
    }
    t.set_u32("attention.head_count", n_heads);
    t.set_u32("attention.head_count_kv", n_kv);
    t.set_u32("attention.key_length", head_dim);
    t.set_u32("attention.value_length", head_dim);
    t.set_u32(
        "context_length",
        t.u64("max_position_embeddings").unwrap_or(4096),
    );
    t.set_u32("vocab_size", t.req_u64("vocab_size")?);
    let eps = t
        .f64("rms_norm_eps")
        .or_else(|| t.f64("norm_eps"))
        .or_else(|| t.f64("layer_norm_epsilon"))
        .unwrap_or(1e-6);
    t.set_f32("attention.layer_norm_rms_epsilon", eps);
    t.set_f32("rope.freq_base", theta.unwrap_or(10000.0));
    t.set_u32(
        "rope.dimension_count",
        (head_dim as f64 * partial).round() as u64,
    );
    t.set("rope.scaling.type", GgufValue::String(rope_type));
    Ok(())
}

/// The GGUF name of a tensor that most decoder models share, or `None`.
/// `post_attention_layernorm` is the FFN pre-norm in llama-style models and the
/// attention post-norm in Gemma-style (sandwich) models.
pub fn common_tensor_name(hf: &str, sandwich: bool) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" | "model.language_model.embed_tokens.weight" => {
            return Some("token_embd.weight".into())
        }
        "model.norm.weight" | "model.language_model.norm.weight" => {
            return Some("output_norm.weight".into())
        }
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf
        .strip_prefix("model.layers.")
        .or_else(|| hf.strip_prefix("model.language_model.layers."))?;
    let (idx, rest) = rest.split_once('.')?;
    let layer: usize = idx.parse().ok()?;
    let short = match rest {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.bias" => "attn_output.bias",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "post_attention_layernorm.weight" if sandwich => "post_attention_norm.weight",
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

/// Maps every tensor with [`common_tensor_name`]; tensors it does not know are returned
/// for the architecture to handle. The tied output head is dropped.
pub fn map_common<'h>(t: &mut Translation<'h>, sandwich: bool) -> Vec<&'h HfTensor> {
    let tie = t.tie_embeddings();
    let mut rest = Vec::new();
    let hf = t.hf;
    for ht in &hf.tensors {
        match common_tensor_name(&ht.name, sandwich) {
            Some(n) if tie && n == "output.weight" => {}
            Some(n) => t.push(n, ht),
            None => rest.push(ht),
        }
    }
    rest
}

/// Adds `delta` to every element of the named F32/F16/BF16 tensors (Gemma's `1 + w`
/// norms), storing them as F32.
pub fn add_to_tensors(t: &mut Translation, pred: impl Fn(&str) -> bool, delta: f32) -> Result<()> {
    for rt in t.tensors.iter_mut().filter(|rt| pred(&rt.name)) {
        let n: u64 = rt.dims.iter().product();
        let mut v = vec![0f32; n as usize];
        quant::dequantize(rt.ty, rt.data.as_slice(), &mut v)?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| (x + delta).to_le_bytes()).collect();
        rt.ty = GgmlType::F32;
        rt.data = TensorBytes::from_vec(bytes);
    }
    Ok(())
}

/// Stacks per-expert HF matrices `prefix.{e}.suffix` (each [rows, cols]) into one GGUF
/// tensor [cols, rows, n] named `name`.
pub fn stack_experts(
    t: &mut Translation,
    prefix: &str,
    suffix: &str,
    n: usize,
    name: String,
) -> Result<()> {
    let mut bytes = Vec::new();
    let mut shape: Option<(Vec<usize>, GgmlType)> = None;
    for e in 0..n {
        let hn = format!("{prefix}.{e}.{suffix}");
        let ht =
            t.hf.tensor(&hn)
                .ok_or_else(|| ModelError::MissingTensor(hn.clone()))?;
        match &shape {
            None => shape = Some((ht.shape.clone(), ht.ty)),
            Some((s, ty)) if *s == ht.shape && *ty == ht.ty => {}
            Some(_) => {
                return Err(ModelError::BadTensor {
                    name: hn,
                    msg: "experts differ in shape or type".into(),
                })
            }
        }
        bytes.extend_from_slice(ht.data.as_slice());
    }
    let (s, ty) = shape.ok_or_else(|| ModelError::Invalid(format!("{prefix}: no experts")))?;
    let mut dims: Vec<u64> = s.iter().rev().map(|&d| d as u64).collect();
    dims.push(n as u64);
    t.push_bytes(name, ty, dims, bytes);
    Ok(())
}

/// Reorders the rows of a q or k projection (`shape` = [heads*head_dim, cols], HF order)
/// so that RoPE on adjacent pairs equals HF's rotate-half RoPE: within each head, new
/// row `2i + a` is old row `a * head_dim/2 + i`. Applied to GGUF `llama` q/k.
pub fn permute_for_interleaved_rope(rt: &mut RawTensor, heads: usize) -> Result<()> {
    let bad = |msg: String| ModelError::BadTensor {
        name: rt.name.clone(),
        msg,
    };
    let (cols, rows) = match rt.dims.as_slice() {
        [c, r] => (*c as usize, *r as usize),
        _ => return Err(bad(format!("expected a 2-D tensor, found {:?}", rt.dims))),
    };
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(bad(format!(
            "{rows} rows do not split into {heads} heads of even size"
        )));
    }
    let row_bytes = rt
        .ty
        .row_bytes(cols as u64)
        .ok_or_else(|| bad(format!("{cols} columns are not whole {} blocks", rt.ty)))?
        as usize;
    let src = rt.data.as_slice();
    if src.len() != row_bytes * rows {
        return Err(bad("byte size does not match the shape".into()));
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
    rt.data = TensorBytes::from_vec(out);
    Ok(())
}
