//! `[reward]`: reward modelling on preference pairs.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardConfig {
    /// Subtracted from `r_chosen - r_rejected` inside the loss (0 = plain Bradley-Terry).
    pub margin: f64,
    /// Weight of `mean((r_chosen + r_rejected)^2)` added to the training loss, which holds the
    /// rewards' mean near 0 (TRL's `center_rewards_coefficient`, after Eisenstein et al.; they
    /// suggest 0.01). Bradley-Terry fixes only differences, so without it the scale's offset
    /// drifts; a policy stage then reads a reward whose level means nothing. 0: off.
    pub center_rewards_coefficient: f64,
    pub task_pairs: usize,
    pub eval_pairs: usize,
    /// Score each micro-batch's chosen and rejected sequences packed into rows as wide as the
    /// longest, each attending only to itself with positions from 0 (as `[dpo]
    /// padding_free`): the padded batch's scores and loss without its padding. A batch that
    /// packing would not shrink stays padded.
    pub padding_free: bool,
}

impl RewardConfig {
    pub fn validate(&self) -> Result<()> {
        let c = self.center_rewards_coefficient;
        if !(c >= 0.0 && c.is_finite()) {
            bail!("reward.center_rewards_coefficient must be 0 or positive, got {c}");
        }
        if !self.margin.is_finite() {
            bail!("reward.margin must be a finite number, got {}", self.margin);
        }
        Ok(())
    }
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            margin: 0.0,
            center_rewards_coefficient: 0.0,
            task_pairs: 4000,
            eval_pairs: 400,
            padding_free: false,
        }
    }
}
