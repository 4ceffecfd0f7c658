//! The pre-attention, pre-MLP and final norms (and Gemma's norms after each branch): RMSNorm
//! (Llama), RMSNorm with gains held as offsets from one (Gemma) or LayerNorm (GPT-2).

use anyhow::Result;
use candle_core::{DType, Tensor};

use super::cast::held;
use super::linear::Ctx;
use crate::config::{ModelConfig, NormKind};
use crate::kernels::layernorm::{self, layer_norm};
use crate::kernels::rmsnorm::{self, rms_norm, Gain};
use crate::tape;
use crate::train::params::{Init, Scope};

pub struct Norm {
    w: Tensor,
    b: Option<Tensor>,
    eps: f64,
    /// Gemma's RMSNorm: the gain is `1 + w`, formed in f32.
    plus_one: bool,
}

impl Norm {
    /// `weight` (and LayerNorm's `bias`) in `scope`.
    pub fn load(mut scope: Scope, cfg: &ModelConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let w = scope.gain("weight", &[h], unit_gain(cfg))?;
        let b = match cfg.norm {
            NormKind::LayerNorm => Some(scope.gain("bias", &[h], Init::Zeros)?),
            NormKind::RmsNorm => None,
        };
        Ok(Self {
            w,
            b,
            eps: cfg.rms_norm_eps,
            plus_one: cfg.norm_plus_one,
        })
    }

    /// `(x + r, norm(x + r))`, or `(x, norm(x))` without `r`: the residual stream's add and the
    /// norm that reads it. With our LayerNorm or RMSNorm kernel they are one op
    /// ([`layernorm::add_fused`], [`rmsnorm::add_fused`]) on a block tape, and in generation
    /// (inside [`super::cast::FrozenWeights`], where nothing wants a gradient: the inputs are
    /// taken detached); otherwise the add, then the norm.
    pub fn forward_add(
        &self,
        x: &Tensor,
        r: Option<&Tensor>,
        ctx: &Ctx,
    ) -> Result<(Tensor, Tensor)> {
        let Some(r) = r else {
            return Ok((x.clone(), self.forward(x, ctx)?));
        };
        let frozen = super::cast::frozen();
        if tape::recording() || frozen {
            let kept = |t: &Tensor| if frozen { t.detach() } else { t.clone() };
            let (x, r) = (&kept(x), &kept(r));
            match &self.b {
                Some(b) if layernorm::fuses(x, ctx.kernels.layernorm) => {
                    let f32 = |t: &Tensor| t.to_dtype(DType::F32).map(|t| kept(&t));
                    let (w, b) = (f32(&self.w)?, f32(b)?);
                    return Ok(layernorm::add_fused(x, r, &w, &b, self.eps)?);
                }
                Some(_) => {}
                None => {
                    let w = kept(&self.rms_weight(x.dtype())?);
                    let (eps, choice) = (self.eps, ctx.kernels.rmsnorm);
                    let fused = rmsnorm::add_fused(x, r, &w, eps, self.gain(), choice)?;
                    if let Some(pair) = fused {
                        return Ok(pair);
                    }
                }
            }
        }
        let s = tape::add(x, r)?;
        let n = self.forward(&s, ctx)?;
        Ok((s, n))
    }

    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        Ok(match &self.b {
            Some(b) => layer_norm(x, &held(&self.w), &held(b), self.eps, ctx.kernels.layernorm)?,
            None => rms_norm(
                x,
                &self.rms_weight(x.dtype())?,
                self.eps,
                self.gain(),
                ctx.kernels.rmsnorm,
            )?,
        })
    }

    fn gain(&self) -> Gain {
        gain(self.plus_one)
    }

    /// The weight RMSNorm reads for compute in `dtype`: its copy in that dtype, or Gemma's
    /// offsets as held (f32 masters, or frozen in the compute dtype under LoRA; either way
    /// [`Gain::PlusOne`] forms `1 + w` in f32).
    fn rms_weight(&self, dtype: DType) -> Result<Tensor> {
        match self.plus_one {
            true => Ok(held(&self.w)),
            false => Ok(super::cast::weight(&self.w, dtype)?),
        }
    }
}

/// [`Gain::PlusOne`] for Gemma's norms (`ModelConfig::norm_plus_one`), else [`Gain::AsIs`].
pub fn gain(plus_one: bool) -> Gain {
    match plus_one {
        true => Gain::PlusOne,
        false => Gain::AsIs,
    }
}

/// The init of a gain of one: Gemma holds it as an offset from one.
pub fn unit_gain(cfg: &ModelConfig) -> Init {
    match cfg.norm_plus_one {
        true => Init::Zeros,
        false => Init::Ones,
    }
}
