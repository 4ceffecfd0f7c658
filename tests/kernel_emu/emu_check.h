// What the emulator's test drivers share: a seeded generator, the dtypes (traits, conversions,
// a rounding written independently of the emulator's), comparisons against a double reference
// that print one line each, helpers of the launchers' common code, and the exit status.
#pragma once

#include <cinttypes>
#include <cstdarg>
#include <random>
#include <string>

namespace emu_check {

inline uint64_t seed(int argc, char **argv) {
  const uint64_t s = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : std::random_device{}();
  std::printf("seed %" PRIu64 " (rerun with this argument to repeat)\n", s);
  return s;
}

struct Rng {
  std::mt19937_64 gen;
  explicit Rng(uint64_t s) : gen(s) {}
  float normal() { return std::normal_distribution<float>(0.f, 1.f)(gen); }
  float uniform() { return std::uniform_real_distribution<float>(0.f, 1.f)(gen); }
};

// splitmix64 of src/train/rng.rs (dropout masks, the sampler's keys and uniforms).
inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// ---------------------------------------------------------------------------------------
// Dtypes: name, format (p bits of precision, least normal exponent emin), the most a rounding
// to the format moves a value (unit roundoff u = 2^-p relatively, half the least subnormal `sub`
// absolutely) and the conversion in from f32, to nearest even. A driver adds its entry points
// by deriving its own Dt<T> from these.
// ---------------------------------------------------------------------------------------
template <typename T> struct Dt;
template <> struct Dt<float> {
  static constexpr const char *name = "f32";
  static constexpr int p = 24, emin = -126;
  static constexpr double u = 0x1p-24, sub = 0x1p-150;
  static float from(float x) { return x; }
};
template <> struct Dt<__nv_bfloat16> {
  static constexpr const char *name = "bf16";
  static constexpr int p = 8, emin = -126;
  static constexpr double u = 0x1p-8, sub = 0x1p-134;
  static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};
template <> struct Dt<__half> {
  static constexpr const char *name = "f16";
  static constexpr int p = 11, emin = -14;
  static constexpr double u = 0x1p-11, sub = 0x1p-25;
  static __half from(float x) { return __float2half_rn(x); }
};

inline double value(double x) { return x; }
inline double value(float x) { return x; }
inline double value(__nv_bfloat16 x) { return __bfloat162float(x); }
inline double value(__half x) { return __half2float(x); }

// x rounded to nearest even in T's format (subnormals included; the values here are far from
// T's overflow), computed in double without the emulator's conversions.
template <typename T> double round_as(double x) {
  if (x == 0 || std::isnan(x)) return x;
  int e;
  std::frexp(x, &e);  // |x| in [2^(e-1), 2^e)
  const double ulp = std::ldexp(1.0, std::max(e - 1, Dt<T>::emin) - Dt<T>::p + 1);
  return std::nearbyint(x / ulp) * ulp;  // the default rounding mode: to nearest even
}

// Values drawn in f32, each rounded to T.
template <typename T> std::vector<T> convert(const std::vector<float> &x) {
  std::vector<T> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = Dt<T>::from(x[i]);
  return out;
}

// n draws of N(0, sd^2), each rounded to T.
template <typename T> std::vector<T> normals(size_t n, Rng &rng, double sd = 1) {
  std::vector<T> v(n);
  for (auto &x : v) x = Dt<T>::from((float)(sd * rng.normal()));
  return v;
}

// ---------------------------------------------------------------------------------------
// Comparisons: one line each, "ok  " or "FAIL", what was compared, the summary, and where
// one fails the first element that does.
// ---------------------------------------------------------------------------------------
constexpr int kWhat = 44;  // the column of what was compared

// Largest error relative to the reference's largest magnitude; a NaN anywhere fails.
template <typename T>
bool close(const std::string &what, const std::vector<T> &got, const std::vector<double> &want,
           double tol) {
  double err = 0, scale = 1e-12;
  size_t worst = 0;
  bool nan = false;
  for (size_t i = 0; i < want.size(); ++i) {
    const double x = value(got[i]);
    scale = std::max(scale, std::fabs(want[i]));
    if (std::isnan(x)) {
      if (!nan) worst = i;  // report the first NaN, not a later finite error
      nan = true;
      continue;
    }
    if (std::fabs(x - want[i]) > err) {
      err = std::fabs(x - want[i]);
      if (!nan) worst = i;
    }
  }
  const bool ok = !nan && err / scale <= tol;
  std::printf("%s %-*s max err %.3e of max |ref| %.3e (rel %.2e, bound %.0e)%s",
              ok ? "ok  " : "FAIL", kWhat, what.c_str(), err, scale, err / scale, tol,
              nan ? ", NaN in output" : "");
  if (!ok)
    std::printf(" at %zu: %.6g vs %.6g", worst, value(got[worst]), want[worst]);
  std::printf("\n");
  return ok;
}

// Elementwise absolute error; infinities must match exactly.
template <typename T>
bool close_abs(const std::string &what, const std::vector<T> &got, const std::vector<double> &want,
               double tol) {
  double err = 0;
  size_t bad = want.size();
  for (size_t i = 0; i < want.size(); ++i) {
    const double x = value(got[i]);
    const bool same_inf = std::isinf(want[i]) && x == want[i];
    const double e = same_inf ? 0 : std::fabs(x - want[i]);
    if (!(e <= tol) && bad == want.size()) bad = i;
    if (e > err || std::isnan(e)) err = e;
  }
  const bool ok = bad == want.size();
  std::printf("%s %-*s max abs err %.3e (bound %.0e)", ok ? "ok  " : "FAIL", kWhat, what.c_str(),
              err, tol);
  if (!ok) std::printf(" at %zu: %.6g vs %.6g", bad, value(got[bad]), want[bad]);
  std::printf("\n");
  return ok;
}

// What an element-by-element comparison found: the elements that fail (how many, the first),
// the NaNs, and for a bound the largest err / bound over the rest. For drivers that print their
// own summary; within and exact below print theirs.
struct Tally {
  size_t n = 0, nbad = 0, first = 0;
  size_t nnan = 0;   // within: NaN errors; exact: NaNs in the reference
  double worst = 0;  // within: the largest finite err / bound (0 / 0 is 0, x / 0 infinity)
  bool ok() const { return nbad == 0; }
};

// |got[i] - want[i]| <= bound[i] for every i; a NaN fails.
template <typename T>
Tally tally_within(const T *got, const std::vector<double> &want,
                   const std::vector<double> &bound) {
  Tally t;
  t.n = want.size();
  for (size_t i = 0; i < want.size(); ++i) {
    const double e = std::fabs(value(got[i]) - want[i]);
    if (!(e <= bound[i]) && t.nbad++ == 0) t.first = i;
    if (std::isnan(e)) {
      ++t.nnan;
      continue;
    }
    t.worst = std::max(t.worst, bound[i] > 0 ? e / bound[i] : e > 0 ? INFINITY : 0);
  }
  return t;
}

// got[i] == want[i] as values (so -0 == +0) for every i. A NaN equals nothing; with
// `nan_expected`, a NaN in want asks for a NaN in got.
template <typename T>
Tally tally_exact(const T *got, const std::vector<double> &want, bool nan_expected = false) {
  Tally t;
  t.n = want.size();
  for (size_t i = 0; i < want.size(); ++i) {
    const double x = value(got[i]);
    t.nnan += std::isnan(want[i]);
    const bool same = nan_expected && std::isnan(want[i]) ? std::isnan(x) : x == want[i];
    if (!same && t.nbad++ == 0) t.first = i;
  }
  return t;
}

// |got - want| <= bound element by element, NaN failing; prints the largest err / bound.
template <typename T>
bool within(const std::string &what, const T *got, const std::vector<double> &want,
            const std::vector<double> &bound) {
  const Tally t = tally_within(got, want, bound);
  std::printf("%s %-*s max err / bound %.3g over %zu", t.ok() ? "ok  " : "FAIL", kWhat,
              what.c_str(), t.worst, t.n);
  if (t.nnan) std::printf(", %zu NaN", t.nnan);
  if (!t.ok())
    std::printf(", %zu over, first at %zu: %.9g vs %.9g (bound %.3g)", t.nbad, t.first,
                value(got[t.first]), want[t.first], bound[t.first]);
  std::printf("\n");
  return t.ok();
}
template <typename T>
bool within(const std::string &what, const std::vector<T> &got, const std::vector<double> &want,
            const std::vector<double> &bound) {
  return within(what, got.data(), want, bound);
}
inline bool within(const std::string &what, const std::vector<double> &got,
                   const std::vector<double> &want, const std::vector<double> &bound) {
  return within(what, got.data(), want, bound);
}

// Bit for bit (as values: -0 == +0); a NaN fails, or with `nan_expected` must stand where the
// reference has NaN.
template <typename T>
bool exact(const std::string &what, const T *got, const std::vector<double> &want,
           bool nan_expected = false) {
  const Tally t = tally_exact(got, want, nan_expected);
  std::printf("%s %-*s exact: %zu of %zu differ", t.ok() ? "ok  " : "FAIL", kWhat, what.c_str(),
              t.nbad, t.n);
  if (nan_expected) std::printf(" (%zu NaN expected)", t.nnan);
  if (!t.ok())
    std::printf(", first at %zu: %.9g vs %.9g", t.first, value(got[t.first]), want[t.first]);
  std::printf("\n");
  return t.ok();
}
template <typename T>
bool exact(const std::string &what, const std::vector<T> &got, const std::vector<double> &want,
           bool nan_expected = false) {
  return exact(what, got.data(), want, nan_expected);
}

// A check that is no numeric comparison, in the same format; `fmt` (printf's) adds details.
inline bool check(const std::string &what, bool ok) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  return ok;
}
inline bool check(const std::string &what, bool ok, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
inline bool check(const std::string &what, bool ok, const char *fmt, ...) {
  std::printf("%s %-*s ", ok ? "ok  " : "FAIL", kWhat, what.c_str());
  va_list ap;
  va_start(ap, fmt);
  std::vprintf(fmt, ap);
  va_end(ap);
  std::printf("\n");
  return ok;
}

inline int finish(bool ok) {
  std::printf(ok ? "all passed\n" : "FAILED\n");
  return ok ? 0 : 1;
}

// ---------------------------------------------------------------------------------------
// The launchers' common code (src/kernels/cuda/mod.rs).
// ---------------------------------------------------------------------------------------
// grid_stride(dev, n, threads): launch_1d's ceil(n / threads) blocks (at least one), at most
// sm_count * (2048 / threads).
inline unsigned grid_stride(size_t n, size_t sms, unsigned threads = 256) {
  size_t grid = std::max<size_t>(1, (n + threads - 1) / threads);
  grid = std::min<size_t>(grid, sms * std::max(1u, 2048 / threads));
  return (unsigned)grid;
}

}  // namespace emu_check
