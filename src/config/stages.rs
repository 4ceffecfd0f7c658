//! Each stage's own table: `[sft]`, `[reward]`, `[ppo]`, `[dpo]`, `[kto]`, `[online_dpo]`,
//! `[grpo]`, and the reward specs the on-policy stages are scored by.

use std::path::PathBuf;

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
        if self.loss_type.grpo_only() {
            bail!(
                "ppo.loss_type = \"{}\" is one of GRPO's losses; PPO takes bnpo, grpo, dapo or dr_grpo",
                self.loss_type.name()
            );
        }
        super::check_counts(
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

/// A finite number above zero (NaN is not).
pub(crate) fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

/// The lowest sampling temperature taken. Below it sampling is greedy in all but name (as
/// vLLM treats it), and far below it the logits over it overflow: 1e-40 sampled NUL bytes
/// and stopped RL runs at a NaN loss that named nothing.
pub const MIN_TEMPERATURE: f64 = 1e-5;

/// Whether `t` samples: finite and at least [`MIN_TEMPERATURE`].
fn samples_at(t: f64) -> bool {
    t.is_finite() && t >= MIN_TEMPERATURE
}

/// Whether `t` is greedy (0) or samples: what generation takes, from a flag or a model's
/// generation_config.json.
pub fn greedy_or_sampling(t: f64) -> bool {
    t == 0.0 || samples_at(t)
}

/// What [`greedy_or_sampling`] takes, in words.
pub fn greedy_or_sampling_words() -> String {
    format!(
        "0 (greedy) or a finite number of at least {}",
        super::shown_f64(MIN_TEMPERATURE)
    )
}

/// A sampling temperature at least [`MIN_TEMPERATURE`], finite, else the line that says so.
pub(crate) fn check_temperature(key: &str, t: f64) -> Result<()> {
    if !samples_at(t) {
        bail!(
            "{key} must be at least {} and finite, got {}",
            super::shown_f64(MIN_TEMPERATURE),
            super::shown_f64(t)
        );
    }
    Ok(())
}

/// Checks shared by the RL stages' sampling and clipping knobs.
fn check_sampling(stage: &str, temperature: f64, clip: f64, clip_high: Option<f64>) -> Result<()> {
    check_temperature(&format!("{stage}.temperature"), temperature)?;
    if !positive(clip) {
        bail!("{stage}.cliprange must be positive, got {clip}");
    }
    if let Some(h) = clip_high.filter(|h| !positive(*h)) {
        bail!("{stage}.epsilon_high must be positive, got {h}");
    }
    Ok(())
}

/// A rollout's response length: a response of no tokens has nothing to train.
pub(crate) fn check_new_tokens(stage: &str, n: usize) -> Result<()> {
    if n == 0 {
        bail!("{stage}.max_new_tokens must be positive");
    }
    Ok(())
}

/// The sampling filters a stage's rollouts take (`top_k` needs no check).
pub(crate) fn check_filters(stage: &str, top_p: f64, min_p: f64, penalty: f64) -> Result<()> {
    if !(top_p > 0.0 && top_p <= 1.0) {
        bail!("{stage}.top_p must be in (0, 1], got {top_p}");
    }
    if !(0.0..=1.0).contains(&min_p) {
        bail!("{stage}.min_p must be in [0, 1], got {min_p}");
    }
    if !positive(penalty) {
        bail!("{stage}.repetition_penalty must be positive (1: none), got {penalty}");
    }
    Ok(())
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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoConfig {
    pub beta: f64,
    /// Weight of the chosen responses' per-token negative log-likelihood added to the loss
    /// (TRL's `rpo_alpha`, off there; 1.0 here, as Pang et al. use it). Measured on the
    /// built-in task: without it DPO lowered the chosen answers along with the rejected ones
    /// and lost sums SFT had right (seed 1: 0.35 -> 0.38 held-out; with it 0.59).
    pub rpo_alpha: f64,
    /// The preference loss (TRL's `loss_type`, and SimPO), or a list of them (TRL's list:
    /// MPO is `["sigmoid", "bco_pair", "sft"]` with `loss_weights = [0.8, 0.2, 1.0]`), whose
    /// means are summed, each times its weight. `"sft"` in a list is the chosen responses'
    /// per-token NLL, the term `rpo_alpha` adds, so a list naming it needs `rpo_alpha = 0`.
    #[serde(with = "one_or_many")]
    pub loss_type: Vec<DpoLoss>,
    /// The weight of each of `loss_type`'s losses (TRL's `loss_weights`); all 1 when unset.
    pub loss_weights: Option<Vec<f64>>,
    /// The probability that a pair's label is flipped (cDPO's `label_smoothing`): `sigmoid`,
    /// `robust` and `exo_pair` only, below 0.5.
    pub label_smoothing: f64,
    /// SimPO's target margin between the length-normalised rewards (TRL's `simpo_gamma`).
    pub simpo_gamma: f64,
    /// DiscoPOP's temperature of the blend between its logistic and exponential losses
    /// (TRL's `discopop_tau`).
    pub discopop_tau: f64,
    /// The f-divergence between policy and reference that the losses regularise by (f-DPO,
    /// Wang et al.; TRL's `f_divergence_type`): each log-ratio `u` enters the losses as `f(u)`,
    /// `u` itself under `reverse_kl` (DPO), `-exp(-u)` under `forward_kl`, `log sigmoid(u)`
    /// under `js_divergence`, `exp((a - 1) u) / (a - 1)` under `alpha_divergence`. As TRL,
    /// `apo_zero` reads the log-ratios themselves and `aot` the log-probabilities.
    pub f_divergence_type: FDivergence,
    /// `a` of `alpha_divergence` (TRL's `f_alpha_divergence_coef`).
    pub f_alpha_divergence_coef: f64,
    /// LD-DPO (Liu et al., length desensitisation; TRL's `ld_alpha`): in every summed
    /// log-probability, policy's and reference's, the response tokens past the length the
    /// pair's two responses share count `ld_alpha` times, in [0, 1]; unset, all count once.
    pub ld_alpha: Option<f64>,
    /// Pack each micro-batch's chosen and rejected sequences into rows of up to the model's
    /// context, each attending only to itself with positions from 0 (TRL's `padding_free`;
    /// `--padding-free`): the same loss as the padded batch without the padding's compute. A
    /// batch that packing would not shrink stays padded.
    pub padding_free: bool,
    /// Score every pair under the reference once, before training, and drop the reference
    /// (TRL's `precompute_ref_log_probs`): a full fine-tuning then holds no frozen copy of
    /// the model while it trains, and no step runs a reference forward.
    pub precompute_ref_log_probs: bool,
    /// Move the reference towards the policy as it trains (TR-DPO, Gorbatovski et al.; TRL's
    /// `sync_ref_model`; `--sync-ref-model`): after every `ref_model_sync_steps` optimizer
    /// steps the reference becomes `alpha * policy + (1 - alpha) * reference`, alpha =
    /// `ref_model_mixup_alpha`. Full fine-tuning only (under LoRA the reference is the base
    /// the adapters sit on, as TRL refuses it with PEFT), not with precomputed reference
    /// log-probabilities, and for a loss that reads a reference. Checkpoints then keep the
    /// reference (`reference.safetensors`), so a resumed run goes on from the reference it
    /// had, where TRL's resumes from the initial one.
    pub sync_ref_model: bool,
    /// TR-DPO's weight of the policy in each update of the reference (TRL's default, 0.6).
    pub ref_model_mixup_alpha: f64,
    /// WPO (Zhou et al., weighted preference optimisation; TRL's `use_weighting`): each pair's
    /// losses times the product of its two responses' weights, each `exp` of the mean over
    /// its tokens of `log p(y_t) - log sum_v p(v)^2` under the policy, with no gradient, so
    /// that pairs the policy itself would likely sample count more; the chosen NLL
    /// (`rpo_alpha`'s, or a list's `"sft"`) by the batch's mean pair weight. It costs one more
    /// policy forward per step (the fused loss head does not give the sum of squares). Not
    /// with `aot` or `aot_unpaired`, which sort the pairs, as TRL refuses them.
    pub use_weighting: bool,
    /// Optimizer steps between TR-DPO's updates of the reference (TRL's default, 512).
    pub ref_model_sync_steps: usize,
    pub task_pairs: usize,
    pub eval_pairs: usize,
    pub eval_prompts: usize,
    pub eval_max_new_tokens: usize,
}

/// The preference losses of DPO and its relatives, over `h = c - r`, the chosen and rejected
/// responses' log-ratios `c = log pi(y_c) - log ref(y_c)` and `r = log pi(y_r) - log
/// ref(y_r)` of log-probabilities summed over tokens. TRL's names and formulas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpoLoss {
    /// DPO: `-log sigmoid(beta h)`; with label smoothing e, `-(1 - e) log sigmoid(beta h) -
    /// e log sigmoid(-beta h)` (cDPO).
    Sigmoid,
    /// SLiC: `max(0, 1 - beta h)`.
    Hinge,
    /// IPO: `(h - 1 / (2 beta))^2`, with h over log-probabilities averaged per token (as TRL).
    Ipo,
    /// Robust DPO: cDPO's loss made unbiased for flipped labels, `((1 - e) (-log
    /// sigmoid(beta h)) - e (-log sigmoid(-beta h))) / (1 - 2e)`.
    Robust,
    /// SimPO: no reference model; `-log sigmoid(beta (a_c - a_r) - gamma)` with `a` the
    /// policy's log-probability averaged per token.
    Simpo,
    /// ORPO: no reference model; `-beta log sigmoid(log odds_c - log odds_r)` with the odds
    /// `p / (1 - p)` of `p = exp(a)`, `a` as SimPO's. `rpo_alpha` (1) is its SFT term.
    Orpo,
    /// EXO (Ji et al.): the reverse KL from the labels' distribution, smoothed by `e`
    /// (`label_smoothing`, 1e-3 when 0), to the implicit reward's, `s(z) (log s(z) - log(1 -
    /// e)) + s(-z) (log s(-z) - log e)` with `z = beta h` and `s` the sigmoid.
    #[serde(rename = "exo_pair")]
    ExoPair,
    /// NCA (Chen et al.): each response's reward against zero, `-log s(beta c) - log s(-beta
    /// c) / 2 - log s(-beta r) / 2`.
    #[serde(rename = "nca_pair")]
    NcaPair,
    /// Hard-label SPPO: each log-ratio regressed to its target, `(c - 1 / (2 beta))^2 + (r +
    /// 1 / (2 beta))^2`.
    #[serde(rename = "sppo_hard")]
    SppoHard,
    /// APO-zero (Anchored Preference Optimisation), for chosen responses better than the
    /// model's own: `1 - s(beta c) + s(beta r)`.
    #[serde(rename = "apo_zero")]
    ApoZero,
    /// APO-down, for chosen responses worse than the model's own: `s(beta c) + 1 - s(beta h)`.
    #[serde(rename = "apo_down")]
    ApoDown,
    /// DiscoPOP (Chris Lu et al.), found by an LLM-driven search: the logistic loss and
    /// `exp(-z)` blended by `s(z / tau)`, `z = beta h`, `tau` = `discopop_tau`.
    Discopop,
    /// BCO on pairs (Jung et al.): each response's reward classified against a shift `d`,
    /// `-log s(beta c - d) - log s(-(beta r - d))`, `d` the running mean of the training
    /// batches' mean rewards `beta c` and `beta r`, this batch's included (TRL's
    /// RunningMoments). DPO only: the shift is the run's state, kept in its checkpoints.
    #[serde(rename = "bco_pair")]
    BcoPair,
    /// The chosen responses' per-token NLL (TRL's `"sft"`), in a list of losses: the term
    /// `rpo_alpha` adds to any of them.
    Sft,
    /// DPO's sigmoid loss over log-ratios averaged per token (TRL's `sigmoid_norm`).
    #[serde(rename = "sigmoid_norm")]
    SigmoidNorm,
    /// AOT (Melnyk et al., alignment via optimal transport), paired: the batch's policy
    /// margins `logp_c - logp_r` and the reference's, each sorted, their differences under
    /// DPO's smoothed sigmoid loss.
    Aot,
    /// AOT unpaired: the batch's chosen log-ratios and rejected log-ratios, each sorted.
    #[serde(rename = "aot_unpaired")]
    AotUnpaired,
}

/// `[dpo] f_divergence_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FDivergence {
    ReverseKl,
    ForwardKl,
    JsDivergence,
    AlphaDivergence,
}

/// `loss_type` as one name or a list of names (TRL takes either).
mod one_or_many {
    use serde::de::{Error, IntoDeserializer};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::DpoLoss;

    /// Names first, each parsed on its own: an untagged enum of losses would answer a
    /// misspelt one with "did not match any variant" instead of the names it takes.
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a loss name or a list of loss names")]
    enum Given {
        One(String),
        Many(Vec<String>),
    }

    fn parse<E: Error>(name: &str) -> Result<DpoLoss, E> {
        let d: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
            name.into_deserializer();
        DpoLoss::deserialize(d).map_err(E::custom)
    }

    pub fn serialize<S: Serializer>(v: &[DpoLoss], s: S) -> Result<S::Ok, S::Error> {
        match v {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<DpoLoss>, D::Error> {
        match Given::deserialize(d)? {
            Given::One(one) => Ok(vec![parse(&one)?]),
            Given::Many(many) => many.iter().map(|n| parse(n)).collect(),
        }
    }
}

impl DpoLoss {
    /// The name `[dpo] loss_type` takes.
    pub fn name(self) -> &'static str {
        match self {
            DpoLoss::Sigmoid => "sigmoid",
            DpoLoss::Hinge => "hinge",
            DpoLoss::Ipo => "ipo",
            DpoLoss::Robust => "robust",
            DpoLoss::Simpo => "simpo",
            DpoLoss::Orpo => "orpo",
            DpoLoss::ExoPair => "exo_pair",
            DpoLoss::NcaPair => "nca_pair",
            DpoLoss::SppoHard => "sppo_hard",
            DpoLoss::ApoZero => "apo_zero",
            DpoLoss::ApoDown => "apo_down",
            DpoLoss::Discopop => "discopop",
            DpoLoss::BcoPair => "bco_pair",
            DpoLoss::Sft => "sft",
            DpoLoss::SigmoidNorm => "sigmoid_norm",
            DpoLoss::Aot => "aot",
            DpoLoss::AotUnpaired => "aot_unpaired",
        }
    }

    /// Whether the loss reads the frozen reference (SimPO, ORPO and the NLL do not).
    pub fn needs_reference(self) -> bool {
        !matches!(self, DpoLoss::Simpo | DpoLoss::Orpo | DpoLoss::Sft)
    }

    /// Whether `label_smoothing` applies to the loss.
    pub fn smooths(self) -> bool {
        matches!(
            self,
            DpoLoss::Sigmoid
                | DpoLoss::Robust
                | DpoLoss::ExoPair
                | DpoLoss::Aot
                | DpoLoss::AotUnpaired
        )
    }

    /// Whether the loss reads per-token averages rather than sums of log-probabilities.
    pub fn per_token(self) -> bool {
        matches!(
            self,
            DpoLoss::Ipo | DpoLoss::Simpo | DpoLoss::Orpo | DpoLoss::SigmoidNorm
        )
    }
}

impl DpoConfig {
    /// Each loss with its weight.
    pub fn losses(&self) -> impl Iterator<Item = (DpoLoss, f64)> + '_ {
        let weight = |i: usize| self.loss_weights.as_ref().map_or(1.0, |w| w[i]);
        self.loss_type
            .iter()
            .enumerate()
            .map(move |(i, &l)| (l, weight(i)))
    }

    /// Whether the list names `loss`.
    pub fn has(&self, loss: DpoLoss) -> bool {
        self.loss_type.contains(&loss)
    }

    /// Whether any of the losses reads the frozen reference.
    pub fn needs_reference(&self) -> bool {
        self.loss_type.iter().any(|l| l.needs_reference())
    }

    /// The losses' names, joined by `+`.
    pub fn loss_names(&self) -> String {
        let names: Vec<&str> = self.loss_type.iter().map(|l| l.name()).collect();
        names.join(" + ")
    }

    /// The weight of the listed `"sft"` term (0 when not listed).
    pub fn sft_weight(&self) -> f64 {
        self.losses()
            .filter(|(l, _)| *l == DpoLoss::Sft)
            .map(|(_, w)| w)
            .sum()
    }

    pub fn validate(&self) -> Result<()> {
        self.validate_as("dpo")?;
        if !(self.ref_model_mixup_alpha > 0.0 && self.ref_model_mixup_alpha <= 1.0) {
            bail!(
                "dpo.ref_model_mixup_alpha must be in (0, 1], got {}",
                self.ref_model_mixup_alpha
            );
        }
        if self.ref_model_sync_steps == 0 {
            bail!("dpo.ref_model_sync_steps must be at least 1");
        }
        if self.sync_ref_model && self.precompute_ref_log_probs {
            bail!(
                "dpo.sync_ref_model moves the reference as the policy trains, so its \
                 log-probabilities cannot be precomputed: set one of sync_ref_model and \
                 precompute_ref_log_probs to false"
            );
        }
        if self.use_weighting
            && self
                .loss_type
                .iter()
                .any(|l| matches!(l, DpoLoss::Aot | DpoLoss::AotUnpaired))
        {
            bail!(
                "dpo.use_weighting weighs each pair's loss, and aot and aot_unpaired sort the \
                 pairs' margins, which would misalign the weights (as TRL refuses them)"
            );
        }
        if self.sync_ref_model && !self.needs_reference() {
            bail!(
                "dpo.sync_ref_model: loss_type {} reads no reference to sync",
                self.loss_names()
            );
        }
        Ok(())
    }

    /// The loss's checks, errors naming the keys under `table` (online DPO's table holds
    /// the same keys).
    pub fn validate_as(&self, table: &str) -> Result<()> {
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            bail!("{table}.beta must be positive, got {}", self.beta);
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            bail!(
                "{table}.label_smoothing must be in [0, 0.5), got {}",
                self.label_smoothing
            );
        }
        if self.label_smoothing > 0.0 && !self.loss_type.iter().any(|l| l.smooths()) {
            bail!(
                "{table}.label_smoothing applies to loss_type \"sigmoid\", \"robust\", \"exo_pair\", \"aot\" and \"aot_unpaired\", not {}",
                self.loss_names()
            );
        }
        if self.loss_type.is_empty() {
            bail!("{table}.loss_type names no loss");
        }
        for (i, l) in self.loss_type.iter().enumerate() {
            if self.loss_type[..i].contains(l) {
                bail!("{table}.loss_type names \"{}\" twice", l.name());
            }
        }
        if let Some(w) = &self.loss_weights {
            if w.len() != self.loss_type.len() {
                bail!(
                    "{table}.loss_weights has {} weights for {} loss types",
                    w.len(),
                    self.loss_type.len()
                );
            }
            if let Some(bad) = w.iter().find(|w| !(**w >= 0.0 && w.is_finite())) {
                bail!("{table}.loss_weights must be 0 or positive, got {bad}");
            }
        }
        if self.f_divergence_type != FDivergence::ReverseKl && !self.needs_reference() {
            bail!(
                "{table}.f_divergence_type: loss_type {} reads no reference to diverge from",
                self.loss_names()
            );
        }
        if let Some(a) = self.ld_alpha.filter(|a| !(0.0..=1.0).contains(a)) {
            bail!("{table}.ld_alpha must be in [0, 1], got {a}");
        }
        if !self.f_alpha_divergence_coef.is_finite() {
            bail!("{table}.f_alpha_divergence_coef must be finite");
        }
        if self.has(DpoLoss::Sft) && self.rpo_alpha != 0.0 {
            bail!(
                "{table}.loss_type lists \"sft\", the chosen responses' NLL that rpo_alpha (1 by \
                 default here) also adds: set rpo_alpha = 0, or drop \"sft\" and set rpo_alpha \
                 to its weight"
            );
        }
        if !self.simpo_gamma.is_finite() {
            bail!("{table}.simpo_gamma must be finite");
        }
        if !(self.discopop_tau > 0.0 && self.discopop_tau.is_finite()) {
            bail!(
                "{table}.discopop_tau must be positive, got {}",
                self.discopop_tau
            );
        }
        Ok(())
    }
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            rpo_alpha: 1.0,
            loss_type: vec![DpoLoss::Sigmoid],
            loss_weights: None,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            discopop_tau: 0.05,
            f_divergence_type: FDivergence::ReverseKl,
            f_alpha_divergence_coef: 0.5,
            ld_alpha: None,
            padding_free: false,
            precompute_ref_log_probs: false,
            sync_ref_model: false,
            ref_model_mixup_alpha: 0.6,
            use_weighting: false,
            ref_model_sync_steps: 512,
            task_pairs: 4000,
            eval_pairs: 200,
            eval_prompts: 1000,
            eval_max_new_tokens: 6,
        }
    }
}

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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    pub rewards: Vec<RewardSpec>,
    pub group_size: usize,
    pub prompts_per_rollout: usize,
    pub epochs: usize,
    pub minibatch_size: usize,
    /// How the group's scores become advantages.
    pub advantage_estimator: AdvantageEstimator,
    /// What `group_norm` divides by (TRL's `scale_rewards`).
    pub scale_rewards: ScaleRewards,
    /// The KL coefficient, where [`GrpoConfig::kl_place`] puts it: a k3 term in the loss
    /// (GRPO), `beta` times each response's summed k1 KL off its score (RLOO), or for
    /// REINFORCE++ a k1 penalty in the per-token reward. At 0 (TRL's default, DAPO's and Dr.
    /// GRPO's choice) no reference is loaded or run, and no KL is reported.
    pub beta: f64,
    /// The KL in each response's reward rather than in the loss (ms-swift's `kl_in_reward`):
    /// unset, in the reward for `rloo` (as TRL's RLOOTrainer and OpenRLHF put it) and in the
    /// loss for `group_norm`; `reinforce_plus_plus` always has it in its per-token reward.
    pub kl_in_reward: Option<bool>,
    pub cliprange: f64,
    /// Upper clip range of the ratio (DAPO's clip-higher; TRL's `epsilon_high`).
    pub epsilon_high: Option<f64>,
    /// Two-sided clipping (TRL's `delta`, from INTELLECT-2): the unclipped ratio is capped
    /// at `delta` as well, so a token the policy now makes far likelier cannot carry a
    /// negative advantage's loss without bound. Above `1 + epsilon_high`; none: off.
    pub delta: Option<f64>,
    /// What the clipped ratio is taken over (TRL's `importance_sampling_level`): each token
    /// (GRPO), or each response as a whole (GSPO).
    pub importance_sampling_level: ImportanceSamplingLevel,
    pub temperature: f64,
    /// Sampling filters of the rollouts (TRL's `top_k` and `top_p`; 0 and 1: off). The
    /// ratios' old log-probabilities stay those of the full tempered softmax, as TRL computes
    /// them.
    pub top_k: usize,
    pub top_p: f64,
    /// TRL's `min_p`: tokens less likely than this share of the most likely one are not
    /// drawn (0: off), after top-k and top-p, as transformers orders them.
    pub min_p: f64,
    /// TRL's `repetition_penalty` (1: off): a token already in the prompt or the response so
    /// far has its logit divided by it where positive and multiplied where negative, before
    /// the temperature, as transformers and vLLM do. The old log-probabilities stay the
    /// tempered softmax's, as with top-k and top-p.
    pub repetition_penalty: f64,
    pub max_new_tokens: usize,
    pub eps: f64,
    pub loss_type: LossType,
    /// SAPO's gate temperature for tokens with a positive advantage (TRL's
    /// `sapo_temperature_pos`).
    pub sapo_temperature_pos: f64,
    /// SAPO's gate temperature for the others (TRL's `sapo_temperature_neg`).
    pub sapo_temperature_neg: f64,
    /// VESPO's power `k` of the sequence ratio where the advantage is not negative (TRL's
    /// `vespo_k_pos`): how hard a response the policy now finds less likely is down-weighted.
    pub vespo_k_pos: f64,
    /// VESPO's decay `lambda` there (TRL's `vespo_lambda_pos`): how hard one it finds likelier.
    pub vespo_lambda_pos: f64,
    /// VESPO's `k` and `lambda` where the advantage is negative (TRL's `vespo_k_neg`,
    /// `vespo_lambda_neg`).
    pub vespo_k_neg: f64,
    pub vespo_lambda_neg: f64,
    /// DeepSeek-V3.2's off-policy sequence mask (TRL's `off_policy_mask_threshold`): a
    /// response with a negative advantage whose mean `log pi_old - log pi` over its tokens
    /// exceeds this carries no policy loss. None: off.
    pub off_policy_mask_threshold: Option<f64>,
    /// The KL term's importance-sampling correction (TRL's `use_bias_correction_kl`, from
    /// DeepSeek-V3.2): each token's k3 KL is multiplied by the policy's ratio to the rollout's.
    pub use_bias_correction_kl: bool,
    /// Keep the policy loss only on this top fraction of the minibatch's response tokens by
    /// the policy's entropy there (TRL's `top_entropy_quantile`, rho of "Beyond the 80/20
    /// Rule", which recommends 0.2): 1 keeps all, 0 the highest alone. Over every rank's
    /// tokens, truncated responses left out where they carry no loss.
    pub top_entropy_quantile: f64,
    /// The weight of an entropy bonus, the mean entropy of the tokens that carry the policy
    /// loss, subtracted from the loss (TRL's `entropy_coef`).
    pub entropy_coef: f64,
    /// Skywork-OR1's adaptive entropy control (TRL's `use_adaptive_entropy`): after each
    /// optimizer step `entropy_coef` moves `entropy_coef_delta` up when that step's mean
    /// entropy was at most `entropy_target` and down otherwise, within `entropy_coef_min` and
    /// `entropy_coef_max`, and the bonus applies only in steps after one at or below target.
    pub use_adaptive_entropy: bool,
    pub entropy_coef_min: f64,
    pub entropy_coef_max: f64,
    pub entropy_coef_delta: f64,
    /// Nats; TRL's default 0.2 triggers only near collapse, so set it near the entropy
    /// observed early in training.
    pub entropy_target: f64,
    /// How several rewards become one (TRL's `multi_objective_aggregation`).
    pub multi_objective_aggregation: MultiObjective,
    /// Each response's score clipped to `[min, max]` before its advantage is formed (TRL's
    /// RLOO `reward_clip_range`). None: off.
    pub reward_clip_range: Option<[f64; 2]>,
    /// The advantages normalised over the whole rollout (every rank's scored responses) to
    /// mean 0 and std 1 (TRL's RLOO `normalize_advantages`); not for `reinforce_plus_plus`,
    /// which whitens its own.
    pub normalize_advantages: bool,
    /// Move the reference towards the policy as it trains (TR-DPO's update, TRL's
    /// `sync_ref_model`), as `[dpo] sync_ref_model` does: needs a reference (beta > 0) and
    /// full fine-tuning.
    pub sync_ref_model: bool,
    pub ref_model_mixup_alpha: f64,
    pub ref_model_sync_steps: usize,
    /// Responses cut off by `max_new_tokens` carry no loss (TRL's
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
    /// (OpenRLHF's `--packing_samples`), as `[ppo] packing` does.
    pub packing: bool,
}

/// How GRPO combines several reward sources (TRL's `multi_objective_aggregation`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MultiObjective {
    /// Sum the weighted scores, then form advantages from the sum.
    #[default]
    SumThenNormalize,
    /// GDPO (group reward-decoupled normalisation): normalise each source's scores within
    /// each group, `(r - mean) / (std + eps)`, sum them weighted, then normalise the sum over
    /// the whole batch. `scale_rewards` does not apply.
    NormalizeThenSum,
}

/// Critic-free advantage estimators over the `group_size` samples of each prompt, named as
/// OpenRLHF's `--advantage_estimator` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum AdvantageEstimator {
    /// GRPO: `(r - mean_group) / scale`, the same for every token of the response.
    GroupNorm,
    /// RLOO: `r - mean of the other samples of the group` (leave-one-out baseline).
    Rloo,
    /// REINFORCE++: per-token reward `-beta * KL_t` plus the score at the last token,
    /// reward-to-go, whitened over the whole batch; no group baseline.
    #[serde(alias = "reinforce++")]
    ReinforcePlusPlus,
}

/// Where the grpo stage's KL to the reference acts ([`GrpoConfig::kl_place`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KlPlace {
    /// `beta` times the k3 estimate at each token, averaged into the loss as the policy loss
    /// is (GRPO, TRL's GRPOTrainer).
    Loss,
    /// `beta` times the response's summed k1 estimate `sum_t (log pi_old - log pi_ref)`
    /// taken off its score before the advantages are formed (TRL's RLOOTrainer).
    SequenceReward,
    /// `-beta` times the k1 estimate at each token in the per-token reward (REINFORCE++).
    TokenReward,
}

/// What GRPO's group-normalised advantage is divided by (TRL's `scale_rewards`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleRewards {
    /// The group's standard deviation (GRPO).
    Group,
    /// The whole batch's standard deviation.
    Batch,
    /// Nothing: `r - mean_group` (Dr. GRPO).
    None,
}

/// Where the policy's importance ratio against the rollout's is taken (TRL's
/// `importance_sampling_level`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lowercase")]
pub enum ImportanceSamplingLevel {
    /// Per token: `pi(y_t) / pi_old(y_t)`, clipped token by token (PPO, GRPO).
    #[default]
    Token,
    /// Per response (GSPO, Zheng et al. 2025): the geometric mean of the response's token
    /// ratios, `exp(mean_t log(pi / pi_old))`, one ratio clipped for the whole response. Its
    /// spread is far narrower than a token's: GSPO clips at 3e-4 below and 4e-4 above.
    Sequence,
}

/// How per-token policy losses are averaged (TRL's `loss_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossType {
    /// Over the minibatch's valid tokens.
    #[serde(alias = "token")]
    Bnpo,
    /// Over each response's tokens, then over responses.
    #[serde(alias = "sequence")]
    Grpo,
    /// Over all valid tokens of the optimizer step (every accumulated minibatch).
    Dapo,
    /// Summed over the minibatch's valid tokens and divided by its responses times
    /// `max_new_tokens` (Dr. GRPO): a constant, so a response's length does not set how much
    /// each of its tokens weighs.
    #[serde(rename = "dr_grpo")]
    DrGrpo,
    /// GRPO only. CISPO (MiniMax-M1): `-min(r, epsilon_high) A log pi` with the clipped ratio
    /// held constant, so every token keeps a gradient; `epsilon_high` caps the ratio itself
    /// (ScaleRL recommends 5). Averaged as `dapo`.
    Cispo,
    /// GRPO only. SAPO (soft adaptive policy optimisation): a smooth gate
    /// `-sigmoid(tau (r - 1)) 4 / tau A` in place of the hard clip, `tau` per the advantage's
    /// sign (`sapo_temperature_pos` / `_neg`). Averaged as `grpo`.
    Sapo,
    /// GRPO only. LUSPO (length-unbiased GSPO): the clipped surrogate summed over each
    /// response's tokens, then averaged over responses; with `importance_sampling_level =
    /// "sequence"`, as its paper sets it, each response's loss times its length.
    Luspo,
    /// GRPO only. VESPO: `-phi(w) A log pi` with `phi(w) = e^lambda w^k e^(-lambda w)` of the
    /// response's whole ratio `w` (the product of its tokens'), held constant; `k` and
    /// `lambda` per the advantage's sign (`vespo_*`). Averaged as `dapo`.
    Vespo,
}

impl LossType {
    /// TRL's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bnpo => "bnpo",
            Self::Grpo => "grpo",
            Self::Dapo => "dapo",
            Self::DrGrpo => "dr_grpo",
            Self::Cispo => "cispo",
            Self::Sapo => "sapo",
            Self::Luspo => "luspo",
            Self::Vespo => "vespo",
        }
    }

    /// Whether it divides by the valid tokens of the whole optimizer step.
    pub fn per_step_tokens(self) -> bool {
        matches!(self, Self::Dapo | Self::Cispo | Self::Vespo)
    }

    /// Whether only GRPO's stage takes it (TRL's GRPOTrainer's newer losses).
    pub fn grpo_only(self) -> bool {
        matches!(self, Self::Cispo | Self::Sapo | Self::Luspo | Self::Vespo)
    }
}

impl GrpoConfig {
    pub fn validate(&self) -> Result<()> {
        check_sampling("grpo", self.temperature, self.cliprange, self.epsilon_high)?;
        if !(self.beta >= 0.0 && self.beta.is_finite()) {
            bail!("grpo.beta must be 0 or positive, got {}", self.beta);
        }
        check_filters("grpo", self.top_p, self.min_p, self.repetition_penalty)?;
        if let Some(delta) = self.delta {
            let high = 1.0 + self.epsilon_high.unwrap_or(self.cliprange);
            if !(delta > high && delta.is_finite()) {
                bail!(
                    "grpo.delta caps the unclipped ratio, so it must exceed the clipped one's \
                     upper bound 1 + epsilon_high (or 1 + cliprange) = {high}, got {delta}"
                );
            }
        }
        if self.importance_sampling_level == ImportanceSamplingLevel::Sequence
            && self.advantage_estimator == AdvantageEstimator::ReinforcePlusPlus
        {
            bail!(
                "grpo.importance_sampling_level = \"sequence\" weighs a response by one ratio, \
                 which needs one advantage per response; reinforce_plus_plus gives each token \
                 its own (use group_norm or rloo)"
            );
        }
        if self.group_size < 2 {
            bail!(
                "grpo.group_size must be at least 2 (a group baseline needs two samples), got {}",
                self.group_size
            );
        }
        super::check_counts(
            "grpo",
            &[
                ("prompts_per_rollout", self.prompts_per_rollout),
                ("minibatch_size", self.minibatch_size),
                ("epochs", self.epochs),
            ],
        )?;
        check_new_tokens("grpo", self.max_new_tokens)?;
        // A group whose scores tie has std 0: eps keeps its advantages 0, not 0 / 0.
        if !positive(self.eps) {
            bail!("grpo.eps must be positive (TRL's 1e-4), got {}", self.eps);
        }
        self.validate_losses()?;
        self.validate_entropy()?;
        self.validate_reference()
    }

    fn validate_losses(&self) -> Result<()> {
        match self.loss_type {
            LossType::Cispo if self.epsilon_high.is_none() => bail!(
                "grpo.loss_type = \"cispo\" caps the ratio itself at grpo.epsilon_high, which \
                 is unset (ScaleRL recommends 5.0)"
            ),
            LossType::Vespo if self.importance_sampling_level != ImportanceSamplingLevel::Token => {
                bail!(
                    "grpo.loss_type = \"vespo\" weighs each response by its own whole ratio; \
                     grpo.importance_sampling_level must stay \"token\""
                )
            }
            _ => {}
        }
        for (name, t) in [
            ("sapo_temperature_pos", self.sapo_temperature_pos),
            ("sapo_temperature_neg", self.sapo_temperature_neg),
        ] {
            if !positive(t) {
                bail!("grpo.{name} must be positive, got {t}");
            }
        }
        let ks = [self.vespo_k_pos, self.vespo_k_neg];
        let lambdas = [self.vespo_lambda_pos, self.vespo_lambda_neg];
        if !ks.iter().all(|k| k.is_finite() && *k >= 0.0) || !lambdas.iter().all(|&l| positive(l)) {
            bail!(
                "grpo.vespo_k_pos and vespo_k_neg must be 0 or more, vespo_lambda_pos and \
                 vespo_lambda_neg positive"
            );
        }
        if self.off_policy_mask_threshold.is_some_and(|t| !positive(t)) {
            bail!("grpo.off_policy_mask_threshold must be positive (DeepSeek-V3.2 uses values like 0.5)");
        }
        if let Some([lo, hi]) = self.reward_clip_range {
            if !(lo < hi && lo.is_finite() && hi.is_finite()) {
                bail!("grpo.reward_clip_range must be [min, max] with min < max, got [{lo}, {hi}]");
            }
        }
        if self.normalize_advantages
            && self.advantage_estimator == AdvantageEstimator::ReinforcePlusPlus
        {
            bail!(
                "grpo.normalize_advantages: reinforce_plus_plus whitens its advantages already \
                 (use group_norm or rloo)"
            );
        }
        if self.use_bias_correction_kl && self.kl_place() != KlPlace::Loss {
            bail!(
                "grpo.use_bias_correction_kl corrects a KL term in the loss, and this run's KL \
                 is in the reward (rloo and reinforce_plus_plus put it there; kl_in_reward = \
                 false moves rloo's)"
            );
        }
        match (self.advantage_estimator, self.kl_in_reward) {
            (AdvantageEstimator::ReinforcePlusPlus, Some(false)) => bail!(
                "grpo.kl_in_reward = false: reinforce_plus_plus has its KL in the per-token \
                 reward (use group_norm or rloo for a KL term in the loss)"
            ),
            (_, Some(true))
                if self.multi_objective_aggregation == MultiObjective::NormalizeThenSum =>
            {
                bail!(
                    "grpo.kl_in_reward = true: multi_objective_aggregation = \"normalize_then_sum\" \
                     normalises each source's scores, so a KL taken off the summed reward would \
                     not reach the advantages (leave kl_in_reward unset)"
                )
            }
            _ => {}
        }
        if self.multi_objective_aggregation == MultiObjective::NormalizeThenSum
            && self.advantage_estimator != AdvantageEstimator::GroupNorm
        {
            bail!(
                "grpo.multi_objective_aggregation = \"normalize_then_sum\" forms group-normalised \
                 advantages itself; it needs advantage_estimator = \"group_norm\""
            );
        }
        Ok(())
    }

    fn validate_entropy(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.top_entropy_quantile) {
            bail!(
                "grpo.top_entropy_quantile must be in [0, 1], got {}",
                self.top_entropy_quantile
            );
        }
        let (lo, hi) = (self.entropy_coef_min, self.entropy_coef_max);
        let finite = [
            self.entropy_coef,
            lo,
            hi,
            self.entropy_coef_delta,
            self.entropy_target,
        ];
        if !finite.iter().all(|x| x.is_finite()) {
            bail!("grpo.entropy_coef and its adaptive control's bounds, step and target must be finite");
        }
        if self.use_adaptive_entropy && !(lo <= hi && self.entropy_coef_delta >= 0.0) {
            bail!(
                "grpo.use_adaptive_entropy needs entropy_coef_min <= entropy_coef_max and \
                 entropy_coef_delta >= 0, got {lo}, {hi} and {}",
                self.entropy_coef_delta
            );
        }
        Ok(())
    }

    fn validate_reference(&self) -> Result<()> {
        if !(self.ref_model_mixup_alpha > 0.0 && self.ref_model_mixup_alpha <= 1.0) {
            bail!(
                "grpo.ref_model_mixup_alpha must be in (0, 1], got {}",
                self.ref_model_mixup_alpha
            );
        }
        if self.ref_model_sync_steps == 0 {
            bail!("grpo.ref_model_sync_steps must be at least 1");
        }
        if self.sync_ref_model && self.beta == 0.0 {
            bail!(
                "grpo.sync_ref_model: with beta = 0 no reference is loaded, so there is none to \
                 sync (set beta above 0, or sync_ref_model = false)"
            );
        }
        Ok(())
    }

    /// Where the KL to the reference acts: `kl_in_reward`, else the estimator's own place.
    pub fn kl_place(&self) -> KlPlace {
        match (self.advantage_estimator, self.kl_in_reward) {
            (AdvantageEstimator::ReinforcePlusPlus, _) => KlPlace::TokenReward,
            (_, Some(true)) | (AdvantageEstimator::Rloo, None) => KlPlace::SequenceReward,
            (AdvantageEstimator::GroupNorm, None) | (_, Some(false)) => KlPlace::Loss,
        }
    }

    /// Writes where the KL acts into `kl_in_reward`, so that config.toml records it and a
    /// resume keeps it. A `resumed` rloo run whose config.toml does not say began before rloo
    /// took its KL off the score, and keeps it in the loss as it trained: true then.
    pub fn record_kl_place(&mut self, resumed: bool) -> bool {
        if self.kl_in_reward.is_some()
            || self.advantage_estimator == AdvantageEstimator::ReinforcePlusPlus
        {
            return false;
        }
        let before_the_move = resumed && self.advantage_estimator == AdvantageEstimator::Rloo;
        self.kl_in_reward = Some(!before_the_move && self.kl_place() == KlPlace::SequenceReward);
        before_the_move
    }

    /// Whether a step needs the policy's entropy at each response token.
    pub fn needs_entropy(&self) -> bool {
        self.top_entropy_quantile < 1.0 || self.entropy_bonus()
    }

    /// Whether the loss carries an entropy bonus (always under adaptive control, whose
    /// coefficient may come back from 0).
    pub fn entropy_bonus(&self) -> bool {
        self.entropy_coef != 0.0 || self.use_adaptive_entropy
    }
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            rewards: vec![RewardSpec::task()],
            group_size: 8,
            prompts_per_rollout: 32,
            epochs: 1,
            minibatch_size: 64,
            advantage_estimator: AdvantageEstimator::GroupNorm,
            scale_rewards: ScaleRewards::Group,
            beta: 0.04,
            kl_in_reward: None,
            cliprange: 0.2,
            epsilon_high: None,
            delta: None,
            importance_sampling_level: ImportanceSamplingLevel::Token,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            max_new_tokens: 6,
            eps: 1e-4,
            loss_type: LossType::Bnpo,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            vespo_k_pos: 2.0,
            vespo_lambda_pos: 3.0,
            vespo_k_neg: 3.0,
            vespo_lambda_neg: 2.0,
            off_policy_mask_threshold: None,
            use_bias_correction_kl: false,
            top_entropy_quantile: 1.0,
            entropy_coef: 0.0,
            use_adaptive_entropy: false,
            entropy_coef_min: 0.0,
            entropy_coef_max: 1.0,
            entropy_coef_delta: 0.005,
            entropy_target: 0.2,
            multi_objective_aggregation: MultiObjective::SumThenNormalize,
            reward_clip_range: None,
            normalize_advantages: false,
            sync_ref_model: false,
            ref_model_mixup_alpha: 0.6,
            ref_model_sync_steps: 512,
            mask_truncated_completions: false,
            log_completions: 8,
            task_prompts: 4000,
            eval_prompts: 1000,
            packing: false,
        }
    }
}

/// Where one term of the sequence score comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum RewardSource {
    /// The task's programmatic checker: 1 for an exact answer, 0 otherwise.
    Task,
    /// A reward-model checkpoint or run directory.
    Model(PathBuf),
    /// A long-lived process (`sh -c` of the command line) answering JSON lines.
    Command(String),
    /// An HTTP endpoint answering the same payloads, POSTed as a JSON array per batch.
    Http(String),
}

/// How temper treats user-defined reward processes and endpoints (`[external_reward]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExternalRewardConfig {
    /// Seconds a batch may take before the reward counts as hung.
    pub timeout_s: f64,
    /// How often a process that died or hung is restarted (the batch is retried) before the
    /// run stops.
    pub max_restarts: usize,
}

impl Default for ExternalRewardConfig {
    fn default() -> Self {
        Self {
            timeout_s: 60.0,
            max_restarts: 2,
        }
    }
}

/// One weighted term of the sequence score, written `task[:W]` or `PATH[:W]` on the command
/// line and in config files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RewardSpec {
    pub source: RewardSource,
    pub weight: f64,
}

impl RewardSpec {
    pub fn task() -> Self {
        Self {
            source: RewardSource::Task,
            weight: 1.0,
        }
    }

    /// The first reward model of a list, from which PPO's value model is initialised.
    pub fn first_model(specs: &[RewardSpec]) -> Option<&PathBuf> {
        specs.iter().find_map(|s| match &s.source {
            RewardSource::Model(p) => Some(p),
            _ => None,
        })
    }
}

impl std::str::FromStr for RewardSpec {
    type Err = anyhow::Error;

    fn from_str(spec: &str) -> Result<Self> {
        let (name, weight) = split_weight(spec);
        if !weight.is_finite() {
            bail!("--reward {spec}: weight must be finite");
        }
        if name.is_empty() {
            bail!("--reward {spec}: names no reward (use task, cmd:PROGRAM, http://HOST:PORT/PATH or a reward model's directory)");
        }
        // `task:` with a weight that is not a number was read as a model directory named
        // "task:abc", and refused as a missing checkpoint.
        if let Some(w) = name.strip_prefix("task:") {
            bail!("--reward {spec}: the weight `{w}` is not a number (task[:W], e.g. task:0.5)");
        }
        let source = if name == "task" {
            RewardSource::Task
        } else if let Some(cmd) = name.strip_prefix("cmd:") {
            if cmd.trim().is_empty() {
                bail!("--reward {spec}: cmd: names no program");
            }
            RewardSource::Command(cmd.to_string())
        } else if name.starts_with("http://") {
            RewardSource::Http(name.to_string())
        } else if name.starts_with("https://") {
            bail!("--reward {spec}: https is not supported; serve the reward over http on this machine (or a proxy to it)");
        } else {
            RewardSource::Model(PathBuf::from(name))
        };
        Ok(Self { source, weight })
    }
}

/// `NAME[:W]` -> (NAME, W), W = 1 when absent. In a URL, a number after the last colon is the
/// port unless a path follows the host (`http://h:8000` is a port, `http://h:8000/r:2` a
/// weight).
fn split_weight(spec: &str) -> (&str, f64) {
    let Some((name, w)) = spec.rsplit_once(':') else {
        return (spec, 1.0);
    };
    let Ok(weight) = w.parse::<f64>() else {
        return (spec, 1.0);
    };
    let is_port = name
        .strip_prefix("http://")
        .is_some_and(|rest| !rest.contains('/'));
    if is_port {
        (spec, 1.0)
    } else {
        (name, weight)
    }
}

impl TryFrom<String> for RewardSpec {
    type Error = anyhow::Error;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<RewardSpec> for String {
    fn from(r: RewardSpec) -> String {
        r.to_string()
    }
}

impl std::fmt::Display for RewardSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            RewardSource::Task => write!(f, "task:{}", self.weight),
            RewardSource::Model(p) => write!(f, "{}:{}", p.display(), self.weight),
            RewardSource::Command(c) => write!(f, "cmd:{c}:{}", self.weight),
            RewardSource::Http(u) => write!(f, "{u}:{}", self.weight),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::assert_refuses;

    /// WPO reads TRL's name and refuses the losses that sort the pairs.
    #[test]
    fn dpo_reads_use_weighting_and_refuses_it_with_sorted_losses() {
        let c: DpoConfig = toml::from_str("use_weighting = true").unwrap();
        assert!(c.use_weighting);
        c.validate().unwrap();
        for loss in [DpoLoss::Aot, DpoLoss::AotUnpaired] {
            let e = DpoConfig {
                use_weighting: true,
                loss_type: vec![DpoLoss::Sigmoid, loss],
                ..DpoConfig::default()
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("dpo.use_weighting") && !e.contains('\n') && !e.contains("  "),
                "{e}"
            );
        }
    }

    #[test]
    fn ppo_and_grpo_refuse_coefficients_out_of_their_range() {
        PpoConfig::default().validate().unwrap();
        let bad = |f, field| assert_refuses(PpoConfig::validate, "ppo", f, field);
        bad(|c| c.max_new_tokens = 0, "max_new_tokens");
        bad(|c| c.kl_coef = -1.0, "kl_coef");
        bad(|c| c.vf_coef = f64::NAN, "vf_coef");
        bad(|c| c.cliprange_value = -1.0, "cliprange_value");
        bad(|c| c.gamma = 1.5, "gamma");
        bad(|c| c.lam = 2.0, "lam");
        bad(|c| c.target_kl = 0.0, "target_kl");
        let grpo = |f, field| assert_refuses(GrpoConfig::validate, "grpo", f, field);
        grpo(|c| c.max_new_tokens = 0, "max_new_tokens");
        grpo(|c| c.epochs = 0, "epochs");
    }

    #[test]
    fn online_dpo_refuses_what_would_break_its_sampling_or_loss() {
        let ok = OnlineDpoConfig::default();
        ok.validate().unwrap();
        assert_eq!(ok.loss().beta, ok.beta);
        let bad = |f, field| assert_refuses(OnlineDpoConfig::validate, "online_dpo", f, field);
        bad(|c| c.beta = 0.0, "beta");
        bad(|c| c.temperature = f64::NAN, "temperature");
        bad(|c| c.top_p = 0.0, "top_p");
        bad(|c| c.min_p = 1.5, "min_p");
        bad(|c| c.min_p = f64::NAN, "min_p");
        bad(|c| c.repetition_penalty = 0.0, "repetition_penalty");
        bad(
            |c| c.repetition_penalty = f64::INFINITY,
            "repetition_penalty",
        );
        bad(|c| c.rpo_alpha = -1.0, "rpo_alpha");
        bad(|c| c.max_new_tokens = 0, "max_new_tokens");
        bad(|c| c.label_smoothing = 0.6, "label_smoothing");
        bad(
            |c| {
                c.loss_type = DpoLoss::Ipo;
                c.label_smoothing = 0.1
            },
            "label_smoothing",
        );
        bad(|c| c.discopop_tau = 0.0, "discopop_tau");
        let tau = OnlineDpoConfig {
            discopop_tau: 0.2,
            ..ok
        };
        assert_eq!(tau.loss().discopop_tau, 0.2);
    }

    /// TR-DPO reads TRL's names and refuses a reference it could not move: one precomputed,
    /// or none (SimPO), or an update of none or past the policy.
    #[test]
    fn dpo_reads_tr_dpo_and_refuses_what_it_could_not_sync() {
        let text = "sync_ref_model = true\nref_model_mixup_alpha = 0.5\nref_model_sync_steps = 64";
        let c: DpoConfig = toml::from_str(text).unwrap();
        assert!(c.sync_ref_model);
        assert_eq!((c.ref_model_mixup_alpha, c.ref_model_sync_steps), (0.5, 64));
        c.validate().unwrap();
        let bad = |f: fn(&mut DpoConfig), field: &str| {
            let mut c = DpoConfig {
                sync_ref_model: true,
                ..DpoConfig::default()
            };
            f(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains(&format!("dpo.{field}")) && !e.contains('\n'),
                "{e}"
            );
        };
        bad(|c| c.ref_model_mixup_alpha = 0.0, "ref_model_mixup_alpha");
        bad(|c| c.ref_model_mixup_alpha = 1.5, "ref_model_mixup_alpha");
        bad(|c| c.ref_model_sync_steps = 0, "ref_model_sync_steps");
        bad(|c| c.precompute_ref_log_probs = true, "sync_ref_model");
        bad(|c| c.loss_type = vec![DpoLoss::Simpo], "sync_ref_model");
    }

    /// `loss_type` takes one name or TRL's list, with `loss_weights`; a list that names a loss
    /// twice, weights that do not match it, and "sft" beside `rpo_alpha`'s own NLL are refused,
    /// each in one line naming the key.
    #[test]
    fn dpo_reads_a_list_of_losses_with_weights() {
        let one: DpoConfig = toml::from_str("loss_type = \"ipo\"").unwrap();
        assert_eq!(one.loss_type, [DpoLoss::Ipo]);
        // A misspelt name, alone or in a list, is answered with the names it takes.
        for text in [
            "loss_type = \"sigmod\"",
            "loss_type = [\"ipo\", \"sigmod\"]",
        ] {
            let e = toml::from_str::<DpoConfig>(text).unwrap_err().to_string();
            assert!(e.contains("sigmod") && e.contains("apo_zero"), "{e}");
        }
        let text = "loss_type = [\"sigmoid\", \"bco_pair\", \"sft\"]\n\
                    loss_weights = [0.8, 0.2, 1.0]\nrpo_alpha = 0.0";
        let mpo: DpoConfig = toml::from_str(text).unwrap();
        mpo.validate().unwrap();
        let losses: Vec<_> = mpo.losses().collect();
        let want = [
            (DpoLoss::Sigmoid, 0.8),
            (DpoLoss::BcoPair, 0.2),
            (DpoLoss::Sft, 1.0),
        ];
        assert_eq!(losses, want);
        assert_eq!(mpo.sft_weight(), 1.0);
        assert!(mpo.needs_reference() && mpo.has(DpoLoss::BcoPair));
        assert_eq!(mpo.loss_names(), "sigmoid + bco_pair + sft");
        let back: DpoConfig = toml::from_str(&toml::to_string(&mpo).unwrap()).unwrap();
        assert_eq!(back, mpo);
        let sft_only: DpoConfig = toml::from_str("loss_type = [\"sft\"]\nrpo_alpha = 0.0").unwrap();
        sft_only.validate().unwrap();
        assert!(!sft_only.needs_reference());
        let bad = |text: &str, says: &str| {
            let c: DpoConfig = toml::from_str(text).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(says) && !e.contains('\n'), "{e}");
        };
        bad(
            "loss_type = [\"sigmoid\", \"sft\"]",
            "dpo.loss_type lists \"sft\"",
        );
        bad("loss_type = [\"ipo\", \"ipo\"]", "names \"ipo\" twice");
        bad("loss_type = []", "dpo.loss_type names no loss");
        bad(
            "loss_type = [\"sigmoid\", \"hinge\"]\nloss_weights = [1.0]",
            "dpo.loss_weights has 1 weights for 2",
        );
        bad(
            "loss_weights = [-1.0]",
            "dpo.loss_weights must be 0 or positive",
        );
        bad("ld_alpha = 1.5", "dpo.ld_alpha must be in [0, 1]");
        bad(
            "loss_type = [\"hinge\", \"ipo\"]\nlabel_smoothing = 0.1",
            "not hinge + ipo",
        );
        let f: DpoConfig = toml::from_str(
            "f_divergence_type = \"alpha_divergence\"\n\
                                           f_alpha_divergence_coef = 0.3",
        )
        .unwrap();
        assert_eq!(f.f_divergence_type, FDivergence::AlphaDivergence);
        f.validate().unwrap();
        bad(
            "loss_type = \"simpo\"\nf_divergence_type = \"forward_kl\"",
            "dpo.f_divergence_type",
        );
        let aot: DpoConfig = toml::from_str("loss_type = \"aot\"\nlabel_smoothing = 0.1").unwrap();
        aot.validate().unwrap();
        let online: OnlineDpoConfig = toml::from_str("loss_type = \"sft\"").unwrap();
        let e = online.validate().unwrap_err().to_string();
        assert!(e.contains("online_dpo.loss_type = \"sft\""), "{e}");
    }

    /// GSPO's one ratio per response needs one advantage per response.
    #[test]
    fn grpo_refuses_sequence_ratios_over_per_token_advantages() {
        let mut c = GrpoConfig {
            importance_sampling_level: ImportanceSamplingLevel::Sequence,
            ..GrpoConfig::default()
        };
        c.validate().unwrap();
        c.advantage_estimator = AdvantageEstimator::Rloo;
        c.validate().unwrap();
        c.advantage_estimator = AdvantageEstimator::ReinforcePlusPlus;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("grpo.importance_sampling_level"), "{e}");
    }

    /// The KL acts where each peer puts it by default: GRPO's in the loss, RLOO's off the
    /// score (TRL's RLOOTrainer), REINFORCE++'s in the per-token reward; `kl_in_reward` moves
    /// GRPO's and RLOO's, and is refused where it could not take effect.
    #[test]
    fn grpo_places_the_kl_as_each_estimator_does_unless_told() {
        use AdvantageEstimator::*;
        let at = |est, kl_in_reward| GrpoConfig {
            advantage_estimator: est,
            kl_in_reward,
            ..GrpoConfig::default()
        };
        assert_eq!(at(GroupNorm, None).kl_place(), KlPlace::Loss);
        assert_eq!(at(Rloo, None).kl_place(), KlPlace::SequenceReward);
        assert_eq!(at(ReinforcePlusPlus, None).kl_place(), KlPlace::TokenReward);
        assert_eq!(
            at(GroupNorm, Some(true)).kl_place(),
            KlPlace::SequenceReward
        );
        assert_eq!(at(Rloo, Some(false)).kl_place(), KlPlace::Loss);
        assert_eq!(
            at(ReinforcePlusPlus, Some(true)).kl_place(),
            KlPlace::TokenReward
        );
        let c: GrpoConfig = toml::from_str("kl_in_reward = true").unwrap();
        assert_eq!(c.kl_in_reward, Some(true));
        c.validate().unwrap();
        let e = at(ReinforcePlusPlus, Some(false))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("grpo.kl_in_reward"), "{e}");
        let gdpo = GrpoConfig {
            multi_objective_aggregation: MultiObjective::NormalizeThenSum,
            ..at(GroupNorm, Some(true))
        };
        let e = gdpo.validate().unwrap_err().to_string();
        assert!(e.contains("grpo.kl_in_reward"), "{e}");
        let corrected = GrpoConfig {
            use_bias_correction_kl: true,
            ..at(Rloo, None)
        };
        let e = corrected.validate().unwrap_err().to_string();
        assert!(e.contains("grpo.use_bias_correction_kl"), "{e}");
        GrpoConfig {
            use_bias_correction_kl: true,
            ..at(Rloo, Some(false))
        }
        .validate()
        .unwrap();
        // A new run records where its KL acts; a resumed rloo run that recorded nothing keeps
        // the loss term it began with; what a run recorded stays.
        let recorded = |mut c: GrpoConfig, resumed| (c.record_kl_place(resumed), c);
        let (old, c) = recorded(at(Rloo, None), false);
        assert_eq!((old, c.kl_in_reward), (false, Some(true)));
        let (old, c) = recorded(at(GroupNorm, None), false);
        assert_eq!((old, c.kl_in_reward), (false, Some(false)));
        let (old, c) = recorded(at(Rloo, None), true);
        assert_eq!((old, c.kl_place()), (true, KlPlace::Loss));
        let (old, c) = recorded(at(Rloo, Some(true)), true);
        assert_eq!((old, c.kl_place()), (false, KlPlace::SequenceReward));
        let (old, c) = recorded(at(ReinforcePlusPlus, None), false);
        assert_eq!((old, c.kl_in_reward), (false, None));
    }

    /// TRL's newer GRPO knobs read by their names, and each setting whose maths would not
    /// hold is refused naming its key: CISPO without its ratio cap, VESPO over sequence
    /// ratios, GDPO under another estimator, a quantile outside [0, 1], TR-DPO without a
    /// reference, and GRPO's losses asked of PPO.
    #[test]
    fn grpo_reads_trls_newer_knobs_and_refuses_what_would_not_hold() {
        let text = "loss_type = \"cispo\"\nepsilon_high = 5.0\ntop_entropy_quantile = 0.2\n\
                    multi_objective_aggregation = \"normalize_then_sum\"\nsync_ref_model = true\n\
                    off_policy_mask_threshold = 0.5\nuse_adaptive_entropy = true";
        let c: GrpoConfig = toml::from_str(text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.loss_type, LossType::Cispo);
        assert_eq!(
            c.multi_objective_aggregation,
            MultiObjective::NormalizeThenSum
        );
        assert!(c.needs_entropy() && c.entropy_bonus());
        assert!(!GrpoConfig::default().needs_entropy());
        let refused = |c: GrpoConfig, key: &str| {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        };
        refused(
            GrpoConfig {
                loss_type: LossType::Cispo,
                ..GrpoConfig::default()
            },
            "grpo.epsilon_high",
        );
        refused(
            GrpoConfig {
                loss_type: LossType::Vespo,
                importance_sampling_level: ImportanceSamplingLevel::Sequence,
                ..GrpoConfig::default()
            },
            "grpo.importance_sampling_level",
        );
        refused(
            GrpoConfig {
                multi_objective_aggregation: MultiObjective::NormalizeThenSum,
                advantage_estimator: AdvantageEstimator::Rloo,
                ..GrpoConfig::default()
            },
            "normalize_then_sum",
        );
        refused(
            GrpoConfig {
                top_entropy_quantile: 1.5,
                ..GrpoConfig::default()
            },
            "grpo.top_entropy_quantile",
        );
        let sampling: GrpoConfig =
            toml::from_str("min_p = 0.05\nrepetition_penalty = 1.05\ntop_k = 20").unwrap();
        sampling.validate().unwrap();
        assert_eq!((sampling.min_p, sampling.repetition_penalty), (0.05, 1.05));
        refused(
            GrpoConfig {
                min_p: -0.1,
                ..GrpoConfig::default()
            },
            "grpo.min_p",
        );
        refused(
            GrpoConfig {
                repetition_penalty: -1.0,
                ..GrpoConfig::default()
            },
            "grpo.repetition_penalty",
        );
        refused(
            GrpoConfig {
                sync_ref_model: true,
                beta: 0.0,
                ..GrpoConfig::default()
            },
            "grpo.sync_ref_model",
        );
        refused(
            GrpoConfig {
                off_policy_mask_threshold: Some(0.0),
                ..GrpoConfig::default()
            },
            "grpo.off_policy_mask_threshold",
        );
        refused(
            GrpoConfig {
                use_adaptive_entropy: true,
                entropy_coef_min: 1.0,
                entropy_coef_max: 0.5,
                ..GrpoConfig::default()
            },
            "grpo.use_adaptive_entropy",
        );
        let c: GrpoConfig =
            toml::from_str("reward_clip_range = [-1.0, 2.5]\nnormalize_advantages = true").unwrap();
        assert_eq!(c.reward_clip_range, Some([-1.0, 2.5]));
        c.validate().unwrap();
        refused(
            GrpoConfig {
                reward_clip_range: Some([1.0, 1.0]),
                ..GrpoConfig::default()
            },
            "grpo.reward_clip_range",
        );
        refused(
            GrpoConfig {
                normalize_advantages: true,
                advantage_estimator: AdvantageEstimator::ReinforcePlusPlus,
                ..GrpoConfig::default()
            },
            "grpo.normalize_advantages",
        );
        for loss in [
            LossType::Cispo,
            LossType::Sapo,
            LossType::Luspo,
            LossType::Vespo,
        ] {
            let e = PpoConfig {
                loss_type: loss,
                ..PpoConfig::default()
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("ppo.loss_type") && e.contains(loss.name()),
                "{e}"
            );
        }
    }

    /// Two-sided clipping's cap must lie above the clipped ratio's upper bound; Dr. GRPO's
    /// loss type reads by TRL's name.
    #[test]
    fn grpo_reads_dr_grpo_and_a_delta_above_the_clip() {
        let c: GrpoConfig = toml::from_str("loss_type = \"dr_grpo\"\ndelta = 1.5").unwrap();
        assert_eq!((c.loss_type, c.delta), (LossType::DrGrpo, Some(1.5)));
        c.validate().unwrap();
        let e = GrpoConfig {
            top_p: 0.0,
            ..GrpoConfig::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("grpo.top_p"), "{e}");
        for (delta, high) in [(1.2, None), (1.25, Some(0.28)), (f64::INFINITY, None)] {
            let c = GrpoConfig {
                delta: Some(delta),
                epsilon_high: high,
                ..GrpoConfig::default()
            };
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("grpo.delta"), "{e}");
        }
    }

    #[test]
    fn reward_specs_parse_and_print() {
        let r: RewardSpec = "task".parse().unwrap();
        assert_eq!(r, RewardSpec::task());
        let m: RewardSpec = "runs/rm:0.5".parse().unwrap();
        assert_eq!(m.source, RewardSource::Model("runs/rm".into()));
        assert_eq!(m.weight, 0.5);
        assert_eq!(m.to_string(), "runs/rm:0.5");
        // A path with a colon that is not a weight stays a path.
        let c: RewardSpec = "c:/rm".parse().unwrap();
        assert_eq!(
            (c.source, c.weight),
            (RewardSource::Model("c:/rm".into()), 1.0)
        );
        assert!("task:inf".parse::<RewardSpec>().is_err());
        let e = "task:abc".parse::<RewardSpec>().unwrap_err().to_string();
        assert!(e.contains("the weight `abc` is not a number"), "{e}");
        let c: RewardSpec = "cmd:python3 v.py --strict:0.5".parse().unwrap();
        assert_eq!(
            c.source,
            RewardSource::Command("python3 v.py --strict".into())
        );
        assert_eq!(c.weight, 0.5);
        assert_eq!(c.to_string().parse::<RewardSpec>().unwrap(), c);
        let h: RewardSpec = "http://127.0.0.1:8000".parse().unwrap();
        assert_eq!(
            (h.source, h.weight),
            (RewardSource::Http("http://127.0.0.1:8000".into()), 1.0)
        );
        let h: RewardSpec = "http://127.0.0.1:8000/score:2".parse().unwrap();
        assert_eq!(
            (h.source, h.weight),
            (
                RewardSource::Http("http://127.0.0.1:8000/score".into()),
                2.0
            )
        );
        assert!("https://x/score".parse::<RewardSpec>().is_err());
        assert_eq!(
            RewardSpec::first_model(&[r, m.clone()]),
            Some(&PathBuf::from("runs/rm"))
        );
    }
}
