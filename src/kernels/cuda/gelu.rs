//! Launcher of `kernels/gelu.cu` for the op in `src/kernels/gelu.rs`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Result, WithDType};

use super::{
    alloc_out, contiguous_view, grid_stride, launch, load_func, vec16_chunk, DevPtr, DevPtrs,
    KernelParams,
};

/// The Rust mirror of `struct GeluParams` in kernels/gelu.cuh (field comments there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct GeluParams {
    x: DevPtr,
    dy: DevPtr,
    out: DevPtr,
    n: i64,
}
const _: () = assert!(std::mem::size_of::<GeluParams>() == 32);
const _: () = assert!(std::mem::align_of::<GeluParams>() == 8);
// SAFETY: plain old data with the C layout of the kernels' struct (asserted above).
unsafe impl DeviceRepr for GeluParams {}
impl KernelParams for GeluParams {
    const STEMS: &'static [&'static str] = &["gelu"];
}

type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// The forward (`dy` absent) or the backward.
pub fn run(x: Arg, dy: Option<Arg>) -> Result<CudaStorage> {
    match x.0.dtype() {
        DType::F32 => run_t::<f32>(x, dy),
        DType::BF16 => run_t::<half::bf16>(x, dy),
        DType::F16 => run_t::<half::f16>(x, dy),
        dt => candle_core::bail!("gelu: no CUDA kernel for {dt:?}"),
    }
}

fn run_t<T: CudaDType + DeviceRepr + WithDType>(
    (sx, lx): Arg,
    dy: Option<Arg>,
) -> Result<CudaStorage> {
    let dev = sx.device();
    let n = lx.shape().elem_count();
    let x = contiguous_view::<T>(sx, lx)?;
    let dy_offset = dy.map_or(0, |(_, l)| l.start_offset());
    let g = match dy {
        Some((sg, lg)) => Some(contiguous_view::<T>(sg, lg)?),
        None => None,
    };
    // SAFETY: the grid-stride loop writes every element.
    let mut out = unsafe { alloc_out::<T>(dev, n)? };
    if n > 0 {
        let pass = if g.is_some() { "bwd" } else { "fwd" };
        let chunk = vec16_chunk::<T>(n, &[lx.start_offset(), dy_offset]);
        let name = match chunk {
            Some(_) => format!("gelu_{pass}_vec_{}", T::DTYPE.as_str()),
            None => format!("gelu_{pass}_{}", T::DTYPE.as_str()),
        };
        let func = load_func(dev, "gelu", &name)?;
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let p = GeluParams {
            x: ptrs.read(&x),
            dy: ptrs.read_opt(g.as_ref()),
            out: ptrs.write(&mut out),
            n: n as i64,
        };
        let cfg = grid_stride(dev, n / chunk.unwrap_or(1), 256)?;
        // SAFETY: x, dy and out hold n elements; the 16-byte variant runs only where every
        // base is aligned and n a multiple of the chunk (`vec16_chunk`).
        unsafe { launch(dev, &func, &name, cfg, &p) }?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
