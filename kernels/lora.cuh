// What the LoRA kernels (lora.cu) share with their launcher, src/kernels/cuda/lora.rs:
//   LoraParams     the one kernel argument of every lora entry point (the ABI), mirrored
//                  field for field by `LoraParams` in src/kernels/cuda/lora.rs
//   DyTraits<RP>   tile choices of lora_dy and the shared memory of its pipeline stages
//   kTile, kThreads  the dY tile edge and the block size of lora_dy
#pragma once

#include "common.cuh"

namespace temper {
namespace lora {

// One struct for the family (flash-attention's params idea), passed by value; a kernel reads
// only the fields its comment names. Pointers to tensors of the storage dtype T are `void *`
// (the dtype is the entry point's suffix). Shapes: x [M, K], W [N, K], A [r, K], B [N, r].
// Field order and types must match the Rust `#[repr(C)] struct LoraParams` exactly.
struct LoraParams {
  const void *bm;    // [N, r] B                         pack
  const void *bias;  // [N] or null (no bias)            pack
  void *uext;        // [M, r8] [s x A^T | 1 | 0]        pack writes cols r.., dy reads
  void *bext;        // [N, r8] [B | bias | 0]           pack writes, dy reads
  const void *dy;    // [M, N] gradient of y             dy
  float *part_g;     // [nbx, M, rp] partials of g       dy writes, dy_reduce reads
  float *part_b;     // [nby, N, rp] partials of dB      dy writes, dy_reduce reads
  void *g;           // [M, r] g = s dY B                dy_reduce writes
  void *db;          // [N, r] dB = dY^T u_s             dy_reduce writes
  int m;             // rows of x (and of dY)
  int n;             // out features (N % 8 == 0 for lora_dy)
  int r;             // LoRA rank
  int r8;            // padded rank: r + has_bias rounded up to 8 (row length of u/B_ext)
  int rp;            // rank lora_dy is instantiated for (16, 32, 64): row length of partials
  int mc;            // rows of dY per lora_dy block (multiple of 64)
  int nc;            // columns of dY per lora_dy block (multiple of 64)
  int nbx;           // lora_dy blocks along N (gridDim.x)
  int nby;           // lora_dy blocks along M (gridDim.y)
  float scale;       // LoRA scale s (alpha / r)
};
static_assert(sizeof(LoraParams) == 112, "LoraParams: keep in step with the Rust mirror");
static_assert(alignof(LoraParams) == 8, "LoraParams: keep in step with the Rust mirror");

constexpr int kTile = 64;      // dY tile edge
constexpr int kThreads = 128;  // lora_dy block: 4 warps, 16 rows of a tile each

// lora_dy for ranks up to RP: per pipeline stage a dY tile [64][64], a B_ext tile and a u_ext
// tile [64][RP + 8] (8 elements = 16 bytes of padding: conflict-free ldmatrix on narrow
// rows), two stages, 2-byte elements; the f32 accumulators follow (sized by the host plan).
template <int RP> struct DyTraits {
  static constexpr int kThreads = ::temper::lora::kThreads;
  static constexpr int kRowStride = RP + 8;
  static constexpr int kStageElems = kTile * kTile + 2 * kTile * kRowStride;
  static constexpr int kStageBytes = 2 * kStageElems * 2;
  static_assert(RP == 16 || RP == 32 || RP == 64, "ranks lora_dy is instantiated for");
  static_assert(kTile == 16 * (kThreads / 32), "one 16-row mma tile per warp");
};
static_assert(DyTraits<64>::kStageBytes == 53248, "DyPlan::stage_bytes in lora.rs");
static_assert(DyTraits<16>::kStageBytes == 28672, "DyPlan::stage_bytes in lora.rs");

}  // namespace lora
}  // namespace temper
