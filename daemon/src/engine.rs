//! The engine: load a GGUF model and generate with it on the calling thread.
//!
//! This is the hot path, and it is deliberately plain: `Engine::generate`
//! prefills in chunks and then runs one synchronous forward pass per token, the
//! way Candle's own examples do. No async, no `spawn_blocking`, no channels
//! inside the loop; text leaves through a callback. Whoever owns an `Engine`
//! (a worker thread, a test, a benchmark) owns the thread it runs on.

pub mod bench;
pub mod device;
pub mod error;
pub mod gguf;
pub mod json;
pub mod models;
pub mod pick;
pub mod sampling;
pub mod score;
pub mod template;
pub mod tokenizer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};

pub use error::{EngineError, ModelFileError};
pub use models::{LogitsFor, Model, Weights};
pub use sampling::SamplingParams;
pub use template::{ChatOptions, ChatTemplate, Message};
pub use tokenizer::Tokenizer;

use models::decoder::StaticDecoder;
use sampling::{Detokenizer, Sampler, StopCheck, StopMatcher};

/// The context a model is loaded with unless asked otherwise (bounded by the
/// model's own maximum). Large enough for real chats, small enough that the
/// RoPE tables and KV cache of a small model stay small.
pub const DEFAULT_CONTEXT: usize = 8192;

/// Tokens per prefill step: bounds the attention scratch memory, and a cancel
/// request is honoured between chunks.
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// Tokens in the warm-up prefill. Candle repacks quantized weights for its
/// fastest kernels lazily, on first use, and picks a different packing for
/// batches of 32 rows or more than for single-row decode steps: warming up
/// both paths at load time keeps that cost out of the first request.
pub const WARMUP_TOKENS: usize = 32;

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Positions to serve; `None`: [`DEFAULT_CONTEXT`] or the model's maximum if smaller.
    pub context: Option<usize>,
    pub device: Device,
    /// Run the warm-up pass (on by default; tests of the loader turn it off).
    pub warmup: bool,
    /// Quantized (normal) or dequantized-to-F32 weights.
    pub weights: Weights,
    /// Take turns with the other engines holding the same lock (workers on
    /// one GPU); `None`: run freely.
    pub turns: Option<Turns>,
}

/// How engines sharing one device take turns.
#[derive(Debug, Clone)]
pub struct Turns {
    pub lock: Arc<Mutex<()>>,
    /// Hold the turn through the step's host copy too (the step runs alone),
    /// rather than only while its kernels are launched.
    pub whole_step: bool,
}

impl Turns {
    pub fn new(whole_step: bool) -> Self {
        Self {
            lock: Arc::new(Mutex::new(())),
            whole_step,
        }
    }

    pub fn take(&self) -> MutexGuard<'_, ()> {
        // The lock guards no data: a panic while it was held leaves nothing broken.
        self.lock.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            context: None,
            device: Device::Cpu,
            warmup: true,
            weights: Weights::Quantized,
            turns: None,
        }
    }
}

/// What one generation asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct GenParams {
    pub sampling: SamplingParams,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Generation ends when the text contains one of these; it is not emitted.
    pub stop: Vec<String>,
    /// Tokens per prefill chunk.
    pub prefill_chunk: usize,
    /// Keep generating past end-of-generation tokens (benchmarks: exactly
    /// `max_tokens`).
    pub ignore_eos: bool,
    /// Start from the longest prefix the KV cache already holds (the last
    /// conversation's turns, a shared system prompt) and prefill only the
    /// rest. Off: every prompt is prefilled whole (tests and benchmarks compare).
    pub reuse_cache: bool,
    /// Report each token's log-probability and this many alternatives
    /// (`GenEvent::Logprobs`); the whole row then comes to the host.
    pub logprobs: Option<usize>,
    /// The output must be one JSON value of this shape (constrained decoding,
    /// [`json`]); it ends when the value does.
    pub json: Option<Arc<json::Shape>>,
    /// Positions this generation may use, prompt and reply together (a
    /// request's `num_ctx`); `None` or more than the model serves: all of them.
    pub context: Option<usize>,
}

/// The most alternatives a token's log-probabilities report.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A generated token's log-probability under the model (the log-softmax of
/// its logits, before penalties and sampling filters) and the most likely
/// tokens, most likely first; with their bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<(u32, Vec<u8>, f32)>,
}

/// `(log-sum-exp, the n largest (token, logit))` of a row.
fn log_softmax_top(row: &[f32], n: usize) -> (f64, Vec<(u32, f32)>) {
    let max = row
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row
        .iter()
        .filter(|x| x.is_finite())
        .map(|&x| f64::from(x - max).exp())
        .sum();
    let lse = f64::from(max) + sum.ln();
    let mut all: Vec<(u32, f32)> = row
        .iter()
        .enumerate()
        .filter(|(_, x)| x.is_finite())
        .map(|(i, &x)| (i as u32, x))
        .collect();
    let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let n = n.min(all.len());
    if n > 0 && n < all.len() {
        all.select_nth_unstable_by(n - 1, desc);
    }
    all.truncate(n);
    all.sort_unstable_by(desc);
    (lse, all)
}

impl Default for GenParams {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::default(),
            max_tokens: 512,
            stop: Vec::new(),
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            ignore_eos: false,
            reuse_cache: true,
            logprobs: None,
            json: None,
            context: None,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token (eos or a turn terminator).
    EndOfGeneration,
    /// `max_tokens` were generated.
    MaxTokens,
    /// One of the stop strings appeared (its index in `GenParams::stop`).
    StopString(usize),
    /// The context is full.
    ContextFull,
    /// The cancel flag was raised.
    Cancelled,
}

/// The outcome of [`Engine::generate`]. The text itself went to the callback.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the cache (not prefilled).
    pub reused_tokens: usize,
    /// Generated token ids, the end-of-generation token excluded.
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    /// From the call to the first sampled token.
    pub time_to_first_token: Duration,
}

impl Generation {
    /// Decode speed in tokens/s (tokens after the first over decode time).
    pub fn decode_tps(&self) -> f64 {
        let n = self.tokens.len().saturating_sub(1);
        if n == 0 || self.decode_time.is_zero() {
            return 0.0;
        }
        n as f64 / self.decode_time.as_secs_f64()
    }

    pub fn prefill_tps(&self) -> f64 {
        if self.prefill_time.is_zero() {
            return 0.0;
        }
        // Only what was prefilled: reused tokens cost nothing.
        (self.prompt_tokens - self.reused_tokens) as f64 / self.prefill_time.as_secs_f64()
    }
}

/// What [`Engine::generate`] reports while it runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GenEvent<'a> {
    /// `done` of `total` prompt tokens are in the KV cache.
    Prefilled { done: usize, total: usize },
    /// A token was sampled (end-of-generation tokens excluded); its text, if
    /// any is complete yet, follows as `Text`.
    Token(u32),
    /// New text: whole UTF-8 characters, stop strings withheld.
    Text(&'a str),
    /// The log-probabilities of the token that follows as `Token` (when
    /// `GenParams::logprobs` asks).
    Logprobs(&'a TokenLogprobs),
}

/// A prompt: raw text to tokenize (BOS added as the model asks), a
/// conversation rendered with the model's chat template, or token ids as is.
#[derive(Debug, Clone, Copy)]
pub enum Prompt<'a> {
    Text(&'a str),
    Chat(&'a [Message], &'a ChatOptions),
    Tokens(&'a [u32]),
}

/// A loaded model with its tokenizer.
#[derive(Debug)]
pub struct Engine {
    model: Model,
    tokenizer: Arc<Tokenizer>,
    template: Arc<ChatTemplate>,
    path: PathBuf,
    device: Device,
    load_time: Duration,
    /// The device-side top-k's constants (see [`pick`]).
    top: pick::TopK,
    turns: Option<Turns>,
    /// The tokens whose keys and values the model's cache holds, in order
    /// (a prefix of what it holds, after an error or a cancel).
    cached: Vec<u32>,
    /// How many of them were the last generation's prompt (the rest its reply).
    prompt_len: usize,
}

impl Engine {
    /// Load a GGUF model; with `opts.warmup`, run the warm-up pass before returning.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self, EngineError> {
        Self::load_with_progress(path, opts, &mut |_| {})
    }

    /// [`Engine::load`], reporting progress as a fraction in `0.0..=1.0`
    /// (layers read, then the warm-up pass).
    pub fn load_with_progress(
        path: &Path,
        opts: &LoadOptions,
        progress: &mut (dyn FnMut(f32) + Send),
    ) -> Result<Self, EngineError> {
        let start = Instant::now();
        let gguf = gguf::GgufFile::open(path)?;
        let context = opts.context.unwrap_or(DEFAULT_CONTEXT);
        // Building a tokenizer from a 262k vocabulary takes as long as loading
        // and warming up the weights, and needs neither: do both at once.
        let (model, tokenizer) = std::thread::scope(|s| {
            let tok = std::thread::Builder::new()
                .name("tokenizer-build".into())
                .spawn_scoped(s, || Tokenizer::for_model(&gguf))
                .map_err(|source| EngineError::Io {
                    path: path.to_owned(),
                    source,
                })?;
            // Layers are most of the load; the warm-up pass the last tenth.
            let model = models::load_with_progress(
                &gguf,
                context,
                opts.weights,
                &opts.device,
                &mut |done, total| progress(0.9 * done as f32 / total.max(1) as f32),
            )
            .and_then(|mut m| {
                if opts.warmup {
                    warm_up(&mut m, gguf.get_u64("tokenizer.ggml.bos_token_id").ok())?;
                }
                progress(1.0);
                Ok(m)
            });
            let tokenizer = tok
                .join()
                .map_err(|_| EngineError::Tokenizer("the tokenizer build panicked".into()))?;
            Ok::<_, EngineError>((model?, tokenizer?))
        })?;
        let text = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or_default();
        let template =
            ChatTemplate::from_gguf(&gguf, &text(tokenizer.bos()), &text(tokenizer.eos()), |t| {
                tokenizer.token_to_id(t).is_some()
            })?;
        drop(gguf);
        let load_time = start.elapsed();
        tracing::info!(
            path = %path.display(),
            arch = model.architecture(),
            context = model.context(),
            secs = load_time.as_secs_f64(),
            "model loaded"
        );
        Ok(Self {
            model,
            tokenizer: Arc::new(tokenizer),
            template: Arc::new(template),
            path: path.to_owned(),
            device: opts.device.clone(),
            load_time,
            top: pick::TopK::default(),
            turns: opts.turns.clone(),
            cached: Vec::new(),
            prompt_len: 0,
        })
    }

    /// Another engine over the same weights, tokenizer and template, with
    /// its own (empty) KV cache: what a second worker of a model costs is
    /// that cache and its activation buffers, not another copy of the model.
    /// Candle keeps its repacked weight layouts inside the shared tensors, so
    /// a replica is warm from the start.
    pub fn replica(&self) -> Self {
        let mut model = self.model.clone();
        model.clear_kv();
        Self {
            model,
            tokenizer: self.tokenizer.clone(),
            template: self.template.clone(),
            path: self.path.clone(),
            device: self.device.clone(),
            load_time: Duration::ZERO,
            top: pick::TopK::default(),
            turns: self.turns.clone(),
            cached: Vec::new(),
            prompt_len: 0,
        }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn chat_template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Token ids of a conversation rendered with the model's template. BOS is
    /// added only when the template did not write it (Gemma's and Llama's do).
    pub fn encode_chat(
        &self,
        messages: &[Message],
        opts: &ChatOptions,
    ) -> Result<Vec<u32>, EngineError> {
        let text = self.template.render(messages, opts)?;
        let ids = self.tokenizer.encode(&text, false)?;
        match self.tokenizer.bos() {
            Some(bos) if self.tokenizer.adds_bos() && ids.first() != Some(&bos) => {
                Ok(std::iter::once(bos).chain(ids).collect())
            }
            _ => Ok(ids),
        }
    }

    /// The token ids `generate` runs for `prompt`.
    pub fn prompt_tokens(&self, prompt: Prompt<'_>) -> Result<Vec<u32>, EngineError> {
        match prompt {
            Prompt::Text(t) => self.tokenizer.encode(t, true),
            Prompt::Chat(messages, opts) => self.encode_chat(messages, opts),
            Prompt::Tokens(t) => Ok(t.to_vec()),
        }
    }

    /// The tokens of `prompt` and how many of its chat messages were left
    /// out. With `drop_oldest`, a chat that would leave fewer than `room`
    /// positions (at most half the context) for the reply loses its oldest
    /// turns: a user message and the replies up to the next user message,
    /// again and again, until it fits. System messages and the last message
    /// always stay; if they alone overflow the context, that is an error.
    /// Without it, or for prompts that are not chats, nothing is left out
    /// (`generate` refuses a prompt past the context).
    pub fn fit_prompt(
        &self,
        prompt: Prompt<'_>,
        room: usize,
        drop_oldest: bool,
        context: Option<usize>,
    ) -> Result<(Vec<u32>, usize), EngineError> {
        let tokens = self.prompt_tokens(prompt)?;
        let context = self.window(context);
        let room = room.min(context / 2);
        let Prompt::Chat(messages, opts) = prompt else {
            return Ok((tokens, 0));
        };
        if !drop_oldest || tokens.len() + room <= context {
            return Ok((tokens, 0));
        }
        let mut kept: Vec<Message> = messages.to_vec();
        let mut dropped = 0;
        let mut tokens = tokens;
        while tokens.len() + room > context {
            let turn: Vec<usize> = droppable_turn(&kept);
            if turn.is_empty() {
                if tokens.len() < context {
                    // Only the reply's room is short: it may end at the context.
                    break;
                }
                return Err(EngineError::LastTurnTooLong {
                    tokens: tokens.len(),
                    context,
                });
            }
            dropped += turn.len();
            for i in turn.into_iter().rev() {
                kept.remove(i);
            }
            tokens = self.encode_chat(&kept, opts)?;
        }
        Ok((tokens, dropped))
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The positions a request asking for `context` gets: at most what the
    /// model serves.
    pub fn window(&self, context: Option<usize>) -> usize {
        let served = self.model.context();
        context.map_or(served, |c| c.clamp(1, served))
    }

    /// Serve `context` positions (capped at the model's trained context):
    /// RoPE tables for that many, weights shared as they are. The KV cache
    /// survives unless the rotation changed (Phi-3's LongRoPE).
    pub fn set_context(&mut self, context: usize) -> Result<(), EngineError> {
        if self.model.set_context(context)? {
            self.cached.clear();
        }
        Ok(())
    }

    /// Take `other`'s served context and its RoPE tables (shared, not
    /// rebuilt); `other` is an engine of the same weights.
    pub fn share_context(&mut self, other: &Engine) {
        if self.model.share_context(&other.model) {
            self.cached.clear();
        }
    }

    /// Direct access for scoring and tests: forward passes outside `generate`.
    /// The cache is no longer known to hold any prompt's prefix afterwards.
    pub fn model_mut(&mut self) -> &mut Model {
        self.cached.clear();
        &mut self.model
    }

    /// The tokens whose keys and values the cache holds, in order.
    pub fn cached_tokens(&self) -> &[u32] {
        &self.cached
    }

    /// How many of the cached tokens were the last generation's prompt: a
    /// prompt that extends them is the same conversation's next turn.
    pub fn cached_prompt_len(&self) -> usize {
        self.prompt_len.min(self.cached.len())
    }

    /// How many leading `tokens` the cache already holds.
    pub fn shared_prefix(&self, tokens: &[u32]) -> usize {
        self.cached
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// Bytes of KV buffers this engine holds.
    pub fn kv_bytes(&self) -> u64 {
        self.model.kv_bytes()
    }

    /// Drop the KV cache and its buffers (memory pressure).
    pub fn clear_cache(&mut self) {
        self.model.clear_kv();
        self.cached.clear();
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Load time including the warm-up pass.
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// Generate from `prompt`, reporting progress and text pieces to `on_event`
    /// as they are produced. `cancel` is checked before each prefill chunk and
    /// before each decode step.
    pub fn generate(
        &mut self,
        prompt: Prompt<'_>,
        params: &GenParams,
        cancel: &AtomicBool,
        on_event: impl FnMut(GenEvent<'_>),
    ) -> Result<Generation, EngineError> {
        let out = self.run(prompt, params, cancel, on_event);
        self.settle()?;
        out
    }

    /// Wait for this engine's queued device work. The daemon hands idle
    /// engines to whichever worker thread is free, and each thread has its
    /// own GPU stream: nothing of a generation may still be in flight when
    /// another thread takes over its cache (a cancel or an error can leave
    /// kernels queued).
    pub fn settle(&self) -> Result<(), EngineError> {
        if !self.device.is_cpu() {
            self.device.synchronize()?;
        }
        Ok(())
    }

    /// How this engine takes turns with others on its device, if it does.
    pub fn turns(&self) -> Option<&Turns> {
        self.turns.as_ref()
    }

    fn run(
        &mut self,
        prompt: Prompt<'_>,
        params: &GenParams,
        cancel: &AtomicBool,
        mut on_event: impl FnMut(GenEvent<'_>),
    ) -> Result<Generation, EngineError> {
        let start = Instant::now();
        let prompt_tokens = self.prompt_tokens(prompt)?;
        let mut d = self.begin(prompt_tokens, params, start)?;
        let turns = self.turns.clone();
        let turn = || turns.as_ref().map(Turns::take);
        let whole_step = turns.as_ref().is_some_and(|t| t.whole_step);
        // A whole-step turn is kept until the step's token is on the host.
        let mut held = None;
        while !d.prefilled() {
            if cancel.load(Ordering::Relaxed) {
                return self.finish(d, FinishReason::Cancelled, &mut on_event);
            }
            drop(held.take());
            let t = turn();
            self.prefill_step(&mut d, &mut on_event)?;
            held = t.filter(|_| whole_step);
        }
        let finish = loop {
            let next = self.choose(&mut d, cancel, &mut on_event);
            drop(held.take());
            let token = match next? {
                Step::Feed(t) => t,
                Step::Done(f) => break f,
            };
            let t = turn();
            d.logits = Some(self.model.forward(&[token], LogitsFor::Last)?);
            held = t.filter(|_| whole_step);
        };
        drop(held);
        self.finish(d, finish, &mut on_event)
    }

    /// Start a generation of `prompt_tokens`: checks, and the cache cut to
    /// the longest prefix it shares with them (when `params.reuse_cache`).
    /// Nothing runs yet: [`Engine::prefill_step`] until prefilled, then
    /// [`Engine::choose`] and a forward pass per token, then
    /// [`Engine::finish`]. `generate` is exactly that loop; a batching
    /// caller runs several generations' forward passes as one.
    pub fn begin(
        &mut self,
        prompt_tokens: Vec<u32>,
        params: &GenParams,
        start: Instant,
    ) -> Result<Decoding, EngineError> {
        params.sampling.validate()?;
        if params.prefill_chunk == 0 {
            return Err(EngineError::InvalidParams(
                "prefill_chunk must be at least 1".into(),
            ));
        }
        if prompt_tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let context = self.window(params.context);
        if prompt_tokens.len() > context {
            return Err(EngineError::PromptTooLong {
                tokens: prompt_tokens.len(),
                context,
            });
        }
        models::common::check_tokens(&prompt_tokens, self.model.vocab())?;

        // Reuse the longest cached prefix, but prefill at least the last
        // prompt token: its logits choose the first new token. Everything the
        // cache holds past the prefix (another conversation's tail, an edited
        // turn, the reply being regenerated) is dropped.
        let reuse = if params.reuse_cache {
            self.shared_prefix(&prompt_tokens)
                .min(prompt_tokens.len() - 1)
        } else {
            0
        };
        self.cached.truncate(reuse);
        if reuse == 0 {
            self.model.clear_kv();
        } else {
            self.model.truncate_kv(reuse);
        }
        let sampler = Sampler::new(params.sampling.clone());
        let route = pick::Route::new(&self.device, &sampler);
        // How many allowed tokens the sampler chooses among under a JSON
        // constraint: what its top-k would keep.
        let json_choices = match &params.sampling {
            p if p.temperature <= 0.0 => 1,
            p if p.top_k > 0 => p.top_k,
            _ => 64,
        };
        Ok(Decoding {
            out: Generation {
                prompt_tokens: prompt_tokens.len(),
                reused_tokens: reuse,
                tokens: Vec::new(),
                finish: FinishReason::Cancelled,
                prefill_time: Duration::ZERO,
                decode_time: Duration::ZERO,
                time_to_first_token: Duration::ZERO,
            },
            params: params.clone(),
            start,
            context,
            sampler,
            route,
            cursor: params.json.clone().map(json::Cursor::new),
            json_choices,
            history: prompt_tokens,
            detok: Detokenizer::default(),
            stops: StopMatcher::new(&params.stop),
            decode_start: start,
            prefilled: false,
            adopted: false,
            in_slot: 0,
            logits: None,
            chosen: None,
        })
    }

    /// Prefill the next chunk of the prompt (`Prefilled` reports it).
    pub fn prefill_step(
        &mut self,
        d: &mut Decoding,
        on_event: &mut impl FnMut(GenEvent<'_>),
    ) -> Result<(), EngineError> {
        let done = self.model.kv_len();
        let total = d.history.len();
        let n = d.params.prefill_chunk.min(total - done);
        let logits = self
            .model
            .forward(&d.history[done..done + n], LogitsFor::Last)?;
        if done + n == total {
            d.logits = Some(logits);
            d.prefilled = true;
        }
        on_event(GenEvent::Prefilled {
            done: self.model.kv_len(),
            total,
        });
        Ok(())
    }

    /// Choose the next token from the logits the last forward pass left in
    /// `d` (`d.logits`, or set them from a batched pass), report it, and say
    /// whether the generation goes on (feed this token) or ends.
    pub fn choose(
        &mut self,
        d: &mut Decoding,
        cancel: &AtomicBool,
        on_event: &mut impl FnMut(GenEvent<'_>),
    ) -> Result<Step, EngineError> {
        let logits = d
            .logits
            .take()
            .ok_or_else(|| EngineError::InvalidParams("no logits to choose from".into()))?;
        // The first token ends the prefill: on a GPU, choosing it is what
        // waits for the queued prefill kernels.
        let params = &d.params;
        let (token, logprobs) = if params.logprobs.is_some() || d.cursor.is_some() {
            // The whole row on the host: for the log-probabilities, or
            // to mask what the JSON output cannot continue with.
            let mut row: Vec<f32> = logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            let scored = params
                .logprobs
                .map(|n| log_softmax_top(&row, n.min(MAX_TOP_LOGPROBS)));
            // Masks and penalties change the row in place: keep the model's.
            let raw = (scored.is_some() && (d.cursor.is_some() || d.sampler.params().penalizes()))
                .then(|| row.clone());
            if let Some(c) = &d.cursor {
                json::mask(c, &mut row, &self.tokenizer, d.json_choices)?;
            }
            let token = d.sampler.sample(&mut row, &d.history);
            let logprobs = scored.map(|(lse, top)| {
                let lp = |x: f32| (f64::from(x) - lse) as f32;
                let logit = raw.as_ref().unwrap_or(&row).get(token as usize);
                TokenLogprobs {
                    token,
                    bytes: self.tokenizer.token_bytes(token),
                    logprob: logit.map_or(f32::NEG_INFINITY, |&x| lp(x)),
                    top: top
                        .into_iter()
                        .map(|(t, x)| (t, self.tokenizer.token_bytes(t), lp(x)))
                        .collect(),
                }
            });
            (token, logprobs)
        } else {
            let token = match d.chosen.take() {
                Some(t) => t,
                None => {
                    pick::next_token(d.route, &logits, &mut d.sampler, &d.history, &mut self.top)?
                }
            };
            (token, None)
        };
        let json_done = d.cursor.as_ref().is_some_and(json::Cursor::complete);
        if let Some(c) = &mut d.cursor {
            if !self.tokenizer.is_eog(token) && !c.feed(&self.tokenizer.token_bytes(token)) {
                return Err(EngineError::InvalidParams(
                    "the JSON constraint lost its place (a token it allowed did not fit)".into(),
                ));
            }
        }
        if d.out.tokens.is_empty() {
            d.out.time_to_first_token = d.start.elapsed();
            d.out.prefill_time = d.out.time_to_first_token;
            d.decode_start = Instant::now();
        }
        if (!params.ignore_eos || json_done) && self.tokenizer.is_eog(token) {
            return Ok(Step::Done(FinishReason::EndOfGeneration));
        }
        d.out.tokens.push(token);
        d.history.push(token);
        if let Some(lp) = &logprobs {
            on_event(GenEvent::Logprobs(lp));
        }
        on_event(GenEvent::Token(token));
        let decode = |ids: &[u32]| self.tokenizer.decode(ids);
        if let Some(piece) = d.detok.push(token, decode)? {
            match d.stops.push(&piece) {
                StopCheck::Continue(text) => {
                    if !text.is_empty() {
                        on_event(GenEvent::Text(&text));
                    }
                }
                StopCheck::Stop(text, i) => {
                    if !text.is_empty() {
                        on_event(GenEvent::Text(&text));
                    }
                    return Ok(Step::Done(FinishReason::StopString(i)));
                }
            }
        }
        if d.out.tokens.len() >= params.max_tokens {
            return Ok(Step::Done(FinishReason::MaxTokens));
        }
        // Positions in the cache: all but the token just chosen (the
        // engine's own cache, or a fixed decoder's slot).
        if d.history.len() > d.context {
            return Ok(Step::Done(FinishReason::ContextFull));
        }
        if cancel.load(Ordering::Relaxed) {
            return Ok(Step::Done(FinishReason::Cancelled));
        }
        Ok(Step::Feed(token))
    }

    /// Take back the positions `d` decoded in `slot` of `fixed` (see
    /// [`step_fixed`]) and free the slot; nothing to do for a generation
    /// that never got there. Before [`Engine::finish`].
    pub fn reclaim(
        &mut self,
        d: &mut Decoding,
        fixed: &mut StaticDecoder,
        slot: usize,
    ) -> Result<(), EngineError> {
        if std::mem::take(&mut d.adopted) {
            // A step launched ahead may have run its last token already.
            let out = fixed
                .withdraw(slot)
                .and_then(|()| fixed.export(slot, &mut self.model));
            fixed.free(slot)?;
            out?;
        }
        Ok(())
    }

    /// End a generation: the text still held back, the statistics, and the
    /// cache's bookkeeping (what it holds, for the next turn).
    pub fn finish(
        &mut self,
        mut d: Decoding,
        finish: FinishReason,
        on_event: &mut impl FnMut(GenEvent<'_>),
    ) -> Result<Generation, EngineError> {
        if !d.prefilled {
            // Cancelled while prefilling: keep what was prefilled.
            d.out.prefill_time = d.start.elapsed();
            self.cached = d.history[..self.model.kv_len()].to_vec();
            self.prompt_len = d.out.prompt_tokens;
            d.out.finish = FinishReason::Cancelled;
            return Ok(d.out);
        }
        if !matches!(finish, FinishReason::StopString(_)) {
            let decode = |ids: &[u32]| self.tokenizer.decode(ids);
            let mut tail = d.detok.finish(decode)?.unwrap_or_default();
            match d.stops.push(&tail) {
                StopCheck::Continue(t) | StopCheck::Stop(t, _) => tail = t,
            }
            tail.push_str(&d.stops.flush());
            if !tail.is_empty() {
                on_event(GenEvent::Text(&tail));
            }
        }
        d.out.finish = finish;
        d.out.decode_time = d.decode_start.elapsed();
        // The last token chosen was never fed back: the cache holds the rest.
        d.history.truncate(self.model.kv_len());
        self.cached = d.history;
        self.prompt_len = d.out.prompt_tokens;
        Ok(d.out)
    }
}

/// What a generation runs in a batched pass ([`step_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// The next chunk of its prompt (`prefill_chunk` tokens at most).
    Prompt,
    /// The token [`Engine::choose`] chose.
    Token(u32),
}

/// One pass of several generations at once: each engine's tokens (a chosen
/// token, or its prompt's next chunk) run through the weights they share in
/// one `Model::forward_batch`, and the logits of each generation that has
/// its whole prompt in the cache go to it, for [`Engine::choose`]. A
/// batching worker prefills newcomers this way between decode steps, so a
/// long prompt holds the others up for one chunk per pass. The engines must
/// be replicas of one load; their generations' `Prefilled` progress is
/// [`Decoding::prefill_progress`].
pub fn step_batch(batch: &mut [(&mut Engine, &mut Decoding, Feed)]) -> Result<(), EngineError> {
    let tokens: Vec<Vec<u32>> = batch
        .iter()
        .map(|(e, d, feed)| match feed {
            Feed::Token(t) => vec![*t],
            Feed::Prompt => {
                let done = e.model.kv_len();
                let n = d.params.prefill_chunk.min(d.history.len() - done);
                d.history[done..done + n].to_vec()
            }
        })
        .collect();
    let runs: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
    let logits = {
        let mut models: Vec<&mut Model> = batch.iter_mut().map(|(e, _, _)| &mut e.model).collect();
        Model::forward_batch(&mut models, &runs)?
    };
    for (i, (e, d, feed)) in batch.iter_mut().enumerate() {
        if *feed == Feed::Prompt && e.model.kv_len() < d.history.len() {
            continue;
        }
        d.prefilled = true;
        d.logits = Some(logits.narrow(0, i, 1)?);
    }
    Ok(())
}

/// One pass of several generations through a fixed-shape decoder (the
/// step a CUDA graph replays; see `decoder::StaticDecoder`), each its own
/// slot (`batch[i].3`, distinct). A generation still prefilling runs its
/// prompt's next chunk through its own engine's model, and when the prompt
/// is in, its slot takes the cache over; every generation with a chosen
/// token runs it in the slot, all of them in one step of the first slots
/// (rounded up to a power of two, so a few graphs serve every batch).
/// Logits go to each generation as in [`step_batch`]; before
/// [`Engine::finish`], [`Engine::reclaim`] hands the slot's positions back
/// to the engine's cache.
///
/// With `ahead` (a GPU, where a step's launch returns before it runs),
/// when every generation with a token takes the device's greedy token,
/// the pass runs one step ahead: it takes the results of the step the
/// last pass launched, launches the next at once with the tokens just
/// read, and leaves the host to report those tokens while the device
/// works. A generation that ends meanwhile had one token run for nothing;
/// [`Engine::reclaim`] takes its position back. A generation whose token
/// is in the step launched now has no logits after the pass (`d.logits`
/// is `None`): its result comes with the next pass.
pub fn step_fixed(
    fixed: &mut StaticDecoder,
    batch: &mut [(&mut Engine, &mut Decoding, Feed, usize)],
    ahead: bool,
) -> Result<(), EngineError> {
    let greedy = |d: &Decoding| {
        d.sampler.params().is_argmax() && d.params.logprobs.is_none() && d.cursor.is_none()
    };
    // Generations whose next token the step leaves on the device: greedy
    // ones (the argmax), and on CUDA sampled ones (drawn there).
    let draws = fixed.draws_on_device();
    let on_device = |d: &Decoding| {
        greedy(d)
            || (draws
                && d.params.logprobs.is_none()
                && d.cursor.is_none()
                && pick::device_draws(&d.sampler))
    };
    // The token a generation's step result gives: the greedy one, or the
    // drawn one (`None`: the host chooses from the logits).
    let result = |d: &Decoding, slot: usize, tokens: &[u32], drawn: &[u32]| {
        if greedy(d) {
            tokens.get(slot).copied()
        } else if on_device(d) {
            drawn.get(slot).copied().filter(|&t| t != pick::UNDECIDED)
        } else {
            None
        }
    };
    // The results of the step launched ahead last pass, for the
    // generations whose token it ran.
    let mut done = vec![false; batch.len()];
    if let Some(a) = fixed.take_ahead() {
        let (tokens, drawn) = fixed.drawn(a.rows)?;
        let mut taken = vec![false; a.fed.len()];
        for (i, (_, d, f, slot)) in batch.iter_mut().enumerate() {
            if let Feed::Token(t) = *f {
                if a.fed.get(*slot).copied().flatten() == Some(t) {
                    let row = a.logits.narrow(0, *slot, 1)?;
                    d.chosen = result(d, *slot, &tokens, &drawn);
                    // A row the device could not draw from: the host
                    // chooses from a copy (the step launched next reuses
                    // the logits buffer).
                    d.logits = Some(match d.chosen {
                        Some(_) => row,
                        None => row.to_device(&Device::Cpu)?,
                    });
                    done[i] = true;
                    taken[*slot] = true;
                }
            }
        }
        for (slot, fed) in a.fed.iter().enumerate() {
            if fed.is_some() && !taken[slot] {
                fixed.unstep(slot)?;
            }
        }
    }
    let ahead = ahead
        && batch
            .iter()
            .all(|(_, d, f, _)| *f == Feed::Prompt || on_device(d));
    if !ahead {
        // Their kernels queue before the step's: the device runs both
        // while the host waits for the step's tokens.
        prefill_fixed(fixed, batch)?;
    }
    // What the step runs: the tokens chosen for it and, ahead, the tokens
    // just read (those of a generation that surely goes on for a token:
    // the speculative step must not be its last past the budget or the
    // slot's room).
    let mut feed: Vec<Option<u32>> = vec![None; fixed.slots()];
    // Slots whose token is the one the last step left on the device.
    let mut resident = vec![false; fixed.slots()];
    // How the sampled rows draw on the device.
    let mut draw_rows: Vec<Option<pick::DrawRow>> = vec![None; fixed.slots()];
    let mut rows = 0;
    for (i, (_, d, f, slot)) in batch.iter_mut().enumerate() {
        let Feed::Token(t) = *f else { continue };
        let token = if done[i] {
            let room = fixed.len(*slot).is_some_and(|l| l + 1 < fixed.capacity());
            let budget = d.out.tokens.len() + 1 < d.params.max_tokens;
            d.chosen.filter(|_| ahead && room && budget)
        } else if d.adopted {
            Some(t)
        } else {
            return Err(EngineError::InvalidParams(
                "a token for a slot that holds no prompt".into(),
            ));
        };
        if token.is_some() {
            feed[*slot] = token;
            resident[*slot] = done[i];
            rows = rows.max(*slot + 1);
            if on_device(d) && !greedy(d) {
                // The token this step's logits choose goes at the end of
                // the history, after the one fed (not in it yet when it
                // came from the last step).
                let position = d.history.len() + usize::from(done[i]);
                draw_rows[*slot] = Some(pick::DrawRow::new(&d.sampler, position));
            }
        }
    }
    fixed.set_draws(&draw_rows);
    if rows > 0 {
        let rows = rows.next_power_of_two().min(fixed.slots());
        // The longest context's RoPE tables cover every row's position (a
        // model served longer gives engines taken since more of them).
        let model = batch
            .iter()
            .filter(|(_, _, f, _)| matches!(f, Feed::Token(_)))
            .map(|(e, ..)| &e.model)
            .max_by_key(|m| m.context())
            .expect("a token row");
        if ahead {
            // Every row running on from the last step (the steady state):
            // nothing to upload.
            let resident = resident[..rows].iter().all(|&r| r);
            fixed.step_ahead(model, rows, &feed[..rows], resident)?;
        } else {
            let logits = fixed.step(model, rows, Some(&feed[..rows]))?;
            // Rows whose token the device chose (the argmax or a draw)
            // take it: read once.
            let stepped = batch
                .iter()
                .zip(&done)
                .any(|((_, d, f, _), done)| !done && matches!(f, Feed::Token(_)) && on_device(d));
            let (tokens, drawn) = if stepped {
                fixed.drawn(rows)?
            } else {
                (Vec::new(), Vec::new())
            };
            for (i, (_, d, f, slot)) in batch.iter_mut().enumerate() {
                if !done[i] && matches!(f, Feed::Token(_)) {
                    d.logits = Some(logits.narrow(0, *slot, 1)?);
                    d.chosen = result(d, *slot, &tokens, &drawn);
                }
            }
        }
    }
    if ahead {
        // Ahead, their chunks queue behind the step.
        prefill_fixed(fixed, batch)?;
    }
    Ok(())
}

/// The prompts of a fixed-step pass ([`step_fixed`]): each runs its next
/// chunk through its engine's model, all of them in one batched pass (one
/// launch of every kernel for all newcomers instead of one per prompt: a
/// GPU's prefill is bound by launches at these sizes); a prompt that is in
/// moves to its slot.
fn prefill_fixed(
    fixed: &mut StaticDecoder,
    batch: &mut [(&mut Engine, &mut Decoding, Feed, usize)],
) -> Result<(), EngineError> {
    // With the fused kernels (CUDA) prompts go straight into their slots;
    // one that fills the context does not take one (below).
    let (mut into_slots, mut prompts): (Vec<_>, Vec<_>) = batch
        .iter_mut()
        .filter(|(_, _, f, _)| *f == Feed::Prompt)
        .partition(|(_, d, ..)| fixed.is_fused() && d.history.len() < fixed.capacity());
    if !into_slots.is_empty() {
        prefill_slots(fixed, &mut into_slots)?;
    }
    if prompts.is_empty() {
        return Ok(());
    }
    let chunks: Vec<std::ops::Range<usize>> = prompts
        .iter()
        .map(|(e, d, ..)| {
            let done = e.model.kv_len();
            done..done + d.params.prefill_chunk.min(d.history.len() - done)
        })
        .collect();
    let logits = if let [(e, d, ..)] = &mut prompts[..] {
        e.model
            .forward(&d.history[chunks[0].clone()], LogitsFor::Last)?
    } else {
        let mut runs: Vec<&[u32]> = Vec::with_capacity(prompts.len());
        let mut models: Vec<&mut Model> = Vec::with_capacity(prompts.len());
        for ((e, d, ..), c) in prompts.iter_mut().zip(&chunks) {
            runs.push(&d.history[c.clone()]);
            models.push(&mut e.model);
        }
        Model::forward_batch(&mut models, &runs)?
    };
    for (i, ((e, d, _, slot), c)) in prompts.iter_mut().zip(&chunks).enumerate() {
        if c.end < d.history.len() {
            continue;
        }
        // A prompt that fills the context takes no slot: its one token
        // ends it (`ContextFull`), as on the plain path.
        if d.history.len() < fixed.capacity() {
            into_slot(fixed, *slot, e, d)?;
        }
        d.prefilled = true;
        d.logits = Some(logits.narrow(0, i, 1)?);
    }
    Ok(())
}

/// The prompts of a fixed-step pass whose next chunks the fused kernels
/// run straight into their slots, all in one pass
/// ([`StaticDecoder::prefill`]). A slot is taken at a prompt's first
/// chunk, with what its engine's cache holds of it (a conversation's
/// earlier turns) copied in.
fn prefill_slots(
    fixed: &mut StaticDecoder,
    prompts: &mut [&mut (&mut Engine, &mut Decoding, Feed, usize)],
) -> Result<(), EngineError> {
    for (e, d, _, slot) in prompts.iter_mut() {
        if !d.adopted {
            into_slot(fixed, *slot, e, d)?;
        }
    }
    let chunks: Vec<std::ops::Range<usize>> = prompts
        .iter()
        .map(|(_, d, ..)| {
            d.in_slot..d.in_slot + d.params.prefill_chunk.min(d.history.len() - d.in_slot)
        })
        .collect();
    let runs: Vec<(usize, &[u32])> = prompts
        .iter()
        .zip(&chunks)
        .map(|((_, d, _, slot), c)| (*slot, &d.history[c.clone()]))
        .collect();
    // The longest context's RoPE tables cover every row's position.
    let model = prompts
        .iter()
        .map(|(e, ..)| &e.model)
        .max_by_key(|m| m.context())
        .expect("a prompt");
    let logits = fixed.prefill(model, &runs)?;
    for (i, ((_, d, ..), c)) in prompts.iter_mut().zip(&chunks).enumerate() {
        d.in_slot = c.end;
        if c.end == d.history.len() {
            d.prefilled = true;
            d.logits = Some(logits.narrow(0, i, 1)?);
        }
    }
    Ok(())
}

/// Slot `slot` holds `d`'s sequence from now on: what `e`'s cache holds of
/// it is copied in and the engine's copy dropped (it would only double the
/// memory until the generation ends, and the engine claims no cached
/// prefix meanwhile).
fn into_slot(
    fixed: &mut StaticDecoder,
    slot: usize,
    e: &mut Engine,
    d: &mut Decoding,
) -> Result<(), EngineError> {
    fixed.adopt(slot, &e.model)?;
    d.in_slot = e.model.kv_len();
    e.model.clear_kv();
    e.cached.clear();
    d.adopted = true;
    Ok(())
}

/// A generation in progress on an engine (see [`Engine::begin`]).
#[derive(Debug)]
pub struct Decoding {
    out: Generation,
    params: GenParams,
    start: Instant,
    /// The positions it may use.
    context: usize,
    sampler: Sampler,
    route: pick::Route,
    cursor: Option<json::Cursor>,
    json_choices: usize,
    /// The prompt, then the tokens generated.
    history: Vec<u32>,
    detok: Detokenizer,
    stops: StopMatcher,
    decode_start: Instant,
    prefilled: bool,
    /// Its cache lives in a fixed decoder's slot ([`step_fixed`]).
    adopted: bool,
    /// Positions of its prompt in that slot (the fused prefill writes
    /// them there, not into the engine's cache).
    in_slot: usize,
    /// The logits the next token is chosen from.
    pub logits: Option<candle_core::Tensor>,
    /// Their argmax, when a fixed step already read it for its rows (one
    /// copy for the batch instead of a reduction and a copy per row).
    chosen: Option<u32>,
}

impl Decoding {
    /// Is the whole prompt in the cache?
    pub fn prefilled(&self) -> bool {
        self.prefilled
    }

    /// The prompt's tokens in `engine`'s cache, of how many (what
    /// `GenEvent::Prefilled` reports).
    pub fn prefill_progress(&self, engine: &Engine) -> (usize, usize) {
        let done = if self.adopted {
            self.in_slot
        } else {
            engine.model.kv_len()
        };
        (done, self.out.prompt_tokens)
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.out.tokens.len()
    }
}

/// What [`Engine::choose`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Run this token through the model; its logits choose the next.
    Feed(u32),
    Done(FinishReason),
}

/// The indices of a chat's oldest turn: its first message that is neither a
/// system message nor the last message, and the messages after it up to the
/// next user message (so what stays still starts with a user turn, as
/// templates like Gemma's require). Empty when nothing may go.
fn droppable_turn(messages: &[Message]) -> Vec<usize> {
    let last = messages.len().saturating_sub(1);
    let mut turn = Vec::new();
    for (i, m) in messages.iter().enumerate().take(last) {
        if m.role == "system" {
            continue;
        }
        if !turn.is_empty() && m.role == "user" {
            break;
        }
        turn.push(i);
    }
    turn
}

/// What a model file is, from its metadata alone (no weights read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFacts {
    pub architecture: String,
    /// llama.cpp's name for the file type (`Q4_K_M`), else the type most of
    /// the weights have.
    pub quantization: String,
    pub parameters: u64,
    pub context_length: u64,
    /// The template the model is served with.
    pub chat_template: String,
    /// `file`, or which built-in template stands in for a missing one.
    pub template_origin: String,
}

/// llama.cpp's `general.file_type` names (`llama_ftype`).
fn file_type_name(t: u64) -> Option<&'static str> {
    Some(match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        _ => return None,
    })
}

/// Read what `path` is.
pub fn file_facts(path: &Path) -> Result<FileFacts, EngineError> {
    let gguf = gguf::GgufFile::open(path)?;
    let architecture = gguf.architecture()?.to_owned();
    let mut parameters = 0u64;
    // Bytes per weight type, to name the dominant one.
    let mut by_type: Vec<(String, u64)> = Vec::new();
    for name in gguf.tensor_names() {
        if let Some(t) = gguf.tensor_info(name) {
            parameters += t.shape.iter().product::<usize>() as u64;
            let ty = format!("{:?}", t.dtype).to_uppercase();
            match by_type.iter_mut().find(|(n, _)| *n == ty) {
                Some((_, b)) => *b += t.size as u64,
                None => by_type.push((ty, t.size as u64)),
            }
        }
    }
    let quantization = gguf
        .get_u64("general.file_type")
        .ok()
        .and_then(file_type_name)
        .map(str::to_owned)
        .or_else(|| by_type.into_iter().max_by_key(|(_, b)| *b).map(|(n, _)| n))
        .unwrap_or_default();
    let (chat_template, origin) = ChatTemplate::source_of(&gguf)?;
    Ok(FileFacts {
        context_length: gguf
            .get_u64(&format!("{architecture}.context_length"))
            .unwrap_or(0),
        chat_template,
        template_origin: match origin {
            template::TemplateSource::File => "file".into(),
            template::TemplateSource::Fallback(name) => {
                format!("built-in {name} (the file has none)")
            }
        },
        architecture,
        quantization,
        parameters,
    })
}

/// What loading a model will cost in memory, estimated from its GGUF file
/// before loading it (the daemon's memory governor decides with this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Shared by every worker: the tensors (on the CPU Candle keeps a
    /// repacked copy of each quantized one next to the original), the
    /// tokenizer.
    pub weights: u64,
    /// Each worker's own: a full-context f32 KV cache and activation buffers
    /// for one prefill chunk.
    pub per_worker: u64,
    /// The positions it would serve (the context asked for, capped at the
    /// model's trained context).
    pub context: usize,
}

/// On the CPU a quantized tensor lives twice: as read, and repacked for
/// Candle's kernels (measured on Q4_K_M files).
const CPU_QUANT_COPIES: u64 = 2;

/// Estimate the memory of `path` served with `context` positions and
/// `prefill_chunk`-token chunks on `device`.
pub fn memory_estimate(
    path: &Path,
    context: Option<usize>,
    prefill_chunk: usize,
    device: &Device,
) -> Result<MemoryEstimate, EngineError> {
    let gguf = gguf::GgufFile::open(path)?;
    let context = context.unwrap_or(DEFAULT_CONTEXT);
    let spec = models::spec(&gguf, context)?;
    let served = context.min(spec.max_context).max(1);
    let context = served as u64;
    let copies = if device.is_cpu() { CPU_QUANT_COPIES } else { 1 };
    let mut tensors = 0u64;
    for name in gguf.tensor_names() {
        if let Some(t) = gguf.tensor_info(name) {
            let quantized = !matches!(
                t.dtype,
                candle_core::quantized::GgmlDType::F32 | candle_core::quantized::GgmlDType::F16
            );
            tensors += t.size as u64 * if quantized { copies } else { 1 };
        }
    }
    // A tokenizer pipeline costs a few hundred bytes per vocabulary entry.
    let tokenizer = spec.vocab as u64 * 256;
    let (h, f, v) = (spec.hidden as u64, spec.ffn as u64, spec.vocab as u64);
    let kv = spec.layers as u64 * 2 * spec.kv_heads as u64 * spec.head_dim as u64 * context * 4;
    let chunk = prefill_chunk.max(1) as u64;
    let q = (spec.heads * spec.head_dim) as u64;
    // Per chunk row: residual, norms, q/k/v, attention out, gate/up/down.
    let activations = chunk * (6 * h + 3 * q + 3 * f) * 4;
    // Logits of one row, and the sampler's copy.
    let logits = 2 * v * 4;
    Ok(MemoryEstimate {
        weights: tensors + tokenizer,
        per_worker: kv + activations + logits,
        context: served,
    })
}

/// One batched prefill and one decode step, so that every kernel and weight
/// packing the first request needs already exists; leaves the cache empty.
pub(crate) fn warm_up(model: &mut Model, bos: Option<u64>) -> Result<(), EngineError> {
    let n = WARMUP_TOKENS.min(model.context().saturating_sub(1)).max(1);
    let last = model.vocab() as u32 - 1;
    let tokens: Vec<u32> = std::iter::once(bos.map_or(0, |b| b as u32))
        .chain((1..n as u32).map(|i| 1000 + i))
        .map(|t| t.min(last))
        .collect();
    model.clear_kv();
    let logits = model.forward(&tokens, LogitsFor::Last)?;
    if !logits.device().is_cpu() {
        // The device routes' kernels (reduce, sort, gather) are compiled on
        // first use too: here, not in the first request.
        let row = logits.flatten_all()?.to_dtype(DType::F32)?;
        row.argmax(0)?.to_scalar::<u32>()?;
        pick::TopK::default().select(&row, pick::TOP_MAX)?;
        #[cfg(feature = "cuda")]
        {
            let nucleus = SamplingParams {
                top_k: 0,
                ..SamplingParams::default()
            };
            pick::cuda::draw(&row, &nucleus, 0.5)?;
        }
    }
    if model.kv_len() < model.context() {
        model.forward(&tokens[..1], LogitsFor::Last)?;
    }
    model.clear_kv();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(roles: &[&str]) -> Vec<Message> {
        roles
            .iter()
            .enumerate()
            .map(|(i, r)| Message::new(*r, format!("m{i}")))
            .collect()
    }

    #[test]
    fn the_oldest_turn_is_a_user_message_and_its_replies_never_system_or_last() {
        let turn = |roles: &[&str]| droppable_turn(&chat(roles));
        assert_eq!(turn(&["system", "user", "assistant", "user"]), [1, 2]);
        assert_eq!(
            turn(&["user", "assistant", "user", "assistant", "user"]),
            [0, 1]
        );
        // A system message inside the turn stays.
        assert_eq!(turn(&["user", "system", "assistant", "user"]), [0, 2]);
        // A reply without its question goes alone.
        assert_eq!(turn(&["system", "assistant", "user"]), [1]);
        // The last message always stays, with the system messages.
        assert!(turn(&["system", "user"]).is_empty());
        assert!(turn(&["user"]).is_empty());
        assert!(turn(&[]).is_empty());
        assert_eq!(turn(&["user", "assistant"]), [0]);
    }
}
