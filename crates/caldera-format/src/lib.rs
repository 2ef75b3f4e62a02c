//! Model files: GGUF (read and write), Hugging Face safetensors folders, and the GGML
//! block quantization formats (dequantize, quantize, and dot products straight from the
//! quantized blocks).
//!
//! Everything here treats its input as hostile: every size a header claims is checked
//! against the bytes actually present before anything is allocated or read.

pub mod error;
pub mod gguf;
pub mod hf;
pub mod quant;
pub mod storage;
pub mod types;

pub use error::{FormatError, Result};
pub use storage::{Storage, TensorBytes};
pub use types::GgmlType;
