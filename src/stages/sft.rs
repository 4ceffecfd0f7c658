//! Supervised fine-tuning: prompt/response pairs or chat conversations, loss on the response
//! (assistant) tokens only unless `[sft] completion_only_loss` or `assistant_only_loss` is
//! off; full fine-tuning or LoRA with the base frozen.

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::batch::{best_fit_decreasing, lm_batch, packed_batch, Encoded, LmBatch};
use super::eval::accuracy;
use super::setup::{self, split_holdout, Plan};
use super::truncate::Fitter;
use super::Env;
use crate::config::{SftLoss, Truncation};
use crate::data::records::{
    place, sft_from, ColumnReader, LossScope, PromptRecord, ScopeRead, SftExample,
};
use crate::data::sampler::{state_u64, WindowSampler};
use crate::data::synthetic::Split;
use crate::data::tokenizer::Tokenizer;
use crate::dist::Communicator;
use crate::kernels::segments::Segments;
use crate::model::{Fwd, Transformer};
use crate::train::loss::{masked_mean, scalar};
use crate::train::params::{ParamInfo, Role};
use crate::train::rng::splitmix64;
use crate::train::runner::{Report, StepOut, Task};

/// Training examples, held-out examples (for the loss) and held-out prompts with answers (for
/// accuracy; empty when the data has none): the SFT data, or the built-in task's
/// `task_examples` demonstrations and `eval_prompts` held-out prompts; loss on the tokens
/// `scope` names.
pub(super) fn datasets(
    env: &Env,
    task_examples: usize,
    eval_prompts: usize,
    scope: LossScope,
) -> Result<(Vec<SftExample>, Vec<SftExample>, Vec<PromptRecord>)> {
    let cfg = &env.cfg;
    match &cfg.data.path {
        None => {
            // The built-in task's examples are prompt-completion records.
            let task = ScopeRead {
                completion_only: true,
                assistant_only: false,
            };
            task.check(scope)?;
            let s = setup::synthetic(env);
            let examples = |split, n| {
                let mut xs = s.sft_examples(split, n);
                for x in &mut xs {
                    x.train_all = !scope.completion_only;
                }
                xs
            };
            Ok((
                examples(Split::Train, task_examples),
                examples(Split::Eval, 200),
                s.prompts(Split::Eval, eval_prompts),
            ))
        }
        Some(p) => {
            let template = setup::chat_template(env)?;
            let reader = ColumnReader::new(&env.cfg.data.columns);
            let read = |f: &Path| reader.read(f);
            let scope_read = std::cell::Cell::new(ScopeRead::default());
            let load = |f: &Path| {
                let lines = read(f)?;
                scope_read.set(scope_read.get().merge(ScopeRead::of(&lines)));
                sft_from(f, lines, template.as_ref(), scope)
            };
            let (train, eval) = split_holdout(env, p, load, "examples")?;
            reader.check(p)?;
            scope_read.get().check(scope)?;
            setup::warn_template_unread(env, template.as_ref(), Some(p));
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
    train: Vec<Encoded>,
    eval: Vec<Encoded>,
    prompts: Vec<PromptRecord>,
    /// With `[sft] packing`, the training examples' indices in each packed row; the sampler
    /// then draws rows instead of examples.
    rows: Option<Vec<Vec<usize>>>,
    sampler: WindowSampler,
    micro: u64,
    /// The step whose micro-batches are being drawn, and the response tokens of all of them
    /// on every rank: each micro-batch's loss is weighed by its share of those.
    step_tokens: Option<(usize, f64)>,
}

/// A forward in training, with the seed of its dropout masks and NEFTune's noise where it
/// draws any, or in evaluation.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pass {
    Train { seed: Option<u64> },
    Eval,
}

impl SftTask<'_> {
    /// The response tokens the next optimizer step trains on, over every micro-batch and rank:
    /// each rank draws every rank's items from the same order, so it can count them alone.
    fn tokens_of_step(&self) -> f64 {
        let train = &self.env.cfg.train;
        let world = self.env.comm.world();
        let mut ahead = self.sampler.clone();
        let trained = |i: usize| self.train[i].1.iter().skip(1).filter(|&&t| t).count();
        let mut total = 0;
        for _ in 0..train.grad_accum {
            for item in ahead.next_slice(train.batch_size * world, 0, 1) {
                total += match &self.rows {
                    Some(rows) => rows[item].iter().map(|&i| trained(i)).sum(),
                    None => trained(item),
                };
            }
        }
        total as f64
    }

    /// Examples one per right-padded row.
    fn loss(&self, seqs: &[Encoded], pass: Pass) -> Result<(Tensor, usize, f64)> {
        let b = lm_batch(
            seqs,
            self.tok.pad_id(),
            self.net.cfg.max_position_embeddings,
            &self.env.device,
        )?;
        self.masked_loss(&b, None, pass)
    }

    /// Packed rows of `[train] seq_len` positions, as `rows` lists the examples of each.
    fn packed_loss(&self, rows: &[&[usize]], pass: Pass) -> Result<(Tensor, usize, f64)> {
        let rows: Vec<Vec<_>> = rows
            .iter()
            .map(|r| r.iter().map(|&i| &self.train[i]).collect())
            .collect();
        let len = self.env.cfg.train.seq_len;
        let p = packed_batch(&rows, self.tok.pad_id(), len, &self.env.device)?;
        self.masked_loss(&p.lm, Some(&p.segments), pass)
    }

    /// The mean loss of the response tokens (`[sft] loss_type` in training, the negative
    /// log-likelihood in evaluation), the input positions and the response tokens counted.
    fn masked_loss(
        &self,
        b: &LmBatch,
        segments: Option<&Segments>,
        pass: Pass,
    ) -> Result<(Tensor, usize, f64)> {
        // Right padding sits after every real token, so causal attention alone keeps real
        // tokens from seeing it; no key mask needed. In packed rows the segments keep each
        // example from seeing the ones before it.
        let seed = match pass {
            Pass::Train { seed } => seed,
            Pass::Eval => None,
        };
        let mut ctx = self.env.ctx(true, seed);
        ctx.neftune_alpha = self.env.cfg.sft.neftune_noise_alpha;
        let f = Fwd {
            ctx,
            positions: None,
            key_valid: None,
            segments,
        };
        let logp = self.net.target_logprobs(&b.inputs, &b.targets, &f)?;
        let counted = scalar(&b.loss_mask.sum_all()?)?;
        let per_token = match (self.env.cfg.sft.loss_type, pass) {
            // DFT: the probability is a weight, not a path for the gradient.
            (SftLoss::Dft, Pass::Train { .. }) => (logp.neg()? * logp.detach().exp()?)?,
            _ => logp.neg()?,
        };
        Ok((masked_mean(&per_token, &b.loss_mask)?, b.tokens, counted))
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
            (64, false),
        )?;
        Ok(Some(a.accuracy))
    }
}

/// SFT's held-out numbers: the loss on response tokens, and task accuracy where prompts have
/// answers.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
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

    fn epoch_items(&self) -> Option<usize> {
        Some(self.sampler.len())
    }

    fn micro_batch(&mut self, step: usize) -> Result<StepOut> {
        let comm = self.env.comm.as_ref();
        let (rank, world) = (comm.rank(), comm.world());
        let step_tokens = match self.step_tokens {
            Some((s, t)) if s == step => t,
            _ => {
                let t = self.tokens_of_step();
                self.step_tokens = Some((step, t));
                t
            }
        };
        let drawn = self
            .sampler
            .next_slice(self.env.cfg.train.batch_size, rank, world);
        self.micro += 1;
        let cfg = &self.env.cfg;
        let noisy = cfg.lora.dropout > 0.0 || self.net.cfg.dropout > 0.0;
        let seed = (noisy || cfg.sft.neftune_noise_alpha.is_some())
            .then(|| splitmix64(cfg.train.seed ^ self.micro));
        let (loss, tokens, counted) = match &self.rows {
            Some(rows) => {
                let rows: Vec<&[usize]> = drawn.iter().map(|&r| rows[r].as_slice()).collect();
                self.packed_loss(&rows, Pass::Train { seed })?
            }
            None => {
                let seqs: Vec<_> = drawn.iter().map(|&i| self.train[i].clone()).collect();
                self.loss(&seqs, Pass::Train { seed })?
            }
        };
        // The loop averages the micro-batches' and the ranks' losses: weighed by its share of
        // the step's response tokens, each token counts once, as in one batch of the whole
        // step (transformers' `num_items_in_batch`), however it is cut into micro-batches.
        let parts = (world * self.env.cfg.train.grad_accum) as f64;
        let step_mean = step_tokens / parts;
        let weight = if step_mean > 0.0 {
            counted / step_mean
        } else {
            0.0
        };
        Ok(StepOut {
            loss: (loss * weight)?,
            tokens,
            metrics: vec![],
        })
    }

    fn evaluate(&mut self) -> Result<SftEval> {
        Ok(SftEval {
            loss: held_out_mean(&self.eval, self.env.cfg.train.batch_size, |c| {
                let (loss, _, counted) = self.loss(c, Pass::Eval)?;
                Ok((loss, counted))
            })?,
            accuracy: self.accuracy()?,
        })
    }

    fn state(&self) -> serde_json::Value {
        let mut s = self.sampler.state();
        s["micro"] = self.micro.into();
        s["packing"] = self.rows.is_some().into();
        if let Some(rows) = &self.rows {
            s["packed_rows"] = rows.len().into();
            s["seq_len"] = self.env.cfg.train.seq_len.into();
        }
        s
    }

    fn restore(&mut self, s: &serde_json::Value) -> Result<()> {
        // The sampler counts packed rows or examples: its position means nothing in the other.
        let packed = s.get("packing").and_then(serde_json::Value::as_bool) == Some(true);
        if packed != self.rows.is_some() {
            bail!(
                "the checkpoint was written with [sft] packing = {packed}; resume with the same \
                 setting (the sampler's position counts {})",
                if packed { "packed rows" } else { "examples" }
            );
        }
        if let (Some(rows), Some(_)) = (&self.rows, s.get("packed_rows")) {
            // Other rows (another seq_len, other data) would give the sampler's position
            // other examples.
            let was = (state_u64(s, "packed_rows"), state_u64(s, "seq_len"));
            let now = (rows.len() as u64, self.env.cfg.train.seq_len as u64);
            if was != now {
                bail!(
                    "the checkpoint packed its examples into {} rows of seq_len {}, this run \
                     into {} rows of seq_len {}: resume with the same data and [train] seq_len",
                    was.0,
                    was.1,
                    now.0,
                    now.1
                );
            }
        }
        self.sampler.restore(s)?;
        self.micro = state_u64(s, "micro");
        Ok(())
    }
}

/// This rank's mean loss over its `counted` tokens, reweighted by its share of the global
/// batch's: the loop averages the ranks' losses, and every token then counts once, as in one
/// process with the global batch.
pub(super) fn weigh_by_tokens(
    comm: &dyn Communicator,
    loss: Tensor,
    counted: f64,
) -> Result<Tensor> {
    if comm.world() == 1 {
        return Ok(loss);
    }
    let mut mean = [counted as f32];
    comm.all_reduce_mean(&mut mean)?;
    let mean = f64::from(mean[0]);
    Ok((loss * if mean > 0.0 { counted / mean } else { 0.0 })?)
}

/// The mean of `loss` over the held-out examples' response tokens, `batch` examples at a
/// time (`loss` gives a chunk's mean and the tokens it is over): every token counts once,
/// whatever the batch size, where a mean of the chunks' means let a short last chunk count as
/// much as a full one.
pub(super) fn held_out_mean(
    eval: &[Encoded],
    batch: usize,
    loss: impl Fn(&[Encoded]) -> Result<(Tensor, f64)>,
) -> Result<f64> {
    let (mut total, mut tokens) = (0.0, 0.0);
    for c in eval.chunks(batch.max(1)) {
        let (mean, counted) = loss(c)?;
        total += scalar(&mean)? * counted;
        tokens += counted;
    }
    Ok(if tokens > 0.0 { total / tokens } else { 0.0 })
}

pub struct SftResult {
    pub base_accuracy: Option<f64>,
    pub accuracy: Option<f64>,
    /// None where no held-out evaluation ran (a resumed run that had finished, say).
    pub eval_loss: Option<f64>,
}

/// Every example encoded and fitted to a context of `max_len` inputs (`max_len + 1` tokens)
/// by `fit` (`[data] truncation`): the examples kept, with their tokens and loss masks.
/// `what` names an example without a file in errors ("training example 3").
pub fn encode_fitted(
    tok: &Tokenizer,
    xs: Vec<SftExample>,
    max_len: usize,
    what: &str,
    fit: &mut Fitter,
) -> Result<(Vec<SftExample>, Vec<Encoded>)> {
    let mut kept = (Vec::new(), Vec::new());
    for (i, ex) in xs.into_iter().enumerate() {
        let place = || place(&ex.origin, &format!("{what} example"), i);
        if let Some(mut e) = fit.encode(tok, std::slice::from_ref(&ex), place, max_len)? {
            kept.0.push(ex);
            kept.1.push(e.remove(0));
        }
    }
    Ok(kept)
}

/// The training examples packed into rows of `seq_len` input positions by best-fit
/// decreasing (an example of `n` tokens takes `n - 1`), with a line saying how well they
/// fill them. `xs` names the examples in errors.
fn pack(
    train: &[Encoded],
    xs: &[SftExample],
    seq_len: usize,
    ctx_len: usize,
) -> Result<Vec<Vec<usize>>> {
    // Rows are seq_len positions whatever they hold, and the model reads them whole.
    if seq_len > ctx_len {
        bail!(
            "[sft] packing: [train] seq_len ({seq_len}) exceeds the model's context (max_position_embeddings = {ctx_len}); lower seq_len or turn packing off"
        );
    }
    let sizes: Vec<usize> = train
        .iter()
        .map(|(ids, _)| ids.len().saturating_sub(1))
        .collect();
    if let Some(i) = sizes.iter().position(|&n| n > seq_len) {
        let place = place(&xs[i].origin, "training example", i);
        bail!(
            "{place}: {} tokens take {} positions, more than a packed row of [train] seq_len = {seq_len} holds; raise seq_len (up to the model's context, {ctx_len}), cut or leave out such records ([data] truncation = \"keep_end\", \"keep_start\" or \"drop\"), or turn [sft] packing off",
            sizes[i] + 1,
            sizes[i]
        );
    }
    let rows = best_fit_decreasing(&sizes, seq_len)?;
    let used: usize = sizes.iter().sum();
    warnln!(
        "[sft] packing: {} examples into {} rows of {seq_len} positions, {:.1}% of them real tokens",
        train.len(),
        rows.len(),
        100.0 * used as f64 / (rows.len() * seq_len).max(1) as f64
    );
    Ok(rows)
}

pub fn run(env: &Env) -> Result<SftResult> {
    let cfg = &env.cfg;
    let lora = setup::lora(cfg);
    let (store, net, tok) = setup::trained_policy(env, "a pretrained model or run directory")?;
    let scope = LossScope {
        completion_only: cfg.sft.completion_only_loss,
        assistant_only: cfg.sft.assistant_only_loss,
    };
    let (examples, eval, prompts) =
        datasets(env, cfg.sft.task_examples, cfg.sft.eval_prompts, scope)?;
    let ctx_len = net.cfg.max_position_embeddings;
    // Packed rows hold seq_len positions: where training records are cut or left out, that is
    // the limit (under `error`, packing names the row in its own message). Held-out examples
    // are evaluated unpacked, so the model's context is theirs.
    let cutting = cfg.data.truncation != Truncation::Error;
    let packed_limit = match cfg.sft.packing && cutting {
        true => cfg.train.seq_len.min(ctx_len),
        false => ctx_len,
    };
    let fitted = |xs, what: &str, limit: usize| -> Result<_> {
        let mut fit = Fitter::new(cfg.data.truncation, limit + 1, &format!("{what} examples"));
        let kept = encode_fitted(&tok, xs, ctx_len, what, &mut fit)?;
        fit.say(env);
        Ok(kept)
    };
    let (examples, train) = fitted(examples, "training", packed_limit)?;
    let (_, eval) = fitted(eval, "held-out", ctx_len)?;
    if train.is_empty() || eval.is_empty() {
        bail!("sft needs non-empty training and held-out sets (after [data] truncation)");
    }
    let rows = match cfg.sft.packing {
        true => Some(pack(&train, &examples, cfg.train.seq_len, ctx_len)?),
        false => None,
    };
    drop(examples);
    let model = net.cfg.clone();
    let drawn = rows.as_ref().map_or(train.len(), Vec::len);
    let mut task = SftTask {
        env,
        net,
        tok: tok.clone(),
        sampler: WindowSampler::new(drawn, cfg.train.seed),
        rows,
        train,
        eval,
        prompts,
        micro: 0,
        step_tokens: None,
    };
    let trainable = |p: ParamInfo| lora.is_none() || p.role == Role::Adapter;
    let summary = setup::train(
        env,
        &mut task,
        &store,
        // The base model's held-out loss and accuracy, logged at step 0 (`metrics.jsonl`) and
        // kept in every checkpoint for a resumed run's summary.
        Plan::policy(&model, lora, &tok),
        &trainable,
    )?;
    let last = summary.last_eval.as_ref();
    Ok(SftResult {
        base_accuracy: summary.first_eval.as_ref().and_then(|e| e.accuracy),
        accuracy: last.and_then(|e| e.accuracy),
        eval_loss: last.map(|e| e.loss),
    })
}
