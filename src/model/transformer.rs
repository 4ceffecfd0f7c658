//! The decoder-only transformer, driven by [`ModelConfig`]: RMSNorm or LayerNorm, RoPE or
//! learned positions, SwiGLU or GELU, GQA, tied or separate output embedding, dropout.
//! Weights live in a [`ParamStore`] as f32 master copies and are cast to the compute dtype in
//! the forward pass, so bf16 compute gets f32 gradients.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};

use super::kv_cache::KvCache;
use super::linear::{dropout, Ctx, Linear, LoraConfig, LoraTarget};
use crate::config::{MlpKind, ModelConfig, NormKind, PositionKind};
use crate::kernels::attention::{attention, AttnMask};
use crate::kernels::rmsnorm::{layer_norm, rms_norm};
use crate::train::params::{Init, ParamStore};
use crate::train::rng::splitmix64;

struct Norm {
    w: Tensor,
    b: Option<Tensor>,
    eps: f64,
}

impl Norm {
    fn new(store: &mut ParamStore, name: &str, cfg: &ModelConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let w = store.create(&format!("{name}.weight"), &[h], Init::Ones)?;
        let b = match cfg.norm {
            NormKind::LayerNorm => {
                Some(store.create(&format!("{name}.bias"), &[h], Init::Zeros)?)
            }
            NormKind::RmsNorm => None,
        };
        Ok(Self {
            w,
            b,
            eps: cfg.rms_norm_eps,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        Ok(match &self.b {
            Some(b) => layer_norm(x, &self.w, b, self.eps)?,
            None => rms_norm(
                x,
                &self.w.to_dtype(x.dtype())?,
                self.eps,
                ctx.kernels.rmsnorm,
            )?,
        })
    }
}

struct Block {
    attn_norm: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    mlp_norm: Norm,
    gate: Option<Linear>,
    up: Linear,
    down: Linear,
}

pub struct Transformer {
    pub cfg: ModelConfig,
    embed: Tensor,
    pos_embed: Option<Tensor>,
    blocks: Vec<Block>,
    final_norm: Norm,
    lm_head: Option<Tensor>,
    rope: Option<(Tensor, Tensor)>,
}

/// Inputs of one forward pass besides the token ids `[B, T]`.
#[derive(Clone, Copy)]
pub struct Fwd<'a> {
    pub ctx: Ctx,
    /// `[B, T]` u32 absolute positions; `None` means `cache_len..cache_len + T` for every row.
    /// Left-padded batches pass positions that start at 0 on each row's first real token.
    pub positions: Option<&'a Tensor>,
    /// `[B, cache_len + T]` f32, 1.0 for real tokens, 0.0 for padding.
    pub key_valid: Option<&'a Tensor>,
}

impl Transformer {
    /// Creates every parameter under `prefix` (e.g. `model`) in `store`.
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        cfg: &ModelConfig,
        lora: Option<&LoraConfig>,
    ) -> Result<Self> {
        cfg.validate()?;
        let lora = lora.filter(|l| l.enabled());
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let kv = cfg.num_key_value_heads * hd;
        let std = 0.02;
        // GPT-2's scaled init of the residual projections keeps the residual stream's variance
        // independent of depth.
        let resid_std = std / (2.0 * cfg.num_hidden_layers as f64).sqrt();
        let embed = store.create(
            &format!("{prefix}.embed.weight"),
            &[cfg.vocab_size, h],
            Init::Normal(std),
        )?;
        let pos_embed = match cfg.position {
            PositionKind::Learned => Some(store.create(
                &format!("{prefix}.pos_embed.weight"),
                &[cfg.max_position_embeddings, h],
                Init::Normal(std / 2.0),
            )?),
            PositionKind::Rope => None,
        };
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("{prefix}.layers.{i}");
            let target = |t: LoraTarget| lora.filter(|l| l.targets.contains(&t));
            let lin = |store: &mut ParamStore, name: &str, inp, out, s, t| {
                Linear::new(
                    store,
                    &format!("{p}.{name}"),
                    inp,
                    out,
                    cfg.bias,
                    s,
                    target(t),
                )
            };
            let attn_norm = Norm::new(store, &format!("{p}.attn_norm"), cfg)?;
            let q = lin(store, "attn.q", h, h, std, LoraTarget::Q)?;
            let k = lin(store, "attn.k", h, kv, std, LoraTarget::K)?;
            let v = lin(store, "attn.v", h, kv, std, LoraTarget::V)?;
            let o = lin(store, "attn.o", h, h, resid_std, LoraTarget::O)?;
            let mlp_norm = Norm::new(store, &format!("{p}.mlp_norm"), cfg)?;
            let inter = cfg.intermediate_size;
            let gate = match cfg.mlp {
                MlpKind::SwiGlu => Some(lin(store, "mlp.gate", h, inter, std, LoraTarget::Gate)?),
                MlpKind::Gelu => None,
            };
            let up = lin(store, "mlp.up", h, inter, std, LoraTarget::Up)?;
            let down = lin(store, "mlp.down", inter, h, resid_std, LoraTarget::Down)?;
            blocks.push(Block {
                attn_norm,
                q,
                k,
                v,
                o,
                mlp_norm,
                gate,
                up,
                down,
            });
        }
        let final_norm = Norm::new(store, &format!("{prefix}.final_norm"), cfg)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(store.create("lm_head.weight", &[cfg.vocab_size, h], Init::Normal(std))?)
        };
        let rope = match cfg.position {
            PositionKind::Rope => Some(rope_tables(cfg, &store.device)?),
            PositionKind::Learned => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            pos_embed,
            blocks,
            final_norm,
            lm_head,
            rope,
        })
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Hidden states after the final norm, `[B, T, H]` in the compute dtype.
    pub fn hidden(&self, ids: &Tensor, f: &Fwd, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        if offset + t > self.cfg.max_position_embeddings {
            bail!(
                "a sequence of {} tokens exceeds the model's context (max_position_embeddings = {})",
                offset + t,
                self.cfg.max_position_embeddings
            );
        }
        let ctx = &f.ctx;
        let h = self.cfg.hidden_size;
        let mut x = self
            .embed
            .to_dtype(ctx.dtype)?
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, h))?;
        let positions = match f.positions {
            Some(p) => p.clone(),
            None => Tensor::arange(offset as u32, (offset + t) as u32, ids.device())?
                .unsqueeze(0)?
                .broadcast_as((b, t))?
                .contiguous()?,
        };
        if let Some(pe) = &self.pos_embed {
            let pos = pe
                .to_dtype(ctx.dtype)?
                .index_select(&positions.flatten_all()?, 0)?
                .reshape((b, t, h))?;
            x = (x + pos)?;
        }
        let rope = match &self.rope {
            Some((cos, sin)) => {
                let flat = positions.flatten_all()?;
                let half = cos.dim(1)?;
                let pick = |tab: &Tensor| -> Result<Tensor> {
                    Ok(tab
                        .index_select(&flat, 0)?
                        .reshape((b, 1, t, half))?
                        .to_dtype(ctx.dtype)?)
                };
                Some((pick(cos)?, pick(sin)?))
            }
            None => None,
        };
        let drop_seed = |site: u64| ctx.dropout_seed.map(|s| splitmix64(s ^ site));
        let p_drop = self.cfg.dropout;
        if let Some(seed) = drop_seed(0xE) {
            x = dropout(&x, p_drop, seed)?;
        }
        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim(),
        );
        let scale = 1.0 / (hd as f64).sqrt();
        for (i, blk) in self.blocks.iter().enumerate() {
            let a_in = blk.attn_norm.forward(&x, ctx)?;
            let heads = |y: Tensor, n: usize| -> Result<Tensor> {
                Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let mut q = heads(blk.q.forward(&a_in, ctx)?, nh)?;
            let mut k = heads(blk.k.forward(&a_in, ctx)?, nkv)?;
            let v = heads(blk.v.forward(&a_in, ctx)?, nkv)?;
            if let Some((cos, sin)) = &rope {
                q = apply_rope(&q, cos, sin)?;
                k = apply_rope(&k, cos, sin)?;
            }
            let (k, v) = match cache.as_deref_mut() {
                Some(c) => c.append(i, &k, &v)?,
                None => (k, v),
            };
            let mask = AttnMask {
                causal_offset: Some(offset),
                key_valid: f.key_valid,
            };
            let y = attention(&q, &k, &v, &mask, scale, ctx.kernels.attention)?;
            let y = y.transpose(1, 2)?.reshape((b, t, h))?;
            let mut y = blk.o.forward(&y, ctx)?;
            if let Some(seed) = drop_seed(0x100 + 2 * i as u64) {
                y = dropout(&y, p_drop, seed)?;
            }
            x = (x + y)?;
            let m_in = blk.mlp_norm.forward(&x, ctx)?;
            let hmid = match &blk.gate {
                Some(g) => (silu(&g.forward(&m_in, ctx)?)? * blk.up.forward(&m_in, ctx)?)?,
                None => gelu(&blk.up.forward(&m_in, ctx)?)?,
            };
            let mut y = blk.down.forward(&hmid, ctx)?;
            if let Some(seed) = drop_seed(0x101 + 2 * i as u64) {
                y = dropout(&y, p_drop, seed)?;
            }
            x = (x + y)?;
        }
        self.final_norm.forward(&x, ctx)
    }

    /// `[B, T, H]` hidden -> `[B, T, V]` f32 logits.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let w = self.lm_head.as_ref().unwrap_or(&self.embed);
        let (b, t, h) = hidden.dims3()?;
        let w = w.to_dtype(hidden.dtype())?;
        Ok(hidden
            .reshape((b * t, h))?
            .matmul(&w.t()?)?
            .reshape((b, t, self.cfg.vocab_size))?
            .to_dtype(DType::F32)?)
    }

    pub fn forward(&self, ids: &Tensor, f: &Fwd, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.logits(&self.hidden(ids, f, cache)?)
    }
}

fn rope_tables(cfg: &ModelConfig, dev: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim() / 2;
    let p = cfg.max_position_embeddings;
    let mut cos = Vec::with_capacity(p * half);
    let mut sin = Vec::with_capacity(p * half);
    for pos in 0..p {
        for i in 0..half {
            let freq = 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim() as f64);
            let a = pos as f64 * freq;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (p, half), dev)?,
        Tensor::from_vec(sin, (p, half), dev)?,
    ))
}

/// Rotates the two halves of each head (the Llama / GPT-NeoX layout), differentiably.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Ok(Tensor::cat(&[r1, r2], D::Minus1)?)
}

fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(x.silu()?)
}

/// GPT-2's tanh approximation, composed of differentiable ops.
fn gelu(x: &Tensor) -> Result<Tensor> {
    let c = (2.0f64 / std::f64::consts::PI).sqrt();
    let inner = ((x + (x.powf(3.0)? * 0.044715)?)? * c)?;
    Ok(((x * 0.5)? * (inner.tanh()? + 1.0)?)?)
}
