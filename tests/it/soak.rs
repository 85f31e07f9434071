//! A bounded soak: 50 clients with random prompts, cancels and disconnects.
//! Every request is answered, the daemon settles back to idle, and its
//! memory does not grow.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use paraphym_daemon::synth::Arch;
use paraphym_protocol::client::{Client, ClientError, Piece};
use paraphym_protocol::message::{ErrorKind, Generate, Options, Prompt, StopReason, WorkerState};
use paraphym_tests::{status, tiny, wait_until, TestDaemon};

const WORDS: &[&str] = &[
    "river", "stone", "quiet", "engine", "morning", "paper", "signal", "garden", "copper", "window",
];

/// A small deterministic generator (no dependency, reproducible runs).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Default)]
struct Tally {
    done: AtomicU64,
    cancelled: AtomicU64,
    busy: AtomicU64,
    disconnects: AtomicU64,
}

/// One client's loop until `deadline`; panics on any unanswered request.
fn client_loop(
    socket: std::path::PathBuf,
    model: String,
    seed: u64,
    deadline: Instant,
    t: Arc<Tally>,
) {
    let mut rng = Lcg(seed);
    let mut client = Client::connect(&socket).unwrap();
    while Instant::now() < deadline {
        // A person or a script between requests.
        std::thread::sleep(Duration::from_millis(rng.below(80)));
        let words = 1 + rng.below(12) as usize;
        let prompt: Vec<&str> = (0..words)
            .map(|_| WORDS[rng.below(WORDS.len() as u64) as usize])
            .collect();
        let g = Generate {
            model: Some(model.clone()),
            prompt: Prompt::Raw(prompt.join(" ")),
            options: Options {
                max_tokens: Some(4 + rng.below(60) as u32),
                seed: Some(rng.next()),
                ..Options::default()
            },
            keep_alive_ms: None,
            session: None,
        };
        let action = rng.below(10);
        let mut stream = match client.generate(g) {
            Ok(s) => s,
            Err(e) => panic!("client {seed}: generate: {e}"),
        };
        if action < 2 {
            // Disconnect mid-stream.
            let _ = stream.next();
            drop(stream);
            client = Client::connect(&socket).unwrap();
            t.disconnects.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let mut end = None;
        if action < 4 {
            // Cancel after the first piece, unless that was already the end.
            match stream.next() {
                Some(Ok(Piece::Done(s))) => end = Some(Ok(s)),
                Some(Err(e)) => end = Some(Err(e)),
                _ => stream.cancel().unwrap(),
            }
        }
        for p in stream.by_ref() {
            if end.is_some() {
                break;
            }
            match p {
                Ok(Piece::Done(s)) => {
                    end = Some(Ok(s));
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    end = Some(Err(e));
                    break;
                }
            }
        }
        match end {
            Some(Ok(s)) if s.stop == StopReason::Cancelled => {
                t.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            Some(Ok(_)) => {
                t.done.fetch_add(1, Ordering::Relaxed);
            }
            Some(Err(ClientError::Daemon(e))) if e.kind == ErrorKind::Busy => {
                // Told to come back later: back off as a client should.
                t.busy.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
            other => panic!("client {seed}: request not answered properly: {other:?}"),
        }
    }
}

fn soak(socket: &std::path::Path, model: &str, clients: u64, secs: u64, seed: u64) -> Arc<Tally> {
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + Duration::from_secs(secs);
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let (socket, model, t) = (socket.to_owned(), model.to_owned(), tally.clone());
            std::thread::spawn(move || client_loop(socket, model, seed + i, deadline, t))
        })
        .collect();
    for h in handles {
        h.join().expect("a client failed");
    }
    tally
}

fn settled(c: &Client) -> bool {
    let s = status(c);
    s.faults.is_empty()
        && s.models.iter().all(|m| {
            m.queued == 0
                && m.workers.len() == 1
                && m.workers.iter().all(|w| w.state == WorkerState::Idle)
        })
}

/// The daemon's resident memory once it stops falling (two readings a
/// housekeeping tick apart within 1 MiB), after at most 10 s.
fn steady_rss(c: &Client) -> u64 {
    let mut last = status(c).memory_used_bytes;
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = status(c).memory_used_bytes;
        if last.abs_diff(now) < 1 << 20 || start.elapsed() > Duration::from_secs(10) {
            return now;
        }
        last = now;
    }
}

#[test]
fn fifty_clients_with_cancels_and_disconnects_leave_nothing_behind() {
    let model = tiny(Arch::Qwen3);
    let m = model.to_str().unwrap();
    let daemon = TestDaemon::start(&[
        "--prewarm",
        "2",
        "--max-workers",
        "3",
        "--idle-period",
        "1s",
        "--max-queue",
        "64",
    ]);
    let c = daemon.client();
    // A first round as long as the measured one: the allocator's arenas,
    // every worker's buffers and batches of every size (a batch's peak
    // comes and goes with the cancels; a short round may not reach it).
    soak(&daemon.socket, m, 50, 12, 1);
    assert!(
        wait_until(Duration::from_secs(20), || settled(&c)),
        "{:?}",
        status(&c)
    );
    let idle_rss = steady_rss(&c);

    let t = soak(&daemon.socket, m, 50, 12, 1000);
    let (done, cancelled, busy, gone) = (
        t.done.load(Ordering::Relaxed),
        t.cancelled.load(Ordering::Relaxed),
        t.busy.load(Ordering::Relaxed),
        t.disconnects.load(Ordering::Relaxed),
    );
    assert!(
        done > 20 && cancelled > 5 && gone > 5,
        "{done} {cancelled} {busy} {gone}"
    );

    // Back to idle: queues empty, workers idle and back to the minimum.
    assert!(
        wait_until(Duration::from_secs(20), || settled(&c)),
        "{:?}",
        status(&c)
    );
    // Freed buffers go back to the system once the daemon is idle (the
    // housekeeping tick after the last worker left): a leak never does.
    let end_rss = steady_rss(&c);
    assert!(
        end_rss as f64 <= idle_rss as f64 * 1.10,
        "RSS grew from {} MiB to {} MiB",
        idle_rss >> 20,
        end_rss >> 20
    );
    eprintln!(
        "soak: {done} done, {cancelled} cancelled, {busy} busy, {gone} disconnects; RSS {} -> {} MiB",
        idle_rss >> 20,
        end_rss >> 20
    );
}
