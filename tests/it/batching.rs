//! One worker decodes several requests in one batched pass: each request
//! gets exactly the tokens it gets alone, whenever it joins or leaves the
//! batch, and a cancel ends only its own request.

use std::time::Duration;

use paraphym_protocol::client::{Client, Piece, TokenStream};
use paraphym_protocol::message::{Event, StopReason, WorkerState};
use paraphym_tests::{gemma_path, raw_gen, status, TestDaemon};

const PROMPTS: [&str; 6] = [
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "def fibonacci(n):",
    "The three primary colours are",
    "In 1969, the first humans to walk on the Moon",
    "A recipe for bread: first,",
];

fn greedy(model: &str, prompt: &str, tokens: u32) -> paraphym_protocol::message::Generate {
    let mut g = raw_gen(model, prompt, tokens);
    g.options.temperature = Some(0.0);
    g
}

/// Read `n` text pieces of `s` (stages skipped), appending them to `text`.
fn read(s: &mut TokenStream, n: usize, text: &mut String) {
    let mut got = 0;
    while got < n {
        match s.next().expect("stream ended early").expect("piece") {
            Piece::Token(t) => {
                text.push_str(&t);
                got += 1;
            }
            Piece::Done(st) => panic!("done early: {st:?}"),
            Piece::Stage(_) | Piece::Logprobs(_) => {}
        }
    }
}

fn rest(s: TokenStream, mut text: String) -> (String, paraphym_protocol::message::GenStats) {
    let (tail, stats) = s.collect_text().expect("stream");
    text.push_str(&tail);
    (text, stats)
}

fn alone(c: &Client, model: &str, tokens: u32) -> Vec<String> {
    PROMPTS
        .iter()
        .map(|p| {
            let (text, stats) = c
                .generate(greedy(model, p, tokens))
                .unwrap()
                .collect_text()
                .unwrap();
            assert_eq!(stats.generated_tokens, tokens);
            text
        })
        .collect()
}

#[test]
fn requests_batched_on_one_worker_get_the_tokens_each_gets_alone() {
    batched_is_alone(&gemma_path(), &[], &[("PARAPHYM_TEST_HOOKS", "unmeasured")]);
}

/// The same through the fixed-shape step (what a GPU worker runs, eager
/// here): requests in slots of one decoder, prefilled on the ordinary path
/// and taken over, rows that join a step without advancing, slots freed
/// and reused, caches handed back. A synthetic model: the CPU's tensor
/// attention rounds a prompt's last position differently when a
/// conversation cache supplies the rest (a one-row query), and the Gemma
/// file's outlier activations can turn that into another token (see
/// ARCHITECTURE, the fixed-shape step); the slots themselves change no
/// bit (`static_step` engine tests).
#[test]
fn requests_in_fixed_step_slots_get_the_tokens_each_gets_alone() {
    batched_is_alone(
        &paraphym_tests::tiny(paraphym_daemon::synth::Arch::Qwen3),
        &["--decode-step", "fixed"],
        &[("PARAPHYM_TEST_HOOKS", "unmeasured")],
    );
}

/// The same with the step run ahead of the host, as on a GPU: each pass
/// launches the next step with the greedy tokens just read, before they
/// are reported; a request that ends meanwhile (its budget, a cancel) has
/// its slot's speculative position taken back before its cache returns.
#[test]
fn requests_in_fixed_step_slots_run_ahead_get_the_tokens_each_gets_alone() {
    batched_is_alone(
        &paraphym_tests::tiny(paraphym_daemon::synth::Arch::Qwen3),
        &["--decode-step", "fixed"],
        &[("PARAPHYM_TEST_HOOKS", "run_ahead,unmeasured")],
    );
}

/// `env` switches the dials' measurement off (hook `unmeasured`): the
/// point here is what batching does, and a debug build on a small CPU
/// measures its rows adding next to nothing, so the batch dial would hold
/// the batch at the size it measured.
fn batched_is_alone(model: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) {
    let m = model.to_str().unwrap();
    let mut args = vec!["--prewarm", "1", "--max-workers", "1", "--batch", "8"];
    args.extend_from_slice(extra);
    let daemon = TestDaemon::start_with_env(&args, env);
    let c = daemon.client();
    let want = alone(&c, m, 64);
    let events = c.subscribe().unwrap();

    // Three start together; the fourth joins after 8 pieces of the first,
    // the fifth after 24; the sixth is cancelled after 6 of its own.
    let mut first = c.generate(greedy(m, PROMPTS[0], 64)).unwrap();
    let second = c.generate(greedy(m, PROMPTS[1], 64)).unwrap();
    let mut cancelled = c.generate(greedy(m, PROMPTS[5], 64)).unwrap();
    let mut text0 = String::new();
    read(&mut first, 8, &mut text0);
    let third = c.generate(greedy(m, PROMPTS[2], 64)).unwrap();
    let mut text5 = String::new();
    read(&mut cancelled, 6, &mut text5);
    cancelled.cancel().unwrap();
    read(&mut first, 16, &mut text0);
    let fourth = c.generate(greedy(m, PROMPTS[3], 64)).unwrap();
    let fifth = c.generate(greedy(m, PROMPTS[4], 64)).unwrap();

    let (t5, s5) = rest(cancelled, text5);
    assert_eq!(s5.stop, StopReason::Cancelled);
    assert!(s5.generated_tokens < 64, "{s5:?}");
    assert!(want[5].starts_with(&t5), "{t5:?} vs {:?}", want[5]);
    let got = [
        rest(first, text0),
        rest(second, String::new()),
        rest(third, String::new()),
        rest(fourth, String::new()),
        rest(fifth, String::new()),
    ];
    for (i, (text, stats)) in got.iter().enumerate() {
        assert_eq!(stats.generated_tokens, 64, "request {i}");
        assert_eq!(text, &want[i], "request {i}: batched vs alone");
    }

    // One worker ran them all, several at once.
    let s = status(&c);
    assert_eq!(s.models[0].workers.len(), 1, "{s:?}");
    let mut most = 0;
    while let Ok(Some(e)) = events.next_timeout(Duration::from_millis(20)) {
        if let Event::Worker { worker, .. } = e {
            if worker.state == WorkerState::Busy {
                most = most.max(worker.sequences);
            }
        }
    }
    assert!(
        most >= 4,
        "the worker's batch held {most} sequences at most"
    );
}

/// The memory budget bounds a batch as it bounds workers: each sequence
/// past a worker's first reserves its KV cache. With room for two, four
/// requests on one worker run two at a time, all complete, and the worker
/// says it takes two.
#[test]
fn the_memory_budget_holds_a_batch_to_what_fits() {
    let q = paraphym_tests::tiny(paraphym_daemon::synth::Arch::Qwen3);
    let m = q.to_str().unwrap();
    let e = paraphym_daemon::engine::memory_estimate(&q, Some(512), 256, &candle_core::Device::Cpu)
        .unwrap();
    let budget = (e.weights + e.per_worker * 2 + e.per_worker / 2).to_string();
    // Unmeasured: the budget alone holds the batch here.
    let daemon = TestDaemon::start_with_env(
        &[
            "--context",
            "512",
            "--prewarm",
            "1",
            "--max-workers",
            "1",
            "--batch",
            "8",
            "--memory-budget",
            &budget,
        ],
        &[("PARAPHYM_TEST_HOOKS", "unmeasured")],
    );
    let c = daemon.client();
    // Loaded and idle before the events are read.
    assert_eq!(
        c.generate(raw_gen(m, "Hi", 2))
            .unwrap()
            .collect_text()
            .unwrap()
            .1
            .generated_tokens,
        2
    );
    let events = c.subscribe().unwrap();
    let streams: Vec<_> = (0..4)
        .map(|_| c.generate(raw_gen(m, "Tell me", 200)).unwrap())
        .collect();
    for s in streams {
        assert_eq!(s.collect_text().unwrap().1.generated_tokens, 200);
    }
    let (mut most, mut held) = (0, u32::MAX);
    while let Ok(Some(e)) = events.next_timeout(Duration::from_millis(20)) {
        if let Event::Worker { worker, .. } = e {
            most = most.max(worker.sequences);
            if worker.state == WorkerState::Busy {
                held = held.min(worker.batch);
            }
        }
    }
    assert_eq!(most, 2, "two sequences at once, never more");
    assert_eq!(held, 2, "the worker showed its batch held to two");
    let s = status(&c);
    assert!(s.memory_estimated_bytes <= s.memory_budget_bytes, "{s:?}");
}
