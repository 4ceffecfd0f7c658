// The LoRA kernels (kernels/lora.cu) run in the CPU emulator (cuda_emu.h), every entry point of
// the file, against references written here, on fresh random inputs of awkward sizes:
// - lora_pack_<dtype> (bf16, f16, f32): the constant columns of u_ext and all of B_ext =
//   [B | bias | 0], with and without bias, padded ranks r8 from 8 to 72 (r = 1, 8, 16, 32, 33,
//   64, 65), N not a multiple of 8 (where lora_dy does not apply but the forward still packs),
//   and the grid-stride loop going round several times (the grid a 1- or 8-SM device gets);
// - lora_dy_<bf16|f16>_r<16|32|64> then lora_dy_reduce_<bf16|f16>: g = s dY B and dB = dY^T u_s
//   from one pass over dY, with M not a multiple of the 64-row tile (77, 300), N = 72, 200, 776,
//   ranks 1, 8, 16, 32, 33, 64 with and without bias (so r8 below, equal to and above the rp
//   lora_dy is instantiated for), and region plans of one tile per block (many blocks, as on an
//   H200) and of many tiles per block with ragged last regions (nbx, nby > 1, the plan of a
//   1- or 8-SM device), which runs the two-stage cp.async pipeline over several tiles;
// - lora_dy_reduce_f32, which the launcher never calls (the f32 backward goes to cuBLAS), on
//   synthetic partials whose columns >= r are NaN (the reduction must not read them).
// Launches are src/kernels/cuda/lora.rs's, mirrored below: the LoraParams fields it sets and
// no others, padded_rank, DyPlan::new (rp, mc, nc, nbx, nby; the 96 KiB shared-memory budget),
// the partials [nbx, M, rp] and [nby, N, rp], grid (nbx, nby) x 128 threads with
// smem_bytes() of dynamic shared memory, grid_stride(.., 256) for pack and reduce, and the
// rules for when lora_dy applies (bf16/f16, r <= 64, N % 8 == 0; the Auto path's byte test is
// printed, the kernel runs either way as under TEMPER_LORA_DY=fused). The cuBLAS products
// around the kernels are not emulated: u_ext[:, :r] = s x A^T is computed here in double and
// rounded to the storage dtype, as cuBLAS writes it, after lora_pack filled the rest.
// Every output and partial buffer starts as NaN, so an element nobody writes fails, and dY,
// u_ext and B_ext are followed by NaN, so a read past their end fails too.
//
// References and bounds. pack is a copy: compared bit for bit. g and dB are compared with a
// double reference computed from the same 16-bit inputs the kernel reads, relative to the
// largest |reference| (emu_check::close). Products of two bf16/f16 values are exact in f32, so
// the kernel's error is its f32 accumulation (at most n <= 776 terms: worst case n * 2^-24 *
// sum|terms|, which for these normal inputs is below 3e-4 of max |ref|, typically far less)
// plus the final rounding to the storage dtype (at most 2^-8 = 3.9e-3 of the element for bf16,
// 2^-11 = 4.9e-4 for f16). Bounds: 5e-3 (bf16), 1e-3 (f16); a lost or doubled 16 x 8 mma step,
// tile or region moves the result by roughly 1/sqrt(#steps) of max |ref|, several times more.
// The same error model is also checked element by element (`bounded`), so that a wrong value
// among the small elements, which the bound relative to max |ref| would hide, fails too.
// lora_dy_reduce is also checked bit for bit against the sum, in ascending region order, of
// the partials lora_dy wrote (the fixed order that makes the result deterministic), then
// scaled and rounded once, as the kernel promises.
//
// Usage: lora [seed]  (a random seed when none is given; it is printed either way).
#include "emu_check.h"

#include <optional>

namespace temper {
namespace lora {
// DY_SMEM_BYTES of lora.rs: no plan asks for more.
EMU_DYNAMIC_SHARED(smem_raw, 96 * 1024)
}  // namespace lora
}  // namespace temper

#include "lora.cu"

namespace {

using bf16 = __nv_bfloat16;
using f16 = __half;
using Kernel = void (*)(const LoraParams);
using emu_check::value;

// ---------------------------------------------------------------------------------------
// Dtypes and their entry points.
// ---------------------------------------------------------------------------------------
// Beyond emu_check's: the bound relative to max |ref| of g and dB, and what the elementwise
// bound allows for T's subnormals (`tiny`).
template <typename T> struct Dt;
template <> struct Dt<float> : emu_check::Dt<float> {
  static Kernel pack() { return lora_pack_f32; }
  static Kernel reduce() { return lora_dy_reduce_f32; }
};
template <> struct Dt<bf16> : emu_check::Dt<bf16> {
  static constexpr double tol = 5e-3;
  static constexpr double tiny = 0;
  static Kernel pack() { return lora_pack_bf16; }
  static Kernel reduce() { return lora_dy_reduce_bf16; }
  static Kernel dy(int rp) {
    return rp == 16 ? lora_dy_bf16_r16 : rp == 32 ? lora_dy_bf16_r32 : lora_dy_bf16_r64;
  }
};
template <> struct Dt<f16> : emu_check::Dt<f16> {
  static constexpr double tol = 1e-3;
  static constexpr double tiny = 0x1p-25;  // half the least subnormal
  static Kernel pack() { return lora_pack_f16; }
  static Kernel reduce() { return lora_dy_reduce_f16; }
  static Kernel dy(int rp) {
    return rp == 16 ? lora_dy_f16_r16 : rp == 32 ? lora_dy_f16_r32 : lora_dy_f16_r64;
  }
};

template <typename T> T nan_of() { return Dt<T>::from(NAN); }

// Elements of NaN after a [rows, cols] matrix that lora_dy reads: a whole tile of rows and a
// chunk more, so that a read past the end (a dropped row or column mask) puts a NaN into the
// products (NaN x 0 = NaN) instead of whatever the heap holds.
size_t guard(size_t cols) { return 64 * cols + 64; }

// ---------------------------------------------------------------------------------------
// The launcher (src/kernels/cuda/lora.rs, src/kernels/cuda/mod.rs), mirrored.
// ---------------------------------------------------------------------------------------
// padded_rank: r + has_bias rounded up to 8.
int padded_rank(int r, bool bias) { return (r + (bias ? 1 : 0) + 7) / 8 * 8; }

constexpr size_t kDySmemBytes = 96 * 1024;  // DY_SMEM_BYTES

struct DyPlan {
  size_t rp, mc, nc, nbx, nby;

  static size_t stage_bytes(size_t rp) { return 2 * (64 * 64 + 2 * 64 * (rp + 8)) * 2; }
  size_t smem_bytes() const { return stage_bytes(rp) + (mc + nc) * rp * 4; }
  size_t partial_bytes(size_t m, size_t n) const { return 2 * 4 * rp * (nbx * m + nby * n); }
  // The plan's fields of LoraParams.
  void set(LoraParams &p) const {
    p.rp = (int)rp;
    p.mc = (int)mc;
    p.nc = (int)nc;
    p.nbx = (int)nbx;
    p.nby = (int)nby;
  }

  // DyPlan::new, f64 arithmetic as in Rust.
  static std::optional<DyPlan> make(size_t m, size_t n, size_t r, size_t sms) {
    size_t rp = 0;
    for (size_t c : {16, 32, 64})
      if (r <= c) {
        rp = c;
        break;
      }
    if (rp == 0) return std::nullopt;
    const double p = (double)std::max<size_t>(2 * sms, 1);
    auto round64 = [](double v) {
      return std::max<size_t>((size_t)std::ceil(std::max(v, 1.0) / 64.0), 1) * 64;
    };
    const double nbx_f = std::max(std::sqrt(p * (double)n / (double)m), 1.0);
    size_t nc = round64((double)n / nbx_f);
    const size_t nbx = (n + nc - 1) / nc;
    const double nby_f = std::max(p / (double)nbx, 1.0);
    size_t mc = round64((double)m / nby_f);
    const size_t acc_budget = kDySmemBytes - stage_bytes(rp);
    while ((mc + nc) * rp * 4 > acc_budget && mc + nc > 128) {
      if (mc >= nc)
        mc = (mc / 2 + 63) / 64 * 64;
      else
        nc = (nc / 2 + 63) / 64 * 64;
    }
    return DyPlan{rp, mc, nc, (n + nc - 1) / nc, (m + mc - 1) / mc};
  }
};

// grid_stride(dev, n, 256).
void launch_grid_stride(size_t n, size_t sms, Kernel k, const LoraParams &p) {
  emu::launch({emu_check::grid_stride(n, sms), 1, 1}, {256, 1, 1}, 0, [&] { k(p); });
}

// lora_params: sizes of one call, every pointer null.
LoraParams lora_params(int m, int n, int r, int r8, double scale) {
  LoraParams p{};
  p.m = m;
  p.n = n;
  p.r = r;
  p.r8 = r8;
  p.scale = (float)scale;
  return p;
}

// Elementwise: |got - want| <= u (|want| + e) + e + 2^-22 |want| + tiny, where e = 2 (n + 64)
// 2^-24 sum|terms| bounds f32 accumulation of n products in any order (rounded or truncated,
// the extra 64 for the per-tile and per-region additions), u (|want| + e) the rounding to T,
// 2^-22 |want| the f32 scale (s rounded to f32, the product rounded) and tiny T's subnormals.
template <typename T>
bool bounded(const std::string &what, const std::vector<T> &got, const std::vector<double> &want,
             const std::vector<double> &abs_sum, int n) {
  std::vector<double> bound(want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    const double e = 2.0 * (n + 64) * 0x1p-24 * abs_sum[i];
    bound[i] = Dt<T>::u * (std::fabs(want[i]) + e) + e + 0x1p-22 * std::fabs(want[i]) +
               Dt<T>::tiny + 1e-300;
  }
  return emu_check::within(what + " elementwise", got, want, bound);
}

// ---------------------------------------------------------------------------------------
// One case: the forward's packing, then the backward's fused pass where it applies.
// ---------------------------------------------------------------------------------------
struct Case {
  int m, n, r;
  bool bias;
  size_t sms;  // the device's SM count (132: H200; fewer: a small GPU or MIG slice)
};

constexpr int kK = 24;         // in features of x and A (only u_ext's first r columns use them)
constexpr double kAlpha = 8;   // s = alpha / r

template <typename T> bool run_case(const Case &c, emu_check::Rng &rng) {
  const int M = c.m, N = c.n, r = c.r, r8 = padded_rank(r, c.bias);
  const double s = kAlpha / r;
  char buf[128];
  std::snprintf(buf, sizeof buf, "%s M%d N%d r%d%s", Dt<T>::name, M, N, r, c.bias ? " bias" : "");
  const std::string name = buf;

  const std::vector<T> x = emu_check::normals<T>((size_t)M * kK, rng);
  const std::vector<T> a = emu_check::normals<T>((size_t)r * kK, rng, 0.2);
  const std::vector<T> bm = emu_check::normals<T>((size_t)N * r, rng);
  const std::vector<T> bias = c.bias ? emu_check::normals<T>(N, rng) : std::vector<T>();

  // Forward: lora_pack, then (cuBLAS here) u_ext[:, :r] = s x A^T.
  std::vector<T> uext((size_t)M * r8 + guard(r8), nan_of<T>());
  std::vector<T> bext((size_t)N * r8 + guard(r8), nan_of<T>());
  LoraParams pp = lora_params(M, N, r, r8, s);
  pp.bm = bm.data();
  pp.bias = c.bias ? bias.data() : nullptr;
  pp.uext = uext.data();
  pp.bext = bext.data();
  launch_grid_stride((size_t)M * (r8 - r) + (size_t)N * r8, c.sms, Dt<T>::pack(), pp);
  std::vector<double> want_b((size_t)N * r8), want_ut((size_t)M * (r8 - r));
  std::vector<T> got_ut((size_t)M * (r8 - r));
  for (int n = 0; n < N; ++n)
    for (int j = 0; j < r8; ++j)
      want_b[(size_t)n * r8 + j] = j < r                 ? value(bm[(size_t)n * r + j])
                                   : (c.bias && j == r) ? value(bias[n])
                                                        : 0.0;
  for (int m = 0; m < M; ++m)
    for (int j = r; j < r8; ++j) {
      want_ut[(size_t)m * (r8 - r) + j - r] = c.bias && j == r ? 1.0 : 0.0;
      got_ut[(size_t)m * (r8 - r) + j - r] = uext[(size_t)m * r8 + j];
    }
  bool ok = emu_check::exact(name + " pack B_ext", bext, want_b);
  ok &= emu_check::exact(name + " pack u_ext[:, r..r8)", got_ut, want_ut);
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < r; ++j) {
      double acc = 0;
      for (int k = 0; k < kK; ++k)
        acc += value(x[(size_t)m * kK + k]) * value(a[(size_t)j * kK + k]);
      uext[(size_t)m * r8 + j] = Dt<T>::from(s * acc);
    }

  // Backward: does lora_dy apply (lora.rs backward)?
  const std::optional<DyPlan> plan =
      std::is_same<T, float>::value || N % 8 != 0 ? std::nullopt : DyPlan::make(M, N, r, c.sms);
  if (!plan) {
    std::printf("     %-*s lora_dy does not apply (cuBLAS path)\n", emu_check::kWhat,
                name.c_str());
    return ok;
  }
  if constexpr (!std::is_same<T, float>::value) {
    const DyPlan &pl = *plan;
    const size_t sz = sizeof(T);
    const bool auto_fused = (size_t)M * N * sz + pl.partial_bytes(M, N) < 2 * (size_t)M * N * sz;
    std::printf("     %-*s %zu SMs: rp %zu mc %zu nc %zu nbx %zu nby %zu smem %zu (auto: %s)\n",
                emu_check::kWhat, name.c_str(), c.sms, pl.rp, pl.mc, pl.nc, pl.nbx, pl.nby, pl.smem_bytes(),
                auto_fused ? "fused" : "cuBLAS");
    std::vector<T> dy = emu_check::normals<T>((size_t)M * N, rng);
    dy.resize(dy.size() + guard(N), nan_of<T>());
    std::vector<float> part_g(pl.nbx * M * pl.rp, NAN), part_b(pl.nby * N * pl.rp, NAN);
    std::vector<T> g((size_t)M * r, nan_of<T>()), db((size_t)N * r, nan_of<T>());
    LoraParams p = lora_params(M, N, r, r8, s);
    p.dy = dy.data();
    p.bext = bext.data();
    p.uext = uext.data();
    p.part_g = part_g.data();
    p.part_b = part_b.data();
    p.g = g.data();
    p.db = db.data();
    pl.set(p);
    const Kernel dyk = Dt<T>::dy((int)pl.rp);
    emu::launch({(unsigned)pl.nbx, (unsigned)pl.nby, 1}, {128, 1, 1}, pl.smem_bytes(),
                [&] { dyk(p); });
    launch_grid_stride((size_t)(M + N) * r, c.sms, Dt<T>::reduce(), p);

    // Double reference from the stored 16-bit inputs: B (= B_ext[:, :r]) and u_s.
    std::vector<double> want_g((size_t)M * r, 0.0), want_db((size_t)N * r, 0.0);
    std::vector<double> abs_g((size_t)M * r, 0.0), abs_db((size_t)N * r, 0.0);
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) {
        const double d = value(dy[(size_t)m * N + n]);
        for (int j = 0; j < r; ++j) {
          const double tg = s * d * value(bm[(size_t)n * r + j]);
          const double tb = d * value(uext[(size_t)m * r8 + j]);
          want_g[(size_t)m * r + j] += tg;
          abs_g[(size_t)m * r + j] += std::fabs(tg);
          want_db[(size_t)n * r + j] += tb;
          abs_db[(size_t)n * r + j] += std::fabs(tb);
        }
      }
    ok &= emu_check::close(name + " dy g", g, want_g, Dt<T>::tol);
    ok &= emu_check::close(name + " dy dB", db, want_db, Dt<T>::tol);
    ok &= bounded(name + " dy g", g, want_g, abs_g, N);
    ok &= bounded(name + " dy dB", db, want_db, abs_db, M);

    // The reduction of the partials lora_dy wrote, in the fixed ascending order.
    std::vector<double> sum_g((size_t)M * r), sum_b((size_t)N * r);
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < r; ++j) {
        float acc = 0.f;
        for (size_t bx = 0; bx < pl.nbx; ++bx) acc += part_g[(bx * M + m) * pl.rp + j];
        sum_g[(size_t)m * r + j] = value(Dt<T>::from(acc * (float)s));
      }
    for (int n = 0; n < N; ++n)
      for (int j = 0; j < r; ++j) {
        float acc = 0.f;
        for (size_t by = 0; by < pl.nby; ++by) acc += part_b[(by * N + n) * pl.rp + j];
        sum_b[(size_t)n * r + j] = value(Dt<T>::from(acc));
      }
    ok &= emu_check::exact(name + " dy_reduce g", g, sum_g);
    ok &= emu_check::exact(name + " dy_reduce dB", db, sum_b);
  }
  return ok;
}

// lora_dy_reduce_f32 (never launched by lora.rs) on random partials of a plan's shape, their
// columns >= r NaN.
bool reduce_f32(int M, int N, int r, size_t sms, emu_check::Rng &rng) {
  const DyPlan pl = *DyPlan::make(M, N, r, sms);
  const double s = kAlpha / r;
  std::vector<float> part_g(pl.nbx * M * pl.rp), part_b(pl.nby * N * pl.rp);
  for (size_t i = 0; i < part_g.size(); ++i) part_g[i] = (int)(i % pl.rp) < r ? rng.normal() : NAN;
  for (size_t i = 0; i < part_b.size(); ++i) part_b[i] = (int)(i % pl.rp) < r ? rng.normal() : NAN;
  std::vector<float> g((size_t)M * r, NAN), db((size_t)N * r, NAN);
  LoraParams p = lora_params(M, N, r, padded_rank(r, false), s);
  p.part_g = part_g.data();
  p.part_b = part_b.data();
  p.g = g.data();
  p.db = db.data();
  pl.set(p);
  launch_grid_stride((size_t)(M + N) * r, sms, lora_dy_reduce_f32, p);
  std::vector<double> want_g((size_t)M * r, 0.0), want_db((size_t)N * r, 0.0);
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < r; ++j) {
      for (size_t x = 0; x < pl.nbx; ++x)
        want_g[(size_t)m * r + j] += part_g[(x * M + m) * pl.rp + j];
      want_g[(size_t)m * r + j] *= s;
    }
  for (int n = 0; n < N; ++n)
    for (int j = 0; j < r; ++j)
      for (size_t y = 0; y < pl.nby; ++y)
        want_db[(size_t)n * r + j] += part_b[(y * N + n) * pl.rp + j];
  char buf[128];
  std::snprintf(buf, sizeof buf, "f32 M%d N%d r%d nbx %zu nby %zu", M, N, r, pl.nbx, pl.nby);
  // f32 sums of at most 13 terms of size ~1: error ~1e-6 of the largest.
  bool ok = emu_check::close(std::string(buf) + " dy_reduce g", g, want_g, 1e-5);
  ok &= emu_check::close(std::string(buf) + " dy_reduce dB", db, want_db, 1e-5);
  return ok;
}

}  // namespace

int main(int argc, char **argv) {
  emu_check::Rng rng(emu_check::seed(argc, argv));
  bool ok = true;
  // One 64 x 64 tile per block (H200: 132 SMs), small M and N.
  ok &= run_case<bf16>({77, 72, 1, true, 132}, rng);
  ok &= run_case<f16>({77, 200, 8, false, 132}, rng);
  ok &= run_case<bf16>({77, 200, 64, true, 132}, rng);   // r8 = 72 > rp = 64
  ok &= run_case<f16>({77, 776, 33, true, 132}, rng);    // rp 64, r8 = 40
  ok &= run_case<bf16>({300, 72, 64, false, 132}, rng);  // r8 = rp = 64
  // Several tiles per block, ragged last regions (the plans of smaller devices).
  ok &= run_case<bf16>({300, 200, 16, true, 1}, rng);    // r8 = 24 > rp = 16
  ok &= run_case<f16>({300, 776, 16, false, 1}, rng);
  ok &= run_case<bf16>({300, 776, 32, false, 8}, rng);   // rp 32
  ok &= run_case<f16>({300, 200, 32, true, 2}, rng);     // rp 32, r8 = 40
  // Pack only: f32 (the backward is cuBLAS), and r > 64 with N % 8 != 0.
  ok &= run_case<float>({77, 200, 8, true, 1}, rng);
  ok &= run_case<float>({300, 72, 33, false, 132}, rng);
  ok &= run_case<bf16>({77, 100, 65, true, 1}, rng);
  ok &= run_case<f16>({300, 20, 1, false, 132}, rng);
  ok &= reduce_f32(300, 776, 16, 132, rng);
  ok &= reduce_f32(77, 200, 5, 1, rng);
  return emu_check::finish(ok);
}
