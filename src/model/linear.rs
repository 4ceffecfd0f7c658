//! A linear layer with an optional LoRA adapter (`y = x W^T + b + s * (x A^T) B^T`, A random,
//! B zero, s = alpha / r), plus the per-forward context every layer reads.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::kernels::lora::{lora_linear, lora_linear_reference, LoraArgs};
use crate::kernels::{lora::linear, KernelSet};
use crate::train::params::{Init, ParamStore};
use crate::train::rng::{splitmix64, Rng};

/// The projections LoRA can attach to, by their Llama names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<LoraTarget>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 0,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec![LoraTarget::Q, LoraTarget::K, LoraTarget::V, LoraTarget::O],
        }
    }
}

impl LoraConfig {
    pub fn enabled(&self) -> bool {
        self.rank > 0
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank.max(1) as f64
    }

    /// Parses `q,k,v,o,gate,up,down`, also accepting GPT-2's names (`c_attn` = q,k,v;
    /// `c_proj` = o and down; `c_fc` = up), and `all`.
    pub fn parse_targets(spec: &str) -> Result<Vec<LoraTarget>> {
        use LoraTarget::*;
        let mut out = Vec::new();
        for t in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match t {
                "q" | "q_proj" => out.push(Q),
                "k" | "k_proj" => out.push(K),
                "v" | "v_proj" => out.push(V),
                "o" | "o_proj" => out.push(O),
                "gate" | "gate_proj" => out.push(Gate),
                "up" | "up_proj" => out.push(Up),
                "down" | "down_proj" => out.push(Down),
                "c_attn" => out.extend([Q, K, V]),
                "c_proj" => out.extend([O, Down]),
                "c_fc" => out.push(Up),
                "all" => out.extend([Q, K, V, O, Gate, Up, Down]),
                other => bail!(
                    "--lora-targets: unknown module `{other}` (use q,k,v,o,gate,up,down or c_attn,c_proj,c_fc)"
                ),
            }
        }
        out.sort();
        out.dedup();
        if out.is_empty() {
            bail!("--lora-targets: no module named");
        }
        Ok(out)
    }

    pub fn validate(&self) -> Result<()> {
        if self.enabled() && self.alpha.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            bail!("lora.alpha must be positive");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("lora.dropout must be in [0, 1)");
        }
        Ok(())
    }
}

/// What one forward pass needs to know besides its inputs.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    pub dtype: DType,
    pub kernels: KernelSet,
    /// false runs the base model alone: PPO's and DPO's reference policy without a second copy.
    pub use_lora: bool,
    /// `Some(seed)` in training enables dropout with masks derived from the seed.
    pub dropout_seed: Option<u64>,
}

struct Adapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f64,
}

pub struct Linear {
    w: Tensor,
    b: Option<Tensor>,
    adapter: Option<Adapter>,
    site: u64,
}

impl Linear {
    /// Creates `{name}.weight` (`[out, inp]`) and, with `bias`, `{name}.bias`; with `lora`,
    /// `{name}.lora_a` (`[r, inp]`, Kaiming-like random) and `{name}.lora_b` (`[out, r]`, zero).
    pub fn new(
        store: &mut ParamStore,
        name: &str,
        inp: usize,
        out: usize,
        bias: bool,
        std: f64,
        lora: Option<&LoraConfig>,
    ) -> Result<Self> {
        let w = store.create(&format!("{name}.weight"), &[out, inp], Init::Normal(std))?;
        let b = if bias {
            Some(store.create(&format!("{name}.bias"), &[out], Init::Zeros)?)
        } else {
            None
        };
        let adapter = match lora {
            Some(cfg) => Some(Adapter {
                a: store.create(
                    &format!("{name}.lora_a"),
                    &[cfg.rank, inp],
                    Init::Normal(1.0 / (inp as f64).sqrt()),
                )?,
                b: store.create(&format!("{name}.lora_b"), &[out, cfg.rank], Init::Zeros)?,
                scale: cfg.scale(),
                dropout: cfg.dropout,
            }),
            None => None,
        };
        Ok(Self {
            w,
            b,
            adapter,
            site: splitmix64(
                name.bytes()
                    .fold(0u64, |h, c| h.wrapping_mul(131) ^ c as u64),
            ),
        })
    }

    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let w = self.w.to_dtype(ctx.dtype)?;
        let b = match &self.b {
            Some(b) => Some(b.to_dtype(ctx.dtype)?),
            None => None,
        };
        let y = match (&self.adapter, ctx.use_lora) {
            (Some(ad), true) => {
                let a = ad.a.to_dtype(ctx.dtype)?;
                let bb = ad.b.to_dtype(ctx.dtype)?;
                let args = LoraArgs {
                    w: &w,
                    bias: b.as_ref(),
                    a: &a,
                    b: &bb,
                    scale: ad.scale,
                };
                match ctx.dropout_seed {
                    Some(seed) if ad.dropout > 0.0 => {
                        let xd = dropout(x, ad.dropout, seed ^ self.site)?;
                        lora_linear_reference(x, &xd, &args)?
                    }
                    _ => lora_linear(x, &args, ctx.kernels.lora)?,
                }
            }
            _ => linear(x, &w, b.as_ref())?,
        };
        Ok(y)
    }
}

/// Inverted dropout with a mask drawn on the host from `seed`, so runs are reproducible and
/// resumable; `p == 0` is the identity.
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let mut rng = Rng::new(seed);
    let keep = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.f64() < p { 0.0 } else { keep })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok(x.mul(&mask)?)
}
