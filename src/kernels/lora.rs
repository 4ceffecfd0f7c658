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

/// [`lora_linear_reference`] as one op of a block tape (`crate::tape`).
pub fn reference_recorded(x: &Tensor, x_lora: &Tensor, args: &LoraArgs) -> Result<Tensor> {
    let mut inputs = vec![x, x_lora, args.w, args.a, args.b];
    inputs.extend(args.bias);
    crate::tape::island(&inputs, |t| {
        let args = LoraArgs {
            w: &t[2],
            bias: t.get(5),
            a: &t[3],
            b: &t[4],
            scale: args.scale,
        };
        lora_linear_reference(&t[0], &t[1], &args)
    })
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
