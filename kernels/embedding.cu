// Embedding lookup and its gradient without a one-block scatter:
//   forward:  one block per position copies its table row, casting the table's dtype (the f32
//             master, or a compute copy) to the compute dtype (no copy of the whole table is
//             made first); embedding_fwd2 adds the position table's row in the same pass;
//   backward: one block per used row sums the gradient rows of its positions, in ascending
//             position order (grouped on the host), into that row of the f32 gradient: no
//             atomics, so the result is the same on every run. With `accumulate` the sum is
//             added to the row's gradient so far (a tied LM head's, which embedding_init
//             widened to f32 first): the two gradients of a tied table meet in this pass.
// An id outside the table writes NaN into its output row, which stops training clearly.
#include "embedding.cuh"

namespace {

using temper::from_f32;
using temper::to_f32;

constexpr int kThreads = 256;

template <typename TT, typename T> __device__ void forward(const EmbeddingParams &p) {
  const int pos = blockIdx.x;
  const unsigned int id = p.ids[pos];
  T *out = static_cast<T *>(p.out) + (size_t)pos * p.dim;
  if (id >= (unsigned int)p.vocab) {
    for (int c = threadIdx.x; c < p.dim; c += blockDim.x)
      out[c] = from_f32<T>(__int_as_float(0x7fc00000));
    return;
  }
  const TT *row = static_cast<const TT *>(p.table) + (size_t)id * p.dim;
  for (int c = threadIdx.x; c < p.dim; c += blockDim.x)
    out[c] = from_f32<T>(to_f32(row[c]) * p.scale);
}

// Token plus position embedding (GPT-2's input) in one pass: the two rows summed in f32 and
// rounded once, where two lookups and an add would write the token rows, read them back and
// write the sum. An id or position outside its table gives NaN.
template <typename TT, typename T> __device__ void forward2(const EmbeddingParams &p) {
  const int pos = blockIdx.x;
  const unsigned int id = p.ids[pos], at = p.ids2[pos];
  T *out = static_cast<T *>(p.out) + (size_t)pos * p.dim;
  if (id >= (unsigned int)p.vocab || at >= (unsigned int)p.vocab2) {
    for (int c = threadIdx.x; c < p.dim; c += blockDim.x)
      out[c] = from_f32<T>(__int_as_float(0x7fc00000));
    return;
  }
  const TT *row = static_cast<const TT *>(p.table) + (size_t)id * p.dim;
  const TT *prow = static_cast<const TT *>(p.table2) + (size_t)at * p.dim;
  for (int c = threadIdx.x; c < p.dim; c += blockDim.x)
    out[c] = from_f32<T>(to_f32(row[c]) + to_f32(prow[c]));
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
    acc = __fmul_rn(acc, p.scale);  // rounded before the add, as the CPU mirror: no FMA
    // The sum first, then the add: the same rounding as adding two separate gradients.
    drow[c] = p.accumulate ? drow[c] + acc : acc;
  }
}

// dtable = the [vocab, dim] gradient at `dy`, widened to f32: the start of a tied table's
// gradient when its LM head's came in the compute dtype.
template <typename T> __device__ void init(const EmbeddingParams &p) {
  const T *src = static_cast<const T *>(p.dy);
  const size_t total = (size_t)p.vocab * p.dim;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (size_t)gridDim.x * blockDim.x)
    p.dtable[i] = to_f32(src[i]);
}

}  // namespace

#define EMBEDDING_FWD(TAB, TT, OUT, T)                                                    \
  extern "C" __global__ void __launch_bounds__(kThreads)                                  \
      embedding_fwd_##TAB##_##OUT(const EmbeddingParams p) {                              \
    temper::pdl_enter();                                                                  \
    forward<TT, T>(p);                                                                    \
  }                                                                                       \
  extern "C" __global__ void __launch_bounds__(kThreads)                                  \
      embedding_fwd2_##TAB##_##OUT(const EmbeddingParams p) {                             \
    temper::pdl_enter();                                                                  \
    forward2<TT, T>(p);                                                                   \
  }

#define EMBEDDING_ENTRY(SUFFIX, T)                                                        \
  EMBEDDING_FWD(f32, float, SUFFIX, T)                                                    \
  EMBEDDING_FWD(bf16, __nv_bfloat16, SUFFIX, T)                                           \
  EMBEDDING_FWD(f16, __half, SUFFIX, T)                                                   \
  extern "C" __global__ void __launch_bounds__(kThreads)                                  \
      embedding_bwd_##SUFFIX(const EmbeddingParams p) {                                   \
    temper::pdl_enter();                                                                  \
    backward<T>(p);                                                                       \
  }                                                                                       \
  extern "C" __global__ void __launch_bounds__(kThreads)                                  \
      embedding_init_##SUFFIX(const EmbeddingParams p) {                                  \
    temper::pdl_enter();                                                                  \
    init<T>(p);                                                                           \
  }

EMBEDDING_ENTRY(f32, float)
EMBEDDING_ENTRY(bf16, __nv_bfloat16)
EMBEDDING_ENTRY(f16, __half)
