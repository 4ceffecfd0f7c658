//! What PPO and GRPO share: sampling responses from the policy, scoring them (reward models
//! combined with weights, or the task's checker), and the per-token log-probabilities of the
//! policy and the reference on the response tokens.
//!
//! Layout: prompts are left-padded to `L` columns and responses right-padded to `R`, so every
//! response starts at column `L`; the logits at column `L - 1 + t` predict response token `t`.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use super::loader::{read_checkpoint, scored_from};
use super::reward::Scorer;
use crate::cli::parse_reward_spec;
use crate::data::records::PromptRecord;
use crate::data::synthetic::exact_match;
use crate::data::tokenizer::Tokenizer;
use crate::generate::{generate, left_pad, SampleCfg};
use crate::model::linear::Ctx;
use crate::model::{Fwd, Transformer};
use crate::train::loss::{entropy, token_logprobs};
use crate::train::params::ParamStore;
use crate::train::rng::Rng;

/// The sequence score: a weighted sum of frozen reward models and/or the task's checker
/// (1 for an exact answer, 0 otherwise).
pub struct RewardFn {
    models: Vec<(Scorer, f64, ParamStore)>,
    task_weight: f64,
    pub names: Vec<String>,
}

impl RewardFn {
    /// `specs`: `task[:W]` or `PATH[:W]` of a reward checkpoint (run directory or checkpoint).
    pub fn load(specs: &[String], device: &Device, tok: &Tokenizer) -> Result<Self> {
        if specs.is_empty() {
            bail!("no reward named: use --reward task or --reward PATH[:WEIGHT]");
        }
        let mut r = Self {
            models: vec![],
            task_weight: 0.0,
            names: vec![],
        };
        for spec in specs {
            let (path, w) = parse_reward_spec(spec)?;
            r.names.push(format!("{path}:{w}"));
            if path == "task" {
                r.task_weight += w;
                continue;
            }
            let loaded = read_checkpoint(std::path::Path::new(&path), device)?;
            if loaded.tokenizer.vocab_size() != tok.vocab_size() {
                bail!("{path}: the reward model's tokenizer differs from the policy's");
            }
            let mut store = ParamStore::new(device.clone(), 0);
            let (net, head) = scored_from(&loaded, &mut store, "", None, false)?;
            r.models.push((Scorer { net, head }, w, store));
        }
        Ok(r)
    }

    /// The first reward model, from which PPO's value model is initialised.
    pub fn first_model_path(specs: &[String]) -> Option<String> {
        specs
            .iter()
            .filter_map(|s| parse_reward_spec(s).ok())
            .map(|(p, _)| p)
            .find(|p| p != "task")
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
        let seqs: Vec<Vec<u32>> = ids
            .iter()
            .zip(&g.tokens)
            .map(|(p, t)| p.iter().chain(t).copied().collect())
            .collect();
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
    let dev = net.device().clone();
    let b = prompts.len();
    let l = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let r = s.gen_tokens.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let (p_ids, p_valid, p_pos) = left_pad(prompts, tok.pad_id(), &dev)?;
    let mut resp = vec![tok.pad_id(); b * r];
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
    let resp_tokens = Tensor::from_vec(resp, (b, r), &dev)?;
    let mask = Tensor::from_vec(mask, (b, r), &dev)?;
    let ids = Tensor::cat(&[&p_ids, &resp_tokens], 1)?;
    // Response padding sits after every real token, so it needs no key mask; prompt padding
    // on the left does.
    let key_valid = Tensor::cat(&[&p_valid, &Tensor::ones((b, r), DType::F32, &dev)?], 1)?;
    let positions = Tensor::cat(&[&p_pos, &Tensor::from_vec(pos, (b, r), &dev)?], 1)?;
    let mut ro = Rollout {
        ids,
        key_valid,
        positions,
        prompt_cols: l,
        resp_len: r,
        resp_tokens,
        mask,
        old_logprobs: Tensor::zeros((b, r), DType::F32, &dev)?,
        ref_logprobs: Tensor::zeros((b, r), DType::F32, &dev)?,
        scores: vec![],
        finished: s.finished.clone(),
        lengths: s.gen_tokens.iter().map(Vec::len).collect(),
    };
    let all: Vec<usize> = (0..b).collect();
    ro.old_logprobs = response_logprobs(net, ctx, &ro, &all, false)?.0.detach();
    ro.ref_logprobs = match reference {
        Reference::AdaptersOff => {
            response_logprobs(
                net,
                Ctx {
                    use_lora: false,
                    ..ctx
                },
                &ro,
                &all,
                false,
            )?
            .0
        }
        Reference::Separate(r) => {
            response_logprobs(
                r,
                Ctx {
                    use_lora: false,
                    ..ctx
                },
                &ro,
                &all,
                false,
            )?
            .0
        }
    }
    .detach();
    let seqs: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&s.gen_tokens)
        .map(|(p, g)| p.iter().chain(g.iter()).copied().collect())
        .collect();
    ro.scores = rewards.score(records, &seqs, &s.texts, tok.pad_id(), ctx)?;
    Ok(ro)
}

/// Selected rows of a rollout tensor.
pub fn rows(t: &Tensor, idx: &[usize]) -> Result<Tensor> {
    let i: Vec<u32> = idx.iter().map(|&x| x as u32).collect();
    Ok(t.index_select(&Tensor::from_vec(i, idx.len(), t.device())?, 0)?)
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
    let logits = net.logits(&h.contiguous()?)?;
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
    let ids = rows(&ro.ids, idx)?;
    let kv = rows(&ro.key_valid, idx)?;
    let pos = rows(&ro.positions, idx)?;
    let f = Fwd {
        ctx,
        positions: Some(&pos),
        key_valid: Some(&kv),
    };
    let hidden = value.net.hidden(&ids, &f, None)?;
    let h = hidden.narrow(1, ro.prompt_cols - 1, ro.resp_len)?;
    value.head.forward(&h.contiguous()?)
}
