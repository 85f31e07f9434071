//! Transformer pieces shared by every architecture: quantized linear layers,
//! RMSNorm, RoPE tables, the KV cache, masks and grouped-query attention.
//!
//! Everything here is plain synchronous Candle code on the calling thread.
//! Activations are F32; weights stay quantized.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};

use crate::engine::error::{EngineError, ModelFileError};
use crate::engine::gguf::GgufFile;

pub type Result<T> = std::result::Result<T, EngineError>;

/// How weights are held for matmuls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Weights {
    /// Quantized, as in the file: Candle's quantized kernels, which round the
    /// activations to 8 bits (as llama.cpp does). The normal mode.
    #[default]
    Quantized,
    /// Dequantized to F32 at load: exact F32 arithmetic on the file's weights,
    /// several times the memory and slower. For checking the model's math
    /// against a reference without activation-quantization noise.
    Dequantized,
}

/// A Q5_0 weight as Q8_0, for the CPU: the same numbers, since a Q5_0
/// block is `d × (q − 16)` with `q` in 0..32 and a Q8_0 block `d × q` with
/// an i8 `q` and the same f16 `d`. Candle 0.11's CPU dot product for Q5_0
/// is scalar on every target, its Q8_0 one SIMD (AVX2, AVX-512, NEON): the
/// Q5_0 products were half of a four-row Gemma 3 step on an AVX2 host (the
/// fallback type of Q4_K_M files for rows not a multiple of 256). Costs
/// 34/22 of the weight's bytes.
pub fn q5_0_as_q8_0(t: &QTensor) -> Result<QTensor> {
    const Q5: usize = 22; // f16 d, u32 high bits, 16 bytes of low nibbles
    const Q8: usize = 34; // f16 d, 32 i8
    let raw = t.data()?;
    if raw.len() % Q5 != 0 {
        return Err(EngineError::Candle(candle_core::Error::Msg(format!(
            "a Q5_0 tensor of {} bytes",
            raw.len()
        ))));
    }
    let mut out = Vec::with_capacity(raw.len() / Q5 * Q8);
    for b in raw.chunks_exact(Q5) {
        out.extend_from_slice(&b[..2]);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..];
        let q = |j: usize| {
            let low = if j < 16 {
                qs[j] & 0x0F
            } else {
                qs[j - 16] >> 4
            };
            let high = (((qh >> j) & 1) << 4) as u8;
            ((low | high) as i8 - 16) as u8
        };
        out.extend((0..32).map(q));
    }
    Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
        GgmlDType::Q8_0,
        &out,
        t.shape().dims().to_vec(),
        &Device::Cpu,
    )?)
}

/// A weight used as `x @ W^T`.
#[derive(Debug, Clone)]
pub struct Linear(QMatMul);

impl Linear {
    pub fn load(
        gguf: &GgufFile,
        name: &str,
        shape: [usize; 2],
        weights: Weights,
        dev: &Device,
    ) -> Result<Self> {
        Self::from_arc(Arc::new(gguf.tensor(name, Some(&shape), dev)?), weights)
    }

    pub fn from_arc(t: Arc<QTensor>, weights: Weights) -> Result<Self> {
        Ok(Self(match weights {
            Weights::Quantized if t.dtype() == GgmlDType::Q5_0 && t.device().is_cpu() => {
                QMatMul::from_arc(Arc::new(q5_0_as_q8_0(&t)?))?
            }
            Weights::Quantized => QMatMul::from_arc(t)?,
            Weights::Dequantized => QMatMul::Tensor(t.dequantize(&t.device())?),
        }))
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(y) = self.rows_q8(x)? {
            return Ok(y);
        }
        // Candle's CPU runs a one-row Q6K product through a gemv whose rounding
        // differs from its multi-row kernel; two rows keep decode consistent with
        // prefill. (A GPU can't be made consistent this way: no padding there.)
        if let QMatMul::QTensor(t) = &self.0 {
            if t.dtype() == GgmlDType::Q6K
                && x.device().is_cpu()
                && x.elem_count() == x.dim(D::Minus1)?
            {
                let y = self.0.forward(&Tensor::cat(&[x, x], x.rank() - 2)?)?;
                return y.narrow(y.rank() - 2, 0, 1);
            }
        }
        self.0.forward(x)
    }

    /// The quantized weight (None when dequantized at load), for our own
    /// CUDA matmul kernels.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn quantized(&self) -> Option<&QTensor> {
        match &self.0 {
            QMatMul::QTensor(t) => Some(t),
            _ => None,
        }
    }

    /// `forward` without the one-row Q6K padding, for the output projection:
    /// its result feeds nothing back into the model, so a last-ulp difference
    /// between decode and prefill stays a last-ulp difference in the logits,
    /// while padding a vocabulary-sized Q6K matrix costs a quarter of the decode
    /// speed (Qwen3 0.6B: Candle's tiled Q6K kernel streams expanded weights).
    pub fn forward_output(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(y) = self.rows_q8(x)? {
            return Ok(y);
        }
        self.0.forward(x)
    }

    /// A few rows against a Q8_0 weight on an AVX2 CPU: our kernel, bitwise
    /// Candle's per row (`cpu_q8`); `None` elsewhere.
    fn rows_q8(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        match &self.0 {
            QMatMul::QTensor(t) if t.dtype() == GgmlDType::Q8_0 && x.device().is_cpu() => {
                super::cpu_q8::matmul(x, t)
            }
            _ => Ok(None),
        }
    }
}

/// RMSNorm over the last dimension. GGUF converters fold Gemma's `1 + w` into
/// the stored weight, so every family uses `x * w` here.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(gguf: &GgufFile, name: &str, dim: usize, eps: f64, dev: &Device) -> Result<Self> {
        let weight = gguf.tensor(name, Some(&[dim]), dev)?.dequantize(dev)?;
        Ok(Self {
            weight,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }

    /// The weight (dim) and epsilon, for fused kernels.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn parts(&self) -> (&Tensor, f32) {
        (&self.weight, self.eps)
    }
}

/// How a head's dimensions pair up for rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimension `i` rotates with `i + d/2` (GPT-NeoX; Qwen, Gemma, Phi-3).
    Neox,
    /// Dimension `2i` rotates with `2i + 1` (GGUF `llama`, whose converter
    /// permutes Q/K weights for this layout).
    Interleaved,
}

/// One RoPE table's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    pub base: f64,
    /// Linear position scaling (1.0: none).
    pub scale: f64,
    /// Per-frequency divisors (Llama 3.1's `rope_freqs.weight`, Phi-3's
    /// LongRoPE `rope_factors_*`).
    pub freq_factors: Option<Vec<f64>>,
    /// Factor on cos and sin (LongRoPE's attention factor; 1.0: none).
    pub mscale: f64,
}

impl RopeSpec {
    pub fn plain(base: f64) -> Self {
        Self {
            base,
            scale: 1.0,
            freq_factors: None,
            mscale: 1.0,
        }
    }
}

/// Rotary position tables, sized to the context in use rather than to the
/// model's maximum. Angles are computed in f64 and stored in F32, whatever the
/// weights' type (Candle's Qwen3 builds them in F16: 1.2 rad off at 2,049).
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
    /// Leading dimensions of a head that rotate; the rest pass through
    /// (partial rotary, Phi-4-mini).
    rot_dim: usize,
}

impl Rope {
    /// Frequencies `base^(-2i/rot_dim)`, divided by the frequency factors;
    /// positions divided by the linear scale.
    pub fn new(
        rot_dim: usize,
        spec: &RopeSpec,
        style: RopeStyle,
        positions: usize,
        dev: &Device,
    ) -> Result<Self> {
        let (mut cos, mut sin) = rope_tables(
            rot_dim,
            spec.base,
            spec.scale,
            spec.freq_factors.as_deref(),
            positions,
        );
        if spec.mscale != 1.0 {
            let m = spec.mscale as f32;
            cos.iter_mut().chain(sin.iter_mut()).for_each(|x| *x *= m);
        }
        let half = rot_dim / 2;
        Ok(Self {
            cos: Tensor::from_vec(cos, (positions, half), dev)?,
            sin: Tensor::from_vec(sin, (positions, half), dev)?,
            style,
            rot_dim,
        })
    }

    /// The tables (positions, rot_dim / 2), the layout and the rotated
    /// dimensions, for fused kernels.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn parts(&self) -> (&Tensor, &Tensor, RopeStyle, usize) {
        (&self.cos, &self.sin, self.style, self.rot_dim)
    }

    /// Rotate `x` of shape (batch, seq, heads, head_dim) for positions `pos..pos+seq`.
    pub fn apply(&self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        let seq = x.dim(1)?;
        self.rotate(
            x,
            &self.cos.narrow(0, pos, seq)?,
            &self.sin.narrow(0, pos, seq)?,
        )
    }

    /// The table's rows (cos, sin) for the position held by the device
    /// tensor `pos` (u32, one element), for [`Rope::rotate`]: nothing of the
    /// position reaches the host, so a captured step replays for any
    /// position.
    pub fn rows_at(&self, pos: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(pos, 0)?,
            self.sin.index_select(pos, 0)?,
        ))
    }

    /// Rotate `x` (batch, seq, heads, head_dim) by rows `cos`, `sin`
    /// (seq, rot_dim / 2).
    pub fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let head_dim = x.dim(3)?;
        if self.rot_dim < head_dim {
            let rotated = self.rotate(&x.narrow(3, 0, self.rot_dim)?, cos, sin)?;
            let rest = x.narrow(3, self.rot_dim, head_dim - self.rot_dim)?;
            return Tensor::cat(&[&rotated, &rest], 3);
        }
        match self.style {
            RopeStyle::Neox => candle_nn::rotary_emb::rope_thd(&x.contiguous()?, cos, sin),
            RopeStyle::Interleaved => {
                let x = x.transpose(1, 2)?.contiguous()?;
                candle_nn::rotary_emb::rope_i(&x, cos, sin)?.transpose(1, 2)
            }
        }
    }
}

/// RoPE angle tables, row-major (positions, rot_dim / 2), computed in f64.
pub fn rope_tables(
    rot_dim: usize,
    base: f64,
    freq_scale: f64,
    freq_factors: Option<&[f64]>,
    positions: usize,
) -> (Vec<f32>, Vec<f32>) {
    let half = rot_dim / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| {
            let f = base.powf(-((2 * i) as f64) / rot_dim as f64);
            f / freq_factors
                .and_then(|ff| ff.get(i))
                .copied()
                .unwrap_or(1.0)
        })
        .collect();
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        let p = p as f64 / freq_scale;
        for f in &inv_freq {
            let (s, c) = (p * f).sin_cos();
            cos.push(c as f32);
            sin.push(s as f32);
        }
    }
    (cos, sin)
}

/// One layer's keys and values, (1, kv_heads, len, head_dim) each, in buffers that
/// grow by doubling so that appending a token does not copy the whole history.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forget everything after the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> usize {
        [&self.k, &self.v]
            .into_iter()
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// The cached keys and values, (1, kv_heads, len, head_dim) views.
    pub fn cached(&self) -> Option<(Tensor, Tensor)> {
        let (k, v) = (self.k.as_ref()?, self.v.as_ref()?);
        Some((
            k.narrow(2, 0, self.len).ok()?,
            v.narrow(2, 0, self.len).ok()?,
        ))
    }

    /// Append `k`, `v` (1, kv_heads, seq, head_dim) and return views of the
    /// positions `start..end` of the cache, where `end` may run past the cached
    /// positions (the caller masks what is not cached yet).
    pub fn append(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        start: usize,
        end: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let seq = k.dim(2)?;
        let needed = self.len + seq;
        let end = end.max(needed);
        let cap = self.k.as_ref().map_or(0, |t| t.dim(2).unwrap_or(0));
        if end > cap {
            let new_cap = end.max(cap * 2).max(256).next_power_of_two();
            let grow = |old: &Option<Tensor>, like: &Tensor| -> candle_core::Result<Tensor> {
                let (b, h, _, d) = like.dims4()?;
                let t = Tensor::zeros((b, h, new_cap, d), like.dtype(), like.device())?;
                if let Some(old) = old {
                    if self.len > 0 {
                        t.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    }
                }
                Ok(t)
            };
            self.k = Some(grow(&self.k, k)?);
            self.v = Some(grow(&self.v, v)?);
        }
        let (kc, vc) = (self.k.as_ref().unwrap(), self.v.as_ref().unwrap());
        kc.slice_set(&k.contiguous()?, 2, self.len)?;
        vc.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok((
            kc.narrow(2, start, end - start)?,
            vc.narrow(2, start, end - start)?,
        ))
    }
}

/// An additive attention mask for queries at `q_pos..q_pos+q_len` over keys at
/// `k_start..k_end`: 0 where a query may look, -inf elsewhere. With a sliding
/// window `w`, a query at `p` sees keys `p-w+1..=p` (llama.cpp's convention).
/// Returns `None` when nothing is masked (a single query over visible keys).
pub fn attention_mask(
    q_pos: usize,
    q_len: usize,
    k_start: usize,
    k_end: usize,
    window: Option<usize>,
    dev: &Device,
) -> candle_core::Result<Option<Tensor>> {
    let visible = |q: usize, k: usize| k <= q && window.is_none_or(|w| q - k < w);
    let all_visible = (0..q_len).all(|i| {
        let q = q_pos + i;
        visible(q, k_start) && k_end <= q + 1
    });
    if all_visible {
        return Ok(None);
    }
    let k_len = k_end - k_start;
    let mut m = Vec::with_capacity(q_len * k_len);
    for i in 0..q_len {
        let q = q_pos + i;
        m.extend((k_start..k_end).map(|k| {
            if visible(q, k) {
                0f32
            } else {
                f32::NEG_INFINITY
            }
        }));
    }
    Ok(Some(Tensor::from_vec(m, (q_len, k_len), dev)?))
}

/// The first key position any query in `q_pos..q_pos+q_len` can see.
pub fn first_visible_key(q_pos: usize, window: Option<usize>) -> usize {
    match window {
        Some(w) => (q_pos + 1).saturating_sub(w),
        None => 0,
    }
}

/// Grouped-query attention on a device (the CPU has `cpu_attention`),
/// without materialising repeated K/V heads: the query heads sharing a kv head
/// are grouped along the sequence axis, so one batched product per kv head does
/// the work. `q`: (1, heads, seq, d), already scaled; `k`, `v`: (1, kv_heads,
/// keys, d), typically strided views of the KV cache, read in place (cuBLAS
/// takes their strides): a `contiguous` copy would be a kernel plus an upload
/// of the view's layout on CUDA, per layer and token.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (b, heads, seq, d) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let keys = k.dim(2)?;
    let rep = heads / kv_heads;
    let q = q.contiguous()?.reshape((b, kv_heads, rep * seq, d))?;
    let mut scores = q.matmul(&k.t()?)?;
    if let Some(mask) = mask {
        scores = scores
            .reshape((b, kv_heads, rep, seq, keys))?
            .broadcast_add(mask)?
            .reshape((b, kv_heads, rep * seq, keys))?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs
        .matmul(v)?
        .reshape((b, heads, seq, d))?
        .transpose(1, 2)?
        .reshape((b, seq, heads * d))
}

/// Token embeddings looked up straight from the quantized table (only the rows
/// used are dequantized), shared with the output projection when tied.
#[derive(Debug, Clone)]
pub struct Embedding {
    table: Arc<QTensor>,
    dim: usize,
}

impl Embedding {
    pub fn load(
        gguf: &GgufFile,
        name: &str,
        rows: usize,
        dim: usize,
        dev: &Device,
    ) -> Result<Self> {
        let table = gguf.tensor(name, Some(&[rows, dim]), dev)?;
        if !dim.is_multiple_of(table.dtype().block_size()) {
            return Err(gguf.error(ModelFileError::Malformed(format!(
                "`{name}` rows of {dim} are not whole {:?} blocks",
                table.dtype()
            ))));
        }
        Ok(Self {
            table: Arc::new(table),
            dim,
        })
    }

    pub fn table(&self) -> Arc<QTensor> {
        self.table.clone()
    }

    /// (1, len, dim) F32 embeddings of `tokens`.
    pub fn forward(&self, tokens: &[u32], dev: &Device) -> candle_core::Result<Tensor> {
        let ids = Tensor::new(tokens, dev)?;
        self.table
            .embedding(&ids)?
            .to_dtype(DType::F32)?
            .reshape((1, tokens.len(), self.dim))
    }
}

/// Which positions of a forward pass need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last position: generation.
    Last,
    /// Positions `i..` of the chunk: scoring (perplexity).
    From(usize),
}

impl LogitsFor {
    /// Select the rows of `x` (1, seq, dim) that need logits, as (rows, dim).
    pub fn select(self, x: &Tensor) -> candle_core::Result<Tensor> {
        let seq = x.dim(1)?;
        let x = x.squeeze(0)?;
        match self {
            LogitsFor::Last => x.narrow(0, seq - 1, 1),
            LogitsFor::From(i) => {
                let i = i.min(seq - 1);
                x.narrow(0, i, seq - i)
            }
        }
    }
}

/// Reject token ids the embedding table does not have (they would index out of
/// bounds in the kernels).
pub fn check_tokens(tokens: &[u32], vocab: usize) -> Result<()> {
    match tokens.iter().find(|&&t| t as usize >= vocab) {
        Some(t) => Err(EngineError::InvalidParams(format!(
            "token id {t} is outside the vocabulary of {vocab}"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_q5_0_weight_becomes_the_same_numbers_in_q8_0() {
        use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
        use candle_core::{Device, Module, Tensor};
        let dev = Device::Cpu;
        // 640 wide (Gemma's), 96 outputs; values across the range.
        let w = Tensor::randn(0f32, 1.0, (96, 640), &dev).unwrap();
        let q5 = QTensor::quantize(&w, GgmlDType::Q5_0).unwrap();
        let q8 = super::q5_0_as_q8_0(&q5).unwrap();
        assert_eq!(q8.dtype(), GgmlDType::Q8_0);
        assert_eq!(q8.shape(), q5.shape());
        let a = q5.dequantize(&dev).unwrap().flatten_all().unwrap();
        let b = q8.dequantize(&dev).unwrap().flatten_all().unwrap();
        assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        // The products agree up to the summation order's rounding.
        let x = Tensor::randn(0f32, 1.0, (4, 640), &dev).unwrap();
        let y5 = QMatMul::from_qtensor(q5).unwrap().forward(&x).unwrap();
        let y8 = QMatMul::from_qtensor(q8).unwrap().forward(&x).unwrap();
        let diff = (y5 - &y8).unwrap().abs().unwrap().max_all().unwrap();
        let scale = y8.abs().unwrap().max_all().unwrap();
        let (diff, scale) = (
            diff.to_scalar::<f32>().unwrap(),
            scale.to_scalar::<f32>().unwrap(),
        );
        assert!(diff <= 1e-5 * scale, "{diff} of {scale}");
    }

    use super::*;

    /// Attention over strided cache views equals a per-head reference
    /// (GQA, one query, and a masked chunk).
    #[test]
    fn attention_on_views_matches_a_per_head_reference() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut t = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
        };
        let (heads, kv_heads, d, cap) = (8, 2, 16, 64);
        for (pos, seq) in [(0usize, 5usize), (20, 1), (40, 7)] {
            let kc = t(&[1, kv_heads, cap, d]);
            let vc = t(&[1, kv_heads, cap, d]);
            let q = t(&[1, heads, seq, d]);
            let end = pos + seq;
            // Views of the first `end` positions, strided over the capacity.
            let (k, v) = (kc.narrow(2, 0, end).unwrap(), vc.narrow(2, 0, end).unwrap());
            let mask = attention_mask(pos, seq, 0, end, None, &Device::Cpu).unwrap();
            let got = attention(&q, &k, &v, mask.as_ref())
                .unwrap()
                .to_vec3::<f32>()
                .unwrap();
            let (qv, kv, vv) = (
                q.squeeze(0).unwrap().to_vec3::<f32>().unwrap(),
                k.squeeze(0).unwrap().to_vec3::<f32>().unwrap(),
                v.squeeze(0).unwrap().to_vec3::<f32>().unwrap(),
            );
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                for i in 0..seq {
                    let visible = pos + i + 1;
                    let scores: Vec<f32> = (0..visible)
                        .map(|j| (0..d).map(|x| qv[h][i][x] * kv[g][j][x]).sum())
                        .collect();
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let w: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f32 = w.iter().sum();
                    for x in 0..d {
                        let want: f32 = (0..visible).map(|j| w[j] / sum * vv[g][j][x]).sum();
                        let have = got[0][i][h * d + x];
                        assert!(
                            (want - have).abs() < 1e-5,
                            "pos {pos} seq {seq} h {h} i {i}"
                        );
                    }
                }
            }
        }
    }

    /// Our F32 tables hold the angles of an f64 computation to 1e-4 rad up to
    /// position 32,768 (Candle's F16 Qwen3 tables are 1.17 rad off at 2,049).
    #[test]
    fn rope_angles_match_f64_up_to_32k() {
        let (dim, base, positions) = (128, 1_000_000.0f64, 32_769);
        let (cos, sin) = rope_tables(dim, base, 1.0, None, positions);
        let half = dim / 2;
        let mut worst = 0f64;
        for p in (0..positions).step_by(97).chain([2049, 32_768]) {
            for i in 0..half {
                let want = (p as f64 * base.powf(-((2 * i) as f64) / dim as f64))
                    .rem_euclid(std::f64::consts::TAU);
                let got = f64::from(sin[p * half + i])
                    .atan2(f64::from(cos[p * half + i]))
                    .rem_euclid(std::f64::consts::TAU);
                let d = (got - want).abs();
                worst = worst.max(d.min(std::f64::consts::TAU - d));
            }
        }
        assert!(worst < 1e-4, "worst angle error {worst} rad");
    }

    #[test]
    fn masks_follow_absolute_positions_and_windows() {
        let dev = Device::Cpu;
        // One query at 10 over keys 0..12 (padded): keys 11.. are the future.
        let m = attention_mask(10, 1, 0, 12, None, &dev).unwrap().unwrap();
        let row = m.to_vec2::<f32>().unwrap().remove(0);
        assert!(row[..=10].iter().all(|&v| v == 0.0));
        assert!(row[11..].iter().all(|&v| v == f32::NEG_INFINITY));
        // Window 4: a query at 10 sees keys 7..=10.
        let m = attention_mask(10, 1, 0, 11, Some(4), &dev)
            .unwrap()
            .unwrap();
        let row = m.to_vec2::<f32>().unwrap().remove(0);
        let seen: Vec<usize> = (0..11).filter(|&k| row[k] == 0.0).collect();
        assert_eq!(seen, [7, 8, 9, 10]);
        assert_eq!(first_visible_key(10, Some(4)), 7);
        // Nothing to mask: no tensor.
        assert!(attention_mask(5, 1, 0, 6, None, &dev).unwrap().is_none());
    }
}
