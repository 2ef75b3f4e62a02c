//! Mixture of experts for the decode step (one token): the router and mat-vecs over the
//! experts it chose, which read the chosen expert ids from device memory. A step records
//! the same dispatches whatever the router picks, so it needs no host round trip and its
//! recording stays valid. caldera-cpu's `ffn::moe` / `ffn::route` are the twins.
//!
//! Ops and dispatches (each op's `record` adds no barrier after itself):
//! - [`MoeRouter`]: the router's logits (a mat-vec of the router weight, `n` rows; with a
//!   shared-expert gate, its row appended as row `n`) and the routing into [`Routing`]
//!   (ids, weights): fused (`mvr_*`, the mat-vec's last workgroup routes) [1], or an
//!   ordinary [`Mv`] [1 per piece] then [`MoeRoute`] [1];
//! - [`MoeRoute`] (`moe_route.comp`, `route.glsl`): logits → [`Routing`] [1; prefill one
//!   workgroup per token];
//! - [`ExpertUp`] (`mvxg_*` / `mvqxg_*`, or `mvx_*` / `mvqx_*` for ungated experts): the
//!   chosen experts' gate|up rows with the GLU (or up rows with relu²) into `h`, slot `s`
//!   at `h[s * ff ..]`; optionally quantizing `h` for the down projection on the way
//!   (`MvTail`) [1 per piece of the expert tensor];
//! - [`ExpertDown`] (same kernels, `MV_SUM`): `y (+)= Σ_s w_s · down_{e_s}(h_s)` [1 per
//!   piece, with a barrier between pieces: they add into the same outputs].
//!
//! A shared expert is a one-expert tensor ([`Experts::from_glu`], [`Experts::from_weight`])
//! run by the same two ops on the routing's shared slot (slot `n_used`: id 0, weight 1 or
//! sigmoid of its gate's logit, which [`MoeRoute`] writes), so its sigmoid gate costs no
//! dispatch of its own. [`MoeFfn`] strings the whole block together.
//!
//! Buffer layouts: ids u32 and weights f32, `n_used` (+ 1 with a shared expert) each;
//! expert tensors stack `n` experts of `rows` rows (gate|up: row 2i gate i, 2i + 1 up i,
//! as the dense gate|up mat-vecs), every piece holding whole experts; expert biases f32
//! `[n][rows]` in the same row order; `h` f32 `[slot][ff]` (and its int8 blocks when the
//! down projection takes int8).
//!
//! In the int8 decode chain: [`ExpertUp`] reads the FFN input as the o-projection's tail
//! leaves it ([`MoeIo::input`]: int8 blocks of `x * gam` and per-block sums of squares,
//! `MV_XNORM`), its tail quantizes `h` for [`ExpertDown`], whose tail (on the last down
//! of the block) quantizes the block's output for the next layer ([`MoeIo::next`]). The
//! router reads the residual stream and norm weights in f32 (the norm folded into its
//! mat-vec), as the CPU.
//! Kernels exist for every type the dense mat-vecs take on f32 activations and for
//! Q4_0, Q8_0, Q4_K, Q6_K and MXFP4 (int8 only) on int8 activations.

use caldera_format::GgmlType;
use caldera_model::blocks::moe::{ExpertWeights, MoeSpec, MoeWeights, RouterKind};
use caldera_model::{Activation, Weight};

use crate::context::Context;
use crate::error::{Result, VkError};
use crate::kernels::{Kernel, KERNELS};
use crate::memory::{Buffer, DeviceTensor, MemoryKind, TensorPiece, PIECE_PAD};
use crate::ops::{mv_debug, push_words, Mv, MvMode, MvTail, Q8Acts, QuantX};
use crate::record::{Binding, Recorder};

/// Most experts [`MoeRoute`] chooses among.
pub const MAX_EXPERTS: u64 = 1024;
/// Most experts [`MoeRoute`] chooses per token.
pub const MAX_USED: u64 = 32;

fn invalid(msg: String) -> VkError {
    VkError::Invalid(msg)
}

fn u32_of(v: u64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| invalid(format!("{what} = {v} does not fit in 32 bits")))
}

/// Weight types with expert mat-vecs on f32 activations (`mvx_*`), in table order.
const MVX_TYPES: [GgmlType; 12] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_XS,
];
/// Weight types with expert mat-vecs on int8 activations (`mvqx_*`), in table order.
const MVQX_TYPES: [GgmlType; 5] = [
    GgmlType::Q4_0,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
    GgmlType::MXFP4,
];

/// The expert mat-vec on f32 activations for `ty`; `glu`: the gate|up variant.
pub fn mvx_kernel(ty: GgmlType, glu: bool) -> Option<Kernel> {
    let i = MVX_TYPES.iter().position(|&t| t == ty)?;
    let base = if glu { Kernel::MvxgF32 } else { Kernel::MvxF32 } as usize;
    Some(KERNELS[base + i].kernel)
}

/// The expert mat-vec on int8 activations for `ty`; `glu`: the gate|up variant; `dot`:
/// with int8 dot-product instructions (else emulated).
pub fn mvqx_kernel(ty: GgmlType, glu: bool, dot: bool) -> Option<Kernel> {
    let i = MVQX_TYPES.iter().position(|&t| t == ty)?;
    let base = match (glu, dot) {
        (false, true) => Kernel::MvqxQ4_0,
        (true, true) => Kernel::MvqxgQ4_0,
        (false, false) => Kernel::MvqxeQ4_0,
        (true, false) => Kernel::MvqxgeQ4_0,
    } as usize;
    Some(KERNELS[base + i].kernel)
}

/// Whether expert weights of type `ty` have an int8-activation kernel.
pub fn supports_q8(ty: GgmlType) -> bool {
    MVQX_TYPES.contains(&ty)
}

/// The experts chosen for each token of a step: `ids` (u32) and mixing `weights` (f32),
/// [`Routing::per_token`] entries per token: entries `0 .. n_used` are the routed experts
/// in descending order of the router's key, entry `n_used` (with `shared`) the shared
/// expert (id 0). Tokens past the step's have ids `u32::MAX`.
pub struct Routing {
    pub ids: Buffer,
    pub weights: Buffer,
    pub n_used: u64,
    pub shared: bool,
    /// Tokens the buffers hold (1 for decode).
    pub tokens: u64,
}

/// A run of routing slots an expert op serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slots {
    pub first: u64,
    pub count: u64,
}

impl Routing {
    /// Routing buffers for one token.
    pub fn new(ctx: &Context, n_used: u64, shared: bool) -> Result<Routing> {
        Routing::for_tokens(ctx, n_used, shared, 1)
    }

    /// Routing buffers for steps of up to `tokens` tokens.
    pub fn for_tokens(ctx: &Context, n_used: u64, shared: bool, tokens: u64) -> Result<Routing> {
        if n_used == 0 || n_used > MAX_USED || tokens == 0 {
            return Err(invalid(format!(
                "{n_used} experts per token (1 to {MAX_USED}) over {tokens} tokens"
            )));
        }
        let bytes = tokens * (n_used + u64::from(shared)) * 4;
        Ok(Routing {
            ids: ctx.create_buffer(bytes, MemoryKind::Device)?,
            weights: ctx.create_buffer(bytes, MemoryKind::Device)?,
            n_used,
            shared,
            tokens,
        })
    }

    /// Entries per token.
    pub fn per_token(&self) -> u64 {
        self.n_used + u64::from(self.shared)
    }

    /// The routed experts' slots.
    pub fn routed(&self) -> Slots {
        Slots {
            first: 0,
            count: self.n_used,
        }
    }

    /// The shared expert's slot, if the routing has one.
    pub fn shared_slot(&self) -> Option<Slots> {
        self.shared.then_some(Slots {
            first: self.n_used,
            count: 1,
        })
    }
}

/// What [`MoeRoute`] writes into the shared expert's slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedSlot {
    /// No shared expert (no slot).
    None,
    /// Weight 1.
    Ungated,
    /// Weight sigmoid(logits[n]): the shared expert's gate (qwen2/3-next style), its row
    /// appended to the router's.
    Gated,
}

/// A router as [`MoeRoute`] runs it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouterSpec {
    pub n_experts: u64,
    pub n_used: u64,
    pub kind: RouterKind,
    /// Multiplier on the mixing weights.
    pub scale: f32,
    pub shared: SharedSlot,
}

impl RouterSpec {
    /// The router of `spec`; `shared_gate`: its shared expert has a sigmoid gate.
    pub fn of(spec: &MoeSpec, shared_gate: bool) -> RouterSpec {
        RouterSpec {
            n_experts: spec.n_experts as u64,
            n_used: spec.n_used as u64,
            kind: spec.router,
            scale: spec.weights_scale,
            shared: match (spec.shared_d_ff, shared_gate) {
                (None, _) => SharedSlot::None,
                (Some(_), false) => SharedSlot::Ungated,
                (Some(_), true) => SharedSlot::Gated,
            },
        }
    }
}

const ROUTE_SEL_BIAS: u32 = 2;

/// Checks a router over `out.tokens` tokens' logits (`ld` apart) and returns
/// `route.glsl`'s kind and flags for it.
fn route_params(
    spec: &RouterSpec,
    logits: &Buffer,
    ld: u64,
    logit_bias: Option<&Buffer>,
    selection_bias: Option<&Buffer>,
    out: &Routing,
) -> Result<(u32, u32)> {
    let (n, k) = (spec.n_experts, spec.n_used);
    if n == 0 || n > MAX_EXPERTS || k == 0 || k > n.min(MAX_USED) {
        return Err(invalid(format!(
            "router choosing {k} of {n} experts (at most {MAX_USED} of {MAX_EXPERTS})"
        )));
    }
    let shared = spec.shared != SharedSlot::None;
    if out.n_used != k || out.shared != shared {
        return Err(invalid(format!(
            "routing buffers for {} experts (shared {}), router for {k} (shared {shared})",
            out.n_used, out.shared
        )));
    }
    let gated = spec.shared == SharedSlot::Gated;
    let small = |b: Option<&Buffer>| b.is_some_and(|b| b.size() < n * 4);
    let row = n + u64::from(gated);
    if ld < row
        || logits.size() < ((out.tokens - 1) * ld + row) * 4
        || small(logit_bias)
        || small(selection_bias)
        || !spec.scale.is_finite()
    {
        return Err(invalid(format!(
            "router over {n} experts: logits or biases too small, or a bad scale"
        )));
    }
    let (kind, renorm) = match spec.kind {
        RouterKind::Softmax { renorm } => (0u32, renorm),
        RouterKind::TopKSoftmax => (1, false),
        RouterKind::Sigmoid { renorm } => (2, renorm),
    };
    let mut flags = u32::from(renorm);
    if selection_bias.is_some() && kind == 2 {
        flags |= ROUTE_SEL_BIAS;
    }
    if logit_bias.is_some() {
        flags |= 4;
    }
    if shared {
        flags |= 8;
    }
    if gated {
        flags |= 16;
    }
    Ok((kind, flags))
}

/// The router (`moe_route.comp`, one workgroup): logits → chosen experts and weights, as
/// caldera-cpu's `ffn::route`, for every [`RouterKind`]. One dispatch.
pub struct MoeRoute {
    binding: Binding,
    push: Vec<u8>,
    groups: u64,
    _step: Option<Buffer>,
}

impl MoeRoute {
    /// `logits`: `n` f32 (`n + 1` with a gated shared expert); `logit_bias`: the router's
    /// bias (`n` f32, added to the logits); `selection_bias`: added to the sigmoid scores
    /// for the choice only (`n` f32; used by [`RouterKind::Sigmoid`] only, as the CPU).
    pub fn new(
        ctx: &Context,
        spec: &RouterSpec,
        logits: &Buffer,
        logit_bias: Option<&Buffer>,
        selection_bias: Option<&Buffer>,
        out: &Routing,
    ) -> Result<MoeRoute> {
        let ld = spec.n_experts + u64::from(spec.shared == SharedSlot::Gated);
        MoeRoute::steps(ctx, spec, logits, ld, logit_bias, selection_bias, out, None)
    }

    /// The router over the tokens of a step: token `t`'s logits at `logits[t * ld ..]`,
    /// its routing at entry `t * out.per_token()`; `step` holds the step's token count
    /// (`step[0]`; None: one token). One workgroup per token `out` holds.
    #[allow(clippy::too_many_arguments)]
    pub fn steps(
        ctx: &Context,
        spec: &RouterSpec,
        logits: &Buffer,
        ld: u64,
        logit_bias: Option<&Buffer>,
        selection_bias: Option<&Buffer>,
        out: &Routing,
        step: Option<&Buffer>,
    ) -> Result<MoeRoute> {
        let (kind, flags) = route_params(spec, logits, ld, logit_bias, selection_bias, out)?;
        if step.is_some_and(|s| s.size() < 4) {
            return Err(invalid("router step values: buffer too small".into()));
        }
        let sel = selection_bias.filter(|_| flags & ROUTE_SEL_BIAS != 0);
        let own_step = match step {
            Some(_) => None,
            None => Some(ctx.upload(&1u32.to_le_bytes())?),
        };
        let binding = ctx.bind(
            Kernel::MoeRoute,
            &[
                logits,
                logit_bias.unwrap_or(logits),
                sel.unwrap_or(logits),
                &out.ids,
                &out.weights,
                step.or(own_step.as_ref()).unwrap_or(logits),
            ],
        )?;
        let push = push_words(&[
            spec.n_experts as u32,
            spec.n_used as u32,
            kind,
            flags,
            spec.scale.to_bits(),
            u32_of(ld, "router logits stride")?,
        ]);
        Ok(MoeRoute {
            binding,
            push,
            groups: out.tokens,
            _step: own_step,
        })
    }

    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        r.dispatch(&self.binding, &self.push, self.groups)
    }
}

/// Runs [`MoeRoute`] on host logits (`n`, `n + 1` with a gated shared expert). Returns
/// the ids and weights of every slot.
pub fn route_host(
    ctx: &Context,
    spec: &RouterSpec,
    logits: &[f32],
    logit_bias: Option<&[f32]>,
    selection_bias: Option<&[f32]>,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let lb = ctx.upload_f32(logits)?;
    let up = |b: Option<&[f32]>| b.map(|b| ctx.upload_f32(b)).transpose();
    let (bias, sel) = (up(logit_bias)?, up(selection_bias)?);
    let out = Routing::new(ctx, spec.n_used, spec.shared != SharedSlot::None)?;
    let op = MoeRoute::new(ctx, spec, &lb, bias.as_ref(), sel.as_ref(), &out)?;
    let rec = ctx.record(|r| op.record(r))?;
    ctx.submit(&rec)?;
    let slots = (out.n_used + u64::from(out.shared)) as usize;
    let ids = ctx.read_buffer(&out.ids, 0, slots as u64 * 4)?;
    let ids = ids
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((ids, ctx.read_f32(&out.weights, slots)?))
}

/// Where a [`MoeRouter`] reads its input: `rmsnorm(x) * gam` (f32, `k` values each).
#[derive(Clone, Copy)]
pub struct RouterInput<'a> {
    pub x: &'a Buffer,
    pub gam: &'a Buffer,
    pub eps: f32,
}

/// The router of a decode MoE block (one token): its logits (a mat-vec of the router
/// weight, the input norm folded in; a gated shared expert's gate row appended) and the
/// routing into a [`Routing`]. Fused (`mvr_*`: `mv.glsl` with `MV_ROUTE`), one dispatch:
/// the workgroups write the logits and the last to finish (an atomic count it resets)
/// routes them as [`MoeRoute`] does. Else (`fuse` off, a router in several pieces, or
/// too little shared memory for the fused kernel's routing at the mat-vec workgroup
/// size) an [`Mv`] and a [`MoeRoute`] behind a barrier. Either way it writes `logits`
/// (`n` f32, `n + 1` with a gated shared expert).
pub struct MoeRouter {
    fused: Option<(Binding, Vec<u8>, u64)>,
    split: Option<(Mv, MoeRoute)>,
    _count: Option<Buffer>,
}

/// Shared memory of the fused router kernel at workgroup size `wg`: the routing's keys
/// and values, its reductions and picks, and the mat-vec's reductions.
fn fused_router_shared_bytes(wg: u64) -> u64 {
    4 * (2 * MAX_EXPERTS + MAX_USED + 1) + 4 * wg * (1 + 1 + 9)
}

impl MoeRouter {
    /// `w`: the router's rows (`n`, `n + 1` with [`SharedSlot::Gated`]) of `k` elements
    /// of `ty`; the biases as [`MoeRoute::new`]'s.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &Context,
        spec: &RouterSpec,
        ty: GgmlType,
        w: &DeviceTensor,
        k: u64,
        input: RouterInput<'_>,
        logits: &Buffer,
        logit_bias: Option<&Buffer>,
        selection_bias: Option<&Buffer>,
        out: &Routing,
        fuse: bool,
    ) -> Result<MoeRouter> {
        let gated = spec.shared == SharedSlot::Gated;
        let rows = spec.n_experts + u64::from(gated);
        if w.rows != rows || out.tokens != 1 {
            return Err(invalid(format!(
                "router of {} rows for {} experts (gated shared expert {gated}), routing \
                 for {} tokens (decode: 1)",
                w.rows, spec.n_experts, out.tokens
            )));
        }
        let (kind, flags) = route_params(spec, logits, rows, logit_bias, selection_bias, out)?;
        let mode = MvMode {
            norm: true,
            eps: input.eps,
            ..Default::default()
        };
        let (wg, per_group) = ctx.tuning().mv_shape(false);
        let shared_ok = fused_router_shared_bytes(wg as u64)
            <= ctx.info().max_compute_shared_memory_size as u64;
        let kernel = Kernel::mvr_for(ty).filter(|_| fuse && shared_ok && w.pieces.len() == 1);
        let Some(kernel) = kernel else {
            let mv = Mv::new(ctx, ty, w, k, input.x, logits, 0, Some(input.gam), mode)?;
            let route = MoeRoute::new(ctx, spec, logits, logit_bias, selection_bias, out)?;
            return Ok(MoeRouter {
                fused: None,
                split: Some((mv, route)),
                _count: None,
            });
        };
        if k == 0 || ty.row_bytes(k) != Some(w.row_bytes) {
            return Err(invalid(format!(
                "router rows of {} bytes do not hold {k} elements of {ty}",
                w.row_bytes
            )));
        }
        if (Kernel::mv_is_fast(ty) && !k.is_multiple_of(4))
            || input.x.size() < k * 4
            || input.gam.size() < k * 4
        {
            return Err(invalid(format!(
                "router mat-vec over {k} elements of {ty}: bad length or buffers too small"
            )));
        }
        let count = ctx.upload(&[0u8; 4])?;
        let sel = selection_bias.filter(|_| flags & ROUTE_SEL_BIAS != 0);
        let piece = &w.pieces[0];
        let binding = ctx.bind(
            kernel,
            &[
                &piece.buffer,
                input.x,
                logits,
                input.gam,
                logit_bias.unwrap_or(logits),
                sel.unwrap_or(logits),
                &out.ids,
                &out.weights,
                &count,
            ],
        )?;
        // Profiling switch (wrong results): `mv_debug` bit 2 skips the routing after the
        // logits.
        let no_route = if mv_debug() & 4 != 0 {
            MV_DBG_NOTAIL
        } else {
            0
        };
        let push = push_words(&[
            u32_of(k, "k")?,
            u32_of(piece.rows, "rows")?,
            0,
            MV_NORM | no_route,
            input.eps.to_bits(),
            0,
            spec.n_experts as u32,
            spec.n_used as u32,
            kind,
            flags,
            spec.scale.to_bits(),
        ]);
        Ok(MoeRouter {
            fused: Some((binding, push, piece.rows.div_ceil(per_group as u64))),
            split: None,
            _count: Some(count),
        })
    }

    /// Whether the routing runs in the router mat-vec's dispatch.
    pub fn fused(&self) -> bool {
        self.fused.is_some()
    }

    /// Dispatches [`MoeRouter::record`] makes.
    pub fn dispatches(&self) -> usize {
        match (&self.fused, &self.split) {
            (Some(_), _) => 1,
            (None, Some((mv, _))) => mv.dispatches() + 1,
            (None, None) => 0,
        }
    }

    /// Records the router (no barrier after).
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        self.record_logits(r)?;
        self.record_route(r)
    }

    /// The first dispatch (the logits; fused: the routing too), no barrier after.
    fn record_logits(&self, r: &mut Recorder<'_>) -> Result<()> {
        if let Some((b, push, groups)) = &self.fused {
            return r.dispatch(b, push, *groups);
        }
        match &self.split {
            Some((mv, _)) => mv.record(r),
            None => Ok(()),
        }
    }

    /// The rest (split: a barrier, the mark `moe_router` and the routing), no barrier
    /// after.
    fn record_route(&self, r: &mut Recorder<'_>) -> Result<()> {
        if let Some((_, route)) = &self.split {
            r.barrier();
            r.mark("moe_router");
            route.record(r)?;
        }
        Ok(())
    }
}

/// One token's routing as [`router_host`] reads it back: ids and weights.
pub type HostRouting = (Vec<u32>, Vec<f32>);

/// Entries past a token's that [`router_host`] gives its routing buffers, filled with
/// [`ROUTER_HOST_SENTINEL`] (ids) and its f32 bits (weights): the router must leave them.
pub const ROUTER_HOST_EXTRA: usize = 4;
pub const ROUTER_HOST_SENTINEL: u32 = 0x7f7f_7f7f;

/// Runs a [`MoeRouter`] on host data (`w`: the router's f32 rows, each `x` of `xs` and
/// `gam` `k` values), one replay of the same recording per `x` (written into the input
/// buffer before it). Returns the ids and weights of every slot and of
/// [`ROUTER_HOST_EXTRA`] entries past them after each replay, and whether the router ran
/// fused.
#[allow(clippy::too_many_arguments)]
pub fn router_host(
    ctx: &Context,
    spec: &RouterSpec,
    w: &[f32],
    xs: &[Vec<f32>],
    gam: &[f32],
    eps: f32,
    logit_bias: Option<&[f32]>,
    selection_bias: Option<&[f32]>,
    fuse: bool,
) -> Result<(Vec<HostRouting>, bool)> {
    let k = gam.len() as u64;
    let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let wt = ctx.upload_rows(&bytes, k * 4)?;
    let xb = ctx.create_buffer(k * 4, MemoryKind::Device)?;
    let gb = ctx.upload_f32(gam)?;
    let up = |b: Option<&[f32]>| b.map(|b| ctx.upload_f32(b)).transpose();
    let (bias, sel) = (up(logit_bias)?, up(selection_bias)?);
    let shared = spec.shared != SharedSlot::None;
    let slots = (spec.n_used + u64::from(shared)) as usize;
    let total = slots + ROUTER_HOST_EXTRA;
    let fill = ROUTER_HOST_SENTINEL.to_le_bytes().repeat(total);
    let out = Routing {
        ids: ctx.upload(&fill)?,
        weights: ctx.upload(&fill)?,
        n_used: spec.n_used,
        shared,
        tokens: 1,
    };
    let logits = ctx.create_buffer(wt.rows * 4, MemoryKind::Device)?;
    let input = RouterInput {
        x: &xb,
        gam: &gb,
        eps,
    };
    let op = MoeRouter::new(
        ctx,
        spec,
        GgmlType::F32,
        &wt,
        k,
        input,
        &logits,
        bias.as_ref(),
        sel.as_ref(),
        &out,
        fuse,
    )?;
    let rec = ctx.record(|r| op.record(r))?;
    let mut res = Vec::with_capacity(xs.len());
    for x in xs {
        if x.len() != gam.len() {
            return Err(invalid(
                "router input and norm weights of different lengths".into(),
            ));
        }
        let xv: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        ctx.write_buffer(&xb, 0, &xv)?;
        ctx.submit(&rec)?;
        let ids = ctx.read_buffer(&out.ids, 0, total as u64 * 4)?;
        let ids = ids
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        res.push((ids, ctx.read_f32(&out.weights, total)?));
    }
    Ok((res, op.fused()))
}

/// A stacked expert tensor on the device: `n` experts of `rows` rows of `k` elements of
/// `ty` (gate|up: `rows` = 2 ff, interleaved), every piece of `t` holding whole experts.
pub struct Experts {
    pub ty: GgmlType,
    pub n: u64,
    pub k: u64,
    /// Weight rows per expert.
    pub rows: u64,
    /// Rows are (gate, up) pairs.
    pub glu: bool,
    pub t: DeviceTensor,
    /// `[n][rows]` f32, when the experts have biases.
    pub bias: Option<Buffer>,
}

impl Experts {
    /// Uploads `w` (up-only or down experts).
    pub fn upload(ctx: &Context, w: &ExpertWeights) -> Result<Experts> {
        let mats = [w.data.as_slice()];
        let biases = [w.bias.as_deref()];
        Experts::stack(ctx, w.ty, w.n, w.rows, w.cols, &mats, &biases, &w.name)
    }

    /// Uploads gate and up experts row-interleaved.
    pub fn upload_glu(ctx: &Context, gate: &ExpertWeights, up: &ExpertWeights) -> Result<Experts> {
        if (gate.ty, gate.n, gate.rows, gate.cols) != (up.ty, up.n, up.rows, up.cols) {
            return Err(invalid(format!(
                "gate and up experts of different types or shapes ({} {}, {} {})",
                gate.name, gate.ty, up.name, up.ty
            )));
        }
        let mats = [gate.data.as_slice(), up.data.as_slice()];
        let biases = [gate.bias.as_deref(), up.bias.as_deref()];
        Experts::stack(
            ctx, gate.ty, gate.n, gate.rows, gate.cols, &mats, &biases, &gate.name,
        )
    }

    /// One dense weight as a one-expert tensor (a shared expert's up or down).
    pub fn from_weight(ctx: &Context, w: &Weight) -> Result<Experts> {
        let mats = [w.bytes()];
        let biases = [w.bias.as_deref()];
        Experts::stack(ctx, w.ty, 1, w.rows, w.cols, &mats, &biases, &w.name)
    }

    /// Dense gate and up weights as a one-expert gate|up tensor (a shared expert's).
    pub fn from_glu(ctx: &Context, gate: &Weight, up: &Weight) -> Result<Experts> {
        if (gate.ty, gate.rows, gate.cols) != (up.ty, up.rows, up.cols) {
            return Err(invalid(format!(
                "gate and up projections of different types or shapes ({} {}, {} {})",
                gate.name, gate.ty, up.name, up.ty
            )));
        }
        let mats = [gate.bytes(), up.bytes()];
        let biases = [gate.bias.as_deref(), up.bias.as_deref()];
        Experts::stack(
            ctx, gate.ty, 1, gate.rows, gate.cols, &mats, &biases, &gate.name,
        )
    }

    /// Bytes of the weights (every expert).
    pub fn bytes(&self) -> u64 {
        self.t.rows * self.t.row_bytes
    }

    /// Outputs per expert (rows, or row pairs of a gate|up tensor).
    pub fn outputs(&self) -> u64 {
        if self.glu {
            self.rows / 2
        } else {
            self.rows
        }
    }

    /// Stacks `mats` (each `n` matrices of `rows` x `cols`), interleaving their rows when
    /// there are two, into pieces of whole experts.
    #[allow(clippy::too_many_arguments)]
    fn stack(
        ctx: &Context,
        ty: GgmlType,
        n: usize,
        rows: usize,
        cols: usize,
        mats: &[&[u8]],
        biases: &[Option<&[f32]>],
        name: &str,
    ) -> Result<Experts> {
        let rb = ty
            .row_bytes(cols as u64)
            .ok_or_else(|| invalid(format!("{name}: rows of {cols} {ty}")))?
            as usize;
        if n == 0 || rows == 0 || mats.iter().any(|m| m.len() != n * rows * rb) {
            return Err(invalid(format!(
                "{name}: {n} experts of {rows} x {cols} {ty} do not match its size"
            )));
        }
        if biases.iter().flatten().any(|b| b.len() != n * rows) {
            return Err(invalid(format!("{name}: bias of the wrong length")));
        }
        let m = mats.len();
        let rpe = m * rows;
        let eb = (rpe * rb) as u64;
        let per_piece = ctx.max_buffer_bytes().saturating_sub(PIECE_PAD) / eb;
        if per_piece == 0 {
            return Err(invalid(format!(
                "{name}: one expert ({eb} bytes) is larger than a buffer may be on {} ({} \
                 bytes)",
                ctx.info().name,
                ctx.max_buffer_bytes()
            )));
        }
        const STAGE: usize = 16 << 20;
        let mut pieces = Vec::new();
        let mut e0 = 0usize;
        while e0 < n {
            let ne = (per_piece as usize).min(n - e0);
            let buffer = ctx.create_buffer(ne as u64 * eb + PIECE_PAD, MemoryKind::Device)?;
            if m == 1 {
                let b = &mats[0][e0 * rows * rb..(e0 + ne) * rows * rb];
                ctx.write_buffer(&buffer, 0, b)?;
            } else {
                let mut stage = Vec::with_capacity(STAGE.min(ne * rpe * rb));
                let mut at = 0u64;
                for e in e0..e0 + ne {
                    for r in 0..rows {
                        let o = (e * rows + r) * rb;
                        for mat in mats {
                            stage.extend_from_slice(&mat[o..o + rb]);
                        }
                    }
                    if stage.len() >= STAGE || e + 1 == e0 + ne {
                        ctx.write_buffer(&buffer, at, &stage)?;
                        at += stage.len() as u64;
                        stage.clear();
                    }
                }
            }
            pieces.push(TensorPiece {
                buffer,
                first_row: (e0 * rpe) as u64,
                rows: (ne * rpe) as u64,
            });
            e0 += ne;
        }
        let bias = if biases.iter().any(|b| b.is_some()) {
            let mut v = Vec::with_capacity(n * rpe);
            for e in 0..n {
                for r in 0..rows {
                    for b in biases {
                        v.push(b.map_or(0.0, |b| b[e * rows + r]));
                    }
                }
            }
            Some(ctx.upload_f32(&v)?)
        } else {
            None
        };
        Ok(Experts {
            ty,
            n: n as u64,
            k: cols as u64,
            rows: rpe as u64,
            glu: m == 2,
            t: DeviceTensor {
                rows: (n * rpe) as u64,
                row_bytes: rb as u64,
                pieces,
            },
            bias,
        })
    }
}

/// The input of an expert mat-vec.
pub enum ExpertInput<'a> {
    /// f32 values; `gam`: norm the input by RMSNorm with these weights first (only for
    /// [`ExpertUp`], whose slots share one input).
    F32 {
        x: &'a Buffer,
        gam: Option<&'a Buffer>,
    },
    /// Int8 blocks (`QuantX`, or a mat-vec's tail); with sums of squares, normed by the
    /// mat-vec (`MV_XNORM`, only for [`ExpertUp`]). For Q4_0, Q8_0, Q4_K, Q6_K, MXFP4.
    Q8(&'a Q8Acts<'a>),
}

/// Dispatches of one expert op, one per weight piece.
struct ExpertDispatches {
    parts: Vec<(Binding, Vec<u8>, u64)>,
    /// A barrier between pieces (they add into the same outputs).
    serial: bool,
}

impl ExpertDispatches {
    fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        for (i, (b, push, groups)) in self.parts.iter().enumerate() {
            if self.serial && i > 0 {
                r.barrier();
            }
            r.dispatch(b, push, *groups)?;
        }
        Ok(())
    }
}

/// The settings an expert op passes to its kernel.
struct Call<'a> {
    w: &'a Experts,
    routing: &'a Routing,
    slots: Slots,
    input: &'a ExpertInput<'a>,
    eps: f32,
    y: &'a Buffer,
    /// `MV_*` flags (besides the input's and the tail's).
    flags: u32,
    sum: bool,
    alpha: f32,
    limit: f32,
    tail: Option<&'a MvTail<'a>>,
}

const MV_NORM: u32 = 1;
const MV_ADD: u32 = 2;
const MV_GELU: u32 = 8;
const MV_TAIL: u32 = 32;
const MV_TAIL_NORM: u32 = 64;
const MV_XNORM: u32 = 128;
const MV_RELU2: u32 = 256;
const MV_SUM: u32 = 512;
const MV_BIAS: u32 = 1024;
const MV_CLAMP: u32 = 2048;
/// mv.glsl's profiling switch (the fused router: no routing); the expert kernels'
/// MV_CLAMP has the same bit.
const MV_DBG_NOTAIL: u32 = 2048;
/// `mvq_expert.glsl`'s per-workgroup block tail (subgroup-per-output layout only).
const MV_BLKT: u32 = 4096;

fn build(ctx: &Context, c: &Call<'_>) -> Result<ExpertDispatches> {
    let w = c.w;
    let (ty, k, rpe) = (w.ty, w.k, w.rows);
    if k == 0 || ty.row_bytes(k) != Some(w.t.row_bytes) {
        return Err(invalid(format!(
            "expert rows of {} bytes do not hold {k} elements of {ty}",
            w.t.row_bytes
        )));
    }
    let s = c.slots;
    let tokens = c.routing.tokens;
    let routed = c.routing.per_token();
    if s.count == 0 || s.first + s.count > routed {
        return Err(invalid(format!(
            "slots {} .. {} of a routing with {routed}",
            s.first,
            s.first + s.count
        )));
    }
    // Inputs: the sum reads one per slot; the others one per token (shared by the
    // token's slots), `k` apart. Outputs: the sum's `rpe` per token, the others' one row
    // per slot.
    let (n_in, x_stride, x_div) = match (c.sum, tokens) {
        (true, _) => (tokens * s.count, k, 1),
        (false, 1) => (1, 0, 1),
        (false, _) => (tokens, k, s.count),
    };
    let (outs, y_stride) = if c.sum {
        (tokens * rpe, rpe)
    } else {
        (tokens * s.count * w.outputs(), w.outputs())
    };
    if c.y.size() < outs * 4 {
        return Err(invalid(format!(
            "expert mat-vec of {outs} outputs: output buffer too small"
        )));
    }
    let mut flags = c.flags;
    if w.bias.is_some() {
        flags |= MV_BIAS;
    }
    let glu = w.glu;
    let (kernel, q8) = match c.input {
        ExpertInput::F32 { x, gam } => {
            let kern = mvx_kernel(ty, glu)
                .ok_or_else(|| invalid(format!("no expert mat-vec for tensor type {ty}")))?;
            if Kernel::mv_is_fast(ty) && !k.is_multiple_of(4) {
                return Err(invalid(format!("expert mat-vec over {k} elements of {ty}")));
            }
            if x.size() < n_in * k * 4 || gam.is_some_and(|g| g.size() < k * 4) {
                return Err(invalid(format!(
                    "expert mat-vec over {n_in} x {k} inputs: buffers too small"
                )));
            }
            if gam.is_some() {
                if c.sum {
                    return Err(invalid(
                        "the expert sum reads one input per slot: it cannot norm them".into(),
                    ));
                }
                flags |= MV_NORM;
            }
            (kern, None)
        }
        ExpertInput::Q8(a) => {
            let kern = mvqx_kernel(ty, glu, ctx.tuning().int8_dot).ok_or_else(|| {
                invalid(format!(
                    "no int8-activation expert mat-vec for tensor type {ty}"
                ))
            })?;
            if !k.is_multiple_of(32) || a.q.size() < n_in * k || a.d.size() < n_in * k / 8 {
                return Err(invalid(format!(
                    "expert mat-vec over {n_in} x {k} int8 inputs: not whole blocks of 32 or \
                     buffers too small"
                )));
            }
            if let Some(ss) = a.ss {
                if c.sum || ss.size() < n_in * k / 8 {
                    return Err(invalid(
                        "sums of squares: only for one shared input, k / 32 of them".into(),
                    ));
                }
                flags |= MV_XNORM;
            }
            (kern, Some(*a))
        }
    };
    let n_next = match c.tail {
        Some(t) => {
            let ok_layout = if c.sum {
                t.n <= outs
            } else {
                t.n == outs && w.outputs().is_multiple_of(32)
            };
            let n_ss = t.gam.is_some() && t.out.ss.is_none_or(|s| s.size() < t.n / 8);
            if q8.is_none()
                || !ok_layout
                || t.n == 0
                || !t.n.is_multiple_of(32)
                || t.out.q.size() < t.n
                || t.out.d.size() < t.n / 8
                || n_ss
                || t.gam.is_some_and(|g| g.size() < t.n * 4)
                || t.count.size() < t.n / 8
            {
                return Err(invalid(format!(
                    "quantizing {} expert outputs for the next mat-vec: bad sizes (int8 \
                     inputs only; per-slot outputs in whole blocks of 32)",
                    t.n
                )));
            }
            t.n
        }
        None => 0,
    };
    let sg = q8.is_some() && ctx.tuning().mvx_subgroup;
    let rb = if q8.is_some() {
        ctx.tuning().mvqx_shape().1
    } else {
        ctx.tuning().mvx_shape().1
    } as u64;
    // The subgroup layout's tails run per workgroup where its outputs (a power of two,
    // dividing 32) lie in one block of 32: every slot's (or token's) outputs whole blocks.
    let per_slot_outs = if c.sum { rpe } else { w.outputs() };
    if sg && c.tail.is_some() && per_slot_outs.is_multiple_of(32) && 32 % rb == 0 {
        flags |= MV_BLKT;
    }
    let nr = if glu { 2 * rb } else { rb };
    let gpe = rpe.div_ceil(nr);
    let groups = if c.sum {
        tokens * gpe
    } else {
        tokens * s.count * gpe
    };
    let bias = w.bias.as_ref().unwrap_or(&c.routing.weights);
    let last = w.t.pieces.len().saturating_sub(1);
    let mut parts = Vec::with_capacity(w.t.pieces.len());
    for (pi, piece) in w.t.pieces.iter().enumerate() {
        if !piece.first_row.is_multiple_of(rpe) || !piece.rows.is_multiple_of(rpe) {
            return Err(invalid("expert pieces must hold whole experts".into()));
        }
        let mut f = flags;
        if c.sum && pi > 0 {
            f |= MV_ADD;
        }
        let tail = c.tail.filter(|_| !c.sum || pi == last);
        if let Some(t) = tail {
            f |= MV_TAIL;
            if t.gam.is_some() {
                f |= MV_TAIL_NORM;
            }
        }
        let expert = [
            u32_of(rpe, "rows per expert")?,
            u32_of(s.count, "slots")?,
            u32_of(s.first, "first slot")?,
            u32_of(piece.first_row / rpe, "first expert")?,
            u32_of(piece.rows / rpe, "experts")?,
            u32_of(x_stride, "input stride")?,
            u32_of(y_stride, "output stride")?,
            c.alpha.to_bits(),
            c.limit.to_bits(),
            u32_of(x_div, "slots per input")?,
            u32_of(routed, "routing entries per token")?,
        ];
        let ids = &c.routing.ids;
        let wts = &c.routing.weights;
        let (b, mut words) = match (c.input, q8) {
            (ExpertInput::F32 { x, gam }, None) => {
                let b = ctx.bind(
                    kernel,
                    &[&piece.buffer, x, c.y, gam.unwrap_or(x), ids, wts, bias],
                )?;
                let words = vec![
                    u32_of(k, "k")?,
                    u32_of(piece.rows, "rows")?,
                    0,
                    f,
                    c.eps.to_bits(),
                    0,
                ];
                (b, words)
            }
            (ExpertInput::Q8(_), Some(a)) => {
                let xs = a.ss.unwrap_or(a.d);
                let bufs: [&Buffer; 13] = match tail {
                    Some(t) => [
                        &piece.buffer,
                        a.q,
                        a.d,
                        c.y,
                        t.count,
                        t.out.q,
                        t.out.d,
                        t.gam.unwrap_or(c.y),
                        t.out.ss.unwrap_or(t.out.d),
                        xs,
                        ids,
                        wts,
                        bias,
                    ],
                    None => [
                        &piece.buffer,
                        a.q,
                        a.d,
                        c.y,
                        c.y,
                        a.q,
                        a.d,
                        c.y,
                        a.d,
                        xs,
                        ids,
                        wts,
                        bias,
                    ],
                };
                let b = ctx.bind(kernel, &bufs)?;
                let words = vec![
                    u32_of(k, "k")?,
                    u32_of(piece.rows, "rows")?,
                    0,
                    f,
                    0,
                    u32_of(if tail.is_some() { n_next } else { 0 }, "outputs")?,
                    c.eps.to_bits(),
                ];
                (b, words)
            }
            _ => return Err(invalid("expert input changed kind".into())),
        };
        words.extend(expert);
        parts.push((b, push_words(&words), groups));
    }
    Ok(ExpertDispatches {
        parts,
        serial: c.sum,
    })
}

/// The chosen experts' first projection: per slot `s` of `slots`, `h[s * ff + i]` =
/// `act(gate_i · in + b) * (up_i · in + b)` over a gate|up tensor (SwiGLU, GELU-tanh GLU,
/// gpt-oss's clamped SwiGLU), or `relu(up_i · in + b)²` over an up-only one (relu²).
/// Every slot reads the same input. One dispatch per piece of `w`, `slots.count *
/// ceil(ff / rows per workgroup)` workgroups each (those of experts in other pieces exit).
pub struct ExpertUp(ExpertDispatches);

impl ExpertUp {
    /// `eps`: the input norm's (`ExpertInput::F32` with `gam`, or int8 with sums of
    /// squares). `tail`: also quantize `h` (`tail.n` = slots x ff, ff a multiple of 32) for
    /// the down projection (int8 inputs only; `tail.gam` None).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &Context,
        w: &Experts,
        routing: &Routing,
        slots: Slots,
        input: &ExpertInput<'_>,
        act: Activation,
        eps: f32,
        h: &Buffer,
        tail: Option<&MvTail<'_>>,
    ) -> Result<ExpertUp> {
        let (flags, alpha, limit) = match (w.glu, act) {
            (true, Activation::SwiGlu) => (0, 0.0, 0.0),
            (true, Activation::GeluTanhGlu) => (MV_GELU, 0.0, 0.0),
            (true, Activation::ClampedSwiGlu { alpha, limit }) => (MV_CLAMP, alpha, limit),
            (false, Activation::Relu2) => (MV_RELU2, 0.0, 0.0),
            (glu, act) => {
                return Err(invalid(format!(
                    "expert activation {act:?} over {} experts",
                    if glu { "gate|up" } else { "up-only" }
                )))
            }
        };
        let call = Call {
            w,
            routing,
            slots,
            input,
            eps,
            y: h,
            flags,
            sum: false,
            alpha,
            limit,
            tail,
        };
        build(ctx, &call).map(ExpertUp)
    }

    /// Records the op (one dispatch per piece, no barrier after).
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        self.0.record(r)
    }

    pub fn dispatches(&self) -> usize {
        self.0.parts.len()
    }
}

/// The chosen experts' down projection, mixed: `y[r] (+)= Σ_s w_s (down_{e_s}[r] · h_s +
/// b)` over the slots `s` of `slots`, `h_s` at element `s * ff` of the input (f32 or
/// int8 blocks). One workgroup makes `rows per workgroup` outputs of every slot, so the
/// sum needs no atomics. One dispatch per piece of `w` (`ceil(d / rows per workgroup)`
/// workgroups), a barrier between pieces (the later add into the earlier's outputs).
pub struct ExpertDown(ExpertDispatches);

impl ExpertDown {
    /// `add`: add to y (the residual); `tail`: quantize y for the next mat-vec (int8
    /// inputs only; on the last piece's dispatch).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &Context,
        w: &Experts,
        routing: &Routing,
        slots: Slots,
        input: &ExpertInput<'_>,
        y: &Buffer,
        add: bool,
        tail: Option<&MvTail<'_>>,
    ) -> Result<ExpertDown> {
        if w.glu {
            return Err(invalid("a down projection over gate|up experts".into()));
        }
        let call = Call {
            w,
            routing,
            slots,
            input,
            eps: 0.0,
            y,
            flags: MV_SUM | if add { MV_ADD } else { 0 },
            sum: true,
            alpha: 0.0,
            limit: 0.0,
            tail,
        };
        build(ctx, &call).map(ExpertDown)
    }

    /// Records the op (one dispatch per piece with barriers between, none after).
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        self.0.record(r)
    }

    pub fn dispatches(&self) -> usize {
        self.0.parts.len()
    }
}

/// A MoE block's weights on the device, as [`MoeFfn`] runs them.
pub struct MoeDevice {
    pub spec: MoeSpec,
    pub d_model: u64,
    /// The router's rows (`n_experts`, then the shared expert's gate row if any).
    pub router: DeviceTensor,
    pub router_ty: GgmlType,
    /// The router's bias (`n_experts` f32), if it has one.
    pub logit_bias: Option<Buffer>,
    /// `exp_probs_b` (`n_experts` f32), if any.
    pub selection_bias: Option<Buffer>,
    /// Gate|up experts (up-only for ungated activations) and down experts.
    pub up: Experts,
    pub down: Experts,
    /// The shared expert as one-expert tensors, and its activation (the CPU's: relu² for
    /// relu² blocks, else SwiGLU).
    pub shared: Option<(Experts, Experts, Activation)>,
    pub shared_gate: bool,
}

impl MoeDevice {
    /// Bytes of every weight of the block.
    pub fn bytes(&self) -> u64 {
        let sh = self
            .shared
            .as_ref()
            .map_or(0, |(u, d, _)| u.bytes() + d.bytes());
        self.router.rows * self.router.row_bytes + self.up.bytes() + self.down.bytes() + sh
    }

    pub fn upload(ctx: &Context, spec: &MoeSpec, w: &MoeWeights) -> Result<MoeDevice> {
        let d = w.router.cols;
        let r = &w.router;
        if r.rows != spec.n_experts || w.up.n != spec.n_experts || w.down.rows != d {
            return Err(invalid(format!(
                "MoE weights do not match the spec ({} experts, router {} x {d})",
                spec.n_experts, r.rows
            )));
        }
        let rb =
            r.ty.row_bytes(d as u64)
                .ok_or_else(|| invalid(format!("{}: rows of {d} {}", r.name, r.ty)))?;
        let router = match &w.shared_gate {
            Some(g) if g.ty != r.ty || g.cols != d || g.rows != 1 || g.bias.is_some() => {
                return Err(invalid(format!(
                    "shared expert gate {} ({}) unlike the router ({})",
                    g.name, g.ty, r.ty
                )))
            }
            Some(g) => ctx.upload_rows_concat(&[r.bytes(), g.bytes()], rb)?,
            None => ctx.upload_rows(r.bytes(), rb)?,
        };
        let vec_buf = |v: &Option<Vec<f32>>| v.as_ref().map(|v| ctx.upload_f32(v)).transpose();
        let up = match &w.gate {
            Some(g) => Experts::upload_glu(ctx, g, &w.up)?,
            None => Experts::upload(ctx, &w.up)?,
        };
        let shared = match (&w.shared, spec.shared_d_ff) {
            (Some(sh), Some(_)) => {
                let act = match spec.act {
                    Activation::Relu2 => Activation::Relu2,
                    _ => Activation::SwiGlu,
                };
                let u = match &sh.gate {
                    Some(g) => Experts::from_glu(ctx, g, &sh.up)?,
                    None => Experts::from_weight(ctx, &sh.up)?,
                };
                Some((u, Experts::from_weight(ctx, &sh.down)?, act))
            }
            (None, None) => None,
            _ => return Err(invalid("shared expert weights unlike the spec".into())),
        };
        Ok(MoeDevice {
            spec: spec.clone(),
            d_model: d as u64,
            router,
            router_ty: r.ty,
            logit_bias: vec_buf(&r.bias)?,
            selection_bias: vec_buf(&w.selection_bias)?,
            up,
            down: Experts::upload(ctx, &w.down)?,
            shared_gate: w.shared_gate.is_some() && shared.is_some(),
            shared,
        })
    }
}

/// Where a [`MoeFfn`] reads and writes.
pub struct MoeIo<'a> {
    /// The residual stream (f32, `d_model`); the block's input is `rmsnorm(x) * gam`.
    pub x: &'a Buffer,
    pub gam: &'a Buffer,
    pub eps: f32,
    /// `y (+)= moe(input)`; may be `x` with `add` (the residual add in place).
    pub y: &'a Buffer,
    pub add: bool,
    /// The block's input already in int8 (`d_model` values), as the mat-vec before left
    /// it ([`MvTail`] with the block's norm weights: `x * gam` with per-block sums of
    /// squares in `ss`, the experts applying 1 / rms themselves, `MV_XNORM`), or normed
    /// already (no `ss`). The gate|up projections that run on int8 read it instead of
    /// the block quantizing x itself ([`MoeDevice::int8_input`] says whether any does).
    pub input: Option<Q8Acts<'a>>,
    /// Quantize y for the next mat-vec (where the last down projection runs on int8:
    /// [`MoeDevice::int8_output`]).
    pub next: Option<&'a MvTail<'a>>,
    /// Route in the router mat-vec's dispatch ([`MoeRouter`]); off: the router
    /// mat-vec, then `moe_route` (the earlier sequence, `CALDERA_VK_MOE_UNFUSED=1`).
    pub fuse_route: bool,
}

/// A whole MoE block for one token, every op recorded once: the router ([`MoeRouter`]:
/// the router mat-vec on the f32 input, the norm folded in, and the routing, fused into
/// one dispatch or two) beside `quant_x` of the normed input (when the experts take int8
/// and [`MoeIo::input`] does not bring it), the routed and shared gate|up, then the
/// routed and the shared down projections adding into y (the last one quantizing y for
/// the next mat-vec with [`MoeIo::next`]); each phase behind a barrier. Dispatches:
/// router (1 fused, 2 not), (`quant_x`,) gate|up, down: 3-5, 5-7 with a shared expert, +
/// 1 per extra weight piece, + a `quant_x` of `h` where a gate|up on f32 feeds an int8
/// down.
pub struct MoeFfn {
    router: MoeRouter,
    quant: Option<QuantX>,
    up: ExpertUp,
    shared_up: Option<ExpertUp>,
    /// quant_x of h where the gate|up runs on f32 but the down on int8.
    quant_h: Vec<QuantX>,
    down: ExpertDown,
    shared_down: Option<ExpertDown>,
    _scratch: Vec<Buffer>,
    _routing: Routing,
}

/// The int8 form of `n` activations (a multiple of 32): (q, d).
fn q8_buffers(ctx: &Context, n: u64) -> Result<(Buffer, Buffer)> {
    Ok((
        ctx.create_buffer(n, MemoryKind::Device)?,
        ctx.create_buffer(n / 8, MemoryKind::Device)?,
    ))
}

/// Whether the decode mat-vec of experts `e` over inputs of `k` runs on int8 (`q8`: the
/// context quantizes activations; MXFP4 always).
fn expert_int8(e: &Experts, k: u64, q8: bool) -> bool {
    supports_q8(e.ty) && (q8 || mvx_kernel(e.ty, false).is_none()) && k.is_multiple_of(32)
}

impl MoeDevice {
    /// Whether a decode block ([`MoeFfn`] with `q8`) reads its input in int8: some
    /// gate|up (routed or shared) runs on int8 activations.
    pub fn int8_input(&self, q8: bool) -> bool {
        let d = self.d_model;
        expert_int8(&self.up, d, q8)
            || self
                .shared
                .as_ref()
                .is_some_and(|s| expert_int8(&s.0, d, q8))
    }

    /// Whether a decode block's last down projection (the shared expert's, else the
    /// routed one) runs on int8, so that it can quantize the block's output
    /// ([`MoeIo::next`]).
    pub fn int8_output(&self, q8: bool) -> bool {
        match &self.shared {
            Some((su, sd, _)) => expert_int8(sd, su.outputs(), q8),
            None => expert_int8(&self.down, self.up.outputs(), q8),
        }
    }
}

impl MoeFfn {
    /// `q8`: run the experts on int8 activations where their type allows (MXFP4 always).
    pub fn new(ctx: &Context, m: &MoeDevice, io: &MoeIo<'_>, q8: bool) -> Result<MoeFfn> {
        let spec = &m.spec;
        let d = m.d_model;
        let n = spec.n_experts as u64;
        let shared = m.shared.is_some();
        let routing = Routing::new(ctx, spec.n_used as u64, shared)?;
        let mut scratch = Vec::new();
        let logits = ctx.create_buffer((n + 1) * 4, MemoryKind::Device)?;
        let rs = RouterSpec::of(spec, m.shared_gate);
        let input = RouterInput {
            x: io.x,
            gam: io.gam,
            eps: io.eps,
        };
        let router = MoeRouter::new(
            ctx,
            &rs,
            m.router_ty,
            &m.router,
            d,
            input,
            &logits,
            m.logit_bias.as_ref(),
            m.selection_bias.as_ref(),
            &routing,
            io.fuse_route,
        )?;
        scratch.push(logits);
        // The normed input as int8, for whichever gate|up takes it: as the op before
        // left it, or quantized here. (MXFP4 has int8 kernels only.)
        let int8 = |e: &Experts, k: u64| expert_int8(e, k, q8);
        let wants_q8 = |e: &Experts| int8(e, d);
        let any_q8_in = m.int8_input(q8);
        let (xq, xd) = q8_buffers(ctx, d.next_multiple_of(32))?;
        let x_acts = match io.input {
            Some(a) => {
                if a.q.size() < d || a.d.size() < d / 8 || a.ss.is_some_and(|s| s.size() < d / 8) {
                    return Err(invalid(format!(
                        "the MoE block's int8 input of {d} values: buffers too small"
                    )));
                }
                a
            }
            None => Q8Acts {
                q: &xq,
                d: &xd,
                ss: None,
            },
        };
        let quant = if any_q8_in && io.input.is_none() {
            Some(QuantX::new(ctx, d, io.x, Some(io.gam), io.eps, &x_acts)?)
        } else {
            None
        };
        let x_f32 = ExpertInput::F32 {
            x: io.x,
            gam: Some(io.gam),
        };
        let x_q8 = ExpertInput::Q8(&x_acts);
        let mut quant_h = Vec::new();
        // One gate|up + down pair over `slots`: returns the two ops.
        let mut pair = |up_w: &Experts,
                        down_w: &Experts,
                        act: Activation,
                        slots: Slots,
                        add: bool,
                        last: bool,
                        scratch: &mut Vec<Buffer>|
         -> Result<(ExpertUp, ExpertDown)> {
            let ff = up_w.outputs();
            if down_w.k != ff || down_w.rows != d || up_w.k != d {
                return Err(invalid(format!(
                    "expert shapes: gate|up {} x {}, down {} x {}",
                    ff, up_w.k, down_w.rows, down_w.k
                )));
            }
            let hn = slots.count * ff;
            let h = ctx.create_buffer(hn * 4, MemoryKind::Device)?;
            let (hq, hd) = q8_buffers(ctx, hn.next_multiple_of(32))?;
            let count = ctx.upload(&vec![0u8; (hn.div_ceil(32) * 4) as usize])?;
            let h_acts = Q8Acts {
                q: &hq,
                d: &hd,
                ss: None,
            };
            let up_in = if wants_q8(up_w) { &x_q8 } else { &x_f32 };
            let down_q8 = int8(down_w, ff);
            let up_q8 = matches!(up_in, ExpertInput::Q8(_));
            let tail = MvTail {
                count: &count,
                out: Q8Acts {
                    q: &hq,
                    d: &hd,
                    ss: None,
                },
                gam: None,
                n: hn,
            };
            let up_tail = (down_q8 && up_q8).then_some(&tail);
            let up = ExpertUp::new(ctx, up_w, &routing, slots, up_in, act, io.eps, &h, up_tail)?;
            if down_q8 && !up_q8 {
                quant_h.push(QuantX::new(ctx, hn, &h, None, 0.0, &h_acts)?);
            }
            let h_f32 = ExpertInput::F32 { x: &h, gam: None };
            let h_q8 = ExpertInput::Q8(&h_acts);
            let down_in = if down_q8 { &h_q8 } else { &h_f32 };
            let next = io.next.filter(|_| last && down_q8);
            if io.next.is_some() && last && !down_q8 {
                return Err(invalid(
                    "quantizing the MoE output needs an int8 down projection".into(),
                ));
            }
            let down = ExpertDown::new(ctx, down_w, &routing, slots, down_in, io.y, add, next)?;
            scratch.extend([h, hq, hd, count]);
            Ok((up, down))
        };
        let (up, down) = pair(
            &m.up,
            &m.down,
            spec.act,
            routing.routed(),
            io.add,
            !shared,
            &mut scratch,
        )?;
        let (shared_up, shared_down) = match (&m.shared, routing.shared_slot()) {
            (Some((su, sd, act)), Some(slot)) => {
                let (u, dn) = pair(su, sd, *act, slot, true, true, &mut scratch)?;
                (Some(u), Some(dn))
            }
            _ => (None, None),
        };
        scratch.extend([xq, xd]);
        Ok(MoeFfn {
            router,
            quant,
            up,
            shared_up,
            quant_h,
            down,
            shared_down,
            _scratch: scratch,
            _routing: routing,
        })
    }

    /// Dispatches [`MoeFfn::record`] makes.
    pub fn dispatches(&self) -> usize {
        let opt = |o: Option<usize>| o.unwrap_or(0);
        self.router.dispatches()
            + usize::from(self.quant.is_some())
            + self.up.dispatches()
            + opt(self.shared_up.as_ref().map(ExpertUp::dispatches))
            + self.quant_h.len()
            + self.down.dispatches()
            + opt(self.shared_down.as_ref().map(ExpertDown::dispatches))
    }

    /// Whether the routing runs in the router mat-vec's dispatch.
    pub fn fused_route(&self) -> bool {
        self.router.fused()
    }

    /// Records the block (barriers between its phases, none after). With profiling on,
    /// the phases before the down projections get their own timestamps (`moe_router`
    /// when the router and the routing are two dispatches, `moe_route`, `moe_up`); the
    /// caller's mark after the block times the downs.
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        self.router.record_logits(r)?;
        if let Some(q) = &self.quant {
            q.record(r)?;
        }
        self.router.record_route(r)?;
        r.barrier();
        r.mark("moe_route");
        self.up.record(r)?;
        if let Some(u) = &self.shared_up {
            u.record(r)?;
        }
        if !self.quant_h.is_empty() {
            r.barrier();
            for q in &self.quant_h {
                q.record(r)?;
            }
        }
        r.barrier();
        r.mark("moe_up");
        self.down.record(r)?;
        if let Some(dn) = &self.shared_down {
            r.barrier();
            dn.record(r)?;
        }
        Ok(())
    }
}

/// Pairs per tile of the grouped expert matmul (`mmt.glsl`'s BN, `moe_group`'s TILE).
const GROUP_TILE: u64 = 64;
/// Weight rows per workgroup of the grouped expert matmul (`mmt.glsl`'s BM).
const GROUP_ROWS: u64 = 128;

/// Where [`MoeGroup`] writes in its group buffer (u32 words), for steps of up to
/// `tokens` tokens choosing `n_used` of up to `n_experts` experts: word 0 the number of
/// tiles; tile i (< `max_tiles`) at words 1 + 2i (its first pair in the list) and 2 + 2i
/// (expert | pairs in the tile << 16); the pair list (`tokens x n_used` words; pair q =
/// t * n_used + s) at `pairs_at`, grouped by expert in ascending order, by token within
/// one; expert e's first pair in the list at `offs_at + e` (and the total at `offs_at +
/// n_experts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupLayout {
    pub n_experts: u64,
    pub n_used: u64,
    pub tokens: u64,
    pub max_tiles: u64,
    pub pairs_at: u64,
    pub offs_at: u64,
    pub words: u64,
}

impl GroupLayout {
    pub fn new(n_experts: u64, n_used: u64, tokens: u64) -> GroupLayout {
        let pairs = tokens * n_used;
        // Σ_e ceil(c_e / 64) over the experts with pairs: at most (pairs + nz * 63) / 64.
        let max_tiles = (pairs + n_experts.min(pairs) * (GROUP_TILE - 1)) / GROUP_TILE;
        let pairs_at = 1 + 2 * max_tiles;
        let offs_at = pairs_at + pairs;
        GroupLayout {
            n_experts,
            n_used,
            tokens,
            max_tiles,
            pairs_at,
            offs_at,
            words: offs_at + n_experts + 1,
        }
    }
}

/// Groups a step's (token, routed slot) pairs by expert (`moe_group.comp`, one
/// workgroup) into a group buffer laid out as [`GroupLayout`] says, for the grouped
/// expert matmuls ([`ExpertMm`]). Deterministic: the pairs of an expert in token order.
pub struct MoeGroup {
    binding: Binding,
    push: Vec<u8>,
}

impl MoeGroup {
    /// `n_experts`: the block's (at most the layout's); `slots`: the routing slots it
    /// groups (the routed ones, or the shared expert's), `layout.n_used` of them;
    /// `step[0]`: the step's tokens.
    pub fn new(
        ctx: &Context,
        n_experts: u64,
        layout: &GroupLayout,
        routing: &Routing,
        slots: Slots,
        step: &Buffer,
        g: &Buffer,
    ) -> Result<MoeGroup> {
        if n_experts == 0
            || n_experts > layout.n_experts
            || n_experts > MAX_EXPERTS
            || slots.count != layout.n_used
            || slots.first + slots.count > routing.per_token()
            || routing.tokens > layout.tokens
            || g.size() < layout.words * 4
            || step.size() < 4
        {
            return Err(invalid(format!(
                "grouping {} experts per token of {n_experts} over {} tokens: layout or \
                 buffers do not match",
                routing.n_used, routing.tokens
            )));
        }
        let binding = ctx.bind(Kernel::MoeGroup, &[&routing.ids, step, g])?;
        let push = push_words(&[
            n_experts as u32,
            slots.count as u32,
            routing.per_token() as u32,
            u32_of(routing.tokens, "tokens")?,
            u32_of(layout.max_tiles, "tiles")?,
            u32_of(layout.pairs_at, "pair list")?,
            u32_of(layout.offs_at, "offsets")?,
            slots.first as u32,
        ]);
        Ok(MoeGroup { binding, push })
    }

    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        r.dispatch(&self.binding, &self.push, 1)
    }
}

/// What a grouped expert matmul ([`ExpertMm`]) makes of its rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MmxOut {
    /// The first projection: the activation of a gate|up (GLU) or up-only (relu²)
    /// tensor, `outputs` values per pair.
    Up(Activation),
    /// The down projection: each row (+ bias) times the pair's routing weight.
    Down,
}

const MMX_NOGAM: u32 = 64;
const MMX_GLU: u32 = 128;
const MMX_GELU: u32 = 256;
const MMX_CLAMP: u32 = 512;
const MMX_RELU2: u32 = 1024;
const MMX_BIAS: u32 = 2048;
const MMX_WEIGHT: u32 = 4096;

/// Whether experts `e` have a grouped expert matmul on this device.
pub fn mmx_supported(ctx: &Context, e: &Experts) -> bool {
    ctx.tuning().tiled_mm
        && e.n < (1 << 16)
        && Kernel::mmx_for(e.ty).is_some_and(|k| k.fits(ctx.info()))
}

/// The chosen experts' projection as a grouped matmul (`mmx_*`: `mmt.glsl` with
/// `MMT_EXPERT`) over the pairs [`MoeGroup`] grouped: each workgroup takes 128 rows of
/// one expert for a tile of up to 64 of its pairs, dequantizing each weight block once
/// for them all. Pair q reads its input at `x[(q / x_div) * ld_x ..]` (the up
/// projection: its token's row, normed by `gam`; the down: its own `h` row) and writes
/// its outputs at `y[q * ld_y ..]`. The dispatch is sized at record time for the most
/// tiles a step can have; workgroups past the step's exit. One dispatch per piece of
/// the expert tensor (workgroups of experts in other pieces exit; the pieces write
/// different outputs, so no barrier between them).
pub struct ExpertMm(ExpertDispatches);

impl ExpertMm {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &Context,
        w: &Experts,
        layout: &GroupLayout,
        g: &Buffer,
        routing: &Routing,
        slots: Slots,
        x: &Buffer,
        ld_x: u64,
        x_div: u64,
        gam: Option<&Buffer>,
        eps: f32,
        y: &Buffer,
        ld_y: u64,
        out: MmxOut,
    ) -> Result<ExpertMm> {
        let (ty, k, rpe) = (w.ty, w.k, w.rows);
        let kernel = Kernel::mmx_for(ty)
            .filter(|_| mmx_supported(ctx, w))
            .ok_or_else(|| invalid(format!("no grouped expert matmul for {ty} here")))?;
        if k == 0 || ty.row_bytes(k) != Some(w.t.row_bytes) {
            return Err(invalid(format!(
                "expert rows of {} bytes do not hold {k} elements of {ty}",
                w.t.row_bytes
            )));
        }
        let mut flags = match out {
            MmxOut::Up(act) => match (w.glu, act) {
                (true, Activation::SwiGlu) => MMX_GLU,
                (true, Activation::GeluTanhGlu) => MMX_GLU | MMX_GELU,
                (true, Activation::ClampedSwiGlu { .. }) => MMX_GLU | MMX_CLAMP,
                (false, Activation::Relu2) => MMX_RELU2,
                (glu, act) => {
                    return Err(invalid(format!(
                        "expert activation {act:?} over {} experts",
                        if glu { "gate|up" } else { "up-only" }
                    )))
                }
            },
            MmxOut::Down if w.glu => {
                return Err(invalid("a down projection over gate|up experts".into()))
            }
            MmxOut::Down => MMX_WEIGHT,
        };
        let (alpha, limit) = match out {
            MmxOut::Up(Activation::ClampedSwiGlu { alpha, limit }) => (alpha, limit),
            _ => (0.0, 0.0),
        };
        flags |= match gam {
            Some(_) => MV_NORM,
            None => MMX_NOGAM,
        };
        if w.bias.is_some() {
            flags |= MMX_BIAS;
        }
        let pairs = layout.tokens * layout.n_used;
        let outs = if w.glu { w.outputs() } else { rpe };
        if slots.count != layout.n_used
            || slots.first + slots.count > routing.per_token()
            || routing.tokens > layout.tokens
            || g.size() < layout.words * 4
            || x_div == 0
            || ld_x < k
            || ld_y < outs
            || x.size() < ((pairs - 1) / x_div * ld_x + k) * 4
            || y.size() < ((pairs - 1) * ld_y + outs) * 4
            || gam.is_some_and(|b| b.size() < k * 4)
            || w.n > layout.n_experts
        {
            return Err(invalid(format!(
                "grouped expert matmul of {rpe} x {k} {ty}: layout or buffers do not match"
            )));
        }
        let rtiles = rpe.div_ceil(GROUP_ROWS);
        let groups = layout.max_tiles * rtiles;
        let bias = w.bias.as_ref().unwrap_or(&routing.weights);
        let mut parts = Vec::with_capacity(w.t.pieces.len());
        for piece in &w.t.pieces {
            if !piece.first_row.is_multiple_of(rpe) || !piece.rows.is_multiple_of(rpe) {
                return Err(invalid("expert pieces must hold whole experts".into()));
            }
            let b = ctx.bind(
                kernel,
                &[
                    &piece.buffer,
                    x,
                    y,
                    gam.unwrap_or(x),
                    g,
                    &routing.weights,
                    bias,
                ],
            )?;
            let push = push_words(&[
                u32_of(k, "k")?,
                u32_of(rpe, "rows per expert")?,
                u32_of(piece.first_row / rpe, "first expert")?,
                u32_of(ld_x, "input stride")?,
                u32_of(ld_y, "output stride")?,
                flags,
                eps.to_bits(),
                alpha.to_bits(),
                limit.to_bits(),
                u32_of(piece.rows / rpe, "experts")?,
                u32_of(x_div, "pairs per input")?,
                u32_of(slots.count, "slots")?,
                u32_of(routing.per_token(), "routing entries per token")?,
                u32_of(rtiles, "row tiles")?,
                u32_of(layout.max_tiles, "tiles")?,
                u32_of(layout.pairs_at, "pair list")?,
                u32_of(slots.first, "first slot")?,
            ]);
            parts.push((b, push, groups));
        }
        Ok(ExpertMm(ExpertDispatches {
            parts,
            serial: false,
        }))
    }

    /// Records the op (one dispatch per piece, no barrier after).
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        self.0.record(r)
    }

    pub fn dispatches(&self) -> usize {
        self.0.parts.len()
    }
}

/// The routed experts' outputs of a step summed into the residual stream
/// (`moe_sum.comp`): `x[t][r] += Σ_s yd[t * n_used + s][r]` for the step's tokens, the
/// slots in order (deterministic, no atomics), then `+ ys[t][r]` (the shared expert's
/// output) with `ys`. One dispatch.
pub struct MoeSum {
    binding: Binding,
    push: Vec<u8>,
    groups: u64,
}

impl MoeSum {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &Context,
        x: &Buffer,
        yd: &Buffer,
        ys: Option<&Buffer>,
        d: u64,
        n_used: u64,
        tokens: u64,
        step: &Buffer,
    ) -> Result<MoeSum> {
        if d == 0
            || x.size() < tokens * d * 4
            || yd.size() < tokens * n_used * d * 4
            || ys.is_some_and(|b| b.size() < tokens * d * 4)
        {
            return Err(invalid(format!(
                "summing {n_used} expert outputs of {d} over {tokens} tokens: buffers too small"
            )));
        }
        let binding = ctx.bind(Kernel::MoeSum, &[x, yd, step, ys.unwrap_or(yd)])?;
        let push = push_words(&[
            u32_of(d, "d")?,
            u32_of(n_used, "slots")?,
            u32::from(ys.is_some()),
        ]);
        Ok(MoeSum {
            binding,
            push,
            groups: (tokens * d).div_ceil(256),
        })
    }

    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        r.dispatch(&self.binding, &self.push, self.groups)
    }
}

/// The grouped form's scratch: the group buffer and the down projection's outputs per
/// pair (`tokens x n_used x d` f32); with a shared expert, its group buffer (one expert,
/// one slot) and output (`tokens x d` f32).
pub struct GroupScratch {
    pub layout: GroupLayout,
    pub g: Buffer,
    pub yd: Buffer,
    pub shared: Option<(GroupLayout, Buffer, Buffer)>,
}

/// Whether [`MoeSteps`] runs block `m` grouped by expert on this device: both expert
/// tensors have grouped matmuls (not MXFP4, which has int8 kernels only) and its
/// activation is one they apply.
pub fn grouped_ok(ctx: &Context, m: &MoeDevice) -> bool {
    grouped_pair_ok(ctx, &m.up, &m.down, m.spec.act)
        && Kernel::MoeGroup.fits(ctx.info())
        && Kernel::MoeSum.fits(ctx.info())
}

/// Whether a gate|up (or up-only) and down pair of expert tensors with activation `act`
/// has grouped matmuls here.
fn grouped_pair_ok(ctx: &Context, up: &Experts, down: &Experts, act: Activation) -> bool {
    let act_ok = matches!(
        (up.glu, act),
        (true, Activation::SwiGlu)
            | (true, Activation::GeluTanhGlu)
            | (true, Activation::ClampedSwiGlu { .. })
            | (false, Activation::Relu2)
    );
    act_ok && mmx_supported(ctx, up) && mmx_supported(ctx, down)
}

/// Steps of at most this many tokens run [`MoeSteps`]' router as the batched mat-vec
/// (`mm.glsl`) rather than the tiled matmul.
pub const ROUTER_ROWWISE_TOKENS: u64 = 16;

/// Prefill and batched decode MoE blocks group their pairs by expert unless
/// `CALDERA_VK_MOE_PAIRS=1` (the per-pair expert mat-vecs).
pub fn grouped_default() -> bool {
    std::env::var("CALDERA_VK_MOE_PAIRS").map_or(true, |v| v != "1")
}

/// The scratch a [`MoeSteps`] block works in, shared by the MoE layers of a runner:
/// `logits` (`tokens x (n_experts + 1)` f32), `routing` (for `tokens`), `h` (`tokens x
/// n_used x ff` f32) and `hs` (`tokens x shared ff` f32, with a shared expert).
pub struct MoeScratch {
    pub logits: Buffer,
    pub routing: Routing,
    pub h: Buffer,
    pub hs: Option<Buffer>,
    /// Int8 forms `(q, d)` of the normed input rows (`tokens x d`) and of `h`, for expert
    /// types with int8 kernels only (MXFP4).
    pub x8: Option<(Buffer, Buffer)>,
    pub h8: Option<(Buffer, Buffer)>,
    /// For the blocks that run grouped by expert ([`grouped_ok`]), unless the runner
    /// asked for the per-pair mat-vecs.
    pub group: Option<GroupScratch>,
}

/// Whether experts of `e` need int8 inputs (no f32-activation kernel for their type).
fn int8_only(e: &Experts) -> bool {
    mvx_kernel(e.ty, e.glu).is_none()
}

impl MoeScratch {
    /// Scratch for the widest of `blocks` over steps of up to `tokens` tokens; grouped
    /// by expert unless `CALDERA_VK_MOE_PAIRS=1` ([`grouped_default`]).
    pub fn new(ctx: &Context, blocks: &[&MoeDevice], tokens: u64) -> Result<Option<MoeScratch>> {
        MoeScratch::with_grouping(ctx, blocks, tokens, grouped_default())
    }

    /// As [`MoeScratch::new`]; `grouped`: the blocks that can run grouped by expert do
    /// (else every block runs the per-pair expert mat-vecs).
    pub fn with_grouping(
        ctx: &Context,
        blocks: &[&MoeDevice],
        tokens: u64,
        grouped: bool,
    ) -> Result<Option<MoeScratch>> {
        let Some(first) = blocks.first() else {
            return Ok(None);
        };
        let n_used = first.spec.n_used as u64;
        let shared = first.shared.is_some();
        let mut logits = 0u64;
        let mut h = 0u64;
        let mut hs = 0u64;
        let mut d = 0u64;
        let (mut x8, mut h8) = (false, false);
        for b in blocks {
            d = d.max(b.d_model);
            x8 |= int8_only(&b.up);
            h8 |= int8_only(&b.down);
            if b.spec.n_used as u64 != n_used || b.shared.is_some() != shared {
                return Err(invalid(
                    "MoE layers with different expert counts per token".into(),
                ));
            }
            logits = logits.max(b.spec.n_experts as u64 + 1);
            h = h.max(n_used * b.up.outputs());
            if let Some((su, _, _)) = &b.shared {
                hs = hs.max(su.outputs());
            }
        }
        let dev = |n: u64| ctx.create_buffer(tokens * n * 4, MemoryKind::Device);
        let q8 = |n: u64| q8_buffers(ctx, (tokens * n).next_multiple_of(32));
        let group = if grouped && blocks.iter().any(|b| grouped_ok(ctx, b)) {
            let n = blocks.iter().map(|b| b.spec.n_experts as u64).max();
            let layout = GroupLayout::new(n.unwrap_or(1), n_used, tokens);
            let shared = if shared {
                let sl = GroupLayout::new(1, 1, tokens);
                let g = ctx.create_buffer(sl.words * 4, MemoryKind::Device)?;
                Some((sl, g, dev(d)?))
            } else {
                None
            };
            Some(GroupScratch {
                layout,
                g: ctx.create_buffer(layout.words * 4, MemoryKind::Device)?,
                yd: dev(n_used * d)?,
                shared,
            })
        } else {
            None
        };
        Ok(Some(MoeScratch {
            logits: dev(logits)?,
            routing: Routing::for_tokens(ctx, n_used, shared, tokens)?,
            h: dev(h)?,
            hs: if shared { Some(dev(hs)?) } else { None },
            x8: if x8 { Some(q8(d)?) } else { None },
            h8: if h8 { Some(q8(h)?) } else { None },
            group,
        }))
    }
}

/// A whole MoE block over the tokens of a step (prefill, batched decode): the router as
/// a tiled matmul (the norm folded in) into `logits`, the routing of every token, then
/// the routed experts either grouped by expert (the default where [`grouped_ok`] and the
/// scratch has [`GroupScratch`]): [`MoeGroup`], the gate|up as a grouped matmul
/// ([`ExpertMm`]) on the normed f32 input into `h`, the down as a grouped matmul into
/// per-pair outputs times their weights, and [`MoeSum`] adding each token's slots into
/// the residual stream in slot order; or per (token, slot) pair (`CALDERA_VK_MOE_PAIRS=1`,
/// and MXFP4 experts): the expert mat-vecs, each reading its expert's rows per pair, the
/// down projections summed per token into the residual stream. The shared expert runs
/// beside the routed ones as grouped matmuls too (its slot grouped as one expert of
/// every token, its output added by the sum after the routed slots) where the routed
/// ones run grouped and its types allow; else per-pair mat-vecs after the routed
/// experts. Tokens past the step's are skipped by their routing.
pub struct MoeSteps {
    router: crate::ops::Mm,
    route: MoeRoute,
    routed: Routed,
    shared_up: Option<ExpertUp>,
    shared_down: Option<ExpertDown>,
}

enum Routed {
    Pairs {
        quant_x: Option<crate::ops::QuantRows>,
        quant_h: Option<QuantX>,
        up: ExpertUp,
        down: ExpertDown,
    },
    Grouped {
        group: MoeGroup,
        up: ExpertMm,
        down: ExpertMm,
        sum: MoeSum,
        /// The shared expert as a grouped matmul too (one expert, every token).
        shared: Option<(MoeGroup, ExpertMm, ExpertMm)>,
    },
}

impl MoeSteps {
    /// `x`: the residual stream (`tokens x d` f32), the block's input `rmsnorm(x) * gam`
    /// and where its output is added; `step`: the step values (`step[0]` tokens).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &Context,
        m: &MoeDevice,
        x: &Buffer,
        gam: &Buffer,
        eps: f32,
        step: &Buffer,
        s: &MoeScratch,
    ) -> Result<MoeSteps> {
        let spec = &m.spec;
        let d = m.d_model;
        let n = spec.n_experts as u64;
        let tokens = s.routing.tokens;
        let ld = n + 1;
        let io = crate::ops::MmIo {
            x,
            ld_x: d,
            y: &s.logits,
            ld_y: ld,
            y_offset: 0,
            gam: Some(gam),
            step,
            max_tokens: tokens,
        };
        // Decode-sized steps (a batched runner's buckets) run the router row-wise: its
        // few rows (128 experts) are one row tile of the tiled matmul, one workgroup
        // streaming the whole weight (qwen3moe, 8 sequences on the H100: 238 us per
        // layer, docs/BENCHMARKS.md session 13).
        let mode = crate::ops::MmMode {
            norm: true,
            eps,
            rowwise: tokens <= ROUTER_ROWWISE_TOKENS,
            ..Default::default()
        };
        let router = crate::ops::Mm::new(ctx, m.router_ty, &m.router, d, &io, mode)?;
        let rs = RouterSpec::of(spec, m.shared_gate);
        let route = MoeRoute::steps(
            ctx,
            &rs,
            &s.logits,
            ld,
            m.logit_bias.as_ref(),
            m.selection_bias.as_ref(),
            &s.routing,
            Some(step),
        )?;
        let x_f32 = ExpertInput::F32 { x, gam: Some(gam) };
        let mut shared_grouped = false;
        let routed = match &s.group {
            Some(gs) if grouped_ok(ctx, m) => {
                let n_used = spec.n_used as u64;
                let ff = m.up.outputs();
                let routed = s.routing.routed();
                let group = MoeGroup::new(ctx, n, &gs.layout, &s.routing, routed, step, &gs.g)?;
                let up = ExpertMm::new(
                    ctx,
                    &m.up,
                    &gs.layout,
                    &gs.g,
                    &s.routing,
                    routed,
                    x,
                    d,
                    n_used,
                    Some(gam),
                    eps,
                    &s.h,
                    ff,
                    MmxOut::Up(spec.act),
                )?;
                let down = ExpertMm::new(
                    ctx,
                    &m.down,
                    &gs.layout,
                    &gs.g,
                    &s.routing,
                    routed,
                    &s.h,
                    ff,
                    1,
                    None,
                    0.0,
                    &gs.yd,
                    d,
                    MmxOut::Down,
                )?;
                // The shared expert: one expert on its own slot for every token (pair
                // q = token q), into ys, which the sum adds after the routed slots.
                let shared = match (&m.shared, s.routing.shared_slot(), &gs.shared, &s.hs) {
                    (Some((su, sd, act)), Some(slot), Some((sl, sg, ys)), Some(hs))
                        if grouped_pair_ok(ctx, su, sd, *act) =>
                    {
                        let sff = su.outputs();
                        let group = MoeGroup::new(ctx, 1, sl, &s.routing, slot, step, sg)?;
                        let up = ExpertMm::new(
                            ctx,
                            su,
                            sl,
                            sg,
                            &s.routing,
                            slot,
                            x,
                            d,
                            1,
                            Some(gam),
                            eps,
                            hs,
                            sff,
                            MmxOut::Up(*act),
                        )?;
                        let down = ExpertMm::new(
                            ctx,
                            sd,
                            sl,
                            sg,
                            &s.routing,
                            slot,
                            hs,
                            sff,
                            1,
                            None,
                            0.0,
                            ys,
                            d,
                            MmxOut::Down,
                        )?;
                        Some((group, up, down, ys))
                    }
                    _ => None,
                };
                let ys = shared.as_ref().map(|sh| sh.3);
                let sum = MoeSum::new(ctx, x, &gs.yd, ys, d, n_used, tokens, step)?;
                shared_grouped = shared.is_some();
                Routed::Grouped {
                    group,
                    up,
                    down,
                    sum,
                    shared: shared.map(|(g, u, dn, _)| (g, u, dn)),
                }
            }
            _ => MoeSteps::pairs(ctx, m, x, gam, eps, step, s, &x_f32)?,
        };
        let (shared_up, shared_down) = match (&m.shared, s.routing.shared_slot(), &s.hs) {
            _ if shared_grouped => (None, None),
            (Some((su, sd, act)), Some(slot), Some(hs)) => {
                if int8_only(su) || int8_only(sd) {
                    return Err(invalid(format!(
                        "a shared expert of type {} needs f32-activation kernels",
                        su.ty
                    )));
                }
                let hs_in = ExpertInput::F32 { x: hs, gam: None };
                (
                    Some(ExpertUp::new(
                        ctx, su, &s.routing, slot, &x_f32, *act, eps, hs, None,
                    )?),
                    Some(ExpertDown::new(
                        ctx, sd, &s.routing, slot, &hs_in, x, true, None,
                    )?),
                )
            }
            (None, None, _) => (None, None),
            _ => {
                return Err(invalid(
                    "MoE scratch without the shared expert's slot".into(),
                ))
            }
        };
        Ok(MoeSteps {
            router,
            route,
            routed,
            shared_up,
            shared_down,
        })
    }

    /// Whether the routed experts run grouped by expert.
    pub fn grouped(&self) -> bool {
        matches!(self.routed, Routed::Grouped { .. })
    }

    /// Whether the shared expert runs as a grouped matmul (else per-pair mat-vecs).
    pub fn shared_grouped(&self) -> bool {
        matches!(
            self.routed,
            Routed::Grouped {
                shared: Some(_),
                ..
            }
        )
    }

    /// The routed experts per (token, slot) pair.
    #[allow(clippy::too_many_arguments)]
    fn pairs(
        ctx: &Context,
        m: &MoeDevice,
        x: &Buffer,
        gam: &Buffer,
        eps: f32,
        step: &Buffer,
        s: &MoeScratch,
        x_f32: &ExpertInput<'_>,
    ) -> Result<Routed> {
        let spec = &m.spec;
        let d = m.d_model;
        let tokens = s.routing.tokens;
        let h_f32 = ExpertInput::F32 { x: &s.h, gam: None };
        // Int8-only expert types (MXFP4): the rows quantized with their norm, h as is.
        let x_acts = s.x8.as_ref().map(|(q, d)| Q8Acts { q, d, ss: None });
        let h_acts = s.h8.as_ref().map(|(q, d)| Q8Acts { q, d, ss: None });
        let x_q8 = x_acts.as_ref().map(ExpertInput::Q8);
        let h_q8 = h_acts.as_ref().map(ExpertInput::Q8);
        let missing = || invalid("MoE scratch without int8 buffers".into());
        let (input, quant_x) = if int8_only(&m.up) {
            let acts = x_acts.as_ref().ok_or_else(missing)?;
            let q = crate::ops::QuantRows::new(
                ctx,
                d,
                x,
                d,
                Some(gam),
                None,
                eps,
                acts,
                None,
                step,
                tokens,
            )?;
            (x_q8.as_ref().ok_or_else(missing)?, Some(q))
        } else {
            (x_f32, None)
        };
        let (h_in, quant_h) = if int8_only(&m.down) {
            let acts = h_acts.as_ref().ok_or_else(missing)?;
            let n = (tokens * spec.n_used as u64 * m.up.outputs()).next_multiple_of(32);
            if s.h.size() < n * 4 {
                return Err(invalid("MoE scratch h too small to quantize".into()));
            }
            let q = QuantX::new(ctx, n, &s.h, None, 0.0, acts)?;
            (h_q8.as_ref().ok_or_else(missing)?, Some(q))
        } else {
            (&h_f32, None)
        };
        let up = ExpertUp::new(
            ctx,
            &m.up,
            &s.routing,
            s.routing.routed(),
            input,
            spec.act,
            eps,
            &s.h,
            None,
        )?;
        let down = ExpertDown::new(
            ctx,
            &m.down,
            &s.routing,
            s.routing.routed(),
            h_in,
            x,
            true,
            None,
        )?;
        Ok(Routed::Pairs {
            quant_x,
            quant_h,
            up,
            down,
        })
    }

    /// Records the block (barriers between its phases, none after). With profiling on,
    /// the phases get their own timestamps (`moe_route`: the router and the routing;
    /// `moe_group`; `moe_up`; grouped, `moe_down`); the caller's mark after the block
    /// times the rest (the down projections, or the sum; the shared expert's down).
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        self.router.record(r)?;
        if let Routed::Pairs {
            quant_x: Some(q), ..
        } = &self.routed
        {
            q.record(r)?;
        }
        r.barrier();
        self.route.record(r)?;
        r.barrier();
        r.mark("moe_route");
        match &self.routed {
            Routed::Pairs {
                quant_h, up, down, ..
            } => {
                up.record(r)?;
                if let Some(u) = &self.shared_up {
                    u.record(r)?;
                }
                r.barrier();
                r.mark("moe_up");
                if let Some(q) = quant_h {
                    q.record(r)?;
                    r.barrier();
                }
                down.record(r)?;
            }
            Routed::Grouped {
                group,
                up,
                down,
                sum,
                shared,
            } => {
                group.record(r)?;
                if let Some((g, _, _)) = shared {
                    g.record(r)?;
                }
                if let Some(u) = &self.shared_up {
                    u.record(r)?;
                }
                r.barrier();
                r.mark("moe_group");
                up.record(r)?;
                if let Some((_, u, _)) = shared {
                    u.record(r)?;
                }
                r.barrier();
                r.mark("moe_up");
                down.record(r)?;
                if let Some((_, _, dn)) = shared {
                    dn.record(r)?;
                }
                r.barrier();
                r.mark("moe_down");
                sum.record(r)?;
            }
        }
        if let Some(dn) = &self.shared_down {
            r.barrier();
            dn.record(r)?;
        }
        Ok(())
    }
}
