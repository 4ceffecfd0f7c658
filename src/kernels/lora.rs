//! LoRA linear layer: `y = x W^T + bias + s * (x A^T) B^T` with `W: [N, K]`, `A: [r, K]`,
//! `B: [N, r]`. The fused CUDA kernel folds the rank-r product into the base GEMM so that `y`
//! is written once; the reference is the unfused composite.

use candle_core::{Result, Tensor};

use super::registry::{warn_fallback, KernelChoice};

pub struct LoraArgs<'a> {
    pub w: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f64,
}

pub fn lora_linear(x: &Tensor, args: &LoraArgs, choice: KernelChoice) -> Result<Tensor> {
    if choice == KernelChoice::Custom {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let y = super::spans::timed(
                super::KernelOp::Lora,
                super::spans::Pass::Forward,
                x.device(),
                || super::cuda::lora::lora_linear(x, args),
            )?;
            if let Some(y) = y {
                return Ok(y);
            }
            warn_fallback(
                "lora",
                &format!(
                    "no fused kernel for {:?} rank {}",
                    x.dtype(),
                    args.a.dim(0)?
                ),
            );
            return reference_recorded(x, x, args);
        }
        if !x.device().is_cpu() || cfg!(feature = "cuda") {
            warn_fallback("lora", "the fused kernel runs on CUDA only");
        }
    }
    reference_recorded(x, x, args)
}

/// [`lora_linear_reference`] as one op of a block tape (`crate::tape`), its backward the
/// GEMMs written out: it keeps x, the adapter's input and its `[rows, r]` down projection.
pub fn reference_recorded(x: &Tensor, x_lora: &Tensor, args: &LoraArgs) -> Result<Tensor> {
    if !crate::tape::recording() {
        return lora_linear_reference(x, x_lora, args);
    }
    let (xa, xl) = (x.detach(), x_lora.detach());
    let (w, a, b) = (args.w.detach(), args.a.detach(), args.b.detach());
    let bias = args.bias.map(Tensor::detach);
    let scale = args.scale;
    let lin = super::gemm::reference;
    let mut base = lin(&xa, &w)?;
    if let Some(bb) = &bias {
        base = base.broadcast_add(bb)?;
    }
    let down = lin(&xl, &a)?;
    let y = (base + (lin(&down, &b)? * scale)?)?;
    let mut inputs = vec![x, x_lora, args.w, args.a, args.b];
    inputs.extend(args.bias);
    let inputs_len = inputs.len();
    crate::tape::record(&inputs, &y, move |g, want| {
        let grads = super::gemm::reference_grads;
        let want = |i: usize| want.get(i) == Some(&true);
        let (dx, dw) = grads(&g, &xa, &w, [want(0), want(2)])?;
        // Up the adapter: `up = down B^T` scaled, then `down = x_lora A^T`.
        let (g_down, db) = grads(&g, &down, &b, [want(1) || want(3), want(4)])?;
        let db = db.map(|d| d * scale).transpose()?;
        let (dxl, da) = match g_down {
            Some(gd) => grads(&(gd * scale)?, &xl, &a, [want(1), want(3)])?,
            None => (None, None),
        };
        let dbias = match want(5) {
            true => Some(g.reshape(((), w.dim(0)?))?.sum(0)?),
            false => None,
        };
        Ok([dx, dxl, dw, da, db, dbias]
            .into_iter()
            .take(inputs_len)
            .collect())
    })?;
    Ok(y)
}

/// `x_lora` is the input of the adapter branch: `x` itself, or `x` after LoRA dropout.
pub fn lora_linear_reference(x: &Tensor, x_lora: &Tensor, args: &LoraArgs) -> Result<Tensor> {
    let linear = |x: &Tensor, w: &Tensor, b: Option<&Tensor>| {
        super::gemm::linear(x, w, b, KernelChoice::Reference)
    };
    let base = linear(x, args.w, args.bias)?;
    let down = linear(x_lora, args.a, None)?;
    let up = (linear(&down, args.b, None)? * args.scale)?;
    base + up
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn zero_b_leaves_the_base_output_and_rank_one_adds_outer_product() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1.0f32, 2.0]], &dev).unwrap();
        let w = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0], [1.0, 1.0]], &dev).unwrap();
        let a = Tensor::new(&[[1.0f32, 1.0]], &dev).unwrap();
        let zero = Tensor::zeros((3, 1), candle_core::DType::F32, &dev).unwrap();
        let args = LoraArgs {
            w: &w,
            bias: None,
            a: &a,
            b: &zero,
            scale: 2.0,
        };
        let y = lora_linear(&x, &args, KernelChoice::Reference).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![1.0, 2.0, 3.0]]);
        // x A^T = 3; B = [1, 0, -1]; s = 2 -> adds [6, 0, -6].
        let b = Tensor::new(&[[1.0f32], [0.0], [-1.0]], &dev).unwrap();
        let bias = Tensor::new(&[0.5f32, 0.5, 0.5], &dev).unwrap();
        let args = LoraArgs {
            w: &w,
            bias: Some(&bias),
            a: &a,
            b: &b,
            scale: 2.0,
        };
        let y = lora_linear(&x, &args, KernelChoice::Reference).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![7.5, 2.5, -2.5]]);
    }
}
