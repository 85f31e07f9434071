//! Failing models are fenced off by their circuit breaker; panicked and
//! stuck workers are replaced with only their own request failing.
//! Faults are injected through debug-only test hooks set at daemon start.

use std::time::Duration;

use paraphym_daemon::synth::Arch;
use paraphym_protocol::client::{Client, ClientError};
use paraphym_protocol::message::{BreakerState, ErrorKind, Event, Request, Response, WorkerState};
use paraphym_tests::{raw_gen, status, tiny, wait_until, TestDaemon};

fn run(c: &Client, model: &str, prompt: &str) -> Result<u32, ClientError> {
    c.generate(raw_gen(model, prompt, 6))?
        .collect_text()
        .map(|(_, s)| s.generated_tokens)
}

fn breaker_events(events: &paraphym_protocol::client::Subscription) -> Vec<BreakerState> {
    let mut out = Vec::new();
    while let Ok(Some(e)) = events.next_timeout(Duration::from_millis(20)) {
        if let Event::Breaker { state, .. } = e {
            out.push(state);
        }
    }
    out
}

#[test]
fn repeated_load_failures_open_the_breaker_then_one_trial_after_the_cooldown() {
    let daemon = TestDaemon::start(&["--breaker-failures", "2", "--breaker-cooldown", "1s"]);
    let junk = daemon.dir.path().join("broken.gguf");
    std::fs::write(&junk, b"GGUF but not really").unwrap();
    let j = junk.to_str().unwrap();
    let c = daemon.client();
    let events = c.subscribe().unwrap();
    for _ in 0..2 {
        let e = run(&c, j, "hi").unwrap_err();
        assert_eq!(e.kind(), Some(ErrorKind::ModelFailed), "{e}");
    }
    // Open: fails fast, naming the failures, without trying to load.
    let e = run(&c, j, "hi").unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::ModelFailed));
    assert!(e.to_string().contains("2 times in a row"), "{e}");
    let loads = || daemon.log_text().matches("load failed").count();
    assert_eq!(loads(), 2);
    let s = status(&c);
    assert_eq!(s.faults.len(), 1, "{s:?}");
    assert_eq!(s.faults[0].breaker, BreakerState::Open);
    assert_eq!(s.faults[0].consecutive_failures, 2);
    // After the cooldown: half-open, one trial (which fails: open again).
    assert!(wait_until(Duration::from_secs(5), || {
        status(&c).faults[0].breaker == BreakerState::HalfOpen
    }));
    assert!(run(&c, j, "hi").is_err());
    assert_eq!(loads(), 3, "exactly one trial load");
    assert_eq!(status(&c).faults[0].breaker, BreakerState::Open);
    // Not loaded, but failing: `health` lists it.
    let Response::Health(h) = c.call(Request::Health).unwrap() else {
        panic!()
    };
    assert!(!h.ok);
    assert_eq!(h.models.len(), 1);
    assert_eq!(h.models[0].breaker, BreakerState::Open);
    assert!(
        h.models[0].problem.contains("broken.gguf"),
        "{:?}",
        h.models[0]
    );
    assert_eq!(
        breaker_events(&events),
        vec![BreakerState::Open, BreakerState::Open]
    );
}

#[test]
fn generation_failures_open_it_and_a_successful_trial_closes_it() {
    let model = tiny(Arch::Qwen3);
    let m = model.to_str().unwrap();
    let daemon = TestDaemon::start_with_env(
        &["--breaker-failures", "3", "--breaker-cooldown", "1s"],
        &[("PARAPHYM_TEST_HOOKS", "fail_prompt=BOOM")],
    );
    let c = daemon.client();
    let events = c.subscribe().unwrap();
    assert_eq!(run(&c, m, "fine").unwrap(), 6);
    for _ in 0..3 {
        let e = run(&c, m, "BOOM").unwrap_err();
        assert_eq!(e.kind(), Some(ErrorKind::Internal), "{e}");
    }
    // Open: even a good request fails fast.
    let e = run(&c, m, "fine").unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::ModelFailed));
    assert!(e.to_string().contains("injected failure"), "{e}");
    // The trial after the cooldown succeeds and closes it.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(run(&c, m, "fine").unwrap(), 6);
    assert_eq!(run(&c, m, "fine again").unwrap(), 6);
    assert!(status(&c).faults.is_empty());
    assert_eq!(
        breaker_events(&events),
        vec![BreakerState::Open, BreakerState::Closed]
    );
}

#[test]
fn a_panicking_worker_fails_only_its_request_and_is_replaced() {
    let model = tiny(Arch::Llama);
    let m = model.to_str().unwrap();
    let daemon = TestDaemon::start_with_env(
        &["--prewarm", "1", "--max-workers", "1"],
        &[("PARAPHYM_TEST_HOOKS", "panic_prompt=PANIC")],
    );
    let c = daemon.client();
    let events = c.subscribe().unwrap();
    assert_eq!(run(&c, m, "before").unwrap(), 6);
    let e = run(&c, m, "PANIC now").unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Internal));
    assert!(e.to_string().contains("replaced"), "{e}");
    assert_eq!(run(&c, m, "after").unwrap(), 6);
    let mut log = Vec::new();
    while let Ok(Some(e)) = events.next_timeout(Duration::from_millis(20)) {
        if let Event::Worker { worker, .. } = e {
            log.push((worker.id, worker.state));
        }
    }
    assert!(log.contains(&(0, WorkerState::Unhealthy)), "{log:?}");
    assert!(log.contains(&(0, WorkerState::Stopped)), "{log:?}");
    assert!(
        log.contains(&(1, WorkerState::Busy)),
        "the replacement served: {log:?}"
    );
    // The panicked one leaves as soon as it has answered.
    let ids = || -> Vec<u32> { status(&c).models[0].workers.iter().map(|w| w.id).collect() };
    assert!(
        wait_until(Duration::from_secs(5), || ids() == vec![1]),
        "{:?}",
        ids()
    );
}

#[test]
fn a_stuck_worker_is_detected_its_request_failed_and_it_is_replaced() {
    let model = tiny(Arch::Qwen3);
    let m = model.to_str().unwrap();
    let daemon = TestDaemon::start_with_env(
        &[
            "--prewarm",
            "1",
            "--max-workers",
            "1",
            "--stuck-timeout",
            "1s",
        ],
        &[("PARAPHYM_TEST_HOOKS", "stall_prompt=STALL")],
    );
    let c = daemon.client();
    let e = run(&c, m, "STALL here").unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Internal));
    assert!(e.to_string().contains("no progress"), "{e}");
    // Everyone else is served by the replacement.
    assert_eq!(run(&c, m, "next").unwrap(), 6);
    // The stuck one stays marked (it never returns); its replacement idles.
    let states = || -> Vec<WorkerState> {
        status(&c).models[0]
            .workers
            .iter()
            .map(|w| w.state)
            .collect()
    };
    let ok = wait_until(Duration::from_secs(5), || {
        let s = states();
        s.contains(&WorkerState::Unhealthy) && s.contains(&WorkerState::Idle)
    });
    assert!(ok, "{:?}", states());
    // `health` says so, model by model.
    let Response::Health(h) = c.call(Request::Health).unwrap() else {
        panic!()
    };
    assert!(!h.ok);
    assert_eq!(h.models.len(), 1);
    assert!(!h.models[0].ok);
    assert!(h.models[0].problem.contains("stuck"), "{:?}", h.models[0]);
    let out = daemon.cli(&["health"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAILING"));
}

/// The hooks are compiled out of release builds (`cfg(debug_assertions)`):
/// the release build of the daemon, started with every hook switched
/// on, fails, panics, stalls and delays nothing — while the debug build given
/// the same switches fails the same request, so the switches are live.
#[test]
fn a_release_build_ignores_the_test_hooks() {
    let model = tiny(Arch::Qwen3);
    let m = model.to_str().unwrap();
    let hooks = [(
        "PARAPHYM_TEST_HOOKS",
        "fail_prompt=BOOM,panic_prompt=CRASH,stall_prompt=HANG,token_delay_ms=2000,replica_delay_ms=60000",
    )];
    let args = ["--prewarm", "2", "--max-workers", "2"];

    let debug = TestDaemon::start_with_env(&args, &hooks);
    let err = run(&debug.client(), m, "BOOM").expect_err("the debug build's hook fails it");
    assert_eq!(err.kind(), Some(ErrorKind::Internal), "{err}");
    assert!(debug.log_text().contains("test hooks are on"));
    drop(debug);

    let release = TestDaemon::start_binary(paraphym_tests::release_bin("paraphymd"), &args, &hooks);
    let c = release.client();
    let started = std::time::Instant::now();
    for prompt in ["BOOM", "CRASH", "HANG"] {
        assert_eq!(run(&c, m, prompt).expect(prompt), 6, "{prompt}");
    }
    // 18 tokens would take 36 s with the token delay on.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // Both workers ready: the replica delay (a minute) did not apply either.
    assert!(wait_until(Duration::from_secs(10), || {
        let s = status(&c);
        s.models.len() == 1
            && s.models[0].workers.len() == 2
            && s.models[0]
                .workers
                .iter()
                .all(|w| w.state == WorkerState::Idle)
    }));
    assert!(
        !release.log_text().contains("test hooks"),
        "{}",
        release.log_text()
    );
}
