//! Launcher of `kernels/swiglu.cu` (SwiGLU and GeGLU) for the op in `src/kernels/swiglu.rs`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Result, WithDType};

use super::super::swiglu::Gate;
use super::{
    alloc_out, contiguous_view, grid_stride, launch, load_func, vec16_chunk, DevPtr, DevPtrs,
    KernelParams,
};

/// The Rust mirror of `struct SwiGluParams` in kernels/swiglu.cuh (field comments there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SwiGluParams {
    g: DevPtr,
    u: DevPtr,
    dy: DevPtr,
    out: DevPtr,
    n: i64,
}
const _: () = assert!(std::mem::size_of::<SwiGluParams>() == 40);
const _: () = assert!(std::mem::align_of::<SwiGluParams>() == 8);
// SAFETY: plain old data with the C layout of the kernels' struct (asserted above).
unsafe impl DeviceRepr for SwiGluParams {}
impl KernelParams for SwiGluParams {
    const STEMS: &'static [&'static str] = &["swiglu"];
}

type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// The forward (`dy` absent: `n` elements of y) or the backward (`2 n` elements: dg, then du)
/// of `gate`'s kernels.
pub fn run(g: Arg, u: Arg, dy: Option<Arg>, gate: Gate) -> Result<CudaStorage> {
    match g.0.dtype() {
        DType::F32 => run_t::<f32>(g, u, dy, gate),
        DType::BF16 => run_t::<half::bf16>(g, u, dy, gate),
        DType::F16 => run_t::<half::f16>(g, u, dy, gate),
        dt => candle_core::bail!("{}: no CUDA kernel for {dt:?}", gate.name()),
    }
}

fn run_t<T: CudaDType + DeviceRepr + WithDType>(
    (sg, lg): Arg,
    (su, lu): Arg,
    dy: Option<Arg>,
    gate: Gate,
) -> Result<CudaStorage> {
    let dev = sg.device();
    let n = lg.shape().elem_count();
    let g = contiguous_view::<T>(sg, lg)?;
    let u = contiguous_view::<T>(su, lu)?;
    let dy_offset = dy.map_or(0, |(_, l)| l.start_offset());
    let d = match dy {
        Some((sd, ld)) => Some(contiguous_view::<T>(sd, ld)?),
        None => None,
    };
    let outputs = if d.is_some() { 2 } else { 1 };
    // SAFETY: the grid-stride loop writes every element of each output.
    let mut out = unsafe { alloc_out::<T>(dev, outputs * n)? };
    if n > 0 {
        let pass = if d.is_some() { "bwd" } else { "fwd" };
        let chunk = vec16_chunk::<T>(n, &[lg.start_offset(), lu.start_offset(), dy_offset]);
        let (op, dt) = (gate.name(), T::DTYPE.as_str());
        let name = match chunk {
            Some(_) => format!("{op}_{pass}_vec_{dt}"),
            None => format!("{op}_{pass}_{dt}"),
        };
        let func = load_func(dev, "swiglu", &name)?;
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let p = SwiGluParams {
            g: ptrs.read(&g),
            u: ptrs.read(&u),
            dy: ptrs.read_opt(d.as_ref()),
            out: ptrs.write(&mut out),
            n: n as i64,
        };
        let cfg = grid_stride(dev, n / chunk.unwrap_or(1), 256)?;
        // SAFETY: g, u and dy hold n elements, out n forward and 2 n backward; the 16-byte
        // variant runs only where every base is aligned and n a multiple of the chunk.
        unsafe { launch(dev, &func, &name, cfg, &p) }?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
