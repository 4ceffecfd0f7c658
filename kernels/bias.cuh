// What the bias kernels (bias.cu) share with their launcher, src/kernels/cuda/bias.rs:
// BiasParams, the one kernel argument of every entry point in bias.cu (the ABI), mirrored
// field for field there.
#pragma once

#include "common.cuh"

// The activation applied after the bias (BiasAct in src/kernels/bias.rs).
enum BiasAct : int { kIdentity = 0, kGeluTanh = 1 };

// y, out and dy are [rows, cols] row-major in the entry point's dtype; the bias and its
// gradient are f32 [cols] (the master weights).
struct BiasParams {
  const void *y;      // the GEMM's output, before its bias
  const float *b;     // [cols]
  const void *dy;     // backward reads
  void *out;          // forward: act(y + b); backward: dL/dy (null: identity, nothing to write)
  float *partial;     // [groups, cols] backward: each group's column sums
  float *db;          // [cols] reduce writes
  long long n;        // rows * cols
  int rows;
  int cols;
  int groups;         // backward blocks along the rows (grid.y)
  int act;            // BiasAct
};
static_assert(sizeof(BiasParams) == 72, "BiasParams: keep in step with the Rust mirror");
static_assert(alignof(BiasParams) == 8, "BiasParams: keep in step with the Rust mirror");
