//! cuBLASLt matmuls planned once per problem, for `gemm.rs`.
//!
//! cudarc's `Matmul::matmul` builds a descriptor and three matrix layouts and asks cuBLASLt's
//! heuristic for an algorithm on every call, then destroys them. The heuristic query is the
//! costly part, tens of microseconds of host time per GEMM: hidden behind the GPU in a long
//! training step, but not in an eager decode step of small GEMMs, nor in a bench that waits
//! for each call. Here the descriptor, the layouts and the heuristic's algorithm are kept per
//! problem (dtype, transposes, sizes, leading dimensions, epilogue) and stream, so a call after
//! the first costs one `cublasLtMatmul`, plus one attribute write with a bias. The workspace
//! is cudarc's (32 MiB from Hopper on, 4 MiB before). cudarc takes the heuristic's first
//! answer, and so does the default here; with `TEMPER_GEMM_TUNE=timed` a problem that recurs
//! has the heuristic's first 8 candidates timed on its own operands and runs the fastest
//! (`GemmTune`): on the H200 the first answer for the `x W^T` of 8192x4096x4096 ran 1.14x
//! PyTorch's GEMM forward while the backward's GEMMs matched it, so the first answer is not
//! always cuBLAS's best. Not the default, because the choice rides on timing noise and would
//! cost runs their bit-for-bit reproducibility.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::LocalKey;
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::cublaslt::result::{self as lt, CublasError};
use candle_core::cuda_backend::cudarc::cublaslt::sys;
use candle_core::cuda_backend::cudarc::driver::sys::{
    CUdevice_attribute, CUevent_flags, CUstreamCaptureStatus,
};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use candle_core::{CudaDevice, DType, Result};

/// Everything the descriptors and the heuristic see, in cuBLASLt's column-major terms: `D [m,
/// n] = op(A) op(B) (+ bias)`, `A` `[m, k]` (`[k, m]` stored when `transa`), `B` `[k, n]`
/// (`[n, k]` when `transb`), `C` = `D`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Problem {
    pub dtype: DType,
    pub transa: bool,
    pub transb: bool,
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub lda: i64,
    pub ldb: i64,
    pub ldc: i64,
    pub epilogue: Epilogue,
}

/// What cuBLASLt's epilogue does to `op(A) op(B)` before it is rounded and stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Epilogue {
    Plain,
    /// Adds a bias vector of `m` to every column.
    Bias,
    /// Adds the bias, then applies GELU's tanh form (PyTorch's `_addmm_activation`): for
    /// generation only, as the pre-activation a backward would need is not kept.
    BiasGelu,
}

impl Epilogue {
    pub fn has_bias(self) -> bool {
        self != Epilogue::Plain
    }
}

impl Problem {
    /// Floating-point operations of one call.
    fn flop(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// How a problem's algorithm is chosen among the heuristic's candidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmTune {
    /// The heuristic's first answer, as cudarc (and a plain cuBLASLt call) takes it: the same
    /// algorithm in every run, so a run (and a resumed one) gives the same bits every time.
    /// The default.
    Heuristic,
    /// A problem of at least [`TUNE_MIN_FLOP`] has each candidate timed on a call at least
    /// [`TUNE_AFTER`] after its first (so a shape one forward pass uses, a prefill's odd length
    /// say, pays nothing; a decode step about to be captured as a graph times at once,
    /// [`timing_first_calls`]) and runs the fastest from then on, where it beats the
    /// heuristic's answer by [`TUNE_MARGIN`]. Which one that is depends on timing noise where
    /// two candidates time alike, so runs may differ in their last bits (as with PyTorch's
    /// `cudnn.benchmark`), and a run switches algorithm partway.
    Timed,
}

thread_local! {
    /// Set by [`GemmTune::scope`].
    static TUNE_SCOPE: Cell<Option<GemmTune>> = const { Cell::new(None) };
}

impl GemmTune {
    /// `TEMPER_GEMM_TUNE` (`timed` or `heuristic`; `heuristic` when unset or unknown), read
    /// once.
    pub fn from_env() -> Self {
        static ONCE: OnceLock<GemmTune> = OnceLock::new();
        *ONCE.get_or_init(|| match std::env::var("TEMPER_GEMM_TUNE").as_deref() {
            Ok("timed") => Self::Timed,
            _ => Self::Heuristic,
        })
    }

    /// This thread's choice: a [`GemmTune::scope`]'s, else [`GemmTune::from_env`].
    pub fn current() -> Self {
        TUNE_SCOPE.with(Cell::get).unwrap_or_else(Self::from_env)
    }

    /// Runs `f` with `self` as this thread's choice (a bench or test comparing the two in one
    /// process; the timed choices are kept beside the heuristic's, so each mode runs its own).
    pub fn scope<R>(self, f: impl FnOnce() -> R) -> R {
        scoped(&TUNE_SCOPE, Some(self), f)
    }
}

/// Candidates asked of the heuristic, best first.
const CANDIDATES: usize = 8;

/// Problems smaller than this (2 m n k) keep the heuristic's first answer: too short for the
/// choice to matter, or for events to time. GPT-2's decode GEMMs at 64 rows (75 MFLOP and up)
/// are timed: they recur every step of every generation, and at their size how cuBLASLt
/// splits the work over the SMs is most of their cost.
pub const TUNE_MIN_FLOP: f64 = 5e7;

/// The largest scratch output (bytes) a candidate is timed into for an accumulating call.
const TUNE_SCRATCH_MAX: usize = 256 << 20;

/// How long after a problem's first call a call times its candidates: longer than one
/// forward pass takes the host to queue (each layer calls the same problems), shorter than a
/// training step of GPT-2 small at B16 T1024 (~40 ms), so that a recurring shape is timed by
/// the second step.
pub const TUNE_AFTER: Duration = Duration::from_millis(20);

/// The share by which a candidate must beat the heuristic's answer to replace it: within the
/// events' noise the choice would differ from run to run.
pub const TUNE_MARGIN: f32 = 0.03;

/// Timed choices kept at most; past that the record starts over.
const TIMED_MAX: usize = 4096;

thread_local! {
    /// Set by [`timing_first_calls`].
    static TIME_FIRST_CALLS: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every due problem's candidates timed on its first call: for the eager step
/// that precedes a CUDA graph capture, whose GEMMs are never called again (the graph replays
/// them), so a later call would never come.
pub fn timing_first_calls<R>(f: impl FnOnce() -> R) -> R {
    scoped(&TIME_FIRST_CALLS, true, f)
}

/// Runs `f` with this thread's `key` set to `value`, and puts the old value back however `f`
/// ends.
pub(super) fn scoped<T: Copy + 'static, R>(
    key: &'static LocalKey<Cell<T>>,
    value: T,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore<T: Copy + 'static>(&'static LocalKey<Cell<T>>, T);
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _restore = Restore(key, key.with(|c| c.replace(value)));
    f()
}

/// Timed runs per candidate, after one untimed run.
const TUNE_REPS: usize = 3;

/// A problem's descriptor, layouts (A, B, C = D) and algorithm.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
    /// Under [`GemmTune::Timed`], once timed: the fastest where it beat `algo`.
    fastest: Option<sys::cublasLtMatmulAlgo_t>,
    /// The heuristic's other answers, in its order, until they are timed; then empty.
    untimed: Vec<sys::cublasLtMatmulAlgo_t>,
    /// When the problem was first called.
    first_call: Option<Instant>,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created by `Plan::new` and used by no call after this (the plan is gone);
        // a failure to free cannot be acted on here.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
        }
    }
}

fn lt_error(e: CublasError) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuBLASLt: {e:?}"))
}

fn matrix_type(dtype: DType) -> Result<sys::cudaDataType> {
    Ok(match dtype {
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
        dt => candle_core::bail!("gemm: no cuBLASLt plan for {dt:?}"),
    })
}

/// # Safety
/// `value` points at `size` readable bytes of the attribute's type.
unsafe fn set_desc(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    value: *const c_void,
    size: usize,
) -> Result<()> {
    lt::set_matmul_desc_attribute(desc, attr, value, size).map_err(lt_error)
}

impl Plan {
    /// The descriptor and layouts of `p`, and the heuristic's algorithm for them with `bias`
    /// (its pointer, which the heuristic may inspect for alignment) and `workspace` bytes.
    fn new(
        handle: sys::cublasLtHandle_t,
        p: &Problem,
        bias: Option<u64>,
        workspace: usize,
    ) -> Result<Self> {
        let ty = matrix_type(p.dtype)?;
        let (ar, ac) = if p.transa { (p.k, p.m) } else { (p.m, p.k) };
        let (br, bc) = if p.transb { (p.n, p.k) } else { (p.k, p.n) };
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(lt_error)?;
        // From here on the plan owns what exists; a failure drops it and frees them.
        let mut plan = Plan {
            desc,
            layouts: [std::ptr::null_mut(); 3],
            // SAFETY: plain old data, overwritten by the heuristic's answer below.
            algo: unsafe { std::mem::zeroed() },
            fastest: None,
            untimed: Vec::new(),
            first_call: None,
        };
        for (slot, (rows, cols, ld)) in
            plan.layouts
                .iter_mut()
                .zip([(ar, ac, p.lda), (br, bc, p.ldb), (p.m, p.n, p.ldc)])
        {
            *slot = lt::create_matrix_layout(ty, rows, cols, ld).map_err(lt_error)?;
        }
        let (ta, tb) = (i32::from(p.transa), i32::from(p.transb));
        let epilogue = match p.epilogue {
            Epilogue::Plain => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
            Epilogue::Bias => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            Epilogue::BiasGelu => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS,
        };
        use sys::cublasLtMatmulDescAttributes_t as A;
        // SAFETY: each value is a live local of the attribute's type and size.
        unsafe {
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSA, ptr(&ta), 4)?;
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSB, ptr(&tb), 4)?;
            set_desc(
                desc,
                A::CUBLASLT_MATMUL_DESC_EPILOGUE,
                ptr(&epilogue),
                std::mem::size_of::<sys::cublasLtEpilogue_t>(),
            )?;
            if let Some(b) = bias {
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, ptr(&b), 8)?;
            }
        }
        let pref = lt::create_matmul_pref().map_err(lt_error)?;
        let mut results: [sys::cublasLtMatmulHeuristicResult_t; CANDIDATES] =
            // SAFETY: plain old data, written by the heuristic below.
            unsafe { std::mem::zeroed() };
        let mut count = 0i32;
        // SAFETY: `pref` and the plan's handles are live; the workspace size is a usize, and
        // `results` holds the `CANDIDATES` answers asked for.
        let found = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                ptr(&workspace),
                std::mem::size_of::<usize>(),
            )
            .and_then(|()| {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    handle,
                    desc,
                    plan.layouts[0],
                    plan.layouts[1],
                    plan.layouts[2],
                    plan.layouts[2],
                    pref,
                    CANDIDATES as i32,
                    results.as_mut_ptr(),
                    &mut count,
                )
                .result()
            })
        };
        // SAFETY: created above, used by nothing after this.
        unsafe {
            let _ = lt::destroy_matmul_pref(pref);
        }
        found.map_err(lt_error)?;
        let mut algos = results[..(count.max(0) as usize).min(CANDIDATES)]
            .iter()
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo);
        let Some(first) = algos.next() else {
            return Err(lt_error(CublasError(
                sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED,
            )));
        };
        plan.algo = first;
        if p.flop() >= TUNE_MIN_FLOP {
            plan.untimed = algos.collect();
        }
        Ok(plan)
    }
}

fn ptr<T>(v: &T) -> *const c_void {
    v as *const T as *const c_void
}

/// Plans kept per stream at most; past that the cache starts over.
const MAX_PLANS: usize = 512;

/// One call's scalars and device pointers: `D = alpha op(A) op(B) + beta C`, `C` and `D` at
/// `c`.
#[derive(Clone, Copy)]
struct Operands {
    alpha: f32,
    beta: f32,
    a: u64,
    b: u64,
    c: u64,
}

/// One cuBLASLt handle, workspace and plan cache per CUDA stream.
pub(crate) struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    plans: Mutex<Plans>,
}

#[derive(Default)]
struct Plans {
    live: HashMap<Problem, Plan>,
    /// Every timed problem's outcome ([`Plan::fastest`]), kept when `live` starts over: a
    /// problem is timed once.
    timed: HashMap<Problem, Option<sys::cublasLtMatmulAlgo_t>>,
}

// SAFETY: the handle is used only under the plans' lock (cuBLASLt handles may be shared
// across threads when calls do not overlap), and the raw descriptors live inside it.
unsafe impl Send for Lt {}
// SAFETY: as above.
unsafe impl Sync for Lt {}

impl Lt {
    fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context();
        ctx.bind_to_thread().map_err(candle_core::Error::wrap)?;
        // The workspace allocated inside a CUDA graph capture would belong to the graph; the
        // decode step's eager run before its capture makes the handle first.
        if stream.capture_status().map_err(candle_core::Error::wrap)?
            != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
        {
            candle_core::bail!("gemm: cuBLASLt's first use inside a CUDA graph capture");
        }
        let major = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .map_err(candle_core::Error::wrap)?;
        let size = if major >= 9 { 32 << 20 } else { 4 << 20 };
        // SAFETY: cuBLASLt's scratch space: nothing reads it before a matmul writes it.
        let workspace = unsafe { stream.alloc::<u8>(size) }.map_err(candle_core::Error::wrap)?;
        let handle = lt::create_handle().map_err(lt_error)?;
        Ok(Self {
            handle,
            workspace,
            stream,
            plans: Mutex::new(Plans::default()),
        })
    }

    /// The one for `dev`'s stream (candle runs a device's work on one stream per thread rank).
    pub(crate) fn of(dev: &CudaDevice) -> Result<Arc<Lt>> {
        static ALL: OnceLock<Mutex<HashMap<usize, Arc<Lt>>>> = OnceLock::new();
        let stream = dev.cuda_stream();
        let key = Arc::as_ptr(&stream) as usize;
        let mut all = ALL
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(lt) = all.get(&key) {
            return Ok(lt.clone());
        }
        let lt = Arc::new(Lt::new(stream)?);
        all.insert(key, lt.clone());
        Ok(lt)
    }

    /// `D = alpha op(A) op(B) + beta C` (and `p.epilogue`), `C` and `D` the same
    /// buffer, on this stream, with `p`'s plan (made on first use).
    ///
    /// # Safety
    /// `a`, `b`, `c` (and `bias`) are device pointers on this stream's device holding the
    /// matrices `p` describes (the bias `p.m` elements), 256-byte aligned as cuBLASLt's
    /// heuristic assumes, and live until the GEMM has run; `bias` is `Some` exactly when
    /// `p.epilogue` has one.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn matmul(
        &self,
        p: &Problem,
        alpha: f32,
        beta: f32,
        a: u64,
        b: u64,
        c: u64,
        bias: Option<u64>,
    ) -> Result<()> {
        if p.epilogue.has_bias() != bias.is_some() {
            candle_core::bail!("gemm: a bias epilogue without its bias, or a bias without it");
        }
        let ops = Operands {
            alpha,
            beta,
            a,
            b,
            c,
        };
        let mut guard = self.plans.lock().unwrap_or_else(PoisonError::into_inner);
        let Plans { live, timed } = &mut *guard;
        // Bounded: every distinct row count (a prefill's length, say) is a problem of its own.
        // cuBLASLt reads a descriptor when a call is queued, so dropping plans is safe.
        if live.len() >= MAX_PLANS && !live.contains_key(p) {
            live.clear();
        }
        let plan = match live.entry(*p) {
            std::collections::hash_map::Entry::Occupied(e) => {
                let plan = e.into_mut();
                if let Some(b) = bias {
                    set_desc(
                        plan.desc,
                        sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                        ptr(&b),
                        8,
                    )?;
                }
                plan
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                let size = self.workspace.len();
                let mut plan = Plan::new(self.handle, p, bias, size)?;
                if let Some(fastest) = timed.get(p) {
                    plan.fastest = *fastest;
                    plan.untimed.clear();
                }
                e.insert(plan)
            }
        };
        let first = *plan.first_call.get_or_insert_with(Instant::now);
        let tune = GemmTune::current();
        let due = tune == GemmTune::Timed
            && !plan.untimed.is_empty()
            && (TIME_FIRST_CALLS.with(Cell::get) || first.elapsed() >= TUNE_AFTER);
        if due {
            // Timing waits for the stream, which a CUDA graph capture forbids; a plan first
            // used in one keeps the heuristic's answer until a call outside it.
            let status = self
                .stream
                .capture_status()
                .map_err(candle_core::Error::wrap)?;
            if status == CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
                // The candidates write D over and over: into `c` itself when this call
                // overwrites it anyway, else into scratch of its size (an accumulating call
                // must find its `C` untouched). Too large a scratch leaves the candidates for
                // a call that overwrites its output; none to be had (memory is short), or
                // anything else failing while timing, leaves the heuristic's answer: timing
                // is an optimisation and never fails the GEMM.
                let scratch = match beta == 0.0 {
                    true => Ok(None),
                    false => self.scratch(p),
                };
                let target = match &scratch {
                    _ if beta == 0.0 => Some(c),
                    Ok(Some(s)) => Some(s.device_ptr(&self.stream).0),
                    Ok(None) => None,
                    Err(_) => {
                        plan.untimed.clear();
                        None
                    }
                };
                if let Some(target) = target {
                    let rest = std::mem::take(&mut plan.untimed);
                    let trial = Operands { c: target, ..ops };
                    plan.fastest = self.fastest(plan, rest, &trial);
                    if timed.len() >= TIMED_MAX {
                        timed.clear();
                    }
                    timed.insert(*p, plan.fastest);
                }
            }
        }
        let algo = match tune {
            GemmTune::Timed => plan.fastest.as_ref().unwrap_or(&plan.algo),
            GemmTune::Heuristic => &plan.algo,
        };
        self.run(plan, algo, &ops)
    }

    /// A zeroed buffer the size of `p`'s `D`, to time candidates in; `None` above
    /// [`TUNE_SCRATCH_MAX`] (the problem then keeps its untimed candidates for a call that
    /// overwrites its output).
    fn scratch(&self, p: &Problem) -> Result<Option<CudaSlice<u8>>> {
        let bytes = p.ldc.max(0) as usize * p.n as usize * p.dtype.size_in_bytes();
        if bytes > TUNE_SCRATCH_MAX {
            return Ok(None);
        }
        let s = self
            .stream
            .alloc_zeros::<u8>(bytes)
            .map_err(candle_core::Error::wrap)?;
        Ok(Some(s))
    }

    /// The fastest of `rest` on `ops` (whose `c` is scratch or, with beta = 0, the output that
    /// the call that follows writes again) where it beats the plan's algorithm by
    /// [`TUNE_MARGIN`]; `None` where none does, or where the plan's own cannot be timed. Each
    /// is run once untimed, then `TUNE_REPS` times between two events; a candidate the library
    /// turns down, or whose timing fails, is skipped.
    ///
    /// # Safety
    /// As [`Lt::matmul`].
    unsafe fn fastest(
        &self,
        plan: &Plan,
        rest: Vec<sys::cublasLtMatmulAlgo_t>,
        ops: &Operands,
    ) -> Option<sys::cublasLtMatmulAlgo_t> {
        let event = || {
            self.stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .ok()
        };
        let time = |algo: &sys::cublasLtMatmulAlgo_t| -> Option<f32> {
            self.run(plan, algo, ops).ok()?;
            let start = event()?;
            for _ in 0..TUNE_REPS {
                self.run(plan, algo, ops).ok()?;
            }
            start.elapsed_ms(&event()?).ok()
        };
        let base = time(&plan.algo)?;
        let mut best: Option<(sys::cublasLtMatmulAlgo_t, f32)> = None;
        for algo in rest {
            let Some(ms) = time(&algo) else { continue };
            if best.is_none_or(|(_, b)| ms < b) {
                best = Some((algo, ms));
            }
        }
        best.filter(|&(_, ms)| ms < base * (1.0 - TUNE_MARGIN))
            .map(|(algo, _)| algo)
    }

    /// One `cublasLtMatmul` of `plan` with `algo`.
    ///
    /// # Safety
    /// As [`Lt::matmul`].
    unsafe fn run(
        &self,
        plan: &Plan,
        algo: &sys::cublasLtMatmulAlgo_t,
        ops: &Operands,
    ) -> Result<()> {
        let Operands {
            alpha,
            beta,
            a,
            b,
            c,
        } = *ops;
        let (ws, _ws_guard) = self.workspace.device_ptr(&self.stream);
        lt::matmul(
            self.handle,
            plan.desc,
            ptr(&alpha),
            ptr(&beta),
            a as *const c_void,
            plan.layouts[0],
            b as *const c_void,
            plan.layouts[1],
            c as *const c_void,
            plan.layouts[2],
            c as *mut c_void,
            plan.layouts[2],
            algo,
            ws as *mut c_void,
            self.workspace.len(),
            self.stream.cu_stream() as *mut _,
        )
        .map_err(lt_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nt(m: u64, n: u64, k: u64) -> Problem {
        Problem {
            dtype: DType::BF16,
            transa: true,
            transb: false,
            m: n,
            n: m,
            k,
            lda: k as i64,
            ldb: k as i64,
            ldc: n as i64,
            epilogue: Epilogue::Plain,
        }
    }

    #[test]
    fn decode_and_training_gemms_are_timed_and_tiny_ones_not() {
        // GPT-2's decode GEMMs at 64 rows (q/k/v, MLP, LM head), a GPT-2 step's (16384 rows)
        // and the LoRA bench's are timed; a single row's, or a test's toy shapes, are not.
        for (m, n, k) in [(1, 768, 768), (8, 64, 64), (37, 200, 256)] {
            assert!(nt(m, n, k).flop() < TUNE_MIN_FLOP, "{m}x{n}x{k}");
        }
        for (m, n, k) in [
            (64, 768, 768),
            (64, 3072, 768),
            (64, 50304, 768),
            (16384, 768, 768),
            (16384, 50304, 768),
            (8192, 4096, 4096),
        ] {
            assert!(nt(m, n, k).flop() >= TUNE_MIN_FLOP, "{m}x{n}x{k}");
        }
        // The accumulating GEMMs of a GPT-2 step fit the scratch they are timed in.
        let bytes = |p: Problem| p.ldc as usize * p.n as usize * p.dtype.size_in_bytes();
        assert!(bytes(nt(16384, 768, 768)) <= TUNE_SCRATCH_MAX);
    }

    #[test]
    fn the_default_is_the_heuristic_and_a_scope_overrides_it_on_this_thread() {
        if std::env::var_os("TEMPER_GEMM_TUNE").is_none() {
            assert_eq!(GemmTune::current(), GemmTune::Heuristic);
        }
        let outside = GemmTune::current();
        GemmTune::Timed.scope(|| {
            assert_eq!(GemmTune::current(), GemmTune::Timed);
            GemmTune::Heuristic.scope(|| assert_eq!(GemmTune::current(), GemmTune::Heuristic));
            assert_eq!(GemmTune::current(), GemmTune::Timed);
            let other = std::thread::spawn(GemmTune::current).join().unwrap();
            assert_eq!(other, outside, "another thread keeps its own");
        });
        assert_eq!(GemmTune::current(), outside);
    }

    #[test]
    fn timing_first_calls_is_scoped_and_restored_after_a_panic() {
        let on = || TIME_FIRST_CALLS.with(Cell::get);
        assert!(!on());
        timing_first_calls(|| {
            assert!(on());
            timing_first_calls(|| assert!(on()));
            assert!(on(), "an inner scope leaves the outer one on");
        });
        assert!(!on());
        let caught = std::panic::catch_unwind(|| timing_first_calls(|| panic!("inside")));
        assert!(caught.is_err());
        assert!(!on(), "a panic inside leaves the flag as it was");
    }
}
