//! Tiny synthetic models of every architecture, with real vocabularies, checked
//! against an independent numpy forward pass (scripts/ref_forward.py) and for
//! chunking consistency; byte-level BPE tokenizers checked against the real
//! tokenizer.json files.

use std::path::{Path, PathBuf};

use candle_core::Device;
use paraphym_daemon::engine::gguf::GgufFile;
use paraphym_daemon::engine::{models, LogitsFor, Tokenizer, Weights};
use paraphym_daemon::synth::{self, Arch, Size};

use crate::tokenizer::CORPUS;
use crate::util;

const ARCHS: [Arch; 4] = [Arch::Qwen3, Arch::Llama, Arch::Gemma3, Arch::Phi3];

/// The tiny model of `arch`, written once per test run (seed 7) under Cargo's
/// target tmp dir: a static never drops, so a temp dir here would leak.
pub fn tiny(arch: Arch) -> PathBuf {
    static WRITTEN: std::sync::Mutex<Vec<Arch>> = std::sync::Mutex::new(Vec::new());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("synthetic");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("tiny-{}.gguf", arch.name()));
    let mut written = WRITTEN.lock().unwrap_or_else(|e| e.into_inner());
    if !written.contains(&arch) {
        let tok = util::reference_tokenizer(arch.tokenizer_family(Size::Tiny));
        let vocab = synth::Vocabulary::from_tokenizer_json(&tok, arch).unwrap();
        synth::write(arch, Size::Tiny, &vocab, 7, &path).unwrap();
        written.push(arch);
    }
    path
}

/// The first `n` tokens of the GPL text in the vocabulary of the model at `path`.
pub fn gpl_tokens(path: &Path, n: usize) -> Vec<u32> {
    let gguf = GgufFile::open(path).unwrap();
    let mut tokens = Tokenizer::from_gguf(&gguf)
        .unwrap()
        .encode(&util::gpl3(), true)
        .unwrap();
    assert!(tokens.len() >= n, "the GPL is {} tokens", tokens.len());
    tokens.truncate(n);
    tokens
}

fn load(path: &Path, context: usize, weights: Weights) -> models::Model {
    let g = GgufFile::open(path).unwrap();
    models::load(&g, context, weights, &Device::Cpu).unwrap()
}

/// Logits of every position from the reference implementation, run for a
/// context of `context` positions (Phi-3's LongRoPE factors depend on it).
fn reference(path: &Path, tokens: &[u32], context: usize) -> Vec<Vec<f32>> {
    let out = path.with_extension(format!("ref-{}-{context}.f32", tokens.len()));
    let ids: Vec<String> = tokens.iter().map(u32::to_string).collect();
    let status = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/ref_forward.py"
        ))
        .arg(path)
        .arg(ids.join(","))
        .arg(&out)
        .arg(context.to_string())
        .status()
        .expect("python3 (scripts/test.sh installs numpy and gguf)");
    assert!(status.success(), "ref_forward.py failed");
    let bytes = std::fs::read(&out).unwrap();
    let vals: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    vals.chunks(vals.len() / tokens.len())
        .map(<[f32]>::to_vec)
        .collect()
}

/// Our forward pass against the numpy reference. With the file's weights
/// dequantized to F32 the two must agree to 1e-3 of the largest logit (they
/// agree to ~1e-6): that checks our reading of the file and our math for every
/// architecture. The normal quantized path also rounds activations to 8 bits
/// inside Candle's kernels, as llama.cpp does; it must stay within 5e-2.
#[test]
fn tiny_models_match_the_reference_forward_pass() {
    for arch in ARCHS {
        let path = tiny(arch);
        let gguf = GgufFile::open(&path).unwrap();
        let tok = Tokenizer::from_gguf(&gguf).unwrap();
        let tokens = tok
            .encode(
                "The quick brown fox jumps over the lazy dog. 日本語 😀 1234",
                true,
            )
            .unwrap();
        assert!(tokens.len() > 10);
        // Phi-3 past its original context switches to the long RoPE factors.
        let contexts: &[usize] = if arch == Arch::Phi3 {
            &[512, 4096]
        } else {
            &[512]
        };
        for (&context, (weights, tolerance)) in contexts.iter().flat_map(|c| {
            [(Weights::Dequantized, 1e-3), (Weights::Quantized, 5e-2)].map(|w| (c, w))
        }) {
            let want = reference(&path, &tokens, context);
            let scale = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
            let mut model = load(&path, context, weights);
            let ours = model
                .forward(&tokens, LogitsFor::From(0))
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            assert_eq!(ours.len(), want.len());
            let diff = ours
                .iter()
                .flatten()
                .zip(want.iter().flatten())
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            let rel = diff / scale;
            eprintln!(
                "{} {weights:?} context {context}: max |logit| {scale:.2}, relative diff {rel:.2e}",
                arch.name()
            );
            assert!(
                rel <= tolerance,
                "{} {weights:?} context {context}: relative difference {rel}",
                arch.name()
            );
        }
    }
}

#[test]
fn tiny_models_are_consistent_across_chunking() {
    for arch in ARCHS {
        let path = tiny(arch);
        let tokens = gpl_tokens(&path, 1500);
        let mut model = load(&path, 2048, Weights::Quantized);
        let mut run = |chunks: &[usize]| {
            model.clear_kv();
            let mut at = 0;
            let mut last = None;
            for &c in chunks.iter().cycle() {
                if at == tokens.len() {
                    break;
                }
                let n = c.min(tokens.len() - at);
                last = Some(model.forward(&tokens[at..at + n], LogitsFor::Last).unwrap());
                at += n;
            }
            last.unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let all = run(&[1500]);
        assert!(all == run(&[64]), "{}: 64-token chunks differ", arch.name());
        assert!(
            all == run(&[1499, 1]),
            "{}: decode step differs",
            arch.name()
        );
    }
}

/// A model set to serve a longer context (what the daemon does when a
/// request asks for more than a model is loaded with) answers exactly as one
/// loaded with that context: its cache is kept where the rotation is the same
/// (every architecture but Phi-3 crossing its original context, which
/// switches to the long LongRoPE factors and starts over), positions past the
/// old context work, and an instance that shares the grown tables agrees.
#[test]
fn a_model_set_to_a_longer_context_answers_as_one_loaded_with_it() {
    for arch in ARCHS {
        let path = tiny(arch);
        let tokens = gpl_tokens(&path, 300);
        let logits = |m: &mut models::Model, t: &[u32]| {
            m.forward(t, LogitsFor::Last)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let mut loaded = load(&path, 2048, Weights::Quantized);
        logits(&mut loaded, &tokens[..200]);
        let want = logits(&mut loaded, &tokens[200..]);

        let mut grown = load(&path, 256, Weights::Quantized);
        assert_eq!(grown.context(), 256);
        logits(&mut grown, &tokens[..200]);
        let dropped = grown.set_context(2048).unwrap();
        assert_eq!(grown.context(), 2048);
        // The tiny Phi-3 was trained on 1,024 positions: 2,048 are long.
        assert_eq!(dropped, arch == Arch::Phi3, "{}", arch.name());
        assert_eq!(grown.kv_len(), if dropped { 0 } else { 200 });
        if dropped {
            logits(&mut grown, &tokens[..200]);
        }
        // 200..300 runs past the 256 positions it was loaded with.
        let got = logits(&mut grown, &tokens[200..]);
        assert!(got == want, "{}: grown differs from loaded", arch.name());

        let mut sharing = load(&path, 256, Weights::Quantized);
        sharing.share_context(&grown);
        assert_eq!(sharing.context(), 2048);
        logits(&mut sharing, &tokens[..200]);
        let got = logits(&mut sharing, &tokens[200..]);
        assert!(got == want, "{}: sharing differs from loaded", arch.name());
        // Asking for more than the model was trained for serves its maximum.
        grown.set_context(usize::MAX).unwrap();
        assert_eq!(grown.context(), 4096);
    }
}

#[test]
fn byte_level_bpe_from_metadata_matches_tokenizer_json() {
    let gpl = util::gpl3();
    // Phi-4-mini's o200k vocabulary needs a file of its own (metadata only).
    let dir = util::TempDir::new("o200k");
    let o200k = dir.0.join("o200k.gguf");
    let vocab =
        synth::Vocabulary::from_tokenizer_json(&util::reference_tokenizer("gpt4o"), Arch::Phi3)
            .unwrap();
    assert_eq!(vocab.size, 200_064);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&o200k).unwrap());
    paraphym_daemon::engine::gguf::write(&mut f, &vocab.metadata, &[]).unwrap();
    drop(f);
    let files = [
        (tiny(Arch::Qwen3), "qwen3"),
        (tiny(Arch::Llama), "llama3"),
        (tiny(Arch::Phi3), "gpt35turbo"),
        (o200k, "gpt4o"),
    ];
    for (path, family) in files {
        let gguf = GgufFile::open(&path).unwrap();
        let ours = Tokenizer::from_gguf(&gguf).unwrap();
        let reference =
            tokenizers::Tokenizer::from_file(util::reference_tokenizer(family)).unwrap();
        util::assert_same_ids(&ours, &reference, &gpl, family);
        for para in gpl.split("\n\n") {
            util::assert_same_ids(&ours, &reference, para, family);
        }
        for text in CORPUS {
            util::assert_same_ids(&ours, &reference, text, family);
        }
        let text = "Hello, world! 日本語 😀";
        assert_eq!(
            ours.decode(&ours.encode(text, false).unwrap()).unwrap(),
            text
        );
    }
}

#[test]
fn synthesis_is_deterministic_from_the_seed() {
    let dir = util::TempDir::new("synth-seed");
    let tok = util::reference_tokenizer("llama3");
    let vocab = synth::Vocabulary::from_tokenizer_json(&tok, Arch::Llama).unwrap();
    let write = |name: &str, seed| {
        let p = dir.0.join(name);
        synth::write(Arch::Llama, Size::Tiny, &vocab, seed, &p).unwrap();
        std::fs::read(p).unwrap()
    };
    let (a, b, c) = (write("a.gguf", 3), write("b.gguf", 3), write("c.gguf", 4));
    assert!(a == b, "same seed, same bytes");
    assert!(a != c, "another seed, other weights");
    assert_eq!(a.len(), c.len());
    // And the file is a model our loader accepts, with the real vocabulary.
    let g = GgufFile::open(&dir.0.join("a.gguf")).unwrap();
    assert_eq!(models::spec(&g, 512).unwrap().vocab, 128_256);
}

/// Engines sharing a turn lock (workers on one GPU, `paraphymd --gpu-turns`)
/// answer as an engine alone does, three at once, in both modes, and no turn
/// is left held afterwards. (On the CPU the daemon never takes turns; the
/// lock's logic is the same on any device.)
#[test]
fn engines_taking_turns_answer_as_alone_and_let_go_of_the_turn() {
    use paraphym_daemon::engine::{Engine, GenParams, LoadOptions, Prompt, SamplingParams, Turns};
    use std::sync::atomic::AtomicBool;

    let path = tiny(Arch::Qwen3);
    let params = GenParams {
        sampling: SamplingParams::greedy(),
        max_tokens: 24,
        ignore_eos: true,
        prefill_chunk: 3,
        ..GenParams::default()
    };
    let run = |e: &mut Engine, prompt: &str| {
        e.generate(
            Prompt::Text(prompt),
            &params,
            &AtomicBool::new(false),
            |_| {},
        )
        .unwrap()
        .tokens
    };
    let opts = |turns: Option<Turns>| LoadOptions {
        context: Some(256),
        turns,
        ..LoadOptions::default()
    };
    let prompts = ["one two three four", "the quick brown fox", "hello"];
    let mut alone = Engine::load(&path, &opts(None)).unwrap();
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| run(&mut alone, p)).collect();
    for whole_step in [false, true] {
        let turns = Turns::new(whole_step);
        let first = Engine::load(&path, &opts(Some(turns.clone()))).unwrap();
        let mut workers = [first.replica(), first.replica(), first];
        let got: Vec<Vec<u32>> = std::thread::scope(|s| {
            let handles: Vec<_> = workers
                .iter_mut()
                .zip(prompts)
                .map(|(e, p)| s.spawn(move || run(e, p)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(got, want, "whole_step {whole_step}");
        assert!(turns.lock.try_lock().is_ok(), "a turn is still held");
    }
}
