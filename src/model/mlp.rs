//! The feed-forward half of a block: SwiGLU (`down(silu(gate x) * up x)`, Llama), GeGLU
//! (`down(gelu(gate x) * up x)`, Gemma) or GELU (`down(gelu(up x))`, GPT-2); GELU is the tanh
//! approximation throughout.

use anyhow::Result;
use candle_core::Tensor;

use super::linear::{Ctx, Linear};
use crate::config::{LoraConfig, LoraTarget};
use crate::config::{MlpKind, ModelConfig};
use crate::kernels::bias::BiasAct;
use crate::kernels::swiglu::swiglu;
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
            (Some(g), MlpKind::GeGlu) => geglu(&g.forward(x, ctx)?, &self.up.forward(x, ctx)?)?,
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

/// `gelu(gate) * up`, GELU's tanh approximation computed in f32 and the product rounded to
/// the inputs' dtype, as transformers' `gelu_pytorch_tanh` in bf16 upcasts inside the
/// activation. The reference composite, one op on the tape: no kernel of ours fuses it yet.
fn geglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    crate::tape::island(&[gate, up], |a| {
        let dtype = a[0].dtype();
        let act = a[0]
            .to_dtype(candle_core::DType::F32)?
            .gelu()?
            .to_dtype(dtype)?;
        act * &a[1]
    })
}
