//! The CPU reference backend.
//!
//! An exact f32 forward pass computed straight from the quantized blocks of the mapped
//! weights (no dequantized copy of the model), multi-threaded over rows and heads. It
//! defines correctness for every other backend and is the fallback where no GPU is.
//! One file per block: `attention.rs`, `ffn.rs` (dense, MoE), `gdn.rs`, `mamba2.rs`,
//! `shortconv.rs`; `forward.rs` strings them together.

pub mod attention;
pub mod ctx;
pub mod ffn;
pub mod gdn;
pub mod mamba2;
pub mod ops;
pub mod per_layer;
pub mod pool;
pub mod shortconv;

mod forward;
pub mod paged;

pub use forward::{CpuBackend, CpuError, CpuRunner, LayerState, Logits, Session, CHUNK};
pub use paged::{KvConfig, KvPool, PoolStats};
