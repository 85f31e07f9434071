//! Workers that manage themselves: pre-warm, shared weights, scaling up under
//! load and down after idle, keep-alive unloads, all visible as events.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use paraphym_daemon::synth::Arch;
use paraphym_protocol::client::Piece;
use paraphym_protocol::message::{Event, Generate, Request, WorkerState};
use paraphym_tests::{gemma_path, raw_gen, status, tiny, wait_until, TestDaemon};

/// Worker events drained from a subscription, in arrival order.
fn drain(events: &paraphym_protocol::client::Subscription, into: &mut Vec<(u32, WorkerState)>) {
    while let Ok(Some(e)) = events.next_timeout(Duration::from_millis(5)) {
        if let Event::Worker { worker, .. } = e {
            into.push((worker.id, worker.state));
        }
    }
}

/// Each worker's states, in order.
fn per_worker(log: &[(u32, WorkerState)]) -> HashMap<u32, Vec<WorkerState>> {
    let mut m: HashMap<u32, Vec<WorkerState>> = HashMap::new();
    for (id, s) in log {
        m.entry(*id).or_default().push(*s);
    }
    m
}

/// A worker's life is Loading|Spawning, Idle, (Busy, Idle)*, Stopping,
/// Stopped. A busy worker also speaks while its batch grows and shrinks
/// (the same state again, `sequences` changed): those repeats fold into one.
fn assert_valid_life(id: u32, states: &[WorkerState], finished: bool) {
    use WorkerState::*;
    let mut states = states.to_vec();
    states.dedup();
    let states = states.as_slice();
    assert!(
        matches!(states.first(), Some(Loading | Spawning)),
        "worker {id}: {states:?}"
    );
    for pair in states.windows(2) {
        let ok = matches!(
            (pair[0], pair[1]),
            (Loading | Spawning, Idle)
                | (Idle, Busy)
                | (Busy, Idle)
                | (Idle, Stopping)
                | (Stopping, Stopped)
        );
        assert!(
            ok,
            "worker {id}: {:?} -> {:?} in {states:?}",
            pair[0], pair[1]
        );
    }
    if finished {
        assert_eq!(states.last(), Some(&Stopped), "worker {id}: {states:?}");
    }
}

#[test]
fn the_first_token_does_not_wait_for_the_second_worker() {
    let model = tiny(Arch::Qwen3);
    let daemon = TestDaemon::start_with_env(
        &["--prewarm", "2"],
        &[("PARAPHYM_TEST_HOOKS", "replica_delay_ms=3000")],
    );
    let client = daemon.client();
    let events = client.subscribe().unwrap();
    let mut log = Vec::new();
    let stream = client
        .generate(raw_gen(model.to_str().unwrap(), "Hello", 8))
        .unwrap();
    let (text, stats) = stream.collect_text().unwrap();
    assert_eq!(stats.generated_tokens, 8);
    assert!(!text.is_empty());
    drain(&events, &mut log);
    // Worker 0 served the request before worker 1 was ready.
    let w0_busy = log.iter().position(|e| *e == (0, WorkerState::Busy));
    let w1_idle = log.iter().position(|e| *e == (1, WorkerState::Idle));
    assert!(w0_busy.is_some(), "{log:?}");
    assert!(w1_idle.is_none(), "worker 1 is still starting: {log:?}");
    assert!(log.contains(&(1, WorkerState::Spawning)), "{log:?}");
    // And it does become ready: two workers warm.
    let ready = wait_until(Duration::from_secs(10), || {
        drain(&events, &mut log);
        log.contains(&(1, WorkerState::Idle))
    });
    assert!(ready, "{log:?}");
    let w0_busy = log
        .iter()
        .position(|e| *e == (0, WorkerState::Busy))
        .unwrap();
    let w1_idle = log
        .iter()
        .position(|e| *e == (1, WorkerState::Idle))
        .unwrap();
    assert!(w0_busy < w1_idle, "{log:?}");
    for (id, states) in per_worker(&log) {
        assert_valid_life(id, &states, false);
    }
}

#[test]
fn a_second_worker_costs_its_kv_cache_not_another_copy_of_the_weights() {
    let gemma = gemma_path();
    let g = gemma.to_str().unwrap();
    let context = 512u64;
    let daemon = TestDaemon::start(&[
        "--prewarm",
        "1",
        "--max-workers",
        "2",
        "--context",
        "512",
        "--idle-period",
        "1h",
    ]);
    let client = daemon.client();
    client
        .generate(raw_gen(g, "Warm up the first worker.", 64))
        .unwrap()
        .collect_text()
        .unwrap();
    let one = status(&client);
    assert_eq!(one.models[0].workers.len(), 1);
    // Two at once: the second queues, the scaler adds a replica for it.
    let a = client
        .generate(raw_gen(g, "The first of two stories:", 64))
        .unwrap();
    let b = client
        .generate(raw_gen(g, "The second of two stories:", 64))
        .unwrap();
    a.collect_text().unwrap();
    b.collect_text().unwrap();
    let two = status(&client);
    let workers = &two.models[0].workers;
    assert_eq!(workers.len(), 2, "{workers:?}");
    assert!(
        workers.iter().all(|w| w.requests_served >= 1),
        "{workers:?}"
    );
    // Gemma 3 270M: 18 layers, 1 KV head of 256, f32 keys and values.
    let kv = 18 * 2 * 256 * context * 4;
    let buffers = 64 << 20;
    let added = two.memory_used_bytes.saturating_sub(one.memory_used_bytes);
    let file = std::fs::metadata(&gemma).unwrap().len();
    assert!(
        added <= kv + buffers,
        "the second worker added {} MiB (KV {} MiB + buffers {} MiB allowed; the weights are {} MiB)",
        added >> 20,
        kv >> 20,
        buffers >> 20,
        file >> 20
    );
}

#[test]
fn a_burst_scales_up_to_max_workers_and_idle_scales_back_down() {
    let model = tiny(Arch::Qwen3);
    let m = model.to_str().unwrap().to_owned();
    let daemon = TestDaemon::start(&[
        "--prewarm",
        "1",
        "--max-workers",
        "3",
        "--idle-period",
        "1s",
        // Two sequences per worker: six requests fill three batches, so
        // workers are added once batches are full.
        "--batch",
        "2",
    ]);
    let client = daemon.client();
    let events = client.subscribe().unwrap();
    let samples = client.subscribe().unwrap();
    let mut log = Vec::new();
    // Load first, then the burst: six long requests at once.
    client
        .call(Request::Load {
            model: m.clone(),
            keep_alive_ms: None,
            context: None,
        })
        .unwrap();
    let streams: Vec<_> = (0..6)
        .map(|i| {
            client
                .generate(raw_gen(&m, &format!("Burst {i}"), 300))
                .unwrap()
        })
        .collect();
    let mut max_seen = 0;
    for s in streams {
        let (_, stats) = s.collect_text().unwrap();
        assert_eq!(stats.generated_tokens, 300);
        max_seen = max_seen.max(status(&client).models[0].workers.len());
    }
    drain(&events, &mut log);
    let busy: std::collections::HashSet<u32> = log
        .iter()
        .filter(|(_, s)| *s == WorkerState::Busy)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(busy.len(), 3, "three workers served the burst: {log:?}");
    assert!(max_seen <= 3);
    // The periodic samples showed the model's and each worker's speed.
    let mut best: Option<paraphym_protocol::message::ModelMetrics> = None;
    while let Ok(Some(e)) = samples.next_timeout(Duration::from_millis(5)) {
        if let Event::Metrics(m) = e {
            assert!(m.memory_used_bytes > 0 && m.memory_estimated_bytes > 0);
            for mm in m.models {
                if best
                    .as_ref()
                    .is_none_or(|b| mm.tokens_per_s > b.tokens_per_s)
                {
                    best = Some(mm);
                }
            }
        }
    }
    let best = best.expect("metrics samples during the burst");
    assert!(best.tokens_per_s > 0.0, "{best:?}");
    let summed: f32 = best.workers.iter().map(|w| w.tokens_per_s).sum();
    assert!((summed - best.tokens_per_s).abs() < 1e-3, "{best:?}");
    assert!(
        best.workers.iter().filter(|w| w.tokens_per_s > 0.0).count() >= 2,
        "{best:?}"
    );
    // After the idle period, back to one.
    let down = wait_until(Duration::from_secs(10), || {
        status(&client).models[0].workers.len() == 1
    });
    assert!(down, "{:?}", status(&client).models[0].workers);
    drain(&events, &mut log);
    let lives = per_worker(&log);
    let stopped = lives
        .values()
        .filter(|l| l.last() == Some(&WorkerState::Stopped))
        .count();
    assert_eq!(stopped, 2, "{lives:?}");
    for (id, states) in &lives {
        assert_valid_life(*id, states, states.last() == Some(&WorkerState::Stopped));
    }
}

#[test]
fn keep_alive_unloads_after_its_time_zero_at_once_forever_never() {
    let model = tiny(Arch::Llama);
    let m = model.to_str().unwrap();
    let daemon = TestDaemon::start(&["--keep-alive", "1s"]);
    let client = daemon.client();
    let events = client.subscribe().unwrap();
    let mut log = Vec::new();

    // The daemon's keep-alive (1 s here; 5 min by default).
    client
        .generate(raw_gen(m, "Soon idle", 4))
        .unwrap()
        .collect_text()
        .unwrap();
    let start = Instant::now();
    assert!(wait_until(Duration::from_secs(10), || status(&client)
        .models
        .is_empty()));
    assert!(start.elapsed() >= Duration::from_millis(900));
    drain(&events, &mut log);
    for (id, states) in per_worker(&log) {
        assert_valid_life(id, &states, true);
    }

    // Forever (-1): still loaded well past the daemon's keep-alive.
    client
        .generate(Generate {
            keep_alive_ms: Some(u64::MAX),
            ..raw_gen(m, "Stay", 4)
        })
        .unwrap()
        .collect_text()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(status(&client).models.len(), 1);

    // Zero: unloaded right after this request.
    let mut s = client
        .generate(Generate {
            keep_alive_ms: Some(0),
            ..raw_gen(m, "Go", 4)
        })
        .unwrap();
    assert!(matches!(
        paraphym_tests::next_piece(&mut s),
        Some(Ok(Piece::Token(_)))
    ));
    s.collect_text().unwrap();
    assert!(wait_until(Duration::from_secs(2), || status(&client)
        .models
        .is_empty()));
}

/// The most sequences any worker event showed in a batch, and the batch
/// limits (`most`) they showed.
fn batches_seen(events: &paraphym_protocol::client::Subscription) -> (u32, Vec<u32>) {
    let (mut sequences, mut limits) = (0, Vec::new());
    while let Ok(Some(e)) = events.next_timeout(Duration::from_millis(5)) {
        if let Event::Worker { worker, .. } = e {
            sequences = sequences.max(worker.sequences);
            if worker.state == WorkerState::Busy {
                limits.push(worker.batch);
            }
        }
    }
    (sequences, limits)
}

/// Sequences per worker, chosen from measured throughput: on a "device"
/// (a test hook) where a pass of n rows takes 25 ms × n², four rows decode
/// a quarter as fast in total as one. The first burst fills the batch
/// (nothing measured yet); once measured, the worker takes one at a time
/// and says so in its events.
#[test]
fn a_batch_stops_growing_where_measured_rows_stop_adding_throughput() {
    let model = tiny(Arch::Qwen3);
    let m = model.to_str().unwrap().to_owned();
    let daemon = TestDaemon::start_with_env(
        &["--prewarm", "1", "--max-workers", "1", "--batch", "4"],
        &[("PARAPHYM_TEST_HOOKS", "pass_ms_per_row=25")],
    );
    let client = daemon.client();
    let (_, one) = client
        .generate(raw_gen(&m, "Alone", 24))
        .unwrap()
        .collect_text()
        .unwrap();
    assert_eq!(one.generated_tokens, 24);
    let burst = |tag: &str, n: usize| {
        let events = client.subscribe().unwrap();
        let streams: Vec<_> = (0..n)
            .map(|i| {
                client
                    .generate(raw_gen(&m, &format!("{tag} {i}"), 24))
                    .unwrap()
            })
            .collect();
        for s in streams {
            assert_eq!(s.collect_text().unwrap().1.generated_tokens, 24);
        }
        batches_seen(&events)
    };
    let (sequences, limits) = burst("Four at once", 4);
    assert_eq!(sequences, 4, "not measured yet: the batch fills");
    assert!(limits.contains(&4), "{limits:?}");
    // Measured: 4 rows decode slower than 1. Three more run one at a time.
    let (sequences, limits) = burst("Then three", 3);
    assert_eq!(sequences, 1, "the batch stays at one: {limits:?}");
    assert!(
        !limits.is_empty() && limits.iter().all(|&b| b == 1),
        "the events show the measured limit: {limits:?}"
    );
}

/// Workers per model, chosen from measured throughput: on a "device" that
/// runs one worker's pass at a time and takes twice as long per pass when
/// two workers are busy (a test hook, 40 ms a one-row pass alone), a
/// second worker lowers the total. The first burst adds one (nothing measured yet);
/// once measured, a later burst waits for the one worker instead.
#[test]
fn a_worker_measured_to_add_nothing_is_not_started_again() {
    let model = tiny(Arch::Llama);
    let m = model.to_str().unwrap().to_owned();
    let daemon = TestDaemon::start_with_env(
        &[
            "--prewarm",
            "1",
            "--max-workers",
            "2",
            "--batch",
            "1",
            "--idle-period",
            "1s",
        ],
        &[("PARAPHYM_TEST_HOOKS", "pass_ms_per_row=40")],
    );
    let client = daemon.client();
    let events = client.subscribe().unwrap();
    let mut log = Vec::new();
    let (_, one) = client
        .generate(raw_gen(&m, "Alone", 32))
        .unwrap()
        .collect_text()
        .unwrap();
    assert_eq!(one.generated_tokens, 32);
    let burst = |tag: &str| {
        let streams: Vec<_> = (0..2)
            .map(|i| {
                client
                    .generate(raw_gen(&m, &format!("{tag} {i}"), 32))
                    .unwrap()
            })
            .collect();
        let mut most = 0;
        for s in streams {
            assert_eq!(s.collect_text().unwrap().1.generated_tokens, 32);
            most = most.max(status(&client).models[0].workers.len());
        }
        most
    };
    assert_eq!(burst("Two at once"), 2, "not measured yet: a second worker");
    drain(&events, &mut log);
    let workers: std::collections::HashSet<u32> = log.iter().map(|(id, _)| *id).collect();
    assert_eq!(workers.len(), 2, "{log:?}");
    // Back to one after the idle period; then the same burst again.
    let down = wait_until(Duration::from_secs(10), || {
        status(&client).models[0].workers.len() == 1
    });
    assert!(down, "{:?}", status(&client).models[0].workers);
    drain(&events, &mut log);
    log.clear();
    assert_eq!(burst("Two again"), 1, "measured: no second worker");
    drain(&events, &mut log);
    let workers: std::collections::HashSet<u32> = log.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        workers.len(),
        1,
        "one worker served the second burst: {log:?}"
    );
}
