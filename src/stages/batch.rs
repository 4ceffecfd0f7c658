//! Records to token tensors: SFT examples with their loss masks, right-padded training
//! batches and left-padded prompt batches for generation.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use crate::data::records::SftExample;
use crate::data::tokenizer::Tokenizer;

/// Tokens of an example and, per token, whether it carries loss. Each trained segment is
/// followed by EOS, which is trained too, so the model learns to stop.
pub fn encode_example(tok: &Tokenizer, ex: &SftExample) -> Result<(Vec<u32>, Vec<bool>)> {
    let mut ids = Vec::new();
    let mut train = Vec::new();
    for seg in &ex.segments {
        let t = tok.encode(&seg.text)?;
        train.extend(std::iter::repeat_n(seg.train, t.len()));
        ids.extend(t);
        if seg.train && ex.append_eos {
            ids.push(tok.eos_id());
            train.push(true);
        }
    }
    Ok((ids, train))
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

pub fn lm_batch(
    seqs: &[(Vec<u32>, Vec<bool>)],
    pad: u32,
    max_len: usize,
    dev: &Device,
) -> Result<LmBatch> {
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
