// Scaled-dot-product attention, forward and backward, never materialising the Tq x Tk scores.
//
// Layout: q, o, dq `[B, Hq, Tq, D]`; k, v, dk, dv `[B, Hkv, Tk, D]` (contiguous); lse, dvec
// `[B, Hq, Tq]` f32. GQA: query head hq reads kv head hq / (Hq / Hkv).
//
// Mask contract (src/kernels/attention.rs): query i sits at absolute position offset + i and
// sees key j when (not causal or j <= offset + i) and key j is valid; a row that sees no key
// outputs zeros. Validity arrives as `kvalid` (`[B, Tk]` f32, nonzero = real token) plus
// `krange` (`[B, 3]` ints: first valid key, last valid key + 1, and whether every key in
// between is valid), both computed once per call by `attn_key_range`. The range lets every
// kernel skip whole tiles of left/right padding; the per-key mask is read only for
// sequences with holes (dense == 0). Without a key mask both pointers are null.
//
// Softmax runs in the log2 domain: x = (q.k) * scale * log2(e), p = exp2(x - m). The forward
// saves the natural-log log-sum-exp of the scaled scores per row, lse = (m + log2 l) * ln 2,
// or +inf for a row with no visible key (so that the backward's exp(s - lse) is exactly 0
// there without a special case).
//
// Two implementations of each pass, selectable from Rust (src/kernels/cuda/attention.rs):
//
// 1. "simple" (any dtype, D <= 128): CUDA-core f32 arithmetic, one warp per query row (or
//    per key row in the dK/dV pass). Key tiles of 32 are staged in shared memory as f32 and
//    shared by the block's 8 rows; lane j scores key j of the tile, the warp does the online
//    softmax update with one max-reduction, then each lane accumulates its D/32 output
//    dimensions by broadcasting the 32 probabilities. A split over the key range (grid z)
//    plus `attn_combine` turns the same kernel into the decode path: one or a few queries
//    against a long KV cache fill the GPU by splitting the keys, and the splits are merged
//    with their log-sum-exps. The backward is two kernels with no atomics: dQ (warp per
//    query row, loop over key tiles) and dK/dV (warp per key row, loop over the query rows
//    of every head in its GQA group, which sums the group's contributions for free).
//
// 2. "mma" (bf16/f16, D = 64 or 128): tensor cores through `mma.sync.m16n8k16` with f32
//    accumulation, FlashAttention-2 style.
//    Forward: a block of 4 warps owns 64 query rows (16 per warp, Q fragments held in
//    registers); K/V tiles of 64 keys stream through a two-stage cp.async pipeline into
//    XOR-swizzled shared memory (16-byte chunk index ^ (row & 7): conflict-free ldmatrix
//    without padding). S = Q K^T lands in registers in the mma accumulator layout, which is
//    also the A-operand layout of the next mma, so P never leaves registers for O += P V.
//    Causal blocks are launched heaviest first.
//    Backward: D = rowsum(dO * O) first (`attn_bwd_dot`). Then one block per 64 keys of one
//    kv head keeps K, V in shared memory and dK, dV in registers, and walks the query tiles
//    of every head in the GQA group: S^T = K Q^T, P^T = exp2(S^T - lse), dV += P^T dO,
//    dP^T = V dO^T, dS^T = P^T (dP^T - D), dK += dS^T Q, all with the key as the row so the
//    accumulators are the warp's own rows. dQ += dS K needs the query as the row: dS^T goes
//    through shared memory (read back transposed by ldmatrix.trans) and each block adds its
//    share into an f32 dQ accumulator with atomics; `attn_dq_convert` scales and rounds it.
//
// Every entry point is `extern "C"`; the dtype suffix is part of the name.

#include "common.cuh"

namespace temper {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

static __device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }
static __device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

static __device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Key range of sequence b: [lo, hi) holds every valid key; dense says no invalid key sits
// inside it. Without a mask the whole cache is valid.
struct KeyRange {
  int lo, hi, dense;
};

static __device__ __forceinline__ KeyRange key_range(const int *krange, int b, int Tk) {
  KeyRange r{0, Tk, 1};
  if (krange != nullptr) {
    r.lo = krange[3 * b];
    r.hi = krange[3 * b + 1];
    r.dense = krange[3 * b + 2];
  }
  return r;
}

// ---------------------------------------------------------------------------------------
// Key range: one block per sequence reduces the first/last valid key and the valid count.
// ---------------------------------------------------------------------------------------
extern "C" __global__ void attn_key_range(const float *__restrict__ kvalid, int *__restrict__ out,
                                          int Tk) {
  const int b = blockIdx.x;
  const float *row = kvalid + (size_t)b * Tk;
  int lo = Tk, hi = -1, count = 0;
  for (int j = threadIdx.x; j < Tk; j += blockDim.x) {
    if (row[j] != 0.f) {
      lo = min(lo, j);
      hi = max(hi, j);
      ++count;
    }
  }
  lo = __reduce_min_sync(0xffffffffu, lo);
  hi = __reduce_max_sync(0xffffffffu, hi);
  count = __reduce_add_sync(0xffffffffu, count);
  __shared__ int s_lo[32], s_hi[32], s_cnt[32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  if (lane == 0) {
    s_lo[warp] = lo;
    s_hi[warp] = hi;
    s_cnt[warp] = count;
  }
  __syncthreads();
  if (warp == 0) {
    lo = lane < nw ? s_lo[lane] : Tk;
    hi = lane < nw ? s_hi[lane] : -1;
    count = lane < nw ? s_cnt[lane] : 0;
    lo = __reduce_min_sync(0xffffffffu, lo);
    hi = __reduce_max_sync(0xffffffffu, hi);
    count = __reduce_add_sync(0xffffffffu, count);
    if (lane == 0) {
      if (count == 0) {
        out[3 * b] = 0;
        out[3 * b + 1] = 0;
        out[3 * b + 2] = 1;
      } else {
        out[3 * b] = lo;
        out[3 * b + 1] = hi + 1;
        out[3 * b + 2] = (count == hi + 1 - lo) ? 1 : 0;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Simple path (CUDA cores, f32 arithmetic, any dtype, D <= 32 * DPL).
// ---------------------------------------------------------------------------------------
constexpr int kSimpleWarps = 8;  // rows per block at most (blockDim.x = 32 * rows)
constexpr int kSimpleKT = 32;    // keys (or queries) per shared-memory tile: one per lane

// Block-level visible key range for `nrows` consecutive rows starting at flattened row r0 of
// the G * Tq rows that share one kv head: the largest query index among them bounds the
// causal horizon of the whole block.
static __device__ __forceinline__ int block_key_end(const KeyRange &kr, int r0, int nrows,
                                                    int Tq, int causal, int offset) {
  const int r_last = r0 + nrows - 1;
  const int i_max = (r0 / Tq != r_last / Tq) ? Tq - 1 : r_last % Tq;
  return causal ? min(kr.hi, offset + i_max + 1) : kr.hi;
}

// Forward. grid (B*Hkv, ceil(G*Tq / rows), nsplit), block 32 * rows threads. With nsplit > 1
// each z-slice handles a contiguous share of the key tiles and writes normalised partial
// outputs and their lse (-inf when empty) for attn_combine.
template <typename T, int DPL>
static __device__ void fwd_simple(const T *__restrict__ q, const T *__restrict__ k,
                                  const T *__restrict__ v, T *__restrict__ o,
                                  float *__restrict__ lse, const float *__restrict__ kvalid,
                                  const int *__restrict__ krange, float *__restrict__ opart,
                                  float *__restrict__ lsepart, int Hq, int Hkv, int Tq, int Tk,
                                  int D, int causal, int offset, float scale_log2) {
  constexpr int DMAX = 32 * DPL;
  // +1 word per key row: lane j reads row j at the same d, which would otherwise be a
  // 32-way bank conflict when DMAX is a multiple of 32.
  __shared__ float ks[kSimpleKT * (DMAX + 1)];
  __shared__ float vs[kSimpleKT * DMAX];
  __shared__ float qs[kSimpleWarps * DMAX];

  const int nw = blockDim.x >> 5;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int G = Hq / Hkv;
  const int b = blockIdx.x / Hkv, hkv = blockIdx.x % Hkv;
  const int B = gridDim.x / Hkv;
  const int rows = G * Tq;
  const int r0 = blockIdx.y * nw;
  const int r = r0 + warp;
  const bool active = r < rows;
  const int g = active ? r / Tq : 0, i = active ? r % Tq : 0;
  const size_t qrow = ((size_t)b * Hq + hkv * G + g) * Tq + i;

  const KeyRange kr = key_range(krange, b, Tk);
  const int row_hi = causal ? min(kr.hi, offset + i + 1) : kr.hi;
  const int blk_hi = block_key_end(kr, r0, min(nw, rows - r0), Tq, causal, offset);
  const int ntiles = blk_hi > kr.lo ? (blk_hi - kr.lo + kSimpleKT - 1) / kSimpleKT : 0;
  const int per = (ntiles + gridDim.z - 1) / gridDim.z;
  const int t_begin = blockIdx.z * per, t_end = min(ntiles, t_begin + per);

  float *qw = qs + warp * DMAX;
  if (active)
    for (int d = lane; d < D; d += 32) qw[d] = to_f32(q[qrow * D + d]) * scale_log2;

  const size_t kvbase = ((size_t)b * Hkv + hkv) * Tk;
  float m = neg_inf(), l = 0.f;
  float acc[DPL];
#pragma unroll
  for (int t = 0; t < DPL; ++t) acc[t] = 0.f;

  for (int t = t_begin; t < t_end; ++t) {
    const int k0 = kr.lo + t * kSimpleKT;
    __syncthreads();  // the previous tile (and qs on the first pass) is consumed / written
    for (int e = threadIdx.x; e < kSimpleKT * D; e += blockDim.x) {
      const int jj = e / D, d = e - jj * D;
      const int j = k0 + jj;
      float kk = 0.f, vv = 0.f;
      if (j < Tk) {
        kk = to_f32(k[(kvbase + j) * D + d]);
        vv = to_f32(v[(kvbase + j) * D + d]);
      }
      ks[jj * (DMAX + 1) + d] = kk;
      vs[jj * DMAX + d] = vv;
    }
    __syncthreads();
    if (active) {
      const int j = k0 + lane;
      // j >= lo holds because tiles start there; j < row_hi <= hi <= Tk keeps the mask read
      // in bounds.
      const bool vis = j < row_hi && (kr.dense || kvalid[(size_t)b * Tk + j] != 0.f);
      float s = neg_inf();
      if (vis) {
        s = 0.f;
        const float *kr_ = ks + lane * (DMAX + 1);
        for (int d = 0; d < D; ++d) s = fmaf(qw[d], kr_[d], s);
      }
      const float m_new = fmaxf(m, warp_max(s));
      // All keys so far masked: keep the reference at 0 so that -inf - -inf never appears.
      const float ref = m_new == neg_inf() ? 0.f : m_new;
      const float alpha = exp2f(m - ref);
      const float p = exp2f(s - ref);
      l = l * alpha + p;  // per-lane partial sum, reduced once at the end
#pragma unroll
      for (int t2 = 0; t2 < DPL; ++t2) acc[t2] *= alpha;
      for (int jj = 0; jj < kSimpleKT; ++jj) {
        const float pj = __shfl_sync(0xffffffffu, p, jj);
        if (pj != 0.f) {  // uniform across the warp
#pragma unroll
          for (int t2 = 0; t2 < DPL; ++t2) acc[t2] = fmaf(pj, vs[jj * DMAX + lane + 32 * t2], acc[t2]);
        }
      }
      m = m_new;
    }
  }
  if (!active) return;
  const float lsum = warp_sum(l);
  const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
  if (gridDim.z == 1) {
#pragma unroll
    for (int t = 0; t < DPL; ++t) {
      const int d = lane + 32 * t;
      if (d < D) o[qrow * D + d] = from_f32<T>(acc[t] * inv);
    }
    if (lane == 0) lse[qrow] = lsum > 0.f ? (m + log2f(lsum)) * kLn2 : pos_inf();
  } else {
    const size_t nrows_total = (size_t)B * Hq * Tq;
    const size_t prow = (size_t)blockIdx.z * nrows_total + qrow;
#pragma unroll
    for (int t = 0; t < DPL; ++t) {
      const int d = lane + 32 * t;
      if (d < D) opart[prow * D + d] = acc[t] * inv;
    }
    if (lane == 0) lsepart[prow] = lsum > 0.f ? (m + log2f(lsum)) * kLn2 : neg_inf();
  }
}

// Merges nsplit partial rows: o = sum_s exp(lse_s - lse) o_s, lse = logsumexp_s lse_s.
// One warp per row.
template <typename T>
static __device__ void combine(const float *__restrict__ opart, const float *__restrict__ lsepart,
                               T *__restrict__ o, float *__restrict__ lse, int nrows, int D,
                               int nsplit) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= nrows) return;
  float mx = neg_inf();
  for (int s = 0; s < nsplit; ++s) mx = fmaxf(mx, lsepart[(size_t)s * nrows + row]);
  if (mx == neg_inf()) {
    for (int d = lane; d < D; d += 32) o[(size_t)row * D + d] = from_f32<T>(0.f);
    if (lane == 0) lse[row] = pos_inf();
    return;
  }
  float wsum = 0.f;
  for (int s = 0; s < nsplit; ++s) wsum += __expf(lsepart[(size_t)s * nrows + row] - mx);
  const float inv = 1.f / wsum;
  for (int d = lane; d < D; d += 32) {
    float acc = 0.f;
    for (int s = 0; s < nsplit; ++s) {
      const float w = __expf(lsepart[(size_t)s * nrows + row] - mx);
      acc = fmaf(w, opart[((size_t)s * nrows + row) * D + d], acc);
    }
    o[(size_t)row * D + d] = from_f32<T>(acc * inv);
  }
  if (lane == 0) lse[row] = mx + logf(wsum);
}

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
// dq = scale * sum_j p_ij (dp_ij - D_i) k_j with p recomputed from the saved lse.
template <typename T, int DPL>
static __device__ void bwd_dq_simple(const T *__restrict__ q, const T *__restrict__ k,
                                     const T *__restrict__ v, const T *__restrict__ dout,
                                     const float *__restrict__ lse, const float *__restrict__ dvec,
                                     const float *__restrict__ kvalid,
                                     const int *__restrict__ krange, T *__restrict__ dq, int Hq,
                                     int Hkv, int Tq, int Tk, int D, int causal, int offset,
                                     float scale_log2, float scale) {
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
  const int row_hi = causal ? min(kr.hi, offset + i + 1) : kr.hi;
  const int blk_hi = block_key_end(kr, r0, min(nw, rows - r0), Tq, causal, offset);
  const int ntiles = blk_hi > kr.lo ? (blk_hi - kr.lo + kSimpleKT - 1) / kSimpleKT : 0;

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
    const int k0 = kr.lo + t * kSimpleKT;
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
      const bool vis = j < row_hi && (kr.dense || kvalid[(size_t)b * Tk + j] != 0.f);
      float ds = 0.f;
      if (vis) {
        float s = 0.f, dp = 0.f;
        const float *kr_ = ks + lane * (DMAX + 1);
        const float *vr_ = vs + lane * (DMAX + 1);
        for (int d = 0; d < D; ++d) {
          s = fmaf(qw[d], kr_[d], s);
          dp = fmaf(dow[d], vr_[d], dp);
        }
        const float p = exp2f(s - lse2);
        ds = p * (dp - dr);
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
// grid (B*Hkv, ceil(Tk / 8)), block 256.
template <typename T, int DPL>
static __device__ void bwd_dkdv_simple(const T *__restrict__ q, const T *__restrict__ k,
                                       const T *__restrict__ v, const T *__restrict__ dout,
                                       const float *__restrict__ lse,
                                       const float *__restrict__ dvec,
                                       const float *__restrict__ kvalid,
                                       const int *__restrict__ krange, T *__restrict__ dk,
                                       T *__restrict__ dv, int Hq, int Hkv, int Tq, int Tk, int D,
                                       int causal, int offset, float scale_log2, float scale) {
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
  // The first query that can see the block's first key.
  const int i_start = causal ? max(0, j0 - offset) : 0;
  const int nqt = (any && Tq > i_start) ? (Tq - i_start + kSimpleKT - 1) / kSimpleKT : 0;

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
      const bool vis = kvis && i < Tq && (!causal || j <= offset + i);
      float p = 0.f, ds = 0.f;
      if (vis) {
        float s = 0.f, dp = 0.f;
        const float *qr_ = qs + lane * (DMAX + 1);
        const float *gr_ = dos + lane * (DMAX + 1);
        for (int d = 0; d < D; ++d) {
          s = fmaf(qr_[d], kwr[d], s);
          dp = fmaf(gr_[d], vwr[d], dp);
        }
        p = exp2f(s * scale_log2 - lse2s[lane]);
        ds = p * (dp - dvs[lane]);
      }
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
// Tensor-core path (bf16 / f16, D in {64, 128}), sm_80+.
// ---------------------------------------------------------------------------------------
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

// Forward. grid (B*Hq, ceil(Tq / 64)), block 128, dynamic shared memory
// (64 + 4 * 64) * D * sizeof(T) + 2 * 64 * 4 bytes.
template <typename T, int D>
static __device__ void fwd_mma(const T *__restrict__ q, const T *__restrict__ k,
                               const T *__restrict__ v, T *__restrict__ o,
                               float *__restrict__ lse, const float *__restrict__ kvalid,
                               const int *__restrict__ krange, int Hq, int Hkv, int Tq, int Tk,
                               int causal, int offset, float scale_log2) {
  constexpr int BQ = 64, BK = 64, NT = 128;
  constexpr int KSTEPS = D / 16;  // k-steps of S = Q K^T
  constexpr int NBD = D / 8;      // n-blocks of O
  constexpr int NBK = BK / 8;     // n-blocks of S
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *sQ = reinterpret_cast<T *>(smem_raw);
  T *sK = sQ + BQ * D;      // two stages
  T *sV = sK + 2 * BK * D;  // two stages
  float *sM = reinterpret_cast<float *>(sV + 2 * BK * D);  // two stages of BK key flags

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, c4 = lane & 3;
  // Under a causal mask later query tiles see more keys: launch them first so that the
  // longest blocks do not trail at the end of the grid.
  const int q0 = (gridDim.y - 1 - blockIdx.y) * BQ;
  const int bh = blockIdx.x;
  const int b = bh / Hq, hq = bh % Hq;
  const int hkv = hq / (Hq / Hkv);
  const T *qg = q + (size_t)bh * Tq * D;
  const T *kg = k + ((size_t)b * Hkv + hkv) * Tk * D;
  const T *vg = v + ((size_t)b * Hkv + hkv) * Tk * D;

  const KeyRange kr = key_range(krange, b, Tk);
  const int q_last = min(q0 + BQ, Tq) - 1;
  const int kend = causal ? min(kr.hi, offset + q_last + 1) : kr.hi;
  // Keys below kfull are visible to every row of the tile (given a dense range).
  const int kfull = causal ? min(kr.hi, offset + q0 + 1) : kr.hi;
  const int ntiles = kend > kr.lo ? (kend - kr.lo + BK - 1) / BK : 0;

  const int rA = q0 + warp * 16 + g, rB = rA + 8;
  const int hiA = causal ? min(kr.hi, offset + rA + 1) : kr.hi;
  const int hiB = causal ? min(kr.hi, offset + rB + 1) : kr.hi;

  auto load_kv = [&](int t, int st) {
    const int k0 = kr.lo + t * BK;
    load_tile<T, BK, D, NT>(sK + st * BK * D, kg + (size_t)k0 * D, Tk - k0, k);
    load_tile<T, BK, D, NT>(sV + st * BK * D, vg + (size_t)k0 * D, Tk - k0, v);
    if (!kr.dense)
      for (int jj = threadIdx.x; jj < BK; jj += NT)
        sM[st * BK + jj] = k0 + jj < Tk ? kvalid[(size_t)b * Tk + k0 + jj] : 0.f;
  };

  float acc[NBD][4];
#pragma unroll
  for (int n = 0; n < NBD; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  float mA = neg_inf(), mB = neg_inf(), lA = 0.f, lB = 0.f;
  uint32_t qf[KSTEPS][4];

  load_tile<T, BQ, D, NT>(sQ, qg + (size_t)q0 * D, Tq - q0, q);
  if (ntiles > 0) load_kv(0, 0);
  cp_async_commit();

  for (int t = 0; t < ntiles; ++t) {
    const int st = t & 1;
    if (t + 1 < ntiles) {
      load_kv(t + 1, st ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (t == 0) {
#pragma unroll
      for (int ks = 0; ks < KSTEPS; ++ks)
        ldsm_x4(qf[ks], smem_addr(sQ + swz<D>(warp * 16 + (lane & 15), ks * 16 + (lane >> 4) * 8)));
    }
    const T *sKs = sK + st * BK * D;
    const T *sVs = sV + st * BK * D;
    const int k0 = kr.lo + t * BK;

    // S = Q K^T for this warp's 16 rows and the tile's 64 keys.
    float s[NBK][4];
#pragma unroll
    for (int n = 0; n < NBK; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
#pragma unroll
      for (int n2 = 0; n2 < NBK / 2; ++n2) {
        uint32_t bf[4];
        const int key = n2 * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int col = ks * 16 + ((lane >> 3) & 1) * 8;
        ldsm_x4(bf, smem_addr(sKs + swz<D>(key, col)));
        Mma<T>::run(s[2 * n2], qf[ks], bf[0], bf[1]);
        Mma<T>::run(s[2 * n2 + 1], qf[ks], bf[2], bf[3]);
      }
    }

    // Scale to the log2 domain; mask only tiles that straddle a boundary or have holes.
    const bool need_mask = !kr.dense || k0 + BK > kfull;
#pragma unroll
    for (int n = 0; n < NBK; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[n][e] * scale_log2;
        if (need_mask) {
          const int jj = n * 8 + c4 * 2 + (e & 1);
          const int j = k0 + jj;
          const bool ok = j < (e < 2 ? hiA : hiB) && (kr.dense || sM[st * BK + jj] != 0.f);
          if (!ok) x = neg_inf();
        }
        s[n][e] = x;
      }
    }

    // Online softmax: rows A (g) and B (g + 8); the 4 lanes of a quad share a row.
    float mxA = neg_inf(), mxB = neg_inf();
#pragma unroll
    for (int n = 0; n < NBK; ++n) {
      mxA = fmaxf(mxA, fmaxf(s[n][0], s[n][1]));
      mxB = fmaxf(mxB, fmaxf(s[n][2], s[n][3]));
    }
    mxA = fmaxf(mxA, __shfl_xor_sync(0xffffffffu, mxA, 1));
    mxA = fmaxf(mxA, __shfl_xor_sync(0xffffffffu, mxA, 2));
    mxB = fmaxf(mxB, __shfl_xor_sync(0xffffffffu, mxB, 1));
    mxB = fmaxf(mxB, __shfl_xor_sync(0xffffffffu, mxB, 2));
    const float mnA = fmaxf(mA, mxA), mnB = fmaxf(mB, mxB);
    const float refA = mnA == neg_inf() ? 0.f : mnA;
    const float refB = mnB == neg_inf() ? 0.f : mnB;
    const float alA = exp2f(mA - refA), alB = exp2f(mB - refB);
    mA = mnA;
    mB = mnB;
    float sumA = 0.f, sumB = 0.f;
#pragma unroll
    for (int n = 0; n < NBK; ++n) {
      s[n][0] = exp2f(s[n][0] - refA);
      s[n][1] = exp2f(s[n][1] - refA);
      s[n][2] = exp2f(s[n][2] - refB);
      s[n][3] = exp2f(s[n][3] - refB);
      sumA += s[n][0] + s[n][1];
      sumB += s[n][2] + s[n][3];
    }
    lA = lA * alA + sumA;  // per-lane partial; the quad is reduced once at the end
    lB = lB * alB + sumB;
#pragma unroll
    for (int n = 0; n < NBD; ++n) {
      acc[n][0] *= alA;
      acc[n][1] *= alA;
      acc[n][2] *= alB;
      acc[n][3] *= alB;
    }

    // O += P V: P straight from the S accumulators (C layout == A layout), V via
    // ldmatrix.trans because V is stored [key][d] and the B operand wants k = key.
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      const uint32_t a[4] = {Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]),
                             Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                             Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int n2 = 0; n2 < NBD / 2; ++n2) {
        uint32_t bf[4];
        ldsm_x4_t(bf, smem_addr(sVs + swz<D>(kk * 16 + (lane & 15), n2 * 16 + (lane >> 4) * 8)));
        Mma<T>::run(acc[2 * n2], a, bf[0], bf[1]);
        Mma<T>::run(acc[2 * n2 + 1], a, bf[2], bf[3]);
      }
    }
    __syncthreads();  // this stage is read by every warp before the next prefetch reuses it
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the block exits

  lA += __shfl_xor_sync(0xffffffffu, lA, 1);
  lA += __shfl_xor_sync(0xffffffffu, lA, 2);
  lB += __shfl_xor_sync(0xffffffffu, lB, 1);
  lB += __shfl_xor_sync(0xffffffffu, lB, 2);
  const float invA = lA > 0.f ? 1.f / lA : 0.f;
  const float invB = lB > 0.f ? 1.f / lB : 0.f;
  T *og = o + (size_t)bh * Tq * D;
  if (rA < Tq) {
#pragma unroll
    for (int n = 0; n < NBD; ++n)
      store_pair(og + (size_t)rA * D + n * 8 + c4 * 2, acc[n][0] * invA, acc[n][1] * invA);
    if (c4 == 0) lse[(size_t)bh * Tq + rA] = lA > 0.f ? (mA + log2f(lA)) * kLn2 : pos_inf();
  }
  if (rB < Tq) {
#pragma unroll
    for (int n = 0; n < NBD; ++n)
      store_pair(og + (size_t)rB * D + n * 8 + c4 * 2, acc[n][2] * invB, acc[n][3] * invB);
    if (c4 == 0) lse[(size_t)bh * Tq + rB] = lB > 0.f ? (mB + log2f(lB)) * kLn2 : pos_inf();
  }
}

static __device__ __forceinline__ void atomic_add2(float *dst, float x, float y) {
#if __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2 *>(dst), make_float2(x, y));
#else
  atomicAdd(dst, x);
  atomicAdd(dst + 1, y);
#endif
}

// dK, dV (and dQ through f32 atomics). grid (B*Hkv, ceil(Tk / 64)), block 128, dynamic
// shared memory (2 * 64 + 4 * BQ) * D * sizeof(T) + 64 * (BQ + 8) * sizeof(T) + 4 * BQ * 4.
// BQ (query rows per step) is 64 for D = 64 and 32 for D = 128, which keeps dK, dV (in
// registers for the whole kernel) plus S^T and dP^T under the register budget.
template <typename T, int D, int BQ>
static __device__ void bwd_mma(const T *__restrict__ q, const T *__restrict__ k,
                               const T *__restrict__ v, const T *__restrict__ dout,
                               const float *__restrict__ lse, const float *__restrict__ dvec,
                               const float *__restrict__ kvalid, const int *__restrict__ krange,
                               T *__restrict__ dk, T *__restrict__ dv, float *__restrict__ dq_acc,
                               int Hq, int Hkv, int Tq, int Tk, int causal, int offset,
                               float scale_log2, float scale) {
  constexpr int BK = 64, NT = 128;
  constexpr int KSD = D / 16;  // k-steps over the head dim
  constexpr int NBQ = BQ / 8;  // n-blocks over the query tile
  constexpr int NBD = D / 8;   // n-blocks over the head dim
  constexpr int DSS = BQ + 8;  // dS^T row stride: 16 bytes of padding keep ldmatrix conflict-free
  constexpr int MB = BQ / 16;  // m-blocks of the dQ tile
  constexpr int WPM = 4 / MB;  // warps per m-block in the dQ step
  constexpr int NBW = NBD / WPM;  // dQ n-blocks per warp
  static_assert(MB * WPM == 4 && NBW % 2 == 0, "dQ work split");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *sK = reinterpret_cast<T *>(smem_raw);
  T *sV = sK + BK * D;
  T *sQ = sV + BK * D;       // two stages
  T *sdO = sQ + 2 * BQ * D;  // two stages
  T *sdS = sdO + 2 * BQ * D;
  float *sL = reinterpret_cast<float *>(sdS + BK * DSS);  // two stages: lse * log2(e)
  float *sDv = sL + 2 * BQ;                               // two stages: rowsum(dO * O)

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, c4 = lane & 3;
  const int G = Hq / Hkv;
  const int k0 = blockIdx.y * BK;
  const int b = blockIdx.x / Hkv, hkv = blockIdx.x % Hkv;
  const size_t kvbase = ((size_t)b * Hkv + hkv) * Tk;
  const KeyRange kr = key_range(krange, b, Tk);

  const int jA = k0 + warp * 16 + g, jB = jA + 8;
  const bool validA = jA >= kr.lo && jA < kr.hi && (kr.dense || kvalid[(size_t)b * Tk + jA] != 0.f);
  const bool validB = jB >= kr.lo && jB < kr.hi && (kr.dense || kvalid[(size_t)b * Tk + jB] != 0.f);

  const bool any = k0 < kr.hi && k0 + BK > kr.lo;
  const int i_start = causal ? max(0, k0 - offset) : 0;
  const int nqt = (any && Tq > i_start) ? (Tq - i_start + BQ - 1) / BQ : 0;
  const int niter = G * nqt;

  auto load_q = [&](int it, int st) {
    const int gq = it / nqt, qt = it - gq * nqt;
    const int i0 = i_start + qt * BQ;
    const size_t qbase = ((size_t)b * Hq + hkv * G + gq) * Tq;
    load_tile<T, BQ, D, NT>(sQ + st * BQ * D, q + (qbase + i0) * D, Tq - i0, q);
    load_tile<T, BQ, D, NT>(sdO + st * BQ * D, dout + (qbase + i0) * D, Tq - i0, dout);
    for (int x = threadIdx.x; x < BQ; x += NT) {
      const int i = i0 + x;
      sL[st * BQ + x] = i < Tq ? lse[qbase + i] * kLog2e : pos_inf();
      sDv[st * BQ + x] = i < Tq ? dvec[qbase + i] : 0.f;
    }
  };

  float dKa[NBD][4], dVa[NBD][4];
#pragma unroll
  for (int n = 0; n < NBD; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dKa[n][e] = dVa[n][e] = 0.f;

  if (niter > 0) {
    load_tile<T, BK, D, NT>(sK, k + (kvbase + k0) * D, Tk - k0, k);
    load_tile<T, BK, D, NT>(sV, v + (kvbase + k0) * D, Tk - k0, v);
    load_q(0, 0);
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

    // S^T = K_w Q^T and dP^T = V_w dO^T: rows are this warp's 16 keys, columns the BQ queries.
    float sT[NBQ][4], dpT[NBQ][4];
#pragma unroll
    for (int n = 0; n < NBQ; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) sT[n][e] = dpT[n][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KSD; ++ks) {
      uint32_t ka[4], va[4];
      const int arow = warp * 16 + (lane & 15), acol = ks * 16 + (lane >> 4) * 8;
      ldsm_x4(ka, smem_addr(sK + swz<D>(arow, acol)));
      ldsm_x4(va, smem_addr(sV + swz<D>(arow, acol)));
#pragma unroll
      for (int n2 = 0; n2 < NBQ / 2; ++n2) {
        const int qrow = n2 * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int col = ks * 16 + ((lane >> 3) & 1) * 8;
        uint32_t bq[4], bo[4];
        ldsm_x4(bq, smem_addr(sQs + swz<D>(qrow, col)));
        ldsm_x4(bo, smem_addr(sdOs + swz<D>(qrow, col)));
        Mma<T>::run(sT[2 * n2], ka, bq[0], bq[1]);
        Mma<T>::run(sT[2 * n2 + 1], ka, bq[2], bq[3]);
        Mma<T>::run(dpT[2 * n2], va, bo[0], bo[1]);
        Mma<T>::run(dpT[2 * n2 + 1], va, bo[2], bo[3]);
      }
    }

    // P^T = exp2(S^T * scale_log2 - lse), zero where the key is invisible to the query;
    // then dS^T = P^T (dP^T - D). sT holds P^T, dpT becomes dS^T.
#pragma unroll
    for (int n = 0; n < NBQ; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n * 8 + c4 * 2 + (e & 1);
        const int i = i0 + col;
        const int j = e < 2 ? jA : jB;
        const bool vis = (e < 2 ? validA : validB) && i < Tq && (!causal || j <= offset + i);
        const float p = vis ? exp2f(sT[n][e] * scale_log2 - sLs[col]) : 0.f;
        sT[n][e] = p;
        dpT[n][e] = p * (dpT[n][e] - sDvs[col]);
      }
    }

    // dS^T to shared memory for the dQ step (rows = keys, columns = queries).
#pragma unroll
    for (int n = 0; n < NBQ; ++n) {
      store_pair(sdS + (warp * 16 + g) * DSS + n * 8 + c4 * 2, dpT[n][0], dpT[n][1]);
      store_pair(sdS + (warp * 16 + g + 8) * DSS + n * 8 + c4 * 2, dpT[n][2], dpT[n][3]);
    }

    // dV += P^T dO and dK += dS^T Q: A from registers, B = dO / Q via ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
      const uint32_t ap[4] = {Mma<T>::pack(sT[2 * kk][0], sT[2 * kk][1]),
                              Mma<T>::pack(sT[2 * kk][2], sT[2 * kk][3]),
                              Mma<T>::pack(sT[2 * kk + 1][0], sT[2 * kk + 1][1]),
                              Mma<T>::pack(sT[2 * kk + 1][2], sT[2 * kk + 1][3])};
      const uint32_t ad[4] = {Mma<T>::pack(dpT[2 * kk][0], dpT[2 * kk][1]),
                              Mma<T>::pack(dpT[2 * kk][2], dpT[2 * kk][3]),
                              Mma<T>::pack(dpT[2 * kk + 1][0], dpT[2 * kk + 1][1]),
                              Mma<T>::pack(dpT[2 * kk + 1][2], dpT[2 * kk + 1][3])};
#pragma unroll
      for (int n2 = 0; n2 < NBD / 2; ++n2) {
        const int row = kk * 16 + (lane & 15), col = n2 * 16 + (lane >> 4) * 8;
        uint32_t bo[4], bq[4];
        ldsm_x4_t(bo, smem_addr(sdOs + swz<D>(row, col)));
        ldsm_x4_t(bq, smem_addr(sQs + swz<D>(row, col)));
        Mma<T>::run(dVa[2 * n2], ap, bo[0], bo[1]);
        Mma<T>::run(dVa[2 * n2 + 1], ap, bo[2], bo[3]);
        Mma<T>::run(dKa[2 * n2], ad, bq[0], bq[1]);
        Mma<T>::run(dKa[2 * n2 + 1], ad, bq[2], bq[3]);
      }
    }
    __syncthreads();  // all of dS^T is in shared memory

    // dQ[i0 + BQ rows] += dS K over this block's 64 keys. A = dS (query rows) read from the
    // transposed dS^T with ldmatrix.trans; B = K (k = key) likewise.
    {
      const int mb = warp % MB;
      const int nbase = (warp / MB) * NBW;
#pragma unroll
      for (int n2 = 0; n2 < NBW / 2; ++n2) {
        float c0[4] = {0.f, 0.f, 0.f, 0.f}, c1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
          uint32_t a[4], bf[4];
          const int key = kk * 16 + (lane & 7) + ((lane >> 4) << 3);
          const int qcol = mb * 16 + ((lane >> 3) & 1) * 8;
          ldsm_x4_t(a, smem_addr(sdS + key * DSS + qcol));
          ldsm_x4_t(bf, smem_addr(sK + swz<D>(kk * 16 + (lane & 15),
                                             (nbase + 2 * n2) * 8 + (lane >> 4) * 8)));
          Mma<T>::run(c0, a, bf[0], bf[1]);
          Mma<T>::run(c1, a, bf[2], bf[3]);
        }
        const int iA = i0 + mb * 16 + g, iB = iA + 8;
        const int d0 = (nbase + 2 * n2) * 8 + c4 * 2;
        if (iA < Tq) {
          float *row = dq_acc + (qbase + iA) * D;
          atomic_add2(row + d0, c0[0], c0[1]);
          atomic_add2(row + d0 + 8, c1[0], c1[1]);
        }
        if (iB < Tq) {
          float *row = dq_acc + (qbase + iB) * D;
          atomic_add2(row + d0, c0[2], c0[3]);
          atomic_add2(row + d0 + 8, c1[2], c1[3]);
        }
      }
    }
    __syncthreads();  // dS^T and this Q/dO stage are free for the next step
  }
  cp_async_wait<0>();

  if (jA < Tk) {
    T *rk = dk + (kvbase + jA) * D;
    T *rv = dv + (kvbase + jA) * D;
#pragma unroll
    for (int n = 0; n < NBD; ++n) {
      store_pair(rk + n * 8 + c4 * 2, dKa[n][0] * scale, dKa[n][1] * scale);
      store_pair(rv + n * 8 + c4 * 2, dVa[n][0], dVa[n][1]);
    }
  }
  if (jB < Tk) {
    T *rk = dk + (kvbase + jB) * D;
    T *rv = dv + (kvbase + jB) * D;
#pragma unroll
    for (int n = 0; n < NBD; ++n) {
      store_pair(rk + n * 8 + c4 * 2, dKa[n][2] * scale, dKa[n][3] * scale);
      store_pair(rv + n * 8 + c4 * 2, dVa[n][2], dVa[n][3]);
    }
  }
}

}  // namespace attn
}  // namespace temper

using namespace temper::attn;

// ---------------------------------------------------------------------------------------
// Entry points. Names: <pass>_<dtype>[_d<DPL*32> | _h<D>].
// ---------------------------------------------------------------------------------------
#define SIMPLE_ENTRIES(T, SUF, DPL)                                                            \
  extern "C" __global__ void __launch_bounds__(256)                                            \
      attn_fwd_simple_##SUF##_d##DPL(const T *q, const T *k, const T *v, T *o, float *lse,     \
                                     const float *kvalid, const int *krange, float *opart,     \
                                     float *lsepart, int Hq, int Hkv, int Tq, int Tk, int D,   \
                                     int causal, int offset, float scale_log2) {               \
    fwd_simple<T, DPL>(q, k, v, o, lse, kvalid, krange, opart, lsepart, Hq, Hkv, Tq, Tk, D,    \
                       causal, offset, scale_log2);                                            \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(256) attn_bwd_dq_simple_##SUF##_d##DPL(         \
      const T *q, const T *k, const T *v, const T *dout, const float *lse, const float *dvec,  \
      const float *kvalid, const int *krange, T *dq, int Hq, int Hkv, int Tq, int Tk, int D,   \
      int causal, int offset, float scale_log2, float scale) {                                 \
    bwd_dq_simple<T, DPL>(q, k, v, dout, lse, dvec, kvalid, krange, dq, Hq, Hkv, Tq, Tk, D,    \
                          causal, offset, scale_log2, scale);                                  \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(256) attn_bwd_dkdv_simple_##SUF##_d##DPL(       \
      const T *q, const T *k, const T *v, const T *dout, const float *lse, const float *dvec,  \
      const float *kvalid, const int *krange, T *dk, T *dv, int Hq, int Hkv, int Tq, int Tk,   \
      int D, int causal, int offset, float scale_log2, float scale) {                          \
    bwd_dkdv_simple<T, DPL>(q, k, v, dout, lse, dvec, kvalid, krange, dk, dv, Hq, Hkv, Tq, Tk, \
                            D, causal, offset, scale_log2, scale);                             \
  }

#define DTYPE_ENTRIES(T, SUF)                                                                  \
  SIMPLE_ENTRIES(T, SUF, 1)                                                                    \
  SIMPLE_ENTRIES(T, SUF, 2)                                                                    \
  SIMPLE_ENTRIES(T, SUF, 3)                                                                    \
  SIMPLE_ENTRIES(T, SUF, 4)                                                                    \
  extern "C" __global__ void attn_combine_##SUF(const float *opart, const float *lsepart, T *o, \
                                                float *lse, int nrows, int D, int nsplit) {    \
    combine<T>(opart, lsepart, o, lse, nrows, D, nsplit);                                      \
  }                                                                                            \
  extern "C" __global__ void attn_bwd_dot_##SUF(const T *o, const T *dout, float *dvec,        \
                                                int nrows, int D) {                            \
    bwd_dot<T>(o, dout, dvec, nrows, D);                                                       \
  }                                                                                            \
  extern "C" __global__ void attn_dq_convert_##SUF(const float *acc, T *dq, unsigned long long n, \
                                                   float scale) {                              \
    dq_convert<T>(acc, dq, (size_t)n, scale);                                                  \
  }

DTYPE_ENTRIES(float, f32)
DTYPE_ENTRIES(__nv_bfloat16, bf16)
DTYPE_ENTRIES(__half, f16)

#define MMA_ENTRIES(T, SUF, D, BQ)                                                             \
  extern "C" __global__ void __launch_bounds__(128)                                            \
      attn_fwd_mma_##SUF##_h##D(const T *q, const T *k, const T *v, T *o, float *lse,          \
                                const float *kvalid, const int *krange, int Hq, int Hkv,       \
                                int Tq, int Tk, int causal, int offset, float scale_log2) {    \
    fwd_mma<T, D>(q, k, v, o, lse, kvalid, krange, Hq, Hkv, Tq, Tk, causal, offset,            \
                  scale_log2);                                                                 \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(128) attn_bwd_mma_##SUF##_h##D(                 \
      const T *q, const T *k, const T *v, const T *dout, const float *lse, const float *dvec,  \
      const float *kvalid, const int *krange, T *dk, T *dv, float *dq_acc, int Hq, int Hkv,    \
      int Tq, int Tk, int causal, int offset, float scale_log2, float scale) {                 \
    bwd_mma<T, D, BQ>(q, k, v, dout, lse, dvec, kvalid, krange, dk, dv, dq_acc, Hq, Hkv, Tq,   \
                      Tk, causal, offset, scale_log2, scale);                                  \
  }

MMA_ENTRIES(__nv_bfloat16, bf16, 64, 64)
MMA_ENTRIES(__nv_bfloat16, bf16, 128, 32)
MMA_ENTRIES(__half, f16, 64, 64)
MMA_ENTRIES(__half, f16, 128, 32)
