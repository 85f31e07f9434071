//! OpenAI-compatible endpoints: `/v1/chat/completions`, `/v1/completions`
//! (server-sent events when `stream`), `/v1/models`. Fields that would change
//! the output and that the engine does not do yet are refused with 400, never
//! ignored.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use paraphym_protocol::message::{
    ChatMessage, ErrorKind, Format, GenStats, Generate, Options, Prompt, StopReason, TokenLogprob,
    Tool, ToolCall, WireError,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    json, read_json, relay, status_of, stream, tools, unix_now, Ctx, Out, Outgoing, Relayed,
};

/// An OpenAI-shaped error body.
fn error(status: StatusCode, message: &str) -> Response<Out> {
    let kind = match status {
        StatusCode::NOT_FOUND => "not_found_error",
        s if s.is_client_error() => "invalid_request_error",
        _ => "server_error",
    };
    json(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": null}}),
    )
}

fn wire_error(e: &WireError) -> Response<Out> {
    let code = match e.kind {
        ErrorKind::ContextOverflow => "context_length_exceeded",
        ErrorKind::UnknownModel => "model_not_found",
        ErrorKind::Busy => "server_busy",
        _ => "",
    };
    let status = status_of(e.kind);
    let mut body = json!({"error": {
        "message": e.message,
        "type": if status.is_client_error() { "invalid_request_error" } else { "server_error" },
        "param": null,
        "code": null,
    }});
    if !code.is_empty() {
        body["error"]["code"] = json!(code);
    }
    json(status, &body)
}

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// Message content: a string, or parts of which only text is supported.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    tool_calls: Vec<AssistantCall>,
}

/// A call an earlier assistant turn made.
#[derive(Debug, Deserialize)]
struct AssistantCall {
    function: CalledFunction,
}

#[derive(Debug, Deserialize)]
struct CalledFunction {
    name: String,
    /// JSON text (OpenAI), or an object (some clients).
    arguments: Value,
}

/// A function tool offered (OpenAI's and Ollama's shape).
#[derive(Debug, Deserialize)]
pub(super) struct OfferedTool {
    #[serde(rename = "type")]
    kind: String,
    function: OfferedFunction,
}

#[derive(Debug, Deserialize)]
struct OfferedFunction {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    parameters: Option<Value>,
}

/// Offered tools in the protocol's terms.
pub(super) fn offered(tools: Vec<OfferedTool>) -> Result<Vec<Tool>, String> {
    tools
        .into_iter()
        .map(|t| {
            if t.kind != "function" {
                return Err(format!(
                    "tools: type {:?} is not supported (function)",
                    t.kind
                ));
            }
            Ok(Tool {
                name: t.function.name,
                description: t.function.description,
                parameters: t
                    .function
                    .parameters
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// An earlier call's arguments as JSON text.
fn arguments_text(v: Value) -> String {
    match v {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Default, Deserialize)]
struct TemplateKwargs {
    enable_thinking: Option<bool>,
}

/// Sampling fields both endpoints share (with llama.cpp's extensions).
#[derive(Debug, Default, Deserialize)]
struct Sampling {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    seed: Option<u64>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    stop: Option<Stop>,
    n: Option<u32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    /// Chat: `true`/`false`; completions: how many alternatives.
    logprobs: Option<Value>,
    top_logprobs: Option<u8>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

impl Sampling {
    /// Chat's `logprobs: true` with `top_logprobs` alternatives.
    fn chat_logprobs(&self) -> Result<Option<u8>, String> {
        match &self.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(None),
            Some(Value::Bool(true)) => Ok(Some(self.top_logprobs.unwrap_or(0))),
            Some(other) => Err(format!("logprobs: a boolean, not {other}")),
        }
    }

    /// Completions' `logprobs: N`.
    fn completion_logprobs(&self) -> Result<Option<u8>, String> {
        match &self.logprobs {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u8::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| format!("logprobs: a number of alternatives, not {v}")),
        }
    }

    /// The options, or why the request asks for what is not supported.
    fn options(self, default_max: Option<u32>, logprobs: Option<u8>) -> Result<Options, String> {
        if self.n.is_some_and(|n| n != 1) {
            return Err("n: only 1 choice per request is supported".into());
        }
        Ok(Options {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            seed: self.seed,
            max_tokens: self
                .max_completion_tokens
                .or(self.max_tokens)
                .or(default_max),
            stop: self.stop.map(Stop::into_vec).unwrap_or_default(),
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logprobs,
            ..Options::default()
        })
    }
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Vec<Message>,
    #[serde(flatten)]
    sampling: Sampling,
    #[serde(default)]
    chat_template_kwargs: Option<TemplateKwargs>,
    #[serde(default)]
    tools: Option<Vec<OfferedTool>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    response_format: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum CompletionPrompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: Option<String>,
    prompt: CompletionPrompt,
    #[serde(flatten)]
    sampling: Sampling,
    #[serde(default)]
    echo: bool,
    #[serde(default)]
    suffix: Option<String>,
}

/// `response_format`: text, `json_object`, or `json_schema` with its
/// `json_schema.schema`.
fn response_format(f: &Option<Value>) -> Result<Format, String> {
    let Some(f) = f.as_ref().filter(|f| !f.is_null()) else {
        return Ok(Format::Text);
    };
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Format::Text),
        Some("json_object") => Ok(Format::Json),
        Some("json_schema") => {
            let schema = f
                .get("json_schema")
                .and_then(|s| s.get("schema"))
                .ok_or("response_format: json_schema.schema is missing")?;
            Ok(Format::JsonSchema(schema.to_string()))
        }
        _ => Err(format!(
            "response_format: type text, json_object or json_schema, not {f}"
        )),
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:x}{:06x}",
        unix_now(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

fn finish_reason(s: StopReason) -> &'static str {
    match s {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        StopReason::EndOfGeneration | StopReason::StopString(_) | StopReason::Cancelled => "stop",
    }
}

fn usage(s: &GenStats) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.generated_tokens,
        "total_tokens": s.prompt_tokens + s.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
    })
}

/// OpenAI's `tool_calls`: each with an id (unique within the response) and
/// its arguments as JSON text; `index` too in a stream's delta.
fn calls_json(id: &str, calls: &[tools::Call], streaming: bool) -> Value {
    Value::Array(
        calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut v = json!({
                    "id": format!("call_{}_{i}", id.trim_start_matches("chatcmpl-")),
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments.to_string()},
                });
                if streaming {
                    v["index"] = json!(i);
                }
                v
            })
            .collect(),
    )
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Log-probability entries in OpenAI's chat shape (Ollama uses the same).
pub(super) fn logprob_entries(list: &[TokenLogprob]) -> Value {
    Value::Array(
        list.iter()
            .map(|l| {
                json!({
                    "token": lossy(&l.bytes),
                    "logprob": l.logprob,
                    "bytes": l.bytes,
                    "top_logprobs": l.top.iter().map(|t| json!({
                        "token": lossy(&t.bytes),
                        "logprob": t.logprob,
                        "bytes": t.bytes,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

/// Chat's `logprobs` object.
fn chat_logprobs(list: &[TokenLogprob]) -> Value {
    json!({"content": logprob_entries(list), "refusal": null})
}

/// Completions' legacy `logprobs` object; `offset`: where the first token's
/// text starts in the returned text (after an echoed prompt).
fn completion_logprobs(list: &[TokenLogprob], offset: &mut usize) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top = Vec::new();
    let mut text_offset = Vec::new();
    for l in list {
        let t = lossy(&l.bytes);
        text_offset.push(*offset);
        *offset += t.len();
        tokens.push(t);
        token_logprobs.push(l.logprob);
        let alternatives: serde_json::Map<String, Value> = l
            .top
            .iter()
            .map(|a| (lossy(&a.bytes), json!(a.logprob)))
            .collect();
        top.push(Value::Object(alternatives));
    }
    json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn sse_done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

fn model_name(ctx: &Ctx, model: &Option<String>) -> String {
    model
        .clone()
        .unwrap_or_else(|| ctx.daemon.config.default_model.clone())
}

pub(super) fn models(ctx: &Ctx) -> Response<Out> {
    let created = unix_now();
    let data: Vec<Value> = ctx
        .daemon
        .pools
        .list_models()
        .into_iter()
        .map(|m| {
            json!({
                "id": m.reference,
                "object": "model",
                "created": created,
                "owned_by": "paraphym",
            })
        })
        .collect();
    json(StatusCode::OK, &json!({"object": "list", "data": data}))
}

/// Everything the generation said: text and statistics, or an error.
async fn collect(
    mut events: tokio::sync::mpsc::Receiver<Relayed>,
) -> Result<(String, GenStats, Vec<TokenLogprob>), WireError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(ev) = events.recv().await {
        match ev {
            Relayed::Logprobs(l) => logprobs.extend(l),
            Relayed::Token(t) => text.push_str(&t),
            Relayed::Done(s) => return Ok((text, s, logprobs)),
            Relayed::Error(e) => return Err(e),
        }
    }
    Err(WireError {
        kind: ErrorKind::Internal,
        message: "the generation ended without an answer".into(),
    })
}

/// The first event of a streamed generation: an error before any token is
/// an HTTP error, not a stream.
async fn first_event(
    events: &mut tokio::sync::mpsc::Receiver<Relayed>,
) -> Result<Relayed, WireError> {
    match events.recv().await {
        Some(Relayed::Error(e)) => Err(e),
        Some(ev) => Ok(ev),
        None => Err(WireError {
            kind: ErrorKind::Internal,
            message: "the generation ended without an answer".into(),
        }),
    }
}

pub(super) async fn chat(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<Out> {
    let r: ChatRequest = match read_json(&ctx, req, error).await {
        Ok(r) => r,
        Err(res) => return res,
    };
    let tools = match r.tool_choice.as_ref() {
        None | Some(Value::Null) => r.tools.unwrap_or_default(),
        Some(Value::String(c)) if c == "auto" => r.tools.unwrap_or_default(),
        Some(Value::String(c)) if c == "none" => Vec::new(),
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("tool_choice: auto or none, not {other}"),
            )
        }
    };
    let tools = match offered(tools) {
        Ok(t) => t,
        Err(m) => return error(StatusCode::BAD_REQUEST, &m),
    };
    let with_tools = !tools.is_empty();
    let format = match response_format(&r.response_format) {
        Ok(f) => f,
        Err(m) => return error(StatusCode::BAD_REQUEST, &m),
    };
    let mut messages = Vec::with_capacity(r.messages.len());
    for m in r.messages {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" => "tool",
            other => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("messages: role {other:?} is not supported (system, developer, user, assistant, tool)"),
                )
            }
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return error(
                                StatusCode::BAD_REQUEST,
                                &format!("messages: content parts of type {kind:?} are not supported (text only)"),
                            )
                        }
                    }
                }
                text
            }
        };
        messages.push(ChatMessage {
            role: role.into(),
            content,
            tool_calls: m
                .tool_calls
                .into_iter()
                .map(|c| ToolCall {
                    name: c.function.name,
                    arguments: arguments_text(c.function.arguments),
                })
                .collect(),
        });
    }
    let stream_usage = r
        .sampling
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let streaming = r.sampling.stream;
    let options = match r
        .sampling
        .chat_logprobs()
        .and_then(|lp| r.sampling.options(None, lp))
    {
        Ok(o) => Options { format, tools, ..o },
        Err(m) => return error(StatusCode::BAD_REQUEST, &m),
    };
    let want_logprobs = options.logprobs.is_some();
    let model = model_name(&ctx, &r.model);
    let gen = Generate {
        model: r.model,
        prompt: Prompt::Chat {
            messages,
            think: r.chat_template_kwargs.and_then(|k| k.enable_thinking),
        },
        options,
        keep_alive_ms: None,
        session: None,
    };
    let id = new_id("chatcmpl");
    let created = unix_now();
    let mut events = relay(&ctx, gen);
    if !streaming {
        return match collect(events).await {
            Ok((text, s, lp)) => {
                let (content, calls) = if with_tools {
                    tools::parse(&text)
                } else {
                    (text, Vec::new())
                };
                let mut message = json!({"role": "assistant", "content": content});
                let mut finish = finish_reason(s.stop);
                if !calls.is_empty() {
                    if content.is_empty() {
                        message["content"] = Value::Null;
                    }
                    message["tool_calls"] = calls_json(&id, &calls, false);
                    finish = "tool_calls";
                }
                json(
                    StatusCode::OK,
                    &json!({
                        "id": id,
                        "object": "chat.completion",
                        "created": created,
                        "model": model,
                        "choices": [{
                            "index": 0,
                            "message": message,
                            "logprobs": if want_logprobs { chat_logprobs(&lp) } else { Value::Null },
                            "finish_reason": finish,
                        }],
                        "usage": usage(&s),
                    }),
                )
            }
            Err(e) => wire_error(&e),
        };
    }
    let first = match first_event(&mut events).await {
        Ok(ev) => ev,
        Err(e) => return wire_error(&e),
    };
    let role = sse(&json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}],
    }));
    let call_id = id.clone();
    let chunk = move |delta: Value, lp: &[TokenLogprob], finish: Option<&str>| {
        let lp = if want_logprobs {
            chat_logprobs(lp)
        } else {
            Value::Null
        };
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}],
        })
    };
    let mut outgoing = Outgoing::new(with_tools);
    let mut map = move |ev: Relayed| -> Vec<Bytes> {
        let content = |(t, lp): (String, Vec<TokenLogprob>)| -> Bytes {
            sse(&chunk(json!({"content": t}), &lp, None))
        };
        match ev {
            Relayed::Logprobs(l) => {
                outgoing.logprobs(l);
                Vec::new()
            }
            Relayed::Token(t) => outgoing.text(t).map(content).into_iter().collect(),
            Relayed::Done(s) => {
                let (rest, calls) = outgoing.finish();
                let mut out: Vec<Bytes> = rest.map(content).into_iter().collect();
                let mut finish = finish_reason(s.stop);
                if !calls.is_empty() {
                    let delta = json!({"tool_calls": calls_json(&call_id, &calls, true)});
                    out.push(sse(&chunk(delta, &[], None)));
                    finish = "tool_calls";
                }
                out.push(sse(&chunk(json!({}), &outgoing.rest(), Some(finish))));
                if stream_usage {
                    let mut u = chunk(json!({}), &[], None);
                    u["choices"] = json!([]);
                    u["usage"] = usage(&s);
                    out.push(sse(&u));
                }
                out.push(sse_done());
                out
            }
            Relayed::Error(e) => vec![
                sse(&json!({"error": {"message": e.message, "type": "server_error"}})),
                sse_done(),
            ],
        }
    };
    let mut head = vec![role];
    head.extend(map(first));
    stream("text/event-stream", head, events, map)
}

pub(super) async fn completions(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<Out> {
    let r: CompletionRequest = match read_json(&ctx, req, error).await {
        Ok(r) => r,
        Err(res) => return res,
    };
    if r.suffix.is_some() {
        return error(StatusCode::BAD_REQUEST, "suffix is not supported");
    }
    let prompt = match r.prompt {
        CompletionPrompt::One(p) => p,
        CompletionPrompt::Many(mut v) if v.len() == 1 => v.remove(0),
        CompletionPrompt::Many(_) => {
            return error(StatusCode::BAD_REQUEST, "prompt: one prompt per request")
        }
    };
    let streaming = r.sampling.stream;
    let stream_usage = r
        .sampling
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    // OpenAI's default for this endpoint.
    let options = match r
        .sampling
        .completion_logprobs()
        .and_then(|lp| r.sampling.options(Some(16), lp))
    {
        Ok(o) => o,
        Err(m) => return error(StatusCode::BAD_REQUEST, &m),
    };
    let want_logprobs = options.logprobs.is_some();
    let model = model_name(&ctx, &r.model);
    let echo = r.echo.then(|| prompt.clone());
    let gen = Generate {
        model: r.model,
        prompt: Prompt::Raw(prompt),
        options,
        keep_alive_ms: None,
        session: None,
    };
    let id = new_id("cmpl");
    let created = unix_now();
    let mut events = relay(&ctx, gen);
    if !streaming {
        return match collect(events).await {
            Ok((text, s, lp)) => {
                let echo = echo.unwrap_or_default();
                let lp = if want_logprobs {
                    completion_logprobs(&lp, &mut echo.len())
                } else {
                    Value::Null
                };
                json(
                    StatusCode::OK,
                    &json!({
                        "id": id,
                        "object": "text_completion",
                        "created": created,
                        "model": model,
                        "choices": [{
                            "text": echo + &text,
                            "index": 0,
                            "logprobs": lp,
                            "finish_reason": finish_reason(s.stop),
                        }],
                        "usage": usage(&s),
                    }),
                )
            }
            Err(e) => wire_error(&e),
        };
    }
    let first = match first_event(&mut events).await {
        Ok(ev) => ev,
        Err(e) => return wire_error(&e),
    };
    let mut offset = echo.as_ref().map_or(0, String::len);
    let echoed = echo.as_ref().map(|p| {
        sse(&json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"text": p, "index": 0, "logprobs": Value::Null, "finish_reason": Value::Null}],
        }))
    });
    let mut chunk = move |text: &str, lp: &[TokenLogprob], finish: Option<&str>| {
        let lp = if want_logprobs {
            completion_logprobs(lp, &mut offset)
        } else {
            Value::Null
        };
        json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}],
        })
    };
    let mut outgoing = Outgoing::new(false);
    let mut map = move |ev: Relayed| -> Vec<Bytes> {
        match ev {
            Relayed::Logprobs(l) => {
                outgoing.logprobs(l);
                Vec::new()
            }
            Relayed::Token(t) => outgoing
                .text(t)
                .map(|(t, lp)| sse(&chunk(&t, &lp, None)))
                .into_iter()
                .collect(),
            Relayed::Done(s) => {
                let lp = outgoing.rest();
                let mut out = vec![sse(&chunk("", &lp, Some(finish_reason(s.stop))))];
                if stream_usage {
                    let mut u = chunk("", &[], None);
                    u["choices"] = json!([]);
                    u["usage"] = usage(&s);
                    out.push(sse(&u));
                }
                out.push(sse_done());
                out
            }
            Relayed::Error(e) => vec![
                sse(&json!({"error": {"message": e.message, "type": "server_error"}})),
                sse_done(),
            ],
        }
    };
    let mut head: Vec<Bytes> = echoed.into_iter().collect();
    head.extend(map(first));
    stream("text/event-stream", head, events, map)
}
