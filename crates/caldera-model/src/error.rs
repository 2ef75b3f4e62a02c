use caldera_format::FormatError;

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("unsupported architecture '{0}' (caldera runs: {1})")]
    UnsupportedArch(String, String),
    #[error("missing metadata key '{0}'")]
    MissingKey(String),
    #[error("metadata key '{key}': {msg}")]
    BadKey { key: String, msg: String },
    #[error("missing tensor '{0}'")]
    MissingTensor(String),
    #[error("tensor '{name}': {msg}")]
    BadTensor { name: String, msg: String },
    #[error("{0}")]
    Invalid(String),
}
