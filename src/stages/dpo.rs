//! Direct preference optimisation: `-log sigmoid(beta * ((logp_c - logp_ref_c) -
//! (logp_r - logp_ref_r)))`, with log-probabilities summed over response tokens (TRL's
//! `sigmoid` loss). The reference is the base with adapters off under LoRA, else a frozen copy.

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use super::batch::{lm_batch, LmBatch};
use super::eval::accuracy;
use super::rollout::{FrozenReference, Reference};
use super::setup::{self, prompt_sets, split_holdout, Plan, PolicyPair};
use super::sft::encode_all;
use super::Env;
use crate::data::records::{load_preferences_templated, PreferencePair, PromptRecord, SftExample};
use crate::data::sampler::WindowSampler;
use crate::data::synthetic::Split;
use crate::data::tokenizer::Tokenizer;
use crate::dist::Communicator;
use crate::model::linear::Ctx;
use crate::model::{Fwd, Transformer};
use crate::train::loss::{log_sigmoid, scalar};
use crate::train::params::{ParamInfo, Role};
use crate::train::runner::{Report, StepOut, Task};

/// The DPO loss of summed log-probabilities (each `[B]`); also the implicit-reward accuracy.
pub fn dpo_loss(
    pc: &Tensor,
    pr: &Tensor,
    rc: &Tensor,
    rr: &Tensor,
    beta: f64,
) -> Result<(Tensor, f64)> {
    let margin = (((pc - rc)? - (pr - rr)?)? * beta)?;
    let loss = log_sigmoid(&margin)?.mean_all()?.neg()?;
    let m = margin.to_vec1::<f32>()?;
    let acc = m.iter().filter(|&&x| x > 0.0).count() as f64 / m.len().max(1) as f64;
    Ok((loss, acc))
}

/// `loss + alpha * NLL`, the NLL per token over the chosen responses (summed log-probabilities
/// `chosen_logps` over `chosen_tokens` tokens, each `[B]`).
pub fn with_chosen_nll(
    loss: &Tensor,
    chosen_logps: &Tensor,
    chosen_tokens: f64,
    alpha: f64,
) -> Result<Tensor> {
    if alpha == 0.0 {
        return Ok(loss.clone());
    }
    let mean_logp = (chosen_logps.sum_all()? / chosen_tokens.max(1.0))?;
    Ok((loss - (mean_logp * alpha)?)?)
}

/// A preference pair as token ids with their loss masks: chosen, then rejected.
type EncodedPair = [(Vec<u32>, Vec<bool>); 2];

/// Encodes every pair once, with SFT's check that each sequence fits the context (errors name
/// the record).
fn encode_pairs(tok: &Tokenizer, pairs: &[PreferencePair], ctx: usize) -> Result<Vec<EncodedPair>> {
    let side = |response: fn(&PreferencePair) -> &str| -> Vec<SftExample> {
        pairs
            .iter()
            .map(|p| SftExample {
                append_eos: p.append_eos,
                ..SftExample::prompt_response(&p.prompt, response(p), p.origin.clone())
            })
            .collect()
    };
    let chosen = encode_all(tok, &side(|p| &p.chosen), ctx, "chosen")?;
    let rejected = encode_all(tok, &side(|p| &p.rejected), ctx, "rejected")?;
    Ok(chosen
        .into_iter()
        .zip(rejected)
        .map(|(c, r)| [c, r])
        .collect())
}

struct DpoTask<'a> {
    env: &'a Env,
    policy: Transformer,
    reference: FrozenReference,
    tok: Tokenizer,
    train: Vec<EncodedPair>,
    eval: Vec<EncodedPair>,
    eval_prompts: Vec<PromptRecord>,
    sampler: WindowSampler,
}

impl DpoTask<'_> {
    /// Summed response log-probabilities `[B]` of the batch's sequences under `net`.
    fn seq_logps(&self, net: &Transformer, ctx: Ctx, b: &LmBatch) -> Result<Tensor> {
        let f = Fwd {
            ctx,
            positions: None,
            key_valid: None,
        };
        let lp = net.target_logprobs(&b.inputs, &b.targets, &f)?;
        Ok((lp * &b.loss_mask)?.sum(1)?)
    }

    /// The objective (DPO plus the RPO term), the DPO loss alone, the implicit-reward
    /// accuracy and the token count.
    /// The objective, DPO's loss, the reward accuracy and the token count of `pairs`. In
    /// training, `comm` is the data-parallel group: RPO's NLL term is a mean over the global
    /// batch's chosen tokens, so each rank divides by the ranks' mean count.
    fn loss(
        &self,
        pairs: &[&EncodedPair],
        comm: Option<&dyn Communicator>,
    ) -> Result<(Tensor, Tensor, f64, usize)> {
        let n = pairs.len();
        // Chosen sequences in the first n rows, rejected in the last n.
        let seqs: Vec<_> = (0..2)
            .flat_map(|side| pairs.iter().map(move |p| p[side].clone()))
            .collect();
        let b = lm_batch(
            &seqs,
            self.tok.pad_id(),
            self.policy.cfg.max_position_embeddings,
            &self.env.device,
        )?;
        let pol = self.seq_logps(&self.policy, self.env.ctx(true, None), &b)?;
        let refp = match self.reference.get() {
            Reference::Separate(r) => self.seq_logps(r, self.env.ctx(false, None), &b)?,
            Reference::AdaptersOff => {
                self.seq_logps(&self.policy, self.env.ctx(false, None), &b)?
            }
        };
        let refp = refp.detach();
        let (loss, acc) = dpo_loss(
            &pol.narrow(0, 0, n)?,
            &pol.narrow(0, n, n)?,
            &refp.narrow(0, 0, n)?,
            &refp.narrow(0, n, n)?,
            self.env.cfg.dpo.beta,
        )?;
        let mut chosen_tokens = [b
            .loss_mask
            .narrow(0, 0, n)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?];
        if let Some(c) = comm {
            c.all_reduce_mean(&mut chosen_tokens)?;
        }
        let objective = with_chosen_nll(
            &loss,
            &pol.narrow(0, 0, n)?,
            f64::from(chosen_tokens[0]),
            self.env.cfg.dpo.rpo_alpha,
        )?;
        Ok((objective, loss, acc, b.tokens))
    }
}

/// DPO's held-out numbers: its loss (log 2 where policy and reference agree), how often the
/// implicit reward ranks the chosen response first, and task accuracy where prompts have
/// answers.
#[derive(Clone, Debug)]
pub struct DpoEval {
    pub loss: f64,
    pub reward_accuracy: f64,
    pub accuracy: Option<f64>,
}

impl Report for DpoEval {
    fn fields(&self) -> Vec<(&'static str, f64)> {
        let mut f = vec![
            ("loss", self.loss),
            ("reward_accuracy", self.reward_accuracy),
        ];
        f.extend(self.accuracy.map(|a| ("accuracy", a)));
        f
    }
}

impl Task for DpoTask<'_> {
    type Eval = DpoEval;

    fn micro_batch(&mut self, _step: usize) -> Result<StepOut> {
        // Each rank takes its slice of the global batch; the loss is a mean over pairs, so
        // the ranks' average is the global batch's.
        let comm = self.env.comm.as_ref();
        let pairs: Vec<_> = self
            .sampler
            .next_slice(self.env.cfg.train.batch_size, comm.rank(), comm.world())
            .into_iter()
            .map(|i| &self.train[i])
            .collect();
        let (objective, dpo, acc, tokens) = self.loss(&pairs, Some(comm))?;
        Ok(StepOut {
            loss: objective,
            tokens,
            metrics: vec![("dpo_loss", scalar(&dpo)?), ("reward_accuracy", acc)],
        })
    }

    fn evaluate(&mut self) -> Result<DpoEval> {
        let (mut l, mut a, mut n) = (0.0, 0.0, 0.0);
        for c in self.eval.chunks(self.env.cfg.train.batch_size) {
            // The held-out loss is DPO's alone: log 2 where policy and reference agree.
            let (_, loss, acc, _) = self.loss(&c.iter().collect::<Vec<_>>(), None)?;
            l += scalar(&loss)? * c.len() as f64;
            a += acc * c.len() as f64;
            n += c.len() as f64;
        }
        let mut out = DpoEval {
            loss: l / n,
            reward_accuracy: a / n,
            accuracy: None,
        };
        if !self.eval_prompts.is_empty() && self.eval_prompts.iter().all(|p| p.answer.is_some()) {
            let acc = accuracy(
                &self.policy,
                self.env.ctx(true, None),
                &self.tok,
                &self.eval_prompts,
                self.env.cfg.dpo.eval_max_new_tokens,
                64,
            )?;
            out.accuracy = Some(acc.accuracy);
        }
        Ok(out)
    }

    fn state(&self) -> serde_json::Value {
        self.sampler.state()
    }

    fn restore(&mut self, s: &serde_json::Value) -> Result<()> {
        self.sampler.restore(s);
        Ok(())
    }
}

/// DPO's outcome against the SFT model it started from.
pub struct DpoResult {
    pub accuracy: f64,
    pub start_accuracy: f64,
    pub reward_accuracy: f64,
    pub start_reward_accuracy: f64,
}

impl DpoResult {
    pub fn describe(&self) -> String {
        format!(
            "dpo: accuracy {:.3} (from {:.3}), implicit-reward accuracy {:.3} (from {:.3})",
            self.accuracy, self.start_accuracy, self.reward_accuracy, self.start_reward_accuracy
        )
    }
}

/// Training pairs, held-out pairs, and held-out prompts with answers (built-in task only).
fn datasets(env: &Env) -> Result<(Vec<PreferencePair>, Vec<PreferencePair>, Vec<PromptRecord>)> {
    let c = &env.cfg.dpo;
    Ok(match &env.cfg.data.path {
        None => {
            let s = setup::synthetic(env);
            let (_, prompts) = prompt_sets(env, 1, c.eval_prompts)?;
            (
                s.preference_pairs(Split::Train, c.task_pairs),
                s.preference_pairs(Split::Eval, c.eval_pairs),
                prompts,
            )
        }
        Some(p) => {
            let template = setup::chat_template(env)?;
            let load = |f: &Path| load_preferences_templated(f, template.as_ref());
            let (train, eval) = split_holdout(env, p, load, "preference pairs")?;
            (train, eval, vec![])
        }
    })
}

pub fn run(env: &Env) -> Result<DpoResult> {
    let cfg = &env.cfg;
    let lora = setup::lora(cfg);
    let (store, policy, reference, tok) = PolicyPair::load(env)?.into_parts();
    let (train, eval, eval_prompts) = datasets(env)?;
    if train.is_empty() || eval.is_empty() {
        bail!("dpo needs non-empty training and held-out preference sets");
    }
    // Encoded once, up front, so that a pair too long for the context fails before training.
    let ctx = policy.cfg.max_position_embeddings;
    let (train, eval) = (
        encode_pairs(&tok, &train, ctx)?,
        encode_pairs(&tok, &eval, ctx)?,
    );
    let model = policy.cfg.clone();
    let mut task = DpoTask {
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
    let acc = |e: Option<&DpoEval>| e.and_then(|e| e.accuracy).unwrap_or(f64::NAN);
    let racc = |e: Option<&DpoEval>| e.map_or(f64::NAN, |e| e.reward_accuracy);
    Ok(DpoResult {
        accuracy: acc(last),
        start_accuracy: acc(first),
        reward_accuracy: racc(last),
        start_reward_accuracy: racc(first),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::rl::test_tensors::{s, t};
    use candle_core::Device;

    #[test]
    fn dpo_loss_is_log2_when_policy_equals_reference() {
        let lp = Tensor::new(&[-3.0f32, -1.5, -7.0], &Device::Cpu).unwrap();
        let lr = Tensor::new(&[-2.0f32, -4.0, -0.5], &Device::Cpu).unwrap();
        let (loss, _) = dpo_loss(&lp, &lr, &lp, &lr, 0.1).unwrap();
        assert!((s(&loss) - 2f64.ln()).abs() < 1e-6);
        // margin beta*((0 - -1) - (0 - 0)) = 0.5 -> -log sigmoid(0.5)
        let z = Tensor::new(&[0.0f32], &Device::Cpu).unwrap();
        let m1 = Tensor::new(&[-1.0f32], &Device::Cpu).unwrap();
        let (loss, acc) = dpo_loss(&z, &z, &m1, &z, 0.5).unwrap();
        assert!((s(&loss) - (1.0 + (-0.5f64).exp()).ln()).abs() < 1e-6);
        assert_eq!(acc, 1.0);
    }

    #[test]
    fn rpo_term_is_the_chosen_nll_per_token() {
        // Chosen responses of 2 and 3 tokens with summed log-probs -1 and -4: NLL 5/5 = 1 per
        // token, so alpha 0.5 adds 0.5.
        let loss = Tensor::new(0.25f32, &Device::Cpu).unwrap();
        let lp = t(&[-1.0, -4.0]);
        assert!((s(&with_chosen_nll(&loss, &lp, 5.0, 0.5).unwrap()) - 0.75).abs() < 1e-6);
        assert_eq!(s(&with_chosen_nll(&loss, &lp, 5.0, 0.0).unwrap()), 0.25);
    }
}
