// RMSNorm forward and backward over the last dimension of a row-major [rows, cols] tensor.
//
//   forward:  r = 1 / sqrt(mean_j x_j^2 + eps)          (saved per row, f32)
//             y_j = (x_j * r) * g_j
//   backward: dx_j = r * dy_j * g_j - x_j * r^3 / cols * sum_k dy_k * g_k * x_k
//             dw_j = sum_rows dy_j * (x_j * r)
//
// where the gain g_j = w_j + w_offset, formed in f32: w_offset is 0, or 1 for Gemma, whose
// gains are stored as offsets from one and (in transformers) added to one in f32. Gemma's
// offsets stay f32 under bf16 or f16 compute (`1 + w` rounded to bf16 would lose w's low
// bits), so every 16-bit dtype also has `_wf32` entry points that read an f32 w; their dw is
// reduced into f32 by rmsnorm_dw_reduce_f32.
//
// With a residual r, the forward normalises s = x + r (rounded to the storage dtype, as a
// separate add would) and writes s as well; with ds, the backward adds it to dx (the residual
// stream's gradient, which would otherwise take a pass of its own).
//
// Arithmetic is f32 for every storage dtype (f32, bf16, f16), in the same order as the
// reference composite (`src/kernels/rmsnorm.rs`) so the two differ only by summation order.
//
// Work split. Forward: one block per row. Backward: a grid of G blocks (a few per SM), block b
// taking rows b, b+G, ...; each block keeps its share of dw in registers across its rows and
// writes one f32 partial row, `dw_partial[b, :]`; a second small kernel sums the G partials
// into dw. This keeps the cross-row reduction free of atomics (deterministic) and reads dy and
// x exactly once.
//
// Template choices, picked on the Rust side (src/kernels/cuda/rmsnorm.rs) per call:
// - V: elements per access, 1 or 16 bytes' worth (4 f32, 8 bf16/f16) when the row length and
//   every base offset keep 16-byte alignment;
// - K: accesses per thread kept in registers, so a row is read from memory once (K*V <= 16
//   values per thread, up to 512 threads: rows up to 8192 wide). K = 0 is the generic path for
//   wider rows: the row is read twice (second read mostly from L2) and the backward keeps dw in
//   its (block-private) partial row instead of registers.
// Names: rmsnorm_{fwd,bwd}_{f32,bf16,f16}_v{V}_k{K}, rmsnorm_{fwd,bwd}_{bf16,f16}_wf32_v{V}_k{K}
// and rmsnorm_dw_reduce_{f32,bf16,f16} (named by w's dtype).

#include "rmsnorm.cuh"

using namespace temper;

namespace {

constexpr int kMaxThreads = 512;

// ---------------------------------------------------------------------------------------
// Kernel bodies.
// ---------------------------------------------------------------------------------------

// Loads V consecutive values of chunk `c` (element offset c*V) into f32 registers.
template <typename T, int V>
__device__ __forceinline__ void load_chunk(const T *row, int c, float (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = to_f32(row[c]);
  } else {
    static_assert(V == Vec16<T>::N, "vector width is 16 bytes");
    const Vec16<T> p = reinterpret_cast<const Vec16<T> *>(row)[c];
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = to_f32(p.v[i]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_chunk(T *row, int c, const float (&in)[V]) {
  if constexpr (V == 1) {
    row[c] = from_f32<T>(in[0]);
  } else {
    Vec16<T> p;
#pragma unroll
    for (int i = 0; i < V; ++i) p.v[i] = from_f32<T>(in[i]);
    reinterpret_cast<Vec16<T> *>(row)[c] = p;
  }
}

// V consecutive gains of chunk `c` (element offset c*V), w_offset added, as f32. An f32 gain
// under a 16-bit T spans two 16-byte words per chunk of eight values.
template <typename G, int V>
__device__ __forceinline__ void load_gain(const G *w, int c, float off, float (&out)[V]) {
  if constexpr (V == 1 || sizeof(G) == 16 / V) {
    load_chunk<G, V>(w, c, out);
  } else {
    constexpr int N = Vec16<G>::N;
    static_assert(V % N == 0, "a chunk of gains is whole 16-byte words");
#pragma unroll
    for (int h = 0; h < V / N; ++h) {
      const Vec16<G> p = reinterpret_cast<const Vec16<G> *>(w)[c * (V / N) + h];
#pragma unroll
      for (int i = 0; i < N; ++i) out[h * N + i] = to_f32(p.v[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] += off;
}

// x + r for chunk `c` into `xv`, rounded to T, and written to `s`: what the norm then reads.
template <typename T, int V>
__device__ __forceinline__ void add_residual(const T *rr, T *sr, int c, float (&xv)[V]) {
  float rv[V];
  load_chunk<T, V>(rr, c, rv);
#pragma unroll
  for (int i = 0; i < V; ++i) xv[i] = to_f32(from_f32<T>(xv[i] + rv[i]));
  store_chunk<T, V>(sr, c, xv);
}

template <typename T, typename G, int V, int K>
__device__ __forceinline__ void fwd_body(const T *__restrict__ x, const G *__restrict__ w,
                                         const T *__restrict__ resid, T *__restrict__ sum,
                                         T *__restrict__ y, float *__restrict__ rstd, int cols,
                                         float eps, float w_off) {
  __shared__ float scratch[32];
  const int row = blockIdx.x;
  const int nchunks = cols / V;
  const T *xr = x + (size_t)row * cols;
  T *yr = y + (size_t)row * cols;
  // With a residual, the row's sum; each thread reads back only the chunks it wrote.
  const T *rr = resid ? resid + (size_t)row * cols : nullptr;
  T *sr = resid ? sum + (size_t)row * cols : nullptr;
  float ss = 0.f;
  if constexpr (K > 0) {
    // Every load first, in one straight run: the row's chunks, the residual's and the gains
    // (a thread past the row's end reads chunk 0 and drops it). Loaded after the reduction,
    // the gains would be a memory round trip after the row's, and in a decode step's norms
    // of a few rows each such trip is most of the kernel.
    float xv[K][V], rv[K][V], wv[K][V];
    const T *rsrc = rr ? rr : xr;  // without a residual, x again (from L1), unused
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = threadIdx.x + k * blockDim.x;
      const int cc = c < nchunks ? c : 0;
      load_chunk<T, V>(xr, cc, xv[k]);
      load_chunk<T, V>(rsrc, cc, rv[k]);
      load_gain<G, V>(w, cc, w_off, wv[k]);
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = threadIdx.x + k * blockDim.x;
      if (c < nchunks) {
        if (rr) {
#pragma unroll
          for (int i = 0; i < V; ++i) xv[k][i] = to_f32(from_f32<T>(xv[k][i] + rv[k][i]));
          store_chunk<T, V>(sr, c, xv[k]);
        }
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) xv[k][i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < V; ++i) ss += xv[k][i] * xv[k][i];
    }
    const float r = 1.f / sqrtf(block_sum(ss, scratch) / (float)cols + eps);
    if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = threadIdx.x + k * blockDim.x;
      if (c < nchunks) {
        float out[V];
#pragma unroll
        for (int i = 0; i < V; ++i) out[i] = (xv[k][i] * r) * wv[k][i];
        store_chunk<T, V>(yr, c, out);
      }
    }
  } else {
    for (int c = threadIdx.x; c < nchunks; c += blockDim.x) {
      float xv[V];
      load_chunk<T, V>(xr, c, xv);
      if (rr) add_residual<T, V>(rr, sr, c, xv);
#pragma unroll
      for (int i = 0; i < V; ++i) ss += xv[i] * xv[i];
    }
    const float r = 1.f / sqrtf(block_sum(ss, scratch) / (float)cols + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    const T *src = rr ? sr : xr;
    for (int c = threadIdx.x; c < nchunks; c += blockDim.x) {
      float xv[V], wv[V], out[V];
      load_chunk<T, V>(src, c, xv);
      load_gain<G, V>(w, c, w_off, wv);
#pragma unroll
      for (int i = 0; i < V; ++i) out[i] = (xv[i] * r) * wv[i];
      store_chunk<T, V>(yr, c, out);
    }
  }
}

// Chunk `c` of the residual stream's gradient (zeros without one).
template <typename T, int V>
__device__ __forceinline__ void load_or_zero(const T *row, int c, float (&out)[V]) {
  if (row) {
    load_chunk<T, V>(row, c, out);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = 0.f;
  }
}

template <typename T, typename G, int V, int K>
__device__ __forceinline__ void bwd_body(const T *__restrict__ x, const G *__restrict__ w,
                                         const T *__restrict__ dy,
                                         const float *__restrict__ rstd,
                                         const T *__restrict__ ds, T *__restrict__ dx,
                                         float *__restrict__ dw_partial, int rows, int cols,
                                         float w_off) {
  __shared__ float scratch[32];
  const int nchunks = cols / V;
  const float inv_cols = 1.f / (float)cols;
  float *part = dw_partial + (size_t)blockIdx.x * cols;
  if constexpr (K > 0) {
    float wv[K][V], acc[K][V];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = threadIdx.x + k * blockDim.x;
      if (c < nchunks) {
        load_gain<G, V>(w, c, w_off, wv[k]);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) wv[k][i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < V; ++i) acc[k][i] = 0.f;
    }
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
      const T *xr = x + (size_t)row * cols;
      const T *dyr = dy + (size_t)row * cols;
      T *dxr = dx + (size_t)row * cols;
      // In the 16-byte variants every load of the row comes first, in one straight run (a
      // thread past the row's end reads chunk 0 and drops it; without ds, x again): the next
      // chunk's loads waited on this one's arithmetic, and rstd and ds came after the
      // reduction's barriers, a memory round trip each. The scalar variants, whose K reaches
      // 16, spilled with it and load as they go.
      if constexpr (V > 1) {
        const T *dsr = ds ? ds + (size_t)row * cols : xr;
        float xv[K][V], gv[K][V], dv[K][V];
        const float r = rstd[row];
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const int c = threadIdx.x + k * blockDim.x;
          const int cc = c < nchunks ? c : 0;
          load_chunk<T, V>(xr, cc, xv[k]);
          load_chunk<T, V>(dyr, cc, gv[k]);
          load_chunk<T, V>(dsr, cc, dv[k]);
        }
        float dot = 0.f;
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const int c = threadIdx.x + k * blockDim.x;
          if (c >= nchunks) {
#pragma unroll
            for (int i = 0; i < V; ++i) xv[k][i] = gv[k][i] = 0.f;
          }
          if (c >= nchunks || !ds) {
#pragma unroll
            for (int i = 0; i < V; ++i) dv[k][i] = 0.f;
          }
#pragma unroll
          for (int i = 0; i < V; ++i) dot += gv[k][i] * wv[k][i] * xv[k][i];
        }
        dot = block_sum(dot, scratch);
        const float coef = r * r * r * dot * inv_cols;
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const int c = threadIdx.x + k * blockDim.x;
          if (c < nchunks) {
            float out[V];
#pragma unroll
            for (int i = 0; i < V; ++i) {
              out[i] = r * gv[k][i] * wv[k][i] - coef * xv[k][i] + dv[k][i];
              acc[k][i] += gv[k][i] * (xv[k][i] * r);
            }
            store_chunk<T, V>(dxr, c, out);
          }
        }
      } else {
        const T *dsr = ds ? ds + (size_t)row * cols : nullptr;
        float xv[K][V], gv[K][V];
        float dot = 0.f;
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const int c = threadIdx.x + k * blockDim.x;
          if (c < nchunks) {
            load_chunk<T, V>(xr, c, xv[k]);
            load_chunk<T, V>(dyr, c, gv[k]);
          } else {
#pragma unroll
            for (int i = 0; i < V; ++i) xv[k][i] = gv[k][i] = 0.f;
          }
#pragma unroll
          for (int i = 0; i < V; ++i) dot += gv[k][i] * wv[k][i] * xv[k][i];
        }
        dot = block_sum(dot, scratch);
        const float r = rstd[row];
        const float coef = r * r * r * dot * inv_cols;
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const int c = threadIdx.x + k * blockDim.x;
          if (c < nchunks) {
            float out[V], dv[V];
            load_or_zero<T, V>(dsr, c, dv);
#pragma unroll
            for (int i = 0; i < V; ++i) {
              out[i] = r * gv[k][i] * wv[k][i] - coef * xv[k][i] + dv[i];
              acc[k][i] += gv[k][i] * (xv[k][i] * r);
            }
            store_chunk<T, V>(dxr, c, out);
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = threadIdx.x + k * blockDim.x;
      if (c < nchunks) {
#pragma unroll
        for (int i = 0; i < V; ++i) part[c * V + i] = acc[k][i];
      }
    }
  } else {
    // Each thread owns the same columns of `part` for every row, so the read-modify-write
    // below needs no synchronisation.
    for (int c = threadIdx.x; c < nchunks; c += blockDim.x) {
#pragma unroll
      for (int i = 0; i < V; ++i) part[c * V + i] = 0.f;
    }
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
      const T *xr = x + (size_t)row * cols;
      const T *dyr = dy + (size_t)row * cols;
      T *dxr = dx + (size_t)row * cols;
      const T *dsr = ds ? ds + (size_t)row * cols : nullptr;
      float dot = 0.f;
      for (int c = threadIdx.x; c < nchunks; c += blockDim.x) {
        float xv[V], gv[V], wv[V];
        load_chunk<T, V>(xr, c, xv);
        load_chunk<T, V>(dyr, c, gv);
        load_gain<G, V>(w, c, w_off, wv);
#pragma unroll
        for (int i = 0; i < V; ++i) dot += gv[i] * wv[i] * xv[i];
      }
      dot = block_sum(dot, scratch);
      const float r = rstd[row];
      const float coef = r * r * r * dot * inv_cols;
      for (int c = threadIdx.x; c < nchunks; c += blockDim.x) {
        float xv[V], gv[V], wv[V], dv[V], out[V];
        load_chunk<T, V>(xr, c, xv);
        load_chunk<T, V>(dyr, c, gv);
        load_gain<G, V>(w, c, w_off, wv);
        load_or_zero<T, V>(dsr, c, dv);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          out[i] = r * gv[i] * wv[i] - coef * xv[i] + dv[i];
          part[c * V + i] += gv[i] * (xv[i] * r);
        }
        store_chunk<T, V>(dxr, c, out);
      }
    }
  }
}

// dw[j] = sum_g partial[g, j]: one thread per column, coalesced across the warp.
template <typename T>
__device__ __forceinline__ void dw_reduce_body(const float *__restrict__ partial,
                                               T *__restrict__ dw, int groups, int cols) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  float s = 0.f;
  for (int g = 0; g < groups; ++g) s += partial[(size_t)g * cols + j];
  dw[j] = from_f32<T>(s);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Entry points: rmsnorm_{fwd,bwd}_<dtype>[_wf32]_v<V>_k<K>, rmsnorm_dw_reduce_<dtype>. Each
// takes one RmsNormParams by value (rmsnorm.cuh).
// ---------------------------------------------------------------------------------------
#define RMS_INST(T, G, NAME, V, K)                                                           \
  extern "C" __global__ void __launch_bounds__(kMaxThreads)                                  \
      rmsnorm_fwd_##NAME##_v##V##_k##K(const RmsNormParams p) {                              \
    temper::pdl_enter();                                                                     \
    fwd_body<T, G, V, K>(static_cast<const T *>(p.x), static_cast<const G *>(p.w),           \
                         static_cast<const T *>(p.r), static_cast<T *>(p.s),                 \
                         static_cast<T *>(p.y), p.rstd, p.cols, p.eps, p.w_offset);          \
  }                                                                                          \
  extern "C" __global__ void __launch_bounds__(kMaxThreads)                                  \
      rmsnorm_bwd_##NAME##_v##V##_k##K(const RmsNormParams p) {                              \
    temper::pdl_enter();                                                                     \
    bwd_body<T, G, V, K>(static_cast<const T *>(p.x), static_cast<const G *>(p.w),           \
                         static_cast<const T *>(p.dy), p.rstd, static_cast<const T *>(p.ds), \
                         static_cast<T *>(p.dx), p.dw_partial, p.rows, p.cols, p.w_offset);  \
  }

#define RMS_SCALAR_K(T, G, NAME)                                                             \
  RMS_INST(T, G, NAME, 1, 0)                                                                 \
  RMS_INST(T, G, NAME, 1, 1)                                                                 \
  RMS_INST(T, G, NAME, 1, 2)                                                                 \
  RMS_INST(T, G, NAME, 1, 4)                                                                 \
  RMS_INST(T, G, NAME, 1, 8)                                                                 \
  RMS_INST(T, G, NAME, 1, 16)

#define RMS_SCALAR(T, NAME)                                                                  \
  RMS_SCALAR_K(T, T, NAME)                                                                   \
  extern "C" __global__ void rmsnorm_dw_reduce_##NAME(const RmsNormParams p) {               \
    temper::pdl_enter();                                                                     \
    dw_reduce_body<T>(p.dw_partial, static_cast<T *>(p.dw), p.groups, p.cols);               \
  }

RMS_SCALAR(float, f32)
RMS_SCALAR(__nv_bfloat16, bf16)
RMS_SCALAR(__half, f16)
RMS_SCALAR_K(__nv_bfloat16, float, bf16_wf32)
RMS_SCALAR_K(__half, float, f16_wf32)

// 16-byte variants: K * V <= 16 values per thread.
RMS_INST(float, float, f32, 4, 0)
RMS_INST(float, float, f32, 4, 1)
RMS_INST(float, float, f32, 4, 2)
RMS_INST(float, float, f32, 4, 4)
RMS_INST(__nv_bfloat16, __nv_bfloat16, bf16, 8, 0)
RMS_INST(__nv_bfloat16, __nv_bfloat16, bf16, 8, 1)
RMS_INST(__nv_bfloat16, __nv_bfloat16, bf16, 8, 2)
RMS_INST(__half, __half, f16, 8, 0)
RMS_INST(__half, __half, f16, 8, 1)
RMS_INST(__half, __half, f16, 8, 2)
RMS_INST(__nv_bfloat16, float, bf16_wf32, 8, 0)
RMS_INST(__nv_bfloat16, float, bf16_wf32, 8, 1)
RMS_INST(__nv_bfloat16, float, bf16_wf32, 8, 2)
RMS_INST(__half, float, f16_wf32, 8, 0)
RMS_INST(__half, float, f16_wf32, 8, 1)
RMS_INST(__half, float, f16_wf32, 8, 2)
