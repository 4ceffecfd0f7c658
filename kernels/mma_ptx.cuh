// The PTX primitives of the tensor-core kernels (sm_80+), included by mma.cuh:
//   smem_addr        generic -> shared-window address, for the asm below
//   cp_async16       16-byte global -> shared async copy (zero-fill when invalid)
//   cp_async_commit / cp_async_wait<N>   the cp.async group fences
//   ldsm_x4 / ldsm_x4_t                  ldmatrix x4 (plain and transposed)
//   Mma<T>::run / Mma<T>::pack           mma.sync.m16n8k16 and the f32 -> 2 x T packing
//   exp2_ftz                             2^x in one ex2.approx.ftz
// Every inline `asm` of the kernels lives here, so that tests/kernel_emu/ can put its CPU
// emulation of exactly these functions in place of this file and run the kernels on the host.
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
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n)
               : "memory");
}
// The "memory" clobbers keep the compiler from moving shared-memory reads and writes across
// the copies and their fences: a stage read with no barrier after its wait (the decode
// attention's ring) relies on the wait staying before the read.
static __device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N> static __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
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

// 2^x, flushing a result below 2^-126 to zero. Without --use_fast_math exp2f compiles to the
// non-ftz ex2.approx, which ptxas wraps in a range test and two multiplies around the MUFU to
// keep subnormal results; the tensor-core softmax runs one exp per score, on the path the
// FlashAttention kernels keep short, and a weight under 2^-126 of the row's largest (which
// is 1) is nothing to any sum here.
static __device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
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

}  // namespace temper
