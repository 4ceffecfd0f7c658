//! The RL maths PPO and GRPO share, each beside its unit test: KL estimators, the clipped
//! policy and value losses, and the advantage estimators (GAE with whitening for PPO, group
//! normalisation for GRPO). The tensor kernels behind the advantages live in
//! `kernels::gae`; this module says which recurrence and convention a stage uses.

use anyhow::Result;
use candle_core::{DType, Tensor};

use crate::config::KlEstimator;
use crate::kernels::gae::{gae, group_normalize, masked_mean_var, whiten};
use crate::kernels::KernelChoice;
use crate::train::loss::{masked_mean, scalar};

/// Per-token KL estimate between policy and reference log-probabilities.
pub fn kl_estimate(logp: &Tensor, logp_ref: &Tensor, kind: KlEstimator) -> Result<Tensor> {
    let d = (logp - logp_ref)?;
    Ok(match kind {
        KlEstimator::K1 => d,
        KlEstimator::K3 => {
            let r = d.neg()?;
            ((r.exp()? - &r)? - 1.0)?
        }
    })
}

/// Clipped surrogate: `mean(max(-A r, -A clip(r, 1-eps, 1+eps)))` over valid tokens; also the
/// clip fraction and approximate KL `0.5 * mean((logp - logp_old)^2)` (TRL's `approxkl`).
pub fn policy_loss(
    logp: &Tensor,
    logp_old: &Tensor,
    adv: &Tensor,
    mask: &Tensor,
    eps: f64,
) -> Result<(Tensor, f64, f64, f64)> {
    let diff = (logp - logp_old)?;
    let ratio = diff.exp()?;
    let l1 = (adv.neg()? * &ratio)?;
    let l2 = (adv.neg()? * ratio.clamp(1.0 - eps, 1.0 + eps)?)?;
    let loss = masked_mean(&l1.maximum(&l2)?, mask)?;
    let clipped = ((&ratio - 1.0)?.abs()?.gt(eps)?.to_dtype(DType::F32)? * mask)?;
    let n = scalar(&mask.sum_all()?)?.max(1.0);
    let clipfrac = scalar(&clipped.sum_all()?)? / n;
    let approx_kl = 0.5 * scalar(&(diff.sqr()? * mask)?.sum_all()?)? / n;
    let ratio_mean = scalar(&(ratio.detach() * mask)?.sum_all()?)? / n;
    Ok((loss, clipfrac, approx_kl, ratio_mean))
}

/// Clipped value loss: `0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old) - R)^2))`.
pub fn value_loss(
    v: &Tensor,
    v_old: &Tensor,
    ret: &Tensor,
    mask: &Tensor,
    clip: f64,
) -> Result<Tensor> {
    let vclip = (v_old + (v - v_old)?.clamp(-clip, clip)?)?;
    let a = (v - ret)?.sqr()?;
    let b = (vclip - ret)?.sqr()?;
    Ok((masked_mean(&a.maximum(&b)?, mask)? * 0.5)?)
}

/// PPO's per-token rewards `[B, R]`: `-beta * KL_t` on every response token, plus each
/// sequence's score at its last response token. This is OpenRLHF's convention (with V = 0
/// after the last token); TRL puts the score one position past EOS instead.
pub fn token_rewards(kl: &Tensor, scores: &[f64], lengths: &[usize], beta: f64) -> Result<Tensor> {
    let (b, r) = kl.dims2()?;
    let mut grid = vec![0f32; b * r];
    for i in 0..b {
        let last = lengths[i].max(1) - 1;
        grid[i * r + last] = scores[i] as f32;
    }
    let grid = Tensor::from_vec(grid, (b, r), kl.device())?;
    Ok(((kl * -beta)? + grid)?)
}

/// GAE advantages and returns: `delta_t = r_t + gamma V_{t+1} - V_t` (V = 0 after the last
/// valid token), `A_t = delta_t + gamma lambda A_{t+1}`, `R = A + V`; the advantages are then
/// whitened over valid tokens when `whiten_adv` is set.
pub struct Gae {
    pub advantages: Tensor,
    pub returns: Tensor,
}

pub fn gae_advantages(
    rewards: &Tensor,
    values: &Tensor,
    mask: &Tensor,
    (gamma, lam): (f64, f64),
    whiten_adv: bool,
    kernel: KernelChoice,
) -> Result<Gae> {
    let g = gae(rewards, values, mask, gamma, lam, kernel)?;
    let advantages = if whiten_adv {
        whiten(&g.advantages, mask, g.mean, g.var)?
    } else {
        g.advantages.clone()
    };
    Ok(Gae {
        advantages,
        returns: g.returns,
    })
}

/// GRPO's advantage `[B, R]`: each score normalised within its group of `group` samples of one
/// prompt, `(r - mean) / (std + eps)`, the same for every token of the response.
pub fn group_advantages(
    scores: &[f64],
    group: usize,
    eps: f64,
    resp_len: usize,
    kernel: KernelChoice,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let b = scores.len();
    let s = Tensor::from_vec(
        scores.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        b,
        device,
    )?;
    let adv = group_normalize(&s, group, eps, kernel)?;
    Ok(adv
        .unsqueeze(1)?
        .broadcast_as((b, resp_len))?
        .contiguous()?)
}

/// `1 - Var(R - V) / Var(R)` over valid tokens: how much of the returns the critic explains.
pub fn explained_variance(returns: &Tensor, values: &Tensor, mask: &Tensor) -> Result<f64> {
    let mask_v = mask.flatten_all()?.to_vec1::<f32>()?;
    let ret_v = returns.flatten_all()?.to_vec1::<f32>()?;
    let val_v = values.flatten_all()?.to_vec1::<f32>()?;
    let resid: Vec<f32> = ret_v.iter().zip(&val_v).map(|(a, b)| a - b).collect();
    let (_, var_ret) = masked_mean_var(&ret_v, &mask_v);
    let (_, var_res) = masked_mean_var(&resid, &mask_v);
    Ok(if var_ret > 0.0 {
        1.0 - var_res / var_ret
    } else {
        0.0
    })
}

/// Small tensors for the maths tests of the RL and DPO losses.
#[cfg(test)]
pub(crate) mod test_tensors {
    use candle_core::{Device, Tensor};

    pub fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
    }

    pub fn s(x: &Tensor) -> f64 {
        x.to_scalar::<f32>().unwrap() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::test_tensors::{s, t};
    use super::*;

    #[test]
    fn ppo_losses_match_hand_computation() {
        // Token 0: ratio e^0.5 = 1.6487 > 1.2 with A = 1 -> clipped objective 1.2 (loss -1.2).
        // Token 1: ratio 1, A = -2 -> loss 2. Token 2 is padding.
        let old = t(&[0.0, 0.0, 0.0]);
        let new = t(&[0.5, 0.0, 9.0]);
        let adv = t(&[1.0, -2.0, 5.0]);
        let mask = t(&[1.0, 1.0, 0.0]);
        let (loss, clipfrac, approx_kl, _) = policy_loss(&new, &old, &adv, &mask, 0.2).unwrap();
        assert!((s(&loss) - (-1.2 + 2.0) / 2.0).abs() < 1e-6, "{}", s(&loss));
        assert!((clipfrac - 0.5).abs() < 1e-9);
        assert!((approx_kl - 0.5 * 0.25 / 2.0).abs() < 1e-7);
        // A negative advantage with a ratio below 1 - eps takes the unclipped, larger loss.
        let (loss, _, _, _) =
            policy_loss(&t(&[-1.0]), &t(&[0.0]), &t(&[-1.0]), &t(&[1.0]), 0.2).unwrap();
        assert!((s(&loss) - (-1.0f64).exp()).abs() > 0.0 && (s(&loss) - 0.8).abs() < 1e-6);
        // Value: v = 2, v_old = 0, R = 1, clip 0.5 -> vclip 0.5; max((1)^2, (0.5)^2) = 1 -> 0.5.
        let vl = value_loss(&t(&[2.0]), &t(&[0.0]), &t(&[1.0]), &t(&[1.0]), 0.5).unwrap();
        assert!((s(&vl) - 0.5).abs() < 1e-6);
        // v = 0.2, v_old = 0, R = 3: vclip = 0.2; 0.5 * 2.8^2.
        let vl = value_loss(&t(&[0.2]), &t(&[0.0]), &t(&[3.0]), &t(&[1.0]), 0.5).unwrap();
        assert!((s(&vl) - 0.5 * 2.8f64.powi(2)).abs() < 1e-5);
    }

    #[test]
    fn kl_estimators_match_their_formulas() {
        let lp = t(&[-1.0, -2.0]);
        let lr = t(&[-1.5, -1.0]);
        let k1 = kl_estimate(&lp, &lr, KlEstimator::K1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(k1, vec![0.5, -1.0]);
        let k3 = kl_estimate(&lp, &lr, KlEstimator::K3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (k, d) in k3.iter().zip([0.5f64, -1.0]) {
            // k3 = e^{-d} + d - 1 with d = logp - logp_ref
            assert!((*k as f64 - ((-d).exp() + d - 1.0)).abs() < 1e-6);
            assert!(*k >= 0.0);
        }
    }

    #[test]
    fn the_score_lands_on_the_last_response_token() {
        let kl = t(&[0.5, 1.0, 2.0])
            .broadcast_as((2, 3))
            .unwrap()
            .contiguous()
            .unwrap();
        let r = token_rewards(&kl, &[10.0, -1.0], &[2, 0], 0.1).unwrap();
        let r = r.to_vec2::<f32>().unwrap();
        // Row 0 ends at token 1; an empty row 1 takes its score at token 0.
        let want = [[-0.05, 9.9, -0.2], [-1.05, -0.1, -0.2]];
        for (row, w) in r.iter().zip(want) {
            for (x, y) in row.iter().zip(w) {
                assert!((x - y).abs() < 1e-6, "{r:?}");
            }
        }
    }

    #[test]
    fn explained_variance_is_one_for_a_perfect_critic() {
        let ret = t(&[1.0, 2.0, 4.0]);
        let m = t(&[1.0, 1.0, 1.0]);
        assert!((explained_variance(&ret, &ret, &m).unwrap() - 1.0).abs() < 1e-9);
        let zero = t(&[0.0, 0.0, 0.0]);
        assert!(explained_variance(&ret, &zero, &m).unwrap().abs() < 1e-9);
    }
}
