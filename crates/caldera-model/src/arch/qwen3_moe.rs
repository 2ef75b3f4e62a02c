//! `qwen3moe` (HF `qwen3_moe`): Qwen3 attention (per-head q/k RMSNorm, NeoX RoPE, optional
//! YaRN) with a mixture-of-experts FFN: softmax over all router logits, top-k, optionally
//! renormalized to sum 1 (`norm_topk_prob`), SwiGLU experts. Layers listed in
//! `mlp_only_layers`, or off the `decoder_sparse_step` grid, have a dense SwiGLU MLP of
//! `intermediate_size` instead; the GGUF tells them apart by the presence of
//! `blk.N.ffn_gate_inp.weight`.
//!
//! GGUF (llama.cpp's `qwen3moe`): keys `qwen3moe.expert_count`, `.expert_used_count`,
//! `.expert_feed_forward_length`, `.expert_weights_norm` (absent: renormalize, as
//! llama.cpp does); tensors `blk.N.ffn_gate_inp.weight` [d, n_exp] and
//! `blk.N.ffn_{gate,up,down}_exps.weight` (experts stacked on the last dim), or
//! `blk.N.ffn_{gate,up,down}.weight` on dense layers.
//! HF source: transformers `modeling_qwen3_moe.py`.

use caldera_format::gguf::GgufValue;

use super::gpt_oss::{
    expert_counts, layer_tail, read_common, rope_with_yarn, translate_rope_scaling,
};
use super::{bind_standard_layer, ArchDef};
use crate::config::{Activation, FfnSpec, LayerSpec, Mixer, MoeSpec, RopeStyle, RouterKind};
use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::hf_names::{common_meta, map_common, stack_experts, Translation};
use crate::Model;

pub static QWEN3_MOE: ArchDef = ArchDef {
    name: "qwen3moe",
    hf_model_types: &["qwen3_moe"],
    build,
    hf_translate: translate,
};

const ARCH: &str = "qwen3moe";

fn build(f: &ModelFile) -> Result<Model> {
    // transformers truncates the YaRN correction range by default.
    let (c, yarn) = read_common(f, ARCH, true)?;
    let (n_experts, n_used, exp_ff) = expert_counts(f, ARCH)?;
    let renorm = f
        .get(&format!("{ARCH}.expert_weights_norm"))
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    let rope = rope_with_yarn(&c, f, yarn.as_ref(), RopeStyle::Neox)?;
    let attn = c.attn(Some(rope), true);
    let mut specs = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let ffn = if f.tensor(&format!("blk.{i}.ffn_gate_inp.weight")).is_some() {
            FfnSpec::Moe(MoeSpec {
                n_experts,
                n_used,
                d_ff: exp_ff,
                act: Activation::SwiGlu,
                router: RouterKind::Softmax { renorm },
                weights_scale: 1.0,
                shared_d_ff: None,
            })
        } else {
            if c.d_ff == 0 {
                return Err(ModelError::MissingKey(format!(
                    "{ARCH}.feed_forward_length (layer {i} is dense)"
                )));
            }
            c.dense(Activation::SwiGlu)
        };
        specs.push(LayerSpec {
            mixer: Some(Mixer::Attention(attn.clone())),
            ffn: Some(ffn),
        });
    }
    let layers = specs
        .iter()
        .enumerate()
        .map(|(i, s)| bind_standard_layer(f, i, s, c.d_model, false))
        .collect::<Result<Vec<_>>>()?;
    c.assemble(f, specs, layers)
}

fn translate(t: &mut Translation) -> Result<()> {
    common_meta(t)?;
    translate_rope_scaling(t)?;
    let n_layers = t.req_u64("num_hidden_layers")? as usize;
    let n_exp = t
        .u64("num_experts")
        .or_else(|| t.u64("num_local_experts"))
        .ok_or_else(|| ModelError::MissingKey("config.json: num_experts".into()))?;
    t.set_u32("expert_count", n_exp);
    t.set_u32("expert_used_count", t.req_u64("num_experts_per_tok")?);
    t.set_u32(
        "expert_feed_forward_length",
        t.req_u64("moe_intermediate_size")?,
    );
    let norm = t.bool("norm_topk_prob").unwrap_or(false);
    t.set("expert_weights_norm", GgufValue::Bool(norm));
    let rest = map_common(t, false);
    let mut per_expert = vec![false; n_layers];
    for ht in rest {
        let Some((layer, tail)) = layer_tail(&ht.name) else {
            continue;
        };
        if layer >= n_layers {
            return Err(ModelError::Invalid(format!(
                "{}: layer {layer} of {n_layers}",
                ht.name
            )));
        }
        let p = |s: &str| format!("blk.{layer}.{s}");
        match tail {
            "mlp.gate.weight" => t.push(p("ffn_gate_inp.weight"), ht),
            // transformers 5 fused experts: gate_up [n, 2ff, d] (gate rows first), down
            // [n, d, ff]; both [out, in] per expert.
            "mlp.experts.gate_up_proj" => split_gate_up(t, ht, layer)?,
            "mlp.experts.down_proj" => t.push(p("ffn_down_exps.weight"), ht),
            _ if tail.starts_with("mlp.experts.") => per_expert[layer] = true,
            _ => {}
        }
    }
    for (layer, _) in per_expert.iter().enumerate().filter(|x| *x.1) {
        let prefix = format!("model.layers.{layer}.mlp.experts");
        let prefix = if t
            .hf
            .tensor(&format!("{prefix}.0.gate_proj.weight"))
            .is_some()
        {
            prefix
        } else {
            format!("model.language_model.layers.{layer}.mlp.experts")
        };
        for w in ["gate", "up", "down"] {
            stack_experts(
                t,
                &prefix,
                &format!("{w}_proj.weight"),
                n_exp as usize,
                format!("blk.{layer}.ffn_{w}_exps.weight"),
            )?;
        }
    }
    Ok(())
}

/// Splits a fused `[n, 2ff, d]` gate/up expert tensor (gate rows first in each expert)
/// into `ffn_gate_exps` and `ffn_up_exps` (GGUF dims `[d, ff, n]`).
fn split_gate_up(
    t: &mut Translation,
    ht: &caldera_format::hf::HfTensor,
    layer: usize,
) -> Result<()> {
    let bad = |msg: String| ModelError::BadTensor {
        name: ht.name.clone(),
        msg,
    };
    let &[n, ff2, d] = ht.shape.as_slice() else {
        return Err(bad(format!("unexpected shape {:?}", ht.shape)));
    };
    if ff2 % 2 != 0 || n == 0 {
        return Err(bad(format!("unexpected shape {:?}", ht.shape)));
    }
    let ff = ff2 / 2;
    let row = ht
        .ty
        .row_bytes(d as u64)
        .ok_or_else(|| bad(format!("{d} columns are not whole {} blocks", ht.ty)))?
        as usize;
    let data = ht.data.as_slice();
    if data.len() != row * ff2 * n {
        return Err(bad("byte size does not match the shape".into()));
    }
    let half = row * ff;
    let (mut gate, mut up) = (Vec::with_capacity(half * n), Vec::with_capacity(half * n));
    for e in data.chunks_exact(2 * half) {
        gate.extend_from_slice(&e[..half]);
        up.extend_from_slice(&e[half..]);
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
