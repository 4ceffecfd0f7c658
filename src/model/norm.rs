//! The pre-attention, pre-MLP and final norms (and Gemma's norms after each branch): RMSNorm
//! (Llama), RMSNorm with gains held as offsets from one (Gemma) or LayerNorm (GPT-2).

use anyhow::Result;
use candle_core::{DType, Tensor};

use super::linear::Ctx;
use crate::config::{ModelConfig, NormKind};
use crate::kernels::layernorm::{self, layer_norm};
use crate::kernels::rmsnorm::{self, rms_norm};
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
        // Gemma's f32 gain is not what the fused kernels take (a gain in x's dtype).
        if (tape::recording() || frozen) && !self.plus_one {
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
                    let w = kept(&super::cast::weight(&self.w, x.dtype())?);
                    let fused = rmsnorm::add_fused(x, r, &w, self.eps, ctx.kernels.rmsnorm)?;
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
            Some(b) => layer_norm(x, &self.w, b, self.eps, ctx.kernels.layernorm)?,
            None if self.plus_one => plus_one_rms_norm(x, &self.w, self.eps)?,
            None => rms_norm(
                x,
                &super::cast::weight(&self.w, x.dtype())?,
                self.eps,
                ctx.kernels.rmsnorm,
            )?,
        })
    }
}

/// The init of a gain of one: Gemma holds it as an offset from one.
pub fn unit_gain(cfg: &ModelConfig) -> Init {
    match cfg.norm_plus_one {
        true => Init::Zeros,
        false => Init::Ones,
    }
}

/// Gemma's RMSNorm: `x / sqrt(mean(x^2) + eps) * (1 + w)` in f32, cast back to x's dtype, as
/// transformers computes it (the gain formed in f32: in bf16, `1 + w` would lose w's low
/// bits). It runs the reference composite, on the tape as one op: our kernels take a gain in
/// x's dtype.
pub fn plus_one_rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    // Generation builds no graph from the f32 master.
    let w = match super::cast::frozen() {
        true => w.detach(),
        false => w.clone(),
    };
    tape::island(&[x, &w], |a| {
        let gain = a[1].to_dtype(DType::F32)?.affine(1.0, 1.0)?;
        rmsnorm::rms_norm_reference(&a[0], &gain, eps)
    })
}
