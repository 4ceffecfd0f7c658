//! The decoder-only transformer, driven by [`ModelConfig`]: RMSNorm or LayerNorm, RoPE or
//! learned positions, SwiGLU or GELU, GQA, tied or separate output embedding, dropout.
//! Weights live in a [`ParamStore`](crate::train::params::ParamStore) as f32 master copies and
//! are cast to the compute dtype in the forward pass, so bf16 compute gets f32 gradients.

use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use super::attention::AttnInputs;
use super::block::Block;
use super::kv_cache::KvCache;
use super::linear::{dropout, Ctx};
use super::norm::Norm;
use super::rope::Rope;
use crate::config::{LoraConfig, LoraTarget, MlpKind, ModelConfig, PositionKind};
use crate::kernels::segments::Segments;
use crate::kernels::KernelChoice;
use crate::train::params::{Init, Scope};
use crate::train::rng::splitmix64;

pub struct Transformer {
    pub cfg: ModelConfig,
    embed: Tensor,
    pos_embed: Option<Tensor>,
    /// Shared, so that a recomputed block's backward can run it again (`crate::tape::recomputed`).
    blocks: Vec<Arc<Block>>,
    final_norm: Norm,
    lm_head: Option<Tensor>,
    rope: Option<Rope>,
    /// The sliding layers' tables where they have a base of their own (Gemma 3).
    local_rope: Option<Rope>,
}

/// `blk` on the tape as one op that keeps only its inputs and runs the block again in its
/// backward (`[train] gradient_checkpointing`): `(stream, branch)` in, `(stream, branch)` out.
fn recomputed_block(
    blk: &Arc<Block>,
    x: &Tensor,
    branch: Option<&Tensor>,
    ctx: &Ctx,
    inp: &AttnInputs,
) -> Result<(Tensor, Tensor)> {
    let (blk, ctx) = (blk.clone(), *ctx);
    let (rope, offset, key_valid) = (inp.rope.cloned(), inp.offset, inp.key_valid.cloned());
    let (local_rope, segments) = (inp.local_rope.cloned(), inp.segments.cloned());
    let windowed = inp.windowed.map(|(w, m)| (w, m.clone()));
    let f: crate::tape::Recomputable = Arc::new(move |xs: &[Tensor]| {
        let inp = AttnInputs {
            rope: rope.as_ref(),
            local_rope: local_rope.as_ref(),
            offset,
            key_valid: key_valid.as_ref(),
            segments: segments.as_ref(),
            windowed: windowed.as_ref().map(|(w, m)| (*w, m)),
        };
        let (stream, y) = blk.forward(&xs[0], xs.get(1), &ctx, &inp, None)?;
        Ok(vec![stream, y])
    });
    let mut xs = vec![x];
    xs.extend(branch);
    let out = crate::tape::recomputed(&xs, f)?;
    Ok((out[0].clone(), out[1].clone()))
}

/// Inputs of one forward pass besides the token ids `[B, T]`.
#[derive(Clone, Copy)]
pub struct Fwd<'a> {
    pub ctx: Ctx,
    /// `[B, T]` u32 absolute positions; `None` means `cache_len..cache_len + T` for every row.
    /// Left-padded batches pass positions that start at 0 on each row's first real token.
    pub positions: Option<&'a Tensor>,
    /// `[B, cache_len + T]` f32, 1.0 for real tokens, 0.0 for padding.
    pub key_valid: Option<&'a Tensor>,
    /// Packed rows' document boundaries (training without a cache only); without
    /// `positions`, their positions, which restart at each document.
    pub segments: Option<&'a Segments>,
}

/// A projection a new run asks LoRA for by name must be one the model has: GELU MLPs (GPT-2's)
/// have no gate. `all` (every projection named) adapts those it has. Checked where a run
/// begins, not where a model is built: a checkpoint that named one anyway still loads.
pub fn check_lora_targets(lora: &LoraConfig, cfg: &ModelConfig) -> Result<()> {
    let all = LoraConfig::parse_targets("all")?;
    let every = all.iter().all(|t| lora.targets.contains(t));
    if cfg.mlp == MlpKind::Gelu && lora.targets.contains(&LoraTarget::Gate) && !every {
        bail!(
            "lora.targets (--lora-targets) names gate, which this model's MLP has not: a GELU \
             MLP has up and down only (GPT-2's c_fc and mlp.c_proj); `all` adapts what it has"
        );
    }
    // Every adapted matrix has the model's width on one side, so an adapter of a rank above
    // it holds more parameters than a full update and can express no more.
    if lora.rank > cfg.hidden_size {
        bail!(
            "lora.rank ({}) exceeds the model's width, model.hidden_size ({}): an adapter's rank \
             is at most the smaller side of the matrix it adapts",
            lora.rank,
            cfg.hidden_size
        );
    }
    Ok(())
}

impl Transformer {
    /// Creates the body under `model.` in `scope` (a network's root scope) and, when the output
    /// embedding is not tied, `lm_head.weight` beside it.
    pub fn new(scope: &mut Scope, cfg: &ModelConfig, lora: Option<&LoraConfig>) -> Result<Self> {
        cfg.validate()?;
        crate::device::ensure_fits(cfg)?;
        let lora = lora.filter(|l| l.enabled());
        let h = cfg.hidden_size;
        let std = 0.02;
        let mut body = scope.pp("model");
        // Not decayed (minGPT's rule; nanoGPT, llm.c and the Hugging Face Trainer decay them):
        // decayed on the built-in task, the reward model of the pipeline's seed 0 fell from
        // 0.86 to 0.63 held-out pairwise accuracy.
        let embed = body.gain("embed.weight", &[cfg.vocab_size, h], Init::Normal(std))?;
        let pos_embed = match cfg.position {
            PositionKind::Learned => Some(body.gain(
                "pos_embed.weight",
                &[cfg.max_position_embeddings, h],
                Init::Normal(std / 2.0),
            )?),
            PositionKind::Rope => None,
        };
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| Block::load(body.pp(&format!("layers.{i}")), cfg, lora, i).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = Norm::load(body.pp("final_norm"), cfg)?;
        let lm_head = match cfg.tie_word_embeddings {
            true => None,
            false => {
                Some(scope.weight("lm_head.weight", &[cfg.vocab_size, h], Init::Normal(std))?)
            }
        };
        let (rope, local_rope) = match cfg.position {
            PositionKind::Rope => (
                Some(Rope::new(cfg, scope.device())?),
                Rope::local(cfg, scope.device())?,
            ),
            PositionKind::Learned => (None, None),
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            pos_embed,
            blocks,
            final_norm,
            lm_head,
            rope,
            local_rope,
        })
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Hidden states after the final norm, `[B, T, H]` in the compute dtype.
    pub fn hidden(&self, ids: &Tensor, f: &Fwd, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        if offset + t > self.cfg.max_position_embeddings {
            bail!(
                "a sequence of {} tokens exceeds the model's context (max_position_embeddings = {})",
                offset + t,
                self.cfg.max_position_embeddings
            );
        }
        let causal_offset = cache.as_ref().map_or(0, |c| c.causal_offset(t));
        let ctx = &f.ctx;
        let positions = match f.positions.or(f.segments.map(|s| &s.positions)) {
            Some(p) => p.clone(),
            None => Tensor::arange(offset as u32, (offset + t) as u32, ids.device())?
                .unsqueeze(0)?
                .broadcast_as((b, t))?
                .contiguous()?,
        };
        let x = self.embed_tokens(ids, &positions, ctx, f.segments.is_some())?;
        let at = |r: &Option<Rope>| r.as_ref().map(|r| r.at(&positions, ctx.dtype)).transpose();
        let (rope, local_rope) = (at(&self.rope)?, at(&self.local_rope)?);
        let windowed = match (&cache, self.cfg.sliding_window, f.key_valid) {
            (Some(c), Some(w), Some(valid)) => c.windowed(valid, w)?.map(|m| (w, m)),
            _ => None,
        };
        let inp = AttnInputs {
            rope: rope.as_ref(),
            local_rope: local_rope.as_ref(),
            offset: causal_offset,
            key_valid: f.key_valid,
            segments: f.segments,
            windowed: windowed.as_ref().map(|(w, m)| (*w, m)),
        };
        if ctx.tape && cache.is_none() {
            return crate::tape::segment(&x, |x| self.body(x, ctx, &inp, None));
        }
        self.body(&x, ctx, &inp, cache)
    }

    /// The blocks and the final norm.
    fn body(
        &self,
        x: &Tensor,
        ctx: &Ctx,
        inp: &AttnInputs,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (mut x, mut branch) = (x.clone(), None);
        let recompute = ctx.recompute_blocks && cache.is_none() && crate::tape::recording();
        for blk in &self.blocks {
            let (stream, y) = match recompute {
                true => recomputed_block(blk, &x, branch.as_ref(), ctx, inp)?,
                false => blk.forward(&x, branch.as_ref(), ctx, inp, cache.as_deref_mut())?,
            };
            (x, branch) = (stream, Some(y));
        }
        Ok(self.final_norm.forward_add(&x, branch.as_ref(), ctx)?.1)
    }

    /// Token (plus learned position) embeddings of `ids` `[B, T]`, with NEFTune's noise and
    /// embedding dropout in training.
    fn embed_tokens(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        ctx: &Ctx,
        packed: bool,
    ) -> Result<Tensor> {
        use crate::kernels::embedding;
        // Where the fused lookup serves, a tied table is read as the LM head reads it (its
        // compute copy): the lookup's gradient and the head's then meet on one tensor, and
        // the tape adds the lookup's rows into the head's gradient in the lookup's backward
        // (kernels::embedding). The reference would sum the rows in bf16: it reads the master.
        // The position table is read the same way as the token table, so that the two can be
        // one op (`embedding::token_and_position`), which wants one dtype.
        let choice = ctx.kernels.embedding;
        let fused = embedding::fused_serves(self.embed.device(), choice);
        let read = |w: &Tensor| match (&self.lm_head, fused) {
            (None, true) => super::cast::weight_if_kept(w, ctx.dtype),
            _ => Ok(super::cast::held(w)),
        };
        let table = read(&self.embed)?;
        let scale = (self.cfg.embed_scale).then(|| embed_scale(self.cfg.hidden_size, ctx.dtype));
        let mut x = match (&self.pos_embed, scale) {
            // No real model scales learned positions' sums; the lookup's op takes no scale.
            (Some(pe), _) => {
                let pos = read(pe)?;
                let x =
                    embedding::token_and_position(&table, ids, &pos, positions, ctx.dtype, choice)?;
                match scale {
                    Some(s) => embedding::times(&x, s)?,
                    None => x,
                }
            }
            (None, Some(s)) => embedding::scaled(&table, ids, ctx.dtype, s, choice)?,
            (None, None) => embedding::embedding(&table, ids, ctx.dtype, choice)?,
        };
        // After Gemma's scale, as transformers hooks the scaled embedding module's output,
        // and before dropout.
        if let (Some(alpha), Some(s)) = (ctx.neftune_alpha, ctx.dropout_seed) {
            x = super::neftune::noised(&x, alpha, splitmix64(s ^ 0x4E), packed)?;
        }
        if let Some(s) = ctx.dropout_seed {
            x = dropout(&x, self.cfg.dropout, splitmix64(s ^ 0xE), ctx)?;
        }
        Ok(x)
    }

    /// `[B, T, H]` hidden -> `[B, T, V]` f32 logits.
    pub fn logits(&self, hidden: &Tensor, gemm: KernelChoice) -> Result<Tensor> {
        Ok(self.compute_logits(hidden, gemm)?.to_dtype(DType::F32)?)
    }

    /// `[B, T, H]` hidden -> `[B, T, V]` logits in the compute dtype (bf16 on a GPU), or in
    /// f32 where Gemma 2 caps them: what the sampler reads. (The training losses read no
    /// logits tensor: [`Self::head_logprobs`].)
    pub fn compute_logits(&self, hidden: &Tensor, gemm: KernelChoice) -> Result<Tensor> {
        let logits = crate::kernels::gemm::linear(hidden, &self.head_weight(hidden)?, None, gemm)?;
        self.capped(logits)
    }

    /// [`Self::compute_logits`] for the sampler, inside generation's frozen weights
    /// ([`super::cast::FrozenWeights`]). Where our GEMM takes the head only padded to a
    /// multiple of 8 rows (GPT-2's 50,257; the presets' 258), the head is padded once per
    /// scope ([`super::cast::frozen_padded`]) and its padded columns narrowed off the logits:
    /// a view whose rows stay 16-byte aligned, which the sampling kernel reads in place. The
    /// head as it is fell to candle's matmul every decode step (0.156 ms of GPT-2's 1.04 ms
    /// step on the H200, where its 77 MB read takes 19 µs at copy bandwidth).
    pub fn sampling_logits(&self, hidden: &Tensor, gemm: KernelChoice) -> Result<Tensor> {
        let w = self.lm_head.as_ref().unwrap_or(&self.embed);
        // Asked of the master's shape: a cast made only to ask would be kept beside the padded
        // copy for the whole call (an untied head's is read nowhere else).
        let padded = match crate::kernels::gemm::padded_rows(hidden, w, gemm) {
            Some(rows) => super::cast::frozen_padded(w, rows, hidden.dtype())?,
            None => None,
        };
        let Some(padded) = padded else {
            return self.compute_logits(hidden, gemm);
        };
        let logits = crate::kernels::gemm::linear(hidden, &padded, None, gemm)?;
        self.capped(logits.narrow(candle_core::D::Minus1, 0, w.dim(0)?)?)
    }

    fn capped(&self, logits: Tensor) -> Result<Tensor> {
        Ok(match self.cfg.final_logit_softcapping {
            Some(cap) => soft_capped(&logits, cap)?,
            None => logits,
        })
    }

    /// The LM head's `[V, H]` weight (the embedding when tied) in `hidden`'s dtype.
    fn head_weight(&self, hidden: &Tensor) -> Result<Tensor> {
        let w = self.lm_head.as_ref().unwrap_or(&self.embed);
        Ok(super::cast::weight(w, hidden.dtype())?)
    }

    /// f32 logits of `ids`.
    pub fn forward(&self, ids: &Tensor, f: &Fwd, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.logits(&self.hidden(ids, f, cache)?, f.ctx.kernels.gemm)
    }

    /// `[B, T]` f32 log-probabilities of `targets` after `ids`: what every training loss
    /// reads. The logits stay in the compute dtype, and on CUDA with our GEMM and loss kernels
    /// they never become a node of the autograd graph (`kernels::logprobs::head_logprobs`).
    ///
    /// With the tape on, the whole forward, embedding to loss head, is one tape segment: no
    /// node of candle's graph between the weights and the log-probabilities, so no
    /// zero-filled gradient buffers and adds for the embedding, the hidden states or the
    /// tied table's two gradients.
    pub fn target_logprobs(&self, ids: &Tensor, targets: &Tensor, f: &Fwd) -> Result<Tensor> {
        let run = |ids: &Tensor| -> Result<Tensor> {
            self.head_logprobs(&self.hidden(ids, f, None)?, targets, f.ctx)
        };
        match f.ctx.tape {
            true => crate::tape::segment(ids, run),
            false => run(ids),
        }
    }

    /// `[..]` f32 log-probabilities of `targets` under the logits of `hidden` (`[.., H]`, after
    /// the final norm): the LM head and the loss head together
    /// (`kernels::logprobs::head_logprobs`), so that on CUDA the `[.., V]` logits are never
    /// a tensor of their own, capped (Gemma 2) or not.
    pub fn head_logprobs(&self, hidden: &Tensor, targets: &Tensor, ctx: Ctx) -> Result<Tensor> {
        Ok(self.tempered_logprobs(hidden, targets, 1.0, false, ctx)?.0)
    }

    /// [`Self::head_logprobs`] of the logits divided by `temperature` (after the cap), and with
    /// `entropy` the entropy of that softmax at each position, both f32 `[..]` and
    /// differentiable, from the same pass over the logits.
    pub fn tempered_logprobs(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        temperature: f64,
        entropy: bool,
        ctx: Ctx,
    ) -> Result<(Tensor, Option<Tensor>)> {
        use crate::kernels::logprobs::{head_logprobs, head_logprobs_entropy, Head, Shaping};
        let head = Head {
            w: &self.head_weight(hidden)?,
            shaping: Shaping {
                softcap: self.cfg.final_logit_softcapping.map(|c| c as f32),
                temperature: temperature as f32,
            },
        };
        let k = ctx.kernels;
        Ok(match entropy {
            true => {
                let (lp, h) = head_logprobs_entropy(hidden, head, targets, k.gemm, k.logprobs)?;
                (lp, Some(h))
            }
            false => (
                head_logprobs(hidden, head, targets, k.gemm, k.logprobs)?,
                None,
            ),
        })
    }
}

/// Gemma 2's cap on the logits, `cap * tanh(l / cap)`, in f32 as the loss head caps them
/// (`kernels::logprobs::Shaping`): the sampler then draws from the distribution the RL stages
/// score, where capping in bf16 (as transformers does) would move logits near the cap by up
/// to 0.06 between the two.
fn soft_capped(logits: &Tensor, cap: f64) -> candle_core::Result<Tensor> {
    crate::tape::island(&[logits], |a| {
        (&a[0].to_dtype(DType::F32)? / cap)?.tanh()? * cap
    })
}

/// Gemma's embedding scale `sqrt(hidden)`, rounded to the embeddings' dtype as transformers
/// rounds it to the table's (in bf16 `sqrt(1152)` = 33.94 becomes 34.0).
fn embed_scale(hidden: usize, dtype: DType) -> f32 {
    let exact = (hidden as f64).sqrt();
    match dtype {
        DType::BF16 => half::bf16::from_f64(exact).to_f32(),
        DType::F16 => half::f16::from_f64(exact).to_f32(),
        _ => exact as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The factor is rounded to the activations' dtype before it multiplies, as transformers
    /// rounds Gemma's: in bf16 a width of 1152 scales by 34, not 33.94; each path of the
    /// lookup (the fused op, the reference rows then `affine`) scales the rows by it.
    #[test]
    fn the_embedding_scale_is_rounded_to_the_compute_dtype() {
        use crate::kernels::embedding::{fused_scaled, scaled};
        use crate::kernels::KernelChoice;
        assert_eq!(embed_scale(1152, DType::BF16), 34.0);
        assert_eq!(embed_scale(1152, DType::F32), 1152f32.sqrt());
        let table = Tensor::new(&[[1.0f32, -2.0], [0.5, 3.0]], &Device::Cpu).unwrap();
        let ids = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
        for dtype in [DType::BF16, DType::F32] {
            let s = embed_scale(1152, dtype);
            let want = [0.5 * s, 3.0 * s, s, -2.0 * s];
            let rows = |y: Tensor| {
                let y = y.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                y.to_vec1::<f32>().unwrap()
            };
            for choice in [KernelChoice::Custom, KernelChoice::Reference] {
                assert_eq!(rows(scaled(&table, &ids, dtype, s, choice).unwrap()), want);
            }
            assert_eq!(rows(fused_scaled(&table, &ids, dtype, s).unwrap()), want);
        }
    }
}
