//! Batched sampling with a KV cache: left-padded prompts, temperature, top-k, top-p, stop at
//! EOS or stop strings, seeded.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use crate::data::tokenizer::Tokenizer;
use crate::model::linear::Ctx;
use crate::model::{Fwd, KvCache, Transformer};
use crate::train::rng::Rng;

#[derive(Clone, Debug)]
pub struct SampleCfg {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// 0 means no top-k filter.
    pub top_k: usize,
    /// 1.0 means no nucleus filter.
    pub top_p: f64,
    pub stop: Vec<String>,
}

impl Default for SampleCfg {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            stop: vec![],
        }
    }
}

pub struct Generation {
    /// Response tokens of each prompt, ending with EOS when the model stopped by itself.
    pub tokens: Vec<Vec<u32>>,
    /// Decoded responses, cut before a stop string.
    pub texts: Vec<String>,
    /// Whether each response ended by EOS or a stop string (not by running out of tokens).
    pub finished: Vec<bool>,
}

/// A left-padded prompt batch: ids, key mask and per-row positions starting at 0 on each
/// row's first real token.
pub fn left_pad(prompts: &[Vec<u32>], pad: u32, dev: &Device) -> Result<(Tensor, Tensor, Tensor)> {
    let l = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if l == 0 || prompts.iter().any(Vec::is_empty) {
        bail!("generation needs non-empty prompts");
    }
    let b = prompts.len();
    let mut ids = vec![pad; b * l];
    let mut valid = vec![0f32; b * l];
    let mut pos = vec![0u32; b * l];
    for (i, p) in prompts.iter().enumerate() {
        let off = l - p.len();
        for (j, &t) in p.iter().enumerate() {
            ids[i * l + off + j] = t;
            valid[i * l + off + j] = 1.0;
            pos[i * l + off + j] = j as u32;
        }
    }
    Ok((
        Tensor::from_vec(ids, (b, l), dev)?,
        Tensor::from_vec(valid, (b, l), dev)?,
        Tensor::from_vec(pos, (b, l), dev)?,
    ))
}

/// Responses in progress: their tokens, and which have ended (EOS or a stop string).
struct Responses {
    tokens: Vec<Vec<u32>>,
    texts: Vec<String>,
    finished: Vec<bool>,
}

impl Responses {
    fn new(b: usize) -> Self {
        Self {
            tokens: vec![Vec::new(); b],
            texts: vec![String::new(); b],
            finished: vec![false; b],
        }
    }

    fn all_finished(&self) -> bool {
        self.finished.iter().all(|&f| f)
    }

    /// Samples the next token of every unfinished row from `logits` (`[B, V]`), row by row;
    /// returns the ids to feed back (padding for finished rows).
    fn step(
        &mut self,
        logits: &Tensor,
        tok: &Tokenizer,
        cfg: &SampleCfg,
        rng: &mut Rng,
    ) -> Result<Vec<u32>> {
        let rows = logits.to_vec2::<f32>()?;
        let mut step_ids = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            if self.finished[i] {
                step_ids.push(tok.pad_id());
                continue;
            }
            let t = sample(row, cfg, rng);
            self.tokens[i].push(t);
            step_ids.push(t);
            if tok.is_stop(t) {
                self.finished[i] = true;
                self.texts[i] = tok.decode(&self.tokens[i])?;
            } else if !cfg.stop.is_empty() {
                let text = tok.decode(&self.tokens[i])?;
                if let Some(cut) = cfg.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                    self.finished[i] = true;
                    self.texts[i] = text[..cut].to_string();
                }
            }
        }
        Ok(step_ids)
    }

    fn finish(mut self, tok: &Tokenizer) -> Result<Generation> {
        for i in 0..self.tokens.len() {
            if !self.finished[i] {
                self.texts[i] = tok.decode(&self.tokens[i])?;
            }
        }
        Ok(Generation {
            tokens: self.tokens,
            texts: self.texts,
            finished: self.finished,
        })
    }
}

/// Samples up to `cfg.max_new_tokens` for every prompt: one prefill of the left-padded batch,
/// then one cached decode step per token.
pub fn generate(
    net: &Transformer,
    ctx: Ctx,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    cfg: &SampleCfg,
    rng: &mut Rng,
) -> Result<Generation> {
    if prompts.is_empty() {
        bail!("generation needs at least one prompt");
    }
    let dev = net.device().clone();
    let b = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let limit = net.cfg.max_position_embeddings;
    if longest + cfg.max_new_tokens > limit {
        bail!(
            "a prompt of {longest} tokens plus {} new tokens exceeds the model's context of {limit} tokens",
            cfg.max_new_tokens
        );
    }
    let (ids, mut valid, positions) = left_pad(prompts, tok.pad_id(), &dev)?;
    let mut cache = KvCache::new(net.num_layers());
    let f = Fwd {
        ctx,
        positions: Some(&positions),
        key_valid: Some(&valid),
    };
    let logits = net.forward(&ids, &f, Some(&mut cache))?;
    let mut last = logits.narrow(1, longest - 1, 1)?.squeeze(1)?;
    let mut resp = Responses::new(b);
    let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    for _ in 0..cfg.max_new_tokens {
        let step_ids = resp.step(&last, tok, cfg, rng)?;
        if resp.all_finished() {
            break;
        }
        let step = Tensor::from_vec(step_ids, (b, 1), &dev)?;
        let pos = Tensor::from_vec(next_pos.clone(), (b, 1), &dev)?;
        next_pos.iter_mut().for_each(|p| *p += 1);
        let ones = Tensor::ones((b, 1), candle_core::DType::F32, &dev)?;
        valid = Tensor::cat(&[&valid, &ones], 1)?;
        let f = Fwd {
            ctx,
            positions: Some(&pos),
            key_valid: Some(&valid),
        };
        last = net.forward(&step, &f, Some(&mut cache))?.squeeze(1)?;
    }
    resp.finish(tok)
}

/// Each prompt followed by its response.
pub fn concat(prompts: &[Vec<u32>], responses: &[Vec<u32>]) -> Vec<Vec<u32>> {
    prompts
        .iter()
        .zip(responses)
        .map(|(p, r)| p.iter().chain(r).copied().collect())
        .collect()
}

impl Generation {
    /// Each of `prompts` followed by its generated tokens.
    pub fn sequences(&self, prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
        concat(prompts, &self.tokens)
    }
}

/// Samples one token id from a row of logits under temperature, top-k and top-p.
pub fn sample(logits: &[f32], cfg: &SampleCfg, rng: &mut Rng) -> u32 {
    if cfg.temperature <= 0.0 {
        return argmax(logits);
    }
    let t = cfg.temperature as f32;
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if cfg.top_k > 0 {
        idx.truncate(cfg.top_k);
    }
    let max = logits[idx[0]];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i] - max) / t) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (k, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= cfg.top_p {
                keep = k + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let u = rng.f64();
    let mut acc = 0.0;
    for (k, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return idx[k] as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

pub fn argmax(xs: &[f32]) -> u32 {
    xs.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map_or(0, |(i, _)| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_filters() {
        let logits = [0.0f32, 5.0, 1.0, 4.9];
        let mut rng = Rng::new(1);
        let greedy = SampleCfg {
            temperature: 0.0,
            ..Default::default()
        };
        assert_eq!(sample(&logits, &greedy, &mut rng), 1);
        let top2 = SampleCfg {
            top_k: 2,
            ..Default::default()
        };
        for _ in 0..200 {
            let t = sample(&logits, &top2, &mut rng);
            assert!(t == 1 || t == 3);
        }
        let nucleus = SampleCfg {
            top_p: 0.3,
            ..Default::default()
        };
        for _ in 0..50 {
            assert_eq!(sample(&logits, &nucleus, &mut rng), 1);
        }
    }
}
