//! Prefill (a chunk of tokens at once) and decode (one token) for attention
//! transformers described by [`caldera_model::ModelConfig`].

use std::cell::RefCell;
use std::sync::Arc;

use caldera_format::quant::{self, QuantizedActs};
use caldera_format::GgmlType;
use caldera_model::{Activation, Model, Weight};

use crate::ops;
use crate::pool::{SyncPtr, ThreadPool};

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("context is full: {need} tokens needed, the session holds {cap}")]
    ContextFull { need: usize, cap: usize },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("weight '{name}': {msg}")]
    Weight { name: String, msg: String },
    #[error("cannot allocate a KV cache of {bytes} bytes for {ctx} tokens")]
    KvTooLarge { bytes: u128, ctx: usize },
}

/// Which logits `forward` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's row.
    Last,
    /// One row per input token (verification, scoring).
    All,
}

/// Tokens per prefill chunk: bounds the scratch memory of long prompts.
const CHUNK: usize = 256;

/// One sequence: its KV cache (f32, `[pos][kv_head][head_dim]` per layer) and scratch.
pub struct Session {
    len: usize,
    cap: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    scratch: Scratch,
}

impl Session {
    /// Tokens held in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Forgets every token from position `n` on (prefix reuse).
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// Bytes held by the KV cache.
    pub fn kv_bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|b| b.len() * 4).sum()
    }
}

#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    acts: QuantizedActs,
    acts_ty: Option<GgmlType>,
    rope: Vec<Vec<(f32, f32)>>,
    rope_tmp: Vec<(f32, f32)>,
}

pub struct CpuBackend {
    model: Arc<Model>,
    pool: ThreadPool,
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl CpuBackend {
    pub fn new(model: Arc<Model>, threads: usize) -> CpuBackend {
        CpuBackend {
            model,
            pool: ThreadPool::new(threads.max(1)),
        }
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// A session holding up to `ctx` tokens.
    pub fn new_session(&self, ctx: usize) -> Result<Session, CpuError> {
        let cfg = &self.model.config;
        let mut k = Vec::with_capacity(cfg.layers.len());
        let mut v = Vec::with_capacity(cfg.layers.len());
        let per_tok: usize = cfg
            .layers
            .iter()
            .map(|l| 2 * l.attn.n_kv_heads * l.attn.head_dim)
            .sum();
        let bytes = per_tok as u128 * ctx as u128 * 4;
        if bytes > (isize::MAX as u128) / 2 {
            return Err(CpuError::KvTooLarge { bytes, ctx });
        }
        for l in &cfg.layers {
            let n = l.attn.n_kv_heads * l.attn.head_dim * ctx;
            let mut kb = Vec::new();
            let mut vb = Vec::new();
            if kb.try_reserve_exact(n).is_err() || vb.try_reserve_exact(n).is_err() {
                return Err(CpuError::KvTooLarge { bytes, ctx });
            }
            kb.resize(n, 0.0);
            vb.resize(n, 0.0);
            k.push(kb);
            v.push(vb);
        }
        Ok(Session {
            len: 0,
            cap: ctx,
            k,
            v,
            scratch: Scratch::default(),
        })
    }

    /// Runs `tokens` through the model after the session's cached tokens, appends them to
    /// the cache, and writes logits to `out` (`Last`: one row; `All`: one row per token).
    pub fn forward(
        &self,
        s: &mut Session,
        tokens: &[u32],
        logits: Logits,
        out: &mut Vec<f32>,
    ) -> Result<(), CpuError> {
        let cfg = &self.model.config;
        let need = s.len + tokens.len();
        if need > s.cap {
            return Err(CpuError::ContextFull { need, cap: s.cap });
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(CpuError::TokenOutOfRange {
                id,
                vocab: cfg.vocab_size,
            });
        }
        out.clear();
        let n_chunks = tokens.len().div_ceil(CHUNK);
        for (ci, chunk) in tokens.chunks(CHUNK).enumerate() {
            let want = match logits {
                Logits::All => true,
                Logits::Last => ci + 1 == n_chunks,
            };
            self.forward_chunk(s, chunk, want, logits, out)?;
        }
        Ok(())
    }

    fn forward_chunk(
        &self,
        s: &mut Session,
        tokens: &[u32],
        want_logits: bool,
        logits: Logits,
        out: &mut Vec<f32>,
    ) -> Result<(), CpuError> {
        let model = &*self.model;
        let cfg = &model.config;
        let w = &model.weights;
        let m = tokens.len();
        let d = cfg.d_model;
        let p0 = s.len;
        let sc = &mut s.scratch;
        let max_q = cfg
            .layers
            .iter()
            .map(|l| l.attn.n_heads * l.attn.head_dim)
            .max()
            .unwrap_or(0);
        let max_kv = cfg
            .layers
            .iter()
            .map(|l| l.attn.n_kv_heads * l.attn.head_dim)
            .max()
            .unwrap_or(0);
        let max_ff = cfg.layers.iter().map(|l| l.d_ff).max().unwrap_or(0);
        for (buf, n) in [
            (&mut sc.x, m * d),
            (&mut sc.h, m * d),
            (&mut sc.o, m * d),
            (&mut sc.q, m * max_q),
            (&mut sc.att, m * max_q),
            (&mut sc.k, m * max_kv),
            (&mut sc.v, m * max_kv),
            (&mut sc.g, m * max_ff),
            (&mut sc.u, m * max_ff),
        ] {
            buf.resize(n, 0.0);
        }

        // Embeddings.
        for (j, &t) in tokens.iter().enumerate() {
            let row = &mut sc.x[j * d..(j + 1) * d];
            dequant_row(&w.tok_embd, t as usize, row)?;
            if let Some(sc) = cfg.embed_scale {
                row.iter_mut().for_each(|v| *v *= sc);
            }
        }

        for (li, (spec, lw)) in cfg.layers.iter().zip(&w.layers).enumerate() {
            let a = &spec.attn;
            let hd = a.head_dim;
            let qd = a.n_heads * hd;
            let kvd = a.n_kv_heads * hd;

            // Attention block.
            ops::rms_norm(
                &sc.x[..m * d],
                &lw.attn.norm,
                cfg.norm_eps,
                &mut sc.h[..m * d],
            );
            sc.acts_ty = None;
            self.prepare(sc, lw.attn.q.ty, m, d)?;
            self.matmul(&lw.attn.q, &sc.acts, m, &mut sc.q[..m * qd]);
            self.prepare(sc, lw.attn.k.ty, m, d)?;
            self.matmul(&lw.attn.k, &sc.acts, m, &mut sc.k[..m * kvd]);
            self.prepare(sc, lw.attn.v.ty, m, d)?;
            self.matmul(&lw.attn.v, &sc.acts, m, &mut sc.v[..m * kvd]);
            if let (Some(qn), Some(kn)) = (&lw.attn.q_norm, &lw.attn.k_norm) {
                ops::rms_norm_inplace(&mut sc.q[..m * qd], qn, cfg.norm_eps);
                ops::rms_norm_inplace(&mut sc.k[..m * kvd], kn, cfg.norm_eps);
            }
            if let Some(rope) = &a.rope {
                sc.rope.resize_with(m, Vec::new);
                for j in 0..m {
                    ops::rope_angles(rope, p0 + j, &mut sc.rope_tmp);
                    std::mem::swap(&mut sc.rope[j], &mut sc.rope_tmp);
                }
                for j in 0..m {
                    let ang = &sc.rope[j];
                    for hq in sc.q[j * qd..(j + 1) * qd].chunks_exact_mut(hd) {
                        ops::rope_apply(rope.style, ang, &mut hq[..rope.n_dims]);
                    }
                    for hk in sc.k[j * kvd..(j + 1) * kvd].chunks_exact_mut(hd) {
                        ops::rope_apply(rope.style, ang, &mut hk[..rope.n_dims]);
                    }
                }
            }
            // Append k, v to the cache.
            s.k[li][p0 * kvd..(p0 + m) * kvd].copy_from_slice(&sc.k[..m * kvd]);
            s.v[li][p0 * kvd..(p0 + m) * kvd].copy_from_slice(&sc.v[..m * kvd]);
            self.attention(
                spec,
                &s.k[li],
                &s.v[li],
                &sc.q[..m * qd],
                p0,
                m,
                &mut sc.att[..m * qd],
            );

            self.prepare_from(sc, lw.attn.o.ty, m, qd, Src::Att)?;
            self.matmul(&lw.attn.o, &sc.acts, m, &mut sc.o[..m * d]);
            if let Some(pn) = &lw.attn.post_norm {
                ops::rms_norm_inplace(&mut sc.o[..m * d], pn, cfg.norm_eps);
            }
            sc.x[..m * d]
                .iter_mut()
                .zip(&sc.o[..m * d])
                .for_each(|(x, o)| *x += o);

            // Gated MLP.
            let ff = spec.d_ff;
            ops::rms_norm(
                &sc.x[..m * d],
                &lw.ffn.norm,
                cfg.norm_eps,
                &mut sc.h[..m * d],
            );
            sc.acts_ty = None;
            self.prepare(sc, lw.ffn.gate.ty, m, d)?;
            self.matmul(&lw.ffn.gate, &sc.acts, m, &mut sc.g[..m * ff]);
            self.prepare(sc, lw.ffn.up.ty, m, d)?;
            self.matmul(&lw.ffn.up, &sc.acts, m, &mut sc.u[..m * ff]);
            let act: fn(f32) -> f32 = match spec.ffn_act {
                Activation::SwiGlu => ops::silu,
                Activation::GeluTanhGlu => ops::gelu_tanh,
            };
            sc.g[..m * ff]
                .iter_mut()
                .zip(&sc.u[..m * ff])
                .for_each(|(g, u)| *g = act(*g) * u);
            self.prepare_from(sc, lw.ffn.down.ty, m, ff, Src::Gate)?;
            self.matmul(&lw.ffn.down, &sc.acts, m, &mut sc.o[..m * d]);
            if let Some(pn) = &lw.ffn.post_norm {
                ops::rms_norm_inplace(&mut sc.o[..m * d], pn, cfg.norm_eps);
            }
            sc.x[..m * d]
                .iter_mut()
                .zip(&sc.o[..m * d])
                .for_each(|(x, o)| *x += o);
        }
        s.len = p0 + m;

        if !want_logits {
            return Ok(());
        }
        let first = match logits {
            Logits::All => 0,
            Logits::Last => m - 1,
        };
        let rows = m - first;
        ops::rms_norm(
            &sc.x[first * d..m * d],
            &w.output_norm,
            cfg.norm_eps,
            &mut sc.h[..rows * d],
        );
        sc.acts_ty = None;
        let vocab = cfg.vocab_size;
        let start = out.len();
        out.resize(start + rows * vocab, 0.0);
        self.prepare(sc, w.output.ty, rows, d)?;
        self.matmul(&w.output, &sc.acts, rows, &mut out[start..]);
        if let Some(cap) = cfg.final_logit_softcap {
            out[start..]
                .iter_mut()
                .for_each(|v| *v = cap * (*v / cap).tanh());
        }
        Ok(())
    }

    /// Prepares `sc.h[..m*k]` as activations for weights of type `ty`.
    fn prepare(&self, sc: &mut Scratch, ty: GgmlType, m: usize, k: usize) -> Result<(), CpuError> {
        self.prepare_from(sc, ty, m, k, Src::H)
    }

    fn prepare_from(
        &self,
        sc: &mut Scratch,
        ty: GgmlType,
        m: usize,
        k: usize,
        src: Src,
    ) -> Result<(), CpuError> {
        if matches!(src, Src::H) && sc.acts_ty == Some(ty) {
            return Ok(()); // already prepared from the same normed rows
        }
        let x = match src {
            Src::H => &sc.h[..m * k],
            Src::Att => &sc.att[..m * k],
            Src::Gate => &sc.g[..m * k],
        };
        sc.acts.prepare(ty, x, k).map_err(|e| CpuError::Weight {
            name: ty.to_string(),
            msg: e.to_string(),
        })?;
        sc.acts_ty = match src {
            Src::H => Some(ty),
            _ => None,
        };
        Ok(())
    }

    /// `out[j * rows + r] = W[r] · act[j]` for m activation rows, parallel over rows.
    fn matmul(&self, w: &Weight, acts: &QuantizedActs, m: usize, out: &mut [f32]) {
        debug_assert_eq!(out.len(), m * w.rows);
        let rows = w.rows;
        let threads = self.pool.threads();
        let chunk = (rows / (threads * 16)).clamp(8, 256);
        let n_chunks = rows.div_ceil(chunk);
        let ptr = SyncPtr(out.as_mut_ptr());
        let ty = w.ty;
        self.pool.run(n_chunks, |c| {
            let r0 = c * chunk;
            let r1 = (r0 + chunk).min(rows);
            let base = ptr.get();
            if m == 1 {
                for r in r0..r1 {
                    let v = quant::vec_dot(ty, w.row(r), acts, 0);
                    // SAFETY: each task writes only its own rows r0..r1 of `out`.
                    unsafe { *base.add(r) = v };
                }
            } else {
                ROWS.with(|buf| {
                    let mut buf = buf.borrow_mut();
                    buf.resize(m, 0.0);
                    for r in r0..r1 {
                        quant::vec_dot_rows(ty, w.row(r), acts, &mut buf[..m]);
                        for (j, &v) in buf[..m].iter().enumerate() {
                            // SAFETY: as above; element (j, r) belongs to this task's rows.
                            unsafe { *base.add(j * rows + r) = v };
                        }
                    }
                });
            }
        });
    }

    /// Causal (optionally windowed) attention of m queries at positions p0.. over the
    /// cache; every query head reads its group's kv head.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        spec: &caldera_model::LayerSpec,
        kc: &[f32],
        vc: &[f32],
        q: &[f32],
        p0: usize,
        m: usize,
        out: &mut [f32],
    ) {
        let a = &spec.attn;
        let hd = a.head_dim;
        let nh = a.n_heads;
        let group = a.n_heads / a.n_kv_heads;
        let kvd = a.n_kv_heads * hd;
        let ptr = SyncPtr(out.as_mut_ptr());
        self.pool.run(m * nh, |t| {
            let (j, h) = (t / nh, t % nh);
            let p = p0 + j;
            let lo = a.window.map_or(0, |w| (p + 1).saturating_sub(w));
            let g = h / group;
            let qv = &q[j * nh * hd + h * hd..][..hd];
            // SAFETY: task (j, h) writes only its own head slice of `out`.
            let ov =
                unsafe { std::slice::from_raw_parts_mut(ptr.get().add(j * nh * hd + h * hd), hd) };
            SCORES.with(|sbuf| {
                let mut sbuf = sbuf.borrow_mut();
                let n = p + 1 - lo;
                sbuf.resize(n, 0.0);
                for (i, sv) in sbuf.iter_mut().enumerate() {
                    let kp = &kc[(lo + i) * kvd + g * hd..][..hd];
                    *sv = ops::dot(qv, kp) * a.scale;
                }
                ops::softmax(&mut sbuf[..n]);
                ov.fill(0.0);
                for (i, &pr) in sbuf.iter().enumerate() {
                    let vp = &vc[(lo + i) * kvd + g * hd..][..hd];
                    ops::axpy(pr, vp, ov);
                }
            });
        });
    }
}

#[derive(Clone, Copy)]
enum Src {
    H,
    Att,
    Gate,
}

/// Dequantizes row `r` of `w` into `out` (length `w.cols`).
fn dequant_row(w: &Weight, r: usize, out: &mut [f32]) -> Result<(), CpuError> {
    quant::dequantize(w.ty, w.row(r), out).map_err(|e| CpuError::Weight {
        name: w.name.clone(),
        msg: e.to_string(),
    })
}
