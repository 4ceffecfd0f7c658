//! RLHF with PPO (DESIGN.md §2). Defaults follow TRL's `PPOTrainer` where one exists (k1 KL
//! penalty in the reward, score added at the last response token, gamma 1, lambda 0.95,
//! whitened advantages, clipped policy and value losses, vf_coef 0.1, cliprange 0.2) and
//! Ziegler et al.'s adaptive KL controller when `adaptive_kl` is on. Each optimizer step of
//! the shared loop is one minibatch; a new rollout is sampled when the current one has been
//! used for `ppo_epochs` epochs.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::loader::{policy_from, read_checkpoint, scored_from};
use super::pretrain::WindowSampler;
use super::reward::Scorer;
use super::rollout::{
    self, response_logprobs, response_values, rows, Reference, RewardFn, Rollout,
};
use super::sft::synthetic;
use super::Env;
use crate::data::records::{load_prompts, place, PromptRecord};
use crate::data::synthetic::Split;
use crate::data::tokenizer::Tokenizer;
use crate::generate::SampleCfg;
use crate::kernels::gae::{gae, masked_mean_var, whiten};
use crate::model::Transformer;
use crate::train::checkpoint::CheckpointMeta;
use crate::train::loss::{masked_mean, scalar};
use crate::train::params::ParamStore;
use crate::train::rng::Rng;
use crate::train::runner::{self, get, is_adapter, RunOpts, Saved, StepOut, Task};

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
    /// `task[:W]` (the checker) and/or `PATH[:W]` of reward models.
    pub rewards: Vec<String>,
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
    pub task_prompts: usize,
    pub eval_prompts: usize,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            rewards: vec!["task".into()],
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
            cliprange_value: 0.2,
            vf_coef: 0.1,
            value_lr_scale: 1.0,
            entropy_coef: 0.0,
            gamma: 1.0,
            lam: 0.95,
            whiten_advantages: true,
            score_clip: None,
            missing_eos_penalty: None,
            task_prompts: 4000,
            eval_prompts: 1000,
        }
    }
}

/// Per-token KL estimate between policy and reference log-probabilities.
pub fn kl_estimate(logp: &Tensor, logp_ref: &Tensor, kind: KlEstimator) -> Result<Tensor> {
    let d = (logp - logp_ref)?;
    Ok(match kind {
        KlEstimator::K1 => d,
        KlEstimator::K3 => {
            let r = d.neg()?;
            ((r.exp()? - &r)? - 1.0)?
        }
    })
}

/// Clipped surrogate: `mean(max(-A r, -A clip(r, 1-eps, 1+eps)))` over valid tokens; also the
/// clip fraction and approximate KL `0.5 * mean((logp - logp_old)^2)` (TRL's `approxkl`).
pub fn policy_loss(
    logp: &Tensor,
    logp_old: &Tensor,
    adv: &Tensor,
    mask: &Tensor,
    eps: f64,
) -> Result<(Tensor, f64, f64, f64)> {
    let diff = (logp - logp_old)?;
    let ratio = diff.exp()?;
    let l1 = (adv.neg()? * &ratio)?;
    let l2 = (adv.neg()? * ratio.clamp(1.0 - eps, 1.0 + eps)?)?;
    let loss = masked_mean(&l1.maximum(&l2)?, mask)?;
    let clipped = ((&ratio - 1.0)?.abs()?.gt(eps)?.to_dtype(DType::F32)? * mask)?;
    let n = scalar(&mask.sum_all()?)?.max(1.0);
    let clipfrac = scalar(&clipped.sum_all()?)? / n;
    let approx_kl = 0.5 * scalar(&(diff.sqr()? * mask)?.sum_all()?)? / n;
    let ratio_mean = scalar(&(ratio.detach() * mask)?.sum_all()?)? / n;
    Ok((loss, clipfrac, approx_kl, ratio_mean))
}

/// Clipped value loss: `0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old) - R)^2))`.
pub fn value_loss(
    v: &Tensor,
    v_old: &Tensor,
    ret: &Tensor,
    mask: &Tensor,
    clip: f64,
) -> Result<Tensor> {
    let vclip = (v_old + (v - v_old)?.clamp(-clip, clip)?)?;
    let a = (v - ret)?.sqr()?;
    let b = (vclip - ret)?.sqr()?;
    Ok((masked_mean(&a.maximum(&b)?, mask)? * 0.5)?)
}

struct Buffer {
    ro: Rollout,
    adv: Tensor,
    ret: Tensor,
    values: Tensor,
    batches: VecDeque<Vec<usize>>,
}

struct PpoTask<'a> {
    env: &'a Env,
    policy: Transformer,
    value: Scorer,
    reference: Option<(Transformer, ParamStore)>,
    tok: Tokenizer,
    rewards: RewardFn,
    prompts: Vec<PromptRecord>,
    eval_prompts: Vec<PromptRecord>,
    sampler: WindowSampler,
    rng: Rng,
    buffer: Option<Buffer>,
    beta: f64,
    last_kl: f64,
    gen_secs: f64,
    train_secs: f64,
}

impl PpoTask<'_> {
    fn sample_cfg(&self) -> SampleCfg {
        let c = &self.env.cfg.ppo;
        SampleCfg {
            max_new_tokens: c.max_new_tokens,
            temperature: c.temperature,
            top_k: c.top_k,
            top_p: c.top_p,
            stop: vec![],
        }
    }

    fn rollout(&mut self) -> Result<Vec<(String, f64)>> {
        let c = self.env.cfg.ppo.clone();
        let ctx = self.env.ctx(true, None);
        let records: Vec<PromptRecord> = (0..c.rollout_batch)
            .map(|_| self.prompts[self.sampler.next_index()].clone())
            .collect();
        let ids: Vec<Vec<u32>> = records
            .iter()
            .map(|r| self.tok.encode(&r.prompt))
            .collect::<Result<_>>()?;
        let t0 = Instant::now();
        let sampled = rollout::sample(
            &self.policy,
            ctx,
            &self.tok,
            &ids,
            &self.sample_cfg(),
            &mut self.rng,
        )?;
        let gen = t0.elapsed().as_secs_f64();
        self.gen_secs += gen;
        let reference = match &self.reference {
            Some((r, _)) => Reference::Separate(r),
            None => Reference::AdaptersOff,
        };
        let ro = rollout::build(
            &self.policy,
            ctx,
            &reference,
            &self.tok,
            &records,
            &ids,
            sampled,
            &self.rewards,
        )?;
        let b = records.len();
        let all: Vec<usize> = (0..b).collect();
        let values = (response_values(&self.value, ctx, &ro, &all)?.detach() * &ro.mask)?;
        let kl = (kl_estimate(&ro.old_logprobs, &ro.ref_logprobs, c.kl_estimator)? * &ro.mask)?;
        let raw_scores = ro.scores.clone();
        let mut scores = raw_scores.clone();
        for (i, s) in scores.iter_mut().enumerate() {
            if let (Some(p), false) = (c.missing_eos_penalty, ro.finished[i]) {
                *s -= p;
            }
            if let Some(clip) = c.score_clip {
                *s = s.clamp(-clip, clip);
            }
        }
        let r = ro.resp_len;
        let mut score_grid = vec![0f32; b * r];
        for i in 0..b {
            let last = ro.lengths[i].max(1) - 1;
            score_grid[i * r + last] = scores[i] as f32;
        }
        let score_grid = Tensor::from_vec(score_grid, (b, r), ro.mask.device())?;
        let rewards = ((kl.clone() * -self.beta)? + score_grid)?;
        let g = gae(
            &rewards,
            &values,
            &ro.mask,
            c.gamma,
            c.lam,
            self.env.kernels.gae,
        )?;
        let adv = if c.whiten_advantages {
            whiten(&g.advantages, &ro.mask, g.mean, g.var)?
        } else {
            g.advantages.clone()
        };
        // Statistics of the rollout, logged with the step that sampled it.
        let kl_seq = scalar(&kl.sum_all()?)? / b as f64;
        self.last_kl = kl_seq;
        let mask_v = ro.mask.flatten_all()?.to_vec1::<f32>()?;
        let ret_v = g.returns.flatten_all()?.to_vec1::<f32>()?;
        let val_v = values.flatten_all()?.to_vec1::<f32>()?;
        let resid: Vec<f32> = ret_v.iter().zip(&val_v).map(|(a, b)| a - b).collect();
        let (_, var_ret) = masked_mean_var(&ret_v, &mask_v);
        let (_, var_res) = masked_mean_var(&resid, &mask_v);
        let explained = if var_ret > 0.0 {
            1.0 - var_res / var_ret
        } else {
            0.0
        };
        let mean_len = ro.lengths.iter().sum::<usize>() as f64 / b as f64;
        let eos = ro.finished.iter().filter(|&&f| f).count() as f64 / b as f64;
        let stats = vec![
            (
                "score".to_string(),
                raw_scores.iter().sum::<f64>() / b as f64,
            ),
            ("kl".to_string(), kl_seq),
            ("beta".to_string(), self.beta),
            ("explained_variance".to_string(), explained),
            ("response_length".to_string(), mean_len),
            ("eos_fraction".to_string(), eos),
            ("gen_time_s".to_string(), gen),
            ("gen_time_total_s".to_string(), self.gen_secs),
            ("train_time_total_s".to_string(), self.train_secs),
            ("rollout".to_string(), 1.0),
        ];
        if c.adaptive_kl {
            // Ziegler et al.: move beta proportionally to how far the KL is from its target.
            let err = (kl_seq / c.target_kl - 1.0).clamp(-0.2, 0.2);
            self.beta *= 1.0 + err * b as f64 / c.kl_horizon;
        }
        let mut batches = VecDeque::new();
        for _ in 0..c.ppo_epochs {
            let mut order = all.clone();
            self.rng.shuffle(&mut order);
            for chunk in order.chunks(c.minibatch_size.max(1)) {
                batches.push_back(chunk.to_vec());
            }
        }
        self.buffer = Some(Buffer {
            ro,
            adv,
            ret: g.returns,
            values,
            batches,
        });
        Ok(stats)
    }

    fn greedy_eval(&self) -> Result<(f64, f64)> {
        rollout::greedy_eval(
            &self.policy,
            self.env.ctx(true, None),
            &self.tok,
            &self.eval_prompts,
            &self.rewards,
            &self.sample_cfg(),
        )
    }
}

impl Task for PpoTask<'_> {
    fn micro_batch(&mut self, _step: usize) -> Result<StepOut> {
        let mut metrics = vec![];
        if self.buffer.as_ref().is_none_or(|b| b.batches.is_empty()) {
            metrics = self.rollout()?;
        }
        let t0 = Instant::now();
        let c = &self.env.cfg.ppo;
        let ctx = self.env.ctx(true, None);
        let buf = self.buffer.as_mut().expect("rollout just filled it");
        let idx = buf.batches.pop_front().expect("non-empty");
        let ro = &buf.ro;
        let mask = rows(&ro.mask, &idx)?;
        let (logp, ent) = response_logprobs(&self.policy, ctx, ro, &idx, true)?;
        let (pg, clipfrac, approx_kl, ratio) = policy_loss(
            &logp,
            &rows(&ro.old_logprobs, &idx)?,
            &rows(&buf.adv, &idx)?,
            &mask,
            c.cliprange,
        )?;
        let v = response_values(&self.value, ctx, ro, &idx)?;
        let vf = value_loss(
            &v,
            &rows(&buf.values, &idx)?,
            &rows(&buf.ret, &idx)?,
            &mask,
            c.cliprange_value,
        )?;
        let ent = masked_mean(&ent.expect("asked for entropy"), &mask)?;
        let mut loss = (&pg + (&vf * c.vf_coef)?)?;
        if c.entropy_coef != 0.0 {
            loss = (loss - (&ent * c.entropy_coef)?)?;
        }
        let tokens = idx.len() * (ro.prompt_cols + ro.resp_len);
        metrics.extend([
            ("policy_loss".to_string(), scalar(&pg)?),
            ("value_loss".to_string(), scalar(&vf)?),
            ("entropy".to_string(), scalar(&ent)?),
            ("clipfrac".to_string(), clipfrac),
            ("approx_kl".to_string(), approx_kl),
            ("ratio".to_string(), ratio),
        ]);
        self.train_secs += t0.elapsed().as_secs_f64();
        Ok(StepOut {
            loss,
            tokens,
            metrics,
        })
    }

    fn evaluate(&mut self) -> Result<Vec<(String, f64)>> {
        let (acc, reward) = self.greedy_eval()?;
        Ok(vec![
            ("accuracy".into(), acc),
            ("mean_reward".into(), reward),
            ("kl".into(), self.last_kl),
            ("beta".into(), self.beta),
        ])
    }

    fn state(&self) -> serde_json::Value {
        let (e, c) = self.sampler.position();
        serde_json::json!({"epoch": e, "cursor": c, "rng": self.rng.state, "beta": self.beta})
    }

    fn lr_scale(&self, name: &str) -> f64 {
        if name.starts_with("value.") {
            self.env.cfg.ppo.value_lr_scale
        } else {
            1.0
        }
    }

    fn restore(&mut self, s: &serde_json::Value) -> Result<()> {
        let get = |k: &str| s.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        self.sampler.seek(get("epoch"), get("cursor") as usize);
        self.rng.state = get("rng");
        self.beta = s.get("beta").and_then(|v| v.as_f64()).unwrap_or(self.beta);
        // A rollout interrupted mid-way is sampled afresh.
        self.buffer = None;
        Ok(())
    }
}

pub struct PolicyResult {
    pub stage: &'static str,
    pub accuracy: f64,
    pub start_accuracy: f64,
    pub mean_reward: f64,
    pub start_mean_reward: f64,
    pub kl: f64,
}

impl PolicyResult {
    pub fn describe(&self) -> String {
        format!(
            "{}: accuracy {:.3} (from {:.3}), mean reward {:.3} (from {:.3}), KL to reference {:.4}",
            self.stage, self.accuracy, self.start_accuracy, self.mean_reward, self.start_mean_reward, self.kl
        )
    }
}

/// Training and held-out prompts: the built-in task's, or the prompt files named.
pub fn prompt_sets(
    env: &Env,
    n_train: usize,
    n_eval: usize,
) -> Result<(Vec<PromptRecord>, Vec<PromptRecord>)> {
    let cfg = &env.cfg;
    match &cfg.data.path {
        None => {
            let s = synthetic(env);
            Ok((
                s.prompts(Split::Train, n_train),
                s.prompts(Split::Eval, n_eval),
            ))
        }
        Some(p) => {
            let mut all = load_prompts(p)?;
            match &cfg.data.eval_path {
                Some(e) => Ok((all, load_prompts(e)?)),
                None => {
                    if all.len() < 2 {
                        bail!("{}: needs at least 2 prompts to hold one out", p.display());
                    }
                    let n = ((all.len() as f64 * cfg.data.val_fraction).round() as usize).max(1);
                    let eval = all.split_off(all.len() - n);
                    Ok((all, eval))
                }
            }
        }
    }
}

/// Encodes every prompt once to check it fits the context with room for the response.
pub fn check_prompt_lengths(
    tok: &Tokenizer,
    prompts: &[PromptRecord],
    new_tokens: usize,
    ctx: usize,
) -> Result<()> {
    for (i, p) in prompts.iter().enumerate() {
        let n = tok.encode(&p.prompt)?.len();
        let place = place(&p.origin, "prompt", i);
        if n == 0 {
            bail!("{place}: field \"prompt\": empty after tokenisation");
        }
        if n + new_tokens > ctx {
            bail!(
                "{place}: field \"prompt\": {n} tokens plus {new_tokens} new tokens exceed the model's context of {ctx} tokens"
            );
        }
    }
    Ok(())
}

pub fn run(env: &Env) -> Result<PolicyResult> {
    let cfg = &env.cfg;
    let c = &cfg.ppo;
    let init = cfg
        .init
        .as_ref()
        .context("ppo needs --init CHECKPOINT (an SFT model)")?;
    let loaded = read_checkpoint(init, &env.device)?;
    let lora = cfg.lora.enabled().then_some(&cfg.lora);
    let mut store = ParamStore::new(env.device.clone(), cfg.train.seed);
    let policy = policy_from(&loaded, &mut store, "model", lora)?;
    let tok = loaded.tokenizer.clone();
    let value_src = match (&c.value_init, RewardFn::first_model_path(&c.rewards)) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(p)) => Some(PathBuf::from(p)),
        (None, None) => None,
    };
    let value = match &value_src {
        Some(p) => {
            let l = read_checkpoint(p, &env.device)?;
            let (net, head) = scored_from(&l, &mut store, "value.", None, false)?;
            // The reward model's head speaks in its own score units; when that model is not
            // what PPO is rewarded by, its head would start every value on the wrong scale
            // (we measured explained variance of -29 on the built-in task), so only its
            // transformer is kept and the head starts at zero.
            let scores_are_rewards = RewardFn::first_model_path(&c.rewards)
                .is_some_and(|r| std::path::Path::new(&r) == p.as_path());
            if !scores_are_rewards {
                for (name, var) in store.iter().filter(|(n, _)| n.starts_with("value.score.")) {
                    var.set(&var.zeros_like().with_context(|| name.clone())?)?;
                }
            }
            Scorer { net, head }
        }
        None => {
            let (net, head) = scored_from(&loaded, &mut store, "value.", None, true)?;
            Scorer { net, head }
        }
    };
    // With LoRA the reference is the base with adapters off: one copy of the base weights.
    let reference = match lora {
        Some(_) => None,
        None => {
            let mut rs = ParamStore::new(env.device.clone(), 0);
            let net = policy_from(&loaded, &mut rs, "model", None)?;
            Some((net, rs))
        }
    };
    let rewards = RewardFn::load(&c.rewards, &env.device, &tok)?;
    let (prompts, eval_prompts) = prompt_sets(env, c.task_prompts, c.eval_prompts)?;
    let ctx_len = policy.cfg.max_position_embeddings;
    check_prompt_lengths(&tok, &prompts, c.max_new_tokens, ctx_len)?;
    check_prompt_lengths(&tok, &eval_prompts, c.max_new_tokens, ctx_len)?;
    eprintln!(
        "[ppo] reward {}, value model from {}, reference: {}",
        rewards.names.join(" + "),
        value_src
            .as_ref()
            .map_or("the policy (fresh head)".to_string(), |p| p
                .display()
                .to_string()),
        if lora.is_some() {
            "the base with adapters off"
        } else {
            "a frozen copy"
        }
    );
    let meta = CheckpointMeta {
        stage: "ppo".into(),
        kind: "policy".into(),
        model: policy.cfg.clone(),
        lora: lora.cloned(),
        step: 0,
    };
    let mut task = PpoTask {
        env,
        policy,
        value,
        reference,
        tok: tok.clone(),
        rewards,
        sampler: WindowSampler::new(prompts.len(), cfg.train.seed),
        prompts,
        eval_prompts,
        rng: Rng::new(cfg.train.seed ^ 0x990),
        buffer: None,
        beta: c.kl_coef,
        last_kl: 0.0,
        gen_secs: 0.0,
        train_secs: 0.0,
    };
    let saved = Saved {
        store: &store,
        meta,
        tokenizer: &tok,
    };
    let trainable = |n: &str| {
        n.starts_with("value.")
            || if lora.is_some() {
                is_adapter(n)
            } else {
                !n.starts_with("value.")
            }
    };
    let summary = runner::train(
        &mut task,
        &saved,
        &trainable,
        &RunOpts {
            cfg: &cfg.train,
            run_dir: &env.run_dir,
            resume: env.resume,
            label: "ppo",
            eval_at_start: true,
        },
    )?;
    Ok(PolicyResult {
        stage: "ppo",
        accuracy: get(&summary.last_eval, "accuracy").unwrap_or(f64::NAN),
        start_accuracy: get(&summary.first_eval, "accuracy").unwrap_or(f64::NAN),
        mean_reward: get(&summary.last_eval, "mean_reward").unwrap_or(f64::NAN),
        start_mean_reward: get(&summary.first_eval, "mean_reward").unwrap_or(f64::NAN),
        kl: get(&summary.last_eval, "kl").unwrap_or(f64::NAN),
    })
}
