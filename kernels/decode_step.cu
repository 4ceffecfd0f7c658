// The decode step's own state, advanced on the device so that a CUDA graph of the step can be
// replayed unchanged (src/generate/static_step.rs): the KV cache length and the draw index
// live in a device array `step` ([2] i64: cache length L, draw index), not in host scalars
// that a capture would freeze.
//
// - kv_write_b<bytes>: new keys or values [rows, d] (rows = B * Hkv, one position each) into
//   position L of a cache [rows, cap, d]; nothing is written once L >= cap.
// - mark_key: key mask [rows, cap] f32: mask[r, L] = 1 (the position the next step writes).
// - increment_u32 / increment_i64: every element += 1 (the rows' positions; `step` itself).
//
// Launch (src/kernels/cuda/decode_step.rs): one thread per element of `n`, 256 per block.

struct DecodeParams {
  void *dst;               // kv_write: cache [rows, cap, d]; mark_key: mask; increment: values
  const void *src;         // kv_write: [rows, d]; unused otherwise
  const long long *step;   // [2]: cache length, draw index (kv_write, mark_key)
  long long n;             // elements: rows * d (kv_write), rows (mark_key), values (increment)
  int cap;                 // positions the cache (and the mask's rows) hold
  int d;                   // kv_write: values per position
};
static_assert(sizeof(DecodeParams) == 40, "DecodeParams: keep in step with the Rust mirror");

namespace {

template <typename U> __device__ void kv_write(const DecodeParams &p) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long len = p.step[0];
  if (i >= p.n || len < 0 || len >= p.cap) return;
  const long long r = i / p.d, c = i % p.d;
  static_cast<U *>(p.dst)[(r * p.cap + len) * p.d + c] = static_cast<const U *>(p.src)[i];
}

template <typename T> __device__ void increment(const DecodeParams &p) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < p.n) static_cast<T *>(p.dst)[i] += 1;
}

}  // namespace

extern "C" __global__ void kv_write_b2(const DecodeParams p) { kv_write<unsigned short>(p); }
extern "C" __global__ void kv_write_b4(const DecodeParams p) { kv_write<unsigned int>(p); }

extern "C" __global__ void mark_key(const DecodeParams p) {
  const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long len = p.step[0];
  if (r < p.n && len >= 0 && len < p.cap) static_cast<float *>(p.dst)[r * p.cap + len] = 1.f;
}

extern "C" __global__ void increment_u32(const DecodeParams p) { increment<unsigned int>(p); }
extern "C" __global__ void increment_i64(const DecodeParams p) { increment<long long>(p); }
