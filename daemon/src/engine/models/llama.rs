//! Llama 2/3 (and files converted as `llama`, such as Phi-4): interleaved RoPE
//! (the GGUF converter permutes Q/K for it), SiLU MLP, no Q/K norms. Llama 3.1's
//! long-context RoPE comes as per-frequency divisors in `rope_freqs.weight`.

use candle_core::Device;

use super::common::{Result, RopeStyle};
use super::decoder::{linear_rope_scale, usize_or, vocab_rows, Activation, RopeSpec, Spec};
use crate::engine::gguf::GgufFile;

pub fn spec(g: &GgufFile) -> Result<Spec> {
    let a = "llama";
    let key = |k: &str| format!("{a}.{k}");
    let hidden = g.get_usize(&key("embedding_length"))?;
    let layers = g.get_usize(&key("block_count"))?;
    let heads = g.get_usize(&key("attention.head_count"))?;
    let head_dim = usize_or(g, &key("attention.key_length"), hidden / heads.max(1))?;
    let freq_factors = match g.tensor_info("rope_freqs.weight") {
        None => None,
        Some(_) => Some(
            g.tensor("rope_freqs.weight", Some(&[head_dim / 2]), &Device::Cpu)?
                .dequantize(&Device::Cpu)?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f64::from)
                .collect(),
        ),
    };
    Ok(Spec {
        arch: a,
        hidden,
        layers,
        heads,
        kv_heads: usize_or(g, &key("attention.head_count_kv"), heads)?,
        head_dim,
        ffn: g.get_usize(&key("feed_forward_length"))?,
        vocab: vocab_rows(g)?,
        eps: g.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
        max_context: g.get_usize(&key("context_length"))?,
        rope_style: RopeStyle::Interleaved,
        rope: RopeSpec {
            base: g.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0),
            scale: linear_rope_scale(g, a),
            freq_factors,
        },
        rope_local: None,
        windows: vec![None; layers],
        qk_norm: false,
        sandwich_norms: false,
        activation: Activation::Silu,
        embed_scale: None,
        attn_scale: 1.0 / (head_dim as f64).sqrt(),
    })
}
