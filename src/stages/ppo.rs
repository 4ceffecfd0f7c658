//! RLHF with PPO. The defaults follow TRL's `PPOTrainer` where one exists (k1 KL penalty in the
//! reward, gamma 1, lambda 0.95, whitened advantages, clipped policy and value losses, vf_coef
//! 0.1, cliprange 0.2); the sequence score is added at the last response token with V = 0
//! after it, which is OpenRLHF's convention (TRL adds it one past EOS); Ziegler et al.'s
//! adaptive KL controller runs when `adaptive_kl` is on. The maths lives in [`super::rl`].
//!
//! One PPO iteration, as the code below is ordered:
//! 1. sample a response for each of `rollout_batch` prompts at `temperature` (`sample`);
//! 2. score them and take the policy's and reference's log-probabilities at that temperature
//!    (`Actors::collect`);
//! 3. values, per-token rewards `-beta KL_t` plus the score, GAE, whitening
//!    (`advantages`);
//! 4. `ppo_epochs` epochs of shuffled minibatches, each one optimizer step of the shared loop:
//!    clipped policy loss (`loss_type`, `epsilon_high`) + `vf_coef` x clipped value loss
//!    (`micro_batch`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use candle_core::Tensor;

use super::eval::{PolicyEval, PolicyResult};
use super::loader::{read_checkpoint, scored_from};
use super::reward::Scorer;
use super::rl::{
    eos_penalised, explained_variance, gae_advantages, row_sums, token_rewards, value_loss,
    Aggregation, Clip,
};
use super::rollout::{
    mean_over_ranks, require_scored, response_values, rollout_seed, rollout_stats, rows, surrogate,
    token_shares, ActorKnobs, Actors, Buffer, CollectTimes, EntropyUse, FrozenReference, Objective,
    PolicyStep, Rollout, RolloutClock, Schedule,
};
use super::rollout::{minibatch_warning, read_unfinished, Extra, Tensors, Unfinished};
use super::setup::{self, Plan, PolicyPair};
use super::Env;
use crate::config::{ImportanceSamplingLevel, PpoConfig, RewardSpec, TrainConfig};
use crate::data::records::PromptRecord;
use crate::data::sampler::{state_u64, WindowSampler};
use crate::generate::{RowKeys, SampleCfg};
use crate::train::loss::{masked_mean, scalar};
use crate::train::params::{Net, ParamInfo, Role};
use crate::train::rng::Rng;
use crate::train::runner::{MicroBatch, StepOut, Task};

/// What PPO keeps per rollout besides the advantages: the critic's values and the returns.
struct Critic {
    values: Tensor,
    ret: Tensor,
}

impl Extra for Critic {
    fn tensors(&self) -> Vec<(&'static str, Tensor)> {
        vec![
            ("values", self.values.clone()),
            ("returns", self.ret.clone()),
        ]
    }

    fn from_tensors(t: &mut Tensors) -> Result<Self> {
        Ok(Self {
            values: t.take("values")?,
            ret: t.take("returns")?,
        })
    }
}

struct PpoTask<'a> {
    env: &'a Env,
    actors: Actors,
    value: Scorer,
    prompts: Vec<PromptRecord>,
    eval_prompts: Vec<PromptRecord>,
    sampler: WindowSampler,
    rng: Rng,
    buffer: Option<Buffer<Critic>>,
    /// The ranks' shares of `buffer`, gathered on rank 0 for the checkpoint being written
    /// (and let go at the next step's end).
    unfinished: Unfinished,
    beta: f64,
    last_kl: f64,
    gen_secs: f64,
    train_secs: f64,
    clock: RolloutClock,
}

/// Step 3's outputs besides the buffer: what the rollout looked like.
struct Advantages {
    adv: Tensor,
    critic: Critic,
    /// Each response's summed per-token KL, and their mean.
    kl_rows: Vec<f64>,
    kl_seq: f64,
    explained: f64,
    /// The mean score the returns start from, where the missing-EOS penalty or the clip make
    /// it other than the logged `score` (TRL logs this one as `objective/scores`).
    trained_score: Option<f64>,
}

/// The scores the returns start from (after the missing-EOS penalty, then the clip), and
/// their mean where those make it other than the scorer's.
fn trained_scores(c: &PpoConfig, scores: &[f64], finished: &[bool]) -> (Vec<f64>, Option<f64>) {
    let scores: Vec<f64> = eos_penalised(scores, finished, c.missing_eos_penalty)
        .into_iter()
        .map(|s| c.score_clip.map_or(s, |clip| s.clamp(-clip, clip)))
        .collect();
    let mean = (c.missing_eos_penalty.is_some() || c.score_clip.is_some())
        .then(|| scores.iter().sum::<f64>() / scores.len().max(1) as f64);
    (scores, mean)
}

impl PpoTask<'_> {
    fn cfg(&self) -> &PpoConfig {
        &self.env.cfg.ppo
    }

    /// How a rollout is cut into minibatches.
    fn plan(&self) -> Schedule {
        let c = self.cfg();
        Schedule {
            epochs: c.ppo_epochs,
            minibatch_size: c.minibatch_size,
            grad_accum: self.env.cfg.train.grad_accum,
            mask_truncated: c.mask_truncated_completions,
        }
    }

    fn sample_cfg(&self) -> SampleCfg {
        let c = self.cfg();
        SampleCfg {
            max_new_tokens: c.max_new_tokens,
            temperature: c.temperature,
            top_k: c.top_k,
            top_p: c.top_p,
            ..Default::default()
        }
    }

    /// Steps 1 and 2: a batch of prompts, their sampled responses, scores and log-probs.
    /// Each rollout samples from its own seed, a function of the run's seed and the step it
    /// starts, so a resumed run draws the same tokens, and so does a run on another number of
    /// ranks (whose minibatch shuffles draw from the stage's stream differently). Each rank
    /// generates and scores its slice of the global rollout.
    fn sample(&mut self, step: usize) -> Result<(Vec<PromptRecord>, Rollout, CollectTimes)> {
        let comm = self.env.comm.as_ref();
        let records: Vec<PromptRecord> = self
            .sampler
            .next_slice(self.cfg().rollout_batch, comm.rank(), comm.world())
            .into_iter()
            .map(|i| self.prompts[i].clone())
            .collect();
        let cfg = self.sample_cfg();
        // Global row ids: a row samples the same tokens whichever rank holds it.
        let keys = RowKeys::range(
            rollout_seed(self.env.cfg.train.seed, step),
            (comm.rank() * records.len()) as u64,
            records.len(),
        );
        let (ro, times) = self
            .actors
            .collect(self.env.ctx(true, None), &records, &cfg, &keys)?;
        self.gen_secs += times.gen.seconds;
        Ok((records, ro, times))
    }

    /// Step 3: values, per-token rewards, GAE and whitening.
    fn advantages(&self, ro: &Rollout) -> Result<Advantages> {
        let c = self.cfg();
        let ctx = self.env.ctx(true, None);
        let all: Vec<usize> = (0..ro.lengths.len()).collect();
        let values = {
            let _untracked = crate::model::cast::Untracked::enter();
            (response_values(&self.value, ctx, ro, &all)?.detach() * &ro.mask)?
        };
        let kl = ro.kl(c.kl_estimator)?.ok_or_else(|| {
            anyhow::anyhow!("ppo: the rollout has no reference log-probabilities")
        })?;
        require_scored(
            ro,
            self.env.comm.as_ref(),
            "ppo",
            "PPO's returns need a score for every response (GRPO and online DPO leave such \
             responses out)",
        )?;
        let (scores, trained_score) = trained_scores(c, &ro.scores, &ro.finished);
        let rewards = token_rewards(&kl, &scores, &ro.lengths, self.beta)?;
        let g = gae_advantages(
            &rewards,
            &values,
            &ro.mask,
            (c.gamma, c.lam),
            c.whiten_advantages,
            self.env.kernels.gae,
            self.env.comm.as_ref(),
        )?;
        Ok(Advantages {
            kl_rows: row_sums(&kl)?,
            kl_seq: scalar(&kl.sum_all()?)? / ro.lengths.len() as f64,
            explained: explained_variance(&g.returns, &values, &ro.mask, self.env.comm.as_ref())?,
            trained_score,
            adv: g.advantages,
            critic: Critic {
                values,
                ret: g.returns,
            },
        })
    }

    /// One rollout for optimizer step `step`: steps 1-3, the minibatch schedule for step 4,
    /// the completion log, and the rollout's statistics (logged with that step).
    fn rollout(&mut self, step: usize) -> Result<Vec<(&'static str, f64)>> {
        let (records, ro, times) = self.sample(step)?;
        let a = self.advantages(&ro)?;
        let comm = self.env.comm.as_ref();
        let b = (ro.lengths.len() * comm.world()) as f64;
        // The adaptive controller must move beta alike on every rank: it reads the global
        // rollout's KL.
        let kl_seq = mean_over_ranks(comm, a.kl_seq)?;
        self.last_kl = kl_seq;
        self.actors
            .completions
            .write(step + 1, &records, &ro, Some(&a.kl_rows))?;
        let mut stats = rollout_stats(&ro, Some(kl_seq), comm)?;
        stats.extend([
            ("beta", self.beta),
            ("explained_variance", a.explained),
            ("gen_time_total_s", self.gen_secs),
            ("train_time_total_s", self.train_secs),
        ]);
        stats.extend(self.clock.metrics(&times));
        if let Some(s) = a.trained_score {
            stats.push(("score_trained", mean_over_ranks(comm, s)?));
        }
        let c = self.cfg().clone();
        if c.adaptive_kl {
            // Ziegler et al.: move beta proportionally to how far the KL is from its target.
            let err = (kl_seq / c.target_kl - 1.0).clamp(-0.2, 0.2);
            self.beta *= 1.0 + err * b / c.kl_horizon;
        }
        let mut buffer = Buffer::new(ro, a.adv, a.critic, &self.plan(), &mut self.rng)?;
        buffer.share_normalisers(comm)?;
        self.buffer = Some(buffer);
        Ok(stats)
    }
}

impl Task for PpoTask<'_> {
    type Eval = PolicyEval;

    fn shown_metrics(&self) -> &'static [&'static str] {
        &["score", "kl"]
    }

    fn micro_batch_size(&self, _: &TrainConfig) -> MicroBatch {
        MicroBatch {
            key: "[ppo] minibatch_size",
            size: self.env.cfg.ppo.minibatch_size,
        }
    }

    /// Step 4: one minibatch of the current rollout (sampling a new one when it is used up).
    fn micro_batch(&mut self, step: usize) -> Result<StepOut> {
        let mut metrics = vec![];
        if self.buffer.as_ref().is_none_or(Buffer::is_spent) {
            metrics = self.rollout(step)?;
        }
        let t0 = Instant::now();
        let c = &self.env.cfg.ppo;
        let ctx = self.env.ctx(true, None);
        let buf = self.buffer.as_mut().expect("rollout just filled it");
        let (idx, norm) = buf.next_batch().expect("non-empty");
        let clip = Clip::new(c.cliprange, c.epsilon_high);
        let sur = surrogate(
            c.loss_type,
            clip,
            ImportanceSamplingLevel::Token,
            (norm, c.max_new_tokens),
        );
        let pol = PolicyStep::compute(
            &self.actors.policy,
            ctx,
            &buf.ro,
            &buf.minibatch(&idx),
            sur,
            EntropyUse {
                bonus: true,
                top: None,
            },
        )?;
        let mask = rows(&buf.ro.mask, &idx)?;
        let v = response_values(&self.value, ctx, &buf.ro, &idx)?;
        let vf = value_loss(
            &v,
            &rows(&buf.extra.values, &idx)?,
            &rows(&buf.extra.ret, &idx)?,
            &mask,
            c.cliprange_value,
        )?;
        let ent = masked_mean(pol.entropy.as_ref().expect("asked for entropy"), &mask)?;
        // Under data parallelism each token-mean term weighs by its rank's share of tokens.
        let comm = self.env.comm.as_ref();
        let w = token_shares(
            comm,
            &[
                (sur.agg, &pol.mask),
                (Aggregation::Token, &mask),
                (Aggregation::Token, &pol.mask),
            ],
        )?;
        let (w_pol, w_tok) = (w[0], w[1]);
        let mut loss = ((&pol.loss * w_pol)? + (&vf * (c.vf_coef * w_tok))?)?;
        if c.entropy_coef != 0.0 {
            loss = (loss - (&ent * (c.entropy_coef * w_tok))?)?;
        }
        let tokens = buf.ro.tokens(&idx);
        metrics.extend(pol.metrics(w_pol, w[2])?);
        metrics.extend([
            ("value_loss", scalar(&vf)? * w_tok),
            ("entropy", scalar(&ent)? * w_tok),
        ]);
        self.train_secs += t0.elapsed().as_secs_f64();
        Ok(StepOut {
            loss,
            tokens,
            metrics,
        })
    }

    fn evaluate(&mut self) -> Result<PolicyEval> {
        self.actors.evaluate(
            self.env.ctx(true, None),
            &self.eval_prompts,
            self.env.cfg.ppo.max_new_tokens,
            (Some(self.last_kl), Some(self.beta)),
        )
    }

    fn state(&self) -> serde_json::Value {
        let mut s = self.sampler.state();
        s["rng"] = self.rng.state.into();
        s["beta"] = self.beta.into();
        s["last_kl"] = self.last_kl.into();
        s["gen_time_total_s"] = self.gen_secs.into();
        s["train_time_total_s"] = self.train_secs.into();
        s
    }

    fn after_step(&mut self, _done: usize) -> Result<()> {
        self.unfinished = Unfinished::default();
        Ok(())
    }

    fn before_checkpoint(&mut self) -> Result<()> {
        let comm = self.env.comm.as_ref();
        self.unfinished = Unfinished::gather(self.buffer.as_ref(), comm)?;
        Ok(())
    }

    fn write_files(&self, dir: &Path) -> Result<()> {
        self.unfinished.write(dir)
    }

    fn read_files(&mut self, dir: &Path) -> Result<()> {
        let (dev, comm) = (&self.env.device, self.env.comm.as_ref());
        self.buffer = read_unfinished(dir, dev, comm, ("ppo", &self.plan()))?;
        Ok(())
    }

    fn lr_scale(&self, p: ParamInfo) -> f64 {
        match p.net {
            Net::Value => self.env.cfg.ppo.value_lr_scale,
            Net::Policy => 1.0,
        }
    }

    fn restore(&mut self, s: &serde_json::Value) -> Result<()> {
        self.sampler.restore(s)?;
        self.rng.state = state_u64(s, "rng");
        // Older checkpoints lack the last three; they were taken between rollouts, where the
        // next step samples a rollout that sets the KL again.
        let f = |key: &str, or: f64| s.get(key).and_then(|v| v.as_f64()).unwrap_or(or);
        // Under the adaptive controller beta is state, as TRL restores it; a fixed coefficient
        // is the configuration's, and a run resumed with another one takes it.
        if self.cfg().adaptive_kl {
            self.beta = f("beta", self.beta);
        }
        self.last_kl = f("last_kl", self.last_kl);
        self.gen_secs = f("gen_time_total_s", self.gen_secs);
        self.train_secs = f("train_time_total_s", self.train_secs);
        Ok(())
    }
}

/// The critic, in `store` under `value.`: from `value_init`, else the first reward model,
/// else the policy's checkpoint with a fresh head. Returns it and where it came from.
fn value_model(
    c: &PpoConfig,
    pair: &mut PolicyPair,
    env: &Env,
) -> Result<(Scorer, Option<PathBuf>)> {
    let first_rm = RewardSpec::first_model(&c.rewards);
    let src = c.value_init.clone().or_else(|| first_rm.cloned());
    let Some(p) = &src else {
        let v = scored_from(&pair.loaded, &mut pair.store, Net::Value, None, true)?;
        return Ok((v, None));
    };
    let l = read_checkpoint(p, &env.device)?;
    let v = scored_from(&l, &mut pair.store, Net::Value, None, false)?;
    // The reward model's head speaks in its own score units; when that model is not what PPO
    // is rewarded by, its head would start every value on the wrong scale (we measured
    // explained variance of -29 on the built-in task), so only its transformer is kept and
    // the head starts at zero.
    if first_rm != Some(p) {
        for (_, var, _) in pair
            .store
            .net(Net::Value)
            .filter(|(_, _, i)| i.role == Role::Head)
        {
            var.set(&var.zeros_like()?)?;
        }
    }
    Ok((v, src))
}

pub fn run(env: &Env) -> Result<PolicyResult> {
    let cfg = &env.cfg;
    let c = &cfg.ppo;
    let lora = setup::lora(cfg);
    let mut pair = PolicyPair::load(env)?;
    let (value, value_src) = value_model(c, &mut pair, env)?;
    let tok = pair.loaded.tokenizer.clone();
    // The weights now live in the stores; the loaded copy would double the memory.
    pair.loaded.tensors.clear();
    let PolicyPair {
        store,
        policy,
        reference,
        ..
    } = pair;
    let knobs = ActorKnobs {
        rewards: &c.rewards,
        packing: c.packing,
        prompts: (c.task_prompts, c.eval_prompts),
        max_new_tokens: c.max_new_tokens,
        log_completions: c.log_completions,
        objective: Objective::PolicyGradient,
    };
    let (actors, prompts, eval_prompts) = Actors::load(env, policy, reference, &tok, knobs)?;
    // A resume reads the critic back from its checkpoint, whatever the rewards are now.
    let value_from = match (env.resume, &value_src) {
        (true, _) => "the checkpoint".to_string(),
        (false, None) => "the policy (fresh head)".to_string(),
        (false, Some(p)) => p.display().to_string(),
    };
    warnln!(
        "[ppo] reward {}, value model from {value_from}, reference: {}",
        actors.rewards.names.join(" + "),
        actors
            .reference
            .as_ref()
            .map_or("none", FrozenReference::describe)
    );
    let rows = cfg.rollout_rows();
    if let Some(w) = rows.and_then(|(rows, size, table)| minibatch_warning(table, rows, size)) {
        warnln!("[ppo] warning: {w}");
    }
    let model = actors.policy.cfg.clone();
    let mut task = PpoTask {
        env,
        actors,
        value,
        sampler: WindowSampler::new(prompts.len(), cfg.train.seed),
        prompts,
        eval_prompts,
        rng: Rng::new(cfg.train.seed ^ 0x990),
        buffer: None,
        unfinished: Unfinished::default(),
        beta: c.kl_coef,
        last_kl: 0.0,
        gen_secs: 0.0,
        train_secs: 0.0,
        clock: RolloutClock::default(),
    };
    // The critic always trains; the policy fully, or only its adapters under LoRA.
    let trainable = |p: ParamInfo| p.net == Net::Value || lora.is_none() || p.role == Role::Adapter;
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

    /// `score_trained` is what the returns start from: the scorer's scores less the
    /// missing-EOS penalty, then clipped; logged only where that differs from `score`.
    #[test]
    fn the_trained_score_is_penalised_then_clipped() {
        let mut c = PpoConfig::default();
        let (scores, finished) = ([2.0, 0.5, -3.0], [true, false, true]);
        assert_eq!(
            trained_scores(&c, &scores, &finished),
            (scores.to_vec(), None)
        );
        c.missing_eos_penalty = Some(1.0);
        c.score_clip = Some(1.5);
        let (got, mean) = trained_scores(&c, &scores, &finished);
        assert_eq!(got, vec![1.5, -0.5, -1.5]);
        assert!((mean.unwrap() - (-0.5 / 3.0)).abs() < 1e-12);
    }
}
