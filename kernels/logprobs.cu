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

template <typename T> __device__ void forward(const LogprobsParams &p) {
  __shared__ float sm[32], ss[32];
  const int row = blockIdx.x;
  const T *x = static_cast<const T *>(p.logits) + (size_t)row * p.vocab;
  float m = -INFINITY, s = 0.f;
  for (int j = threadIdx.x; j < p.vocab; j += blockDim.x) {
    const float v = to_f32(x[j]);
    // A -inf logit adds nothing, and exp(-inf - -inf) would be NaN.
    if (v == -INFINITY) continue;
    if (v > m) {
      s = s * expf(m - v) + 1.f;
      m = v;
    } else {
      s += expf(v - m);
    }
  }
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

}  // namespace

#define LOGPROBS_ENTRY(SUFFIX, T)                                                         \
  extern "C" __global__ void __launch_bounds__(kThreads)                                  \
      logprobs_fwd_##SUFFIX(const LogprobsParams p) {                                     \
    forward<T>(p);                                                                        \
  }                                                                                       \
  extern "C" __global__ void __launch_bounds__(kThreads)                                  \
      logprobs_bwd_##SUFFIX(const LogprobsParams p) {                                     \
    backward<T>(p);                                                                       \
  }

LOGPROBS_ENTRY(f32, float)
LOGPROBS_ENTRY(bf16, __nv_bfloat16)
LOGPROBS_ENTRY(f16, __half)
