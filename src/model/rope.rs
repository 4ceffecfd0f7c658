//! Rotary position embeddings in the Llama / GPT-NeoX layout (the two halves of each head
//! rotate together): the tables here, the rotation in `src/kernels/rope.rs`.

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::config::ModelConfig;
use crate::kernels::rope::rope;
use crate::kernels::KernelChoice;

/// cos and sin `[max_positions, head_dim / 2]` tables, computed once per model.
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// The tables picked at a batch's positions, `[B, 1, T, head_dim / 2]` in the compute dtype.
#[derive(Clone)]
pub struct RopeAt {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The tables of `rope_theta`, scaled by `rope_scaling` where the model has it.
    pub fn new(cfg: &ModelConfig, dev: &Device) -> Result<Self> {
        Self::with_base(cfg, cfg.rope_theta, cfg.rope_scaling.as_ref(), dev)
    }

    /// The tables of the layers that rotate by a base of their own (`rope_local`, unscaled,
    /// as Gemma 3 builds them); none where the model has none.
    pub fn local(cfg: &ModelConfig, dev: &Device) -> Result<Option<Self>> {
        match &cfg.rope_local {
            Some(local) => Ok(Some(Self::with_base(cfg, local.theta, None, dev)?)),
            None => Ok(None),
        }
    }

    fn with_base(
        cfg: &ModelConfig,
        theta: f64,
        scaling: Option<&crate::config::RopeScaling>,
        dev: &Device,
    ) -> Result<Self> {
        let half = cfg.head_dim() / 2;
        let p = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(p * half);
        let mut sin = Vec::with_capacity(p * half);
        let freqs: Vec<f64> = (0..half)
            .map(|i| {
                let f = 1.0 / theta.powf(2.0 * i as f64 / cfg.head_dim() as f64);
                scaling.map_or(f, |s| s.apply(f))
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
    /// Rotates `x` (`[B, H, T, D]`, any number of heads).
    pub fn apply(&self, x: &Tensor, choice: KernelChoice) -> Result<Tensor> {
        Ok(rope(x, &self.cos, &self.sin, choice)?)
    }

    /// The cos and sin tables, `[B, 1, T, head_dim / 2]`, for a kernel that rotates as it goes.
    pub fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::host::testing::max_abs;
    use crate::kernels::rope::{fused, reference};
    use candle_core::DType;

    /// The tables `at` picks (per-row positions past the start, as in decoding) have the
    /// layout the fused op reads: it agrees with the reference on them.
    #[test]
    fn fused_op_reads_the_tables_at_their_positions() {
        let cfg = ModelConfig::preset("tiny").unwrap();
        let dev = Device::Cpu;
        let rope = Rope::new(&cfg, &dev).unwrap();
        let (b, h, t, d) = (2, 3, 5, cfg.head_dim());
        let pos: Vec<u32> = (0..b as u32)
            .flat_map(|r| (0..t as u32).map(move |i| 37 - 30 * r + i))
            .collect();
        let at = rope
            .at(&Tensor::from_vec(pos, (b, t), &dev).unwrap(), DType::F32)
            .unwrap();
        let xs: Vec<f32> = (0..b * h * t * d)
            .map(|i| ((i * 29 % 17) as f32 - 8.0) * 0.1)
            .collect();
        let x = Tensor::from_vec(xs, (b, h, t, d), &dev).unwrap();
        let ours = fused(&x, &at.cos, &at.sin).unwrap();
        let refs = reference(&x, &at.cos, &at.sin).unwrap();
        let diff = max_abs(&(ours - refs).unwrap());
        assert!(diff < 1e-5, "{diff}");
    }
}
