// A linear layer's bias, with the activation that follows it fused in (GPT-2's MLP:
// gelu(x W^T + b)), so the GEMM's output is read once forward and once backward:
//   forward:  out = act(y + b), a block per row at a time, threads across the columns (no
//             per-element index division);
//   backward: dL/dy = dy * act'(y + b), written back (nothing to write for the identity), and
//             the bias gradient as a column reduction: each block owns 256 columns of one group
//             of rows and sums them in row order into its own partial row (no atomics);
//   reduce:   one thread per column adds the groups' partials in group order. The bias
//             gradient is the same on every run.
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

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads) bias_db_reduce(const BiasParams p) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= p.cols) return;
  float db = 0.f;
  for (int g = 0; g < p.groups; ++g) db += p.partial[(size_t)g * p.cols + c];
  p.db[c] = db;
}

#define BIAS_ENTRY(SUFFIX, T)                                                                  \
  extern "C" __global__ void __launch_bounds__(kThreads) bias_fwd_##SUFFIX(const BiasParams p) { \
    forward<T>(p);                                                                             \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(kThreads) bias_bwd_##SUFFIX(const BiasParams p) { \
    backward<T>(p);                                                                            \
  }

BIAS_ENTRY(f32, float)
BIAS_ENTRY(bf16, __nv_bfloat16)
BIAS_ENTRY(f16, __half)
