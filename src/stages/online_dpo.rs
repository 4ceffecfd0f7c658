//! Online DPO (TRL's `OnlineDPOTrainer`, after Guo et al.'s online AI feedback): every
//! micro-batch samples two completions of each of its prompts from the current policy, scores
//! both (the task's checker, reward models, processes or endpoints, as GRPO), and trains on
//! the pairs the scores rank, with DPO's loss against the frozen reference
//! ([`super::dpo::preference_loss`]). Both completions are the policy's own, so its
//! preference data moves with it, which offline DPO's fixed pairs do not.
//!
//! A prompt whose two scores tie trains nothing. TRL keeps such a pair, the first sample
//! chosen; under a reward model's continuous scores that is rare, but under a checker scoring
//! 0 or 1 most pairs tie, and a tie ranked by its order pushes one of two equally good (or
//! bad) answers down at random.

use std::cmp::Ordering;

use anyhow::Result;
use candle_core::Tensor;

use super::completions::CompletionLog;
use super::dpo::{preference_loss, with_chosen_nll, Pairwise};
use super::eval::{PolicyEval, PolicyResult};
use super::rewards::{check_prompts, RewardFn};
use super::rl::kl_estimate;
use super::rollout::{
    main_only, reference_logprobs, response_logprobs, rollout_seed, rollout_stats, rows, Actors,
    FrozenReference, Objective, Rollout, RolloutClock,
};
use super::setup::{self, rollout_prompt_sets, Plan, PolicyPair};
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

/// Each sample's score, less `penalty` where it did not end with EOS (TRL's
/// `missing_eos_penalty`).
fn penalised(scores: &[f64], finished: &[bool], penalty: Option<f64>) -> Vec<f64> {
    scores
        .iter()
        .zip(finished)
        .map(|(&s, &done)| match (penalty, done) {
            (Some(p), false) => s - p,
            _ => s,
        })
        .collect()
}

/// One micro-batch's samples: its prompt records (each twice, back to back), their rollout, and
/// what collecting it logs.
struct Drawn {
    records: Vec<PromptRecord>,
    ro: Rollout,
    stats: Vec<(&'static str, f64)>,
}

/// The policy's forward over a rollout's pairs: each side's log-probabilities summed over its
/// tokens (the policy's with gradients), its token counts, and the samples' KL to the reference.
struct PairForward {
    /// `[n]` each: the chosen samples', then the rejected ones'.
    logps: (Tensor, Tensor),
    reference: Option<(Tensor, Tensor)>,
    lengths: (Tensor, Tensor),
    /// GRPO's KL (k3 summed over each sample's tokens) over the samples forwarded, which the
    /// policy sampled and has not moved from since; 0 without a reference.
    kl_sum: f64,
    rows: usize,
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
        let n = pairs.len();
        let idx: Vec<usize> = pairs
            .iter()
            .map(|p| p.0)
            .chain(pairs.iter().map(|p| p.1))
            .collect();
        let mask = rows(&ro.mask, &idx)?;
        let (logp, _) = response_logprobs(policy, ctx, ro, &idx, false)?;
        let halves = |t: &Tensor| -> Result<(Tensor, Tensor)> {
            Ok((t.narrow(0, 0, n)?, t.narrow(0, n, n)?))
        };
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
            rows: idx.len(),
            tokens_seen: ro.tokens(&idx),
        })
    }

    fn policy(&self) -> Pairwise<'_> {
        pairwise(&self.logps)
    }

    fn reference(&self) -> Option<Pairwise<'_>> {
        self.reference.as_ref().map(pairwise)
    }

    fn has_reference(&self) -> bool {
        self.reference.is_some()
    }

    fn lengths(&self) -> Pairwise<'_> {
        pairwise(&self.lengths)
    }
}

fn pairwise((chosen, rejected): &(Tensor, Tensor)) -> Pairwise<'_> {
    Pairwise { chosen, rejected }
}

struct OnlineDpoTask<'a> {
    env: &'a Env,
    actors: Actors,
    /// The loss settings in the offline stage's terms.
    loss: DpoConfig,
    prompts: Vec<PromptRecord>,
    eval_prompts: Vec<PromptRecord>,
    sampler: WindowSampler,
    /// The step the last micro-batch belonged to, and how many it has had: each micro-batch
    /// samples from its own seed.
    step: usize,
    micro: usize,
    /// The last micro-batch's KL to the reference; None without one (SimPO, ORPO).
    last_kl: Option<f64>,
    clock: RolloutClock,
}

impl OnlineDpoTask<'_> {
    fn cfg(&self) -> &OnlineDpoConfig {
        &self.env.cfg.online_dpo
    }

    /// Two samples of each of this rank's prompts of the next micro-batch, scored.
    fn collect(&mut self, step: usize) -> Result<Drawn> {
        if step != self.step {
            (self.step, self.micro) = (step, 0);
        }
        let draw = step * self.env.cfg.train.grad_accum + self.micro;
        self.micro += 1;
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
        let cfg = SampleCfg {
            max_new_tokens: c.max_new_tokens,
            temperature: c.temperature,
            top_k: c.top_k,
            top_p: c.top_p,
            ..Default::default()
        };
        // Rows are numbered in the global micro-batch, so a row samples the same tokens on any
        // number of ranks, and a resumed run draws what the uninterrupted one did.
        let keys = RowKeys::range(
            rollout_seed(self.env.cfg.train.seed, draw),
            (comm.rank() * records.len()) as u64,
            records.len(),
        );
        let (ro, times) = self
            .actors
            .collect(self.env.ctx(true, None), &records, &cfg, &keys)?;
        let mut stats = rollout_stats(&ro, None);
        stats.extend(self.clock.metrics(&times));
        Ok(Drawn { records, ro, stats })
    }
}

impl Task for OnlineDpoTask<'_> {
    type Eval = PolicyEval;

    fn micro_batch(&mut self, step: usize) -> Result<StepOut> {
        let Drawn {
            records,
            ro,
            stats: mut metrics,
        } = self.collect(step)?;
        let c = self.cfg().clone();
        let scores = penalised(&ro.scores, &ro.finished, c.missing_eos_penalty);
        let ranked = ranked_pairs(&scores);
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
        // The loss is a mean over the global micro-batch's ranked pairs, however the ranks
        // share them: each rank weighs its mean by its share of the pairs, and the RPO term
        // divides by the ranks' mean count of chosen tokens. The metrics are the global
        // batch's too, from one all-reduce of this rank's sums, so every rank logs the same
        // numbers under the same names.
        let k = ranked.len() as f64;
        let (lc, lr) = match ranked.is_empty() {
            true => (0.0, 0.0),
            false => (
                scalar(&f.logps.0.sum_all()?)?,
                scalar(&f.logps.1.sum_all()?)?,
            ),
        };
        let margin: f64 = ranked.iter().map(|&(a, b)| scores[a] - scores[b]).sum();
        let mine = [
            k,
            scalar(&f.lengths.0.sum_all()?)?,
            f.kl_sum,
            f.rows as f64,
            k * scalar(&loss)?,
            k * acc,
            lc,
            lr,
            margin,
        ];
        let mut global: Vec<f32> = mine.iter().map(|&x| x as f32).collect();
        if self.env.comm.world() > 1 {
            self.env.comm.all_reduce_mean(&mut global)?;
        }
        let g = |i: usize| f64::from(global[i]);
        let share = match g(0) > 0.0 {
            true => k / g(0),
            false => 0.0,
        };
        let weighted = (&loss * share)?;
        let objective = match ranked.is_empty() {
            true => weighted,
            false => with_chosen_nll(&weighted, &f.logps.0, g(1), c.rpo_alpha)?,
        };
        metrics.push(("ranked_share", k / (records.len() / 2).max(1) as f64));
        if g(0) > 0.0 {
            let per_pair = |i: usize| g(i) / g(0);
            metrics.extend([
                ("dpo_loss", per_pair(4)),
                ("reward_accuracy", per_pair(5)),
                ("logps_chosen", per_pair(6)),
                ("logps_rejected", per_pair(7)),
                ("score_margin", per_pair(8)),
            ]);
        }
        if f.has_reference() {
            let kl = g(2) / g(3);
            self.last_kl = Some(kl);
            metrics.push(("kl", kl));
        }
        self.actors
            .completions
            .write(step + 1, &records, &ro, None)?;
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
        self.sampler.restore(s)
    }
}

pub fn run(env: &Env) -> Result<PolicyResult> {
    let cfg = &env.cfg;
    let c = &cfg.online_dpo;
    let lora = setup::lora(cfg);
    let with_reference = c.loss_type.needs_reference();
    let (store, policy, reference, tok) = PolicyPair::load_with(env, with_reference)?.into_parts();
    let mut rewards = RewardFn::load(
        &c.rewards,
        (&env.device, env.dtype()),
        &tok,
        &cfg.external_reward,
    )?;
    rewards.pack_models = c.packing;
    let (prompts, eval_prompts) = rollout_prompt_sets(
        env,
        &tok,
        (c.task_prompts, c.eval_prompts),
        c.max_new_tokens,
        policy.cfg.max_position_embeddings,
        |set| check_prompts(&rewards, set),
    )?;
    if env.comm.rank() == 0 {
        eprintln!(
            "[{}] loss {}, reward {}, reference: {}",
            cfg.stage,
            c.loss_type.name(),
            rewards.names.join(" + "),
            reference
                .as_ref()
                .map_or("none (the loss reads none)", FrozenReference::describe)
        );
    }
    let model = policy.cfg.clone();
    let mut task = OnlineDpoTask {
        env,
        actors: Actors {
            policy,
            reference,
            tok: tok.clone(),
            rewards,
            completions: CompletionLog::new(&env.run_dir, main_only(env, c.log_completions)),
            packing: c.packing,
            objective: Objective::Preference,
        },
        loss: c.loss(),
        sampler: WindowSampler::new(prompts.len(), cfg.train.seed),
        prompts,
        eval_prompts,
        step: 0,
        micro: 0,
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
    fn a_missing_eos_lowers_a_score_before_ranking() {
        let s = penalised(&[1.0, 1.0], &[true, false], Some(0.5));
        assert_eq!(s, [1.0, 0.5]);
        assert_eq!(ranked_pairs(&s), [(0, 1)]);
        assert_eq!(penalised(&[1.0, 1.0], &[true, false], None), [1.0, 1.0]);
    }
}
