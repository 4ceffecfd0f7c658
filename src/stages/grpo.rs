//! GRPO: `group_size` samples per prompt, the advantage of each response is its score
//! normalised within its group, `(r - mean) / (std + eps)`, for every one of its tokens; no
//! value model; the loss is the clipped surrogate plus `beta` times the k3 KL estimate to the
//! reference, averaged over all valid tokens (TRL's token-level `dapo`-style aggregation).

use std::collections::VecDeque;

use anyhow::{Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::loader::{policy_from, read_checkpoint};
use super::ppo::{
    check_prompt_lengths, kl_estimate, policy_loss, prompt_sets, KlEstimator, PolicyResult,
};
use super::pretrain::WindowSampler;
use super::rollout::{self, response_logprobs, rows, Reference, RewardFn, Rollout};
use super::Env;
use crate::data::records::PromptRecord;
use crate::data::tokenizer::Tokenizer;
use crate::generate::SampleCfg;
use crate::kernels::gae::group_normalize;
use crate::model::Transformer;
use crate::train::checkpoint::CheckpointMeta;
use crate::train::loss::{masked_mean, scalar};
use crate::train::params::ParamStore;
use crate::train::rng::Rng;
use crate::train::runner::{self, get, is_adapter, RunOpts, Saved, StepOut, Task};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    pub rewards: Vec<String>,
    pub group_size: usize,
    pub prompts_per_rollout: usize,
    pub epochs: usize,
    pub minibatch_size: usize,
    pub beta: f64,
    pub cliprange: f64,
    pub temperature: f64,
    pub max_new_tokens: usize,
    pub eps: f64,
    pub task_prompts: usize,
    pub eval_prompts: usize,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            rewards: vec!["task".into()],
            group_size: 8,
            prompts_per_rollout: 32,
            epochs: 1,
            minibatch_size: 64,
            beta: 0.04,
            cliprange: 0.2,
            temperature: 1.0,
            max_new_tokens: 6,
            eps: 1e-4,
            task_prompts: 4000,
            eval_prompts: 1000,
        }
    }
}

struct Buffer {
    ro: Rollout,
    adv: Tensor,
    batches: VecDeque<Vec<usize>>,
}

struct GrpoTask<'a> {
    env: &'a Env,
    policy: Transformer,
    reference: Option<(Transformer, ParamStore)>,
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
    fn rollout(&mut self) -> Result<Vec<(String, f64)>> {
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
        let scores = Tensor::from_vec(
            ro.scores.iter().map(|&s| s as f32).collect::<Vec<_>>(),
            b,
            ro.mask.device(),
        )?;
        let adv_seq = group_normalize(&scores, c.group_size, c.eps, self.env.kernels.gae)?;
        let adv = adv_seq
            .unsqueeze(1)?
            .broadcast_as((b, ro.resp_len))?
            .contiguous()?;
        let kl = (kl_estimate(&ro.old_logprobs, &ro.ref_logprobs, KlEstimator::K3)? * &ro.mask)?;
        self.last_kl = scalar(&kl.sum_all()?)? / b as f64;
        let mut batches = VecDeque::new();
        let all: Vec<usize> = (0..b).collect();
        for _ in 0..c.epochs.max(1) {
            let mut order = all.clone();
            self.rng.shuffle(&mut order);
            for chunk in order.chunks(c.minibatch_size.max(1)) {
                batches.push_back(chunk.to_vec());
            }
        }
        let stats = vec![
            (
                "score".to_string(),
                ro.scores.iter().sum::<f64>() / b as f64,
            ),
            ("kl".to_string(), self.last_kl),
            (
                "response_length".to_string(),
                ro.lengths.iter().sum::<usize>() as f64 / b as f64,
            ),
            ("rollout".to_string(), 1.0),
        ];
        self.buffer = Some(Buffer { ro, adv, batches });
        Ok(stats)
    }
}

impl Task for GrpoTask<'_> {
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
        let mask = rows(&ro.mask, &idx)?;
        let (logp, _) = response_logprobs(&self.policy, ctx, ro, &idx, false)?;
        let (pg, clipfrac, approx_kl, ratio) = policy_loss(
            &logp,
            &rows(&ro.old_logprobs, &idx)?,
            &rows(&buf.adv, &idx)?,
            &mask,
            c.cliprange,
        )?;
        let kl = masked_mean(
            &kl_estimate(&logp, &rows(&ro.ref_logprobs, &idx)?, KlEstimator::K3)?,
            &mask,
        )?;
        let loss = (&pg + (&kl * c.beta)?)?;
        metrics.extend([
            ("policy_loss".to_string(), scalar(&pg)?),
            ("kl_token".to_string(), scalar(&kl)?),
            ("clipfrac".to_string(), clipfrac),
            ("approx_kl".to_string(), approx_kl),
            ("ratio".to_string(), ratio),
        ]);
        Ok(StepOut {
            loss,
            tokens: idx.len() * (ro.prompt_cols + ro.resp_len),
            metrics,
        })
    }

    fn evaluate(&mut self) -> Result<Vec<(String, f64)>> {
        let c = &self.env.cfg.grpo;
        let (acc, reward) = rollout::greedy_eval(
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
        Ok(vec![
            ("accuracy".into(), acc),
            ("mean_reward".into(), reward),
            ("kl".into(), self.last_kl),
        ])
    }

    fn state(&self) -> serde_json::Value {
        let (e, c) = self.sampler.position();
        serde_json::json!({"epoch": e, "cursor": c, "rng": self.rng.state})
    }

    fn restore(&mut self, s: &serde_json::Value) -> Result<()> {
        let get = |k: &str| s.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        self.sampler.seek(get("epoch"), get("cursor") as usize);
        self.rng.state = get("rng");
        self.buffer = None;
        Ok(())
    }
}

pub fn run(env: &Env) -> Result<PolicyResult> {
    let cfg = &env.cfg;
    let c = &cfg.grpo;
    let init = cfg
        .init
        .as_ref()
        .context("grpo needs --init CHECKPOINT (an SFT model)")?;
    let loaded = read_checkpoint(init, &env.device)?;
    let lora = cfg.lora.enabled().then_some(&cfg.lora);
    let mut store = ParamStore::new(env.device.clone(), cfg.train.seed);
    let policy = policy_from(&loaded, &mut store, "model", lora)?;
    let reference = match lora {
        Some(_) => None,
        None => {
            let mut rs = ParamStore::new(env.device.clone(), 0);
            let net = policy_from(&loaded, &mut rs, "model", None)?;
            Some((net, rs))
        }
    };
    let tok = loaded.tokenizer.clone();
    let rewards = RewardFn::load(&c.rewards, &env.device, &tok)?;
    let (prompts, eval_prompts) = prompt_sets(env, c.task_prompts, c.eval_prompts)?;
    let ctx_len = policy.cfg.max_position_embeddings;
    check_prompt_lengths(&tok, &prompts, c.max_new_tokens, ctx_len)?;
    check_prompt_lengths(&tok, &eval_prompts, c.max_new_tokens, ctx_len)?;
    let meta = CheckpointMeta {
        stage: "grpo".into(),
        kind: "policy".into(),
        model: policy.cfg.clone(),
        lora: lora.cloned(),
        step: 0,
    };
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
    let saved = Saved {
        store: &store,
        meta,
        tokenizer: &tok,
    };
    let trainable = |n: &str| lora.is_none() || is_adapter(n);
    let summary = runner::train(
        &mut task,
        &saved,
        &trainable,
        &RunOpts {
            cfg: &cfg.train,
            run_dir: &env.run_dir,
            resume: env.resume,
            label: "grpo",
            eval_at_start: true,
        },
    )?;
    Ok(PolicyResult {
        stage: "grpo",
        accuracy: get(&summary.last_eval, "accuracy").unwrap_or(f64::NAN),
        start_accuracy: get(&summary.first_eval, "accuracy").unwrap_or(f64::NAN),
        mean_reward: get(&summary.last_eval, "mean_reward").unwrap_or(f64::NAN),
        start_mean_reward: get(&summary.first_eval, "mean_reward").unwrap_or(f64::NAN),
        kl: get(&summary.last_eval, "kl").unwrap_or(f64::NAN),
    })
}
