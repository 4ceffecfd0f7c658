//! SwiGLU's gating, `y = silu(g) * u` with `silu(g) = g * sigmoid(g)`: Llama's MLP between
//! its gate and up projections and its down projection, computed in f32 whatever the input
//! dtype.
//!
//! The reference is candle's `silu` and `*` (two launches forward on a GPU, about ten
//! backward); [`fused`] is one custom op with both gradients written out, each pass one
//! launch: `kernels/swiglu.cu` on CUDA, the same maths in Rust on the CPU, tested against the
//! reference without a GPU. The backward writes `[dg | du]` into one buffer, of which the two
//! gradients are views.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType};

use super::host::slice;
use super::registry::{warn_fallback, KernelChoice};
use super::spans::{self, Pass};
use super::KernelOp;
use crate::tape;

type Result<T> = candle_core::Result<T>;

pub fn swiglu(g: &Tensor, u: &Tensor, choice: KernelChoice) -> Result<Tensor> {
    if choice == KernelChoice::Custom && g.device().is_cuda() {
        if matches!(g.dtype(), DType::F32 | DType::BF16 | DType::F16) && u.dtype() == g.dtype() {
            return fused(g, u);
        }
        let why = format!("no kernel for {:?} x {:?}", g.dtype(), u.dtype());
        warn_fallback("swiglu", &why);
    }
    tape::island(&[g, u], |a| reference(&a[0], &a[1]))
}

/// candle's composite, differentiable in both.
pub fn reference(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.silu()? * u
}

/// The fused op on any device: `g` and `u` of one shape and dtype, differentiable in both.
pub fn fused(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    spans::timed(KernelOp::SwiGlu, Pass::Forward, g.device(), || {
        if g.shape() != u.shape() || g.dtype() != u.dtype() {
            candle_core::bail!(
                "swiglu: gate {:?} {:?} and up {:?} {:?} differ",
                g.shape(),
                g.dtype(),
                u.shape(),
                u.dtype()
            );
        }
        let arg = |t: &Tensor| tape::arg(t).contiguous();
        tape::op2([g, u], [arg(g)?, arg(u)?], SwiGlu)
    })
}

/// The fused op's backward for a given `dy`: `(dg, du)`, what candle's autograd calls for
/// [`fused`], here without a graph (benches/train_ops.rs times it so). Both are views of one
/// `[2, ...]` buffer.
pub fn backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    if dy.shape() != g.shape() || u.shape() != g.shape() {
        candle_core::bail!("swiglu backward: dy {:?} for g {:?}", dy.dims(), g.dims());
    }
    let dy = dy.to_dtype(g.dtype())?.contiguous()?;
    let both = g
        .contiguous()?
        .apply_op3_no_bwd(&u.contiguous()?, &dy, &SwiGluBwd)?;
    Ok((both.get(0)?, both.get(1)?))
}

/// Overflow-safe in f32: `exp(-g)` is inf for very negative `g` (sigmoid 0) and 0 for very
/// positive `g` (sigmoid 1), never NaN.
fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + (-g).exp())
}

fn forward<T: WithDType>(g: &[T], u: &[T]) -> Vec<T> {
    g.iter()
        .zip(u)
        .map(|(g, u)| {
            let g = g.to_f64() as f32;
            T::from_f64((g * sigmoid(g) * u.to_f64() as f32) as f64)
        })
        .collect()
}

/// `[dg (n) | du (n)]`, the layout of the CUDA kernel's output.
fn cpu_backward<T: WithDType>(g: &[T], u: &[T], dy: &[T]) -> Vec<T> {
    let mut dg = Vec::with_capacity(2 * g.len());
    let mut du = Vec::with_capacity(g.len());
    for ((g, u), d) in g.iter().zip(u).zip(dy) {
        let (g, u, d) = (g.to_f64() as f32, u.to_f64() as f32, d.to_f64() as f32);
        let s = sigmoid(g);
        dg.push(T::from_f64((d * u * s * (1.0 + g * (1.0 - s))) as f64));
        du.push(T::from_f64((d * g * s) as f64));
    }
    dg.append(&mut du);
    dg
}

type CpuArg<'a> = (&'a CpuStorage, &'a Layout);

fn cpu_run(g: CpuArg, u: CpuArg, dy: Option<CpuArg>) -> Result<CpuStorage> {
    macro_rules! go {
        ($t:ty, $v:ident) => {{
            let (g, u) = (slice::<$t>(g.0, g.1)?, slice::<$t>(u.0, u.1)?);
            CpuStorage::$v(match dy {
                Some((s, l)) => cpu_backward(g, u, slice::<$t>(s, l)?),
                None => forward(g, u),
            })
        }};
    }
    Ok(match g.0.dtype() {
        DType::F32 => go!(f32, F32),
        DType::BF16 => go!(half::bf16, BF16),
        DType::F16 => go!(half::f16, F16),
        dt => candle_core::bail!("swiglu: unsupported dtype {dt:?}"),
    })
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "temper-swiglu"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        su: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((cpu_run((sg, lg), (su, lu), None)?, lg.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
        su: &candle_core::CudaStorage,
        lu: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = super::cuda::swiglu::run((sg, lg), (su, lu), None)?;
        Ok((y, lg.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        spans::timed(KernelOp::SwiGlu, Pass::Backward, g.device(), || {
            let (dg, du) = backward(g, u, grad)?;
            Ok((Some(dg), Some(du)))
        })
    }
}

/// Backward of [`SwiGlu`]: `(g, u, dy) -> [dg, du]`, shape `[2, ...g.shape]`.
struct SwiGluBwd;

impl SwiGluBwd {
    fn shape(l: &Layout) -> Shape {
        let mut dims = vec![2];
        dims.extend_from_slice(l.dims());
        Shape::from(dims)
    }
}

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "temper-swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        su: &CpuStorage,
        lu: &Layout,
        sd: &CpuStorage,
        ld: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let both = cpu_run((sg, lg), (su, lu), Some((sd, ld)))?;
        Ok((both, Self::shape(lg)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
        su: &candle_core::CudaStorage,
        lu: &Layout,
        sd: &candle_core::CudaStorage,
        ld: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let both = super::cuda::swiglu::run((sg, lg), (su, lu), Some((sd, ld)))?;
        Ok((both, Self::shape(lg)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::host::testing::assert_close;
    use super::*;
    use candle_core::{Device, Var};

    /// The fused op and both its gradients equal the reference composite's, in f32 and bf16,
    /// from g = -30 to 30 (where a naive exp would overflow) and on a 2-D shape.
    #[test]
    fn fused_op_matches_the_reference_and_its_gradients() {
        let n = 241;
        let gs: Vec<f32> = (0..n).map(|i| (i as f32 - 120.0) * 0.25).collect();
        let us: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.3).collect();
        let ds: Vec<f32> = (0..n).map(|i| ((i * 11 % 9) as f32 - 4.0) * 0.5).collect();
        for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 2e-2)] {
            let t = |v: &[f32]| {
                Tensor::from_slice(v, (1, n), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let g = Var::from_tensor(&t(&gs)).unwrap();
            let u = Var::from_tensor(&t(&us)).unwrap();
            let dy = t(&ds);
            let run = |f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>| {
                let y = f(g.as_tensor(), u.as_tensor()).unwrap();
                let gr = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
                let grad = |v: &Var| gr.get(v.as_tensor()).unwrap().clone();
                (y, grad(&g), grad(&u))
            };
            let ours = run(&fused);
            let refs = run(&reference);
            for (what, a, b) in [
                ("y", &ours.0, &refs.0),
                ("dg", &ours.1, &refs.1),
                ("du", &ours.2, &refs.2),
            ] {
                assert_close(&format!("{dtype:?} {what}"), a, b, tol);
            }
        }
    }

    /// Far past where exp overflows in f32 the op and its gradients stay finite and take
    /// their limits: silu(g) -> 0 below, -> g above.
    #[test]
    fn extreme_gates_give_no_nan() {
        let g = Var::new(&[-1e4f32, -100.0, 100.0, 1e4], &Device::Cpu).unwrap();
        let u = Var::new(&[2f32, 2.0, 2.0, 2.0], &Device::Cpu).unwrap();
        let y = fused(g.as_tensor(), u.as_tensor()).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let v = |t: &Tensor| t.to_vec1::<f32>().unwrap();
        assert_eq!(v(&y), [0.0, 0.0, 200.0, 2e4]);
        assert_eq!(v(grads.get(g.as_tensor()).unwrap()), [0.0, 0.0, 2.0, 2.0]);
        assert_eq!(v(grads.get(u.as_tensor()).unwrap()), [0.0, 0.0, 100.0, 1e4]);
    }
}
