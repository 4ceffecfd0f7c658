// Scaled-dot-product attention, forward, never materialising the Tq x Tk scores.
//
// Shared conventions (layouts, mask contract, the log2-domain softmax) are in attention.cuh;
// the key range comes from attn_key_range (attention_prep.cu). The forward saves the
// natural-log log-sum-exp of the scaled scores per row, lse = (m + log2 l) * ln 2, or +inf for
// a row with no visible key (so that the backward's exp(s - lse) is exactly 0 there without
// a special case).
//
// Two implementations, chosen by src/kernels/cuda/attention.rs:
//
// 1. "simple" (any dtype, D <= 128): CUDA-core f32 arithmetic, one warp per query row. Key
//    tiles of 32 are staged in shared memory as f32 and shared by the block's 8 rows; lane j
//    scores key j of the tile, the warp does the online softmax update with one
//    max-reduction, then each lane accumulates its D/32 output dimensions by broadcasting the
//    32 probabilities. A split over the key range (grid z) turns the same kernel into the
//    decode path: one or a few queries against a long KV cache fill the GPU by splitting the
//    keys; the splits write partials that attn_combine (attention_decode.cu) merges.
//
// 2. "mma" (bf16/f16, D = 64, 128 or 256): tensor cores through `mma.sync.m16n8k16` with f32
//    accumulation, FlashAttention-2 style (helpers in mma.cuh, tiles in MmaFwdTraits). A
//    block of 4 warps owns 64 query rows (16 per warp, Q fragments held in registers); K/V
//    tiles of 64 keys stream through a two-stage cp.async pipeline into XOR-swizzled shared
//    memory (16-byte chunk index ^ (row & 7): conflict-free ldmatrix without padding).
//    S = Q K^T lands in registers in the mma accumulator layout, which is also the A-operand
//    layout of the next mma, so P never leaves registers for O += P V. Causal blocks are
//    launched heaviest first; on the diagonal a warp skips the 16-key steps its rows cannot
//    see. attn_fwd_mma2 gives each warp two 16-row tiles (128-row blocks), so that every K
//    and V fragment read from shared memory feeds two mmas.
//
// Every entry point is `extern "C"`, takes one AttnParams by value, and carries its dtype in
// its name: attn_fwd_simple_<dtype>_d<DPL>, attn_fwd_mma_<dtype>_h<D>, attn_fwd_mma2_<dtype>_h<D>
// (D 64 and 128).

#include "attention.cuh"
#include "mma.cuh"

namespace temper {
namespace attn {

// ---------------------------------------------------------------------------------------
// Simple path (CUDA cores, f32 arithmetic, any dtype, D <= 32 * DPL).
// ---------------------------------------------------------------------------------------
// Forward. grid (B*Hkv, ceil(G*Tq / rows), nsplit), block 32 * rows threads. With nsplit > 1
// each z-slice handles a contiguous share of the key tiles and writes normalised partial
// outputs and their lse (-inf when empty) for attn_combine. SEG: packed rows or a sliding
// window (the band read), entry points attn_fwd_simple_seg_*. A template argument rather than a run-time test, and
// those entry points bounded at 4 blocks an SM: with the row's lower bound held across the
// loop, ptxas aimed some of them at 32 registers and spilled (scripts/ptxas-report.sh), and
// the kernels without segments keep the code they had.
template <typename T, int DPL, bool SEG>
static __device__ void fwd_simple(const T *__restrict__ q, const T *__restrict__ k,
                                  const T *__restrict__ v, T *__restrict__ o,
                                  float *__restrict__ lse, const float *__restrict__ kvalid,
                                  const int *__restrict__ krange, float *__restrict__ opart,
                                  float *__restrict__ lsepart, const Band band,
                                  int Hq, int Hkv, int Tq, int Tk, int KvCap, int D, int causal,
                                  int offset, float scale_log2, const SoftCap cap) {
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
  const int row_lo = SEG ? seg_lo(band, b, Tq, i, kr.lo) : kr.lo;
  const int row_hi = causal ? min(kr.hi, offset + i + 1) : kr.hi;
  const int blk_lo =
      SEG ? seg_lo(band, b, Tq, block_first_query(r0, min(nw, rows - r0), Tq), kr.lo) : kr.lo;
  const int blk_hi = block_key_end(kr, r0, min(nw, rows - r0), Tq, causal, offset);
  const int ntiles = blk_hi > blk_lo ? (blk_hi - blk_lo + kSimpleKT - 1) / kSimpleKT : 0;
  const int per = (ntiles + gridDim.z - 1) / gridDim.z;
  const int t_begin = blockIdx.z * per, t_end = min(ntiles, t_begin + per);

  float *qw = qs + warp * DMAX;
  if (active)
    for (int d = lane; d < D; d += 32) qw[d] = to_f32(q[qrow * D + d]) * scale_log2;

  // Decode reads the KV cache in place: each (batch, head) row of k and v holds KvCap
  // positions, of which the first Tk are keys.
  const size_t kvbase = ((size_t)b * Hkv + hkv) * KvCap;
  float m = neg_inf(), l = 0.f;
  float acc[DPL];
#pragma unroll
  for (int t = 0; t < DPL; ++t) acc[t] = 0.f;

  for (int t = t_begin; t < t_end; ++t) {
    const int k0 = blk_lo + t * kSimpleKT;
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
      // j >= lo holds because tiles start at blk_lo >= lo; j < row_hi <= hi <= Tk keeps the
      // mask read in bounds.
      const bool vis =
          (!SEG || j >= row_lo) && j < row_hi && (kr.dense || kvalid[(size_t)b * Tk + j] != 0.f);
      float s = neg_inf();
      if (vis) {
        s = 0.f;
        const float *kr_ = ks + lane * (DMAX + 1);
        for (int d = 0; d < D; ++d) s = fmaf(qw[d], kr_[d], s);
        s = cap(s);
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


// ---------------------------------------------------------------------------------------
// Tensor-core path (bf16 / f16, D in {64, 128, 256}), sm_80+.
// ---------------------------------------------------------------------------------------
// Forward. grid (B*Hq, ceil(Tq / BQ)), block 128, dynamic shared memory
// (BQ + 4 * BK) * D * sizeof(T) + 2 * BK * 4 bytes, BQ = 64 * MT and BK from MmaFwdTraits.
template <typename T, int D, int MT>
static __device__ void fwd_mma(const T *__restrict__ q, const T *__restrict__ k,
                               const T *__restrict__ v, T *__restrict__ o,
                               float *__restrict__ lse, const float *__restrict__ kvalid,
                               const int *__restrict__ krange, const Band band,
                               int Hq, int Hkv, int Tq, int Tk, int causal, int offset,
                               float scale_log2, const SoftCap cap) {
  using Tiles = MmaFwdTraits<D, MT>;
  constexpr int BQ = Tiles::kBlockQ, BK = Tiles::kBlockK, NT = Tiles::kThreads;
  constexpr int KSTEPS = D / 16;  // k-steps of S = Q K^T
  constexpr int NBD = D / 8;      // n-blocks of O
  constexpr int NBK = BK / 8;     // n-blocks of S
  constexpr bool QREG = Tiles::kQInRegs;
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
  // Keys below kfull are visible to every row of the tile (given a dense range); in packed
  // rows keys below klo to none (starts never decrease along a row) and keys below kseg to
  // some rows only.
  const int kfull = causal ? min(kr.hi, offset + q0 + 1) : kr.hi;
  const int klo = seg_lo(band, b, Tq, q0, kr.lo);
  const int kseg = seg_lo(band, b, Tq, q_last, kr.lo);
  const int ntiles = kend > klo ? (kend - klo + BK - 1) / BK : 0;

  // Tile mt of this warp holds rows rowA(mt) (lane's g) and rowA(mt) + 8; each row sees keys
  // below its horizon. Computed where used rather than held: registers are the limit at MT = 2.
  const int wrow = warp * 16 * MT;  // the warp's first row in the block
  auto rowA = [&](int mt) { return q0 + wrow + mt * 16 + g; };
  auto horizon = [&](int r) { return causal ? min(kr.hi, offset + r + 1) : kr.hi; };

  auto load_kv = [&](int t, int st) {
    const int k0 = klo + t * BK;
    load_tile<T, BK, D, NT>(sK + st * BK * D, kg + (size_t)k0 * D, Tk - k0, k);
    load_tile<T, BK, D, NT>(sV + st * BK * D, vg + (size_t)k0 * D, Tk - k0, v);
    if (!kr.dense)
      for (int jj = threadIdx.x; jj < BK; jj += NT)
        sM[st * BK + jj] = k0 + jj < Tk ? kvalid[(size_t)b * Tk + k0 + jj] : 0.f;
  };
  // The A fragment of Q for tile mt at k-step ks, from shared memory.
  auto q_frag = [&](uint32_t(&r)[4], int mt, int ks) {
    ldsm_x4(r, smem_addr(sQ + swz<D>(wrow + mt * 16 + (lane & 15), ks * 16 + (lane >> 4) * 8)));
  };

  float acc[MT][NBD][4];
  float mA[MT], mB[MT], lA[MT], lB[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int n = 0; n < NBD; ++n) acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.f;
    mA[mt] = mB[mt] = neg_inf();
    lA[mt] = lB[mt] = 0.f;
  }
  // Q fragments held for the whole kernel where they fit (QREG), else re-read per k-step
  // (then this is an unused placeholder).
  uint32_t qf[QREG ? MT : 1][QREG ? KSTEPS : 1][4];

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
    if constexpr (QREG) {
      if (t == 0) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int ks = 0; ks < KSTEPS; ++ks) q_frag(qf[mt][ks], mt, ks);
      }
    }
    const T *sKs = sK + st * BK * D;
    const T *sVs = sV + st * BK * D;
    const int k0 = klo + t * BK;
    // Under a causal mask, on the diagonal, the 16-key steps past this warp's last row's
    // horizon are masked for all its rows: the warp skips their products (S stays at the
    // mask's -inf, P at 0). Uniform across the warp.
    const int steps = causal ? min(BK / 16, max(0, horizon(q0 + wrow + 16 * MT - 1) - k0 + 15) / 16)
                             : BK / 16;

    // The tile's work, compiled twice: FULL for a tile every warp computes whole without a
    // soft cap (every tile off the causal diagonal: the hot path, straight-line code whose
    // ldmatrix and mma ptxas schedules across the k-steps), and the general one, whose
    // per-step exits on the diagonal split that code into blocks (S = Q K^T in blocks of two
    // mmas: the D = 128 forward measured 105.8 TFLOP/s on the H200 against 134.6 before the
    // exits came in).
    auto tile = [&](auto full) {
      constexpr bool FULL = decltype(full)::value;
      // S = Q K^T for this warp's 16 * MT rows and the tile's BK keys: each K fragment read
      // from shared memory feeds MT tiles.
      float s[MT][NBK][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < NBK; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
      // One 16-key step of one k-step: a K fragment from shared memory into MT mmas.
      auto s_step = [&](int n2, int ks, const uint32_t (&qs)[QREG ? 1 : MT][4]) {
        uint32_t bf[4];
        const int key = n2 * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int col = ks * 16 + ((lane >> 3) & 1) * 8;
        ldsm_x4(bf, smem_addr(sKs + swz<D>(key, col)));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if constexpr (QREG) {
            Mma<T>::run(s[mt][2 * n2], qf[mt][ks], bf[0], bf[1]);
            Mma<T>::run(s[mt][2 * n2 + 1], qf[mt][ks], bf[2], bf[3]);
          } else {
            Mma<T>::run(s[mt][2 * n2], qs[mt], bf[0], bf[1]);
            Mma<T>::run(s[mt][2 * n2 + 1], qs[mt], bf[2], bf[3]);
          }
        }
      };
      if constexpr (!FULL && QREG && MT == 1) {
        // The diagonal's exits between 16-key steps, each step's k-steps one block of
        // mmas (Q is in registers: nothing to re-read per step). Each score still sums its
        // k-steps in order, as below. (At MT = 2 this order spills on sm_80 and sm_90.)
        const uint32_t unused[1][4] = {};
#pragma unroll
        for (int n2 = 0; n2 < NBK / 2; ++n2) {
          if (n2 >= steps) break;
#pragma unroll
          for (int ks = 0; ks < KSTEPS; ++ks) s_step(n2, ks, unused);
        }
      } else {
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ++ks) {
          uint32_t qs[QREG ? 1 : MT][4];
          if constexpr (!QREG) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) q_frag(qs[mt], mt, ks);
          }
#pragma unroll
          for (int n2 = 0; n2 < NBK / 2; ++n2) {
            if constexpr (!FULL) {
              if (n2 >= steps) break;
            }
            s_step(n2, ks, qs);
          }
        }
      }

      // Scale to the log2 domain, cap, and mask only tiles that straddle a boundary or have
      // holes. Each in its own pass with its tests hoisted out of the scores' loop: tested
      // per score, the cap and the mask made about a dozen instructions and three branches
      // of every score of the diagonal's tiles.
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < NBK; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][n][e] *= scale_log2;
      if constexpr (!FULL) {
        if (cap.on()) {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < NBK; ++n)
#pragma unroll
              for (int e = 0; e < 4; ++e) s[mt][n][e] = cap(s[mt][n][e]);
        }
      }
      if (!kr.dense || k0 + BK > kfull || k0 < kseg) {
        const bool holes = !kr.dense;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          // Row A's and row B's visible keys: [first, end).
          const int rA = rowA(mt), rB = rA + 8;
          const int endA = horizon(rA), endB = horizon(rB);
          const int firstA = k0 >= kseg ? kFirstRow : seg_lo(band, b, Tq, min(rA, Tq - 1), 0);
          const int firstB = k0 >= kseg ? kFirstRow : seg_lo(band, b, Tq, min(rB, Tq - 1), 0);
#pragma unroll
          for (int n = 0; n < NBK; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int jj = n * 8 + c4 * 2 + (e & 1);
              const int j = k0 + jj;
              const bool ok = j >= (e < 2 ? firstA : firstB) && j < (e < 2 ? endA : endB) &&
                              (!holes || sM[st * BK + jj] != 0.f);
              if (!ok) s[mt][n][e] = neg_inf();
            }
          }
        }
      }

      // Online softmax per tile: rows A (g) and B (g + 8); the 4 lanes of a quad share a row.
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        float mxA = neg_inf(), mxB = neg_inf();
#pragma unroll
        for (int n = 0; n < NBK; ++n) {
          mxA = fmaxf(mxA, fmaxf(s[mt][n][0], s[mt][n][1]));
          mxB = fmaxf(mxB, fmaxf(s[mt][n][2], s[mt][n][3]));
        }
        mxA = fmaxf(mxA, __shfl_xor_sync(0xffffffffu, mxA, 1));
        mxA = fmaxf(mxA, __shfl_xor_sync(0xffffffffu, mxA, 2));
        mxB = fmaxf(mxB, __shfl_xor_sync(0xffffffffu, mxB, 1));
        mxB = fmaxf(mxB, __shfl_xor_sync(0xffffffffu, mxB, 2));
        const float mnA = fmaxf(mA[mt], mxA), mnB = fmaxf(mB[mt], mxB);
        const float refA = mnA == neg_inf() ? 0.f : mnA;
        const float refB = mnB == neg_inf() ? 0.f : mnB;
        // Two rescale factors a row keep exp2f; the per-score exps below take exp2_ftz. With
        // it here too, the 128-row D = 128 kernel spilled on sm_90 (when it was at 255
        // registers).
        const float alA = exp2f(mA[mt] - refA), alB = exp2f(mB[mt] - refB);
        mA[mt] = mnA;
        mB[mt] = mnB;
        float sumA = 0.f, sumB = 0.f;
#pragma unroll
        for (int n = 0; n < NBK; ++n) {
          s[mt][n][0] = exp2_ftz(s[mt][n][0] - refA);
          s[mt][n][1] = exp2_ftz(s[mt][n][1] - refA);
          s[mt][n][2] = exp2_ftz(s[mt][n][2] - refB);
          s[mt][n][3] = exp2_ftz(s[mt][n][3] - refB);
          sumA += s[mt][n][0] + s[mt][n][1];
          sumB += s[mt][n][2] + s[mt][n][3];
        }
        lA[mt] = lA[mt] * alA + sumA;  // per-lane partial; the quad is reduced once at the end
        lB[mt] = lB[mt] * alB + sumB;
#pragma unroll
        for (int n = 0; n < NBD; ++n) {
          acc[mt][n][0] *= alA;
          acc[mt][n][1] *= alA;
          acc[mt][n][2] *= alB;
          acc[mt][n][3] *= alB;
        }
      }

      // O += P V: P straight from the S accumulators (C layout == A layout), V via
      // ldmatrix.trans because V is stored [key][d] and the B operand wants k = key; each V
      // fragment feeds MT tiles.
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        if constexpr (!FULL) {
          if (kk >= steps) break;
        }
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) acc_to_a<T>(a[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
#pragma unroll
        for (int n2 = 0; n2 < NBD / 2; ++n2) {
          uint32_t bf[4];
          ldsm_x4_t(bf, smem_addr(sVs + swz<D>(kk * 16 + (lane & 15), n2 * 16 + (lane >> 4) * 8)));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            Mma<T>::run(acc[mt][2 * n2], a[mt], bf[0], bf[1]);
            Mma<T>::run(acc[mt][2 * n2 + 1], a[mt], bf[2], bf[3]);
          }
        }
      }
    };
    if (steps == BK / 16 && !cap.on())
      tile(Flag<true>{});
    else
      tile(Flag<false>{});
    __syncthreads();  // this stage is read by every warp before the next prefetch reuses it
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the block exits

  T *og = o + (size_t)bh * Tq * D;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float la = lA[mt], lb = lB[mt];
    la += __shfl_xor_sync(0xffffffffu, la, 1);
    la += __shfl_xor_sync(0xffffffffu, la, 2);
    lb += __shfl_xor_sync(0xffffffffu, lb, 1);
    lb += __shfl_xor_sync(0xffffffffu, lb, 2);
    const float invA = la > 0.f ? 1.f / la : 0.f;
    const float invB = lb > 0.f ? 1.f / lb : 0.f;
    const int rA = rowA(mt), rB = rA + 8;
    if (rA < Tq) {
#pragma unroll
      for (int n = 0; n < NBD; ++n)
        store_pair(og + (size_t)rA * D + n * 8 + c4 * 2, acc[mt][n][0] * invA,
                   acc[mt][n][1] * invA);
      if (c4 == 0)
        lse[(size_t)bh * Tq + rA] = la > 0.f ? (mA[mt] + log2f(la)) * kLn2 : pos_inf();
    }
    if (rB < Tq) {
#pragma unroll
      for (int n = 0; n < NBD; ++n)
        store_pair(og + (size_t)rB * D + n * 8 + c4 * 2, acc[mt][n][2] * invB,
                   acc[mt][n][3] * invB);
      if (c4 == 0)
        lse[(size_t)bh * Tq + rB] = lb > 0.f ? (mB[mt] + log2f(lb)) * kLn2 : pos_inf();
    }
  }
}
}  // namespace attn
}  // namespace temper

using namespace temper::attn;

// ---------------------------------------------------------------------------------------
// Entry points. Names: attn_fwd_simple[_seg]_<dtype>_d<DPL>, attn_fwd_mma_<dtype>_h<D>.
// ---------------------------------------------------------------------------------------
#define FWD_SIMPLE_CALL(T, DPL, SEG)                                                          \
    fwd_simple<T, DPL, SEG>(static_cast<const T *>(p.q), static_cast<const T *>(p.k),         \
                       static_cast<const T *>(p.v), static_cast<T *>(p.o), p.lse, p.kvalid,   \
                       p.krange, p.opart, p.lsepart, band_of(p), p.hq, p.hkv, p.tq, p.tk,    \
                       p.kv_cap > 0 ? p.kv_cap : p.tk, p.d, p.causal, p.offset, p.scale_log2, \
                       SoftCap(p))

#define FWD_SIMPLE_ENTRY(T, SUF, DPL)                                                         \
  extern "C" __global__ void __launch_bounds__(256)                                           \
      attn_fwd_simple_##SUF##_d##DPL(const AttnParams p) {                                    \
    FWD_SIMPLE_CALL(T, DPL, false);                                                           \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(256, 4)                                           \
      attn_fwd_simple_seg_##SUF##_d##DPL(const AttnParams p) {                                \
    FWD_SIMPLE_CALL(T, DPL, true);                                                            \
  }

#define FWD_SIMPLE_DTYPE(T, SUF) \
  FWD_SIMPLE_ENTRY(T, SUF, 1)    \
  FWD_SIMPLE_ENTRY(T, SUF, 2)    \
  FWD_SIMPLE_ENTRY(T, SUF, 3)    \
  FWD_SIMPLE_ENTRY(T, SUF, 4)

FWD_SIMPLE_DTYPE(float, f32)
FWD_SIMPLE_DTYPE(__nv_bfloat16, bf16)
FWD_SIMPLE_DTYPE(__half, f16)

// Each entry point's name is spelled out (not pasted from a macro argument): scripts/gpu-check.sh
// finds our kernels' names in these files.
#define FWD_MMA_CALL(T, D, MT)                                                                 \
  fwd_mma<T, D, MT>(static_cast<const T *>(p.q), static_cast<const T *>(p.k),                  \
                    static_cast<const T *>(p.v), static_cast<T *>(p.o), p.lse, p.kvalid,       \
                    p.krange, band_of(p), p.hq, p.hkv, p.tq, p.tk, p.causal, p.offset,        \
                    p.scale_log2, SoftCap(p))

// attn_fwd_mma_*: 64-row blocks (one mma tile per warp); attn_fwd_mma2_*: 128-row blocks.
#define FWD_MMA_ENTRY(T, SUF, D)                                                               \
  extern "C" __global__ void __launch_bounds__(MmaFwdTraits<D, 1>::kThreads)                   \
      attn_fwd_mma_##SUF##_h##D(const AttnParams p) {                                          \
    FWD_MMA_CALL(T, D, 1);                                                                     \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(MmaFwdTraits<D, 2>::kThreads)                   \
      attn_fwd_mma2_##SUF##_h##D(const AttnParams p) {                                         \
    FWD_MMA_CALL(T, D, 2);                                                                     \
  }

// D = 256: 64-row blocks only (MmaFwdTraits).
#define FWD_MMA_ENTRY_64ROWS(T, SUF, D)                                                        \
  extern "C" __global__ void __launch_bounds__(MmaFwdTraits<D, 1>::kThreads)                   \
      attn_fwd_mma_##SUF##_h##D(const AttnParams p) {                                          \
    FWD_MMA_CALL(T, D, 1);                                                                     \
  }

FWD_MMA_ENTRY(__nv_bfloat16, bf16, 64)
FWD_MMA_ENTRY(__nv_bfloat16, bf16, 128)
FWD_MMA_ENTRY_64ROWS(__nv_bfloat16, bf16, 256)
FWD_MMA_ENTRY(__half, f16, 64)
FWD_MMA_ENTRY(__half, f16, 128)
FWD_MMA_ENTRY_64ROWS(__half, f16, 256)
