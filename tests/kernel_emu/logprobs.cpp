// The loss head's kernels (kernels/logprobs.cu) run in the CPU emulator (cuda_emu.h), every
// entry point of the file (logprobs_{fwd,bwd}{,_vec}_{f32,bf16,f16}), against a double-precision
// reference written here, on fresh random inputs of awkward sizes:
// - rows 1, 3, 7, 40, 130 (one block per row) and vocabularies 37, 1000, 50257 (odd), 50304
//   (GPT-2's padded vocabulary), 8 and 1: rows shorter than a block (threads with nothing to
//   add), longer than it, and vector rows whose chunk count is no multiple of the block;
// - both forms of each pass: the launcher (kernel() in src/kernels/cuda/logprobs.rs) takes the
//   16-byte form when a row is a multiple of 16 bytes and every row base is 16-byte aligned, the
//   scalar one otherwise. A run on aligned buffers takes the launcher's choice (vec for 1000,
//   50304 and 8 where the dtype allows, scalar for 37, 50257 and 1); where that was vec, a second
//   run on buffers one element past 16-byte alignment takes the scalar form, as the launcher does;
// - logits of large magnitude: rows offset by +-100 (+-80 in one case) with a spread of several
//   units, so exp without the max subtracted overflows (or underflows) f32, and a spread of 40
//   where most terms vanish next to the largest;
// - targets at the last and the first vocabulary index (rows 0 and 1 mod 5) in every case, on
//   rows 0 and 1 mod 10 with a logit above the rest of the row (a sum that leaves an end of the
//   row out is far off there); targets outside the vocabulary (the vocabulary size itself, and
//   0xFFFFFFFF), whose logp must be NaN (logp starts filled with a finite -768, so a NaN there
//   is one the kernel wrote) while lse stays right;
// - -inf logits (a masked vocabulary): runs that cover whole 16-byte chunks, every third element
//   of another stretch (chunks partly -inf), and one row whose target's logit is -inf (logp
//   -inf, gradient g at the target);
// - the backward for an uneven upstream gradient with zero rows (the kernel writes zeros there,
//   which matters in place, where the row still holds the logits), fed the f32 lse of the
//   kernel's own forward as the loss head does; once into a NaN-filled buffer and once in place
//   over the logits (backward_in_place, loss_head.rs), the gradient in the logits' dtype.
// Launches are logprobs.rs's: grid (rows, 1, 1), 256 threads, no shared memory, no chunking over
// rows; the forward sets logits, targets, logp, lse, rows, vocab; the backward logits, targets,
// lse, dlogp, dlogits, rows, vocab; the other fields stay zero (null). There is no ignore index:
// the op's callers mask the per-token log-probabilities afterwards, a zero upstream gradient is
// the one "ignored row" the kernels know, and the CPU op (src/kernels/logprobs.rs, cpu_forward
// and cpu_backward) is the semantics checked here: logp = x[t] - lse, NaN for t >= vocab;
// dx = g * ([j == t] - exp(x_j - lse)), exactly 0 where g == 0.
//
// - the entropy (LogprobsParams::entropy, dentropy): a second forward with the entropy asked
//   for gives the same logp and lse bit for bit and each row's entropy -sum p log p; a second
//   backward with an uneven upstream gradient of the entropies too (nonzero on rows whose
//   logp gradient is zero, and zero on others) gives g ([j == t] - p_j) - gh p_j (x_j - lse +
//   H), 0 where p_j is 0 (a -inf logit, whose (x_j - lse) p_j would be NaN).
// - the shaping (LogprobsParams::cap, inv_temp): cases with Gemma 2's cap and a temperature,
//   and with a temperature alone, check every output above against the same reference over
//   y = cap tanh(x / cap) inv_temp, the gradient times y'(x) = inv_temp (1 - tanh^2(x / cap)).
//   A capped -inf logit is -cap inv_temp, finite, with slope 0. Every other case runs
//   unshaped (cap 0, inv_temp 1), and the launches set both fields as logprobs.rs does.
//
// Tolerances (eps = 2^-23, the f32 spacing at 1), from the f32 maths of the kernel:
// - lse and logp, absolute: the running sum s is a sum of exp(x - m) <= 1 terms, k = ceil(V/256)
//   of them per thread plus 10 merges (5 shuffle steps, 5 across warps) each rescaling by one
//   expf. Each term carries about one rounding of its own plus that of x - m (whose effect on
//   exp(x - m) is |x - m| exp(x - m) eps/2 <= eps/(2e)), so s (>= 1, the max's own term) is off
//   by at most about (2k + 64) eps relatively, which is that much absolutely in log s; then
//   log, m + log s and x_t - lse round once each at magnitudes below xmax + log V, 2 (xmax +
//   log V) eps between them and the error of log. Bound: eps (2k + 64 + 4 (xmax + log V)),
//   xmax the largest finite |logit|: about 1.7e-5 for a 1000-row of N(0, 3), 1.2e-4 for 50257
//   logits around +-100. A logit left out of the sum costs exp(x_j - lse), far above that for
//   the targets (first and last index) and for most elements of the rows tested.
// - dlogits, relative to the largest |reference| (emu_check::close): p_j = exp(x_j - lse) has
//   absolute error <= p_j (d_lse + eps |x_j - lse| / 2 + eps) <= d_lse + 2 eps (x e^-x <= 1/e),
//   the subtraction from the one-hot and the product with g one rounding each, so |error| <=
//   G (d_lse + 4 eps) before the store, G the largest |g|; the store rounds once more, by at
//   most u |dx_j| (u = 2^-24, 2^-8, 2^-11 for f32, bf16, f16; f16 subnormals 2^-25 absolutely).
//   Bound: u + (G (d_lse + 4 eps) + sub) / R, R the largest |reference|, d_lse the bound above;
//   where the reference is all zeros (vocabulary 1) the absolute G (d_lse + 4 eps) + sub.
// - the entropy H = log s - u / s, u = sum exp(x - m) (x - m), every term measured from the
//   max: s and u each carry about (2k + 64) eps relatively (u's terms one more rounding, of
//   x - m), and |u / s| = H - log s <= log V, so d_H = (2k + 64) eps (2 + 2 log V).
// - dlogits with the entropy term: the term gh p_j (z_j + H), z_j = x_j - lse, adds at most
//   GH (d_lse (1 + |z_j| p_j + H p_j) + p_j d_H + 2 eps) <= GH (d_lse (2 + log V) + d_H +
//   2 eps) (|z| e^z <= 1/e, H <= log V), GH the largest |gh|.
// - shaped: y carries the roundings of x / cap, tanhf (2 ulp), the two products, about
//   8 (cap + 1) inv_temp eps absolutely (|y| <= cap inv_temp), which adds to d_lse through
//   every term; the slope 1 - t^2 is off by about 4 eps absolutely, times G.
//
// Usage: logprobs [seed]  (a random seed when none is given; it is printed either way).
#include <cstring>

#include "emu_check.h"

#include "logprobs.cu"

namespace {

using bf16 = __nv_bfloat16;
using f16 = __half;
using Kernel = void (*)(const LogprobsParams);

// THREADS in src/kernels/cuda/logprobs.rs, kThreads in the kernel.
constexpr unsigned kLaunchThreads = 256;
static_assert(kThreads == (int)kLaunchThreads, "logprobs: the launcher's block size");

constexpr double kEps = 0x1p-23;

// ---------------------------------------------------------------------------------------
// Dtypes: emu_check's (the store's rounding u and sub among them), and the entry points.
// ---------------------------------------------------------------------------------------
template <typename T> struct Dt;
template <> struct Dt<float> : emu_check::Dt<float> {
  static constexpr Kernel fwd = logprobs_fwd_f32, fwd_vec = logprobs_fwd_vec_f32;
  static constexpr Kernel bwd = logprobs_bwd_f32, bwd_vec = logprobs_bwd_vec_f32;
};
template <> struct Dt<bf16> : emu_check::Dt<bf16> {
  static constexpr Kernel fwd = logprobs_fwd_bf16, fwd_vec = logprobs_fwd_vec_bf16;
  static constexpr Kernel bwd = logprobs_bwd_bf16, bwd_vec = logprobs_bwd_vec_bf16;
};
template <> struct Dt<f16> : emu_check::Dt<f16> {
  static constexpr Kernel fwd = logprobs_fwd_f16, fwd_vec = logprobs_fwd_vec_f16;
  static constexpr Kernel bwd = logprobs_bwd_f16, bwd_vec = logprobs_bwd_vec_f16;
};

// The launcher's choice (kernel() in src/kernels/cuda/logprobs.rs): the 16-byte form where a
// row is a multiple of 16 bytes and every buffer's base (so every row's start) is 16-aligned.
template <typename T> bool takes_vec(int vocab, std::initializer_list<const void *> bases) {
  if ((size_t)vocab * sizeof(T) % 16 != 0) return false;
  for (const void *b : bases)
    if (reinterpret_cast<uintptr_t>(b) % 16 != 0) return false;
  return true;
}

// n values of T at a 64-byte aligned address, or one element past it (`misalign`), so that
// the launcher's alignment test picks the scalar form for any vocabulary.
template <typename T> struct Buf {
  std::vector<unsigned char> raw;
  T *p;
  Buf(size_t n, bool misalign) : raw((n + 1) * sizeof(T) + 64) {
    const uintptr_t a = (reinterpret_cast<uintptr_t>(raw.data()) + 63) & ~uintptr_t(63);
    p = reinterpret_cast<T *>(a) + (misalign ? 1 : 0);
  }
  std::vector<T> vec(size_t n) const { return std::vector<T>(p, p + n); }
};

// ---------------------------------------------------------------------------------------
// Cases and inputs.
// ---------------------------------------------------------------------------------------
struct Case {
  const char *name;
  int rows, vocab;
  float spread;   // logits N(0, spread^2) ...
  float offset;   // ... plus +offset on even rows, -offset on odd ones
  bool neg_inf;   // runs of -inf logits in every row, and one target's logit -inf
  bool outside;   // targets outside the vocabulary (rows 3 and 6 where there are that many)
  float cap = 0.f;       // LogprobsParams::cap (0: none)
  float inv_temp = 1.f;  // LogprobsParams::inv_temp
};

constexpr unsigned kTargetMax = 0xFFFFFFFFu;  // -1 as u32, e.g. an ignore index cast

struct Inputs {
  Case c;
  std::vector<float> x;      // [rows, vocab], rounded to each dtype when used
  std::vector<unsigned> t;   // [rows]
  std::vector<float> g;      // [rows] the upstream gradient of logp
  std::vector<float> gh;     // [rows] the upstream gradient of the entropy
};

Inputs make_inputs(const Case &c, emu_check::Rng &rng) {
  Inputs in{c, {}, {}, {}, {}};
  const int V = c.vocab;
  auto index = [&](int n) { return std::min(n - 1, (int)(rng.uniform() * n)); };
  in.x.resize((size_t)c.rows * V);
  in.t.resize(c.rows);
  in.g.resize(c.rows);
  in.gh.resize(c.rows);
  for (int r = 0; r < c.rows; ++r) {
    float *x = &in.x[(size_t)r * V];
    const float off = r % 2 == 0 ? c.offset : -c.offset;
    for (int j = 0; j < V; ++j) x[j] = off + c.spread * rng.normal();
    // The last index, the first, then anywhere.
    in.t[r] = r % 5 == 0 ? V - 1 : r % 5 == 1 ? 0 : (unsigned)index(V);
    // Zero rows, and otherwise of either sign and uneven size.
    in.g[r] = r % 4 == 2 ? 0.f : rng.normal();
    // Live on the rows whose g is zero, zero on others.
    in.gh[r] = r % 4 == 1 ? 0.f : rng.normal();
    if (c.neg_inf) {
      // A run (whole chunks at these lengths) and every third element of another stretch.
      const int a = index(V), len = index(V / 4 + 1);
      for (int j = a; j < std::min(V, a + len); ++j) x[j] = -INFINITY;
      const int b = index(V), len3 = index(V / 8 + 1);
      for (int j = b; j < std::min(V, b + len3); j += 3) x[j] = -INFINITY;
      // The target finite but on row 4, whose target's logit is -inf.
      if (in.t[r] < (unsigned)V) x[in.t[r]] = r == 4 ? -INFINITY : off + c.spread * rng.normal();
    }
    // Rows 0 and 1 (and 10, 11, ...): the target, at the last or the first index, one above
    // the row's largest logit, so that its term dominates the sum and a kernel that leaves
    // either end of the row out of it is far off.
    if (r % 10 < 2) {
      float m = -INFINITY;
      for (int j = 0; j < V; ++j) m = std::max(m, x[j]);
      x[in.t[r]] = m + 1.f;
    }
  }
  if (c.outside && c.rows > 3) in.t[3] = V;
  if (c.outside && c.rows > 6) in.t[6] = kTargetMax;
  return in;
}

// ---------------------------------------------------------------------------------------
// The double reference, from the logits as rounded to T.
// ---------------------------------------------------------------------------------------
struct Reference {
  std::vector<double> logp, lse, dx;
  std::vector<double> entropy, dx_ent;  // dx_ent: dlogits with the entropy's gradient too
  double xmax = 0;  // the largest finite |logit|
};

// The shaped logit (LogprobsParams::cap) and its slope.
double shaped(const Case &c, double x) {
  return (c.cap > 0 ? c.cap * std::tanh(x / c.cap) : x) * c.inv_temp;
}
double slope(const Case &c, double x) {
  if (c.cap <= 0) return c.inv_temp;
  const double t = std::tanh(x / c.cap);
  return c.inv_temp * (1 - t * t);
}

Reference reference(const Inputs &in, const std::vector<double> &raw) {
  const int V = in.c.vocab, rows = in.c.rows;
  std::vector<double> x(raw.size());
  for (size_t i = 0; i < raw.size(); ++i) x[i] = shaped(in.c, raw[i]);
  Reference r;
  r.logp.resize(rows);
  r.lse.resize(rows);
  r.dx.resize(x.size());
  r.entropy.resize(rows);
  r.dx_ent.resize(x.size());
  for (int i = 0; i < rows; ++i) {
    const double *xi = &x[(size_t)i * V];
    double m = -INFINITY;
    for (int j = 0; j < V; ++j) {
      m = std::max(m, xi[j]);
      if (std::isfinite(xi[j])) r.xmax = std::max(r.xmax, std::fabs(xi[j]));
    }
    double s = 0;
    for (int j = 0; j < V; ++j) s += std::exp(xi[j] - m);
    const double lse = m + std::log(s);
    const unsigned t = in.t[i];
    r.lse[i] = lse;
    r.logp[i] = t < (unsigned)V ? xi[t] - lse : NAN;
    double h = 0;
    for (int j = 0; j < V; ++j) {
      const double lp = xi[j] - lse, pj = std::exp(lp);
      if (pj > 0) h -= pj * lp;
    }
    r.entropy[i] = h;
    const double g = in.g[i], gh = in.gh[i];
    for (int j = 0; j < V; ++j) {
      const double onehot = (unsigned)j == t ? 1.0 : 0.0;
      const double z = xi[j] - lse, pj = std::exp(z);
      const double d = g == 0 ? 0.0 : g * (onehot - pj);
      const double k = slope(in.c, raw[(size_t)i * V + j]);
      r.dx[(size_t)i * V + j] = d * k;
      r.dx_ent[(size_t)i * V + j] = (d - (pj > 0 ? gh * pj * (z + h) : 0.0)) * k;
    }
  }
  return r;
}

// Rows whose target is outside the vocabulary must come out NaN (the others are compared by
// close_abs, which fails on a NaN).
bool nan_rows(const std::string &what, const std::vector<float> &got,
              const std::vector<double> &want) {
  size_t n = 0, bad = want.size();
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isnan(want[i])) continue;
    ++n;
    if (!std::isnan(got[i]) && bad == want.size()) bad = i;
  }
  const bool ok = bad == want.size();
  std::printf("%s %-*s NaN in the %zu rows of a target outside the vocabulary",
              ok ? "ok  " : "FAIL", emu_check::kWhat, what.c_str(), n);
  if (!ok) std::printf(": row %zu is %.6g", bad, got[bad]);
  std::printf("\n");
  return ok;
}

// One run: forward, backward into a fresh buffer, backward in place, all on buffers at the
// given alignment, with the entry points the launcher would choose for them.
template <typename T> bool run(const Inputs &in, bool misalign) {
  const Case &c = in.c;
  const size_t n = (size_t)c.rows * c.vocab;
  Buf<T> x(n, misalign), dx(n, misalign), xin(n, misalign);
  std::vector<double> xd(n);
  for (size_t i = 0; i < n; ++i) {
    x.p[i] = Dt<T>::from(in.x[i]);
    xin.p[i] = x.p[i];
    dx.p[i] = Dt<T>::from(NAN);
    xd[i] = emu_check::value(x.p[i]);
  }
  const Reference r = reference(in, xd);
  const bool vec_fwd = takes_vec<T>(c.vocab, {x.p});
  const bool vec_bwd = takes_vec<T>(c.vocab, {x.p, dx.p});
  const bool vec_in = takes_vec<T>(c.vocab, {xin.p, xin.p});
  if (vec_fwd != vec_bwd || vec_fwd != vec_in) {
    std::printf("FAIL driver: forward and backward buffers differ in alignment\n");
    return false;
  }
  const std::string what =
      std::string(c.name) + " " + Dt<T>::name + (vec_fwd ? " vec" : " scalar");
  const bool is_shaped = c.cap > 0 || c.inv_temp != 1.f;
  const emu::Dim grid{(unsigned)c.rows, 1, 1}, block{kLaunchThreads, 1, 1};

  // Forward: logits, targets, logp, lse, rows, vocab.
  std::vector<float> logp(c.rows, -768.f), lse(c.rows, NAN);
  LogprobsParams p{};
  p.logits = x.p;
  p.targets = in.t.data();
  p.logp = logp.data();
  p.lse = lse.data();
  p.rows = c.rows;
  p.vocab = c.vocab;
  p.cap = c.cap;
  p.inv_temp = c.inv_temp;
  const Kernel fwd = vec_fwd ? Dt<T>::fwd_vec : Dt<T>::fwd;
  emu::launch(grid, block, 0, [&] { fwd(p); });

  const double V = c.vocab;
  const double tol_shape = is_shaped ? 8 * (c.cap + 1) * c.inv_temp * kEps : 0.0;
  const double tol_lse =
      kEps * (2 * std::ceil(V / kLaunchThreads) + 64 + 4 * (r.xmax + std::log(V))) + tol_shape;
  std::vector<float> logp_in;
  std::vector<double> want_in;
  bool outside = false;
  for (int i = 0; i < c.rows; ++i) {
    if (std::isnan(r.logp[i])) {
      outside = true;
      continue;
    }
    logp_in.push_back(logp[i]);
    want_in.push_back(r.logp[i]);
  }
  bool ok = emu_check::close_abs(what + " logp", logp_in, want_in, tol_lse);
  if (outside) ok &= nan_rows(what + " logp", logp, r.logp);
  ok &= emu_check::close_abs(what + " lse", lse, r.lse, tol_lse);

  // Backward: logits, targets, lse (the forward's), dlogp, dlogits, rows, vocab.
  double G = 0, R = 0;
  for (float g : in.g) G = std::max(G, (double)std::fabs(g));
  for (double v : r.dx) R = std::max(R, std::fabs(v));
  const double tol_abs = G * (tol_lse + (is_shaped ? 8 : 4) * kEps) + Dt<T>::sub;
  auto compare = [&](const std::string &name, const std::vector<T> &got) {
    if (R == 0) return emu_check::close_abs(name, got, r.dx, tol_abs);
    return emu_check::close(name, got, r.dx, Dt<T>::u + tol_abs / R);
  };
  const Kernel bwd = vec_bwd ? Dt<T>::bwd_vec : Dt<T>::bwd;
  LogprobsParams q{};
  q.logits = x.p;
  q.targets = in.t.data();
  q.lse = lse.data();
  q.dlogp = in.g.data();
  q.dlogits = dx.p;
  q.rows = c.rows;
  q.vocab = c.vocab;
  q.cap = c.cap;
  q.inv_temp = c.inv_temp;
  emu::launch(grid, block, 0, [&] { bwd(q); });
  ok &= compare(what + " dlogits", dx.vec(n));

  // In place over a copy of the logits, as the loss head's backward runs it.
  q.logits = xin.p;
  q.dlogits = xin.p;
  emu::launch(grid, block, 0, [&] { bwd(q); });
  ok &= compare(what + " dlogits in place", xin.vec(n));

  // With the entropy: the forward again, then the backward with its gradient too.
  std::vector<float> logp2(c.rows, -768.f), lse2(c.rows, NAN), ent(c.rows, NAN);
  LogprobsParams pe = p;
  pe.logp = logp2.data();
  pe.lse = lse2.data();
  pe.entropy = ent.data();
  emu::launch(grid, block, 0, [&] { fwd(pe); });
  const bool same = std::memcmp(logp.data(), logp2.data(), c.rows * sizeof(float)) == 0 &&
                    std::memcmp(lse.data(), lse2.data(), c.rows * sizeof(float)) == 0;
  std::printf("%s %-*s logp and lse unchanged by asking for the entropy\n", same ? "ok  " : "FAIL",
              emu_check::kWhat, what.c_str());
  ok &= same;
  const double logV = std::log(V);
  const double tol_h = kEps * (2 * std::ceil(V / kLaunchThreads) + 64) * (2 + 2 * logV);
  ok &= emu_check::close_abs(what + " entropy", ent, r.entropy, tol_h);
  double GH = 0, RE = 0;
  for (float g : in.gh) GH = std::max(GH, (double)std::fabs(g));
  for (double v : r.dx_ent) RE = std::max(RE, std::fabs(v));
  const double tol_ent =
      tol_abs + GH * (tol_lse * (2 + logV) + tol_h + 2 * kEps);
  Buf<T> dxe(n, misalign);
  for (size_t i = 0; i < n; ++i) dxe.p[i] = Dt<T>::from(NAN);
  LogprobsParams qe = q;
  qe.logits = x.p;
  qe.dlogits = dxe.p;
  qe.entropy = ent.data();
  qe.dentropy = in.gh.data();
  emu::launch(grid, block, 0, [&] { bwd(qe); });
  const std::vector<T> got = dxe.vec(n);
  if (RE == 0)
    ok &= emu_check::close_abs(what + " dlogits with entropy", got, r.dx_ent, tol_ent);
  else
    ok &= emu_check::close(what + " dlogits with entropy", got, r.dx_ent, Dt<T>::u + tol_ent / RE);
  return ok;
}

// The launcher's form on aligned buffers, and the scalar form too where that was the vector one.
template <typename T> bool check(const Inputs &in) {
  bool ok = run<T>(in, false);
  if (takes_vec<T>(in.c.vocab, {})) ok &= run<T>(in, true);
  return ok;
}

}  // namespace

int main(int argc, char **argv) {
  emu_check::Rng rng(emu_check::seed(argc, argv));
  const Case cases[] = {
      {"r1 v37", 1, 37, 2.f, 0.f, false, false},
      {"r7 v1000", 7, 1000, 3.f, 0.f, false, true},
      {"r130 v37 +-100", 130, 37, 8.f, 100.f, false, true},
      {"r40 v1000 +-80 -inf", 40, 1000, 4.f, 80.f, true, true},
      {"r2 v50257 +-100", 2, 50257, 8.f, 100.f, false, false},
      {"r7 v50304 wide -inf", 7, 50304, 40.f, 0.f, true, true},
      {"r7 v8", 7, 8, 1.f, 0.f, false, true},
      {"r3 v1", 3, 1, 1.f, 0.f, false, false},
      // Shaped: a cap that bites (logits to +-50 under a cap of 30) with a temperature,
      // -inf logits under it; a cap far into saturation; a temperature alone.
      {"r40 v1000 cap30 T0.7 -inf", 40, 1000, 15.f, 20.f, true, true, 30.f, 1.f / 0.7f},
      {"r130 v37 cap50 +-100", 130, 37, 8.f, 100.f, false, true, 50.f, 1.f},
      {"r7 v50304 T1.6", 7, 50304, 8.f, 0.f, false, false, 0.f, 1.f / 1.6f},
  };
  bool ok = true;
  for (const Case &c : cases) {
    const Inputs in = make_inputs(c, rng);
    ok &= check<float>(in);
    ok &= check<bf16>(in);
    ok &= check<f16>(in);
  }
  return emu_check::finish(ok);
}
