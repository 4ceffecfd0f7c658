//! Our CUDA kernels as candle ops, and the plumbing they share (compiled only with feature
//! `cuda`).
//!
//! # How a kernel gets from `kernels/*.cu` to a launch
//!
//! `build.rs` compiles every `kernels/<stem>.cu` to PTX once per target arch
//! (`TEMPER_CUDA_ARCHS`, default `80,90`) and embeds the lot as [`KERNELS_PTX`]
//! (`(stem, arch, ptx)`). At run time [`load_func`] picks, for the device at hand, the PTX of
//! the highest arch not above its compute capability (the driver JIT-compiles it for the real
//! chip once; candle's per-device module cache keeps the module, one module name per PTX).
//!
//! # API for kernel modules (attention.rs, lora.rs, rmsnorm.rs, gae.rs)
//!
//! - Every kernel takes one argument, its family's params struct (`AttnParams`, `LoraParams`,
//!   `RmsNormParams`, `GaeParams`): a `#[repr(C)]` mirror of the struct in the family's
//!   `kernels/*.cuh`, with a size assert on both sides, its pointer fields typed [`DevPtr`]
//!   (tests/kernel_abi.rs checks the two field by field), and a [`KernelParams`] impl naming
//!   the kernel files that take it ([`launch`] refuses any other). Fill its device pointers
//!   through [`DevPtrs`] (which keeps cudarc's stream-ordering guards alive until it is
//!   dropped, after the launch), then [`launch`] on candle's stream:
//!   ```ignore
//!   let func = load_func(dev, "gae", "gae_scan_f32")?;
//!   let stream = dev.cuda_stream();
//!   let mut ptrs = DevPtrs::new(&stream);
//!   let p = GaeParams { rewards: ptrs.read(&input_view), adv: ptrs.write(&mut out), ..Default::default() };
//!   unsafe { launch(dev, &func, "gae_scan_f32", cfg, &p) }?;  // checks as after_launch
//!   drop(ptrs);                                               // after the launch
//!   ```
//! - Inputs: [`cuda_storage`] (a tensor's storage as CUDA) and [`contiguous_view`] (a typed view
//!   at the layout's offset, or an error for strided layouts — call `.contiguous()` first).
//! - Outputs: [`alloc_out`] (uninitialised, or poisoned with NaN bytes while
//!   [`set_poison`]`(true)` / `TEMPER_POISON_OUTPUTS=1`, so a test sees any element a kernel
//!   failed to write), then [`tensor_from_slice`] outside a custom op, or
//!   `CudaStorage::wrap_cuda_slice` inside `cuda_fwd`.
//! - Launch shapes: [`launch_1d`] (one thread per element), [`grid_stride`] (capped grid for
//!   grid-stride loops), [`sm_count`], [`compute_capability`]; [`to_i32`] for checked
//!   size arguments (kernels take `int`).
//! - Tests and benches: [`cuda_available`] says whether a CUDA device can be opened at all;
//!   without one they print `SKIPPED (no CUDA device): <name>` and return (built without
//!   feature `cuda`, the GPU tests print `SKIPPED (built without feature cuda): <name>`).
//! - `TEMPER_CUDA_SYNC_CHECK=1` makes [`after_launch`] synchronise and report the first
//!   asynchronous fault against the kernel that caused it (slow; for debugging).

pub mod adamw;
pub mod attention;
pub mod attention_recompute;
pub mod bias;
pub mod capture_arena;
pub mod decode_gemm;
pub mod decode_step;
pub mod dropout;
pub mod embedding;
pub mod gae;
pub mod gelu;
pub mod gemm;
pub mod heads;
pub mod layernorm;
pub mod logprobs;
pub mod lora;
pub mod loss_head;
mod lt_plans;
pub mod pdl;
pub use lt_plans::{timing_first_calls, GemmTune};
pub mod rmsnorm;
pub mod rope;
pub mod sample;
pub mod swiglu;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{
    self, sys::CUstreamCaptureStatus, CudaContext, CudaSlice, CudaStream, CudaView, DevicePtr,
    DevicePtrMut, DeviceRepr, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape, Storage, Tensor};

pub use candle_core::cuda_backend::cudarc;
pub use driver::{CudaFunction, LaunchConfig, PushKernelArg};

include!(concat!(env!("OUT_DIR"), "/kernels_ptx.rs"));

/// Whether a CUDA device can be opened (driver present, at least one device). Cached: the
/// driver is initialised once per process.
pub fn cuda_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| CudaContext::device_count().is_ok_and(|n| n > 0))
}

/// `(major, minor)` of the device behind `dev`.
pub fn compute_capability(dev: &CudaDevice) -> Result<(u32, u32)> {
    let (major, minor) = dev.cuda_stream().context().compute_capability().w()?;
    Ok((major as u32, minor as u32))
}

/// Number of streaming multiprocessors, for sizing persistent and grid-stride launches.
pub fn sm_count(dev: &CudaDevice) -> Result<u32> {
    let n = dev
        .cuda_stream()
        .context()
        .attribute(driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    Ok(n.max(1) as u32)
}

/// `"90"` -> (90, false), `"90a"` -> (90, true).
fn parse_arch(arch: &str) -> Option<(u32, bool)> {
    let specific = arch.ends_with('a');
    arch.trim_end_matches('a')
        .parse()
        .ok()
        .map(|n| (n, specific))
}

/// The embedded PTX of kernel file `stem` for a device of compute capability `cc`: the
/// highest arch not above it. An arch-specific entry (`90a`) only matches that exact chip, and
/// wins over the portable one of the same number there.
pub fn select_ptx(stem: &str, cc: (u32, u32)) -> Option<(&'static str, &'static str)> {
    let dev = cc.0 * 10 + cc.1;
    KERNELS_PTX
        .iter()
        .filter(|(s, _, _)| *s == stem)
        .filter_map(|&(_, arch, ptx)| {
            let (n, specific) = parse_arch(arch)?;
            let fits = if specific { n == dev } else { n <= dev };
            fits.then_some(((n, specific), arch, ptx))
        })
        .max_by_key(|(key, _, _)| *key)
        .map(|(_, arch, ptx)| (arch, ptx))
}

/// A params mirror: the one argument of every entry point in the `kernels/<stem>.cu` files
/// named by `STEMS`. [`launch`] refuses a kernel from any other file, so a launcher handing a
/// kernel another family's struct fails with its names instead of computing garbage;
/// tests/kernel_abi.rs checks each `STEMS` against the entry points in `kernels/`.
pub trait KernelParams: DeviceRepr {
    const STEMS: &'static [&'static str];
}

/// An entry point loaded by [`load_func`], with the kernel file it came from.
pub struct Kernel {
    func: CudaFunction,
    stem: &'static str,
    /// The arch number of the PTX it was loaded from (90 for `90` and `90a`).
    arch: u32,
}

impl Kernel {
    /// The arch number of the PTX it was loaded from: what `__CUDA_ARCH__` was when it was
    /// compiled, which some kernels' shapes depend on.
    pub fn arch(&self) -> u32 {
        self.arch
    }
}

impl std::ops::Deref for Kernel {
    type Target = CudaFunction;

    fn deref(&self) -> &CudaFunction {
        &self.func
    }
}

/// Loads `func` from `kernels/<stem>.cu`, compiled for the best arch this device can run.
pub fn load_func(dev: &CudaDevice, stem: &'static str, func: &str) -> Result<Kernel> {
    let cc = compute_capability(dev)?;
    let Some((arch, ptx)) = select_ptx(stem, cc) else {
        let built: Vec<&str> = KERNELS_PTX
            .iter()
            .filter(|(s, _, _)| *s == stem)
            .map(|(_, a, _)| *a)
            .collect();
        candle_core::bail!(
            "no PTX of kernels/{stem}.cu fits compute capability {}.{} (built for {built:?}; \
             rebuild with TEMPER_CUDA_ARCHS including {}{})",
            cc.0,
            cc.1,
            cc.0,
            cc.1
        );
    };
    let module = format!("temper_{stem}_sm{arch}");
    let func = dev
        .get_or_load_custom_func(func, &module, ptx)?
        .into_cuda_function();
    let arch = parse_arch(arch).map_or(0, |(n, _)| n);
    Ok(Kernel { func, stem, arch })
}

/// One thread per element, `threads` per block (a multiple of 32).
pub fn launch_1d(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u64).div_ceil(threads as u64).max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// For grid-stride loops: enough blocks to fill the device a few times over, no more.
pub fn grid_stride(dev: &CudaDevice, n: usize, threads: u32) -> Result<LaunchConfig> {
    let mut cfg = launch_1d(n, threads);
    let cap = sm_count(dev)? * (2048 / threads.max(1)).max(1);
    cfg.grid_dim.0 = cfg.grid_dim.0.min(cap);
    Ok(cfg)
}

/// Kernels take sizes as `int`; refuse what does not fit rather than wrap.
pub fn to_i32(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| {
        candle_core::Error::Msg(format!(
            "{what} = {n} does not fit the kernel's int argument"
        ))
    })
}

static POISON: OnceLock<AtomicBool> = OnceLock::new();

fn poison_flag() -> &'static AtomicBool {
    POISON.get_or_init(|| {
        let on = std::env::var("TEMPER_POISON_OUTPUTS").is_ok_and(|v| !v.is_empty() && v != "0");
        AtomicBool::new(on)
    })
}

/// Fill every freshly allocated kernel output with 0xFF bytes (NaN in f32, bf16 and f16)
/// before the launch. Tests turn this on; a NaN that survives means an unwritten element.
pub fn set_poison(on: bool) {
    poison_flag().store(on, Ordering::Relaxed);
}

pub fn poison_enabled() -> bool {
    poison_flag().load(Ordering::Relaxed)
}

/// An output buffer of `len` elements on candle's stream, poisoned when [`poison_enabled`].
///
/// # Safety
/// Unless poisoned the contents are uninitialised: the caller's kernel must write every
/// element before anything reads it.
pub unsafe fn alloc_out<T: DeviceRepr>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // Zero-byte allocations are an error in the driver; an empty tensor gets one spare element.
    let stream = dev.cuda_stream();
    // Inside a decode step's capture under programmatic launches, a buffer allocated at the
    // capture's start (capture_arena).
    let mut out = match capture_arena::take::<T>(&stream, len.max(1)) {
        Some(buf) => buf,
        None => dev.alloc::<T>(len.max(1))?,
    };
    if poison_enabled() && len > 0 {
        let bytes = out.num_bytes();
        let (ptr, _record) = out.device_ptr_mut(&stream);
        driver::result::memset_d8_async(ptr, 0xff, bytes, stream.cu_stream()).w()?;
    }
    Ok(out)
}

/// A device pointer field of a params mirror: a C `T *` in the kernels' struct. The same bits
/// as a `u64`, named apart so that tests/kernel_abi.rs can tell a pointer from an
/// `unsigned long long` (a draw index or a seed) when it checks the mirrors field by field.
pub type DevPtr = u64;

/// Raw device pointers for a kernel's params struct. cudarc hands out a raw pointer with a
/// guard that records the stream's work on the buffer when dropped; this keeps every guard
/// until it is itself dropped, which must happen after the launch that uses the pointers.
pub struct DevPtrs<'a> {
    stream: &'a CudaStream,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> DevPtrs<'a> {
    pub fn new(stream: &'a CudaStream) -> Self {
        Self {
            stream,
            guards: Vec::new(),
        }
    }

    /// A buffer the kernel reads.
    pub fn read<T, B: DevicePtr<T>>(&mut self, buf: &'a B) -> DevPtr {
        let (ptr, guard) = buf.device_ptr(self.stream);
        self.guards.push(guard);
        ptr
    }

    /// A buffer the kernel writes (or reads and writes).
    pub fn write<T, B: DevicePtrMut<T>>(&mut self, buf: &'a mut B) -> DevPtr {
        let (ptr, guard) = buf.device_ptr_mut(self.stream);
        self.guards.push(guard);
        ptr
    }

    /// An optional input: null when absent, which the kernels read as "none".
    pub fn read_opt<T, B: DevicePtr<T>>(&mut self, buf: Option<&'a B>) -> DevPtr {
        buf.map_or(0, |b| self.read(b))
    }
}

/// Launches `func` on candle's stream with `params` (its family's params struct) as the only
/// argument, then [`after_launch`].
///
/// # Safety
/// `P` must be the `#[repr(C)]` mirror of the kernel's params struct, every pointer in it
/// live (held by a [`DevPtrs`] that outlives this call) and large enough for what the kernel
/// reads and writes under `cfg`.
pub unsafe fn launch<P: KernelParams>(
    dev: &CudaDevice,
    func: &Kernel,
    name: &str,
    cfg: LaunchConfig,
    params: &P,
) -> Result<()> {
    check_params::<P>(func.stem, name)?;
    let stream = dev.cuda_stream();
    if pdl::applies(func.stem, func.arch)? {
        // SAFETY: the caller's contract above; every entry point of a PDL_STEMS file waits
        // for the kernel ahead before it touches what that kernel may read or write.
        unsafe { pdl::launch(&stream, &func.func, cfg, params) }?;
    } else {
        let mut b = stream.launch_builder(&func.func);
        b.arg(params);
        // SAFETY: the caller's contract above.
        unsafe { b.launch(cfg) }.w()?;
    }
    after_launch(dev, name)
}

/// An error unless `P` is the argument of the entry points in `kernels/<stem>.cu`.
fn check_params<P: KernelParams>(stem: &str, name: &str) -> Result<()> {
    if !P::STEMS.contains(&stem) {
        candle_core::bail!(
            "kernel {name} (kernels/{stem}.cu) was handed a {}, which is the argument of {:?}",
            std::any::type_name::<P>(),
            P::STEMS
        );
    }
    Ok(())
}

/// With `TEMPER_CUDA_SYNC_CHECK=1`, waits for the stream and names the kernel if it faulted;
/// otherwise free. Launch errors themselves are already returned by `launch`.
pub fn after_launch(dev: &CudaDevice, kernel: &str) -> Result<()> {
    static CHECK: OnceLock<bool> = OnceLock::new();
    let check = *CHECK.get_or_init(|| {
        std::env::var("TEMPER_CUDA_SYNC_CHECK").is_ok_and(|v| !v.is_empty() && v != "0")
    });
    if check {
        let stream = dev.cuda_stream();
        // Not inside a CUDA graph capture, where a synchronize is illegal and would
        // invalidate it; the eager step before a capture runs every kernel with the check.
        let capturing = stream
            .capture_status()
            .map_err(|e| candle_core::Error::Msg(format!("kernel {kernel} failed: {e:?}")))?;
        if capturing == CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
            stream
                .synchronize()
                .map_err(|e| candle_core::Error::Msg(format!("kernel {kernel} failed: {e:?}")))?;
        }
    }
    Ok(())
}

/// Whether every element offset keeps a `T` buffer 16-byte aligned, as the kernels' 16-byte
/// loads need (allocations themselves are).
pub fn aligned16<T>(offsets: &[usize]) -> bool {
    offsets
        .iter()
        .all(|o| (o * std::mem::size_of::<T>()).is_multiple_of(16))
}

/// Whether a tensor of `dtype` laid out as `l` starts on a 16-byte boundary of its buffer
/// (allocations themselves are aligned).
pub fn starts16(l: &Layout, dtype: candle_core::DType) -> bool {
    (l.start_offset() * dtype.size_in_bytes()).is_multiple_of(16)
}

/// `t` contiguous and starting on a 16-byte boundary, as kernels that load 16-byte chunks
/// (cp.async, ldmatrix tiles) read it: itself, or a copy into fresh storage
/// (`force_contiguous`: `copy` would keep the view's offset, and with it the misalignment).
pub fn contiguous16(t: &Tensor) -> Result<Tensor> {
    let t = t.contiguous()?;
    if starts16(t.layout(), t.dtype()) {
        Ok(t)
    } else {
        t.force_contiguous()
    }
}

/// Values of `T` per 16-byte chunk, where a kernel reading rows (or a whole tensor) of `n`
/// values from buffers that start at these element offsets can take 16-byte chunks (`n` a
/// multiple of the chunk, every base aligned); `None` where it must go a value at a time.
pub fn vec16_chunk<T>(n: usize, offsets: &[usize]) -> Option<usize> {
    let chunk = 16 / std::mem::size_of::<T>();
    (n.is_multiple_of(chunk) && aligned16::<T>(offsets)).then_some(chunk)
}

/// A tensor's storage as CUDA storage.
pub fn cuda_storage(storage: &Storage) -> Result<&CudaStorage> {
    match storage {
        Storage::Cuda(s) => Ok(s),
        other => candle_core::bail!(
            "expected a CUDA tensor, got one on {:?}",
            other.device().location()
        ),
    }
}

/// A typed view of a contiguous layout (offset applied); strided layouts are an error.
pub fn contiguous_view<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
) -> Result<CudaView<'a, T>> {
    let slice = storage.as_cuda_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(slice.slice(start..end)),
        None => candle_core::bail!("kernel input must be contiguous (layout {layout:?})"),
    }
}

/// An optional tensor's storage guard and layout, held while a kernel reads it.
pub type Guarded<'a> = Option<(candle_core::StorageRef<'a>, &'a Layout)>;

/// A contiguous device view of an optional input behind its guard ([`Guarded`]); `None` for
/// none, which the kernels read as a null pointer.
pub fn opt_view<'a, T: CudaDType>(guard: &'a Guarded<'_>) -> Result<Option<CudaView<'a, T>>> {
    match guard {
        Some((g, l)) => Ok(Some(contiguous_view::<T>(cuda_storage(g)?, l)?)),
        None => Ok(None),
    }
}

/// Wraps a kernel's output storage (a side output of a custom op) as a tensor with no
/// autograd history.
pub fn tensor_from_storage(storage: CudaStorage, shape: Shape) -> Tensor {
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

/// Wraps a kernel's output as a tensor with no autograd history.
pub fn tensor_from_slice<T: CudaDType, S: Into<Shape>>(
    slice: CudaSlice<T>,
    dev: &CudaDevice,
    shape: S,
) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    // In a decode step's capture, freed after its last kernel, not between two of them.
    capture_arena::kept(Tensor::from_storage(
        storage,
        shape,
        BackpropOp::none(),
        false,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Probe(u32);
    // SAFETY: plain old data.
    unsafe impl DeviceRepr for Probe {}
    impl KernelParams for Probe {
        const STEMS: &'static [&'static str] = &["gelu", "bias"];
    }

    #[test]
    fn a_kernel_refuses_another_familys_params() {
        assert!(check_params::<Probe>("bias", "bias_fwd_bf16").is_ok());
        let err = check_params::<Probe>("rope", "rope_fwd_bf16")
            .unwrap_err()
            .to_string();
        assert!(err.contains("rope_fwd_bf16 (kernels/rope.cu)"), "{err}");
        assert!(err.contains("[\"gelu\", \"bias\"]"), "{err}");
    }

    /// A view that starts off a 16-byte boundary comes back as a copy that starts on one
    /// (the kernels' 16-byte loads would fault on it); an aligned view comes back as it is.
    #[test]
    fn contiguous16_moves_a_misaligned_view_to_an_aligned_start() {
        let dev = candle_core::Device::Cpu;
        let t = Tensor::arange(0f32, 40.0, &dev)
            .and_then(|t| t.to_dtype(candle_core::DType::BF16))
            .unwrap();
        let odd = t.narrow(0, 3, 16).unwrap();
        let moved = contiguous16(&odd).unwrap();
        assert_eq!(moved.layout().start_offset(), 0);
        let values = |t: &Tensor| t.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>();
        assert_eq!(values(&moved).unwrap(), values(&odd).unwrap());
        let even = t.narrow(0, 8, 16).unwrap();
        assert_eq!(contiguous16(&even).unwrap().layout().start_offset(), 8);
    }

    #[test]
    fn every_kernel_file_is_embedded_for_every_arch() {
        let archs = |stem: &str| -> Vec<&str> {
            let mut v: Vec<&str> = KERNELS_PTX
                .iter()
                .filter(|(s, _, _)| *s == stem)
                .map(|(_, a, _)| *a)
                .collect();
            v.sort_unstable();
            v
        };
        // The modules above load these; and every kernels/*.cu build.rs found (its list is
        // embedded, so this does not read the source tree at run time) must be there as well.
        let mut stems: Vec<&str> = vec![
            "attention_prep",
            "attention_fwd",
            "attention_decode",
            "attention_bwd",
            "gae",
            "lora",
            "rmsnorm",
        ];
        for stem in KERNEL_STEMS {
            if !stems.contains(stem) {
                stems.push(stem);
            }
        }
        assert_eq!(
            KERNEL_STEMS.len(),
            stems.len(),
            "a loaded module has no kernels/*.cu"
        );
        let expected = archs("gae");
        assert!(!expected.is_empty(), "gae missing");
        for stem in &stems {
            assert_eq!(archs(stem), expected, "{stem}: not built for every arch");
        }
        for (stem, arch, ptx) in KERNELS_PTX {
            assert!(parse_arch(arch).is_some(), "{stem}: bad arch {arch}");
            assert!(ptx.contains(".version"), "{stem} sm{arch}: not PTX");
        }
    }

    #[test]
    fn ptx_selection_prefers_the_highest_fitting_arch() {
        // Only meaningful for the archs actually built; check the rule on whatever is there.
        let archs: Vec<(u32, bool)> = KERNELS_PTX
            .iter()
            .filter(|(s, _, _)| *s == "gae")
            .filter_map(|(_, a, _)| parse_arch(a))
            .collect();
        for cc in [(7, 5), (8, 0), (8, 6), (9, 0), (10, 0), (12, 0)] {
            let dev = cc.0 * 10 + cc.1;
            let best = archs
                .iter()
                .filter(|(n, specific)| if *specific { *n == dev } else { *n <= dev })
                .max();
            let got = select_ptx("gae", cc).map(|(a, _)| parse_arch(a).unwrap());
            assert_eq!(got.as_ref(), best, "cc {cc:?}");
        }
        assert!(select_ptx("no_such_kernel", (9, 0)).is_none());
    }
}
