// What the attention drivers (attention.cpp, attention_decode.cpp) share: softmax attention and
// its gradients in double, and the parts of the launcher (src/kernels/cuda/attention.rs) that
// follow from the problem's shape. Include it after the attention kernels (AttnParams,
// attn_key_range).
#pragma once

#include "emu_check.h"

namespace attention_ref {

// q [b, hq, tq, d]; k, v [b, hkv, cap, d]: a KV cache of capacity cap whose first tk positions
// are filled (cap = tk for contiguous k, v); the hq / hkv query heads of a group share a kv
// head. Under `causal` query i sees keys j <= offset + i, and under a sliding window (causal,
// window > 0) only keys j > offset + i - window; in packed rows (seg_start [b, tq], the first
// key of each query's document) only keys j >= seg_start[i]. Under a soft cap c > 0 (Gemma 2)
// each score s becomes c tanh(s / c) before the softmax.
struct Shape {
  int b, hq, hkv, tq, tk, cap, d;
  bool causal;
  int offset;
  const std::vector<int> *seg_start = nullptr;
  int window = 0;
  double softcap = 0;
};

// Query i of sequence b sees key j: a filled position, within the causal horizon, valid in
// the key mask kvalid [b, tk] (empty: no key mask), in the query's window and in its document.
inline bool sees(const Shape &s, const std::vector<float> &kvalid, int b, int i, int j) {
  return j < s.tk && (!s.causal || j <= s.offset + i) &&
         (s.window == 0 || j > s.offset + i - s.window) &&
         (kvalid.empty() || kvalid[(size_t)b * s.tk + j] != 0.f) &&
         (s.seg_start == nullptr || j >= (*s.seg_start)[(size_t)b * s.tq + i]);
}

struct Result {
  std::vector<double> o, lse;     // lse [b, hq, tq]: +inf on a row that sees no key (o 0)
  std::vector<double> dq, dk, dv;  // empty without an upstream gradient
};

// Softmax attention in double from the stored inputs, scale 1 / sqrt(d), the scores capped
// where the shape says, and with dout (the upstream gradient of o, like q) its gradients, the
// scores' through the cap's slope 1 - tanh^2. A key a query does not see never enters a sum,
// whatever k and v hold there.
template <typename T>
Result reference(const Shape &s, const std::vector<T> &q, const std::vector<T> &k,
                 const std::vector<T> &v, const std::vector<float> &kvalid,
                 const std::vector<T> *dout = nullptr) {
  using emu_check::value;
  const int G = s.hq / s.hkv;
  const double scale = 1.0 / std::sqrt((double)s.d);
  Result r;
  r.o.assign(q.size(), 0.0);
  r.lse.assign((size_t)s.b * s.hq * s.tq, 0.0);
  if (dout) {
    r.dq.assign(q.size(), 0.0);
    r.dk.assign(k.size(), 0.0);
    r.dv.assign(v.size(), 0.0);
  }
  std::vector<double> sc(s.tk), p(s.tk), dp(s.tk), slope(s.tk, 1.0);
  for (int b = 0; b < s.b; ++b)
    for (int h = 0; h < s.hq; ++h) {
      const size_t qb = ((size_t)b * s.hq + h) * s.tq;
      const size_t kb = ((size_t)b * s.hkv + h / G) * s.cap;
      for (int i = 0; i < s.tq; ++i) {
        const T *qi = &q[(qb + i) * s.d];
        double m = -INFINITY;
        for (int j = 0; j < s.tk; ++j) {
          sc[j] = -INFINITY;
          if (!sees(s, kvalid, b, i, j)) continue;
          double dot = 0;
          for (int e = 0; e < s.d; ++e) dot += value(qi[e]) * value(k[(kb + j) * s.d + e]);
          sc[j] = dot * scale;
          if (s.softcap > 0) {
            const double t = std::tanh(sc[j] / s.softcap);
            sc[j] = s.softcap * t;
            slope[j] = 1 - t * t;
          }
          m = std::max(m, sc[j]);
        }
        if (m == -INFINITY) {
          r.lse[qb + i] = INFINITY;
          continue;
        }
        double l = 0;
        for (int j = 0; j < s.tk; ++j) l += sc[j] == -INFINITY ? 0 : std::exp(sc[j] - m);
        r.lse[qb + i] = m + std::log(l);
        const T *doi = dout ? &(*dout)[(qb + i) * s.d] : nullptr;
        double dsum = 0;
        for (int j = 0; j < s.tk; ++j) {
          p[j] = sc[j] == -INFINITY ? 0 : std::exp(sc[j] - m) / l;
          if (sc[j] == -INFINITY) continue;
          double acc = 0;
          for (int e = 0; e < s.d; ++e) {
            const double vv = value(v[(kb + j) * s.d + e]);
            r.o[(qb + i) * s.d + e] += p[j] * vv;
            if (doi) acc += value(doi[e]) * vv;
          }
          dp[j] = acc;
          dsum += p[j] * acc;
        }
        if (!doi) continue;
        for (int j = 0; j < s.tk; ++j) {
          if (p[j] == 0) continue;
          const double ds = p[j] * (dp[j] - dsum) * slope[j] * scale;
          for (int e = 0; e < s.d; ++e) {
            r.dq[(qb + i) * s.d + e] += ds * value(k[(kb + j) * s.d + e]);
            r.dk[(kb + j) * s.d + e] += ds * value(qi[e]);
            r.dv[(kb + j) * s.d + e] += p[j] * value(doi[e]);
          }
        }
      }
    }
  return r;
}

// FlashAttn::params, the fields that follow from the shape (the cap as the op passes it, in
// f64 times log2(e), then f32); the caller sets the scale, the KV
// cache capacity and the pointers.
inline AttnParams params(const Shape &s) {
  AttnParams p{};
  p.b = s.b;
  p.hq = s.hq;
  p.hkv = s.hkv;
  p.tq = s.tq;
  p.tk = s.tk;
  p.d = s.d;
  p.causal = s.causal;
  p.offset = s.causal ? s.offset : 0;
  p.window = s.window;
  p.softcap_log2 = (float)(s.softcap * 1.4426950408889634);
  p.softcap_inv_log2 = s.softcap > 0 ? (float)(1 / (s.softcap * 1.4426950408889634)) : 0.f;
  p.nrows = s.b * s.hq * s.tq;
  p.nsplit = 1;
  return p;
}

// attn_key_range over the key mask kvalid [b, tk] (the launcher's first pass where there is
// one), into krange, which must outlive the params; nothing without a mask.
inline void key_range(const Shape &s, const std::vector<float> &kvalid, AttnParams &p,
                      std::vector<int> &krange) {
  if (kvalid.empty()) return;
  krange.assign(3 * s.b, -7);
  p.kvalid = kvalid.data();
  p.krange = krange.data();
  emu::launch({(unsigned)s.b, 1, 1}, {256, 1, 1}, 0, [&] { attn_key_range(p); });
}

}  // namespace attention_ref
