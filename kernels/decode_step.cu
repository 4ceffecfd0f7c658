// The decode step's own state, advanced on the device so that a CUDA graph of the step can be
// replayed unchanged (src/generate/static_step.rs): the KV cache length and the draw index
// live in a device array `step` ([2] i64: cache length L, draw index), not in host scalars
// that a capture would freeze.
//
// - kv_write_b<bytes>: new keys or values [rows, d] (rows = B * Hkv, one position each) into
//   position L of a cache [rows, cap, d]; nothing is written once L >= cap.
// - qkv_write_<dtype>: one position's stacked projections y [B, nq + 2 nkv] (q, then k,
//   then v; each [heads, d]) split in one pass: q into out [B, nq], k and v into position L
//   of their caches [B, nkv / d, cap, d] (nothing once L >= cap). With tables cos, sin
//   [B, d / 2] (the rows' positions), q and k are rotated on the way (rotary embeddings in the
//   Llama / GPT-NeoX layout, in f32 exactly as rope.cu computes them). With gains qnorm, knorm
//   [d], each q and k head is first RMS-normalised over its d values (Qwen3's q_norm and
//   k_norm; Gemma 3's, whose f32 weights w give the gains g = 1 + w in f32, with
//   norm_plus_one), as rmsnorm.cu computes it: r = 1 / sqrt(mean x^2 + eps), (x * r) * g,
//   rounded to T, the rotation then reading the rounded values as rope.cu reads the norm's output. Each
//   thread sums its own head's squares (d loads, from L1): this kernel is the step's fallback,
//   so it stays one thread per element. With q, k and v in one
//   GEMM this replaces two GEMM launches, two rotations and two KV writes per layer. Where
//   the decode attention takes the step, attn_decode_fresh (attention_decode.cu) does this
//   itself and attends in the same launch; this kernel is the step's fallback.
// - advance_step: the step's tail in one launch: ids = the sampled ids, every position
//   += 1, the cache length and the draw index += 1, and mask[r, L + 1] = 1 (nothing once
//   L + 1 >= cap), L read before it moves. On the CPU, src/kernels/decode_step.rs composes
//   the same from four ops (a copy, two increments and a mask write).
//
// Launch (src/kernels/cuda/decode_step.rs): one thread per element of `n`, 256 per block;
// advance_step in one block of 256, which loops over the rows (one block: every thread reads
// L before thread 0 advances it).

#include "common.cuh"

struct DecodeParams {
  void *dst;               // kv_write: cache [rows, cap, d]; advance_step: mask;
                           // qkv_write: the key cache
  const void *src;         // kv_write: [rows, d]; qkv_write: y [B, nq + 2 nkv];
                           // advance_step: the sampled ids [rows] u32
  const long long *step;   // [2]: cache length, draw index (read by kv_write and
                           // qkv_write; advanced in place by advance_step)
  long long n;             // elements: rows * d (kv_write), rows (advance_step),
                           // B * (nq + 2 nkv) (qkv_write)
  int cap;                 // positions the cache (and the mask's rows) hold
  int d;                   // kv_write, qkv_write: values per position of one head
  void *dst2;              // qkv_write: the value cache; advance_step: positions [rows] u32
  void *out;               // qkv_write: q [B, nq]; advance_step: the ids [rows] u32
  int nq;                  // qkv_write: query width (query heads * d)
  int nkv;                 // qkv_write: key (and value) width (kv heads * d)
  const void *cos;         // qkv_write: null (no rotation), or [B, d / 2] in y's dtype
  const void *sin;         // qkv_write: as cos
  const void *qnorm;       // qkv_write: null (no norm), or q's per-head RMSNorm gains [d] in
                           // y's dtype (f32 offsets from one with norm_plus_one)
  const void *knorm;       // qkv_write: as qnorm, for k (both or neither)
  float eps;               // qkv_write: the norm's epsilon
  int norm_plus_one;       // qkv_write: 1 where qnorm, knorm are Gemma's f32 offsets w, the
                           // gains 1 + w formed in f32
};
static_assert(sizeof(DecodeParams) == 104, "DecodeParams: keep in step with the Rust mirror");

namespace {

template <typename U> __device__ void kv_write(const DecodeParams &p) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long len = p.step[0];
  if (i >= p.n || len < 0 || len >= p.cap) return;
  const long long r = i / p.d, c = i % p.d;
  static_cast<U *>(p.dst)[(r * p.cap + len) * p.d + c] = static_cast<const U *>(p.src)[i];
}

template <typename T> __device__ void qkv_write(const DecodeParams &p) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.n) return;
  const long long width = p.nq + 2LL * p.nkv;
  const long long b = i / width, c = i % width;
  const T *y = static_cast<const T *>(p.src);
  T x = y[i];
  const void *gain = c < p.nq ? p.qnorm : p.knorm;
  // Gain e of the head: g[e] in T, or 1 + w[e] from Gemma's f32 offsets.
  auto gain_at = [&](int e) {
    return p.norm_plus_one ? 1.f + static_cast<const float *>(gain)[e]
                           : temper::to_f32(static_cast<const T *>(gain)[e]);
  };
  if (c < p.nq + p.nkv && (p.cos != nullptr || gain != nullptr)) {
    const int j = (int)(c % p.d);
    const T *head = y + (i - j);
    float r = 1.f;
    if (gain != nullptr) {
      float ss = 0.f;
      for (int e = 0; e < p.d; ++e) {
        const float v = temper::to_f32(head[e]);
        ss += v * v;
      }
      r = 1.f / sqrtf(ss / (float)p.d + p.eps);
    }
    // Element e of the head as the rotation reads it: normalised and rounded, or as stored.
    auto at = [&](int e) {
      const float v = temper::to_f32(head[e]);
      return gain ? temper::to_f32(temper::from_f32<T>((v * r) * gain_at(e))) : v;
    };
    if (p.cos == nullptr) {
      x = temper::from_f32<T>(at(j));
    } else {
      // Element j rotates with its partner in the other half of the head.
      const int half = p.d / 2, jj = j % half;
      const long long tab = b * half + jj;
      const float cs = temper::to_f32(static_cast<const T *>(p.cos)[tab]);
      const float sn = temper::to_f32(static_cast<const T *>(p.sin)[tab]);
      const float x1 = at(jj), x2 = at(jj + half);
      x = temper::from_f32<T>(j < half ? x1 * cs - x2 * sn : x2 * cs + x1 * sn);
    }
  }
  if (c < p.nq) {
    static_cast<T *>(p.out)[b * p.nq + c] = x;
    return;
  }
  const long long len = p.step[0];
  if (len < 0 || len >= p.cap) return;
  const bool value = c >= p.nq + p.nkv;
  const long long e = c - p.nq - (value ? p.nkv : 0);  // index within k (or v): head * d + j
  const long long heads = p.nkv / p.d, h = e / p.d, j = e % p.d;
  T *cache = static_cast<T *>(value ? p.dst2 : p.dst);
  cache[((b * heads + h) * p.cap + len) * p.d + j] = x;
}

}  // namespace

extern "C" __global__ void kv_write_b2(const DecodeParams p) {
  temper::pdl_enter();
  kv_write<unsigned short>(p);
}
extern "C" __global__ void kv_write_b4(const DecodeParams p) {
  temper::pdl_enter();
  kv_write<unsigned int>(p);
}

extern "C" __global__ void qkv_write_f32(const DecodeParams p) {
  temper::pdl_enter();
  qkv_write<float>(p);
}
extern "C" __global__ void qkv_write_bf16(const DecodeParams p) {
  temper::pdl_enter();
  qkv_write<__nv_bfloat16>(p);
}
extern "C" __global__ void qkv_write_f16(const DecodeParams p) {
  temper::pdl_enter();
  qkv_write<__half>(p);
}

extern "C" __global__ void advance_step(const DecodeParams p) {
  temper::pdl_enter();
  long long *step = const_cast<long long *>(p.step);
  const long long next = step[0] + 1;  // the position the next step writes
  __syncthreads();                     // every thread has read L before thread 0 moves it
  const unsigned *sampled = static_cast<const unsigned *>(p.src);
  unsigned *ids = static_cast<unsigned *>(p.out);
  unsigned *positions = static_cast<unsigned *>(p.dst2);
  float *mask = static_cast<float *>(p.dst);
  for (long long r = threadIdx.x; r < p.n; r += blockDim.x) {
    ids[r] = sampled[r];
    positions[r] += 1;
    if (next >= 0 && next < p.cap) mask[r * p.cap + next] = 1.f;
  }
  if (threadIdx.x == 0) {
    step[0] = next;
    step[1] += 1;
  }
}
