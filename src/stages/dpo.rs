//! Direct preference optimisation and its relatives, over response log-probabilities summed
//! over tokens: DPO's `-log sigmoid(beta * ((logp_c - logp_ref_c) - (logp_r - logp_ref_r)))`
//! (TRL's `sigmoid` loss, with cDPO's label smoothing), `hinge` (SLiC), `ipo`, `robust`,
//! `exo_pair`, `nca_pair`, `sppo_hard`, `apo_zero`, `apo_down`, `discopop`, `bco_pair`,
//! `sigmoid_norm`, `aot`, `aot_unpaired` (over f-DPO's scores of the log-ratios) and the
//! reference-free `simpo` and `orpo` (`[dpo] loss_type`; [`preference_loss`]), or several of
//! them summed with weights (TRL's list, `"sft"` among them: MPO). The
//! reference is the base with adapters off under LoRA, else a frozen copy; SimPO and ORPO
//! load none. With `[dpo] precompute_ref_log_probs` the reference scores every pair once,
//! before training, and is then dropped.

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use super::batch::{halves, Encoded, SeqBatch};
use super::eval::task_accuracy;
use super::ref_sync::{MovingReference, RefSync};
use super::rollout::FrozenReference;
use super::setup::{self, prompt_sets, split_holdout, Plan, PolicyPair};
use super::truncate::Fitter;
use super::Env;
use crate::config::{DpoConfig, DpoLoss, FDivergence};
use crate::data::records::{place, preferences_from, ColumnReader, PreferencePair, PromptRecord};
use crate::data::sampler::WindowSampler;
use crate::data::synthetic::Split;
use crate::data::tokenizer::Tokenizer;
use crate::dist::Communicator;
use crate::model::linear::Ctx;
use crate::model::Transformer;
use crate::train::loss::{log_sigmoid, scalar};
use crate::train::params::{ParamInfo, ParamStore, Role};
use crate::train::progress::Progress;
use crate::train::runner::{Report, StepOut, Task};

/// One side of a batch of pairs, each `[B]`: the chosen responses' and the rejected ones'.
#[derive(Clone, Copy)]
pub struct Pairwise<'a> {
    pub chosen: &'a Tensor,
    pub rejected: &'a Tensor,
}

impl<'a> From<&'a (Tensor, Tensor)> for Pairwise<'a> {
    fn from((chosen, rejected): &'a (Tensor, Tensor)) -> Self {
        Self { chosen, rejected }
    }
}

/// The losses `c.loss_type` names (each a mean over pairs, times its weight, summed; `"sft"`
/// left to [`with_chosen_nll`]) and the share of pairs whose implicit reward ranks the chosen
/// response first (by the first loss listed), from the policy's and (where a loss reads one)
/// the reference's response log-probabilities summed over tokens, and each response's token
/// count.
pub fn preference_loss(
    c: &DpoConfig,
    policy: Pairwise,
    reference: Option<Pairwise>,
    tokens: Pairwise,
) -> Result<(Tensor, f64)> {
    shifted_preference_loss(c, policy, reference, tokens, 0.0, None)
}

/// [`preference_loss`] with BCO's reward shift `shift` (read by `bco_pair` alone), and each
/// pair's losses times its weight in `pair_weights` (`[B]`, WPO's) where given.
pub fn shifted_preference_loss(
    c: &DpoConfig,
    policy: Pairwise,
    reference: Option<Pairwise>,
    tokens: Pairwise,
    shift: f64,
    pair_weights: Option<&Tensor>,
) -> Result<(Tensor, f64)> {
    let mut total: Option<Tensor> = None;
    // Where a reference is read, a pair is ranked right when its summed log-ratios are, as
    // TRL counts `rewards/accuracies` whatever the loss: the per-token or f-divergence
    // margin some losses train on can rank a pair of unequal lengths the other way.
    let mut acc = match reference {
        Some(r) => {
            let h = ((policy.chosen - r.chosen)? - (policy.rejected - r.rejected)?)?;
            Some(chosen_first(&h)?)
        }
        None => None,
    };
    for (kind, weight) in c.losses().filter(|(l, _)| *l != DpoLoss::Sft) {
        let (losses, h) = one_loss(kind, c, policy, reference, tokens, shift)?;
        // Read from the device once: each read waits for it.
        if acc.is_none() {
            acc = Some(chosen_first(&h)?);
        }
        let losses = match pair_weights {
            Some(w) => (losses * w)?,
            None => losses,
        };
        let term = (losses.mean_all()? * weight)?;
        total = Some(match total {
            Some(t) => (t + term)?,
            None => term,
        });
    }
    match total {
        Some(t) => Ok((t, acc.unwrap_or(0.0))),
        // `"sft"` alone: no preference term; without a reference the accuracy is the
        // policy's own ranking.
        None => {
            let h = (policy.chosen - policy.rejected)?;
            let zero = Tensor::zeros((), h.dtype(), h.device())?;
            let acc = match acc {
                Some(a) => a,
                None => chosen_first(&h)?,
            };
            Ok((zero, acc))
        }
    }
}

/// The share of pairs whose margin `h` (`[B]`) ranks the chosen response first.
fn chosen_first(h: &Tensor) -> Result<f64> {
    let m = h.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(m.iter().filter(|&&x| x > 0.0).count() as f64 / m.len().max(1) as f64)
}

/// One loss of the list, `[B]`, and its margin `h`.
fn one_loss(
    kind: DpoLoss,
    c: &DpoConfig,
    policy: Pairwise,
    reference: Option<Pairwise>,
    tokens: Pairwise,
    shift: f64,
) -> Result<(Tensor, Tensor)> {
    let per_token = kind.per_token();
    let scaled = |x: &Tensor, n: &Tensor| -> Result<Tensor> {
        Ok(if per_token {
            (x / n.clamp(1.0, f64::INFINITY)?)?
        } else {
            x.clone()
        })
    };
    // The chosen and rejected responses' log-ratios to the reference (over summed
    // log-probabilities), where the loss reads one.
    let ratios = match (kind.needs_reference(), reference) {
        (false, _) => None,
        (true, Some(r)) => Some(((policy.chosen - r.chosen)?, (policy.rejected - r.rejected)?)),
        (true, None) => bail!(
            "dpo: loss_type {} needs the reference's log-probabilities",
            kind.name()
        ),
    };
    // What the losses compare: f(log-ratio) of `f_divergence_type`, averaged per token where
    // the loss averages (TRL's scores). The reference-free losses read the policy's own
    // log-probabilities, averaged per token.
    let scores = match &ratios {
        Some((cr, rr)) => Some((
            scaled(&diverge(c, cr)?, tokens.chosen)?,
            scaled(&diverge(c, rr)?, tokens.rejected)?,
        )),
        None => None,
    };
    let (pc, pr) = (
        scaled(policy.chosen, tokens.chosen)?,
        scaled(policy.rejected, tokens.rejected)?,
    );
    // h: how much more the policy prefers the chosen response than the reference does (the
    // reference-free losses: than the rejected one).
    let h = match &scores {
        Some((sc, sr)) => (sc - sr)?,
        None => (&pc - &pr)?,
    };
    let z = (&h * c.beta)?;
    let e = c.label_smoothing;
    // -log sigmoid(z) and -log sigmoid(-z), each [B].
    let nls = |z: &Tensor| -> Result<Tensor> { Ok(log_sigmoid(z)?.neg()?) };
    let sigmoid = |z: &Tensor| -> Result<Tensor> { Ok(log_sigmoid(z)?.exp()?) };
    // beta times each response's score (`raw`: its log-ratio itself, as APO reads it).
    let beta_sides = |raw: bool| -> Result<(Tensor, Tensor)> {
        let (sc, sr) = match raw {
            true => ratios.as_ref(),
            false => scores.as_ref(),
        }
        .expect("these losses read the reference");
        Ok(((sc * c.beta)?, (sr * c.beta)?))
    };
    // DPO's sigmoid loss with label smoothing, over margins `z`.
    let smoothed =
        |z: &Tensor| -> Result<Tensor> { Ok(((nls(z)? * (1.0 - e))? + (nls(&z.neg()?)? * e)?)?) };
    let losses = match kind {
        DpoLoss::Sigmoid => smoothed(&z)?,
        DpoLoss::SigmoidNorm => nls(&z)?,
        DpoLoss::Robust => (((nls(&z)? * (1.0 - e))? - (nls(&z.neg()?)? * e)?)? / (1.0 - 2.0 * e))?,
        DpoLoss::Hinge => z.affine(-1.0, 1.0)?.relu()?,
        DpoLoss::Ipo => h.affine(1.0, -0.5 / c.beta)?.sqr()?,
        DpoLoss::Simpo => nls(&z.affine(1.0, -c.simpo_gamma)?)?,
        DpoLoss::Orpo => {
            // log odds(a) = a - log(1 - exp(a)); the clamp keeps a certain response finite.
            let log_not = |a: &Tensor| -> Result<Tensor> {
                Ok(a.exp()?.affine(-1.0, 1.0)?.clamp(1e-7, 1.0)?.log()?)
            };
            let log_odds = (&h - (log_not(&pc)? - log_not(&pr)?)?)?;
            (nls(&log_odds)? * c.beta)?
        }
        DpoLoss::ExoPair => {
            let e = if e == 0.0 { 1e-3 } else { e };
            let side = |z: &Tensor, target: f64| -> Result<Tensor> {
                Ok((sigmoid(z)? * (log_sigmoid(z)? - target.ln())?)?)
            };
            (side(&z, 1.0 - e)? + side(&z.neg()?, e)?)?
        }
        DpoLoss::NcaPair => {
            let (zc, zr) = beta_sides(false)?;
            ((nls(&zc)? + (nls(&zc.neg()?)? * 0.5)?)? + (nls(&zr.neg()?)? * 0.5)?)?
        }
        DpoLoss::SppoHard => {
            let (sc, sr) = scores.as_ref().expect("sppo_hard reads the reference");
            let half = 0.5 / c.beta;
            (sc.affine(1.0, -half)?.sqr()? + sr.affine(1.0, half)?.sqr()?)?
        }
        DpoLoss::ApoZero => {
            let (zc, zr) = beta_sides(true)?;
            (sigmoid(&zc)?.affine(-1.0, 1.0)? + sigmoid(&zr)?)?
        }
        DpoLoss::ApoDown => {
            let (zc, _) = beta_sides(true)?;
            (sigmoid(&zc)? + sigmoid(&z)?.affine(-1.0, 1.0)?)?
        }
        DpoLoss::Discopop => {
            let zt = (&z / c.discopop_tau)?;
            let logistic = (nls(&z)? * sigmoid(&zt)?.affine(-1.0, 1.0)?)?;
            // exp(-z) s(z / tau) as one exponent: exp(-z) alone overflows f32 at a very
            // negative margin, where the blend is exactly 0.
            (logistic + (log_sigmoid(&zt)? - &z)?.exp()?)?
        }
        DpoLoss::BcoPair => {
            let (zc, zr) = beta_sides(false)?;
            (nls(&zc.affine(1.0, -shift)?)? + nls(&zr.affine(-1.0, shift)?)?)?
        }
        DpoLoss::Aot => {
            let r = reference.expect("aot reads the reference");
            let margins = |s: Pairwise| -> Result<Tensor> { sorted(&(s.chosen - s.rejected)?) };
            smoothed(&((margins(policy)? - margins(r)?)? * c.beta)?)?
        }
        DpoLoss::AotUnpaired => {
            let (cr, rr) = ratios.as_ref().expect("aot_unpaired reads the reference");
            smoothed(&((sorted(cr)? - sorted(rr)?)? * c.beta)?)?
        }
        DpoLoss::Sft => bail!("dpo: \"sft\" is the chosen responses' NLL, not a pair loss"),
    };
    Ok((losses, h))
}

/// LD-DPO's tails of a batch laid out as [`DpoTask::batch`] lays it (chosen responses, then
/// rejected, pair `i` at `i` and `n + i`): each sequence with only the loss-masked tokens
/// past the count its pair's two responses share still marked.
fn ld_tails(seqs: &[Encoded]) -> Vec<Encoded> {
    let n = seqs.len() / 2;
    let count = |s: &Encoded| s.1.iter().filter(|&&m| m).count();
    seqs.iter()
        .enumerate()
        .map(|(i, (ids, mask))| {
            let shared = count(&seqs[i % n]).min(count(&seqs[n + i % n]));
            let mut seen = 0;
            let tail = mask
                .iter()
                .map(|&m| {
                    seen += usize::from(m);
                    m && seen > shared
                })
                .collect();
            (ids.clone(), tail)
        })
        .collect()
}

/// `u`'s values in ascending order (`[B]`): AOT compares the batch's distributions.
fn sorted(u: &Tensor) -> Result<Tensor> {
    let order = u.arg_sort_last_dim(true)?;
    Ok(u.index_select(&order, 0)?)
}

/// f(u) of `[dpo] f_divergence_type` for log-ratios `u` (`[B]`), as TRL forms it: constants
/// dropped, and `alpha_divergence`'s exponent capped (80, 11 in f16) in f32 so that it stays
/// finite in the dtype, `a` within 1e-6 of 1 its limit `u`.
fn diverge(c: &DpoConfig, u: &Tensor) -> Result<Tensor> {
    Ok(match c.f_divergence_type {
        FDivergence::ReverseKl => u.clone(),
        FDivergence::ForwardKl => u.neg()?.exp()?.neg()?,
        FDivergence::JsDivergence => log_sigmoid(u)?,
        FDivergence::AlphaDivergence => {
            let a = c.f_alpha_divergence_coef;
            if (a - 1.0).abs() < 1e-6 {
                u.clone()
            } else {
                let cap = if u.dtype() == DType::F16 { 11.0 } else { 80.0 };
                let t = (u.to_dtype(DType::F32)? * (a - 1.0))?.minimum(cap)?;
                (t.exp()?.to_dtype(u.dtype())? / (a - 1.0))?
            }
        }
    })
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
type EncodedPair = [Encoded; 2];

/// Encodes every pair once, fitted to the context under `[data] truncation` (a pair is cut or
/// left out whole; errors name the record).
fn encode_pairs(
    env: &Env,
    tok: &Tokenizer,
    pairs: &[PreferencePair],
    ctx: usize,
    what: &str,
) -> Result<Vec<EncodedPair>> {
    let mut fit = Fitter::new(env.cfg.data.truncation, ctx + 1, &format!("{what} pairs"));
    let mut out = Vec::new();
    for (i, p) in pairs.iter().enumerate() {
        let place = || place(&p.origin, &format!("{what} preference pair"), i);
        if let Some(mut both) = fit.encode(tok, &p.examples(), place, ctx)? {
            let rejected = both.pop().expect("two sequences");
            out.push([both.pop().expect("two sequences"), rejected]);
        }
    }
    fit.say(env);
    Ok(out)
}

/// The reference's summed log-probabilities of a pair's chosen and rejected responses.
type RefLogps = [f32; 2];

/// Values each scored by one rank (zeros on the others), made every rank's exactly: a mean
/// of f32s would round `x / world * world` where `world` is no power of two, so each value's
/// bits travel as two 16-bit halves, whole numbers the mean and the product bring back to the
/// nearest integer exactly.
fn gather_exactly(comm: &dyn Communicator, flat: &[f32]) -> Result<Vec<f32>> {
    let mut halves: Vec<f32> = flat
        .iter()
        .flat_map(|x| {
            let bits = x.to_bits();
            [(bits >> 16) as f32, (bits & 0xffff) as f32]
        })
        .collect();
    comm.all_reduce_mean(&mut halves)?;
    let world = comm.world() as f32;
    let whole = |h: f32| (h * world).round() as u32;
    Ok(halves
        .chunks(2)
        .map(|h| f32::from_bits(whole(h[0]) << 16 | whole(h[1])))
        .collect())
}

/// BCO's reward shift: the running mean of the training batches' mean implicit rewards
/// (TRL's RunningMoments, updated with one value a batch).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RewardShift {
    pub mean: f64,
    pub count: f64,
}

impl RewardShift {
    /// The shift once a batch whose mean reward is `x` is counted.
    pub fn update(&mut self, x: f64) {
        self.count += 1.0;
        self.mean += (x - self.mean) / self.count;
    }
}

struct DpoTask<'a> {
    env: &'a Env,
    policy: Transformer,
    /// None for a loss that reads no reference (SimPO, ORPO), and once the reference's
    /// log-probabilities are precomputed.
    reference: Option<FrozenReference>,
    tok: Tokenizer,
    train: Vec<EncodedPair>,
    eval: Vec<EncodedPair>,
    /// The reference's log-probabilities of each training and held-out pair, where they were
    /// precomputed.
    train_ref: Option<Vec<RefLogps>>,
    eval_ref: Option<Vec<RefLogps>>,
    eval_prompts: Vec<PromptRecord>,
    sampler: WindowSampler,
    /// `bco_pair`'s shift, moved by each training batch (held-out batches read it).
    shift: std::cell::Cell<RewardShift>,
    /// TR-DPO's updates of the reference (`[dpo] sync_ref_model`), towards `store`, the
    /// policy's weights.
    moving: MovingReference,
    store: &'a ParamStore,
}

impl DpoTask<'_> {
    /// The frozen reference copy's weights; none under LoRA or without a reference.
    fn reference_store(&self) -> Option<&ParamStore> {
        self.reference.as_ref().and_then(FrozenReference::store)
    }
}

impl DpoTask<'_> {
    /// The sequences of `pairs` as one batch: chosen in the first n rows, rejected in the last
    /// n ([`halves`]), packed under `[dpo] padding_free`; and each token's weight in the
    /// summed log-probabilities, laid out as the loss mask: the mask itself, or under `[dpo]
    /// ld_alpha` (LD-DPO) `ld_alpha` on the response tokens past the length its pair's two
    /// responses share.
    fn batch<'p>(
        &self,
        pairs: impl Iterator<Item = &'p EncodedPair> + Clone,
    ) -> Result<(SeqBatch, Tensor)> {
        let seqs: Vec<_> = (0..2)
            .flat_map(|side| pairs.clone().map(move |p| p[side].clone()))
            .collect();
        let build = |seqs: &[Encoded]| {
            SeqBatch::new(
                seqs,
                self.tok.pad_id(),
                self.policy.cfg.max_position_embeddings,
                self.env.cfg.dpo.padding_free,
                &self.env.device,
            )
        };
        let b = build(&seqs)?;
        let Some(alpha) = self.env.cfg.dpo.ld_alpha else {
            let w = b.lm.loss_mask.clone();
            return Ok((b, w));
        };
        // The same sequences with only their tails marked: one layout, the same packing.
        let tails = ld_tails(&seqs);
        let tail = build(&tails)?.lm.loss_mask;
        let w = (&b.lm.loss_mask - (tail * (1.0 - alpha))?)?;
        Ok((b, w))
    }

    /// The reference's log-probabilities of every pair, `batch` pairs a forward; each rank
    /// scores its share of the batches and one all-reduce gathers them. Prints its progress.
    fn reference_logps(&self, pairs: &[EncodedPair], what: &str) -> Result<Vec<RefLogps>> {
        let reference = self
            .reference
            .as_ref()
            .expect("a loss that reads the reference loads one");
        let net = reference.get().net(&self.policy);
        let _untracked = crate::model::cast::Untracked::enter();
        let comm = self.env.comm.as_ref();
        let (rank, world) = (comm.rank(), comm.world());
        let batch = self.env.cfg.train.batch_size.max(1);
        let mut flat = vec![0f32; 2 * pairs.len()];
        // Rank 0 shows its own batches' progress (the others score theirs alongside).
        let progress = (rank == 0)
            .then(|| Progress::new("dpo", 0, pairs.len()).unit(&format!("{what} pairs")));
        let mut shown = std::time::Instant::now();
        for (k, chunk) in pairs.chunks(batch).enumerate() {
            if k % world != rank {
                continue;
            }
            let (b, w) = self.batch(chunk.iter())?;
            let logps = b.weighted_logps(net, self.env.ctx(false, None), &w)?;
            let logps: Vec<f32> = logps.to_dtype(DType::F32)?.to_vec1()?;
            let (n, first) = (chunk.len(), k * batch);
            for i in 0..n {
                flat[2 * (first + i)] = logps[i];
                flat[2 * (first + i) + 1] = logps[n + i];
            }
            if let Some(p) = progress
                .as_ref()
                .filter(|_| shown.elapsed().as_secs_f64() > 5.0)
            {
                p.update(first + n, "");
                shown = std::time::Instant::now();
            }
        }
        if world > 1 {
            flat = gather_exactly(comm, &flat)?;
        }
        if let Some(p) = progress {
            p.update(pairs.len(), "");
            p.finish();
        }
        Ok(flat.chunks(2).map(|c| [c[0], c[1]]).collect())
    }

    /// The loss of `pairs`, whose reference log-probabilities are `refs` where they were
    /// precomputed. In training, `comm` is the data-parallel group: RPO's NLL term is a mean
    /// over the global batch's chosen tokens, so each rank divides by the ranks' mean count.
    fn loss(
        &self,
        pairs: &[&EncodedPair],
        refs: Option<Vec<RefLogps>>,
        comm: Option<&dyn Communicator>,
    ) -> Result<BatchLoss> {
        let (b, w) = self.batch(pairs.iter().copied())?;
        let c = &self.env.cfg.dpo;
        // WPO's weight of each pair (TRL's `use_weighting`), from a forward run before the
        // training one, so that the two forwards' activations are never held at once. The
        // chosen NLL, a list's "sft" and `rpo_alpha`'s, is weighted by their mean, as TRL
        // weighs its per-pair copies of that one number (and weighed RPO's before it).
        let pair_weights = match c.use_weighting {
            true => Some(wpo_pair_weights(
                &b,
                &self.policy,
                self.env.ctx(true, None),
            )?),
            false => None,
        };
        // Under ld_alpha the preference reads the reweighted sums, and the chosen NLL (RPO's,
        // a list's "sft") the plain ones, as TRL's SFT term is plain cross-entropy: the same
        // forward gives both.
        let nll_weight = c.sft_weight() + c.rpo_alpha;
        let reweighted = c.ld_alpha.is_some_and(|a| a != 1.0);
        let (pol, plain) = match reweighted && nll_weight != 0.0 {
            true => {
                let mut both = b.weighted_logps_each(
                    &self.policy,
                    self.env.ctx(true, None),
                    &[&w, &b.lm.loss_mask],
                )?;
                let plain = both.pop().expect("two sums");
                (both.pop().expect("two sums"), Some(plain))
            }
            false => (
                b.weighted_logps(&self.policy, self.env.ctx(true, None), &w)?,
                None,
            ),
        };
        // Their mean, read while they are still f32.
        let wpo_weight = match &pair_weights {
            Some(w) => Some(f64::from(w.mean_all()?.to_scalar::<f32>()?)),
            None => None,
        };
        let pair_weights = pair_weights.map(|w| w.to_dtype(pol.dtype())).transpose()?;
        let refp = match (refs, &self.reference) {
            (Some(refs), _) => {
                let side = |s: usize| refs.iter().map(move |r| r[s]);
                let v: Vec<f32> = side(0).chain(side(1)).collect();
                Some(Tensor::from_vec(v, 2 * refs.len(), pol.device())?.to_dtype(pol.dtype())?)
            }
            (None, Some(r)) => {
                let net = r.get().net(&self.policy);
                let _untracked = crate::model::cast::Untracked::enter();
                Some(
                    b.weighted_logps(net, self.env.ctx(false, None), &w)?
                        .detach(),
                )
            }
            (None, None) => None,
        };
        let tokens = b.per_seq(&b.lm.loss_mask.to_dtype(pol.dtype())?)?;
        let (p, t) = (halves(&pol)?, halves(&tokens)?);
        let chosen_nll_logps = match &plain {
            Some(plain) => halves(plain)?.0,
            None => p.0.clone(),
        };
        let r = refp.as_ref().map(halves).transpose()?;
        let mut shift = self.shift.get();
        if let (true, Some(refp), Some(comm)) = (c.has(DpoLoss::BcoPair), &refp, comm) {
            // This batch's mean reward over every rank, counted before the loss reads the
            // shift, as TRL counts it.
            let rewards = ((&pol - refp)? * c.beta)?.detach();
            let mut mean = [rewards
                .to_dtype(DType::F32)?
                .mean_all()?
                .to_scalar::<f32>()?];
            comm.all_reduce_mean(&mut mean)?;
            shift.update(f64::from(mean[0]));
            self.shift.set(shift);
        }
        let (loss, acc) = shifted_preference_loss(
            c,
            (&p).into(),
            r.as_ref().map(Into::into),
            (&t).into(),
            shift.mean,
            pair_weights.as_ref(),
        )?;
        let mut chosen_tokens = [t.0.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?];
        if let Some(c) = comm {
            c.all_reduce_mean(&mut chosen_tokens)?;
        }
        let chosen_tokens = f64::from(chosen_tokens[0]);
        // The listed losses, "sft" among them, then RPO's NLL on top.
        let sft_weight = c.sft_weight() * wpo_weight.unwrap_or(1.0);
        let listed = with_chosen_nll(&loss, &chosen_nll_logps, chosen_tokens, sft_weight)?;
        let rpo_weight = c.rpo_alpha * wpo_weight.unwrap_or(1.0);
        let objective = with_chosen_nll(&listed, &chosen_nll_logps, chosen_tokens, rpo_weight)?;
        let sides = Sides::of(&p, r.as_ref(), c.beta)?;
        Ok(BatchLoss {
            objective,
            listed,
            sides,
            reward_accuracy: acc,
            tokens: b.lm.tokens,
            wpo_weight,
        })
    }
}

/// `[B]`: WPO's weight of each pair of a batch laid out as [`DpoTask::batch`] lays it
/// (chosen responses, then rejected): the product of its two responses' weights
/// ([`SeqBatch::wpo_weights`]), no gradient.
fn wpo_pair_weights(b: &SeqBatch, net: &Transformer, ctx: Ctx) -> Result<Tensor> {
    let (wc, wr) = halves(&b.wpo_weights(net, ctx)?)?;
    Ok((wc * wr)?)
}

/// A batch's mean summed log-probabilities of its chosen and rejected responses (`ld_alpha`'s
/// reweighted sums where it is set), and where a reference is read their implicit rewards
/// `beta * (policy - reference)` over those sums, for every loss (TRL's CPO trainer logs
/// SimPO's per-token means): what TRL logs as `logps/chosen`, `logps/rejected`,
/// `rewards/chosen`, `rewards/rejected` and `rewards/margins`, here in the names online DPO
/// and KTO log theirs by.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Sides {
    pub logps_chosen: f64,
    pub logps_rejected: f64,
    pub rewards: Option<(f64, f64)>,
}

impl Sides {
    /// One read from the device for all four means: the loss's own reads already wait for
    /// the forward, and each further read would wait again.
    fn of(
        policy: &(Tensor, Tensor),
        reference: Option<&(Tensor, Tensor)>,
        beta: f64,
    ) -> Result<Self> {
        let mean =
            |t: &Tensor| -> Result<Tensor> { Ok(t.detach().to_dtype(DType::F32)?.mean_all()?) };
        let mut means = vec![mean(&policy.0)?, mean(&policy.1)?];
        if let Some(r) = reference {
            means.push(mean(&(&policy.0 - &r.0)?)?);
            means.push(mean(&(&policy.1 - &r.1)?)?);
        }
        let v: Vec<f64> = Tensor::stack(&means, 0)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect();
        Ok(Self {
            logps_chosen: v[0],
            logps_rejected: v[1],
            rewards: (v.len() == 4).then(|| (beta * v[2], beta * v[3])),
        })
    }

    fn fields(&self) -> Vec<(&'static str, f64)> {
        let mut f = vec![
            ("logps_chosen", self.logps_chosen),
            ("logps_rejected", self.logps_rejected),
        ];
        if let Some((c, r)) = self.rewards {
            f.extend([
                ("reward_chosen", c),
                ("reward_rejected", r),
                ("reward_margin", c - r),
            ]);
        }
        f
    }

    /// `self` + `w` times `other`, for a mean over batches of different sizes.
    fn add_weighted(&mut self, other: &Sides, w: f64) {
        self.logps_chosen += w * other.logps_chosen;
        self.logps_rejected += w * other.logps_rejected;
        self.rewards = match (self.rewards, other.rewards) {
            (Some((a, b)), Some((c, d))) => Some((a + w * c, b + w * d)),
            (None, Some((c, d))) => Some((w * c, w * d)),
            (kept, None) => kept,
        };
    }

    fn scaled(&self, by: f64) -> Sides {
        Sides {
            logps_chosen: self.logps_chosen * by,
            logps_rejected: self.logps_rejected * by,
            rewards: self.rewards.map(|(c, r)| (c * by, r * by)),
        }
    }
}

/// What [`DpoTask::loss`] gives for a batch of pairs.
struct BatchLoss {
    /// What the step minimises: the listed losses and RPO's NLL.
    objective: Tensor,
    /// The listed losses alone ("sft" among them): the held-out loss.
    listed: Tensor,
    sides: Sides,
    reward_accuracy: f64,
    tokens: usize,
    /// WPO's mean pair weight, where `use_weighting` is on.
    wpo_weight: Option<f64>,
}

/// DPO's held-out numbers: the preference loss alone (for `sigmoid` and `robust`, log 2
/// where policy and reference agree), how often the implicit reward ranks the chosen response
/// first, and task accuracy where prompts have answers.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DpoEval {
    pub loss: f64,
    pub reward_accuracy: f64,
    pub accuracy: Option<f64>,
    #[serde(default)]
    pub sides: Sides,
}

impl Report for DpoEval {
    fn fields(&self) -> Vec<(&'static str, f64)> {
        let mut f = vec![
            ("loss", self.loss),
            ("reward_accuracy", self.reward_accuracy),
        ];
        f.extend(self.accuracy.map(|a| ("accuracy", a)));
        f.extend(self.sides.fields());
        f
    }
}

impl Task for DpoTask<'_> {
    type Eval = DpoEval;

    fn epoch_items(&self) -> Option<usize> {
        Some(self.sampler.len())
    }

    fn micro_batch(&mut self, _step: usize) -> Result<StepOut> {
        // Each rank takes its slice of the global batch; the loss is a mean over pairs, so
        // the ranks' average is the global batch's.
        let comm = self.env.comm.as_ref();
        let drawn =
            self.sampler
                .next_slice(self.env.cfg.train.batch_size, comm.rank(), comm.world());
        let pairs: Vec<_> = drawn.iter().map(|&i| &self.train[i]).collect();
        let refs = (self.train_ref.as_ref()).map(|r| drawn.iter().map(|&i| r[i]).collect());
        let b = self.loss(&pairs, refs, Some(comm))?;
        let mut metrics = vec![
            ("dpo_loss", scalar(&b.listed)?),
            ("reward_accuracy", b.reward_accuracy),
        ];
        metrics.extend(b.wpo_weight.map(|w| ("wpo_weight", w)));
        metrics.extend(b.sides.fields());
        Ok(StepOut {
            loss: b.objective,
            tokens: b.tokens,
            metrics,
        })
    }

    fn evaluate(&mut self) -> Result<DpoEval> {
        // `run` refuses an empty held-out set (before and after fitting it to the context),
        // so `n` is never 0 and the means below are never NaN.
        let (mut l, mut a, mut n) = (0.0, 0.0, 0.0);
        let mut sides = Sides::default();
        let batch = self.env.cfg.train.batch_size.max(1);
        for (k, c) in self.eval.chunks(batch).enumerate() {
            let refs = (self.eval_ref.as_ref()).map(|r| r[k * batch..k * batch + c.len()].to_vec());
            // The held-out loss is the listed losses' ("sft" among them), without RPO's term.
            let b = self.loss(&c.iter().collect::<Vec<_>>(), refs, None)?;
            l += scalar(&b.listed)? * c.len() as f64;
            a += b.reward_accuracy * c.len() as f64;
            sides.add_weighted(&b.sides, c.len() as f64);
            n += c.len() as f64;
        }
        Ok(DpoEval {
            loss: l / n,
            reward_accuracy: a / n,
            sides: sides.scaled(1.0 / n),
            accuracy: task_accuracy(
                &self.policy,
                self.env.ctx(true, None),
                &self.tok,
                &self.eval_prompts,
                self.env.cfg.dpo.eval_max_new_tokens,
            )?,
        })
    }

    fn state(&self) -> serde_json::Value {
        let mut s = self.sampler.state();
        let shift = self.shift.get();
        s["bco_shift"] = serde_json::json!({"mean": shift.mean, "count": shift.count});
        s
    }

    fn after_step(&mut self, done: usize) -> Result<()> {
        self.moving
            .after_step(self.reference_store(), self.store, done)
    }

    fn write_files(&self, dir: &Path) -> Result<()> {
        self.moving.write(self.reference_store(), dir)
    }

    fn read_files(&mut self, dir: &Path) -> Result<()> {
        self.moving.read(self.reference_store(), dir)
    }

    fn restore(&mut self, s: &serde_json::Value) -> Result<()> {
        let read = |k: &str| s["bco_shift"][k].as_f64().unwrap_or(0.0);
        self.shift.set(RewardShift {
            mean: read("mean"),
            count: read("count"),
        });
        self.sampler.restore(s)
    }
}

/// DPO's outcome against the SFT model it started from. None where a number was not
/// measured: task accuracy without held-out prompts (a user's pairs) or with one that has
/// no answer, a start a resumed run's checkpoint did not keep, anything where no held-out
/// evaluation ran.
pub struct DpoResult {
    pub accuracy: Option<f64>,
    pub start_accuracy: Option<f64>,
    pub reward_accuracy: Option<f64>,
    pub start_reward_accuracy: Option<f64>,
}

impl DpoResult {
    pub fn describe(&self) -> String {
        use super::eval::{from_start, measured, NOT_EVALUATED, NO_TASK_ACCURACY};
        let Some(reward_accuracy) = self.reward_accuracy else {
            return format!("dpo: {NOT_EVALUATED}");
        };
        format!(
            "dpo: {}, implicit-reward accuracy {reward_accuracy:.3}{}",
            measured(
                "accuracy",
                self.accuracy,
                self.start_accuracy,
                NO_TASK_ACCURACY
            ),
            from_start(self.start_reward_accuracy)
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
            let reader = ColumnReader::new(&env.cfg.data.columns);
            let read = |f: &Path| reader.read(f);
            let load = |f: &Path| preferences_from(f, read(f)?, template.as_ref());
            let (train, eval) = split_holdout(env, p, load, "preference pairs")?;
            reader.check(p)?;
            setup::warn_template_unread(env, template.as_ref(), Some(p));
            (train, eval, vec![])
        }
    })
}

pub fn run(env: &Env) -> Result<DpoResult> {
    let cfg = &env.cfg;
    let lora = setup::lora(cfg);
    let needs_reference = cfg.dpo.needs_reference();
    let (store, policy, reference, tok) = PolicyPair::load_with(env, needs_reference)?.into_parts();
    let moving = match cfg.dpo.sync_ref_model {
        true => format!(
            ", moved {} of the way to the policy every {} steps (TR-DPO)",
            cfg.dpo.ref_model_mixup_alpha, cfg.dpo.ref_model_sync_steps
        ),
        false => String::new(),
    };
    // TRL's default adds no NLL term; one who comes from it should see that this one does.
    let a = cfg.dpo.rpo_alpha;
    let rpo = match a > 0.0 {
        true => format!(
            " + {a} x the chosen responses' NLL ([dpo] rpo_alpha, RPO; TRL's default is 0, plain \
             DPO)"
        ),
        false => String::new(),
    };
    warnln!(
        "[dpo] loss {}{rpo}, reference: {}{moving}",
        cfg.dpo.loss_names(),
        reference
            .as_ref()
            .map_or("none (the loss reads none)", FrozenReference::describe)
    );
    let (train, eval, eval_prompts) = datasets(env)?;
    if train.is_empty() || eval.is_empty() {
        bail!("dpo needs non-empty training and held-out preference sets");
    }
    // Encoded once, up front, so that a pair too long for the context fails before training.
    let ctx = policy.cfg.max_position_embeddings;
    let (train, eval) = (
        encode_pairs(env, &tok, &train, ctx, "training")?,
        encode_pairs(env, &tok, &eval, ctx, "held-out")?,
    );
    if train.is_empty() || eval.is_empty() {
        bail!("dpo: no training or no held-out pair is left once fitted to the model's context and pairs of two equal sides are left out (the lines above say which were left out, and why)");
    }
    let model = policy.cfg.clone();
    let mut task = DpoTask {
        env,
        policy,
        reference,
        tok: tok.clone(),
        sampler: WindowSampler::new(train.len(), cfg.train.seed),
        train,
        eval,
        train_ref: None,
        eval_ref: None,
        eval_prompts,
        shift: Default::default(),
        moving: MovingReference {
            sync: cfg.dpo.sync_ref_model.then_some(RefSync {
                alpha: cfg.dpo.ref_model_mixup_alpha,
                every: cfg.dpo.ref_model_sync_steps,
            }),
            stage: "dpo",
            reports: env.comm.rank() == 0,
        },
        store: &store,
    };
    if cfg.dpo.precompute_ref_log_probs && task.reference.is_some() {
        // Recomputed on resume too: the reference is the --init model, which does not change.
        task.train_ref = Some(task.reference_logps(&task.train, "training")?);
        task.eval_ref = Some(task.reference_logps(&task.eval, "held-out")?);
        task.reference = None;
        if env.comm.rank() == 0 {
            errln!(
                "[dpo] reference log-probabilities precomputed for {} training and {} held-out pairs; the reference is dropped",
                task.train.len(),
                task.eval.len()
            );
        }
    }
    let trainable = |p: ParamInfo| lora.is_none() || p.role == Role::Adapter;
    let summary = setup::train(
        env,
        &mut task,
        &store,
        Plan::policy(&model, lora, &tok),
        &trainable,
    )?;
    let (first, last) = (summary.first_eval.as_ref(), summary.last_eval.as_ref());
    let acc = |e: Option<&DpoEval>| e.and_then(|e| e.accuracy);
    let racc = |e: Option<&DpoEval>| e.map(|e| e.reward_accuracy);
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

    /// A `[B]` tensor.
    fn v(x: &[f64]) -> Tensor {
        let x: Vec<f32> = x.iter().map(|&a| a as f32).collect();
        Tensor::new(x, &Device::Cpu).unwrap()
    }

    fn cfg(loss_type: DpoLoss, beta: f64, label_smoothing: f64) -> DpoConfig {
        DpoConfig {
            loss_type: vec![loss_type],
            beta,
            label_smoothing,
            ..DpoConfig::default()
        }
    }

    /// The loss of one batch given as plain numbers: policy, reference, tokens, each
    /// (chosen, rejected).
    fn loss_of(c: &DpoConfig, p: [&[f64]; 2], r: [&[f64]; 2], n: [&[f64]; 2]) -> (f64, f64) {
        let (pc, pr, rc, rr, nc, nr) = (v(p[0]), v(p[1]), v(r[0]), v(r[1]), v(n[0]), v(n[1]));
        let side = |chosen, rejected| Pairwise { chosen, rejected };
        let reference = c.needs_reference().then(|| side(&rc, &rr));
        let (loss, acc) = preference_loss(c, side(&pc, &pr), reference, side(&nc, &nr)).unwrap();
        (s(&loss), acc)
    }

    #[test]
    fn each_preference_loss_starts_where_policy_equals_reference() {
        let (lp, lr, n) = ([-3.0, -1.5, -7.0], [-2.0, -4.0, -0.5], [3.0, 2.0, 5.0]);
        let at_start = |kind, e| loss_of(&cfg(kind, 0.1, e), [&lp, &lr], [&lp, &lr], [&n, &n]).0;
        let ln2 = 2f64.ln();
        assert!((at_start(DpoLoss::Sigmoid, 0.0) - ln2).abs() < 1e-6);
        assert!((at_start(DpoLoss::Sigmoid, 0.2) - ln2).abs() < 1e-6);
        assert!((at_start(DpoLoss::Robust, 0.2) - ln2).abs() < 1e-6);
        assert!((at_start(DpoLoss::Hinge, 0.0) - 1.0).abs() < 1e-6);
        // IPO's target margin is 1 / (2 beta) = 5.
        assert!((at_start(DpoLoss::Ipo, 0.0) - 25.0).abs() < 1e-4);
    }

    /// The accuracy is the summed log-ratios' ranking for every loss that reads a reference
    /// (TRL's `rewards/accuracies`), though IPO and `sigmoid_norm` train on per-token margins:
    /// a chosen response four times the rejected's length whose summed log-ratio leads by 1
    /// trails per token.
    #[test]
    fn reward_accuracy_ranks_by_the_summed_log_ratios() {
        let (pc, pr, rc, rr) = ([-10.0], [-4.0], [-12.0], [-7.0]);
        let (nc, nr) = ([20.0], [5.0]);
        // Summed: 2 against 3, the rejected ahead; per token 0.1 against 0.6, likewise.
        for kind in [DpoLoss::Sigmoid, DpoLoss::Ipo, DpoLoss::SigmoidNorm] {
            let acc = loss_of(&cfg(kind, 0.1, 0.0), [&pc, &pr], [&rc, &rr], [&nc, &nr]).1;
            assert_eq!(acc, 0.0, "{kind:?}");
        }
        // Summed: 4 against 3, the chosen ahead; per token 0.2 against 0.6, behind.
        let rc = [-14.0];
        for kind in [DpoLoss::Sigmoid, DpoLoss::Ipo, DpoLoss::SigmoidNorm] {
            let acc = loss_of(&cfg(kind, 0.1, 0.0), [&pc, &pr], [&rc, &rr], [&nc, &nr]).1;
            assert_eq!(acc, 1.0, "{kind:?}");
        }
    }

    /// LD-DPO marks, in each response, the loss-masked tokens past the count its pair shares:
    /// the longer response's last ones, none of the shorter's, wherever the prompt ends.
    #[test]
    fn ld_tails_are_the_tokens_past_the_shared_length() {
        let seq = |mask: &[u8]| -> Encoded {
            (vec![7; mask.len()], mask.iter().map(|&m| m == 1).collect())
        };
        // Two pairs: chosen 3 and 5 tokens, rejected 5 and 2.
        let seqs = [
            seq(&[0, 0, 1, 1, 1, 0]),
            seq(&[0, 1, 1, 1, 1, 1]),
            seq(&[0, 1, 1, 1, 1, 1, 0]),
            seq(&[0, 0, 0, 1, 1]),
        ];
        let tails: Vec<Vec<bool>> = ld_tails(&seqs).into_iter().map(|t| t.1).collect();
        let marks = |m: &[u8]| m.iter().map(|&x| x == 1).collect::<Vec<_>>();
        assert_eq!(tails[0], marks(&[0, 0, 0, 0, 0, 0]));
        assert_eq!(tails[1], marks(&[0, 0, 0, 1, 1, 1]));
        assert_eq!(tails[2], marks(&[0, 0, 0, 0, 1, 1, 0]));
        assert_eq!(tails[3], marks(&[0, 0, 0, 0, 0]));
    }

    /// Three pairs: policy chosen and rejected, reference chosen and rejected (summed
    /// log-probabilities), tokens per response; margins of either sign.
    const MIXED: [[f64; 3]; 5] = [
        [-3.0, -1.5, -7.0],
        [-2.0, -4.0, -0.5],
        [-2.5, -2.0, -6.0],
        [-2.5, -3.0, -1.0],
        [3.0, 2.0, 5.0],
    ];

    /// A list of losses is the sum of each one's mean times its weight; "sft" is left to the
    /// NLL term; the accuracy is the first listed loss's.
    #[test]
    fn a_list_of_losses_is_their_weighted_sum() {
        let [lp, lr, rp, rr, n] = MIXED;
        let one = |kind| loss_of(&cfg(kind, 0.1, 0.0), [&lp, &lr], [&rp, &rr], [&n, &n]);
        let mix = DpoConfig {
            loss_type: vec![
                DpoLoss::Sigmoid,
                DpoLoss::BcoPair,
                DpoLoss::Sft,
                DpoLoss::Ipo,
            ],
            loss_weights: Some(vec![0.8, 0.2, 1.0, 0.5]),
            ..cfg(DpoLoss::Sigmoid, 0.1, 0.0)
        };
        let (got, acc) = loss_of(&mix, [&lp, &lr], [&rp, &rr], [&n, &n]);
        let want = 0.8 * one(DpoLoss::Sigmoid).0
            + 0.2 * one(DpoLoss::BcoPair).0
            + 0.5 * one(DpoLoss::Ipo).0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        assert_eq!(acc, one(DpoLoss::Sigmoid).1);
        let sft = DpoConfig {
            loss_type: vec![DpoLoss::Sft],
            ..cfg(DpoLoss::Sigmoid, 0.1, 0.0)
        };
        let (zero, acc) = loss_of(&sft, [&lp, &lr], [&rp, &rr], [&n, &n]);
        assert_eq!(zero, 0.0);
        // The policy alone ranks the chosen response first in the second pair only.
        assert!((acc - 1.0 / 3.0).abs() < 1e-9, "{acc}");
    }

    #[test]
    fn preference_losses_match_hand_computed_values() {
        // One pair: the policy puts 1 nat more on the chosen response than the reference
        // (summed), over 2 chosen and 4 rejected tokens; beta 0.5 makes z = 0.5.
        let (p, r, n) = (
            [&[0.0][..], &[0.0]],
            [&[-1.0][..], &[0.0]],
            [&[2.0][..], &[4.0]],
        );
        let sp = |x: f64| (1.0 + x.exp()).ln(); // -log sigmoid(-x)
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let cases = [
            (DpoLoss::Sigmoid, 0.0, sp(-0.5)),
            (DpoLoss::Sigmoid, 0.1, 0.9 * sp(-0.5) + 0.1 * sp(0.5)),
            (DpoLoss::Robust, 0.1, (0.9 * sp(-0.5) - 0.1 * sp(0.5)) / 0.8),
            (DpoLoss::Hinge, 0.0, 0.5),
            // Per token: h = (0 - -1/2) - (0 - 0) = 0.5 against the target 1 / (2 * 0.5) = 1.
            (DpoLoss::Ipo, 0.0, 0.25),
            // The log-ratios are c = 1 and r = 0, so beta c = 0.5 and beta r = 0.
            (
                DpoLoss::ExoPair,
                0.0,
                sig(0.5) * (-sp(-0.5) - 0.999f64.ln()) + sig(-0.5) * (-sp(0.5) - 1e-3f64.ln()),
            ),
            (
                DpoLoss::ExoPair,
                0.1,
                sig(0.5) * (-sp(-0.5) - 0.9f64.ln()) + sig(-0.5) * (-sp(0.5) - 0.1f64.ln()),
            ),
            (
                DpoLoss::NcaPair,
                0.0,
                sp(-0.5) + 0.5 * sp(0.5) + 0.5 * 2f64.ln(),
            ),
            // Targets 1 / (2 beta) = 1 for c and -1 for r.
            (DpoLoss::SppoHard, 0.0, 0.0 + 1.0),
            (DpoLoss::ApoZero, 0.0, 1.0 - sig(0.5) + 0.5),
            (DpoLoss::ApoDown, 0.0, sig(0.5) + 1.0 - sig(0.5)),
            // tau 0.05: the blend is sigmoid(0.5 / 0.05).
            (
                DpoLoss::Discopop,
                0.0,
                sp(-0.5) * (1.0 - sig(10.0)) + (-0.5f64).exp() * sig(10.0),
            ),
            // No shift yet: -log s(0.5) - log s(-0).
            (DpoLoss::BcoPair, 0.0, sp(-0.5) + 2f64.ln()),
        ];
        for (kind, e, want) in cases {
            let (got, acc) = loss_of(&cfg(kind, 0.5, e), p, r, n);
            assert!((got - want).abs() < 1e-6, "{kind:?} e={e}: {got} vs {want}");
            assert_eq!(acc, 1.0, "{kind:?}");
        }
        // BCO shifted by 0.25: -log s(0.5 - 0.25) - log s(-(0 - 0.25)).
        let side = |a: &[f64], b: &[f64]| (v(a), v(b));
        let (pol, rf, toks) = (side(p[0], p[1]), side(r[0], r[1]), side(n[0], n[1]));
        let (got, _) = shifted_preference_loss(
            &cfg(DpoLoss::BcoPair, 0.5, 0.0),
            (&pol).into(),
            Some((&rf).into()),
            (&toks).into(),
            0.25,
            None,
        )
        .unwrap();
        assert!(
            (s(&got) - 2.0 * sp(-0.25)).abs() < 1e-6,
            "bco_pair: {}",
            s(&got)
        );
        // WPO's pair weights scale each pair's loss before the mean: two pairs, margins 0.5
        // and -0.5 (sigmoid, beta 1), weighted 0.3 and 2.
        let two = |a: [f64; 2], b: [f64; 2]| (v(&a), v(&b));
        let (pol, rf, toks) = (
            two([-1.0, -2.0], [-2.0, -1.0]),
            two([-1.5, -1.5], [-2.0, -1.0]),
            two([2.0, 2.0], [2.0, 2.0]),
        );
        let weights = v(&[0.3, 2.0]);
        let (got, _) = shifted_preference_loss(
            &cfg(DpoLoss::Sigmoid, 1.0, 0.0),
            (&pol).into(),
            Some((&rf).into()),
            (&toks).into(),
            0.0,
            Some(&weights),
        )
        .unwrap();
        let want = (0.3 * sp(-0.5) + 2.0 * sp(0.5)) / 2.0;
        assert!(
            (s(&got) - want).abs() < 1e-6,
            "weighted: {} vs {want}",
            s(&got)
        );
        // SimPO reads no reference: per-token -1/2 against -4/4 gives h = 0.5, and with
        // gamma 0.5, -log sigmoid(0.5 * 0.5 - 0.5).
        let simpo = cfg(DpoLoss::Simpo, 0.5, 0.0);
        let (got, acc) = loss_of(&simpo, [&[-1.0], &[-4.0]], r, n);
        assert!((got - sp(0.25)).abs() < 1e-6, "simpo: {got}");
        assert_eq!(acc, 1.0);
        let (_, acc) = loss_of(&simpo, [&[-4.0], &[-1.0]], r, [&[4.0], &[2.0]]);
        assert_eq!(acc, 0.0);
        // ORPO: per token p_c = 0.5 (odds 1) and p_r = 0.2 (odds 1/4), so the log odds
        // ratio is ln 4, and beta 0.5 gives 0.5 * -log sigmoid(ln 4) = 0.5 ln(5/4).
        let orpo = cfg(DpoLoss::Orpo, 0.5, 0.0);
        let (lc, lr) = (2.0 * 0.5f64.ln(), 4.0 * 0.2f64.ln());
        let (got, acc) = loss_of(&orpo, [&[lc], &[lr]], r, n);
        assert!((got - 0.5 * 1.25f64.ln()).abs() < 1e-5, "orpo: {got}");
        assert_eq!(acc, 1.0);
    }

    /// Where policy and reference agree, every loss but two raises the chosen response.
    /// APO-down lowers both responses, the rejected one more (its chosen gradient there is
    /// 0); DiscoPOP's blend, rising from 1/2 to 1 as z passes 0, makes it climb from ln 2
    /// towards exp(-z) = 1 at first: near h = 0 it pushes h down, to a shallow minimum at a
    /// small negative margin, and only a margin past its bump is carried up.
    #[test]
    fn every_preference_loss_pushes_the_chosen_response_up_at_the_start() {
        for kind in [
            DpoLoss::Sigmoid,
            DpoLoss::Robust,
            DpoLoss::Hinge,
            DpoLoss::Ipo,
            DpoLoss::Simpo,
            DpoLoss::Orpo,
            DpoLoss::ExoPair,
            DpoLoss::NcaPair,
            DpoLoss::SppoHard,
            DpoLoss::ApoZero,
            DpoLoss::BcoPair,
            DpoLoss::SigmoidNorm,
            DpoLoss::Aot,
            DpoLoss::AotUnpaired,
        ] {
            for f in [
                FDivergence::ReverseKl,
                FDivergence::ForwardKl,
                FDivergence::JsDivergence,
                FDivergence::AlphaDivergence,
            ] {
                if f != FDivergence::ReverseKl && !kind.needs_reference() {
                    continue;
                }
                let c = DpoConfig {
                    f_divergence_type: f,
                    ..cfg(kind, 0.1, 0.0)
                };
                let pc = candle_core::Var::new(&[-3.0f32, -2.0], &Device::Cpu).unwrap();
                let pr = v(&[-3.0, -2.0]);
                let n = v(&[3.0, 2.0]);
                let side = |chosen, rejected| Pairwise { chosen, rejected };
                let rc = v(&[-3.0, -2.0]);
                let reference = kind.needs_reference().then(|| side(&rc, &pr));
                let (loss, _) =
                    preference_loss(&c, side(pc.as_tensor(), &pr), reference, side(&n, &n))
                        .unwrap();
                let g = loss.backward().unwrap();
                let d = g.get(pc.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
                assert!(d.iter().all(|&x| x < 0.0), "{kind:?} {f:?}: {d:?}");
            }
        }
    }

    /// TRL's f-divergences, sigmoid_norm and AOT against their formulas, on one batch.
    #[test]
    fn f_divergences_sigmoid_norm_and_aot_match_their_formulas() {
        let [lp, lr, rp, rr, n] = MIXED;
        let beta = 0.5;
        let sp = |x: f64| (1.0 + x.exp()).ln(); // -log sigmoid(-x)
        let ls = move |x: f64| -sp(-x); // log sigmoid(x)
        let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
        let cr: Vec<f64> = (0..3).map(|i| lp[i] - rp[i]).collect();
        let rj: Vec<f64> = (0..3).map(|i| lr[i] - rr[i]).collect();
        let run = |kind, f, a: f64, e: f64| {
            let c = DpoConfig {
                f_divergence_type: f,
                f_alpha_divergence_coef: a,
                ..cfg(kind, beta, e)
            };
            loss_of(&c, [&lp, &lr], [&rp, &rr], [&n, &n]).0
        };
        let sigmoid_with = |f: &dyn Fn(f64) -> f64| {
            mean((0..3).map(|i| sp(-beta * (f(cr[i]) - f(rj[i])))).collect())
        };
        let a = 0.3;
        type Score = Box<dyn Fn(f64) -> f64>;
        let cases: [(FDivergence, f64, Score); 4] = [
            (FDivergence::ReverseKl, a, Box::new(|u| u)),
            (FDivergence::ForwardKl, a, Box::new(|u: f64| -(-u).exp())),
            (FDivergence::JsDivergence, a, Box::new(ls)),
            (
                FDivergence::AlphaDivergence,
                a,
                Box::new(move |u: f64| ((a - 1.0) * u).exp() / (a - 1.0)),
            ),
        ];
        for (f, a, fun) in &cases {
            let (got, want) = (run(DpoLoss::Sigmoid, *f, *a, 0.0), sigmoid_with(fun));
            assert!((got - want).abs() < 1e-5, "{f:?}: {got} vs {want}");
        }
        // sigmoid_norm: the log-ratios averaged per token.
        let want = mean((0..3).map(|i| sp(-beta * (cr[i] - rj[i]) / n[i])).collect());
        let got = run(DpoLoss::SigmoidNorm, FDivergence::ReverseKl, 0.5, 0.0);
        assert!((got - want).abs() < 1e-5, "sigmoid_norm: {got} vs {want}");
        // AOT: sorted margins (paired) or sorted log-ratios (unpaired), smoothed by e.
        let e = 0.1;
        let sort = |mut v: Vec<f64>| {
            v.sort_by(|x, y| x.partial_cmp(y).unwrap());
            v
        };
        let smoothed = |d: Vec<f64>| {
            mean(
                d.iter()
                    .map(|&x| (1.0 - e) * sp(-beta * x) + e * sp(beta * x))
                    .collect(),
            )
        };
        let pm = sort((0..3).map(|i| lp[i] - lr[i]).collect());
        let rm = sort((0..3).map(|i| rp[i] - rr[i]).collect());
        let want = smoothed((0..3).map(|i| pm[i] - rm[i]).collect());
        let got = run(DpoLoss::Aot, FDivergence::ReverseKl, 0.5, e);
        assert!((got - want).abs() < 1e-5, "aot: {got} vs {want}");
        let (sc, sr) = (sort(cr.clone()), sort(rj.clone()));
        let want = smoothed((0..3).map(|i| sc[i] - sr[i]).collect());
        let got = run(DpoLoss::AotUnpaired, FDivergence::ReverseKl, 0.5, e);
        assert!((got - want).abs() < 1e-5, "aot_unpaired: {got} vs {want}");
    }

    /// Precomputed scores reach every rank bit for bit, on three ranks too, where a mean of
    /// f32s times three would move about one value in eight by an ulp.
    #[test]
    fn scores_are_gathered_exactly_on_any_number_of_ranks() {
        use crate::dist::threads::ThreadGroup;
        let want: Vec<f32> = (0..3000).map(|i| -5.0 - (i as f32) * 0.131_7).collect();
        let group = ThreadGroup::new(3);
        let naive_moved = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .iter()
                .map(|c| {
                    let want = &want;
                    s.spawn(move || {
                        let mine: Vec<f32> = (want.iter().enumerate())
                            .map(|(i, &x)| if i % 3 == c.rank() { x } else { 0.0 })
                            .collect();
                        assert_eq!(&gather_exactly(c, &mine).unwrap(), want);
                        let mut naive = mine.clone();
                        c.all_reduce_mean(&mut naive).unwrap();
                        naive
                            .iter()
                            .zip(want)
                            .filter(|(a, b)| **a * 3.0 != **b)
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).max()
        });
        assert!(
            naive_moved.unwrap() > 0,
            "the naive gather would have been exact here"
        );
    }

    /// A checkpoint's state keeps f64s bit for bit (serde_json's `float_roundtrip`), so a
    /// resumed run reads the shift it wrote.
    #[test]
    fn state_floats_survive_a_checkpoint_bit_for_bit() {
        let mut x = 0.123_456_789_f64;
        for _ in 0..20_000 {
            x = (x * 7.919 + 0.317).fract() * 3.0 - 1.5;
            let text = serde_json::json!({"mean": x}).to_string();
            let back: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(
                back["mean"].as_f64().unwrap().to_bits(),
                x.to_bits(),
                "{text}"
            );
        }
    }

    /// BCO's shift is the running mean of the batches' mean rewards, each batch counted once.
    #[test]
    fn the_reward_shift_is_the_mean_of_the_batch_means() {
        let mut shift = RewardShift::default();
        for x in [1.0, 2.0, 6.0] {
            shift.update(x);
        }
        assert!(
            (shift.mean - 3.0).abs() < 1e-12 && shift.count == 3.0,
            "{shift:?}"
        );
    }

    /// DiscoPOP stays finite where its exponential alone would overflow: a margin far below
    /// zero, where the blend is exactly 0 and the loss is the logistic one.
    /// A pair's WPO weight is its own chosen response's weight times its own rejected one's,
    /// in a batch laid out chosen first (pair i: sequences i and n + i).
    #[test]
    fn wpo_pairs_each_chosen_response_with_its_own_rejected_one() {
        let (_store, net) = crate::model::test_model("tiny", 3);
        let seq =
            |ids: &[u32]| -> Encoded { (ids.to_vec(), (0..ids.len()).map(|j| j >= 2).collect()) };
        let seqs = [
            seq(&[1, 2, 3, 4]),
            seq(&[5, 6, 7, 8, 9, 10]),
            seq(&[1, 2, 11, 12, 13]),
            seq(&[5, 6, 14]),
        ];
        let b = SeqBatch::new(&seqs, 0, 16, false, &candle_core::Device::Cpu).unwrap();
        let ctx = Ctx::plain(DType::F32);
        let w = b.wpo_weights(&net, ctx).unwrap().to_vec1::<f32>().unwrap();
        let got = wpo_pair_weights(&b, &net, ctx)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got, [w[0] * w[2], w[1] * w[3]]);
        assert!(w.iter().all(|&x| x > 0.0 && x.is_finite()), "{w:?}");
        assert!(
            w.windows(2).any(|p| (p[0] - p[1]).abs() > 1e-4 * p[0]),
            "{w:?}"
        );
    }

    #[test]
    fn discopop_is_finite_at_an_extreme_margin() {
        let c = cfg(DpoLoss::Discopop, 1.0, 0.0);
        let (got, _) = loss_of(&c, [&[-200.0], &[0.0]], [&[0.0], &[0.0]], [&[4.0], &[4.0]]);
        assert!((got - 200.0).abs() < 1e-3, "{got}");
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
