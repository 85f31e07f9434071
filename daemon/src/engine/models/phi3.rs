//! Phi-3, Phi-3.5, Phi-4 and Phi-4-mini (`general.architecture = phi3`).
//!
//! A plain decoder with NeoX RoPE and SiLU; what sets it apart is in the file:
//! fused `attn_qkv` and gate+up `ffn_up` tensors (the decoder splits them), RoPE
//! base from metadata (Candle's `quantized_phi3` hard-codes 10,000; Phi-4 uses
//! 250,000), partial rotary (Phi-4-mini rotates 96 of 128 dimensions) and
//! LongRoPE: per-frequency factors `rope_factors_short`/`_long` chosen by the
//! context in use against the original training context, with an attention
//! factor on cos/sin. As in llama.cpp, a `sliding_window` in the metadata is not
//! applied (the converters write values that do not match training).

use candle_core::Device;

use super::common::Result;
use super::decoder::{LongRope, Spec};
use crate::engine::gguf::GgufFile;

pub fn spec(g: &GgufFile, context: usize) -> Result<Spec> {
    let mut spec = Spec::common(g, "phi3", 10_000.0)?;
    let original = g
        .get_usize("phi3.rope.scaling.original_context_length")
        .unwrap_or(spec.max_context);
    if let Ok(f) = g.get_f64("phi3.rope.scaling.attn_factor") {
        spec.rope.mscale = f;
    }
    let with = |name: &str| -> Result<_> {
        let mut rope = spec.rope.clone();
        if g.tensor_info(name).is_some() {
            let factors = g
                .tensor(name, Some(&[spec.rot_dim / 2]), &Device::Cpu)?
                .dequantize(&Device::Cpu)?
                .to_vec1::<f32>()?;
            rope.freq_factors = Some(factors.into_iter().map(f64::from).collect());
        }
        Ok(rope)
    };
    let long_rope = LongRope {
        original,
        short: with("rope_factors_short.weight")?,
        long: with("rope_factors_long.weight")?,
    };
    spec.long_rope = Some(long_rope);
    spec.rope = spec.rope_for(context).clone();
    Ok(spec)
}
