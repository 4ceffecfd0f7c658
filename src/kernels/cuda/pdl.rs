//! Programmatic dependent launch (Hopper and later): a kernel may start while the one ahead of
//! it on the stream finishes, and wait for it inside (`pdl_enter` in `kernels/common.cuh`).
//!
//! A decode step at GPT-2's shape is about a hundred kernels of a few microseconds each, one
//! after the other: the gap between two (the launch, the first loads of the next) is a large
//! part of each. Launched this way, the next kernel's blocks are placed and its weights
//! fetched (the decode GEMM's `prefetch_w`) while the one ahead still runs. Off by default
//! until it is measured against the plain launch: `TEMPER_PDL=on` turns it on for the kernel
//! files in [`PDL_STEMS`], where their PTX was built for sm_90 or later; other kernels
//! (cuBLAS's, candle's, ours in other files) launch as before, and a kernel launched plainly
//! after one of these waits for it in full as always.
//!
//! In the decode step's CUDA graph a launch overlaps the kernel ahead only across a
//! programmatic edge, which capture makes only where the node ahead is a kernel, and candle's
//! allocations and frees (stream-ordered, so memory nodes in a capture) fall between most of
//! the step's kernels. The generate bench prints each graph's census
//! (`generate::last_capture`): how many edges are programmatic. Rewiring the captured graph
//! cannot mend it: the driver refuses to remove an edge from a graph that holds memory nodes,
//! and it fixes each allocation's address when the node is made, from the order captured.
//! Instead the capture allocates our kernels' outputs before its first kernel
//! ([`super::capture_arena`], under `TEMPER_PDL=on` only), so that only the frees where the
//! model's code drops a tensor, and candle's own ops, still stand between two kernels.

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaFunction, CudaStream};
use candle_core::cuda_backend::WrapErr;
use candle_core::Result;

use super::LaunchConfig;

/// The kernel files every entry point of which calls `pdl_enter` before it reads what another
/// kernel writes or writes anything (the tests below check the files): generation's decode
/// step, and the norms, embedding and key range that run in it.
pub const PDL_STEMS: &[&str] = &[
    "attention_decode",
    "attention_prep",
    "decode_gemm",
    "decode_step",
    "embedding",
    "layernorm",
    "rmsnorm",
    "sample",
];

/// How our kernels of [`PDL_STEMS`] are launched: `TEMPER_PDL=on` for programmatic dependent
/// launches, `off` (or nothing) for plain ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pdl {
    Off,
    On,
}

thread_local! {
    /// Set by [`Pdl::scope`].
    static SCOPE: Cell<Option<Pdl>> = const { Cell::new(None) };
}

impl Pdl {
    /// This thread's choice: a [`Pdl::scope`]'s, else [`Pdl::from_env`].
    pub fn current() -> Result<Self> {
        SCOPE.with(Cell::get).map_or_else(Self::from_env, Ok)
    }

    /// Runs `f` with `self` as this thread's choice (a test comparing the two in one process).
    pub fn scope<R>(self, f: impl FnOnce() -> R) -> R {
        super::lt_plans::scoped(&SCOPE, Some(self), f)
    }

    /// Read once per process; a value other than `on` or `off` is an error naming the variable.
    pub fn from_env() -> Result<Self> {
        static MODE: OnceLock<std::result::Result<Pdl, String>> = OnceLock::new();
        MODE.get_or_init(|| Self::parse(std::env::var("TEMPER_PDL").ok().as_deref()))
            .clone()
            .map_err(candle_core::Error::Msg)
    }

    fn parse(value: Option<&str>) -> std::result::Result<Self, String> {
        match value.map(str::trim) {
            None | Some("" | "off" | "0") => Ok(Self::Off),
            Some("on" | "1") => Ok(Self::On),
            Some(v) => Err(format!("TEMPER_PDL={v:?}: expected `on` or `off`")),
        }
    }
}

/// Whether a kernel of file `stem`, loaded from the PTX of `arch`, launches programmatically:
/// `pdl_enter` waits only where that PTX was built for sm_90 or later (a build for sm_80 alone
/// run on a Hopper card loads PTX without the wait).
pub fn applies(stem: &str, arch: u32) -> Result<bool> {
    Ok(PDL_STEMS.contains(&stem) && arch >= 90 && Pdl::current()? == Pdl::On)
}

/// Programmatic launches made by this process, for benches and tests to tell that they
/// happened.
pub fn launches() -> u64 {
    LAUNCHES.load(Ordering::Relaxed)
}

static LAUNCHES: AtomicU64 = AtomicU64::new(0);

/// `func` on `stream` with `params` as its one argument, allowed to start before the kernel
/// ahead of it has finished.
///
/// # Safety
/// As [`super::launch`]'s, and `func` must call `pdl_enter` before it reads what the kernel
/// ahead of it writes or writes anything.
pub unsafe fn launch<P>(
    stream: &CudaStream,
    func: &CudaFunction,
    cfg: LaunchConfig,
    params: &P,
) -> Result<()> {
    stream.context().bind_to_thread().w()?;
    // SAFETY: a zeroed attribute is a valid C struct; its id and value are set below.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    // The kernel's one argument, by address, as cuLaunchKernel takes arguments.
    let mut args = [params as *const P as *mut c_void];
    // SAFETY: the caller's contract; `config`, `attr` and `args` outlive the call.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            func.cu_function(),
            args.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
    .w()?;
    LAUNCHES.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sources of [`PDL_STEMS`], compiled in so that the test runs wherever the binary does.
    const SOURCES: &[(&str, &str)] = &[
        (
            "attention_decode",
            include_str!("../../../kernels/attention_decode.cu"),
        ),
        (
            "attention_prep",
            include_str!("../../../kernels/attention_prep.cu"),
        ),
        (
            "decode_gemm",
            include_str!("../../../kernels/decode_gemm.cu"),
        ),
        (
            "decode_step",
            include_str!("../../../kernels/decode_step.cu"),
        ),
        ("embedding", include_str!("../../../kernels/embedding.cu")),
        ("layernorm", include_str!("../../../kernels/layernorm.cu")),
        ("rmsnorm", include_str!("../../../kernels/rmsnorm.cu")),
        ("sample", include_str!("../../../kernels/sample.cu")),
    ];

    /// For each `__global__` function of `src`, what its body holds before `pdl_enter();`
    /// (whitespace and macro line ends dropped), or None where it never calls it.
    fn before_enter(src: &str) -> Vec<Option<String>> {
        let mut out = Vec::new();
        let mut rest = src;
        while let Some(at) = rest.find("__global__") {
            rest = &rest[at + "__global__".len()..];
            let body = &rest[rest.find('{').map_or(rest.len(), |b| b + 1)..];
            let end = body.find('}').unwrap_or(body.len());
            let seen = body[..end].find("pdl_enter();").map(|e| {
                let before: String = body[..e]
                    .chars()
                    .filter(|c| !c.is_whitespace() && *c != '\\')
                    .collect();
                before
                    .strip_suffix("temper::")
                    .unwrap_or(&before)
                    .to_string()
            });
            out.push(seen);
        }
        out
    }

    /// Only weight prefetches may come first: `<path>::prefetch_<name><T>(p);` calls.
    fn only_prefetches(before: &str) -> bool {
        before
            .split_terminator(';')
            .all(|call| call.contains("::prefetch_") && call.ends_with("(p)"))
    }

    #[test]
    fn every_entry_of_a_pdl_file_waits_before_anything_else() {
        let stems: Vec<&str> = SOURCES.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            stems, PDL_STEMS,
            "the sources checked are the files launched with PDL"
        );
        for (stem, src) in SOURCES {
            let entries = before_enter(src);
            assert!(
                !entries.is_empty(),
                "kernels/{stem}.cu: no entry points found"
            );
            for (i, before) in entries.iter().enumerate() {
                let before = before.as_deref().unwrap_or_else(|| {
                    panic!("kernels/{stem}.cu: entry point {i} never calls pdl_enter()")
                });
                assert!(
                    only_prefetches(before),
                    "kernels/{stem}.cu: entry point {i} does {before:?} before pdl_enter()"
                );
            }
        }
    }

    #[test]
    fn the_entry_check_catches_a_missing_or_late_wait() {
        let late = "extern \"C\" __global__ void k(P p) {\n  x[0] = 1;\n  temper::pdl_enter();\n}";
        assert_eq!(before_enter(late), vec![Some("x[0]=1;".to_string())]);
        assert!(!only_prefetches("x[0]=1;"));
        let missing = "extern \"C\" __global__ void k(P p) { run(p); }";
        assert_eq!(before_enter(missing), vec![None]);
        assert!(only_prefetches("temper::decode_gemm::prefetch_w<T>(p);"));
        assert!(only_prefetches(""));
    }

    #[test]
    fn the_switch_reads_on_and_off_and_refuses_the_rest() {
        assert_eq!(Pdl::parse(None), Ok(Pdl::Off));
        assert_eq!(Pdl::parse(Some("off")), Ok(Pdl::Off));
        assert_eq!(Pdl::parse(Some("0")), Ok(Pdl::Off));
        assert_eq!(Pdl::parse(Some("on")), Ok(Pdl::On));
        assert_eq!(Pdl::parse(Some(" 1 ")), Ok(Pdl::On));
        let err = Pdl::parse(Some("yes")).unwrap_err();
        assert!(err.contains("TEMPER_PDL") && err.contains("yes"), "{err}");
    }
}
