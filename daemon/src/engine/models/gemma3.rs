//! Gemma 3 (text), as llama.cpp runs it from GGUF.
//!
//! Differences from Candle 0.11's `quantized_gemma3` and why:
//! * the MLP gate uses GELU (tanh approximation), as Gemma 3 is trained; Candle
//!   uses SiLU there (candle#3745), which doubles perplexity;
//! * sliding-window layers mask by the window on every step, decode included,
//!   and a window of `w` shows a query the `w` keys ending at itself;
//! * prefill works in chunks at any position (the mask is built from absolute
//!   positions);
//! * RoPE tables cover the context in use, not 131,072 positions per layer, and
//!   the embedding table stays quantized (rows are dequantized on lookup).
//!
//! Layer `i` is global (full attention, RoPE base `rope.freq_base`, linear RoPE
//! scaling if any) when `(i + 1) % 6 == 0`, local (sliding window, base 10,000)
//! otherwise: llama.cpp's fixed pattern for this architecture.

use super::common::Result;
use super::decoder::{Activation, RopeSpec, Spec};
use crate::engine::gguf::GgufFile;

const SLIDING_PATTERN: usize = 6;
const LOCAL_ROPE_BASE: f64 = 10_000.0;

pub fn spec(g: &GgufFile) -> Result<Spec> {
    let base = Spec::common(g, "gemma3", 1_000_000.0)?;
    let window = g.get_usize("gemma3.attention.sliding_window")?;
    // Gemma 3 27B was trained with query_pre_attn_scalar = hidden / heads; the
    // other sizes with the head size (llama.cpp makes the same distinction).
    let attn_scale = if base.layers == 62 {
        1.0 / ((base.hidden / base.heads.max(1)) as f64).sqrt()
    } else {
        base.attn_scale
    };
    Ok(Spec {
        rope_local: Some(RopeSpec::plain(LOCAL_ROPE_BASE)),
        windows: (0..base.layers)
            .map(|i| ((i + 1) % SLIDING_PATTERN != 0).then_some(window))
            .collect(),
        qk_norm: true,
        sandwich_norms: true,
        activation: Activation::GeluTanh,
        embed_scale: Some((base.hidden as f64).sqrt()),
        attn_scale,
        ..base
    })
}
