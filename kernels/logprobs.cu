// The loss head's softmax: per-token log-probabilities of the targets and their gradient,
// one block per row, straight from logits in their own dtype (bf16 on a GPU) with f32 maths
// in registers. Nothing of size [rows, vocab] is written but the gradient itself, in the
// logits' dtype: the f32 log-softmax the reference materialises (3.3 GB for GPT-2 at B16
// T1024) never exists.
//   forward:  one pass, online max and sum (m, s): logp = x[t] - (m + log s); lse saved
//   backward: dx_j = g * ([j == t] - exp(x_j - lse)); rows with g == 0 write zeros
// A target outside the vocabulary gives logp = NaN, which stops training with a clear error.
// Every formula reads the shaped logit y = shape(x) (LogprobsParams::cap, inv_temp), and the
// backward's dx_j is dy_j times shape'(x_j) = inv_temp (1 - tanh^2(x_j / cap)), or inv_temp
// without a cap: the capped f32 [rows, vocab] tensor never exists either.
// Where asked (entropy non-null), the same pass gives the softmax's entropy: the running
// triple (m, s, u) adds u = sum exp(x - m) (x - m), so H = log s - u / s, every term measured
// from the max (no cancellation at logits of large magnitude); its gradient term is
//   dx_j += gH * p_j * (-(x_j - lse) - H),   p_j = exp(x_j - lse) (0 where p_j is 0).
#include "logprobs.cuh"
#include "mma_ptx.cuh"

namespace {

using temper::from_f32;
using temper::kLog2e;
using temper::to_f32;

constexpr int kThreads = 256;

// The running softmax statistics of a run of logits: their max m, s = sum exp(x - m) and
// u = sum exp(x - m) (x - m). Empty: (-inf, 0, 0).
struct Stats {
  float m, s, u;
};

// Re-measures `a` from the max `mx` >= a.m: each term's exp scales by e = exp(a.m - mx) and
// its (x - m) shifts by d = a.m - mx.
__device__ __forceinline__ void rebase(Stats &a, float mx) {
  if (a.m == -INFINITY) {
    a = {mx, 0.f, 0.f};
    return;
  }
  const float d = a.m - mx, e = expf(d);
  a.u = (a.u + d * a.s) * e;
  a.s *= e;
  a.m = mx;
}

// Merges the statistics of two runs; an empty side changes nothing.
__device__ __forceinline__ void merge(Stats &a, Stats b) {
  if (b.m == -INFINITY) return;
  if (a.m == -INFINITY) {
    a = b;
    return;
  }
  const float mx = fmaxf(a.m, b.m);
  rebase(a, mx);
  rebase(b, mx);
  a.s += b.s;
  a.u += b.u;
}

// Adds a run of values, already max-reduced to `cm`, to the running statistics: one rebase
// at most, then exp(v - m) per value (a -inf value adds nothing to u, where 0 * -inf is NaN).
// U: u is wanted (an entropy was asked for). Without it u stays 0: the forward looks bound
// by its instructions per logit, and (m, s) do not depend on u.
// exp(v - m) is 2^((v - m) log2 e) in one ex2.approx: expf's accurate path made a logit cost
// ~14 instructions instead of ~9 (19 instead of 13 with u; SASS, sm_90), which may be what
// held the bf16 forward near 2.5 TB/s. The difference is taken first (exact near the max, by
// Sterbenz), so each term's error is relative to its own distance from the max plus the
// approximation's 2 ulp, and the terms that carry the sum are as accurate as expf's.
// (2^(v log2 e - m log2 e) in one FFMA would save the subtraction, but m log2 e rounded at
// |m| ~ 100 moves every term by ~5e-6.) rebase keeps expf (once a chunk at most).
template <int E, bool U>
__device__ __forceinline__ void add_chunk(Stats &a, const float (&v)[E], float cm) {
  if (cm == -INFINITY) return;  // all -inf: nothing to add (and exp(-inf - -inf) is NaN)
  if (cm > a.m) rebase(a, cm);
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const float d = v[i] - a.m, e = temper::exp2_ftz(d * kLog2e);
    a.s += e;
    if constexpr (U) a.u += e > 0.f ? e * d : 0.f;
  }
}

// The logit the softmax reads (see LogprobsParams::cap).
__device__ __forceinline__ float shaped(float x, const LogprobsParams &p) {
  return (p.cap > 0.f ? p.cap * tanhf(x / p.cap) : x) * p.inv_temp;
}

// d shaped(x) / dx.
__device__ __forceinline__ float shaped_slope(float x, const LogprobsParams &p) {
  if (p.cap <= 0.f) return p.inv_temp;
  const float t = tanhf(x / p.cap);
  return p.inv_temp * (1.f - t * t);
}

__device__ __forceinline__ Stats shuffle_merge(Stats a) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const Stats b = {__shfl_xor_sync(0xffffffffu, a.m, o), __shfl_xor_sync(0xffffffffu, a.s, o),
                     __shfl_xor_sync(0xffffffffu, a.u, o)};
    merge(a, b);
  }
  return a;
}

// Reduces the block's statistics and writes the row's lse, the target's log-probability and,
// where asked, the entropy.
template <typename T>
__device__ void finish_row(Stats a, const T *x, int row, const LogprobsParams &p) {
  __shared__ float sm[32], ss[32], su[32];
  a = shuffle_merge(a);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sm[warp] = a.m;
    ss[warp] = a.s;
    su[warp] = a.u;
  }
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x >> 5;
    a = lane < nwarps ? Stats{sm[lane], ss[lane], su[lane]} : Stats{-INFINITY, 0.f, 0.f};
    a = shuffle_merge(a);
    if (lane == 0) {
      const float log_s = logf(a.s);
      const float lse = a.m + log_s;
      const unsigned int t = p.targets[row];
      p.lse[row] = lse;
      p.logp[row] = t < (unsigned int)p.vocab ? shaped(to_f32(x[t]), p) - lse
                                              : __int_as_float(0x7fc00000);
      if (p.entropy != nullptr) p.entropy[row] = log_s - a.u / a.s;
    }
  }
}

template <typename T, bool U> __device__ void forward(const LogprobsParams &p) {
  const int row = blockIdx.x;
  const T *x = static_cast<const T *>(p.logits) + (size_t)row * p.vocab;
  Stats a{-INFINITY, 0.f, 0.f};
  for (int j = threadIdx.x; j < p.vocab; j += blockDim.x) {
    const float v[1] = {shaped(to_f32(x[j]), p)};
    add_chunk<1, U>(a, v, v[0]);
  }
  finish_row<T>(a, x, row, p);
}

// The forward with 16-byte loads (a vocabulary a multiple of 16 bytes, aligned rows; the
// launcher checks): each chunk's max first, so a chunk costs one rescale at most.
template <typename T, bool U> __device__ void forward_vec(const LogprobsParams &p) {
  using V = temper::Vec16<T>;
  constexpr int E = V::N;
  const int row = blockIdx.x;
  const T *x = static_cast<const T *>(p.logits) + (size_t)row * p.vocab;
  const V *xv = reinterpret_cast<const V *>(x);
  const int chunks = p.vocab / E;
  Stats a{-INFINITY, 0.f, 0.f};
#pragma unroll 2
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    const V w = xv[c];
    float v[E];
    float cm = -INFINITY;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      v[i] = shaped(to_f32(w.v[i]), p);
      cm = fmaxf(cm, v[i]);
    }
    add_chunk<E, U>(a, v, cm);
  }
  finish_row<T>(a, x, row, p);
}

// The row's upstream gradients and what their terms read: g (of logp), gh (of the entropy;
// 0 without one) and the entropy itself.
struct RowGrad {
  float g, gh, h, lse;
  unsigned int t;
};

__device__ __forceinline__ RowGrad row_grad(const LogprobsParams &p, int row) {
  const bool ent = p.dentropy != nullptr;
  return {p.dlogp[row], ent ? p.dentropy[row] : 0.f, ent ? p.entropy[row] : 0.f, p.lse[row],
          p.targets[row]};
}

// dx_j for logit x at index j.
__device__ __forceinline__ float grad_at(const RowGrad &r, unsigned int j, float x,
                                         const LogprobsParams &p) {
  const float z = shaped(x, p) - r.lse, pj = expf(z);
  float d = r.g * ((j == r.t ? 1.f : 0.f) - pj);
  if (r.gh != 0.f && pj > 0.f) d -= r.gh * pj * (z + r.h);
  return d * shaped_slope(x, p);
}

template <typename T> __device__ void backward(const LogprobsParams &p) {
  const int row = blockIdx.x;
  const T *x = static_cast<const T *>(p.logits) + (size_t)row * p.vocab;
  T *dx = static_cast<T *>(p.dlogits) + (size_t)row * p.vocab;
  const RowGrad r = row_grad(p, row);
  const bool live = r.g != 0.f || r.gh != 0.f;
  for (int j = threadIdx.x; j < p.vocab; j += blockDim.x) {
    const float d = live ? grad_at(r, (unsigned int)j, to_f32(x[j]), p) : 0.f;
    dx[j] = from_f32<T>(d);
  }
}

// The backward with 16-byte accesses (see forward_vec); each chunk is read and written by
// one thread, so dlogits may be the logits' own buffer.
template <typename T> __device__ void backward_vec(const LogprobsParams &p) {
  using V = temper::Vec16<T>;
  constexpr int E = V::N;
  const int row = blockIdx.x;
  const V *x = reinterpret_cast<const V *>(static_cast<const T *>(p.logits) + (size_t)row * p.vocab);
  V *dx = reinterpret_cast<V *>(static_cast<T *>(p.dlogits) + (size_t)row * p.vocab);
  const RowGrad r = row_grad(p, row);
  const bool live = r.g != 0.f || r.gh != 0.f;
  const int chunks = p.vocab / E;
#pragma unroll 2
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    V o;
    if (live) {
      const V a = x[c];
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const unsigned int j = (unsigned int)(c * E + i);
        o.v[i] = from_f32<T>(grad_at(r, j, to_f32(a.v[i]), p));
      }
    } else {
#pragma unroll
      for (int i = 0; i < E; ++i) o.v[i] = from_f32<T>(0.f);
    }
    dx[c] = o;
  }
}

}  // namespace

#define LOGPROBS_ENTRY(SUFFIX, T)                                                         \
  extern "C" __global__ void __launch_bounds__(kThreads)                                  \
      logprobs_fwd_##SUFFIX(const LogprobsParams p) {                                     \
    if (p.entropy != nullptr)                                                             \
      forward<T, true>(p);                                                                \
    else                                                                                  \
      forward<T, false>(p);                                                               \
  }                                                                                       \
  extern "C" __global__ void __launch_bounds__(kThreads)                                  \
      logprobs_bwd_##SUFFIX(const LogprobsParams p) {                                     \
    backward<T>(p);                                                                       \
  }                                                                                       \
  extern "C" __global__ void __launch_bounds__(kThreads)                                  \
      logprobs_fwd_vec_##SUFFIX(const LogprobsParams p) {                                 \
    if (p.entropy != nullptr)                                                             \
      forward_vec<T, true>(p);                                                            \
    else                                                                                  \
      forward_vec<T, false>(p);                                                           \
  }                                                                                       \
  extern "C" __global__ void __launch_bounds__(kThreads)                                  \
      logprobs_bwd_vec_##SUFFIX(const LogprobsParams p) {                                 \
    backward_vec<T>(p);                                                                   \
  }

LOGPROBS_ENTRY(f32, float)
LOGPROBS_ENTRY(bf16, __nv_bfloat16)
LOGPROBS_ENTRY(f16, __half)
