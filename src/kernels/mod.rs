//! One module per op; each exposes one function that dispatches between the reference
//! implementation and our CUDA kernel according to the [`registry`].

pub mod adamw;
pub mod attention;
pub mod bias;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod decode_step;
pub mod dropout;
pub mod embedding;
pub mod gae;
pub mod gelu;
pub mod gemm;
pub mod heads;
pub mod host;
pub mod host_ids;
pub mod layernorm;
pub mod logprobs;
pub mod lora;
pub mod registry;
pub mod rmsnorm;
pub mod rope;
pub mod sample;
pub mod segments;
pub mod spans;
pub mod swiglu;

pub use registry::{KernelChoice, KernelOp, KernelSet};

/// `t`, kept alive until the capture of a decode step ends where one is allocating our
/// outputs up front (`cuda::capture_arena`, under programmatic launches), so that its free
/// falls after the step's last kernel instead of between two; `t` as it is otherwise.
pub fn kept_in_capture(t: candle_core::Tensor) -> candle_core::Tensor {
    #[cfg(feature = "cuda")]
    return cuda::capture_arena::kept(t);
    #[cfg(not(feature = "cuda"))]
    t
}
