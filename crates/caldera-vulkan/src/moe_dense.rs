//! Mixture-of-experts pieces of a step (`moe_mix.comp`, `moe_combine.comp`): the
//! routing of every token to its experts' mixing weights, and the weighted sum of the
//! experts' outputs into the residual stream. Between them the model runs each expert as
//! an ordinary MLP over every token of the step (an expert not chosen by a token weighs 0
//! there): simple and exact, but it reads every expert's weights (see `model.rs`).
//! caldera-cpu's `ffn::route` and `ffn::moe` define them; `tests/moe.rs` holds them equal.

use caldera_model::blocks::moe::{MoeSpec, RouterKind};

use crate::context::Context;
use crate::error::{Result, VkError};
use crate::kernels::Kernel;
use crate::memory::Buffer;
use crate::ops::push_words;
use crate::record::{Binding, Recorder};

/// Most experts `moe_mix` holds (shared memory).
pub const MAX_EXPERTS: usize = 1024;
/// Most experts chosen per token.
pub const MAX_USED: usize = 64;

fn invalid(msg: String) -> VkError {
    VkError::Invalid(msg)
}

fn need(what: &str, buf: &Buffer, floats: u64) -> Result<()> {
    if buf.size() < floats * 4 {
        return Err(invalid(format!(
            "{what}: a buffer of {} bytes, want {floats} values",
            buf.size()
        )));
    }
    Ok(())
}

/// Routing (`moe_mix.comp`): for every token `t` of a step (`step[0]` of them, at most
/// `max_tokens`), the router logits `logits[t][n_experts]` become the mixing weights
/// `w[t][n_experts]`, zero for the experts the token does not use. One workgroup per token.
pub struct MoeMix {
    binding: Binding,
    push: Vec<u8>,
    groups: u64,
}

impl MoeMix {
    /// `bias`: the selection bias (`n_experts` values) of a sigmoid router, if it has one.
    pub fn new(
        ctx: &Context,
        spec: &MoeSpec,
        logits: &Buffer,
        bias: Option<&Buffer>,
        w: &Buffer,
        step: &Buffer,
        max_tokens: u64,
    ) -> Result<MoeMix> {
        let (n, k) = (spec.n_experts, spec.n_used);
        if n == 0 || n > MAX_EXPERTS || k == 0 || k > n || k > MAX_USED {
            return Err(invalid(format!(
                "MoE routing: {k} of {n} experts (at most {MAX_USED} of {MAX_EXPERTS})"
            )));
        }
        if max_tokens == 0 {
            return Err(invalid("MoE routing over 0 tokens".into()));
        }
        let rows = max_tokens * n as u64;
        need("MoE router logits", logits, rows)?;
        need("MoE weights", w, rows)?;
        need("step values", step, 1)?;
        let (kind, renorm) = match spec.router {
            RouterKind::Softmax { renorm } => (0u32, renorm),
            RouterKind::TopKSoftmax => (1, false),
            RouterKind::Sigmoid { renorm } => (2, renorm),
        };
        if let Some(b) = bias {
            if kind != 2 {
                return Err(invalid(
                    "MoE routing: a selection bias needs a sigmoid router".into(),
                ));
            }
            need("MoE selection bias", b, n as u64)?;
        }
        let flags = u32::from(renorm) | if bias.is_some() { 2 } else { 0 };
        let binding = ctx.bind(Kernel::MoeMix, &[logits, bias.unwrap_or(logits), w, step])?;
        let push = push_words(&[
            n as u32,
            k as u32,
            kind,
            flags,
            spec.weights_scale.to_bits(),
            u32::try_from(max_tokens)
                .map_err(|_| invalid("MoE routing: too many tokens".into()))?,
        ]);
        Ok(MoeMix {
            binding,
            push,
            groups: max_tokens,
        })
    }

    /// Records the dispatch (no barrier after).
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        r.dispatch(&self.binding, &self.push, self.groups)
    }
}

/// `x[t] += Σ_e w[t][e] · y[t][e] + Σ_s y[t][n_experts + s]` for every token `t` of a step
/// (`moe_combine.comp`): `y` rows `[max_tokens][n_slots][d]` hold each expert's output
/// (slots `0 .. n_experts`, weighted by `w` `[max_tokens][n_experts]`; weights of 0 are
/// skipped) and then unweighted ones (the shared expert).
pub struct MoeCombine {
    binding: Binding,
    push: Vec<u8>,
    groups: u64,
}

impl MoeCombine {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &Context,
        d: usize,
        n_experts: usize,
        n_slots: usize,
        x: &Buffer,
        y: &Buffer,
        w: &Buffer,
        step: &Buffer,
        max_tokens: u64,
    ) -> Result<MoeCombine> {
        let t = max_tokens;
        let sizes = (t as u128) * (n_slots as u128) * (d as u128);
        if d == 0 || t == 0 || n_slots < n_experts || sizes >= 1u128 << 32 {
            return Err(invalid(format!(
                "MoE combine of {n_slots} slots ({n_experts} experts) of {d} over {t} tokens"
            )));
        }
        need("MoE combine x", x, t * d as u64)?;
        need("MoE combine y", y, t * (n_slots * d) as u64)?;
        need("MoE combine weights", w, t * n_experts.max(1) as u64)?;
        need("step values", step, 1)?;
        let binding = ctx.bind(Kernel::MoeCombine, &[x, y, w, step])?;
        let push = push_words(&[d as u32, n_experts as u32, n_slots as u32, t as u32]);
        let wg = ctx.tuning().workgroup_size as u64;
        Ok(MoeCombine {
            binding,
            push,
            groups: t * (d as u64).div_ceil(wg),
        })
    }

    /// Records the dispatch (no barrier after).
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        r.dispatch(&self.binding, &self.push, self.groups)
    }
}
