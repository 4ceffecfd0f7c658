//! Rotary position embeddings in the Llama / GPT-NeoX layout (the two halves of each head
//! rotate together), composed of differentiable ops.

use anyhow::Result;
use candle_core::{Device, Tensor, D};

use crate::config::ModelConfig;

/// cos and sin `[max_positions, head_dim / 2]` tables, computed once per model.
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// The tables picked at a batch's positions, `[B, 1, T, head_dim / 2]` in the compute dtype.
pub struct RopeAt {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(cfg: &ModelConfig, dev: &Device) -> Result<Self> {
        let half = cfg.head_dim() / 2;
        let p = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(p * half);
        let mut sin = Vec::with_capacity(p * half);
        let freqs: Vec<f64> = (0..half)
            .map(|i| {
                let f = 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim() as f64);
                cfg.rope_scaling.as_ref().map_or(f, |s| s.apply(f))
            })
            .collect();
        for pos in 0..p {
            for &freq in &freqs {
                let a = pos as f64 * freq;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (p, half), dev)?,
            sin: Tensor::from_vec(sin, (p, half), dev)?,
        })
    }

    /// The tables at `positions` (`[B, T]` u32).
    pub fn at(&self, positions: &Tensor, dtype: candle_core::DType) -> Result<RopeAt> {
        let (b, t) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let half = self.cos.dim(1)?;
        let pick = |tab: &Tensor| -> Result<Tensor> {
            Ok(tab
                .index_select(&flat, 0)?
                .reshape((b, 1, t, half))?
                .to_dtype(dtype)?)
        };
        Ok(RopeAt {
            cos: pick(&self.cos)?,
            sin: pick(&self.sin)?,
        })
    }
}

impl RopeAt {
    /// Rotates `x` (`[B, H, T, D]`).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (cos, sin) = (&self.cos, &self.sin);
        let d = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
        let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
        Ok(Tensor::cat(&[r1, r2], D::Minus1)?)
    }
}
