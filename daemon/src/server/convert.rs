//! Protocol types to engine types and engine errors to wire errors: the one
//! place the two vocabularies meet.

use std::sync::Arc;

use paraphym_protocol::message::{
    ErrorKind, Format, GenStats, Generate, Overflow, Prompt as WirePrompt, StopReason, WireError,
};

use crate::engine::json;

use crate::engine::{
    ChatOptions, EngineError, FinishReason, GenParams, Generation, Message, SamplingParams,
};

/// Stop strings per request, at most.
const MAX_STOPS: usize = 16;

/// A session name's length, at most (bytes).
pub const MAX_SESSION: usize = 256;

/// An owned prompt for a worker.
#[derive(Debug, Clone)]
pub enum OwnedPrompt {
    Text(String),
    Chat(Vec<Message>, ChatOptions),
    Tokens(Vec<u32>),
}

impl OwnedPrompt {
    /// The prompt's text (test hooks match on it).
    pub fn text_for_hooks(&self) -> String {
        match self {
            OwnedPrompt::Text(t) => t.clone(),
            OwnedPrompt::Chat(m, _) => m.iter().map(|m| m.content.as_str()).collect(),
            OwnedPrompt::Tokens(_) => String::new(),
        }
    }

    pub fn as_prompt(&self) -> crate::engine::Prompt<'_> {
        match self {
            OwnedPrompt::Text(t) => crate::engine::Prompt::Text(t),
            OwnedPrompt::Chat(m, o) => crate::engine::Prompt::Chat(m, o),
            OwnedPrompt::Tokens(t) => crate::engine::Prompt::Tokens(t),
        }
    }
}

/// What a worker needs to run one generation.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: OwnedPrompt,
    pub params: GenParams,
    /// The conversation (a hint for choosing the engine whose cache to use).
    pub session: Option<String>,
    /// Drop a chat's oldest turns rather than refuse it past the context.
    pub drop_oldest: bool,
}

pub fn bad(message: impl Into<String>) -> WireError {
    WireError {
        kind: ErrorKind::BadRequest,
        message: message.into(),
    }
}

/// Validate a `Generate` and turn it into engine terms. Unset options take
/// llama.cpp's defaults (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05).
pub fn generation(g: &Generate) -> Result<GenRequest, WireError> {
    let prompt = match &g.prompt {
        WirePrompt::Raw(t) => OwnedPrompt::Text(t.clone()),
        WirePrompt::Tokens(t) => OwnedPrompt::Tokens(t.clone()),
        WirePrompt::Chat { messages, think } => {
            if messages.is_empty() {
                return Err(bad("a chat prompt needs at least one message"));
            }
            let mut converted = Vec::with_capacity(messages.len());
            for m in messages {
                let mut msg = Message::new(m.role.clone(), m.content.clone());
                for call in &m.tool_calls {
                    let arguments: serde_json::Value = serde_json::from_str(&call.arguments)
                        .map_err(|e| {
                            bad(format!(
                                "tool call {}: its arguments are not JSON: {e}",
                                call.name
                            ))
                        })?;
                    msg.tool_calls.push(serde_json::json!({
                        "type": "function",
                        "function": {"name": call.name, "arguments": arguments},
                    }));
                }
                converted.push(msg);
            }
            let mut tools = Vec::with_capacity(g.options.tools.len());
            for t in &g.options.tools {
                let parameters: serde_json::Value = if t.parameters.trim().is_empty() {
                    serde_json::json!({"type": "object", "properties": {}})
                } else {
                    serde_json::from_str(&t.parameters).map_err(|e| {
                        bad(format!("tool {}: its parameters are not JSON: {e}", t.name))
                    })?
                };
                let mut function = serde_json::json!({"name": t.name});
                if !t.description.is_empty() {
                    function["description"] = serde_json::json!(t.description);
                }
                function["parameters"] = parameters;
                tools.push(serde_json::json!({"type": "function", "function": function}));
            }
            OwnedPrompt::Chat(
                converted,
                ChatOptions {
                    add_generation_prompt: true,
                    enable_thinking: *think,
                    tools: Arc::new(tools),
                },
            )
        }
    };
    let o = &g.options;
    if !o.tools.is_empty() && !matches!(prompt, OwnedPrompt::Chat(..)) {
        return Err(bad("tools need a chat prompt"));
    }
    let d = SamplingParams::default();
    let sampling = SamplingParams {
        temperature: o.temperature.unwrap_or(d.temperature),
        top_k: o.top_k.map_or(d.top_k, |k| k as usize),
        top_p: o.top_p.unwrap_or(d.top_p),
        min_p: o.min_p.unwrap_or(d.min_p),
        repeat_penalty: o.repeat_penalty.unwrap_or(d.repeat_penalty),
        presence_penalty: o.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: o.frequency_penalty.unwrap_or(d.frequency_penalty),
        repeat_last_n: d.repeat_last_n,
        seed: o.seed,
    };
    sampling.validate().map_err(|e| bad(e.to_string()))?;
    if o.stop.len() > MAX_STOPS {
        return Err(bad(format!("at most {MAX_STOPS} stop strings")));
    }
    if o.stop.iter().any(|s| s.is_empty()) {
        return Err(bad("stop strings must not be empty"));
    }
    if o.max_tokens == Some(0) {
        return Err(bad("max_tokens must be at least 1"));
    }
    if o.context == Some(0) {
        return Err(bad("context (num_ctx) must be at least 1"));
    }
    if o.logprobs
        .is_some_and(|n| usize::from(n) > crate::engine::MAX_TOP_LOGPROBS)
    {
        return Err(bad(format!(
            "logprobs: at most {} alternatives",
            crate::engine::MAX_TOP_LOGPROBS
        )));
    }
    let json = match &o.format {
        Format::Text => None,
        Format::Json => Some(Arc::new(json::Shape::object())),
        Format::JsonSchema(text) => {
            let schema: serde_json::Value = serde_json::from_str(text)
                .map_err(|e| bad(format!("format: the JSON schema does not parse: {e}")))?;
            Some(Arc::new(
                json::Shape::from_schema(&schema).map_err(|e| bad(e.to_string()))?,
            ))
        }
    };
    if g.session.as_ref().is_some_and(|s| s.len() > MAX_SESSION) {
        return Err(bad(format!(
            "a session name has at most {MAX_SESSION} bytes"
        )));
    }
    let defaults = GenParams::default();
    Ok(GenRequest {
        session: g.session.clone(),
        drop_oldest: o.overflow == Overflow::DropOldest,
        prompt,
        params: GenParams {
            sampling,
            max_tokens: o.max_tokens.map_or(defaults.max_tokens, |n| n as usize),
            stop: o.stop.clone(),
            ignore_eos: o.ignore_eos,
            logprobs: o.logprobs.map(usize::from),
            json,
            context: o.context.map(|c| c as usize),
            ..defaults
        },
    })
}

/// An engine error as the client sees it.
pub fn engine_error(e: &EngineError) -> WireError {
    let kind = match e {
        EngineError::PromptTooLong { .. } | EngineError::LastTurnTooLong { .. } => {
            ErrorKind::ContextOverflow
        }
        EngineError::EmptyPrompt | EngineError::InvalidParams(_) | EngineError::Template(_) => {
            ErrorKind::BadRequest
        }
        EngineError::ModelFile { .. } | EngineError::Io { .. } => ErrorKind::ModelFailed,
        EngineError::Tokenizer(_) | EngineError::Candle(_) => ErrorKind::Internal,
    };
    WireError {
        kind,
        message: e.to_string(),
    }
}

pub fn logprobs(lp: &crate::engine::TokenLogprobs) -> paraphym_protocol::message::TokenLogprob {
    paraphym_protocol::message::TokenLogprob {
        token: lp.token,
        bytes: lp.bytes.clone(),
        logprob: lp.logprob,
        top: lp
            .top
            .iter()
            .map(
                |(token, bytes, logprob)| paraphym_protocol::message::TopLogprob {
                    token: *token,
                    bytes: bytes.clone(),
                    logprob: *logprob,
                },
            )
            .collect(),
    }
}

pub fn stats(g: &Generation, time_to_first_token_us: u64, dropped_messages: usize) -> GenStats {
    GenStats {
        prompt_tokens: g.prompt_tokens as u32,
        generated_tokens: g.tokens.len() as u32,
        time_to_first_token_us,
        prefill_tokens_per_s: g.prefill_tps() as f32,
        decode_tokens_per_s: g.decode_tps() as f32,
        stop: match g.finish {
            FinishReason::EndOfGeneration => StopReason::EndOfGeneration,
            FinishReason::MaxTokens => StopReason::MaxTokens,
            FinishReason::StopString(i) => StopReason::StopString(i as u32),
            FinishReason::ContextFull => StopReason::ContextFull,
            FinishReason::Cancelled => StopReason::Cancelled,
        },
        cached_tokens: g.reused_tokens as u32,
        dropped_messages: dropped_messages as u32,
    }
}
