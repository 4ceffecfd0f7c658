//! Knowledge distillation from a frozen teacher (TRL's `GKDTrainer`, after Agarwal et al.'s
//! generalised knowledge distillation; OpenRLHF's `train_kd` at `kd_coef = 1` is its
//! `beta = 0`, `lmbda = 0`). The student learns the teacher's whole next-token distribution at every completion token,
//! not the one token the data holds there: [`generalized_jsd`] between the two, averaged over
//! the completion tokens. `[distill] temperature` samples; the divergence compares the
//! untempered distributions, as TRL's does.
//!
//! The completions are the SFT data's, or, in a share `lmbda` of the optimizer steps, the
//! student's own samples of the same prompts (on-policy: the student is taught where it goes,
//! not only where the data went), or with `seq_kd` the teacher's samples. The data's
//! completions need not be good ones: the targets are the teacher's distributions, so on the
//! built-in task a teacher that carries teaches the sums its demonstrator got wrong.

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, D};

use super::batch::{lm_batch, Encoded, LmBatch};
use super::eval::accuracy;
use super::loader::{policy_from, read_checkpoint};
use super::rollout::rollout_seed;
use super::setup::{self, Plan};
use super::sft::{datasets, encode_fitted, held_out_mean, weigh_by_tokens, SftEval};
use super::truncate::Fitter;
use super::Env;
use crate::config::DistillConfig;
use crate::data::records::{place, LossScope, PromptRecord, SftExample};
use crate::data::sampler::{state_u64, WindowSampler};
use crate::data::tokenizer::Tokenizer;
use crate::generate::{generate, RowKeys, SampleCfg};
use crate::model::linear::Ctx;
use crate::model::{Fwd, Transformer};
use crate::train::loss::generalized_jsd;
use crate::train::params::{Net, ParamInfo, ParamStore, Role};
use crate::train::rng::splitmix64;
use crate::train::runner::{StepOut, Task};

/// Where a micro-batch's completions come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// The data's own.
    Data,
    /// The student's samples (on-policy).
    Student,
    /// The teacher's samples (`seq_kd`).
    Teacher,
}

impl Source {
    /// Every micro-batch of step `step`: on-policy with probability `lmbda`, decided by the
    /// run's seed alone, so that every rank and a resumed run decide alike, and a step split
    /// into micro-batches trains on what the whole batch would.
    fn of(cfg: &DistillConfig, seed: u64, step: usize) -> Self {
        let draw = splitmix64(seed ^ 0xD157 ^ splitmix64(step as u64));
        let u = (draw >> 11) as f64 / (1u64 << 53) as f64;
        match (u < cfg.lmbda, cfg.seq_kd) {
            (true, _) => Source::Student,
            (false, true) => Source::Teacher,
            (false, false) => Source::Data,
        }
    }
}

/// The tokens before an example's last trained span: the prompt a sampled completion
/// continues (earlier assistant turns of a conversation stay context).
fn prompt_len((_, train): &Encoded) -> usize {
    let Some(last) = train.iter().rposition(|&t| t) else {
        return train.len();
    };
    train[..=last]
        .iter()
        .rposition(|&t| !t)
        .map_or(0, |i| i + 1)
}

/// How many of a sampled completion's tokens are the tokenizer's: a model whose embedding is
/// padded past the vocabulary may sample a padding id, which the other model may have no
/// row for; the completion ends before it.
fn within_vocab(sample: &[u32], vocab: usize) -> usize {
    sample
        .iter()
        .position(|&t| t as usize >= vocab)
        .unwrap_or(sample.len())
}

/// `[N]` the divergence at each of `b`'s trained positions, of the student's (with its
/// context) next-token distribution from the teacher's, over the first `vocab` logits; None
/// where no position is trained. Only the trained positions' hidden states reach the LM head,
/// so the `[B, T, V]` logits are never made.
fn divergence(
    (student, s_ctx): (&Transformer, Ctx),
    (teacher, t_ctx): (&Transformer, Ctx),
    b: &LmBatch,
    vocab: usize,
    c: &DistillConfig,
) -> Result<Option<Tensor>> {
    let picked: Vec<u32> = b
        .loss_mask
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .enumerate()
        .filter(|(_, &m)| m > 0.0)
        .map(|(i, _)| i as u32)
        .collect();
    if picked.is_empty() {
        return Ok(None);
    }
    let n = picked.len();
    let picked = Tensor::from_vec(picked, n, b.inputs.device())?;
    let logits = |net: &Transformer, ctx: Ctx| -> Result<Tensor> {
        // Right padding sits after every real token: causal attention alone keeps real tokens
        // from seeing it.
        let f = Fwd {
            ctx,
            positions: None,
            key_valid: None,
            segments: None,
        };
        let h = net.hidden(&b.inputs, &f, None)?;
        let width = h.dim(D::Minus1)?;
        let h = h.reshape(((), width))?.index_select(&picked, 0)?;
        let l = net.logits(&h.unsqueeze(0)?, ctx.kernels.gemm)?.squeeze(0)?;
        Ok(l.narrow(D::Minus1, 0, vocab)?)
    };
    let t = {
        let _untracked = crate::model::cast::Untracked::enter();
        logits(teacher, t_ctx)?.detach()
    };
    let s = logits(student, s_ctx)?;
    Ok(Some(generalized_jsd(&s, &t, c.beta)?))
}

struct DistillTask<'a> {
    env: &'a Env,
    student: Transformer,
    teacher: Transformer,
    tok: Tokenizer,
    /// The logits compared: the tokenizer's ids (a model's embedding may be padded past them).
    vocab: usize,
    /// The shorter of the two models' contexts.
    ctx_len: usize,
    train: Vec<Encoded>,
    eval: Vec<Encoded>,
    prompts: Vec<PromptRecord>,
    sampler: WindowSampler,
    micro: u64,
}

impl DistillTask<'_> {
    fn cfg(&self) -> &DistillConfig {
        &self.env.cfg.distill
    }

    /// The examples `drawn` with their completions sampled by `source`'s model: prompt and
    /// sample, loss on the sample. Row keys number the rows of the step's global batch, so a
    /// row samples alike however ranks and micro-batches share the step.
    fn sampled(
        &self,
        drawn: &[usize],
        source: Source,
        step: usize,
        micro: usize,
    ) -> Result<Vec<Encoded>> {
        let prompts: Vec<Vec<u32>> = drawn
            .iter()
            .map(|&i| {
                let ex = &self.train[i];
                ex.0[..prompt_len(ex)].to_vec()
            })
            .collect();
        // The engine feeds every new token but the last back, and its positions must stay
        // inside the context; so must the training forward's over the sampled sequences,
        // which reads the same positions. The longest prompt bounds the whole batch's samples.
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let c = self.cfg();
        let cfg = SampleCfg {
            max_new_tokens: c.max_new_tokens.min(self.ctx_len - longest),
            temperature: c.temperature,
            top_k: c.top_k,
            top_p: c.top_p,
            ..Default::default()
        };
        let comm = self.env.comm.as_ref();
        let first = (micro * comm.world() + comm.rank()) * drawn.len();
        let keys = RowKeys::range(
            rollout_seed(self.env.cfg.train.seed, step),
            first as u64,
            drawn.len(),
        );
        let (net, ctx) = match source {
            Source::Teacher => (&self.teacher, self.teacher_ctx()),
            _ => (&self.student, self.env.ctx(true, None)),
        };
        let g = generate(net, ctx, &self.tok, &prompts, &cfg, &keys)?;
        Ok(prompts
            .into_iter()
            .zip(g.tokens)
            .map(|(p, mut s)| {
                s.truncate(within_vocab(&s, self.vocab));
                let train = [vec![false; p.len()], vec![true; s.len()]].concat();
                ([p, s].concat(), train)
            })
            .collect())
    }

    fn teacher_ctx(&self) -> Ctx {
        self.env.ctx(false, None)
    }

    /// The divergence averaged over the trained tokens of `seqs` (one right-padded row each),
    /// the input positions, and the trained tokens counted.
    fn loss(&self, seqs: &[Encoded], dropout_seed: Option<u64>) -> Result<(Tensor, usize, f64)> {
        let b = lm_batch(seqs, self.tok.pad_id(), self.ctx_len, &self.env.device)?;
        let student = (&self.student, self.env.ctx(true, dropout_seed));
        let teacher = (&self.teacher, self.teacher_ctx());
        let Some(d) = divergence(student, teacher, &b, self.vocab, self.cfg())? else {
            bail!("distill: a batch with no trained token");
        };
        let n = d.dim(0)?;
        Ok((d.mean_all()?, b.tokens, n as f64))
    }

    fn accuracy(&self, net: &Transformer, ctx: Ctx) -> Result<Option<f64>> {
        if self.prompts.is_empty() {
            return Ok(None);
        }
        let a = accuracy(
            net,
            ctx,
            &self.tok,
            &self.prompts,
            self.cfg().eval_max_new_tokens,
            (64, false),
        )?;
        Ok(Some(a.accuracy))
    }
}

impl Task for DistillTask<'_> {
    type Eval = SftEval;

    fn epoch_items(&self) -> Option<usize> {
        Some(self.sampler.len())
    }

    fn micro_batch(&mut self, step: usize) -> Result<StepOut> {
        let comm = self.env.comm.as_ref();
        let (rank, world) = (comm.rank(), comm.world());
        let drawn = self
            .sampler
            .next_slice(self.env.cfg.train.batch_size, rank, world);
        let micro = (self.micro % self.env.cfg.train.grad_accum as u64) as usize;
        self.micro += 1;
        let data = || -> Vec<Encoded> { drawn.iter().map(|&i| self.train[i].clone()).collect() };
        let mut source = Source::of(self.cfg(), self.env.cfg.train.seed, step);
        let mut seqs = match source {
            Source::Data => data(),
            _ => self.sampled(&drawn, source, step, micro)?,
        };
        // Every sample cut to nothing (each began with a padding id): nothing to learn from
        // them, so the data's completions instead.
        if source != Source::Data && seqs.iter().all(|(_, t)| !t.contains(&true)) {
            (source, seqs) = (Source::Data, data());
        }
        let seed = (self.env.cfg.lora.dropout > 0.0 || self.student.cfg.dropout > 0.0)
            .then(|| splitmix64(self.env.cfg.train.seed ^ self.micro));
        let (loss, tokens, counted) = self.loss(&seqs, seed)?;
        let mut metrics = vec![("on_policy", f64::from(u8::from(source == Source::Student)))];
        if source != Source::Data {
            metrics.push(("sampled_len", counted / seqs.len() as f64));
        }
        Ok(StepOut {
            loss: weigh_by_tokens(comm, loss, counted)?,
            tokens,
            metrics,
        })
    }

    /// The divergence on the held-out examples' own completions (so that evaluations compare
    /// however the training mixed its sources) and the task accuracy.
    fn evaluate(&mut self) -> Result<SftEval> {
        Ok(SftEval {
            loss: held_out_mean(&self.eval, self.env.cfg.train.batch_size, |c| {
                let (loss, _, counted) = self.loss(c, None)?;
                Ok((loss, counted))
            })?,
            accuracy: self.accuracy(&self.student, self.env.ctx(true, None))?,
        })
    }

    fn state(&self) -> serde_json::Value {
        let mut s = self.sampler.state();
        s["micro"] = self.micro.into();
        s
    }

    fn restore(&mut self, s: &serde_json::Value) -> Result<()> {
        self.sampler.restore(s)?;
        self.micro = state_u64(s, "micro");
        Ok(())
    }
}

pub struct DistillResult {
    /// Held-out accuracy of the student before and after, and of the teacher (the built-in
    /// task; None for data without answers or, before, on a run resumed from a checkpoint
    /// that did not keep it).
    pub start_accuracy: Option<f64>,
    pub accuracy: Option<f64>,
    pub teacher_accuracy: Option<f64>,
    /// The held-out divergence to the teacher, at the end (None where no held-out evaluation
    /// ran).
    pub eval_loss: Option<f64>,
}

impl DistillResult {
    pub fn describe(&self) -> String {
        let Some(eval_loss) = self.eval_loss else {
            return format!("distill: {}", super::eval::NOT_EVALUATED);
        };
        let mut line = format!("distill: held-out divergence to the teacher {eval_loss:.4}");
        if let Some(a) = self.accuracy {
            let f = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.3}"));
            line.push_str(&format!(
                "\ndistill: accuracy {a:.3} (student before {}, teacher {})",
                f(self.start_accuracy),
                f(self.teacher_accuracy)
            ));
        }
        line
    }
}

/// The frozen teacher `[distill] teacher` names, which must share the student's tokenizer.
fn load_teacher(env: &Env, student_tok: &Tokenizer) -> Result<(Transformer, ParamStore)> {
    let path = env.cfg.distill.teacher.as_ref().context(
        "distill needs --teacher RUN_OR_CKPT (or [distill] teacher): the model to learn from",
    )?;
    let loaded = read_checkpoint(path, &env.device)?;
    env.check_frozen("the teacher", &loaded)?;
    if !loaded.tokenizer.same_vocabulary(student_tok) {
        bail!(
            "{}: the teacher's tokenizer ({}) is not the student's ({}): distillation compares \
             their distributions token by token, so both need one vocabulary",
            path.display(),
            loaded.tokenizer.describe(),
            student_tok.describe()
        );
    }
    let mut store = ParamStore::new(env.device.clone(), 0);
    store.freeze(Net::Policy, &[Role::Base, Role::Head], env.dtype());
    let net = policy_from(&loaded, &mut store, None)?;
    Ok((net, store))
}

/// Refuses, by file and line, a training example whose prompt leaves a sampled completion no
/// room in the context, or that has no prompt to sample from.
fn check_room(examples: &[SftExample], train: &[Encoded], ctx_len: usize) -> Result<()> {
    for (i, (ex, e)) in examples.iter().zip(train).enumerate() {
        let n = prompt_len(e);
        let place = || place(&ex.origin, "training example", i);
        if n == 0 {
            bail!(
                "{}: trains from its first token, so there is no prompt to sample a completion \
                 of ([distill] lmbda or seq_kd); set lmbda = 0 and seq_kd = false",
                place()
            );
        }
        if n >= ctx_len {
            bail!(
                "{}: its prompt takes {n} tokens of the {ctx_len}-token context, leaving no room \
                 for a sampled completion ([distill] lmbda or seq_kd); shorten it, or set lmbda \
                 = 0 and seq_kd = false",
                place()
            );
        }
    }
    Ok(())
}

pub fn run(env: &Env) -> Result<DistillResult> {
    let cfg = &env.cfg;
    let c = &cfg.distill;
    let lora = setup::lora(cfg);
    let (store, student, tok) =
        setup::trained_policy(env, "the student: a model or run directory")?;
    // Held alive for the teacher's weights.
    let (teacher, _teacher_store) = load_teacher(env, &tok)?;
    let vocab = tok
        .vocab_size()
        .min(student.cfg.vocab_size)
        .min(teacher.cfg.vocab_size);
    let (examples, eval, prompts) =
        datasets(env, c.task_examples, c.eval_prompts, LossScope::default())?;
    let ctx_len = student
        .cfg
        .max_position_embeddings
        .min(teacher.cfg.max_position_embeddings);
    let fitted = |xs, what: &str| -> Result<_> {
        let mut fit = Fitter::new(
            cfg.data.truncation,
            ctx_len + 1,
            &format!("{what} examples"),
        );
        let kept = encode_fitted(&tok, xs, ctx_len, what, &mut fit)?;
        fit.say(env);
        Ok(kept)
    };
    let (examples, train) = fitted(examples, "training")?;
    let (_, eval) = fitted(eval, "held-out")?;
    if train.is_empty() || eval.is_empty() {
        bail!("distill needs non-empty training and held-out sets (after [data] truncation)");
    }
    if c.samples() {
        check_room(&examples, &train, ctx_len)?;
    }
    drop(examples);
    let model = student.cfg.clone();
    let mut task = DistillTask {
        env,
        student,
        teacher,
        tok: tok.clone(),
        vocab,
        ctx_len,
        sampler: WindowSampler::new(train.len(), cfg.train.seed),
        train,
        eval,
        prompts,
        micro: 0,
    };
    // The student's is the loop's evaluation before the first step.
    let teacher_accuracy = match env.resume {
        true => None,
        false => task.accuracy(&task.teacher, task.teacher_ctx())?,
    };
    if let (Some(t), true) = (teacher_accuracy, env.comm.rank() == 0) {
        errln!("[distill] the teacher's held-out accuracy: {t:.3}");
    }
    if env.comm.rank() == 0 {
        errln!(
            "[distill] beta {} ({}), on-policy share {}, sampling temperature {}",
            c.beta,
            match c.beta {
                0.0 => "forward KL",
                1.0 => "reverse KL",
                _ => "generalised JSD",
            },
            c.lmbda,
            c.temperature
        );
    }
    let trainable = |p: ParamInfo| lora.is_none() || p.role == Role::Adapter;
    let summary = setup::train(
        env,
        &mut task,
        &store,
        Plan::policy(&model, lora, &tok),
        &trainable,
    )?;
    let last = summary.last_eval.as_ref();
    Ok(DistillResult {
        start_accuracy: summary.first_eval.and_then(|e| e.accuracy),
        accuracy: last.and_then(|e| e.accuracy),
        teacher_accuracy,
        eval_loss: last.map(|e| e.loss),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sampled_completion_continues_everything_before_the_last_trained_span() {
        let ex = |t: &[u8]| (vec![0; t.len()], t.iter().map(|&x| x == 1).collect());
        assert_eq!(prompt_len(&ex(&[0, 0, 0, 1, 1])), 3);
        // A conversation's earlier reply stays context.
        assert_eq!(prompt_len(&ex(&[0, 1, 1, 0, 0, 1, 1])), 5);
        assert_eq!(prompt_len(&ex(&[1, 1])), 0);
        assert_eq!(prompt_len(&ex(&[0, 0])), 2);
    }

    #[test]
    fn a_sample_ends_before_its_first_id_past_the_vocabulary() {
        assert_eq!(within_vocab(&[3, 7, 9], 10), 3);
        assert_eq!(within_vocab(&[3, 12, 9], 10), 1);
        assert_eq!(within_vocab(&[10], 10), 0);
        assert_eq!(within_vocab(&[], 10), 0);
    }

    /// The divergence at the trained positions alone is the one read off the full `[B, T, V]`
    /// logits of both models at the positions the loss mask marks: a pick one position off,
    /// or another row's, fails this.
    #[test]
    fn the_divergence_is_read_at_the_trained_positions() {
        use crate::config::ModelConfig;
        use candle_core::{DType, Device};
        let cfg = ModelConfig {
            vocab_size: 40,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 1,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 16,
            ..ModelConfig::default()
        };
        let net = |seed| {
            let mut store = ParamStore::new(Device::Cpu, seed);
            let net = Transformer::new(&mut store.scope(Net::Policy), &cfg, None).unwrap();
            (net, store)
        };
        let ((student, _s), (teacher, _t)) = (net(1), net(2));
        let seqs: Vec<Encoded> = vec![
            (
                vec![5, 6, 7, 8, 9, 10],
                vec![false, false, false, true, true, true],
            ),
            (vec![11, 12, 13], vec![false, true, true]),
            (
                vec![14, 15, 16, 17, 18],
                vec![false, true, false, false, true],
            ),
        ];
        let b = lm_batch(&seqs, 0, 16, &Device::Cpu).unwrap();
        let ctx = Ctx::plain(DType::F32);
        let vocab = 37;
        for beta in [0.0, 0.5, 1.0] {
            let c = DistillConfig {
                beta,
                // Sampling's alone: the divergence is the untempered one all the same.
                temperature: 0.8,
                ..Default::default()
            };
            let got = divergence((&student, ctx), (&teacher, ctx), &b, vocab, &c)
                .unwrap()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let f = Fwd {
                ctx,
                positions: None,
                key_valid: None,
                segments: None,
            };
            let full = |net: &Transformer| net.forward(&b.inputs, &f, None).unwrap();
            let (s, t) = (full(&student), full(&teacher));
            let mask = b.loss_mask.to_vec2::<f32>().unwrap();
            let mut want = vec![];
            for (r, row) in mask.iter().enumerate() {
                for (j, &m) in row.iter().enumerate() {
                    if m > 0.0 {
                        let at = |x: &Tensor| x.get(r).unwrap().narrow(0, j, 1).unwrap();
                        let (s, t) = (at(&s), at(&t));
                        let (s, t) = (
                            s.narrow(1, 0, vocab).unwrap(),
                            t.narrow(1, 0, vocab).unwrap(),
                        );
                        let d = generalized_jsd(&s, &t, beta).unwrap();
                        want.push(d.to_vec1::<f32>().unwrap()[0]);
                    }
                }
            }
            assert_eq!(got.len(), 7, "trained positions");
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() < 1e-5 * (1.0 + w.abs()),
                    "beta {beta}: {got:?} vs {want:?}"
                );
            }
            assert!(got.iter().all(|&g| g > 0.0));
        }
        // No trained position: no divergence.
        let none: Vec<Encoded> = vec![(vec![5, 6], vec![false, false])];
        let b = lm_batch(&none, 0, 16, &Device::Cpu).unwrap();
        let c = DistillConfig::default();
        assert!(divergence((&student, ctx), (&teacher, ctx), &b, vocab, &c)
            .unwrap()
            .is_none());
    }

    #[test]
    fn lmbda_is_the_share_of_on_policy_steps_and_seq_kd_takes_the_rest() {
        let share = |lmbda: f64, seq_kd: bool, want: Source| {
            let c = DistillConfig {
                lmbda,
                seq_kd,
                ..Default::default()
            };
            let n = (0..800).filter(|&s| Source::of(&c, 3, s) == want).count();
            n as f64 / 800.0
        };
        assert_eq!(share(0.0, false, Source::Data), 1.0);
        assert_eq!(share(1.0, false, Source::Student), 1.0);
        assert!((share(0.5, false, Source::Student) - 0.5).abs() < 0.06);
        assert!((share(0.25, true, Source::Teacher) - 0.75).abs() < 0.06);
    }
}
