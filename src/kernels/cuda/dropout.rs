//! Launcher of `kernels/dropout.cu` for the op in `src/kernels/dropout.rs`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Result, WithDType};

use super::super::dropout::Mask;
use super::{
    alloc_out, contiguous_view, grid_stride, launch, load_func, DevPtr, DevPtrs, KernelParams,
};

/// The Rust mirror of `struct DropoutParams` in kernels/dropout.cuh (field comments there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct DropoutParams {
    x: DevPtr,
    out: DevPtr,
    n: i64,
    seed: u64,
    threshold: u32,
    scale: f32,
}
const _: () = assert!(std::mem::size_of::<DropoutParams>() == 40);
const _: () = assert!(std::mem::align_of::<DropoutParams>() == 8);
// SAFETY: plain old data with the C layout of the kernel's struct (asserted above).
unsafe impl DeviceRepr for DropoutParams {}
impl KernelParams for DropoutParams {
    const STEMS: &'static [&'static str] = &["dropout"];
}

/// `mask` applied to the contiguous `x` (an input forward, a gradient backward).
pub fn apply(s: &CudaStorage, l: &Layout, mask: &Mask) -> Result<CudaStorage> {
    match s.dtype() {
        DType::F32 => run::<f32>(s, l, mask),
        DType::BF16 => run::<half::bf16>(s, l, mask),
        DType::F16 => run::<half::f16>(s, l, mask),
        dt => candle_core::bail!("dropout: no CUDA kernel for {dt:?}"),
    }
}

fn run<T: CudaDType + DeviceRepr + WithDType>(
    s: &CudaStorage,
    l: &Layout,
    mask: &Mask,
) -> Result<CudaStorage> {
    let dev = s.device();
    let n = l.shape().elem_count();
    let x = contiguous_view::<T>(s, l)?;
    // SAFETY: the grid-stride loop writes every element.
    let mut out = unsafe { alloc_out::<T>(dev, n)? };
    if n > 0 {
        let name = format!("dropout_{}", T::DTYPE.as_str());
        let func = load_func(dev, "dropout", &name)?;
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let p = DropoutParams {
            x: ptrs.read(&x),
            out: ptrs.write(&mut out),
            n: n as i64,
            seed: mask.seed,
            threshold: mask.threshold,
            scale: mask.scale_in::<T>(),
        };
        // SAFETY: x and out hold n elements.
        unsafe { launch(dev, &func, &name, grid_stride(dev, n, 256)?, &p) }?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
