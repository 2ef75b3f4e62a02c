//! `qwen3next` (HF `qwen3_next`), and the hybrid layout it shares with `qwen35` and
//! `qwen35moe`: GatedDeltaNet layers with every `full_attention_interval`-th layer a gated
//! full attention (q carries a per-head sigmoid gate; q/k RMSNorm; partial NeoX RoPE),
//! each followed by an MoE (softmax top-k, renormalized, shared expert with a sigmoid gate)
//! or a dense SwiGLU MLP. Layer: `x += mixer(attn_norm(x)); x += ffn(post_attention_norm(x))`.
//!
//! GGUF conventions (llama.cpp's converter): zero-centred RMSNorm weights are stored as
//! `1 + w` (all but the GatedDeltaNet's own `ssm_norm`); `ssm_a = -exp(A_log)`;
//! `dt_bias` → `ssm_dt.bias`; the conv weight squeezed to `[kernel, conv_dim]`; Qwen3-Next's
//! head-grouped `in_proj_qkvz` split into `attn_qkv` (all q, all k, all v) and `attn_gate`
//! (z); its `in_proj_ba` kept fused as `ssm_ba`. Qwen3.5 additionally reorders the value
//! heads from grouped to tiled order (see [`GdnHeadOrder`]).
//! HF sources: transformers `modeling_qwen3_next.py`, `modeling_qwen3_5*.py`.

use caldera_format::gguf::{GgufArray, GgufValue, GgufValueType};
use caldera_format::hf::HfTensor;
use serde_json::Value;

use super::{bind_attention, bind_ffn, ArchDef, Common};
use crate::blocks::gdn::{GdnHeadOrder, GdnSpec, GdnWeights};
use crate::config::{Activation, FfnSpec, LayerSpec, Mixer, MoeSpec, RopeStyle, RouterKind};
use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::hf_names::{add_to_tensors, common_meta, map_common, rope_params, to_f32, Translation};
use crate::weights::{Layer, MixerWeights};
use crate::Model;

pub static QWEN3NEXT: ArchDef = ArchDef {
    name: "qwen3next",
    hf_model_types: &["qwen3_next"],
    build,
    hf_translate: translate,
};

fn build(f: &ModelFile) -> Result<Model> {
    build_hybrid(f, "qwen3next", GdnHeadOrder::Grouped)
}

fn translate(t: &mut Translation) -> Result<()> {
    translate_hybrid(t, false)
}

/// Builds a Qwen3-Next / Qwen3.5 hybrid from GGUF conventions under `{arch}.*`.
pub(super) fn build_hybrid(
    f: &ModelFile,
    arch: &'static str,
    order: GdnHeadOrder,
) -> Result<Model> {
    let c = Common::read(f, arch)?;
    if c.n_heads == 0 || c.head_dim == 0 {
        return Err(ModelError::Invalid(format!(
            "{arch}: attention head count and size must be non-zero"
        )));
    }
    let rope = c.rope(f, RopeStyle::Neox, c.rope_theta)?;
    let mut attn = c.attn(Some(rope), true);
    attn.q_gate = true;
    let gdn = GdnSpec::read(f, arch, order)?;
    let interval = f
        .get_u64(&format!("{arch}.full_attention_interval"))
        .unwrap_or(4) as usize;
    if interval == 0 {
        return Err(ModelError::BadKey {
            key: format!("{arch}.full_attention_interval"),
            msg: "must be at least 1".into(),
        });
    }
    let renorm = f
        .get(&format!("{arch}.expert_weights_norm"))
        .and_then(|v| match v {
            GgufValue::Bool(b) => Some(*b),
            _ => None,
        })
        .unwrap_or(true);
    let n_experts = f.get_u64(&format!("{arch}.expert_count")).unwrap_or(0) as usize;
    let n_used = f.get_u64(&format!("{arch}.expert_used_count")).unwrap_or(0) as usize;
    let expert_ff = match f.get_u64(&format!("{arch}.expert_feed_forward_length")) {
        Some(v) => v as usize,
        None => c.d_ff.checked_div(n_used).unwrap_or(0),
    };
    let shared_ff = f
        .get_u64(&format!("{arch}.expert_shared_feed_forward_length"))
        .map(|v| v as usize);

    let mut specs = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let mixer = if (i + 1) % interval == 0 {
            Mixer::Attention(attn.clone())
        } else {
            Mixer::GatedDeltaNet(gdn.clone())
        };
        let ffn = if f.tensor(&format!("blk.{i}.ffn_gate_inp.weight")).is_some() {
            let has_shared = f.tensor(&format!("blk.{i}.ffn_up_shexp.weight")).is_some();
            let shared_d_ff = match (has_shared, shared_ff) {
                (false, _) => None,
                (true, Some(s)) => Some(s),
                (true, None) => Some(expert_ff),
            };
            FfnSpec::Moe(MoeSpec {
                n_experts,
                n_used,
                d_ff: expert_ff,
                act: Activation::SwiGlu,
                router: RouterKind::Softmax { renorm },
                weights_scale: 1.0,
                shared_d_ff,
            })
        } else {
            c.dense(Activation::SwiGlu)
        };
        specs.push(LayerSpec {
            mixer: Some(mixer),
            ffn: Some(ffn),
        });
    }
    let mut layers = Vec::with_capacity(c.n_layers);
    for (i, s) in specs.iter().enumerate() {
        let p = |n: &str| format!("blk.{i}.{n}");
        let mixer = match &s.mixer {
            Some(Mixer::Attention(a)) => {
                MixerWeights::Attention(bind_attention(f, i, a, c.d_model)?)
            }
            Some(Mixer::GatedDeltaNet(g)) => {
                MixerWeights::GatedDeltaNet(GdnWeights::bind(f, i, g, c.d_model)?)
            }
            _ => return Err(ModelError::Invalid("unexpected mixer".into())),
        };
        let ffn = match &s.ffn {
            Some(fs) => bind_ffn(f, i, fs, c.d_model)?,
            None => return Err(ModelError::Invalid("unexpected missing ffn".into())),
        };
        layers.push(Layer {
            norm: Some(f.vector(&p("attn_norm.weight"), c.d_model)?),
            mixer: Some(mixer),
            post_norm: None,
            ffn_norm: Some(f.vector(&p("post_attention_norm.weight"), c.d_model)?),
            ffn: Some(ffn),
            ffn_post_norm: None,
        });
    }
    c.assemble(f, specs, layers)
}

/// GatedDeltaNet sizes from `config.json`.
struct Lin {
    n_k: usize,
    n_v: usize,
    dk: usize,
    dv: usize,
}

impl Lin {
    fn r(&self) -> usize {
        self.n_v / self.n_k
    }

    /// Row permutation that takes value heads (of `width` rows each) from grouped to tiled
    /// order: new head `i·n_k + g` is old head `g·r + i`.
    fn tiled_perm(&self, width: usize) -> Vec<usize> {
        let mut perm = Vec::with_capacity(self.n_v * width);
        for nh in 0..self.n_v {
            let old = (nh % self.n_k) * self.r() + nh / self.n_k;
            perm.extend((0..width).map(|e| old * width + e));
        }
        perm
    }
}

fn cfg_usize(t: &Translation, key: &str) -> Result<usize> {
    let v = t.req_u64(key)?;
    usize::try_from(v)
        .ok()
        .filter(|&v| v > 0 && v < (1 << 32))
        .ok_or_else(|| ModelError::Invalid(format!("config.json: {key} = {v} is out of range")))
}

/// The attention interval: `full_attention_interval`, else read off `layer_types`, which
/// must then follow that pattern.
fn attention_interval(t: &Translation, n_layers: usize) -> Result<u64> {
    let types: Option<Vec<&str>> = t
        .text_cfg()
        .get("layer_types")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect());
    let interval = match t.u64("full_attention_interval") {
        Some(i) => i,
        None => match &types {
            Some(ty) => ty
                .iter()
                .position(|s| *s == "full_attention")
                .map_or(n_layers as u64 + 1, |p| p as u64 + 1),
            None => 4,
        },
    };
    if interval == 0 {
        return Err(ModelError::Invalid(
            "config.json: full_attention_interval is 0".into(),
        ));
    }
    if let Some(ty) = types {
        for (i, s) in ty.iter().enumerate() {
            let full = (i as u64 + 1).is_multiple_of(interval);
            let ok = match *s {
                "full_attention" => full,
                "linear_attention" => !full,
                _ => false,
            };
            if !ok {
                return Err(ModelError::Invalid(format!(
                    "config.json: layer_types[{i}] = '{s}' does not follow a full-attention \
                     layer every {interval} layers"
                )));
            }
        }
    }
    Ok(interval)
}

/// Splits an HF name `model.[language_model.]layers.{i}.{rest}` into (prefix up to and
/// including `layers.{i}`, i, rest).
fn layer_name(name: &str) -> Option<(&str, usize, &str)> {
    for pre in ["model.layers.", "model.language_model.layers."] {
        if let Some(r) = name.strip_prefix(pre) {
            let (idx, rest) = r.split_once('.')?;
            let i: usize = idx.parse().ok()?;
            let plen = pre.len() + idx.len();
            return Some((&name[..plen], i, rest));
        }
    }
    None
}

fn bad_tensor(t: &HfTensor, msg: String) -> ModelError {
    ModelError::BadTensor {
        name: t.name.clone(),
        msg,
    }
}

/// An HF 2-D tensor as (rows, cols, bytes of one row).
fn matrix(t: &HfTensor) -> Result<(usize, usize, usize)> {
    let (rows, cols) = match t.shape.as_slice() {
        [r] => (*r, 1),
        [r, c] => (*r, *c),
        [r, 1, c] => (*r, *c),
        s => return Err(bad_tensor(t, format!("unexpected shape {s:?}"))),
    };
    let rb =
        t.ty.row_bytes(cols as u64)
            .ok_or_else(|| bad_tensor(t, format!("{cols} columns are not whole {} blocks", t.ty)))?
            as usize;
    if rb.checked_mul(rows) != Some(t.data.len()) {
        return Err(bad_tensor(t, "byte size does not match the shape".into()));
    }
    Ok((rows, cols, rb))
}

/// Rows `idx` of `src` (rows of `rb` bytes), in that order.
fn gather_rows(src: &[u8], rb: usize, idx: &[usize]) -> Vec<u8> {
    let mut out = Vec::with_capacity(idx.len() * rb);
    for &r in idx {
        out.extend_from_slice(&src[r * rb..(r + 1) * rb]);
    }
    out
}

/// Pushes rows `idx` of `t` under `name`.
fn push_rows(tr: &mut Translation, name: String, t: &HfTensor, idx: &[usize]) -> Result<()> {
    let (rows, cols, rb) = matrix(t)?;
    if idx.iter().any(|&r| r >= rows) {
        return Err(bad_tensor(
            t,
            format!("fewer rows ({rows}) than the config implies"),
        ));
    }
    let bytes = gather_rows(t.data.as_slice(), rb, idx);
    let dims = if t.shape.len() == 1 {
        vec![idx.len() as u64]
    } else {
        vec![cols as u64, idx.len() as u64]
    };
    tr.push_bytes(name, t.ty, dims, bytes);
    Ok(())
}

/// Pushes `t` with its columns permuted (`new col j = old col perm[j]`); plain float types.
fn push_cols(tr: &mut Translation, name: String, t: &HfTensor, perm: &[usize]) -> Result<()> {
    let (rows, cols, rb) = matrix(t)?;
    if t.ty.block_size() != 1 || perm.len() != cols {
        return Err(bad_tensor(
            t,
            format!("cannot reorder the columns of a {} tensor", t.ty),
        ));
    }
    let es = t.ty.type_size();
    let src = t.data.as_slice();
    let mut out = Vec::with_capacity(src.len());
    for r in 0..rows {
        let row = &src[r * rb..(r + 1) * rb];
        for &c in perm {
            out.extend_from_slice(&row[c * es..(c + 1) * es]);
        }
    }
    tr.push_bytes(name, t.ty, vec![cols as u64, rows as u64], out);
    Ok(())
}

/// Writes the GGUF metadata and tensors of a Qwen3-Next / Qwen3.5 HF folder. `tiled`:
/// reorder value heads to tiled order (Qwen3.5, as llama.cpp's converter does).
pub(super) fn translate_hybrid(t: &mut Translation, tiled: bool) -> Result<()> {
    let (_, rope_type, params) = rope_params(t.text_cfg(), None);
    if rope_type != "default" {
        return Err(ModelError::Invalid(format!(
            "rope_type '{rope_type}' is not supported for {} yet",
            t.arch
        )));
    }
    let mrope = params
        .and_then(|p| p.get("mrope_section"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_i64).collect::<Vec<_>>());
    common_meta(t)?;
    let n_layers = cfg_usize(t, "num_hidden_layers")?;
    let lin = Lin {
        n_k: cfg_usize(t, "linear_num_key_heads")?,
        n_v: cfg_usize(t, "linear_num_value_heads")?,
        dk: cfg_usize(t, "linear_key_head_dim")?,
        dv: cfg_usize(t, "linear_value_head_dim")?,
    };
    if !lin.n_v.is_multiple_of(lin.n_k) {
        return Err(ModelError::Invalid(format!(
            "config.json: {} value heads cannot be grouped over {} key heads",
            lin.n_v, lin.n_k
        )));
    }
    t.set_u32(
        "ssm.conv_kernel",
        cfg_usize(t, "linear_conv_kernel_dim")? as u64,
    );
    t.set_u32("ssm.state_size", lin.dk as u64);
    t.set_u32("ssm.group_count", lin.n_k as u64);
    t.set_u32("ssm.time_step_rank", lin.n_v as u64);
    t.set_u32("ssm.inner_size", (lin.n_v * lin.dv) as u64);
    let interval = attention_interval(t, n_layers)?;
    t.set_u32("full_attention_interval", interval);
    if let Some(n) = t.u64("num_experts") {
        t.set_u32("expert_count", n);
        t.set_u32("expert_used_count", t.req_u64("num_experts_per_tok")?);
    }
    if let Some(n) = t.u64("moe_intermediate_size") {
        t.set_u32("expert_feed_forward_length", n);
    }
    if let Some(n) = t.u64("shared_expert_intermediate_size") {
        t.set_u32("expert_shared_feed_forward_length", n);
    }
    if t.bool("norm_topk_prob") == Some(false) {
        t.set("expert_weights_norm", GgufValue::Bool(false));
    }
    if tiled {
        let mut sec: Vec<i64> = mrope.unwrap_or_else(|| vec![11, 11, 10]);
        sec.resize(4, 0);
        let items = sec
            .iter()
            .map(|&v| GgufValue::I32(v.clamp(0, i32::MAX as i64) as i32))
            .collect();
        t.set(
            "rope.dimension_sections",
            GgufValue::Array(GgufArray::new(GgufValueType::I32, items)),
        );
    }

    let rest = map_common(t, true);
    let key_dim = lin.n_k * lin.dk;
    let value_dim = lin.n_v * lin.dv;
    let conv_dim = 2 * key_dim + value_dim;
    let ident = |n: usize| (0..n).collect::<Vec<usize>>();
    // Row order of value-head-indexed tensors (width = rows per head).
    let vperm = |w: usize| {
        if tiled && lin.n_k != lin.n_v {
            lin.tiled_perm(w)
        } else {
            ident(lin.n_v * w)
        }
    };
    let mut moe_layers: Vec<(String, usize)> = Vec::new();
    for ht in rest {
        let name = ht.name.as_str();
        if name.starts_with("mtp.")
            || name.starts_with("model.mtp.")
            || name.starts_with("model.visual.")
            || name.starts_with("visual.")
        {
            continue;
        }
        let Some((prefix, i, r)) = layer_name(name) else {
            return Err(ModelError::Invalid(format!(
                "{}: unexpected tensor '{name}'",
                t.arch
            )));
        };
        let g = |s: &str| format!("blk.{i}.{s}");
        match r {
            "linear_attn.A_log" => {
                let a: Vec<f32> = to_f32(ht)?.iter().map(|v| -v.exp()).collect();
                if a.len() != lin.n_v {
                    return Err(bad_tensor(ht, format!("expected {} values", lin.n_v)));
                }
                let a: Vec<f32> = vperm(1).iter().map(|&j| a[j]).collect();
                t.push_f32(g("ssm_a"), vec![lin.n_v as u64], &a);
            }
            "linear_attn.dt_bias" => push_rows(t, g("ssm_dt.bias"), ht, &vperm(1))?,
            "linear_attn.norm.weight" => t.push(g("ssm_norm.weight"), ht),
            "linear_attn.conv1d.weight" => {
                let mut idx = ident(2 * key_dim);
                idx.extend(vperm(lin.dv).iter().map(|&j| 2 * key_dim + j));
                push_rows(t, g("ssm_conv1d.weight"), ht, &idx)?;
            }
            "linear_attn.conv1d.bias" => {
                let mut idx = ident(2 * key_dim);
                idx.extend(vperm(lin.dv).iter().map(|&j| 2 * key_dim + j));
                push_rows(t, g("ssm_conv1d.bias"), ht, &idx)?;
            }
            "linear_attn.out_proj.weight" => {
                if tiled && lin.n_k != lin.n_v {
                    push_cols(t, g("ssm_out.weight"), ht, &vperm(lin.dv))?
                } else {
                    t.push(g("ssm_out.weight"), ht)
                }
            }
            "linear_attn.in_proj_qkv.weight" => {
                let mut idx = ident(2 * key_dim);
                idx.extend(vperm(lin.dv).iter().map(|&j| 2 * key_dim + j));
                push_rows(t, g("attn_qkv.weight"), ht, &idx)?;
            }
            "linear_attn.in_proj_z.weight" => {
                push_rows(t, g("attn_gate.weight"), ht, &vperm(lin.dv))?
            }
            "linear_attn.in_proj_b.weight" => push_rows(t, g("ssm_beta.weight"), ht, &vperm(1))?,
            "linear_attn.in_proj_a.weight" => push_rows(t, g("ssm_alpha.weight"), ht, &vperm(1))?,
            "linear_attn.in_proj_ba.weight" => {
                if tiled && lin.n_k != lin.n_v {
                    return Err(bad_tensor(ht, "fused b/a with tiled value heads".into()));
                }
                t.push(g("ssm_ba.weight"), ht)
            }
            "linear_attn.in_proj_qkvz.weight" => {
                if tiled && lin.n_k != lin.n_v {
                    return Err(bad_tensor(ht, "fused qkvz with tiled value heads".into()));
                }
                // Per key head: [q (dk), k (dk), v (r·dv), z (r·dv)].
                let rv = lin.r() * lin.dv;
                let blk = 2 * lin.dk + 2 * rv;
                let part = |off: usize, len: usize| -> Vec<usize> {
                    (0..lin.n_k)
                        .flat_map(|h| (0..len).map(move |e| h * blk + off + e))
                        .collect()
                };
                let mut qkv = part(0, lin.dk);
                qkv.extend(part(lin.dk, lin.dk));
                qkv.extend(part(2 * lin.dk, rv));
                debug_assert_eq!(qkv.len(), conv_dim);
                push_rows(t, g("attn_qkv.weight"), ht, &qkv)?;
                push_rows(t, g("attn_gate.weight"), ht, &part(2 * lin.dk + rv, rv))?;
            }
            "mlp.gate.weight" => t.push(g("ffn_gate_inp.weight"), ht),
            "mlp.shared_expert_gate.weight" => t.push(g("ffn_gate_inp_shexp.weight"), ht),
            "mlp.shared_expert.gate_proj.weight" => t.push(g("ffn_gate_shexp.weight"), ht),
            "mlp.shared_expert.up_proj.weight" => t.push(g("ffn_up_shexp.weight"), ht),
            "mlp.shared_expert.down_proj.weight" => t.push(g("ffn_down_shexp.weight"), ht),
            "mlp.experts.gate_up_proj" | "mlp.experts.gate_up_proj.weight" => {
                // [n, 2·ff, d]: each expert's gate rows, then its up rows.
                let [n, ff2, d] = ht.shape.as_slice() else {
                    return Err(bad_tensor(ht, format!("unexpected shape {:?}", ht.shape)));
                };
                let (n, ff2, d) = (*n, *ff2, *d);
                if !ff2.is_multiple_of(2) {
                    return Err(bad_tensor(ht, "odd gate/up size".into()));
                }
                let rb = ht
                    .ty
                    .row_bytes(d as u64)
                    .filter(|&rb| rb as usize * n * ff2 == ht.data.len())
                    .ok_or_else(|| bad_tensor(ht, "byte size does not match the shape".into()))?
                    as usize;
                let ff = ff2 / 2;
                for (k, nm) in [(0, "ffn_gate_exps.weight"), (1, "ffn_up_exps.weight")] {
                    let idx: Vec<usize> = (0..n)
                        .flat_map(|e| (0..ff).map(move |j| e * ff2 + k * ff + j))
                        .collect();
                    let bytes = gather_rows(ht.data.as_slice(), rb, &idx);
                    t.push_bytes(g(nm), ht.ty, vec![d as u64, ff as u64, n as u64], bytes);
                }
            }
            "mlp.experts.down_proj" | "mlp.experts.down_proj.weight" => {
                t.push(g("ffn_down_exps.weight"), ht)
            }
            _ if r.starts_with("mlp.experts.") => {
                if !moe_layers.iter().any(|(_, l)| *l == i) {
                    moe_layers.push((format!("{prefix}.mlp.experts"), i));
                }
            }
            _ => {
                return Err(ModelError::Invalid(format!(
                    "{}: unexpected tensor '{name}'",
                    t.arch
                )))
            }
        }
    }
    if !moe_layers.is_empty() {
        let n = cfg_usize(t, "num_experts")?;
        for (prefix, i) in moe_layers {
            for (hf, gg) in [
                ("gate_proj", "ffn_gate_exps"),
                ("up_proj", "ffn_up_exps"),
                ("down_proj", "ffn_down_exps"),
            ] {
                crate::hf_names::stack_experts(
                    t,
                    &prefix,
                    &format!("{hf}.weight"),
                    n,
                    format!("blk.{i}.{gg}.weight"),
                )?;
            }
        }
    }
    // Zero-centred RMSNorms: GGUF stores 1 + w (not the GatedDeltaNet's own norm).
    add_to_tensors(
        t,
        |n| n.ends_with("norm.weight") && !n.ends_with("ssm_norm.weight"),
        1.0,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiled_order_interleaves_key_head_groups() {
        // 2 key heads, 3 value heads each: grouped [g0v0 g0v1 g0v2 g1v0 g1v1 g1v2]
        // becomes tiled [g0v0 g1v0 g0v1 g1v1 g0v2 g1v2], so value head j reads key j % 2.
        let lin = Lin {
            n_k: 2,
            n_v: 6,
            dk: 1,
            dv: 1,
        };
        assert_eq!(lin.tiled_perm(1), vec![0, 3, 1, 4, 2, 5]);
        assert_eq!(
            lin.tiled_perm(2),
            vec![0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]
        );
    }

    #[test]
    fn layer_names_split() {
        assert_eq!(
            layer_name("model.layers.12.linear_attn.A_log"),
            Some(("model.layers.12", 12, "linear_attn.A_log"))
        );
        assert_eq!(
            layer_name("model.language_model.layers.3.mlp.experts.0.up_proj.weight"),
            Some((
                "model.language_model.layers.3",
                3,
                "mlp.experts.0.up_proj.weight"
            ))
        );
        assert_eq!(layer_name("model.layers.x.mlp"), None);
        assert_eq!(layer_name("lm_head.weight"), None);
    }
}
