// What the head-layout kernel (heads.cu) shares with its launcher, src/kernels/cuda/heads.rs:
// HeadsParams, the one kernel argument of every entry point in heads.cu (the ABI), mirrored
// field for field there.
#pragma once

#include "common.cuh"

// A contiguous [B, P, Q, row] tensor copied into a contiguous [B, Q, P, row] one, moved in
// units of 2, 4, 8 or 16 bytes (the entry point's suffix): the permutation does not depend
// on the dtype, only on how many bytes a row of `row_units` units holds.
struct HeadsParams {
  const void *input;  // [B, P, Q, row]
  void *out;          // [B, Q, P, row]
  int units;          // B * P * Q * row_units, below 2^31
  int p;              // P
  int q;              // Q
  int row_units;      // one row (a head's d elements) in units
};
static_assert(sizeof(HeadsParams) == 32, "HeadsParams: keep in step with the Rust mirror");
static_assert(alignof(HeadsParams) == 8, "HeadsParams: keep in step with the Rust mirror");
