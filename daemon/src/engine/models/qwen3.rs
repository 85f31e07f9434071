//! Qwen3 (dense): Q/K RMSNorm per head before RoPE, NeoX RoPE, SiLU MLP.
//!
//! Differs from Candle 0.11's `quantized_qwen3` in one way that matters: RoPE
//! tables are F32 computed in f64. Candle builds them in F16 unless the GGUF has
//! `general.dtype` (llama.cpp never writes it): 0.34 rad off at position 1,000
//! and 1.17 at 2,049.

use super::common::Result;
use super::decoder::Spec;
use crate::engine::gguf::GgufFile;

pub fn spec(g: &GgufFile) -> Result<Spec> {
    Ok(Spec {
        qk_norm: true,
        ..Spec::common(g, "qwen3", 1_000_000.0)?
    })
}
