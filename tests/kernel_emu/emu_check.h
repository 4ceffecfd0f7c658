// What the emulator's test drivers share: a seeded generator, comparisons against a double
// reference that print one line each, and the exit status.
#pragma once

#include <cinttypes>
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

inline double value(float x) { return x; }
inline double value(__nv_bfloat16 x) { return __bfloat162float(x); }
inline double value(__half x) { return __half2float(x); }

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
  std::printf("%s %-40s max err %.3e of max |ref| %.3e (rel %.2e, bound %.0e)%s", ok ? "ok  " : "FAIL",
              what.c_str(), err, scale, err / scale, tol, nan ? ", NaN in output" : "");
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
  std::printf("%s %-40s max abs err %.3e (bound %.0e)", ok ? "ok  " : "FAIL", what.c_str(), err,
              tol);
  if (!ok) std::printf(" at %zu: %.6g vs %.6g", bad, value(got[bad]), want[bad]);
  std::printf("\n");
  return ok;
}

inline int finish(bool ok) {
  std::printf(ok ? "all passed\n" : "FAILED\n");
  return ok ? 0 : 1;
}

}  // namespace emu_check
