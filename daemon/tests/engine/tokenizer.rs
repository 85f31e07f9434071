//! Our GGUF-metadata tokenizer against the real Gemma 3 tokenizer.json.

use paraphym_daemon::engine::gguf::GgufFile;
use paraphym_daemon::engine::Tokenizer;

use crate::util;

/// Text that exercises what tokenizers get wrong: scripts without spaces,
/// combining marks, emoji sequences, runs of spaces, tabs and newlines, byte
/// fallback, and special-token texts inside ordinary text.
pub const CORPUS: &[&str] = &[
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\t\ttabs\t\t\t\tand\nnewlines\n\n\n\nand\r\nCRLF\r\n",
    "                                  forty spaces then text",
    "日本語のテキストと、中文文本，还有한국어 텍스트도 있습니다。",
    "Русский текст, ελληνικά, עברית, العربية, हिन्दी, ไทย, ქართული",
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🏳️‍🌈 and a lone \u{1F9EA}",
    "Combining: e\u{301} a\u{308} n\u{303}; ligatures: ﬁ ﬂ; zero width: a\u{200B}b",
    "Rare bytes: \u{7}\u{1b}[31mred\u{1b}[0m \u{feff}BOM \u{10FFFF} \u{E000}",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>",
    "<bos>text after bos<eos><pad><unk><mask>[multimodal]<unused0><unused99>",
    "code:\n    fn main() {\n        println!(\"{}\", 1 + 2);\n    }\n",
    "<table><tr><td>html</td></tr></table> <h1>Title</h1> <code>x</code>",
    "numbers 1234567890 3.14159 -42 1e10 0x1F 2026-11-27",
    "mixed▁with▁literal▁markers and ▁▁ double",
    "",
];

fn ours() -> Tokenizer {
    let gguf = GgufFile::open(&util::gemma_path()).unwrap();
    Tokenizer::from_gguf(&gguf).unwrap()
}

fn reference() -> tokenizers::Tokenizer {
    tokenizers::Tokenizer::from_file(util::reference_tokenizer("gemma3")).unwrap()
}

#[test]
fn gemma3_ids_match_tokenizer_json_on_gpl3_and_corpus() {
    let (ours, reference) = (ours(), reference());
    let gpl = util::gpl3();
    // The whole text at once, then paragraph by paragraph (different boundaries).
    util::assert_same_ids(&ours, &reference, &gpl, "gemma3");
    for para in gpl.split("\n\n") {
        util::assert_same_ids(&ours, &reference, para, "gemma3");
    }
    for text in CORPUS {
        util::assert_same_ids(&ours, &reference, text, "gemma3");
    }
    let total: usize = CORPUS
        .iter()
        .map(|t| ours.encode(t, false).unwrap().len())
        .sum();
    assert!(
        total > 200,
        "the corpus should tokenize to real work, got {total}"
    );
}

#[test]
fn gemma3_bos_and_decode_round_trip() {
    let (ours, reference) = (ours(), reference());
    let text = "Paris is the capital of";
    let with_bos = ours.encode(text, true).unwrap();
    assert_eq!(with_bos, reference.encode(text, true).unwrap().get_ids());
    assert_eq!(with_bos[0], 2, "Gemma's <bos>");
    assert_eq!(ours.decode(&with_bos).unwrap(), text);
    for text in CORPUS.iter().filter(|t| !t.contains(['<', '\u{2581}'])) {
        let ids = ours.encode(text, false).unwrap();
        assert_eq!(ours.decode(&ids).unwrap(), *text);
    }
}

#[test]
fn gemma3_end_of_generation_set() {
    let t = ours();
    let eot = t.token_to_id("<end_of_turn>").unwrap();
    assert!(t.is_eog(1), "<eos>");
    assert!(t.is_eog(eot), "<end_of_turn>");
    assert!(!t.is_eog(t.token_to_id("<start_of_turn>").unwrap()));
}

/// A tokenizer.json beside the model file is used instead of the metadata.
#[test]
fn tokenizer_json_beside_the_model_wins() {
    let dir = util::TempDir::new("beside");
    let model = dir.0.join("gemma.gguf");
    std::os::unix::fs::symlink(util::gemma_path(), &model).unwrap();
    std::fs::copy(
        util::reference_tokenizer("gemma3"),
        dir.0.join("tokenizer.json"),
    )
    .unwrap();
    let gguf = GgufFile::open(&model).unwrap();
    let beside = Tokenizer::for_model(&gguf).unwrap();
    // The real file has one more added token than the GGUF vocabulary.
    assert_eq!(beside.vocab_size(), 262_145);
    assert_eq!(ours().vocab_size(), 262_144);
    assert_eq!(beside.token_to_id("<image_soft_token>"), Some(262_144));
    let text = "Paris is the capital of";
    assert_eq!(
        beside.encode(text, true).unwrap(),
        ours().encode(text, true).unwrap()
    );
    assert!(beside.is_eog(beside.token_to_id("<end_of_turn>").unwrap()));
}
