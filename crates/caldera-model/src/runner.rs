//! The interface between the engine and a backend: one sequence on one backend.
//!
//! A backend (CPU, Vulkan) hands out runners; each runner owns one sequence's state
//! (KV cache, recurrent states) and runs tokens through the model.

/// Which logits a forward call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's row.
    Last,
    /// One row per input token (verification, scoring).
    All,
}

pub type RunError = Box<dyn std::error::Error + Send + Sync>;

/// What a backend can say about how it runs a decode step (for `bench`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunnerStats {
    /// Kernel dispatches in one recorded decode step (GPU backends, once recorded).
    pub decode_dispatches: Option<u32>,
    /// Queue submits per decode step.
    pub decode_submits: Option<u32>,
    /// Layers of the model.
    pub layers: u32,
    /// Device microseconds per decode step by op kind, largest first (GPU backends with
    /// profiling on: `CALDERA_VK_PROFILE=1`).
    pub profile: Vec<(String, f64)>,
}

pub trait Runner: Send {
    /// Tokens the sequence can hold.
    fn capacity(&self) -> usize;
    /// Tokens the sequence holds.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Forgets tokens from position `n` on; false (changing nothing) when the state
    /// cannot go back (recurrent layers).
    fn truncate(&mut self, n: usize) -> bool;
    /// Runs `tokens` after the sequence's tokens and writes logits rows to `out`
    /// (`vocab` values per row).
    fn forward(
        &mut self,
        tokens: &[u32],
        logits: Logits,
        out: &mut Vec<f32>,
    ) -> Result<(), RunError>;
    /// Runs `tokens` as [`Runner::forward`] with [`Logits::Last`] does, but returns only
    /// the index of the last row's largest logit (the first of equal maxima, NaN
    /// ignored: `caldera_engine::sampler::argmax`'s rule), found where the backend
    /// can do it without handing the row back (a GPU: 4 bytes instead of a vocabulary
    /// row). `Ok(None)`, the default, runs nothing: the caller runs `forward`.
    fn forward_argmax(&mut self, tokens: &[u32]) -> Result<Option<u32>, RunError> {
        let _ = tokens;
        Ok(None)
    }
    /// For a sequence holding `tokens[..len()]`: takes state continuing `tokens`, up to
    /// `limit` positions, from a prefix cache its backend shares between runners, instead
    /// of computing it. Returns the positions the sequence holds now; the default (no
    /// shared cache) changes nothing.
    fn reuse_prefix(&mut self, tokens: &[u32], limit: usize) -> usize {
        let _ = (tokens, limit);
        self.len()
    }
    /// Marks the sequence's state now (the end of a prompt) as worth keeping for later
    /// requests that start the same way: a backend that cannot share state by pages
    /// (recurrent layers) may snapshot it. The default does nothing.
    fn checkpoint(&mut self) {}
    /// Whether the backend keeps what its runners computed in a shared prefix cache, so an
    /// idle sequence can be emptied (its KV pages freed) without losing reuse.
    fn shares_prefixes(&self) -> bool {
        false
    }
    /// KV pages of the backend's shared pool this sequence holds; `None` where the
    /// runner has its own contiguous cache.
    fn kv_pages(&self) -> Option<usize> {
        None
    }
    /// A short description of where this runs ("cpu, 2 threads", a device name).
    fn describe(&self) -> String;
    /// Counters for `bench`; backends without any report the defaults.
    fn stats(&self) -> RunnerStats {
        RunnerStats::default()
    }
    /// The memory bandwidth of the device this runs on, in bytes per second, measured
    /// now with a large on-device copy (read + write bytes over time); `None` where the
    /// backend does not measure it.
    fn measure_bandwidth(&mut self) -> Option<f64> {
        None
    }
    /// The runner as `Any`, so that a backend's [`BatchStepper`] can find its own runners
    /// among a step's items; `None` (the default) for runners no stepper batches.
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }
}

/// One sequence's part of a step over several sequences.
pub struct BatchItem<'a> {
    pub runner: &'a mut dyn Runner,
    /// Tokens to run after the sequence's tokens: one to decode, or a prefill chunk.
    pub tokens: &'a [u32],
    /// Receives the last token's logits row.
    pub logits: &'a mut Vec<f32>,
    /// `Some` where the caller needs only the row's argmax (greedy decoding without
    /// penalties): a step that finds it on the device ([`Runner::forward_argmax`]) stores
    /// it here and may leave `logits` as it was; it stays `None` where the step handed
    /// back the row instead. The caller sets it to `Some(None)`.
    pub argmax: Option<&'a mut Option<u32>>,
    /// Set by the step.
    pub outcome: StepOutcome,
}

/// What a step did for one [`BatchItem`].
#[derive(Debug)]
pub enum StepOutcome {
    /// Not run yet.
    Pending,
    Done,
    Failed(RunError),
    /// The backend panicked; the runner's state is unknown and should be replaced.
    Panicked(String),
}

/// Runs one step of several sequences (a server's slots). The default runs each item's
/// runner on its own, one after another, and keeps a panic in one item from reaching the
/// others. A backend that can batch (one read of the weights for every sequence's token)
/// implements this for its runners.
pub trait BatchStepper: Send {
    fn step_batch(&mut self, items: &mut [BatchItem<'_>]) {
        for it in items.iter_mut() {
            step_one(it);
        }
    }
}

/// Runs one item on its own runner (what the default [`BatchStepper`] does per item),
/// catching a panic.
pub fn step_one(it: &mut BatchItem<'_>) {
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if let Some(slot) = it.argmax.as_deref_mut() {
            if let Some(id) = it.runner.forward_argmax(it.tokens)? {
                *slot = Some(id);
                return Ok(());
            }
        }
        it.runner.forward(it.tokens, Logits::Last, it.logits)
    }));
    it.outcome = match run {
        Ok(Ok(())) => StepOutcome::Done,
        Ok(Err(e)) => StepOutcome::Failed(e),
        Err(p) => StepOutcome::Panicked(panic_message(&*p)),
    };
}

/// The default [`BatchStepper`]: one runner after another.
pub struct SerialStepper;

impl BatchStepper for SerialStepper {}

/// The message of a caught panic.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}
