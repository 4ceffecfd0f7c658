//! The feed-forward half of a block: SwiGLU (`down(silu(gate x) * up x)`, Llama) or GELU
//! (`down(gelu(up x))`, GPT-2's tanh approximation).

use anyhow::Result;
use candle_core::Tensor;

use super::linear::{Ctx, Linear};
use crate::config::{LoraConfig, LoraTarget};
use crate::config::{MlpKind, ModelConfig};
use crate::kernels::bias::BiasAct;
use crate::kernels::swiglu::swiglu;
use crate::train::params::Scope;

pub struct Mlp {
    gate: Option<Linear>,
    up: Linear,
    down: Linear,
}

impl Mlp {
    /// `gate` (SwiGLU only), `up` and `down` in `scope`; `resid_std` is the init of `down`,
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
            MlpKind::SwiGlu => Some(Linear::load(
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
        Ok(Self { gate, up, down })
    }

    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let hmid = match &self.gate {
            Some(g) => swiglu(
                &g.forward(x, ctx)?,
                &self.up.forward(x, ctx)?,
                ctx.kernels.swiglu,
            )?,
            None => self.up.forward_act(x, ctx, BiasAct::GeluTanh)?,
        };
        self.down.forward(&hmid, ctx)
    }
}
