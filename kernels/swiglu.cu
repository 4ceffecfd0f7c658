// Gated activations, y = a(g) * u, and both their gradients, one grid-stride pass each in f32
// arithmetic: SwiGLU (swiglu_*, a = silu, g sigmoid(g); Llama, Qwen, Mistral) and GeGLU
// (geglu_*, a = GELU's tanh approximation; Gemma). candle's composite is two launches forward
// and about ten backward over the [B, T, intermediate] activations.
//
// sigmoid is 1 / (1 + exp(-g)): for g very negative exp overflows to inf and sigmoid is 0,
// for g very positive exp underflows to 0 and sigmoid is 1, so no input yields a NaN.
#include "swiglu.cuh"
#include "gelu.cuh"

namespace {

using temper::from_f32;
using temper::to_f32;

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

// The gate's activation a(g) and its slope a'(g): SwiGLU's silu, GeGLU's tanh GELU (Gemma).
struct Silu {
  static __device__ __forceinline__ float act(float g) { return g * sigmoid(g); }
  static __device__ __forceinline__ float slope(float g) {
    const float s = sigmoid(g);
    return s * (1.f + g * (1.f - s));
  }
};
struct GeluTanh {
  static __device__ __forceinline__ float act(float g) { return temper::gelu_tanh(g); }
  static __device__ __forceinline__ float slope(float g) { return temper::gelu_tanh_slope(g); }
};

template <typename A, typename T> __device__ void forward(const SwiGluParams &p) {
  const T *g = static_cast<const T *>(p.g);
  const T *u = static_cast<const T *>(p.u);
  T *y = static_cast<T *>(p.out);
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < p.n;
       i += (long long)gridDim.x * blockDim.x) {
    y[i] = from_f32<T>(A::act(to_f32(g[i])) * to_f32(u[i]));
  }
}

// One pass writes both gradients, so g, u and dy are read once: dg = dy u a'(g), du = dy a(g).
template <typename A, typename T> __device__ void backward(const SwiGluParams &p) {
  const T *g = static_cast<const T *>(p.g);
  const T *u = static_cast<const T *>(p.u);
  const T *dy = static_cast<const T *>(p.dy);
  T *dg = static_cast<T *>(p.out);
  T *du = dg + p.n;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < p.n;
       i += (long long)gridDim.x * blockDim.x) {
    const float v = to_f32(g[i]);
    const float d = to_f32(dy[i]);
    dg[i] = from_f32<T>(d * to_f32(u[i]) * A::slope(v));
    du[i] = from_f32<T>(d * A::act(v));
  }
}

// The same passes over 16-byte chunks, for n a multiple of the chunk and aligned bases (the
// launcher checks).
template <typename A, typename T> __device__ void forward_vec(const SwiGluParams &p) {
  using V = temper::Vec16<T>;
  constexpr int E = V::N;
  const V *g = static_cast<const V *>(p.g);
  const V *u = static_cast<const V *>(p.u);
  V *y = static_cast<V *>(p.out);
  const long long n = p.n / E;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const V a = g[i], b = u[i];
    V o;
#pragma unroll
    for (int e = 0; e < E; ++e) o.v[e] = from_f32<T>(A::act(to_f32(a.v[e])) * to_f32(b.v[e]));
    y[i] = o;
  }
}

template <typename A, typename T> __device__ void backward_vec(const SwiGluParams &p) {
  using V = temper::Vec16<T>;
  constexpr int E = V::N;
  const V *g = static_cast<const V *>(p.g);
  const V *u = static_cast<const V *>(p.u);
  const V *dy = static_cast<const V *>(p.dy);
  V *dg = static_cast<V *>(p.out);
  V *du = reinterpret_cast<V *>(static_cast<T *>(p.out) + p.n);
  const long long n = p.n / E;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const V a = g[i], b = u[i], c = dy[i];
    V og, ou;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const float v = to_f32(a.v[e]);
      const float d = to_f32(c.v[e]);
      og.v[e] = from_f32<T>(d * to_f32(b.v[e]) * A::slope(v));
      ou.v[e] = from_f32<T>(d * A::act(v));
    }
    dg[i] = og;
    du[i] = ou;
  }
}

}  // namespace

#define GATED_ENTRY(NAME, ACT, SUFFIX, T)                                                      \
  extern "C" __global__ void NAME##_fwd_##SUFFIX(const SwiGluParams p) { forward<ACT, T>(p); }  \
  extern "C" __global__ void NAME##_bwd_##SUFFIX(const SwiGluParams p) { backward<ACT, T>(p); } \
  extern "C" __global__ void NAME##_fwd_vec_##SUFFIX(const SwiGluParams p) {                   \
    forward_vec<ACT, T>(p);                                                                    \
  }                                                                                            \
  extern "C" __global__ void NAME##_bwd_vec_##SUFFIX(const SwiGluParams p) {                   \
    backward_vec<ACT, T>(p);                                                                   \
  }

GATED_ENTRY(swiglu, Silu, f32, float)
GATED_ENTRY(swiglu, Silu, bf16, __nv_bfloat16)
GATED_ENTRY(swiglu, Silu, f16, __half)
GATED_ENTRY(geglu, GeluTanh, f32, float)
GATED_ENTRY(geglu, GeluTanh, bf16, __nv_bfloat16)
GATED_ENTRY(geglu, GeluTanh, f16, __half)
