//! `[distill]`: knowledge distillation from a frozen teacher (TRL's `GKDTrainer`, after
//! Agarwal et al.'s generalised knowledge distillation; OpenRLHF's `train_kd` at
//! `kd_coef = 1` is `beta = 0`, `lmbda = 0`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillConfig {
    /// The model the student learns from (`--teacher`): a run directory, checkpoint or
    /// Hugging Face model directory with the student's vocabulary.
    pub teacher: Option<PathBuf>,
    /// TRL's generalised Jensen-Shannon divergence: 0 is the forward KL(teacher ‖ student)
    /// (classic distillation, mass-covering), 1 the reverse KL(student ‖ teacher)
    /// (mode-seeking), between them the divergence of each from their mixture, weighted.
    pub beta: f64,
    /// The share of optimizer steps trained on the student's own samples of the prompts
    /// (on-policy, TRL's `lmbda`; a step's micro-batches alike); the rest train on the data's
    /// completions.
    pub lmbda: f64,
    /// Sequence-level distillation: the off-policy steps train on the teacher's
    /// samples instead of the data's completions (TRL's `seq_kd`).
    pub seq_kd: bool,
    /// Samples the completions. The divergence compares the models' untempered
    /// distributions, as TRL's `GKDTrainer` does.
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    /// New tokens a sampled completion may take (fewer where the prompt leaves less room).
    pub max_new_tokens: usize,
    /// Examples drawn from the built-in task when no data is named.
    pub task_examples: usize,
    /// Held-out prompts the built-in task's accuracy is measured on.
    pub eval_prompts: usize,
    pub eval_max_new_tokens: usize,
}

impl DistillConfig {
    /// Whether any micro-batch samples its completions.
    pub fn samples(&self) -> bool {
        self.lmbda > 0.0 || self.seq_kd
    }

    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.beta) {
            bail!("distill.beta must be in [0, 1], got {}", self.beta);
        }
        if !(0.0..=1.0).contains(&self.lmbda) {
            bail!("distill.lmbda must be in [0, 1], got {}", self.lmbda);
        }
        super::stages::check_temperature("distill.temperature", self.temperature)?;
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("distill.top_p must be in (0, 1], got {}", self.top_p);
        }
        if self.max_new_tokens == 0 {
            bail!("distill.max_new_tokens must be positive");
        }
        Ok(())
    }
}

impl Default for DistillConfig {
    /// TRL's defaults, but for the completion length: the built-in task's answers are a few
    /// tokens.
    fn default() -> Self {
        Self {
            teacher: None,
            beta: 0.5,
            lmbda: 0.5,
            seq_kd: false,
            temperature: 0.9,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 6,
            task_examples: 4000,
            eval_prompts: 1000,
            eval_max_new_tokens: 6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distill_refuses_what_would_break_its_divergence_or_sampling() {
        assert!(DistillConfig::default().validate().is_ok());
        let bad =
            |f, field| crate::config::assert_refuses(DistillConfig::validate, "distill", f, field);
        bad(|c| c.beta = 1.5, "beta");
        bad(|c| c.beta = f64::NAN, "beta");
        bad(|c| c.lmbda = -0.1, "lmbda");
        bad(|c| c.temperature = 0.0, "temperature");
        bad(|c| c.top_p = 0.0, "top_p");
        bad(|c| c.max_new_tokens = 0, "max_new_tokens");
        let offline = DistillConfig {
            lmbda: 0.0,
            ..Default::default()
        };
        assert!(!offline.samples());
    }
}
