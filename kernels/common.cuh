// Shared device helpers for temper's kernels: dtype conversions, warp and block reductions,
// and the 16-byte vector type used for wide loads.
//
// Everything here is header-only and `static __device__ __forceinline__`, so each .cu file
// compiles to self-contained PTX (build.rs loads one module per file and arch) and nothing
// is shared at link time.
//
// Conventions every kernel in this directory follows:
// - Entry points are `extern "C"` so their PTX names are stable for `load_func`; the name
//   carries the dtype suffix (`_f32`, `_bf16`, `_f16`) and any template choice.
// - Arithmetic is in f32 whatever the storage dtype (reductions that feed statistics in f64).
// - Sizes arrive as `int`; the Rust side checks they fit before launching.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace temper {

// log2(e) and ln(2) in f32: the softmax kernels' exps are 2^((x - m) log2 e).
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

static __device__ __forceinline__ float to_f32(float x) { return x; }
static __device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
static __device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> static __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
// Round-to-nearest-even, the same rounding candle's `to_dtype` uses on the CPU, so that a
// kernel output and the reference agree to the last bit more often than not.
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float x) {
  return __float2half_rn(x);
}

// 16 bytes: the widest load a thread can issue. Rows are only read through this type when
// the Rust side has checked the base offset and the row length keep every access aligned.
template <typename T> struct alignas(16) Vec16 {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

static __device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

static __device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Sum over the whole block, returned to every thread. `scratch` holds one value per warp
// (32 suffices for any block size); the leading barrier lets callers reuse `scratch` across
// consecutive calls without a barrier of their own. blockDim.x must be a multiple of 32.
template <typename F> static __device__ __forceinline__ F block_sum(F x, F *scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  x = warp_sum(x);
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  F total = lane < nwarps ? scratch[lane] : F(0);
  return warp_sum(total);
}

// Programmatic dependent launch (sm_90 and later). With TEMPER_PDL=on the files listed in
// PDL_STEMS (src/kernels/cuda/pdl.rs) are launched so that the kernel may start before the one
// ahead of it on the stream has finished: it must not read what that kernel writes, nor write
// anything, before `pdl_enter`, which waits until the kernel ahead has finished and its writes
// are visible, then lets the kernel behind start in turn. Every entry point of those files calls
// it first (checked by the tests of src/kernels/cuda/pdl.rs); only reads of what no kernel of the step writes (a weight)
// may come before it. Without such a launch both instructions return at once, and before
// sm_90 they are not compiled. Each kernel lets the next start only after its own wait, so a
// kernel that starts early overlaps at most the one just ahead of it: what any earlier kernel
// wrote is complete when it starts.
static __device__ __forceinline__ void pdl_enter() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace temper
