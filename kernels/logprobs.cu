// The loss head's softmax: per-token log-probabilities of the targets and their gradient,
// one block per row, straight from logits in their own dtype (bf16 on a GPU) with f32 maths
// in registers. Nothing of size [rows, vocab] is written but the gradient itself, in the
// logits' dtype: the f32 log-softmax the reference materialises (3.3 GB for GPT-2 at B16
// T1024) never exists.
//   forward:  one pass, online max and sum (m, s): logp = x[t] - (m + log s); lse saved
//   backward: dx_j = g * ([j == t] - exp(x_j - lse)); rows with g == 0 write zeros
// A target outside the vocabulary gives logp = NaN, which stops training with a clear error.
#include "logprobs.cuh"

namespace {

using temper::from_f32;
using temper::to_f32;

constexpr int kThreads = 256;

// Merges running (max, sum of exp(x - max)) pairs; an empty side is (-inf, 0).
__device__ __forceinline__ void merge(float &m, float &s, float m2, float s2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) {
    m = m2;
    s = s2;
    return;
  }
  const float mx = fmaxf(m, m2);
  s = s * expf(m - mx) + s2 * expf(m2 - mx);
  m = mx;
}

// Adds a run of values, already max-reduced to `cm`, to the running (m, s): one rescale at
// most, then exp(v - m) per value.
template <int E>
__device__ __forceinline__ void add_chunk(float &m, float &s, const float (&v)[E], float cm) {
  if (cm == -INFINITY) return;  // all -inf: nothing to add (and exp(-inf - -inf) is NaN)
  if (cm > m) {
    s = m == -INFINITY ? 0.f : s * expf(m - cm);
    m = cm;
  }
#pragma unroll
  for (int i = 0; i < E; ++i) s += expf(v[i] - m);
}

// Reduces the block's (m, s) pairs and writes the row's lse and the target's log-probability.
template <typename T>
__device__ void finish_row(float m, float s, const T *x, int row, const LogprobsParams &p) {
  __shared__ float sm[32], ss[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    merge(m, s, m2, s2);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x >> 5;
    m = lane < nwarps ? sm[lane] : -INFINITY;
    s = lane < nwarps ? ss[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
      const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
      merge(m, s, m2, s2);
    }
    if (lane == 0) {
      const float lse = m + logf(s);
      const unsigned int t = p.targets[row];
      p.lse[row] = lse;
      p.logp[row] = t < (unsigned int)p.vocab ? to_f32(x[t]) - lse : __int_as_float(0x7fc00000);
    }
  }
}

template <typename T> __device__ void forward(const LogprobsParams &p) {
  const int row = blockIdx.x;
  const T *x = static_cast<const T *>(p.logits) + (size_t)row * p.vocab;
  float m = -INFINITY, s = 0.f;
  for (int j = threadIdx.x; j < p.vocab; j += blockDim.x) {
    const float v[1] = {to_f32(x[j])};
    add_chunk<1>(m, s, v, v[0]);
  }
  finish_row<T>(m, s, x, row, p);
}

// The forward with 16-byte loads (a vocabulary a multiple of 16 bytes, aligned rows; the
// launcher checks): each chunk's max first, so a chunk costs one rescale at most.
template <typename T> __device__ void forward_vec(const LogprobsParams &p) {
  using V = temper::Vec16<T>;
  constexpr int E = V::N;
  const int row = blockIdx.x;
  const T *x = static_cast<const T *>(p.logits) + (size_t)row * p.vocab;
  const V *xv = reinterpret_cast<const V *>(x);
  const int chunks = p.vocab / E;
  float m = -INFINITY, s = 0.f;
#pragma unroll 2
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    const V a = xv[c];
    float v[E];
    float cm = -INFINITY;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      v[i] = to_f32(a.v[i]);
      cm = fmaxf(cm, v[i]);
    }
    add_chunk<E>(m, s, v, cm);
  }
  finish_row<T>(m, s, x, row, p);
}

template <typename T> __device__ void backward(const LogprobsParams &p) {
  const int row = blockIdx.x;
  const T *x = static_cast<const T *>(p.logits) + (size_t)row * p.vocab;
  T *dx = static_cast<T *>(p.dlogits) + (size_t)row * p.vocab;
  const float g = p.dlogp[row];
  const float lse = p.lse[row];
  const unsigned int t = p.targets[row];
  for (int j = threadIdx.x; j < p.vocab; j += blockDim.x) {
    float d = 0.f;
    if (g != 0.f) d = g * (((unsigned int)j == t ? 1.f : 0.f) - expf(to_f32(x[j]) - lse));
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
  const float g = p.dlogp[row];
  const float lse = p.lse[row];
  const unsigned int t = p.targets[row];
  const int chunks = p.vocab / E;
#pragma unroll 2
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    V o;
    if (g != 0.f) {
      const V a = x[c];
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const unsigned int j = (unsigned int)(c * E + i);
        o.v[i] = from_f32<T>(g * ((j == t ? 1.f : 0.f) - expf(to_f32(a.v[i]) - lse)));
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
    forward<T>(p);                                                                        \
  }                                                                                       \
  extern "C" __global__ void __launch_bounds__(kThreads)                                  \
      logprobs_bwd_##SUFFIX(const LogprobsParams p) {                                     \
    backward<T>(p);                                                                       \
  }                                                                                       \
  extern "C" __global__ void __launch_bounds__(kThreads)                                  \
      logprobs_fwd_vec_##SUFFIX(const LogprobsParams p) {                                 \
    forward_vec<T>(p);                                                                    \
  }                                                                                       \
  extern "C" __global__ void __launch_bounds__(kThreads)                                  \
      logprobs_bwd_vec_##SUFFIX(const LogprobsParams p) {                                 \
    backward_vec<T>(p);                                                                   \
  }

LOGPROBS_ENTRY(f32, float)
LOGPROBS_ENTRY(bf16, __nv_bfloat16)
LOGPROBS_ENTRY(f16, __half)
