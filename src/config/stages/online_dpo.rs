//! `[online_dpo]`: online DPO.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::dpo::{DpoConfig, DpoLoss};
use super::rewards::RewardSpec;
use super::sampling::{check_filters, check_new_tokens, check_temperature};

/// Online DPO (TRL's `OnlineDPOTrainer`): two samples of each prompt from the current policy,
/// ranked by their scores, trained on with a DPO loss against the frozen reference.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OnlineDpoConfig {
    /// What ranks the two samples: the task's checker, reward models, processes or endpoints,
    /// weighted and summed (as `[grpo] rewards`).
    pub rewards: Vec<RewardSpec>,
    pub beta: f64,
    /// The preference loss, as `[dpo] loss_type`, the same maths: TRL's online DPO has
    /// `sigmoid` and `ipo`, and its `ipo` sums log-probabilities where the dpo stage's (as
    /// TRL's offline one) averages them per token; `simpo` and `orpo` load no reference.
    #[serde(deserialize_with = "super::dpo::one_or_many::one")]
    pub loss_type: DpoLoss,
    /// Weight of the chosen samples' per-token negative log-likelihood (RPO), as `[dpo]
    /// rpo_alpha`; 0, as TRL's online DPO has none (ORPO as published wants 1).
    pub rpo_alpha: f64,
    /// As `[dpo] label_smoothing` (`sigmoid`, `robust` and `exo_pair` only).
    pub label_smoothing: f64,
    /// As `[dpo] simpo_gamma`.
    pub simpo_gamma: f64,
    /// As `[dpo] discopop_tau`.
    pub discopop_tau: f64,
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    /// As `[grpo] min_p`.
    pub min_p: f64,
    /// As `[grpo] repetition_penalty`.
    pub repetition_penalty: f64,
    pub max_new_tokens: usize,
    /// Subtracted from the score of a sample that did not end with EOS, before ranking.
    pub missing_eos_penalty: Option<f64>,
    /// Completions written to `completions.jsonl` per step.
    pub log_completions: usize,
    /// Built-in task: the prompts rollouts draw from (with `--data`, the file's prompts).
    pub task_prompts: usize,
    /// Built-in task: held-out prompts scored at each evaluation (with `--data`, every
    /// held-out prompt is).
    pub eval_prompts: usize,
    /// Pack each step's sequences into rows for the training forward, as `[grpo] packing`.
    pub packing: bool,
}

impl OnlineDpoConfig {
    /// The offline stage's table with this one's loss settings, for the shared loss.
    pub fn loss(&self) -> DpoConfig {
        DpoConfig {
            beta: self.beta,
            rpo_alpha: self.rpo_alpha,
            loss_type: vec![self.loss_type],
            label_smoothing: self.label_smoothing,
            simpo_gamma: self.simpo_gamma,
            discopop_tau: self.discopop_tau,
            ..DpoConfig::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        super::rewards::check_weights("online_dpo", &self.rewards)?;
        if self.loss_type == DpoLoss::Sft {
            bail!(
                "online_dpo.loss_type = \"sft\" is not taken: the chosen samples' NLL is \
                 online_dpo.rpo_alpha"
            );
        }
        self.loss().validate_as("online_dpo")?;
        if self.loss_type == DpoLoss::BcoPair {
            bail!(
                "online_dpo.loss_type = \"bco_pair\" is not taken: its reward shift is a running \
                 mean over batches of fixed pairs (use it in dpo)"
            );
        }
        check_temperature("online_dpo.temperature", self.temperature)?;
        check_filters(
            "online_dpo",
            self.top_p,
            self.min_p,
            self.repetition_penalty,
        )?;
        check_new_tokens("online_dpo", self.max_new_tokens)?;
        if !(self.rpo_alpha >= 0.0 && self.rpo_alpha.is_finite()) {
            bail!(
                "online_dpo.rpo_alpha must be 0 or positive, got {}",
                self.rpo_alpha
            );
        }
        Ok(())
    }
}

impl Default for OnlineDpoConfig {
    fn default() -> Self {
        Self {
            rewards: vec![RewardSpec::task()],
            beta: 0.1,
            loss_type: DpoLoss::Sigmoid,
            rpo_alpha: 0.0,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            discopop_tau: 0.05,
            temperature: 0.9,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            max_new_tokens: 6,
            missing_eos_penalty: None,
            log_completions: 8,
            task_prompts: 4000,
            eval_prompts: 1000,
            packing: false,
        }
    }
}
