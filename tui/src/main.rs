//! paraphym: the client. Subcommands script the daemon over its socket;
//! the terminal UI (no subcommand) is built on the same client library.

mod app;
mod cli;
mod conn;
mod state;
mod store;
mod term;
mod ui;
mod view;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "paraphym",
    version,
    about = "Local LLMs, kept warm by paraphymd",
    long_about = "Local LLMs, kept warm by paraphymd.\n\nWithout a subcommand: the chat \
                  TUI (F1 in it lists the keys). With one: scripting over the daemon's socket."
)]
struct Cli {
    /// The daemon's socket [default: $PARAPHYM_SOCKET, else $XDG_RUNTIME_DIR/paraphym-v5/paraphymd.sock, else ~/.paraphym/paraphym-v5/paraphymd.sock]
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(flatten)]
    chat: ChatArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

/// The TUI's starting settings (each chat can change them: /set, /system).
#[derive(clap::Args, Debug)]
struct ChatArgs {
    /// The model to chat with [default: $PARAPHYM_MODEL, else the daemon's default]
    #[arg(long)]
    model: Option<String>,
    /// A system prompt for new chats.
    #[arg(long)]
    system: Option<String>,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<u32>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Ask a thinking model (Qwen3) to think first.
    #[arg(long, conflicts_with = "no_think")]
    think: bool,
    /// Ask a thinking model (Qwen3) not to think.
    #[arg(long)]
    no_think: bool,
    /// Completion instead of chat: each message is text for the model to
    /// continue (base models without a chat template).
    #[arg(long)]
    raw: bool,
}

impl ChatArgs {
    fn settings(&self) -> state::chat::Settings {
        state::chat::Settings {
            system: self.system.clone(),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            max_tokens: self.max_tokens,
            think: match (self.think, self.no_think) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            raw: self.raw,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate: tokens to stdout as they arrive (starts the daemon if needed).
    Run(cli::RunArgs),
    /// Loaded models, their workers and queues, and memory.
    Ps {
        #[arg(long)]
        json: bool,
    },
    /// Models the daemon can serve: loaded ones and downloaded aliases.
    Models {
        #[arg(long)]
        json: bool,
    },
    /// Download a model into the local cache (resumes; starts the daemon if needed).
    Pull { model: String },
    /// Load a model and keep it warm (starts the daemon if needed).
    Load {
        model: String,
        /// How long it stays loaded when idle (30s, 5m, 1h, forever).
        #[arg(long)]
        keep_alive: Option<String>,
        /// Serve at least this many positions (capped at what the model
        /// was trained for) [default: the daemon's --context].
        #[arg(long, value_name = "TOKENS", value_parser = clap::value_parser!(u32).range(1..))]
        context: Option<u32>,
    },
    /// Unload a model.
    Unload { model: String },
    /// What a model is: architecture, quantization, parameters, context,
    /// sizes, chat template (starts the daemon if needed).
    Show {
        model: String,
        #[arg(long)]
        json: bool,
        /// Print the whole chat template.
        #[arg(long)]
        template: bool,
    },
    /// Delete a downloaded model (unloading it first). Never deletes files
    /// paraphym did not download.
    Rm { model: String },
    /// Is the daemon up and well? (exit 0 yes, 1 unwell, 3 not running)
    Health {
        #[arg(long)]
        json: bool,
    },
    /// Stop the daemon: in-flight requests end with an error.
    Stop,
    /// This client's version, the protocol's, and the daemon's if one runs.
    Version,
    /// The engine view alone, full screen: workers, queues, throughput, memory.
    Watch,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let tui = |mode| {
        let socket = conn::socket_path(cli.socket.as_deref())?;
        ui::run(ui::Options {
            mode,
            socket,
            explicit_socket: cli.socket.is_some(),
            model: cli.chat.model.clone().or_else(|| {
                std::env::var("PARAPHYM_MODEL")
                    .ok()
                    .filter(|m| !m.is_empty())
            }),
            settings: cli.chat.settings(),
        })
    };
    let ctx = cli::Ctx::new(cli.socket.clone());
    let Some(command) = cli.command else {
        return finish(tui(app::Mode::Chat));
    };
    let result = match command {
        Command::Run(args) => cli::run(&ctx, args),
        Command::Ps { json } => cli::ps(&ctx, json),
        Command::Models { json } => cli::models(&ctx, json),
        Command::Pull { model } => cli::pull(&ctx, &model),
        Command::Load {
            model,
            keep_alive,
            context,
        } => cli::load(&ctx, &model, keep_alive.as_deref(), context),
        Command::Unload { model } => cli::unload(&ctx, &model),
        Command::Show {
            model,
            json,
            template,
        } => cli::show(&ctx, &model, json, template),
        Command::Rm { model } => cli::rm(&ctx, &model),
        Command::Health { json } => cli::health(&ctx, json),
        Command::Stop => cli::stop(&ctx),
        Command::Version => cli::version(&ctx),
        Command::Watch => tui(app::Mode::Watch),
    };
    finish(result)
}

fn finish(result: Result<ExitCode, cli::CliError>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("paraphym: {e}");
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
