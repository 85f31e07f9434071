//! The scripting subcommands. Exit codes: 0 ok, 1 error, 2 usage, 3 daemon
//! not running, 4 unknown model, 5 busy, 6 context overflow, 130 cancelled.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use paraphym_protocol::client::{Client, ClientError, Piece};
use paraphym_protocol::message::{
    ChatMessage, ErrorKind, GenStats, Generate, Options, Overflow, Prompt, Request, Response,
    Stage, StopReason,
};
use paraphym_protocol::units;
use serde_json::json;

use crate::conn;
use crate::state::chat::{self, Conversation};
use crate::view::human_bytes;

pub const EXIT_ERROR: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_NOT_RUNNING: u8 = 3;
pub const EXIT_UNKNOWN_MODEL: u8 = 4;
pub const EXIT_BUSY: u8 = 5;
pub const EXIT_CONTEXT: u8 = 6;
pub const EXIT_CANCELLED: u8 = 130;

#[derive(Debug)]
pub enum CliError {
    Client(ClientError),
    Usage(String),
    Other(String),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Client(ClientError::NotRunning { path }) => write!(
                f,
                "no daemon is running on {} (start one with `paraphym load MODEL` or `paraphymd`)",
                path.display()
            ),
            CliError::Client(e) => write!(f, "{e}"),
            CliError::Usage(m) | CliError::Other(m) => write!(f, "{m}"),
        }
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        CliError::Client(e)
    }
}

pub fn exit_code(e: &CliError) -> u8 {
    match e {
        CliError::Usage(_) => EXIT_USAGE,
        CliError::Other(_) => EXIT_ERROR,
        CliError::Client(c) => match c {
            ClientError::NotRunning { .. } => EXIT_NOT_RUNNING,
            ClientError::Daemon(w) => match w.kind {
                ErrorKind::UnknownModel => EXIT_UNKNOWN_MODEL,
                ErrorKind::Busy => EXIT_BUSY,
                ErrorKind::ContextOverflow => EXIT_CONTEXT,
                _ => EXIT_ERROR,
            },
            _ => EXIT_ERROR,
        },
    }
}

pub struct Ctx {
    socket_flag: Option<PathBuf>,
}

impl Ctx {
    pub fn new(socket_flag: Option<PathBuf>) -> Self {
        Self { socket_flag }
    }

    fn socket(&self) -> Result<PathBuf, CliError> {
        Ok(conn::socket_path(self.socket_flag.as_deref())?)
    }

    /// A running daemon, or exit code 3.
    fn running(&self) -> Result<Client, CliError> {
        Ok(conn::connect(&self.socket()?)?)
    }

    /// A daemon, started in the background if none runs.
    fn started(&self) -> Result<Client, CliError> {
        let client = conn::connect_or_start(&self.socket()?, self.socket_flag.is_some())?;
        conn::check_version(&client);
        Ok(client)
    }
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// A model reference (file, alias, hf:owner/repo/file.gguf) [default: $PARAPHYM_MODEL, else the daemon's default]
    #[arg(long)]
    pub model: Option<String>,
    /// Complete the text as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_k: Option<u32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub min_p: Option<f32>,
    #[arg(long)]
    pub repeat_penalty: Option<f32>,
    /// Subtract this from the logits of tokens among the last 64 (-2 to 2).
    #[arg(long)]
    pub presence_penalty: Option<f32>,
    /// Subtract this per occurrence among the last 64 (-2 to 2).
    #[arg(long)]
    pub frequency_penalty: Option<f32>,
    /// With --json: each token's log-probability and N alternatives (0 to 20)
    /// as `logprobs` events.
    #[arg(long, value_name = "N", requires = "json")]
    pub logprobs: Option<u8>,
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Positions this request may use, prompt and reply (Ollama's num_ctx):
    /// less than the model serves holds it to that; more makes the daemon
    /// serve the model with more from then on [default: as served].
    #[arg(long, value_name = "TOKENS", value_parser = clap::value_parser!(u32).range(1..))]
    pub context: Option<u32>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text appears (repeatable); it is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
    /// A system message (chat only).
    #[arg(long)]
    pub system: Option<String>,
    /// How long the model stays loaded afterwards (30s, 5m, 1h, forever).
    #[arg(long)]
    pub keep_alive: Option<String>,
    /// Ask a thinking model (Qwen3) to think first.
    #[arg(long, conflicts_with = "no_think")]
    pub think: bool,
    /// Ask a thinking model (Qwen3) not to think.
    #[arg(long)]
    pub no_think: bool,
    /// One JSON object per line per event (token, done, error).
    #[arg(long)]
    pub json: bool,
    /// Print the statistics to stderr at the end.
    #[arg(long, short)]
    pub verbose: bool,
    /// Continue the conversation NAME (saved in the data folder's
    /// `sessions/`): its earlier turns go with the prompt and the reply is
    /// added. The daemon keeps the session's cache, so only the new turn is
    /// prefilled. The session remembers its model and system message.
    #[arg(long, value_name = "NAME", conflicts_with = "raw")]
    pub session: Option<String>,
    /// Start the session over.
    #[arg(long, requires = "session")]
    pub reset: bool,
    /// When the chat outgrows the context, leave out its oldest turns (the
    /// statistics say how many) instead of failing.
    #[arg(long)]
    pub drop_oldest: bool,
    /// The prompt [default: standard input].
    pub prompt: Option<String>,
}

fn json_line(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn stop_name(s: StopReason) -> String {
    match s {
        StopReason::EndOfGeneration => "end_of_generation".into(),
        StopReason::MaxTokens => "max_tokens".into(),
        StopReason::StopString(i) => format!("stop_string:{i}"),
        StopReason::ContextFull => "context_full".into(),
        StopReason::Cancelled => "cancelled".into(),
    }
}

fn kind_name(k: ErrorKind) -> &'static str {
    match k {
        ErrorKind::BadRequest => "bad_request",
        ErrorKind::UnknownModel => "unknown_model",
        ErrorKind::ContextOverflow => "context_overflow",
        ErrorKind::Busy => "busy",
        ErrorKind::ModelFailed => "model_failed",
        ErrorKind::ShuttingDown => "shutting_down",
        ErrorKind::Internal => "internal",
        ErrorKind::Offline => "offline",
        ErrorKind::AccessDenied => "access_denied",
        ErrorKind::OutOfMemory => "out_of_memory",
    }
}

fn stage_json(s: Stage) -> serde_json::Value {
    match s {
        Stage::Queued { position } => {
            json!({"event": "stage", "stage": "queued", "position": position})
        }
        Stage::Loading { percent } => {
            json!({"event": "stage", "stage": "loading", "percent": percent})
        }
        Stage::Prefill { done, total } => {
            json!({"event": "stage", "stage": "prefill", "done": done, "total": total})
        }
        Stage::Generating => json!({"event": "stage", "stage": "generating"}),
    }
}

fn stage_text(s: Stage) -> String {
    match s {
        Stage::Queued { position } => format!("queued: position {position}…"),
        Stage::Loading { percent } => format!("loading the model {percent}%…"),
        Stage::Prefill { done, total } => format!("reading the prompt {done}/{total}…"),
        Stage::Generating => "generating…".into(),
    }
}

fn done_json(s: &GenStats) -> serde_json::Value {
    json!({
        "event": "done",
        "prompt_tokens": s.prompt_tokens,
        "generated_tokens": s.generated_tokens,
        "time_to_first_token_us": s.time_to_first_token_us,
        "prefill_tokens_per_s": s.prefill_tokens_per_s,
        "decode_tokens_per_s": s.decode_tokens_per_s,
        "stop": stop_name(s.stop),
        "cached_tokens": s.cached_tokens,
        "dropped_messages": s.dropped_messages,
    })
}

pub fn run(ctx: &Ctx, a: RunArgs) -> Result<ExitCode, CliError> {
    let prompt = match a.prompt {
        Some(p) => p,
        None if std::io::stdin().is_terminal() => {
            return Err(CliError::Usage(
                "give a prompt as an argument or on standard input".into(),
            ))
        }
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| CliError::Other(format!("reading the prompt: {e}")))?;
            s
        }
    };
    let keep_alive_ms = match &a.keep_alive {
        Some(k) => Some(units::to_wire_ms(
            units::parse_duration(k).map_err(CliError::Usage)?,
        )),
        None => None,
    };
    let think = match (a.think, a.no_think) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    };
    let sessions = match &a.session {
        Some(_) => Some(crate::store::sessions_dir().ok_or_else(|| {
            CliError::Other("no data folder for sessions: set HOME or XDG_DATA_HOME".into())
        })?),
        None => None,
    };
    let mut session = match (&a.session, &sessions) {
        (Some(name), Some(dir)) => {
            let old = if a.reset {
                None
            } else {
                crate::store::load_session(dir, name).map_err(|e| CliError::Usage(e.to_string()))?
            };
            let mut conv = old.unwrap_or_else(|| Conversation::new(name.clone(), None));
            if a.system.is_some() {
                conv.settings.system = a.system.clone();
            }
            if think.is_some() {
                conv.settings.think = think;
            }
            if a.model.is_some() {
                conv.model = a.model.clone();
            }
            conv.messages.push(chat::Message::user(&prompt));
            Some(conv)
        }
        _ => None,
    };
    let prompt = if let Some(conv) = &session {
        conv.request_prompt()
    } else if a.raw {
        if a.system.is_some() {
            return Err(CliError::Usage(
                "--system needs a chat prompt (drop --raw)".into(),
            ));
        }
        Prompt::Raw(prompt)
    } else {
        let mut messages = Vec::new();
        if let Some(s) = a.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: s,
                tool_calls: Vec::new(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: prompt,
            tool_calls: Vec::new(),
        });
        Prompt::Chat { messages, think }
    };
    let model = a
        .model
        .clone()
        .or_else(|| session.as_ref().and_then(|c| c.model.clone()));
    let model = model.or_else(|| {
        std::env::var("PARAPHYM_MODEL")
            .ok()
            .filter(|m| !m.is_empty())
    });
    let request = Generate {
        model: model.clone(),
        prompt,
        options: Options {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repeat_penalty: a.repeat_penalty,
            seed: a.seed,
            max_tokens: a.max_tokens,
            stop: a.stop.clone(),
            ignore_eos: false,
            overflow: if a.drop_oldest {
                Overflow::DropOldest
            } else {
                Overflow::Error
            },
            presence_penalty: a.presence_penalty,
            frequency_penalty: a.frequency_penalty,
            logprobs: a.logprobs,
            format: paraphym_protocol::message::Format::Text,
            tools: Vec::new(),
            context: a.context,
        },
        keep_alive_ms,
        session: a.session.clone(),
    };

    let client = ctx.started()?;
    let stream = client.generate(request)?;
    // Ctrl-C cancels the generation (it still ends with its statistics);
    // a second one leaves at once.
    let interrupts = Arc::new(AtomicUsize::new(0));
    {
        let handle = client.handle();
        let id = stream.id();
        let interrupts = interrupts.clone();
        if let Ok(mut signals) = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT])
        {
            std::thread::spawn(move || {
                for _ in signals.forever() {
                    if interrupts.fetch_add(1, Ordering::SeqCst) > 0 {
                        std::process::exit(EXIT_CANCELLED.into());
                    }
                    let _ = handle.cancel(id);
                }
            });
        }
    }
    let tty = std::io::stdout().is_terminal();
    // Progress before the first token goes to stderr on a terminal, on one
    // line that the first token clears.
    let show_stage = !a.json && std::io::stderr().is_terminal();
    let mut stage_shown = false;
    let mut out = std::io::stdout().lock();
    let mut last_char = '\n';
    let mut reply = String::new();
    for piece in stream {
        if stage_shown && !matches!(piece, Ok(Piece::Stage(_))) {
            eprint!("\r\x1b[2K");
            stage_shown = false;
        }
        match piece {
            Ok(Piece::Stage(stage)) => {
                if a.json {
                    json_line(stage_json(stage));
                } else if show_stage {
                    eprint!("\r\x1b[2K{}", stage_text(stage));
                    stage_shown = true;
                }
            }
            Ok(Piece::Logprobs(list)) => {
                for lp in list {
                    let top: Vec<serde_json::Value> = lp
                        .top
                        .iter()
                        .map(|t| {
                            json!({
                                "token": t.token,
                                "text": String::from_utf8_lossy(&t.bytes),
                                "logprob": t.logprob,
                            })
                        })
                        .collect();
                    json_line(json!({
                        "event": "logprobs",
                        "token": lp.token,
                        "text": String::from_utf8_lossy(&lp.bytes),
                        "logprob": lp.logprob,
                        "top": top,
                    }));
                }
            }
            Ok(Piece::Token(text)) => {
                if session.is_some() {
                    reply.push_str(&text);
                }
                if a.json {
                    json_line(json!({"event": "token", "text": text}));
                } else {
                    let _ = out.write_all(text.as_bytes());
                    let _ = out.flush();
                    last_char = text.chars().last().unwrap_or(last_char);
                }
            }
            Ok(Piece::Done(stats)) => {
                if a.json {
                    json_line(done_json(&stats));
                } else if tty && last_char != '\n' {
                    let _ = writeln!(out);
                }
                if a.verbose {
                    eprintln!(
                        "{} prompt tokens, {} generated, first token after {:.1} ms, \
                         prefill {:.1} tok/s, decode {:.1} tok/s, stop: {}",
                        stats.prompt_tokens,
                        stats.generated_tokens,
                        stats.time_to_first_token_us as f64 / 1000.0,
                        stats.prefill_tokens_per_s,
                        stats.decode_tokens_per_s,
                        stop_name(stats.stop)
                    );
                    if stats.cached_tokens > 0 || stats.dropped_messages > 0 {
                        eprintln!(
                            "{} prompt tokens from the cache, {} earlier messages left out",
                            stats.cached_tokens, stats.dropped_messages
                        );
                    }
                }
                if let (Some(conv), Some(dir), Some(name)) = (&mut session, &sessions, &a.session) {
                    // The turn is kept once it has an answer, even a partial one.
                    conv.messages.push(chat::Message {
                        role: chat::Role::Assistant,
                        content: std::mem::take(&mut reply),
                        model: model.clone(),
                        stats: Some(chat::Stats::from_gen(&stats)),
                        error: None,
                    });
                    crate::store::save_session(dir, name, conv)
                        .map_err(|e| CliError::Other(format!("saving session {name}: {e}")))?;
                }
                let code = if stats.stop == StopReason::Cancelled {
                    EXIT_CANCELLED
                } else {
                    0
                };
                return Ok(ExitCode::from(code));
            }
            Err(mut e) => {
                if let ClientError::Daemon(w) = &mut e {
                    if w.kind == ErrorKind::ContextOverflow && !a.drop_oldest && !a.raw {
                        w.message += " (with --drop-oldest the oldest turns make room)";
                    }
                }
                if a.json {
                    if let ClientError::Daemon(w) = &e {
                        json_line(json!({
                            "event": "error",
                            "kind": kind_name(w.kind),
                            "message": w.message,
                        }));
                    }
                }
                return Err(e.into());
            }
        }
    }
    Err(ClientError::Disconnected.into())
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, CliError> {
    serde_json::to_string_pretty(v).map_err(|e| CliError::Other(e.to_string()))
}

pub fn ps(ctx: &Ctx, json: bool) -> Result<ExitCode, CliError> {
    let client = ctx.running()?;
    let Response::Status(s) = client.call(Request::Status)? else {
        return Err(CliError::Other("unexpected answer to Status".into()));
    };
    if json {
        println!("{}", to_json(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    if s.models.is_empty() {
        println!("no models loaded");
    } else {
        println!(
            "{:<32} {:>6} {:<9} {:>6} {:>8} {:>8} {:>7} {:>8}",
            "MODEL", "WORKER", "STATE", "BATCH", "SERVED", "TOK/S", "QUEUED", "CONTEXT"
        );
        for m in &s.models {
            for (i, w) in m.workers.iter().enumerate() {
                // The model's own columns on its first row.
                let (queued, context) = if i == 0 {
                    (m.queued.to_string(), m.context.to_string())
                } else {
                    (String::new(), String::new())
                };
                println!(
                    "{:<32} {:>6} {:<9} {:>6} {:>8} {:>8.1} {:>7} {:>8}",
                    m.reference,
                    w.id,
                    format!("{:?}", w.state).to_lowercase(),
                    // Requests it decodes together now, of the most it takes.
                    format!("{}/{}", w.sequences, w.batch),
                    w.requests_served,
                    w.tokens_per_s,
                    queued,
                    context
                );
            }
            if m.caches > 0 {
                println!(
                    "{:<32} conversation caches: {} ({})",
                    m.reference,
                    m.caches,
                    human_bytes(m.cache_bytes)
                );
            }
        }
    }
    println!(
        "memory: {} used of a {} budget",
        human_bytes(s.memory_used_bytes),
        human_bytes(s.memory_budget_bytes)
    );
    Ok(ExitCode::SUCCESS)
}

pub fn models(ctx: &Ctx, json: bool) -> Result<ExitCode, CliError> {
    let client = ctx.running()?;
    let Response::Models(list) = client.call(Request::ListModels)? else {
        return Err(CliError::Other("unexpected answer to ListModels".into()));
    };
    if json {
        println!("{}", to_json(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() {
        println!("no models: `paraphym pull qwen3:1.7b` downloads one");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<8} {:>10} {:<7} PATH",
        "MODEL", "ARCH", "SIZE", "LOADED"
    );
    for m in list {
        println!(
            "{:<24} {:<8} {:>10} {:<7} {}",
            m.reference,
            m.architecture,
            human_bytes(m.size_bytes),
            if m.loaded { "yes" } else { "no" },
            m.path
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn pull(ctx: &Ctx, model: &str) -> Result<ExitCode, CliError> {
    let client = ctx.started()?;
    let replies = client.stream(Request::Pull {
        model: model.to_owned(),
    })?;
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut drew = false;
    loop {
        let r = replies.recv()?;
        match r {
            Response::Progress { done, total } => {
                if tty {
                    draw_bar(model, done, total, start.elapsed());
                    drew = true;
                }
            }
            Response::Pulled { path, .. } => {
                if drew {
                    eprintln!();
                }
                println!("{path}");
                return Ok(ExitCode::SUCCESS);
            }
            Response::Error(e) => {
                if drew {
                    eprintln!();
                }
                return Err(ClientError::Daemon(e).into());
            }
            other => {
                return Err(CliError::Other(format!(
                    "unexpected answer to Pull: {other:?}"
                )))
            }
        }
    }
}

fn draw_bar(model: &str, done: u64, total: u64, elapsed: Duration) {
    const WIDTH: usize = 30;
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
    let line = if total > 0 {
        let frac = (done as f64 / total as f64).clamp(0.0, 1.0);
        let filled = (frac * WIDTH as f64).round() as usize;
        format!(
            "{model} [{}{}] {:>3.0}% {} / {} {}/s",
            "#".repeat(filled),
            "-".repeat(WIDTH - filled),
            frac * 100.0,
            human_bytes(done),
            human_bytes(total),
            human_bytes(rate as u64)
        )
    } else {
        format!(
            "{model} {} {}/s",
            human_bytes(done),
            human_bytes(rate as u64)
        )
    };
    eprint!("\r\x1b[2K{line}");
}

pub fn load(
    ctx: &Ctx,
    model: &str,
    keep_alive: Option<&str>,
    context: Option<u32>,
) -> Result<ExitCode, CliError> {
    let keep_alive_ms = match keep_alive {
        Some(k) => Some(units::to_wire_ms(
            units::parse_duration(k).map_err(CliError::Usage)?,
        )),
        None => None,
    };
    let client = ctx.started()?;
    match client.call(Request::Load {
        model: model.to_owned(),
        keep_alive_ms,
        context,
    })? {
        Response::Loaded { model } => {
            println!("loaded {model}");
            Ok(ExitCode::SUCCESS)
        }
        other => Err(CliError::Other(format!(
            "unexpected answer to Load: {other:?}"
        ))),
    }
}

pub fn show(ctx: &Ctx, model: &str, json: bool, template: bool) -> Result<ExitCode, CliError> {
    let client = ctx.started()?;
    let d = match client.call(Request::Show {
        model: model.to_owned(),
    })? {
        Response::Details(d) => d,
        other => {
            return Err(CliError::Other(format!(
                "unexpected answer to Show: {other:?}"
            )))
        }
    };
    if json {
        println!("{}", to_json(&d)?);
        return Ok(ExitCode::SUCCESS);
    }
    let params = if d.parameters >= 1_000_000_000 {
        format!("{:.2}B", d.parameters as f64 / 1e9)
    } else {
        format!("{:.0}M", d.parameters as f64 / 1e6)
    };
    println!("model         {}", d.reference);
    println!("file          {}", d.path);
    println!("architecture  {}", d.architecture);
    println!("parameters    {params}");
    println!("quantization  {}", d.quantization);
    println!(
        "context       {} served (trained for {})",
        d.context, d.context_length
    );
    println!("file size     {}", human_bytes(d.size_bytes));
    println!(
        "memory        about {} with one worker",
        human_bytes(d.memory_bytes)
    );
    println!("loaded        {}", if d.loaded { "yes" } else { "no" });
    if template {
        println!("template      {}\n{}", d.template_origin, d.chat_template);
    } else {
        println!(
            "template      {}, {} lines (--template prints it)",
            d.template_origin,
            d.chat_template.lines().count()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn rm(ctx: &Ctx, model: &str) -> Result<ExitCode, CliError> {
    let client = ctx.started()?;
    match client.call(Request::Remove {
        model: model.to_owned(),
    })? {
        Response::Removed { model, path } => {
            println!("removed {model} ({path})");
            Ok(ExitCode::SUCCESS)
        }
        other => Err(CliError::Other(format!(
            "unexpected answer to Remove: {other:?}"
        ))),
    }
}

pub fn unload(ctx: &Ctx, model: &str) -> Result<ExitCode, CliError> {
    let client = ctx.running()?;
    match client.call(Request::Unload {
        model: model.to_owned(),
    })? {
        Response::Unloaded { model } => {
            println!("unloaded {model}");
            Ok(ExitCode::SUCCESS)
        }
        other => Err(CliError::Other(format!(
            "unexpected answer to Unload: {other:?}"
        ))),
    }
}

pub fn health(ctx: &Ctx, json: bool) -> Result<ExitCode, CliError> {
    let client = ctx.running()?;
    let Response::Health(h) = client.call(Request::Health)? else {
        return Err(CliError::Other("unexpected answer to Health".into()));
    };
    if json {
        println!("{}", to_json(&h)?);
    } else {
        println!(
            "{} — paraphymd {}, up {}s, socket {}",
            if h.ok { "ok" } else { "unwell" },
            h.version,
            h.uptime_ms / 1000,
            client.path().display()
        );
        for m in &h.models {
            let workers: Vec<String> = m
                .workers
                .iter()
                .map(|(s, n)| format!("{n} {}", format!("{s:?}").to_lowercase()))
                .collect();
            println!(
                "  {} {} — workers: {}{}",
                if m.ok { "ok    " } else { "FAILING" },
                m.model,
                if workers.is_empty() {
                    "none".into()
                } else {
                    workers.join(", ")
                },
                if m.problem.is_empty() {
                    String::new()
                } else {
                    format!("; {}", m.problem)
                }
            );
        }
    }
    Ok(if h.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_ERROR)
    })
}

pub fn stop(ctx: &Ctx) -> Result<ExitCode, CliError> {
    let socket = ctx.socket()?;
    let client = ctx.running()?;
    match client.call(Request::Shutdown) {
        Err(ClientError::Daemon(e)) if e.kind == ErrorKind::ShuttingDown => {}
        Err(ClientError::Disconnected) => {}
        Err(e) => return Err(e.into()),
        Ok(other) => {
            return Err(CliError::Other(format!(
                "unexpected answer to Shutdown: {other:?}"
            )))
        }
    }
    // Stopped once the socket file is gone.
    let start = Instant::now();
    while socket.exists() && start.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(20));
    }
    if socket.exists() {
        return Err(CliError::Other(
            "the daemon is still stopping after 15 s".into(),
        ));
    }
    println!("stopped");
    Ok(ExitCode::SUCCESS)
}

pub fn version(ctx: &Ctx) -> Result<ExitCode, CliError> {
    println!(
        "paraphym {} (protocol {})",
        env!("CARGO_PKG_VERSION"),
        paraphym_protocol::PROTOCOL_VERSION
    );
    let daemon = ctx
        .socket()
        .ok()
        .and_then(|s| paraphym_protocol::client::Client::connect(&s).ok())
        .and_then(|c| match c.call(Request::Health) {
            Ok(Response::Health(h)) => Some(h.version),
            _ => None,
        });
    match daemon {
        Some(v) => println!("paraphymd {v} (running)"),
        None => println!("paraphymd not running"),
    }
    Ok(ExitCode::SUCCESS)
}
