//! The RL maths PPO and GRPO share, each beside its unit test: KL estimators, the clipped
//! policy and value losses, and the advantage estimators (GAE with whitening for PPO, group
//! normalisation for GRPO). The tensor kernels behind the advantages live in
//! `kernels::gae`; this module says which recurrence and convention a stage uses.

use anyhow::Result;
use candle_core::{DType, Tensor};

use crate::config::{AdvantageEstimator, ImportanceSamplingLevel, KlEstimator, ScaleRewards};
use crate::dist::{Communicator, Solo};
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
    /// Sum over each response's tokens, then mean over responses (TRL's `luspo`, which at
    /// the sequence level weighs each response's loss by its length).
    ResponseSum,
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
        Aggregation::ResponseSum => ((x * mask)?.sum_all()? / x.dim(0)?.max(1) as f64)?,
    })
}

/// The per-token objective of a surrogate, before aggregation (TRL's loss types).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Form {
    /// PPO's clipped ratio, `max(-A r, -A clip(r))`.
    Clipped,
    /// CISPO: `-min(r, max) A log pi`, the capped ratio held constant.
    Cispo { max: f64 },
    /// SAPO: `-sigmoid(tau (r - 1)) 4 / tau A`, `tau` by the advantage's sign (positive:
    /// `tau_pos`).
    Sapo { tau_pos: f64, tau_neg: f64 },
    /// VESPO: `-phi A log pi`, `phi` the gamma weight of the response's ratio, constant.
    Vespo(Vespo),
}

/// VESPO's gamma weight `phi(w) = e^lambda w^k e^(-lambda w)` of a response's ratio `w`
/// (1 at w = 1), with `k` and `lambda` by the advantage's sign (not negative: `_pos`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Vespo {
    pub k_pos: f64,
    pub lambda_pos: f64,
    pub k_neg: f64,
    pub lambda_neg: f64,
}

impl Vespo {
    /// `phi [b, R]` of each row's whole ratio, the product of its valid tokens' `exp(diff)`
    /// (each token's log-ratio clamped to +-20 and the sum to [ln 1e-8, 20], as TRL and the
    /// paper's code bound them), with no gradient.
    pub fn weights(&self, diff: &Tensor, adv: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let diff = diff.detach();
        let seq = (diff.clamp(-20.0, 20.0)? * mask)?.sum_keepdim(1)?;
        let log_w = seq.clamp(1e-8f64.ln(), 20.0)?.broadcast_as(diff.shape())?;
        let pos = adv.ge(0.0)?.to_dtype(DType::F32)?;
        let by_sign = |p: f64, n: f64| -> Result<Tensor> { Ok(((&pos * (p - n))? + n)?) };
        let k = by_sign(self.k_pos, self.k_neg)?;
        let lambda = by_sign(self.lambda_pos, self.lambda_neg)?;
        let log_phi = ((&lambda + (k * &log_w)?)? - (&lambda * log_w.exp()?)?)?;
        Ok(log_phi.exp()?)
    }
}

/// The mean over responses with a valid token of each one's mean of `x [b, R]` over its valid
/// tokens (TRL's per-sequence metrics).
fn response_mean(x: &Tensor, mask: &Tensor) -> Result<f64> {
    let len = mask.sum(1)?;
    let per = ((x * mask)?.sum(1)? / len.clamp(1.0, f64::INFINITY)?)?;
    let rows = scalar(&len.gt(0.0)?.to_dtype(DType::F32)?.sum_all()?)?;
    Ok(scalar(&per.sum_all()?)? / rows.max(1.0))
}

/// `sigmoid(x)` elementwise.
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

/// DeepSeek-V3.2's off-policy sequence mask `[b, R]`: 0 on a response whose advantage is
/// negative and whose mean `log pi_old - log pi` over its valid tokens exceeds `threshold`,
/// 1 elsewhere (TRL's `off_policy_mask_threshold`).
pub fn off_policy_keep(
    diff: &Tensor,
    adv: &Tensor,
    mask: &Tensor,
    threshold: f64,
) -> Result<Tensor> {
    let len = mask.sum_keepdim(1)?.clamp(1.0, f64::INFINITY)?;
    let kl = ((diff.detach().neg()? * mask)?.sum_keepdim(1)? / len)?;
    let low_kl = kl.le(threshold)?.broadcast_as(adv.shape())?;
    let keep = adv.ge(0.0)?.maximum(&low_kl)?;
    Ok(keep.to_dtype(DType::F32)?)
}

/// The valid tokens (`mask`) whose entropy is at least the `1 - top` quantile of every rank's
/// valid tokens' entropies, taken as `torch.quantile` does (linear between order
/// statistics): TRL's `top_entropy_quantile` mask. None valid anywhere: none kept.
pub fn high_entropy_mask(
    entropy: &Tensor,
    mask: &Tensor,
    top: f64,
    comm: &dyn Communicator,
) -> Result<Tensor> {
    let e = entropy.detach().to_dtype(DType::F32)?;
    let m = mask.to_dtype(DType::F32)?;
    let mine: Vec<f32> = e
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .zip(m.flatten_all()?.to_vec1::<f32>()?)
        .filter(|&(_, v)| v != 0.0)
        .map(|(x, _)| x)
        .collect();
    let mut all = crate::dist::gather_f32(comm, &mine)?;
    if all.is_empty() {
        return Ok(m.zeros_like()?);
    }
    all.sort_by(f32::total_cmp);
    let pos = (1.0 - top) * (all.len() - 1) as f64;
    let (lo, frac) = (pos.floor() as usize, pos - pos.floor());
    let hi = (lo + 1).min(all.len() - 1);
    let threshold = f64::from(all[lo]) + frac * f64::from(all[hi] - all[lo]);
    Ok((e.ge(threshold)?.to_dtype(DType::F32)? * m)?)
}

/// How the surrogate is formed: the clip range, the token aggregation, whether the ratio is
/// a token's or its response's, the per-token objective, and the off-policy mask.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Surrogate {
    pub clip: Clip,
    pub agg: Aggregation,
    pub level: ImportanceSamplingLevel,
    pub form: Form,
    /// [`off_policy_keep`]'s threshold; none: off.
    pub off_policy: Option<f64>,
}

/// The surrogate and its diagnostics.
pub struct PolicyLoss {
    /// The per-token objective ([`Form`]; `max(-A r, -A clip(r, 1-low, 1+high))` for PPO's),
    /// aggregated over valid tokens; `r` is the token's ratio, or at the sequence level its
    /// response's (the same at every token), and under two-sided clipping `min(r, delta)` in
    /// the first term.
    pub loss: Tensor,
    /// `r` at every token `[b, R]`, with its gradient (the KL's importance correction).
    pub ratios: Tensor,
    /// Fraction of valid tokens where the clipped branch is the active one (so the token
    /// gives no gradient), as TRL and OpenRLHF count it. A token whose ratio passes the
    /// two-sided cap `delta` gives none either and is not counted, as TRL counts it neither.
    /// Under CISPO, the tokens whose ratio is capped with a positive advantage (TRL's
    /// `cispo_clip_ratio`); under SAPO and VESPO, which clip nothing, 0.
    pub clipfrac: f64,
    /// `0.5 * mean((logp - logp_old)^2)` (TRL's `approxkl`).
    pub approx_kl: f64,
    pub ratio: f64,
    /// The objective's own: VESPO's weight averaged over responses `vespo_phi`, the
    /// off-policy mask's share of valid tokens dropped `off_policy_masked`.
    pub extra: Vec<(&'static str, f64)>,
}

/// The surrogate of `sur` over valid tokens `mask`, each token's loss times `keep` where
/// given (the entropy mask) before aggregation, which still counts every valid token.
pub fn policy_loss(
    logp: &Tensor,
    logp_old: &Tensor,
    adv: &Tensor,
    mask: &Tensor,
    keep: Option<&Tensor>,
    sur: Surrogate,
) -> Result<PolicyLoss> {
    let Surrogate {
        clip,
        agg,
        level,
        form,
        off_policy,
    } = sur;
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
    let n = scalar(&mask.sum_all()?)?.max(1.0);
    let share = |x: &Tensor| -> Result<f64> { Ok(scalar(&(x * mask)?.sum_all()?)? / n) };
    let neg_adv = adv.neg()?;
    let mut extra = vec![];
    let (per_token, clipped) = match form {
        Form::Clipped => {
            let unclipped = match clip.delta {
                Some(delta) => ratio.minimum(delta)?,
                None => ratio.clone(),
            };
            let l1 = (&neg_adv * unclipped)?;
            let l2 = (&neg_adv * ratio.clamp(1.0 - clip.low, 1.0 + clip.high)?)?;
            let clipped = l2.gt(&l1)?.to_dtype(DType::F32)?;
            (l1.maximum(&l2)?, Some(clipped))
        }
        Form::Cispo { max } => {
            let weight = ratio.minimum(max)?.detach();
            let capped =
                (ratio.gt(max)?.to_dtype(DType::F32)? * adv.gt(0.0)?.to_dtype(DType::F32)?)?;
            (((&neg_adv * weight)? * logp)?, Some(capped))
        }
        Form::Sapo { tau_pos, tau_neg } => {
            let pos = adv.gt(0.0)?.to_dtype(DType::F32)?;
            let tau = ((pos * (tau_pos - tau_neg))? + tau_neg)?;
            let gate = (sigmoid(&((&ratio - 1.0)? * &tau)?)? * (tau.recip()? * 4.0)?)?;
            ((&neg_adv * gate)?, None)
        }
        Form::Vespo(v) => {
            let phi = v.weights(&diff, adv, mask)?;
            extra.push(("vespo_phi", response_mean(&phi, mask)?));
            (((&neg_adv * phi)? * logp)?, None)
        }
    };
    let mut per_token = per_token;
    if let Some(threshold) = off_policy {
        let kept = off_policy_keep(&diff, adv, mask, threshold)?;
        extra.push(("off_policy_masked", 1.0 - share(&kept)?));
        per_token = (per_token * kept)?;
    }
    if let Some(keep) = keep {
        per_token = (per_token * keep)?;
    }
    let loss = aggregate(&per_token, mask, agg)?;
    Ok(PolicyLoss {
        loss,
        clipfrac: clipped.as_ref().map_or(Ok(0.0), share)?,
        approx_kl: 0.5 * share(&diff.sqr()?)?,
        ratio: share(&ratio.detach())?,
        ratios: ratio,
        extra,
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
///
/// A NaN score (a response no reward applies to) is left out of its group's mean, std and
/// leave-one-out baseline and of the batch's std, and its advantage is 0, as TRL's GRPO and
/// RLOO treat one; so is a response whose group has no other scored member under `Rloo`.
pub fn sequence_advantages(
    scores: &[f64],
    group: usize,
    est: AdvantageEstimator,
    scale: ScaleRewards,
    eps: f64,
    comm: &dyn Communicator,
) -> Result<Vec<f64>> {
    Ok(zero_unscored(baselined(
        scores, group, est, scale, eps, comm,
    )?))
}

/// Advantages with 0 for a response that has none (NaN: no score, or no scored sibling).
pub fn zero_unscored(a: Vec<f64>) -> Vec<f64> {
    a.into_iter()
        .map(|x| if x.is_nan() { 0.0 } else { x })
        .collect()
}

/// The mean and unbiased variance of the numbers of `x` (NaN left out) over every rank.
fn scored_mean_var(x: &[f64], comm: &dyn Communicator) -> Result<(f64, f64)> {
    let all: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let valid: Vec<f32> = x.iter().map(|v| f32::from(u8::from(!v.is_nan()))).collect();
    let (mean, var) = masked_mean_var(&all, &valid);
    let n = f64::from(valid.iter().sum::<f32>());
    global_mean_var(comm, n, mean, var)
}

/// Each score less `beta` times its response's summed KL (TRL's RLOO puts the KL in the
/// reward this way, before the leave-one-out baseline); a NaN score (none) stays NaN.
pub fn kl_penalized(scores: &[f64], kl_sums: &[f64], beta: f64) -> Vec<f64> {
    scores
        .iter()
        .zip(kl_sums)
        .map(|(r, kl)| r - beta * kl)
        .collect()
}

/// [`sequence_advantages`] with NaN left where a response has none.
pub fn baselined(
    scores: &[f64],
    group: usize,
    est: AdvantageEstimator,
    scale: ScaleRewards,
    eps: f64,
    comm: &dyn Communicator,
) -> Result<Vec<f64>> {
    let batch_var = match scale {
        ScaleRewards::Batch => scored_mean_var(scores, comm)?.1,
        _ => 0.0,
    };
    let mut out = Vec::with_capacity(scores.len());
    for g in scores.chunks(group) {
        let scored: Vec<f64> = g.iter().copied().filter(|x| !x.is_nan()).collect();
        let n = scored.len() as f64;
        let sum: f64 = scored.iter().sum();
        let mean = sum / n;
        match est {
            AdvantageEstimator::Rloo => {
                out.extend(g.iter().map(|&r| match n >= 2.0 {
                    true => r - (sum - r) / (n - 1.0),
                    false => f64::NAN,
                }));
            }
            AdvantageEstimator::GroupNorm | AdvantageEstimator::ReinforcePlusPlus => {
                let denom = match scale {
                    ScaleRewards::Group => scored_mean_var(g, &Solo)?.1.sqrt() + eps,
                    ScaleRewards::Batch => batch_var.sqrt() + eps,
                    ScaleRewards::None => 1.0,
                };
                out.extend(g.iter().map(|&r| (r - mean) / denom));
            }
        }
    }
    Ok(out)
}

/// `a` normalised over every rank's numbers to mean 0 and unbiased std 1, `(x - mean) / (std
/// + eps)`; NaN (a response with no advantage) left as it is and out of the statistics.
pub fn batch_normalized(a: &[f64], eps: f64, comm: &dyn Communicator) -> Result<Vec<f64>> {
    let (mean, var) = scored_mean_var(a, comm)?;
    Ok(a.iter().map(|x| (x - mean) / (var.sqrt() + eps)).collect())
}

/// GDPO's sequence advantages (TRL's `multi_objective_aggregation = "normalize_then_sum"`),
/// from each source's unweighted scores laid out group after group: each source normalised
/// within each group, `(r - mean) / (std + eps)`, summed with `weights`, and the sum
/// normalised over the whole batch on every rank the same way (stds unbiased). A source that
/// separates the responses of a group little then weighs no less than one that separates them
/// a lot, as it would in the sum of raw scores.
pub fn decoupled_advantages(
    by_source: &[&[f64]],
    weights: &[f64],
    group: usize,
    eps: f64,
    comm: &dyn Communicator,
) -> Result<Vec<f64>> {
    let n = by_source.first().map_or(0, |s| s.len());
    // A source's NaN (it does not apply) adds nothing; a response none applies to stays NaN,
    // out of the batch's statistics, and gets 0.
    let mut sum = vec![f64::NAN; n];
    for (scores, w) in by_source.iter().zip(weights) {
        let normed = baselined(
            scores,
            group,
            AdvantageEstimator::GroupNorm,
            ScaleRewards::Group,
            eps,
            comm,
        )?;
        for (t, x) in sum.iter_mut().zip(normed) {
            if !x.is_nan() {
                *t = if t.is_nan() { w * x } else { *t + w * x };
            }
        }
    }
    Ok(zero_unscored(batch_normalized(&sum, eps, comm)?))
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
            form: Form::Clipped,
            off_policy: None,
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
            form: Form::Clipped,
            off_policy: None,
        };
        let s0 = 0.2f64.exp();
        let pl = policy_loss(new.as_tensor(), &old, &adv, &mask, None, sur(0.3)).unwrap();
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
        let pl = policy_loss(new.as_tensor(), &old, &adv, &mask, None, sur(0.1)).unwrap();
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
        } = policy_loss(&new, &old, &adv, &mask, None, token(clip)).unwrap();
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
            None,
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
        let pl = policy_loss(&new, &old, &adv, &mask, None, token(Clip::new(0.2, None))).unwrap();
        assert_eq!(pl.clipfrac, 0.5);
        // Clip-higher: with epsilon_high 0.7 the upper bound is 1.7, so the first token is no
        // longer clipped.
        let pl = policy_loss(
            &new,
            &old,
            &adv,
            &mask,
            None,
            token(Clip::new(0.2, Some(0.7))),
        )
        .unwrap();
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
            let pl = policy_loss(new.as_tensor(), &old, &adv, &mask, None, token(clip)).unwrap();
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
        // LUSPO: each response's sum, then the mean over responses.
        assert!((get(Aggregation::ResponseSum) - (3.0 + 5.0) / 2.0).abs() < 1e-6);
    }

    fn objective(form: Form, agg: Aggregation) -> Surrogate {
        Surrogate {
            form,
            agg,
            ..token(Clip::new(0.2, None))
        }
    }

    /// The loss and the gradient in the log-probabilities of `form` at `logp`.
    fn loss_and_grad(
        logp: &[f32],
        old: &[f32],
        adv: &[f32],
        sur: Surrogate,
    ) -> (PolicyLoss, Vec<f32>) {
        let new = candle_core::Var::from_tensor(&t(logp)).unwrap();
        let mask = t(&vec![1.0; logp.len()]);
        let pl = policy_loss(new.as_tensor(), &t(old), &t(adv), &mask, None, sur).unwrap();
        let g = pl.loss.backward().unwrap();
        let g = g.get(&new).unwrap().flatten_all().unwrap();
        (pl, g.to_vec1::<f32>().unwrap())
    }

    fn close(a: &[f32], b: &[f64]) -> bool {
        a.iter()
            .zip(b)
            .all(|(x, y)| (f64::from(*x) - y).abs() < 1e-5)
    }

    /// CISPO weighs `-A log pi` by the ratio capped at `max`, held constant: a token past the
    /// cap keeps its gradient (PPO's clip would give it none) and counts as capped.
    #[test]
    fn cispo_caps_the_ratio_and_keeps_every_tokens_gradient() {
        let (logp, old, adv) = ([-1.0, -0.5], [-1.5, -0.5], [1.0, -1.0]);
        let (pl, g) = loss_and_grad(
            &logp,
            &old,
            &adv,
            objective(Form::Cispo { max: 1.2 }, Aggregation::Token),
        );
        // Weights 1.2 (e^0.5 capped) and 1: losses 1.2 * 1 and -1 * 0.5, averaged.
        assert!(
            (s(&pl.loss) - (1.2 - 0.5) / 2.0).abs() < 1e-6,
            "{}",
            s(&pl.loss)
        );
        assert!(close(&g, &[-0.6, 0.5]), "{g:?}");
        assert_eq!(pl.clipfrac, 0.5);
        let (_, clipped) = loss_and_grad(&logp, &old, &adv, token(Clip::new(0.2, None)));
        assert_eq!(clipped[0], 0.0, "PPO's clip stops the same token");
    }

    /// SAPO's gate is 2 / tau with slope 1 on the policy at the rollout's own policy, so it
    /// starts as the plain policy gradient, and fades smoothly far off it instead of stopping.
    #[test]
    fn sapos_gate_is_the_policy_gradient_on_policy_and_fades_off_it() {
        let sapo = objective(
            Form::Sapo {
                tau_pos: 1.0,
                tau_neg: 2.0,
            },
            Aggregation::Token,
        );
        let (pl, g) = loss_and_grad(&[-1.0, -2.0], &[-1.0, -2.0], &[1.0, -1.0], sapo);
        assert!(
            (s(&pl.loss) - (-2.0 + 1.0) / 2.0).abs() < 1e-6,
            "{}",
            s(&pl.loss)
        );
        assert!(close(&g, &[-0.5, 0.5]), "{g:?}");
        assert_eq!(pl.clipfrac, 0.0);
        // Ratio e^0.3: slope 4 sig(0.3)(1 - sig(0.3)) times the ratio, less than 1, more than 0.
        let (_, g) = loss_and_grad(&[-0.7], &[-1.0], &[1.0], sapo);
        let sig = 1.0 / (1.0 + (-(0.3f64.exp() - 1.0)).exp());
        let want = -4.0 * sig * (1.0 - sig) * 0.3f64.exp();
        assert!(
            close(&g, &[want]) && want > -1.4 && want < -0.5,
            "{g:?} {want}"
        );
        let (_, far) = loss_and_grad(&[2.0], &[-1.0], &[1.0], sapo);
        assert!(far[0].abs() < 1e-3 && far[0] != 0.0, "{far:?}");
    }

    /// VESPO's weight is 1 at the rollout's policy (the plain policy gradient) and, with the
    /// response's ratio w = e^0.5 and a positive advantage, e^(3 + 2 * 0.5 - 3 e^0.5).
    #[test]
    fn vespos_weight_is_the_gamma_of_the_responses_ratio() {
        let v = Vespo {
            k_pos: 2.0,
            lambda_pos: 3.0,
            k_neg: 3.0,
            lambda_neg: 2.0,
        };
        let sur = objective(
            Form::Vespo(v),
            Aggregation::Dapo {
                tokens_per_micro: 2.0,
            },
        );
        let (pl, g) = loss_and_grad(&[-1.0, -2.0], &[-1.0, -2.0], &[1.0, 1.0], sur);
        assert!((s(&pl.loss) - 3.0 / 2.0).abs() < 1e-6, "{}", s(&pl.loss));
        assert!(close(&g, &[-0.5, -0.5]), "{g:?}");
        assert_eq!(pl.extra, [("vespo_phi", 1.0)]);
        let (pl, g) = loss_and_grad(&[-0.8, -1.7], &[-1.0, -2.0], &[1.0, 1.0], sur);
        let phi = (3.0 + 2.0 * 0.5 - 3.0 * 0.5f64.exp()).exp();
        assert!(close(&g, &[-phi / 2.0, -phi / 2.0]), "{g:?} {phi}");
        assert!((pl.extra[0].1 - phi).abs() < 1e-5);
        // A negative advantage reads k_neg and lambda_neg.
        let w = v
            .weights(&t(&[0.25, 0.25]), &t(&[-1.0, -1.0]), &t(&[1.0, 1.0]))
            .unwrap();
        let want = (2.0 + 3.0 * 0.5 - 2.0 * 0.5f64.exp()).exp();
        assert!(close(
            &w.flatten_all().unwrap().to_vec1().unwrap(),
            &[want, want]
        ));
    }

    /// DeepSeek-V3.2's mask drops a response with a negative advantage that the policy has
    /// moved away from by more than the threshold (mean `log pi_old - log pi`), and keeps the
    /// rest: a positive advantage whatever the drift, a negative one that drifted little.
    #[test]
    fn the_off_policy_mask_drops_drifted_responses_with_negative_advantages() {
        let two = |v: [[f32; 2]; 3]| Tensor::new(&v, &candle_core::Device::Cpu).unwrap();
        // Mean drifts 0.6, 0.1 and 1.0 (row 1's second token is padding).
        let diff = two([[-0.6, -0.6], [-0.1, -5.0], [-1.0, -1.0]]);
        let adv = two([[-1.0; 2], [-1.0; 2], [2.0; 2]]);
        let mask = two([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]);
        let keep = off_policy_keep(&diff, &adv, &mask, 0.5).unwrap();
        assert_eq!(
            keep.to_vec2::<f32>().unwrap(),
            [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        );
        let sur = Surrogate {
            off_policy: Some(0.5),
            ..token(Clip::new(0.2, None))
        };
        let zero = two([[0.0; 2]; 3]);
        let pl = policy_loss(&diff, &zero, &adv, &mask, None, sur).unwrap();
        assert!((pl.extra[0].1 - 2.0 / 5.0).abs() < 1e-9, "{:?}", pl.extra);
    }

    /// The top-entropy mask keeps the valid tokens at or above `torch.quantile`'s `1 - top`
    /// quantile (linear between order statistics) of every rank's valid tokens: the same
    /// tokens whether the batch sits on one rank or is split unevenly over two.
    #[test]
    fn the_top_entropy_mask_takes_the_quantile_over_every_rank() {
        let e = t(&[0.4, 0.1, 9.0, 0.3, 0.2]);
        let m = t(&[1.0, 1.0, 0.0, 1.0, 1.0]);
        let kept = |top| {
            high_entropy_mask(&e, &m, top, &Solo)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        // Valid entropies 0.1..0.4: the median is 0.25.
        assert_eq!(kept(0.5), [1.0, 0.0, 0.0, 1.0, 0.0]);
        assert_eq!(kept(0.0), [1.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(kept(1.0), [1.0, 1.0, 0.0, 1.0, 1.0]);
        let parts = [
            (vec![0.4f32], vec![1.0f32]),
            (vec![0.1, 9.0, 0.3, 0.2], vec![1.0, 0.0, 1.0, 1.0]),
        ];
        let group = ThreadGroup::new(2);
        let got: Vec<Vec<f32>> = std::thread::scope(|sc| {
            let hs: Vec<_> = group
                .iter()
                .zip(&parts)
                .map(|(c, (e, m))| {
                    sc.spawn(move || {
                        high_entropy_mask(&t(e), &t(m), 0.5, c)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(got, [vec![1.0], vec![0.0, 0.0, 1.0, 0.0]]);
        let alone = high_entropy_mask(&t(&parts[0].0), &t(&parts[0].1), 0.0, &Solo).unwrap();
        assert_eq!(
            alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [1.0]
        );
    }

    /// GDPO normalises each source within its group before the weighted sum, so a source
    /// whose scores spread little weighs as much as one whose scores spread a lot; the sum is
    /// then normalised over the batch.
    #[test]
    fn decoupled_advantages_normalise_each_source_in_its_group() {
        // Two groups of two. Source a separates group 0 by 10, source b group 1 by 0.1.
        let a = [10.0, 0.0, 5.0, 5.0];
        let b = [0.0, 0.0, 0.1, 0.0];
        let adv = decoupled_advantages(&[&a, &b], &[1.0, 1.0], 2, 1e-4, &Solo).unwrap();
        // Per source within groups: a gives [z, -z, 0, 0], b gives [0, 0, z, -z] with
        // z = 1 / sqrt(2) (the unbiased std of two values d apart is d / sqrt 2; eps moves
        // b's by a part in 700); the sum [z, -z, z, -z] normalised over the batch (mean 0,
        // unbiased std z sqrt(4/3)).
        let want = 1.0 / (4.0f64 / 3.0).sqrt();
        for (x, sign) in adv.iter().zip([1.0, -1.0, 1.0, -1.0]) {
            assert!((x - sign * want).abs() < 2e-3, "{adv:?}");
        }
        // The raw sum would leave group 1's pair 100 times closer.
        let summed: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        let plain = sequence_advantages(
            &summed,
            2,
            AdvantageEstimator::GroupNorm,
            ScaleRewards::Batch,
            0.0,
            &Solo,
        )
        .unwrap();
        assert!((plain[0] - plain[1]).abs() > 50.0 * (plain[2] - plain[3]).abs());
    }

    /// TRL's RLOO: each score less beta times its response's summed KL, then the leave-one-out
    /// baseline. Scores [1, 0], KL sums [0.5, 0.1], beta 0.1: rewards [0.95, -0.01], so
    /// advantages [0.96, -0.96]; a NaN score stays NaN.
    #[test]
    fn rloo_takes_the_summed_kl_off_each_score_before_its_baseline() {
        let r = kl_penalized(&[1.0, 0.0, f64::NAN], &[0.5, 0.1, 2.0], 0.1);
        assert!(
            (r[0] - 0.95).abs() < 1e-12 && (r[1] + 0.01).abs() < 1e-12,
            "{r:?}"
        );
        assert!(r[2].is_nan());
        let a = sequence_advantages(
            &r[..2],
            2,
            AdvantageEstimator::Rloo,
            ScaleRewards::Group,
            0.0,
            &Solo,
        )
        .unwrap();
        assert!(
            (a[0] - 0.96).abs() < 1e-12 && (a[1] + 0.96).abs() < 1e-12,
            "{a:?}"
        );
    }

    /// A response no reward applies to (NaN) is left out of its group's statistics and of the
    /// batch's, and gets advantage 0, under each estimator and GDPO; a group with one scored
    /// response gives RLOO no baseline, so 0 there too.
    #[test]
    fn unscored_responses_are_left_out_and_get_no_advantage() {
        use AdvantageEstimator::*;
        let nan = f64::NAN;
        let r = [1.0, nan, 0.0, 2.0, nan, 4.0, nan, 5.0, nan];
        let grp = sequence_advantages(&r, 3, GroupNorm, ScaleRewards::Group, 0.0, &Solo).unwrap();
        // Group 0 over [1, 0]: mean 0.5, unbiased std sqrt(0.5); group 2 has one score, std 0.
        let z = 0.5 / 0.5f64.sqrt();
        let want = [z, 0.0, -z, -z, 0.0, z, 0.0, 0.0, 0.0];
        for (a, w) in grp.iter().zip(want) {
            assert!((a - w).abs() < 1e-9, "{grp:?}");
        }
        let rloo = sequence_advantages(&r, 3, Rloo, ScaleRewards::Group, 0.0, &Solo).unwrap();
        assert_eq!(rloo, [1.0, 0.0, -1.0, -2.0, 0.0, 2.0, 0.0, 0.0, 0.0]);
        // The batch's std is that of the five scores, as if the others were not there.
        let bat = sequence_advantages(&r, 3, GroupNorm, ScaleRewards::Batch, 0.0, &Solo).unwrap();
        let scored = [1.0, 0.0, 2.0, 4.0, 5.0];
        let m = scored.iter().sum::<f64>() / 5.0;
        let sd = (scored.iter().map(|x| (x - m).powi(2)).sum::<f64>() / 4.0).sqrt();
        assert!((bat[0] - 0.5 / sd).abs() < 1e-6 && bat[1] == 0.0, "{bat:?}");
        // GDPO: source a misses row 1, source b rows 0 and 1; row 1 is unscorable.
        let a = [1.0, nan, 0.0, 3.0];
        let b = [nan, nan, 0.0, 2.0];
        let adv = decoupled_advantages(&[&a, &b], &[1.0, 1.0], 2, 1e-4, &Solo).unwrap();
        // Row 0: a alone in its group, so 0 (TRL's eps makes 0 / 0 a 0); rows 2 and 3: a and b
        // each -z and +z, summed to -2z and 2z; over the scored rows [0, -2z, 2z] the batch
        // normalisation gives [0, -1, 1] (std 2z); row 1 none.
        let want = [0.0, 0.0, -1.0, 1.0];
        for (x, w) in adv.iter().zip(want) {
            assert!((x - w).abs() < 1e-3, "{adv:?}");
        }
    }

    /// TRL's RLOO `normalize_advantages`: mean 0 and unbiased std 1 over the numbers, NaN left
    /// out and kept, and over two ranks holding unequal shares the same as over one.
    #[test]
    fn batch_normalisation_leaves_nan_out_and_spans_ranks() {
        let a = [1.0, f64::NAN, 3.0, 5.0, 7.0];
        let got = batch_normalized(&a, 0.0, &Solo).unwrap();
        let sd = (20.0f64 / 3.0).sqrt();
        let want = [-3.0 / sd, f64::NAN, -1.0 / sd, 1.0 / sd, 3.0 / sd];
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g.is_nan() && w.is_nan()) || (g - w).abs() < 1e-9,
                "{got:?}"
            );
        }
        let group = ThreadGroup::new(2);
        let parts: Vec<Vec<f64>> = std::thread::scope(|sc| {
            let hs: Vec<_> = group
                .iter()
                .zip([&a[..1], &a[1..]])
                .map(|(c, part)| sc.spawn(move || batch_normalized(part, 0.0, c).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let joined: Vec<f64> = parts.concat();
        for (g, w) in joined.iter().zip(want) {
            assert!(
                (g.is_nan() && w.is_nan()) || (g - w).abs() < 1e-5,
                "{joined:?}"
            );
        }
    }

    /// Each objective learns a bandit: four actions, the last one rewarded, 16 samples a
    /// round scored by group-normalised advantages, two passes per round so the ratios leave
    /// 1, and the probability of the rewarded action grows from 1/4 past 0.8.
    #[test]
    fn every_objective_learns_a_bandit() {
        use crate::train::rng::Rng;
        use candle_core::{Device, Var, D};
        let v = Vespo {
            k_pos: 2.0,
            lambda_pos: 3.0,
            k_neg: 3.0,
            lambda_neg: 2.0,
        };
        let forms = [
            (Form::Clipped, Aggregation::Sequence),
            (Form::Cispo { max: 5.0 }, Aggregation::Token),
            (
                Form::Sapo {
                    tau_pos: 1.0,
                    tau_neg: 1.05,
                },
                Aggregation::Sequence,
            ),
            (Form::Vespo(v), Aggregation::Token),
            (Form::Clipped, Aggregation::ResponseSum),
        ];
        for (form, agg) in forms {
            let logits = Var::zeros(4, DType::F32, &Device::Cpu).unwrap();
            let mut rng = Rng::new(7);
            let probs = |l: &Var| softmax(l.as_tensor()).to_vec1::<f32>().unwrap();
            for _ in 0..40 {
                let p = probs(&logits);
                let actions: Vec<u32> = (0..16)
                    .map(|_| {
                        let mut u = rng.f64() as f32;
                        p.iter()
                            .position(|&pi| {
                                u -= pi;
                                u < 0.0
                            })
                            .unwrap_or(3) as u32
                    })
                    .collect();
                let scores: Vec<f64> = actions
                    .iter()
                    .map(|&a| f64::from(u8::from(a == 3)))
                    .collect();
                let adv = sequence_advantages(
                    &scores,
                    16,
                    AdvantageEstimator::GroupNorm,
                    ScaleRewards::Group,
                    1e-4,
                    &Solo,
                )
                .unwrap();
                let adv = Tensor::from_vec(
                    adv.iter().map(|&x| x as f32).collect(),
                    (16, 1),
                    &Device::Cpu,
                )
                .unwrap();
                let ids = Tensor::from_vec(actions, (16, 1), &Device::Cpu).unwrap();
                let logp = |l: &Var| {
                    let lp = crate::train::loss::log_softmax(&l.as_tensor().unsqueeze(0).unwrap())
                        .unwrap();
                    lp.broadcast_as((16, 4))
                        .unwrap()
                        .contiguous()
                        .unwrap()
                        .gather(&ids, D::Minus1)
                        .unwrap()
                };
                let old = logp(&logits).detach();
                let mask = Tensor::ones((16, 1), DType::F32, &Device::Cpu).unwrap();
                for _ in 0..2 {
                    let pl = policy_loss(
                        &logp(&logits),
                        &old,
                        &adv,
                        &mask,
                        None,
                        objective(form, agg),
                    )
                    .unwrap();
                    let g = pl.loss.backward().unwrap();
                    let step = (g.get(&logits).unwrap() * 0.5).unwrap();
                    logits.set(&(logits.as_tensor() - step).unwrap()).unwrap();
                }
            }
            let p = probs(&logits);
            assert!(p[3] > 0.8, "{form:?} {agg:?}: {p:?}");
        }
    }

    fn softmax(x: &Tensor) -> Tensor {
        crate::train::loss::log_softmax(x).unwrap().exp().unwrap()
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
