//! Next-token sampling on CUDA (`kernels/sample.cu`): one block per row, only the chosen ids
//! written. The contract and the maths are the reference's (`src/kernels/sample.rs`).

use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{DType, Result, Tensor, WithDType};

use super::super::sample::{Draw, Hold, SampleParams as Params};
use super::{
    alloc_out, contiguous_view, cuda_storage, launch, load_func, opt_view, tensor_from_slice,
    to_i32, DevPtr, DevPtrs, Guarded, KernelParams, LaunchConfig,
};

/// The Rust mirror of `struct SampleParams` in kernels/sample.cu (field comments there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SampleParams {
    logits: DevPtr,
    keys: DevPtr,
    out: DevPtr,
    pos: u64,
    pos_at: DevPtr,
    hold: DevPtr,
    hold_until: u64,
    b: i32,
    v: i32,
    top_k: i32,
    inv_temp: f32,
    top_p: f32,
    greedy: i32,
    seen: DevPtr,
    min_p: f32,
    penalty: f32,
    ld: i32,
}
const _: () = assert!(std::mem::size_of::<SampleParams>() == 104);
const _: () = assert!(std::mem::align_of::<SampleParams>() == 8);
// SAFETY: plain old data with the C layout of the kernel's struct (asserted above).
unsafe impl DeviceRepr for SampleParams {}
impl KernelParams for SampleParams {
    const STEMS: &'static [&'static str] = &["sample"];
}

/// Threads per block (`kThreads` in the kernel).
const THREADS: u32 = 512;
/// The longest row the kernel's shared memory holds the chunk sums of
/// (`kMaxChunks * kChunk` in the kernel).
const MAX_VOCAB: usize = 2048 * 256;

/// `[B]` u32 ids sampled from `logits` (`[B, V]`: f32, bf16 and f16 are read as they are and
/// converted in registers, so no f32 copy of the logits is made per decode step; other
/// dtypes are converted to f32 first; rows may lie further apart than `V`, as generation's
/// padded LM head leaves them, and are read in place) with the uniforms of `keys` (`[B]` i64) at `draw`, the
/// tokens of `hold` held back while it applies, and each row's token marked in `seen`
/// (`[B, V]` u8, contiguous, read for the repetition penalty), in place.
pub fn sample(
    logits: &Tensor,
    keys: &Tensor,
    draw: Draw,
    hold: Option<Hold>,
    seen: Option<&Tensor>,
    params: &Params,
) -> Result<Tensor> {
    let (b, v) = logits.dims2()?;
    if keys.dims() != [b] || keys.dtype() != DType::I64 {
        candle_core::bail!(
            "sample: keys {:?} {:?} are not [{b}] i64",
            keys.dims(),
            keys.dtype()
        );
    }
    logits.device().as_cuda_device()?;
    if b == 0 {
        return Tensor::zeros(0, DType::U32, logits.device());
    }
    if v == 0 {
        candle_core::bail!("sample: empty vocabulary");
    }
    if v > MAX_VOCAB {
        candle_core::bail!("sample: a vocabulary of {v} is past the kernel's {MAX_VOCAB}");
    }
    let logits = match logits.dtype() {
        DType::F32 | DType::BF16 | DType::F16 if row_stride(logits.layout()).is_some() => {
            logits.clone()
        }
        DType::F32 | DType::BF16 | DType::F16 => logits.contiguous()?,
        _ => logits.to_dtype(DType::F32)?.contiguous()?,
    };
    let keys = keys.to_device(logits.device())?.contiguous()?;
    // `seen` is checked by `sample_draw`, the one caller: [B, V] u8, contiguous, here.
    let args = (draw, hold, seen, params);
    match logits.dtype() {
        DType::BF16 => launch_t::<half::bf16>(&logits, &keys, args),
        DType::F16 => launch_t::<half::f16>(&logits, &keys, args),
        _ => launch_t::<f32>(&logits, &keys, args),
    }
}

fn launch_t<T: CudaDType + DeviceRepr + WithDType>(
    logits: &Tensor,
    keys: &Tensor,
    (draw, hold, seen, params): (Draw, Option<Hold>, Option<&Tensor>, &Params),
) -> Result<Tensor> {
    let (b, v) = logits.dims2()?;
    let dev = logits.device().as_cuda_device()?;
    // SAFETY: one block per row writes its id.
    let mut out = unsafe { alloc_out::<u32>(dev, b)? };
    {
        let (ls, ll) = logits.storage_and_layout();
        let (ks, kl) = keys.storage_and_layout();
        let Some(ld) = row_stride(ll) else {
            candle_core::bail!("sample: logits {ll:?} are not rows of contiguous elements");
        };
        let start = ll.start_offset();
        let lv = cuda_storage(&ls)?
            .as_cuda_slice::<T>()?
            .slice(start..start + (b - 1) * ld + v);
        let kv = contiguous_view::<i64>(cuda_storage(&ks)?, kl)?;
        let (pos, at): (u64, Guarded) = match draw {
            Draw::At(p) => (p, None),
            Draw::Device(t) => (0, Some(t.storage_and_layout())),
        };
        let at_view = opt_view::<i64>(&at)?;
        let held: Guarded = hold.map(|h| h.mask.storage_and_layout());
        let hold_view = opt_view::<f32>(&held)?;
        let seen_guard: Guarded = seen.map(|s| s.storage_and_layout());
        let seen_view = opt_view::<u8>(&seen_guard)?;
        let name = format!("sample_{}", T::DTYPE.as_str());
        let func = load_func(dev, "sample", &name)?;
        let cfg = LaunchConfig {
            grid_dim: (to_i32(b, "rows")? as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let p = SampleParams {
            logits: ptrs.read(&lv),
            keys: ptrs.read(&kv),
            out: ptrs.write(&mut out),
            pos,
            pos_at: ptrs.read_opt(at_view.as_ref()),
            hold: ptrs.read_opt(hold_view.as_ref()),
            hold_until: hold.map_or(0, |h| h.until),
            b: to_i32(b, "rows")?,
            v: to_i32(v, "vocabulary")?,
            top_k: to_i32(params.top_k.min(v), "top_k")?,
            inv_temp: if params.is_greedy() {
                0.0
            } else {
                1.0 / params.temperature
            },
            top_p: params.top_p,
            greedy: i32::from(params.is_greedy()),
            // Written through a read guard: the kernel marks one byte per row, in place, as
            // the decode step's state kernels write theirs (`decode_step.rs`).
            seen: ptrs.read_opt(seen_view.as_ref()),
            min_p: params.min_p,
            penalty: params.repetition_penalty,
            ld: to_i32(ld, "logits' row stride")?,
        };
        // SAFETY: logits hold B rows of V elements of T, `ld` apart, keys B i64, out B u32, seen (when given)
        // B * V u8; the guards live in `ptrs`.
        unsafe { launch(dev, &func, &name, cfg, &p) }?;
    }
    Ok(tensor_from_slice(out, dev, b))
}

/// The elements from one row of `[B, V]` logits to the next where each row is contiguous and
/// rows do not overlap (a contiguous tensor, or a narrowed view of wider rows); `None` else.
fn row_stride(l: &candle_core::Layout) -> Option<usize> {
    let (&[b, v], &[ld, step]) = (l.dims(), l.stride()) else {
        return None;
    };
    let rows_contiguous = step == 1 || v <= 1;
    match b {
        _ if !rows_contiguous => None,
        0 | 1 => Some(v),
        _ => (ld >= v).then_some(ld),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::row_stride;

    /// Rows read in place: contiguous logits and a narrowed view of wider rows (generation's
    /// padded LM head); copied first: overlapping, transposed or broadcast rows.
    #[test]
    fn rows_a_stride_apart_are_read_in_place_and_nothing_else() {
        let dev = Device::Cpu;
        let wide = Tensor::zeros((5, 264), DType::BF16, &dev).unwrap();
        assert_eq!(row_stride(wide.layout()), Some(264));
        let narrowed = wide.narrow(1, 0, 258).unwrap();
        assert_eq!(row_stride(narrowed.layout()), Some(264));
        // A view that starts past the first column keeps the stride; the launcher adds the
        // offset.
        assert_eq!(
            row_stride(wide.narrow(1, 6, 258).unwrap().layout()),
            Some(264)
        );
        let one = Tensor::zeros((1, 1, 264), DType::BF16, &dev).unwrap();
        let squeezed = one.narrow(2, 0, 257).unwrap().squeeze(1).unwrap();
        assert_eq!(row_stride(squeezed.layout()), Some(257));
        let transposed = Tensor::zeros((258, 5), DType::BF16, &dev)
            .unwrap()
            .t()
            .unwrap();
        assert_eq!(row_stride(transposed.layout()), None);
        let broadcast = Tensor::zeros(258, DType::BF16, &dev)
            .unwrap()
            .broadcast_as((5, 258))
            .unwrap();
        assert_eq!(row_stride(broadcast.layout()), None);
        assert_eq!(
            row_stride(Tensor::zeros(7, DType::BF16, &dev).unwrap().layout()),
            None
        );
    }
}
