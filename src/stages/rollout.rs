//! What PPO, GRPO and online DPO share: sampling responses from the policy, scoring them
//! ([`super::rewards`]), and the per-token log-probabilities of the policy and the reference
//! on the response tokens. For the policy-gradient stages, log-probabilities (and entropy)
//! are those of the distribution the tokens were sampled from, the softmax of logits divided
//! by the sampling temperature, as TRL and OpenRLHF compute them; online DPO's are at
//! temperature 1 ([`Objective`]).
//!
//! Layout: prompts are left-padded to `L` columns and responses right-padded to `R`, so every
//! response starts at column `L`; the logits at column `L - 1 + t` predict response token `t`.

mod saved;

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::completions::CompletionLog;
use super::eval::PolicyEval;
use super::reward::Scorer;
use super::rewards::{check_prompts, Batch, RewardFn};
use super::rl::{
    dapo_normalisers, high_entropy_mask, kl_estimate, policy_loss, without_truncated, Aggregation,
    Clip, Form, Surrogate,
};
use super::rollout_packing::RolloutDocs;
use super::setup::rollout_prompt_sets;
use super::Env;
use crate::config::{ImportanceSamplingLevel, KlEstimator, LossType, RewardSpec};
use crate::data::records::PromptRecord;
use crate::data::synthetic::exact_match;
use crate::data::tokenizer::Tokenizer;
use crate::dist::Communicator;
use crate::generate::{generate, left_pad, GenStats, RowKeys, SampleCfg};
use crate::model::linear::Ctx;
use crate::model::{Fwd, Transformer};
use crate::train::loss::scalar;
use crate::train::params::ParamStore;
use crate::train::rng::Rng;

pub use saved::{read_unfinished, Extra, Tensors, Unfinished};

pub struct Rollout {
    pub ids: Tensor,
    pub key_valid: Tensor,
    pub positions: Tensor,
    pub prompt_cols: usize,
    pub resp_len: usize,
    pub resp_tokens: Tensor,
    /// `[B, R]` 1.0 on response tokens (up to and including EOS), 0.0 on padding.
    pub mask: Tensor,
    /// The sampling policy's; zero under [`Objective::Preference`], which reads none.
    pub old_logprobs: Tensor,
    /// None where the stage holds no reference (GRPO with beta = 0), and under
    /// [`Objective::Preference`].
    pub ref_logprobs: Option<Tensor>,
    /// The temperature log-probabilities are taken at: the sampling temperature, or 1 for a
    /// preference objective ([`Objective`]).
    pub temperature: f64,
    /// Each response's weighted score; NaN where no reward applies to it
    /// (`rewards::Scores`).
    pub scores: Vec<f64>,
    /// Each source's unweighted scores (NaN where it does not apply), for the completion log
    /// and GRPO's per-source normalisation.
    pub scores_by_source: Vec<(String, Vec<f64>)>,
    pub texts: Vec<String>,
    pub finished: Vec<bool>,
    pub lengths: Vec<usize>,
    /// Each row's prompt length (unpadded).
    pub prompt_lens: Vec<usize>,
    /// The rows' tokens where the training forward packs them (`packing`); None where it
    /// reads the padded layout.
    pub packed: Option<RolloutDocs>,
}

/// The reference policy: the same network with adapters off (one copy of the base weights),
/// or a separate frozen network.
pub enum Reference<'a> {
    AdaptersOff,
    Separate(&'a Transformer),
}

impl<'a> Reference<'a> {
    /// The network to run as the reference: `policy` itself (with `use_lora` off) or the
    /// separate copy.
    pub fn net(&self, policy: &'a Transformer) -> &'a Transformer {
        match self {
            Reference::AdaptersOff => policy,
            Reference::Separate(r) => r,
        }
    }
}

pub struct Sampled {
    pub gen_tokens: Vec<Vec<u32>>,
    pub texts: Vec<String>,
    pub finished: Vec<bool>,
    pub temperature: f64,
}

/// The frozen reference a policy is held to: a copy of the init (which DPO's TR-DPO moves
/// towards the policy between steps), or none under LoRA, where
/// the reference is the policy with its adapters off (one copy of the base weights).
pub struct FrozenReference(Option<(Transformer, ParamStore)>);

impl FrozenReference {
    pub fn new(copy: Option<(Transformer, ParamStore)>) -> Self {
        Self(copy)
    }

    pub fn get(&self) -> Reference<'_> {
        match &self.0 {
            Some((r, _)) => Reference::Separate(r),
            None => Reference::AdaptersOff,
        }
    }

    pub fn describe(&self) -> &'static str {
        match self.0 {
            Some(_) => "a frozen copy",
            None => "the base with adapters off",
        }
    }

    /// The weights of a separate copy; none for the base with adapters off.
    pub fn store(&self) -> Option<&ParamStore> {
        self.0.as_ref().map(|(_, s)| s)
    }
}

/// What trains on a rollout, which decides the log-probabilities it is built with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Objective {
    /// PPO, GRPO: the sampling policy's (old) and the reference's, at the sampling temperature,
    /// the distribution the tokens were drawn from, as the importance ratios need.
    PolicyGradient,
    /// Online DPO: none. The stage takes the policy's (with gradients) and the reference's
    /// over the rows it trains on alone, the pairs whose scores differ, after scoring; at
    /// temperature 1, as DPO's log-ratios are those of the model's own distribution (TRL's
    /// online DPO takes them so).
    Preference,
}

/// What every on-policy stage holds besides its own knobs: the policy, its frozen reference,
/// the tokenizer, the reward sources and the completion log.
pub struct Actors {
    pub policy: Transformer,
    /// None where the stage's loss reads no reference (GRPO with beta = 0).
    pub reference: Option<FrozenReference>,
    pub tok: Tokenizer,
    pub rewards: RewardFn,
    pub completions: CompletionLog,
    /// Whether the training forward packs each minibatch's rows (`[ppo]` / `[grpo]` /
    /// `[online_dpo] packing`).
    pub packing: bool,
    pub objective: Objective,
}

/// What an on-policy stage's table says about its actors and prompts.
pub struct ActorKnobs<'a> {
    pub rewards: &'a [RewardSpec],
    /// The stage's `packing`: its training forwards, and its reward models, pack rows.
    pub packing: bool,
    /// Training and held-out prompts to draw (`task_prompts`, `eval_prompts`).
    pub prompts: (usize, usize),
    pub max_new_tokens: usize,
    pub log_completions: usize,
    pub objective: Objective,
}

impl Actors {
    /// The actors of an on-policy stage around its `policy` and `reference`, with its
    /// training and held-out prompts: the reward sources loaded, the prompt sets fitted to
    /// the context with room for `max_new_tokens` and checked against what the rewards need,
    /// and the completion log (rank 0 only).
    pub fn load(
        env: &Env,
        policy: Transformer,
        reference: Option<FrozenReference>,
        tok: &Tokenizer,
        k: ActorKnobs,
    ) -> Result<(Self, Vec<PromptRecord>, Vec<PromptRecord>)> {
        let cfg = &env.cfg;
        let mut rewards = RewardFn::load(
            k.rewards,
            (&env.device, env.dtype()),
            tok,
            &cfg.external_reward,
            &|role, loaded| env.check_frozen(role, loaded),
        )?;
        rewards.pack_models = k.packing;
        let (prompts, eval_prompts) = rollout_prompt_sets(
            env,
            tok,
            k.prompts,
            k.max_new_tokens,
            policy.cfg.max_position_embeddings,
            |set| check_prompts(&rewards, set),
        )?;
        let reach = ("--max-new-tokens", k.max_new_tokens);
        if rewards.uses_task() {
            if let Some(w) = super::eval::answers_out_of_reach(tok, &prompts, reach)? {
                crate::warnln!("{w}");
            }
        }
        let actors = Self {
            policy,
            reference,
            tok: tok.clone(),
            rewards,
            completions: CompletionLog::new(&env.run_dir, main_only(env, k.log_completions)),
            packing: k.packing,
            objective: k.objective,
        };
        Ok((actors, prompts, eval_prompts))
    }

    /// Steps 1 and 2 of an iteration: samples a response to each record under `cfg` (record
    /// `i` from the stream of `keys.rows[i]`), scores it, and takes the log-probabilities
    /// `self.objective` needs. Returns the rollout and where its time went.
    pub fn collect(
        &mut self,
        ctx: Ctx,
        records: &[PromptRecord],
        cfg: &SampleCfg,
        keys: &RowKeys,
    ) -> Result<(Rollout, CollectTimes)> {
        let ids: Vec<Vec<u32>> = records
            .iter()
            .map(|r| r.ids(&self.tok))
            .collect::<Result<_>>()?;
        let (sampled, gen) = sample(&self.policy, ctx, &self.tok, &ids, cfg, keys)?;
        let t0 = Instant::now();
        let ro = build(
            &self.policy,
            ctx,
            self.reference.as_ref().map(FrozenReference::get).as_ref(),
            &self.tok,
            records,
            &ids,
            sampled,
            &mut self.rewards,
            (self.packing, self.objective),
        )?;
        let score_s = t0.elapsed().as_secs_f64();
        Ok((ro, CollectTimes { gen, score_s }))
    }

    /// Greedy accuracy and mean reward on held-out prompts, with `kl` and `beta` as the
    /// stage last saw them.
    pub fn evaluate(
        &mut self,
        ctx: Ctx,
        prompts: &[PromptRecord],
        max_new_tokens: usize,
        (kl, beta): (Option<f64>, Option<f64>),
    ) -> Result<PolicyEval> {
        let (accuracy, mean_reward) = greedy_eval(
            &self.policy,
            ctx,
            &self.tok,
            prompts,
            &mut self.rewards,
            max_new_tokens,
        )?;
        Ok(PolicyEval {
            accuracy,
            mean_reward,
            kl,
            beta,
        })
    }
}

/// A rollout being trained on: its advantages and loss mask, and the minibatches (with their
/// DAPO normalisers) still to come.
pub struct Buffer<X> {
    pub ro: Rollout,
    pub adv: Tensor,
    pub loss_mask: Tensor,
    batches: VecDeque<(Vec<usize>, f64)>,
    /// How its minibatches were cut, which a checkpoint keeps with the rest of them.
    plan: Schedule,
    /// What else a stage keeps per rollout (PPO: values and returns).
    pub extra: X,
}

/// How a rollout is cut into minibatches.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    pub epochs: usize,
    pub minibatch_size: usize,
    pub grad_accum: usize,
    /// Drop the loss of responses that ran out of tokens before EOS.
    pub mask_truncated: bool,
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} epoch(s) of minibatches of {} with grad_accum {}{}",
            self.epochs,
            self.minibatch_size,
            self.grad_accum,
            match self.mask_truncated {
                true => ", truncated responses masked",
                false => "",
            }
        )
    }
}

impl<X> Buffer<X> {
    pub fn new(ro: Rollout, adv: Tensor, extra: X, plan: &Schedule, rng: &mut Rng) -> Result<Self> {
        let loss_mask = if plan.mask_truncated {
            without_truncated(&ro.mask, &ro.finished)?
        } else {
            ro.mask.clone()
        };
        let rows: Vec<Vec<usize>> =
            minibatches(ro.lengths.len(), plan.epochs, plan.minibatch_size, rng).into();
        let tokens: Vec<f64> = loss_mask
            .sum(1)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect();
        let norms = dapo_normalisers(&rows, &tokens, plan.grad_accum);
        Ok(Self {
            ro,
            adv,
            loss_mask,
            batches: rows.into_iter().zip(norms).collect(),
            plan: plan.clone(),
            extra,
        })
    }

    pub fn is_spent(&self) -> bool {
        self.batches.is_empty()
    }

    /// Under data parallelism, DAPO's normaliser of each step becomes the ranks' mean: every
    /// rank's loss is its token sum over it, and the loop's mean over ranks then weighs every
    /// token of the global step alike.
    pub fn share_normalisers(&mut self, comm: &dyn Communicator) -> Result<()> {
        if comm.world() == 1 {
            return Ok(());
        }
        let mut norms: Vec<f32> = self.batches.iter().map(|(_, n)| *n as f32).collect();
        comm.all_reduce_mean(&mut norms)?;
        for ((_, n), g) in self.batches.iter_mut().zip(norms) {
            *n = f64::from(g);
        }
        Ok(())
    }

    /// The next minibatch's rows and its DAPO normaliser.
    pub fn next_batch(&mut self) -> Option<(Vec<usize>, f64)> {
        self.batches.pop_front()
    }

    pub fn minibatch<'a>(&'a self, idx: &'a [usize]) -> Minibatch<'a> {
        Minibatch {
            idx,
            adv: &self.adv,
            loss_mask: &self.loss_mask,
        }
    }
}

/// Where a rollout's time went: generation, then scoring (log-probabilities and rewards).
#[derive(Clone, Copy, Debug, Default)]
pub struct CollectTimes {
    pub gen: GenStats,
    pub score_s: f64,
}

/// The time split an RL stage logs per rollout: `gen_s`, `gen_tokens_per_s`,
/// `gen_graph_replays`, `score_s`, and `train_s`, the wall time since the previous rollout was
/// collected (the updates on it). The first rollout of a process (a run's, or a resumed
/// run's) has no previous one to time from, and logs no `train_s` rather than a 0 that would
/// read as free training.
#[derive(Default)]
pub struct RolloutClock {
    last: Option<Instant>,
}

impl RolloutClock {
    pub fn metrics(&mut self, t: &CollectTimes) -> Vec<(&'static str, f64)> {
        let now = Instant::now();
        let since = self.last.map(|l| now.duration_since(l).as_secs_f64());
        self.last = Some(now);
        let mut m = vec![
            ("gen_s", t.gen.seconds),
            ("gen_tokens_per_s", t.gen.tokens_per_s()),
            // Decode steps replayed as a CUDA graph (0 on the CPU).
            ("gen_graph_replays", t.gen.graph_replays as f64),
            ("score_s", t.score_s),
        ];
        // The previous rollout was collected before this one's generation and scoring began.
        m.extend(since.map(|s| ("train_s", (s - t.gen.seconds - t.score_s).max(0.0))));
        m
    }
}

/// What every RL stage logs per rollout: mean score of the scorable responses over every rank
/// (`comm`), mean summed KL `kl_seq`, response length, the fraction that ended with EOS, a
/// `rollout` marker, and the fraction `unscored` that no reward scored (`{"reward": null}`
/// from all). Every rank logs the same names: the loop averages the values by position.
pub fn rollout_stats(
    ro: &Rollout,
    kl_seq: Option<f64>,
    comm: &dyn Communicator,
) -> Result<Vec<(&'static str, f64)>> {
    let b = ro.lengths.len().max(1) as f64;
    let (sum, scored) = scored_sum(&ro.scores);
    let mut total = [sum as f32, scored as f32];
    comm.all_reduce_mean(&mut total)?;
    // Left out where no response of any rank was scored (the same on every rank, as the
    // loop reduces the numbers by position): a NaN would turn the window's mean NaN too.
    let score = (total[1] > 0.0).then(|| ("score", f64::from(total[0]) / f64::from(total[1])));
    // TRL warns when every reward function returned None: such a rollout trains nothing.
    if score.is_none() && !ro.scores.is_empty() {
        crate::console::warn_once(
            "warning: no reward scored any response of a rollout (each answered null): it \
             trains nothing; metrics.jsonl's `unscored` counts each rollout's share"
                .into(),
        );
    }
    let mut stats: Vec<(&'static str, f64)> = score.into_iter().collect();
    stats.extend([
        (
            "response_length",
            ro.lengths.iter().sum::<usize>() as f64 / b,
        ),
        (
            "eos_fraction",
            ro.finished.iter().filter(|&&f| f).count() as f64 / b,
        ),
        ("rollout", 1.0),
        ("unscored", (ro.scores.len() - scored) as f64 / b),
    ]);
    stats.extend(kl_seq.map(|kl| ("kl", kl)));
    // Each source's mean where there are several, as TRL logs `rewards/<name>/mean`: which
    // one moved is otherwise seen only in the completion log's sampled rows.
    if ro.scores_by_source.len() > 1 {
        let mut parts: Vec<f32> = (ro.scores_by_source.iter())
            .flat_map(|(_, s)| {
                let (sum, n) = scored_sum(s);
                [sum as f32, n as f32]
            })
            .collect();
        comm.all_reduce_mean(&mut parts)?;
        for ((name, _), p) in ro.scores_by_source.iter().zip(parts.chunks(2)) {
            if p[1] > 0.0 {
                let key = metric_name(&format!("rewards/{name}"));
                stats.push((key, f64::from(p[0]) / f64::from(p[1])));
            }
        }
    }
    // Under packing: the share of the padded layout's positions a forward over the whole
    // rollout computes (minibatches pack on their own, about as well).
    let all: Vec<usize> = (0..ro.lengths.len()).collect();
    let width = ro.prompt_cols + ro.resp_len;
    let share = ro.packed.as_ref().map(|d| d.computed_share(&all, width));
    stats.extend(share.and_then(Result::ok).map(|s| ("packed_share", s)));
    Ok(stats)
}

/// `name` as a metric's name, which the loop keeps as `&'static str`: a run's reward sources
/// are a few names fixed at its start, each kept once for the process.
fn metric_name(name: &str) -> &'static str {
    static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    match names.iter().find(|n| **n == name) {
        Some(n) => n,
        None => {
            let n: &'static str = Box::leak(name.to_string().into_boxed_str());
            names.push(n);
            n
        }
    }
}

/// The factor each of several loss terms of a rank is multiplied by under data parallelism,
/// in one all-reduce: for a token mean, its share of the ranks' loss-carrying tokens (1 alone,
/// and for the other aggregations, whose ranks already weigh alike). The loop's mean over
/// ranks then weighs every token alike.
pub fn token_shares(comm: &dyn Communicator, terms: &[(Aggregation, &Tensor)]) -> Result<Vec<f64>> {
    let counted: Vec<bool> = terms
        .iter()
        .map(|(agg, _)| comm.world() > 1 && *agg == Aggregation::Token)
        .collect();
    if !counted.contains(&true) {
        return Ok(vec![1.0; terms.len()]);
    }
    let mine: Vec<f64> = terms
        .iter()
        .map(|(_, m)| scalar(&m.to_dtype(DType::F32)?.sum_all()?))
        .collect::<Result<_>>()?;
    let mut mean: Vec<f32> = mine.iter().map(|&x| x as f32).collect();
    comm.all_reduce_mean(&mut mean)?;
    Ok(mine
        .iter()
        .zip(mean)
        .zip(counted)
        .map(|((&m, mean), counted)| match (counted, f64::from(mean)) {
            (false, _) => 1.0,
            (true, mean) if mean > 0.0 => m / mean,
            (true, _) => 0.0,
        })
        .collect())
}

/// The sampling seed of the rollout that starts at optimizer step `step`.
pub fn rollout_seed(run_seed: u64, step: usize) -> u64 {
    use crate::train::rng::splitmix64;
    splitmix64(run_seed ^ 0x0ea1_5eed ^ splitmix64(step as u64))
}

/// The mean of a per-rank mean over the ranks: the global rollout's, since ranks hold equal
/// shares of it (the value itself alone).
pub fn mean_over_ranks(comm: &dyn Communicator, x: f64) -> Result<f64> {
    if comm.world() == 1 {
        return Ok(x);
    }
    let mut v = [x as f32];
    comm.all_reduce_mean(&mut v)?;
    Ok(f64::from(v[0]))
}

/// Logs on rank 0 only: `n` there, 0 (nothing) on the other ranks.
pub fn main_only(env: &super::Env, n: usize) -> usize {
    match env.comm.rank() {
        0 => n,
        _ => 0,
    }
}

/// The surrogate a stage's knobs describe, for a minibatch whose DAPO normaliser is `norm`,
/// of responses of at most `max_new_tokens`.
pub fn surrogate(
    loss_type: LossType,
    clip: Clip,
    level: ImportanceSamplingLevel,
    (norm, max_new_tokens): (f64, usize),
) -> Surrogate {
    let agg = match loss_type {
        LossType::Bnpo => Aggregation::Token,
        LossType::Grpo | LossType::Sapo => Aggregation::Sequence,
        LossType::Dapo | LossType::Cispo | LossType::Vespo => Aggregation::Dapo {
            tokens_per_micro: norm,
        },
        LossType::DrGrpo => Aggregation::DrGrpo {
            max_tokens: max_new_tokens as f64,
        },
        LossType::Luspo => Aggregation::ResponseSum,
    };
    Surrogate {
        clip,
        agg,
        level,
        form: Form::Clipped,
        off_policy: None,
    }
}

/// Greedy accuracy on prompts with answers (None when some have none) and the mean reward of
/// the greedy responses (None when no reward scored any), as PPO and GRPO report them before
/// and after training. One greedy generation serves both: exact match reads only the first
/// line of each response.
pub fn greedy_eval(
    policy: &Transformer,
    ctx: Ctx,
    tok: &Tokenizer,
    prompts: &[PromptRecord],
    rewards: &mut RewardFn,
    max_new_tokens: usize,
) -> Result<(Option<f64>, Option<f64>)> {
    let cfg = SampleCfg {
        max_new_tokens,
        temperature: 0.0,
        ..Default::default()
    };
    let has_answers = prompts.iter().all(|p| p.answer.is_some());
    let (mut correct, mut total, mut scored) = (0usize, 0.0, 0usize);
    for chunk in prompts.chunks(64) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|r| r.ids(tok)).collect::<Result<_>>()?;
        let keys = RowKeys::range(0, 0, ids.len());
        let g = generate(policy, ctx, tok, &ids, &cfg, &keys)?;
        correct += chunk
            .iter()
            .zip(&g.texts)
            .filter(|(p, text)| p.answer.as_ref().is_some_and(|a| exact_match(text, a)))
            .count();
        let batch = Batch {
            records: chunk,
            seqs: &g.sequences(&ids),
            texts: &g.texts,
        };
        let (sum, n) = scored_sum(&rewards.score(&batch, tok.pad_id(), ctx)?.total);
        total += sum;
        scored += n;
    }
    let acc = (has_answers && !prompts.is_empty()).then(|| correct as f64 / prompts.len() as f64);
    // Over the responses some reward applies to.
    let mean = (scored > 0).then(|| total / scored as f64);
    Ok((acc, mean))
}

/// The sum of the scores of scorable responses (not NaN), and how many there are.
pub fn scored_sum(scores: &[f64]) -> (f64, usize) {
    scores
        .iter()
        .filter(|x| !x.is_nan())
        .fold((0.0, 0), |(s, n), x| (s + x, n + 1))
}

/// An error naming the reward that scored none of some response, where a stage needs every
/// response scored (`why` says why); on every rank alike, so that none waits in a collective
/// for one that stopped.
pub fn require_scored(ro: &Rollout, comm: &dyn Communicator, stage: &str, why: &str) -> Result<()> {
    let mine = ro.scores.iter().filter(|x| x.is_nan()).count();
    let mut all = [mine as f32];
    comm.all_reduce_mean(&mut all)?;
    let unscored = (all[0] * comm.world() as f32).round() as usize;
    if unscored == 0 {
        return Ok(());
    }
    let names: Vec<&str> = ro
        .scores_by_source
        .iter()
        .filter(|(_, s)| s.iter().any(|x| x.is_nan()))
        .map(|(n, _)| n.as_str())
        .collect();
    anyhow::bail!(
        "{stage}: {unscored} responses were scored by no reward (null from {}); {why}",
        names.join(", ")
    )
}

/// Samples a response for every prompt (prompt `i` from the stream of `keys.rows[i]`).
pub fn sample(
    net: &Transformer,
    ctx: Ctx,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    cfg: &SampleCfg,
    keys: &RowKeys,
) -> Result<(Sampled, GenStats)> {
    let g = generate(net, ctx, tok, prompts, cfg, keys)?;
    let s = Sampled {
        gen_tokens: g.tokens,
        texts: g.texts,
        finished: g.finished,
        temperature: cfg.temperature,
    };
    Ok((s, g.stats))
}

/// Lays prompts (left-padded to `L`) and their responses (right-padded to `R`) out as the
/// module doc describes; log-probabilities and scores are left empty, and the rollout trains
/// padded (`packed` is None).
pub fn layout(prompts: &[Vec<u32>], s: &Sampled, pad: u32, dev: &Device) -> Result<Rollout> {
    let b = prompts.len();
    let l = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let r = s.gen_tokens.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let (p_ids, p_valid, p_pos) = left_pad(prompts, pad, dev)?;
    let mut resp = vec![pad; b * r];
    let mut mask = vec![0f32; b * r];
    let mut pos = vec![0u32; b * r];
    for (i, toks) in s.gen_tokens.iter().enumerate() {
        for (j, &t) in toks.iter().enumerate() {
            resp[i * r + j] = t;
            mask[i * r + j] = 1.0;
        }
        for j in 0..r {
            pos[i * r + j] = (prompts[i].len() + j) as u32;
        }
    }
    let resp_tokens = Tensor::from_vec(resp, (b, r), dev)?;
    let mask = Tensor::from_vec(mask, (b, r), dev)?;
    let ids = Tensor::cat(&[&p_ids, &resp_tokens], 1)?;
    // Response padding sits after every real token, so it needs no key mask; prompt padding
    // on the left does.
    let key_valid = Tensor::cat(&[&p_valid, &Tensor::ones((b, r), DType::F32, dev)?], 1)?;
    let positions = Tensor::cat(&[&p_pos, &Tensor::from_vec(pos, (b, r), dev)?], 1)?;
    Ok(Rollout {
        ids,
        key_valid,
        positions,
        prompt_cols: l,
        resp_len: r,
        resp_tokens,
        mask,
        old_logprobs: Tensor::zeros((b, r), DType::F32, dev)?,
        ref_logprobs: None,
        temperature: s.temperature,
        scores: vec![],
        scores_by_source: vec![],
        texts: s.texts.clone(),
        finished: s.finished.clone(),
        lengths: s.gen_tokens.iter().map(Vec::len).collect(),
        prompt_lens: prompts.iter().map(Vec::len).collect(),
        packed: None,
    })
}

impl Rollout {
    /// The prompt and response tokens of rows `idx`, padding not counted (for tokens/s,
    /// which then compares between padded and packed runs).
    pub fn tokens(&self, idx: &[usize]) -> usize {
        idx.iter()
            .map(|&i| self.prompt_lens[i] + self.lengths[i])
            .sum()
    }

    /// The per-token KL estimate of the sampling policy to the reference, masked to the
    /// responses; None where the stage holds no reference.
    pub fn kl(&self, estimator: KlEstimator) -> Result<Option<Tensor>> {
        self.ref_logprobs
            .as_ref()
            .map(|r| Ok((kl_estimate(&self.old_logprobs, r, estimator)? * &self.mask)?))
            .transpose()
    }
}

/// Builds the rollout tensors of `prompts` and their sampled responses, with the
/// log-probabilities `objective` needs (no gradients) and scores; with `packing`, every
/// forward over the rollout packs its rows ([`RolloutDocs`]).
#[allow(clippy::too_many_arguments)]
pub fn build(
    net: &Transformer,
    ctx: Ctx,
    reference: Option<&Reference>,
    tok: &Tokenizer,
    records: &[PromptRecord],
    prompts: &[Vec<u32>],
    s: Sampled,
    rewards: &mut RewardFn,
    (packing, objective): (bool, Objective),
) -> Result<Rollout> {
    // Scoring keeps no graph: the rollout's forwards hold no activations past their outputs.
    let _untracked = crate::model::cast::Untracked::enter();
    let mut ro = layout(prompts, &s, tok.pad_id(), net.device())?;
    if packing {
        ro.packed = Some(RolloutDocs::new(prompts, &s.gen_tokens, tok.pad_id())?);
    }
    let all: Vec<usize> = (0..prompts.len()).collect();
    match objective {
        Objective::PolicyGradient => {
            ro.old_logprobs = response_logprobs(net, ctx, &ro, &all, false)?.0.detach();
            if let Some(reference) = reference {
                ro.ref_logprobs = Some(reference_logprobs(reference, net, ctx, &ro, &all)?);
            }
        }
        // `old_logprobs` stays zero and `ref_logprobs` None: nothing reads them.
        Objective::Preference => ro.temperature = 1.0,
    }
    let batch = Batch {
        records,
        seqs: &crate::generate::concat(prompts, &s.gen_tokens),
        texts: &s.texts,
    };
    let scores = rewards.score(&batch, tok.pad_id(), ctx)?;
    ro.scores = scores.total;
    ro.scores_by_source = scores.by_source;
    Ok(ro)
}

/// A rollout's minibatches: `epochs` shuffled passes over its `n` rows, `size` rows each.
/// What a rank's rollout of `rows` responses cut into minibatches of `size` does other than
/// what the size says: a size above the rows takes them all as one minibatch (one optimizer
/// step an epoch), and one that does not divide them leaves each epoch a smaller last one.
pub fn minibatch_warning(table: &str, rows: usize, size: usize) -> Option<String> {
    let key = format!("{table}.minibatch_size");
    if size > rows {
        return Some(format!(
            "{key} = {size} exceeds the {rows} responses of a rollout (per rank): each epoch \
             takes them as one minibatch, one optimizer step"
        ));
    }
    let rest = rows % size.max(1);
    (rest != 0).then(|| {
        format!(
            "{key} = {size} does not divide the {rows} responses of a rollout (per rank): each \
             epoch's last minibatch holds {rest}"
        )
    })
}

pub fn minibatches(n: usize, epochs: usize, size: usize, rng: &mut Rng) -> VecDeque<Vec<usize>> {
    let mut batches = VecDeque::new();
    for _ in 0..epochs {
        let mut order: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut order);
        for chunk in order.chunks(size.max(1)) {
            batches.push_back(chunk.to_vec());
        }
    }
    batches
}

/// One minibatch of a rollout: its rows, and the rollout's advantages and loss mask (`[B, R]`
/// each; the loss mask is the response mask, less truncated responses where those are
/// masked).
pub struct Minibatch<'a> {
    pub idx: &'a [usize],
    pub adv: &'a Tensor,
    pub loss_mask: &'a Tensor,
}

/// Where a policy step needs the policy's entropy at each response token.
#[derive(Clone, Copy)]
pub struct EntropyUse<'c> {
    /// For the loss itself (an entropy bonus), so with its gradient.
    pub bonus: bool,
    /// Keep the policy loss only on this top fraction of tokens by entropy over every rank
    /// of `comm` ([`high_entropy_mask`]).
    pub top: Option<(f64, &'c dyn Communicator)>,
}

/// The policy half of one minibatch: the current policy's log-probabilities on the rollout's
/// responses and the surrogate against the rollout's own.
pub struct PolicyStep {
    pub loss: Tensor,
    pub logp: Tensor,
    /// `[b, R]` the minibatch's tokens that carry loss.
    pub mask: Tensor,
    /// The policy's entropy at each response token, where asked for: with its gradient for a
    /// bonus, detached otherwise.
    pub entropy: Option<Tensor>,
    /// `[b, R]` the valid tokens the policy loss was kept on (top entropy), where it was
    /// restricted.
    pub kept: Option<Tensor>,
    /// The importance ratio at each token, with its gradient.
    pub ratios: Tensor,
    pub clipfrac: f64,
    pub approx_kl: f64,
    pub ratio: f64,
    extra: Vec<(&'static str, f64)>,
}

impl PolicyStep {
    /// The minibatch `mb` of rollout `ro`; the entropy where `entropy` asks for it (PPO's
    /// bonus passes `bonus` alone).
    pub fn compute(
        policy: &Transformer,
        ctx: Ctx,
        ro: &Rollout,
        mb: &Minibatch,
        sur: Surrogate,
        entropy: EntropyUse,
    ) -> Result<Self> {
        let (idx, adv) = (mb.idx, mb.adv);
        let mask = rows(mb.loss_mask, idx)?;
        let want = entropy.bonus || entropy.top.is_some();
        let (logp, mut ent) = response_logprobs(policy, ctx, ro, idx, want)?;
        if !entropy.bonus {
            ent = ent.map(|e| e.detach());
        }
        let kept = match (entropy.top, &ent) {
            (Some((top, comm)), Some(e)) => Some(high_entropy_mask(e, &mask, top, comm)?),
            _ => None,
        };
        let pl = policy_loss(
            &logp,
            &rows(&ro.old_logprobs, idx)?,
            &rows(adv, idx)?,
            &mask,
            kept.as_ref(),
            sur,
        )?;
        Ok(Self {
            loss: pl.loss,
            logp,
            mask,
            entropy: ent,
            kept,
            ratios: pl.ratios,
            clipfrac: pl.clipfrac,
            approx_kl: pl.approx_kl,
            ratio: pl.ratio,
            extra: pl.extra,
        })
    }

    /// What every policy-gradient stage logs per minibatch, and the objective's own. Under
    /// data parallelism the runner averages them over ranks, so each is weighed here as the
    /// loss is: the policy loss by `w_loss`, the token means by `w_tokens`, this rank's share
    /// of the minibatch's tokens ([`token_shares`]; 1 on one rank). The objective's own
    /// (VESPO's mean weight, the share masked off-policy) are this rank's.
    pub fn metrics(&self, w_loss: f64, w_tokens: f64) -> Result<Vec<(&'static str, f64)>> {
        let mut m = vec![
            ("policy_loss", scalar(&self.loss)? * w_loss),
            ("clipfrac", self.clipfrac * w_tokens),
            ("approx_kl", self.approx_kl * w_tokens),
            ("ratio", self.ratio * w_tokens),
        ];
        m.extend(self.extra.iter().copied());
        Ok(m)
    }
}

/// Selected rows of a rollout tensor.
pub fn rows(t: &Tensor, idx: &[usize]) -> Result<Tensor> {
    let i: Vec<u32> = idx.iter().map(|&x| x as u32).collect();
    Ok(t.index_select(&Tensor::from_vec(i, idx.len(), t.device())?, 0)?)
}

/// Hidden states `[b, R, H]` of the selected rows at the positions that predict each response
/// token (column `L - 1 + t` predicts token `t`), from a packed forward where the rollout
/// packs and packing saves positions.
pub(super) fn response_hidden(
    net: &Transformer,
    ctx: Ctx,
    ro: &Rollout,
    idx: &[usize],
) -> Result<Tensor> {
    let width = ro.prompt_cols + ro.resp_len;
    if let Some(docs) = &ro.packed {
        if let Some(rows) = docs.pack(idx, width, ro.resp_len, net.device())? {
            return rows.hidden(net, ctx);
        }
    }
    let ids = rows(&ro.ids, idx)?;
    let kv = rows(&ro.key_valid, idx)?;
    let pos = rows(&ro.positions, idx)?;
    let f = Fwd {
        ctx,
        positions: Some(&pos),
        key_valid: Some(&kv),
        segments: None,
    };
    let hidden = net.hidden(&ids, &f, None)?;
    let h = hidden.narrow(1, ro.prompt_cols - 1, ro.resp_len)?;
    Ok(h.contiguous()?)
}

/// Log-probabilities `[b, R]` of the response tokens of the selected rows (and, with
/// `want_entropy`, the policy entropy at each response position).
/// (At temperature T the sampled distribution is softmax(logits / T); scoring raw logits
/// instead made k1 KL at T = 0.7 average a quarter below the true KL on random 50-way states.)
pub fn response_logprobs(
    net: &Transformer,
    ctx: Ctx,
    ro: &Rollout,
    idx: &[usize],
    want_entropy: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let h = response_hidden(net, ctx, ro, idx)?;
    let targets = rows(&ro.resp_tokens, idx)?;
    // A cap on the logits (Gemma 2) comes before the temperature, as the sampler applies them;
    // the loss head applies both to each logit in its one pass.
    net.tempered_logprobs(&h, &targets, ro.temperature, want_entropy, ctx)
}

/// The reference's log-probabilities `[b, R]` of the response tokens of the selected rows, no
/// gradients: `policy` with its adapters off, or the separate frozen copy.
pub fn reference_logprobs(
    reference: &Reference,
    policy: &Transformer,
    ctx: Ctx,
    ro: &Rollout,
    idx: &[usize],
) -> Result<Tensor> {
    let ctx = Ctx {
        use_lora: false,
        ..ctx
    };
    let _untracked = crate::model::cast::Untracked::enter();
    let lp = response_logprobs(reference.net(policy), ctx, ro, idx, false)?.0;
    Ok(lp.detach())
}

/// Values `[b, R]`: the value model's output at the position before each response token.
pub fn response_values(value: &Scorer, ctx: Ctx, ro: &Rollout, idx: &[usize]) -> Result<Tensor> {
    value
        .head
        .forward(&response_hidden(&value.net, ctx, ro, idx)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::train::loss::log_softmax;
    use crate::train::params::Net;

    #[test]
    fn minibatch_sizes_that_do_other_than_they_say_are_named() {
        let w = |rows, size| minibatch_warning("ppo", rows, size);
        assert_eq!(w(64, 16), None);
        assert_eq!(w(16, 16), None);
        let big = w(16, 64).unwrap();
        assert!(big.contains("= 64 exceeds the 16 responses"), "{big}");
        let uneven = w(48, 32).unwrap();
        assert!(
            uneven.ends_with("each epoch's last minibatch holds 16"),
            "{uneven}"
        );
        // As cut: 48 rows in minibatches of 32 are 32 and 16.
        let cut = minibatches(48, 1, 32, &mut Rng::new(0));
        assert_eq!(cut.iter().map(Vec::len).collect::<Vec<_>>(), [32, 16]);
    }

    /// The log-probabilities PPO and GRPO train on are those of the distribution the tokens
    /// were sampled from: softmax(logits / T), the logits capped first where the model caps
    /// them (Gemma 2). Before the fix they came from the raw logits, and this test failed at
    /// T = 0.7; the capped model's failed while the temperature scaled the hidden states.
    #[test]
    fn logprobs_are_taken_at_the_sampling_temperature() {
        for cap in [None, Some(0.5)] {
            logprobs_at_temperature(cap);
        }
    }

    fn logprobs_at_temperature(final_logit_softcapping: Option<f64>) {
        let cfg = ModelConfig {
            final_logit_softcapping,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 1,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 16,
            ..ModelConfig::default()
        };
        let mut store = ParamStore::new(Device::Cpu, 5);
        let net = Transformer::new(&mut store.scope(Net::Policy), &cfg, None).unwrap();
        let ctx = Ctx::plain(DType::F32);
        let prompts = vec![vec![5u32, 6, 7], vec![9u32]];
        let s = Sampled {
            gen_tokens: vec![vec![10, 11], vec![12, 13]],
            texts: vec![String::new(); 2],
            finished: vec![false; 2],
            temperature: 0.7,
        };
        let ro = layout(&prompts, &s, 0, &Device::Cpu).unwrap();
        let (lp, _) = response_logprobs(&net, ctx, &ro, &[0, 1], false).unwrap();
        let lp = lp.to_vec2::<f32>().unwrap();
        // Row 0 unpadded: its response tokens are predicted at positions 2 and 3.
        let ids = Tensor::new(&[[5u32, 6, 7, 10, 11]], &Device::Cpu).unwrap();
        let f = Fwd {
            ctx,
            positions: None,
            key_valid: None,
            segments: None,
        };
        let logits = net.forward(&ids, &f, None).unwrap();
        let want = log_softmax(&(logits / 0.7).unwrap()).unwrap();
        let want = want.to_vec3::<f32>().unwrap();
        for (j, tok) in [10usize, 11].into_iter().enumerate() {
            let w = want[0][2 + j][tok];
            assert!((lp[0][j] - w).abs() < 1e-4, "{:?} vs {w}", lp[0]);
        }
        // With the entropy or without it, the same log-probabilities.
        let (lp_ent, ent) = response_logprobs(&net, ctx, &ro, &[0, 1], true).unwrap();
        assert!(ent.is_some());
        let lp_ent = lp_ent.to_vec2::<f32>().unwrap();
        for (a, b) in lp.iter().flatten().zip(lp_ent.iter().flatten()) {
            assert!((a - b).abs() < 1e-5, "{lp:?} vs {lp_ent:?}");
        }
    }
}
