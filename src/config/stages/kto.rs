//! `[kto]`: Kahneman-Tversky optimisation.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Kahneman-Tversky optimisation over completions labelled desirable or undesirable (TRL's
/// `KTOTrainer`, OpenRLHF's `train_kto`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KtoConfig {
    /// The scale of the implicit reward inside the sigmoid. 1.0 here, TRL's default is 0.1:
    /// measured on the built-in task, whose completions are 2 or 3 tokens, so that their
    /// summed log-ratios stay small (seed 1, lr 1e-4, 100 steps: accuracy 0.49 -> 0.38 at
    /// 0.1, 0.52 at 1.0). Longer completions sum larger log-ratios and want a smaller beta.
    pub beta: f64,
    /// The loss (TRL's `loss_type`).
    pub loss_type: KtoLoss,
    /// The weight of each desirable example's loss (TRL's `desirable_weight`).
    pub desirable_weight: f64,
    /// The weight of each undesirable example's loss (TRL's `undesirable_weight`). The KTO
    /// paper wants `desirable_weight * desirable / (undesirable_weight * undesirable)` between
    /// 1 and 4/3; the stage says when the data is outside that.
    pub undesirable_weight: f64,
    /// Pack each micro-batch's sequences into rows, each attending only to itself, as `[dpo]
    /// padding_free` does.
    pub padding_free: bool,
    /// Built-in task: preference pairs drawn, each giving one desirable and one undesirable
    /// example (TRL's unpairing of a paired dataset).
    pub task_pairs: usize,
    pub eval_pairs: usize,
    pub eval_prompts: usize,
    pub eval_max_new_tokens: usize,
}

/// KTO's losses over each example's implicit reward `h = log pi(y|x) - log ref(y|x)` (summed
/// over the completion's tokens), `s = +1` for a desirable example and `-1` for an
/// undesirable one, and the weight `w` of its label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KtoLoss {
    /// KTO: `w (1 - sigmoid(beta s (h - z)))` with `z` the batch's estimate of the KL from
    /// reference to policy, from each prompt paired with another example's completion
    /// (detached, averaged over the ranks, at least 0).
    Kto,
    /// APO-zero for unpaired data: the same with `z = 0`, so no KL forwards run.
    ApoZeroUnpaired,
}

impl KtoLoss {
    /// The name `[kto] loss_type` takes.
    pub fn name(self) -> &'static str {
        match self {
            KtoLoss::Kto => "kto",
            KtoLoss::ApoZeroUnpaired => "apo_zero_unpaired",
        }
    }

    /// Whether the loss estimates the KL baseline from mismatched prompts and completions.
    pub fn estimates_kl(self) -> bool {
        self == KtoLoss::Kto
    }
}

impl KtoConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            bail!("kto.beta must be positive, got {}", self.beta);
        }
        for (name, w) in [
            ("desirable_weight", self.desirable_weight),
            ("undesirable_weight", self.undesirable_weight),
        ] {
            if !(w >= 0.0 && w.is_finite()) {
                bail!("kto.{name} must be 0 or positive, got {w}");
            }
        }
        if self.desirable_weight == 0.0 && self.undesirable_weight == 0.0 {
            bail!("kto.desirable_weight and kto.undesirable_weight are both 0: nothing to learn");
        }
        Ok(())
    }
}

impl Default for KtoConfig {
    fn default() -> Self {
        Self {
            beta: 1.0,
            loss_type: KtoLoss::Kto,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            padding_free: false,
            task_pairs: 4000,
            eval_pairs: 200,
            eval_prompts: 1000,
            eval_max_new_tokens: 6,
        }
    }
}
