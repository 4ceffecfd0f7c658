// Scaled-dot-product attention, backward (FlashAttention-2): dQ, dK, dV from the saved
// per-row log-sum-exp, recomputing the scores tile by tile.
//
// Shared conventions are in attention.cuh. With P = exp(S - lse) recomputed per tile:
//   D_i = rowsum(dO * O)_i (attn_bwd_dot, first), dP = dO V^T, dS = P (dP - D),
//   dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO.
// Under a soft cap (SoftCap in attention.cuh) P is of the capped scores and dS takes the cap's
// slope as well: dS = P (dP - D) (1 - tanh^2).
//
// Two implementations, chosen by src/kernels/cuda/attention.rs like the forward's:
//
// 1. "simple" (any dtype, D <= 128): two kernels with no atomics: dQ (warp per query row,
//    loop over key tiles) and dK/dV (warp per key row, loop over the query rows of every head
//    in its GQA group, which sums the group's contributions for free).
//
// 2. "mma" (bf16/f16, D = 64, 128 or 256; tiles in MmaBwdTraits): one block per 64 keys (4
//    warps; attn_bwd_mma2: 128 keys, 8 warps; D = 256: 64 keys, 8 warps, two a 16-key tile)
//    of one kv head keeps K, V in shared memory and dK, dV in registers, and walks the query
//    tiles of every head in the GQA group: S^T = K Q^T, P^T = exp2(S^T - lse), dV += P^T dO,
//    dP^T = V dO^T, dS^T = P^T (dP^T - D), dK += dS^T Q, all with the key as the row so the
//    accumulators are the warp's own rows. dQ += dS K needs the query as the row: dS^T goes
//    through shared memory (read back transposed by ldmatrix.trans) and each block adds its
//    share into an f32 dQ accumulator with atomics; attn_dq_convert scales and rounds it.
//
// Every entry point is `extern "C"`, takes one AttnParams by value, and carries its dtype in
// its name: attn_bwd_dot_<dtype>, attn_bwd_dq_simple_<dtype>_d<DPL>,
// attn_bwd_dkdv_simple_<dtype>_d<DPL>, attn_bwd_mma_<dtype>_h<D>, attn_bwd_mma2_<dtype>_h<D>
// (D 64 and 128), attn_bwd_mma_narrow_<dtype>_h256, attn_dq_convert_<dtype>.

#include "attention.cuh"
#include "mma.cuh"

namespace temper {
namespace attn {

// ---------------------------------------------------------------------------------------
// Simple path (CUDA cores, f32 arithmetic, any dtype, D <= 32 * DPL).
// ---------------------------------------------------------------------------------------
// dvec[row] = sum_d dO[row, d] * O[row, d]. One warp per row.
template <typename T>
static __device__ void bwd_dot(const T *__restrict__ o, const T *__restrict__ dout,
                               float *__restrict__ dvec, int nrows, int D) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= nrows) return;
  float acc = 0.f;
  for (int d = lane; d < D; d += 32)
    acc = fmaf(to_f32(o[(size_t)row * D + d]), to_f32(dout[(size_t)row * D + d]), acc);
  acc = warp_sum(acc);
  if (lane == 0) dvec[row] = acc;
}

// dQ, simple: warp per query row, loop over key tiles. grid/block as fwd_simple (nsplit 1).
// dq = scale * sum_j p_ij (dp_ij - D_i) k_j with p recomputed from the saved lse. SEG: packed
// rows or a sliding window (the band read), as fwd_simple's.
template <typename T, int DPL, bool SEG>
static __device__ void bwd_dq_simple(const T *__restrict__ q, const T *__restrict__ k,
                                     const T *__restrict__ v, const T *__restrict__ dout,
                                     const float *__restrict__ lse, const float *__restrict__ dvec,
                                     const float *__restrict__ kvalid,
                                     const int *__restrict__ krange,
                                     const Band band, T *__restrict__ dq, int Hq,
                                     int Hkv, int Tq, int Tk, int D, int causal, int offset,
                                     float scale_log2, float scale, const SoftCap cap) {
  constexpr int DMAX = 32 * DPL;
  __shared__ float ks[kSimpleKT * (DMAX + 1)];
  __shared__ float vs[kSimpleKT * (DMAX + 1)];
  __shared__ float qs[kSimpleWarps * DMAX];
  __shared__ float dos[kSimpleWarps * DMAX];

  const int nw = blockDim.x >> 5;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int G = Hq / Hkv;
  const int b = blockIdx.x / Hkv, hkv = blockIdx.x % Hkv;
  const int rows = G * Tq;
  const int r0 = blockIdx.y * nw;
  const int r = r0 + warp;
  const bool active = r < rows;
  const int g = active ? r / Tq : 0, i = active ? r % Tq : 0;
  const size_t qrow = ((size_t)b * Hq + hkv * G + g) * Tq + i;

  const KeyRange kr = key_range(krange, b, Tk);
  const int row_lo = SEG ? seg_lo(band, b, Tq, i, kr.lo) : kr.lo;
  const int row_hi = causal ? min(kr.hi, offset + i + 1) : kr.hi;
  const int blk_lo =
      SEG ? seg_lo(band, b, Tq, block_first_query(r0, min(nw, rows - r0), Tq), kr.lo) : kr.lo;
  const int blk_hi = block_key_end(kr, r0, min(nw, rows - r0), Tq, causal, offset);
  const int ntiles = blk_hi > blk_lo ? (blk_hi - blk_lo + kSimpleKT - 1) / kSimpleKT : 0;

  float *qw = qs + warp * DMAX;
  float *dow = dos + warp * DMAX;
  float lse2 = 0.f, dr = 0.f;
  if (active) {
    for (int d = lane; d < D; d += 32) {
      qw[d] = to_f32(q[qrow * D + d]) * scale_log2;
      dow[d] = to_f32(dout[qrow * D + d]);
    }
    lse2 = lse[qrow] * kLog2e;
    dr = dvec[qrow];
  }
  const size_t kvbase = ((size_t)b * Hkv + hkv) * Tk;
  float acc[DPL];
#pragma unroll
  for (int t = 0; t < DPL; ++t) acc[t] = 0.f;

  for (int t = 0; t < ntiles; ++t) {
    const int k0 = blk_lo + t * kSimpleKT;
    __syncthreads();
    for (int e = threadIdx.x; e < kSimpleKT * D; e += blockDim.x) {
      const int jj = e / D, d = e - jj * D;
      const int j = k0 + jj;
      float kk = 0.f, vv = 0.f;
      if (j < Tk) {
        kk = to_f32(k[(kvbase + j) * D + d]);
        vv = to_f32(v[(kvbase + j) * D + d]);
      }
      ks[jj * (DMAX + 1) + d] = kk;
      vs[jj * (DMAX + 1) + d] = vv;
    }
    __syncthreads();
    if (active) {
      const int j = k0 + lane;
      const bool vis =
          (!SEG || j >= row_lo) && j < row_hi && (kr.dense || kvalid[(size_t)b * Tk + j] != 0.f);
      float ds = 0.f;
      if (vis) {
        float s = 0.f, dp = 0.f;
        const float *kr_ = ks + lane * (DMAX + 1);
        const float *vr_ = vs + lane * (DMAX + 1);
        for (int d = 0; d < D; ++d) {
          s = fmaf(qw[d], kr_[d], s);
          dp = fmaf(dow[d], vr_[d], dp);
        }
        s = cap(s);
        const float p = exp2f(s - lse2);
        ds = p * (dp - dr) * cap.slope(s);
      }
      for (int jj = 0; jj < kSimpleKT; ++jj) {
        const float dsj = __shfl_sync(0xffffffffu, ds, jj);
        if (dsj != 0.f) {
#pragma unroll
          for (int t2 = 0; t2 < DPL; ++t2)
            acc[t2] = fmaf(dsj, ks[jj * (DMAX + 1) + lane + 32 * t2], acc[t2]);
        }
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int t = 0; t < DPL; ++t) {
    const int d = lane + 32 * t;
    if (d < D) dq[qrow * D + d] = from_f32<T>(acc[t] * scale);
  }
}

// dK and dV, simple: warp per key row j of one kv head; loops over the query rows of every
// head of the GQA group (tiles of 32), so the group's contributions add up in registers.
// grid (B*Hkv, ceil(Tk / 8)), block 256. SEG: packed rows or a
// sliding window (the band read).
template <typename T, int DPL, bool SEG>
static __device__ void bwd_dkdv_simple(const T *__restrict__ q, const T *__restrict__ k,
                                       const T *__restrict__ v, const T *__restrict__ dout,
                                       const float *__restrict__ lse,
                                       const float *__restrict__ dvec,
                                       const float *__restrict__ kvalid,
                                       const int *__restrict__ krange,
                                       const Band band, T *__restrict__ dk,
                                       T *__restrict__ dv, int Hq, int Hkv, int Tq, int Tk, int D,
                                       int causal, int offset, float scale_log2, float scale,
                                       const SoftCap cap) {
  constexpr int DMAX = 32 * DPL;
  __shared__ float qs[kSimpleKT * (DMAX + 1)];
  __shared__ float dos[kSimpleKT * (DMAX + 1)];
  __shared__ float lse2s[kSimpleKT], dvs[kSimpleKT];
  __shared__ float kw[kSimpleWarps * DMAX], vw[kSimpleWarps * DMAX];

  const int nw = blockDim.x >> 5;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int G = Hq / Hkv;
  const int b = blockIdx.x / Hkv, hkv = blockIdx.x % Hkv;
  const int j0 = blockIdx.y * nw;
  const int j = j0 + warp;
  const KeyRange kr = key_range(krange, b, Tk);
  const bool kvis = j < Tk && j >= kr.lo && j < kr.hi &&
                    (kr.dense || kvalid[(size_t)b * Tk + j] != 0.f);
  const size_t krow = ((size_t)b * Hkv + hkv) * Tk + j;

  float *kwr = kw + warp * DMAX;
  float *vwr = vw + warp * DMAX;
  if (j < Tk) {
    for (int d = lane; d < D; d += 32) {
      kwr[d] = to_f32(k[krow * D + d]);
      vwr[d] = to_f32(v[krow * D + d]);
    }
  }
  float dka[DPL], dva[DPL];
#pragma unroll
  for (int t = 0; t < DPL; ++t) dka[t] = dva[t] = 0.f;

  // Whole block outside the valid keys: nothing to accumulate (uniform branch).
  const bool any = j0 < kr.hi && j0 + nw > kr.lo;
  // The first query that can see the block's first key, and in packed rows one past the
  // last that can see its last (ends never decrease along a row).
  const int i_start = causal ? max(0, j0 - offset) : 0;
  const int i_end = !any ? 0 : SEG ? seg_hi(band, b, Tk, min(j0 + nw, Tk) - 1, Tq) : Tq;
  const int i_key_end = SEG && j < Tk ? seg_hi(band, b, Tk, j, Tq) : Tq;
  const int nqt = i_end > i_start ? (i_end - i_start + kSimpleKT - 1) / kSimpleKT : 0;

  for (int g = 0; g < G; ++g) {
    const size_t qbase = ((size_t)b * Hq + hkv * G + g) * Tq;
    for (int t = 0; t < nqt; ++t) {
      const int i0 = i_start + t * kSimpleKT;
      __syncthreads();
      for (int e = threadIdx.x; e < kSimpleKT * D; e += blockDim.x) {
        const int ii = e / D, d = e - ii * D;
        const int i = i0 + ii;
        float qq = 0.f, gg = 0.f;
        if (i < Tq) {
          qq = to_f32(q[(qbase + i) * D + d]);
          gg = to_f32(dout[(qbase + i) * D + d]);
        }
        qs[ii * (DMAX + 1) + d] = qq;
        dos[ii * (DMAX + 1) + d] = gg;
      }
      for (int ii = threadIdx.x; ii < kSimpleKT; ii += blockDim.x) {
        const int i = i0 + ii;
        lse2s[ii] = i < Tq ? lse[qbase + i] * kLog2e : pos_inf();
        dvs[ii] = i < Tq ? dvec[qbase + i] : 0.f;
      }
      __syncthreads();
      const int i = i0 + lane;
      const bool vis = kvis && i < i_key_end && (!causal || j <= offset + i);
      float p = 0.f, ds = 0.f;
      if (vis) {
        float s = 0.f, dp = 0.f;
        const float *qr_ = qs + lane * (DMAX + 1);
        const float *gr_ = dos + lane * (DMAX + 1);
        for (int d = 0; d < D; ++d) {
          s = fmaf(qr_[d], kwr[d], s);
          dp = fmaf(gr_[d], vwr[d], dp);
        }
        const float x = cap(s * scale_log2);
        p = exp2f(x - lse2s[lane]);
        ds = p * (dp - dvs[lane]) * cap.slope(x);
      }
      // Not unrolled: the uniform skip below ends each iteration's block anyway, and an
      // unrolled loop let ptxas hoist shared-memory loads across iterations, which at DPL=2
      // on sm_90 settled on 32 registers with 12 bytes of spills (scripts/ptxas-report.sh).
      // The order of the additions into dka/dva is the same either way.
#pragma unroll 1
      for (int ii = 0; ii < kSimpleKT; ++ii) {
        const float pi = __shfl_sync(0xffffffffu, p, ii);
        const float dsi = __shfl_sync(0xffffffffu, ds, ii);
        if (pi != 0.f || dsi != 0.f) {
#pragma unroll
          for (int t2 = 0; t2 < DPL; ++t2) {
            const int d = lane + 32 * t2;
            dva[t2] = fmaf(pi, dos[ii * (DMAX + 1) + d], dva[t2]);
            dka[t2] = fmaf(dsi, qs[ii * (DMAX + 1) + d], dka[t2]);
          }
        }
      }
    }
  }
  if (j >= Tk) return;
#pragma unroll
  for (int t = 0; t < DPL; ++t) {
    const int d = lane + 32 * t;
    if (d < D) {
      dk[krow * D + d] = from_f32<T>(dka[t] * scale);
      dv[krow * D + d] = from_f32<T>(dva[t]);
    }
  }
}

template <typename T>
static __device__ void dq_convert(const float *__restrict__ acc, T *__restrict__ dq, size_t n,
                                  float scale) {
  for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
       idx += (size_t)gridDim.x * blockDim.x)
    dq[idx] = from_f32<T>(acc[idx] * scale);
}

// ---------------------------------------------------------------------------------------
// Tensor-core path (bf16 / f16, D in {64, 128, 256}), sm_80+.
// ---------------------------------------------------------------------------------------
// dK, dV (and dQ through f32 atomics). grid (B*Hkv, ceil(Tk / BK)), block 32 * W, BK = 16 * W
// / kSplit keys (W = 4 or 8 warps), dynamic shared memory MmaBwdTraits<D, W>::kSmemBytes. BQ
// (query rows per step) is 64 for D = 64 and 32 for D = 128 and 256 (16 in D = 256's narrow
// variant, W = 4), which keeps dK, dV (in registers for the whole kernel) plus S^T and dP^T
// under the register budget. At D = 256
// two warps share a 16-key tile (MmaBwdTraits): `half` says which half of the head dim's dK
// and dV a warp accumulates, and which of S^T (0) and dP^T (1) it computes for both.
template <typename T, int D, int W>
static __device__ void bwd_mma(const T *__restrict__ q, const T *__restrict__ k,
                               const T *__restrict__ v, const T *__restrict__ dout,
                               const float *__restrict__ lse, const float *__restrict__ dvec,
                               const float *__restrict__ kvalid, const int *__restrict__ krange,
                               const Band band, T *__restrict__ dk,
                               T *__restrict__ dv, float *__restrict__ dq_acc,
                               int Hq, int Hkv, int Tq, int Tk, int causal, int offset,
                               float scale_log2, float scale, const SoftCap cap) {
  using Tiles = MmaBwdTraits<D, W>;
  constexpr int BQ = Tiles::kBlockQ, BK = Tiles::kBlockK, NT = Tiles::kThreads;
  constexpr int SPLIT = Tiles::kSplit;  // warps a 16-key tile
  constexpr int DH = D / SPLIT;         // head-dim columns of a warp's dK, dV
  constexpr int KSD = D / 16;  // k-steps over the head dim
  constexpr int NBQ = BQ / 8;  // n-blocks over the query tile
  constexpr int NBD = D / 8;   // n-blocks over the head dim
  constexpr int NBH = DH / 8;  // n-blocks of a warp's dK, dV
  constexpr int DSS = BQ + 8;  // dS^T row stride: 16 bytes of padding keep ldmatrix conflict-free
  constexpr int MB = BQ / 16;  // m-blocks of the dQ tile
  constexpr int WPM = W / MB;  // warps per m-block in the dQ step
  constexpr int NBW = NBD / WPM;  // dQ n-blocks per warp
  static_assert(MB * WPM == W && NBW * WPM == NBD && NBW % 2 == 0, "dQ work split");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *sK = reinterpret_cast<T *>(smem_raw);
  T *sV = sK + BK * D;
  T *sQ = sV + BK * D;       // two stages
  T *sdO = sQ + 2 * BQ * D;  // two stages
  T *sdS = sdO + 2 * BQ * D;
  float *sL = reinterpret_cast<float *>(sdS + BK * DSS);  // two stages: lse * log2(e)
  float *sDv = sL + 2 * BQ;                               // two stages: rowsum(dO * O)
  // lds_f2 reads a lane's two columns of sL and sDv at once: 8-byte aligned.
  static_assert((2 * BK * D + 4 * BQ * D + BK * DSS) * sizeof(T) % 8 == 0 && BQ % 2 == 0,
                "sL, sDv 8-byte aligned");
  float *sX = sDv + 2 * BQ;  // SPLIT 2: each warp's P^T or dP^T, [NBQ * 4][32 lanes]

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int kw = warp / SPLIT, half = warp % SPLIT;  // the warp's 16-key tile, head-dim half
  // Uniform across the warp: which of S^T and dP^T this warp computes.
  const bool doS = SPLIT == 1 || half == 0, doP = SPLIT == 1 || half == 1;
  const int g = lane >> 2, c4 = lane & 3;
  const int G = Hq / Hkv;
  const int k0 = blockIdx.y * BK;
  const int b = blockIdx.x / Hkv, hkv = blockIdx.x % Hkv;
  const size_t kvbase = ((size_t)b * Hkv + hkv) * Tk;
  const KeyRange kr = key_range(krange, b, Tk);

  const int jA = k0 + kw * 16 + g, jB = jA + 8;
  const bool validA = jA >= kr.lo && jA < kr.hi && (kr.dense || kvalid[(size_t)b * Tk + jA] != 0.f);
  const bool validB = jB >= kr.lo && jB < kr.hi && (kr.dense || kvalid[(size_t)b * Tk + jB] != 0.f);

  // One past the last query that sees key jA / jB: in packed rows the end of its document.
  const int endA = jA < Tk ? seg_hi(band, b, Tk, jA, Tq) : 0;
  const int endB = jB < Tk ? seg_hi(band, b, Tk, jB, Tq) : 0;
  // The first query that sees it (past endA for a key no query sees): with endA, each score's
  // visibility is two compares, no branch. The per-score tests this replaces compiled to
  // about a dozen instructions and three branches a score, more than the score's share of
  // the mmas, in a kernel that issues one instruction a cycle.
  const int firstA = validA ? (causal ? jA - offset : kFirstRow) : kNoRow;
  const int firstB = validB ? (causal ? jB - offset : kFirstRow) : kNoRow;

  const bool any = k0 < kr.hi && k0 + BK > kr.lo;
  // Queries from the first that sees the block's first key to the last that sees its last
  // (ends never decrease along a row).
  const int i_start = causal ? max(0, k0 - offset) : 0;
  const int i_end = any ? seg_hi(band, b, Tk, min(k0 + BK, Tk) - 1, Tq) : 0;
  const int nqt = i_end > i_start ? (i_end - i_start + BQ - 1) / BQ : 0;
  const int niter = G * nqt;

  // A query tile: Q and dO copied into stage st, and its lse and rowsum(dO * O) (thread
  // x < BQ's row) loaded into registers, stored to shared memory by store_rows only at the
  // end of the step before the tile's. Stored where they were loaded, the store waited out
  // the loads' round trip at the top of every step, and the step's first barrier held the
  // whole block behind it.
  static_assert(BQ <= NT, "one row of lse and rowsum(dO * O) a thread");
  float row_lse = 0.f, row_dv = 0.f;
  auto load_q = [&](int it, int st) {
    const int gq = it / nqt, qt = it - gq * nqt;
    const int i0 = i_start + qt * BQ;
    const size_t qbase = ((size_t)b * Hq + hkv * G + gq) * Tq;
    load_tile<T, BQ, D, NT>(sQ + st * BQ * D, q + (qbase + i0) * D, Tq - i0, q);
    load_tile<T, BQ, D, NT>(sdO + st * BQ * D, dout + (qbase + i0) * D, Tq - i0, dout);
    const int i = i0 + threadIdx.x;
    if (threadIdx.x < BQ) {
      row_lse = i < Tq ? lse[qbase + i] : pos_inf();
      row_dv = i < Tq ? dvec[qbase + i] : 0.f;
    }
  };
  auto store_rows = [&](int st) {
    if (threadIdx.x < BQ) {
      sL[st * BQ + threadIdx.x] = row_lse * kLog2e;
      sDv[st * BQ + threadIdx.x] = row_dv;
    }
  };

  float dKa[NBH][4], dVa[NBH][4];
#pragma unroll
  for (int n = 0; n < NBH; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dKa[n][e] = dVa[n][e] = 0.f;

  if (niter > 0) {
    load_tile<T, BK, D, NT>(sK, k + (kvbase + k0) * D, Tk - k0, k);
    load_tile<T, BK, D, NT>(sV, v + (kvbase + k0) * D, Tk - k0, v);
    load_q(0, 0);
    store_rows(0);
  }
  cp_async_commit();

  for (int it = 0; it < niter; ++it) {
    const int st = it & 1;
    if (it + 1 < niter) {
      load_q(it + 1, st ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int gq = it / nqt, qt = it - gq * nqt;
    const int i0 = i_start + qt * BQ;
    const size_t qbase = ((size_t)b * Hq + hkv * G + gq) * Tq;
    const T *sQs = sQ + st * BQ * D;
    const T *sdOs = sdO + st * BQ * D;
    const float *sLs = sL + st * BQ;
    const float *sDvs = sDv + st * BQ;
    // Under a causal mask a warp whose first key lies past the tile's last query sees none of
    // the tile (on the diagonal: half the warps of a 128-key block on its first query tile).
    // Its P^T and dS^T are zero: it skips the products and only writes its zeros of dS^T,
    // leaving the issue slots it shares to a warp with work. Uniform across the warp.
    const int i_last = min(i0 + BQ, Tq) - 1;
    const bool blind = causal && k0 + kw * 16 > offset + i_last;

    // S^T = K_w Q^T and dP^T = V_w dO^T: rows are this warp's 16 keys, columns the BQ queries
    // (under SPLIT 2, this warp's one of them).
    float sT[NBQ][4], dpT[NBQ][4];
#pragma unroll
    for (int n = 0; n < NBQ; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) sT[n][e] = dpT[n][e] = 0.f;
    if (!blind) {
#pragma unroll
      for (int ks = 0; ks < KSD; ++ks) {
        uint32_t ka[4], va[4];
        const int arow = kw * 16 + (lane & 15), acol = ks * 16 + (lane >> 4) * 8;
        if (doS) ldsm_x4(ka, smem_addr(sK + swz<D>(arow, acol)));
        if (doP) ldsm_x4(va, smem_addr(sV + swz<D>(arow, acol)));
#pragma unroll
        for (int n2 = 0; n2 < NBQ / 2; ++n2) {
          const int qrow = n2 * 16 + (lane & 7) + ((lane >> 4) << 3);
          const int col = ks * 16 + ((lane >> 3) & 1) * 8;
          if (doS) {
            uint32_t bq[4];
            ldsm_x4(bq, smem_addr(sQs + swz<D>(qrow, col)));
            Mma<T>::run(sT[2 * n2], ka, bq[0], bq[1]);
            Mma<T>::run(sT[2 * n2 + 1], ka, bq[2], bq[3]);
          }
          if (doP) {
            uint32_t bo[4];
            ldsm_x4(bo, smem_addr(sdOs + swz<D>(qrow, col)));
            Mma<T>::run(dpT[2 * n2], va, bo[0], bo[1]);
            Mma<T>::run(dpT[2 * n2 + 1], va, bo[2], bo[3]);
          }
        }
      }
    }

    // P^T = exp2(S^T * scale_log2 - lse), zero where the key is invisible to the query; sT
    // holds P^T. Compiled with and without the cap, chosen once a step: a test of the cap
    // inside the loop made a branch of every score. Each score's exp is computed and then
    // selected, so the loop is straight-line code. __fmul_rn and __fsub_rn: the scaled score,
    // and the cap's product, are rounded before lse is subtracted, as they always were (an
    // FFMA would round once, and P would differ from the forward's in the last bit).
    if (doS) {
      auto p_of = [&](auto capped) {
#pragma unroll
        for (int n = 0; n < NBQ; ++n) {
          const int col = n * 8 + c4 * 2;
          const float2 l2 = lds_f2(sLs + col);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = i0 + col + (e & 1);
            const bool vis = i >= (e < 2 ? firstA : firstB) && i < (e < 2 ? endA : endB);
            float x = __fmul_rn(sT[n][e], scale_log2);
            if constexpr (decltype(capped)::value) x = cap(x);
            const float p = exp2_ftz(__fsub_rn(x, (e & 1) ? l2.y : l2.x));
            sT[n][e] = vis ? p : 0.f;
          }
        }
      };
      if (cap.on())
        p_of(Flag<true>{});
      else
        p_of(Flag<false>{});
    }
    if constexpr (SPLIT == 2) {
      // The pair swaps P^T and dP^T, lane for lane (the two share the fragment layout); past
      // the barrier both hold the same values, so both form the same dS^T below. The buffer is
      // read before this step's second barrier and next written after the next step's first.
      float *mine = sX + warp * (NBQ * 4 * 32) + lane;
      const float *theirs = sX + (warp ^ 1) * (NBQ * 4 * 32) + lane;
#pragma unroll
      for (int n = 0; n < NBQ; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) mine[(n * 4 + e) * 32] = doS ? sT[n][e] : dpT[n][e];
      __syncthreads();
#pragma unroll
      for (int n = 0; n < NBQ; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float x = theirs[(n * 4 + e) * 32];
          if (doS) dpT[n][e] = x;
          else sT[n][e] = x;
        }
    }
    // dS^T = P^T (dP^T - D): dpT becomes dS^T. Under a cap, times its slope at the capped
    // score, which is log2(P) + lse (in the log2 domain): recovered from P rather than kept
    // beside it in registers (or, for the second warp of a pair, swapped through sX too).
    auto ds_of = [&](auto capped) {
#pragma unroll
      for (int n = 0; n < NBQ; ++n) {
        const int col = n * 8 + c4 * 2;
        const float2 d2 = lds_f2(sDvs + col);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float ds = sT[n][e] * (dpT[n][e] - ((e & 1) ? d2.y : d2.x));
          if constexpr (decltype(capped)::value) {
            if (sT[n][e] > 0.f) ds *= cap.slope(__log2f(sT[n][e]) + sLs[col + (e & 1)]);
          }
          dpT[n][e] = ds;
        }
      }
    };
    if (cap.on())
      ds_of(Flag<true>{});
    else
      ds_of(Flag<false>{});

    // dS^T to shared memory for the dQ step (rows = keys, columns = queries), by the first
    // warp of a pair.
    if (half == 0) {
#pragma unroll
      for (int n = 0; n < NBQ; ++n) {
        store_pair(sdS + (kw * 16 + g) * DSS + n * 8 + c4 * 2, dpT[n][0], dpT[n][1]);
        store_pair(sdS + (kw * 16 + g + 8) * DSS + n * 8 + c4 * 2, dpT[n][2], dpT[n][3]);
      }
    }

    // dV += P^T dO and dK += dS^T Q over this warp's head-dim columns: A from registers,
    // B = dO / Q via ldmatrix.trans.
    if (!blind) {
#pragma unroll
      for (int kk = 0; kk < BQ / 16; ++kk) {
        uint32_t ap[4], ad[4];
        acc_to_a<T>(ap, sT[2 * kk], sT[2 * kk + 1]);
        acc_to_a<T>(ad, dpT[2 * kk], dpT[2 * kk + 1]);
#pragma unroll
        for (int n2 = 0; n2 < NBH / 2; ++n2) {
          const int row = kk * 16 + (lane & 15), col = half * DH + n2 * 16 + (lane >> 4) * 8;
          uint32_t bo[4], bq[4];
          ldsm_x4_t(bo, smem_addr(sdOs + swz<D>(row, col)));
          ldsm_x4_t(bq, smem_addr(sQs + swz<D>(row, col)));
          Mma<T>::run(dVa[2 * n2], ap, bo[0], bo[1]);
          Mma<T>::run(dVa[2 * n2 + 1], ap, bo[2], bo[3]);
          Mma<T>::run(dKa[2 * n2], ad, bq[0], bq[1]);
          Mma<T>::run(dKa[2 * n2 + 1], ad, bq[2], bq[3]);
        }
      }
    }
    // All of dS^T is in shared memory. Past this barrier no warp reads this Q/dO/lse stage
    // again, so the next step's prefetch into it needs no barrier of its own; and the next
    // step writes dS^T only after its first barrier, which every warp reaches after its dQ.
    __syncthreads();

    // dQ[i0 + BQ rows] += dS K over this block's BK keys. A = dS (query rows) read from the
    // transposed dS^T with ldmatrix.trans, once per 16-key step for all the warp's NBW
    // n-blocks; B = K (k = key) likewise. Under a causal mask the 16-key steps past the
    // tile's last query add zeros and are skipped.
    {
      const int kk_end = causal ? min(BK / 16, (offset + i_last - k0) / 16 + 1) : BK / 16;
      const int mb = warp % MB;
      const int nbase = (warp / MB) * NBW;
      float c[NBW][4];
#pragma unroll
      for (int n = 0; n < NBW; ++n) c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.f;
      // Compiled twice: the steps whole (every tile off the diagonal) as one straight-line
      // run whose ldmatrix ptxas schedules ahead of the mmas, and with the diagonal's exits.
      auto dq = [&](auto full) {
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
          if constexpr (!decltype(full)::value) {
            if (kk >= kk_end) break;
          }
          uint32_t a[4];
          const int key = kk * 16 + (lane & 7) + ((lane >> 4) << 3);
          const int qcol = mb * 16 + ((lane >> 3) & 1) * 8;
          ldsm_x4_t(a, smem_addr(sdS + key * DSS + qcol));
#pragma unroll
          for (int n2 = 0; n2 < NBW / 2; ++n2) {
            uint32_t bf[4];
            ldsm_x4_t(bf, smem_addr(sK + swz<D>(kk * 16 + (lane & 15),
                                               (nbase + 2 * n2) * 8 + (lane >> 4) * 8)));
            Mma<T>::run(c[2 * n2], a, bf[0], bf[1]);
            Mma<T>::run(c[2 * n2 + 1], a, bf[2], bf[3]);
          }
        }
      };
      if (kk_end == BK / 16)
        dq(Flag<true>{});
      else
        dq(Flag<false>{});
      // A row's adds from one pointer at constant offsets, behind one test: tested per add,
      // each add recomputed its 64-bit address behind its own branch (11 instructions an
      // add, 16 adds a step).
      const int iA = i0 + mb * 16 + g, iB = iA + 8;
      const int d0 = nbase * 8 + c4 * 2;
      if (iA < Tq) {
        float *rowA = dq_acc + (qbase + iA) * D + d0;
#pragma unroll
        for (int n = 0; n < NBW; ++n) atomic_add2(rowA + n * 8, c[n][0], c[n][1]);
      }
      if (iB < Tq) {
        float *rowB = dq_acc + (qbase + iB) * D + d0;
#pragma unroll
        for (int n = 0; n < NBW; ++n) atomic_add2(rowB + n * 8, c[n][2], c[n][3]);
      }
    }
    // The next tile's rows, into the stage the previous step last read before its second
    // barrier: the barrier at the top of the next step orders them before its reads.
    if (it + 1 < niter) store_rows(st ^ 1);
  }
  cp_async_wait<0>();

  if (jA < Tk) {
    T *rk = dk + (kvbase + jA) * D + half * DH;
    T *rv = dv + (kvbase + jA) * D + half * DH;
#pragma unroll
    for (int n = 0; n < NBH; ++n) {
      store_pair(rk + n * 8 + c4 * 2, dKa[n][0] * scale, dKa[n][1] * scale);
      store_pair(rv + n * 8 + c4 * 2, dVa[n][0], dVa[n][1]);
    }
  }
  if (jB < Tk) {
    T *rk = dk + (kvbase + jB) * D + half * DH;
    T *rv = dv + (kvbase + jB) * D + half * DH;
#pragma unroll
    for (int n = 0; n < NBH; ++n) {
      store_pair(rk + n * 8 + c4 * 2, dKa[n][2] * scale, dKa[n][3] * scale);
      store_pair(rv + n * 8 + c4 * 2, dVa[n][2], dVa[n][3]);
    }
  }
}

}  // namespace attn
}  // namespace temper

using namespace temper::attn;

// ---------------------------------------------------------------------------------------
// Entry points.
// ---------------------------------------------------------------------------------------
#define BWD_DQ_SIMPLE_CALL(T, DPL, SEG)                                                        \
  bwd_dq_simple<T, DPL, SEG>(static_cast<const T *>(p.q), static_cast<const T *>(p.k),         \
                             static_cast<const T *>(p.v), static_cast<const T *>(p.dout),      \
                             p.lse, p.dvec, p.kvalid, p.krange, band_of(p),                   \
                             static_cast<T *>(p.dq), p.hq, p.hkv, p.tq, p.tk, p.d, p.causal,   \
                             p.offset, p.scale_log2, p.scale, SoftCap(p))

#define BWD_DKDV_SIMPLE_CALL(T, DPL, SEG)                                                      \
  bwd_dkdv_simple<T, DPL, SEG>(static_cast<const T *>(p.q), static_cast<const T *>(p.k),       \
                               static_cast<const T *>(p.v), static_cast<const T *>(p.dout),    \
                               p.lse, p.dvec, p.kvalid, p.krange, band_of(p),                   \
                               static_cast<T *>(p.dk), static_cast<T *>(p.dv), p.hq, p.hkv,    \
                               p.tq, p.tk, p.d, p.causal, p.offset, p.scale_log2, p.scale,     \
                               SoftCap(p))

// attn_bwd_*_simple_seg_*: packed rows or a sliding window.
#define BWD_SIMPLE_ENTRY(T, SUF, DPL)                                                          \
  extern "C" __global__ void __launch_bounds__(256)                                            \
      attn_bwd_dq_simple_##SUF##_d##DPL(const AttnParams p) {                                  \
    BWD_DQ_SIMPLE_CALL(T, DPL, false);                                                         \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(256, 4)                                            \
      attn_bwd_dq_simple_seg_##SUF##_d##DPL(const AttnParams p) {                              \
    BWD_DQ_SIMPLE_CALL(T, DPL, true);                                                          \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(256)                                            \
      attn_bwd_dkdv_simple_##SUF##_d##DPL(const AttnParams p) {                                \
    BWD_DKDV_SIMPLE_CALL(T, DPL, false);                                                       \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(256, 4)                                            \
      attn_bwd_dkdv_simple_seg_##SUF##_d##DPL(const AttnParams p) {                            \
    BWD_DKDV_SIMPLE_CALL(T, DPL, true);                                                        \
  }

#define BWD_DTYPE(T, SUF)                                                                      \
  BWD_SIMPLE_ENTRY(T, SUF, 1)                                                                  \
  BWD_SIMPLE_ENTRY(T, SUF, 2)                                                                  \
  BWD_SIMPLE_ENTRY(T, SUF, 3)                                                                  \
  BWD_SIMPLE_ENTRY(T, SUF, 4)                                                                  \
  extern "C" __global__ void attn_bwd_dot_##SUF(const AttnParams p) {                          \
    bwd_dot<T>(static_cast<const T *>(p.o), static_cast<const T *>(p.dout), p.dvec, p.nrows,   \
               p.d);                                                                           \
  }                                                                                            \
  extern "C" __global__ void attn_dq_convert_##SUF(const AttnParams p) {                       \
    dq_convert<T>(p.dq_acc, static_cast<T *>(p.dq), (size_t)p.nrows * p.d, p.scale);           \
  }

BWD_DTYPE(float, f32)
BWD_DTYPE(__nv_bfloat16, bf16)
BWD_DTYPE(__half, f16)

#define BWD_MMA_CALL(T, D, W)                                                                  \
  bwd_mma<T, D, W>(static_cast<const T *>(p.q), static_cast<const T *>(p.k),                   \
                   static_cast<const T *>(p.v), static_cast<const T *>(p.dout), p.lse, p.dvec, \
                   p.kvalid, p.krange, band_of(p), static_cast<T *>(p.dk),                      \
                   static_cast<T *>(p.dv),                                                     \
                   p.dq_acc, p.hq, p.hkv, p.tq, p.tk, p.causal, p.offset, p.scale_log2,        \
                   p.scale, SoftCap(p))

// attn_bwd_mma_*: 64-key blocks of 4 warps; attn_bwd_mma2_*: 128-key blocks of 8 warps.
#define BWD_MMA_ENTRY(T, SUF, D)                                                               \
  extern "C" __global__ void __launch_bounds__(MmaBwdTraits<D, 4>::kThreads)                   \
      attn_bwd_mma_##SUF##_h##D(const AttnParams p) {                                          \
    BWD_MMA_CALL(T, D, 4);                                                                     \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(MmaBwdTraits<D, 8>::kThreads)                   \
      attn_bwd_mma2_##SUF##_h##D(const AttnParams p) {                                         \
    BWD_MMA_CALL(T, D, 8);                                                                     \
  }

// D = 256: 64-key blocks of 8 warps, two a 16-key tile (MmaBwdTraits); the narrow variant's
// 32-key blocks of 4 warps and 16-row query tiles, for cards whose blocks hold 99 KiB.
#define BWD_MMA_ENTRY_SPLIT(T, SUF, D)                                                         \
  extern "C" __global__ void __launch_bounds__(MmaBwdTraits<D, 8>::kThreads)                   \
      attn_bwd_mma_##SUF##_h##D(const AttnParams p) {                                          \
    BWD_MMA_CALL(T, D, 8);                                                                     \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(MmaBwdTraits<D, 4>::kThreads)                   \
      attn_bwd_mma_narrow_##SUF##_h##D(const AttnParams p) {                                   \
    BWD_MMA_CALL(T, D, 4);                                                                     \
  }

BWD_MMA_ENTRY(__nv_bfloat16, bf16, 64)
BWD_MMA_ENTRY(__nv_bfloat16, bf16, 128)
BWD_MMA_ENTRY_SPLIT(__nv_bfloat16, bf16, 256)
BWD_MMA_ENTRY(__half, f16, 64)
BWD_MMA_ENTRY(__half, f16, 128)
BWD_MMA_ENTRY_SPLIT(__half, f16, 256)
