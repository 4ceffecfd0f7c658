// What every attention kernel shares (included by attention_prep.cu, attention_fwd.cu,
// attention_decode.cu and attention_bwd.cu):
//   AttnParams      the one kernel argument of every attention entry point (the ABI),
//                   mirrored field for field by `AttnParams` in src/kernels/cuda/attention.rs
//   SimpleTiles     tile sizes of the CUDA-core ("simple") kernels
//   MmaFwdTraits<D> / MmaBwdTraits<D>   tile choices of the tensor-core kernels, with the
//                   shared-memory size each launch asks for
//   KeyRange, key_range, block_key_end, warp_max, pos_inf, neg_inf, SoftCap
//
// Conventions (all kernels): q, o, dq `[B, Hq, Tq, D]`; k, v, dk, dv `[B, Hkv, Tk, D]`
// (contiguous, except that the simple forward reads k and v as the first Tk positions of a
// KV cache of kv_cap positions); lse, dvec `[B, Hq, Tq]` f32; GQA: query head hq reads kv head hq / (Hq / Hkv).
// Query i sits at absolute position offset + i and sees key j when (not causal or
// j <= offset + i), key j is valid, (in packed rows) j >= seg_start[i] and (under a sliding
// window, causal only) j > offset + i - window; a row that sees no key outputs zeros and
// lse = +inf.
// Softmax runs in the log2 domain: x = (q.k) * scale * log2(e), p = exp2(x - m).
#pragma once

#include "common.cuh"

namespace temper {
namespace attn {

// The single argument of every attention kernel, passed by value (flash-attention's
// `Flash_fwd_params` idea): one struct per family instead of ~20 positional arguments, so
// the Rust side fills named fields and a field mismatch fails the build (the size asserts
// here and in src/kernels/cuda/attention.rs). Pointers to tensors of the storage dtype are
// `void *` (the dtype is the entry point's suffix); a kernel reads only the fields its
// comment names, the rest may be null / zero. Field order and types must match the Rust
// `#[repr(C)] struct AttnParams` exactly.
struct AttnParams {
  // Tensors in the storage dtype T.
  const void *q;     // [B, Hq, Tq, D]   fwd, bwd
  const void *k;     // [B, Hkv, Tk, D]  fwd, bwd
  const void *v;     // [B, Hkv, Tk, D]  fwd, bwd
  void *o;           // [B, Hq, Tq, D]   written by fwd / combine, read by bwd_dot
  const void *dout;  // [B, Hq, Tq, D]   bwd: gradient of o
  void *dq;          // [B, Hq, Tq, D]   written by bwd_dq_simple / dq_convert
  void *dk;          // [B, Hkv, Tk, D]  written by bwd_dkdv_simple / bwd_mma; attn_decode_fresh:
                     // the key cache k again, written at position step[0]
  void *dv;          // [B, Hkv, Tk, D]  written by bwd_dkdv_simple / bwd_mma; attn_decode_fresh:
                     // the value cache v again, written at position step[0]
  // f32 / int side buffers.
  float *lse;         // [B, Hq, Tq] natural-log log-sum-exp: written by fwd, read by bwd
  float *dvec;        // [B, Hq, Tq] rowsum(dO * O): written by bwd_dot, read by bwd
  const float *kvalid;  // [B, Tk] key mask (nonzero = real token), or null: no key mask
  int *krange;        // [B, 3] first valid key, last + 1, dense (1/0): written by
                      // attn_key_range, read by everything else; null without a key mask
  float *opart;       // [nsplit, B*Hq*Tq, D] split-K partial outputs (decode), else null
  float *lsepart;     // [nsplit, B*Hq*Tq] their log-sum-exps (-inf: split saw no key)
  float *dq_acc;      // [B, Hq, Tq, D] f32 dQ accumulator of bwd_mma (zeroed), else null
  // Sizes and options.
  int b;        // batch (informational: kernels derive it from the grid)
  int hq;       // query heads
  int hkv;      // kv heads, hq % hkv == 0
  int tq;       // queries per sequence
  int tk;       // keys per sequence
  int d;        // head dim (the mma kernels take it from their template instead)
  int causal;   // 1: causal mask with `offset`, 0: none
  int offset;   // absolute position of query 0
  int nrows;    // B * Hq * Tq: rows of combine, bwd_dot and dq_convert
  int nsplit;   // key splits of the decode forward (gridDim.z); combine merges them
  float scale_log2;  // softmax scale * log2(e)
  float scale;       // softmax scale
  int kv_cap;   // positions per (batch, kv head) row of k and v: a KV cache's capacity when
                // k, v are views of its first tk positions; 0 means tk. Read by fwd_simple and
                // attn_decode
  // Generation's fused decode step (attn_decode_fresh; null elsewhere): q and this position's
  // k and v come from one row of stacked projections, and k, v (the whole caches, tk = kv_cap
  // positions) are read, and written through dk, dv at position step[0].
  const void *fresh;       // [B, (Hq + 2 Hkv) D] in T: q heads, then k heads, then v heads
  const long long *step;   // [2] i64: the cache length L (then the draw index)
  const void *rope_cos;    // [B, D / 2] in T, or null: q and k rotated as qkv_write rotates
  const void *rope_sin;    // as rope_cos
  // Packed rows (src/kernels/segments.rs; null elsewhere; causal, offset 0, Tq == Tk only):
  // query i sees keys from seg_start[i] on, key j is seen by queries below seg_end[j].
  const int *seg_start;  // [B, Tq], non-decreasing along a row: fwd, bwd_dq_simple
  const int *seg_end;    // [B, Tk]: bwd_dkdv_simple, bwd_mma
  // attn_decode_fresh's per-head RMSNorm of q and k before the rotation (Qwen3's q_norm,
  // k_norm; Gemma 3's), as qkv_write computes it; null elsewhere.
  const void *q_norm;  // [D] in T: q's gains, or null (no norm); f32 with norm_plus_one
  const void *k_norm;  // [D] in T: k's gains (with q_norm, or neither); as q_norm
  float norm_eps;      // the norm's epsilon
  // Sliding-window attention (causal): query i sees no key at or before offset + i - window;
  // 0: no window. Read by every kernel but attn_decode_fresh (whose offset is not the query's
  // position), through seg_lo / seg_hi.
  int window;
  int norm_plus_one;  // 1: q_norm, k_norm are Gemma's f32 offsets w, the gains 1 + w in f32
  // Gemma 2's cap on the scores, c tanh(s / c) after the scale and before the mask, given as
  // C = c log2(e) (SoftCap says why) and 1 / C, both 0 for none: the host divides, so that no
  // kernel carries a division's slow-path call (whose saved registers spilled). Read by every
  // kernel that scores.
  float softcap_log2;
  float softcap_inv_log2;
};
static_assert(sizeof(AttnParams) == 264, "AttnParams: keep in step with the Rust mirror");
static_assert(alignof(AttnParams) == 8, "AttnParams: keep in step with the Rust mirror");

static __device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }
static __device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

static __device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// A compile-time bool as a value, for a generic lambda compiled once per case.
template <bool B> struct Flag {
  static constexpr bool value = B;
};

// Bounds of a range of rows (queries or keys) that compare with every row index: before the
// first, past the last.
constexpr int kFirstRow = -2147483647 - 1;
constexpr int kNoRow = 2147483647;

// Two adjacent f32 of shared memory in one 8-byte load; p must be 8-byte aligned.
static __device__ __forceinline__ float2 lds_f2(const float *p) {
  return *reinterpret_cast<const float2 *>(p);
}

// Gemma 2's soft cap on the scores, applied in the log2 domain the kernels score in: a cap c
// on a score s, c tanh(s / c), is on x = s log2(e) the same map with C = c log2(e), so every
// kernel caps its x with C = AttnParams::softcap_log2 (0: no cap) before masking. tanh(y) is
// 1 - 2 / (2^(2 y log2(e)) + 1): one exp2 and one reciprocal, 1 - 2 / inf = 1 at the far end,
// off by an ulp of 1 absolutely near 0 (4e-6 on x for Gemma 2's c = 50), where a relative
// bound is not needed: x is what the softmax reads. Its slope dx'/dx = 1 - (x' / C)^2 comes
// from the capped x' (the backward recovers x' from P where it no longer holds it). The
// reciprocal is the approximate one (__fdividef: 2 ulp, and 0 for an infinite divisor).
struct SoftCap {
  float c;    // C, or 0
  float inv;  // 1 / C, or 0
  __device__ __forceinline__ explicit SoftCap(const AttnParams &p)
      : c(p.softcap_log2), inv(p.softcap_inv_log2) {}
  __device__ __forceinline__ bool on() const { return c > 0.f; }
  // C tanh(x / C); x itself without a cap.
  __device__ __forceinline__ float operator()(float x) const {
    if (!on()) return x;
    return c * (1.f - __fdividef(2.f, exp2f(x * inv * (2.f * kLog2e)) + 1.f));
  }
  // dx'/dx at the capped x' = C tanh(x / C): 1 - (x' / C)^2; 1 without a cap.
  __device__ __forceinline__ float slope(float capped) const {
    if (!on()) return 1.f;
    const float t = capped * inv;
    return 1.f - t * t;
  }
};

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

// Where a row's keys begin and a key's queries end besides the key range and the causal
// horizon: packed rows' documents (either pointer null without them) and a sliding window of
// `window` keys (0: none) counted from query i's absolute position offset + i. Both bounds
// never decrease along a row, so the first (last) row of a block bounds the whole block.
struct Band {
  const int *seg_start;  // [B, Tq] or null
  const int *seg_end;    // [B, Tk] or null
  int window;
  int offset;
};

static __device__ __forceinline__ Band band_of(const AttnParams &p) {
  return Band{p.seg_start, p.seg_end, p.window, p.offset};
}

// The first key query i of sequence b may see: lo, or later the start of its document in a
// packed row and the start of its window.
static __device__ __forceinline__ int seg_lo(const Band &band, int b, int Tq, int i, int lo) {
  int l = band.seg_start != nullptr ? max(lo, band.seg_start[(size_t)b * Tq + i]) : lo;
  if (band.window > 0) l = max(l, band.offset + i - band.window + 1);
  return l;
}

// One past the last query that may see key j of sequence b: hi, or earlier the end of its
// document in a packed row and the last query whose window holds it.
static __device__ __forceinline__ int seg_hi(const Band &band, int b, int Tk, int j, int hi) {
  int h = band.seg_end != nullptr ? min(hi, band.seg_end[(size_t)b * Tk + j]) : hi;
  if (band.window > 0) h = min(h, max(0, j + band.window - band.offset));
  return h;
}

// The smallest query index among `nrows` consecutive rows starting at flattened row r0 of
// the G * Tq rows that share one kv head (0 where they wrap into the next head): in packed
// rows its document starts first.
static __device__ __forceinline__ int block_first_query(int r0, int nrows, int Tq) {
  return r0 / Tq != (r0 + nrows - 1) / Tq ? 0 : r0 % Tq;
}

// Block-level visible key range for `nrows` consecutive rows starting at flattened row r0 of
// the G * Tq rows that share one kv head: the largest query index among them bounds the
// causal horizon of the whole block.
static __device__ __forceinline__ int block_key_end(const KeyRange &kr, int r0, int nrows,
                                                    int Tq, int causal, int offset) {
  const int r_last = r0 + nrows - 1;
  const int i_max = (r0 / Tq != r_last / Tq) ? Tq - 1 : r_last % Tq;
  return causal ? min(kr.hi, offset + i_max + 1) : kr.hi;
}

// ---------------------------------------------------------------------------------------
// Tile choices.
// ---------------------------------------------------------------------------------------

// Simple path (CUDA cores, f32 arithmetic, any dtype, D <= 32 * DPL): one warp per row.
constexpr int kSimpleWarps = 8;  // rows per block at most (blockDim.x = 32 * rows)
constexpr int kSimpleKT = 32;    // keys (or queries) per shared-memory tile: one per lane
static_assert(kSimpleKT == 32, "lane j scores key j of a tile");
static_assert(kSimpleWarps * 32 <= 256, "__launch_bounds__(256) of the simple kernels");

// Tensor-core forward: 4 warps own 16 * MT query rows each (MT = 1: 64-row blocks, MT = 2:
// 128-row blocks); K/V tiles of BK keys (64; 32 for D = 128 at MT = 2 and for D = 256) in two
// cp.async stages. D = 256 (Gemma) has 64-row blocks only: its O accumulator alone takes 128
// registers a thread. With MT = 2 every K and V fragment a warp reads from shared memory feeds two mma
// tiles instead of one (FlashAttention-2's tiling): at D = 64, where Q stays in registers,
// that halves the shared-memory reads per mma; at D = 128 the Q fragments no longer fit in
// registers and are re-read every k-step, so only P V's reads halve (about a quarter fewer in
// all), with twice the barriers per key. Dynamic
// shared memory: sQ [BQ][D] + 2 stages of sK, sV [BK][D] (2-byte elements) + 2 stages of BK
// f32 key flags.
template <int D, int MT = 1> struct MmaFwdTraits {
  static constexpr int kBlockQ = 64 * MT;  // query rows per block
  // Keys per pipeline stage: 32 where the scores of 64 keys would not fit in registers beside
  // O (D = 128 at MT = 2, D = 256), which also keeps D = 256's shared memory (96.25 KiB) under
  // the 99 KiB a block that sm_86 and sm_89 allow.
  static constexpr int kBlockK = ((D == 128 && MT == 2) || D == 256) ? 32 : 64;
  static constexpr int kThreads = 128;     // 4 warps
  static constexpr bool kQInRegs = MT * (D / 16) * 4 <= 32;
  static constexpr int kSmemBytes = (kBlockQ + 4 * kBlockK) * D * 2 + 2 * kBlockK * 4;
  static_assert(D == 64 || D == 128 || D == 256, "head dims the mma kernels are instantiated for");
  static_assert(MT == 1 || MT == 2, "one or two 16-row mma tiles per warp");
  static_assert(D < 256 || MT == 1, "D = 256: one 16-row tile per warp");
  static_assert(kBlockQ == 16 * MT * (kThreads / 32), "MT 16-row mma tiles per warp");
  static_assert(kBlockK % 16 == 0, "k-steps of P V");
};
static_assert(MmaFwdTraits<128>::kSmemBytes == 82432, "fwd_mma_smem in attention.rs");
static_assert(MmaFwdTraits<128, 2>::kSmemBytes == 65792, "fwd_mma_smem in attention.rs");
static_assert(MmaFwdTraits<256>::kSmemBytes == 98560, "fwd_mma_smem in attention.rs");

// Tensor-core backward: one block per 16 * W keys of one kv head (16 per warp, W = 4 or 8
// warps); query tiles of BQ rows stream through two stages. BQ is 64 for D = 64 and 32 for
// D = 128, which keeps dK, dV (in registers for the whole kernel) plus S^T and dP^T under the
// register budget. W = 8 (128 keys, FlashAttention-2's key block) loads each query tile, and
// adds its dQ share with atomics, once per 128 keys instead of once per 64: half the global
// reads of Q and dO and half the dQ atomics, at the same warps per SM (one 8-warp block where
// two 4-warp blocks fit). Dynamic shared memory: sK, sV [BK][D] + 2 stages of sQ, sdO [BQ][D]
// + sdS [BK][BQ + 8] (2-byte elements) + 2 stages of sL, sDv [BQ] f32.
//
// D = 256 (Gemma): one warp's dK and dV over the whole head would take 256 registers a thread,
// so two warps share each 16-key tile (kSplit = 2; 8 warps, 64 keys a block, BQ 32). Of a pair,
// the first computes S^T and P^T, the second dP^T, each over the whole head, and they swap them
// through shared memory (sX: W warps' [BQ / 8 * 4][32 lanes] f32), so that both hold the same
// P^T and dS^T; then each accumulates dK and dV for its half of the head dim. The dQ step is
// the other head dims'. 149.5 KiB of shared memory: sm_80 and sm_90. The narrow variant
// (W = 4: 32 keys a block, 16-row query tiles; attn_bwd_mma_narrow_*_h256) takes 69.75 KiB,
// under the 99 KiB a block of sm_86 and sm_89 may hold, at twice the query-tile steps.
template <int D, int W = 4> struct MmaBwdTraits {
  static constexpr int kSplit = D == 256 ? 2 : 1;  // warps per 16-key tile
  static constexpr int kBlockK = 16 * W / kSplit;
  static constexpr int kBlockQ = D == 256 && W == 4 ? 16 : D >= 128 ? 32 : 64;
  static constexpr int kThreads = 32 * W;
  static constexpr int kSmemBytes = (2 * kBlockK + 4 * kBlockQ) * D * 2 +
                                    kBlockK * (kBlockQ + 8) * 2 + 4 * kBlockQ * 4 +
                                    (kSplit > 1 ? W * kBlockQ / 8 * 4 * 32 * 4 : 0);
  static_assert(D == 64 || D == 128 || D == 256, "head dims the mma kernels are instantiated for");
  static_assert(W == 4 || W == 8, "64- or 128-key blocks (32 or 64 at D = 256)");
  static_assert(kBlockK * kSplit == 16 * (kThreads / 32), "kSplit warps a 16-key mma tile");
  static_assert(kBlockQ % 16 == 0, "dQ m-blocks");
};
static_assert(MmaBwdTraits<128>::kSmemBytes == 71168, "bwd_mma_smem in attention.rs");
static_assert(MmaBwdTraits<64>::kSmemBytes == 59392, "bwd_mma_smem in attention.rs");
static_assert(MmaBwdTraits<128, 8>::kSmemBytes == 109056, "bwd_mma_smem in attention.rs");
static_assert(MmaBwdTraits<64, 8>::kSmemBytes == 84992, "bwd_mma_smem in attention.rs");
static_assert(MmaBwdTraits<256, 8>::kSmemBytes == 153088, "bwd_mma_smem in attention.rs");
static_assert(MmaBwdTraits<256, 4>::kSmemBytes == 71424, "bwd_mma_smem in attention.rs");

}  // namespace attn
}  // namespace temper
