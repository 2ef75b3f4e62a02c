//! Ops built on the kernel table: each is bound once (descriptor sets made at `new`)
//! and recorded into as many [`Recording`]s as wanted. `*_host` helpers run one op on
//! host data, for tests and checks.

use caldera_format::GgmlType;

use crate::context::Context;
use crate::error::{Result, VkError};
use crate::kernels::{mvc_k_step, Kernel, MvqnVariant, MMT_ROWS, MMT_TOKENS, MVC_COLS, MVC_ROWS};
use crate::memory::{Buffer, DeviceTensor, MemoryKind};
use crate::record::{Binding, Recorder};

pub(crate) fn u32_of(v: u64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| VkError::Invalid(format!("{what} = {v} does not fit in 32 bits")))
}

/// Push constants made of 32-bit words, little-endian.
/// The mat-vecs' profiling switches, `CALDERA_VK_MV_DEBUG` (bits; 0 when unset): they
/// give wrong results and only time parts of a kernel. Bit 0 drops the block tails'
/// per-output fence, bit 1 the tails after the stores (mvq.glsl's MV_DBG_*), bit 2 the
/// fused MoE router's routing (mv.glsl's MV_DBG_NOTAIL).
pub(crate) fn mv_debug() -> u32 {
    std::env::var("CALDERA_VK_MV_DEBUG")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0)
}

pub(crate) fn push_words(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// That `w`'s rows hold `k` elements of `ty` each.
fn check_rows(ty: GgmlType, w: &DeviceTensor, k: u64) -> Result<()> {
    if k == 0 || ty.row_bytes(k) != Some(w.row_bytes) {
        return Err(VkError::Invalid(format!(
            "rows of {} bytes do not hold {k} elements of {ty}",
            w.row_bytes
        )));
    }
    Ok(())
}

/// Weight rows per output: 2 for a gate/up mat-vec (whose pieces must then hold whole
/// row pairs), else 1.
fn rows_per_output(w: &DeviceTensor, glu: bool) -> Result<u64> {
    if !glu {
        return Ok(1);
    }
    if w.pieces
        .iter()
        .any(|pc| pc.rows % 2 != 0 || pc.first_row % 2 != 0)
    {
        return Err(VkError::Invalid(
            "gate/up mat-vec: pieces must hold whole row pairs".into(),
        ));
    }
    Ok(2)
}

/// A mat-vec's dispatches, one per weight piece: its binding, push constants and output
/// rows, `per_group` rows to a workgroup.
struct PieceDispatches {
    parts: Vec<(Binding, Vec<u8>, u64)>,
    per_group: u32,
}

impl PieceDispatches {
    fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        for (b, push, rows) in &self.parts {
            r.dispatch(b, push, rows.div_ceil(self.per_group as u64))?;
        }
        Ok(())
    }
}

/// `y[i] = Σ_j W[i][j] x[j]` for the `rows` rows of a weight tensor of type `ty`, read
/// straight from its blocks; x and y f32: a plain [`Mv`]. One dispatch per piece.
pub struct MatVec(Mv);

impl MatVec {
    /// Binds `w` (`rows` rows of `k` elements of `ty`), x (`k` f32) and y (`w.rows` f32).
    pub fn new(
        ctx: &Context,
        ty: GgmlType,
        w: &DeviceTensor,
        k: u64,
        x: &Buffer,
        y: &Buffer,
    ) -> Result<MatVec> {
        Mv::new(ctx, ty, w, k, x, y, 0, None, MvMode::default()).map(MatVec)
    }

    /// Records the mat-vec (one dispatch per weight piece, no barrier after).
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        self.0.record(r)
    }
}

/// RMSNorm of `rows` rows of `n` f32: `y = x / sqrt(mean(x²) + eps) * w`.
pub struct RmsNorm {
    binding: Binding,
    push: [u8; 12],
    rows: u64,
}

impl RmsNorm {
    /// Binds x (`rows * n` f32), w (`n` f32) and y (`rows * n` f32).
    pub fn new(
        ctx: &Context,
        n: u64,
        rows: u64,
        eps: f32,
        x: &Buffer,
        w: &Buffer,
        y: &Buffer,
    ) -> Result<RmsNorm> {
        let total = n.checked_mul(rows).and_then(|v| v.checked_mul(4));
        if n == 0 || total.is_none_or(|t| x.size() < t || y.size() < t) || w.size() < n * 4 {
            return Err(VkError::Invalid(format!(
                "rms_norm of {rows} rows of {n}: buffers too small"
            )));
        }
        let mut push = [0u8; 12];
        push[0..4].copy_from_slice(&u32_of(n, "n")?.to_le_bytes());
        push[4..8].copy_from_slice(&u32_of(rows, "rows")?.to_le_bytes());
        push[8..12].copy_from_slice(&eps.to_le_bytes());
        Ok(RmsNorm {
            binding: ctx.bind(Kernel::RmsNorm, &[x, w, y])?,
            push,
            rows,
        })
    }

    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        r.dispatch(&self.binding, &self.push, self.rows)
    }
}

/// Runs one mat-vec on host data: `w` holds `w.len() / row_bytes` rows of `k` elements
/// of `ty` (raw blocks), `x` holds `k` values. Returns y.
pub fn matvec_host(ctx: &Context, ty: GgmlType, w: &[u8], k: usize, x: &[f32]) -> Result<Vec<f32>> {
    mv_host(ctx, ty, w, k, x, None, None, MvMode::default())
}

/// Runs RMSNorm on host data: `x` holds rows of `w.len()` values.
pub fn rms_norm_host(ctx: &Context, x: &[f32], w: &[f32], eps: f32) -> Result<Vec<f32>> {
    let n = w.len();
    if n == 0 || !x.len().is_multiple_of(n) {
        return Err(VkError::Invalid(format!(
            "rms_norm: {} values are not rows of {n}",
            x.len()
        )));
    }
    let xb = ctx.upload_f32(x)?;
    let wb = ctx.upload_f32(w)?;
    let yb = ctx.create_buffer((x.len() * 4) as u64, MemoryKind::Device)?;
    let op = RmsNorm::new(ctx, n as u64, (x.len() / n) as u64, eps, &xb, &wb, &yb)?;
    let rec = ctx.record(|r| op.record(r))?;
    ctx.submit(&rec)?;
    ctx.read_f32(&yb, x.len())
}

/// How a [`Mm`] transforms its input and stores its output (`mm.glsl`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MmMode {
    /// Input is `rmsnorm(x_t) * gam` (needs `gam`, `k` values).
    pub norm: bool,
    /// Input is `act(x_t[2c]) * x_t[2c + 1]`: each x row holds (gate, up) pairs, as the
    /// interleaved gate/up weight writes them.
    pub glu: Option<GluAct>,
    /// `y += W x` (residual add) instead of `y = W x`.
    pub add: bool,
    /// `y = cap * tanh(y / cap)`.
    pub softcap: Option<f32>,
    /// Run over tokens `step[2] .. step[2] + step[3]` (logits rows) instead of `0 .. step[0]`;
    /// output rows are numbered from `step[2]`.
    pub token_select: bool,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Keep the batched mat-vec (`mm.glsl`) over several tokens instead of the tiled
    /// matmul (a batched decode step may ask for it: `CALDERA_VK_BATCH_MM=mm`).
    pub rowwise: bool,
}

/// The activation of a gated MLP folded into its down projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GluAct {
    Silu,
    GeluTanh,
}

/// Prefill mat-vec over the tokens of a step (count from the step buffer):
/// `y[t * ld_y + y_offset + r] (+)= W[r] · input(x[t * ld_x ..])` for every row `r` of a
/// weight tensor of type `ty`, read straight from its blocks. Over more than one token
/// (and where [`Tuning::tiled_mm`](crate::kernels::Tuning) holds) the tiled matmul
/// (`mmt.glsl`: tiles of 128 rows x 64 tokens, each weight block dequantized once per
/// tile); else the batched mat-vec (`mm.glsl`, each weight row read once per 8 tokens).
/// One dispatch per weight piece.
pub struct Mm {
    /// Per piece: binding, push constants, workgroups.
    parts: Vec<(Binding, Vec<u8>, u64)>,
    tiled: bool,
    coopmat: bool,
}

/// Where a [`Mm`] reads and writes.
pub struct MmIo<'a> {
    /// Input rows, `ld_x` elements apart.
    pub x: &'a Buffer,
    pub ld_x: u64,
    /// Output rows, `ld_y` elements apart; row `r` of the weight lands at `y_offset + r`.
    pub y: &'a Buffer,
    pub ld_y: u64,
    pub y_offset: u64,
    /// Weights (`k` f32) the input is multiplied by: the norm's for [`MmMode::norm`]; when
    /// `None` (or shorter than `k`) a buffer of ones is made.
    pub gam: Option<&'a Buffer>,
    /// Step values: `[tokens, first position, first logits token, logits tokens]` (u32).
    pub step: &'a Buffer,
    /// The most tokens one step runs (sizes are checked against it).
    pub max_tokens: u64,
}

impl Mm {
    pub fn new(
        ctx: &Context,
        ty: GgmlType,
        w: &DeviceTensor,
        k: u64,
        io: &MmIo<'_>,
        mode: MmMode,
    ) -> Result<Mm> {
        let t = io.max_tokens.max(1);
        let tiled = ctx.tuning().tiled_mm && t > 1 && !mode.rowwise;
        let kernel = if tiled && ctx.tuning().coopmat_mm.is_some() {
            Kernel::mmc_for(ty)
        } else if tiled {
            Kernel::mmt_for(ty)
        } else {
            Kernel::mm_for(ty, mode.glu.is_some())
        }
        .ok_or_else(|| {
            VkError::Invalid(format!("no Vulkan mat-vec kernel for tensor type {ty} yet"))
        })?;
        check_rows(ty, w, k)?;
        if mode.norm && mode.glu.is_some() {
            return Err(VkError::Invalid(
                "a mat-vec cannot both norm its input and take a GLU input".into(),
            ));
        }
        let x_width = if mode.glu.is_some() { 2 * k } else { k };
        let x_need = ((t - 1) * io.ld_x + x_width) * 4;
        let y_need = ((t - 1) * io.ld_y + io.y_offset + w.rows) * 4;
        if io.ld_x < x_width
            || io.ld_y < io.y_offset + w.rows
            || io.x.size() < x_need
            || io.y.size() < y_need
            || (mode.norm && io.gam.is_none_or(|g| g.size() < k * 4))
            || io.step.size() < 16
        {
            return Err(VkError::Invalid(format!(
                "mat-vec of {} x {k} over {t} tokens: buffers too small or strides too short",
                w.rows
            )));
        }
        let mut flags = 0u32;
        if mode.norm {
            flags |= 1;
        }
        if mode.add {
            flags |= 2;
        }
        match mode.glu {
            Some(GluAct::Silu) => flags |= 4,
            Some(GluAct::GeluTanh) => flags |= 8,
            None => {}
        }
        if mode.softcap.is_some() {
            flags |= 16;
        }
        if mode.token_select {
            flags |= 32;
        }
        let ones;
        let gam = match io.gam {
            Some(g) if g.size() >= k * 4 => g,
            _ if mode.glu.is_some() => io.x,
            _ => {
                ones = ctx.upload_f32(&vec![1.0; k as usize])?;
                &ones
            }
        };
        let ttiles = t.div_ceil(MMT_TOKENS);
        let mut parts = Vec::with_capacity(w.pieces.len());
        for piece in &w.pieces {
            let b = ctx.bind(kernel, &[&piece.buffer, io.x, io.y, gam, io.step])?;
            let mut words = vec![
                u32_of(k, "k")?,
                u32_of(piece.rows, "rows")?,
                u32_of(io.y_offset + piece.first_row, "y offset")?,
                u32_of(io.ld_x, "x stride")?,
                u32_of(io.ld_y, "y stride")?,
                flags,
                mode.eps.to_bits(),
                mode.softcap.unwrap_or(0.0).to_bits(),
            ];
            let groups = if tiled {
                words.push(u32_of(ttiles, "token tiles")?);
                piece.rows.div_ceil(MMT_ROWS) * ttiles
            } else {
                piece.rows.div_ceil(ctx.tuning().rows_per_group as u64)
            };
            parts.push((b, push_words(&words), groups));
        }
        Ok(Mm {
            parts,
            tiled,
            coopmat: tiled && ctx.tuning().coopmat_mm.is_some(),
        })
    }

    /// Records the mat-vec (one dispatch per weight piece, no barrier after).
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        for (b, push, groups) in &self.parts {
            r.dispatch(b, push, *groups)?;
        }
        Ok(())
    }

    /// Dispatches [`Mm::record`] makes.
    pub fn dispatches(&self) -> usize {
        self.parts.len()
    }

    /// Whether it runs the tiled matmul (`mmt.glsl`, or `mmc.glsl` where
    /// [`Tuning::coopmat_mm`](crate::kernels::Tuning) holds) rather than the batched
    /// mat-vec.
    pub fn tiled(&self) -> bool {
        self.tiled
    }

    /// Whether it runs the tiled matmul on cooperative matrices (`mmc.glsl`).
    pub fn coopmat(&self) -> bool {
        self.coopmat
    }
}

/// Runs one [`Mm`] on host data: `w` holds rows of `k` elements of `ty`; `x` holds `m`
/// token rows of `k` values (`2k` with `glu`); `gam` the norm weights when `mode.norm`.
/// With `mode.add`, `y` starts from `y0` (`m * rows` values). Returns `m * rows` values.
#[allow(clippy::too_many_arguments)]
pub fn mm_host(
    ctx: &Context,
    ty: GgmlType,
    w: &[u8],
    k: usize,
    x: &[f32],
    m: usize,
    gam: Option<&[f32]>,
    y0: Option<&[f32]>,
    mode: MmMode,
) -> Result<Vec<f32>> {
    let row_bytes = ty
        .row_bytes(k as u64)
        .ok_or_else(|| VkError::Invalid(format!("{k} elements are not whole {ty} blocks")))?;
    let width = if mode.glu.is_some() { 2 * k } else { k };
    if m == 0 || x.len() != m * width {
        return Err(VkError::Invalid(format!(
            "x has {} values, want {m} x {width}",
            x.len()
        )));
    }
    let wt = ctx.upload_rows(w, row_bytes)?;
    let rows = wt.rows as usize;
    let xb = ctx.upload_f32(x)?;
    let yb = match y0 {
        Some(y0) if y0.len() == m * rows => ctx.upload_f32(y0)?,
        Some(_) => return Err(VkError::Invalid("y0 has the wrong length".into())),
        None => ctx.create_buffer((m * rows * 4).max(4) as u64, MemoryKind::Device)?,
    };
    let gb = gam
        .filter(|_| mode.norm)
        .map(|g| ctx.upload_f32(g))
        .transpose()?;
    let step = ctx.create_buffer(16, MemoryKind::Upload)?;
    let vals = [m as u32, 0, 0, m as u32];
    let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    ctx.write_mapped(&step, 0, &bytes)?;
    let io = MmIo {
        x: &xb,
        ld_x: width as u64,
        y: &yb,
        ld_y: rows as u64,
        y_offset: 0,
        gam: gb.as_ref(),
        step: &step,
        max_tokens: m as u64,
    };
    let op = Mm::new(ctx, ty, &wt, k as u64, &io, mode)?;
    let rec = ctx.record(|r| op.record(r))?;
    ctx.submit(&rec)?;
    ctx.read_f32(&yb, m * rows)
}

/// How a [`Mv`] transforms its input and stores its output (`mv.glsl`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MvMode {
    /// Input is `rmsnorm(x) * gam`.
    pub norm: bool,
    /// The weight rows are (gate, up) pairs, rows 2i and 2i + 1; output i is
    /// `act(gate_i · in) * (up_i · in)`.
    pub glu: Option<GluAct>,
    /// `y += W x` (residual add) instead of `y = W x`.
    pub add: bool,
    /// `y = cap * tanh(y / cap)`.
    pub softcap: Option<f32>,
    /// `y = max(y, 0)²`, after the softcap and before the add: the up projection of an
    /// ungated relu² MLP (Nemotron-H).
    pub relu2: bool,
    /// RMSNorm epsilon.
    pub eps: f32,
}

impl MvMode {
    /// The `MV_*` bits of `mv.glsl` / `mvq.glsl` for this mode.
    fn flags(&self) -> u32 {
        let mut flags = 0u32;
        if self.norm {
            flags |= 1;
        }
        if self.add {
            flags |= 2;
        }
        if self.glu == Some(GluAct::GeluTanh) {
            flags |= 8;
        }
        if self.softcap.is_some() {
            flags |= 16;
        }
        if self.relu2 {
            flags |= 256;
        }
        flags
    }
}

/// Decode mat-vec (one token): `y[y_offset + i] (+)= W[i] · input(x)` for every row
/// (or gate/up pair) of a weight tensor of type `ty`, read straight from its blocks with
/// coalesced loads, x loaded once per block for all the rows of a workgroup. One
/// dispatch per weight piece.
pub struct Mv(PieceDispatches);

impl Mv {
    /// Binds `w` (rows of `k` elements of `ty`; with `mode.glu`, interleaved gate/up
    /// pairs whose pieces hold whole pairs), x (`k` f32), y and, for `mode.norm`, gam
    /// (`k` f32).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &Context,
        ty: GgmlType,
        w: &DeviceTensor,
        k: u64,
        x: &Buffer,
        y: &Buffer,
        y_offset: u64,
        gam: Option<&Buffer>,
        mode: MvMode,
    ) -> Result<Mv> {
        let kernel = Kernel::mv_for(ty, mode.glu.is_some()).ok_or_else(|| {
            VkError::Invalid(format!("no Vulkan mat-vec kernel for tensor type {ty} yet"))
        })?;
        check_rows(ty, w, k)?;
        if Kernel::mv_is_fast(ty) && !k.is_multiple_of(4) {
            return Err(VkError::Invalid(format!(
                "mat-vec over {k} elements of {ty}"
            )));
        }
        let per = rows_per_output(w, mode.glu.is_some())?;
        let outs = w.rows / per;
        if x.size() < k * 4
            || y.size() < (y_offset + outs) * 4
            || (mode.norm && gam.is_none_or(|g| g.size() < k * 4))
        {
            return Err(VkError::Invalid(format!(
                "mat-vec of {} x {k}: buffers too small",
                w.rows
            )));
        }
        let gam = gam.filter(|_| mode.norm).unwrap_or(x);
        let mut parts = Vec::with_capacity(w.pieces.len());
        for piece in &w.pieces {
            let b = ctx.bind(kernel, &[&piece.buffer, x, y, gam])?;
            let push = push_words(&[
                u32_of(k, "k")?,
                u32_of(piece.rows, "rows")?,
                u32_of(y_offset + piece.first_row / per, "y offset")?,
                mode.flags(),
                mode.eps.to_bits(),
                mode.softcap.unwrap_or(0.0).to_bits(),
            ]);
            parts.push((b, push, piece.rows / per));
        }
        Ok(Mv(PieceDispatches {
            parts,
            per_group: ctx.tuning().mv_shape(mode.glu.is_some()).1,
        }))
    }

    /// Records the mat-vec (one dispatch per weight piece, no barrier after).
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        self.0.record(r)
    }

    /// Dispatches [`Mv::record`] makes.
    pub fn dispatches(&self) -> usize {
        self.0.parts.len()
    }
}

/// Runs one [`Mv`] on host data: `w` holds rows of `k` elements of `ty` (gate/up pairs
/// with `mode.glu`), `x` holds `k` values, `gam` the norm weights when `mode.norm`; with
/// `mode.add`, y starts from `y0`. Returns one value per row (per pair with `glu`).
#[allow(clippy::too_many_arguments)]
pub fn mv_host(
    ctx: &Context,
    ty: GgmlType,
    w: &[u8],
    k: usize,
    x: &[f32],
    gam: Option<&[f32]>,
    y0: Option<&[f32]>,
    mode: MvMode,
) -> Result<Vec<f32>> {
    let row_bytes = ty
        .row_bytes(k as u64)
        .ok_or_else(|| VkError::Invalid(format!("{k} elements are not whole {ty} blocks")))?;
    if x.len() != k {
        return Err(VkError::Invalid(format!(
            "x has {} values, k = {k}",
            x.len()
        )));
    }
    let group = if mode.glu.is_some() { 2 } else { 1 };
    let wt = ctx.upload_rows_grouped(&[w], row_bytes, group)?;
    let outs = (wt.rows / group) as usize;
    let xb = ctx.upload_f32(x)?;
    let yb = match y0 {
        Some(y0) if y0.len() == outs => ctx.upload_f32(y0)?,
        Some(_) => return Err(VkError::Invalid("y0 has the wrong length".into())),
        None => ctx.create_buffer((outs * 4).max(4) as u64, MemoryKind::Device)?,
    };
    let gb = gam
        .filter(|_| mode.norm)
        .map(|g| ctx.upload_f32(g))
        .transpose()?;
    let op = Mv::new(ctx, ty, &wt, k as u64, &xb, &yb, 0, gb.as_ref(), mode)?;
    let rec = ctx.record(|r| op.record(r))?;
    ctx.submit(&rec)?;
    ctx.read_f32(&yb, outs)
}

/// Quantizes an f32 vector (`k` values, a multiple of 32) for [`Mvq`]: int8 blocks of
/// 32 with an f32 scale each (`quant_x.comp`), optionally through the RMSNorm first.
pub struct QuantX {
    binding: Binding,
    push: Vec<u8>,
    groups: u64,
}

/// Int8 activations: `k / 4` words of int8 values and `k / 32` scales, as [`QuantX`]
/// writes them; `ss`, when given, holds a sum of squares per block of 32 (of the vector
/// before its norm weights): then the values are not normed yet and the mat-vec
/// reading them applies the norm's 1 / rms itself (`MV_XNORM`).
#[derive(Clone, Copy)]
pub struct Q8Acts<'a> {
    pub q: &'a Buffer,
    pub d: &'a Buffer,
    pub ss: Option<&'a Buffer>,
}

impl QuantX {
    /// `gam`: RMSNorm weights (`k` f32) to norm x by first, with `eps`.
    pub fn new(
        ctx: &Context,
        k: u64,
        x: &Buffer,
        gam: Option<&Buffer>,
        eps: f32,
        out: &Q8Acts<'_>,
    ) -> Result<QuantX> {
        if k == 0
            || !k.is_multiple_of(32)
            || x.size() < k * 4
            || gam.is_some_and(|g| g.size() < k * 4)
            || out.q.size() < k
            || out.d.size() < k / 8
        {
            return Err(VkError::Invalid(format!(
                "quantizing {k} activations: not whole blocks of 32 or buffers too small"
            )));
        }
        let binding = ctx.bind(Kernel::QuantX, &[x, gam.unwrap_or(x), out.q, out.d])?;
        let push = push_words(&[u32_of(k, "k")?, u32::from(gam.is_some()), eps.to_bits()]);
        let wg = ctx.tuning().workgroup_size as u64;
        if wg < 8 {
            return Err(VkError::Invalid(format!(
                "quant_x needs workgroups of 8 or more invocations (have {wg})"
            )));
        }
        Ok(QuantX {
            binding,
            push,
            groups: (k / 4).div_ceil(wg),
        })
    }

    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        r.dispatch(&self.binding, &self.push, self.groups)
    }
}

/// The input flags of `quant_rows.comp` and `half_rows.comp`: 1 the RMSNorm, 2 / 4 the
/// SiLU / GELU-tanh GLU of (gate, up) pairs.
fn rows_input_flags(norm: bool, glu: Option<GluAct>) -> u32 {
    u32::from(norm)
        | match glu {
            Some(GluAct::Silu) => 2,
            Some(GluAct::GeluTanh) => 4,
            None => 0,
        }
}

/// Quantizes the rows of a batched decode step (`quant_rows.comp`): row r < step[0] of
/// `x` (`ld_x` floats apart; `k` values, or `k` (gate, up) pairs with `glu`) into int8
/// blocks of 32 at `r * k / 32` of `out`, through the RMSNorm by `gam` when given; with
/// `sums`, also each block's sum of its int8 values (i32, as `out.d`) there, for a
/// [`Mvqn`] given the same buffer.
pub struct QuantRows {
    binding: Binding,
    push: Vec<u8>,
    groups: u64,
}

impl QuantRows {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &Context,
        k: u64,
        x: &Buffer,
        ld_x: u64,
        gam: Option<&Buffer>,
        glu: Option<GluAct>,
        eps: f32,
        out: &Q8Acts<'_>,
        sums: Option<&Buffer>,
        step: &Buffer,
        max_rows: u64,
    ) -> Result<QuantRows> {
        let width = if glu.is_some() { 2 * k } else { k };
        let rows = max_rows.max(1);
        if k == 0
            || !k.is_multiple_of(32)
            || !ld_x.is_multiple_of(4)
            || ld_x < width
            || x.size() < ((rows - 1) * ld_x + width) * 4
            || gam.is_some_and(|g| g.size() < k * 4)
            || (gam.is_some() && glu.is_some())
            || out.q.size() < rows * k
            || out.d.size() < rows * k / 8
            || sums.is_some_and(|b| b.size() < rows * k / 8)
            || step.size() < 4
        {
            return Err(VkError::Invalid(format!(
                "quantizing {rows} rows of {k} activations: not whole blocks of 32, buffers \
                 too small or strides too short"
            )));
        }
        let wg = ctx.tuning().workgroup_size as u64;
        if wg < 8 {
            return Err(VkError::Invalid(format!(
                "quant_rows needs workgroups of 8 or more invocations (have {wg})"
            )));
        }
        let mut flags = rows_input_flags(gam.is_some(), glu);
        if sums.is_some() {
            flags |= 8;
        }
        let gpr = (k / 4).div_ceil(wg);
        let binding = ctx.bind(
            Kernel::QuantRows,
            &[
                x,
                gam.unwrap_or(x),
                out.q,
                out.d,
                step,
                sums.unwrap_or(out.d),
            ],
        )?;
        let push = push_words(&[
            u32_of(k, "k")?,
            flags,
            eps.to_bits(),
            u32_of(ld_x, "x stride")?,
            u32_of(gpr, "workgroups per row")?,
        ]);
        Ok(QuantRows {
            binding,
            push,
            groups: gpr * rows,
        })
    }

    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        r.dispatch(&self.binding, &self.push, self.groups)
    }
}

/// Batched decode mat-vec on int8 activations (`mvqn.glsl`): for every column c <
/// step[0] (at most 16) and weight row r, `y[c * ld_y + y_offset + r] (+)= W[r] · x_c`
/// with x_c quantized by [`QuantRows`] (with `sums`: the block sums it wrote too, which
/// `mvqm_*` reads instead of summing the blocks itself; only where that `QuantRows`
/// wrote this input, not another op); softcapped with `softcap`. One dispatch per
/// weight piece. `mvqm_*` (default): a workgroup per 4 rows (8 with `mvqm8_*`,
/// [`Tuning::mvqm_rows`](crate::kernels::Tuning::mvqm_rows)) x group of 8 columns, the
/// groups of a row group adjacent (its weights come from memory once, the second group
/// finds them in cache), all of a workgroup's sums reduced in one pass; `mvqn_*`
/// ([`Tuning::mvqn_old`](crate::kernels::Tuning::mvqn_old)): a workgroup per 4 rows
/// for all 16 columns, one reduction per column.
pub struct Mvqn {
    parts: Vec<(Binding, Vec<u8>, u64)>,
}

impl Mvqn {
    /// Columns per workgroup of `mvqm_*` (`NC`).
    const GROUP_COLS: u64 = 8;
    /// Most columns (`MAXC`).
    pub const MAX_COLS: u64 = 16;

    pub fn supports(ty: GgmlType) -> bool {
        Kernel::mvqn_for(ty, MvqnVariant::Old, false).is_some()
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &Context,
        ty: GgmlType,
        w: &DeviceTensor,
        k: u64,
        acts: &Q8Acts<'_>,
        sums: Option<&Buffer>,
        y: &Buffer,
        ld_y: u64,
        y_offset: u64,
        add: bool,
        softcap: Option<f32>,
        step: &Buffer,
        max_cols: u64,
    ) -> Result<Mvqn> {
        let variant = ctx.tuning().mvqn_variant();
        let grouped = variant.grouped();
        let kernel = Kernel::mvqn_for(ty, variant, ctx.tuning().int8_dot).ok_or_else(|| {
            VkError::Invalid(format!("no batched int8 mat-vec for tensor type {ty}"))
        })?;
        check_rows(ty, w, k)?;
        let cols = max_cols.max(1);
        let be = if matches!(ty, GgmlType::Q4_K | GgmlType::Q6_K) {
            256
        } else {
            32
        };
        if cols > Self::MAX_COLS
            || !k.is_multiple_of(be)
            || ld_y < y_offset + w.rows
            || y.size() < ((cols - 1) * ld_y + y_offset + w.rows) * 4
            || acts.q.size() < cols * k
            || acts.d.size() < cols * k / 8
            || sums.is_some_and(|b| b.size() < cols * k / 8)
            || step.size() < 4
        {
            return Err(VkError::Invalid(format!(
                "batched int8 mat-vec of {} x {k} over {cols} columns: buffers too small, \
                 strides too short or too many columns",
                w.rows
            )));
        }
        let mut flags = 0u32;
        if add {
            flags |= 1;
        }
        if softcap.is_some() {
            flags |= 2;
        }
        // The block sums: the grouped kernels' current block readers only.
        if sums.is_some() && grouped {
            flags |= 4;
        }
        // Column groups per row group (mvqm).
        let ncg = if grouped {
            cols.div_ceil(Self::GROUP_COLS)
        } else {
            1
        };
        let mut parts = Vec::with_capacity(w.pieces.len());
        for piece in &w.pieces {
            let b = if grouped {
                let s = sums.unwrap_or(acts.d);
                ctx.bind(kernel, &[&piece.buffer, acts.q, acts.d, y, step, s])?
            } else {
                ctx.bind(kernel, &[&piece.buffer, acts.q, acts.d, y, step])?
            };
            let mut words = vec![
                u32_of(k, "k")?,
                u32_of(piece.rows, "rows")?,
                u32_of(y_offset + piece.first_row, "y offset")?,
                u32_of(ld_y, "y stride")?,
                flags,
                softcap.unwrap_or(0.0).to_bits(),
            ];
            if grouped {
                words.push(ncg as u32);
            }
            let groups = piece.rows.div_ceil(variant.rows()) * ncg;
            parts.push((b, push_words(&words), groups));
        }
        Ok(Mvqn { parts })
    }

    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        for (b, push, groups) in &self.parts {
            r.dispatch(b, push, *groups)?;
        }
        Ok(())
    }
}

/// The columns of a batched decode step as f16 (`half_rows.comp`) for a [`Mvc`]: row
/// r < step[0] of `x` (`ld_x` floats apart; `k` values, or `k` (gate, up) pairs with
/// `glu`) into `k` halves at `r * k` of `out`, through the RMSNorm by `gam` when given.
pub struct HalfRows {
    binding: Binding,
    push: Vec<u8>,
    groups: u64,
}

impl HalfRows {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &Context,
        k: u64,
        x: &Buffer,
        ld_x: u64,
        gam: Option<&Buffer>,
        glu: Option<GluAct>,
        eps: f32,
        out: &Buffer,
        step: &Buffer,
        max_rows: u64,
    ) -> Result<HalfRows> {
        let width = if glu.is_some() { 2 * k } else { k };
        let rows = max_rows.max(1);
        if k == 0
            || !k.is_multiple_of(4)
            || !ld_x.is_multiple_of(4)
            || ld_x < width
            || x.size() < ((rows - 1) * ld_x + width) * 4
            || gam.is_some_and(|g| g.size() < k * 4)
            || (gam.is_some() && glu.is_some())
            || out.size() < rows * k * 2
            || step.size() < 4
        {
            return Err(VkError::Invalid(format!(
                "f16 rows of {rows} x {k} activations: not whole vec4s, buffers too small \
                 or strides too short"
            )));
        }
        let wg = ctx.tuning().workgroup_size as u64;
        let flags = rows_input_flags(gam.is_some(), glu);
        let gpr = (k / 4).div_ceil(wg);
        let binding = ctx.bind(Kernel::HalfRows, &[x, gam.unwrap_or(x), out, step])?;
        let push = push_words(&[
            u32_of(k, "k")?,
            flags,
            eps.to_bits(),
            u32_of(ld_x, "x stride")?,
            u32_of(gpr, "workgroups per row")?,
        ]);
        Ok(HalfRows {
            binding,
            push,
            groups: gpr * rows,
        })
    }

    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        r.dispatch(&self.binding, &self.push, self.groups)
    }
}

/// Batched decode mat-vec on cooperative matrices (`mvc.glsl`): for every column c <
/// step[0] (at most [`Mvc::MAX_COLS`]) and weight row r, `y[c * ld_y + y_offset + r]
/// (+)= W[r] · x_c` with x_c in f16 from a [`HalfRows`] (`k` halves per column, `k` a
/// multiple of the kernel's round, [`mvc_k_step`]); softcapped with `softcap`. The weights are dequantized
/// once per step for all the columns and multiplied on the device's matrix units. One
/// dispatch per weight piece, a workgroup per [`MVC_ROWS`] rows. Every weight type
/// with a tiled matmul; the context must run it ([`Mvc::usable`]).
pub struct Mvc(PieceDispatches);

impl Mvc {
    /// Most columns.
    pub const MAX_COLS: u64 = MVC_COLS;

    /// Whether `ctx` runs it for weights of type `ty` over `k` inputs.
    pub fn usable(ctx: &Context, ty: GgmlType, k: u64) -> bool {
        ctx.tuning()
            .mvc
            .is_some_and(|sgs| k.is_multiple_of(mvc_k_step(sgs)))
            && Kernel::mvc_for(ty, false).is_some()
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &Context,
        ty: GgmlType,
        w: &DeviceTensor,
        k: u64,
        x: &Buffer,
        y: &Buffer,
        ld_y: u64,
        y_offset: u64,
        add: bool,
        softcap: Option<f32>,
        step: &Buffer,
        max_cols: u64,
    ) -> Result<Mvc> {
        let kernel = Kernel::mvc_for(ty, ctx.tuning().mvc_fixed).ok_or_else(|| {
            VkError::Invalid(format!(
                "no cooperative-matrix mat-vec for tensor type {ty}"
            ))
        })?;
        check_rows(ty, w, k)?;
        let cols = max_cols.max(1);
        let step_k = mvc_k_step(ctx.tuning().mvc.unwrap_or(32));
        // The kernel reads all 16 columns' inputs (the dead ones' products are dropped).
        if cols > Self::MAX_COLS
            || !k.is_multiple_of(step_k)
            || ld_y < y_offset + w.rows
            || y.size() < ((cols - 1) * ld_y + y_offset + w.rows) * 4
            || x.size() < Self::MAX_COLS * k * 2
            || step.size() < 4
        {
            return Err(VkError::Invalid(format!(
                "cooperative-matrix mat-vec of {} x {k} over {cols} columns: k not a \
                 multiple of {step_k}, buffers too small, strides too short or too many \
                 columns",
                w.rows
            )));
        }
        let mut flags = 0u32;
        if add {
            flags |= 1;
        }
        if softcap.is_some() {
            flags |= 2;
        }
        // Profiling switches (wrong results): bits 0-3 skip the products, the input
        // loads, the decode, the weight loads (mvc.glsl's MVC_NO_*).
        if let Some(d) = std::env::var("CALDERA_VK_MVC_DEBUG")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
        {
            flags |= (d & 15) << 2;
        }
        let mut parts = Vec::with_capacity(w.pieces.len());
        for piece in &w.pieces {
            let b = ctx.bind(kernel, &[&piece.buffer, x, y, step])?;
            let words = [
                u32_of(k, "k")?,
                u32_of(piece.rows, "rows")?,
                u32_of(y_offset + piece.first_row, "y offset")?,
                u32_of(ld_y, "y stride")?,
                flags,
                softcap.unwrap_or(0.0).to_bits(),
            ];
            parts.push((b, push_words(&words), piece.rows));
        }
        Ok(Mvc(PieceDispatches {
            parts,
            per_group: MVC_ROWS as u32,
        }))
    }

    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        self.0.record(r)
    }
}

/// What a [`Mvq`] prepares for the next mat-vec after its own output (`MV_TAIL`): the
/// workgroup completing each block of 32 outputs of `y[0 .. n]` quantizes it into `out`
/// (times the norm weights `gam`, with the block's sum of squares into `out.ss`, which
/// must be given then: the next mat-vec applies the 1 / rms).
pub struct MvTail<'a> {
    /// Zeroed u32s, one per block of 32 outputs, the kernels count stored outputs in
    /// (each reset by the workgroup that completes its block).
    pub count: &'a Buffer,
    pub out: Q8Acts<'a>,
    pub gam: Option<&'a Buffer>,
    pub n: u64,
}

/// Decode mat-vec on int8 activations (`mvq.glsl`): like [`Mv`] but x comes quantized
/// by a [`QuantX`] and meets the weights in int8 dot products. For Q4_0, Q8_0, Q4_K and
/// Q6_K weights ([`Mvq::supports`]); `mode.norm` must be off (the norm is QuantX's).
pub struct Mvq(PieceDispatches);

impl Mvq {
    /// Whether weights of type `ty` have an int8-activation kernel.
    pub fn supports(ty: GgmlType) -> bool {
        Kernel::mvq_for(ty, false, false).is_some()
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &Context,
        ty: GgmlType,
        w: &DeviceTensor,
        k: u64,
        x: &Q8Acts<'_>,
        y: &Buffer,
        y_offset: u64,
        mode: MvMode,
    ) -> Result<Mvq> {
        Mvq::with_tail(ctx, ty, w, k, x, y, y_offset, mode, None)
    }

    /// [`Mvq::new`], also quantizing the output for the next mat-vec (`tail`).
    #[allow(clippy::too_many_arguments)]
    pub fn with_tail(
        ctx: &Context,
        ty: GgmlType,
        w: &DeviceTensor,
        k: u64,
        x: &Q8Acts<'_>,
        y: &Buffer,
        y_offset: u64,
        mode: MvMode,
        tail: Option<&MvTail<'_>>,
    ) -> Result<Mvq> {
        let kernel =
            Kernel::mvq_for(ty, mode.glu.is_some(), ctx.tuning().int8_dot).ok_or_else(|| {
                VkError::Invalid(format!("no int8-activation mat-vec for tensor type {ty}"))
            })?;
        if mode.norm {
            return Err(VkError::Invalid(
                "int8-activation mat-vecs norm through QuantX or their input's sums of squares"
                    .into(),
            ));
        }
        check_rows(ty, w, k)?;
        if !k.is_multiple_of(32) {
            return Err(VkError::Invalid(format!(
                "int8-activation mat-vec over {k} elements (not whole blocks of 32)"
            )));
        }
        let per = rows_per_output(w, mode.glu.is_some())?;
        let outs = w.rows / per;
        if x.q.size() < k || x.d.size() < k / 8 || y.size() < (y_offset + outs) * 4 {
            return Err(VkError::Invalid(format!(
                "mat-vec of {} x {k}: buffers too small",
                w.rows
            )));
        }
        let mut flags = mode.flags();
        let rows_per_group = ctx.tuning().mvq_shape(mode.glu.is_some()).1 as u64;
        if let Some(ss) = x.ss {
            if ss.size() < k / 8 {
                return Err(VkError::Invalid(format!(
                    "mat-vec over {k} int8 activations: sums of squares too small"
                )));
            }
            flags |= 128;
        }
        let n_next = match tail {
            Some(t) => {
                let n_ss = t.gam.is_some() && t.out.ss.is_none_or(|s| s.size() < t.n / 8);
                if t.n == 0
                    || !t.n.is_multiple_of(32)
                    || y.size() < t.n * 4
                    || t.out.q.size() < t.n
                    || t.out.d.size() < t.n / 8
                    || n_ss
                    || t.gam.is_some_and(|g| g.size() < t.n * 4)
                    || t.count.size() < t.n / 8
                {
                    return Err(VkError::Invalid(format!(
                        "quantizing {} outputs for the next mat-vec: bad sizes",
                        t.n
                    )));
                }
                flags |= 32;
                if t.gam.is_some() {
                    flags |= 64;
                }
                // Profiling switches (wrong results; `mv_debug` bits 0 and 1).
                flags |= (mv_debug() & 3) << 10;
                t.n
            }
            None => 0,
        };
        // The block-tail twin where every piece's outputs are whole blocks of 32 of the
        // next input (MV_BLK: a count per workgroup, or none, instead of per output).
        let tuning = ctx.tuning();
        let block = tail.is_some()
            && tuning.mv_block > 0
            && w.pieces.iter().all(|pc| {
                (pc.rows / per).is_multiple_of(32)
                    && (y_offset + pc.first_row / per).is_multiple_of(32)
            });
        // Wide (32 subgroups, the block quantized inside the workgroup) where its
        // workgroups fill the device ([`Tuning::wide_fits`]).
        let wide = block && tuning.wide_fits(outs);
        let (kernel, rows_per_group) =
            match Kernel::mvqb_for(ty, mode.glu.is_some(), tuning.int8_dot, wide) {
                Some(kb) if block => (kb, tuning.mvqb_shape(wide).1 as u64),
                _ => (kernel, rows_per_group),
            };
        let mut parts = Vec::with_capacity(w.pieces.len());
        for piece in &w.pieces {
            let xs = x.ss.unwrap_or(x.d);
            let bufs: [&Buffer; 10] = match tail {
                Some(t) => [
                    &piece.buffer,
                    x.q,
                    x.d,
                    y,
                    t.count,
                    t.out.q,
                    t.out.d,
                    t.gam.unwrap_or(y),
                    t.out.ss.unwrap_or(t.out.d),
                    xs,
                ],
                None => [&piece.buffer, x.q, x.d, y, y, x.q, x.d, y, x.d, xs],
            };
            let b = ctx.bind(kernel, &bufs)?;
            let push = push_words(&[
                u32_of(k, "k")?,
                u32_of(piece.rows, "rows")?,
                u32_of(y_offset + piece.first_row / per, "y offset")?,
                flags,
                mode.softcap.unwrap_or(0.0).to_bits(),
                u32_of(n_next, "outputs")?,
                mode.eps.to_bits(),
            ]);
            parts.push((b, push, piece.rows / per));
        }
        Ok(Mvq(PieceDispatches {
            parts,
            per_group: rows_per_group as u32,
        }))
    }

    /// Records the mat-vec (one dispatch per weight piece, no barrier after).
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        self.0.record(r)
    }
}

/// Runs [`QuantX`] (norming by `gam` when `mode.norm`) then [`Mvq`] on host data, as
/// [`mv_host`] does for [`Mv`].
#[allow(clippy::too_many_arguments)]
pub fn mvq_host(
    ctx: &Context,
    ty: GgmlType,
    w: &[u8],
    k: usize,
    x: &[f32],
    gam: Option<&[f32]>,
    y0: Option<&[f32]>,
    mode: MvMode,
) -> Result<Vec<f32>> {
    let row_bytes = ty
        .row_bytes(k as u64)
        .ok_or_else(|| VkError::Invalid(format!("{k} elements are not whole {ty} blocks")))?;
    if x.len() != k {
        return Err(VkError::Invalid(format!(
            "x has {} values, k = {k}",
            x.len()
        )));
    }
    let group = if mode.glu.is_some() { 2 } else { 1 };
    let wt = ctx.upload_rows_grouped(&[w], row_bytes, group)?;
    let outs = (wt.rows / group) as usize;
    let xb = ctx.upload_f32(x)?;
    let yb = match y0 {
        Some(y0) if y0.len() == outs => ctx.upload_f32(y0)?,
        Some(_) => return Err(VkError::Invalid("y0 has the wrong length".into())),
        None => ctx.create_buffer((outs * 4).max(4) as u64, MemoryKind::Device)?,
    };
    let gb = gam
        .filter(|_| mode.norm)
        .map(|g| ctx.upload_f32(g))
        .transpose()?;
    let q = ctx.create_buffer(k as u64, MemoryKind::Device)?;
    let d = ctx.create_buffer((k / 8) as u64, MemoryKind::Device)?;
    let acts = Q8Acts {
        q: &q,
        d: &d,
        ss: None,
    };
    let qx = QuantX::new(ctx, k as u64, &xb, gb.as_ref(), mode.eps, &acts)?;
    let mode = MvMode {
        norm: false,
        ..mode
    };
    let op = Mvq::new(ctx, ty, &wt, k as u64, &acts, &yb, 0, mode)?;
    let rec = ctx.record(|r| {
        qx.record(r)?;
        r.barrier();
        op.record(r)
    })?;
    ctx.submit(&rec)?;
    ctx.read_f32(&yb, outs)
}

/// One attention layer's shape as the prefill attention kernels read it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv: usize,
    /// Head size, a multiple of 4.
    pub head_dim: usize,
    /// Sliding window: a query at position p sees keys at positions > p - window; 0 none.
    pub window: usize,
    pub scale: f32,
    /// Scores become `cap * tanh(score / cap)`.
    pub softcap: Option<f32>,
}

/// Causal attention for every token of a prefill step over the KV cache (in the
/// context's [`crate::KvType`]; it already holds the step's k / v, `rope_kv`): `attn_flash` (query tiles against key
/// tiles in shared memory, online softmax) where [`Tuning::flash_attn`] holds, else
/// `attention` (one workgroup per token, the cache read once per token). One dispatch.
///
/// [`Tuning::flash_attn`]: crate::kernels::Tuning
pub struct PrefillAttention {
    binding: Binding,
    push: Vec<u8>,
    groups: u64,
}

/// Where a [`PrefillAttention`] reads and writes.
pub struct AttnIo<'a> {
    /// Rows of q | k | v per token (q read), `ld_qkv` floats apart.
    pub qkv: &'a Buffer,
    pub ld_qkv: u64,
    /// Caches `[row][kv head][head_dim]`, rows the pages' positions (`kv.glsl`'s layouts).
    pub k_cache: &'a Buffer,
    pub v_cache: &'a Buffer,
    /// The page table (u32 page ids: position p at row `table[p / KV_PAGE] * KV_PAGE +
    /// p % KV_PAGE`, [`crate::KV_PAGE`]).
    pub table: &'a Buffer,
    /// Output rows of `n_heads * head_dim` per token.
    pub out: &'a Buffer,
    /// Step values: `[tokens, first position, ..]` (u32).
    pub step: &'a Buffer,
    /// The most tokens one step runs.
    pub max_tokens: u64,
    /// Per query head, a learned logit that joins the softmax's denominator (gpt-oss).
    pub sinks: Option<&'a Buffer>,
}

/// `attn_flash`'s tiles for heads of `hd` in groups of `gsize` query heads: (query heads
/// per workgroup, head chunks per kv head, query tokens per workgroup, keys per tile),
/// within the kernel's capacities (`Q_CAP`, `KV_CAP`, `S_CAP`, `MAX_R`, `ACC`).
fn flash_tiles(hd: usize, gsize: usize) -> (usize, usize, usize, usize) {
    let stride = hd + 4;
    let r_max = (4352 / stride).min(64).min(8 * 128 * 4 / hd).max(1);
    let hpw = gsize.min(r_max);
    let n_chunks = gsize.div_ceil(hpw);
    let bq = (r_max / hpw).max(1);
    let bkv = (2176 / stride).min(1024 / (bq * hpw)).clamp(1, 32);
    (hpw, n_chunks, bq, bkv)
}

impl PrefillAttention {
    pub fn new(ctx: &Context, s: &AttnShape, io: &AttnIo<'_>) -> Result<PrefillAttention> {
        let (nh, nkv, hd) = (s.n_heads, s.n_kv, s.head_dim);
        if nkv == 0
            || nh % nkv != 0
            || hd == 0
            || hd % 4 != 0
            || hd > 512
            || !io.ld_qkv.is_multiple_of(4)
            || io.ld_qkv < (nh * hd) as u64
        {
            return Err(VkError::Invalid(format!(
                "prefill attention over {nh} heads ({nkv} kv heads) of {hd}, rows of {}",
                io.ld_qkv
            )));
        }
        if let Some(why) = ctx.tuning().kv.unsupported_head(hd) {
            return Err(VkError::Invalid(why));
        }
        let t = io.max_tokens.max(1);
        let need_out = t * (nh * hd) as u64 * 4;
        let need_qkv = ((t - 1) * io.ld_qkv + (nh * hd) as u64) * 4;
        if io.out.size() < need_out
            || io.qkv.size() < need_qkv
            || io.step.size() < 8
            || io.sinks.is_some_and(|b| b.size() < nh as u64 * 4)
        {
            return Err(VkError::Invalid(format!(
                "prefill attention over {t} tokens: buffers too small"
            )));
        }
        let gsize = nh / nkv;
        let window = u32_of(s.window.min(u32::MAX as usize) as u64, "window")?;
        let common = [
            u32_of(nh as u64, "heads")?,
            u32_of(nkv as u64, "kv heads")?,
            u32_of(hd as u64, "head size")?,
        ];
        let sinks = u32::from(io.sinks.is_some());
        let bufs = [
            io.qkv,
            io.k_cache,
            io.v_cache,
            io.out,
            io.step,
            io.sinks.unwrap_or(io.step),
            io.table,
        ];
        let softcap = s.softcap.unwrap_or(0.0).to_bits();
        let ld = u32_of(io.ld_qkv, "qkv width")?;
        if ctx.tuning().flash_attn {
            let (hpw, n_chunks, bq, bkv) = flash_tiles(hd, gsize);
            let mut words = common.to_vec();
            words.extend([
                hpw as u32,
                n_chunks as u32,
                window,
                ld,
                s.scale.to_bits(),
                softcap,
                bq as u32,
                bkv as u32,
                sinks,
            ]);
            return Ok(PrefillAttention {
                binding: ctx.bind(Kernel::AttnFlash, &bufs)?,
                push: push_words(&words),
                groups: t.div_ceil(bq as u64) * (nkv * n_chunks) as u64,
            });
        }
        let hpw = gsize.min(8).min(2048 / hd).max(1);
        let n_chunks = gsize.div_ceil(hpw);
        let mut words = common.to_vec();
        words.extend([
            hpw as u32,
            n_chunks as u32,
            window,
            ld,
            s.scale.to_bits(),
            softcap,
            sinks,
        ]);
        Ok(PrefillAttention {
            binding: ctx.bind(Kernel::Attention, &bufs)?,
            push: push_words(&words),
            groups: t * (nkv * n_chunks) as u64,
        })
    }

    /// Records the attention (one dispatch, no barrier after).
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        r.dispatch(&self.binding, &self.push, self.groups)
    }

    /// Whether it runs `attn_flash`.
    pub fn flash(&self) -> bool {
        self.binding.kernel() == Kernel::AttnFlash
    }
}

/// What [`RowsAct`] does to each value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowAct {
    /// `y = max(y, 0)²`: an ungated relu² MLP between its up and down projections.
    Relu2,
    /// `y *= sigmoid(src[t * ld_src + src_off + i])`: an attention output gate.
    Gate { ld_src: u64, src_off: u64 },
}

/// Elementwise over the first `n` values of the rows `y[t * ld_y ..]` of a step's tokens
/// (`step[0]` of them, at most `max_tokens`): `rows_act.comp`, one dispatch.
pub struct RowsAct {
    binding: Binding,
    push: Vec<u8>,
    groups: u64,
}

impl RowsAct {
    /// `src`: the gates for [`RowAct::Gate`] (unread for `Relu2`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &Context,
        act: RowAct,
        n: u64,
        y: &Buffer,
        ld_y: u64,
        src: &Buffer,
        step: &Buffer,
        max_tokens: u64,
    ) -> Result<RowsAct> {
        let t = max_tokens;
        let (mode, ld_src, src_off) = match act {
            RowAct::Relu2 => (0u32, 0, 0),
            RowAct::Gate { ld_src, src_off } => (1, ld_src, src_off),
        };
        let src_need = if mode == 1 {
            (t.max(1) - 1) * ld_src + src_off + n
        } else {
            0
        };
        if n == 0
            || t == 0
            || ld_y < n
            || y.size() < ((t - 1) * ld_y + n) * 4
            || src.size() < src_need * 4
            || step.size() < 4
        {
            return Err(VkError::Invalid(format!(
                "{act:?} over {t} rows of {n} (stride {ld_y}): buffers too small"
            )));
        }
        let binding = ctx.bind(Kernel::RowsAct, &[y, src, step])?;
        let push = push_words(&[
            u32_of(n, "values per row")?,
            u32_of(ld_y, "row stride")?,
            u32_of(ld_src, "gate stride")?,
            u32_of(src_off, "gate offset")?,
            mode,
            u32_of(t, "rows")?,
        ]);
        let wg = ctx.tuning().workgroup_size as u64;
        Ok(RowsAct {
            binding,
            push,
            groups: t * n.div_ceil(wg),
        })
    }

    /// Records the dispatch (no barrier after).
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        r.dispatch(&self.binding, &self.push, self.groups)
    }
}
