//! Supervised fine-tuning: prompt/response pairs or chat conversations, loss on the response
//! (assistant) tokens only; full fine-tuning or LoRA with the base frozen.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::batch::{encode_example, lm_batch};
use super::eval::accuracy;
use super::loader::{policy_from, read_checkpoint};
use super::pretrain::WindowSampler;
use super::Env;
use crate::data::chat_template::ChatTemplate;
use crate::data::records::{load_sft_templated, place, PromptRecord, SftExample};
use crate::data::synthetic::{Split, Synthetic};
use crate::data::tokenizer::Tokenizer;
use crate::model::{Fwd, Transformer};
use crate::train::checkpoint::CheckpointMeta;
use crate::train::loss::{cross_entropy, scalar};
use crate::train::params::ParamStore;
use crate::train::rng::splitmix64;
use crate::train::runner::{self, get, is_adapter, RunOpts, Saved, StepOut, Task};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    /// Examples drawn from the built-in task when no data is named.
    pub task_examples: usize,
    /// New tokens allowed when answering held-out prompts for accuracy.
    pub eval_max_new_tokens: usize,
    /// Held-out prompts used for accuracy (all of the task's held-out pairs by default).
    pub eval_prompts: usize,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            task_examples: 4000,
            eval_max_new_tokens: 6,
            eval_prompts: 1000,
        }
    }
}

pub fn synthetic(env: &Env) -> Synthetic {
    let mut s = Synthetic::new(env.cfg.data.task_seed);
    s.max_operand = env.cfg.data.task_max_operand;
    s.carry_slip = env.cfg.data.task_carry_slip;
    s
}

/// Training examples, held-out examples (for the loss) and held-out prompts with answers (for
/// accuracy; empty when the data has none).
fn datasets(env: &Env) -> Result<(Vec<SftExample>, Vec<SftExample>, Vec<PromptRecord>)> {
    let cfg = &env.cfg;
    match &cfg.data.path {
        None => {
            let s = synthetic(env);
            Ok((
                s.sft_examples(Split::Train, cfg.sft.task_examples),
                s.sft_examples(Split::Eval, 200),
                s.prompts(Split::Eval, cfg.sft.eval_prompts),
            ))
        }
        Some(p) => {
            let template = match &cfg.data.chat_template {
                Some(t) => Some(ChatTemplate::load(t)?),
                None => None,
            };
            let load = |path: &Path| load_sft_templated(path, template.as_ref());
            let all = load(p)?;
            let (train, eval) = match &cfg.data.eval_path {
                Some(e) => (all, load(e)?),
                None => {
                    let n_eval =
                        ((all.len() as f64 * cfg.data.val_fraction).round() as usize).max(1);
                    if all.len() < 2 {
                        bail!("{}: needs at least 2 examples to hold one out", p.display());
                    }
                    let mut all = all;
                    let eval = all.split_off(all.len() - n_eval);
                    (all, eval)
                }
            };
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
    ) -> Result<(candle_core::Tensor, usize)> {
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
        let logits = self.net.forward(&b.inputs, &f, None)?;
        Ok((cross_entropy(&logits, &b.targets, &b.loss_mask)?, b.tokens))
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

impl Task for SftTask<'_> {
    fn micro_batch(&mut self, _step: usize) -> Result<StepOut> {
        let seqs: Vec<_> = (0..self.env.cfg.train.batch_size)
            .map(|_| self.train[self.sampler.next_index()].clone())
            .collect();
        self.micro += 1;
        let seed = (self.env.cfg.lora.dropout > 0.0 || self.net.cfg.dropout > 0.0)
            .then(|| splitmix64(self.env.cfg.train.seed ^ self.micro));
        let (loss, tokens) = self.loss(&seqs, seed)?;
        Ok(StepOut {
            loss,
            tokens,
            metrics: vec![],
        })
    }

    fn evaluate(&mut self) -> Result<Vec<(String, f64)>> {
        let mut total = 0.0;
        let chunks: Vec<_> = self
            .eval
            .chunks(self.env.cfg.train.batch_size)
            .map(|c| c.to_vec())
            .collect();
        for c in &chunks {
            total += scalar(&self.loss(c, None)?.0)?;
        }
        let mut out = vec![("loss".to_string(), total / chunks.len().max(1) as f64)];
        if let Some(a) = self.accuracy()? {
            out.push(("accuracy".into(), a));
        }
        Ok(out)
    }

    fn state(&self) -> serde_json::Value {
        let (epoch, cursor) = self.sampler.position();
        serde_json::json!({"epoch": epoch, "cursor": cursor, "micro": self.micro})
    }

    fn restore(&mut self, s: &serde_json::Value) -> Result<()> {
        let get = |k: &str| s.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        self.sampler.seek(get("epoch"), get("cursor") as usize);
        self.micro = get("micro");
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
    let init = cfg
        .init
        .as_ref()
        .context("sft needs --init CHECKPOINT (a pretrained model or run directory)")?;
    let loaded = read_checkpoint(init, &env.device)?;
    let lora = cfg.lora.enabled().then_some(&cfg.lora);
    let mut store = ParamStore::new(env.device.clone(), cfg.train.seed);
    let net = policy_from(&loaded, &mut store, "model", lora)?;
    let tok = loaded.tokenizer.clone();
    let (train, eval, prompts) = datasets(env)?;
    let ctx_len = net.cfg.max_position_embeddings;
    let train = encode_all(&tok, &train, ctx_len, "training")?;
    let eval = encode_all(&tok, &eval, ctx_len, "held-out")?;
    if train.is_empty() || eval.is_empty() {
        bail!("sft needs non-empty training and held-out sets");
    }
    let meta = CheckpointMeta {
        stage: "sft".into(),
        kind: "policy".into(),
        model: net.cfg.clone(),
        lora: lora.cloned(),
        step: 0,
    };
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
    let saved = Saved {
        store: &store,
        meta,
        tokenizer: &tok,
    };
    let trainable = |n: &str| if lora.is_some() { is_adapter(n) } else { true };
    let summary = runner::train(
        &mut task,
        &saved,
        &trainable,
        &RunOpts {
            cfg: &cfg.train,
            run_dir: &env.run_dir,
            resume: env.resume,
            label: "sft",
            eval_at_start: false,
        },
    )?;
    Ok(SftResult {
        base_accuracy,
        accuracy: get(&summary.last_eval, "accuracy"),
        eval_loss: get(&summary.last_eval, "loss").unwrap_or(f64::NAN),
    })
}
