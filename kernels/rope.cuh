// What the rotary-embedding kernels (rope.cu) share with their launcher,
// src/kernels/cuda/rope.rs: RopeParams, the one kernel argument of every entry point in
// rope.cu (the ABI), mirrored field for field there.
#pragma once

#include "common.cuh"

// All tensors contiguous, in the entry point's dtype. x is [B, heads, seq, 2 half]; the
// tables are [B, 1, seq, half], shared by every head of a batch row.
struct RopeParams {
  const void *x;    // forward: x; backward: dy
  const void *cos;  // cos of each position's angles
  const void *sin;  // sin of each position's angles
  void *out;        // forward: the rotated x; backward: dx
  long long pairs;  // B * heads * seq * half, the grid-stride bound
  int half;         // head_dim / 2
  int heads;
  int seq;
  int pad;  // explicit, so the struct has no uninitialised bytes
};
static_assert(sizeof(RopeParams) == 56, "RopeParams: keep in step with the Rust mirror");
static_assert(alignof(RopeParams) == 8, "RopeParams: keep in step with the Rust mirror");
