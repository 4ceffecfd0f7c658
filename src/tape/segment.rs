//! A segment: the ops of a closure recorded on a tape and joined to candle's graph as one
//! node, whose backward runs the tape's.

use std::cell::{Cell, RefCell};
use std::sync::{Mutex, Once, PoisonError};

use anyhow::bail;
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, TensorId};

use super::{ParamGrads, Restore, Tape, ACTIVE, LAST};

thread_local! {
    /// The parameters' gradients from this thread's segment backwards, until [`backward`]
    /// hands them to candle's store.
    static PENDING: RefCell<ParamGrads> = const { RefCell::new(Vec::new()) };
    /// Set while a segment that met a foreign input runs again without the tape: the
    /// segments nested in it (the blocks' own) would only meet it again.
    static DECLINED: Cell<bool> = const { Cell::new(false) };
}

/// Clears [`DECLINED`] when dropped (a panic included).
struct Declined;

impl Drop for Declined {
    fn drop(&mut self) {
        DECLINED.with(|d| d.set(false));
    }
}

/// `f(x)` with every op in it recorded on a tape (see the module docs), as one node of
/// candle's graph between `x` and the result. Inside another segment, `f(x)` as it is. Where
/// an op's input carries candle's graph without being a parameter (a weight cast in the
/// graph rather than read as a compute copy), the tape cannot carry that gradient: `f` runs
/// again without it, once warned.
pub fn segment(
    x: &Tensor,
    f: impl Fn(&Tensor) -> anyhow::Result<Tensor>,
) -> anyhow::Result<Tensor> {
    if super::recording() || DECLINED.with(Cell::get) {
        return f(x);
    }
    let xd = x.detach();
    let inputs = x.track_op().then(|| xd.id()).into_iter().collect();
    ACTIVE.with(|a| *a.borrow_mut() = Some(Tape::new(inputs)));
    // A panic in `f` leaves the thread without a tape.
    let cleared = Restore(None);
    let y = f(&xd);
    let tape = ACTIVE.with(|a| a.borrow_mut().take());
    drop(cleared);
    let (y, tape) = (y?, tape.expect("the segment's tape is set until it ends"));
    if let Some(what) = tape.foreign.clone() {
        warn_foreign(&what);
        drop(tape);
        DECLINED.with(|d| d.set(true));
        let _clear = Declined;
        return f(x);
    }
    LAST.with(|l| *l.borrow_mut() = Some(tape.stats()));
    if y.id() == xd.id() {
        return Ok(x.clone());
    }
    if !tape.produced.contains_key(&y.id()) {
        bail!("tape: the segment's output was not made by a recorded op");
    }
    let through_input = x.track_op();
    let anchor = match through_input {
        true => Some(x.clone()),
        false => tape.first_param(),
    };
    // Nothing in the segment wants a gradient (an evaluation with frozen weights).
    let Some(anchor) = anchor else {
        return Ok(y);
    };
    let join = Join {
        tape: Mutex::new(Some(tape)),
        root: y.id(),
        through_input,
    };
    Ok(anchor.apply_op2(&y, join)?)
}

fn warn_foreign(what: &str) {
    // Before the Once is spent: a rank thread that says nothing must not use up rank 0's line.
    if crate::console::follower() {
        return;
    }
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        errln!(
            "warning: the tape is off for this run's forwards: an op read a {what} tensor \
             that carries candle's graph without being a parameter (a weight cast in the \
             graph: [train] compute_copies = false?)"
        )
    });
}

/// Parameters' gradients for [`backward`] to add to candle's store.
pub(super) fn hand_to_candle(params: ParamGrads) {
    PENDING.with(|p| p.borrow_mut().extend(params));
}

/// `loss.backward()`, with the parameters' gradients from the segments it ran through added
/// to candle's store: what every training loss calls.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    PENDING.with(|p| p.borrow_mut().clear());
    let mut grads = loss.backward()?;
    for (p, g) in PENDING.with(|p| std::mem::take(&mut *p.borrow_mut())) {
        let g = match grads.remove(&p) {
            Some(prev) => super::sum_grads(&prev, &g)?,
            None => g,
        };
        grads.insert(&p, g);
    }
    Ok(grads)
}

/// The elements `l` picks out of `s`, in a buffer of their own (`y` may be a view at an
/// offset into a buffer it shares, as the fused add and norm's outputs are).
fn copied<S>(s: &S, l: &Layout) -> Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    let shape = l.shape().clone();
    // SAFETY: the strided copy below writes every element.
    let mut out = unsafe { s.device().alloc_uninit(&shape, s.dtype())? };
    s.copy_strided_src(&mut out, 0, l)?;
    Ok((out, shape))
}

/// The segment's node in candle's graph: `(anchor, y) -> y` copied, its backward the tape's.
/// The anchor is the segment's input, or where that carries no graph, a parameter the
/// segment read (so candle still walks into the node).
struct Join {
    tape: Mutex<Option<Tape>>,
    root: TensorId,
    through_input: bool,
}

impl CustomOp2 for Join {
    fn name(&self) -> &'static str {
        "temper-tape-segment"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        s: &CpuStorage,
        l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copied(s, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        copied(s, l)
    }

    fn bwd(
        &self,
        _anchor: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let tape = self
            .tape
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(tape) = tape else {
            candle_core::bail!("tape: a segment's backward ran twice (its graph was walked again)");
        };
        let (dxs, params) = tape.backward(vec![(self.root, grad.clone())])?;
        hand_to_candle(params);
        let dx = dxs.into_iter().next().flatten();
        Ok((dx.filter(|_| self.through_input), None))
    }
}
