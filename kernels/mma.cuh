// Tensor-core building blocks shared by attention_fwd.cu, attention_bwd.cu and lora.cu
// (sm_80+, bf16/f16 operands, f32 accumulators). The PTX primitives (smem_addr, cp.async,
// ldmatrix, mma.sync) are in mma_ptx.cuh; on top of them:
//   swz<D>           XOR-swizzled offset in a [rows][D] tile
//   load_tile        rows of a [*, D] global matrix into a swizzled tile, via cp.async
//   store_pair       two f32 -> two adjacent T in global memory
//   acc_to_a         two m16n8 f32 accumulator tiles -> one m16k16 A operand
//   atomic_add2      two adjacent f32 atomic adds (one vector atomic on sm_90)
// Header-only and `static __device__ __forceinline__`, like common.cuh.
#pragma once

#include "mma_ptx.cuh"

namespace temper {

// Element offset of (row, col) in a [rows][D] tile whose 16-byte chunks are XOR-swizzled by
// row & 7. ldmatrix reads 8 rows at one logical chunk; the swizzle puts them in 8 different
// bank groups (a row is 128 or 256 bytes, so unswizzled they would all collide).
template <int D> static __device__ __forceinline__ int swz(int row, int col) {
  static_assert(D % 64 == 0, "swizzle needs at least 8 chunks per row");
  return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// Copies rows [0, R) of a [*, D] global matrix starting at `src` into a swizzled tile; rows
// >= nvalid are zero-filled (tails of the sequence), reading `safe` instead.
template <typename T, int R, int D, int NT>
static __device__ __forceinline__ void load_tile(T *tile, const T *src, int nvalid,
                                                 const T *safe) {
  constexpr int CPR = D / 8;
  for (int c = threadIdx.x; c < R * CPR; c += NT) {
    const int row = c / CPR, ch = c - row * CPR;
    const bool ok = row < nvalid;
    const T *g = ok ? src + (size_t)row * D + ch * 8 : safe;
    cp_async16(smem_addr(tile + row * D + ((ch ^ (row & 7)) << 3)), g, ok);
  }
}

template <typename T>
static __device__ __forceinline__ void store_pair(T *dst, float lo, float hi) {
  *reinterpret_cast<uint32_t *>(dst) = Mma<T>::pack(lo, hi);
}

// The A operand (m16k16) of a product that reads a result back in: the accumulator tiles
// `lo` (columns k..k+7) and `hi` (k+8..k+15) already hold each thread's values where the A
// layout wants them, so converting and pairing them is all it takes (P V in the forward,
// P^T dO and dS^T Q in the backward).
template <typename T>
static __device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&lo)[4],
                                                const float (&hi)[4]) {
  a[0] = Mma<T>::pack(lo[0], lo[1]);
  a[1] = Mma<T>::pack(lo[2], lo[3]);
  a[2] = Mma<T>::pack(hi[0], hi[1]);
  a[3] = Mma<T>::pack(hi[2], hi[3]);
}

static __device__ __forceinline__ void atomic_add2(float *dst, float x, float y) {
#if __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2 *>(dst), make_float2(x, y));
#else
  atomicAdd(dst, x);
  atomicAdd(dst + 1, y);
#endif
}

}  // namespace temper
