//! Stream a raw completion from a GGUF model on the CPU:
//!
//!     cargo run --release -p paraphym-daemon --example complete -- [--model MODEL] "Paris is the capital of" [MAX_TOKENS]
//!
//! MODEL is a reference (docs/MODELS.md): a file, an alias such as `qwen3:1.7b`,
//! or `hf:owner/name/file.gguf`, pulled into the Hugging Face cache if needed;
//! without `--model`, `PARAPHYM_MODEL`, the config file's `default_model`, then
//! `qwen3:1.7b`.
//!
//! The daemon and its clients replace this once they exist; it stays as the
//! smallest complete use of the engine.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use paraphym_daemon::engine::{Engine, GenEvent, GenParams, LoadOptions, Prompt, SamplingParams};
use paraphym_daemon::pull::{self, Hub, HubConfig, TermProgress};
use paraphym_daemon::registry;

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let flag = match args.iter().position(|a| a == "--model") {
        Some(i) if i + 1 < args.len() => {
            let v = args.remove(i + 1);
            args.remove(i);
            Some(v)
        }
        Some(_) => anyhow::bail!("usage: complete [--model MODEL] [PROMPT] [MAX_TOKENS]"),
        None => None,
    };
    // --model, else PARAPHYM_MODEL, else the config file's default_model,
    // else the built-in default (docs/MODELS.md).
    let env = std::env::var("PARAPHYM_MODEL").ok();
    let config = registry::Config::load()?;
    let (reference, origin) = registry::choose(
        flag.as_deref(),
        env.as_deref(),
        config.default_model.as_deref(),
    );
    let parsed = registry::parse(reference, |p| p.is_file())
        .with_context(|| format!("model from {}", origin.describe()))?;
    let hub = Hub::new(HubConfig::from_env())?;
    let model: PathBuf = pull::locate(&parsed, &hub, TermProgress::default())?;
    let mut args = args.into_iter();
    let prompt = args
        .next()
        .unwrap_or_else(|| "Paris is the capital of".into());
    let max_tokens = args.next().map(|s| s.parse()).transpose()?.unwrap_or(64);

    let mut engine = Engine::load(&model, &LoadOptions::default())?;
    eprintln!(
        "loaded {} ({}) in {:.2} s",
        model.display(),
        engine.model().architecture(),
        engine.load_time().as_secs_f64()
    );
    let params = GenParams {
        sampling: SamplingParams::greedy(),
        max_tokens,
        ..GenParams::default()
    };
    print!("{prompt}");
    let mut stdout = std::io::stdout();
    let g = engine.generate(
        Prompt::Text(&prompt),
        &params,
        &AtomicBool::new(false),
        |ev| {
            if let GenEvent::Text(t) = ev {
                print!("{t}");
                let _ = stdout.flush();
            }
        },
    )?;
    println!();
    eprintln!(
        "{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s ({:?})",
        g.prompt_tokens,
        g.prefill_tps(),
        g.tokens.len(),
        g.decode_tps(),
        g.finish
    );
    Ok(())
}
