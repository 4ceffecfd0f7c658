//! Gated activations between an MLP's gate and up projections and its down projection,
//! `y = a(g) * u`, computed in f32 whatever the input dtype: SwiGLU (`a = silu`, `g *
//! sigmoid(g)`; Llama, Qwen, Mistral) and GeGLU (`a` = GELU's tanh approximation; Gemma).
//!
//! The references are candle's composites (two launches forward on a GPU, about ten
//! backward); [`fused_gate`] is one custom op with both gradients written out, each pass one
//! launch: `kernels/swiglu.cu` on CUDA, the same maths in Rust on the CPU, tested against the
//! reference without a GPU. The backward writes `[dg | du]` into one buffer, of which the two
//! gradients are views. `[train] kernels` names both `swiglu`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType};

use super::host::slice;
use super::registry::{warn_fallback, KernelChoice};
use super::spans::{self, Pass};
use super::KernelOp;
use crate::tape;

type Result<T> = candle_core::Result<T>;

/// The gate's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// `g * sigmoid(g)`: SwiGLU.
    Silu,
    /// GELU's tanh approximation: GeGLU.
    GeluTanh,
}

impl Gate {
    /// The kernels' name prefix, and the op's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Gate::Silu => "swiglu",
            Gate::GeluTanh => "geglu",
        }
    }

    /// `a(g)` in f32.
    fn act(self, g: f32) -> f32 {
        match self {
            Gate::Silu => g * sigmoid(g),
            Gate::GeluTanh => 0.5 * g * (1.0 + gelu_inner(g).tanh()),
        }
    }

    /// `a'(g)` in f32.
    fn slope(self, g: f32) -> f32 {
        match self {
            Gate::Silu => {
                let s = sigmoid(g);
                s * (1.0 + g * (1.0 - s))
            }
            Gate::GeluTanh => {
                let t = gelu_inner(g).tanh();
                0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * g * g)
            }
        }
    }
}

const GELU_C: f32 = 0.797_884_6; // sqrt(2 / pi)
const GELU_A: f32 = 0.044715;

/// `c (g + a g^3)`, the tanh GELU's argument.
fn gelu_inner(g: f32) -> f32 {
    GELU_C * (g + GELU_A * g * g * g)
}

pub fn swiglu(g: &Tensor, u: &Tensor, choice: KernelChoice) -> Result<Tensor> {
    gated(g, u, Gate::Silu, choice)
}

pub fn geglu(g: &Tensor, u: &Tensor, choice: KernelChoice) -> Result<Tensor> {
    gated(g, u, Gate::GeluTanh, choice)
}

fn gated(g: &Tensor, u: &Tensor, gate: Gate, choice: KernelChoice) -> Result<Tensor> {
    if choice == KernelChoice::Custom && g.device().is_cuda() {
        if matches!(g.dtype(), DType::F32 | DType::BF16 | DType::F16) && u.dtype() == g.dtype() {
            return fused_gate(g, u, gate);
        }
        let why = format!("no kernel for {:?} x {:?}", g.dtype(), u.dtype());
        warn_fallback(gate.name(), &why);
    }
    tape::island(&[g, u], |a| match gate {
        Gate::Silu => reference(&a[0], &a[1]),
        Gate::GeluTanh => geglu_reference(&a[0], &a[1]),
    })
}

/// candle's SwiGLU composite, differentiable in both.
pub fn reference(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.silu()? * u
}

/// candle's GeGLU composite: GELU's tanh approximation computed in f32 and the product rounded
/// to the inputs' dtype, as transformers' `gelu_pytorch_tanh` in bf16 upcasts inside the
/// activation.
pub fn geglu_reference(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let act = g.to_dtype(DType::F32)?.gelu()?.to_dtype(g.dtype())?;
    act * u
}

/// The fused SwiGLU op on any device (see [`fused_gate`]).
pub fn fused(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    fused_gate(g, u, Gate::Silu)
}

/// The fused op on any device: `g` and `u` of one shape and dtype, differentiable in both.
pub fn fused_gate(g: &Tensor, u: &Tensor, gate: Gate) -> Result<Tensor> {
    spans::timed(KernelOp::SwiGlu, Pass::Forward, g.device(), || {
        if g.shape() != u.shape() || g.dtype() != u.dtype() {
            candle_core::bail!(
                "{}: gate {:?} {:?} and up {:?} {:?} differ",
                gate.name(),
                g.shape(),
                g.dtype(),
                u.shape(),
                u.dtype()
            );
        }
        let arg = |t: &Tensor| tape::arg(t).contiguous();
        tape::op2([g, u], [arg(g)?, arg(u)?], Gated(gate))
    })
}

/// The fused SwiGLU op's backward for a given `dy` (see [`backward_gate`]).
pub fn backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    backward_gate(g, u, dy, Gate::Silu)
}

/// The fused op's backward for a given `dy`: `(dg, du)`, what candle's autograd calls for
/// [`fused_gate`], here without a graph (benches/train_ops.rs times it so). Both are views of
/// one `[2, ...]` buffer.
pub fn backward_gate(g: &Tensor, u: &Tensor, dy: &Tensor, gate: Gate) -> Result<(Tensor, Tensor)> {
    if dy.shape() != g.shape() || u.shape() != g.shape() {
        candle_core::bail!(
            "{} backward: dy {:?} for g {:?}",
            gate.name(),
            dy.dims(),
            g.dims()
        );
    }
    let dy = dy.to_dtype(g.dtype())?.contiguous()?;
    let both = g
        .contiguous()?
        .apply_op3_no_bwd(&u.contiguous()?, &dy, &GatedBwd(gate))?;
    Ok((both.get(0)?, both.get(1)?))
}

/// Overflow-safe in f32: `exp(-g)` is inf for very negative `g` (sigmoid 0) and 0 for very
/// positive `g` (sigmoid 1), never NaN.
fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + (-g).exp())
}

fn forward<T: WithDType>(g: &[T], u: &[T], gate: Gate) -> Vec<T> {
    g.iter()
        .zip(u)
        .map(|(g, u)| {
            let g = g.to_f64() as f32;
            T::from_f64((gate.act(g) * u.to_f64() as f32) as f64)
        })
        .collect()
}

/// `[dg (n) | du (n)]`, the layout of the CUDA kernel's output.
fn cpu_backward<T: WithDType>(g: &[T], u: &[T], dy: &[T], gate: Gate) -> Vec<T> {
    let mut dg = Vec::with_capacity(2 * g.len());
    let mut du = Vec::with_capacity(g.len());
    for ((g, u), d) in g.iter().zip(u).zip(dy) {
        let (g, u, d) = (g.to_f64() as f32, u.to_f64() as f32, d.to_f64() as f32);
        dg.push(T::from_f64((d * u * gate.slope(g)) as f64));
        du.push(T::from_f64((d * gate.act(g)) as f64));
    }
    dg.append(&mut du);
    dg
}

type CpuArg<'a> = (&'a CpuStorage, &'a Layout);

fn cpu_run(g: CpuArg, u: CpuArg, dy: Option<CpuArg>, gate: Gate) -> Result<CpuStorage> {
    macro_rules! go {
        ($t:ty, $v:ident) => {{
            let (g, u) = (slice::<$t>(g.0, g.1)?, slice::<$t>(u.0, u.1)?);
            CpuStorage::$v(match dy {
                Some((s, l)) => cpu_backward(g, u, slice::<$t>(s, l)?, gate),
                None => forward(g, u, gate),
            })
        }};
    }
    Ok(match g.0.dtype() {
        DType::F32 => go!(f32, F32),
        DType::BF16 => go!(half::bf16, BF16),
        DType::F16 => go!(half::f16, F16),
        dt => candle_core::bail!("{}: unsupported dtype {dt:?}", gate.name()),
    })
}

struct Gated(Gate);

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        match self.0 {
            Gate::Silu => "temper-swiglu",
            Gate::GeluTanh => "temper-geglu",
        }
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        su: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((
            cpu_run((sg, lg), (su, lu), None, self.0)?,
            lg.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
        su: &candle_core::CudaStorage,
        lu: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = super::cuda::swiglu::run((sg, lg), (su, lu), None, self.0)?;
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
            let (dg, du) = backward_gate(g, u, grad, self.0)?;
            Ok((Some(dg), Some(du)))
        })
    }
}

/// Backward of [`Gated`]: `(g, u, dy) -> [dg, du]`, shape `[2, ...g.shape]`.
struct GatedBwd(Gate);

impl GatedBwd {
    fn shape(l: &Layout) -> Shape {
        let mut dims = vec![2];
        dims.extend_from_slice(l.dims());
        Shape::from(dims)
    }
}

impl CustomOp3 for GatedBwd {
    fn name(&self) -> &'static str {
        match self.0 {
            Gate::Silu => "temper-swiglu-bwd",
            Gate::GeluTanh => "temper-geglu-bwd",
        }
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
        let both = cpu_run((sg, lg), (su, lu), Some((sd, ld)), self.0)?;
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
        let both = super::cuda::swiglu::run((sg, lg), (su, lu), Some((sd, ld)), self.0)?;
        Ok((both, Self::shape(lg)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::host::testing::assert_close;
    use super::*;
    use candle_core::{Device, Var};

    /// The fused op and both its gradients equal the reference composite's, SwiGLU's and
    /// GeGLU's, in f32 and bf16, from g = -30 to 30 (where a naive exp would overflow) and on
    /// a 2-D shape.
    #[test]
    fn fused_op_matches_the_reference_and_its_gradients() {
        for gate in [Gate::Silu, Gate::GeluTanh] {
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
                let ours = run(&|g, u| fused_gate(g, u, gate));
                let refs = match gate {
                    Gate::Silu => run(&reference),
                    Gate::GeluTanh => run(&geglu_reference),
                };
                for (what, a, b) in [
                    ("y", &ours.0, &refs.0),
                    ("dg", &ours.1, &refs.1),
                    ("du", &ours.2, &refs.2),
                ] {
                    assert_close(&format!("{gate:?} {dtype:?} {what}"), a, b, tol);
                }
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
