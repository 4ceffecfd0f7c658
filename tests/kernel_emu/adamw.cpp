// The optimizer step's kernels (kernels/adamw.cu) run in the CPU emulator (cuda_emu.h), every
// entry point of the file (adamw_sumsq_f32, adamw_norm_finish_f32, adamw_step_f32), launched
// as update() in src/kernels/cuda/adamw.rs launches them, against references written here:
// - the launcher's host side mirrored: a norm table with one row per CHUNK (65536) elements of
//   every gradient of `grads` (the step's, owned or not; only g, g_bf16, start, len set), a
//   step table with one row per chunk of every owned slot's gradient (p, m, v, g, copy, lr, wd
//   set), three launches of 256 threads and no shared memory: sumsq over the norm table's rows,
//   norm_finish with one block, step over the step table's rows (not launched when no slot is
//   owned); the params as update() fills them (beta1, beta2, 1 - beta1, 1 - beta2 rounded from
//   f64 to f32, 1 / (1 - beta^t) from f64 with Rust's powi, max_norm as f32), the partials and
//   the norm poisoned (NaN) as alloc_out leaves them;
// - tensors of 1, 37, 1000, 4099, 65536 (one full chunk), 65573 (a full chunk and 37) and
//   135171 (three chunks, the last of 4099) elements in one launch: chunk rows of several
//   sizes, some tensors split across rows, and rows of fewer elements than threads;
// - f32 and bf16 gradients, a bf16 compute copy or none (the launcher takes bf16 copies only:
//   an f32 copy, or any other dtype, makes update() return None and the reference run, so
//   there is no f32-copy kernel path to test), weight decay 0 and not, per-tensor lr;
// - clipping: max_norm half the norm (clips), twice it (no clip), 0 (off), and half of a norm
//   of about 0.2 (gradients 1e-4 times smaller), where the 1e-6 in max_norm / (norm + 1e-6)
//   changes the f32 scale; steps t = 1 (zero moments, the first step), 2, 7 and 1000 (bias
//   corrections about 1);
// - a sharded step: gradients in `grads` that no slot owns (in the norm, not updated), among
//   them one of 257 * 65536 + 5 elements so that norm_finish has 258 partials, more than its
//   256 threads; and a step where this rank owns no slot (the step is not launched, the norm
//   still is);
// - 16 guard elements on both sides of every weight, moment and copy, which must stay as they
//   were, so that a row reaching past its tensor shows.
//
// References:
// - the partials and the norm against a double sum of squares: a partial is an f32 sum of
//   nonnegative terms (k = ceil(len / 256) fused multiply-adds per thread, then 10 levels of
//   shuffles and the sum across warps), within (k + 10) u of it relatively (u = 2^-24); the
//   norm sums the partials in f64 and rounds the square root to f32, within (kmax + 10) u / 2
//   + u. The clip decision must be the reference's (the cases keep the norm a factor 2 from
//   max_norm).
// - the update, bit for bit: src/kernels/adamw.rs (update_reference) as candle's CPU backend
//   computes it in f32, written out here (a tensor times, plus or divided by an f64 is
//   affine(mul, add): x * (f32)mul + (f32)add, Div by b is affine(1 / b, 0); sqr is x * x), with
//   the clip scale max_norm / (norm + 1e-6) in f64 from the kernel's own norm (the kernel's
//   header promises the last bit given the same scale; the norm is checked above). m, v, the
//   master and the copy (the master rounded to bf16, nearest even, by emu_check's rounding)
//   must equal it (+0 and -0 count as equal: candle's "+ 0" turns a -0 into +0);
// - the update again against the formula in double (exact hyperparameters, the scale from the
//   kernel's norm), element by element within a running error bound: every f32 operation,
//   every constant rounded to f32, one u of its result, propagated to first order through m, v,
//   m / bc1, sqrt(v / bc2) + eps, the division, the decay and the step; twice that bound is
//   allowed; the copy within that plus the bf16 rounding (2^-8 relatively). The master changes
//   by lr * |update| (lr 0.01 to 0.03 here), far above its own rounding, so a wrong update
//   shows.
//
// Usage: adamw [seed]  (a random seed when none is given; it is printed either way).
#include "emu_check.h"

#include "adamw.cu"

namespace {

using emu_check::check;
using emu_check::exact;
using emu_check::within;
using bf16 = __nv_bfloat16;

// src/kernels/cuda/adamw.rs: CHUNK, THREADS.
constexpr size_t kChunk = size_t(1) << 16;
constexpr unsigned kThreads = 256;
constexpr size_t kGuard = 16;
constexpr double kU = 0x1p-24;
constexpr float kSentinel = 4321.5f;

// f64::powi as Rust compiles it for a run-time exponent (compiler-rt's __powidf2).
double powi(double a, int b) {
  const bool recip = b < 0;
  double r = 1;
  for (;;) {
    if (b & 1) r *= a;
    b /= 2;
    if (b == 0) break;
    a *= a;
  }
  return recip ? 1 / r : r;
}

// n elements of T with kGuard sentinels on both sides.
template <typename T> struct Guarded {
  std::vector<T> raw;
  size_t n;
  Guarded(size_t n, T sentinel) : raw(n + 2 * kGuard, sentinel), n(n) {}
  T *p() { return raw.data() + kGuard; }
  T &operator[](size_t i) { return raw[kGuard + i]; }
  bool guards_intact(T sentinel) const {
    for (size_t i = 0; i < kGuard; ++i)
      if (std::memcmp(&raw[i], &sentinel, sizeof(T)) != 0 ||
          std::memcmp(&raw[kGuard + n + i], &sentinel, sizeof(T)) != 0)
        return false;
    return true;
  }
};

// One tensor of the step: its gradient, and when owned its weight, moments and copy.
struct TensorSpec {
  size_t n;
  bool g_bf16;
  bool owned;    // a slot of this rank (else only in `grads`, for the norm)
  bool copy;     // a bf16 compute copy
  double lr, wd;
  float gscale;  // the gradient's spread
};

struct Tensor {
  TensorSpec s;
  std::vector<float> g32;
  std::vector<bf16> g16;
  Guarded<float> p, m, v;
  Guarded<bf16> c;
  std::vector<float> p0, m0, v0;  // before the step
  explicit Tensor(const TensorSpec &s)
      : s(s), p(s.owned ? s.n : 0, kSentinel), m(s.owned ? s.n : 0, kSentinel),
        v(s.owned ? s.n : 0, kSentinel),
        c(s.owned && s.copy ? s.n : 0, __float2bfloat16_rn(kSentinel)) {}
  double grad(size_t k) const { return s.g_bf16 ? __bfloat162float(g16[k]) : g32[k]; }
  const void *gptr() const {
    return s.g_bf16 ? static_cast<const void *>(g16.data()) : g32.data();
  }
};

struct Case {
  const char *name;
  std::vector<TensorSpec> tensors;
  double clip;  // max_norm = clip * norm (rounded to f32); 0: no clipping
  int t;
  bool zero_moments;
  double beta1, beta2, eps;
  float gmul = 1.f;  // times every gradient's spread (a small norm: 1e-6 / norm matters)
};

void fill(Tensor &x, emu_check::Rng &rng, bool zero_moments) {
  const size_t n = x.s.n;
  if (x.s.g_bf16) {
    x.g16.resize(n);
    if (n > 4 * kChunk) {
      // The large frozen gradient: a cheap pattern, not a normal draw per element.
      uint64_t st = rng.gen();
      for (size_t k = 0; k < n; ++k) {
        st = st * 6364136223846793005ull + 1442695040888963407ull;
        const float z = (float)((int32_t)(st >> 32)) * 0x1p-31f;
        x.g16[k] = __float2bfloat16_rn(x.s.gscale * z);
      }
    } else {
      for (auto &g : x.g16) g = __float2bfloat16_rn(x.s.gscale * rng.normal());
    }
  } else {
    x.g32.resize(n);
    for (auto &g : x.g32) g = x.s.gscale * rng.normal();
  }
  if (!x.s.owned) return;
  for (size_t k = 0; k < n; ++k) {
    x.p[k] = 0.5f * rng.normal();
    const float a = 0.1f * x.s.gscale * rng.normal(), b = 0.1f * x.s.gscale * rng.normal();
    x.m[k] = zero_moments ? 0.f : a;
    x.v[k] = zero_moments ? 0.f : a * a + b * b;
    if (x.s.copy) x.c[k] = __float2bfloat16_rn(-1.f);  // stale: the kernel must rewrite it
  }
  x.p0.assign(x.p.p(), x.p.p() + n);
  x.m0.assign(x.m.p(), x.m.p() + n);
  x.v0.assign(x.v.p(), x.v.p() + n);
}

// chunks() of src/kernels/cuda/adamw.rs.
std::vector<std::pair<unsigned, unsigned>> chunks(size_t n) {
  std::vector<std::pair<unsigned, unsigned>> out;
  for (size_t c = 0; c < (n + kChunk - 1) / kChunk; ++c) {
    const size_t start = c * kChunk;
    out.push_back({(unsigned)start, (unsigned)std::min(n - start, kChunk)});
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// One step.
// ---------------------------------------------------------------------------------------
bool run(const Case &c, emu_check::Rng &rng) {
  std::vector<Tensor> ts;
  ts.reserve(c.tensors.size());
  for (const auto &s : c.tensors) {
    ts.emplace_back(s);
    ts.back().s.gscale *= c.gmul;
    fill(ts.back(), rng, c.zero_moments);
  }
  const std::string name = c.name;

  // The double norm and the per-chunk sums of squares (norm table order).
  double sq = 0;
  std::vector<double> want_part, part_bound;
  for (const auto &x : ts) {
    for (auto [start, len] : chunks(x.s.n)) {
      double s = 0;
      for (size_t k = start; k < start + len; ++k) s += x.grad(k) * x.grad(k);
      want_part.push_back(s);
      const double k_per_thread = std::ceil((double)len / kThreads);
      part_bound.push_back(1.01 * (k_per_thread + 10) * kU * s);
      sq += s;
    }
  }
  const double norm_d = std::sqrt(sq);
  const double max_norm = (double)(float)(c.clip * norm_d);

  // Host side of update(): the tables and the params.
  std::vector<AdamwChunk> norm_table, step_table;
  size_t kmax = 0;
  for (const auto &x : ts)
    for (auto [start, len] : chunks(x.s.n)) {
      AdamwChunk r{};
      r.g = x.gptr();
      r.g_bf16 = x.s.g_bf16;
      r.start = start;
      r.len = len;
      norm_table.push_back(r);
      kmax = std::max(kmax, ((size_t)len + kThreads - 1) / kThreads);
    }
  for (auto &x : ts) {
    if (!x.s.owned) continue;
    for (auto [start, len] : chunks(x.s.n)) {
      AdamwChunk r{};
      r.p = x.p.p();
      r.m = x.m.p();
      r.v = x.v.p();
      r.g = x.gptr();
      r.copy = x.s.copy ? x.c.p() : nullptr;
      r.start = start;
      r.len = len;
      r.lr = (float)x.s.lr;
      r.wd = (float)x.s.wd;
      r.g_bf16 = x.s.g_bf16;
      r.pad = 0;
      step_table.push_back(r);
    }
  }
  std::vector<float> partials(norm_table.size(), NAN), norm(1, NAN);
  const double b1 = c.beta1, b2 = c.beta2;
  const double bc1 = 1.0 - powi(b1, c.t), bc2 = 1.0 - powi(b2, c.t);
  AdamwParams p{};
  p.chunks = norm_table.data();
  p.partials = partials.data();
  p.norm = norm.data();
  p.n_chunks = (int)norm_table.size();
  p.n_partials = (int)norm_table.size();
  p.beta1 = (float)b1;
  p.beta2 = (float)b2;
  p.one_minus_beta1 = (float)(1.0 - b1);
  p.one_minus_beta2 = (float)(1.0 - b2);
  p.inv_bc1 = (float)(1.0 / bc1);
  p.inv_bc2 = (float)(1.0 / bc2);
  p.eps = (float)c.eps;
  p.max_norm = (float)max_norm;
  const emu::Dim block{kThreads, 1, 1};
  emu::launch({(unsigned)norm_table.size(), 1, 1}, block, 0, [&] { adamw_sumsq_f32(p); });
  emu::launch({1, 1, 1}, block, 0, [&] { adamw_norm_finish_f32(p); });
  if (!step_table.empty()) {
    p.chunks = step_table.data();
    p.n_chunks = (int)step_table.size();
    emu::launch({(unsigned)step_table.size(), 1, 1}, block, 0, [&] { adamw_step_f32(p); });
  }

  // The norm.
  bool ok = within(name + " partials (" + std::to_string(partials.size()) + ")",
                   std::vector<double>(partials.begin(), partials.end()), want_part, part_bound);
  const double norm_k = norm[0];
  const double norm_tol = 1.01 * ((kmax + 10) * kU / 2 + kU) * norm_d;
  char buf[64];
  std::snprintf(buf, sizeof buf, " norm %.4g", norm_d);
  ok &= within(name + buf, {norm_k}, {norm_d}, {norm_tol});
  const bool clip_ref = max_norm > 0 && norm_d > max_norm;
  const bool clip_k = max_norm > 0 && norm_k > max_norm;
  ok &= check(name + " clip decision " + (clip_ref ? "(clips)" : "(does not clip)"),
              clip_ref == clip_k);
  if (step_table.empty()) {
    std::printf("     %s: no slot owned, no step launched\n", c.name);
    return ok;
  }

  // The update, both references, from the kernel's norm.
  const double scale = clip_k ? max_norm / (norm_k + 1e-6) : 1.0;
  const float sf = (float)scale;
  const float b1f = (float)b1, b2f = (float)b2, omb1f = (float)(1.0 - b1),
              omb2f = (float)(1.0 - b2), ibc1f = (float)(1.0 / bc1), ibc2f = (float)(1.0 / bc2),
              epsf = (float)c.eps;
  std::vector<double> got_m, got_v, got_p, got_c, emu_m, emu_v, emu_p, emu_c;
  std::vector<double> ref_m, ref_v, ref_p, bnd_m, bnd_v, bnd_p, ref_c, bnd_c;
  bool guards = true;
  for (auto &x : ts) {
    if (!x.s.owned) continue;
    guards &= x.p.guards_intact(kSentinel) && x.m.guards_intact(kSentinel) &&
              x.v.guards_intact(kSentinel) && x.c.guards_intact(__float2bfloat16_rn(kSentinel));
    const float lrf = (float)x.s.lr, wdf = (float)x.s.wd;
    for (size_t k = 0; k < x.s.n; ++k) {
      got_m.push_back(x.m[k]);
      got_v.push_back(x.v[k]);
      got_p.push_back(x.p[k]);
      // candle's f32 ops (update_reference), in order.
      const float g = (float)x.grad(k);
      const float gc = clip_k ? g * sf + 0.f : g;
      const float m = (x.m0[k] * b1f + 0.f) + (gc * omb1f + 0.f);
      const float v = (x.v0[k] * b2f + 0.f) + ((gc * gc) * omb2f + 0.f);
      const float mhat = m * ibc1f + 0.f;
      const float denom = std::sqrt(v * ibc2f + 0.f) * 1.f + epsf;
      float upd = mhat / denom;
      if (x.s.wd > 0) upd = upd + (x.p0[k] * wdf + 0.f);
      const float pn = x.p0[k] - (upd * lrf + 0.f);
      emu_m.push_back(m);
      emu_v.push_back(v);
      emu_p.push_back(pn);
      // The formula in double, with a running first-order error bound of the f32 kernel.
      const double gd = x.grad(k), m0 = x.m0[k], v0 = x.v0[k], p0 = x.p0[k];
      const double gcd = gd * scale, e_gc = clip_k ? 2 * kU * std::fabs(gcd) : 0;
      const double md = b1 * m0 + (1 - b1) * gcd;
      const double e_m = kU * (2 * std::fabs(b1 * m0) + 2 * std::fabs((1 - b1) * gcd) +
                               std::fabs(md)) + (1 - b1) * e_gc;
      const double gg = gcd * gcd, e_gg = 2 * std::fabs(gcd) * e_gc + kU * gg;
      const double vd = b2 * v0 + (1 - b2) * gg;
      const double e_v = kU * (2 * b2 * v0 + 2 * (1 - b2) * gg + vd) + (1 - b2) * e_gg;
      const double mh = md / bc1, e_mh = e_m / bc1 + 2 * kU * std::fabs(mh);
      const double vh = vd / bc2, e_vh = e_v / bc2 + 2 * kU * vh;
      const double sqv = std::sqrt(vh), e_sq = std::sqrt(vh + e_vh) - sqv + kU * sqv;
      const double den = sqv + c.eps, e_den = e_sq + kU * c.eps + kU * den;
      double up = mh / den;
      double e_up = (e_mh + std::fabs(up) * e_den) / (den - e_den) + kU * std::fabs(up);
      if (x.s.wd > 0) {
        const double w = x.s.wd * p0;
        up += w;
        e_up += 2 * kU * std::fabs(w) + kU * std::fabs(up);
      }
      const double delta = x.s.lr * up;
      const double pd = p0 - delta;
      const double e_p = x.s.lr * e_up + 2 * kU * std::fabs(delta) + kU * std::fabs(pd);
      ref_m.push_back(md);
      ref_v.push_back(vd);
      ref_p.push_back(pd);
      bnd_m.push_back(2 * e_m);
      bnd_v.push_back(2 * e_v);
      bnd_p.push_back(2 * e_p);
      if (x.s.copy) {
        got_c.push_back(__bfloat162float(x.c[k]));
        emu_c.push_back(emu_check::round_as<bf16>(pn));
        ref_c.push_back(pd);
        bnd_c.push_back(2 * e_p + 0x1p-8 * (std::fabs(pd) + 2 * e_p));
      }
    }
  }
  // The kernel's copy is its master rounded (bit for bit), whatever the master.
  std::vector<double> own_c;
  for (auto &x : ts)
    if (x.s.owned && x.s.copy)
      for (size_t k = 0; k < x.s.n; ++k) own_c.push_back(emu_check::round_as<bf16>(x.p[k]));
  ok &= check(name + " guards around every tensor intact", guards);
  ok &= exact(name + " m (candle's f32 ops)", got_m, emu_m);
  ok &= exact(name + " v (candle's f32 ops)", got_v, emu_v);
  ok &= exact(name + " master (candle's f32 ops)", got_p, emu_p);
  ok &= within(name + " m (double)", got_m, ref_m, bnd_m);
  ok &= within(name + " v (double)", got_v, ref_v, bnd_v);
  ok &= within(name + " master (double)", got_p, ref_p, bnd_p);
  if (!got_c.empty()) {
    ok &= exact(name + " copy (candle's ops, to bf16)", got_c, emu_c);
    ok &= exact(name + " copy = bf16(kernel's master)", got_c, own_c);
    ok &= within(name + " copy (double)", got_c, ref_c, bnd_c);
  }
  return ok;
}

}  // namespace

int main(int argc, char **argv) {
  emu_check::Rng rng(emu_check::seed(argc, argv));
  const size_t sizes[] = {1, 37, 1000, 4099, kChunk, kChunk + 37, 2 * kChunk + 4099};
  // Every size, gradient dtypes, copies, lr and decay varied along the list.
  auto mixed = [&](bool shard) {
    std::vector<TensorSpec> v;
    int i = 0;
    for (size_t n : sizes) {
      TensorSpec s;
      s.n = n;
      s.g_bf16 = i % 2 == 1;
      s.copy = i % 4 < 2;  // (f32 g, copy), (bf16 g, copy), (f32 g, none), (bf16 g, none)
      s.owned = !shard || i % 3 != 1;
      s.lr = 0.01 + 0.003 * i;
      s.wd = i % 3 == 2 ? 0.0 : 0.1;
      s.gscale = (float)std::ldexp(1.0, (i * 5) % 7 - 3);
      v.push_back(s);
      ++i;
    }
    return v;
  };
  auto frozen_large = mixed(true);
  frozen_large.push_back({257 * kChunk + 5, true, false, false, 0, 0, 0.05f});
  auto none_owned = mixed(true);
  for (auto &s : none_owned) s.owned = false;
  const Case cases[] = {
      {"first step, clips", mixed(false), 0.5, 1, true, 0.9, 0.95, 1e-8},
      {"t=7, below max_norm", mixed(false), 2.0, 7, false, 0.9, 0.999, 1e-8},
      {"t=2, small norm, clips", mixed(false), 0.5, 2, false, 0.9, 0.95, 1e-8, 1e-4f},
      {"t=1000, max_norm 0", mixed(false), 0.0, 1000, false, 0.8, 0.95, 1e-6},
      {"sharded, 258 partials, clips", frozen_large, 0.5, 3, false, 0.9, 0.95, 1e-8},
      {"sharded, nothing owned", none_owned, 0.5, 2, false, 0.9, 0.95, 1e-8},
  };
  bool ok = true;
  for (const Case &c : cases) ok &= run(c, rng);
  return emu_check::finish(ok);
}
