// Next-token sampling: repetition penalty, temperature, top-k, top-p, min-p and the draw,
// one block per row of logits.
//
// The maths is the reference's (src/kernels/sample.rs, module doc), step for step:
// 0. with a seen mask and a penalty, a seen token's logit is divided by it where positive and
//    multiplied where negative, IEEE-rounded as the reference's f32 ops, wherever a logit is
//    read (so greedy agrees exactly);
// 1. m = max z (block argmax, ties to the lowest index; greedy stops here and writes it);
//    w_i = exp((z_i - m) / T), recomputed from the logits on every pass instead of stored
//    (a 50k-entry row does not fit shared memory; the row stays in L1/L2 across passes).
// 2. top-k: the largest threshold t with #{w_i >= t} >= k, which is the k-th largest weight,
//    selected by radix over the bit patterns of f32 in [0, 1] (non-negative floats order like
//    their bits, and bits 31 and 30 are zero there): three passes of 10 bits, each an integer
//    histogram in shared memory of the weights that match the bits chosen so far. Integer
//    counts make it exact and independent of the order the atomics land in. (Before, a
//    bisection over the same bits took ~30 passes over the row, most of the sampler's time.)
// 3. top-p: the largest t' >= t whose kept mass reaches top_p times the top-k mass, bisected
//    over the same bits (~30 passes; a float histogram would sum in the order atomics land);
//    min-p then raises the threshold to min_p (the largest weight is exactly 1).
// 4. target = u * (kept mass), u from the counter-based hash of (row key, pos); the token is
//    the first index, in vocabulary order, whose running kept mass exceeds target. The row is
//    read in chunks of 256 (a lane's 8 consecutive entries each), chunk c by warp c % 16. One
//    pass writes every chunk's kept mass to shared memory; one warp then takes their running
//    sums (a warp scan per 32 chunks), bisects them for the chunk that holds the target, and
//    reads that one chunk again: a warp scan of its lanes' masses names the lane, which walks
//    its 8 entries. (Before, the warp that held the target walked its whole 1/16 of the row
//    32 entries a step, one dependent load a step: ~100 steps at GPT-2's vocabulary, tens of
//    microseconds a decode step.)
// Every pass over the row (the argmax, top-k's and top-p's bisection steps, the masses) loads
// a lane's 8 entries by 16-byte loads (16 bytes of logits, 32 of f32 ones, and 32 of the hold
// mask) where the row and the mask start on 16-byte boundaries and no penalty applies, and
// the loop over a warp's whole chunks is unrolled 4x, so that a thread has four chunks' loads
// in flight before the first is used. Rows of GPT-2's vocabulary are 100 KB read by one block; 2-byte loads left those
// passes latency-bound (the bench's rows are held back from their stop ids for every draw:
// `min_new_tokens`).
// Sums are f32 trees here and sequential f64 in the reference, so a draw whose u falls within
// rounding of a bucket edge may pick the neighbour; greedy is exact. Where rounding leaves the
// target at or past the mass the chosen chunk (or lane) finds, the token is the last kept one
// of it (of the last chunk with kept mass where the target is past every chunk).
//
// Launch: grid (B), block kThreads, V <= kMaxChunks * kChunk; reads p.logits [B, V] in the model's dtype (rows p.ld
// elements apart, each contiguous; converted to f32 as they are read, exactly as the
// reference's cast does), p.keys [B] (and p.hold [V] while it applies, p.seen [B, V] with a
// penalty), writes p.out [B] u32 and, with p.seen, marks each row's drawn token in it.

#include "common.cuh"

struct SampleParams {
  const void *logits;        // [B, V] in the entry point's dtype
  const long long *keys;     // [B] row keys (row_key(seed, row) of the reference)
  unsigned int *out;         // [B] chosen token ids
  unsigned long long pos;    // draw index of this step (the same for every row)
  const long long *pos_at;   // when not null, the draw index is *pos_at instead (a decode
                             // step replayed as a CUDA graph keeps it on the device)
  const float *hold;         // null, or [V] added to every row's logits (0 or -inf: stop ids
                             // held back) while the draw index is below hold_until
  unsigned long long hold_until;
  int b;                     // rows (informational: the grid is B blocks)
  int v;                     // vocabulary
  int top_k;                 // 0 or >= v: no top-k filter
  float inv_temp;            // 1 / temperature (unused when greedy)
  float top_p;               // >= 1: no nucleus filter
  int greedy;                // 1: argmax, no draw
  unsigned char *seen;       // null, or [B, V]: 1 at the tokens each row holds; read for the
                             // penalty, and the drawn token marked
  float min_p;               // <= 0: no min-p filter
  float penalty;             // repetition penalty; 1: none
  int ld;                    // elements from one row of logits to the next (>= v): generation's
                             // LM head writes rows padded to a multiple of 8 (GPT-2's 50,257)
};
static_assert(sizeof(SampleParams) == 104, "SampleParams: keep in step with the Rust mirror");
static_assert(alignof(SampleParams) == 8, "SampleParams: keep in step with the Rust mirror");

namespace temper {
namespace sample {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 256;  // entries a warp reads at a time: 8 a lane
constexpr int kMaxChunks = 2048;  // V <= 524,288 (src/kernels/cuda/sample.rs checks)
constexpr int kRadixBits = 10;
constexpr int kBins = 1 << kRadixBits;
// The bin search gives each thread two bins.
static_assert(kBins == 2 * kThreads, "top_k_threshold: two histogram bins a thread");

static __device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The reference's `uniform`: 24 random bits, exact in f32.
static __device__ __forceinline__ float uniform(unsigned long long key, unsigned long long pos) {
  const unsigned long long bits = splitmix64(key ^ splitmix64(pos + 0x5A3Bull));
  return (float)(bits >> 40) * (1.0f / 16777216.0f);
}

// Largest value and its lowest index over the block, returned to every thread.
static __device__ __forceinline__ void block_argmax(float &val, int &idx, float *sval,
                                                    int *sidx) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, val, o);
    const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
    if (ov > val || (ov == val && oi < idx)) val = ov, idx = oi;
  }
  __syncthreads();
  if (lane == 0) sval[warp] = val, sidx[warp] = idx;
  __syncthreads();
  val = sval[0], idx = sidx[0];
  for (int w = 1; w < kWarps; ++w) {
    if (sval[w] > val || (sval[w] == val && sidx[w] < idx)) val = sval[w], idx = sidx[w];
  }
}

// 16 bytes of T at z + i (16-byte aligned), as f32.
template <typename T> constexpr int kVec = 16 / (int)sizeof(T);
template <typename T>
static __device__ __forceinline__ void load_vec(const T *z, int i, float (&out)[kVec<T>]) {
  const uint4 raw = *reinterpret_cast<const uint4 *>(z + i);
  const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
  for (int k = 0; k < kVec<T>; ++k) out[k] = to_f32(e[k]);
}

template <typename T> struct Row {
  const T *z;
  const float *hold;          // null when no mask applies to this draw
  const unsigned char *seen;  // null when no penalty applies
  float penalty;
  int v;
  float m, inv_temp;
  __device__ __forceinline__ float logit(int i) const {
    float x = hold ? to_f32(z[i]) + hold[i] : to_f32(z[i]);
    if (seen && seen[i]) x = x < 0.f ? __fmul_rn(x, penalty) : __fdiv_rn(x, penalty);
    return x;
  }
  // The weight of a logit z already read (with its hold, if any).
  __device__ __forceinline__ float weight(float z) const { return expf((z - m) * inv_temp); }
};

// Entries i..i+7 of the row (i a multiple of 8) as the draw sees them, hold and penalty
// applied; entries past the row are -inf.
template <typename T>
static __device__ __forceinline__ void logits8(const Row<T> &r, int i, float (&x)[8]) {
#pragma unroll
  for (int k = 0; k < 8; ++k) x[k] = i + k < r.v ? r.logit(i + k) : __int_as_float(0xff800000);
}
// The same for a whole 8 inside the row, by one 16-byte load of T (two of f32) and two of the
// hold mask: the row and the mask start 16-byte aligned, and no penalty applies.
template <typename T>
static __device__ __forceinline__ void logits8_vec(const Row<T> &r, int i, float (&x)[8]) {
  constexpr int N = kVec<T>;
#pragma unroll
  for (int h = 0; h < 8; h += N) {
    float part[N];
    load_vec(r.z, i + h, part);
#pragma unroll
    for (int k = 0; k < N; ++k) x[h + k] = part[k];
  }
  if (r.hold) {
    const float4 h0 = *reinterpret_cast<const float4 *>(r.hold + i);
    const float4 h1 = *reinterpret_cast<const float4 *>(r.hold + i + 4);
    x[0] += h0.x, x[1] += h0.y, x[2] += h0.z, x[3] += h0.w;
    x[4] += h1.x, x[5] += h1.y, x[6] += h1.z, x[7] += h1.w;
  }
}

// f(c, i, x) for every chunk c of this warp (c % kWarps == warp) in increasing order, x the
// lane's 8 entries from i. With `vec`, the chunks wholly inside the row take logits8_vec in a
// loop of their own: no branch between the chunks' loads, which the unrolling issues together.
// Warp-uniform: every lane of a warp makes the same calls.
template <typename T, typename F>
static __device__ __forceinline__ void each_chunk(const Row<T> &r, bool vec, F f) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int chunks = (r.v + kChunk - 1) / kChunk;
  const int full = vec ? r.v / kChunk : 0;
#pragma unroll 4
  for (int c = warp; c < full; c += kWarps) {
    const int i = c * kChunk + lane * 8;
    float x[8];
    logits8_vec(r, i, x);
    f(c, i, x);
  }
#pragma unroll 2
  for (int c = full + (warp - full % kWarps + kWarps) % kWarps; c < chunks; c += kWarps) {
    const int i = c * kChunk + lane * 8;
    float x[8];
    logits8(r, i, x);
    f(c, i, x);
  }
}

// Mass of the w_i >= t over the block.
template <typename T>
static __device__ __forceinline__ float mass_at_least(const Row<T> &r, bool vec, float t,
                                                      float *scratch) {
  float s = 0.f;
  each_chunk(r, vec, [&](int, int, const float (&x)[8]) {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float w = r.weight(x[k]);
      s += w >= t ? w : 0.f;
    }
  });
  return block_sum(s, scratch);
}

// The reference's `largest_threshold` for "mass at least goal, above floor" (top-p):
// bisection over the bits of f32 in [0, 1], a pass over the row a step. Not by radix as
// top-k: a float histogram's sums would depend on the order its atomics land in.
template <typename T>
static __device__ float nucleus_threshold(const Row<T> &r, bool vec, float goal, float floor,
                                          float *scratch) {
  unsigned int lo = 0u, hi = __float_as_uint(1.0f) + 1u;
  while (hi - lo > 1u) {
    const unsigned int mid = lo + (hi - lo) / 2u;
    const float t = fmaxf(__uint_as_float(mid), floor);
    if (mass_at_least(r, vec, t, scratch) >= goal) lo = mid; else hi = mid;
  }
  return fmaxf(__uint_as_float(lo), floor);
}

// The top-k threshold: the k-th largest weight (the largest t with #{w_i >= t} >= k, as the
// reference bisects it), 0 where fewer than k weights are positive. A pass a 10-bit digit,
// from the top: the weights whose higher digits match `prefix` are counted per digit, and
// the digit whose bin holds the rank still sought is appended. Zero weights (a logit held
// back or underflowed, entries past the row, NaN) are not counted: they cannot be the k-th
// largest unless fewer than k are positive, which the first pass sees.
template <typename T>
static __device__ float top_k_threshold(const Row<T> &r, bool vec, int k, unsigned int *hist,
                                        unsigned int *wsum, int *found) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned int prefix = 0u, mask = 0u;
  unsigned int need = (unsigned int)k;  // rank sought among the weights matching prefix
  for (int shift = 30 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int b = threadIdx.x; b < kBins; b += kThreads) hist[b] = 0u;
    __syncthreads();
    each_chunk(r, vec, [&](int, int, const float (&x)[8]) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float w = r.weight(x[e]);
        const unsigned int u = w > 0.f && w <= 1.f ? __float_as_uint(w) : 0u;
        if (u != 0u && (u & mask) == prefix) atomicAdd(&hist[(u >> shift) & (kBins - 1)], 1u);
      }
    });
    __syncthreads();
    // Thread i takes bins kBins-1-2i and kBins-2-2i: a block scan in thread order counts
    // from the top bin down.
    const unsigned int upper = hist[kBins - 1 - 2 * threadIdx.x];
    const unsigned int lower = hist[kBins - 2 - 2 * threadIdx.x];
    unsigned int incl = upper + lower;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    if (lane == 31) wsum[warp] = incl;
    __syncthreads();
    for (int w = 0; w < warp; ++w) incl += wsum[w];
    const unsigned int excl = incl - upper - lower;
    if (excl < need && need <= incl) {  // exactly one thread, where the rank is held
      const bool up = need <= excl + upper;
      found[0] = kBins - (up ? 1 : 2) - 2 * (int)threadIdx.x;
      found[1] = (int)(need - excl - (up ? 0u : upper));
    } else if (threadIdx.x == kThreads - 1 && incl < need) {
      found[0] = -1;  // fewer than `need` match: fewer than k positive weights
    }
    __syncthreads();
    if (found[0] < 0) return 0.f;
    prefix |= (unsigned int)found[0] << shift;
    mask |= (unsigned int)(kBins - 1) << shift;
    need = (unsigned int)found[1];
  }
  return __uint_as_float(prefix);
}

template <typename T> static __device__ void sample_row(const SampleParams &p) {
  __shared__ float sval[kWarps];
  __shared__ int sidx[kWarps];
  __shared__ float scratch[32];
  __shared__ float cmass[kMaxChunks];  // each chunk's kept mass
  __shared__ float cpref[kMaxChunks];  // their running sums, in chunk order
  __shared__ unsigned int hist[kBins];  // top-k's digit counts
  __shared__ unsigned int wsum[kWarps];
  __shared__ int found[2];
  const int row = blockIdx.x;
  const unsigned long long pos = p.pos_at ? (unsigned long long)*p.pos_at : p.pos;
  const float *hold = p.hold && pos < p.hold_until ? p.hold : nullptr;
  const size_t at = (size_t)row * p.v;
  const unsigned char *seen = p.seen && p.penalty != 1.f ? p.seen + at : nullptr;
  const T *z = static_cast<const T *>(p.logits) + (size_t)row * p.ld;
  Row<T> r{z, hold, seen, p.penalty, p.v, 0.f, p.inv_temp};
  // The one thread that writes the row's token marks it seen; every read of the row's seen
  // mask is behind a barrier or a ballot by then.
  auto emit = [&](int token) {
    p.out[row] = (unsigned int)token;
    if (p.seen) p.seen[at + token] = 1;
  };

  const bool vec = seen == nullptr && reinterpret_cast<uintptr_t>(r.z) % 16 == 0 &&
                   (hold == nullptr || reinterpret_cast<uintptr_t>(hold) % 16 == 0);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int chunks = (r.v + kChunk - 1) / kChunk;
  float best = __int_as_float(0xff800000);  // -inf
  int arg = 0x7fffffff;
  // Each thread sees its indices in increasing order, so `>` keeps its first of a tie.
  each_chunk(r, vec, [&](int, int i, const float (&x)[8]) {
#pragma unroll
    for (int k = 0; k < 8; ++k)
      if (x[k] > best) best = x[k], arg = i + k;
  });
  block_argmax(best, arg, sval, sidx);
  if (p.greedy) {
    if (threadIdx.x == 0) emit(arg == 0x7fffffff ? 0 : arg);
    return;
  }
  r.m = best;

  float t = 0.f;
  if (p.top_k > 0 && p.top_k < p.v) t = top_k_threshold(r, vec, p.top_k, hist, wsum, found);
  if (p.top_p < 1.f) {
    const float goal = p.top_p * mass_at_least(r, vec, t, scratch);
    t = nucleus_threshold(r, vec, goal, t, scratch);
  }
  if (p.min_p > 0.f) t = fmaxf(t, p.min_p);
  // A zero weight (a logit masked to -inf, or one that underflows) is never kept: with no
  // top-k threshold (t = 0) it would otherwise count, and the fallback could pick it.
  auto kept = [&](float x) { return x >= t && x > 0.f ? x : 0.f; };
  // A lane's 8 kept weights and their sum, in index order.
  auto kept8 = [&](const float (&x)[8], float (&w)[8]) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      w[k] = kept(r.weight(x[k]));
      s += w[k];
    }
    return s;
  };
  each_chunk(r, vec, [&](int c, int, const float (&x)[8]) {
    float w[8];
    const float m = warp_sum(kept8(x, w));
    if (lane == 0) cmass[c] = m;
  });
  __syncthreads();
  if (warp != 0) return;

  // One warp from here. The chunks' running sums, 32 chunks a scan.
  float carry = 0.f;
  for (int c0 = 0; c0 < chunks; c0 += 32) {
    const int c = c0 + lane;
    float incl = c < chunks ? cmass[c] : 0.f;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    incl += carry;
    if (c < chunks) cpref[c] = incl;
    carry = __shfl_sync(0xffffffffu, incl, 31);
  }
  __syncwarp();
  const float total = carry;
  if (!(total > 0.f)) {  // nothing kept (every logit held back): token 0, as the reference
    if (lane == 0) emit(0);
    return;
  }
  const float target = uniform((unsigned long long)p.keys[row], pos) * total;
  // A chunk whose running sum exceeds the target where the one before does not. The scan's
  // tree rounds each lane's sum its own way, so the running sums may dip by an ulp or rise
  // at a chunk with no kept mass: that chunk stands for the next one with mass ...
  int lo = 0, hi = chunks;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (cpref[mid] > target) hi = mid; else lo = mid + 1;
  }
  int chosen = chunks;
  for (int c0 = lo / 32 * 32; c0 < chunks; c0 += 32) {
    const int c = c0 + lane;
    const unsigned any = __ballot_sync(0xffffffffu, c >= lo && c < chunks && cmass[c] > 0.f);
    if (any != 0u) {
      chosen = c0 + __ffs(any) - 1;
      break;
    }
  }
  if (chosen == chunks) {
    // ... and past the last chunk with mass (rounding), the target falls in that chunk.
    for (int c0 = (chunks - 1) / 32 * 32; c0 >= 0; c0 -= 32) {
      const int c = c0 + lane;
      const unsigned any = __ballot_sync(0xffffffffu, c < chunks && cmass[c] > 0.f);
      if (any != 0u) {
        chosen = c0 + 31 - __clz(any);
        break;
      }
    }
  }
  // The chosen chunk again: its lanes' masses scanned name the lane that holds the target.
  const float before = chosen > 0 ? cpref[chosen - 1] : 0.f;
  const int i = chosen * kChunk + lane * 8;
  float x[8], w[8];
  if (vec && i + 8 <= r.v)
    logits8_vec(r, i, x);
  else
    logits8(r, i, x);
  const float mine = kept8(x, w);
  float incl = mine;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  float excl = __shfl_up_sync(0xffffffffu, incl, 1);
  if (lane == 0) excl = 0.f;
  const unsigned hits = __ballot_sync(0xffffffffu, mine > 0.f && before + incl > target);
  // Rounding left the target at or past the mass this chunk sums to: its last kept token.
  const unsigned with_mass = __ballot_sync(0xffffffffu, mine > 0.f);
  const int holder = hits != 0u ? __ffs(hits) - 1 : 31 - __clz(with_mass);
  if (lane != holder) return;
  float running = before + excl;
  int last = -1;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    if (w[k] > 0.f) {
      running += w[k];
      last = i + k;
      if (hits != 0u && running > target) {
        emit(i + k);
        return;
      }
    }
  }
  emit(last);  // rounding again, within the lane: its last kept token
}

}  // namespace sample
}  // namespace temper

// One block per row, and a decode step's rows (64 in the bench) do not fill the SMs twice:
// occupancy buys nothing, so ptxas may spend registers on the 16-byte passes (with no minimum
// given it capped them at 32 on sm_90 and spilled).
#define SAMPLE_ENTRY(SUFFIX, T)                                                                \
  extern "C" __global__ void __launch_bounds__(temper::sample::kThreads, 1)                    \
      sample_##SUFFIX(const SampleParams p) {                                                  \
    temper::pdl_enter();                                                                       \
    temper::sample::sample_row<T>(p);                                                          \
  }

SAMPLE_ENTRY(f32, float)
SAMPLE_ENTRY(bf16, __nv_bfloat16)
SAMPLE_ENTRY(f16, __half)
