//! One module per architecture, sharing the pieces in [`common`].
//!
//! [`Model`] is the closed set of architectures we run; the engine talks to it
//! only through `forward`, the KV-cache controls and a few sizes.

pub mod common;
pub mod gemma3;

use candle_core::{Device, Tensor};

pub use common::LogitsFor;

use super::error::{EngineError, ModelFileError};
use super::gguf::GgufFile;

/// Architectures this build can load, by `general.architecture`.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["gemma3"];

#[derive(Debug, Clone)]
pub enum Model {
    Gemma3(gemma3::Model),
}

impl Model {
    /// Load the model in `gguf` onto `device` for a context of `context` positions.
    pub fn load(gguf: &GgufFile, context: usize, device: &Device) -> Result<Self, EngineError> {
        match gguf.architecture()? {
            "gemma3" => Ok(Self::Gemma3(gemma3::Model::load(gguf, context, device)?)),
            other => Err(gguf.error(ModelFileError::UnsupportedArchitecture {
                arch: other.to_owned(),
                supported: SUPPORTED_ARCHITECTURES.join(", "),
            })),
        }
    }

    /// Run `tokens` after the cached positions; logits (rows, vocab) in F32.
    pub fn forward(&mut self, tokens: &[u32], which: LogitsFor) -> Result<Tensor, EngineError> {
        match self {
            Self::Gemma3(m) => m.forward(tokens, which),
        }
    }

    pub fn kv_len(&self) -> usize {
        match self {
            Self::Gemma3(m) => m.kv_len(),
        }
    }

    pub fn truncate_kv(&mut self, len: usize) {
        match self {
            Self::Gemma3(m) => m.truncate_kv(len),
        }
    }

    pub fn clear_kv(&mut self) {
        match self {
            Self::Gemma3(m) => m.clear_kv(),
        }
    }

    /// Positions this instance can hold.
    pub fn context(&self) -> usize {
        match self {
            Self::Gemma3(m) => m.context(),
        }
    }

    /// The model's trained maximum context.
    pub fn max_context(&self) -> usize {
        match self {
            Self::Gemma3(m) => m.config().max_context,
        }
    }

    pub fn vocab(&self) -> usize {
        match self {
            Self::Gemma3(m) => m.vocab(),
        }
    }

    pub fn architecture(&self) -> &'static str {
        match self {
            Self::Gemma3(_) => "gemma3",
        }
    }
}
