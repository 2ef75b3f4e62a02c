//! Architectures: one file per family over the shared builders below.

mod gemma3;
mod llama;

use crate::config::{Activation, AttnSpec, LayerSpec, RopeSpec, RopeStyle};
use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::weights::{AttnWeights, FfnWeights, Layer};
use crate::Model;

/// The GGUF architecture strings caldera runs.
pub const SUPPORTED: &[&str] = &["llama", "qwen3", "gemma3"];

pub fn build(file: &ModelFile) -> Result<Model> {
    let arch = file
        .architecture()
        .ok_or_else(|| ModelError::MissingKey("general.architecture".into()))?
        .to_owned();
    match arch.as_str() {
        "llama" => llama::build(file, llama::Variant::Llama),
        "qwen3" => llama::build(file, llama::Variant::Qwen3),
        "gemma3" => gemma3::build(file),
        other => Err(ModelError::UnsupportedArch(
            other.to_owned(),
            SUPPORTED.join(", "),
        )),
    }
}

/// Hyperparameters every attention transformer stores under `{arch}.*`.
pub(crate) struct Common {
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
    pub fn read(f: &ModelFile, arch: &str) -> Result<Common> {
        let k = |s: &str| format!("{arch}.{s}");
        let n_layers = f.req_usize(&k("block_count"))?;
        let d_model = f.req_usize(&k("embedding_length"))?;
        let d_ff = f.req_usize(&k("feed_forward_length"))?;
        let n_heads = f.req_usize(&k("attention.head_count"))?;
        let n_kv_heads = f
            .get_u64(&k("attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(ModelError::Invalid(format!(
                "{n_heads} attention heads cannot be grouped over {n_kv_heads} kv heads"
            )));
        }
        let head_dim = match f.get_u64(&k("attention.key_length")) {
            Some(h) => h as usize,
            None => d_model / n_heads,
        };
        let vdim = f
            .get_u64(&k("attention.value_length"))
            .map(|v| v as usize)
            .unwrap_or(head_dim);
        if vdim != head_dim {
            return Err(ModelError::Invalid(format!(
                "key length {head_dim} != value length {vdim} is not supported"
            )));
        }
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
                "none" => {}
                "linear" => {
                    rope_linear_scale = f.get_f32(&k("rope.scaling.factor")).unwrap_or(1.0);
                }
                other => {
                    return Err(ModelError::Invalid(format!(
                        "rope scaling '{other}' is not supported yet"
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
        })
    }

    pub fn layer_spec(
        &self,
        rope: RopeSpec,
        window: Option<usize>,
        qk_norm: bool,
        act: Activation,
        scale: f32,
    ) -> LayerSpec {
        LayerSpec {
            attn: AttnSpec {
                n_heads: self.n_heads,
                n_kv_heads: self.n_kv_heads,
                head_dim: self.head_dim,
                rope: Some(rope),
                window,
                scale,
                qk_norm,
            },
            ffn_act: act,
            d_ff: self.d_ff,
        }
    }
}

/// Binds the tensors of one standard attention + gated-MLP layer.
pub(crate) fn bind_layer(
    f: &ModelFile,
    i: usize,
    spec: &LayerSpec,
    d_model: usize,
    sandwich: bool,
) -> Result<Layer> {
    let a = &spec.attn;
    let p = |s: &str| format!("blk.{i}.{s}");
    let q_out = a.n_heads * a.head_dim;
    let kv_out = a.n_kv_heads * a.head_dim;
    let (q_norm, k_norm) = if a.qk_norm {
        (
            Some(f.vector(&p("attn_q_norm.weight"), a.head_dim)?),
            Some(f.vector(&p("attn_k_norm.weight"), a.head_dim)?),
        )
    } else {
        (None, None)
    };
    let attn = AttnWeights {
        norm: f.vector(&p("attn_norm.weight"), d_model)?,
        q: f.weight(&p("attn_q.weight"), q_out, d_model)?,
        k: f.weight(&p("attn_k.weight"), kv_out, d_model)?,
        v: f.weight(&p("attn_v.weight"), kv_out, d_model)?,
        o: f.weight(&p("attn_output.weight"), d_model, q_out)?,
        q_norm,
        k_norm,
        post_norm: if sandwich {
            Some(f.vector(&p("post_attention_norm.weight"), d_model)?)
        } else {
            None
        },
    };
    let ffn = FfnWeights {
        norm: f.vector(&p("ffn_norm.weight"), d_model)?,
        gate: f.weight(&p("ffn_gate.weight"), spec.d_ff, d_model)?,
        up: f.weight(&p("ffn_up.weight"), spec.d_ff, d_model)?,
        down: f.weight(&p("ffn_down.weight"), d_model, spec.d_ff)?,
        post_norm: if sandwich {
            Some(f.vector(&p("post_ffw_norm.weight"), d_model)?)
        } else {
            None
        },
    };
    Ok(Layer { attn, ffn })
}

/// Embedding, final norm and output head (tied to the embedding when absent).
pub(crate) fn bind_io(
    f: &ModelFile,
    c: &Common,
) -> Result<(crate::Weight, Vec<f32>, crate::Weight)> {
    let tok_embd = f.weight("token_embd.weight", c.vocab_size, c.d_model)?;
    let output_norm = f.vector("output_norm.weight", c.d_model)?;
    let output = if f.tensor("output.weight").is_some() {
        f.weight("output.weight", c.vocab_size, c.d_model)?
    } else {
        tok_embd.clone()
    };
    Ok((tok_embd, output_norm, output))
}
