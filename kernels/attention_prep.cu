// Attention preprocessing: the key range of every sequence, computed once per call.
//
// Algorithm: one block per sequence b scans its row of the key mask `kvalid` ([B, Tk] f32,
// nonzero = real token) and reduces the first valid key, the last valid key and the number
// of valid keys (warp reductions, then one warp over the per-warp results). It writes
// krange[b] = (lo, hi, dense): every valid key lies in [lo, hi), and dense = 1 when every key
// in between is valid. An all-padding sequence gets (0, 0, 1). The forward and backward
// kernels (attention_fwd.cu, attention_bwd.cu) use the range to skip whole tiles of left or
// right padding and read the per-key mask only when dense == 0. Without a key mask this
// kernel does not run and krange is null.
//
// Launch (src/kernels/cuda/attention.rs): grid B, block 256; reads p.kvalid and p.tk, writes
// p.krange.

#include "attention.cuh"

namespace temper {
namespace attn {

// ---------------------------------------------------------------------------------------
// Kernel
// ---------------------------------------------------------------------------------------
extern "C" __global__ void attn_key_range(const AttnParams p) {
  temper::pdl_enter();
  const float *__restrict__ kvalid = p.kvalid;
  int *__restrict__ out = p.krange;
  const int Tk = p.tk;
  const int b = blockIdx.x;
  const float *row = kvalid + (size_t)b * Tk;
  int lo = Tk, hi = -1, count = 0;
  for (int j = threadIdx.x; j < Tk; j += blockDim.x) {
    if (row[j] != 0.f) {
      lo = min(lo, j);
      hi = max(hi, j);
      ++count;
    }
  }
  lo = __reduce_min_sync(0xffffffffu, lo);
  hi = __reduce_max_sync(0xffffffffu, hi);
  count = __reduce_add_sync(0xffffffffu, count);
  __shared__ int s_lo[32], s_hi[32], s_cnt[32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  if (lane == 0) {
    s_lo[warp] = lo;
    s_hi[warp] = hi;
    s_cnt[warp] = count;
  }
  __syncthreads();
  if (warp == 0) {
    lo = lane < nw ? s_lo[lane] : Tk;
    hi = lane < nw ? s_hi[lane] : -1;
    count = lane < nw ? s_cnt[lane] : 0;
    lo = __reduce_min_sync(0xffffffffu, lo);
    hi = __reduce_max_sync(0xffffffffu, hi);
    count = __reduce_add_sync(0xffffffffu, count);
    if (lane == 0) {
      if (count == 0) {
        out[3 * b] = 0;
        out[3 * b + 1] = 0;
        out[3 * b + 2] = 1;
      } else {
        out[3 * b] = lo;
        out[3 * b + 1] = hi + 1;
        out[3 * b + 2] = (count == hi + 1 - lo) ? 1 : 0;
      }
    }
  }
}

}  // namespace attn
}  // namespace temper

using namespace temper::attn;
