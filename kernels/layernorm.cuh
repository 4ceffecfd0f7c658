// What the LayerNorm kernels (layernorm.cu) share with their launcher,
// src/kernels/cuda/layernorm.rs: LayerNormParams, the one kernel argument of every entry point
// in layernorm.cu (the ABI), mirrored field for field there.
#pragma once

#include "common.cuh"

// x, y, dy, dx are [rows, cols] row-major in the entry point's dtype; w, b and the gradients
// of w and b are f32 [cols] (the master weights); statistics are f32 [rows].
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
  int rows;
  int cols;
  int groups;         // backward blocks (each takes rows blockIdx.x, + groups, ...)
  float eps;
};
static_assert(sizeof(LayerNormParams) == 104, "LayerNormParams: keep in step with the Rust mirror");
static_assert(alignof(LayerNormParams) == 8, "LayerNormParams: keep in step with the Rust mirror");
