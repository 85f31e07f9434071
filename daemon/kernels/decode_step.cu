// Fused kernels of the fixed decode step (f32), CUDA only.
//
// A captured step is bound by how many small kernels it runs, not by reading
// the weights: each of these replaces several of Candle's generic kernels
// (norms, RoPE, cache writes, the attention's masks, matmuls and softmax, the
// MLP's activation, the argmax and the position update). Every output value
// is computed by arithmetic that depends on its own row only, never on how
// many rows the step runs.
//
// Layouts: a row is a token of a sequence (a step: one per sequence, row =
// slot; a prefill: a prompt's tokens, each row naming its slot); a head's
// `hd` values are contiguous; the KV caches are (slots, kv_heads, capacity,
// hd). `pos` is per row.

#include <cuda_fp16.h>
#include <stdint.h>

#define WARP 32
#define MAX_PER_LANE 8  // head_dim up to 256 in the attention kernel

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every
// thread gets the total. `sh` holds 32 floats.
__device__ float block_sum(float v, float *sh) {
  const int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
  v = warp_sum(v);
  __syncthreads();  // `sh` may still be read from a previous call
  if (lane == 0) sh[w] = v;
  __syncthreads();
  if (w == 0) {
    v = lane < (int)(blockDim.x / WARP) ? sh[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) sh[0] = v;
  }
  __syncthreads();
  return sh[0];
}

// x (+ residual) then RMSNorm: `sum` = a + r (r may be null; `sum` may be r
// itself: each value is read and written by one thread), `out` = sum *
// rsqrt(mean(sum^2) + eps) * w. One block per row.
extern "C" __global__ void add_rmsnorm_f32(const float *a, const float *r, float *sum,
                                           const float *w, float *out, int dim, float eps) {
  __shared__ float sh[32];
  const size_t row = blockIdx.x;
  a += row * dim;
  out += row * dim;
  if (r) r += row * dim;
  if (sum) sum += row * dim;
  float acc = 0.f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = r ? a[i] + r[i] : a[i];
    if (sum) sum[i] = v;
    acc += v * v;
  }
  const float scale = rsqrtf(block_sum(acc, sh) / dim + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = sum ? sum[i] : (r ? a[i] + r[i] : a[i]);
    out[i] = v * scale * w[i];
  }
}

// Q, K and V of each row, ready for attention: Q and K normalised per head
// (when `qn`/`kn` are given), rotated (RoPE over the first `rot` dimensions,
// pairs (i, i + rot/2) or (2i, 2i + 1) when `interleaved`), Q scaled into
// `q_out` (rows, heads, hd), K and V written into the caches at the row's
// position in its slot's caches (`slot_of[row]`; row itself when null).
// cos/sin: the RoPE tables (positions, rot/2), indexed by `pos`.
// Grid (heads + 2 kv_heads, rows), a thread per dimension.
extern "C" __global__ void qkv_prep_f32(const float *q, const float *k, const float *v,
                                        int q_stride, int k_stride, int v_stride,
                                        const float *qn, const float *kn, float eps,
                                        const float *cos_t, const float *sin_t, int rot,
                                        int interleaved, const uint32_t *pos,
                                        const uint32_t *slot_of, float *kc,
                                        float *vc, float *q_out, int heads, int kvh, int hd,
                                        int cap, float scale) {
  __shared__ float sh[32];
  __shared__ float head[1024];
  const int h = blockIdx.x, d = threadIdx.x;
  const size_t row = blockIdx.y;
  const size_t slot = slot_of ? slot_of[row] : row;
  const bool on = d < hd;
  const size_t p = pos[row];
  if (h >= heads + kvh) {
    const int g = h - heads - kvh;
    if (on) vc[((slot * kvh + g) * cap + p) * hd + d] = v[row * v_stride + g * hd + d];
    return;
  }
  const bool is_q = h < heads;
  const int g = is_q ? h : h - heads;
  const float *src = is_q ? q + row * q_stride + (size_t)g * hd : k + row * k_stride + (size_t)g * hd;
  const float *nw = is_q ? qn : kn;
  float x = on ? src[d] : 0.f;
  if (nw) {
    const float s = block_sum(x * x, sh);
    x = on ? x * rsqrtf(s / hd + eps) * nw[d] : 0.f;
  }
  if (on) head[d] = x;
  __syncthreads();
  if (on && d < rot) {
    const int half = rot / 2;
    const int i = interleaved ? d / 2 : d % half;
    const float c = cos_t[p * half + i], s = sin_t[p * half + i];
    if (interleaved)
      x = (d % 2 == 0) ? x * c - head[d + 1] * s : head[d - 1] * s + x * c;
    else
      x = d < half ? x * c - head[d + half] * s : x * c + head[d - half] * s;
  }
  if (!on) return;
  if (is_q)
    q_out[(row * heads + g) * hd + d] = x * scale;
  else
    kc[((slot * kvh + g) * cap + p) * hd + d] = x;
}

// Attention of each row's query heads over its slot's cached keys 0..=pos
// (the last `window` of them when `window` > 0; a prompt's rows wrote theirs
// in this layer's qkv_prep, so each sees the keys before it), split into `splits` stretches of keys
// that run as blocks of their own (flash-decoding); each warp of a block runs
// an online softmax over every fourth key of its stretch. Writes each
// stretch's max score, sum of exponentials and weighted values; the combine
// kernel merges them. Grid (heads, rows, splits), 128 threads; hd % 32 == 0,
// hd <= 256.
extern "C" __global__ void attn_split_f32(const float *q, const float *kc, const float *vc,
                                          const uint32_t *pos, const uint32_t *slot_of,
                                          int heads, int kvh, int hd,
                                          int cap, int window, int splits, float *part_m,
                                          float *part_l, float *part_acc) {
  __shared__ float sm[32], sl[32];
  __shared__ float sacc[4][256];
  const int h = blockIdx.x, s = blockIdx.z;
  const size_t row = blockIdx.y;
  const size_t slot = slot_of ? slot_of[row] : row;
  const int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
  const int per = hd / WARP;
  const int g = h / (heads / kvh);
  const int p = (int)pos[row];
  const int lo = (window > 0 && p + 1 > window) ? p + 1 - window : 0;
  const int chunk = (p + 1 - lo + splits - 1) / splits;
  const int t0 = lo + s * chunk, t1 = min(t0 + chunk, p + 1);
  const float *qh = q + (row * heads + h) * hd;
  const float *K = kc + (slot * kvh + g) * (size_t)cap * hd;
  const float *V = vc + (slot * kvh + g) * (size_t)cap * hd;
  float qv[MAX_PER_LANE], acc[MAX_PER_LANE];
#pragma unroll
  for (int j = 0; j < MAX_PER_LANE; ++j) {
    qv[j] = j < per ? qh[lane + WARP * j] : 0.f;
    acc[j] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int t = t0 + w; t < t1; t += nw) {
    const float *kr = K + (size_t)t * hd;
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < MAX_PER_LANE; ++j)
      if (j < per) dot += qv[j] * kr[lane + WARP * j];
    dot = warp_sum(dot);
    const float mn = fmaxf(m, dot);
    const float corr = expf(m - mn), e = expf(dot - mn);
    l = l * corr + e;
    const float *vr = V + (size_t)t * hd;
#pragma unroll
    for (int j = 0; j < MAX_PER_LANE; ++j)
      if (j < per) acc[j] = acc[j] * corr + e * vr[lane + WARP * j];
    m = mn;
  }
  if (lane == 0) {
    sm[w] = m;
    sl[w] = l;
  }
#pragma unroll
  for (int j = 0; j < MAX_PER_LANE; ++j)
    if (j < per) sacc[w][lane + WARP * j] = acc[j];
  __syncthreads();
  if (w != 0) return;
  float M = -INFINITY;
  for (int i = 0; i < nw; ++i) M = fmaxf(M, sm[i]);
  float L = 0.f, out[MAX_PER_LANE];
#pragma unroll
  for (int j = 0; j < MAX_PER_LANE; ++j) out[j] = 0.f;
  for (int i = 0; i < nw; ++i) {
    const float f = sm[i] == -INFINITY ? 0.f : expf(sm[i] - M);
    L += sl[i] * f;
#pragma unroll
    for (int j = 0; j < MAX_PER_LANE; ++j)
      if (j < per) out[j] += sacc[i][lane + WARP * j] * f;
  }
  const size_t at = (row * heads + h) * splits + s;
  if (lane == 0) {
    part_m[at] = M;
    part_l[at] = L;
  }
#pragma unroll
  for (int j = 0; j < MAX_PER_LANE; ++j)
    if (j < per) part_acc[at * hd + lane + WARP * j] = out[j];
}

// Merges the stretches: out (rows, heads * hd). Grid (heads, rows), a thread
// per dimension.
extern "C" __global__ void attn_combine_f32(const float *part_m, const float *part_l,
                                            const float *part_acc, float *out, int heads,
                                            int hd, int splits) {
  const int h = blockIdx.x, d = threadIdx.x;
  const size_t row = blockIdx.y;
  if (d >= hd) return;
  const size_t base = (row * heads + h) * splits;
  float M = -INFINITY;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, part_m[base + s]);
  float L = 0.f, o = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float ms = part_m[base + s];
    const float f = ms == -INFINITY ? 0.f : expf(ms - M);
    L += part_l[base + s] * f;
    o += part_acc[(base + s) * hd + d] * f;
  }
  out[(row * heads + h) * hd + d] = o / L;
}

// The MLP's gate: out = act(g) * u, (rows, ffn); g and u rows `g_stride` and
// `u_stride` apart (both halves of one stacked matmul, or two). act: SiLU,
// or GELU's tanh approximation when `gelu`. Grid (ceil(ffn / 256), rows).
extern "C" __global__ void act_mul_f32(const float *g, const float *u, int g_stride,
                                       int u_stride, float *out, int ffn, int gelu) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const size_t row = blockIdx.y;
  if (i >= ffn) return;
  const float x = g[row * g_stride + i];
  const float a = gelu ? 0.5f * x * (1.f + tanhf(0.7978845608028654f * x * (1.f + 0.044715f * x * x)))
                       : x / (1.f + expf(-x));
  out[row * ffn + i] = a * u[row * u_stride + i];
}

// The larger of two (value, index) candidates; equal values: the lower index.
__device__ __forceinline__ void better(float &v, uint32_t &i, float v2, uint32_t i2) {
  if (v2 > v || (v2 == v && i2 < i)) {
    v = v2;
    i = i2;
  }
}

__device__ void block_argmax(float &v, uint32_t &i, float *sv, uint32_t *si) {
  const int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
#pragma unroll
  for (int o = WARP / 2; o > 0; o >>= 1)
    better(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
  if (lane == 0) {
    sv[w] = v;
    si[w] = i;
  }
  __syncthreads();
  if (w == 0) {
    v = lane < (int)(blockDim.x / WARP) ? sv[lane] : -INFINITY;
    i = lane < (int)(blockDim.x / WARP) ? si[lane] : 0xffffffffu;
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1)
      better(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
  }
}

// First stage of each row's argmax: block c takes `chunk` logits of its row.
// Grid (chunks, rows), 256 threads.
extern "C" __global__ void argmax_part_f32(const float *x, int vocab, int chunk, float *pv,
                                           uint32_t *pi) {
  __shared__ float sv[32];
  __shared__ uint32_t si[32];
  const int c = blockIdx.x;
  const size_t row = blockIdx.y;
  const int start = c * chunk, end = min(start + chunk, vocab);
  float v = -INFINITY;
  uint32_t i = 0xffffffffu;
  for (int j = start + threadIdx.x; j < end; j += blockDim.x) better(v, i, x[row * vocab + j], j);
  block_argmax(v, i, sv, si);
  if (threadIdx.x == 0) {
    pv[row * gridDim.x + c] = v;
    pi[row * gridDim.x + c] = i;
  }
}

// Second stage: each row's greedy token (index 0 when every logit is NaN),
// then its next position, min(pos + advance, last). Grid rows, 256 threads.
extern "C" __global__ void argmax_final_f32(const float *pv, const uint32_t *pi, int chunks,
                                            uint32_t *token, uint32_t *pos,
                                            const uint32_t *advance, const uint32_t *last) {
  __shared__ float sv[32];
  __shared__ uint32_t si[32];
  const size_t row = blockIdx.x;
  float v = -INFINITY;
  uint32_t i = 0xffffffffu;
  for (int j = threadIdx.x; j < chunks; j += blockDim.x) better(v, i, pv[row * chunks + j], pi[row * chunks + j]);
  block_argmax(v, i, sv, si);
  if (threadIdx.x == 0) {
    token[row] = i == 0xffffffffu ? 0u : i;
    pos[row] = min(pos[row] + advance[row], last[row]);
  }
}

// ---------------------------------------------------------------------------
// Quantized matmuls for a step's few rows: y (rows, n_out) = x W^T, W in the
// file's Q4_K or Q6_K blocks (n_out rows of k/256 blocks), x quantized per 32
// values to int8 (`quantize_rows_q8`), as llama.cpp's MMVQ does. Candle's
// multi-row kernels decode each weight block once per row of x; these decode
// it once per launch and reuse it for up to 8 rows (a block computes MM_W
// weight rows for the 8 rows of x, its MM_WARPS warps taking interleaved
// stretches of the blocks). Every output is summed in the same order
// whatever the number of rows: a row's result doesn't depend on the batch
// it runs in.

#define MM_ROWS 8
#define MM_WARPS 4
#define MM_W 4

// xq (rows, k) int8 and xd (rows, k/32): per 32 values d = max|x| / 127,
// q = round(x / d). A warp per 32 values; grid (ceil(k / 256), rows), 256
// threads. x rows are `stride` floats apart.
extern "C" __global__ void quantize_rows_q8(const float *x, int stride, int k, int8_t *xq,
                                            float *xd) {
  const size_t row = blockIdx.y;
  const int blk = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
  if (blk * 32 >= k) return;  // the whole warp
  const int lane = threadIdx.x % WARP;
  const float v = x[row * stride + blk * 32 + lane];
  float amax = fabsf(v);
#pragma unroll
  for (int o = WARP / 2; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float d = amax / 127.f;
  xq[row * k + blk * 32 + lane] = (int8_t)(amax == 0.f ? 0 : __float2int_rn(v / d));
  if (lane == 0) xd[row * (k / 32) + blk] = d;
}

// LB bytes (4, 8 or 16) at an LB-aligned address, as ints.
template <int LB>
__device__ __forceinline__ void ld(const void *p, int (&v)[LB / 4]) {
  if constexpr (LB == 16) {
    const int4 t = *(const int4 *)p;
    v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
  } else if constexpr (LB == 8) {
    const int2 t = *(const int2 *)p;
    v[0] = t.x, v[1] = t.y;
  } else {
    v[0] = *(const int *)p;
  }
}

// The int8 dot product of two runs of bytes.
template <int N>
__device__ __forceinline__ int dotn(const int (&a)[N], const int (&b)[N]) {
  int s = 0;
#pragma unroll
  for (int t = 0; t < N; ++t) s = __dp4a(a[t], b[t], s);
  return s;
}

template <int N>
__device__ __forceinline__ int sumn(const int (&a)[N]) {
  int s = 0;
#pragma unroll
  for (int t = 0; t < N; ++t) s = __dp4a(a[t], 0x01010101, s);
  return s;
}

// The block's outputs: each warp's partial sums, then the warps' in order.
template <int W>
__device__ __forceinline__ void mm_store(float (&acc)[W][MM_ROWS], float *y, int y_stride, int o0,
                                         int n_out, int nr) {
  __shared__ float part[MM_WARPS][W][MM_ROWS];
  const int wi = threadIdx.x / WARP;
#pragma unroll
  for (int i = 0; i < W; ++i)
#pragma unroll
    for (int r = 0; r < MM_ROWS; ++r) {
      const float v = warp_sum(acc[i][r]);
      if (threadIdx.x % WARP == 0) part[wi][i][r] = v;
    }
  __syncthreads();
  const int t = threadIdx.x, i = t / MM_ROWS, r = t % MM_ROWS;
  if (t < W * MM_ROWS && r < nr && o0 + i < n_out) {
    float v = part[0][i][r];
#pragma unroll
    for (int w = 1; w < MM_WARPS; ++w) v = __fadd_rn(v, part[w][i][r]);
    y[(size_t)r * y_stride + o0 + i] = v;
  }
}

// Q4_K: 144 bytes per 256 weights: d, dmin (half), 12 bytes of 6-bit scales
// and mins for 8 sub-blocks of 32, 128 bytes of nibbles (bytes 32c..32c+32:
// sub-block 2c in the low nibbles, 2c + 1 in the high). A lane takes LB
// bytes of nibbles: LB values of sub-blocks 2c and 2c + 1 each.
template <int W, int LB>
__device__ void mm_q4k_rows(const uint8_t *w, const int8_t *xq, const float *xd, float *y,
                            int n_out, int k, int rows, int y_stride) {
  constexpr int LPB = 128 / LB, BPW = WARP / LPB;  // lanes per block, blocks per warp
  const int lane = threadIdx.x % WARP, wi = threadIdx.x / WARP;
  const int o0 = blockIdx.x * W;
  if (o0 >= n_out) return;  // the whole block
  const int nr = min(rows, MM_ROWS), nb = k / 256;
  const int off = (lane % LPB) * LB, c = off / 32, h = off % 32;
  float acc[W][MM_ROWS] = {};
  for (int b = lane / LPB + wi * BPW; b < nb; b += MM_WARPS * BPW) {
    int lo[W][LB / 4], hi[W][LB / 4];
    float dl[W], ml[W], dh[W], mh[W];
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const uint8_t *blk = w + ((size_t)min(o0 + i, n_out - 1) * nb + b) * 144;
      const float2 dm = __half22float2(*(const __half2 *)blk);
      const uint8_t *s = blk + 4;
      const int j = 2 * c;  // sub-blocks j (low nibbles) and j + 1 (high)
      int sl, ml_, sh, mh_;
      if (j < 4) {
        sl = s[j] & 63, ml_ = s[j + 4] & 63;
        sh = s[j + 1] & 63, mh_ = s[j + 5] & 63;
      } else {
        sl = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), ml_ = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        sh = (s[j + 5] & 0xF) | ((s[j - 3] >> 6) << 4), mh_ = (s[j + 5] >> 4) | ((s[j + 1] >> 6) << 4);
      }
      dl[i] = __fmul_rn(dm.x, (float)sl), ml[i] = __fmul_rn(dm.y, (float)ml_);
      dh[i] = __fmul_rn(dm.x, (float)sh), mh[i] = __fmul_rn(dm.y, (float)mh_);
      int q[LB / 4];
      ld<LB>(blk + 16 + off, q);
#pragma unroll
      for (int t = 0; t < LB / 4; ++t) lo[i][t] = q[t] & 0x0F0F0F0F, hi[i][t] = (q[t] >> 4) & 0x0F0F0F0F;
    }
#pragma unroll
    for (int r = 0; r < MM_ROWS; ++r) {
      if (r >= nr) break;
      const int8_t *xr = xq + (size_t)r * k + b * 256 + 64 * c + h;
      int xl[LB / 4], xh[LB / 4];
      ld<LB>(xr, xl);
      ld<LB>(xr + 32, xh);
      const float *xdr = xd + (size_t)r * (k / 32) + b * 8 + 2 * c;
      const float xdl = xdr[0], xdh = xdr[1];
      const float sxl = (float)sumn(xl), sxh = (float)sumn(xh);
#pragma unroll
      for (int i = 0; i < W; ++i) {
        const float vl = __fmaf_rn(dl[i], (float)dotn(lo[i], xl), -__fmul_rn(ml[i], sxl));
        const float vh = __fmaf_rn(dh[i], (float)dotn(hi[i], xh), -__fmul_rn(mh[i], sxh));
        acc[i][r] = __fmaf_rn(xdh, vh, __fmaf_rn(xdl, vl, acc[i][r]));
      }
    }
  }
  mm_store<W>(acc, y, y_stride, o0, n_out, nr);
}

// Four bytes at a 2-byte aligned address (Q6_K blocks are 210 bytes).
__device__ __forceinline__ int ld2(const uint8_t *p) {
  const uint16_t *h = (const uint16_t *)p;
  return (int)((uint32_t)h[0] | ((uint32_t)h[1] << 16));
}

// Q6_K: 210 bytes per 256 weights: 128 bytes of low nibbles, 64 of 2-bit
// high parts, 16 int8 scales (sub-blocks of 16), d (half). Value l of half n
// (l < 32: ql[64n + l] low, qh[32n + l] bits 0-1; then l + 32: ql[64n + 32 + l]
// low, bits 2-3; l + 64: ql[64n + l] high, bits 4-5; l + 96: ql[64n + 32 + l]
// high, bits 6-7), minus 32. A lane takes half n, values l0..l0+LB of each
// quarter (within one sub-block each).
template <int W, int LB>
__device__ void mm_q6k_rows(const uint8_t *w, const int8_t *xq, const float *xd, float *y,
                            int n_out, int k, int rows, int y_stride) {
  constexpr int GPH = 32 / LB, LPB = 2 * GPH, BPW = WARP / LPB;
  const int lane = threadIdx.x % WARP, wi = threadIdx.x / WARP;
  const int o0 = blockIdx.x * W;
  if (o0 >= n_out) return;  // the whole block
  const int nr = min(rows, MM_ROWS), nb = k / 256;
  const int n = (lane % LPB) / GPH, l0 = (lane % GPH) * LB, sb = l0 / 16;
  float acc[W][MM_ROWS] = {};
  for (int b = lane / LPB + wi * BPW; b < nb; b += MM_WARPS * BPW) {
    int q[W][4][LB / 4];  // [weight row][quarter][4 bytes]
    float ds[W][4];
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const uint8_t *blk = w + ((size_t)min(o0 + i, n_out - 1) * nb + b) * 210;
      const float d = __half2float(*(const __half *)(blk + 208));
      const int8_t *sc = (const int8_t *)(blk + 192);
#pragma unroll
      for (int t = 0; t < LB / 4; ++t) {
        const int la = ld2(blk + 64 * n + l0 + 4 * t);
        const int lb = ld2(blk + 64 * n + 32 + l0 + 4 * t);
        const int vh = ld2(blk + 128 + 32 * n + l0 + 4 * t);
        q[i][0][t] = __vsubss4((la & 0x0F0F0F0F) | ((vh << 4) & 0x30303030), 0x20202020);
        q[i][1][t] = __vsubss4((lb & 0x0F0F0F0F) | ((vh << 2) & 0x30303030), 0x20202020);
        q[i][2][t] = __vsubss4(((la >> 4) & 0x0F0F0F0F) | (vh & 0x30303030), 0x20202020);
        q[i][3][t] = __vsubss4(((lb >> 4) & 0x0F0F0F0F) | ((vh >> 2) & 0x30303030), 0x20202020);
      }
#pragma unroll
      for (int c = 0; c < 4; ++c) ds[i][c] = __fmul_rn(d, (float)sc[8 * n + sb + 2 * c]);
    }
#pragma unroll
    for (int r = 0; r < MM_ROWS; ++r) {
      if (r >= nr) break;
      const int8_t *xr = xq + (size_t)r * k + b * 256 + 128 * n + l0;
      const float *xdr = xd + (size_t)r * (k / 32) + b * 8 + 4 * n;
      int x[4][LB / 4];
      float xs[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) ld<LB>(xr + 32 * c, x[c]), xs[c] = xdr[c];
#pragma unroll
      for (int i = 0; i < W; ++i) {
        float v = acc[i][r];
#pragma unroll
        for (int c = 0; c < 4; ++c) v = __fmaf_rn(__fmul_rn(xs[c], ds[i][c]), (float)dotn(q[i][c], x[c]), v);
        acc[i][r] = v;
      }
    }
  }
  mm_store<W>(acc, y, y_stride, o0, n_out, nr);
}

// Grid ceil(n_out / MM_W), MM_WARPS warps per block; at most 8 rows. Lanes
// take 16 bytes of a Q4_K block's nibbles, 8 of each Q6_K quarter: the
// fastest of 4/8/16 measured at 4 and 8 rows on an H200 (BENCHMARKS).
extern "C" __global__ void mm_q4k(const uint8_t *w, const int8_t *xq, const float *xd, float *y,
                                  int n_out, int k, int rows, int y_stride) {
  mm_q4k_rows<MM_W, 16>(w, xq, xd, y, n_out, k, rows, y_stride);
}

extern "C" __global__ void mm_q6k(const uint8_t *w, const int8_t *xq, const float *xd, float *y,
                                  int n_out, int k, int rows, int y_stride) {
  mm_q6k_rows<MM_W, 8>(w, xq, xd, y, n_out, k, rows, y_stride);
}
