//! The attention half of a block: q, k, v projections (grouped-query: k and v may have fewer
//! heads), Qwen3's and Gemma's per-head RMSNorm of q and k, rotary positions (Gemma 3's
//! sliding layers by a base of their own), the KV cache, the attention kernel and the output
//! projection.

use anyhow::Result;
use candle_core::Tensor;

use super::kv_cache::KvCache;
use super::linear::{Ctx, Linear};
use super::rope::RopeAt;
use crate::config::ModelConfig;
use crate::config::{LoraConfig, LoraTarget};
use crate::kernels::attention::{attention, attention_stacked, AttnMask, Segments};
use crate::kernels::decode_step::HeadNorm;
use crate::kernels::heads;
use crate::kernels::rmsnorm::{rms_norm, Gain};
use crate::kernels::KernelChoice;
use crate::train::params::Scope;

pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Gains `[head_dim]` of the per-head RMSNorm of q and k, where the model has one.
    qk_norm: Option<QkNorm>,
    /// Which rotary tables this layer rotates q and k by.
    rotary: Rotary,
    /// This layer's sliding window (`ModelConfig::layer_window`).
    window: Option<usize>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// The logits' scale (`ModelConfig::attn_scale`).
    scale: f64,
    /// Gemma 2's cap on the scores (`ModelConfig::attn_logit_softcapping`).
    softcap: Option<f64>,
}

/// The rotary positions of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rotary {
    /// The model's tables (`rope_theta`).
    Global,
    /// The model's second base (`rope_local`, Gemma 3's sliding layers).
    Local,
    /// None: one of SmolLM3's NoPE layers.
    Off,
}

struct QkNorm {
    q: Tensor,
    k: Tensor,
    eps: f64,
    /// Gemma's gains, offsets from one (`ModelConfig::norm_plus_one`).
    plus_one: bool,
}

impl QkNorm {
    /// The weights RMSNorm reads for compute in `dtype`, and how they give the gains: Gemma's
    /// offsets in f32 (added to one in f32; as held, or where a frozen store keeps them in
    /// the compute dtype, cast up, which the gains round alike), others in `dtype` (cast once
    /// per generation: `cast::weight` keeps the copy).
    fn weights(&self, dtype: candle_core::DType) -> Result<(Tensor, Tensor, Gain)> {
        let f32_offsets = |w: &Tensor| match w.dtype() {
            candle_core::DType::F32 => Ok(super::cast::held(w)),
            _ => super::cast::weight(w, candle_core::DType::F32),
        };
        match self.plus_one {
            true => Ok((f32_offsets(&self.q)?, f32_offsets(&self.k)?, Gain::PlusOne)),
            false => {
                let cast = |w: &Tensor| super::cast::weight(w, dtype);
                Ok((cast(&self.q)?, cast(&self.k)?, Gain::AsIs))
            }
        }
    }
}

/// What attention needs besides the hidden states: positions (as rope tables), the cache of
/// earlier tokens and which keys are padding.
pub struct AttnInputs<'a> {
    pub rope: Option<&'a RopeAt>,
    /// The sliding layers' tables where they rotate by a base of their own (Gemma 3).
    pub local_rope: Option<&'a RopeAt>,
    /// Tokens already in the cache: the causal mask is offset by this much.
    pub offset: usize,
    /// `[B, offset + T]` f32, 1.0 for real tokens.
    pub key_valid: Option<&'a Tensor>,
    /// Document boundaries of packed rows: no token attends across them.
    pub segments: Option<&'a Segments>,
    /// A decode step at fixed shapes under a sliding window: the window and `key_valid` less
    /// the keys it hides from the step's query (`KvCache::windowed`), which the sliding layers
    /// read instead of counting the window back from the causal offset.
    pub windowed: Option<(usize, &'a Tensor)>,
}

impl Attention {
    /// `q`, `k`, `v`, `o` in `scope` for layer `index`; `resid_std` is the init of `o`, which
    /// writes into the residual stream.
    pub fn load(
        mut scope: Scope,
        cfg: &ModelConfig,
        lora: Option<&LoraConfig>,
        (std, resid_std): (f64, f64),
        index: usize,
    ) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (qw, kv) = (cfg.attn_width(), cfg.num_key_value_heads * hd);
        let target = |t: LoraTarget| LoraConfig::on(lora, t);
        let (bias, qkv) = (cfg.bias, cfg.bias || cfg.qkv_bias);
        let unit = super::norm::unit_gain(cfg);
        Ok(Self {
            q: Linear::load(scope.pp("q"), h, qw, qkv, std, target(LoraTarget::Q))?,
            k: Linear::load(scope.pp("k"), h, kv, qkv, std, target(LoraTarget::K))?,
            v: Linear::load(scope.pp("v"), h, kv, qkv, std, target(LoraTarget::V))?,
            o: Linear::load(scope.pp("o"), qw, h, bias, resid_std, target(LoraTarget::O))?,
            qk_norm: match cfg.qk_norm {
                true => Some(QkNorm {
                    q: scope.pp("q_norm").gain("weight", &[hd], unit)?,
                    k: scope.pp("k_norm").gain("weight", &[hd], unit)?,
                    eps: cfg.rms_norm_eps,
                    plus_one: cfg.norm_plus_one,
                }),
                false => None,
            },
            rotary: if cfg.nope_layers.contains(&index) {
                Rotary::Off
            } else if cfg.rotates_locally(index) {
                Rotary::Local
            } else {
                Rotary::Global
            },
            window: cfg.layer_window(index),
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
            scale: cfg.attn_scale(),
            softcap: cfg.attn_logit_softcapping,
        })
    }

    /// `x` `[B, T, H]` -> `[B, T, H]`; appends this layer's keys and values to `cache`.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &Ctx,
        inp: &AttnInputs,
        mut cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        // A decode step at fixed shapes (generation, one position): q, k and v from one
        // stacked GEMM, split, normalised per head (Qwen3) and rotated (where the model has
        // them and our norm and rope kernels are chosen) and written into the cache by one
        // kernel, which where our attention kernel takes the step also attends.
        let rope = match self.rotary {
            Rotary::Global => inp.rope,
            Rotary::Local => inp.local_rope,
            Rotary::Off => None,
        };
        if let Some((c, layer)) = cache.as_mut() {
            let kernels = &ctx.kernels;
            let rope_fuses = rope.is_none() || kernels.rope == KernelChoice::Custom;
            // The fused kernels take gains in the compute dtype or Gemma's f32 offsets.
            let norm_fuses = self.qk_norm.is_none() || kernels.rmsnorm == KernelChoice::Custom;
            if c.is_fixed() && rope_fuses && norm_fuses && x.dim(1)? == 1 {
                let qkv = [&self.q, &self.k, &self.v];
                if let Some(y) = Linear::stacked(&qkv, x, ctx)? {
                    let nq = self.heads * self.head_dim;
                    let rope = rope.map(RopeAt::tables);
                    let weights = match &self.qk_norm {
                        Some(n) => Some((n.weights(y.dtype())?, n.eps)),
                        None => None,
                    };
                    let norm = weights.as_ref().map(|((q, k, gain), eps)| HeadNorm {
                        q,
                        k,
                        eps: *eps,
                        gain: *gain,
                    });
                    if let Some((kc, vc, step)) = c.fixed_buffers(*layer)? {
                        let (mask, scale) = (self.mask(inp), self.scale());
                        let (caches, choice) = ((kc, vc), kernels.attention);
                        let fused = attention_stacked(
                            &y, caches, step, self.heads, rope, norm, &mask, scale, choice,
                        )?;
                        if let Some(o) = fused {
                            return self.project(&o, ctx);
                        }
                    }
                    if let Some((q, k, v)) = c.append_stacked(*layer, &y, nq, rope, norm)? {
                        return self.attend(&q, &k, &v, ctx, inp);
                    }
                }
            }
        }
        let split = |y: Tensor, n: usize| heads::split(&y, n, ctx.kernels.heads);
        let mut q = split(self.q.forward(x, ctx)?, self.heads)?;
        let mut k = split(self.k.forward(x, ctx)?, self.kv_heads)?;
        let v = split(self.v.forward(x, ctx)?, self.kv_heads)?;
        if let Some(n) = &self.qk_norm {
            let (qw, kw, gain) = n.weights(q.dtype())?;
            q = rms_norm(&q, &qw, n.eps, gain, ctx.kernels.rmsnorm)?;
            k = rms_norm(&k, &kw, n.eps, gain, ctx.kernels.rmsnorm)?;
        }
        if let Some(r) = rope {
            q = r.apply(&q, ctx.kernels.rope)?;
            k = r.apply(&k, ctx.kernels.rope)?;
        }
        let (k, v) = match cache {
            Some((c, layer)) => c.append(layer, &k, &v)?,
            None => (k, v),
        };
        self.attend(&q, &k, &v, ctx, inp)
    }

    /// Attention of `q` (`[B, Hq, T, D]`) over `k`, `v`, heads merged, then the output
    /// projection.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &Ctx,
        inp: &AttnInputs,
    ) -> Result<Tensor> {
        let (mask, scale) = (self.mask(inp), self.scale());
        let y = attention(q, k, v, &mask, scale, ctx.kernels.attention)?;
        self.project(&y, ctx)
    }

    /// Causal at the inputs' offset, under their key mask, within this layer's window, the
    /// scores under this layer's cap.
    fn mask<'a>(&self, inp: &AttnInputs<'a>) -> AttnMask<'a> {
        let (key_valid, window) = match inp.windowed {
            Some((w, valid)) if self.window == Some(w) => (Some(valid), None),
            _ => (inp.key_valid, self.window),
        };
        AttnMask {
            causal_offset: Some(inp.offset),
            key_valid,
            segments: inp.segments,
            window,
            softcap: self.softcap,
        }
    }

    fn scale(&self) -> f64 {
        self.scale
    }

    /// Attention's output `[B, Hq, T, D]`, heads merged, through the output projection.
    fn project(&self, y: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let y = heads::merge(y, ctx.kernels.heads)?;
        self.o.forward(&y, ctx)
    }
}
