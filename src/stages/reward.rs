//! Reward modelling: a transformer with a scalar head read at the last real token of
//! prompt + response (+ EOS), trained with the Bradley-Terry loss
//! `-log sigmoid(r_chosen - r_rejected - margin)`, plus TRL's centring term where
//! `center_rewards_coefficient` asks for it; evaluated by pairwise accuracy.

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::batch::{fit_rows, halves, padded};
use super::loader::scored_from;
use super::setup::{self, init_checkpoint, split_holdout, Plan};
use super::truncate::Fitter;
use super::Env;
use crate::data::records::{place, preferences_from, ColumnReader, PreferencePair};
use crate::data::sampler::WindowSampler;
use crate::data::synthetic::Split;
use crate::data::tokenizer::Tokenizer;
use crate::kernels::segments::Segments;
use crate::model::heads::gather_last;
use crate::model::pick::pick_rows;
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

    /// One score per sequence, read at its last real token (for a classifier imported from
    /// Hugging Face, its last token that is not the classifier's `pad_token_id`, as
    /// transformers reads it); with `pack`, from sequences packed into rows as wide as the
    /// longest where that computes fewer positions.
    pub fn score(
        &self,
        seqs: &[Vec<u32>],
        pad: u32,
        ctx: crate::model::linear::Ctx,
        pack: bool,
    ) -> Result<Tensor> {
        let trimmed: Vec<Vec<u32>>;
        let seqs = match self.net.cfg.score_pad {
            // Causal attention: the score at a token does not depend on the tokens after it.
            Some(p) => {
                trimmed = seqs.iter().map(|s| trim_trailing(s, p)).collect();
                &trimmed[..]
            }
            None => seqs,
        };
        let dev = self.net.device().clone();
        if pack {
            if let Some(s) = self.packed_scores(seqs, pad, ctx)? {
                return Ok(s);
            }
        }
        let (ids, _, last) = padded(seqs, pad, self.net.cfg.max_position_embeddings, &dev)?;
        gather_last(&self.per_token(&ids, None, ctx)?, &last)
    }

    /// [`Self::score`] of sequences packed by best-fit decreasing into rows as wide as the
    /// longest, each attending only to itself (`Segments`), each score picked at its last
    /// token; None where that saves no position, or a sequence is empty.
    fn packed_scores(
        &self,
        seqs: &[Vec<u32>],
        pad: u32,
        ctx: crate::model::linear::Ctx,
    ) -> Result<Option<Tensor>> {
        let sizes: Vec<usize> = seqs.iter().map(Vec::len).collect();
        let longest = sizes.iter().copied().max().unwrap_or(0);
        if sizes.contains(&0) || longest > self.net.cfg.max_position_embeddings {
            return Ok(None);
        }
        let Some((bins, len)) = fit_rows(&sizes, longest, seqs.len() * longest)? else {
            return Ok(None);
        };
        let mut ids = vec![pad; bins.len() * len];
        let mut last = vec![None; seqs.len()];
        let mut docs = Vec::with_capacity(bins.len());
        for (r, bin) in bins.iter().enumerate() {
            let mut at = r * len;
            for &i in bin {
                ids[at..at + sizes[i]].copy_from_slice(&seqs[i]);
                at += sizes[i];
                last[i] = Some((at - 1) as u32);
            }
            docs.push(bin.iter().map(|&i| sizes[i]).collect());
        }
        let dev = self.net.device();
        let segments = Segments::from_lengths(&docs, len, dev)?;
        let f = Fwd {
            ctx,
            positions: None,
            key_valid: None,
            segments: Some(&segments),
        };
        let ids = Tensor::from_vec(ids, (bins.len(), len), dev)?;
        let per_token = self.head.forward(&self.net.hidden(&ids, &f, None)?)?;
        let flat = per_token.reshape((bins.len() * len, 1))?;
        Ok(Some(pick_rows(&flat, &last)?.squeeze(1)?))
    }
}

/// `seq` without its trailing `pad` tokens (one token kept, so no sequence is left empty).
fn trim_trailing(seq: &[u32], pad: u32) -> Vec<u32> {
    let keep = seq.iter().rposition(|&t| t != pad).map_or(1, |i| i + 1);
    seq[..keep.min(seq.len())].to_vec()
}

/// A pair as scored: the chosen and the rejected token ids, and the margin its chosen reward
/// should clear (the record's own, else `[reward] margin`).
type EncodedPair = (Vec<u32>, Vec<u32>, f64);

/// Every pair as (chosen, rejected) token ids with its margin, fitted to the context under
/// `[data] truncation` (a pair is cut or left out whole; errors name the record). A cut that
/// leaves a side none of its reply leaves the pair out.
fn encode_pairs(
    env: &Env,
    tok: &Tokenizer,
    pairs: &[PreferencePair],
    ctx: usize,
    what: &str,
) -> Result<Vec<EncodedPair>> {
    let mut fit = Fitter::new(env.cfg.data.truncation, ctx, &format!("{what} pairs"));
    let mut out = Vec::new();
    for (i, p) in pairs.iter().enumerate() {
        // Encoded as SFT encodes a prompt and its reply: the loss mask marks the reply, so
        // that a cut keeping none of it can be told; the scorer reads the ids alone.
        let place = || place(&p.origin, &format!("{what} preference pair"), i);
        if let Some(mut both) = fit.encode(tok, &p.examples(), place, ctx)? {
            let rejected = both.pop().expect("two sequences").0;
            let margin = p.margin.unwrap_or(env.cfg.reward.margin);
            out.push((both.pop().expect("two sequences").0, rejected, margin));
        }
    }
    fit.say(env);
    if let Some(line) = margin_note(pairs, env.cfg.reward.margin, what) {
        crate::warnln!("{line}");
    }
    Ok(out)
}

/// Said where some of a file's pairs give their own margin and others none: those take
/// `[reward] margin`, which a file that meant every pair to carry one would not expect (TRL
/// stops at such a gap in its column).
fn margin_note(pairs: &[PreferencePair], default: f64, what: &str) -> Option<String> {
    let without = pairs.iter().filter(|p| p.margin.is_none()).count();
    (without > 0 && without < pairs.len()).then(|| {
        format!(
            "[reward] {without} of {} {what} pairs give no \"margin\": they take [reward] margin = {default}",
            pairs.len()
        )
    })
}

struct RewardTask<'a> {
    env: &'a Env,
    model: Scorer,
    tok: Tokenizer,
    train: Vec<EncodedPair>,
    eval: Vec<EncodedPair>,
    sampler: WindowSampler,
}

impl RewardTask<'_> {
    /// A batch of pairs, scored.
    fn pairs(&self, pairs: &[EncodedPair]) -> Result<Scored> {
        let mut seqs: Vec<Vec<u32>> = pairs.iter().map(|p| p.0.clone()).collect();
        seqs.extend(pairs.iter().map(|p| p.1.clone()));
        let tokens = seqs.iter().map(Vec::len).sum();
        let scores = self.model.score(
            &seqs,
            self.tok.pad_id(),
            self.env.ctx(true, None),
            self.env.cfg.reward.padding_free,
        )?;
        let n = pairs.len();
        let (chosen, rejected) = halves(&scores)?;
        let c = &self.env.cfg.reward;
        let margins: Vec<f32> = pairs.iter().map(|p| p.2 as f32).collect();
        let margins = Tensor::from_vec(margins, n, chosen.device())?.to_dtype(chosen.dtype())?;
        let loss = pairwise_loss(&chosen, &rejected, &margins)?;
        // One read of the scores for both numbers the host needs.
        let host = scores.to_vec1::<f32>()?;
        let (c_host, r_host) = host.split_at(n);
        let ranked = c_host.iter().zip(r_host).filter(|(c, r)| c > r).count();
        Ok(Scored {
            loss,
            centring: centring(&chosen, &rejected, c.center_rewards_coefficient)?,
            accuracy: ranked as f64 / n as f64,
            mean: host.iter().map(|&x| f64::from(x)).sum::<f64>() / (2 * n) as f64,
            tokens,
        })
    }
}

/// A batch of pairs scored: the Bradley-Terry loss, the centring term (None when off), the
/// share of pairs ranked right, the scores' mean, and the tokens read.
struct Scored {
    loss: Tensor,
    centring: Option<Tensor>,
    accuracy: f64,
    mean: f64,
    tokens: usize,
}

/// Bradley-Terry's `-mean log sigmoid(r_chosen - r_rejected - margin)`, a margin a pair.
fn pairwise_loss(chosen: &Tensor, rejected: &Tensor, margin: &Tensor) -> Result<Tensor> {
    Ok(log_sigmoid(&((chosen - rejected)? - margin)?)?
        .mean_all()?
        .neg()?)
}

/// `coef * mean((r_chosen + r_rejected)^2)`, TRL's reward centring; None at 0.
fn centring(chosen: &Tensor, rejected: &Tensor, coef: f64) -> Result<Option<Tensor>> {
    if coef == 0.0 {
        return Ok(None);
    }
    Ok(Some(((chosen + rejected)?.sqr()?.mean_all()? * coef)?))
}

/// The reward model's held-out numbers: Bradley-Terry loss, pairwise accuracy, and the
/// scores' mean (where centring holds it).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RewardEval {
    pub loss: f64,
    pub accuracy: f64,
    pub reward_mean: f64,
}

impl Report for RewardEval {
    fn fields(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("loss", self.loss),
            ("accuracy", self.accuracy),
            ("reward_mean", self.reward_mean),
        ]
    }
}

impl Task for RewardTask<'_> {
    type Eval = RewardEval;

    fn epoch_items(&self) -> Option<usize> {
        Some(self.sampler.len())
    }

    fn micro_batch(&mut self, _step: usize) -> Result<StepOut> {
        // Each rank scores its slice of the global batch; every pair weighs the same.
        let comm = self.env.comm.as_ref();
        let batch: Vec<_> = self
            .sampler
            .next_slice(self.env.cfg.train.batch_size, comm.rank(), comm.world())
            .into_iter()
            .map(|i| self.train[i].clone())
            .collect();
        let s = self.pairs(&batch)?;
        let mut metrics = vec![("accuracy", s.accuracy), ("reward_mean", s.mean)];
        let loss = match s.centring {
            Some(c) => {
                metrics.push(("bt_loss", scalar(&s.loss)?));
                (s.loss + c)?
            }
            None => s.loss,
        };
        Ok(StepOut {
            loss,
            tokens: s.tokens,
            metrics,
        })
    }

    fn evaluate(&mut self) -> Result<RewardEval> {
        let (mut loss, mut acc, mut mean, mut n) = (0.0, 0.0, 0.0, 0.0);
        for c in self.eval.chunks(self.env.cfg.train.batch_size) {
            // The held-out loss is Bradley-Terry's alone, comparable with or without centring.
            let s = self.pairs(c)?;
            loss += scalar(&s.loss)? * c.len() as f64;
            acc += s.accuracy * c.len() as f64;
            mean += s.mean * c.len() as f64;
            n += c.len() as f64;
        }
        Ok(RewardEval {
            loss: loss / n,
            accuracy: acc / n,
            reward_mean: mean / n,
        })
    }

    fn state(&self) -> serde_json::Value {
        self.sampler.state()
    }

    fn restore(&mut self, s: &serde_json::Value) -> Result<()> {
        self.sampler.restore(s)
    }
}

pub struct RewardResult {
    /// None where no held-out evaluation ran (a resumed run that had finished, say).
    pub accuracy: Option<f64>,
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
            let reader = ColumnReader::new(&env.cfg.data.columns);
            let read = |f: &Path| reader.read(f);
            let load = |f: &Path| preferences_from(f, read(f)?, template.as_ref());
            let sets = split_holdout(env, p, load, "pairs")?;
            reader.check(p)?;
            setup::warn_template_unread(env, template.as_ref(), Some(p));
            Ok(sets)
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
        encode_pairs(env, &tok, &train, ctx, "training")?,
        encode_pairs(env, &tok, &eval, ctx, "held-out")?,
    );
    if train.is_empty() || eval.is_empty() {
        bail!("reward: no training or no held-out pair is left once fitted to the model's context and pairs of two equal sides are left out (the lines above say which were left out, and why)");
    }
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
        accuracy: summary.last_eval.map(|e| e.accuracy),
        first_accuracy: summary.first_eval.map(|e| e.accuracy),
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::config::ModelConfig;
    use crate::model::linear::Ctx;
    use crate::train::params::Net;
    use crate::train::rng::Rng;

    /// A file whose pairs give margins to some and none to others is told which take the
    /// default; all or none giving one is no news.
    #[test]
    fn pairs_without_a_margin_among_some_with_one_are_counted() {
        let pair = |margin| PreferencePair {
            prompt: "p".into(),
            chosen: "c".into(),
            rejected: "r".into(),
            append_eos: true,
            origin: None,
            margin,
        };
        let some = [pair(Some(1.5)), pair(None), pair(None)];
        assert_eq!(
            margin_note(&some, 0.0, "training").as_deref(),
            Some(
                "[reward] 2 of 3 training pairs give no \"margin\": they take [reward] margin = 0"
            )
        );
        assert_eq!(
            margin_note(&[pair(None), pair(None)], 0.0, "training"),
            None
        );
        assert_eq!(margin_note(&[pair(Some(1.0))], 0.0, "training"), None);
    }

    /// Bradley-Terry with a margin, and TRL's centring term, against numbers worked by hand.
    #[test]
    fn the_pairwise_loss_and_the_centring_term_match_hand_values() {
        let t = |x: &[f32]| Tensor::new(x, &Device::Cpu).unwrap();
        let (chosen, rejected) = (t(&[2.0, 0.5]), t(&[1.0, 1.5]));
        let sp = |x: f64| (1.0 + x.exp()).ln(); // -log sigmoid(-x)
                                                // Differences 1 and -1, less the margin 0.5.
        let got = scalar(&pairwise_loss(&chosen, &rejected, &t(&[0.5, 0.5])).unwrap()).unwrap();
        let want = (sp(-0.5) + sp(1.5)) / 2.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // A margin a pair (a record's own): 1 - 0 and -1 - 2.
        let got = scalar(&pairwise_loss(&chosen, &rejected, &t(&[0.0, 2.0])).unwrap()).unwrap();
        let want = (sp(-1.0) + sp(3.0)) / 2.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // Sums 3 and 2: 0.1 * (9 + 4) / 2.
        let c = centring(&chosen, &rejected, 0.1).unwrap().unwrap();
        assert!((scalar(&c).unwrap() - 0.65).abs() < 1e-6);
        assert!(centring(&chosen, &rejected, 0.0).unwrap().is_none());
    }

    /// Scoring packed is only a layout: sequences of 3 to 21 tokens packed into rows as wide as
    /// the longest give the padded batch's scores, and every parameter's gradient of a
    /// weighted sum of them, in candle's graph and on the tape (blocks recomputed or not); a
    /// batch that packing would not shrink is scored padded.
    #[test]
    fn packed_sequences_score_and_train_as_padded_ones() {
        let mut rng = Rng::new(17);
        let seqs: Vec<Vec<u32>> = [7, 21, 3, 12, 9, 16, 5]
            .iter()
            .map(|&n| (0..n).map(|_| 1 + rng.below(60) as u32).collect())
            .collect();
        let w = Tensor::new(&[0.5f32, -1.0, 2.0, 0.25, -0.75, 1.5, 1.0], &Device::Cpu).unwrap();
        for preset in ["gpt2", "llama-tiny"] {
            let mut cfg = ModelConfig::for_tests(preset);
            cfg.dropout = 0.0;
            let mut store = ParamStore::new(Device::Cpu, 23);
            let mut scope = store.scope(Net::Policy);
            let net = Transformer::new(&mut scope, &cfg, None).unwrap();
            let head = ScalarHead::load(scope.pp("score"), cfg.hidden_size, false).unwrap();
            let scorer = Scorer { net, head };
            for (tape, recompute_blocks) in [(false, false), (true, false), (true, true)] {
                let ctx = Ctx {
                    tape,
                    recompute_blocks,
                    ..Ctx::plain(DType::F32)
                };
                // The packed scores straight from `packed_scores`, so that a `score` that
                // ignored `pack` could not pass by comparing padded with padded.
                let run = |pack: bool| {
                    let s = match pack {
                        true => scorer.packed_scores(&seqs, 0, ctx).unwrap().unwrap(),
                        false => scorer.score(&seqs, 0, ctx, false).unwrap(),
                    };
                    let loss = (&s * &w).unwrap().sum_all().unwrap();
                    let grads = crate::tape::backward(&loss).unwrap();
                    let g: Vec<Vec<f32>> = store
                        .iter()
                        .map(|(_, v, _)| {
                            let g = grads.get(v.as_tensor()).unwrap();
                            g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                        })
                        .collect();
                    (s.to_vec1::<f32>().unwrap(), g)
                };
                let what = format!("{preset} tape {tape} recompute {recompute_blocks}");
                let (want, g0) = run(false);
                let (got, g1) = run(true);
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                        "{what}: {got:?} vs {want:?}"
                    );
                }
                for (a, b) in g1.iter().zip(&g0) {
                    let scale = b.iter().fold(1e-3f32, |m, y| m.max(y.abs()));
                    for (x, y) in a.iter().zip(b) {
                        assert!((x - y).abs() <= 1e-5 * scale, "{what}: gradient {x} vs {y}");
                    }
                }
            }
            // 73 tokens pack into four rows of 21 (84 positions, against 147 padded), and
            // `score` with `pack` takes that path.
            let plain = Ctx::plain(DType::F32);
            let packed = scorer.packed_scores(&seqs, 0, plain).unwrap().unwrap();
            let scored = scorer.score(&seqs, 0, plain, true).unwrap();
            assert_eq!(
                packed.to_vec1::<f32>().unwrap(),
                scored.to_vec1::<f32>().unwrap()
            );
            // Two sequences of one length: nothing to save.
            let same = [seqs[1].clone(), seqs[1].clone()];
            let packed = scorer
                .packed_scores(&same, 0, Ctx::plain(DType::F32))
                .unwrap();
            assert!(packed.is_none());
        }
    }
}
