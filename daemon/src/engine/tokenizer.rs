//! Tokenizers built from a GGUF's `tokenizer.ggml.*` metadata, or from a
//! `tokenizer.json` that sits beside the model file.
//!
//! A GGUF carries the vocabulary, not a `tokenizers` pipeline, so we rebuild the
//! pipeline the way Hugging Face's converters build it from the original model:
//!
//! * `llama` (SentencePiece BPE: Gemma, Llama 2, Mistral): a byte-fallback BPE
//!   whose merges are derived from the piece scores exactly as `transformers`'
//!   `SentencePieceExtractor` derives them (every split of a piece into two
//!   pieces, ordered by the merged piece's score, then by the lengths of the
//!   left and right halves). Control and user-defined pieces become added tokens.
//!   The converter that wrote the GGUF stores user-defined pieces with score
//!   -1000; the SentencePiece model gives them 0, so we use 0 for their merges.
//!
//! The test suite checks the result token for token against the real
//! `tokenizer.json` files.

use rayon::prelude::*;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper};

use super::error::{EngineError, ModelFileError};
use super::gguf::{GgufFile, Value};

/// SentencePiece's word-boundary marker.
const SPM_SPACE: &str = "\u{2581}";

/// llama.cpp's `llama_token_type` values, as stored in `tokenizer.ggml.token_type`.
mod token_type {
    pub const NORMAL: i64 = 1;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
}

/// Texts of control tokens that end a turn in some family's chat format; the
/// generation stops on any of them that the vocabulary has (llama.cpp does the same).
const TURN_TERMINATORS: &[&str] = &[
    "<end_of_turn>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|endoftext|>",
    "<|return|>",
];

/// A model's tokenizer plus the ids the generator needs.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    add_bos: bool,
    eos: Option<u32>,
    /// End-of-generation set: eos plus the family's turn terminators.
    eog: Vec<u32>,
    /// Pieces are spelled in GPT-2's byte alphabet (byte-level BPE).
    byte_level: bool,
    /// Control tokens (decoding leaves them out), sorted.
    special: Vec<u32>,
}

fn is_byte_level(d: Option<&tokenizers::DecoderWrapper>) -> bool {
    use tokenizers::DecoderWrapper as D;
    match d {
        Some(D::ByteLevel(_)) => true,
        Some(D::Sequence(s)) => s
            .get_decoders()
            .iter()
            .any(|d| matches!(d, D::ByteLevel(_))),
        _ => false,
    }
}

/// The byte GPT-2's byte-to-unicode table spells as `c`: printable Latin-1
/// bytes as themselves, the other 68 bytes as U+0100 onwards in order.
fn gpt2_byte(c: char) -> Option<u8> {
    let c = c as u32;
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    if c < 256 {
        return printable(c).then_some(c as u8);
    }
    (0u32..256)
        .filter(|b| !printable(*b))
        .nth((c - 256) as usize)
        .map(|b| b as u8)
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("bos", &self.bos)
            .field("add_bos", &self.add_bos)
            .field("eog", &self.eog)
            .finish()
    }
}

impl Tokenizer {
    /// The tokenizer for a model: `tokenizer.json` beside the file when present,
    /// else one built from the GGUF metadata. Special ids always come from the GGUF.
    pub fn for_model(gguf: &GgufFile) -> Result<Self, EngineError> {
        let beside = gguf.path().with_file_name("tokenizer.json");
        let inner = if beside.is_file() {
            let t = tokenizers::Tokenizer::from_file(&beside)
                .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", beside.display())))?;
            // Added tokens past the embedding table (image placeholders) are
            // harmless; a base vocabulary larger than the table is the wrong file.
            let n = t.get_vocab_size(false);
            let vocab_rows = gguf
                .tensor_info("token_embd.weight")
                .map_or(usize::MAX, |t| t.shape[0]);
            if n > vocab_rows {
                return Err(EngineError::Tokenizer(format!(
                    "{} has {n} tokens but the model has {vocab_rows} embedding rows",
                    beside.display()
                )));
            }
            t
        } else {
            from_gguf(gguf)?
        };
        Self::with_special_ids(inner, gguf)
    }

    /// Build from GGUF metadata alone (ignores any `tokenizer.json`).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, EngineError> {
        Self::with_special_ids(from_gguf(gguf)?, gguf)
    }

    fn with_special_ids(
        inner: tokenizers::Tokenizer,
        gguf: &GgufFile,
    ) -> Result<Self, EngineError> {
        let id = |key: &str| -> Result<Option<u32>, EngineError> {
            match gguf.get(key) {
                None => Ok(None),
                Some(_) => Ok(Some(gguf.get_u64(key)? as u32)),
            }
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let add_bos = match gguf.get("tokenizer.ggml.add_bos_token") {
            Some(_) => gguf.get_bool("tokenizer.ggml.add_bos_token")?,
            // llama.cpp's default for SentencePiece vocabularies.
            None => gguf.get_str("tokenizer.ggml.model").ok() == Some("llama"),
        } && bos.is_some();
        let mut eog: Vec<u32> = Vec::new();
        eog.extend(eos);
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            eog.extend(id(key)?);
        }
        for text in TURN_TERMINATORS {
            if let Some(t) = inner.token_to_id(text) {
                eog.push(t);
            }
        }
        eog.sort_unstable();
        eog.dedup();
        let byte_level = is_byte_level(inner.get_decoder());
        let mut special: Vec<u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        special.sort_unstable();
        Ok(Self {
            inner,
            bos,
            add_bos,
            eos,
            eog,
            byte_level,
            special,
        })
    }

    /// The bytes token `id` stands for: a byte token's byte, a SentencePiece
    /// piece with `▁` as a space, a byte-level BPE piece mapped back through
    /// GPT-2's byte alphabet. Special tokens: their text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        if let Some(hex) = piece
            .strip_prefix("<0x")
            .and_then(|p| p.strip_suffix('>'))
            .filter(|h| h.len() == 2)
        {
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                return vec![b];
            }
        }
        if self.byte_level {
            piece
                .chars()
                .flat_map(|c| match gpt2_byte(c) {
                    Some(b) => vec![b],
                    None => c.to_string().into_bytes(),
                })
                .collect()
        } else {
            piece.replace('\u{2581}', " ").into_bytes()
        }
    }

    /// Token ids for `text`; with `add_bos`, the model's BOS first when its
    /// vocabulary asks for one. Special-token texts in `text` become their ids.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, EngineError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids`, control tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// Whether the model wants BOS at the start of a prompt.
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Tokens that end generation.
    pub fn eog(&self) -> &[u32] {
        &self.eog
    }

    /// A control token: no text of its own.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.binary_search(&id).is_ok()
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// The text of token `id` as the vocabulary spells it (special tokens too).
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

fn bad(msg: impl Into<String>) -> ModelFileError {
    ModelFileError::Tokenizer(msg.into())
}

/// Build the `tokenizers` pipeline from `tokenizer.ggml.*`.
fn from_gguf(gguf: &GgufFile) -> Result<tokenizers::Tokenizer, EngineError> {
    let model = gguf.get_str("tokenizer.ggml.model")?;
    match model {
        "llama" => sentencepiece_bpe(gguf),
        "gpt2" => byte_level_bpe(gguf),
        other => Err(gguf.error(bad(format!(
            "tokenizer model `{other}` is not supported (supported: llama, gpt2)"
        )))),
    }
}

fn strings<'a>(gguf: &'a GgufFile, key: &str) -> Result<Vec<&'a str>, EngineError> {
    gguf.get_array(key)?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| gguf.error(bad(format!("`{key}` holds a non-string"))))
        })
        .collect()
}

/// `tokenizer.ggml.token_type` (all normal when absent).
fn token_types(gguf: &GgufFile, n: usize) -> Result<Vec<i64>, EngineError> {
    match gguf.get("tokenizer.ggml.token_type") {
        None => Ok(vec![token_type::NORMAL; n]),
        Some(_) => gguf
            .get_array("tokenizer.ggml.token_type")?
            .iter()
            .map(|v| match v {
                Value::I32(t) => Some(i64::from(*t)),
                other => other.as_u64().map(|t| t as i64),
            })
            .collect::<Option<_>>()
            .ok_or_else(|| gguf.error(bad("`tokenizer.ggml.token_type` holds a non-integer"))),
    }
}

fn sentencepiece_bpe(gguf: &GgufFile) -> Result<tokenizers::Tokenizer, EngineError> {
    let tokens = strings(gguf, "tokenizer.ggml.tokens")?;
    let n = tokens.len();
    let scores: Vec<f32> = gguf
        .get_array("tokenizer.ggml.scores")?
        .iter()
        .map(|v| v.as_f64().map(|f| f as f32))
        .collect::<Option<_>>()
        .ok_or_else(|| gguf.error(bad("`tokenizer.ggml.scores` holds a non-number")))?;
    let types = token_types(gguf, n)?;
    if scores.len() != n || types.len() != n {
        return Err(gguf.error(bad(format!(
            "{n} tokens but {} scores and {} types",
            scores.len(),
            types.len()
        ))));
    }
    let unk = match gguf.get("tokenizer.ggml.unknown_token_id") {
        Some(_) => Some(gguf.get_usize("tokenizer.ggml.unknown_token_id")?),
        None => None,
    };
    let add_space_prefix = match gguf.get("tokenizer.ggml.add_space_prefix") {
        Some(_) => gguf.get_bool("tokenizer.ggml.add_space_prefix")?,
        None => true, // SentencePiece's default
    };

    // Pieces as the BPE model sees them: SentencePiece text uses U+2581 for spaces,
    // and the GGUF converter wrote user-defined pieces with plain spaces.
    let pieces: Vec<String> = tokens
        .par_iter()
        .map(|t| t.replace(' ', SPM_SPACE))
        .collect();
    let mut vocab = Vocab::with_capacity(n);
    for (id, p) in pieces.iter().enumerate() {
        vocab.entry(p.clone()).or_insert(id as u32);
    }
    let mergeable = |id: u32| {
        matches!(
            types[id as usize],
            token_type::NORMAL | token_type::USER_DEFINED
        )
    };

    // transformers' SentencePieceExtractor: every split of a piece into two pieces
    // is a merge; merges are ordered by the merged piece's score (descending), then
    // by the left and right halves' lengths in characters (descending), then by
    // the merged piece's id and the halves' ids.
    struct Merge {
        score: f32,
        len_l: u32,
        len_r: u32,
        id: u32,
        l: u32,
        r: u32,
    }
    // Two cores or more: this loop does ~2M hash lookups on a 262k vocabulary.
    let mut merges: Vec<Merge> = (0..pieces.len() as u32)
        .into_par_iter()
        .flat_map_iter(|id| {
            let piece = &pieces[id as usize];
            let keep = mergeable(id) && vocab.get(piece) == Some(&id);
            let score = if types[id as usize] == token_type::USER_DEFINED {
                0.0
            } else {
                scores[id as usize]
            };
            let total = piece.chars().count() as u32;
            let vocab = &vocab;
            piece
                .char_indices()
                .enumerate()
                .skip(1)
                .filter(move |_| keep)
                .filter_map(move |(len_l, (split, _))| {
                    let (l, r) = piece.split_at(split);
                    let il = *vocab.get(l)?;
                    let ir = *vocab.get(r)?;
                    (mergeable(il) && mergeable(ir)).then_some(Merge {
                        score,
                        len_l: len_l as u32,
                        len_r: total - len_l as u32,
                        id,
                        l: il,
                        r: ir,
                    })
                })
        })
        .collect();
    merges.par_sort_unstable_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.len_l.cmp(&a.len_l))
            .then(b.len_r.cmp(&a.len_r))
            .then(a.id.cmp(&b.id))
            .then(a.l.cmp(&b.l))
            .then(a.r.cmp(&b.r))
    });
    let merges: Vec<(String, String)> = merges
        .par_iter()
        .map(|m| (pieces[m.l as usize].clone(), pieces[m.r as usize].clone()))
        .collect();

    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        let unk = pieces
            .get(unk)
            .ok_or_else(|| gguf.error(bad(format!("unknown_token_id {unk} is out of range"))))?;
        builder = builder.unk_token(unk.clone());
    }
    let bpe = builder
        .build()
        .map_err(|e| gguf.error(bad(format!("building BPE: {e}"))))?;

    let mut tok = tokenizers::Tokenizer::new(bpe);
    let replace = Replace::new(" ", SPM_SPACE).map_err(|e| gguf.error(bad(e.to_string())))?;
    let normalizer: NormalizerWrapper = if add_space_prefix {
        NormalizerSequence::new(vec![Prepend::new(SPM_SPACE.into()).into(), replace.into()]).into()
    } else {
        replace.into()
    };
    tok.with_normalizer(Some(normalizer))
        .map_err(|e| gguf.error(bad(e.to_string())))?;
    let mut decoders: Vec<DecoderWrapper> = vec![
        DecoderWrapper::Replace(
            Replace::new(SPM_SPACE, " ").map_err(|e| gguf.error(bad(e.to_string())))?,
        ),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(DecoderSequence::new(decoders)));

    let added: Vec<AddedToken> = pieces
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == token_type::CONTROL || t == token_type::USER_DEFINED)
        .map(|(p, &t)| AddedToken::from(p.clone(), t == token_type::CONTROL).normalized(false))
        .collect();
    tok.add_tokens(added)
        .map_err(|e| gguf.error(bad(format!("adding special tokens: {e}"))))?;
    Ok(tok)
}

/// GPT-2-style byte-level pre-tokenizer regexes, by `tokenizer.ggml.pre`.
fn byte_level_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "qwen2" => concat!(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}",
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        ),
        // cl100k's regex: Llama 3 and, as "dbrx", Phi-4.
        "llama-bpe" | "llama3" | "dbrx" => concat!(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        ),
        // o200k (Phi-4-mini).
        "gpt-4o" => concat!(
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
            r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
            r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        ),
        _ => return None,
    })
}

/// Byte-level BPE (`tokenizer.ggml.model = gpt2`: Qwen, Llama 3): the merges are
/// stored; the pre-tokenizer is named by `tokenizer.ggml.pre`.
fn byte_level_bpe(gguf: &GgufFile) -> Result<tokenizers::Tokenizer, EngineError> {
    use tokenizers::normalizers::unicode::NFC;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::SplitDelimiterBehavior;

    let pre = gguf.get_str("tokenizer.ggml.pre").unwrap_or("default");
    let regex = byte_level_regex(pre).ok_or_else(|| {
        gguf.error(bad(format!(
            "pre-tokenizer `{pre}` is not supported (supported: qwen2, llama-bpe, dbrx, gpt-4o)"
        )))
    })?;
    let tokens = strings(gguf, "tokenizer.ggml.tokens")?;
    let types = token_types(gguf, tokens.len())?;
    if types.len() != tokens.len() {
        return Err(gguf.error(bad(format!(
            "{} tokens but {} types",
            tokens.len(),
            types.len()
        ))));
    }
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        vocab.entry((*t).to_owned()).or_insert(id as u32);
    }
    let merges: Vec<(String, String)> = strings(gguf, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| gguf.error(bad(format!("merge `{m}` has no space"))))
        })
        .collect::<Result<_, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        // Llama 3's tokenizer takes whole words that are in the vocabulary as is.
        .ignore_merges(matches!(pre, "llama-bpe" | "llama3"))
        .build()
        .map_err(|e| gguf.error(bad(format!("building BPE: {e}"))))?;

    let mut tok = tokenizers::Tokenizer::new(bpe);
    if pre == "qwen2" {
        tok.with_normalizer(Some(NFC))
            .map_err(|e| gguf.error(bad(e.to_string())))?;
    }
    let split = Split::new(
        SplitPattern::Regex(regex.to_owned()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| gguf.error(bad(format!("pre-tokenizer regex: {e}"))))?;
    tok.with_pre_tokenizer(Some(PreSequence::new(vec![
        split.into(),
        ByteLevel::new(false, false, false).into(),
    ])));
    tok.with_decoder(Some(ByteLevel::new(false, false, false)));
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == token_type::CONTROL || t == token_type::USER_DEFINED)
        .map(|(p, &t)| AddedToken::from(*p, t == token_type::CONTROL).normalized(false))
        .collect();
    tok.add_tokens(added)
        .map_err(|e| gguf.error(bad(format!("adding special tokens: {e}"))))?;
    Ok(tok)
}
