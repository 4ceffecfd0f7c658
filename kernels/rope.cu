// Rotary position embeddings in the Llama / GPT-NeoX layout: element j of a head's first
// half and element j of its second half rotate together by the angle of (position, j).
// One thread per pair, in f32 arithmetic: the reference composes four broadcast multiplies,
// a subtraction, an addition and a concatenation of the halves (eight launches on a GPU, and
// more backward).
//
// The backward is the inverse rotation (by minus the angle), so both passes are one
// template, which differs only in the sign of sin.
#include "rope.cuh"

namespace {

using temper::from_f32;
using temper::to_f32;

template <typename T, bool Inverse> __device__ void rotate(const RopeParams &p) {
  const T *x = static_cast<const T *>(p.x);
  const T *cs = static_cast<const T *>(p.cos);
  const T *sn = static_cast<const T *>(p.sin);
  T *out = static_cast<T *>(p.out);
  const long long heads_seq = (long long)p.heads * p.seq;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < p.pairs;
       i += (long long)gridDim.x * blockDim.x) {
    const long long row = i / p.half;  // (b, h, t) flattened
    const int j = (int)(i - row * p.half);
    const long long b = row / heads_seq;
    const int t = (int)(row % p.seq);
    const long long tab = (b * p.seq + t) * p.half + j;
    const float c = to_f32(cs[tab]);
    const float s = Inverse ? -to_f32(sn[tab]) : to_f32(sn[tab]);
    const long long a = row * 2 * p.half + j;
    const float x1 = to_f32(x[a]);
    const float x2 = to_f32(x[a + p.half]);
    out[a] = from_f32<T>(x1 * c - x2 * s);
    out[a + p.half] = from_f32<T>(x2 * c + x1 * s);
  }
}

}  // namespace

#define ROPE_ENTRY(SUFFIX, T)                                                                  \
  extern "C" __global__ void rope_fwd_##SUFFIX(const RopeParams p) { rotate<T, false>(p); }    \
  extern "C" __global__ void rope_bwd_##SUFFIX(const RopeParams p) { rotate<T, true>(p); }

ROPE_ENTRY(f32, float)
ROPE_ENTRY(bf16, __nv_bfloat16)
ROPE_ENTRY(f16, __half)
