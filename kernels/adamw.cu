// The optimizer step in three launches whatever the number of parameters, instead of a dozen
// elementwise launches and one single-block sum per parameter tensor:
//   adamw_sumsq_f32       one block per chunk: the chunk's sum of squared gradients
//   adamw_norm_finish_f32 one block: sqrt of the sum of the partials (in double) -> norm
//   adamw_step_f32        one block per chunk: clip by the norm on the device, update m, v, p,
//                         and write p's bf16 compute copy where it has one
// Clipping reads the norm on the device, so no launch waits for the host; the host reads the
// norm back once at the end of the step, for the log (the step's one synchronisation).
//
// The update repeats the reference's f32 operations in its order, each rounded on its own
// (__fmul_rn / __fadd_rn stop nvcc from fusing them into FMAs), so that it matches the CPU
// reference to the last bit given the same clip scale.
#include "adamw.cuh"

using temper::block_sum;

extern "C" __global__ void adamw_sumsq_f32(const AdamwParams p) {
  __shared__ float scratch[32];
  const AdamwChunk c = p.chunks[blockIdx.x];
  float acc = 0.f;
  for (unsigned int i = threadIdx.x; i < c.len; i += blockDim.x) {
    const float g = adamw_grad(c, c.start + i);
    acc = fmaf(g, g, acc);
  }
  const float total = block_sum(acc, scratch);
  if (threadIdx.x == 0) p.partials[blockIdx.x] = total;
}

extern "C" __global__ void adamw_norm_finish_f32(const AdamwParams p) {
  __shared__ double scratch[32];
  double acc = 0.0;
  for (int i = threadIdx.x; i < p.n_partials; i += blockDim.x) acc += (double)p.partials[i];
  const double total = block_sum(acc, scratch);
  if (threadIdx.x == 0) p.norm[0] = (float)sqrt(total);
}

extern "C" __global__ void adamw_step_f32(const AdamwParams p) {
  const AdamwChunk c = p.chunks[blockIdx.x];
  // The reference's clip: grads times max_norm / (norm + 1e-6), in f32, when over the limit.
  const float norm = p.norm[0];
  const bool clip = p.max_norm > 0.f && norm > p.max_norm;
  const float scale = clip ? (float)((double)p.max_norm / ((double)norm + 1e-6)) : 1.f;
  for (unsigned int i = threadIdx.x; i < c.len; i += blockDim.x) {
    const unsigned int k = c.start + i;
    float g = adamw_grad(c, k);
    if (clip) g = __fmul_rn(g, scale);
    const float m = __fadd_rn(__fmul_rn(c.m[k], p.beta1), __fmul_rn(g, p.one_minus_beta1));
    const float v =
        __fadd_rn(__fmul_rn(c.v[k], p.beta2), __fmul_rn(__fmul_rn(g, g), p.one_minus_beta2));
    const float mhat = __fmul_rn(m, p.inv_bc1);
    const float denom = __fadd_rn(sqrtf(__fmul_rn(v, p.inv_bc2)), p.eps);
    float upd = __fdiv_rn(mhat, denom);
    const float w = c.p[k];
    if (c.wd != 0.f) upd = __fadd_rn(upd, __fmul_rn(w, c.wd));
    const float w_new = __fsub_rn(w, __fmul_rn(upd, c.lr));
    c.p[k] = w_new;
    // Round to nearest even, as a cast of the master would.
    if (c.copy) c.copy[k] = __float2bfloat16_rn(w_new);
    c.m[k] = m;
    c.v[k] = v;
  }
}
