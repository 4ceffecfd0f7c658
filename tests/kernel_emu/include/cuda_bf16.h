// Stand-in for CUDA's <cuda_bf16.h>: the emulator defines the 16-bit float types in cuda_emu.h,
// which every emulated kernel includes first.
#pragma once
