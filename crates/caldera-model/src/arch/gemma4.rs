//! `gemma4` (HF `gemma4_text`, the text part of Gemma 4).
//!
//! Per layer (HF `Gemma4TextDecoderLayer`):
//! - `x += post_attention_norm(attn(attn_norm(x)))`, attention with per-head q/k RMSNorm
//!   (scaled), an unscaled RMSNorm of each v head, scale 1.0 (no 1/sqrt(head_dim)), GQA.
//!   Sliding layers (window `sliding_window`) and full layers have their own head size,
//!   kv head count and RoPE: sliding = NeoX RoPE over `head_dim_swa * partial` dims, base
//!   `rope.freq_base_swa`; full = "proportional" RoPE: NeoX over the whole head, frequency
//!   `i` = base^(-2i/head_dim) for the first `floor(partial * head_dim / 2)` pairs and 0
//!   (identity) for the rest, stored as GGUF `rope_freqs.weight` = [1.0 …, 1e30 …].
//! - `x += post_ffw_norm(down(gelu_tanh(gate h) * up h))`, `h = ffn_norm(x)`.
//! - Per-layer inputs (when `embedding_length_per_layer_input` > 0): see
//!   [`crate::weights::PerLayerInputs`].
//! - `x *= layer_output_scale` (HF `layer_scalar`).
//!
//! Model: embeddings scaled by sqrt(d_model) (f32), final RMSNorm, tied or untied head,
//! logits soft-capped by `final_logit_softcapping`. Gemma 4 RMSNorm multiplies by `w`
//! itself (no `1 + w`), so norms are stored unshifted.
//!
//! KV sharing (`attention.shared_kv_layers` = n > 0): the last n layers compute no k/v;
//! each attends over the cache of the last earlier layer of the same kind (sliding or
//! full). Their `attn_k`/`attn_v` slots hold the source layer's weights as placeholders.
//! `attention_k_eq_v` checkpoints (no `v_proj` on full layers): v = k projection before
//! the k norm; the layer's `attn_v` slot holds the `attn_k` weight.
//!
//! GGUF conventions (llama.cpp `gemma4`, `convert_hf_to_gguf.py` `Gemma4Model`):
//! keys `gemma4.attention.key_length` / `value_length` (full layers), `key_length_swa` /
//! `value_length_swa`, `attention.head_count` / `head_count_kv` (a number or one per
//! layer), `attention.sliding_window`, `attention.sliding_window_pattern` (bool per layer,
//! true = sliding), `rope.freq_base` / `rope.freq_base_swa`, `rope.dimension_count` (full
//! head size) / `rope.dimension_count_swa`, `attention.shared_kv_layers`,
//! `embedding_length_per_layer_input`, `final_logit_softcapping`, `feed_forward_length`
//! (a number or one per layer). Tensors: the Gemma 3 names (`attn_norm`, `attn_q/k/v`,
//! `attn_q_norm`, `attn_k_norm`, `attn_output`, `post_attention_norm`, `ffn_norm`,
//! `ffn_gate/up/down`, `post_ffw_norm`) plus `rope_freqs`, `per_layer_token_embd`,
//! `per_layer_model_proj`, `per_layer_proj_norm`, `blk.N.inp_gate`, `blk.N.proj`,
//! `blk.N.post_norm`, `blk.N.layer_output_scale`.
//! HF source: transformers `models/gemma4/modeling_gemma4.py`; `per_layer_config`
//! (transformers ≥ 5.15) or `global_head_dim` / `num_global_key_value_heads` (earlier)
//! give the full layers' geometry.
//! Not supported: the MoE block (`enable_moe_block`), refused with an error.

use caldera_format::gguf::{GgufArray, GgufValue, GgufValueType};
use serde_json::Value;

use super::{bind_dense, ArchDef};
use crate::config::{
    Activation, AttnSpec, FfnSpec, LayerSpec, Mixer, ModelConfig, RopeSpec, RopeStyle,
};
use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::hf_names::{map_common, rope_params, to_f32, Translation};
use crate::weights::{
    AttnWeights, FfnWeights, Layer, LayerExtras, MixerWeights, ModelWeights, PerLayerBlock,
    PerLayerInputs,
};
use crate::{Extras, Model};

pub static GEMMA4: ArchDef = ArchDef {
    name: "gemma4",
    hf_model_types: &["gemma4_text"],
    build,
    hf_translate: translate,
};

const ARCH: &str = "gemma4";

fn key(s: &str) -> String {
    format!("{ARCH}.{s}")
}

/// A per-layer integer key: a number for every layer, or an array of one per layer.
fn per_layer_usize(f: &ModelFile, k: &str, n: usize, default: Option<usize>) -> Result<Vec<usize>> {
    let name = key(k);
    let bad = |msg: String| ModelError::BadKey {
        key: name.clone(),
        msg,
    };
    let Some(v) = f.get(&name) else {
        return match default {
            Some(d) => Ok(vec![d; n]),
            None => Err(ModelError::MissingKey(name.clone())),
        };
    };
    if let Some(x) = v.as_u64() {
        let x = usize::try_from(x).map_err(|_| bad(format!("{x} is too large")))?;
        return Ok(vec![x; n]);
    }
    let arr = v
        .as_i64_array()
        .ok_or_else(|| bad("expected an integer or an array of integers".into()))?;
    if arr.len() != n {
        return Err(bad(format!("{} values for {n} layers", arr.len())));
    }
    arr.into_iter()
        .map(|x| usize::try_from(x).map_err(|_| bad(format!("bad value {x}"))))
        .collect()
}

fn opt_usize(f: &ModelFile, k: &str) -> Result<Option<usize>> {
    match f.get(&key(k)) {
        None => Ok(None),
        Some(_) => f.req_usize(&key(k)).map(Some),
    }
}

fn build(f: &ModelFile) -> Result<Model> {
    let n_layers = f.req_usize(&key("block_count"))?;
    let d_model = f.req_usize(&key("embedding_length"))?;
    let norm_eps = f.req_f32(&key("attention.layer_norm_rms_epsilon"))?;
    if !(norm_eps.is_finite() && norm_eps >= 0.0) {
        return Err(ModelError::Invalid(format!("bad rms epsilon {norm_eps}")));
    }
    let n_heads = per_layer_usize(f, "attention.head_count", n_layers, None)?;
    let n_kv = match f.get(&key("attention.head_count_kv")) {
        Some(_) => per_layer_usize(f, "attention.head_count_kv", n_layers, None)?,
        None => n_heads.clone(),
    };
    let d_ff = per_layer_usize(f, "feed_forward_length", n_layers, None)?;
    let hd_full = f.req_usize(&key("attention.key_length"))?;
    let hd_swa = opt_usize(f, "attention.key_length_swa")?.unwrap_or(hd_full);
    for (k, want) in [
        ("attention.value_length", hd_full),
        ("attention.value_length_swa", hd_swa),
    ] {
        if let Some(v) = opt_usize(f, k)? {
            if v != want {
                return Err(ModelError::Invalid(format!(
                    "{ARCH}: value head size {v} differs from key head size {want}"
                )));
            }
        }
    }
    let window = opt_usize(f, "attention.sliding_window")?;
    let pattern: Vec<bool> = match f.get(&key("attention.sliding_window_pattern")) {
        Some(v) => {
            let items = v
                .as_array()
                .map(|a| &a.items)
                .ok_or_else(|| ModelError::BadKey {
                    key: key("attention.sliding_window_pattern"),
                    msg: "expected an array of booleans".into(),
                })?;
            let p = items
                .iter()
                .map(|b| b.as_bool())
                .collect::<Option<Vec<bool>>>()
                .ok_or_else(|| ModelError::BadKey {
                    key: key("attention.sliding_window_pattern"),
                    msg: "expected an array of booleans".into(),
                })?;
            if p.len() != n_layers {
                return Err(ModelError::BadKey {
                    key: key("attention.sliding_window_pattern"),
                    msg: format!("{} values for {n_layers} layers", p.len()),
                });
            }
            p
        }
        None if window.is_some() => {
            return Err(ModelError::MissingKey(key(
                "attention.sliding_window_pattern",
            )))
        }
        None => vec![false; n_layers],
    };
    if pattern.iter().any(|&s| s) && window.is_none_or(|w| w == 0) {
        return Err(ModelError::MissingKey(key("attention.sliding_window")));
    }
    let theta_full = f.get_f32(&key("rope.freq_base")).unwrap_or(1_000_000.0);
    let theta_swa = f.get_f32(&key("rope.freq_base_swa")).unwrap_or(10_000.0);
    let rot_full = opt_usize(f, "rope.dimension_count")?.unwrap_or(hd_full);
    let rot_swa = opt_usize(f, "rope.dimension_count_swa")?.unwrap_or(hd_swa);
    for (rot, hd) in [(rot_full, hd_full), (rot_swa, hd_swa)] {
        if rot > hd || !rot.is_multiple_of(2) {
            return Err(ModelError::Invalid(format!(
                "{ARCH}: rope dimension count {rot} must be even and <= head size {hd}"
            )));
        }
    }
    let freq_factors = f.opt_vector("rope_freqs.weight", rot_full / 2)?;
    let n_shared = opt_usize(f, "attention.shared_kv_layers")?.unwrap_or(0);
    if n_shared >= n_layers && n_shared > 0 {
        return Err(ModelError::Invalid(format!(
            "{ARCH}: {n_shared} kv-shared layers leave no layer computing k/v"
        )));
    }
    let first_shared = n_layers - n_shared;
    let d_pl = opt_usize(f, "embedding_length_per_layer_input")?.unwrap_or(0);

    let embd = f
        .tensor("token_embd.weight")
        .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
    let vocab_size = usize::try_from(embd.dims.get(1).copied().unwrap_or(0))
        .map_err(|_| ModelError::Invalid("vocabulary too large".into()))?;

    let mut specs = Vec::with_capacity(n_layers);
    let mut extras = Vec::with_capacity(n_layers);
    for i in 0..n_layers {
        if f.tensor(&format!("blk.{i}.ffn_gate_inp.weight")).is_some() {
            return Err(ModelError::Invalid(format!(
                "{ARCH}: layer {i} has an MoE block, which caldera does not run yet"
            )));
        }
        let swa = pattern[i];
        let (hd, rope) = if swa {
            (
                hd_swa,
                RopeSpec {
                    style: RopeStyle::Neox,
                    n_dims: rot_swa,
                    theta: theta_swa,
                    linear_scale: 1.0,
                    freq_factors: None,
                    mscale: 1.0,
                },
            )
        } else {
            (
                hd_full,
                RopeSpec {
                    style: RopeStyle::Neox,
                    n_dims: rot_full,
                    theta: theta_full,
                    linear_scale: 1.0,
                    freq_factors: freq_factors.clone(),
                    mscale: 1.0,
                },
            )
        };
        let (nh, nkv) = (n_heads[i], n_kv[i]);
        if nh == 0 || nkv == 0 || !nh.is_multiple_of(nkv) || hd == 0 {
            return Err(ModelError::Invalid(format!(
                "{ARCH}: layer {i}: {nh} heads cannot be grouped over {nkv} kv heads of size {hd}"
            )));
        }
        let kv_from = if i >= first_shared {
            let src = (0..first_shared).rev().find(|&j| pattern[j] == swa);
            let src = src.ok_or_else(|| {
                ModelError::Invalid(format!(
                    "{ARCH}: kv-shared layer {i} has no earlier layer of its kind"
                ))
            })?;
            if n_kv[src] != nkv {
                return Err(ModelError::Invalid(format!(
                    "{ARCH}: kv-shared layer {i} and its source {src} differ in kv heads"
                )));
            }
            Some(src)
        } else {
            None
        };
        specs.push(LayerSpec {
            mixer: Some(Mixer::Attention(AttnSpec {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                rope: Some(rope),
                window: if swa { window } else { None },
                scale: 1.0,
                qk_norm: true,
                q_gate: false,
                sinks: false,
                softcap: None,
            })),
            ffn: Some(FfnSpec::Dense {
                d_ff: d_ff[i],
                act: Activation::GeluTanhGlu,
            }),
        });
        let out_scale = f
            .opt_vector(&format!("blk.{i}.layer_output_scale.weight"), 1)?
            .map(|v| v[0]);
        extras.push(LayerExtras {
            v_norm: true,
            kv_from,
            out_scale,
        });
    }

    let mut layers: Vec<Layer> = Vec::with_capacity(n_layers);
    for i in 0..n_layers {
        let a = specs[i]
            .attention()
            .ok_or_else(|| ModelError::Invalid("gemma4 layer without attention".into()))?;
        let mixer = bind_attention(f, i, a, d_model, extras[i].kv_from, &layers)?;
        let p = |s: &str| format!("blk.{i}.{s}");
        let ffn = bind_dense(f, i, d_ff[i], Activation::GeluTanhGlu, d_model)?;
        layers.push(Layer {
            norm: Some(f.vector(&p("attn_norm.weight"), d_model)?),
            mixer: Some(MixerWeights::Attention(mixer)),
            post_norm: Some(f.vector(&p("post_attention_norm.weight"), d_model)?),
            ffn_norm: Some(f.vector(&p("ffn_norm.weight"), d_model)?),
            ffn: Some(FfnWeights::Dense(ffn)),
            ffn_post_norm: Some(f.vector(&p("post_ffw_norm.weight"), d_model)?),
        });
    }

    let per_layer_inputs = if d_pl > 0 {
        Some(bind_per_layer_inputs(f, n_layers, d_model, d_pl)?)
    } else {
        None
    };

    let tok_embd = f.weight("token_embd.weight", vocab_size, d_model)?;
    let output_norm = f.vector("output_norm.weight", d_model)?;
    let output = if f.tensor("output.weight").is_some() {
        f.weight("output.weight", vocab_size, d_model)?
    } else {
        tok_embd.clone()
    };
    Ok(Model {
        config: ModelConfig {
            arch: ARCH.into(),
            d_model,
            vocab_size,
            norm_eps,
            context_length: opt_usize(f, "context_length")?.unwrap_or(4096),
            embed_scale: Some((d_model as f32).sqrt()),
            final_logit_softcap: f
                .get_f32(&key("final_logit_softcapping"))
                .filter(|&c| c > 0.0),
            layers: specs,
        },
        weights: ModelWeights {
            tok_embd,
            layers,
            output_norm,
            output,
        },
        extras: Extras {
            per_layer_inputs,
            layers: extras,
        },
    })
}

/// Binds layer `i`'s attention. Kv-shared layers (`kv_from`) take the source layer's
/// k/v weights as placeholders; a layer without `attn_v` uses `attn_k` for v.
fn bind_attention(
    f: &ModelFile,
    i: usize,
    a: &AttnSpec,
    d_model: usize,
    kv_from: Option<usize>,
    done: &[Layer],
) -> Result<AttnWeights> {
    let p = |s: &str| format!("blk.{i}.{s}");
    let q_out = a
        .n_heads
        .checked_mul(a.head_dim)
        .ok_or_else(|| ModelError::Invalid("attention size overflows".into()))?;
    let kv_out = a.n_kv_heads * a.head_dim;
    let q = f.weight(&p("attn_q.weight"), q_out, d_model)?;
    let o = f.weight(&p("attn_output.weight"), d_model, q_out)?;
    let q_norm = Some(f.vector(&p("attn_q_norm.weight"), a.head_dim)?);
    let (k, v, k_norm) = match kv_from {
        Some(src) => {
            let sw = match done.get(src).and_then(|l| l.mixer.as_ref()) {
                Some(MixerWeights::Attention(sw)) => sw,
                _ => {
                    return Err(ModelError::Invalid(format!(
                        "{ARCH}: kv source layer {src} of layer {i} has no attention"
                    )))
                }
            };
            if sw.k.rows != kv_out {
                return Err(ModelError::Invalid(format!(
                    "{ARCH}: kv-shared layer {i} and its source {src} differ in kv size"
                )));
            }
            (sw.k.clone(), sw.v.clone(), sw.k_norm.clone())
        }
        None => {
            let k = f.weight(&p("attn_k.weight"), kv_out, d_model)?;
            let v = if f.tensor(&p("attn_v.weight")).is_some() {
                f.weight(&p("attn_v.weight"), kv_out, d_model)?
            } else {
                k.clone()
            };
            let k_norm = Some(f.vector(&p("attn_k_norm.weight"), a.head_dim)?);
            (k, v, k_norm)
        }
    };
    Ok(AttnWeights {
        q,
        k,
        v,
        o,
        q_norm,
        k_norm,
        sinks: None,
    })
}

fn bind_per_layer_inputs(
    f: &ModelFile,
    n_layers: usize,
    d_model: usize,
    d: usize,
) -> Result<PerLayerInputs> {
    let total = n_layers
        .checked_mul(d)
        .ok_or_else(|| ModelError::Invalid("per-layer input size overflows".into()))?;
    let name = "per_layer_token_embd.weight";
    let t = f
        .tensor(name)
        .ok_or_else(|| ModelError::MissingTensor(name.into()))?;
    let vocab_pl = usize::try_from(t.dims.get(1).copied().unwrap_or(0))
        .map_err(|_| ModelError::Invalid("per-layer vocabulary too large".into()))?;
    let tok_embd = f.weight(name, vocab_pl, total)?;
    let model_proj = f.weight("per_layer_model_proj.weight", total, d_model)?;
    let proj_norm = f.vector("per_layer_proj_norm.weight", d)?;
    let layers = (0..n_layers)
        .map(|i| {
            Ok(PerLayerBlock {
                gate: f.weight(&format!("blk.{i}.inp_gate.weight"), d, d_model)?,
                proj: f.weight(&format!("blk.{i}.proj.weight"), d_model, d)?,
                post_norm: f.vector(&format!("blk.{i}.post_norm.weight"), d_model)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(PerLayerInputs {
        d,
        tok_embd,
        tok_scale: (d as f32).sqrt(),
        model_proj,
        proj_scale: 1.0 / (d_model as f32).sqrt(),
        proj_norm,
        input_scale: std::f32::consts::FRAC_1_SQRT_2,
        layers,
    })
}

// ---------------------------------------------------------------------------------------
// HF → GGUF

/// One layer's attention geometry from `config.json`.
struct HfLayer {
    sliding: bool,
    head_dim: u64,
    n_heads: u64,
    n_kv: u64,
}

fn hf_layers(t: &Translation) -> Result<Vec<HfLayer>> {
    let n_layers = t.req_u64("num_hidden_layers")? as usize;
    let d_model = t.req_u64("hidden_size")?;
    let n_heads = t.req_u64("num_attention_heads")?;
    let n_kv = t.u64("num_key_value_heads").unwrap_or(n_heads);
    let head_dim = match t.u64("head_dim") {
        Some(h) => h,
        None => d_model
            .checked_div(n_heads)
            .ok_or_else(|| ModelError::Invalid("num_attention_heads is 0".into()))?,
    };
    let cfg = t.text_cfg();
    let types: Vec<&str> = match cfg.get("layer_types").and_then(Value::as_array) {
        Some(a) => a
            .iter()
            .map(|v| v.as_str())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ModelError::Invalid("config.json: bad layer_types".into()))?,
        None => {
            return Err(ModelError::MissingKey("config.json: layer_types".into()));
        }
    };
    if types.len() != n_layers {
        return Err(ModelError::Invalid(format!(
            "config.json: {} layer_types for {n_layers} layers",
            types.len()
        )));
    }
    let k_eq_v = t.bool("attention_k_eq_v").unwrap_or(false);
    let plc = cfg.get("per_layer_config").filter(|v| v.is_object());
    types
        .iter()
        .enumerate()
        .map(|(i, ty)| {
            let sliding = match *ty {
                "sliding_attention" => true,
                "full_attention" => false,
                other => {
                    return Err(ModelError::Invalid(format!(
                        "config.json: layer type '{other}' is not supported"
                    )))
                }
            };
            let own = plc.and_then(|p| p.get(i.to_string()));
            let get = |k: &str| own.and_then(|o| o.get(k)).and_then(Value::as_u64);
            let full = |k: &str| if sliding { None } else { t.u64(k) };
            Ok(HfLayer {
                sliding,
                head_dim: get("head_dim")
                    .or_else(|| full("global_head_dim"))
                    .unwrap_or(head_dim),
                n_heads: get("num_attention_heads").unwrap_or(n_heads),
                n_kv: get("num_key_value_heads")
                    .or_else(|| {
                        if k_eq_v {
                            full("num_global_key_value_heads")
                        } else {
                            None
                        }
                    })
                    .unwrap_or(n_kv),
            })
        })
        .collect()
}

/// One value per layer: a plain number when all agree, else a u32 array.
fn set_per_layer(t: &mut Translation, k: &str, vals: &[u64]) {
    if vals.windows(2).all(|w| w[0] == w[1]) {
        t.set_u32(k, vals.first().copied().unwrap_or(0));
    } else {
        let items = vals
            .iter()
            .map(|&v| GgufValue::U32(v.min(u32::MAX as u64) as u32))
            .collect();
        t.set(
            k,
            GgufValue::Array(GgufArray::new(GgufValueType::U32, items)),
        );
    }
}

/// The single head size of one kind of layer.
fn kind_head_dim(layers: &[HfLayer], sliding: bool) -> Result<Option<u64>> {
    let mut dims = layers
        .iter()
        .filter(|l| l.sliding == sliding)
        .map(|l| l.head_dim);
    let first = dims.next();
    if let Some(h) = first {
        if dims.any(|d| d != h) {
            return Err(ModelError::Invalid(format!(
                "{ARCH}: {} layers with different head sizes are not supported",
                if sliding { "sliding" } else { "full" }
            )));
        }
    }
    Ok(first)
}

fn partial_factor(params: Option<&Value>) -> f64 {
    params
        .and_then(|p| p.get("partial_rotary_factor"))
        .and_then(Value::as_f64)
        .unwrap_or(1.0)
}

fn translate(t: &mut Translation) -> Result<()> {
    if t.bool("enable_moe_block") == Some(true) {
        return Err(ModelError::Invalid(
            "gemma4: the MoE block (enable_moe_block) is not supported yet".into(),
        ));
    }
    crate::hf_names::common_meta(t)?;
    // Gemma 4 sets RoPE per layer kind below.
    t.meta.retain(|(k, _)| k != "gemma4.rope.scaling.type");
    let layers = hf_layers(t)?;
    let n_layers = layers.len();
    let hd_swa = kind_head_dim(&layers, true)?;
    let hd_full = kind_head_dim(&layers, false)?;
    let hd_full_or = hd_full.or(hd_swa).unwrap_or(0);
    let hd_swa_or = hd_swa.unwrap_or(hd_full_or);
    t.set_u32("attention.key_length", hd_full_or);
    t.set_u32("attention.value_length", hd_full_or);
    t.set_u32("attention.key_length_swa", hd_swa_or);
    t.set_u32("attention.value_length_swa", hd_swa_or);
    let nh: Vec<u64> = layers.iter().map(|l| l.n_heads).collect();
    let nkv: Vec<u64> = layers.iter().map(|l| l.n_kv).collect();
    set_per_layer(t, "attention.head_count", &nh);
    set_per_layer(t, "attention.head_count_kv", &nkv);
    if let Some(w) = t.u64("sliding_window") {
        t.set_u32("attention.sliding_window", w);
    }
    let pattern = layers.iter().map(|l| GgufValue::Bool(l.sliding)).collect();
    t.set(
        "attention.sliding_window_pattern",
        GgufValue::Array(GgufArray::new(GgufValueType::Bool, pattern)),
    );

    // RoPE per layer kind.
    let cfg = t.text_cfg().clone();
    let (theta_swa, ty_swa, p_swa) = rope_params(&cfg, Some("sliding_attention"));
    if ty_swa != "default" {
        return Err(ModelError::Invalid(format!(
            "gemma4: sliding-layer rope_type '{ty_swa}' is not supported"
        )));
    }
    t.set_f32("rope.freq_base_swa", theta_swa.unwrap_or(10_000.0));
    let rot_swa = (hd_swa_or as f64 * partial_factor(p_swa)).round() as u64;
    t.set_u32("rope.dimension_count_swa", rot_swa);
    let (theta_full, ty_full, p_full) = rope_params(&cfg, Some("full_attention"));
    t.set_f32("rope.freq_base", theta_full.unwrap_or(1_000_000.0));
    let partial = partial_factor(p_full);
    let factor = p_full
        .and_then(|p| p.get("factor"))
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    match ty_full.as_str() {
        "proportional" => {
            // The whole head takes part in NeoX RoPE; only the first pairs turn.
            t.set_u32("rope.dimension_count", hd_full_or);
            let half = (hd_full_or / 2) as usize;
            let n_rot = ((partial * hd_full_or as f64) / 2.0).floor() as usize;
            let n_rot = n_rot.min(half);
            let mut ff = vec![factor as f32; n_rot];
            ff.resize(half, 1e30);
            t.push_f32("rope_freqs.weight".into(), vec![half as u64], &ff);
        }
        "default" => {
            let rot = (hd_full_or as f64 * partial).round() as u64;
            t.set_u32("rope.dimension_count", rot);
        }
        other => {
            return Err(ModelError::Invalid(format!(
                "gemma4: full-layer rope_type '{other}' is not supported"
            )))
        }
    }

    if let Some(c) = t.f64("final_logit_softcapping") {
        t.set_f32("final_logit_softcapping", c);
    }
    let n_shared = t.u64("num_kv_shared_layers").unwrap_or(0);
    t.set_u32("attention.shared_kv_layers", n_shared);
    let d_pl = t.u64("hidden_size_per_layer_input").unwrap_or(0);
    t.set_u32("embedding_length_per_layer_input", d_pl);
    if t.bool("use_double_wide_mlp") == Some(true) && n_shared > 0 {
        let ff = t.req_u64("intermediate_size")?;
        let first = (n_layers as u64).saturating_sub(n_shared);
        let arr: Vec<u64> = (0..n_layers as u64)
            .map(|i| if i < first { ff } else { ff * 2 })
            .collect();
        set_per_layer(t, "feed_forward_length", &arr);
    }

    let rest = map_common(t, true);
    for ht in rest {
        let name = ht.name.as_str();
        let short = name
            .strip_prefix("model.language_model.")
            .or_else(|| name.strip_prefix("model."))
            .unwrap_or(name);
        let top = match short {
            "embed_tokens_per_layer.weight" => Some("per_layer_token_embd.weight"),
            "per_layer_model_projection.weight" => Some("per_layer_model_proj.weight"),
            "per_layer_projection_norm.weight" => Some("per_layer_proj_norm.weight"),
            _ => None,
        };
        if let Some(n) = top {
            t.push(n.into(), ht);
            continue;
        }
        if let Some((idx, what)) = short
            .strip_prefix("layers.")
            .and_then(|r| r.split_once('.'))
        {
            if let Ok(i) = idx.parse::<usize>() {
                let g = match what {
                    "per_layer_input_gate.weight" => Some("inp_gate.weight"),
                    "per_layer_projection.weight" => Some("proj.weight"),
                    "post_per_layer_input_norm.weight" => Some("post_norm.weight"),
                    "layer_scalar" | "layer_scalar.weight" => Some("layer_output_scale.weight"),
                    _ => None,
                };
                if let Some(g) = g {
                    if g == "layer_output_scale.weight" {
                        // A one-element tensor, stored as f32.
                        let v = to_f32(ht)?;
                        t.push_f32(format!("blk.{i}.{g}"), vec![v.len() as u64], &v);
                    } else {
                        t.push(format!("blk.{i}.{g}"), ht);
                    }
                    continue;
                }
            }
        }
        // Vision / audio towers of multimodal checkpoints are not part of the text model.
        let multimodal = ["vision_tower", "audio_tower", "embed_vision", "embed_audio"];
        if multimodal.iter().any(|m| name.contains(m)) {
            continue;
        }
        return Err(ModelError::Invalid(format!(
            "gemma4: unexpected tensor '{name}'"
        )));
    }
    Ok(())
}
