//! The architectures we run. All are instances of one decoder-only transformer
//! ([`decoder::Model`]); each family's module only reads its metadata into a
//! [`decoder::Spec`]. Shared pieces live in [`common`].

pub mod common;
pub mod cpu_attention;
pub mod cpu_q8;
pub mod decoder;
pub mod gemma3;
pub mod llama;
pub mod phi3;
pub mod qwen3;

use candle_core::Device;

pub use common::{LogitsFor, Weights};
pub use decoder::Model;

use super::error::{EngineError, ModelFileError};
use super::gguf::GgufFile;

/// Architectures this build can load, by `general.architecture`.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["gemma3", "llama", "phi3", "qwen3"];

/// The [`decoder::Spec`] of the model in `gguf`, run with `context` positions
/// (Phi-3's LongRoPE factors depend on it).
pub fn spec(gguf: &GgufFile, context: usize) -> Result<decoder::Spec, EngineError> {
    match gguf.architecture()? {
        "gemma3" => gemma3::spec(gguf),
        "llama" => llama::spec(gguf),
        "phi3" => phi3::spec(gguf, context),
        "qwen3" => qwen3::spec(gguf),
        other => Err(gguf.error(ModelFileError::UnsupportedArchitecture {
            arch: other.to_owned(),
            supported: SUPPORTED_ARCHITECTURES.join(", "),
        })),
    }
}

/// Load the model in `gguf` onto `device` for a context of `context` positions.
pub fn load(
    gguf: &GgufFile,
    context: usize,
    weights: Weights,
    device: &Device,
) -> Result<Model, EngineError> {
    load_with_progress(gguf, context, weights, device, &mut |_, _| {})
}

/// [`load`], reporting `(layers loaded, layers)` as it goes.
pub fn load_with_progress(
    gguf: &GgufFile,
    context: usize,
    weights: Weights,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Model, EngineError> {
    Model::load(
        gguf,
        spec(gguf, context)?,
        context,
        weights,
        device,
        progress,
    )
}
