//! A segment: the ops of a closure recorded on a tape and joined to candle's graph as one
//! node, whose backward runs the tape's.

use std::cell::RefCell;
use std::sync::{Mutex, Once, PoisonError};

use anyhow::bail;
use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, TensorId};

use super::{ParamGrads, Tape, ACTIVE, LAST};

thread_local! {
    /// The parameters' gradients from this thread's segment backwards, until [`backward`]
    /// hands them to candle's store.
    static PENDING: RefCell<ParamGrads> = const { RefCell::new(Vec::new()) };
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
    if super::recording() {
        return f(x);
    }
    let xd = x.detach();
    ACTIVE.with(|a| *a.borrow_mut() = Some(Tape::new(xd.id())));
    let y = f(&xd);
    let tape = ACTIVE
        .with(|a| a.borrow_mut().take())
        .expect("the segment's tape is set until it ends");
    let y = y?;
    LAST.with(|l| *l.borrow_mut() = Some(tape.stats()));
    if let Some(what) = tape.foreign.clone() {
        warn_foreign(&what);
        drop(tape);
        return f(x);
    }
    if y.id() == xd.id() {
        return Ok(x.clone());
    }
    if !tape.produced.contains(&y.id()) {
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
    let src = match y.is_contiguous() && y.layout().start_offset() == 0 {
        true => y.clone(),
        false => y.copy()?,
    };
    let join = Join {
        tape: Mutex::new(Some(tape)),
        root: y.id(),
        through_input,
    };
    Ok(anchor.apply_op2(&src, join)?)
}

fn warn_foreign(what: &str) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        eprintln!(
            "warning: the block tape is off for this run's forwards: an op read a {what} tensor \
             that carries candle's graph without being a parameter (a weight cast in the \
             graph: [train] compute_copies = false?)"
        )
    });
}

/// `loss.backward()`, with the parameters' gradients from the segments it ran through added
/// to candle's store: what every training loss calls.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    PENDING.with(|p| p.borrow_mut().clear());
    let mut grads = loss.backward()?;
    for (p, g) in PENDING.with(|p| std::mem::take(&mut *p.borrow_mut())) {
        let g = match grads.remove(&p) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        grads.insert(&p, g);
    }
    Ok(grads)
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
        Ok((s.try_clone(l)?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((s.try_clone(l)?, l.shape().clone()))
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
        let (dx, params) = tape.backward(self.root, grad.clone())?;
        PENDING.with(|p| p.borrow_mut().extend(params));
        Ok((dx.filter(|_| self.through_input), None))
    }
}
