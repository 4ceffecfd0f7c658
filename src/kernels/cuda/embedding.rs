//! Launchers of `kernels/embedding.cu` for the op in `src/kernels/embedding.rs`: one block
//! per position for the lookup, one block per used row for the gradient.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Tensor, WithDType};

use super::{alloc_out, contiguous_view, cuda_storage, launch, load_func};
use super::{to_i32, DevPtrs, LaunchConfig};

/// The Rust mirror of `struct EmbeddingParams` in kernels/embedding.cuh (field comments there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct EmbeddingParams {
    table: u64,
    ids: u64,
    out: u64,
    dy: u64,
    dtable: u64,
    uniq: u64,
    offsets: u64,
    order: u64,
    n: i32,
    dim: i32,
    n_uniq: i32,
    vocab: i32,
}
const _: () = assert!(std::mem::size_of::<EmbeddingParams>() == 80);
const _: () = assert!(std::mem::align_of::<EmbeddingParams>() == 8);
// SAFETY: plain old data with the C layout of the kernels' struct (asserted above).
unsafe impl DeviceRepr for EmbeddingParams {}

/// Threads per block (`kThreads` in the kernel).
const THREADS: u32 = 256;

fn config(blocks: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (to_i32(blocks, "blocks")? as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `[n, H]` rows of the f32 `table` at `ids`, in `dtype`.
pub fn forward(
    s: &CudaStorage,
    l: &Layout,
    ids: &Tensor,
    dtype: DType,
) -> Result<(CudaStorage, Shape)> {
    match dtype {
        DType::F32 => forward_t::<f32>(s, l, ids),
        DType::BF16 => forward_t::<half::bf16>(s, l, ids),
        DType::F16 => forward_t::<half::f16>(s, l, ids),
        dt => candle_core::bail!("embedding: no CUDA kernel for {dt:?}"),
    }
}

fn forward_t<T: CudaDType + DeviceRepr + WithDType>(
    s: &CudaStorage,
    l: &Layout,
    ids: &Tensor,
) -> Result<(CudaStorage, Shape)> {
    let dev = s.device();
    let (vocab, h) = l.shape().dims2()?;
    let n = ids.elem_count();
    let table = contiguous_view::<f32>(s, l)?;
    let (is, il) = ids.storage_and_layout();
    let idv = contiguous_view::<u32>(cuda_storage(&is)?, il)?;
    // SAFETY: one block per position writes its whole row.
    let mut out = unsafe { alloc_out::<T>(dev, n * h)? };
    if n > 0 && h > 0 {
        let name = format!("embedding_fwd_{}", T::DTYPE.as_str());
        let func = load_func(dev, "embedding", &name)?;
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let p = EmbeddingParams {
            table: ptrs.read(&table),
            ids: ptrs.read(&idv),
            out: ptrs.write(&mut out),
            n: to_i32(n, "positions")?,
            dim: to_i32(h, "dim")?,
            vocab: to_i32(vocab, "vocab")?,
            ..EmbeddingParams::default()
        };
        // SAFETY: table holds vocab * h, ids n, out n * h elements.
        unsafe { launch(dev, &func, &name, config(n)?, &p) }?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((n, h)),
    ))
}

/// The f32 `[vocab, H]` gradient of the table from `dy [n, H]` and the host's ids.
pub fn backward(
    s: &CudaStorage,
    l: &Layout,
    ids: &[u32],
    vocab: usize,
) -> Result<(CudaStorage, Shape)> {
    match s.dtype() {
        DType::F32 => backward_t::<f32>(s, l, ids, vocab),
        DType::BF16 => backward_t::<half::bf16>(s, l, ids, vocab),
        DType::F16 => backward_t::<half::f16>(s, l, ids, vocab),
        dt => candle_core::bail!("embedding backward: no CUDA kernel for {dt:?}"),
    }
}

fn backward_t<T: CudaDType + DeviceRepr + WithDType>(
    s: &CudaStorage,
    l: &Layout,
    ids: &[u32],
    vocab: usize,
) -> Result<(CudaStorage, Shape)> {
    let dev = s.device();
    let (n, h) = l.shape().dims2()?;
    if n != ids.len() {
        candle_core::bail!(
            "embedding backward: {n} gradient rows for {} ids",
            ids.len()
        );
    }
    let dy = contiguous_view::<T>(s, l)?;
    let (uniq, offsets, order) = super::super::embedding::group_by_row(ids);
    // Ids outside the table got NaN rows in the forward; they have no gradient row.
    let keep = uniq.iter().take_while(|&&u| (u as usize) < vocab).count();
    let stream = dev.cuda_stream();
    let mut dtable = dev.alloc_zeros::<f32>((vocab * h).max(1))?;
    if keep > 0 && h > 0 {
        let uniq_d = stream
            .clone_htod(&uniq[..keep])
            .map_err(candle_core::Error::wrap)?;
        let off_d = stream
            .clone_htod(&offsets[..=keep])
            .map_err(candle_core::Error::wrap)?;
        let ord_d = stream
            .clone_htod(&order)
            .map_err(candle_core::Error::wrap)?;
        let name = format!("embedding_bwd_{}", T::DTYPE.as_str());
        let func = load_func(dev, "embedding", &name)?;
        let mut ptrs = DevPtrs::new(&stream);
        let p = EmbeddingParams {
            dy: ptrs.read(&dy),
            dtable: ptrs.write(&mut dtable),
            uniq: ptrs.read(&uniq_d),
            offsets: ptrs.read(&off_d),
            order: ptrs.read(&ord_d),
            n: to_i32(n, "positions")?,
            dim: to_i32(h, "dim")?,
            n_uniq: to_i32(keep, "rows")?,
            vocab: to_i32(vocab, "vocab")?,
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
