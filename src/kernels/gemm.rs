//! The GEMMs of the linear layers and the LM head: `y = x W^T` forward, `dx = dy W` and
//! `dW = dy^T x` backward, `x [..., K]` (its leading dimensions the rows), `W [N, K]`.
//!
//! The reference is candle's matmul (cuBLAS `gemmStridedBatchedEx` with its default
//! workspace); the custom one calls cuBLASLt directly as PyTorch does for bf16 and f16: the
//! algorithm from cuBLASLt's heuristic with a 32 MiB workspace on Hopper, f32 accumulation.
//! f32 inputs stay on the reference (cuBLASLt would run them as TF32, which changes results),
//! as do rows whose length is not a multiple of 16 bytes (but in the loss head, which pads
//! them: src/kernels/cuda/loss_head.rs). The maths is one GEMM either way,
//! so there is no CPU implementation to test: the GPU test compares the two.

use candle_core::{Result, Tensor, D};

use crate::tape;

use super::registry::KernelChoice;

/// `x W^T` for `x [..., K]` and `W [N, K]`, giving `[..., N]`, differentiable in both.
pub fn matmul_nt(x: &Tensor, w: &Tensor, choice: KernelChoice) -> Result<Tensor> {
    if choice == KernelChoice::Custom && x.device().is_cuda() {
        #[cfg(feature = "cuda")]
        {
            let y = super::spans::timed(
                super::KernelOp::Gemm,
                super::spans::Pass::Forward,
                x.device(),
                || super::cuda::gemm::matmul_nt(x, w),
            )?;
            if let Some(y) = y {
                return Ok(y);
            }
            let why = match (x.dtype(), x.dims().last(), w.dims().first()) {
                (candle_core::DType::F32, _, _) => "f32 (cuBLASLt would run it as TF32)".into(),
                (dt, Some(k), Some(n)) => {
                    format!("{dt:?} with K {k}, N {n} (rows not a multiple of 16 bytes)")
                }
                (dt, _, _) => format!("{dt:?}"),
            };
            super::registry::warn_fallback("gemm", &why);
        }
    }
    reference_recorded(x, w)
}

/// [`reference`] as one op of a block tape (`crate::tape`), its backward the two GEMMs.
fn reference_recorded(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !tape::recording() {
        return reference(x, w);
    }
    let (xa, wa) = (x.detach(), w.detach());
    let y = reference(&xa, &wa)?;
    // Both gradients are fresh products: a tied embedding's backward may add into dW.
    tape::record_owned(&[x, w], &y, move |g, want| {
        let (dx, dw) = reference_grads(&g, &xa, &wa, [want[0], want[1]])?;
        Ok(vec![dx, dw])
    })?;
    Ok(y)
}

/// The gradients of [`reference()`]'s `y = x W^T` for `dy` (`[..., N]`) with candle's matmul:
/// `(dy W, dy^T x)`, each `None` where `want` says its operand needs none.
pub fn reference_grads(
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    [want_x, want_w]: [bool; 2],
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (k, n) = (x.dim(D::Minus1)?, w.dim(0)?);
    let rows = x.elem_count() / k.max(1);
    let g = dy.to_dtype(x.dtype())?.reshape((rows, n))?;
    let dx = match want_x {
        true => Some(g.matmul(w)?.reshape(x.shape())?),
        false => None,
    };
    let dw = match want_w {
        true => Some(g.t()?.matmul(&x.reshape((rows, k))?)?),
        false => None,
    };
    Ok((dx, dw))
}

/// candle's matmul, the leading dimensions of `x` flattened into its rows.
pub fn reference(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let Some((&k, lead)) = dims.split_last() else {
        candle_core::bail!("linear: a scalar input");
    };
    if lead.len() == 1 {
        return x.matmul(&w.t()?);
    }
    let rows = lead.iter().product::<usize>();
    let y = x.reshape((rows, k))?.matmul(&w.t()?)?;
    let mut out = lead.to_vec();
    out.push(w.dim(0)?);
    y.reshape(out)
}

/// `act(x W^T + b)` with the bias (and the activation) in our cuBLASLt GEMM's epilogue (`b`
/// `[N]`, the f32 master or any float dtype): `None` off CUDA or where cuBLASLt does not take
/// the GEMM, and then the caller adds the bias its own way. The GELU epilogue keeps no
/// pre-activation, so it has no backward: generation only, no input carrying a gradient.
pub fn linear_bias_epilogue(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    act: super::bias::BiasAct,
) -> Result<Option<Tensor>> {
    if !x.device().is_cuda() {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        use super::bias::BiasAct;
        super::spans::timed(
            super::KernelOp::Gemm,
            super::spans::Pass::Forward,
            x.device(),
            || match act {
                BiasAct::Identity => super::cuda::gemm::matmul_nt_bias(x, w, b),
                BiasAct::GeluTanh => super::cuda::gemm::matmul_nt_bias_gelu(x, w, b),
            },
        )
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (w, b, act);
        Ok(None)
    }
}

/// The rows (a multiple of 8) that `W`, cast to `x`'s dtype and padded with zero rows, would
/// need for our GEMM to take `x W^T` where it does not take `W` as it is only because `W`'s
/// row count `N` is no multiple of 8 (GPT-2's vocabulary of 50,257; the built-in presets'
/// 258); `None` where it takes `W` already, or would not either way (off CUDA, f32, the
/// reference chosen). Reads `W`'s shape only (`W` may be the f32 master): no cast is made.
pub fn padded_rows(x: &Tensor, w: &Tensor, choice: KernelChoice) -> Option<usize> {
    if choice != KernelChoice::Custom || !x.device().is_cuda() {
        return None;
    }
    #[cfg(feature = "cuda")]
    if let Ok(dims) = w.dims2() {
        return super::cuda::gemm::pads_nt(x, dims);
    }
    let _ = w;
    None
}

/// `x W^T (+ bias)` for `x` of any rank (`[..., K]`), `W [N, K]`.
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    choice: KernelChoice,
) -> Result<Tensor> {
    let y = matmul_nt(x, w, choice)?;
    match bias {
        Some(b) => bias_add(&y, b),
        None => Ok(y),
    }
}

/// `y + b` for `b [N]`, one op of a block tape: its backward passes `dy` on and sums its rows
/// into the bias gradient.
fn bias_add(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !tape::recording() {
        return y.broadcast_add(b);
    }
    let out = y.detach().broadcast_add(&b.detach())?;
    let dtype = b.dtype();
    tape::record(&[y, b], &out, move |g, want| {
        let db = match want[1] {
            true => {
                let n = g.dim(D::Minus1)?;
                Some(g.reshape(((), n))?.sum(0)?.to_dtype(dtype)?)
            }
            false => None,
        };
        Ok(vec![Some(g), db])
    })?;
    Ok(out)
}
