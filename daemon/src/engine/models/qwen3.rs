//! Qwen3 (dense): Q/K RMSNorm per head before RoPE, NeoX RoPE, SiLU MLP.
//!
//! Differs from Candle 0.11's `quantized_qwen3` in one way that matters: RoPE
//! tables are F32 computed in f64. Candle builds them in F16 unless the GGUF has
//! `general.dtype` (llama.cpp never writes it): 0.34 rad off at position 1,000
//! and 1.17 at 2,049.

use super::common::{Result, RopeStyle};
use super::decoder::{linear_rope_scale, usize_or, vocab_rows, Activation, RopeSpec, Spec};
use crate::engine::gguf::GgufFile;

pub fn spec(g: &GgufFile) -> Result<Spec> {
    let a = "qwen3";
    let key = |k: &str| format!("{a}.{k}");
    let hidden = g.get_usize(&key("embedding_length"))?;
    let layers = g.get_usize(&key("block_count"))?;
    let heads = g.get_usize(&key("attention.head_count"))?;
    let head_dim = usize_or(g, &key("attention.key_length"), hidden / heads.max(1))?;
    Ok(Spec {
        arch: a,
        hidden,
        layers,
        heads,
        kv_heads: g.get_usize(&key("attention.head_count_kv"))?,
        head_dim,
        ffn: g.get_usize(&key("feed_forward_length"))?,
        vocab: vocab_rows(g)?,
        eps: g.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
        max_context: g.get_usize(&key("context_length"))?,
        rope_style: RopeStyle::Neox,
        rope: RopeSpec {
            base: g.get_f64(&key("rope.freq_base")).unwrap_or(1_000_000.0),
            scale: linear_rope_scale(g, a),
            freq_factors: None,
        },
        rope_local: None,
        windows: vec![None; layers],
        qk_norm: true,
        sandwich_norms: false,
        activation: Activation::Silu,
        embed_scale: None,
        attn_scale: 1.0 / (head_dim as f64).sqrt(),
    })
}
