//! The engine's errors. Structured, so that the daemon can turn them into wire
//! error kinds without parsing strings.

use std::path::PathBuf;

/// Why a model file was refused. Always reported with the file's path
/// ([`EngineError::ModelFile`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ModelFileError {
    #[error("not a GGUF file (starts with bytes {found:02x?}, expected \"GGUF\")")]
    NotGguf { found: [u8; 4] },
    #[error("unsupported GGUF version {0} (versions 2 and 3 are supported)")]
    UnsupportedVersion(u32),
    #[error("file is truncated: {what} needs {needed} bytes but the file has {len}")]
    Truncated { what: String, needed: u64, len: u64 },
    #[error("malformed GGUF: {0}")]
    Malformed(String),
    #[error("unsupported architecture `{arch}` (supported: {supported})")]
    UnsupportedArchitecture { arch: String, supported: String },
    #[error("missing metadata key `{0}`")]
    MissingKey(String),
    #[error("metadata key `{key}` is a {found}, expected a {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    BadShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{name}` has ggml type {type_id}, which this build cannot load")]
    UnsupportedTensorType { name: String, type_id: u32 },
    #[error("bad tokenizer metadata: {0}")]
    Tokenizer(String),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error("{}: {reason}", path.display())]
    ModelFile {
        path: PathBuf,
        reason: ModelFileError,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the prompt is {tokens} tokens but the context holds {context}; shorten it or load the model with a larger context")]
    PromptTooLong { tokens: usize, context: usize },
    #[error("even with only the system messages and the last message, the prompt is {tokens} tokens but the context holds {context}; shorten the last message or load the model with a larger context")]
    LastTurnTooLong { tokens: usize, context: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("invalid generation parameter: {0}")]
    InvalidParams(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("tensor backend: {0}")]
    Candle(#[from] candle_core::Error),
}

impl EngineError {
    /// The model-file reason, when that is what this error is.
    pub fn model_file_reason(&self) -> Option<&ModelFileError> {
        match self {
            EngineError::ModelFile { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
