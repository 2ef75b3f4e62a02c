//! `lfm2` (HF `lfm2`, Liquid LFM2) and the helpers `lfm2moe` shares.
//!
//! Hybrid pre-norm decoder: each layer mixes with either a gated short convolution
//! ([`crate::blocks::shortconv`]) or GQA attention with per-head q/k RMSNorm and NeoX
//! RoPE, after `operator_norm` (GGUF `attn_norm`), then a SwiGLU FFN after `ffn_norm`:
//! `x += mixer(norm(x)); x += ffn(ffn_norm(x))`. The final RMSNorm (HF
//! `model.embedding_norm`, GGUF `token_embd_norm`) is applied after the last layer.
//! HF source: transformers `modeling_lfm2.py`, `modeling_lfm2_moe.py`.
//!
//! GGUF (llama.cpp's conventions): `{arch}.attention.head_count_kv` is a per-layer
//! array whose zeros mark short-conv layers; `{arch}.shortconv.l_cache` is the kernel
//! length; tensors `blk.{i}.shortconv.{in_proj,conv,out_proj}.weight` with the conv
//! kernel stored 2-D `[l_cache, d_model]`; attention `attn_{q,k,v,output}` and
//! `attn_{q,k}_norm`; FFN `ffn_{gate,up,down}` (HF w1, w3, w2). `lfm2moe` adds
//! `leading_dense_block_count`, `expert_{count,used_count,feed_forward_length}`,
//! `expert_gating_func` (2 = sigmoid), `ffn_gate_inp`, stacked `ffn_{gate,up,down}_exps`
//! and the selection bias `exp_probs_b.bias` (HF `expert_bias`).

use std::collections::BTreeMap;

use caldera_format::gguf::GgufValue;
use caldera_format::hf::HfTensor;
use serde_json::Value;

use super::{bind_ffn, ArchDef, Common};
use crate::blocks::moe::{MoeSpec, RouterKind};
use crate::blocks::shortconv::{ShortConvSpec, ShortConvWeights};
use crate::config::{Activation, FfnSpec, LayerSpec, Mixer, ModelConfig, RopeStyle};
use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::hf_names::{common_meta, rope_params, stack_experts, Translation};
use crate::weights::{Layer, MixerWeights, ModelWeights};
use crate::Model;

pub static LFM2: ArchDef = ArchDef {
    name: "lfm2",
    hf_model_types: &["lfm2"],
    build,
    hf_translate: translate,
};

fn build(f: &ModelFile) -> Result<Model> {
    build_lfm(f, "lfm2", false)
}

fn translate(t: &mut Translation) -> Result<()> {
    translate_lfm(t, false)
}

/// `llama_expert_gating_func_type` values in GGUF `expert_gating_func`.
const GATING_SOFTMAX: u64 = 1;
const GATING_SIGMOID: u64 = 2;

/// Per layer: `Some(kv heads)` for attention, `None` for short conv.
fn layer_kinds(
    f: &ModelFile,
    arch: &str,
    n_layers: usize,
    n_heads: usize,
) -> Result<Vec<Option<usize>>> {
    let key = format!("{arch}.attention.head_count_kv");
    let kinds = match f.get(&key) {
        Some(v) if v.as_array().is_some() => {
            let items = v.as_i64_array().ok_or_else(|| ModelError::BadKey {
                key: key.clone(),
                msg: "expected an array of integers".into(),
            })?;
            if items.len() != n_layers {
                return Err(ModelError::BadKey {
                    key,
                    msg: format!("{} entries for {n_layers} layers", items.len()),
                });
            }
            items
                .iter()
                .map(|&k| match usize::try_from(k) {
                    Ok(0) => Ok(None),
                    Ok(k) => Ok(Some(k)),
                    Err(_) => Err(ModelError::BadKey {
                        key: key.clone(),
                        msg: format!("negative head count {k}"),
                    }),
                })
                .collect::<Result<Vec<_>>>()?
        }
        // A single count: layers with short-conv tensors are conv layers.
        other => {
            let kv = match other {
                Some(v) => v.as_u64().ok_or_else(|| ModelError::BadKey {
                    key: key.clone(),
                    msg: "expected an integer or an array".into(),
                })? as usize,
                None => n_heads,
            };
            (0..n_layers)
                .map(|i| {
                    let conv = f
                        .tensor(&format!("blk.{i}.shortconv.in_proj.weight"))
                        .is_some();
                    if conv || kv == 0 {
                        None
                    } else {
                        Some(kv)
                    }
                })
                .collect()
        }
    };
    for (i, k) in kinds.iter().enumerate() {
        if let Some(k) = *k {
            if n_heads == 0 || !n_heads.is_multiple_of(k) {
                return Err(ModelError::Invalid(format!(
                    "layer {i}: {n_heads} attention heads cannot be grouped over {k} kv heads"
                )));
            }
        }
    }
    Ok(kinds)
}

/// The rows of a 2-D tensor (its GGUF `dims[1]`), if it exists.
fn rows_of(f: &ModelFile, name: &str) -> Option<usize> {
    f.tensor(name)
        .and_then(|t| t.dims.get(1).copied())
        .and_then(|r| usize::try_from(r).ok())
}

fn moe_spec(f: &ModelFile, arch: &str) -> Result<MoeSpec> {
    let k = |s: &str| format!("{arch}.{s}");
    let n_experts = f.req_usize(&k("expert_count"))?;
    let n_used = f.req_usize(&k("expert_used_count"))?;
    let d_ff = f.req_usize(&k("expert_feed_forward_length"))?;
    let renorm = f
        .get(&k("expert_weights_norm"))
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    let router = match f.get_u64(&k("expert_gating_func")) {
        None | Some(GATING_SIGMOID) => RouterKind::Sigmoid { renorm },
        Some(GATING_SOFTMAX) => RouterKind::Softmax { renorm },
        Some(other) => {
            return Err(ModelError::BadKey {
                key: k("expert_gating_func"),
                msg: format!("gating function {other} is not supported"),
            })
        }
    };
    let weights_scale = match f.get_f32(&k("expert_weights_scale")) {
        Some(s) if s != 0.0 && s.is_finite() => s,
        _ => 1.0,
    };
    Ok(MoeSpec {
        n_experts,
        n_used,
        d_ff,
        act: Activation::SwiGlu,
        router,
        weights_scale,
        shared_d_ff: None,
    })
}

/// Builds `lfm2` (`moe` false: every FFN dense) or `lfm2moe` (the first
/// `leading_dense_block_count` FFNs dense, the rest MoE).
pub(super) fn build_lfm(f: &ModelFile, arch: &'static str, moe: bool) -> Result<Model> {
    let c = Common::read(f, arch)?;
    let d = c.d_model;
    let kinds = layer_kinds(f, arch, c.n_layers, c.n_heads)?;
    let l_cache = f.req_usize(&format!("{arch}.shortconv.l_cache"))?;
    if l_cache == 0 {
        return Err(ModelError::BadKey {
            key: format!("{arch}.shortconv.l_cache"),
            msg: "kernel length 0".into(),
        });
    }
    let (n_dense, moe) = if moe {
        let n = f
            .get_u64(&format!("{arch}.leading_dense_block_count"))
            .unwrap_or(0) as usize;
        (n, Some(moe_spec(f, arch)?))
    } else {
        (c.n_layers, None)
    };
    let rope = c.rope(f, RopeStyle::Neox, c.rope_theta)?;

    let mut specs = Vec::with_capacity(c.n_layers);
    let mut layers = Vec::with_capacity(c.n_layers);
    for (i, kind) in kinds.iter().enumerate() {
        let p = |s: &str| format!("blk.{i}.{s}");
        let (mixer, mixer_w) = match *kind {
            Some(kv) => {
                let mut a = c.attn(Some(rope.clone()), true);
                a.n_kv_heads = kv;
                let w = super::bind_attention(f, i, &a, d)?;
                (Mixer::Attention(a), MixerWeights::Attention(w))
            }
            None => {
                let s = ShortConvSpec {
                    channels: d,
                    l_cache,
                };
                let w = ShortConvWeights::bind(f, i, &s, d)?;
                (Mixer::ShortConv(s), MixerWeights::ShortConv(w))
            }
        };
        let ffn = match &moe {
            Some(m) if i >= n_dense => FfnSpec::Moe(m.clone()),
            _ => FfnSpec::Dense {
                // The real width (LFM2's block_auto_adjust_ff_dim may differ from the key).
                d_ff: rows_of(f, &p("ffn_gate.weight")).unwrap_or(c.d_ff),
                act: Activation::SwiGlu,
            },
        };
        let ffn_w = bind_ffn(f, i, &ffn, d)?;
        layers.push(Layer {
            norm: Some(f.vector(&p("attn_norm.weight"), d)?),
            mixer: Some(mixer_w),
            post_norm: None,
            ffn_norm: Some(f.vector(&p("ffn_norm.weight"), d)?),
            ffn: Some(ffn_w),
            ffn_post_norm: None,
        });
        specs.push(LayerSpec {
            mixer: Some(mixer),
            ffn: Some(ffn),
        });
    }

    let tok_embd = f.weight("token_embd.weight", c.vocab_size, d)?;
    // llama.cpp names LFM2's final norm `token_embd_norm`; accept `output_norm` too.
    let output_norm = if f.tensor("token_embd_norm.weight").is_some() {
        f.vector("token_embd_norm.weight", d)?
    } else {
        f.vector("output_norm.weight", d)?
    };
    let output = if f.tensor("output.weight").is_some() {
        f.weight("output.weight", c.vocab_size, d)?
    } else {
        tok_embd.clone()
    };
    Ok(Model {
        config: ModelConfig {
            arch: arch.into(),
            d_model: d,
            vocab_size: c.vocab_size,
            norm_eps: c.norm_eps,
            context_length: c.context_length,
            embed_scale: None,
            final_logit_softcap: None,
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

/// Which HF layers are attention (true) and which short conv (false): `layer_types`
/// ("full_attention" / "conv"), or the older `full_attn_idxs`.
fn hf_attention_layers(t: &Translation, n_layers: usize) -> Result<Vec<bool>> {
    let cfg = t.text_cfg();
    if let Some(types) = cfg.get("layer_types").and_then(Value::as_array) {
        if types.len() != n_layers {
            return Err(ModelError::Invalid(format!(
                "config.json: {} layer_types for {n_layers} layers",
                types.len()
            )));
        }
        return types
            .iter()
            .map(|v| match v.as_str() {
                Some("full_attention") => Ok(true),
                Some("conv") => Ok(false),
                other => Err(ModelError::Invalid(format!(
                    "config.json: layer type {other:?} is not supported for {}",
                    t.arch
                ))),
            })
            .collect();
    }
    if let Some(idxs) = cfg.get("full_attn_idxs").and_then(Value::as_array) {
        let mut out = vec![false; n_layers];
        for v in idxs {
            let i = v
                .as_u64()
                .and_then(|i| usize::try_from(i).ok())
                .filter(|&i| i < n_layers)
                .ok_or_else(|| {
                    ModelError::Invalid(format!("config.json: bad full_attn_idxs entry {v}"))
                })?;
            out[i] = true;
        }
        return Ok(out);
    }
    Err(ModelError::MissingKey(
        "config.json: layer_types (or full_attn_idxs)".into(),
    ))
}

/// The FFN width llama.cpp's converter writes when no dense FFN tensor says it:
/// `block_ff_dim` / `intermediate_size`, adjusted as LFM2's `block_auto_adjust_ff_dim`.
fn configured_ff(t: &Translation) -> Option<u64> {
    let mut ff = t
        .u64("block_ff_dim")
        .or_else(|| t.u64("intermediate_size"))?;
    if t.bool("block_auto_adjust_ff_dim").unwrap_or(false) {
        ff = 2 * ff / 3;
        if let Some(mul) = t.f64("block_ffn_dim_multiplier") {
            ff = (mul * ff as f64) as u64;
        }
        let mult = t.u64("block_multiple_of").unwrap_or(1).max(1);
        ff = ff.div_ceil(mult) * mult;
    }
    Some(ff)
}

/// `(layer, rest)` of `model.layers.{layer}.{rest}` (also under `model.language_model.`).
fn split_layer(name: &str) -> Option<(usize, &str)> {
    let rest = name
        .strip_prefix("model.language_model.layers.")
        .or_else(|| name.strip_prefix("model.layers."))?;
    let (idx, rest) = rest.split_once('.')?;
    Some((idx.parse().ok()?, rest))
}

/// The GGUF name of a non-expert LFM2 tensor, or `None`.
fn tensor_name(name: &str) -> Option<String> {
    match name {
        "model.embed_tokens.weight" | "model.language_model.embed_tokens.weight" => {
            return Some("token_embd.weight".into())
        }
        "model.embedding_norm.weight" | "model.language_model.embedding_norm.weight" => {
            return Some("token_embd_norm.weight".into())
        }
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let (i, rest) = split_layer(name)?;
    let short = match rest {
        "operator_norm.weight" => "attn_norm.weight",
        "ffn_norm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.out_proj.weight" => "attn_output.weight",
        "self_attn.q_layernorm.weight" => "attn_q_norm.weight",
        "self_attn.k_layernorm.weight" => "attn_k_norm.weight",
        "conv.in_proj.weight" => "shortconv.in_proj.weight",
        "conv.in_proj.bias" => "shortconv.in_proj.bias",
        "conv.out_proj.weight" => "shortconv.out_proj.weight",
        "conv.out_proj.bias" => "shortconv.out_proj.bias",
        "conv.conv.weight" => "shortconv.conv.weight",
        "conv.conv.bias" => "shortconv.conv.bias",
        "feed_forward.w1.weight" => "ffn_gate.weight",
        "feed_forward.w3.weight" => "ffn_up.weight",
        "feed_forward.w2.weight" => "ffn_down.weight",
        "feed_forward.gate.weight" => "ffn_gate_inp.weight",
        "feed_forward.expert_bias" => "exp_probs_b.bias",
        _ => return None,
    };
    Some(format!("blk.{i}.{short}"))
}

/// Splits HF's fused `experts.gate_up_proj` (`[n, 2 * ff, d]`, gate rows first) into the
/// stacked GGUF `ffn_gate_exps` and `ffn_up_exps` (`[d, ff, n]` each).
fn split_gate_up(t: &mut Translation, layer: usize, ht: &HfTensor) -> Result<()> {
    let bad = |msg: String| ModelError::BadTensor {
        name: ht.name.clone(),
        msg,
    };
    let (n, ff2, d) = match ht.shape.as_slice() {
        [n, ff2, d] if ff2 % 2 == 0 => (*n, *ff2, *d),
        s => return Err(bad(format!("expected [experts, 2 * ff, d], found {s:?}"))),
    };
    let ff = ff2 / 2;
    let row = ht
        .ty
        .row_bytes(d as u64)
        .ok_or_else(|| bad(format!("{d} columns are not whole {} blocks", ht.ty)))?
        as usize;
    let src = ht.data.as_slice();
    if Some(src.len()) != n.checked_mul(ff2).and_then(|x| x.checked_mul(row)) {
        return Err(bad("byte size does not match the shape".into()));
    }
    let half = ff * row;
    let mut gate = Vec::with_capacity(n * half);
    let mut up = Vec::with_capacity(n * half);
    for e in 0..n {
        let base = e * 2 * half;
        gate.extend_from_slice(&src[base..base + half]);
        up.extend_from_slice(&src[base + half..base + 2 * half]);
    }
    let dims = vec![d as u64, ff as u64, n as u64];
    t.push_bytes(
        format!("blk.{layer}.ffn_gate_exps.weight"),
        ht.ty,
        dims.clone(),
        gate,
    );
    t.push_bytes(format!("blk.{layer}.ffn_up_exps.weight"), ht.ty, dims, up);
    Ok(())
}

/// Writes LFM2 / LFM2-MoE metadata and tensors as llama.cpp's converter does.
pub(super) fn translate_lfm(t: &mut Translation, moe: bool) -> Result<()> {
    let (_, rope_type, _) = rope_params(t.text_cfg(), None);
    if rope_type != "default" {
        return Err(ModelError::Invalid(format!(
            "rope_type '{rope_type}' is not supported for {} yet",
            t.arch
        )));
    }
    common_meta(t)?;
    let n_layers = t.req_u64("num_hidden_layers")? as usize;
    let n_heads = t.req_u64("num_attention_heads")?;
    let n_kv = t.u64("num_key_value_heads").unwrap_or(n_heads);
    let attn = hf_attention_layers(t, n_layers)?;
    let kv: Vec<i32> = attn
        .iter()
        .map(|&a| {
            if a {
                n_kv.min(i32::MAX as u64) as i32
            } else {
                0
            }
        })
        .collect();
    t.set("attention.head_count_kv", GgufValue::i32_array(&kv));
    t.set_u32("shortconv.l_cache", t.u64("conv_L_cache").unwrap_or(3));
    if moe {
        let n_exp = t.req_u64("num_experts")?;
        t.set_u32("expert_count", n_exp);
        t.set_u32("expert_used_count", t.req_u64("num_experts_per_tok")?);
        t.set_u32(
            "expert_feed_forward_length",
            t.req_u64("moe_intermediate_size")?,
        );
        t.set_u32(
            "leading_dense_block_count",
            t.u64("num_dense_layers").unwrap_or(0),
        );
        t.set_u32("expert_gating_func", GATING_SIGMOID);
        let norm = t.bool("norm_topk_prob").unwrap_or(true);
        t.set("expert_weights_norm", GgufValue::Bool(norm));
        t.set_f32(
            "expert_weights_scale",
            t.f64("routed_scaling_factor").unwrap_or(1.0),
        );
    }

    let tie = t.tie_embeddings();
    let hf = t.hf;
    let mut ff: Option<u64> = None;
    // Layers with per-expert tensors: the HF prefix `...layers.{i}.feed_forward.experts`.
    let mut expert_layers: BTreeMap<usize, String> = BTreeMap::new();
    let mut has_bias = vec![false; n_layers];
    for ht in &hf.tensors {
        if let Some((i, rest)) = split_layer(&ht.name) {
            if let Some(e) = rest.strip_prefix("feed_forward.experts.") {
                if e == "gate_up_proj" || e == "gate_up_proj.weight" {
                    split_gate_up(t, i, ht)?;
                } else if e == "down_proj" || e == "down_proj.weight" {
                    t.push(format!("blk.{i}.ffn_down_exps.weight"), ht);
                } else {
                    let stem = ht
                        .name
                        .find(".feed_forward.experts.")
                        .map(|p| format!("{}.feed_forward.experts", &ht.name[..p]));
                    if let Some(stem) = stem {
                        expert_layers.insert(i, stem);
                    }
                }
                continue;
            }
            if rest == "feed_forward.expert_bias" && i < n_layers {
                has_bias[i] = true;
            }
            if rest == "feed_forward.w1.weight" && ff.is_none() {
                ff = ht.shape.first().map(|&r| r as u64);
            }
        }
        match tensor_name(&ht.name) {
            Some(n) if tie && n == "output.weight" => {}
            Some(n) if n.ends_with("shortconv.conv.weight") => {
                // HF [d, 1, L] → GGUF [L, d] (llama.cpp squeezes the middle dim).
                let (d, l) = match ht.shape.as_slice() {
                    [d, 1, l] | [d, l] => (*d as u64, *l as u64),
                    s => {
                        return Err(ModelError::BadTensor {
                            name: ht.name.clone(),
                            msg: format!("expected a [channels, 1, kernel] conv, found {s:?}"),
                        })
                    }
                };
                t.push_bytes(n, ht.ty, vec![l, d], ht.data.as_slice().to_vec());
            }
            Some(n) => t.push(n, ht),
            None if ht.name.contains("vision_tower")
                || ht.name.contains("multi_modal_projector") => {}
            None => {
                return Err(ModelError::Invalid(format!(
                    "{}: unexpected tensor '{}'",
                    t.arch, ht.name
                )))
            }
        }
    }
    if let Some(ff) = ff.or_else(|| configured_ff(t)) {
        t.set_u32("feed_forward_length", ff);
    }
    if moe {
        let n_exp = t.req_u64("num_experts")? as usize;
        for (i, stem) in &expert_layers {
            for (hfw, gg) in [
                ("w1", "ffn_gate_exps"),
                ("w3", "ffn_up_exps"),
                ("w2", "ffn_down_exps"),
            ] {
                stack_experts(
                    t,
                    stem,
                    &format!("{hfw}.weight"),
                    n_exp,
                    format!("blk.{i}.{gg}.weight"),
                )?;
            }
        }
        // llama.cpp requires the selection bias; a model without one selects unbiased.
        let n_dense = t.u64("num_dense_layers").unwrap_or(0) as usize;
        for (i, has) in has_bias.iter().enumerate().skip(n_dense) {
            if !has {
                t.push_f32(
                    format!("blk.{i}.exp_probs_b.bias"),
                    vec![n_exp as u64],
                    &vec![0.0; n_exp],
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use crate::config::Mixer;
    use crate::file::ModelFile;
    use crate::Model;

    /// Writes an HF folder: `config.json` and an F32 `model.safetensors`.
    fn hf_folder(tag: &str, config: &str, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("caldera-lfm2-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), config).unwrap();
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, shape, v) in tensors {
            assert_eq!(shape.iter().product::<usize>(), v.len());
            let start = data.len();
            data.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        let h = serde_json::Value::Object(header).to_string().into_bytes();
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend(h);
        bytes.extend(data);
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        dir
    }

    fn vals(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7 + seed * 13) % 17) as f32 / 17.0 - 0.5)
            .collect()
    }

    /// A 2-layer model (conv, attention), d = 8, 2 heads of 4, kernel 3; `moe` gives
    /// layer 1 four experts of width 4, fused or per expert.
    fn tensors(moe: Option<bool>) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let d = 8;
        let mut t = Vec::new();
        let mut add = |n: &str, s: Vec<usize>| {
            let len = s.iter().product();
            let k = t.len();
            t.push((n.to_string(), s, vals(len, k)));
        };
        add("model.embed_tokens.weight", vec![16, d]);
        add("model.embedding_norm.weight", vec![d]);
        for i in 0..2 {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            add(&p("operator_norm.weight"), vec![d]);
            add(&p("ffn_norm.weight"), vec![d]);
            if i == 0 {
                add(&p("conv.in_proj.weight"), vec![3 * d, d]);
                add(&p("conv.out_proj.weight"), vec![d, d]);
                add(&p("conv.conv.weight"), vec![d, 1, 3]);
            } else {
                add(&p("self_attn.q_proj.weight"), vec![d, d]);
                add(&p("self_attn.k_proj.weight"), vec![d, d]);
                add(&p("self_attn.v_proj.weight"), vec![d, d]);
                add(&p("self_attn.out_proj.weight"), vec![d, d]);
                add(&p("self_attn.q_layernorm.weight"), vec![4]);
                add(&p("self_attn.k_layernorm.weight"), vec![4]);
            }
            match moe {
                Some(fused) if i == 1 => {
                    add(&p("feed_forward.gate.weight"), vec![4, d]);
                    add(&p("feed_forward.expert_bias"), vec![4]);
                    if !fused {
                        for e in 0..4 {
                            add(
                                &p(&format!("feed_forward.experts.{e}.w1.weight")),
                                vec![4, d],
                            );
                            add(
                                &p(&format!("feed_forward.experts.{e}.w3.weight")),
                                vec![4, d],
                            );
                            add(
                                &p(&format!("feed_forward.experts.{e}.w2.weight")),
                                vec![d, 4],
                            );
                        }
                    }
                }
                _ => {
                    add(&p("feed_forward.w1.weight"), vec![12, d]);
                    add(&p("feed_forward.w3.weight"), vec![12, d]);
                    add(&p("feed_forward.w2.weight"), vec![d, 12]);
                }
            }
        }
        t
    }

    fn open(dir: &Path) -> (ModelFile, Model) {
        let r = Model::open(dir);
        let _ = std::fs::remove_dir_all(dir);
        r.unwrap()
    }

    #[test]
    fn old_config_with_full_attn_idxs_and_adjusted_ff() {
        let cfg = r#"{"model_type": "lfm2", "hidden_size": 8, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 16,
            "norm_eps": 1e-5, "rope_theta": 1000000.0, "conv_L_cache": 3,
            "full_attn_idxs": [1], "block_ff_dim": 64, "block_auto_adjust_ff_dim": true,
            "block_ffn_dim_multiplier": 1.0, "block_multiple_of": 4,
            "tie_word_embeddings": true}"#;
        let (f, m) = open(&hf_folder("old", cfg, &tensors(None)));
        assert!(matches!(
            m.config.layers[0].mixer,
            Some(Mixer::ShortConv(_))
        ));
        assert!(matches!(
            m.config.layers[1].mixer,
            Some(Mixer::Attention(_))
        ));
        // The real FFN width (12), not the adjusted 2 * 64 / 3 rounded to 44.
        assert_eq!(f.get_u64("lfm2.feed_forward_length"), Some(12));
        let kv = f
            .get("lfm2.attention.head_count_kv")
            .unwrap()
            .as_i64_array();
        assert_eq!(kv, Some(vec![0, 2]));
        assert_eq!(
            f.tensor("blk.0.shortconv.conv.weight").unwrap().dims,
            [3, 8]
        );
        assert!(f.tensor("token_embd_norm.weight").is_some());
    }

    #[test]
    fn fused_and_per_expert_checkpoints_translate_alike() {
        let cfg = r#"{"model_type": "lfm2_moe", "hidden_size": 8, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 16,
            "norm_eps": 1e-5, "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
            "conv_L_cache": 3, "layer_types": ["conv", "full_attention"],
            "intermediate_size": 12, "moe_intermediate_size": 4, "num_experts": 4,
            "num_experts_per_tok": 2, "num_dense_layers": 1, "norm_topk_prob": true,
            "routed_scaling_factor": 1.0, "use_expert_bias": true, "tie_word_embeddings": true}"#;
        let per = tensors(Some(false));
        // The same experts fused: gate_up_proj [n, 2 * ff, d], down_proj [n, d, ff].
        let mut fused = tensors(Some(true));
        let get = |n: String| per.iter().find(|t| t.0 == n).unwrap().2.clone();
        let (mut gu, mut down) = (Vec::new(), Vec::new());
        for e in 0..4 {
            let p = format!("model.layers.1.feed_forward.experts.{e}");
            gu.extend(get(format!("{p}.w1.weight")));
            gu.extend(get(format!("{p}.w3.weight")));
            down.extend(get(format!("{p}.w2.weight")));
        }
        let p = "model.layers.1.feed_forward.experts";
        fused.push((format!("{p}.gate_up_proj"), vec![4, 8, 8], gu));
        fused.push((format!("{p}.down_proj"), vec![4, 8, 4], down));
        // Same values for the shared tensors: take them from `per`.
        for t in fused.iter_mut() {
            if let Some(src) = per.iter().find(|s| s.0 == t.0) {
                t.2 = src.2.clone();
            }
        }
        let (fa, ma) = open(&hf_folder("per", cfg, &per));
        let (fb, _) = open(&hf_folder("fused", cfg, &fused));
        for n in ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"] {
            let name = format!("blk.1.{n}.weight");
            let (a, b) = (fa.tensor(&name).unwrap(), fb.tensor(&name).unwrap());
            assert_eq!(a.dims, b.dims, "{name}");
            assert_eq!(a.data.as_slice(), b.data.as_slice(), "{name}");
        }
        assert_eq!(
            fa.tensor("blk.1.ffn_gate_exps.weight").unwrap().dims,
            [8, 4, 4]
        );
        assert!(fa.tensor("blk.1.exp_probs_b.bias").is_some());
        assert_eq!(fa.get_u64("lfm2moe.expert_gating_func"), Some(2));
        assert!(matches!(
            ma.config.layers[0].ffn,
            Some(crate::config::FfnSpec::Dense { d_ff: 12, .. })
        ));
        assert!(matches!(
            ma.config.layers[1].ffn,
            Some(crate::config::FfnSpec::Moe(_))
        ));
    }
}
