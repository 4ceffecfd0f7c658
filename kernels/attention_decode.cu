// Attention decode: merging the split-K partials of the simple forward.
//
// When a call has too few query rows to fill the GPU (decoding one or a few tokens against
// a long KV cache), src/kernels/cuda/attention.rs launches attn_fwd_simple with nsplit > 1
// slices of the key range (grid z, attention_fwd.cu). Slice s writes, for every query row,
// its normalised partial output o_s (p.opart, f32) and the log-sum-exp of its scores lse_s
// (p.lsepart; -inf when the slice saw no visible key). attn_combine merges them:
//   lse = logsumexp_s lse_s,   o = sum_s exp(lse_s - lse) o_s
// (computed as max + log of the weights' sum); a row that no slice saw gets o = 0 and
// lse = +inf, as the unsplit forward writes.
//
// Launch: one warp per row, grid ceil(nrows / 8), block 256; reads p.opart, p.lsepart,
// p.nrows, p.d, p.nsplit, writes p.o (dtype T) and p.lse.

#include "attention.cuh"

namespace temper {
namespace attn {

// ---------------------------------------------------------------------------------------
// Kernel body
// ---------------------------------------------------------------------------------------
// Merges nsplit partial rows: o = sum_s exp(lse_s - lse) o_s, lse = logsumexp_s lse_s.
// One warp per row.
template <typename T>
static __device__ void combine(const float *__restrict__ opart, const float *__restrict__ lsepart,
                               T *__restrict__ o, float *__restrict__ lse, int nrows, int D,
                               int nsplit) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= nrows) return;
  float mx = neg_inf();
  for (int s = 0; s < nsplit; ++s) mx = fmaxf(mx, lsepart[(size_t)s * nrows + row]);
  if (mx == neg_inf()) {
    for (int d = lane; d < D; d += 32) o[(size_t)row * D + d] = from_f32<T>(0.f);
    if (lane == 0) lse[row] = pos_inf();
    return;
  }
  float wsum = 0.f;
  for (int s = 0; s < nsplit; ++s) wsum += __expf(lsepart[(size_t)s * nrows + row] - mx);
  const float inv = 1.f / wsum;
  for (int d = lane; d < D; d += 32) {
    float acc = 0.f;
    for (int s = 0; s < nsplit; ++s) {
      const float w = __expf(lsepart[(size_t)s * nrows + row] - mx);
      acc = fmaf(w, opart[((size_t)s * nrows + row) * D + d], acc);
    }
    o[(size_t)row * D + d] = from_f32<T>(acc * inv);
  }
  if (lane == 0) lse[row] = mx + logf(wsum);
}

}  // namespace attn
}  // namespace temper

using namespace temper::attn;

// ---------------------------------------------------------------------------------------
// Entry points: attn_combine_<dtype>.
// ---------------------------------------------------------------------------------------
#define COMBINE_ENTRY(T, SUF)                                                                 \
  extern "C" __global__ void attn_combine_##SUF(const AttnParams p) {                         \
    combine<T>(p.opart, p.lsepart, static_cast<T *>(p.o), p.lse, p.nrows, p.d, p.nsplit);     \
  }

COMBINE_ENTRY(float, f32)
COMBINE_ENTRY(__nv_bfloat16, bf16)
COMBINE_ENTRY(__half, f16)
