//! Before the first token a request says where it is: queued (its position
//! falling), the model loading, the prompt being read; a cancel during a long
//! prefill lands within a chunk.

use std::time::Duration;

use paraphym_daemon::synth::Arch;
use paraphym_protocol::client::Piece;
use paraphym_protocol::message::{Stage, StopReason};
use paraphym_tests::{gemma_path, raw_gen, tiny, TestDaemon};

#[test]
fn a_queued_request_sees_its_position_fall_then_loading_prefill_and_tokens() {
    let model = tiny(Arch::Qwen3);
    let m = model.to_str().unwrap();
    // One request per worker: the others wait in the queue, not a batch.
    let daemon = TestDaemon::start(&["--prewarm", "1", "--max-workers", "1", "--batch", "1"]);
    let client = daemon.client();
    // Three requests for a cold model, one worker.
    let a = client.generate(raw_gen(m, "First and long", 4000)).unwrap();
    let b = client.generate(raw_gen(m, "Second", 4)).unwrap();
    let mut c = client.generate(raw_gen(m, "Third", 4)).unwrap();
    let mut stages = Vec::new();
    // Until the first request is running (the third is then second in line).
    while !stages.contains(&Stage::Queued { position: 2 }) {
        match c.next_timeout(Duration::from_secs(20)).unwrap() {
            Some(Piece::Stage(s)) => stages.push(s),
            other => panic!("{other:?} before its turn; stages {stages:?}"),
        }
    }
    a.cancel().unwrap();
    let mut tokens = 0;
    let mut done = None;
    for p in c {
        match p.unwrap() {
            Piece::Stage(s) => {
                assert_eq!(tokens, 0, "no stage after the first token");
                stages.push(s)
            }
            Piece::Token(_) => tokens += 1,
            Piece::Done(s) => done = Some(s),
            Piece::Logprobs(l) => panic!("logprobs nobody asked for: {l:?}"),
        }
    }
    assert_eq!(done.unwrap().generated_tokens, 4);
    assert!(tokens > 0);
    let queued: Vec<u32> = stages
        .iter()
        .filter_map(|s| match s {
            Stage::Queued { position } => Some(*position),
            _ => None,
        })
        .collect();
    assert_eq!(queued, vec![3, 2, 1], "{stages:?}");
    assert!(
        stages.iter().any(|s| matches!(s, Stage::Loading { .. })),
        "it waited for the load: {stages:?}"
    );
    let loading: Vec<u8> = stages
        .iter()
        .filter_map(|s| match s {
            Stage::Loading { percent } => Some(*percent),
            _ => None,
        })
        .collect();
    assert!(loading.windows(2).all(|w| w[0] <= w[1]), "{loading:?}");
    let tail = &stages[stages.len() - 2..];
    assert!(
        matches!(tail, [Stage::Prefill { done, total }, Stage::Generating] if done == total),
        "{stages:?}"
    );
    b.collect_text().unwrap();
}

#[test]
fn a_cancel_during_a_long_prefill_stops_within_a_chunk() {
    let gemma = gemma_path();
    let text = std::fs::read_to_string("/usr/share/common-licenses/GPL-3")
        .expect("GPL-3 text (package base-files)");
    let daemon = TestDaemon::start(&["--prewarm", "1", "--prefill-chunk", "256"]);
    let client = daemon.client();
    let mut s = client
        .generate(raw_gen(gemma.to_str().unwrap(), &text[..9000], 8))
        .unwrap();
    // The first chunk is in: cancel.
    let total = loop {
        match s.next().unwrap().unwrap() {
            Piece::Stage(Stage::Prefill { done, total }) => {
                assert_eq!(done, 256);
                break total;
            }
            Piece::Stage(_) => {}
            other => panic!("{other:?}"),
        }
    };
    assert!(total >= 1500, "a long prompt: {total} tokens");
    s.cancel().unwrap();
    let mut last_done = 256;
    let mut stats = None;
    for p in s {
        match p.unwrap() {
            Piece::Stage(Stage::Prefill { done, .. }) => last_done = done,
            Piece::Stage(_) => {}
            Piece::Token(t) => panic!("a token after the cancel: {t:?}"),
            Piece::Logprobs(l) => panic!("logprobs nobody asked for: {l:?}"),
            Piece::Done(st) => stats = Some(st),
        }
    }
    let stats = stats.unwrap();
    assert_eq!(stats.stop, StopReason::Cancelled);
    assert_eq!(stats.generated_tokens, 0);
    // At most the chunk that was running when the cancel came.
    assert!(
        last_done <= 512,
        "prefill went on to {last_done} of {total}"
    );
}
