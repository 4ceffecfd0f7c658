// What the embedding kernels (embedding.cu) share with their launcher,
// src/kernels/cuda/embedding.rs: EmbeddingParams, the one kernel argument of every entry point
// in embedding.cu (the ABI), mirrored field for field there.
#pragma once

#include "common.cuh"

struct EmbeddingParams {
  const float *table;          // [vocab, dim] f32 master weights (forward)
  const unsigned int *ids;     // [n] row of each position (forward)
  void *out;                   // [n, dim] forward writes, in the entry point's dtype
  const void *dy;              // [n, dim] backward reads, in the entry point's dtype
  float *dtable;               // [vocab, dim] f32, zeroed; backward writes the used rows
  const unsigned int *uniq;    // [n_uniq] backward: each used row once
  const unsigned int *offsets; // [n_uniq + 1] backward: where each row's positions start
  const unsigned int *order;   // [n] backward: positions grouped by row, ascending in each
  int n;                       // positions
  int dim;                     // columns
  int n_uniq;                  // used rows
  int vocab;                   // rows of the table
};
static_assert(sizeof(EmbeddingParams) == 80, "EmbeddingParams: keep in step with the Rust mirror");
static_assert(alignof(EmbeddingParams) == 8, "EmbeddingParams: keep in step with the Rust mirror");
