//! Launchers of `kernels/embedding.cu` for the op in `src/kernels/embedding.rs`: one block
//! per position for the lookup, one block per used row for the gradient.

use candle_core::backend::BackendStorage;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::cuda_backend::cudarc::driver::sys::{CUevent_flags, CUstreamCaptureStatus};
use candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, CudaSlice, DeviceRepr, PinnedHostSlice,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Tensor, WithDType};

use super::super::embedding::Grouping;
use super::{
    alloc_out, contiguous_view, cuda_storage, grid_stride, launch, load_func, DevPtr, KernelParams,
};
use super::{to_i32, DevPtrs, LaunchConfig};

/// The Rust mirror of `struct EmbeddingParams` in kernels/embedding.cuh (field comments there).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct EmbeddingParams {
    table: DevPtr,
    ids: DevPtr,
    out: DevPtr,
    dy: DevPtr,
    dtable: DevPtr,
    uniq: DevPtr,
    offsets: DevPtr,
    order: DevPtr,
    table2: DevPtr,
    ids2: DevPtr,
    n: i32,
    dim: i32,
    n_uniq: i32,
    vocab: i32,
    accumulate: i32,
    vocab2: i32,
    scale: f32,
    unused_: i32,
}
const _: () = assert!(std::mem::size_of::<EmbeddingParams>() == 112);

impl Default for EmbeddingParams {
    /// No buffers, no sizes, a scale of 1 (the kernels' default too).
    fn default() -> Self {
        Self {
            table: 0,
            ids: 0,
            out: 0,
            dy: 0,
            dtable: 0,
            uniq: 0,
            offsets: 0,
            order: 0,
            table2: 0,
            ids2: 0,
            n: 0,
            dim: 0,
            n_uniq: 0,
            vocab: 0,
            accumulate: 0,
            vocab2: 0,
            scale: 1.0,
            unused_: 0,
        }
    }
}
const _: () = assert!(std::mem::align_of::<EmbeddingParams>() == 8);
// SAFETY: plain old data with the C layout of the kernels' struct (asserted above).
unsafe impl DeviceRepr for EmbeddingParams {}
impl KernelParams for EmbeddingParams {
    const STEMS: &'static [&'static str] = &["embedding"];
}

/// Threads per block (`kThreads` in the kernel).
const THREADS: u32 = 256;

fn config(blocks: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (to_i32(blocks, "blocks")? as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// A position table and the position of each row, for `embedding_fwd2`.
pub type Positions<'a> = ((&'a CudaStorage, &'a Layout), &'a Tensor);

/// What a lookup adds to the token table's rows: the position table's rows at their positions
/// (`embedding_fwd2`, one dtype for both tables), or a scale (Gemma's).
#[derive(Clone, Copy)]
pub enum Extra<'a> {
    Positions(Positions<'a>),
    Scale(f32),
}

/// `[n, H]` rows of the token table (f32, bf16 or f16) at `ids` with `extra`, in `dtype`.
pub fn forward(
    tok: (&CudaStorage, &Layout),
    ids: &Tensor,
    extra: Extra,
    dtype: DType,
) -> Result<(CudaStorage, Shape)> {
    match dtype {
        DType::F32 => forward_out::<f32>(tok, ids, extra),
        DType::BF16 => forward_out::<half::bf16>(tok, ids, extra),
        DType::F16 => forward_out::<half::f16>(tok, ids, extra),
        dt => candle_core::bail!("embedding: no CUDA kernel for {dt:?}"),
    }
}

fn forward_out<T: CudaDType + DeviceRepr + WithDType>(
    tok: (&CudaStorage, &Layout),
    ids: &Tensor,
    extra: Extra,
) -> Result<(CudaStorage, Shape)> {
    let dt = tok.0.dtype();
    if let Extra::Positions(((sp, _), _)) = extra {
        if sp.dtype() != dt {
            candle_core::bail!(
                "embedding: token table {dt:?}, position table {:?}: one dtype",
                sp.dtype()
            );
        }
    }
    match dt {
        DType::F32 => forward_t::<f32, T>(tok, ids, extra),
        DType::BF16 => forward_t::<half::bf16, T>(tok, ids, extra),
        DType::F16 => forward_t::<half::f16, T>(tok, ids, extra),
        dt => candle_core::bail!("embedding: no CUDA kernel for a {dt:?} table"),
    }
}

fn forward_t<TT: CudaDType + WithDType, T: CudaDType + DeviceRepr + WithDType>(
    (s, l): (&CudaStorage, &Layout),
    ids: &Tensor,
    extra: Extra,
) -> Result<(CudaStorage, Shape)> {
    let (pos, scale) = match extra {
        Extra::Positions(p) => (Some(p), 1.0),
        Extra::Scale(s) => (None, s),
    };
    let dev = s.device();
    let (vocab, h) = l.shape().dims2()?;
    let n = ids.elem_count();
    let vocab2 = match pos {
        Some(((_, lp), positions)) => {
            let (vocab2, h2) = lp.shape().dims2()?;
            if h2 != h || positions.elem_count() != n {
                candle_core::bail!(
                    "embedding: token table {:?}, position table {:?}, {n} ids, {} positions",
                    l.shape(),
                    lp.shape(),
                    positions.elem_count()
                );
            }
            vocab2
        }
        None => 0,
    };
    let table = contiguous_view::<TT>(s, l)?;
    let table2 = match pos {
        Some(((sp, lp), _)) => Some(contiguous_view::<TT>(sp, lp)?),
        None => None,
    };
    let (is, il) = ids.storage_and_layout();
    let idv = contiguous_view::<u32>(cuda_storage(&is)?, il)?;
    let pos_guard = pos.map(|(_, positions)| positions.storage_and_layout());
    let posv = match &pos_guard {
        Some((ps, pl)) => Some(contiguous_view::<u32>(cuda_storage(ps)?, pl)?),
        None => None,
    };
    // SAFETY: one block per position writes its whole row.
    let mut out = unsafe { alloc_out::<T>(dev, n * h)? };
    if n > 0 && h > 0 {
        let family = match pos {
            Some(_) => "embedding_fwd2",
            None => "embedding_fwd",
        };
        let name = format!("{family}_{}_{}", TT::DTYPE.as_str(), T::DTYPE.as_str());
        let func = load_func(dev, "embedding", &name)?;
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let p = EmbeddingParams {
            table: ptrs.read(&table),
            table2: ptrs.read_opt(table2.as_ref()),
            ids: ptrs.read(&idv),
            ids2: ptrs.read_opt(posv.as_ref()),
            out: ptrs.write(&mut out),
            n: to_i32(n, "positions")?,
            dim: to_i32(h, "dim")?,
            vocab: to_i32(vocab, "vocab")?,
            vocab2: to_i32(vocab2, "positions table")?,
            scale,
            ..EmbeddingParams::default()
        };
        // SAFETY: the tables hold vocab * h (and vocab2 * h), ids (and positions) n, out n * h.
        unsafe { launch(dev, &func, &name, config(n)?, &p) }?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((n, h)),
    ))
}

/// The f32 `[vocab, H]` gradient of the table from `dy [n, H]` and the positions' grouping,
/// each row's sum times `scale` (the forward's): from zeros, or from `init` (the gradient so
/// far, `[vocab, H]` in any float dtype).
pub(crate) fn backward(
    (s, l): (&CudaStorage, &Layout),
    grouping: &Grouping,
    (vocab, scale): (usize, f32),
    init: Option<(&CudaStorage, &Layout)>,
) -> Result<(CudaStorage, Shape)> {
    let rows = (vocab, scale);
    match s.dtype() {
        DType::F32 => backward_t::<f32>((s, l), grouping, rows, init),
        DType::BF16 => backward_t::<half::bf16>((s, l), grouping, rows, init),
        DType::F16 => backward_t::<half::f16>((s, l), grouping, rows, init),
        dt => candle_core::bail!("embedding backward: no CUDA kernel for {dt:?}"),
    }
}

fn backward_t<T: CudaDType + DeviceRepr + WithDType>(
    (s, l): (&CudaStorage, &Layout),
    grouping: &Grouping,
    (vocab, scale): (usize, f32),
    init: Option<(&CudaStorage, &Layout)>,
) -> Result<(CudaStorage, Shape)> {
    let dev = s.device();
    let (n, h) = l.shape().dims2()?;
    let dy = contiguous_view::<T>(s, l)?;
    let stream = dev.cuda_stream();
    let total = vocab * h;
    let mut dtable = match init {
        None => dev.alloc_zeros::<f32>(total.max(1))?,
        Some((si, li)) => {
            // SAFETY: the init kernel below writes all vocab * h elements.
            let mut d = unsafe { alloc_out::<f32>(dev, total.max(1))? };
            match si.dtype() {
                DType::F32 => widen::<f32>(si, li, &mut d, vocab, h)?,
                DType::BF16 => widen::<half::bf16>(si, li, &mut d, vocab, h)?,
                DType::F16 => widen::<half::f16>(si, li, &mut d, vocab, h)?,
                dt => candle_core::bail!("embedding backward: a gradient so far in {dt:?}"),
            }
            d
        }
    };
    if let (Some((uniq, offsets, order)), true) = (&grouping.rows, h > 0) {
        let keep = uniq.elem_count();
        let (us, ul) = uniq.storage_and_layout();
        let (os, ol) = offsets.storage_and_layout();
        let (rs, rl) = order.storage_and_layout();
        let uv = contiguous_view::<u32>(cuda_storage(&us)?, ul)?;
        let ov = contiguous_view::<u32>(cuda_storage(&os)?, ol)?;
        let rv = contiguous_view::<u32>(cuda_storage(&rs)?, rl)?;
        let name = format!("embedding_bwd_{}", T::DTYPE.as_str());
        let func = load_func(dev, "embedding", &name)?;
        let mut ptrs = DevPtrs::new(&stream);
        let p = EmbeddingParams {
            dy: ptrs.read(&dy),
            dtable: ptrs.write(&mut dtable),
            uniq: ptrs.read(&uv),
            offsets: ptrs.read(&ov),
            order: ptrs.read(&rv),
            n: to_i32(n, "positions")?,
            dim: to_i32(h, "dim")?,
            n_uniq: to_i32(keep, "rows")?,
            vocab: to_i32(vocab, "vocab")?,
            accumulate: i32::from(init.is_some()),
            scale,
            ..EmbeddingParams::default()
        };
        // SAFETY: dy holds n * h, dtable vocab * h; every uniq row is below vocab and every
        // order entry below n.
        unsafe { launch(dev, &func, &name, config(keep)?, &p) }?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(dtable, dev.clone()),
        Shape::from((vocab, h)),
    ))
}

/// `d` = the `[vocab, h]` gradient in `si`, widened to f32 (`embedding_init_<dtype>`).
fn widen<S: CudaDType + DeviceRepr + WithDType>(
    si: &CudaStorage,
    li: &Layout,
    d: &mut CudaSlice<f32>,
    vocab: usize,
    h: usize,
) -> Result<()> {
    let total = vocab * h;
    if li.shape().elem_count() != total {
        candle_core::bail!(
            "embedding backward: a gradient so far of {:?} for a [{vocab}, {h}] table",
            li.shape()
        );
    }
    if total == 0 {
        return Ok(());
    }
    let dev = si.device();
    let src = contiguous_view::<S>(si, li)?;
    let name = format!("embedding_init_{}", S::DTYPE.as_str());
    let func = load_func(dev, "embedding", &name)?;
    let stream = dev.cuda_stream();
    let mut ptrs = DevPtrs::new(&stream);
    let p = EmbeddingParams {
        dy: ptrs.read(&src),
        dtable: ptrs.write(d),
        dim: to_i32(h, "dim")?,
        vocab: to_i32(vocab, "vocab")?,
        ..EmbeddingParams::default()
    };
    // SAFETY: the source and d both hold vocab * h elements.
    unsafe { launch(dev, &func, &name, grid_stride(dev, total, THREADS)?, &p) }
}

/// Page-locked buffers for [`PinnedIds`], reused: freeing page-locked memory can synchronize
/// the device, which is what the copy exists to avoid. Each keeps the event of its last copy.
static POOL: Mutex<Vec<Pooled>> = Mutex::new(Vec::new());

/// Buffers kept for reuse at most; past that the smallest is freed.
const POOLED: usize = 16;

struct Pooled {
    buf: PinnedHostSlice<u32>,
    /// Recorded after the buffer's last copy, if it had one.
    done: Option<CudaEvent>,
}

/// A u32 tensor on its way to the host (`host_ids::HostIds` on CUDA): copied into page-locked
/// memory behind the work queued so far, and read later, once the host has queued more work
/// (the embedding's backward reads the ids its forward copied; the decode loop queues the next
/// step first). Reading them with `to_vec1` would make the host wait for the device to drain
/// and leave the device idle while the host then works on them.
pub struct PinnedIds {
    slot: Option<Pooled>,
    n: usize,
}

impl PinnedIds {
    /// Queues the copy of `ids` (u32, contiguous) on candle's stream.
    pub fn start(ids: &Tensor) -> Result<Self> {
        let (s, l) = ids.storage_and_layout();
        let s = cuda_storage(&s)?;
        let view = contiguous_view::<u32>(s, l)?;
        let n = l.shape().elem_count();
        let stream = s.device().cuda_stream();
        // Its events and the waits on them are illegal in a CUDA graph capture (the decode
        // step copies its ids before and after a step, never inside one).
        if stream.capture_status().map_err(candle_core::Error::wrap)?
            != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
        {
            candle_core::bail!("ids: a host copy queued inside a CUDA graph capture");
        }
        let ctx = stream.context();
        let pooled = {
            let mut pool = POOL.lock().unwrap_or_else(PoisonError::into_inner);
            // The smallest buffer of this context that holds n.
            let fits = (0..pool.len())
                .filter(|&i| Arc::ptr_eq(pool[i].buf.context(), ctx) && pool[i].buf.len() >= n)
                .min_by_key(|&i| pool[i].buf.len());
            fits.map(|i| pool.swap_remove(i))
        };
        let mut slot = match pooled {
            Some(p) => p,
            None => Pooled {
                // SAFETY: written by the copy below before anything reads it (`read` waits).
                buf: unsafe { ctx.alloc_pinned_with_flags::<u32>(n.max(1), 0) }
                    .map_err(candle_core::Error::wrap)?,
                done: None,
            },
        };
        if n > 0 {
            // A buffer's last copy may have been queued on another thread's stream.
            if let Some(prev) = &slot.done {
                stream.wait(prev).map_err(candle_core::Error::wrap)?;
            }
            let dst = slot.buf.as_mut_slice().map_err(candle_core::Error::wrap)?;
            // Into exactly n elements: cudarc copies the destination's whole length.
            stream
                .memcpy_dtoh(&view, &mut dst[..n])
                .map_err(candle_core::Error::wrap)?;
            // The buffer's own event cannot stand in: cudarc records it only when it manages
            // several streams' synchronization, which candle's one stream does not ask for,
            // and waiting on an event never recorded returns at once.
            let flags = CUevent_flags::CU_EVENT_DISABLE_TIMING;
            slot.done = Some(
                stream
                    .record_event(Some(flags))
                    .map_err(candle_core::Error::wrap)?,
            );
        }
        Ok(Self {
            slot: Some(slot),
            n,
        })
    }

    /// The ids, waiting for the copy if it has not finished.
    pub fn read(self) -> Result<Vec<u32>> {
        let Some(slot) = self.slot.as_ref() else {
            candle_core::bail!("ids: the host buffer is gone");
        };
        if let Some(done) = &slot.done {
            done.synchronize().map_err(candle_core::Error::wrap)?;
        }
        let all = slot.buf.as_slice().map_err(candle_core::Error::wrap)?;
        Ok(all[..self.n.min(all.len())].to_vec())
    }
}

impl Drop for PinnedIds {
    fn drop(&mut self) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        let mut pool = POOL.lock().unwrap_or_else(PoisonError::into_inner);
        pool.push(slot);
        if pool.len() > POOLED {
            let smallest = (0..pool.len()).min_by_key(|&i| pool[i].buf.len());
            if let Some(i) = smallest {
                let gone = pool.swap_remove(i);
                // Its copy must have landed before its memory is freed.
                if let Some(done) = &gone.done {
                    let _ = done.synchronize();
                }
            }
        }
    }
}
