//! The one error type of this crate. Every message names the problem so that a user can
//! act on it (which file, which tensor or key, which offset).

use std::path::PathBuf;

pub type Result<T, E = FormatError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file: magic is {0:02x?}, expected \"GGUF\"")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (caldera reads versions 2 and 3)")]
    UnsupportedVersion(u32),
    #[error(
        "file is truncated: {what} needs {need} bytes at offset {offset}, but only {have} remain"
    )]
    Truncated {
        what: String,
        offset: u64,
        need: u64,
        have: u64,
    },
    #[error("unknown tensor type id {id} for tensor '{tensor}'")]
    UnknownTensorType { tensor: String, id: u32 },
    #[error("unknown metadata value type {id} for key '{key}'")]
    UnknownValueType { key: String, id: u32 },
    #[error("duplicate {what} '{name}'")]
    Duplicate { what: &'static str, name: String },
    /// Any other inconsistency a file can have; the message says which.
    #[error("invalid model file: {0}")]
    Invalid(String),
    /// The file is well formed but uses something caldera does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl FormatError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FormatError::Io {
            path: path.into(),
            source,
        }
    }
}
