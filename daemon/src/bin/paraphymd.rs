//! paraphymd: the daemon. Keeps models warm and serves them on a Unix socket
//! (docs/PROTOCOL.md). Usually started by `paraphym` when needed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::{Context, Result};
use clap::Parser;
use paraphym_daemon::config::{DaemonConfig, FOREVER};
use paraphym_daemon::engine::device::{self, DeviceSpec};
use paraphym_daemon::engine::Turns;
use paraphym_daemon::registry;
use paraphym_daemon::server::{self, Daemon, ServeError};
use paraphym_protocol::{paths, units};
use tracing_subscriber::prelude::*;

#[derive(Parser, Debug)]
#[command(
    name = "paraphymd",
    version,
    about = "paraphym's daemon: warm models on a Unix socket"
)]
struct Args {
    /// Socket path [default: $PARAPHYM_SOCKET, else $XDG_RUNTIME_DIR/paraphym-v5/paraphymd.sock, else ~/.paraphym/paraphym-v5/paraphymd.sock]
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The model for requests that name none [default: $PARAPHYM_MODEL, the config file's default_model, qwen3:1.7b]
    #[arg(long)]
    model: Option<String>,
    /// Prompt tokens per prefill chunk (a cancel lands within one chunk).
    #[arg(long, default_value_t = 256)]
    prefill_chunk: usize,
    /// Sequences a worker decodes together in one batched pass at most;
    /// more workers start only when batches are full (1: one request per
    /// worker).
    #[arg(long, default_value_t = DaemonConfig::DEFAULT_BATCH)]
    batch: usize,
    /// How workers decode: `fixed` (a fixed-shape step over slots, replayed
    /// as CUDA graphs on a GPU), `plain` (a forward pass shaped by its
    /// sequences), `auto` (fixed on CUDA, plain elsewhere).
    #[arg(long, default_value = "auto", value_parser = parse_decode_step)]
    decode_step: paraphym_daemon::config::DecodeStep,
    /// Workers a model starts with on first use.
    #[arg(long, default_value_t = 2)]
    prewarm: usize,
    /// Workers kept per loaded model however idle.
    #[arg(long, default_value_t = 1)]
    min_workers: usize,
    /// Workers per model at most [default: half the cores, 2 to 8].
    #[arg(long)]
    max_workers: Option<usize>,
    /// A worker idle this long is retired (down to --min-workers).
    #[arg(long, default_value = "60s")]
    idle_period: String,
    /// Consecutive failures that open a model's circuit breaker.
    #[arg(long, default_value_t = 3)]
    breaker_failures: u32,
    /// How long an open breaker fails requests fast before one trial.
    #[arg(long, default_value = "30s")]
    breaker_cooldown: String,
    /// A busy worker without progress for this long is replaced.
    #[arg(long, default_value = "60s")]
    stuck_timeout: String,
    /// Requests waiting per model before new ones get "busy".
    #[arg(long, default_value_t = DaemonConfig::DEFAULT_MAX_QUEUE)]
    max_queue: usize,
    /// How long an idle model stays loaded (300ms, 30s, 5m, 1h, forever).
    #[arg(long, default_value = "5m")]
    keep_alive: String,
    /// Context length of loaded models [default: the engine's, capped by the model].
    #[arg(long)]
    context: Option<usize>,
    /// Idle conversation caches (KV caches kept for a chat's next turn) per
    /// model beyond one per worker; the memory budget drops them first.
    #[arg(long, default_value_t = DaemonConfig::DEFAULT_CONVERSATION_CACHES)]
    conversation_caches: usize,
    /// Serve the GGUF models of this Ollama models folder in place, as
    /// `ollama:NAME:TAG` [default: ollama_models in the config file]
    #[arg(long, value_name = "DIR")]
    ollama_models: Option<PathBuf>,
    /// Serve the GGUF files of this LM Studio models folder in place, as
    /// `lmstudio:PUBLISHER/REPO/FILE.gguf` [default: lmstudio_models in the config file]
    #[arg(long, value_name = "DIR")]
    lmstudio_models: Option<PathBuf>,
    /// cpu, cuda[:N] or metal[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Log file [default: $XDG_STATE_HOME/paraphym/paraphymd.log, else ~/.local/state/paraphym/paraphymd.log].
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// A connection's outbox in bytes; generations wait while it is full.
    #[arg(long, default_value_t = DaemonConfig::DEFAULT_OUTBOX_BYTES)]
    outbox_bytes: usize,
    /// A client that has not read for this long is cut off.
    #[arg(long, default_value = "10s")]
    write_timeout: String,
    /// Connections served at once.
    #[arg(long, default_value_t = DaemonConfig::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Memory the models may take (8GiB, 512MiB; 0: no limit) [default: on CUDA 90% of the GPU's free memory, else 80% of the memory available at start].
    #[arg(long)]
    memory_budget: Option<String>,
    /// How workers on one GPU take turns: `launch` (one launches its step's
    /// kernels at a time), `step` (one step runs at a time) or `off`.
    #[arg(long, default_value = "launch", value_parser = ["off", "launch", "step"])]
    gpu_turns: String,
    /// Load these models at start (repeatable).
    #[arg(long)]
    preload: Vec<String>,
    /// Serve OpenAI- and Ollama-compatible HTTP APIs, /health and /metrics on
    /// PORT (loopback) or ADDRESS:PORT. Off by default; there is no
    /// authentication, so anything but loopback must be asked for by address.
    #[arg(long, value_name = "[ADDRESS:]PORT")]
    http: Option<String>,
    /// HTTP: a request's headers must arrive within this.
    #[arg(long, default_value = "10s")]
    http_header_timeout: String,
    /// HTTP: a request's body must arrive within this.
    #[arg(long, default_value = "30s")]
    http_body_timeout: String,
    /// HTTP: the largest request body (bytes; 8MiB, 512KiB).
    #[arg(long, default_value = "8MiB")]
    http_max_body: String,
}

fn default_log_file() -> Option<PathBuf> {
    let state = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(state.join("paraphym").join("paraphymd.log"))
}

fn init_logging(file: Option<&PathBuf>) -> Result<()> {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("PARAPHYM_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter());
    let file_layer = match file {
        Some(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening the log file {}", path.display()))?;
            Some(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(Mutex::new(f))
                    .with_filter(filter()),
            )
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(stderr)
        .with(file_layer)
        .init();
    Ok(())
}

fn run(args: Args) -> Result<ExitCode> {
    let log_file = args.log_file.clone().or_else(default_log_file);
    init_logging(log_file.as_ref())?;

    let (socket, owns_dir) = match (&args.socket, paths::default_socket()) {
        (Some(s), _) => (s.clone(), false),
        (None, Some(s)) => (s, std::env::var_os(paths::SOCKET_ENV).is_none()),
        (None, None) => anyhow::bail!("no socket path: pass --socket or set HOME"),
    };
    let env_model = std::env::var("PARAPHYM_MODEL").ok();
    let config_file = registry::Config::load()?;
    let (default_model, _) = registry::choose(
        args.model.as_deref(),
        env_model.as_deref(),
        config_file.default_model.as_deref(),
    );
    let mut config = DaemonConfig::new(socket.clone(), default_model.to_owned());
    config.owns_socket_dir = owns_dir;
    config.prewarm = args.prewarm.max(1);
    config.prefill_chunk = args.prefill_chunk.max(1);
    config.batch = args.batch.max(1);
    config.decode_step = args.decode_step;
    config.min_workers = args.min_workers;
    if let Some(m) = args.max_workers {
        config.max_workers = m.max(1);
    }
    config.min_workers = config.min_workers.min(config.max_workers);
    config.breaker_failures = args.breaker_failures.max(1);
    config.breaker_cooldown = units::parse_duration(&args.breaker_cooldown)
        .map_err(anyhow::Error::msg)?
        .context("--breaker-cooldown must be finite")?;
    config.stuck_timeout = units::parse_duration(&args.stuck_timeout)
        .map_err(anyhow::Error::msg)?
        .unwrap_or(std::time::Duration::MAX);
    config.idle_period = units::parse_duration(&args.idle_period)
        .map_err(anyhow::Error::msg)?
        .unwrap_or(std::time::Duration::MAX);
    config.max_queue = args.max_queue.max(1);
    config.keep_alive = units::parse_duration(&args.keep_alive)
        .map_err(anyhow::Error::msg)?
        .unwrap_or(FOREVER);
    config.context = args.context;
    config.conversation_caches = args.conversation_caches;
    config.library = paraphym_daemon::library::Folders {
        ollama: args
            .ollama_models
            .clone()
            .or(config_file.ollama_models.clone()),
        lmstudio: args
            .lmstudio_models
            .clone()
            .or(config_file.lmstudio_models.clone()),
    };
    config.device = DeviceSpec::parse(&args.device)?.open()?;
    if !config.device.is_cpu() {
        config.gpu_turns = match args.gpu_turns.as_str() {
            "launch" => Some(Turns::new(false)),
            "step" => Some(Turns::new(true)),
            _ => None,
        };
    }
    config.outbox_bytes = args.outbox_bytes.max(1024);
    config.write_timeout = units::parse_duration(&args.write_timeout)
        .map_err(anyhow::Error::msg)?
        .context("--write-timeout must be finite")?;
    config.max_connections = args.max_connections.max(1);
    if let Some(b) = &args.memory_budget {
        config.memory_budget_bytes = units::parse_bytes(b).map_err(anyhow::Error::msg)?;
    } else if let Some((free, total)) = device::gpu_memory(&config.device) {
        // Weights and KV caches live on the card: budget from its memory,
        // leaving a tenth of what is free for Candle's scratch and cuBLAS.
        config.memory_budget_bytes = free / 10 * 9;
        tracing::info!(
            free_mib = free >> 20,
            total_mib = total >> 20,
            budget_mib = config.memory_budget_bytes >> 20,
            "memory budget from the GPU's free memory"
        );
    }

    let bound = match server::bind(&socket, owns_dir) {
        Ok(b) => b,
        Err(e @ ServeError::AlreadyRunning(_)) => {
            tracing::error!("{e}");
            return Ok(ExitCode::from(3));
        }
        Err(e) => return Err(e.into()),
    };
    let daemon = Daemon::new(config);
    {
        let daemon = daemon.clone();
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ])?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    tracing::info!(signal = sig, "stopping on a signal");
                    daemon.request_stop();
                }
            })?;
    }
    for model in &args.preload {
        daemon.preload(model);
    }
    if let Some(addr) = &args.http {
        let mut http = paraphym_daemon::http::HttpConfig::new(
            paraphym_daemon::http::parse_addr(addr).map_err(anyhow::Error::msg)?,
        );
        http.header_timeout = units::parse_duration(&args.http_header_timeout)
            .map_err(anyhow::Error::msg)?
            .context("--http-header-timeout must be finite")?;
        http.body_timeout = units::parse_duration(&args.http_body_timeout)
            .map_err(anyhow::Error::msg)?
            .context("--http-body-timeout must be finite")?;
        http.max_body =
            units::parse_bytes(&args.http_max_body).map_err(anyhow::Error::msg)? as usize;
        http.max_connections = daemon.config.max_connections;
        paraphym_daemon::http::start(daemon.clone(), socket.clone(), http)
            .with_context(|| format!("--http {addr}"))?;
    }
    server::serve(daemon, bound);
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    paraphym_daemon::pool::tune_allocator();
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("paraphymd: {e:#}");
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_decode_step(s: &str) -> Result<paraphym_daemon::config::DecodeStep, String> {
    paraphym_daemon::config::DecodeStep::parse(s)
        .ok_or_else(|| format!("{s}: auto, fixed or plain"))
}
