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
}
