// What the GELU kernels (gelu.cu) share with their launcher, src/kernels/cuda/gelu.rs:
// GeluParams, the one kernel argument of every entry point in gelu.cu (the ABI), mirrored
// field for field there.
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
