//! Text to token ids and back, and chat templates.

pub mod template;
pub mod tokenizer;

pub use template::{ChatTemplate, TemplateError};
pub use tokenizer::{gguf_metadata_from_hf, StreamDecoder, Tokenizer, TokenizerError};
