//! `[ppo]`: PPO with a value model.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::grpo::LossType;
use super::rewards::RewardSpec;
use super::sampling::{check_new_tokens, check_sampling, positive};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `logp - logp_ref` (TRL's default).
    K1,
    /// `exp(logp_ref - logp) - (logp_ref - logp) - 1`: non-negative, lower variance.
    K3,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoConfig {
    /// The checker and/or reward models, each with a weight.
    pub rewards: Vec<RewardSpec>,
    /// Initial value model: a reward checkpoint; default: the first reward model, else the
    /// policy's checkpoint with a fresh head.
    pub value_init: Option<PathBuf>,
    pub rollout_batch: usize,
    pub minibatch_size: usize,
    pub ppo_epochs: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub kl_coef: f64,
    pub kl_estimator: KlEstimator,
    pub adaptive_kl: bool,
    pub target_kl: f64,
    pub kl_horizon: f64,
    pub cliprange: f64,
    /// Upper clip range of the ratio when it differs from `cliprange` (DAPO's clip-higher;
    /// TRL's `epsilon_high`).
    pub epsilon_high: Option<f64>,
    pub cliprange_value: f64,
    pub vf_coef: f64,
    /// The value model's learning rate as a multiple of the policy's (OpenRLHF gives its
    /// critic its own learning rate too).
    pub value_lr_scale: f64,
    pub entropy_coef: f64,
    pub gamma: f64,
    pub lam: f64,
    pub whiten_advantages: bool,
    /// Clip the sequence score to `[-score_clip, score_clip]`.
    pub score_clip: Option<f64>,
    /// Subtracted from the score of a response that did not end with EOS.
    pub missing_eos_penalty: Option<f64>,
    pub loss_type: LossType,
    /// Responses cut off by `max_new_tokens` carry no policy loss (TRL's
    /// `mask_truncated_completions`).
    pub mask_truncated_completions: bool,
    /// Completions written to `completions.jsonl` per rollout.
    pub log_completions: usize,
    /// Built-in task: the prompts rollouts draw from (with `--data`, the file's prompts).
    pub task_prompts: usize,
    /// Built-in task: held-out prompts scored at each evaluation (with `--data`, every
    /// held-out prompt is).
    pub eval_prompts: usize,
    /// Pack each minibatch's prompts and responses into rows for the training forward
    /// (OpenRLHF's `--packing_samples`): each row attends only to itself with positions from
    /// 0, so its log-probabilities and values are those of the padded layout, while the
    /// forward skips the left padding of short prompts and the right padding of short
    /// responses. A minibatch that packing would not shrink stays padded. Reward models
    /// score packed sequences too (as `[reward] padding_free`), held-out evaluation included.
    pub packing: bool,
}

impl PpoConfig {
    pub fn validate(&self) -> Result<()> {
        super::rewards::check_weights("ppo", &self.rewards)?;
        // Sampling and scoring must see one distribution: log-probabilities are computed from
        // the full softmax at the sampling temperature, which top-k / top-p would truncate.
        if self.top_k != 0 || self.top_p != 1.0 {
            bail!(
                "ppo.top_k / ppo.top_p: PPO scores sampled tokens under the full tempered softmax, so it needs top_k = 0 and top_p = 1 (got {} and {})",
                self.top_k,
                self.top_p
            );
        }
        check_sampling("ppo", self.temperature, self.cliprange, self.epsilon_high)?;
        // The adaptive controller scales the coefficient it is given: from 0 it stays 0.
        if self.adaptive_kl && self.kl_coef == 0.0 {
            bail!(
                "ppo.adaptive_kl scales ppo.kl_coef towards its KL target, and from 0 it stays 0 \
                 (set kl_coef above 0, or adaptive_kl = false)"
            );
        }
        if self.loss_type.grpo_only() {
            bail!(
                "ppo.loss_type = \"{}\" is one of GRPO's losses; PPO takes bnpo, grpo, dapo or dr_grpo",
                self.loss_type.name()
            );
        }
        crate::config::check_counts(
            "ppo",
            &[
                ("rollout_batch", self.rollout_batch),
                ("minibatch_size", self.minibatch_size),
                ("ppo_epochs", self.ppo_epochs),
            ],
        )?;
        check_new_tokens("ppo", self.max_new_tokens)?;
        for (name, x) in [
            ("kl_coef", self.kl_coef),
            ("vf_coef", self.vf_coef),
            ("entropy_coef", self.entropy_coef),
        ] {
            if !(x >= 0.0 && x.is_finite()) {
                bail!("ppo.{name} must be 0 or positive, got {x}");
            }
        }
        for (name, x) in [
            ("cliprange_value", self.cliprange_value),
            ("value_lr_scale", self.value_lr_scale),
            ("target_kl", self.target_kl),
            ("kl_horizon", self.kl_horizon),
        ] {
            if !positive(x) {
                bail!("ppo.{name} must be positive, got {x}");
            }
        }
        for (name, x) in [("gamma", self.gamma), ("lam", self.lam)] {
            if !(0.0..=1.0).contains(&x) {
                bail!("ppo.{name} must be in [0, 1], got {x}");
            }
        }
        Ok(())
    }
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            rewards: vec![RewardSpec::task()],
            value_init: None,
            rollout_batch: 256,
            minibatch_size: 64,
            ppo_epochs: 4,
            max_new_tokens: 6,
            temperature: 0.7,
            top_k: 0,
            top_p: 1.0,
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            adaptive_kl: false,
            target_kl: 6.0,
            kl_horizon: 10000.0,
            cliprange: 0.2,
            epsilon_high: None,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            value_lr_scale: 1.0,
            entropy_coef: 0.0,
            gamma: 1.0,
            lam: 0.95,
            whiten_advantages: true,
            score_clip: None,
            missing_eos_penalty: None,
            loss_type: LossType::Bnpo,
            mask_truncated_completions: false,
            log_completions: 8,
            task_prompts: 4000,
            eval_prompts: 1000,
            packing: false,
        }
    }
}
