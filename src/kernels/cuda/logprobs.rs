//! Launchers of `kernels/logprobs.cu` for the op in `src/kernels/logprobs.rs`: one block per
//! row for the forward (log-probabilities and the saved log-sum-exp) and for the backward.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Tensor, WithDType};

use super::super::host::rows_cols;
use super::{alloc_out, contiguous_view, cuda_storage, launch, load_func, DevPtr, KernelParams};
use super::{tensor_from_slice, to_i32, DevPtrs, LaunchConfig};

/// The Rust mirror of `struct LogprobsParams` in kernels/logprobs.cuh (field comments there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LogprobsParams {
    logits: DevPtr,
    targets: DevPtr,
    logp: DevPtr,
    lse: DevPtr,
    dlogp: DevPtr,
    dlogits: DevPtr,
    rows: i32,
    vocab: i32,
}
const _: () = assert!(std::mem::size_of::<LogprobsParams>() == 56);
const _: () = assert!(std::mem::align_of::<LogprobsParams>() == 8);
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

/// `(logp [rows] f32, lse [rows] f32)` of contiguous logits and u32 targets.
pub fn forward(
    sx: &CudaStorage,
    lx: &Layout,
    st: &CudaStorage,
    lt: &Layout,
) -> Result<(CudaStorage, Tensor)> {
    match sx.dtype() {
        DType::F32 => forward_t::<f32>(sx, lx, st, lt),
        DType::BF16 => forward_t::<half::bf16>(sx, lx, st, lt),
        DType::F16 => forward_t::<half::f16>(sx, lx, st, lt),
        dt => candle_core::bail!("logprobs: no CUDA kernel for {dt:?}"),
    }
}

fn forward_t<T: CudaDType + DeviceRepr + WithDType>(
    sx: &CudaStorage,
    lx: &Layout,
    st: &CudaStorage,
    lt: &Layout,
) -> Result<(CudaStorage, Tensor)> {
    let dev = sx.device();
    let (rows, vocab) = rows_cols(lx)?;
    let x = contiguous_view::<T>(sx, lx)?;
    let t = contiguous_view::<u32>(st, lt)?;
    // SAFETY: one block per row writes its logp and lse.
    let mut logp = unsafe { alloc_out::<f32>(dev, rows)? };
    let mut lse = unsafe { alloc_out::<f32>(dev, rows)? };
    if rows > 0 {
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let logits = ptrs.read(&x);
        let name = kernel::<T>("fwd", vocab, &[logits]);
        let func = load_func(dev, "logprobs", &name)?;
        let p = LogprobsParams {
            logits,
            targets: ptrs.read(&t),
            logp: ptrs.write(&mut logp),
            lse: ptrs.write(&mut lse),
            rows: to_i32(rows, "rows")?,
            vocab: to_i32(vocab, "vocab")?,
            ..LogprobsParams::default()
        };
        // SAFETY: logits hold rows * vocab, targets, logp and lse rows elements; the 16-byte
        // variant only runs on aligned rows (`kernel`).
        unsafe { launch(dev, &func, &name, config(rows)?, &p) }?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(logp, dev.clone()),
        tensor_from_slice(lse, dev, rows),
    ))
}

/// `dlogits` (the logits' dtype) from the logits, targets, upstream f32 gradient and saved lse.
pub fn backward(
    (sx, lx): (&CudaStorage, &Layout),
    (st, lt): (&CudaStorage, &Layout),
    (sg, lg): (&CudaStorage, &Layout),
    lse: &Tensor,
) -> Result<CudaStorage> {
    match sx.dtype() {
        DType::F32 => backward_t::<f32>((sx, lx), (st, lt), (sg, lg), lse),
        DType::BF16 => backward_t::<half::bf16>((sx, lx), (st, lt), (sg, lg), lse),
        DType::F16 => backward_t::<half::f16>((sx, lx), (st, lt), (sg, lg), lse),
        dt => candle_core::bail!("logprobs backward: no CUDA kernel for {dt:?}"),
    }
}

fn backward_t<T: CudaDType + DeviceRepr + WithDType>(
    (sx, lx): (&CudaStorage, &Layout),
    (st, lt): (&CudaStorage, &Layout),
    (sg, lg): (&CudaStorage, &Layout),
    lse: &Tensor,
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
        launch_backward::<T>(dev, (rows, vocab), (x, dx), (st, lt), (sg, lg), lse)?;
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
    dlogp: (&CudaStorage, &Layout),
    lse: &Tensor,
) -> Result<()> {
    fn go<T: CudaDType + DeviceRepr + WithDType>(
        logits: &mut CudaStorage,
        (rows, vocab): (usize, usize),
        targets: (&CudaStorage, &Layout),
        dlogp: (&CudaStorage, &Layout),
        lse: &Tensor,
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
            launch_backward::<T>(&dev, (rows, vocab), (x, x), targets, dlogp, lse)?;
        }
        Ok(())
    }
    match logits.dtype() {
        DType::F32 => go::<f32>(logits, (rows, vocab), targets, dlogp, lse),
        DType::BF16 => go::<half::bf16>(logits, (rows, vocab), targets, dlogp, lse),
        DType::F16 => go::<half::f16>(logits, (rows, vocab), targets, dlogp, lse),
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
    (sg, lg): (&CudaStorage, &Layout),
    lse: &Tensor,
) -> Result<()> {
    let t = contiguous_view::<u32>(st, lt)?;
    let g = contiguous_view::<f32>(sg, lg)?;
    let lse = lse.to_dtype(DType::F32)?.contiguous()?;
    let (ls, ll) = lse.storage_and_layout();
    let lv = contiguous_view::<f32>(cuda_storage(&ls)?, ll)?;
    if t.len() != rows || g.len() != rows || lv.len() != rows {
        candle_core::bail!("logprobs backward: per-row inputs do not have {rows} rows");
    }
    let name = kernel::<T>("bwd", vocab, &[x, dx]);
    let func = load_func(dev, "logprobs", &name)?;
    let stream = dev.cuda_stream();
    let mut ptrs = DevPtrs::new(&stream);
    let p = LogprobsParams {
        logits: x,
        targets: ptrs.read(&t),
        lse: ptrs.read(&lv),
        dlogp: ptrs.read(&g),
        dlogits: dx,
        rows: to_i32(rows, "rows")?,
        vocab: to_i32(vocab, "vocab")?,
        ..LogprobsParams::default()
    };
    // SAFETY: the caller's buffers at x and dx hold rows * vocab elements (and outlive the
    // launch: their guards are held by the caller), the rest rows elements.
    unsafe { launch(dev, &func, &name, config(rows)?, &p) }
}
