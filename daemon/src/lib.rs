//! paraphym's daemon library. For now: the engine that loads quantized GGUF
//! models and generates with Candle on the calling thread (see `engine`).

pub mod engine;
pub mod synth;
