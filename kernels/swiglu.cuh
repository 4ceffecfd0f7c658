// What the SwiGLU kernels (swiglu.cu) share with their launcher, src/kernels/cuda/swiglu.rs:
// SwiGluParams, the one kernel argument of every entry point in swiglu.cu (the ABI),
// mirrored field for field there.
#pragma once

#include "common.cuh"

// All tensors contiguous, in the entry point's dtype; g, u and dy hold n elements.
struct SwiGluParams {
  const void *g;   // gate projection
  const void *u;   // up projection
  const void *dy;  // backward reads
  void *out;       // forward: y [n]; backward: [dg (n) | du (n)]
  long long n;
};
static_assert(sizeof(SwiGluParams) == 40, "SwiGluParams: keep in step with the Rust mirror");
static_assert(alignof(SwiGluParams) == 8, "SwiGluParams: keep in step with the Rust mirror");
