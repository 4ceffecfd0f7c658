// The elementwise kernels run in the CPU emulator (cuda_emu.h), every entry point of
// kernels/bias.cu, gelu.cu, swiglu.cu, rope.cu, heads.cu and dropout.cu, against references
// written here, on fresh random inputs of awkward sizes, in f32, bf16 and f16:
// - bias_fwd{,_vec}_* (act(y + b), identity and tanh GELU), bias_bwd{,_vec}_* (dL/dy for the
//   GELU, and every group's partial column sums) then bias_db_reduce: rows 0 (backward only:
//   db must come out zero), 1, 7, 33, 130 and widths 1, 37, 72, 200, 776, 777, 3072, so single
//   columns, widths below one 256-thread block and above it (partial last blocks), 16-byte chunk
//   counts that are no multiple of the 32 lanes of a backward_vec block, one and several row
//   groups (130 rows: three groups of 44 on the scalar path, 17 of 8 on the vector one);
// - gelu_{fwd,bwd}{,_vec}_*, swiglu_{fwd,bwd}{,_vec}_* and geglu_{fwd,bwd}{,_vec}_* (Gemma's
//   gated GELU, on GELU's inputs) over n = 1, 37, 1221 (odd: scalar),
//   2376, 100880, 101376 and 399360 (16-byte chunks for every dtype) elements, with inputs far in
//   both tails (|x| up to 12 for GELU, |g| up to 100 for SwiGLU, where exp overflows f32 and
//   the sigmoid must come out 0 rather than NaN);
// - rope_{fwd,bwd}_* on x [B, H, T, D] with half = D / 2 of 1, 3, 32, 36 and 100, tables that
//   differ per batch row (so a wrong b or t in the table index shows);
// - heads_swap_{2,4,8,16} as head split ([B, T, n, d] -> [B, n, T, d]) and merge (the inverse)
//   of f32, bf16 and f16 tensors, with every unit width the launcher picks (rows of 2 to 400
//   bytes, inputs aligned and one element off) and a single head or position;
// - dropout_* over x (forward) and dy (backward), rates 0.1, 0.5 and 0.9, full 64-bit seeds.
// Every kernel runs in the form its launcher picks for 64-byte aligned buffers and, where that
// was a 16-byte form (bias, GELU, SwiGLU), again on inputs one element past alignment, where
// the launcher takes the scalar form.
//
// Launches are the launchers' in src/kernels/cuda/ (bias.rs, gelu.rs, swiglu.rs, rope.rs,
// heads.rs, dropout.rs, and grid_stride / vec16_chunk of mod.rs), mirrored below with sm_count
// a parameter: 132 (an H200), or 1 on the large cases, so that the grid-stride loops and the
// bias kernels' row loops go round many times (and the emulator runs fewer idle fibers).
// 256 threads a block, no dynamic shared memory, the params fields each launcher sets and no
// others. The 16-byte forms are taken exactly where vec16_chunk allows them (the element count,
// n or cols, a multiple of 16 / sizeof(T), and every input base 16-byte aligned; outputs are
// fresh allocations). Every buffer starts as 0xFF bytes (NaN in all three dtypes) inside a
// larger allocation, whose guard bytes are 0xFF around an input and 0xA5 around an output: an
// output element nobody writes, a read before or past an input, and a write before or past an
// output (the guard bytes must survive) all fail.
//
// References (semantics of the CPU ops in src/kernels/*.rs), from the inputs as rounded to T:
// - exact, compared bit for bit: the identity bias forward (the f32 sum y + b, an IEEE
//   addition, rounded once to T, rounding written here independently of the emulator's), the
//   head permutation (a byte copy, on 0xFF-free random bit patterns), and dropout: the mask
//   from splitmix64(seed + i * golden) >> 40 >= round(p 2^24) as src/kernels/dropout.rs and
//   src/train/rng.rs compute it, kept elements the f32 product x * scale (scale = 1 / (1 - p)
//   rounded to T, as Mask::scale_in gives the kernel) rounded once to T, dropped ones 0;
// - in double, per element: GELU (tanh form with the exact constants sqrt(2/pi), 0.044715),
//   its slope, bias + GELU and the bias gradient, SwiGLU and its two gradients, RoPE.
//   |got - ref| <= u_T |ref| + (1 + u_T) e + sub_T for every element, with u_T and sub_T the
//   store's rounding (0 for f32, which stores the f32 result as it is; 2^-8, 2^-134 for bf16;
//   2^-11, 2^-25 for f16) and e twice the first-order bound below on the kernel's f32 maths
//   (eps = 2^-23, u = eps / 2; CUDA's tanhf and expf are within 2 ulp, and an FMA contraction
//   only removes roundings), plus 2^-100 for f32 underflow:
//   * gelu(v): the tanh argument C (v + A v^3) carries 7 roundings (the two constants, three
//     products, the sum, the product by C), so t = tanh(.) is off by 7u sech^2(a) |a| + 2 ulp
//     <= 3.1u + 4u; 1 + t and the final product one rounding each (0.5 v is exact): <= 5.6u |v|,
//     and in bias + GELU the rounding of v = y + b adds gelu'(v) u |v| <= 1.13u |v|. e = 8 eps |v|;
//   * gelu'(v) = (1 + t) / 2 + g(v) (1 - t^2), g(v) = |v| C (1 + 3 A v^2) / 2: the first term
//     <= 4.6u, 1 - t^2 off by 2 |t| dt + 2u = 16.2u absolutely (cancelling near |t| = 1), its
//     products 4u relatively, the sum u, and (bias) gelu'' u |v| <= 0.8u |v|; dx = dy gelu'(v)
//     one rounding more: e = |dy| (8 + 24 g(v) + |v|) eps + eps |dx|. db adds the rows' f32
//     dL/dy (unrounded, as the kernel and cpu_backward do) in some tree of at most rows
//     additions: e = sum of the rows' e + gamma_(rows + 16) sum |d| (Higham, 4.2);
//   * sigmoid s = 1 / (1 + exp(-g)): 2 ulp, then 2 roundings: 6u relatively; y = g s u, du = dy g s
//     two products more: e = 8 eps |ref|; dg = dy u s w, w = 1 + g (1 - s): w is off by 6u |g|
//     + u |w| absolutely (cancelling where w ~ 0, g ~ -1.28), dy u s by 8u: e = eps (12 |dy u s g|
//     + 20 |dg|);
//   * RoPE x1 c - x2 s (x2 c + x1 s): two products and a sum, e = 2 eps (|x1 c| + |x2 s|).
// A wrong index, a lost or doubled element, row, group or column block, or a wrong constant
// moves elements by far more (1e-3 and up, relatively).
//
// Usage: elementwise [seed]  (a random seed when none is given; it is printed either way).
#include "emu_check.h"

#include "bias.cu"
#include "dropout.cu"
#include "gelu.cu"
#include "heads.cu"
#include "rope.cu"
#include "swiglu.cu"

namespace {

using bf16 = __nv_bfloat16;
using f16 = __half;
using BiasK = void (*)(const BiasParams);
using GeluK = void (*)(const GeluParams);
using SwiGluK = void (*)(const SwiGluParams);
using RopeK = void (*)(const RopeParams);
using HeadsK = void (*)(const HeadsParams);
using DropoutK = void (*)(const DropoutParams);

// THREADS in bias.rs and the 256 of every other launcher; kThreads in bias.cu.
constexpr unsigned kLaunchThreads = 256;
static_assert(kThreads == (int)kLaunchThreads, "bias: the launcher's block size");
constexpr unsigned kH200Sms = 132;
constexpr double kEps = 0x1p-23, kU = 0x1p-24, kTiny = 0x1p-100;
constexpr double kGeluC = 0.79788456080286535587989211986876;  // sqrt(2 / pi)
constexpr double kGeluA = 0.044715;

// ---------------------------------------------------------------------------------------
// Dtypes: emu_check's, and the entry points.
// ---------------------------------------------------------------------------------------
template <typename T> struct Dt;
template <> struct Dt<float> : emu_check::Dt<float> {
  static constexpr BiasK bias_fwd = bias_fwd_f32, bias_fwd_vec = bias_fwd_vec_f32;
  static constexpr BiasK bias_bwd = bias_bwd_f32, bias_bwd_vec = bias_bwd_vec_f32;
  static constexpr GeluK gelu_fwd = gelu_fwd_f32, gelu_fwd_vec = gelu_fwd_vec_f32;
  static constexpr GeluK gelu_bwd = gelu_bwd_f32, gelu_bwd_vec = gelu_bwd_vec_f32;
  static constexpr SwiGluK swiglu_fwd = swiglu_fwd_f32, swiglu_fwd_vec = swiglu_fwd_vec_f32;
  static constexpr SwiGluK swiglu_bwd = swiglu_bwd_f32, swiglu_bwd_vec = swiglu_bwd_vec_f32;
  static constexpr SwiGluK geglu_fwd = geglu_fwd_f32, geglu_fwd_vec = geglu_fwd_vec_f32;
  static constexpr SwiGluK geglu_bwd = geglu_bwd_f32, geglu_bwd_vec = geglu_bwd_vec_f32;
  static constexpr RopeK rope_fwd = rope_fwd_f32, rope_bwd = rope_bwd_f32;
  static constexpr DropoutK dropout = dropout_f32;
};
template <> struct Dt<bf16> : emu_check::Dt<bf16> {
  static constexpr BiasK bias_fwd = bias_fwd_bf16, bias_fwd_vec = bias_fwd_vec_bf16;
  static constexpr BiasK bias_bwd = bias_bwd_bf16, bias_bwd_vec = bias_bwd_vec_bf16;
  static constexpr GeluK gelu_fwd = gelu_fwd_bf16, gelu_fwd_vec = gelu_fwd_vec_bf16;
  static constexpr GeluK gelu_bwd = gelu_bwd_bf16, gelu_bwd_vec = gelu_bwd_vec_bf16;
  static constexpr SwiGluK swiglu_fwd = swiglu_fwd_bf16, swiglu_fwd_vec = swiglu_fwd_vec_bf16;
  static constexpr SwiGluK swiglu_bwd = swiglu_bwd_bf16, swiglu_bwd_vec = swiglu_bwd_vec_bf16;
  static constexpr SwiGluK geglu_fwd = geglu_fwd_bf16, geglu_fwd_vec = geglu_fwd_vec_bf16;
  static constexpr SwiGluK geglu_bwd = geglu_bwd_bf16, geglu_bwd_vec = geglu_bwd_vec_bf16;
  static constexpr RopeK rope_fwd = rope_fwd_bf16, rope_bwd = rope_bwd_bf16;
  static constexpr DropoutK dropout = dropout_bf16;
};
template <> struct Dt<f16> : emu_check::Dt<f16> {
  static constexpr BiasK bias_fwd = bias_fwd_f16, bias_fwd_vec = bias_fwd_vec_f16;
  static constexpr BiasK bias_bwd = bias_bwd_f16, bias_bwd_vec = bias_bwd_vec_f16;
  static constexpr GeluK gelu_fwd = gelu_fwd_f16, gelu_fwd_vec = gelu_fwd_vec_f16;
  static constexpr GeluK gelu_bwd = gelu_bwd_f16, gelu_bwd_vec = gelu_bwd_vec_f16;
  static constexpr SwiGluK swiglu_fwd = swiglu_fwd_f16, swiglu_fwd_vec = swiglu_fwd_vec_f16;
  static constexpr SwiGluK swiglu_bwd = swiglu_bwd_f16, swiglu_bwd_vec = swiglu_bwd_vec_f16;
  static constexpr SwiGluK geglu_fwd = geglu_fwd_f16, geglu_fwd_vec = geglu_fwd_vec_f16;
  static constexpr SwiGluK geglu_bwd = geglu_bwd_f16, geglu_bwd_vec = geglu_bwd_vec_f16;
  static constexpr RopeK rope_fwd = rope_fwd_f16, rope_bwd = rope_bwd_f16;
  static constexpr DropoutK dropout = dropout_f16;
};

using emu_check::round_as;

// The store's bound around a reference r whose f32 value is off by at most e: T's rounding
// (none for f32, which stores the f32 result itself).
template <typename T> double store_tol(double r, double e) {
  const bool f32 = std::is_same<T, float>::value;
  const double u = f32 ? 0 : Dt<T>::u, sub = f32 ? 0 : Dt<T>::sub;
  return u * std::fabs(r) + (1 + u) * (e + kTiny) + sub;
}

// ---------------------------------------------------------------------------------------
// Buffers: n values of T at a 64-byte aligned address, or one element past it (`misalign`),
// starting as 0xFF bytes (NaN), inside a larger allocation with at least 64 bytes of guard on
// either side: 0xFF too around an input (a read outside it is NaN), kOutGuard around an output
// (so that a write outside it, even of NaN bytes read from outside an input, shows).
// ---------------------------------------------------------------------------------------
constexpr unsigned char kOutGuard = 0xA5;

template <typename T> struct Buf {
  std::vector<unsigned char> raw;
  T *p;
  size_t n;
  unsigned char fill;
  explicit Buf(size_t n_, bool misalign = false, unsigned char guard_byte = kOutGuard)
      : raw((n_ + 1) * sizeof(T) + 192, 0xFF), n(n_), fill(guard_byte) {
    const uintptr_t a = (reinterpret_cast<uintptr_t>(raw.data()) + 64 + 63) & ~uintptr_t(63);
    p = reinterpret_cast<T *>(a) + (misalign ? 1 : 0);
    const size_t lo = reinterpret_cast<unsigned char *>(p) - raw.data(), hi = lo + n * sizeof(T);
    for (size_t i = 0; i < raw.size(); ++i)
      if (i < lo || i >= hi) raw[i] = guard_byte;
  }
  // An input: x rounded to T.
  Buf(const std::vector<float> &x, bool misalign) : Buf(x.size(), misalign, 0xFF) {
    for (size_t i = 0; i < n; ++i) p[i] = Dt<T>::from(x[i]);
  }
  bool aligned16() const { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
  double at(size_t i) const { return emu_check::value(p[i]); }
  // Whether every byte outside [p, p + n) is as it started: nothing was written outside.
  bool guard_intact() const {
    const size_t lo = reinterpret_cast<const unsigned char *>(p) - raw.data(),
                 hi = lo + n * sizeof(T);
    for (size_t i = 0; i < raw.size(); ++i)
      if ((i < lo || i >= hi) && raw[i] != fill) return false;
    return true;
  }
};

// The guard check of an output, printed like the others (only when it fails).
template <typename T> bool guard(const std::string &what, const Buf<T> &b) {
  if (b.guard_intact()) return true;
  return emu_check::check(what, false, "a write outside the output buffer");
}

// vec16_chunk::<T>(n, offsets): n a multiple of 16 / sizeof(T) and every base 16-aligned.
template <typename T> bool takes_vec(size_t n, std::initializer_list<bool> aligned) {
  if (n % (16 / sizeof(T)) != 0) return false;
  for (bool a : aligned)
    if (!a) return false;
  return true;
}

// grid_stride(dev, n, 256): the blocks of a grid-stride pass.
using emu_check::grid_stride;

template <typename P> void run(unsigned gx, unsigned gy, void (*k)(const P), const P &p) {
  emu::launch({gx, gy, 1}, {kLaunchThreads, 1, 1}, 0, [&] { k(p); });
}

using emu_check::exact;
using emu_check::within;

std::string tag(const char *op, const std::string &name, const char *dt, bool vec) {
  return std::string(op) + " " + name + " " + dt + (vec ? " vec" : " scalar");
}

// ---------------------------------------------------------------------------------------
// GELU in double.
// ---------------------------------------------------------------------------------------
double gelu_ref(double v) { return 0.5 * v * (1 + std::tanh(kGeluC * (v + kGeluA * v * v * v))); }
double gelu_slope_ref(double v) {
  const double t = std::tanh(kGeluC * (v + kGeluA * v * v * v));
  return 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * kGeluC * (1 + 3 * kGeluA * v * v);
}
// The f32 error bounds of the derivation in the header (doubled).
double gelu_err(double v) { return 8 * kEps * std::fabs(v); }
double gelu_slope_err(double v) {
  const double g = 0.5 * std::fabs(v) * kGeluC * (1 + 3 * kGeluA * v * v);
  return (8 + 24 * g + std::fabs(v)) * kEps;
}

// Inputs of spread `s`, and at every 13th element one of a set of tail and special values.
std::vector<float> draw(size_t n, float s, std::initializer_list<float> special,
                        emu_check::Rng &rng) {
  std::vector<float> x(n);
  const std::vector<float> sp(special);
  for (size_t i = 0; i < n; ++i)
    x[i] = i % 13 == 5 && !sp.empty() ? sp[(i / 13) % sp.size()] : s * rng.normal();
  return x;
}

// ---------------------------------------------------------------------------------------
// Bias (bias.rs): forward, backward, reduce.
// ---------------------------------------------------------------------------------------
struct BiasCase {
  const char *name;
  int rows, cols;
  unsigned sms;
};

struct BiasInputs {
  BiasCase c;
  std::vector<float> y, b, dy;
};

BiasInputs make_bias(const BiasCase &c, emu_check::Rng &rng) {
  const size_t n = (size_t)c.rows * c.cols;
  return {c, draw(n, 2.f, {-12.f, 7.f, -5.f, 0.f, 4.f, -2.5f}, rng), draw(c.cols, 0.5f, {}, rng),
          draw(n, 1.f, {0.f}, rng)};
}

template <typename T> bool bias_forward(const BiasInputs &in, bool gelu, bool misalign) {
  const BiasCase &c = in.c;
  const size_t n = (size_t)c.rows * c.cols;
  const Buf<T> y(in.y, misalign);
  const Buf<float> b(in.b, false);
  Buf<T> out(n);
  // forward_t: vec16_chunk(cols, [y's offset]); a block a row, or 256 chunks, at most 8 per SM.
  const bool vec = takes_vec<T>(c.cols, {y.aligned16()});
  const size_t E = 16 / sizeof(T);
  const size_t blocks =
      std::min<size_t>(vec ? (n / E + kLaunchThreads - 1) / kLaunchThreads : c.rows, c.sms * 8);
  BiasParams p{};
  p.y = y.p;
  p.b = b.p;
  p.out = out.p;
  p.n = (long long)n;
  p.rows = c.rows;
  p.cols = c.cols;
  p.act = gelu ? kGeluTanh : kIdentity;
  if (c.rows > 0 && c.cols > 0)
    run((unsigned)blocks, 1, vec ? Dt<T>::bias_fwd_vec : Dt<T>::bias_fwd, p);

  const std::string what = tag(gelu ? "bias+gelu fwd" : "bias fwd", c.name, Dt<T>::name, vec);
  std::vector<double> want(n), tol(n);
  for (size_t i = 0; i < n; ++i) {
    const size_t col = i % c.cols;
    if (gelu) {
      const double v = y.at(i) + (double)in.b[col];
      want[i] = gelu_ref(v);
      tol[i] = store_tol<T>(want[i], gelu_err(v));
    } else {
      want[i] = round_as<T>((double)((float)y.at(i) + in.b[col]));  // the f32 sum, rounded once
    }
  }
  const bool ok = gelu ? within(what, out.p, want, tol) : exact(what, out.p, want);
  return ok & guard(what, out);
}

template <typename T> bool bias_backward(const BiasInputs &in, bool gelu, bool misalign) {
  const BiasCase &c = in.c;
  const size_t n = (size_t)c.rows * c.cols, rows = c.rows, cols = c.cols;
  const Buf<T> y(in.y, misalign), dy(in.dy, misalign);
  const Buf<float> b(in.b, false);
  // backward_t: vec16_chunk(cols, [y's offset, dy's offset]).
  const bool vec = takes_vec<T>(cols, {y.aligned16(), dy.aligned16()});
  const size_t E = 16 / sizeof(T);
  size_t col_blocks, groups;
  if (vec) {
    col_blocks = (cols / E + 31) / 32;
    groups = std::min((4 * (size_t)c.sms + std::max<size_t>(col_blocks, 1) - 1) /
                          std::max<size_t>(col_blocks, 1),
                      (rows + 7) / 8);
  } else {
    col_blocks = (cols + kLaunchThreads - 1) / kLaunchThreads;
    groups = (rows + 63) / 64;  // ROWS_PER_GROUP
  }
  groups = std::clamp<size_t>(groups, 1, 65535);
  Buf<T> dz(gelu ? n : 0);
  Buf<float> partial(groups * cols), db(cols);
  BiasParams p{};
  p.y = y.p;
  p.b = b.p;
  p.dy = dy.p;
  p.out = gelu ? dz.p : nullptr;
  p.partial = partial.p;
  p.db = db.p;
  p.n = (long long)n;
  p.rows = c.rows;
  p.cols = c.cols;
  p.groups = (int)groups;
  p.act = gelu ? kGeluTanh : kIdentity;
  if (cols > 0) {
    run((unsigned)col_blocks, (unsigned)groups, vec ? Dt<T>::bias_bwd_vec : Dt<T>::bias_bwd, p);
    run((unsigned)((cols + 31) / 32), 1, bias_db_reduce, p);
  }

  // dL/dy = dy gelu'(y + b) per element; db[c] the column's sum of dL/dy (unrounded).
  std::vector<double> want_dz(gelu ? n : 0), tol_dz(gelu ? n : 0);
  std::vector<double> want_db(cols, 0.0), err_db(cols, 0.0), mag_db(cols, 0.0);
  for (size_t i = 0; i < n; ++i) {
    const size_t col = i % cols;
    const double g = dy.at(i);
    double d = g, e = 0;
    if (gelu) {
      const double v = y.at(i) + (double)in.b[col];
      d = g * gelu_slope_ref(v);
      e = std::fabs(g) * gelu_slope_err(v) + kEps * std::fabs(d);
      want_dz[i] = d;
      tol_dz[i] = store_tol<T>(d, e);
    }
    want_db[col] += d;
    err_db[col] += e;
    mag_db[col] += std::fabs(d);
  }
  std::vector<double> tol_db(cols);
  const double gamma = (rows + 16) * kU / (1 - (rows + 16) * kU);
  for (size_t k = 0; k < cols; ++k) tol_db[k] = err_db[k] + gamma * mag_db[k] + kTiny;

  const std::string what = tag(gelu ? "bias+gelu bwd" : "bias bwd", c.name, Dt<T>::name, vec) +
                           " g" + std::to_string(groups);
  bool ok = true;
  if (gelu) ok &= within(what + " dy", dz.p, want_dz, tol_dz) & guard(what, dz);
  ok &= within(what + " db", db.p, want_db, tol_db) & guard(what + " db", db);
  ok &= guard(what + " partial", partial);
  return ok;
}

template <typename T> bool check_bias(const BiasInputs &in) {
  bool ok = true;
  for (bool gelu : {false, true}) {
    for (bool misalign : {false, true}) {
      // The launcher's form on aligned buffers; the scalar one too where that was the vector.
      if (misalign && !takes_vec<T>(in.c.cols, {})) continue;
      if (in.c.rows > 0) ok &= bias_forward<T>(in, gelu, misalign);
      ok &= bias_backward<T>(in, gelu, misalign);
    }
  }
  return ok;
}

// ---------------------------------------------------------------------------------------
// GELU (gelu.rs) and SwiGLU (swiglu.rs): grid-stride passes over n elements.
// ---------------------------------------------------------------------------------------
struct NCase {
  const char *name;
  size_t n;
  unsigned sms;
};

template <typename T> bool gelu_run(const NCase &c, const std::vector<float> &xs,
                                    const std::vector<float> &gs, bool misalign) {
  const size_t n = c.n, E = 16 / sizeof(T);
  const Buf<T> x(xs, misalign), dy(gs, misalign);
  Buf<T> y(n), dx(n);
  bool ok = true;
  {
    // run_t: vec16_chunk(n, [x's offset, 0]) forward.
    const bool vec = takes_vec<T>(n, {x.aligned16()});
    GeluParams p{};
    p.x = x.p;
    p.out = y.p;
    p.n = (long long)n;
    run(grid_stride(n / (vec ? E : 1), c.sms), 1, vec ? Dt<T>::gelu_fwd_vec : Dt<T>::gelu_fwd, p);
    std::vector<double> want(n), tol(n);
    for (size_t i = 0; i < n; ++i) {
      want[i] = gelu_ref(x.at(i));
      tol[i] = store_tol<T>(want[i], gelu_err(x.at(i)));
    }
    const std::string what = tag("gelu fwd", c.name, Dt<T>::name, vec);
    ok &= within(what, y.p, want, tol) & guard(what, y);
  }
  {
    // vec16_chunk(n, [x's offset, dy's offset]) backward.
    const bool vec = takes_vec<T>(n, {x.aligned16(), dy.aligned16()});
    GeluParams p{};
    p.x = x.p;
    p.dy = dy.p;
    p.out = dx.p;
    p.n = (long long)n;
    run(grid_stride(n / (vec ? E : 1), c.sms), 1, vec ? Dt<T>::gelu_bwd_vec : Dt<T>::gelu_bwd, p);
    std::vector<double> want(n), tol(n);
    for (size_t i = 0; i < n; ++i) {
      const double v = x.at(i), g = dy.at(i);
      want[i] = g * gelu_slope_ref(v);
      tol[i] = store_tol<T>(want[i], std::fabs(g) * gelu_slope_err(v) + kEps * std::fabs(want[i]));
    }
    const std::string what = tag("gelu bwd", c.name, Dt<T>::name, vec);
    ok &= within(what, dx.p, want, tol) & guard(what, dx);
  }
  return ok;
}

double sigmoid_ref(double g) { return 1 / (1 + std::exp(-g)); }

// SwiGLU (swiglu_*: a = silu) and GeGLU (geglu_*: a = tanh GELU; Gate in swiglu.rs):
// y = a(g) u, dg = dy u a'(g), du = dy a(g).
template <typename T> bool gated_run(const NCase &c, bool gelu, const std::vector<float> &gs,
                                     const std::vector<float> &us,
                                     const std::vector<float> &ds, bool misalign) {
  const size_t n = c.n, E = 16 / sizeof(T);
  const Buf<T> g(gs, misalign), u(us, misalign), dy(ds, misalign);
  Buf<T> y(n), both(2 * n);
  const char *op = gelu ? "geglu" : "swiglu";
  // a(v) and a'(v), with the f32 error bounds of each (relative to |a| for silu).
  const auto act = [&](double v) { return gelu ? gelu_ref(v) : v * sigmoid_ref(v); };
  const auto act_err = [&](double v) {
    return gelu ? gelu_err(v) + 2 * kEps * std::fabs(gelu_ref(v))
                : 8 * kEps * std::fabs(v * sigmoid_ref(v));
  };
  const auto slope = [&](double v) {
    const double s = sigmoid_ref(v);
    return gelu ? gelu_slope_ref(v) : s * (1 + v * (1 - s));
  };
  const auto slope_err = [&](double v) {
    if (gelu) return gelu_slope_err(v) + 4 * kEps * std::fabs(gelu_slope_ref(v));
    const double s = sigmoid_ref(v);
    return kEps * (12 * std::fabs(s * v) + 20 * std::fabs(s * (1 + v * (1 - s))));
  };
  bool ok = true;
  {
    // run_t: vec16_chunk(n, [g's offset, u's offset, 0]) forward.
    const bool vec = takes_vec<T>(n, {g.aligned16(), u.aligned16()});
    SwiGluParams p{};
    p.g = g.p;
    p.u = u.p;
    p.out = y.p;
    p.n = (long long)n;
    const SwiGluK k = gelu ? (vec ? Dt<T>::geglu_fwd_vec : Dt<T>::geglu_fwd)
                           : (vec ? Dt<T>::swiglu_fwd_vec : Dt<T>::swiglu_fwd);
    run(grid_stride(n / (vec ? E : 1), c.sms), 1, k, p);
    std::vector<double> want(n), tol(n);
    for (size_t i = 0; i < n; ++i) {
      const double v = g.at(i), w = u.at(i);
      want[i] = act(v) * w;
      tol[i] = store_tol<T>(want[i], std::fabs(w) * act_err(v));
    }
    const std::string what = tag((std::string(op) + " fwd").c_str(), c.name, Dt<T>::name, vec);
    ok &= within(what, y.p, want, tol) & guard(what, y);
  }
  {
    // vec16_chunk(n, [g, u, dy offsets]) backward; out holds [dg (n) | du (n)].
    const bool vec = takes_vec<T>(n, {g.aligned16(), u.aligned16(), dy.aligned16()});
    SwiGluParams p{};
    p.g = g.p;
    p.u = u.p;
    p.dy = dy.p;
    p.out = both.p;
    p.n = (long long)n;
    const SwiGluK k = gelu ? (vec ? Dt<T>::geglu_bwd_vec : Dt<T>::geglu_bwd)
                           : (vec ? Dt<T>::swiglu_bwd_vec : Dt<T>::swiglu_bwd);
    run(grid_stride(n / (vec ? E : 1), c.sms), 1, k, p);
    std::vector<double> want(2 * n), tol(2 * n);
    for (size_t i = 0; i < n; ++i) {
      const double v = g.at(i), d = dy.at(i), du = d * u.at(i);
      want[i] = du * slope(v);
      tol[i] = store_tol<T>(want[i], std::fabs(du) * slope_err(v));
      want[n + i] = d * act(v);
      tol[n + i] = store_tol<T>(want[n + i], std::fabs(d) * act_err(v));
    }
    const std::string what = tag((std::string(op) + " bwd").c_str(), c.name, Dt<T>::name, vec);
    ok &= within(what + " [dg | du]", both.p, want, tol) & guard(what, both);
  }
  return ok;
}

template <typename T> bool check_n(const NCase &c, emu_check::Rng &rng) {
  const size_t n = c.n;
  const std::vector<float> x = draw(n, 2.f, {-12.f, 12.f, -6.f, 6.f, -3.5f, 0.f, 1e-3f}, rng);
  const std::vector<float> dy = draw(n, 1.f, {}, rng);
  const std::vector<float> g =
      draw(n, 3.f, {-100.f, 100.f, -88.5f, -20.f, 20.f, -1.28f, 0.f, -90.f}, rng);
  const std::vector<float> u = draw(n, 1.f, {}, rng);
  bool ok = true;
  for (bool misalign : {false, true}) {
    if (misalign && !takes_vec<T>(n, {})) continue;
    ok &= gelu_run<T>(c, x, dy, misalign);
    ok &= gated_run<T>(c, false, g, u, dy, misalign);
    // GELU's inputs: its tails are where tanh saturates, and past |x| = 12 nothing changes.
    ok &= gated_run<T>(c, true, x, u, dy, misalign);
  }
  return ok;
}

// ---------------------------------------------------------------------------------------
// RoPE (rope.rs): x [B, H, T, D], tables [B, 1, T, D / 2].
// ---------------------------------------------------------------------------------------
struct RopeCase {
  const char *name;
  int b, h, t, d;
  unsigned sms;
};

template <typename T> bool check_rope(const RopeCase &c, emu_check::Rng &rng) {
  const int half = c.d / 2;
  const size_t n = (size_t)c.b * c.h * c.t * c.d, tab = (size_t)c.b * c.t * half;
  // Angles of the positions t + 17 b (each batch row its own offset) at Llama's frequencies.
  std::vector<float> cs(tab), sn(tab);
  for (int b = 0; b < c.b; ++b)
    for (int t = 0; t < c.t; ++t)
      for (int j = 0; j < half; ++j) {
        const double a = (t + 17.0 * b + 1) * std::pow(10000.0, -2.0 * j / c.d);
        cs[((size_t)b * c.t + t) * half + j] = (float)std::cos(a);
        sn[((size_t)b * c.t + t) * half + j] = (float)std::sin(a);
      }
  const Buf<T> x(draw(n, 1.5f, {}, rng), false), cosb(cs, false), sinb(sn, false);
  bool ok = true;
  for (bool inverse : {false, true}) {
    Buf<T> out(n);
    RopeParams p{};
    p.x = x.p;
    p.cos = cosb.p;
    p.sin = sinb.p;
    p.out = out.p;
    p.pairs = (long long)(n / 2);
    p.half = half;
    p.heads = c.h;
    p.seq = c.t;
    p.pad = 0;
    run(grid_stride(n / 2, c.sms), 1, inverse ? Dt<T>::rope_bwd : Dt<T>::rope_fwd, p);
    std::vector<double> want(n), tol(n);
    for (size_t row = 0; row < n / c.d; ++row) {
      const size_t b = row / ((size_t)c.h * c.t), t = row % c.t;
      for (int j = 0; j < half; ++j) {
        const size_t k = (b * c.t + t) * half + j, a = row * c.d + j;
        const double co = cosb.at(k), si = inverse ? -sinb.at(k) : sinb.at(k);
        const double x1 = x.at(a), x2 = x.at(a + half);
        want[a] = x1 * co - x2 * si;
        want[a + half] = x2 * co + x1 * si;
        tol[a] = store_tol<T>(want[a], 2 * kEps * (std::fabs(x1 * co) + std::fabs(x2 * si)));
        tol[a + half] =
            store_tol<T>(want[a + half], 2 * kEps * (std::fabs(x2 * co) + std::fabs(x1 * si)));
      }
    }
    const std::string what = std::string(inverse ? "rope bwd " : "rope fwd ") + c.name + " " +
                             Dt<T>::name;
    ok &= within(what, out.p, want, tol) & guard(what, out);
  }
  return ok;
}

// ---------------------------------------------------------------------------------------
// Heads (heads.rs): [B, P, Q, d] -> [B, Q, P, d], in the widest unit dividing a row's bytes
// and the input's address.
// ---------------------------------------------------------------------------------------
struct HeadsCase {
  const char *name;
  int b, p, q, d;
  bool misalign;
  unsigned sms;
};

HeadsK heads_entry(size_t unit) {
  switch (unit) {
    case 2: return heads_swap_2;
    case 4: return heads_swap_4;
    case 8: return heads_swap_8;
    default: return heads_swap_16;
  }
}

template <typename T> bool check_heads(const HeadsCase &c, emu_check::Rng &rng) {
  const size_t n = (size_t)c.b * c.p * c.q * c.d;
  // Random bit patterns, none of them 0xFF..., so that an unwritten element shows.
  using Bits = std::conditional_t<sizeof(T) == 2, uint16_t, uint32_t>;
  Buf<Bits> in(n, c.misalign, 0xFF), out(n);
  for (size_t i = 0; i < n; ++i) in.p[i] = (Bits)(rng.gen() & (Bits)0x7FFF7FFFu);
  const size_t row_bytes = c.d * sizeof(T);
  const uintptr_t base = reinterpret_cast<uintptr_t>(in.p);
  size_t unit = 0;
  for (size_t u : {16, 8, 4, 2})
    if (row_bytes % u == 0 && base % u == 0) {
      unit = u;
      break;
    }
  const size_t row_units = row_bytes / unit;
  HeadsParams p{};
  p.input = in.p;
  p.out = out.p;
  p.units = (int)(c.b * c.p * c.q * row_units);
  p.p = c.p;
  p.q = c.q;
  p.row_units = (int)row_units;
  run(grid_stride(p.units, c.sms), 1, heads_entry(unit), p);
  size_t nbad = 0, bad = n;
  for (int b = 0; b < c.b; ++b)
    for (int q = 0; q < c.q; ++q)
      for (int pp = 0; pp < c.p; ++pp)
        for (int k = 0; k < c.d; ++k) {
          const size_t o = (((size_t)b * c.q + q) * c.p + pp) * c.d + k;
          const size_t i = (((size_t)b * c.p + pp) * c.q + q) * c.d + k;
          if (out.p[o] != in.p[i] && nbad++ == 0) bad = o;
        }
  const std::string what = std::string("heads ") + c.name + " " + Dt<T>::name + " unit " +
                           std::to_string(unit);
  std::printf("%s %-44s exact: %zu of %zu differ", nbad == 0 ? "ok  " : "FAIL", what.c_str(),
              nbad, n);
  if (nbad) std::printf(", first at %zu", bad);
  std::printf("\n");
  return (nbad == 0) & guard(what, out);
}

// ---------------------------------------------------------------------------------------
// Dropout (dropout.rs): the same pass over x (forward) and dy (backward).
// ---------------------------------------------------------------------------------------
template <typename T> bool check_dropout(const NCase &c, double rate, emu_check::Rng &rng) {
  const size_t n = c.n;
  const uint64_t seed = rng.gen();
  // Mask::new: threshold = round(p 2^24), scale 1 / (1 - p); scale_in::<T>: rounded to T.
  const unsigned threshold = (unsigned)std::llround(rate * 16777216.0);
  const float scale = (float)round_as<T>(1.0 / (1.0 - rate));
  bool ok = true;
  size_t kept = 0;
  for (const char *pass : {"fwd", "bwd"}) {
    const Buf<T> x(draw(n, pass[0] == 'f' ? 2.f : 1.f, {}, rng), false);
    Buf<T> out(n);
    DropoutParams p{};
    p.x = x.p;
    p.out = out.p;
    p.n = (long long)n;
    p.seed = seed;
    p.threshold = threshold;
    p.scale = scale;
    run(grid_stride(n, c.sms), 1, Dt<T>::dropout, p);
    std::vector<double> want(n);
    kept = 0;
    for (size_t i = 0; i < n; ++i) {
      const uint64_t bits = emu_check::splitmix64(seed + i * 0x9E3779B97F4A7C15ull);
      const bool keep = (uint32_t)(bits >> 40) >= threshold;
      kept += keep;
      // The f32 product (exact in double, then rounded to f32), rounded once to T.
      want[i] = keep ? round_as<T>((double)(float)(x.at(i) * (double)scale)) : 0.0;
    }
    char what[96];
    std::snprintf(what, sizeof what, "dropout %s p%.1f %s %s", pass, rate, c.name, Dt<T>::name);
    ok &= exact(what, out.p, want) & guard(what, out);
  }
  // The reference's own sanity: about a fraction p dropped (within 6 sigma).
  if (n >= 1000) {
    const double dropped = 1 - (double)kept / n, sigma = std::sqrt(rate * (1 - rate) / n);
    if (std::fabs(dropped - rate) > 6 * sigma) {
      std::printf("FAIL dropout reference drops %.4f, not about %.1f\n", dropped, rate);
      ok = false;
    }
  }
  return ok;
}

}  // namespace

int main(int argc, char **argv) {
  emu_check::Rng rng(emu_check::seed(argc, argv));
  bool ok = true;

  const BiasCase bias_cases[] = {
      {"r1 c1", 1, 1, kH200Sms},          {"r1 c3072", 1, 3072, kH200Sms},
      {"r33 c72", 33, 72, kH200Sms},      {"r33 c200 1sm", 33, 200, 1},
      {"r130 c776", 130, 776, kH200Sms},  {"r130 c37", 130, 37, kH200Sms},
      {"r7 c777 1sm", 7, 777, 1},         {"r130 c3072 1sm", 130, 3072, 1},
      {"r0 c200", 0, 200, kH200Sms},
  };
  for (const BiasCase &c : bias_cases) {
    const BiasInputs in = make_bias(c, rng);
    ok &= check_bias<float>(in);
    ok &= check_bias<bf16>(in);
    ok &= check_bias<f16>(in);
  }

  const NCase n_cases[] = {
      {"n1", 1, kH200Sms},           {"n37", 37, kH200Sms},
      {"n1221", 33 * 37, kH200Sms},  {"n2376", 33 * 72, kH200Sms},
      {"n100880 1sm", 130 * 776, 1}, {"n101376", 33 * 3072, kH200Sms},
      {"n399360 1sm", 130 * 3072, 1},
  };
  for (const NCase &c : n_cases) {
    ok &= check_n<float>(c, rng);
    ok &= check_n<bf16>(c, rng);
    ok &= check_n<f16>(c, rng);
  }

  const RopeCase rope_cases[] = {
      {"b1 h1 t1 d2", 1, 1, 1, 2, kH200Sms},     {"b2 h4 t33 d6", 2, 4, 33, 6, kH200Sms},
      {"b2 h3 t33 d72", 2, 3, 33, 72, kH200Sms}, {"b2 h5 t7 d200", 2, 5, 7, 200, kH200Sms},
      {"b3 h4 t130 d64 1sm", 3, 4, 130, 64, 1},
  };
  for (const RopeCase &c : rope_cases) {
    ok &= check_rope<float>(c, rng);
    ok &= check_rope<bf16>(c, rng);
    ok &= check_rope<f16>(c, rng);
  }

  // Split: P = T, Q = n; merge: P = n, Q = T.
  const unsigned H = kH200Sms;
  const HeadsCase heads_cases[] = {
      {"split b2 t33 n3 d64", 2, 33, 3, 64, false, H},
      {"merge b2 n3 t33 d64", 2, 3, 33, 64, false, H},
      {"split b2 t33 n3 d64 off1", 2, 33, 3, 64, true, H},
      {"merge b1 n12 t130 d72 1sm", 1, 12, 130, 72, false, 1},
      {"split b2 t7 n5 d4", 2, 7, 5, 4, false, H},
      {"merge b2 n5 t7 d2", 2, 5, 7, 2, false, H},
      {"split b3 t9 n4 d1", 3, 9, 4, 1, false, H},
      {"merge b2 n4 t9 d3 off1", 2, 4, 9, 3, true, H},
      {"split b1 t1 n6 d100", 1, 1, 6, 100, false, H},
      {"merge b2 n1 t33 d12", 2, 1, 33, 12, false, H},
  };
  for (const HeadsCase &c : heads_cases) {
    ok &= check_heads<float>(c, rng);
    ok &= check_heads<bf16>(c, rng);
    ok &= check_heads<f16>(c, rng);
  }

  const NCase drop_cases[] = {
      {"n1", 1, kH200Sms}, {"n1221", 33 * 37, kH200Sms}, {"n100880 1sm", 130 * 776, 1}};
  for (const NCase &c : drop_cases)
    for (double rate : {0.1, 0.5, 0.9}) {
      ok &= check_dropout<float>(c, rate, rng);
      ok &= check_dropout<bf16>(c, rate, rng);
      ok &= check_dropout<f16>(c, rate, rng);
    }
  return emu_check::finish(ok);
}
