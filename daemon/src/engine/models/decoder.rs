//! The decoder-only transformer every supported family is an instance of.
//!
//! An architecture module (`gemma3`, `qwen3`, `llama`) reads its GGUF metadata
//! into a [`Spec`]; this module loads the weights by llama.cpp's tensor names and
//! runs the forward pass. The families differ only in the switches of `Spec`:
//! Q/K norms (Qwen3, Gemma 3), sandwich norms after attention and MLP (Gemma 3),
//! the MLP activation, an embedding scale, RoPE layout and bases, and per-layer
//! sliding windows.

mod static_step;

use std::sync::Arc;

use candle_core::{Device, Tensor};

pub use super::common::RopeSpec;
use super::common::{
    attention, attention_mask, check_tokens, first_visible_key, Embedding, KvCache, Linear,
    LogitsFor, Result, RmsNorm, Rope, RopeStyle, Weights,
};
use super::cpu_attention::{self, CpuKv};
use crate::engine::error::EngineError;
use crate::engine::gguf::GgufFile;
pub use static_step::StaticDecoder;

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
}

/// Everything the forward pass needs to know about an architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub arch: &'static str,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub eps: f64,
    pub max_context: usize,
    pub rope_style: RopeStyle,
    /// Leading dimensions of each head that RoPE rotates (`head_dim`: all).
    pub rot_dim: usize,
    /// RoPE of full-attention layers.
    pub rope: RopeSpec,
    /// RoPE of sliding-window layers, when it differs (Gemma 3).
    pub rope_local: Option<RopeSpec>,
    /// Phi-3's LongRoPE: `rope` depends on the context served.
    pub long_rope: Option<LongRope>,
    /// Sliding window per layer (`None`: full attention).
    pub windows: Vec<Option<usize>>,
    pub qk_norm: bool,
    pub sandwich_norms: bool,
    pub activation: Activation,
    pub embed_scale: Option<f64>,
    pub attn_scale: f64,
}

/// RoPE that depends on the context served (Phi-3's LongRoPE): the short
/// factors up to the original training context, the long ones past it.
#[derive(Debug, Clone, PartialEq)]
pub struct LongRope {
    pub original: usize,
    pub short: RopeSpec,
    pub long: RopeSpec,
}

impl Spec {
    /// The full-attention RoPE for `context` positions.
    pub fn rope_for(&self, context: usize) -> &RopeSpec {
        match &self.long_rope {
            Some(l) if context.min(self.max_context) > l.original => &l.long,
            Some(l) => &l.short,
            None => &self.rope,
        }
    }

    /// The hyper-parameters every family stores under the same `{arch}.*` keys,
    /// with the plain decoder's defaults for the rest (NeoX RoPE, SiLU, no extra
    /// norms, full attention): a family overrides what differs.
    pub fn common(g: &GgufFile, arch: &'static str, default_rope_base: f64) -> Result<Self> {
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = g.get_usize(&key("embedding_length"))?;
        let layers = g.get_usize(&key("block_count"))?;
        let heads = g.get_usize(&key("attention.head_count"))?;
        let head_dim = usize_or(g, &key("attention.key_length"), hidden / heads.max(1))?;
        Ok(Spec {
            arch,
            hidden,
            layers,
            heads,
            kv_heads: usize_or(g, &key("attention.head_count_kv"), heads)?,
            head_dim,
            ffn: g.get_usize(&key("feed_forward_length"))?,
            vocab: vocab_rows(g)?,
            eps: g.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            max_context: g.get_usize(&key("context_length"))?,
            rope_style: RopeStyle::Neox,
            rot_dim: usize_or(g, &key("rope.dimension_count"), head_dim)?,
            rope: RopeSpec {
                scale: linear_rope_scale(g, arch),
                ..RopeSpec::plain(
                    g.get_f64(&key("rope.freq_base"))
                        .unwrap_or(default_rope_base),
                )
            },
            rope_local: None,
            long_rope: None,
            windows: vec![None; layers],
            qk_norm: false,
            sandwich_norms: false,
            activation: Activation::Silu,
            embed_scale: None,
            attn_scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    /// The RoPE tables (full attention, sliding window) for `context` positions.
    fn rope_tables(&self, context: usize, dev: &Device) -> Result<(Rope, Option<Rope>)> {
        let rope = |r: &RopeSpec| Rope::new(self.rot_dim, r, self.rope_style, context, dev);
        Ok((
            rope(&self.rope)?,
            self.rope_local.as_ref().map(rope).transpose()?,
        ))
    }

    /// Consistency checks shared by every family.
    pub fn validate(&self, g: &GgufFile) -> Result<()> {
        let bad = |m: String| Err(g.error(crate::engine::ModelFileError::Malformed(m)));
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "{} heads cannot share {} kv heads",
                self.heads, self.kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head size {} is not even", self.head_dim));
        }
        if self.rot_dim == 0 || !self.rot_dim.is_multiple_of(2) || self.rot_dim > self.head_dim {
            return bad(format!(
                "rotary dimensions {} do not fit a head of {}",
                self.rot_dim, self.head_dim
            ));
        }
        if self.windows.len() != self.layers || self.layers == 0 {
            return bad(format!("{} layers", self.layers));
        }
        if self.windows.iter().flatten().any(|&w| w == 0) {
            return bad("a sliding window of 0".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: RmsNorm,
    qkv: Qkv,
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    o: Linear,
    post_attn_norm: Option<RmsNorm>,
    ffn_norm: RmsNorm,
    /// `None`: `up` holds the gate rows then the up rows (Phi-3's `ffn_up`).
    gate: Option<Linear>,
    up: Linear,
    down: Linear,
    post_ffn_norm: Option<RmsNorm>,
    window: Option<usize>,
}

impl Layer {
    /// The rest of the layer once attention is done: the output projection
    /// (and Gemma's sandwich norm), the residual, then the MLP and its
    /// residual.
    fn finish(&self, s: &Spec, attended: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let mut a = self.o.forward(attended)?;
        if let Some(n) = &self.post_attn_norm {
            a = n.forward(&a)?;
        }
        let x1 = (a + residual)?;
        let h = self.ffn_norm.forward(&x1)?;
        let (g, u) = match &self.gate {
            Some(gate) => (gate.forward(&h)?, self.up.forward(&h)?),
            None => {
                let gu = self.up.forward(&h)?;
                (gu.narrow(2, 0, s.ffn)?, gu.narrow(2, s.ffn, s.ffn)?)
            }
        };
        let g = match s.activation {
            Activation::Silu => candle_nn::ops::silu(&g)?,
            Activation::GeluTanh => g.gelu()?,
        };
        let mut m = self.down.forward(&(g * u)?)?;
        if let Some(n) = &self.post_ffn_norm {
            m = n.forward(&m)?;
        }
        Ok((m + x1)?)
    }
}

/// The Q, K and V projections: one matrix (rows Q then K then V: Phi-3's
/// `attn_qkv`, or the three stacked at load when they share a type), Q and
/// K stacked beside V (Q4_K_M files keep V in Q6_K in some layers), or
/// three. Fewer matrices, fewer kernel launches per token on a GPU.
#[derive(Debug, Clone)]
enum Qkv {
    Split { q: Linear, k: Linear, v: Linear },
    QkV { qk: Linear, v: Linear },
    Fused(Linear),
}

impl Qkv {
    /// Q, K and V of `h` (1, rows, hidden): (1, rows, q_dim) and twice
    /// (1, rows, kv_dim). For one row the column slices stay contiguous.
    fn project(&self, h: &Tensor, q_dim: usize, kv_dim: usize) -> Result<(Tensor, Tensor, Tensor)> {
        self.project_with(|w, _| Ok(w.forward(h)?), q_dim, kv_dim)
    }

    /// `project` with each matrix's product from `mm` (its second argument
    /// counts the matrices: 0, 1, 2), which returns (1 or rows, rows or 1,
    /// width) as `Linear::forward` does.
    fn project_with(
        &self,
        mut mm: impl FnMut(&Linear, usize) -> Result<Tensor>,
        q_dim: usize,
        kv_dim: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        Ok(match self {
            Qkv::Split { q, k, v } => (mm(q, 0)?, mm(k, 1)?, mm(v, 2)?),
            Qkv::QkV { qk, v } => {
                let qk = mm(qk, 0)?;
                (
                    qk.narrow(2, 0, q_dim)?,
                    qk.narrow(2, q_dim, kv_dim)?,
                    mm(v, 1)?,
                )
            }
            Qkv::Fused(qkv) => {
                let qkv = mm(qkv, 0)?;
                (
                    qkv.narrow(2, 0, q_dim)?,
                    qkv.narrow(2, q_dim, kv_dim)?,
                    qkv.narrow(2, q_dim + kv_dim, kv_dim)?,
                )
            }
        })
    }
}

/// Where a layer keeps its keys and values: plain buffers read by the fused CPU
/// kernel, or device tensors for the tensor-op attention.
#[derive(Debug, Clone)]
enum Cache {
    Cpu(CpuKv),
    Tensor(KvCache),
}

impl Cache {
    fn new(dev: &Device) -> Self {
        match dev {
            Device::Cpu => Cache::Cpu(CpuKv::default()),
            _ => Cache::Tensor(KvCache::default()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Cache::Cpu(c) => c.len(),
            Cache::Tensor(c) => c.len(),
        }
    }

    fn truncate(&mut self, len: usize) {
        match self {
            Cache::Cpu(c) => c.truncate(len),
            Cache::Tensor(c) => c.truncate(len),
        }
    }

    fn clear(&mut self) {
        match self {
            Cache::Cpu(c) => c.clear(),
            Cache::Tensor(c) => c.clear(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Cache::Cpu(c) => c.bytes(),
            Cache::Tensor(c) => c.bytes(),
        }
    }
}

/// The weights, shared by every instance of a model (a clone shares them).
#[derive(Debug)]
struct Shared {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Linear,
}

/// A loaded model: shared weights, RoPE tables and its own KV cache.
#[derive(Debug, Clone)]
pub struct Model {
    spec: Spec,
    shared: Arc<Shared>,
    /// One cache per layer.
    kv: Vec<Cache>,
    rope: Rope,
    rope_local: Option<Rope>,
    context: usize,
    device: Device,
}

/// One sequence of a forward pass: its cache, where its tokens go, and the
/// rows they take in the batch (`offset..offset + len`).
struct Seq<'a> {
    kv: &'a mut [Cache],
    pos: usize,
    offset: usize,
    len: usize,
    rope: &'a Rope,
    rope_local: Option<&'a Rope>,
    context: usize,
}

impl Model {
    /// Load the weights for `spec`; `context` is the number of positions this
    /// instance serves (RoPE tables are built for exactly that many).
    pub fn load(
        g: &GgufFile,
        spec: Spec,
        context: usize,
        weights: Weights,
        dev: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        spec.validate(g)?;
        let context = context.min(spec.max_context).max(1);
        let mut spec = spec;
        spec.rope = spec.rope_for(context).clone();
        let (h, hd) = (spec.hidden, spec.head_dim);
        let (q_dim, kv_dim) = (spec.heads * hd, spec.kv_heads * hd);
        let embed = Embedding::load(g, "token_embd.weight", spec.vocab, h, dev)?;
        let output = match g.tensor_info("output.weight") {
            Some(_) => Linear::load(g, "output.weight", [spec.vocab, h], weights, dev)?,
            None => Linear::from_arc(embed.table(), weights)?,
        };
        let norm = |name: &str, dim: usize| RmsNorm::load(g, name, dim, spec.eps, dev);
        let linear = |name: &str, shape: [usize; 2]| Linear::load(g, name, shape, weights, dev);
        let mut layers = Vec::with_capacity(spec.layers);
        for (i, &window) in spec.windows.iter().enumerate() {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            let sandwich = |s: &str| -> Result<Option<RmsNorm>> {
                spec.sandwich_norms.then(|| norm(&p(s), h)).transpose()
            };
            let stack = |names: &[&str], shapes: &[[usize; 2]]| -> Result<Option<Linear>> {
                let names: Vec<String> = names.iter().map(|n| p(n)).collect();
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                g.stacked(&names, shapes, dev)?
                    .map(|t| Linear::from_arc(Arc::new(t), weights))
                    .transpose()
            };
            let (qs, kvs) = ([q_dim, h], [kv_dim, h]);
            let qkv = match g.tensor_info(&p("attn_qkv")) {
                Some(_) => Qkv::Fused(linear(&p("attn_qkv"), [q_dim + 2 * kv_dim, h])?),
                None => match stack(&["attn_q", "attn_k", "attn_v"], &[qs, kvs, kvs])? {
                    Some(qkv) => Qkv::Fused(qkv),
                    None => match stack(&["attn_q", "attn_k"], &[qs, kvs])? {
                        Some(qk) => Qkv::QkV {
                            qk,
                            v: linear(&p("attn_v"), kvs)?,
                        },
                        None => Qkv::Split {
                            q: linear(&p("attn_q"), qs)?,
                            k: linear(&p("attn_k"), kvs)?,
                            v: linear(&p("attn_v"), kvs)?,
                        },
                    },
                },
            };
            // The gate's rows then the up rows, as Phi-3 stores them, when
            // the two share a type.
            let ffs = [spec.ffn, h];
            let (gate, up) = match g.tensor_info(&p("ffn_gate")) {
                Some(_) => match stack(&["ffn_gate", "ffn_up"], &[ffs, ffs])? {
                    Some(both) => (None, both),
                    None => (
                        Some(linear(&p("ffn_gate"), ffs)?),
                        linear(&p("ffn_up"), ffs)?,
                    ),
                },
                None => (None, linear(&p("ffn_up"), [2 * spec.ffn, h])?),
            };
            layers.push(Layer {
                attn_norm: norm(&p("attn_norm"), h)?,
                qkv,
                qk_norm: match spec.qk_norm {
                    true => Some((norm(&p("attn_q_norm"), hd)?, norm(&p("attn_k_norm"), hd)?)),
                    false => None,
                },
                o: linear(&p("attn_output"), [h, q_dim])?,
                post_attn_norm: sandwich("post_attention_norm")?,
                ffn_norm: norm(&p("ffn_norm"), h)?,
                gate,
                up,
                down: linear(&p("ffn_down"), [h, spec.ffn])?,
                post_ffn_norm: sandwich("post_ffw_norm")?,
                window,
            });
            progress(i + 1, spec.layers);
        }
        let (rope, rope_local) = spec.rope_tables(context, dev)?;
        let norm = norm("output_norm.weight", h)?;
        static_step::reserve_scratch(&spec, context.min(static_step::RESERVED_ROWS), dev)?;
        Ok(Self {
            shared: Arc::new(Shared {
                embed,
                layers,
                norm,
                output,
            }),
            kv: (0..spec.layers).map(|_| Cache::new(dev)).collect(),
            rope,
            rope_local,
            context,
            device: dev.clone(),
            spec,
        })
    }

    /// Serve `context` positions (capped at the model's maximum) from now
    /// on: new RoPE tables, weights untouched. The cache survives unless the
    /// rotation itself changed (LongRoPE crossing its original context);
    /// `true` when it was dropped.
    pub fn set_context(&mut self, context: usize) -> Result<bool> {
        let context = context.min(self.spec.max_context).max(1);
        if context == self.context {
            return Ok(false);
        }
        let rope = self.spec.rope_for(context).clone();
        let changed = rope != self.spec.rope || self.kv_len() > context;
        self.spec.rope = rope;
        (self.rope, self.rope_local) = self.spec.rope_tables(context, &self.device)?;
        self.context = context;
        if changed {
            self.clear_kv();
        }
        Ok(changed)
    }

    /// Take `other`'s context and RoPE tables (another instance of the same
    /// weights that was set to a new context): the tables are shared, not
    /// rebuilt. `true` when the cache was dropped (as [`Model::set_context`]).
    pub fn share_context(&mut self, other: &Model) -> bool {
        if other.context == self.context {
            return false;
        }
        let changed = other.spec.rope != self.spec.rope || self.kv_len() > other.context;
        self.spec.rope = other.spec.rope.clone();
        self.rope = other.rope.clone();
        self.rope_local = other.rope_local.clone();
        self.context = other.context;
        if changed {
            self.clear_kv();
        }
        changed
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// Positions this instance can hold.
    pub fn context(&self) -> usize {
        self.context
    }

    pub fn vocab(&self) -> usize {
        self.spec.vocab
    }

    /// `general.architecture` of the file it came from.
    pub fn architecture(&self) -> &'static str {
        self.spec.arch
    }

    /// Positions held in the KV cache.
    pub fn kv_len(&self) -> usize {
        self.kv.first().map_or(0, Cache::len)
    }

    /// Keep only the first `len` cached positions.
    pub fn truncate_kv(&mut self, len: usize) {
        for c in &mut self.kv {
            c.truncate(len);
        }
    }

    /// Bytes the KV cache's buffers hold (their capacity, not just the
    /// cached positions).
    pub fn kv_bytes(&self) -> u64 {
        self.kv.iter().map(|c| c.bytes() as u64).sum()
    }

    /// Keep the KV cache as tensors and attend with tensor ops even on the
    /// CPU: the path a GPU takes (the tests compare paths on the CPU). The
    /// cache starts empty.
    pub fn use_tensor_attention(&mut self) {
        self.kv = (0..self.spec.layers)
            .map(|_| Cache::Tensor(KvCache::default()))
            .collect();
    }

    /// Drop the KV cache and its buffers.
    pub fn clear_kv(&mut self) {
        for c in &mut self.kv {
            c.clear();
        }
    }

    /// Run `tokens` at positions `kv_len()..`, append them to the cache, and
    /// return F32 logits (rows, vocab) for the positions `which` asks for.
    pub fn forward(&mut self, tokens: &[u32], which: LogitsFor) -> Result<Tensor> {
        static_step::reserve_scratch(&self.spec, tokens.len(), &self.device)?;
        let pos = self.kv_len();
        let out = self.forward_at(pos, tokens, which);
        if out.is_err() {
            // A failure part-way leaves some layers ahead of others.
            self.truncate_kv(pos);
        }
        out
    }

    fn forward_at(&mut self, pos: usize, tokens: &[u32], which: LogitsFor) -> Result<Tensor> {
        check_tokens(tokens, self.spec.vocab)?;
        let Model {
            spec,
            shared,
            kv,
            rope,
            rope_local,
            context,
            device,
        } = self;
        let mut seqs = [Seq {
            kv,
            pos,
            offset: 0,
            len: tokens.len(),
            rope,
            rope_local: rope_local.as_ref(),
            context: *context,
        }];
        let x = layers(shared, spec, device, tokens, &mut seqs)?;
        let x = which.select(&x)?;
        let x = shared.norm.forward(&x)?;
        Ok(shared.output.forward_output(&x)?)
    }

    /// One forward pass over several sequences at once: `tokens[i]` runs at
    /// positions `kv_len()..` of `models[i]` and is appended to its cache.
    /// Returns F32 logits (sequences, vocab) of each sequence's last token.
    /// The models must share their weights (replicas of one load); the
    /// projections and MLPs run once over every sequence's rows, attention
    /// per sequence against its own cache and positions. Decode steps (one
    /// token each) and prefill chunks can share a pass. On the CPU each
    /// sequence's logits are bitwise those of [`Model::forward`] alone.
    pub fn forward_batch(models: &mut [&mut Model], tokens: &[&[u32]]) -> Result<Tensor> {
        if models.is_empty() || models.len() != tokens.len() || tokens.iter().any(|t| t.is_empty())
        {
            return Err(EngineError::InvalidParams(format!(
                "a batch needs one non-empty token run per sequence ({} sequences, {} runs)",
                models.len(),
                tokens.len()
            )));
        }
        let shared = models[0].shared.clone();
        let spec = models[0].spec.clone();
        let device = models[0].device.clone();
        if models.iter().any(|m| !Arc::ptr_eq(&m.shared, &shared)) {
            return Err(EngineError::InvalidParams(
                "a batch's sequences must share one model's weights".into(),
            ));
        }
        for t in tokens {
            check_tokens(t, spec.vocab)?;
        }
        let starts: Vec<usize> = models.iter().map(|m| m.kv_len()).collect();
        let flat: Vec<u32> = tokens.concat();
        static_step::reserve_scratch(&spec, flat.len(), &device)?;
        let out = {
            let mut offset = 0;
            let mut seqs: Vec<Seq<'_>> = Vec::with_capacity(models.len());
            for ((m, t), &pos) in models.iter_mut().zip(tokens).zip(&starts) {
                let m: &mut Model = m;
                seqs.push(Seq {
                    kv: &mut m.kv,
                    pos,
                    offset,
                    len: t.len(),
                    rope: &m.rope,
                    rope_local: m.rope_local.as_ref(),
                    context: m.context,
                });
                offset += t.len();
            }
            layers(&shared, &spec, &device, &flat, &mut seqs).and_then(|x| {
                let x = x.squeeze(0)?;
                let last: Vec<Tensor> = seqs
                    .iter()
                    .map(|s| x.narrow(0, s.offset + s.len - 1, 1))
                    .collect::<candle_core::Result<_>>()?;
                let x = Tensor::cat(&last, 0)?;
                let x = shared.norm.forward(&x)?;
                Ok(shared.output.forward_output(&x)?)
            })
        };
        if out.is_err() {
            for (m, &pos) in models.iter_mut().zip(&starts) {
                m.truncate_kv(pos);
            }
        }
        out
    }
}

/// The tensor path's attention mask of one sequence and window: the key
/// positions visible (`keys.0..keys.1`) and the mask over them, if needed.
struct Mask {
    seq: usize,
    window: Option<usize>,
    keys: (usize, usize),
    mask: Option<Tensor>,
}

/// The layers over a batch of sequences: `tokens` holds each sequence's
/// tokens in turn (rows `offset..offset + len`). Row-wise work (norms,
/// projections, MLP) runs once over all rows; RoPE and attention per
/// sequence. Returns the hidden states (1, rows, hidden) before the final norm.
fn layers(
    w: &Shared,
    s: &Spec,
    dev: &Device,
    tokens: &[u32],
    seqs: &mut [Seq<'_>],
) -> Result<Tensor> {
    for q in seqs.iter() {
        if q.len == 0 || q.pos + q.len > q.context {
            return Err(EngineError::PromptTooLong {
                tokens: q.pos + q.len,
                context: q.context,
            });
        }
    }
    let rows = tokens.len();
    let mut x = w.embed.forward(tokens, dev)?;
    if let Some(scale) = s.embed_scale {
        x = (x * scale)?;
    }
    // Tensor path: one mask per sequence and distinct window per call,
    // shared by the layers.
    let mut masks: Vec<Mask> = Vec::new();
    let fresh = fresh_runs(seqs);
    for (i, layer) in w.layers.iter().enumerate() {
        let win = layer.window;
        let residual = &x;
        let h = layer.attn_norm.forward(&x)?;
        let shape = |heads| (1, rows, heads, s.head_dim);
        let (q, k, v) = layer
            .qkv
            .project(&h, s.heads * s.head_dim, s.kv_heads * s.head_dim)?;
        let mut q = q.reshape(shape(s.heads))?;
        let mut k = k.reshape(shape(s.kv_heads))?;
        let v = v.reshape(shape(s.kv_heads))?;
        if let Some((qn, kn)) = &layer.qk_norm {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let mut parts = Vec::with_capacity(seqs.len());
        let mut next = 0;
        for run in &fresh {
            if next < run.start {
                let group = &mut seqs[next..run.start];
                parts.extend(attend_each(
                    s, dev, i, win, &q, &k, &v, rows, group, next, &mut masks,
                )?);
            }
            let (first, end) = (run.start, run.end);
            let run = &mut seqs[first..end];
            parts.push(attend_fresh(
                s, dev, i, win, &q, &k, &v, run, first, &mut masks,
            )?);
            next = end;
        }
        if next < seqs.len() {
            let group = &mut seqs[next..];
            parts.extend(attend_each(
                s, dev, i, win, &q, &k, &v, rows, group, next, &mut masks,
            )?);
        }
        let attended = match parts.len() {
            1 => parts.pop().expect("one part"),
            _ => Tensor::cat(&parts, 1)?,
        };
        x = layer.finish(s, &attended, residual)?;
    }
    Ok(x)
}

/// Runs of two or more consecutive sequences that start a prompt on a
/// tensor cache with chunks of one length (a burst of new requests): their
/// attention needs no cached key, so [`attend_fresh`] runs it for the run
/// at once. Index ranges into `seqs`.
fn fresh_runs(seqs: &[Seq<'_>]) -> Vec<std::ops::Range<usize>> {
    let fresh = |q: &Seq<'_>| q.pos == 0 && matches!(q.kv.first(), Some(Cache::Tensor(_)));
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (n, q) in seqs.iter().enumerate() {
        if !fresh(q) {
            continue;
        }
        match runs.last_mut() {
            Some(r)
                if r.end == n
                    && seqs[r.start].len == q.len
                    && seqs[r.start].context == q.context =>
            {
                r.end = n + 1
            }
            _ => runs.push(n..n + 1),
        }
    }
    runs.retain(|r| r.len() > 1);
    runs
}

/// Attention of a run of fresh sequences ([`fresh_runs`]) in layer
/// `layer`: one RoPE, one batched attention (a sequence per batch entry,
/// one causal mask), each sequence's keys and values appended to its own
/// cache. The numbers of each sequence are those of [`attend_each`]: the
/// same operations on the same values, batched.
#[allow(clippy::too_many_arguments)]
fn attend_fresh(
    s: &Spec,
    dev: &Device,
    layer: usize,
    win: Option<usize>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    run: &mut [Seq<'_>],
    first: usize,
    masks: &mut Vec<Mask>,
) -> Result<Tensor> {
    let (n, len, offset) = (run.len(), run[0].len, run[0].offset);
    let rope = match (win, run[0].rope_local) {
        (Some(_), Some(local)) => local,
        _ => run[0].rope,
    };
    let take = |t: &Tensor, heads: usize| -> candle_core::Result<Tensor> {
        t.narrow(1, offset, n * len)?
            .contiguous()?
            .reshape((n, len, heads, s.head_dim))
    };
    let q = rope.apply(&take(q, s.heads)?, 0)?;
    let k = rope.apply(&take(k, s.kv_heads)?, 0)?.transpose(1, 2)?;
    let v = take(v, s.kv_heads)?.transpose(1, 2)?;
    let (k_start, k_end) = (first_visible_key(0, win), len);
    for (j, sq) in run.iter_mut().enumerate() {
        let Cache::Tensor(cache) = &mut sq.kv[layer] else {
            unreachable!("fresh runs hold tensor caches");
        };
        cache.append(&k.narrow(0, j, 1)?, &v.narrow(0, j, 1)?, k_start, k_end)?;
    }
    let m = mask_for(masks, first, win, 0, len, (k_start, k_end), dev)?;
    let q = (q.transpose(1, 2)? * s.attn_scale)?;
    let attended = attention(&q, &k.contiguous()?, &v.contiguous()?, m.mask.as_ref())?;
    Ok(attended.reshape((1, n * len, s.heads * s.head_dim))?)
}

/// The mask of sequence `seq` (queries `pos..pos + len` over `keys`) for
/// window `win`: made by the first layer that needs it, shared by the rest.
fn mask_for<'m>(
    masks: &'m mut Vec<Mask>,
    seq: usize,
    win: Option<usize>,
    pos: usize,
    len: usize,
    keys: (usize, usize),
    dev: &Device,
) -> Result<&'m Mask> {
    let at = match masks.iter().position(|m| m.seq == seq && m.window == win) {
        Some(at) => at,
        None => {
            masks.push(Mask {
                seq,
                window: win,
                keys,
                mask: attention_mask(pos, len, keys.0, keys.1, win, dev)?,
            });
            masks.len() - 1
        }
    };
    Ok(&masks[at])
}

/// Attention of `group` (the sequences from index `first` on) in layer
/// `layer`, a sequence at a time.
#[allow(clippy::too_many_arguments)]
fn attend_each(
    s: &Spec,
    dev: &Device,
    i: usize,
    win: Option<usize>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rows: usize,
    group: &mut [Seq<'_>],
    first: usize,
    masks: &mut Vec<Mask>,
) -> Result<Vec<Tensor>> {
    let mut parts = Vec::with_capacity(group.len());
    for (n, sq) in group.iter_mut().enumerate() {
        let n = first + n;
        let rope = match (win, sq.rope_local) {
            (Some(_), Some(local)) => local,
            _ => sq.rope,
        };
        let rows_of = |t: &Tensor| -> candle_core::Result<Tensor> {
            if sq.len == rows {
                Ok(t.clone())
            } else {
                t.narrow(1, sq.offset, sq.len)
            }
        };
        let (pos, len) = (sq.pos, sq.len);
        let q = rope.apply(&rows_of(q)?, pos)?;
        let k = rope.apply(&rows_of(k)?, pos)?;
        let v = rows_of(v)?;
        let attended = match &mut sq.kv[i] {
            Cache::Cpu(cache) => {
                let shape = cpu_attention::Shape {
                    heads: s.heads,
                    kv_heads: s.kv_heads,
                    head_dim: s.head_dim,
                    scale: s.attn_scale as f32,
                    window: win,
                    context: sq.context,
                };
                cpu_attention::attend(cache, &q, &k, &v, pos, shape)?
            }
            Cache::Tensor(cache) => {
                // Exact key views: a decode step needs no mask.
                let keys = (first_visible_key(pos, win), pos + len);
                let m = mask_for(masks, n, win, pos, len, keys, dev)?;
                let q = (q.transpose(1, 2)? * s.attn_scale)?;
                let (k, v) =
                    cache.append(&k.transpose(1, 2)?, &v.transpose(1, 2)?, m.keys.0, m.keys.1)?;
                attention(&q, &k, &v, m.mask.as_ref())?
            }
        };
        parts.push(attended);
    }
    Ok(parts)
}

/// `{arch}.{key}` as an unsigned integer, or `default` when absent.
pub fn usize_or(g: &GgufFile, key: &str, default: usize) -> Result<usize> {
    match g.get(key) {
        Some(_) => g.get_usize(key),
        None => Ok(default),
    }
}

/// Rows of the embedding table: the vocabulary the weights support.
pub fn vocab_rows(g: &GgufFile) -> Result<usize> {
    g.tensor_info("token_embd.weight")
        .map(|t| t.shape[0])
        .ok_or_else(|| {
            g.error(crate::engine::ModelFileError::MissingTensor(
                "token_embd.weight".into(),
            ))
        })
}

/// Linear RoPE scaling from `{arch}.rope.scaling.type`/`.factor` (1.0: none).
pub fn linear_rope_scale(g: &GgufFile, arch: &str) -> f64 {
    match g.get_str(&format!("{arch}.rope.scaling.type")) {
        Ok("linear") => g
            .get_f64(&format!("{arch}.rope.scaling.factor"))
            .unwrap_or(1.0),
        _ => 1.0,
    }
}
