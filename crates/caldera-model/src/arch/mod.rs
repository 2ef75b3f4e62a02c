//! Architectures: one file per family, each exporting an [`ArchDef`] listed in
//! [`ARCHS`], over the shared builders below.

mod gemma3;
mod gemma4;
mod gpt_oss;
mod lfm2;
mod lfm2moe;
mod llama;
mod nemotron_h;
mod qwen35;
mod qwen35moe;
mod qwen3_moe;
mod qwen3next;

use crate::config::{Activation, AttnSpec, FfnSpec, LayerSpec, Mixer, RopeSpec, RopeStyle};
use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::hf_names::Translation;
use crate::weights::{AttnWeights, DenseFfn, FfnWeights, Layer, MixerWeights, MoeWeights, Weight};
use crate::Model;

/// One architecture: its GGUF name, the HF `model_type`s it reads, how to build it from
/// a [`ModelFile`] and how to translate an HF folder into GGUF conventions.
pub struct ArchDef {
    pub name: &'static str,
    pub hf_model_types: &'static [&'static str],
    pub build: fn(&ModelFile) -> Result<Model>,
    pub hf_translate: fn(&mut Translation) -> Result<()>,
}

/// Every architecture caldera runs. Adding one: a file in this folder and a line here.
pub const ARCHS: &[&ArchDef] = &[
    &llama::LLAMA,
    &llama::QWEN3,
    &gemma3::GEMMA3,
    &qwen3_moe::QWEN3_MOE,
    &gpt_oss::GPT_OSS,
    &qwen35::QWEN35,
    &qwen35moe::QWEN35MOE,
    &qwen3next::QWEN3NEXT,
    &nemotron_h::NEMOTRON_H,
    &nemotron_h::NEMOTRON_H_MOE,
    &lfm2::LFM2,
    &lfm2moe::LFM2MOE,
    &gemma4::GEMMA4,
];

pub fn build(file: &ModelFile) -> Result<Model> {
    let arch = file
        .architecture()
        .ok_or_else(|| ModelError::MissingKey("general.architecture".into()))?;
    let def = ARCHS.iter().find(|d| d.name == arch).ok_or_else(|| {
        let names: Vec<&str> = ARCHS.iter().map(|d| d.name).collect();
        ModelError::UnsupportedArch(arch.to_owned(), names.join(", "))
    })?;
    (def.build)(file)
}

/// Hyperparameters most transformers store under `{arch}.*`.
pub struct Common {
    pub arch: &'static str,
    pub n_layers: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub norm_eps: f32,
    pub rope_theta: f32,
    pub rope_dims: usize,
    pub rope_linear_scale: f32,
    pub context_length: usize,
    pub vocab_size: usize,
}

impl Common {
    pub fn read(f: &ModelFile, arch: &'static str) -> Result<Common> {
        let k = |s: &str| format!("{arch}.{s}");
        let n_layers = f.req_usize(&k("block_count"))?;
        let d_model = f.req_usize(&k("embedding_length"))?;
        let d_ff = f.get_u64(&k("feed_forward_length")).unwrap_or(0) as usize;
        let n_heads = f.get_u64(&k("attention.head_count")).unwrap_or(0) as usize;
        let n_kv_heads = f
            .get_u64(&k("attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(n_heads);
        if n_heads != 0 && (n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads)) {
            return Err(ModelError::Invalid(format!(
                "{n_heads} attention heads cannot be grouped over {n_kv_heads} kv heads"
            )));
        }
        let head_dim = match f.get_u64(&k("attention.key_length")) {
            Some(h) => h as usize,
            None => d_model.checked_div(n_heads).unwrap_or(0),
        };
        let rope_dims = f
            .get_u64(&k("rope.dimension_count"))
            .map(|v| v as usize)
            .unwrap_or(head_dim);
        if rope_dims > head_dim || !rope_dims.is_multiple_of(2) {
            return Err(ModelError::Invalid(format!(
                "rope dimension count {rope_dims} must be even and <= head size {head_dim}"
            )));
        }
        let mut rope_linear_scale = 1.0;
        if let Some(ty) = f.get(&k("rope.scaling.type")).and_then(|v| v.as_str()) {
            match ty {
                "none" | "default" => {}
                "linear" => {
                    rope_linear_scale = f.get_f32(&k("rope.scaling.factor")).unwrap_or(1.0);
                }
                other => {
                    return Err(ModelError::Invalid(format!(
                        "rope scaling '{other}' is not supported for {arch} yet"
                    )))
                }
            }
        }
        let embd = f
            .tensor("token_embd.weight")
            .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        let vocab_size = embd.dims.get(1).copied().unwrap_or(0) as usize;
        let norm_eps = f.req_f32(&k("attention.layer_norm_rms_epsilon"))?;
        if !(norm_eps.is_finite() && norm_eps >= 0.0) {
            return Err(ModelError::Invalid(format!("bad rms epsilon {norm_eps}")));
        }
        Ok(Common {
            arch,
            n_layers,
            d_model,
            d_ff,
            n_heads,
            n_kv_heads,
            head_dim,
            norm_eps,
            rope_theta: f.get_f32(&k("rope.freq_base")).unwrap_or(10000.0),
            rope_dims,
            rope_linear_scale,
            context_length: f
                .get_u64(&k("context_length"))
                .map(|v| v as usize)
                .unwrap_or(4096),
            vocab_size,
        })
    }

    pub fn rope(&self, f: &ModelFile, style: RopeStyle, theta: f32) -> Result<RopeSpec> {
        let freq_factors = f.opt_vector("rope_freqs.weight", self.rope_dims / 2)?;
        Ok(RopeSpec {
            style,
            n_dims: self.rope_dims,
            theta,
            linear_scale: self.rope_linear_scale,
            freq_factors,
            mscale: 1.0,
        })
    }

    /// A plain attention spec from the common keys (no window, no gate, no sinks).
    pub fn attn(&self, rope: Option<RopeSpec>, qk_norm: bool) -> AttnSpec {
        AttnSpec {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            rope,
            window: None,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
            qk_norm,
            q_gate: false,
            sinks: false,
            softcap: None,
        }
    }

    /// The model from its layer specs and bound layers, with the embedding, final norm
    /// and output head bound by [`bind_io`]; no embedding scale or logit soft-cap (an
    /// architecture that has them sets them on the result).
    pub fn assemble(
        &self,
        f: &ModelFile,
        specs: Vec<LayerSpec>,
        layers: Vec<Layer>,
    ) -> Result<Model> {
        let (tok_embd, output_norm, output) = bind_io(f, self.vocab_size, self.d_model)?;
        Ok(Model {
            config: crate::config::ModelConfig {
                arch: self.arch.into(),
                d_model: self.d_model,
                vocab_size: self.vocab_size,
                norm_eps: self.norm_eps,
                context_length: self.context_length,
                embed_scale: None,
                final_logit_softcap: None,
                layers: specs,
            },
            weights: crate::weights::ModelWeights {
                tok_embd,
                layers,
                output_norm,
                output,
            },
            extras: Default::default(),
        })
    }

    pub fn dense(&self, act: Activation) -> FfnSpec {
        FfnSpec::Dense {
            d_ff: self.d_ff,
            act,
        }
    }
}

/// Binds an attention mixer's weights (`blk.{i}.attn_*`).
pub fn bind_attention(
    f: &ModelFile,
    i: usize,
    a: &AttnSpec,
    d_model: usize,
) -> Result<AttnWeights> {
    let p = |s: &str| format!("blk.{i}.{s}");
    let q_out = a.n_heads * a.head_dim * if a.q_gate { 2 } else { 1 };
    let kv_out = a.n_kv_heads * a.head_dim;
    let (q_norm, k_norm) = if a.qk_norm {
        (
            Some(f.vector(&p("attn_q_norm.weight"), a.head_dim)?),
            Some(f.vector(&p("attn_k_norm.weight"), a.head_dim)?),
        )
    } else {
        (None, None)
    };
    Ok(AttnWeights {
        q: f.weight(&p("attn_q.weight"), q_out, d_model)?,
        k: f.weight(&p("attn_k.weight"), kv_out, d_model)?,
        v: f.weight(&p("attn_v.weight"), kv_out, d_model)?,
        o: f.weight(&p("attn_output.weight"), d_model, a.n_heads * a.head_dim)?,
        q_norm,
        k_norm,
        sinks: if a.sinks {
            Some(f.vector(&p("attn_sinks.weight"), a.n_heads)?)
        } else {
            None
        },
    })
}

/// Binds a dense FFN (`blk.{i}.ffn_{gate,up,down}`).
pub fn bind_dense(
    f: &ModelFile,
    i: usize,
    d_ff: usize,
    act: Activation,
    d_model: usize,
) -> Result<DenseFfn> {
    let p = |s: &str| format!("blk.{i}.{s}");
    Ok(DenseFfn {
        gate: if act.gated() {
            Some(f.weight(&p("ffn_gate.weight"), d_ff, d_model)?)
        } else {
            None
        },
        up: f.weight(&p("ffn_up.weight"), d_ff, d_model)?,
        down: f.weight(&p("ffn_down.weight"), d_model, d_ff)?,
    })
}

/// Binds the FFN of a layer spec.
pub fn bind_ffn(f: &ModelFile, i: usize, spec: &FfnSpec, d_model: usize) -> Result<FfnWeights> {
    Ok(match spec {
        FfnSpec::Dense { d_ff, act } => FfnWeights::Dense(bind_dense(f, i, *d_ff, *act, d_model)?),
        FfnSpec::Moe(m) => FfnWeights::Moe(MoeWeights::bind(f, i, m, d_model)?),
    })
}

/// A standard pre-norm layer: attention (`attn_norm`) then FFN (`ffn_norm`); with
/// `sandwich`, also `post_attention_norm` and `post_ffw_norm` (Gemma).
pub fn bind_standard_layer(
    f: &ModelFile,
    i: usize,
    spec: &LayerSpec,
    d_model: usize,
    sandwich: bool,
) -> Result<Layer> {
    let p = |s: &str| format!("blk.{i}.{s}");
    let mixer = match &spec.mixer {
        Some(Mixer::Attention(a)) => {
            Some(MixerWeights::Attention(bind_attention(f, i, a, d_model)?))
        }
        Some(_) => {
            return Err(ModelError::Invalid(
                "bind_standard_layer binds attention mixers only".into(),
            ))
        }
        None => None,
    };
    let ffn = match &spec.ffn {
        Some(s) => Some(bind_ffn(f, i, s, d_model)?),
        None => None,
    };
    let opt = |name: &str, on: bool| -> Result<Option<Vec<f32>>> {
        if on {
            Ok(Some(f.vector(&p(name), d_model)?))
        } else {
            Ok(None)
        }
    };
    Ok(Layer {
        norm: opt("attn_norm.weight", mixer.is_some())?,
        mixer,
        post_norm: opt("post_attention_norm.weight", sandwich)?,
        ffn_norm: opt("ffn_norm.weight", ffn.is_some())?,
        ffn,
        ffn_post_norm: opt("post_ffw_norm.weight", sandwich)?,
    })
}

/// Embedding, final norm and output head (tied to the embedding when absent).
pub fn bind_io(f: &ModelFile, vocab: usize, d_model: usize) -> Result<(Weight, Vec<f32>, Weight)> {
    let tok_embd = f.weight("token_embd.weight", vocab, d_model)?;
    let output_norm = f.vector("output_norm.weight", d_model)?;
    let output = if f.tensor("output.weight").is_some() {
        f.weight("output.weight", vocab, d_model)?
    } else {
        tok_embd.clone()
    };
    Ok((tok_embd, output_norm, output))
}
