//! Test-only fault and timing hooks. They exist only in debug builds (the
//! code below is compiled out of release builds) and are switched on by the
//! test harness through the daemon's environment at start, never by a
//! client: `PARAPHYM_TEST_HOOKS=replica_delay_ms=2000,...`.

use std::time::Duration;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hooks {
    /// Delay a replica worker's start (after the weights are shared).
    pub replica_delay: Option<Duration>,
    /// A generation whose prompt contains this fails (an internal error).
    pub fail_prompt: Option<String>,
    /// A generation whose prompt contains this panics in the worker.
    pub panic_prompt: Option<String>,
    /// A generation whose prompt contains this stops making progress
    /// (the worker sleeps, as a hung kernel would).
    pub stall_prompt: Option<String>,
    /// Sleep this long after every generated token, so a generation lasts
    /// long enough for a test to watch it (the TUI's end-to-end test).
    pub token_delay: Option<Duration>,
    /// The fixed step runs ahead of the host on the CPU too (what it does
    /// on a GPU), so the CPU's tests exercise that path.
    pub run_ahead: bool,
    /// Every decode pass of n rows while w workers are busy takes this
    /// long times n² × w (padded to it), holding a lock all workers share:
    /// a device where a row more slows the whole batch down and a worker
    /// more slows every worker down (neither batching nor replicas pay),
    /// for the scaling dials' tests.
    pub pass_ms_per_row: Option<u64>,
    /// No pass is measured, so the scaling dials stay where they start
    /// (batches fill to `--batch`, workers are added to `--max-workers`):
    /// for tests of batching itself, as a debug build's measured rows
    /// add next to nothing on a small CPU and the batch dial would
    /// rightly stop batches from growing.
    pub unmeasured: bool,
}

/// The `pass_ms_per_row` hook's device: held for a whole pass (and the
/// pass's added time), so workers' passes never overlap.
pub fn shared_device() -> std::sync::MutexGuard<'static, ()> {
    static DEVICE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    DEVICE.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hooks {
    /// The hook named by `prompt`, if any.
    pub fn matches(hook: &Option<String>, prompt: &str) -> bool {
        hook.as_deref().is_some_and(|h| prompt.contains(h))
    }
}

/// The hooks of this process: none in a release build.
pub fn from_env() -> Hooks {
    #[cfg(debug_assertions)]
    {
        match std::env::var("PARAPHYM_TEST_HOOKS") {
            Ok(spec) => {
                let h = parse(&spec);
                tracing::warn!(?h, "test hooks are on (debug build)");
                h
            }
            Err(_) => Hooks::default(),
        }
    }
    #[cfg(not(debug_assertions))]
    {
        Hooks::default()
    }
}

#[cfg_attr(not(debug_assertions), allow(dead_code))]
fn parse(spec: &str) -> Hooks {
    let mut h = Hooks::default();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = item.split_once('=').unwrap_or((item, ""));
        match k {
            "replica_delay_ms" => h.replica_delay = v.parse().ok().map(Duration::from_millis),
            "fail_prompt" => h.fail_prompt = Some(v.to_owned()),
            "panic_prompt" => h.panic_prompt = Some(v.to_owned()),
            "stall_prompt" => h.stall_prompt = Some(v.to_owned()),
            "token_delay_ms" => h.token_delay = v.parse().ok().map(Duration::from_millis),
            "run_ahead" => h.run_ahead = true,
            "pass_ms_per_row" => h.pass_ms_per_row = v.parse().ok(),
            "unmeasured" => h.unmeasured = true,
            other => tracing::warn!("unknown test hook {other:?}"),
        }
    }
    h
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_known_hooks() {
        let h = super::parse(
            "replica_delay_ms=1500, bogus=1,token_delay_ms=20,fail_prompt=X,run_ahead,pass_ms_per_row=3",
        );
        assert_eq!(
            h.replica_delay,
            Some(std::time::Duration::from_millis(1500))
        );
        assert_eq!(h.token_delay, Some(std::time::Duration::from_millis(20)));
        assert_eq!(h.fail_prompt.as_deref(), Some("X"));
        assert_eq!(h.panic_prompt, None);
        assert!(h.run_ahead);
        assert_eq!(h.pass_ms_per_row, Some(3));
    }
}
