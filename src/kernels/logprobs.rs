//! Per-token log-probabilities of the targets, `log softmax(logits)[target]`, and their
//! gradient: the loss head of every stage (cross-entropy is their masked mean; DPO and the RL
//! stages use them directly).
//!
//! Contract: `logits [..., V]` (f32, bf16 or f16) and `targets [...]` (u32) give f32 `[...]`;
//! the gradient with respect to the logits is `g * (onehot(target) - softmax(logits))`, in the
//! logits' dtype. The reference is candle's composite, which materialises an f32 log-softmax
//! of the whole `[..., V]` tensor (and its gradient); [`fused`] is one custom op that never
//! does: on CUDA `kernels/logprobs.cu`, on the CPU the same maths in Rust, so its forward and
//! backward are checked against the reference without a GPU.
//!
//! The same pass gives the softmax's entropy where asked ([`token_logprobs_entropy`],
//! [`fused_entropy`]), differentiable too: the RL stages' entropy bonus, metric and top-entropy
//! mask without the logits' log-softmax (PPO computes it every minibatch).
//!
//! The softmax may read the logits shaped ([`Shaping`]): Gemma 2's soft cap and the RL
//! stages' sampling temperature, applied per element in f32 by the same kernels, so that a
//! capped model's loss head still never holds the capped logits as a tensor.

use std::sync::{Mutex, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor, WithDType, D,
};

use super::host::{rows_cols, slice};
use super::registry::{warn_fallback, KernelChoice};
use super::spans::{self, Pass};
use super::KernelOp;

type Result<T> = candle_core::Result<T>;

/// What the softmax does to each logit `x` first: Gemma 2's soft cap `c tanh(x / c)`
/// (`ModelConfig::final_logit_softcapping`), then the division by a sampling temperature, in
/// that order, as transformers caps the logits and the sampler then tempers them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shaping {
    pub softcap: Option<f32>,
    pub temperature: f32,
}

impl Shaping {
    /// The logits as they are.
    pub const NONE: Self = Self {
        softcap: None,
        temperature: 1.0,
    };

    pub fn is_none(&self) -> bool {
        self.cap().is_none() && self.temperature == 1.0
    }

    /// The cap, where it is one: a cap of 0 or less is none, as the kernels read it.
    pub fn cap(&self) -> Option<f32> {
        self.softcap.filter(|&c| c > 0.0)
    }

    /// The shaped logit, in f32 as the kernels compute it.
    fn apply(&self, x: f32) -> f32 {
        let capped = match self.cap() {
            Some(c) => c * (x / c).tanh(),
            None => x,
        };
        capped * (1.0 / self.temperature)
    }

    /// `d apply(x) / dx`.
    fn slope(&self, x: f32) -> f32 {
        let inv_t = 1.0 / self.temperature;
        match self.cap() {
            Some(c) => {
                let t = (x / c).tanh();
                inv_t * (1.0 - t * t)
            }
            None => inv_t,
        }
    }

    /// The shaped logits by candle's ops, in f32: what the references read.
    pub fn reference(&self, logits: &Tensor) -> Result<Tensor> {
        let mut x = logits.to_dtype(DType::F32)?;
        if let Some(c) = self.cap() {
            x = ((x / c as f64)?.tanh()? * c as f64)?;
        }
        if self.temperature != 1.0 {
            x = (x / self.temperature as f64)?;
        }
        Ok(x)
    }
}

pub fn token_logprobs(logits: &Tensor, targets: &Tensor, choice: KernelChoice) -> Result<Tensor> {
    Ok(shaped_logprobs(logits, targets, Shaping::NONE, false, choice)?.0)
}

/// The log-probabilities of `targets` under the `shaping` of `logits`, with each row's entropy
/// where `entropy` asks: the kernel where `choice` takes it, else candle's composite.
pub fn shaped_logprobs(
    logits: &Tensor,
    targets: &Tensor,
    shaping: Shaping,
    entropy: bool,
    choice: KernelChoice,
) -> Result<(Tensor, Option<Tensor>)> {
    if takes_kernel(logits, choice) {
        return match entropy {
            true => {
                let (lp, h) = fused_pair(logits, targets, shaping)?;
                Ok((lp, Some(h)))
            }
            false => Ok((fused_op(logits, targets, false, shaping)?, None)),
        };
    }
    let shaped = |x: &Tensor| match shaping.is_none() {
        true => Ok(x.clone()),
        false => shaping.reference(x),
    };
    let lp = crate::tape::island(&[logits], |a| reference(&shaped(&a[0])?, targets))?;
    let h = match entropy {
        true => Some(crate::tape::island(&[logits], |a| {
            reference_entropy(&shaped(&a[0])?)
        })?),
        false => None,
    };
    Ok((lp, h))
}

/// Whether `choice` runs the kernel on `logits`: ours, on CUDA, in a dtype it has entry points
/// for (another dtype falls back to the reference, with a warning).
fn takes_kernel(logits: &Tensor, choice: KernelChoice) -> bool {
    if choice != KernelChoice::Custom || !logits.device().is_cuda() {
        return false;
    }
    if matches!(logits.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return true;
    }
    warn_fallback(
        "logprobs",
        &format!("no kernel for {:?} logits", logits.dtype()),
    );
    false
}

/// [`token_logprobs`] and each row's entropy `-sum p log p` of `softmax(logits)`, both f32
/// `[...]` and differentiable in the logits.
pub fn token_logprobs_entropy(
    logits: &Tensor,
    targets: &Tensor,
    choice: KernelChoice,
) -> Result<(Tensor, Tensor)> {
    let (lp, h) = shaped_logprobs(logits, targets, Shaping::NONE, true, choice)?;
    Ok((lp, h.expect("asked for the entropy")))
}

/// The LM head's weight and how its logits are shaped before the softmax.
#[derive(Clone, Copy)]
pub struct Head<'a> {
    /// `[V, K]`.
    pub w: &'a Tensor,
    pub shaping: Shaping,
}

/// `log softmax(shape(hidden W^T))[target]`: the LM head (`hidden [..., K]`, `W [V, K]`) and
/// the loss head together. With both `gemm` and `logprobs` ours, on CUDA, the two are one
/// autograd node whose logits never enter candle's graph (`cuda::loss_head`); otherwise the
/// GEMM's logits go to [`shaped_logprobs`].
pub fn head_logprobs(
    hidden: &Tensor,
    head: Head,
    targets: &Tensor,
    gemm: KernelChoice,
    logprobs: KernelChoice,
) -> Result<Tensor> {
    Ok(head_pass(hidden, head, targets, false, [gemm, logprobs])?.0)
}

/// [`head_logprobs`] and each row's entropy (as [`token_logprobs_entropy`]).
pub fn head_logprobs_entropy(
    hidden: &Tensor,
    head: Head,
    targets: &Tensor,
    gemm: KernelChoice,
    logprobs: KernelChoice,
) -> Result<(Tensor, Tensor)> {
    let (lp, h) = head_pass(hidden, head, targets, true, [gemm, logprobs])?;
    Ok((lp, h.expect("asked for the entropy")))
}

fn head_pass(
    hidden: &Tensor,
    head: Head,
    targets: &Tensor,
    entropy: bool,
    [gemm, logprobs]: [KernelChoice; 2],
) -> Result<(Tensor, Option<Tensor>)> {
    #[cfg(feature = "cuda")]
    if gemm == KernelChoice::Custom && logprobs == KernelChoice::Custom && hidden.device().is_cuda()
    {
        if let Some(pair) =
            super::cuda::loss_head::logprobs(hidden, head.w, targets, entropy, head.shaping)?
        {
            return Ok(pair);
        }
    }
    let mut shaping = head.shaping;
    let hidden = match shaping.cap() {
        // The head is linear without a bias, so softmax(h W^T / T) = softmax((h / T) W^T):
        // the temperature scales the [.., K] hidden states instead of the [.., V] logits.
        None if shaping.temperature != 1.0 => {
            let t = std::mem::replace(&mut shaping.temperature, 1.0);
            (hidden / t as f64)?
        }
        _ => hidden.clone(),
    };
    let logits = super::gemm::linear(&hidden, head.w, None, gemm)?;
    shaped_logprobs(&logits, targets, shaping, entropy, logprobs)
}

/// The entropy of `softmax(logits)` over the last dimension by candle's composite, in f32.
pub fn reference_entropy(logits: &Tensor) -> Result<Tensor> {
    let lp = log_softmax_f32(logits)?;
    (lp.exp()? * &lp)?.sum(D::Minus1)?.neg()
}

/// candle's composite: an f32 log-softmax over the last dimension, then a gather.
pub fn reference(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    log_softmax_f32(logits)?
        .gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)
}

/// The references' f32 log-softmax over the last dimension, the max subtracted first.
fn log_softmax_f32(logits: &Tensor) -> Result<Tensor> {
    let x = logits.to_dtype(DType::F32)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// The fused op on any device, differentiable in the logits.
pub fn fused(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    fused_op(logits, targets, false, Shaping::NONE)
}

/// [`fused`] over the `shaping` of the logits.
pub fn fused_shaped(logits: &Tensor, targets: &Tensor, shaping: Shaping) -> Result<Tensor> {
    fused_op(logits, targets, false, shaping)
}

/// The fused op with the entropy on any device: `(logp, entropy)`, both differentiable in the
/// logits (one op whose output is `[2, ...]`). Not on a tape: the split of the output is a
/// candle op, which a tape segment would not record.
pub fn fused_entropy(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    fused_pair(logits, targets, Shaping::NONE)
}

/// [`fused_entropy`] over the `shaping` of the logits.
pub fn fused_pair(logits: &Tensor, targets: &Tensor, shaping: Shaping) -> Result<(Tensor, Tensor)> {
    if crate::tape::recording() {
        candle_core::bail!("logprobs with entropy: not supported inside a tape segment");
    }
    let pair = fused_op(logits, targets, true, shaping)?;
    Ok((pair.get(0)?, pair.get(1)?))
}

fn fused_op(logits: &Tensor, targets: &Tensor, entropy: bool, shaping: Shaping) -> Result<Tensor> {
    spans::timed(KernelOp::Logprobs, Pass::Forward, logits.device(), || {
        check(logits, targets)?;
        let t = targets.to_dtype(DType::U32)?.contiguous()?;
        crate::tape::op2(
            [logits, targets],
            [crate::tape::arg(logits).contiguous()?, t],
            Logprobs::new(entropy, shaping),
        )
    })
}

fn check(logits: &Tensor, targets: &Tensor) -> Result<()> {
    let lead = &logits.dims()[..logits.rank().saturating_sub(1)];
    if logits.rank() == 0 || targets.dims() != lead {
        candle_core::bail!(
            "logprobs: logits {:?} and targets {:?} do not match",
            logits.dims(),
            targets.dims()
        );
    }
    Ok(())
}

/// [`fused`] with its backward called directly for a given upstream gradient, without
/// candle's autograd (benches/train_ops.rs times it so): the same launches, the forward
/// keeping each row's log-sum-exp for the backward as the op in a graph does.
pub struct LogprobsDirect {
    op: Logprobs,
    logits: Tensor,
    targets: Tensor,
}

impl LogprobsDirect {
    /// `logits [..., V]`, `targets [...]`, as [`fused`] takes them.
    pub fn new(logits: &Tensor, targets: &Tensor) -> Result<Self> {
        check(logits, targets)?;
        Ok(Self {
            op: Logprobs::new(false, Shaping::NONE),
            logits: logits.contiguous()?,
            targets: targets.to_dtype(DType::U32)?.contiguous()?,
        })
    }

    /// The f32 log-probabilities of the targets, by the same launch as [`fused`].
    pub fn forward(&self) -> Result<Tensor> {
        self.logits.apply_op2_no_bwd(&self.targets, &self.op)
    }

    /// The logits' gradient for `dlogp` (the gradient of [`Self::forward`]'s output) after
    /// [`Self::forward`]: what candle's autograd calls.
    pub fn backward(&self, logp: &Tensor, dlogp: &Tensor) -> Result<Tensor> {
        if dlogp.dims() != self.targets.dims() {
            candle_core::bail!(
                "logprobs backward: gradient {:?} for targets {:?}",
                dlogp.dims(),
                self.targets.dims()
            );
        }
        match self.op.bwd(&self.logits, &self.targets, logp, dlogp)? {
            (Some(dx), _) => Ok(dx),
            (None, _) => candle_core::bail!("logprobs backward: no gradient"),
        }
    }
}

struct Logprobs {
    /// `[rows]` f32 log-sum-exp of each row, written by the forward for the backward.
    lse: Mutex<Option<Tensor>>,
    /// Whether the output is `[2, ...]`, the log-probabilities then the entropies.
    entropy: bool,
    shaping: Shaping,
}

impl Logprobs {
    fn new(entropy: bool, shaping: Shaping) -> Self {
        Self {
            lse: Mutex::new(None),
            entropy,
            shaping,
        }
    }

    /// The output's shape for logits of layout `lx`.
    fn out_shape(&self, lx: &Layout) -> Shape {
        let lead = &lx.dims()[..lx.dims().len() - 1];
        match self.entropy {
            true => Shape::from([&[2], lead].concat()),
            false => Shape::from(lead),
        }
    }

    fn save(&self, lse: Tensor) {
        *self.lse.lock().unwrap_or_else(PoisonError::into_inner) = Some(lse);
    }
}

/// Per row: the target's log-probability (NaN for a target outside the vocabulary), then with
/// `entropy` each row's entropy `log s - u / s` (`u = sum exp(x - m) (x - m)`), and the
/// log-sum-exp, in f32 as the kernel computes them, all of the shaped logits.
fn cpu_forward<T: WithDType>(
    x: &[T],
    t: &[u32],
    (vocab, shaping): (usize, Shaping),
    entropy: bool,
) -> (Vec<f32>, Vec<f32>) {
    let mut logp = Vec::with_capacity(t.len() * if entropy { 2 } else { 1 });
    let mut ents = Vec::new();
    let mut lses = Vec::with_capacity(t.len());
    for (row, &tgt) in x.chunks(vocab.max(1)).zip(t) {
        let xf: Vec<f32> = row
            .iter()
            .map(|v| shaping.apply(v.to_f64() as f32))
            .collect();
        let m = xf.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let (mut s, mut u) = (0f32, 0f32);
        for v in &xf {
            let (d, e) = (v - m, (v - m).exp());
            s += e;
            u += if e > 0.0 { e * d } else { 0.0 };
        }
        let lse = m + s.ln();
        lses.push(lse);
        logp.push(match xf.get(tgt as usize) {
            Some(v) => v - lse,
            None => f32::NAN,
        });
        ents.push(s.ln() - u / s);
    }
    if entropy {
        logp.extend(ents);
    }
    (logp, lses)
}

/// What the backward reads per row besides the logits and targets: the upstream gradient of
/// the log-probabilities, and where there is one that of the entropies with the entropies.
struct RowGrads<'a> {
    g: &'a [f32],
    entropy: Option<(&'a [f32], &'a [f32])>,
    lse: &'a [f32],
    shaping: Shaping,
}

fn cpu_backward<T: WithDType>(x: &[T], t: &[u32], r: &RowGrads, vocab: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    for (i, (row, &tgt)) in x.chunks(vocab.max(1)).zip(t).enumerate() {
        let (g, lse) = (r.g[i], r.lse[i]);
        let (gh, h) = r.entropy.map_or((0.0, 0.0), |(gh, h)| (gh[i], h[i]));
        for (j, v) in row.iter().enumerate() {
            let d = match (g, gh) {
                (0.0, 0.0) => 0.0,
                _ => {
                    let x = v.to_f64() as f32;
                    let z = r.shaping.apply(x) - lse;
                    let p = z.exp();
                    let mut d = g * (f32::from(u8::from(j == tgt as usize)) - p);
                    if gh != 0.0 && p > 0.0 {
                        d -= gh * p * (z + h);
                    }
                    d * r.shaping.slope(x)
                }
            };
            out.push(T::from_f64(d as f64));
        }
    }
    out
}

impl CustomOp2 for Logprobs {
    fn name(&self) -> &'static str {
        "temper-logprobs"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        st: &CpuStorage,
        lt: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = rows_cols(lx)?;
        let t = slice::<u32>(st, lt)?;
        let (e, vs) = (self.entropy, (vocab, self.shaping));
        let (logp, lse) = match sx.dtype() {
            DType::F32 => cpu_forward(slice::<f32>(sx, lx)?, t, vs, e),
            DType::BF16 => cpu_forward(slice::<half::bf16>(sx, lx)?, t, vs, e),
            DType::F16 => cpu_forward(slice::<half::f16>(sx, lx)?, t, vs, e),
            dt => candle_core::bail!("logprobs: unsupported dtype {dt:?}"),
        };
        self.save(Tensor::from_vec(lse, rows, &Device::Cpu)?);
        Ok((CpuStorage::F32(logp), self.out_shape(lx)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        st: &candle_core::CudaStorage,
        lt: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let o = super::cuda::logprobs::Outputs {
            entropy: self.entropy,
            shaping: self.shaping,
        };
        let (logp, lse) = super::cuda::logprobs::forward(sx, lx, st, lt, o)?;
        self.save(lse);
        Ok((logp, self.out_shape(lx)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        spans::timed(KernelOp::Logprobs, Pass::Backward, logits.device(), || {
            let saved = self
                .lse
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            // candle runs the forward of every op it differentiates, so the lse is always there.
            let Some(lse) = saved else {
                candle_core::bail!("logprobs: backward before its forward");
            };
            let g = grad.to_dtype(DType::F32)?.contiguous()?;
            // The entropies are the output's second half.
            let entropy = match self.entropy {
                true => Some(res.get(1)?.contiguous()?),
                false => None,
            };
            let bwd = LogprobsBwd {
                lse,
                entropy,
                shaping: self.shaping,
            };
            let dx = logits.apply_op3_no_bwd(targets, &g, &bwd)?;
            Ok((Some(dx), None))
        })
    }
}

/// Backward of [`Logprobs`]: `(logits, targets, dlogp) -> dlogits`, from the saved lse; with
/// the forward's `entropy`, the upstream gradient is `[2, ...]`, that of the entropies second.
struct LogprobsBwd {
    lse: Tensor,
    entropy: Option<Tensor>,
    shaping: Shaping,
}

impl CustomOp3 for LogprobsBwd {
    fn name(&self) -> &'static str {
        "temper-logprobs-bwd"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        st: &CpuStorage,
        lt: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = rows_cols(lx)?;
        let t = slice::<u32>(st, lt)?;
        let g = slice::<f32>(sg, lg)?;
        let host = |x: &Tensor| x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        let lse = host(&self.lse)?;
        let h = self.entropy.as_ref().map(host).transpose()?;
        let outputs = if h.is_some() { 2 } else { 1 };
        if g.len() != outputs * rows {
            candle_core::bail!("logprobs backward: gradient of {} for {rows} rows", g.len());
        }
        let r = RowGrads {
            g: &g[..rows],
            entropy: h.as_deref().map(|h| (&g[rows..], h)),
            lse: &lse,
            shaping: self.shaping,
        };
        let out = match sx.dtype() {
            DType::F32 => CpuStorage::F32(cpu_backward(slice(sx, lx)?, t, &r, vocab)),
            DType::BF16 => CpuStorage::BF16(cpu_backward(slice(sx, lx)?, t, &r, vocab)),
            DType::F16 => CpuStorage::F16(cpu_backward(slice(sx, lx)?, t, &r, vocab)),
            dt => candle_core::bail!("logprobs backward: unsupported dtype {dt:?}"),
        };
        Ok((out, lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        st: &candle_core::CudaStorage,
        lt: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let up = super::cuda::logprobs::Upstream {
            grad: (sg, lg),
            lse: &self.lse,
            entropy: self.entropy.as_ref(),
            shaping: self.shaping,
        };
        let dx = super::cuda::logprobs::backward((sx, lx), (st, lt), &up)?;
        Ok((dx, lx.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::host::testing::max_abs;
    use super::*;

    fn inputs(dtype: DType) -> (Tensor, Tensor) {
        let dev = Device::Cpu;
        // Awkward: 3 x 5 rows of 37 logits, large and small values.
        let x: Vec<f32> = (0..3 * 5 * 37)
            .map(|i| ((i * 7919 % 101) as f32 - 50.0) * 0.37)
            .collect();
        let logits = Tensor::from_vec(x, (3, 5, 37), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let t: Vec<u32> = (0..15).map(|i| (i * 11 % 37) as u32).collect();
        (logits, Tensor::from_vec(t, (3, 5), &dev).unwrap())
    }

    type Pair = (Tensor, Tensor);

    /// `pair`'s log-probabilities and entropies of `var`, and the gradient of a mix of them with
    /// uneven weights, zero for the log-probabilities where the entropies' is not and the other
    /// way round.
    fn pair_and_gradient(
        var: &candle_core::Var,
        t: &Tensor,
        pair: &dyn Fn(&Tensor, &Tensor) -> Result<Pair>,
    ) -> (Tensor, Tensor, Tensor) {
        let weights = |cycle: [f32; 3]| {
            let w: Vec<f32> = (0..15).map(|i| cycle[i % 3]).collect();
            Tensor::from_vec(w, (3, 5), &Device::Cpu).unwrap()
        };
        let (w_lp, w_h) = (weights([0.0, 1.0, -0.5]), weights([0.7, 0.0, -1.3]));
        let (lp, h) = pair(var.as_tensor(), t).unwrap();
        let loss = ((&lp * &w_lp).unwrap().sum_all().unwrap()
            + (&h * &w_h).unwrap().sum_all().unwrap())
        .unwrap();
        let g = loss.backward().unwrap();
        let dx = g.get(var.as_tensor()).unwrap();
        (lp, h, dx.to_dtype(DType::F32).unwrap())
    }

    /// The fused op's forward and its gradient (driven by an uneven upstream gradient, zeros
    /// included) equal the reference composite's under candle's autograd.
    #[test]
    fn fused_op_matches_the_reference_and_its_gradient() {
        for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 1e-2)] {
            let (logits, t) = inputs(dtype);
            let var = candle_core::Var::from_tensor(&logits).unwrap();
            let w: Vec<f32> = (0..15).map(|i| [0.0, 1.0, -0.5][i % 3]).collect();
            let w = Tensor::from_vec(w, (3, 5), &Device::Cpu).unwrap();
            let run = |f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>| {
                let lp = f(var.as_tensor(), &t).unwrap();
                let loss = (&lp * &w).unwrap().sum_all().unwrap();
                let g = loss.backward().unwrap();
                let dx = g
                    .get(var.as_tensor())
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                (lp, dx)
            };
            let (lp_f, dx_f) = run(&fused);
            let (lp_r, dx_r) = run(&reference);
            assert_eq!(lp_f.dims(), &[3, 5]);
            assert_eq!(lp_f.dtype(), DType::F32);
            let diff = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap());
            assert!(diff(&lp_f, &lp_r) < tol * 50.0, "{dtype:?} logp");
            assert!(diff(&dx_f, &dx_r) < tol, "{dtype:?} dlogits");
        }
    }

    /// With the entropy, the fused op's two outputs and the gradient of any mix of them equal
    /// the reference composite's: upstream gradients uneven, zero for the log-probabilities
    /// where the entropies' is not and the other way round, rows offset far from zero.
    #[test]
    fn fused_entropy_matches_the_reference_and_its_gradient() {
        for (dtype, tol) in [(DType::F32, 2e-5f32), (DType::BF16, 1e-2)] {
            let (logits, t) = inputs(dtype);
            let logits = (logits + 40.0).unwrap();
            let var = candle_core::Var::from_tensor(&logits).unwrap();
            let run = |f: &dyn Fn(&Tensor, &Tensor) -> Result<Pair>| pair_and_gradient(&var, &t, f);
            let reference_pair =
                |x: &Tensor, t: &Tensor| Ok((reference(x, t)?, reference_entropy(x)?));
            let (lp_f, h_f, dx_f) = run(&fused_entropy);
            let (lp_r, h_r, dx_r) = run(&reference_pair);
            assert_eq!((lp_f.dims(), h_f.dims()), (&[3, 5][..], &[3, 5][..]));
            let diff = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap());
            assert!(diff(&lp_f, &lp_r) < tol * 50.0, "{dtype:?} logp");
            assert!(diff(&h_f, &h_r) < tol * 50.0, "{dtype:?} entropy");
            assert!(diff(&dx_f, &dx_r) < tol, "{dtype:?} dlogits");
            // A control: the entropies' term is a sizeable part of that gradient.
            let (_, _, dx_lp) = run(&|x, t| Ok((fused(x, t)?, reference_entropy(x)?.detach())));
            let off = diff(&dx_lp, &dx_r);
            assert!(
                off > 1e-2 && off > 10.0 * diff(&dx_f, &dx_r),
                "{dtype:?}: no entropy term ({off})"
            );
        }
        // Uniform logits: the entropy is log V.
        let (lp, h) = fused_entropy(
            &Tensor::zeros((2, 7), DType::F32, &Device::Cpu).unwrap(),
            &Tensor::new(&[1u32, 6], &Device::Cpu).unwrap(),
        )
        .unwrap();
        for x in h.to_vec1::<f32>().unwrap() {
            assert!((x - 7f32.ln()).abs() < 1e-6);
        }
        assert!((lp.to_vec1::<f32>().unwrap()[0] + 7f32.ln()).abs() < 1e-6);
    }

    /// Over shaped logits (a cap that bites: the logits reach 18, the cap is 5; a temperature),
    /// the fused op's log-probabilities, entropies and the gradient of a mix of them equal the
    /// reference composite's over `Shaping::reference`, and the shaping changes them.
    #[test]
    fn shaped_fused_op_matches_the_reference_and_its_gradient() {
        let shapings = [
            Shaping {
                softcap: Some(5.0),
                temperature: 0.7,
            },
            Shaping {
                softcap: Some(30.0),
                temperature: 1.0,
            },
            Shaping {
                softcap: None,
                temperature: 1.6,
            },
        ];
        for shaping in shapings {
            for (dtype, tol) in [(DType::F32, 2e-5f32), (DType::BF16, 1e-2)] {
                let (logits, t) = inputs(dtype);
                let var = candle_core::Var::from_tensor(&logits).unwrap();
                let (lp_f, h_f, dx_f) =
                    pair_and_gradient(&var, &t, &|x, t| fused_pair(x, t, shaping));
                let (lp_r, h_r, dx_r) = pair_and_gradient(&var, &t, &|x, t| {
                    let x = shaping.reference(x)?;
                    Ok((reference(&x, t)?, reference_entropy(&x)?))
                });
                let diff = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap());
                let at = format!("{dtype:?} {shaping:?}");
                assert!(diff(&lp_f, &lp_r) < tol * 50.0, "{at} logp");
                assert!(diff(&h_f, &h_r) < tol * 50.0, "{at} entropy");
                assert!(diff(&dx_f, &dx_r) < tol, "{at} dlogits");
                // The single-output op gives the same log-probabilities.
                let single = fused_shaped(var.as_tensor(), &t, shaping).unwrap();
                assert_eq!(diff(&single, &lp_f), 0.0, "{at}");
                // A control: unshaped, they differ.
                let plain = fused(var.as_tensor(), &t).unwrap();
                assert!(
                    diff(&plain, &lp_f) > 0.1,
                    "{at}: the shaping changed nothing"
                );
            }
        }
    }

    /// The LM and loss heads together over a shaping, by each path the CPU takes (the
    /// temperature folded into the hidden states where there is no cap, the logits shaped
    /// where there is one), equal the shaped reference over the GEMM's logits.
    #[test]
    fn the_head_shapes_its_logits() {
        let dev = Device::Cpu;
        let hidden = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev).unwrap();
        let w = Tensor::randn(0f32, 3.0, (11, 8), &dev).unwrap();
        let t = Tensor::new(&[[1u32, 4, 10], [0, 7, 3]], &dev).unwrap();
        let logits = hidden.broadcast_matmul(&w.t().unwrap()).unwrap();
        for softcap in [None, Some(4.0)] {
            let shaping = Shaping {
                softcap,
                temperature: 0.6,
            };
            let head = Head { w: &w, shaping };
            let c = KernelChoice::Custom;
            let (lp, h) = head_logprobs_entropy(&hidden, head, &t, c, c).unwrap();
            let x = shaping.reference(&logits).unwrap();
            let diff = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap());
            assert!(diff(&lp, &reference(&x, &t).unwrap()) < 1e-4, "{shaping:?}");
            assert!(
                diff(&h, &reference_entropy(&x).unwrap()) < 1e-4,
                "{shaping:?}"
            );
            let alone = head_logprobs(&hidden, head, &t, c, c).unwrap();
            assert!(diff(&alone, &lp) < 1e-6, "{shaping:?}");
        }
    }

    /// The direct backward is the gradient autograd gives (the same op, without a graph),
    /// with autograd seeded through `logp * g` as benches/train_ops.rs drives the reference.
    #[test]
    fn direct_backward_is_autograds_gradient() {
        let (logits, t) = inputs(DType::F32);
        let var = candle_core::Var::from_tensor(&logits).unwrap();
        let g: Vec<f32> = (0..15).map(|i| [0.0, 1.0, -0.5][i % 3]).collect();
        let g = Tensor::from_vec(g, (3, 5), &Device::Cpu).unwrap();
        let lp = fused(var.as_tensor(), &t).unwrap();
        let grads = (&lp * &g).unwrap().backward().unwrap();
        let direct = LogprobsDirect::new(var.as_tensor(), &t).unwrap();
        let lpd = direct.forward().unwrap();
        let dx = direct.backward(&lpd, &g).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&lpd), v(&lp));
        assert_eq!(v(&dx), v(grads.get(var.as_tensor()).unwrap()));
    }

    #[test]
    fn a_target_outside_the_vocabulary_gives_nan() {
        let logits = Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap();
        let t = Tensor::new(&[9u32], &Device::Cpu).unwrap();
        let lp = fused(&logits, &t).unwrap().to_vec1::<f32>().unwrap();
        assert!(lp[0].is_nan());
        let ok = fused(&logits, &Tensor::new(&[2u32], &Device::Cpu).unwrap()).unwrap();
        assert!((ok.to_vec1::<f32>().unwrap()[0] + 4f32.ln()).abs() < 1e-6);
    }
}
