// What the RMSNorm kernels (rmsnorm.cu) share with their launcher,
// src/kernels/cuda/rmsnorm.rs: RmsNormParams, the one kernel argument of every rmsnorm entry
// point (the ABI), mirrored field for field by `RmsNormParams` there.
#pragma once

#include "common.cuh"

// One struct for the family, passed by value; a kernel reads only the fields its comment
// names. Pointers to tensors of the storage dtype T are `void *` (the dtype is the entry
// point's suffix). Field order and types must match the Rust `#[repr(C)]` mirror exactly.
struct RmsNormParams {
  const void *x;      // [rows, cols] input                 fwd, bwd
  const void *w;      // [cols] gain: of T, or f32 (_wf32)  fwd, bwd
  void *y;            // [rows, cols] output                fwd writes
  float *rstd;        // [rows] 1 / rms per row             fwd writes, bwd reads
  const void *dy;     // [rows, cols] gradient of y         bwd
  void *dx;           // [rows, cols] gradient of x         bwd writes
  float *dw_partial;  // [groups, cols] per-block dw rows   bwd writes, dw_reduce reads
  void *dw;           // [cols] gradient of w               dw_reduce writes
  const void *r;      // [rows, cols] residual added to x first, or null     fwd
  void *s;            // [rows, cols] x + r, rounded to T (when r is set)    fwd writes
  const void *ds;     // [rows, cols] added to dx, or null                   bwd
  int rows;           // rows (the backward's grid-stride bound)
  int cols;           // row length
  int groups;         // backward blocks = partial rows     dw_reduce
  float eps;          // added to the mean square           fwd
  float w_offset;     // added to every gain in f32: 1 for gains held as offsets from one  fwd, bwd
};
static_assert(sizeof(RmsNormParams) == 112, "RmsNormParams: keep in step with the Rust mirror");
static_assert(alignof(RmsNormParams) == 8, "RmsNormParams: keep in step with the Rust mirror");
