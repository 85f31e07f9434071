//! Ollama-compatible endpoints: `/api/generate` and `/api/chat` (NDJSON
//! streams by default), `/api/tags`, `/api/ps`, `/api/version`, with
//! `keep_alive` honoured (an empty prompt loads the model; `keep_alive: 0`
//! with it unloads). Field names and meanings follow Ollama's API document.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use paraphym_protocol::message::{
    ChatMessage, ErrorKind, Format, GenStats, Generate, Options, Prompt, Request as WireRequest,
    StopReason, TokenLogprob, ToolCall, WireError,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    call, json, read_json, relay, rfc3339, status_of, stream, tools, Ctx, Out, Outgoing, Relayed,
};

fn error(status: StatusCode, message: &str) -> Response<Out> {
    json(status, &json!({"error": message}))
}

fn wire_error(e: &WireError) -> Response<Out> {
    error(status_of(e.kind), &e.message)
}

/// `keep_alive`: seconds as a number, or a duration string ("5m", "1h",
/// "0"); negative means forever.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum KeepAlive {
    Seconds(f64),
    Text(String),
}

impl KeepAlive {
    fn to_ms(&self) -> Result<u64, String> {
        let secs = match self {
            KeepAlive::Seconds(s) => *s,
            KeepAlive::Text(t) => {
                let t = t.trim();
                if t.starts_with('-') {
                    -1.0
                } else {
                    match paraphym_protocol::units::parse_duration(t)? {
                        Some(d) => d.as_secs_f64(),
                        None => -1.0,
                    }
                }
            }
        };
        Ok(if secs < 0.0 {
            u64::MAX
        } else {
            (secs * 1000.0).min((u64::MAX - 1) as f64) as u64
        })
    }
}

#[derive(Debug, Default, Deserialize)]
struct ModelOptions {
    temperature: Option<f32>,
    top_k: Option<u32>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    seed: Option<i64>,
    num_predict: Option<i64>,
    stop: Option<Vec<String>>,
    repeat_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    num_ctx: Option<i64>,
}

impl ModelOptions {
    /// `num_ctx` as the protocol's context.
    fn context(&self) -> Result<Option<u32>, String> {
        match self.num_ctx {
            Some(n) if n < 1 => Err(format!("num_ctx must be at least 1 (got {n})")),
            Some(n) => Ok(Some(n.min(i64::from(u32::MAX)) as u32)),
            None => Ok(None),
        }
    }

    fn options(self, logprobs: Option<u8>) -> Result<Options, String> {
        Ok(Options {
            context: self.context()?,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            // Ollama: a negative seed means random.
            seed: self.seed.and_then(|s| u64::try_from(s).ok()),
            // -1: until the model stops; -2: until the context is full.
            max_tokens: match self.num_predict {
                Some(n) if n < 0 => Some(u32::MAX),
                Some(n) => Some(n.clamp(1, i64::from(u32::MAX)) as u32),
                None => None,
            },
            stop: self.stop.unwrap_or_default(),
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logprobs,
            ..Options::default()
        })
    }
}

#[derive(Debug, Deserialize)]
struct GenerateRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    prompt: String,
    system: Option<String>,
    template: Option<String>,
    suffix: Option<String>,
    #[serde(default)]
    raw: bool,
    stream: Option<bool>,
    options: Option<ModelOptions>,
    keep_alive: Option<KeepAlive>,
    format: Option<Value>,
    #[serde(default)]
    images: Vec<Value>,
    think: Option<bool>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u8>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: String,
    #[serde(default)]
    images: Vec<Value>,
    #[serde(default)]
    tool_calls: Vec<EarlierCall>,
}

/// A call an earlier assistant turn made (`arguments` an object).
#[derive(Debug, Deserialize)]
struct EarlierCall {
    function: EarlierFunction,
}

#[derive(Debug, Deserialize)]
struct EarlierFunction {
    name: String,
    #[serde(default)]
    arguments: Value,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    messages: Vec<Message>,
    stream: Option<bool>,
    options: Option<ModelOptions>,
    keep_alive: Option<KeepAlive>,
    format: Option<Value>,
    tools: Option<Vec<super::openai::OfferedTool>>,
    think: Option<bool>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u8>,
}

fn done_reason(s: StopReason) -> &'static str {
    match s {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        StopReason::EndOfGeneration | StopReason::StopString(_) | StopReason::Cancelled => "stop",
    }
}

/// The final object's timings, in nanoseconds as Ollama gives them: the
/// wait before prefill (queue, load), the prefill of what was not cached,
/// the decode.
fn timings(s: &GenStats, started: Instant) -> Value {
    let secs = |n: u32, tps: f32| {
        if tps > 0.0 {
            f64::from(n) / f64::from(tps)
        } else {
            0.0
        }
    };
    let prefill = secs(
        s.prompt_tokens.saturating_sub(s.cached_tokens),
        s.prefill_tokens_per_s,
    );
    let decode = secs(s.generated_tokens.saturating_sub(1), s.decode_tokens_per_s);
    let ttft = s.time_to_first_token_us as f64 / 1e6;
    let ns = |x: f64| (x.max(0.0) * 1e9) as u64;
    json!({
        "total_duration": started.elapsed().as_nanos() as u64,
        "load_duration": ns(ttft - prefill),
        "prompt_eval_count": s.prompt_tokens,
        "prompt_eval_duration": ns(prefill),
        "eval_count": s.generated_tokens,
        "eval_duration": ns(decode),
    })
}

fn ndjson(v: &Value) -> Bytes {
    Bytes::from(format!("{v}\n"))
}

/// What both endpoints do once their request is in engine terms.
struct Job {
    model: String,
    prompt: Prompt,
    options: Options,
    keep_alive_ms: Option<u64>,
    streaming: bool,
    /// `/api/chat` (a `message` object) or `/api/generate` (`response`).
    chat: bool,
}

async fn run(ctx: Arc<Ctx>, job: Job, started: Instant) -> Response<Out> {
    let Job {
        model,
        prompt,
        options,
        keep_alive_ms,
        streaming,
        chat,
    } = job;
    let piece = move |model: &str, text: &str, done: bool| {
        let mut v = json!({"model": model, "created_at": rfc3339(SystemTime::now())});
        if chat {
            v["message"] = json!({"role": "assistant", "content": text});
        } else {
            v["response"] = json!(text);
        }
        v["done"] = json!(done);
        v
    };
    let want_logprobs = options.logprobs.is_some();
    let with_tools = chat && !options.tools.is_empty();
    let gen = Generate {
        model: Some(model.clone()),
        prompt,
        options,
        keep_alive_ms,
        session: None,
    };
    let with_logprobs = move |v: &mut Value, lp: &[TokenLogprob]| {
        if want_logprobs {
            v["logprobs"] = super::openai::logprob_entries(lp);
        }
    };
    let mut events = relay(&ctx, gen);
    if !streaming {
        let mut text = String::new();
        let mut lp = Vec::new();
        loop {
            match events.recv().await {
                Some(Relayed::Logprobs(l)) => lp.extend(l),
                Some(Relayed::Token(t)) => text.push_str(&t),
                Some(Relayed::Done(s)) => {
                    let (content, calls) = if with_tools {
                        tools::parse(&text)
                    } else {
                        (text, Vec::new())
                    };
                    let mut v = piece(&model, &content, true);
                    if !calls.is_empty() {
                        v["message"]["tool_calls"] = calls_json(&calls);
                    }
                    with_logprobs(&mut v, &lp);
                    v["done_reason"] = json!(done_reason(s.stop));
                    merge(&mut v, timings(&s, started));
                    return json(StatusCode::OK, &v);
                }
                Some(Relayed::Error(e)) => return wire_error(&e),
                None => return error(StatusCode::INTERNAL_SERVER_ERROR, "the generation was lost"),
            }
        }
    }
    let first = match events.recv().await {
        Some(Relayed::Error(e)) => return wire_error(&e),
        Some(ev) => ev,
        None => return error(StatusCode::INTERNAL_SERVER_ERROR, "the generation was lost"),
    };
    let mut outgoing = Outgoing::new(with_tools);
    let mut map = move |ev: Relayed| -> Vec<Bytes> {
        match ev {
            Relayed::Logprobs(l) => {
                outgoing.logprobs(l);
                Vec::new()
            }
            Relayed::Token(t) => outgoing
                .text(t)
                .map(|(t, lp)| {
                    let mut v = piece(&model, &t, false);
                    with_logprobs(&mut v, &lp);
                    ndjson(&v)
                })
                .into_iter()
                .collect(),
            Relayed::Done(s) => {
                let mut out = Vec::new();
                let (rest, calls) = outgoing.finish();
                if rest.is_some() || !calls.is_empty() {
                    let (text, lp) = rest.unwrap_or_default();
                    let mut v = piece(&model, &text, false);
                    if !calls.is_empty() {
                        v["message"]["tool_calls"] = calls_json(&calls);
                    }
                    with_logprobs(&mut v, &lp);
                    out.push(ndjson(&v));
                }
                let mut v = piece(&model, "", true);
                let lp = outgoing.rest();
                if !lp.is_empty() {
                    with_logprobs(&mut v, &lp);
                }
                v["done_reason"] = json!(done_reason(s.stop));
                merge(&mut v, timings(&s, started));
                out.push(ndjson(&v));
                out
            }
            // Ollama ends a failed stream with an error object.
            Relayed::Error(e) => vec![ndjson(&json!({"error": e.message}))],
        }
    };
    let head = map(first);
    stream("application/x-ndjson", head, events, map)
}

/// Ollama's `tool_calls`: `{"function": {"name", "arguments": {…}}}`.
fn calls_json(calls: &[tools::Call]) -> Value {
    Value::Array(
        calls
            .iter()
            .map(|c| json!({"function": {"name": c.name, "arguments": c.arguments}}))
            .collect(),
    )
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

/// An empty request loads the model (with its `num_ctx`), or with
/// `keep_alive: 0` unloads it.
async fn load_or_unload(
    ctx: &Ctx,
    model: &str,
    keep_alive_ms: Option<u64>,
    options: &Option<ModelOptions>,
    chat: bool,
) -> Response<Out> {
    let context = match options.as_ref().map(ModelOptions::context).transpose() {
        Ok(c) => c.flatten(),
        Err(m) => return error(StatusCode::BAD_REQUEST, &m),
    };
    let unload = keep_alive_ms == Some(0);
    let request = if unload {
        WireRequest::Unload {
            model: model.into(),
        }
    } else {
        WireRequest::Load {
            model: model.into(),
            keep_alive_ms,
            context,
        }
    };
    match call(ctx, request).await {
        Ok(_) => {
            let mut v = json!({"model": model, "created_at": rfc3339(SystemTime::now())});
            if chat {
                v["message"] = json!({"role": "assistant", "content": ""});
            } else {
                v["response"] = json!("");
            }
            v["done"] = json!(true);
            v["done_reason"] = json!(if unload { "unload" } else { "load" });
            json(StatusCode::OK, &v)
        }
        // Unloading what is not loaded is not an error in Ollama.
        Err(e) if unload && e.kind == ErrorKind::UnknownModel => {
            let mut v = json!({"model": model, "created_at": rfc3339(SystemTime::now())});
            v["done"] = json!(true);
            v["done_reason"] = json!("unload");
            json(StatusCode::OK, &v)
        }
        Err(e) => wire_error(&e),
    }
}

/// `format`: `"json"`, or a JSON schema object.
fn format_of(format: &Option<Value>) -> Result<Format, String> {
    match format {
        None | Some(Value::Null) => Ok(Format::Text),
        Some(Value::String(s)) if s.is_empty() => Ok(Format::Text),
        Some(Value::String(s)) if s == "json" => Ok(Format::Json),
        Some(schema @ Value::Object(_)) => Ok(Format::JsonSchema(schema.to_string())),
        Some(other) => Err(format!("format: \"json\" or a JSON schema, not {other}")),
    }
}

fn keep_alive(k: &Option<KeepAlive>) -> Result<Option<u64>, String> {
    k.as_ref()
        .map(KeepAlive::to_ms)
        .transpose()
        .map_err(|e| format!("keep_alive: {e}"))
}

/// What `/api/generate` and `/api/chat` check alike: a model, the output
/// format and the keep-alive.
#[allow(clippy::result_large_err)] // the error is the response to send
fn prologue(
    model: &str,
    format: &Option<Value>,
    keep_alive_field: &Option<KeepAlive>,
) -> Result<(Format, Option<u64>), Response<Out>> {
    if model.is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, "model is required"));
    }
    let format = format_of(format).map_err(|m| error(StatusCode::BAD_REQUEST, &m))?;
    let keep_alive_ms =
        keep_alive(keep_alive_field).map_err(|m| error(StatusCode::BAD_REQUEST, &m))?;
    Ok((format, keep_alive_ms))
}

pub(super) async fn generate(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<Out> {
    let started = Instant::now();
    let r: GenerateRequest = match read_json(&ctx, req, error).await {
        Ok(r) => r,
        Err(res) => return res,
    };
    let (format, keep_alive_ms) = match prologue(&r.model, &r.format, &r.keep_alive) {
        Ok(p) => p,
        Err(res) => return res,
    };
    if !r.images.is_empty() {
        return error(StatusCode::BAD_REQUEST, "images are not supported");
    }
    if r.template.as_ref().is_some_and(|t| !t.is_empty()) {
        return error(
            StatusCode::BAD_REQUEST,
            "template: the model's own chat template is used (send raw: true to format the prompt yourself)",
        );
    }
    if r.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return error(StatusCode::BAD_REQUEST, "suffix is not supported");
    }
    if r.prompt.is_empty() {
        return load_or_unload(&ctx, &r.model, keep_alive_ms, &r.options, false).await;
    }
    let logprobs = r.logprobs.then(|| r.top_logprobs.unwrap_or(0));
    let options = match r.options.unwrap_or_default().options(logprobs) {
        Ok(o) => Options { format, ..o },
        Err(m) => return error(StatusCode::BAD_REQUEST, &m),
    };
    let prompt = if r.raw {
        Prompt::Raw(r.prompt)
    } else {
        let mut messages = Vec::new();
        if let Some(s) = r.system.filter(|s| !s.is_empty()) {
            messages.push(ChatMessage {
                role: "system".into(),
                content: s,
                tool_calls: Vec::new(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: r.prompt,
            tool_calls: Vec::new(),
        });
        Prompt::Chat {
            messages,
            think: r.think,
        }
    };
    let job = Job {
        model: r.model,
        prompt,
        options,
        keep_alive_ms,
        streaming: r.stream.unwrap_or(true),
        chat: false,
    };
    run(ctx, job, started).await
}

pub(super) async fn chat(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<Out> {
    let started = Instant::now();
    let r: ChatRequest = match read_json(&ctx, req, error).await {
        Ok(r) => r,
        Err(res) => return res,
    };
    let (format, keep_alive_ms) = match prologue(&r.model, &r.format, &r.keep_alive) {
        Ok(p) => p,
        Err(res) => return res,
    };
    let tools = match super::openai::offered(r.tools.unwrap_or_default()) {
        Ok(t) => t,
        Err(m) => return error(StatusCode::BAD_REQUEST, &m),
    };
    if r.messages.is_empty() {
        return load_or_unload(&ctx, &r.model, keep_alive_ms, &r.options, true).await;
    }
    let mut messages = Vec::with_capacity(r.messages.len());
    for m in r.messages {
        if !m.images.is_empty() {
            return error(StatusCode::BAD_REQUEST, "images are not supported");
        }
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
            return error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "messages: role {:?} is not supported (system, user, assistant, tool)",
                    m.role
                ),
            );
        }
        messages.push(ChatMessage {
            role: m.role,
            content: m.content,
            tool_calls: m
                .tool_calls
                .into_iter()
                .map(|c| ToolCall {
                    name: c.function.name,
                    arguments: match c.function.arguments {
                        Value::String(s) => s,
                        Value::Null => "{}".into(),
                        other => other.to_string(),
                    },
                })
                .collect(),
        });
    }
    let logprobs = r.logprobs.then(|| r.top_logprobs.unwrap_or(0));
    let options = match r.options.unwrap_or_default().options(logprobs) {
        Ok(o) => Options { format, tools, ..o },
        Err(m) => return error(StatusCode::BAD_REQUEST, &m),
    };
    let job = Job {
        model: r.model,
        prompt: Prompt::Chat {
            messages,
            think: r.think,
        },
        options,
        keep_alive_ms,
        streaming: r.stream.unwrap_or(true),
        chat: true,
    };
    run(ctx, job, started).await
}

/// Ollama's `details`, from the file's metadata.
fn details(path: &str, architecture: &str) -> Value {
    let facts = crate::engine::file_facts(std::path::Path::new(path)).ok();
    let size = facts.as_ref().map_or(String::new(), |f| {
        if f.parameters >= 1_000_000_000 {
            format!("{:.1}B", f.parameters as f64 / 1e9)
        } else {
            format!("{:.0}M", f.parameters as f64 / 1e6)
        }
    });
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": architecture,
        "families": [architecture],
        "parameter_size": size,
        "quantization_level": facts.map(|f| f.quantization).unwrap_or_default(),
    })
}

#[derive(Debug, Deserialize)]
struct NameRequest {
    model: Option<String>,
    name: Option<String>,
}

impl NameRequest {
    fn model(self) -> Option<String> {
        self.model.or(self.name).filter(|m| !m.is_empty())
    }
}

/// `POST /api/show`: a model's details, template and metadata.
pub(super) async fn show(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<Out> {
    let r: NameRequest = match read_json(&ctx, req, error).await {
        Ok(r) => r,
        Err(res) => return res,
    };
    let Some(model) = r.model() else {
        return error(StatusCode::BAD_REQUEST, "model is required");
    };
    let d = match ctx.daemon.pools.show(&model) {
        Ok(d) => d,
        Err(e) => return wire_error(&e),
    };
    let arch = d.architecture.clone();
    json(
        StatusCode::OK,
        &json!({
            "modelfile": "",
            "parameters": "",
            "template": d.chat_template,
            "details": details(&d.path, &arch),
            "model_info": {
                "general.architecture": arch,
                "general.parameter_count": d.parameters,
                format!("{arch}.context_length"): d.context_length,
            },
            "capabilities": ["completion"],
            "modified_at": modified(&d.path),
        }),
    )
}

/// `DELETE /api/delete`: remove a download (never another tool's file).
pub(super) async fn delete(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<Out> {
    let r: NameRequest = match read_json(&ctx, req, error).await {
        Ok(r) => r,
        Err(res) => return res,
    };
    let Some(model) = r.model() else {
        return error(StatusCode::BAD_REQUEST, "model is required");
    };
    match call(&ctx, WireRequest::Remove { model }).await {
        Ok(_) => json(StatusCode::OK, &json!({})),
        Err(e) => wire_error(&e),
    }
}

fn modified(path: &str) -> String {
    let t = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    rfc3339(t)
}

pub(super) fn tags(ctx: &Ctx) -> Response<Out> {
    let models: Vec<Value> = ctx
        .daemon
        .pools
        .list_models()
        .into_iter()
        .map(|m| {
            json!({
                "name": m.reference,
                "model": m.reference,
                "modified_at": modified(&m.path),
                "size": m.size_bytes,
                "digest": "",
                "details": details(&m.path, &m.architecture),
            })
        })
        .collect();
    json(StatusCode::OK, &json!({"models": models}))
}

pub(super) fn ps(ctx: &Ctx) -> Response<Out> {
    let infos = ctx.daemon.pools.list_models();
    let on_gpu = !ctx.daemon.config.device.is_cpu();
    let now = SystemTime::now();
    let models: Vec<Value> = ctx
        .daemon
        .pools
        .status()
        .models
        .into_iter()
        .map(|m| {
            let info = infos.iter().find(|i| i.reference == m.reference);
            let arch = info.map_or("", |i| i.architecture.as_str());
            let path = info.map_or("", |i| i.path.as_str());
            // Forever: a century on, as far as any client's clock goes.
            let expires = Duration::from_millis(m.expires_in_ms.min(100 * 365 * 86_400_000));
            json!({
                "name": m.reference,
                "model": m.reference,
                "size": m.memory_bytes,
                "digest": "",
                "details": details(path, arch),
                "expires_at": rfc3339(now + expires),
                "size_vram": if on_gpu { m.memory_bytes } else { 0 },
                "context_length": m.context,
            })
        })
        .collect();
    json(StatusCode::OK, &json!({"models": models}))
}

pub(super) fn version() -> Response<Out> {
    json(
        StatusCode::OK,
        &json!({"version": env!("CARGO_PKG_VERSION")}),
    )
}
