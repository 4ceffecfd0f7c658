//! The critic-free policy-gradient stage: `group_size` samples per prompt, advantages from
//! the group (no value model), the clipped surrogate, and a KL to the reference. Its
//! `advantage_estimator` (named as OpenRLHF names them) picks the algorithm:
//! - `group_norm` (GRPO): `(r - mean_group) / scale` for every token of the response, where
//!   `scale_rewards` (TRL's knob) is the group's std, the batch's std, or 1 (Dr. GRPO); KL as
//!   a k3 term `beta * KL` in the loss;
//! - `rloo`: `r - mean of the other samples of its group`, where `r` is the score less
//!   `beta` times the response's summed k1 KL (TRL's RLOOTrainer); no KL term in the loss;
//! - `reinforce_plus_plus`: per-token reward `-beta * KL_t` (k1) plus the score at the last
//!   token, reward-to-go, whitened over the batch; no KL term in the loss.
//!
//! Per-token losses are averaged per `loss_type` (TRL's names): `bnpo` over each minibatch's
//! tokens (the default, which equals `dapo` only at `grad_accum = 1`), `grpo` per response
//! then over responses, `dapo` over every token of the optimizer step, `dr_grpo` summed and
//! divided by the minibatch's responses times `max_new_tokens` (so its reported policy loss
//! and KL read lower than a token mean where responses are short). `delta` clips two-sided.
//! TRL's newer objectives replace the clipped surrogate: `cispo`, `sapo`, `luspo` and `vespo`
//! ([`crate::config::LossType`]). DeepSeek-V3.2's off-policy mask and importance-corrected KL,
//! the top-entropy token mask, an entropy bonus ([`super::entropy_control`]), GDPO's
//! per-source normalisation and TR-DPO's moving reference are TRL's knobs of the same names.
//! The maths lives in [`super::rl`].

use std::path::Path;

use anyhow::Result;
use candle_core::Tensor;

use super::entropy_control::EntropyControl;
use super::eval::{PolicyEval, PolicyResult};
use super::ref_sync::{MovingReference, RefSync};
use super::rl::{
    aggregate, baselined, batch_normalized, decoupled_advantages, group_advantages, kl_estimate,
    kl_penalized, reinforce_pp_advantages, row_sums, zero_unscored, Aggregation, Clip, Form,
    Surrogate, Vespo,
};
use super::rollout::{
    mean_over_ranks, require_scored, rollout_seed, rollout_stats, rows, surrogate, token_shares,
    ActorKnobs, Actors, Buffer, EntropyUse, FrozenReference, Objective, PolicyStep, Rollout,
    RolloutClock, Schedule,
};
use super::rollout::{minibatch_warning, read_unfinished, Unfinished};
use super::setup::{self, Plan, PolicyPair};
use super::Env;
use crate::config::{
    AdvantageEstimator, GrpoConfig, ImportanceSamplingLevel, KlEstimator, KlPlace, LossType,
    MultiObjective, ScaleRewards, TrainConfig,
};
use crate::data::records::PromptRecord;
use crate::data::sampler::{state_u64, WindowSampler};
use crate::generate::{RowKeys, SampleCfg};
use crate::train::loss::{masked_mean, scalar};
use crate::train::params::ParamStore;
use crate::train::params::{ParamInfo, Role};
use crate::train::rng::Rng;
use crate::train::runner::{MicroBatch, StepOut, Task};

struct GrpoTask<'a> {
    env: &'a Env,
    actors: Actors,
    prompts: Vec<PromptRecord>,
    eval_prompts: Vec<PromptRecord>,
    sampler: WindowSampler,
    rng: Rng,
    buffer: Option<Buffer<()>>,
    /// The ranks' shares of `buffer`, gathered on rank 0 for the checkpoint being written
    /// (and let go at the next step's end).
    unfinished: Unfinished,
    /// The last rollout's KL to the reference; None without one (beta = 0).
    last_kl: Option<f64>,
    clock: RolloutClock,
    entropy: EntropyControl,
    /// TR-DPO's updates of the reference towards `store`, the policy's weights.
    moving: MovingReference,
    store: &'a ParamStore,
}

/// The per-token objective `c.loss_type` names.
fn form(c: &GrpoConfig) -> Form {
    match c.loss_type {
        LossType::Cispo => Form::Cispo {
            max: c.epsilon_high.expect("validated: cispo needs epsilon_high"),
        },
        LossType::Sapo => Form::Sapo {
            tau_pos: c.sapo_temperature_pos,
            tau_neg: c.sapo_temperature_neg,
        },
        LossType::Vespo => Form::Vespo(Vespo {
            k_pos: c.vespo_k_pos,
            lambda_pos: c.vespo_lambda_pos,
            k_neg: c.vespo_k_neg,
            lambda_neg: c.vespo_lambda_neg,
        }),
        LossType::Bnpo | LossType::Grpo | LossType::Dapo | LossType::DrGrpo | LossType::Luspo => {
            Form::Clipped
        }
    }
}

impl GrpoTask<'_> {
    fn cfg(&self) -> &GrpoConfig {
        &self.env.cfg.grpo
    }

    /// The advantages `[B, R]` of a rollout under the configured estimator.
    fn advantages(&self, ro: &Rollout) -> Result<Tensor> {
        let c = self.cfg();
        let kernel = self.env.kernels.gae;
        let dev = ro.mask.device();
        let per_response = |a: Vec<f64>| -> Result<Tensor> {
            let b = a.len();
            let a = Tensor::from_vec(a.iter().map(|&x| x as f32).collect(), (b, 1), dev)?;
            Ok(a.broadcast_as((b, ro.resp_len))?.contiguous()?)
        };
        if c.multi_objective_aggregation == MultiObjective::NormalizeThenSum {
            let by_source: Vec<&[f64]> = ro.scores_by_source.iter().map(|(_, s)| &s[..]).collect();
            let weights: Vec<f64> = c.rewards.iter().map(|r| r.weight).collect();
            let comm = self.env.comm.as_ref();
            return per_response(decoupled_advantages(
                &by_source,
                &weights,
                c.group_size,
                c.eps,
                comm,
            )?);
        }
        // TRL's RLOO clips the scores (NaN stays NaN).
        let mut scores: Vec<f64> = match c.reward_clip_range {
            Some([lo, hi]) => ro.scores.iter().map(|x| x.clamp(lo, hi)).collect(),
            None => ro.scores.clone(),
        };
        if c.kl_place() == KlPlace::SequenceReward {
            if let Some(kl) = ro.kl(KlEstimator::K1)? {
                scores = kl_penalized(&scores, &row_sums(&kl)?, c.beta);
            }
        }
        // A response no reward applies to (NaN) takes the host path, which leaves it out.
        let all_scored = scores.iter().all(|x| !x.is_nan());
        match (c.advantage_estimator, c.scale_rewards) {
            (AdvantageEstimator::GroupNorm, ScaleRewards::Group)
                if all_scored && !c.normalize_advantages =>
            {
                group_advantages(&scores, c.group_size, c.eps, ro.resp_len, kernel, dev)
            }
            (AdvantageEstimator::ReinforcePlusPlus, _) => {
                require_scored(
                    ro,
                    self.env.comm.as_ref(),
                    "grpo",
                    "reinforce_plus_plus whitens every response's reward-to-go, so it needs a \
                     score for each (group_norm and rloo leave such responses out)",
                )?;
                // With beta = 0 there is no reference, and no KL in the reward.
                let kl = match ro.kl(KlEstimator::K1)? {
                    Some(kl) => kl,
                    None => ro.mask.zeros_like()?,
                };
                let comm = self.env.comm.as_ref();
                reinforce_pp_advantages(&kl, &scores, &ro.lengths, &ro.mask, c.beta, kernel, comm)
            }
            (est, scale) => {
                let comm = self.env.comm.as_ref();
                let mut a = baselined(&scores, c.group_size, est, scale, c.eps, comm)?;
                if c.normalize_advantages {
                    a = batch_normalized(&a, c.eps, comm)?;
                }
                per_response(zero_unscored(a))
            }
        }
    }

    /// How a rollout is cut into minibatches.
    fn plan(&self) -> Schedule {
        let c = self.cfg();
        Schedule {
            epochs: c.epochs,
            minibatch_size: c.minibatch_size,
            grad_accum: self.env.cfg.train.grad_accum,
            mask_truncated: c.mask_truncated_completions,
        }
    }

    /// The reference copy's weights; none under LoRA or without a reference.
    fn reference_store(&self) -> Option<&ParamStore> {
        self.actors
            .reference
            .as_ref()
            .and_then(FrozenReference::store)
    }

    /// One rollout for optimizer step `step`: `group_size` samples of each of
    /// `prompts_per_rollout` prompts, their advantages, the minibatch schedule and the
    /// completion log; returns the rollout's statistics.
    fn rollout(&mut self, step: usize) -> Result<Vec<(&'static str, f64)>> {
        let c = self.cfg().clone();
        // Each rank generates and scores its slice of the global rollout's prompts, whole
        // groups each, so group statistics stay on one rank.
        let comm = self.env.comm.as_ref();
        let mut records = Vec::with_capacity(c.prompts_per_rollout * c.group_size);
        for i in self
            .sampler
            .next_slice(c.prompts_per_rollout, comm.rank(), comm.world())
        {
            records.extend(std::iter::repeat_n(self.prompts[i].clone(), c.group_size));
        }
        let cfg = SampleCfg {
            max_new_tokens: c.max_new_tokens,
            temperature: c.temperature,
            top_k: c.top_k,
            top_p: c.top_p,
            min_p: c.min_p,
            repetition_penalty: c.repetition_penalty,
            ..Default::default()
        };
        // Each rollout samples from its own seed, a function of the run's seed and the step,
        // so a resumed run (or one on another number of ranks, whose shuffles use the stage's
        // stream differently) draws the same tokens; a group's members are rows of their own,
        // numbered in the global rollout so a row samples the same tokens on any rank.
        let keys = RowKeys::range(
            rollout_seed(self.env.cfg.train.seed, step),
            (comm.rank() * records.len()) as u64,
            records.len(),
        );
        let (ro, times) = self
            .actors
            .collect(self.env.ctx(true, None), &records, &cfg, &keys)?;
        let adv = self.advantages(&ro)?;
        let kl = ro.kl(KlEstimator::K3)?;
        // The whole rollout's, as evaluation reports it.
        self.last_kl = match &kl {
            Some(kl) => Some(mean_over_ranks(
                comm,
                scalar(&kl.sum_all()?)? / records.len() as f64,
            )?),
            None => None,
        };
        let kl_rows = kl.as_ref().map(row_sums).transpose()?;
        self.actors
            .completions
            .write(step + 1, &records, &ro, kl_rows.as_deref())?;
        let mut stats = rollout_stats(&ro, self.last_kl, comm)?;
        stats.extend(self.clock.metrics(&times));
        let mut buffer = Buffer::new(ro, adv, (), &self.plan(), &mut self.rng)?;
        buffer.share_normalisers(comm)?;
        self.buffer = Some(buffer);
        Ok(stats)
    }
}

impl Task for GrpoTask<'_> {
    type Eval = PolicyEval;

    fn shown_metrics(&self) -> &'static [&'static str] {
        &["score", "kl"]
    }

    fn micro_batch_size(&self, _: &TrainConfig) -> MicroBatch {
        MicroBatch {
            key: "[grpo] minibatch_size",
            size: self.env.cfg.grpo.minibatch_size,
        }
    }

    fn micro_batch(&mut self, step: usize) -> Result<StepOut> {
        let mut metrics = vec![];
        if self.buffer.as_ref().is_none_or(Buffer::is_spent) {
            metrics = self.rollout(step)?;
        }
        let c = &self.env.cfg.grpo;
        let ctx = self.env.ctx(true, None);
        let comm = self.env.comm.as_ref();
        let buf = self.buffer.as_mut().expect("rollout just filled it");
        let (idx, norm) = buf.next_batch().expect("non-empty");
        let clip = Clip::new(c.cliprange, c.epsilon_high).two_sided(c.delta);
        let sur = Surrogate {
            form: form(c),
            off_policy: c.off_policy_mask_threshold,
            ..surrogate(
                c.loss_type,
                clip,
                c.importance_sampling_level,
                (norm, c.max_new_tokens),
            )
        };
        let ro = &buf.ro;
        let entropy = EntropyUse {
            bonus: c.entropy_bonus(),
            top: (c.top_entropy_quantile < 1.0).then_some((c.top_entropy_quantile, comm)),
        };
        let pol = PolicyStep::compute(
            &self.actors.policy,
            ctx,
            ro,
            &buf.minibatch(&idx),
            sur,
            entropy,
        )?;
        // The bonus reads the tokens the policy loss is kept on. Under data parallelism each
        // term (and metric) weighs by its rank's share of what it averages over.
        let bonus_mask = pol.kept.as_ref().unwrap_or(&pol.mask);
        let bonus_agg = match sur.agg {
            dapo @ Aggregation::Dapo { .. } => dapo,
            _ => Aggregation::Token,
        };
        let w = token_shares(
            comm,
            &[
                (sur.agg, &pol.mask),
                (bonus_agg, bonus_mask),
                (Aggregation::Token, &pol.mask),
            ],
        )?;
        metrics.extend(pol.metrics(w[0], w[2])?);
        let mut loss = pol.loss.clone();
        // REINFORCE++ and RLOO have their KL in the reward; GRPO holds the policy near the
        // reference with a k3 term in the loss.
        let in_the_loss = c.kl_place() == KlPlace::Loss;
        if let Some(ref_logprobs) = ro.ref_logprobs.as_ref().filter(|_| in_the_loss) {
            let mut kl = kl_estimate(&pol.logp, &rows(ref_logprobs, &idx)?, KlEstimator::K3)?;
            if c.use_bias_correction_kl {
                kl = (kl * &pol.ratios)?;
            }
            // Averaged as the policy loss is (TRL adds beta * KL to each token's loss).
            let kl = aggregate(&kl, &pol.mask, sur.agg)?;
            loss = (&loss + (&kl * c.beta)?)?;
            metrics.push(("kl_token", scalar(&kl)? * w[0]));
        }
        let mut loss = (loss * w[0])?;
        if let Some(ent) = &pol.entropy {
            let mean = masked_mean(&ent.detach(), &pol.mask)?;
            metrics.push(("entropy", scalar(&mean)? * w[2]));
            if c.entropy_bonus() {
                let sum = scalar(&(ent.detach() * bonus_mask)?.sum_all()?)?;
                self.entropy.observe(sum, scalar(&bonus_mask.sum_all()?)?);
                let term = aggregate(ent, bonus_mask, bonus_agg)?;
                loss = (loss - (term * (self.entropy.applied() * w[1]))?)?;
                metrics.push(("entropy_coef", self.entropy.coef));
            }
        }
        Ok(StepOut {
            loss,
            tokens: ro.tokens(&idx),
            metrics,
        })
    }

    fn evaluate(&mut self) -> Result<PolicyEval> {
        self.actors.evaluate(
            self.env.ctx(true, None),
            &self.eval_prompts,
            self.env.cfg.grpo.max_new_tokens,
            (self.last_kl, None),
        )
    }

    fn before_checkpoint(&mut self) -> Result<()> {
        let comm = self.env.comm.as_ref();
        self.unfinished = Unfinished::gather(self.buffer.as_ref(), comm)?;
        Ok(())
    }

    fn after_step(&mut self, done: usize) -> Result<()> {
        self.unfinished = Unfinished::default();
        if self.cfg().entropy_bonus() {
            self.entropy.end_step(self.env.comm.as_ref())?;
        }
        self.moving
            .after_step(self.reference_store(), self.store, done)
    }

    fn write_files(&self, dir: &Path) -> Result<()> {
        self.moving.write(self.reference_store(), dir)?;
        self.unfinished.write(dir)
    }

    fn read_files(&mut self, dir: &Path) -> Result<()> {
        self.moving.read(self.reference_store(), dir)?;
        let (dev, comm) = (&self.env.device, self.env.comm.as_ref());
        self.buffer = read_unfinished(dir, dev, comm, ("grpo", &self.plan()))?;
        Ok(())
    }

    fn state(&self) -> serde_json::Value {
        let mut s = self.sampler.state();
        s["rng"] = self.rng.state.into();
        s["entropy_control"] = self.entropy.state();
        s["last_kl"] = self.last_kl.into();
        s
    }

    fn restore(&mut self, s: &serde_json::Value) -> Result<()> {
        self.sampler.restore(s)?;
        self.rng.state = state_u64(s, "rng");
        self.entropy.restore(&s["entropy_control"]);
        // Evaluation reports the last rollout's KL, which a resume inside a rollout does
        // not sample again (older checkpoints lack it: they were taken between rollouts).
        if let Some(kl) = s.get("last_kl").filter(|_| self.last_kl.is_some()) {
            self.last_kl = kl.as_f64().or(self.last_kl);
        }
        Ok(())
    }
}

pub fn run(env: &Env) -> Result<PolicyResult> {
    let cfg = &env.cfg;
    let c = &cfg.grpo;
    let lora = setup::lora(cfg);
    // With beta = 0 nothing reads the reference: as TRL, none is loaded or run.
    let with_reference = c.beta != 0.0;
    let (store, policy, reference, tok) = PolicyPair::load_with(env, with_reference)?.into_parts();
    let knobs = ActorKnobs {
        rewards: &c.rewards,
        packing: c.packing,
        prompts: (c.task_prompts, c.eval_prompts),
        max_new_tokens: c.max_new_tokens,
        log_completions: c.log_completions,
        objective: Objective::PolicyGradient,
    };
    let (actors, prompts, eval_prompts) = Actors::load(env, policy, reference, &tok, knobs)?;
    warnln!(
        "[{}] advantage estimator {:?}, reward {}, reference: {}",
        cfg.stage,
        c.advantage_estimator,
        actors.rewards.names.join(" + "),
        actors
            .reference
            .as_ref()
            .map_or("none (beta = 0)", FrozenReference::describe)
    );
    if c.loss_type == LossType::Luspo
        && c.importance_sampling_level == ImportanceSamplingLevel::Token
        && env.comm.rank() == 0
    {
        // As TRL warns: the paper takes one ratio per response.
        errln!(
            "[{}] warning: loss_type = \"luspo\" is set with importance_sampling_level = \
             \"sequence\" in its paper; with \"token\" each response's clipped token losses \
             are summed",
            cfg.stage
        );
    }
    let rows = cfg.rollout_rows();
    if let Some(w) = rows.and_then(|(rows, size, table)| minibatch_warning(table, rows, size)) {
        warnln!("[{}] warning: {w}", cfg.stage);
    }
    let model = actors.policy.cfg.clone();
    let mut task = GrpoTask {
        env,
        actors,
        sampler: WindowSampler::new(prompts.len(), cfg.train.seed),
        prompts,
        eval_prompts,
        rng: Rng::new(cfg.train.seed ^ 0x6290),
        buffer: None,
        unfinished: Unfinished::default(),
        // KL is 0 before the first update; without a reference there is none to report.
        last_kl: with_reference.then_some(0.0),
        clock: RolloutClock::default(),
        entropy: EntropyControl::new(c),
        moving: MovingReference {
            sync: c.sync_ref_model.then_some(RefSync {
                alpha: c.ref_model_mixup_alpha,
                every: c.ref_model_sync_steps,
            }),
            stage: "grpo",
            reports: env.comm.rank() == 0,
        },
        store: &store,
    };
    let trainable = |p: ParamInfo| lora.is_none() || p.role == Role::Adapter;
    let summary = setup::train(
        env,
        &mut task,
        &store,
        Plan::policy(&model, lora, &tok),
        &trainable,
    )?;
    Ok(PolicyResult::from_summary(cfg.stage, &summary))
}
