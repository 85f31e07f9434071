//! Per-request context windows (Ollama's `num_ctx`, `Options.context`): a
//! request asking for less than the model serves is held to it; one asking
//! for more makes the daemon serve the model with more from then on, without
//! a reload and with the same tokens, if the memory budget has room.

use paraphym_daemon::engine::memory_estimate;
use paraphym_daemon::synth::Arch;
use paraphym_protocol::message::{ErrorKind, GenStats, Generate, Options, Prompt, StopReason};
use paraphym_tests::{status, tiny, TestDaemon};

/// Greedy over `prompt` token ids, running its full length unless the
/// context ends it.
fn tokens_gen(model: &str, prompt: usize, max_tokens: u32, context: Option<u32>) -> Generate {
    Generate {
        model: Some(model.to_owned()),
        prompt: Prompt::Tokens((0..prompt as u32).map(|i| 1000 + i).collect()),
        options: Options {
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            ignore_eos: true,
            context,
            ..Options::default()
        },
        keep_alive_ms: None,
        session: None,
    }
}

fn served(c: &paraphym_protocol::client::Client) -> u32 {
    status(c).models[0].context
}

fn run(c: &paraphym_protocol::client::Client, g: Generate) -> (String, GenStats) {
    c.generate(g).unwrap().collect_text().unwrap()
}

/// The error a generation ends with.
fn refused(
    c: &paraphym_protocol::client::Client,
    g: Generate,
) -> paraphym_protocol::client::ClientError {
    c.generate(g).unwrap().collect_text().unwrap_err()
}

#[test]
fn requests_get_the_window_they_ask_for_and_a_longer_one_grows_the_model() {
    let model = tiny(Arch::Qwen3);
    let m = model.to_str().unwrap();
    let daemon = TestDaemon::start(&["--context", "128", "--prewarm", "1"]);
    let c = daemon.client();

    // The served context: the prompt (100) and the reply share 128 positions.
    let (full, a) = run(&c, tokens_gen(m, 100, 100, None));
    assert_eq!(a.stop, StopReason::ContextFull);
    // 28 tokens fill the cache; the 29th is chosen from the last position.
    assert_eq!(a.generated_tokens, 29);
    assert_eq!(served(&c), 128);

    // Less: held to it, with the same tokens as far as they go.
    let (short, e) = run(&c, tokens_gen(m, 100, 100, Some(110)));
    assert_eq!((e.stop, e.generated_tokens), (StopReason::ContextFull, 11));
    assert!(full.starts_with(&short), "{full:?} / {short:?}");
    let err = refused(&c, tokens_gen(m, 100, 10, Some(64)));
    assert_eq!(err.kind(), Some(ErrorKind::ContextOverflow), "{err}");
    assert!(err.to_string().contains("64"), "{err}");
    let zero = refused(&c, tokens_gen(m, 10, 10, Some(0)));
    assert_eq!(zero.kind(), Some(ErrorKind::BadRequest), "{zero}");
    assert_eq!(served(&c), 128, "asking for less never shrinks the model");

    // More: the model serves 1,000 positions from now on, same tokens.
    let (long, b) = run(&c, tokens_gen(m, 100, 200, Some(1000)));
    assert_eq!((b.stop, b.generated_tokens), (StopReason::MaxTokens, 200));
    assert!(long.starts_with(&full), "{long:?} / {full:?}");
    assert_eq!(served(&c), 1000);
    // The conversation cache was kept across the growth: only the new turn
    // is prefilled.
    let (_, again) = run(&c, tokens_gen(m, 100, 10, None));
    assert_eq!(again.cached_tokens, 99, "{again:?}");
    // And a request without a window now gets the longer one.
    let (_, d) = run(&c, tokens_gen(m, 400, 700, None));
    assert_eq!((d.stop, d.generated_tokens), (StopReason::ContextFull, 601));

    // Past what the model was trained for (4,096): its maximum.
    let (_, f) = run(&c, tokens_gen(m, 10, 5, Some(1_000_000)));
    assert_eq!(f.generated_tokens, 5);
    assert_eq!(served(&c), 4096);
    assert!(
        daemon
            .log_text()
            .contains("a request asked for a longer context"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn a_longer_context_past_the_memory_budget_is_refused_and_others_are_served() {
    let model = tiny(Arch::Llama);
    let m = model.to_str().unwrap();
    let estimate = |context| {
        let e = memory_estimate(&model, Some(context), 256, &candle_core::Device::Cpu).unwrap();
        e.weights + e.per_worker
    };
    // One worker at 1,024 positions fits; at 4,096 it does not.
    let budget = estimate(1024);
    assert!(estimate(4096) > budget);
    let budget = budget.to_string();
    let daemon = TestDaemon::start(&[
        "--context",
        "128",
        "--prewarm",
        "1",
        "--max-workers",
        "1",
        "--memory-budget",
        &budget,
    ]);
    let c = daemon.client();
    let (_, s) = run(&c, tokens_gen(m, 20, 5, None));
    assert_eq!(s.generated_tokens, 5);

    let err = refused(&c, tokens_gen(m, 20, 5, Some(4096)));
    assert_eq!(err.kind(), Some(ErrorKind::OutOfMemory), "{err}");
    assert!(
        err.to_string().contains("4096 positions") && err.to_string().contains("memory budget"),
        "{err}"
    );
    assert_eq!(served(&c), 128, "a refused window changes nothing");

    // What fits is served, and everyone else goes on.
    let (_, s) = run(&c, tokens_gen(m, 20, 5, Some(512)));
    assert_eq!(s.generated_tokens, 5);
    assert_eq!(served(&c), 512);
    let (_, s) = run(&c, tokens_gen(m, 20, 5, None));
    assert_eq!(s.generated_tokens, 5);
    let st = status(&c);
    assert!(
        st.memory_estimated_bytes <= st.memory_budget_bytes,
        "{st:?}"
    );
}
