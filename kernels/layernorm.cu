// LayerNorm forward and backward (GPT-2's norm) in f32 arithmetic whatever the input dtype,
// in place of candle's composite (a dozen launches each way per norm):
//   forward:  one block per row: mean, then the variance about it (two passes over a row that
//             stays in cache), y = (x - mean) * rstd * w + b; mean and rstd saved. With a
//             residual, the first pass writes s = x + r and the others read s (each thread
//             reads back only the columns it wrote)
//   backward: `groups` blocks, each over rows g, g + groups, ...: dx from the row's two sums
//             (plus ds, the residual stream's gradient, where given),
//             and the group's dw, db accumulated per column in its own partial row (each
//             thread owns its columns: no atomics)
//   reduce:   the groups' partials summed per column in a fixed order: deterministic
// Rows narrow enough for a warp's registers take the warp-per-row variants below instead.
#include "layernorm.cuh"

namespace {

using temper::block_sum;
using temper::from_f32;
using temper::to_f32;
using temper::warp_sum;

constexpr int kThreads = 256;

template <typename T> __device__ void forward(const LayerNormParams &p) {
  __shared__ float scratch[32];
  const int row = blockIdx.x;
  const size_t at = (size_t)row * p.cols;
  const T *x = static_cast<const T *>(p.x) + at;
  T *y = static_cast<T *>(p.y) + at;
  float s = 0.f;
  if (p.r) {
    const T *r = static_cast<const T *>(p.r) + at;
    T *sum = static_cast<T *>(p.s) + at;
    for (int c = threadIdx.x; c < p.cols; c += blockDim.x) {
      const T v = from_f32<T>(to_f32(x[c]) + to_f32(r[c]));
      sum[c] = v;
      s += to_f32(v);
    }
    x = sum;
  } else {
    for (int c = threadIdx.x; c < p.cols; c += blockDim.x) s += to_f32(x[c]);
  }
  const float mean = block_sum(s, scratch) / p.cols;
  float ss = 0.f;
  for (int c = threadIdx.x; c < p.cols; c += blockDim.x) {
    const float d = to_f32(x[c]) - mean;
    ss += d * d;
  }
  const float rstd = rsqrtf(block_sum(ss, scratch) / p.cols + p.eps);
  for (int c = threadIdx.x; c < p.cols; c += blockDim.x)
    y[c] = from_f32<T>((to_f32(x[c]) - mean) * rstd * p.w[c] + p.b[c]);
  if (threadIdx.x == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
}

template <typename T> __device__ void backward(const LayerNormParams &p) {
  __shared__ float scratch[32];
  float *pdw = p.partial + (size_t)blockIdx.x * 2 * p.cols;
  float *pdb = pdw + p.cols;
  for (int row = blockIdx.x; row < p.rows; row += p.groups) {
    const T *x = static_cast<const T *>(p.x) + (size_t)row * p.cols;
    const T *dy = static_cast<const T *>(p.dy) + (size_t)row * p.cols;
    T *dx = static_cast<T *>(p.dx) + (size_t)row * p.cols;
    const T *ds = p.ds ? static_cast<const T *>(p.ds) + (size_t)row * p.cols : nullptr;
    const float mean = p.mean[row], rstd = p.rstd[row];
    float a = 0.f, bsum = 0.f;  // sum(dy w), sum(dy w xhat)
    for (int c = threadIdx.x; c < p.cols; c += blockDim.x) {
      const float g = to_f32(dy[c]) * p.w[c];
      a += g;
      bsum += g * (to_f32(x[c]) - mean) * rstd;
    }
    const float ma = block_sum(a, scratch) / p.cols;
    const float mb = block_sum(bsum, scratch) / p.cols;
    for (int c = threadIdx.x; c < p.cols; c += blockDim.x) {
      const float xhat = (to_f32(x[c]) - mean) * rstd;
      const float g = to_f32(dy[c]);
      float d = rstd * (g * p.w[c] - ma - xhat * mb);
      if (ds) d += to_f32(ds[c]);
      dx[c] = from_f32<T>(d);
      pdw[c] += g * xhat;
      pdb[c] += g;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Warp-per-row variants, for rows a warp holds in registers: K chunks of 16 bytes per lane
// (cols a multiple of 16 / sizeof(T), at most 32 * K of them, every base 16-byte aligned;
// the launcher checks). Each pass reads and writes a row once, with 16-byte accesses, and the
// row statistics are warp shuffles with no block barrier. The backward keeps each warp's dw
// and db in registers across its rows; the block adds its warps' sums in warp order in
// shared memory and writes one partial row pair, so the result does not depend on timing.
// ---------------------------------------------------------------------------------------

constexpr int kWarps = kThreads / 32;
constexpr int kMaxK = 4;
// The backward holds five [K][E] register arrays per lane (the row's x, dy and residual
// gradient, its dw and db; up to ~170 registers at K = 4), so its blocks are smaller: more of
// them fit an SM's register file.
constexpr int kBwdThreads = 128;

template <typename T> using V16 = temper::Vec16<T>;

template <typename T> __device__ __forceinline__ const V16<T> *vrow(const void *base, size_t at) {
  return reinterpret_cast<const V16<T> *>(static_cast<const T *>(base) + at);
}

template <typename T> __device__ __forceinline__ V16<T> *vrow_mut(void *base, size_t at) {
  return reinterpret_cast<V16<T> *>(static_cast<T *>(base) + at);
}

template <typename T, int K> __device__ void forward_warp(const LayerNormParams &p) {
  constexpr int E = V16<T>::N;
  // The gains and biases once per block, in shared memory: read per lane after the row's two
  // reductions they were one more memory round trip in a chain of them (a decode step's norms
  // are a few rows each), and every warp of the block read them again.
  __shared__ float sw[32 * K * E], sb[32 * K * E];
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * kWarps + (threadIdx.x >> 5);
  // A warp past the last row still reaches the barrier below.
  const bool live = row < p.rows;
  const int chunks = p.cols / E;
  const size_t at = (size_t)row * p.cols;
  // Every load of the thread is issued before any is used: the row's chunks (and the
  // residual's), then its share of the gains and biases. Interleaved with the sum's stores
  // (p.s may alias x or r, for all the compiler knows) and with the shared-memory fill, each
  // chunk and each fill step waited for the one before: six memory round trips in a row at
  // GPT-2's width, where one will do.
  V16<T> xa[K], ra[K];
  if (live) {
    const V16<T> *x = vrow<T>(p.x, at);
    const V16<T> *r = p.r ? vrow<T>(p.r, at) : nullptr;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = k * 32 + lane;
      if (c < chunks) {
        xa[k] = x[c];
        if (r) ra[k] = r[c];
      }
    }
  }
  constexpr int kFill = (32 * K * E + kThreads - 1) / kThreads;
  float wv[kFill], bv[kFill];
#pragma unroll
  for (int j = 0; j < kFill; ++j) {
    const int i = threadIdx.x + j * kThreads;
    if (i < p.cols) wv[j] = __ldg(p.w + i), bv[j] = __ldg(p.b + i);
  }
#pragma unroll
  for (int j = 0; j < kFill; ++j) {
    const int i = threadIdx.x + j * kThreads;
    if (i < p.cols) sw[i] = wv[j], sb[i] = bv[j];
  }
  float v[K][E];
  float mean = 0.f, rstd = 0.f;
  if (live) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = k * 32 + lane;
      if (c < chunks) {
        if (p.r) {
          V16<T> sum;
#pragma unroll
          for (int i = 0; i < E; ++i) {
            sum.v[i] = from_f32<T>(to_f32(xa[k].v[i]) + to_f32(ra[k].v[i]));
            v[k][i] = to_f32(sum.v[i]);
          }
          vrow_mut<T>(p.s, at)[c] = sum;
        } else {
#pragma unroll
          for (int i = 0; i < E; ++i) v[k][i] = to_f32(xa[k].v[i]);
        }
      } else {
#pragma unroll
        for (int i = 0; i < E; ++i) v[k][i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < E; ++i) s += v[k][i];
    }
    mean = warp_sum(s) / p.cols;
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (k * 32 + lane < chunks) {
#pragma unroll
        for (int i = 0; i < E; ++i) {
          const float d = v[k][i] - mean;
          ss += d * d;
        }
      }
    }
    rstd = rsqrtf(warp_sum(ss) / p.cols + p.eps);
  }
  __syncthreads();
  if (!live) return;
  V16<T> *y = vrow_mut<T>(p.y, at);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = k * 32 + lane;
    if (c < chunks) {
      V16<T> out;
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const int col = c * E + i;
        out.v[i] = from_f32<T>((v[k][i] - mean) * rstd * sw[col] + sb[col]);
      }
      y[c] = out;
    }
  }
  if (lane == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
}

template <typename T, int K> __device__ void backward_warp(const LayerNormParams &p) {
  constexpr int E = V16<T>::N;
  __shared__ float red[2][32 * kMaxK * 8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int chunks = p.cols / E;
  float dw[K][E], db[K][E];
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int i = 0; i < E; ++i) dw[k][i] = db[k][i] = 0.f;
  }
  const int nwarps = blockDim.x >> 5;
  for (int row = blockIdx.x * nwarps + warp; row < p.rows; row += gridDim.x * nwarps) {
    const size_t at = (size_t)row * p.cols;
    const V16<T> *x = vrow<T>(p.x, at);
    const V16<T> *dy = vrow<T>(p.dy, at);
    const float mean = p.mean[row], rstd = p.rstd[row];
    // The row stays in registers in its storage dtype (half the registers of f32 copies)
    // and is converted again in the second pass. Every load of the row comes first, in one
    // straight run (a lane past the row's end reads chunk 0 and drops it; without ds, x
    // again): loaded where each chunk was used, the next chunk's loads waited on this one's
    // arithmetic, a memory round trip a chunk with few rows in flight to hide it.
    V16<T> xs[K], gs[K], dsa[K];
    const V16<T> *ds = p.ds ? vrow<T>(p.ds, at) : x;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = k * 32 + lane;
      const int cc = c < chunks ? c : 0;
      xs[k] = x[cc];
      gs[k] = dy[cc];
      dsa[k] = ds[cc];
    }
    float a = 0.f, b = 0.f;  // sum(dy w), sum(dy w xhat)
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = k * 32 + lane;
      if (c < chunks) {
#pragma unroll
        for (int i = 0; i < E; ++i) {
          const float xh = (to_f32(xs[k].v[i]) - mean) * rstd;
          const float gw = to_f32(gs[k].v[i]) * __ldg(p.w + c * E + i);
          a += gw;
          b += gw * xh;
        }
      }
    }
    const float ma = warp_sum(a) / p.cols;
    const float mb = warp_sum(b) / p.cols;
    V16<T> *dx = vrow_mut<T>(p.dx, at);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = k * 32 + lane;
      if (c < chunks) {
        V16<T> out;
#pragma unroll
        for (int i = 0; i < E; ++i) {
          const float xh = (to_f32(xs[k].v[i]) - mean) * rstd;
          const float g = to_f32(gs[k].v[i]);
          float d = rstd * (g * __ldg(p.w + c * E + i) - ma - xh * mb);
          if (p.ds) d += to_f32(dsa[k].v[i]);
          out.v[i] = from_f32<T>(d);
          dw[k][i] += g * xh;
          db[k][i] += g;
        }
        dx[c] = out;
      }
    }
  }
  for (int c = threadIdx.x; c < p.cols; c += blockDim.x) red[0][c] = red[1][c] = 0.f;
  __syncthreads();
  for (int w = 0; w < nwarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int c = k * 32 + lane;
        if (c < chunks) {
#pragma unroll
          for (int i = 0; i < E; ++i) {
            red[0][c * E + i] += dw[k][i];
            red[1][c * E + i] += db[k][i];
          }
        }
      }
    }
    __syncthreads();
  }
  float *part = p.partial + (size_t)blockIdx.x * 2 * p.cols;
  for (int c = threadIdx.x; c < p.cols; c += blockDim.x) {
    part[c] = red[0][c];
    part[p.cols + c] = red[1][c];
  }
}

}  // namespace

// dw[c] and db[c], the sums of the groups' partial rows: 32 columns per block, warp w adding
// groups w, w + 8, ... in order, then the 8 warp sums in warp order: the same on every run.
extern "C" __global__ void __launch_bounds__(kThreads)
    layernorm_dwdb_reduce(const LayerNormParams p) {
  temper::pdl_enter();
  __shared__ float sw[kWarps][32], sb[kWarps][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int c = blockIdx.x * 32 + lane;
  float dw = 0.f, db = 0.f;
  if (c < p.cols) {
    // Unrolled so that several loads are in flight: the sum is latency-bound.
#pragma unroll 4
    for (int g = warp; g < p.groups; g += kWarps) {
      dw += p.partial[(size_t)g * 2 * p.cols + c];
      db += p.partial[(size_t)g * 2 * p.cols + p.cols + c];
    }
  }
  sw[warp][lane] = dw;
  sb[warp][lane] = db;
  __syncthreads();
  if (warp == 0 && c < p.cols) {
    float a = 0.f, b = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      a += sw[w][lane];
      b += sb[w][lane];
    }
    p.dw[c] = a;
    p.db[c] = b;
  }
}

#define LAYERNORM_ENTRY(SUFFIX, T)                                                        \
  extern "C" __global__ void __launch_bounds__(kThreads)                                  \
      layernorm_fwd_##SUFFIX(const LayerNormParams p) {                                   \
    temper::pdl_enter();                                                                  \
    forward<T>(p);                                                                        \
  }                                                                                       \
  extern "C" __global__ void __launch_bounds__(kThreads)                                  \
      layernorm_bwd_##SUFFIX(const LayerNormParams p) {                                   \
    temper::pdl_enter();                                                                  \
    backward<T>(p);                                                                       \
  }

LAYERNORM_ENTRY(f32, float)
LAYERNORM_ENTRY(bf16, __nv_bfloat16)
LAYERNORM_ENTRY(f16, __half)

// layernorm_{fwd,bwd}_<dtype>_k<K>: the warp-per-row variants, K = 1..kMaxK.
#define LAYERNORM_WARP(SUFFIX, T, K)                                                      \
  extern "C" __global__ void __launch_bounds__(kThreads)                                  \
      layernorm_fwd_##SUFFIX##_k##K(const LayerNormParams p) {                            \
    temper::pdl_enter();                                                                  \
    forward_warp<T, K>(p);                                                                \
  }                                                                                       \
  extern "C" __global__ void __launch_bounds__(kBwdThreads)                               \
      layernorm_bwd_##SUFFIX##_k##K(const LayerNormParams p) {                            \
    temper::pdl_enter();                                                                  \
    backward_warp<T, K>(p);                                                               \
  }
#define LAYERNORM_WARPS(SUFFIX, T)                                                        \
  LAYERNORM_WARP(SUFFIX, T, 1)                                                            \
  LAYERNORM_WARP(SUFFIX, T, 2)                                                            \
  LAYERNORM_WARP(SUFFIX, T, 3)                                                            \
  LAYERNORM_WARP(SUFFIX, T, 4)

LAYERNORM_WARPS(f32, float)
LAYERNORM_WARPS(bf16, __nv_bfloat16)
LAYERNORM_WARPS(f16, __half)
