// LoRA linear layer helpers: y = x W^T + bias + s (x A^T) B^T, W [N, K] frozen, A [r, K],
// B [N, r]. The big products run in cuBLAS (src/kernels/cuda/lora.rs); these kernels do the
// packing that lets the rank-r term and the bias ride inside cuBLAS's accumulator, and the
// backward pass that reads dY once for both rank-r gradients.
//
// Forward (three cuBLAS calls, y written by the first and finished by the last):
//   u_ext = [s * x A^T | 1 | 0...]   [M, r8]   (r8 = r + has_bias rounded up to 8)
//   B_ext = [B | bias | 0...]         [N, r8]
//   y  = u_ext B_ext^T                (K = r8: the rank-r product and the bias in one pass)
//   y += x W^T                        (beta = 1: folded into the base GEMM's f32 accumulator)
// which is the concatenated product [x | s x A^T | 1] [W | B | bias]^T without copying x.
// `lora_pack` writes the constant columns of u_ext and all of B_ext.
//
// Backward (W and bias frozen, so no dW): with g = s dY B [M, r] ("dS", the gradient of the
// rank-r activations) and u_s = s x A^T (saved in u_ext):
//   dB = dY^T u_s          [N, r]
//   dA = g^T x             [r, K]      (cuBLAS)
//   dx = g A + dY W        [M, K]      (cuBLAS: K = r product, then the base GEMM with beta = 1)
// `lora_dy` computes g and dB in one pass over dY. Both contract dY, but over different axes
// (g over N, dB over M), so no block can finish either alone: the grid tiles dY into
// regions of MC rows x NC columns, each block streams its region through shared memory in
// 64 x 64 tiles (two-stage cp.async pipeline) and, per tile, runs two small tensor-core
// products, g_tile += dY_tile B_tile and dB_tile += dY_tile^T u_tile (the transpose comes
// free from ldmatrix.trans). Partial sums for its MC rows of g and NC rows of dB accumulate
// in shared memory (each element is owned by one thread: no atomics, no barriers), then go
// to per-region partial buffers that `lora_dy_reduce` sums in a fixed order, so the result
// is deterministic. Regions are sized on the host so the partials stay small next to dY.

#include "lora.cuh"
#include "mma.cuh"

namespace temper {
namespace lora {

// ---------------------------------------------------------------------------------------
// lora_pack: the constant columns of u_ext and all of B_ext (forward).
// ---------------------------------------------------------------------------------------
// u_ext[:, r..r8) = (1 at column r if has_bias, else 0); B_ext = [B | bias | 0].
template <typename T>
static __device__ void pack(T *__restrict__ uext, T *__restrict__ bext, const T *__restrict__ bm,
                            const T *__restrict__ bias, int M, int N, int r, int r8) {
  const size_t tail = (size_t)(r8 - r);
  const size_t n_u = (size_t)M * tail;
  const size_t n_b = (size_t)N * r8;
  for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n_u + n_b;
       idx += (size_t)gridDim.x * blockDim.x) {
    if (idx < n_u) {
      const size_t m = idx / tail;
      const int c = r + (int)(idx - m * tail);
      uext[m * r8 + c] = from_f32<T>(bias != nullptr && c == r ? 1.f : 0.f);
    } else {
      const size_t i2 = idx - n_u;
      const size_t n = i2 / r8;
      const int c = (int)(i2 - n * r8);
      T val = from_f32<T>(0.f);
      if (c < r)
        val = bm[n * r + c];
      else if (bias != nullptr && c == r)
        val = bias[n];
      bext[n * r8 + c] = val;
    }
  }
}

// ---------------------------------------------------------------------------------------
// lora_dy: one pass over dY for g = dY B and dB = dY^T u_s (tensor cores, bf16/f16).
// ---------------------------------------------------------------------------------------
// dY tile [64][64], 16-byte chunks XOR-swizzled by row & 7 so ldmatrix (plain and .trans)
// reads 8 rows of one logical chunk from 8 different bank groups (swz in mma.cuh).
static __device__ __forceinline__ int swz64(int row, int col) { return swz<kTile>(row, col); }

// Shared memory (dynamic): two stages of {dY tile, B tile [64][RP+8], u tile [64][RP+8]},
// then the f32 accumulators gacc [MC][RP] and bacc [NC][RP].
template <typename T, int RP>
static __device__ void dy_once(const T *__restrict__ dy, const T *__restrict__ bext,
                               const T *__restrict__ uext, float *__restrict__ part_g,
                               float *__restrict__ part_b, int M, int N, int r8, int MC,
                               int NC) {
  using Tiles = DyTraits<RP>;
  constexpr int RS = Tiles::kRowStride;
  constexpr int NBR = RP / 8;
  constexpr int STAGE = Tiles::kStageElems;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *stages = reinterpret_cast<T *>(smem_raw);
  float *gacc = reinterpret_cast<float *>(stages + 2 * STAGE);
  float *bacc = gacc + (size_t)MC * RP;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, c4 = lane & 3;
  const int n_begin = blockIdx.x * NC, m_begin = blockIdx.y * MC;
  const int n_tiles = (min(NC, N - n_begin) + kTile - 1) / kTile;
  const int m_tiles = (min(MC, M - m_begin) + kTile - 1) / kTile;
  const int ntiles = n_tiles * m_tiles;
  // Columns of u_ext / B_ext actually read: RP rounds r up to 16, r8 may be smaller.
  const int chunks_valid = min(RP, r8) / 8;

  for (int i = threadIdx.x; i < (MC + NC) * RP; i += kThreads) gacc[i] = 0.f;

  auto load = [&](int t, int st) {
    const int mt = t / n_tiles, nt = t - mt * n_tiles;
    const int m0 = m_begin + mt * kTile, n0 = n_begin + nt * kTile;
    T *sY = stages + st * STAGE;
    T *sB = sY + kTile * kTile;
    T *sU = sB + kTile * RS;
    for (int c = threadIdx.x; c < kTile * 8; c += kThreads) {
      const int row = c >> 3, ch = c & 7;
      const int m = m0 + row, n = n0 + ch * 8;
      const bool ok = m < M && n < N;  // N % 8 == 0: a chunk is wholly in or out
      const T *src = ok ? dy + (size_t)m * N + n : dy;
      cp_async16(smem_addr(sY + swz64(row, ch * 8)), src, ok);
    }
    for (int c = threadIdx.x; c < kTile * (RP / 8); c += kThreads) {
      const int row = c / (RP / 8), ch = c - row * (RP / 8);
      const bool okc = ch < chunks_valid;
      const bool okb = okc && n0 + row < N;
      const bool oku = okc && m0 + row < M;
      cp_async16(smem_addr(sB + row * RS + ch * 8),
                 okb ? bext + (size_t)(n0 + row) * r8 + ch * 8 : bext, okb);
      cp_async16(smem_addr(sU + row * RS + ch * 8),
                 oku ? uext + (size_t)(m0 + row) * r8 + ch * 8 : uext, oku);
    }
  };

  if (ntiles > 0) load(0, 0);
  cp_async_commit();
  for (int t = 0; t < ntiles; ++t) {
    const int st = t & 1;
    if (t + 1 < ntiles) {
      load(t + 1, st ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // also orders the accumulator zeroing before the first update
    const int mt = t / n_tiles, nt = t - mt * n_tiles;
    const T *sY = stages + st * STAGE;
    const T *sB = sY + kTile * kTile;
    const T *sU = sB + kTile * RS;

    // g rows (m) warp*16.. of the tile: A = dY (row m, k = n), B = B_ext (k = n, col r).
    // dB rows (n) warp*16..: A = dY^T (row n, k = m) via .trans, B = u_ext (k = m, col r).
    float ga[NBR][4], ba[NBR][4];
#pragma unroll
    for (int nb = 0; nb < NBR; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) ga[nb][e] = ba[nb][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kTile / 16; ++kk) {
      uint32_t ay[4], ayt[4];
      ldsm_x4(ay, smem_addr(sY + swz64(warp * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8)));
      ldsm_x4_t(ayt, smem_addr(sY + swz64(kk * 16 + (lane & 7) + ((lane >> 4) << 3),
                                          warp * 16 + ((lane >> 3) & 1) * 8)));
#pragma unroll
      for (int n2 = 0; n2 < NBR / 2; ++n2) {
        uint32_t bb[4], bu[4];
        const int row = kk * 16 + (lane & 15), col = n2 * 16 + (lane >> 4) * 8;
        ldsm_x4_t(bb, smem_addr(sB + row * RS + col));
        ldsm_x4_t(bu, smem_addr(sU + row * RS + col));
        Mma<T>::run(ga[2 * n2], ay, bb[0], bb[1]);
        Mma<T>::run(ga[2 * n2 + 1], ay, bb[2], bb[3]);
        Mma<T>::run(ba[2 * n2], ayt, bu[0], bu[1]);
        Mma<T>::run(ba[2 * n2 + 1], ayt, bu[2], bu[3]);
      }
    }
    // Each accumulator element belongs to exactly one thread for the whole kernel (its
    // position in the tile fixes the warp and lane), so these read-modify-writes race with
    // nothing.
    float *gr = gacc + (size_t)(mt * kTile + warp * 16 + g) * RP;
    float *br = bacc + (size_t)(nt * kTile + warp * 16 + g) * RP;
#pragma unroll
    for (int nb = 0; nb < NBR; ++nb) {
      const int col = nb * 8 + c4 * 2;
      gr[col] += ga[nb][0];
      gr[col + 1] += ga[nb][1];
      gr[8 * RP + col] += ga[nb][2];
      gr[8 * RP + col + 1] += ga[nb][3];
      br[col] += ba[nb][0];
      br[col + 1] += ba[nb][1];
      br[8 * RP + col] += ba[nb][2];
      br[8 * RP + col + 1] += ba[nb][3];
    }
    __syncthreads();  // the stage is read by every warp before the next prefetch reuses it
  }
  cp_async_wait<0>();
  __syncthreads();

  // Partials: part_g[blockIdx.x][m][RP] for this region's rows, part_b[blockIdx.y][n][RP].
  const int mrows = min(MC, M - m_begin), ncols = min(NC, N - n_begin);
  float *pg = part_g + ((size_t)blockIdx.x * M + m_begin) * RP;
  for (int i = threadIdx.x; i < mrows * RP; i += kThreads) pg[i] = gacc[i];
  float *pb = part_b + ((size_t)blockIdx.y * N + n_begin) * RP;
  for (int i = threadIdx.x; i < ncols * RP; i += kThreads) pb[i] = bacc[i];
}

// ---------------------------------------------------------------------------------------
// lora_dy_reduce: the per-region partials of lora_dy summed in a fixed order.
// ---------------------------------------------------------------------------------------
// g[m][c] = scale * sum_x part_g[x][m][c], dB[n][c] = sum_y part_b[y][n][c], for c < r.
template <typename T>
static __device__ void dy_reduce(const float *__restrict__ part_g, const float *__restrict__ part_b,
                                 T *__restrict__ gout, T *__restrict__ dbout, int M, int N, int r,
                                 int RP, int nbx, int nby, float scale) {
  const size_t ng = (size_t)M * r, nb = (size_t)N * r;
  for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < ng + nb;
       idx += (size_t)gridDim.x * blockDim.x) {
    if (idx < ng) {
      const size_t m = idx / r;
      const int c = (int)(idx - m * r);
      float acc = 0.f;
      for (int x = 0; x < nbx; ++x) acc += part_g[((size_t)x * M + m) * RP + c];
      gout[idx] = from_f32<T>(acc * scale);
    } else {
      const size_t i2 = idx - ng;
      const size_t n = i2 / r;
      const int c = (int)(i2 - n * r);
      float acc = 0.f;
      for (int y = 0; y < nby; ++y) acc += part_b[((size_t)y * N + n) * RP + c];
      dbout[i2] = from_f32<T>(acc);
    }
  }
}

}  // namespace lora
}  // namespace temper

using namespace temper::lora;

// ---------------------------------------------------------------------------------------
// Entry points: lora_pack_<dtype>, lora_dy_reduce_<dtype>, lora_dy_<dtype>_r<RP>. Each takes
// one LoraParams by value (lora.cuh).
// ---------------------------------------------------------------------------------------
#define PACK_ENTRY(T, SUF)                                                                     \
  extern "C" __global__ void lora_pack_##SUF(const LoraParams p) {                             \
    pack<T>(static_cast<T *>(p.uext), static_cast<T *>(p.bext), static_cast<const T *>(p.bm),  \
            static_cast<const T *>(p.bias), p.m, p.n, p.r, p.r8);                              \
  }                                                                                            \
  extern "C" __global__ void lora_dy_reduce_##SUF(const LoraParams p) {                        \
    dy_reduce<T>(p.part_g, p.part_b, static_cast<T *>(p.g), static_cast<T *>(p.db), p.m, p.n,  \
                 p.r, p.rp, p.nbx, p.nby, p.scale);                                            \
  }

PACK_ENTRY(float, f32)
PACK_ENTRY(__nv_bfloat16, bf16)
PACK_ENTRY(__half, f16)

#define DY_ENTRY(T, SUF, RP)                                                                   \
  extern "C" __global__ void __launch_bounds__(DyTraits<RP>::kThreads)                         \
      lora_dy_##SUF##_r##RP(const LoraParams p) {                                              \
    dy_once<T, RP>(static_cast<const T *>(p.dy), static_cast<const T *>(p.bext),               \
                   static_cast<const T *>(p.uext), p.part_g, p.part_b, p.m, p.n, p.r8, p.mc,   \
                   p.nc);                                                                      \
  }

DY_ENTRY(__nv_bfloat16, bf16, 16)
DY_ENTRY(__nv_bfloat16, bf16, 32)
DY_ENTRY(__nv_bfloat16, bf16, 64)
DY_ENTRY(__half, f16, 16)
DY_ENTRY(__half, f16, 32)
DY_ENTRY(__half, f16, 64)
