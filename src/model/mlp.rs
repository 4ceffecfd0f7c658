//! The feed-forward half of a block: SwiGLU (`down(silu(gate x) * up x)`, Llama), GeGLU
//! (`down(gelu(gate x) * up x)`, Gemma) or GELU (`down(gelu(up x))`, GPT-2); GELU is the tanh
//! approximation throughout.

use anyhow::Result;
use candle_core::Tensor;

use super::linear::{Ctx, Linear};
use crate::config::{LoraConfig, LoraTarget};
use crate::config::{MlpKind, ModelConfig};
use crate::kernels::bias::BiasAct;
use crate::kernels::swiglu::{geglu, swiglu};
use crate::train::params::Scope;

pub struct Mlp {
    kind: MlpKind,
    gate: Option<Linear>,
    up: Linear,
    down: Linear,
}

impl Mlp {
    /// `gate` (SwiGLU and GeGLU), `up` and `down` in `scope`; `resid_std` is the init of `down`,
    /// which writes into the residual stream.
    pub fn load(
        mut scope: Scope,
        cfg: &ModelConfig,
        lora: Option<&LoraConfig>,
        std: f64,
        resid_std: f64,
    ) -> Result<Self> {
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let target = |t: LoraTarget| LoraConfig::on(lora, t);
        let gate = match cfg.mlp {
            MlpKind::SwiGlu | MlpKind::GeGlu => Some(Linear::load(
                scope.pp("gate"),
                h,
                inter,
                cfg.bias,
                std,
                target(LoraTarget::Gate),
            )?),
            MlpKind::Gelu => None,
        };
        let up = Linear::load(
            scope.pp("up"),
            h,
            inter,
            cfg.bias,
            std,
            target(LoraTarget::Up),
        )?;
        let down = Linear::load(
            scope.pp("down"),
            inter,
            h,
            cfg.bias,
            resid_std,
            target(LoraTarget::Down),
        )?;
        Ok(Self {
            kind: cfg.mlp,
            gate,
            up,
            down,
        })
    }

    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let hmid = match (&self.gate, self.kind) {
            (Some(g), MlpKind::GeGlu) => geglu(
                &g.forward(x, ctx)?,
                &self.up.forward(x, ctx)?,
                ctx.kernels.swiglu,
            )?,
            (Some(g), _) => swiglu(
                &g.forward(x, ctx)?,
                &self.up.forward(x, ctx)?,
                ctx.kernels.swiglu,
            )?,
            (None, _) => self.up.forward_act(x, ctx, BiasAct::GeluTanh)?,
        };
        self.down.forward(&hmid, ctx)
    }
}
