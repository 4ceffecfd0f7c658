// A linear layer's bias, with the activation that follows it fused in (GPT-2's MLP:
// gelu(x W^T + b)), so the GEMM's output is read once forward and once backward:
//   forward:  out = act(y + b), a block per row at a time, threads across the columns (no
//             per-element index division);
//   backward: dL/dy = dy * act'(y + b), written back (nothing to write for the identity), and
//             the bias gradient as a column reduction: each block owns 256 columns of one group
//             of rows and sums them in row order into its own partial row (no atomics);
//             (rows a multiple of 16 bytes take backward_vec: 16-byte accesses, warps over
//             the rows);
//   reduce:   the groups' partials added per column in a fixed order. The bias gradient is
//             the same on every run.
// The reference is candle's broadcast add (and its GELU composite), whose backward sums the
// columns with a generic reduction over a transposed view.
#include "bias.cuh"
#include "gelu.cuh"

namespace {

using temper::from_f32;
using temper::gelu_tanh;
using temper::gelu_tanh_slope;
using temper::to_f32;

constexpr int kThreads = 256;

template <typename T> __device__ void forward(const BiasParams &p) {
  const T *y = static_cast<const T *>(p.y);
  T *out = static_cast<T *>(p.out);
  for (int r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const size_t row = (size_t)r * p.cols;
    for (int c = threadIdx.x; c < p.cols; c += blockDim.x) {
      const float v = to_f32(y[row + c]) + p.b[c];
      out[row + c] = from_f32<T>(p.act == kGeluTanh ? gelu_tanh(v) : v);
    }
  }
}

template <typename T> __device__ void backward(const BiasParams &p) {
  const int c = blockIdx.x * kThreads + threadIdx.x;
  if (c >= p.cols) return;
  const T *y = static_cast<const T *>(p.y);
  const T *dy = static_cast<const T *>(p.dy);
  T *out = static_cast<T *>(p.out);
  const int per = (p.rows + p.groups - 1) / p.groups;
  const int r0 = blockIdx.y * per;
  const int r1 = min(p.rows, r0 + per);
  const float b = p.b[c];
  float acc = 0.f;
  for (int r = r0; r < r1; ++r) {
    const size_t i = (size_t)r * p.cols + c;
    float d = to_f32(dy[i]);
    if (p.act == kGeluTanh) d *= gelu_tanh_slope(to_f32(y[i]) + b);
    if (out != nullptr) out[i] = from_f32<T>(d);
    acc += d;
  }
  p.partial[(size_t)blockIdx.y * p.cols + c] = acc;
}

// The forward with 16-byte accesses (rows a multiple of 16 bytes, aligned bases): a
// grid-stride loop over the 16-byte chunks of the whole tensor.
template <typename T> __device__ void forward_vec(const BiasParams &p) {
  using V = temper::Vec16<T>;
  constexpr int E = V::N;
  const int vcols = p.cols / E;
  const long long chunks = p.n / E;
  const V *y = static_cast<const V *>(p.y);
  V *out = static_cast<V *>(p.out);
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < chunks;
       i += (long long)gridDim.x * blockDim.x) {
    const int c = (int)(i % vcols) * E;
    const V z = y[i];
    V o;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const float v = to_f32(z.v[e]) + p.b[c + e];
      o.v[e] = from_f32<T>(p.act == kGeluTanh ? gelu_tanh(v) : v);
    }
    out[i] = o;
  }
}

// The backward with 16-byte accesses, for rows a multiple of 16 bytes long with aligned bases
// (the launcher checks): a block covers 32 16-byte column chunks, one per lane, and its
// group's rows, warp w taking rows w, w + 8, ...; the warps' column sums are added in warp
// order through shared memory into the group's partial row. A warp loads kRowsAhead of its
// rows (dy, and y under GELU) before it uses any: loaded one row at a time, each row's loads
// waited for the store of the row before (out may alias dy or y, for all the compiler knows),
// one memory round trip a row with one row's loads in flight. The sums run in row order as
// before.
constexpr int kRowsAhead = 4;

template <typename T, bool GELU>
__device__ void backward_vec_rows(const BiasParams &p, int vc, int r0, int r1, float (&acc)[temper::Vec16<T>::N]) {
  using V = temper::Vec16<T>;
  constexpr int E = V::N;
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int vcols = p.cols / E;
  const V *dy = static_cast<const V *>(p.dy);
  const V *y = static_cast<const V *>(p.y);
  V *out = static_cast<V *>(p.out);
  float b[E];
#pragma unroll
  for (int i = 0; i < E; ++i) b[i] = p.b[vc * E + i];
  for (int r = r0 + warp; r < r1; r += kRowsAhead * nwarps) {
    V g[kRowsAhead], z[kRowsAhead];
#pragma unroll
    for (int u = 0; u < kRowsAhead; ++u) {
      const int row = r + u * nwarps;
      // A row past the group's end reads row r again and is dropped.
      const size_t at = (size_t)(row < r1 ? row : r) * vcols + vc;
      g[u] = dy[at];
      if constexpr (GELU) z[u] = y[at];
    }
#pragma unroll
    for (int u = 0; u < kRowsAhead; ++u) {
      const int row = r + u * nwarps;
      if (row >= r1) break;
      const size_t at = (size_t)row * vcols + vc;
      V o;
#pragma unroll
      for (int i = 0; i < E; ++i) {
        if constexpr (GELU) {
          const float d = to_f32(g[u].v[i]) * gelu_tanh_slope(to_f32(z[u].v[i]) + b[i]);
          o.v[i] = from_f32<T>(d);
          acc[i] += d;
        } else {
          acc[i] += to_f32(g[u].v[i]);
          o.v[i] = g[u].v[i];
        }
      }
      if (out != nullptr) out[at] = o;
    }
  }
}

template <typename T> __device__ void backward_vec(const BiasParams &p) {
  using V = temper::Vec16<T>;
  constexpr int E = V::N;
  __shared__ float red[kThreads / 32][32][E + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int vcols = p.cols / E;
  const int vc = blockIdx.x * 32 + lane;
  const int per = (p.rows + p.groups - 1) / p.groups;
  const int r0 = blockIdx.y * per;
  const int r1 = min(p.rows, r0 + per);
  float acc[E];
#pragma unroll
  for (int i = 0; i < E; ++i) acc[i] = 0.f;
  if (vc < vcols) {
    if (p.act == kGeluTanh)
      backward_vec_rows<T, true>(p, vc, r0, r1, acc);
    else
      backward_vec_rows<T, false>(p, vc, r0, r1, acc);
  }
#pragma unroll
  for (int i = 0; i < E; ++i) red[warp][lane][i] = acc[i];
  __syncthreads();
  if (warp == 0 && vc < vcols) {
#pragma unroll
    for (int i = 0; i < E; ++i) {
      float sum = 0.f;
      for (int w = 0; w < nwarps; ++w) sum += red[w][lane][i];
      p.partial[(size_t)blockIdx.y * p.cols + vc * E + i] = sum;
    }
  }
}

}  // namespace

// db[c], the sum of the groups' partial rows: 32 columns per block, warp w adding groups w,
// w + 8, ... in order, then the warps' sums in warp order: the same on every run.
extern "C" __global__ void __launch_bounds__(kThreads) bias_db_reduce(const BiasParams p) {
  __shared__ float sums[kThreads / 32][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int c = blockIdx.x * 32 + lane;
  float db = 0.f;
  if (c < p.cols) {
    // Unrolled so that several loads are in flight: the sum is latency-bound.
#pragma unroll 4
    for (int g = warp; g < p.groups; g += nwarps) db += p.partial[(size_t)g * p.cols + c];
  }
  sums[warp][lane] = db;
  __syncthreads();
  if (warp == 0 && c < p.cols) {
    float total = 0.f;
    for (int w = 0; w < nwarps; ++w) total += sums[w][lane];
    p.db[c] = total;
  }
}

#define BIAS_ENTRY(SUFFIX, T)                                                                  \
  extern "C" __global__ void __launch_bounds__(kThreads) bias_fwd_##SUFFIX(const BiasParams p) { \
    forward<T>(p);                                                                             \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(kThreads) bias_bwd_##SUFFIX(const BiasParams p) { \
    backward<T>(p);                                                                            \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(kThreads)                                       \
      bias_bwd_vec_##SUFFIX(const BiasParams p) {                                              \
    backward_vec<T>(p);                                                                        \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(kThreads)                                       \
      bias_fwd_vec_##SUFFIX(const BiasParams p) {                                              \
    forward_vec<T>(p);                                                                         \
  }

BIAS_ENTRY(f32, float)
BIAS_ENTRY(bf16, __nv_bfloat16)
BIAS_ENTRY(f16, __half)
