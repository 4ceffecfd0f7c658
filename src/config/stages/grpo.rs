//! `[grpo]`: GRPO and the critic-free estimators it carries (RLOO, REINFORCE++, GSPO).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::rewards::RewardSpec;
use super::sampling::{check_filters, check_new_tokens, check_sampling, positive};

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
        super::rewards::check_weights("grpo", &self.rewards)?;
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
        crate::config::check_counts(
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
        self.validate_reference()?;
        self.validate_decoupled()
    }

    /// GDPO forms its advantages from each source's scores within their groups, so the
    /// settings that act on the summed score or on the rollout's advantages would do nothing
    /// under it: refused, as the README promises of settings that do nothing (another
    /// estimator is refused with the losses).
    fn validate_decoupled(&self) -> Result<()> {
        if self.multi_objective_aggregation != MultiObjective::NormalizeThenSum {
            return Ok(());
        }
        let idle = [
            (self.reward_clip_range.is_some(), "reward_clip_range"),
            (self.normalize_advantages, "normalize_advantages"),
        ];
        match idle.iter().find(|(set, _)| *set) {
            Some((_, what)) => bail!(
                "grpo.multi_objective_aggregation = \"normalize_then_sum\" (GDPO) normalises each \
                 source's scores within their groups and sums them: {what} does not apply \
                 under it (use sum_then_normalize, or leave it unset)"
            ),
            None => Ok(()),
        }
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
        if self.use_bias_correction_kl && self.beta == 0.0 {
            bail!(
                "grpo.use_bias_correction_kl corrects the KL term, which beta = 0 leaves out \
                 (set beta above 0, or use_bias_correction_kl = false)"
            );
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
