//! Mamba2 (Nemotron-H, Granite-4 hybrids): a selective state-space mixer.
//!
//! For `m` tokens `h` (normed, `[m, d_model]`):
//! 1. `in_proj(h)` = `[z | xBC | dt]`, sizes `d_inner`, `conv_dim = d_inner + 2·G·N`, `H`
//!    (heads `H`, head size `P`, `d_inner = H·P`, groups `G`, state size `N`).
//! 2. `xBC` = silu(causal depthwise conv1d of `xBC` (kernel `K`, with bias)), split into
//!    `x` (`[H, P]`), `B` and `C` (`[G, N]` each; head `h` uses group `h / (H/G)`).
//! 3. `dt = max(softplus(dt + dt_bias), dt_min)`, per head.
//! 4. Per head: `S = exp(dt·A)·S + dt·x ⊗ B` (`S`: `[P, N]`), `y = S·C + D·x`.
//! 5. `y = rmsnorm_per_group(y · silu(z)) · norm` (groups of `d_inner / G`), then `out_proj`.
//!
//! GGUF names (llama.cpp's): `ssm_in.weight` `[d_model, 2·d_inner + 2·G·N + H]`,
//! `ssm_conv1d.weight` `[K, conv_dim]` (+ optional `ssm_conv1d.bias`), `ssm_dt.bias` `[H]`,
//! `ssm_a` `[1, H]` holding `A = -exp(A_log)`, `ssm_d` `[1, H]`, `ssm_norm.weight`
//! `[d_inner / G, G]`, `ssm_out.weight` `[d_inner, d_model]`.

use crate::error::{ModelError, Result};
use crate::file::ModelFile;
use crate::weights::Weight;

#[derive(Clone, Debug)]
pub struct Mamba2Spec {
    /// Heads `H`.
    pub n_heads: usize,
    /// Head size `P`.
    pub head_dim: usize,
    /// State size `N` per head row.
    pub d_state: usize,
    /// Groups `G` sharing B and C (divides `H`).
    pub n_groups: usize,
    /// Convolution kernel `K` (≥ 1).
    pub d_conv: usize,
    /// Lower bound on `dt` after softplus (0: none). HF's reference path clamps at
    /// `time_step_min`; llama.cpp does not clamp.
    pub dt_min: f32,
}

impl Mamba2Spec {
    /// `H · P`.
    pub fn d_inner(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Channels of the convolution: `x`, `B` and `C`.
    pub fn conv_dim(&self) -> usize {
        self.d_inner() + 2 * self.n_groups * self.d_state
    }

    /// Rows of `in_proj`: `z`, `xBC`, `dt`.
    pub fn in_proj_rows(&self) -> usize {
        self.d_inner() + self.conv_dim() + self.n_heads
    }

    /// Checks the sizes for consistency (errors, since they come from files).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Invalid(format!("mamba2: {m}")));
        if self.n_heads == 0 || self.head_dim == 0 || self.d_state == 0 {
            return bad(format!(
                "heads {}, head size {}, state size {} must be positive",
                self.n_heads, self.head_dim, self.d_state
            ));
        }
        if self.n_groups == 0 || !self.n_heads.is_multiple_of(self.n_groups) {
            return bad(format!(
                "{} heads do not split into {} groups",
                self.n_heads, self.n_groups
            ));
        }
        if self.d_conv == 0 || self.d_conv > 64 {
            return bad(format!("conv kernel {} is out of range", self.d_conv));
        }
        let limit = 1u64 << 32;
        let di = self.n_heads as u64 * self.head_dim as u64;
        let gn = self.n_groups as u64 * self.d_state as u64;
        let state = di * self.d_state as u64;
        if di > limit || gn > limit || state > limit {
            return bad("sizes are too large".into());
        }
        Ok(())
    }
}

pub struct Mamba2Weights {
    /// `[2·d_inner + 2·G·N + H, d_model]`: rows `z`, then `xBC`, then `dt`.
    pub in_proj: Weight,
    /// `conv_dim · K` values, channel-major: `conv[c·K + j]`; tap `K-1` multiplies the
    /// current token, tap `j` the token `K-1-j` steps back.
    pub conv: Vec<f32>,
    /// `conv_dim` values, when the file has them.
    pub conv_bias: Option<Vec<f32>>,
    /// `H` values added to `dt` before softplus.
    pub dt_bias: Vec<f32>,
    /// `H` values, `A = -exp(A_log)` (negative).
    pub a: Vec<f32>,
    /// `H` skip weights.
    pub d: Vec<f32>,
    /// `d_inner` weights of the gated group RMSNorm.
    pub norm: Vec<f32>,
    /// `[d_model, d_inner]`.
    pub out_proj: Weight,
}

impl Mamba2Weights {
    pub fn bind(
        f: &ModelFile,
        layer: usize,
        spec: &Mamba2Spec,
        d_model: usize,
    ) -> Result<Mamba2Weights> {
        spec.validate()?;
        let p = |s: &str| format!("blk.{layer}.{s}");
        let (di, cd, h) = (spec.d_inner(), spec.conv_dim(), spec.n_heads);
        let conv_bias_name = p("ssm_conv1d.bias");
        Ok(Mamba2Weights {
            in_proj: f.weight(&p("ssm_in.weight"), spec.in_proj_rows(), d_model)?,
            conv: f.vector(&p("ssm_conv1d.weight"), cd * spec.d_conv)?,
            conv_bias: f.opt_vector(&conv_bias_name, cd)?,
            dt_bias: f.vector(&p("ssm_dt.bias"), h)?,
            a: f.vector(&p("ssm_a"), h)?,
            d: f.vector(&p("ssm_d"), h)?,
            norm: f.vector(&p("ssm_norm.weight"), di)?,
            out_proj: f.weight(&p("ssm_out.weight"), d_model, di)?,
        })
    }
}
