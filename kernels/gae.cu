// Generalised advantage estimation as a parallel scan over time, plus GRPO's group
// normalisation. Contract: src/kernels/gae.rs (TRL's convention).
//
// Per row of [B, T] (rewards r, values v, mask m; m == 0 is padding and ends an episode):
//   valid_t  = m_t != 0,  next_t = valid_{t+1} (false past the end)
//   delta_t  = r_t + gamma * (next_t ? v_{t+1} : 0) - v_t
//   A_t      = valid_t ? delta_t + (next_t ? gamma*lambda : 0) * A_{t+1} : 0
//   R_t      = valid_t ? A_t + v_t : 0
// A_t = f_t(A_{t+1}) with the affine map f_t(a) = d_t + c_t * a, so A_t is the composition
// f_t ∘ f_{t+1} ∘ ... ∘ f_{T-1} applied to 0. Affine maps compose associatively,
//   (d1, c1) ∘ (d2, c2) = (d1 + c1 * d2, c1 * c2),
// which turns the sequential reverse loop into a scan from the right:
//   1. each thread owns E = 8 consecutive steps, loads them (two 16-byte loads per input when
//      aligned), and composes its 8 maps into one;
//   2. a warp composes its 32 thread maps with shuffles (Hillis-Steele from the right), and
//      one thread walks the <= 8 warp maps of the block, turning the value A that enters the
//      chunk from its right into the value entering each warp;
//   3. each thread replays its 8 steps from the value entering it and writes A and R.
// A block owns one row. A row longer than the block's chunk (blockDim * E steps) is done in
// chunks from right to left, the A at a chunk's first step carried into the chunk on its left
// — the scan is parallel within a chunk and sequential only across the few chunks of a row.
// Each input element is read once from memory (the one step past a thread's segment that it
// needs for v_{t+1} and m_{t+1} is its neighbour's, served by L1/L2), each output written once.
//
// Whitening statistics in the same launch: every thread sums count, A and A^2 over its valid
// steps in f64; the block reduces them and writes one partial; the last block to finish
// (a counter bumped after a __threadfence) sums all partials in a fixed order and writes
// (count, mean, unbiased variance). Fixed order makes the result deterministic, and f64 sums
// keep var = (sum A^2 - (sum A)^2 / n) / (n - 1) accurate (the reference is a two-pass f64).
// The counter must be zero at launch (the Rust side allocates it zeroed).
//
// Group normalisation: one warp per group of G rewards, two passes in f64 over the group
// (mean, then sum of squared deviations), out = (r - mean) / (sqrt(var_unbiased) + eps).

#include "gae.cuh"

using namespace temper;

namespace {

constexpr int E = 8;
constexpr int kMaxThreads = 256;

struct Affine {
  float d, c;
};

// `left` applied after `right`: the map of a segment from the maps of its two halves.
__device__ __forceinline__ Affine compose(Affine left, Affine right) {
  return {left.d + left.c * right.d, left.c * right.c};
}

template <bool VEC>
__device__ __forceinline__ void load8(const float *__restrict__ p, int t0, int T, float (&out)[E]) {
  if constexpr (VEC) {
    // T % 4 == 0 and t0 % 8 == 0, so each float4 is wholly inside or wholly past the row.
#pragma unroll
    for (int g = 0; g < E / 4; ++g) {
      float4 q = make_float4(0.f, 0.f, 0.f, 0.f);
      if (t0 + 4 * g < T) q = *reinterpret_cast<const float4 *>(p + t0 + 4 * g);
      out[4 * g] = q.x;
      out[4 * g + 1] = q.y;
      out[4 * g + 2] = q.z;
      out[4 * g + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e) out[e] = (t0 + e < T) ? p[t0 + e] : 0.f;
  }
}

template <bool VEC>
__device__ __forceinline__ void store8(float *__restrict__ p, int t0, int T, const float (&in)[E]) {
  if constexpr (VEC) {
#pragma unroll
    for (int g = 0; g < E / 4; ++g) {
      if (t0 + 4 * g < T)
        *reinterpret_cast<float4 *>(p + t0 + 4 * g) =
            make_float4(in[4 * g], in[4 * g + 1], in[4 * g + 2], in[4 * g + 3]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e)
      if (t0 + e < T) p[t0 + e] = in[e];
  }
}

template <bool VEC>
__device__ __forceinline__ void gae_body(const float *__restrict__ rewards,
                                         const float *__restrict__ values,
                                         const float *__restrict__ mask, float *__restrict__ adv,
                                         float *__restrict__ ret, double *__restrict__ partials,
                                         unsigned int *__restrict__ counter,
                                         double *__restrict__ stats, int T, float gamma,
                                         float gl) {
  __shared__ Affine warp_map[kMaxThreads / 32];
  __shared__ float warp_in[kMaxThreads / 32];
  __shared__ float chunk_carry;
  __shared__ double scratch[32];
  __shared__ bool is_last;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const size_t row_off = (size_t)blockIdx.x * T;
  const float *r = rewards + row_off;
  const float *v = values + row_off;
  const float *m = mask + row_off;
  float *a_out = adv + row_off;
  float *r_out = ret + row_off;

  const int chunk = blockDim.x * E;
  const int nchunks = (T + chunk - 1) / chunk;
  double n_acc = 0.0, s_acc = 0.0, q_acc = 0.0;
  float carry = 0.f;  // A entering the current chunk from its right (0 past the end)

  for (int ch = nchunks - 1; ch >= 0; --ch) {
    const int t0 = ch * chunk + threadIdx.x * E;
    float rv[E], vv[E], mv[E];
    load8<VEC>(r, t0, T, rv);
    load8<VEC>(v, t0, T, vv);
    load8<VEC>(m, t0, T, mv);
    const int t_next = t0 + E;
    const bool valid_after = t_next < T && m[t_next] != 0.f;
    const float v_after = valid_after ? v[t_next] : 0.f;

    // Per-step maps; padding is (0, 0) and never reads its (possibly garbage) inputs.
    float d[E], c[E];
    bool valid[E];
#pragma unroll
    for (int e = 0; e < E; ++e) valid[e] = (t0 + e < T) && mv[e] != 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const bool nxt = e + 1 < E ? valid[e + 1] : valid_after;
      const float nv = e + 1 < E ? (nxt ? vv[e + 1] : 0.f) : v_after;
      d[e] = valid[e] ? (rv[e] + gamma * nv) - vv[e] : 0.f;
      c[e] = (valid[e] && nxt) ? gl : 0.f;
    }
    Affine seg = {0.f, 1.f};
#pragma unroll
    for (int e = E - 1; e >= 0; --e) seg = compose({d[e], c[e]}, seg);

    // Inclusive scan from the right within the warp: lane l ends with lanes [l, 32).
    Affine incl = seg;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float nd = __shfl_down_sync(0xffffffffu, incl.d, o);
      const float nc = __shfl_down_sync(0xffffffffu, incl.c, o);
      if (lane + o < 32) incl = compose(incl, {nd, nc});
    }
    // Exclusive: the lanes strictly to the right of this one.
    Affine excl = {__shfl_down_sync(0xffffffffu, incl.d, 1),
                   __shfl_down_sync(0xffffffffu, incl.c, 1)};
    if (lane == 31) excl = {0.f, 1.f};
    if (lane == 0) warp_map[warp] = incl;
    __syncthreads();
    if (threadIdx.x == 0) {
      float a = carry;
      for (int w = nwarps - 1; w >= 0; --w) {
        warp_in[w] = a;
        a = warp_map[w].d + warp_map[w].c * a;
      }
      chunk_carry = a;
    }
    __syncthreads();

    float a = excl.d + excl.c * warp_in[warp];
    float av[E], rt[E];
#pragma unroll
    for (int e = E - 1; e >= 0; --e) {
      a = valid[e] ? d[e] + c[e] * a : 0.f;
      av[e] = a;
      rt[e] = valid[e] ? a + vv[e] : 0.f;
      if (valid[e]) {
        n_acc += 1.0;
        s_acc += (double)a;
        q_acc += (double)a * (double)a;
      }
    }
    store8<VEC>(a_out, t0, T, av);
    store8<VEC>(r_out, t0, T, rt);
    carry = chunk_carry;
    // No barrier here: the next chunk writes warp_map only after this chunk's second barrier
    // (so after thread 0 read it), and warp_in / chunk_carry only after its own first one
    // (so after every warp read this chunk's values).
  }

  // Block partials, then the last block folds every block's partial into the statistics.
  const double n_blk = block_sum(n_acc, scratch);
  const double s_blk = block_sum(s_acc, scratch);
  const double q_blk = block_sum(q_acc, scratch);
  if (threadIdx.x == 0) {
    partials[3 * blockIdx.x] = n_blk;
    partials[3 * blockIdx.x + 1] = s_blk;
    partials[3 * blockIdx.x + 2] = q_blk;
    __threadfence();  // partials visible device-wide before the counter says so
    is_last = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  double n = 0.0, s = 0.0, q = 0.0;
  for (int b = threadIdx.x; b < (int)gridDim.x; b += blockDim.x) {
    // __ldcg: bypass L1, which may hold nothing stale here but is not coherent across SMs.
    n += __ldcg(partials + 3 * b);
    s += __ldcg(partials + 3 * b + 1);
    q += __ldcg(partials + 3 * b + 2);
  }
  n = block_sum(n, scratch);
  s = block_sum(s, scratch);
  q = block_sum(q, scratch);
  if (threadIdx.x == 0) {
    const double mean = n > 0.0 ? s / n : 0.0;
    double var = n > 1.0 ? (q - s * mean) / (n - 1.0) : 0.0;
    stats[0] = n;
    stats[1] = mean;
    stats[2] = var > 0.0 ? var : 0.0;  // rounding can leave a tiny negative for constant A
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Entry points: gae_scan_f32, gae_scan_f32_vec4, grpo_group_norm_f32. Each takes one
// GaeParams by value (gae.cuh).
// ---------------------------------------------------------------------------------------
// Grid: B blocks (one row each); block: a multiple of 32 threads, at most 256.
// VEC variant: T % 4 == 0 and 16-byte-aligned row starts for all three inputs.
extern "C" __global__ void __launch_bounds__(kMaxThreads) gae_scan_f32(const GaeParams p) {
  gae_body<false>(p.rewards, p.values, p.mask, p.adv, p.ret, p.partials, p.counter, p.stats,
                  p.t, p.gamma, p.gl);
}

extern "C" __global__ void __launch_bounds__(kMaxThreads) gae_scan_f32_vec4(const GaeParams p) {
  gae_body<true>(p.rewards, p.values, p.mask, p.adv, p.ret, p.partials, p.counter, p.stats,
                 p.t, p.gamma, p.gl);
}

// rewards/out: [n_groups * group]; one warp per group.
extern "C" __global__ void grpo_group_norm_f32(const GaeParams p) {
  const float *__restrict__ rewards = p.rewards;
  float *__restrict__ out = p.out;
  const int n_groups = p.n_groups, group = p.group;
  const double eps = p.eps;
  const int lane = threadIdx.x & 31;
  const int g = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (g >= n_groups) return;  // whole warps leave together, so the shuffles stay full
  const float *x = rewards + (size_t)g * group;
  float *y = out + (size_t)g * group;
  double s = 0.0;
  for (int i = lane; i < group; i += 32) s += (double)x[i];
  const double mean = warp_sum(s) / (double)group;
  double ss = 0.0;
  for (int i = lane; i < group; i += 32) {
    const double dlt = (double)x[i] - mean;
    ss += dlt * dlt;
  }
  ss = warp_sum(ss);
  const double var = group > 1 ? ss / (double)(group - 1) : 0.0;
  const double denom = sqrt(var) + eps;
  for (int i = lane; i < group; i += 32) y[i] = (float)(((double)x[i] - mean) / denom);
}
