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
}
