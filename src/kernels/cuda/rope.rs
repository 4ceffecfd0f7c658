//! Launcher of `kernels/rope.cu` for the op in `src/kernels/rope.rs`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Result, WithDType};

use super::{
    alloc_out, contiguous_view, grid_stride, launch, load_func, to_i32, DevPtr, DevPtrs,
    KernelParams,
};

/// The Rust mirror of `struct RopeParams` in kernels/rope.cuh (field comments there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RopeParams {
    x: DevPtr,
    cos: DevPtr,
    sin: DevPtr,
    out: DevPtr,
    pairs: i64,
    half: i32,
    heads: i32,
    seq: i32,
    pad: i32,
}
const _: () = assert!(std::mem::size_of::<RopeParams>() == 56);
const _: () = assert!(std::mem::align_of::<RopeParams>() == 8);
// SAFETY: plain old data with the C layout of the kernels' struct (asserted above).
unsafe impl DeviceRepr for RopeParams {}
impl KernelParams for RopeParams {
    const STEMS: &'static [&'static str] = &["rope"];
}

type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// Rotates `x` `[B, H, T, D]` by the tables `[B, 1, T, D / 2]` (shapes checked by the
/// caller), or by minus their angles when `inverse` (the backward, `x` being `dy`).
pub fn run(x: Arg, cos: Arg, sin: Arg, inverse: bool) -> Result<CudaStorage> {
    match x.0.dtype() {
        DType::F32 => run_t::<f32>(x, cos, sin, inverse),
        DType::BF16 => run_t::<half::bf16>(x, cos, sin, inverse),
        DType::F16 => run_t::<half::f16>(x, cos, sin, inverse),
        dt => candle_core::bail!("rope: no CUDA kernel for {dt:?}"),
    }
}

fn run_t<T: CudaDType + DeviceRepr + WithDType>(
    (sx, lx): Arg,
    (sc, lc): Arg,
    (ss, ls): Arg,
    inverse: bool,
) -> Result<CudaStorage> {
    let dev = sx.device();
    let (_, heads, seq, d) = lx.shape().dims4()?;
    let n = lx.shape().elem_count();
    let x = contiguous_view::<T>(sx, lx)?;
    let cos = contiguous_view::<T>(sc, lc)?;
    let sin = contiguous_view::<T>(ss, ls)?;
    // SAFETY: the grid-stride loop writes both elements of every pair, which is all of them.
    let mut out = unsafe { alloc_out::<T>(dev, n)? };
    if n > 0 {
        let pass = if inverse { "bwd" } else { "fwd" };
        let name = format!("rope_{pass}_{}", T::DTYPE.as_str());
        let func = load_func(dev, "rope", &name)?;
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let pairs = n / 2;
        let p = RopeParams {
            x: ptrs.read(&x),
            cos: ptrs.read(&cos),
            sin: ptrs.read(&sin),
            out: ptrs.write(&mut out),
            pairs: pairs as i64,
            half: to_i32(d / 2, "rope head_dim / 2")?,
            heads: to_i32(heads, "rope heads")?,
            seq: to_i32(seq, "rope sequence length")?,
            pad: 0,
        };
        // SAFETY: x and out hold `pairs` pairs of [B, H, T, D]; the tables B * T * D / 2.
        unsafe { launch(dev, &func, &name, grid_stride(dev, pairs, 256)?, &p) }?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
