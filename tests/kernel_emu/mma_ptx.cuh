// The emulator's kernels/mma_ptx.cuh: the same functions, with the PTX semantics done on the
// host (cuda_emu.h runs the warp). scripts/kernel-emu.sh puts this file in place of the real
// one; everything else the kernels include is the real file.
//
// Layouts, as the PTX ISA gives them (g = lane / 4, c = lane % 4):
// - ldmatrix .x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i; register i of a lane
//   holds row g, columns 2c and 2c + 1 of matrix i (.trans: rows 2c and 2c + 1 of column g);
// - mma.m16n8k16 .row.col: A a0 = (g, 2c..2c+1), a1 = (g+8, ..), a2 = (g, 2c+8..),
//   a3 = (g+8, 2c+8..); B b0 = (k 2c..2c+1, n g), b1 = (k 2c+8..); C/D c0,c1 = (g, 2c..2c+1),
//   c2,c3 = (g+8, ..). A pair's lower-index element is the register's low half.
#pragma once

#include "common.cuh"

namespace temper {

// ex2.approx.ftz.f32: subnormal inputs read as zero, subnormal results are written as zero.
// The hardware's result is an approximation (about 2 ulp off at most, PTX ISA), so the
// emulator's is too: the exact 2^x moved by -2..2 ulp, a hash of x's bits choosing how far,
// so that a kernel's tolerance must hold the approximation's error as it would on a GPU.
static inline float exp2_ftz(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.f;
  float y = std::exp2(x);
  if (std::isfinite(y) && y > 0.f) {
    uint32_t h;
    std::memcpy(&h, &x, sizeof h);
    h *= 0x9e3779b1u;
    const int ulps = static_cast<int>(h >> 29) % 5 - 2;
    for (int i = 0; i < (ulps < 0 ? -ulps : ulps); ++i)
      y = std::nextafter(y, ulps < 0 ? 0.f : INFINITY);
  }
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

// An offset into the dynamic shared-memory array stands in for the shared-window address.
static inline uint32_t smem_addr(const void *p) {
  const unsigned char *c = static_cast<const unsigned char *>(p);
  if (c < emu::shared_base || c >= emu::shared_base + emu::shared_size)
    emu::fail("smem_addr of a pointer outside dynamic shared memory");
  return static_cast<uint32_t>(c - emu::shared_base);
}

// Poisons its destination now; lands at the cp_async_wait that covers its group.
static inline void cp_async16(uint32_t dst, const void *src, bool valid) {
  if (dst % 16 != 0) emu::fail("cp.async to a shared address not 16-byte aligned");
  if (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0)
    emu::fail("cp.async from a global address not 16-byte aligned");
  unsigned char *d = emu::shared_at(dst, 16);
  std::memset(d, 0xFF, 16);
  emu::me().open.push_back({d, valid ? static_cast<const unsigned char *>(src) : nullptr});
}
static inline void cp_async_commit() {
  emu::Fiber &f = emu::me();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
template <int N> static inline void cp_async_wait() {
  emu::Fiber &f = emu::me();
  while (f.groups.size() > static_cast<size_t>(N)) {
    for (const emu::Copy &c : f.groups.front()) {
      if (c.src)
        std::memcpy(c.dst, c.src, 16);
      else
        std::memset(c.dst, 0, 16);
    }
    f.groups.erase(f.groups.begin());
  }
}

namespace emu_detail {
inline uint16_t half_at(uint32_t addr) {
  uint16_t h;
  std::memcpy(&h, emu::shared_at(addr, 2), 2);
  return h;
}
inline void ldsm(uint32_t (&r)[4], uint32_t addr, bool trans, emu::Site at) {
  if (addr % 16 != 0) emu::fail("ldmatrix row address not 16-byte aligned");
  const unsigned l = emu::lane(), g = l >> 2, c = l & 3;
  emu::table().addr[l] = addr;
  emu::collective([&](emu::WarpTable &t) {
    for (int i = 0; i < 4; ++i) {
      uint16_t lo, hi;
      if (!trans) {
        lo = half_at(t.addr[8 * i + g] + 4 * c);
        hi = half_at(t.addr[8 * i + g] + 4 * c + 2);
      } else {
        lo = half_at(t.addr[8 * i + 2 * c] + 2 * g);
        hi = half_at(t.addr[8 * i + 2 * c + 1] + 2 * g);
      }
      r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }, at);
}
}  // namespace emu_detail

static inline void ldsm_x4(uint32_t (&r)[4], uint32_t addr, EMU_AT) {
  emu_detail::ldsm(r, addr, false, EMU_SITE);
}
static inline void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr, EMU_AT) {
  emu_detail::ldsm(r, addr, true, EMU_SITE);
}

template <typename T> struct Mma {
  static inline float value(uint32_t reg, int half) {
    T h{static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu)};
    return to_f32(h);
  }
  static inline void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                         EMU_AT) {
    const unsigned l = emu::lane(), g = l >> 2, q = l & 3;
    emu::WarpTable &t = emu::table();
    for (int i = 0; i < 4; ++i) t.word[l][i] = a[i];
    t.word[l][0] |= static_cast<uint64_t>(b0) << 32;
    t.word[l][1] |= static_cast<uint64_t>(b1) << 32;
    emu::collective([&](emu::WarpTable &t) {
      // Gather A (16x16) and B (16x8) from every lane's fragments.
      float A[16][16], B[16][8];
      for (unsigned ln = 0; ln < 32; ++ln) {
        const unsigned gg = ln >> 2, cc = ln & 3;
        for (int i = 0; i < 4; ++i) {
          const uint32_t reg = static_cast<uint32_t>(t.word[ln][i]);
          const unsigned row = gg + ((i & 1) ? 8 : 0), col = 2 * cc + ((i & 2) ? 8 : 0);
          A[row][col] = value(reg, 0);
          A[row][col + 1] = value(reg, 1);
        }
        for (int i = 0; i < 2; ++i) {
          const uint32_t reg = static_cast<uint32_t>(t.word[ln][i] >> 32);
          const unsigned k = 2 * cc + 8 * i;
          B[k][gg] = value(reg, 0);
          B[k + 1][gg] = value(reg, 1);
        }
      }
      for (int e = 0; e < 4; ++e) {
        const unsigned row = g + ((e & 2) ? 8 : 0), col = 2 * q + (e & 1);
        float sum = c[e];
        for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
        c[e] = sum;
      }
    }, EMU_SITE);
  }
  static inline uint32_t pack(float lo, float hi) {
    const T l = from_f32<T>(lo), h = from_f32<T>(hi);
    return static_cast<uint32_t>(l.bits) | (static_cast<uint32_t>(h.bits) << 16);
  }
};

}  // namespace temper
