//! The fixed step on CUDA through our fused kernels
//! (`daemon/kernels/decode_step.cu`): the same computation as
//! [`StaticDecoder::ops`](super::StaticDecoder), in about 16 kernels per
//! layer instead of 26. A captured step replays its kernels back to back,
//! and with a small model each of Candle's generic kernels (a norm, a RoPE,
//! a scatter, a mask, a softmax) costs as much as a weight matrix; fewer of
//! them is what makes one stream faster. The quantized matmuls stay
//! Candle's.
//!
//! The kernels write into buffers the decoder owns (below), so their
//! addresses stay valid for the graphs that name them. Attention reads only
//! the keys each row has (not the span the unfused step pads to), so one
//! graph serves every length.

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::{CudaDevice, DType, Device, Storage, Tensor};

use super::StaticDecoder;
use crate::engine::error::EngineError;
use crate::engine::models::common::{Result, RmsNorm, RopeStyle};
use crate::engine::models::decoder::{Model, Spec};

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/decode_step_ptx.rs"));
}

const MODULE: &str = "paraphym_decode_step";
/// Stretches of keys each head's attention splits into (blocks of their
/// own; empty ones return at once).
const SPLITS: usize = 16;
/// Logits per block in the argmax's first stage.
const ARGMAX_CHUNK: usize = 2048;
/// Rows from which Candle's quantized matmul takes its tiled kernel (MMQ).
const MMQ_ROWS: usize = 9;

/// The rows a step's matmuls run for `n` sequences: seven and eight are
/// padded to MMQ's nine (the rows past `n` hold stale values whose results
/// nothing reads). Candle's MMVQ kernel runs two warps per row from five
/// rows on and its cost grows with every row, while MMQ's tiles cost about
/// the same up to 64 rows; on an H200 with the Qwen3-1.7B shape MMQ was
/// faster at eight rows (2,700 against 2,368 tok/s), slower at five (1,746
/// against 2,028).
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
    spec.head_dim % 32 == 0 && spec.head_dim <= 256 && spec.heads % spec.kv_heads == 0
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
}

impl Buffers {
    pub fn new(s: &Spec, slots: usize, dev: &Device) -> Result<Self> {
        let f = |n: usize| Tensor::zeros(n, DType::F32, dev);
        // Room for a matmul's padded rows (see `matmul_rows`).
        let slots = slots.max(MMQ_ROWS);
        let chunks = s.vocab.div_ceil(ARGMAX_CHUNK);
        let qd = s.heads * s.head_dim;
        Ok(Self {
            x: f(slots * s.hidden)?.reshape((slots, s.hidden))?,
            h: f(slots * s.hidden)?.reshape((slots, s.hidden))?,
            q: f(slots * qd)?,
            attended: f(slots * qd)?.reshape((slots, qd))?,
            part_m: f(slots * s.heads * SPLITS)?,
            part_l: f(slots * s.heads * SPLITS)?,
            part_acc: f(slots * s.heads * SPLITS * s.head_dim)?,
            act: f(slots * s.ffn)?.reshape((slots, s.ffn))?,
            arg_v: f(slots * chunks)?,
            arg_i: Tensor::zeros(slots * chunks, DType::U32, dev)?,
            chunks,
        })
    }
}

fn msg(m: impl Into<String>) -> EngineError {
    EngineError::Candle(candle_core::Error::Msg(m.into()))
}

/// The device address of `t`'s first element (F32 or U32 on CUDA).
fn ptr(t: &Tensor) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(c) = &*storage else {
        return Err(msg("fused decode step: a tensor not on CUDA"));
    };
    let base = match t.dtype() {
        DType::F32 => {
            let s = c.as_cuda_slice::<f32>()?;
            s.device_ptr(s.stream()).0
        }
        DType::U32 => {
            let s = c.as_cuda_slice::<u32>()?;
            s.device_ptr(s.stream()).0
        }
        d => return Err(msg(format!("fused decode step: a {d:?} tensor"))),
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
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
    ($dev:expr, $name:literal, $grid:expr, $block:expr, [$($arg:ident),* $(,)?]) => {{
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
        let (heads, kvh, hd) = (s.heads, s.kv_heads, s.head_dim);
        let rows = |t: &Tensor| t.narrow(0, 0, n);
        let token = rows(&self.token)?;
        let mut e = w.embed.table().embedding(&token)?.to_dtype(DType::F32)?;
        if let Some(scale) = s.embed_scale {
            e = (e * scale)?;
        }
        let mr = matmul_rows(n);
        let (x, h) = (rows(&b.x)?, rows(&b.h)?);
        let h3 = b.h.narrow(0, 0, mr)?.reshape((mr, 1, s.hidden))?;
        let pos = ptr(&self.pos)?;
        let (q_out, attended) = (ptr(&b.q)?, b.attended.narrow(0, 0, mr)?);
        let (pm, pl, pa) = (ptr(&b.part_m)?, ptr(&b.part_l)?, ptr(&b.part_acc)?);
        let (ni, hi, kvi, hdi) = (n as u32, heads as i32, kvh as i32, hd as i32);
        let (cap, splits, scale) = (self.capacity as i32, SPLITS as i32, s.attn_scale as f32);
        // The residual to add before the next norm (none before the first).
        let mut carry: Option<Tensor> = None;
        for (i, layer) in w.layers.iter().enumerate() {
            match &carry {
                None => add_rmsnorm(dev, n, &e, None, &x, &layer.attn_norm, &h)?,
                Some(m) => add_rmsnorm(dev, n, m, Some(&x), &x, &layer.attn_norm, &h)?,
            }
            let (q, k, v) = layer.qkv.project(&h3, heads * hd, kvh * hd)?;
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
                (heads as u32, ni, SPLITS as u32),
                128,
                [q_out, kc, vc, pos, hi, kvi, hdi, cap, window, splits, pm, pl, pa]
            );
            let att = ptr(&attended)?;
            launch!(
                dev,
                "attn_combine_f32",
                (heads as u32, ni, 1),
                block,
                [pm, pl, pa, att, hi, hdi, splits]
            );
            let mut a = layer.o.forward(&attended.reshape((mr, 1, heads * hd))?)?;
            if let Some(pn) = &layer.post_attn_norm {
                a = pn.forward(&a)?;
            }
            add_rmsnorm(dev, n, &a, Some(&x), &x, &layer.ffn_norm, &h)?;
            let (g, u) = match &layer.gate {
                Some(gate) => (gate.forward(&h3)?, layer.up.forward(&h3)?),
                None => {
                    let gu = layer.up.forward(&h3)?;
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
            let mut m = layer.down.forward(&act.reshape((mr, 1, s.ffn))?)?;
            if let Some(pn) = &layer.post_ffn_norm {
                m = pn.forward(&m)?;
            }
            carry = Some(m);
        }
        let m = carry.ok_or_else(|| msg("a model without layers"))?;
        add_rmsnorm(dev, n, &m, Some(&x), &x, &w.norm, &h)?;
        let logits = w
            .output
            .forward_output(&b.h.narrow(0, 0, mr)?)?
            .narrow(0, 0, n)?
            .to_dtype(DType::F32)?;
        let out = rows(&self.out)?;
        out.slice_set(&logits.contiguous()?, 0, 0)?;
        // The greedy tokens and the next positions stay on the device.
        let (lp, vocab, chunk) = (ptr(&out)?, s.vocab as i32, ARGMAX_CHUNK as i32);
        let (av, ai, chunks) = (ptr(&b.arg_v)?, ptr(&b.arg_i)?, b.chunks as i32);
        launch!(
            dev,
            "argmax_part_f32",
            (b.chunks as u32, ni, 1),
            256,
            [lp, vocab, chunk, av, ai]
        );
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
}
