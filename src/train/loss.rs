//! Losses and the per-token quantities the stages share: log-softmax, token log-probabilities,
//! masked means. Everything here is composed of differentiable candle ops (the entropy comes
//! with the log-probabilities from `kernels::logprobs`).

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

/// `[N]` TRL's generalised Jensen-Shannon divergence (GKD) between the student's and the
/// teacher's next-token distributions, from `[N, V]` logits: `beta = 0` is
/// the forward KL(teacher ‖ student), `beta = 1` the reverse KL(student ‖ teacher), and
/// between them `beta · KL(teacher ‖ m) + (1 - beta) · KL(student ‖ m)` with the mixture
/// `m = beta · teacher + (1 - beta) · student`, which near `beta = 0` is about `beta` times the
/// forward KL (hence TRL's special case there). Gradients flow to the student's logits only.
/// The logits are compared as they are: TRL's `GKDTrainer` leaves its sampling temperature
/// out of the divergence (as OpenRLHF's `KDLoss` has none), and a divergence between
/// tempered softmaxes is another objective, with gradients scaled by `1 / T`.
pub fn generalized_jsd(student: &Tensor, teacher: &Tensor, beta: f64) -> Result<Tensor> {
    let s = log_softmax(&student.to_dtype(DType::F32)?)?;
    let t = log_softmax(&teacher.to_dtype(DType::F32)?.detach())?;
    // KL(p ‖ q) of log-distributions.
    let kl =
        |p: &Tensor, q: &Tensor| -> Result<Tensor> { Ok((p.exp()? * (p - q)?)?.sum(D::Minus1)?) };
    if beta == 0.0 {
        return kl(&t, &s);
    }
    if beta == 1.0 {
        return kl(&s, &t);
    }
    // log m = logsumexp(s + log(1 - beta), t + log(beta)), shifted by the larger of the two
    // (detached: any shift gives the same value and gradient).
    let a = (&s + (1.0 - beta).ln())?;
    let b = (&t + beta.ln())?;
    let hi = a.maximum(&b)?.detach();
    let m = (((&a - &hi)?.exp()? + (&b - &hi)?.exp()?)?.log()? + &hi)?;
    Ok(((kl(&t, &m)? * beta)? + (kl(&s, &m)? * (1.0 - beta))?)?)
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
        let h = crate::kernels::logprobs::reference_entropy(&logits).unwrap();
        let h = h.to_vec2::<f32>().unwrap();
        assert!((h[0][0] as f64 - 5f64.ln()).abs() < 1e-6);
    }

    /// The divergence by its definition, in f64 on the host, for one row.
    fn jsd_by_definition(s: &[f64], t: &[f64], beta: f64) -> f64 {
        let softmax = |x: &[f64]| {
            let z: Vec<f64> = x.to_vec();
            let max = z.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = z.iter().map(|v| (v - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.into_iter().map(|v| v / sum).collect::<Vec<f64>>()
        };
        let (p_s, p_t) = (softmax(s), softmax(t));
        let kl =
            |p: &[f64], q: &[f64]| -> f64 { p.iter().zip(q).map(|(a, b)| a * (a / b).ln()).sum() };
        match beta {
            0.0 => kl(&p_t, &p_s),
            1.0 => kl(&p_s, &p_t),
            _ => {
                let m: Vec<f64> = p_s
                    .iter()
                    .zip(&p_t)
                    .map(|(a, b)| (1.0 - beta) * a + beta * b)
                    .collect();
                beta * kl(&p_t, &m) + (1.0 - beta) * kl(&p_s, &m)
            }
        }
    }

    #[test]
    fn the_generalized_jsd_is_its_definition_and_only_the_student_learns() {
        let mut rng = crate::train::rng::Rng::new(7);
        let (n, v) = (5, 37);
        let draw = |rng: &mut crate::train::rng::Rng| -> Vec<f32> {
            (0..n * v).map(|_| 4.0 * (rng.f64() as f32 - 0.5)).collect()
        };
        let (s, t) = (draw(&mut rng), draw(&mut rng));
        let st = candle_core::Var::from_vec(s.clone(), (n, v), &Device::Cpu).unwrap();
        let tt = candle_core::Var::from_vec(t.clone(), (n, v), &Device::Cpu).unwrap();
        for beta in [0.0, 0.1, 0.5, 0.9, 1.0] {
            let got = generalized_jsd(st.as_tensor(), tt.as_tensor(), beta)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (i, &g) in got.iter().enumerate() {
                let row = |x: &[f32]| -> Vec<f64> {
                    x[i * v..(i + 1) * v].iter().map(|&a| a as f64).collect()
                };
                let want = jsd_by_definition(&row(&s), &row(&t), beta);
                assert!(
                    (g as f64 - want).abs() < 1e-5 * (1.0 + want),
                    "beta {beta} row {i}: {g} vs {want}"
                );
                assert!(want > 0.0);
            }
        }
        // The gradient of the forward KL in the student's logits is softmax(s) - softmax(t),
        // and the teacher gets none.
        let loss = generalized_jsd(st.as_tensor(), tt.as_tensor(), 0.0)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(tt.as_tensor()).is_none());
        let g = grads.get(st.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        let p = |x: &candle_core::Var| {
            let lp = log_softmax(x.as_tensor()).unwrap();
            lp.exp().unwrap().to_vec2::<f32>().unwrap()
        };
        let (ps, pt) = (p(&st), p(&tt));
        for i in 0..n {
            for j in 0..v {
                assert!((g[i][j] - (ps[i][j] - pt[i][j])).abs() < 1e-5);
            }
        }
        // Equal distributions are no divergence at any beta.
        for beta in [0.0, 0.5, 1.0] {
            let d = generalized_jsd(st.as_tensor(), st.as_tensor(), beta).unwrap();
            let max = d.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(max < 1e-6, "beta {beta}: {max}");
        }
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
