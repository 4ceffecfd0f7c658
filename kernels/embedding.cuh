// What the embedding kernels (embedding.cu) share with their launcher,
// src/kernels/cuda/embedding.rs: EmbeddingParams, the one kernel argument of every entry point
// in embedding.cu (the ABI), mirrored field for field there.
#pragma once

#include "common.cuh"

struct EmbeddingParams {
  const void *table;           // [vocab, dim] forward reads, in the entry point's table dtype
  const unsigned int *ids;     // [n] row of each position (forward)
  void *out;                   // [n, dim] forward writes, in the entry point's output dtype
  const void *dy;              // [n, dim] backward reads, in the entry point's dtype; the
                               //   init entry reads its [vocab, dim] source here
  float *dtable;               // [vocab, dim] f32: zeroed, or the gradient so far when
                               //   accumulate is set; backward writes the used rows
  const unsigned int *uniq;    // [n_uniq] backward: each used row once
  const unsigned int *offsets; // [n_uniq + 1] backward: where each row's positions start
  const unsigned int *order;   // [n] backward: positions grouped by row, ascending in each
  const void *table2;          // [vocab2, dim] the position table (embedding_fwd2), the token
                               //   table's dtype
  const unsigned int *ids2;    // [n] the position of each row (embedding_fwd2)
  int n;                       // positions
  int dim;                     // columns
  int n_uniq;                  // used rows
  int vocab;                   // rows of the table
  int accumulate;              // backward: add each row's sum to dtable's row, not overwrite it
  int vocab2;                  // rows of the position table (embedding_fwd2)
  // Gemma's embedding scale: embedding_fwd multiplies each row by it (in f32, rounded once),
  // embedding_bwd each row's summed gradient (before adding it to the gradient so far); 1 for
  // none (the Rust mirror's default). embedding_fwd2 does not read it.
  float scale;
  int unused_;
};
static_assert(sizeof(EmbeddingParams) == 112, "EmbeddingParams: keep in step with the Rust mirror");
static_assert(alignof(EmbeddingParams) == 8, "EmbeddingParams: keep in step with the Rust mirror");
