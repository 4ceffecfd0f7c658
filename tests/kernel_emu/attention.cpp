// The attention kernels (kernels/attention_*.cu) run in the CPU emulator (cuda_emu.h) against a
// double-precision reference, launched as src/kernels/cuda/attention.rs launches them:
// - bf16 cases: the tensor-core forward (64- and 128-row) and backward (64- and 128-key) where
//   the head dim is 64 or 128 (64-row and 64-key, two warps a key tile, where it is 256), and
//   for every case below 256 the CUDA-core backward in f32 on the same inputs widened (what
//   f32 training runs);
// - 16-bit cases, bf16 and f16: what the launcher's `Auto` takes for the shape (and `MmaWide`'s
//   128-row forward and 128-key backward beside `Mma`'s): the tensor-core kernels where the
//   head dim is 64 or 128 and the query block has more than DECODE_MAX_TQ rows, or the head dim
//   is 256 and the decode stream does not take the rows, else the CUDA-core forward (one key
//   slice) and backward in the storage dtype, at DPL 1 to 4 in each.
// The decode stream and the split-key forward are attention_decode.cpp's.
// Fresh random inputs of awkward sizes: causal with and without a position offset,
// grouped-query heads, padded keys with a hole, sequences that end mid-tile, head dims only the
// CUDA-core kernels take.
//
// Usage: attention [seed]  (a random seed when none is given; it is printed either way).
#include "emu_check.h"

namespace temper {
namespace attn {
EMU_DYNAMIC_SHARED(smem_raw, 232448)
}
}  // namespace temper

#include "attention_prep.cu"
#include "attention_fwd.cu"
#include "attention_bwd.cu"

#include "attention_ref.h"

namespace {

using bf16 = __nv_bfloat16;
using f16 = __half;
using Kernel = void (*)(const AttnParams);

// sm_count(dev) in the launcher's grid choices: an H100 / H200.
constexpr int kSmCount = 132;

// Per dtype: the entry points the launcher's names resolve to, and the bounds on each output.
// A bound on o, dq, dk or dv is relative to the output's largest magnitude; on lse absolute.
// Every kernel computes in f32 from inputs exact in T (and the reference in double from the
// same values), so what separates them is where T's rounding (unit roundoff u) enters.
template <typename T> struct Dt;

#define SIMPLE_ENTRIES(SUF)                                                                   \
  static constexpr Kernel fwd_simple[4] = {attn_fwd_simple_##SUF##_d1,                       \
                                           attn_fwd_simple_##SUF##_d2,                       \
                                           attn_fwd_simple_##SUF##_d3,                       \
                                           attn_fwd_simple_##SUF##_d4};                      \
  static constexpr Kernel bwd_dq_simple[4] = {attn_bwd_dq_simple_##SUF##_d1,                 \
                                              attn_bwd_dq_simple_##SUF##_d2,                 \
                                              attn_bwd_dq_simple_##SUF##_d3,                 \
                                              attn_bwd_dq_simple_##SUF##_d4};                \
  static constexpr Kernel bwd_dkdv_simple[4] = {attn_bwd_dkdv_simple_##SUF##_d1,             \
                                                attn_bwd_dkdv_simple_##SUF##_d2,             \
                                                attn_bwd_dkdv_simple_##SUF##_d3,             \
                                                attn_bwd_dkdv_simple_##SUF##_d4};            \
  static constexpr Kernel fwd_simple_seg[4] = {attn_fwd_simple_seg_##SUF##_d1,               \
                                               attn_fwd_simple_seg_##SUF##_d2,               \
                                               attn_fwd_simple_seg_##SUF##_d3,               \
                                               attn_fwd_simple_seg_##SUF##_d4};              \
  static constexpr Kernel bwd_dq_simple_seg[4] = {attn_bwd_dq_simple_seg_##SUF##_d1,         \
                                                  attn_bwd_dq_simple_seg_##SUF##_d2,         \
                                                  attn_bwd_dq_simple_seg_##SUF##_d3,         \
                                                  attn_bwd_dq_simple_seg_##SUF##_d4};        \
  static constexpr Kernel bwd_dkdv_simple_seg[4] = {attn_bwd_dkdv_simple_seg_##SUF##_d1,     \
                                                    attn_bwd_dkdv_simple_seg_##SUF##_d2,     \
                                                    attn_bwd_dkdv_simple_seg_##SUF##_d3,     \
                                                    attn_bwd_dkdv_simple_seg_##SUF##_d4};    \
  static constexpr Kernel bwd_dot = attn_bwd_dot_##SUF;

// fwd_mma[hd(d)][mt - 1]: attn_fwd_mma (64-row blocks) and attn_fwd_mma2 (128-row) per head
// dim; bwd_mma[hd(d)][w == 8]: attn_bwd_mma (4 warps) and attn_bwd_mma2 (8). D = 256 has
// 64-row forward blocks only, and two backwards: attn_bwd_mma (8 warps, 64 keys) and
// attn_bwd_mma_narrow (4 warps, 32 keys, 16-row query tiles; sm_86 and sm_89).
#define MMA_ENTRIES(SUF)                                                                      \
  static constexpr Kernel fwd_mma[3][2] = {                                                   \
      {attn_fwd_mma_##SUF##_h64, attn_fwd_mma2_##SUF##_h64},                                  \
      {attn_fwd_mma_##SUF##_h128, attn_fwd_mma2_##SUF##_h128},                                \
      {attn_fwd_mma_##SUF##_h256, nullptr}};                                                  \
  static constexpr Kernel bwd_mma[3][2] = {                                                  \
      {attn_bwd_mma_##SUF##_h64, attn_bwd_mma2_##SUF##_h64},                                  \
      {attn_bwd_mma_##SUF##_h128, attn_bwd_mma2_##SUF##_h128},                                \
      {attn_bwd_mma_narrow_##SUF##_h256, attn_bwd_mma_##SUF##_h256}};                         \
  static constexpr Kernel dq_convert = attn_dq_convert_##SUF;

// The row of fwd_mma and bwd_mma for a head dim the tensor cores take.
int hd(int d) { return d == 64 ? 0 : d == 128 ? 1 : 2; }

template <> struct Dt<float> : emu_check::Dt<float> {
  SIMPLE_ENTRIES(f32)
  // f32 rounding alone, summed over at most a few hundred keys and D dimensions.
  static constexpr double simple_grad_tol = 1e-4;
};

// The CUDA-core kernels round only their outputs to T (o; dq, dk, dv), which moves an output
// by at most u of the largest one: a bound of 2u on the forward (attention_decode.cpp's) leaves
// room for nothing but the f32 sums. The backward also reads an o rounded to T, whose error
// reaches every dS through rowsum(dO * O) (dq and dk; dv does not see it): 5u there, where up
// to 1.6u is measured (15 seeds). The tensor-core kernels also round P (forward and backward)
// and dS (backward) to T before their second mma; bf16's bounds are the ones its cases always
// had, about 5u on o and 8u on the gradients, where up to 0.9u and 1.5u are measured. lse
// never passes through T (S and the row sums stay f32), so its bound does not depend on T.
template <> struct Dt<bf16> : emu_check::Dt<bf16> {
  SIMPLE_ENTRIES(bf16)
  MMA_ENTRIES(bf16)
  static constexpr double simple_o_tol = 8e-3, simple_grad_tol = 2e-2;
  static constexpr double mma_o_tol = 2e-2, mma_grad_tol = 3e-2, mma_lse_tol = 2e-3;
};
// f16's u is an eighth of bf16's and every rounding above scales with it (the f32 arithmetic
// around them is still 2^13 times finer), so the same multiples of u keep the same margins,
// rounded up to the one digit the log prints: 2u and 6u on the CUDA-core kernels, 6u and 8u on
// the tensor-core ones.
template <> struct Dt<f16> : emu_check::Dt<f16> {
  SIMPLE_ENTRIES(f16)
  MMA_ENTRIES(f16)
  static constexpr double simple_o_tol = 1e-3, simple_grad_tol = 3e-3;
  static constexpr double mma_o_tol = 3e-3, mma_grad_tol = 4e-3, mma_lse_tol = 2e-3;
};

struct Case {
  const char *name;
  int b, hq, hkv, tq, tk, d;
  bool causal;
  int offset;
  bool mask;  // left padding plus a hole in the keys of every sequence
  // Packed rows (causal, offset 0, tq == tk): documents of random lengths back to back, then
  // padding as a document of its own (src/kernels/segments.rs).
  bool packed = false;
  int window = 0;  // a sliding window of this many keys (causal), 0: none
  double softcap = 0;  // Gemma 2's cap on the scores, 0: none
};

template <typename T> struct Inputs {
  Case c;
  std::vector<T> q, k, v, dout;
  std::vector<float> kvalid;
  std::vector<int> seg_start, seg_end;  // [b, tq] where packed, else empty
};

// Segments::from_lengths for random documents: mostly short ones (1 to 40 tokens, so that
// tiles hold several boundaries), some long, and up to a sixth of the row left as padding.
void pack_rows(const Case &c, emu_check::Rng &rng, std::vector<int> &start, std::vector<int> &end) {
  start.assign((size_t)c.b * c.tq, -1);
  end.assign((size_t)c.b * c.tq, -1);
  for (int b = 0; b < c.b; ++b) {
    const int used = c.tq - (int)(rng.uniform() * c.tq / 6);
    int at = 0;
    while (at < c.tq) {
      int n = rng.uniform() < 0.8 ? 1 + (int)(rng.uniform() * 40) : 1 + (int)(rng.uniform() * 150);
      n = at < used ? std::min(n, used - at) : c.tq - at;
      for (int i = at; i < at + n; ++i) {
        start[(size_t)b * c.tq + i] = at;
        end[(size_t)b * c.tq + i] = at + n;
      }
      at += n;
    }
  }
}

template <typename T> Inputs<T> make_inputs(const Case &c, emu_check::Rng &rng) {
  Inputs<T> in{c, {}, {}, {}, {}, {}, {}, {}};
  if (c.packed) pack_rows(c, rng, in.seg_start, in.seg_end);
  in.q = emu_check::normals<T>((size_t)c.b * c.hq * c.tq * c.d, rng);
  in.k = emu_check::normals<T>((size_t)c.b * c.hkv * c.tk * c.d, rng);
  in.v = emu_check::normals<T>((size_t)c.b * c.hkv * c.tk * c.d, rng);
  in.dout = emu_check::normals<T>((size_t)c.b * c.hq * c.tq * c.d, rng);
  if (c.mask) {
    in.kvalid.assign((size_t)c.b * c.tk, 1.f);
    for (int b = 0; b < c.b; ++b) {
      const int pad = (int)(rng.uniform() * c.tk / 3);
      for (int j = 0; j < pad; ++j) in.kvalid[(size_t)b * c.tk + j] = 0.f;
      const int hole = pad + (int)(rng.uniform() * (c.tk - pad));
      for (int j = hole; j < std::min(c.tk, hole + 5); ++j) in.kvalid[(size_t)b * c.tk + j] = 0.f;
    }
  }
  return in;
}

// The values of x in T: exact here, where T is S or wider.
template <typename T, typename S> std::vector<T> as(const std::vector<S> &x) {
  std::vector<T> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = Dt<T>::from((float)emu_check::value(x[i]));
  return y;
}

// x rounded to T, through f32 as the kernels store it.
template <typename T> std::vector<T> rounded(const std::vector<double> &x) {
  std::vector<T> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = Dt<T>::from((float)x[i]);
  return y;
}

using Reference = attention_ref::Result;

attention_ref::Shape shape(const Case &c) {
  return {c.b, c.hq, c.hkv, c.tq, c.tk, c.tk, c.d, c.causal, c.offset, nullptr, c.window,
          c.softcap};
}

// Softmax attention and its gradients in double, from the stored inputs.
template <typename T> Reference reference(const Inputs<T> &in) {
  attention_ref::Shape s = shape(in.c);
  if (in.c.packed) s.seg_start = &in.seg_start;
  return attention_ref::reference(s, in.q, in.k, in.v, in.kvalid, &in.dout);
}

// ---------------------------------------------------------------------------------------
// The launcher (src/kernels/cuda/attention.rs), on the host.
// ---------------------------------------------------------------------------------------
unsigned div_ceil(int a, int b) { return (unsigned)((a + b - 1) / b); }

// FlashAttn::params (the scale in f64, then f32, as the op holds it), and attn_key_range first
// where there is a key mask; `krange` must outlive the params. k and v are contiguous, so no
// KV cache capacity.
template <typename T> AttnParams params(const Inputs<T> &in, std::vector<int> &krange) {
  AttnParams p = attention_ref::params(shape(in.c));
  const double scale = 1.0 / std::sqrt((double)in.c.d);
  p.scale_log2 = (float)(scale * 1.4426950408889634);
  p.scale = (float)scale;
  attention_ref::key_range(shape(in.c), in.kvalid, p, krange);
  if (in.c.packed) {
    p.seg_start = in.seg_start.data();
    p.seg_end = in.seg_end.data();
  }
  return p;
}

// AttnParams::simple_variant: the CUDA-core kernels' `_seg` entry points read the band.
bool banded(const Case &c) { return c.packed || c.window > 0; }

// FlashAttn::decode_rows for a 16-bit dtype under Auto (rows 16-byte aligned here): whether
// the forward would take the decode stream rather than the simple kernel.
bool takes_decode_stream(const Case &c) {
  return (c.d == 64 || c.d == 128 || c.d == 256) && c.hq / c.hkv * c.tq <= 4;
}

// FlashAttn::use_mma for a 16-bit dtype under Auto (Mma and MmaWide need only the head dim):
// at D = 256, which no simple kernel takes, every forward the decode stream does not take.
bool use_mma_auto(const Case &c) {
  if (c.d == 256) return !takes_decode_stream(c);
  return (c.d == 64 || c.d == 128) && c.tq > 16;
}

// Dims::simple_row_blocks: (warps per block, blocks along y).
std::pair<unsigned, unsigned> simple_row_blocks(const Case &c) {
  const int rows = c.hq / c.hkv * c.tq;
  const int nw = std::clamp(rows, 1, 8);
  return {(unsigned)nw, div_ceil(rows, nw)};
}

// decode_splits: the simple forward's key slices.
int decode_splits(const Case &c) {
  const int base = (int)simple_row_blocks(c).second * c.b * c.hkv;
  const int target = 2 * kSmCount;
  if (base < target && c.tk > 256)
    return std::min(std::min((int)div_ceil(target, base), (int)div_ceil(c.tk, 128)), 64);
  return 1;
}

size_t fwd_smem(int d, int mt) {
  if (d == 64) return mt == 1 ? MmaFwdTraits<64, 1>::kSmemBytes : MmaFwdTraits<64, 2>::kSmemBytes;
  if (d == 256) return MmaFwdTraits<256, 1>::kSmemBytes;
  return mt == 1 ? MmaFwdTraits<128, 1>::kSmemBytes : MmaFwdTraits<128, 2>::kSmemBytes;
}

size_t bwd_smem(int d, int w) {
  if (d == 64) return w == 8 ? MmaBwdTraits<64, 8>::kSmemBytes : MmaBwdTraits<64, 4>::kSmemBytes;
  if (d == 256) return w == 8 ? MmaBwdTraits<256, 8>::kSmemBytes : MmaBwdTraits<256, 4>::kSmemBytes;
  return w == 8 ? MmaBwdTraits<128, 8>::kSmemBytes : MmaBwdTraits<128, 4>::kSmemBytes;
}

// ---------------------------------------------------------------------------------------
// Checks.
// ---------------------------------------------------------------------------------------
std::string label(const Case &c, const char *dtype, const char *what) {
  return std::string(c.name) + " " + dtype + " " + what;
}

// A forward's params with its outputs, o and lse, allocated as NaN (so an unwritten element
// fails its check).
template <typename T> struct Forward {
  std::vector<int> krange;
  AttnParams p;
  std::vector<T> o;
  std::vector<float> lse;
  explicit Forward(const Inputs<T> &in)
      : p(params(in, krange)), o(in.q.size(), Dt<T>::from(NAN)),
        lse((size_t)in.c.b * in.c.hq * in.c.tq, NAN) {
    p.q = in.q.data();
    p.k = in.k.data();
    p.v = in.v.data();
    p.o = o.data();
    p.lse = lse.data();
  }
};

// The tensor-core forward (launch_fwd_mma) with MT 16-row tiles per warp: o and lse.
template <typename T> bool check_forward(const Inputs<T> &in, const Reference &r, int mt) {
  const Case &c = in.c;
  Forward<T> f(in);
  AttnParams &p = f.p;
  const int bq = 64 * mt;  // AttnImpl::fwd_block_q: 128 under MmaWide
  const Kernel kernel = Dt<T>::fwd_mma[hd(c.d)][mt - 1];
  emu::launch({(unsigned)(c.b * c.hq), div_ceil(c.tq, bq), 1}, {128, 1, 1}, fwd_smem(c.d, mt),
              [&] { kernel(p); });
  const std::string what = label(c, Dt<T>::name, mt == 1 ? "fwd mma" : "fwd mma2");
  bool ok = emu_check::close(what + " o", f.o, r.o, Dt<T>::mma_o_tol);
  ok &= emu_check::close_abs(what + " lse", f.lse, r.lse, Dt<T>::mma_lse_tol);
  return ok;
}

// The CUDA-core forward (launch_fwd_simple) in T with one key slice: warps over the G * Tq
// rows of a kv head.
template <typename T> bool check_forward_simple(const Inputs<T> &in, const Reference &r) {
  const Case &c = in.c;
  Forward<T> f(in);
  AttnParams &p = f.p;
  const auto [nw, row_blocks] = simple_row_blocks(c);
  const Kernel kernel = (banded(c) ? Dt<T>::fwd_simple_seg : Dt<T>::fwd_simple)[div_ceil(c.d, 32) - 1];
  emu::launch({(unsigned)(c.b * c.hkv), row_blocks, 1}, {32 * nw, 1, 1}, 0, [&] { kernel(p); });
  const std::string what = label(c, Dt<T>::name, "fwd simple");
  bool ok = emu_check::close(what + " o", f.o, r.o, Dt<T>::simple_o_tol);
  ok &= emu_check::close_abs(what + " lse", f.lse, r.lse, 1e-4);
  return ok;
}

// A backward's params on the stored inputs in T (the bf16 ones widened for f32), fed the
// reference's lse and its output rounded as the forward would store it, with its outputs
// (dvec, dq, dk, dv) allocated as NaN; dq_acc is the tensor-core backward's, zeroed.
template <typename T> struct Backward {
  std::vector<int> krange;
  AttnParams p;
  std::vector<T> q, k, v, dout, o;
  std::vector<float> lse, dvec, dq_acc;
  std::vector<T> dq, dk, dv;
  template <typename S>
  Backward(const Inputs<S> &in, const Reference &r)
      : p(params(in, krange)), q(as<T>(in.q)), k(as<T>(in.k)), v(as<T>(in.v)),
        dout(as<T>(in.dout)), o(rounded<T>(r.o)), lse(r.lse.begin(), r.lse.end()),
        dvec((size_t)p.nrows, NAN), dq_acc(q.size(), 0.f), dq(q.size(), Dt<T>::from(NAN)),
        dk(k.size(), Dt<T>::from(NAN)), dv(v.size(), Dt<T>::from(NAN)) {
    p.q = q.data();
    p.k = k.data();
    p.v = v.data();
    p.o = o.data();
    p.dout = dout.data();
    p.lse = lse.data();
    p.dvec = dvec.data();
    p.dq = dq.data();
    p.dk = dk.data();
    p.dv = dv.data();
  }

  bool check(const Case &c, const Reference &r, const char *what, double tol) const {
    const std::string w = label(c, Dt<T>::name, what);
    bool ok = emu_check::close(w + " dq", dq, r.dq, tol);
    ok &= emu_check::close(w + " dk", dk, r.dk, tol);
    ok &= emu_check::close(w + " dv", dv, r.dv, tol);
    return ok;
  }
};

// The tensor-core backward (launch_bwd_dot, launch_bwd_mma: bwd_mma, then dq_convert) with
// W warps of 16 keys a block: attn_bwd_mma (W = 4) or attn_bwd_mma2 (W = 8, MmaWide's); at
// D = 256, W = 8 warps of 8 keys each (attn_bwd_mma_*_h256).
template <typename T> bool check_backward(const Inputs<T> &in, const Reference &r, int w) {
  const Case &c = in.c;
  Backward<T> bw(in, r);
  AttnParams &p = bw.p;
  p.dq_acc = bw.dq_acc.data();
  emu::launch({div_ceil(p.nrows, 8), 1, 1}, {256, 1, 1}, 0, [&] { Dt<T>::bwd_dot(p); });
  const Kernel kernel = Dt<T>::bwd_mma[hd(c.d)][w == 8];
  // AttnImpl::bwd_block_k: 128 under MmaWide; 64 at D = 256, 32 in its narrow variant
  // (bwd_block_k_within)
  const int bk = c.d == 256 ? 8 * w : 16 * w;
  emu::launch({(unsigned)(c.b * c.hkv), div_ceil(c.tk, bk), 1}, {32u * w, 1, 1},
              bwd_smem(c.d, w), [&] { kernel(p); });
  emu::launch({emu_check::grid_stride(bw.dq.size(), kSmCount), 1, 1}, {256, 1, 1}, 0,
              [&] { Dt<T>::dq_convert(p); });
  const char *what = c.d == 256 ? (w == 8 ? "bwd mma split" : "bwd mma narrow")
                     : w == 8     ? "bwd mma2"
                                  : "bwd mma";
  return bw.check(c, r, what, Dt<T>::mma_grad_tol);
}

// The CUDA-core backward (launch_bwd_dot, launch_bwd_simple: bwd_dq_simple, then
// bwd_dkdv_simple) in T, for any head dim.
template <typename T, typename S>
bool check_backward_simple(const Inputs<S> &in, const Reference &r) {
  const Case &c = in.c;
  Backward<T> bw(in, r);
  AttnParams &p = bw.p;
  emu::launch({div_ceil(p.nrows, 8), 1, 1}, {256, 1, 1}, 0, [&] { Dt<T>::bwd_dot(p); });
  const int dpl = (int)div_ceil(c.d, 32);
  const auto [nw, row_blocks] = simple_row_blocks(c);
  emu::launch({(unsigned)(c.b * c.hkv), row_blocks, 1}, {32 * nw, 1, 1}, 0,
              [&] { (banded(c) ? Dt<T>::bwd_dq_simple_seg : Dt<T>::bwd_dq_simple)[dpl - 1](p); });
  emu::launch({(unsigned)(c.b * c.hkv), div_ceil(c.tk, 8), 1}, {256, 1, 1}, 0,
              [&] { (banded(c) ? Dt<T>::bwd_dkdv_simple_seg : Dt<T>::bwd_dkdv_simple)[dpl - 1](p); });
  return bw.check(c, r, "bwd simple", Dt<T>::simple_grad_tol);
}

// The tensor-core forward and backward at D = 256: 64-row blocks, the split backward and its
// narrow variant.
template <typename T> bool check_mma_256(const Inputs<T> &in, const Reference &r) {
  return check_forward(in, r, 1) & check_backward(in, r, 8) & check_backward(in, r, 4);
}

// A bf16 case: the tensor-core kernels where they apply (both forward widths), and the f32
// CUDA-core backward on the same values (which the launcher leaves to the reference at D = 256).
bool run_bf16_and_f32(const Case &c, emu_check::Rng &rng) {
  const Inputs<bf16> in = make_inputs<bf16>(c, rng);
  const Reference r = reference(in);
  if (c.d == 256) return check_mma_256(in, r);
  bool ok = true;
  if (c.d == 64 || c.d == 128) {
    ok &= check_forward(in, r, 1);
    ok &= check_forward(in, r, 2);
    ok &= check_backward(in, r, 4);
    ok &= check_backward(in, r, 8);
  }
  ok &= check_backward_simple<float>(in, r);
  return ok;
}

// A 16-bit case through the kernels Auto takes for it: the tensor cores (and MmaWide's
// forward and backward), or the simple forward and backward in T. The driver covers the simple
// forward's unsplit launch only; a shape that would take the decode stream or split the keys
// is a mistake in the case table.
template <typename T> bool run_auto(const Case &c, emu_check::Rng &rng) {
  const Inputs<T> in = make_inputs<T>(c, rng);
  const Reference r = reference(in);
  if (use_mma_auto(c) && c.d == 256) return check_mma_256(in, r);
  if (use_mma_auto(c)) {
    bool ok = check_forward(in, r, 1);
    ok &= check_forward(in, r, 2);
    ok &= check_backward(in, r, 4);
    ok &= check_backward(in, r, 8);
    return ok;
  }
  if (takes_decode_stream(c) || decode_splits(c) > 1)
    return emu_check::check(label(c, Dt<T>::name, "takes the simple forward unsplit"), false);
  bool ok = check_forward_simple(in, r);
  ok &= check_backward_simple<T>(in, r);
  return ok;
}

enum class Dtype { BF16, F16 };

struct TypedCase {
  Dtype dt;
  Case c;
};

}  // namespace

int main(int argc, char **argv) {
  emu_check::Rng rng(emu_check::seed(argc, argv));
  const Case cases[] = {
      {"causal d64 gqa tq301", 2, 4, 2, 301, 301, 64, true, 0, false},
      {"causal d128 tq173", 1, 2, 2, 173, 173, 128, true, 0, false},
      {"causal d64 offset", 1, 2, 1, 77, 200, 64, true, 123, false},
      // A tile's last query sees exactly the first key of a warp (offset + i_last = 96 and
      // 48, 80, 96): the edge of the backward's causal skips.
      {"causal d64 tq97", 1, 2, 2, 97, 97, 64, true, 0, false},
      {"causal d128 offset17", 1, 2, 1, 80, 97, 128, true, 17, false},
      {"masked d64 causal", 2, 2, 2, 150, 150, 64, true, 0, true},
      {"masked d128 full", 2, 2, 1, 97, 130, 128, false, 0, true},
      // Head dims only the CUDA-core kernels take.
      {"masked d40 gqa causal", 2, 4, 2, 45, 70, 40, true, 25, true},
      {"d96 full", 1, 2, 2, 33, 33, 96, false, 0, false},
      // Packed rows: every kernel's document mask, boundaries inside and across tiles.
      {"packed d64 gqa tq301", 2, 4, 2, 301, 301, 64, true, 0, false, true},
      {"packed d128 tq173", 2, 2, 1, 173, 173, 128, true, 0, false, true},
      {"packed d40 gqa tq90", 2, 4, 2, 90, 90, 40, true, 0, false, true},
      // Sliding windows: a band of keys per query whose edges cross tiles at every angle, with
      // an offset (early rows see all their keys), a key mask, packed rows, the CUDA-core dims.
      {"window37 d64 gqa tq301", 2, 4, 2, 301, 301, 64, true, 0, false, false, 37},
      {"window90 d128 offset", 1, 2, 1, 80, 200, 128, true, 120, false, false, 90},
      {"window16 masked d64", 2, 2, 2, 150, 150, 64, true, 0, true, false, 16},
      {"window50 packed d128 tq173", 2, 2, 1, 173, 173, 128, true, 0, false, true, 50},
      {"window2 d64 tq70", 1, 2, 2, 70, 70, 64, true, 0, false, false, 2},
      {"window20 masked d40 gqa", 2, 4, 2, 45, 70, 40, true, 25, true, false, 20},
      // Gemma's head dim: the 64-row forward, and the backward whose two warps a key tile
      // split the head dim (a tile's last query sees exactly a warp's first key at tq 97).
      {"causal d256 gqa4 tq97", 1, 4, 1, 97, 97, 256, true, 0, false},
      {"masked d256 offset", 2, 2, 1, 70, 130, 256, true, 60, true},
      {"window40 packed d256 tq150", 2, 2, 1, 150, 150, 256, true, 0, false, true, 40},
      // Gemma 2's soft cap, at caps that bite (scores of unit spread): every kernel's cap in
      // the forward and its slope in the backward (the tensor cores' recovered from P), with
      // GQA, a key mask and an offset, a window, and at D = 256.
      {"softcap2 d64 gqa tq97", 1, 4, 2, 97, 97, 64, true, 0, false, false, 0, 2.0},
      {"softcap1.5 masked d128 offset", 2, 2, 1, 70, 130, 128, true, 60, true, false, 0, 1.5},
      {"softcap2 window20 d256 tq97", 1, 2, 1, 97, 97, 256, true, 0, false, false, 20, 2.0},
      {"softcap1 d40 gqa full", 1, 4, 2, 33, 45, 40, false, 0, false, false, 0, 1.0},
  };
  using D = Dtype;
  const TypedCase cases16[] = {
      // The f16 tensor-core kernels, both head dims.
      {D::F16, {"causal d64 gqa tq93", 1, 4, 2, 93, 93, 64, true, 0, false}},
      {D::F16, {"masked d128 gqa2 offset", 2, 2, 1, 70, 100, 128, true, 30, true}},
      // The simple kernels in bf16 and f16 at DPL 1 to 4: head dims the tensor cores do not
      // take, and a query block of at most DECODE_MAX_TQ rows at one they do (more rows than
      // the decode stream takes). With padding up to 16 keys and an offset of 13, early rows
      // of the first case may see no key.
      {D::BF16, {"masked d40 gqa causal", 2, 4, 2, 37, 50, 40, true, 13, true}},
      {D::F16, {"masked d40 gqa causal", 2, 4, 2, 37, 50, 40, true, 13, true}},
      {D::BF16, {"d24 gqa full", 1, 4, 2, 21, 40, 24, false, 0, false}},
      {D::F16, {"d24 gqa full", 1, 4, 2, 21, 40, 24, false, 0, false}},
      {D::BF16, {"d96 causal tq33", 1, 2, 2, 33, 33, 96, true, 0, false}},
      {D::F16, {"d96 causal tq33", 1, 2, 2, 33, 33, 96, true, 0, false}},
      {D::BF16, {"masked d128 gqa4 tq12", 2, 4, 1, 12, 70, 128, true, 58, true}},
      {D::F16, {"masked d128 gqa4 tq12", 2, 4, 1, 12, 70, 128, true, 58, true}},
      {D::F16, {"packed d64 tq150", 1, 2, 2, 150, 150, 64, true, 0, false, true}},
      {D::BF16, {"packed d24 gqa tq70", 2, 4, 2, 70, 70, 24, true, 0, false, true}},
      {D::F16, {"window33 d64 gqa tq150", 1, 4, 2, 150, 150, 64, true, 0, false, false, 33}},
      {D::BF16, {"window30 masked d128 gqa4 tq12", 2, 4, 1, 12, 70, 128, true, 58, true, false, 30}},
      {D::F16, {"window9 d24 gqa tq70", 2, 4, 2, 70, 70, 24, true, 0, false, false, 9}},
      // D = 256 in f16, and a query block short enough for the decode path whose rows (G * Tq
      // = 24) the decode stream does not take: the 64-row tensor-core tile, mostly empty.
      {D::F16, {"d256 full", 1, 2, 2, 40, 70, 256, false, 0, false}},
      {D::BF16, {"masked d256 gqa2 tq12", 2, 4, 2, 12, 70, 256, true, 58, true}},
      // The simple kernels in 16 bits under a cap.
      {D::F16, {"softcap2 masked d40 gqa", 2, 4, 2, 37, 50, 40, true, 13, true, false, 0, 2.0}},
      {D::BF16, {"softcap1.5 window9 d24", 2, 4, 2, 70, 70, 24, true, 0, false, false, 9, 1.5}},
  };
  bool ok = true;
  for (const Case &c : cases) ok &= run_bf16_and_f32(c, rng);
  for (const TypedCase &tc : cases16)
    ok &= tc.dt == D::BF16 ? run_auto<bf16>(tc.c, rng) : run_auto<f16>(tc.c, rng);
  return emu_check::finish(ok);
}
