//! RMSNorm as a candle custom op with a backward: `kernels/rmsnorm.cu` on CUDA, plain Rust on
//! the CPU (so the op, and its gradients, can be checked anywhere).
//!
//! The forward saves the per-row inverse rms (f32) inside the op object, which candle keeps in
//! the graph, so the backward reuses it instead of re-reducing every row. The backward is a
//! second custom op whose output is dx; dw, in w's dtype (f32 for Gemma's offsets under 16-bit
//! compute), is left in the backward op object, as the forward op keeps the inverse rms.
//!
//! The gain is `w` or, for Gemma ([`Gain::PlusOne`]), `1 + w` formed in f32 inside the kernels.

use std::sync::{Mutex, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr};
use candle_core::cuda_backend::CudaDType;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
    WithDType, D,
};

use super::super::host::{cpu_storage, norm_out_shape, rounded_sum, rows_cols, slice};
use super::super::rmsnorm::{covers, Gain};
use super::super::spans::{self, Pass};
use super::super::KernelOp;
use super::{
    aligned16, alloc_out, contiguous_view, cuda_storage, launch, launch_1d, load_func, DevPtr,
    KernelParams,
};
use super::{sm_count, tensor_from_slice, to_i32, DevPtrs, LaunchConfig};

/// The one argument of every kernel in kernels/rmsnorm.cu: the Rust mirror of `struct
/// RmsNormParams` in kernels/rmsnorm.cuh (field comments there). Same fields, order and
/// types (device pointers as `u64`, 0 = null); the size asserts on both sides catch a
/// mismatch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RmsNormParams {
    x: DevPtr,
    w: DevPtr,
    y: DevPtr,
    rstd: DevPtr,
    dy: DevPtr,
    dx: DevPtr,
    dw_partial: DevPtr,
    dw: DevPtr,
    r: DevPtr,
    s: DevPtr,
    ds: DevPtr,
    rows: i32,
    cols: i32,
    groups: i32,
    eps: f32,
    w_offset: f32,
}
const _: () = assert!(std::mem::size_of::<RmsNormParams>() == 112);
const _: () = assert!(std::mem::align_of::<RmsNormParams>() == 8);
// SAFETY: plain old data with the C layout of the kernels' struct (asserted above).
unsafe impl DeviceRepr for RmsNormParams {}
impl KernelParams for RmsNormParams {
    const STEMS: &'static [&'static str] = &["rmsnorm"];
}

/// Our op on a CUDA tensor; `None` for dtypes the kernel does not cover (the caller falls
/// back to the reference).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, gain: Gain) -> Result<Option<Tensor>> {
    if !covers(x, w) {
        return Ok(None);
    }
    rms_norm_op(x, w, eps, gain).map(Some)
}

/// The custom op on any device (CPU included), differentiable in `x` and `w`.
/// `x: [..., cols]` (f32, bf16 or f16), `w: [cols]` in x's dtype or f32. On a tape its
/// backward adds x's gradient so far (the first block's input, which the residual add reads
/// too) to dx in the pass that writes it, as LayerNorm's does.
pub fn rms_norm_op(x: &Tensor, w: &Tensor, eps: f64, gain: Gain) -> Result<Tensor> {
    use crate::tape;
    check(x, w)?;
    let op = RmsNorm::new(eps, gain, None);
    let arg = |t: &Tensor| tape::arg(t).contiguous();
    let (xa, wa) = (arg(x)?, arg(w)?);
    if !tape::recording() {
        return xa.apply_op2(&wa, op);
    }
    let y = xa.apply_op2_no_bwd(&wa, &op)?;
    tape::record_onto(&[x, w], &y, 0, move |dy, _, acc| {
        let (dx, dw) = op.grads(&xa, &wa, &dy, acc)?;
        Ok(vec![Some(dx), Some(dw)])
    })?;
    Ok(y)
}

fn check(x: &Tensor, w: &Tensor) -> Result<()> {
    let cols = x.dim(D::Minus1)?;
    if w.dims() != [cols] {
        candle_core::bail!(
            "rms_norm: weight {:?} does not match rows of {cols}",
            w.dims()
        );
    }
    if !covers(x, w) {
        candle_core::bail!(
            "rms_norm: x is {:?} and w {:?} (the kernels take x f32, bf16 or f16 and w in x's \
             dtype or f32)",
            x.dtype(),
            w.dtype()
        );
    }
    Ok(())
}

/// The forward and backward of [`rms_norm_op`] called directly, outside candle's autograd, so
/// a bench can drive the backward with a given dY: going through `backward()` needs a scalar,
/// and the `(y * dy).sum_all()` that makes one adds an elementwise pass, candle's one-block
/// reduction and its broadcast back to the timing.
pub struct RmsNormDirect {
    op: RmsNorm,
    x: Tensor,
    w: Tensor,
}

impl RmsNormDirect {
    /// `x: [..., cols]`, `w: [cols]`, as [`rms_norm_op`] takes them.
    pub fn new(x: &Tensor, w: &Tensor, eps: f64, gain: Gain) -> Result<Self> {
        check(x, w)?;
        Ok(Self {
            op: RmsNorm::new(eps, gain, None),
            x: x.contiguous()?,
            w: w.contiguous()?,
        })
    }

    /// `y`, by the same launch as [`rms_norm_op`]; keeps the inverse rms for the backward.
    pub fn forward(&self) -> Result<Tensor> {
        self.x.apply_op2_no_bwd(&self.w, &self.op)
    }

    /// `(dx, dw)` for `dy` after [`Self::forward`]: what candle's autograd calls for this op.
    pub fn backward(&self, y: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let (dx, dw) = self.op.bwd(&self.x, &self.w, y, dy)?;
        let some = |t: Option<Tensor>| {
            t.ok_or_else(|| candle_core::Error::Msg("rms_norm backward: missing grad".into()))
        };
        Ok((some(dx)?, some(dw)?))
    }
}

struct RmsNorm {
    eps: f32,
    /// Added to every gain in f32 ([`Gain::offset`]).
    offset: f32,
    /// `[rows]` f32, written by the forward for the backward.
    rstd: Mutex<Option<Tensor>>,
    /// Added to x before the norm ([`add_fused`]): the output is then `[2, ...]`, the norm
    /// and the sum.
    residual: Option<Tensor>,
}

impl RmsNorm {
    fn new(eps: f64, gain: Gain, residual: Option<Tensor>) -> Self {
        Self {
            eps: eps as f32,
            offset: gain.offset(),
            rstd: Mutex::new(None),
            residual,
        }
    }

    fn save(&self, rstd: Tensor) {
        *self.rstd.lock().unwrap_or_else(PoisonError::into_inner) = Some(rstd);
    }

    /// `(dx, dw)` for `dy` after the forward, `x` the normalised input (the sum, with a
    /// residual); `ds` is added to dx.
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        ds: Option<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        spans::timed(KernelOp::RmsNorm, Pass::Backward, x.device(), || {
            let saved = self
                .rstd
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let rstd = match saved {
                Some(r) => r,
                // Only if the forward never ran through our code (it always does); recompute.
                None => (x.to_dtype(DType::F32)?.sqr()?.mean_keepdim(D::Minus1)?
                    + self.eps as f64)?
                    .sqrt()?
                    .recip()?
                    .flatten_all()?,
            };
            let ds = match ds {
                Some(d) => Some(d.to_dtype(x.dtype())?.contiguous()?),
                None => None,
            };
            let dy = dy.to_dtype(x.dtype())?.contiguous()?;
            let bwd = RmsNormBwd {
                rstd,
                ds,
                offset: self.offset,
                dw: Mutex::new(None),
            };
            let dx = x.apply_op3_no_bwd(w, &dy, &bwd)?.reshape(x.shape())?;
            let dw = bwd.dw.lock().unwrap_or_else(PoisonError::into_inner).take();
            let dw = dw.ok_or_else(|| {
                candle_core::Error::Msg("rms_norm backward: the op left no dw".into())
            })?;
            Ok((dx, dw))
        })
    }
}

/// `(x + r, RmsNorm(x + r))` for a block tape (`crate::tape`): the residual stream's add
/// fused into the norm that reads it, one pass over the rows each way (the backward adds the
/// stream's own gradient to the norm's dx in the same pass). Outside a tape, the add and
/// [`rms_norm_op`], two ops. `x` and `r` of one dtype, `w` of theirs or f32.
pub fn add_fused(
    x: &Tensor,
    r: &Tensor,
    w: &Tensor,
    eps: f64,
    gain: Gain,
) -> Result<(Tensor, Tensor)> {
    use crate::tape;
    if !tape::recording() {
        if tape::untracked(&[x, r, w]) {
            return spans::timed(KernelOp::RmsNorm, Pass::Forward, x.device(), || {
                check(x, w)?;
                tape::check_residual(x, r, "rms_norm")?;
                let op = RmsNorm::new(eps, gain, Some(r.contiguous()?));
                let both = x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &op)?;
                let both = super::capture_arena::kept(both);
                Ok((both.get(1)?, both.get(0)?))
            });
        }
        let s = (x + r)?;
        let n = rms_norm_op(&s, w, eps, gain)?;
        return Ok((s, n));
    }
    spans::timed(KernelOp::RmsNorm, Pass::Forward, x.device(), || {
        check(x, w)?;
        tape::check_residual(x, r, "rms_norm")?;
        let arg = |t: &Tensor| tape::arg(t).contiguous();
        let (xa, wa) = (arg(x)?, arg(w)?);
        let mut op = RmsNorm::new(eps, gain, Some(arg(r)?));
        let both = xa.apply_op2_no_bwd(&wa, &op)?;
        // The backward reads the sum and the saved inverse rms, not the residual.
        op.residual = None;
        tape::record_add_norm(x, r, &[w], &both, move |sum, dn, ds| {
            let (dsum, dw) = op.grads(sum, &wa, &dn, ds)?;
            Ok((dsum, vec![Some(dw)]))
        })
    })
}

/// `(y, rstd)` for the gains `w` (offset already added); with a residual `r`, y is the norm of
/// the sum `x + r` (rounded to `T`, as a separate add rounds it) followed by the sum.
fn cpu_forward<T: WithDType>(
    x: &[T],
    r: Option<&[T]>,
    w: &[f32],
    rows: usize,
    cols: usize,
    eps: f32,
) -> (Vec<T>, Vec<f32>) {
    let mut y = Vec::with_capacity(rows * cols * (1 + r.is_some() as usize));
    let sum = r.map_or_else(Vec::new, |r| rounded_sum(x, r));
    let x = if r.is_some() { &sum[..] } else { x };
    let mut rstd = Vec::with_capacity(rows);
    for row in x.chunks(cols.max(1)).take(rows) {
        let xf: Vec<f32> = row.iter().map(|v| v.to_f64() as f32).collect();
        let ss: f32 = xf.iter().map(|v| v * v).sum();
        let r = 1.0 / (ss / cols as f32 + eps).sqrt();
        rstd.push(r);
        y.extend(
            xf.iter()
                .zip(w)
                .map(|(&v, &wv)| T::from_f64(((v * r) * wv) as f64)),
        );
    }
    // With a residual, the sum after the norm.
    y.extend(sum);
    (y, rstd)
}

/// `(dx, dw)` for the gains `w` (offset already added) from the saved inverse rms, `ds` added
/// to dx in f32; formulas in kernels/rmsnorm.cu.
fn cpu_backward<T: WithDType>(
    x: &[T],
    w: &[f32],
    dy: &[T],
    ds: Option<&[T]>,
    rstd: &[f32],
    cols: usize,
) -> (Vec<T>, Vec<f32>) {
    let mut dw = vec![0f32; cols];
    let mut out = Vec::with_capacity(x.len());
    if cols > 0 {
        for (row, ((xr, gr), &r)) in x.chunks(cols).zip(dy.chunks(cols)).zip(rstd).enumerate() {
            let xf: Vec<f32> = xr.iter().map(|v| v.to_f64() as f32).collect();
            let gf: Vec<f32> = gr.iter().map(|v| v.to_f64() as f32).collect();
            let dot: f32 = (0..cols).map(|j| gf[j] * w[j] * xf[j]).sum();
            let coef = r * r * r * dot / cols as f32;
            for j in 0..cols {
                let extra = ds.map_or(0.0, |d| d[row * cols + j].to_f64() as f32);
                out.push(T::from_f64(
                    (r * gf[j] * w[j] - coef * xf[j] + extra) as f64,
                ));
                dw[j] += gf[j] * (xf[j] * r);
            }
        }
    }
    (out, dw)
}

/// The gains `w + offset` in f32, w of any float dtype: what the kernels form per element.
fn cpu_gains(sw: &CpuStorage, lw: &Layout, offset: f32) -> Result<Vec<f32>> {
    fn f32s<T: WithDType>(s: &CpuStorage, l: &Layout, offset: f32) -> Result<Vec<f32>> {
        Ok(slice::<T>(s, l)?
            .iter()
            .map(|v| v.to_f64() as f32 + offset)
            .collect())
    }
    match sw.dtype() {
        DType::F32 => f32s::<f32>(sw, lw, offset),
        DType::BF16 => f32s::<half::bf16>(sw, lw, offset),
        DType::F16 => f32s::<half::f16>(sw, lw, offset),
        dt => candle_core::bail!("rms_norm: unsupported gain dtype {dt:?}"),
    }
}

/// w on the device: in x's dtype `T`, or f32 under a 16-bit `T` (the `_wf32` entry points).
enum GainView<'a, T> {
    Same(CudaView<'a, T>),
    F32(CudaView<'a, f32>),
}

impl<'a, T: CudaDType + WithDType> GainView<'a, T> {
    fn new(s: &'a CudaStorage, l: &Layout) -> Result<Self> {
        match s.dtype() {
            d if d == T::DTYPE => Ok(Self::Same(contiguous_view::<T>(s, l)?)),
            DType::F32 => Ok(Self::F32(contiguous_view::<f32>(s, l)?)),
            d => candle_core::bail!("rms_norm: gain {d:?} for x {:?}", T::DTYPE),
        }
    }

    fn read<'p>(&'p self, ptrs: &mut DevPtrs<'p>) -> DevPtr {
        match self {
            Self::Same(v) => ptrs.read(v),
            Self::F32(v) => ptrs.read(v),
        }
    }

    /// The dtype part of the entry points' names: x's, with `_wf32` for an f32 gain.
    fn kernel_dtype(&self) -> String {
        match self {
            Self::Same(_) => T::DTYPE.as_str().to_string(),
            Self::F32(_) => format!("{}_wf32", T::DTYPE.as_str()),
        }
    }

    /// Whether w at this element offset starts on a 16-byte boundary.
    fn aligned(&self, offset: usize) -> bool {
        match self {
            Self::Same(_) => aligned16::<T>(&[offset]),
            Self::F32(_) => aligned16::<f32>(&[offset]),
        }
    }
}

/// Which compiled variant to launch: V values per access, K accesses per thread held in
/// registers (0: the generic loop), `threads` per block. Mirrors the instantiation list at the
/// bottom of kernels/rmsnorm.cu.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    v: usize,
    k: usize,
    threads: u32,
}

impl Plan {
    /// `vec_width`: values per 16 bytes; `aligned`: every base offset is 16-byte aligned.
    fn new(cols: usize, vec_width: usize, aligned: bool) -> Self {
        let v = if aligned && vec_width > 1 && cols.is_multiple_of(vec_width) {
            vec_width
        } else {
            1
        };
        let chunks = cols.div_ceil(v).max(1);
        // At most 16 values per thread so a whole row stays in registers without spilling
        // (ptxas: <= 123 registers for the backward at 512 threads).
        let ks = [1usize, 2, 4, 8, 16].into_iter().filter(|&k| k * v <= 16);
        // Prefer blocks of up to 256 threads (more blocks per SM), then up to 512.
        for limit in [256usize, 512] {
            if let Some(k) = ks.clone().find(|&k| chunks <= limit * k) {
                let threads = chunks.div_ceil(k).div_ceil(32) * 32;
                return Self {
                    v,
                    k,
                    threads: threads as u32,
                };
            }
        }
        Self {
            v,
            k: 0,
            threads: 512,
        }
    }

    /// `dtype`: [`GainView::kernel_dtype`].
    fn kernel(&self, pass: &str, dtype: &str) -> String {
        format!("rmsnorm_{pass}_{dtype}_v{}_k{}", self.v, self.k)
    }
}

fn cuda_forward<T: CudaDType + DeviceRepr + WithDType>(
    op: &RmsNorm,
    sx: &CudaStorage,
    lx: &Layout,
    sw: &CudaStorage,
    lw: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = sx.device();
    let (rows, cols) = rows_cols(lx)?;
    let n = rows * cols;
    let x = contiguous_view::<T>(sx, lx)?;
    let w = GainView::<T>::new(sw, lw)?;
    let held = op.residual.as_ref().map(|r| r.storage_and_layout());
    let (r, r_offset) = match &held {
        Some((g, l)) => {
            if rows_cols(l)? != (rows, cols) {
                candle_core::bail!("rms_norm: residual {:?} for x {:?}", l.dims(), lx.dims());
            }
            (
                Some(contiguous_view::<T>(cuda_storage(g)?, l)?),
                l.start_offset(),
            )
        }
        None => (None, 0),
    };
    let outputs = 1 + r.is_some() as usize;
    // SAFETY: the kernel writes every y element (and every sum element) and every rstd entry
    // (one block per row).
    let mut y = unsafe { alloc_out::<T>(dev, outputs * n)? };
    let mut rstd = unsafe { alloc_out::<f32>(dev, rows)? };
    if n > 0 {
        // The sum starts n elements into the output.
        let offsets = [lx.start_offset(), r_offset, (outputs - 1) * n];
        let aligned = aligned16::<T>(&offsets) && w.aligned(lw.start_offset());
        let plan = Plan::new(cols, 16 / std::mem::size_of::<T>(), aligned);
        let name = plan.kernel("fwd", &w.kernel_dtype());
        let func = load_func(dev, "rmsnorm", &name)?;
        let cfg = LaunchConfig {
            grid_dim: (to_i32(rows, "rows")? as u32, 1, 1),
            block_dim: (plan.threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let out = ptrs.write(&mut y);
        // The norm first, at the buffer's aligned start for the GEMMs that read it, then the
        // sum.
        let s = match &r {
            Some(_) => out + (n * std::mem::size_of::<T>()) as u64,
            None => 0,
        };
        let p = RmsNormParams {
            x: ptrs.read(&x),
            w: w.read(&mut ptrs),
            y: out,
            rstd: ptrs.write(&mut rstd),
            r: ptrs.read_opt(r.as_ref()),
            s,
            rows: to_i32(rows, "rows")?,
            cols: to_i32(cols, "cols")?,
            eps: op.eps,
            w_offset: op.offset,
            ..RmsNormParams::default()
        };
        // SAFETY: x (and r) hold rows * cols, y rows * cols per output, w cols, rstd rows
        // elements; sizes checked.
        unsafe { launch(dev, &func, &name, cfg, &p) }?;
    }
    op.save(tensor_from_slice(rstd, dev, rows));
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        norm_out_shape(lx, op.residual.is_some()),
    ))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "temper-rmsnorm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, cols) = rows_cols(lx)?;
        fn run<T: WithDType>(
            op: &RmsNorm,
            sx: &CpuStorage,
            lx: &Layout,
            sw: &CpuStorage,
            lw: &Layout,
            rows: usize,
            cols: usize,
        ) -> Result<CpuStorage> {
            let g = op.residual.as_ref().map(|r| r.storage_and_layout());
            let r = match &g {
                Some((g, l)) => Some(slice::<T>(cpu_storage(g)?, l)?),
                None => None,
            };
            let w = cpu_gains(sw, lw, op.offset)?;
            let (y, rstd) = cpu_forward(slice::<T>(sx, lx)?, r, &w, rows, cols, op.eps);
            op.save(Tensor::from_vec(rstd, rows, &Device::Cpu)?);
            Ok(T::to_cpu_storage_owned(y))
        }
        let out = match sx.dtype() {
            DType::F32 => run::<f32>(self, sx, lx, sw, lw, rows, cols)?,
            DType::BF16 => run::<half::bf16>(self, sx, lx, sw, lw, rows, cols)?,
            DType::F16 => run::<half::f16>(self, sx, lx, sw, lw, rows, cols)?,
            dt => candle_core::bail!("rms_norm: unsupported dtype {dt:?}"),
        };
        Ok((out, norm_out_shape(lx, self.residual.is_some())))
    }

    fn cuda_fwd(
        &self,
        sx: &CudaStorage,
        lx: &Layout,
        sw: &CudaStorage,
        lw: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match sx.dtype() {
            DType::F32 => cuda_forward::<f32>(self, sx, lx, sw, lw),
            DType::BF16 => cuda_forward::<half::bf16>(self, sx, lx, sw, lw),
            DType::F16 => cuda_forward::<half::f16>(self, sx, lx, sw, lw),
            dt => candle_core::bail!("rms_norm: no CUDA kernel for {dt:?}"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.grads(x, w, grad, None)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Backward of [`RmsNorm`]: `(x, w, dy) -> dx`, reading the saved inverse rms; `ds`, where
/// set, is added to dx. dw, in w's dtype, is left in `dw`.
struct RmsNormBwd {
    rstd: Tensor,
    ds: Option<Tensor>,
    offset: f32,
    dw: Mutex<Option<Tensor>>,
}

impl RmsNormBwd {
    fn save_dw(&self, dw: Tensor) {
        *self.dw.lock().unwrap_or_else(PoisonError::into_inner) = Some(dw);
    }
}

/// dw in `G` (w's dtype) from the backward's f32 partial rows (`p.dw_partial`, `p.groups` of
/// them): one launch of rmsnorm_dw_reduce_<G>, zeros when there are no rows.
fn reduce_dw<G: CudaDType + DeviceRepr + WithDType>(
    dev: &candle_core::CudaDevice,
    p: &mut RmsNormParams,
    cols: usize,
) -> Result<Tensor> {
    // SAFETY: the reduce kernel writes every dw entry.
    let mut dw = unsafe { alloc_out::<G>(dev, cols)? };
    if cols > 0 {
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        p.dw = ptrs.write(&mut dw);
        let name = format!("rmsnorm_dw_reduce_{}", G::DTYPE.as_str());
        let func = load_func(dev, "rmsnorm", &name)?;
        // SAFETY: `dw_partial` holds groups * cols values, dw cols.
        unsafe { launch(dev, &func, &name, launch_1d(cols, 256), p) }?;
    }
    Ok(tensor_from_slice(dw, dev, cols))
}

fn cuda_backward<T: CudaDType + DeviceRepr + WithDType>(
    op: &RmsNormBwd,
    (sx, lx): (&CudaStorage, &Layout),
    (sw, lw): (&CudaStorage, &Layout),
    (sg, lg): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let dev = sx.device();
    let (rows, cols) = rows_cols(lx)?;
    let n = rows * cols;
    let x = contiguous_view::<T>(sx, lx)?;
    let w = GainView::<T>::new(sw, lw)?;
    let g = contiguous_view::<T>(sg, lg)?;
    let (rs_guard, rs_layout) = op.rstd.storage_and_layout();
    let rstd = contiguous_view::<f32>(cuda_storage(&rs_guard)?, rs_layout)?;
    let held = op.ds.as_ref().map(|d| d.storage_and_layout());
    let (ds, ds_offset) = match &held {
        Some((g, l)) => {
            if rows_cols(l)? != (rows, cols) {
                candle_core::bail!("rms_norm backward: ds {:?} for x {:?}", l.dims(), lx.dims());
            }
            (
                Some(contiguous_view::<T>(cuda_storage(g)?, l)?),
                l.start_offset(),
            )
        }
        None => (None, 0),
    };

    let offsets = [lx.start_offset(), lg.start_offset(), ds_offset];
    let aligned = aligned16::<T>(&offsets) && w.aligned(lw.start_offset());
    let plan = Plan::new(cols, 16 / std::mem::size_of::<T>(), aligned);
    // A few blocks per SM, each folding its rows' dw into one partial row.
    let per_sm = (2048 / plan.threads).max(1) as usize;
    let groups = rows.min(sm_count(dev)? as usize * per_sm);
    // SAFETY: the backward kernel writes all of dx and every column of its partial row; the
    // reduce kernel writes every dw entry (zeros when there are no rows).
    let mut dx = unsafe { alloc_out::<T>(dev, n)? };
    let mut partial = unsafe { alloc_out::<f32>(dev, groups * cols)? };
    let stream = dev.cuda_stream();
    let mut ptrs = DevPtrs::new(&stream);
    let mut p = RmsNormParams {
        x: ptrs.read(&x),
        w: w.read(&mut ptrs),
        dy: ptrs.read(&g),
        ds: ptrs.read_opt(ds.as_ref()),
        rstd: ptrs.read(&rstd),
        dx: ptrs.write(&mut dx),
        dw_partial: ptrs.write(&mut partial),
        rows: to_i32(rows, "rows")?,
        cols: to_i32(cols, "cols")?,
        groups: to_i32(groups, "groups")?,
        w_offset: op.offset,
        ..RmsNormParams::default()
    };
    if n > 0 {
        let name = plan.kernel("bwd", &w.kernel_dtype());
        let func = load_func(dev, "rmsnorm", &name)?;
        let cfg = LaunchConfig {
            grid_dim: (p.groups as u32, 1, 1),
            block_dim: (plan.threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: x, dy, dx hold n elements, w cols, rstd rows, dw_partial groups * cols.
        unsafe { launch(dev, &func, &name, cfg, &p) }?;
    }
    let dw = match &w {
        GainView::Same(_) => reduce_dw::<T>(dev, &mut p, cols)?,
        GainView::F32(_) => reduce_dw::<f32>(dev, &mut p, cols)?,
    };
    op.save_dw(dw);
    drop(ptrs);
    drop(held);
    drop(rs_guard);
    Ok((
        CudaStorage::wrap_cuda_slice(dx, dev.clone()),
        Shape::from(n),
    ))
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "temper-rmsnorm-bwd"
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
        let (rows, cols) = rows_cols(lx)?;
        let rstd = self
            .rstd
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if rstd.len() != rows {
            candle_core::bail!("rms_norm backward: {} saved rows for {rows}", rstd.len());
        }
        fn run<T: WithDType>(
            (sx, lx): (&CpuStorage, &Layout),
            w: &[f32],
            (sg, lg): (&CpuStorage, &Layout),
            ds: Option<&Tensor>,
            rstd: &[f32],
            cols: usize,
        ) -> Result<(CpuStorage, Vec<f32>)> {
            let g = ds.map(|d| d.storage_and_layout());
            let ds = match &g {
                Some((g, l)) => Some(slice::<T>(cpu_storage(g)?, l)?),
                None => None,
            };
            let (dx, dw) =
                cpu_backward(slice::<T>(sx, lx)?, w, slice::<T>(sg, lg)?, ds, rstd, cols);
            Ok((T::to_cpu_storage_owned(dx), dw))
        }
        let w = cpu_gains(sw, lw, self.offset)?;
        let (args, ds) = (((sx, lx), &w[..], (sg, lg)), self.ds.as_ref());
        let (out, dw) = match sx.dtype() {
            DType::F32 => run::<f32>(args.0, args.1, args.2, ds, &rstd, cols)?,
            DType::BF16 => run::<half::bf16>(args.0, args.1, args.2, ds, &rstd, cols)?,
            DType::F16 => run::<half::f16>(args.0, args.1, args.2, ds, &rstd, cols)?,
            dt => candle_core::bail!("rms_norm backward: unsupported dtype {dt:?}"),
        };
        // Rounded once from the f32 sums to w's dtype, as the reduce kernel stores it.
        self.save_dw(Tensor::from_vec(dw, cols, &Device::Cpu)?.to_dtype(sw.dtype())?);
        Ok((out, Shape::from(rows * cols)))
    }

    fn cuda_fwd(
        &self,
        sx: &CudaStorage,
        lx: &Layout,
        sw: &CudaStorage,
        lw: &Layout,
        sg: &CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let args = ((sx, lx), (sw, lw), (sg, lg));
        match sx.dtype() {
            DType::F32 => cuda_backward::<f32>(self, args.0, args.1, args.2),
            DType::BF16 => cuda_backward::<half::bf16>(self, args.0, args.1, args.2),
            DType::F16 => cuda_backward::<half::f16>(self, args.0, args.1, args.2),
            dt => candle_core::bail!("rms_norm backward: no CUDA kernel for {dt:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::rmsnorm::rms_norm_reference;

    #[test]
    fn plans_cover_the_row_within_register_budget() {
        for cols in [
            1usize, 7, 31, 32, 96, 100, 768, 1000, 1024, 4096, 8192, 8193, 20000,
        ] {
            for (width, aligned) in [(4usize, true), (8, true), (4, false)] {
                let p = Plan::new(cols, width, aligned);
                assert!(
                    p.threads.is_multiple_of(32) && p.threads <= 512,
                    "{cols}: {p:?}"
                );
                if p.k > 0 {
                    assert!(p.k * p.v <= 16);
                    assert!(p.threads as usize * p.k * p.v >= cols, "{cols}: {p:?}");
                }
                if p.v > 1 {
                    assert_eq!(cols % p.v, 0);
                }
            }
        }
        assert_eq!(Plan::new(8193, 4, true).k, 0);
        assert_eq!(
            Plan::new(768, 4, true),
            Plan {
                v: 4,
                k: 1,
                threads: 192
            }
        );
    }

    fn rand(shape: &[usize], seed: u64) -> Vec<f32> {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The fused add and norm on a block tape (and off it, nothing tracked), through the CPU
    /// implementation: the norm bit for bit the unfused op's on the rounded sum, and the
    /// gradients of x, the residual and w those of candle's add and the reference norm.
    #[test]
    fn cpu_add_fused_is_the_add_then_the_norm() -> Result<()> {
        let dev = Device::Cpu;
        for (rows, cols) in [(3usize, 5usize), (7, 33)] {
            for dtype in [DType::F32, DType::BF16] {
                let t = |seed: u64, shape: &[usize]| -> Result<Tensor> {
                    Tensor::from_vec(rand(shape, seed), shape, &dev)?.to_dtype(dtype)
                };
                let x = candle_core::Var::from_tensor(&t(1, &[rows, cols])?)?;
                let r = candle_core::Var::from_tensor(&t(4, &[rows, cols])?)?;
                let w = candle_core::Var::from_tensor(&t(2, &[cols])?)?;
                let dy = t(3, &[rows, cols])?;
                let (rt, wt) = (r.as_tensor(), w.as_tensor());
                let norms = std::cell::RefCell::new(vec![]);
                let taped = crate::tape::segment(x.as_tensor(), |x| {
                    let (s, n) = add_fused(x, rt, wt, 1e-5, Gain::AsIs)?;
                    norms.borrow_mut().push(n.clone());
                    Ok(crate::tape::add(&s, &n)?)
                })
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let sum = (x.as_tensor() + rt)?;
                let unfused = rms_norm_op(&sum, wt, 1e-5, Gain::AsIs)?;
                let bits = |t: &Tensor| -> Result<Vec<f32>> {
                    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
                };
                assert_eq!(bits(&norms.borrow()[0])?, bits(&unfused)?, "{dtype:?} norm");
                // Off the tape with nothing tracked (generation): the same fused pass.
                let (xd, rd, wd) = (x.as_tensor().detach(), rt.detach(), wt.detach());
                let (s, n) = add_fused(&xd, &rd, &wd, 1e-5, Gain::AsIs)?;
                assert_eq!(bits(&s)?, bits(&sum)?, "{dtype:?} untracked sum");
                assert_eq!(bits(&n)?, bits(&unfused)?, "{dtype:?} untracked norm");
                let apart = (&sum + rms_norm_reference(&sum, wt, 1e-5)?)?;
                let g_tape = crate::tape::backward(&(&taped * &dy)?.sum_all()?)?;
                let g_ref = (&apart * &dy)?.sum_all()?.backward()?;
                for v in [x.as_tensor(), rt, wt] {
                    let (a, b) = (bits(g_tape.get(v).unwrap())?, bits(g_ref.get(v).unwrap())?);
                    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
                    let err = a
                        .iter()
                        .zip(&b)
                        .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                    let tol = if dtype == DType::F32 { 1e-5 } else { 3e-2 };
                    assert!(err <= tol * scale, "{rows}x{cols} {dtype:?}: off by {err}");
                }
            }
        }
        Ok(())
    }

    /// The CPU path of the op (forward and the backward op) against the reference's autograd.
    #[test]
    fn cpu_op_matches_reference_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (rows, cols) in [(3usize, 5usize), (2, 3), (7, 33)] {
            let x = candle_core::Var::from_vec(rand(&[rows, cols], 1), (rows, cols), &dev)?;
            let w = candle_core::Var::from_vec(rand(&[cols], 2), cols, &dev)?;
            let dy = Tensor::from_vec(rand(&[rows, cols], 3), (rows, cols), &dev)?;
            let ours = rms_norm_op(&x, &w, 1e-5, Gain::AsIs)?;
            let refr = rms_norm_reference(&x, &w, 1e-5)?;
            let g_ours = (&ours * &dy)?.sum_all()?.backward()?;
            let g_ref = (&refr * &dy)?.sum_all()?.backward()?;
            let close = |a: &Tensor, b: &Tensor| -> Result<f32> {
                let num = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
                let den = b.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt().max(1e-30);
                Ok(num / den)
            };
            assert!(close(&ours, &refr)? < 1e-6);
            for v in [x.as_tensor(), w.as_tensor()] {
                let (a, b) = (g_ours.get(v).unwrap(), g_ref.get(v).unwrap());
                let e = close(a, b)?;
                assert!(e < 1e-5, "{rows}x{cols}: grad error {e}");
            }
        }
        Ok(())
    }

    /// Gemma's gains (`1 + w` from f32 offsets) under f32 and bf16 compute, through the CPU
    /// implementation, alone and with the residual add fused in on a block tape: the output
    /// and the gradients against the reference's autograd by `Gain::PlusOne`, dw in f32. With
    /// the offset left out (`Gain::AsIs` on the same w) the output is far off: the offset is
    /// what is checked, not a gain near one.
    #[test]
    fn cpu_op_forms_gemma_gains_in_f32() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16] {
            for (rows, cols) in [(3usize, 5usize), (7, 33)] {
                let t = |seed: u64, shape: &[usize]| -> Result<Tensor> {
                    Tensor::from_vec(rand(shape, seed), shape, &dev)?.to_dtype(dtype)
                };
                let x = candle_core::Var::from_tensor(&t(1, &[rows, cols])?)?;
                let r = candle_core::Var::from_tensor(&t(4, &[rows, cols])?)?;
                // f32 offsets in [-0.5, 0.5): gains 0.5 to 1.5.
                let w = (Tensor::from_vec(rand(&[cols], 2), cols, &dev)? * 0.5)?;
                let w = candle_core::Var::from_tensor(&w)?;
                let dy = t(3, &[rows, cols])?;
                let (xt, rt, wt) = (x.as_tensor(), r.as_tensor(), w.as_tensor());
                let f32s = |t: &Tensor| -> Result<Vec<f32>> {
                    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
                };
                let worst = |a: &Tensor, b: &Tensor| -> Result<f32> {
                    let (a, b) = (f32s(a)?, f32s(b)?);
                    let scale = b.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
                    Ok(a.iter()
                        .zip(&b)
                        .fold(0f32, |m, (p, q)| m.max((p - q).abs()))
                        / scale)
                };
                let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
                let reference = |x: &Tensor| {
                    let g = Gain::PlusOne.of(wt)?;
                    rms_norm_reference(x, &g, 1e-6)
                };

                let ours = rms_norm_op(xt, wt, 1e-6, Gain::PlusOne)?;
                let refr = reference(xt)?;
                assert_eq!(ours.dtype(), dtype);
                assert!(worst(&ours, &refr)? <= tol, "{dtype:?} y");
                let plain = rms_norm_op(xt, wt, 1e-6, Gain::AsIs)?;
                assert!(
                    worst(&plain, &refr)? > 0.3,
                    "{dtype:?}: the offset is not applied"
                );
                let g_ours = (&ours * &dy)?.sum_all()?.backward()?;
                let g_ref = (&refr * &dy)?.sum_all()?.backward()?;
                assert_eq!(g_ours.get(wt).unwrap().dtype(), DType::F32, "dw in f32");
                for (name, v) in [("dx", xt), ("dw", wt)] {
                    let e = worst(g_ours.get(v).unwrap(), g_ref.get(v).unwrap())?;
                    assert!(e <= 2.0 * tol, "{dtype:?} {rows}x{cols} {name}: off by {e}");
                }

                let taped = crate::tape::segment(xt, |x| {
                    let (s, n) = add_fused(x, rt, wt, 1e-6, Gain::PlusOne)?;
                    Ok(crate::tape::add(&s, &n)?)
                })
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let sum = (xt + rt)?;
                let apart = (&sum + reference(&sum)?)?;
                assert!(worst(&taped, &apart)? <= tol, "{dtype:?} add y");
                let g_tape = crate::tape::backward(&(&taped * &dy)?.sum_all()?)?;
                let g_ref = (&apart * &dy)?.sum_all()?.backward()?;
                for (name, v) in [("dx", xt), ("dr", rt), ("dw", wt)] {
                    let e = worst(g_tape.get(v).unwrap(), g_ref.get(v).unwrap())?;
                    assert!(
                        e <= 2.0 * tol,
                        "{dtype:?} {rows}x{cols} add {name}: off by {e}"
                    );
                }
            }
        }
        Ok(())
    }
}
