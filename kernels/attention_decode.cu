// Attention decode: a few query rows against a long KV cache, and the merge of split-K
// partials.
//
// attn_decode_<dtype>_h<D>_r<R> (bf16/f16, D = 64, 128 or 256): the forward when the G * Tq query
// rows of a kv head are at most R (R = 1, 2 or 4: GQA groups and short query blocks). A decode
// step reads every cached key and value once and does two FMAs per element, so it is a
// stream over the cache: each lane copies 16 bytes (8 values) of a key row and of its value
// row per step, L = D / 8 lanes share a key, and a warp takes 32 / L consecutive keys (whole
// 512-byte runs; at D = 256 the whole warp takes one key), through a ring of cp.async stages
// in shared memory a few passes ahead of the one it sums. Every key group keeps its own
// online softmax (m, l, acc) for all R rows; the groups of a warp merge by butterfly
// shuffles, the warps of the block through shared memory. One block (4 warps) per (batch,
// kv head) and key split: grid (B * Hkv, 1, nsplit). The per-row scores are the reference's:
// x = (q . k) * scale * log2(e), with the key mask, the key range and the causal horizon
// offset + i applied per row. With nsplit = 1 it writes
// o and lse as the simple forward does (zeros and lse = +inf for a row that sees no key);
// with a split, normalised partials and their lse (-inf when empty) for attn_combine.
//
// attn_decode_fresh_<dtype>_h<D>_r<R>: the same for generation's decode step at fixed shapes
// (src/generate/static_step.rs), fused with what decode_step.cu's qkv_write does before it:
// q and this position's key and value are read from the row of stacked projections p.fresh
// (RMS-normalised per head where gains p.q_norm, p.k_norm are given, then rotated where
// rotation tables are, by the same f32 expressions as qkv_write's and rounded to T as it
// rounds them; a head's sum of squares is summed across its lane group); split 0's block of
// each (batch, kv head) writes the key and value at position L = step[0] of the caches k, v.
// No block reads position L from the
// cache: the first lane group of split 0 starts its softmax state from the fresh key (if the
// mask lets the rows see it), and every stream skips L. So nothing reads what the kernel
// writes, and no ordering between blocks is needed. One launch instead of two per layer.
//
// attn_combine_<dtype>: when a call has too few query rows to fill the GPU, a forward (the
// decode kernel above, or attn_fwd_simple in attention_fwd.cu) runs with nsplit > 1 slices of
// the key range (grid z). Slice s writes, for every query row, its normalised partial output
// o_s (p.opart, f32) and the log-sum-exp of its scores lse_s (p.lsepart; -inf when the slice
// saw no visible key). attn_combine merges them:
//   lse = logsumexp_s lse_s,   o = sum_s exp(lse_s - lse) o_s
// (computed as max + log of the weights' sum); a row that no slice saw gets o = 0 and
// lse = +inf, as the unsplit forward writes.
//
// Launch (src/kernels/cuda/attention.rs): decode: grid (B * Hkv, 1, nsplit), block
// kDecodeThreads, dynamic shared memory kDecodeRingBytes, k and v rows 16-byte aligned (a
// cache view's rows: p.kv_cap); combine: one
// warp per row, grid ceil(nrows / 8), block 256; reads p.opart, p.lsepart, p.nrows, p.d,
// p.nsplit, writes p.o (dtype T) and p.lse.

#include "attention.cuh"
#include "mma_ptx.cuh"

namespace temper {
namespace attn {

// ---------------------------------------------------------------------------------------
// Decode forward
// ---------------------------------------------------------------------------------------
constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = 32 * kDecodeWarps;

// The cp.async ring a warp streams its keys through: a pass takes kDecodeKeysPerPass keys per
// lane group (one cp.async group), and the ring's kDecodeStages stages hold the pass being
// summed and the ones after it, so a lane has up to S * 2 keys (S * 64 bytes) of loads in
// flight while it sums, in shared memory rather than registers (which the launch bound caps).
// Four stages, 32 KiB a block, where six blocks fit a multiprocessor (H100/H200: 227 KiB, at
// one row and 80 registers); two, 16 KiB, in the PTX for sm_80, which A100 (163 KiB) and
// sm_86/sm_89 (99 KiB) run, whose multiprocessors six 32 KiB rings would not fit.
constexpr int kDecodeKeysPerPass = 2;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int kDecodeStages = 2;
#else
constexpr int kDecodeStages = 4;
#endif
constexpr int kDecodeRingBytes = kDecodeStages * kDecodeKeysPerPass * 32 * kDecodeThreads;
static_assert(kDecodeRingBytes == (kDecodeStages == 4 ? 32768 : 16384),
              "the launch's dynamic shared memory: decode_ring in src/kernels/cuda/attention.rs");

// Blocks per multiprocessor the launch bound asks for. A decode step is one wave of blocks, each
// a few dependent passes over its keys, so a grid one block over what fits runs a second wave
// at the first one's latency for a sliver of the work: GPT-2's 64 x 12 blocks at 88 registers
// (5 blocks per SM, 660 on an H200) left 108 for a second wave. At R = 1 six blocks fit in 80
// registers without spilling (ptxas, sm_80 and sm_90); two rows (Qwen3's and Gemma's two query
// heads a kv head) spill there on sm_80 and take five (96); four rows need their 128.
template <int R> constexpr int kDecodeMinBlocks = R == 1 ? 6 : R == 2 ? 5 : 4;

// 8 values of T (16 bytes, as loaded) as f32.
template <typename T>
static __device__ __forceinline__ void unpack8(const uint4 &raw, float (&out)[8]) {
  const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_f32(e[i]);
}
template <typename T> static __device__ __forceinline__ void load8(const T *src, float (&out)[8]) {
  unpack8<T>(*reinterpret_cast<const uint4 *>(src), out);
}

// q . k over a key row spread across the L lanes of a group (8 values each), summed within the
// group: every lane of the warp must call it (the sum shuffles).
template <int L>
static __device__ __forceinline__ float group_dot(const float (&q)[8], const float (&k)[8]) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) s = fmaf(q[e], k[e], s);
#pragma unroll
  for (int o = 1; o < L; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  return s;
}

// Folds the softmax state (m2, l2, acc2) into (m, l, acc): both are over disjoint keys.
static __device__ __forceinline__ void merge_state(float &m, float &l, float (&acc)[8], float m2,
                                                   float l2, const float (&acc2)[8]) {
  const float mx = fmaxf(m, m2);
  const float ref = mx == neg_inf() ? 0.f : mx;
  const float a = exp2f(m - ref), b = exp2f(m2 - ref);
  l = l * a + l2 * b;
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] = acc[e] * a + acc2[e] * b;
  m = mx;
}

// (x * r) * g rounded to T, as rmsnorm.cu's forward stores it: 8 values and their gains, at
// element j0 of `gain`: gains in T, or with `plus_one` Gemma's f32 offsets w, g = 1 + w.
template <typename T>
static __device__ __forceinline__ void norm8(float (&x)[8], float r, const void *gain, int j0,
                                             bool plus_one) {
  float g[8];
  if (plus_one) {
    const float4 *w = reinterpret_cast<const float4 *>(static_cast<const float *>(gain) + j0);
    const float4 lo = w[0], hi = w[1];
    const float ws[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
    for (int e = 0; e < 8; ++e) g[e] = 1.f + ws[e];
  } else {
    load8(static_cast<const T *>(gain) + j0, g);
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) x[e] = to_f32(from_f32<T>((x[e] * r) * g[e]));
}

// Values [8 sub, 8 sub + 8) of the head at column `col` of row b of p.fresh (width
// (Hq + 2 Hkv) D), as qkv_write (decode_step.cu) stores them: RMS-normalised over the head by
// the gains `gain` where given (the head's D values are spread over the L = D / 8 lanes of a
// group, whose partial sums of squares meet by shuffles: every lane of the warp must call it
// alike), then rotated with their partners in the other half of the head by p.rope_cos /
// p.rope_sin where `rotate` and the tables are given (in f32, then rounded to T), else as
// they are.
template <typename T, int D>
static __device__ __forceinline__ void fresh8(const AttnParams &p, int b, int col, int sub,
                                              const void *gain, bool rotate, float (&out)[8]) {
  constexpr int L = D / 8;
  const int width = (p.hq + 2 * p.hkv) * D;
  const T *row = static_cast<const T *>(p.fresh) + (size_t)b * width + col;
  const void *g = gain;
  const bool plus_one = p.norm_plus_one != 0;
  const int j0 = sub * 8;
  load8(row + j0, out);
  float r = 1.f;
  if (g != nullptr) {
    float ss = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) ss += out[e] * out[e];
#pragma unroll
    for (int o = 1; o < L; o <<= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    r = 1.f / sqrtf(ss / (float)D + p.norm_eps);
    norm8<T>(out, r, g, j0, plus_one);
  }
  if (!rotate || p.rope_cos == nullptr) return;
  constexpr int half = D / 2;  // a multiple of 8: the lane's 8 values lie in one half
  const bool lower = j0 < half;
  const int jj0 = lower ? j0 : j0 - half;
  const int pj0 = lower ? j0 + half : jj0;
  float partner[8];
  load8(row + pj0, partner);
  if (g != nullptr) norm8<T>(partner, r, g, pj0, plus_one);
  const T *cs = static_cast<const T *>(p.rope_cos) + (size_t)b * half + jj0;
  const T *sn = static_cast<const T *>(p.rope_sin) + (size_t)b * half + jj0;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const float c = to_f32(cs[e]), s = to_f32(sn[e]);
    const float x1 = lower ? out[e] : partner[e], x2 = lower ? partner[e] : out[e];
    out[e] = to_f32(from_f32<T>(lower ? x1 * c - x2 * s : x2 * c + x1 * s));
  }
}

template <typename T, int D, int R, bool FRESH>
static __device__ void decode(const AttnParams &p) {
  constexpr int VEC = 8, L = D / VEC, KPW = 32 / L;
  static_assert(D % VEC == 0 && 32 % L == 0, "a key row is 8-value chunks over L lanes");
  __shared__ float s_m[kDecodeWarps][R], s_l[kDecodeWarps][R];
  __shared__ float s_acc[kDecodeWarps][R][D];

  const T *__restrict__ q = static_cast<const T *>(p.q);
  const T *__restrict__ k = static_cast<const T *>(p.k);
  const T *__restrict__ v = static_cast<const T *>(p.v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int grp = lane / L, sub = lane % L;
  const int Hkv = p.hkv, G = p.hq / p.hkv, Tq = p.tq, Tk = p.tk;
  const int b = blockIdx.x / Hkv, hkv = blockIdx.x % Hkv;
  const int rows = G * Tq;
  const KeyRange kr = key_range(p.krange, b, Tk);

  // Row r is query i = r % Tq of query head hkv * G + r / Tq. Under a sliding window (not in
  // the fused step, whose offset is not the query's position) row r sees keys from row_lo[r].
  int row_hi[R], row_lo[R];
  int hi = kr.lo, lo = kr.hi;
  const int window = FRESH ? 0 : p.window;
  const SoftCap softcap(p);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    row_hi[r] = kr.lo;  // an absent row sees nothing
    row_lo[r] = kr.lo;
    if (r < rows) {
      const int i = r % Tq;
      row_hi[r] = p.causal ? min(kr.hi, p.offset + i + 1) : kr.hi;
      if (window > 0) row_lo[r] = max(kr.lo, p.offset + i - window + 1);
      lo = min(lo, row_lo[r]);
    }
    hi = max(hi, row_hi[r]);
  }

  // This split's share of the keys every row may see.
  lo = min(lo, hi);
  const int span = max(hi - lo, 0);
  const int per = (span + gridDim.z - 1) / gridDim.z;
  const int k_begin = lo + blockIdx.z * per;
  const int k_end = min(hi, k_begin + per);
  const size_t kvbase = ((size_t)b * Hkv + hkv) * (p.kv_cap > 0 ? p.kv_cap : Tk);

  // The fresh position (FRESH): written here, never read from the cache (the streams skip
  // it); -1 where there is none, or where L is past the cache (qkv_write writes nothing
  // there; the key then counts nowhere, as no key past the mask's end would).
  int fresh_j = -1;
  if constexpr (FRESH) {
    const long long len = p.step[0];
    const int cap = p.kv_cap > 0 ? p.kv_cap : Tk;
    if (len >= 0 && len < cap) fresh_j = (int)len;
  }

  // The stream. A pass takes U keys per lane group, kStride apart; the warp's passes go
  // through a ring of S stages in shared memory, filled by cp.async S - 1 passes ahead of
  // the pass being summed, so that a lane has S passes of loads in flight without holding
  // them in registers (which the launch bound caps): with the loads in registers, each pass's
  // loads waited on the previous pass's arithmetic. A lane reads back only the 16 bytes it
  // copied itself, so no barrier is needed between a stage's copy and its use. The first
  // passes are issued here, before q and the fresh key are worked out, whose loads then
  // overlap theirs. Every lane of a warp runs the same passes (the score reductions shuffle).
  constexpr int U = kDecodeKeysPerPass;
  constexpr int S = kDecodeStages;
  constexpr int kStride = kDecodeWarps * KPW;
  constexpr int kPassKeys = U * kStride;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint4 *const ring = reinterpret_cast<uint4 *>(smem_raw);
  // This thread's slot for stage s, key u, k (0) or v (1): a warp's 32 slots are contiguous.
  const auto slot = [&](int s, int u, int kv) {
    return ring + ((s * U + u) * 2 + kv) * kDecodeThreads + threadIdx.x;
  };
  const int first = k_begin + warp * KPW;
  const int passes = first < k_end ? (k_end - first + kPassKeys - 1) / kPassKeys : 0;
  // Whether key j of a pass is copied: in this split's share and not the fresh position.
  const auto loaded = [&](int pass, int j) { return pass < passes && j < k_end && j != fresh_j; };
  const auto issue = [&](int s, int pass) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = first + pass * kPassKeys + u * kStride + grp;
      // Position fresh_j is written in this launch (by split 0's block): never loaded, even
      // to be dropped, which would race with the write. A key not loaded is zero-filled
      // from a safe address (the sequence's first row).
      const bool in = loaded(pass, j);
      const size_t at = (kvbase + (in ? j : 0)) * D + sub * VEC;
      cp_async16(smem_addr(slot(s, u, 0)), k + at, in);
      cp_async16(smem_addr(slot(s, u, 1)), v + at, in);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < S - 1; ++s) issue(s, s);

  float qf[R][VEC];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r < rows) {
      const int g = r / Tq, i = r % Tq;
      if constexpr (FRESH) {
        fresh8<T, D>(p, b, (hkv * G + g) * D, sub, p.q_norm, true, qf[r]);  // Tq = 1: i = 0
      } else {
        const size_t qrow = ((size_t)b * p.hq + hkv * G + g) * Tq + i;
        load8(q + qrow * D + sub * VEC, qf[r]);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) qf[r][e] *= p.scale_log2;
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) qf[r][e] = 0.f;
    }
  }

  float m[R], l[R], acc[R][VEC];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = neg_inf();
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[r][e] = 0.f;
  }

  if (FRESH && fresh_j >= 0 && blockIdx.z == 0) {  // uniform across the block
    float kf[VEC], vf[VEC];
    fresh8<T, D>(p, b, (p.hq + hkv) * D, sub, p.k_norm, true, kf);
    fresh8<T, D>(p, b, (p.hq + Hkv + hkv) * D, sub, nullptr, false, vf);
    const bool first_group = warp == 0 && grp == 0;  // the one lane group that writes and counts it
    if (first_group) {
      // p.dk, p.dv are the caches k, v again: written here, at the one position no stream
      // loads, so k and v stay read-only pointers to the compiler (non-coherent loads).
      T *kw = static_cast<T *>(p.dk) + (kvbase + fresh_j) * D + sub * VEC;
      T *vw = static_cast<T *>(p.dv) + (kvbase + fresh_j) * D + sub * VEC;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        kw[e] = from_f32<T>(kf[e]);
        vw[e] = from_f32<T>(vf[e]);
      }
    }
    const bool key_ok = fresh_j >= kr.lo && fresh_j < kr.hi &&
                        (kr.dense || p.kvalid[(size_t)b * Tk + fresh_j] != 0.f);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= rows) continue;  // the same for the whole block: the shuffles stay converged
      const float s = softcap(group_dot<L>(qf[r], kf));
      // The state is empty: folding one key in gives m = s, l = 2^0, acc = v.
      if (first_group && key_ok && fresh_j < row_hi[r]) {
        m[r] = s;
        l[r] = 1.f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[r][e] = vf[e];
      }
    }
  }

  // Stage s of the ring holds passes s, s + S, ...: the loop over passes is unrolled S-fold so
  // that every stage index is known at compile time.
  for (int p0 = 0; p0 < passes; p0 += S) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int pass = p0 + s;
      // The stage the previous pass was summed from takes the pass S - 1 ahead (or an empty
      // group past the last, so that every wait below counts the same groups).
      issue((s + S - 1) % S, pass + S - 1);
      cp_async_wait<S - 1>();
      if (pass >= passes) break;  // the same for the whole warp
      // The pass's scores first, every key's for every row: they depend only on the key, so
      // their dot products and shuffles overlap, and the cap is tested once a pass (worked
      // out beside each key's update, each key's shuffles waited on the previous key's
      // update). Row 0 is always computed, so its test compiles away: a launch has a row.
      float sc[U][R];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        // Whole 16-byte reads into registers first: unpacked straight from shared memory,
        // each value was its own 2-byte read.
        const uint4 kraw = *slot(s, u, 0);
        float kf[VEC];
        unpack8<T>(kraw, kf);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          // The same for the whole block: the shuffles stay converged.
          sc[u][r] = r > 0 && r >= rows ? neg_inf() : group_dot<L>(qf[r], kf);
        }
      }
      if (softcap.on()) {
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
          for (int r = 0; r < R; ++r) sc[u][r] = softcap(sc[u][r]);
      }
      // Which of the pass's keys count (in this split's share, not the fresh position, and
      // not masked); a key mask with holes is read here, its latency not hidden (the key
      // range marks the usual masks, left padding and a window, dense).
      int jk[U];
      bool valid[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        jk[u] = first + pass * kPassKeys + u * kStride + grp;
        valid[u] = loaded(pass, jk[u]) && (kr.dense || p.kvalid[(size_t)b * Tk + jk[u]] != 0.f);
      }
      // One online-softmax rescale per row for the whole pass, not one per key: the running
      // max moves once, to the pass's largest visible score, and the sums are rescaled once.
      // At four rows of D = 128 (a GQA group) the per-key rescale was about a quarter of a
      // lane's arithmetic, which that shape may be bound by (0.23 of copy bandwidth on the
      // H200, 2.5x SDPA's time, 2026-12-04). Each key's score becomes -inf where this row
      // does not see it (a key past its causal horizon may hold a value for another row).
      float ref[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        ref[r] = 0.f;
        if (r > 0 && r >= rows) continue;
        float m_new = m[r];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const bool vis = valid[u] && jk[u] < row_hi[r] && (window == 0 || jk[u] >= row_lo[r]);
          sc[u][r] = vis ? sc[u][r] : neg_inf();
          m_new = fmaxf(m_new, sc[u][r]);
        }
        ref[r] = m_new == neg_inf() ? 0.f : m_new;
        const float alpha = exp2f(m[r] - ref[r]);
        l[r] *= alpha;
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[r][e] *= alpha;
        m[r] = m_new;
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const uint4 vraw = *slot(s, u, 1);
        float vf[VEC];
        unpack8<T>(vraw, vf);
        // A masked position's value never enters a sum, whatever it holds (as fwd_simple,
        // which skips zero probabilities): 0 * NaN would poison the row.
        if (!valid[u]) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) vf[e] = 0.f;
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (r > 0 && r >= rows) continue;
          if (sc[u][r] == neg_inf()) continue;  // unseen by this row: adds nothing
          const float pj = exp2f(sc[u][r] - ref[r]);
          l[r] += pj;
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[r][e] = fmaf(pj, vf[e], acc[r][e]);
        }
      }
    }
  }
  // No copy may land after the block has gone (the empty groups past the last pass included).
  cp_async_wait<0>();

  // The key groups of the warp (lanes L apart hold the same output columns).
#pragma unroll
  for (int o = L; o < 32; o <<= 1) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float acc2[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc2[e] = __shfl_xor_sync(0xffffffffu, acc[r][e], o);
      const float m2 = __shfl_xor_sync(0xffffffffu, m[r], o);
      const float l2 = __shfl_xor_sync(0xffffffffu, l[r], o);
      merge_state(m[r], l[r], acc[r], m2, l2, acc2);
    }
  }
  if (grp == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) s_acc[warp][r][sub * VEC + e] = acc[r][e];
      if (sub == 0) s_m[warp][r] = m[r], s_l[warp][r] = l[r];
    }
  }
  __syncthreads();

  // The warps, in a fixed order: thread (r, c) merges column chunk c of row r.
  const int t = threadIdx.x;
  if (t >= rows * L || t >= R * L) return;
  const int r = t / L, c = t % L;
  float mm = s_m[0][r], ll = s_l[0][r], aa[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) aa[e] = s_acc[0][r][c * VEC + e];
  for (int w = 1; w < kDecodeWarps; ++w) {
    float a2[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) a2[e] = s_acc[w][r][c * VEC + e];
    merge_state(mm, ll, aa, s_m[w][r], s_l[w][r], a2);
  }
  const int g = r / Tq, i = r % Tq;
  const size_t qrow = ((size_t)b * p.hq + hkv * G + g) * Tq + i;
  const float inv = ll > 0.f ? 1.f / ll : 0.f;
  if (gridDim.z == 1) {
    T *o = static_cast<T *>(p.o);
#pragma unroll
    for (int e = 0; e < VEC; ++e) o[qrow * D + c * VEC + e] = from_f32<T>(aa[e] * inv);
    if (c == 0) p.lse[qrow] = ll > 0.f ? (mm + log2f(ll)) * kLn2 : pos_inf();
  } else {
    const size_t prow = (size_t)blockIdx.z * p.nrows + qrow;
#pragma unroll
    for (int e = 0; e < VEC; ++e) p.opart[prow * D + c * VEC + e] = aa[e] * inv;
    if (c == 0) p.lsepart[prow] = ll > 0.f ? (mm + log2f(ll)) * kLn2 : neg_inf();
  }
}

// ---------------------------------------------------------------------------------------
// Kernel body
// ---------------------------------------------------------------------------------------
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

}  // namespace attn
}  // namespace temper

using namespace temper::attn;

// ---------------------------------------------------------------------------------------
// Entry points: attn_combine_<dtype>.
// ---------------------------------------------------------------------------------------
#define COMBINE_ENTRY(T, SUF)                                                                 \
  extern "C" __global__ void attn_combine_##SUF(const AttnParams p) {                         \
    temper::pdl_enter();                                                                      \
    combine<T>(p.opart, p.lsepart, static_cast<T *>(p.o), p.lse, p.nrows, p.d, p.nsplit);     \
  }

COMBINE_ENTRY(float, f32)
COMBINE_ENTRY(__nv_bfloat16, bf16)
COMBINE_ENTRY(__half, f16)

// Entry points: attn_decode_<dtype>_h<D>_r<R>, attn_decode_fresh_<dtype>_h<D>_r<R>.
#define DECODE_ENTRY(T, SUF, D, R)                                                            \
  extern "C" __global__ void __launch_bounds__(kDecodeThreads, kDecodeMinBlocks<R>)          \
      attn_decode_##SUF##_h##D##_r##R(const AttnParams p) {                                   \
    temper::pdl_enter();                                                                      \
    decode<T, D, R, false>(p);                                                                \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(kDecodeThreads, kDecodeMinBlocks<R>)          \
      attn_decode_fresh_##SUF##_h##D##_r##R(const AttnParams p) {                             \
    temper::pdl_enter();                                                                      \
    decode<T, D, R, true>(p);                                                                 \
  }

DECODE_ENTRY(__nv_bfloat16, bf16, 64, 1)
DECODE_ENTRY(__nv_bfloat16, bf16, 64, 2)
DECODE_ENTRY(__nv_bfloat16, bf16, 64, 4)
DECODE_ENTRY(__nv_bfloat16, bf16, 128, 1)
DECODE_ENTRY(__nv_bfloat16, bf16, 128, 2)
DECODE_ENTRY(__nv_bfloat16, bf16, 128, 4)
DECODE_ENTRY(__nv_bfloat16, bf16, 256, 1)
DECODE_ENTRY(__nv_bfloat16, bf16, 256, 2)
DECODE_ENTRY(__nv_bfloat16, bf16, 256, 4)
DECODE_ENTRY(__half, f16, 64, 1)
DECODE_ENTRY(__half, f16, 64, 2)
DECODE_ENTRY(__half, f16, 64, 4)
DECODE_ENTRY(__half, f16, 128, 1)
DECODE_ENTRY(__half, f16, 128, 2)
DECODE_ENTRY(__half, f16, 128, 4)
DECODE_ENTRY(__half, f16, 256, 1)
DECODE_ENTRY(__half, f16, 256, 2)
DECODE_ENTRY(__half, f16, 256, 4)
