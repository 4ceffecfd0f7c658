//! Inverted dropout, `y = x · keep / (1 − p)`, with a counter-based mask: element `i` (in
//! row-major order) is kept when the top 24 bits of `splitmix64(seed + i · golden)` are at
//! least `p · 2^24`. Each mask bit is a function of `(seed, i)` alone, so the CPU and the GPU
//! draw the same mask, and a run resumed from a checkpoint draws the masks it would have.
//!
//! The reference makes the mask on the host (`[...]` values of 0 and `1 / (1 − p)` in the
//! input's dtype), copies it to the device and multiplies: per dropout site and step, as many
//! host random numbers as activations, and a mask kept for the backward. [`fused`] is one
//! custom op whose forward and backward are the same pass over `x` and over `dy`, computing
//! each bit where it is used (`kernels/dropout.cu`; on the CPU the same maths in Rust).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, WithDType};

use super::host::slice;
use super::registry::{warn_fallback, KernelChoice};
use super::spans::{self, Pass};
use super::KernelOp;
use crate::tape;
use crate::train::rng::splitmix64;

type Result<T> = candle_core::Result<T>;

/// `x` with dropout at rate `p` under `seed`; `p == 0` is the identity.
pub fn dropout(x: &Tensor, p: f64, seed: u64, choice: KernelChoice) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let mask = Mask::new(p, seed)?;
    if choice == KernelChoice::Custom && x.device().is_cuda() {
        if matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            return fused(x, mask);
        }
        warn_fallback("dropout", &format!("no kernel for {:?}", x.dtype()));
    }
    tape::island(&[x], |a| reference(&a[0], &mask))
}

/// Which elements a dropout site keeps, and the scale of the kept ones.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mask {
    pub seed: u64,
    /// Keep element `i` when `hash(i) >> 40 >= threshold`: `p · 2^24`, rounded.
    pub threshold: u32,
    /// `1 / (1 − p)`.
    scale: f64,
}

impl Mask {
    pub fn new(p: f64, seed: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("dropout: the rate must be in [0, 1), got {p}");
        }
        Ok(Self {
            seed,
            threshold: (p * (1u64 << 24) as f64).round() as u32,
            scale: 1.0 / (1.0 - p),
        })
    }

    /// Whether element `i` is kept.
    pub fn keeps(&self, i: u64) -> bool {
        let h = splitmix64(
            self.seed
                .wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        );
        (h >> 40) as u32 >= self.threshold
    }

    /// The scale as the dtype `T` holds it, in f32: what a kept element is multiplied by, in
    /// the kernel and in the reference's mask alike.
    pub fn scale_in<T: WithDType>(&self) -> f32 {
        T::from_f64(self.scale).to_f64() as f32
    }

    /// `x` with the mask applied, in f32 arithmetic rounded to `T` once.
    fn apply<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let s = self.scale_in::<T>();
        x.iter()
            .enumerate()
            .map(|(i, v)| match self.keeps(i as u64) {
                true => T::from_f64((v.to_f64() as f32 * s) as f64),
                false => T::zero(),
            })
            .collect()
    }
}

/// candle's composite: the mask made on the host, moved to `x`'s device, multiplied in.
pub fn reference(x: &Tensor, mask: &Mask) -> Result<Tensor> {
    let ones = vec![1f32; x.elem_count()];
    let m = Tensor::from_vec(mask.apply(&ones), x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&m)
}

/// The fused op on any device, differentiable in `x`.
pub fn fused(x: &Tensor, mask: Mask) -> Result<Tensor> {
    spans::timed(KernelOp::Dropout, Pass::Forward, x.device(), || {
        let arg = tape::arg(x).contiguous()?;
        let dtype = arg.dtype();
        // On the tape the backward keeps neither the input nor the output: it is the mask
        // over the gradient.
        tape::op1_with(x, arg, Dropout(mask), move |op, g| op.back(&g, dtype))
    })
}

struct Dropout(Mask);

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "temper-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s.dtype() {
            DType::F32 => CpuStorage::F32(self.0.apply(slice::<f32>(s, l)?)),
            DType::BF16 => CpuStorage::BF16(self.0.apply(slice::<half::bf16>(s, l)?)),
            DType::F16 => CpuStorage::F16(self.0.apply(slice::<half::f16>(s, l)?)),
            dt => candle_core::bail!("dropout: unsupported dtype {dt:?}"),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            super::cuda::dropout::apply(s, l, &self.0)?,
            l.shape().clone(),
        ))
    }

    /// dL/dx = dL/dy on the kept elements, times the scale: the forward's pass over dy.
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        self.back(grad, x.dtype()).map(Some)
    }
}

impl Dropout {
    /// The gradient of an input of `dtype`: the same mask over the output's gradient.
    fn back(&self, grad: &Tensor, dtype: DType) -> Result<Tensor> {
        spans::timed(KernelOp::Dropout, Pass::Backward, grad.device(), || {
            let g = grad.to_dtype(dtype)?.contiguous()?;
            g.apply_op1_no_bwd(self)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::host::testing::values;
    use candle_core::{Device, Var};

    /// The fused op (its CPU implementation) equals the reference exactly, forward and
    /// backward, in every dtype, on a strided input.
    #[test]
    fn fused_op_is_the_reference_exactly() {
        let mask = Mask::new(0.3, 0xD0).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let base = Tensor::arange(0f32, 7.0 * 33.0, &Device::Cpu)
                .and_then(|t| t.reshape((7, 33)))
                .and_then(|t| t.affine(0.01, -1.0))
                .and_then(|t| t.to_dtype(dtype))
                .unwrap();
            let x = Var::from_tensor(&base.t().unwrap()).unwrap();
            let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
                let y = f(x.as_tensor()).unwrap();
                let w = y.ones_like().unwrap().affine(0.5, 0.25).unwrap();
                let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                (values(&y), values(g.get(x.as_tensor()).unwrap()))
            };
            let ours = run(&|x| fused(x, mask));
            let refs = run(&|x| reference(x, &mask));
            assert_eq!(ours.0, refs.0, "{dtype:?} forward");
            assert_eq!(ours.1, refs.1, "{dtype:?} backward");
        }
    }

    /// About a fraction p is dropped, the kept ones are scaled by 1 / (1 - p), a seed gives
    /// the same mask every time and another seed another mask.
    #[test]
    fn masks_drop_p_and_depend_on_the_seed_alone() {
        let n = 200_000;
        let x = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
        let y = values(&dropout(&x, 0.25, 7, KernelChoice::Custom).unwrap());
        let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
        assert!((dropped - 0.25).abs() < 0.005, "dropped {dropped}");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        let again = values(&dropout(&x, 0.25, 7, KernelChoice::Custom).unwrap());
        assert_eq!(y, again);
        let other = values(&dropout(&x, 0.25, 8, KernelChoice::Custom).unwrap());
        let same = y.iter().zip(&other).filter(|(a, b)| a == b).count() as f64 / n as f64;
        // Two independent masks agree where both keep or both drop: 0.75² + 0.25².
        assert!((same - 0.625).abs() < 0.01, "agreement {same}");
        assert_eq!(
            values(&dropout(&x, 0.0, 7, KernelChoice::Custom).unwrap()),
            values(&x)
        );
        assert!(dropout(&x, 1.0, 7, KernelChoice::Custom).is_err());
    }
}
