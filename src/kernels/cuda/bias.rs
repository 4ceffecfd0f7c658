//! Launchers of `kernels/bias.cu` for the op in `src/kernels/bias.rs`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Result, WithDType};

use super::super::bias::BiasAct;
use super::super::host::rows_cols;
use super::{
    alloc_out, contiguous_view, launch, load_func, sm_count, vec16_chunk, DevPtr, KernelParams,
};
use super::{to_i32, DevPtrs, LaunchConfig};

/// The Rust mirror of `struct BiasParams` in kernels/bias.cuh (field comments there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct BiasParams {
    y: DevPtr,
    b: DevPtr,
    dy: DevPtr,
    out: DevPtr,
    partial: DevPtr,
    db: DevPtr,
    n: i64,
    rows: i32,
    cols: i32,
    groups: i32,
    act: i32,
}
const _: () = assert!(std::mem::size_of::<BiasParams>() == 72);
const _: () = assert!(std::mem::align_of::<BiasParams>() == 8);
// SAFETY: plain old data with the C layout of the kernels' struct (asserted above).
unsafe impl DeviceRepr for BiasParams {}
impl KernelParams for BiasParams {
    const STEMS: &'static [&'static str] = &["bias"];
}

/// Threads per block (`kThreads` in the kernel).
const THREADS: u32 = 256;
/// Rows each backward block sums: enough blocks to fill the device at GPT-2's widths, and a
/// partial buffer of rows / 64 rows.
const ROWS_PER_GROUP: usize = 64;

fn act_code(act: BiasAct) -> i32 {
    match act {
        BiasAct::Identity => 0,
        BiasAct::GeluTanh => 1,
    }
}

type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// `act(y + b)`.
pub fn forward(y: Arg, b: Arg, act: BiasAct) -> Result<CudaStorage> {
    match y.0.dtype() {
        DType::F32 => forward_t::<f32>(y, b, act),
        DType::BF16 => forward_t::<half::bf16>(y, b, act),
        DType::F16 => forward_t::<half::f16>(y, b, act),
        dt => candle_core::bail!("bias: no CUDA kernel for {dt:?}"),
    }
}

fn forward_t<T: CudaDType + DeviceRepr + WithDType>(
    (sy, ly): Arg,
    (sb, lb): Arg,
    act: BiasAct,
) -> Result<CudaStorage> {
    let dev = sy.device();
    let (rows, cols) = rows_cols(ly)?;
    let y = contiguous_view::<T>(sy, ly)?;
    let b = contiguous_view::<f32>(sb, lb)?;
    // SAFETY: the blocks stride over every row and their threads over every column.
    let mut out = unsafe { alloc_out::<T>(dev, rows * cols)? };
    if rows > 0 && cols > 0 {
        let chunk = vec16_chunk::<T>(cols, &[ly.start_offset()]);
        let name = match chunk {
            Some(_) => format!("bias_fwd_vec_{}", T::DTYPE.as_str()),
            None => format!("bias_fwd_{}", T::DTYPE.as_str()),
        };
        let func = load_func(dev, "bias", &name)?;
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let p = BiasParams {
            y: ptrs.read(&y),
            b: ptrs.read(&b),
            out: ptrs.write(&mut out),
            n: (rows * cols) as i64,
            rows: to_i32(rows, "rows")?,
            cols: to_i32(cols, "cols")?,
            act: act_code(act),
            ..BiasParams::default()
        };
        // A block a row (the scalar kernel) or 256 chunks (the vector one), at most 8 per SM.
        let blocks = match chunk {
            Some(c) => (rows * cols / c).div_ceil(THREADS as usize),
            None => rows,
        }
        .min(sm_count(dev)? as usize * 8);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: y and out hold rows * cols elements, b cols; the vector kernel's 16-byte
        // accesses are aligned (checked above).
        unsafe { launch(dev, &func, &name, cfg, &p) }?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `(dL/dy, db)`; `dL/dy` is `None` for the identity, where it is `dy` itself; `db` is f32.
pub fn backward(
    y: Arg,
    b: Arg,
    dy: Arg,
    act: BiasAct,
) -> Result<(Option<CudaStorage>, CudaStorage)> {
    match y.0.dtype() {
        DType::F32 => backward_t::<f32>(y, b, dy, act),
        DType::BF16 => backward_t::<half::bf16>(y, b, dy, act),
        DType::F16 => backward_t::<half::f16>(y, b, dy, act),
        dt => candle_core::bail!("bias backward: no CUDA kernel for {dt:?}"),
    }
}

fn backward_t<T: CudaDType + DeviceRepr + WithDType>(
    (sy, ly): Arg,
    (sb, lb): Arg,
    (sg, lg): Arg,
    act: BiasAct,
) -> Result<(Option<CudaStorage>, CudaStorage)> {
    let dev = sy.device();
    let (rows, cols) = rows_cols(ly)?;
    let y = contiguous_view::<T>(sy, ly)?;
    let b = contiguous_view::<f32>(sb, lb)?;
    let g = contiguous_view::<T>(sg, lg)?;
    // 16-byte accesses where every row and base allows them: 32 chunks of columns per block,
    // and enough row groups for about four blocks per SM. Otherwise a thread per column, 64
    // rows a group. grid.y is at most 65535; beyond that each group takes more rows.
    let chunk = vec16_chunk::<T>(cols, &[ly.start_offset(), lg.start_offset()]);
    let (col_blocks, groups) = match chunk {
        Some(c) => {
            let col_blocks = (cols / c).div_ceil(32);
            let groups = (4 * sm_count(dev)? as usize)
                .div_ceil(col_blocks.max(1))
                .min(rows.div_ceil(8));
            (col_blocks, groups)
        }
        None => (
            cols.div_ceil(THREADS as usize),
            rows.div_ceil(ROWS_PER_GROUP),
        ),
    };
    let groups = groups.clamp(1, 65535);
    let mut dz = match act {
        BiasAct::Identity => None,
        // SAFETY: the backward writes every element (each column of every group's rows).
        BiasAct::GeluTanh => Some(unsafe { alloc_out::<T>(dev, rows * cols)? }),
    };
    // SAFETY: every group writes its partial row for every column; the reduce every column.
    let mut partial = unsafe { alloc_out::<f32>(dev, groups * cols)? };
    let mut db = unsafe { alloc_out::<f32>(dev, cols)? };
    if cols > 0 {
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let out = match dz.as_mut() {
            Some(d) => ptrs.write(d),
            None => 0,
        };
        let p = BiasParams {
            y: ptrs.read(&y),
            b: ptrs.read(&b),
            dy: ptrs.read(&g),
            out,
            partial: ptrs.write(&mut partial),
            db: ptrs.write(&mut db),
            n: (rows * cols) as i64,
            rows: to_i32(rows, "rows")?,
            cols: to_i32(cols, "cols")?,
            groups: to_i32(groups, "groups")?,
            act: act_code(act),
        };
        let name = match chunk {
            Some(_) => format!("bias_bwd_vec_{}", T::DTYPE.as_str()),
            None => format!("bias_bwd_{}", T::DTYPE.as_str()),
        };
        let func = load_func(dev, "bias", &name)?;
        let cfg = LaunchConfig {
            grid_dim: (
                to_i32(col_blocks, "column blocks")? as u32,
                p.groups as u32,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: y, dy and dz hold rows * cols elements, b cols, partial groups * cols; the
        // vector kernel's 16-byte accesses are aligned (checked above).
        unsafe { launch(dev, &func, &name, cfg, &p) }?;
        let func = load_func(dev, "bias", "bias_db_reduce")?;
        let cfg = LaunchConfig {
            grid_dim: (to_i32(cols.div_ceil(32), "column blocks")? as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: 32 columns per block; each reads `groups` partials and writes db.
        unsafe { launch(dev, &func, "bias_db_reduce", cfg, &p) }?;
    }
    let dz = dz.map(|d| CudaStorage::wrap_cuda_slice(d, dev.clone()));
    Ok((dz, CudaStorage::wrap_cuda_slice(db, dev.clone())))
}
