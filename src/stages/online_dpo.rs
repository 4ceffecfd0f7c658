//! Online DPO (TRL's `OnlineDPOTrainer`, after Guo et al.'s online AI feedback): every
//! optimizer step samples two completions of each of its prompts from the current policy,
//! scores both (the task's checker, reward models, processes or endpoints, as GRPO), and
//! trains on the pairs the scores rank, with DPO's loss against the frozen reference
//! ([`super::dpo::preference_loss`]). Both completions are the policy's own, so its
//! preference data moves with it, which offline DPO's fixed pairs do not. A step samples all
//! its micro-batches before it trains on the first, so that its loss is a mean over all its
//! ranked pairs, however ranks and micro-batches share them.
//!
//! A prompt whose two scores tie trains nothing. TRL keeps such a pair, the first sample
//! chosen; under a reward model's continuous scores that is rare, but under a checker scoring
//! 0 or 1 most pairs tie, and a tie ranked by its order pushes one of two equally good (or
//! bad) answers down at random.

use std::cmp::Ordering;
use std::collections::VecDeque;

use anyhow::Result;
use candle_core::Tensor;

use super::batch::halves;
use super::dpo::{preference_loss, Pairwise};
use super::eval::{PolicyEval, PolicyResult};
use super::rl::{eos_penalised, kl_estimate};
use super::rollout::{
    reference_logprobs, response_logprobs, rollout_seed, rollout_stats, rows, ActorKnobs, Actors,
    FrozenReference, Objective, Rollout, RolloutClock,
};
use super::setup::{self, Plan, PolicyPair};
use super::Env;
use crate::config::{DpoConfig, KlEstimator, OnlineDpoConfig};
use crate::data::records::PromptRecord;
use crate::data::sampler::WindowSampler;
use crate::generate::{RowKeys, SampleCfg};
use crate::model::linear::Ctx;
use crate::model::Transformer;
use crate::train::loss::scalar;
use crate::train::params::{ParamInfo, Role};
use crate::train::runner::{StepOut, Task};

/// The pairs of a rollout whose rows `2i` and `2i + 1` are two samples of prompt `i`: (chosen
/// row, rejected row) for each prompt whose two scores differ, the higher one chosen.
pub fn ranked_pairs(scores: &[f64]) -> Vec<(usize, usize)> {
    scores
        .chunks_exact(2)
        .enumerate()
        .filter_map(|(i, s)| match s[0].partial_cmp(&s[1]) {
            Some(Ordering::Greater) => Some((2 * i, 2 * i + 1)),
            Some(Ordering::Less) => Some((2 * i + 1, 2 * i)),
            _ => None,
        })
        .collect()
}

/// One micro-batch's samples, scored and ranked: their rollout (two rows per prompt, back to
/// back), the scores the pairs were ranked by, the ranked pairs, and what collecting it logs.
struct Drawn {
    ro: Rollout,
    scores: Vec<f64>,
    ranked: Vec<(usize, usize)>,
    stats: Vec<(&'static str, f64)>,
}

/// The policy's forward over a rollout's pairs: each side's log-probabilities summed over its
/// tokens (the policy's with gradients), its token counts, and the samples' KL to the
/// reference.
struct PairForward {
    /// `[n]` each: the chosen samples', then the rejected ones'.
    logps: (Tensor, Tensor),
    reference: Option<(Tensor, Tensor)>,
    lengths: (Tensor, Tensor),
    /// The k3 estimate of the KL to the reference, summed over the samples' tokens: at
    /// temperature 1, of samples drawn at the sampling temperature (so biased where that is
    /// not 1), which the policy has not moved from since; 0 without a reference.
    kl_sum: f64,
    /// Their prompt and completion tokens, padding not counted.
    tokens_seen: usize,
}

impl PairForward {
    /// The policy's forward over `pairs` of `ro`, and the reference's (no gradients) where
    /// the stage holds one.
    fn new(
        policy: &Transformer,
        reference: Option<&FrozenReference>,
        ctx: Ctx,
        ro: &Rollout,
        pairs: &[(usize, usize)],
    ) -> Result<Self> {
        let idx: Vec<usize> = pairs
            .iter()
            .map(|p| p.0)
            .chain(pairs.iter().map(|p| p.1))
            .collect();
        let mask = rows(&ro.mask, &idx)?;
        let (logp, _) = response_logprobs(policy, ctx, ro, &idx, false)?;
        let (reference, kl_sum) = match reference {
            Some(r) => {
                let r = reference_logprobs(&r.get(), policy, ctx, ro, &idx)?;
                let kl = kl_estimate(&logp.detach(), &r, KlEstimator::K3)?;
                let kl_sum = scalar(&(kl * &mask)?.sum_all()?)?;
                (Some(halves(&(r * &mask)?.sum(1)?)?), kl_sum)
            }
            None => (None, 0.0),
        };
        Ok(Self {
            logps: halves(&(&logp * &mask)?.sum(1)?)?,
            reference,
            lengths: halves(&mask.sum(1)?)?,
            kl_sum,
            tokens_seen: ro.tokens(&idx),
        })
    }

    fn policy(&self) -> Pairwise<'_> {
        (&self.logps).into()
    }

    fn reference(&self) -> Option<Pairwise<'_>> {
        self.reference.as_ref().map(Into::into)
    }

    fn lengths(&self) -> Pairwise<'_> {
        (&self.lengths).into()
    }
}

/// The rows `completions.jsonl` shows of a rollout of `n` rows in pairs: `k` rows rounded
/// down to whole pairs (at least one), spread evenly over it, so that each logged sample sits
/// beside the one it was ranked against.
fn logged_pairs(n: usize, k: usize) -> Vec<usize> {
    let (pairs, shown) = (n / 2, (k / 2).max(1));
    let shown = shown.min(pairs);
    (0..shown)
        .flat_map(|j| {
            let i = j * pairs / shown;
            [2 * i, 2 * i + 1]
        })
        .collect()
}

struct OnlineDpoTask<'a> {
    env: &'a Env,
    actors: Actors,
    /// The loss settings in the offline stage's terms.
    loss: DpoConfig,
    prompts: Vec<PromptRecord>,
    eval_prompts: Vec<PromptRecord>,
    sampler: WindowSampler,
    /// The step's micro-batches not yet trained on: a step samples all of them first, so that
    /// its loss is a mean over all its ranked pairs.
    pending: VecDeque<Drawn>,
    /// The ranks' mean count of the step's ranked pairs, and of their chosen samples' tokens.
    step_norm: (f64, f64),
    /// The KL of the last micro-batch with a ranked pair; None without a reference (SimPO,
    /// ORPO).
    last_kl: Option<f64>,
    clock: RolloutClock,
}

impl OnlineDpoTask<'_> {
    fn cfg(&self) -> &OnlineDpoConfig {
        &self.env.cfg.online_dpo
    }

    /// Samples, scores and ranks every micro-batch of optimizer step `step`, and counts its
    /// ranked pairs over the ranks.
    fn draw_step(&mut self, step: usize) -> Result<()> {
        let accum = self.env.cfg.train.grad_accum;
        let (mut pairs, mut chosen_tokens) = (0.0, 0.0);
        for micro in 0..accum {
            let d = self.draw(step, micro)?;
            pairs += d.ranked.len() as f64;
            chosen_tokens += d
                .ranked
                .iter()
                .map(|&(c, _)| d.ro.lengths[c])
                .sum::<usize>() as f64;
            self.pending.push_back(d);
        }
        let mut mean = [pairs as f32, chosen_tokens as f32];
        if self.env.comm.world() > 1 {
            self.env.comm.all_reduce_mean(&mut mean)?;
        }
        self.step_norm = (f64::from(mean[0]), f64::from(mean[1]));
        Ok(())
    }

    /// Two samples of each of this rank's prompts of micro-batch `micro` of step `step`,
    /// scored and ranked.
    fn draw(&mut self, step: usize, micro: usize) -> Result<Drawn> {
        let comm = self.env.comm.as_ref();
        let mut records = Vec::new();
        for i in self
            .sampler
            .next_slice(self.env.cfg.train.batch_size, comm.rank(), comm.world())
        {
            // Back to back, so the engine prefills each prompt once for both samples.
            records.extend(std::iter::repeat_n(self.prompts[i].clone(), 2));
        }
        let c = self.cfg();
        let penalty = c.missing_eos_penalty;
        let cfg = SampleCfg {
            max_new_tokens: c.max_new_tokens,
            temperature: c.temperature,
            top_k: c.top_k,
            top_p: c.top_p,
            min_p: c.min_p,
            repetition_penalty: c.repetition_penalty,
            ..Default::default()
        };
        // Rows are numbered in the step's global batch, micro-batch by micro-batch and rank by
        // rank, as the sampler hands out its prompts: a row samples the same tokens however
        // the step is split between ranks and micro-batches, and a resumed run draws what the
        // uninterrupted one did.
        let first = (micro * comm.world() + comm.rank()) * records.len();
        let keys = RowKeys::range(
            rollout_seed(self.env.cfg.train.seed, step),
            first as u64,
            records.len(),
        );
        let (ro, times) = self
            .actors
            .collect(self.env.ctx(true, None), &records, &cfg, &keys)?;
        let mut stats = rollout_stats(&ro, None, comm)?;
        stats.extend(self.clock.metrics(&times));
        let scores = eos_penalised(&ro.scores, &ro.finished, penalty);
        let ranked = ranked_pairs(&scores);
        stats.push((
            "ranked_share",
            ranked.len() as f64 / (records.len() / 2).max(1) as f64,
        ));
        if micro == 0 {
            let shown = logged_pairs(records.len(), self.actors.completions.per_rollout());
            self.actors
                .completions
                .write_rows(step + 1, &records, &ro, None, &shown)?;
        }
        Ok(Drawn {
            ro,
            scores,
            ranked,
            stats,
        })
    }
}

impl Task for OnlineDpoTask<'_> {
    fn shown_metrics(&self) -> &'static [&'static str] {
        &["score", "kl"]
    }

    type Eval = PolicyEval;

    fn micro_batch(&mut self, step: usize) -> Result<StepOut> {
        if self.pending.is_empty() {
            self.draw_step(step)?;
        }
        let Drawn {
            ro,
            scores,
            ranked,
            stats: mut metrics,
        } = self
            .pending
            .pop_front()
            .expect("draw_step drew grad_accum >= 1");
        let rpo_alpha = self.cfg().rpo_alpha;
        // A rank whose prompts all tied still runs a forward, over its first pair with weight
        // 0, so that its backward (and the all-reduce after it) sees every parameter.
        let pairs = match ranked.is_empty() {
            true => vec![(0, 1)],
            false => ranked.clone(),
        };
        let a = &self.actors;
        let f = PairForward::new(
            &a.policy,
            a.reference.as_ref(),
            self.env.ctx(true, None),
            &ro,
            &pairs,
        )?;
        let (loss, acc) = preference_loss(&self.loss, f.policy(), f.reference(), f.lengths())?;
        // The step's loss is a mean over all its ranked pairs, however the ranks and the
        // micro-batches share them: this micro-batch's mean, weighed by its share of them
        // (the loop divides by grad_accum and averages over the ranks), and the RPO term over
        // the step's chosen tokens.
        let accum = self.env.cfg.train.grad_accum as f64;
        let k = ranked.len() as f64;
        let (step_pairs, step_tokens) = self.step_norm;
        let share = match step_pairs > 0.0 {
            true => k * accum / step_pairs,
            false => 0.0,
        };
        let weighted = (&loss * share)?;
        // RPO: the chosen samples' NLL per chosen token of the whole step (this rank's share
        // of the sum, scaled as the pairs' mean is).
        let objective = match ranked.is_empty() || rpo_alpha == 0.0 || step_tokens <= 0.0 {
            true => weighted,
            false => {
                let nll = (f.logps.0.sum_all()? * (-rpo_alpha * accum / step_tokens))?;
                (weighted + nll)?
            }
        };
        // The metrics are the micro-batch's global ones, from one all-reduce of this rank's
        // sums, so every rank logs the same names and numbers; a rank without a ranked pair
        // adds nothing.
        let on = |x: f64| if ranked.is_empty() { 0.0 } else { x };
        let mine = [
            k,
            k * scalar(&loss)?,
            k * acc,
            on(scalar(&f.logps.0.sum_all()?)?),
            on(scalar(&f.logps.1.sum_all()?)?),
            ranked.iter().map(|&(a, b)| scores[a] - scores[b]).sum(),
            on(f.kl_sum),
            2.0 * k,
        ];
        let mut global: Vec<f32> = mine.iter().map(|&x| x as f32).collect();
        if self.env.comm.world() > 1 {
            self.env.comm.all_reduce_mean(&mut global)?;
        }
        let g = |i: usize| f64::from(global[i]);
        if g(0) > 0.0 {
            let per_pair = |i: usize| g(i) / g(0);
            metrics.extend([
                ("dpo_loss", per_pair(1)),
                ("reward_accuracy", per_pair(2)),
                ("logps_chosen", per_pair(3)),
                ("logps_rejected", per_pair(4)),
                ("score_margin", per_pair(5)),
            ]);
            if f.reference.is_some() {
                let kl = g(6) / g(7);
                self.last_kl = Some(kl);
                metrics.push(("kl", kl));
            }
        }
        Ok(StepOut {
            loss: objective,
            tokens: f.tokens_seen,
            metrics,
        })
    }

    fn evaluate(&mut self) -> Result<PolicyEval> {
        self.actors.evaluate(
            self.env.ctx(true, None),
            &self.eval_prompts,
            self.env.cfg.online_dpo.max_new_tokens,
            (self.last_kl, None),
        )
    }

    fn state(&self) -> serde_json::Value {
        self.sampler.state()
    }

    fn restore(&mut self, s: &serde_json::Value) -> Result<()> {
        self.pending.clear();
        self.sampler.restore(s)
    }
}

pub fn run(env: &Env) -> Result<PolicyResult> {
    let cfg = &env.cfg;
    let c = &cfg.online_dpo;
    let lora = setup::lora(cfg);
    let with_reference = c.loss_type.needs_reference();
    let (store, policy, reference, tok) = PolicyPair::load_with(env, with_reference)?.into_parts();
    let knobs = ActorKnobs {
        rewards: &c.rewards,
        packing: c.packing,
        prompts: (c.task_prompts, c.eval_prompts),
        max_new_tokens: c.max_new_tokens,
        log_completions: c.log_completions,
        objective: Objective::Preference,
    };
    let (actors, prompts, eval_prompts) = Actors::load(env, policy, reference, &tok, knobs)?;
    if env.comm.rank() == 0 {
        errln!(
            "[{}] loss {}, reward {}, reference: {}",
            cfg.stage,
            c.loss_type.name(),
            actors.rewards.names.join(" + "),
            actors
                .reference
                .as_ref()
                .map_or("none (the loss reads none)", FrozenReference::describe)
        );
    }
    let model = actors.policy.cfg.clone();
    let mut task = OnlineDpoTask {
        env,
        actors,
        loss: c.loss(),
        sampler: WindowSampler::new(prompts.len(), cfg.train.seed),
        prompts,
        eval_prompts,
        pending: VecDeque::new(),
        step_norm: (0.0, 0.0),
        // KL is 0 before the first update; without a reference there is none to report.
        last_kl: with_reference.then_some(0.0),
        clock: RolloutClock::default(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_prompt_with_two_different_scores_gives_one_pair_the_higher_chosen() {
        let scores = [1.0, 0.0, 0.0, 0.0, 0.2, 0.7, 1.0, 1.0, -1.0, -3.0];
        assert_eq!(ranked_pairs(&scores), [(0, 1), (5, 4), (8, 9)]);
        assert!(ranked_pairs(&[f64::NAN, 1.0]).is_empty());
    }

    #[test]
    fn the_completion_log_shows_whole_pairs_spread_over_the_rollout() {
        assert_eq!(logged_pairs(16, 4), [0, 1, 8, 9]);
        assert_eq!(logged_pairs(16, 5), [0, 1, 8, 9]);
        assert_eq!(logged_pairs(4, 8), [0, 1, 2, 3]);
        assert_eq!(logged_pairs(8, 1), [0, 1]);
        assert!(logged_pairs(0, 4).is_empty());
    }

    #[test]
    fn a_missing_eos_lowers_a_score_before_ranking() {
        let s = eos_penalised(&[1.0, 1.0], &[true, false], Some(0.5));
        assert_eq!(s, [1.0, 0.5]);
        assert_eq!(ranked_pairs(&s), [(0, 1)]);
        assert_eq!(eos_penalised(&[1.0, 1.0], &[true, false], None), [1.0, 1.0]);
    }
}
