//! paraphym's daemon library: the engine that loads quantized GGUF models and
//! generates with Candle on the calling thread (`engine`), the worker pools
//! that keep them warm (`pool`), and the socket server (`server`).

// BLAS backends link through these crates (as in Candle's examples).
#[cfg(feature = "accelerate")]
extern crate accelerate_src;
#[cfg(feature = "mkl")]
extern crate intel_mkl_src;

pub mod breaker;
pub mod config;
pub mod engine;
pub mod events;
pub mod governor;
pub mod hooks;
pub mod http;
pub mod library;
pub mod pool;
pub mod pull;
pub mod registry;
pub mod server;
pub mod synth;
