// What the LayerNorm kernels (layernorm.cu) share with their launcher,
// src/kernels/cuda/layernorm.rs: LayerNormParams, the one kernel argument of every entry point
// in layernorm.cu (the ABI), mirrored field for field there.
#pragma once

#include "common.cuh"

// x, y, dy, dx (and r, s, ds) are [rows, cols] row-major in the entry point's dtype; w, b and
// the gradients of w and b are f32 [cols] (the master weights); statistics are f32 [rows].
// With a residual r, the forward normalises s = x + r (rounded to the dtype, as a separate
// add would) and writes s too (the launcher puts s after y in one buffer); with ds, the backward adds it to dx (the residual stream's
// gradient, which would otherwise take its own pass).
struct LayerNormParams {
  const void *x;
  const float *w;
  const float *b;
  void *y;            // forward writes
  float *mean;        // [rows] forward writes, backward reads
  float *rstd;        // [rows] forward writes, backward reads
  const void *dy;     // backward reads
  void *dx;           // backward writes
  float *partial;     // [groups, 2, cols] backward: each group's dw and db, zeroed
  float *dw;          // [cols] reduce writes
  float *db;          // [cols] reduce writes
  const void *r;      // forward: the residual added to x first, or null
  void *s;            // forward writes x + r when r is set
  const void *ds;     // backward: added to dx, or null
  int rows;
  int cols;
  int groups;         // backward blocks (each takes rows blockIdx.x, + groups, ...)
  float eps;
};
static_assert(sizeof(LayerNormParams) == 128, "LayerNormParams: keep in step with the Rust mirror");
static_assert(alignof(LayerNormParams) == 8, "LayerNormParams: keep in step with the Rust mirror");
