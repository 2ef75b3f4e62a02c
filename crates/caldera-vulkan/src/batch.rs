//! Batched decode: one step decodes one token for each of up to [`MAX_BATCH`] sequences,
//! reading each weight once for all of them.
//!
//! **Paged KV cache.** A [`VkBatch`] owns, per attention layer, one K and one V pool of
//! `pages` pages of [`KV_PAGE`] positions (`kv.glsl`'s paging: position p of a sequence
//! is row `table[p / KV_PAGE] * KV_PAGE + p % KV_PAGE` of the pool); every layer uses
//! the same page ids, so one page table per sequence serves them all. A layer reading an
//! earlier layer's cache (Gemma 4's KV sharing) has no pools: its runners (the batched
//! one included) bind its source layer's, through the same page ids. The tables live in
//! a host-visible buffer (`slots` x [`slot_table_entries`]`(cap)` u32, written by the
//! batch as pages are taken and given back) that each step copies into the device table
//! its kernels read (invariant 3: per-step values in device buffers, nothing rebound).
//! Pages are taken when a step is about to write a position that has none, all of a
//! step's before it runs ([`VkBatch::prepare`]): when the pool has too few (after taking
//! back the cached pages nobody needs, below), the step fails with an error before
//! anything runs, never halfway. `cap` is the most positions one sequence holds (the
//! table's length, `--ctx`, per slot); the pool's pages are shared by all the slots
//! (`--kv-pages`; the default, `slots * ceil(cap / KV_PAGE)`, lets every slot fill its
//! whole context at once, as before paging).
//!
//! [`VkBatch::runner`] hands out sequences ([`VkRunner`]s) that bind the whole pools and a
//! view of their slot's table: they prefill and decode alone with their own recordings as
//! any runner does, and [`VkBatch::step`] decodes several of them together with the
//! batched runner, whose steps (recorded once per bucket 1, 2, 4, 8, 16 columns and
//! replayed) bind the pools and every slot's table. The step values are the live column
//! count, then per column its slot and position; a bucket's padding columns do nothing
//! (the mat-vecs stop at the live count, the attention returns), so they never write a
//! live sequence's pages. The weights go through the batched int8 mat-vec
//! (`quant_rows` and `mvqm`, [`Mvqn`](crate::ops::Mvqn)) where their type has one, else
//! (where the device has cooperative matrices) the batched mat-vec on them (`half_rows`
//! and `mvc`, [`Mvc`](crate::ops::Mvc): every other type but f32), else the tiled matmul
//! or the batched f32 mat-vec (`CALDERA_VK_BATCH_MM`, see [`BatchMm`]); attention
//! through `attn_batch` (per column: q/k norm, RoPE, KV write and split attention over
//! its own pages; it also quantizes the output for the o-projection; `attn_dec_batch`
//! with `CALDERA_VK_ATTN_DEC=1`, whose o-projection then quantizes its own input).
//!
//! **Recurrent mixers** (GatedDeltaNet, Mamba2, short conv): the batch also owns their
//! states, per recurrent layer one pool of conv states and one of S (f32, slot `s` at
//! `s * stride`, strides multiples of [`Buffer::VIEW_ALIGN`]); a runner's states are
//! views of its slot's regions, zeroed when the slot is leased (and by `truncate(0)`),
//! so a sequence's prefill ops (`conv_rows`, `gdn_chunk`, ...) run on its region as on
//! states of its own. In a batched step the decode kernels (`gdn_decode`,
//! `mamba2_decode`, `shortconv_decode` with their batched flag) run every column in one
//! dispatch, each on its own slot's state at its own position (the conv ring's row);
//! padding columns exit before touching any state. Their states are not lent to other
//! slots by pages (their runners do not share prefixes): a slot's region holds only its
//! own sequence's latest state; prompts are shared through snapshots (below).
//! gpt-oss's attention batches as well (`attn_batch` with its sinks; the q|k|v and o
//! biases as row ops over the columns), and so does Gemma 4: its per-layer inputs per
//! column (the step writes each column's per-layer token embeddings; the projection of
//! the embeddings, `ple_in`, and each layer's gate / projection run over all the columns
//! at once, as a prefill step's rows), v norm and KV-shared layers in `attn_batch`
//! (`F_VNORM`, `F_NOKV`: a shared layer's columns read the source layer's pools at their
//! own pages and write nothing), and its global layers' heads of 512.
//!
//! **Prefix reuse across slots, by sharing pages.** The batch keeps, per slot, the
//! tokens whose K and V its table's pages hold (position i: token i) and a reference
//! count per page. What a runner computed stays valid after it is truncated, emptied or
//! dropped, until a step of that slot writes over it: a step first cuts its slot's list
//! (and gives back the pages past what it writes), and extends the list with its tokens
//! once it ran. A runner's `reuse_prefix` ([`VkBatch::reuse`]) takes the longest prefix
//! of a prompt that any slot holds: its own (nothing to do), else another's (at least
//! [`MIN_COPY`] positions longer), whose pages its table then names too (no copy). A
//! step that writes into a page another table also names (the shared prefix's partly
//! filled last page, or a page after a rewind) first copies it to a fresh page of its
//! own (copy on write: one `vkCmdCopyBuffer` submit, that page of every attention
//! layer's K and V). Every cache holds all positions (a sliding window is a mask in the
//! kernels, not a ring), so sharing is exact for windowed layers too. When the free
//! list runs short, pages that no live sequence needs (a slot's pages past its runner's
//! length, every page of a slot without a runner) are taken back, slots without a runner
//! first, then the least recently stepped, from their last page on; then prompt
//! snapshots (below), least recently used first. (A step's page count is taken again
//! after each one: evicting a snapshot may leave a page the step writes its own.)
//!
//! **Prompt snapshots** (models with recurrent mixers, [`VkBatch::with_snapshots`]; the
//! server keeps one per slot, as the CPU backend). A recurrent state cannot rewind, so a
//! prompt's prefix is shared as a snapshot of the sequence at the prompt's end
//! (`Runner::checkpoint`, `VkBatch::snapshot`): its tokens, its pages (named by the
//! snapshot's own table and counted as a slot's: the slot's next write into the partly
//! filled last page copies it first) and a copy of every recurrent layer's conv and S
//! states in a snapshot region of the layer's state pools (regions `slots..slots + N`
//! after the slots', allocated with them; one `vkCmdCopyBuffer` submit for all layers).
//! A runner's `reuse_prefix` (`VkBatch::restore`) takes the longest snapshot whose
//! tokens begin the prompt, longer than what it holds and within the limit (a snapshot
//! is exact only at its own length): its states are copied into the slot's region (one
//! submit), its table names the snapshot's pages, its length is the snapshot's. At most
//! N are kept (the least recently used, by taking or restoring, goes first); a
//! snapshot's pages go back to the pool when it is evicted and no table names them. A
//! slot's next sequence zeroes the slot's region, never a snapshot's.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard};

use caldera_model::{panic_message, step_one, BatchItem, BatchStepper, Runner, StepOutcome};

use crate::error::{Result, VkError};
use crate::kv::{slot_table_entries, KV_PAGE};
use crate::memory::{Buffer, MemoryKind};
use crate::model::{BatchMm, KvSource, PageTable, VkModel, VkRunner};
use crate::recurrent::RecurrentState;

/// Most sequences one batched step decodes (the largest bucket).
pub const MAX_BATCH: usize = 16;

/// Fewest positions `VkBatch::reuse` takes from another slot beyond what the sequence
/// holds: a shorter shared prefix (a chat template's first tokens) is cheaper to
/// recompute in the prefill step that runs anyway than the copy of a shared partly
/// filled page it would cost.
pub const MIN_COPY: usize = 16;

/// A pool of KV pages for `slots` sequences of up to `cap` tokens, and the batched
/// runner over it.
pub struct VkBatch {
    m: Arc<VkModel>,
    cap: usize,
    slots: usize,
    /// Pages of the pool and page-table entries per slot.
    pages: usize,
    slot_pages: usize,
    /// Per layer, the K and V page pools and the K (= V) values per page (`None`
    /// without attention).
    pool: Vec<Option<(Buffer, Buffer, u64)>>,
    /// The page tables: the host-visible copy the batch writes, copied by every step
    /// into the device one the kernels read.
    table_host: Buffer,
    table_dev: Buffer,
    /// Per recurrent layer, its state pools (conv state, S) and their bytes per region
    /// (`None` for other layers; S's 0 for the short conv, which has none): one region
    /// per slot, then one per snapshot (region `slots + i`).
    states: Vec<Option<(RecurrentState, u64, u64)>>,
    /// Prompt snapshots the batch keeps at most (0 without recurrent layers).
    snapshots: usize,
    /// Page ownership, per-slot tables and what they hold. Held across a page copy, so
    /// no step writes meanwhile.
    book: Mutex<Book>,
    runner: Mutex<VkRunner>,
}

/// The pages' bookkeeping.
struct Book {
    free: Vec<u32>,
    /// Tables naming each page.
    refs: Vec<u32>,
    slots: Vec<SlotPages>,
    /// Counts the steps, for the least recently used order.
    clock: u64,
    /// Prompt snapshots, least recently used first.
    snaps: Vec<Snap>,
    /// Snapshot state regions no snapshot holds (0.. the batch's snapshot count).
    free_regions: Vec<usize>,
}

/// A prompt snapshot of a model with recurrent layers: the tokens, the attention
/// layers' pages holding their K and V (named by its own table, counted in `refs` as a
/// slot's are) and its copy of every recurrent layer's states (state region
/// `slots + region`), exact at position `tokens.len()` only.
struct Snap {
    tokens: Vec<u32>,
    table: Vec<u32>,
    region: usize,
}

#[derive(Default)]
struct SlotPages {
    /// Leased to a runner.
    leased: bool,
    /// Page ids of positions 0, KV_PAGE, ...
    table: Vec<u32>,
    /// The tokens whose K and V the pages hold at positions 0.. (see the module's notes).
    tokens: Vec<u32>,
    /// Positions the slot's runner holds (0 without a runner): its pages up to there
    /// are never taken back.
    live: usize,
    /// When a step last wrote the slot.
    used: u64,
}

impl Book {
    /// Lets go of a page one table named.
    fn unref(&mut self, p: u32) {
        let r = &mut self.refs[p as usize];
        *r = r.saturating_sub(1);
        if *r == 0 {
            self.free.push(p);
        }
    }

    /// Drops the least recently used snapshot (its pages go back to the pool where no
    /// table names them any more, its state region to the free ones); false when there
    /// is none.
    fn evict_snapshot(&mut self) -> bool {
        if self.snaps.is_empty() {
            return false;
        }
        let snap = self.snaps.remove(0);
        for &p in &snap.table {
            self.unref(p);
        }
        self.free_regions.push(snap.region);
        true
    }

    /// Drops `slot`'s table entries from `keep` on (pages no table names go free); its
    /// tokens end where its pages do.
    fn cut(&mut self, slot: usize, keep: usize) {
        let s = &mut self.slots[slot];
        let gone = s.table.split_off(keep.min(s.table.len()));
        s.tokens.truncate(keep * KV_PAGE);
        for p in gone.into_iter().rev() {
            self.unref(p);
        }
    }

    /// Takes back pages no live sequence needs (not of `skip`'s slots) until `need` are
    /// free or none is left (see [`Book::reclaim_one`]).
    #[cfg(test)]
    fn reclaim(&mut self, need: usize, skip: &[usize]) {
        while self.free.len() < need && self.reclaim_one(skip) {}
    }

    /// Takes back one page no live sequence needs (not of `skip`'s slots): of the slots
    /// without a runner first, then of the least recently used, from their last page
    /// on; else drops the least recently used snapshot. (The page may still be named by
    /// another table.) False when there is nothing left to take.
    fn reclaim_one(&mut self, skip: &[usize]) -> bool {
        let victim = (0..self.slots.len())
            .filter(|s| !skip.contains(s))
            .filter(|&s| {
                let sp = &self.slots[s];
                sp.table.len() > sp.live.div_ceil(KV_PAGE)
            })
            .min_by_key(|&s| (self.slots[s].leased, self.slots[s].used));
        let Some(v) = victim else {
            return self.evict_snapshot();
        };
        let keep = self.slots[v].table.len() - 1;
        self.cut(v, keep);
        true
    }

    /// Pages a step writing `items` (slot, from, to; tables already cut to `to`) takes
    /// from the free list: one per position's page it lacks, one per shared page it
    /// writes into (copy on write).
    fn need(&self, items: &[(usize, usize, usize)]) -> usize {
        items
            .iter()
            .map(|&(slot, from, to)| {
                let s = &self.slots[slot];
                let shared = (from / KV_PAGE..s.table.len())
                    .filter(|&i| self.refs[s.table[i] as usize] > 1)
                    .count();
                to.div_ceil(KV_PAGE) - s.table.len() + shared
            })
            .sum()
    }
}

/// A runner's hold on a pool slot; frees it when dropped with the runner (its pages stay
/// cached for reuse until the pool needs them).
pub(crate) struct SlotLease {
    pub(crate) batch: Arc<VkBatch>,
    pub(crate) slot: usize,
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        let mut b = self.batch.book();
        if let Some(s) = b.slots.get_mut(self.slot) {
            s.leased = false;
            s.live = 0;
        }
    }
}

impl VkBatch {
    /// Pools for `slots` sequences of `cap` tokens each (pages for all of them at once)
    /// on `m`'s device; the weights' kernels as `CALDERA_VK_BATCH_MM` says.
    pub fn new(m: Arc<VkModel>, slots: usize, cap: usize) -> Result<Arc<VkBatch>> {
        Self::with_mm(m, slots, cap, BatchMm::from_env())
    }

    /// [`VkBatch::new`] with the weights' kernels chosen by `mm`.
    pub fn with_mm(m: Arc<VkModel>, slots: usize, cap: usize, mm: BatchMm) -> Result<Arc<VkBatch>> {
        let pages = slots.max(1) * cap.max(1).div_ceil(KV_PAGE);
        Self::with_pages(m, slots, cap, pages, mm)
    }

    /// Pools of `pages` pages of [`KV_PAGE`] positions shared by `slots` sequences of
    /// up to `cap` tokens each.
    pub fn with_pages(
        m: Arc<VkModel>,
        slots: usize,
        cap: usize,
        pages: usize,
        mm: BatchMm,
    ) -> Result<Arc<VkBatch>> {
        Self::with_snapshots(m, slots, cap, pages, 0, mm)
    }

    /// [`VkBatch::with_pages`] keeping up to `snapshots` prompt snapshots for a model
    /// with recurrent layers (their states' regions allocated now, after the slots'; see
    /// the module's notes); ignored (0) for other models, whose prefixes are shared as
    /// pages.
    pub fn with_snapshots(
        m: Arc<VkModel>,
        slots: usize,
        cap: usize,
        pages: usize,
        snapshots: usize,
        mm: BatchMm,
    ) -> Result<Arc<VkBatch>> {
        let ctx = m.context();
        let (slots, cap) = (slots.max(1), cap.max(1));
        if pages == 0 || pages > u32::MAX as usize {
            return Err(VkError::Invalid(format!(
                "a KV pool of {pages} pages (at least 1; --kv-pages)"
            )));
        }
        let kv_type = ctx.tuning().kv;
        let mut pool = Vec::new();
        let mut views_of = Vec::new();
        for (li, w) in m.kv_widths().into_iter().enumerate() {
            let Some(kvd) = w else {
                pool.push(None);
                views_of.push(None);
                continue;
            };
            let per_page = (KV_PAGE * kvd) as u64;
            let total = (pages as u64)
                .checked_mul(per_page)
                .map(|v| kv_type.bytes(v))
                .filter(|&t| t <= ctx.max_buffer_bytes())
                .ok_or_else(|| {
                    VkError::Invalid(format!(
                        "layer {li}: a KV pool of {pages} pages of {KV_PAGE} tokens ({} KiB \
                         each) is more than one buffer may hold on {} ({} MiB); use fewer \
                         pages (--kv-pages), slots or a smaller context (--ctx)",
                        kv_type.bytes(per_page) >> 10,
                        ctx.info().name,
                        ctx.max_buffer_bytes() >> 20
                    ))
                })?;
            let k = ctx.create_buffer(total, MemoryKind::Device)?;
            let v = ctx.create_buffer(total, MemoryKind::Device)?;
            views_of.push(Some((k.clone(), v.clone())));
            pool.push(Some((k, v, per_page)));
        }
        let slot_pages = slot_table_entries(cap);
        let table_bytes = (slots * slot_pages * 4) as u64;
        let table_host = ctx.create_buffer(table_bytes, MemoryKind::Upload)?;
        ctx.write_mapped(&table_host, 0, &vec![0u8; table_bytes as usize])?;
        let table_dev = ctx.create_buffer(table_bytes, MemoryKind::Device)?;
        let recurrent = m.state_sizes()?.iter().any(Option::is_some);
        let snapshots = if recurrent { snapshots } else { 0 };
        let (states, state_strides) = state_pools(&m, slots, snapshots)?;
        let cols = MAX_BATCH.min(slots.next_power_of_two());
        let runner = VkRunner::build(
            m.clone(),
            cap,
            KvSource::Batch {
                pool: views_of,
                states: states
                    .iter()
                    .map(|s| s.as_ref().map(|(st, _, _)| st.clone()))
                    .collect(),
                state_strides,
                slots,
                cols,
                slot_pages: slot_pages as u32,
                table: PageTable {
                    dev: table_dev.clone(),
                    host: table_host.clone(),
                    host_at: 0,
                    bytes: table_bytes,
                },
                mm,
            },
        )?;
        let book = Book {
            free: (0..pages as u32).rev().collect(),
            refs: vec![0; pages],
            slots: (0..slots).map(|_| SlotPages::default()).collect(),
            clock: 0,
            snaps: Vec::new(),
            free_regions: (0..snapshots).rev().collect(),
        };
        Ok(Arc::new(VkBatch {
            m,
            cap,
            slots,
            pages,
            slot_pages,
            pool,
            table_host,
            table_dev,
            states,
            snapshots,
            book: Mutex::new(book),
            runner: Mutex::new(runner),
        }))
    }

    pub fn model(&self) -> &Arc<VkModel> {
        &self.m
    }

    /// Sequences the pool holds.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Tokens each sequence holds at most.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Pages of [`KV_PAGE`] positions in the pool.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Bytes of the K and V page pools (layers reading another layer's cache have none).
    pub fn kv_pool_bytes(&self) -> u64 {
        self.pool
            .iter()
            .flatten()
            .map(|(k, v, _)| k.size() + v.size())
            .sum()
    }

    /// Pages no table names now (pages that only cache an idle prefix are not free).
    pub fn free_pages(&self) -> usize {
        self.book().free.len()
    }

    /// Pages the slot's table names now (shared ones included).
    pub fn slot_pages(&self, slot: usize) -> usize {
        self.book().slots.get(slot).map_or(0, |s| s.table.len())
    }

    /// (pages that hold a live sequence's positions, pages that only cache tokens of
    /// sequences past their length or gone, or a prompt snapshot's: taken back when the
    /// pool runs short).
    pub fn page_counts(&self) -> (usize, usize) {
        let b = self.book();
        let mut live = vec![false; self.pages];
        let mut named = vec![false; self.pages];
        for s in &b.slots {
            for (i, &p) in s.table.iter().enumerate() {
                named[p as usize] = true;
                if i < s.live.div_ceil(KV_PAGE) {
                    live[p as usize] = true;
                }
            }
        }
        for x in &b.snaps {
            for &p in &x.table {
                named[p as usize] = true;
            }
        }
        let in_use = live.iter().filter(|&&l| l).count();
        let cached = named.iter().zip(&live).filter(|(&n, &l)| n && !l).count();
        (in_use, cached)
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new (empty) sequence in a free slot of the pool; an error when every slot is
    /// held by a live runner. It takes pages as its steps need them.
    pub fn runner(self: &Arc<Self>) -> Result<VkRunner> {
        let slot = {
            let mut b = self.book();
            let Some(s) = b.slots.iter().position(|s| !s.leased) else {
                return Err(VkError::Invalid(format!(
                    "all {} sequences of the batch are in use",
                    self.slots
                )));
            };
            b.slots[s].leased = true;
            b.slots[s].live = 0;
            s
        };
        // Frees the slot again if anything below fails.
        let lease = SlotLease {
            batch: self.clone(),
            slot,
        };
        let kv = self
            .pool
            .iter()
            .map(|p| p.as_ref().map(|(k, v, _)| (k.clone(), v.clone())))
            .collect();
        let mut states = Vec::with_capacity(self.states.len());
        for p in &self.states {
            states.push(match p {
                Some((st, conv, ssm)) => {
                    let (ca, sa) = (slot as u64 * conv, slot as u64 * ssm);
                    Some(RecurrentState {
                        conv: st.conv.view(ca, *conv)?,
                        ssm: match &st.ssm {
                            Some(s) => Some(s.view(sa, *ssm)?),
                            None => None,
                        },
                    })
                }
                None => None,
            });
        }
        // The slot's states are its previous tenant's: a new sequence starts from zeros.
        RecurrentState::reset_all(self.m.context(), states.iter().flatten())?;
        let bytes = (self.slot_pages * 4) as u64;
        let at = slot as u64 * bytes;
        let table = PageTable {
            dev: self.table_dev.view(at, bytes)?,
            host: self.table_host.clone(),
            host_at: at,
            bytes,
        };
        let src = KvSource::Views { kv, states, table };
        let mut r = VkRunner::build(self.m.clone(), self.cap, src)?;
        r.lease = Some(lease);
        Ok(r)
    }

    /// Before a step writes positions `from .. to` of `slot`'s sequence: its token list
    /// ends at `from`, its table at the page of `to - 1`, and that table names a page of
    /// its own (no other table's) for every position written. See [`VkBatch::prepare_all`].
    pub(crate) fn prepare(&self, slot: usize, from: usize, to: usize) -> Result<()> {
        self.prepare_all(&[(slot, from, to)])
    }

    /// [`VkBatch::prepare`] for the sequences of one step, all or nothing: the pages the
    /// step needs come from the free list, then from pages nobody needs (see the
    /// module's notes); when there are not enough, an error and nothing is taken.
    /// Shared pages the step writes into are copied first (one submit).
    pub(crate) fn prepare_all(&self, items: &[(usize, usize, usize)]) -> Result<()> {
        let mut b = self.book();
        b.clock += 1;
        let clock = b.clock;
        let skip: Vec<usize> = items.iter().map(|i| i.0).collect();
        for &(slot, from, to) in items {
            if slot >= self.slots || from >= to || to > self.cap {
                return Err(VkError::Invalid(format!(
                    "positions {from}..{to} of pool slot {slot} (of {}, {} positions each)",
                    self.slots, self.cap
                )));
            }
            if b.slots[slot].table.len() * KV_PAGE < from {
                return Err(VkError::Invalid(format!(
                    "pool slot {slot}: positions before {from} have no KV pages"
                )));
            }
            b.slots[slot].tokens.truncate(from);
            b.cut(slot, to.div_ceil(KV_PAGE));
        }
        // (Evicting a snapshot may leave a page the step writes its own: counted again.)
        let mut need = b.need(items);
        while b.free.len() < need && b.reclaim_one(&skip) {
            need = b.need(items);
        }
        if b.free.len() < need {
            let live: usize = b.slots.iter().map(|s| s.live.div_ceil(KV_PAGE)).sum();
            return Err(VkError::Invalid(format!(
                "the KV cache is full: this step needs {need} more pages of {KV_PAGE} tokens \
                 and {} of the pool's {} are free (the running sequences hold about {live}); \
                 retry when a sequence ends, or start with more pages (--kv-pages)",
                b.free.len(),
                self.pages
            )));
        }
        let mut copies = Vec::new();
        for &(slot, from, to) in items {
            for i in from / KV_PAGE..to.div_ceil(KV_PAGE) {
                let old = b.slots[slot].table.get(i).copied();
                if old.is_some_and(|p| b.refs[p as usize] <= 1) {
                    continue; // its own page already
                }
                let Some(fresh) = b.free.pop() else {
                    return Err(VkError::Invalid("the KV page count went wrong".into()));
                };
                if let Some(old) = old {
                    // Copy on write: the positions before `from` in it stay valid.
                    b.refs[old as usize] -= 1;
                    if from > i * KV_PAGE {
                        copies.push((old, fresh));
                    }
                    b.slots[slot].table[i] = fresh;
                } else {
                    b.slots[slot].table.push(fresh);
                }
                b.refs[fresh as usize] = 1;
            }
            let s = &mut b.slots[slot];
            s.live = to;
            s.used = clock;
        }
        if !copies.is_empty() {
            let kv = self.m.context().tuning().kv;
            let mut regions = Vec::new();
            for (k, v, per_page) in self.pool.iter().flatten() {
                for &(old, fresh) in &copies {
                    let (src, len) = kv.span(old as u64 * per_page, (old as u64 + 1) * per_page);
                    let (dst, _) = kv.span(fresh as u64 * per_page, (fresh as u64 + 1) * per_page);
                    regions.push((k, src, dst, len));
                    regions.push((v, src, dst, len));
                }
            }
            self.m.context().copy_within(&regions)?;
        }
        for &(slot, _, _) in items {
            self.write_table(&b, slot)?;
        }
        Ok(())
    }

    /// Writes `slot`'s page table into the host copy (every step copies it to the
    /// device before its kernels run).
    fn write_table(&self, b: &Book, slot: usize) -> Result<()> {
        let t = &b.slots[slot].table;
        if t.is_empty() {
            return Ok(());
        }
        let bytes: Vec<u8> = t.iter().flat_map(|p| p.to_le_bytes()).collect();
        let at = (slot * self.slot_pages * 4) as u64;
        self.m.context().write_mapped(&self.table_host, at, &bytes)
    }

    /// The sequence in `slot` now holds `len` positions (a truncation): its pages past
    /// that may be taken back when the pool runs short (their tokens stay lendable until
    /// then).
    pub(crate) fn note_len(&self, slot: usize, len: usize) {
        if let Some(s) = self.book().slots.get_mut(slot) {
            s.live = s.live.min(len);
        }
    }

    /// After a step wrote `tokens` into `slot`'s pages from position `from` on.
    pub(crate) fn note_written(&self, slot: usize, from: usize, tokens: &[u32]) {
        if let Some(s) = self.book().slots.get_mut(slot) {
            // Shorter only if something was not noted: then positions from.. stay unknown.
            if s.tokens.len() >= from {
                s.tokens.truncate(from);
                s.tokens.extend_from_slice(tokens);
            }
        }
    }

    /// The sequence in `slot`, holding `tokens[..len]`, takes the longest prefix of
    /// `tokens[..limit]` that a slot's pages hold: its own (positions past `len` that a
    /// step has not overwritten yet: nothing to do), or another slot's, idle, busy or
    /// without a runner, when that is at least [`MIN_COPY`] positions longer (its table
    /// then names the other's pages too; the first write into a shared page copies it).
    /// Returns the positions the sequence holds now (`len` when nothing better is held,
    /// or when `slot`'s pages do not hold `tokens[..len]`).
    pub(crate) fn reuse(
        &self,
        slot: usize,
        len: usize,
        tokens: &[u32],
        limit: usize,
    ) -> Result<usize> {
        let limit = limit.min(tokens.len()).min(self.cap);
        let want = &tokens[..limit];
        let common = |h: &[u32]| h.iter().zip(want).take_while(|(a, b)| a == b).count();
        let mut b = self.book();
        let Some(own) = b.slots.get(slot).map(|s| common(&s.tokens)) else {
            return Err(VkError::Invalid(format!("no pool slot {slot}")));
        };
        if own < len.min(limit) {
            // Not the state the caller describes: leave it alone.
            return Ok(len);
        }
        // (What a slot's pages cover: its tokens never run past them.)
        let best = b
            .slots
            .iter()
            .enumerate()
            .filter(|&(s, _)| s != slot)
            .map(|(s, h)| {
                let n = common(&h.tokens).min(h.table.len() * KV_PAGE);
                (n, usize::MAX - s)
            })
            .max()
            .map(|(n, s)| (n, usize::MAX - s));
        let Some((n, from)) = best.filter(|&(n, _)| n >= own + MIN_COPY) else {
            let n = own.max(len);
            let s = &mut b.slots[slot];
            s.live = s.live.max(n);
            return Ok(n);
        };
        // Positions own.. come from `from`'s pages: from the page holding `own` on.
        let first = own / KV_PAGE;
        let last = n.div_ceil(KV_PAGE);
        b.cut(slot, first);
        for i in first..last {
            let p = b.slots[from].table[i];
            b.refs[p as usize] += 1;
            b.slots[slot].table.push(p);
        }
        let s = &mut b.slots[slot];
        s.tokens.truncate(own.min(first * KV_PAGE));
        s.tokens.extend_from_slice(&want[s.tokens.len()..n]);
        s.live = n;
        self.write_table(&b, slot)?;
        Ok(n)
    }

    /// Prompt snapshots the batch keeps at most (0 for a model without recurrent
    /// layers).
    pub fn snapshots(&self) -> usize {
        self.snapshots
    }

    /// Prompt snapshots held now.
    pub fn snapshot_count(&self) -> usize {
        self.book().snaps.len()
    }

    /// Drops the least recently used prompt snapshot: its pages go back to the pool
    /// where no table names them any more. False when there is none.
    pub fn evict_snapshot(&self) -> bool {
        self.book().evict_snapshot()
    }

    /// Copies every recurrent layer's states (conv and S) from state region `from` to
    /// region `to` (slots first, then snapshots), in one submit.
    fn copy_states(&self, from: usize, to: usize) -> Result<()> {
        let mut regions = Vec::new();
        for (st, conv, ssm) in self.states.iter().flatten() {
            regions.push((&st.conv, from as u64 * conv, to as u64 * conv, *conv));
            if let Some(s) = &st.ssm {
                regions.push((s, from as u64 * ssm, to as u64 * ssm, *ssm));
            }
        }
        self.m.context().copy_within(&regions)
    }

    /// Keeps a snapshot of the sequence in `slot`, holding `len` positions (the end of a
    /// prompt): its tokens, its pages (shared: the slot's next write into the last one
    /// copies it first) and a copy of its recurrent states; the least recently used
    /// snapshot goes when all [`Self::snapshots`] are held. Returns false (nothing kept)
    /// without snapshots, for an empty sequence, or when the slot's pages do not hold
    /// what the sequence computed; a snapshot of the same tokens is only marked used.
    pub(crate) fn snapshot(&self, slot: usize, len: usize) -> Result<bool> {
        if self.snapshots == 0 || len == 0 {
            return Ok(false);
        }
        let mut b = self.book();
        let Some(s) = b.slots.get(slot) else {
            return Err(VkError::Invalid(format!("no pool slot {slot}")));
        };
        if s.tokens.len() < len || s.table.len() * KV_PAGE < len {
            return Ok(false);
        }
        let tokens = s.tokens[..len].to_vec();
        let table = s.table[..len.div_ceil(KV_PAGE)].to_vec();
        if let Some(i) = b.snaps.iter().position(|x| x.tokens == tokens) {
            let x = b.snaps.remove(i);
            b.snaps.push(x);
            return Ok(true);
        }
        if b.free_regions.is_empty() {
            b.evict_snapshot();
        }
        let Some(region) = b.free_regions.pop() else {
            return Err(VkError::Invalid("the snapshot count went wrong".into()));
        };
        if let Err(e) = self.copy_states(slot, self.slots + region) {
            b.free_regions.push(region);
            return Err(e);
        }
        for &p in &table {
            b.refs[p as usize] += 1;
        }
        b.snaps.push(Snap {
            tokens,
            table,
            region,
        });
        Ok(true)
    }

    /// The sequence in `slot`, holding `prompt[..len]`, becomes a copy of the longest
    /// snapshot whose tokens begin `prompt` and that holds more than `len` and at most
    /// `limit` positions (a snapshot is exact at its own length only): the snapshot's
    /// states are copied into the slot's region (one submit) and its table names the
    /// snapshot's pages (the first write into the partly filled last one copies it).
    /// Returns the positions the sequence holds now (`len` when no snapshot fits). On an
    /// error the slot's states may be partly overwritten (its pages are as they were):
    /// the caller starts over.
    pub(crate) fn restore(
        &self,
        slot: usize,
        len: usize,
        prompt: &[u32],
        limit: usize,
    ) -> Result<usize> {
        if self.snapshots == 0 {
            return Ok(len);
        }
        let limit = limit.min(prompt.len()).min(self.cap);
        let mut b = self.book();
        if slot >= b.slots.len() {
            return Err(VkError::Invalid(format!("no pool slot {slot}")));
        }
        let best = b
            .snaps
            .iter()
            .enumerate()
            .filter(|(_, x)| {
                x.tokens.len() > len && x.tokens.len() <= limit && prompt.starts_with(&x.tokens)
            })
            .max_by_key(|(_, x)| x.tokens.len())
            .map(|(i, _)| i);
        let Some(i) = best else {
            return Ok(len);
        };
        // Most recently used last.
        let snap = b.snaps.remove(i);
        let copied = self.copy_states(self.slots + snap.region, slot);
        if let Err(e) = copied {
            b.snaps.push(snap);
            return Err(e);
        }
        b.cut(slot, 0);
        let n = snap.tokens.len();
        for &p in &snap.table {
            b.refs[p as usize] += 1;
        }
        {
            let s = &mut b.slots[slot];
            s.table.extend_from_slice(&snap.table);
            s.tokens.clone_from(&snap.tokens);
            s.live = n;
        }
        b.snaps.push(snap);
        self.write_table(&b, slot)?;
        Ok(n)
    }

    /// Token ids a step takes: the vocabulary's (and Gemma 4's per-layer embeddings'
    /// rows, checked before the step takes any page).
    fn token_limit(&self) -> usize {
        let m = self.m.model();
        let ple = m.extras.per_layer_inputs.as_ref();
        m.config
            .vocab_size
            .min(ple.map_or(usize::MAX, |p| p.tok_embd.rows))
    }

    /// Whether `r` is a sequence of this batch.
    pub fn owns(self: &Arc<Self>, r: &VkRunner) -> bool {
        r.lease
            .as_ref()
            .is_some_and(|l| Arc::ptr_eq(&l.batch, self))
    }

    /// Decodes one token for each sequence of `seqs` (runner, token, logits row out),
    /// in batched steps of up to [`MAX_BATCH`] sequences. Every runner must be a
    /// sequence of this batch with room for one more token; the token must be in the
    /// vocabulary. On an error, the sequences of the failed step have not advanced.
    pub fn step(self: &Arc<Self>, seqs: &mut [(&mut VkRunner, u32, &mut Vec<f32>)]) -> Result<()> {
        let mut outs: Vec<(&mut VkRunner, u32, StepOut<'_>)> = seqs
            .iter_mut()
            .map(|(r, t, o)| (&mut **r, *t, StepOut::Logits(o)))
            .collect();
        self.step_out(&mut outs)
    }

    /// [`Self::step`] for greedy sequences: each sequence's next token (its logits row's
    /// argmax, found on the device by `argmax.comp`) instead of its row.
    pub fn step_greedy(
        self: &Arc<Self>,
        seqs: &mut [(&mut VkRunner, u32, &mut Option<u32>)],
    ) -> Result<()> {
        let mut outs: Vec<(&mut VkRunner, u32, StepOut<'_>)> = seqs
            .iter_mut()
            .map(|(r, t, o)| (&mut **r, *t, StepOut::Argmax(o)))
            .collect();
        self.step_out(&mut outs)
    }

    /// [`Self::step`] with each sequence's result where its [`StepOut`] says; the
    /// step is greedy (argmax on the device) when every one of them is `Argmax`.
    fn step_out(self: &Arc<Self>, seqs: &mut [(&mut VkRunner, u32, StepOut<'_>)]) -> Result<()> {
        let greedy = seqs.iter().all(|s| matches!(s.2, StepOut::Argmax(_)));
        let vocab = self.token_limit();
        let mut cols = Vec::with_capacity(seqs.len());
        for (r, t, _) in seqs.iter() {
            let slot = match &r.lease {
                Some(l) if Arc::ptr_eq(&l.batch, self) => l.slot,
                _ => {
                    return Err(VkError::Invalid(
                        "a batched step was given a sequence of another batch".into(),
                    ))
                }
            };
            if r.len() >= r.capacity() {
                return Err(VkError::Invalid(format!(
                    "context is full: the sequence holds {} tokens",
                    r.capacity()
                )));
            }
            if *t as usize >= vocab {
                return Err(VkError::Invalid(format!(
                    "token id {t} is outside the vocabulary of {vocab}"
                )));
            }
            cols.push((slot as u32, r.len() as u32, *t));
        }
        let mut runner = self.runner.lock().unwrap_or_else(|e| e.into_inner());
        let per = runner.batch_cols().max(1);
        let t0 = std::time::Instant::now();
        for (chunk, cs) in seqs.chunks_mut(per).zip(cols.chunks(per)) {
            let items: Vec<(usize, usize, usize)> = cs
                .iter()
                .map(|&(slot, pos, _)| (slot as usize, pos as usize, pos as usize + 1))
                .collect();
            self.prepare_all(&items)?;
            runner.run_batch(cs, greedy)?;
            for (i, (r, t, out)) in chunk.iter_mut().enumerate() {
                match out {
                    StepOut::Logits(out) => runner.batch_logits(i, out)?,
                    StepOut::Argmax(id) => **id = Some(runner.batch_argmax(i)?),
                }
                let (slot, pos, _) = cs[i];
                self.note_written(slot as usize, pos as usize, &[*t]);
                r.advance();
            }
        }
        if runner.trace() {
            eprintln!(
                "batched step with logits of {} sequences: {:?}",
                seqs.len(),
                t0.elapsed()
            );
        }
        Ok(())
    }
}

/// Where a batched step leaves a sequence's result.
enum StepOut<'a> {
    /// Its logits row.
    Logits(&'a mut Vec<f32>),
    /// Its row's argmax (every sequence of the step greedy).
    Argmax(&'a mut Option<u32>),
}

/// The recurrent layers' state pools for `slots` sequences and `snaps` snapshots
/// (zeroed), and per layer the (conv, S) values per region (0 for other layers). Each
/// region starts at a multiple of [`Buffer::VIEW_ALIGN`] bytes, so a runner binds its
/// slot's as a view.
#[allow(clippy::type_complexity)]
fn state_pools(
    m: &VkModel,
    slots: usize,
    snaps: usize,
) -> Result<(Vec<Option<(RecurrentState, u64, u64)>>, Vec<(usize, usize)>)> {
    let ctx = m.context();
    let align =
        |floats: usize| (floats as u64 * 4).div_ceil(Buffer::VIEW_ALIGN) * Buffer::VIEW_ALIGN;
    let pool = |li: usize, what: &str, stride: u64| -> Result<Buffer> {
        let total = stride
            .checked_mul((slots + snaps) as u64)
            .filter(|&t| t <= ctx.max_buffer_bytes())
            .ok_or_else(|| {
                VkError::Invalid(format!(
                    "layer {li}: the {what} of {slots} sequences and {snaps} prompt \
                     snapshots ({} KiB each) are more than one buffer may hold on {} ({} \
                     MiB); use fewer slots",
                    stride >> 10,
                    ctx.info().name,
                    ctx.max_buffer_bytes() >> 20
                ))
            })?;
        ctx.create_buffer(total, MemoryKind::Device)
    };
    let mut pools = Vec::new();
    let mut strides = Vec::new();
    for (li, sz) in m.state_sizes()?.into_iter().enumerate() {
        let Some((conv, ssm)) = sz else {
            pools.push(None);
            strides.push((0, 0));
            continue;
        };
        let (cs, ss) = (align(conv), if ssm > 0 { align(ssm) } else { 0 });
        let st = RecurrentState {
            conv: pool(li, "conv states", cs)?,
            ssm: if ssm > 0 {
                Some(pool(li, "recurrent states", ss)?)
            } else {
                None
            },
        };
        strides.push(((cs / 4) as usize, (ss / 4) as usize));
        pools.push(Some((st, cs, ss)));
    }
    RecurrentState::reset_all(ctx, pools.iter().flatten().map(|(st, _, _)| st))?;
    Ok((pools, strides))
}

/// The server's stepper over a [`VkBatch`]: the items that decode one token on a
/// sequence of the batch go through [`VkBatch::step`] together (when there are two or
/// more), the others (prefill chunks, other runners) through their own runner.
pub struct VkBatchStepper {
    batch: Arc<VkBatch>,
}

impl VkBatchStepper {
    pub fn new(batch: Arc<VkBatch>) -> VkBatchStepper {
        VkBatchStepper { batch }
    }
}

impl BatchStepper for VkBatchStepper {
    fn step_batch(&mut self, items: &mut [BatchItem<'_>]) {
        let vocab = self.batch.token_limit();
        let mut batched: Vec<bool> = items
            .iter_mut()
            .map(|it| {
                it.tokens.len() == 1
                    && (it.tokens[0] as usize) < vocab
                    && it
                        .runner
                        .as_any_mut()
                        .and_then(|a| a.downcast_mut::<VkRunner>())
                        .is_some_and(|r| self.batch.owns(r) && r.len() < r.capacity())
            })
            .collect();
        if batched.iter().filter(|&&b| b).count() < 2 {
            // One sequence decodes faster alone (its own fused decode step).
            batched.fill(false);
        }
        for (it, &b) in items.iter_mut().zip(&batched) {
            if !b {
                step_one(it);
            }
        }
        // Greedy on the device when every batched sequence wants only its argmax.
        let greedy = crate::sample::device_argmax()
            && items
                .iter()
                .zip(&batched)
                .all(|(it, &b)| !b || it.argmax.is_some());
        let result = {
            let mut seqs: Vec<(&mut VkRunner, u32, StepOut<'_>)> = Vec::new();
            for (it, &b) in items.iter_mut().zip(&batched) {
                if !b {
                    continue;
                }
                let token = it.tokens[0];
                let out = match (greedy, it.argmax.as_deref_mut()) {
                    (true, Some(slot)) => StepOut::Argmax(slot),
                    _ => StepOut::Logits(&mut *it.logits),
                };
                if let Some(r) = it
                    .runner
                    .as_any_mut()
                    .and_then(|a| a.downcast_mut::<VkRunner>())
                {
                    seqs.push((r, token, out));
                }
            }
            if seqs.is_empty() {
                return;
            }
            catch_unwind(AssertUnwindSafe(|| self.batch.step_out(&mut seqs)))
        };
        for (it, &b) in items.iter_mut().zip(&batched) {
            if !b {
                continue;
            }
            it.outcome = match &result {
                Ok(Ok(())) => StepOutcome::Done,
                Ok(Err(e)) => StepOutcome::Failed(format!("batched decode failed: {e}").into()),
                Err(p) => StepOutcome::Panicked(panic_message(&**p)),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every page is free or named by tables as often as its count says, never both.
    fn check(b: &Book) {
        let mut named = vec![0u32; b.refs.len()];
        for s in &b.slots {
            assert!(s.tokens.len() <= s.table.len() * KV_PAGE);
            for &p in &s.table {
                named[p as usize] += 1;
            }
        }
        for x in &b.snaps {
            assert_eq!(x.table.len(), x.tokens.len().div_ceil(KV_PAGE));
            for &p in &x.table {
                named[p as usize] += 1;
            }
        }
        assert_eq!(named, b.refs);
        let mut free = b.free.clone();
        free.sort_unstable();
        free.dedup();
        assert_eq!(free.len(), b.free.len(), "a page freed twice");
        for &p in &b.free {
            assert_eq!(b.refs[p as usize], 0, "page {p} free and named");
        }
        let zero = b.refs.iter().filter(|&&r| r == 0).count();
        assert_eq!(zero, b.free.len(), "a page neither free nor named");
    }

    /// Cutting tables with shared pages and taking pages back keep the counts right, in
    /// the order the module describes (slots without a runner first, live pages kept).
    #[test]
    fn book_counts() {
        let pages = 12;
        let mut b = Book {
            free: Vec::new(),
            refs: vec![0; pages],
            slots: (0..3).map(|_| SlotPages::default()).collect(),
            clock: 0,
            snaps: Vec::new(),
            free_regions: Vec::new(),
        };
        // Slot 0: pages 0-4 (80 tokens, live 70, leased); slot 1 shares 0-2 and has 5-6
        // (live 100, leased); slot 2: 7-9, no runner; 10-11 free.
        let set = |b: &mut Book, s: usize, t: Vec<u32>, live: usize, leased: bool| {
            for &p in &t {
                b.refs[p as usize] += 1;
            }
            let sp = &mut b.slots[s];
            sp.tokens = vec![7; t.len() * KV_PAGE];
            sp.table = t;
            sp.live = live;
            sp.leased = leased;
        };
        set(&mut b, 0, vec![0, 1, 2, 3, 4], 70, true);
        set(&mut b, 1, vec![0, 1, 2, 5, 6], 80, true);
        set(&mut b, 2, vec![7, 8, 9], 0, false);
        b.free = vec![10, 11];
        check(&b);
        // Five free pages: slot 2's three first, then nothing of the leased slots' live
        // pages (slot 0 keeps 5 pages for 70 positions, slot 1 keeps 5 for 80).
        b.reclaim(5, &[]);
        check(&b);
        assert_eq!(b.free.len(), 5);
        assert!(b.slots[2].table.is_empty() && b.slots[2].tokens.is_empty());
        // Slot 0 ends at 20 positions: asked for 8, pages 4, 3, 2 go (but 2 is still
        // slot 1's: 7 free), and pages 0-1 stay.
        b.slots[0].live = 20;
        b.reclaim(8, &[]);
        check(&b);
        assert_eq!(b.slots[0].table, vec![0, 1]);
        assert_eq!(b.free.len(), 7);
        assert_eq!(b.refs[2], 1);
        // Skipped slots keep their pages even when the others run out.
        b.slots[1].live = 0;
        b.reclaim(pages, &[1]);
        check(&b);
        assert_eq!(b.slots[1].table.len(), 5);
        b.cut(1, 0);
        check(&b);
    }

    /// Snapshots' pages are counted as a table's: a page shared by a slot and a
    /// snapshot goes free when both let go, and taking pages back evicts snapshots
    /// (least recently used first) once no slot has pages to give.
    #[test]
    fn book_snapshots() {
        let pages = 8;
        let mut b = Book {
            free: (6..pages as u32).rev().collect(),
            refs: vec![0; pages],
            slots: (0..2).map(|_| SlotPages::default()).collect(),
            clock: 0,
            snaps: Vec::new(),
            free_regions: Vec::new(),
        };
        // Slot 0 (leased, live 40): pages 0-2; snapshot A shares them (40 tokens);
        // snapshot B (20 tokens) alone holds pages 3-4; slot 1 (no runner) holds 5.
        b.slots[0].table = vec![0, 1, 2];
        b.slots[0].tokens = vec![1; 40];
        b.slots[0].live = 40;
        b.slots[0].leased = true;
        b.slots[1].table = vec![5];
        b.slots[1].tokens = vec![2; 10];
        for p in [0, 1, 2, 0, 1, 2, 3, 4, 5] {
            b.refs[p] += 1;
        }
        b.snaps.push(Snap {
            tokens: vec![1; 40],
            table: vec![0, 1, 2],
            region: 0,
        });
        b.snaps.push(Snap {
            tokens: vec![3; 20],
            table: vec![3, 4],
            region: 1,
        });
        check(&b);
        // Three free: slot 1's page first, no snapshot touched.
        b.reclaim(3, &[]);
        check(&b);
        assert_eq!((b.free.len(), b.snaps.len()), (3, 2));
        // Four: A goes first (least recently used) but frees nothing (slot 0 holds its
        // pages), then B, whose two pages go free.
        b.reclaim(4, &[]);
        check(&b);
        assert_eq!((b.free.len(), b.snaps.len()), (5, 0));
        assert_eq!(b.free_regions, vec![0, 1]);
        // Slot 0 lets go: every page is free again.
        b.cut(0, 0);
        check(&b);
        assert_eq!(b.free.len(), pages);
    }
}
