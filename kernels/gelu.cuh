// What the GELU kernels (gelu.cu) share with their launcher, src/kernels/cuda/gelu.rs:
// GeluParams, the one kernel argument of every entry point in gelu.cu (the ABI), mirrored
// field for field there; and the tanh GELU itself, which bias.cu fuses after a bias.
#pragma once

#include "common.cuh"

// All tensors contiguous, n elements, in the entry point's dtype.
struct GeluParams {
  const void *x;
  const void *dy;  // backward reads
  void *out;       // forward: y; backward: dx
  long long n;
};
static_assert(sizeof(GeluParams) == 32, "GeluParams: keep in step with the Rust mirror");
static_assert(alignof(GeluParams) == 8, "GeluParams: keep in step with the Rust mirror");

namespace temper {

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

static __device__ __forceinline__ float gelu_tanh(float v) {
  const float t = tanhf(kGeluC * (v + kGeluA * v * v * v));
  return 0.5f * v * (1.f + t);
}

// d gelu_tanh / dv.
static __device__ __forceinline__ float gelu_tanh_slope(float v) {
  const float t = tanhf(kGeluC * (v + kGeluA * v * v * v));
  return 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * kGeluC * (1.f + 3.f * kGeluA * v * v);
}

}  // namespace temper
