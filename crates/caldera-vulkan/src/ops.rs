//! Ops built on the kernel table: each is bound once (descriptor sets made at `new`)
//! and recorded into as many [`Recording`]s as wanted. `*_host` helpers run one op on
//! host data, for tests and checks.

use caldera_format::GgmlType;

use crate::context::Context;
use crate::error::{Result, VkError};
use crate::kernels::Kernel;
use crate::memory::{Buffer, DeviceTensor, MemoryKind};
use crate::record::{Binding, Recorder, Recording};

fn u32_of(v: u64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| VkError::Invalid(format!("{what} = {v} does not fit in 32 bits")))
}

/// `y[i] = Σ_j W[i][j] x[j]` for the `rows` rows of a weight tensor of type `ty`, read
/// straight from its blocks; x and y f32. The tensor's pieces become one dispatch each.
pub struct MatVec {
    parts: Vec<(Binding, [u32; 4], u64)>,
    rows_per_group: u32,
}

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
        let kernel = Kernel::matvec_for(ty).ok_or_else(|| {
            VkError::Invalid(format!("no Vulkan mat-vec kernel for tensor type {ty} yet"))
        })?;
        if ty.row_bytes(k) != Some(w.row_bytes) || k == 0 {
            return Err(VkError::Invalid(format!(
                "rows of {} bytes do not hold {k} elements of {ty}",
                w.row_bytes
            )));
        }
        if x.size() < k * 4 || y.size() < w.rows * 4 {
            return Err(VkError::Invalid(format!(
                "mat-vec of {} x {k}: x holds {} bytes, y {}",
                w.rows,
                x.size(),
                y.size()
            )));
        }
        let k32 = u32_of(k, "k")?;
        let rows_per_group = ctx.tuning().rows_per_group;
        let mut parts = Vec::with_capacity(w.pieces.len());
        for piece in &w.pieces {
            let b = ctx.bind(kernel, &[&piece.buffer, x, y])?;
            let push = [
                k32,
                u32_of(piece.rows, "rows")?,
                0,
                u32_of(piece.first_row, "first row")?,
            ];
            parts.push((b, push, piece.rows));
        }
        Ok(MatVec {
            parts,
            rows_per_group,
        })
    }

    /// Records the mat-vec (one dispatch per weight piece, no barrier after).
    pub fn record(&self, r: &mut Recorder<'_>) -> Result<()> {
        for (b, push, rows) in &self.parts {
            let bytes: Vec<u8> = push.iter().flat_map(|v| v.to_le_bytes()).collect();
            r.dispatch(b, &bytes, rows.div_ceil(self.rows_per_group as u64))?;
        }
        Ok(())
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
    let row_bytes = ty
        .row_bytes(k as u64)
        .ok_or_else(|| VkError::Invalid(format!("{k} elements are not whole {ty} blocks")))?;
    if x.len() != k {
        return Err(VkError::Invalid(format!(
            "x has {} values, k = {k}",
            x.len()
        )));
    }
    let wt = ctx.upload_rows(w, row_bytes)?;
    let xb = ctx.upload_f32(x)?;
    let yb = ctx.create_buffer((wt.rows * 4).max(4), MemoryKind::Device)?;
    let mv = MatVec::new(ctx, ty, &wt, k as u64, &xb, &yb)?;
    let rec: Recording = ctx.record(|r| mv.record(r))?;
    ctx.submit(&rec)?;
    ctx.read_f32(&yb, wt.rows as usize)
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
