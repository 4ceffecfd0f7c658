// GELU with GPT-2's tanh approximation, y = x/2 (1 + tanh(c (x + 0.044715 x^3))), and its
// derivative, one grid-stride pass each in f32 arithmetic: the reference composes eight
// elementwise launches forward (and more backward) over the [B, T, 4H] activation.
#include "gelu.cuh"

namespace {

using temper::from_f32;
using temper::gelu_tanh;
using temper::gelu_tanh_slope;
using temper::to_f32;

template <typename T> __device__ void forward(const GeluParams &p) {
  const T *x = static_cast<const T *>(p.x);
  T *y = static_cast<T *>(p.out);
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < p.n;
       i += (long long)gridDim.x * blockDim.x) {
    y[i] = from_f32<T>(gelu_tanh(to_f32(x[i])));
  }
}

template <typename T> __device__ void backward(const GeluParams &p) {
  const T *x = static_cast<const T *>(p.x);
  const T *dy = static_cast<const T *>(p.dy);
  T *dx = static_cast<T *>(p.out);
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < p.n;
       i += (long long)gridDim.x * blockDim.x) {
    dx[i] = from_f32<T>(to_f32(dy[i]) * gelu_tanh_slope(to_f32(x[i])));
  }
}

}  // namespace

#define GELU_ENTRY(SUFFIX, T)                                                                  \
  extern "C" __global__ void gelu_fwd_##SUFFIX(const GeluParams p) { forward<T>(p); }          \
  extern "C" __global__ void gelu_bwd_##SUFFIX(const GeluParams p) { backward<T>(p); }

GELU_ENTRY(f32, float)
GELU_ENTRY(bf16, __nv_bfloat16)
GELU_ENTRY(f16, __half)
