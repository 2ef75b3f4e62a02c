//! `nemotron_h` and `nemotron_h_moe` (HF `nemotron_h`: Nemotron-H, Nemotron Nano 2 / 3).
//!
//! A hybrid whose layers are each ONE block, pre-normed by the layer's own RMSNorm and
//! added to the residual: `x += block(norm(x))`, the block being a Mamba2 mixer
//! ([`crate::blocks::mamba2`], HF "M" / "mamba" / "linear_attention"), GQA attention
//! without RoPE ("*" / "attention" / "full_attention"), a relu² MLP (`down(relu(up x)²)`,
//! "-" / "mlp") or a MoE ("E" / "moe": sigmoid router, top-k of score + correction bias,
//! optional renormalization, routed scaling factor, plus an ungated relu² shared expert).
//! HF source: transformers `modeling_nemotron_h.py`.
//!
//! GGUF (llama.cpp's conventions; the MoE variant is the architecture `nemotron_h_moe`):
//! every layer's norm is `blk.{i}.attn_norm`; the per-layer arrays
//! `{arch}.attention.head_count_kv` and `{arch}.feed_forward_length` give the kinds: both
//! 0 = Mamba2, only `feed_forward_length` 0 = attention, otherwise an FFN layer (a MoE when
//! it has `ffn_gate_inp`, else a dense MLP of that width). Mamba2 keys `ssm.conv_kernel`,
//! `ssm.state_size`, `ssm.group_count`, `ssm.inner_size`, `ssm.time_step_rank` (= heads);
//! tensors `ssm_in`, `ssm_conv1d` (+bias), `ssm_dt.bias`, `ssm_a` (= -exp(A_log)), `ssm_d`,
//! `ssm_norm`, `ssm_out`. MoE keys `expert_{count,used_count,feed_forward_length,
//! shared_feed_forward_length,shared_count,weights_norm,weights_scale,group_count}`;
//! tensors `ffn_gate_inp`, `exp_probs_b.bias`, `ffn_{up,down}_exps`, `ffn_{up,down}_shexp`.
//! caldera also writes `{arch}.ssm.time_step_min` for HF folders: HF's reference path clamps
//! `dt` from below at `time_step_min` (llama.cpp has no such key and no clamp).

use std::collections::BTreeSet;

use caldera_format::gguf::GgufValue;
use serde_json::Value;

use super::{bind_attention, bind_dense, ArchDef, Common};
use crate::blocks::mamba2::{Mamba2Spec, Mamba2Weights};
use crate::blocks::moe::{MoeSpec, MoeWeights, RouterKind};
use crate::config::{Activation, FfnSpec, LayerSpec, Mixer, ModelConfig};
use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::hf_names::{stack_experts, to_f32, Translation};
use crate::weights::{DenseFfn, FfnWeights, Layer, MixerWeights, ModelWeights};
use crate::Model;

pub static NEMOTRON_H: ArchDef = ArchDef {
    name: "nemotron_h",
    hf_model_types: &["nemotron_h"],
    build,
    hf_translate: translate,
};

/// llama.cpp's name for the MoE variant. It needs its own line in `arch::ARCHS` for GGUF
/// files that carry this name; HF folders with experts translate to it only once it is
/// registered (and to `nemotron_h` before), so both always load.
#[allow(dead_code)]
pub static NEMOTRON_H_MOE: ArchDef = ArchDef {
    name: "nemotron_h_moe",
    hf_model_types: &[],
    build,
    hf_translate: translate,
};

/// The kind of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Mamba,
    Attention,
    Mlp,
    Moe,
}

impl Kind {
    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "M" | "mamba" | "linear_attention" => Kind::Mamba,
            "*" | "attention" | "full_attention" => Kind::Attention,
            "-" | "mlp" => Kind::Mlp,
            "E" | "moe" => Kind::Moe,
            _ => return None,
        })
    }
}

/// A per-layer integer key: an array of `n` entries, or one value for every layer
/// (`default` when absent).
fn per_layer(f: &ModelFile, key: &str, n: usize, default: usize) -> Result<Vec<usize>> {
    let bad = |msg: String| ModelError::BadKey {
        key: key.to_owned(),
        msg,
    };
    let Some(v) = f.get(key) else {
        return Ok(vec![default; n]);
    };
    if v.as_array().is_some() {
        let items = v
            .as_i64_array()
            .ok_or_else(|| bad("expected an array of integers".into()))?;
        if items.len() != n {
            return Err(bad(format!("{} entries for {n} layers", items.len())));
        }
        items
            .iter()
            .map(|&x| usize::try_from(x).map_err(|_| bad(format!("bad value {x}"))))
            .collect()
    } else {
        let x = v
            .as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| bad("expected an integer or an array".into()))?;
        Ok(vec![x; n])
    }
}

fn mamba_spec(f: &ModelFile, arch: &str) -> Result<Mamba2Spec> {
    let k = |s: &str| format!("{arch}.{s}");
    let d_inner = f.req_usize(&k("ssm.inner_size"))?;
    let n_heads = f.req_usize(&k("ssm.time_step_rank"))?;
    if n_heads == 0 || !d_inner.is_multiple_of(n_heads) {
        return Err(ModelError::BadKey {
            key: k("ssm.inner_size"),
            msg: format!("{d_inner} does not split into {n_heads} heads"),
        });
    }
    let dt_min = f.get_f32(&k("ssm.time_step_min")).unwrap_or(0.0);
    let spec = Mamba2Spec {
        n_heads,
        head_dim: d_inner / n_heads,
        d_state: f.req_usize(&k("ssm.state_size"))?,
        n_groups: f.get_u64(&k("ssm.group_count")).unwrap_or(1) as usize,
        d_conv: f.req_usize(&k("ssm.conv_kernel"))?,
        dt_min: if dt_min.is_finite() && dt_min > 0.0 {
            dt_min
        } else {
            0.0
        },
    };
    spec.validate()?;
    Ok(spec)
}

fn moe_spec(f: &ModelFile, arch: &str, layer_ff: usize, shared: Option<usize>) -> Result<MoeSpec> {
    let k = |s: &str| format!("{arch}.{s}");
    let n_experts = f.req_usize(&k("expert_count"))?;
    let n_used = f.req_usize(&k("expert_used_count"))?;
    let d_ff = match f.get_u64(&k("expert_feed_forward_length")) {
        Some(v) if v > 0 => v as usize,
        _ => layer_ff,
    };
    let renorm = f
        .get(&k("expert_weights_norm"))
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let weights_scale = match f.get_f32(&k("expert_weights_scale")) {
        Some(s) if s != 0.0 && s.is_finite() => s,
        _ => 1.0,
    };
    Ok(MoeSpec {
        n_experts,
        n_used,
        d_ff,
        act: Activation::Relu2,
        router: RouterKind::Sigmoid { renorm },
        weights_scale,
        shared_d_ff: shared,
    })
}

/// Binds a MoE layer: ungated relu² experts and an ungated shared expert.
fn bind_moe(f: &ModelFile, i: usize, spec: &MoeSpec, d: usize) -> Result<MoeWeights> {
    let p = |s: &str| format!("blk.{i}.{s}");
    let (n, ff) = (spec.n_experts, spec.d_ff);
    if spec.n_used == 0 || spec.n_used > n {
        return Err(ModelError::Invalid(format!(
            "layer {i}: {} experts used of {n}",
            spec.n_used
        )));
    }
    let shared = match spec.shared_d_ff {
        Some(sff) => Some(DenseFfn {
            gate: None,
            up: f.weight(&p("ffn_up_shexp.weight"), sff, d)?,
            down: f.weight(&p("ffn_down_shexp.weight"), d, sff)?,
        }),
        None => None,
    };
    Ok(MoeWeights {
        router: f.weight(&p("ffn_gate_inp.weight"), n, d)?,
        selection_bias: f.opt_vector(&p("exp_probs_b.bias"), n)?,
        gate: None,
        up: f.experts(&p("ffn_up_exps.weight"), n, ff, d)?,
        down: f.experts(&p("ffn_down_exps.weight"), n, d, ff)?,
        shared,
        shared_gate: None,
    })
}

fn build(f: &ModelFile) -> Result<Model> {
    let arch: &'static str = match f.architecture() {
        Some("nemotron_h") => "nemotron_h",
        Some("nemotron_h_moe") => "nemotron_h_moe",
        other => {
            return Err(ModelError::Invalid(format!(
                "nemotron_h cannot build architecture {other:?}"
            )))
        }
    };
    let k = |s: &str| format!("{arch}.{s}");
    let c = Common::read(f, arch)?;
    let d = c.d_model;
    let n = c.n_layers;
    let kv = per_layer(f, &k("attention.head_count_kv"), n, 0)?;
    let ff = per_layer(f, &k("feed_forward_length"), n, 0)?;
    let heads = per_layer(f, &k("attention.head_count"), n, 0)?;
    let head_dim = match f.get_u64(&k("attention.key_length")) {
        Some(h) => h as usize,
        None => d
            .checked_div(heads.iter().copied().max().unwrap_or(0))
            .unwrap_or(0),
    };
    if let Some(v) = f.get_u64(&k("attention.value_length")) {
        if v as usize != head_dim {
            return Err(ModelError::Invalid(format!(
                "key length {head_dim} and value length {v} differ"
            )));
        }
    }
    if f.tensor("blk.0.ffn_latent_down.weight").is_some()
        || f.get_u64(&k("moe_latent_size")).is_some_and(|v| v > 0)
    {
        return Err(ModelError::Invalid(
            "latent MoE projections (moe_latent_size) are not supported yet".into(),
        ));
    }

    let mut mamba: Option<Mamba2Spec> = None;
    let mut specs = Vec::with_capacity(n);
    let mut layers = Vec::with_capacity(n);
    for i in 0..n {
        let p = |s: &str| format!("blk.{i}.{s}");
        let norm = f.vector(&p("attn_norm.weight"), d)?;
        let (spec, layer) = if kv[i] == 0 && ff[i] == 0 {
            let s = match &mamba {
                Some(s) => s.clone(),
                None => {
                    let s = mamba_spec(f, arch)?;
                    mamba = Some(s.clone());
                    s
                }
            };
            let w = Mamba2Weights::bind(f, i, &s, d)?;
            (
                LayerSpec {
                    mixer: Some(Mixer::Mamba2(s)),
                    ffn: None,
                },
                Layer {
                    norm: Some(norm),
                    mixer: Some(MixerWeights::Mamba2(w)),
                    post_norm: None,
                    ffn_norm: None,
                    ffn: None,
                    ffn_post_norm: None,
                },
            )
        } else if ff[i] == 0 {
            if heads[i] == 0 || !heads[i].is_multiple_of(kv[i]) || head_dim == 0 {
                return Err(ModelError::Invalid(format!(
                    "layer {i}: {} attention heads of size {head_dim} over {} kv heads",
                    heads[i], kv[i]
                )));
            }
            let mut a = c.attn(None, false);
            a.n_heads = heads[i];
            a.n_kv_heads = kv[i];
            a.head_dim = head_dim;
            a.scale = f
                .get_f32(&k("attention.scale"))
                .filter(|s| *s != 0.0 && s.is_finite())
                .unwrap_or(1.0 / (head_dim as f32).sqrt());
            let w = bind_attention(f, i, &a, d)?;
            (
                LayerSpec {
                    mixer: Some(Mixer::Attention(a)),
                    ffn: None,
                },
                Layer {
                    norm: Some(norm),
                    mixer: Some(MixerWeights::Attention(w)),
                    post_norm: None,
                    ffn_norm: None,
                    ffn: None,
                    ffn_post_norm: None,
                },
            )
        } else {
            let (fs, fw) = if f.tensor(&p("ffn_gate_inp.weight")).is_some() {
                let shared = if f.tensor(&p("ffn_up_shexp.weight")).is_some() {
                    Some(f.req_usize(&k("expert_shared_feed_forward_length"))?)
                } else {
                    None
                };
                let ms = moe_spec(f, arch, ff[i], shared)?;
                let mw = bind_moe(f, i, &ms, d)?;
                (FfnSpec::Moe(ms), FfnWeights::Moe(mw))
            } else {
                let dw = bind_dense(f, i, ff[i], Activation::Relu2, d)?;
                (
                    FfnSpec::Dense {
                        d_ff: ff[i],
                        act: Activation::Relu2,
                    },
                    FfnWeights::Dense(dw),
                )
            };
            (
                LayerSpec {
                    mixer: None,
                    ffn: Some(fs),
                },
                Layer {
                    norm: None,
                    mixer: None,
                    post_norm: None,
                    ffn_norm: Some(norm),
                    ffn: Some(fw),
                    ffn_post_norm: None,
                },
            )
        };
        specs.push(spec);
        layers.push(layer);
    }
    let (tok_embd, output_norm, output) = super::bind_io(f, c.vocab_size, d)?;
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

/// The layer kinds of an HF config: `hybrid_override_pattern` (a string of M * - E) or
/// `layers_block_type` (a list of names).
fn hf_kinds(t: &Translation) -> Result<Vec<Kind>> {
    let cfg = t.text_cfg();
    let bad = |m: String| ModelError::Invalid(format!("config.json: {m}"));
    let kinds: Vec<Kind> =
        if let Some(s) = cfg.get("hybrid_override_pattern").and_then(Value::as_str) {
            s.chars()
                .map(|ch| {
                    Kind::parse(ch.encode_utf8(&mut [0; 4])).ok_or_else(|| {
                        bad(format!(
                            "unknown layer kind '{ch}' in hybrid_override_pattern"
                        ))
                    })
                })
                .collect::<Result<_>>()?
        } else if let Some(list) = cfg.get("layers_block_type").and_then(Value::as_array) {
            list.iter()
                .map(|v| {
                    v.as_str()
                        .and_then(Kind::parse)
                        .ok_or_else(|| bad(format!("unknown layer kind {v} in layers_block_type")))
                })
                .collect::<Result<_>>()?
        } else {
            return Err(ModelError::MissingKey(
                "config.json: hybrid_override_pattern (or layers_block_type)".into(),
            ));
        };
    if kinds.is_empty() {
        return Err(bad("no layers".into()));
    }
    if let Some(n) = t.u64("num_hidden_layers") {
        if n as usize != kinds.len() {
            return Err(bad(format!(
                "num_hidden_layers {n} but the layer pattern has {} entries",
                kinds.len()
            )));
        }
    }
    Ok(kinds)
}

/// The first of `keys` that the config has, as an integer.
fn first_u64(t: &Translation, keys: &[&str]) -> Option<u64> {
    keys.iter().find_map(|k| t.u64(k))
}

fn req_first(t: &Translation, keys: &[&str]) -> Result<u64> {
    first_u64(t, keys).ok_or_else(|| ModelError::MissingKey(format!("config.json: {}", keys[0])))
}

fn i32_of(v: u64) -> Result<i32> {
    i32::try_from(v).map_err(|_| ModelError::Invalid(format!("config.json: {v} is too large")))
}

fn translate(t: &mut Translation) -> Result<()> {
    let kinds = hf_kinds(t)?;
    let n = kinds.len();
    // llama.cpp: a config with experts is `nemotron_h_moe`. Use that name only where this
    // build registers it, so the translated file always builds.
    let is_moe = t.u64("num_experts_per_tok").is_some();
    if is_moe && super::ARCHS.iter().any(|a| a.name == "nemotron_h_moe") {
        t.arch = "nemotron_h_moe";
        t.set(
            "general.architecture",
            GgufValue::String("nemotron_h_moe".into()),
        );
    }
    let cfg_str = |k: &str| {
        t.text_cfg()
            .get(k)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    if let Some(act) = cfg_str("mamba_hidden_act") {
        if act != "silu" && act != "swish" {
            return Err(ModelError::Invalid(format!(
                "mamba_hidden_act '{act}' is not supported"
            )));
        }
    }
    if let Some(act) = cfg_str("mlp_hidden_act") {
        if act != "relu2" {
            return Err(ModelError::Invalid(format!(
                "mlp_hidden_act '{act}' is not supported"
            )));
        }
    }
    if t.u64("moe_latent_size").is_some() {
        return Err(ModelError::Invalid(
            "latent MoE projections (moe_latent_size) are not supported yet".into(),
        ));
    }

    let d_model = t.req_u64("hidden_size")?;
    let n_heads = t.u64("num_attention_heads").unwrap_or(0);
    let n_kv = t.u64("num_key_value_heads").unwrap_or(n_heads);
    let head_dim = match first_u64(t, &["head_dim", "attention_head_dim"]) {
        Some(h) => h,
        None => d_model.checked_div(n_heads).unwrap_or(0),
    };
    let mamba_heads = req_first(t, &["mamba_num_heads", "num_heads"])?;
    let mamba_head_dim = req_first(t, &["mamba_head_dim"])?;
    let d_inner = mamba_heads
        .checked_mul(mamba_head_dim)
        .ok_or_else(|| ModelError::Invalid("config.json: mamba sizes overflow".into()))?;
    let n_groups = first_u64(t, &["n_groups", "mamba_n_groups"]).unwrap_or(1);
    let d_state = req_first(t, &["ssm_state_size", "state_size", "mamba_d_state"])?;
    let d_conv = first_u64(t, &["conv_kernel", "mamba_d_conv"]).unwrap_or(4);
    let d_ff = t.u64("intermediate_size").unwrap_or(0);
    let moe_ff = t.u64("moe_intermediate_size").unwrap_or(0);
    let eps = t
        .f64("layer_norm_epsilon")
        .or_else(|| t.f64("rms_norm_eps"))
        .unwrap_or(1e-5);

    t.set_u32("block_count", n as u64);
    t.set_u32("embedding_length", d_model);
    t.set_u32("context_length", 1 << 20);
    t.set_u32("vocab_size", t.req_u64("vocab_size")?);
    t.set_u32("attention.head_count", n_heads);
    t.set_u32("attention.key_length", head_dim);
    t.set_u32("attention.value_length", head_dim);
    t.set_f32("attention.layer_norm_rms_epsilon", eps);
    let mut kv_arr = Vec::with_capacity(n);
    let mut ff_arr = Vec::with_capacity(n);
    for k in &kinds {
        kv_arr.push(if *k == Kind::Attention {
            i32_of(n_kv)?
        } else {
            0
        });
        ff_arr.push(match k {
            Kind::Mlp => i32_of(d_ff)?,
            Kind::Moe => i32_of(moe_ff)?,
            _ => 0,
        });
    }
    let ffn_without_width = kinds
        .iter()
        .zip(&ff_arr)
        .any(|(k, &f)| matches!(k, Kind::Mlp | Kind::Moe) && f == 0);
    if ffn_without_width {
        return Err(ModelError::MissingKey(
            "config.json: intermediate_size / moe_intermediate_size".into(),
        ));
    }
    if kinds.contains(&Kind::Attention) && (n_kv == 0 || n_heads == 0) {
        return Err(ModelError::MissingKey(
            "config.json: num_attention_heads / num_key_value_heads".into(),
        ));
    }
    t.set("attention.head_count_kv", GgufValue::i32_array(&kv_arr));
    t.set("feed_forward_length", GgufValue::i32_array(&ff_arr));
    t.set_u32("ssm.conv_kernel", d_conv);
    t.set_u32("ssm.state_size", d_state);
    t.set_u32("ssm.group_count", n_groups);
    t.set_u32("ssm.inner_size", d_inner);
    t.set_u32("ssm.time_step_rank", mamba_heads);
    if let Some(tmin) = t.f64("time_step_min") {
        t.set_f32("ssm.time_step_min", tmin);
    }
    if is_moe {
        let n_group = t.u64("n_group").unwrap_or(1);
        let topk_group = t.u64("topk_group").unwrap_or(n_group);
        if n_group > 1 && topk_group < n_group {
            return Err(ModelError::Invalid(format!(
                "grouped expert selection ({topk_group} of {n_group} groups) is not supported"
            )));
        }
        t.set_u32("expert_used_count", t.req_u64("num_experts_per_tok")?);
        t.set_u32("expert_feed_forward_length", moe_ff);
        t.set_u32(
            "expert_shared_feed_forward_length",
            t.u64("moe_shared_expert_intermediate_size").unwrap_or(0),
        );
        t.set_u32(
            "expert_count",
            req_first(t, &["n_routed_experts", "num_experts"])?,
        );
        t.set_u32(
            "expert_shared_count",
            t.u64("n_shared_experts").unwrap_or(0),
        );
        t.set(
            "expert_weights_norm",
            GgufValue::Bool(t.bool("norm_topk_prob").unwrap_or(false)),
        );
        t.set_f32(
            "expert_weights_scale",
            t.f64("routed_scaling_factor").unwrap_or(1.0),
        );
        t.set_u32("expert_group_count", n_group);
    }

    translate_tensors(t, &kinds, d_inner, n_groups, mamba_heads)
}

/// `(layer, rest)` of `backbone.layers.{layer}.{rest}` (also `model.layers.`).
fn split_layer(name: &str) -> Option<(usize, &str)> {
    let rest = name
        .strip_prefix("backbone.layers.")
        .or_else(|| name.strip_prefix("model.layers."))?;
    let (idx, rest) = rest.split_once('.')?;
    Some((idx.parse().ok()?, rest))
}

fn translate_tensors(
    t: &mut Translation,
    kinds: &[Kind],
    d_inner: u64,
    n_groups: u64,
    mamba_heads: u64,
) -> Result<()> {
    let tie = t.tie_embeddings();
    let hf = t.hf;
    let n_experts = first_u64(t, &["n_routed_experts", "num_experts"]).unwrap_or(0) as usize;
    let mut stacked: BTreeSet<usize> = BTreeSet::new();
    for ht in &hf.tensors {
        let name = ht.name.as_str();
        let bad = |msg: String| ModelError::BadTensor {
            name: name.to_owned(),
            msg,
        };
        match name {
            "backbone.embeddings.weight"
            | "backbone.embedding.weight"
            | "model.embed_tokens.weight" => {
                t.push("token_embd.weight".into(), ht);
                continue;
            }
            "backbone.norm_f.weight" | "model.norm.weight" => {
                t.push("output_norm.weight".into(), ht);
                continue;
            }
            "lm_head.weight" => {
                if !tie {
                    t.push("output.weight".into(), ht);
                }
                continue;
            }
            _ => {}
        }
        if name.starts_with("mtp.") {
            continue; // multi-token prediction head: not used for plain decoding
        }
        let Some((i, rest)) = split_layer(name) else {
            return Err(bad("unexpected tensor for nemotron_h".into()));
        };
        if i >= kinds.len() {
            return Err(bad(format!(
                "layer {i} is beyond the {} layers",
                kinds.len()
            )));
        }
        let g = |s: &str| format!("blk.{i}.{s}");
        if rest == "norm.weight" {
            t.push(g("attn_norm.weight"), ht);
            continue;
        }
        let Some(m) = rest.strip_prefix("mixer.") else {
            return Err(bad("unexpected tensor for nemotron_h".into()));
        };
        // Per-expert MoE matrices are stacked once per layer.
        if let Some(e) = m.strip_prefix("experts.") {
            if e.split('.')
                .next()
                .is_some_and(|s| s.parse::<usize>().is_ok())
            {
                if stacked.insert(i) {
                    let prefix = format!(
                        "{}.layers.{i}.mixer.experts",
                        name.split('.').next().unwrap_or("backbone")
                    );
                    stack_experts(
                        t,
                        &prefix,
                        "up_proj.weight",
                        n_experts,
                        g("ffn_up_exps.weight"),
                    )?;
                    stack_experts(
                        t,
                        &prefix,
                        "down_proj.weight",
                        n_experts,
                        g("ffn_down_exps.weight"),
                    )?;
                }
                continue;
            }
        }
        let short = match m {
            "in_proj.weight" => "ssm_in.weight",
            "in_proj.bias" => "ssm_in.bias",
            "out_proj.weight" => "ssm_out.weight",
            "out_proj.bias" => "ssm_out.bias",
            "conv1d.bias" => "ssm_conv1d.bias",
            "dt_bias" => "ssm_dt.bias",
            "conv1d.weight" => {
                // [C, 1, K] -> GGUF [K, C]
                let (c, k) = match ht.shape.as_slice() {
                    [c, 1, k] | [c, k] => (*c as u64, *k as u64),
                    s => return Err(bad(format!("expected [channels, 1, kernel], found {s:?}"))),
                };
                t.push(g("ssm_conv1d.weight"), ht);
                if let Some(last) = t.tensors.last_mut() {
                    last.dims = vec![k, c];
                }
                continue;
            }
            "A_log" => {
                let v: Vec<f32> = to_f32(ht)?.iter().map(|a| -a.exp()).collect();
                if v.len() as u64 != mamba_heads {
                    return Err(bad(format!("expected {mamba_heads} values")));
                }
                t.push_f32(g("ssm_a"), vec![1, mamba_heads], &v);
                continue;
            }
            "D" => {
                if ht.n_elements() as u64 != mamba_heads {
                    return Err(bad(format!("expected {mamba_heads} values")));
                }
                t.push(g("ssm_d"), ht);
                if let Some(last) = t.tensors.last_mut() {
                    last.dims = vec![1, mamba_heads];
                }
                continue;
            }
            "norm.weight" => {
                if n_groups == 0
                    || !d_inner.is_multiple_of(n_groups)
                    || ht.n_elements() as u64 != d_inner
                {
                    return Err(bad(format!(
                        "expected {d_inner} values in {n_groups} groups"
                    )));
                }
                t.push(g("ssm_norm.weight"), ht);
                if let Some(last) = t.tensors.last_mut() {
                    last.dims = vec![d_inner / n_groups, n_groups];
                }
                continue;
            }
            "q_proj.weight" => "attn_q.weight",
            "k_proj.weight" => "attn_k.weight",
            "v_proj.weight" => "attn_v.weight",
            "o_proj.weight" => "attn_output.weight",
            "q_proj.bias" => "attn_q.bias",
            "k_proj.bias" => "attn_k.bias",
            "v_proj.bias" => "attn_v.bias",
            "o_proj.bias" => "attn_output.bias",
            "up_proj.weight" => "ffn_up.weight",
            "down_proj.weight" => "ffn_down.weight",
            "up_proj.bias" => "ffn_up.bias",
            "down_proj.bias" => "ffn_down.bias",
            "gate.weight" => "ffn_gate_inp.weight",
            "gate.e_score_correction_bias" | "gate.e_score_correction.bias" => "exp_probs_b.bias",
            // transformers 5 fused experts: [n, rows, cols] is already the stacked layout.
            "experts.up_proj" | "experts.up_proj.weight" => "ffn_up_exps.weight",
            "experts.down_proj" | "experts.down_proj.weight" => "ffn_down_exps.weight",
            "shared_experts.up_proj.weight" => "ffn_up_shexp.weight",
            "shared_experts.down_proj.weight" => "ffn_down_shexp.weight",
            _ => return Err(bad("unexpected tensor for nemotron_h".into())),
        };
        t.push(g(short), ht);
        // Keep vectors that llama.cpp stores as F32 in F32 (router bias).
        if short == "exp_probs_b.bias" {
            if let Some(last) = t.tensors.pop() {
                let v = to_f32(ht)?;
                t.push_f32(last.name, last.dims, &v);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::RawTensor;
    use caldera_format::{GgmlType, TensorBytes};
    use std::path::Path;

    /// A tiny file with layers M, *, E under the architecture name `arch`.
    fn tiny(arch: &str, kv: GgufValue) -> ModelFile {
        let u = |n: u32| GgufValue::U32(n);
        let k = |s: &str| format!("{arch}.{s}");
        let meta = vec![
            (
                "general.architecture".into(),
                GgufValue::String(arch.into()),
            ),
            (k("block_count"), u(3)),
            (k("embedding_length"), u(8)),
            (k("attention.head_count"), u(2)),
            (k("attention.head_count_kv"), kv),
            (k("feed_forward_length"), GgufValue::i32_array(&[0, 0, 4])),
            (k("attention.key_length"), u(4)),
            (k("attention.layer_norm_rms_epsilon"), GgufValue::F32(1e-5)),
            (k("ssm.conv_kernel"), u(3)),
            (k("ssm.state_size"), u(2)),
            (k("ssm.group_count"), u(1)),
            (k("ssm.inner_size"), u(8)),
            (k("ssm.time_step_rank"), u(2)),
            (k("expert_count"), u(2)),
            (k("expert_used_count"), u(1)),
            (k("expert_shared_feed_forward_length"), u(4)),
        ];
        let mut tensors = Vec::new();
        let mut add = |name: &str, dims: &[u64]| {
            let n: u64 = dims.iter().product();
            tensors.push(RawTensor {
                name: name.into(),
                ty: GgmlType::F32,
                dims: dims.to_vec(),
                data: TensorBytes::from_vec(vec![0; n as usize * 4]),
            });
        };
        add("token_embd.weight", &[8, 5]);
        add("output_norm.weight", &[8]);
        for i in 0..3 {
            add(&format!("blk.{i}.attn_norm.weight"), &[8]);
        }
        // in_proj rows: 2·8 + 2·1·2 + 2 = 22; conv channels 8 + 4 = 12.
        for (n, d) in [
            ("ssm_in.weight", &[8u64, 22][..]),
            ("ssm_conv1d.weight", &[3, 12]),
            ("ssm_conv1d.bias", &[12]),
            ("ssm_dt.bias", &[2]),
            ("ssm_a", &[1, 2]),
            ("ssm_d", &[1, 2]),
            ("ssm_norm.weight", &[8, 1]),
            ("ssm_out.weight", &[8, 8]),
        ] {
            add(&format!("blk.0.{n}"), d);
        }
        for (n, d) in [
            ("attn_q.weight", &[8u64, 8][..]),
            ("attn_k.weight", &[8, 4]),
            ("attn_v.weight", &[8, 4]),
            ("attn_output.weight", &[8, 8]),
        ] {
            add(&format!("blk.1.{n}"), d);
        }
        for (n, d) in [
            ("ffn_gate_inp.weight", &[8u64, 2][..]),
            ("exp_probs_b.bias", &[2]),
            ("ffn_up_exps.weight", &[8, 4, 2]),
            ("ffn_down_exps.weight", &[4, 8, 2]),
            ("ffn_up_shexp.weight", &[8, 4]),
            ("ffn_down_shexp.weight", &[4, 8]),
        ] {
            add(&format!("blk.2.{n}"), d);
        }
        ModelFile::new(Path::new("tiny"), "gguf", meta, tensors).expect("file")
    }

    #[test]
    fn layer_kinds_come_from_the_per_layer_arrays() {
        for def in [&NEMOTRON_H, &NEMOTRON_H_MOE] {
            let f = tiny(def.name, GgufValue::i32_array(&[0, 1, 0]));
            let m = (def.build)(&f).expect("build");
            let l = &m.config.layers;
            assert!(matches!(l[0].mixer, Some(Mixer::Mamba2(_))) && l[0].ffn.is_none());
            let a = l[1].attention().expect("attention");
            assert!(a.rope.is_none() && a.n_kv_heads == 1 && a.head_dim == 4);
            assert!(l[2].mixer.is_none());
            match &l[2].ffn {
                Some(FfnSpec::Moe(ms)) => {
                    assert_eq!(
                        (ms.d_ff, ms.shared_d_ff, ms.act),
                        (4, Some(4), Activation::Relu2)
                    )
                }
                other => panic!("expected a MoE, got {other:?}"),
            }
            assert!(m.weights.layers[2].ffn_norm.is_some());
        }
    }

    #[test]
    fn bad_layer_arrays_are_errors() {
        let f = tiny("nemotron_h", GgufValue::i32_array(&[0, 1]));
        assert!((NEMOTRON_H.build)(&f).is_err());
        let f = tiny("nemotron_h", GgufValue::i32_array(&[0, -1, 0]));
        assert!((NEMOTRON_H.build)(&f).is_err());
        // kv heads that do not divide the heads
        let f = tiny("nemotron_h", GgufValue::i32_array(&[0, 3, 0]));
        assert!((NEMOTRON_H.build)(&f).is_err());
    }
}
