//! What a client receives is what the engine generates.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use paraphym_daemon::engine::{
    ChatOptions, Engine, GenEvent, GenParams, LoadOptions, Message, Prompt as EnginePrompt,
    SamplingParams,
};
use paraphym_daemon::synth::Arch;
use paraphym_protocol::client::Piece;
use paraphym_protocol::message::{
    ChatMessage, Event, Generate, Options, Prompt, Request, Response, StopReason, WorkerState,
};
use paraphym_tests::{tiny, wait_until, TestDaemon};

fn request(model: &str, prompt: Prompt, seed: u64, max_tokens: u32) -> Generate {
    Generate {
        model: Some(model.to_owned()),
        prompt,
        options: Options {
            seed: Some(seed),
            max_tokens: Some(max_tokens),
            ..Options::default()
        },
        keep_alive_ms: None,
        session: None,
    }
}

/// The engine's own output for the daemon's defaults plus `seed`.
fn engine_text(engine: &mut Engine, prompt: EnginePrompt<'_>, seed: u64, max: usize) -> String {
    let params = GenParams {
        sampling: SamplingParams {
            seed: Some(seed),
            ..SamplingParams::default()
        },
        max_tokens: max,
        ..GenParams::default()
    };
    let mut text = String::new();
    engine
        .generate(prompt, &params, &AtomicBool::new(false), |e| {
            if let GenEvent::Text(t) = e {
                text.push_str(t);
            }
        })
        .unwrap();
    text
}

#[test]
fn streamed_tokens_equal_the_engines_output_for_the_same_seed() {
    let model = tiny(Arch::Qwen3);
    let m = model.to_str().unwrap();
    let daemon = TestDaemon::start(&[]);
    let client = daemon.client();
    let mut engine = Engine::load(&model, &LoadOptions::default()).unwrap();

    for seed in [1, 2] {
        let mut pieces = 0;
        let mut text = String::new();
        let mut done = None;
        for p in client
            .generate(request(m, Prompt::Raw("Once upon a time".into()), seed, 40))
            .unwrap()
        {
            match p.unwrap() {
                Piece::Token(t) => {
                    pieces += 1;
                    text.push_str(&t);
                }
                Piece::Done(s) => done = Some(s),
                Piece::Stage(_) => {}
                Piece::Logprobs(l) => panic!("logprobs nobody asked for: {l:?}"),
            }
        }
        let stats = done.expect("a Done frame");
        assert!(pieces > 1, "tokens arrive as separate frames");
        assert_eq!(
            text,
            engine_text(
                &mut engine,
                EnginePrompt::Text("Once upon a time"),
                seed,
                40
            )
        );
        assert!(stats.generated_tokens > 0 && stats.prompt_tokens > 0);
        assert!(stats.time_to_first_token_us > 0);
    }

    // A chat prompt goes through the model's own template, as in the engine.
    let messages = vec![
        ChatMessage {
            role: "system".into(),
            content: "Be brief.".into(),
            tool_calls: Vec::new(),
        },
        ChatMessage {
            role: "user".into(),
            content: "Name a colour.".into(),
            tool_calls: Vec::new(),
        },
    ];
    let (text, stats) = client
        .generate(request(
            m,
            Prompt::Chat {
                messages: messages.clone(),
                think: Some(false),
            },
            9,
            24,
        ))
        .unwrap()
        .collect_text()
        .unwrap();
    let engine_messages: Vec<Message> = messages
        .iter()
        .map(|c| Message::new(c.role.clone(), c.content.clone()))
        .collect();
    let opts = ChatOptions {
        add_generation_prompt: true,
        enable_thinking: Some(false),
        ..ChatOptions::default()
    };
    assert_eq!(
        text,
        engine_text(
            &mut engine,
            EnginePrompt::Chat(&engine_messages, &opts),
            9,
            24
        )
    );
    assert_eq!(
        stats.prompt_tokens as usize,
        engine.encode_chat(&engine_messages, &opts).unwrap().len()
    );
}

#[test]
fn eight_concurrent_clients_all_complete_correctly() {
    let model = tiny(Arch::Llama);
    let m = model.to_str().unwrap().to_owned();
    let daemon = TestDaemon::start(&["--prewarm", "2", "--max-workers", "2"]);
    let mut engine = Engine::load(&model, &LoadOptions::default()).unwrap();
    let expected: Vec<String> = (0..8)
        .map(|i| {
            engine_text(
                &mut engine,
                EnginePrompt::Text(&format!("Client {i} says")),
                100 + i,
                32,
            )
        })
        .collect();
    let handles: Vec<_> = (0..8u64)
        .map(|i| {
            let socket = daemon.socket.clone();
            let m = m.clone();
            std::thread::spawn(move || {
                let client = paraphym_protocol::client::Client::connect(&socket).unwrap();
                client
                    .generate(request(
                        &m,
                        Prompt::Raw(format!("Client {i} says")),
                        100 + i,
                        32,
                    ))
                    .unwrap()
                    .collect_text()
                    .unwrap()
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (text, stats) = h.join().unwrap();
        assert_eq!(text, expected[i], "client {i}");
        assert_eq!(stats.stop, StopReason::MaxTokens);
    }
    // Both workers took part.
    let Response::Status(s) = daemon.client().call(Request::Status).unwrap() else {
        panic!()
    };
    let served: Vec<u64> = s.models[0]
        .workers
        .iter()
        .map(|w| w.requests_served)
        .collect();
    assert_eq!(served.iter().sum::<u64>(), 8, "{served:?}");
}

#[test]
fn one_connection_carries_concurrent_generations_events_and_cancel() {
    let model = tiny(Arch::Gemma3);
    let m = model.to_str().unwrap();
    let daemon = TestDaemon::start(&["--prewarm", "2", "--max-workers", "2"]);
    let client = daemon.client();
    let events = client.subscribe().unwrap();
    let long = client
        .generate(request(m, Prompt::Raw("A long story".into()), 1, 3000))
        .unwrap();
    let a = client
        .generate(request(m, Prompt::Raw("First".into()), 2, 16))
        .unwrap();
    let b = client
        .generate(request(m, Prompt::Raw("Second".into()), 3, 16))
        .unwrap();
    let (_, sa) = a.collect_text().unwrap();
    let (_, sb) = b.collect_text().unwrap();
    assert_eq!(sa.stop, StopReason::MaxTokens);
    assert_eq!(sb.stop, StopReason::MaxTokens);

    // Cancel the long one: it ends with Done(Cancelled), early.
    long.cancel().unwrap();
    let (_, sl) = long.collect_text().unwrap();
    assert_eq!(sl.stop, StopReason::Cancelled);
    assert!(sl.generated_tokens < 3000);

    // Worker state changes and throughput samples reached the subscriber.
    let mut saw_busy = false;
    let mut saw_throughput = false;
    let ok = wait_until(Duration::from_secs(5), || {
        while let Ok(Some(e)) = events.next_timeout(Duration::from_millis(10)) {
            match e {
                Event::Worker { worker, .. } if worker.state == WorkerState::Busy => {
                    saw_busy = true
                }
                Event::Throughput { tokens_per_s, .. } if tokens_per_s > 0.0 => {
                    saw_throughput = true
                }
                _ => {}
            }
        }
        saw_busy && saw_throughput
    });
    assert!(
        ok,
        "busy worker event: {saw_busy}, throughput: {saw_throughput}"
    );
}
