//! The `daemon` column and the IPC benchmark: the real `paraphymd` (the
//! binary beside this one) on a private socket, driven through the client
//! library exactly as `paraphym` drives it, timed from this side of the socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use paraphym_protocol::client::{Client, Piece};
use paraphym_protocol::message::{Generate, Options, Prompt, Request, Response};

/// A daemon started for one measurement; stopped (and its folder removed) on drop.
pub struct Daemon {
    child: Child,
    dir: PathBuf,
    pub client: Client,
}

impl Daemon {
    pub fn start(device: &str, context: usize) -> Result<Self> {
        Self::start_with(device, context, &[])
    }

    /// [`Daemon::start`] with extra `paraphymd` flags.
    pub fn start_with(device: &str, context: usize, extra: &[String]) -> Result<Self> {
        let exe = std::env::current_exe()?
            .parent()
            .context("bench binary folder")?
            .join("paraphymd");
        if !exe.is_file() {
            bail!(
                "{} is missing: build it beside paraphym-bench (cargo build --release --bins)",
                exe.display()
            );
        }
        let dir = std::env::temp_dir().join(format!("paraphym-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("d.sock");
        let child = Command::new(&exe)
            .arg("--socket")
            .arg(&socket)
            .arg("--log-file")
            .arg(dir.join("log"))
            .args(["--device", device, "--keep-alive", "forever"])
            .args(["--context", &context.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let start = Instant::now();
        let client = loop {
            match Client::connect(&socket) {
                Ok(c) => break c,
                Err(_) if start.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => bail!("paraphymd did not start: {e}"),
            }
        };
        Ok(Self { child, dir, client })
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("d.sock")
    }

    pub fn load(&self, model: &Path) -> Result<()> {
        match self.client.call(Request::Load {
            model: model.display().to_string(),
            keep_alive_ms: None,
            context: None,
        })? {
            Response::Loaded { .. } => Ok(()),
            other => bail!("unexpected answer to Load: {other:?}"),
        }
    }

    /// Wait until the model has `n` idle workers (the pre-warmed ones done
    /// warming up), so that a timed request has the device to itself as the
    /// other loops do.
    pub fn wait_idle(&self, n: usize) -> Result<()> {
        let start = Instant::now();
        loop {
            let idle = match self.client.call(Request::Status)? {
                Response::Status(s) => s
                    .models
                    .iter()
                    .flat_map(|m| &m.workers)
                    .filter(|w| w.state == paraphym_protocol::message::WorkerState::Idle)
                    .count(),
                other => bail!("unexpected answer to Status: {other:?}"),
            };
            if idle >= n {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(120) {
                bail!("{idle} of {n} workers idle after 120 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The daemon's peak RSS (VmHWM), KiB.
    pub fn vm_hwm_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmHWM")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.client.call(Request::Shutdown);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Asked for a log (PARAPHYM_LOG, which the daemon inherits): it
        // outlives the run, in the current folder.
        if std::env::var_os("PARAPHYM_LOG").is_some() {
            let kept = format!("paraphymd-{}-{}.log", std::process::id(), self.child.id());
            if std::fs::copy(self.dir.join("log"), &kept).is_ok() {
                eprintln!("the daemon's log: {kept}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A greedy request for exactly `gen` tokens of `prompt` (ids as they are).
pub fn greedy(model: &Path, prompt: &[u32], gen: usize) -> Generate {
    Generate {
        model: Some(model.display().to_string()),
        prompt: Prompt::Tokens(prompt.to_vec()),
        options: Options {
            temperature: Some(0.0),
            max_tokens: Some(gen as u32),
            ignore_eos: true,
            ..Options::default()
        },
        keep_alive_ms: None,
        session: None,
    }
}

/// How a benchmark's requests choose their tokens.
pub struct Sampling {
    pub name: &'static str,
    options: Options,
}

/// `greedy`, `top-k` (the daemon's defaults) or `nucleus` (those without
/// top-k).
pub fn sampling(name: &str) -> Result<Sampling> {
    let sampled = |top_k| Options {
        temperature: Some(0.8),
        top_k: Some(top_k),
        top_p: Some(0.95),
        min_p: Some(0.05),
        ..Options::default()
    };
    Ok(match name {
        "greedy" => Sampling {
            name: "greedy",
            options: Options {
                temperature: Some(0.0),
                ..Options::default()
            },
        },
        "top-k" => Sampling {
            name: "temperature 0.8, top-k 40, top-p 0.95, min-p 0.05",
            options: sampled(40),
        },
        "nucleus" => Sampling {
            name: "temperature 0.8, top-p 0.95, min-p 0.05, no top-k",
            options: sampled(0),
        },
        other => bail!("--sampling {other}: greedy, top-k or nucleus"),
    })
}

impl Sampling {
    /// A request for exactly `gen` tokens of `prompt`, seeded with `seed`.
    pub fn request(&self, model: &Path, prompt: &[u32], gen: usize, seed: u64) -> Generate {
        let mut r = greedy(model, prompt, gen);
        r.options = Options {
            seed: Some(seed),
            max_tokens: r.options.max_tokens,
            ignore_eos: true,
            ..self.options.clone()
        };
        r
    }
}

/// What one generation looked like from the client's side.
pub struct Observed {
    /// Request sent to first piece received.
    pub first: Duration,
    /// First piece to the final `Done`.
    pub rest: Duration,
    pub pieces: usize,
    pub stats: paraphym_protocol::message::GenStats,
}

pub fn observe(client: &Client, request: Generate) -> Result<Observed> {
    let sent = Instant::now();
    let mut first = None;
    let mut pieces = 0;
    for p in client.generate(request)? {
        let p = p?;
        if matches!(p, Piece::Stage(_) | Piece::Logprobs(_)) {
            // Progress before the first token, not the token itself.
            continue;
        }
        let now = Instant::now();
        let first_at = *first.get_or_insert(now);
        match p {
            Piece::Stage(_) | Piece::Logprobs(_) => {}
            Piece::Token(_) => pieces += 1,
            Piece::Done(stats) => {
                return Ok(Observed {
                    first: first_at - sent,
                    rest: now - first_at,
                    pieces,
                    stats,
                })
            }
        }
    }
    bail!("the stream ended without Done")
}
