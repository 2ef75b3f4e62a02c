//! What every block's CPU implementation computes with: the thread pool and mat-muls
//! straight from quantized weights.

use std::cell::RefCell;

use caldera_format::quant::{self, QuantizedActs};
use caldera_model::Weight;

use crate::forward::CpuError;
use crate::pool::{SyncPtr, ThreadPool};

thread_local! {
    static ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

pub struct Ctx<'a> {
    pub pool: &'a ThreadPool,
    acts: &'a mut QuantizedActs,
}

impl<'a> Ctx<'a> {
    pub(crate) fn new(pool: &'a ThreadPool, acts: &'a mut QuantizedActs) -> Ctx<'a> {
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
        let chunk = (rows / (threads * 16)).clamp(8, 256);
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
                ROWS.with(|buf| {
                    let mut buf = buf.borrow_mut();
                    buf.resize(m, 0.0);
                    for r in r0..r1 {
                        quant::vec_dot_rows(ty, w.row(r), acts, &mut buf[..m]);
                        let b = bias.map_or(0.0, |b| b[r]);
                        for (j, &v) in buf[..m].iter().enumerate() {
                            // SAFETY: as above; element (j, r) belongs to this task's rows.
                            unsafe { *base.add(j * rows + r) = v + b };
                        }
                    }
                });
            }
        });
        Ok(())
    }
}
