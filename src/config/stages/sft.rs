//! `[sft]`: supervised fine-tuning.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    /// Examples drawn from the built-in task when no data is named.
    pub task_examples: usize,
    /// New tokens allowed when answering held-out prompts for accuracy.
    pub eval_max_new_tokens: usize,
    /// Held-out prompts used for accuracy (all of the task's held-out pairs by default).
    pub eval_prompts: usize,
    /// Pack the training examples into rows of `[train] seq_len` positions (TRL's
    /// `packing = true` with best-fit decreasing and padding-free position ids): each
    /// example attends only to itself and its positions restart at 0, so its loss is the one
    /// it has alone, while a batch spends almost no compute on padding. `batch_size` then
    /// counts packed rows, each holding several examples. Held-out evaluation stays unpacked.
    pub packing: bool,
    /// Loss on a prompt-completion record's completion only (TRL's `completion_only_loss`,
    /// its default for such records); false: on the prompt's tokens too. The built-in task's
    /// examples are prompt-completion records.
    pub completion_only_loss: bool,
    /// Loss on a conversation's assistant turns only (TRL's `assistant_only_loss`); false:
    /// on every token of the rendered conversation, as TRL trains by default, and a Jinja
    /// template is rendered once, so one that rewrites earlier turns needs no `{% generation
    /// %}` marks. temper's default differs from TRL's because it finds the assistant's text
    /// without the marks.
    pub assistant_only_loss: bool,
    /// NEFTune (TRL's `neftune_noise_alpha`; its paper uses 5): uniform noise in `[-m, m]`,
    /// `m = alpha / sqrt(T · H)`, on the token embeddings of each training batch `[B, T, H]`.
    /// Held-out losses and generation see none. None: off.
    pub neftune_noise_alpha: Option<f64>,
    /// The per-token loss (TRL's `loss_type`): `nll`, or `dft` (Dynamic Fine-Tuning, Wu et al.
    /// 2025: each token's NLL weighed by its probability, held constant). The held-out loss
    /// stays the NLL either way, so runs compare.
    pub loss_type: SftLoss,
}

/// SFT's per-token loss (TRL's `loss_type` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SftLoss {
    /// `-log p`.
    Nll,
    /// `-p log p` with `p` held constant: the NLL's gradient scaled by the token's
    /// probability.
    Dft,
}

impl SftConfig {
    pub fn validate(&self) -> Result<()> {
        if let Some(a) = self.neftune_noise_alpha {
            if !(a > 0.0 && a.is_finite()) {
                bail!("sft.neftune_noise_alpha must be positive (or absent: off), got {a}");
            }
        }
        Ok(())
    }
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            task_examples: 4000,
            eval_max_new_tokens: 6,
            eval_prompts: 1000,
            packing: false,
            completion_only_loss: true,
            assistant_only_loss: true,
            neftune_noise_alpha: None,
            loss_type: SftLoss::Nll,
        }
    }
}
