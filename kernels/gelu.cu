// GELU with GPT-2's tanh approximation, y = x/2 (1 + tanh(c (x + 0.044715 x^3))), and its
// derivative, one grid-stride pass each in f32 arithmetic: the reference composes eight
// elementwise launches forward (and more backward) over the [B, T, 4H] activation.
#include "gelu.cuh"

namespace {

using temper::from_f32;
using temper::to_f32;

constexpr float kC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kA = 0.044715f;

template <typename T> __device__ void forward(const GeluParams &p) {
  const T *x = static_cast<const T *>(p.x);
  T *y = static_cast<T *>(p.out);
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < p.n;
       i += (long long)gridDim.x * blockDim.x) {
    const float v = to_f32(x[i]);
    const float t = tanhf(kC * (v + kA * v * v * v));
    y[i] = from_f32<T>(0.5f * v * (1.f + t));
  }
}

template <typename T> __device__ void backward(const GeluParams &p) {
  const T *x = static_cast<const T *>(p.x);
  const T *dy = static_cast<const T *>(p.dy);
  T *dx = static_cast<T *>(p.out);
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < p.n;
       i += (long long)gridDim.x * blockDim.x) {
    const float v = to_f32(x[i]);
    const float t = tanhf(kC * (v + kA * v * v * v));
    const float d = 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * kC * (1.f + 3.f * kA * v * v);
    dx[i] = from_f32<T>(to_f32(dy[i]) * d);
  }
}

}  // namespace

#define GELU_ENTRY(SUFFIX, T)                                                                  \
  extern "C" __global__ void gelu_fwd_##SUFFIX(const GeluParams p) { forward<T>(p); }          \
  extern "C" __global__ void gelu_bwd_##SUFFIX(const GeluParams p) { backward<T>(p); }

GELU_ENTRY(f32, float)
GELU_ENTRY(bf16, __nv_bfloat16)
GELU_ENTRY(f16, __half)
