// Sampling on the device: top-k (any k), min-p, top-p and temperature over a
// whole vocabulary row, then the draw, with the host's arithmetic. The host
// draws the uniform number `r` (its seeded generator) and gets one token back
// instead of copying the row (151,936 floats for Qwen3) and scanning it.
//
// One block per row:
//  1. the row's max `m` and its finite count; for a top-k, a floor under
//     its k-th largest logit (the k-th largest of the threads' maxima);
//  2. sum of exp(l - m) (f64) and a histogram of the distance m - l
//     (count, and exp(l - m) in fixed point) in bins of 1/64 nat, wider
//     when the row spans more than 32 nats: every finite logit has a bin
//     (a top-k may reach far down a steep row);
//  3. from the histogram, the bin past which no token can survive the
//     filters (top-k by count, top-p by mass with a margin, min-p by
//     distance);
//  4. the tokens of those bins (the candidates, at most `MAX_CAND`) into
//     shared memory, sorted by (logit desc, id asc): the host's order;
//  5. the host's steps over the sorted candidates in its order and types:
//     top-k, probabilities, min-p, top-p's running f32 sum, weights
//     p^(1/T) in f64, their sum and the walk to r * sum.
// When the candidates cannot decide (more than `MAX_CAND` of them, or the
// filters' cut falls past the last of them), the token is 0xFFFFFFFF and the
// host decides from the row with the same `r`.

#include <stdint.h>
#include <float.h>

#define THREADS 1024
#define BINS 2048
#define BINS_PER_NAT 64.f  // at most
#define MAX_CAND 2048  // pick::DEVICE_CANDIDATES
#define FIX_E 1099511627776.0  // 2^40: exp(l - m) <= 1 in fixed point
#define UNDECIDED 0xFFFFFFFFu
// Loads in flight per thread in a pass over the row: one block reads the
// whole row, so a pass is bound by load latency unless they overlap.
#define UNROLL 8

// Calls `f(i, l)` for every finite logit `l = x[i]` of the thread's share
// (i = t, t + THREADS, ... in order), UNROLL loads at a time.
template <typename F>
__device__ __forceinline__ void each_finite(const float *x, int n, F f) {
  for (int base = threadIdx.x; base < n; base += THREADS * UNROLL) {
    float v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; u++) {
      const int i = base + u * THREADS;
      v[u] = i < n ? x[i] : NAN;
    }
#pragma unroll
    for (int u = 0; u < UNROLL; u++)
      if (isfinite(v[u])) f(base + u * THREADS, v[u]);
  }
}

// A float's bits, mapped so that unsigned order is the floats' order.
__device__ __forceinline__ uint32_t ordered(float f) {
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float unordered(uint32_t u) {
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u);
}

// Descending by logit, then ascending by id, as one unsigned key.
__device__ __forceinline__ uint64_t key_of(float v, uint32_t id) {
  return ((uint64_t)ordered(v) << 32) | (uint64_t)(~id);
}

// The histogram bin of a finite logit `l` (row max `m`, `per_nat` bins a
// nat), or -1 past the last.
__device__ __forceinline__ int bin_of(float l, float m, float per_nat) {
  const float d = (m - l) * per_nat;
  return d < (float)BINS ? (int)d : -1;
}

// Inclusive prefix sum over the block of one value per thread, in thread
// order; `sh` holds 32 entries.
template <typename T>
__device__ T block_scan(T v, T *sh) {
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T up = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += up;
  }
  __syncthreads();
  if (lane == 31) sh[w] = v;
  __syncthreads();
  if (w == 0) {
    T t = lane < (int)(blockDim.x / 32) ? sh[lane] : (T)0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const T up = __shfl_up_sync(0xffffffffu, t, o);
      if (lane >= o) t += up;
    }
    sh[lane] = t;
  }
  __syncthreads();
  return w > 0 ? v + sh[w - 1] : v;
}

// Sorts keys[0..n) descending (n a power of two, at most 2 * blockDim.x).
__device__ void sort_desc(uint64_t *keys, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      for (int t = threadIdx.x; t < n / 2; t += blockDim.x) {
        const int lo = 2 * t - (t & (stride - 1));
        const int hi = lo + stride;
        // Descending runs where (lo & size) == 0, so that the whole ends
        // descending.
        const bool desc = (lo & size) == 0;
        const uint64_t a = keys[lo], b = keys[hi];
        if ((a < b) == desc) {
          keys[lo] = b;
          keys[hi] = a;
        }
      }
    }
  }
  __syncthreads();
}

// The token drawn from row `x` of `n` logits (or UNDECIDED), for every
// thread of the block. top_k 0: off. min_p 0, top_p 1: off. inv_t = 1 /
// temperature (> 0). Every return is the whole block's.
__device__ uint32_t sample_row(const float *x, int n, int top_k, float top_p, float min_p,
                               double inv_t, double r) {
  __shared__ unsigned long long mass[BINS];
  __shared__ uint32_t count[BINS];
  __shared__ uint64_t keys[MAX_CAND];
  // The histogram's room, reused once it is read (step 5).
  float *prob = reinterpret_cast<float *>(count);
  double *weight = reinterpret_cast<double *>(mass);
  __shared__ double dsh[32];
  __shared__ unsigned long long ush[32];
  __shared__ uint32_t csh[32];
  __shared__ float fsh[32];
  __shared__ int cut_bin, n_cand, kept;
  __shared__ uint32_t drawn;
  __shared__ double total_sh;

  const int t = threadIdx.x;
  const int lane = t % 32, w = t / 32;

  // 1. Max, min and finite count.
  float m = -INFINITY, lo = INFINITY;
  uint32_t finite = 0;
  each_finite(x, n, [&](int, float l) {
    m = fmaxf(m, l);
    lo = fminf(lo, l);
    finite++;
  });
  const float m_own = m;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    finite += __shfl_xor_sync(0xffffffffu, finite, o);
  }
  __shared__ float lo_sh[32];
  if (lane == 0) {
    fsh[w] = m;
    lo_sh[w] = lo;
    csh[w] = finite;
  }
  for (int b = t; b < BINS; b += THREADS) {
    mass[b] = 0;
    count[b] = 0;
  }
  __syncthreads();
  m = -INFINITY;
  lo = INFINITY;
  finite = 0;
  for (int i = 0; i < THREADS / 32; i++) {
    m = fmaxf(m, fsh[i]);
    lo = fminf(lo, lo_sh[i]);
    finite += csh[i];
  }
  if (finite == 0) {
    return UNDECIDED;
  }
  const float per_nat = fminf(BINS_PER_NAT, (float)(BINS - 1) / fmaxf(m - lo, 1e-6f));
  const bool topk_on = top_k > 0 && (uint32_t)top_k < finite;

  // A top-k's floor: the k-th largest of the threads' maxima is the max of
  // k distinct tokens, so at most the row's k-th largest logit. Only tokens
  // at or above it can be among the k, and only they are counted below
  // (counting the whole bulk into a few bins cost a top-k row 3.5 times a
  // top-p row: atomics on the same shared addresses).
  float floor_k = -INFINITY;
  if (topk_on && top_k <= THREADS) {
    keys[t] = key_of(m_own, (uint32_t)t);
    sort_desc(keys, THREADS);
    floor_k = unordered((uint32_t)(keys[top_k - 1] >> 32));
  }

  // 2. The total in f64 (fixed order: strided per thread, then by thread)
  // and the histogram: counts of the tokens above the floor for a top-k,
  // mass for a top-p (what step 3 reads).
  const bool mass_on = !topk_on && top_p < 1.f;
  double total = 0.0;
  each_finite(x, n, [&](int, float l) {
    const float e = expf(l - m);
    total += (double)e;
    const int b = bin_of(l, m, per_nat);
    if (topk_on) {
      if (b >= 0 && l >= floor_k) atomicAdd(&count[b], 1u);
    } else if (mass_on && b >= 0) {
      const unsigned long long q = (unsigned long long)((double)e * FIX_E);
      if (q) atomicAdd(&mass[b], q);
    }
  });
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) total += __shfl_down_sync(0xffffffffu, total, o);
  if (lane == 0) dsh[w] = total;
  __syncthreads();
  if (t == 0) {
    double s = 0.0;
    for (int i = 0; i < THREADS / 32; i++) s += dsh[i];
    total_sh = s;
  }
  __syncthreads();
  total = total_sh;

  // 3. The last bin that may hold a survivor: top-k's k-th token, top-p's
  // mass (with a margin for the host's f32 running sum), min-p's distance.
  const int per = BINS / THREADS;
  // Past this bin exp(l - m) < min_p * e^(-1/32): below min-p's floor
  // whatever the rounding.
  const int minp_bin = !topk_on && min_p > 0.f ? (int)(-logf(min_p) * per_nat) + 2 : BINS;
  uint32_t c_own = 0;
  unsigned long long e_own = 0;
  for (int j = 0; j < per; j++) {
    c_own += count[t * per + j];
    e_own += mass[t * per + j];
  }
  const uint32_t c_incl = block_scan<uint32_t>(c_own, csh);
  const unsigned long long e_incl = block_scan<unsigned long long>(e_own, ush);
  if (t == 0) cut_bin = BINS;  // none: every bin, and what lies past them
  __syncthreads();
  int mine = BINS;
  uint32_t c_acc = c_incl - c_own;
  unsigned long long e_acc = e_incl - e_own;
  const double p_target = top_p < 1.f ? ((double)top_p + 1e-3) * total * FIX_E : -1.0;
  for (int j = 0; j < per && mine == BINS; j++) {
    const int b = t * per + j;
    c_acc += count[b];
    e_acc += mass[b];
    if (topk_on && c_acc >= (uint32_t)top_k) mine = b;
    if (!topk_on && p_target >= 0.0 && p_target < FIX_E * total && (double)e_acc >= p_target)
      mine = b;
  }
  atomicMin(&cut_bin, min(mine, minp_bin));
  __syncthreads();
  const int cut = cut_bin;
  // Every finite token a candidate: only a small row fits.
  if (cut >= BINS && finite > MAX_CAND) {
    return UNDECIDED;
  }

  // 4. The candidates, sorted.
  if (t == 0) n_cand = 0;
  __syncthreads();
  each_finite(x, n, [&](int i, float l) {
    const int b = bin_of(l, m, per_nat);
    if (cut >= BINS || (b >= 0 && b <= cut)) {
      const int at = atomicAdd(&n_cand, 1);
      if (at < MAX_CAND) keys[at] = key_of(l, (uint32_t)i);
    }
  });
  __syncthreads();
  const int nc = n_cand;
  if (nc > MAX_CAND) {
    return UNDECIDED;
  }
  int padded = 2;
  while (padded < nc) padded <<= 1;
  for (int i = nc + t; i < padded; i += THREADS) keys[i] = 0;
  sort_desc(keys, padded);
  const bool all = (uint32_t)nc == finite;

  // 5. The host's steps. Top-k, then probabilities over what is left.
  int klen = nc;
  if (top_k > 0) {
    if ((uint32_t)top_k < finite) {
      if (nc < top_k) {
        return UNDECIDED;
      }
      klen = top_k;
    } else if (!all) {
      return UNDECIDED;
    }
    // The host sums the kept tokens' exponentials in its sorted order.
    for (int i = t; i < klen; i += THREADS) prob[i] = expf(unordered((uint32_t)(keys[i] >> 32)) - m);
    __syncthreads();
    if (t == 0) {
      double s = 0.0;
      for (int i = 0; i < klen; i++) s += (double)prob[i];
      total_sh = s;
    }
    __syncthreads();
    total = total_sh;
  } else {
    for (int i = t; i < klen; i += THREADS) prob[i] = expf(unordered((uint32_t)(keys[i] >> 32)) - m);
  }
  __syncthreads();
  // Probabilities as f32, re-sorted by (probability desc, id asc): the
  // host's order for min-p and top-p (distinct logits can round to one).
  for (int i = t; i < klen; i += THREADS) {
    const float p = (float)((double)prob[i] / total);
    keys[i] = key_of(p, ~(uint32_t)keys[i]);
  }
  for (int i = klen + t; i < padded; i += THREADS) keys[i] = 0;
  sort_desc(keys, padded);
  for (int i = t; i < klen; i += THREADS) prob[i] = unordered((uint32_t)(keys[i] >> 32));
  __syncthreads();
  // Min-p keeps a prefix (descending order).
  const float floor_p = min_p * (float)(1.0 / total);
  uint32_t below = 0;
  if (min_p > 0.f)
    for (int i = t; i < klen; i += THREADS) below += prob[i] < floor_p;
  const uint32_t below_all = block_scan<uint32_t>(below, csh);
  __syncthreads();
  if (t == THREADS - 1) kept = klen - (int)below_all;
  __syncthreads();
  const int mlen = kept;
  // Top-p: the host's running f32 sum, in order.
  if (t == 0) {
    int plen = mlen;
    bool reached = false;
    if (top_p < 1.f) {
      float acc = 0.f;
      for (int i = 0; i < mlen; i++) {
        acc += prob[i];
        if (acc >= top_p) {
          plen = i + 1;
          reached = true;
          break;
        }
      }
    }
    // Decided only if what lies past the candidates cannot matter.
    const bool decided = all || topk_on || mlen < klen || reached ||
                         (minp_bin < BINS && cut == minp_bin);
    kept = decided ? plen : -1;
  }
  __syncthreads();
  const int len = kept;
  if (len <= 0) {
    return UNDECIDED;
  }
  // Without top-k or top-p the host never sorts: it walks in id order.
  if (top_k == 0 && top_p >= 1.f) {
    for (int i = t; i < padded; i += THREADS)
      keys[i] = i < len ? ((uint64_t)(uint32_t)keys[i] << 32) | __float_as_uint(prob[i]) : 0;
    sort_desc(keys, padded);
    for (int i = t; i < len; i += THREADS) {
      prob[i] = __uint_as_float((uint32_t)keys[i]);
      keys[i] >>= 32;
    }
    __syncthreads();
  }
  // Temperature on what is left, then the walk to r * sum.
  for (int i = t; i < len; i += THREADS) weight[i] = pow(fmax((double)prob[i], DBL_MIN), inv_t);
  __syncthreads();
  if (t == 0) {
    double sum = 0.0;
    for (int i = 0; i < len; i++) sum += weight[i];
    double left = r * sum;
    uint32_t token = ~(uint32_t)keys[len - 1];
    for (int i = 0; i < len; i++) {
      left -= weight[i];
      if (left <= 0.0) {
        token = ~(uint32_t)keys[i];
        break;
      }
    }
    drawn = token;
  }
  __syncthreads();
  return drawn;
}

// The sampled rows of a step, a block each: row b's settings are
// `draws[5b..5b+5]` = (top_k, top_p, min_p, 1 / temperature, r); a row
// with 1 / temperature 0 keeps its greedy token. A drawn token replaces
// `token[b]` (what the next step runs); `drawn[b]` gets it, or UNDECIDED
// (then `token[b]` keeps the greedy token and the host decides).
extern "C" __global__ void __launch_bounds__(THREADS)
    sample_rows_f32(const float *logits, int stride, int n, const double *draws,
                    uint32_t *token, uint32_t *drawn) {
  const int b = blockIdx.x;
  const double *d = draws + 5 * b;
  if (d[3] <= 0.0) return;
  const uint32_t t = sample_row(logits + (size_t)b * stride, n, (int)d[0], (float)d[1],
                                (float)d[2], d[3], d[4]);
  if (threadIdx.x == 0) {
    drawn[b] = t;
    if (t != UNDECIDED) token[b] = t;
  }
}
