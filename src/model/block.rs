//! One transformer block, pre-norm: `x + attn(norm(x))`, then `x + mlp(norm(x))`, with
//! dropout on each branch's output in training. Each residual add is done by the norm that
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
    mlp_norm: Norm,
    mlp: Mlp,
    /// Index of the block: its KV-cache layer and its dropout sites.
    index: usize,
    dropout: f64,
}

impl Block {
    /// `attn_norm`, `attn.{q,k,v,o}`, `mlp_norm`, `mlp.{gate,up,down}` in `scope`, created in
    /// that order (the order fixes which random numbers each parameter's init draws).
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
        Ok(Self {
            attn_norm: Norm::load(scope.pp("attn_norm"), cfg)?,
            attn: Attention::load(scope.pp("attn"), cfg, lora, (std, resid_std), index)?,
            mlp_norm: Norm::load(scope.pp("mlp_norm"), cfg)?,
            mlp: Mlp::load(scope.pp("mlp"), cfg, lora, std, resid_std)?,
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
        let y = self.drop(y, ctx, 0x100 + 2 * i)?;
        let (x, m) = self.mlp_norm.forward_add(&x, Some(&y), ctx)?;
        let y = self.mlp.forward(&m, ctx)?;
        Ok((x, self.drop(y, ctx, 0x101 + 2 * i)?))
    }

    fn drop(&self, y: Tensor, ctx: &Ctx, site: u64) -> Result<Tensor> {
        match ctx.dropout_seed {
            Some(s) => dropout(&y, self.dropout, splitmix64(s ^ site), ctx),
            None => Ok(y),
        }
    }
}
