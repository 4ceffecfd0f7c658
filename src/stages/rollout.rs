//! What PPO and GRPO share: sampling responses from the policy, scoring them (reward models
//! combined with weights, or the task's checker), and the per-token log-probabilities of the
//! policy and the reference on the response tokens.
//!
//! Layout: prompts are left-padded to `L` columns and responses right-padded to `R`, so every
//! response starts at column `L`; the logits at column `L - 1 + t` predict response token `t`.

use std::collections::VecDeque;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use super::loader::{read_checkpoint, scored_from};
use super::reward::Scorer;
use super::rl::policy_loss;
use crate::config::{RewardSource, RewardSpec};
use crate::data::records::PromptRecord;
use crate::data::synthetic::exact_match;
use crate::data::tokenizer::Tokenizer;
use crate::generate::{generate, left_pad, SampleCfg};
use crate::model::linear::Ctx;
use crate::model::{Fwd, Transformer};
use crate::train::loss::{entropy, scalar, token_logprobs};
use crate::train::params::{Net, ParamStore};
use crate::train::rng::Rng;

/// The sequence score: a weighted sum of frozen reward models and/or the task's checker
/// (1 for an exact answer, 0 otherwise).
pub struct RewardFn {
    models: Vec<(Scorer, f64, ParamStore)>,
    task_weight: f64,
    pub names: Vec<String>,
}

impl RewardFn {
    /// Loads every reward model `specs` names (each into its own frozen store).
    pub fn load(specs: &[RewardSpec], device: &Device, tok: &Tokenizer) -> Result<Self> {
        if specs.is_empty() {
            bail!("no reward named: use --reward task or --reward PATH[:WEIGHT]");
        }
        let mut r = Self {
            models: vec![],
            task_weight: 0.0,
            names: vec![],
        };
        for spec in specs {
            r.names.push(spec.to_string());
            let path = match &spec.source {
                RewardSource::Task => {
                    r.task_weight += spec.weight;
                    continue;
                }
                RewardSource::Model(p) => p,
            };
            let loaded = read_checkpoint(path, device)?;
            if loaded.tokenizer.vocab_size() != tok.vocab_size() {
                bail!(
                    "{}: the reward model's tokenizer differs from the policy's",
                    path.display()
                );
            }
            let mut store = ParamStore::new(device.clone(), 0);
            let scorer = scored_from(&loaded, &mut store, Net::Policy, None, false)?;
            r.models.push((scorer, spec.weight, store));
        }
        Ok(r)
    }

    pub fn uses_task(&self) -> bool {
        self.task_weight != 0.0
    }

    pub fn score(
        &self,
        prompts: &[PromptRecord],
        seqs: &[Vec<u32>],
        texts: &[String],
        pad: u32,
        ctx: Ctx,
    ) -> Result<Vec<f64>> {
        let mut total = vec![0f64; seqs.len()];
        if self.task_weight != 0.0 {
            for (i, (p, t)) in prompts.iter().zip(texts).enumerate() {
                let Some(answer) = &p.answer else {
                    bail!("the task reward needs an `answer` field in every prompt record");
                };
                total[i] += self.task_weight * f64::from(u8::from(exact_match(t, answer)));
            }
        }
        for (m, w, _) in &self.models {
            let ctx = Ctx {
                use_lora: false,
                dropout_seed: None,
                ..ctx
            };
            let s = m
                .score(seqs, pad, ctx)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            for (t, x) in total.iter_mut().zip(s) {
                *t += w * x as f64;
            }
        }
        Ok(total)
    }
}

pub struct Rollout {
    pub ids: Tensor,
    pub key_valid: Tensor,
    pub positions: Tensor,
    pub prompt_cols: usize,
    pub resp_len: usize,
    pub resp_tokens: Tensor,
    /// `[B, R]` 1.0 on response tokens (up to and including EOS), 0.0 on padding.
    pub mask: Tensor,
    pub old_logprobs: Tensor,
    pub ref_logprobs: Tensor,
    pub scores: Vec<f64>,
    pub finished: Vec<bool>,
    pub lengths: Vec<usize>,
}

/// The reference policy: the same network with adapters off (one copy of the base weights),
/// or a separate frozen network.
pub enum Reference<'a> {
    AdaptersOff,
    Separate(&'a Transformer),
}

pub struct Sampled {
    pub gen_tokens: Vec<Vec<u32>>,
    pub texts: Vec<String>,
    pub finished: Vec<bool>,
}

/// Greedy accuracy on prompts with answers (NaN when some have none) and the mean reward of
/// the greedy responses, as PPO and GRPO report them before and after training. One greedy
/// generation serves both: exact match reads only the first line of each response.
pub fn greedy_eval(
    policy: &Transformer,
    ctx: Ctx,
    tok: &Tokenizer,
    prompts: &[PromptRecord],
    rewards: &RewardFn,
    sampling: &SampleCfg,
) -> Result<(f64, f64)> {
    let cfg = SampleCfg {
        temperature: 0.0,
        ..sampling.clone()
    };
    let has_answers = prompts.iter().all(|p| p.answer.is_some());
    let (mut correct, mut total) = (0usize, 0.0);
    for chunk in prompts.chunks(64) {
        let ids: Vec<Vec<u32>> = chunk
            .iter()
            .map(|r| tok.encode(&r.prompt))
            .collect::<Result<_>>()?;
        let g = generate(policy, ctx, tok, &ids, &cfg, &mut Rng::new(0))?;
        correct += chunk
            .iter()
            .zip(&g.texts)
            .filter(|(p, text)| p.answer.as_ref().is_some_and(|a| exact_match(text, a)))
            .count();
        let seqs = g.sequences(&ids);
        total += rewards
            .score(chunk, &seqs, &g.texts, tok.pad_id(), ctx)?
            .iter()
            .sum::<f64>();
    }
    let n = prompts.len().max(1) as f64;
    let acc = if has_answers {
        correct as f64 / n
    } else {
        f64::NAN
    };
    Ok((acc, total / n))
}

/// Samples a response for every prompt and lays prompt + response out as described above.
pub fn sample(
    net: &Transformer,
    ctx: Ctx,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    cfg: &SampleCfg,
    rng: &mut Rng,
) -> Result<Sampled> {
    let g = generate(net, ctx, tok, prompts, cfg, rng)?;
    Ok(Sampled {
        gen_tokens: g.tokens,
        texts: g.texts,
        finished: g.finished,
    })
}

/// Lays prompts (left-padded to `L`) and their responses (right-padded to `R`) out as the
/// module doc describes; log-probabilities and scores are left empty.
fn layout(prompts: &[Vec<u32>], s: &Sampled, pad: u32, dev: &Device) -> Result<Rollout> {
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
        ref_logprobs: Tensor::zeros((b, r), DType::F32, dev)?,
        scores: vec![],
        finished: s.finished.clone(),
        lengths: s.gen_tokens.iter().map(Vec::len).collect(),
    })
}

/// Builds the rollout tensors of `prompts` and their sampled responses, with old and
/// reference log-probabilities (no gradients) and scores.
#[allow(clippy::too_many_arguments)]
pub fn build(
    net: &Transformer,
    ctx: Ctx,
    reference: &Reference,
    tok: &Tokenizer,
    records: &[PromptRecord],
    prompts: &[Vec<u32>],
    s: Sampled,
    rewards: &RewardFn,
) -> Result<Rollout> {
    let mut ro = layout(prompts, &s, tok.pad_id(), net.device())?;
    let all: Vec<usize> = (0..prompts.len()).collect();
    ro.old_logprobs = response_logprobs(net, ctx, &ro, &all, false)?.0.detach();
    let ref_net = match reference {
        Reference::AdaptersOff => net,
        Reference::Separate(r) => r,
    };
    let ref_ctx = Ctx {
        use_lora: false,
        ..ctx
    };
    ro.ref_logprobs = response_logprobs(ref_net, ref_ctx, &ro, &all, false)?
        .0
        .detach();
    let seqs = crate::generate::concat(prompts, &s.gen_tokens);
    ro.scores = rewards.score(records, &seqs, &s.texts, tok.pad_id(), ctx)?;
    Ok(ro)
}

/// A rollout's minibatches: `epochs` shuffled passes over its `n` rows, `size` rows each.
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

/// The policy half of one minibatch: the current policy's log-probabilities on the rollout's
/// responses and the clipped surrogate against the rollout's own.
pub struct PolicyStep {
    pub loss: Tensor,
    pub logp: Tensor,
    /// `[b, R]` valid response tokens of the minibatch.
    pub mask: Tensor,
    pub entropy: Option<Tensor>,
    pub clipfrac: f64,
    pub approx_kl: f64,
    pub ratio: f64,
}

impl PolicyStep {
    /// Rows `idx` of `ro`, with advantages `adv` (`[B, R]`) and clip range `eps`.
    pub fn compute(
        policy: &Transformer,
        ctx: Ctx,
        ro: &Rollout,
        adv: &Tensor,
        idx: &[usize],
        eps: f64,
        want_entropy: bool,
    ) -> Result<Self> {
        let mask = rows(&ro.mask, idx)?;
        let (logp, entropy) = response_logprobs(policy, ctx, ro, idx, want_entropy)?;
        let (loss, clipfrac, approx_kl, ratio) = policy_loss(
            &logp,
            &rows(&ro.old_logprobs, idx)?,
            &rows(adv, idx)?,
            &mask,
            eps,
        )?;
        Ok(Self {
            loss,
            logp,
            mask,
            entropy,
            clipfrac,
            approx_kl,
            ratio,
        })
    }

    /// What every policy-gradient stage logs per minibatch.
    pub fn metrics(&self) -> Result<[(&'static str, f64); 4]> {
        Ok([
            ("policy_loss", scalar(&self.loss)?),
            ("clipfrac", self.clipfrac),
            ("approx_kl", self.approx_kl),
            ("ratio", self.ratio),
        ])
    }
}

/// Selected rows of a rollout tensor.
pub fn rows(t: &Tensor, idx: &[usize]) -> Result<Tensor> {
    let i: Vec<u32> = idx.iter().map(|&x| x as u32).collect();
    Ok(t.index_select(&Tensor::from_vec(i, idx.len(), t.device())?, 0)?)
}

/// Hidden states `[b, R, H]` of the selected rows at the positions that predict each response
/// token (column `L - 1 + t` predicts token `t`).
fn response_hidden(net: &Transformer, ctx: Ctx, ro: &Rollout, idx: &[usize]) -> Result<Tensor> {
    let ids = rows(&ro.ids, idx)?;
    let kv = rows(&ro.key_valid, idx)?;
    let pos = rows(&ro.positions, idx)?;
    let f = Fwd {
        ctx,
        positions: Some(&pos),
        key_valid: Some(&kv),
    };
    let hidden = net.hidden(&ids, &f, None)?;
    let h = hidden.narrow(1, ro.prompt_cols - 1, ro.resp_len)?;
    Ok(h.contiguous()?)
}

/// Log-probabilities `[b, R]` of the response tokens of the selected rows (and, with
/// `want_entropy`, the policy entropy at each response position).
pub fn response_logprobs(
    net: &Transformer,
    ctx: Ctx,
    ro: &Rollout,
    idx: &[usize],
    want_entropy: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let h = response_hidden(net, ctx, ro, idx)?;
    let logits = net.logits(&h)?;
    let targets = rows(&ro.resp_tokens, idx)?;
    let lp = token_logprobs(&logits, &targets)?;
    let ent = if want_entropy {
        Some(entropy(&logits)?)
    } else {
        None
    };
    Ok((lp, ent))
}

/// Values `[b, R]`: the value model's output at the position before each response token.
pub fn response_values(value: &Scorer, ctx: Ctx, ro: &Rollout, idx: &[usize]) -> Result<Tensor> {
    value
        .head
        .forward(&response_hidden(&value.net, ctx, ro, idx)?)
}
