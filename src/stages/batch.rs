//! Records to token tensors: SFT examples with their loss masks, right-padded training
//! batches, packed training rows and left-padded prompt batches for generation.

use std::collections::BTreeSet;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use crate::data::records::{Segment, SftExample};
use crate::data::tokenizer::Tokenizer;
use crate::kernels::segments::Segments;

/// A sequence's token ids and, per token, whether it carries loss.
pub type Encoded = (Vec<u32>, Vec<bool>);

/// Tokens of an example and, per token, whether it carries loss. Plain text opens with the
/// tokenizer's opening special tokens ([`Tokenizer::encode_start`]) and each trained segment
/// is followed by EOS, trained too, so the model learns to stop (unless the segment ends with
/// one already, as TRL adds it); a Jinja-rendered example is as the template wrote it. An
/// example that trains all its tokens ([`SftExample::train_all`]) marks every one.
///
/// The text between two EOS that temper adds (for a rendered example, all of it) is
/// tokenised once, as transformers tokenises a rendered conversation: a SentencePiece
/// tokenizer (Llama 2's prepended `▁`, Mistral's `Metaspace`) splits text differently at the
/// start of an encoding, so segments encoded one by one would get ids the model never saw.
/// See `encode_run` for which of those tokens carry loss.
pub fn encode_example(tok: &Tokenizer, ex: &SftExample) -> Result<Encoded> {
    let mut ids = Vec::new();
    let mut train = Vec::new();
    let mut from = 0;
    for (i, seg) in ex.segments.iter().enumerate() {
        let ends_turn = seg.train && ex.append_eos;
        if !ends_turn && i + 1 < ex.segments.len() {
            continue;
        }
        let (t, m) = encode_run(tok, &ex.segments[from..=i], ex.train_all)?;
        if from == 0 && ex.append_eos {
            let opening = tok.opening_before(&t);
            let first = ex.segments[0].train || ex.train_all;
            ids.extend_from_slice(opening);
            train.extend(std::iter::repeat_n(first, opening.len()));
        }
        let ends_with_eos = t.last() == Some(&tok.eos_id());
        ids.extend(t);
        train.extend(m);
        if ends_turn && !ends_with_eos {
            ids.push(tok.eos_id());
            train.push(true);
        }
        from = i + 1;
    }
    Ok((ids, train))
}

/// The segments' text tokenised as one, each token trained where any of its bytes lies in a
/// trained segment (or, for `all`, every token). A token that straddles a boundary goes with
/// the trained side because transformers' assistant mask does the same (it marks from the
/// token holding a block's first character to the one holding its last), and because the
/// other choice would leave untrained the answer's first word where the tokenizer joins it to
/// the space before (`▁Sure` after `[/INST] `). A token covering no text goes with the
/// segment where it stands.
fn encode_run(tok: &Tokenizer, segments: &[Segment], all: bool) -> Result<Encoded> {
    let text: String = segments.iter().map(|s| s.text.as_str()).collect();
    let mut spans = Vec::with_capacity(segments.len());
    let mut at = 0;
    for s in segments {
        spans.push((at..at + s.text.len(), s.train));
        at += s.text.len();
    }
    let toks = tok.encode_offsets(&text)?;
    let trained = |r: &std::ops::Range<usize>| {
        if r.is_empty() {
            let holder = spans.iter().find(|(s, _)| s.contains(&r.start));
            return holder.or(spans.last()).is_some_and(|(_, t)| *t);
        }
        spans
            .iter()
            .any(|(s, t)| *t && s.start < r.end && r.start < s.end)
    };
    Ok(toks.iter().map(|(id, r)| (*id, all || trained(r))).unzip())
}

/// A right-padded batch for teacher forcing: inputs `[B, T]`, targets `[B, T]` (the inputs
/// shifted by one), the loss mask `[B, T]` f32 and the key mask `[B, T]` f32.
pub struct LmBatch {
    pub inputs: Tensor,
    pub targets: Tensor,
    pub loss_mask: Tensor,
    pub key_valid: Tensor,
    pub tokens: usize,
    /// Index of the last real input position of each row.
    pub last: Vec<u32>,
}

pub fn lm_batch(seqs: &[Encoded], pad: u32, max_len: usize, dev: &Device) -> Result<LmBatch> {
    let t = seqs
        .iter()
        .map(|(s, _)| s.len().saturating_sub(1))
        .max()
        .unwrap_or(0);
    if t == 0 {
        bail!("a batch with no sequence of two or more tokens");
    }
    if t > max_len {
        bail!(
            "a sequence of {} tokens exceeds the context length {max_len}",
            t + 1
        );
    }
    let b = seqs.len();
    let mut inp = vec![pad; b * t];
    let mut tgt = vec![pad; b * t];
    let mut lm = vec![0f32; b * t];
    let mut kv = vec![0f32; b * t];
    let mut last = Vec::with_capacity(b);
    let mut tokens = 0;
    for (i, (ids, train)) in seqs.iter().enumerate() {
        let n = ids.len().saturating_sub(1);
        for j in 0..n {
            inp[i * t + j] = ids[j];
            tgt[i * t + j] = ids[j + 1];
            lm[i * t + j] = if train[j + 1] { 1.0 } else { 0.0 };
            kv[i * t + j] = 1.0;
        }
        tokens += n;
        last.push(n.saturating_sub(1) as u32);
    }
    Ok(LmBatch {
        inputs: Tensor::from_vec(inp, (b, t), dev)?,
        targets: Tensor::from_vec(tgt, (b, t), dev)?,
        loss_mask: Tensor::from_vec(lm, (b, t), dev)?,
        key_valid: Tensor::from_vec(kv, (b, t), dev)?,
        tokens,
        last,
    })
}

/// Items of the given sizes into as few bins of `capacity` as best-fit decreasing finds: the
/// largest first, each into the open bin with the least room that still holds it, else into
/// a new bin. Returns each bin's item indices, largest first. Ties (equal sizes, equal room)
/// go to the lower index, so the same sizes always give the same bins: a resumed run's
/// sampler position then names the rows it named before.
pub fn best_fit_decreasing(sizes: &[usize], capacity: usize) -> Result<Vec<Vec<usize>>> {
    if let Some((i, &n)) = sizes.iter().enumerate().find(|(_, &n)| n > capacity) {
        bail!("item {i} of size {n} does not fit a bin of {capacity}");
    }
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    // (room left, bin): the first entry at or above a size is the tightest bin that fits.
    let mut open: BTreeSet<(usize, usize)> = BTreeSet::new();
    for i in order {
        let n = sizes[i];
        let (room, b) = match open.range((n, 0)..).next().copied() {
            Some(e) => {
                open.remove(&e);
                e
            }
            None => {
                bins.push(Vec::new());
                (capacity, bins.len() - 1)
            }
        };
        bins[b].push(i);
        open.insert((room - n, b));
    }
    Ok(bins)
}

/// Items of the given sizes in rows of at most `capacity` positions ([`best_fit_decreasing`]),
/// every row cut to the fullest one's `len`: `(bins, len)`, or None where the rows would not
/// hold fewer positions than `padded`, the padded layout's.
pub fn fit_rows(
    sizes: &[usize],
    capacity: usize,
    padded: usize,
) -> Result<Option<(Vec<Vec<usize>>, usize)>> {
    let bins = best_fit_decreasing(sizes, capacity)?;
    let fill = |b: &Vec<usize>| b.iter().map(|&i| sizes[i]).sum::<usize>();
    let len = bins.iter().map(fill).max().unwrap_or(0);
    Ok((bins.len() * len < padded).then_some((bins, len)))
}

/// Packed rows as the model reads them: the batch and the examples' boundaries (with their
/// positions, which restart at 0 at each example), so that an example is computed as it is
/// alone.
pub struct PackedBatch {
    /// Inputs, targets and loss mask as [`lm_batch`] makes them; the key mask is 1.0 on real
    /// tokens (padding ends each row as a document of its own, so no real token reads it),
    /// `last` the last real input of each row and `tokens` the real input positions.
    pub lm: LmBatch,
    /// The examples, and the padding at the end of each row as a document of its own.
    pub segments: Segments,
}

/// Rows of `len` input positions, each holding its examples back to back and padded on the
/// right with `pad`. An example of `n` tokens takes `n - 1` positions (inputs `ids[..n-1]`,
/// targets `ids[1..]`), as in [`lm_batch`]. Rows are `len` long whatever they hold, so every
/// batch has one shape.
pub fn packed_batch(
    rows: &[Vec<&Encoded>],
    pad: u32,
    len: usize,
    dev: &Device,
) -> Result<PackedBatch> {
    let b = rows.len();
    let mut inp = vec![pad; b * len];
    let mut tgt = vec![pad; b * len];
    let mut lm = vec![0f32; b * len];
    let mut kv = vec![0f32; b * len];
    let mut docs = Vec::with_capacity(b);
    let mut last = Vec::with_capacity(b);
    let mut tokens = 0;
    for (r, row) in rows.iter().enumerate() {
        let mut at = r * len;
        let mut lens = Vec::with_capacity(row.len());
        for (ids, train) in row.iter().copied() {
            let n = ids.len().saturating_sub(1);
            if at + n > (r + 1) * len {
                bail!("a packed row of {len} positions cannot hold its examples");
            }
            inp[at..at + n].copy_from_slice(&ids[..n]);
            tgt[at..at + n].copy_from_slice(&ids[1..]);
            for j in 0..n {
                lm[at + j] = if train[j + 1] { 1.0 } else { 0.0 };
            }
            kv[at..at + n].fill(1.0);
            at += n;
            lens.push(n);
        }
        let used = at - r * len;
        tokens += used;
        last.push(used.saturating_sub(1) as u32);
        docs.push(lens);
    }
    if tokens == 0 {
        bail!("a packed batch with no example of two or more tokens");
    }
    let shape = (b, len);
    Ok(PackedBatch {
        lm: LmBatch {
            inputs: Tensor::from_vec(inp, shape, dev)?,
            targets: Tensor::from_vec(tgt, shape, dev)?,
            loss_mask: Tensor::from_vec(lm, shape, dev)?,
            key_valid: Tensor::from_vec(kv, shape, dev)?,
            tokens,
            last,
        },
        segments: Segments::from_lengths(&docs, len, dev)?,
    })
}

/// A batch of pairs' `2n` rows (or scores) as its two sides: the first `n` (chosen), the last
/// `n` (rejected).
pub fn halves(t: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = t.dim(0)? / 2;
    Ok((t.narrow(0, 0, n)?, t.narrow(0, n, n)?))
}

/// Sequences scored one by one (DPO's summed response log-probabilities): right-padded, one
/// sequence a row, or packed (TRL's `padding_free`) into as few rows of at most the model's
/// context as best-fit decreasing finds, with the 0/1 matrix that sums each sequence's
/// positions back out; padded where packing would not save positions. Either way
/// [`Self::per_seq`] gives `[S]` in the sequences' order.
pub struct SeqBatch {
    pub lm: LmBatch,
    /// Packed rows' boundaries, and `[S, R·L]` f32: 1.0 on sequence s's positions of the
    /// flattened rows.
    packed: Option<(Segments, Tensor)>,
}

impl SeqBatch {
    /// `seqs` as a right-padded batch ([`lm_batch`]), or packed when `pack`.
    pub fn new(
        seqs: &[Encoded],
        pad: u32,
        max_len: usize,
        pack: bool,
        dev: &Device,
    ) -> Result<Self> {
        if !pack {
            let lm = lm_batch(seqs, pad, max_len, dev)?;
            return Ok(Self { lm, packed: None });
        }
        let sizes: Vec<usize> = seqs
            .iter()
            .map(|(s, _)| s.len().saturating_sub(1))
            .collect();
        let longest = sizes.iter().copied().max().unwrap_or(0);
        if longest > max_len {
            bail!(
                "a sequence of {} tokens exceeds the context length {max_len}",
                longest + 1
            );
        }
        // Rows as long as the context allows, or one row holding everything; then cut to the
        // fullest row, and padded after all where the rows would hold more positions.
        let cap = max_len.min(sizes.iter().sum::<usize>()).max(longest).max(1);
        let Some((bins, len)) = fit_rows(&sizes, cap, seqs.len() * longest)? else {
            let lm = lm_batch(seqs, pad, max_len, dev)?;
            return Ok(Self { lm, packed: None });
        };
        let rows: Vec<Vec<_>> = bins
            .iter()
            .map(|b| b.iter().map(|&i| &seqs[i]).collect())
            .collect();
        let p = packed_batch(&rows, pad, len, dev)?;
        let mut sum = vec![0f32; seqs.len() * bins.len() * len];
        let width = bins.len() * len;
        for (r, bin) in bins.iter().enumerate() {
            let mut at = r * len;
            for &i in bin {
                sum[i * width + at..i * width + at + sizes[i]].fill(1.0);
                at += sizes[i];
            }
        }
        let sum = Tensor::from_vec(sum, (seqs.len(), width), dev)?;
        Ok(Self {
            lm: p.lm,
            packed: Some((p.segments, sum)),
        })
    }

    /// The forward's inputs besides the ids, under `ctx`.
    pub fn fwd(&self, ctx: crate::model::linear::Ctx) -> crate::model::Fwd<'_> {
        crate::model::Fwd {
            ctx,
            positions: None,
            key_valid: None,
            segments: self.packed.as_ref().map(|p| &p.0),
        }
    }

    /// `[S]`: each sequence's log-probability of its trained tokens under `net`, summed.
    pub fn summed_logps(
        &self,
        net: &crate::model::Transformer,
        ctx: crate::model::linear::Ctx,
    ) -> Result<Tensor> {
        self.weighted_logps(net, ctx, &self.lm.loss_mask)
    }

    /// `[S]`: each sequence's target log-probabilities times `weights` (`[R, L]`, laid out as
    /// the loss mask), summed.
    pub fn weighted_logps(
        &self,
        net: &crate::model::Transformer,
        ctx: crate::model::linear::Ctx,
        weights: &Tensor,
    ) -> Result<Tensor> {
        let mut sums = self.weighted_logps_each(net, ctx, &[weights])?;
        Ok(sums.pop().expect("one sum"))
    }

    /// [`SeqBatch::weighted_logps`] under each of `weights`, from one forward.
    pub fn weighted_logps_each(
        &self,
        net: &crate::model::Transformer,
        ctx: crate::model::linear::Ctx,
        weights: &[&Tensor],
    ) -> Result<Vec<Tensor>> {
        let lp = net.target_logprobs(&self.lm.inputs, &self.lm.targets, &self.fwd(ctx))?;
        weights.iter().map(|w| self.per_seq(&(&lp * *w)?)).collect()
    }

    /// `[S]` f32: WPO's weight of each sequence under `net` (Zhou et al., Eq. 2; TRL's
    /// `use_weighting`), with no gradient: `exp` of the mean over its trained tokens of
    /// `log p(y_t) - log sum_v p(v)^2`. A forward of its own, since the fused loss head gives
    /// no sum of squares. Per position, with `m` the largest logit, `s1 = sum exp(z - m)` and
    /// `s2 = sum exp(2 (z - m))`: `log p(y_t) = z_t - m - ln s1` and `log sum p^2 = ln s2 -
    /// 2 ln s1`.
    pub fn wpo_weights(
        &self,
        net: &crate::model::Transformer,
        ctx: crate::model::linear::Ctx,
    ) -> Result<Tensor> {
        use candle_core::{DType, D};
        /// Rows per forward and positions per block of logits: the weights are variables,
        /// so a forward's activations live until its output is detached, and a block's logits
        /// are `[positions, V]` f32 several times over.
        const ROWS: usize = 4;
        const POSITIONS: usize = 1024;
        // Nothing here is differentiated: no tape, no recomputation, no dropout.
        let ctx = crate::model::linear::Ctx {
            tape: false,
            recompute_blocks: false,
            dropout_seed: None,
            ..ctx
        };
        let (r, l) = self.lm.inputs.dims2()?;
        // Padded rows are independent, so they go a few at a time; packed rows share one
        // segment table, so they go together.
        let groups = match self.packed {
            None => ROWS,
            Some(_) => r.max(1),
        };
        let mut rows = Vec::with_capacity(r);
        for r0 in (0..r).step_by(groups) {
            let ids = self.lm.inputs.narrow(0, r0, groups.min(r - r0))?;
            let hidden = net.hidden(&ids, &self.fwd(ctx), None)?.detach();
            for (i, row) in (r0..r0 + ids.dim(0)?).enumerate() {
                let mut blocks = Vec::new();
                for p0 in (0..l).step_by(POSITIONS) {
                    let n = POSITIONS.min(l - p0);
                    let h = hidden.narrow(0, i, 1)?.narrow(1, p0, n)?;
                    let z = net.logits(&h, ctx.kernels.gemm)?.squeeze(0)?.detach();
                    let d = z.broadcast_sub(&z.max_keepdim(D::Minus1)?)?;
                    let ln_s1 = d.exp()?.sum_keepdim(D::Minus1)?.log()?;
                    let ln_s2 = (&d * 2.0)?.exp()?.sum_keepdim(D::Minus1)?.log()?;
                    let targets = self.lm.targets.narrow(0, row, 1)?.narrow(1, p0, n)?;
                    let targets = targets.squeeze(0)?.unsqueeze(1)?.contiguous()?;
                    let dt = d.gather(&targets, D::Minus1)?;
                    blocks.push(((dt + ln_s1)? - ln_s2)?.squeeze(1)?);
                }
                rows.push(Tensor::cat(&blocks, 0)?);
            }
        }
        let aligned = Tensor::stack(&rows, 0)?;
        let mask = self.lm.loss_mask.to_dtype(DType::F32)?;
        let sums = self.per_seq(&(aligned * &mask)?)?;
        let counts = self.per_seq(&mask)?.clamp(1.0, f64::INFINITY)?;
        Ok((sums / counts)?.exp()?.detach())
    }

    /// `[S]`: each sequence's sum of `x` (`[R, L]`, laid out as the inputs).
    pub fn per_seq(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.packed {
            None => x.sum(1)?,
            Some((_, sum)) => sum.matmul(&x.flatten_all()?.unsqueeze(1)?)?.squeeze(1)?,
        })
    }
}

/// Full sequences (no shift) right-padded, for scoring: ids `[B, T]`, key mask, last index.
pub fn padded(
    seqs: &[Vec<u32>],
    pad: u32,
    max_len: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor, Vec<u32>)> {
    let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
    if t == 0 {
        bail!("an empty batch");
    }
    if t > max_len {
        bail!("a sequence of {t} tokens exceeds the context length {max_len}");
    }
    let b = seqs.len();
    let mut ids = vec![pad; b * t];
    let mut kv = vec![0f32; b * t];
    let mut last = Vec::with_capacity(b);
    for (i, s) in seqs.iter().enumerate() {
        ids[i * t..i * t + s.len()].copy_from_slice(s);
        kv[i * t..i * t + s.len()].iter_mut().for_each(|x| *x = 1.0);
        last.push(s.len().saturating_sub(1) as u32);
    }
    Ok((
        Tensor::from_vec(ids, (b, t), dev)?,
        Tensor::from_vec(kv, (b, t), dev)?,
        last,
    ))
}

#[cfg(test)]
mod tests;
