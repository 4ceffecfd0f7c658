// Tensor-core building blocks shared by attention_fwd.cu, attention_bwd.cu and lora.cu
// (sm_80+, bf16/f16 operands, f32 accumulators):
//   smem_addr        generic -> shared-window address, for the asm below
//   cp_async16       16-byte global -> shared async copy (zero-fill when invalid)
//   cp_async_commit / cp_async_wait<N>   the cp.async group fences
//   ldsm_x4 / ldsm_x4_t                  ldmatrix x4 (plain and transposed)
//   Mma<T>::run / Mma<T>::pack           mma.sync.m16n8k16 and the f32 -> 2 x T packing
//   swz<D>           XOR-swizzled offset in a [rows][D] tile
//   load_tile        rows of a [*, D] global matrix into a swizzled tile, via cp.async
//   store_pair       two f32 -> two adjacent T in global memory
//   atomic_add2      two adjacent f32 atomic adds (one vector atomic on sm_90)
// Header-only and `static __device__ __forceinline__`, like common.cuh.
#pragma once

#include "common.cuh"

namespace temper {

static __device__ __forceinline__ uint32_t smem_addr(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; `valid == false` writes 16 zero bytes instead (the
// source is then not read, but is still given a safe address).
static __device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
static __device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}
template <int N> static __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

static __device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
static __device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D(16x8, f32) += A(16x16) B(16x8). Fragment layouts (g = lane / 4, c = lane % 4):
//   A: a0 = (g, 2c..2c+1), a1 = (g+8, 2c..), a2 = (g, 2c+8..), a3 = (g+8, 2c+8..)
//   B: b0 = (k 2c..2c+1, n g), b1 = (k 2c+8.., n g)
//   C: c0,c1 = (g, 2c..2c+1), c2,c3 = (g+8, 2c..2c+1)
// so the C fragments of two adjacent n-blocks are exactly the A fragment of one k-step.
template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // Low half = first (lower-index) element, as the fragment layouts expect.
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&h);
  }
};
template <> struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&h);
  }
};

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

static __device__ __forceinline__ void atomic_add2(float *dst, float x, float y) {
#if __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2 *>(dst), make_float2(x, y));
#else
  atomicAdd(dst, x);
  atomicAdd(dst + 1, y);
#endif
}

}  // namespace temper
