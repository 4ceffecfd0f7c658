//! Launchers of `kernels/decode_step.cu` for the in-place ops of
//! `src/kernels/decode_step.rs`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtrMut, DeviceRepr};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Tensor, WithDType};

use crate::kernels::decode_step::{Gain, HeadNorm};

use super::{
    alloc_out, cuda_storage, launch, launch_1d, load_func, tensor_from_slice, DevPtr, DevPtrs,
    KernelParams, LaunchConfig,
};

/// The Rust mirror of `struct DecodeParams` in kernels/decode_step.cu (field comments there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct DecodeParams {
    dst: DevPtr,
    src: DevPtr,
    step: DevPtr,
    n: i64,
    cap: i32,
    d: i32,
    dst2: DevPtr,
    out: DevPtr,
    nq: i32,
    nkv: i32,
    cos: DevPtr,
    sin: DevPtr,
    qnorm: DevPtr,
    knorm: DevPtr,
    eps: f32,
    norm_plus_one: i32,
}
const _: () = assert!(std::mem::size_of::<DecodeParams>() == 104);
// SAFETY: plain old data with the C layout of the kernel's struct (asserted above).
unsafe impl DeviceRepr for DecodeParams {}
impl KernelParams for DecodeParams {
    const STEMS: &'static [&'static str] = &[STEM];
}

const STEM: &str = "decode_step";

/// The device address of element `l.start_offset()` of `s`, guarded in `ptrs`.
fn at<'a>(ptrs: &mut DevPtrs<'a>, s: &'a CudaStorage, l: &Layout) -> Result<u64> {
    let bytes = l.start_offset() * s.dtype().size_in_bytes();
    let base = match s.dtype() {
        DType::I64 => ptrs.read(s.as_cuda_slice::<i64>()?),
        DType::U32 => ptrs.read(s.as_cuda_slice::<u32>()?),
        DType::F32 => ptrs.read(s.as_cuda_slice::<f32>()?),
        DType::BF16 => ptrs.read(s.as_cuda_slice::<half::bf16>()?),
        DType::F16 => ptrs.read(s.as_cuda_slice::<half::f16>()?),
        dt => candle_core::bail!("decode step: no kernel reads {dt:?}"),
    };
    Ok(base + bytes as u64)
}

/// As [`at`] for the buffer the kernel writes.
fn at_mut<'a>(
    stream: &'a super::cudarc::driver::CudaStream,
    s: &'a mut CudaStorage,
    l: &Layout,
) -> Result<(u64, Guard<'a>)> {
    let bytes = (l.start_offset() * s.dtype().size_in_bytes()) as u64;
    let (ptr, guard) = match s.dtype() {
        DType::F32 => s.as_cuda_slice_mut::<f32>()?.device_ptr_mut(stream),
        DType::BF16 => s.as_cuda_slice_mut::<half::bf16>()?.device_ptr_mut(stream),
        DType::F16 => s.as_cuda_slice_mut::<half::f16>()?.device_ptr_mut(stream),
        dt => candle_core::bail!("decode step: no kernel writes {dt:?}"),
    };
    Ok((ptr + bytes, guard))
}

type Guard<'a> = super::cudarc::driver::SyncOnDrop<'a>;

fn run(dev: &CudaDevice, name: &str, n: usize, p: DecodeParams) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let func = load_func(dev, STEM, name)?;
    // SAFETY: every pointer in `p` is held by the caller's guards for this launch; each
    // kernel touches element i < n only, within the sizes its caller checked.
    unsafe { launch(dev, &func, name, launch_1d(n, 256), &p) }
}

pub fn kv_write(
    (cache, lc): (&mut CudaStorage, &Layout),
    (new, ln): (&CudaStorage, &Layout),
    (step, ls): (&CudaStorage, &Layout),
) -> Result<()> {
    let dev = new.device().clone();
    let &[b, h, cap, d] = lc.dims() else {
        candle_core::bail!("kv_write: cache {:?}", lc.dims());
    };
    let name = match cache.dtype().size_in_bytes() {
        2 => "kv_write_b2",
        4 => "kv_write_b4",
        _ => candle_core::bail!("kv_write: no kernel for {:?}", cache.dtype()),
    };
    if ln.shape().elem_count() != b * h * d || !ln.is_contiguous() {
        candle_core::bail!("kv_write: new {:?} for a {:?} cache", ln.dims(), lc.dims());
    }
    let stream = dev.cuda_stream();
    let mut ptrs = DevPtrs::new(&stream);
    let src = at(&mut ptrs, new, ln)?;
    let step = at(&mut ptrs, step, ls)?;
    let (dst, _guard) = at_mut(&stream, cache, lc)?;
    let n = b * h * d;
    let p = DecodeParams {
        dst,
        src,
        step,
        n: n as i64,
        cap: super::to_i32(cap, "cache positions")?,
        d: super::to_i32(d, "head dim")?,
        ..Default::default()
    };
    run(&dev, name, n, p)
}

/// `qkv_write_<dtype>`: `y` (`[B, nq + 2 nkv]`, contiguous) split into the returned q
/// `[B, nq]` and position `step[0]` of the key and value caches (`[B, nkv / d, cap, d]` each,
/// contiguous, in `y`'s dtype), which are written through their device pointers, in stream
/// order; q and k normalised by `norm` (weights `[d]`, contiguous: gains in `y`'s dtype, or
/// Gemma's f32 offsets) and then rotated by `rope`
/// (cos, sin `[B, d / 2]`, contiguous) where given. The shapes and dtypes are the caller's to
/// check (`decode_step::qkv_write`).
pub fn qkv_write(
    y: &Tensor,
    (kc, vc): (&Tensor, &Tensor),
    step: &Tensor,
    nq: usize,
    rope: Option<(&Tensor, &Tensor)>,
    norm: Option<HeadNorm>,
) -> Result<Tensor> {
    match y.dtype() {
        DType::F32 => qkv_write_t::<f32>(y, (kc, vc), step, nq, rope, norm),
        DType::BF16 => qkv_write_t::<half::bf16>(y, (kc, vc), step, nq, rope, norm),
        DType::F16 => qkv_write_t::<half::f16>(y, (kc, vc), step, nq, rope, norm),
        dt => candle_core::bail!("qkv_write: no kernel for {dt:?}"),
    }
}

fn qkv_write_t<T: CudaDType + DeviceRepr + WithDType>(
    y: &Tensor,
    (kc, vc): (&Tensor, &Tensor),
    step: &Tensor,
    nq: usize,
    rope: Option<(&Tensor, &Tensor)>,
    norm: Option<HeadNorm>,
) -> Result<Tensor> {
    let dev = y.device().as_cuda_device()?;
    let (b, hkv, cap, d) = kc.dims4()?;
    let nkv = hkv * d;
    let n = b * (nq + 2 * nkv);
    // SAFETY: the kernel writes every element of q (each is one of y's q columns).
    let mut q = unsafe { alloc_out::<T>(dev, b * nq)? };
    {
        let (ys, yl) = y.storage_and_layout();
        let (ss, sl) = step.storage_and_layout();
        let (ks, kl) = kc.storage_and_layout();
        let (vs, vl) = vc.storage_and_layout();
        let tables = rope.map(|(c, s)| (c.storage_and_layout(), s.storage_and_layout()));
        let gains = norm.map(|n| (n.q.storage_and_layout(), n.k.storage_and_layout()));
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let src = at(&mut ptrs, cuda_storage(&ys)?, yl)?;
        let step = at(&mut ptrs, cuda_storage(&ss)?, sl)?;
        // The caches are read-locked here but written by the kernel: nothing else reads or
        // writes them while the step's ops are queued, and the stream orders every use.
        let kp = at(&mut ptrs, cuda_storage(&ks)?, kl)?;
        let vp = at(&mut ptrs, cuda_storage(&vs)?, vl)?;
        let (cos, sin) = match &tables {
            Some(((cs, cl), (ss, sl))) => (
                at(&mut ptrs, cuda_storage(cs)?, cl)?,
                at(&mut ptrs, cuda_storage(ss)?, sl)?,
            ),
            None => (0, 0),
        };
        let (qnorm, knorm) = match &gains {
            Some(((qs, ql), (ks, kl))) => (
                at(&mut ptrs, cuda_storage(qs)?, ql)?,
                at(&mut ptrs, cuda_storage(ks)?, kl)?,
            ),
            None => (0, 0),
        };
        let p = DecodeParams {
            dst: kp,
            src,
            step,
            n: n as i64,
            cap: super::to_i32(cap, "cache positions")?,
            d: super::to_i32(d, "head dim")?,
            dst2: vp,
            out: ptrs.write(&mut q),
            nq: super::to_i32(nq, "query width")?,
            nkv: super::to_i32(nkv, "key width")?,
            cos,
            sin,
            qnorm,
            knorm,
            eps: norm.map_or(0.0, |n| n.eps as f32),
            norm_plus_one: i32::from(norm.is_some_and(|n| n.gain == Gain::PlusOne)),
        };
        let name = format!("qkv_write_{}", T::DTYPE.as_str());
        run(dev, &name, n, p)?;
    }
    Ok(tensor_from_slice(q, dev, (b, nq)))
}

/// `advance_step`: the decode step's tail in one launch, one block (the argument checks are
/// `decode_step::advance`'s). Every buffer is written through the pointer of a read guard,
/// as `qkv_write` writes the caches: nothing else touches them while the step's ops are
/// queued, and the stream orders every use.
pub fn advance(
    ids: &Tensor,
    sampled: &Tensor,
    positions: &Tensor,
    step: &Tensor,
    mask: &Tensor,
) -> Result<()> {
    let dev = ids.device().as_cuda_device()?;
    let (rows, cap) = mask.dims2()?;
    let (gi, li) = ids.storage_and_layout();
    let (gn, ln) = sampled.storage_and_layout();
    let (gp, lp) = positions.storage_and_layout();
    let (gs, ls) = step.storage_and_layout();
    let (gm, lm) = mask.storage_and_layout();
    let stream = dev.cuda_stream();
    let mut ptrs = DevPtrs::new(&stream);
    let p = DecodeParams {
        dst: at(&mut ptrs, cuda_storage(&gm)?, lm)?,
        src: at(&mut ptrs, cuda_storage(&gn)?, ln)?,
        step: at(&mut ptrs, cuda_storage(&gs)?, ls)?,
        n: rows as i64,
        cap: super::to_i32(cap, "cache positions")?,
        dst2: at(&mut ptrs, cuda_storage(&gp)?, lp)?,
        out: at(&mut ptrs, cuda_storage(&gi)?, li)?,
        ..Default::default()
    };
    let func = load_func(dev, STEM, "advance_step")?;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the pointers are held by the guards above; the kernel touches rows < n of ids,
    // sampled, positions and mask (n = the mask's rows, checked against the others by the
    // caller) and the two elements of step.
    unsafe { launch(dev, &func, "advance_step", cfg, &p) }
}
