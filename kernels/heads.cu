// Attention's head layout: the [B, T, n, d] projections into [B, n, T, d] heads, and the
// attention output back (the same permutation with P and Q swapped). One grid-stride copy:
// candle's reshape, transpose and copy are three autograd nodes, each of which costs the
// backward a zero-filled buffer and an add of the tensor's full size.
//
// Each thread moves whole units (up to 16 bytes) of one row; both sides read and write rows
// of d contiguous elements, so warps stay coalesced on both. Index arithmetic is 32-bit: the
// launcher keeps the unit count below 2^31.
#include "heads.cuh"

namespace {

template <typename U> __device__ void swap(const HeadsParams &p) {
  const U *in = static_cast<const U *>(p.input);
  U *out = static_cast<U *>(p.out);
  const unsigned ru = p.row_units, np = p.p, nq = p.q, n = p.units;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    // i indexes out [B, Q, P, row]; read the same (b, q, p, r) of in [B, P, Q, row].
    const unsigned r = i % ru;
    unsigned rest = i / ru;
    const unsigned pp = rest % np;
    rest /= np;
    const unsigned qq = rest % nq;
    const unsigned b = rest / nq;
    out[i] = in[((b * np + pp) * nq + qq) * ru + r];
  }
}

}  // namespace

#define HEADS_ENTRY(BYTES, U) \
  extern "C" __global__ void heads_swap_##BYTES(const HeadsParams p) { swap<U>(p); }

HEADS_ENTRY(2, unsigned short)
HEADS_ENTRY(4, unsigned int)
HEADS_ENTRY(8, uint2)
HEADS_ENTRY(16, uint4)
