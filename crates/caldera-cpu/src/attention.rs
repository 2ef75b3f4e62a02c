//! Attention mixer on the CPU: q/k/v projections, optional per-head q/k RMSNorm, RoPE,
//! KV-cache append, causal (optionally windowed, sink-augmented, soft-capped) softmax
//! attention with grouped kv heads, optional sigmoid output gate, o projection.

use std::cell::RefCell;

use caldera_model::{AttnSpec, AttnWeights};

use crate::ctx::Ctx;
use crate::forward::CpuError;
use crate::ops;
use crate::paged::KvPages;
use crate::pool::SyncPtr;

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out[m × d]` = attention over `h[m × d]` for tokens at positions `p0..p0+m` of layer
/// `li`, whose K and V rows go to and come from the sequence's pages.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    ctx: &mut Ctx,
    a: &AttnSpec,
    w: &AttnWeights,
    kv: &mut KvPages,
    li: usize,
    h: &[f32],
    m: usize,
    p0: usize,
    eps: f32,
    out: &mut [f32],
) -> Result<(), CpuError> {
    let hd = a.head_dim;
    let nh = a.n_heads;
    let qd = nh * hd;
    let kvd = a.n_kv_heads * hd;
    let q_rows = w.q.rows;
    let mut qg = vec![0f32; m * q_rows];
    let mut k = vec![0f32; m * kvd];
    let mut v = vec![0f32; m * kvd];
    ctx.matmul(&w.q, h, m, &mut qg)?;
    ctx.matmul(&w.k, h, m, &mut k)?;
    ctx.matmul(&w.v, h, m, &mut v)?;
    // With a gate, each head's q row block is [q (hd), gate (hd)].
    let (mut q, gate) = if a.q_gate {
        let mut q = vec![0f32; m * qd];
        let mut g = vec![0f32; m * qd];
        for (i, blk) in qg.chunks_exact(2 * hd).enumerate() {
            q[i * hd..(i + 1) * hd].copy_from_slice(&blk[..hd]);
            g[i * hd..(i + 1) * hd].copy_from_slice(&blk[hd..]);
        }
        (q, Some(g))
    } else {
        (qg, None)
    };
    if let Some(qn) = &w.q_norm {
        ops::rms_norm_inplace(&mut q, qn, eps);
    }
    if let Some(kn) = &w.k_norm {
        ops::rms_norm_inplace(&mut k, kn, eps);
    }
    if let Some(rope) = &a.rope {
        let mut ang = Vec::new();
        for j in 0..m {
            ops::rope_angles(rope, p0 + j, &mut ang);
            for hq in q[j * qd..(j + 1) * qd].chunks_exact_mut(hd) {
                ops::rope_apply(rope.style, &ang, &mut hq[..rope.n_dims]);
            }
            for hk in k[j * kvd..(j + 1) * kvd].chunks_exact_mut(hd) {
                ops::rope_apply(rope.style, &ang, &mut hk[..rope.n_dims]);
            }
        }
    }
    kv.write(li, p0, &k, &v)?;

    let mut att = vec![0f32; m * qd];
    let group = nh / a.n_kv_heads;
    let ptr = SyncPtr(att.as_mut_ptr());
    let Some(lkv) = kv.layer(li) else {
        return Err(CpuError::Unsupported(format!("layer {li}: no KV cache")));
    };
    let sinks = w.sinks.as_deref();
    let q = &q;
    ctx.pool.run(m * nh, |t| {
        let (j, hi) = (t / nh, t % nh);
        let p = p0 + j;
        let lo = a.window.map_or(0, |win| (p + 1).saturating_sub(win));
        let g = hi / group;
        let qv = &q[j * qd + hi * hd..][..hd];
        // SAFETY: task (j, hi) writes only its own head slice of `att`.
        let ov = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(j * qd + hi * hd), hd) };
        SCORES.with(|sbuf| {
            let mut s = sbuf.borrow_mut();
            let n = p + 1 - lo;
            s.resize(n + 1, 0.0);
            let mut i = 0;
            lkv.runs(lo, p + 1, |kr, _, cnt| {
                for r in 0..cnt {
                    let kp = &kr[r * kvd + g * hd..][..hd];
                    let mut x = ops::dot(qv, kp) * a.scale;
                    if let Some(cap) = a.softcap {
                        x = cap * (x / cap).tanh();
                    }
                    s[i] = x;
                    i += 1;
                }
            });
            // A sink joins the softmax as one more logit with no value.
            let total = match sinks {
                Some(sk) => {
                    s[n] = sk[hi];
                    n + 1
                }
                None => n,
            };
            ops::softmax(&mut s[..total]);
            ov.fill(0.0);
            let mut i = 0;
            lkv.runs(lo, p + 1, |_, vr, cnt| {
                for r in 0..cnt {
                    let vp = &vr[r * kvd + g * hd..][..hd];
                    ops::axpy(s[i], vp, ov);
                    i += 1;
                }
            });
        });
    });
    if let Some(g) = gate {
        for (o, gv) in att.iter_mut().zip(&g) {
            *o *= 1.0 / (1.0 + (-gv).exp());
        }
    }
    ctx.matmul(&w.o, &att, m, out)
}
