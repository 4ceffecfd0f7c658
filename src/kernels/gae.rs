//! Generalised advantage estimation over a batch of variable-length responses, and GRPO's
//! group normalisation.
//!
//! Contract: `delta_t = r_t + gamma * V_{t+1} - V_t`,
//! `A_t = delta_t + gamma * lambda * A_{t+1}`, returns `R_t = A_t + V_t`. A position whose mask
//! is 0 is padding: its advantage and return are 0 and it ends the episode, so the last valid
//! token sees `V_{t+1} = 0` and `A_{t+1} = 0` (OpenRLHF's convention, with the score on the
//! last response token; TRL scores one position past EOS). The whitening statistics are the mean and the
//! unbiased variance of the advantages over valid tokens.

use candle_core::{DType, Result, Tensor};

use super::registry::{warn_fallback, KernelChoice};

pub struct GaeOutput {
    pub advantages: Tensor,
    pub returns: Tensor,
    pub mean: f64,
    pub var: f64,
}

/// rewards, values, mask: `[B, T]` f32.
pub fn gae(
    rewards: &Tensor,
    values: &Tensor,
    mask: &Tensor,
    gamma: f64,
    lambda: f64,
    choice: KernelChoice,
) -> Result<GaeOutput> {
    if choice == KernelChoice::Custom {
        #[cfg(feature = "cuda")]
        if rewards.device().is_cuda() {
            if let Some(out) = super::cuda::gae::gae(rewards, values, mask, gamma, lambda)? {
                return Ok(out);
            }
            warn_fallback("gae", &format!("no CUDA kernel for {:?}", rewards.dtype()));
            return gae_reference(rewards, values, mask, gamma, lambda);
        }
        if !rewards.device().is_cpu() || cfg!(feature = "cuda") {
            warn_fallback("gae", "the scan kernel runs on CUDA only");
        }
    }
    gae_reference(rewards, values, mask, gamma, lambda)
}

pub fn gae_reference(
    rewards: &Tensor,
    values: &Tensor,
    mask: &Tensor,
    gamma: f64,
    lambda: f64,
) -> Result<GaeOutput> {
    let (b, t) = rewards.dims2()?;
    let dev = rewards.device();
    let r = rewards.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let v = values.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let m = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let (gamma, lambda) = (gamma as f32, lambda as f32);
    let mut adv = vec![0f32; b * t];
    let mut ret = vec![0f32; b * t];
    for i in 0..b {
        let (mut next_v, mut next_a) = (0f32, 0f32);
        for j in (0..t).rev() {
            if m[i][j] == 0.0 {
                next_v = 0.0;
                next_a = 0.0;
                continue;
            }
            let delta = r[i][j] + gamma * next_v - v[i][j];
            let a = delta + gamma * lambda * next_a;
            adv[i * t + j] = a;
            ret[i * t + j] = a + v[i][j];
            next_v = v[i][j];
            next_a = a;
        }
    }
    let flat_mask: Vec<f32> = m.concat();
    let (mean, var) = masked_mean_var(&adv, &flat_mask);
    Ok(GaeOutput {
        advantages: Tensor::from_vec(adv, (b, t), dev)?,
        returns: Tensor::from_vec(ret, (b, t), dev)?,
        mean,
        var,
    })
}

/// Mean and unbiased variance over the positions where `mask != 0` (in f64 for stability).
pub fn masked_mean_var(x: &[f32], mask: &[f32]) -> (f64, f64) {
    let n: f64 = mask.iter().filter(|&&m| m != 0.0).count() as f64;
    if n == 0.0 {
        return (0.0, 0.0);
    }
    let sum: f64 = x
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m != 0.0)
        .map(|(&a, _)| a as f64)
        .sum();
    let mean = sum / n;
    let ss: f64 = x
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m != 0.0)
        .map(|(&a, _)| (a as f64 - mean).powi(2))
        .sum();
    let var = if n > 1.0 { ss / (n - 1.0) } else { 0.0 };
    (mean, var)
}

/// `(A - mean) / sqrt(var + 1e-8)` on valid tokens, 0 on padding.
pub fn whiten(adv: &Tensor, mask: &Tensor, mean: f64, var: f64) -> Result<Tensor> {
    ((adv - mean)? / (var + 1e-8).sqrt())?.mul(&mask.to_dtype(adv.dtype())?)
}

/// GRPO: rewards `[n_groups * group]` laid out group after group;
/// returns `(r - mean_group) / (std_group + eps)` with the unbiased std.
pub fn group_normalize(
    rewards: &Tensor,
    group: usize,
    eps: f64,
    choice: KernelChoice,
) -> Result<Tensor> {
    if choice == KernelChoice::Custom {
        #[cfg(feature = "cuda")]
        if rewards.device().is_cuda() {
            if let Some(out) = super::cuda::gae::group_normalize(rewards, group, eps)? {
                return Ok(out);
            }
            warn_fallback("gae", "no CUDA group-normalisation kernel for this input");
        }
    }
    group_normalize_reference(rewards, group, eps)
}

pub fn group_normalize_reference(rewards: &Tensor, group: usize, eps: f64) -> Result<Tensor> {
    let r = rewards.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    if group == 0 || r.len() % group != 0 {
        candle_core::bail!(
            "group_normalize: {} rewards do not split into groups of {group}",
            r.len()
        );
    }
    let mut out = Vec::with_capacity(r.len());
    for g in r.chunks(group) {
        let ones = vec![1f32; g.len()];
        let (mean, var) = masked_mean_var(g, &ones);
        let std = var.sqrt();
        out.extend(g.iter().map(|&x| ((x as f64 - mean) / (std + eps)) as f32));
    }
    Tensor::from_vec(out, r.len(), rewards.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t2(v: &[[f32; 4]; 2]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn gae_matches_hand_computation_with_padding() {
        // Row 0: three valid tokens then padding; row 1: one valid token.
        let r = t2(&[[0.0, 0.0, 1.0, 9.0], [2.0, 9.0, 9.0, 9.0]]);
        let v = t2(&[[0.5, 0.25, 0.5, 9.0], [1.0, 9.0, 9.0, 9.0]]);
        let m = t2(&[[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]);
        let out = gae_reference(&r, &v, &m, 0.5, 0.5).unwrap();
        let a = out.advantages.to_vec2::<f32>().unwrap();
        // t=2: delta = 1 + 0 - 0.5 = 0.5 -> A = 0.5
        // t=1: delta = 0 + 0.5*0.5 - 0.25 = 0 -> A = 0 + 0.25*0.5 = 0.125
        // t=0: delta = 0 + 0.5*0.25 - 0.5 = -0.375 -> A = -0.375 + 0.25*0.125 = -0.34375
        let expect = [-0.34375f32, 0.125, 0.5, 0.0];
        for (x, e) in a[0].iter().zip(expect) {
            assert!((x - e).abs() < 1e-6, "{a:?}");
        }
        assert_eq!(a[1], vec![1.0, 0.0, 0.0, 0.0]);
        let ret = out.returns.to_vec2::<f32>().unwrap();
        assert!((ret[0][0] - 0.15625).abs() < 1e-6 && ret[0][3] == 0.0);
        // mean and unbiased var over the four valid advantages
        let vals = [-0.34375f64, 0.125, 0.5, 1.0];
        let mean = vals.iter().sum::<f64>() / 4.0;
        let var = vals.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 3.0;
        assert!((out.mean - mean).abs() < 1e-6 && (out.var - var).abs() < 1e-6);
        let w = whiten(&out.advantages, &m, out.mean, out.var).unwrap();
        let w = w.to_vec2::<f32>().unwrap();
        assert_eq!(w[0][3], 0.0);
        assert!((w[1][0] as f64 - (1.0 - mean) / (var + 1e-8).sqrt()).abs() < 1e-5);
    }

    #[test]
    fn group_normalize_matches_hand_computation() {
        let r = Tensor::new(&[1.0f32, 3.0, 5.0, 5.0], &Device::Cpu).unwrap();
        let y = group_normalize_reference(&r, 2, 0.0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // group 0: mean 2, unbiased std sqrt(2); group 1: std 0 -> 0 / eps guarded by 0 numerator.
        assert!((y[0] + 1.0 / 2f32.sqrt()).abs() < 1e-6);
        assert!((y[1] - 1.0 / 2f32.sqrt()).abs() < 1e-6);
        let y = group_normalize_reference(&r, 2, 1e-4)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(&y[2..], &[0.0, 0.0]);
        assert!(group_normalize_reference(&r, 3, 1e-4).is_err());
    }
}
