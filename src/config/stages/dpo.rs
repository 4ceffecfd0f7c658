//! `[dpo]`: DPO and its relatives' losses.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

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
    /// `robust`, `exo_pair`, `aot` and `aot_unpaired` only, below 0.5.
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
pub(super) mod one_or_many {
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

    /// One loss, for a table that trains with one: a name, or a list of one name; a longer
    /// list is refused as such rather than as a value of the wrong type.
    pub fn one<'de, D: Deserializer<'de>>(d: D) -> Result<DpoLoss, D::Error> {
        match Given::deserialize(d)? {
            Given::One(one) => parse(&one),
            Given::Many(many) if many.len() == 1 => parse(&many[0]),
            Given::Many(_) => Err(D::Error::custom(
                "invalid value: one loss name, not a list of them (only [dpo] sums several)",
            )),
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
        // BCO's running shift is a mean of the plain rewards beta * (policy - reference), which
        // scores f(u) would be classified against from another place.
        if self.f_divergence_type != FDivergence::ReverseKl && self.has(DpoLoss::BcoPair) {
            bail!(
                "{table}.f_divergence_type: loss_type \"bco_pair\" shifts its scores by a running \
                 mean of the plain log-ratio rewards, so it takes reverse_kl only"
            );
        }
        if !(self.rpo_alpha >= 0.0 && self.rpo_alpha.is_finite()) {
            bail!(
                "{table}.rpo_alpha must be 0 or positive, got {}",
                self.rpo_alpha
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
