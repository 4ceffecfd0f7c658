//! A linear layer with an optional LoRA adapter (`y = x W^T + b + s * (x A^T) B^T`, A random,
//! B zero, s = alpha / r), plus the per-forward context every layer reads.

use anyhow::Result;
use candle_core::{DType, Tensor};

use crate::config::LoraConfig;

use crate::kernels::bias::{self, BiasAct};
use crate::kernels::gelu::gelu;
use crate::kernels::gemm::{linear, linear_bias_epilogue};
use crate::kernels::lora::{lora_linear, reference_recorded as lora_reference, LoraArgs};
use crate::kernels::{KernelChoice, KernelSet};
use crate::train::params::{Init, Scope};
use crate::train::rng::splitmix64;

/// What one forward pass needs to know besides its inputs.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    pub dtype: DType,
    pub kernels: KernelSet,
    /// false runs the base model alone: PPO's and DPO's reference policy without a second copy.
    pub use_lora: bool,
    /// `Some(seed)` in training enables dropout with masks derived from the seed.
    pub dropout_seed: Option<u64>,
    /// NEFTune's strength (`[sft] neftune_noise_alpha`): noise on the token embeddings of a
    /// training forward, drawn from `dropout_seed` (none without one, as in evaluation).
    pub neftune_alpha: Option<f64>,
    /// Record the blocks of a forward without a KV cache on our tape (`crate::tape`) rather
    /// than in candle's graph.
    pub tape: bool,
    /// On the tape, keep each block's inputs only and run it again in the backward
    /// (`[train] gradient_checkpointing`).
    pub recompute_blocks: bool,
}

impl Ctx {
    /// The default kernels, the base model alone, no dropout, blocks in candle's graph: what
    /// generation benches and most tests run.
    pub fn plain(dtype: DType) -> Self {
        Self {
            dtype,
            kernels: KernelSet::default(),
            use_lora: false,
            dropout_seed: None,
            neftune_alpha: None,
            tape: false,
            recompute_blocks: false,
        }
    }
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
    /// Creates `weight` (`[out, inp]`) and, with `bias`, `bias` in `scope`; with `lora`,
    /// `lora_a` (`[r, inp]`, Kaiming-like random) and `lora_b` (`[out, r]`, zero).
    pub fn load(
        mut scope: Scope,
        inp: usize,
        out: usize,
        bias: bool,
        std: f64,
        lora: Option<&LoraConfig>,
    ) -> Result<Self> {
        let w = scope.weight("weight", &[out, inp], Init::Normal(std))?;
        let b = if bias {
            Some(scope.gain("bias", &[out], Init::Zeros)?)
        } else {
            None
        };
        let adapter = match lora {
            Some(cfg) => Some(Adapter {
                a: scope.adapter(
                    "lora_a",
                    &[cfg.rank, inp],
                    Init::Normal(1.0 / (inp as f64).sqrt()),
                )?,
                b: scope.adapter("lora_b", &[out, cfg.rank], Init::Zeros)?,
                scale: cfg.scale(),
                dropout: cfg.dropout,
            }),
            None => None,
        };
        // Each adapter's dropout masks come from its own stream, keyed by its name.
        let site = splitmix64(
            scope
                .name()
                .bytes()
                .fold(0u64, |h, c| h.wrapping_mul(131) ^ c as u64),
        );
        Ok(Self {
            w,
            b,
            adapter,
            site,
        })
    }

    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.forward_act(x, ctx, BiasAct::Identity)
    }

    /// `x [W_1; W_2; ...]^T + [b_1; b_2; ...]`: layers that read the same input as one GEMM,
    /// their outputs side by side along the last dimension, for generation only (inside
    /// [`super::cast::FrozenWeights`]: the stacked weight is built once per scope, and nothing
    /// wants a gradient). `None` outside generation, where an adapter is active, or where some
    /// layers have a bias and others not.
    pub fn stacked(layers: &[&Linear], x: &Tensor, ctx: &Ctx) -> Result<Option<Tensor>> {
        let adapters = ctx.use_lora && layers.iter().any(|l| l.adapter.is_some());
        let biases: Vec<&Tensor> = layers.iter().filter_map(|l| l.b.as_ref()).collect();
        if adapters || !(biases.is_empty() || biases.len() == layers.len()) {
            return Ok(None);
        }
        let weights: Vec<&Tensor> = layers.iter().map(|l| &l.w).collect();
        let Some(w) = super::cast::frozen_stack(&weights, ctx.dtype)? else {
            return Ok(None);
        };
        let x = x.detach();
        let Some(b) = super::cast::frozen_stack(&biases, ctx.dtype)? else {
            return Ok(Some(linear(&x, &w, None, ctx.kernels.gemm)?));
        };
        let (k, custom) = (ctx.kernels, KernelChoice::Custom);
        if k.gemm == custom && k.bias == custom {
            let id = BiasAct::Identity;
            if let Some(y) = linear_bias_epilogue(&x, &w, &b, id)? {
                return Ok(Some(y));
            }
        }
        Ok(Some(linear(&x, &w, Some(&b), ctx.kernels.gemm)?))
    }

    /// `act(x W^T + b)`. Without an active adapter: a bias alone is our cuBLASLt GEMM's
    /// epilogue where both the `gemm` and `bias` kernels serve, and so are the bias and GELU
    /// in generation (inside [`super::cast::FrozenWeights`], where no backward needs the
    /// pre-activation) where the `gelu` kernel serves too; otherwise the bias and the
    /// activation run as one pass over the GEMM's output where the `bias` kernel serves
    /// (`kernels::bias`).
    pub fn forward_act(&self, x: &Tensor, ctx: &Ctx, act: BiasAct) -> Result<Tensor> {
        let adapter_on = self.adapter.is_some() && ctx.use_lora;
        if let (Some(b), false) = (&self.b, adapter_on) {
            let (k, custom) = (ctx.kernels, KernelChoice::Custom);
            let act_fuses = match act {
                BiasAct::Identity => true,
                BiasAct::GeluTanh => super::cast::frozen() && k.gelu == custom,
            };
            let epilogue = act_fuses && k.gemm == custom && k.bias == custom;
            let fuses = bias::fuses(x, k.bias);
            // The weight is cast once, for whichever fused path takes the call.
            if epilogue || fuses {
                let w = super::cast::weight(&self.w, ctx.dtype)?;
                if epilogue {
                    // The epilogue reads the matrices' dtype: the bias's compute copy (or
                    // generation's one cast) where `weight_if_kept` allows, as the f32 master
                    // would be cast every call.
                    let bc = super::cast::weight_if_kept(b, ctx.dtype)?;
                    let y = match act {
                        BiasAct::Identity => linear_bias_epilogue(x, &w, &bc, act)?,
                        // Generation's GELU epilogue wants inputs that carry no gradient. Where
                        // cuBLASLt turns it down (no algorithm for it on this GPU), the bias
                        // kernel below does the bias and the GELU, with one warning.
                        BiasAct::GeluTanh => {
                            let (xd, wd, bd) = (x.detach(), w.detach(), bc.detach());
                            linear_bias_epilogue(&xd, &wd, &bd, act).unwrap_or_else(|e| {
                                static WARNED: std::sync::Once = std::sync::Once::new();
                                WARNED.call_once(|| {
                                    errln!(
                                        "warning: cuBLASLt's GELU epilogue failed ({e}); the \
                                         bias kernel adds the bias and the GELU instead"
                                    )
                                });
                                None
                            })
                        }
                    };
                    if let Some(y) = y {
                        return Ok(y);
                    }
                }
                if fuses {
                    let y = linear(x, &w, None, ctx.kernels.gemm)?;
                    // An ablation of the GELU kernel keeps the reference GELU: only the bias
                    // fuses.
                    return match (act, ctx.kernels.gelu) {
                        (BiasAct::GeluTanh, KernelChoice::Reference) => gelu(
                            &bias::fused(&y, &super::cast::held(b), BiasAct::Identity)?,
                            KernelChoice::Reference,
                        ),
                        _ => bias::fused(&y, &super::cast::held(b), act),
                    }
                    .map_err(Into::into);
                }
            }
        }
        let y = self.forward_unfused(x, ctx)?;
        Ok(match act {
            BiasAct::Identity => y,
            BiasAct::GeluTanh => gelu(&y, ctx.kernels.gelu)?,
        })
    }

    /// `x W^T + b` (+ the adapter) with candle's bias add.
    fn forward_unfused(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let w = super::cast::weight(&self.w, ctx.dtype)?;
        let b = match &self.b {
            Some(b) => Some(super::cast::weight(b, ctx.dtype)?),
            None => None,
        };
        let y = match (&self.adapter, ctx.use_lora) {
            (Some(ad), true) => {
                let a = super::cast::weight(&ad.a, ctx.dtype)?;
                let bb = super::cast::weight(&ad.b, ctx.dtype)?;
                let args = LoraArgs {
                    w: &w,
                    bias: b.as_ref(),
                    a: &a,
                    b: &bb,
                    scale: ad.scale,
                };
                match ctx.dropout_seed {
                    Some(seed) if ad.dropout > 0.0 => {
                        let xd = dropout(x, ad.dropout, seed ^ self.site, ctx)?;
                        lora_reference(x, &xd, &args)?
                    }
                    _ => lora_linear(x, &args, ctx.kernels.lora)?,
                }
            }
            _ => linear(x, &w, b.as_ref(), ctx.kernels.gemm)?,
        };
        Ok(y)
    }
}

/// Inverted dropout whose mask is a function of `seed` and each element's index, so runs are
/// reproducible and resumable (`kernels::dropout`); `p == 0` is the identity.
pub fn dropout(x: &Tensor, p: f64, seed: u64, ctx: &Ctx) -> Result<Tensor> {
    Ok(crate::kernels::dropout::dropout(
        x,
        p,
        seed,
        ctx.kernels.dropout,
    )?)
}
