// Generation's GEMMs at a decode step's few rows: y = act(x W^T + b) for x [M, K] with M <= 64,
// W [N, K] (the layer's weight as stored), b [N] or none, act the identity or GPT-2's tanh GELU.
//
// At 64 rows a decode step's GEMM is a read of W: GPT-2's MLP weight is 4.7 MB, 1.2 us at the
// H200's copy bandwidth, and the whole step's block weights 170 MB. cuBLAS's kernels took
// 0.334 ms for GPT-2's 48 block GEMMs of a 64-row decode step on the H200 (ncu, 2026-12-04),
// ~7 us a GEMM, where reading their weights takes 41 us in all. Here every CTA streams a slice of W
// with all its loads issued before any mma waits on them, and the K slices of a column tile
// are summed by the slice that finishes last, in slice order, inside the same launch.
//
// Tiles. A CTA (4 warps) owns 32 output columns and one slice of K (grid (ceil(N / 32),
// splits)); its warps take the slice's 32-wide k chunks in turn. A lane (g = lane / 4,
// c = lane % 4) loads 16 bytes (8 values) of each of its rows per chunk: W rows n0 + 8 nb + g
// and x rows 16 mt + g (+ 8), columns 8c..8c+7 of the chunk. Those are exactly the lane's
// fragments of two m16n8k16 mmas under a fixed permutation of the chunk's 32 k: the mma's k
// pair (2c, 2c+1) of step s is the chunk's (8c + 4s, +1) and (2c+8, 2c+9) its (8c + 4s + 2, +3),
// the same map for A and B, so each product sums the chunk's k once. No shared memory and no
// ldmatrix on the way in; x (at most 64 x K) is re-read by every column tile from L2.
//
// Sums. The 4 warps' accumulators meet in shared memory and are added in warp order. With one
// slice the CTA adds the bias, applies the GELU and writes y (rounded once, from f32). With
// more, each slice writes its f32 sums to p.part[slice], and the CTA that increments the tile's
// counter last adds the slices in slice order and writes y, then zeroes the counter: the
// result does not depend on which CTA ran when, and no second launch is needed.
//
// Launch (src/kernels/cuda/decode_gemm.rs): grid (ceil(N / 32), splits), block 128; x, W rows
// 16-byte aligned (K a multiple of 8), y [M, N] contiguous; p.count zeroed when splits > 1.
// Entry points decode_gemm_<dtype>_m<MT> serve M <= 16 MT.

#include "gelu.cuh"
#include "mma.cuh"

struct DecodeGemmParams {
  const void *x;        // [M, K] in T
  const void *w;        // [N, K] in T
  const void *bias;     // [N] in T, or null
  void *y;              // [M, N] in T
  float *part;          // [splits, M, N]: each slice's sums (splits > 1)
  unsigned int *count;  // [ceil(N / 32)]: slices done per column tile, zero between launches
  int m;
  int n;
  int k;
  int splits;           // K slices: gridDim.y
  int chunks;           // 32-wide k chunks per slice
  int gelu;             // 1: GELU(tanh) after the bias
};
static_assert(sizeof(DecodeGemmParams) == 72, "DecodeGemmParams: keep in step with the Rust mirror");

namespace temper {
namespace decode_gemm {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kCols = 32;         // output columns per CTA
constexpr int kNB = kCols / 8;    // n8 blocks per CTA
constexpr int kUnroll = 2;        // chunks a warp loads before its first mma

// 16 bytes at byte `at` of `base`, or zeros where not `valid`. The load itself is
// unconditional (an invalid one reads the first 16 bytes, which every operand has), so that
// no branch splits a chunk's loads from one another: they issue back to back.
static __device__ __forceinline__ uint4 load16(const void *base, size_t at, bool valid) {
  const uint4 raw =
      *reinterpret_cast<const uint4 *>(static_cast<const unsigned char *>(base) + (valid ? at : 0));
  return valid ? raw : make_uint4(0u, 0u, 0u, 0u);
}

// The CTA's slice of W into L2, one row of it a thread (sm_90's bulk prefetch; nothing before).
// This runs before `pdl_enter`: launched early (TEMPER_PDL), the CTA fetches its weights while
// the kernel ahead of it still runs, and its loads after the wait find them in L2. A prefetch
// only moves lines into L2, where every write to them lands too, so it reads nothing stale
// even where the kernel ahead wrote W (a generation's first step, after the weights' casts);
// the loads that use W come after the wait. Rows are 16-byte aligned and the slice
// ends at a 32-wide chunk or at K, a multiple of 8: whole 16-byte units, as the prefetch needs.
template <typename T>
static __device__ __forceinline__ void prefetch_w(const DecodeGemmParams &p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const int n = blockIdx.x * kCols + threadIdx.x;
  const int k0 = blockIdx.y * p.chunks * 32;
  const int k1 = min(p.k, k0 + p.chunks * 32);
  if (threadIdx.x < kCols && n < p.n && k0 < k1) {
    const T *row = static_cast<const T *>(p.w) + (size_t)n * p.k + k0;
    const unsigned bytes = (unsigned)(k1 - k0) * (unsigned)sizeof(T);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(row), "r"(bytes) : "memory");
  }
#endif
}

// The sum for (row, col) of the tile's columns, biased, activated and rounded into y.
template <typename T>
static __device__ __forceinline__ void emit(const DecodeGemmParams &p, int row, int col,
                                            float v) {
  if (p.bias) v += to_f32(static_cast<const T *>(p.bias)[col]);
  if (p.gelu) v = gelu_tanh(v);
  static_cast<T *>(p.y)[(size_t)row * p.n + col] = from_f32<T>(v);
}

template <typename T, int MT> static __device__ void run(const DecodeGemmParams &p) {
  __shared__ float red[kWarps][MT * 16][kCols + 1];
  __shared__ unsigned int last;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, c = lane & 3;
  const int tile = blockIdx.x, slice = blockIdx.y;
  const int n0 = tile * kCols;
  const int nchunks = (p.k + 31) / 32;
  const int begin = slice * p.chunks;
  const int end = min(nchunks, begin + p.chunks);
  const size_t row_bytes = (size_t)p.k * sizeof(T);

  float acc[MT][kNB][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) acc[mt][nb][0] = acc[mt][nb][1] = acc[mt][nb][2] = acc[mt][nb][3] = 0.f;

  for (int ch = begin + warp; ch < end; ch += kWarps * kUnroll) {
    uint4 xa[kUnroll][MT][2], wb[kUnroll][kNB];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int chunk = ch + u * kWarps;
      const int kk = chunk * 32 + c * 8;
      const bool kin = chunk < end && kk < p.k;
      const size_t col_bytes = (size_t)kk * sizeof(T);
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
        const int n = n0 + nb * 8 + g;
        wb[u][nb] = load16(p.w, (size_t)n * row_bytes + col_bytes, kin && n < p.n);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = mt * 16 + h * 8 + g;
          xa[u][mt][h] = load16(p.x, (size_t)r * row_bytes + col_bytes, kin && r < p.m);
        }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint32_t a0[4] = {xa[u][mt][0].x, xa[u][mt][1].x, xa[u][mt][0].y, xa[u][mt][1].y};
        const uint32_t a1[4] = {xa[u][mt][0].z, xa[u][mt][1].z, xa[u][mt][0].w, xa[u][mt][1].w};
#pragma unroll
        for (int nb = 0; nb < kNB; ++nb) {
          Mma<T>::run(acc[mt][nb], a0, wb[u][nb].x, wb[u][nb].y);
          Mma<T>::run(acc[mt][nb], a1, wb[u][nb].z, wb[u][nb].w);
        }
      }
    }
  }

  // The warps' sums for this slice, added in warp order.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
      const int r = mt * 16 + g, col = nb * 8 + 2 * c;
      red[warp][r][col] = acc[mt][nb][0];
      red[warp][r][col + 1] = acc[mt][nb][1];
      red[warp][r + 8][col] = acc[mt][nb][2];
      red[warp][r + 8][col + 1] = acc[mt][nb][3];
    }
  __syncthreads();
  const int rows = min(p.m, MT * 16);
  for (int e = threadIdx.x; e < rows * kCols; e += kThreads) {
    const int r = e / kCols, col = e % kCols;
    if (n0 + col >= p.n) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += red[w][r][col];
    if (p.splits == 1)
      emit<T>(p, r, n0 + col, v);
    else
      p.part[((size_t)slice * p.m + r) * p.n + n0 + col] = v;
  }
  if (p.splits == 1) return;

  // The last slice of the tile to finish adds them all. The fence orders this CTA's partial
  // sums before its count; the last CTA's fence orders its reads after every count.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(p.count + tile, 1u) == (unsigned int)(p.splits - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int e = threadIdx.x; e < rows * kCols; e += kThreads) {
    const int r = e / kCols, col = n0 + e % kCols;
    if (col >= p.n) continue;
    float v = 0.f;
    for (int s = 0; s < p.splits; ++s) v += __ldcg(p.part + ((size_t)s * p.m + r) * p.n + col);
    emit<T>(p, r, col, v);
  }
  if (threadIdx.x == 0) p.count[tile] = 0;
}

}  // namespace decode_gemm
}  // namespace temper

#define DECODE_GEMM_ENTRY(T, SUFFIX, MT)                                                      \
  extern "C" __global__ void __launch_bounds__(temper::decode_gemm::kThreads)                 \
      decode_gemm_##SUFFIX##_m##MT(const DecodeGemmParams p) {                                 \
    temper::decode_gemm::prefetch_w<T>(p);                                                     \
    temper::pdl_enter();                                                                       \
    temper::decode_gemm::run<T, MT>(p);                                                       \
  }

DECODE_GEMM_ENTRY(__nv_bfloat16, bf16, 1)
DECODE_GEMM_ENTRY(__nv_bfloat16, bf16, 2)
DECODE_GEMM_ENTRY(__nv_bfloat16, bf16, 3)
DECODE_GEMM_ENTRY(__nv_bfloat16, bf16, 4)
DECODE_GEMM_ENTRY(__half, f16, 1)
DECODE_GEMM_ENTRY(__half, f16, 2)
DECODE_GEMM_ENTRY(__half, f16, 3)
DECODE_GEMM_ENTRY(__half, f16, 4)
