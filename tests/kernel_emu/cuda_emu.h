// A CPU emulator for temper's CUDA kernels: enough of CUDA C++ to compile kernels/*.cu with
// g++ and run a launch on the host, one block at a time, its threads as cooperative fibers.
//
// Why: the kernels' index maths, tiling, masking and mma fragment layouts can then be tested
// against a reference on a machine without a GPU (tests/kernel_emu.rs, scripts/kernel-emu.sh).
// What it cannot show: speed, register or shared-memory limits, and races between threads
// that the code synchronises wrongly only on real hardware (memory ordering).
//
// How it runs a block: every thread is a fiber (ucontext) on the one host thread. A fiber runs
// until it reaches a barrier (`__syncthreads`, or the internal barrier of a warp collective:
// shuffles, ldmatrix, mma) and then yields. A block barrier opens when every live thread of
// the block waits at it, a warp barrier when all 32 lanes of the warp wait at it. Anything
// else (a warp collective with lanes exited or waiting elsewhere, a block barrier some threads
// never reach) is reported as a deadlock with where each thread stands, and aborts: on a GPU
// that is a hang or undefined behaviour. So do the lanes of a warp meeting at different
// collectives (each records the kernel line that called it): divergent control flow.
//
// Stricter than hardware on purpose:
// - shared memory, static and dynamic, starts each block filled with 0xFF bytes (NaN as f32,
//   bf16 or f16, -1 as an integer), so a read of a shared value nobody wrote shows up;
// - a cp.async copy fills its destination with 0xFF bytes when issued and lands only when
//   `cp.async.wait_group` says it must, so reading a stage before waiting for it, or a
//   prefetch overwriting a stage another warp still reads, shows up as NaN;
// - one warp at a time runs ahead of the others, as far as the barriers allow (the first warp
//   or, with EMU_ORDER=reverse, the last), so a missing __syncthreads shows up too;
// - a dynamic shared-memory request larger than the kernel's array fails.
//
// Include this file first (g++ -include), with tests/kernel_emu/include on the include path
// (stand-ins for <cuda_bf16.h> and <cuda_fp16.h>) and tests/kernel_emu/mma_ptx.cuh in place of
// kernels/mma_ptx.cuh (scripts/kernel-emu.sh builds that overlay).
#pragma once

#include <link.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------------------------------
// Qualifiers.
// ---------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
// Block-scope `thread_local` has static storage: with the blocks run one after another, one
// copy per array is exactly one per block. It also fits `extern __shared__` (dynamic shared
// memory), which a driver defines at namespace scope with EMU_DYNAMIC_SHARED.
#define __shared__ thread_local
#define __align__(n) __attribute__((aligned(n)))

// ---------------------------------------------------------------------------------------
// 16-bit float types: bit patterns, converted with round-to-nearest-even.
// ---------------------------------------------------------------------------------------
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline float __half2float(__half h) {
  _Float16 x;
  std::memcpy(&x, &h.bits, 2);
  return static_cast<float>(x);
}
inline __half __float2half_rn(float f) {
  const _Float16 x = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.bits, &x, 2);
  return h;
}
inline __half2 __floats2half2_rn(float lo, float hi) {
  return {__float2half_rn(lo), __float2half_rn(hi)};
}

// ---------------------------------------------------------------------------------------
// Arithmetic intrinsics (host maths; the _rn forms are IEEE round-to-nearest already).
// ---------------------------------------------------------------------------------------
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __log2f(float x) { return std::log2(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
// CUDA's min/max take mixed integer types; the host's std:: versions do not.
template <typename A, typename B> inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B> inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}
template <typename T> inline T __ldg(const T *p) { return *p; }
template <typename T> inline T __ldcg(const T *p) { return *p; }
inline void __threadfence() {}

// CUDA's vector types. A GPU loads and stores them whole, which needs their alignment: copying
// one from or to a misaligned address fails here.
namespace emu {
[[noreturn]] inline void fail(const char *what);
inline void check_aligned(const void *p, size_t a) {
  if (reinterpret_cast<uintptr_t>(p) % a != 0)
    fail("a vector load or store at an address not aligned to its size");
}
}  // namespace emu

// The alignment check, as a base whose copies check both addresses (an empty base: the
// vector types keep CUDA's sizes).
template <size_t A> struct AlignedCopy {
  AlignedCopy() = default;
  AlignedCopy(const AlignedCopy &o) { emu::check_aligned(&o, A); }
  AlignedCopy &operator=(const AlignedCopy &o) {
    emu::check_aligned(this, A);
    emu::check_aligned(&o, A);
    return *this;
  }
};
struct __attribute__((aligned(8))) float2 : AlignedCopy<8> {
  float x, y;
};
struct __attribute__((aligned(16))) float4 : AlignedCopy<16> {
  float x, y, z, w;
};
struct __attribute__((aligned(8))) uint2 : AlignedCopy<8> {
  unsigned x, y;
};
struct __attribute__((aligned(16))) uint4 : AlignedCopy<16> {
  unsigned x, y, z, w;
};
static_assert(sizeof(float2) == 8 && sizeof(float4) == 16 && sizeof(uint2) == 8 &&
                  sizeof(uint4) == 16,
              "CUDA's vector sizes");
inline float2 make_float2(float x, float y) {
  float2 v;
  v.x = x;
  v.y = y;
  return v;
}
inline float4 make_float4(float x, float y, float z, float w) {
  float4 v;
  v.x = x;
  v.y = y;
  v.z = z;
  v.w = w;
  return v;
}
inline uint2 make_uint2(unsigned x, unsigned y) {
  uint2 v;
  v.x = x;
  v.y = y;
  return v;
}
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
  uint4 v;
  v.x = x;
  v.y = y;
  v.z = z;
  v.w = w;
  return v;
}

// ---------------------------------------------------------------------------------------
// The fiber runtime.
// ---------------------------------------------------------------------------------------
namespace emu {

struct Dim {
  unsigned x = 1, y = 1, z = 1;
  unsigned count() const { return x * y * z; }
};

inline Dim thread_idx, block_idx, block_dim, grid_dim;

enum class State { Ready, WarpWait, BlockWait, Done };

inline const char *state_name(State s) {
  switch (s) {
    case State::Ready: return "running";
    case State::WarpWait: return "at a warp collective";
    case State::BlockWait: return "at __syncthreads";
    case State::Done: return "exited";
  }
  return "?";
}

// One pending cp.async copy of 16 bytes (src == nullptr: zero-fill).
struct Copy {
  unsigned char *dst;
  const unsigned char *src;
};

struct Fiber {
  ucontext_t ctx;
  unsigned char *stack = nullptr;  // from stack_pool
  State state = State::Ready;
  Dim idx;
  std::vector<Copy> open;                // issued, not yet committed
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
};

// What the lanes of one warp put on the table for a collective.
// Where a lane reached a warp collective (the kernel's call: every collective takes the
// caller's file and line as defaulted arguments, EMU_AT).
struct Site {
  const char *file;
  unsigned line;
  bool operator==(const Site &o) const { return line == o.line && std::strcmp(file, o.file) == 0; }
};
#define EMU_AT const char *emu_file = __builtin_FILE(), unsigned emu_line = __builtin_LINE()
#define EMU_SITE (emu::Site{emu_file, emu_line})

struct WarpTable {
  uint64_t word[32][4];
  uint32_t addr[32];
  Site site[32];
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<WarpTable> warps;
  ucontext_t main;
  unsigned cur = 0;
  std::function<void()> body;
};

inline Block *block = nullptr;
// Which warp runs ahead: the first (false) or the last (true). A race that a barrier should
// prevent shows in one order or the other; scripts/kernel-emu.sh runs both
// (EMU_ORDER=reverse).
inline bool reverse_order = [] {
  const char *o = std::getenv("EMU_ORDER");
  return o != nullptr && std::strcmp(o, "reverse") == 0;
}();
inline unsigned char *shared_base = nullptr;  // the driver's dynamic shared-memory array
inline size_t shared_size = 0;
inline size_t shared_request = 0;             // bytes the current launch asked for
constexpr size_t kStack = 256 * 1024;
// Fiber stacks, kept from block to block: allocating (and faulting in) a block's worth for
// every block was most of a one-block-per-row kernel's run time.
inline std::vector<std::unique_ptr<unsigned char[]>> stack_pool;

[[noreturn]] inline void fail(const char *what) {
  std::fprintf(stderr, "kernel emulator: %s (block %u,%u,%u thread %u)\n", what, block_idx.x,
               block_idx.y, block_idx.z, block ? block->cur : 0u);
  // _Exit: no destructors, which would free the fiber stack this may be running on.
  std::fflush(nullptr);
  std::_Exit(3);
}

inline Fiber &me() { return block->fibers[block->cur]; }
inline unsigned lane() { return block->cur & 31u; }
inline WarpTable &table() { return block->warps[block->cur >> 5]; }

inline void wait(State s) {
  Fiber &f = me();
  f.state = s;
  swapcontext(&f.ctx, &block->main);
}

inline void entry() {
  block->body();
  Fiber &f = me();
  // A copy still in flight when its thread exits would land in shared memory the block no
  // longer owns (empty groups committed past the last stage are fine).
  bool pending = !f.open.empty();
  for (const auto &g : f.groups) pending |= !g.empty();
  if (pending) fail("a thread exited with cp.async copies it never waited for");
  f.state = State::Done;
  swapcontext(&f.ctx, &block->main);
}

// Opens whichever barrier every thread it concerns is waiting at; false when none can open.
inline bool release() {
  auto &fs = block->fibers;
  bool any_block = false, all_block = true, live = false;
  for (auto &f : fs) {
    if (f.state == State::Done) continue;
    live = true;
    any_block |= f.state == State::BlockWait;
    all_block &= f.state == State::BlockWait;
  }
  if (!live) return false;
  if (any_block && all_block) {
    // Past the barrier the threads are held as at a warp collective, so that one warp runs
    // ahead from here too: a read just after a barrier must be able to be overtaken by
    // another warp's next write (a missing second barrier in back-to-back block sums).
    for (auto &f : fs)
      if (f.state == State::BlockWait) f.state = State::WarpWait;
    return true;
  }
  // One warp at a time, always the first that can go in the launch's order: it runs ahead of
  // the others until a block barrier stops it, as far as the kernel's barriers allow.
  const size_t nwarps = fs.size() / 32;
  for (size_t k = 0; k < nwarps; ++k) {
    const size_t w0 = 32 * (reverse_order ? nwarps - 1 - k : k);
    bool all = true;
    for (size_t i = w0; i < w0 + 32; ++i) all &= fs[i].state == State::WarpWait;
    if (all) {
      for (size_t i = w0; i < w0 + 32; ++i) fs[i].state = State::Ready;
      return true;
    }
  }
  return false;
}

[[noreturn]] inline void deadlock() {
  std::fprintf(stderr, "kernel emulator: deadlock in block %u,%u,%u:\n", block_idx.x,
               block_idx.y, block_idx.z);
  auto &fs = block->fibers;
  for (size_t w0 = 0; w0 < fs.size(); w0 += 32) {
    std::fprintf(stderr, "  warp %zu:", w0 / 32);
    for (size_t i = w0; i < std::min(fs.size(), w0 + 32); ++i)
      std::fprintf(stderr, " %zu %s;", i - w0, state_name(fs[i].state));
    std::fprintf(stderr, "\n");
  }
  // _Exit: no destructors, which would free the fiber stack this may be running on.
  std::fflush(nullptr);
  std::_Exit(3);
}

inline void run_block(const std::function<void()> &body) {
  Block b;
  const unsigned n = block_dim.count();
  if (n % 32 != 0) fail("a block size that is not a whole number of warps");
  b.fibers.resize(n);
  b.warps.resize((n + 31) / 32);
  b.body = body;
  block = &b;
  for (unsigned i = 0; i < n; ++i) {
    Fiber &f = b.fibers[i];
    f.idx = {i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y)};
    if (stack_pool.size() <= i) stack_pool.emplace_back(new unsigned char[kStack]);
    f.stack = stack_pool[i].get();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, entry, 0);
    // Held at the start like at a warp collective, so that the first warp to go runs ahead
    // of the others from the kernel's first line.
    f.state = State::WarpWait;
  }
  for (;;) {
    bool ran = false;
    for (unsigned i = 0; i < n; ++i) {
      if (b.fibers[i].state != State::Ready) continue;
      b.cur = i;
      thread_idx = b.fibers[i].idx;
      swapcontext(&b.main, &b.fibers[i].ctx);
      ran = true;
    }
    if (ran) continue;
    bool live = false;
    for (auto &f : b.fibers) live |= f.state != State::Done;
    if (!live) break;
    if (!release()) deadlock();
  }
  block = nullptr;
}

// The program's own TLS block. Every __shared__ array is a thread_local of the program (the
// kernels' and the driver's dynamic one), and nothing else of the program is, so poisoning the
// block poisons exactly the block's shared memory. On x86-64 (TLS variant II) the program's
// block ends at the thread pointer; the probe checks that it is where it is thought to be,
// and if not only the dynamic array is poisoned.
inline thread_local unsigned char tls_probe;
struct TlsBlock {
  unsigned char *base = nullptr;
  size_t size = 0;
};
inline TlsBlock program_tls() {
  struct Segment {
    size_t size = 0, align = 1;
  } seg;
  dl_iterate_phdr(
      [](dl_phdr_info *info, size_t, void *data) {
        auto *seg = static_cast<Segment *>(data);
        for (int i = 0; i < info->dlpi_phnum; ++i)
          if (info->dlpi_phdr[i].p_type == PT_TLS) {
            seg->size = info->dlpi_phdr[i].p_memsz;
            seg->align = info->dlpi_phdr[i].p_align ? info->dlpi_phdr[i].p_align : 1;
          }
        return 1;  // the first object listed is the program itself
      },
      &seg);
  TlsBlock t;
#if defined(__x86_64__)
  unsigned char *tp;
  asm("mov %%fs:0, %0" : "=r"(tp));
  const size_t offset = (seg.size + seg.align - 1) / seg.align * seg.align;
  t = {tp - offset, seg.size};
#endif
  const bool probe_inside = &tls_probe >= t.base && &tls_probe < t.base + t.size;
  const bool shared_inside =
      shared_base == nullptr || (shared_base >= t.base && shared_base + shared_size <= t.base + t.size);
  if (!probe_inside || !shared_inside) {
    std::fprintf(stderr, "kernel emulator: static __shared__ arrays are not poisoned here (TLS layout not recognised)\n");
    return {};
  }
  return t;
}

// Runs `kernel` over the grid, one block after another.
inline void launch(Dim grid, Dim blk, size_t shared_bytes, const std::function<void()> &kernel) {
  static const TlsBlock tls = program_tls();
  if (shared_bytes > shared_size) fail("the launch asks for more dynamic shared memory than the driver's EMU_DYNAMIC_SHARED array");
  grid_dim = grid;
  block_dim = blk;
  shared_request = shared_bytes;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        block_idx = {x, y, z};
        if (tls.base) std::memset(tls.base, 0xFF, tls.size);
        else if (shared_base) std::memset(shared_base, 0xFF, shared_size);
        run_block(kernel);
      }
}

// A warp collective: every lane has written its entry of the table; wait for all 32, check
// they all reached this same collective (lanes at different ones is divergence: a hang or
// garbage on a GPU), let `read` look at every lane's entry, then wait again so that no lane
// overwrites the table before all have read it.
template <typename F> inline void collective(F &&read, Site at) {
  table().site[lane()] = at;
  wait(State::WarpWait);
  WarpTable &t = table();
  for (unsigned i = 0; i < 32; ++i)
    if (!(t.site[i] == at)) {
      std::fprintf(stderr, "kernel emulator: lane %u at the warp collective of %s:%u, lane %u at %s:%u\n",
                   lane(), at.file, at.line, i, t.site[i].file, t.site[i].line);
      fail("warp collective under divergent control flow");
    }
  read(t);
  wait(State::WarpWait);
}

template <typename T> inline uint64_t to_word(T v) {
  static_assert(sizeof(T) <= 8, "shuffled values are at most 8 bytes");
  uint64_t w = 0;
  std::memcpy(&w, &v, sizeof(T));
  return w;
}
template <typename T> inline T from_word(uint64_t w) {
  T v;
  std::memcpy(&v, &w, sizeof(T));
  return v;
}

template <typename T, typename Src> inline T shuffle(T v, Src src_of, Site at) {
  table().word[lane()][0] = to_word(v);
  T out{};
  const unsigned l = lane();
  collective([&](WarpTable &t) { out = from_word<T>(t.word[src_of(l)][0]); }, at);
  return out;
}

template <typename T, typename Op> inline T reduce(T v, Op op, Site at) {
  table().word[lane()][0] = to_word(v);
  T out{};
  collective(
      [&](WarpTable &t) {
        out = from_word<T>(t.word[0][0]);
        for (int i = 1; i < 32; ++i) out = op(out, from_word<T>(t.word[i][0]));
      },
      at);
  return out;
}

inline unsigned char *shared_at(uint32_t addr, size_t bytes) {
  if (addr + bytes > shared_request) fail("shared-memory access past the launch's dynamic shared memory");
  return shared_base + addr;
}

}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim

// Defines the dynamic shared-memory array a kernel file declares `extern __shared__` (in its
// namespace) and hands it to the emulator.
#define EMU_DYNAMIC_SHARED(name, bytes)                                     \
  thread_local __attribute__((aligned(128))) unsigned char name[bytes];    \
  static const bool name##_registered = [] {                               \
    emu::shared_base = name;                                               \
    emu::shared_size = bytes;                                              \
    return true;                                                           \
  }();

// ---------------------------------------------------------------------------------------
// Barriers, warp shuffles and reductions (full-warp masks only, as the kernels use them).
// ---------------------------------------------------------------------------------------
inline void __syncthreads() { emu::wait(emu::State::BlockWait); }
inline void __syncwarp(unsigned = 0xffffffffu, EMU_AT) {
  emu::collective([](emu::WarpTable &) {}, EMU_SITE);
}

template <typename T> inline T __shfl_sync(unsigned, T v, int src, int width = 32, EMU_AT) {
  return emu::shuffle(
      v, [&](unsigned l) { return (l & ~(width - 1u)) + (src & (width - 1)); }, EMU_SITE);
}
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int m, int width = 32, EMU_AT) {
  return emu::shuffle(
      v,
      [&](unsigned l) {
        const unsigned s = l ^ m;
        return (s & ~(width - 1u)) == (l & ~(width - 1u)) ? s : l;
      },
      EMU_SITE);
}
template <typename T> inline T __shfl_down_sync(unsigned, T v, unsigned d, int width = 32, EMU_AT) {
  return emu::shuffle(
      v,
      [&](unsigned l) {
        const unsigned s = l + d;
        return (s & ~(width - 1u)) == (l & ~(width - 1u)) ? s : l;
      },
      EMU_SITE);
}
template <typename T> inline T __shfl_up_sync(unsigned, T v, unsigned d, int width = 32, EMU_AT) {
  return emu::shuffle(
      v, [&](unsigned l) { return (l & (width - 1u)) >= d ? l - d : l; }, EMU_SITE);
}
inline int __reduce_add_sync(unsigned, int v, EMU_AT) {
  return emu::reduce(v, [](int a, int b) { return a + b; }, EMU_SITE);
}
inline unsigned __reduce_add_sync(unsigned, unsigned v, EMU_AT) {
  return emu::reduce(v, [](unsigned a, unsigned b) { return a + b; }, EMU_SITE);
}
inline int __reduce_min_sync(unsigned, int v, EMU_AT) {
  return emu::reduce(v, [](int a, int b) { return a < b ? a : b; }, EMU_SITE);
}
inline int __reduce_max_sync(unsigned, int v, EMU_AT) {
  return emu::reduce(v, [](int a, int b) { return a < b ? b : a; }, EMU_SITE);
}
inline unsigned __ballot_sync(unsigned, int pred, EMU_AT) {
  emu::table().word[emu::lane()][0] = pred != 0;
  unsigned out = 0;
  emu::collective(
      [&](emu::WarpTable &t) {
        for (int i = 0; i < 32; ++i) out |= (t.word[i][0] ? 1u : 0u) << i;
      },
      EMU_SITE);
  return out;
}

// Bit intrinsics on a 32-bit int: 1 + the index of the lowest set bit (0 for none), and the
// number of leading zeros (32 for none).
inline int __ffs(int x) { return x == 0 ? 0 : __builtin_ctz((unsigned)x) + 1; }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }

// ---------------------------------------------------------------------------------------
// Atomics: one host thread runs every fiber, so a plain read-modify-write is atomic.
// ---------------------------------------------------------------------------------------
template <typename T> inline T atomicAdd(T *p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
inline float2 atomicAdd(float2 *p, float2 v) {
  const float2 old = *p;
  p->x += v.x;
  p->y += v.y;
  return old;
}
template <typename T> inline T atomicMax(T *p, T v) {
  const T old = *p;
  *p = old < v ? v : old;
  return old;
}
template <typename T> inline T atomicMin(T *p, T v) {
  const T old = *p;
  *p = v < old ? v : old;
  return old;
}
template <typename T> inline T atomicCAS(T *p, T cmp, T v) {
  const T old = *p;
  if (old == cmp) *p = v;
  return old;
}
template <typename T> inline T atomicExch(T *p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
