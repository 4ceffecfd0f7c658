// What the AdamW kernels (adamw.cu) share with their launcher, src/kernels/cuda/adamw.rs:
// AdamwChunk, one row of the multi-tensor table, and AdamwParams, the one kernel argument of
// every entry point in adamw.cu (the ABI), mirrored field for field there.
#pragma once

#include "common.cuh"

// One chunk of one parameter tensor: elements [start, start + len) of it. Every parameter is
// cut into chunks of at most kChunk elements, so that one launch covers every tensor with
// blocks of even size. All tensors are contiguous; weights and moments are f32.
struct AdamwChunk {
  float *p;              // master weights, updated in place
  float *m;              // first moment, in place
  float *v;              // second moment, in place
  const void *g;         // gradient: f32, or bf16 (a compute copy's) when g_bf16
  __nv_bfloat16 *copy;   // the weight's bf16 compute copy, rewritten from p; null: none
  unsigned int start;
  unsigned int len;
  float lr;              // learning rate times the parameter's scale
  float wd;              // weight decay (0 for a parameter without)
  int g_bf16;            // 1: g is bf16
  int pad;
};
static_assert(sizeof(AdamwChunk) == 64, "AdamwChunk: keep in step with the Rust mirror");

// Element k of the chunk's gradient, as f32.
__device__ __forceinline__ float adamw_grad(const AdamwChunk &c, unsigned int k) {
  return c.g_bf16 ? __bfloat162float(static_cast<const __nv_bfloat16 *>(c.g)[k])
                  : static_cast<const float *>(c.g)[k];
}

struct AdamwParams {
  const AdamwChunk *chunks;  // [n_chunks], the update's table (or the norm's)
  float *partials;           // [n_chunks] sum of squares per chunk, norm writes
  float *norm;               // [1] global gradient norm, norm_finish writes, step reads
  int n_chunks;              // rows of `chunks`
  int n_partials;            // norm_finish: partials to reduce
  float beta1, beta2;        // step: the moments' decay
  float one_minus_beta1;     // as the reference rounds 1 - beta1 (in f32)
  float one_minus_beta2;
  float inv_bc1, inv_bc2;    // step: 1 / (1 - beta^t), rounded to f32 as the reference does
  float eps;
  float max_norm;            // step: clip to this global norm (0: no clipping)
};
static_assert(sizeof(AdamwParams) == 64, "AdamwParams: keep in step with the Rust mirror");
static_assert(alignof(AdamwParams) == 8, "AdamwParams: keep in step with the Rust mirror");
