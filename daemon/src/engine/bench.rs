//! The three generation loops `paraphym-bench decode` compares, each timed the
//! same way: load, warm-up (a 32-token prefill and one decode step, so that no
//! loop pays Candle's lazy weight repacking inside the timed part), prefill of
//! the prompt, then greedy decoding of exactly `gen` tokens (EOS ignored).
//!
//! * `stock` — Candle's own model (`candle-transformers` quantized_qwen3 /
//!   quantized_gemma3 / quantized_llama) in the candle-examples loop;
//! * `bare` — the same loop over our model (`models::Model::forward`);
//! * `engine` — `Engine::generate`, the path the daemon serves;
//! * `static` — the fixed-shape decode step (`decoder::StaticDecoder`: static
//!   KV cache, position on the device, greedy token chosen on the device),
//!   run eagerly;
//! * `graph` — the same step captured once as a CUDA graph and replayed per
//!   token (eager where there is no CUDA).

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};

use super::models::{self, LogitsFor, Weights};
use super::sampling::argmax;
use super::{Engine, EngineError, GenParams, LoadOptions, Prompt, SamplingParams};

/// One run's measurements.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    pub load: Duration,
    pub warmup: Duration,
    pub prefill: Duration,
    pub decode: Duration,
    pub first_token: Duration,
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
}

impl RunStats {
    pub fn prefill_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64()
    }

    /// Tokens after the first, over the time they took.
    pub fn decode_tps(&self) -> f64 {
        (self.tokens.len().saturating_sub(1)) as f64 / self.decode.as_secs_f64()
    }
}

/// Which loop to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loop {
    Stock,
    Bare,
    Engine,
    Static,
    Graph,
}

impl Loop {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "stock" => Loop::Stock,
            "bare" => Loop::Bare,
            "engine" => Loop::Engine,
            "static" => Loop::Static,
            "graph" => Loop::Graph,
            _ => return None,
        })
    }
}

/// The prompt every loop gets: the model's own tokenization of a fixed text
/// (BOS first when the model uses one), cut or repeated to `n` tokens.
pub fn prompt_tokens(path: &std::path::Path, n: usize) -> Result<Vec<u32>, EngineError> {
    const TEXT: &str = "The history of computing is a story of abstractions: each \
        generation of engineers builds on the tools of the last, hiding detail so \
        that the next can think about larger problems. ";
    let gguf = super::gguf::GgufFile::open(path)?;
    let tok = super::Tokenizer::from_gguf(&gguf)?;
    let mut ids = tok.encode(TEXT, true)?;
    let body = tok.encode(TEXT, false)?;
    while ids.len() < n {
        ids.extend_from_slice(&body);
    }
    ids.truncate(n.max(1));
    Ok(ids)
}

/// Positions a run needs: the prompt, the generation, and the warm-up pass.
fn context(prompt: &[u32], gen: usize) -> usize {
    (prompt.len() + gen).max(super::WARMUP_TOKENS + 1)
}

/// The stock models' warm-up input (ours is `engine::warm_up`).
fn warmup_tokens(prompt: &[u32]) -> Vec<u32> {
    prompt
        .iter()
        .copied()
        .cycle()
        .take(super::WARMUP_TOKENS)
        .collect()
}

/// Run one loop once.
pub fn run(
    which: Loop,
    path: &std::path::Path,
    prompt: &[u32],
    gen: usize,
    device: &Device,
) -> Result<RunStats, EngineError> {
    match which {
        Loop::Stock => run_stock(path, prompt, gen, device),
        Loop::Bare => run_bare(path, prompt, gen, device),
        Loop::Engine => run_engine(path, prompt, gen, device),
        Loop::Static => run_static(path, prompt, gen, device, false),
        Loop::Graph => run_static(path, prompt, gen, device, true),
    }
}

/// The bare greedy loop over any `forward(tokens, pos) -> last logits`.
fn greedy_loop(
    prompt: &[u32],
    gen: usize,
    stats: &mut RunStats,
    mut forward: impl FnMut(&[u32], usize) -> Result<Tensor, EngineError>,
) -> Result<(), EngineError> {
    let start = Instant::now();
    let logits = forward(prompt, 0)?;
    let mut next = argmax(&logits.flatten_all()?.to_vec1::<f32>()?);
    stats.prefill = start.elapsed();
    stats.first_token = stats.prefill;
    stats.prompt_tokens = prompt.len();
    let start = Instant::now();
    stats.tokens.push(next);
    while stats.tokens.len() < gen {
        let pos = prompt.len() + stats.tokens.len() - 1;
        let logits = forward(&[next], pos)?;
        next = argmax(&logits.flatten_all()?.to_vec1::<f32>()?);
        stats.tokens.push(next);
    }
    stats.decode = start.elapsed();
    Ok(())
}

/// Our model, loaded and warmed up as the engine does (timed into `stats`).
fn load_model(
    path: &std::path::Path,
    prompt: &[u32],
    gen: usize,
    device: &Device,
    stats: &mut RunStats,
) -> Result<models::Model, EngineError> {
    let t = Instant::now();
    let gguf = super::gguf::GgufFile::open(path)?;
    let mut model = models::load(&gguf, context(prompt, gen), Weights::Quantized, device)?;
    stats.load = t.elapsed();
    let t = Instant::now();
    super::warm_up(&mut model, gguf.get_u64("tokenizer.ggml.bos_token_id").ok())?;
    stats.warmup = t.elapsed();
    Ok(model)
}

fn run_bare(
    path: &std::path::Path,
    prompt: &[u32],
    gen: usize,
    device: &Device,
) -> Result<RunStats, EngineError> {
    let mut stats = RunStats::default();
    let mut model = load_model(path, prompt, gen, device, &mut stats)?;
    greedy_loop(prompt, gen, &mut stats, |tokens, _pos| {
        model.forward(tokens, LogitsFor::Last)
    })?;
    Ok(stats)
}

fn run_static(
    path: &std::path::Path,
    prompt: &[u32],
    gen: usize,
    device: &Device,
    graph: bool,
) -> Result<RunStats, EngineError> {
    let mut stats = RunStats::default();
    let mut model = load_model(path, prompt, gen, device, &mut stats)?;
    let t = Instant::now();
    // The decoder's buffers (and its captured graph) outlive a generation:
    // a short one first, so the capture is not timed.
    let mut fixed = models::decoder::StaticDecoder::new(&model, prompt.len() + gen + 1, 1, graph)?;
    fixed.start(0, &mut model, &prompt[..prompt.len().min(8)])?;
    for _ in 0..3 {
        fixed.step(&model, 1, None)?;
    }
    fixed.token()?;
    stats.warmup += t.elapsed();
    let start = Instant::now();
    fixed.start(0, &mut model, prompt)?;
    let mut next = fixed.token()?;
    stats.prefill = start.elapsed();
    stats.first_token = stats.prefill;
    stats.prompt_tokens = prompt.len();
    let start = Instant::now();
    stats.tokens.push(next);
    while stats.tokens.len() < gen {
        // The step leaves its greedy token on the device: only it comes back.
        fixed.step(&model, 1, None)?;
        next = fixed.token()?;
        stats.tokens.push(next);
    }
    stats.decode = start.elapsed();
    Ok(stats)
}

fn run_engine(
    path: &std::path::Path,
    prompt: &[u32],
    gen: usize,
    device: &Device,
) -> Result<RunStats, EngineError> {
    let mut stats = RunStats::default();
    let t = Instant::now();
    let opts = LoadOptions {
        context: Some(context(prompt, gen)),
        device: device.clone(),
        ..LoadOptions::default()
    };
    // Engine::load includes its warm-up; report it as load, warm-up as zero.
    let mut engine = Engine::load(path, &opts)?;
    stats.load = t.elapsed();
    let params = GenParams {
        sampling: SamplingParams::greedy(),
        max_tokens: gen,
        ignore_eos: true,
        ..GenParams::default()
    };
    let g = engine.generate(
        Prompt::Tokens(prompt),
        &params,
        &AtomicBool::new(false),
        |_| {},
    )?;
    stats.prefill = g.prefill_time;
    stats.first_token = g.time_to_first_token;
    stats.decode = g.decode_time;
    stats.prompt_tokens = g.prompt_tokens;
    stats.tokens = g.tokens;
    Ok(stats)
}

/// Candle's own quantized models, for the `stock` column.
enum Stock {
    Qwen3(candle_transformers::models::quantized_qwen3::ModelWeights),
    Gemma3(candle_transformers::models::quantized_gemma3::ModelWeights),
    Llama(candle_transformers::models::quantized_llama::ModelWeights),
    /// RoPE base fixed at 10,000 and no LongRoPE factors: a speed baseline
    /// only (its tokens differ from ours on Phi-4's 250,000).
    Phi3(candle_transformers::models::quantized_phi3::ModelWeights),
}

impl Stock {
    fn forward(
        &mut self,
        tokens: &[u32],
        pos: usize,
        device: &Device,
    ) -> Result<Tensor, EngineError> {
        let input = Tensor::new(tokens, device)?.unsqueeze(0)?;
        Ok(match self {
            Stock::Qwen3(m) => m.forward(&input, pos)?,
            Stock::Gemma3(m) => m.forward(&input, pos)?,
            Stock::Llama(m) => m.forward(&input, pos)?,
            Stock::Phi3(m) => m.forward(&input, pos)?,
        })
    }

    /// Gemma 3, Llama and Phi-3 restart their caches at position 0; Qwen3 needs telling.
    fn clear(&mut self) {
        match self {
            Stock::Qwen3(m) => m.clear_kv_cache(),
            Stock::Llama(m) => m.clear_kv_cache(),
            Stock::Gemma3(_) | Stock::Phi3(_) => {}
        }
    }
}

fn run_stock(
    path: &std::path::Path,
    prompt: &[u32],
    gen: usize,
    device: &Device,
) -> Result<RunStats, EngineError> {
    use candle_transformers::models::{
        quantized_gemma3, quantized_llama, quantized_phi3, quantized_qwen3,
    };
    let io = |source| EngineError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stats = RunStats::default();
    let t = Instant::now();
    let mut file = std::fs::File::open(path).map_err(io)?;
    let ct = gguf_file::Content::read(&mut file)?;
    let arch = ct
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let mut model = match arch.as_str() {
        "qwen3" => Stock::Qwen3(quantized_qwen3::ModelWeights::from_gguf(
            ct, &mut file, device,
        )?),
        "gemma3" => Stock::Gemma3(quantized_gemma3::ModelWeights::from_gguf(
            ct, &mut file, device,
        )?),
        "llama" => Stock::Llama(quantized_llama::ModelWeights::from_gguf(
            ct, &mut file, device,
        )?),
        "phi3" => Stock::Phi3(quantized_phi3::ModelWeights::from_gguf(
            false, ct, &mut file, device,
        )?),
        other => {
            return Err(EngineError::InvalidParams(format!(
                "no stock Candle model for `{other}`"
            )))
        }
    };
    stats.load = t.elapsed();
    let t = Instant::now();
    let w = warmup_tokens(prompt);
    model.forward(&w, 0, device)?;
    model.forward(&w[..1], w.len(), device)?;
    model.clear();
    stats.warmup = t.elapsed();
    greedy_loop(prompt, gen, &mut stats, |tokens, pos| {
        model.forward(tokens, pos, device)
    })?;
    Ok(stats)
}
