//! A linear layer's bias and the activation after it: `act(y + b)` over the last dimension,
//! `y` the GEMM's output in the compute dtype, `b` the f32 master bias (no cast either way).
//!
//! The reference is candle's broadcast add (and the GELU composite): forward a broadcast
//! kernel, backward a generic reduction over the rows for the bias gradient. [`fused`] is one
//! custom op: one pass forward; backward one pass that writes `dL/dy` (for GELU) and sums the
//! bias gradient per column in a fixed order (per-group partials, then one reduction), then
//! a reduction of the partials: `kernels/bias.cu` on CUDA, the same maths in Rust on the
//! CPU, tested against the reference without a GPU.

use std::sync::{Mutex, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor, WithDType, D,
};

use super::gelu;
use super::host::{rows_cols, slice};
use super::registry::{warn_fallback, KernelChoice};
use super::spans::{self, Pass};
use super::KernelOp;
use crate::tape;

type Result<T> = candle_core::Result<T>;

/// What follows the bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BiasAct {
    Identity,
    /// GPT-2's tanh GELU (as in [`gelu`]).
    GeluTanh,
}

/// Whether [`fused`] serves `y` under `choice`: our kernel runs on CUDA; on the CPU the
/// reference keeps CPU training's numbers as they were.
pub fn fuses(y: &Tensor, choice: KernelChoice) -> bool {
    if choice != KernelChoice::Custom || !y.device().is_cuda() {
        return false;
    }
    let ok = matches!(y.dtype(), DType::F32 | DType::BF16 | DType::F16);
    if !ok {
        warn_fallback("bias", &format!("no kernel for {:?}", y.dtype()));
    }
    ok
}

/// candle's composite, differentiable in both: the bias cast to `y`'s dtype and added.
pub fn reference(y: &Tensor, b: &Tensor, act: BiasAct) -> Result<Tensor> {
    let z = y.broadcast_add(&b.to_dtype(y.dtype())?)?;
    match act {
        BiasAct::Identity => Ok(z),
        BiasAct::GeluTanh => gelu::reference(&z),
    }
}

/// The fused op on any device: `y [..., C]`, `b [C]` (cast to f32 if it is not).
pub fn fused(y: &Tensor, b: &Tensor, act: BiasAct) -> Result<Tensor> {
    spans::timed(KernelOp::Bias, Pass::Forward, y.device(), || {
        let c = y.dim(D::Minus1)?;
        if b.dims() != [c] {
            candle_core::bail!("bias: expected a bias of [{c}], got {:?}", b.dims());
        }
        let (ya, ba) = (tape::arg(y), tape::arg(b));
        tape::op2(
            [y, b],
            [ya.contiguous()?, ba.to_dtype(DType::F32)?.contiguous()?],
            Bias { act },
        )
    })
}

struct Bias {
    act: BiasAct,
}

fn activate(act: BiasAct, v: f32) -> f32 {
    match act {
        BiasAct::Identity => v,
        BiasAct::GeluTanh => gelu::value(v),
    }
}

fn cpu_forward<T: WithDType>(y: &[T], b: &[f32], act: BiasAct) -> Vec<T> {
    let cols = b.len().max(1);
    y.chunks(cols)
        .flat_map(|row| {
            row.iter()
                .zip(b)
                .map(|(v, bc)| T::from_f64(activate(act, v.to_f64() as f32 + bc) as f64))
        })
        .collect()
}

/// `(dL/dy, db)`: `dL/dy` only for GELU; `db` summed over rows in order, from the unrounded
/// `dL/dy`, as the kernel does.
fn cpu_backward<T: WithDType>(
    y: &[T],
    b: &[f32],
    dy: &[T],
    act: BiasAct,
) -> (Option<Vec<T>>, Vec<f32>) {
    let cols = b.len();
    let mut db = vec![0f32; cols];
    let mut dz = (act == BiasAct::GeluTanh).then(|| Vec::with_capacity(y.len()));
    if cols == 0 {
        return (dz, db);
    }
    for (yr, gr) in y.chunks(cols).zip(dy.chunks(cols)) {
        for c in 0..cols {
            let mut d = gr[c].to_f64() as f32;
            if act == BiasAct::GeluTanh {
                d *= gelu::slope(yr[c].to_f64() as f32 + b[c]);
            }
            if let Some(dz) = dz.as_mut() {
                dz.push(T::from_f64(d as f64));
            }
            db[c] += d;
        }
    }
    (dz, db)
}

impl CustomOp2 for Bias {
    fn name(&self) -> &'static str {
        "temper-bias"
    }

    fn cpu_fwd(
        &self,
        sy: &CpuStorage,
        ly: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let b = slice::<f32>(sb, lb)?;
        let out = match sy.dtype() {
            DType::F32 => CpuStorage::F32(cpu_forward(slice::<f32>(sy, ly)?, b, self.act)),
            DType::BF16 => CpuStorage::BF16(cpu_forward(slice(sy, ly)?, b, self.act)),
            DType::F16 => CpuStorage::F16(cpu_forward(slice(sy, ly)?, b, self.act)),
            dt => candle_core::bail!("bias: unsupported dtype {dt:?}"),
        };
        Ok((out, ly.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sy: &candle_core::CudaStorage,
        ly: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = super::cuda::bias::forward((sy, ly), (sb, lb), self.act)?;
        Ok((out, ly.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        spans::timed(KernelOp::Bias, Pass::Backward, y.device(), || {
            let (dy, db) = backward(y, b, grad, self.act)?;
            Ok((Some(dy), Some(db)))
        })
    }
}

/// The fused op's backward for a given `dy` (the gradient of `act(y + b)`): `(dL/dy, db)`,
/// `db` in f32. What candle's autograd calls for [`fused`], here without a graph
/// (benches/train_ops.rs times it so).
pub fn backward(y: &Tensor, b: &Tensor, dy: &Tensor, act: BiasAct) -> Result<(Tensor, Tensor)> {
    let c = y.dim(D::Minus1)?;
    if b.dims() != [c] || dy.shape() != y.shape() {
        candle_core::bail!(
            "bias backward: y {:?}, b {:?}, dy {:?}",
            y.dims(),
            b.dims(),
            dy.dims()
        );
    }
    let y = y.contiguous()?;
    // The identity's backward never reads the bias: one in another dtype (a compute copy
    // read by the GEMM's epilogue) is stood in for by zeros, a memset, rather than cast.
    let b = match (act, b.dtype()) {
        (BiasAct::Identity, dt) if dt != DType::F32 => Tensor::zeros(c, DType::F32, b.device())?,
        _ => b.to_dtype(DType::F32)?.contiguous()?,
    };
    let g = dy.to_dtype(y.dtype())?.contiguous()?;
    let op = BiasBwd {
        act,
        dz: Mutex::new(None),
    };
    let db = y.apply_op3_no_bwd(&b, &g, &op)?;
    let dz = op.dz.lock().unwrap_or_else(PoisonError::into_inner).take();
    let dy = match (act, dz) {
        (BiasAct::Identity, _) => g,
        (BiasAct::GeluTanh, Some(dz)) => dz,
        (BiasAct::GeluTanh, None) => candle_core::bail!("bias backward: no input gradient"),
    };
    Ok((dy, db))
}

/// Backward of [`Bias`]: `(y, b, dy) -> db`, with `dL/dy` left in `dz` when the activation
/// is not the identity.
struct BiasBwd {
    act: BiasAct,
    dz: Mutex<Option<Tensor>>,
}

impl BiasBwd {
    fn keep(&self, dz: Option<Tensor>) {
        *self.dz.lock().unwrap_or_else(PoisonError::into_inner) = dz;
    }
}

impl CustomOp3 for BiasBwd {
    fn name(&self) -> &'static str {
        "temper-bias-bwd"
    }

    fn cpu_fwd(
        &self,
        sy: &CpuStorage,
        ly: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, cols) = rows_cols(ly)?;
        let b = slice::<f32>(sb, lb)?;
        macro_rules! go {
            ($t:ty) => {{
                let (dz, db) = cpu_backward(slice::<$t>(sy, ly)?, b, slice(sg, lg)?, self.act);
                let dz = match dz {
                    Some(d) => Some(Tensor::from_vec(d, ly.shape(), &Device::Cpu)?),
                    None => None,
                };
                (dz, db)
            }};
        }
        let (dz, db) = match sy.dtype() {
            DType::F32 => go!(f32),
            DType::BF16 => go!(half::bf16),
            DType::F16 => go!(half::f16),
            dt => candle_core::bail!("bias backward: unsupported dtype {dt:?}"),
        };
        self.keep(dz);
        Ok((CpuStorage::F32(db), Shape::from(cols)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sy: &candle_core::CudaStorage,
        ly: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (_, cols) = rows_cols(ly)?;
        let (dz, db) = super::cuda::bias::backward((sy, ly), (sb, lb), (sg, lg), self.act)?;
        self.keep(dz.map(|d| super::cuda::tensor_from_storage(d, ly.shape().clone())));
        Ok((db, Shape::from(cols)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::host::testing::assert_close;
    use super::*;
    use candle_core::Var;

    /// The fused op's output and both gradients equal the reference's under candle's
    /// autograd: both activations, f32 and bf16, an odd width, rows in a leading batch dim.
    #[test]
    fn fused_op_matches_the_reference_and_its_gradients() {
        let dev = Device::Cpu;
        let (lead, cols) = ((3, 5), 37);
        let n = lead.0 * lead.1 * cols;
        let ys: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 97) as f32 - 48.0) * 0.07)
            .collect();
        let bs: Vec<f32> = (0..cols).map(|i| (i % 9) as f32 * 0.3 - 1.2).collect();
        let gs: Vec<f32> = (0..n).map(|i| ((i * 31 % 11) as f32 - 5.0) * 0.3).collect();
        for act in [BiasAct::Identity, BiasAct::GeluTanh] {
            for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 2e-2)] {
                let y = Var::from_tensor(
                    &Tensor::from_vec(ys.clone(), (lead.0, lead.1, cols), &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap(),
                )
                .unwrap();
                let b = Var::from_vec(bs.clone(), cols, &dev).unwrap();
                let g = Tensor::from_vec(gs.clone(), (lead.0, lead.1, cols), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let run = |f: &dyn Fn(&Tensor, &Tensor, BiasAct) -> Result<Tensor>,
                           y: &Var,
                           g: &Tensor| {
                    let out = f(y.as_tensor(), b.as_tensor(), act).unwrap();
                    let gr = (&out * g).unwrap().sum_all().unwrap().backward().unwrap();
                    let get = |v: &Var| gr.get(v.as_tensor()).unwrap().clone();
                    (out, get(y), get(&b))
                };
                let ours = run(&fused, &y, &g);
                let refs = run(&reference, &y, &g);
                assert_eq!(ours.0.dtype(), dtype);
                assert_eq!(ours.2.dtype(), DType::F32, "the bias gradient is f32");
                // Ours sums the bias gradient in f32: its reference is the same maths on the
                // rounded inputs, upcast (the bf16 reference rounds every partial sum).
                let up = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                let y32 = Var::from_tensor(&up(y.as_tensor())).unwrap();
                let ref_db = run(&reference, &y32, &up(&g)).2;
                for (what, a, r) in [
                    ("out", &ours.0, &refs.0),
                    ("dy", &ours.1, &refs.1),
                    ("db", &ours.2, &ref_db),
                ] {
                    assert_close(&format!("{act:?} {dtype:?} {what}"), a, r, tol);
                }
            }
        }
    }

    /// The direct backward gives autograd's gradients (the same op, without a graph), with
    /// autograd seeded through `out * dy` as benches/train_ops.rs drives the reference.
    #[test]
    fn direct_backward_is_autograds_gradients() {
        let dev = Device::Cpu;
        let (rows, cols) = (5, 13);
        let ys: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 17 % 23) as f32 - 11.0) * 0.2)
            .collect();
        let gs: Vec<f32> = (0..rows * cols)
            .map(|i| ((i % 7) as f32 - 3.0) * 0.5)
            .collect();
        let bs: Vec<f32> = (0..cols).map(|i| (i % 4) as f32 * 0.25 - 0.5).collect();
        for act in [BiasAct::Identity, BiasAct::GeluTanh] {
            let y = Var::from_vec(ys.clone(), (rows, cols), &dev).unwrap();
            let b = Var::from_vec(bs.clone(), cols, &dev).unwrap();
            let dy = Tensor::from_vec(gs.clone(), (rows, cols), &dev).unwrap();
            let out = fused(y.as_tensor(), b.as_tensor(), act).unwrap();
            let grads = (&out * &dy).unwrap().backward().unwrap();
            let (dyd, dbd) = backward(y.as_tensor(), b.as_tensor(), &dy, act).unwrap();
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(v(&dyd), v(grads.get(y.as_tensor()).unwrap()), "{act:?} dy");
            assert_eq!(v(&dbd), v(grads.get(b.as_tensor()).unwrap()), "{act:?} db");
        }
    }

    /// No rows: an empty output and a zero bias gradient, not an error.
    #[test]
    fn zero_rows_give_a_zero_bias_gradient() {
        let dev = Device::Cpu;
        let y = Var::from_tensor(&Tensor::zeros((0, 4), DType::F32, &dev).unwrap()).unwrap();
        let b = Var::from_vec(vec![1f32, 2., 3., 4.], 4, &dev).unwrap();
        let out = fused(y.as_tensor(), b.as_tensor(), BiasAct::GeluTanh).unwrap();
        assert_eq!(out.dims(), [0, 4]);
        let gr = out.sum_all().unwrap().backward().unwrap();
        let db = gr.get(b.as_tensor()).expect("a bias gradient");
        assert_eq!(db.to_vec1::<f32>().unwrap(), vec![0.0; 4]);
    }
}
