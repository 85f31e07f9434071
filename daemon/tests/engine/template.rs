//! Chat templates against goldens rendered by Python's jinja2 from the real
//! `tokenizer_config.json`s (scripts/make-template-goldens.py), through the
//! template source directly and through the GGUF files that carry it.

use paraphym_daemon::engine::gguf::GgufFile;
use paraphym_daemon::engine::template::{ChatTemplate, TemplateSource};
use paraphym_daemon::engine::{ChatOptions, Message, Prompt};
use paraphym_daemon::synth::Arch;
use serde_json::Value;

use crate::util;

const GOLDENS: &str = include_str!("goldens/chat_templates.json");

struct Case {
    name: String,
    messages: Vec<Message>,
    opts: ChatOptions,
}

fn cases(goldens: &Value) -> Vec<Case> {
    goldens["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_owned(),
            messages: c["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect(),
            opts: ChatOptions {
                add_generation_prompt: c["add_generation_prompt"].as_bool().unwrap(),
                enable_thinking: c["enable_thinking"].as_bool(),
                ..ChatOptions::default()
            },
        })
        .collect()
}

fn check(template: &ChatTemplate, family: &str, goldens: &Value, what: &str) {
    let want = goldens["families"][family]["renders"].as_array().unwrap();
    for (case, want) in cases(goldens).iter().zip(want) {
        let got = template.render(&case.messages, &case.opts).unwrap();
        assert_eq!(
            got,
            want.as_str().unwrap(),
            "{family} ({what}): case `{}`",
            case.name
        );
    }
}

fn config_template(family: &str) -> String {
    let path = util::reference_tokenizer(family).with_file_name("tokenizer_config.json");
    let config: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    config["chat_template"].as_str().unwrap().to_owned()
}

#[test]
fn templates_render_byte_identical_to_jinja2_goldens() {
    let goldens: Value = serde_json::from_str(GOLDENS).unwrap();
    for family in ["qwen3", "llama3", "gemma3"] {
        let f = &goldens["families"][family];
        let (bos, eos) = (
            f["bos_token"].as_str().unwrap(),
            f["eos_token"].as_str().unwrap(),
        );
        let template =
            ChatTemplate::new(&config_template(family), bos, eos, TemplateSource::File).unwrap();
        check(&template, family, &goldens, "tokenizer_config.json");
    }
    // The same templates as synthesis writes them into GGUF files.
    for (arch, family, bos) in [
        (Arch::Qwen3, "qwen3", ""),
        (Arch::Llama, "llama3", "<|begin_of_text|>"),
    ] {
        let gguf = GgufFile::open(&crate::synthetic::tiny(arch)).unwrap();
        let eos = goldens["families"][family]["eos_token"].as_str().unwrap();
        let template = ChatTemplate::from_gguf(&gguf, bos, eos, |_| false).unwrap();
        assert_eq!(template.source(), TemplateSource::File);
        check(&template, family, &goldens, "GGUF");
    }
}

#[test]
fn gemma_chat_prompt_is_tokenized_with_one_bos_and_special_tokens() {
    let engine = util::gemma();
    let messages = [Message::new("user", "What is the capital of France?")];
    let ids = engine
        .encode_chat(&messages, &ChatOptions::default())
        .unwrap();
    let tok = engine.tokenizer();
    let bos = tok.bos().unwrap();
    assert_eq!(ids[0], bos);
    assert_eq!(ids.iter().filter(|&&i| i == bos).count(), 1, "{ids:?}");
    let start = tok.token_to_id("<start_of_turn>").unwrap();
    assert_eq!(ids[1], start, "the turn marker is one special token");
    // The file's own template agrees with the golden.
    let goldens: Value = serde_json::from_str(GOLDENS).unwrap();
    assert_eq!(
        engine
            .chat_template()
            .render(&messages, &ChatOptions::default())
            .unwrap(),
        goldens["families"]["gemma3"]["renders"][0]
            .as_str()
            .unwrap()
    );
    drop(engine);
}

/// The test file is the base model, so this checks the wiring, not the answer:
/// `Prompt::Chat` generates exactly what its rendered, tokenized prompt does.
#[test]
fn chat_prompts_generate_from_the_rendered_tokens() {
    use paraphym_daemon::engine::{GenParams, SamplingParams};
    let mut engine = util::gemma();
    let messages = [
        Message::new("system", "Answer in one word."),
        Message::new("user", "What is the capital of France?"),
    ];
    let params = GenParams {
        max_tokens: 8,
        sampling: SamplingParams::greedy(),
        ..Default::default()
    };
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let ids = engine
        .encode_chat(&messages, &ChatOptions::default())
        .unwrap();
    let chat = engine
        .generate(
            Prompt::Chat(&messages, &ChatOptions::default()),
            &params,
            &cancel,
            |_| {},
        )
        .unwrap();
    let tokens = engine
        .generate(Prompt::Tokens(&ids), &params, &cancel, |_| {})
        .unwrap();
    assert_eq!(chat.prompt_tokens, ids.len());
    assert_eq!(chat.tokens, tokens.tokens);
    assert_eq!(chat.tokens.len(), 8);
}

#[test]
fn qwen3_renders_tools_calls_and_answers_as_jinja2_does() {
    let goldens: Value = serde_json::from_str(GOLDENS).unwrap();
    let f = &goldens["families"]["qwen3"];
    let template = ChatTemplate::new(
        &config_template("qwen3"),
        f["bos_token"].as_str().unwrap(),
        f["eos_token"].as_str().unwrap(),
        TemplateSource::File,
    )
    .unwrap();
    let opts = ChatOptions {
        tools: std::sync::Arc::new(goldens["tools"].as_array().unwrap().clone()),
        ..ChatOptions::default()
    };
    let cases = goldens["tool_cases"].as_array().unwrap();
    let want = f["tool_renders"].as_array().unwrap();
    assert_eq!(cases.len(), want.len());
    for (case, want) in cases.iter().zip(want) {
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let mut msg =
                    Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap());
                if let Some(calls) = m["tool_calls"].as_array() {
                    msg.tool_calls = calls.clone();
                }
                msg
            })
            .collect();
        assert_eq!(
            template.render(&messages, &opts).unwrap(),
            want.as_str().unwrap(),
            "case `{}`",
            case["name"]
        );
    }
    // Gemma 3's template has no tools: offering them is an error, not a
    // prompt that silently leaves them out.
    let gemma = ChatTemplate::new(
        &config_template("gemma3"),
        "<bos>",
        "<eos>",
        TemplateSource::File,
    )
    .unwrap();
    let err = gemma
        .render(&[Message::new("user", "hi")], &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not take tools"), "{err}");
}
