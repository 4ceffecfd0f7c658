//! The LM head and the loss head as one autograd node: `logp = log_softmax(h W^T)[target]`
//! for `h [..., K]`, `W [V, K]` and u32 targets, through our cuBLASLt GEMM and
//! `kernels/logprobs.cu`.
//!
//! Apart, the `[..., V]` logits are a node of candle's graph: its backward gives that node a
//! zero-filled buffer and adds the loss head's gradient into it (GPT-2 at B16 T1024: 1.6 GB
//! written, then 4.9 GB read and written, before the GEMMs start), and the logits and their
//! gradient both live until the step ends. Here the logits live only inside this op: the
//! forward keeps them (with each row's log-sum-exp) for the backward, which writes the
//! gradient over them in place and hands it to the two GEMMs; the buffer is freed there.
//!
//! A vocabulary whose rows are not a multiple of 16 bytes (GPT-2's 50,257) would leave every
//! GEMM here off cuBLASLt, and the head on the reference's f32 `[B, T, V]` logits. Instead the
//! weight gets zero rows up to a multiple of 8 (a copy per call, 77 MB for GPT-2, freed after
//! the backward), the padded logits are set to -inf, which the softmax gives no weight and
//! the backward a zero gradient, and the weight's gradient is the first `V` rows of the
//! padded one. A soft cap would turn -inf into -cap, so capped logits are not padded.
//!
//! Timing: the GEMMs are counted as `gemm` and the softmax as `logprobs` in `--profile`.

use std::ops::Range;
use std::sync::{Mutex, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, CustomOp3, DType, Device, Layout, Shape, Tensor, WithDType};

use super::super::logprobs::Shaping;
use super::super::spans::{self, Pass};
use super::super::KernelOp;
use super::{contiguous_view, cuda_storage, gemm, logprobs, tensor_from_storage, DevPtrs};

type Result<T> = candle_core::Result<T>;

/// `[...]` f32 log-probabilities of `targets [...]` under `hidden [..., K] W^T`, or `None`
/// where cuBLASLt does not take the GEMM (f32, mixed dtypes, a width not a multiple of 8).
pub fn token_logprobs(hidden: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Option<Tensor>> {
    head(hidden, w, targets, false, Shaping::NONE)
}

/// The log-probabilities under the `shaping` of the logits and, with `entropy`, each row's
/// softmax entropy, both differentiable (one node whose output is then `[2, ...]`), or `None`
/// as [`token_logprobs`]. The entropy is not on a tape: the split of the output is a candle op,
/// which a tape segment would not record.
pub fn logprobs(
    hidden: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    entropy: bool,
    shaping: Shaping,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    if entropy && crate::tape::recording() {
        candle_core::bail!("the loss head with entropy: not supported inside a tape segment");
    }
    Ok(match head(hidden, w, targets, entropy, shaping)? {
        Some(pair) if entropy => Some((pair.get(0)?, Some(pair.get(1)?))),
        Some(lp) => Some((lp, None)),
        None => None,
    })
}

fn head(
    hidden: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    entropy: bool,
    shaping: Shaping,
) -> Result<Option<Tensor>> {
    let pad = match gemm::takes_nt(hidden, w) {
        Some(_) => None,
        None => {
            // A cap would turn the padded logits' -inf into -cap: capped heads keep the reference.
            let padding = w.dtype() == hidden.dtype() && shaping.cap().is_none();
            let dims = w.dims2().ok().filter(|_| padding);
            let Some(to) = dims.and_then(|d| gemm::pads_nt(hidden, d)) else {
                return Ok(None);
            };
            Some(to)
        }
    };
    if targets.dims() != &hidden.dims()[..hidden.rank() - 1] {
        candle_core::bail!(
            "loss head: hidden {:?} and targets {:?} do not match",
            hidden.dims(),
            targets.dims()
        );
    }
    let t = targets.to_dtype(DType::U32)?.contiguous()?;
    let op = LossHead {
        saved: Mutex::new(None),
        entropy,
        shaping,
        pad,
    };
    let arg = crate::tape::arg;
    let (h, wp) = (gemm::prepared(&arg(hidden))?, gemm::prepared(&arg(w))?);
    if !crate::tape::recording() {
        return Ok(Some(h.apply_op3(&wp, &t, op)?));
    }
    // On a tape: the gradients are the GEMMs' fresh buffers, which a tied embedding's
    // backward then adds its rows into.
    let y = h.apply_op3_no_bwd(&wp, &t, &op)?;
    // The entropies' gradient term reads them back from the output.
    let out = entropy.then(|| y.clone());
    crate::tape::record_owned(&[hidden, w, targets], &y, move |g, want| {
        let (dh, dw) = op.backward(&h, &wp, &t, (out.as_ref(), &g), [want[0], want[1]])?;
        Ok(vec![dh, dw, None])
    })?;
    Ok(Some(y))
}

/// What the forward leaves for the backward: the logits' storage `[rows, vocab]` (`vocab`
/// padded where the weight was) and each row's f32 log-sum-exp; and the padded weight.
struct Saved {
    logits: CudaStorage,
    rows: usize,
    vocab: usize,
    lse: Tensor,
    padded: Option<Padded>,
}

/// The weight `[rows, cols]` with zero rows appended, `[width, cols]`.
struct Padded {
    weight: CudaStorage,
    rows: usize,
    cols: usize,
    width: usize,
}

impl Padded {
    fn layout(&self) -> Layout {
        Layout::contiguous((self.width, self.cols))
    }
}

struct LossHead {
    saved: Mutex<Option<Saved>>,
    /// Whether the output is `[2, ...]`, the log-probabilities then the entropies.
    entropy: bool,
    shaping: Shaping,
    /// The vocabulary padded to a multiple of 8, where it is not one.
    pad: Option<usize>,
}

impl CustomOp3 for LossHead {
    fn name(&self) -> &'static str {
        "temper-loss-head"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("the fused loss head runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        sh: &CudaStorage,
        lh: &Layout,
        sw: &CudaStorage,
        lw: &Layout,
        st: &CudaStorage,
        lt: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = Device::Cuda(sh.device().clone());
        let padded = match self.pad {
            Some(to) => Some(padded_weight(sw, lw, to)?),
            None => None,
        };
        let (mut logits, shape) =
            spans::timed(KernelOp::Gemm, Pass::Forward, &dev, || match &padded {
                Some(p) => gemm::nt_storage((sh, lh), (&p.weight, &p.layout())),
                None => gemm::nt_storage((sh, lh), (sw, lw)),
            })?;
        if let Some(p) = &padded {
            let rows = shape.elem_count() / p.width;
            fill_neg_inf(&mut logits, rows, p.rows..p.width)?;
        }
        let ll = Layout::contiguous(shape.clone());
        let (logp, lse) = spans::timed(KernelOp::Logprobs, Pass::Forward, &dev, || {
            let o = logprobs::Outputs {
                entropy: self.entropy,
                shaping: self.shaping,
            };
            logprobs::forward(&logits, &ll, st, lt, o)
        })?;
        let dims = shape.dims();
        let vocab = dims[dims.len() - 1];
        let rows = shape.elem_count() / vocab.max(1);
        *self.saved.lock().unwrap_or_else(PoisonError::into_inner) = Some(Saved {
            logits,
            rows,
            vocab,
            lse,
            padded,
        });
        let lead = &dims[..dims.len() - 1];
        let out = match self.entropy {
            true => Shape::from([&[2], lead].concat()),
            false => Shape::from(lead),
        };
        Ok((logp, out))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want = [hidden.track_op(), w.track_op()];
        let out = self.entropy.then_some(res);
        let (dh, dw) = self.backward(hidden, w, targets, (out, grad), want)?;
        Ok((dh, dw, None))
    }
}

impl LossHead {
    /// The gradients of the hidden states and the weight for `grad` (the output's: with the
    /// entropies, `out` is the forward's output, whose second half they are), each `None`
    /// where `want` says none is needed.
    fn backward(
        &self,
        hidden: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        (out, grad): (Option<&Tensor>, &Tensor),
        want: [bool; 2],
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Taken, not cloned: the logits' buffer becomes their gradient and is freed after the
        // GEMMs below.
        let saved = self
            .saved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(Saved {
            mut logits,
            rows,
            vocab,
            lse,
            padded,
        }) = saved
        else {
            candle_core::bail!("loss head: backward before its forward, or twice");
        };
        let dev = hidden.device();
        let g = grad.to_dtype(DType::F32)?.contiguous()?;
        let entropy = out.map(|o| o.get(1)).transpose()?;
        spans::timed(KernelOp::Logprobs, Pass::Backward, dev, || {
            let (ts, tl) = targets.storage_and_layout();
            let (gs, gl) = g.storage_and_layout();
            let up = logprobs::Upstream {
                grad: (cuda_storage(&gs)?, gl),
                lse: &lse,
                entropy: entropy.as_ref(),
                shaping: self.shaping,
            };
            logprobs::backward_in_place(&mut logits, (rows, vocab), (cuda_storage(&ts)?, tl), &up)
        })?;
        let mut dims = hidden.dims().to_vec();
        dims.pop();
        dims.push(vocab);
        let dlogits = tensor_from_storage(logits, Shape::from(dims));
        // The -inf logits' gradients are zeros, which the padded weight's zero rows meet.
        let (dh, dw) = spans::timed(KernelOp::Gemm, Pass::Backward, dev, || match padded {
            Some(p) => {
                let wp = tensor_from_storage(p.weight, Shape::from((p.width, p.cols)));
                let (dh, dw) = gemm::grads(&dlogits, hidden, &wp, want)?;
                Ok((dh, dw.map(|d| d.narrow(0, 0, p.rows)).transpose()?))
            }
            None => gemm::grads(&dlogits, hidden, w, want),
        })?;
        Ok((dh, dw))
    }
}

/// `W [N, K]` (16-bit) with zero rows appended up to `to` rows, in fresh storage.
fn padded_weight(sw: &CudaStorage, lw: &Layout, to: usize) -> Result<Padded> {
    fn go<T: CudaDType + DeviceRepr + ValidAsZeroBits + WithDType>(
        sw: &CudaStorage,
        lw: &Layout,
        to: usize,
    ) -> Result<Padded> {
        let dev = sw.device();
        let (rows, cols) = lw.shape().dims2()?;
        if to < rows {
            candle_core::bail!("loss head: padding {rows} weight rows to {to}");
        }
        let src = contiguous_view::<T>(sw, lw)?;
        let mut out = dev.alloc_zeros::<T>(to * cols)?;
        dev.cuda_stream()
            .memcpy_dtod(&src, &mut out.slice_mut(..rows * cols))
            .w()?;
        Ok(Padded {
            weight: CudaStorage::wrap_cuda_slice(out, dev.clone()),
            rows,
            cols,
            width: to,
        })
    }
    match sw.dtype() {
        DType::BF16 => go::<half::bf16>(sw, lw, to),
        DType::F16 => go::<half::f16>(sw, lw, to),
        dt => candle_core::bail!("loss head: no padded weight for {dt:?}"),
    }
}

/// Sets columns `cols` of each of the `rows` rows of a 16-bit matrix stored `cols.end` wide
/// (the padded logits) to -inf, by the driver's 2D memset: no kernel of candle's.
fn fill_neg_inf(s: &mut CudaStorage, rows: usize, cols: Range<usize>) -> Result<()> {
    fn go<T: CudaDType + DeviceRepr>(
        s: &mut CudaStorage,
        rows: usize,
        cols: Range<usize>,
        neg_inf: u16,
    ) -> Result<()> {
        let dev = s.device().clone();
        let width = cols.end;
        let x = s.as_cuda_slice_mut::<T>()?;
        if x.len() < rows * width {
            candle_core::bail!("loss head: {} logits for {rows} rows of {width}", x.len());
        }
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let base = ptrs.write(x);
        stream.context().bind_to_thread().w()?;
        // SAFETY: the buffer holds `rows * width` 16-bit elements (the GEMM's output), and the
        // region starts inside each row and ends at its end; the guard in `ptrs` outlives the
        // call.
        unsafe {
            sys::cuMemsetD2D16Async(
                base + 2 * cols.start as u64,
                2 * width,
                neg_inf,
                cols.len(),
                rows,
                stream.cu_stream(),
            )
            .result()
            .w()
        }
    }
    if rows == 0 || cols.is_empty() {
        return Ok(());
    }
    match s.dtype() {
        DType::BF16 => go::<half::bf16>(s, rows, cols, half::bf16::NEG_INFINITY.to_bits()),
        DType::F16 => go::<half::f16>(s, rows, cols, half::f16::NEG_INFINITY.to_bits()),
        dt => candle_core::bail!("loss head: no 16-bit fill for {dt:?}"),
    }
}
