//! Llama 2/3 (and files converted as `llama`, such as Phi-4): interleaved RoPE
//! (the GGUF converter permutes Q/K for it), SiLU MLP, no Q/K norms. Llama 3.1's
//! long-context RoPE comes as per-frequency divisors in `rope_freqs.weight`.

use candle_core::Device;

use super::common::{Result, RopeStyle};
use super::decoder::Spec;
use crate::engine::gguf::GgufFile;

pub fn spec(g: &GgufFile) -> Result<Spec> {
    let mut spec = Spec::common(g, "llama", 10_000.0)?;
    spec.rope_style = RopeStyle::Interleaved;
    if g.tensor_info("rope_freqs.weight").is_some() {
        let factors = g
            .tensor(
                "rope_freqs.weight",
                Some(&[spec.head_dim / 2]),
                &Device::Cpu,
            )?
            .dequantize(&Device::Cpu)?
            .to_vec1::<f32>()?;
        spec.rope.freq_factors = Some(factors.into_iter().map(f64::from).collect());
    }
    Ok(spec)
}
