//! Launchers of `kernels/layernorm.cu` for the op in `src/kernels/layernorm.rs`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Result, Tensor, WithDType};

use super::super::host::rows_cols;
use super::{
    alloc_out, contiguous_view, cuda_storage, launch, load_func, sm_count, vec16_chunk, DevPtr,
    KernelParams,
};
use super::{tensor_from_slice, to_i32, DevPtrs, LaunchConfig};

/// The Rust mirror of `struct LayerNormParams` in kernels/layernorm.cuh (field comments there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LayerNormParams {
    x: DevPtr,
    w: DevPtr,
    b: DevPtr,
    y: DevPtr,
    mean: DevPtr,
    rstd: DevPtr,
    dy: DevPtr,
    dx: DevPtr,
    partial: DevPtr,
    dw: DevPtr,
    db: DevPtr,
    r: DevPtr,
    s: DevPtr,
    ds: DevPtr,
    rows: i32,
    cols: i32,
    groups: i32,
    eps: f32,
}
const _: () = assert!(std::mem::size_of::<LayerNormParams>() == 128);
const _: () = assert!(std::mem::align_of::<LayerNormParams>() == 8);
// SAFETY: plain old data with the C layout of the kernels' struct (asserted above).
unsafe impl DeviceRepr for LayerNormParams {}
impl KernelParams for LayerNormParams {
    const STEMS: &'static [&'static str] = &["layernorm"];
}

/// Threads per block (`kThreads` in the kernel).
const THREADS: u32 = 256;

fn blocks(n: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (to_i32(n, "blocks")? as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Rows per block of the warp-per-row forward (`kWarps`), threads per block of the
/// warp-per-row backward (`kBwdThreads`), and their largest K (`kMaxK`).
const WARPS: usize = THREADS as usize / 32;
const BWD_THREADS: u32 = 128;
const MAX_K: usize = 4;

/// K, the 16-byte chunks per lane of the warp-per-row variant (`layernorm_{fwd,bwd}_<dtype>_k<K>`)
/// that fits a row of `cols` values of `T`, when every base offset keeps 16-byte alignment;
/// `None` sends the row to the block-per-row kernels.
fn warp_k<T>(cols: usize, offsets: &[usize]) -> Option<usize> {
    let k = (cols / vec16_chunk::<T>(cols, offsets)?).div_ceil(32);
    (1..=MAX_K).contains(&k).then_some(k)
}

type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// `(y, mean, rstd)`; with a residual `r` (x's shape and dtype), y holds the norm of `x + r`
/// and then the sum, one after the other (the norm first, at the buffer's aligned start,
/// for the GEMMs that read it).
pub fn forward(
    x: Arg,
    r: Option<Arg>,
    w: Arg,
    b: Arg,
    eps: f32,
) -> Result<(CudaStorage, Tensor, Tensor)> {
    match x.0.dtype() {
        DType::F32 => forward_t::<f32>(x, r, w, b, eps),
        DType::BF16 => forward_t::<half::bf16>(x, r, w, b, eps),
        DType::F16 => forward_t::<half::f16>(x, r, w, b, eps),
        dt => candle_core::bail!("layer_norm: no CUDA kernel for {dt:?}"),
    }
}

fn forward_t<T: CudaDType + DeviceRepr + WithDType>(
    (sx, lx): Arg,
    r: Option<Arg>,
    (sw, lw): Arg,
    (sb, lb): Arg,
    eps: f32,
) -> Result<(CudaStorage, Tensor, Tensor)> {
    let dev = sx.device();
    let (rows, cols) = rows_cols(lx)?;
    let x = contiguous_view::<T>(sx, lx)?;
    let r_layout = r.map(|(_, l)| l);
    let r = match r {
        Some((sr, lr)) => {
            if rows_cols(lr)? != (rows, cols) {
                candle_core::bail!("layer_norm: residual {:?} for x {:?}", lr.dims(), lx.dims());
            }
            Some(contiguous_view::<T>(sr, lr)?)
        }
        None => None,
    };
    let w = contiguous_view::<f32>(sw, lw)?;
    let b = contiguous_view::<f32>(sb, lb)?;
    let outputs = if r.is_some() { 2 } else { 1 };
    // SAFETY: one block per row writes its row of y (and of the sum), its mean and rstd.
    let mut y = unsafe { alloc_out::<T>(dev, outputs * rows * cols)? };
    let mut mean = unsafe { alloc_out::<f32>(dev, rows)? };
    let mut rstd = unsafe { alloc_out::<f32>(dev, rows)? };
    if rows > 0 && cols > 0 {
        let r_offset = r_layout.map_or(0, |l| l.start_offset());
        let warp = warp_k::<T>(cols, &[lx.start_offset(), r_offset, rows * cols]);
        let (name, cfg) = match warp {
            Some(k) => (
                format!("layernorm_fwd_{}_k{k}", T::DTYPE.as_str()),
                blocks(rows.div_ceil(WARPS))?,
            ),
            None => (
                format!("layernorm_fwd_{}", T::DTYPE.as_str()),
                blocks(rows)?,
            ),
        };
        let func = load_func(dev, "layernorm", &name)?;
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let out = ptrs.write(&mut y);
        // The norm first, then the sum.
        let s = match &r {
            Some(_) => out + (rows * cols * std::mem::size_of::<T>()) as u64,
            None => 0,
        };
        let p = LayerNormParams {
            x: ptrs.read(&x),
            w: ptrs.read(&w),
            b: ptrs.read(&b),
            y: out,
            mean: ptrs.write(&mut mean),
            rstd: ptrs.write(&mut rstd),
            r: ptrs.read_opt(r.as_ref()),
            s,
            rows: to_i32(rows, "rows")?,
            cols: to_i32(cols, "cols")?,
            eps,
            ..LayerNormParams::default()
        };
        // SAFETY: x (and r) hold rows * cols, y rows * cols per output, w and b cols, mean and
        // rstd rows elements; the warp variants' 16-byte accesses are aligned (warp_k).
        unsafe { launch(dev, &func, &name, cfg, &p) }?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        tensor_from_slice(mean, dev, rows),
        tensor_from_slice(rstd, dev, rows),
    ))
}

/// `(dx, dw, db)` from x, w, dy and the forward's statistics; `ds`, where given (x's shape
/// and dtype), is added to dx.
pub fn backward(
    x: Arg,
    w: Arg,
    dy: Arg,
    ds: Option<Arg>,
    stats: (&Tensor, &Tensor),
) -> Result<(CudaStorage, Tensor, Tensor)> {
    match x.0.dtype() {
        DType::F32 => backward_t::<f32>(x, w, dy, ds, stats),
        DType::BF16 => backward_t::<half::bf16>(x, w, dy, ds, stats),
        DType::F16 => backward_t::<half::f16>(x, w, dy, ds, stats),
        dt => candle_core::bail!("layer_norm backward: no CUDA kernel for {dt:?}"),
    }
}

fn backward_t<T: CudaDType + DeviceRepr + WithDType>(
    (sx, lx): Arg,
    (sw, lw): Arg,
    (sg, lg): Arg,
    ds: Option<Arg>,
    (mean, rstd): (&Tensor, &Tensor),
) -> Result<(CudaStorage, Tensor, Tensor)> {
    let dev = sx.device();
    let (rows, cols) = rows_cols(lx)?;
    let x = contiguous_view::<T>(sx, lx)?;
    let w = contiguous_view::<f32>(sw, lw)?;
    let g = contiguous_view::<T>(sg, lg)?;
    let ds_offset = ds.map_or(0, |(_, l)| l.start_offset());
    let ds = match ds {
        Some((s, l)) => {
            if rows_cols(l)? != (rows, cols) {
                candle_core::bail!(
                    "layer_norm backward: ds {:?} for x {:?}",
                    l.dims(),
                    lx.dims()
                );
            }
            Some(contiguous_view::<T>(s, l)?)
        }
        None => None,
    };
    let (ms, ml) = mean.storage_and_layout();
    let (rs, rl) = rstd.storage_and_layout();
    let mv = contiguous_view::<f32>(cuda_storage(&ms)?, ml)?;
    let rv = contiguous_view::<f32>(cuda_storage(&rs)?, rl)?;
    let warp = warp_k::<T>(cols, &[lx.start_offset(), lg.start_offset(), ds_offset]);
    // A few blocks per SM, each folding its rows' dw and db into one partial row pair.
    let sms = sm_count(dev)? as usize;
    // The warp backward: three blocks of four warps per SM fit its ~160 registers a thread.
    let groups = match warp {
        Some(_) => rows.div_ceil(BWD_THREADS as usize / 32).clamp(1, sms * 3),
        None => rows.clamp(1, sms * 4),
    };
    // SAFETY: the backward writes every dx element; the reduce every dw and db column.
    let mut dx = unsafe { alloc_out::<T>(dev, rows * cols)? };
    let mut dw = unsafe { alloc_out::<f32>(dev, cols)? };
    let mut db = unsafe { alloc_out::<f32>(dev, cols)? };
    // The warp variants write every partial entry (zeros where a block had no rows); the
    // block-per-row kernel adds into its partial row, which must start at zero.
    let len = (groups * 2 * cols).max(1);
    let mut partial = match (warp, rows) {
        // SAFETY: as above: every entry written before the reduce reads it.
        (Some(_), 1..) => unsafe { alloc_out::<f32>(dev, len)? },
        _ => dev.alloc_zeros::<f32>(len)?,
    };
    if cols > 0 {
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let p = LayerNormParams {
            x: ptrs.read(&x),
            w: ptrs.read(&w),
            dy: ptrs.read(&g),
            ds: ptrs.read_opt(ds.as_ref()),
            mean: ptrs.read(&mv),
            rstd: ptrs.read(&rv),
            dx: ptrs.write(&mut dx),
            partial: ptrs.write(&mut partial),
            dw: ptrs.write(&mut dw),
            db: ptrs.write(&mut db),
            rows: to_i32(rows, "rows")?,
            cols: to_i32(cols, "cols")?,
            groups: to_i32(groups, "groups")?,
            ..LayerNormParams::default()
        };
        if rows > 0 {
            let mut cfg = blocks(groups)?;
            let name = match warp {
                Some(k) => {
                    cfg.block_dim.0 = BWD_THREADS;
                    format!("layernorm_bwd_{}_k{k}", T::DTYPE.as_str())
                }
                None => format!("layernorm_bwd_{}", T::DTYPE.as_str()),
            };
            let func = load_func(dev, "layernorm", &name)?;
            // SAFETY: x, dy, dx hold rows * cols, w cols, stats rows, partial groups * 2 * cols;
            // the warp variants' 16-byte accesses are aligned (warp_k).
            unsafe { launch(dev, &func, &name, cfg, &p) }?;
        }
        let func = load_func(dev, "layernorm", "layernorm_dwdb_reduce")?;
        // SAFETY: 32 columns per block; each reads groups partial pairs, writes dw and db.
        unsafe {
            launch(
                dev,
                &func,
                "layernorm_dwdb_reduce",
                blocks(cols.div_ceil(32))?,
                &p,
            )
        }?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(dx, dev.clone()),
        tensor_from_slice(dw, dev, cols),
        tensor_from_slice(db, dev, cols),
    ))
}
