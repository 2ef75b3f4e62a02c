//! Mixture of experts: a router picks `n_used` of `n_experts` gated MLPs per token and
//! mixes their outputs; an optional shared expert runs for every token.
//!
//! GGUF names (llama.cpp's): `ffn_gate_inp` (router, [d, n_exp]), `ffn_{gate,up,down}_exps`
//! (experts stacked on the last dim), optional `exp_probs_b.bias` (selection bias),
//! `ffn_{gate,up,down}_shexp` and `ffn_gate_inp_shexp` (shared expert and its gate).

use crate::config::Activation;
use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::weights::{DenseFfn, Weight};
use caldera_format::GgmlType;
use caldera_format::TensorBytes;

/// How router logits become expert choices and mixing weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RouterKind {
    /// softmax over all experts, keep the top k; `renorm` rescales the kept weights to sum 1
    /// (Qwen3-MoE `norm_topk_prob`).
    Softmax { renorm: bool },
    /// keep the top k logits, softmax over those (gpt-oss).
    TopKSoftmax,
    /// sigmoid scores; choose the top k of `score + selection bias`, weight by the score,
    /// optionally renormalized (Nemotron-H, DeepSeek-V3 style).
    Sigmoid { renorm: bool },
}

#[derive(Clone, Debug)]
pub struct MoeSpec {
    pub n_experts: usize,
    pub n_used: usize,
    /// Hidden size of each expert.
    pub d_ff: usize,
    pub act: Activation,
    pub router: RouterKind,
    /// Multiplier on the mixing weights (routed_scaling_factor).
    pub weights_scale: f32,
    /// Hidden size of the shared expert, if there is one.
    pub shared_d_ff: Option<usize>,
}

/// `n` matrices of `rows` x `cols` stacked in one tensor (GGUF dims [cols, rows, n]).
#[derive(Clone, Debug)]
pub struct ExpertWeights {
    pub name: String,
    pub ty: GgmlType,
    pub n: usize,
    pub rows: usize,
    pub cols: usize,
    pub data: TensorBytes,
    /// Per-expert bias, `n * rows` values.
    pub bias: Option<Vec<f32>>,
}

impl ExpertWeights {
    /// Expert `e` as an ordinary weight (a view; its bias copied, if any).
    pub fn expert(&self, e: usize) -> Weight {
        let per = self.data.len() / self.n.max(1);
        Weight {
            name: format!("{}[{e}]", self.name),
            ty: self.ty,
            rows: self.rows,
            cols: self.cols,
            data: self
                .data
                .slice(e * per, per)
                .expect("expert index checked by the caller"),
            bias: self
                .bias
                .as_ref()
                .map(|b| b[e * self.rows..(e + 1) * self.rows].to_vec()),
        }
    }
}

pub struct MoeWeights {
    /// [n_experts, d_model], with a bias when the router has one.
    pub router: Weight,
    /// Added to the scores for selection only (`exp_probs_b.bias`).
    pub selection_bias: Option<Vec<f32>>,
    /// `None` when the activation has no gate.
    pub gate: Option<ExpertWeights>,
    pub up: ExpertWeights,
    pub down: ExpertWeights,
    pub shared: Option<DenseFfn>,
    /// [1, d_model]: the shared expert's output is scaled by sigmoid(gate · x).
    pub shared_gate: Option<Weight>,
}

impl ModelFile {
    /// A stacked expert tensor of `n` matrices `rows` x `cols`, with its `.bias` if present.
    pub fn experts(&self, name: &str, n: usize, rows: usize, cols: usize) -> Result<ExpertWeights> {
        let t = self
            .tensor(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_owned()))?;
        if t.dims != [cols as u64, rows as u64, n as u64] {
            return Err(ModelError::BadTensor {
                name: name.to_owned(),
                msg: format!("expected dims [{cols}, {rows}, {n}], found {:?}", t.dims),
            });
        }
        let bias_name = name.strip_suffix(".weight").map(|s| format!("{s}.bias"));
        let bias = match bias_name {
            Some(b) if self.tensor(&b).is_some() => Some(self.vector(&b, n * rows)?),
            _ => None,
        };
        Ok(ExpertWeights {
            name: name.to_owned(),
            ty: t.ty,
            n,
            rows,
            cols,
            data: t.data.clone(),
            bias,
        })
    }
}

impl MoeWeights {
    pub fn bind(f: &ModelFile, layer: usize, spec: &MoeSpec, d_model: usize) -> Result<MoeWeights> {
        let p = |s: &str| format!("blk.{layer}.{s}");
        let (n, ff) = (spec.n_experts, spec.d_ff);
        if spec.n_used == 0 || spec.n_used > n {
            return Err(ModelError::Invalid(format!(
                "layer {layer}: {} experts used of {n}",
                spec.n_used
            )));
        }
        let shared = match spec.shared_d_ff {
            Some(sff) => Some(DenseFfn {
                gate: if spec.act.gated() {
                    Some(f.weight(&p("ffn_gate_shexp.weight"), sff, d_model)?)
                } else {
                    None
                },
                up: f.weight(&p("ffn_up_shexp.weight"), sff, d_model)?,
                down: f.weight(&p("ffn_down_shexp.weight"), d_model, sff)?,
            }),
            None => None,
        };
        let shared_gate = if f.tensor(&p("ffn_gate_inp_shexp.weight")).is_some() {
            Some(f.weight(&p("ffn_gate_inp_shexp.weight"), 1, d_model)?)
        } else {
            None
        };
        Ok(MoeWeights {
            router: f.weight(&p("ffn_gate_inp.weight"), n, d_model)?,
            selection_bias: f.opt_vector(&p("exp_probs_b.bias"), n)?,
            gate: if spec.act.gated() {
                Some(f.experts(&p("ffn_gate_exps.weight"), n, ff, d_model)?)
            } else {
                None
            },
            up: f.experts(&p("ffn_up_exps.weight"), n, ff, d_model)?,
            down: f.experts(&p("ffn_down_exps.weight"), n, d_model, ff)?,
            shared,
            shared_gate,
        })
    }
}
