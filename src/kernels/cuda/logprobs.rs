//! Launchers of `kernels/logprobs.cu` for the op in `src/kernels/logprobs.rs`: one block per
//! row for the forward (log-probabilities and the saved log-sum-exp) and for the backward.
//! With the entropy, the forward's output is `[2, rows]` (the log-probabilities, then the
//! entropies) and so is the backward's upstream gradient.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Tensor, WithDType};

use super::super::host::rows_cols;
use super::super::logprobs::Shaping;
use super::{alloc_out, contiguous_view, cuda_storage, launch, load_func, DevPtr, KernelParams};
use super::{tensor_from_slice, to_i32, DevPtrs, LaunchConfig};

/// The Rust mirror of `struct LogprobsParams` in kernels/logprobs.cuh (field comments there).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct LogprobsParams {
    logits: DevPtr,
    targets: DevPtr,
    logp: DevPtr,
    lse: DevPtr,
    dlogp: DevPtr,
    dlogits: DevPtr,
    entropy: DevPtr,
    dentropy: DevPtr,
    rows: i32,
    vocab: i32,
    cap: f32,
    inv_temp: f32,
}
const _: () = assert!(std::mem::size_of::<LogprobsParams>() == 80);
const _: () = assert!(std::mem::align_of::<LogprobsParams>() == 8);
impl Default for LogprobsParams {
    /// No buffers, logits unshaped.
    fn default() -> Self {
        Self {
            logits: 0,
            targets: 0,
            logp: 0,
            lse: 0,
            dlogp: 0,
            dlogits: 0,
            entropy: 0,
            dentropy: 0,
            rows: 0,
            vocab: 0,
            cap: 0.0,
            inv_temp: 1.0,
        }
    }
}
// SAFETY: plain old data with the C layout of the kernels' struct (asserted above).
unsafe impl DeviceRepr for LogprobsParams {}
impl KernelParams for LogprobsParams {
    const STEMS: &'static [&'static str] = &["logprobs"];
}

/// Threads per block (`kThreads` in the kernel).
const THREADS: u32 = 256;

fn config(rows: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (to_i32(rows, "rows")? as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// What the forward computes besides the log-probabilities: the entropies too (the output
/// `[2, rows]`), and the logits' shaping.
#[derive(Clone, Copy, Debug)]
pub struct Outputs {
    pub entropy: bool,
    pub shaping: Shaping,
}

/// The kernels' `(cap, inv_temp)` for `s` (0 is no cap).
fn shaping_args(s: Shaping) -> (f32, f32) {
    (s.cap().unwrap_or(0.0), 1.0 / s.temperature)
}

/// `(out, lse [rows] f32)` of contiguous logits and u32 targets: `out` the f32 log-probabilities
/// `[rows]` of the shaped logits, or with the entropy `[2, rows]`, the softmax's entropies
/// after them.
pub fn forward(
    sx: &CudaStorage,
    lx: &Layout,
    st: &CudaStorage,
    lt: &Layout,
    o: Outputs,
) -> Result<(CudaStorage, Tensor)> {
    match sx.dtype() {
        DType::F32 => forward_t::<f32>(sx, lx, st, lt, o),
        DType::BF16 => forward_t::<half::bf16>(sx, lx, st, lt, o),
        DType::F16 => forward_t::<half::f16>(sx, lx, st, lt, o),
        dt => candle_core::bail!("logprobs: no CUDA kernel for {dt:?}"),
    }
}

/// Bytes of `rows` f32 values: the offset of the second half of a `[2, rows]` buffer.
fn half_offset(rows: usize) -> u64 {
    (rows * std::mem::size_of::<f32>()) as u64
}

fn forward_t<T: CudaDType + DeviceRepr + WithDType>(
    sx: &CudaStorage,
    lx: &Layout,
    st: &CudaStorage,
    lt: &Layout,
    Outputs { entropy, shaping }: Outputs,
) -> Result<(CudaStorage, Tensor)> {
    let dev = sx.device();
    let (rows, vocab) = rows_cols(lx)?;
    let x = contiguous_view::<T>(sx, lx)?;
    let t = contiguous_view::<u32>(st, lt)?;
    let outputs = if entropy { 2 } else { 1 };
    // SAFETY: one block per row writes its logp, lse and (with entropy) entropy.
    let mut out = unsafe { alloc_out::<f32>(dev, outputs * rows)? };
    let mut lse = unsafe { alloc_out::<f32>(dev, rows)? };
    if rows > 0 {
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let logits = ptrs.read(&x);
        let name = kernel::<T>("fwd", vocab, &[logits]);
        let func = load_func(dev, "logprobs", &name)?;
        let logp = ptrs.write(&mut out);
        let (cap, inv_temp) = shaping_args(shaping);
        let p = LogprobsParams {
            logits,
            targets: ptrs.read(&t),
            logp,
            lse: ptrs.write(&mut lse),
            entropy: if entropy { logp + half_offset(rows) } else { 0 },
            rows: to_i32(rows, "rows")?,
            vocab: to_i32(vocab, "vocab")?,
            cap,
            inv_temp,
            ..LogprobsParams::default()
        };
        // SAFETY: logits hold rows * vocab, targets and lse rows elements, out rows per
        // output; the 16-byte variant only runs on aligned rows (`kernel`).
        unsafe { launch(dev, &func, &name, config(rows)?, &p) }?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        tensor_from_slice(lse, dev, rows),
    ))
}

/// What the backward reads besides the logits and targets: the upstream f32 gradient (`[rows]`,
/// or `[2, rows]` with `entropy`), the saved lse, the forward's entropies where it gave them,
/// and the forward's shaping of the logits.
pub struct Upstream<'a> {
    pub grad: (&'a CudaStorage, &'a Layout),
    pub lse: &'a Tensor,
    pub entropy: Option<&'a Tensor>,
    pub shaping: Shaping,
}

/// `dlogits` (the logits' dtype) from the logits, targets and `up`.
pub fn backward(
    (sx, lx): (&CudaStorage, &Layout),
    (st, lt): (&CudaStorage, &Layout),
    up: &Upstream,
) -> Result<CudaStorage> {
    match sx.dtype() {
        DType::F32 => backward_t::<f32>((sx, lx), (st, lt), up),
        DType::BF16 => backward_t::<half::bf16>((sx, lx), (st, lt), up),
        DType::F16 => backward_t::<half::f16>((sx, lx), (st, lt), up),
        dt => candle_core::bail!("logprobs backward: no CUDA kernel for {dt:?}"),
    }
}

fn backward_t<T: CudaDType + DeviceRepr + WithDType>(
    (sx, lx): (&CudaStorage, &Layout),
    (st, lt): (&CudaStorage, &Layout),
    up: &Upstream,
) -> Result<CudaStorage> {
    let dev = sx.device();
    let (rows, vocab) = rows_cols(lx)?;
    let x = contiguous_view::<T>(sx, lx)?;
    // SAFETY: one block per row writes all of its row of dlogits.
    let mut dx = unsafe { alloc_out::<T>(dev, rows * vocab)? };
    if rows > 0 && vocab > 0 {
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let (x, dx) = (ptrs.read(&x), ptrs.write(&mut dx));
        launch_backward::<T>(dev, (rows, vocab), (x, dx), (st, lt), up)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
}

/// The backward written over the logits themselves (`logits` `[rows, vocab]`, contiguous, its
/// own storage): each element is read once, by the thread that then writes its gradient, so
/// the two may share a buffer. The loss head uses it to keep one `[rows, vocab]` buffer
/// instead of two.
pub fn backward_in_place(
    logits: &mut CudaStorage,
    (rows, vocab): (usize, usize),
    targets: (&CudaStorage, &Layout),
    up: &Upstream,
) -> Result<()> {
    fn go<T: CudaDType + DeviceRepr + WithDType>(
        logits: &mut CudaStorage,
        (rows, vocab): (usize, usize),
        targets: (&CudaStorage, &Layout),
        up: &Upstream,
    ) -> Result<()> {
        let dev = logits.device().clone();
        let x = logits.as_cuda_slice_mut::<T>()?;
        if x.len() < rows * vocab {
            candle_core::bail!("logprobs backward: {} logits for {rows} x {vocab}", x.len());
        }
        if rows > 0 && vocab > 0 {
            let stream = dev.cuda_stream();
            let mut ptrs = DevPtrs::new(&stream);
            let x = ptrs.write(x);
            launch_backward::<T>(&dev, (rows, vocab), (x, x), targets, up)?;
        }
        Ok(())
    }
    match logits.dtype() {
        DType::F32 => go::<f32>(logits, (rows, vocab), targets, up),
        DType::BF16 => go::<half::bf16>(logits, (rows, vocab), targets, up),
        DType::F16 => go::<half::f16>(logits, (rows, vocab), targets, up),
        dt => candle_core::bail!("logprobs backward: no CUDA kernel for {dt:?}"),
    }
}

/// The entry point of `pass` for rows of `vocab` values of `T` at the device addresses
/// `rows` (each row's start is its buffer's plus a multiple of `vocab`): the 16-byte variant
/// where every row starts 16-byte aligned, else the scalar one.
fn kernel<T: CudaDType + WithDType>(pass: &str, vocab: usize, rows: &[u64]) -> String {
    let size = std::mem::size_of::<T>();
    let vec = (vocab * size).is_multiple_of(16) && rows.iter().all(|a| a.is_multiple_of(16));
    let dtype = T::DTYPE.as_str();
    match vec {
        true => format!("logprobs_{pass}_vec_{dtype}"),
        false => format!("logprobs_{pass}_{dtype}"),
    }
}

/// Launches the backward over `rows x vocab` logits at device address `x`, writing the
/// gradient at `dx` (which may be `x`).
fn launch_backward<T: CudaDType + WithDType>(
    dev: &CudaDevice,
    (rows, vocab): (usize, usize),
    (x, dx): (u64, u64),
    (st, lt): (&CudaStorage, &Layout),
    up: &Upstream,
) -> Result<()> {
    let t = contiguous_view::<u32>(st, lt)?;
    let g = contiguous_view::<f32>(up.grad.0, up.grad.1)?;
    let f32_view = |x: &Tensor| x.to_dtype(DType::F32)?.contiguous();
    let lse = f32_view(up.lse)?;
    let (ls, ll) = lse.storage_and_layout();
    let lv = contiguous_view::<f32>(cuda_storage(&ls)?, ll)?;
    let h = up.entropy.map(f32_view).transpose()?;
    let hs = h.as_ref().map(|h| h.storage_and_layout());
    let hv = match &hs {
        Some((s, l)) => Some(contiguous_view::<f32>(cuda_storage(s)?, l)?),
        None => None,
    };
    let outputs = if hv.is_some() { 2 } else { 1 };
    if t.len() != rows
        || g.len() != outputs * rows
        || lv.len() != rows
        || hv.as_ref().is_some_and(|h| h.len() != rows)
    {
        candle_core::bail!("logprobs backward: per-row inputs do not have {rows} rows");
    }
    let name = kernel::<T>("bwd", vocab, &[x, dx]);
    let func = load_func(dev, "logprobs", &name)?;
    let stream = dev.cuda_stream();
    let mut ptrs = DevPtrs::new(&stream);
    let dlogp = ptrs.read(&g);
    let (cap, inv_temp) = shaping_args(up.shaping);
    let p = LogprobsParams {
        logits: x,
        targets: ptrs.read(&t),
        lse: ptrs.read(&lv),
        dlogp,
        dlogits: dx,
        entropy: ptrs.read_opt(hv.as_ref()),
        dentropy: if hv.is_some() {
            dlogp + half_offset(rows)
        } else {
            0
        },
        rows: to_i32(rows, "rows")?,
        vocab: to_i32(vocab, "vocab")?,
        cap,
        inv_temp,
        ..LogprobsParams::default()
    };
    // SAFETY: the caller's buffers at x and dx hold rows * vocab elements (and outlive the
    // launch: their guards are held by the caller), the rest rows elements.
    unsafe { launch(dev, &func, &name, config(rows)?, &p) }
}
