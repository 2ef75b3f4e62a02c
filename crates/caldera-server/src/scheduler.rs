//! The model thread: owns every slot (a [`Generator`]: one runner, its own sequence and
//! prefix cache) and advances them together.
//!
//! Continuous scheduling: each step runs every active slot once, through one
//! [`BatchStepper`] call: a decoding slot runs its one sampled token, a slot still
//! prefilling runs a chunk of its prompt (all prefilling slots together run at most
//! `prefill_chunk` prompt tokens a step, taken in turn), so running streams keep flowing
//! while a long prompt comes in. The default stepper runs the slots' runners one after
//! another; a backend with a batched decode step replaces it without touching this loop.
//!
//! Jobs wait in a bounded [`Queue`] until a slot is free and the KV pages the job can
//! need (prompt + `max_tokens`, at most a slot's context) can be reserved ([`KvBudget`]),
//! so no request runs out of KV memory halfway; the head of the queue waits for pages
//! (first come, first served). A job goes to the free slot holding the longest prefix of
//! its prompt (ties: the least recently used). Idle slots whose backend keeps a shared
//! prefix cache (CPU pages; Vulkan pool slots, whose regions lend their prefix until
//! written over) give their pages back when their request ends; other idle slots keep
//! their sequence for reuse until its pages are needed. A job whose
//! client went away (its cancel flag) leaves its slot at the start of the next step. A
//! panic in one slot's step fails that slot's request only: its runner is replaced from
//! the factory, the other slots go on.

use std::cmp::Reverse;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use caldera_engine::{FinishReason, GenParams, Generator, Piece, Sequence};
use caldera_model::{panic_message, BatchItem, BatchStepper, RunError, Runner, StepOutcome};
use caldera_tokenizer::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

/// Makes a fresh runner (one empty sequence) for a slot.
pub type RunnerFactory = Box<dyn FnMut() -> Result<Box<dyn Runner>, RunError> + Send>;

/// What the scheduler tells a request.
#[derive(Debug)]
pub enum Event {
    /// Whole UTF-8 text, in order.
    Text(String),
    /// A special token's text (only for jobs with `params.specials`).
    Special(String),
    /// Generation ended normally.
    Done {
        prompt_tokens: usize,
        completion_tokens: usize,
        finish: FinishReason,
    },
    /// Generation failed (backend error, or a caught panic).
    Error(String),
}

pub struct Job {
    pub prompt: Vec<u32>,
    pub params: GenParams,
    pub events: UnboundedSender<Event>,
    pub cancel: Arc<AtomicBool>,
    /// Set when the job first had to wait for KV pages at the head of the queue.
    pub waited_for_pages: AtomicBool,
}

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Every slot is busy and `max_queue` jobs wait.
    Full,
    /// The scheduler has stopped.
    Closed,
}

/// Jobs waiting for a slot (and KV pages). Admits a job while the waiting jobs are fewer
/// than `max_queue` plus the free slots (a job for a free slot waits only until the next
/// step, unless pages are short).
pub struct Queue {
    inner: Mutex<QueueInner>,
    ready: Condvar,
    max_queue: usize,
    slots: usize,
    /// Slots holding a job; raised under the queue lock when a job is taken.
    active: AtomicUsize,
}

struct QueueInner {
    jobs: VecDeque<Job>,
    closed: bool,
}

enum Popped {
    Job(Job),
    Empty,
    /// The next job waits for KV pages.
    Wait,
    Closed,
}

impl Queue {
    pub fn new(slots: usize, max_queue: usize) -> Queue {
        Queue {
            inner: Mutex::new(QueueInner {
                jobs: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
            max_queue,
            slots,
            active: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, job: Job) -> Result<(), Refused> {
        let mut q = self.lock();
        if q.closed {
            return Err(Refused::Closed);
        }
        let free = self
            .slots
            .saturating_sub(self.active.load(Ordering::SeqCst));
        if q.jobs.len() >= self.max_queue + free {
            return Err(Refused::Full);
        }
        q.jobs.push_back(job);
        drop(q);
        self.ready.notify_one();
        Ok(())
    }

    /// Jobs waiting.
    pub fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slots holding a job.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    pub fn capacity(&self) -> usize {
        self.max_queue
    }

    /// No more jobs are admitted; the scheduler ends once the queue and slots are empty.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Takes the next job (waiting for one when `block`) when `fits` says its pages can
    /// be reserved (a cancelled job is taken anyway, to be dropped), counting it as active.
    /// `waits` counts the jobs that had to wait for pages.
    fn pop(&self, block: bool, fits: impl Fn(&Job) -> bool, waits: &AtomicU64) -> Popped {
        let mut q = self.lock();
        loop {
            if let Some(j) = q.jobs.front() {
                if !j.cancel.load(Ordering::Relaxed) && !fits(j) {
                    if !j.waited_for_pages.swap(true, Ordering::Relaxed) {
                        waits.fetch_add(1, Ordering::Relaxed);
                    }
                    return Popped::Wait;
                }
            }
            if let Some(j) = q.jobs.pop_front() {
                self.active.fetch_add(1, Ordering::SeqCst);
                return Popped::Job(j);
            }
            if q.closed {
                return Popped::Closed;
            }
            if !block {
                return Popped::Empty;
            }
            q = self
                .ready
                .wait_timeout(q, Duration::from_secs(1))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn release(&self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a slot is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    Idle,
    Prefill,
    Decode,
}

impl SlotState {
    pub fn as_str(self) -> &'static str {
        match self {
            SlotState::Idle => "idle",
            SlotState::Prefill => "prefill",
            SlotState::Decode => "decode",
        }
    }
}

/// A slot as `/slots` and `/metrics` show it (refreshed after every step).
#[derive(Clone, Debug)]
pub struct SlotInfo {
    pub state: SlotState,
    /// Tokens the slot's sequence holds (a finished request's tokens stay for reuse).
    pub context_used: usize,
    pub context_capacity: usize,
    /// Of the current (or last) request.
    pub prompt_tokens: usize,
    pub reused_tokens: usize,
    pub generated_tokens: usize,
    /// Decode speed of the current request; 0 when idle.
    pub tokens_per_second: f64,
    /// Requests this slot has finished.
    pub requests: u64,
    /// KV pages the slot's sequence holds (the backend's count, else its length in
    /// pages).
    pub kv_pages: usize,
    /// KV pages reserved for the slot's request (0 when idle).
    pub kv_reserved: usize,
}

/// Counters the scheduler keeps for `/metrics`.
#[derive(Default)]
pub struct Counters {
    /// Requests that started with part of their prompt already computed (in the slot or
    /// the backend's shared prefix cache).
    pub prefix_hits: AtomicU64,
    /// Requests that computed their whole prompt.
    pub prefix_misses: AtomicU64,
    /// Requests that waited at the head of the queue for KV pages.
    pub page_waits: AtomicU64,
    pub reused_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub finished: AtomicU64,
    pub cancelled: AtomicU64,
    pub failed: AtomicU64,
    /// Slots whose runner was replaced after a panic.
    pub restarts: AtomicU64,
}

/// Live counts of a backend's KV pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolCounts {
    /// Pages held by at least one sequence.
    pub in_use: usize,
    /// Pages in the backend's prefix cache (some may be in use too).
    pub cached: usize,
}

/// Reads a backend pool's counts (without waiting for a running step).
pub type PoolProbe = Box<dyn Fn() -> PoolCounts + Send + Sync>;

/// The KV pages requests are admitted by: the backend's shared pool (CPU), or, where each
/// runner has its own cache, a budget of the same size as the slots' caches.
pub struct KvBudget {
    pub page_tokens: usize,
    pub total: usize,
    /// Pages reserved for the requests running now.
    pub reserved: AtomicUsize,
    /// The real pool's counts; `None` when the pages are a budget only.
    pub probe: Option<PoolProbe>,
}

impl KvBudget {
    /// Pages of `tokens` positions.
    pub fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_tokens.max(1))
    }

    /// Pages held by no running sequence: the pool's (free and cached ones nobody holds),
    /// else the budget less what the slots hold.
    pub fn free(&self, slots: &[SlotInfo]) -> usize {
        match &self.probe {
            Some(p) => self.total.saturating_sub(p().in_use),
            None => self
                .total
                .saturating_sub(slots.iter().map(|s| s.kv_pages).sum()),
        }
    }

    pub fn cached(&self) -> usize {
        self.probe.as_ref().map_or(0, |p| p().cached)
    }
}

/// Shared between the scheduler and the HTTP side.
pub struct Shared {
    pub queue: Queue,
    pub slots: Mutex<Vec<SlotInfo>>,
    pub counters: Counters,
    pub kv: KvBudget,
    /// False once the scheduler thread has ended.
    pub alive: AtomicBool,
}

impl Shared {
    pub fn new(capacities: &[usize], max_queue: usize, kv: KvBudget) -> Shared {
        let slots = capacities
            .iter()
            .map(|&c| SlotInfo {
                state: SlotState::Idle,
                context_used: 0,
                context_capacity: c,
                prompt_tokens: 0,
                reused_tokens: 0,
                generated_tokens: 0,
                tokens_per_second: 0.0,
                requests: 0,
                kv_pages: 0,
                kv_reserved: 0,
            })
            .collect();
        Shared {
            queue: Queue::new(capacities.len(), max_queue),
            slots: Mutex::new(slots),
            counters: Counters::default(),
            kv,
            alive: AtomicBool::new(true),
        }
    }

    pub fn slot_infos(&self) -> Vec<SlotInfo> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

struct Active<'t> {
    job: Job,
    seq: Sequence<'t>,
}

struct Slot<'t> {
    /// `None` after a panic until a fresh runner is made.
    gen: Option<Generator>,
    active: Option<Active<'t>>,
    requests: u64,
    /// Prompt, reused and generated tokens of the last finished request.
    last: (usize, usize, usize),
    /// KV pages reserved for the running request.
    reserved: usize,
    /// When the slot last ended a request (scheduler steps + 1; 0: never), for choosing
    /// which idle sequence gives its pages back first and which free slot takes a job.
    used: u64,
}

impl Slot<'_> {
    /// KV pages the sequence holds.
    fn held(&self, kv: &KvBudget) -> usize {
        self.gen.as_ref().map_or(0, |g| {
            g.kv_pages()
                .unwrap_or_else(|| kv.pages_for(g.context_used()))
        })
    }

    /// Ends the running request: its reservation goes back, and a sequence whose
    /// backend keeps a shared prefix cache gives its pages back too.
    fn finish(&mut self, shared: &Shared, tick: u64) {
        self.active = None;
        shared
            .kv
            .reserved
            .fetch_sub(self.reserved, Ordering::SeqCst);
        self.reserved = 0;
        self.used = tick.saturating_add(1);
        if let Some(g) = self.gen.as_mut() {
            if g.shares_prefixes() && !g.reset() {
                self.gen = None;
            }
        }
        shared.queue.release();
    }
}

/// Pages a job can need on a slot of `cap` tokens.
fn job_pages(kv: &KvBudget, job: &Job, cap: usize) -> usize {
    let tokens = job
        .prompt
        .len()
        .saturating_add(job.params.max_tokens)
        .min(cap);
    kv.pages_for(tokens).max(1)
}

/// Scheduler settings.
pub struct Settings {
    /// Most prompt tokens run in one step, over every prefilling slot.
    pub prefill_chunk: usize,
}

/// Runs until the queue is closed and drained. `runners` are the slots' first runners;
/// `factory` replaces one after a panic.
pub fn run(
    tok: Arc<Tokenizer>,
    mut factory: RunnerFactory,
    runners: Vec<Box<dyn Runner>>,
    mut stepper: Box<dyn BatchStepper>,
    shared: Arc<Shared>,
    settings: Settings,
) {
    struct Alive(Arc<Shared>);
    impl Drop for Alive {
        fn drop(&mut self) {
            self.0.alive.store(false, Ordering::SeqCst);
            // Whatever still waits gets an answer instead of hanging.
            let mut q = self.0.queue.lock();
            q.closed = true;
            for j in q.jobs.drain(..) {
                let _ = j
                    .events
                    .send(Event::Error("the model worker has stopped".into()));
            }
        }
    }
    let _alive = Alive(shared.clone());
    let tok: &Tokenizer = &tok;
    let mut slots: Vec<Slot> = runners
        .into_iter()
        .map(|r| Slot {
            gen: Some(Generator::new(r)),
            active: None,
            requests: 0,
            last: (0, 0, 0),
            reserved: 0,
            used: 0,
        })
        .collect();
    let cap = slots
        .iter()
        .filter_map(|s| s.gen.as_ref().map(|g| g.context_size()))
        .min()
        .unwrap_or(0);
    let chunk = settings.prefill_chunk.max(1);
    let mut turn = 0usize;
    loop {
        // Fill free slots from the queue; wait when nothing runs.
        let mut closed = false;
        while slots.iter().any(|s| s.active.is_none()) {
            let busy = slots.iter().any(|s| s.active.is_some());
            let kv = &shared.kv;
            let reserved = kv.reserved.load(Ordering::SeqCst);
            // Idle sequences give their pages back when needed, so only reservations count.
            let fits = |j: &Job| reserved + job_pages(kv, j, cap) <= kv.total;
            match shared.queue.pop(!busy, fits, &shared.counters.page_waits) {
                Popped::Job(job) => admit(&mut slots, job, tok, &mut factory, &shared, cap),
                Popped::Empty | Popped::Wait => {
                    if busy {
                        break;
                    }
                    // Nothing runs, so nothing is reserved (a job larger than the pool is
                    // refused before it is queued); never wait on a stale count.
                    kv.reserved.store(0, Ordering::SeqCst);
                }
                Popped::Closed => {
                    closed = true;
                    break;
                }
            }
        }
        // Clients that went away leave now.
        for s in slots.iter_mut() {
            if s.active
                .as_ref()
                .is_some_and(|a| a.job.cancel.load(Ordering::Relaxed))
            {
                if let Some(a) = s.active.as_ref() {
                    let q = &a.seq;
                    s.last = (q.prompt_tokens(), q.reused_tokens(), q.generated_tokens());
                }
                s.finish(&shared, turn as u64);
                shared.counters.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
        if slots.iter().all(|s| s.active.is_none()) {
            publish(&slots, &shared);
            if closed {
                return;
            }
            continue;
        }
        step(&mut slots, &mut *stepper, chunk, turn, &shared);
        turn = turn.wrapping_add(1);
        publish(&slots, &shared);
    }
}

/// Puts `job` on the free slot holding the longest prefix of its prompt, reserving the
/// KV pages it can need (idle sequences give theirs back, least recently used first, when
/// the pool would not hold them and the reservations).
#[allow(clippy::too_many_arguments)]
fn admit<'t>(
    slots: &mut [Slot<'t>],
    job: Job,
    tok: &'t Tokenizer,
    factory: &mut RunnerFactory,
    shared: &Shared,
    cap: usize,
) {
    if job.cancel.load(Ordering::Relaxed) {
        shared.queue.release();
        shared.counters.cancelled.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let Some(i) = slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.active.is_none())
        .max_by_key(|(i, s)| {
            let common = s.gen.as_ref().map_or(0, |g| g.common_prefix(&job.prompt));
            // Ties go to the least recently used slot, then the lowest index: on Vulkan an
            // emptied slot's region still lends its prefix until a request writes over
            // it, so the most recent ones are kept longest.
            (common, Reverse(s.used), Reverse(*i))
        })
        .map(|(i, _)| i)
    else {
        // Cannot happen: admit is called only with a free slot.
        let _ = job.events.send(Event::Error("no free slot".into()));
        shared.queue.release();
        return;
    };
    let kv = &shared.kv;
    let need = job_pages(kv, &job, cap);
    let reserved = kv.reserved.fetch_add(need, Ordering::SeqCst) + need;
    loop {
        let idle_held: usize = slots
            .iter()
            .enumerate()
            .filter(|(j, s)| *j != i && s.active.is_none())
            .map(|(_, s)| s.held(kv))
            .sum();
        if reserved + idle_held <= kv.total {
            break;
        }
        let Some(victim) = slots
            .iter()
            .enumerate()
            .filter(|(j, s)| *j != i && s.active.is_none() && s.held(kv) > 0)
            .min_by_key(|(_, s)| s.used)
            .map(|(j, _)| j)
        else {
            break;
        };
        let v = &mut slots[victim];
        if !v.gen.as_mut().is_some_and(|g| g.reset()) {
            v.gen = None;
        }
    }
    let slot = &mut slots[i];
    let fail = |job: &Job, msg: String| {
        kv.reserved.fetch_sub(need, Ordering::SeqCst);
        let _ = job.events.send(Event::Error(msg));
        shared.queue.release();
        shared.counters.failed.fetch_add(1, Ordering::Relaxed);
    };
    if slot.gen.is_none() {
        match catch_unwind(AssertUnwindSafe(&mut *factory)) {
            Ok(Ok(r)) => slot.gen = Some(Generator::new(r)),
            Ok(Err(e)) => return fail(&job, format!("cannot restart the model: {e}")),
            Err(p) => {
                return fail(
                    &job,
                    format!("cannot restart the model: {}", panic_message(&*p)),
                )
            }
        }
    }
    let Some(gen) = slot.gen.as_mut() else {
        return fail(&job, "the slot has no runner".into());
    };
    let started = catch_unwind(AssertUnwindSafe(|| {
        gen.start(tok, job.prompt.clone(), job.params.clone())
    }));
    match started {
        Ok(Ok(seq)) => {
            let c = &shared.counters;
            if seq.reused_tokens() > 0 {
                c.prefix_hits.fetch_add(1, Ordering::Relaxed);
                c.reused_tokens
                    .fetch_add(seq.reused_tokens() as u64, Ordering::Relaxed);
            } else {
                c.prefix_misses.fetch_add(1, Ordering::Relaxed);
            }
            slot.reserved = need;
            c.prompt_tokens
                .fetch_add(seq.prompt_tokens() as u64, Ordering::Relaxed);
            slot.active = Some(Active { job, seq });
        }
        Ok(Err(e)) => {
            gen.reset();
            fail(&job, format!("generation failed: {e}"))
        }
        Err(p) => {
            slot.gen = None;
            fail(
                &job,
                format!("internal error during generation: {}", panic_message(&*p)),
            )
        }
    }
}

/// One step of every active slot.
fn step(
    slots: &mut [Slot<'_>],
    stepper: &mut dyn BatchStepper,
    chunk: usize,
    turn: usize,
    shared: &Shared,
) {
    let n = slots.len();
    // The prefill budget goes to prefilling slots in turn, starting at a rotating slot.
    let mut budget = vec![0usize; n];
    let mut left = chunk;
    for k in 0..n {
        let i = (turn + k) % n;
        if let Some(a) = &slots[i].active {
            if a.seq.prefilling() {
                let take = a.seq.prefill_left().min(left);
                budget[i] = take;
                left -= take;
            }
        }
    }
    let mut ran = vec![None::<usize>; n];
    let mut outcomes: Vec<(usize, StepOutcome)> = Vec::with_capacity(n);
    {
        let mut items: Vec<BatchItem> = Vec::with_capacity(n);
        let mut owners = Vec::with_capacity(n);
        for (i, s) in slots.iter_mut().enumerate() {
            let (Some(gen), Some(a)) = (s.gen.as_mut(), s.active.as_ref()) else {
                continue;
            };
            if let Some(item) = gen.batch_item(&a.seq, budget[i]) {
                ran[i] = Some(item.tokens.len());
                items.push(item);
                owners.push(i);
            }
        }
        if !items.is_empty() {
            stepper.step_batch(&mut items);
        }
        for (item, i) in items.iter_mut().zip(owners) {
            outcomes.push((
                i,
                std::mem::replace(&mut item.outcome, StepOutcome::Pending),
            ));
        }
    }
    let c = &shared.counters;
    for (i, outcome) in outcomes {
        let slot = &mut slots[i];
        let Some(ran) = ran[i] else { continue };
        let error = match outcome {
            StepOutcome::Done => None,
            StepOutcome::Failed(e) => {
                if let Some(g) = slot.gen.as_mut() {
                    if !g.reset() {
                        slot.gen = None;
                    }
                }
                Some(format!("generation failed: {e}"))
            }
            StepOutcome::Panicked(m) => {
                slot.gen = None;
                c.restarts.fetch_add(1, Ordering::Relaxed);
                Some(format!("internal error during generation: {m}"))
            }
            StepOutcome::Pending => Some("the step did not run".into()),
        };
        let tick = turn as u64;
        let (Some(gen), Some(active)) = (slot.gen.as_mut(), slot.active.as_mut()) else {
            if let (Some(e), Some(a)) = (error, slot.active.as_ref()) {
                let _ = a.job.events.send(Event::Error(e));
                slot.finish(shared, tick);
                c.failed.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        };
        if let Some(e) = error {
            let _ = active.job.events.send(Event::Error(e));
            slot.finish(shared, tick);
            c.failed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let Active { job, seq } = active;
        let done = catch_unwind(AssertUnwindSafe(|| {
            gen.advance(seq, ran, |p| {
                let ev = match p {
                    Piece::Text(t) => Event::Text(t.to_owned()),
                    Piece::Special(t) => Event::Special(t.to_owned()),
                };
                if job.events.send(ev).is_err() {
                    job.cancel.store(true, Ordering::Relaxed);
                }
            })
        }));
        match done {
            Ok(None) => {}
            Ok(Some(stats)) => {
                let _ = job.events.send(Event::Done {
                    prompt_tokens: stats.prompt_tokens,
                    completion_tokens: stats.generated_tokens,
                    finish: stats.finish,
                });
                c.generated_tokens
                    .fetch_add(stats.generated_tokens as u64, Ordering::Relaxed);
                c.finished.fetch_add(1, Ordering::Relaxed);
                slot.requests += 1;
                slot.last = (
                    stats.prompt_tokens,
                    stats.reused_tokens,
                    stats.generated_tokens,
                );
                slot.finish(shared, tick);
            }
            Err(p) => {
                let _ = job.events.send(Event::Error(format!(
                    "internal error during generation: {}",
                    panic_message(&*p)
                )));
                slot.gen = None;
                slot.finish(shared, tick);
                c.restarts.fetch_add(1, Ordering::Relaxed);
                c.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Refreshes what `/slots` shows.
fn publish(slots: &[Slot<'_>], shared: &Shared) {
    let mut info = shared.slots.lock().unwrap_or_else(|e| e.into_inner());
    for (s, inf) in slots.iter().zip(info.iter_mut()) {
        if let Some(g) = &s.gen {
            inf.context_used = g.context_used();
            inf.context_capacity = g.context_size();
        } else {
            inf.context_used = 0;
        }
        inf.requests = s.requests;
        inf.kv_pages = s.held(&shared.kv);
        inf.kv_reserved = s.reserved;
        match &s.active {
            Some(a) => {
                inf.state = if a.seq.prefilling() {
                    SlotState::Prefill
                } else {
                    SlotState::Decode
                };
                inf.prompt_tokens = a.seq.prompt_tokens();
                inf.reused_tokens = a.seq.reused_tokens();
                inf.generated_tokens = a.seq.generated_tokens();
                inf.tokens_per_second = a.seq.decode_tps();
            }
            None => {
                inf.state = SlotState::Idle;
                (inf.prompt_tokens, inf.reused_tokens, inf.generated_tokens) = s.last;
                inf.tokens_per_second = 0.0;
            }
        }
    }
}
