//! Batched decode: one step decodes one token for each of up to [`MAX_BATCH`] sequences,
//! reading each weight once for all of them.
//!
//! A [`VkBatch`] owns the KV caches of `slots` sequences as one pool per attention layer
//! (slot `s` holds bytes `s * stride .. (s + 1) * stride`, `stride` a multiple of
//! [`Buffer::VIEW_ALIGN`] and of a q8_0 cache's 36-byte block:
//! [`KvType::slot_stride`](crate::KvType::slot_stride)) and a batched runner whose steps
//! (recorded once per bucket 1, 2, 4, 8, 16 columns and replayed) bind the whole pools.
//! [`VkBatch::runner`] hands out sequences ([`VkRunner`]s) whose caches are views of a
//! free slot's region: they prefill and decode alone with their own recordings as any
//! runner does, and [`VkBatch::step`] decodes several of them together. The step values
//! are the live column count, then per column its slot and position; a bucket's padding
//! columns do nothing (the mat-vecs stop at the live count, the attention returns), so
//! they never write a live slot's cache. The weights go through the batched int8 mat-vec
//! (`quant_rows` + `mvqm`, [`Mvqn`](crate::ops::Mvqn)) where their type has one, else the
//! tiled matmul or the batched f32 mat-vec (`CALDERA_VK_BATCH_MM`, see
//! [`BatchMm`](crate::model::BatchMm)); attention through `attn_batch` (per column: q/k
//! norm, RoPE, KV write and split attention over its own slot; it also quantizes the
//! output for the o-projection; `attn_dec_batch` with `CALDERA_VK_ATTN_DEC=1`, whose
//! o-projection then quantizes its own input).
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
//! slots (`VkRunner::reuse_prefix` takes nothing on such models, and their runners do
//! not share prefixes): a slot's region holds only its own sequence's latest state.
//! gpt-oss's attention batches as well (`attn_batch` with its sinks; the q|k|v and o
//! biases as row ops over the columns). Models the batched step does not cover
//! ([`VkModel::batch_unsupported`]: Gemma 4's per-layer inputs, v norm, shared KV and
//! heads over 256) are refused by [`VkBatch::new`].
//!
//! **Prefix reuse across slots.** The batch keeps, per pool slot, the tokens whose K
//! and V its region holds (position i: token i). What a runner computed stays valid
//! after it is truncated, emptied or dropped, until a step writes over it: a step
//! first cuts its slot's list at the position it writes from, and extends it with its
//! tokens once it ran. A runner's `reuse_prefix` (`VkBatch::reuse`) takes the
//! longest prefix of a prompt that any slot's region holds: its own (nothing to copy),
//! else another's, whose positions it copies on the device (`vkCmdCopyBuffer`, every
//! attention layer's K and V, in the cache's own type). Every cache holds all `cap`
//! positions (a sliding window is a mask in the kernels, not a ring), so a copy at the
//! same positions is exact for windowed layers too.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use caldera_model::{panic_message, step_one, BatchItem, BatchStepper, Runner, StepOutcome};

use crate::error::{Result, VkError};
use crate::memory::{Buffer, MemoryKind};
use crate::model::{BatchMm, KvSource, VkModel, VkRunner};
use crate::recurrent::RecurrentState;

/// Most sequences one batched step decodes (the largest bucket).
pub const MAX_BATCH: usize = 16;

/// Fewest positions `VkBatch::reuse` copies from another slot: a shorter shared
/// prefix (a chat template's first tokens) is cheaper to recompute in the prefill step
/// that runs anyway than a submit of its own.
pub const MIN_COPY: usize = 16;

/// A pool of KV caches for `slots` sequences of `cap` tokens, and the batched runner
/// over it.
pub struct VkBatch {
    m: Arc<VkModel>,
    cap: usize,
    slots: usize,
    /// Per layer, the K and V pools and bytes per slot (`None` without attention).
    pool: Vec<Option<(Buffer, Buffer, u64)>>,
    /// Per recurrent layer, its state pools (conv state, S) and their bytes per slot
    /// (`None` for other layers; S's 0 for the short conv, which has none).
    states: Vec<Option<(RecurrentState, u64, u64)>>,
    /// Whether each slot is leased to a runner.
    used: Mutex<Vec<bool>>,
    /// Per slot, the tokens whose K and V its region holds at positions 0.. (see the
    /// module's notes: kept past truncation and the runner's drop, cut before a step
    /// writes). Held across a copy out of a region, so no step writes it meanwhile.
    held: Mutex<Vec<Vec<u32>>>,
    runner: Mutex<VkRunner>,
}

/// A runner's hold on a pool slot; frees it when dropped with the runner.
pub(crate) struct SlotLease {
    pub(crate) batch: Arc<VkBatch>,
    pub(crate) slot: usize,
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        let mut used = self.batch.used.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(u) = used.get_mut(self.slot) {
            *u = false;
        }
    }
}

impl VkBatch {
    /// Pools for `slots` sequences of `cap` tokens each on `m`'s device; the weights'
    /// kernels as `CALDERA_VK_BATCH_MM` says.
    pub fn new(m: Arc<VkModel>, slots: usize, cap: usize) -> Result<Arc<VkBatch>> {
        Self::with_mm(m, slots, cap, BatchMm::from_env())
    }

    /// [`VkBatch::new`] with the weights' kernels chosen by `mm`.
    pub fn with_mm(m: Arc<VkModel>, slots: usize, cap: usize, mm: BatchMm) -> Result<Arc<VkBatch>> {
        if let Some(why) = m.batch_unsupported() {
            return Err(VkError::Invalid(format!(
                "the Vulkan backend has no batched decode for this model yet: {why}"
            )));
        }
        let ctx = m.context();
        let (slots, cap) = (slots.max(1), cap.max(1));
        let kv_type = ctx.tuning().kv;
        let mut pool = Vec::new();
        let mut slot_elems = Vec::new();
        let mut views_of = Vec::new();
        for (li, w) in m.kv_widths().into_iter().enumerate() {
            let Some(kvd) = w else {
                pool.push(None);
                slot_elems.push(0);
                views_of.push(None);
                continue;
            };
            let values = (cap as u64)
                .checked_mul(kvd as u64)
                .ok_or_else(|| VkError::Invalid("KV cache size overflows".into()))?;
            let stride = kv_type.slot_stride(values);
            let total = stride
                .checked_mul(slots as u64)
                .filter(|&t| t <= ctx.max_buffer_bytes())
                .ok_or_else(|| {
                    VkError::Invalid(format!(
                        "layer {li}: the KV caches of {slots} sequences of {cap} tokens \
                         ({} MiB each) are more than one buffer may hold on {} ({} MiB); \
                         use fewer slots or a smaller context (--ctx)",
                        stride >> 20,
                        ctx.info().name,
                        ctx.max_buffer_bytes() >> 20
                    ))
                })?;
            let k = ctx.create_buffer(total, MemoryKind::Device)?;
            let v = ctx.create_buffer(total, MemoryKind::Device)?;
            let per = kv_type.values_in(stride);
            slot_elems.push(u32::try_from(per).map_err(|_| {
                VkError::Invalid(format!("layer {li}: a KV cache slot of {per} values"))
            })?);
            views_of.push(Some((k.clone(), v.clone())));
            pool.push(Some((k, v, stride)));
        }
        let (states, state_strides) = state_pools(&m, slots)?;
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
                slot_elems,
                mm,
            },
        )?;
        Ok(Arc::new(VkBatch {
            m,
            cap,
            slots,
            pool,
            states,
            used: Mutex::new(vec![false; slots]),
            held: Mutex::new(vec![Vec::new(); slots]),
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

    /// A new (empty) sequence in a free slot of the pool; an error when every slot is
    /// held by a live runner.
    pub fn runner(self: &Arc<Self>) -> Result<VkRunner> {
        let slot = {
            let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
            let Some(s) = used.iter().position(|u| !u) else {
                return Err(VkError::Invalid(format!(
                    "all {} sequences of the batch are in use",
                    self.slots
                )));
            };
            used[s] = true;
            s
        };
        // Frees the slot again if anything below fails.
        let lease = SlotLease {
            batch: self.clone(),
            slot,
        };
        let mut views = Vec::with_capacity(self.pool.len());
        for p in &self.pool {
            views.push(match p {
                Some((k, v, stride)) => {
                    let at = slot as u64 * stride;
                    Some((k.view(at, *stride)?, v.view(at, *stride)?))
                }
                None => None,
            });
        }
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
        let src = KvSource::Views { kv: views, states };
        let mut r = VkRunner::build(self.m.clone(), self.cap, src)?;
        r.lease = Some(lease);
        Ok(r)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u32>>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Before a step writes `slot`'s region from position `from` on: its list ends there.
    pub(crate) fn note_write(&self, slot: usize, from: usize) {
        if let Some(h) = self.held().get_mut(slot) {
            h.truncate(from);
        }
    }

    /// After a step wrote `tokens` into `slot`'s region from position `from` on.
    pub(crate) fn note_written(&self, slot: usize, from: usize, tokens: &[u32]) {
        if let Some(h) = self.held().get_mut(slot) {
            // Shorter only if something was not noted: then positions from.. stay unknown.
            if h.len() >= from {
                h.truncate(from);
                h.extend_from_slice(tokens);
            }
        }
    }

    /// The sequence in `slot`, holding `tokens[..len]`, takes the longest prefix of
    /// `tokens[..limit]` that a slot's region holds: its own region's (positions past
    /// `len` that a step has not overwritten yet: nothing to copy), or another slot's,
    /// idle, busy or without a runner, when that is at least [`MIN_COPY`] positions
    /// longer (copied on the device into this slot's region, every attention layer's K
    /// and V). Returns the positions the sequence holds now (`len` when nothing better
    /// is held, or when `slot`'s region does not hold `tokens[..len]`).
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
        // Held through the copy: a step of the source slot's runner cuts its list first,
        // so it waits until the copy has run (every submit waits for completion).
        let mut held = self.held();
        let Some(own) = held.get(slot).map(|h| common(h)) else {
            return Err(VkError::Invalid(format!("no pool slot {slot}")));
        };
        if own < len.min(limit) {
            // Not the state the caller describes: leave it alone.
            return Ok(len);
        }
        let best = held
            .iter()
            .enumerate()
            .filter(|&(s, _)| s != slot)
            .map(|(s, h)| (common(h), usize::MAX - s))
            .max()
            .map(|(n, s)| (n, usize::MAX - s));
        let Some((n, from)) = best.filter(|&(n, _)| n >= own + MIN_COPY) else {
            return Ok(own.max(len));
        };
        held[slot].truncate(own);
        let kv = self.m.context().tuning().kv;
        let mut copies = Vec::new();
        for (p, w) in self.pool.iter().zip(self.m.kv_widths()) {
            let (Some((k, v, stride)), Some(kvd)) = (p, w) else {
                continue;
            };
            let (at, size) = kv.span((own * kvd) as u64, (n * kvd) as u64);
            let (src, dst) = (from as u64 * stride + at, slot as u64 * stride + at);
            copies.push((k, src, dst, size));
            copies.push((v, src, dst, size));
        }
        self.m.context().copy_within(&copies)?;
        held[slot].extend_from_slice(&want[own..n]);
        Ok(n)
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
        let vocab = self.m.model().config.vocab_size;
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
            for &(slot, pos, _) in cs {
                self.note_write(slot as usize, pos as usize);
            }
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

/// The recurrent layers' state pools for `slots` sequences (zeroed), and per layer the
/// (conv, S) values per slot (0 for other layers). Each slot's region starts at a
/// multiple of [`Buffer::VIEW_ALIGN`] bytes, so a runner binds it as a view.
#[allow(clippy::type_complexity)]
fn state_pools(
    m: &VkModel,
    slots: usize,
) -> Result<(Vec<Option<(RecurrentState, u64, u64)>>, Vec<(usize, usize)>)> {
    let ctx = m.context();
    let align =
        |floats: usize| (floats as u64 * 4).div_ceil(Buffer::VIEW_ALIGN) * Buffer::VIEW_ALIGN;
    let pool = |li: usize, what: &str, stride: u64| -> Result<Buffer> {
        let total = stride
            .checked_mul(slots as u64)
            .filter(|&t| t <= ctx.max_buffer_bytes())
            .ok_or_else(|| {
                VkError::Invalid(format!(
                    "layer {li}: the {what} of {slots} sequences ({} KiB each) are more \
                     than one buffer may hold on {} ({} MiB); use fewer slots",
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
        let vocab = self.batch.m.model().config.vocab_size;
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
