//! cuBLASLt matmuls planned once per problem, for `gemm.rs`.
//!
//! cudarc's `Matmul::matmul` builds a descriptor and three matrix layouts and asks cuBLASLt's
//! heuristic for an algorithm on every call, then destroys them. The heuristic query is the
//! costly part, tens of microseconds of host time per GEMM: hidden behind the GPU in a long
//! training step, but not in an eager decode step of small GEMMs, nor in a bench that waits
//! for each call. Here the descriptor, the layouts and the heuristic's algorithm are kept per
//! problem (dtype, transposes, sizes, leading dimensions, epilogue) and stream, so a call after
//! the first costs one `cublasLtMatmul`, plus one attribute write with a bias. The choice is
//! the same one cudarc's call makes (the heuristic's first answer, the same workspace size:
//! 32 MiB from Hopper on, 4 MiB before), only not made again.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use candle_core::cuda_backend::cudarc::cublaslt::result::{self as lt, CublasError};
use candle_core::cuda_backend::cudarc::cublaslt::sys;
use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUstreamCaptureStatus};
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
    /// A bias vector of `m` added to every column by the epilogue.
    pub bias: bool,
}

/// A problem's descriptor, layouts (A, B, C = D) and algorithm.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
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
        };
        for (slot, (rows, cols, ld)) in
            plan.layouts
                .iter_mut()
                .zip([(ar, ac, p.lda), (br, bc, p.ldb), (p.m, p.n, p.ldc)])
        {
            *slot = lt::create_matrix_layout(ty, rows, cols, ld).map_err(lt_error)?;
        }
        let (ta, tb) = (i32::from(p.transa), i32::from(p.transb));
        let epilogue = match p.bias {
            true => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            false => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
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
        // SAFETY: `pref` and the plan's handles are live; the workspace size is a usize.
        let found = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                ptr(&workspace),
                std::mem::size_of::<usize>(),
            )
            .and_then(|()| {
                lt::get_matmul_algo_heuristic(
                    handle,
                    desc,
                    plan.layouts[0],
                    plan.layouts[1],
                    plan.layouts[2],
                    plan.layouts[2],
                    pref,
                )
            })
        };
        // SAFETY: created above, used by nothing after this.
        unsafe {
            let _ = lt::destroy_matmul_pref(pref);
        }
        plan.algo = found.map_err(lt_error)?.algo;
        Ok(plan)
    }
}

fn ptr<T>(v: &T) -> *const c_void {
    v as *const T as *const c_void
}

/// Plans kept per stream at most; past that the cache starts over.
const MAX_PLANS: usize = 512;

/// One cuBLASLt handle, workspace and plan cache per CUDA stream.
pub(crate) struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    plans: Mutex<HashMap<Problem, Plan>>,
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
            plans: Mutex::new(HashMap::new()),
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

    /// `D = alpha op(A) op(B) + beta C` (plus the bias where `p.bias`), `C` and `D` the same
    /// buffer, on this stream, with `p`'s plan (made on first use).
    ///
    /// # Safety
    /// `a`, `b`, `c` (and `bias`) are device pointers on this stream's device holding the
    /// matrices `p` describes (the bias `p.m` elements), 256-byte aligned as cuBLASLt's
    /// heuristic assumes, and live until the GEMM has run; `bias` is `Some` exactly when
    /// `p.bias`.
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
        if p.bias != bias.is_some() {
            candle_core::bail!("gemm: a bias epilogue without its bias, or a bias without it");
        }
        let mut plans = self.plans.lock().unwrap_or_else(PoisonError::into_inner);
        // Bounded: every distinct row count (a prefill's length, say) is a problem of its own.
        // cuBLASLt reads a descriptor when a call is queued, so dropping plans is safe.
        if plans.len() >= MAX_PLANS && !plans.contains_key(p) {
            plans.clear();
        }
        let plan = match plans.entry(*p) {
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
                e.insert(Plan::new(self.handle, p, bias, size)?)
            }
        };
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
            &plan.algo,
            ws as *mut c_void,
            self.workspace.len(),
            self.stream.cu_stream() as *mut _,
        )
        .map_err(lt_error)
    }
}
