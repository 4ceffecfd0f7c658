// What the GAE / GRPO kernels (gae.cu) share with their launcher, src/kernels/cuda/gae.rs:
// GaeParams, the one kernel argument of every entry point in gae.cu (the ABI), mirrored
// field for field by `GaeParams` there.
#pragma once

#include "common.cuh"

// One struct for the family, passed by value; a kernel reads only the fields its comment
// names. All tensors are f32 ([B, T] row-major for the scan, [n_groups * group] for the
// group normalisation). Field order and types must match the Rust `#[repr(C)]` mirror.
struct GaeParams {
  const float *rewards;   // [B, T] scan; [n_groups * group] group norm
  const float *values;    // [B, T] scan
  const float *mask;      // [B, T] scan: 0 = padding (ends an episode)
  float *adv;             // [B, T] advantages, scan writes
  float *ret;             // [B, T] returns, scan writes
  double *partials;       // [3 * B] per-block (count, sum, sum of squares), scan
  unsigned int *counter;  // one counter, zero at launch, scan
  double *stats;          // [3] (count, mean, unbiased var), scan writes
  float *out;             // [n_groups * group] normalised rewards, group norm writes
  double eps;             // group norm: added to the std
  int t;                  // scan: steps per row (T)
  int n_groups;           // group norm: number of groups
  int group;              // group norm: rewards per group
  float gamma;            // scan: discount
  float gl;               // scan: gamma * lambda, rounded as the reference rounds it
  int pad_;               // explicit tail padding (keeps the layout free of holes)
};
static_assert(sizeof(GaeParams) == 104, "GaeParams: keep in step with the Rust mirror");
static_assert(alignof(GaeParams) == 8, "GaeParams: keep in step with the Rust mirror");
