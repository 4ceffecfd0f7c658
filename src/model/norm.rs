//! The pre-attention, pre-MLP and final norms: RMSNorm (Llama) or LayerNorm (GPT-2).

use anyhow::Result;
use candle_core::Tensor;

use super::linear::Ctx;
use crate::config::{ModelConfig, NormKind};
use crate::kernels::layernorm::layer_norm;
use crate::kernels::rmsnorm::rms_norm;
use crate::train::params::{Init, Scope};

pub struct Norm {
    w: Tensor,
    b: Option<Tensor>,
    eps: f64,
}

impl Norm {
    /// `weight` (and LayerNorm's `bias`) in `scope`.
    pub fn load(mut scope: Scope, cfg: &ModelConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let w = scope.gain("weight", &[h], Init::Ones)?;
        let b = match cfg.norm {
            NormKind::LayerNorm => Some(scope.gain("bias", &[h], Init::Zeros)?),
            NormKind::RmsNorm => None,
        };
        Ok(Self {
            w,
            b,
            eps: cfg.rms_norm_eps,
        })
    }

    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        Ok(match &self.b {
            Some(b) => layer_norm(x, &self.w, b, self.eps, ctx.kernels.layernorm)?,
            None => rms_norm(
                x,
                &super::cast::weight(&self.w, x.dtype())?,
                self.eps,
                ctx.kernels.rmsnorm,
            )?,
        })
    }
}
