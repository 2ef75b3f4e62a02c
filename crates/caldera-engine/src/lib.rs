//! The engine: sampling and the generation loop over a backend.

pub mod generate;
pub mod sampler;

pub use generate::{FinishReason, GenParams, GenStats, Generator, Piece, Sequence};
pub use sampler::{Sampler, SamplerConfig, StopMatcher};
