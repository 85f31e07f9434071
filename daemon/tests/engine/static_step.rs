//! The fixed-shape decode step (issue 11: static KV cache, device-side
//! position, the step a CUDA graph replays) against `Model::forward`: on
//! the CPU it runs eagerly, the same operations a graph captures. Synthetic
//! models of every architecture: logits within 1e-3 of the largest, greedy
//! tokens equal, over a prompt and 24 steps (sliding windows and partial
//! rotary included; dequantized weights, see the Gemma test for why). The
//! Gemma file: identical greedy tokens, 3 prompts × 64. The reference is the
//! tensor-op attention a GPU runs (`Model::use_tensor_attention`), fed the
//! prompt token by token as the static step is on the CPU.

use candle_core::Device;
use paraphym_daemon::engine::gguf::GgufFile;
use paraphym_daemon::engine::models::decoder::StaticDecoder;
use paraphym_daemon::engine::sampling::argmax;
use paraphym_daemon::engine::{models, LogitsFor, Weights};
use paraphym_daemon::synth::Arch;

use crate::synthetic::{gpl_tokens, tiny};

fn row(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Greedy decoding through `Model::forward`, and through the static step,
/// from `prompt`: the logits of every step, each way.
fn both(model: &models::Model, prompt: &[u32], steps: usize) -> [Vec<Vec<f32>>; 2] {
    let mut m = model.clone();
    m.use_tensor_attention();
    // Token by token, as the static step runs a prompt on the CPU.
    let mut last = None;
    for &t in prompt {
        last = Some(m.forward(&[t], LogitsFor::Last).unwrap());
    }
    let mut want = vec![row(&last.unwrap())];
    for _ in 1..steps {
        let next = argmax(want.last().unwrap());
        want.push(row(&m.forward(&[next], LogitsFor::Last).unwrap()));
    }
    let mut m = model.clone();
    m.clear_kv();
    let mut fixed = StaticDecoder::new(&m, prompt.len() + steps + 8, 1, true).unwrap();
    let mut got = vec![row(&fixed.start(0, &mut m, prompt).unwrap())];
    for i in 1..steps {
        // The device's greedy token is the one the logits choose.
        assert_eq!(
            fixed.token().unwrap(),
            argmax(got.last().unwrap()),
            "step {i}"
        );
        got.push(row(&fixed.step(&m, 1, None).unwrap()));
    }
    assert_eq!(fixed.len(0), Some(prompt.len() + steps - 1));
    [want, got]
}

#[test]
fn the_static_step_decodes_as_the_model_does_on_every_architecture() {
    for arch in [Arch::Qwen3, Arch::Llama, Arch::Gemma3, Arch::Phi3] {
        let path = tiny(arch);
        let gguf = GgufFile::open(&path).unwrap();
        let model = models::load(&gguf, 256, Weights::Dequantized, &Device::Cpu).unwrap();
        let prompt = gpl_tokens(&path, 40);
        let [want, got] = both(&model, &prompt, 24);
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            let top = w.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = w.iter().zip(g).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                diff <= 1e-3 * top.max(1.0),
                "{}: step {i}: logits differ by {diff} (largest {top})",
                arch.name()
            );
            assert_eq!(argmax(w), argmax(g), "{}: step {i}", arch.name());
        }
    }
}

/// The Gemma file, dequantized: every greedy token the same, 3 prompts × 64.
/// (With its quantized weights Candle rounds each activation row to 8 bits
/// before a quantized matmul, and Gemma's outlier activations let a last-ulp
/// difference in the attention sums — the static step sums over the padded
/// capacity — flip such a rounding: logits then move by up to ~1 and greedy
/// paths part within a few dozen tokens, as they do between any two kernels.
/// Dequantized, that amplifier is gone and the paths agree.)
#[test]
fn static_greedy_tokens_are_the_models_on_the_gemma_file() {
    let path = crate::util::gemma_path();
    let gguf = GgufFile::open(&path).unwrap();
    let model = models::load(&gguf, 512, Weights::Dequantized, &Device::Cpu).unwrap();
    let text = gpl_tokens(&path, 300);
    for (start, len) in [(0, 12), (40, 57), (120, 60)] {
        let prompt = &text[start..start + len];
        let [want, got] = both(&model, prompt, 64);
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            let top = w.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = w.iter().zip(g).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                diff <= 1e-3 * top.max(1.0),
                "prompt at {start}: step {i}: {diff}"
            );
        }
        let tokens = |l: &[Vec<f32>]| l.iter().map(|r| argmax(r)).collect::<Vec<u32>>();
        assert_eq!(
            tokens(&want),
            tokens(&got),
            "prompt at {start}, {len} tokens"
        );
    }
}

/// Sequences in slots of one decoder, joining at different steps and one
/// leaving early, stepped together (one pass for all rows): each row's
/// logits are its sequence's alone, within 1e-3, and the device's greedy
/// tokens are each row's; one sequence crosses 256 positions (the keys a
/// step spans grow). Empty slots stepping on (past the capacity) harm
/// no one: a sequence started afterwards still decodes as it does alone.
#[test]
fn slots_stepped_together_decode_as_each_alone() {
    const STEPS: usize = 14;
    for arch in [Arch::Qwen3, Arch::Gemma3, Arch::Phi3] {
        let path = tiny(arch);
        let gguf = GgufFile::open(&path).unwrap();
        let model = models::load(&gguf, 512, Weights::Dequantized, &Device::Cpu).unwrap();
        let text = gpl_tokens(&path, 300);
        // The last one crosses 256 positions: attention's span grows.
        let prompts = [&text[0..20], &text[30..41], &text[40..290]];
        let capacity = 300;
        let alone: Vec<Vec<Vec<f32>>> = prompts
            .iter()
            .map(|p| {
                let mut m = model.clone();
                m.clear_kv();
                let mut d = StaticDecoder::new(&m, capacity, 1, false).unwrap();
                let mut out = vec![row(&d.start(0, &mut m, p).unwrap())];
                while out.len() < STEPS {
                    out.push(row(&d.step(&m, 1, None).unwrap()));
                }
                out
            })
            .collect();

        let mut m = model.clone();
        m.clear_kv();
        // Two slots at first; the third sequence makes it grow (the others'
        // caches carried over).
        let mut d = StaticDecoder::new(&m, capacity, 2, false).unwrap();
        let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 3];
        // Slot 0 starts, slot 1 joins after 3 steps, slot 2 after 6; slot 1
        // leaves when it has its logits (the others still decoding).
        let joins = [0, 3, 6];
        let vocab = model.spec().vocab;
        for step in 0..(6 + STEPS) {
            for (slot, &at) in joins.iter().enumerate() {
                if step == at {
                    d.grow(&m, slot + 1, capacity).unwrap();
                    got[slot].push(row(&d.start(slot, &mut m, prompts[slot]).unwrap()));
                }
            }
            let running: Vec<usize> = (0..3)
                .filter(|&s| d.len(s).is_some() && got[s].len() < STEPS)
                .collect();
            if running.is_empty() {
                break;
            }
            let n = d.slots();
            let logits = d.step(&m, n, None).unwrap();
            let rows: Vec<Vec<f32>> = (0..n)
                .map(|r| row(&logits.narrow(0, r, 1).unwrap()))
                .collect();
            let chosen = d.tokens(n).unwrap();
            for s in running {
                assert_eq!(rows[s].len(), vocab);
                assert_eq!(chosen[s], argmax(&rows[s]), "slot {s} step {step}");
                got[s].push(rows[s].clone());
                if got[s].len() == STEPS && s == 1 {
                    d.free(1).unwrap();
                }
            }
        }
        for s in 0..3 {
            assert_eq!(got[s].len(), STEPS, "{} slot {s}", arch.name());
            close(&alone[s], &got[s], &format!("{} slot {s}", arch.name()));
        }
        // Every slot empty, stepping past the capacity; then a sequence.
        for s in 0..3 {
            d.free(s).unwrap();
        }
        for _ in 0..capacity + 4 {
            d.step(&m, 3, None).unwrap();
        }
        let mut again = vec![row(&d.start(2, &mut m, prompts[0]).unwrap())];
        while again.len() < STEPS {
            let logits = d.step(&m, 3, None).unwrap();
            again.push(row(&logits.narrow(0, 2, 1).unwrap()));
        }
        close(
            &alone[0],
            &again,
            &format!("{} after the capacity", arch.name()),
        );
    }
}

/// Logits of every step within 1e-3 of the largest, and the same greedy
/// tokens.
fn close(want: &[Vec<f32>], got: &[Vec<f32>], what: &str) {
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        let top = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = w.iter().zip(g).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-3 * top.max(1.0), "{what}: step {i}: {diff}");
        assert_eq!(argmax(w), argmax(g), "{what}: step {i}");
    }
}

/// Generations driven through a fixed decoder's slots (`step_fixed`, what
/// a batching worker on a GPU runs) generate what each generates alone:
/// the Gemma file (dequantized, tensor attention: the GPU's path), a token
/// limit, a stop string with its prompt prefilled 4 tokens a chunk beside
/// the others' steps, and JSON-constrained output with log-probabilities
/// (chosen on the host from each slot's row). Afterwards each engine's
/// cache holds its whole sequence again: a next token on it gives the
/// logits of a full prefill.
#[test]
fn generations_in_fixed_slots_generate_what_each_generates_alone() {
    use paraphym_daemon::engine::{
        step_fixed, Decoding, Engine, Feed, GenEvent, Generation, LoadOptions, Prompt, Step,
    };
    use std::sync::atomic::AtomicBool;

    let mut proto = Engine::load(
        &crate::util::gemma_path(),
        &LoadOptions {
            context: Some(1024),
            weights: Weights::Dequantized,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    proto.model_mut().use_tensor_attention();
    let never = AtomicBool::new(false);
    let cases = crate::batch::three_generations(&proto);
    let collect = |text: &mut String, lps: &mut Vec<f32>, ev: GenEvent<'_>| match ev {
        GenEvent::Text(t) => text.push_str(t),
        GenEvent::Logprobs(l) => lps.push(l.logprob),
        _ => {}
    };
    let want: Vec<(String, Vec<f32>, Generation)> = cases
        .iter()
        .map(|(p, params)| {
            let mut e = proto.replica();
            let (mut text, mut lps) = (String::new(), Vec::new());
            let g = e
                .generate(Prompt::Tokens(p), params, &never, |ev| {
                    collect(&mut text, &mut lps, ev)
                })
                .unwrap();
            (text, lps, g)
        })
        .collect();

    // Eager, and with each step launched ahead of the host's reporting
    // (what a GPU worker does when every row is greedy: the third case's
    // JSON and log-probabilities turn it off while it decodes).
    for ahead in [false, true] {
        let mut fixed = StaticDecoder::new(proto.model(), 1024, 4, false).unwrap();
        let mut engines: Vec<Engine> = cases.iter().map(|_| proto.replica()).collect();
        let mut texts = vec![String::new(); cases.len()];
        let mut lps = vec![Vec::new(); cases.len()];
        let mut got: Vec<Option<Generation>> = vec![None; cases.len()];
        // (case = its slot, its generation, what it runs in the next pass)
        let mut live: Vec<(usize, Decoding, Feed)> = Vec::new();
        let (mut joined, mut prefills, mut waits) = (0, vec![0; cases.len()], 0);
        while joined < cases.len() || !live.is_empty() {
            crate::batch::join_next(&mut engines, &cases, &mut joined, &mut live);
            {
                // `live` is in case order: the engines taken in the same order.
                let idx: Vec<usize> = live.iter().map(|(i, _, _)| *i).collect();
                let mut batch: Vec<(&mut Engine, &mut Decoding, Feed, usize)> = engines
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| idx.contains(i))
                    .zip(live.iter_mut())
                    .map(|((i, e), (_, d, feed))| (e, d, *feed, i))
                    .collect();
                step_fixed(&mut fixed, &mut batch, ahead).unwrap();
            }
            let mut still = Vec::new();
            for (i, mut d, feed) in live {
                let e = &mut engines[i];
                if !d.prefilled() {
                    prefills[i] += 1;
                    still.push((i, d, Feed::Prompt));
                    continue;
                }
                if d.logits.is_none() {
                    // Its token is in the step launched ahead.
                    waits += 1;
                    still.push((i, d, feed));
                    continue;
                }
                let (text, lp) = (&mut texts[i], &mut lps[i]);
                let mut on = |ev: GenEvent<'_>| collect(text, lp, ev);
                match e.choose(&mut d, &never, &mut on).unwrap() {
                    Step::Feed(t) => still.push((i, d, Feed::Token(t))),
                    Step::Done(f) => {
                        e.reclaim(&mut d, &mut fixed, i).unwrap();
                        got[i] = Some(e.finish(d, f, &mut on).unwrap());
                    }
                }
            }
            live = still;
        }
        assert!(prefills[1] > 3, "{prefills:?}");
        // Ahead, a newly decoding row waits a pass for its first step.
        assert_eq!(waits > 0, ahead, "{waits} waits");
        for (i, (text, lp, g)) in want.iter().enumerate() {
            let b = got[i].as_ref().unwrap();
            assert_eq!(&texts[i], text, "case {i}, ahead {ahead}");
            assert_eq!(b.tokens, g.tokens, "case {i}, ahead {ahead}");
            assert_eq!(b.finish, g.finish, "case {i}, ahead {ahead}");
            assert_eq!(lps[i].len(), lp.len(), "case {i}, ahead {ahead}");
            for (a, b) in lps[i].iter().zip(lp) {
                assert!((a - b).abs() < 1e-3, "case {i}: {a} vs {b}");
            }
            assert!(fixed.len(i).is_none(), "slot {i} freed, ahead {ahead}");
        }
        assert_eq!(
            want.iter()
                .map(|(_, _, g)| format!("{:?}", g.finish))
                .collect::<Vec<_>>(),
            ["MaxTokens", "StopString(0)", "EndOfGeneration"]
        );
        // Each engine's cache is its sequence again.
        for (i, e) in engines.iter_mut().enumerate() {
            let history = e.cached_tokens().to_vec();
            assert_eq!(e.model().kv_len(), history.len(), "case {i}");
            let next = row(&e.model_mut().forward(&[42], LogitsFor::Last).unwrap());
            let mut fresh = proto.replica();
            fresh
                .model_mut()
                .forward(&history, LogitsFor::Last)
                .unwrap();
            let want = row(&fresh.model_mut().forward(&[42], LogitsFor::Last).unwrap());
            close(
                &[want],
                &[next],
                &format!("case {i} after the slot, ahead {ahead}"),
            );
        }
    }
}
