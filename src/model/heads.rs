//! A scalar head over the transformer's hidden states: the reward model's score and the
//! value model's per-token value.

use anyhow::Result;
use candle_core::{DType, Tensor, D};

use crate::train::params::{Init, Scope};

pub struct ScalarHead {
    w: Tensor,
    b: Tensor,
}

impl ScalarHead {
    /// A fresh reward head starts small and random; a fresh value head starts at zero, so the
    /// first advantages are the returns themselves rather than returns minus noise.
    /// `weight` and `bias` in `scope` (a network's `score`).
    pub fn load(mut scope: Scope, hidden: usize, zero: bool) -> Result<Self> {
        let init = if zero {
            Init::Zeros
        } else {
            Init::Normal(1.0 / (hidden as f64 + 1.0).sqrt())
        };
        Ok(Self {
            w: scope.head("weight", &[hidden], init, true)?,
            b: scope.head("bias", &[1], Init::Zeros, false)?,
        })
    }

    /// `[B, T, H]` hidden states -> `[B, T]` f32 scores.
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = hidden.to_dtype(DType::F32)?;
        Ok(h.broadcast_mul(&self.w)?
            .sum(D::Minus1)?
            .broadcast_add(&self.b)?)
    }
}

/// Picks `x[b, idx[b]]` for each row: `[B, T]` and `B` indices -> `[B]`.
pub fn gather_last(x: &Tensor, idx: &[u32]) -> Result<Tensor> {
    let ids = Tensor::from_slice(idx, (idx.len(), 1), x.device())?;
    Ok(x.gather(&ids, 1)?.squeeze(1)?)
}
