//! One transformer block, pre-norm: `x + attn(norm(x))`, then `x + mlp(norm(x))`, with
//! dropout on each branch's output in training (Gemma norms each branch's output too:
//! `x + norm(attn(norm(x)))`). Each residual add is done by the norm that
//! reads the sum (the MLP's by the next block's first norm, or the final norm), so that it can
//! be fused with it.

use anyhow::Result;
use candle_core::Tensor;

use super::attention::{Attention, AttnInputs};
use super::kv_cache::KvCache;
use super::linear::{dropout, Ctx};
use super::mlp::Mlp;
use super::norm::Norm;
use crate::config::LoraConfig;
use crate::config::ModelConfig;
use crate::train::params::Scope;
use crate::train::rng::splitmix64;

pub struct Block {
    attn_norm: Norm,
    attn: Attention,
    /// Gemma's norm of the attention's output (`ModelConfig::post_norms`).
    attn_post_norm: Option<Norm>,
    mlp_norm: Norm,
    mlp: Mlp,
    /// Gemma's norm of the MLP's output.
    mlp_post_norm: Option<Norm>,
    /// Index of the block: its KV-cache layer and its dropout sites.
    index: usize,
    dropout: f64,
}

impl Block {
    /// `attn_norm`, `attn.{q,k,v,o}`, `mlp_norm`, `mlp.{gate,up,down}` in `scope`, created in
    /// that order (the order fixes which random numbers each parameter's init draws), then
    /// Gemma's `attn_post_norm` and `mlp_post_norm`.
    pub fn load(
        mut scope: Scope,
        cfg: &ModelConfig,
        lora: Option<&LoraConfig>,
        index: usize,
    ) -> Result<Self> {
        let std = 0.02;
        // GPT-2's scaled init of the residual projections keeps the residual stream's variance
        // independent of depth.
        let resid_std = std / (2.0 * cfg.num_hidden_layers as f64).sqrt();
        let attn_norm = Norm::load(scope.pp("attn_norm"), cfg)?;
        let attn = Attention::load(scope.pp("attn"), cfg, lora, (std, resid_std), index)?;
        let mlp_norm = Norm::load(scope.pp("mlp_norm"), cfg)?;
        let mlp = Mlp::load(scope.pp("mlp"), cfg, lora, std, resid_std)?;
        let mut post = |name: &str| match cfg.post_norms {
            true => Norm::load(scope.pp(name), cfg).map(Some),
            false => Ok(None),
        };
        Ok(Self {
            attn_norm,
            attn,
            attn_post_norm: post("attn_post_norm")?,
            mlp_norm,
            mlp,
            mlp_post_norm: post("mlp_post_norm")?,
            index,
            dropout: cfg.dropout,
        })
    }

    /// `x` is the residual stream and `branch` the previous block's MLP output, not yet added
    /// to it (`None` for the first block): each add is left to the norm that reads the sum
    /// next, which fuses it where it can (`Norm::forward_add`). Returns the stream and this
    /// block's MLP output, for the next norm to add.
    pub fn forward(
        &self,
        x: &Tensor,
        branch: Option<&Tensor>,
        ctx: &Ctx,
        inp: &AttnInputs,
        cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, Tensor)> {
        let i = self.index as u64;
        let (x, a) = self.attn_norm.forward_add(x, branch, ctx)?;
        let y = self
            .attn
            .forward(&a, ctx, inp, cache.map(|c| (c, self.index)))?;
        let y = post_norm(&self.attn_post_norm, y, ctx)?;
        let y = self.drop(y, ctx, 0x100 + 2 * i)?;
        let (x, m) = self.mlp_norm.forward_add(&x, Some(&y), ctx)?;
        let y = self.mlp.forward(&m, ctx)?;
        let y = post_norm(&self.mlp_post_norm, y, ctx)?;
        Ok((x, self.drop(y, ctx, 0x101 + 2 * i)?))
    }

    fn drop(&self, y: Tensor, ctx: &Ctx, site: u64) -> Result<Tensor> {
        match ctx.dropout_seed {
            Some(s) => dropout(&y, self.dropout, splitmix64(s ^ site), ctx),
            None => Ok(y),
        }
    }
}

/// `y` through a branch's closing norm, where the model has one.
fn post_norm(norm: &Option<Norm>, y: Tensor, ctx: &Ctx) -> Result<Tensor> {
    match norm {
        Some(n) => n.forward(&y, ctx),
        None => Ok(y),
    }
}
