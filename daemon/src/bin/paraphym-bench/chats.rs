//! `chats`: several conversations taking turns on one daemon, as a few
//! terminals (or a TUI with several chats) would. Each turn adds a user
//! message to its conversation and a greedy reply. The same workload runs on
//! two daemons: one keeps conversation caches beyond one per worker (the
//! default), one keeps none (`--conversation-caches 0`: each worker's own
//! engine only, the behaviour before caches outlived their worker). Replies
//! must be identical; time to first token is the daemon's own figure.

use std::path::Path;

use anyhow::{bail, Result};
use paraphym_protocol::message::{ChatMessage, Generate, Options, Prompt};

use crate::via_daemon::{self, Daemon};

/// Words the user messages are cut from.
const WORDS: &str = "the river ran past the old mill while the harbour lights came on one by \
    one and somebody in the village started to count the boats that had not come back yet \
    so the children asked their teachers what the weather would do next week";

fn user_message(chat: usize, turn: usize, words: usize) -> String {
    let pool: Vec<&str> = WORDS.split(' ').filter(|w| !w.is_empty()).collect();
    let body: Vec<&str> = (0..words)
        .map(|i| pool[(i * 7 + chat * 13 + turn * 5) % pool.len()])
        .collect();
    format!("Chat {chat}, message {turn}: {}.", body.join(" "))
}

struct Turn {
    ttft_s: f64,
    prompt: u32,
    cached: u32,
    reply: String,
}

fn workload(
    d: &Daemon,
    model: &Path,
    chats: usize,
    turns: usize,
    words: usize,
    gen: usize,
) -> Result<Vec<Vec<Turn>>> {
    let mut convs: Vec<Vec<ChatMessage>> = vec![Vec::new(); chats];
    let mut out: Vec<Vec<Turn>> = (0..turns).map(|_| Vec::new()).collect();
    for (t, round) in out.iter_mut().enumerate() {
        for (c, conv) in convs.iter_mut().enumerate() {
            conv.push(ChatMessage {
                role: "user".into(),
                content: user_message(c, t, words),
                tool_calls: Vec::new(),
            });
            let request = Generate {
                model: Some(model.display().to_string()),
                prompt: Prompt::Chat {
                    messages: conv.clone(),
                    think: Some(false),
                },
                options: Options {
                    temperature: Some(0.0),
                    max_tokens: Some(gen as u32),
                    ignore_eos: true,
                    ..Options::default()
                },
                keep_alive_ms: None,
                session: Some(format!("chat-{c}")),
            };
            let mut reply = String::new();
            let mut stats = None;
            for piece in d.client.generate(request)? {
                match piece? {
                    paraphym_protocol::client::Piece::Token(text) => reply.push_str(&text),
                    paraphym_protocol::client::Piece::Done(s) => stats = Some(s),
                    paraphym_protocol::client::Piece::Stage(_)
                    | paraphym_protocol::client::Piece::Logprobs(_) => {}
                }
            }
            let Some(stats) = stats else {
                bail!("chat {c}, turn {}: no Done", t + 1)
            };
            conv.push(ChatMessage {
                role: "assistant".into(),
                content: reply.clone(),
                tool_calls: Vec::new(),
            });
            round.push(Turn {
                ttft_s: stats.time_to_first_token_us as f64 / 1e6,
                prompt: stats.prompt_tokens,
                cached: stats.cached_tokens,
                reply,
            });
        }
    }
    Ok(out)
}

pub fn run(
    model: &Path,
    device: &str,
    chats: usize,
    turns: usize,
    words: usize,
    gen: usize,
    workers: usize,
) -> Result<()> {
    let (chats, turns, workers) = (chats.max(1), turns.max(1), workers.max(1));
    // Room for the longest conversation, with a margin for the template.
    let context = turns * (words * 2 + gen + 32) + 64;
    println!("model     {}", model.display());
    println!("device    {device}; {}", crate::cpu_features());
    println!(
        "workload  {chats} conversations round-robin on {workers} workers, {turns} turns each: \
         a {words}-word user message and a {gen}-token greedy reply, one request at a time"
    );
    let mut results = Vec::new();
    for caches in [chats, 0] {
        let flags = [
            "--prewarm",
            &workers.to_string(),
            "--max-workers",
            &workers.to_string(),
            "--conversation-caches",
            &caches.to_string(),
        ]
        .map(String::from);
        let d = Daemon::start_with(device, context, &flags)?;
        d.load(model)?;
        d.wait_idle(workers)?;
        // One untimed request first: the daemon's first request pays for
        // page faults the rest do not.
        via_daemon::observe(&d.client, via_daemon::greedy(model, &[1, 2, 3], 2))?;
        results.push(workload(&d, model, chats, turns, words, gen)?);
    }
    let (kept, none) = (&results[0], &results[1]);
    println!(
        "{:>5} {:>14} {:>18} {:>16} {:>20} {:>17} {:>8}",
        "turn",
        "prompt tokens",
        "TTFT no caches s",
        "cached, none",
        format!("TTFT {chats} caches s"),
        "cached, caches",
        "ratio"
    );
    let mut last = f64::NAN;
    for t in 0..turns {
        let mean =
            |r: &[Turn], f: &dyn Fn(&Turn) -> f64| r.iter().map(f).sum::<f64>() / r.len() as f64;
        for c in 0..chats {
            if kept[t][c].reply != none[t][c].reply {
                bail!("chat {c}, turn {}: the replies differ", t + 1);
            }
        }
        let (a, b) = (&none[t], &kept[t]);
        last = mean(b, &|x| x.ttft_s) / mean(a, &|x| x.ttft_s);
        println!(
            "{:>5} {:>14.0} {:>18.3} {:>16.0} {:>20.3} {:>17.0} {:>8.3}",
            t + 1,
            mean(a, &|x| x.prompt as f64),
            mean(a, &|x| x.ttft_s),
            mean(a, &|x| x.cached as f64),
            mean(b, &|x| x.ttft_s),
            mean(b, &|x| x.cached as f64),
            last
        );
    }
    println!(
        "turn {turns}: mean TTFT with {chats} conversation caches / with none = {last:.3}; \
         replies identical"
    );
    Ok(())
}
