//! Launcher of `kernels/heads.cu` for the op in `src/kernels/heads.rs`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Result};

use super::{
    alloc_out, contiguous_view, grid_stride, launch, load_func, to_i32, DevPtr, DevPtrs,
    KernelParams,
};

/// The Rust mirror of `struct HeadsParams` in kernels/heads.cuh (field comments there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct HeadsParams {
    input: DevPtr,
    out: DevPtr,
    units: i32,
    p: i32,
    q: i32,
    row_units: i32,
}
const _: () = assert!(std::mem::size_of::<HeadsParams>() == 32);
const _: () = assert!(std::mem::align_of::<HeadsParams>() == 8);
// SAFETY: plain old data with the C layout of the kernel's struct (asserted above).
unsafe impl DeviceRepr for HeadsParams {}
impl KernelParams for HeadsParams {
    const STEMS: &'static [&'static str] = &["heads"];
}

/// The contiguous `[b, p, q, d]` input as a fresh contiguous `[b, q, p, d]`.
pub fn swap(
    s: &CudaStorage,
    l: &Layout,
    (b, p, q, d): (usize, usize, usize, usize),
) -> Result<CudaStorage> {
    match s.dtype() {
        DType::F32 => run::<f32>(s, l, (b, p, q, d)),
        DType::BF16 => run::<half::bf16>(s, l, (b, p, q, d)),
        DType::F16 => run::<half::f16>(s, l, (b, p, q, d)),
        dt => candle_core::bail!("heads: no CUDA kernel for {dt:?}"),
    }
}

fn run<T: CudaDType + DeviceRepr>(
    s: &CudaStorage,
    l: &Layout,
    (b, p, q, d): (usize, usize, usize, usize),
) -> Result<CudaStorage> {
    let dev = s.device();
    let n = b * p * q * d;
    if l.shape().elem_count() != n {
        candle_core::bail!("heads: {:?} is not [{b}, {p}, {q}, {d}]", l.shape());
    }
    let input = contiguous_view::<T>(s, l)?;
    // SAFETY: the kernel writes every unit of the output, and so every element.
    let mut out = unsafe { alloc_out::<T>(dev, n)? };
    if n > 0 {
        let stream = dev.cuda_stream();
        let row_bytes = d * std::mem::size_of::<T>();
        let base = input.device_ptr(&stream).0;
        // The widest unit that divides a row and the input's offset (the output is a fresh,
        // 256-byte aligned allocation).
        let unit = [16usize, 8, 4, 2]
            .into_iter()
            .find(|&u| row_bytes.is_multiple_of(u) && base.is_multiple_of(u as u64))
            .ok_or_else(|| candle_core::Error::Msg(format!("heads: rows of {row_bytes} bytes")))?;
        let row_units = row_bytes / unit;
        let units = to_i32(b * p * q * row_units, "heads units")?;
        let name = format!("heads_swap_{unit}");
        let func = load_func(dev, "heads", &name)?;
        let mut ptrs = DevPtrs::new(&stream);
        let params = HeadsParams {
            input: ptrs.read(&input),
            out: ptrs.write(&mut out),
            units,
            p: to_i32(p, "heads p")?,
            q: to_i32(q, "heads q")?,
            row_units: to_i32(row_units, "heads row")?,
        };
        // SAFETY: input and out hold b*p*q*d elements, `units` units of `unit` bytes each, and
        // both pointers are aligned to `unit`.
        unsafe {
            launch(
                dev,
                &func,
                &name,
                grid_stride(dev, units as usize, 256)?,
                &params,
            )
        }?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
