//! KV-cache reuse across turns (issue 9): a generation that starts from the
//! longest prefix the cache holds gives what a full prefill gives.

use paraphym_daemon::engine::gguf::GgufFile;
use paraphym_daemon::engine::{
    models, Engine, GenParams, LogitsFor, SamplingParams, Tokenizer, Weights,
};
use paraphym_daemon::synth::Arch;

use crate::synthetic::tiny;
use crate::util;

fn greedy(max_tokens: usize, reuse_cache: bool) -> GenParams {
    GenParams {
        sampling: SamplingParams::greedy(),
        max_tokens,
        ignore_eos: true,
        reuse_cache,
        ..GenParams::default()
    }
}

/// Five conversations of two turns each on one engine that reuses its cache
/// and one that prefills every prompt whole, then an edited turn and a
/// regenerated one: the same 64 greedy tokens every time, and the cache was
/// really used (a conversation's second turn starts after its first, a new
/// conversation after the shared system text, a regeneration after all but
/// the last prompt token).
#[test]
fn conversations_edits_and_regenerations_give_the_same_tokens_with_and_without_reuse() {
    let base = util::gemma();
    let (mut with, mut without, probe) = (base.replica(), base.replica(), base.replica());
    drop(base);
    let tokens = |s: &str| probe.tokenizer().encode(s, true).unwrap().len();
    let system = "You are a careful assistant. Answer in one short paragraph.\n\n";
    let system_tokens = tokens(system);
    let topics = ["rivers", "volcanoes", "the moon", "bread", "bicycles"];
    let turn = |with: &mut Engine, without: &mut Engine, prompt: &str| {
        let (a, ga) = util::complete(with, prompt, &greedy(64, true));
        let (b, gb) = util::complete(without, prompt, &greedy(64, false));
        assert_eq!(ga.tokens, gb.tokens, "prompt {prompt:?}");
        assert_eq!(ga.tokens.len(), 64);
        assert_eq!(gb.reused_tokens, 0);
        assert_eq!(a, b);
        (a, ga.reused_tokens, ga.prompt_tokens)
    };
    let mut last = String::new();
    for (n, topic) in topics.into_iter().enumerate() {
        let first = format!("{system}User: Tell me about {topic}.\nAssistant:");
        let (reply, reused, _) = turn(&mut with, &mut without, &first);
        // After the first conversation, the system text is already cached.
        assert!(
            n == 0 || reused + 1 >= system_tokens,
            "{topic}: reused {reused} of the system's {system_tokens}"
        );
        let second = format!("{first}{reply}\nUser: Why does that matter?\nAssistant:");
        let (_, reused, _) = turn(&mut with, &mut without, &second);
        assert!(
            reused > tokens(&first),
            "{topic}: the second turn reused only {reused}"
        );
        last = second;
    }
    // An edit of the last user message: the cache is cut where they diverge.
    let edited = last.replace("Why does that matter?", "Who discovered that?");
    let (_, reused, _) = turn(&mut with, &mut without, &edited);
    assert!(reused < tokens(&last) - 3 && reused > system_tokens);
    // Regenerate: everything but the last prompt token comes from the cache.
    let (_, reused, prompt) = turn(&mut with, &mut without, &edited);
    assert_eq!(reused, prompt - 1);
}

/// On every architecture's tiny model: logits after reusing a cached prefix
/// (the cache holding another conversation's tail, cut back) are within 1e-3
/// of a full prefill's (on the CPU they are bitwise equal), and the engine's
/// greedy tokens match across turns.
#[test]
fn tiny_models_reuse_a_prefix_within_1e_3() {
    for arch in [Arch::Qwen3, Arch::Llama, Arch::Gemma3, Arch::Phi3] {
        let path = tiny(arch);
        let gguf = GgufFile::open(&path).unwrap();
        let tok = Tokenizer::from_gguf(&gguf).unwrap();
        let ids = tok.encode(&util::gpl3()[..3000], true).unwrap();
        let (shared, tail) = (&ids[..300], &ids[300..340]);
        let other = &ids[400..440];
        let mut model =
            models::load(&gguf, 1024, Weights::Quantized, &candle_core::Device::Cpu).unwrap();
        let last = |t: candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        model.clear_kv();
        let fresh = last(
            model
                .forward(&[shared, tail].concat(), LogitsFor::Last)
                .unwrap(),
        );
        model.clear_kv();
        model
            .forward(&[shared, other].concat(), LogitsFor::Last)
            .unwrap();
        model.truncate_kv(shared.len());
        let reused = last(model.forward(tail, LogitsFor::Last).unwrap());
        let diff = fresh
            .iter()
            .zip(&reused)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-3, "{}: {diff}", arch.name());

        let opts = paraphym_daemon::engine::LoadOptions {
            context: Some(1024),
            ..Default::default()
        };
        let mut with = Engine::load(&path, &opts).unwrap();
        let mut without = with.replica();
        let mut prompt = String::from("Once upon a time");
        for _ in 0..3 {
            let (a, ga) = util::complete(&mut with, &prompt, &greedy(16, true));
            let (_, gb) = util::complete(&mut without, &prompt, &greedy(16, false));
            assert_eq!(ga.tokens, gb.tokens, "{}", arch.name());
            prompt.push_str(&a);
            prompt.push_str(" and then");
        }
        assert!(with.cached_tokens().len() > 16);
    }
}
