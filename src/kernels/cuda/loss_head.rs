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
//! Timing: the GEMMs are counted as `gemm` and the softmax as `logprobs` in `--profile`.

use std::sync::{Mutex, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};

use super::super::logprobs::Shaping;
use super::super::spans::{self, Pass};
use super::super::KernelOp;
use super::{cuda_storage, gemm, logprobs, tensor_from_storage};

type Result<T> = candle_core::Result<T>;

/// `[...]` f32 log-probabilities of `targets [...]` under `hidden [..., K] W^T`, or `None`
/// where cuBLASLt does not take the GEMM (f32, mixed dtypes, rows not a multiple of 16 bytes).
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
    if gemm::takes_nt(hidden, w).is_none() {
        return Ok(None);
    }
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

/// What the forward leaves for the backward: the logits' storage `[rows, vocab]` and each
/// row's f32 log-sum-exp.
struct Saved {
    logits: CudaStorage,
    rows: usize,
    vocab: usize,
    lse: Tensor,
}

struct LossHead {
    saved: Mutex<Option<Saved>>,
    /// Whether the output is `[2, ...]`, the log-probabilities then the entropies.
    entropy: bool,
    shaping: Shaping,
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
        let (logits, shape) = spans::timed(KernelOp::Gemm, Pass::Forward, &dev, || {
            gemm::nt_storage((sh, lh), (sw, lw))
        })?;
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
        let (dh, dw) = spans::timed(KernelOp::Gemm, Pass::Backward, dev, || {
            gemm::grads(&dlogits, hidden, w, want)
        })?;
        Ok((dh, dw))
    }
}
