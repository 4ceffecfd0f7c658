//! LayerNorm (GPT-2's norm): `y = (x - mean) / sqrt(var + eps) * w + b` over the last
//! dimension, in f32 whatever the input dtype; `w` and `b` are the f32 master weights.
//!
//! The reference is candle's composite (differentiable, a dozen launches each way on a GPU);
//! [`fused`] is one custom op with a hand-written backward: `kernels/layernorm.cu` on CUDA,
//! the same maths in Rust on the CPU, so its forward and gradients are checked against the
//! reference without a GPU. Its weight and bias gradients are column sums taken in a fixed
//! order (per-group partials, then one reduction), so they are the same on every run.

use std::sync::{Mutex, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor, WithDType, D};

use super::host::{cpu_storage, norm_out_shape, rounded_sum, rows_cols, slice};
use super::registry::{warn_fallback, KernelChoice};
use super::spans::{self, Pass};
use super::KernelOp;
use crate::tape;

type Result<T> = candle_core::Result<T>;

pub fn layer_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    choice: KernelChoice,
) -> Result<Tensor> {
    if fuses(x, choice) {
        // A frozen base may store its norm in bf16; the kernel reads f32 (a no-op cast for
        // the master weights).
        return fused(x, &w.to_dtype(DType::F32)?, &b.to_dtype(DType::F32)?, eps);
    }
    crate::tape::island(&[x, w, b], |t| reference(&t[0], &t[1], &t[2], eps))
}

/// Whether our kernel serves `x` under `choice`: on CUDA, for f32, bf16 and f16 (it warns once
/// where it cannot).
pub fn fuses(x: &Tensor, choice: KernelChoice) -> bool {
    if choice != KernelChoice::Custom || !x.device().is_cuda() {
        return false;
    }
    let ok = matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16);
    if !ok {
        warn_fallback(
            "layernorm",
            &format!("no kernel for {:?} inputs", x.dtype()),
        );
    }
    ok
}

/// candle's composite, differentiable in all three.
pub fn reference(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let centred = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
    let inv = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    centred
        .broadcast_mul(&inv)?
        .broadcast_mul(&w.to_dtype(DType::F32)?)?
        .broadcast_add(&b.to_dtype(DType::F32)?)?
        .to_dtype(dtype)
}

/// The fused op on any device: `x [..., C]`, `w` and `b` f32 `[C]`. On a tape its backward
/// adds x's gradient so far (the first block's input, which the residual add reads too) to
/// dx in the pass that writes it, instead of the tape adding the two.
pub fn fused(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    spans::timed(KernelOp::LayerNorm, Pass::Forward, x.device(), || {
        check(x, w, b)?;
        let arg = |t: &Tensor| tape::arg(t).contiguous();
        let (xa, wa, ba) = (arg(x)?, arg(w)?, arg(b)?);
        let op = LayerNorm::new(eps);
        if !tape::recording() {
            return xa.apply_op3(&wa, &ba, op);
        }
        let y = xa.apply_op3_no_bwd(&wa, &ba, &op)?;
        tape::record_onto(&[x, w, b], &y, 0, move |dy, _, acc| {
            let (dx, dw, db) = op.grads(&xa, &wa, &dy, acc)?;
            Ok(vec![Some(dx), Some(dw), Some(db)])
        })?;
        Ok(y)
    })
}

fn check(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<()> {
    let c = x.dim(D::Minus1)?;
    if w.dims() != [c] || b.dims() != [c] || w.dtype() != DType::F32 || b.dtype() != DType::F32 {
        candle_core::bail!("layer_norm: weight and bias must be f32 [{c}]");
    }
    Ok(())
}

/// [`fused`] with its backward called directly for a given `dy`, without candle's autograd
/// (benches/train_ops.rs times it so): the same launches, the forward keeping the per-row
/// statistics for the backward as the op in a graph does.
pub struct LayerNormDirect {
    op: LayerNorm,
    x: Tensor,
    w: Tensor,
    b: Tensor,
}

impl LayerNormDirect {
    /// `x [..., C]`, `w` and `b` f32 `[C]`, as [`fused`] takes them.
    pub fn new(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Self> {
        check(x, w, b)?;
        Ok(Self {
            op: LayerNorm::new(eps),
            x: x.contiguous()?,
            w: w.contiguous()?,
            b: b.contiguous()?,
        })
    }

    /// `y`, by the same launch as [`fused`].
    pub fn forward(&self) -> Result<Tensor> {
        self.x.apply_op3_no_bwd(&self.w, &self.b, &self.op)
    }

    /// `(dx, dw, db)` for `dy` after [`Self::forward`]: what candle's autograd calls.
    pub fn backward(&self, y: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        if dy.shape() != self.x.shape() {
            candle_core::bail!(
                "layer_norm backward: dy {:?} for x {:?}",
                dy.dims(),
                self.x.dims()
            );
        }
        let dy = dy.to_dtype(self.x.dtype())?;
        match self.op.bwd(&self.x, &self.w, &self.b, y, &dy)? {
            (Some(dx), Some(dw), Some(db)) => Ok((dx, dw, db)),
            _ => candle_core::bail!("layer_norm backward: a gradient is missing"),
        }
    }
}

struct LayerNorm {
    eps: f32,
    /// `(mean, rstd)`, f32 `[rows]` each, written by the forward for the backward.
    stats: Mutex<Option<(Tensor, Tensor)>>,
    /// Added to x before the norm ([`add_fused`]): the output is then `[2, ...]`, the norm
    /// and the sum.
    residual: Option<Tensor>,
}

impl LayerNorm {
    fn new(eps: f64) -> Self {
        Self {
            eps: eps as f32,
            stats: Mutex::new(None),
            residual: None,
        }
    }

    /// `(dx, dw, db)` for `dy` after the forward, `x` the normalised input (the sum, with a
    /// residual); `ds` is added to dx.
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        ds: Option<Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        spans::timed(KernelOp::LayerNorm, Pass::Backward, x.device(), || {
            let saved = self
                .stats
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            // candle runs the forward of every op it differentiates, so the stats are there.
            let Some((mean, rstd)) = saved else {
                candle_core::bail!("layer_norm: backward before its forward");
            };
            let ds = match ds {
                Some(d) => Some(d.to_dtype(x.dtype())?.contiguous()?),
                None => None,
            };
            let op = LayerNormBwd {
                mean,
                rstd,
                ds,
                dwdb: Mutex::new(None),
            };
            let dy = dy.to_dtype(x.dtype())?.contiguous()?;
            let dx = x.apply_op3_no_bwd(w, &dy, &op)?;
            let dwdb = op
                .dwdb
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            let Some((dw, db)) = dwdb else {
                candle_core::bail!("layer_norm backward: no weight gradient");
            };
            Ok((dx, dw, db))
        })
    }
}

/// `(x + r, LayerNorm(x + r))` for a block tape (`crate::tape`): the residual stream's add
/// fused into the norm that reads it, one pass over the rows each way (the backward adds
/// the stream's own gradient to the norm's dx in the same pass). A candle op returns one
/// tensor, so in candle's graph this is the add and [`fused`], two ops; where no input wants
/// a gradient (generation) it is the one forward pass, its two outputs read apart. `x` and
/// `r` of one shape and dtype, `w` and `b` f32 `[C]`.
pub fn add_fused(
    x: &Tensor,
    r: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    if !tape::recording() {
        if tape::untracked(&[x, r, w, b]) {
            return spans::timed(KernelOp::LayerNorm, Pass::Forward, x.device(), || {
                check(x, w, b)?;
                tape::check_residual(x, r, "layer_norm")?;
                let op = LayerNorm {
                    residual: Some(r.contiguous()?),
                    ..LayerNorm::new(eps)
                };
                let both =
                    x.contiguous()?
                        .apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &op)?;
                let both = super::kept_in_capture(both);
                Ok((both.get(1)?, both.get(0)?))
            });
        }
        let s = (x + r)?;
        let n = fused(&s, w, b, eps)?;
        return Ok((s, n));
    }
    spans::timed(KernelOp::LayerNorm, Pass::Forward, x.device(), || {
        check(x, w, b)?;
        tape::check_residual(x, r, "layer_norm")?;
        let arg = |t: &Tensor| tape::arg(t).contiguous();
        let (xa, wa, ba) = (arg(x)?, arg(w)?, arg(b)?);
        let mut op = LayerNorm {
            residual: Some(arg(r)?),
            ..LayerNorm::new(eps)
        };
        let both = xa.apply_op3_no_bwd(&wa, &ba, &op)?;
        // The backward reads the sum and the statistics, not the residual.
        op.residual = None;
        tape::record_add_norm(x, r, &[w, b], &both, move |sum, dn, ds| {
            let (dsum, dw, db) = op.grads(sum, &wa, &dn, ds)?;
            Ok((dsum, vec![Some(dw), Some(db)]))
        })
    })
}

/// `(y, mean, rstd)` in the kernel's order of operations; with a residual `r`, y is the norm
/// of the sum `x + r` (rounded to `T`, as a separate add rounds it) followed by the sum.
fn cpu_forward<T: WithDType>(
    x: &[T],
    r: Option<&[T]>,
    w: &[f32],
    b: &[f32],
    cols: usize,
    eps: f32,
) -> (Vec<T>, Vec<f32>, Vec<f32>) {
    let mut y = Vec::with_capacity(x.len() * (1 + r.is_some() as usize));
    let sum = r.map_or_else(Vec::new, |r| rounded_sum(x, r));
    let x = if r.is_some() { &sum[..] } else { x };
    let (mut means, mut rstds) = (vec![], vec![]);
    for row in x.chunks(cols.max(1)) {
        let xf: Vec<f32> = row.iter().map(|v| v.to_f64() as f32).collect();
        let mean = xf.iter().sum::<f32>() / cols as f32;
        let var = xf.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / cols as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        y.extend((0..cols).map(|c| T::from_f64(((xf[c] - mean) * rstd * w[c] + b[c]) as f64)));
        means.push(mean);
        rstds.push(rstd);
    }
    // With a residual, the sum after the norm.
    y.extend(sum);
    (y, means, rstds)
}

/// `(dx, dw, db)`; dw and db summed over rows in order; `ds` added to dx in f32.
fn cpu_backward<T: WithDType>(
    x: &[T],
    w: &[f32],
    dy: &[T],
    ds: Option<&[T]>,
    (mean, rstd): (&[f32], &[f32]),
    cols: usize,
) -> (Vec<T>, Vec<f32>, Vec<f32>) {
    let mut dx = Vec::with_capacity(x.len());
    let (mut dw, mut db) = (vec![0f32; cols], vec![0f32; cols]);
    if cols == 0 {
        return (dx, dw, db);
    }
    for (r, (xr, gr)) in x.chunks(cols).zip(dy.chunks(cols)).enumerate() {
        let xhat: Vec<f32> = xr
            .iter()
            .map(|v| (v.to_f64() as f32 - mean[r]) * rstd[r])
            .collect();
        let g: Vec<f32> = gr.iter().map(|v| v.to_f64() as f32).collect();
        let ma = (0..cols).map(|c| g[c] * w[c]).sum::<f32>() / cols as f32;
        let mb = (0..cols).map(|c| g[c] * w[c] * xhat[c]).sum::<f32>() / cols as f32;
        for c in 0..cols {
            let extra = ds.map_or(0.0, |d| d[r * cols + c].to_f64() as f32);
            dx.push(T::from_f64(
                (rstd[r] * (g[c] * w[c] - ma - xhat[c] * mb) + extra) as f64,
            ));
            dw[c] += g[c] * xhat[c];
            db[c] += g[c];
        }
    }
    (dx, dw, db)
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "temper-layernorm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, cols) = rows_cols(lx)?;
        let (w, b) = (slice::<f32>(sw, lw)?, slice::<f32>(sb, lb)?);
        let res = self.residual.as_ref().map(|r| r.storage_and_layout());
        let res = match &res {
            Some((s, l)) => Some((cpu_storage(s)?, *l)),
            None => None,
        };
        let eps = self.eps;
        let (y, mean, rstd) = match sx.dtype() {
            DType::F32 => {
                let r = res.map(|(s, l)| slice::<f32>(s, l)).transpose()?;
                let (y, m, r) = cpu_forward(slice::<f32>(sx, lx)?, r, w, b, cols, eps);
                (CpuStorage::F32(y), m, r)
            }
            DType::BF16 => {
                let r = res.map(|(s, l)| slice::<half::bf16>(s, l)).transpose()?;
                let (y, m, r) = cpu_forward(slice::<half::bf16>(sx, lx)?, r, w, b, cols, eps);
                (CpuStorage::BF16(y), m, r)
            }
            DType::F16 => {
                let r = res.map(|(s, l)| slice::<half::f16>(s, l)).transpose()?;
                let (y, m, r) = cpu_forward(slice::<half::f16>(sx, lx)?, r, w, b, cols, eps);
                (CpuStorage::F16(y), m, r)
            }
            dt => candle_core::bail!("layer_norm: unsupported dtype {dt:?}"),
        };
        let t = |v: Vec<f32>| Tensor::from_vec(v, rows, &Device::Cpu);
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner) = Some((t(mean)?, t(rstd)?));
        Ok((y, norm_out_shape(lx, self.residual.is_some())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let res = self.residual.as_ref().map(|r| r.storage_and_layout());
        let res = match &res {
            Some((s, l)) => Some((super::cuda::cuda_storage(s)?, *l)),
            None => None,
        };
        let (y, mean, rstd) =
            super::cuda::layernorm::forward((sx, lx), res, (sw, lw), (sb, lb), self.eps)?;
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner) = Some((mean, rstd));
        Ok((y, norm_out_shape(lx, self.residual.is_some())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.grads(x, w, grad, None)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Backward of [`LayerNorm`]: `(x, w, dy) -> dx` (plus `ds`, where set), with `(dw, db)` left
/// in `dwdb`.
struct LayerNormBwd {
    mean: Tensor,
    rstd: Tensor,
    ds: Option<Tensor>,
    dwdb: Mutex<Option<(Tensor, Tensor)>>,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "temper-layernorm-bwd"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, cols) = rows_cols(lx)?;
        let w = slice::<f32>(sw, lw)?;
        let mean = self.mean.to_vec1::<f32>()?;
        let rstd = self.rstd.to_vec1::<f32>()?;
        let stats = (mean.as_slice(), rstd.as_slice());
        let ds = self.ds.as_ref().map(|d| d.storage_and_layout());
        let ds = match &ds {
            Some((s, l)) => Some((cpu_storage(s)?, *l)),
            None => None,
        };
        let (dx, dw, db) = match sx.dtype() {
            DType::F32 => {
                let d = ds.map(|(s, l)| slice::<f32>(s, l)).transpose()?;
                let (dx, dw, db) =
                    cpu_backward(slice::<f32>(sx, lx)?, w, slice(sg, lg)?, d, stats, cols);
                (CpuStorage::F32(dx), dw, db)
            }
            DType::BF16 => {
                let d = ds.map(|(s, l)| slice::<half::bf16>(s, l)).transpose()?;
                let x = slice::<half::bf16>(sx, lx)?;
                let (dx, dw, db) = cpu_backward(x, w, slice(sg, lg)?, d, stats, cols);
                (CpuStorage::BF16(dx), dw, db)
            }
            DType::F16 => {
                let d = ds.map(|(s, l)| slice::<half::f16>(s, l)).transpose()?;
                let x = slice::<half::f16>(sx, lx)?;
                let (dx, dw, db) = cpu_backward(x, w, slice(sg, lg)?, d, stats, cols);
                (CpuStorage::F16(dx), dw, db)
            }
            dt => candle_core::bail!("layer_norm backward: unsupported dtype {dt:?}"),
        };
        let t = |v: Vec<f32>| Tensor::from_vec(v, cols, &Device::Cpu);
        *self.dwdb.lock().unwrap_or_else(PoisonError::into_inner) = Some((t(dw)?, t(db)?));
        Ok((dx, lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let ds = self.ds.as_ref().map(|d| d.storage_and_layout());
        let ds = match &ds {
            Some((s, l)) => Some((super::cuda::cuda_storage(s)?, *l)),
            None => None,
        };
        let (dx, dw, db) = super::cuda::layernorm::backward(
            (sx, lx),
            (sw, lw),
            (sg, lg),
            ds,
            (&self.mean, &self.rstd),
        )?;
        *self.dwdb.lock().unwrap_or_else(PoisonError::into_inner) = Some((dw, db));
        Ok((dx, lx.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::host::testing::max_abs;
    use super::*;
    use candle_core::Var;

    /// On a block tape, and off it where no input wants a gradient (generation), the fused add
    /// and norm is the add, then the norm, bit for bit (the sum rounded to the dtype before
    /// its statistics), in f32 and bf16; both outputs.
    #[test]
    fn add_fused_is_the_add_then_the_norm() {
        let dev = Device::Cpu;
        let (rows, cols) = (5, 13);
        for dtype in [DType::F32, DType::BF16] {
            let mk = |k: usize| {
                let v: Vec<f32> = (0..rows * cols)
                    .map(|i| ((i * k % 23) as f32 - 11.0) * 0.37)
                    .collect();
                Tensor::from_vec(v, (rows, cols), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let (x, r) = (Var::from_tensor(&mk(7)).unwrap(), mk(5));
            let w: Vec<f32> = (0..cols).map(|i| 1.0 + i as f32 * 0.05).collect();
            let w = Tensor::from_vec(w, cols, &dev).unwrap();
            let b = (&w * 0.1).unwrap();
            let taped =
                crate::tape::segment(x.as_tensor(), |x| Ok(add_fused(x, &r, &w, &b, 1e-5)?.1))
                    .unwrap();
            let sum = (x.as_tensor() + &r).unwrap();
            let apart = fused(&sum, &w, &b, 1e-5).unwrap();
            let bits = |t: &Tensor| -> Vec<f32> {
                let t = t.to_dtype(DType::F32).unwrap();
                t.flatten_all().unwrap().to_vec1().unwrap()
            };
            assert_eq!(bits(&taped), bits(&apart), "{dtype:?}");
            let x = x.as_tensor().detach();
            assert!(crate::tape::untracked(&[&x, &r, &w, &b]));
            let (s, n) = add_fused(&x, &r, &w, &b, 1e-5).unwrap();
            assert_eq!((s.dims(), n.dims()), (sum.dims(), apart.dims()));
            assert_eq!(bits(&s), bits(&sum), "{dtype:?} untracked sum");
            assert_eq!(bits(&n), bits(&apart), "{dtype:?} untracked norm");
        }
    }

    /// The direct backward gives autograd's gradients (the same op, without a graph), with
    /// autograd seeded through `y * dy` as benches/train_ops.rs drives the reference.
    #[test]
    fn direct_backward_is_autograds_gradients() {
        let dev = Device::Cpu;
        let (rows, cols) = (4, 11);
        let xs: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.3)
            .collect();
        let gs: Vec<f32> = (0..rows * cols)
            .map(|i| ((i % 5) as f32 - 2.0) * 0.7)
            .collect();
        let x = Var::from_vec(xs, (rows, cols), &dev).unwrap();
        let w = Var::from_vec(
            (0..cols).map(|i| 1.0 + i as f32 * 0.05).collect(),
            cols,
            &dev,
        )
        .unwrap();
        let b = Var::from_vec(
            (0..cols).map(|i| i as f32 * 0.1 - 0.3).collect(),
            cols,
            &dev,
        )
        .unwrap();
        let dy = Tensor::from_vec(gs, (rows, cols), &dev).unwrap();
        let y = fused(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        let grads = (&y * &dy).unwrap().backward().unwrap();
        let direct =
            LayerNormDirect::new(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        let yd = direct.forward().unwrap();
        let (dx, dw, db) = direct.backward(&yd, &dy).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&yd), v(&y));
        for (what, d, var) in [("dx", &dx, &x), ("dw", &dw, &w), ("db", &db, &b)] {
            assert_eq!(v(d), v(grads.get(var.as_tensor()).unwrap()), "{what}");
        }
    }

    #[test]
    fn reference_matches_hand_computation() {
        let x = Tensor::new(&[[1.0f32, 3.0]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[2.0f32, 1.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[0.5f32, 0.0], &Device::Cpu).unwrap();
        let y = reference(&x, &w, &b, 0.0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!((y[0][0] - (-2.0 + 0.5)).abs() < 1e-6);
        assert!((y[0][1] - 1.0).abs() < 1e-6);
    }

    /// The fused op's output and its three gradients (an uneven upstream gradient, an odd
    /// width, rows of different scales) equal the reference's under candle's autograd.
    #[test]
    fn fused_op_matches_the_reference_and_its_gradients() {
        let dev = Device::Cpu;
        let (rows, cols) = (6, 37);
        let xs: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 97) as f32 - 48.0) * 0.05 * (1 + i / cols) as f32)
            .collect();
        let ws: Vec<f32> = (0..cols).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
        let bs: Vec<f32> = (0..cols).map(|i| (i % 5) as f32 * 0.2 - 0.4).collect();
        let gs: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 31 % 11) as f32 - 5.0) * 0.3)
            .collect();
        for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 3e-2)] {
            let x = Var::from_tensor(
                &Tensor::from_vec(xs.clone(), (2, 3, cols), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let w = Var::from_vec(ws.clone(), cols, &dev).unwrap();
            let b = Var::from_vec(bs.clone(), cols, &dev).unwrap();
            let g = Tensor::from_vec(gs.clone(), (2, 3, cols), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>| {
                let y = f(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
                let gr = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let get = |v: &Var| gr.get(v.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
                (y.to_dtype(DType::F32).unwrap(), get(&x), get(&w), get(&b))
            };
            let ours = run(&fused);
            let refs = run(&reference);
            let diff = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap()) / max_abs(b).max(1.0);
            for (what, a, b) in [
                ("y", &ours.0, &refs.0),
                ("dx", &ours.1, &refs.1),
                ("dw", &ours.2, &refs.2),
                ("db", &ours.3, &refs.3),
            ] {
                assert!(diff(a, b) < tol, "{dtype:?} {what}: {}", diff(a, b));
            }
        }
    }
}
