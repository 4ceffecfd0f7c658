//! Launcher of `kernels/decode_gemm.cu`: `act(x W^T + b)` for generation's few rows (at most
//! [`MAX_ROWS`]), a stream over `W` with the K slices summed inside the launch. The reference is
//! the cuBLASLt GEMM (`super::gemm`), which serves every call this one does not.
//!
//! Off unless `TEMPER_DECODE_GEMM=ours` ([`DecodeGemm`]): the kernel is checked in the CPU
//! emulator (tests/kernel_emu/decode_gemm.cpp) and against cuBLASLt on a GPU
//! (tests/gpu_train_ops.rs), but its speed against cuBLAS's at a decode step has not been
//! measured yet (`scripts/gpu-check.sh`, section `bench-generate-decode-gemm`); it becomes the
//! default where it wins.

use std::cell::Cell;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr};
use candle_core::cuda_backend::CudaDType;
use candle_core::{DType, Result, Tensor, WithDType};

use super::{
    alloc_out, contiguous_view, cuda_storage, launch, load_func, sm_count, tensor_from_slice,
    to_i32, DevPtr, DevPtrs, KernelParams, LaunchConfig,
};

/// The Rust mirror of `struct DecodeGemmParams` in kernels/decode_gemm.cu (field comments
/// there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct DecodeGemmParams {
    x: DevPtr,
    w: DevPtr,
    bias: DevPtr,
    y: DevPtr,
    part: DevPtr,
    count: DevPtr,
    m: i32,
    n: i32,
    k: i32,
    splits: i32,
    chunks: i32,
    gelu: i32,
}
const _: () = assert!(std::mem::size_of::<DecodeGemmParams>() == 72);
const _: () = assert!(std::mem::align_of::<DecodeGemmParams>() == 8);
// SAFETY: plain old data with the C layout of the kernel's struct (asserted above).
unsafe impl DeviceRepr for DecodeGemmParams {}
impl KernelParams for DecodeGemmParams {
    const STEMS: &'static [&'static str] = &["decode_gemm"];
}

/// The most rows one launch serves (four 16-row mma tiles).
pub const MAX_ROWS: usize = 64;
/// Output columns per CTA (`kCols`) and k per chunk.
const COLS: usize = 32;
const CHUNK: usize = 32;
/// Threads per CTA (`kThreads`).
const THREADS: u32 = 128;

/// Which GEMM serves generation's few-row products: `TEMPER_DECODE_GEMM=ours` for this
/// kernel, anything else (or nothing) for cuBLASLt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeGemm {
    Cublaslt,
    Ours,
}

thread_local! {
    /// Set by [`DecodeGemm::scope`].
    static SCOPE: Cell<Option<DecodeGemm>> = const { Cell::new(None) };
}

impl DecodeGemm {
    /// Read once per process.
    pub fn from_env() -> Self {
        static MODE: OnceLock<DecodeGemm> = OnceLock::new();
        *MODE.get_or_init(|| match std::env::var("TEMPER_DECODE_GEMM").as_deref() {
            Ok("ours") => Self::Ours,
            _ => Self::Cublaslt,
        })
    }

    /// This thread's choice: a [`DecodeGemm::scope`]'s, else [`DecodeGemm::from_env`].
    pub fn current() -> Self {
        SCOPE.with(Cell::get).unwrap_or_else(Self::from_env)
    }

    /// Runs `f` with `self` as this thread's choice (a test comparing the two in one process).
    pub fn scope<R>(self, f: impl FnOnce() -> R) -> R {
        super::lt_plans::scoped(&SCOPE, Some(self), f)
    }
}

/// How a launch covers `[m, n] x k`: column tiles, K slices and 32-wide k chunks per slice,
/// and 16-row mma tiles. Two CTAs an SM where the columns alone give fewer, each of its four
/// warps with at least one chunk; no slice empty. (Mirrored by tests/kernel_emu/decode_gemm.cpp.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub tiles: usize,
    pub splits: usize,
    pub chunks: usize,
    pub mt: usize,
}

impl Plan {
    pub fn new(m: usize, n: usize, k: usize, sms: usize) -> Self {
        let tiles = n.div_ceil(COLS);
        let nchunks = k.div_ceil(CHUNK).max(1);
        let want = (2 * sms).div_ceil(tiles.max(1));
        let splits = want.clamp(1, (nchunks / 4).max(1));
        let chunks = nchunks.div_ceil(splits);
        Self {
            tiles,
            splits: nchunks.div_ceil(chunks),
            chunks,
            mt: m.div_ceil(16).max(1),
        }
    }
}

/// Launches of this kernel by this process: [`for_generation`] leaves a product to cuBLASLt
/// without a word wherever the kernel does not take it, so benches and tests ask this whether
/// it ran.
pub fn launches() -> u64 {
    LAUNCHES.load(Ordering::Relaxed)
}

static LAUNCHES: AtomicU64 = AtomicU64::new(0);

/// Whether the kernel takes `x W^T`: `x [..., K]` (rows at most [`MAX_ROWS`]) and `W [N, K]`
/// both bf16 or both f16, K a multiple of 8 (16-byte rows), N at least 1.
pub fn takes(x: &Tensor, w: &Tensor) -> bool {
    let (Some(&k), Ok((n, kw))) = (x.dims().last(), w.dims2()) else {
        return false;
    };
    let rows = x.elem_count() / k.max(1);
    matches!(x.dtype(), DType::BF16 | DType::F16)
        && w.dtype() == x.dtype()
        && x.rank() >= 2
        && k == kw
        && k > 0
        && k.is_multiple_of(8)
        && n > 0
        && (1..=MAX_ROWS).contains(&rows)
}

/// [`decode_gemm`] where generation asks for it: `TEMPER_DECODE_GEMM=ours`, inside
/// generation's frozen weights, no tape recording and no operand tracked; `None` otherwise,
/// and the caller's cuBLASLt GEMM serves.
pub fn for_generation(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    gelu: bool,
) -> Result<Option<Tensor>> {
    // Every GEMM of training passes here: the switch first, the operands only when asked.
    let asked = DecodeGemm::current() == DecodeGemm::Ours && crate::model::cast::frozen();
    if !asked || crate::tape::recording() {
        return Ok(None);
    }
    if !crate::tape::untracked(&[x, w]) || b.is_some_and(|b| b.track_op()) {
        return Ok(None);
    }
    decode_gemm(x, w, b, gelu)
}

/// `act(x W^T + b)` (`b [N]` in any float dtype, cast to x's), `x [..., K]`, `W [N, K]`: `None`
/// where [`takes`] says no, or an operand does not start on a 16-byte boundary. No gradient:
/// generation only.
pub fn decode_gemm(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    gelu: bool,
) -> Result<Option<Tensor>> {
    if !takes(x, w) {
        return Ok(None);
    }
    let (x, w) = (x.detach().contiguous()?, w.detach().contiguous()?);
    let b = match b {
        Some(b) if b.dims() == [w.dim(0)?] => Some(b.detach().to_dtype(x.dtype())?.contiguous()?),
        Some(b) => candle_core::bail!("decode_gemm: bias {:?} for {} columns", b.dims(), w.dim(0)?),
        None => None,
    };
    match x.dtype() {
        DType::BF16 => run::<half::bf16>(&x, &w, b.as_ref(), gelu),
        _ => run::<half::f16>(&x, &w, b.as_ref(), gelu),
    }
}

fn run<T: CudaDType + DeviceRepr + WithDType>(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    gelu: bool,
) -> Result<Option<Tensor>> {
    let dev = x.device().as_cuda_device()?;
    let (n, k) = w.dims2()?;
    let m = x.elem_count() / k;
    let sms = sm_count(dev)? as usize;
    let plan = Plan::new(m, n, k, sms);
    let stream = dev.cuda_stream();
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let xv = contiguous_view::<T>(cuda_storage(&xs)?, xl)?;
    let wv = contiguous_view::<T>(cuda_storage(&ws)?, wl)?;
    let aligned = |p: u64| p.is_multiple_of(16);
    if !aligned(xv.device_ptr(&stream).0) || !aligned(wv.device_ptr(&stream).0) {
        return Ok(None);
    }
    let split = plan.splits > 1;
    let mut counters = Counters::lock();
    let Some(count) = counters.at_least(&stream, sms, if split { plan.tiles } else { 0 })? else {
        return Ok(None);
    };
    let bias = b.map(|b| b.storage_and_layout());
    let bv = match &bias {
        Some((s, l)) => Some(contiguous_view::<T>(cuda_storage(s)?, l)?),
        None => None,
    };
    // SAFETY: every (row < m, column < n) is written: by its tile's CTA (one slice) or by
    // the tile's last slice.
    let mut y = unsafe { alloc_out::<T>(dev, m * n)? };
    // SAFETY: with slices, each writes its [m, n] partial sums before any is read.
    let mut part = match split {
        true => Some(unsafe { alloc_out::<f32>(dev, plan.splits * m * n)? }),
        false => None,
    };
    let name = format!("decode_gemm_{}_m{}", T::DTYPE.as_str(), plan.mt);
    let func = load_func(dev, "decode_gemm", &name)?;
    let cfg = LaunchConfig {
        grid_dim: (
            to_i32(plan.tiles, "column tiles")? as u32,
            to_i32(plan.splits, "K slices")? as u32,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    {
        let mut ptrs = DevPtrs::new(&stream);
        let p = DecodeGemmParams {
            x: ptrs.read(&xv),
            w: ptrs.read(&wv),
            bias: ptrs.read_opt(bv.as_ref()),
            y: ptrs.write(&mut y),
            part: part.as_mut().map_or(0, |b| ptrs.write(b)),
            count: if split { ptrs.write(count) } else { 0 },
            m: to_i32(m, "rows")?,
            n: to_i32(n, "columns")?,
            k: to_i32(k, "K")?,
            splits: to_i32(plan.splits, "K slices")?,
            chunks: to_i32(plan.chunks, "chunks")?,
            gelu: i32::from(gelu),
        };
        // SAFETY: x holds m rows of k, W n rows of k (16-byte aligned, checked above), bias n
        // elements, y m * n; with slices part splits * m * n and count at least one zeroed
        // counter per column tile (each launch's last slices leave them zeroed).
        unsafe { launch(dev, &func, &name, cfg, &p) }?;
    }
    LAUNCHES.fetch_add(1, Ordering::Relaxed);
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 2") = n;
    if let Some(part) = part {
        // In a decode step's capture, freed after its last kernel rather than before the next.
        super::capture_arena::keep(part);
    }
    Ok(Some(tensor_from_slice(y, dev, dims)))
}

/// The slice counters of each stream: zeroed once, and left zeroed by every launch (the last
/// slice of a tile resets its counter), so a decode step's GEMMs add no memset each (48 for
/// GPT-2 small, in its CUDA graph too). Allocated once, outside a graph capture, and never
/// replaced: a captured graph keeps the counters' address for as long as it lives, so a
/// replacement would free memory its replays still count in. [`Plan`] splits K only where the
/// column tiles number under two an SM, so `2 * sms` counters serve every split launch; a
/// launch that would need more is left to cuBLASLt.
struct Counters(HashMap<usize, (Arc<CudaStream>, CudaSlice<u32>)>);

impl Counters {
    fn lock() -> std::sync::MutexGuard<'static, Counters> {
        static ALL: OnceLock<Mutex<Counters>> = OnceLock::new();
        ALL.get_or_init(|| Mutex::new(Counters(HashMap::new())))
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// At least `n` zeroed counters on `stream` (`n` 0: none needed, a spare one handed out),
    /// from the stream's one buffer of `counters_for(sms)`; `None` where `n` is more than
    /// that, or where the buffer would first be made inside a capture.
    fn at_least(
        &mut self,
        stream: &Arc<CudaStream>,
        sms: usize,
        n: usize,
    ) -> Result<Option<&mut CudaSlice<u32>>> {
        let key = Arc::as_ptr(stream) as usize;
        if let Entry::Vacant(slot) = self.0.entry(key) {
            let capturing = stream.capture_status().map_err(candle_core::Error::wrap)?
                != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
            if capturing {
                return Ok(None);
            }
            let fresh = stream
                .alloc_zeros::<u32>(counters_for(sms))
                .map_err(candle_core::Error::wrap)?;
            slot.insert((stream.clone(), fresh));
        }
        Ok(self
            .0
            .get_mut(&key)
            .map(|(_, c)| c)
            .filter(|c| c.len() >= n.max(1)))
    }
}

/// The counters a stream's buffer holds: one per column tile of any launch [`Plan`] splits.
fn counters_for(sms: usize) -> usize {
    (2 * sms).max(64)
}

#[cfg(test)]
mod tests {
    use super::{counters_for, Plan};

    /// GPT-2's decode GEMMs at 64 rows on 132 SMs: every slice has chunks, every warp work
    /// where the K allows, and the grid about two CTAs an SM where the columns alone are few.
    #[test]
    fn plans_cover_k_with_no_empty_slice() {
        for (n, k) in [
            (2304, 768),
            (768, 768),
            (3072, 768),
            (768, 3072),
            (50264, 768),
            (8, 8),
        ] {
            for sms in [1, 8, 132] {
                let p = Plan::new(64, n, k, sms);
                let nchunks = k.div_ceil(32);
                assert!(
                    p.chunks * (p.splits - 1) < nchunks,
                    "{n}x{k} on {sms}: {p:?}"
                );
                assert!(p.chunks * p.splits >= nchunks, "{n}x{k} on {sms}: {p:?}");
                assert!(p.splits == 1 || p.chunks >= 4, "{n}x{k} on {sms}: {p:?}");
                assert_eq!(p.mt, 4);
            }
        }
        // Every split launch finds a counter per column tile in the stream's one buffer.
        for sms in [1, 8, 132, 200] {
            for n in (8..4 * 2 * sms * 32).step_by(8) {
                let p = Plan::new(64, n, 3072, sms);
                assert!(
                    p.splits == 1 || p.tiles <= counters_for(sms),
                    "{n} on {sms}: {p:?}"
                );
            }
        }
        assert_eq!(Plan::new(64, 768, 3072, 132).splits, 11);
        assert_eq!(Plan::new(64, 50264, 768, 132).splits, 1);
        assert_eq!(Plan::new(1, 8, 8, 132).mt, 1);
        assert_eq!(Plan::new(17, 8, 8, 132).mt, 2);
    }
}
