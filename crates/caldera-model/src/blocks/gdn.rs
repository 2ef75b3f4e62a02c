//! GatedDeltaNet (Qwen3.5 / Qwen3-Next linear attention).
//!
//! Per token `x` (the normed layer input, `d_model` values):
//! - `qkv = W_qkv x` (`[q: n_k·dk | k: n_k·dk | v: n_v·dv]`), `z = W_z x` (`n_v·dv`),
//!   `b`, `a` (one per value head);
//! - `qkv` goes through a causal depthwise conv of `conv_kernel` taps (state: the last
//!   `conv_kernel - 1` inputs) and SiLU;
//! - q, k are L2-normalized per head, q is scaled by `1/sqrt(dk)`;
//! - `beta = sigmoid(b)`, `g = ssm_a · softplus(a + dt_bias)` with `ssm_a = -exp(A_log)`;
//! - per value head `S [dk × dv]`: `S = exp(g) S; S += k ⊗ beta (v - Sᵀk); o = Sᵀq`;
//! - `o = rmsnorm(o) · norm_w · silu(z)` per value head, then `W_out o`.
//!
//! GGUF names (llama.cpp's): `attn_qkv`, `attn_gate` (z), `ssm_beta` + `ssm_alpha` or
//! the fused `ssm_ba`, `ssm_conv1d` (dims `[kernel, conv_dim]`), `ssm_dt.bias`, `ssm_a`
//! (already `-exp(A_log)`), `ssm_norm` (`[dv]`), `ssm_out`. Keys: `ssm.conv_kernel`,
//! `ssm.state_size` (dk), `ssm.group_count` (n_k), `ssm.time_step_rank` (n_v),
//! `ssm.inner_size` (n_v·dv).

use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::weights::Weight;

/// Which key head a value head reads when there are fewer key heads than value heads
/// (`r = n_v / n_k` value heads per key head).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GdnHeadOrder {
    /// Value head `j` reads key head `j / r` (HF order; GGUF `qwen3next`).
    Grouped,
    /// Value head `j` reads key head `j % n_k` (GGUF `qwen35`, `qwen35moe`: llama.cpp's
    /// converter reorders the value heads so that key heads tile).
    Tiled,
}

#[derive(Clone, Debug)]
pub struct GdnSpec {
    pub n_k_heads: usize,
    pub n_v_heads: usize,
    pub head_k_dim: usize,
    pub head_v_dim: usize,
    /// Taps of the causal depthwise conv.
    pub conv_kernel: usize,
    pub head_order: GdnHeadOrder,
}

/// Upper bound on the conv taps a file may declare (real models use 4).
const MAX_CONV_KERNEL: usize = 64;
/// Upper bound on the f32 values of one layer's recurrent or conv state (1 GiB); real
/// models hold well under a million.
const MAX_STATE: usize = 1 << 28;

impl GdnSpec {
    /// `n_k_heads * head_k_dim`
    pub fn key_dim(&self) -> usize {
        self.n_k_heads * self.head_k_dim
    }

    /// `n_v_heads * head_v_dim`
    pub fn value_dim(&self) -> usize {
        self.n_v_heads * self.head_v_dim
    }

    /// Channels of the conv: q, k and v.
    pub fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }

    /// The key head that value head `v` reads.
    pub fn key_head(&self, v: usize) -> usize {
        match self.head_order {
            GdnHeadOrder::Grouped => v / (self.n_v_heads / self.n_k_heads),
            GdnHeadOrder::Tiled => v % self.n_k_heads,
        }
    }

    /// Reads `{arch}.ssm.*` and checks the sizes.
    pub fn read(f: &ModelFile, arch: &str, head_order: GdnHeadOrder) -> Result<GdnSpec> {
        let k = |s: &str| format!("{arch}.ssm.{s}");
        let conv_kernel = f.req_usize(&k("conv_kernel"))?;
        let head_k_dim = f.req_usize(&k("state_size"))?;
        let n_k_heads = f.req_usize(&k("group_count"))?;
        let n_v_heads = f.req_usize(&k("time_step_rank"))?;
        let inner = f.req_usize(&k("inner_size"))?;
        let bad = |msg: String| ModelError::Invalid(format!("GatedDeltaNet: {msg}"));
        if conv_kernel == 0 || conv_kernel > MAX_CONV_KERNEL {
            return Err(bad(format!(
                "conv kernel {conv_kernel} is outside 1..={MAX_CONV_KERNEL}"
            )));
        }
        if head_k_dim == 0 || n_k_heads == 0 || n_v_heads == 0 {
            return Err(bad("zero heads or head size".into()));
        }
        if !n_v_heads.is_multiple_of(n_k_heads) {
            return Err(bad(format!(
                "{n_v_heads} value heads cannot be grouped over {n_k_heads} key heads"
            )));
        }
        if inner == 0 || !inner.is_multiple_of(n_v_heads) {
            return Err(bad(format!(
                "inner size {inner} does not split into {n_v_heads} value heads"
            )));
        }
        let spec = GdnSpec {
            n_k_heads,
            n_v_heads,
            head_k_dim,
            head_v_dim: inner / n_v_heads,
            conv_kernel,
            head_order,
        };
        // Every size derived later must fit; the state is n_v·dk·dv floats.
        let state = n_v_heads
            .checked_mul(head_k_dim)
            .and_then(|x| x.checked_mul(spec.head_v_dim));
        let conv = n_k_heads
            .checked_mul(head_k_dim)
            .and_then(|kd| kd.checked_mul(2))
            .and_then(|x| x.checked_add(inner))
            .and_then(|c| c.checked_mul(conv_kernel));
        match (state, conv) {
            (Some(s), Some(c)) if s <= MAX_STATE && c <= MAX_STATE => Ok(spec),
            _ => Err(bad(format!(
                "per-layer state of {n_v_heads}x{head_k_dim}x{} is too large",
                spec.head_v_dim
            ))),
        }
    }
}

/// The `b` (beta) and `a` (decay) projections.
pub enum GdnGates {
    /// `ssm_beta`, `ssm_alpha`: `n_v` rows each, in value-head order.
    Separate { beta: Weight, alpha: Weight },
    /// `ssm_ba` (`2·n_v` rows): for each key head `g`, the `b` rows of its `r` value heads
    /// `g·r .. g·r+r`, then their `a` rows (Qwen3-Next, grouped order).
    Fused(Weight),
}

pub struct GdnWeights {
    /// `[conv_dim, d_model]`: rows q (all key heads), k (all key heads), v (all value heads).
    pub qkv: Weight,
    /// `[n_v·dv, d_model]`: the output gate z.
    pub gate: Weight,
    pub gates: GdnGates,
    /// `conv_dim × conv_kernel`, channel-major: tap `i` of channel `c` at `c·kernel + i`;
    /// tap `kernel-1` multiplies the current token.
    pub conv: Vec<f32>,
    pub conv_bias: Option<Vec<f32>>,
    /// `n_v`
    pub dt_bias: Vec<f32>,
    /// `n_v` values of `-exp(A_log)`.
    pub a: Vec<f32>,
    /// `dv`: weight of the gated RMSNorm (shared by all value heads).
    pub norm: Vec<f32>,
    /// `[d_model, n_v·dv]`
    pub out: Weight,
}

impl GdnWeights {
    /// Binds `blk.{layer}.*` for a GatedDeltaNet mixer.
    pub fn bind(f: &ModelFile, layer: usize, spec: &GdnSpec, d_model: usize) -> Result<GdnWeights> {
        let p = |s: &str| format!("blk.{layer}.{s}");
        let (nv, kk, cd, vd) = (
            spec.n_v_heads,
            spec.conv_kernel,
            spec.conv_dim(),
            spec.value_dim(),
        );
        if f.tensor(&p("attn_qkv.weight")).is_none() && f.tensor(&p("ssm_in.weight")).is_some() {
            return Err(ModelError::Invalid(format!(
                "layer {layer}: the legacy fused 'ssm_in' GatedDeltaNet layout is not supported; \
                 reconvert the model"
            )));
        }
        let gates = if f.tensor(&p("ssm_ba.weight")).is_some() {
            GdnGates::Fused(f.weight(&p("ssm_ba.weight"), 2 * nv, d_model)?)
        } else {
            GdnGates::Separate {
                beta: f.weight(&p("ssm_beta.weight"), nv, d_model)?,
                alpha: f.weight(&p("ssm_alpha.weight"), nv, d_model)?,
            }
        };
        let conv_name = p("ssm_conv1d.weight");
        let ct = f
            .tensor(&conv_name)
            .ok_or_else(|| ModelError::MissingTensor(conv_name.clone()))?;
        let dims_ok = match ct.dims.as_slice() {
            [a, b] => *a == kk as u64 && *b == cd as u64,
            [a, b, rest @ ..] => *a == kk as u64 && *b == cd as u64 && rest.iter().all(|&x| x == 1),
            _ => false,
        };
        if !dims_ok {
            return Err(ModelError::BadTensor {
                name: conv_name,
                msg: format!("expected dims [{kk}, {cd}], found {:?}", ct.dims),
            });
        }
        Ok(GdnWeights {
            qkv: f.weight(&p("attn_qkv.weight"), cd, d_model)?,
            gate: f.weight(&p("attn_gate.weight"), vd, d_model)?,
            gates,
            conv: f.vector(&conv_name, cd * kk)?,
            conv_bias: f.opt_vector(&p("ssm_conv1d.bias"), cd)?,
            dt_bias: f.vector(&p("ssm_dt.bias"), nv)?,
            a: f.vector(&p("ssm_a"), nv)?,
            norm: f.vector(&p("ssm_norm.weight"), spec.head_v_dim)?,
            out: f.weight(&p("ssm_out.weight"), d_model, vd)?,
        })
    }
}
