// The attention kernels (kernels/attention_*.cu) run in the CPU emulator (cuda_emu.h) against a
// double-precision reference: the tensor-core forward (64- and 128-row) and backward in bf16,
// the CUDA-core backward in f32 (the decode and split-key forwards are attention_decode.cpp's).
// Fresh random inputs of awkward sizes: causal with and without a position offset,
// grouped-query heads, padded keys with a hole, sequences that end mid-tile, head dims only the
// CUDA-core kernels take. Launch shapes are those src/kernels/cuda/attention.rs uses.
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

struct Case {
  const char *name;
  int b, hq, hkv, tq, tk, d;
  bool causal;
  int offset;
  bool mask;  // left padding plus a hole in the keys of every sequence
};

struct Inputs {
  Case c;
  std::vector<bf16> q, k, v, dout;
  std::vector<float> kvalid;
};

Inputs make_inputs(const Case &c, emu_check::Rng &rng) {
  Inputs in{c, {}, {}, {}, {}, {}};
  in.q = emu_check::normals<bf16>((size_t)c.b * c.hq * c.tq * c.d, rng);
  in.k = emu_check::normals<bf16>((size_t)c.b * c.hkv * c.tk * c.d, rng);
  in.v = emu_check::normals<bf16>((size_t)c.b * c.hkv * c.tk * c.d, rng);
  in.dout = emu_check::normals<bf16>((size_t)c.b * c.hq * c.tq * c.d, rng);
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

float f(bf16 x) { return __bfloat162float(x); }

using Reference = attention_ref::Result;

attention_ref::Shape shape(const Case &c) {
  return {c.b, c.hq, c.hkv, c.tq, c.tk, c.tk, c.d, c.causal, c.offset};
}

// Softmax attention and its gradients in double, from the bf16 inputs.
Reference reference(const Inputs &in) {
  return attention_ref::reference(shape(in.c), in.q, in.k, in.v, in.kvalid, &in.dout);
}

// FlashAttn::params (the scale in f32), and attn_key_range first where there is a key mask;
// `krange` must outlive the params.
AttnParams params(const Inputs &in, std::vector<int> &krange) {
  AttnParams p = attention_ref::params(shape(in.c));
  p.scale = 1.f / std::sqrt((float)in.c.d);
  p.scale_log2 = p.scale * kLog2e;
  attention_ref::key_range(shape(in.c), in.kvalid, p, krange);
  return p;
}

using Kernel = void (*)(const AttnParams);

Kernel fwd_kernel(int d, int mt) {
  if (d == 64) return mt == 1 ? attn_fwd_mma_bf16_h64 : attn_fwd_mma2_bf16_h64;
  return mt == 1 ? attn_fwd_mma_bf16_h128 : attn_fwd_mma2_bf16_h128;
}

size_t fwd_smem(int d, int mt) {
  if (d == 64) return mt == 1 ? MmaFwdTraits<64, 1>::kSmemBytes : MmaFwdTraits<64, 2>::kSmemBytes;
  return mt == 1 ? MmaFwdTraits<128, 1>::kSmemBytes : MmaFwdTraits<128, 2>::kSmemBytes;
}

// The tensor-core forward with MT 16-row tiles per warp: o and lse.
bool check_forward(const Inputs &in, const Reference &r, int mt) {
  const Case &c = in.c;
  std::vector<int> krange;
  AttnParams p = params(in, krange);
  std::vector<bf16> o(in.q.size(), __float2bfloat16_rn(NAN));
  std::vector<float> lse((size_t)c.b * c.hq * c.tq, NAN);
  p.q = in.q.data();
  p.k = in.k.data();
  p.v = in.v.data();
  p.o = o.data();
  p.lse = lse.data();
  const unsigned bq = 64 * mt;
  const Kernel kernel = fwd_kernel(c.d, mt);
  emu::launch({(unsigned)(c.b * c.hq), (c.tq + bq - 1) / bq, 1}, {128, 1, 1}, fwd_smem(c.d, mt),
              [&] { kernel(p); });
  std::string what = std::string(c.name) + (mt == 1 ? " fwd mma" : " fwd mma2");
  bool ok = emu_check::close(what + " o", o, r.o, 2e-2);
  ok &= emu_check::close_abs(what + " lse", lse, r.lse, 2e-3);
  return ok;
}

// The tensor-core backward (bwd_dot, bwd_mma, dq_convert), fed the reference's lse and the
// reference output rounded as the forward would store it.
bool check_backward(const Inputs &in, const Reference &r) {
  const Case &c = in.c;
  std::vector<int> krange;
  AttnParams p = params(in, krange);
  std::vector<bf16> o(in.q.size());
  for (size_t i = 0; i < o.size(); ++i) o[i] = __float2bfloat16_rn((float)r.o[i]);
  std::vector<float> lse(r.lse.begin(), r.lse.end());
  std::vector<float> dvec((size_t)p.nrows, NAN), dq_acc(in.q.size(), 0.f);
  std::vector<bf16> dq(in.q.size(), __float2bfloat16_rn(NAN));
  std::vector<bf16> dk(in.k.size(), __float2bfloat16_rn(NAN)), dv(in.v.size(), __float2bfloat16_rn(NAN));
  p.q = in.q.data();
  p.k = in.k.data();
  p.v = in.v.data();
  p.o = o.data();
  p.dout = in.dout.data();
  p.lse = lse.data();
  p.dvec = dvec.data();
  p.dq_acc = dq_acc.data();
  p.dq = dq.data();
  p.dk = dk.data();
  p.dv = dv.data();
  emu::launch({(unsigned)(p.nrows + 7) / 8, 1, 1}, {256, 1, 1}, 0, [&] { attn_bwd_dot_bf16(p); });
  const Kernel kernel = c.d == 64 ? attn_bwd_mma_bf16_h64 : attn_bwd_mma_bf16_h128;
  const size_t smem = c.d == 64 ? MmaBwdTraits<64>::kSmemBytes : MmaBwdTraits<128>::kSmemBytes;
  emu::launch({(unsigned)(c.b * c.hkv), (unsigned)(c.tk + 63) / 64, 1}, {128, 1, 1}, smem,
              [&] { kernel(p); });
  emu::launch({(unsigned)std::min<size_t>(64, (dq.size() + 255) / 256), 1, 1}, {256, 1, 1}, 0,
              [&] { attn_dq_convert_bf16(p); });
  const std::string what = std::string(c.name) + " bwd mma";
  bool ok = emu_check::close(what + " dq", dq, r.dq, 3e-2);
  ok &= emu_check::close(what + " dk", dk, r.dk, 3e-2);
  ok &= emu_check::close(what + " dv", dv, r.dv, 3e-2);
  return ok;
}

// The CUDA-core backward (bwd_dot, bwd_dq_simple, bwd_dkdv_simple) in f32, for any head dim:
// what f32 training and head dims other than 64 and 128 run. Inputs are the bf16 ones widened
// (exactly), o and lse the reference's.
bool check_backward_simple(const Inputs &in, const Reference &r) {
  const Case &c = in.c;
  auto widen = [](const std::vector<bf16> &x) {
    std::vector<float> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = f(x[i]);
    return y;
  };
  const std::vector<float> q = widen(in.q), k = widen(in.k), v = widen(in.v),
                           dout = widen(in.dout);
  std::vector<int> krange;
  AttnParams p = params(in, krange);
  std::vector<float> o(r.o.begin(), r.o.end()), lse(r.lse.begin(), r.lse.end());
  std::vector<float> dvec((size_t)p.nrows, NAN), dq(q.size(), NAN), dk(k.size(), NAN),
      dv(v.size(), NAN);
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
  emu::launch({(unsigned)(p.nrows + 7) / 8, 1, 1}, {256, 1, 1}, 0, [&] { attn_bwd_dot_f32(p); });
  const Kernel dq_kernels[] = {attn_bwd_dq_simple_f32_d1, attn_bwd_dq_simple_f32_d2,
                               attn_bwd_dq_simple_f32_d3, attn_bwd_dq_simple_f32_d4};
  const Kernel dkdv_kernels[] = {attn_bwd_dkdv_simple_f32_d1, attn_bwd_dkdv_simple_f32_d2,
                                 attn_bwd_dkdv_simple_f32_d3, attn_bwd_dkdv_simple_f32_d4};
  const int dpl = (c.d + 31) / 32;
  // simple_row_blocks in attention.rs: a block's warps take rows of all G query heads.
  const unsigned rows = (unsigned)(c.hq / c.hkv * c.tq);
  const unsigned nw = std::min(std::max(rows, 1u), 8u);
  emu::launch({(unsigned)(c.b * c.hkv), (rows + nw - 1) / nw, 1}, {32 * nw, 1, 1}, 0,
              [&] { dq_kernels[dpl - 1](p); });
  emu::launch({(unsigned)(c.b * c.hkv), (unsigned)(c.tk + 7) / 8, 1}, {256, 1, 1}, 0,
              [&] { dkdv_kernels[dpl - 1](p); });
  const std::string what = std::string(c.name) + " bwd simple f32";
  bool ok = emu_check::close(what + " dq", dq, r.dq, 1e-4);
  ok &= emu_check::close(what + " dk", dk, r.dk, 1e-4);
  ok &= emu_check::close(what + " dv", dv, r.dv, 1e-4);
  return ok;
}

}  // namespace

int main(int argc, char **argv) {
  emu_check::Rng rng(emu_check::seed(argc, argv));
  const Case cases[] = {
      {"causal d64 gqa tq301", 2, 4, 2, 301, 301, 64, true, 0, false},
      {"causal d128 tq173", 1, 2, 2, 173, 173, 128, true, 0, false},
      {"causal d64 offset", 1, 2, 1, 77, 200, 64, true, 123, false},
      {"masked d64 causal", 2, 2, 2, 150, 150, 64, true, 0, true},
      {"masked d128 full", 2, 2, 1, 97, 130, 128, false, 0, true},
      // Head dims only the CUDA-core kernels take.
      {"masked d40 gqa causal", 2, 4, 2, 45, 70, 40, true, 25, true},
      {"d96 full", 1, 2, 2, 33, 33, 96, false, 0, false},
  };
  bool ok = true;
  for (const Case &c : cases) {
    const Inputs in = make_inputs(c, rng);
    const Reference r = reference(in);
    if (c.d == 64 || c.d == 128) {
      ok &= check_forward(in, r, 1);
      ok &= check_forward(in, r, 2);
      ok &= check_backward(in, r);
    }
    ok &= check_backward_simple(in, r);
  }
  return emu_check::finish(ok);
}
