// Generation's few-row GEMM (kernels/decode_gemm.cu) in the CPU emulator, every entry point,
// against a double reference on fresh random inputs: y = act(x W^T + b) for rows 1..64 (each
// of the four mma-tile counts, rows inside and at the ends of a tile), K from 8 to 3072 (a
// multiple of 8, not always of 32: a chunk's tail lanes load zeros), N not a multiple of 32
// (a tile's tail columns), one K slice and several (the last slice of a tile adds them all),
// with and without the bias and the GELU.
//
// The launch is src/kernels/cuda/decode_gemm.rs's, mirrored below: Plan::new on a 132-SM and a
// 2-SM device, grid (tiles, splits) x 128 threads, the counters zeroed. Every output and
// partial starts as NaN, so an element nobody writes fails; x and W are followed by NaN, so a
// read past their ends fails too. Each case launches twice on the same counters: the last slice
// must leave them at zero for the next launch (a CUDA graph replays the same buffers).
//
// Bound: products of two 16-bit values are exact in f32, so the kernel's error is its f32
// accumulation (K terms in a fixed tree: chunks in a warp, warps, slices) plus the final
// rounding to T: |err| <= (K + 8) 2^-24 sum_k |x_k w_k| + the bias's and the GELU's f32
// rounding + half an ulp of T at the result; checked element by element. A lost or doubled
// chunk, slice or lane moves an element by a whole product, far beyond it.
//
// Usage: decode_gemm [seed]  (a random seed when none is given; it is printed either way).
#include "emu_check.h"

#include "decode_gemm.cu"

namespace {

using bf16 = __nv_bfloat16;
using f16 = __half;
using emu_check::value;

// Plan::new of decode_gemm.rs.
struct Plan {
  int tiles, splits, chunks, mt;
};
Plan plan(int m, int n, int k, int sms) {
  const int tiles = (n + 31) / 32;
  const int nchunks = std::max(1, (k + 31) / 32);
  const int want = (2 * sms + tiles - 1) / tiles;
  const int splits = std::clamp(want, 1, std::max(1, nchunks / 4));
  const int chunks = (nchunks + splits - 1) / splits;
  return {tiles, (nchunks + chunks - 1) / chunks, chunks, std::max(1, (m + 15) / 16)};
}

template <typename T> using Kernel = void (*)(const DecodeGemmParams);
template <typename T> Kernel<T> entry(int mt);
template <> Kernel<bf16> entry<bf16>(int mt) {
  const Kernel<bf16> k[] = {decode_gemm_bf16_m1, decode_gemm_bf16_m2, decode_gemm_bf16_m3,
                            decode_gemm_bf16_m4};
  return k[mt - 1];
}
template <> Kernel<f16> entry<f16>(int mt) {
  const Kernel<f16> k[] = {decode_gemm_f16_m1, decode_gemm_f16_m2, decode_gemm_f16_m3,
                           decode_gemm_f16_m4};
  return k[mt - 1];
}

double gelu_ref(double v) {
  return 0.5 * v * (1 + std::tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)));
}

template <typename T>
bool run_case(int m, int n, int k, int sms, bool bias, bool gelu, emu_check::Rng &rng) {
  const Plan pl = plan(m, n, k, sms);
  const T nan = emu_check::Dt<T>::from(NAN);
  std::vector<T> x = emu_check::normals<T>((size_t)m * k, rng);
  std::vector<T> w = emu_check::normals<T>((size_t)n * k, rng, 0.5);
  std::vector<T> b = emu_check::normals<T>(n, rng);
  x.resize(x.size() + 8, nan);
  w.resize(w.size() + 8, nan);
  // The reference and its bound, in double from the same 16-bit values.
  std::vector<double> want((size_t)m * n), bound((size_t)m * n);
  for (int r = 0; r < m; ++r)
    for (int j = 0; j < n; ++j) {
      double s = 0, mag = 0;
      for (int i = 0; i < k; ++i) {
        const double p = value(x[(size_t)r * k + i]) * value(w[(size_t)j * k + i]);
        s += p;
        mag += std::fabs(p);
      }
      double err = (k + 8) * 0x1p-24 * mag;
      if (bias) {
        s += value(b[j]);
        err += 0x1p-24 * (std::fabs(s) + std::fabs(value(b[j])));
      }
      if (gelu) {
        // The GELU's slope is at most ~1.13 in magnitude; its f32 evaluation (tanhf) a few ulps.
        err = 1.13 * err + 1e-6 * (1 + std::fabs(s));
        s = gelu_ref(s);
      }
      want[(size_t)r * n + j] = s;
      bound[(size_t)r * n + j] = err + emu_check::Dt<T>::u * std::fabs(s) + emu_check::Dt<T>::sub;
    }
  std::vector<T> y((size_t)m * n);
  std::vector<float> part((size_t)pl.splits * m * n);
  std::vector<unsigned int> count(pl.tiles, 0u);
  bool ok = true;
  char what[160];
  for (int launch = 0; launch < 2; ++launch) {
    std::fill(y.begin(), y.end(), nan);
    std::fill(part.begin(), part.end(), NAN);
    DecodeGemmParams p{};
    p.x = x.data();
    p.w = w.data();
    p.bias = bias ? b.data() : nullptr;
    p.y = y.data();
    p.part = pl.splits > 1 ? part.data() : nullptr;
    p.count = pl.splits > 1 ? count.data() : nullptr;
    p.m = m;
    p.n = n;
    p.k = k;
    p.splits = pl.splits;
    p.chunks = pl.chunks;
    p.gelu = gelu ? 1 : 0;
    emu::launch({(unsigned)pl.tiles, (unsigned)pl.splits, 1}, {128, 1, 1}, 0,
                [&] { entry<T>(pl.mt)(p); });
    std::snprintf(what, sizeof what, "%s m%d %dx%dx%d %d sms (%d slices of %d)%s%s #%d",
                  emu_check::Dt<T>::name, pl.mt, m, k, n, sms, pl.splits, pl.chunks,
                  bias ? " +b" : "", gelu ? " gelu" : "", launch);
    ok &= emu_check::within(what, y, want, bound);
    bool zeroed = true;
    for (unsigned c : count) zeroed &= c == 0;
    ok &= emu_check::check(std::string(what) + " counters zeroed", zeroed);
  }
  return ok;
}

}  // namespace

int main(int argc, char **argv) {
  emu_check::Rng rng(emu_check::seed(argc, argv));
  bool ok = true;
  struct Shape {
    int m, n, k;
  };
  // Rows at each tile count and its ends; GPT-2's decode shapes scaled down in N (the emulator
  // runs every thread); K one chunk, a tail, and long enough for eleven slices.
  const Shape shapes[] = {
      {1, 8, 8},     {16, 40, 64},   {17, 33, 200},  {31, 72, 768},  {33, 64, 3072},
      {48, 100, 96}, {49, 32, 1000}, {64, 96, 768},  {64, 45, 2056}, {5, 520, 256},
  };
  int i = 0;
  for (const Shape &s : shapes) {
    for (int sms : {132, 2}) {
      const bool bias = i % 2 == 0, gelu = i % 3 == 0;
      ++i;
      ok &= i % 2 ? run_case<bf16>(s.m, s.n, s.k, sms, bias, gelu, rng)
                  : run_case<f16>(s.m, s.n, s.k, sms, bias, gelu, rng);
    }
  }
  ok &= run_case<bf16>(64, 64, 3072, 132, true, true, rng);
  ok &= run_case<f16>(3, 24, 512, 132, false, false, rng);
  return emu_check::finish(ok);
}
