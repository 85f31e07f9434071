//! Conversations find their KV cache on whichever worker is free (issue 9):
//! two conversations alternate on a daemon with two idle workers, and every
//! turn after the first starts from its own previous turn's cache; caches
//! outlive their turn beyond one per worker and give way first under memory
//! pressure; chats past the context are refused or lose their oldest turns.

use paraphym_daemon::synth::Arch;
use paraphym_protocol::message::{
    ChatMessage, ErrorKind, GenStats, Generate, Options, Overflow, Prompt, Request, Response,
    StatusReport,
};
use paraphym_tests::{raw_gen, status, tiny, TestDaemon};

#[test]
fn alternating_conversations_each_reuse_their_own_cache() {
    let model = tiny(Arch::Qwen3);
    let model = model.to_str().unwrap();
    let daemon = TestDaemon::start(&["--prewarm", "2", "--max-workers", "2"]);
    let (a, b) = (daemon.client(), daemon.client());
    let say = |c: &paraphym_protocol::client::Client, prompt: &str| -> (String, GenStats) {
        c.generate(raw_gen(model, prompt, 12))
            .unwrap()
            .collect_text()
            .unwrap()
    };
    let mut chats = [
        String::from("The river ran past the old mill, and"),
        String::from("In the year of the great storm, the harbour"),
    ];
    let mut last: [Option<GenStats>; 2] = [None, None];
    for turn in 0..3 {
        for (i, client) in [&a, &b].into_iter().enumerate() {
            let (reply, stats) = say(client, &chats[i]);
            if let Some(prev) = &last[i] {
                // All of the previous prompt but a token at the seam (the
                // reply may merge with its last token), whichever worker ran it.
                assert!(
                    stats.cached_tokens + 2 >= prev.prompt_tokens,
                    "conversation {i}, turn {turn}: {} cached of the previous {} prompt tokens",
                    stats.cached_tokens,
                    prev.prompt_tokens
                );
            }
            chats[i].push_str(&reply);
            chats[i].push_str(" Then");
            last[i] = Some(stats);
        }
    }
    // A regeneration reuses all but the last prompt token and answers the same.
    let (first, _) = say(&a, &chats[0]);
    let (again, stats) = say(&a, &chats[0]);
    assert_eq!(first, again);
    assert_eq!(stats.cached_tokens + 1, stats.prompt_tokens);
}

/// Three conversations' turns, interleaved, on one worker: every
/// conversation still finds its own cache (parked beside the worker's), and
/// `Status` counts the caches in the model's memory.
#[test]
fn caches_outlive_their_turn_on_a_single_worker() {
    let model = tiny(Arch::Llama);
    let model = model.to_str().unwrap();
    let daemon = TestDaemon::start(&["--prewarm", "1", "--max-workers", "1"]);
    let c = daemon.client();
    let mut chats = [
        String::from("The river ran past the old mill, and"),
        String::from("In the year of the great storm, the harbour"),
        String::from("Nobody in the village had seen the lighthouse"),
    ];
    let mut last: [u32; 3] = [0; 3];
    for turn in 0..2 {
        for i in 0..3 {
            let gen = Generate {
                session: Some(format!("chat-{i}")),
                ..raw_gen(model, &chats[i], 8)
            };
            let (reply, stats) = c.generate(gen).unwrap().collect_text().unwrap();
            if turn > 0 {
                assert!(
                    stats.cached_tokens + 2 >= last[i],
                    "conversation {i}: {} cached of the previous {} prompt tokens",
                    stats.cached_tokens,
                    last[i]
                );
            }
            last[i] = stats.prompt_tokens;
            chats[i].push_str(&reply);
            chats[i].push_str(" Then");
        }
    }
    let s = status(&c);
    let m = &s.models[0];
    assert_eq!(m.caches, 3, "{m:?}");
    assert!(m.cache_bytes > 0);
    assert!(s.memory_estimated_bytes >= m.cache_bytes);

    // Without room for caches beyond the worker's, only the last one stays.
    let daemon = TestDaemon::start(&[
        "--prewarm",
        "1",
        "--max-workers",
        "1",
        "--conversation-caches",
        "0",
    ]);
    let c = daemon.client();
    for chat in &chats {
        c.generate(raw_gen(model, chat, 4))
            .unwrap()
            .collect_text()
            .unwrap();
    }
    let (_, stats) = c
        .generate(raw_gen(model, &chats[0], 4))
        .unwrap()
        .collect_text()
        .unwrap();
    assert!(stats.cached_tokens <= 2, "{stats:?}");
    assert_eq!(status(&c).models[0].caches, 1);
}

fn load(c: &paraphym_protocol::client::Client, model: &str) {
    match c
        .call(Request::Load {
            model: model.into(),
            keep_alive_ms: None,
            context: None,
        })
        .unwrap()
    {
        Response::Loaded { .. } => {}
        other => panic!("load answered {other:?}"),
    }
}

/// Under memory pressure the governor drops idle conversation caches (least
/// recently used first) before it unloads any model.
#[test]
fn memory_pressure_drops_caches_before_models() {
    let (a, b) = (tiny(Arch::Qwen3), tiny(Arch::Gemma3));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let flags = ["--prewarm", "1", "--max-workers", "1"];
    let chats = [
        "The river ran past the old mill, and",
        "In the year of the great storm, the harbour",
        "Nobody in the village had seen the lighthouse",
    ];
    let talk = |c: &paraphym_protocol::client::Client, i: usize| {
        let gen = Generate {
            session: Some(format!("chat-{i}")),
            ..raw_gen(a, chats[i], 8)
        };
        c.generate(gen).unwrap().collect_text().unwrap().1
    };
    let model = |s: &StatusReport, path: &str| {
        s.models
            .iter()
            .find(|m| m.reference == path)
            .cloned()
            .unwrap_or_else(|| panic!("{path} is not loaded: {s:?}"))
    };

    // What each costs, measured by a daemon without a tight budget.
    let (a_base, cache, b_base) = {
        let daemon = TestDaemon::start(&flags);
        let c = daemon.client();
        load(&c, a);
        let a_base = model(&status(&c), a).memory_bytes;
        for i in 0..3 {
            talk(&c, i);
        }
        let m = model(&status(&c), a);
        assert_eq!(m.caches, 3);
        assert_eq!(m.memory_bytes, a_base + m.cache_bytes);
        let cache = m.cache_bytes / 3;
        assert_eq!(m.cache_bytes, cache * 3, "conversations of one length");
        load(&c, b);
        (a_base, cache, model(&status(&c), b).memory_bytes)
    };
    assert!(
        2 * cache < b_base,
        "the test needs b to cost more than two caches"
    );

    // A with its three caches fits; A, B and one and a half caches do not.
    let budget = a_base + b_base + cache + cache / 2;
    let daemon =
        TestDaemon::start(&[&flags[..], &["--memory-budget", &budget.to_string()]].concat());
    let c = daemon.client();
    load(&c, a);
    for i in 0..3 {
        talk(&c, i);
    }
    assert_eq!(model(&status(&c), a).caches, 3);
    load(&c, b);
    let s = status(&c);
    assert_eq!(s.models.len(), 2, "both models stay loaded: {s:?}");
    let m = model(&s, a);
    assert_eq!(m.caches, 1, "the two oldest caches went: {m:?}");
    assert!(s.memory_estimated_bytes <= budget);
    // The newest conversation kept its cache; the oldest starts over.
    let newest = talk(&c, 2);
    assert!(
        newest.cached_tokens + 1 >= newest.prompt_tokens,
        "{newest:?}"
    );
    let oldest = talk(&c, 0);
    assert_eq!(oldest.cached_tokens, 0, "{oldest:?}");
    assert!(daemon.log_text().contains("dropped a conversation cache"));
}

/// A chat past the context: refused by default; with `Overflow::DropOldest`
/// its oldest turns make room (and the statistics say how many went), but
/// never its system message or its last message.
#[test]
fn chats_past_the_context_are_refused_or_lose_their_oldest_turns() {
    let model = tiny(Arch::Qwen3);
    let model = model.to_str().unwrap();
    let context = 160;
    let daemon = TestDaemon::start(&["--prewarm", "1", "--context", &context.to_string()]);
    let c = daemon.client();
    let msg = |role: &str, content: String| ChatMessage {
        role: role.into(),
        content,
        tool_calls: Vec::new(),
    };
    let mut messages = vec![msg("system", "You answer briefly.".into())];
    for i in 0..8 {
        messages.push(msg(
            "user",
            format!("Question {i}: what comes after {i} in the count?"),
        ));
        messages.push(msg(
            "assistant",
            format!("After {i} comes {} in the count.", i + 1),
        ));
    }
    messages.push(msg("user", "And what was the first question?".into()));
    let ask = |messages: &[ChatMessage], overflow: Overflow| {
        let gen = Generate {
            model: Some(model.into()),
            prompt: Prompt::Chat {
                messages: messages.to_vec(),
                think: Some(false),
            },
            options: Options {
                max_tokens: Some(24),
                seed: Some(1),
                overflow,
                ..Options::default()
            },
            keep_alive_ms: None,
            session: Some("long".into()),
        };
        c.generate(gen).unwrap().collect_text()
    };
    let refused = |r: Result<(String, GenStats), paraphym_protocol::client::ClientError>| match r {
        Err(paraphym_protocol::client::ClientError::Daemon(e)) => {
            assert_eq!(e.kind, ErrorKind::ContextOverflow, "{e:?}");
            e.message
        }
        other => panic!("expected ContextOverflow, got {other:?}"),
    };
    refused(ask(&messages, Overflow::Error));

    let (_, stats) = ask(&messages, Overflow::DropOldest).unwrap();
    assert!(stats.dropped_messages >= 2, "{stats:?}");
    assert_eq!(stats.dropped_messages % 2, 0, "whole turns: {stats:?}");
    assert!(stats.prompt_tokens + 24 <= context, "{stats:?}");
    // Left out: as few turns as fit. One turn fewer would not have.
    let kept_one_more = [
        &messages[..1],
        &messages[1 + stats.dropped_messages as usize - 2..],
    ]
    .concat();
    match ask(&kept_one_more, Overflow::Error) {
        Ok((_, s)) => assert!(s.prompt_tokens + 24 > context, "{s:?}"),
        refusal => drop(refused(refusal)),
    }
    let kept = [
        &messages[..1],
        &messages[1 + stats.dropped_messages as usize..],
    ]
    .concat();
    let (_, same) = ask(&kept, Overflow::Error).unwrap();
    assert_eq!(same.prompt_tokens, stats.prompt_tokens);
    assert_eq!(same.dropped_messages, 0);

    // The system message and the last message alone overflow: an error.
    let huge = vec![
        messages[0].clone(),
        msg("user", "Tell me more about this. ".repeat(60)),
    ];
    let message = refused(ask(&huge, Overflow::DropOldest));
    assert!(message.contains("last message"), "{message}");
}

/// `paraphym run --session NAME` continues a saved conversation: the second
/// run's prompt carries the first turn and starts from its cache; `--reset`
/// starts over.
#[test]
fn cli_sessions_continue_a_conversation_from_its_cache() {
    let model = tiny(Arch::Gemma3);
    let model = model.to_str().unwrap();
    let daemon = TestDaemon::start(&["--prewarm", "1"]);
    let data = paraphym_tests::TempDir::new("data");
    let data_dir = data.path().to_str().unwrap();
    let run = |prompt: &str, extra: &[&str]| {
        let args = [
            &["run", "--model", model, "--session", "work", "--json"][..],
            &["--max-tokens", "6", "--seed", "3"],
            extra,
            &[prompt],
        ]
        .concat();
        let out =
            paraphym_tests::cli_env(&daemon.socket, &args, None, &[("XDG_DATA_HOME", data_dir)]);
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let done: serde_json::Value = stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "done")
            .unwrap_or_else(|| panic!("no done event in {stdout}"));
        done
    };
    let file = data.path().join("paraphym/sessions/work.json");
    let saved =
        || -> serde_json::Value { serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap() };
    let first = run("Name a colour.", &["--system", "Answer in one word."]);
    assert_eq!(saved()["messages"].as_array().unwrap().len(), 2);
    let second = run("And another one?", &[]);
    let s = saved();
    let messages = s["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4);
    assert_eq!(messages[2]["content"], "And another one?");
    assert_eq!(s["settings"]["system"], "Answer in one word.");
    assert!(
        second["prompt_tokens"].as_u64() > first["prompt_tokens"].as_u64(),
        "{first} {second}"
    );
    // The first turn came from the cache (all but the reply's seam).
    assert!(
        second["cached_tokens"].as_u64().unwrap() + 4 >= first["prompt_tokens"].as_u64().unwrap(),
        "{first} {second}"
    );
    let again = run("Name a colour.", &["--reset"]);
    assert_eq!(saved()["messages"].as_array().unwrap().len(), 2);
    assert!(again["prompt_tokens"].as_u64() < second["prompt_tokens"].as_u64());
    let ps = daemon.cli(&["ps"]);
    let ps = String::from_utf8(ps.stdout).unwrap();
    assert!(ps.contains("conversation caches: "), "{ps}");
    let bad = paraphym_tests::cli(
        &daemon.socket,
        &["run", "--model", model, "--session", "../x", "hi"],
        None,
    );
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
}
