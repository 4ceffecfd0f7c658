//! RMSNorm: `y = x / sqrt(mean(x^2) + eps) * g`, computed in f32 whatever the input dtype,
//! with the gain `g` the stored weight or, for Gemma, one plus it ([`Gain`]).
//!
//! candle-nn's fused `rms_norm` has no backward, so training needs either this differentiable
//! composite or our CUDA op (forward and backward kernels).

use candle_core::{DType, Result, Tensor, D};

use super::registry::{warn_fallback, KernelChoice};

/// How the stored weight `w` gives the gain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gain {
    /// `w` itself (Llama, Qwen, Mistral, SmolLM3).
    AsIs,
    /// `1 + w`, formed in f32 (Gemma, which stores its gains as offsets from one, so that a
    /// weight decayed towards zero is a gain decayed towards one).
    PlusOne,
}

impl Gain {
    /// What the kernels add to every stored weight, in f32.
    pub fn offset(self) -> f32 {
        match self {
            Gain::AsIs => 0.0,
            Gain::PlusOne => 1.0,
        }
    }

    /// The gain as a tensor: `w`, or `1 + w` in f32 (as transformers forms Gemma's; in bf16
    /// the sum would lose w's low bits).
    pub fn of(self, w: &Tensor) -> Result<Tensor> {
        match self {
            Gain::AsIs => Ok(w.clone()),
            Gain::PlusOne => w.to_dtype(DType::F32)?.affine(1.0, 1.0),
        }
    }
}

/// The norm of `x` by the gain of `w`. Our kernel takes `w` in x's dtype or f32 (Gemma's f32
/// offsets under bf16 compute); the reference, any.
pub fn rms_norm(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    gain: Gain,
    choice: KernelChoice,
) -> Result<Tensor> {
    if choice == KernelChoice::Custom {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let y = super::spans::timed(
                super::KernelOp::RmsNorm,
                super::spans::Pass::Forward,
                x.device(),
                || super::cuda::rmsnorm::rms_norm(x, w, eps, gain),
            )?;
            if let Some(y) = y {
                return Ok(y);
            }
            warn_fallback(
                "rmsnorm",
                &format!("no CUDA kernel for x {:?}, w {:?}", x.dtype(), w.dtype()),
            );
            return reference_recorded(x, w, eps, gain);
        }
        if !x.device().is_cpu() || cfg!(feature = "cuda") {
            warn_fallback("rmsnorm", "the fused kernel runs on CUDA only");
        }
    }
    reference_recorded(x, w, eps, gain)
}

/// `(x + r, RmsNorm(x + r))` as one op with two outputs, where our kernel serves (`choice`
/// custom, CUDA, a block tape recording or no input wanting a gradient, `w` in x's dtype or
/// f32); `None` elsewhere, and the caller adds and norms apart.
pub fn add_fused(
    x: &Tensor,
    r: &Tensor,
    w: &Tensor,
    eps: f64,
    gain: Gain,
    choice: KernelChoice,
) -> Result<Option<(Tensor, Tensor)>> {
    let serves = choice == KernelChoice::Custom
        && x.device().is_cuda()
        && (crate::tape::recording() || crate::tape::untracked(&[x, r, w]))
        && covers(x, w);
    if !serves {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        super::cuda::rmsnorm::add_fused(x, r, w, eps, gain).map(Some)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (r, eps, gain);
        Ok(None)
    }
}

/// Whether our kernels take `x` and `w`: x f32, bf16 or f16, w in x's dtype or f32.
pub fn covers(x: &Tensor, w: &Tensor) -> bool {
    matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && (w.dtype() == x.dtype() || w.dtype() == DType::F32)
}

/// [`rms_norm_reference`] by `gain` as one op of a block tape (`crate::tape`).
fn reference_recorded(x: &Tensor, w: &Tensor, eps: f64, gain: Gain) -> Result<Tensor> {
    crate::tape::island(&[x, w], |a| {
        rms_norm_reference(&a[0], &gain.of(&a[1])?, eps)
    })
}

pub fn rms_norm_reference(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    xf.broadcast_mul(&inv)?
        .broadcast_mul(&w.to_dtype(DType::F32)?)?
        .to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rms_norm_matches_hand_computation() {
        let x = Tensor::new(&[[3.0f32, 4.0], [1.0, -1.0]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let y = rms_norm_reference(&x, &w, 0.0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // row 0: rms = sqrt((9 + 16) / 2) = 3.5355
        let r = (12.5f32).sqrt();
        assert!((y[0][0] - 3.0 / r).abs() < 1e-6);
        assert!((y[0][1] - 8.0 / r).abs() < 1e-6);
        assert!((y[1][0] - 1.0).abs() < 1e-6);
        assert!((y[1][1] + 2.0).abs() < 1e-6);
    }
}
