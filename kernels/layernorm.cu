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
//   reduce:   one thread per column sums the groups' partials in order: deterministic
#include "layernorm.cuh"

namespace {

using temper::block_sum;
using temper::from_f32;
using temper::to_f32;

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

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads)
    layernorm_dwdb_reduce(const LayerNormParams p) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= p.cols) return;
  float dw = 0.f, db = 0.f;
  for (int g = 0; g < p.groups; ++g) {
    dw += p.partial[(size_t)g * 2 * p.cols + c];
    db += p.partial[(size_t)g * 2 * p.cols + p.cols + c];
  }
  p.dw[c] = dw;
  p.db[c] = db;
}

#define LAYERNORM_ENTRY(SUFFIX, T)                                                        \
  extern "C" __global__ void __launch_bounds__(kThreads)                                  \
      layernorm_fwd_##SUFFIX(const LayerNormParams p) {                                   \
    forward<T>(p);                                                                        \
  }                                                                                       \
  extern "C" __global__ void __launch_bounds__(kThreads)                                  \
      layernorm_bwd_##SUFFIX(const LayerNormParams p) {                                   \
    backward<T>(p);                                                                       \
  }

LAYERNORM_ENTRY(f32, float)
LAYERNORM_ENTRY(bf16, __nv_bfloat16)
LAYERNORM_ENTRY(f16, __half)
