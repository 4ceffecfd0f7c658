//! Supervised fine-tuning: prompt/response pairs or chat conversations, loss on the response
//! (assistant) tokens only; full fine-tuning or LoRA with the base frozen.

use std::path::Path;

use anyhow::{bail, Result};

use super::batch::{encode_example, lm_batch};
use super::eval::accuracy;
use super::loader::policy_from;
use super::setup::{self, init_checkpoint, split_holdout, Plan};
use super::Env;
use crate::data::records::{load_sft_templated, place, PromptRecord, SftExample};
use crate::data::sampler::{state_u64, WindowSampler};
use crate::data::synthetic::Split;
use crate::data::tokenizer::Tokenizer;
use crate::model::{Fwd, Transformer};
use crate::train::loss::{masked_mean, scalar};
use crate::train::params::{Net, ParamInfo, ParamStore, Role};
use crate::train::rng::splitmix64;
use crate::train::runner::{Report, StepOut, Task};

/// Training examples, held-out examples (for the loss) and held-out prompts with answers (for
/// accuracy; empty when the data has none).
fn datasets(env: &Env) -> Result<(Vec<SftExample>, Vec<SftExample>, Vec<PromptRecord>)> {
    let cfg = &env.cfg;
    match &cfg.data.path {
        None => {
            let s = setup::synthetic(env);
            Ok((
                s.sft_examples(Split::Train, cfg.sft.task_examples),
                s.sft_examples(Split::Eval, 200),
                s.prompts(Split::Eval, cfg.sft.eval_prompts),
            ))
        }
        Some(p) => {
            let template = setup::chat_template(env)?;
            let load = |path: &Path| load_sft_templated(path, template.as_ref());
            let (train, eval) = split_holdout(env, p, load, "examples")?;
            // Task accuracy needs answers, which SFT files do not carry: with user data the
            // held-out loss is the measure.
            Ok((train, eval, vec![]))
        }
    }
}

struct SftTask<'a> {
    env: &'a Env,
    net: Transformer,
    tok: Tokenizer,
    train: Vec<(Vec<u32>, Vec<bool>)>,
    eval: Vec<(Vec<u32>, Vec<bool>)>,
    prompts: Vec<PromptRecord>,
    sampler: WindowSampler,
    micro: u64,
}

impl SftTask<'_> {
    fn loss(
        &self,
        seqs: &[(Vec<u32>, Vec<bool>)],
        dropout_seed: Option<u64>,
    ) -> Result<(candle_core::Tensor, usize, f64)> {
        let b = lm_batch(
            seqs,
            self.tok.pad_id(),
            self.net.cfg.max_position_embeddings,
            &self.env.device,
        )?;
        // Right padding sits after every real token, so causal attention alone keeps real
        // tokens from seeing it; no key mask needed.
        let f = Fwd {
            ctx: self.env.ctx(true, dropout_seed),
            positions: None,
            key_valid: None,
        };
        let logp = self.net.target_logprobs(&b.inputs, &b.targets, &f)?;
        let counted = scalar(&b.loss_mask.sum_all()?)?;
        Ok((masked_mean(&logp.neg()?, &b.loss_mask)?, b.tokens, counted))
    }

    fn accuracy(&self) -> Result<Option<f64>> {
        if self.prompts.is_empty() {
            return Ok(None);
        }
        let a = accuracy(
            &self.net,
            self.env.ctx(true, None),
            &self.tok,
            &self.prompts,
            self.env.cfg.sft.eval_max_new_tokens,
            64,
        )?;
        Ok(Some(a.accuracy))
    }
}

/// SFT's held-out numbers: the loss on response tokens, and task accuracy where prompts have
/// answers.
#[derive(Clone, Debug)]
pub struct SftEval {
    pub loss: f64,
    pub accuracy: Option<f64>,
}

impl Report for SftEval {
    fn fields(&self) -> Vec<(&'static str, f64)> {
        let mut f = vec![("loss", self.loss)];
        f.extend(self.accuracy.map(|a| ("accuracy", a)));
        f
    }
}

impl Task for SftTask<'_> {
    type Eval = SftEval;

    fn micro_batch(&mut self, _step: usize) -> Result<StepOut> {
        let comm = self.env.comm.as_ref();
        let (rank, world) = (comm.rank(), comm.world());
        let seqs: Vec<_> = self
            .sampler
            .next_slice(self.env.cfg.train.batch_size, rank, world)
            .into_iter()
            .map(|i| self.train[i].clone())
            .collect();
        self.micro += 1;
        let seed = (self.env.cfg.lora.dropout > 0.0 || self.net.cfg.dropout > 0.0)
            .then(|| splitmix64(self.env.cfg.train.seed ^ self.micro));
        let (mut loss, tokens, counted) = self.loss(&seqs, seed)?;
        if world > 1 {
            // The loop averages ranks' losses; each is its mean over its own response tokens,
            // so it is reweighted by its share of the global batch's response tokens: every
            // token then counts once, as in one process with the global batch.
            let mut mean = [counted as f32];
            comm.all_reduce_mean(&mut mean)?;
            let mean = f64::from(mean[0]);
            loss = (loss * if mean > 0.0 { counted / mean } else { 0.0 })?;
        }
        Ok(StepOut {
            loss,
            tokens,
            metrics: vec![],
        })
    }

    fn evaluate(&mut self) -> Result<SftEval> {
        let mut total = 0.0;
        let chunks: Vec<_> = self
            .eval
            .chunks(self.env.cfg.train.batch_size)
            .map(|c| c.to_vec())
            .collect();
        for c in &chunks {
            total += scalar(&self.loss(c, None)?.0)?;
        }
        Ok(SftEval {
            loss: total / chunks.len().max(1) as f64,
            accuracy: self.accuracy()?,
        })
    }

    fn state(&self) -> serde_json::Value {
        let mut s = self.sampler.state();
        s["micro"] = self.micro.into();
        s
    }

    fn restore(&mut self, s: &serde_json::Value) -> Result<()> {
        self.sampler.restore(s);
        self.micro = state_u64(s, "micro");
        Ok(())
    }
}

pub struct SftResult {
    pub base_accuracy: Option<f64>,
    pub accuracy: Option<f64>,
    pub eval_loss: f64,
}

pub fn encode_all(
    tok: &Tokenizer,
    xs: &[SftExample],
    max_len: usize,
    what: &str,
) -> Result<Vec<(Vec<u32>, Vec<bool>)>> {
    xs.iter()
        .enumerate()
        .map(|(i, ex)| {
            let e = encode_example(tok, ex)?;
            if e.0.len() > max_len + 1 {
                let place = place(&ex.origin, &format!("{what} example"), i);
                bail!(
                    "{place}: {} tokens exceed the model's context of {max_len}",
                    e.0.len()
                );
            }
            Ok(e)
        })
        .collect()
}

pub fn run(env: &Env) -> Result<SftResult> {
    let cfg = &env.cfg;
    let loaded = init_checkpoint(env, "a pretrained model or run directory")?;
    let lora = setup::lora(cfg);
    let mut store = ParamStore::new(env.device.clone(), cfg.train.seed);
    if lora.is_some() {
        store.freeze(Net::Policy, &[Role::Base], env.dtype());
    }
    let net = policy_from(&loaded, &mut store, lora)?;
    let tok = loaded.tokenizer.clone();
    drop(loaded);
    let (train, eval, prompts) = datasets(env)?;
    let ctx_len = net.cfg.max_position_embeddings;
    let train = encode_all(&tok, &train, ctx_len, "training")?;
    let eval = encode_all(&tok, &eval, ctx_len, "held-out")?;
    if train.is_empty() || eval.is_empty() {
        bail!("sft needs non-empty training and held-out sets");
    }
    let model = net.cfg.clone();
    let mut task = SftTask {
        env,
        net,
        tok: tok.clone(),
        sampler: WindowSampler::new(train.len(), cfg.train.seed),
        train,
        eval,
        prompts,
        micro: 0,
    };
    let base_accuracy = if env.resume { None } else { task.accuracy()? };
    if let Some(a) = base_accuracy {
        eprintln!("[sft] base model accuracy on held-out prompts: {a:.3}");
    }
    let trainable = |p: ParamInfo| lora.is_none() || p.role == Role::Adapter;
    let summary = setup::train(
        env,
        &mut task,
        &store,
        Plan {
            eval_at_start: false,
            ..Plan::policy(&model, lora, &tok)
        },
        &trainable,
    )?;
    let last = summary.last_eval.as_ref();
    Ok(SftResult {
        base_accuracy,
        accuracy: last.and_then(|e| e.accuracy),
        eval_loss: last.map_or(f64::NAN, |e| e.loss),
    })
}
