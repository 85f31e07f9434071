//! Several rows against a Q8_0 weight on an x86 CPU with AVX2: the few
//! rows of a batched decode step, each weight block loaded once for all of
//! them. Candle 0.11 runs each (row, column) pair as its own dot product,
//! one accumulator whose every block waits on the previous fused
//! multiply-add; with several rows that made a four-row Gemma step
//! compute-bound on an AVX2 host (ARCHITECTURE, "CPU features"). Here each
//! row keeps its own accumulator (independent chains) and shares the
//! block's load and absolute value, while its arithmetic is exactly
//! Candle's for one row: the activations quantized by Candle's own
//! `from_float`, blocks in order, `fmadd(d_w · d_x, q, acc)` over eight
//! lanes, the same horizontal sum. So every result is bitwise what Candle
//! gives that row alone, and batch invariance holds.

use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;

/// The most rows taken at once (one accumulator each in registers).
pub const MAX_ROWS: usize = 8;
/// The fewest outputs worth it: a vocabulary-sized output projection.
/// Threads of our own per call cost more than they gain on a layer's small
/// matrices between Candle's pooled ones (2 rows: 33 against 40 tok/s).
pub const MIN_OUTPUTS: usize = 16_384;

/// A Q8_0 block as laid out in memory (`BlockQ8_0` is `repr(C)`, 34 bytes:
/// f16 scale, 32 signed bytes; its fields are private to Candle).
#[repr(C)]
struct Block {
    d: u16,
    qs: [i8; 32],
}
const _: () = assert!(std::mem::size_of::<Block>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// `x @ w^T` for a Q8_0 weight `w` (n, k) and `x` (rows, k) F32 on the CPU,
/// 2 ≤ rows ≤ [`MAX_ROWS`]; `None` where this kernel does not apply (other
/// shapes, types or devices, no AVX2/FMA): the caller takes Candle's path.
pub fn matmul(x: &Tensor, w: &QTensor) -> candle_core::Result<Option<Tensor>> {
    if !available() || w.dtype() != GgmlDType::Q8_0 || !x.device().is_cpu() {
        return Ok(None);
    }
    let (n, k) = w.shape().dims2()?;
    let dims = x.dims();
    let rows = x.elem_count() / k.max(1);
    if dims.last() != Some(&k) || !(2..=MAX_ROWS).contains(&rows) || k % 32 != 0 {
        return Ok(None);
    }
    if candle_repacks(n, k) || n < MIN_OUTPUTS {
        return Ok(None);
    }
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let kb = k / 32;
    // The activations, quantized as Candle's matmul quantizes them.
    let mut lhs: Vec<BlockQ8_0> = (0..rows * kb).map(|_| BlockQ8_0::zeros()).collect();
    for (r, out) in lhs.chunks_exact_mut(kb).enumerate() {
        BlockQ8_0::from_float(&xs[r * k..(r + 1) * k], out);
    }
    // SAFETY: `BlockQ8_0` is `repr(C)` with the layout of `Block` (checked
    // sizes above; f16 is a u16's bits); the slices live for this call.
    let lhs: &[Block] = unsafe { std::slice::from_raw_parts(lhs.as_ptr().cast(), lhs.len()) };
    let raw = w.data()?;
    if raw.len() != n * kb * 34 {
        candle_core::bail!("Q8_0 weight of {} bytes for {n}x{k}", raw.len());
    }
    // The storage is a Vec<BlockQ8_0>: aligned for u16.
    if raw.as_ptr().align_offset(std::mem::align_of::<Block>()) != 0 {
        return Ok(None);
    }
    let weights: &[Block] = unsafe { std::slice::from_raw_parts(raw.as_ptr().cast(), n * kb) };

    let mut out = vec![0f32; rows * n];
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .clamp(1, n);
    let per = n.div_ceil(threads);
    // Each thread fills whole columns: its share of `out` transposed, copied
    // in after (rows × its columns).
    let work = |c0: usize| {
        let (c0, c1) = (c0.min(n), (c0 + per).min(n));
        let mut part = vec![0f32; (c1 - c0) * rows];
        for (c, dst) in (c0..c1).zip(part.chunks_exact_mut(rows)) {
            let col = &weights[c * kb..(c + 1) * kb];
            // SAFETY: AVX2 and FMA were detected (`available`).
            unsafe { dot_rows(col, lhs, kb, dst) };
        }
        part
    };
    let parts: Vec<Vec<f32>> = std::thread::scope(|s| {
        let work = &work;
        let handles: Vec<_> = (1..threads)
            .map(|t| s.spawn(move || work(t * per)))
            .collect();
        let mut parts = vec![work(0)];
        parts.extend(
            handles
                .into_iter()
                .map(|h| h.join().expect("a matmul thread panicked")),
        );
        parts
    });
    for (t, part) in parts.iter().enumerate() {
        let c0 = t * per;
        for (j, col) in part.chunks_exact(rows).enumerate() {
            for (r, v) in col.iter().enumerate() {
                out[r * n + c0 + j] = *v;
            }
        }
    }
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("rank >= 1") = n;
    Ok(Some(Tensor::from_vec(out, shape, &Device::Cpu)?))
}

/// Whether Candle runs this weight through its repacked VNNI kernels
/// (`repack_x86::select`: Q8_0 with rows a multiple of 256 and outputs of
/// 16, on a CPU with AVX-512 VNNI or AVX-VNNI), whose numbers are not the
/// per-row dot product's: those stay Candle's.
fn candle_repacks(n: usize, k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        k.is_multiple_of(256)
            && n.is_multiple_of(16)
            && (is_x86_feature_detected!("avx512vnni") || is_x86_feature_detected!("avxvnni"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (n, k);
        true
    }
}

/// Whether this CPU runs the kernel.
fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One weight column against every row of `lhs` (`kb` blocks a row), into
/// `dst[row]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_rows(col: &[Block], lhs: &[Block], kb: usize, dst: &mut [f32]) {
    match dst.len() {
        2 => dot_n::<2>(col, lhs, kb, dst),
        3 => dot_n::<3>(col, lhs, kb, dst),
        4 => dot_n::<4>(col, lhs, kb, dst),
        5 => dot_n::<5>(col, lhs, kb, dst),
        6 => dot_n::<6>(col, lhs, kb, dst),
        7 => dot_n::<7>(col, lhs, kb, dst),
        _ => dot_n::<8>(col, lhs, kb, dst),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn dot_rows(_: &[Block], _: &[Block], _: usize, _: &mut [f32]) {
    unreachable!("only called where AVX2 was detected")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_n<const R: usize>(col: &[Block], lhs: &[Block], kb: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    for (b, w) in col.iter().enumerate() {
        // SAFETY: 32 bytes at each block's `qs`.
        let bx = unsafe { _mm256_loadu_si256(w.qs.as_ptr().cast()) };
        let ax = _mm256_sign_epi8(bx, bx);
        let dw = f16::from_bits(w.d).to_f32();
        for (r, acc) in acc.iter_mut().enumerate() {
            let y = &lhs[r * kb + b];
            let by = unsafe { _mm256_loadu_si256(y.qs.as_ptr().cast()) };
            let sy = _mm256_sign_epi8(by, bx);
            let q = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, _mm256_maddubs_epi16(ax, sy)));
            let d = _mm256_set1_ps(dw * f16::from_bits(y.d).to_f32());
            *acc = _mm256_fmadd_ps(d, q, *acc);
        }
    }
    for (v, a) in dst.iter_mut().zip(acc) {
        let hi = _mm256_extractf128_ps(a, 1);
        let s = _mm_add_ps(hi, _mm256_castps256_ps128(a));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        *v = _mm_cvtss_f32(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::Module;

    #[test]
    fn every_row_is_bitwise_what_candle_gives_it_alone() {
        if !available() {
            eprintln!("no AVX2/FMA: skipped");
            return;
        }
        let dev = Device::Cpu;
        // 640 wide (Gemma's), an odd number of outputs.
        let n = MIN_OUTPUTS + 3;
        let w = Tensor::randn(0f32, 1.0, (n, 640), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let x = Tensor::randn(0f32, 1.0, (8, 640), &dev).unwrap();
        let candle =
            QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap();
        for rows in 2..=MAX_ROWS {
            let xr = x.narrow(0, 0, rows).unwrap();
            let ours = matmul(&xr, &q).unwrap().expect("applies");
            assert_eq!(ours.dims(), &[rows, n]);
            for r in 0..rows {
                let alone = candle.forward(&xr.narrow(0, r, 1).unwrap()).unwrap();
                let a: Vec<f32> = alone.flatten_all().unwrap().to_vec1().unwrap();
                let o: Vec<f32> = ours.get(r).unwrap().to_vec1().unwrap();
                assert!(
                    a.iter().zip(&o).all(|(a, o)| a.to_bits() == o.to_bits()),
                    "rows {rows}, row {r}"
                );
            }
        }
        // One row, or too many, is Candle's.
        assert!(matmul(&x.narrow(0, 0, 1).unwrap(), &q).unwrap().is_none());
        let nine = Tensor::randn(0f32, 1.0, (9, 640), &dev).unwrap();
        assert!(matmul(&nine, &q).unwrap().is_none());
    }
}
