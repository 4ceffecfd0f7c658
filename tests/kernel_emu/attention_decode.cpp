// The decode-attention kernels run in the CPU emulator (cuda_emu.h) against a double-precision
// reference: attn_decode_* and attn_combine_* (kernels/attention_decode.cu), and the split-K
// path of attn_fwd_simple_* (kernels/attention_fwd.cu) merged by attn_combine_*. One to a few
// queries per sequence against a KV cache whose capacity exceeds the filled length (and
// contiguous k, v), causal position offsets (with keys past every query's horizon), GQA,
// every head dim the decode kernels take (64, 128, 256) and a few the simple kernel takes, key masks with
// left padding and holes through attn_key_range (attention_prep.cu), among them a sequence
// with only its last keys valid (empty splits) and an all-padding one (rows that see no key),
// bf16, f16 and f32.
//
// attn_decode_fresh_* (generation's fused decode step) runs on cases of its own (run_fresh):
// q, k and v from a row of stacked projections, normalised per head (Qwen3; Gemma 3's gains
// 1 + w from f32 offsets) or not, rotated
// or not, against a cache whose next position holds NaN until the kernel writes it; checked
// against qkv_write's rounding and
// the reference attention over the cache with that position filled, and the cache itself
// (the new position written, every other one unchanged bit for bit).
//
// Launches mirror src/kernels/cuda/attention.rs for its `Auto` choice (`FlashAttn::forward`:
// decode_rows, launch_decode, launch_fwd_simple, decode_splits, split_and_combine,
// warp_per_row), with the 132 multiprocessors of an H100 / H200 as sm_count; every case
// that takes the decode kernel also runs forced `Simple` (TEMPER_ATTN_IMPL=simple). Every
// cache position no query may see (masked, past the causal horizon of every query, or
// between Tk and the capacity) holds NaN in k and v: the kernels promise that such a key
// never enters a sum, whatever it holds.
//
// Usage: attention_decode [seed]  (a random seed when none is given; it is printed either way).
#include "emu_check.h"

// The decode kernels' cp.async ring (kDecodeRingBytes); attention_fwd.cu declares the same
// array for the tensor-core forward, which nothing here launches.
namespace temper {
namespace attn {
EMU_DYNAMIC_SHARED(smem_raw, 32768)
}
}  // namespace temper

#include "attention_prep.cu"
#include "attention_fwd.cu"
#include "attention_decode.cu"

#include "attention_ref.h"

namespace {

using bf16 = __nv_bfloat16;
using f16 = __half;

// sm_count(dev) in the launcher's split choices: an H100 / H200.
constexpr int kSmCount = 132;

enum class Dtype { F32, BF16, F16 };
// TEMPER_ATTN_IMPL: auto (decode stream where it applies, else simple) or simple.
enum class Impl { Auto, Simple };

struct Case {
  const char *name;
  Dtype dt;
  int b, hq, hkv, tq, tk, cap, d;  // cap: positions per (batch, kv head) row of the cache
  bool causal;
  int offset;
  bool mask;  // sequence b % 3: left padding and a hole / only its last 1-3 keys / all padding
  int window = 0;  // a sliding window of this many keys (causal), 0: none
  double softcap = 0;  // Gemma 2's cap on the scores, 0: none
};

// The bound on o relative to its largest magnitude, by dtype.
template <typename T> struct Dt;
template <> struct Dt<float> : emu_check::Dt<float> {
  static constexpr double o_tol = 1e-5;
};
template <> struct Dt<bf16> : emu_check::Dt<bf16> {
  static constexpr double o_tol = 8e-3;
};
template <> struct Dt<f16> : emu_check::Dt<f16> {
  static constexpr double o_tol = 1e-3;
};

template <typename T> struct Inputs {
  Case c;
  std::vector<T> q;          // [B, Hq, Tq, D]
  std::vector<T> k, v;       // [B, Hkv, cap, D]: a KV cache, its first Tk positions filled
  std::vector<float> kvalid;  // [B, Tk], empty without a key mask
};

using Reference = attention_ref::Result;

attention_ref::Shape shape(const Case &c) {
  return {c.b,      c.hq,     c.hkv,   c.tq,     c.tk, c.cap, c.d, c.causal,
          c.offset, nullptr, c.window, c.softcap};
}

template <typename T> Inputs<T> make_inputs(const Case &c, emu_check::Rng &rng) {
  Inputs<T> in{c, {}, {}, {}, {}};
  in.q = emu_check::normals<T>((size_t)c.b * c.hq * c.tq * c.d, rng);
  in.k = emu_check::normals<T>((size_t)c.b * c.hkv * c.cap * c.d, rng);
  in.v = emu_check::normals<T>((size_t)c.b * c.hkv * c.cap * c.d, rng);
  if (c.mask) {
    in.kvalid.assign((size_t)c.b * c.tk, 1.f);
    for (int b = 0; b < c.b; ++b) {
      float *row = &in.kvalid[(size_t)b * c.tk];
      if (b % 3 == 0) {
        const int pad = (int)(rng.uniform() * c.tk / 2);
        for (int j = 0; j < pad; ++j) row[j] = 0.f;
        const int hole = pad + (int)(rng.uniform() * (c.tk - pad));
        for (int j = hole; j < std::min(c.tk, hole + 5); ++j) row[j] = 0.f;
      } else {
        const int keep = b % 3 == 1 ? 1 + (int)(rng.uniform() * 3) : 0;
        for (int j = 0; j < c.tk - keep; ++j) row[j] = 0.f;
      }
    }
  }
  // NaN in every position no query of the sequence sees.
  const T nan = temper::from_f32<T>(NAN);
  for (int b = 0; b < c.b; ++b)
    for (int j = 0; j < c.cap; ++j) {
      bool seen = false;  // by the last query, or under a window by an earlier one
      for (int i = 0; i < c.tq; ++i) seen |= attention_ref::sees(shape(c), in.kvalid, b, i, j);
      if (seen) continue;
      for (int h = 0; h < c.hkv; ++h)
        for (int e = 0; e < c.d; ++e) {
          const size_t at = (((size_t)b * c.hkv + h) * c.cap + j) * c.d + e;
          in.k[at] = nan;
          in.v[at] = nan;
        }
    }
  return in;
}

// ---------------------------------------------------------------------------------------
// The launcher (src/kernels/cuda/attention.rs), on the host.
// ---------------------------------------------------------------------------------------
using Kernel = void (*)(const AttnParams);

int div_ceil(int a, int b) { return (a + b - 1) / b; }

// FlashAttn::params, plus the KV cache capacity FlashAttn::forward sets for a cache view
// (cache_capacity: only when cap > Tk; a contiguous k, v leaves 0).
AttnParams params(const Case &c) {
  AttnParams p = attention_ref::params(shape(c));
  const double scale = 1.0 / std::sqrt((double)c.d);
  p.scale_log2 = (float)(scale * 1.4426950408889634);
  p.scale = (float)scale;
  p.kv_cap = c.cap > c.tk ? c.cap : 0;
  return p;
}

// The head dims of the tensor-core and decode kernels.
bool mma_dim(int d) { return d == 64 || d == 128 || d == 256; }

// FlashAttn::use_mma: never for these query blocks below head dim 256 (Tq <= DECODE_MAX_TQ
// under Auto); at 256, where the decode stream does not take them (FlashAttn::fwd_path asks
// the stream first).
bool use_mma(const Case &c, Impl imp) {
  const bool applies = c.dt != Dtype::F32 && mma_dim(c.d);
  return applies && imp == Impl::Auto && (c.tq > 16 || c.d == 256);
}

// FlashAttn::decode_rows: R of the attn_decode kernel, or 0. The cache rows start 16-byte
// aligned here (vectors from operator new, rows of D 16-bit values).
int decode_rows(const Case &c, Impl imp) {
  const bool fits = imp == Impl::Auto && c.dt != Dtype::F32 && mma_dim(c.d);
  const int rows = c.hq / c.hkv * c.tq;
  if (!fits) return 0;
  return rows <= 2 ? rows : rows <= 4 ? 4 : 0;
}

// Dims::simple_row_blocks: (warps per block, blocks along y).
std::pair<int, int> simple_row_blocks(const Case &c) {
  const int rows = c.hq / c.hkv * c.tq;
  const int nw = std::clamp(rows, 1, 8);
  return {nw, div_ceil(rows, nw)};
}

// decode_splits: the simple forward's key slices.
// Dims::keys_seen: the keys a call splits, all of them or a window's.
int keys_seen(const Case &c) { return c.window > 0 ? std::min(c.tk, c.window + c.tq - 1) : c.tk; }

int decode_splits(const Case &c) {
  const int base = simple_row_blocks(c).second * c.b * c.hkv;
  const int target = 2 * kSmCount;
  const int keys = keys_seen(c);
  if (base < target && keys > 256)
    return std::min(std::min(div_ceil(target, base), div_ceil(keys, 128)), 64);
  return 1;
}

// launch_decode's key slices (decode_wave_splits), for the kernel of r rows: the blocks that
// fit at once are its launch bound's minimum a multiprocessor (kDecodeMinBlocks), where the
// launcher asks the driver for the kernel's occupancy.
int decode_stream_splits(const Case &c, int r) {
  const int base = std::max(c.b * c.hkv, 1);
  const int per_sm =
      r == 1 ? kDecodeMinBlocks<1> : r == 2 ? kDecodeMinBlocks<2> : kDecodeMinBlocks<4>;
  const int fit = per_sm * kSmCount;
  const int most = std::clamp(div_ceil(keys_seen(c), 256), 1, 64);
  const auto cost = [&](int s) {
    const double waves = div_ceil(base * s, fit);
    return waves * (1.0 / s + 0.05) + (s > 1 ? 0.1 : 0.0);
  };
  int best = 1;
  for (int s = 2; s <= most; ++s)
    if (cost(s) < cost(best)) best = s;
  return best;
}

// attn_decode_* (or with `fresh`, attn_decode_fresh_*) for head dim d and r rows.
template <typename T> Kernel decode_kernel(int d, int r, bool fresh);
#define DECODE_ROWS(SUF, D)                                                                   \
  {attn_decode_##SUF##_h##D##_r1, attn_decode_##SUF##_h##D##_r2, attn_decode_##SUF##_h##D##_r4}
#define DECODE_TABLE(T, SUF)                                                                  \
  template <> Kernel decode_kernel<T>(int d, int r, bool fresh) {                             \
    const Kernel k[2][3][3] = {                                                               \
        {DECODE_ROWS(SUF, 64), DECODE_ROWS(SUF, 128), DECODE_ROWS(SUF, 256)},                 \
        {DECODE_ROWS(fresh_##SUF, 64), DECODE_ROWS(fresh_##SUF, 128),                         \
         DECODE_ROWS(fresh_##SUF, 256)}};                                                     \
    return k[fresh][d == 64 ? 0 : d == 128 ? 1 : 2][r == 1 ? 0 : r == 2 ? 1 : 2];             \
  }
DECODE_TABLE(bf16, bf16)
DECODE_TABLE(f16, f16)
template <> Kernel decode_kernel<float>(int, int, bool) { return nullptr; }

// The `_seg` entry points where a window bands the rows (AttnParams::simple_variant).
template <typename T> Kernel simple_kernel(int dpl, bool banded);
#define SIMPLE_TABLE(T, SUF)                                                                  \
  template <> Kernel simple_kernel<T>(int dpl, bool banded) {                                 \
    const Kernel k[] = {attn_fwd_simple_##SUF##_d1, attn_fwd_simple_##SUF##_d2,               \
                        attn_fwd_simple_##SUF##_d3, attn_fwd_simple_##SUF##_d4};              \
    const Kernel ks[] = {attn_fwd_simple_seg_##SUF##_d1, attn_fwd_simple_seg_##SUF##_d2,      \
                         attn_fwd_simple_seg_##SUF##_d3, attn_fwd_simple_seg_##SUF##_d4};     \
    return (banded ? ks : k)[dpl - 1];                                                        \
  }
SIMPLE_TABLE(float, f32)
SIMPLE_TABLE(bf16, bf16)
SIMPLE_TABLE(f16, f16)

template <typename T> Kernel combine_kernel();
template <> Kernel combine_kernel<float>() { return attn_combine_f32; }
template <> Kernel combine_kernel<bf16>() { return attn_combine_bf16; }
template <> Kernel combine_kernel<f16>() { return attn_combine_f16; }

struct Launch {
  Kernel kernel;
  emu::Dim grid, block;
  size_t shared = 0;  // dynamic shared memory, bytes
};


// split_and_combine: the forward into NaN-filled f32 partials (the launcher's are
// uninitialised), then attn_combine_* with one warp per row (warp_per_row).
template <typename T>
void split_and_combine(const Case &c, AttnParams p, const Launch &fwd, int nsplit) {
  const int nrows = c.b * c.hq * c.tq;
  std::vector<float> opart((size_t)nsplit * nrows * c.d, NAN), lpart((size_t)nsplit * nrows, NAN);
  p.opart = opart.data();
  p.lsepart = lpart.data();
  p.nsplit = nsplit;
  emu::launch(fwd.grid, fwd.block, fwd.shared, [&] { fwd.kernel(p); });
  const Kernel combine = combine_kernel<T>();
  emu::launch({(unsigned)div_ceil(nrows, 8), 1, 1}, {256, 1, 1}, 0, [&] { combine(p); });
}

// launch_decode: one block of 4 warps per (batch, kv head), grid z the key slices.
template <typename T> int launch_decode(const Case &c, const AttnParams &p, int r) {
  const int nsplit = decode_stream_splits(c, r);
  const Launch fwd{decode_kernel<T>(c.d, r, false), {(unsigned)(c.b * c.hkv), 1, (unsigned)nsplit},
                   {128, 1, 1}, kDecodeRingBytes};
  if (nsplit == 1)
    emu::launch(fwd.grid, fwd.block, fwd.shared, [&] { fwd.kernel(p); });
  else
    split_and_combine<T>(c, p, fwd, nsplit);
  return nsplit;
}

// launch_fwd_simple: warps over the G * Tq rows of a kv head, grid z the key slices.
template <typename T> int launch_fwd_simple(const Case &c, const AttnParams &p) {
  const auto [nw, row_blocks] = simple_row_blocks(c);
  const int nsplit = decode_splits(c);
  const Launch fwd{simple_kernel<T>(div_ceil(c.d, 32), c.window > 0),
                   {(unsigned)(c.b * c.hkv), (unsigned)row_blocks, (unsigned)nsplit},
                   {(unsigned)(32 * nw), 1, 1}};
  if (nsplit == 1)
    emu::launch(fwd.grid, fwd.block, fwd.shared, [&] { fwd.kernel(p); });
  else
    split_and_combine<T>(c, p, fwd, nsplit);
  return nsplit;
}

// FlashAttn::forward under `imp` (attn_key_range first when there is a key mask), checked
// against the reference.
template <typename T> bool check(const Inputs<T> &in, const Reference &ref, Impl imp) {
  const Case &c = in.c;
  if (decode_rows(c, imp) == 0 && use_mma(c, imp)) {
    std::printf("FAIL %s: the launcher would take the tensor-core forward\n", c.name);
    return false;
  }
  AttnParams p = params(c);
  std::vector<int> krange;
  attention_ref::key_range(shape(c), in.kvalid, p, krange);
  std::vector<T> o(in.q.size(), temper::from_f32<T>(NAN));
  std::vector<float> lse((size_t)c.b * c.hq * c.tq, NAN);
  p.q = in.q.data();
  p.k = in.k.data();
  p.v = in.v.data();
  p.o = o.data();
  p.lse = lse.data();
  const int r = decode_rows(c, imp);
  int nsplit;
  std::string what = std::string(c.name) + " " + Dt<T>::name;
  if (r > 0) {
    nsplit = launch_decode<T>(c, p, r);
    what += " decode r" + std::to_string(r);
  } else {
    nsplit = launch_fwd_simple<T>(c, p);
    what += " simple";
  }
  what += " x" + std::to_string(nsplit);
  bool ok = emu_check::close(what + " o", o, ref.o, Dt<T>::o_tol);
  ok &= emu_check::close_abs(what + " lse", lse, ref.lse, 1e-4);
  return ok;
}

template <typename T> bool run_case(const Case &c, emu_check::Rng &rng) {
  const Inputs<T> in = make_inputs<T>(c, rng);
  // Softmax attention in double, from the stored inputs.
  const Reference ref = attention_ref::reference(shape(c), in.q, in.k, in.v, in.kvalid);
  bool ok = check(in, ref, Impl::Auto);
  // No simple kernel takes head dim 256 (the launcher leaves it to the reference).
  if (decode_rows(c, Impl::Auto) > 0 && c.d <= 128) ok &= check(in, ref, Impl::Simple);
  return ok;
}

// ---------------------------------------------------------------------------------------
// The fused decode step (attention::decode_fresh in src/kernels/cuda/attention.rs).
// ---------------------------------------------------------------------------------------
struct FreshCase {
  const char *name;
  int b, hq, hkv, cap, len, d;  // len: the cache length L, the position the kernel writes
  bool rope, mask;              // mask: padding and holes below L in sequences b % 3 == 0
  bool norm = false;            // Qwen3's per-head RMSNorm of q and k, before the rotation
  bool plus_one = false;        // the norm's gains Gemma's 1 + w, from f32 offsets w
  double softcap = 0;           // Gemma 2's cap on the scores, 0: none
};

// One step: y [B, (Hq + 2 Hkv) D], the caches with [0, L) filled and NaN from L on, the key
// mask [B, cap] as the static step keeps it (1 up to and including L, bar padding), launched
// as launch_decode launches with tk = cap and a causal offset of cap - 1.
template <typename T> bool run_fresh(const FreshCase &fc, emu_check::Rng &rng) {
  using emu_check::value;
  const int B = fc.b, Hq = fc.hq, Hkv = fc.hkv, cap = fc.cap, L = fc.len, D = fc.d;
  const int width = (Hq + 2 * Hkv) * D, half = D / 2;
  const std::vector<T> y = emu_check::normals<T>((size_t)B * width, rng);
  const float eps = 1e-6f;
  std::vector<T> qg, kg;
  for (auto *g : {&qg, &kg})
    for (int e = 0; e < D; ++e) g->push_back(temper::from_f32<T>(1.f + 0.5f * (float)rng.normal()));
  std::vector<float> qo, ko;  // Gemma's offsets (plus_one)
  for (auto *g : {&qo, &ko})
    for (int e = 0; e < D; ++e) g->push_back(0.5f * (float)rng.normal());
  std::vector<T> cos_t, sin_t;
  if (fc.rope)
    for (int i = 0; i < B * half; ++i) {
      const float th = 6.2831853f * rng.uniform();
      cos_t.push_back(temper::from_f32<T>(std::cos(th)));
      sin_t.push_back(temper::from_f32<T>(std::sin(th)));
    }
  const T nan = temper::from_f32<T>(NAN);
  std::vector<T> k = emu_check::normals<T>((size_t)B * Hkv * cap * D, rng);
  std::vector<T> v = emu_check::normals<T>(k.size(), rng);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hkv; ++h)
      for (int j = L; j < cap; ++j)
        for (int e = 0; e < D; ++e) {
          const size_t at = (((size_t)b * Hkv + h) * cap + j) * D + e;
          k[at] = nan;
          v[at] = nan;
        }
  std::vector<float> kvalid((size_t)B * cap, 0.f);
  for (int b = 0; b < B; ++b) {
    for (int j = 0; j <= L; ++j) kvalid[(size_t)b * cap + j] = 1.f;
    if (fc.mask && b % 3 == 0) {
      const int pad = (int)(rng.uniform() * L / 2);
      for (int j = 0; j < pad; ++j) kvalid[(size_t)b * cap + j] = 0.f;
      for (int j = pad + 3; j < std::min(L, pad + 8); ++j) kvalid[(size_t)b * cap + j] = 0.f;
    }
  }
  // What qkv_write would store: head `col` of row b, rotated in f32 and rounded to T, as the
  // kernels rotate. Rotated in double, a component now and then rounds to the neighbouring
  // value of T, and the one-key case's lse then misses its bound (f16: by 4e-5 at seed
  // 891918123).
  //
  // With the norm (q and k: `rotate`), the head's sum of squares is summed as the kernel sums
  // it in f32: each lane's 8 values in order, then the butterfly across the D / 8 lanes of a
  // group; then (x * r) * g rounded to T, which the rotation reads.
  auto normed = [&](int b, int col, bool rotate, int j) -> float {
    const T *row = &y[(size_t)b * width + col];
    if (!rotate || !fc.norm) return (float)value(row[j]);
    const bool is_q = col < Hq * D;
    const float g = fc.plus_one ? 1.f + (is_q ? qo : ko)[j] : (float)value((is_q ? qg : kg)[j]);
    std::vector<float> lanes(D / 8, 0.f);
    for (int l = 0; l < D / 8; ++l)
      for (int e = 0; e < 8; ++e) {
        const float v = (float)value(row[l * 8 + e]);
        lanes[l] += v * v;
      }
    for (int o = 1; o < D / 8; o <<= 1) {
      std::vector<float> next(lanes.size());
      for (int l = 0; l < D / 8; ++l) next[l] = lanes[l] + lanes[l ^ o];
      lanes = next;
    }
    const float r = 1.f / std::sqrt(lanes[j / 8] / (float)D + eps);
    return (float)emu_check::round_as<T>(((float)value(row[j]) * r) * g);
  };
  auto stored = [&](int b, int col, bool rotate, int j) -> double {
    if (!rotate || !fc.rope) return normed(b, col, rotate, j);
    const int jj = j % half;
    const float c = (float)value(cos_t[(size_t)b * half + jj]);
    const float s = (float)value(sin_t[(size_t)b * half + jj]);
    const float x1 = normed(b, col, true, jj), x2 = normed(b, col, true, jj + half);
    return emu_check::round_as<T>(j < half ? x1 * c - x2 * s : x2 * c + x1 * s);
  };
  std::vector<T> q_ref((size_t)B * Hq * D), k_ref = k, v_ref = v;
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < Hq; ++h)
      for (int e = 0; e < D; ++e)
        q_ref[((size_t)b * Hq + h) * D + e] = temper::from_f32<T>((float)stored(b, h * D, true, e));
    for (int h = 0; h < Hkv; ++h)
      for (int e = 0; e < D; ++e) {
        const size_t at = (((size_t)b * Hkv + h) * cap + L) * D + e;
        k_ref[at] = temper::from_f32<T>((float)stored(b, (Hq + h) * D, true, e));
        v_ref[at] = temper::from_f32<T>((float)stored(b, (Hq + Hkv + h) * D, false, e));
      }
  }
  const attention_ref::Shape shape{B, Hq, Hkv, 1, cap, cap, D, true, cap - 1, nullptr, 0,
                                   fc.softcap};
  const Reference ref = attention_ref::reference(shape, q_ref, k_ref, v_ref, kvalid);

  AttnParams p = attention_ref::params(shape);
  const double scale = 1.0 / std::sqrt((double)D);
  p.scale_log2 = (float)(scale * 1.4426950408889634);
  p.scale = (float)scale;
  std::vector<int> krange;
  attention_ref::key_range(shape, kvalid, p, krange);
  const long long step[2] = {L, 7};
  std::vector<T> o((size_t)B * Hq * D, nan);
  std::vector<float> lse((size_t)B * Hq, NAN);
  p.fresh = y.data();
  p.step = step;
  p.rope_cos = fc.rope ? cos_t.data() : nullptr;
  p.rope_sin = fc.rope ? sin_t.data() : nullptr;
  p.q_norm = !fc.norm ? nullptr : fc.plus_one ? (const void *)qo.data() : qg.data();
  p.k_norm = !fc.norm ? nullptr : fc.plus_one ? (const void *)ko.data() : kg.data();
  p.norm_plus_one = fc.plus_one ? 1 : 0;
  p.norm_eps = eps;
  p.k = k.data();
  p.v = v.data();
  p.dk = k.data();  // the caches again, written at L (decode_fresh)
  p.dv = v.data();
  p.o = o.data();
  p.lse = lse.data();
  const int r = Hq / Hkv <= 2 ? Hq / Hkv : 4;
  const Dtype dt = std::is_same_v<T, bf16> ? Dtype::BF16 : Dtype::F16;
  const Case c{fc.name, dt, B, Hq, Hkv, 1, cap, cap, D, true, cap - 1, true};
  const int nsplit = decode_stream_splits(c, r);
  const Launch fwd{decode_kernel<T>(D, r, true), {(unsigned)(B * Hkv), 1, (unsigned)nsplit},
                   {128, 1, 1}, kDecodeRingBytes};
  if (nsplit == 1)
    emu::launch(fwd.grid, fwd.block, fwd.shared, [&] { fwd.kernel(p); });
  else
    split_and_combine<T>(c, p, fwd, nsplit);
  const std::string what = std::string(fc.name) + " " + Dt<T>::name + " fresh r" +
                           std::to_string(r) + " x" + std::to_string(nsplit);
  bool ok = emu_check::close(what + " o", o, ref.o, Dt<T>::o_tol);
  ok &= emu_check::close_abs(what + " lse", lse, ref.lse, 1e-4);
  // Position L holds what qkv_write would have written (to a unit in the last place: the
  // kernel rotates in f32); every other position is untouched, NaN included.
  double worst = 0;
  size_t changed = 0;
  for (size_t i = 0; i < k.size(); ++i) {
    const bool at_len = (i / D) % cap == (size_t)L;
    for (const auto *pair : {&k, &v}) {
      const std::vector<T> &want = pair == &k ? k_ref : v_ref;
      const double got = value((*pair)[i]), exp = value(want[i]);
      if (at_len)
        worst = std::max(worst, std::abs(got - exp) / std::max(1.0, std::abs(exp)));
      else if (std::memcmp(&(*pair)[i], &want[i], sizeof(T)) != 0)
        ++changed;
    }
  }
  ok &= emu_check::check(what + " writes position L (within 1 ulp of qkv_write's)",
                         worst <= std::ldexp(1.0, 1 - Dt<T>::p));
  ok &= emu_check::check(what + " leaves every other cache position as it was", changed == 0);
  return ok;
}

}  // namespace

int main(int argc, char **argv) {
  emu_check::Rng rng(emu_check::seed(argc, argv));
  using D = Dtype;
  // name, dtype, b, hq, hkv, tq, tk, cap, d, causal, offset, mask
  const Case cases[] = {
      // The decode stream (16-bit, D = 64, 128 or 256, G * Tq <= 4).
      {"d64 r1 cache", D::BF16, 2, 2, 2, 1, 700, 768, 64, true, 699, false},
      {"d128 gqa4 masked cache", D::BF16, 3, 4, 1, 1, 1100, 1152, 128, true, 1099, true},
      {"d64 gqa2 tq2 offset masked", D::BF16, 3, 4, 2, 2, 530, 600, 64, true, 400, true},
      {"d128 tq3 full masked", D::F16, 2, 2, 2, 3, 200, 256, 128, false, 0, true},
      {"d64 tq4 contiguous", D::F16, 1, 1, 1, 4, 256, 256, 64, true, 252, false},
      {"d128 r1 contiguous full", D::BF16, 1, 2, 2, 1, 300, 300, 128, false, 0, false},
      {"d64 gqa2 tq2 masked cache", D::BF16, 3, 4, 2, 2, 900, 1024, 64, true, 898, true},
      {"d128 gqa2 long cache", D::BF16, 1, 4, 2, 1, 2300, 2400, 128, true, 2299, false},
      {"d64 r1 offset masked cache", D::F16, 3, 1, 1, 1, 520, 544, 64, true, 300, true},
      // Gemma's head dim 256: the whole warp on one key, GQA (four rows), split or not.
      {"d256 gqa4 masked cache", D::BF16, 3, 4, 1, 1, 700, 768, 256, true, 699, true},
      {"d256 gqa2 tq2 offset", D::F16, 2, 4, 2, 2, 530, 600, 256, true, 400, false},
      {"d256 r1 full", D::BF16, 40, 2, 2, 1, 70, 80, 256, false, 0, true},
      // The simple forward (f32, other head dims, more rows than the decode stream takes).
      {"d64 gqa4 tq2 masked cache", D::F32, 3, 4, 1, 2, 600, 640, 64, true, 598, true},
      {"d128 gqa2 cache", D::F32, 1, 4, 2, 1, 300, 320, 128, true, 299, false},
      {"d96 gqa2 masked cache", D::BF16, 3, 4, 2, 1, 400, 512, 96, true, 399, true},
      {"d40 tq5 offset cache", D::F32, 1, 2, 2, 5, 330, 400, 40, true, 200, false},
      {"d64 gqa4 tq3 masked", D::BF16, 2, 4, 1, 3, 420, 420, 64, true, 417, true},
      {"d32 gqa2 full", D::F16, 1, 4, 2, 2, 260, 300, 32, false, 0, false},
      // Sliding windows: the stream and the simple forward start each row at its window's
      // first key, split or not, with padding inside or before the window.
      {"window300 d64 r1 cache", D::BF16, 2, 2, 2, 1, 700, 768, 64, true, 699, false, 300},
      {"window200 d128 gqa4 masked", D::BF16, 3, 4, 1, 1, 1100, 1152, 128, true, 1099, true, 200},
      {"window600 d64 r1 split", D::F16, 1, 2, 2, 1, 1100, 1152, 64, true, 1099, false, 600},
      {"window41 d64 gqa2 tq2 masked", D::F16, 3, 4, 2, 2, 530, 600, 64, true, 528, true, 41},
      {"window64 d96 gqa2 masked cache", D::BF16, 3, 4, 2, 1, 400, 512, 96, true, 399, true, 64},
      {"window9 d40 tq5 offset cache", D::F32, 1, 2, 2, 5, 330, 400, 40, true, 325, false, 9},
      {"window300 d40 tq5 split cache", D::F32, 1, 2, 2, 5, 700, 768, 40, true, 695, false, 300},
      {"window512 d256 r1 split", D::BF16, 1, 2, 2, 1, 1100, 1152, 256, true, 1099, false, 512},
      // Gemma 2's soft cap (one that bites at scores of unit spread): the stream at its head
      // dim with GQA and a window, split; the simple forward.
      {"softcap2 d256 gqa2 window", D::BF16, 2, 4, 2, 1, 700, 768, 256, true, 699, true, 300, 2.0},
      {"softcap1.5 d64 r1 split", D::F16, 1, 2, 2, 1, 1100, 1152, 64, true, 1099, false, 0, 1.5},
      {"softcap2 d40 tq5 cache", D::F32, 1, 2, 2, 5, 330, 400, 40, true, 200, false, 0, 2.0},
  };
  // name, b, hq, hkv, cap, len, d, rope, mask
  const FreshCase fresh[] = {
      // GPT-2's step (no rotation), 64 keys past a tile edge; one that splits its keys.
      {"d64 r1 plain", 5, 2, 2, 80, 64, 64, false, true},
      {"d64 r1 split", 1, 2, 2, 1100, 1000, 64, false, false},
      // Llama-style: rotated, GQA (four rows), the first position, a masked cache.
      {"d128 gqa4 rope", 3, 4, 1, 200, 130, 128, true, true},
      {"d64 gqa2 rope first", 2, 4, 2, 48, 0, 64, true, false},
      {"d128 r1 rope split", 2, 2, 2, 1400, 1301, 128, true, true},
      // Qwen3-style: per-head norms of q and k before the rotation (D 128, GQA), one without
      // rotation at D 64, one that splits its keys.
      {"d128 gqa2 norm rope", 3, 4, 2, 160, 97, 128, true, true, true},
      {"d64 r1 norm", 2, 2, 2, 70, 33, 64, false, false, true},
      {"d128 gqa4 norm rope split", 1, 4, 1, 1300, 1200, 128, true, false, true},
      // Head dim 256: rotated with GQA (four rows) and a masked cache; normed, rotated, split.
      {"d256 gqa4 rope", 3, 4, 1, 200, 130, 256, true, true},
      {"d256 r1 norm rope split", 1, 2, 2, 1100, 1000, 256, true, false, true},
      // Gemma 3's norms: gains 1 + w from f32 offsets, at its head dim and at 128.
      {"d256 gqa4 plus-one norm rope", 3, 4, 1, 200, 130, 256, true, true, true, true},
      {"d128 r1 plus-one norm", 2, 2, 2, 70, 33, 128, false, false, true, true},
      // Gemma 2's step: rotated, capped scores, GQA, a masked cache.
      {"d256 gqa4 rope softcap", 3, 4, 1, 200, 130, 256, true, true, false, false, 2.0},
  };
  bool ok = true;
  for (const FreshCase &fc : fresh) {
    ok &= run_fresh<bf16>(fc, rng);
    ok &= run_fresh<f16>(fc, rng);
  }
  for (const Case &c : cases) {
    switch (c.dt) {
      case D::F32: ok &= run_case<float>(c, rng); break;
      case D::BF16: ok &= run_case<bf16>(c, rng); break;
      case D::F16: ok &= run_case<f16>(c, rng); break;
    }
  }
  return emu_check::finish(ok);
}
