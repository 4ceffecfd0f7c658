//! Reward modelling: a transformer with a scalar head read at the last real token of
//! prompt + response (+ EOS), trained with the Bradley-Terry loss
//! `-log sigmoid(r_chosen - r_rejected - margin)`; evaluated by pairwise accuracy.

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::batch::padded;
use super::loader::scored_from;
use super::setup::{self, init_checkpoint, split_holdout, Plan};
use super::Env;
use crate::data::records::{load_preferences_templated, place, PreferencePair};
use crate::data::sampler::WindowSampler;
use crate::data::synthetic::Split;
use crate::data::tokenizer::Tokenizer;
use crate::model::heads::gather_last;
use crate::model::{Fwd, ScalarHead, Transformer};
use crate::train::checkpoint::CheckpointKind;
use crate::train::loss::{log_sigmoid, scalar};
use crate::train::params::{Net, ParamInfo, ParamStore, Role};
use crate::train::runner::{Report, StepOut, Task};

/// A transformer with a scalar head: the reward model, and PPO's value model.
pub struct Scorer {
    pub net: Transformer,
    pub head: ScalarHead,
}

impl Scorer {
    /// Per-token scores `[B, T]` of right-padded ids.
    pub fn per_token(
        &self,
        ids: &Tensor,
        key_valid: Option<&Tensor>,
        ctx: crate::model::linear::Ctx,
    ) -> Result<Tensor> {
        let f = Fwd {
            ctx,
            positions: None,
            key_valid,
            segments: None,
        };
        self.head.forward(&self.net.hidden(ids, &f, None)?)
    }

    /// One score per sequence, read at its last real token.
    pub fn score(
        &self,
        seqs: &[Vec<u32>],
        pad: u32,
        ctx: crate::model::linear::Ctx,
    ) -> Result<Tensor> {
        let dev = self.net.device().clone();
        let (ids, _, last) = padded(seqs, pad, self.net.cfg.max_position_embeddings, &dev)?;
        gather_last(&self.per_token(&ids, None, ctx)?, &last)
    }
}

/// Every pair as (chosen, rejected) token ids; a pair longer than the context is an error
/// naming its record.
pub fn encode_pairs(
    tok: &Tokenizer,
    pairs: &[PreferencePair],
    ctx: usize,
) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    pairs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let e = encode_pair(tok, p)?;
            let n = e.0.len().max(e.1.len());
            if n > ctx {
                let place = place(&p.origin, "preference pair", i);
                bail!("{place}: {n} tokens exceed the model's context of {ctx}");
            }
            Ok(e)
        })
        .collect()
}

pub fn encode_pair(tok: &Tokenizer, p: &PreferencePair) -> Result<(Vec<u32>, Vec<u32>)> {
    let prompt = tok.encode(&p.prompt)?;
    let side = |reply: &str| -> Result<Vec<u32>> {
        let mut s = prompt.clone();
        s.extend(tok.encode(reply)?);
        // A chat template already ended the turn with its own marker.
        if p.append_eos {
            s.push(tok.eos_id());
        }
        Ok(s)
    };
    Ok((side(&p.chosen)?, side(&p.rejected)?))
}

struct RewardTask<'a> {
    env: &'a Env,
    model: Scorer,
    tok: Tokenizer,
    train: Vec<(Vec<u32>, Vec<u32>)>,
    eval: Vec<(Vec<u32>, Vec<u32>)>,
    sampler: WindowSampler,
}

impl RewardTask<'_> {
    /// Loss and accuracy of a batch of pairs.
    fn pairs(&self, pairs: &[(Vec<u32>, Vec<u32>)]) -> Result<(Tensor, f64, usize)> {
        let mut seqs: Vec<Vec<u32>> = pairs.iter().map(|p| p.0.clone()).collect();
        seqs.extend(pairs.iter().map(|p| p.1.clone()));
        let tokens = seqs.iter().map(Vec::len).sum();
        let scores = self
            .model
            .score(&seqs, self.tok.pad_id(), self.env.ctx(true, None))?;
        let n = pairs.len();
        let diff = (scores.narrow(0, 0, n)? - scores.narrow(0, n, n)?)?;
        let loss = log_sigmoid(&(&diff - self.env.cfg.reward.margin)?)?
            .mean_all()?
            .neg()?;
        let acc = diff.to_vec1::<f32>()?.iter().filter(|&&d| d > 0.0).count() as f64 / n as f64;
        Ok((loss, acc, tokens))
    }
}

/// The reward model's held-out numbers: Bradley-Terry loss and pairwise accuracy.
#[derive(Clone, Debug)]
pub struct RewardEval {
    pub loss: f64,
    pub accuracy: f64,
}

impl Report for RewardEval {
    fn fields(&self) -> Vec<(&'static str, f64)> {
        vec![("loss", self.loss), ("accuracy", self.accuracy)]
    }
}

impl Task for RewardTask<'_> {
    type Eval = RewardEval;

    fn micro_batch(&mut self, _step: usize) -> Result<StepOut> {
        // Each rank scores its slice of the global batch; every pair weighs the same.
        let comm = self.env.comm.as_ref();
        let batch: Vec<_> = self
            .sampler
            .next_slice(self.env.cfg.train.batch_size, comm.rank(), comm.world())
            .into_iter()
            .map(|i| self.train[i].clone())
            .collect();
        let (loss, acc, tokens) = self.pairs(&batch)?;
        Ok(StepOut {
            loss,
            tokens,
            metrics: vec![("accuracy", acc)],
        })
    }

    fn evaluate(&mut self) -> Result<RewardEval> {
        let (mut loss, mut acc, mut n) = (0.0, 0.0, 0.0);
        for c in self.eval.chunks(self.env.cfg.train.batch_size) {
            let (l, a, _) = self.pairs(c)?;
            loss += scalar(&l)? * c.len() as f64;
            acc += a * c.len() as f64;
            n += c.len() as f64;
        }
        Ok(RewardEval {
            loss: loss / n,
            accuracy: acc / n,
        })
    }

    fn state(&self) -> serde_json::Value {
        self.sampler.state()
    }

    fn restore(&mut self, s: &serde_json::Value) -> Result<()> {
        self.sampler.restore(s);
        Ok(())
    }
}

pub struct RewardResult {
    pub accuracy: f64,
    pub first_accuracy: Option<f64>,
}

fn datasets(env: &Env) -> Result<(Vec<PreferencePair>, Vec<PreferencePair>)> {
    let cfg = &env.cfg;
    match &cfg.data.path {
        None => {
            let s = setup::synthetic(env);
            Ok((
                s.preference_pairs(Split::Train, cfg.reward.task_pairs),
                s.preference_pairs(Split::Eval, cfg.reward.eval_pairs),
            ))
        }
        Some(p) => {
            let template = setup::chat_template(env)?;
            let load = |f: &Path| load_preferences_templated(f, template.as_ref());
            split_holdout(env, p, load, "pairs")
        }
    }
}

pub fn run(env: &Env) -> Result<RewardResult> {
    let cfg = &env.cfg;
    let loaded = init_checkpoint(env, "an SFT or pretrained model")?;
    let lora = setup::lora(cfg);
    let mut store = ParamStore::new(env.device.clone(), cfg.train.seed);
    // Under LoRA the transformer is frozen; its head always trains.
    if lora.is_some() {
        store.freeze(Net::Policy, &[Role::Base], env.dtype());
    }
    let from_policy = loaded.meta.kind == CheckpointKind::Policy;
    let model = scored_from(&loaded, &mut store, Net::Policy, lora, from_policy)?;
    let tok = loaded.tokenizer.clone();
    drop(loaded);
    let (train, eval) = datasets(env)?;
    let ctx = model.net.cfg.max_position_embeddings;
    let (train, eval) = (
        encode_pairs(&tok, &train, ctx)?,
        encode_pairs(&tok, &eval, ctx)?,
    );
    let model_cfg = model.net.cfg.clone();
    let mut task = RewardTask {
        env,
        model,
        tok: tok.clone(),
        sampler: WindowSampler::new(train.len(), cfg.train.seed),
        train,
        eval,
    };
    // The head is always trained, with or without LoRA.
    let trainable = |p: ParamInfo| lora.is_none() || p.role != Role::Base;
    let summary = setup::train(
        env,
        &mut task,
        &store,
        Plan {
            kind: CheckpointKind::Reward,
            model: &model_cfg,
            lora,
            tokenizer: &tok,
            eval_at_start: true,
        },
        &trainable,
    )?;
    Ok(RewardResult {
        accuracy: summary.last_eval.map_or(f64::NAN, |e| e.accuracy),
        first_accuracy: summary.first_eval.map(|e| e.accuracy),
    })
}
