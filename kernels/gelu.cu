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

// The same passes over 16-byte chunks, for n a multiple of the chunk and aligned bases (the
// launcher checks).
template <typename T> __device__ void forward_vec(const GeluParams &p) {
  using V = temper::Vec16<T>;
  constexpr int E = V::N;
  const V *x = static_cast<const V *>(p.x);
  V *y = static_cast<V *>(p.out);
  const long long n = p.n / E;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const V a = x[i];
    V o;
#pragma unroll
    for (int e = 0; e < E; ++e) o.v[e] = from_f32<T>(gelu_tanh(to_f32(a.v[e])));
    y[i] = o;
  }
}

template <typename T> __device__ void backward_vec(const GeluParams &p) {
  using V = temper::Vec16<T>;
  constexpr int E = V::N;
  const V *x = static_cast<const V *>(p.x);
  const V *dy = static_cast<const V *>(p.dy);
  V *dx = static_cast<V *>(p.out);
  const long long n = p.n / E;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const V a = x[i], d = dy[i];
    V o;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      o.v[e] = from_f32<T>(to_f32(d.v[e]) * gelu_tanh_slope(to_f32(a.v[e])));
    }
    dx[i] = o;
  }
}

}  // namespace

#define GELU_ENTRY(SUFFIX, T)                                                                  \
  extern "C" __global__ void gelu_fwd_##SUFFIX(const GeluParams p) { forward<T>(p); }          \
  extern "C" __global__ void gelu_bwd_##SUFFIX(const GeluParams p) { backward<T>(p); }          \
  extern "C" __global__ void gelu_fwd_vec_##SUFFIX(const GeluParams p) { forward_vec<T>(p); }  \
  extern "C" __global__ void gelu_bwd_vec_##SUFFIX(const GeluParams p) { backward_vec<T>(p); }

GELU_ENTRY(f32, float)
GELU_ENTRY(bf16, __nv_bfloat16)
GELU_ENTRY(f16, __half)
