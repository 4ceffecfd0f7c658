//! Kahneman-Tversky optimisation (Ethayarajh et al., 2024; TRL's `KTOTrainer`, OpenRLHF's
//! `train_kto`): alignment from completions each labelled desirable or undesirable, the
//! thumbs up or down a product collects, with no pairs needed.
//!
//! Each example's implicit reward is `h = log pi(y|x) - log ref(y|x)`, summed over the
//! completion's tokens. The loss ([`kto_loss`]) pushes a desirable `h` above the baseline `z`
//! and an undesirable one below it. `z` estimates the KL from reference to policy: each prompt
//! of the global batch is paired with the completion of the example before it, and `z` is the
//! mean of `h` over those mismatched sequences (the policy's forward over them takes no
//! gradient), averaged over the ranks, at least 0. `apo_zero_unpaired` keeps `z = 0` and runs
//! no mismatched forwards. The reference is the base with adapters off under LoRA, else a
//! frozen copy.

use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use super::batch::{Encoded, SeqBatch};
use super::eval::task_accuracy;
use super::rollout::FrozenReference;
use super::setup::{self, prompt_sets, split_holdout, Plan, PolicyPair};
use super::truncate::Fitter;
use super::Env;
use crate::config::KtoConfig;
use crate::data::labelled::{labelled_from, LabelledCompletion};
use crate::data::records::{place, ColumnReader, PromptRecord};
use crate::data::sampler::WindowSampler;
use crate::data::synthetic::Split;
use crate::data::tokenizer::Tokenizer;
use crate::dist::Communicator;
use crate::model::Transformer;
use crate::train::loss::{log_sigmoid, scalar};
use crate::train::params::{ParamInfo, Role};
use crate::train::runner::{Report, StepOut, Task};

/// KTO's loss, a mean over the examples: `w (1 - sigmoid(beta s (h - z)))` for each
/// example's implicit reward `h` (`[n]`), with `s` +1 for a desirable example and -1 for an
/// undesirable one, `w` its label's weight and `z` the KL baseline.
pub fn kto_loss(c: &KtoConfig, h: &Tensor, desirable: &[bool], z: f64) -> Result<Tensor> {
    let per_label = |yes: f64, no: f64| -> Result<Tensor> {
        let v: Vec<f32> = desirable
            .iter()
            .map(|&d| if d { yes } else { no } as f32)
            .collect();
        Ok(Tensor::new(v, h.device())?.to_dtype(h.dtype())?)
    };
    let sign = per_label(1.0, -1.0)?;
    let weight = per_label(c.desirable_weight, c.undesirable_weight)?;
    let x = ((h.affine(1.0, -z)? * &sign)? * c.beta)?;
    // 1 - sigmoid(x) = sigmoid(-x), through log_sigmoid for its stable form.
    let losses = (log_sigmoid(&x.neg()?)?.exp()? * &weight)?;
    Ok(losses.mean_all()?)
}

/// Where an encoded example's completion starts: its first trained token.
fn completion_start(e: &Encoded) -> usize {
    e.1.iter().position(|&t| t).unwrap_or(e.0.len())
}

/// An encoded example's prompt tokens.
fn prompt(e: &Encoded) -> &[u32] {
    &e.0[..completion_start(e)]
}

/// The sequences KTO's KL baseline is estimated on, for the examples `mine` of the global
/// batch `xs`: each one's prompt followed by the completion of the example before it in
/// `xs` (the first takes the last's, as TRL pairs them), or of the nearest one before that
/// with another prompt (a pair's two halves, or two labels for one prompt, would otherwise
/// give a matched sequence), cut to `max_tokens`. Pairing over the global batch rather than
/// a rank's slice makes the estimate the same on any number of ranks. A fitted example keeps
/// a prompt token and a trained one within `max_tokens`, so at least one token of the
/// borrowed completion stays.
fn mismatched(xs: &[&Encoded], mine: Range<usize>, max_tokens: usize) -> Vec<Encoded> {
    let n = xs.len();
    mine.map(|i| {
        let p = xs[i];
        let other = (1..n)
            .map(|back| xs[(i + n - back) % n])
            .find(|c| prompt(c) != prompt(p))
            .unwrap_or(xs[(i + n - 1) % n]);
        let (pl, cl) = (completion_start(p), completion_start(other));
        let ids: Vec<u32> = p.0[..pl].iter().chain(&other.0[cl..]).copied().collect();
        let mask: Vec<bool> = p.1[..pl].iter().chain(&other.1[cl..]).copied().collect();
        let keep = ids.len().min(max_tokens);
        (ids[..keep].to_vec(), mask[..keep].to_vec())
    })
    .collect()
}

/// Held-out chunks of about `batch` examples, none of one example (whose baseline would rest
/// on one sequence) unless there is only one.
fn eval_chunks(n: usize, batch: usize) -> Vec<Range<usize>> {
    let k = n.div_ceil(batch.max(1)).min(n / 2).max(1);
    (0..k).map(|i| i * n / k..(i + 1) * n / k).collect()
}

/// How `n` held-out examples are scored: chunks of a global batch (`batch` per rank times
/// `world`) whose baseline is estimated together, each forwarded in parts of at most `batch`.
/// A part's baseline borrows its completions from the whole held-out set, not the part: a
/// part of one pair would pair each prompt with its own other half.
fn eval_plan(n: usize, batch: usize, world: usize) -> Vec<(Range<usize>, Vec<Range<usize>>)> {
    let batch = batch.max(1);
    eval_chunks(n, batch * world)
        .into_iter()
        .map(|c| {
            let parts = c
                .clone()
                .step_by(batch)
                .map(|s| s..(s + batch).min(c.end))
                .collect();
            (c, parts)
        })
        .collect()
}

/// What one batch of examples gives: the objective and, per example, the implicit reward and
/// whether the loss ranks it on its label's side of the baseline.
struct BatchOut {
    loss: Tensor,
    /// `h` of each example, in nats.
    rewards: Vec<f64>,
    kl: Option<f64>,
    /// Per example, 1 where `h` is on its label's side of the baseline, 0 on the other, 1/2
    /// on it (where every example starts).
    agrees: Vec<f64>,
}

/// How well `h - z` sits on a label's side: 1, 0, or 1/2 on the baseline.
fn side(above: f64, desirable: bool) -> f64 {
    let s = if desirable { above } else { -above };
    if s > 0.0 {
        1.0
    } else if s == 0.0 {
        0.5
    } else {
        0.0 // below, or NaN
    }
}

/// KTO's KL baseline from this rank's raw estimate: the ranks' mean (TRL gathers it), at
/// least 0.
fn kl_baseline(raw: f64, comm: Option<&dyn Communicator>) -> Result<f64> {
    let mut z = [raw as f32];
    if let Some(comm) = comm {
        comm.all_reduce_mean(&mut z)?;
    }
    Ok(f64::from(z[0]).max(0.0))
}

struct KtoTask<'a> {
    env: &'a Env,
    policy: Transformer,
    reference: FrozenReference,
    tok: Tokenizer,
    train: Vec<(Encoded, bool)>,
    eval: Vec<(Encoded, bool)>,
    eval_prompts: Vec<PromptRecord>,
    sampler: WindowSampler,
}

impl KtoTask<'_> {
    fn batch(&self, seqs: &[Encoded]) -> Result<SeqBatch> {
        SeqBatch::new(
            seqs,
            self.tok.pad_id(),
            self.policy.cfg.max_position_embeddings,
            self.env.cfg.kto.padding_free,
            &self.env.device,
        )
    }

    /// `h = log pi - log ref` of `b`'s sequences, `[n]`; the policy's forward keeps its
    /// graph only when `grad`.
    fn implicit_rewards(&self, b: &SeqBatch, grad: bool) -> Result<Tensor> {
        let untracked = || crate::model::cast::Untracked::enter();
        let pol = match grad {
            true => b.summed_logps(&self.policy, self.env.ctx(true, None))?,
            false => {
                let _untracked = untracked();
                b.summed_logps(&self.policy, self.env.ctx(true, None))?
                    .detach()
            }
        };
        let net = self.reference.get().net(&self.policy);
        let _untracked = untracked();
        let refp = b.summed_logps(net, self.env.ctx(false, None))?.detach();
        Ok((pol - refp)?)
    }

    /// The loss of the examples `mine` of the global batch `all` (each an example and whether
    /// it is desirable). In training, `comm` is the data-parallel group the KL baseline is
    /// averaged over, as TRL gathers it.
    fn loss(
        &self,
        all: &[&(Encoded, bool)],
        mine: Range<usize>,
        comm: Option<&dyn Communicator>,
    ) -> Result<BatchOut> {
        // The baseline first: its forwards' graphs are dropped before the policy's is built.
        let kl = match self.env.cfg.kto.loss_type.estimates_kl() {
            true => Some(kl_baseline(self.raw_kl(all, mine.clone())?, comm)?),
            false => None,
        };
        // Only training (where `comm` is given) differentiates the loss: held-out batches
        // build no graph.
        self.loss_against(&all[mine], kl, comm.is_some())
    }

    /// KTO's raw KL estimate for the examples `mine` of `all`: the mean implicit reward of
    /// their mismatched sequences.
    fn raw_kl(&self, all: &[&(Encoded, bool)], mine: Range<usize>) -> Result<f64> {
        let ids: Vec<&Encoded> = all.iter().map(|x| &x.0).collect();
        let max_tokens = self.policy.cfg.max_position_embeddings + 1;
        let other = self.batch(&mismatched(&ids, mine, max_tokens))?;
        scalar(&self.implicit_rewards(&other, false)?.mean_all()?)
    }

    /// The loss of examples `xs` against the baseline `kl` (none: 0), differentiable where
    /// `grad`.
    fn loss_against(
        &self,
        xs: &[&(Encoded, bool)],
        kl: Option<f64>,
        grad: bool,
    ) -> Result<BatchOut> {
        let c = &self.env.cfg.kto;
        let seqs: Vec<Encoded> = xs.iter().map(|x| x.0.clone()).collect();
        let desirable: Vec<bool> = xs.iter().map(|x| x.1).collect();
        let z = kl.unwrap_or(0.0);
        let h = self.implicit_rewards(&self.batch(&seqs)?, grad)?;
        let loss = kto_loss(c, &h, &desirable, z)?;
        let rewards: Vec<f64> = h
            .detach()
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect();
        let agrees = rewards
            .iter()
            .zip(&desirable)
            .map(|(&r, &d)| side(r - z, d))
            .collect();
        Ok(BatchOut {
            loss,
            rewards,
            kl,
            agrees,
        })
    }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// KTO's held-out numbers: the loss (0.5 times the labels' mean weight where policy and
/// reference agree), the KL baseline, the mean implicit reward `beta h` of each label's
/// examples and their margin, the share of examples on their label's side of the baseline
/// (a tie counting one half, so 0.5 where policy and reference agree), and task accuracy
/// where prompts have answers.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct KtoEval {
    pub loss: f64,
    pub kl: Option<f64>,
    pub reward_desirable: Option<f64>,
    pub reward_undesirable: Option<f64>,
    pub label_accuracy: f64,
    pub accuracy: Option<f64>,
}

impl KtoEval {
    /// How far the desirable examples' mean reward is above the undesirable ones'.
    pub fn reward_margin(&self) -> Option<f64> {
        Some(self.reward_desirable? - self.reward_undesirable?)
    }
}

impl Report for KtoEval {
    fn fields(&self) -> Vec<(&'static str, f64)> {
        let mut f = vec![("loss", self.loss), ("label_accuracy", self.label_accuracy)];
        f.extend(self.kl.map(|k| ("kl", k)));
        f.extend(self.reward_desirable.map(|r| ("reward_desirable", r)));
        f.extend(self.reward_undesirable.map(|r| ("reward_undesirable", r)));
        f.extend(self.reward_margin().map(|m| ("reward_margin", m)));
        f.extend(self.accuracy.map(|a| ("accuracy", a)));
        f
    }
}

impl Task for KtoTask<'_> {
    type Eval = KtoEval;

    fn epoch_items(&self) -> Option<usize> {
        Some(self.sampler.len())
    }

    fn micro_batch(&mut self, _step: usize) -> Result<StepOut> {
        // Every rank draws the global batch and trains on its slice; the loss is a mean over
        // examples, so the ranks' average is the global batch's.
        let comm = self.env.comm.as_ref();
        let per_rank = self.env.cfg.train.batch_size;
        let all: Vec<_> = self
            .sampler
            .next_slice(per_rank * comm.world(), 0, 1)
            .into_iter()
            .map(|i| &self.train[i])
            .collect();
        let mine = comm.rank() * per_rank..(comm.rank() + 1) * per_rank;
        let xs = &all[mine.clone()];
        let out = self.loss(&all, mine, Some(comm))?;
        let tokens: usize = xs.iter().map(|x| x.0 .0.len().saturating_sub(1)).sum();
        let mut metrics = vec![("label_accuracy", mean(&out.agrees))];
        metrics.extend(out.kl.map(|k| ("kl", k)));
        Ok(StepOut {
            loss: out.loss,
            tokens,
            metrics,
        })
    }

    fn evaluate(&mut self) -> Result<KtoEval> {
        let beta = self.env.cfg.kto.beta;
        let (mut loss, mut kl_sum, mut agrees) = (0.0, 0.0, Vec::new());
        // Beta h over [undesirable, desirable].
        let mut sums = [(0.0, 0usize); 2];
        let all: Vec<_> = self.eval.iter().collect();
        let batch = self.env.cfg.train.batch_size;
        let estimates = self.env.cfg.kto.loss_type.estimates_kl();
        for (chunk, parts) in eval_plan(all.len(), batch, self.env.comm.world()) {
            // A chunk's baseline as training's over one global batch: the mean of its
            // rank-sized parts' estimates, at least 0, so that the numbers are the same on any
            // number of ranks. Its forwards are rank-sized too.
            let kl = match estimates {
                true => {
                    let mut sum = 0.0;
                    for p in &parts {
                        sum += self.raw_kl(&all, p.clone())? * p.len() as f64;
                    }
                    Some((sum / chunk.len() as f64).max(0.0))
                }
                false => None,
            };
            kl_sum += kl.unwrap_or(0.0) * chunk.len() as f64;
            for p in parts {
                let xs = &all[p];
                let out = self.loss_against(xs, kl, false)?;
                loss += scalar(&out.loss)? * xs.len() as f64;
                agrees.extend(out.agrees);
                for (x, h) in xs.iter().zip(&out.rewards) {
                    let s = &mut sums[usize::from(x.1)];
                    s.0 += beta * h;
                    s.1 += 1;
                }
            }
        }
        // Never 0: `run` refuses an empty held-out set.
        let n = self.eval.len() as f64;
        let average = |(sum, k): (f64, usize)| (k > 0).then(|| sum / k as f64);
        Ok(KtoEval {
            loss: loss / n,
            kl: estimates.then_some(kl_sum / n),
            reward_desirable: average(sums[1]),
            reward_undesirable: average(sums[0]),
            label_accuracy: mean(&agrees),
            accuracy: task_accuracy(
                &self.policy,
                self.env.ctx(true, None),
                &self.tok,
                &self.eval_prompts,
                self.env.cfg.kto.eval_max_new_tokens,
            )?,
        })
    }

    fn state(&self) -> serde_json::Value {
        self.sampler.state()
    }

    fn restore(&mut self, s: &serde_json::Value) -> Result<()> {
        self.sampler.restore(s)
    }
}

/// KTO's outcome against the SFT model it started from. None where a number was not
/// measured: task accuracy without held-out prompts (a user's records) or with one that has
/// no answer, the reward margin where the held-out examples hold one label only, a start on
/// a resumed run, anything where no held-out evaluation ran.
pub struct KtoResult {
    pub accuracy: Option<f64>,
    pub start_accuracy: Option<f64>,
    pub label_accuracy: Option<f64>,
    pub start_label_accuracy: Option<f64>,
    pub reward_margin: Option<f64>,
}

impl KtoResult {
    pub fn describe(&self) -> String {
        use super::eval::{from_start, measured, NOT_EVALUATED, NO_TASK_ACCURACY};
        let Some(label_accuracy) = self.label_accuracy else {
            return format!("kto: {NOT_EVALUATED}");
        };
        let margin = match self.reward_margin {
            Some(m) => format!("reward margin {m:.3}"),
            None => "no reward margin (the held-out examples have one label only)".to_string(),
        };
        format!(
            "kto: {}, held-out examples on their label's side {label_accuracy:.3}{}, {margin}",
            measured(
                "accuracy",
                self.accuracy,
                self.start_accuracy,
                NO_TASK_ACCURACY
            ),
            from_start(self.start_label_accuracy),
        )
    }
}

/// Training records, held-out records, and held-out prompts with answers (built-in task
/// only). A record is one labelled completion, or a pair's two: a file is split into training
/// and held-out records, and a pair fitted to the context, before its halves go their ways.
type Datasets = (
    Vec<Vec<LabelledCompletion>>,
    Vec<Vec<LabelledCompletion>>,
    Vec<PromptRecord>,
);

fn datasets(env: &Env) -> Result<Datasets> {
    let c = &env.cfg.kto;
    let unpair = |pairs: Vec<_>| -> Vec<Vec<LabelledCompletion>> {
        pairs
            .iter()
            .map(|p| LabelledCompletion::unpair(p).to_vec())
            .collect()
    };
    Ok(match &env.cfg.data.path {
        None => {
            let s = setup::synthetic(env);
            let (_, prompts) = prompt_sets(env, 1, c.eval_prompts)?;
            (
                unpair(s.preference_pairs(Split::Train, c.task_pairs)),
                unpair(s.preference_pairs(Split::Eval, c.eval_pairs)),
                prompts,
            )
        }
        Some(p) => {
            let template = setup::chat_template(env)?;
            let reader = ColumnReader::new(&env.cfg.data.columns);
            let read = |f: &Path| reader.read(f);
            let load = |f: &Path| labelled_from(f, read(f)?, template.as_ref());
            let (train, eval) = split_holdout(env, p, load, "records")?;
            reader.check(p)?;
            setup::warn_template_unread(env, template.as_ref(), Some(p));
            (train, eval, vec![])
        }
    })
}

/// Encodes the records once, fitted to the context under `[data] truncation` (a pair's two
/// completions together; errors name the record): each example with whether it is desirable.
fn encode(
    env: &Env,
    tok: &Tokenizer,
    records: &[Vec<LabelledCompletion>],
    ctx: usize,
    what: &str,
) -> Result<Vec<(Encoded, bool)>> {
    let mut fit = Fitter::new(env.cfg.data.truncation, ctx + 1, &format!("{what} records"));
    let mut out = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let examples: Vec<_> = r.iter().map(LabelledCompletion::example).collect();
        let origin = r.first().and_then(|x| x.origin.clone());
        let place = || place(&origin, &format!("{what} record"), i);
        if let Some(seqs) = fit.encode(tok, &examples, place, ctx)? {
            out.extend(seqs.into_iter().zip(r.iter().map(|x| x.desirable)));
        }
    }
    fit.say(env);
    Ok(out)
}

/// A line on the labels' balance: the KTO paper wants the desirable examples' total weight
/// between 1 and 4/3 of the undesirable ones'.
fn balance(c: &KtoConfig, xs: &[(Encoded, bool)]) -> String {
    let good = xs.iter().filter(|x| x.1).count();
    let bad = xs.len() - good;
    let ratio = c.desirable_weight * good as f64 / (c.undesirable_weight * bad as f64);
    let mut line = format!("[kto] {good} desirable and {bad} undesirable training examples");
    // One label alone (or weighted 0) has no ratio to keep; the loss still moves the other.
    let both = good > 0 && bad > 0 && c.desirable_weight > 0.0 && c.undesirable_weight > 0.0;
    if both && !(1.0 - 1e-9..=4.0 / 3.0 + 1e-9).contains(&ratio) {
        line.push_str(&format!(
            "; warning: their weighted ratio is {ratio:.3}, outside the KTO paper's 1 to 4/3 (set [kto] desirable_weight and undesirable_weight)"
        ));
    }
    if !xs.is_empty() && (good == 0 || bad == 0) {
        let (all, none) = match good {
            0 => ("undesirable", "desirable"),
            _ => ("desirable", "undesirable"),
        };
        line.push_str(&format!(
            "; warning: every one is {all}, so the loss only moves them against the KL \
             baseline, with no {none} example to set them apart from (is the label column right?)"
        ));
    }
    line
}

pub fn run(env: &Env) -> Result<KtoResult> {
    let cfg = &env.cfg;
    let lora = setup::lora(cfg);
    let (store, policy, reference, tok) = PolicyPair::load(env)?.into_parts();
    let reference = reference.expect("PolicyPair::load holds a reference");
    warnln!(
        "[kto] loss {}, reference: {}",
        cfg.kto.loss_type.name(),
        reference.describe()
    );
    let (train, eval, eval_prompts) = datasets(env)?;
    if train.is_empty() || eval.is_empty() {
        bail!("kto needs non-empty training and held-out examples");
    }
    // Encoded once, up front, so that an example too long for the context fails before
    // training.
    let ctx = policy.cfg.max_position_embeddings;
    let (train, eval) = (
        encode(env, &tok, &train, ctx, "training")?,
        encode(env, &tok, &eval, ctx, "held-out")?,
    );
    if train.is_empty() || eval.is_empty() {
        bail!("kto: no training or no held-out example is left once fitted to the model's context and pairs of two equal sides are left out (the lines above say which were left out, and why)");
    }
    if env.comm.rank() == 0 {
        errln!("{}", balance(&cfg.kto, &train));
    }
    let model = policy.cfg.clone();
    let mut task = KtoTask {
        env,
        policy,
        reference,
        tok: tok.clone(),
        sampler: WindowSampler::new(train.len(), cfg.train.seed),
        train,
        eval,
        eval_prompts,
    };
    let trainable = |p: ParamInfo| lora.is_none() || p.role == Role::Adapter;
    let summary = setup::train(
        env,
        &mut task,
        &store,
        Plan::policy(&model, lora, &tok),
        &trainable,
    )?;
    let (first, last) = (summary.first_eval.as_ref(), summary.last_eval.as_ref());
    let acc = |e: Option<&KtoEval>| e.and_then(|e| e.accuracy);
    let lacc = |e: Option<&KtoEval>| e.map(|e| e.label_accuracy);
    Ok(KtoResult {
        accuracy: acc(last),
        start_accuracy: acc(first),
        label_accuracy: lacc(last),
        start_label_accuracy: lacc(first),
        reward_margin: last.and_then(KtoEval::reward_margin),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::rl::test_tensors::s;
    use candle_core::{Device, Var};

    fn v(x: &[f64]) -> Tensor {
        let x: Vec<f32> = x.iter().map(|&a| a as f32).collect();
        Tensor::new(x, &Device::Cpu).unwrap()
    }

    fn cfg(beta: f64, desirable_weight: f64, undesirable_weight: f64) -> KtoConfig {
        KtoConfig {
            beta,
            desirable_weight,
            undesirable_weight,
            ..KtoConfig::default()
        }
    }

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    #[test]
    fn the_loss_matches_hand_computed_values() {
        // Where policy and reference agree every loss is 1 - sigmoid(0) = 0.5, weighted.
        let at_start =
            s(&kto_loss(&cfg(0.1, 1.0, 3.0), &v(&[0.0, 0.0]), &[true, false], 0.0).unwrap());
        assert!(
            (at_start - 0.5 * (1.0 + 3.0) / 2.0).abs() < 1e-6,
            "{at_start}"
        );
        // beta 0.5, z 1: a desirable example at h = 3 and an undesirable one at h = -1.
        let c = cfg(0.5, 2.0, 1.0);
        let got = s(&kto_loss(&c, &v(&[3.0, -1.0]), &[true, false], 1.0).unwrap());
        let want =
            (2.0 * (1.0 - sigmoid(0.5 * (3.0 - 1.0))) + (1.0 - sigmoid(0.5 * (1.0 + 1.0)))) / 2.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // An undesirable completion the policy likes more than the baseline costs more than
        // half its weight.
        let bad = s(&kto_loss(&c, &v(&[2.0]), &[false], 0.0).unwrap());
        assert!(
            (bad - (1.0 - sigmoid(-1.0))).abs() < 1e-6 && bad > 0.5,
            "{bad}"
        );
    }

    #[test]
    fn the_gradient_raises_desirable_and_lowers_undesirable_rewards() {
        let h = Var::new(&[0.3f32, -0.2, 0.0, 1.0], &Device::Cpu).unwrap();
        let desirable = [true, false, true, false];
        let loss = kto_loss(&cfg(0.1, 1.0, 1.0), h.as_tensor(), &desirable, 0.4).unwrap();
        let g = loss.backward().unwrap();
        let d = g.get(h.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        for (g, up) in d.iter().zip(desirable) {
            // Descent moves h against its gradient.
            assert!(if up { *g < 0.0 } else { *g > 0.0 }, "{d:?}");
        }
        // A zero weight takes its label out of the loss.
        let loss = kto_loss(&cfg(0.1, 1.0, 0.0), h.as_tensor(), &desirable, 0.4).unwrap();
        let g = loss.backward().unwrap();
        let d = g.get(h.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert!(d[0] < 0.0 && d[1] == 0.0 && d[3] == 0.0, "{d:?}");
    }

    fn enc(prompt: &[u32], completion: &[u32]) -> Encoded {
        let ids = prompt.iter().chain(completion).copied().collect();
        let mask = std::iter::repeat_n(false, prompt.len())
            .chain(std::iter::repeat_n(true, completion.len()))
            .collect();
        (ids, mask)
    }

    #[test]
    fn kl_sequences_pair_each_prompt_with_the_previous_completion() {
        let xs = [
            enc(&[1, 2], &[10, 11, 12]),
            enc(&[3], &[20]),
            enc(&[4, 5, 6], &[30, 31]),
        ];
        let refs: Vec<&Encoded> = xs.iter().collect();
        let m = mismatched(&refs, 0..3, 100);
        assert_eq!(m[0], enc(&[1, 2], &[30, 31]));
        assert_eq!(m[1], enc(&[3], &[10, 11, 12]));
        assert_eq!(m[2], enc(&[4, 5, 6], &[20]));
        // Cut to the context: the prompt stays whole.
        let m = mismatched(&refs, 0..3, 4);
        assert_eq!(m[1], enc(&[3], &[10, 11, 12]));
        assert_eq!(m[2], enc(&[4, 5, 6], &[20]));
        assert_eq!(m[0], enc(&[1, 2], &[30, 31]));
        let m = mismatched(&refs, 0..3, 3);
        assert_eq!(m[1], enc(&[3], &[10, 11]));
        // A neighbour with the same prompt (a pair's other half) is passed over.
        let ys = [
            enc(&[1, 2], &[10]),
            enc(&[3], &[20]),
            enc(&[3], &[21]),
            enc(&[3], &[22]),
        ];
        let refs2: Vec<&Encoded> = ys.iter().collect();
        let m = mismatched(&refs2, 0..4, 100);
        assert_eq!(m[1], enc(&[3], &[10]));
        assert_eq!(m[2], enc(&[3], &[10]));
        assert_eq!(m[3], enc(&[3], &[10]));
        assert_eq!(m[0], enc(&[1, 2], &[22]));
        // With one prompt only, the completion before is borrowed after all.
        let m = mismatched(&refs2[1..], 0..3, 100);
        assert_eq!(m[0], enc(&[3], &[22]));
        // A rank's slice borrows across the slice's edge, as one rank with the whole batch.
        assert_eq!(
            mismatched(&refs, 1..3, 100),
            mismatched(&refs, 0..3, 100)[1..]
        );
    }

    #[test]
    fn a_held_out_chunk_of_one_pair_borrows_from_other_prompts() {
        // Pairs encode side by side, so at batch 2 each chunk is one pair.
        let xs = [
            enc(&[1], &[10]),
            enc(&[1], &[11]),
            enc(&[2], &[20]),
            enc(&[2], &[21]),
            enc(&[3], &[30]),
            enc(&[3], &[31]),
        ];
        let all: Vec<&Encoded> = xs.iter().collect();
        let parts = eval_plan(all.len(), 2, 1).into_iter().flat_map(|(_, p)| p);
        for r in parts {
            for (i, m) in r.clone().zip(mismatched(&all, r, 100)) {
                assert_ne!(
                    m.0[1] / 10,
                    m.0[0],
                    "example {i} kept its own prompt's completion"
                );
            }
        }
    }

    /// Held-out parts are forwarded a rank's batch at a time, whatever the ranks, and cover
    /// their chunk.
    #[test]
    fn held_out_parts_are_rank_sized() {
        for (n, batch, world) in [(10, 2, 1), (10, 2, 4), (7, 3, 2), (1, 4, 8), (33, 4, 3)] {
            let plan = eval_plan(n, batch, world);
            let covered: Vec<usize> = plan.iter().flat_map(|(c, _)| c.clone()).collect();
            assert_eq!(covered, (0..n).collect::<Vec<_>>());
            for (chunk, parts) in &plan {
                let inner: Vec<usize> = parts.iter().flat_map(|p| p.clone()).collect();
                assert_eq!(inner, chunk.clone().collect::<Vec<_>>());
                assert!(parts.iter().all(|p| p.len() <= batch && !p.is_empty()));
            }
        }
        assert_eq!(eval_plan(8, 2, 2)[0], (0..4, vec![0..2, 2..4]));
    }

    #[test]
    fn held_out_chunks_cover_everything_and_never_hold_one_example() {
        for n in 1..40 {
            for b in 1..9 {
                let chunks = eval_chunks(n, b);
                let covered: Vec<usize> = chunks.iter().flat_map(|r| r.clone()).collect();
                assert_eq!(covered, (0..n).collect::<Vec<_>>(), "n {n} b {b}");
                assert!(
                    n < 2 || chunks.iter().all(|r| r.len() >= 2),
                    "n {n} b {b}: {chunks:?}"
                );
                assert!(
                    chunks.iter().all(|r| r.len() <= b.max(3)),
                    "n {n} b {b}: {chunks:?}"
                );
            }
        }
    }

    #[test]
    fn the_baseline_is_the_ranks_mean_at_least_zero_and_ties_count_half() {
        let solo = crate::dist::Solo;
        assert_eq!(kl_baseline(0.25, Some(&solo)).unwrap(), 0.25);
        assert_eq!(kl_baseline(-0.5, Some(&solo)).unwrap(), 0.0);
        assert_eq!(kl_baseline(-0.5, None).unwrap(), 0.0);
        assert_eq!((side(0.1, true), side(0.1, false)), (1.0, 0.0));
        assert_eq!((side(-0.1, true), side(-0.1, false)), (0.0, 1.0));
        assert_eq!((side(0.0, true), side(0.0, false)), (0.5, 0.5));
        assert_eq!(side(f64::NAN, true), 0.0);
    }

    #[test]
    fn the_balance_line_warns_outside_the_papers_range() {
        let x = |desirable| ((vec![1, 2], vec![false, true]), desirable);
        let xs = [x(true), x(true), x(true), x(false)];
        assert!(
            balance(&cfg(0.1, 1.0, 1.0), &xs).contains("warning: their weighted ratio is 3.000")
        );
        assert!(!balance(&cfg(0.1, 1.0, 3.0), &xs).contains("warning"));
        assert!(!balance(&cfg(0.1, 1.0, 1.0), &xs[2..]).contains("warning"));
        let one_label = balance(&cfg(0.1, 1.0, 1.0), &xs[..3]);
        assert!(
            one_label.ends_with(
                "3 desirable and 0 undesirable training examples; warning: every one is \
                 desirable, so the loss only moves them against the KL baseline, with no \
                 undesirable example to set them apart from (is the label column right?)"
            ),
            "{one_label}"
        );
        assert!(!balance(&cfg(0.1, 1.0, 0.0), &xs).contains("warning"));
    }
}
