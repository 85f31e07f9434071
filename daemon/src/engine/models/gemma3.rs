//! Gemma 3 (text), as llama.cpp runs it from GGUF.
//!
//! Differences from Candle 0.11's `quantized_gemma3` and why:
//! * the MLP gate uses GELU (tanh approximation), as Gemma 3 is trained; Candle
//!   uses SiLU there (candle#3745), which doubles perplexity;
//! * sliding-window layers mask by the window on every step, decode included,
//!   and a window of `w` shows a query the `w` keys ending at itself;
//! * prefill works in chunks at any position (the mask is built from absolute
//!   positions);
//! * RoPE tables cover the context in use, not 131,072 positions per layer, and
//!   the embedding table stays quantized (rows are dequantized on lookup).
//!
//! Layer `i` is global (full attention, RoPE base `rope.freq_base`, linear RoPE
//! scaling if any) when `(i + 1) % 6 == 0`, local (sliding window, base 10,000)
//! otherwise: llama.cpp's fixed pattern for this architecture.

use candle_core::{Device, Tensor};

use super::common::{
    attention, attention_mask, check_tokens, first_visible_key, key_range, Embedding, KvCache,
    Linear, LogitsFor, Result, RmsNorm, Rope,
};
use crate::engine::error::ModelFileError;
use crate::engine::gguf::GgufFile;

const SLIDING_PATTERN: usize = 6;
const LOCAL_ROPE_BASE: f64 = 10_000.0;

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub eps: f64,
    pub max_context: usize,
    pub rope_base: f64,
    pub rope_scale: f64,
    pub sliding_window: usize,
    pub attn_scale: f64,
}

impl Config {
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch = g.architecture()?.to_owned();
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = g.get_usize(&key("embedding_length"))?;
        let layers = g.get_usize(&key("block_count"))?;
        let heads = g.get_usize(&key("attention.head_count"))?;
        let kv_heads = g.get_usize(&key("attention.head_count_kv"))?;
        let head_dim = match g.get(&key("attention.key_length")) {
            Some(_) => g.get_usize(&key("attention.key_length"))?,
            None => hidden / heads.max(1),
        };
        if g.get(&key("attention.value_length")).is_some() {
            let v = g.get_usize(&key("attention.value_length"))?;
            if v != head_dim {
                return Err(g.error(ModelFileError::Malformed(format!(
                    "value_length {v} differs from key_length {head_dim}"
                ))));
            }
        }
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || head_dim % 2 != 0 {
            return Err(g.error(ModelFileError::Malformed(format!(
                "{heads} heads, {kv_heads} kv heads and head size {head_dim} do not fit together"
            ))));
        }
        let rope_scale = match g.get_str(&key("rope.scaling.type")) {
            Ok("linear") => g.get_f64(&key("rope.scaling.factor")).unwrap_or(1.0),
            _ => 1.0,
        };
        let emb = g
            .tensor_info("token_embd.weight")
            .ok_or_else(|| g.error(ModelFileError::MissingTensor("token_embd.weight".into())))?;
        let vocab = emb.shape[0];
        // Gemma 3 27B was trained with query_pre_attn_scalar = hidden / heads; the
        // other sizes with the head size (llama.cpp makes the same distinction).
        let attn_scale = if layers == 62 {
            1.0 / ((hidden / heads) as f64).sqrt()
        } else {
            1.0 / (head_dim as f64).sqrt()
        };
        Ok(Self {
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            ffn: g.get_usize(&key("feed_forward_length"))?,
            vocab,
            eps: g.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            max_context: g.get_usize(&key("context_length"))?,
            rope_base: g.get_f64(&key("rope.freq_base")).unwrap_or(1_000_000.0),
            rope_scale,
            sliding_window: g.get_usize(&key("attention.sliding_window"))?,
            attn_scale,
        })
    }

    pub fn is_sliding(&self, layer: usize) -> bool {
        (layer + 1) % SLIDING_PATTERN != 0
    }
}

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    o: Linear,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ffn_norm: RmsNorm,
    window: Option<usize>,
    cache: KvCache,
}

#[derive(Debug, Clone)]
pub struct Model {
    cfg: Config,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Linear,
    rope_global: Rope,
    rope_local: Rope,
    context: usize,
    device: Device,
}

impl Model {
    /// Load the weights; `context` is the number of positions this instance will
    /// serve (RoPE tables are built for exactly that many).
    pub fn load(g: &GgufFile, context: usize, dev: &Device) -> Result<Self> {
        let cfg = Config::from_gguf(g)?;
        let context = context.min(cfg.max_context).max(1);
        let (h, hd) = (cfg.hidden, cfg.head_dim);
        let (q_dim, kv_dim) = (cfg.heads * hd, cfg.kv_heads * hd);
        let embed = Embedding::load(g, "token_embd.weight", cfg.vocab, h, dev)?;
        let output = match g.tensor_info("output.weight") {
            Some(_) => Linear::load(g, "output.weight", [cfg.vocab, h], dev)?,
            None => Linear::from_arc(embed.table())?,
        };
        let norm = |name: &str, dim: usize| RmsNorm::load(g, name, dim, cfg.eps, dev);
        let linear = |name: &str, shape: [usize; 2]| Linear::load(g, name, shape, dev);
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                attn_norm: norm(&p("attn_norm"), h)?,
                q: linear(&p("attn_q"), [q_dim, h])?,
                k: linear(&p("attn_k"), [kv_dim, h])?,
                v: linear(&p("attn_v"), [kv_dim, h])?,
                q_norm: norm(&p("attn_q_norm"), hd)?,
                k_norm: norm(&p("attn_k_norm"), hd)?,
                o: linear(&p("attn_output"), [h, q_dim])?,
                post_attn_norm: norm(&p("post_attention_norm"), h)?,
                ffn_norm: norm(&p("ffn_norm"), h)?,
                gate: linear(&p("ffn_gate"), [cfg.ffn, h])?,
                up: linear(&p("ffn_up"), [cfg.ffn, h])?,
                down: linear(&p("ffn_down"), [h, cfg.ffn])?,
                post_ffn_norm: norm(&p("post_ffw_norm"), h)?,
                window: cfg.is_sliding(i).then_some(cfg.sliding_window),
                cache: KvCache::default(),
            });
        }
        Ok(Self {
            embed,
            layers,
            norm: norm("output_norm.weight", h)?,
            output,
            rope_global: Rope::new(hd, cfg.rope_base, cfg.rope_scale, context, dev)?,
            rope_local: Rope::new(hd, LOCAL_ROPE_BASE, 1.0, context, dev)?,
            context,
            device: dev.clone(),
            cfg,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn context(&self) -> usize {
        self.context
    }

    pub fn vocab(&self) -> usize {
        self.cfg.vocab
    }

    /// Positions held in the KV cache.
    pub fn kv_len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.cache.len())
    }

    /// Keep only the first `len` cached positions.
    pub fn truncate_kv(&mut self, len: usize) {
        for l in &mut self.layers {
            l.cache.truncate(len);
        }
    }

    /// Drop the KV cache and its buffers.
    pub fn clear_kv(&mut self) {
        for l in &mut self.layers {
            l.cache.clear();
        }
    }

    /// Run `tokens` at positions `kv_len()..`, append them to the cache, and
    /// return F32 logits (rows, vocab) for the positions `which` asks for.
    pub fn forward(&mut self, tokens: &[u32], which: LogitsFor) -> Result<Tensor> {
        let pos = self.kv_len();
        let out = self.forward_at(pos, tokens, which);
        if out.is_err() {
            // A failure part-way leaves some layers ahead of others.
            self.truncate_kv(pos);
        }
        out
    }

    fn forward_at(&mut self, pos: usize, tokens: &[u32], which: LogitsFor) -> Result<Tensor> {
        let seq = tokens.len();
        check_tokens(tokens, self.cfg.vocab)?;
        if seq == 0 || pos + seq > self.context {
            return Err(crate::engine::error::EngineError::PromptTooLong {
                tokens: pos + seq,
                context: self.context,
            });
        }
        let dev = &self.device;
        let cfg = &self.cfg;
        let mut x = (self.embed.forward(tokens, dev)? * (cfg.hidden as f64).sqrt())?;

        // One mask per attention kind per call, shared by the layers of that kind.
        let (local_start, kv_end) =
            key_range(first_visible_key(pos, Some(cfg.sliding_window)), pos + seq);
        let mask_global = attention_mask(pos, seq, 0, kv_end, None, dev)?;
        let mask_local =
            attention_mask(pos, seq, local_start, kv_end, Some(cfg.sliding_window), dev)?;

        for layer in &mut self.layers {
            let (rope, mask, k_start) = match layer.window {
                Some(_) => (&self.rope_local, mask_local.as_ref(), local_start),
                None => (&self.rope_global, mask_global.as_ref(), 0),
            };
            let residual = &x;
            let h = layer.attn_norm.forward(&x)?;
            let q = layer
                .q
                .forward(&h)?
                .reshape((1, seq, cfg.heads, cfg.head_dim))?;
            let k = layer
                .k
                .forward(&h)?
                .reshape((1, seq, cfg.kv_heads, cfg.head_dim))?;
            let v = layer
                .v
                .forward(&h)?
                .reshape((1, seq, cfg.kv_heads, cfg.head_dim))?;
            let q = rope.apply(&layer.q_norm.forward(&q)?, pos)?;
            let k = rope.apply(&layer.k_norm.forward(&k)?, pos)?;
            let q = (q.transpose(1, 2)? * cfg.attn_scale)?;
            let (k, v) =
                layer
                    .cache
                    .append(&k.transpose(1, 2)?, &v.transpose(1, 2)?, k_start, kv_end)?;
            let a = attention(&q, &k, &v, mask, k_start)?;
            let a = layer.post_attn_norm.forward(&layer.o.forward(&a)?)?;
            let x1 = (a + residual)?;

            let h = layer.ffn_norm.forward(&x1)?;
            let g = layer.gate.forward(&h)?.gelu()?;
            let m = layer.down.forward(&(g * layer.up.forward(&h)?)?)?;
            x = (layer.post_ffn_norm.forward(&m)? + x1)?;
        }
        let x = which.select(&x)?;
        let x = self.norm.forward(&x)?;
        Ok(self.output.forward(&x)?)
    }
}
