//! What every block's CPU implementation computes with: the thread pool and mat-muls
//! straight from quantized weights.

use caldera_format::quant::{self, QuantizedActs};
use caldera_model::Weight;

use crate::forward::CpuError;
use crate::pool::{SyncPtr, ThreadPool};

pub struct Ctx<'a> {
    pub pool: &'a ThreadPool,
    acts: &'a mut QuantizedActs,
}

impl<'a> Ctx<'a> {
    /// Mat-muls on `pool`, preparing their activations in `acts` (reused between calls).
    pub fn new(pool: &'a ThreadPool, acts: &'a mut QuantizedActs) -> Ctx<'a> {
        Ctx { pool, acts }
    }

    /// `out[j * w.rows + r] = W[r] · x[j] (+ bias[r])` for `m` rows of `x` (`m * w.cols`
    /// values), parallel over weight rows.
    pub fn matmul(
        &mut self,
        w: &Weight,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<(), CpuError> {
        debug_assert_eq!(x.len(), m * w.cols);
        debug_assert_eq!(out.len(), m * w.rows);
        self.acts
            .prepare(w.ty, &x[..m * w.cols], w.cols)
            .map_err(|e| CpuError::Weight {
                name: w.name.clone(),
                msg: e.to_string(),
            })?;
        let acts: &QuantizedActs = self.acts;
        let rows = w.rows;
        let threads = self.pool.threads();
        // A few tasks per thread: enough to balance, few enough that claiming them
        // (an atomic on a shared line) costs little next to the work.
        // With several tokens, a task's weight block must also stay in cache while every
        // token passes over it.
        let chunk = if m == 1 {
            rows.div_ceil(threads * 4).max(16)
        } else {
            rows.div_ceil(threads * 4).clamp(16, 256)
        };
        let n_chunks = rows.div_ceil(chunk);
        let ptr = SyncPtr(out.as_mut_ptr());
        let ty = w.ty;
        let bias = w.bias.as_deref();
        self.pool.run(n_chunks, |c| {
            let r0 = c * chunk;
            let r1 = (r0 + chunk).min(rows);
            let base = ptr.get();
            if m == 1 {
                let rb = w.row_bytes();
                // SAFETY: each task writes only its own rows r0..r1 of `out`.
                let o = unsafe { std::slice::from_raw_parts_mut(base.add(r0), r1 - r0) };
                quant::vec_dot_many(ty, &w.bytes()[r0 * rb..r1 * rb], acts, 0, o);
                if let Some(b) = bias {
                    o.iter_mut().zip(&b[r0..r1]).for_each(|(v, b)| *v += b);
                }
            } else {
                // The task's block of weight rows stays in cache while every activation
                // row passes over it; each pass writes a contiguous run of `out`.
                let rb = w.row_bytes();
                let wb = &w.bytes()[r0 * rb..r1 * rb];
                for j in 0..m {
                    // SAFETY: as above; row j's elements r0..r1 belong to this task.
                    let o =
                        unsafe { std::slice::from_raw_parts_mut(base.add(j * rows + r0), r1 - r0) };
                    quant::vec_dot_many(ty, wb, acts, j, o);
                    if let Some(b) = bias {
                        o.iter_mut().zip(&b[r0..r1]).for_each(|(v, b)| *v += b);
                    }
                }
            }
        });
        Ok(())
    }
}
