// The GAE and GRPO kernels (kernels/gae.cu) run in the CPU emulator (cuda_emu.h), every entry
// point of the file (gae_scan_f32, gae_scan_f32_vec4, grpo_group_norm_f32), against references
// written here in double:
// - the scan, launched as gae_device() in src/kernels/cuda/gae.rs launches it: grid (B, 1, 1),
//   no shared memory, threads from scan_kernel() (ceil(ceil(T / 8) / 32) warps, 1 to 8), the
//   16-byte form when T % 4 == 0 and the start offset of each of rewards, values and mask is a
//   multiple of 4 elements, the scalar form otherwise; params rewards, values, mask, adv, ret,
//   partials ([3B], poisoned NaN as alloc_out leaves it), counter (zeroed), stats (poisoned),
//   t, gamma (f32) and gl = (f32)gamma * (f32)lambda in f32, the rest zero. Advantages and
//   returns start NaN too, so every element, padding included, must be written;
// - B 1, 3, 33 and T 1, 7, 130, 1000 (one chunk: 32 or 128 threads), 2048 (one full chunk of
//   256 threads), 2049, 4100, 5003 (rows done in 2 or 3 chunks, right to left, the carry from
//   chunk to chunk), gamma and lambda not 1 (down to 0.9 * 0.9, and 0.99 * 0.95) and one case
//   at gamma = lambda = 1 (a plain suffix sum); T = 1000, 2048 and 4100 once in the 16-byte
//   form (start offsets multiples of 4, some not 0) and once in the scalar form (one of the
//   three inputs one element off), as the launcher chooses for those layouts;
// - masks as src/kernels/gae.rs reads them (m == 0 is padding and ends the episode): row 0
//   valid throughout (one episode over every chunk), row 1 all padding, row 2 only its first
//   step, rows 3 and 4 holes just after and just before the boundaries of a thread's 8 steps,
//   a warp's 256 and a chunk's 2048, the other rows right padding of random length (none,
//   full, short, any) with random holes; valid entries mostly 1, some 0.5 and 2 (valid all
//   the same), padding 0 or -0; rewards NaN and values +inf under padding, which the
//   reference never reads and the kernel must not use.
// - grpo_group_norm_f32 as group_normalize() launches it: launch_1d(groups * 32, 256), one warp
//   per group (so 9 and 17 groups leave warps of the last block idle), groups of 1 (zero
//   variance: out 0), 7, 33, 64 (one group constant: 0), 100 (around 1000, where a one-pass
//   variance in f32 would fail), 1000; eps 0, 1e-6, 1e-4.
//
// References and tolerances (u = 2^-24):
// - GAE: the recurrence of gae_reference in double, from the same f32 gamma and the same f32
//   gamma * lambda (gl) as the kernel. A_t = sum_k gl^k d_{t+k} within the episode. The kernel
//   rounds d_t = (r_t + gamma v_{t+1}) - v_t three times (e_d = u (|gamma v_{t+1}| + |r_t +
//   gamma v_{t+1}| + |d_t|)); it then combines the affine maps (d, c) along a tree, where a
//   term k steps away gets at most k - 1 roundings in its coefficient's product plus two
//   (a product and a sum) per composition level on its path: at most 8 within a thread, 5
//   across the warp, 8 across warps, 1 for the warp's input and 8 in the replay (30), and 21
//   more for each chunk boundary crossed (up to the chunk's carry). So
//   |A_t - ref| <= 1.5 (sum_k gl^k (e_d_{t+k} + u (k + 2 L) |d_{t+k}|)), L = 30 + 21 (chunks
//   - 1), element by element, and the return A_t + v_t one u more. Padding must be exactly 0.
// - the statistics: the count exact (and per block in the partials; the counter ends at B);
//   mean and unbiased variance within double rounding (64 n eps_f64 (mean^2 + var)) of a
//   two-pass f64 over the kernel's own advantages, and within the propagated advantage bounds
//   b_i of the reference's: mean by sum b_i / n, variance by (2 sum |a_i - mean| (b_i + b) +
//   sum (b_i + b)^2) / (n - 1), b the mean bound. No valid step: (0, 0, 0); one: variance 0.
// - group norm: (x - mean) / (sqrt(unbiased var) + eps) in double (group_normalize_reference),
//   rounded once to f32 by the kernel: |out - ref| <= u |ref| + 8 G eps_f64 (|ref| + (|x| +
//   |mean|) / denom), the kernel's own f64 sums in another order.
//
// Usage: gae [seed]  (a random seed when none is given; it is printed either way).
#include "emu_check.h"

#include "gae.cu"

namespace {

using emu_check::check;
using emu_check::within;

// src/kernels/cuda/gae.rs: STEPS_PER_THREAD, MAX_THREADS; THREADS of group_normalize.
constexpr int kSteps = 8;
constexpr int kLaunchMaxThreads = 256;
constexpr unsigned kGroupThreads = 256;
static_assert(kSteps == E && kLaunchMaxThreads == kMaxThreads, "gae: the launcher's constants");
constexpr double kU = 0x1p-24;
constexpr double kEpsD = 0x1p-52;

// scan_kernel() of src/kernels/cuda/gae.rs: the entry point and the threads per row.
struct Choice {
  bool vec4;
  int threads;
};
Choice scan_kernel(int T, const int (&offs)[3]) {
  bool vec4 = T % 4 == 0;
  for (int o : offs) vec4 &= o % 4 == 0;
  const int warps = std::clamp(((T + kSteps - 1) / kSteps + 31) / 32, 1, kLaunchMaxThreads / 32);
  return {vec4, warps * 32};
}

// n floats from `off` elements past a 256-byte aligned base (cudaMalloc's alignment).
struct Buf {
  std::vector<unsigned char> raw;
  float *p;
  Buf(size_t n, int off, float fill) : raw((n + off) * sizeof(float) + 256) {
    const uintptr_t a = (reinterpret_cast<uintptr_t>(raw.data()) + 255) & ~uintptr_t(255);
    p = reinterpret_cast<float *>(a) + off;
    std::fill(p, p + n, fill);
  }
};

// ---------------------------------------------------------------------------------------
// GAE.
// ---------------------------------------------------------------------------------------
struct ScanCase {
  int B, T;
  double gamma, lambda;
  int offs[3];  // start offsets of rewards, values, mask (elements)
};

// The mask of row i (see the header).
void make_mask(std::vector<float> &m, int i, int T, emu_check::Rng &rng) {
  auto below = [&](int n) { return std::min(n - 1, (int)(rng.uniform() * n)); };
  auto valid = [&] {
    const float u = rng.uniform();
    return u < 0.05f ? 0.5f : u < 0.1f ? 2.f : 1.f;
  };
  float *row = &m[(size_t)i * T];
  int len = 0;
  if (i == 0 || i == 3 || i == 4) len = T;
  else if (i == 1) len = 0;
  else if (i == 2) len = 1;
  else {
    switch (below(6)) {
      case 0: len = 0; break;
      case 1: len = T; break;
      case 2: len = std::min(T, below(T / 8 + 2)); break;
      default: len = below(T + 1);
    }
  }
  for (int j = 0; j < T; ++j) row[j] = j < len ? valid() : (j % 2 ? -0.f : 0.f);
  if (i == 3 || i == 4) {
    for (int b : {8, 256, 2048}) {
      const int j = i == 3 ? b : b - 1;
      if (j > 0 && j < T) row[j] = 0.f;
    }
  } else if (i > 4 && len > 2) {
    for (int h = 0; h < 1 + len / 50; ++h) row[below(len)] = -0.f;
  }
}

bool run_scan(const ScanCase &c, emu_check::Rng &rng) {
  const int B = c.B, T = c.T;
  const size_t n = (size_t)B * T;
  const Choice ch = scan_kernel(T, c.offs);
  char buf[160];
  std::snprintf(buf, sizeof buf, "B%d T%d g%.3g l%.3g %s%d", B, T, c.gamma, c.lambda,
                ch.vec4 ? "vec4 x" : "scalar x", ch.threads);
  const std::string what = buf;

  Buf r(n, c.offs[0], 0.f), v(n, c.offs[1], 0.f), m(n, c.offs[2], 0.f);
  std::vector<float> mask(n);
  for (int i = 0; i < B; ++i) make_mask(mask, i, T, rng);
  for (size_t k = 0; k < n; ++k) {
    m.p[k] = mask[k];
    const bool pad = mask[k] == 0.f;
    r.p[k] = pad ? NAN : rng.normal();
    v.p[k] = pad ? INFINITY : 2.f * rng.normal();
  }
  Buf adv(n, 0, NAN), ret(n, 0, NAN);
  std::vector<double> partials(3 * B, NAN), stats(3, NAN);
  unsigned counter = 0;

  const float gamma32 = (float)c.gamma, gl32 = gamma32 * (float)c.lambda;
  GaeParams p{};
  p.rewards = r.p;
  p.values = v.p;
  p.mask = m.p;
  p.adv = adv.p;
  p.ret = ret.p;
  p.partials = partials.data();
  p.counter = &counter;
  p.stats = stats.data();
  p.t = T;
  p.gamma = gamma32;
  p.gl = gl32;
  emu::launch({(unsigned)B, 1, 1}, {(unsigned)ch.threads, 1, 1}, 0,
              [&] { (ch.vec4 ? gae_scan_f32_vec4 : gae_scan_f32)(p); });

  // The reference, with its error bound (header).
  const double g = gamma32, gl = gl32;
  const int chunk = ch.threads * kSteps, nchunks = (T + chunk - 1) / chunk;
  const double L = 30 + 21 * (nchunks - 1);
  std::vector<double> wa(n, 0), wr(n, 0), ba(n, 0), br(n, 0), ga(n), gr(n);
  std::vector<double> got_pad, want_pad;  // padding: exactly 0
  std::vector<int> count_row(B, 0);
  for (int i = 0; i < B; ++i) {
    double next_v = 0, next_a = 0, s0 = 0, s1 = 0, ed = 0;
    bool next_valid = false;
    for (int j = T - 1; j >= 0; --j) {
      const size_t k = (size_t)i * T + j;
      ga[k] = adv.p[k];
      gr[k] = ret.p[k];
      if (mask[k] == 0.f) {
        next_v = next_a = 0;
        next_valid = false;
        got_pad.push_back(adv.p[k]);
        got_pad.push_back(ret.p[k]);
        want_pad.push_back(0);
        want_pad.push_back(0);
        continue;
      }
      const double gv = g * next_v, rg = r.p[k] + gv;
      const double d = rg - v.p[k];
      const double a = d + gl * next_a;
      const double e = kU * (std::fabs(gv) + std::fabs(rg) + std::fabs(d));
      // s0 = sum gl^k |d|, s1 = sum k gl^k |d|, ed = sum gl^k e_d over the episode's rest.
      s1 = next_valid ? gl * (s1 + s0) : 0;
      s0 = std::fabs(d) + (next_valid ? gl * s0 : 0);
      ed = e + (next_valid ? gl * ed : 0);
      wa[k] = a;
      wr[k] = a + v.p[k];
      ba[k] = 1.5 * (ed + kU * (s1 + 2 * L * s0));
      br[k] = ba[k] + 1.5 * kU * std::fabs(wr[k]);
      next_v = v.p[k];
      next_a = a;
      next_valid = true;
      ++count_row[i];
    }
  }
  // Compare valid positions by the bound, padding exactly.
  std::vector<double> gav, wav, bav, grv, wrv, brv;
  for (size_t k = 0; k < n; ++k) {
    if (mask[k] == 0.f) continue;
    gav.push_back(ga[k]);
    wav.push_back(wa[k]);
    bav.push_back(ba[k]);
    grv.push_back(gr[k]);
    wrv.push_back(wr[k]);
    brv.push_back(br[k]);
  }
  bool ok = within(what + " advantages", gav, wav, bav);
  ok &= within(what + " returns", grv, wrv, brv);
  ok &= emu_check::exact(what + " padding (adv, ret) exactly 0", got_pad, want_pad);

  // Statistics.
  size_t cnt = 0;
  bool part_ok = true;
  for (int i = 0; i < B; ++i) {
    cnt += count_row[i];
    part_ok &= partials[3 * i] == count_row[i];
  }
  ok &= check(what + " partial counts and counter", part_ok && counter == (unsigned)B);
  ok &= check(what + " count", stats[0] == (double)cnt, "(%zu: %.17g)", cnt, stats[0]);
  if (cnt == 0) {
    ok &= check(what + " mean, var of no valid step are 0", stats[1] == 0 && stats[2] == 0);
    return ok;
  }
  auto two_pass = [&](const std::vector<double> &a) {
    double s = 0;
    for (double x : a) s += x;
    const double mean = s / a.size();
    double q = 0;
    for (double x : a) q += (x - mean) * (x - mean);
    return std::make_pair(mean, a.size() > 1 ? q / (a.size() - 1) : 0.0);
  };
  const auto [own_mean, own_var] = two_pass(gav);
  const auto [ref_mean, ref_var] = two_pass(wav);
  const double nd = (double)cnt;
  const double dbl = 64 * nd * kEpsD * (own_mean * own_mean + own_var);
  ok &= within(what + " mean (of its own advantages)", {stats[1]}, {own_mean},
               {dbl / std::max(std::fabs(own_mean) + std::sqrt(own_var), 1e-300) + 1e-300});
  ok &= within(what + " var (of its own advantages)", {stats[2]}, {own_var}, {dbl + 1e-300});
  double bsum = 0;
  for (double b : bav) bsum += b;
  const double bmean = bsum / nd;
  double vb = 0;
  for (size_t k = 0; k < wav.size(); ++k)
    vb += 2 * std::fabs(wav[k] - ref_mean) * (bav[k] + bmean) + (bav[k] + bmean) * (bav[k] + bmean);
  vb = cnt > 1 ? vb / (nd - 1) : 0;
  ok &= within(what + " mean", {stats[1]}, {ref_mean}, {bmean + dbl});
  ok &= within(what + " var", {stats[2]}, {ref_var}, {vb + dbl});
  if (cnt == 1) ok &= check(what + " var of one valid step is 0", stats[2] == 0);
  return ok;
}

// ---------------------------------------------------------------------------------------
// GRPO group normalisation.
// ---------------------------------------------------------------------------------------
struct GroupCase {
  int n_groups, group;
  double eps;
  float offset;     // rewards offset + N(0, 1)
  int constant;     // this group is constant (-1: none)
};

bool run_group(const GroupCase &c, emu_check::Rng &rng) {
  const size_t n = (size_t)c.n_groups * c.group;
  char buf[160];
  std::snprintf(buf, sizeof buf, "group norm %dx%d eps %g%s", c.n_groups, c.group, c.eps,
                c.offset != 0 ? " offset" : "");
  const std::string what = buf;
  std::vector<float> x(n), out(n, NAN);
  for (auto &e : x) e = c.offset + rng.normal();
  if (c.constant >= 0)
    for (int j = 0; j < c.group; ++j) x[(size_t)c.constant * c.group + j] = 0.75f;
  GaeParams p{};
  p.rewards = x.data();
  p.out = out.data();
  p.n_groups = c.n_groups;
  p.group = c.group;
  p.eps = c.eps;
  // launch_1d(groups * 32, THREADS).
  const unsigned grid = std::max<unsigned>(1, (unsigned)((n / c.group * 32 + kGroupThreads - 1) /
                                                         kGroupThreads));
  emu::launch({grid, 1, 1}, {kGroupThreads, 1, 1}, 0, [&] { grpo_group_norm_f32(p); });

  std::vector<double> got(out.begin(), out.end()), want(n), bound(n);
  for (int gi = 0; gi < c.n_groups; ++gi) {
    const float *xs = &x[(size_t)gi * c.group];
    double s = 0;
    for (int j = 0; j < c.group; ++j) s += xs[j];
    const double mean = s / c.group;
    double q = 0;
    for (int j = 0; j < c.group; ++j) q += (xs[j] - mean) * (xs[j] - mean);
    const double var = c.group > 1 ? q / (c.group - 1) : 0.0;
    const double denom = std::sqrt(var) + c.eps;
    for (int j = 0; j < c.group; ++j) {
      const size_t k = (size_t)gi * c.group + j;
      want[k] = (xs[j] - mean) / denom;
      bound[k] = kU * std::fabs(want[k]) +
                 8 * c.group * kEpsD *
                     (std::fabs(want[k]) + (std::fabs(xs[j]) + std::fabs(mean)) / denom);
    }
  }
  bool ok = within(what, got, want, bound);
  if (c.constant >= 0 || c.group == 1) {
    bool zero = true;
    for (int gi = 0; gi < c.n_groups; ++gi)
      if (gi == c.constant || c.group == 1)
        for (int j = 0; j < c.group; ++j) zero &= got[(size_t)gi * c.group + j] == 0;
    ok &= check(what + " constant group exactly 0", zero);
  }
  return ok;
}

}  // namespace

int main(int argc, char **argv) {
  emu_check::Rng rng(emu_check::seed(argc, argv));
  bool ok = true;
  const double gl_pairs[][2] = {{0.99, 0.95}, {0.9, 0.9}, {0.97, 0.92}};
  int k = 0;
  for (int B : {1, 3, 33})
    for (int T : {1, 7, 130, 1000}) {
      const auto &gp = gl_pairs[k++ % 3];
      ok &= run_scan({B, T, gp[0], gp[1], {0, 4, 8}}, rng);
    }
  const ScanCase more[] = {
      {3, 1000, 0.99, 0.95, {0, 0, 1}},   // the scalar form of T % 4 == 0 (mask off by one)
      {5, 2048, 0.97, 0.92, {0, 0, 0}},   // one full chunk of 256 threads
      {2, 2048, 0.97, 0.92, {1, 0, 0}},
      {5, 2049, 0.99, 0.95, {0, 0, 0}},   // two chunks, the left one with one step
      {5, 4100, 0.9, 0.9, {0, 4, 0}},     // three chunks, vec4
      {3, 4100, 0.99, 0.95, {0, 1, 0}},   // three chunks, scalar
      {6, 5003, 0.97, 0.92, {0, 0, 0}},
      {1, 5003, 0.99, 0.95, {0, 0, 0}},
      {3, 130, 1.0, 1.0, {0, 0, 0}},      // gamma = lambda = 1: a suffix sum
  };
  for (const ScanCase &c : more) ok &= run_scan(c, rng);
  const GroupCase groups[] = {
      {1, 1, 1e-6, 0.f, -1},  {3, 7, 1e-4, 0.f, -1},      {9, 33, 1e-6, 0.f, -1},
      {5, 64, 1e-4, 0.f, 2},  {17, 100, 1e-6, 1000.f, -1}, {2, 1000, 0.0, 0.f, -1},
      {8, 32, 0.0, 0.f, -1},
  };
  for (const GroupCase &c : groups) ok &= run_group(c, rng);
  return emu_check::finish(ok);
}
