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
// 2. top-k: the largest threshold t with #{w_i >= t} >= k, bisected over the bit patterns of
//    f32 in [0, 1] (non-negative floats order like their bits), ~30 block reductions; no sort.
// 3. top-p: the largest t' >= t whose kept mass reaches top_p times the top-k mass, the same way;
//    min-p then raises the threshold to min_p (the largest weight is exactly 1).
// 4. target = u * (kept mass), u from the counter-based hash of (row key, pos); the token is
//    the first index, in vocabulary order, whose running kept mass exceeds target. The row is
//    cut into one contiguous segment per warp; one pass sums each segment's kept mass (a warp
//    reads its segment 32 entries at a time), their running sums (in warp order) name the
//    segment that holds the target, and that one warp scans its segment with warp prefix sums,
//    no block barrier per step. (A block-wide scan over the whole row in chunks of blockDim.x
//    cost four barriers a chunk, ~100 chunks at GPT-2's vocabulary: tens of microseconds a
//    decode step.)
// Each pass over a row is unrolled 4x, so that a thread has four loads in flight before the
// first is used (its order of accumulation is unchanged). The two passes every draw makes (the
// argmax, and the segments' masses) read 16 bytes a load where the row starts on a 16-byte
// boundary and no hold mask or penalty applies: a row of GPT-2's vocabulary is 100 KB read by one
// block, which 2-byte loads leave latency-bound.
// Sums are f32 trees here and sequential f64 in the reference, so a draw whose u falls within
// rounding of a bucket edge may pick the neighbour; greedy is exact. Where rounding leaves the
// target at or past the mass the chosen warp finds, the token is the last kept one of its
// segment (the last kept one of the row when the target is past every segment).
//
// Launch: grid (B), block kThreads; reads p.logits [B, V] in the model's dtype (rows p.ld
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
  __device__ __forceinline__ float w(int i) const { return weight(logit(i)); }
};

// #{w_i >= t} over the block (exact in f32 for V < 2^24).
template <typename T>
static __device__ __forceinline__ float count_at_least(const Row<T> &r, float t, float *scratch) {
  float c = 0.f;
#pragma unroll 4
  for (int i = threadIdx.x; i < r.v; i += kThreads) c += r.w(i) >= t ? 1.f : 0.f;
  return block_sum(c, scratch);
}

// Mass of the w_i >= t over the block.
template <typename T>
static __device__ __forceinline__ float mass_at_least(const Row<T> &r, float t, float *scratch) {
  float s = 0.f;
#pragma unroll 4
  for (int i = threadIdx.x; i < r.v; i += kThreads) {
    const float x = r.w(i);
    s += x >= t ? x : 0.f;
  }
  return block_sum(s, scratch);
}

// The reference's `largest_threshold` for "at least k kept" (top-k) or "mass at least goal,
// above floor" (top-p): bisection over the bits of f32 in [0, 1].
template <typename T>
static __device__ float threshold(const Row<T> &r, bool by_count, float k_or_goal, float floor,
                                  float *scratch) {
  unsigned int lo = 0u, hi = __float_as_uint(1.0f) + 1u;
  while (hi - lo > 1u) {
    const unsigned int mid = lo + (hi - lo) / 2u;
    const float t = fmaxf(__uint_as_float(mid), floor);
    const bool holds = by_count ? count_at_least(r, t, scratch) >= k_or_goal
                                : mass_at_least(r, t, scratch) >= k_or_goal;
    if (holds) lo = mid; else hi = mid;
  }
  return fmaxf(__uint_as_float(lo), floor);
}

template <typename T> static __device__ void sample_row(const SampleParams &p) {
  __shared__ float sval[kWarps];
  __shared__ int sidx[kWarps];
  __shared__ float scratch[32];
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

  constexpr int N = kVec<T>;
  // 16-byte loads: the row starts on a 16-byte boundary and no hold mask or penalty is added.
  const bool vec =
      hold == nullptr && seen == nullptr && reinterpret_cast<uintptr_t>(r.z) % 16 == 0;
  float best = __int_as_float(0xff800000);  // -inf
  int arg = 0x7fffffff;
  // Each thread sees its indices in increasing order, so `>` keeps its first of a tie.
  int scalar_from = 0;
  if (vec) {
    scalar_from = r.v / N * N;
    for (int i = threadIdx.x * N; i < scalar_from; i += kThreads * N) {
      float x[N];
      load_vec(r.z, i, x);
#pragma unroll
      for (int k = 0; k < N; ++k)
        if (x[k] > best) best = x[k], arg = i + k;
    }
  }
#pragma unroll 4
  for (int i = scalar_from + threadIdx.x; i < r.v; i += kThreads) {
    const float z = r.logit(i);
    if (z > best) best = z, arg = i;
  }
  block_argmax(best, arg, sval, sidx);
  if (p.greedy) {
    if (threadIdx.x == 0) emit(arg == 0x7fffffff ? 0 : arg);
    return;
  }
  r.m = best;

  float t = 0.f;
  if (p.top_k > 0 && p.top_k < p.v) t = threshold(r, true, (float)p.top_k, 0.f, scratch);
  if (p.top_p < 1.f) {
    const float goal = p.top_p * mass_at_least(r, t, scratch);
    t = threshold(r, false, goal, t, scratch);
  }
  if (p.min_p > 0.f) t = fmaxf(t, p.min_p);
  // Each warp's segment: [w * seg, min((w + 1) * seg, v)), seg a multiple of 32.
  __shared__ float smass[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int seg = (r.v + kThreads - 1) / kThreads * 32;
  // A zero weight (a logit masked to -inf, or one that underflows) is never kept: with no
  // top-k threshold (t = 0) it would otherwise count, and the fallback could pick it.
  auto kept = [&](float x) { return x >= t && x > 0.f ? x : 0.f; };
  auto kept_w = [&](int i) { return kept(i < r.v ? r.w(i) : 0.f); };
  {
    const int lo = warp * seg, hi = min(lo + seg, r.v);
    float m = 0.f;
    // lo is a multiple of 32 elements, so on a 16-byte aligned row so is its address.
    int scalar_lo = lo;
    if (vec && hi > lo) {
      scalar_lo = lo + (hi - lo) / N * N;
      for (int i = lo + lane * N; i < scalar_lo; i += 32 * N) {
        float x[N];
        load_vec(r.z, i, x);
#pragma unroll
        for (int k = 0; k < N; ++k) m += kept(r.weight(x[k]));
      }
    }
#pragma unroll 4
    for (int i = scalar_lo + lane; i < hi; i += 32) m += kept_w(i);
    m = warp_sum(m);
    if (lane == 0) smass[warp] = m;
  }
  __syncthreads();
  // Every thread walks the segments' running sums alike: the first whose running sum exceeds
  // the target, else (rounding) the last with any kept mass.
  float total = 0.f;
  for (int w = 0; w < kWarps; ++w) total += smass[w];
  const float target = uniform((unsigned long long)p.keys[row], pos) * total;
  int chosen = -1;
  float before = 0.f, acc = 0.f;
  for (int w = 0; w < kWarps; ++w) {
    if (smass[w] <= 0.f) continue;
    chosen = w, before = acc;
    acc += smass[w];
    if (acc > target) break;
  }
  if (chosen < 0) {  // nothing kept (every logit held back): token 0, as the reference
    if (threadIdx.x == 0) emit(0);
    return;
  }
  if (warp != chosen) return;
  const int lo = chosen * seg, hi = min(lo + seg, r.v);
  float running = before;
  int last_kept = -1;
  for (int base = lo; base < hi; base += 32) {
    const int i = base + lane;
    const float x = i < hi ? kept_w(i) : 0.f;
    float incl = x;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    const unsigned hits = __ballot_sync(0xffffffffu, x > 0.f && running + incl > target);
    if (hits != 0u) {
      if (lane == 0) emit(base + __ffs(hits) - 1);
      return;
    }
    const unsigned kept = __ballot_sync(0xffffffffu, x > 0.f);
    if (kept != 0u) last_kept = base + 31 - __clz(kept);
    running += __shfl_sync(0xffffffffu, incl, 31);
  }
  // Rounding left the target at or past the mass this scan found: its last kept token.
  if (lane == 0) emit(max(last_kept, 0));
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
