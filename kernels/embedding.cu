// Embedding lookup and its gradient without a one-block scatter:
//   forward:  one block per position copies its table row, casting f32 -> the compute dtype
//             (no bf16 copy of the whole table is made first);
//   backward: one block per used row sums the gradient rows of its positions, in ascending
//             position order (grouped on the host), into that row of the f32 gradient: no
//             atomics, so the result is the same on every run.
// An id outside the table writes NaN into its output row, which stops training clearly.
#include "embedding.cuh"

namespace {

using temper::from_f32;
using temper::to_f32;

constexpr int kThreads = 256;

template <typename T> __device__ void forward(const EmbeddingParams &p) {
  const int pos = blockIdx.x;
  const unsigned int id = p.ids[pos];
  T *out = static_cast<T *>(p.out) + (size_t)pos * p.dim;
  if (id >= (unsigned int)p.vocab) {
    for (int c = threadIdx.x; c < p.dim; c += blockDim.x)
      out[c] = from_f32<T>(__int_as_float(0x7fc00000));
    return;
  }
  const float *row = p.table + (size_t)id * p.dim;
  for (int c = threadIdx.x; c < p.dim; c += blockDim.x) out[c] = from_f32<T>(row[c]);
}

template <typename T> __device__ void backward(const EmbeddingParams &p) {
  const int u = blockIdx.x;
  const unsigned int id = p.uniq[u];
  const unsigned int begin = p.offsets[u], end = p.offsets[u + 1];
  const T *dy = static_cast<const T *>(p.dy);
  float *drow = p.dtable + (size_t)id * p.dim;
  for (int c = threadIdx.x; c < p.dim; c += blockDim.x) {
    float acc = 0.f;
    for (unsigned int k = begin; k < end; ++k) acc += to_f32(dy[(size_t)p.order[k] * p.dim + c]);
    drow[c] = acc;
  }
}

}  // namespace

#define EMBEDDING_ENTRY(SUFFIX, T)                                                        \
  extern "C" __global__ void __launch_bounds__(kThreads)                                  \
      embedding_fwd_##SUFFIX(const EmbeddingParams p) {                                   \
    forward<T>(p);                                                                        \
  }                                                                                       \
  extern "C" __global__ void __launch_bounds__(kThreads)                                  \
      embedding_bwd_##SUFFIX(const EmbeddingParams p) {                                   \
    backward<T>(p);                                                                       \
  }

EMBEDDING_ENTRY(f32, float)
EMBEDDING_ENTRY(bf16, __nv_bfloat16)
EMBEDDING_ENTRY(f16, __half)
