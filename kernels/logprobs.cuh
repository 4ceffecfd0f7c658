// What the log-probability kernels (logprobs.cu) share with their launcher,
// src/kernels/cuda/logprobs.rs: LogprobsParams, the one kernel argument of every entry point
// in logprobs.cu (the ABI), mirrored field for field there.
#pragma once

#include "common.cuh"

// Logits are [rows, vocab] row-major in the entry point's dtype; everything else is f32
// except the u32 targets.
struct LogprobsParams {
  const void *logits;            // [rows, vocab]
  const unsigned int *targets;   // [rows]
  float *logp;                   // [rows] forward writes log softmax(logits)[target]
  float *lse;                    // [rows] forward writes, backward reads: log sum exp
  const float *dlogp;            // [rows] backward: the gradient of logp
  void *dlogits;                 // [rows, vocab] backward writes, logits' dtype
  // The softmax's entropy, where asked for (null: none). The forward writes it; the backward
  // reads it back with its gradient (dentropy null: no entropy term in the gradient).
  float *entropy;                // [rows]
  const float *dentropy;         // [rows]
  int rows;
  int vocab;
  // Each logit x is shaped before the softmax into (cap > 0 ? cap tanh(x / cap) : x) * inv_temp:
  // Gemma 2's soft cap, then a sampling temperature. cap 0 and inv_temp 1 leave x as it is.
  float cap;
  float inv_temp;
};
static_assert(sizeof(LogprobsParams) == 80, "LogprobsParams: keep in step with the Rust mirror");
static_assert(alignof(LogprobsParams) == 8, "LogprobsParams: keep in step with the Rust mirror");
