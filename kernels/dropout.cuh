// What the dropout kernel (dropout.cu) shares with its launcher, src/kernels/cuda/dropout.rs:
// DropoutParams, the one kernel argument of every entry point in dropout.cu (the ABI),
// mirrored field for field there.
#pragma once

#include "common.cuh"

// Element i is kept when the top 24 bits of splitmix64(seed + i * golden) are at least
// `threshold` (p * 2^24, rounded); a kept element is multiplied by `scale`. The forward reads
// x and the backward dy: the same mask applies to both, so neither stores it.
struct DropoutParams {
  const void *x;                // x (forward) or dy (backward), n elements
  void *out;                    // n elements
  long long n;
  unsigned long long seed;
  unsigned int threshold;       // keep when (hash >> 40) >= threshold
  float scale;                  // 1 / (1 - p), already rounded to the entry point's dtype
};
static_assert(sizeof(DropoutParams) == 40, "DropoutParams: keep in step with the Rust mirror");
static_assert(alignof(DropoutParams) == 8, "DropoutParams: keep in step with the Rust mirror");
