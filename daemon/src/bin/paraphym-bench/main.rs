//! paraphym-bench: measurements that print figures side by side.
//!
//! `load` spawns one child process per repetition (this binary again, as
//! `load-child`) that only loads the model and runs the warm-up pass, and
//! reports the load time and the child's peak RSS (VmHWM).

mod batch;
mod chats;
mod via_daemon;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use paraphym_daemon::engine::{bench, score, Engine, LoadOptions};
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
        /// qwen3 | llama | gemma3 | phi3
        #[arg(long)]
        arch: String,
        /// tiny | qwen3-0.6b | qwen3-1.7b | phi4-mini | phi4 (the last two with --arch phi3)
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
    /// Side by side: stock Candle, the bare loop over our model, and the engine,
    /// each run in its own child process, interleaved.
    Decode {
        #[arg(long)]
        model: PathBuf,
        /// cpu, cuda[:N] or metal[:N] (the last two need the build's `cuda` / `metal` feature)
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 64)]
        gen_tokens: usize,
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Loops to compare: stock, bare, engine, static (the fixed-shape
        /// step), graph (that step as a replayed CUDA graph), daemon (the
        /// engine through paraphymd's socket).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "stock,bare,engine,daemon"
        )]
        loops: Vec<String>,
        /// Extra paraphymd flags for the daemon column (repeatable), e.g.
        /// `--daemon-arg=--decode-step=fixed`.
        #[arg(long = "daemon-arg", allow_hyphen_values = true)]
        daemon_args: Vec<String>,
    },
    /// The daemon's own cost of time to first token: requests of a 1-token
    /// prompt through the socket, client-observed minus daemon-reported.
    Ipc {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value_t = 100)]
        requests: usize,
        /// Fail if the median exceeds this many milliseconds.
        #[arg(long)]
        max_median_ms: Option<f64>,
    },
    /// Aggregate tokens/s of N concurrent streams through the daemon, one
    /// worker batching them and N replica workers side by side, next to one
    /// stream of the bare Candle loop.
    Concurrent {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
        streams: Vec<usize>,
        #[arg(long, default_value_t = 32)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 64)]
        gen_tokens: usize,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// How the streams choose tokens: `greedy`; `top-k` (the daemon's
        /// defaults: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05);
        /// `nucleus` (the same without top-k). Sampled streams are seeded.
        #[arg(long, default_value = "greedy")]
        sampling: String,
        /// Extra paraphymd flags for this run (repeatable), e.g.
        /// `--daemon-arg=--gpu-turns=off`.
        #[arg(long = "daemon-arg", allow_hyphen_values = true)]
        daemon_args: Vec<String>,
    },
    /// (internal) one loop once; prints key=value measurements.
    #[command(hide = true)]
    DecodeChild {
        #[arg(long)]
        model: PathBuf,
        #[arg(long = "loop")]
        which: String,
        #[arg(long)]
        device: String,
        #[arg(long)]
        prompt_tokens: usize,
        #[arg(long)]
        gen_tokens: usize,
        #[arg(long = "daemon-arg", allow_hyphen_values = true)]
        daemon_args: Vec<String>,
    },
    /// A chat that grows by a user message of `--user-tokens` and a reply of
    /// `--gen-tokens` each turn: time to first token with the KV cache reused
    /// across turns and with every prompt prefilled whole, side by side.
    Multiturn {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value_t = 10)]
        turns: usize,
        #[arg(long, default_value_t = 200)]
        user_tokens: usize,
        #[arg(long, default_value_t = 32)]
        gen_tokens: usize,
    },
    /// Conversations taking turns on the daemon: time to first token with
    /// conversation caches kept beyond one per worker, and with none.
    Chats {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Conversations, served round-robin, one request at a time.
        #[arg(long, default_value_t = 4)]
        chats: usize,
        #[arg(long, default_value_t = 4)]
        turns: usize,
        /// Words per user message (about 1.3 tokens each).
        #[arg(long, default_value_t = 80)]
        user_words: usize,
        #[arg(long, default_value_t = 16)]
        gen_tokens: usize,
        #[arg(long, default_value_t = 2)]
        workers: usize,
    },
    /// Batched decoding at the model level: aggregate tokens/s of B
    /// sequences decoded in one forward pass per step, next to one sequence
    /// alone, in one run.
    Batch {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
        streams: Vec<usize>,
        #[arg(long, default_value_t = 64)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 64)]
        gen_tokens: usize,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// The batched pass: forward (Model::forward_batch), static (the
        /// fixed-shape step over B slots) or graph (that step as a CUDA
        /// graph per batch size).
        #[arg(long, default_value = "forward")]
        path: String,
        /// The fixed step through Candle's ops, not our fused kernels
        /// (CUDA; elsewhere it always is).
        #[arg(long)]
        unfused: bool,
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
        #[arg(long, default_value = "cpu")]
        device: String,
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
        Cmd::DecodeChild {
            model,
            which,
            device,
            prompt_tokens,
            gen_tokens,
            daemon_args,
        } => {
            let prompt = bench::prompt_tokens(&model, prompt_tokens)?;
            if which == "daemon" {
                return daemon_child(&model, &device, &prompt, gen_tokens, &daemon_args);
            }
            let which = bench::Loop::parse(&which)
                .context("--loop stock|bare|engine|static|graph|daemon")?;
            let device = parse_device(&device)?;
            let r = bench::run(which, &model, &prompt, gen_tokens, &device)?;
            let ids: Vec<String> = r.tokens.iter().map(u32::to_string).collect();
            println!(
                "load_s={} warmup_s={} prefill_tps={} decode_tps={} ttft_s={} ttft_inside_s={} vmhwm_kib={} tokens={}",
                r.load.as_secs_f64(),
                r.warmup.as_secs_f64(),
                r.prefill_tps(),
                r.decode_tps(),
                r.first_token.as_secs_f64(),
                r.first_token.as_secs_f64(),
                vm_hwm_kib()?,
                ids.join(",")
            );
            Ok(())
        }
        Cmd::Decode {
            model,
            device,
            prompt_tokens,
            gen_tokens,
            reps,
            loops,
            daemon_args,
        } => decode(
            &model,
            &device,
            prompt_tokens,
            gen_tokens,
            reps,
            &loops,
            &daemon_args,
        ),
        Cmd::Ipc {
            model,
            device,
            requests,
            max_median_ms,
        } => ipc(&model, &device, requests, max_median_ms),
        Cmd::Concurrent {
            model,
            device,
            streams,
            prompt_tokens,
            gen_tokens,
            reps,
            sampling,
            daemon_args,
        } => concurrent(
            &model,
            &device,
            &Workload {
                streams,
                prompt_tokens,
                gen: gen_tokens,
                reps,
                sampling: via_daemon::sampling(&sampling)?,
            },
            &daemon_args,
        ),
        Cmd::Synth {
            arch,
            shape,
            out,
            seed,
            tokenizer,
        } => {
            let arch = synth::Arch::parse(&arch)
                .with_context(|| format!("unknown --arch {arch} (qwen3, llama, gemma3, phi3)"))?;
            let size = synth::Size::parse(&shape).with_context(|| {
                format!("unknown --shape {shape} (tiny, qwen3-0.6b, qwen3-1.7b, phi4-mini, phi4)")
            })?;
            let tokenizer = match tokenizer {
                Some(t) => t,
                None => synth::reference_tokenizer(arch.tokenizer_family(size))?,
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
        Cmd::Multiturn {
            model,
            device,
            turns,
            user_tokens,
            gen_tokens,
        } => multiturn(&model, &device, turns, user_tokens, gen_tokens),
        Cmd::Chats {
            model,
            device,
            chats,
            turns,
            user_words,
            gen_tokens,
            workers,
        } => chats::run(
            &model, &device, chats, turns, user_words, gen_tokens, workers,
        ),
        Cmd::Batch {
            model,
            device,
            streams,
            prompt_tokens,
            gen_tokens,
            reps,
            path,
            unfused,
        } => batch::bench(
            &model,
            &parse_device(&device)?,
            &format!("{device}; {}", cpu_features()),
            batch::Pass::parse(&path)?,
            &streams,
            prompt_tokens,
            gen_tokens,
            reps,
            unfused,
        ),
        Cmd::Perplexity {
            model,
            text,
            ctx,
            chunks,
            device,
        } => {
            let opts = LoadOptions {
                device: parse_device(&device)?,
                ..LoadOptions::default()
            };
            let mut engine = Engine::load(&model, &opts)?;
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

fn parse_device(s: &str) -> Result<candle_core::Device> {
    Ok(paraphym_daemon::engine::device::DeviceSpec::parse(s)?.open()?)
}

/// One child run's figures.
struct Child {
    fields: Vec<(String, f64)>,
    tokens: Vec<u32>,
}

impl Child {
    fn get(&self, k: &str) -> f64 {
        self.fields
            .iter()
            .find(|(n, _)| n == k)
            .map_or(f64::NAN, |f| f.1)
    }
}

fn decode_child(
    model: &PathBuf,
    device: &str,
    which: &str,
    prompt: usize,
    gen: usize,
    daemon_args: &[String],
) -> Result<Child> {
    let out = Command::new(std::env::current_exe()?)
        .args(["decode-child", "--loop", which, "--device", device])
        .arg("--model")
        .arg(model)
        .args(["--prompt-tokens", &prompt.to_string()])
        .args(["--gen-tokens", &gen.to_string()])
        .args(daemon_args.iter().map(|a| format!("--daemon-arg={a}")))
        .output()?;
    if !out.status.success() {
        bail!(
            "{which} child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = String::from_utf8(out.stdout)?;
    let mut fields = Vec::new();
    let mut tokens = Vec::new();
    for kv in line.split_whitespace() {
        let (k, v) = kv.split_once('=').context("malformed child output")?;
        if k == "tokens" {
            tokens = v
                .split(',')
                .filter(|t| !t.is_empty())
                .map(str::parse)
                .collect::<Result<_, _>>()?;
        } else {
            fields.push((k.to_owned(), v.parse()?));
        }
    }
    Ok(Child { fields, tokens })
}

fn decode(
    model: &PathBuf,
    device: &str,
    prompt: usize,
    gen: usize,
    reps: usize,
    loops: &[String],
    daemon_args: &[String],
) -> Result<()> {
    // Columns: the loops asked for, plus a second `bare` (bare') as the noise
    // control: bare/bare' should be 1.00 within the machine's noise.
    let mut cols: Vec<&str> = loops.iter().map(String::as_str).collect();
    let mut names: Vec<String> = loops.to_vec();
    if cols.contains(&"bare") {
        cols.push("bare");
        names.push("bare'".into());
    }
    let mut runs: Vec<Vec<Child>> = cols.iter().map(|_| Vec::new()).collect();
    for rep in 0..reps.max(1) {
        // Rotate the order each repetition so no column always runs first.
        for j in 0..cols.len() {
            let i = (j + rep) % cols.len();
            runs[i].push(decode_child(
                model,
                device,
                cols[i],
                prompt,
                gen,
                daemon_args,
            )?);
        }
    }
    println!("model     {}", model.display());
    if !daemon_args.is_empty() {
        println!("daemon    {}", daemon_args.join(" "));
    }
    println!(
        "device    {device}; backends {}; {}",
        paraphym_daemon::engine::device::compiled_backends().join(" "),
        cpu_features()
    );
    println!(
        "workload  {prompt} prompt tokens, {gen} generated (greedy, EOS ignored); {} interleaved repetitions, each column in its own child process",
        reps.max(1)
    );
    print!("{:<16}", "");
    for n in &names {
        print!("{n:>24}");
    }
    println!();
    let rows: [(&str, &str, f64); 7] = [
        ("load s", "load_s", 1.0),
        ("warm-up s", "warmup_s", 1.0),
        ("prefill tok/s", "prefill_tps", 1.0),
        ("decode tok/s", "decode_tps", 1.0),
        // The first token sampled (the daemon's own figure, queue included),
        // and the first text a client received: a token that ends inside a
        // UTF-8 character is held until the character is whole.
        ("TTFT s", "ttft_inside_s", 1.0),
        ("first text s", "ttft_s", 1.0),
        ("peak RSS MiB", "vmhwm_kib", 1.0 / 1024.0),
    ];
    let stats = |i: usize, key: &str, scale: f64| {
        Stats::of(
            &runs[i]
                .iter()
                .map(|c| c.get(key) * scale)
                .collect::<Vec<_>>(),
        )
    };
    for (label, key, scale) in rows {
        print!("{label:<16}");
        for i in 0..cols.len() {
            let s = stats(i, key, scale);
            let cell = if s.median >= 100.0 {
                format!("{:.0} [{:.0}-{:.0}]", s.median, s.min, s.max)
            } else {
                format!("{:.3} [{:.3}-{:.3}]", s.median, s.min, s.max)
            };
            print!("{cell:>24}");
        }
        println!();
    }
    let col = |n: &str| names.iter().position(|c| c == n);
    // Ratios pair the runs of each repetition (which ran back to back) and take
    // the median of the per-repetition ratios: slow drift of the machine cancels.
    let ratio = |a: &str, b: &str, key: &str, what: &str| {
        if let (Some(a_i), Some(b_i)) = (col(a), col(b)) {
            let per_rep: Vec<f64> = runs[a_i]
                .iter()
                .zip(&runs[b_i])
                .map(|(x, y)| x.get(key) / y.get(key))
                .collect();
            let s = Stats::of(&per_rep);
            println!(
                "{what} ratio {a}/{b} {:.3} [{:.3}-{:.3}]",
                s.median, s.min, s.max
            );
        }
    };
    ratio("engine", "bare", "decode_tps", "decode");
    ratio("daemon", "bare", "decode_tps", "decode");
    ratio("static", "bare", "decode_tps", "decode");
    ratio("graph", "bare", "decode_tps", "decode");
    ratio("graph", "static", "decode_tps", "decode");
    ratio("bare", "stock", "decode_tps", "decode");
    ratio("bare", "bare'", "decode_tps", "decode");
    ratio("engine", "bare", "prefill_tps", "prefill");
    ratio(
        "daemon",
        "engine",
        "ttft_inside_s",
        "TTFT (to the first token sampled)",
    );
    ratio("bare", "stock", "prefill_tps", "prefill");
    let ids = |n: &str| col(n).map(|i| runs[i][0].tokens.clone());
    if let (Some(b), Some(e)) = (ids("bare"), ids("engine")) {
        if b != e || b.len() != gen {
            bail!(
                "bare and engine emitted different token ids ({} and {} tokens)",
                b.len(),
                e.len()
            );
        }
        println!("tokens    bare and engine emitted identical ids ({gen} tokens)");
    }
    if let Some(d) = col("daemon") {
        println!(
            "tokens    daemon streamed {} pieces for {} tokens",
            runs[d][0].get("pieces"),
            runs[d][0].get("generated")
        );
    }
    for fixed in ["static", "graph"] {
        if let (Some(b), Some(f)) = (ids("bare"), ids(fixed)) {
            let same = b.iter().zip(&f).take_while(|(x, y)| x == y).count();
            println!("tokens    {fixed} agrees with bare on the first {same} of {gen} tokens");
        }
    }
    if let (Some(s), Some(g)) = (ids("static"), ids("graph")) {
        let same = s.iter().zip(&g).take_while(|(x, y)| x == y).count();
        println!("tokens    graph agrees with static on the first {same} of {gen} tokens");
    }
    if let (Some(b), Some(s)) = (ids("bare"), ids("stock")) {
        let same = b.iter().zip(&s).take_while(|(x, y)| x == y).count();
        println!("tokens    stock agrees with bare on the first {same} of {gen} tokens");
    }
    Ok(())
}

/// The `daemon` column: the same generation through paraphymd's socket,
/// timed by the client. Decode speed counts the tokens after the first over
/// the time from the first piece to `Done`; TTFT is request sent to first piece.
fn daemon_child(
    model: &std::path::Path,
    device: &str,
    prompt: &[u32],
    gen: usize,
    daemon_args: &[String],
) -> Result<()> {
    let context = (prompt.len() + gen).max(paraphym_daemon::engine::WARMUP_TOKENS + 1);
    let t = Instant::now();
    let d = via_daemon::Daemon::start_with(device, context, daemon_args)?;
    d.load(model)?;
    let load = t.elapsed();
    // Load answers when the first worker is ready; the second pre-warmed
    // one may still be warming up on the same device.
    d.wait_idle(2)?;
    let o = via_daemon::observe(&d.client, via_daemon::greedy(model, prompt, gen))?;
    let n = o.stats.generated_tokens as usize;
    if n != gen {
        bail!("the daemon generated {n} tokens, not {gen}");
    }
    let prefill = Duration::from_micros(o.stats.time_to_first_token_us);
    println!(
        "load_s={} warmup_s=0 prefill_tps={} decode_tps={} ttft_s={} ttft_inside_s={} vmhwm_kib={} pieces={} generated={} tokens=",
        load.as_secs_f64(),
        prompt.len() as f64 / prefill.as_secs_f64(),
        (n - 1) as f64 / o.rest.as_secs_f64(),
        o.first.as_secs_f64(),
        prefill.as_secs_f64(),
        d.vm_hwm_kib()?,
        o.pieces,
        n,
    );
    Ok(())
}

/// What `concurrent` runs: stream counts, each stream's prompt and
/// generated tokens and how it samples, repetitions.
struct Workload {
    streams: Vec<usize>,
    prompt_tokens: usize,
    gen: usize,
    reps: usize,
    sampling: via_daemon::Sampling,
}

fn concurrent(
    model: &PathBuf,
    device: &str,
    work: &Workload,
    daemon_args: &[String],
) -> Result<()> {
    let Workload {
        streams,
        prompt_tokens,
        gen,
        reps,
        sampling,
    } = work;
    let (prompt_tokens, gen) = (*prompt_tokens, *gen);
    let reps = (*reps).max(1);
    // The single-stream reference: the bare loop, in its own process. Its
    // decode rate, and its end-to-end rate measured like the streams' (the
    // generated tokens over prefill plus decode), which the ratio uses.
    let children: Vec<_> = (0..reps)
        .map(|_| decode_child(model, device, "bare", prompt_tokens, gen, &[]))
        .collect::<Result<_>>()?;
    let bare = Stats::of(
        &children
            .iter()
            .map(|c| c.get("decode_tps"))
            .collect::<Vec<_>>(),
    )
    .median;
    let bare_e2e = Stats::of(
        &children
            .iter()
            .map(|c| gen as f64 / (c.get("ttft_s") + (gen - 1) as f64 / c.get("decode_tps")))
            .collect::<Vec<_>>(),
    )
    .median;
    let prompt = bench::prompt_tokens(model, prompt_tokens)?;
    let most = streams.iter().copied().max().unwrap_or(1).max(1);
    let most_s = most.to_string();
    // The two ways a daemon serves N streams: one worker decoding them in
    // one batched pass (the default: batches fill before workers are
    // added), and N replica workers of one request each (`--batch 1`).
    let setups: [(&str, [&str; 6]); 2] = [
        (
            "batched",
            ["--prewarm", "1", "--max-workers", "1", "--batch", &most_s],
        ),
        (
            "replicas",
            [
                "--prewarm",
                &most_s,
                "--max-workers",
                &most_s,
                "--batch",
                "1",
            ],
        ),
    ];
    // Per setup, per stream count: (end to end, longest TTFT, decode sum).
    let mut table: Vec<Vec<(f64, f64, f64)>> = Vec::new();
    for (_, flags) in &setups {
        let extra: Vec<String> = flags
            .iter()
            .map(|f| f.to_string())
            .chain(["--max-queue".to_string(), (4 * most).to_string()])
            .chain(daemon_args.iter().cloned())
            .collect();
        let d = via_daemon::Daemon::start_with(device, prompt_tokens + gen + 64, &extra)?;
        d.load(model)?;
        // Warm every worker (every batch size) once.
        run_streams(&d.socket(), model, &prompt, 8, most, sampling)?;
        let mut column = Vec::new();
        for &n in streams {
            let runs: Vec<(f64, f64, f64)> = (0..reps)
                .map(|_| run_streams(&d.socket(), model, &prompt, gen, n, sampling))
                .collect::<Result<_>>()?;
            let median = |f: fn(&(f64, f64, f64)) -> f64| {
                Stats::of(&runs.iter().map(f).collect::<Vec<_>>()).median
            };
            column.push((median(|r| r.0), median(|r| r.1), median(|r| r.2)));
        }
        table.push(column);
    }
    println!("model     {}", model.display());
    println!("device    {device}; {}", cpu_features());
    if !daemon_args.is_empty() {
        println!("daemon    {}", daemon_args.join(" "));
    }
    println!(
        "workload  {prompt_tokens} prompt tokens, {gen} generated per stream ({}, EOS ignored); \
         each stream its own connection; median of {reps}",
        sampling.name
    );
    println!(
        "setups    batched: --prewarm 1 --max-workers 1 --batch {most}; \
         replicas: --prewarm {most} --max-workers {most} --batch 1"
    );
    println!(
        "bare      one stream, bare Candle loop: {bare:.2} tok/s decode, \
         {bare_e2e:.2} tok/s end to end (prefill included)"
    );
    println!("aggregate tok/s end to end (prefill included), all streams");
    println!(
        "{:>8} {:>10} {:>10} {:>14} {:>16} {:>14}   {:>12} {:>14}",
        "streams",
        "batched",
        "replicas",
        "batched/bare",
        "batched/1 stream",
        "batched/replicas",
        "TTFT max ms",
        "decode tok/s"
    );
    let one = streams.iter().position(|&n| n == 1).map(|i| table[0][i].0);
    for (i, &n) in streams.iter().enumerate() {
        let ((b, ttft, decode), r) = (table[0][i], table[1][i].0);
        let per_one = one.map_or("-".to_string(), |o| format!("{:.3}", b / o));
        println!(
            "{n:>8} {b:>10.2} {r:>10.2} {:>14.3} {per_one:>16} {:>14.3}   {:>12.1} {decode:>14.1}",
            b / bare_e2e,
            b / r,
            ttft * 1e3
        );
    }
    println!(
        "(TTFT max: the batched setup's slowest first token; decode tok/s: \
         its streams' decode rates, summed)"
    );
    Ok(())
}

/// `n` streams at once, each on its own connection: aggregate tokens/s
/// from the first request sent to the last `Done`, the longest time to
/// first token (s, the daemon's), and the streams' decode rates summed.
fn run_streams(
    socket: &std::path::Path,
    model: &std::path::Path,
    prompt: &[u32],
    gen: usize,
    n: usize,
    sampling: &via_daemon::Sampling,
) -> Result<(f64, f64, f64)> {
    let clients: Vec<paraphym_protocol::client::Client> = (0..n)
        .map(|_| paraphym_protocol::client::Client::connect(socket))
        .collect::<Result<_, _>>()?;
    let start = Instant::now();
    let streams: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| c.generate(sampling.request(model, prompt, gen, i as u64)))
        .collect::<Result<_, _>>()?;
    let (mut tokens, mut ttft, mut decode) = (0u64, 0f64, 0f64);
    for s in streams {
        let (_, stats) = s.collect_text()?;
        ttft = ttft.max(stats.time_to_first_token_us as f64 / 1e6);
        decode += f64::from(stats.decode_tokens_per_s);
        if stats.generated_tokens as usize != gen {
            bail!(
                "a stream of {n} ended after {} of {gen} tokens",
                stats.generated_tokens
            );
        }
        tokens += u64::from(stats.generated_tokens);
    }
    Ok((tokens as f64 / start.elapsed().as_secs_f64(), ttft, decode))
}

fn multiturn(
    model: &std::path::Path,
    device: &str,
    turns: usize,
    user_tokens: usize,
    gen: usize,
) -> Result<()> {
    use paraphym_daemon::engine::{GenParams, Prompt, SamplingParams};
    let turns = turns.max(1);
    let context = 1 + turns * (user_tokens + gen) + 16;
    let opts = LoadOptions {
        device: parse_device(device)?,
        context: Some(context),
        ..LoadOptions::default()
    };
    let mut with = Engine::load(model, &opts)?;
    let mut without = with.replica();
    if with.model().context() < context {
        bail!(
            "{turns} turns need {context} positions; the model has {}",
            with.model().context()
        );
    }
    // Each turn's user message: the next `user_tokens` of a long text.
    let text = bench::prompt_tokens(model, 1 + turns * user_tokens)?;
    let mut chat = vec![text[0]];
    let params = |reuse_cache| GenParams {
        sampling: SamplingParams::greedy(),
        max_tokens: gen,
        ignore_eos: true,
        reuse_cache,
        ..GenParams::default()
    };
    println!("model     {}", model.display());
    println!("device    {device}; {}", cpu_features());
    println!(
        "workload  {turns} turns, each a {user_tokens}-token user message and a {gen}-token greedy reply; \
         both engines share the weights, one reuses its KV cache, one prefills every prompt whole"
    );
    println!(
        "{:>5} {:>14} {:>16} {:>16} {:>14} {:>10}",
        "turn", "prompt tokens", "TTFT whole s", "TTFT reuse s", "reused tokens", "ratio"
    );
    let never = std::sync::atomic::AtomicBool::new(false);
    let mut last = f64::NAN;
    for t in 0..turns {
        chat.extend_from_slice(&text[1 + t * user_tokens..1 + (t + 1) * user_tokens]);
        // Alternate which runs first, so neither always finds the caches warm.
        let run = |e: &mut Engine, reuse| {
            e.generate(Prompt::Tokens(&chat), &params(reuse), &never, |_| {})
        };
        let (a, b) = if t % 2 == 0 {
            let a = run(&mut without, false)?;
            (a, run(&mut with, true)?)
        } else {
            let b = run(&mut with, true)?;
            (run(&mut without, false)?, b)
        };
        if a.tokens != b.tokens {
            bail!("turn {}: the replies differ with and without reuse", t + 1);
        }
        let (whole, reuse) = (
            a.time_to_first_token.as_secs_f64(),
            b.time_to_first_token.as_secs_f64(),
        );
        last = reuse / whole;
        println!(
            "{:>5} {:>14} {:>16.3} {:>16.3} {:>14} {:>10.3}",
            t + 1,
            chat.len(),
            whole,
            reuse,
            b.reused_tokens,
            last
        );
        chat.extend_from_slice(&a.tokens);
    }
    println!("turn {turns}: TTFT with reuse / without = {last:.3}; replies identical every turn");
    Ok(())
}

fn ipc(
    model: &std::path::Path,
    device: &str,
    requests: usize,
    max_median_ms: Option<f64>,
) -> Result<()> {
    let prompt = bench::prompt_tokens(model, 1)?;
    let d = via_daemon::Daemon::start(device, 64)?;
    d.load(model)?;
    // Warm the connection and the worker.
    for _ in 0..5 {
        via_daemon::observe(&d.client, via_daemon::greedy(model, &prompt, 1))?;
    }
    let mut observed = Vec::new();
    let mut reported = Vec::new();
    let mut cost = Vec::new();
    for _ in 0..requests.max(1) {
        let o = via_daemon::observe(&d.client, via_daemon::greedy(model, &prompt, 1))?;
        let seen = o.first.as_secs_f64() * 1e3;
        let said = o.stats.time_to_first_token_us as f64 / 1e3;
        observed.push(seen);
        reported.push(said);
        cost.push(seen - said);
    }
    println!("model     {}", model.display());
    println!("device    {device}");
    println!(
        "workload  {} requests of a 1-token prompt, 1 token each, one after another on one connection",
        requests.max(1)
    );
    for (label, v) in [
        ("client-observed TTFT ms", &observed),
        ("daemon-reported TTFT ms", &reported),
        ("IPC cost ms", &cost),
    ] {
        let s = Stats::of(v);
        let mut sorted = v.clone();
        sorted.sort_by(f64::total_cmp);
        let p90 = sorted[(sorted.len() * 9 / 10).min(sorted.len() - 1)];
        println!(
            "{label:<26} median {:.3}  p90 {:.3}  min {:.3}  max {:.3}",
            s.median, p90, s.min, s.max
        );
    }
    if let Some(limit) = max_median_ms {
        let m = Stats::of(&cost).median;
        println!(
            "target    IPC cost median <= {limit} ms: {:.3} ms {}",
            m,
            verdict(m <= limit)
        );
        if m > limit {
            bail!("IPC cost median {m:.3} ms is over {limit} ms");
        }
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
    let f: Vec<&str> = [
        (cfg!(target_feature = "avx2"), "avx2"),
        (cfg!(target_feature = "fma"), "fma"),
        (cfg!(target_feature = "f16c"), "f16c"),
        (cfg!(target_feature = "avx512f"), "avx512f"),
        (cfg!(target_feature = "avx512vnni"), "avx512vnni"),
        (cfg!(target_feature = "neon"), "neon"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    if f.is_empty() {
        "baseline (no SIMD target features)".into()
    } else {
        format!("built for {}", f.join(" "))
    }
}
