//! The CPU reference backend.
//!
//! An exact f32 forward pass computed straight from the quantized blocks of the mapped
//! weights (no dequantized copy of the model), multi-threaded over rows and heads. It
//! defines correctness for every other backend and is the fallback where no GPU is.

pub mod ops;
pub mod pool;

mod forward;

pub use forward::{CpuBackend, CpuError, Logits, Session};
