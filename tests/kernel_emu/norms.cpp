// The norm kernels (kernels/layernorm.cu and kernels/rmsnorm.cu, one translation unit: their
// names do not clash) run in the CPU emulator (cuda_emu.h), every entry point of both files,
// against double-precision references written here, on fresh random inputs:
// - layernorm_fwd_<dtype> and layernorm_bwd_<dtype> (one block per row, backward over
//   `groups` blocks), the warp-per-row layernorm_{fwd,bwd}_<dtype>_k{1..4} (K 16-byte chunks a
//   lane: f32 rows up to 512 wide, bf16 and f16 up to 1024, the widest the launcher sends there)
//   and layernorm_dwdb_reduce; rmsnorm_{fwd,bwd}_<dtype>_v<V>_k<K> for every V and K compiled
//   (V = 1 or 16 bytes' worth, K = 0 the generic loop of rows wider than 8192, K > 0 the row in
//   registers) and rmsnorm_dw_reduce_<dtype>; f32, bf16 and f16 each; and Gemma's gains (w_offset
//   1, the gain 1 + w formed in f32): under f32 by the f32 entry points, under bf16 and f16 by
//   rmsnorm_{fwd,bwd}_<dtype>_wf32_v<V>_k<K>, which read f32 offsets and reduce dw into f32;
// - widths 1, 72, 200, 320, 512, 768, 1000, 1024, 1500, 2050, 8192 and 8200, each launched as the
//   launcher launches it, on buffers at 16-byte aligned bases or with one buffer (x, the
//   residual, w, dy or ds) one element off, so that the launchers' alignment rules pick the
//   scalar variants: the case list below names the variant each (case, dtype) takes, and
//   `variants covered` at the end checks that together they take every entry point of both files;
// - rows 1, 33 and 130 (and 2 to 17 where a 256- or 512-thread block per row would cost too
//   much emulator time: ~20 ms a row), with the backward's SM count 132 (an H200: a block per
//   row or per four rows) or 1 (a few blocks, each going round its grid-stride loop over many
//   rows); and rows 0, where the forward and backward launch nothing and the reduce writes zeros;
// - with and without the residual add (r: the forward writes s = x + r rounded to the dtype
//   after the norm, in y's buffer, and normalises s; the backward then reads s there, as the
//   tape's add_fused does) and with and without ds (added to dx);
// - eps 1e-5, 1e-6 and 0.1, on rows that make it matter: a constant row (variance exactly 0,
//   rstd = 1/sqrt(eps)), a zero row, a row of scale 1e-3 (variance 1e-6, of eps's size), and
//   rows offset by +-4 (a mean well away from 0) among N(0, 1) rows.
// Launches are src/kernels/cuda/layernorm.rs's and src/kernels/cuda/rmsnorm.rs's (mirrored
// below with the helpers of src/kernels/cuda/mod.rs: aligned16, vec16_chunk, launch_1d): grid,
// block, no dynamic shared memory, the params fields each launcher sets and no others; outputs
// the launcher allocates with alloc_out start filled with 0xFF bytes (NaN, as with
// TEMPER_POISON_OUTPUTS), the layernorm block-per-row backward's partial rows with zeros
// (alloc_zeros), and every buffer has 0xFF guard bytes before and after it, which must be
// intact after the launches (a write out of bounds), and which read as NaN (a read out of bounds
// shows in the outputs). The backward reads the forward's own mean and rstd (f32), as the ops do.
//
// Semantics are the CPU implementations' (src/kernels/layernorm.rs cpu_forward / cpu_backward,
// src/kernels/cuda/rmsnorm.rs cpu_forward / cpu_backward): LayerNorm
//   y = (x - mean) rstd w + b, rstd = 1 / sqrt(var + eps), var = mean((x - mean)^2);
//   dx = rstd (dy w - mean(dy w) - xhat mean(dy w xhat)) + ds, xhat = (x - mean) rstd;
//   dw = sum_rows dy xhat, db = sum_rows dy (w, b, dw, db f32; mean, rstd the saved f32 ones);
// RMSNorm
//   y = (x r) g, r = 1 / sqrt(mean(x^2) + eps), g = w + w_offset rounded to f32;
//   dx = r dy g - r^3 / cols sum(dy g x) x + ds; dw = sum_rows dy (x r) (w and dw in the dtype,
//   or both f32 for the _wf32 entry points);
// the sum s = x + r is added in f32 and rounded once to the dtype (host::rounded_sum), and is
// compared bit for bit with a rounding written here.
//
// Tolerances, per element, from the f32 arithmetic of the kernels (u = 2^-24; uT the unit
// roundoff of the stored dtype, 2^-24, 2^-8, 2^-11; subT half its least subnormal). A sum of
// terms computed per thread (or lane) and then over a tree is within D u sum|terms| of the exact
// sum, D the longest chain of additions: per thread at most ceil(cols/32) + 8 terms here (a
// lane of a warp-per-row kernel holds K E <= cols/32 + E of them, a thread of a block fewer),
// then at most 10 tree levels; D = ceil(cols/32) + 24 bounds every variant. Column sums over
// rows: D_r = rows + 16 (a group's rows in order, then the groups and the block's warps). Each
// product, quotient and difference rounds once (u); rsqrtf and 1/sqrtf are allowed 4u (2 ulp).
// - LayerNorm forward: mean within e_m = D u sum|x|/n + u |mean|; the variance sum of the
//   (x - mean')^2, each within 3u, about the computed mean' = mean + d (which adds exactly d^2),
//   so var + eps within e_v = (D+5) u var + e_m^2 + u (var + eps) and rstd within
//   e_r = e_v / (2 (var + eps)) + 4u relatively; y within |x - mean| rstd |w| (e_r + 4u)
//   + e_m rstd |w| (1 + e_r + 4u) + u (|x - mean| rstd |w| + |b|), then the store's uT |y|.
// - LayerNorm backward: mean(dy w) within (D+1) u sum|dy w| / n + u |.|, mean(dy w xhat)
//   within (D+4) u sum|dy w xhat| / n + u |.| (xhat, dy w and their product round), the
//   bracket within 3u |dy w| + 2u |ma| + 4u |xhat mb| + e_ma + |xhat| e_mb, dx within rstd
//   times that + u |rstd bracket| + u (|rstd bracket| + |ds|), then uT; dw within
//   (D_r + 3) u sum_rows |dy xhat|, db within D_r u sum_rows |dy| (f32, no store rounding).
// - RMSNorm forward: q = mean(x^2) within (D+3) u q, so r within
//   ((D+3) u q + u (q + eps)) / (2 (q + eps)) + 4u relatively; y within |x r w| (e_r + 2u),
//   then uT.
// - RMSNorm backward: sum(dy w x) within (D+2) u sum|dy w x|, coef = r^3 dot / n within
//   r^3/n e_dot + 5u |coef|, dx within 2u |r dy w| + u |coef x| + |x| e_coef + u (|r dy w|
//   + |coef x|) + u (|r dy w - coef x| + |ds|), then uT; dw within (D_r + 2) u sum|dy x r|,
//   then uT.
// Every bound is multiplied by 1.5 (second-order terms) and has subT added. A column left out of
// a row's sums, a row out of dw, a chunk at the wrong column or a wrong rstd is far outside
// them in f32 (the bf16 and f16 bounds are dominated by the store's rounding).
//
// Usage: norms [seed]  (a random seed when none is given; it is printed either way).
#include "emu_check.h"

#include "layernorm.cu"
#include "rmsnorm.cu"

#include <set>
#include <type_traits>

namespace {

using bf16 = __nv_bfloat16;
using f16 = __half;
using LnKernel = void (*)(const LayerNormParams);
using RmsKernel = void (*)(const RmsNormParams);

constexpr double kU = 0x1p-24;

// ---------------------------------------------------------------------------------------
// Dtypes: emu_check's (the store's rounding u and sub among them), and the entry points.
// ---------------------------------------------------------------------------------------
template <typename T> struct Dt;
template <> struct Dt<float> : emu_check::Dt<float> {
  static constexpr LnKernel ln_fwd = layernorm_fwd_f32, ln_bwd = layernorm_bwd_f32;
  static constexpr LnKernel ln_fwd_k[4] = {layernorm_fwd_f32_k1, layernorm_fwd_f32_k2,
                                           layernorm_fwd_f32_k3, layernorm_fwd_f32_k4};
  static constexpr LnKernel ln_bwd_k[4] = {layernorm_bwd_f32_k1, layernorm_bwd_f32_k2,
                                           layernorm_bwd_f32_k3, layernorm_bwd_f32_k4};
  static constexpr RmsKernel rms_reduce = rmsnorm_dw_reduce_f32;
};
template <> struct Dt<bf16> : emu_check::Dt<bf16> {
  static constexpr LnKernel ln_fwd = layernorm_fwd_bf16, ln_bwd = layernorm_bwd_bf16;
  static constexpr LnKernel ln_fwd_k[4] = {layernorm_fwd_bf16_k1, layernorm_fwd_bf16_k2,
                                           layernorm_fwd_bf16_k3, layernorm_fwd_bf16_k4};
  static constexpr LnKernel ln_bwd_k[4] = {layernorm_bwd_bf16_k1, layernorm_bwd_bf16_k2,
                                           layernorm_bwd_bf16_k3, layernorm_bwd_bf16_k4};
  static constexpr RmsKernel rms_reduce = rmsnorm_dw_reduce_bf16;
};
template <> struct Dt<f16> : emu_check::Dt<f16> {
  static constexpr LnKernel ln_fwd = layernorm_fwd_f16, ln_bwd = layernorm_bwd_f16;
  static constexpr LnKernel ln_fwd_k[4] = {layernorm_fwd_f16_k1, layernorm_fwd_f16_k2,
                                           layernorm_fwd_f16_k3, layernorm_fwd_f16_k4};
  static constexpr LnKernel ln_bwd_k[4] = {layernorm_bwd_f16_k1, layernorm_bwd_f16_k2,
                                           layernorm_bwd_f16_k3, layernorm_bwd_f16_k4};
  static constexpr RmsKernel rms_reduce = rmsnorm_dw_reduce_f16;
};

// rmsnorm_{fwd,bwd}_<dtype>_v<V>_k<K>, the instantiation list at the bottom of rmsnorm.cu;
// null for a plan it does not compile (a launcher/kernel mismatch, reported as a failure).
#define RMS_ENTRY(NAME, V, K) \
  if (v == V && k == K)       \
    return bwd ? rmsnorm_bwd_##NAME##_v##V##_k##K : rmsnorm_fwd_##NAME##_v##V##_k##K;
#define RMS_SCALAR_ENTRIES(NAME)                                                            \
  RMS_ENTRY(NAME, 1, 0)                                                                     \
  RMS_ENTRY(NAME, 1, 1)                                                                     \
  RMS_ENTRY(NAME, 1, 2)                                                                     \
  RMS_ENTRY(NAME, 1, 4)                                                                     \
  RMS_ENTRY(NAME, 1, 8)                                                                     \
  RMS_ENTRY(NAME, 1, 16)
template <typename T> RmsKernel rms_entry(bool bwd, int v, int k);
template <> RmsKernel rms_entry<float>(bool bwd, int v, int k) {
  RMS_SCALAR_ENTRIES(f32)
  RMS_ENTRY(f32, 4, 0)
  RMS_ENTRY(f32, 4, 1)
  RMS_ENTRY(f32, 4, 2)
  RMS_ENTRY(f32, 4, 4)
  return nullptr;
}
// A 16-bit dtype's list: the scalar variants and V = 8 with K 0 to 2.
#define RMS_HALF_ENTRIES(NAME) \
  RMS_SCALAR_ENTRIES(NAME)     \
  RMS_ENTRY(NAME, 8, 0)        \
  RMS_ENTRY(NAME, 8, 1)        \
  RMS_ENTRY(NAME, 8, 2)        \
  return nullptr;
template <> RmsKernel rms_entry<bf16>(bool bwd, int v, int k) { RMS_HALF_ENTRIES(bf16) }
template <> RmsKernel rms_entry<f16>(bool bwd, int v, int k) { RMS_HALF_ENTRIES(f16) }
// The same with f32 gains: rmsnorm_{fwd,bwd}_<dtype>_wf32_v<V>_k<K> (bf16 and f16 only).
template <typename T> RmsKernel rms_entry_wf32(bool bwd, int v, int k);
template <> RmsKernel rms_entry_wf32<bf16>(bool bwd, int v, int k) {
  RMS_HALF_ENTRIES(bf16_wf32)
}
template <> RmsKernel rms_entry_wf32<f16>(bool bwd, int v, int k) {
  RMS_HALF_ENTRIES(f16_wf32)
}
// The entry point for x in T and w in G.
template <typename T, typename G> RmsKernel rms_kernel(bool bwd, int v, int k) {
  if constexpr (std::is_same_v<T, G>) return rms_entry<T>(bwd, v, k);
  else return rms_entry_wf32<T>(bwd, v, k);
}
#undef RMS_HALF_ENTRIES
#undef RMS_SCALAR_ENTRIES
#undef RMS_ENTRY

// Every entry point of both files, by name; the runs below add what they launch to `launched`.
std::set<std::string> launched;
std::set<std::string> all_entry_points() {
  std::set<std::string> all;
  for (const char *d : {"f32", "bf16", "f16"}) {
    const std::string s = d;
    all.insert("layernorm_fwd_" + s);
    all.insert("layernorm_bwd_" + s);
    for (int k = 1; k <= 4; ++k) {
      all.insert("layernorm_fwd_" + s + "_k" + std::to_string(k));
      all.insert("layernorm_bwd_" + s + "_k" + std::to_string(k));
    }
    all.insert("rmsnorm_dw_reduce_" + s);
    const int vec = s == "f32" ? 4 : 8;
    std::vector<std::pair<int, int>> vk = {{1, 0}, {1, 1}, {1, 2}, {1, 4}, {1, 8}, {1, 16},
                                           {vec, 0}, {vec, 1}, {vec, 2}};
    if (vec == 4) vk.push_back({4, 4});
    for (auto [v, k] : vk)
      for (const char *pass : {"fwd", "bwd"})
        for (const std::string &g : vec == 4 ? std::vector<std::string>{""}
                                              : std::vector<std::string>{"", "_wf32"})
          all.insert(std::string("rmsnorm_") + pass + "_" + s + g + "_v" + std::to_string(v) +
                     "_k" + std::to_string(k));
  }
  all.insert("layernorm_dwdb_reduce");
  return all;
}

using emu_check::convert;
using emu_check::round_as;

// ---------------------------------------------------------------------------------------
// Buffers: n values of T at a 64-byte aligned base plus `off` elements, with 0xFF guard bytes
// (NaN in every dtype) around them and 0xFF (or zero) contents until written.
// ---------------------------------------------------------------------------------------
constexpr size_t kGuard = 64;

template <typename T> struct Buf {
  std::vector<unsigned char> raw;
  T *p;
  size_t n;
  Buf(size_t n_, size_t off = 0, bool zero = false)
      : raw((n_ + off) * sizeof(T) + 3 * kGuard, 0xFF), n(n_) {
    const uintptr_t a = (reinterpret_cast<uintptr_t>(raw.data()) + kGuard + 63) & ~uintptr_t(63);
    p = reinterpret_cast<T *>(a) + off;
    if (zero) std::memset(static_cast<void *>(p), 0, n * sizeof(T));
  }
  Buf(const Buf &) = delete;
  Buf(Buf &&) = default;  // the vector's storage, and so p, moves with it
  // The bytes outside [p, p + n) still 0xFF.
  bool guards() const {
    const unsigned char *b = reinterpret_cast<const unsigned char *>(p);
    const unsigned char *e = reinterpret_cast<const unsigned char *>(p + n);
    for (const unsigned char *q = raw.data(); q < raw.data() + raw.size(); ++q)
      if ((q < b || q >= e) && *q != 0xFF) return false;
    return true;
  }
};

// ---------------------------------------------------------------------------------------
// The launchers' helpers and choices (src/kernels/cuda/mod.rs, layernorm.rs, rmsnorm.rs).
// ---------------------------------------------------------------------------------------
template <typename T> bool aligned16(std::initializer_list<size_t> offsets) {
  for (size_t o : offsets)
    if (o * sizeof(T) % 16 != 0) return false;
  return true;
}
// Values per 16-byte chunk where rows of n values at these element offsets can take 16-byte
// chunks, else 0 (None).
template <typename T> size_t vec16_chunk(size_t n, std::initializer_list<size_t> offsets) {
  const size_t chunk = 16 / sizeof(T);
  return n % chunk == 0 && aligned16<T>(offsets) ? chunk : 0;
}

// layernorm.rs: THREADS, WARPS, BWD_THREADS, MAX_K; warp_k.
constexpr unsigned kLnThreads = 256, kLnBwdThreads = 128;
constexpr size_t kLnWarps = kLnThreads / 32, kLnMaxK = 4;
static_assert(kThreads == (int)kLnThreads && kBwdThreads == (int)kLnBwdThreads &&
                  kMaxK == (int)kLnMaxK,
              "layernorm: the launcher's constants");
template <typename T> size_t ln_warp_k(size_t cols, std::initializer_list<size_t> offsets) {
  const size_t chunk = vec16_chunk<T>(cols, offsets);
  if (chunk == 0) return 0;
  const size_t k = (cols / chunk + 31) / 32;
  return k >= 1 && k <= kLnMaxK ? k : 0;
}

// rmsnorm.rs: Plan::new.
struct Plan {
  int v, k;
  unsigned threads;
};
Plan rms_plan(size_t cols, size_t vec_width, bool aligned) {
  const size_t v = aligned && vec_width > 1 && cols % vec_width == 0 ? vec_width : 1;
  const size_t chunks = std::max<size_t>((cols + v - 1) / v, 1);
  for (size_t limit : {256, 512})
    for (size_t k : {1, 2, 4, 8, 16})
      if (k * v <= 16 && chunks <= limit * k) {
        const size_t threads = ((chunks + k - 1) / k + 31) / 32 * 32;
        return {(int)v, (int)k, (unsigned)threads};
      }
  return {(int)v, 0, 512};
}

// Entry-point names, for the coverage check, and a plan for the report lines.
template <typename T> std::string ln_name(const char *pass, size_t k) {
  return std::string("layernorm_") + pass + "_" + Dt<T>::name + (k ? "_k" + std::to_string(k) : "");
}
template <typename T, typename G> std::string rms_name(const char *pass, const Plan &pl) {
  const std::string g = std::is_same_v<T, G> ? "" : "_wf32";
  return std::string("rmsnorm_") + pass + "_" + Dt<T>::name + g + "_v" + std::to_string(pl.v) +
         "_k" + std::to_string(pl.k);
}
std::string plan_name(const Plan &pl) {
  return "v" + std::to_string(pl.v) + " k" + std::to_string(pl.k) + " t" +
         std::to_string(pl.threads);
}

// ---------------------------------------------------------------------------------------
// Per-element comparison against a bound, one summary per (case, dtype, pass).
// ---------------------------------------------------------------------------------------
struct Report {
  bool ok = true;
  std::string line;
  void add(const std::string &what, bool good, const std::string &summary) {
    ok &= good;
    line += (line.empty() ? "" : ", ") + what + " " + summary;
  }
};

using emu_check::value;

// |got - want| <= bound elementwise; NaN fails. Summary: the largest err / bound.
template <typename V>
bool within(Report &rep, const std::string &what, const V *got, const std::vector<double> &want,
            const std::vector<double> &bound, const std::string &ctx) {
  const emu_check::Tally t = emu_check::tally_within(got, want, bound);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2g", t.worst);
  rep.add(what, t.ok(), buf + (t.nnan ? " (" + std::to_string(t.nnan) + " NaN)" : std::string()));
  if (!t.ok())
    std::printf("FAIL %s %s: %zu of %zu over, first at %zu: got %.9g, want %.9g, bound %.3g\n",
                ctx.c_str(), what.c_str(), t.nbad, t.n, t.first, value(got[t.first]),
                want[t.first], bound[t.first]);
  return t.ok();
}

// Bit for bit (the residual sum).
template <typename T>
void exact(Report &rep, const std::string &what, const T *got, const std::vector<double> &want,
           const std::string &ctx) {
  const emu_check::Tally t = emu_check::tally_exact(got, want);
  rep.add(what, t.ok(), "exact");
  if (!t.ok())
    std::printf("FAIL %s %s: %zu of %zu differ, first at %zu: %.9g vs %.9g\n", ctx.c_str(),
                what.c_str(), t.nbad, t.n, t.first, value(got[t.first]), want[t.first]);
}

template <typename T>
void guards(Report &rep, const std::string &what, const Buf<T> &b, const std::string &ctx) {
  if (!b.guards()) {
    rep.add(what, false, "written out of bounds");
    std::printf("FAIL %s %s: a write outside the buffer\n", ctx.c_str(), what.c_str());
  }
}

void print(const Report &rep, const std::string &ctx) {
  std::printf("%s %-*s %s\n", rep.ok ? "ok  " : "FAIL", emu_check::kWhat, ctx.c_str(),
              rep.line.c_str());
}

// ---------------------------------------------------------------------------------------
// Cases and inputs.
// ---------------------------------------------------------------------------------------
enum : unsigned { kF32 = 1, kBF16 = 2, kF16 = 4, kAll = 7 };
enum : unsigned { kMisX = 1, kMisR = 2, kMisW = 4, kMisDy = 8, kMisDs = 16 };

struct Case {
  int rows, cols;
  float eps;
  bool resid, ds;
  unsigned mis;    // buffers one element off their 16-byte aligned base
  unsigned sms;    // sm_count for the backward's grid
  unsigned dtypes;
};

struct Inputs {
  Case c;
  std::vector<float> x, r, dy, ds;  // [rows, cols], drawn in f32, rounded to each dtype
  std::vector<float> w, b;          // [cols] LayerNorm's f32 w, b; RMSNorm's w (rounded)
  std::vector<float> off;           // [cols] Gemma's f32 offsets from one
};

Inputs make_inputs(const Case &c, emu_check::Rng &rng) {
  Inputs in{c, {}, {}, {}, {}, {}, {}, {}};
  const size_t n = (size_t)c.rows * c.cols;
  in.x.resize(n);
  in.r.resize(n);
  in.dy.resize(n);
  in.ds.resize(n);
  for (int i = 0; i < c.rows; ++i) {
    float *x = &in.x[(size_t)i * c.cols], *r = &in.r[(size_t)i * c.cols];
    // Row 1 constant (x + r = 1 exactly), row 2 zeros, row 3 of scale 1e-3 (variance of eps's
    // size), rows 0 mod 4 offset by +4 and 2 mod 4 by -4, the rest N(0, 1).
    const int kind = c.rows > 1 && i >= 1 && i <= 3 ? i : 0;
    const float off = i % 4 == 0 ? 4.f : i % 4 == 2 ? -4.f : 0.f;
    for (int j = 0; j < c.cols; ++j) {
      switch (kind) {
        case 1: x[j] = 0.75f, r[j] = 0.25f; break;
        case 2: x[j] = 0.f, r[j] = 0.f; break;
        case 3: x[j] = 1e-3f * rng.normal(), r[j] = 1e-3f * rng.normal(); break;
        default: x[j] = off + rng.normal(), r[j] = rng.normal(); break;
      }
    }
  }
  for (auto &v : in.dy) v = rng.normal();
  for (auto &v : in.ds) v = rng.normal();
  in.w.resize(c.cols);
  in.b.resize(c.cols);
  for (auto &v : in.w) v = 1.f + 0.5f * rng.normal();
  for (auto &v : in.b) v = 0.5f * rng.normal();
  in.off.resize(c.cols);
  for (auto &v : in.off) v = 0.5f * rng.normal();
  return in;
}

template <typename T> Buf<T> fill(const std::vector<T> &v, size_t off) {
  Buf<T> b(v.size(), off);
  std::copy(v.begin(), v.end(), b.p);
  return b;
}

std::string ctx_name(const char *norm, const Case &c, const char *dtype, const std::string &variant,
                     const char *pass) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "%s r%d c%d %s%s%s%s eps %g %s %s", norm, c.rows, c.cols, dtype,
                c.resid ? " +r" : "", c.ds ? " +ds" : "", c.mis ? " mis" : "", c.eps,
                variant.c_str(), pass);
  return buf;
}

double depth(int cols) { return std::ceil(cols / 32.0) + 24; }

// ---------------------------------------------------------------------------------------
// LayerNorm: forward, backward and reduce, as src/kernels/cuda/layernorm.rs launches them.
// ---------------------------------------------------------------------------------------
template <typename T> bool run_layernorm(const Inputs &in) {
  const Case &c = in.c;
  const size_t rows = c.rows, cols = c.cols, n = rows * cols;
  const size_t xo = c.mis & kMisX ? 1 : 0, ro = c.mis & kMisR ? 1 : 0;
  const size_t dyo = c.mis & kMisDy ? 1 : 0, dso = c.mis & kMisDs ? 1 : 0;
  const std::vector<T> xt = convert<T>(in.x), rt = convert<T>(in.r);
  const std::vector<T> dyt = convert<T>(in.dy), dst = convert<T>(in.ds);
  Buf<T> x = fill(xt, xo), r = fill(rt, ro), dy = fill(dyt, dyo), ds = fill(dst, dso);
  Buf<float> w = fill(in.w, 0), b = fill(in.b, 0);

  // The normalised input: x, or s = x + r added in f32 and rounded once.
  std::vector<double> s(n);
  for (size_t i = 0; i < n; ++i)
    s[i] = c.resid ? round_as<T>((double)((float)value(xt[i]) + (float)value(rt[i])))
                   : value(xt[i]);

  // Forward: y (and s after it) rows * cols each, mean and rstd rows; alloc_out, poisoned.
  const size_t outputs = c.resid ? 2 : 1;
  Buf<T> y(outputs * n);
  Buf<float> mean(rows), rstd(rows);
  const size_t k_fwd = ln_warp_k<T>(cols, {xo, c.resid ? ro : 0, n});
  const std::string vf = k_fwd ? "warp k" + std::to_string(k_fwd) : "block";
  if (rows > 0 && cols > 0) {
    LayerNormParams p{};
    p.x = x.p;
    p.w = w.p;
    p.b = b.p;
    p.y = y.p;
    p.mean = mean.p;
    p.rstd = rstd.p;
    p.r = c.resid ? r.p : nullptr;
    p.s = c.resid ? y.p + n : nullptr;
    p.rows = (int)rows;
    p.cols = (int)cols;
    p.eps = c.eps;
    const unsigned grid = (unsigned)(k_fwd ? (rows + kLnWarps - 1) / kLnWarps : rows);
    const LnKernel k = k_fwd ? Dt<T>::ln_fwd_k[k_fwd - 1] : Dt<T>::ln_fwd;
    launched.insert(ln_name<T>("fwd", k_fwd));
    emu::launch({grid, 1, 1}, {kLnThreads, 1, 1}, 0, [&] { k(p); });
  }

  const double eps = c.eps, uT = Dt<T>::u, subT = Dt<T>::sub, D = depth(c.cols);
  bool ok = true;
  if (rows > 0) {
    const std::string ctx = ctx_name("ln", c, Dt<T>::name, vf, "fwd");
    Report rep;
    std::vector<double> wy(n), by(n), wm(rows), bm(rows), wr(rows), br(rows);
    for (size_t i = 0; i < rows; ++i) {
      const double *xs = &s[i * cols];
      double sum = 0, s1 = 0;
      for (size_t j = 0; j < cols; ++j) sum += xs[j], s1 += std::fabs(xs[j]);
      const double m = sum / cols;
      double var = 0;
      for (size_t j = 0; j < cols; ++j) var += (xs[j] - m) * (xs[j] - m);
      var /= cols;
      const double rs = 1 / std::sqrt(var + eps);
      const double em = 1.01 * (D * kU * s1 / cols + kU * std::fabs(m));
      const double ev = (D + 5) * kU * var + em * em + kU * (var + eps);
      const double er = 1.01 * ev / (2 * (var + eps)) + 4 * kU;
      wm[i] = m, bm[i] = 1.5 * em + 1e-300;
      wr[i] = rs, br[i] = 1.5 * er * rs;
      for (size_t j = 0; j < cols; ++j) {
        const double a = std::fabs(xs[j] - m) * rs * std::fabs(in.w[j]);
        const double e = a * (er + 4 * kU) + em * rs * std::fabs(in.w[j]) * (1 + er + 4 * kU) +
                         kU * (a + std::fabs(in.b[j]));
        const double yv = (xs[j] - m) * rs * in.w[j] + in.b[j];
        wy[i * cols + j] = yv;
        by[i * cols + j] = 1.5 * (e + uT * (std::fabs(yv) + e)) + subT;
      }
    }
    if (c.resid) exact(rep, "s", y.p + n, s, ctx);
    within(rep, "y", y.p, wy, by, ctx);
    within(rep, "mean", mean.p, wm, bm, ctx);
    within(rep, "rstd", rstd.p, wr, br, ctx);
    guards(rep, "y", y, ctx);
    guards(rep, "mean", mean, ctx);
    guards(rep, "rstd", rstd, ctx);
    print(rep, ctx);
    ok &= rep.ok;
  }

  // Backward: x is s where there is a residual (read in y's buffer, n elements in, as the
  // tape's add_fused passes the sum), dy, ds, the forward's mean and rstd.
  const T *xb = c.resid ? y.p + n : x.p;
  const size_t xbo = c.resid ? n : xo;
  const size_t k_bwd = ln_warp_k<T>(cols, {xbo, dyo, c.ds ? dso : 0});
  const std::string vb = k_bwd ? "warp k" + std::to_string(k_bwd) : "block";
  const size_t groups = k_bwd ? std::clamp<size_t>((rows + 3) / 4, 1, (size_t)c.sms * 3)
                              : std::clamp<size_t>(rows, 1, (size_t)c.sms * 4);
  Buf<T> dx(n);
  Buf<float> dw(cols), db(cols);
  const size_t len = std::max<size_t>(groups * 2 * cols, 1);
  Buf<float> partial(len, 0, !(k_bwd && rows >= 1));  // alloc_zeros unless the warp variant runs
  if (cols > 0) {
    LayerNormParams p{};
    p.x = xb;
    p.w = w.p;
    p.dy = dy.p;
    p.ds = c.ds ? ds.p : nullptr;
    p.mean = mean.p;
    p.rstd = rstd.p;
    p.dx = dx.p;
    p.partial = partial.p;
    p.dw = dw.p;
    p.db = db.p;
    p.rows = (int)rows;
    p.cols = (int)cols;
    p.groups = (int)groups;
    if (rows > 0) {
      const LnKernel k = k_bwd ? Dt<T>::ln_bwd_k[k_bwd - 1] : Dt<T>::ln_bwd;
      launched.insert(ln_name<T>("bwd", k_bwd));
      const unsigned threads = k_bwd ? kLnBwdThreads : kLnThreads;
      emu::launch({(unsigned)groups, 1, 1}, {threads, 1, 1}, 0, [&] { k(p); });
    }
    launched.insert("layernorm_dwdb_reduce");
    emu::launch({(unsigned)((cols + 31) / 32), 1, 1}, {kLnThreads, 1, 1}, 0,
                [&] { layernorm_dwdb_reduce(p); });
  }
  {
    const std::string ctx =
        ctx_name("ln", c, Dt<T>::name, vb + " g" + std::to_string(groups), "bwd");
    Report rep;
    std::vector<double> wdx(n), bdx(n), wdw(cols, 0.0), bdw(cols, 0.0);
    std::vector<double> wdb(cols, 0.0), bdb(cols, 0.0);
    const double Dr = (double)rows + 16;
    for (size_t i = 0; i < rows; ++i) {
      const double *xs = &s[i * cols];
      const double m = mean.p[i], rs = rstd.p[i];  // the forward's, as given
      std::vector<double> xh(cols), g(cols), gw(cols);
      double sa = 0, sb = 0, ma = 0, mb = 0;
      for (size_t j = 0; j < cols; ++j) {
        xh[j] = (xs[j] - m) * rs;
        g[j] = value(dyt[i * cols + j]);
        gw[j] = g[j] * in.w[j];
        ma += gw[j], mb += gw[j] * xh[j];
        sa += std::fabs(gw[j]), sb += std::fabs(gw[j] * xh[j]);
      }
      ma /= cols, mb /= cols;
      const double ema = 1.01 * ((D + 1) * kU * sa / cols + kU * std::fabs(ma));
      const double emb = 1.01 * ((D + 4) * kU * sb / cols + kU * std::fabs(mb));
      for (size_t j = 0; j < cols; ++j) {
        const double inner = gw[j] - ma - xh[j] * mb;
        const double dsv = c.ds ? value(dst[i * cols + j]) : 0.0;
        const double d = rs * inner + dsv;
        const double ein = 3 * kU * std::fabs(gw[j]) + 2 * kU * std::fabs(ma) +
                           4 * kU * std::fabs(xh[j] * mb) + ema + std::fabs(xh[j]) * emb;
        const double e =
            rs * ein + kU * std::fabs(rs * inner) + kU * (std::fabs(rs * inner) + std::fabs(dsv));
        wdx[i * cols + j] = d;
        bdx[i * cols + j] = 1.5 * (e + uT * (std::fabs(d) + e)) + subT;
        wdw[j] += g[j] * xh[j];
        bdw[j] += std::fabs(g[j] * xh[j]);
        wdb[j] += g[j];
        bdb[j] += std::fabs(g[j]);
      }
    }
    for (size_t j = 0; j < cols; ++j) {
      bdw[j] = 1.5 * 1.01 * (Dr + 3) * kU * bdw[j] + 1e-300;
      bdb[j] = 1.5 * 1.01 * Dr * kU * bdb[j] + 1e-300;
    }
    if (rows > 0) within(rep, "dx", dx.p, wdx, bdx, ctx);
    within(rep, "dw", dw.p, wdw, bdw, ctx);
    within(rep, "db", db.p, wdb, bdb, ctx);
    guards(rep, "dx", dx, ctx);
    guards(rep, "partial", partial, ctx);
    guards(rep, "dw", dw, ctx);
    guards(rep, "db", db, ctx);
    print(rep, ctx);
    ok &= rep.ok;
  }
  return ok;
}

// ---------------------------------------------------------------------------------------
// RMSNorm: forward, backward and dw reduce, as src/kernels/cuda/rmsnorm.rs launches them.
// ---------------------------------------------------------------------------------------
// w in G, the gain w + w_offset (`plus_one`: Gemma's offsets, w_offset 1, G f32).
template <typename T, typename G> bool run_rmsnorm(const Inputs &in, bool plus_one) {
  const Case &c = in.c;
  const size_t rows = c.rows, cols = c.cols, n = rows * cols;
  const size_t xo = c.mis & kMisX ? 1 : 0, ro = c.mis & kMisR ? 1 : 0, wo = c.mis & kMisW ? 1 : 0;
  const size_t dyo = c.mis & kMisDy ? 1 : 0, dso = c.mis & kMisDs ? 1 : 0;
  const std::vector<T> xt = convert<T>(in.x), rt = convert<T>(in.r);
  const std::vector<T> dyt = convert<T>(in.dy), dst = convert<T>(in.ds);
  const std::vector<G> wt = convert<G>(plus_one ? in.off : in.w);
  Buf<T> x = fill(xt, xo), r = fill(rt, ro), dy = fill(dyt, dyo), ds = fill(dst, dso);
  Buf<G> w = fill(wt, wo);
  const float w_offset = plus_one ? 1.f : 0.f;
  // The gains as the kernels form them: w + w_offset, rounded once to f32.
  std::vector<double> wv(cols);
  for (size_t j = 0; j < cols; ++j) wv[j] = (double)((float)value(wt[j]) + w_offset);
  const std::string gname = plus_one ? std::string(" 1+w ") + Dt<G>::name + " " : " ";

  std::vector<double> s(n);
  for (size_t i = 0; i < n; ++i)
    s[i] = c.resid ? round_as<T>((double)((float)value(xt[i]) + (float)value(rt[i])))
                   : value(xt[i]);

  // Forward: y (then s) rows * cols each, rstd rows; alloc_out, poisoned.
  const size_t outputs = c.resid ? 2 : 1;
  Buf<T> y(outputs * n);
  Buf<float> rstd(rows);
  const Plan pf = rms_plan(cols, 16 / sizeof(T),
                           aligned16<T>({xo, c.resid ? ro : 0, (outputs - 1) * n}) &&
                               aligned16<G>({wo}));
  const std::string vf = plan_name(pf);
  bool ok = true;
  if (n > 0) {
    const RmsKernel k = rms_kernel<T, G>(false, pf.v, pf.k);
    if (!k) {
      std::printf("FAIL rmsnorm: no forward entry point for plan %s\n", vf.c_str());
      return false;
    }
    launched.insert(rms_name<T, G>("fwd", pf));
    RmsNormParams p{};
    p.x = x.p;
    p.w = w.p;
    p.y = y.p;
    p.rstd = rstd.p;
    p.r = c.resid ? r.p : nullptr;
    p.s = c.resid ? y.p + n : nullptr;
    p.rows = (int)rows;
    p.cols = (int)cols;
    p.eps = c.eps;
    p.w_offset = w_offset;
    emu::launch({(unsigned)rows, 1, 1}, {pf.threads, 1, 1}, 0, [&] { k(p); });
  }
  const double eps = c.eps, uT = Dt<T>::u, subT = Dt<T>::sub, D = depth(c.cols);
  if (n > 0) {
    const std::string ctx = ctx_name("rms", c, Dt<T>::name, gname + vf, "fwd");
    Report rep;
    std::vector<double> wy(n), by(n), wr(rows), br(rows);
    for (size_t i = 0; i < rows; ++i) {
      const double *xs = &s[i * cols];
      double q = 0;
      for (size_t j = 0; j < cols; ++j) q += xs[j] * xs[j];
      q /= cols;
      const double rs = 1 / std::sqrt(q + eps);
      const double er = 1.01 * ((D + 3) * kU * q + kU * (q + eps)) / (2 * (q + eps)) + 4 * kU;
      wr[i] = rs, br[i] = 1.5 * er * rs;
      for (size_t j = 0; j < cols; ++j) {
        const double yv = xs[j] * rs * wv[j];
        const double e = std::fabs(yv) * (er + 2 * kU);
        wy[i * cols + j] = yv;
        by[i * cols + j] = 1.5 * (e + uT * (std::fabs(yv) + e)) + subT;
      }
    }
    if (c.resid) exact(rep, "s", y.p + n, s, ctx);
    within(rep, "y", y.p, wy, by, ctx);
    within(rep, "rstd", rstd.p, wr, br, ctx);
    guards(rep, "y", y, ctx);
    guards(rep, "rstd", rstd, ctx);
    print(rep, ctx);
    ok &= rep.ok;
  }

  // Backward: x is s where there is a residual (in y's buffer, n elements in); dx (in T) and dw
  // (in G) each in an alloc_out buffer, the partial rows in another.
  const T *xb = c.resid ? y.p + n : x.p;
  const size_t xbo = c.resid ? n : xo;
  const Plan pb = rms_plan(cols, 16 / sizeof(T),
                           aligned16<T>({xbo, dyo, c.ds ? dso : 0}) && aligned16<G>({wo}));
  const std::string vb = plan_name(pb);
  const size_t per_sm = std::max<size_t>(2048 / pb.threads, 1);
  const size_t groups = std::min<size_t>(rows, (size_t)c.sms * per_sm);
  Buf<T> dxb(n);
  Buf<G> dwb(cols);
  Buf<float> partial(groups * cols);
  RmsNormParams p{};
  p.x = xb;
  p.w = w.p;
  p.dy = dy.p;
  p.ds = c.ds ? ds.p : nullptr;
  p.rstd = rstd.p;
  p.dw_partial = partial.p;
  p.rows = (int)rows;
  p.cols = (int)cols;
  p.groups = (int)groups;
  p.w_offset = w_offset;
  p.dx = dxb.p;
  if (n > 0) {
    const RmsKernel k = rms_kernel<T, G>(true, pb.v, pb.k);
    if (!k) {
      std::printf("FAIL rmsnorm: no backward entry point for plan %s\n", vb.c_str());
      return false;
    }
    launched.insert(rms_name<T, G>("bwd", pb));
    emu::launch({(unsigned)groups, 1, 1}, {pb.threads, 1, 1}, 0, [&] { k(p); });
  }
  if (cols > 0) {
    // The reduce of w's dtype, into its own buffer (reduce_dw).
    p.dw = dwb.p;
    launched.insert(std::string("rmsnorm_dw_reduce_") + Dt<G>::name);
    // launch_1d(cols, 256)
    emu::launch({(unsigned)std::max<size_t>((cols + 255) / 256, 1), 1, 1}, {256, 1, 1}, 0,
                [&] { Dt<G>::rms_reduce(p); });
  }
  {
    const std::string ctx =
        ctx_name("rms", c, Dt<T>::name, gname + vb + " g" + std::to_string(groups), "bwd");
    Report rep;
    std::vector<double> wdx(n), bdx(n), wdw(cols, 0.0), mdw(cols, 0.0), bdw(cols);
    const double Dr = (double)rows + 16;
    for (size_t i = 0; i < rows; ++i) {
      const double *xs = &s[i * cols];
      const double rs = rstd.p[i];  // the forward's, as given
      double dot = 0, sdot = 0;
      for (size_t j = 0; j < cols; ++j) {
        const double t = value(dyt[i * cols + j]) * wv[j] * xs[j];
        dot += t, sdot += std::fabs(t);
      }
      const double coef = rs * rs * rs * dot / cols;
      const double ecoef =
          rs * rs * rs / cols * 1.01 * (D + 2) * kU * sdot + 5 * kU * std::fabs(coef);
      for (size_t j = 0; j < cols; ++j) {
        const double g = value(dyt[i * cols + j]);
        const double dsv = c.ds ? value(dst[i * cols + j]) : 0.0;
        const double a = rs * g * wv[j], bx = coef * xs[j];
        const double d = a - bx + dsv;
        const double e = 2 * kU * std::fabs(a) + kU * std::fabs(bx) + std::fabs(xs[j]) * ecoef +
                         kU * (std::fabs(a) + std::fabs(bx)) +
                         kU * (std::fabs(a - bx) + std::fabs(dsv));
        wdx[i * cols + j] = d;
        bdx[i * cols + j] = 1.5 * (e + uT * (std::fabs(d) + e)) + subT;
        wdw[j] += g * xs[j] * rs;
        mdw[j] += std::fabs(g * xs[j] * rs);
      }
    }
    const double uG = Dt<G>::u, subG = Dt<G>::sub;
    for (size_t j = 0; j < cols; ++j) {
      const double e = 1.01 * (Dr + 2) * kU * mdw[j];
      bdw[j] = 1.5 * (e + uG * (std::fabs(wdw[j]) + e)) + subG;
    }
    if (n > 0) within(rep, "dx", dxb.p, wdx, bdx, ctx);
    within(rep, "dw", dwb.p, wdw, bdw, ctx);
    guards(rep, "dx", dxb, ctx);
    guards(rep, "dw", dwb, ctx);
    guards(rep, "partial", partial, ctx);
    print(rep, ctx);
    ok &= rep.ok;
  }
  return ok;
}

}  // namespace

int main(int argc, char **argv) {
  emu_check::Rng rng(emu_check::seed(argc, argv));
  bool ok = true;

  // LayerNorm. The variant each dtype takes is in the comment (f32 / bf16 and f16): warp-per-row
  // kN for rows of 16-byte chunks, at most 4 a lane (f32 cols <= 512, bf16/f16 <= 1024), with
  // aligned bases; the block per row otherwise. A block-per-row row costs the emulator ~20 ms
  // (256 fibers, two block sums each way), so those cases have few rows but one of 33.
  const Case ln_cases[] = {
      // rows, cols, eps, resid, ds, misaligned, sms, dtypes
      {1, 1, 1e-5f, true, true, 0, 132, kAll},            // block / block
      {33, 2050, 1e-5f, true, true, 0, 1, kF32},          // block, 4 groups of 8-9 rows
      {5, 2050, 1e-6f, false, false, 0, 132, kBF16},      // block
      {9, 1000, 0.1f, false, true, kMisX, 1, kF16},       // block (k4 when aligned), 4 groups
      {5, 768, 1e-5f, false, false, 0, 132, kF32},        // block (f32 768 > 512)
      {5, 1024, 1e-5f, true, false, kMisR, 132, kBF16},   // fwd block (r one off), bwd k4
      {130, 72, 1e-5f, true, true, 0, 1, kAll},           // k1 / k1, bwd 3 groups of 11 rows a warp
      {33, 200, 1e-6f, false, false, 0, 132, kAll},       // k2 / k1, bwd 9 groups
      {33, 320, 0.1f, true, false, 0, 132, kAll},         // k3 / k2
      {33, 512, 1e-5f, false, true, 0, 1, kAll},          // k4 / k2, bwd 3 groups
      {3, 512, 1e-5f, false, true, kMisDs, 132, kAll},    // fwd k4 / k2, bwd block (ds one off)
      {3, 200, 1e-5f, true, false, kMisDy, 132, kAll},    // fwd k2 / k1, bwd block (dy one off)
      {33, 768, 1e-5f, true, true, 0, 1, kBF16 | kF16},   // k3, bwd 3 groups
      {33, 1000, 1e-5f, false, false, 0, 132, kBF16 | kF16},  // k4
      {130, 1024, 1e-6f, true, true, 0, 132, kBF16 | kF16},   // k4, the widest warp row, 33 groups
      {1, 72, 1e-5f, false, true, 0, 132, kAll},          // k1: one row, idle warps
      {0, 72, 1e-5f, false, false, 0, 132, kAll},         // nothing but the reduce: zeros
  };
  for (const Case &c : ln_cases) {
    const Inputs in = make_inputs(c, rng);
    if (c.dtypes & kF32) ok &= run_layernorm<float>(in);
    if (c.dtypes & kBF16) ok &= run_layernorm<bf16>(in);
    if (c.dtypes & kF16) ok &= run_layernorm<f16>(in);
  }

  // RMSNorm. Plans (rmsnorm.rs Plan::new; V values an access, K accesses a thread, threads):
  // f32 with aligned bases V4 (V1 when cols % 4 != 0), bf16/f16 V8 (V1 when cols % 8 != 0);
  // one buffer one element off gives V1. Per case, f32 / bf16 and f16:
  const Case rms_cases[] = {
      {1, 1, 1e-5f, true, true, 0, 132, kAll},            // V1 K1 t32
      {130, 72, 1e-5f, true, true, 0, 1, kAll},           // V4 K1 t32 / V8 K1 t32, 64 groups
      {33, 200, 1e-6f, false, false, 0, 132, kAll},       // V4 K1 t64 / V8 K1 t32
      {9, 320, 0.1f, false, true, kMisX, 1, kAll},        // V1 K2 t160, 9 groups
      {2, 1000, 1e-5f, true, false, kMisW, 132, kAll},    // V1 K4 t256
      // fwd V8 K1 t96, bwd V1 K4 t192 (dy one off), 10 groups
      {17, 768, 1e-5f, false, false, kMisDy, 1, kBF16 | kF16},
      {4, 1024, 1e-5f, true, true, 0, 132, kF32},         // V4 K1 t256
      {4, 1500, 1e-5f, false, true, 0, 132, kF32},        // V4 K2 t192
      {3, 1500, 1e-6f, false, false, kMisX, 1, kAll},     // V1 K8 t192
      {4, 2050, 1e-5f, false, false, 0, 1, kAll},         // V1 K16 t160, 4 groups
      {2, 8192, 1e-5f, false, false, 0, 132, kAll},       // V4 K4 t512 / V8 K2 t512
      {2, 8192, 1e-5f, false, false, kMisX, 132, kF32},   // V1 K16 t512
      {6, 8200, 1e-5f, true, true, 0, 1, kF32},           // V4 K0 t512, 4 groups
      {2, 8200, 1e-5f, false, false, 0, 132, kBF16 | kF16},   // V8 K0 t512
      {2, 8200, 1e-5f, false, true, kMisDs | kMisX, 132, kAll}, // V1 K0 t512
      {0, 72, 1e-5f, false, false, 0, 132, kAll},         // nothing but the reduce: zeros
  };
  for (const Case &c : rms_cases) {
    const Inputs in = make_inputs(c, rng);
    // Each as stored, then as Gemma's f32 offsets from one.
    for (bool plus_one : {false, true}) {
      if (c.dtypes & kF32) ok &= run_rmsnorm<float, float>(in, plus_one);
      if (c.dtypes & kBF16)
        ok &= plus_one ? run_rmsnorm<bf16, float>(in, true) : run_rmsnorm<bf16, bf16>(in, false);
      if (c.dtypes & kF16)
        ok &= plus_one ? run_rmsnorm<f16, float>(in, true) : run_rmsnorm<f16, f16>(in, false);
    }
  }

  // Every entry point of both files ran.
  std::string missing;
  for (const std::string &e : all_entry_points())
    if (!launched.count(e)) missing += " " + e;
  for (const std::string &e : launched)
    if (!all_entry_points().count(e)) missing += " (unknown " + e + ")";
  std::printf("%s variants covered: %zu entry points launched%s%s\n",
              missing.empty() ? "ok  " : "FAIL", launched.size(),
              missing.empty() ? "" : ", not launched:", missing.c_str());
  ok &= missing.empty();
  return emu_check::finish(ok);
}
