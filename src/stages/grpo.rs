//! GRPO: `group_size` samples per prompt, the advantage of each response is its score
//! normalised within its group, `(r - mean) / (std + eps)`, for every one of its tokens; no
//! value model; the loss is the clipped surrogate plus `beta` times the k3 KL estimate to the
//! reference, averaged over the valid tokens of each minibatch. That aggregation is TRL's
//! `bnpo` (normalised by the minibatch's token count), which equals `dapo` (normalised by the
//! whole accumulated batch's) only at `grad_accum = 1`. The maths lives in [`super::rl`].

use std::collections::VecDeque;

use anyhow::Result;
use candle_core::Tensor;

use super::eval::{PolicyEval, PolicyResult};
use super::rl::{group_advantages, kl_estimate};
use super::rollout::{self, minibatches, rows, PolicyStep, RewardFn, Rollout};
use super::setup::{self, check_prompt_lengths, prompt_sets, FrozenReference, Plan, PolicyPair};
use super::Env;
use crate::config::KlEstimator;
use crate::data::records::PromptRecord;
use crate::data::sampler::{state_u64, WindowSampler};
use crate::data::tokenizer::Tokenizer;
use crate::generate::SampleCfg;
use crate::model::Transformer;
use crate::train::loss::{masked_mean, scalar};
use crate::train::params::{ParamInfo, Role};
use crate::train::rng::Rng;
use crate::train::runner::{StepOut, Task};

struct Buffer {
    ro: Rollout,
    adv: Tensor,
    batches: VecDeque<Vec<usize>>,
}

struct GrpoTask<'a> {
    env: &'a Env,
    policy: Transformer,
    reference: FrozenReference,
    tok: Tokenizer,
    rewards: RewardFn,
    prompts: Vec<PromptRecord>,
    eval_prompts: Vec<PromptRecord>,
    sampler: WindowSampler,
    rng: Rng,
    buffer: Option<Buffer>,
    last_kl: f64,
}

impl GrpoTask<'_> {
    fn rollout(&mut self) -> Result<Vec<(&'static str, f64)>> {
        let c = self.env.cfg.grpo.clone();
        let ctx = self.env.ctx(true, None);
        let mut records = Vec::with_capacity(c.prompts_per_rollout * c.group_size);
        for _ in 0..c.prompts_per_rollout {
            let p = self.prompts[self.sampler.next_index()].clone();
            records.extend(std::iter::repeat_n(p, c.group_size));
        }
        let ids: Vec<Vec<u32>> = records
            .iter()
            .map(|r| self.tok.encode(&r.prompt))
            .collect::<Result<_>>()?;
        let cfg = SampleCfg {
            max_new_tokens: c.max_new_tokens,
            temperature: c.temperature,
            ..Default::default()
        };
        let sampled = rollout::sample(&self.policy, ctx, &self.tok, &ids, &cfg, &mut self.rng)?;
        let ro = rollout::build(
            &self.policy,
            ctx,
            &self.reference.get(),
            &self.tok,
            &records,
            &ids,
            sampled,
            &self.rewards,
        )?;
        let b = records.len();
        let adv = group_advantages(
            &ro.scores,
            c.group_size,
            c.eps,
            ro.resp_len,
            self.env.kernels.gae,
            ro.mask.device(),
        )?;
        let kl = (kl_estimate(&ro.old_logprobs, &ro.ref_logprobs, KlEstimator::K3)? * &ro.mask)?;
        self.last_kl = scalar(&kl.sum_all()?)? / b as f64;
        let batches = minibatches(b, c.epochs.max(1), c.minibatch_size, &mut self.rng);
        let stats = vec![
            ("score", ro.scores.iter().sum::<f64>() / b as f64),
            ("kl", self.last_kl),
            (
                "response_length",
                ro.lengths.iter().sum::<usize>() as f64 / b as f64,
            ),
            ("rollout", 1.0),
        ];
        self.buffer = Some(Buffer { ro, adv, batches });
        Ok(stats)
    }
}

impl Task for GrpoTask<'_> {
    type Eval = PolicyEval;

    fn micro_batch(&mut self, _step: usize) -> Result<StepOut> {
        let mut metrics = vec![];
        if self.buffer.as_ref().is_none_or(|b| b.batches.is_empty()) {
            metrics = self.rollout()?;
        }
        let c = &self.env.cfg.grpo;
        let ctx = self.env.ctx(true, None);
        let buf = self.buffer.as_mut().expect("rollout just filled it");
        let idx = buf.batches.pop_front().expect("non-empty");
        let ro = &buf.ro;
        let pol = PolicyStep::compute(&self.policy, ctx, ro, &buf.adv, &idx, c.cliprange, false)?;
        let kl = masked_mean(
            &kl_estimate(&pol.logp, &rows(&ro.ref_logprobs, &idx)?, KlEstimator::K3)?,
            &pol.mask,
        )?;
        let loss = (&pol.loss + (&kl * c.beta)?)?;
        metrics.extend(pol.metrics()?);
        metrics.push(("kl_token", scalar(&kl)?));
        Ok(StepOut {
            loss,
            tokens: idx.len() * (ro.prompt_cols + ro.resp_len),
            metrics,
        })
    }

    fn evaluate(&mut self) -> Result<PolicyEval> {
        let c = &self.env.cfg.grpo;
        let (accuracy, mean_reward) = rollout::greedy_eval(
            &self.policy,
            self.env.ctx(true, None),
            &self.tok,
            &self.eval_prompts,
            &self.rewards,
            &SampleCfg {
                max_new_tokens: c.max_new_tokens,
                ..Default::default()
            },
        )?;
        Ok(PolicyEval {
            accuracy,
            mean_reward,
            kl: self.last_kl,
            beta: None,
        })
    }

    fn state(&self) -> serde_json::Value {
        let mut s = self.sampler.state();
        s["rng"] = self.rng.state.into();
        s
    }

    fn restore(&mut self, s: &serde_json::Value) -> Result<()> {
        self.sampler.restore(s);
        self.rng.state = state_u64(s, "rng");
        self.buffer = None;
        Ok(())
    }
}

pub fn run(env: &Env) -> Result<PolicyResult> {
    let cfg = &env.cfg;
    let c = &cfg.grpo;
    let lora = setup::lora(cfg);
    let PolicyPair {
        store,
        policy,
        reference,
        loaded,
    } = PolicyPair::load(env)?;
    let tok = loaded.tokenizer.clone();
    let rewards = RewardFn::load(&c.rewards, &env.device, &tok)?;
    let (prompts, eval_prompts) = prompt_sets(env, c.task_prompts, c.eval_prompts)?;
    let ctx_len = policy.cfg.max_position_embeddings;
    check_prompt_lengths(&tok, &prompts, c.max_new_tokens, ctx_len)?;
    check_prompt_lengths(&tok, &eval_prompts, c.max_new_tokens, ctx_len)?;
    let model = policy.cfg.clone();
    let mut task = GrpoTask {
        env,
        policy,
        reference,
        tok: tok.clone(),
        rewards,
        sampler: WindowSampler::new(prompts.len(), cfg.train.seed),
        prompts,
        eval_prompts,
        rng: Rng::new(cfg.train.seed ^ 0x6290),
        buffer: None,
        last_kl: 0.0,
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
