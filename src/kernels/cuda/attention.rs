//! Flash attention (`kernels/attention_{prep,fwd,decode,bwd}.cu`) as a differentiable candle op.
//!
//! The forward is a [`CustomOp3`] on `(q, k, v)`; the mask, the scale and the kernel choice
//! live in the op, which also keeps what the backward needs: the per-row log-sum-exp and the
//! per-sequence key range (first valid key, end of the valid keys, whether there are holes),
//! computed from `key_valid` by `attn_key_range` once per mask tensor (every layer of a pass
//! shares it, or one of two; `LAST_RANGE`). The backward recomputes the
//! scores tile by tile from the saved log-sum-exp (FlashAttention-2), with `D = rowsum(dO*O)`
//! precomputed; under GQA the dK/dV kernels loop over every query head of their kv head, so
//! the group's gradients are summed without atomics.
//!
//! Three forwards (see the comments on top of the .cu files): `Simple` (CUDA cores, any
//! dtype, head dim up to 128, with a split-K decode mode for a few queries against a long
//! cache), `Mma` (tensor cores, bf16/f16, head dim 64, 128 or 256; `MmaWide` is the same with
//! 128-row forward blocks, two mma tiles per warp, below 256), and the decode stream
//! (`attn_decode`, bf16/f16, head dim 64, 128 or 256, at most 4 query rows per kv head: a
//! generation step, 16-byte loads of the cache). `Auto` takes the decode stream where it
//! applies, else `Mma` where it applies and the query block is more than [`DECODE_MAX_TQ`]
//! rows or the head dim is past [`MAX_HEAD_DIM`], else `Simple`; every forward saves the same
//! log-sum-exp, so the backward is the same. Head dim 256 (Gemma's) has tensor-core kernels
//! only, 16-bit and not under `Simple`: the backward takes 149.5 KiB of shared memory a block
//! (sm_80, sm_90), or in its narrow variant 69.75 KiB (sm_86, sm_89); f32 is the reference's.
//! `TEMPER_ATTN_IMPL=simple` (or `mma`, `mma-wide`, `mma-narrow`, `auto`) overrides the choice
//! for the dispatcher.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};

use super::super::attention::AttnMask;
use super::super::decode_step::{Gain, HeadNorm};
use super::super::spans::{self, Pass};
use super::super::KernelOp;
use super::{
    alloc_out, compute_capability, contiguous16, contiguous_view, cuda_storage, grid_stride,
    launch, load_func, opt_view, sm_count, starts16, tensor_from_slice, to_i32, DevPtr, DevPtrs,
    Guarded, KernelParams, LaunchConfig,
};

/// Query blocks up to this many rows take the decode path (the decode stream where it
/// applies, else the simple kernel; split over keys) under [`AttnImpl::Auto`]: a 64-row
/// tensor-core tile would be mostly empty.
pub const DECODE_MAX_TQ: usize = 16;
/// Largest head dim of the simple kernels (instantiated for 32, 64, 96 and 128 lanes' worth).
pub const MAX_HEAD_DIM: usize = 128;
/// The head dim past [`MAX_HEAD_DIM`] that the tensor-core and decode kernels take (Gemma's).
pub const WIDE_HEAD_DIM: usize = 256;
/// CUDA's limit on `gridDim.y`. The kernels put query-row or key blocks on y, so a long enough
/// sequence would not fit; the launches are checked against this before anything runs.
const MAX_GRID_Y: usize = 65_535;

/// Which kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnImpl {
    Auto,
    Simple,
    Mma,
    /// `Mma` with FlashAttention-2's wider tiles: the forward's 128-row blocks
    /// (`attn_fwd_mma2`: two mma tiles per warp, so each K and V fragment read from shared
    /// memory feeds two mmas) and the backward's 128-key blocks of 8 warps (`attn_bwd_mma2`:
    /// each query tile loaded, and its dQ share added, once per 128 keys instead of 64). Not
    /// yet what `Auto` takes: it waits for its first GPU run against `Mma` and PyTorch's flash.
    /// At head dim 256 it is `Mma`.
    MmaWide,
    /// `Mma` with head dim 256's narrow backward (`attn_bwd_mma_narrow_*_h256`, 32 keys a
    /// block), which sm_86 and sm_89 take on their own: so that a card with room for the
    /// 64-key one (an H100, an H200) can test and time it too. Elsewhere it is `Mma`.
    MmaNarrow,
}

impl AttnImpl {
    /// `TEMPER_ATTN_IMPL` (`auto` when unset or unknown).
    pub fn from_env() -> Self {
        match std::env::var("TEMPER_ATTN_IMPL").as_deref() {
            Ok("simple") => Self::Simple,
            Ok("mma") => Self::Mma,
            Ok("mma-wide") => Self::MmaWide,
            Ok("mma-narrow") => Self::MmaNarrow,
            _ => Self::Auto,
        }
    }

    /// Query rows per block of the tensor-core forward at head dim `d`
    /// (`MmaFwdTraits::kBlockQ`; 64 at 256).
    fn fwd_block_q(self, d: usize) -> usize {
        match self {
            Self::MmaWide if d <= MAX_HEAD_DIM => 128,
            _ => 64,
        }
    }

    /// Keys per block of the tensor-core backward at head dim `d` (`MmaBwdTraits::kBlockK`, 16
    /// per warp; at 256, 64 keys over 8 warps, or the narrow variant's 32 over 4).
    fn bwd_block_k(self, d: usize) -> usize {
        match self {
            Self::MmaWide if d <= MAX_HEAD_DIM => 128,
            Self::MmaNarrow if d == WIDE_HEAD_DIM => NARROW_BLOCK_K,
            _ => 64,
        }
    }
}

/// Our kernel for a CUDA tensor, or `None` where it does not apply (dtype, a head dim the
/// kernels do not take, empty tensors, a GPU older than sm_80): the caller then falls back to
/// the reference.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
) -> Result<Option<Tensor>> {
    attention_with(q, k, v, mask, scale, AttnImpl::from_env())
}

/// [`attention`] with an explicit implementation (tests and benches compare them). `Mma`
/// where it does not apply runs `Simple`.
pub fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
    imp: AttnImpl,
) -> Result<Option<Tensor>> {
    let arg = crate::tape::arg;
    Ok(
        match prepare(&arg(q), &arg(k), &arg(v), mask, scale, imp)? {
            Some((op, qa, ka, va)) => Some(crate::tape::op3([q, k, v], [qa, ka, va], op)?),
            None => None,
        },
    )
}

/// The forward and backward kernels of [`attention_with`] called directly, outside candle's
/// autograd, so a bench can drive the backward with a given dO: going through `backward()`
/// needs a scalar, and the `(y * dy).sum_all()` that makes one adds an elementwise pass,
/// candle's one-block reduction and its broadcast back to the timing.
pub struct AttentionDirect {
    op: FlashAttn,
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

impl AttentionDirect {
    /// `None` where [`attention_with`] would fall back to the reference.
    pub fn new(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &AttnMask,
        scale: f64,
        imp: AttnImpl,
    ) -> Result<Option<Self>> {
        Ok(prepare(q, k, v, mask, scale, imp)?.map(|(op, q, k, v)| Self { op, q, k, v }))
    }

    /// Runs the forward kernels (the same launches as [`attention_with`]) and keeps the
    /// log-sum-exp for [`Self::backward`].
    pub fn forward(&self) -> Result<Tensor> {
        self.q.apply_op3_no_bwd(&self.k, &self.v, &self.op)
    }

    /// `(dq, dk, dv)` for output `o` (from the latest [`Self::forward`]) and its gradient:
    /// exactly what candle's autograd calls for this op.
    pub fn backward(&self, o: &Tensor, dout: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (dq, dk, dv) = self.op.bwd(&self.q, &self.k, &self.v, o, dout)?;
        let some = |t: Option<Tensor>| {
            t.ok_or_else(|| candle_core::Error::Msg("attention backward: missing grad".into()))
        };
        Ok((some(dq)?, some(dk)?, some(dv)?))
    }
}

/// Checks shared by [`attention_with`] and [`AttentionDirect`]: the op and its inputs (q
/// aligned; k and v aligned, or a KV cache view for the simple forward), or `None` where the
/// kernels do not apply.
fn prepare(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
    imp: AttnImpl,
) -> Result<Option<(FlashAttn, Tensor, Tensor, Tensor)>> {
    let dtype = q.dtype();
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        || k.dtype() != dtype
        || v.dtype() != dtype
    {
        return Ok(None);
    }
    let (b, hq, tq, d) = q.dims4()?;
    let (bk, hkv, tk, dk) = k.dims4()?;
    if v.dims() != k.dims() || bk != b || dk != d || hkv == 0 || hq % hkv != 0 {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit [B, H, T, D] with Hq % Hkv == 0",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if b * hq * tq == 0 || tk == 0 {
        return Ok(None);
    }
    let Ok(dev) = q.device().as_cuda_device() else {
        return Ok(None);
    };
    if compute_capability(dev)? < (8, 0) || !takes_head_dim(dev, dtype, d, imp)? {
        return Ok(None);
    }
    let offset = mask.causal_offset;
    if let Some(off) = offset {
        to_i32(off + tq, "causal offset + query length")?;
    }
    // The last query sits at offset + tq - 1: a window at least that long hides nothing.
    mask.check_window()?;
    mask.check_softcap()?;
    let window = mask.window.filter(|&w| w < offset.unwrap_or(0) + tq);
    to_i32(b * hq * tq.max(tk), "rows")?;
    let key_valid = match mask.key_valid {
        Some(kv) => {
            if kv.dims() != [b, tk] {
                candle_core::bail!(
                    "attention: key_valid {:?} is not [batch {b}, keys {tk}]",
                    kv.dims()
                );
            }
            Some(
                kv.to_device(q.device())?
                    .to_dtype(DType::F32)?
                    .contiguous()?,
            )
        }
        None => None,
    };
    mask.check_segments(b, tq, tk)?;
    let on_device = |t: &Tensor| t.to_device(q.device())?.contiguous();
    let segments = match mask.segments {
        Some(s) => Some((on_device(&s.start)?, on_device(&s.end)?)),
        None => None,
    };
    let op = FlashAttn {
        scale,
        causal: offset,
        key_valid,
        segments,
        window,
        softcap: mask.softcap,
        imp,
        bwd_bk: bwd_block_k_on(dev, imp, d)?,
        saved: Mutex::new(None),
    };
    let dims = Dims {
        b,
        hq,
        hkv,
        tq,
        tk,
        d,
    };
    // Before any allocation or launch; the backward checks its own grids when it runs.
    op.check_grid_y(dtype, &dims, false)?;
    let q = contiguous16(q)?;
    // The simple forward and the decode stream read a KV cache in place (a view of its first
    // positions); anything else is made contiguous.
    let in_place = op.fwd_path(dtype, &dims, [k.layout(), v.layout()]) != FwdPath::Mma
        && cache_capacity(k.layout()).is_some()
        && cache_capacity(k.layout()) == cache_capacity(v.layout());
    let (k, v) = match in_place {
        true => (k.clone(), v.clone()),
        false => (contiguous16(k)?, contiguous16(v)?),
    };
    Ok(Some((op, q, k, v)))
}

/// Whether our kernels take head dim `d` in `dtype` on `dev` under `imp`: up to
/// [`MAX_HEAD_DIM`] the simple kernels do; past it only the tensor cores' (and the decode
/// stream's) take the forward and the tensor cores' the backward: [`WIDE_HEAD_DIM`] in 16 bits,
/// not under `Simple`, on a card whose blocks may take the shared memory of the forward and of
/// a backward (sm_80 and sm_90 the 64-key one; sm_86 and sm_89, 99 KiB a block, the narrow
/// 32-key one).
pub fn takes_head_dim(dev: &CudaDevice, dtype: DType, d: usize, imp: AttnImpl) -> Result<bool> {
    Ok(fits_head_dim(smem_optin(dev)?, dtype, d, imp))
}

/// [`takes_head_dim`] for a card whose blocks may opt in to `optin` bytes of shared memory:
/// at [`WIDE_HEAD_DIM`] the forward (96.25 KiB) and a backward ([`bwd_block_k_within`]; the
/// narrow one, 69.75 KiB, where the 64-key one, 149.5 KiB, does not fit) must fit.
fn fits_head_dim(optin: usize, dtype: DType, d: usize, imp: AttnImpl) -> bool {
    if d <= MAX_HEAD_DIM {
        return d > 0;
    }
    mma_applies(dtype, d)
        && imp != AttnImpl::Simple
        && fwd_mma_smem(d, imp.fwd_block_q(d)) <= optin
        && bwd_block_k_within(optin, imp, d).is_some()
}

/// The capacity `cap` when `l` is the first `Tk` positions of a contiguous `[B, H, cap, D]`
/// buffer (a KV cache view, `cap > Tk`); `None` otherwise. The simple forward loads element
/// by element, so the view needs no alignment; the decode stream loads 16 bytes at a time and
/// takes a view only where it starts aligned ([`FlashAttn::decode_rows`]).
fn cache_capacity(l: &Layout) -> Option<usize> {
    let &[_, h, tk, d] = l.dims() else {
        return None;
    };
    let st = l.stride();
    let cap = st[1] / d.max(1);
    let strided = st[3] == 1 && st[2] == d && st[1] == cap * d && st[0] == h * cap * d;
    (strided && cap > tk).then_some(cap)
}

/// A device view of `k` or `v`: contiguous, or a KV cache view ([`cache_capacity`]), whose
/// view runs from its first element to the end of the buffer.
fn kv_view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    if cache_capacity(l).is_none() {
        return contiguous_view::<T>(s, l);
    }
    let slice = s.as_cuda_slice::<T>()?;
    Ok(slice.slice(l.start_offset()..))
}

fn mma_applies(dtype: DType, d: usize) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && matches!(d, 64 | 128 | WIDE_HEAD_DIM)
}

/// Which forward kernel runs a call ([`FlashAttn::fwd_path`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FwdPath {
    Mma,
    /// The decode stream with this many query rows a kv head (1 or 4).
    Decode(usize),
    Simple,
}

struct FlashAttn {
    scale: f64,
    causal: Option<usize>,
    /// `[B, Tk]` f32 on the device.
    key_valid: Option<Tensor>,
    /// Packed rows' document starts and ends (`Segments`), `[B, T]` u32 on the device.
    segments: Option<(Tensor, Tensor)>,
    /// A sliding window that hides a key from some query (one that hides none is dropped).
    window: Option<usize>,
    /// Gemma 2's cap on the scores (`AttnMask::softcap`).
    softcap: Option<f64>,
    imp: AttnImpl,
    /// Keys per block of the tensor-core backward ([`bwd_block_k_on`]).
    bwd_bk: usize,
    saved: Mutex<Option<Saved>>,
}

/// Keys per block of the tensor-core backward on `dev`: `imp`'s choice where its shared memory
/// fits the device's per-block opt-in limit, else 64, else (head dim 256) the narrow 32
/// ([`bwd_block_k_within`]). sm_86 and sm_89 allow 99 KiB a block, less than the 128-key
/// backward takes at D = 128 (106.5 KiB) and the 64-key one at 256 (149.5 KiB). Public so that
/// a GPU test can tell which one a card would be given.
pub fn bwd_block_k_on(dev: &CudaDevice, imp: AttnImpl, d: usize) -> Result<usize> {
    Ok(bwd_block_k_within(smem_optin(dev)?, imp, d).unwrap_or(64))
}

/// Keys per block of the tensor-core backward for a card whose blocks hold `optin` bytes:
/// `imp`'s choice, else 64 keys, else (head dim 256) the narrow variant's 32; `None` where
/// none fits.
fn bwd_block_k_within(optin: usize, imp: AttnImpl, d: usize) -> Option<usize> {
    let narrow = (d == WIDE_HEAD_DIM).then_some(NARROW_BLOCK_K);
    [Some(imp.bwd_block_k(d)), Some(64), narrow]
        .into_iter()
        .flatten()
        .find(|&bk| bwd_mma_smem(d, bk) <= optin)
}

/// Keys per block of head dim 256's narrow backward (`attn_bwd_mma_narrow_*_h256`: 4 warps,
/// 16-row query tiles, 69.75 KiB of shared memory).
const NARROW_BLOCK_K: usize = 32;

/// The shared memory a block of `dev` may opt in to.
fn smem_optin(dev: &CudaDevice) -> Result<usize> {
    let optin = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .w()?;
    Ok(optin.max(0) as usize)
}

/// Written by the forward for the backward.
struct Saved {
    /// `[B, Hq, Tq]` natural-log log-sum-exp of the scaled scores (+inf: row sees no key).
    lse: CudaSlice<f32>,
    /// `[B, 3]`: first valid key, last valid key + 1, no holes in between (1/0).
    krange: Option<Arc<CudaSlice<i32>>>,
}

/// A `[B, Tk]` key mask as (tensor id, B, Tk): a tensor's id is never reused and its
/// contents do not change (the one mask that does, a fixed-shape decode step's, calls
/// [`forget_key_range`] around each step), so this names one key range.
type RangeKey = (candle_core::TensorId, usize, usize);

/// A key range kept for its mask.
type KeptRange = (RangeKey, Arc<CudaSlice<i32>>);

thread_local! {
    /// The key ranges last computed on this thread, the last two, newest first. Every layer
    /// of a forward pass (and every layer of a decode step) attends under the same mask
    /// tensor, or under one of two (a windowed model's fixed-shape decode step alternates
    /// between its global and its sliding layers' masks, `KvCache::windowed`), so a range is
    /// computed once per pass rather than once per layer.
    static LAST_RANGE: RefCell<[Option<KeptRange>; 2]> =
        const { RefCell::new([None, None]) };
}

/// Forgets the key range kept for the last mask: a decode step with fixed shapes changes its
/// mask in place, and a range computed during a CUDA graph capture belongs to the graph.
pub fn forget_key_range() {
    LAST_RANGE.with_borrow_mut(|last| *last = [None, None]);
}

/// Problem sizes as the kernels take them.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    hq: usize,
    hkv: usize,
    tq: usize,
    tk: usize,
    d: usize,
}

impl Dims {
    fn new(lq: &Layout, lk: &Layout) -> Result<Self> {
        let (b, hq, tq, d) = lq.shape().dims4()?;
        let (_, hkv, tk, _) = lk.shape().dims4()?;
        Ok(Self {
            b,
            hq,
            hkv,
            tq,
            tk,
            d,
        })
    }
    fn groups(&self) -> usize {
        self.hq / self.hkv
    }
    fn q_rows(&self) -> usize {
        self.b * self.hq * self.tq
    }
    /// Keys the rows of a (batch, kv head) can see at most: all of them, or under a sliding
    /// window of `window` keys (0: none) the window and the queries past the first. What a
    /// decode call splits.
    fn keys_seen(&self, window: i32) -> usize {
        match usize::try_from(window) {
            Ok(w) if w > 0 => self.tk.min(w + self.tq - 1),
            _ => self.tk,
        }
    }
    /// The simple kernels' query-row blocking: (warps per block, blocks along grid y). A
    /// block's warps take rows of all `G` query heads of one kv head.
    fn simple_row_blocks(&self) -> (usize, usize) {
        let rows = self.groups() * self.tq;
        let nw = rows.clamp(1, 8);
        (nw, rows.div_ceil(nw))
    }
}

/// The one argument of every attention kernel: the Rust mirror of `struct AttnParams` in
/// kernels/attention.cuh (field comments there). Same fields, same order, same types
/// (device pointers as `u64`, 0 = null); the size asserts on both sides catch a mismatch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct AttnParams {
    q: DevPtr,
    k: DevPtr,
    v: DevPtr,
    o: DevPtr,
    dout: DevPtr,
    dq: DevPtr,
    dk: DevPtr,
    dv: DevPtr,
    lse: DevPtr,
    dvec: DevPtr,
    kvalid: DevPtr,
    krange: DevPtr,
    opart: DevPtr,
    lsepart: DevPtr,
    dq_acc: DevPtr,
    b: i32,
    hq: i32,
    hkv: i32,
    tq: i32,
    tk: i32,
    d: i32,
    causal: i32,
    offset: i32,
    nrows: i32,
    nsplit: i32,
    scale_log2: f32,
    scale: f32,
    kv_cap: i32,
    fresh: DevPtr,
    step: DevPtr,
    rope_cos: DevPtr,
    rope_sin: DevPtr,
    seg_start: DevPtr,
    seg_end: DevPtr,
    q_norm: DevPtr,
    k_norm: DevPtr,
    norm_eps: f32,
    window: i32,
    norm_plus_one: i32,
    softcap_log2: f32,
    softcap_inv_log2: f32,
}
const _: () = assert!(std::mem::size_of::<AttnParams>() == 264);

impl AttnParams {
    /// The CUDA-core kernels' name infix: their variants for packed rows and sliding windows
    /// are separate entry points (`fwd_simple` in kernels/attention_fwd.cu says why).
    fn simple_variant(&self) -> &'static str {
        match self.seg_start != 0 || self.seg_end != 0 || self.window != 0 {
            true => "_seg",
            false => "",
        }
    }
}
const _: () = assert!(std::mem::align_of::<AttnParams>() == 8);
// SAFETY: plain old data with the C layout of the kernels' struct (asserted above).
unsafe impl DeviceRepr for AttnParams {}
impl KernelParams for AttnParams {
    const STEMS: &'static [&'static str] = &[PREP, FWD, BWD, DECODE];
}

/// The kernel files (one PTX module each) of the attention family.
const PREP: &str = "attention_prep";
const FWD: &str = "attention_fwd";
const DECODE: &str = "attention_decode";
/// `kDecodeThreads` of kernels/attention_decode.cu.
const DECODE_THREADS: u32 = 128;
/// `kDecodeRingBytes` of kernels/attention_decode.cu in the PTX of `arch`: the dynamic shared
/// memory of a decode block, its cp.async ring (four stages from sm_90, two before).
fn decode_ring(arch: u32) -> u32 {
    match arch >= 90 {
        true => 32 << 10,
        false => 16 << 10,
    }
}

thread_local! {
    /// Per loaded decode kernel: the blocks a multiprocessor holds (a query not repeated every
    /// token). Keyed by the function's handle as well as its name: every device created loads
    /// the modules anew (a pipeline's stages each create one), and its copy has no limits set.
    static DECODE_FIT: RefCell<HashMap<(String, usize), u32>> = RefCell::new(HashMap::new());
}

/// Blocks of decode kernel `name` a multiprocessor holds with a ring of `ring` bytes. Its
/// shared-memory limit is raised first (the ring and the block's static arrays pass the 48 KiB
/// default at head dim 256 and four rows) and its carveout set to the most shared memory (six
/// rings a multiprocessor on an H100/H200), on every call: the attributes belong to the loaded
/// function, and two host calls cost nothing beside a launch.
fn decode_blocks_per_sm(
    dev: &CudaDevice,
    func: &super::Kernel,
    name: &str,
    ring: u32,
) -> Result<u32> {
    allow_smem(dev, func, ring as usize)?;
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
        100,
    )
    .w()?;
    let key = (name.to_string(), func.cu_function() as usize);
    if let Some(n) = DECODE_FIT.with_borrow(|m| m.get(&key).copied()) {
        return Ok(n);
    }
    let n = func
        .occupancy_max_active_blocks_per_multiprocessor(DECODE_THREADS, ring as usize, None)
        .w()?;
    DECODE_FIT.with_borrow_mut(|m| m.insert(key, n));
    Ok(n)
}
const BWD: &str = "attention_bwd";

/// One warp per row, 8 rows per 256-thread block.
fn warp_per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Keys per stage of the tensor-core forward for `bq` query rows a block
/// (`MmaFwdTraits::kBlockK`).
fn fwd_mma_bk(d: usize, bq: usize) -> usize {
    if (d == 128 && bq == 128) || d == WIDE_HEAD_DIM {
        32
    } else {
        64
    }
}

fn fwd_mma_smem(d: usize, bq: usize) -> usize {
    let bk = fwd_mma_bk(d, bq);
    (bq + 4 * bk) * d * 2 + 2 * bk * 4
}

/// Query rows per step of the tensor-core backward (see `bwd_mma` in the .cu file).
fn bwd_mma_bq(d: usize, bk: usize) -> usize {
    match (d, bk) {
        (WIDE_HEAD_DIM, NARROW_BLOCK_K) => 16,
        (d, _) if d >= 128 => 32,
        _ => 64,
    }
}

/// Warps of the tensor-core backward with `bk` keys a block: one a 16-key tile, two at head
/// dim 256 (`MmaBwdTraits::kSplit`).
fn bwd_mma_warps(d: usize, bk: usize) -> usize {
    let split = if d == WIDE_HEAD_DIM { 2 } else { 1 };
    bk / 16 * split
}

/// Dynamic shared memory of the tensor-core backward with `bk` keys a block
/// (`MmaBwdTraits::kSmemBytes`): at head dim 256 with the warps' P^T and dP^T exchange too.
fn bwd_mma_smem(d: usize, bk: usize) -> usize {
    let bq = bwd_mma_bq(d, bk);
    let exchange = match d == WIDE_HEAD_DIM {
        true => bwd_mma_warps(d, bk) * bq / 8 * 4 * 32 * 4,
        false => 0,
    };
    (2 * bk + 4 * bq) * d * 2 + bk * (bq + 8) * 2 + 4 * bq * 4 + exchange
}

/// Grows a kernel's dynamic shared-memory limit past the 48 KiB default.
fn allow_smem(dev: &CudaDevice, func: &super::CudaFunction, bytes: usize) -> Result<()> {
    dev.cuda_stream().context().bind_to_thread().w()?;
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .w()
}

impl FlashAttn {
    /// Whether the tensor-core kernels run where the decode stream does not: the backward's
    /// choice, and the forward's after [`Self::decode_rows`].
    fn use_mma(&self, dtype: DType, dims: &Dims) -> bool {
        mma_applies(dtype, dims.d)
            && match self.imp {
                AttnImpl::Mma | AttnImpl::MmaWide | AttnImpl::MmaNarrow => true,
                AttnImpl::Simple => false,
                AttnImpl::Auto => dims.tq > DECODE_MAX_TQ || dims.d > MAX_HEAD_DIM,
            }
    }

    /// The forward's kernel: the decode stream where it takes the call, else the tensor cores
    /// where [`Self::use_mma`], else the simple kernel. At head dims up to 128 the first two
    /// never both apply (the stream takes at most 4 query rows, the tensor cores under `Auto`
    /// more than 16).
    fn fwd_path(&self, dtype: DType, dims: &Dims, kv: [&Layout; 2]) -> FwdPath {
        match self.decode_rows(dtype, dims, kv) {
            Some(r) => FwdPath::Decode(r),
            None if self.use_mma(dtype, dims) => FwdPath::Mma,
            None => FwdPath::Simple,
        }
    }

    /// The row count `R` of the `attn_decode` kernel that takes this forward, or `None`:
    /// 16-bit k and v with a head dim of 64, 128 or 256 whose rows start 16-byte aligned (k and
    /// v share their layout), at most 4 query rows per kv head, and no implementation forced.
    fn decode_rows(&self, dtype: DType, dims: &Dims, kv: [&Layout; 2]) -> Option<usize> {
        let fits = self.imp == AttnImpl::Auto
            && self.segments.is_none()
            && matches!(dtype, DType::BF16 | DType::F16)
            && matches!(dims.d, 64 | 128 | WIDE_HEAD_DIM)
            && kv.iter().all(|l| starts16(l, dtype));
        match dims.groups() * dims.tq {
            1 if fits => Some(1),
            2 if fits => Some(2),
            3..=4 if fits => Some(4),
            _ => None,
        }
    }

    /// Sizes and options of a call, every pointer null: the part of [`AttnParams`] that
    /// does not depend on the buffers.
    fn params(&self, dims: &Dims) -> Result<AttnParams> {
        let cap_log2 = self.softcap.map(|c| c * std::f64::consts::LOG2_E);
        Ok(AttnParams {
            b: to_i32(dims.b, "batch")?,
            hq: to_i32(dims.hq, "query heads")?,
            hkv: to_i32(dims.hkv, "kv heads")?,
            tq: to_i32(dims.tq, "queries")?,
            tk: to_i32(dims.tk, "keys")?,
            d: to_i32(dims.d, "head dim")?,
            causal: i32::from(self.causal.is_some()),
            offset: to_i32(self.causal.unwrap_or(0), "causal offset")?,
            nrows: to_i32(dims.q_rows(), "rows")?,
            nsplit: 1,
            scale_log2: (self.scale * std::f64::consts::LOG2_E) as f32,
            scale: self.scale as f32,
            window: to_i32(self.window.unwrap_or(0), "sliding window")?,
            // The kernels cap in the log2 domain they score in (SoftCap in
            // kernels/attention.cuh), and divide by nothing.
            softcap_log2: (cap_log2.unwrap_or(0.0)) as f32,
            softcap_inv_log2: cap_log2.map_or(0.0, |c| 1.0 / c) as f32,
            ..AttnParams::default()
        })
    }

    /// `gridDim.y` of every launch of the forward (or of the backward) against CUDA's limit
    /// of 65535: the simple kernels put blocks of 8 query rows (all `G` heads of a kv head)
    /// or 8 keys on y, the tensor-core ones blocks of 32 to 128, so a very long sequence does
    /// not fit. A clear error before anything runs beats a launch failure halfway through.
    fn check_grid_y(&self, dtype: DType, dims: &Dims, backward: bool) -> Result<()> {
        let launches: Vec<(&str, usize)> = match (self.use_mma(dtype, dims), backward) {
            (true, false) => match self.imp.fwd_block_q(dims.d) {
                128 => vec![("attn_fwd_mma2", dims.tq.div_ceil(128))],
                bq => vec![("attn_fwd_mma", dims.tq.div_ceil(bq))],
            },
            (true, true) => match self.bwd_bk {
                128 => vec![("attn_bwd_mma2", dims.tk.div_ceil(128))],
                NARROW_BLOCK_K => vec![("attn_bwd_mma_narrow", dims.tk.div_ceil(NARROW_BLOCK_K))],
                bk => vec![("attn_bwd_mma", dims.tk.div_ceil(bk))],
            },
            (false, false) => vec![("attn_fwd_simple", dims.simple_row_blocks().1)],
            (false, true) => vec![
                ("attn_bwd_dq_simple", dims.simple_row_blocks().1),
                ("attn_bwd_dkdv_simple", dims.tk.div_ceil(8)),
            ],
        };
        for (kernel, blocks) in launches {
            if blocks > MAX_GRID_Y {
                candle_core::bail!(
                    "attention: sequence too long for {kernel}: it would launch {blocks} blocks \
                     along grid y, CUDA allows {MAX_GRID_Y} (batch {}, {} query heads over {} kv \
                     heads, {} queries, {} keys); split the sequence or use the reference \
                     (--kernels attention=reference)",
                    dims.b,
                    dims.hq,
                    dims.hkv,
                    dims.tq,
                    dims.tk
                );
            }
        }
        Ok(())
    }

    fn saved(&self) -> MutexGuard<'_, Option<Saved>> {
        self.saved.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `attn_key_range` over `key_valid` (None without a key mask), or the range already
    /// computed for this mask on this thread.
    fn key_range(&self, dev: &CudaDevice, dims: &Dims) -> Result<Option<Arc<CudaSlice<i32>>>> {
        let Some(kv) = &self.key_valid else {
            return Ok(None);
        };
        let key = (kv.id(), dims.b, dims.tk);
        let hit = LAST_RANGE.with_borrow(|last| {
            last.iter()
                .flatten()
                .find(|(k, _)| *k == key)
                .map(|(_, r)| r.clone())
        });
        if let Some(r) = hit {
            return Ok(Some(r));
        }
        let r = Arc::new(self.launch_key_range(dev, dims, kv)?);
        LAST_RANGE.with_borrow_mut(|last| {
            last[1] = last[0].take();
            last[0] = Some((key, r.clone()));
        });
        Ok(Some(r))
    }

    fn launch_key_range(
        &self,
        dev: &CudaDevice,
        dims: &Dims,
        kv: &Tensor,
    ) -> Result<CudaSlice<i32>> {
        let (guard, layout) = kv.storage_and_layout();
        let valid = contiguous_view::<f32>(cuda_storage(&guard)?, layout)?;
        // SAFETY: one block per sequence writes its three ints.
        let mut out = unsafe { alloc_out::<i32>(dev, dims.b * 3)? };
        let func = load_func(dev, PREP, "attn_key_range")?;
        let cfg = LaunchConfig {
            grid_dim: (dims.b as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        {
            let stream = dev.cuda_stream();
            let mut ptrs = DevPtrs::new(&stream);
            let p = AttnParams {
                kvalid: ptrs.read(&valid),
                krange: ptrs.write(&mut out),
                tk: to_i32(dims.tk, "keys")?,
                ..AttnParams::default()
            };
            // SAFETY: reads kvalid [B, Tk], writes krange [B, 3]; guards held by `ptrs`.
            unsafe { launch(dev, &func, "attn_key_range", cfg, &p) }?;
        }
        Ok(out)
    }

    /// The forward: validate and build the parameters, compute the key range, allocate o and
    /// lse, launch the tensor-core or the simple kernels, save lse and the range.
    fn forward<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        (sq, lq): (&CudaStorage, &Layout),
        (sk, lk): (&CudaStorage, &Layout),
        (sv, lv): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let dev = sq.device();
        let dims = Dims::new(lq, lk)?;
        let mut p = self.params(&dims)?;
        let q = contiguous_view::<T>(sq, lq)?;
        let k = kv_view::<T>(sk, lk)?;
        let v = kv_view::<T>(sv, lv)?;
        let path = self.fwd_path(T::DTYPE, &dims, [lk, lv]);
        if let Some(cap) = cache_capacity(lk) {
            if path == FwdPath::Mma {
                candle_core::bail!("attention: the tensor-core forward reads contiguous k, v only");
            }
            p.kv_cap = to_i32(cap, "KV cache capacity")?;
        }
        let krange = self.key_range(dev, &dims)?;
        let kv_guard: Guarded = self.key_valid.as_ref().map(|t| t.storage_and_layout());
        let kvalid = opt_view::<f32>(&kv_guard)?;
        let start_guard: Guarded = self.segments.as_ref().map(|s| s.0.storage_and_layout());
        let seg_start = opt_view::<u32>(&start_guard)?;
        let nrows = dims.q_rows();
        // SAFETY: every query row is written by exactly one warp (simple) or one block
        // (mma), zeros and lse = +inf included for rows that see no key; with a split, the
        // combine kernel writes every row from partials that every split writes.
        let mut o = unsafe { alloc_out::<T>(dev, nrows * dims.d)? };
        let mut lse = unsafe { alloc_out::<f32>(dev, nrows)? };
        {
            let stream = dev.cuda_stream();
            let mut ptrs = DevPtrs::new(&stream);
            p.q = ptrs.read(&q);
            p.k = ptrs.read(&k);
            p.v = ptrs.read(&v);
            p.kvalid = ptrs.read_opt(kvalid.as_ref());
            p.krange = ptrs.read_opt(krange.as_deref());
            p.seg_start = ptrs.read_opt(seg_start.as_ref());
            p.o = ptrs.write(&mut o);
            p.lse = ptrs.write(&mut lse);
            match path {
                FwdPath::Mma => {
                    launch_fwd_mma(dev, T::DTYPE, &dims, &p, self.imp.fwd_block_q(dims.d))?
                }
                FwdPath::Decode(r) => launch_decode(dev, T::DTYPE, &dims, p, r, false)?,
                FwdPath::Simple => launch_fwd_simple(dev, T::DTYPE, &dims, p)?,
            }
        }
        // The views above borrow the masks' storage guards, which are released here.
        drop((kv_guard, start_guard));
        *self.saved() = Some(Saved { lse, krange });
        Ok((
            CudaStorage::wrap_cuda_slice(o, dev.clone()),
            lq.shape().clone(),
        ))
    }

    /// dq, dk, dv from the saved log-sum-exp: views of the inputs, then D = rowsum(dO * O),
    /// then the tensor-core or the simple kernels.
    fn backward<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let saved = self.saved();
        let Some(saved) = saved.as_ref() else {
            candle_core::bail!("attention backward: the forward saved no log-sum-exp");
        };
        let (gq, lq) = q.storage_and_layout();
        let (gk, lk) = k.storage_and_layout();
        let (gv, lv) = v.storage_and_layout();
        let (go, lo) = o.storage_and_layout();
        let (gd, ld) = dout.storage_and_layout();
        let sq = cuda_storage(&gq)?;
        let dev = sq.device().clone();
        let qv = contiguous_view::<T>(sq, lq)?;
        let kv = contiguous_view::<T>(cuda_storage(&gk)?, lk)?;
        let vv = contiguous_view::<T>(cuda_storage(&gv)?, lv)?;
        let ov = contiguous_view::<T>(cuda_storage(&go)?, lo)?;
        let dov = contiguous_view::<T>(cuda_storage(&gd)?, ld)?;
        let kv_guard: Guarded = self.key_valid.as_ref().map(|t| t.storage_and_layout());
        let kvalid = opt_view::<f32>(&kv_guard)?;
        let start_guard: Guarded = self.segments.as_ref().map(|s| s.0.storage_and_layout());
        let end_guard: Guarded = self.segments.as_ref().map(|s| s.1.storage_and_layout());
        let (seg_start, seg_end) = (opt_view::<u32>(&start_guard)?, opt_view::<u32>(&end_guard)?);

        let dims = Dims::new(lq, lk)?;
        self.check_grid_y(T::DTYPE, &dims, true)?;
        let mut p = self.params(&dims)?;
        let (nrows, nkv) = (dims.q_rows(), dims.b * dims.hkv * dims.tk * dims.d);
        // SAFETY (all four): dvec rows are written by one warp each; dk/dv rows by the block
        // or warp that owns the key, zeros included; dq by the dQ kernel (simple) or the
        // conversion of the accumulator.
        let mut dvec = unsafe { alloc_out::<f32>(&dev, nrows)? };
        let mut dq = unsafe { alloc_out::<T>(&dev, nrows * dims.d)? };
        let mut dk = unsafe { alloc_out::<T>(&dev, nkv)? };
        let mut dv = unsafe { alloc_out::<T>(&dev, nkv)? };
        {
            let stream = dev.cuda_stream();
            let mut ptrs = DevPtrs::new(&stream);
            (p.q, p.k, p.v) = (ptrs.read(&qv), ptrs.read(&kv), ptrs.read(&vv));
            (p.o, p.dout) = (ptrs.read(&ov), ptrs.read(&dov));
            p.lse = ptrs.read(&saved.lse);
            p.kvalid = ptrs.read_opt(kvalid.as_ref());
            p.krange = ptrs.read_opt(saved.krange.as_deref());
            p.seg_start = ptrs.read_opt(seg_start.as_ref());
            p.seg_end = ptrs.read_opt(seg_end.as_ref());
            p.dvec = ptrs.write(&mut dvec);
            (p.dq, p.dk, p.dv) = (
                ptrs.write(&mut dq),
                ptrs.write(&mut dk),
                ptrs.write(&mut dv),
            );
            launch_bwd_dot(&dev, T::DTYPE, &dims, &p)?;
            if self.use_mma(T::DTYPE, &dims) {
                launch_bwd_mma(&dev, T::DTYPE, &dims, p, self.bwd_bk)?;
            } else {
                launch_bwd_simple(&dev, T::DTYPE, &dims, &p)?;
            }
        }
        Ok((
            tensor_from_slice(dq, &dev, q.shape()),
            tensor_from_slice(dk, &dev, k.shape()),
            tensor_from_slice(dv, &dev, v.shape()),
        ))
    }
}

/// `attn_fwd_mma_*` (`bq` = 64) or `attn_fwd_mma2_*` (128): one block per `bq` query rows of
/// one head, heaviest causal blocks first.
fn launch_fwd_mma(
    dev: &CudaDevice,
    dt: DType,
    dims: &Dims,
    p: &AttnParams,
    bq: usize,
) -> Result<()> {
    let family = if bq == 128 {
        "attn_fwd_mma2"
    } else {
        "attn_fwd_mma"
    };
    let name = format!("{family}_{}_h{}", dt.as_str(), dims.d);
    let func = load_func(dev, FWD, &name)?;
    let smem = fwd_mma_smem(dims.d, bq);
    allow_smem(dev, &func, smem)?;
    let cfg = LaunchConfig {
        grid_dim: ((dims.b * dims.hq) as u32, dims.tq.div_ceil(bq) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: q, k, v, o, lse (and the optional mask and range) are set and sized by the
    // caller for `dims`; grid y was checked against CUDA's limit.
    unsafe { launch(dev, &func, &name, cfg, p) }
}

/// How many slices of the key range the simple forward takes: more than one only when the
/// query rows alone are too few blocks to fill the GPU (decode), each slice >= 128 keys.
fn decode_splits(dev: &CudaDevice, dims: &Dims, window: i32) -> Result<usize> {
    let base = dims.simple_row_blocks().1 * dims.b * dims.hkv;
    let target = 2 * sm_count(dev)? as usize;
    let keys = dims.keys_seen(window);
    Ok(if base < target && keys > 256 {
        target.div_ceil(base).min(keys.div_ceil(128)).min(64)
    } else {
        1
    })
}

/// Key slices for a decode launch of `base` blocks (one per batch row and kv head), of which the
/// GPU holds `fit` at once, over `keys` keys: the count, up to 64 and one per 256 keys begun,
/// that finishes first under a wave model. A decode block is a few dependent passes over its
/// keys, so it takes about as long alone as beside the others that fit; a grid runs in
/// ceil(blocks / fit) waves, each as long as one block's stream of keys / slices plus its fixed
/// part (q, the merges, the partial row), and any split adds the combine's launch. One block
/// past a wave costs a whole wave: GPT-2's 768 blocks against 660 that fit took two.
fn decode_wave_splits(base: usize, fit: usize, keys: usize) -> usize {
    // In units of one unsplit block's stream; rough, but the wave count dominates the choice.
    const FIXED: f64 = 0.05;
    const COMBINE: f64 = 0.1;
    let (base, fit) = (base.max(1), fit.max(1));
    let most = keys.div_ceil(256).clamp(1, 64);
    let cost = |s: usize| {
        let waves = (base * s).div_ceil(fit) as f64;
        waves * (1.0 / s as f64 + FIXED) + if s > 1 { COMBINE } else { 0.0 }
    };
    // The first of equal costs: the fewest slices.
    (1..=most)
        .min_by(|&a, &b| cost(a).total_cmp(&cost(b)))
        .unwrap_or(1)
}

/// `attn_decode_*` (`kernels/attention_decode.cu`; `attn_decode_fresh_*` with `fresh`, for
/// [`decode_fresh`]): one block of 4 warps per (batch, kv head), split over the keys as
/// [`decode_wave_splits`] chooses from the kernel's occupancy, the splits merged by
/// `attn_combine_*`.
fn launch_decode(
    dev: &CudaDevice,
    dt: DType,
    dims: &Dims,
    p: AttnParams,
    r: usize,
    fresh: bool,
) -> Result<()> {
    let kernel = if fresh {
        "attn_decode_fresh"
    } else {
        "attn_decode"
    };
    let name = format!("{kernel}_{}_h{}_r{r}", dt.as_str(), dims.d);
    let func = load_func(dev, DECODE, &name)?;
    let base = dims.b * dims.hkv;
    let ring = decode_ring(func.arch());
    let per_sm = decode_blocks_per_sm(dev, &func, &name, ring)?;
    let fit = per_sm as usize * sm_count(dev)? as usize;
    let nsplit = decode_wave_splits(base, fit, dims.keys_seen(p.window));
    let cfg = LaunchConfig {
        grid_dim: (base as u32, 1, nsplit as u32),
        block_dim: (DECODE_THREADS, 1, 1),
        shared_mem_bytes: ring,
    };
    if nsplit == 1 {
        // SAFETY: the block of (batch, kv head) writes o and lse of each of its <= r rows.
        return unsafe { launch(dev, &func, &name, cfg, &p) };
    }
    split_and_combine(dev, dt, dims, p, (&func, &name, cfg), nsplit)
}

/// Generation's decode step at fixed shapes in one launch (`attn_decode_fresh_*`): what
/// `decode_step::qkv_write` and then [`attention`] do one after the other. `y`
/// (`[B, 1, (Hq + 2 Hkv) D]`) holds this position's q, k and v heads; q and k are rotated by
/// `rope` (`cos`, `sin` `[B, 1, 1, D / 2]` in `y`'s dtype) where given, after each q and k head
/// is RMS-normalised by `norm` (gains `[D]` in `y`'s dtype, or Gemma's f32 offsets) where
/// given, k and v are written at
/// position `step[0]` (`[2]` i64) of the caches (`[B, Hkv, cap, D]`, contiguous), and q attends
/// over the whole cache under `mask` (whose key mask `[B, cap]` already marks that position).
/// Returns `[B, Hq, 1, D]`, or `None`, having run nothing, where the decode kernel does not
/// take the step: f32, a head dim other than 64, 128 or 256, more than 4 query heads per kv head,
/// no key mask, rows not 16-byte aligned, norm weights not `[D]` in the dtype their gain wants
/// ([`HeadNorm::fits`]), contiguous and 16-byte aligned, a GPU older than sm_80, or
/// `TEMPER_ATTN_IMPL` set.
#[allow(clippy::too_many_arguments)]
pub fn decode_fresh(
    y: &Tensor,
    (kc, vc): (&Tensor, &Tensor),
    step: &Tensor,
    hq: usize,
    rope: Option<(&Tensor, &Tensor)>,
    norm: Option<HeadNorm>,
    mask: &AttnMask,
    scale: f64,
) -> Result<Option<Tensor>> {
    mask.check_softcap()?;
    let dt = y.dtype();
    let Ok(dev) = y.device().as_cuda_device() else {
        return Ok(None);
    };
    // A decode step has no packed rows; the general path refuses them with its reason. A
    // window shorter than the cache could hide a key, which the kernel would have to count
    // back from the query's position `step[0]`: the fixed-shape step hands the sliding layers
    // the window as a key mask instead (`KvCache::windowed`), with no window here.
    let (b, hkv, cap, d) = kc.dims4()?;
    if mask.segments.is_some() || mask.window.is_some_and(|w| w < cap) {
        return Ok(None);
    }
    let Some(valid) = mask.key_valid.filter(|m| m.dims() == [b, cap]) else {
        return Ok(None);
    };
    if hkv == 0 || !hq.is_multiple_of(hkv) {
        return Ok(None);
    }
    let dims = Dims {
        b,
        hq,
        hkv,
        tq: 1,
        tk: cap,
        d,
    };
    let mut op = FlashAttn {
        scale,
        causal: mask.causal_offset,
        key_valid: None,
        segments: None,
        window: None,
        softcap: mask.softcap,
        imp: AttnImpl::from_env(),
        bwd_bk: 64, // forward only
        saved: Mutex::new(None),
    };
    // The decode stream's own conditions (`Auto`, 16-bit, D 64, 128 or 256, at most 4 rows, aligned
    // caches), then what the fused step adds.
    let Some(r) = op.decode_rows(dt, &dims, [kc.layout(), vc.layout()]) else {
        return Ok(None);
    };
    let table = [b, 1, 1, d / 2];
    let rope_fits =
        rope.is_none_or(|(c, s)| [c, s].iter().all(|t| t.dims() == table && t.dtype() == dt));
    // The kernel loads the gains 16 bytes at a time.
    let norm_fits = norm.is_none_or(|n| {
        n.fits(d, dt)
            && [n.q, n.k]
                .iter()
                .all(|g| g.is_contiguous() && starts16(g.layout(), g.dtype()))
    });
    let applies = kc.dtype() == dt
        && vc.dtype() == dt
        && vc.dims() == kc.dims()
        && y.dims() == [b, 1, (hq + 2 * hkv) * d]
        && y.is_contiguous()
        && starts16(y.layout(), dt)
        && kc.is_contiguous()
        && vc.is_contiguous()
        && step.dims() == [2]
        && step.dtype() == DType::I64
        && rope_fits
        && norm_fits
        && compute_capability(dev)? >= (8, 0);
    if !applies {
        return Ok(None);
    }
    op.key_valid = Some(valid.to_dtype(DType::F32)?.contiguous()?);
    let step = step.contiguous()?;
    let rope = match rope {
        Some((c, s)) => Some((c.contiguous()?, s.contiguous()?)),
        None => None,
    };
    let rope = rope.as_ref().map(|(c, s)| (c, s));
    let o = match dt {
        DType::BF16 => {
            op.forward_fresh::<half::bf16>(dev, &dims, r, y, (kc, vc), &step, rope, norm)?
        }
        _ => op.forward_fresh::<half::f16>(dev, &dims, r, y, (kc, vc), &step, rope, norm)?,
    };
    Ok(Some(o))
}

impl FlashAttn {
    /// [`decode_fresh`]'s launch, its inputs checked, with the decode kernel of `r` rows.
    #[allow(clippy::too_many_arguments)]
    fn forward_fresh<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        dev: &CudaDevice,
        dims: &Dims,
        r: usize,
        y: &Tensor,
        (kc, vc): (&Tensor, &Tensor),
        step: &Tensor,
        rope: Option<(&Tensor, &Tensor)>,
        norm: Option<HeadNorm>,
    ) -> Result<Tensor> {
        let mut p = self.params(dims)?;
        let krange = self.key_range(dev, dims)?;
        let kv_guard: Guarded = self.key_valid.as_ref().map(|t| t.storage_and_layout());
        let kvalid = opt_view::<f32>(&kv_guard)?;
        let (gy, ly) = y.storage_and_layout();
        let (gk, lk) = kc.storage_and_layout();
        let (gv, lv) = vc.storage_and_layout();
        let (gs, ls) = step.storage_and_layout();
        let cos_guard: Guarded = rope.map(|(c, _)| c.storage_and_layout());
        let sin_guard: Guarded = rope.map(|(_, s)| s.storage_and_layout());
        let qn_guard: Guarded = norm.map(|n| n.q.storage_and_layout());
        let kn_guard: Guarded = norm.map(|n| n.k.storage_and_layout());
        let yv = contiguous_view::<T>(cuda_storage(&gy)?, ly)?;
        let kv = contiguous_view::<T>(cuda_storage(&gk)?, lk)?;
        let vv = contiguous_view::<T>(cuda_storage(&gv)?, lv)?;
        let sv = contiguous_view::<i64>(cuda_storage(&gs)?, ls)?;
        let (cos, sin) = (opt_view::<T>(&cos_guard)?, opt_view::<T>(&sin_guard)?);
        // The norm's weights: gains in T, or Gemma's f32 offsets.
        let plus_one = norm.is_some_and(|n| n.gain == Gain::PlusOne);
        let (qn, kn, qn32, kn32) = match plus_one {
            true => (
                None,
                None,
                opt_view::<f32>(&qn_guard)?,
                opt_view::<f32>(&kn_guard)?,
            ),
            false => (
                opt_view::<T>(&qn_guard)?,
                opt_view::<T>(&kn_guard)?,
                None,
                None,
            ),
        };
        let nrows = dims.q_rows();
        // SAFETY: as the decode forward's: the block of each (batch, kv head) writes o and
        // lse of its rows, or with a split the combine writes them from every split's partials.
        let mut o = unsafe { alloc_out::<T>(dev, nrows * dims.d)? };
        let mut lse = unsafe { alloc_out::<f32>(dev, nrows)? };
        {
            let stream = dev.cuda_stream();
            let mut ptrs = DevPtrs::new(&stream);
            p.fresh = ptrs.read(&yv);
            p.step = ptrs.read(&sv);
            // The caches are read-locked here but also written, at position step[0], which
            // the kernel never reads: nothing else touches them while the step's ops are
            // queued, and the stream orders every use (as decode_step::qkv_write's).
            p.k = ptrs.read(&kv);
            p.v = ptrs.read(&vv);
            (p.dk, p.dv) = (p.k, p.v);
            p.rope_cos = ptrs.read_opt(cos.as_ref());
            p.rope_sin = ptrs.read_opt(sin.as_ref());
            (p.q_norm, p.k_norm) = match plus_one {
                true => (ptrs.read_opt(qn32.as_ref()), ptrs.read_opt(kn32.as_ref())),
                false => (ptrs.read_opt(qn.as_ref()), ptrs.read_opt(kn.as_ref())),
            };
            p.norm_eps = norm.map_or(0.0, |n| n.eps as f32);
            p.norm_plus_one = i32::from(plus_one);
            p.kvalid = ptrs.read_opt(kvalid.as_ref());
            p.krange = ptrs.read_opt(krange.as_deref());
            p.o = ptrs.write(&mut o);
            p.lse = ptrs.write(&mut lse);
            launch_decode(dev, T::DTYPE, dims, p, r, true)?;
        }
        // In a decode step's capture, freed after its last kernel rather than before the next.
        super::capture_arena::keep(lse);
        Ok(tensor_from_slice(o, dev, (dims.b, dims.hq, 1, dims.d)))
    }
}

/// Runs a forward with `nsplit` key slices (grid z) into f32 partials, then `attn_combine_*`
/// into o and lse.
fn split_and_combine(
    dev: &CudaDevice,
    dt: DType,
    dims: &Dims,
    mut p: AttnParams,
    (func, name, cfg): (&super::Kernel, &str, LaunchConfig),
    nsplit: usize,
) -> Result<()> {
    let nrows = dims.q_rows();
    // SAFETY: with a split every (split, row) pair is written by the forward.
    let mut opart = unsafe { alloc_out::<f32>(dev, nsplit * nrows * dims.d)? };
    let mut lpart = unsafe { alloc_out::<f32>(dev, nsplit * nrows)? };
    let stream = dev.cuda_stream();
    let mut ptrs = DevPtrs::new(&stream);
    p.opart = ptrs.write(&mut opart);
    p.lsepart = ptrs.write(&mut lpart);
    p.nsplit = nsplit as i32;
    // SAFETY: as above; the partials hold nsplit * nrows rows.
    unsafe { launch(dev, func, name, cfg, &p) }?;
    let name = format!("attn_combine_{}", dt.as_str());
    let func = load_func(dev, DECODE, &name)?;
    // SAFETY: reads the partials just written, writes every row of o and lse.
    let combined = unsafe { launch(dev, &func, &name, warp_per_row(nrows), &p) };
    drop(ptrs);
    // In a decode step's capture, freed after its last kernel rather than before the next.
    super::capture_arena::keep(opart);
    super::capture_arena::keep(lpart);
    combined
}

/// `attn_fwd_simple_*`, split over the keys for decode and then merged by `attn_combine_*`.
fn launch_fwd_simple(dev: &CudaDevice, dt: DType, dims: &Dims, p: AttnParams) -> Result<()> {
    let (seg, dpl) = (p.simple_variant(), dims.d.div_ceil(32));
    let name = format!("attn_fwd_simple{seg}_{}_d{dpl}", dt.as_str());
    let func = load_func(dev, FWD, &name)?;
    let (nw, row_blocks) = dims.simple_row_blocks();
    let nsplit = decode_splits(dev, dims, p.window)?;
    let cfg = LaunchConfig {
        grid_dim: ((dims.b * dims.hkv) as u32, row_blocks as u32, nsplit as u32),
        block_dim: (32 * nw as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    if nsplit == 1 {
        // SAFETY: as in launch_fwd_mma; D <= 32 * DPL; no partials without a split.
        return unsafe { launch(dev, &func, &name, cfg, &p) };
    }
    // Every (split, row) pair is written by one warp.
    split_and_combine(dev, dt, dims, p, (&func, &name, cfg), nsplit)
}

/// `attn_bwd_dot_*`: D = rowsum(dO * O), one warp per row.
fn launch_bwd_dot(dev: &CudaDevice, dt: DType, dims: &Dims, p: &AttnParams) -> Result<()> {
    let name = format!("attn_bwd_dot_{}", dt.as_str());
    let func = load_func(dev, BWD, &name)?;
    // SAFETY: o, dout and dvec hold q_rows rows.
    unsafe { launch(dev, &func, &name, warp_per_row(dims.q_rows()), p) }
}

/// `attn_bwd_mma_*` (`bk` = 64 keys a block, 4 warps; 8 at head dim 256), `attn_bwd_mma2_*`
/// (128, 8 warps) or `attn_bwd_mma_narrow_*_h256` (32, 4 warps): dK, dV and an f32 dQ
/// accumulator; then `attn_dq_convert_*`.
fn launch_bwd_mma(
    dev: &CudaDevice,
    dt: DType,
    dims: &Dims,
    mut p: AttnParams,
    bk: usize,
) -> Result<()> {
    let n = dims.q_rows() * dims.d;
    let mut acc = dev.alloc_zeros::<f32>(n)?;
    let stream = dev.cuda_stream();
    let mut ptrs = DevPtrs::new(&stream);
    p.dq_acc = ptrs.write(&mut acc);
    let kernel = match (bk, dims.d) {
        (128, _) => "attn_bwd_mma2",
        (NARROW_BLOCK_K, WIDE_HEAD_DIM) => "attn_bwd_mma_narrow",
        _ => "attn_bwd_mma",
    };
    let name = format!("{kernel}_{}_h{}", dt.as_str(), dims.d);
    let func = load_func(dev, BWD, &name)?;
    let smem = bwd_mma_smem(dims.d, bk);
    allow_smem(dev, &func, smem)?;
    let cfg = LaunchConfig {
        grid_dim: ((dims.b * dims.hkv) as u32, dims.tk.div_ceil(bk) as u32, 1),
        block_dim: (32 * bwd_mma_warps(dims.d, bk) as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: inputs and dk/dv set by the caller; acc is zeroed, [B, Hq, Tq, D] f32.
    unsafe { launch(dev, &func, &name, cfg, &p) }?;
    let name = format!("attn_dq_convert_{}", dt.as_str());
    let func = load_func(dev, BWD, &name)?;
    // SAFETY: acc and dq both hold nrows * D elements.
    unsafe { launch(dev, &func, &name, grid_stride(dev, n, 256)?, &p) }
}

/// `attn_bwd_dq_simple_*` (warp per query row), then `attn_bwd_dkdv_simple_*` (warp per key).
fn launch_bwd_simple(dev: &CudaDevice, dt: DType, dims: &Dims, p: &AttnParams) -> Result<()> {
    let dpl = dims.d.div_ceil(32);
    let (nw, row_blocks) = dims.simple_row_blocks();
    let seg = p.simple_variant();
    let name = format!("attn_bwd_dq_simple{seg}_{}_d{dpl}", dt.as_str());
    let func = load_func(dev, BWD, &name)?;
    let cfg = LaunchConfig {
        grid_dim: ((dims.b * dims.hkv) as u32, row_blocks as u32, 1),
        block_dim: (32 * nw as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: inputs, dvec and dq set by the caller for `dims`.
    unsafe { launch(dev, &func, &name, cfg, p) }?;
    let name = format!("attn_bwd_dkdv_simple{seg}_{}_d{dpl}", dt.as_str());
    let func = load_func(dev, BWD, &name)?;
    let cfg = LaunchConfig {
        grid_dim: ((dims.b * dims.hkv) as u32, dims.tk.div_ceil(8) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: inputs, dk and dv set by the caller for `dims`.
    unsafe { launch(dev, &func, &name, cfg, p) }
}

impl CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "temper-flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the flash attention op runs on CUDA only (use attention_reference)")
    }

    fn cuda_fwd(
        &self,
        sq: &CudaStorage,
        lq: &Layout,
        sk: &CudaStorage,
        lk: &Layout,
        sv: &CudaStorage,
        lv: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let args = ((sq, lq), (sk, lk), (sv, lv));
        match sq.dtype() {
            DType::F32 => self.forward::<f32>(args.0, args.1, args.2),
            DType::BF16 => self.forward::<half::bf16>(args.0, args.1, args.2),
            DType::F16 => self.forward::<half::f16>(args.0, args.1, args.2),
            dt => candle_core::bail!("flash attention: no kernel for {dt:?}"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        spans::timed(KernelOp::Attention, Pass::Backward, q.device(), || {
            let dout = contiguous16(grad)?;
            // The backward kernels read contiguous k and v; a KV cache view is copied here.
            let (k, v) = (&contiguous16(k)?, &contiguous16(v)?);
            let (dq, dk, dv) = match q.dtype() {
                DType::F32 => self.backward::<f32>(q, k, v, o, &dout)?,
                DType::BF16 => self.backward::<half::bf16>(q, k, v, o, &dout)?,
                DType::F16 => self.backward::<half::f16>(q, k, v, o, &dout)?,
                dt => candle_core::bail!("flash attention backward: no kernel for {dt:?}"),
            };
            Ok((Some(dq), Some(dk), Some(dv)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decode_ring_is_the_kernels() {
        // kernels/attention_decode.cu asserts its ring's size per arch against these numbers.
        let src = include_str!("../../../kernels/attention_decode.cu");
        assert!(src.contains("kDecodeRingBytes == (kDecodeStages == 4 ? 32768 : 16384)"));
        assert!(src.contains("__CUDA_ARCH__ < 900\nconstexpr int kDecodeStages = 2;"));
        assert_eq!(decode_ring(90), 32768);
        assert_eq!(decode_ring(100), 32768);
        assert_eq!(decode_ring(80), 16384);
        assert_eq!(decode_ring(86), 16384);
    }

    #[test]
    fn decode_splits_keep_the_grid_to_whole_waves() {
        // GPT-2's bench step on an H200: 64 x 12 blocks, 6 a multiprocessor fit (792): one
        // wave, unsplit. At 5 a multiprocessor (660), 2 x 768 blocks of half the keys each run
        // in three waves of half a block's time, better than a wave and a sliver of whole ones.
        assert_eq!(decode_wave_splits(768, 792, 384), 1);
        assert_eq!(decode_wave_splits(768, 660, 384), 2);
        // Half the batch: two slices still fit one wave, three would spill into a second.
        assert_eq!(decode_wave_splits(384, 792, 384), 2);
        // One sequence of 12 heads over 4096 keys: as many slices as 256-key slices allow.
        assert_eq!(decode_wave_splits(12, 792, 4096), 16);
        // Few keys: at most one slice per 256 keys begun.
        assert_eq!(decode_wave_splits(12, 792, 256), 1);
        assert_eq!(decode_wave_splits(12, 792, 257), 2);
        // A grid many waves deep gains nothing from slicing.
        assert_eq!(decode_wave_splits(8 * 792, 792, 4096), 1);
        // Degenerate occupancy answers still give a launchable count.
        assert_eq!(decode_wave_splits(0, 0, 0), 1);
        assert!((1..=64).contains(&decode_wave_splits(1, 1, 1 << 20)));
    }

    #[test]
    fn shared_memory_plans_fit_an_sm80_block() {
        // A100 allows 163 KiB of dynamic shared memory per block, H100 227 KiB.
        for d in [64, 128] {
            for bq in [64, 128] {
                assert!(fwd_mma_smem(d, bq) <= 163 * 1024, "fwd d={d} bq={bq}");
            }
            for bk in [64, 128] {
                assert!(bwd_mma_smem(d, bk) <= 163 * 1024, "bwd d={d} bk={bk}");
            }
        }
        // fwd: sQ [64][D] + two stages of sK and sV [64][D] (2-byte elements), then two
        // stages of 64 f32 key flags.
        assert_eq!(fwd_mma_smem(128, 64), (64 + 4 * 64) * 128 * 2 + 2 * 64 * 4);
        assert_eq!(fwd_mma_smem(128, 64), 82_432);
        // The 128-row forward takes 32 keys a stage at D = 128 (MmaFwdTraits<128, 2>).
        assert_eq!(fwd_mma_smem(128, 128), 65_792);
        // bwd (`bwd_mma` in the .cu file), BQ = 32 for D = 128 and 64 for D = 64: sK and sV
        // [BK][D], two stages each of sQ and sdO [BQ][D], sdS [BK][BQ + 8] (2-byte elements),
        // then two stages each of sL and sDv [BQ] f32.
        // D = 128: (2*64 + 4*32)*128*2 + 64*40*2 + 4*32*4 = 65_536 + 5_120 + 512.
        assert_eq!(bwd_mma_smem(128, 64), 71_168);
        // D = 64: (2*64 + 4*64)*64*2 + 64*72*2 + 4*64*4 = 49_152 + 9_216 + 1_024.
        assert_eq!(bwd_mma_smem(64, 64), 59_392);
        // 128-key blocks: (2*128 + 4*32)*128*2 + 128*40*2 + 512, and the same at D = 64.
        assert_eq!(bwd_mma_smem(128, 128), 109_056);
        assert_eq!(bwd_mma_smem(64, 128), 84_992);
        assert!(mma_applies(DType::BF16, 64) && !mma_applies(DType::F32, 64));
        assert!(!mma_applies(DType::F16, 96));
    }

    #[test]
    fn head_dim_256_plans_fit_sm80_and_keep_64_rows_and_keys() {
        assert!(mma_applies(DType::BF16, 256) && !mma_applies(DType::F32, 256));
        for imp in [AttnImpl::Mma, AttnImpl::MmaWide] {
            assert_eq!(imp.fwd_block_q(256), 64, "{imp:?}");
            assert_eq!(imp.bwd_block_k(256), 64, "{imp:?}");
        }
        assert_eq!(AttnImpl::MmaWide.fwd_block_q(128), 128);
        // fwd: sQ [64][256] + two stages of sK and sV [32][256], then two stages of 32 flags;
        // under the 99 KiB a block that sm_86 and sm_89 allow.
        assert_eq!(fwd_mma_smem(256, 64), (64 + 4 * 32) * 256 * 2 + 2 * 32 * 4);
        assert_eq!(fwd_mma_smem(256, 64), 98_560);
        assert!(fwd_mma_smem(256, 64) <= 99 * 1024);
        // bwd: 64 keys over 8 warps (two a 16-key tile), BQ 32, plus the pairs' exchange of
        // P^T and dP^T, 8 warps x 16 f32 x 32 lanes: (2*64 + 4*32)*256*2 + 64*40*2 + 512 +
        // 16_384, under sm_80's 163 KiB.
        assert_eq!(bwd_mma_warps(256, 64), 8);
        assert_eq!(bwd_mma_warps(128, 64), 4);
        assert_eq!(bwd_mma_smem(256, 64), 153_088);
        assert!(bwd_mma_smem(256, 64) <= 163 * 1024);
    }

    /// Head dim 256 on each card: sm_80 and sm_90 take the 64-key backward (under MmaWide too,
    /// which is Mma there), sm_86 and sm_89 (99 KiB a block) the narrow 32-key one; the
    /// narrow plan's shared memory is what its kernel asks for (MmaBwdTraits<256, 4>); f32,
    /// the CUDA-core kernels and a card too small for the forward take none.
    #[test]
    fn each_card_gets_a_head_dim_256_backward_that_fits() {
        let (sm89, sm80, sm90) = (99 * 1024, 163 * 1024, 227 * 1024);
        assert_eq!(bwd_mma_bq(256, 32), 16);
        assert_eq!(bwd_mma_warps(256, 32), 4);
        // (2*32 + 4*16)*256*2 + 32*24*2 + 4*16*4 + 4 warps x 8 f32 x 32 lanes x 4 bytes.
        assert_eq!(bwd_mma_smem(256, 32), 71_424);
        for imp in [AttnImpl::Auto, AttnImpl::Mma, AttnImpl::MmaWide] {
            assert_eq!(bwd_block_k_within(sm89, imp, 256), Some(32), "{imp:?}");
            for optin in [sm80, sm90] {
                assert_eq!(bwd_block_k_within(optin, imp, 256), Some(64), "{imp:?}");
            }
            // MmaNarrow takes the narrow one everywhere, at 256 only.
            let narrow = AttnImpl::MmaNarrow;
            assert_eq!(bwd_block_k_within(sm90, narrow, 256), Some(32));
            assert_eq!(bwd_block_k_within(sm90, narrow, 128), Some(64));
            for dt in [DType::BF16, DType::F16] {
                for optin in [sm89, sm80, sm90] {
                    assert!(fits_head_dim(optin, dt, 256, imp), "{imp:?} {dt:?} {optin}");
                }
                assert!(!fits_head_dim(64 * 1024, dt, 256, imp), "{imp:?} {dt:?}");
            }
            assert!(!fits_head_dim(sm90, DType::F32, 256, imp));
            // Narrower heads: MmaWide's 128 keys where they fit, else 64; never the narrow 32.
            assert_eq!(bwd_block_k_within(sm89, imp, 128), Some(64), "{imp:?}");
        }
        assert_eq!(bwd_block_k_within(sm90, AttnImpl::MmaWide, 128), Some(128));
        assert!(!fits_head_dim(sm90, DType::BF16, 256, AttnImpl::Simple));
        assert!(fits_head_dim(sm89, DType::F32, 128, AttnImpl::Simple));
        assert!(!fits_head_dim(sm89, DType::BF16, 0, AttnImpl::Auto));
    }

    #[test]
    fn auto_takes_the_decode_stream_then_the_tensor_cores_at_head_dim_256() {
        let auto = op(AttnImpl::Auto);
        let l = Layout::contiguous((1, 2, 40, 256));
        // 4 query rows a kv head: the decode stream, as at 64 and 128.
        assert_eq!(
            auto.fwd_path(DType::BF16, &dims(4, 1, 40, 256), [&l, &l]),
            FwdPath::Decode(4)
        );
        // 12 query rows: the tensor cores (no simple kernel takes 256), where at 128 the
        // simple kernel would.
        assert_eq!(
            auto.fwd_path(DType::BF16, &dims(4, 3, 40, 256), [&l, &l]),
            FwdPath::Mma
        );
        assert_eq!(
            auto.fwd_path(DType::BF16, &dims(4, 3, 40, 128), [&l, &l]),
            FwdPath::Simple
        );
        assert!(auto.use_mma(DType::F16, &dims(4, 1, 40, 256)));
    }

    fn op(imp: AttnImpl) -> FlashAttn {
        FlashAttn {
            scale: 0.125,
            causal: Some(0),
            key_valid: None,
            segments: None,
            window: None,
            softcap: None,
            imp,
            bwd_bk: imp.bwd_block_k(64),
            saved: Mutex::new(None),
        }
    }

    fn dims(g: usize, tq: usize, tk: usize, d: usize) -> Dims {
        Dims {
            b: 1,
            hq: 2 * g,
            hkv: 2,
            tq,
            tk,
            d,
        }
    }

    #[test]
    fn launches_past_the_grid_y_limit_are_refused_up_front() {
        let simple = op(AttnImpl::Simple);
        // Simple forward and dQ: ceil(G * Tq / 8) blocks on y; 8 * 65535 rows fit, one more not.
        let fits = dims(4, 2 * 65_535, 16, 64);
        assert!(simple.check_grid_y(DType::F32, &fits, false).is_ok());
        assert!(simple.check_grid_y(DType::F32, &fits, true).is_ok());
        let over = dims(4, 2 * 65_535 + 1, 16, 64);
        let err = simple
            .check_grid_y(DType::F32, &over, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("attn_fwd_simple") && err.contains("65535"),
            "{err}"
        );
        assert!(simple.check_grid_y(DType::F32, &over, true).is_err());
        // Simple dK/dV: ceil(Tk / 8) blocks; only the backward launches it.
        let long_cache = dims(1, 1, 8 * 65_535 + 1, 64);
        assert!(simple.check_grid_y(DType::F32, &long_cache, false).is_ok());
        let err = simple
            .check_grid_y(DType::F32, &long_cache, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("attn_bwd_dkdv_simple"), "{err}");
        // Tensor cores: 64 rows (forward) or keys (backward) per block.
        let mma = op(AttnImpl::Mma);
        let ok = dims(4, 64 * 65_535, 64 * 65_535, 128);
        assert!(mma.check_grid_y(DType::BF16, &ok, false).is_ok());
        assert!(mma.check_grid_y(DType::BF16, &ok, true).is_ok());
        let over = dims(4, 64 * 65_535 + 1, 64 * 65_535 + 1, 128);
        assert!(mma.check_grid_y(DType::BF16, &over, false).is_err());
        assert!(mma.check_grid_y(DType::BF16, &over, true).is_err());
        // The wide tiles: 128 rows (forward) or keys (backward) per block, so twice as many fit.
        let wide = op(AttnImpl::MmaWide);
        let rows = dims(4, 128 * 65_535, 128 * 65_535, 128);
        assert!(wide.check_grid_y(DType::BF16, &rows, false).is_ok());
        assert!(wide.check_grid_y(DType::BF16, &rows, true).is_ok());
        assert!(mma.check_grid_y(DType::BF16, &rows, false).is_err());
        assert!(mma.check_grid_y(DType::BF16, &rows, true).is_err());
        let over = dims(4, 128 * 65_535 + 1, 128 * 65_535 + 1, 128);
        let err = wide
            .check_grid_y(DType::BF16, &over, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("attn_fwd_mma2"), "{err}");
        let err = wide
            .check_grid_y(DType::BF16, &over, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("attn_bwd_mma2"), "{err}");
    }
}
