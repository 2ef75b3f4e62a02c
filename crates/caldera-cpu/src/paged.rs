//! The paged KV cache of the CPU backend.
//!
//! One [`KvPool`] per backend holds fixed-size pages of `page_tokens` positions; a page
//! holds, for every attention layer with its own cache, that layer's K rows then its V
//! rows (`[page_tokens][kv_heads * head_dim]` each, f32), so a run of positions inside a
//! page is contiguous. Each sequence ([`crate::Session`]) keeps a page table; pages are
//! taken as it grows and given back on truncate and drop.
//!
//! Prefix cache: once a page is full, it is published under (the page before it, its
//! tokens), so a chain of pages names an exact token prefix. A new sequence whose prompt
//! starts with a cached chain takes those pages (reference counted, read-only; a write
//! into a shared or cached page copies it first) instead of computing them again. Cached
//! pages that no sequence holds stay until a page is needed: then the least recently
//! used one with no cached successor is evicted. Models with recurrent layers (whose
//! state is not in the pages) get no prefix cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use caldera_model::{Mixer, Model};

use crate::forward::CpuError;

/// Positions per page unless configured otherwise.
pub const DEFAULT_PAGE_TOKENS: usize = 16;

/// No page (the parent of a chain's first page).
const ROOT: u32 = u32::MAX;

/// How a backend's KV pool is laid out and bounded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvConfig {
    /// Positions per page (at least 1).
    pub page_tokens: usize,
    /// Most pages the pool holds; `None` grows as sequences need.
    pub max_pages: Option<usize>,
    /// Share full pages between sequences with the same token prefix (ignored for models
    /// with recurrent layers). Cached pages nobody holds are evicted only when the pool
    /// is full, so give a cached pool a bound (`max_pages`).
    pub prefix_cache: bool,
    /// Models with recurrent layers: how many prompt snapshots (the whole sequence at the
    /// end of a prompt: recurrent states and shared pages) the backend keeps for later
    /// requests starting the same way; 0 turns them off.
    pub snapshots: usize,
}

impl Default for KvConfig {
    /// Unbounded, no prefix cache, no snapshots: one-sequence use (`caldera run`).
    fn default() -> Self {
        KvConfig {
            page_tokens: DEFAULT_PAGE_TOKENS,
            max_pages: None,
            prefix_cache: false,
            snapshots: 0,
        }
    }
}

/// Where one attention layer's K and V rows sit inside a page.
#[derive(Clone, Copy, Debug)]
pub struct LayerSlot {
    /// Offset of the K rows in the page; the V rows follow them.
    pub off: usize,
    /// Floats per position (kv heads × head dim).
    pub kvd: usize,
}

/// What a pool holds now (for `/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub page_tokens: usize,
    /// The pool's bound (`usize::MAX` when unbounded).
    pub total: usize,
    /// Pages held by at least one sequence.
    pub in_use: usize,
    /// Pages in the prefix cache (some may be in use too).
    pub cached: usize,
    /// Pages in memory (allocated so far; never more than `total`).
    pub allocated: usize,
}

impl PoolStats {
    /// Pages a sequence can still get: unused ones and cached ones nobody holds.
    pub fn free(&self) -> usize {
        self.total.saturating_sub(self.in_use)
    }
}

pub struct KvPool {
    page_tokens: usize,
    max_pages: usize,
    prefix: bool,
    layers: Vec<Option<LayerSlot>>,
    page_floats: usize,
    recurrent: bool,
    inner: Mutex<Inner>,
    in_use: AtomicUsize,
    cached: AtomicUsize,
    allocated: AtomicUsize,
}

/// The pages and their bookkeeping; locked for a whole forward step.
pub struct Inner {
    pub(crate) pages: Vec<Box<[f32]>>,
    /// Sequences holding each page.
    refs: Vec<u32>,
    free: Vec<u32>,
    in_use: usize,
    cache: PrefixCache,
}

#[derive(Default)]
struct PrefixCache {
    by_key: HashMap<(u32, Box<[u32]>), u32>,
    entries: HashMap<u32, Entry>,
    tick: u64,
}

struct Entry {
    parent: u32,
    tokens: Box<[u32]>,
    /// Cached pages whose parent this is.
    children: u32,
    used: u64,
}

impl KvPool {
    pub fn new(model: &Model, cfg: &KvConfig) -> KvPool {
        let page_tokens = cfg.page_tokens.max(1);
        let mut off = 0;
        let mut recurrent = false;
        let layers = model
            .config
            .layers
            .iter()
            .enumerate()
            .map(|(li, l)| {
                let shared = model
                    .extras
                    .layers
                    .get(li)
                    .is_some_and(|e| e.kv_from.is_some());
                match &l.mixer {
                    Some(Mixer::Attention(a)) if !shared => {
                        let kvd = a.n_kv_heads * a.head_dim;
                        let s = LayerSlot { off, kvd };
                        off += 2 * page_tokens * kvd;
                        Some(s)
                    }
                    Some(Mixer::Attention(_)) | None => None,
                    Some(_) => {
                        recurrent = true;
                        None
                    }
                }
            })
            .collect();
        KvPool {
            page_tokens,
            max_pages: cfg.max_pages.unwrap_or(usize::MAX),
            prefix: cfg.prefix_cache && !recurrent && off > 0,
            layers,
            page_floats: off,
            recurrent,
            inner: Mutex::new(Inner {
                pages: Vec::new(),
                refs: Vec::new(),
                free: Vec::new(),
                in_use: 0,
                cache: PrefixCache::default(),
            }),
            in_use: AtomicUsize::new(0),
            cached: AtomicUsize::new(0),
            allocated: AtomicUsize::new(0),
        }
    }

    pub fn page_tokens(&self) -> usize {
        self.page_tokens
    }

    /// Whether full pages are shared between sequences.
    pub fn prefix_cache(&self) -> bool {
        self.prefix
    }

    /// Whether the model has recurrent layers (whose state is outside the pages).
    pub fn recurrent(&self) -> bool {
        self.recurrent
    }

    /// Bytes of one page.
    pub fn page_bytes(&self) -> usize {
        self.page_floats * 4
    }

    /// Pages a sequence of `tokens` positions holds.
    pub fn pages_for(&self, tokens: usize) -> usize {
        if self.page_floats == 0 {
            0
        } else {
            tokens.div_ceil(self.page_tokens)
        }
    }

    pub fn layer(&self, li: usize) -> Option<LayerSlot> {
        self.layers.get(li).copied().flatten()
    }

    /// Read without waiting for a running step.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            page_tokens: self.page_tokens,
            total: self.max_pages,
            in_use: self.in_use.load(Ordering::Relaxed),
            cached: self.cached.load(Ordering::Relaxed),
            allocated: self.allocated.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish_stats(&self, inner: &Inner) {
        self.in_use.store(inner.in_use, Ordering::Relaxed);
        self.cached
            .store(inner.cache.entries.len(), Ordering::Relaxed);
        self.allocated.store(inner.pages.len(), Ordering::Relaxed);
    }

    /// Allocates every page of a bounded pool now (a server: the memory is taken, and
    /// fails, at start-up instead of growing during the first requests).
    pub fn preallocate(&self) -> Result<(), CpuError> {
        if self.max_pages == usize::MAX || self.page_floats == 0 {
            return Ok(());
        }
        let mut inner = self.lock();
        while inner.pages.len() < self.max_pages.min(ROOT as usize) {
            let mut v = Vec::new();
            if v.try_reserve_exact(self.page_floats).is_err() {
                return Err(CpuError::KvTooLarge {
                    bytes: (self.max_pages as u128) * self.page_bytes() as u128,
                    ctx: self.max_pages.saturating_mul(self.page_tokens),
                });
            }
            v.resize(self.page_floats, 0.0);
            inner.pages.push(v.into_boxed_slice());
            inner.refs.push(0);
            let id = (inner.pages.len() - 1) as u32;
            inner.free.push(id);
        }
        inner.free.reverse();
        self.publish_stats(&inner);
        Ok(())
    }

    /// A page for one sequence (reference count 1): a free one, a new one while under the
    /// bound, else the least recently used cached page nobody holds.
    fn alloc(&self, inner: &mut Inner) -> Result<u32, CpuError> {
        let id = if let Some(id) = inner.free.pop() {
            id
        } else if inner.pages.len() < self.max_pages && inner.pages.len() < ROOT as usize {
            let mut v = Vec::new();
            if v.try_reserve_exact(self.page_floats).is_err() {
                return Err(CpuError::KvTooLarge {
                    bytes: self.page_bytes() as u128,
                    ctx: self.page_tokens,
                });
            }
            v.resize(self.page_floats, 0.0);
            inner.pages.push(v.into_boxed_slice());
            inner.refs.push(0);
            (inner.pages.len() - 1) as u32
        } else if let Some(id) = inner.evict_one() {
            id
        } else {
            return Err(CpuError::KvFull {
                pages: self.max_pages,
                page_tokens: self.page_tokens,
            });
        };
        inner.retain(id);
        Ok(id)
    }
}

impl Inner {
    fn retain(&mut self, id: u32) {
        let r = &mut self.refs[id as usize];
        if *r == 0 {
            self.in_use += 1;
        }
        *r += 1;
    }

    fn release(&mut self, id: u32) {
        let r = &mut self.refs[id as usize];
        debug_assert!(*r > 0);
        *r = r.saturating_sub(1);
        if *r == 0 {
            self.in_use -= 1;
            if !self.cache.entries.contains_key(&id) {
                self.free.push(id);
            }
        }
    }

    /// Drops the least recently used cached page that no sequence holds and that no
    /// cached page follows; returns it (unreferenced, out of every list).
    fn evict_one(&mut self) -> Option<u32> {
        let refs = &self.refs;
        let id = self
            .cache
            .entries
            .iter()
            .filter(|(id, e)| e.children == 0 && refs[**id as usize] == 0)
            .min_by_key(|(_, e)| e.used)
            .map(|(id, _)| *id)?;
        let e = self.cache.entries.remove(&id)?;
        self.cache.by_key.remove(&(e.parent, e.tokens));
        if let Some(p) = self.cache.entries.get_mut(&e.parent) {
            p.children -= 1;
        }
        Some(id)
    }

    fn lookup(&mut self, parent: u32, tokens: &[u32]) -> Option<u32> {
        let key = (parent, Box::<[u32]>::from(tokens));
        let id = *self.cache.by_key.get(&key)?;
        self.cache.tick += 1;
        let t = self.cache.tick;
        if let Some(e) = self.cache.entries.get_mut(&id) {
            e.used = t;
        }
        Some(id)
    }

    /// Puts full page `id` (after `parent`) in the cache; returns the page cached under
    /// that key, `id` itself or an earlier page with the same tokens.
    fn publish(&mut self, parent: u32, tokens: &[u32], id: u32) -> u32 {
        if let Some(existing) = self.lookup(parent, tokens) {
            return existing;
        }
        if self.cache.entries.contains_key(&id) {
            // Cached under another key already (cannot happen for a well-formed chain).
            return id;
        }
        self.cache.tick += 1;
        let tokens: Box<[u32]> = tokens.into();
        self.cache.by_key.insert((parent, tokens.clone()), id);
        self.cache.entries.insert(
            id,
            Entry {
                parent,
                tokens,
                children: 0,
                used: self.cache.tick,
            },
        );
        if let Some(p) = self.cache.entries.get_mut(&parent) {
            p.children += 1;
        }
        id
    }
}

/// One sequence's pages: position `p` is row `p % page_tokens` of page
/// `pages[p / page_tokens]`.
pub struct PageTable {
    pool: Arc<KvPool>,
    pages: Vec<u32>,
    /// The tokens at each position (kept only with a prefix cache).
    tokens: Vec<u32>,
    /// Leading pages that are the cached chain of `tokens`.
    published: usize,
}

impl PageTable {
    pub fn new(pool: Arc<KvPool>) -> PageTable {
        PageTable {
            pool,
            pages: Vec::new(),
            tokens: Vec::new(),
            published: 0,
        }
    }

    pub fn pool(&self) -> &Arc<KvPool> {
        &self.pool
    }

    /// Pages this sequence holds.
    pub fn pages(&self) -> usize {
        self.pages.len()
    }

    pub(crate) fn ids(&self) -> &[u32] {
        &self.pages
    }

    /// Keeps the pages of positions `..n` (the sequence now holds `n` positions).
    pub(crate) fn truncate(&mut self, n: usize) {
        let keep = self.pool.pages_for(n);
        if self.pages.len() > keep {
            let mut inner = self.pool.lock();
            for id in self.pages.drain(keep..) {
                inner.release(id);
            }
            self.pool.publish_stats(&inner);
        }
        self.tokens.truncate(n);
        self.published = self.published.min(n / self.pool.page_tokens);
    }

    /// Makes positions `p0..p0 + m` writable: takes the pages they need, and copies the
    /// page holding `p0` when it is shared or cached. On an error the sequence holds what
    /// it held (maybe more pages, which truncate and drop give back).
    pub(crate) fn prepare(
        &mut self,
        inner: &mut Inner,
        p0: usize,
        m: usize,
    ) -> Result<(), CpuError> {
        let pool = &*self.pool;
        if pool.page_floats == 0 {
            return Ok(());
        }
        let pt = pool.page_tokens;
        let need = pool.pages_for(p0 + m);
        for pg in p0 / pt..need.min(self.pages.len()) {
            let id = self.pages[pg];
            if inner.refs[id as usize] > 1 || inner.cache.entries.contains_key(&id) {
                let copy = match pool.alloc(inner) {
                    Ok(c) => c,
                    Err(e) => {
                        pool.publish_stats(inner);
                        return Err(e);
                    }
                };
                let (a, b) = (id as usize, copy as usize);
                let (src, dst) = if a < b {
                    let (lo, hi) = inner.pages.split_at_mut(b);
                    (&lo[a], &mut hi[0])
                } else {
                    let (lo, hi) = inner.pages.split_at_mut(a);
                    (&hi[0], &mut lo[b])
                };
                dst.copy_from_slice(src);
                inner.release(id);
                self.pages[pg] = copy;
                self.published = self.published.min(pg);
            }
        }
        let mut result = Ok(());
        while self.pages.len() < need {
            match pool.alloc(inner) {
                Ok(id) => self.pages.push(id),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        pool.publish_stats(inner);
        result
    }

    /// After `tokens` were written at `p0..`: records them and publishes the pages they
    /// filled (taking an equal cached page instead of a fresh copy).
    pub(crate) fn wrote(&mut self, inner: &mut Inner, p0: usize, tokens: &[u32]) {
        let pool = &*self.pool;
        if !pool.prefix {
            return;
        }
        self.tokens.truncate(p0);
        if self.tokens.len() != p0 {
            // A gap (cannot happen through forward): stop caching this sequence.
            self.published = 0;
            return;
        }
        self.tokens.extend_from_slice(tokens);
        let pt = pool.page_tokens;
        let full = self.tokens.len() / pt;
        while self.published < full.min(self.pages.len()) {
            let i = self.published;
            let parent = if i == 0 { ROOT } else { self.pages[i - 1] };
            let own = self.pages[i];
            let got = inner.publish(parent, &self.tokens[i * pt..(i + 1) * pt], own);
            if got != own {
                inner.retain(got);
                inner.release(own);
                self.pages[i] = got;
            }
            self.published += 1;
        }
        pool.publish_stats(inner);
    }

    /// Extends a sequence holding `prompt[..len]` (`len` a multiple of the page size, its
    /// pages all cached) with cached full pages continuing `prompt`, up to `limit`
    /// positions; returns the positions it now holds.
    pub(crate) fn adopt(&mut self, len: usize, prompt: &[u32], limit: usize) -> usize {
        let pool = self.pool.clone();
        let pt = pool.page_tokens;
        if !pool.prefix
            || !len.is_multiple_of(pt)
            || self.published != len / pt
            || self.tokens.len() != len
            || prompt.get(..len) != Some(&self.tokens[..])
        {
            return len;
        }
        let mut inner = pool.lock();
        // Pages past `len` (left by a failed step) go back first.
        for id in self.pages.drain(len / pt..) {
            inner.release(id);
        }
        let limit = limit.min(prompt.len());
        let mut n = len;
        while n + pt <= limit {
            let parent = self.pages.last().copied().unwrap_or(ROOT);
            let Some(id) = inner.lookup(parent, &prompt[n..n + pt]) else {
                break;
            };
            inner.retain(id);
            self.pages.push(id);
            self.tokens.extend_from_slice(&prompt[n..n + pt]);
            n += pt;
        }
        self.published = n / pt;
        pool.publish_stats(&inner);
        n
    }
}

impl Clone for PageTable {
    /// A copy sharing every page (copy on write).
    fn clone(&self) -> Self {
        let mut inner = self.pool.lock();
        for &id in &self.pages {
            inner.retain(id);
        }
        self.pool.publish_stats(&inner);
        PageTable {
            pool: self.pool.clone(),
            pages: self.pages.clone(),
            tokens: self.tokens.clone(),
            published: self.published,
        }
    }
}

impl Drop for PageTable {
    fn drop(&mut self) {
        if self.pages.is_empty() {
            return;
        }
        let mut inner = self.pool.lock();
        for id in self.pages.drain(..) {
            inner.release(id);
        }
        self.pool.publish_stats(&inner);
    }
}

/// A step's view of the pages of one sequence.
pub struct KvPages<'a> {
    pub(crate) pages: &'a mut [Box<[f32]>],
    pub(crate) table: &'a [u32],
    pub(crate) pool: &'a KvPool,
}

impl KvPages<'_> {
    /// Writes `m` rows of k and v (`m × kvd` each) of layer `li` at positions `p0..`.
    pub fn write(&mut self, li: usize, p0: usize, k: &[f32], v: &[f32]) -> Result<(), CpuError> {
        let Some(s) = self.pool.layer(li) else {
            return Err(CpuError::Unsupported(format!("layer {li}: no KV cache")));
        };
        let pt = self.pool.page_tokens;
        let m = k.len() / s.kvd.max(1);
        let mut j = 0;
        while j < m {
            let p = p0 + j;
            let (pg, r0) = (p / pt, p % pt);
            let n = (pt - r0).min(m - j);
            let Some(&id) = self.table.get(pg) else {
                return Err(CpuError::Unsupported(format!(
                    "position {p} has no KV page"
                )));
            };
            let page = &mut self.pages[id as usize];
            page[s.off + r0 * s.kvd..][..n * s.kvd].copy_from_slice(&k[j * s.kvd..][..n * s.kvd]);
            let vo = s.off + pt * s.kvd;
            page[vo + r0 * s.kvd..][..n * s.kvd].copy_from_slice(&v[j * s.kvd..][..n * s.kvd]);
            j += n;
        }
        Ok(())
    }

    /// A read-only view of layer `li`'s rows.
    pub fn layer(&self, li: usize) -> Option<LayerKv<'_>> {
        let s = self.pool.layer(li)?;
        Some(LayerKv {
            pages: &*self.pages,
            table: self.table,
            page_tokens: self.pool.page_tokens,
            slot: s,
        })
    }
}

/// One layer's K and V rows, read through the page table.
#[derive(Clone, Copy)]
pub struct LayerKv<'a> {
    pages: &'a [Box<[f32]>],
    table: &'a [u32],
    page_tokens: usize,
    slot: LayerSlot,
}

impl LayerKv<'_> {
    /// Floats per position.
    pub fn kvd(&self) -> usize {
        self.slot.kvd
    }

    /// Positions the table covers.
    pub fn positions(&self) -> usize {
        self.table.len() * self.page_tokens
    }

    /// Calls `f(k, v, n)` for consecutive runs of positions `lo..hi`, each run `n`
    /// positions contiguous within one page (`k`, `v`: `n × kvd` floats), in order.
    #[inline]
    pub fn runs(&self, lo: usize, hi: usize, mut f: impl FnMut(&[f32], &[f32], usize)) {
        let pt = self.page_tokens;
        let kvd = self.slot.kvd;
        let mut p = lo;
        while p < hi {
            let (pg, r0) = (p / pt, p % pt);
            let n = (pt - r0).min(hi - p);
            let page = &self.pages[self.table[pg] as usize];
            let k = &page[self.slot.off + r0 * kvd..][..n * kvd];
            let v = &page[self.slot.off + (pt + r0) * kvd..][..n * kvd];
            f(k, v, n);
            p += n;
        }
    }
}
