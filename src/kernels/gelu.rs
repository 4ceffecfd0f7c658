//! GELU with GPT-2's tanh approximation, `y = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`,
//! computed in f32 whatever the input dtype.
//!
//! The reference composes candle's elementwise ops (eight launches forward on a GPU, more
//! backward); [`fused`] is one custom op with its derivative written out: `kernels/gelu.cu`
//! on CUDA, the same maths in Rust on the CPU, tested against the reference without a GPU.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, WithDType};

use super::host::slice;
use super::registry::{warn_fallback, KernelChoice};
use super::spans::{self, Pass};
use super::KernelOp;
use crate::tape;

type Result<T> = candle_core::Result<T>;

const C: f32 = 0.797_884_6; // sqrt(2 / pi)
const A: f32 = 0.044715;

pub fn gelu(x: &Tensor, choice: KernelChoice) -> Result<Tensor> {
    if choice == KernelChoice::Custom && x.device().is_cuda() {
        if matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            return fused(x);
        }
        warn_fallback("gelu", &format!("no kernel for {:?}", x.dtype()));
    }
    tape::island(&[x], |a| reference(&a[0]))
}

/// candle's composite, differentiable.
pub fn reference(x: &Tensor) -> Result<Tensor> {
    let c = (2.0f64 / std::f64::consts::PI).sqrt();
    let inner = ((x + (x.powf(3.0)? * 0.044715)?)? * c)?;
    (x * 0.5)? * (inner.tanh()? + 1.0)?
}

/// The fused op on any device, differentiable.
pub fn fused(x: &Tensor) -> Result<Tensor> {
    spans::timed(KernelOp::Gelu, Pass::Forward, x.device(), || {
        tape::op1(x, tape::arg(x).contiguous()?, Gelu)
    })
}

/// The fused op's backward for a given `dy`: `dx = dy * gelu'(x)`, what candle's autograd
/// calls for [`fused`], here without a graph (benches/train_ops.rs times it so).
pub fn backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    if dy.shape() != x.shape() {
        candle_core::bail!("gelu backward: dy {:?} for x {:?}", dy.dims(), x.dims());
    }
    let g = dy.to_dtype(x.dtype())?.contiguous()?;
    x.contiguous()?.apply_op2_no_bwd(&g, &GeluBwd)
}

/// GELU at `v`, in f32 (shared with the fused bias + GELU of `bias.rs`).
pub(crate) fn value(v: f32) -> f32 {
    0.5 * v * (1.0 + (C * (v + A * v * v * v)).tanh())
}

/// GELU's derivative at `v`, in f32.
pub(crate) fn slope(v: f32) -> f32 {
    let t = (C * (v + A * v * v * v)).tanh();
    0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * C * (1.0 + 3.0 * A * v * v)
}

fn map<T: WithDType>(x: &[T], dy: Option<&[T]>) -> Vec<T> {
    let f = |v: &T| v.to_f64() as f32;
    match dy {
        None => x.iter().map(|v| T::from_f64(value(f(v)) as f64)).collect(),
        Some(dy) => x
            .iter()
            .zip(dy)
            .map(|(v, g)| T::from_f64((f(g) * slope(f(v))) as f64))
            .collect(),
    }
}

fn cpu_run(x: (&CpuStorage, &Layout), dy: Option<(&CpuStorage, &Layout)>) -> Result<CpuStorage> {
    macro_rules! go {
        ($t:ty, $v:ident) => {{
            let g = match dy {
                Some((s, l)) => Some(slice::<$t>(s, l)?),
                None => None,
            };
            CpuStorage::$v(map(slice::<$t>(x.0, x.1)?, g))
        }};
    }
    Ok(match x.0.dtype() {
        DType::F32 => go!(f32, F32),
        DType::BF16 => go!(half::bf16, BF16),
        DType::F16 => go!(half::f16, F16),
        dt => candle_core::bail!("gelu: unsupported dtype {dt:?}"),
    })
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "temper-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((cpu_run((s, l), None)?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((super::cuda::gelu::run((s, l), None)?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        spans::timed(KernelOp::Gelu, Pass::Backward, x.device(), || {
            backward(x, grad).map(Some)
        })
    }
}

/// Backward of [`Gelu`]: `(x, dy) -> dy * gelu'(x)`.
struct GeluBwd;

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "temper-gelu-bwd"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((cpu_run((s, l), Some((sg, lg)))?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            super::cuda::gelu::run((s, l), Some((sg, lg)))?,
            l.shape().clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::host::testing::assert_close;
    use super::*;
    use candle_core::{Device, Var};

    /// The fused op and its gradient equal the reference composite's, in f32 and bf16, over
    /// both tails of the curve.
    #[test]
    fn fused_op_matches_the_reference_and_its_gradient() {
        let xs: Vec<f32> = (0..301).map(|i| (i as f32 - 150.0) * 0.05).collect();
        let gs: Vec<f32> = (0..301)
            .map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.5)
            .collect();
        for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 2e-2)] {
            let x = Var::from_tensor(
                &Tensor::new(xs.as_slice(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let g = Tensor::new(gs.as_slice(), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
                let y = f(x.as_tensor()).unwrap();
                let gr = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                (y, gr.get(x.as_tensor()).unwrap().clone())
            };
            let (yf, df) = run(&fused);
            let (yr, dr) = run(&reference);
            for (what, a, b) in [("y", &yf, &yr), ("dx", &df, &dr)] {
                assert_close(&format!("{dtype:?} {what}"), a, b, tol);
            }
        }
    }

    /// The direct backward is the gradient autograd gives (the same op, without a graph),
    /// with autograd seeded through `y * dy` as benches/train_ops.rs drives the reference.
    #[test]
    fn direct_backward_is_autograds_gradient() {
        let dev = Device::Cpu;
        let x: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.3).collect();
        let dy: Vec<f32> = (0..37).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.4).collect();
        let x = Var::from_tensor(&Tensor::new(x.as_slice(), &dev).unwrap()).unwrap();
        let dy = Tensor::new(dy.as_slice(), &dev).unwrap();
        let y = fused(x.as_tensor()).unwrap();
        let grads = (&y * &dy).unwrap().backward().unwrap();
        let auto = grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let direct = backward(x.as_tensor(), &dy)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(direct, auto);
    }
}
