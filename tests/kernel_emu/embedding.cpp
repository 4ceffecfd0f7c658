// The embedding kernels (kernels/embedding.cu) run in the CPU emulator (cuda_emu.h), every entry
// point of the file, against references written here, on fresh random inputs of awkward sizes:
// - embedding_fwd_<table>_<out> and embedding_fwd2_<table>_<out> (the token-plus-position
//   lookup), all nine table x output dtypes each: widths below one block (72, 200, 1) and above
//   it (300, so each thread loops over columns), position counts that are no multiple of 8 or
//   32, one row read by a third of the positions, the table's first and last rows, and ids (and
//   positions) past the table, among them 0x80000000 and 0xFFFFFFFF (negative as an int), whose
//   rows must come out NaN. The output starts filled with -768 (finite, outside the tables'
//   range) rather than NaN, so that an expected NaN row is one the kernel wrote;
// - embedding_bwd_<dy>, from zeros (accumulate 0) and onto a gradient so far (accumulate 1,
//   after embedding_init_<init> widened it, every dy x init dtype), with rows unused, rows hit
//   once, one row hit by 50 to 70 positions, ids past the vocabulary (left out of the
//   grouping), and the position table's gradient (every row hit once per sequence);
// - embedding_init_<dtype> alone, with the grid the launcher gives an H200 (132 SMs) and the
//   grid capped at 8 blocks (one SM), so that the grid-stride loop goes round several times.
// Launches are src/kernels/cuda/embedding.rs's: 256 threads, no shared memory, one block per
// position (forward) or per used row (backward), grid_stride for init, the params fields it
// sets and no others; the host grouping of the backward is group_by_row + Grouping::new of
// src/kernels/embedding.rs, mirrored below.
//
// References: the lookups are exact (a row converted to the output dtype, rounded to nearest
// even once; fwd2 adds the two rows in f32 and rounds the sum once, which is the op's contract
// and its CPU implementation), so they are compared bit for bit with a rounding written here
// independently of the emulator's. The backward is compared twice: with a double reference,
// within a bound on f32 recursive summation, and bit for bit with the f32 sum in ascending
// position order that src/kernels/embedding.rs (cpu_grad) computes, the order the kernel
// promises so that the gradient is the same on CPU and GPU and on every run.
//
// Usage: embedding [seed]  (a random seed when none is given; it is printed either way).
#include "emu_check.h"

#include "embedding.cu"

namespace {

using bf16 = __nv_bfloat16;
using f16 = __half;
using Kernel = void (*)(const EmbeddingParams);

using emu_check::convert;
using emu_check::Dt;
using emu_check::round_as;

// ---------------------------------------------------------------------------------------
// The entry points by dtype.
// ---------------------------------------------------------------------------------------
template <typename TT, typename T> Kernel fwd_entry(bool two);
#define FWD_ENTRY(TAB, TT, OUT, T)                                         \
  template <> Kernel fwd_entry<TT, T>(bool two) {                          \
    return two ? embedding_fwd2_##TAB##_##OUT : embedding_fwd_##TAB##_##OUT; \
  }
FWD_ENTRY(f32, float, f32, float)
FWD_ENTRY(f32, float, bf16, bf16)
FWD_ENTRY(f32, float, f16, f16)
FWD_ENTRY(bf16, bf16, f32, float)
FWD_ENTRY(bf16, bf16, bf16, bf16)
FWD_ENTRY(bf16, bf16, f16, f16)
FWD_ENTRY(f16, f16, f32, float)
FWD_ENTRY(f16, f16, bf16, bf16)
FWD_ENTRY(f16, f16, f16, f16)
#undef FWD_ENTRY

template <typename T> Kernel bwd_entry();
template <typename T> Kernel init_entry();
template <> Kernel bwd_entry<float>() { return embedding_bwd_f32; }
template <> Kernel bwd_entry<bf16>() { return embedding_bwd_bf16; }
template <> Kernel bwd_entry<f16>() { return embedding_bwd_f16; }
template <> Kernel init_entry<float>() { return embedding_init_f32; }
template <> Kernel init_entry<bf16>() { return embedding_init_bf16; }
template <> Kernel init_entry<f16>() { return embedding_init_f16; }

// ---------------------------------------------------------------------------------------
// The launcher's configurations (src/kernels/cuda/embedding.rs, src/kernels/cuda/mod.rs).
// ---------------------------------------------------------------------------------------
constexpr unsigned kThreadsRs = 256;  // THREADS
constexpr unsigned kH200Sms = 132;

// config(blocks): blocks x 256 threads, no shared memory.
void launch_blocks(size_t blocks, Kernel k, const EmbeddingParams &p) {
  emu::launch({(unsigned)blocks, 1, 1}, {kThreadsRs, 1, 1}, 0, [&] { k(p); });
}

// grid_stride(dev, n, 256).
void launch_grid_stride(size_t n, unsigned sms, Kernel k, const EmbeddingParams &p) {
  emu::launch({emu_check::grid_stride(n, sms, kThreadsRs), 1, 1}, {kThreadsRs, 1, 1}, 0,
              [&] { k(p); });
}

// group_by_row, then Grouping::new's cut at the first row outside the table.
struct Grouping {
  std::vector<unsigned> uniq, offsets, order;  // uniq[..keep], offsets[..=keep], all of order
};

Grouping group(const std::vector<unsigned> &ids, size_t vocab) {
  Grouping g;
  g.order.resize(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) g.order[i] = (unsigned)i;
  std::sort(g.order.begin(), g.order.end(), [&](unsigned a, unsigned b) {
    return ids[a] != ids[b] ? ids[a] < ids[b] : a < b;
  });
  for (size_t k = 0; k < g.order.size(); ++k) {
    const unsigned id = ids[g.order[k]];
    if (g.uniq.empty() || g.uniq.back() != id) {
      g.uniq.push_back(id);
      g.offsets.push_back((unsigned)k);
    }
  }
  g.offsets.push_back((unsigned)g.order.size());
  size_t keep = 0;
  while (keep < g.uniq.size() && g.uniq[keep] < vocab) ++keep;
  g.uniq.resize(keep);
  g.offsets.resize(keep + 1);
  return g;
}

// ---------------------------------------------------------------------------------------
// Forward: embedding_fwd_* and embedding_fwd2_*.
// ---------------------------------------------------------------------------------------
struct FwdCase {
  const char *name;
  int vocab, dim, seqs, seq;  // n = seqs * seq positions, position t of a sequence at row t
  int vocab2;                 // rows of the position table (>= seq)
};

struct FwdInputs {
  FwdCase c;
  int n;
  std::vector<float> table, table2;  // drawn in f32, converted to each table dtype
  std::vector<unsigned> ids, ids2;
};

FwdInputs make_fwd(const FwdCase &c, emu_check::Rng &rng) {
  FwdInputs in{c, c.seqs * c.seq, {}, {}, {}, {}};
  in.table.resize((size_t)c.vocab * c.dim);
  in.table2.resize((size_t)c.vocab2 * c.dim);
  for (auto &x : in.table) x = rng.normal();
  for (auto &x : in.table2) x = 0.3f * rng.normal();
  std::uniform_int_distribution<unsigned> row(0, c.vocab - 1);
  const unsigned hot = row(rng.gen);
  in.ids.resize(in.n);
  in.ids2.resize(in.n);
  for (int i = 0; i < in.n; ++i) {
    in.ids[i] = rng.uniform() < 0.33f ? hot : row(rng.gen);
    in.ids2[i] = i % c.seq;
  }
  // The table's first and last rows, the position table's last row, and ids and positions past
  // their tables (as an int, the last two are negative), each alone on its position.
  const unsigned past[] = {(unsigned)c.vocab, (unsigned)c.vocab + 1000, 0x80000000u, 0xFFFFFFFFu};
  auto at = [&](int k) { return (int)((size_t)k * 7919 % in.n); };  // spread, distinct for n > 16
  in.ids[at(1)] = 0;
  in.ids[at(2)] = c.vocab - 1;
  in.ids2[at(3)] = c.vocab2 - 1;
  for (int k = 0; k < 4 && in.n > 16; ++k) in.ids[at(4 + k)] = past[k];
  const unsigned past2[] = {(unsigned)c.vocab2, 0x80000000u, 0xFFFFFFFFu};
  for (int k = 0; k < 3 && in.n > 16; ++k) in.ids2[at(8 + k)] = past2[k];
  return in;
}

// One lookup entry point (two: fwd2) for table dtype TT and output dtype T; `scale` (Gemma's
// embedding scale, embedding_fwd only) multiplies each f32 row before its one rounding.
template <typename TT, typename T>
bool check_forward(const FwdInputs &in, bool two, float scale = 1.f) {
  const FwdCase &c = in.c;
  const std::vector<TT> table = convert<TT>(in.table), table2 = convert<TT>(in.table2);
  std::vector<double> want((size_t)in.n * c.dim);
  for (int i = 0; i < in.n; ++i) {
    const unsigned id = in.ids[i], at = in.ids2[i];
    const bool outside = id >= (unsigned)c.vocab || (two && at >= (unsigned)c.vocab2);
    for (int col = 0; col < c.dim; ++col) {
      double w = NAN;
      if (!outside) {
        const float a = (float)emu_check::value(table[(size_t)id * c.dim + col]);
        if (two) {
          const float b = (float)emu_check::value(table2[(size_t)at * c.dim + col]);
          w = round_as<T>((double)(a + b));  // the f32 sum, rounded once
        } else {
          w = round_as<T>((double)(a * scale));  // the f32 product, rounded once
        }
      }
      want[(size_t)i * c.dim + col] = w;
    }
  }
  std::vector<T> out((size_t)in.n * c.dim, Dt<T>::from(-768.f));
  EmbeddingParams p{};
  p.table = table.data();
  p.table2 = two ? table2.data() : nullptr;
  p.ids = in.ids.data();
  p.ids2 = two ? in.ids2.data() : nullptr;
  p.out = out.data();
  p.n = in.n;
  p.dim = c.dim;
  p.vocab = c.vocab;
  p.vocab2 = two ? c.vocab2 : 0;
  p.scale = scale;  // 1: none, as the launcher's default
  if (in.n > 0 && c.dim > 0) launch_blocks(in.n, fwd_entry<TT, T>(two), p);
  std::string what = std::string(c.name) + (two ? " fwd2_" : " fwd_") + Dt<TT>::name + "_" +
                     Dt<T>::name;
  if (scale != 1.f) what += " scaled";
  return emu_check::exact(what, out, want, /*nan_expected=*/true);
}

template <typename TT> bool check_forward_table(const FwdInputs &in, bool two) {
  bool ok = check_forward<TT, float>(in, two);
  ok &= check_forward<TT, bf16>(in, two);
  ok &= check_forward<TT, f16>(in, two);
  // Gemma's scale (sqrt(1152) in bf16 is 34; an f32 one exactly as the model rounds it).
  if (!two) {
    ok &= check_forward<TT, bf16>(in, false, 34.f);
    ok &= check_forward<TT, float>(in, false, 33.941125f);
  }
  return ok;
}

// ---------------------------------------------------------------------------------------
// Backward: embedding_bwd_*, from zeros or after embedding_init_*; embedding_init_* alone.
// ---------------------------------------------------------------------------------------
struct BwdInputs {
  std::string name;
  int vocab, dim;
  std::vector<unsigned> ids;
  std::vector<float> dy, init;  // [n, dim], [vocab, dim], drawn in f32
};

BwdInputs make_bwd(const std::string &name, int vocab, int dim, std::vector<unsigned> ids,
                   emu_check::Rng &rng) {
  BwdInputs in{name, vocab, dim, std::move(ids), {}, {}};
  in.dy.resize(in.ids.size() * dim);
  in.init.resize((size_t)vocab * dim);
  for (auto &x : in.dy) x = rng.normal();
  for (auto &x : in.init) x = 2.f * rng.normal();
  return in;
}

// dy in T; with_init: the gradient so far in S, widened by embedding_init_S (grid of an H200),
// then accumulate 1; each row's sum times `scale` (Gemma's embedding scale) before the add.
template <typename T, typename S>
bool check_backward(const BwdInputs &in, bool with_init, float scale = 1.f) {
  const size_t n = in.ids.size(), dim = in.dim, total = (size_t)in.vocab * dim;
  const std::vector<T> dy = convert<T>(in.dy);
  const std::vector<S> init = convert<S>(in.init);
  const Grouping g = group(in.ids, in.vocab);
  const size_t keep = g.uniq.size();

  // The references. Double: init + the sum of the row's dy rows. An f32 recursive sum of m
  // terms (the init counted as one) is within gamma_m * sum |terms| of the exact sum (Higham,
  // Accuracy and Stability of Numerical Algorithms, 4.2), gamma_m = m u / (1 - m u), u = 2^-24,
  // whatever the order; every term (a bf16, f16 or f32 value) is exact in f32. `bound` is the
  // largest such bound over the table: the tolerance of close_abs, rigorous for every element.
  // CPU order: cpu_grad's f32 sum in ascending position order, added to the init once.
  std::vector<double> want(total, 0.0), cpu(total, 0.0), mag(total, 0.0);
  std::vector<int> terms(total, 0);
  for (size_t i = 0; i < total; ++i) {
    if (with_init) {
      want[i] = emu_check::value(init[i]);
      mag[i] = std::fabs(want[i]);
      terms[i] = 1;
    }
    cpu[i] = want[i];
  }
  for (size_t u = 0; u < keep; ++u) {
    const size_t row = g.uniq[u];
    for (size_t col = 0; col < dim; ++col) {
      float acc = 0.f;
      for (unsigned k = g.offsets[u]; k < g.offsets[u + 1]; ++k) {
        const double x = emu_check::value(dy[(size_t)g.order[k] * dim + col]);
        acc += (float)x;
        want[row * dim + col] += x * scale;
        mag[row * dim + col] += std::fabs(x) * scale;
        terms[row * dim + col] += 1;
      }
      // The product rounds once more: one term more in the bound.
      if (scale != 1.f) terms[row * dim + col] += 1;
      cpu[row * dim + col] = (double)((float)cpu[row * dim + col] + acc * scale);
    }
  }
  double bound = 0;
  const double unit = std::ldexp(1.0, -24);
  for (size_t i = 0; i < total; ++i)
    bound = std::max(bound, terms[i] * unit / (1 - terms[i] * unit) * mag[i]);

  // The launcher: dtable zeroed (alloc_zeros), or allocated (0xFF-poisoned, as with
  // TEMPER_POISON_OUTPUTS) and widened from the gradient so far; then one block per used row.
  std::vector<float> dtable(std::max<size_t>(total, 1), 0.f);
  if (with_init) {
    std::memset(dtable.data(), 0xFF, dtable.size() * sizeof(float));
    EmbeddingParams pi{};
    pi.scale = 1.f;  // the launcher's default
    pi.dy = init.data();
    pi.dtable = dtable.data();
    pi.dim = in.dim;
    pi.vocab = in.vocab;
    if (total > 0) launch_grid_stride(total, kH200Sms, init_entry<S>(), pi);
  }
  EmbeddingParams p{};
  p.dy = dy.data();
  p.dtable = dtable.data();
  p.uniq = g.uniq.data();
  p.offsets = g.offsets.data();
  p.order = g.order.data();
  p.n = (int)n;
  p.dim = in.dim;
  p.n_uniq = (int)keep;
  p.vocab = in.vocab;
  p.accumulate = with_init ? 1 : 0;
  p.scale = scale;
  if (keep > 0 && dim > 0) launch_blocks(keep, bwd_entry<T>(), p);
  dtable.resize(total);

  std::string what = in.name + " bwd_" + Dt<T>::name + (scale != 1.f ? " scaled" : "");
  what += with_init ? std::string(" onto init_") + Dt<S>::name : std::string(" from zeros");
  bool ok = emu_check::close_abs(what, dtable, want, bound);
  ok &= emu_check::exact(what + " (cpu order)", dtable, cpu, /*nan_expected=*/true);
  return ok;
}

template <typename T> bool check_backward_dy(const BwdInputs &in) {
  bool ok = check_backward<T, float>(in, false);
  ok &= check_backward<T, float>(in, true);
  ok &= check_backward<T, bf16>(in, true);
  ok &= check_backward<T, f16>(in, true);
  // Gemma's scale, from zeros and onto a tied head's gradient.
  ok &= check_backward<T, float>(in, false, 34.f);
  ok &= check_backward<T, bf16>(in, true, 34.f);
  return ok;
}

// embedding_init_S alone: an exact widening of every element, whatever the grid.
template <typename S> bool check_init(const BwdInputs &in, unsigned sms) {
  const size_t total = (size_t)in.vocab * in.dim;
  const std::vector<S> src = convert<S>(in.init);
  std::vector<double> want(total);
  for (size_t i = 0; i < total; ++i) want[i] = emu_check::value(src[i]);
  std::vector<float> dtable(std::max<size_t>(total, 1));
  std::memset(dtable.data(), 0xFF, dtable.size() * sizeof(float));
  EmbeddingParams p{};
  p.scale = 1.f;  // the launcher's default
  p.dy = src.data();
  p.dtable = dtable.data();
  p.dim = in.dim;
  p.vocab = in.vocab;
  if (total > 0) launch_grid_stride(total, sms, init_entry<S>(), p);
  dtable.resize(total);
  return emu_check::exact(in.name + " init_" + Dt<S>::name + " (" + std::to_string(sms) + " SMs)",
                          dtable, want, /*nan_expected=*/true);
}

// Ids for a backward: uniform over part of the table (rows left unused), one row at 70 random
// positions (50 to 70 distinct), and ids past the table.
std::vector<unsigned> bwd_ids(int n, int vocab, emu_check::Rng &rng) {
  std::uniform_int_distribution<unsigned> row(0, vocab - 1);
  std::uniform_int_distribution<int> where(0, n - 1);
  std::vector<unsigned> ids(n);
  for (auto &id : ids) id = row(rng.gen) % (unsigned)(vocab * 3 / 4);
  const unsigned hot = row(rng.gen);
  for (int k = 0; k < 70 && k < n / 2; ++k) ids[where(rng.gen)] = hot;
  ids[where(rng.gen)] = vocab - 1;
  ids[where(rng.gen)] = (unsigned)vocab;
  ids[where(rng.gen)] = 0xFFFFFFFFu;
  ids[where(rng.gen)] = 0x80000000u;
  return ids;
}

}  // namespace

int main(int argc, char **argv) {
  emu_check::Rng rng(emu_check::seed(argc, argv));
  bool ok = true;

  const FwdCase fwd_cases[] = {
      {"v37 h72 n203", 37, 72, 7, 29, 40},
      {"v37 h300 n61", 37, 300, 1, 61, 64},
      {"v50 h200 n45", 50, 200, 3, 15, 15},
      {"v5 h1 n34", 5, 1, 2, 17, 20},
  };
  for (const FwdCase &c : fwd_cases) {
    const FwdInputs in = make_fwd(c, rng);
    for (bool two : {false, true}) {
      ok &= check_forward_table<float>(in, two);
      ok &= check_forward_table<bf16>(in, two);
      ok &= check_forward_table<f16>(in, two);
    }
  }

  // The token table's gradient (repeats, a hot row, unused rows, ids past the table), a width
  // past one block, and the position table's (position t of each of 7 sequences, rows past the
  // longest sequence unused).
  std::vector<unsigned> positions;
  for (int s = 0; s < 7; ++s)
    for (int t = 0; t < 29; ++t) positions.push_back((unsigned)t);
  const BwdInputs bwd_cases[] = {
      make_bwd("v37 h200 n203", 37, 200, bwd_ids(203, 37, rng), rng),
      make_bwd("v50 h300 n150", 50, 300, bwd_ids(150, 50, rng), rng),
      make_bwd("pos v40 h72 n203", 40, 72, positions, rng),
  };
  for (const BwdInputs &in : bwd_cases) {
    ok &= check_backward_dy<float>(in);
    ok &= check_backward_dy<bf16>(in);
    ok &= check_backward_dy<f16>(in);
  }
  for (unsigned sms : {kH200Sms, 1u}) {
    ok &= check_init<float>(bwd_cases[1], sms);
    ok &= check_init<bf16>(bwd_cases[1], sms);
    ok &= check_init<f16>(bwd_cases[1], sms);
  }
  return emu_check::finish(ok);
}
