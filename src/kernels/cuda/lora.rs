//! Fused LoRA linear layer as a differentiable candle op: `y = x W^T + bias + s (x A^T) B^T`,
//! gradients for x, A and B (W and the bias are frozen: none for them).
//!
//! How the fusion works (details on top of kernels/lora.cu): the rank-r product and the bias
//! ride in the accumulator of the base GEMM instead of taking passes of their own, as the
//! product `[x | s x A^T | 1] [W | B | bias]^T` would, without copying x:
//!
//! - forward: `u_ext = [s x A^T | 1 | 0]` (cuBLAS, written into a padded `[M, r8]` buffer)
//!   and `B_ext = [B | bias | 0]` (`lora_pack`); `y = u_ext B_ext^T` (K = r8), then
//!   `y += x W^T` with beta = 1. Passes over `[M, N]`: one write, one read-modify-write
//!   (the unfused composite makes six: base, bias, up-projection, scale, add).
//! - backward: `lora_dy` reads dY once for both `g = s dY B` ("dS") and `dB = dY^T u_s`
//!   (falls back to two cuBLAS calls where that moves fewer bytes, or for f32); then
//!   `dx = g A` and `dx += dY W` (beta = 1), `dA = g^T x`.
//!
//! All big products are cuBLASLt's planned GEMMs (`lt_plans`, on candle's stream; with
//! `TEMPER_GEMM_TUNE=timed` the large ones timed among the heuristic's candidates once they
//! recur) for bf16/f16, candle's cuBLAS
//! handle for f32, with f32 accumulation; `TEMPER_LORA_DY=fused|cublas` forces the backward's
//! choice for dY.

use std::sync::{Mutex, MutexGuard, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{result as cublas, sys as cublas_sys};
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};

use super::super::lora::LoraArgs;
use super::super::spans::{self, Pass};
use super::super::KernelOp;
use super::lt_plans::{Epilogue, Lt, Problem};
use super::{
    alloc_out, compute_capability, contiguous16, contiguous_view, cuda_storage, grid_stride,
    launch, load_func, sm_count, tensor_from_slice, to_i32, DevPtr, DevPtrs, KernelParams,
    LaunchConfig,
};

/// The one argument of every kernel in kernels/lora.cu: the Rust mirror of `struct
/// LoraParams` in kernels/lora.cuh (field comments there). Same fields, order and types
/// (device pointers as `u64`, 0 = null); the size asserts on both sides catch a mismatch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LoraParams {
    bm: DevPtr,
    bias: DevPtr,
    uext: DevPtr,
    bext: DevPtr,
    dy: DevPtr,
    part_g: DevPtr,
    part_b: DevPtr,
    g: DevPtr,
    db: DevPtr,
    m: i32,
    n: i32,
    r: i32,
    r8: i32,
    rp: i32,
    mc: i32,
    nc: i32,
    nbx: i32,
    nby: i32,
    scale: f32,
}
const _: () = assert!(std::mem::size_of::<LoraParams>() == 112);
const _: () = assert!(std::mem::align_of::<LoraParams>() == 8);
// SAFETY: plain old data with the C layout of the kernels' struct (asserted above).
unsafe impl DeviceRepr for LoraParams {}
impl KernelParams for LoraParams {
    const STEMS: &'static [&'static str] = &["lora"];
}

/// Sizes of one call, every pointer null.
fn lora_params(m: usize, n: usize, r: usize, r8: usize, scale: f64) -> Result<LoraParams> {
    Ok(LoraParams {
        m: to_i32(m, "rows")?,
        n: to_i32(n, "out features")?,
        r: to_i32(r, "rank")?,
        r8: to_i32(r8, "padded rank")?,
        scale: scale as f32,
        ..LoraParams::default()
    })
}

/// How the backward computes `g = s dY B` and `dB = dY^T u_s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DyPath {
    /// `lora_dy` where it applies and moves fewer bytes than two cuBLAS calls.
    Auto,
    /// `lora_dy` whenever it applies (bf16/f16, rank <= 64, N % 8 == 0).
    Fused,
    /// Two cuBLAS calls, each reading dY.
    Cublas,
}

impl DyPath {
    /// `TEMPER_LORA_DY` (`auto` when unset or unknown).
    pub fn from_env() -> Self {
        match std::env::var("TEMPER_LORA_DY").as_deref() {
            Ok("fused") => Self::Fused,
            Ok("cublas") => Self::Cublas,
            _ => Self::Auto,
        }
    }
}

/// Our op for a CUDA input, or `None` where it does not apply (dtype, a GPU older than sm_80):
/// the caller then falls back to the reference.
pub fn lora_linear(x: &Tensor, args: &LoraArgs) -> Result<Option<Tensor>> {
    lora_linear_with(x, args, DyPath::from_env())
}

/// [`lora_linear`] with an explicit backward path (tests and benches compare them).
pub fn lora_linear_with(x: &Tensor, args: &LoraArgs, dy: DyPath) -> Result<Option<Tensor>> {
    if crate::tape::recording() {
        return recorded(x, args, dy);
    }
    let Some(LoraDirect { op, x2, a, b, dims }) = LoraDirect::new(x, args, dy)? else {
        return Ok(None);
    };
    let y = x2.apply_op3(&a, &b, op)?;
    Ok(Some(y.reshape(dims)?))
}

/// [`lora_linear_with`] as one op of a block tape (`crate::tape`): the op's own backward,
/// around the reshapes to and from its `[M, K]` rows.
fn recorded(x: &Tensor, args: &LoraArgs, dy: DyPath) -> Result<Option<Tensor>> {
    let (xa, wa, aa, ba) = (
        x.detach(),
        args.w.detach(),
        args.a.detach(),
        args.b.detach(),
    );
    let bias = args.bias.map(Tensor::detach);
    let detached = LoraArgs {
        w: &wa,
        bias: bias.as_ref(),
        a: &aa,
        b: &ba,
        scale: args.scale,
    };
    let Some(LoraDirect { op, x2, a, b, dims }) = prepare(&xa, &detached, dy)? else {
        return Ok(None);
    };
    let y2 = x2.apply_op3_no_bwd(&a, &b, &op)?;
    let y2_shape = y2.shape().clone();
    let y = y2.reshape(dims)?;
    let x_shape = x.shape().clone();
    crate::tape::record(&[x, args.a, args.b], &y, move |g, _| {
        let g = g.reshape(y2_shape)?;
        // The op's backward does not read its output, so the tape does not keep it: the
        // gradient stands in for it.
        let (dx, da, db) = op.bwd(&x2, &a, &b, &g, &g)?;
        let dx = dx.map(|d| d.reshape(x_shape.clone())).transpose()?;
        Ok(vec![dx, da, db])
    })?;
    Ok(Some(y))
}

/// The forward and backward of [`lora_linear_with`] called directly, outside candle's
/// autograd, so a bench can drive the backward with a given dY: going through `backward()`
/// needs a scalar, and the `(y * dy).sum_all()` that makes one adds an elementwise pass,
/// candle's one-block reduction and its broadcast back to the timing.
pub struct LoraDirect {
    op: LoraOp,
    /// x as `[M, K]`, contiguous.
    x2: Tensor,
    a: Tensor,
    b: Tensor,
    /// The output's dims: x's with the last one N.
    dims: Vec<usize>,
}

impl LoraDirect {
    /// `None` where [`lora_linear_with`] would fall back to the reference.
    pub fn new(x: &Tensor, args: &LoraArgs, dy: DyPath) -> Result<Option<Self>> {
        prepare(x, args, dy)
    }

    /// `y` as `[M, N]`, by the same launches as [`lora_linear_with`]; keeps what
    /// [`Self::backward`] needs.
    pub fn forward(&self) -> Result<Tensor> {
        self.x2.apply_op3_no_bwd(&self.a, &self.b, &self.op)
    }

    /// `(dx, dA, dB)` for `dy: [M, N]` after [`Self::forward`]: exactly what candle's
    /// autograd calls for this op (W is frozen).
    pub fn backward(&self, y: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (dx, da, db) = self.op.bwd(&self.x2, &self.a, &self.b, y, dy)?;
        let some = |t: Option<Tensor>| {
            t.ok_or_else(|| candle_core::Error::Msg("lora backward: missing grad".into()))
        };
        Ok((some(dx)?, some(da)?, some(db)?))
    }
}

fn prepare(x: &Tensor, args: &LoraArgs, dy: DyPath) -> Result<Option<LoraDirect>> {
    let dtype = x.dtype();
    let same = [args.w, args.a, args.b]
        .into_iter()
        .chain(args.bias)
        .all(|t| t.dtype() == dtype);
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) || !same {
        return Ok(None);
    }
    let Ok(dev) = x.device().as_cuda_device() else {
        return Ok(None);
    };
    let k = x.dim(candle_core::D::Minus1)?;
    let (n, kw) = args.w.dims2()?;
    let (r, ka) = args.a.dims2()?;
    if kw != k || ka != k || args.b.dims() != [n, r] {
        candle_core::bail!(
            "lora: x [.., {k}], W {:?}, A {:?}, B {:?} do not fit W [N, K], A [r, K], B [N, r]",
            args.w.dims(),
            args.a.dims(),
            args.b.dims()
        );
    }
    if let Some(bias) = args.bias {
        if bias.dims() != [n] {
            candle_core::bail!("lora: bias {:?} is not [{n}]", bias.dims());
        }
    }
    let m = x.elem_count() / k.max(1);
    if m == 0 || n == 0 || k == 0 || r == 0 || compute_capability(dev)? < (8, 0) {
        return Ok(None);
    }
    for (v, what) in [(m * k.max(n), "rows x cols"), (n * k, "weight size")] {
        to_i32(v, what)?;
    }
    let op = LoraOp {
        w: args.w.detach().contiguous()?,
        bias: args.bias.map(|b| b.detach().contiguous()).transpose()?,
        scale: args.scale,
        dy,
        saved: Mutex::new(None),
    };
    let x2 = x.reshape((m, k))?.contiguous()?;
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("x has a last dim") = n;
    Ok(Some(LoraDirect {
        op,
        x2,
        a: args.a.contiguous()?,
        b: args.b.contiguous()?,
        dims,
    }))
}

struct LoraOp {
    /// `[N, K]`, frozen.
    w: Tensor,
    /// `[N]`, frozen.
    bias: Option<Tensor>,
    scale: f64,
    dy: DyPath,
    saved: Mutex<Option<Saved>>,
}

/// Written by the forward for the backward.
struct Saved {
    /// `[M, r8]`: `s x A^T` in the first r columns.
    u_ext: Tensor,
    /// `[N, r8]`: B in the first r columns.
    b_ext: Tensor,
}

/// `r + 1` (room for the bias column) rounded up to a multiple of 8, so the packed rows stay
/// 16-byte aligned for cuBLAS and cp.async.
fn padded_rank(r: usize, has_bias: bool) -> usize {
    (r + usize::from(has_bias)).div_ceil(8) * 8
}

fn cuda_dtype(dtype: DType) -> Result<cublas_sys::cudaDataType> {
    Ok(match dtype {
        DType::F32 => cublas_sys::cudaDataType::CUDA_R_32F,
        DType::BF16 => cublas_sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => cublas_sys::cudaDataType::CUDA_R_16F,
        dt => candle_core::bail!("lora: no cuBLAS type for {dt:?}"),
    })
}

/// Row-major `C[m, n] = alpha op(A) op(B) + beta C`, where `op(X) = X^T` when its flag is
/// set and every matrix is given by a device pointer and its row stride. cuBLAS is
/// column-major, so this computes `C^T = op(B)^T op(A)^T` there: through cuBLASLt's planned
/// (and, for the large products, timed) GEMMs where they serve (bf16/f16, every pointer
/// 256-byte aligned and every row stride a multiple of 16 bytes), on candle's cuBLAS handle
/// otherwise (f32, or a view at an odd offset).
#[allow(clippy::too_many_arguments)]
fn gemm(
    dev: &CudaDevice,
    dtype: DType,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    (a, lda, ta): (u64, usize, bool),
    (b, ldb, tb): (u64, usize, bool),
    beta: f32,
    (c, ldc): (u64, usize),
) -> Result<()> {
    let half = matches!(dtype, DType::BF16 | DType::F16);
    let aligned = [a, b, c].iter().all(|p| p % 256 == 0);
    let strides = [lda, ldb, ldc].iter().all(|ld| ld % 8 == 0);
    if half && aligned && strides && m > 0 && n > 0 && k > 0 {
        let problem = Problem {
            dtype,
            transa: tb,
            transb: ta,
            m: n as u64,
            n: m as u64,
            k: k as u64,
            lda: ldb as i64,
            ldb: lda as i64,
            ldc: ldc as i64,
            epilogue: Epilogue::Plain,
        };
        // SAFETY: the callers' buffers hold the matrices `problem` describes (cuBLASLt's A is
        // our b), checked aligned above, and stay live on this stream until the GEMM has run.
        return unsafe { Lt::of(dev)?.matmul(&problem, alpha, beta, b, a, c, None) };
    }
    use cublas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    let ty = cuda_dtype(dtype)?;
    let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
    let blas = dev.cublas_handle();
    // SAFETY: the pointers come from live device buffers of the sizes the callers checked;
    // alpha and beta are f32 as CUBLAS_COMPUTE_32F requires for every data type here.
    unsafe {
        cublas::gemm_ex(
            *blas.handle(),
            op(tb),
            op(ta),
            to_i32(n, "gemm n")?,
            to_i32(m, "gemm m")?,
            to_i32(k, "gemm k")?,
            (&alpha) as *const f32 as *const _,
            b as *const _,
            ty,
            to_i32(ldb, "gemm ldb")?,
            a as *const _,
            ty,
            to_i32(lda, "gemm lda")?,
            (&beta) as *const f32 as *const _,
            c as *mut _,
            ty,
            to_i32(ldc, "gemm ldc")?,
            cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    }
    .map_err(|e| candle_core::Error::Msg(format!("lora: cuBLAS gemm failed: {e:?}")))
}

/// The region plan of `lora_dy`: each block owns `mc` rows x `nc` columns of dY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DyPlan {
    rp: usize,
    mc: usize,
    nc: usize,
    nbx: usize,
    nby: usize,
}

/// Shared-memory budget of one `lora_dy` block (pipeline stages plus f32 accumulators). Two
/// blocks of up to this size fit an H100 SM (228 KB), but not always an A100 SM (164 KB, and
/// the driver reserves 1 KB per block): every rank-64 plan takes 86,016 B (53,248 B of
/// stages plus 64 + 64 accumulator rows x 64 x 4 B, all the budget leaves room for), so two
/// need 172,032 B and an A100 runs one such block per SM (the grid's ~2 blocks per SM then
/// run in two waves); rank-16/32 plans fit two only while they stay under about 81 KiB.
const DY_SMEM_BYTES: usize = 96 * 1024;

impl DyPlan {
    /// About two blocks per SM, with the regions' aspect chosen so that the partial sums
    /// (`nbx` copies of g, `nby` of dB) are as small as they can be for that many blocks.
    fn new(m: usize, n: usize, r: usize, sms: usize) -> Option<Self> {
        // The ranks `lora_dy` is instantiated for (kernels/lora.cu).
        let rp = [16, 32, 64].into_iter().find(|&rp| r <= rp)?;
        let p = (2 * sms).max(1) as f64;
        let round64 = |v: f64| ((v.max(1.0) / 64.0).ceil() as usize).max(1) * 64;
        let nbx_f = (p * n as f64 / m as f64).sqrt().max(1.0);
        let mut nc = round64(n as f64 / nbx_f);
        let nbx = n.div_ceil(nc);
        let nby_f = (p / nbx as f64).max(1.0);
        let mut mc = round64(m as f64 / nby_f);
        let acc_budget = DY_SMEM_BYTES - Self::stage_bytes(rp);
        while (mc + nc) * rp * 4 > acc_budget && mc + nc > 128 {
            if mc >= nc {
                mc = (mc / 2).div_ceil(64) * 64;
            } else {
                nc = (nc / 2).div_ceil(64) * 64;
            }
        }
        Some(Self {
            rp,
            mc,
            nc,
            nbx: n.div_ceil(nc),
            nby: m.div_ceil(mc),
        })
    }

    /// Two stages of a 64 x 64 dY tile plus 64-row tiles of B_ext and u_ext (rows padded
    /// by 8 elements), 2-byte elements.
    fn stage_bytes(rp: usize) -> usize {
        2 * (64 * 64 + 2 * 64 * (rp + 8)) * 2
    }

    fn smem_bytes(&self) -> usize {
        Self::stage_bytes(self.rp) + (self.mc + self.nc) * self.rp * 4
    }

    /// Bytes the fused pass moves beyond reading dY: partials written and read back.
    fn partial_bytes(&self, m: usize, n: usize) -> usize {
        2 * 4 * self.rp * (self.nbx * m + self.nby * n)
    }
}

impl LoraOp {
    fn saved(&self) -> MutexGuard<'_, Option<Saved>> {
        self.saved.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn forward<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        (sx, lx): (&CudaStorage, &Layout),
        (sa, la): (&CudaStorage, &Layout),
        (sb, lb): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let dev = sx.device();
        let (m, k) = lx.shape().dims2()?;
        let (r, _) = la.shape().dims2()?;
        let n = self.w.dim(0)?;
        let has_bias = self.bias.is_some();
        let r8 = padded_rank(r, has_bias);
        let x = contiguous_view::<T>(sx, lx)?;
        let a = contiguous_view::<T>(sa, la)?;
        let bm = contiguous_view::<T>(sb, lb)?;
        let (wg, wl) = self.w.storage_and_layout();
        let w = contiguous_view::<T>(cuda_storage(&wg)?, wl)?;
        let bias_guard = self.bias.as_ref().map(|t| t.storage_and_layout());
        let bias = match &bias_guard {
            Some((g, l)) => Some(contiguous_view::<T>(cuda_storage(g)?, l)?),
            None => None,
        };

        // SAFETY: cuBLAS writes the first r columns of u_ext, lora_pack the rest and all of
        // b_ext; y is written by the beta = 0 product before the beta = 1 one reads it.
        let mut u_ext = unsafe { alloc_out::<T>(dev, m * r8)? };
        let mut b_ext = unsafe { alloc_out::<T>(dev, n * r8)? };
        let mut y = unsafe { alloc_out::<T>(dev, m * n)? };

        let mut p = lora_params(m, n, r, r8, self.scale)?;
        {
            let stream = dev.cuda_stream();
            let mut ptrs = DevPtrs::new(&stream);
            p.bm = ptrs.read(&bm);
            p.bias = ptrs.read_opt(bias.as_ref());
            p.uext = ptrs.write(&mut u_ext);
            p.bext = ptrs.write(&mut b_ext);
            let name = format!("lora_pack_{}", T::DTYPE.as_str());
            let func = load_func(dev, "lora", &name)?;
            let cfg = grid_stride(dev, m * (r8 - r) + n * r8, 256)?;
            // SAFETY: u_ext [M, r8], b_ext [N, r8], B [N, r], bias [N] or null.
            unsafe { launch(dev, &func, &name, cfg, &p) }?;
        }
        self.forward_gemms(
            dev,
            T::DTYPE,
            (m, n, k, r, r8),
            (&x, &a, &w),
            &mut u_ext,
            &b_ext,
            &mut y,
        )?;
        drop(bias_guard);
        *self.saved() = Some(Saved {
            u_ext: tensor_from_slice(u_ext, dev, (m, r8)),
            b_ext: tensor_from_slice(b_ext, dev, (n, r8)),
        });
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            Shape::from((m, n)),
        ))
    }

    /// `u_ext[:, :r] = s x A^T`, `y = u_ext B_ext^T` (the rank-r term and the bias), then
    /// `y += x W^T` inside the base GEMM's accumulator.
    #[allow(clippy::too_many_arguments)]
    fn forward_gemms<T: CudaDType + DeviceRepr>(
        &self,
        dev: &CudaDevice,
        dt: DType,
        (m, n, k, r, r8): (usize, usize, usize, usize, usize),
        (x, a, w): (&CudaView<'_, T>, &CudaView<'_, T>, &CudaView<'_, T>),
        u_ext: &mut CudaSlice<T>,
        b_ext: &CudaSlice<T>,
        y: &mut CudaSlice<T>,
    ) -> Result<()> {
        // Raw pointers for cuBLAS; the guards keep cudarc's stream ordering until the
        // products are enqueued (cuBLAS runs on candle's stream, like the kernels).
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let (px, pa, pw) = (ptrs.read(x), ptrs.read(a), ptrs.read(w));
        let (pu, pbe, py) = (ptrs.write(u_ext), ptrs.read(b_ext), ptrs.write(y));
        let s = self.scale as f32;
        gemm(
            dev,
            dt,
            (m, r, k),
            s,
            (px, k, false),
            (pa, k, true),
            0.0,
            (pu, r8),
        )?;
        gemm(
            dev,
            dt,
            (m, n, r8),
            1.0,
            (pu, r8, false),
            (pbe, r8, true),
            0.0,
            (py, n),
        )?;
        gemm(
            dev,
            dt,
            (m, n, k),
            1.0,
            (px, k, false),
            (pw, k, true),
            1.0,
            (py, n),
        )
    }

    fn backward<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        x: &Tensor,
        a: &Tensor,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let saved = self.saved();
        let Some(saved) = saved.as_ref() else {
            candle_core::bail!("lora backward: the forward saved nothing");
        };
        let (m, k) = x.dims2()?;
        let r = a.dim(0)?;
        let n = self.w.dim(0)?;
        let r8 = saved.u_ext.dim(1)?;
        let (gx, lx) = x.storage_and_layout();
        let (ga, la) = a.storage_and_layout();
        let (gd, ld) = dy.storage_and_layout();
        let (gw, lw) = self.w.storage_and_layout();
        let (gu, lu) = saved.u_ext.storage_and_layout();
        let (gb, lb) = saved.b_ext.storage_and_layout();
        let sx = cuda_storage(&gx)?;
        let dev = sx.device().clone();
        let xv = contiguous_view::<T>(sx, lx)?;
        let av = contiguous_view::<T>(cuda_storage(&ga)?, la)?;
        let dyv = contiguous_view::<T>(cuda_storage(&gd)?, ld)?;
        let wv = contiguous_view::<T>(cuda_storage(&gw)?, lw)?;
        let uv = contiguous_view::<T>(cuda_storage(&gu)?, lu)?;
        let bv = contiguous_view::<T>(cuda_storage(&gb)?, lb)?;
        let dt = T::DTYPE;

        // SAFETY: every element of each is written below (by lora_dy_reduce or cuBLAS with
        // beta = 0, before any beta = 1 product reads it).
        let mut g = unsafe { alloc_out::<T>(&dev, m * r)? };
        let mut db = unsafe { alloc_out::<T>(&dev, n * r)? };
        let mut dx = unsafe { alloc_out::<T>(&dev, m * k)? };
        let mut da = unsafe { alloc_out::<T>(&dev, r * k)? };

        let plan = match (dt, self.dy) {
            (DType::F32, _) | (_, DyPath::Cublas) => None,
            _ if n % 8 != 0 => None,
            _ => DyPlan::new(m, n, r, sm_count(&dev)? as usize).filter(|p| {
                self.dy == DyPath::Fused
                    || m * n * dt.size_in_bytes() + p.partial_bytes(m, n)
                        < 2 * m * n * dt.size_in_bytes()
            }),
        };
        match plan {
            Some(p) => self.dy_fused(&dev, &p, (m, n, r, r8), (&dyv, &bv, &uv), &mut g, &mut db)?,
            None => self.dy_cublas(&dev, (m, n, r, r8), (&dyv, &bv, &uv), &mut g, &mut db)?,
        }
        dx_da_gemms(
            &dev,
            (m, n, k, r),
            (&g, &av, &dyv, &wv, &xv),
            &mut dx,
            &mut da,
        )?;
        Ok((
            tensor_from_slice(dx, &dev, (m, k)),
            tensor_from_slice(da, &dev, (r, k)),
            tensor_from_slice(db, &dev, (n, r)),
        ))
    }

    /// g = s dY B and dB = dY^T u_s as two cuBLAS products, each reading dY.
    #[allow(clippy::type_complexity)]
    fn dy_cublas<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        dev: &CudaDevice,
        (m, n, r, r8): (usize, usize, usize, usize),
        (dyv, bv, uv): (&CudaView<'_, T>, &CudaView<'_, T>, &CudaView<'_, T>),
        g: &mut CudaSlice<T>,
        db: &mut CudaSlice<T>,
    ) -> Result<()> {
        let dt = T::DTYPE;
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let (pd, pb, pu) = (ptrs.read(dyv), ptrs.read(bv), ptrs.read(uv));
        let (pg, pdb) = (ptrs.write(g), ptrs.write(db));
        let s = self.scale as f32;
        // g = s dY B
        gemm(
            dev,
            dt,
            (m, r, n),
            s,
            (pd, n, false),
            (pb, r8, false),
            0.0,
            (pg, r),
        )?;
        // dB = dY^T u_s
        gemm(
            dev,
            dt,
            (n, r, m),
            1.0,
            (pd, n, true),
            (pu, r8, false),
            0.0,
            (pdb, r),
        )
    }

    /// `lora_dy` then `lora_dy_reduce`: g = s dY B and dB = dY^T u_s from one read of dY.
    #[allow(clippy::type_complexity)]
    fn dy_fused<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        dev: &CudaDevice,
        plan: &DyPlan,
        (m, n, r, r8): (usize, usize, usize, usize),
        (dyv, bv, uv): (&CudaView<'_, T>, &CudaView<'_, T>, &CudaView<'_, T>),
        g: &mut CudaSlice<T>,
        db: &mut CudaSlice<T>,
    ) -> Result<()> {
        let dt = T::DTYPE.as_str();
        // SAFETY: block (x, y) writes rows [y*mc, ..) of part_g[x] and [x*nc, ..) of
        // part_b[y]; the regions tile [M] and [N] exactly, so every partial is written.
        let mut part_g = unsafe { alloc_out::<f32>(dev, plan.nbx * m * plan.rp)? };
        let mut part_b = unsafe { alloc_out::<f32>(dev, plan.nby * n * plan.rp)? };
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let p = LoraParams {
            dy: ptrs.read(dyv),
            bext: ptrs.read(bv),
            uext: ptrs.read(uv),
            part_g: ptrs.write(&mut part_g),
            part_b: ptrs.write(&mut part_b),
            g: ptrs.write(g),
            db: ptrs.write(db),
            rp: plan.rp as i32,
            mc: plan.mc as i32,
            nc: plan.nc as i32,
            nbx: plan.nbx as i32,
            nby: plan.nby as i32,
            ..lora_params(m, n, r, r8, self.scale)?
        };
        let name = format!("lora_dy_{dt}_r{}", plan.rp);
        let func = load_func(dev, "lora", &name)?;
        let smem = plan.smem_bytes();
        dev.cuda_stream().context().bind_to_thread().w()?;
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
        let cfg = LaunchConfig {
            grid_dim: (plan.nbx as u32, plan.nby as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: N % 8 == 0 and rows of u_ext/B_ext are r8 wide; partials sized by the plan.
        unsafe { launch(dev, &func, &name, cfg, &p) }?;
        let name = format!("lora_dy_reduce_{dt}");
        let func = load_func(dev, "lora", &name)?;
        let cfg = grid_stride(dev, (m + n) * r, 256)?;
        // SAFETY: g is [M, r], db is [N, r]; the partials were written just above.
        unsafe { launch(dev, &func, &name, cfg, &p) }
    }
}

/// `dx = g A`, then `dx += dY W` inside the base GEMM's accumulator; `dA = g^T x`.
#[allow(clippy::type_complexity)]
fn dx_da_gemms<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    (m, n, k, r): (usize, usize, usize, usize),
    (g, av, dyv, wv, xv): (
        &CudaSlice<T>,
        &CudaView<'_, T>,
        &CudaView<'_, T>,
        &CudaView<'_, T>,
        &CudaView<'_, T>,
    ),
    dx: &mut CudaSlice<T>,
    da: &mut CudaSlice<T>,
) -> Result<()> {
    let dt = T::DTYPE;
    let stream = dev.cuda_stream();
    let mut ptrs = DevPtrs::new(&stream);
    let (pg, pa, pd) = (ptrs.read(g), ptrs.read(av), ptrs.read(dyv));
    let (pw, px) = (ptrs.read(wv), ptrs.read(xv));
    let (pdx, pda) = (ptrs.write(dx), ptrs.write(da));
    gemm(
        dev,
        dt,
        (m, k, r),
        1.0,
        (pg, r, false),
        (pa, k, false),
        0.0,
        (pdx, k),
    )?;
    gemm(
        dev,
        dt,
        (m, k, n),
        1.0,
        (pd, n, false),
        (pw, k, false),
        1.0,
        (pdx, k),
    )?;
    gemm(
        dev,
        dt,
        (r, k, m),
        1.0,
        (pg, r, true),
        (px, k, false),
        0.0,
        (pda, k),
    )
}

impl CustomOp3 for LoraOp {
    fn name(&self) -> &'static str {
        "temper-lora-linear"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused LoRA op runs on CUDA only (use lora_linear_reference)")
    }

    fn cuda_fwd(
        &self,
        sx: &CudaStorage,
        lx: &Layout,
        sa: &CudaStorage,
        la: &Layout,
        sb: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let args = ((sx, lx), (sa, la), (sb, lb));
        match sx.dtype() {
            DType::F32 => self.forward::<f32>(args.0, args.1, args.2),
            DType::BF16 => self.forward::<half::bf16>(args.0, args.1, args.2),
            DType::F16 => self.forward::<half::f16>(args.0, args.1, args.2),
            dt => candle_core::bail!("lora: no kernel for {dt:?}"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        spans::timed(KernelOp::Lora, Pass::Backward, x.device(), || {
            // lora_dy loads dY in 16-byte chunks.
            let dy = contiguous16(grad)?;
            let (dx, da, db) = match x.dtype() {
                DType::F32 => self.backward::<f32>(x, a, &dy)?,
                DType::BF16 => self.backward::<half::bf16>(x, a, &dy)?,
                DType::F16 => self.backward::<half::f16>(x, a, &dy)?,
                dt => candle_core::bail!("lora backward: no kernel for {dt:?}"),
            };
            Ok((Some(dx), Some(da), Some(db)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dy_plans_tile_the_matrix_and_fit_shared_memory() {
        for (m, n, r) in [
            (8192usize, 4096usize, 16usize),
            (4096, 768, 8),
            (1, 8, 4),
            (37, 1000, 64),
            (100_000, 64, 33),
            (300, 1000, 17),
        ] {
            let p = DyPlan::new(m, n, r, 132).expect("rank <= 64");
            assert!(p.mc.is_multiple_of(64) && p.nc.is_multiple_of(64), "{p:?}");
            assert!(p.nbx * p.nc >= n && (p.nbx - 1) * p.nc < n, "{p:?}");
            assert!(p.nby * p.mc >= m && (p.nby - 1) * p.mc < m, "{p:?}");
            assert!(p.smem_bytes() <= DY_SMEM_BYTES, "{p:?}");
            assert!(p.rp >= r && [16, 32, 64].contains(&p.rp));
        }
        assert!(DyPlan::new(64, 64, 65, 132).is_none());
        // The large shape must win over two reads of dY.
        let p = DyPlan::new(8192, 4096, 16, 132).unwrap();
        assert!(p.partial_bytes(8192, 4096) < 8192 * 4096 * 2, "{p:?}");
        assert_eq!(padded_rank(16, true), 24);
        assert_eq!(padded_rank(16, false), 16);
        assert_eq!(padded_rank(5, false), 8);
    }
}
