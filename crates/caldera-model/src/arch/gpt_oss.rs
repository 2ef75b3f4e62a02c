//! `gpt-oss` (HF `gpt_oss`): pre-norm decoder whose attention has biases on q/k/v/o,
//! one learned sink logit per head, YaRN RoPE (NeoX pairs) and alternating sliding-window
//! (even layers by default) and full layers; the FFN is a mixture of experts whose router
//! has a bias, keeps the top-k logits and softmaxes over them, and whose experts (with
//! biases) use the clamped SwiGLU `(clamp(up, ±limit) + 1) · g · σ(1.702 g)`,
//! `g = min(gate, limit)`.
//!
//! GGUF (llama.cpp's `gpt-oss`): keys `gpt-oss.expert_count`, `.expert_used_count`,
//! `.expert_feed_forward_length`, `.attention.sliding_window`, `.rope.scaling.{type,
//! factor, original_context_length, yarn_beta_fast, yarn_beta_slow, yarn_attn_factor}`;
//! tensors `blk.N.attn_{q,k,v,output}.{weight,bias}`, `blk.N.attn_sinks.weight`,
//! `blk.N.attn_norm.weight`, `blk.N.post_attention_norm.weight` (the FFN's pre-norm),
//! `blk.N.ffn_gate_inp.{weight,bias}`, `blk.N.ffn_{gate,up,down}_exps.{weight,bias}`
//! (experts may be MXFP4). Optional keys caldera also reads (llama.cpp ignores them):
//! `.attention.sliding_window_pattern` (bool per layer, from HF `layer_types`),
//! `.rope.scaling.yarn_truncate` (HF `truncate`; default false, as gpt-oss ships) and
//! `.swiglu_clamp_exp` (per-layer limit, from HF `swiglu_limit`; default 7).
//! HF source: transformers `modeling_gpt_oss.py`; YaRN: `modeling_rope_utils.py`.

use caldera_format::gguf::{GgufArray, GgufValue, GgufValueType};
use caldera_format::hf::HfTensor;
use caldera_format::GgmlType;
use serde_json::Value;

use super::{bind_attention, bind_ffn, ArchDef, Common};
use crate::config::{
    Activation, FfnSpec, LayerSpec, Mixer, MoeSpec, RopeSpec, RopeStyle, RouterKind,
};
use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::hf_names::{common_meta, map_common, rope_params, Translation};
use crate::weights::{Layer, MixerWeights};
use crate::Model;

pub static GPT_OSS: ArchDef = ArchDef {
    name: "gpt-oss",
    hf_model_types: &["gpt_oss"],
    build,
    hf_translate: translate,
};

const ARCH: &str = "gpt-oss";
/// The clamped SwiGLU's sigmoid slope (fixed in transformers and llama.cpp).
const SWIGLU_ALPHA: f32 = 1.702;
const DEFAULT_SWIGLU_LIMIT: f32 = 7.0;

/// YaRN RoPE parameters (GGUF `{arch}.rope.scaling.*`, HF `rope_parameters`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Yarn {
    /// Context extension factor `s` (> 0).
    pub factor: f64,
    /// Training context before extension.
    pub orig_ctx: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// Attention factor (multiplier on cos/sin) overriding `0.1 ln s + 1`.
    pub attn_factor: Option<f64>,
    /// Round the correction range outwards to whole dimensions.
    pub truncate: bool,
}

impl Yarn {
    /// Reads `{arch}.rope.scaling.*` (type already known to be yarn). `truncate_default`
    /// applies when the file has no `yarn_truncate` key.
    pub fn read(f: &ModelFile, arch: &str, ctx: usize, truncate_default: bool) -> Result<Yarn> {
        let k = |s: &str| format!("{arch}.rope.scaling.{s}");
        let get = |s: &str| f.get(&k(s)).and_then(|v| v.as_f64());
        let y = Yarn {
            factor: get("factor").ok_or_else(|| ModelError::MissingKey(k("factor")))?,
            orig_ctx: get("original_context_length").unwrap_or(ctx as f64),
            beta_fast: get("yarn_beta_fast").unwrap_or(32.0),
            beta_slow: get("yarn_beta_slow").unwrap_or(1.0),
            attn_factor: get("yarn_attn_factor"),
            truncate: f
                .get(&k("yarn_truncate"))
                .and_then(|v| v.as_bool())
                .unwrap_or(truncate_default),
        };
        let ok = |x: f64| x.is_finite() && x > 0.0;
        if !(ok(y.factor) && ok(y.orig_ctx) && ok(y.beta_fast) && ok(y.beta_slow))
            || y.attn_factor.is_some_and(|a| !a.is_finite())
        {
            return Err(ModelError::Invalid(format!(
                "{arch}: bad YaRN parameters {y:?}"
            )));
        }
        Ok(y)
    }

    /// Per-frequency divisors (length `n_dims / 2`) and the cos/sin multiplier that turn
    /// plain RoPE (`theta^(-2i/n_dims)`) into YaRN: frequency `i` is
    /// `interp·(1-e_i) + extrap·e_i` with `interp = extrap / s` and `e_i = 1 - ramp(i)`,
    /// `ramp` rising linearly from 0 to 1 over the correction range of dimensions whose
    /// wavelengths turn `beta_fast` .. `beta_slow` times over the original context.
    pub fn factors(&self, n_dims: usize, theta: f64) -> (Vec<f32>, f32) {
        let d = n_dims as f64;
        let corr = |rot: f64| {
            d * (self.orig_ctx / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
        };
        let (mut lo, mut hi) = (corr(self.beta_fast), corr(self.beta_slow));
        if self.truncate {
            lo = lo.floor();
            hi = hi.ceil();
        }
        let lo = lo.max(0.0);
        let mut hi = hi.min(d - 1.0);
        if lo == hi {
            hi += 0.001;
        }
        let ff = (0..n_dims / 2)
            .map(|i| {
                let ramp = ((i as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
                let e = 1.0 - ramp;
                (1.0 / ((1.0 - e) / self.factor + e)) as f32
            })
            .collect();
        let mscale = self.attn_factor.unwrap_or(if self.factor <= 1.0 {
            1.0
        } else {
            0.1 * self.factor.ln() + 1.0
        });
        (ff, mscale as f32)
    }
}

/// [`Common::read`] that also accepts YaRN scaling (returned separately; the common
/// `rope_linear_scale` is then 1).
pub(super) fn read_common(
    f: &ModelFile,
    arch: &'static str,
    truncate_default: bool,
) -> Result<(Common, Option<Yarn>)> {
    let key = format!("{arch}.rope.scaling.type");
    let is_yarn = f.get(&key).and_then(|v| v.as_str()) == Some("yarn");
    if !is_yarn {
        return Ok((Common::read(f, arch)?, None));
    }
    // Read everything else through the shared reader, with the scaling type hidden
    // (it reads only `{arch}.*` keys and the embedding's shape).
    let prefix = format!("{arch}.");
    let meta: Vec<(String, GgufValue)> = f
        .metadata()
        .into_iter()
        .filter(|(k, _)| k.starts_with(&prefix) && *k != key)
        .map(|(k, v)| (k.to_owned(), v.clone()))
        .collect();
    let embd = f
        .tensor("token_embd.weight")
        .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
    let view = ModelFile::new(&f.path, "view", meta, vec![embd.clone()])?;
    let c = Common::read(&view, arch)?;
    let y = Yarn::read(f, arch, c.context_length, truncate_default)?;
    Ok((c, Some(y)))
}

/// RoPE with optional YaRN on top of [`Common::rope`].
pub(super) fn rope_with_yarn(
    c: &Common,
    f: &ModelFile,
    yarn: Option<&Yarn>,
    style: RopeStyle,
) -> Result<RopeSpec> {
    let mut rope = c.rope(f, style, c.rope_theta)?;
    if let Some(y) = yarn {
        let (ff, mscale) = y.factors(c.rope_dims, c.rope_theta as f64);
        rope.freq_factors = Some(match rope.freq_factors.take() {
            Some(file_ff) => file_ff.iter().zip(&ff).map(|(a, b)| a * b).collect(),
            None => ff,
        });
        rope.mscale = mscale;
    }
    Ok(rope)
}

/// Expert counts of a MoE architecture: (n_experts, n_used, expert d_ff).
pub(super) fn expert_counts(f: &ModelFile, arch: &str) -> Result<(usize, usize, usize)> {
    let k = |s: &str| format!("{arch}.{s}");
    let n = f.req_usize(&k("expert_count"))?;
    let used = f.req_usize(&k("expert_used_count"))?;
    let ff = f.req_usize(&k("expert_feed_forward_length"))?;
    if n == 0 || used == 0 || used > n || ff == 0 {
        return Err(ModelError::Invalid(format!(
            "{arch}: {used} of {n} experts of size {ff}"
        )));
    }
    Ok((n, used, ff))
}

fn build(f: &ModelFile) -> Result<Model> {
    let (c, yarn) = read_common(f, ARCH, false)?;
    let (n_experts, n_used, exp_ff) = expert_counts(f, ARCH)?;
    let window = match f.get_u64(&format!("{ARCH}.attention.sliding_window")) {
        Some(0) | None => None,
        Some(w) => Some(usize::try_from(w).map_err(|_| ModelError::BadKey {
            key: format!("{ARCH}.attention.sliding_window"),
            msg: format!("{w} is too large"),
        })?),
    };
    let sliding = sliding_layers(f, c.n_layers)?;
    let limits = swiglu_limits(f, c.n_layers)?;
    let rope = rope_with_yarn(&c, f, yarn.as_ref(), RopeStyle::Neox)?;
    let specs: Vec<LayerSpec> = (0..c.n_layers)
        .map(|i| {
            let mut attn = c.attn(Some(rope.clone()), false);
            attn.sinks = true;
            attn.window = if sliding[i] { window } else { None };
            LayerSpec {
                mixer: Some(Mixer::Attention(attn)),
                ffn: Some(FfnSpec::Moe(MoeSpec {
                    n_experts,
                    n_used,
                    d_ff: exp_ff,
                    act: Activation::ClampedSwiGlu {
                        alpha: SWIGLU_ALPHA,
                        limit: limits[i],
                    },
                    router: RouterKind::TopKSoftmax,
                    weights_scale: 1.0,
                    shared_d_ff: None,
                })),
            }
        })
        .collect();
    let mut layers = Vec::with_capacity(c.n_layers);
    for (i, s) in specs.iter().enumerate() {
        let p = |n: &str| format!("blk.{i}.{n}");
        let (Some(Mixer::Attention(a)), Some(ffn)) = (&s.mixer, &s.ffn) else {
            unreachable!("every gpt-oss layer has attention and an FFN")
        };
        layers.push(Layer {
            norm: Some(f.vector(&p("attn_norm.weight"), c.d_model)?),
            mixer: Some(MixerWeights::Attention(bind_attention(f, i, a, c.d_model)?)),
            post_norm: None,
            ffn_norm: Some(f.vector(&p("post_attention_norm.weight"), c.d_model)?),
            ffn: Some(bind_ffn(f, i, ffn, c.d_model)?),
            ffn_post_norm: None,
        });
    }
    c.assemble(f, specs, layers)
}

/// Which layers use the sliding window: `attention.sliding_window_pattern` as a bool per
/// layer, or as a period n (layer i slides when `i % n < n - 1`); llama.cpp's gpt-oss
/// default is period 2 (even layers slide).
fn sliding_layers(f: &ModelFile, n_layers: usize) -> Result<Vec<bool>> {
    let key = format!("{ARCH}.attention.sliding_window_pattern");
    let bad = |msg: String| ModelError::BadKey {
        key: key.clone(),
        msg,
    };
    let period = |n: u64| -> Vec<bool> {
        (0..n_layers as u64)
            .map(|i| n == 0 || i % n < n - 1)
            .collect()
    };
    match f.get(&key) {
        None => Ok(period(2)),
        Some(v) => {
            if let Some(n) = v.as_u64() {
                return Ok(period(n));
            }
            let items = v
                .as_array()
                .ok_or_else(|| bad("expected an integer or an array of bools".into()))?;
            if items.len() != n_layers {
                return Err(bad(format!(
                    "{} entries for {n_layers} layers",
                    items.len()
                )));
            }
            items
                .items
                .iter()
                .map(|b| b.as_bool().ok_or_else(|| bad("expected bools".into())))
                .collect()
        }
    }
}

/// The clamped SwiGLU limit per layer (`swiglu_clamp_exp`, default 7).
fn swiglu_limits(f: &ModelFile, n_layers: usize) -> Result<Vec<f32>> {
    let key = format!("{ARCH}.swiglu_clamp_exp");
    match f.get(&key) {
        None => Ok(vec![DEFAULT_SWIGLU_LIMIT; n_layers]),
        Some(v) => {
            let vals = match v.as_f32() {
                Some(x) => vec![x; n_layers],
                None => v.as_f32_array().unwrap_or_default(),
            };
            if vals.len() != n_layers || vals.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
                return Err(ModelError::BadKey {
                    key,
                    msg: format!("expected {n_layers} positive limits"),
                });
            }
            Ok(vals)
        }
    }
}

/// Writes the YaRN keys of `rope_parameters` the way llama.cpp's converter does (plus
/// `yarn_truncate`); errors on other scaling types than none / yarn.
pub(super) fn translate_rope_scaling(t: &mut Translation) -> Result<()> {
    let (_, ty, params) = rope_params(t.text_cfg(), None);
    match ty.as_str() {
        "default" | "none" => Ok(()),
        "yarn" => {
            let p = params.cloned().unwrap_or(Value::Null);
            let num = |k: &str| p.get(k).and_then(Value::as_f64);
            let factor = num("factor")
                .ok_or_else(|| ModelError::MissingKey("config.json: rope factor".into()))?;
            t.set_f32("rope.scaling.factor", factor);
            let orig = p
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .or_else(|| t.u64("max_position_embeddings"))
                .unwrap_or(4096);
            t.set_u32("rope.scaling.original_context_length", orig);
            if let Some(a) = num("attention_factor") {
                t.set_f32("rope.scaling.yarn_attn_factor", a);
            }
            if let Some(b) = num("beta_fast") {
                t.set_f32("rope.scaling.yarn_beta_fast", b);
            }
            if let Some(b) = num("beta_slow") {
                t.set_f32("rope.scaling.yarn_beta_slow", b);
            }
            // transformers' default is to truncate.
            let truncate = p.get("truncate").and_then(Value::as_bool).unwrap_or(true);
            t.set("rope.scaling.yarn_truncate", GgufValue::Bool(truncate));
            Ok(())
        }
        other => Err(ModelError::Invalid(format!(
            "rope_type '{other}' is not supported for {} yet",
            t.arch
        ))),
    }
}

fn translate(t: &mut Translation) -> Result<()> {
    common_meta(t)?;
    translate_rope_scaling(t)?;
    let n_layers = t.req_u64("num_hidden_layers")?;
    let n_exp = t
        .u64("num_local_experts")
        .or_else(|| t.u64("num_experts"))
        .ok_or_else(|| ModelError::MissingKey("config.json: num_local_experts".into()))?;
    let ff = t.req_u64("intermediate_size")?;
    t.set_u32("expert_count", n_exp);
    t.set_u32("expert_used_count", t.req_u64("num_experts_per_tok")?);
    t.set_u32("expert_feed_forward_length", ff);
    if let Some(w) = t.u64("sliding_window") {
        t.set_u32("attention.sliding_window", w);
    }
    let layer_types: Option<Vec<bool>> = t
        .text_cfg()
        .get("layer_types")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|v| v.as_str() == Some("sliding_attention"))
                .collect()
        });
    if let Some(lt) = layer_types {
        if lt.len() as u64 != n_layers {
            return Err(ModelError::Invalid(format!(
                "config.json: {} layer_types for {n_layers} layers",
                lt.len()
            )));
        }
        let items = lt.into_iter().map(GgufValue::Bool).collect();
        t.set(
            "attention.sliding_window_pattern",
            GgufValue::Array(GgufArray::new(GgufValueType::Bool, items)),
        );
    }
    if let Some(limit) = t.f64("swiglu_limit") {
        let items = (0..n_layers)
            .map(|_| GgufValue::F32(limit as f32))
            .collect();
        t.set(
            "swiglu_clamp_exp",
            GgufValue::Array(GgufArray::new(GgufValueType::F32, items)),
        );
    }
    let rest = map_common(t, false);
    // llama.cpp names gpt-oss's post-attention norm (the MoE pre-norm) attn_post_norm.
    for rt in t.tensors.iter_mut() {
        if let Some(stem) = rt.name.strip_suffix(".ffn_norm.weight") {
            rt.name = format!("{stem}.post_attention_norm.weight");
        }
    }
    for ht in rest {
        let Some((layer, tail)) = layer_tail(&ht.name) else {
            continue;
        };
        let p = |s: &str| format!("blk.{layer}.{s}");
        match tail {
            "self_attn.sinks" => t.push(p("attn_sinks.weight"), ht),
            "mlp.router.weight" => t.push(p("ffn_gate_inp.weight"), ht),
            "mlp.router.bias" => t.push(p("ffn_gate_inp.bias"), ht),
            "mlp.experts.gate_up_proj" => {
                // [n, d, 2ff] (in, out), gate/up interleaved along out.
                let [n, d, ff2] = shape3(ht)?;
                let ff = ff2 / 2;
                for (name, start) in [("ffn_gate_exps.weight", 0), ("ffn_up_exps.weight", 1)] {
                    let bytes = gather(ht, n, ff, d, |e, r, c| (e * d + c) * ff2 + 2 * r + start)?;
                    t.push_bytes(p(name), ht.ty, vec![d as u64, ff as u64, n as u64], bytes);
                }
            }
            "mlp.experts.gate_up_proj_bias" => {
                let [n, ff2] = shape2(ht)?;
                let ff = ff2 / 2;
                for (name, start) in [("ffn_gate_exps.bias", 0), ("ffn_up_exps.bias", 1)] {
                    let bytes = gather(ht, n, ff, 1, |e, r, _| e * ff2 + 2 * r + start)?;
                    t.push_bytes(p(name), ht.ty, vec![ff as u64, n as u64], bytes);
                }
            }
            "mlp.experts.down_proj" => {
                // [n, ff, d] (in, out) → per expert [d rows, ff cols].
                let [n, ff, d] = shape3(ht)?;
                let bytes = gather(ht, n, d, ff, |e, r, c| (e * ff + c) * d + r)?;
                t.push_bytes(
                    p("ffn_down_exps.weight"),
                    ht.ty,
                    vec![ff as u64, d as u64, n as u64],
                    bytes,
                );
            }
            "mlp.experts.down_proj_bias" => t.push(p("ffn_down_exps.bias"), ht),
            _ => {}
        }
    }
    Ok(())
}

/// `model.layers.{i}.{tail}` → (i, tail).
pub(super) fn layer_tail(name: &str) -> Option<(usize, &str)> {
    let rest = name
        .strip_prefix("model.layers.")
        .or_else(|| name.strip_prefix("model.language_model.layers."))?;
    let (idx, tail) = rest.split_once('.')?;
    Some((idx.parse().ok()?, tail))
}

fn elem_size(ht: &HfTensor) -> Result<usize> {
    match ht.ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => Ok(ht.ty.type_size()),
        other => Err(ModelError::BadTensor {
            name: ht.name.clone(),
            msg: format!("type {other} cannot be rearranged (expected F32, F16 or BF16)"),
        }),
    }
}

fn shape3(ht: &HfTensor) -> Result<[usize; 3]> {
    match ht.shape.as_slice() {
        &[a, b, c] if c % 2 == 0 || !ht.name.ends_with("gate_up_proj") => Ok([a, b, c]),
        s => Err(ModelError::BadTensor {
            name: ht.name.clone(),
            msg: format!("unexpected shape {s:?}"),
        }),
    }
}

fn shape2(ht: &HfTensor) -> Result<[usize; 2]> {
    match ht.shape.as_slice() {
        &[a, b] if b % 2 == 0 => Ok([a, b]),
        s => Err(ModelError::BadTensor {
            name: ht.name.clone(),
            msg: format!("unexpected shape {s:?}"),
        }),
    }
}

/// A new row-major `[n][rows][cols]` tensor whose element (e, r, c) is the source's
/// element at flat index `src(e, r, c)`.
fn gather(
    ht: &HfTensor,
    n: usize,
    rows: usize,
    cols: usize,
    src: impl Fn(usize, usize, usize) -> usize,
) -> Result<Vec<u8>> {
    let es = elem_size(ht)?;
    let data = ht.data.as_slice();
    let total = n
        .checked_mul(rows)
        .and_then(|x| x.checked_mul(cols))
        .ok_or_else(|| ModelError::Invalid(format!("{}: size overflows", ht.name)))?;
    let mut out = Vec::with_capacity(total * es);
    for e in 0..n {
        for r in 0..rows {
            for c in 0..cols {
                let i = src(e, r, c) * es;
                let b = data.get(i..i + es).ok_or_else(|| ModelError::BadTensor {
                    name: ht.name.clone(),
                    msg: "index out of range".into(),
                })?;
                out.extend_from_slice(b);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yarn_matches_transformers_formula() {
        // gpt-oss fixture: head_dim 32, theta 150000, factor 32, original ctx 4096.
        let y = Yarn {
            factor: 32.0,
            orig_ctx: 4096.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attn_factor: None,
            truncate: false,
        };
        let (ff, m) = y.factors(32, 150000.0);
        assert_eq!(ff.len(), 16);
        // High frequencies extrapolate (factor 1), low ones interpolate (factor s).
        assert!((ff[0] - 1.0).abs() < 1e-6 && (ff[4] - 1.0).abs() < 1e-6);
        assert!((ff[15] - 32.0).abs() < 1e-4 && (ff[9] - 32.0).abs() < 1e-4);
        assert!(ff[5] > 1.0 && ff[8] < 32.0);
        assert!((m - (0.1 * 32f32.ln() + 1.0)).abs() < 1e-6);
        // Truncation rounds the range outwards: [4, 9] → dimension 4 still extrapolates.
        let (ft, _) = Yarn {
            truncate: true,
            ..y
        }
        .factors(32, 150000.0);
        assert!((ft[4] - 1.0).abs() < 1e-6 && (ft[9] - 32.0).abs() < 1e-4);
    }
}
