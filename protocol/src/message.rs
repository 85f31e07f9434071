//! The messages. Every client message carries a request id chosen by the
//! client; every daemon message names the request it answers, so one
//! connection can run several generations and an event subscription at once.
//! Variant order is part of the wire format (the encoded variant index):
//! append, never reorder.

use serde::{Deserialize, Serialize};

/// Chosen by the client, unique among its connection's open requests.
pub type RequestId = u64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientMsg {
    pub id: RequestId,
    pub request: Request,
}

// One per request on its way through, never stored in bulk: boxing the
// large variant would buy nothing but an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Answered by `Token`s, then `Done` or `Error`.
    Generate(Generate),
    /// Stop the generation with this id; it ends with `Done` (stop `Cancelled`).
    Cancel {
        target: RequestId,
    },
    ListModels,
    Status,
    /// Load a model (a reference, docs/MODELS.md) and keep it warm.
    Load {
        model: String,
        keep_alive_ms: Option<u64>,
        /// Serve at least this many positions (Ollama's `num_ctx`; capped
        /// at the model's trained context). `None`: as loaded, else the
        /// daemon's `--context`. Since protocol version 4.
        context: Option<u32>,
    },
    Unload {
        model: String,
    },
    Health,
    /// Answered by `Event`s until the connection closes.
    Subscribe,
    /// Stop the daemon: in-flight requests get an `Error` (`ShuttingDown`).
    Shutdown,
    /// Download a model into the local cache: answered by `Progress`es, then
    /// `Pulled` or `Error`. Resumes a partial download.
    Pull {
        model: String,
    },
    /// What a model is: answered by `Details` or `Error` (v3).
    Show {
        model: String,
    },
    /// Delete a model the daemon downloaded (unloading it first): answered
    /// by `Removed` or `Error`. Files it did not download are never deleted (v3).
    Remove {
        model: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generate {
    /// A model reference; `None` for the daemon's default.
    pub model: Option<String>,
    pub prompt: Prompt,
    pub options: Options,
    /// How long the model stays warm after this request (`None`: the default).
    pub keep_alive_ms: Option<u64>,
    /// The conversation this turn belongs to (any client-chosen name, at most
    /// 256 bytes): the daemon prefers the cache that served its last turn.
    /// A hint only: without it, or when that cache is busy or gone, the
    /// longest cached prefix still wins and the output is the same. Since
    /// protocol version 3.
    pub session: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Prompt {
    /// Raw completion: the text as is.
    Raw(String),
    /// A conversation rendered with the model's chat template.
    Chat {
        messages: Vec<ChatMessage>,
        /// Qwen3's thinking switch (`None`: the template's default).
        think: Option<bool>,
    },
    /// Token ids as they are (benchmarks, clients with their own tokenizer).
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool` (a tool's answer).
    pub role: String,
    pub content: String,
    /// The tools an assistant turn called (v3).
    pub tool_calls: Vec<ToolCall>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
        }
    }
}

/// A function the model may call (OpenAI's function tool).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tool {
    pub name: String,
    pub description: String,
    /// Its parameters' JSON schema, as JSON text.
    pub parameters: String,
}

/// A call the model made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub name: String,
    /// The arguments, a JSON object as text.
    pub arguments: String,
}

/// Sampling and stopping; `None` means the daemon's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Options {
    pub temperature: Option<f32>,
    pub top_k: Option<u32>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
    /// What to do with a chat that no longer fits the context. Since
    /// protocol version 3.
    pub overflow: Overflow,
    /// Subtracted from the logits of tokens among the last 64 (v3).
    pub presence_penalty: Option<f32>,
    /// Subtracted per occurrence among the last 64 (v3).
    pub frequency_penalty: Option<f32>,
    /// Send each generated token's log-probability and this many of the most
    /// likely alternatives (at most 20) as `Logprobs` frames (v3).
    pub logprobs: Option<u8>,
    /// Constrain the output's shape (v3).
    pub format: Format,
    /// Functions the model may call (chat prompts, templates that take
    /// tools); its calls come back as text the client parses (v3).
    pub tools: Vec<Tool>,
    /// The positions this request may use, prompt and reply together
    /// (Ollama's `num_ctx`), capped at the model's trained context. Past
    /// what the model is served with, it is served with more (if the memory
    /// budget allows; the model stays that way until it unloads); below, the
    /// request is held to it. `None`: the model's served context (v4).
    pub context: Option<u32>,
}

/// What the output must be.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Format {
    #[default]
    Text,
    /// One JSON value (an object, as OpenAI's JSON mode).
    Json,
    /// One JSON value valid against this JSON Schema (a JSON document).
    JsonSchema(String),
}

/// The policy for a prompt past the model's context: never a silent cut.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Overflow {
    /// Refuse it with `ContextOverflow`.
    #[default]
    Error,
    /// For chat prompts: drop the oldest turns (a user message and the
    /// replies after it; system messages and the last message stay) until
    /// the prompt leaves room for `max_tokens` (at most half the context).
    /// `GenStats::dropped_messages` says how many went; `ContextOverflow` if
    /// even the system messages and the last message do not fit.
    DropOldest,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonMsg {
    /// The request answered (0 for messages that answer none).
    pub id: RequestId,
    pub response: Response,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Newly generated text: whole UTF-8 characters, stop strings withheld.
    Token {
        text: String,
    },
    /// The generation ended.
    Done(GenStats),
    Error(WireError),
    Models(Vec<ModelInfo>),
    Status(StatusReport),
    Loaded {
        model: String,
    },
    Unloaded {
        model: String,
    },
    Health(HealthReport),
    Event(Event),
    /// Download progress of a `Pull`, in bytes (`total` 0 when unknown).
    Progress {
        done: u64,
        total: u64,
    },
    /// The `Pull` finished: the model's local path.
    Pulled {
        model: String,
        path: String,
    },
    /// Where a generation is before its first token (sent as it changes).
    Stage(Stage),
    /// Log-probabilities of the tokens whose text the next `Token` frame
    /// carries (or, at the end, of tokens with no text of their own), when
    /// `Options::logprobs` asked for them. Since protocol version 3.
    Logprobs(Vec<TokenLogprob>),
    /// The answer to `Show` (v3).
    Details(ModelDetails),
    /// The answer to `Remove`: the file deleted (v3).
    Removed {
        model: String,
        path: String,
    },
}

/// What a model file is, read from its GGUF metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelDetails {
    pub reference: String,
    pub path: String,
    pub architecture: String,
    /// `Q4_K_M`, `Q8_0`, `F16`, ...
    pub quantization: String,
    pub parameters: u64,
    /// The longest context the model was trained for.
    pub context_length: u64,
    /// The context the daemon serves it with.
    pub context: u64,
    pub size_bytes: u64,
    /// The memory governor's estimate with one worker.
    pub memory_bytes: u64,
    /// The chat template (Jinja) the model is served with.
    pub chat_template: String,
    /// `file`, or the built-in template standing in for a missing one.
    pub template_origin: String,
    pub loaded: bool,
}

/// One generated token's log-probability under the model (its logits'
/// log-softmax, before penalties and sampling filters), and the most likely
/// alternatives, most likely first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: u32,
    /// The token's bytes (a piece of a UTF-8 character for byte tokens).
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: u32,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// A generation's progress before its first token, so a slow start never
/// looks like a hang.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Waiting for a worker; 1 means next.
    Queued { position: u32 },
    /// The model is loading.
    Loading { percent: u8 },
    /// `done` of `total` prompt tokens processed.
    Prefill { done: u32, total: u32 },
    /// The prompt is in; tokens follow.
    Generating,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenStats {
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    /// Request received to first token, microseconds, measured by the daemon.
    pub time_to_first_token_us: u64,
    pub prefill_tokens_per_s: f32,
    pub decode_tokens_per_s: f32,
    pub stop: StopReason,
    /// Prompt tokens whose keys and values came from the worker's cache (an
    /// earlier turn of the conversation, a shared system prompt) rather than
    /// a prefill. Since protocol version 2.
    pub cached_tokens: u32,
    /// Chat messages left out to fit the context (`Overflow::DropOldest`).
    /// Since protocol version 3.
    pub dropped_messages: u32,
}

impl GenStats {
    /// A generation cancelled before it started.
    pub fn cancelled() -> Self {
        Self {
            prompt_tokens: 0,
            generated_tokens: 0,
            time_to_first_token_us: 0,
            prefill_tokens_per_s: 0.0,
            decode_tokens_per_s: 0.0,
            stop: StopReason::Cancelled,
            cached_tokens: 0,
            dropped_messages: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    EndOfGeneration,
    MaxTokens,
    /// One of the request's stop strings (its index).
    StopString(u32),
    ContextFull,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub kind: ErrorKind,
    /// For people: what went wrong and what to do.
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The frame or message could not be decoded, or a field is out of range.
    BadRequest,
    UnknownModel,
    /// The prompt does not fit the model's context.
    ContextOverflow,
    /// No worker can take the request (memory budget, circuit breaker open).
    Busy,
    /// The model failed to load or a worker failed.
    ModelFailed,
    ShuttingDown,
    Internal,
    /// A download needs the network and it is unreachable (or HF_HUB_OFFLINE is set).
    Offline,
    /// The Hub refused: a gated or private repository without (enough) token.
    AccessDenied,
    /// The memory budget has no room for the model (now, or ever).
    OutOfMemory,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub reference: String,
    pub path: String,
    pub architecture: String,
    pub size_bytes: u64,
    pub loaded: bool,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StatusReport {
    pub models: Vec<ModelStatus>,
    pub memory_used_bytes: u64,
    pub memory_budget_bytes: u64,
    /// Models whose circuit breaker is not closed (loaded or not).
    pub faults: Vec<ModelFault>,
    /// What the memory governor accounts for the loaded models (estimates;
    /// `memory_used_bytes` is the real resident memory).
    pub memory_estimated_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFault {
    /// The model's file.
    pub model: String,
    pub breaker: BreakerState,
    pub consecutive_failures: u32,
    pub last_error: String,
    /// Until the breaker half-opens (0 when it is half-open).
    pub retry_in_ms: u64,
}

/// A model's circuit breaker: closed (normal), open (requests fail fast),
/// half-open (one trial request decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelStatus {
    pub reference: String,
    pub workers: Vec<WorkerSnapshot>,
    pub queued: u32,
    /// The governor's estimate for this model with its current workers
    /// and conversation caches.
    pub memory_bytes: u64,
    /// Idle engines holding a conversation's KV cache between turns. Since
    /// protocol version 3.
    pub caches: u32,
    /// What those caches hold (bytes of KV buffers).
    pub cache_bytes: u64,
    /// Until the keep-alive unloads it, if it stays idle (`u64::MAX`:
    /// never). Since protocol version 3.
    pub expires_in_ms: u64,
    /// Positions the model is served with now (the daemon's `--context`,
    /// or more once a request asked for more). Since protocol version 4.
    pub context: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerSnapshot {
    pub id: u32,
    pub state: WorkerState,
    pub requests_served: u64,
    pub tokens_per_s: f32,
    /// Requests it decodes now, together in one batched pass. Since
    /// protocol version 5.
    pub sequences: u32,
    /// The most it takes now: the daemon's `--batch`, fewer while the
    /// memory budget has no room for another sequence or while the
    /// throughput measured at larger batches showed the rows past this
    /// many adding nothing. Since protocol version 5.
    pub batch: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerState {
    /// Loading the model's weights (a model's first worker).
    Loading,
    Idle,
    Busy,
    /// Stuck or failing; being replaced.
    Unhealthy,
    /// Draining: finishing what it has, then stopping (retired or unloaded).
    Stopping,
    /// Created, waiting for the model's weights to share (later workers).
    Spawning,
    /// Gone (the last event of a worker).
    Stopped,
    /// Its load failed.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// Serving, no unhealthy worker, no open breaker.
    pub ok: bool,
    pub uptime_ms: u64,
    pub version: String,
    /// Loaded models, and failing ones that are not.
    pub models: Vec<ModelHealth>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelHealth {
    pub model: String,
    pub ok: bool,
    pub breaker: BreakerState,
    /// Workers by state: (state, how many).
    pub workers: Vec<(WorkerState, u32)>,
    /// Why not ok (the breaker's last error, stuck workers), empty when ok.
    pub problem: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    Worker {
        model: String,
        worker: WorkerSnapshot,
    },
    Throughput {
        /// Milliseconds since the daemon started.
        at_ms: u64,
        tokens_per_s: f32,
    },
    /// A model's circuit breaker changed state.
    Breaker {
        /// The model's file.
        model: String,
        state: BreakerState,
        /// Why (the last failure), empty when closing.
        message: String,
    },
    /// A model was unloaded, and why (keep-alive, memory, request).
    ModelUnloaded { model: String, reason: String },
    /// The periodic sample (every second while someone subscribes).
    Metrics(Metrics),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Milliseconds since the daemon started.
    pub at_ms: u64,
    pub memory_used_bytes: u64,
    pub memory_estimated_bytes: u64,
    pub models: Vec<ModelMetrics>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMetrics {
    pub reference: String,
    pub queued: u32,
    /// Tokens per second over the last interval, all workers.
    pub tokens_per_s: f32,
    pub breaker: BreakerState,
    pub workers: Vec<WorkerMetrics>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerMetrics {
    pub id: u32,
    pub state: WorkerState,
    /// Tokens per second over the last interval.
    pub tokens_per_s: f32,
    /// Requests it decodes now, and the most it takes (as in
    /// `WorkerSnapshot`). Since protocol version 5.
    pub sequences: u32,
    pub batch: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode, CodecError};

    fn round_trip<T>(v: T)
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let bytes = encode(&v).unwrap();
        assert_eq!(decode::<T>(&bytes).unwrap(), v);
    }

    #[test]
    fn every_message_round_trips() {
        let gen = Generate {
            model: Some("qwen3:1.7b".into()),
            prompt: Prompt::Chat {
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: "Grüße 😀".into(),
                    tool_calls: Vec::new(),
                }],
                think: Some(false),
            },
            options: Options {
                temperature: Some(0.7),
                seed: Some(42),
                stop: vec!["\n\n".into()],
                overflow: Overflow::DropOldest,
                presence_penalty: Some(0.5),
                logprobs: Some(3),
                format: Format::JsonSchema("{}".into()),
                context: Some(16_384),
                ..Options::default()
            },
            keep_alive_ms: Some(300_000),
            session: Some("chat-1".into()),
        };
        for request in [
            Request::Generate(gen),
            Request::Cancel { target: 7 },
            Request::ListModels,
            Request::Status,
            Request::Load {
                model: "phi4".into(),
                keep_alive_ms: None,
                context: Some(32_768),
            },
            Request::Unload {
                model: "phi4".into(),
            },
            Request::Health,
            Request::Subscribe,
            Request::Shutdown,
            Request::Pull {
                model: "gemma3:270m".into(),
            },
            Request::Show { model: "m".into() },
            Request::Remove { model: "m".into() },
        ] {
            round_trip(ClientMsg { id: 3, request });
        }
        let worker = WorkerSnapshot {
            id: 1,
            state: WorkerState::Busy,
            requests_served: 9,
            tokens_per_s: 31.5,
            sequences: 3,
            batch: 8,
        };
        for response in [
            Response::Token {
                text: "Paris".into(),
            },
            Response::Done(GenStats {
                prompt_tokens: 6,
                generated_tokens: 8,
                time_to_first_token_us: 1234,
                prefill_tokens_per_s: 150.0,
                decode_tokens_per_s: 32.0,
                stop: StopReason::StopString(0),
                cached_tokens: 3,
                dropped_messages: 2,
            }),
            Response::Error(WireError {
                kind: ErrorKind::UnknownModel,
                message: "no such model".into(),
            }),
            Response::Models(vec![]),
            Response::Status(StatusReport {
                models: vec![ModelStatus {
                    reference: "gemma3:270m".into(),
                    workers: vec![worker.clone()],
                    queued: 2,
                    memory_bytes: 1 << 29,
                    caches: 3,
                    cache_bytes: 1 << 20,
                    expires_in_ms: 60_000,
                    context: 8192,
                }],
                memory_used_bytes: 1 << 30,
                memory_budget_bytes: 8 << 30,
                faults: vec![ModelFault {
                    model: "/m.gguf".into(),
                    breaker: BreakerState::Open,
                    consecutive_failures: 3,
                    last_error: "boom".into(),
                    retry_in_ms: 500,
                }],
                memory_estimated_bytes: 1 << 29,
            }),
            Response::Loaded { model: "x".into() },
            Response::Unloaded { model: "x".into() },
            Response::Health(HealthReport {
                ok: false,
                uptime_ms: 5,
                version: "0.1.0".into(),
                models: vec![ModelHealth {
                    model: "m".into(),
                    ok: false,
                    breaker: BreakerState::Open,
                    workers: vec![(WorkerState::Idle, 1), (WorkerState::Unhealthy, 1)],
                    problem: "boom".into(),
                }],
            }),
            Response::Event(Event::Worker {
                model: "x".into(),
                worker,
            }),
            Response::Event(Event::Throughput {
                at_ms: 1,
                tokens_per_s: 2.0,
            }),
            Response::Event(Event::Breaker {
                model: "/m.gguf".into(),
                state: BreakerState::HalfOpen,
                message: String::new(),
            }),
            Response::Event(Event::ModelUnloaded {
                model: "m".into(),
                reason: "idle".into(),
            }),
            Response::Event(Event::Metrics(Metrics {
                at_ms: 9,
                memory_used_bytes: 1,
                memory_estimated_bytes: 2,
                models: vec![ModelMetrics {
                    reference: "m".into(),
                    queued: 1,
                    tokens_per_s: 30.0,
                    breaker: BreakerState::Closed,
                    workers: vec![WorkerMetrics {
                        id: 0,
                        state: WorkerState::Busy,
                        tokens_per_s: 30.0,
                        sequences: 2,
                        batch: 8,
                    }],
                }],
            })),
            Response::Progress { done: 5, total: 10 },
            Response::Pulled {
                model: "m".into(),
                path: "/m.gguf".into(),
            },
            Response::Stage(Stage::Queued { position: 2 }),
            Response::Stage(Stage::Loading { percent: 40 }),
            Response::Stage(Stage::Prefill {
                done: 256,
                total: 1000,
            }),
            Response::Stage(Stage::Generating),
            Response::Details(ModelDetails {
                reference: "gemma3:270m".into(),
                path: "/m.gguf".into(),
                architecture: "gemma3".into(),
                quantization: "Q4_K_M".into(),
                parameters: 268_000_000,
                context_length: 32_768,
                context: 4096,
                size_bytes: 253 << 20,
                memory_bytes: 700 << 20,
                chat_template: "{{ messages }}".into(),
                template_origin: "file".into(),
                loaded: true,
            }),
            Response::Removed {
                model: "m".into(),
                path: "/m.gguf".into(),
            },
            Response::Logprobs(vec![TokenLogprob {
                token: 5,
                bytes: b"Pa".to_vec(),
                logprob: -0.25,
                top: vec![TopLogprob {
                    token: 5,
                    bytes: b"Pa".to_vec(),
                    logprob: -0.25,
                }],
            }]),
        ] {
            round_trip(DaemonMsg { id: 3, response });
        }
    }

    /// The layout docs/PROTOCOL.md promises: fixed-width little-endian
    /// integers, u32 variant indices, u64 string lengths, u8 option tags.
    #[test]
    fn encoding_is_the_documented_one() {
        let msg = ClientMsg {
            id: 0x0102,
            request: Request::Cancel { target: 5 },
        };
        assert_eq!(
            encode(&msg).unwrap(),
            [
                0x02, 0x01, 0, 0, 0, 0, 0, 0, // id: u64
                1, 0, 0, 0, // Request variant 1 (Cancel): u32
                5, 0, 0, 0, 0, 0, 0, 0, // target: u64
            ]
        );
        let msg = DaemonMsg {
            id: 1,
            response: Response::Token { text: "hi".into() },
        };
        assert_eq!(
            encode(&msg).unwrap(),
            [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, b'h', b'i']
        );
        let load = ClientMsg {
            id: 0,
            request: Request::Load {
                model: "m".into(),
                keep_alive_ms: Some(1),
                context: Some(2),
            },
        };
        let bytes = encode(&load).unwrap();
        assert_eq!(&bytes[8..12], &[4, 0, 0, 0]);
        assert_eq!(&bytes[12..21], &[1, 0, 0, 0, 0, 0, 0, 0, b'm']);
        assert_eq!(&bytes[21..30], &[1, 1, 0, 0, 0, 0, 0, 0, 0]);
        // Option<u32>: a tag, then four bytes.
        assert_eq!(&bytes[30..], &[1, 2, 0, 0, 0]);
    }

    #[test]
    fn garbage_and_unknown_variants_are_errors_not_panics() {
        assert!(matches!(
            decode::<ClientMsg>(b""),
            Err(CodecError::Decode(_))
        ));
        let mut unknown = encode(&ClientMsg {
            id: 1,
            request: Request::Health,
        })
        .unwrap();
        unknown[8] = 200; // no such Request variant
        assert!(matches!(
            decode::<ClientMsg>(&unknown),
            Err(CodecError::Decode(_))
        ));
        let mut trailing = encode(&ClientMsg {
            id: 1,
            request: Request::Health,
        })
        .unwrap();
        trailing.push(0);
        assert!(matches!(
            decode::<ClientMsg>(&trailing),
            Err(CodecError::TrailingBytes(1))
        ));
        // A string length far past the payload must not allocate it.
        let mut huge = vec![0u8; 8];
        huge.extend_from_slice(&6u32.to_le_bytes()); // Unload
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<ClientMsg>(&huge).is_err());
    }
}
