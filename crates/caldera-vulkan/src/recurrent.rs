//! Decode steps (one token) of the recurrent mixers: GatedDeltaNet (`gdn_decode.comp`),
//! Mamba2 (`mamba2_decode.comp`) and the gated short conv (`shortconv_decode.comp`),
//! and their prefill steps ([`GdnPrefill`], [`Mamba2Prefill`], [`ShortConvPrefill`]).
//! Each decode op is **one dispatch per layer**, between the mixer's input projections (plain decode mat-vecs writing into
//! one `proj` buffer at the offsets below) and its out-projection (a mat-vec over
//! `out`). caldera-cpu's `gdn::mix`, `mamba2::mix` and `shortconv::mix` define them;
//! `tests/recurrent.rs` holds each equal to its twin (and the prefill ops equal to the
//! decode ops token by token).
//!
//! Every buffer is f32 unless said otherwise; sizes in elements.
//!
//! # GatedDeltaNet ([`GdnDecode`])
//! With `cd = conv_dim = 2·n_k·dk + n_v·dv`:
//! - `proj` (input): `[qkv: cd | z: n_v·dv | b: n_v | a: n_v]`, i.e. the outputs of
//!   `attn_qkv`, `attn_gate`, `ssm_beta`, `ssm_alpha` at offsets `0`, `cd`,
//!   `cd + n_v·dv`, `cd + n_v·dv + n_v`. With the fused `ssm_ba` (Qwen3-Next) the last
//!   `2·n_v` values are its output as it comes (per key head, the `b` of its value
//!   heads, then their `a`).
//! - `out`: `n_v·dv`, `rmsnorm(o)·norm·silu(z)` per value head in value-head order: the
//!   input of `ssm_out`.
//! - state ([`RecurrentState::gdn`]): the conv ring `[K][cd]` (below) and
//!   `S [n_v][dk][dv]` (the CPU's `GdnState::ssm` layout).
//! - `q8` (optional): `out` also as int8 blocks of 32 (`quant_x`'s format) for an
//!   int8-activation `ssm_out`, written by the workgroup that norms each head.
//! - Dispatch: `n_v · ceil(dv / tile)` workgroups: value head × tile of value columns
//!   (`tile` ≤ the workgroup size; default [`DEFAULT_TILE`]). Tiles of a head finish
//!   their norm through an atomic count (the last one norms the head).
//!
//! # Mamba2 ([`Mamba2Decode`])
//! With `di = H·P`, `cd = di + 2·G·N`:
//! - `proj`: `in_proj`'s output as it comes, `[z: di | xBC: cd | dt: H]`.
//! - `out`: `di`, the input of `ssm_out`; `q8` as for GatedDeltaNet (per norm group).
//! - state ([`RecurrentState::mamba2`]): the conv ring `[K][cd]` and
//!   `S [H][N][P]`: per head, **transposed** from the CPU's `[P][N]` so that consecutive
//!   invocations read consecutive words ([`mamba2_ssm_to_device`] and
//!   [`mamba2_ssm_from_device`] convert).
//! - Dispatch: `H · ceil(P / tile)` workgroups; norm groups (`di / G` channels) spanning
//!   several workgroups finish through an atomic count per group.
//!
//! # Short conv ([`ShortConvDecode`])
//! - `proj`: `in_proj`'s output, `[B: c | C: c | x: c]`; `out`: `c`, the input of
//!   `out_proj`.
//! - state ([`RecurrentState::short_conv`]): `[(K-1)][c]`, the last `K-1` inputs `B·x`
//!   oldest first, exactly the CPU's `ShortConvState`.
//! - Dispatch: `ceil(c / workgroup size)` workgroups. It needs no step buffer.
//!
//! # Prefill ([`PrefillIo`])
//! The tokens of a prefill step (`step[0]` of them, at most `max_tokens`, from position
//! `step[1]`), continuing the decode ops' state in the same layout: `proj` rows
//! `[max_tokens][ld_proj]` each laid out as the decode op's `proj` (the batched
//! mat-vecs' output), `out` rows `[max_tokens][width of the decode op's out]`.
//! - [`GdnPrefill`]: `conv_rows` (`ceil(cd / wg)` workgroups), `gdn_chunk` (the delta
//!   rule in chunks of 64 tokens in the WY form of caldera-cpu's `delta_chunked`;
//!   `n_v · ceil(dv / wg)` workgroups), `gdn_norm` (`max_tokens · n_v` workgroups).
//! - [`Mamba2Prefill`]: `conv_rows`, the SSM ([`Mamba2Ssm`]: `mamba2_chunk`, chunks of 64
//!   tokens in the SSD form of caldera-cpu's `SsmForm::Chunked`, `H · ceil(P / 32)`
//!   workgroups; or `mamba2_scan`, the recurrence token after token, `H · ceil(P / tile)`
//!   workgroups), `mamba2_norm` (`max_tokens · G` workgroups).
//! - [`ShortConvPrefill`]: `shortconv_rows`, one dispatch.
//!
//! The three-dispatch ops record barriers between their dispatches, none after.
//!
//! # The conv ring (GatedDeltaNet, Mamba2)
//! `[K][cd]`: the conv input (pre-activation projection) of the token at position `t`
//! is row `t % K`. The step at position `pos` (read from `step[1]`, the model's step
//! values, so the ring must advance with the sequence's positions) reads rows
//! `(pos + 1 + i) % K` for `i < K-1` and writes row `pos % K`, which that step never
//! reads: workgroups sharing a channel (q/k of a key head, B/C of a group) never race.
//! A sequence starts at position 0 with a zeroed ring ([`RecurrentState::reset`]);
//! [`ring_from_history`] / [`history_from_ring`] convert from / to the CPU's
//! `[(K-1)][cd]` oldest-first history.

use caldera_model::blocks::gdn::{GdnGates, GdnHeadOrder, GdnSpec, GdnWeights};
use caldera_model::blocks::mamba2::{Mamba2Spec, Mamba2Weights};
use caldera_model::blocks::shortconv::{ShortConvSpec, ShortConvWeights};
use caldera_model::Mixer;

use crate::context::Context;
use crate::error::{Result, VkError};
use crate::kernels::{Kernel, MAMBA2_CHUNK_CHANNELS};
use crate::memory::Buffer;
use crate::ops::{push_words, Q8Acts};
use crate::record::{Binding, Recorder};

/// Value columns (GatedDeltaNet) or head channels (Mamba2) per workgroup by default
/// (capped by the head size and the workgroup size).
pub const DEFAULT_TILE: usize = 32;

/// Largest `dk` (GatedDeltaNet) and `N` (Mamba2) the kernels hold in shared memory.
pub const MAX_RECURRENT_DIM: usize = 512;

fn invalid(msg: String) -> VkError {
    VkError::Invalid(msg)
}

/// `a · b · ...` as elements that a shader may index with 32 bits.
fn elems(what: &str, factors: &[usize]) -> Result<usize> {
    factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f))
        .filter(|&n| n < (1usize << 32))
        .ok_or_else(|| {
            invalid(format!(
                "{what}: sizes {factors:?} do not fit 32-bit indices"
            ))
        })
}

fn need(what: &str, buf: &Buffer, floats: usize) -> Result<()> {
    if buf.size() < floats as u64 * 4 {
        return Err(invalid(format!(
            "{what}: a buffer of {} bytes, want {floats} values",
            buf.size()
        )));
    }
    Ok(())
}

fn need_len(what: &str, v: &[f32], n: usize) -> Result<()> {
    if v.len() != n {
        return Err(invalid(format!("{what}: {} values, want {n}", v.len())));
    }
    Ok(())
}

fn upload_zeros(ctx: &Context, floats: usize) -> Result<Buffer> {
    ctx.upload(&vec![0u8; floats.max(1) * 4])
}

/// A layer's recurrent state on the device: the conv state and, but for the short conv,
/// the SSM / delta-rule state. Zeroed at creation. A sequence of a `VkBatch` holds
/// views of its pool slot's region (cloning shares the buffers).
#[derive(Clone)]
pub struct RecurrentState {
    /// The conv ring `[K][cd]` (GatedDeltaNet, Mamba2) or the history `[(K-1)][c]`
    /// (short conv).
    pub conv: Buffer,
    /// `S`: `[n_v][dk][dv]` (GatedDeltaNet) or `[H][N][P]` (Mamba2).
    pub ssm: Option<Buffer>,
}

impl RecurrentState {
    fn zeroed(ctx: &Context, conv: usize, ssm: Option<usize>) -> Result<RecurrentState> {
        Ok(RecurrentState {
            conv: upload_zeros(ctx, conv)?,
            ssm: ssm.map(|n| upload_zeros(ctx, n)).transpose()?,
        })
    }

    /// A GatedDeltaNet layer's: the ring `[K][conv_dim]`, S `[n_v][dk][dv]`.
    pub fn gdn(ctx: &Context, spec: &GdnSpec) -> Result<RecurrentState> {
        let conv = elems(
            "GatedDeltaNet conv ring",
            &[spec.conv_kernel, spec.conv_dim()],
        )?;
        let ssm = elems(
            "GatedDeltaNet state",
            &[spec.n_v_heads, spec.head_k_dim, spec.head_v_dim],
        )?;
        RecurrentState::zeroed(ctx, conv, Some(ssm))
    }

    /// A Mamba2 layer's: the ring `[K][conv_dim]`, S `[H][N][P]`.
    pub fn mamba2(ctx: &Context, spec: &Mamba2Spec) -> Result<RecurrentState> {
        let conv = elems("Mamba2 conv ring", &[spec.d_conv, spec.conv_dim()])?;
        let ssm = elems("Mamba2 state", &[spec.d_inner(), spec.d_state])?;
        RecurrentState::zeroed(ctx, conv, Some(ssm))
    }

    /// A short-conv layer's: the history `[(K-1)][channels]`, no S.
    pub fn short_conv(ctx: &Context, spec: &ShortConvSpec) -> Result<RecurrentState> {
        let conv = elems(
            "short conv state",
            &[spec.l_cache.saturating_sub(1), spec.channels],
        )?;
        RecurrentState::zeroed(ctx, conv, None)
    }

    /// Values per sequence of a layer of mixer `spec`: (conv state, S; 0 without S).
    pub fn sizes(spec: &Mixer) -> Result<(usize, usize)> {
        match spec {
            Mixer::GatedDeltaNet(s) => Ok((
                elems("GatedDeltaNet conv ring", &[s.conv_kernel, s.conv_dim()])?,
                elems(
                    "GatedDeltaNet state",
                    &[s.n_v_heads, s.head_k_dim, s.head_v_dim],
                )?,
            )),
            Mixer::Mamba2(s) => Ok((
                elems("Mamba2 conv ring", &[s.d_conv, s.conv_dim()])?,
                elems("Mamba2 state", &[s.d_inner(), s.d_state])?,
            )),
            Mixer::ShortConv(s) => Ok((
                elems(
                    "short conv state",
                    &[s.l_cache.saturating_sub(1), s.channels],
                )?,
                0,
            )),
            Mixer::Attention(_) => Err(invalid("attention has no recurrent state".into())),
        }
    }

    /// Zeroes the states (a new sequence, at position 0) in one submit: not something
    /// to record into a step.
    pub fn reset_all<'a>(
        ctx: &Context,
        states: impl IntoIterator<Item = &'a RecurrentState>,
    ) -> Result<()> {
        let mut bufs = Vec::new();
        for st in states {
            bufs.push(&st.conv);
            bufs.extend(st.ssm.as_ref());
        }
        ctx.fill_zero(&bufs)
    }

    /// Zeroes the state (a new sequence, at position 0): not something to record into a
    /// step.
    pub fn reset(&self, ctx: &Context) -> Result<()> {
        RecurrentState::reset_all(ctx, [self])
    }
}

/// The conv ring (`[K][channels]`) for the token at position `pos` from the CPU's
/// history (`[(K-1)][channels]`, oldest first: positions `pos-K+1 .. pos-1`); the row
/// the step writes is zero.
pub fn ring_from_history(hist: &[f32], kern: usize, channels: usize, pos: u64) -> Result<Vec<f32>> {
    check_ring_sizes(hist.len(), kern, channels)?;
    let mut ring = vec![0f32; kern * channels];
    for (i, row) in hist.chunks_exact(channels.max(1)).enumerate() {
        let slot = ring_slot(pos, i, kern);
        ring[slot * channels..(slot + 1) * channels].copy_from_slice(row);
    }
    Ok(ring)
}

/// The CPU's history (`[(K-1)][channels]`, oldest first) from a conv ring at position
/// `pos` (the next token's).
pub fn history_from_ring(ring: &[f32], kern: usize, channels: usize, pos: u64) -> Result<Vec<f32>> {
    if kern == 0 || ring.len() != kern * channels {
        return Err(invalid(format!(
            "a conv ring of {} values for kernel {kern} over {channels} channels",
            ring.len()
        )));
    }
    let mut hist = Vec::with_capacity((kern - 1) * channels);
    for i in 0..kern - 1 {
        let slot = ring_slot(pos, i, kern);
        hist.extend_from_slice(&ring[slot * channels..(slot + 1) * channels]);
    }
    Ok(hist)
}

/// The ring row of history row `i` (position `pos - K + 1 + i`).
fn ring_slot(pos: u64, i: usize, kern: usize) -> usize {
    ((pos + 1 + i as u64) % kern as u64) as usize
}

fn check_ring_sizes(hist: usize, kern: usize, channels: usize) -> Result<()> {
    if kern == 0 || hist != (kern - 1) * channels {
        return Err(invalid(format!(
            "a conv history of {hist} values for kernel {kern} over {channels} channels"
        )));
    }
    Ok(())
}

/// The CPU's Mamba2 state (`[H][P][N]`) in the device layout (`[H][N][P]`).
pub fn mamba2_ssm_to_device(spec: &Mamba2Spec, cpu: &[f32]) -> Result<Vec<f32>> {
    transpose_heads(spec, cpu, spec.head_dim, spec.d_state)
}

/// The device's Mamba2 state (`[H][N][P]`) in the CPU's layout (`[H][P][N]`).
pub fn mamba2_ssm_from_device(spec: &Mamba2Spec, dev: &[f32]) -> Result<Vec<f32>> {
    transpose_heads(spec, dev, spec.d_state, spec.head_dim)
}

/// Transposes each head's `[rows][cols]` block.
fn transpose_heads(spec: &Mamba2Spec, v: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>> {
    let per = rows * cols;
    if v.len() != spec.n_heads * per {
        return Err(invalid(format!(
            "a Mamba2 state of {} values, want {} heads of {rows} x {cols}",
            v.len(),
            spec.n_heads
        )));
    }
    let mut out = vec![0f32; v.len()];
    for (src, dst) in v.chunks_exact(per).zip(out.chunks_exact_mut(per)) {
        for r in 0..rows {
            for c in 0..cols {
                dst[c * rows + r] = src[r * cols + c];
            }
        }
    }
    Ok(out)
}

/// Where a recurrent decode op reads and writes.
pub struct RecurrentIo<'a> {
    /// The input projections' outputs (layout per op, see the module doc).
    pub proj: &'a Buffer,
    /// The mixer's output, the out-projection's input.
    pub out: &'a Buffer,
    pub state: &'a RecurrentState,
    /// The step values (u32; `[1]` is the token's position). Unused by the short conv.
    pub step: &'a Buffer,
    /// Where to also write `out` as int8 blocks of 32 for an int8-activation
    /// out-projection (`ops::Mvq`), sparing it a `QuantX`: GatedDeltaNet with `dv`, Mamba2
    /// with `d_inner / G` a multiple of 32; not the short conv.
    pub q8: Option<Q8Acts<'a>>,
}

/// A batched decode step's columns (`VkBatch`): `io.state` holds the states of `slots`
/// sequences (pool slot `s`'s conv state at `s · conv_stride` values of `state.conv`,
/// its S at `s · ssm_stride` of `state.ssm`), and the op runs `cols` columns: column c
/// is the sequence in pool slot `step[8 + 2c]` at position `step[9 + 2c]` for
/// `c < step[0]`, its `proj` row c (`ld_proj` values apart), its `out` row c (the op's
/// output width apart; the int8 blocks too, as `quant_rows` lays out its rows). Columns
/// past `step[0]` exit at once: they touch no state.
#[derive(Clone, Copy, Debug)]
pub struct RecurrentCols {
    pub cols: usize,
    pub ld_proj: usize,
    pub slots: usize,
    pub conv_stride: usize,
    pub ssm_stride: usize,
}

impl RecurrentCols {
    /// Checks the buffers of `io` against the columns: `row` values of `proj` used per
    /// column, `width` outputs, `conv` / `ssm` values of state per slot. Returns the
    /// push-constant words `[ld_proj, conv_stride, ssm_stride]`.
    fn check(
        &self,
        what: &str,
        io: &RecurrentIo<'_>,
        row: usize,
        width: usize,
        conv: usize,
        ssm: usize,
    ) -> Result<[u32; 3]> {
        let c = self.cols;
        if c == 0 || self.slots == 0 || self.ld_proj < row {
            return Err(invalid(format!(
                "{what}: {c} columns over {} slots, proj rows of {} values (want {row})",
                self.slots, self.ld_proj
            )));
        }
        if self.conv_stride < conv || (ssm > 0 && self.ssm_stride < ssm) {
            return Err(invalid(format!(
                "{what}: state strides {} / {} below a sequence's {conv} / {ssm} values",
                self.conv_stride, self.ssm_stride
            )));
        }
        elems(what, &[c, self.ld_proj])?;
        elems(what, &[c, width])?;
        elems(what, &[self.slots, self.conv_stride])?;
        elems(what, &[self.slots, self.ssm_stride.max(1)])?;
        need(
            &format!("{what} proj rows"),
            io.proj,
            (c - 1) * self.ld_proj + row,
        )?;
        need(&format!("{what} out rows"), io.out, c * width)?;
        need(
            &format!("{what} conv states"),
            &io.state.conv,
            (self.slots - 1) * self.conv_stride + conv,
        )?;
        if ssm > 0 {
            let s = io
                .state
                .ssm
                .as_ref()
                .ok_or_else(|| invalid(format!("{what}: a state without S")))?;
            need(
                &format!("{what} states"),
                s,
                (self.slots - 1) * self.ssm_stride + ssm,
            )?;
        }
        need("step values", io.step, 8 + 2 * c)?;
        Ok([
            self.ld_proj as u32,
            self.conv_stride as u32,
            self.ssm_stride as u32,
        ])
    }

    /// [`Self::check`] for an op with an S state (`ssm` > 0 values per slot): also
    /// returns that state's pool.
    fn check_ssm<'a>(
        &self,
        what: &str,
        io: &RecurrentIo<'a>,
        row: usize,
        width: usize,
        conv: usize,
        ssm: usize,
    ) -> Result<([u32; 3], &'a Buffer)> {
        let words = self.check(what, io, row, width, conv, ssm)?;
        let s = io
            .state
            .ssm
            .as_ref()
            .ok_or_else(|| invalid(format!("{what}: a state without S")))?;
        Ok((words, s))
    }
}

/// Checks `io.q8` for `n` outputs quantized in blocks of 32 that may not straddle
/// `unit` (a head or norm group); returns its buffers, or `out` twice without it.
fn q8_buffers<'a>(
    what: &str,
    io: &'a RecurrentIo<'a>,
    n: usize,
    unit: usize,
) -> Result<(&'a Buffer, &'a Buffer, u32)> {
    match &io.q8 {
        None => Ok((io.out, io.out, 0)),
        Some(q) => {
            if !unit.is_multiple_of(32) {
                return Err(invalid(format!(
                    "{what}: int8 output in blocks of 32 over units of {unit} values"
                )));
            }
            if q.q.size() < n as u64 || q.d.size() < (n / 8) as u64 {
                return Err(invalid(format!(
                    "{what}: int8 output buffers too small for {n} values"
                )));
            }
            Ok((q.q, q.d, 1))
        }
    }
}

/// One bound dispatch.
struct Dispatch {
    binding: Binding,
    push: Vec<u8>,
    groups: u64,
}

impl Dispatch {
    fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        r.dispatch(&self.binding, &self.push, self.groups)
    }
}

/// Columns per workgroup: `want` capped by the head size and the workgroup size.
fn tile_of(ctx: &Context, want: usize, cols: usize) -> (usize, usize) {
    let wg = ctx.tuning().workgroup_size as usize;
    let tile = want.clamp(1, cols.min(wg).max(1));
    (tile, cols.div_ceil(tile))
}

/// Uploads the constants of a recurrent op: the conv taps, its bias (zeros without
/// one), then `rest` in order.
fn upload_consts(
    ctx: &Context,
    conv: &[f32],
    bias: Option<&[f32]>,
    cd: usize,
    rest: &[&[f32]],
) -> Result<Buffer> {
    let mut v = Vec::with_capacity(conv.len() + cd + rest.iter().map(|r| r.len()).sum::<usize>());
    v.extend_from_slice(conv);
    match bias {
        Some(b) => v.extend_from_slice(b),
        None => v.resize(v.len() + cd, 0.0),
    }
    for r in rest {
        v.extend_from_slice(r);
    }
    ctx.upload_f32(&v)
}

/// The checked sizes of a GatedDeltaNet layer, as its kernels take them.
struct GdnDims {
    nk: usize,
    nv: usize,
    dk: usize,
    dv: usize,
    kern: usize,
    /// conv_dim
    cd: usize,
    /// n_v·dv
    vd: usize,
    /// A projection row: `cd + vd + 2·n_v`.
    row: usize,
    /// `gdn_decode` / `gdn_chunk` flags: 1 tiled head order, 2 fused `ssm_ba`.
    flags: u32,
}

impl GdnDims {
    fn check(what: &str, spec: &GdnSpec, w: &GdnWeights) -> Result<GdnDims> {
        let (nk, nv, dk, dv, kern) = (
            spec.n_k_heads,
            spec.n_v_heads,
            spec.head_k_dim,
            spec.head_v_dim,
            spec.conv_kernel,
        );
        if nk == 0 || nv == 0 || !nv.is_multiple_of(nk) || dv == 0 || kern == 0 {
            return Err(invalid(format!(
                "{what}: {nv} value heads over {nk} key heads, dv {dv}, conv kernel {kern}"
            )));
        }
        if dk == 0 || dk > MAX_RECURRENT_DIM {
            return Err(invalid(format!(
                "{what}: key head size {dk} is outside 1..={MAX_RECURRENT_DIM}"
            )));
        }
        let cd = spec.conv_dim();
        let vd = spec.value_dim();
        elems(what, &[cd, kern + 1])?;
        elems(what, &[nv, dk, dv])?;
        let row = elems(what, &[cd + vd + 2 * nv])?;
        need_len("ssm_conv1d", &w.conv, cd * kern)?;
        if let Some(b) = &w.conv_bias {
            need_len("ssm_conv1d.bias", b, cd)?;
        }
        need_len("ssm_dt.bias", &w.dt_bias, nv)?;
        need_len("ssm_a", &w.a, nv)?;
        need_len("ssm_norm", &w.norm, dv)?;
        let mut flags = 0u32;
        if spec.head_order == GdnHeadOrder::Tiled {
            flags |= 1;
        }
        if matches!(w.gates, GdnGates::Fused(_)) {
            flags |= 2;
        }
        Ok(GdnDims {
            nk,
            nv,
            dk,
            dv,
            kern,
            cd,
            vd,
            row,
            flags,
        })
    }

    /// The state's S, after checking both buffers' sizes.
    fn state<'a>(&self, st: &'a RecurrentState) -> Result<&'a Buffer> {
        need("GatedDeltaNet conv ring", &st.conv, self.kern * self.cd)?;
        let s = st
            .ssm
            .as_ref()
            .ok_or_else(|| invalid("GatedDeltaNet: a state without S".into()))?;
        need("GatedDeltaNet state", s, self.nv * self.dk * self.dv)?;
        Ok(s)
    }

    /// The kernels' constants: conv taps, conv bias, dt_bias, A, norm.
    fn consts(&self, ctx: &Context, w: &GdnWeights) -> Result<Buffer> {
        upload_consts(
            ctx,
            &w.conv,
            w.conv_bias.as_deref(),
            self.cd,
            &[&w.dt_bias, &w.a, &w.norm],
        )
    }

    /// Offset of the norm weights in the constants.
    fn norm_at(&self) -> usize {
        self.cd * (self.kern + 1) + 2 * self.nv
    }
}

/// The GatedDeltaNet decode step (`gdn_decode.comp`): conv, L2 norms, gates, the delta
/// rule and the gated RMSNorm of every value head, one dispatch. See the module doc for
/// the buffers.
pub struct GdnDecode(Dispatch);

impl GdnDecode {
    /// Binds the op for a layer of `spec` with weights `w` (only its vectors are read;
    /// uploaded here), RMSNorm epsilon `eps`, over `io`.
    pub fn new(
        ctx: &Context,
        spec: &GdnSpec,
        w: &GdnWeights,
        eps: f32,
        io: &RecurrentIo<'_>,
    ) -> Result<GdnDecode> {
        GdnDecode::with_tile(ctx, spec, w, eps, io, DEFAULT_TILE)
    }

    /// [`GdnDecode::new`] with `tile` value columns per workgroup (capped by `dv` and
    /// the workgroup size).
    pub fn with_tile(
        ctx: &Context,
        spec: &GdnSpec,
        w: &GdnWeights,
        eps: f32,
        io: &RecurrentIo<'_>,
        tile: usize,
    ) -> Result<GdnDecode> {
        GdnDecode::build(ctx, spec, w, eps, io, tile, None)
    }

    /// The op over a batched decode step's columns (see [`RecurrentCols`]), each on its
    /// own slot's state: one dispatch for every column.
    pub fn batched(
        ctx: &Context,
        spec: &GdnSpec,
        w: &GdnWeights,
        eps: f32,
        io: &RecurrentIo<'_>,
        cols: &RecurrentCols,
    ) -> Result<GdnDecode> {
        GdnDecode::build(ctx, spec, w, eps, io, DEFAULT_TILE, Some(cols))
    }

    fn build(
        ctx: &Context,
        spec: &GdnSpec,
        w: &GdnWeights,
        eps: f32,
        io: &RecurrentIo<'_>,
        tile: usize,
        cols: Option<&RecurrentCols>,
    ) -> Result<GdnDecode> {
        let what = "GatedDeltaNet decode";
        let g = GdnDims::check(what, spec, w)?;
        let (nv, dv, vd) = (g.nv, g.dv, g.vd);
        let (n_cols, batch_words, batch_flag, s) = match cols {
            None => {
                need("GatedDeltaNet proj", io.proj, g.row)?;
                need("GatedDeltaNet out", io.out, vd)?;
                need("step values", io.step, 2)?;
                (1, [g.row as u32, 0, 0], 0, g.state(io.state)?)
            }
            Some(c) => {
                let (words, s) = c.check_ssm(what, io, g.row, vd, g.kern * g.cd, nv * g.dk * dv)?;
                (c.cols, words, 8, s)
            }
        };
        let (tile, n_tiles) = tile_of(ctx, tile, dv);
        let (xq, xd, q8) = q8_buffers(what, io, n_cols * vd, dv)?;
        let consts = g.consts(ctx, w)?;
        let part = upload_zeros(ctx, n_cols * nv * n_tiles)?;
        let count = upload_zeros(ctx, n_cols * nv)?;
        let binding = ctx.bind(
            Kernel::GdnDecode,
            &[
                io.proj,
                &consts,
                &io.state.conv,
                s,
                io.out,
                io.step,
                &part,
                &count,
                xq,
                xd,
            ],
        )?;
        let push = push_words(&[
            g.nk as u32,
            nv as u32,
            g.dk as u32,
            dv as u32,
            g.kern as u32,
            g.flags | (q8 << 2) | batch_flag,
            tile as u32,
            n_tiles as u32,
            eps.to_bits(),
            batch_words[0],
            batch_words[1],
            batch_words[2],
        ]);
        Ok(GdnDecode(Dispatch {
            binding,
            push,
            groups: (n_cols * nv * n_tiles) as u64,
        }))
    }

    /// Records the step (one dispatch, no barrier after).
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        self.0.record(r)
    }
}

/// Checks a prefill op's rows (`row` values used of `ld_proj`, `width` outputs) and step
/// buffer; returns (max_tokens, ld_proj).
fn prefill_rows(
    what: &str,
    io: &PrefillIo<'_>,
    row: usize,
    width: usize,
) -> Result<(usize, usize)> {
    let t = io.max_tokens as usize;
    let ld = io.ld_proj as usize;
    if t == 0 || ld < row {
        return Err(invalid(format!(
            "{what}: {t} tokens of rows of {ld} values (want at least {row})"
        )));
    }
    elems(what, &[t, ld])?;
    elems(what, &[t, width])?;
    need(&format!("{what} proj rows"), io.proj, (t - 1) * ld + row)?;
    need(&format!("{what} out rows"), io.out, t * width)?;
    need("step values", io.step, 2)?;
    Ok((t, ld))
}

/// Where a prefill op ([`GdnPrefill`], [`Mamba2Prefill`], [`ShortConvPrefill`]) reads
/// and writes.
pub struct PrefillIo<'a> {
    /// Projection rows `[max_tokens][ld_proj]`, each laid out as the decode op's `proj`
    /// (the batched mat-vecs' output with `ld_y = ld_proj`).
    pub proj: &'a Buffer,
    pub ld_proj: u64,
    /// Output rows `[max_tokens][width]` (`width`: the decode op's `out`), the
    /// out-projection's input.
    pub out: &'a Buffer,
    pub state: &'a RecurrentState,
    /// Step values: `[0]` tokens (at most `max_tokens`), `[1]` the first one's position.
    pub step: &'a Buffer,
    pub max_tokens: u64,
}

/// GatedDeltaNet over the tokens of a prefill step, three dispatches with barriers
/// between them: `conv_rows` (conv + SiLU of every token, ring update;
/// `ceil(conv_dim / workgroup size)` workgroups), `gdn_chunk` (the delta rule in chunks
/// of 64 tokens, the chunked form of caldera-cpu's `delta_chunked`; `n_v · ceil(dv /
/// workgroup size)` workgroups) and `gdn_norm` (the gated RMSNorm; `max_tokens · n_v`
/// workgroups, those past the step's tokens exit). It continues the state that
/// [`GdnDecode`] keeps, in the same layout.
pub struct GdnPrefill {
    conv: Dispatch,
    chunk: Dispatch,
    norm: Dispatch,
}

impl GdnPrefill {
    pub fn new(
        ctx: &Context,
        spec: &GdnSpec,
        w: &GdnWeights,
        eps: f32,
        io: &PrefillIo<'_>,
    ) -> Result<GdnPrefill> {
        let what = "GatedDeltaNet prefill";
        let g = GdnDims::check(what, spec, w)?;
        let (t, ld) = prefill_rows(what, io, g.row, g.vd)?;
        elems(what, &[t, g.cd])?;
        let s = g.state(io.state)?;
        let consts = g.consts(ctx, w)?;
        let xc = upload_zeros(ctx, t * g.cd)?;
        let u = upload_zeros(ctx, t * g.vd)?;
        let wg = ctx.tuning().workgroup_size as usize;
        let conv = Dispatch {
            binding: ctx.bind(
                Kernel::ConvRows,
                &[io.proj, &consts, &io.state.conv, &xc, io.step],
            )?,
            push: push_words(&[g.cd as u32, g.kern as u32, ld as u32, t as u32, 0]),
            groups: g.cd.div_ceil(wg) as u64,
        };
        let n_tiles = g.dv.div_ceil(wg);
        let chunk = Dispatch {
            binding: ctx.bind(
                Kernel::GdnChunk,
                &[io.proj, &consts, &xc, s, io.out, &u, io.step],
            )?,
            push: push_words(&[
                g.nk as u32,
                g.nv as u32,
                g.dk as u32,
                g.dv as u32,
                g.kern as u32,
                g.flags,
                ld as u32,
                n_tiles as u32,
                t as u32,
            ]),
            groups: (g.nv * n_tiles) as u64,
        };
        let norm = Dispatch {
            binding: ctx.bind(Kernel::GdnNorm, &[io.proj, &consts, io.out, io.step])?,
            push: push_words(&[
                g.nv as u32,
                g.dv as u32,
                g.cd as u32,
                ld as u32,
                g.norm_at() as u32,
                eps.to_bits(),
            ]),
            groups: (t * g.nv) as u64,
        };
        Ok(GdnPrefill { conv, chunk, norm })
    }

    /// Records the step: three dispatches with barriers between them, none after.
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        self.conv.record(r)?;
        r.barrier();
        self.chunk.record(r)?;
        r.barrier();
        self.norm.record(r)
    }
}

/// The checked sizes of a Mamba2 layer, as its kernels take them.
struct Mamba2Dims {
    nh: usize,
    hp: usize,
    ns: usize,
    ng: usize,
    kern: usize,
    /// d_inner
    di: usize,
    /// conv_dim
    cd: usize,
    /// A projection row: `in_proj_rows`.
    row: usize,
}

impl Mamba2Dims {
    fn check(what: &str, spec: &Mamba2Spec, w: &Mamba2Weights) -> Result<Mamba2Dims> {
        spec.validate()
            .map_err(|e| invalid(format!("{what}: {e}")))?;
        let (nh, ns) = (spec.n_heads, spec.d_state);
        if ns > MAX_RECURRENT_DIM {
            return Err(invalid(format!(
                "{what}: state size {ns} is above {MAX_RECURRENT_DIM}"
            )));
        }
        let (di, cd, kern) = (spec.d_inner(), spec.conv_dim(), spec.d_conv);
        elems(what, &[cd, kern + 1])?;
        elems(what, &[di, ns])?;
        let row = elems(what, &[spec.in_proj_rows()])?;
        need_len("ssm_conv1d", &w.conv, cd * kern)?;
        if let Some(b) = &w.conv_bias {
            need_len("ssm_conv1d.bias", b, cd)?;
        }
        need_len("ssm_dt.bias", &w.dt_bias, nh)?;
        need_len("ssm_a", &w.a, nh)?;
        need_len("ssm_d", &w.d, nh)?;
        need_len("ssm_norm", &w.norm, di)?;
        Ok(Mamba2Dims {
            nh,
            hp: spec.head_dim,
            ns,
            ng: spec.n_groups,
            kern,
            di,
            cd,
            row,
        })
    }

    /// The state's S, after checking both buffers' sizes.
    fn state<'a>(&self, st: &'a RecurrentState) -> Result<&'a Buffer> {
        need("Mamba2 conv ring", &st.conv, self.kern * self.cd)?;
        let s = st
            .ssm
            .as_ref()
            .ok_or_else(|| invalid("Mamba2: a state without S".into()))?;
        need("Mamba2 state", s, self.di * self.ns)?;
        Ok(s)
    }

    /// The kernels' constants: conv taps, conv bias, dt_bias, A, D, norm.
    fn consts(&self, ctx: &Context, w: &Mamba2Weights) -> Result<Buffer> {
        upload_consts(
            ctx,
            &w.conv,
            w.conv_bias.as_deref(),
            self.cd,
            &[&w.dt_bias, &w.a, &w.d, &w.norm],
        )
    }

    /// Offset of dt_bias in the constants (A, D and the norm follow).
    fn dt_bias_at(&self) -> usize {
        self.cd * (self.kern + 1)
    }
}

/// The Mamba2 decode step (`mamba2_decode.comp`): conv, dt, the SSM update with D skip
/// and the gated group RMSNorm of every head, one dispatch. See the module doc for the
/// buffers.
pub struct Mamba2Decode(Dispatch);

impl Mamba2Decode {
    /// Binds the op for a layer of `spec` with weights `w` (only its vectors are read;
    /// uploaded here), RMSNorm epsilon `eps`, over `io`.
    pub fn new(
        ctx: &Context,
        spec: &Mamba2Spec,
        w: &Mamba2Weights,
        eps: f32,
        io: &RecurrentIo<'_>,
    ) -> Result<Mamba2Decode> {
        Mamba2Decode::with_tile(ctx, spec, w, eps, io, DEFAULT_TILE)
    }

    /// [`Mamba2Decode::new`] with `tile` head channels per workgroup (capped by the head
    /// size and the workgroup size).
    pub fn with_tile(
        ctx: &Context,
        spec: &Mamba2Spec,
        w: &Mamba2Weights,
        eps: f32,
        io: &RecurrentIo<'_>,
        tile: usize,
    ) -> Result<Mamba2Decode> {
        Mamba2Decode::build(ctx, spec, w, eps, io, tile, None)
    }

    /// The op over a batched decode step's columns (see [`RecurrentCols`]), each on its
    /// own slot's state: one dispatch for every column.
    pub fn batched(
        ctx: &Context,
        spec: &Mamba2Spec,
        w: &Mamba2Weights,
        eps: f32,
        io: &RecurrentIo<'_>,
        cols: &RecurrentCols,
    ) -> Result<Mamba2Decode> {
        Mamba2Decode::build(ctx, spec, w, eps, io, DEFAULT_TILE, Some(cols))
    }

    fn build(
        ctx: &Context,
        spec: &Mamba2Spec,
        w: &Mamba2Weights,
        eps: f32,
        io: &RecurrentIo<'_>,
        tile: usize,
        cols: Option<&RecurrentCols>,
    ) -> Result<Mamba2Decode> {
        let what = "Mamba2 decode";
        let g = Mamba2Dims::check(what, spec, w)?;
        let (nh, hp, ns, ng, kern, di) = (g.nh, g.hp, g.ns, g.ng, g.kern, g.di);
        let (n_cols, batch_words, batch_flag, s) = match cols {
            None => {
                need("Mamba2 proj", io.proj, g.row)?;
                need("Mamba2 out", io.out, di)?;
                need("step values", io.step, 2)?;
                (1, [g.row as u32, 0, 0], 0, g.state(io.state)?)
            }
            Some(c) => {
                let (words, s) = c.check_ssm(what, io, g.row, di, kern * g.cd, di * ns)?;
                (c.cols, words, 2, s)
            }
        };
        let (tile, n_tiles) = tile_of(ctx, tile, hp);
        let consts = g.consts(ctx, w)?;
        let (xq, xd, q8) = q8_buffers(what, io, n_cols * di, di / ng)?;
        let part = upload_zeros(ctx, n_cols * nh * n_tiles)?;
        let count = upload_zeros(ctx, n_cols * ng)?;
        let binding = ctx.bind(
            Kernel::Mamba2Decode,
            &[
                io.proj,
                &consts,
                &io.state.conv,
                s,
                io.out,
                io.step,
                &part,
                &count,
                xq,
                xd,
            ],
        )?;
        let push = push_words(&[
            nh as u32,
            hp as u32,
            ns as u32,
            ng as u32,
            kern as u32,
            tile as u32,
            n_tiles as u32,
            q8 | batch_flag,
            eps.to_bits(),
            spec.dt_min.to_bits(),
            batch_words[0],
            batch_words[1],
            batch_words[2],
        ]);
        Ok(Mamba2Decode(Dispatch {
            binding,
            push,
            groups: (n_cols * nh * n_tiles) as u64,
        }))
    }

    /// Records the step (one dispatch, no barrier after).
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        self.0.record(r)
    }
}

/// The kernel that runs a Mamba2 prefill's SSM (part 2 of [`Mamba2Prefill`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mamba2Ssm {
    /// `mamba2_chunk`: chunks of 64 tokens in the SSD form (caldera-cpu's
    /// `SsmForm::Chunked(64)`); `H · ceil(P / 32)` workgroups of 128.
    Chunk,
    /// `mamba2_scan`: the recurrence token after token (`SsmForm::Recurrent`);
    /// `H · ceil(P / tile)` workgroups.
    Scan,
}

/// Mamba2 over the tokens of a prefill step, three dispatches with barriers between
/// them: `conv_rows` (conv + SiLU of xBC for every token, ring update;
/// `ceil(conv_dim / workgroup size)` workgroups), the SSM gated by silu(z)
/// ([`Mamba2Ssm`]: `mamba2_chunk` by default, `mamba2_scan` where the device does not fit
/// it or with `CALDERA_VK_MAMBA2_SCAN=1`) and `mamba2_norm` (the group RMSNorm;
/// `max_tokens · G` workgroups). It continues the state that [`Mamba2Decode`] keeps, in
/// the same layout.
pub struct Mamba2Prefill {
    conv: Dispatch,
    ssm: Dispatch,
    norm: Dispatch,
}

impl Mamba2Prefill {
    /// The op with the context's SSM kernel ([`crate::kernels::Tuning::mamba2_chunk`]).
    pub fn new(
        ctx: &Context,
        spec: &Mamba2Spec,
        w: &Mamba2Weights,
        eps: f32,
        io: &PrefillIo<'_>,
    ) -> Result<Mamba2Prefill> {
        let ssm = if ctx.tuning().mamba2_chunk {
            Mamba2Ssm::Chunk
        } else {
            Mamba2Ssm::Scan
        };
        Mamba2Prefill::with_ssm(ctx, spec, w, eps, io, ssm)
    }

    /// [`Mamba2Prefill::new`] with the SSM through `ssm` (an error where the device does
    /// not fit it).
    pub fn with_ssm(
        ctx: &Context,
        spec: &Mamba2Spec,
        w: &Mamba2Weights,
        eps: f32,
        io: &PrefillIo<'_>,
        ssm: Mamba2Ssm,
    ) -> Result<Mamba2Prefill> {
        let what = "Mamba2 prefill";
        let g = Mamba2Dims::check(what, spec, w)?;
        let (t, ld) = prefill_rows(what, io, g.row, g.di)?;
        elems(what, &[t, g.cd])?;
        let s = g.state(io.state)?;
        let consts = g.consts(ctx, w)?;
        let xc = upload_zeros(ctx, t * g.cd)?;
        let wg = ctx.tuning().workgroup_size as usize;
        let conv = Dispatch {
            binding: ctx.bind(
                Kernel::ConvRows,
                &[io.proj, &consts, &io.state.conv, &xc, io.step],
            )?,
            push: push_words(&[g.cd as u32, g.kern as u32, ld as u32, t as u32, g.di as u32]),
            groups: g.cd.div_ceil(wg) as u64,
        };
        let buffers = [io.proj, &consts, &xc, s, io.out, io.step];
        // The two kernels' push constants differ only in the channel tiling: the scan
        // takes its tile size before the tile count.
        let (kernel, tile, n_tiles) = match ssm {
            Mamba2Ssm::Chunk => (
                Kernel::Mamba2Chunk,
                None,
                g.hp.div_ceil(MAMBA2_CHUNK_CHANNELS),
            ),
            Mamba2Ssm::Scan => {
                let (tile, n_tiles) = tile_of(ctx, DEFAULT_TILE, g.hp);
                (Kernel::Mamba2Scan, Some(tile as u32), n_tiles)
            }
        };
        let words: Vec<u32> = [g.nh as u32, g.hp as u32, g.ns as u32, g.ng as u32]
            .into_iter()
            .chain(tile)
            .chain([
                n_tiles as u32,
                ld as u32,
                t as u32,
                g.dt_bias_at() as u32,
                spec.dt_min.to_bits(),
            ])
            .collect();
        let ssm = Dispatch {
            binding: ctx.bind(kernel, &buffers)?,
            push: push_words(&words),
            groups: (g.nh * n_tiles) as u64,
        };
        let norm = Dispatch {
            binding: ctx.bind(Kernel::Mamba2Norm, &[&consts, io.out, io.step])?,
            push: push_words(&[
                g.ng as u32,
                (g.di / g.ng) as u32,
                (g.dt_bias_at() + 3 * g.nh) as u32,
                eps.to_bits(),
            ]),
            groups: (t * g.ng) as u64,
        };
        Ok(Mamba2Prefill { conv, ssm, norm })
    }

    /// Records the step: three dispatches with barriers between them, none after.
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        self.conv.record(r)?;
        r.barrier();
        self.ssm.record(r)?;
        r.barrier();
        self.norm.record(r)
    }
}

/// The short-conv decode step (`shortconv_decode.comp`): `C · conv(B · x)` over the
/// rolling state, one dispatch. See the module doc for the buffers.
pub struct ShortConvDecode(Dispatch);

impl ShortConvDecode {
    /// Binds the op for a layer of `spec` with weights `w` (only its conv taps and bias
    /// are read; uploaded here) over `io` (`io.step` is not read).
    pub fn new(
        ctx: &Context,
        spec: &ShortConvSpec,
        w: &ShortConvWeights,
        io: &RecurrentIo<'_>,
    ) -> Result<ShortConvDecode> {
        ShortConvDecode::build(ctx, spec, w, io, None)
    }

    /// The op over a batched decode step's columns (see [`RecurrentCols`]; no S), each
    /// on its own slot's state: one dispatch for every column.
    pub fn batched(
        ctx: &Context,
        spec: &ShortConvSpec,
        w: &ShortConvWeights,
        io: &RecurrentIo<'_>,
        cols: &RecurrentCols,
    ) -> Result<ShortConvDecode> {
        ShortConvDecode::build(ctx, spec, w, io, Some(cols))
    }

    fn build(
        ctx: &Context,
        spec: &ShortConvSpec,
        w: &ShortConvWeights,
        io: &RecurrentIo<'_>,
        cols: Option<&RecurrentCols>,
    ) -> Result<ShortConvDecode> {
        let what = "short conv decode";
        let (c, kern) = short_conv_dims(what, spec, w)?;
        if io.q8.is_some() {
            return Err(invalid(format!(
                "{what}: no int8 output (quantize with QuantX)"
            )));
        }
        let (n_cols, words, flags) = match cols {
            None => {
                need("short conv proj", io.proj, 3 * c)?;
                need("short conv out", io.out, c)?;
                need("short conv state", &io.state.conv, (kern - 1) * c)?;
                (1, [3 * c as u32, 0, 0], 0)
            }
            Some(cs) => (cs.cols, cs.check(what, io, 3 * c, c, (kern - 1) * c, 0)?, 1),
        };
        let consts = upload_consts(ctx, &w.conv, w.conv_bias.as_deref(), c, &[])?;
        let binding = ctx.bind(
            Kernel::ShortConvDecode,
            &[io.proj, &consts, &io.state.conv, io.out, io.step],
        )?;
        let wg = ctx.tuning().workgroup_size as u64;
        Ok(ShortConvDecode(Dispatch {
            binding,
            push: push_words(&[c as u32, kern as u32, flags, words[0], words[1]]),
            groups: n_cols as u64 * (c as u64).div_ceil(wg),
        }))
    }

    /// Records the step (one dispatch, no barrier after).
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        self.0.record(r)
    }
}

/// The short conv over the tokens of a prefill step (`shortconv_rows.comp`): one
/// dispatch of `ceil(c / workgroup size)` workgroups, each invocation a channel through
/// every token. Continues [`ShortConvDecode`]'s state; `io.proj` rows as its `proj`,
/// `io.out` rows of `c`.
pub struct ShortConvPrefill(Dispatch);

impl ShortConvPrefill {
    pub fn new(
        ctx: &Context,
        spec: &ShortConvSpec,
        w: &ShortConvWeights,
        io: &PrefillIo<'_>,
    ) -> Result<ShortConvPrefill> {
        let what = "short conv prefill";
        let (c, kern) = short_conv_dims(what, spec, w)?;
        let (t, ld) = prefill_rows(what, io, 3 * c, c)?;
        need("short conv state", &io.state.conv, (kern - 1) * c)?;
        let consts = upload_consts(ctx, &w.conv, w.conv_bias.as_deref(), c, &[])?;
        let binding = ctx.bind(
            Kernel::ShortConvRows,
            &[io.proj, &consts, &io.state.conv, io.out, io.step],
        )?;
        let wg = ctx.tuning().workgroup_size as u64;
        Ok(ShortConvPrefill(Dispatch {
            binding,
            push: push_words(&[c as u32, kern as u32, ld as u32, t as u32]),
            groups: (c as u64).div_ceil(wg),
        }))
    }

    /// Records the step (one dispatch, no barrier after).
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        self.0.record(r)
    }
}

/// A short conv's checked (channels, kernel length).
fn short_conv_dims(
    what: &str,
    spec: &ShortConvSpec,
    w: &ShortConvWeights,
) -> Result<(usize, usize)> {
    let (c, kern) = (spec.channels, spec.l_cache);
    if c == 0 || kern == 0 {
        return Err(invalid(format!(
            "{what}: {c} channels, kernel length {kern}"
        )));
    }
    elems(what, &[c, kern + 1])?;
    elems(what, &[c, 3])?;
    need_len("shortconv.conv", &w.conv, c * kern)?;
    if let Some(b) = &w.conv_bias {
        need_len("shortconv.conv.bias", b, c)?;
    }
    Ok((c, kern))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_round_trip() {
        let (kern, ch) = (4, 3);
        let hist: Vec<f32> = (0..(kern - 1) * ch).map(|i| i as f32).collect();
        for pos in [0u64, 1, 5, 7, 1000] {
            let ring = ring_from_history(&hist, kern, ch, pos).unwrap();
            // The row the step at `pos` writes stays zero.
            let w = (pos % kern as u64) as usize;
            assert!(ring[w * ch..(w + 1) * ch].iter().all(|&v| v == 0.0));
            assert_eq!(history_from_ring(&ring, kern, ch, pos).unwrap(), hist);
        }
        assert!(ring_from_history(&hist, 3, ch, 0).is_err());
        assert!(history_from_ring(&[0.0; 12], 0, 3, 0).is_err());
    }
}
