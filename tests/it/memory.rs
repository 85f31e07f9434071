//! The memory governor: loads and scale-ups never go past the budget; an
//! idle model is unloaded to make room; a model that can't fit is told so.
//! Budgets are set from the same estimate the daemon uses.

use std::time::Duration;

use paraphym_daemon::engine::{memory_estimate, MemoryEstimate};
use paraphym_daemon::synth::Arch;
use paraphym_protocol::message::{ErrorKind, Event};
use paraphym_tests::{raw_gen, status, tiny, TestDaemon};

const CONTEXT: usize = 512;

fn estimate(model: &std::path::Path) -> MemoryEstimate {
    memory_estimate(model, Some(CONTEXT), 256, &candle_core::Device::Cpu).unwrap()
}

fn one_worker(e: MemoryEstimate) -> u64 {
    e.weights + e.per_worker
}

fn start(budget: u64, extra: &[&str]) -> TestDaemon {
    let budget = budget.to_string();
    let mut args = vec![
        "--context",
        "512",
        "--prewarm",
        "1",
        "--memory-budget",
        budget.as_str(),
    ];
    args.extend_from_slice(extra);
    TestDaemon::start(&args)
}

#[test]
fn an_idle_model_is_unloaded_to_make_room_and_no_request_is_lost() {
    let (q, l) = (tiny(Arch::Qwen3), tiny(Arch::Llama));
    let (eq, el) = (one_worker(estimate(&q)), one_worker(estimate(&l)));
    // Room for either, not both.
    let daemon = start(eq.max(el) + eq.min(el) / 2, &[]);
    let c = daemon.client();
    let events = c.subscribe().unwrap();
    let (_, s) = c
        .generate(raw_gen(q.to_str().unwrap(), "Tell me", 8))
        .unwrap()
        .collect_text()
        .unwrap();
    assert_eq!(s.generated_tokens, 8);
    let (_, s) = c
        .generate(raw_gen(l.to_str().unwrap(), "Tell me", 8))
        .unwrap()
        .collect_text()
        .unwrap();
    assert_eq!(s.generated_tokens, 8, "served after the eviction");
    let st = status(&c);
    let loaded: Vec<&str> = st.models.iter().map(|m| m.reference.as_str()).collect();
    assert_eq!(loaded, vec![l.to_str().unwrap()]);
    assert!(st.memory_estimated_bytes <= st.memory_budget_bytes);
    let mut reasons = Vec::new();
    while let Ok(Some(e)) = events.next_timeout(Duration::from_millis(20)) {
        if let Event::ModelUnloaded { model, reason } = e {
            reasons.push((model, reason));
        }
    }
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert_eq!(reasons[0].0, q.to_str().unwrap());
    assert!(reasons[0].1.contains("make room"), "{reasons:?}");
}

#[test]
fn a_model_that_cannot_fit_or_has_no_room_gets_a_clear_error() {
    let (q, l) = (tiny(Arch::Qwen3), tiny(Arch::Llama));
    let (eq, el) = (one_worker(estimate(&q)), one_worker(estimate(&l)));
    // Too big alone.
    let daemon = start(el - 1, &[]);
    let c = daemon.client();
    let err = c
        .generate(raw_gen(l.to_str().unwrap(), "Tell me", 4))
        .unwrap()
        .collect_text()
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::OutOfMemory), "{err}");
    assert!(err.to_string().contains("memory budget"), "{err}");
    assert!(status(&c).models.is_empty());
    drop(daemon);

    // No room while the other model is busy: refused, the busy one untouched.
    let daemon = start(eq.max(el) + eq.min(el) / 2, &["--prefill-chunk", "64"]);
    let c = daemon.client();
    let mut busy = c
        .generate(raw_gen(q.to_str().unwrap(), "Tell me", 4000))
        .unwrap();
    assert!(matches!(
        paraphym_tests::next_piece(&mut busy),
        Some(Ok(paraphym_protocol::client::Piece::Token(_)))
    ));
    let err = c
        .generate(raw_gen(l.to_str().unwrap(), "Tell me", 4))
        .unwrap()
        .collect_text()
        .unwrap_err();
    assert_eq!(err.kind(), Some(ErrorKind::OutOfMemory), "{err}");
    assert!(err.to_string().contains("busy"), "{err}");
    busy.cancel().unwrap();
    let (_, s) = busy.collect_text().unwrap();
    assert!(s.generated_tokens > 0);
}

#[test]
fn the_budget_refuses_a_scale_up_and_the_queue_is_served_anyway() {
    let q = tiny(Arch::Qwen3);
    let e = estimate(&q);
    // Room for one worker and half of a second.
    let daemon = start(
        e.weights + e.per_worker + e.per_worker / 2,
        &["--max-workers", "3"],
    );
    let c = daemon.client();
    let streams: Vec<_> = (0..3)
        .map(|_| {
            c.generate(raw_gen(q.to_str().unwrap(), "Tell me", 100))
                .unwrap()
        })
        .collect();
    for s in streams {
        assert_eq!(s.collect_text().unwrap().1.generated_tokens, 100);
    }
    let st = status(&c);
    assert_eq!(st.models[0].workers.len(), 1);
    assert!(st.memory_estimated_bytes <= st.memory_budget_bytes);
    assert!(daemon.log_text().contains("scale-up refused"));
}
