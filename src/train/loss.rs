//! Losses and the per-token quantities the stages share: log-softmax, token log-probabilities,
//! masked means, entropy. Everything here is composed of differentiable candle ops.

use anyhow::Result;
use candle_core::{DType, Tensor, D};

use crate::kernels::KernelChoice;

pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// `[B, T, V]` logits and `[B, T]` u32 targets -> `[B, T]` log p(target), by `kernel`'s
/// implementation (`--kernels logprobs=...`; src/kernels/logprobs.rs).
pub fn token_logprobs(logits: &Tensor, targets: &Tensor, kernel: KernelChoice) -> Result<Tensor> {
    Ok(crate::kernels::logprobs::token_logprobs(
        logits, targets, kernel,
    )?)
}

/// Entropy of the softmax over the last dimension, `[B, T]`.
pub fn entropy(logits: &Tensor) -> Result<Tensor> {
    let lp = log_softmax(&logits.to_dtype(DType::F32)?)?;
    Ok((lp.exp()? * &lp)?.sum(D::Minus1)?.neg()?)
}

/// Sum of `x * mask` over all elements divided by the number of valid elements.
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let n = mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
    Ok(((x * mask)?.sum_all()? / n)?)
}

/// Mean next-token cross-entropy over the positions where `mask` is 1.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
    kernel: KernelChoice,
) -> Result<Tensor> {
    masked_mean(&token_logprobs(logits, targets, kernel)?.neg()?, mask)
}

/// `log(sigmoid(x))` computed stably as `-softplus(-x)`.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    // softplus(z) = max(z, 0) + log(1 + exp(-|z|))
    let z = x.neg()?;
    let soft = (z.relu()? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    Ok(soft.neg()?)
}

pub fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cross_entropy_of_uniform_logits_is_log_vocab() {
        let logits = Tensor::zeros((2, 3, 5), DType::F32, &Device::Cpu).unwrap();
        let targets = Tensor::new(&[[0u32, 1, 2], [3, 4, 0]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1f32, 1., 0.], [1., 0., 0.]], &Device::Cpu).unwrap();
        let l = scalar(&cross_entropy(&logits, &targets, &mask, KernelChoice::Reference).unwrap())
            .unwrap();
        assert!((l - 5f64.ln()).abs() < 1e-6);
        let h = entropy(&logits).unwrap().to_vec2::<f32>().unwrap();
        assert!((h[0][0] as f64 - 5f64.ln()).abs() < 1e-6);
    }

    #[test]
    fn log_sigmoid_is_stable_and_exact() {
        let x = Tensor::new(&[0f32, 100.0, -100.0, 2.0], &Device::Cpu).unwrap();
        let y = log_sigmoid(&x).unwrap().to_vec1::<f32>().unwrap();
        assert!((y[0] + 2f32.ln()).abs() < 1e-6);
        assert!(y[1].abs() < 1e-6);
        assert!((y[2] + 100.0).abs() < 1e-4);
        assert!((y[3] - (1.0 / (1.0 + (-2f32).exp())).ln()).abs() < 1e-6);
    }
}
