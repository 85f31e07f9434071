//! Batched forward passes (issue 11): several sequences at different
//! positions in one pass (`Model::forward_batch`) give what each gives alone.
//! Synthetic models of every architecture: logits within 1e-3 of the largest
//! (f32 activations; bitwise but for the output projection's one-row kernel)
//! while sequences join with a prefill chunk, decode together and leave. The
//! Gemma file: greedy tokens identical for 5 prompts × 64 tokens, sequences
//! of different lengths joining and leaving mid-flight, one cancelled.

use std::collections::BTreeMap;

use candle_core::Device;
use paraphym_daemon::engine::gguf::GgufFile;
use paraphym_daemon::engine::sampling::argmax;
use paraphym_daemon::engine::{models, LogitsFor, Tokenizer, Weights};
use paraphym_daemon::synth::Arch;

use crate::synthetic::{gpl_tokens, tiny};
use crate::util;

const ARCHS: [Arch; 4] = [Arch::Qwen3, Arch::Llama, Arch::Gemma3, Arch::Phi3];

fn row(t: &candle_core::Tensor, i: usize) -> Vec<f32> {
    t.get(i).unwrap().to_vec1::<f32>().unwrap()
}

/// Greedy decoding of `prompt` alone: the logits of every step.
fn alone(model: &models::Model, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let mut m = model.clone();
    m.clear_kv();
    let mut out = vec![row(&m.forward(prompt, LogitsFor::Last).unwrap(), 0)];
    for _ in 1..steps {
        let next = argmax(out.last().unwrap());
        out.push(row(&m.forward(&[next], LogitsFor::Last).unwrap(), 0));
    }
    out
}

/// A scripted batch: `joins[step]` are the sequences that start (with their
/// whole prompt as one chunk) in that pass, next to the others' decode
/// steps; a sequence leaves after `steps` logits or at `cancel`.
struct Script<'a> {
    prompts: &'a [Vec<u32>],
    joins: BTreeMap<usize, Vec<usize>>,
    steps: usize,
    cancel: Option<(usize, usize)>,
}

/// Run the script; the logits each sequence got, in order.
fn batched(model: &models::Model, script: &Script<'_>) -> Vec<Vec<Vec<f32>>> {
    let n = script.prompts.len();
    let mut engines: Vec<models::Model> = (0..n)
        .map(|_| {
            let mut m = model.clone();
            m.clear_kv();
            m
        })
        .collect();
    let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); n];
    let mut active: Vec<usize> = Vec::new();
    let mut pass = 0;
    loop {
        for &j in script.joins.get(&pass).into_iter().flatten() {
            active.push(j);
        }
        // In index order, as the engines are taken below.
        active.sort_unstable();
        if active.is_empty() && script.joins.keys().all(|&k| k < pass) {
            break;
        }
        if !active.is_empty() {
            let runs: Vec<Vec<u32>> = active
                .iter()
                .map(|&i| match got[i].last() {
                    None => script.prompts[i].clone(),
                    Some(l) => vec![argmax(l)],
                })
                .collect();
            let runs: Vec<&[u32]> = runs.iter().map(Vec::as_slice).collect();
            let mut refs: Vec<&mut models::Model> = engines
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| active.contains(i))
                .map(|(_, m)| m)
                .collect();
            let logits = models::Model::forward_batch(&mut refs, &runs).unwrap();
            for (r, &i) in active.iter().enumerate() {
                got[i].push(row(&logits, r));
            }
        }
        active.retain(|&i| {
            let cancelled = script
                .cancel
                .is_some_and(|(c, at)| c == i && got[i].len() >= at);
            got[i].len() < script.steps && !cancelled
        });
        pass += 1;
    }
    got
}

#[test]
fn batched_sequences_match_each_alone_on_every_architecture() {
    for arch in ARCHS {
        // Three start together (prefills sharing a pass), one joins while
        // the others decode.
        batched_matches_alone(arch, &[(0, 37), (100, 5), (300, 120), (50, 60)], false);
    }
}

/// The tensor-op attention a GPU runs: three new prompts of one length
/// share a pass, whose attention runs as one batch
/// (`decoder::attend_fresh`); each sequence's logits are its own alone
/// (bit-equal but for Phi-3's last ulp, as before the batched attention).
#[test]
fn fresh_prompts_of_one_length_attend_together_as_each_alone() {
    for arch in ARCHS {
        batched_matches_alone(arch, &[(0, 37), (100, 37), (300, 37), (50, 60)], true);
    }
}

fn batched_matches_alone(arch: Arch, spans: &[(usize, usize)], tensor: bool) {
    let path = tiny(arch);
    let all = gpl_tokens(&path, 420);
    let gguf = GgufFile::open(&path).unwrap();
    let mut model = models::load(&gguf, 1024, Weights::Quantized, &Device::Cpu).unwrap();
    if tensor {
        model.use_tensor_attention();
    }
    let prompts: Vec<Vec<u32>> = spans
        .iter()
        .map(|&(from, len)| all[from..from + len].to_vec())
        .collect();
    let steps = 12;
    let script = Script {
        prompts: &prompts,
        joins: BTreeMap::from([(0, vec![0, 1, 2]), (5, vec![3])]),
        steps,
        cancel: Some((1, 4)),
    };
    let got = batched(&model, &script);
    for (i, p) in prompts.iter().enumerate() {
        let want = alone(&model, p, steps);
        let expected = if i == 1 { 4 } else { steps };
        assert_eq!(got[i].len(), expected, "{} sequence {i}", arch.name());
        let scale = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        for (step, (a, b)) in got[i].iter().zip(&want).enumerate() {
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= 1e-3 * scale,
                "{} sequence {i} step {step}: {diff} of {scale}",
                arch.name()
            );
            assert_eq!(
                argmax(a),
                argmax(b),
                "{} sequence {i} step {step}",
                arch.name()
            );
        }
    }
}

#[test]
fn batched_greedy_tokens_are_those_of_each_prompt_alone_on_the_gemma_file() {
    let gguf = GgufFile::open(&util::gemma_path()).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    let model = models::load(&gguf, 1024, Weights::Quantized, &Device::Cpu).unwrap();
    let texts = [
        "The capital of France is",
        "Write a haiku about the sea.\n",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
        "Once upon a time, in a small village at the edge of a great forest, there lived",
        "Q: What is 12 times 7?\nA:",
    ];
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t, true).unwrap()).collect();
    let steps = 64;
    let script = Script {
        prompts: &prompts,
        joins: BTreeMap::from([(0, vec![0, 1]), (3, vec![2]), (20, vec![3]), (40, vec![4])]),
        steps,
        // The third is cancelled mid-batch.
        cancel: Some((2, 30)),
    };
    let got = batched(&model, &script);
    for (i, p) in prompts.iter().enumerate() {
        let want: Vec<u32> = alone(&model, p, steps).iter().map(|l| argmax(l)).collect();
        let tokens: Vec<u32> = got[i].iter().map(|l| argmax(l)).collect();
        let n = tokens.len();
        assert_eq!(n, if i == 2 { 30 } else { steps }, "prompt {i}");
        assert_eq!(
            tokens,
            want[..n],
            "prompt {i}: {:?} / {:?}",
            tok.decode(&tokens).unwrap(),
            tok.decode(&want[..n]).unwrap()
        );
    }
}

/// The engine's steps driven as a batching worker drives them (one
/// `step_batch` pass for all: the newcomer's prompt chunk beside the others'
/// tokens, each joining a pass later than the one before and leaving when it
/// ends) give what `Engine::generate` gives alone: the same text, tokens and
/// finish reasons, with a stop string, a token limit and end of generation
/// among them.
#[test]
fn engines_stepped_together_generate_what_each_generates_alone() {
    use paraphym_daemon::engine::{
        step_batch, Decoding, Engine, Feed, GenEvent, Generation, Prompt, Step,
    };
    use std::sync::atomic::AtomicBool;

    let proto = util::gemma().replica();
    let never = AtomicBool::new(false);
    let cases = three_generations(&proto);
    let want: Vec<(String, Generation)> = cases
        .iter()
        .map(|(p, params)| {
            let mut e = proto.replica();
            let mut text = String::new();
            let g = e
                .generate(Prompt::Tokens(p), params, &never, |ev| {
                    if let GenEvent::Text(t) = ev {
                        text.push_str(t);
                    }
                })
                .unwrap();
            (text, g)
        })
        .collect();

    let mut engines: Vec<Engine> = cases.iter().map(|_| proto.replica()).collect();
    let mut texts = vec![String::new(); cases.len()];
    let mut got: Vec<Option<Generation>> = vec![None; cases.len()];
    // (case, its generation, what it runs in the next pass)
    let mut live: Vec<(usize, Decoding, Feed)> = Vec::new();
    let mut joined = 0;
    let mut prefilled = vec![0; cases.len()];
    while joined < cases.len() || !live.is_empty() {
        join_next(&mut engines, &cases, &mut joined, &mut live);
        let idx: Vec<usize> = live.iter().map(|(i, _, _)| *i).collect();
        {
            let mut mine: Vec<&mut Engine> = engines
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| idx.contains(i))
                .map(|(_, e)| e)
                .collect();
            let mut batch: Vec<(&mut Engine, &mut Decoding, Feed)> = mine
                .iter_mut()
                .zip(live.iter_mut())
                .map(|(e, (_, d, feed))| (&mut **e, d, *feed))
                .collect();
            step_batch(&mut batch).unwrap();
        }
        let mut still = Vec::new();
        for (i, mut d, _) in live {
            let e = &mut engines[i];
            if !d.prefilled() {
                prefilled[i] += 1;
                still.push((i, d, Feed::Prompt));
                continue;
            }
            let text = &mut texts[i];
            let mut on = |ev: GenEvent<'_>| {
                if let GenEvent::Text(t) = ev {
                    text.push_str(t);
                }
            };
            match e.choose(&mut d, &never, &mut on).unwrap() {
                Step::Feed(t) => still.push((i, d, Feed::Token(t))),
                Step::Done(f) => got[i] = Some(e.finish(d, f, &mut on).unwrap()),
            }
        }
        live = still;
    }
    // The chat prompt, 4 tokens a chunk, took several passes beside the
    // others' decode steps.
    assert!(prefilled[1] > 3, "{prefilled:?}");
    for (i, (text, g)) in want.iter().enumerate() {
        let b = got[i].as_ref().unwrap();
        assert_eq!(&texts[i], text, "case {i}");
        assert_eq!(b.tokens, g.tokens, "case {i}");
        assert_eq!(b.finish, g.finish, "case {i}");
    }
    // The cases end differently: a token limit, a stop string, the model's end.
    let finishes: Vec<String> = want
        .iter()
        .map(|(_, g)| format!("{:?}", g.finish))
        .collect();
    assert_eq!(
        finishes,
        ["MaxTokens", "StopString(0)", "EndOfGeneration"],
        "{want:?}"
    );
}

/// Three generations that end differently, for the tests that drive the
/// engine's steps as a batching worker does: a token limit on a raw
/// prompt; a stop string on a chat prompt prefilled 4 tokens a chunk;
/// JSON-constrained output with log-probabilities that ends with the value.
/// The next case, if any, begins on its own engine and joins `live` as a
/// prompt (`joined` counts them).
pub fn join_next(
    engines: &mut [paraphym_daemon::engine::Engine],
    cases: &[(Vec<u32>, paraphym_daemon::engine::GenParams)],
    joined: &mut usize,
    live: &mut Vec<(
        usize,
        paraphym_daemon::engine::Decoding,
        paraphym_daemon::engine::Feed,
    )>,
) {
    if let Some((p, params)) = cases.get(*joined) {
        let d = engines[*joined]
            .begin(p.clone(), params, std::time::Instant::now())
            .unwrap();
        live.push((*joined, d, paraphym_daemon::engine::Feed::Prompt));
        *joined += 1;
    }
}

pub fn three_generations(
    proto: &paraphym_daemon::engine::Engine,
) -> Vec<(Vec<u32>, paraphym_daemon::engine::GenParams)> {
    use paraphym_daemon::engine::{json, ChatOptions, GenParams, Message, Prompt, SamplingParams};
    let chat = |text: &str| {
        proto
            .prompt_tokens(Prompt::Chat(
                &[Message::new("user", text)],
                &ChatOptions {
                    add_generation_prompt: true,
                    ..ChatOptions::default()
                },
            ))
            .unwrap()
    };
    let greedy = |max_tokens, stop: &[&str], prefill_chunk| GenParams {
        sampling: SamplingParams::greedy(),
        max_tokens,
        stop: stop.iter().map(|s| s.to_string()).collect(),
        prefill_chunk,
        ..GenParams::default()
    };
    vec![
        (
            proto
                .prompt_tokens(Prompt::Text("The capital of France is"))
                .unwrap(),
            greedy(24, &[], 512),
        ),
        (
            chat("List three colours, one per line."),
            greedy(64, &["\n"], 4),
        ),
        // JSON-constrained, with log-probabilities: it ends with the value.
        (
            chat("Describe a cat as a JSON object."),
            GenParams {
                json: Some(std::sync::Arc::new(
                    json::Shape::from_schema(&serde_json::json!({
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "maxLength": 12},
                            "indoor": {"type": "boolean"}
                        },
                        "required": ["name", "indoor"],
                        "additionalProperties": false
                    }))
                    .unwrap(),
                )),
                logprobs: Some(3),
                ..greedy(200, &[], 512)
            },
        ),
    ]
}
