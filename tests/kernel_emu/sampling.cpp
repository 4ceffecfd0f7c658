// The sampling kernels (kernels/sample.cu) and the decode step's state kernels
// (kernels/decode_step.cu) run in the CPU emulator (cuda_emu.h) against references written
// here from src/kernels/sample.rs and src/kernels/decode_step.rs, with the launches of
// src/kernels/cuda/sample.rs and src/kernels/cuda/decode_step.rs.
//
// Sampling, on fresh random logits (f32, bf16, f16; vocabularies 1, 3, 37, 256, 264, 1000,
// 50257; batches off multiples of 8; rows whose largest logit repeats, in one thread's stride
// and across warps; a hold mask off a 16-byte boundary):
// - greedy: the first index of the largest (held) logit, exactly;
// - sampled: every token is kept (weight > 0, in the top-k set exactly, in the top-p nucleus
//   computed in f64), and equals the reference's draw with the same uniform over the same
//   CDF, except where the uniform falls within the f32 rounding of the kernel's sums of a
//   bucket edge (or the nucleus mass within rounding of its goal): those are counted;
// - keys chosen (by inverting splitmix64) so that u = 0 and u = 1 - 2^-24 exactly, and a row
//   built so that rounding sends the draw to the kernel's fallback (the last kept token);
// - stop ids held back (the `hold` mask) on the last draw below `hold_until`, and not on the
//   first at it; every token held (token 0, greedy or drawn); the draw index read from the
//   device (`pos_at`);
// - the distribution of many draws of one row, against its softmax (chi-square);
// - min-p, and the repetition penalty over a seen mask (each row's largest logit among the
//   seen, penalties above and below 1): the reference sees the penalised logits, and every
//   row's drawn token, and nothing else, is marked in the mask.
// Decode step: kv_write_b2/b4 at positions inside, at and past the capacity (and negative),
// into a cache at an offset; qkv_write_<dtype> the same way (q and both caches, GQA, rotated
// or not, with Qwen3's per-head RMSNorm of q and k or without);
// advance_step (the step's tail); and a short run of fixed decode
// steps (static_step.rs's order) that feeds the draw index from `step` to the sampler. Every
// buffer is compared whole, with room around what the kernel may write.
// Checks that are not numeric comparisons print a line each through emu_check::check.
//
// Usage: sampling [seed]  (a random seed when none is given; it is printed either way).
#include "emu_check.h"

#include "sample.cu"
#include "decode_step.cu"

namespace {

using bf16 = __nv_bfloat16;

using emu_check::check;

// ---------------------------------------------------------------------------------------
// The reference: src/kernels/sample.rs, step for step.
// ---------------------------------------------------------------------------------------
using emu_check::splitmix64;
uint64_t row_key(uint64_t seed, uint64_t row) { return splitmix64(seed ^ splitmix64(row)); }
float uniform_ref(uint64_t key, uint64_t pos) {
  const uint64_t bits = splitmix64(key ^ splitmix64(pos + 0x5A3B));
  return (float)(bits >> 40) * (1.0f / 16777216.0f);
}

// A key whose uniform at `pos` is exactly u24 / 2^24: splitmix64 is a bijection, undone step
// by step (xorshifts by their fixed point, the multiplications by their inverses mod 2^64).
uint64_t unxorshift(uint64_t y, int s) {
  uint64_t z = y;
  for (int i = 0; i < 64 / s + 1; ++i) z = y ^ (z >> s);
  return z;
}
uint64_t inverse_odd(uint64_t c) {
  uint64_t x = c;
  for (int i = 0; i < 6; ++i) x *= 2 - c * x;
  return x;
}
uint64_t key_for_uniform(uint32_t u24, uint64_t pos) {
  uint64_t z = (uint64_t)u24 << 40 | 0x123456789Aull;
  z = unxorshift(z, 31) * inverse_odd(0x94D049BB133111EBull);
  z = unxorshift(z, 27) * inverse_odd(0xBF58476D1CE4E5B9ull);
  z = unxorshift(z, 30) - 0x9E3779B97F4A7C15ull;
  const uint64_t key = z ^ splitmix64(pos + 0x5A3B);
  if (uniform_ref(key, pos) != (float)u24 / 16777216.f) {
    std::fprintf(stderr, "key_for_uniform: the inverse of splitmix64 is wrong\n");
    std::exit(2);
  }
  return key;
}

// SampleParams of src/kernels/sample.rs.
struct Sampling {
  float temperature;  // <= 0: greedy
  int top_k;          // 0: none
  float top_p;        // 1: none
  float min_p = 0.f;    // 0: none
  float penalty = 1.f;  // repetition penalty over the seen mask; 1: none
  bool greedy() const { return temperature <= 0.f; }
  bool filters_top_k(int v) const { return top_k > 0 && top_k < v; }
  bool filters_top_p() const { return top_p < 1.f; }
};

uint32_t argmax_ref(const float *z, int v) {
  int best = 0;
  for (int i = 0; i < v; ++i)
    if (z[i] > z[best]) best = i;
  return (uint32_t)best;
}

std::vector<float> weights_ref(const float *z, int v, float temperature) {
  float mx = -INFINITY;
  for (int i = 0; i < v; ++i) mx = std::fmax(mx, z[i]);  // f32::max
  const float inv_t = 1.f / temperature;
  std::vector<float> w(v);
  for (int i = 0; i < v; ++i) w[i] = std::exp((z[i] - mx) * inv_t);  // f32 exp, as Rust's
  return w;
}

template <typename F> float largest_threshold(F holds) {
  uint32_t lo = 0, hi = __float_as_uint(1.f) + 1;
  while (hi - lo > 1) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (holds(__uint_as_float(mid))) lo = mid; else hi = mid;
  }
  return __uint_as_float(lo);
}

double mass_above(const std::vector<float> &w, float t) {
  double s = 0;
  for (float x : w)
    if (x >= t) s += x;
  return s;
}

struct Thresholds {
  float tk = 0.f;   // top-k threshold (exact: a count)
  float t = 0.f;    // final threshold, nucleus mass in f64 (keep_threshold)
  float loose = 0;  // the same with the nucleus goal raised by `slack`: the lowest threshold
                    // a kernel that sums the mass in f32 may land on
};

// keep_threshold, and the same with a looser nucleus goal.
Thresholds keep_threshold(const std::vector<float> &w, const Sampling &s, double slack) {
  Thresholds th;
  if (s.filters_top_k((int)w.size())) {
    const size_t k = s.top_k;
    th.tk = largest_threshold([&](float x) {
      size_t c = 0;
      for (float y : w) c += y >= x;
      return c >= k;
    });
  }
  th.t = th.loose = th.tk;
  if (s.filters_top_p()) {
    const double goal = (double)s.top_p * mass_above(w, th.tk);
    const float tk = th.tk;
    auto nucleus = [&](double g) {
      const float t =
          largest_threshold([&](float x) { return mass_above(w, std::fmax(x, tk)) >= g; });
      return std::fmax(t, tk);
    };
    th.t = nucleus(goal);
    th.loose = nucleus(goal * (1 + slack));
  }
  if (s.min_p > 0.f) th.t = std::fmax(th.t, s.min_p), th.loose = std::fmax(th.loose, s.min_p);
  return th;
}

// sample_row after the thresholds: the first kept index whose running mass exceeds u * mass.
uint32_t draw_ref(const std::vector<float> &w, float t, float u) {
  const double target = (double)u * mass_above(w, t);
  double acc = 0;
  size_t last = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    if (w[i] >= t && w[i] > 0.f) {
      acc += w[i];
      last = i;
      if (acc > target) return (uint32_t)i;
    }
  }
  return (uint32_t)last;
}

// ---------------------------------------------------------------------------------------
// The launch of src/kernels/cuda/sample.rs (launch_t).
// ---------------------------------------------------------------------------------------
void sample_entry(const float *, const SampleParams &p) { sample_f32(p); }
void sample_entry(const bf16 *, const SampleParams &p) { sample_bf16(p); }
void sample_entry(const __half *, const SampleParams &p) { sample_f16(p); }

struct Draw {
  uint64_t at = 0;                    // Draw::At
  const long long *device = nullptr;  // Draw::Device: the draw index on the device
};
struct Hold {
  const std::vector<float> *mask = nullptr;  // [V]: 0 or -inf
  uint64_t until = 0;
  bool misaligned = false;  // handed to the kernel 4 bytes past a 16-byte boundary
};

// `logits` holds B rows `ld` elements apart (`ld` 0: V, rows back to back).
template <typename T>
std::vector<uint32_t> run_sample(const std::vector<T> &logits, int b, int v,
                                 const std::vector<long long> &keys, Draw draw, Hold hold,
                                 const Sampling &s, unsigned char *seen = nullptr, int ld = 0) {
  std::vector<uint32_t> out(b, 0xDEADBEEFu);  // poisoned: a row nobody writes shows
  if (b == 0) return out;
  SampleParams p{};
  p.logits = logits.data();
  p.keys = keys.data();
  p.out = out.data();
  p.pos = draw.device ? 0 : draw.at;
  p.pos_at = draw.device;
  std::vector<float> shifted;  // the mask one float into a buffer: off 16-byte alignment
  if (hold.mask && hold.misaligned) {
    shifted.assign(hold.mask->size() + 4, 0.f);
    std::copy(hold.mask->begin(), hold.mask->end(), shifted.begin() + 1);
  }
  p.hold = !hold.mask ? nullptr : hold.misaligned ? shifted.data() + 1 : hold.mask->data();
  p.hold_until = hold.mask ? hold.until : 0;
  p.b = b;
  p.v = v;
  p.top_k = std::min(s.top_k, v);
  p.inv_temp = s.greedy() ? 0.f : 1.f / s.temperature;
  p.top_p = s.top_p;
  p.greedy = s.greedy() ? 1 : 0;
  p.seen = seen;
  p.min_p = s.min_p;
  p.penalty = s.penalty;
  p.ld = ld ? ld : v;
  emu::launch({(unsigned)b, 1, 1}, {512, 1, 1}, 0, [&] { sample_entry(logits.data(), p); });
  return out;
}

template <typename T> T from_float(float x) { return emu_check::Dt<T>::from(x); }
template <typename T> float as_float(T x) { return (float)emu_check::value(x); }

// ---------------------------------------------------------------------------------------
// Cases.
// ---------------------------------------------------------------------------------------
enum class DType { F32, BF16, F16 };

// What a case's rows carry beyond random logits.
enum Flags : unsigned {
  kTies = 1,      // the row's largest logit repeats: in one thread's stride, across warps, last
  kHeld = 2,      // stop ids held back: the draw index is hold_until - 1 (the last draw held)
  kExpired = 4,   // stop ids not held: the draw index is hold_until (the first draw not held)
  kAllHeld = 8,   // every token held back (greedy: token 0)
  kPosAt = 16,    // the draw index read through pos_at (Draw::Device)
  kUEnds = 32,    // rows 0 and 1 drawn with u = 0 and u = 1 - 2^-24
  kUTop = 64,     // row 0 drawn with u = 0, every other row with u = 1 - 2^-24
  kSeen = 128,    // a seen mask (an eighth of the tokens and each row's largest logit) that
                  // the penalty reads and the kernel marks
  kPadded = 256,  // rows a multiple of 8 elements apart and at least 8 more than V (as
                  // generation's padded LM head writes them), the padding a logit larger than
                  // any row's: read, it would be drawn
  kMisHold = 512,  // the hold mask off a 16-byte boundary: the kernel must read it by scalars
  kSparse = 1024,  // every logit -inf but seven: fewer positive weights than top-k keeps
};

struct Case {
  const char *name;
  DType dt;
  int b, v;
  float sigma;  // logits ~ sigma * N(0, 1)
  Sampling s;
  unsigned flags;
  bool has(unsigned f) const { return (flags & f) != 0; }
};

template <typename T> struct Inputs {
  std::vector<T> logits;
  std::vector<float> z;  // the logits the reference sees: as f32, plus the hold mask if it applies
  std::vector<float> mask;
  std::vector<unsigned char> seen, seen_before;  // [B, V] with kSeen, else empty
  std::vector<long long> keys;
  std::vector<float> u;
  long long step[2];  // the device's draw index: step[1]
  uint64_t pos, until;
  bool held;
};

template <typename T> Inputs<T> make_inputs(const Case &c, emu_check::Rng &rng) {
  Inputs<T> in;
  const int v = c.v;
  in.logits.resize((size_t)c.b * v);
  for (auto &x : in.logits) x = from_float<T>(c.sigma * rng.normal());
  in.pos = 3 + rng.gen() % 1000;
  // Stop ids: the first, the last and a few more; in even rows the largest logit sits on one.
  std::vector<int> stops = {0, v - 1, v / 3, (int)(rng.gen() % v)};
  if (c.has(kHeld | kExpired | kAllHeld)) {
    in.mask.assign(v, c.has(kAllHeld) ? -INFINITY : 0.f);
    for (int id : stops) in.mask[id] = -INFINITY;
    // At the boundary: the last draw held back, or the first one not.
    in.until = c.has(kExpired) ? in.pos : in.pos + 1;
  }
  for (int r = 0; r < c.b; ++r) {
    T *row = &in.logits[(size_t)r * v];
    float mx = -INFINITY;
    for (int i = 0; i < v; ++i) mx = std::max(mx, as_float(row[i]));
    const T top = from_float<T>(mx + 0.75f);
    if (c.has(kTies)) {
      // Several copies of a new largest value: two in one thread's stride (i, i + 512), one
      // in another warp, the last index; ties go to the first.
      const int a = (int)(rng.gen() % v);
      for (int i : {a, (a + 512) % v, (a + 7 * 32 + 5) % v, v - 1}) row[i] = top;
    }
    if (c.has(kHeld | kExpired) && r % 2 == 0)
      row[stops[r / 2 % stops.size()]] = from_float<T>(mx + 2.f);
    if (c.has(kSparse)) {
      std::vector<T> few;
      std::vector<int> at;
      for (int j = 0; j < 7; ++j) {
        at.push_back((int)(rng.gen() % v));
        few.push_back(row[at.back()]);
      }
      for (int i = 0; i < v; ++i) row[i] = from_float<T>(-INFINITY);
      for (int j = 0; j < 7; ++j) row[at[j]] = few[j];
    }
  }
  in.held = !in.mask.empty() && in.pos < in.until;
  if (c.has(kSeen)) {
    in.seen.resize(in.logits.size());
    for (auto &x : in.seen) x = rng.gen() % 8 == 0;
    for (int r = 0; r < c.b; ++r) {
      int top = 0;
      for (int i = 1; i < v; ++i)
        if (as_float(in.logits[(size_t)r * v + i]) > as_float(in.logits[(size_t)r * v + top])) top = i;
      in.seen[(size_t)r * v + top] = 1;
    }
    in.seen_before = in.seen;
  }
  in.z.resize(in.logits.size());
  for (size_t i = 0; i < in.z.size(); ++i) {
    in.z[i] = as_float(in.logits[i]);
    if (in.held) in.z[i] += in.mask[i % v];
    // The reference's penalty: f32 ops, as the kernel's IEEE-rounded ones.
    if (!in.seen.empty() && in.seen[i] && c.s.penalty != 1.f)
      in.z[i] = in.z[i] < 0.f ? in.z[i] * c.s.penalty : in.z[i] / c.s.penalty;
  }
  const uint64_t seed = rng.gen();
  for (int r = 0; r < c.b; ++r) {
    uint64_t key = row_key(seed, (uint64_t)r * 7 + 3);
    if ((c.has(kUEnds) && r < 2) || c.has(kUTop))
      key = key_for_uniform(r == 0 ? 0u : 0xFFFFFFu, in.pos);
    in.keys.push_back((long long)key);
    in.u.push_back(uniform_ref(key, in.pos));
  }
  in.step[0] = 17;
  in.step[1] = (long long)in.pos;
  return in;
}

template <typename T> std::vector<uint32_t> launch_case(const Case &c, Inputs<T> &in) {
  Draw draw;
  if (c.has(kPosAt)) draw.device = &in.step[1]; else draw.at = in.pos;
  Hold hold;
  if (!in.mask.empty()) hold = {&in.mask, in.until, c.has(kMisHold)};
  unsigned char *seen = in.seen.empty() ? nullptr : in.seen.data();
  if (!c.has(kPadded)) return run_sample(in.logits, c.b, c.v, in.keys, draw, hold, c.s, seen);
  const int ld = (c.v + 7) / 8 * 8 + 8;
  std::vector<T> padded((size_t)c.b * ld, from_float<T>(30000.f));
  for (int r = 0; r < c.b; ++r)
    std::copy_n(&in.logits[(size_t)r * c.v], c.v, &padded[(size_t)r * ld]);
  return run_sample(padded, c.b, c.v, in.keys, draw, hold, c.s, seen, ld);
}

// With kSeen: the mask afterwards is the mask before with each row's drawn token set.
template <typename T>
bool check_marked(const Case &c, const Inputs<T> &in, const std::vector<uint32_t> &got) {
  if (!c.has(kSeen)) return true;
  std::vector<unsigned char> want = in.seen_before;
  for (int r = 0; r < c.b; ++r)
    if (got[r] < (uint32_t)c.v) want[(size_t)r * c.v + got[r]] = 1;
  int wrong = 0;
  for (size_t i = 0; i < want.size(); ++i) wrong += want[i] != in.seen[i];
  return check(std::string(c.name) + " seen marked", wrong == 0, "%d of %zu mask bytes wrong",
               wrong, want.size());
}

// Greedy: the argmax of every (held) row, exactly.
template <typename T> bool check_greedy(const Case &c, emu_check::Rng &rng) {
  Inputs<T> in = make_inputs<T>(c, rng);
  const std::vector<uint32_t> got = launch_case(c, in);
  std::vector<float> ids(c.b);
  std::vector<double> want(c.b);
  for (int r = 0; r < c.b; ++r) {
    ids[r] = got[r] == 0xDEADBEEFu ? NAN : (float)got[r];
    want[r] = argmax_ref(&in.z[(size_t)r * c.v], c.v);
  }
  bool ok = emu_check::close_abs(std::string(c.name) + " ids", ids, want, 0);
  return check_marked(c, in, got) && ok;
}

// Rounding of the kernel's f32 sums (the running mass at a token, and u times the kept mass)
// relative to the kept mass: at most (additions on the longest path) * 2^-24 (the standard
// bound for recursive summation). The kernel's longest path: a lane's 8 entries, a warp's 5
// tree levels (a chunk's mass), the chunks' scan (5 levels, one carry per 32 chunks before),
// the chosen chunk's lane scan (5) and the lane's walk (8), the product with u: under
// 40 + V / 8192. The nucleus mass (per thread 8 entries of each of its ceil(V / 4096) chunk
// rounds, 5 + 4 tree levels) is 8 ceil(V / 4096) + 9, under 17 + V / 512. The bound below
// covers both.
double rounding(int v) {
  const double per_512 = (v + 511) / 512;
  return (2 * per_512 + 40) * std::ldexp(1.0, -24);
}

struct Verdict {
  int kept_bad = 0, in_nucleus = 0, nucleus_edge = 0;
  int exact = 0, bucket_edge = 0, draw_bad = 0;
  std::string kept_why, draw_why;  // the first row of each kind that failed
};

// One row of a sampled case: kept, and the reference's draw up to rounding.
void judge_row(const Case &c, const float *z, float u, uint32_t got, int r, Verdict &vd) {
  const int v = c.v;
  char buf[256];
  if (got >= (uint32_t)v) {
    ++vd.kept_bad;
    std::snprintf(buf, sizeof buf, "row %d: id %u out of range", r, got);
    if (vd.kept_why.empty()) vd.kept_why = buf;
    return;
  }
  const std::vector<float> w = weights_ref(z, v, c.s.temperature);
  // The kernel compares one f32 tree sum with top_p times another: both sides round.
  const double slack = rounding(v) * 4;
  const Thresholds th = keep_threshold(w, c.s, slack);
  const float x = w[got];
  // Top-k is a count: exact. The nucleus may end one tie group lower where its mass is within
  // rounding of the goal.
  if (!(x > 0.f && x >= th.tk && x >= th.loose)) {
    ++vd.kept_bad;
    std::snprintf(buf, sizeof buf, "row %d: id %u (w %.6g) not kept: top-k t %.6g, top-p t %.6g", r,
                  got, x, th.tk, th.t);
    if (vd.kept_why.empty()) vd.kept_why = buf;
    return;
  }
  if (x >= th.t) ++vd.in_nucleus; else ++vd.nucleus_edge;
  const uint32_t want = draw_ref(w, th.t, u);
  if (got == want) {
    ++vd.exact;
    return;
  }
  if (th.loose != th.t) {
    // The nucleus mass is within rounding of its goal: the kernel's kept set may be larger
    // than the reference's, and its CDF with it; kept-ness was checked above.
    ++vd.bucket_edge;
    return;
  }
  // A different bucket: only where u * mass is within rounding of the edge between them.
  double before = 0, mass = mass_above(w, th.t);
  for (uint32_t i = 0; i < got; ++i)
    if (w[i] >= th.t && w[i] > 0.f) before += w[i];
  const double after = before + x, target = (double)u * mass, eps = rounding(v) * mass;
  if (before - eps <= target && target <= after + eps) {
    ++vd.bucket_edge;
    return;
  }
  ++vd.draw_bad;
  std::snprintf(buf, sizeof buf,
                "row %d: id %u vs reference %u, u %.8f: target %.9g outside [%.9g, %.9g]", r, got,
                want, u, target, before, after);
  if (vd.draw_why.empty()) vd.draw_why = buf;
}

// A sampled case on given inputs: two lines, kept and draw; `draws` gets the ids.
template <typename T>
bool check_rows(const Case &c, Inputs<T> &in, std::vector<uint32_t> *draws = nullptr) {
  const std::vector<uint32_t> got = launch_case(c, in);
  Verdict vd;
  for (int r = 0; r < c.b; ++r) judge_row(c, &in.z[(size_t)r * c.v], in.u[r], got[r], r, vd);
  if (draws) *draws = got;
  const std::string name = c.name;
  bool ok = check_marked(c, in, got);
  ok &= check(name + " kept", vd.kept_bad == 0,
                   "%d rows: %d in the f64 nucleus, %d within rounding of its edge%s%s", c.b,
                   vd.in_nucleus, vd.nucleus_edge, vd.kept_bad ? "; " : "", vd.kept_why.c_str());
  // Rows whose token is not kept failed above and have no draw verdict.
  ok &= check(name + " draw", vd.draw_bad == 0,
               "%d rows: %d the reference's, %d at a bucket edge within rounding%s%s", c.b,
               vd.exact, vd.bucket_edge, vd.draw_bad ? "; " : "", vd.draw_why.c_str());
  return ok;
}

template <typename T> bool check_sampled(const Case &c, emu_check::Rng &rng) {
  Inputs<T> in = make_inputs<T>(c, rng);
  return check_rows(c, in);
}

// Many draws of one row (one key per row of the batch): their histogram against the row's
// softmax at the temperature, by Pearson's chi-square over bins of expected count >= 5 (the
// least likely tokens pooled). The bound is the chi-square quantile at p = 1e-5 (Wilson-Hilferty
// approximation), so a correct kernel fails about once in 10^5 seeds.
template <typename T> bool check_distribution(const Case &c, emu_check::Rng &rng) {
  Inputs<T> in = make_inputs<T>(c, rng);
  for (int r = 1; r < c.b; ++r)  // every row the same logits (and seen mask), its own key
    for (int i = 0; i < c.v; ++i) {
      in.logits[(size_t)r * c.v + i] = in.logits[i];
      in.z[(size_t)r * c.v + i] = in.z[i];
      if (!in.seen.empty()) in.seen[(size_t)r * c.v + i] = in.seen_before[(size_t)r * c.v + i] = in.seen[i];
    }
  std::vector<uint32_t> got;
  bool ok = check_rows(c, in, &got);
  const std::vector<float> w = weights_ref(in.z.data(), c.v, c.s.temperature);
  double total = 0;
  for (float x : w) total += x;
  std::vector<int> order(c.v);
  for (int i = 0; i < c.v; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](int a, int b) { return w[a] > w[b]; });
  std::vector<double> expect;
  std::vector<int> bin_of(c.v);
  double e = 0;
  for (int i : order) {
    e += c.b * (double)w[i] / total;
    bin_of[i] = (int)expect.size();
    if (e >= 5) expect.push_back(e), e = 0;
  }
  if (e > 0) {  // the tail joins the last full bin
    if (expect.empty()) expect.push_back(0);
    expect.back() += e;
    for (int i : order)
      if (bin_of[i] == (int)expect.size()) bin_of[i] = (int)expect.size() - 1;
  }
  std::vector<double> count(expect.size(), 0);
  for (uint32_t id : got)
    if (id < (uint32_t)c.v) count[bin_of[id]] += 1;
  double chi2 = 0;
  for (size_t k = 0; k < expect.size(); ++k)
    chi2 += (count[k] - expect[k]) * (count[k] - expect[k]) / expect[k];
  const double df = (double)expect.size() - 1, zq = 4.265;  // z at 1 - 1e-5
  const double a = 2 / (9 * df), bound = df * std::pow(1 - a + zq * std::sqrt(a), 3);
  ok &= check(std::string(c.name) + " chi2", chi2 <= bound,
               "%.2f over %d bins of %d draws (bound %.2f)", chi2, (int)expect.size(), c.b, bound);
  return ok;
}

// The kernel's fallback, the last kept token where rounding leaves u * mass at or past the
// running mass: a row of weight 1 at index 0, ~2^-30 at every other index and 0 (logit -200)
// at the last 8, drawn at u = 0 and u = 1 - 2^-24. The f32 sums lose the small weights in
// different places: the scan's running mass ends a few ulps below the tree's mass, so that
// u * mass (one ulp below it) is never exceeded and the fallback must pick index 991, not a
// zero weight after it. (The reference's f64 draw lands ~64 tiny buckets earlier: within the
// rounding bound, so the row counts as a bucket edge.) Checked: with the fallback made to
// write an invalid id, this row fails.
bool check_fallback(emu_check::Rng &rng) {
  const Case c{"fallback f32 V1000 u->1", DType::F32, 2, 1000, 1.f, {1.f, 0, 1.f}, kUTop};
  Inputs<float> in = make_inputs<float>(c, rng);
  for (int r = 0; r < c.b; ++r)
    for (int i = 0; i < c.v; ++i) {
      const float z = i == 0 ? 0.f : i >= c.v - 8 ? -200.f : -30.f * 0.69314718f;
      in.logits[(size_t)r * c.v + i] = in.z[(size_t)r * c.v + i] = z;
    }
  return check_rows(c, in);
}

// ---------------------------------------------------------------------------------------
// Decode step: the launches of src/kernels/cuda/decode_step.rs (`run`: launch_1d(n, 256),
// nothing when n = 0) and the CPU ops of src/kernels/decode_step.rs.
// ---------------------------------------------------------------------------------------
void run_decode(void (*kernel)(const DecodeParams), long long n, const DecodeParams &p) {
  if (n == 0) return;
  const unsigned grid = (unsigned)std::max<long long>(1, (n + 255) / 256);
  emu::launch({grid, 1, 1}, {256, 1, 1}, 0, [&] { kernel(p); });
}

// `position` of decode_step.rs: step[0] when it lies in 0..cap.
bool position(const long long *step, int cap, int &pos) {
  if (step[0] < 0 || step[0] >= cap) return false;
  pos = (int)step[0];
  return true;
}

// kv_write into a cache [b, h, cap, d] that starts `offset` elements into its buffer (the
// launcher adds the layout's start offset to the pointer); the whole buffer is compared, with
// a row of positions past the cache and the offset before it, where nothing may be written.
template <typename U, typename T>
bool check_kv_write(const char *name, int b, int h, int cap, int d, long long len, size_t offset,
                    emu_check::Rng &rng) {
  const size_t rows = (size_t)b * h, n = rows * d;
  // Past the cache, a whole row of positions more: a stray write there shows.
  std::vector<T> buf(offset + (rows + 1) * cap * d), src(n);
  for (auto &x : buf) x = from_float<T>(rng.normal());
  for (auto &x : src) x = from_float<T>(rng.normal());
  std::vector<double> want(buf.size());
  for (size_t i = 0; i < buf.size(); ++i) want[i] = as_float(buf[i]);
  const long long step[2] = {len, 99};
  int pos;
  if (position(step, cap, pos))
    for (size_t r = 0; r < rows; ++r)
      for (int c = 0; c < d; ++c) want[offset + (r * cap + pos) * d + c] = as_float(src[r * d + c]);
  DecodeParams p{};
  p.dst = buf.data() + offset;
  p.src = src.data();
  p.step = step;
  p.n = (long long)n;
  p.cap = cap;
  p.d = d;
  run_decode(sizeof(U) == 2 ? kv_write_b2 : kv_write_b4, p.n, p);
  char what[96];
  std::snprintf(what, sizeof what, "%s L=%lld", name, len);
  return emu_check::close_abs(what, buf, want, 0);
}

// qkv_write: y [b, hq d + 2 hkv d] (q, k, v) split into q [b, hq d] and position L of the
// key and value caches [b, hkv, cap, d], each cache `offset` elements into its buffer (the
// launcher's start offset); with `norm`, each q and k head first RMS-normalised with its own
// gains [d] as rmsnorm.cu computes it (f32 sum of squares in order, (x * r) * g, rounded to
// T); with `rope`, q and k then rotated by tables [b, d / 2] as rope.cu rotates (in f32,
// rounded once). Every buffer is compared whole, with room past what the kernel may write (a
// row of positions past each cache, one element past q).
void qkv_entry(const float *, const DecodeParams &p) { qkv_write_f32(p); }
void qkv_entry(const bf16 *, const DecodeParams &p) { qkv_write_bf16(p); }
void qkv_entry(const __half *, const DecodeParams &p) { qkv_write_f16(p); }

template <typename T>
bool check_qkv_write(const char *name, int b, int hq, int hkv, int cap, int d, long long len,
                     size_t offset, bool rope, emu_check::Rng &rng, bool norm = false) {
  const size_t nq = (size_t)hq * d, nkv = (size_t)hkv * d, width = nq + 2 * nkv;
  const size_t cache_len = offset + ((size_t)b * hkv + 1) * cap * d;
  const int half = d / 2;
  const float eps = 1e-6f;
  std::vector<T> y((size_t)b * width), q((size_t)b * nq + 1), kc(cache_len), vc(cache_len);
  std::vector<T> cs((size_t)b * half), sn((size_t)b * half), qg(d), kg(d);
  for (auto *buf : {&y, &q, &kc, &vc})
    for (auto &x : *buf) x = from_float<T>(rng.normal());
  for (auto *buf : {&qg, &kg})
    for (auto &x : *buf) x = from_float<T>(1.f + 0.5f * rng.normal());
  for (size_t i = 0; i < cs.size(); ++i) {
    const float a = 3.f * rng.normal();
    cs[i] = from_float<T>(std::cos(a)), sn[i] = from_float<T>(std::sin(a));
  }
  // Element e of the head starting at column `head` of row r as the rotation reads it: with
  // the norm (q and k only), normalised with the gains g and rounded to T.
  auto normed = [&](int r, size_t head, size_t e) -> float {
    const T *row = y.data() + (size_t)r * width + head;
    if (!norm || head >= nq + nkv) return as_float(row[e]);
    const std::vector<T> &g = head < nq ? qg : kg;
    float ss = 0.f;
    for (int i = 0; i < d; ++i) {
      const float v = as_float(row[i]);
      ss += v * v;
    }
    const float inv = 1.f / std::sqrt(ss / (float)d + eps);
    return as_float(from_float<T>((as_float(row[e]) * inv) * as_float(g[e])));
  };
  // Column c of row r after the norm and the rotation (q and k columns only; v as it is).
  auto rotated = [&](int r, size_t c) -> double {
    const size_t j = c % d, jj = j % half, head = c - j;
    if (!rope || c >= nq + nkv) return as_float(from_float<T>(normed(r, head, j)));
    const float co = as_float(cs[(size_t)r * half + jj]), si = as_float(sn[(size_t)r * half + jj]);
    const float x1 = normed(r, head, jj), x2 = normed(r, head, jj + half);
    return as_float(from_float<T>(j < (size_t)half ? x1 * co - x2 * si : x2 * co + x1 * si));
  };
  std::vector<double> want_q(q.size()), want_k(kc.size()), want_v(vc.size());
  for (size_t i = 0; i < q.size(); ++i) want_q[i] = as_float(q[i]);
  for (size_t i = 0; i < kc.size(); ++i) want_k[i] = as_float(kc[i]), want_v[i] = as_float(vc[i]);
  const long long step[2] = {len, 3};
  int pos;
  const bool writes = position(step, cap, pos);
  for (int r = 0; r < b; ++r) {
    for (size_t c = 0; c < nq; ++c) want_q[r * nq + c] = rotated(r, c);
    if (!writes) continue;
    for (int h = 0; h < hkv; ++h)
      for (int e = 0; e < d; ++e) {
        const size_t at = offset + (((size_t)r * hkv + h) * cap + pos) * d + e;
        want_k[at] = rotated(r, nq + (size_t)h * d + e);
        want_v[at] = rotated(r, nq + nkv + (size_t)h * d + e);
      }
  }
  DecodeParams p{};
  p.dst = kc.data() + offset;
  p.dst2 = vc.data() + offset;
  p.src = y.data();
  p.out = q.data();
  p.step = step;
  p.n = (long long)(b * width);
  p.cap = cap;
  p.d = d;
  p.nq = (int)nq;
  p.nkv = (int)nkv;
  p.cos = rope ? cs.data() : nullptr;
  p.sin = rope ? sn.data() : nullptr;
  p.qnorm = norm ? qg.data() : nullptr;
  p.knorm = norm ? kg.data() : nullptr;
  p.eps = eps;
  const T *tag = nullptr;
  if (p.n > 0) {
    const unsigned grid = (unsigned)((p.n + 255) / 256);
    emu::launch({grid, 1, 1}, {256, 1, 1}, 0, [&] { qkv_entry(tag, p); });
  }
  char what[96];
  bool ok = true;
  std::snprintf(what, sizeof what, "%s L=%lld q", name, len);
  ok &= emu_check::close_abs(what, q, want_q, 0);
  std::snprintf(what, sizeof what, "%s L=%lld k", name, len);
  ok &= emu_check::close_abs(what, kc, want_k, 0);
  std::snprintf(what, sizeof what, "%s L=%lld v", name, len);
  ok &= emu_check::close_abs(what, vc, want_v, 0);
  return ok;
}

// advance_step (decode_step::advance: one block of 256) against the four ops it stands for on
// the host: ids = sampled, positions + 1, step + 1, mask[r, L + 1] = 1. Rows past a block's
// threads, none at all, and L + 1 at and past the capacity; one row (or element) past each
// buffer's end must stay untouched.
bool check_advance(int rows, int cap, long long len, emu_check::Rng &rng) {
  std::vector<uint32_t> ids(rows + 1), sampled(rows + 1), positions(rows + 1);
  for (auto *v : {&ids, &sampled, &positions})
    for (auto &x : *v) x = (uint32_t)(rng.gen() % 100000);
  std::vector<float> mask((size_t)(rows + 1) * cap);
  for (size_t i = 0; i < mask.size(); ++i) mask[i] = (float)(i % 3 == 0);
  std::vector<long long> step = {len, 41, -5};
  auto ids_ref = ids, positions_ref = positions;
  std::vector<double> mask_ref(mask.begin(), mask.end());
  std::vector<long long> step_ref = step;
  for (int r = 0; r < rows; ++r) ids_ref[r] = sampled[r], positions_ref[r] += 1;
  step_ref[0] += 1, step_ref[1] += 1;
  int pos;
  if (position(step_ref.data(), cap, pos))
    for (int r = 0; r < rows; ++r) mask_ref[(size_t)r * cap + pos] = 1.0;
  DecodeParams p{};
  p.dst = mask.data();
  p.src = sampled.data();
  p.step = step.data();
  p.n = rows;
  p.cap = cap;
  p.dst2 = positions.data();
  p.out = ids.data();
  emu::launch({1, 1, 1}, {256, 1, 1}, 0, [&] { advance_step(p); });
  char what[96];
  std::snprintf(what, sizeof what, "advance_step rows %d cap %d L=%lld", rows, cap, len);
  bool ok = emu_check::close_abs(std::string(what) + " mask", mask, mask_ref, 0);
  const bool state = ids == ids_ref && positions == positions_ref && step == step_ref;
  ok &= check(std::string(what) + " ids, positions, step", state, "step {%lld, %lld}", step[0],
              step[1]);
  return ok;
}

// A few fixed decode steps in static_step.rs's order, on the kernels alone: kv_write at
// L = step[0]; the draw at step[1] read on the device (pos_at) with the stop ids held until
// draw 2; advance_step (the ids, positions, step and mask). Against the same steps
// on the host; every id compared with the reference draw (bucket-edge rounding allowed). Every
// buffer has one row (or element) more than the kernels are told: it must stay untouched.
bool check_steps(emu_check::Rng &rng) {
  const int b = 5, h = 3, cap = 6, d = 40, v = 37;
  const Sampling s{0.9f, 0, 1.f};
  std::vector<bf16> cache((size_t)(b * h + 1) * cap * d, from_float<bf16>(0.f));
  std::vector<float> mask((size_t)(b + 1) * cap, 0.f), hold(v, 0.f);
  hold[3] = hold[v - 1] = -INFINITY;
  std::vector<uint32_t> positions(b + 1);
  for (auto &x : positions) x = rng.gen() % 50;
  std::vector<long long> step = {3, 1, 77};
  std::vector<double> cache_ref(cache.size(), 0.0), mask_ref(mask.size(), 0.0);
  std::vector<uint32_t> positions_ref = positions;
  std::vector<long long> step_ref = step;
  const uint64_t seed = rng.gen();
  std::vector<long long> keys(b);
  for (int r = 0; r < b; ++r) keys[r] = (long long)row_key(seed, r);
  const Case c{"steps", DType::BF16, b, v, 2.f, s, kHeld | kPosAt};
  Verdict vd;
  bool ok = true;
  for (int t = 0; t < 5; ++t) {
    std::vector<bf16> knew((size_t)b * h * d), logits((size_t)b * v);
    for (auto &x : knew) x = from_float<bf16>(rng.normal());
    for (int r = 0; r < b; ++r)
      for (int i = 0; i < v; ++i)  // token 3, held while it applies, is the likeliest
        logits[(size_t)r * v + i] = from_float<bf16>(2.f * rng.normal() + (i == 3 ? 6.f : 0.f));
    // Device.
    DecodeParams kw{cache.data(), knew.data(), step.data(), (long long)knew.size(), cap, d};
    run_decode(kv_write_b2, kw.n, kw);
    Draw draw;
    draw.device = &step[1];
    const std::vector<uint32_t> ids = run_sample(logits, b, v, keys, draw, Hold{&hold, 2}, s);
    std::vector<uint32_t> fed(b, 0);  // the step's ids, overwritten with the sampled ones
    DecodeParams adv{mask.data(), ids.data(), step.data(), b, cap, 0};
    adv.dst2 = positions.data();
    adv.out = fed.data();
    emu::launch({1, 1, 1}, {256, 1, 1}, 0, [&] { advance_step(adv); });
    ok &= check("steps: advance_step copies the sampled ids", fed == ids);
    // Host.
    int pos;
    if (position(step_ref.data(), cap, pos))
      for (int r = 0; r < b * h; ++r)
        for (int e = 0; e < d; ++e)
          cache_ref[((size_t)r * cap + pos) * d + e] = as_float(knew[(size_t)r * d + e]);
    const uint64_t at = (uint64_t)step_ref[1];
    for (int r = 0; r < b; ++r) {
      std::vector<float> z(v);
      for (int i = 0; i < v; ++i)
        z[i] = as_float(logits[(size_t)r * v + i]) + (at < 2 ? hold[i] : 0.f);
      judge_row(c, z.data(), uniform_ref((uint64_t)keys[r], at), ids[r], r, vd);
    }
    for (int r = 0; r < b; ++r) positions_ref[r] += 1;
    step_ref[0] += 1, step_ref[1] += 1;
    if (position(step_ref.data(), cap, pos))
      for (int r = 0; r < b; ++r) mask_ref[(size_t)r * cap + pos] = 1.0;
  }
  const std::string why = vd.kept_why.empty() ? vd.draw_why : vd.kept_why;
  ok &= check("steps x5 ids", vd.kept_bad == 0 && vd.draw_bad == 0,
               "%d draws: %d the reference's, %d at a bucket edge%s%s", 5 * b, vd.exact,
               vd.bucket_edge, why.empty() ? "" : "; ", why.c_str());
  ok &= emu_check::close_abs("steps x5 cache", cache, cache_ref, 0);
  ok &= emu_check::close_abs("steps x5 mask", mask, mask_ref, 0);
  const bool state = positions == positions_ref && step == step_ref;
  ok &= check("steps x5 positions and step", state, "step {%lld, %lld}", step[0], step[1]);
  return ok;
}

// One case in its dtype: greedy, sampled, or many draws of one row (kDistribution).
constexpr unsigned kDistribution = 1u << 16;

// Every token held back and a draw: nothing is kept, and every row gets token 0, as the
// reference's.
template <typename T> bool check_all_held(const Case &c, emu_check::Rng &rng) {
  Inputs<T> in = make_inputs<T>(c, rng);
  const std::vector<uint32_t> got = launch_case(c, in);
  int bad = 0;
  for (int r = 0; r < c.b; ++r) bad += got[r] != 0u;
  return check(std::string(c.name) + " ids", bad == 0, "%d of %d rows not token 0", bad, c.b);
}

template <typename T> bool check_case(const Case &c, emu_check::Rng &rng) {
  if (c.s.greedy()) return check_greedy<T>(c, rng);
  if (c.has(kAllHeld)) return check_all_held<T>(c, rng);
  if (c.has(kDistribution)) return check_distribution<T>(c, rng);
  return check_sampled<T>(c, rng);
}

bool check_case(const Case &c, emu_check::Rng &rng) {
  switch (c.dt) {
    case DType::F32: return check_case<float>(c, rng);
    case DType::BF16: return check_case<bf16>(c, rng);
    case DType::F16: return check_case<__half>(c, rng);
  }
  return false;
}

}  // namespace

int main(int argc, char **argv) {
  emu_check::Rng rng(emu_check::seed(argc, argv));
  const DType f32 = DType::F32, bf = DType::BF16, f16 = DType::F16;
  const Sampling greedy{0.f, 0, 1.f};
  // {name, dtype, B, V, sigma, {temperature, top_k, top_p}, flags}
  const Case cases[] = {
      {"greedy f32 V37 ties", f32, 13, 37, 1.f, greedy, kTies},
      {"greedy bf16 V1000 ties", bf, 11, 1000, 1.f, greedy, kTies},
      {"greedy bf16 V50257 ties", bf, 5, 50257, 2.f, greedy, kTies},
      {"greedy f16 V1000 held", f16, 7, 1000, 1.f, greedy, kTies | kHeld},
      {"greedy bf16 V1000 hold expired", bf, 5, 1000, 1.f, greedy, kExpired | kPosAt},
      {"greedy f32 V37 all held", f32, 3, 37, 1.f, greedy, kAllHeld},
      {"T0.7 f32 V37 x81", f32, 81, 37, 1.f, {0.7f, 0, 1.f}, kDistribution},
      {"top-k40 bf16 V1000 ties", bf, 4, 1000, 1.5f, {1.f, 40, 1.f}, kTies | kUEnds},
      {"top-p0.9 f32 V1000 ties", f32, 5, 1000, 1.f, {1.3f, 0, 0.9f}, kTies | kUEnds},
      {"top-k50 top-p0.9 bf16 V50257", bf, 2, 50257, 3.f, {1.3f, 50, 0.9f}, kTies | kUEnds},
      {"top-k3 f32 V37 flat", f32, 6, 37, 0.2f, {1.f, 3, 1.f}, kUEnds},
      {"top-k1 bf16 V37 ties", bf, 3, 37, 1.f, {0.8f, 1, 1.f}, kTies | kUEnds},
      {"top-p0.95 f16 V1000 held pos_at", f16, 3, 1000, 2.f, {0.9f, 0, 0.95f},
       kHeld | kPosAt | kUEnds},
      {"T0.05 f32 V37 underflow", f32, 6, 37, 3.f, {0.05f, 0, 1.f}, kTies | kUEnds},
      {"top-k5000 bf16 V1000 (no filter)", bf, 3, 1000, 1.f, {1.f, 5000, 1.f}, kUEnds},
      // Top-k's radix selection: fewer positive weights than k (every one kept); the bench's
      // draw over flat weights, where one token too many or too few moves most draws; a wide
      // k whose edge falls in a run of equal f16 logits.
      {"top-k40 bf16 V1000 sparse", bf, 4, 1000, 1.f, {1.f, 40, 1.f}, kSparse | kUEnds},
      {"top-k50 bf16 V50257 padded rows held", bf, 8, 50257, 0.3f, {0.7f, 50, 1.f},
       kPadded | kHeld | kUEnds},
      {"top-k500 f16 V50257 ties", f16, 6, 50257, 0.5f, {1.f, 500, 1.f}, kTies | kUEnds},
      {"top-p1e-4 f32 V1000 ties", f32, 3, 1000, 1.f, {1.f, 0, 1e-4f}, kTies | kUEnds},
      {"T1 bf16 V50257", bf, 3, 50257, 2.f, {1.f, 0, 1.f}, kUEnds},
      {"top-k999 top-p0.5 f16 V1000 expired", f16, 2, 1000, 1.f, {1.f, 999, 0.5f}, kExpired},
      // {temperature, top_k, top_p, min_p, penalty}
      {"greedy pen1.3 bf16 V1000 seen ties", bf, 7, 1000, 1.f, {0.f, 0, 1.f, 0.f, 1.3f},
       kSeen | kTies},
      {"greedy pen0.7 f32 V37 seen held", f32, 5, 37, 1.f, {0.f, 0, 1.f, 0.f, 0.7f},
       kSeen | kHeld},
      {"min-p0.05 f32 V1000", f32, 5, 1000, 1.f, {1.f, 0, 1.f, 0.05f}, kUEnds},
      {"top-k50 top-p0.9 min-p0.1 pen1.2 bf16 V50257 seen", bf, 3, 50257, 3.f,
       {1.3f, 50, 0.9f, 0.1f, 1.2f}, kSeen | kUEnds},
      {"min-p0.02 pen1.5 f16 V1000 seen pos_at", f16, 3, 1000, 2.f, {0.9f, 0, 1.f, 0.02f, 1.5f},
       kSeen | kPosAt | kUEnds},
      {"T0.7 pen1.4 f32 V37 x81 seen", f32, 81, 37, 1.f, {0.7f, 0, 1.f, 0.f, 1.4f},
       kDistribution | kSeen},
      {"T1 seen pen1 (marks only) bf16 V1000", bf, 3, 1000, 1.f, {1.f, 0, 1.f, 0.f, 1.f}, kSeen},
      // Rows padded apart: 16-byte loads on every row (V50257's own rows are unaligned but
      // the first), and the scalar path under a hold mask and a penalty.
      {"greedy bf16 V50257 padded rows ties", bf, 5, 50257, 2.f, greedy, kTies | kPadded},
      {"top-k50 top-p0.9 f16 V259 padded rows", f16, 6, 259, 2.f, {1.3f, 50, 0.9f}, kPadded | kUEnds},
      {"T0.7 f32 V37 x81 padded rows", f32, 81, 37, 1.f, {0.7f, 0, 1.f}, kDistribution | kPadded},
      // The generation bench's draw: stop ids held back (16-byte loads of the logits and the
      // mask), rows padded to a multiple of 8.
      {"T0.7 bf16 V50257 padded rows held", bf, 5, 50257, 2.f, {0.7f, 0, 1.f},
       kPadded | kHeld | kUEnds},
      // The chunks' edges: a row of one chunk exactly, one of a chunk and 8 entries, rows
      // shorter than a lane's 8; the hold mask off a 16-byte boundary; every token held.
      {"T1 bf16 V256 held", bf, 4, 256, 2.f, {1.f, 0, 1.f}, kHeld | kUEnds},
      {"top-k2 f16 V264 held", f16, 4, 264, 2.f, {1.f, 2, 1.f}, kHeld | kUEnds},
      {"T1 f32 V3", f32, 4, 3, 2.f, {1.f, 0, 1.f}, kUEnds},
      {"T1 f32 V1", f32, 2, 1, 2.f, {1.f, 0, 1.f}, kUEnds},
      {"T0.7 bf16 V50257 padded rows held, mask unaligned", bf, 4, 50257, 2.f, {0.7f, 0, 1.f},
       kHeld | kUEnds | kPadded | kMisHold},
      {"top-k50 top-p0.9 bf16 V50257 padded rows all held", bf, 3, 50257, 1.f, {1.f, 50, 0.9f},
       kAllHeld | kPadded},
      {"greedy pen1.3 bf16 V1003 padded rows seen held", bf, 4, 1003, 1.f,
       {0.f, 0, 1.f, 0.f, 1.3f}, kSeen | kHeld | kPadded},
      {"min-p0.05 pen1.2 bf16 V1003 padded rows seen", bf, 3, 1003, 2.f,
       {1.f, 0, 1.f, 0.05f, 1.2f}, kSeen | kPadded | kUEnds},
  };
  bool ok = true;
  for (const Case &c : cases) ok &= check_case(c, rng);
  ok &= check_fallback(rng);
  // Decode step.
  ok &= check_kv_write<uint16_t, bf16>("kv_write_b2 bf16 3x5x7x64", 3, 5, 7, 64, 0, 0, rng);
  ok &= check_kv_write<uint16_t, bf16>("kv_write_b2 bf16 3x5x7x64", 3, 5, 7, 64, 6, 0, rng);
  ok &= check_kv_write<uint16_t, __half>("kv_write_b2 f16 2x3x5x72 +11", 2, 3, 5, 72, 2, 11, rng);
  ok &= check_kv_write<uint32_t, float>("kv_write_b4 f32 3x2x9x128", 3, 2, 9, 128, 8, 0, rng);
  ok &= check_kv_write<uint32_t, float>("kv_write_b4 f32 1x3x4x24 +5", 1, 3, 4, 24, 1, 5, rng);
  ok &= check_kv_write<uint32_t, float>("kv_write_b4 f32 3x2x9x128", 3, 2, 9, 128, 9, 0, rng);
  ok &= check_kv_write<uint16_t, bf16>("kv_write_b2 bf16 3x5x7x64 +67", 3, 5, 7, 64, -1, 67, rng);
  // GPT-2's heads (12 of 64), GQA (8 query heads on 2), odd sizes and offsets; rotated
  // (Llama) and not (GPT-2).
  ok &= check_qkv_write<bf16>("qkv_write bf16 5x12/12x64 cap 9", 5, 12, 12, 9, 64, 4, 0, false, rng);
  ok &= check_qkv_write<bf16>("qkv_write bf16 5x12/12x64 cap 9", 5, 12, 12, 9, 64, 8, 0, false, rng);
  ok &= check_qkv_write<__half>("qkv_write f16 3x8/2x24 +13", 3, 8, 2, 7, 24, 0, 13, false, rng);
  ok &= check_qkv_write<float>("qkv_write f32 7x3/1x40 +3", 7, 3, 1, 5, 40, 2, 3, false, rng);
  ok &= check_qkv_write<float>("qkv_write f32 2x4/4x8 full", 2, 4, 4, 6, 8, 6, 0, false, rng);
  ok &= check_qkv_write<bf16>("qkv_write bf16 2x4/4x8 L<0", 2, 4, 4, 6, 8, -1, 5, false, rng);
  ok &= check_qkv_write<bf16>("qkv_write bf16 rope 5x32/8x128", 5, 32, 8, 9, 128, 3, 0, true, rng);
  ok &= check_qkv_write<__half>("qkv_write f16 rope 3x8/2x24 +7", 3, 8, 2, 7, 24, 6, 7, true, rng);
  ok &= check_qkv_write<float>("qkv_write f32 rope 4x4/4x64 full", 4, 4, 4, 6, 64, 6, 0, true, rng);
  // Qwen3's per-head norms of q and k: heads of 128 (wider than hidden / heads there), GQA,
  // with and without rotation, an odd head dim, a full cache (q still normalised).
  ok &= check_qkv_write<bf16>("qkv_write bf16 norm rope 3x16/8x128", 3, 16, 8, 9, 128, 3, 0, true,
                              rng, true);
  ok &= check_qkv_write<__half>("qkv_write f16 norm 2x6/2x24 +5", 2, 6, 2, 7, 24, 6, 5, false, rng,
                                true);
  ok &= check_qkv_write<float>("qkv_write f32 norm rope 3x4/2x40", 3, 4, 2, 5, 40, 1, 0, true, rng,
                               true);
  ok &= check_qkv_write<bf16>("qkv_write bf16 norm rope 2x4/4x64 full", 2, 4, 4, 6, 64, 6, 0, true,
                              rng, true);
  for (int rows : {0, 5, 300})
    for (long long len : {3LL, 9LL, 10LL}) ok &= check_advance(rows, 11, len, rng);
  ok &= check_steps(rng);
  return emu_check::finish(ok);
}
