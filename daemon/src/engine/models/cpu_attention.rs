//! Fused grouped-query attention for the CPU, over a KV cache held in plain
//! `Vec<f32>`s.
//!
//! On the CPU, attention as a chain of tensor ops (copy the cache view, `q @ k^T`,
//! mask, softmax, `p @ v` in blocks, transposes) costs ~10 small ops per layer and
//! each one a round trip through a thread pool; at decode that is where a deep
//! model's time went (Candle's own Qwen3 uses a fused decode kernel for the same
//! reason). This kernel does one pass per (kv head, tile of query positions) on
//! Candle's barrier pool, the pool its quantized matmuls already use, so the two
//! never compete for cores.
//!
//! Batch invariance (docs/ARCHITECTURE.md): every query row's result is a
//! function of its own position only. Keys are visited in blocks of
//! [`KEY_BLOCK`] at fixed absolute positions, each row accumulates its online
//! softmax block by block in ascending order, and the dot products and sums use
//! the same code whatever the tile. So prefill in one call, in chunks, or
//! token by token gives bitwise identical outputs.

use candle_core::{Device, Storage, Tensor};

/// Keys per online-softmax step, at absolute positions `n*KEY_BLOCK..`. A block's
/// K and V rows (256 x head_dim x 4 B each) stay in L2 while a tile's rows use them.
pub const KEY_BLOCK: usize = 256;

/// Query positions per work item during prefill.
const TILE: usize = 16;

/// One layer's keys and values, head-major: `[kv_head][position][head_dim]`, so
/// a head's keys are one contiguous run. Capacity grows by doubling.
#[derive(Debug, Clone, Default)]
pub struct CpuKv {
    k: Vec<f32>,
    v: Vec<f32>,
    kv_heads: usize,
    head_dim: usize,
    cap: usize,
    len: usize,
}

impl CpuKv {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> usize {
        (self.k.capacity() + self.v.capacity()) * 4
    }

    /// Room for `needed` positions, growing by doubling but never past `limit`
    /// (the context), so a 40,960-position model does not reserve 65,536.
    fn reserve(&mut self, kv_heads: usize, head_dim: usize, needed: usize, limit: usize) {
        if self.kv_heads != kv_heads || self.head_dim != head_dim {
            *self = Self {
                kv_heads,
                head_dim,
                ..Self::default()
            };
        }
        if needed <= self.cap {
            return;
        }
        let cap = needed
            .max(self.cap * 2)
            .max(256)
            .next_power_of_two()
            .min(limit.max(needed));
        let regrow = |old: &[f32], old_cap: usize, len: usize| {
            let mut new = vec![0f32; kv_heads * cap * head_dim];
            for h in 0..kv_heads {
                let src = &old[h * old_cap * head_dim..][..len * head_dim];
                new[h * cap * head_dim..][..len * head_dim].copy_from_slice(src);
            }
            new
        };
        self.k = regrow(&self.k, self.cap, self.len);
        self.v = regrow(&self.v, self.cap, self.len);
        self.cap = cap;
    }

    /// Append `seq` positions; `k` and `v` are `[position][kv_head][head_dim]`.
    fn append(&mut self, k: &[f32], v: &[f32], seq: usize, shape: &Shape) {
        let (kv_heads, head_dim) = (shape.kv_heads, shape.head_dim);
        self.reserve(kv_heads, head_dim, self.len + seq, shape.context);
        for t in 0..seq {
            for h in 0..kv_heads {
                let src = (t * kv_heads + h) * head_dim;
                let dst = (h * self.cap + self.len + t) * head_dim;
                self.k[dst..dst + head_dim].copy_from_slice(&k[src..src + head_dim]);
                self.v[dst..dst + head_dim].copy_from_slice(&v[src..src + head_dim]);
            }
        }
        self.len += seq;
    }

    fn key(&self, h: usize, pos: usize) -> &[f32] {
        &self.k[(h * self.cap + pos) * self.head_dim..][..self.head_dim]
    }

    fn value(&self, h: usize, pos: usize) -> &[f32] {
        &self.v[(h * self.cap + pos) * self.head_dim..][..self.head_dim]
    }
}

/// The shape of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Sliding window: a query at `p` sees keys `p-w+1..=p`.
    pub window: Option<usize>,
    /// Positions the model serves: the cache never grows past it.
    pub context: usize,
}

/// Append `k`, `v` (1, seq, kv_heads, head_dim) at positions `pos..` and attend
/// with `q` (1, seq, heads, head_dim), unscaled. Returns (1, seq, heads * head_dim).
pub fn attend(
    cache: &mut CpuKv,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pos: usize,
    shape: Shape,
) -> candle_core::Result<Tensor> {
    let seq = q.dim(1)?;
    let Shape {
        heads, head_dim: d, ..
    } = shape;
    if cache.len() != pos {
        candle_core::bail!("kv cache holds {} positions, not {pos}", cache.len());
    }
    with_f32(k, |k| {
        with_f32(v, |v| {
            cache.append(k, v, seq, &shape);
            Ok(())
        })
    })?;
    let mut out = vec![0f32; seq * heads * d];
    with_f32(q, |q| {
        run(cache, q, &mut out, seq, pos, shape);
        Ok(())
    })?;
    Tensor::from_vec(out, (1, seq, heads * d), &Device::Cpu)
}

/// Borrow a tensor's F32 elements in row-major order.
fn with_f32<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("cpu attention on a non-cpu tensor");
    };
    let data = &cpu.as_slice::<f32>()?[layout.start_offset()..][..layout.shape().elem_count()];
    f(data)
}

/// A pointer that work items write through, each to its own rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: items write disjoint rows of one live buffer (see `run`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

fn run(cache: &CpuKv, q: &[f32], out: &mut [f32], seq: usize, pos: usize, shape: Shape) {
    let tiles = seq.div_ceil(TILE);
    let items = shape.kv_heads * tiles;
    let ptr = OutPtr(out.as_mut_ptr());
    let work = |range: std::ops::Range<usize>| {
        let mut scratch = Scratch::default();
        for item in range {
            let (kvh, tile) = (item / tiles, item % tiles);
            let t0 = tile * TILE;
            let t1 = (t0 + TILE).min(seq);
            tile_attention(cache, q, ptr, &mut scratch, kvh, t0..t1, pos, shape);
        }
    };
    let pool = candle_core::utils::barrier_pool();
    // A single small item is not worth waking the pool for.
    if items == 1 {
        work(0..1);
    } else {
        pool.execute_chunked(items, work);
    }
}

#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    acc: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

/// Query heads `kvh*rep..(kvh+1)*rep` at sequence offsets `ts` against kv head
/// `kvh`: rows share each K/V row load; every row's arithmetic is independent
/// of which other rows are in the tile.
#[allow(clippy::too_many_arguments)]
fn tile_attention(
    cache: &CpuKv,
    q: &[f32],
    out: OutPtr,
    s: &mut Scratch,
    kvh: usize,
    ts: std::ops::Range<usize>,
    pos: usize,
    shape: Shape,
) {
    let d = shape.head_dim;
    let rep = shape.heads / shape.kv_heads;
    let rows = ts.len() * rep;
    // Row r: sequence offset ts.start + r / rep, query head kvh*rep + r % rep.
    let row_pos = |r: usize| pos + ts.start + r / rep;
    let row_q = |r: usize| {
        let (t, h) = (ts.start + r / rep, kvh * rep + r % rep);
        &q[(t * shape.heads + h) * d..][..d]
    };
    let first = |p: usize| match shape.window {
        Some(w) => (p + 1).saturating_sub(w),
        None => 0,
    };

    s.acc.clear();
    s.acc.resize(rows * d, 0.0);
    s.max.clear();
    s.max.resize(rows, f32::NEG_INFINITY);
    s.sum.clear();
    s.sum.resize(rows, 0.0);
    s.scores.resize(rows * KEY_BLOCK, 0.0);

    let lo = first(row_pos(0));
    let hi = row_pos(rows - 1); // inclusive
    let mut block = lo / KEY_BLOCK * KEY_BLOCK;
    while block <= hi {
        let block_end = block + KEY_BLOCK; // exclusive
        for r in 0..rows {
            let p = row_pos(r);
            let (a, b) = (first(p).max(block), (p + 1).min(block_end));
            if a >= b {
                continue;
            }
            let qr = row_q(r);
            let sc = &mut s.scores[r * KEY_BLOCK..][..b - a];
            let mut m = f32::NEG_INFINITY;
            for (j, slot) in (a..b).zip(sc.iter_mut()) {
                *slot = dot(qr, cache.key(kvh, j)) * shape.scale;
                m = m.max(*slot);
            }
            let new_max = s.max[r].max(m);
            let correction = (s.max[r] - new_max).exp();
            s.max[r] = new_max;
            let acc = &mut s.acc[r * d..][..d];
            if correction != 1.0 {
                acc.iter_mut().for_each(|x| *x *= correction);
            }
            let mut sum = 0f32;
            for (j, &score) in (a..b).zip(sc.iter()) {
                let e = (score - new_max).exp();
                sum += e;
                axpy(acc, e, cache.value(kvh, j));
            }
            s.sum[r] = s.sum[r] * correction + sum;
        }
        block = block_end;
    }

    for r in 0..rows {
        let (t, h) = (ts.start + r / rep, kvh * rep + r % rep);
        let inv = 1.0 / s.sum[r];
        // SAFETY: row (t, h) belongs to this item alone, and `out` outlives `run`.
        let dst =
            unsafe { std::slice::from_raw_parts_mut(out.0.add((t * shape.heads + h) * d), d) };
        for (o, a) in dst.iter_mut().zip(&s.acc[r * d..][..d]) {
            *o = a * inv;
        }
    }
}

/// A dot product in 16 fixed lanes (one AVX-512 register, two AVX2 ones),
/// reduced in a fixed order.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut lanes = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..L {
            lanes[i] += x[i] * y[i];
        }
    }
    let mut half = L / 2;
    while half > 0 {
        for i in 0..half {
            lanes[i] += lanes[i + half];
        }
        half /= 2;
    }
    lanes[0] + tail
}

#[inline]
fn axpy(acc: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in acc.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Naive attention in f64 for one row.
    fn reference(q: &[f32], ks: &[&[f32]], vs: &[&[f32]], scale: f64) -> Vec<f64> {
        let scores: Vec<f64> = ks
            .iter()
            .map(|k| {
                q.iter()
                    .zip(*k)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let z: f64 = e.iter().sum();
        let mut out = vec![0f64; q.len()];
        for (w, v) in e.iter().zip(vs) {
            for (o, x) in out.iter_mut().zip(*v) {
                *o += w / z * *x as f64;
            }
        }
        out
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2654435761).wrapping_add(seed);
                ((x >> 8) % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn tensor(v: &[f32], seq: usize, heads: usize, d: usize) -> Tensor {
        Tensor::from_vec(v.to_vec(), (1, seq, heads, d), &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_naive_attention_and_is_chunking_invariant() {
        let (heads, kv_heads, d, seq) = (4, 2, 40, 600);
        for window in [None, Some(100)] {
            let shape = Shape {
                heads,
                kv_heads,
                head_dim: d,
                scale: 0.3,
                window,
                context: 1000,
            };
            let q = data(seq * heads * d, 1);
            let k = data(seq * kv_heads * d, 2);
            let v = data(seq * kv_heads * d, 3);
            let run_chunks = |chunk: usize| -> Vec<f32> {
                let mut cache = CpuKv::default();
                let mut out = Vec::new();
                let mut p = 0;
                while p < seq {
                    let n = chunk.min(seq - p);
                    let sl = |x: &[f32], h: usize| tensor(&x[p * h * d..(p + n) * h * d], n, h, d);
                    let o = attend(
                        &mut cache,
                        &sl(&q, heads),
                        &sl(&k, kv_heads),
                        &sl(&v, kv_heads),
                        p,
                        shape,
                    )
                    .unwrap();
                    out.extend(o.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                    p += n;
                }
                out
            };
            let whole = run_chunks(seq);
            for chunk in [1, 7, 64, 257] {
                assert_eq!(whole, run_chunks(chunk), "chunk {chunk}, window {window:?}");
            }
            for (t, h) in [(0usize, 0usize), (5, 3), (255, 1), (256, 2), (599, 3)] {
                let kvh = h / (heads / kv_heads);
                let first = window.map_or(0, |w| (t + 1).saturating_sub(w));
                let row = |x: &[f32], j: usize| x[(j * kv_heads + kvh) * d..][..d].to_vec();
                let ks: Vec<Vec<f32>> = (first..=t).map(|j| row(&k, j)).collect();
                let vs: Vec<Vec<f32>> = (first..=t).map(|j| row(&v, j)).collect();
                let ks: Vec<&[f32]> = ks.iter().map(|x| x.as_slice()).collect();
                let vs: Vec<&[f32]> = vs.iter().map(|x| x.as_slice()).collect();
                let want = reference(&q[(t * heads + h) * d..][..d], &ks, &vs, 0.3);
                let got = &whole[(t * heads + h) * d..][..d];
                for (g, w) in got.iter().zip(&want) {
                    assert!((*g as f64 - w).abs() < 1e-5, "t {t} h {h}: {g} vs {w}");
                }
            }
        }
    }
}
