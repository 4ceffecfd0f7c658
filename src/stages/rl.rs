//! The RL maths PPO and GRPO share, each beside its unit test: KL estimators, the clipped
//! policy and value losses, and the advantage estimators (GAE with whitening for PPO, group
//! normalisation for GRPO). The tensor kernels behind the advantages live in
//! `kernels::gae`; this module says which recurrence and convention a stage uses.

use anyhow::Result;
use candle_core::{DType, Tensor};

use crate::config::{AdvantageEstimator, ImportanceSamplingLevel, KlEstimator, ScaleRewards};
use crate::dist::Communicator;
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

/// The ratio's clip range `[1 - low, 1 + high]`; `high > low` is DAPO's clip-higher
/// (`epsilon_high` in TRL).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Clip {
    pub low: f64,
    pub high: f64,
    /// The cap on the unclipped ratio too (two-sided clipping, TRL's `delta`); none: none.
    pub delta: Option<f64>,
}

impl Clip {
    pub fn new(eps: f64, eps_high: Option<f64>) -> Self {
        Self {
            low: eps,
            high: eps_high.unwrap_or(eps),
            delta: None,
        }
    }

    /// This range with the unclipped ratio capped at `delta` as well.
    pub fn two_sided(self, delta: Option<f64>) -> Self {
        Self { delta, ..self }
    }
}

/// How per-token losses `[b, R]` become one number (TRL's `loss_type`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Aggregation {
    /// Mean over the minibatch's valid tokens (TRL's `bnpo`).
    Token,
    /// Mean over each response's tokens, then over responses (TRL's `grpo`).
    Sequence,
    /// Sum over the minibatch's tokens divided by this many tokens: the valid tokens of the
    /// whole optimizer step (all its accumulated minibatches) over `grad_accum`, so that after
    /// the loop divides by `grad_accum` every token of the step weighs the same (TRL's `dapo`).
    Dapo { tokens_per_micro: f64 },
    /// Sum over the minibatch's tokens divided by its responses times this many tokens, the
    /// most a response may have (TRL's `dr_grpo`).
    DrGrpo { max_tokens: f64 },
}

/// Aggregates per-token values `x` over the valid tokens `mask`.
pub fn aggregate(x: &Tensor, mask: &Tensor, agg: Aggregation) -> Result<Tensor> {
    Ok(match agg {
        Aggregation::Token => masked_mean(x, mask)?,
        Aggregation::Sequence => {
            let per_seq = (x * mask)?.sum(1)?;
            let len = mask.sum(1)?.clamp(1.0, f64::INFINITY)?;
            (per_seq / len)?.mean_all()?
        }
        Aggregation::Dapo { tokens_per_micro } => {
            ((x * mask)?.sum_all()? / tokens_per_micro.max(1.0))?
        }
        Aggregation::DrGrpo { max_tokens } => {
            let rows = x.dim(0)? as f64;
            ((x * mask)?.sum_all()? / (rows * max_tokens).max(1.0))?
        }
    })
}

/// How the clipped surrogate is formed: the clip range, the token aggregation, and whether
/// the ratio is a token's or its response's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Surrogate {
    pub clip: Clip,
    pub agg: Aggregation,
    pub level: ImportanceSamplingLevel,
}

/// The clipped surrogate and its diagnostics.
pub struct PolicyLoss {
    /// `max(-A r, -A clip(r, 1-low, 1+high))`, aggregated over valid tokens; `r` is the
    /// token's ratio, or at the sequence level its response's (the same at every token), and
    /// under two-sided clipping `min(r, delta)` in the first term.
    pub loss: Tensor,
    /// Fraction of valid tokens where the clipped branch is the active one (so the token
    /// gives no gradient), as TRL and OpenRLHF count it. A token whose ratio passes the
    /// two-sided cap `delta` gives none either and is not counted, as TRL counts it neither.
    pub clipfrac: f64,
    /// `0.5 * mean((logp - logp_old)^2)` (TRL's `approxkl`).
    pub approx_kl: f64,
    pub ratio: f64,
}

pub fn policy_loss(
    logp: &Tensor,
    logp_old: &Tensor,
    adv: &Tensor,
    mask: &Tensor,
    sur: Surrogate,
) -> Result<PolicyLoss> {
    let Surrogate { clip, agg, level } = sur;
    let diff = (logp - logp_old)?;
    let log_ratio = match level {
        ImportanceSamplingLevel::Token => diff.clone(),
        ImportanceSamplingLevel::Sequence => {
            // The mean over the response's valid tokens, so its gradient reaches each of
            // them scaled by 1 / |y|, and padding none.
            let len = mask.sum_keepdim(1)?.clamp(1.0, f64::INFINITY)?;
            ((&diff * mask)?.sum_keepdim(1)? / len)?.broadcast_as(diff.shape())?
        }
    };
    let ratio = log_ratio.exp()?;
    let unclipped = match clip.delta {
        Some(delta) => ratio.minimum(delta)?,
        None => ratio.clone(),
    };
    let l1 = (adv.neg()? * unclipped)?;
    let l2 = (adv.neg()? * ratio.clamp(1.0 - clip.low, 1.0 + clip.high)?)?;
    let loss = aggregate(&l1.maximum(&l2)?, mask, agg)?;
    let clipped = (l2.gt(&l1)?.to_dtype(DType::F32)? * mask)?;
    let n = scalar(&mask.sum_all()?)?.max(1.0);
    Ok(PolicyLoss {
        loss,
        clipfrac: scalar(&clipped.sum_all()?)? / n,
        approx_kl: 0.5 * scalar(&(diff.sqr()? * mask)?.sum_all()?)? / n,
        ratio: scalar(&(ratio.detach() * mask)?.sum_all()?)? / n,
    })
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
    comm: &dyn Communicator,
) -> Result<Gae> {
    let g = gae(rewards, values, mask, gamma, lam, kernel)?;
    let advantages = if whiten_adv {
        let n = scalar(&mask.to_dtype(DType::F32)?.sum_all()?)?;
        let (mean, var) = global_mean_var(comm, n, g.mean, g.var)?;
        whiten(&g.advantages, mask, mean, var)?
    } else {
        g.advantages.clone()
    };
    Ok(Gae {
        advantages,
        returns: g.returns,
    })
}

/// The mean and unbiased variance over every rank's values, from each rank's count, mean and
/// unbiased variance of its own: whitening and batch scaling under data parallelism use the
/// whole rollout's statistics, so the result does not depend on the number of ranks. Two
/// small all-reduces (the mean first, then squares about it) keep it free of cancellation.
pub fn global_mean_var(comm: &dyn Communicator, n: f64, mean: f64, var: f64) -> Result<(f64, f64)> {
    if comm.world() == 1 {
        return Ok((mean, var));
    }
    let w = comm.world() as f64;
    let mut first = [n as f32, (n * mean) as f32];
    comm.all_reduce_mean(&mut first)?;
    let total = f64::from(first[0]) * w;
    if total == 0.0 {
        return Ok((0.0, 0.0));
    }
    let gmean = f64::from(first[1]) * w / total;
    let mut ss = [((n - 1.0).max(0.0) * var + n * (mean - gmean).powi(2)) as f32];
    comm.all_reduce_mean(&mut ss)?;
    let gvar = match total > 1.0 {
        true => f64::from(ss[0]) * w / (total - 1.0),
        false => 0.0,
    };
    Ok((gmean, gvar))
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

/// Sequence advantages of critic-free estimators computed on the host, from scores laid out
/// group after group (`group` samples of each prompt):
/// - `GroupNorm` with `scale`: `r - mean_group`, divided by the group's std (`Group`, GRPO),
///   the whole batch's std (`Batch`) or nothing (`None`, Dr. GRPO); stds unbiased, plus `eps`;
/// - `Rloo`: `r_i - mean of the other G - 1 scores of its group`.
///
/// (`GroupNorm` with `Group` also has a kernel, [`group_advantages`], which the stages use.)
pub fn sequence_advantages(
    scores: &[f64],
    group: usize,
    est: AdvantageEstimator,
    scale: ScaleRewards,
    eps: f64,
    comm: &dyn Communicator,
) -> Result<Vec<f64>> {
    let all: Vec<f32> = scores.iter().map(|&x| x as f32).collect();
    let batch_var = match scale {
        ScaleRewards::Batch => {
            let (mean, var) = masked_mean_var(&all, &vec![1.0; all.len()]);
            global_mean_var(comm, all.len() as f64, mean, var)?.1
        }
        _ => 0.0,
    };
    let mut out = Vec::with_capacity(scores.len());
    for g in scores.chunks(group) {
        let n = g.len() as f64;
        let sum: f64 = g.iter().sum();
        let mean = sum / n;
        match est {
            AdvantageEstimator::Rloo => {
                out.extend(g.iter().map(|&r| r - (sum - r) / (n - 1.0).max(1.0)));
            }
            AdvantageEstimator::GroupNorm | AdvantageEstimator::ReinforcePlusPlus => {
                let gf: Vec<f32> = g.iter().map(|&x| x as f32).collect();
                let denom = match scale {
                    ScaleRewards::Group => masked_mean_var(&gf, &vec![1.0; g.len()]).1.sqrt() + eps,
                    ScaleRewards::Batch => batch_var.sqrt() + eps,
                    ScaleRewards::None => 1.0,
                };
                out.extend(g.iter().map(|&r| (r - mean) / denom));
            }
        }
    }
    Ok(out)
}

/// REINFORCE++ advantages `[B, R]`: per-token reward `-beta * KL_t` plus the score at the last
/// token, summed to go (gamma 1, no critic), then whitened over the whole batch's valid tokens.
pub fn reinforce_pp_advantages(
    kl: &Tensor,
    scores: &[f64],
    lengths: &[usize],
    mask: &Tensor,
    beta: f64,
    kernel: KernelChoice,
    comm: &dyn Communicator,
) -> Result<Tensor> {
    let rewards = token_rewards(kl, scores, lengths, beta)?;
    let zeros = rewards.zeros_like()?;
    Ok(gae_advantages(&rewards, &zeros, mask, (1.0, 1.0), true, kernel, comm)?.advantages)
}

/// Each response's score, less `penalty` where it did not end with EOS (TRL's
/// `missing_eos_penalty`).
pub fn eos_penalised(scores: &[f64], finished: &[bool], penalty: Option<f64>) -> Vec<f64> {
    scores
        .iter()
        .zip(finished)
        .map(|(&s, &done)| match (penalty, done) {
            (Some(p), false) => s - p,
            _ => s,
        })
        .collect()
}

/// `mask` with the rows of unfinished (truncated) responses zeroed.
pub fn without_truncated(mask: &Tensor, finished: &[bool]) -> Result<Tensor> {
    let keep: Vec<f32> = finished.iter().map(|&f| f32::from(u8::from(f))).collect();
    let keep = Tensor::from_vec(keep, (finished.len(), 1), mask.device())?;
    Ok(mask.broadcast_mul(&keep)?)
}

/// For DAPO's aggregation: each minibatch's normaliser, the valid tokens of the optimizer
/// step it belongs to over `grad_accum` (consecutive runs of `grad_accum` minibatches form a
/// step). `tokens[i]` is row `i`'s count of loss-carrying tokens.
pub fn dapo_normalisers(batches: &[Vec<usize>], tokens: &[f64], grad_accum: usize) -> Vec<f64> {
    let per_batch: Vec<f64> = batches
        .iter()
        .map(|b| b.iter().map(|&i| tokens[i]).sum())
        .collect();
    let accum = grad_accum.max(1);
    per_batch
        .chunks(accum)
        .flat_map(|step| {
            let n = step.iter().sum::<f64>() / accum as f64;
            std::iter::repeat_n(n, step.len())
        })
        .collect()
}

/// Each row's sum of `[B, R]` `x`.
pub fn row_sums(x: &Tensor) -> Result<Vec<f64>> {
    Ok(x.sum(1)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect())
}

/// `1 - Var(R - V) / Var(R)` over every rank's valid tokens: how much of the returns the
/// critic explains.
pub fn explained_variance(
    returns: &Tensor,
    values: &Tensor,
    mask: &Tensor,
    comm: &dyn Communicator,
) -> Result<f64> {
    let mask_v = mask.flatten_all()?.to_vec1::<f32>()?;
    let ret_v = returns.flatten_all()?.to_vec1::<f32>()?;
    let val_v = values.flatten_all()?.to_vec1::<f32>()?;
    let resid: Vec<f32> = ret_v.iter().zip(&val_v).map(|(a, b)| a - b).collect();
    let n = mask_v.iter().filter(|&&m| m != 0.0).count() as f64;
    let global = |x: &[f32]| -> Result<f64> {
        let (mean, var) = masked_mean_var(x, &mask_v);
        Ok(global_mean_var(comm, n, mean, var)?.1)
    };
    let (var_ret, var_res) = (global(&ret_v)?, global(&resid)?);
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
    use crate::dist::{Solo, ThreadGroup};

    /// Whitening statistics gathered over ranks holding unequal shares equal the whole
    /// batch's.
    #[test]
    fn global_statistics_do_not_depend_on_the_split() {
        let x: Vec<f32> = (0..11)
            .map(|i| ((i * 37 % 11) as f32).powf(1.5) - 4.0)
            .collect();
        let whole = masked_mean_var(&x, &[1.0; 11]);
        let parts = [&x[..4], &x[4..]];
        let group = ThreadGroup::new(2);
        let got: Vec<(f64, f64)> = std::thread::scope(|sc| {
            let hs: Vec<_> = group
                .iter()
                .zip(parts)
                .map(|(c, part)| {
                    sc.spawn(move || {
                        let (m, v) = masked_mean_var(part, &vec![1.0; part.len()]);
                        global_mean_var(c, part.len() as f64, m, v).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (m, v) in got {
            assert!((m - whole.0).abs() < 1e-5, "{m} vs {}", whole.0);
            assert!((v - whole.1).abs() < 1e-4 * whole.1, "{v} vs {}", whole.1);
        }
    }

    /// The critic's explained variance over two ranks, with padding in one of them, is the
    /// whole batch's, not the mean of each rank's.
    #[test]
    fn explained_variance_is_over_every_rank() {
        let ret: Vec<f32> = (0..12).map(|i| ((i * 5 % 7) as f32) - 2.0).collect();
        let val: Vec<f32> = (0..12).map(|i| (i % 3) as f32 * 0.5).collect();
        let mask: Vec<f32> = (0..12).map(|i| if i == 5 { 0.0 } else { 1.0 }).collect();
        let rows = |v: &[f32], r: std::ops::Range<usize>| {
            Tensor::from_slice(&v[r.clone()], (1, r.len()), &candle_core::Device::Cpu).unwrap()
        };
        let whole = explained_variance(
            &rows(&ret, 0..12),
            &rows(&val, 0..12),
            &rows(&mask, 0..12),
            &Solo,
        )
        .unwrap();
        let group = ThreadGroup::new(2);
        let got: Vec<f64> = std::thread::scope(|sc| {
            let hs: Vec<_> = group
                .iter()
                .zip([0..3, 3..12])
                .map(|(c, r)| {
                    let (ret, val, mask) = (&ret, &val, &mask);
                    sc.spawn(move || {
                        let (a, b, m) = (rows(ret, r.clone()), rows(val, r.clone()), rows(mask, r));
                        explained_variance(&a, &b, &m, c).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let alone = explained_variance(
            &rows(&ret, 0..3),
            &rows(&val, 0..3),
            &rows(&mask, 0..3),
            &Solo,
        )
        .unwrap();
        assert!((alone - whole).abs() > 1e-3, "a split that shows nothing");
        for ev in got {
            assert!((ev - whole).abs() < 1e-5, "{ev} vs {whole}");
        }
    }

    fn token(clip: Clip) -> Surrogate {
        Surrogate {
            clip,
            agg: Aggregation::Token,
            level: ImportanceSamplingLevel::Token,
        }
    }

    /// GSPO: each response's ratio is the geometric mean of its tokens' (padding left out),
    /// its loss `-A s` reaches every valid token's log-probability as `-A s / |y|` (divided
    /// again by the responses under the `grpo` aggregation), and a response whose ratio is
    /// clipped gives no gradient at all.
    #[test]
    fn a_sequence_level_ratio_is_the_responses_geometric_mean() {
        use candle_core::{Device, Var};
        let two = |v: [[f32; 3]; 2]| Tensor::new(&v, &Device::Cpu).unwrap();
        let old = two([[0.0; 3]; 2]);
        // Row 0: mean log-ratio 0.2; row 1: 0 over its two tokens (the 9 is padding).
        let new = Var::from_tensor(&two([[0.1, 0.2, 0.3], [0.05, -0.05, 9.0]])).unwrap();
        let adv = two([[1.0; 3], [-1.0; 3]]);
        let mask = two([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]);
        let sur = |eps: f64| Surrogate {
            clip: Clip::new(eps, None),
            agg: Aggregation::Sequence,
            level: ImportanceSamplingLevel::Sequence,
        };
        let s0 = 0.2f64.exp();
        let pl = policy_loss(new.as_tensor(), &old, &adv, &mask, sur(0.3)).unwrap();
        assert!(
            (s(&pl.loss) - (-s0 + 1.0) / 2.0).abs() < 1e-6,
            "{}",
            s(&pl.loss)
        );
        assert_eq!(pl.clipfrac, 0.0);
        let g = pl.loss.backward().unwrap();
        let g = g.get(&new).unwrap().to_vec2::<f32>().unwrap();
        let want = [
            [-s0 / 3.0 / 2.0; 3],
            [1.0 / 2.0 / 2.0, 1.0 / 2.0 / 2.0, 0.0],
        ];
        for (gr, wr) in g.iter().zip(&want) {
            for (a, b) in gr.iter().zip(wr) {
                assert!((*a as f64 - b).abs() < 1e-6, "{g:?} vs {want:?}");
            }
        }
        // At eps 0.1 row 0's ratio 1.22 is past 1.1 with A > 0: all its tokens are clipped.
        let pl = policy_loss(new.as_tensor(), &old, &adv, &mask, sur(0.1)).unwrap();
        assert!((pl.clipfrac - 3.0 / 5.0).abs() < 1e-9);
        let g = pl.loss.backward().unwrap();
        let g = g.get(&new).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(g[0], [0.0; 3]);
        assert!((g[1][0] - 0.25).abs() < 1e-6, "{g:?}");
    }

    #[test]
    fn ppo_losses_match_hand_computation() {
        // Token 0: ratio e^0.5 = 1.6487 > 1.2 with A = 1 -> clipped objective 1.2 (loss -1.2).
        // Token 1: ratio 1, A = -2 -> loss 2. Token 2 is padding.
        let old = t(&[0.0, 0.0, 0.0]);
        let new = t(&[0.5, 0.0, 9.0]);
        let adv = t(&[1.0, -2.0, 5.0]);
        let mask = t(&[1.0, 1.0, 0.0]);
        let clip = Clip::new(0.2, None);
        let PolicyLoss {
            loss,
            clipfrac,
            approx_kl,
            ..
        } = policy_loss(&new, &old, &adv, &mask, token(clip)).unwrap();
        assert!((s(&loss) - (-1.2 + 2.0) / 2.0).abs() < 1e-6, "{}", s(&loss));
        assert!((clipfrac - 0.5).abs() < 1e-9);
        assert!((approx_kl - 0.5 * 0.25 / 2.0).abs() < 1e-7);
        // A negative advantage with a ratio below 1 - eps: the clipped term (0.8) is the larger
        // loss, so it is the active one and the token counts as clipped.
        let pl = policy_loss(
            &t(&[-1.0]),
            &t(&[0.0]),
            &t(&[-1.0]),
            &t(&[1.0]),
            token(clip),
        )
        .unwrap();
        assert!((s(&pl.loss) - 0.8).abs() < 1e-6);
        assert_eq!(pl.clipfrac, 1.0);
        // Value: v = 2, v_old = 0, R = 1, clip 0.5 -> vclip 0.5; max((1)^2, (0.5)^2) = 1 -> 0.5.
        let vl = value_loss(&t(&[2.0]), &t(&[0.0]), &t(&[1.0]), &t(&[1.0]), 0.5).unwrap();
        assert!((s(&vl) - 0.5).abs() < 1e-6);
        // v = 0.2, v_old = 0, R = 3: vclip = 0.2; 0.5 * 2.8^2.
        let vl = value_loss(&t(&[0.2]), &t(&[0.0]), &t(&[3.0]), &t(&[1.0]), 0.5).unwrap();
        assert!((s(&vl) - 0.5 * 2.8f64.powi(2)).abs() < 1e-5);
    }

    /// A ratio outside the range counts as clipped only where the clipped branch is active:
    /// above 1 + eps with a positive advantage, or below 1 - eps with a negative one. The old
    /// count, |r - 1| > eps whatever the sign, said 1.0 here.
    #[test]
    fn clip_fraction_counts_only_active_clipping() {
        let old = t(&[0.0, 0.0, 0.0, 0.0]);
        // ratios e^0.5 = 1.65, e^0.5, e^-0.5 = 0.61, e^-0.5
        let new = t(&[0.5, 0.5, -0.5, -0.5]);
        let adv = t(&[1.0, -1.0, 1.0, -1.0]);
        let mask = t(&[1.0, 1.0, 1.0, 1.0]);
        let pl = policy_loss(&new, &old, &adv, &mask, token(Clip::new(0.2, None))).unwrap();
        assert_eq!(pl.clipfrac, 0.5);
        // Clip-higher: with epsilon_high 0.7 the upper bound is 1.7, so the first token is no
        // longer clipped.
        let pl = policy_loss(&new, &old, &adv, &mask, token(Clip::new(0.2, Some(0.7)))).unwrap();
        assert_eq!(pl.clipfrac, 0.25);
    }

    /// Two-sided clipping caps the ratio of a token with a negative advantage, whose loss
    /// would otherwise grow with it, and then passes it no gradient; other tokens keep theirs.
    #[test]
    fn two_sided_clipping_caps_a_negative_advantages_ratio() {
        let old = t(&[0.0, 0.0]);
        let adv = t(&[-1.0, -1.0]);
        let mask = t(&[1.0, 1.0]);
        let loss = |delta| {
            let new = candle_core::Var::from_tensor(&t(&[2.0, 0.1])).unwrap();
            let clip = Clip::new(0.2, None).two_sided(delta);
            let pl = policy_loss(new.as_tensor(), &old, &adv, &mask, token(clip)).unwrap();
            let grads = pl.loss.backward().unwrap();
            let g = grads.get(&new).unwrap().flatten_all().unwrap();
            (s(&pl.loss), g.to_vec1::<f32>().unwrap())
        };
        let (free, g_free) = loss(None);
        let (capped, g_capped) = loss(Some(3.0));
        // Token means: (e^2 + e^0.1) / 2 against (3 + e^0.1) / 2.
        assert!(
            (free - (2f64.exp() + 0.1f64.exp()) / 2.0).abs() < 1e-4,
            "{free}"
        );
        assert!(
            (capped - (3.0 + 0.1f64.exp()) / 2.0).abs() < 1e-4,
            "{capped}"
        );
        assert!(
            g_free[0] > 1.0 && g_capped[0] == 0.0,
            "{g_free:?} {g_capped:?}"
        );
        assert!((g_free[1] - g_capped[1]).abs() < 1e-6);
    }

    #[test]
    fn aggregations_weigh_tokens_as_trl_names_them() {
        // Two responses: 3 tokens of loss 1 and 1 token of loss 5.
        let x = Tensor::new(
            &[[1.0f32, 1.0, 1.0], [5.0, 0.0, 0.0]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let m = Tensor::new(
            &[[1.0f32, 1.0, 1.0], [1.0, 0.0, 0.0]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let get = |a| s(&aggregate(&x, &m, a).unwrap());
        assert!((get(Aggregation::Token) - 8.0 / 4.0).abs() < 1e-6);
        assert!((get(Aggregation::Sequence) - (1.0 + 5.0) / 2.0).abs() < 1e-6);
        let dapo = Aggregation::Dapo {
            tokens_per_micro: 8.0,
        };
        assert!((get(dapo) - 8.0 / 8.0).abs() < 1e-6);
        // Dr. GRPO: two responses of at most 5 tokens.
        let dr = Aggregation::DrGrpo { max_tokens: 5.0 };
        assert!((get(dr) - 8.0 / (2.0 * 5.0)).abs() < 1e-6);
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
    fn group_estimators_match_hand_computation() {
        use AdvantageEstimator::*;
        // Two groups of three: [1, 0, 0] and [2, 2, 5].
        let r = [1.0, 0.0, 0.0, 2.0, 2.0, 5.0];
        let rloo = sequence_advantages(&r, 3, Rloo, ScaleRewards::Group, 0.0, &Solo).unwrap();
        // 1 - (0+0)/2 = 1; 0 - (1+0)/2 = -0.5; 2 - (2+5)/2 = -1.5; 5 - (2+2)/2 = 3
        let want = [1.0, -0.5, -0.5, -1.5, -1.5, 3.0];
        for (a, w) in rloo.iter().zip(want) {
            assert!((a - w).abs() < 1e-12, "{rloo:?}");
        }
        // Dr. GRPO: r - mean_group.
        let none = sequence_advantages(&r, 3, GroupNorm, ScaleRewards::None, 1e-4, &Solo).unwrap();
        assert!((none[0] - 2.0 / 3.0).abs() < 1e-12 && (none[5] - 2.0).abs() < 1e-12);
        // Group scale: group 1 has unbiased std sqrt(1/3).
        let grp = sequence_advantages(&r, 3, GroupNorm, ScaleRewards::Group, 0.0, &Solo).unwrap();
        assert!((grp[0] - (2.0 / 3.0) / (1.0f64 / 3.0).sqrt()).abs() < 1e-6);
        // Batch scale: every group divided by the same std.
        let bat = sequence_advantages(&r, 3, GroupNorm, ScaleRewards::Batch, 0.0, &Solo).unwrap();
        assert!((bat[0] / none[0] - bat[5] / none[5]).abs() < 1e-9);
    }

    #[test]
    fn reinforce_pp_sums_rewards_to_go_and_whitens() {
        // One row, 3 tokens, KL 0: rewards [0, 0, 1] -> to-go [1, 1, 1]; a second row scored 0
        // -> [0, 0, 0]. Whitened over the 6 tokens: +c and -c.
        let kl = Tensor::zeros((2, 3), DType::F32, &candle_core::Device::Cpu).unwrap();
        let m = Tensor::ones((2, 3), DType::F32, &candle_core::Device::Cpu).unwrap();
        let a = reinforce_pp_advantages(
            &kl,
            &[1.0, 0.0],
            &[3, 3],
            &m,
            0.1,
            KernelChoice::Reference,
            &Solo,
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
        assert!(
            a[0].iter().all(|&x| (x - a[0][0]).abs() < 1e-6 && x > 0.0),
            "{a:?}"
        );
        assert!(a[1].iter().all(|&x| (x + a[0][0]).abs() < 1e-6), "{a:?}");
    }

    #[test]
    fn truncated_rows_are_masked_and_dapo_counts_the_step() {
        let m = Tensor::ones((2, 2), DType::F32, &candle_core::Device::Cpu).unwrap();
        let k = without_truncated(&m, &[true, false]).unwrap();
        assert_eq!(k.to_vec2::<f32>().unwrap(), [[1.0, 1.0], [0.0, 0.0]]);
        // Rows with 1, 2, 3, 4 tokens; minibatches [0], [1], [2, 3]; two per step.
        let n = dapo_normalisers(&[vec![0], vec![1], vec![2, 3]], &[1.0, 2.0, 3.0, 4.0], 2);
        assert_eq!(n, [1.5, 1.5, 3.5]);
    }

    #[test]
    fn explained_variance_is_one_for_a_perfect_critic() {
        let ret = t(&[1.0, 2.0, 4.0]);
        let m = t(&[1.0, 1.0, 1.0]);
        assert!((explained_variance(&ret, &ret, &m, &Solo).unwrap() - 1.0).abs() < 1e-9);
        let zero = t(&[0.0, 0.0, 0.0]);
        assert!(explained_variance(&ret, &zero, &m, &Solo).unwrap().abs() < 1e-9);
    }
}
