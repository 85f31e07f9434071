//! The fixed step on CUDA through our fused kernels
//! (`daemon/kernels/decode_step.cu`): the same computation as
//! [`StaticDecoder::ops`](super::StaticDecoder), in about 16 kernels per
//! layer instead of 26. A captured step replays its kernels back to back,
//! and with a small model each of Candle's generic kernels (a norm, a RoPE,
//! a scatter, a mask, a softmax) costs as much as a weight matrix; fewer of
//! them is what makes one stream faster. The quantized matmuls of a step's
//! few rows are ours too for Q4_K and Q6_K weights (see [`OurWeight`]);
//! other types, and a prefill's many rows, take Candle's.
//!
//! The kernels write into buffers the decoder owns (below), so their
//! addresses stay valid for the graphs that name them. Attention reads only
//! the keys each row has (not the span the unfused step pads to), so one
//! graph serves every length.

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::quantized::GgmlDType;
use candle_core::{CudaDevice, DType, Device, Tensor};

use super::StaticDecoder;
use crate::engine::error::EngineError;
use crate::engine::models::common::{Linear, Result, RmsNorm, RopeStyle};
use crate::engine::models::decoder::{Model, Spec};

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/decode_step_ptx.rs"));
}

const MODULE: &str = "paraphym_decode_step";
/// Stretches of keys each head's attention splits into (blocks of their
/// own; empty ones return at once): a step's few rows need the blocks, a
/// prefill's many rows bring their own.
const SPLITS: usize = 16;
const PREFILL_SPLITS: usize = 4;
/// Logits per block in the argmax's first stage.
const ARGMAX_CHUNK: usize = 2048;
/// Rows from which Candle's quantized matmul takes its tiled kernel (MMQ).
const MMQ_ROWS: usize = 9;
/// The rows for which our matmul kernels run (where they were measured
/// faster, Qwen3-1.7B shape on an H200, aggregate tok/s through the daemon:
/// 8 streams 2,920 against 2,440, 4 streams 1,799 against 1,647). One or
/// two rows take Candle's MMVQ (ours are slower there: one stream 484
/// against 653 tok/s); nine and more
/// its tiled MMQ (ours read the weights once per eight rows: 16 streams
/// 3,304 against 4,274). A prefill's many rows take MMQ too.
const OUR_MM_ROWS_FROM: usize = 3;
const OUR_MM_ROWS: usize = 8;
/// The products alive at once in a layer, one region of `Buffers::mm` each:
/// Q, K, V (or fewer matrices), the attention's output, gate, up, down.
const MM_OUTPUTS: usize = 7;
const MM_ATTN: usize = 3;
const MM_GATE: usize = 4;
const MM_DOWN: usize = 6;

/// The rows a step's matmuls run for `n` sequences: seven and eight are
/// padded to MMQ's nine (the rows past `n` hold stale values whose results
/// nothing reads). Candle's MMVQ kernel runs two warps per row from five
/// rows on and its cost grows with every row, while MMQ's tiles cost about
/// the same up to 64 rows; on an H200 with the Qwen3-1.7B shape MMQ was
/// faster at eight rows (2,700 against 2,368 tok/s), slower at five (1,746
/// against 2,028). Only what our kernels don't take runs this way.
fn matmul_rows(n: usize) -> usize {
    if (7..MMQ_ROWS).contains(&n) {
        MMQ_ROWS
    } else {
        n
    }
}

/// Whether the kernels take this model's shapes: a head is a whole number
/// of warps, at most 256 wide (the attention kernel keeps it in registers).
pub fn serves(spec: &Spec) -> bool {
    spec.head_dim.is_multiple_of(32)
        && spec.head_dim <= 256
        && spec.heads.is_multiple_of(spec.kv_heads)
}

/// What the fused step writes, per slot (F32 unless noted).
pub struct Buffers {
    /// The residual stream (slots, hidden), updated in place layer by layer.
    x: Tensor,
    /// The normalised stream a matmul reads next (slots, hidden).
    h: Tensor,
    /// Q ready for attention (slots, heads * head_dim).
    q: Tensor,
    /// Attention's output (slots, heads * head_dim).
    attended: Tensor,
    /// Per (slot, head, stretch): max score, sum of exponentials, values.
    part_m: Tensor,
    part_l: Tensor,
    part_acc: Tensor,
    /// The MLP's gated activation (slots, ffn).
    act: Tensor,
    /// The argmax's first stage per (slot, chunk): value, index (U32).
    arg_v: Tensor,
    arg_i: Tensor,
    chunks: usize,
    splits: usize,
    /// Our matmuls' input, quantized: int8 (rows, k) as U8, and each 32
    /// values' scale (rows, k / 32).
    xq: Tensor,
    xd: Tensor,
    /// Our matmuls' outputs: `MM_OUTPUTS` regions of `mm_rows` × `mm_width`.
    mm: Tensor,
    mm_rows: usize,
    mm_width: usize,
}

impl Buffers {
    pub fn new(s: &Spec, slots: usize, dev: &Device) -> Result<Self> {
        Self::with_splits(s, slots, SPLITS, slots.min(OUR_MM_ROWS), dev)
    }

    /// `mm_rows`: the most rows a pass takes through our matmuls (0: none;
    /// their scratch is sized for it).
    fn with_splits(
        s: &Spec,
        slots: usize,
        splits: usize,
        mm_rows: usize,
        dev: &Device,
    ) -> Result<Self> {
        let f = |n: usize| Tensor::zeros(n, DType::F32, dev);
        // Room for a matmul's padded rows (see `matmul_rows`).
        let slots = slots.max(MMQ_ROWS);
        let chunks = s.vocab.div_ceil(ARGMAX_CHUNK);
        let qd = s.heads * s.head_dim;
        let k = s.hidden.max(qd).max(s.ffn);
        let mm_width = (qd + 2 * s.kv_heads * s.head_dim)
            .max(2 * s.ffn)
            .max(s.hidden);
        Ok(Self {
            x: f(slots * s.hidden)?.reshape((slots, s.hidden))?,
            h: f(slots * s.hidden)?.reshape((slots, s.hidden))?,
            q: f(slots * qd)?,
            attended: f(slots * qd)?.reshape((slots, qd))?,
            part_m: f(slots * s.heads * splits)?,
            part_l: f(slots * s.heads * splits)?,
            part_acc: f(slots * s.heads * splits * s.head_dim)?,
            act: f(slots * s.ffn)?.reshape((slots, s.ffn))?,
            arg_v: f(slots * chunks)?,
            arg_i: Tensor::zeros(slots * chunks, DType::U32, dev)?,
            chunks,
            splits,
            xq: Tensor::zeros(mm_rows.max(1) * k, DType::U8, dev)?,
            xd: f(mm_rows.max(1) * k.div_ceil(32))?,
            mm: f(MM_OUTPUTS * mm_rows.max(1) * mm_width)?,
            mm_rows,
            mm_width,
        })
    }
}

fn msg(m: impl Into<String>) -> EngineError {
    EngineError::Candle(candle_core::Error::Msg(m.into()))
}

/// The device address of `t`'s first element.
fn ptr(t: &Tensor) -> Result<u64> {
    crate::engine::device::cuda_address(t)
}

/// `t` with a dense last dimension (a copy when it has not), its address
/// and the distance between its rows (its first dimension). The tensor
/// returned must outlive the launch that reads it.
fn rows_ptr(t: &Tensor) -> Result<(Tensor, u64, i32)> {
    let t = if t.stride().last() == Some(&1) {
        t.clone()
    } else {
        t.contiguous()?
    };
    let p = ptr(&t)?;
    let stride = t.stride()[0] as i32;
    Ok((t, p, stride))
}

/// Launch kernel `$name` of our module on `$dev`'s stream: grid, threads
/// per block, then the arguments (locals: the launch reads them by address).
macro_rules! launch {
    ($dev:expr, $name:expr, $grid:expr, $block:expr, [$($arg:ident),* $(,)?]) => {{
        let func = $dev.get_or_load_custom_func($name, MODULE, ptx::DECODE_STEP)?;
        let mut b = func.builder();
        $( b.arg(&$arg); )*
        let cfg = LaunchConfig {
            grid_dim: $grid,
            block_dim: ($block, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.map_err(|e| msg(format!("{}: {e}", $name)))?;
    }};
}

/// `sum` = a + r (r: `None`, just a), `out` = RMSNorm(sum); n rows.
fn add_rmsnorm(
    dev: &CudaDevice,
    n: usize,
    a: &Tensor,
    r: Option<&Tensor>,
    sum: &Tensor,
    norm: &RmsNorm,
    out: &Tensor,
) -> Result<()> {
    let (w, eps) = norm.parts();
    let dim = w.elem_count();
    let a = a.contiguous()?;
    let (a, r, sum, w, out) = (
        ptr(&a)?,
        r.map(ptr).transpose()?.unwrap_or(0),
        ptr(sum)?,
        ptr(w)?,
        ptr(out)?,
    );
    let block = (dim.div_ceil(32) * 32).min(1024) as u32;
    let dim = dim as i32;
    launch!(
        dev,
        "add_rmsnorm_f32",
        (n as u32, 1, 1),
        block,
        [a, r, sum, w, out, dim, eps]
    );
    Ok(())
}

/// Where a pass's rows read and write: each row's position (`pos`, U32 per
/// row) and slot (`slot_of`, U32 per row; 0: row r is slot r, a step).
#[derive(Clone, Copy)]
struct At {
    pos: u64,
    slot_of: u64,
}

/// A weight our matmul kernels take (`mm_q4k`, `mm_q6k` in the
/// kernels): Q4_K or Q6_K blocks, whole blocks per row.
struct OurWeight {
    ptr: u64,
    q6: bool,
    n: usize,
    k: usize,
}

impl OurWeight {
    fn of(w: &Linear) -> Option<Self> {
        let t = w.quantized()?;
        let q6 = match t.dtype() {
            GgmlDType::Q4K => false,
            GgmlDType::Q6K => true,
            _ => return None,
        };
        let (n, k) = t.shape().dims2().ok()?;
        if !k.is_multiple_of(256) {
            return None;
        }
        let ptr = t.device_ptr().ok()? as u64;
        Some(Self { ptr, q6, n, k })
    }
}

/// A matmul input: rows of one of the buffers (slots, k), quantized for our
/// kernels once, by the first matrix that reads it.
struct Input<'a> {
    x: &'a Tensor,
    quantized: std::cell::Cell<bool>,
}

impl<'a> Input<'a> {
    fn new(x: &'a Tensor) -> Self {
        Self {
            x,
            quantized: std::cell::Cell::new(false),
        }
    }
}

/// A pass's matmuls: `n` rows, `mr` of them for Candle's kernels (see
/// [`matmul_rows`]).
struct Matmuls<'a> {
    dev: &'a CudaDevice,
    b: &'a Buffers,
    n: usize,
    mr: usize,
}

impl Matmuls<'_> {
    /// `x`'s first rows times `w`: (rows, 1, width) as `Linear::forward`
    /// gives. Ours (into region `out` of the buffers) when they take `w`
    /// and the rows, else Candle's over `mr` rows.
    fn run(&self, w: &Linear, x: &Input, out: usize) -> Result<Tensor> {
        let k = x.x.dim(1)?;
        if let Some(ow) = OurWeight::of(w).filter(|o| o.k == k && self.takes_ours()) {
            let at = out * self.b.mm_rows * self.b.mm_width;
            let y = self.b.mm.narrow(0, at, self.n * ow.n)?;
            self.ours(&ow, x, &y, ow.n)?;
            return Ok(y.reshape((self.n, 1, ow.n))?);
        }
        Ok(w.forward(&x.x.narrow(0, 0, self.mr)?.reshape((self.mr, 1, k))?)?)
    }

    /// Whether this pass's matmuls take our kernels (see [`OUR_MM_ROWS_FROM`]).
    fn takes_ours(&self) -> bool {
        (OUR_MM_ROWS_FROM..=self.b.mm_rows).contains(&self.n)
    }

    /// Our kernel: `x`'s first `n` rows times `w` into `y` (rows `stride`
    /// apart).
    fn ours(&self, w: &OurWeight, x: &Input, y: &Tensor, stride: usize) -> Result<()> {
        let (b, n) = (self.b, self.n);
        our_matmul(self.dev, w, x, n, (&b.xq, &b.xd), y, stride)
    }
}

/// `x`'s first `n` rows (at most 8) times `w` into `y` (rows `stride`
/// apart) with our kernels; `xq` holds `x` quantized (written here unless
/// `x` already is).
fn our_matmul(
    dev: &CudaDevice,
    w: &OurWeight,
    x: &Input,
    n: usize,
    (xq, xd): (&Tensor, &Tensor),
    y: &Tensor,
    stride: usize,
) -> Result<()> {
    let (xq, xd, k) = (ptr(xq)?, ptr(xd)?, w.k as i32);
    if !x.quantized.replace(true) {
        let (xp, stride) = (ptr(x.x)?, x.x.dim(1)? as i32);
        launch!(
            dev,
            "quantize_rows_q8",
            (w.k.div_ceil(256) as u32, n as u32, 1),
            256,
            [xp, stride, k, xq, xd]
        );
    }
    let name = if w.q6 { "mm_q6k" } else { "mm_q4k" };
    let (wp, yp) = (w.ptr, ptr(y)?);
    let (n_out, rows, ys) = (w.n as i32, n as i32, stride as i32);
    launch!(
        dev,
        name,
        (w.n.div_ceil(MM_WEIGHT_ROWS) as u32, 1, 1),
        128,
        [wp, xq, xd, yp, n_out, k, rows, ys]
    );
    Ok(())
}

/// Weight rows a block of our kernels takes (`MM_W` in the kernels).
const MM_WEIGHT_ROWS: usize = 4;

impl StaticDecoder {
    /// The step's operations for the first `n` slots, fused: see the
    /// module's notes. Returns the logits (n, vocab), leaves each row's
    /// greedy token and next position on the device.
    pub(super) fn fused_ops(&self, model: &Model, n: usize) -> Result<Tensor> {
        let b = self.fused.as_ref().expect("fused buffers");
        let (s, w) = (&model.spec, &*model.shared);
        let Device::Cuda(dev) = &model.device else {
            return Err(msg("the fused decode step runs on CUDA only"));
        };
        let token = self.token.narrow(0, 0, n)?;
        let mut e = w.embed.table().embedding(&token)?.to_dtype(DType::F32)?;
        if let Some(scale) = s.embed_scale {
            e = (e * scale)?;
        }
        let mr = matmul_rows(n);
        let at = At {
            pos: ptr(&self.pos)?,
            slot_of: 0,
        };
        self.fused_layers(model, dev, b, &e, n, mr, at)?;
        let out = self.out.narrow(0, 0, n)?;
        let mm = Matmuls { dev, b, n, mr };
        match OurWeight::of(&w.output).filter(|_| mm.takes_ours()) {
            Some(ow) => mm.ours(&ow, &Input::new(&b.h), &out, s.vocab)?,
            None => {
                let logits = w
                    .output
                    .forward_output(&b.h.narrow(0, 0, mr)?)?
                    .narrow(0, 0, n)?
                    .to_dtype(DType::F32)?;
                out.slice_set(&logits.contiguous()?, 0, 0)?;
            }
        }
        // The greedy tokens and the next positions stay on the device.
        let (lp, vocab, chunk) = (ptr(&out)?, s.vocab as i32, ARGMAX_CHUNK as i32);
        let (av, ai, chunks) = (ptr(&b.arg_v)?, ptr(&b.arg_i)?, b.chunks as i32);
        let ni = n as u32;
        launch!(
            dev,
            "argmax_part_f32",
            (b.chunks as u32, ni, 1),
            256,
            [lp, vocab, chunk, av, ai]
        );
        let pos = at.pos;
        let (tok, adv, last) = (ptr(&self.token)?, ptr(&self.advance)?, ptr(&self.last)?);
        launch!(
            dev,
            "argmax_final_f32",
            (ni, 1, 1),
            256,
            [av, ai, chunks, tok, pos, adv, last]
        );
        Ok(out)
    }

    /// Prompt chunks straight into their slots, all in one pass of the
    /// fused kernels: `runs` holds (slot, tokens), each run continuing
    /// its slot's sequence at the position it has reached. A row is a
    /// token: the matmuls take every run's rows at once, each row's keys
    /// and values go to its slot at its position, and its attention reads
    /// its slot's keys up to its own. Nothing is captured (the shapes vary)
    /// and the decoder's own buffers are not touched (its graphs name
    /// them). Returns each run's last logits (runs, vocab).
    pub(super) fn fused_prefill(
        &mut self,
        model: &Model,
        runs: &[(usize, &[u32])],
    ) -> Result<Tensor> {
        let (s, w) = (&model.spec, &*model.shared);
        let Device::Cuda(dev) = &model.device else {
            return Err(msg("the fused prefill runs on CUDA only"));
        };
        let (mut tokens, mut slot_of, mut pos, mut last) = (vec![], vec![], vec![], vec![]);
        for &(slot, run) in runs {
            let Some(from) = self.len.get(slot).copied().flatten() else {
                return Err(msg(format!(
                    "a prefill into slot {slot}, which holds no sequence"
                )));
            };
            if run.is_empty() || from + run.len() >= self.capacity {
                return Err(EngineError::PromptTooLong {
                    tokens: from + run.len(),
                    context: self.capacity,
                });
            }
            crate::engine::models::common::check_tokens(run, s.vocab)?;
            tokens.extend_from_slice(run);
            slot_of.extend(std::iter::repeat_n(slot as u32, run.len()));
            pos.extend((from..from + run.len()).map(|p| p as u32));
            last.push(tokens.len() as u32 - 1);
        }
        let n = tokens.len();
        super::reserve_scratch(s, n, &model.device)?;
        // A pass of more rows than ours take needs none of their scratch.
        let mm_rows = if n <= OUR_MM_ROWS { n } else { 0 };
        let b = Buffers::with_splits(s, n, PREFILL_SPLITS, mm_rows, &model.device)?;
        let (pos_t, slot_t) = (
            Tensor::new(pos, &model.device)?,
            Tensor::new(slot_of, &model.device)?,
        );
        let mut e = w
            .embed
            .forward(&tokens, &model.device)?
            .reshape((n, s.hidden))?;
        if let Some(scale) = s.embed_scale {
            e = (e * scale)?;
        }
        let at = At {
            pos: ptr(&pos_t)?,
            slot_of: ptr(&slot_t)?,
        };
        self.fused_layers(model, dev, &b, &e, n, n, at)?;
        let last = Tensor::new(last, &model.device)?;
        let h = b.h.narrow(0, 0, n)?.index_select(&last, 0)?;
        let logits = w.output.forward_output(&h)?.to_dtype(DType::F32)?;
        for &(slot, run) in runs {
            let len = self.len[slot].unwrap_or(0) + run.len();
            self.len[slot] = Some(len);
            self.set_pos(slot, len)?;
        }
        Ok(logits)
    }

    /// Every layer over `n` rows whose embeddings are `e` (n, hidden), the
    /// matmuls over `mr` rows of the buffers (see [`matmul_rows`]); leaves
    /// the final norm's output in `b.h`.
    #[allow(clippy::too_many_arguments)]
    fn fused_layers(
        &self,
        model: &Model,
        dev: &CudaDevice,
        b: &Buffers,
        e: &Tensor,
        n: usize,
        mr: usize,
        at: At,
    ) -> Result<()> {
        let (s, w) = (&model.spec, &*model.shared);
        let (heads, kvh, hd) = (s.heads, s.kv_heads, s.head_dim);
        let rows = |t: &Tensor| t.narrow(0, 0, n);
        let (x, h) = (rows(&b.x)?, rows(&b.h)?);
        let mm = Matmuls { dev, b, n, mr };
        let (pos, slot_of) = (at.pos, at.slot_of);
        let (q_out, attended) = (ptr(&b.q)?, b.attended.narrow(0, 0, mr)?);
        let (pm, pl, pa) = (ptr(&b.part_m)?, ptr(&b.part_l)?, ptr(&b.part_acc)?);
        let (ni, hi, kvi, hdi) = (n as u32, heads as i32, kvh as i32, hd as i32);
        let (cap, splits, scale) = (self.capacity as i32, b.splits as i32, s.attn_scale as f32);
        // The residual to add before the next norm (none before the first).
        let mut carry: Option<Tensor> = None;
        for (i, layer) in w.layers.iter().enumerate() {
            match &carry {
                None => add_rmsnorm(dev, n, e, None, &x, &layer.attn_norm, &h)?,
                Some(m) => add_rmsnorm(dev, n, m, Some(&x), &x, &layer.attn_norm, &h)?,
            }
            let hin = Input::new(&b.h);
            let (q, k, v) =
                layer
                    .qkv
                    .project_with(|w, i| mm.run(w, &hin, i), heads * hd, kvh * hd)?;
            let ((_q, q, qs), (_k, k, ks), (_v, v, vs)) =
                (rows_ptr(&q)?, rows_ptr(&k)?, rows_ptr(&v)?);
            let (qn, kn, eps) = match &layer.qk_norm {
                Some((qn, kn)) => (ptr(qn.parts().0)?, ptr(kn.parts().0)?, qn.parts().1),
                None => (0, 0, 0.0),
            };
            let rope = match (layer.window, &model.rope_local) {
                (Some(_), Some(r)) => r,
                _ => &model.rope,
            };
            let (cos, sin, style, rot) = rope.parts();
            let (cos, sin, rot) = (ptr(cos)?, ptr(sin)?, rot as i32);
            let interleaved = i32::from(style == RopeStyle::Interleaved);
            let (kc, vc) = (ptr(&self.k[i])?, ptr(&self.v[i])?);
            let block = (hd.div_ceil(32) * 32) as u32;
            launch!(
                dev,
                "qkv_prep_f32",
                ((heads + 2 * kvh) as u32, ni, 1),
                block,
                [
                    q,
                    k,
                    v,
                    qs,
                    ks,
                    vs,
                    qn,
                    kn,
                    eps,
                    cos,
                    sin,
                    rot,
                    interleaved,
                    pos,
                    slot_of,
                    kc,
                    vc,
                    q_out,
                    hi,
                    kvi,
                    hdi,
                    cap,
                    scale
                ]
            );
            let window = layer.window.map_or(0, |w| w as i32);
            launch!(
                dev,
                "attn_split_f32",
                (heads as u32, ni, b.splits as u32),
                128,
                [q_out, kc, vc, pos, slot_of, hi, kvi, hdi, cap, window, splits, pm, pl, pa]
            );
            let att = ptr(&attended)?;
            launch!(
                dev,
                "attn_combine_f32",
                (heads as u32, ni, 1),
                block,
                [pm, pl, pa, att, hi, hdi, splits]
            );
            let mut a = mm.run(&layer.o, &Input::new(&b.attended), MM_ATTN)?;
            if let Some(pn) = &layer.post_attn_norm {
                a = pn.forward(&a)?;
            }
            add_rmsnorm(dev, n, &a, Some(&x), &x, &layer.ffn_norm, &h)?;
            let hin = Input::new(&b.h);
            let (g, u) = match &layer.gate {
                Some(gate) => (
                    mm.run(gate, &hin, MM_GATE)?,
                    mm.run(&layer.up, &hin, MM_GATE + 1)?,
                ),
                None => {
                    let gu = mm.run(&layer.up, &hin, MM_GATE)?;
                    (gu.narrow(2, 0, s.ffn)?, gu.narrow(2, s.ffn, s.ffn)?)
                }
            };
            let ((_g, g, gs), (_u, u, us)) = (rows_ptr(&g)?, rows_ptr(&u)?);
            let act = b.act.narrow(0, 0, mr)?;
            let (out, ffn) = (ptr(&act)?, s.ffn as i32);
            let gelu = i32::from(s.activation == super::super::Activation::GeluTanh);
            launch!(
                dev,
                "act_mul_f32",
                (s.ffn.div_ceil(256) as u32, ni, 1),
                256,
                [g, u, gs, us, out, ffn, gelu]
            );
            let mut m = mm.run(&layer.down, &Input::new(&b.act), MM_DOWN)?;
            if let Some(pn) = &layer.post_ffn_norm {
                m = pn.forward(&m)?;
            }
            carry = Some(m);
        }
        let m = carry.ok_or_else(|| msg("a model without layers"))?;
        add_rmsnorm(dev, n, &m, Some(&x), &x, &w.norm, &h)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::quantized::{QStorage, QTensor};

    use super::*;
    use crate::engine::models::common::Weights;

    /// A random (n, k) weight quantized to `dtype`, on `dev`.
    fn weight(dtype: GgmlDType, n: usize, k: usize, dev: &Device) -> Linear {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let storage = QStorage::from_data(q.data().unwrap(), dev, dtype).unwrap();
        let q = QTensor::new(storage, (n, k)).unwrap();
        Linear::from_arc(Arc::new(q), Weights::Quantized).unwrap()
    }

    fn rows(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
    }

    /// Our kernels against Candle's on the same weights (both round x to
    /// 8 bits per 32 values; Candle keeps the scale in f16), and each row's
    /// result bit for bit the same whatever the rows beside it and however
    /// many. Skipped without a CUDA device.
    #[test]
    fn our_matmuls_agree_with_candles_and_ignore_the_batch() {
        let Ok(dev) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: skipped");
            return;
        };
        let Device::Cuda(cuda) = &dev else {
            unreachable!()
        };
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            for (n_out, k) in [(96, 512), (300, 768), (1000, 2304)] {
                let lin = weight(dtype, n_out, k, &dev);
                let ow = OurWeight::of(&lin).expect("our kernels take it");
                let x = Tensor::randn(0f32, 1.0, (OUR_MM_ROWS, k), &dev).unwrap();
                let xq = Tensor::zeros(OUR_MM_ROWS * k, DType::U8, &dev).unwrap();
                let xd = Tensor::zeros(OUR_MM_ROWS * k / 32, DType::F32, &dev).unwrap();
                // Candle's MMVQ (up to 8 rows: the same rounding of x).
                let candle = rows(
                    &lin.forward(&x.reshape((OUR_MM_ROWS, 1, k)).unwrap())
                        .unwrap()
                        .reshape((OUR_MM_ROWS, n_out))
                        .unwrap(),
                );
                let what = format!("{dtype:?} {n_out}x{k}");
                let run = |x: &Tensor, n: usize| {
                    let y = Tensor::zeros((n, n_out), DType::F32, &dev).unwrap();
                    our_matmul(cuda, &ow, &Input::new(x), n, (&xq, &xd), &y, n_out).unwrap();
                    rows(&y)
                };
                // Each row alone: the reference for every batch.
                let alone: Vec<Vec<f32>> = (0..OUR_MM_ROWS)
                    .map(|r| {
                        let x = x.narrow(0, r, 1).unwrap().contiguous().unwrap();
                        run(&x, 1).remove(0)
                    })
                    .collect();
                for (r, (ours, theirs)) in alone.iter().zip(&candle).enumerate() {
                    let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let worst = ours
                        .iter()
                        .zip(theirs)
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(
                        worst <= 4e-3 * scale,
                        "{what}, row {r}: off by {worst} of {scale}"
                    );
                }
                for n in 1..=OUR_MM_ROWS {
                    for (r, row) in run(&x, n).iter().enumerate() {
                        let same = row
                            .iter()
                            .zip(&alone[r])
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{what}: row {r} of {n}");
                    }
                }
            }
        }
    }
}
