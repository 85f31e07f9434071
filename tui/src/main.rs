//! paraphym: the client. Subcommands script the daemon over its socket;
//! the terminal UI (no subcommand) is built on the same client library.

mod cli;
mod conn;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "paraphym",
    version,
    about = "Local LLMs, kept warm by paraphymd",
    arg_required_else_help = true
)]
struct Cli {
    /// The daemon's socket [default: $PARAPHYM_SOCKET, else $XDG_RUNTIME_DIR/paraphym-v1/paraphymd.sock, else ~/.paraphym/paraphym-v1/paraphymd.sock]
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
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
    },
    /// Unload a model.
    Unload { model: String },
    /// Is the daemon up and well? (exit 0 yes, 1 unwell, 3 not running)
    Health {
        #[arg(long)]
        json: bool,
    },
    /// Stop the daemon: in-flight requests end with an error.
    Stop,
    /// This client's version, the protocol's, and the daemon's if one runs.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ctx = cli::Ctx::new(cli.socket);
    let result = match cli.command {
        Command::Run(args) => cli::run(&ctx, args),
        Command::Ps { json } => cli::ps(&ctx, json),
        Command::Models { json } => cli::models(&ctx, json),
        Command::Pull { model } => cli::pull(&ctx, &model),
        Command::Load { model, keep_alive } => cli::load(&ctx, &model, keep_alive.as_deref()),
        Command::Unload { model } => cli::unload(&ctx, &model),
        Command::Health { json } => cli::health(&ctx, json),
        Command::Stop => cli::stop(&ctx),
        Command::Version => cli::version(&ctx),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("paraphym: {e}");
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
