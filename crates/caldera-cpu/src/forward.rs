//! The forward pass: embeddings, then for each layer
//! `x += post_norm(mixer(norm(x)))` and `x += ffn_post_norm(ffn(ffn_norm(x)))`, then the
//! final norm and the output head. Prompts run in chunks of [`CHUNK`] tokens.
//! Layers with `Model.extras` (Gemma 4: per-layer inputs, v-norm, KV sharing, output
//! scale) go through `per_layer.rs`.

use std::sync::Arc;

use caldera_format::quant::{self, QuantizedActs};
use caldera_model::{FfnSpec, FfnWeights, Mixer, MixerWeights, Model, Weight};

use crate::attention;
use crate::ctx::Ctx;
use crate::ffn;
use crate::gdn::{self, GdnState};
use crate::mamba2::{self, Mamba2State};
use crate::ops;
use crate::paged::{KvConfig, KvPages, KvPool, PageTable};
use crate::per_layer;
use crate::pool::ThreadPool;
use crate::shortconv::{self, ShortConvState};

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
    #[error("the KV cache is full: all {pages} pages of {page_tokens} tokens are in use")]
    KvFull { pages: usize, page_tokens: usize },
    #[error("the session belongs to another backend's KV pool")]
    ForeignSession,
    #[error("the CPU backend does not run {0} yet")]
    Unsupported(String),
}

pub use caldera_model::Logits;

/// Tokens per prefill chunk: bounds the scratch memory of long prompts.
pub const CHUNK: usize = 256;

/// The per-sequence state of one layer.
#[derive(Clone)]
pub enum LayerState {
    None,
    /// Attention with its own K and V rows (in the sequence's pages).
    Kv,
    Gdn(GdnState),
    Mamba2(Mamba2State),
    ShortConv(ShortConvState),
}

/// One sequence: its page table (the KV rows of every attention layer, in the backend's
/// pool) and the recurrent states. Clone it to snapshot a sequence (forking a slot):
/// the copy shares the pages until one of them writes.
#[derive(Clone)]
pub struct Session {
    len: usize,
    cap: usize,
    layers: Vec<LayerState>,
    kv: PageTable,
    /// The token at each position.
    tokens: Vec<u32>,
}

impl Session {
    /// Tokens the session has seen.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Whether [`Session::truncate`] can go back to any earlier position: true when
    /// every layer keeps per-position state (attention only). Recurrent layers keep
    /// only the latest state, so they need a snapshot instead.
    pub fn can_truncate(&self) -> bool {
        self.layers
            .iter()
            .all(|l| matches!(l, LayerState::None | LayerState::Kv))
    }

    /// Forgets every token from position `n` on (prefix reuse). Returns false, changing
    /// nothing, when the session has recurrent layers and `n` is not its length.
    pub fn truncate(&mut self, n: usize) -> bool {
        if n >= self.len {
            return true;
        }
        if !self.can_truncate() {
            return false;
        }
        self.len = n;
        self.kv.truncate(n);
        self.tokens.truncate(n);
        true
    }

    /// The tokens the session holds.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// KV pages the session holds.
    pub fn pages(&self) -> usize {
        self.kv.pages()
    }

    /// For a session holding `prompt[..len]`: takes the prefix cache's pages continuing
    /// `prompt`, up to `limit` positions, instead of computing them. Returns the
    /// positions it holds now (its length unchanged when nothing is cached, the model
    /// has recurrent layers, or its length is not at a page boundary).
    pub fn reuse_prefix(&mut self, prompt: &[u32], limit: usize) -> usize {
        if !self.can_truncate() {
            return self.len;
        }
        let n = self.kv.adopt(self.len, prompt, limit.min(self.cap));
        if n > self.len {
            self.tokens.extend_from_slice(&prompt[self.len..n]);
            self.len = n;
        }
        self.len
    }

    pub fn layers(&self) -> &[LayerState] {
        &self.layers
    }
}

pub struct CpuBackend {
    model: Arc<Model>,
    pool: ThreadPool,
    acts: std::sync::Mutex<QuantizedActs>,
    kv: Arc<KvPool>,
    /// Prompt snapshots of a model with recurrent layers, least recently used first.
    snapshots: std::sync::Mutex<Vec<Session>>,
    max_snapshots: usize,
}

impl CpuBackend {
    /// A backend whose KV pool grows as its sessions need (default page size, no prefix
    /// cache).
    pub fn new(model: Arc<Model>, threads: usize) -> CpuBackend {
        CpuBackend::with_kv(model, threads, &KvConfig::default())
    }

    /// A backend with the KV pool `kv` describes (page size, bound, prefix cache).
    pub fn with_kv(model: Arc<Model>, threads: usize, kv: &KvConfig) -> CpuBackend {
        let pool = Arc::new(KvPool::new(&model, kv));
        CpuBackend {
            model,
            pool: ThreadPool::new(threads.max(1)),
            acts: std::sync::Mutex::new(QuantizedActs::default()),
            max_snapshots: if pool.recurrent() { kv.snapshots } else { 0 },
            kv: pool,
            snapshots: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn snaps(&self) -> std::sync::MutexGuard<'_, Vec<Session>> {
        self.snapshots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this backend keeps prompt snapshots (a model with recurrent layers and
    /// [`KvConfig::snapshots`] > 0).
    pub fn snapshots_on(&self) -> bool {
        self.max_snapshots > 0
    }

    /// Prompt snapshots held now.
    pub fn snapshot_count(&self) -> usize {
        self.snaps().len()
    }

    /// Keeps a copy of `s` (its recurrent states; its pages shared) for later sessions
    /// whose prompt starts with its tokens; the least recently used copy goes beyond
    /// [`KvConfig::snapshots`]. Does nothing for models without recurrent layers (their
    /// pages are shared through the prefix cache) or an empty session.
    pub fn snapshot(&self, s: &Session) {
        if self.max_snapshots == 0 || s.is_empty() {
            return;
        }
        let copy = s.clone();
        let dropped = {
            let mut snaps = self.snaps();
            snaps.retain(|x| x.tokens != copy.tokens);
            snaps.push(copy);
            let over = snaps.len().saturating_sub(self.max_snapshots);
            snaps.drain(..over).collect::<Vec<_>>()
        };
        drop(dropped);
    }

    /// For a session holding `prompt[..len]`: becomes a copy of the longest snapshot
    /// that `prompt` continues, up to `limit` positions, when it holds more than `len`.
    /// Returns the positions the session holds.
    pub fn restore_snapshot(&self, s: &mut Session, prompt: &[u32], limit: usize) -> usize {
        if self.max_snapshots == 0 {
            return s.len;
        }
        let limit = limit.min(s.cap).min(prompt.len());
        let mut snaps = self.snaps();
        let best = snaps
            .iter()
            .enumerate()
            .filter(|(_, x)| {
                x.len > s.len && x.len <= limit && x.cap <= s.cap && prompt.starts_with(&x.tokens)
            })
            .max_by_key(|(_, x)| x.len)
            .map(|(i, _)| i);
        let Some(i) = best else { return s.len };
        let snap = snaps.remove(i);
        let mut copy = snap.clone();
        copy.cap = s.cap;
        // Most recently used last.
        snaps.push(snap);
        drop(snaps);
        *s = copy;
        s.len
    }

    /// Drops the least recently used snapshot; false when there is none.
    fn evict_snapshot(&self) -> bool {
        let dropped = {
            let mut snaps = self.snaps();
            if snaps.is_empty() {
                return false;
            }
            snaps.remove(0)
        };
        drop(dropped);
        true
    }

    /// The KV pages every session of this backend takes from.
    pub fn kv_pool(&self) -> &Arc<KvPool> {
        &self.kv
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
        let layers = cfg
            .layers
            .iter()
            .enumerate()
            .map(|(li, l)| {
                let extras = self.model.extras.layers.get(li);
                if extras.is_some_and(|e| e.kv_from.is_some()) {
                    // Reads another layer's cache.
                    return Ok(LayerState::None);
                }
                Ok(match &l.mixer {
                    None => LayerState::None,
                    Some(Mixer::Attention(_)) => LayerState::Kv,
                    Some(Mixer::GatedDeltaNet(g)) => LayerState::Gdn(GdnState::new(g)),
                    Some(Mixer::Mamba2(s)) => LayerState::Mamba2(Mamba2State::new(s)),
                    Some(Mixer::ShortConv(s)) => LayerState::ShortConv(ShortConvState::new(s)),
                })
            })
            .collect::<Result<Vec<_>, CpuError>>()?;
        Ok(Session {
            len: 0,
            cap: ctx,
            layers,
            kv: PageTable::new(self.kv.clone()),
            tokens: Vec::new(),
        })
    }

    /// Runs `tokens` through the model after the session's tokens, appends them to the
    /// session, and writes logits to `out` (`Last`: one row; `All`: one row per token).
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
        if !Arc::ptr_eq(s.kv.pool(), &self.kv) {
            return Err(CpuError::ForeignSession);
        }
        out.clear();
        let mut acts = self.acts.lock().unwrap_or_else(|e| e.into_inner());
        let mut ctx = Ctx::new(&self.pool, &mut acts);
        // The pages of every token of the call are taken first: a full pool fails the
        // call before anything runs.
        let mut inner = loop {
            let mut inner = self.kv.lock();
            match s.kv.prepare(&mut inner, s.len, tokens.len()) {
                Ok(()) => break inner,
                // Snapshots give their pages back when a running sequence needs them.
                Err(e @ CpuError::KvFull { .. }) => {
                    drop(inner);
                    if !self.evict_snapshot() {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        };
        let n_chunks = tokens.len().div_ceil(CHUNK);
        for (ci, chunk) in tokens.chunks(CHUNK).enumerate() {
            let want = match logits {
                Logits::All => Some(0),
                Logits::Last if ci + 1 == n_chunks => Some(chunk.len() - 1),
                Logits::Last => None,
            };
            let p0 = s.len;
            let mut kv = KvPages {
                pages: &mut inner.pages,
                table: s.kv.ids(),
                pool: &self.kv,
            };
            self.forward_chunk(&mut ctx, &mut s.layers, &mut kv, p0, chunk, want, out)?;
            s.len = p0 + chunk.len();
            s.tokens.truncate(p0);
            s.tokens.extend_from_slice(chunk);
            s.kv.wrote(&mut inner, p0, chunk);
        }
        Ok(())
    }

    /// One chunk at positions `p0..`; logits of rows `first..` are appended to `out` when
    /// `first` is given.
    #[allow(clippy::too_many_arguments)]
    fn forward_chunk(
        &self,
        ctx: &mut Ctx,
        states: &mut [LayerState],
        kv: &mut KvPages,
        p0: usize,
        tokens: &[u32],
        first: Option<usize>,
        out: &mut Vec<f32>,
    ) -> Result<(), CpuError> {
        let model = &*self.model;
        let cfg = &model.config;
        let w = &model.weights;
        let m = tokens.len();
        let d = cfg.d_model;
        let eps = cfg.norm_eps;

        let mut x = vec![0f32; m * d];
        for (j, &t) in tokens.iter().enumerate() {
            let row = &mut x[j * d..(j + 1) * d];
            dequant_row(&w.tok_embd, t as usize, row)?;
            if let Some(sc) = cfg.embed_scale {
                row.iter_mut().for_each(|v| *v *= sc);
            }
        }
        let mut h = vec![0f32; m * d];
        let mut o = vec![0f32; m * d];
        let n_layers = cfg.layers.len();
        let mut pli = Vec::new();
        if let Some(pl) = &model.extras.per_layer_inputs {
            per_layer::inputs(ctx, pl, tokens, &x, m, n_layers, eps, &mut pli)?;
        }
        for (li, (spec, lw)) in cfg.layers.iter().zip(&w.layers).enumerate() {
            let extras = model.extras.layers.get(li);
            if let (Some(mixer), Some(mw)) = (&spec.mixer, &lw.mixer) {
                norm_into(&x, lw.norm.as_deref(), eps, &mut h);
                if let (Mixer::Attention(a), MixerWeights::Attention(aw), Some(ex)) =
                    (mixer, mw, extras)
                {
                    per_layer::attention(ctx, a, aw, ex, kv, li, &h, m, p0, eps, &mut o)?
                } else {
                    match (mixer, mw, &mut states[li]) {
                        (Mixer::Attention(a), MixerWeights::Attention(aw), LayerState::Kv) => {
                            attention::forward(ctx, a, aw, kv, li, &h, m, p0, eps, &mut o)?
                        }
                        (
                            Mixer::GatedDeltaNet(g),
                            MixerWeights::GatedDeltaNet(gw),
                            LayerState::Gdn(st),
                        ) => gdn::forward(ctx, g, gw, st, &h, m, eps, &mut o)?,
                        (Mixer::Mamba2(g), MixerWeights::Mamba2(gw), LayerState::Mamba2(st)) => {
                            mamba2::forward(ctx, g, gw, st, &h, m, eps, &mut o)?
                        }
                        (
                            Mixer::ShortConv(g),
                            MixerWeights::ShortConv(gw),
                            LayerState::ShortConv(st),
                        ) => shortconv::forward(ctx, g, gw, st, &h, m, eps, &mut o)?,
                        _ => {
                            return Err(CpuError::Unsupported(format!(
                                "layer {li}: mismatched mixer"
                            )))
                        }
                    }
                }
                if let Some(pn) = &lw.post_norm {
                    ops::rms_norm_inplace(&mut o, pn, eps);
                }
                x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            }
            if let (Some(fs), Some(fw)) = (&spec.ffn, &lw.ffn) {
                norm_into(&x, lw.ffn_norm.as_deref(), eps, &mut h);
                match (fs, fw) {
                    (FfnSpec::Dense { act, .. }, FfnWeights::Dense(dw)) => {
                        ffn::dense(ctx, dw, *act, &h, m, &mut o)?
                    }
                    (FfnSpec::Moe(ms), FfnWeights::Moe(mw)) => {
                        ffn::moe(ctx, ms, mw, &h, m, &mut o)?
                    }
                    _ => return Err(CpuError::Unsupported(format!("layer {li}: mismatched ffn"))),
                }
                if let Some(pn) = &lw.ffn_post_norm {
                    ops::rms_norm_inplace(&mut o, pn, eps);
                }
                x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            }
            if let Some(pl) = &model.extras.per_layer_inputs {
                if let Some(b) = pl.layers.get(li) {
                    per_layer::apply(ctx, b, &pli, li, n_layers, &mut x, m, eps)?;
                }
            }
            if let Some(sc) = extras.and_then(|e| e.out_scale) {
                x.iter_mut().for_each(|v| *v *= sc);
            }
        }
        let Some(first) = first else { return Ok(()) };
        let rows = m - first;
        let mut hn = vec![0f32; rows * d];
        ops::rms_norm(&x[first * d..], &w.output_norm, eps, &mut hn);
        let vocab = cfg.vocab_size;
        let start = out.len();
        out.resize(start + rows * vocab, 0.0);
        ctx.matmul(&w.output, &hn, rows, &mut out[start..])?;
        if let Some(cap) = cfg.final_logit_softcap {
            out[start..]
                .iter_mut()
                .for_each(|v| *v = cap * (*v / cap).tanh());
        }
        Ok(())
    }
}

/// `out = rmsnorm(x) * w`, or a copy of `x` when the layer has no norm.
fn norm_into(x: &[f32], w: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    match w {
        Some(w) => ops::rms_norm(x, w, eps, out),
        None => out.copy_from_slice(x),
    }
}

/// Dequantizes row `r` of `w` into `out` (length `w.cols`).
fn dequant_row(w: &Weight, r: usize, out: &mut [f32]) -> Result<(), CpuError> {
    quant::dequantize(w.ty, w.row(r), out).map_err(|e| CpuError::Weight {
        name: w.name.clone(),
        msg: e.to_string(),
    })
}

/// A sequence on the CPU backend: the engine's [`caldera_model::Runner`].
pub struct CpuRunner {
    backend: Arc<CpuBackend>,
    session: Session,
}

impl CpuRunner {
    pub fn new(backend: Arc<CpuBackend>, ctx: usize) -> Result<CpuRunner, CpuError> {
        let session = backend.new_session(ctx)?;
        Ok(CpuRunner { backend, session })
    }
}

impl caldera_model::Runner for CpuRunner {
    fn capacity(&self) -> usize {
        self.session.capacity()
    }

    fn len(&self) -> usize {
        self.session.len()
    }

    fn truncate(&mut self, n: usize) -> bool {
        if self.session.truncate(n) {
            return true;
        }
        if n == 0 {
            // Recurrent states cannot rewind, but they can start over.
            if let Ok(fresh) = self.backend.new_session(self.session.capacity()) {
                self.session = fresh;
                return true;
            }
        }
        false
    }

    fn forward(
        &mut self,
        tokens: &[u32],
        logits: Logits,
        out: &mut Vec<f32>,
    ) -> Result<(), caldera_model::RunError> {
        Ok(self
            .backend
            .forward(&mut self.session, tokens, logits, out)?)
    }

    fn reuse_prefix(&mut self, tokens: &[u32], limit: usize) -> usize {
        if self.backend.snapshots_on() {
            self.backend
                .restore_snapshot(&mut self.session, tokens, limit)
        } else {
            self.session.reuse_prefix(tokens, limit)
        }
    }

    fn checkpoint(&mut self) {
        self.backend.snapshot(&self.session);
    }

    fn shares_prefixes(&self) -> bool {
        self.backend.kv.prefix_cache()
    }

    fn kv_pages(&self) -> Option<usize> {
        Some(self.session.pages())
    }

    fn describe(&self) -> String {
        format!("cpu, {} threads", self.backend.threads())
    }
}
