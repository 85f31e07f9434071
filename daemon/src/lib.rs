//! paraphym's daemon library. For now: the engine that loads quantized GGUF
//! models and generates with Candle on the calling thread (see `engine`).

// BLAS backends link through these crates (as in Candle's examples).
#[cfg(feature = "accelerate")]
extern crate accelerate_src;
#[cfg(feature = "mkl")]
extern crate intel_mkl_src;

pub mod engine;
pub mod pull;
pub mod registry;
pub mod synth;
