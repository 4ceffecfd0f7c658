//! Rotary position embeddings in the Llama / GPT-NeoX layout: `x` `[B, H, T, D]` with each
//! head's halves `x1 = x[..D/2]`, `x2 = x[D/2..]` rotating together,
//! `r1 = x1 cos - x2 sin`, `r2 = x2 cos + x1 sin`, by tables `cos`, `sin` `[B, 1, T, D/2]`
//! (the angles at each row's positions, shared by every head, so queries and keys of any
//! head count use the same tables). Gradients flow to `x` only: the tables are constants.
//!
//! The reference composes candle's narrows, broadcast multiplies and a concatenation (eight
//! launches forward on a GPU, more backward); [`fused`] is one custom op, one launch each
//! way, whose backward is the inverse rotation: `kernels/rope.cu` on CUDA, the same maths in
//! Rust on the CPU, tested against the reference without a GPU. Both read the tables in
//! `x`'s dtype, as the reference multiplies by them, and compute in f32.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType, D};

use super::host::slice;
use super::registry::{warn_fallback, KernelChoice};
use super::spans::{self, Pass};
use super::KernelOp;
use crate::tape;

type Result<T> = candle_core::Result<T>;

pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, choice: KernelChoice) -> Result<Tensor> {
    if choice == KernelChoice::Custom && x.device().is_cuda() {
        let dt = x.dtype();
        if matches!(dt, DType::F32 | DType::BF16 | DType::F16)
            && cos.dtype() == dt
            && sin.dtype() == dt
        {
            return fused(x, cos, sin);
        }
        let why = format!("no kernel for {dt:?} with {:?} tables", cos.dtype());
        warn_fallback("rope", &why);
    }
    tape::island(&[x, cos, sin], |a| reference(&a[0], &a[1], &a[2]))
}

/// candle's composite, differentiable.
pub fn reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[r1, r2], D::Minus1)
}

/// The fused op on any device, differentiable in `x`: `x` `[B, H, T, D]` with `D` even,
/// `cos` and `sin` `[B, 1, T, D/2]`, all three of one dtype.
pub fn fused(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    spans::timed(KernelOp::Rope, Pass::Forward, x.device(), || {
        let (b, _, t, d) = x.dims4()?;
        let table = [b, 1, t, d / 2];
        if d == 0 || d % 2 != 0 || cos.dims() != table || sin.dims() != table {
            candle_core::bail!(
                "rope: x {:?} needs an even head_dim and tables {table:?}, got {:?} and {:?}",
                x.dims(),
                cos.dims(),
                sin.dims()
            );
        }
        if cos.dtype() != x.dtype() || sin.dtype() != x.dtype() {
            candle_core::bail!(
                "rope: tables {:?} must be in x's dtype {:?}",
                cos.dtype(),
                x.dtype()
            );
        }
        let arg = |t: &Tensor| tape::arg(t).contiguous();
        let (xa, ca, sa) = (arg(x)?, arg(cos)?, arg(sin)?);
        let op = Rope { inverse: false };
        if !tape::recording() {
            return xa.apply_op3(&ca, &sa, op);
        }
        // On the tape the backward keeps only the tables: it is the inverse rotation.
        let y = xa.apply_op3_no_bwd(&ca, &sa, &op)?;
        let dtype = xa.dtype();
        tape::record(&[x, cos, sin], &y, move |g, _| {
            let dx = spans::timed(KernelOp::Rope, Pass::Backward, g.device(), || {
                backward(&g.to_dtype(dtype)?, &ca, &sa)
            })?;
            Ok(vec![Some(dx), None, None])
        })?;
        Ok(y)
    })
}

/// The fused op's backward for a given `dy` (the inverse rotation), what candle's autograd
/// calls for [`fused`], here without a graph (benches/train_ops.rs times it so).
pub fn backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    dy.contiguous()?
        .apply_op3_no_bwd(&cos, &sin, &Rope { inverse: true })
}

/// The rotation by the tables' angles, or by minus them (`inverse`, the backward).
struct Rope {
    inverse: bool,
}

/// `(heads, seq, half)` of `x` `[B, H, T, D]`.
fn dims(l: &Layout) -> Result<(usize, usize, usize)> {
    let (_, h, t, d) = l.shape().dims4()?;
    Ok((h, t, d / 2))
}

fn rotate<T: WithDType>(
    x: &[T],
    (cos, sin): (&[T], &[T]),
    (heads, seq, half): (usize, usize, usize),
    inverse: bool,
) -> Vec<T> {
    let f = |v: T| v.to_f64() as f32;
    let mut out = Vec::with_capacity(x.len());
    for (row, xr) in x.chunks(2 * half).enumerate() {
        let tab = (row / (heads * seq) * seq + row % seq) * half;
        let (x1, x2) = xr.split_at(half);
        let angle = |j: usize| {
            let s = f(sin[tab + j]);
            (f(cos[tab + j]), if inverse { -s } else { s })
        };
        out.extend((0..half).map(|j| {
            let (c, s) = angle(j);
            T::from_f64((f(x1[j]) * c - f(x2[j]) * s) as f64)
        }));
        out.extend((0..half).map(|j| {
            let (c, s) = angle(j);
            T::from_f64((f(x2[j]) * c + f(x1[j]) * s) as f64)
        }));
    }
    out
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        if self.inverse {
            "temper-rope-bwd"
        } else {
            "temper-rope"
        }
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sc: &CpuStorage,
        lc: &Layout,
        ss: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = dims(lx)?;
        macro_rules! go {
            ($t:ty, $v:ident) => {{
                let tables = (slice::<$t>(sc, lc)?, slice::<$t>(ss, ls)?);
                CpuStorage::$v(rotate(slice::<$t>(sx, lx)?, tables, dims, self.inverse))
            }};
        }
        let out = match sx.dtype() {
            DType::F32 => go!(f32, F32),
            DType::BF16 => go!(half::bf16, BF16),
            DType::F16 => go!(half::f16, F16),
            dt => candle_core::bail!("rope: unsupported dtype {dt:?}"),
        };
        Ok((out, lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sc: &candle_core::CudaStorage,
        lc: &Layout,
        ss: &candle_core::CudaStorage,
        ls: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = super::cuda::rope::run((sx, lx), (sc, lc), (ss, ls), self.inverse)?;
        Ok((out, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        spans::timed(KernelOp::Rope, Pass::Backward, x.device(), || {
            if self.inverse {
                candle_core::bail!("rope: the inverse rotation is not differentiated");
            }
            let dy = grad.to_dtype(x.dtype())?;
            Ok((Some(backward(&dy, cos, sin)?), None, None))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::host::testing::assert_close;
    use super::*;
    use candle_core::{Device, Var};

    /// `[b, 1, t, half]` cos and sin tables of row `r`'s positions `starts[r] + 0..t`.
    fn tables(starts: &[usize], t: usize, half: usize, dtype: DType) -> (Tensor, Tensor) {
        let angles: Vec<f32> = starts
            .iter()
            .flat_map(|&s| s..s + t)
            .flat_map(|pos| {
                (0..half).map(move |j| pos as f32 * 10000f32.powf(-(j as f32) / half as f32))
            })
            .collect();
        let shape = (starts.len(), 1, t, half);
        let tab = |f: fn(f32) -> f32| {
            let v: Vec<f32> = angles.iter().map(|&a| f(a)).collect();
            Tensor::from_vec(v, shape, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        (tab(f32::cos), tab(f32::sin))
    }

    /// The fused op and its gradient equal the reference's, in f32 and bf16, for odd
    /// lengths, more than one batch row, head dims that are not powers of two, and positions
    /// offset as in decoding (a different offset per row).
    #[test]
    fn fused_op_matches_the_reference_and_its_gradient() {
        let dev = Device::Cpu;
        for &(b, h, t, d) in &[
            (2usize, 3usize, 7usize, 10usize),
            (1, 1, 1, 2),
            (3, 2, 5, 6),
        ] {
            let n = b * h * t * d;
            let xs: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.2)
                .collect();
            let gs: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.5).collect();
            let starts: Vec<usize> = (0..b).map(|r| 37 + 5 * r).collect();
            for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 2e-2)] {
                let (cos, sin) = tables(&starts, t, d / 2, dtype);
                let t4 = |v: &[f32]| {
                    Tensor::from_slice(v, (b, h, t, d), &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                };
                let x = Var::from_tensor(&t4(&xs)).unwrap();
                let g = t4(&gs);
                let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>| {
                    let y = f(x.as_tensor(), &cos, &sin).unwrap();
                    let gr = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                    let dx = gr.get(x.as_tensor()).unwrap().clone();
                    (y, dx)
                };
                let (yf, df) = run(&fused);
                let (yr, dr) = run(&reference);
                for (what, a, r) in [("y", &yf, &yr), ("dx", &df, &dr)] {
                    assert_eq!(a.elem_count(), n, "{dtype:?} {what}");
                    assert_close(&format!("{b}x{h}x{t}x{d} {dtype:?} {what}"), a, r, tol);
                }
            }
        }
    }

    #[test]
    fn rejects_odd_head_dims_and_mismatched_tables() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 3, 5), DType::F32, &dev).unwrap();
        let tab = Tensor::zeros((1, 1, 3, 2), DType::F32, &dev).unwrap();
        assert!(fused(&x, &tab, &tab).is_err());
        let x = Tensor::zeros((1, 2, 3, 4), DType::F32, &dev).unwrap();
        assert!(fused(&x, &tab, &tab).is_ok());
        assert!(fused(&x, &tab.to_dtype(DType::BF16).unwrap(), &tab).is_err());
        let short = Tensor::zeros((1, 1, 2, 2), DType::F32, &dev).unwrap();
        assert!(fused(&x, &short, &short).is_err());
    }
}
