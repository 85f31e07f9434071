//! Conversations find their KV cache on whichever worker is free (issue 9):
//! two conversations alternate on a daemon with two idle workers, and every
//! turn after the first starts from its own previous turn's cache.

use paraphym_daemon::synth::Arch;
use paraphym_protocol::message::GenStats;
use paraphym_tests::{raw_gen, tiny, TestDaemon};

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
