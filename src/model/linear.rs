//! A linear layer with an optional LoRA adapter (`y = x W^T + b + s * (x A^T) B^T`, A random,
//! B zero, s = alpha / r), or DoRA's (each output scaled by `m / ||W + s B A||_row`, the
//! norm held constant as PEFT holds it), plus the per-forward context every layer reads.

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
    /// DoRA's magnitude vector `[out]`, where the adapter is DoRA's.
    magnitude: Option<Tensor>,
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
    /// `lora_a` (`[r, inp]`, Kaiming-like random) and `lora_b` (`[out, r]`, zero), and under
    /// DoRA `lora_magnitude` (`[out]`).
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
                // Ones until the base weight is read: `init_dora_magnitudes` then gives each
                // row its length, so that the adapted layer starts as the base.
                magnitude: match cfg.use_dora {
                    true => Some(scope.adapter_gain(DORA_MAGNITUDE, &[out], Init::Ones)?),
                    false => None,
                },
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
            (Some(ad), true) if ad.magnitude.is_some() => self.dora(x, &w, b.as_ref(), ad, ctx)?,
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

/// The name of a DoRA magnitude vector beside its layer's `weight`.
pub const DORA_MAGNITUDE: &str = "lora_magnitude";

impl Linear {
    /// DoRA's forward, as PEFT's: `y = x W^T + b + (g - 1) (x_d W^T) + g s (x_d A^T) B^T`, `x_d`
    /// the adapter's input after its dropout and `g = m / ||W + s B A||_row` with the norm held
    /// constant (DoRA's section 4.3), so that without dropout `y = g (x W^T + s (x A^T) B^T) + b`.
    /// `g - 1` is formed in f32 and scales a term of its own: near 1, a 16-bit `g` would round
    /// a small change of a row's length away. The base GEMMs are the tape's, which skip the
    /// frozen W's gradient; the rest is candle's ops, one island of the tape.
    fn dora(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        ad: &Adapter,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        // Held: detached where nothing wants a gradient (scoring, evaluation, generation).
        let m = super::cast::held(ad.magnitude.as_ref().expect("a DoRA adapter"));
        let a = super::cast::weight(&ad.a, ctx.dtype)?;
        let bb = super::cast::weight(&ad.b, ctx.dtype)?;
        let scale = ad.scale;
        let norm = || -> candle_core::Result<Tensor> {
            let f32 = |t: &Tensor| t.detach().to_dtype(DType::F32);
            let adapted = (f32(w)? + (f32(&bb)?.matmul(&f32(&a)?)? * scale)?)?;
            adapted.sqr()?.sum(1)?.sqrt()
        };
        let add_bias = |y: Tensor| -> Result<Tensor> {
            Ok(match bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            })
        };
        // Generation: `g - 1` once per rollout (an `[out]` vector, where a merged weight would
        // be a second copy of W), and the LoRA kernel.
        let lengthen = super::cast::frozen_derived(&m, ctx.dtype, || {
            let n = norm()?;
            (m.detach() - &n)? / n
        })?;
        if let Some(g1) = lengthen {
            let args = LoraArgs {
                w,
                bias: None,
                a: &a,
                b: &bb,
                scale,
            };
            let y = lora_linear(&x.detach(), &args, ctx.kernels.lora)?;
            return add_bias((&y + y.broadcast_mul(&g1)?)?);
        }
        let xd = match ctx.dropout_seed {
            Some(seed) if ad.dropout > 0.0 => Some(dropout(x, ad.dropout, seed ^ self.site, ctx)?),
            _ => None,
        };
        let base = linear(x, w, None, ctx.kernels.gemm)?;
        let base_d = match &xd {
            Some(xd) => Some(linear(xd, w, None, ctx.kernels.gemm)?),
            None => None,
        };
        let n = norm()?;
        // Inputs by place: x W^T, the adapter's input, A, B, m, then the bias and x_d W^T
        // where there are, all inside the island so that the tape differentiates each.
        let mut inputs = vec![&base, xd.as_ref().unwrap_or(x), &a, &bb, &m];
        let (has_bias, has_dropout) = (bias.is_some(), base_d.is_some());
        inputs.extend(bias);
        inputs.extend(base_d.as_ref());
        Ok(crate::tape::island(&inputs, move |t| {
            let (base, xl, a, b) = (&t[0], &t[1], &t[2], &t[3]);
            let g1 = ((t[4].to_dtype(DType::F32)? - &n)? / &n)?.to_dtype(base.dtype())?;
            let lin = |x: &Tensor, w: &Tensor| x.broadcast_matmul(&w.t()?);
            let up = (lin(&lin(xl, a)?, b)? * scale)?;
            let y = match has_dropout {
                false => {
                    let s = (base + up)?;
                    (&s + s.broadcast_mul(&g1)?)?
                }
                true => {
                    let base_d = &t[t.len() - 1];
                    let scaled = (base_d.broadcast_mul(&g1)? + up.broadcast_mul(&g1)?)?;
                    ((base + up)? + scaled)?
                }
            };
            match has_bias {
                true => y.broadcast_add(&t[5]),
                false => Ok(y),
            }
        })?)
    }
}

/// DoRA's merged weight (PEFT's `use_dora`): the adapted weight `W + s B A` (f32) with each
/// output's row rescaled to the length its magnitude `m` gives it, `m / ||W + s B A||_row`.
pub fn dora_rescaled(adapted: &Tensor, m: &Tensor) -> candle_core::Result<Tensor> {
    let norms = adapted.sqr()?.sum_keepdim(1)?.sqrt()?;
    let m = m.to_dtype(DType::F32)?.reshape(norms.shape())?;
    adapted.broadcast_mul(&(m / norms)?)
}

/// Each DoRA magnitude of network `net` in `store` set to its weight's row lengths, so that
/// every adapted layer starts as its base layer (B is zero): what PEFT does on creating a DoRA
/// adapter. Called once the base weights are read; a resume then sets the adapters' own.
pub fn init_dora_magnitudes(
    store: &crate::train::params::ParamStore,
    net: crate::train::params::Net,
) -> Result<()> {
    let suffix = format!(".{DORA_MAGNITUDE}");
    for (name, var, _) in store.net(net) {
        let Some(stem) = name.strip_suffix(&suffix) else {
            continue;
        };
        let full = format!("{}{stem}.weight", net.prefix());
        let w = store
            .get(&full)
            .ok_or_else(|| anyhow::anyhow!("{name}: no {stem}.weight beside it"))?;
        let rows = w.as_tensor().to_dtype(DType::F32)?.sqr()?.sum(1)?.sqrt()?;
        var.set(&rows.to_dtype(var.dtype())?)?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::train::params::{Net, ParamStore};

    /// A DoRA layer's forward is the layer PEFT's merge makes: `x W'^T + b` with each row of
    /// `W' = W + s B A` rescaled to its magnitude (computed here on the host, row by row), and
    /// a fresh one, its magnitudes set to its weight's row lengths, is the base layer;
    /// generation's path gives the same outputs; A's, B's and m's gradients are the merged
    /// layer's with its row lengths held constant.
    #[test]
    fn a_dora_layer_is_its_merged_layer_and_starts_as_its_base() {
        let (inp, out, r) = (6usize, 5usize, 3usize);
        let cfg = LoraConfig {
            rank: r,
            alpha: 6.0,
            use_dora: true,
            ..LoraConfig::default()
        };
        let mut store = ParamStore::new(Device::Cpu, 3);
        let layer = Linear::load(
            store.scope(Net::Policy).pp("l"),
            inp,
            out,
            true,
            0.5,
            Some(&cfg),
        )
        .unwrap();
        let ctx = Ctx {
            use_lora: true,
            ..Ctx::plain(DType::F32)
        };
        let x = Tensor::randn(0f32, 1.0, (2, 4, inp), &Device::Cpu).unwrap();
        let base = Ctx::plain(DType::F32);
        init_dora_magnitudes(&store, Net::Policy).unwrap();
        let diff = (layer.forward(&x, &ctx).unwrap() - layer.forward(&x, &base).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "a fresh DoRA layer is its base: {diff}");
        let set = |name: &str, shape: &[usize]| {
            let t = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
            store.get(name).unwrap().set(&t).unwrap();
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let a = set("l.lora_a", &[r, inp]);
        let b = set("l.lora_b", &[out, r]);
        let m = set("l.lora_magnitude", &[out]);
        let w: Vec<f32> = store
            .get("l.weight")
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let bias: Vec<f32> = store.get("l.bias").unwrap().to_vec1().unwrap();
        let s = cfg.scale() as f32;
        let mut merged = vec![0f32; out * inp];
        for o in 0..out {
            let row: Vec<f32> = (0..inp)
                .map(|i| {
                    w[o * inp + i] + s * (0..r).map(|k| b[o * r + k] * a[k * inp + i]).sum::<f32>()
                })
                .collect();
            let len = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            for i in 0..inp {
                merged[o * inp + i] = m[o] / len * row[i];
            }
        }
        // Generation's path, its `g - 1` built once in a frozen scope, gives the same outputs.
        let unmerged = layer.forward(&x, &ctx).unwrap();
        {
            let _frozen = super::super::cast::FrozenWeights::enter();
            let y = layer.forward(&x, &ctx).unwrap();
            let d = (y - &unmerged).unwrap().abs().unwrap().max_all().unwrap();
            assert!(
                d.to_scalar::<f32>().unwrap() < 1e-5,
                "merged in generation: {d}"
            );
        }
        // Gradients of A, B and m: those of the merged weight's layer with its row lengths
        // held constant, by candle's autograd on fresh variables.
        let dy = Tensor::randn(0f32, 1.0, (2, 4, out), &Device::Cpu).unwrap();
        let ours = (layer.forward(&x, &ctx).unwrap() * &dy)
            .unwrap()
            .sum_all()
            .unwrap();
        let ours = ours.backward().unwrap();
        let var = |v: &[f32], shape: &[usize]| {
            candle_core::Var::from_tensor(
                &Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap(),
            )
            .unwrap()
        };
        let (va, vb, vm) = (var(&a, &[r, inp]), var(&b, &[out, r]), var(&m, &[out]));
        let wt = Tensor::from_vec(w.clone(), (out, inp), &Device::Cpu).unwrap();
        let adapted = (&wt + (vb.matmul(&va).unwrap() * cfg.scale()).unwrap()).unwrap();
        let lengths = adapted
            .detach()
            .sqr()
            .unwrap()
            .sum_keepdim(1)
            .unwrap()
            .sqrt()
            .unwrap();
        let g = (vm.as_tensor().reshape((out, 1)).unwrap() / lengths).unwrap();
        let merged_w = adapted.broadcast_mul(&g).unwrap();
        let bt = Tensor::from_vec(bias.clone(), out, &Device::Cpu).unwrap();
        let y2 = x
            .broadcast_matmul(&merged_w.t().unwrap())
            .unwrap()
            .broadcast_add(&bt)
            .unwrap();
        let theirs = (y2 * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [
            ("l.lora_a", &va),
            ("l.lora_b", &vb),
            ("l.lora_magnitude", &vm),
        ] {
            let got = ours.get(store.get(name).unwrap().as_tensor()).unwrap();
            let want = theirs.get(v.as_tensor()).unwrap();
            let d = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            let d = d.to_scalar::<f32>().unwrap();
            assert!(d < 1e-3, "{name}: gradient off by {d}");
        }
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let got: Vec<f32> = layer
            .forward(&x, &ctx)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (row, g) in got.chunks(out).enumerate() {
            for o in 0..out {
                let want = bias[o]
                    + (0..inp)
                        .map(|i| merged[o * inp + i] * xs[row * inp + i])
                        .sum::<f32>();
                assert!(
                    (g[o] - want).abs() < 1e-4,
                    "row {row} out {o}: {} vs {want}",
                    g[o]
                );
            }
        }
    }
}
