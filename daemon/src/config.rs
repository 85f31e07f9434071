//! The daemon's settings (from `paraphymd`'s flags; defaults here).

use std::path::PathBuf;
use std::time::Duration;

use candle_core::Device;

use crate::pull::HubConfig;

/// A keep-alive of `Duration::MAX` means "never evict".
pub const FOREVER: Duration = Duration::MAX;

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub socket: PathBuf,
    /// The socket's folder is ours (the default path): keep it 0700.
    pub owns_socket_dir: bool,
    /// The reference used when a request names no model.
    pub default_model: String,
    /// Prompt tokens per prefill chunk: a cancel lands within one chunk.
    pub prefill_chunk: usize,
    /// Sequences a worker decodes together in one batched pass at most
    /// (the memory budget may hold it to fewer).
    pub batch: usize,
    /// Decode through the fixed-shape step (CUDA graphs), or the plain
    /// forward pass.
    pub decode_step: DecodeStep,
    /// Workers a cold model starts with.
    pub prewarm: usize,
    /// Workers kept per loaded model however idle.
    pub min_workers: usize,
    /// Workers per model at most.
    pub max_workers: usize,
    /// A worker idle this long may be retired (down to `min_workers`).
    pub idle_period: Duration,
    /// Consecutive failures of a model that open its circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker fails requests fast before a trial.
    pub breaker_cooldown: Duration,
    /// A busy worker without progress (a token or a prefill chunk) for this
    /// long is stuck: its request fails and it is replaced.
    pub stuck_timeout: Duration,
    /// Requests waiting per model before new ones are refused (`Busy`).
    pub max_queue: usize,
    /// How long an idle model stays loaded, unless a request says otherwise.
    pub keep_alive: Duration,
    /// Context length for loaded models (`None`: the engine's default).
    pub context: Option<usize>,
    /// Other tools' model folders served in place (`ollama:`, `lmstudio:`).
    pub library: crate::library::Folders,
    /// Idle conversation caches a model keeps beyond one per worker (each is
    /// an engine's KV cache, kept for the conversation's next turn).
    pub conversation_caches: usize,
    pub device: Device,
    /// How workers on one GPU take turns (`None`: freely; the CPU never
    /// takes turns).
    pub gpu_turns: Option<crate::engine::Turns>,
    /// A connection's outbox; a generation waits while its client's is full.
    pub outbox_bytes: usize,
    /// A write blocked this long means the client stopped reading: its
    /// requests are cancelled and the connection closed.
    pub write_timeout: Duration,
    pub max_connections: usize,
    /// What the models may take (estimates, `governor.rs`); 0: no limit.
    pub memory_budget_bytes: u64,
    pub hub: HubConfig,
    /// Test-only hooks (always empty in release builds).
    pub hooks: crate::hooks::Hooks,
}

impl DaemonConfig {
    pub const DEFAULT_OUTBOX_BYTES: usize = 1 << 20;
    pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(300);
    pub const DEFAULT_MAX_QUEUE: usize = 64;
    pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
    pub const DEFAULT_IDLE_PERIOD: Duration = Duration::from_secs(60);
    pub const DEFAULT_CONVERSATION_CACHES: usize = 4;
    /// Sequences per batched pass: enough to keep a GPU's weights reads
    /// shared by many streams; the memory budget bounds it further.
    pub const DEFAULT_BATCH: usize = 8;

    pub fn new(socket: PathBuf, default_model: String) -> Self {
        Self {
            socket,
            owns_socket_dir: false,
            default_model,
            prefill_chunk: 256,
            batch: Self::DEFAULT_BATCH,
            decode_step: DecodeStep::Auto,
            prewarm: 2,
            min_workers: 1,
            max_workers: default_max_workers(),
            idle_period: Self::DEFAULT_IDLE_PERIOD,
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(30),
            stuck_timeout: Duration::from_secs(60),
            max_queue: Self::DEFAULT_MAX_QUEUE,
            keep_alive: Self::DEFAULT_KEEP_ALIVE,
            context: None,
            conversation_caches: Self::DEFAULT_CONVERSATION_CACHES,
            library: crate::library::Folders::default(),
            device: Device::Cpu,
            gpu_turns: None,
            outbox_bytes: Self::DEFAULT_OUTBOX_BYTES,
            write_timeout: Self::DEFAULT_WRITE_TIMEOUT,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            memory_budget_bytes: default_memory_budget(),
            hub: HubConfig::from_env(),
            hooks: crate::hooks::from_env(),
        }
    }
}

/// How workers decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodeStep {
    /// The fixed step on CUDA (its graphs: see BENCHMARKS, "The fixed
    /// step in the workers"), the plain pass elsewhere (on the CPU the
    /// fixed step's tensor KV caches are slower; Metal is untested).
    #[default]
    Auto,
    /// The fixed-shape step everywhere (eager without CUDA; on the CPU the
    /// engines keep tensor KV caches for it: slower there, for tests).
    Fixed,
    /// `Model::forward_batch`, every step shaped by its sequences.
    Plain,
}

impl DecodeStep {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "auto" => DecodeStep::Auto,
            "fixed" => DecodeStep::Fixed,
            "plain" => DecodeStep::Plain,
            _ => return None,
        })
    }

    /// Whether workers on `device` use the fixed step.
    pub fn fixed_on(self, device: &Device) -> bool {
        match self {
            DecodeStep::Auto => device.is_cuda(),
            DecodeStep::Fixed => true,
            DecodeStep::Plain => false,
        }
    }
}

/// Half the cores, between 2 and 8: on the CPU every worker's matmuls use
/// all cores, so more concurrent streams than that only contend.
pub fn default_max_workers() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cores / 2).clamp(2, 8)
}

/// 80% of the memory available at start, plus what this process already
/// holds (0, no budget, where it can't be read). On CUDA `paraphymd` budgets
/// from the card's free memory instead (`engine::device::gpu_memory`).
pub fn default_memory_budget() -> u64 {
    available_memory().map_or(0, |m| (m + resident_bytes()) / 5 * 4)
}

fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo_kib(&text, "MemAvailable:").map(|k| k * 1024)
}

/// This process's resident memory (Linux; 0 elsewhere).
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| meminfo_kib(&t, "VmRSS:"))
        .map_or(0, |k| k * 1024)
}

fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_kib_fields() {
        let t = "MemTotal:       24576000 kB\nVmRSS:\t  1234 kB\n";
        assert_eq!(super::meminfo_kib(t, "MemTotal:"), Some(24_576_000));
        assert_eq!(super::meminfo_kib(t, "VmRSS:"), Some(1234));
        assert_eq!(super::meminfo_kib(t, "Nope:"), None);
    }
}
