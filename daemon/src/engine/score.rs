//! Scoring text: perplexity by llama.cpp's `llama-perplexity` method, so our
//! figures compare directly with llama.cpp's on the same file and text.

use candle_core::DType;

use super::error::EngineError;
use super::models::{LogitsFor, Model};

/// Perplexity result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    pub ppl: f64,
    pub chunks: usize,
    pub scored_tokens: usize,
}

/// Split `tokens` (the whole text, tokenized with BOS) into chunks of `n_ctx`,
/// at most `max_chunks` of them; each chunk starts with `bos` (when the model
/// uses one), is evaluated from an empty cache, and only the predictions in its
/// second half are scored.
pub fn perplexity(
    model: &mut Model,
    tokens: &[u32],
    bos: Option<u32>,
    n_ctx: usize,
    max_chunks: usize,
) -> Result<Perplexity, EngineError> {
    if n_ctx < 4 {
        return Err(EngineError::InvalidParams(format!(
            "n_ctx {n_ctx} is too small to score"
        )));
    }
    let chunks = (tokens.len() / n_ctx).min(max_chunks);
    if chunks == 0 {
        return Err(EngineError::InvalidParams(format!(
            "{} tokens are fewer than one chunk of {n_ctx}",
            tokens.len()
        )));
    }
    let first = n_ctx / 2;
    let mut nll = 0f64;
    let mut count = 0usize;
    for c in 0..chunks {
        let chunk = &tokens[c * n_ctx..(c + 1) * n_ctx];
        let mut input = chunk.to_vec();
        if let Some(b) = bos {
            input[0] = b;
        }
        model.clear_kv();
        // Logits for positions first..n_ctx-1 predict tokens first+1..n_ctx.
        let logits = model.forward(&input, LogitsFor::From(first))?;
        let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (row, target) in logits.iter().zip(&chunk[first + 1..]) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = row.iter().map(|&l| f64::from(l - max).exp()).sum();
            let logp = f64::from(row[*target as usize] - max) - sum.ln();
            nll -= logp;
            count += 1;
        }
    }
    model.clear_kv();
    Ok(Perplexity {
        ppl: (nll / count as f64).exp(),
        chunks,
        scored_tokens: count,
    })
}
