//! The decode step at fixed shapes, with its state on the device, so that CUDA can replay it
//! as one graph: a launch per step instead of a few hundred, and none of candle's host work.
//!
//! The step feeds the last sampled ids `[n]` at the rows' positions `[n, 1]`, attends over the
//! whole cache under a key mask `[n, capacity]`, samples draw `step[1]` (holding back the stop
//! ids while the draw is below `min_new_tokens`, on the device), writes the new ids
//! over the old, and advances its own state (positions, cache length `step[0]`, draw index,
//! and the mask at the position the next step writes). Every buffer that outlives the step is
//! allocated before it; every tensor the step makes is dropped inside it, so that a capture
//! owns all of them (a buffer allocated in a capture belongs to the graph, and freeing it
//! outside would free the graph's memory).
//!
//! On the CPU the same step runs op by op (tested token for token against the plain loop); on
//! CUDA the first step at a batch size runs eagerly under candle's host-upload cache, then is
//! captured, and later steps replay it. A capture that fails leaves the eager step in use,
//! with one warning.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use crate::kernels::decode_step::advance;
use crate::kernels::sample::{sample_draw, Draw, Hold, SampleParams};
use crate::model::linear::Ctx;
use crate::model::{Fwd, KvCache, Transformer};

pub(super) struct StaticStep {
    /// `[n]` u32: the ids the step feeds, overwritten with the ids it samples.
    ids: Tensor,
    /// `[n, 1]` u32.
    positions: Tensor,
    /// `[n, capacity]` f32: the keys each row may attend to.
    mask: Tensor,
    /// `[2]` i64: the cache length and the draw index.
    step: Tensor,
    /// `[n]` i64 row keys.
    keys: Tensor,
    /// `[n, V]` u8: the tokens each row holds, where a repetition penalty reads them.
    seen: Option<Tensor>,
    #[cfg(feature = "cuda")]
    graph: graph::Replay,
}

/// What the step is entered with: the ids just sampled (draw `draw - 1`), where each row feeds
/// them, the key mask of the cached positions (`[n, >= len]`), the row keys, and the tokens
/// each row holds (which the step then owns and marks).
pub(super) struct Entry<'a> {
    pub ids: &'a Tensor,
    pub positions: &'a Tensor,
    pub valid: &'a Tensor,
    pub keys: &'a Tensor,
    pub seen: Option<Tensor>,
    pub draw: u64,
}

impl StaticStep {
    /// Fixes `cache`'s shapes and builds the state for its length.
    pub fn enter(cache: &mut KvCache, e: Entry, dev: &Device) -> Result<Self> {
        let (len, cap) = (cache.len(), cache.capacity());
        let n = e.ids.dim(0)?;
        if len >= cap {
            anyhow::bail!("a fixed-shape decode step at a full cache ({len} of {cap})");
        }
        // The cached positions plus the one this step writes; nothing past it.
        let seen = e.valid.narrow(1, 0, len)?.to_dtype(DType::F32)?;
        let mask = Tensor::cat(
            &[
                seen,
                Tensor::ones((n, 1), DType::F32, dev)?,
                Tensor::zeros((n, cap - len - 1), DType::F32, dev)?,
            ],
            1,
        )?
        .contiguous()?;
        let step = Tensor::new(&[len as i64, e.draw as i64], dev)?;
        cache.fix_shapes(step.clone())?;
        Ok(Self {
            ids: e.ids.to_dtype(DType::U32)?.copy()?,
            positions: e.positions.copy()?,
            mask,
            step,
            keys: e.keys.copy()?,
            seen: e.seen,
            #[cfg(feature = "cuda")]
            graph: graph::Replay::default(),
        })
    }

    /// The ids the last step sampled, `[n]` u32.
    pub fn ids(&self) -> &Tensor {
        &self.ids
    }

    /// Keeps the rows `keep` (`[n']` u32) of the state; the cache is the caller's.
    pub fn select_rows(&mut self, keep: &Tensor) -> Result<()> {
        self.ids = self.ids.index_select(keep, 0)?;
        self.positions = self.positions.index_select(keep, 0)?;
        self.mask = self.mask.index_select(keep, 0)?;
        self.keys = self.keys.index_select(keep, 0)?;
        if let Some(s) = &mut self.seen {
            *s = s.index_select(keep, 0)?;
        }
        #[cfg(feature = "cuda")]
        {
            self.graph = graph::Replay::default();
        }
        Ok(())
    }

    /// One decode step: afterwards [`StaticStep::ids`] holds the sampled ids and `cache` one
    /// more position. Returns whether a CUDA graph replayed it.
    pub fn run(
        &mut self,
        net: &Transformer,
        ctx: Ctx,
        cache: &mut KvCache,
        hold: Option<Hold>,
        params: &SampleParams,
        use_graph: bool,
    ) -> Result<bool> {
        #[cfg(feature = "cuda")]
        if use_graph && self.ids.device().is_cuda() {
            let this = &*self;
            let body = |cache: &mut KvCache| this.body(net, ctx, cache, hold, params);
            let replayed = this.graph.run(self.ids.device(), cache, body)?;
            cache.advance();
            return Ok(replayed);
        }
        let _ = use_graph;
        self.body(net, ctx, cache, hold, params)?;
        cache.advance();
        Ok(false)
    }

    /// The step's ops. Nothing made here outlives it.
    fn body(
        &self,
        net: &Transformer,
        ctx: Ctx,
        cache: &mut KvCache,
        hold: Option<Hold>,
        params: &SampleParams,
    ) -> candle_core::Result<()> {
        // Declared first, dropped last: on an error too, the range goes before the capture ends.
        let _ranges = ForgetKeyRanges::new();
        let n = self.ids.dim(0)?;
        let f = Fwd {
            ctx,
            positions: Some(&self.positions),
            key_valid: Some(&self.mask),
            segments: None,
        };
        let hidden = net
            .hidden(&self.ids.reshape((n, 1))?, &f, Some(cache))
            .map_err(candle_core::Error::wrap)?;
        let logits = net
            .sampling_logits(&hidden, ctx.kernels.gemm)
            .map_err(candle_core::Error::wrap)?
            .squeeze(1)?;
        drop(hidden);
        let draw = self.step.narrow(0, 1, 1)?;
        let next = sample_draw(
            &logits,
            &self.keys,
            Draw::Device(&draw),
            hold,
            self.seen.as_ref(),
            params,
            ctx.kernels.sample,
        )?;
        drop(logits);
        advance(&self.ids, &next, &self.positions, &self.step, &self.mask)
    }
}

/// Attention keeps the key range of the last mask it saw, by tensor id; this step's mask
/// changes in place, and a range computed inside a capture is the graph's memory. Forgets it
/// when made and when dropped.
struct ForgetKeyRanges;

impl ForgetKeyRanges {
    fn new() -> Self {
        forget_key_ranges();
        Self
    }
}

impl Drop for ForgetKeyRanges {
    fn drop(&mut self) {
        forget_key_ranges();
    }
}

fn forget_key_ranges() {
    #[cfg(feature = "cuda")]
    crate::kernels::cuda::attention::forget_key_range();
}

/// Whether the step can be captured on `dev` (a CUDA device on which cudarc neither waits
/// on nor records events, and frees without synchronizing).
pub(super) fn capturable(dev: &Device) -> bool {
    #[cfg(feature = "cuda")]
    return graph::capturable(dev);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = dev;
        false
    }
}

#[cfg(feature = "cuda")]
pub use graph::{last_capture, GraphCensus};

#[cfg(feature = "cuda")]
mod graph {
    //! Capture and replay of the step on candle's stream.

    use std::cell::RefCell;
    use std::sync::{Arc, Mutex, PoisonError};

    use candle_core::cuda_backend::cudarc::driver::sys::{
        self, CUgraphInstantiate_flags, CUstreamCaptureMode, CUstreamCaptureStatus,
    };
    use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaStream, DriverError};
    use candle_core::Device;

    use crate::kernels::cuda::capture_arena;
    use crate::kernels::cuda::pdl::Pdl;
    use crate::model::KvCache;

    /// Nothing captured yet, a graph to replay, or a capture that failed (steps run eagerly).
    #[derive(Default)]
    pub(super) struct Replay(RefCell<State>);

    #[derive(Default)]
    enum State {
        #[default]
        Fresh,
        Ready(CudaGraph, Arc<CudaStream>),
        Failed,
    }

    impl Replay {
        /// Runs one step: replays the graph (returning true), or runs `body` eagerly and then
        /// captures it.
        pub fn run(
            &self,
            dev: &Device,
            cache: &mut KvCache,
            body: impl Fn(&mut KvCache) -> candle_core::Result<()>,
        ) -> anyhow::Result<bool> {
            let cuda = dev.as_cuda_device()?;
            let mut state = self.0.borrow_mut();
            match &*state {
                State::Ready(g, _) => {
                    g.launch()?;
                    return Ok(true);
                }
                State::Failed => {
                    body(cache)?;
                    return Ok(false);
                }
                State::Fresh => {}
            }
            // The eager step uploads what candle's ops read from the host (strides, shapes)
            // into its cache, where the capture finds them. Under `TEMPER_GEMM_TUNE=timed` its
            // GEMMs are timed now: the graph replays them and calls none of them again.
            let _uploads = cuda.enable_cuda_graph_htod_cache();
            // Under programmatic launches the eager step notes its outputs' sizes, and the
            // capture allocates them all before its first kernel (capture_arena): kernels
            // with no memory node between them can overlap in the graph.
            let arena = Pdl::current()? == Pdl::On;
            let mut eager = || crate::kernels::cuda::timing_first_calls(|| body(cache));
            let plan = match arena {
                true => {
                    let (ran, plan) = capture_arena::record(eager);
                    ran?;
                    Some(plan)
                }
                false => {
                    eager()?;
                    None
                }
            };
            // From here the step has run: whatever fails leaves the eager step in use.
            let stream = cuda.cuda_stream();
            let captured = capture(&stream, || match &plan {
                Some(plan) => capture_arena::serve(&stream, plan, || body(cache))?,
                None => body(cache),
            });
            *state = match captured {
                Ok(g) => State::Ready(g, stream),
                Err(why) => {
                    // Driver errors that an aborted capture's frees recorded would surface
                    // at the next unrelated call.
                    let _ = stream.context().check_err();
                    // The eager step is a fallback only on a stream that left capture mode:
                    // on one still capturing every later call on this thread would fail.
                    let status = stream.capture_status();
                    if !matches!(
                        status,
                        Ok(CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
                    ) {
                        anyhow::bail!(
                            "the decode step's CUDA graph capture failed ({why}) and left the \
                             stream capturing ({status:?})"
                        );
                    }
                    errln!("warning: the decode step runs without a CUDA graph: {why}");
                    State::Failed
                }
            };
            Ok(false)
        }
    }

    /// Whether `dev` can capture the step at all. cudarc makes a capture's launches wait on,
    /// and its frees record, events when it manages several streams; without stream-ordered
    /// allocation a free synchronizes. Both are illegal in a capture.
    pub(super) fn capturable(dev: &Device) -> bool {
        let Ok(cuda) = dev.as_cuda_device() else {
            return false;
        };
        let ctx = cuda.cuda_stream().context().clone();
        !ctx.is_managing_stream_synchronization() && ctx.has_async_alloc()
    }

    /// Records `body` on `stream` (in cudarc's relaxed mode: other threads may go on using
    /// CUDA) and instantiates the graph.
    fn capture(
        stream: &Arc<CudaStream>,
        body: impl FnOnce() -> candle_core::Result<()>,
    ) -> Result<CudaGraph, String> {
        // A failed capture leaves no census: the bench must not show an earlier graph's.
        *LAST.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let ctx = stream.context();
        // cudarc returns an error some earlier drop recorded before doing what was asked, so
        // a stale one would fail the capture's start, or worse its end (below).
        let _ = ctx.check_err();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| format!("{e:?}"))?;
        let recorded = body();
        // A failed body drops the buffers it made, and the frees record the invalidated
        // capture's error; cleared here, or `end_capture` would return it without ending
        // the capture.
        let cleared = ctx.check_err();
        let ended = stream.end_capture(CUgraphInstantiate_flags(0));
        let recorded = match (recorded, cleared) {
            (Ok(()), Err(e)) => Err(candle_core::Error::Msg(format!(
                "during the capture: {e:?}"
            ))),
            (r, _) => r,
        };
        let graph = match (recorded, ended) {
            (Err(e), _) => return Err(format!("{e}")),
            (_, Err(e)) => return Err(format!("{e:?}")),
            (Ok(()), Ok(None)) => return Err("an empty capture".into()),
            (Ok(()), Ok(Some(g))) => g,
        };
        graph.upload().map_err(|e| format!("{e:?}"))?;
        *LAST.lock().unwrap_or_else(PoisonError::into_inner) = census(&graph).ok();
        Ok(graph)
    }

    /// What a captured decode step holds: its nodes by type, and its edges. Programmatic
    /// launches (`TEMPER_PDL=on`) overlap a kernel with the one ahead only through a
    /// programmatic edge, which capture makes only between two kernel nodes: a buffer
    /// allocated or freed between two launches puts a memory node between them.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
    pub struct GraphCensus {
        pub kernels: usize,
        pub mem_allocs: usize,
        pub mem_frees: usize,
        pub memsets: usize,
        pub memcpys: usize,
        pub other_nodes: usize,
        pub edges: usize,
        /// Edges from one kernel node to another.
        pub kernel_to_kernel: usize,
        /// Edges of type programmatic: where a kernel may start before the one ahead ends.
        pub programmatic: usize,
    }

    static LAST: Mutex<Option<GraphCensus>> = Mutex::new(None);

    /// The census of this process's last decode-step capture (`None` before any, or where
    /// the driver would not say), for the generate bench to show whether programmatic
    /// launches could overlap in the graph it timed.
    pub fn last_capture() -> Option<GraphCensus> {
        *LAST.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn census(graph: &CudaGraph) -> Result<GraphCensus, DriverError> {
        use sys::CUgraphNodeType as T;
        let g = graph.cu_graph();
        let mut n = 0usize;
        // SAFETY: queries of a graph the CudaGraph owns and keeps alive; each array holds the
        // count the first call of the pair returned.
        unsafe { sys::cuGraphGetNodes(g, std::ptr::null_mut(), &mut n) }.result()?;
        let mut nodes = vec![std::ptr::null_mut(); n];
        unsafe { sys::cuGraphGetNodes(g, nodes.as_mut_ptr(), &mut n) }.result()?;
        nodes.truncate(n);
        let mut c = GraphCensus::default();
        let mut kernel = std::collections::HashSet::new();
        for &node in &nodes {
            let mut t = T::CU_GRAPH_NODE_TYPE_EMPTY;
            // SAFETY: as above.
            unsafe { sys::cuGraphNodeGetType(node, &mut t) }.result()?;
            match t {
                T::CU_GRAPH_NODE_TYPE_KERNEL => {
                    c.kernels += 1;
                    kernel.insert(node as usize);
                }
                T::CU_GRAPH_NODE_TYPE_MEM_ALLOC => c.mem_allocs += 1,
                T::CU_GRAPH_NODE_TYPE_MEM_FREE => c.mem_frees += 1,
                T::CU_GRAPH_NODE_TYPE_MEMSET => c.memsets += 1,
                T::CU_GRAPH_NODE_TYPE_MEMCPY => c.memcpys += 1,
                _ => c.other_nodes += 1,
            }
        }
        let mut e = 0usize;
        let no = std::ptr::null_mut::<sys::CUgraphNode>;
        // SAFETY: as above; the edge data is asked for with the edges, or the driver refuses
        // a graph with programmatic edges as a lossy query.
        unsafe { sys::cuGraphGetEdges_v2(g, no(), no(), std::ptr::null_mut(), &mut e) }.result()?;
        let mut from = vec![std::ptr::null_mut(); e];
        let mut to = vec![std::ptr::null_mut(); e];
        let blank = sys::CUgraphEdgeData {
            from_port: 0,
            to_port: 0,
            type_: 0,
            reserved: [0; 5],
        };
        let mut data = vec![blank; e];
        unsafe {
            sys::cuGraphGetEdges_v2(
                g,
                from.as_mut_ptr(),
                to.as_mut_ptr(),
                data.as_mut_ptr(),
                &mut e,
            )
        }
        .result()?;
        c.edges = e;
        let programmatic = sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8;
        for i in 0..e {
            if kernel.contains(&(from[i] as usize)) && kernel.contains(&(to[i] as usize)) {
                c.kernel_to_kernel += 1;
            }
            if data[i].type_ == programmatic {
                c.programmatic += 1;
            }
        }
        Ok(c)
    }

    impl Drop for Replay {
        /// Destroys the graph and hands the memory its nodes held back to the driver, so that
        /// training after a rollout can use it.
        fn drop(&mut self) {
            if let State::Ready(g, stream) = std::mem::take(self.0.get_mut()) {
                drop(g);
                let ctx = stream.context();
                if ctx.bind_to_thread().is_ok() {
                    // SAFETY: a plain driver call on this context's device; a failure only
                    // leaves the memory reserved.
                    let _ = unsafe { sys::cuDeviceGraphMemTrim(ctx.cu_device()) };
                }
            }
        }
    }
}
