// Inverted dropout with a counter-based mask: element i's keep bit is a hash of (seed, i),
// computed where it is used. The forward and the backward are the same pass (over x, then over
// dy), so no mask tensor is ever made or kept, and the CPU reference
// (src/kernels/dropout.rs) computes the same bits: masks agree across devices bit for bit.
#include "dropout.cuh"

namespace {

using temper::from_f32;
using temper::to_f32;

// splitmix64's output function on its i-th state.
__device__ __forceinline__ unsigned long long mix(unsigned long long seed, unsigned long long i) {
  unsigned long long z = seed + (i + 1ull) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <typename T> __device__ void apply(const DropoutParams &p) {
  const T *x = static_cast<const T *>(p.x);
  T *y = static_cast<T *>(p.out);
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < p.n;
       i += (long long)gridDim.x * blockDim.x) {
    const bool keep = (unsigned int)(mix(p.seed, (unsigned long long)i) >> 40) >= p.threshold;
    y[i] = keep ? from_f32<T>(to_f32(x[i]) * p.scale) : from_f32<T>(0.f);
  }
}

}  // namespace

#define DROPOUT_ENTRY(SUFFIX, T) \
  extern "C" __global__ void dropout_##SUFFIX(const DropoutParams p) { apply<T>(p); }

DROPOUT_ENTRY(f32, float)
DROPOUT_ENTRY(bf16, __nv_bfloat16)
DROPOUT_ENTRY(f16, __half)
