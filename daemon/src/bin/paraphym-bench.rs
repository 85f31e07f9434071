//! paraphym-bench: measurements that print figures side by side.
//!
//! `load` spawns one child process per repetition (this binary again, as
//! `load-child`) that only loads the model and runs the warm-up pass, and
//! reports the load time and the child's peak RSS (VmHWM).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use paraphym_daemon::engine::{score, Engine, LoadOptions};
use paraphym_daemon::synth;

#[derive(Parser)]
#[command(version, about = "paraphym benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load time and peak RSS, each repetition in a fresh child process.
    Load {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Fail if the median load time exceeds this many seconds.
        #[arg(long)]
        max_load_s: Option<f64>,
        /// Fail if the largest peak RSS exceeds this many MiB.
        #[arg(long)]
        max_rss_mib: Option<f64>,
    },
    /// (internal) load once and print `load_s=… vmhwm_kib=…`.
    #[command(hide = true)]
    LoadChild {
        #[arg(long)]
        model: PathBuf,
    },
    /// Write a synthetic model (random weights, real shape and vocabulary).
    Synth {
        /// qwen3 | llama | gemma3
        #[arg(long)]
        arch: String,
        /// tiny | qwen3-0.6b | qwen3-1.7b
        #[arg(long)]
        shape: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The tokenizer.json whose vocabulary the model gets (default: the
        /// architecture's reference tokenizer, from scripts/fetch-tokenizers.sh).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
    /// Perplexity of a text file by llama-perplexity's method.
    Perplexity {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        text: PathBuf,
        #[arg(long, default_value_t = 256)]
        ctx: usize,
        #[arg(long, default_value_t = 12)]
        chunks: usize,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::LoadChild { model } => {
            let t = Instant::now();
            let engine = Engine::load(&model, &LoadOptions::default())?;
            let secs = t.elapsed().as_secs_f64();
            drop(engine);
            println!("load_s={secs:.4} vmhwm_kib={}", vm_hwm_kib()?);
            Ok(())
        }
        Cmd::Load {
            model,
            reps,
            max_load_s,
            max_rss_mib,
        } => load(&model, reps, max_load_s, max_rss_mib),
        Cmd::Synth {
            arch,
            shape,
            out,
            seed,
            tokenizer,
        } => {
            let arch = synth::Arch::parse(&arch)
                .with_context(|| format!("unknown --arch {arch} (qwen3, llama, gemma3)"))?;
            let size = synth::Size::parse(&shape).with_context(|| {
                format!("unknown --shape {shape} (tiny, qwen3-0.6b, qwen3-1.7b)")
            })?;
            let tokenizer = match tokenizer {
                Some(t) => t,
                None => synth::reference_tokenizer(arch.tokenizer_family())?,
            };
            let t = Instant::now();
            let vocab = synth::Vocabulary::from_tokenizer_json(&tokenizer, arch)?;
            synth::write(arch, size, &vocab, seed, &out)?;
            let bytes = std::fs::metadata(&out)?.len();
            eprintln!(
                "wrote {} ({:.1} MB) in {:.1} s",
                out.display(),
                bytes as f64 / 1e6,
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Cmd::Perplexity {
            model,
            text,
            ctx,
            chunks,
        } => {
            let mut engine = Engine::load(&model, &LoadOptions::default())?;
            let text = std::fs::read_to_string(&text)
                .with_context(|| format!("reading {}", text.display()))?;
            let tokens = engine.tokenizer().encode(&text, true)?;
            let bos = engine.tokenizer().bos();
            let t = Instant::now();
            let p = score::perplexity(engine.model_mut(), &tokens, bos, ctx, chunks)?;
            println!(
                "perplexity {:.4} over {} chunks of {ctx} ({} scored tokens) in {:.1} s",
                p.ppl,
                p.chunks,
                p.scored_tokens,
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

fn load(model: &PathBuf, reps: usize, max_s: Option<f64>, max_mib: Option<f64>) -> Result<()> {
    let exe = std::env::current_exe()?;
    let mut secs = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..reps.max(1) {
        let out = Command::new(&exe)
            .arg("load-child")
            .arg("--model")
            .arg(model)
            .output()?;
        if !out.status.success() {
            bail!(
                "load child failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let line = String::from_utf8(out.stdout)?;
        let field = |k: &str| -> Result<f64> {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k))
                .context("malformed child output")?
                .parse::<f64>()
                .context("malformed child output")
        };
        secs.push(field("load_s=")?);
        rss.push(field("vmhwm_kib=")? / 1024.0);
    }
    let (s, r) = (Stats::of(&secs), Stats::of(&rss));
    println!("model     {}", model.display());
    println!("cpu       {}", cpu_features());
    println!(
        "runs      {} child processes (load + warm-up only)",
        secs.len()
    );
    println!(
        "load s    median {:.3}  min {:.3}  max {:.3}",
        s.median, s.min, s.max
    );
    println!(
        "VmHWM MiB median {:.0}  min {:.0}  max {:.0}",
        r.median, r.min, r.max
    );
    let mut failed = false;
    if let Some(m) = max_s {
        let ok = s.median <= m;
        failed |= !ok;
        println!(
            "target    load median {:.3} s <= {m} s: {}",
            s.median,
            verdict(ok)
        );
    }
    if let Some(m) = max_mib {
        let ok = r.max <= m;
        failed |= !ok;
        println!(
            "target    VmHWM max {:.0} MiB <= {m} MiB: {}",
            r.max,
            verdict(ok)
        );
    }
    if failed {
        bail!("a target was missed");
    }
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "MISSED"
    }
}

struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

impl Stats {
    fn of(v: &[f64]) -> Self {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Self {
            median,
            min: s[0],
            max: s[n - 1],
        }
    }
}

/// Peak resident set size of this process, from /proc (Linux).
fn vm_hwm_kib() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/self/status")
}

/// The SIMD features this binary was compiled for (not what the CPU has).
fn cpu_features() -> String {
    let mut f = Vec::new();
    if cfg!(target_feature = "avx2") {
        f.push("avx2");
    }
    if cfg!(target_feature = "fma") {
        f.push("fma");
    }
    if cfg!(target_feature = "f16c") {
        f.push("f16c");
    }
    if cfg!(target_feature = "avx512f") {
        f.push("avx512f");
    }
    if cfg!(target_feature = "avx512vnni") {
        f.push("avx512vnni");
    }
    if cfg!(target_feature = "neon") {
        f.push("neon");
    }
    if f.is_empty() {
        "baseline (no SIMD target features)".into()
    } else {
        format!("built for {}", f.join(" "))
    }
}
