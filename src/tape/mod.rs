//! Our own reverse-mode tape for the model's forward, from the token ids to the per-token
//! log-probabilities.
//!
//! candle-core's backward gives every node of its graph a zero-filled gradient buffer and adds
//! each incoming gradient into it, and keeps every node's output until the whole backward
//! ends: a memset and an add of each activation-sized tensor per step, about 22 of them per
//! GPT-2 block (docs/ARCHITECTURE.md). Inside a [`segment`] each op runs on detached tensors
//! and is recorded here with its backward instead. The backward hands a gradient on as it is
//! where a tensor has one consumer, adds only where it has several (the residual stream, a
//! tied embedding), and drops each op's saved tensors as soon as its backward has run. A
//! training forward (`Transformer::target_logprobs`) is one segment: the embedding, the
//! blocks and the loss head; other forwards put only the blocks on it. The segment is one node
//! of candle's graph, so every stage's loss keeps candle's autograd; the parameters'
//! gradients reach candle's `GradStore` through [`backward`].
//!
//! An op joins the tape through [`op1`], [`op2`], [`op3`] (a custom op and its own backward),
//! [`op1_with`], [`op2_with`] and [`op3_with`] (a custom op with a backward of its own that
//! keeps less, or must know which inputs want a gradient, as a GEMM's does), [`add`],
//! [`record`], [`record_owned`], [`record_into`], [`record_onto`] and [`record_multi`] (an op with a
//! hand-written backward, of one output or several; [`record_add_norm`] for a residual add
//! fused into a norm), or [`island`] (a composite of candle ops: the reference paths,
//! differentiated by candle's autograd on copies of its inputs). Outside a segment each of
//! these is the plain candle call it replaces.

mod recompute;
mod segment;

use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::HashMap;

use candle_core::{CustomOp1, CustomOp2, CustomOp3, Result, Tensor, TensorId, Var};

pub use recompute::{recomputed, Recomputable};
pub use segment::{backward, segment};

/// One gradient per input of a recorded op, `None` where it has none.
pub type Grads = Vec<Option<Tensor>>;

/// `(parameter, gradient)` pairs, for candle's store.
type ParamGrads = Vec<(Tensor, Tensor)>;

/// Given the gradient of each output (`None` where nothing downstream read it), which inputs
/// want one, and, for an op that can add into it ([`Record::into`]), the gradient its input
/// already has: a gradient per input (that input's including the one handed in).
type Backward =
    Box<dyn FnOnce(Vec<Option<Tensor>>, &[bool], Option<Tensor>) -> Result<Grads> + Send>;

/// Where an input of a recorded op gets its gradient.
enum Slot {
    /// Made inside the segment from something that wants a gradient (or its input, where
    /// that carries candle's graph): the gradient stays on the tape.
    Inner(TensorId),
    /// A variable of candle's (a weight): the gradient goes to candle's store.
    Param(Tensor),
    /// Needs no gradient: rotary tables, masks, frozen weights, and what the segment made
    /// from nothing but those (a frozen base's activations under LoRA, up to the first
    /// adapter).
    Constant,
}

impl Slot {
    fn wants(&self) -> bool {
        !matches!(self, Slot::Constant)
    }

    /// The id its gradient is held under on the tape, `None` for a constant.
    fn id(&self) -> Option<TensorId> {
        match self {
            Slot::Inner(id) => Some(*id),
            Slot::Param(p) => Some(p.id()),
            Slot::Constant => None,
        }
    }
}

/// How a backward takes an input's gradient so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fold {
    /// It adds its own into the buffer in place (a GEMM's `dx`, written with beta = 1), so it
    /// is handed only a buffer the tape holds alone.
    InPlace,
    /// It reads it and returns the sum in a buffer of its own (a norm's backward adds it in
    /// the pass that writes dx), so it may be handed one that another input shares.
    Read,
}

struct Record {
    inputs: Vec<Slot>,
    outputs: Vec<TensorId>,
    backward: Backward,
    /// The input whose gradient so far the backward can add its own into, and how: the add
    /// of a tensor read by several ops costs no pass of its own.
    into: Option<(usize, Fold)>,
    /// Whether the gradients the backward returns are buffers of their own, which nothing
    /// else holds: only those are handed to a later op to add into in place.
    fresh: bool,
}

/// A gradient held on the tape, and whether the tape holds its buffer alone.
struct Held {
    grad: Tensor,
    own: bool,
}

pub(crate) struct Tape {
    /// The segment's inputs, detached, that want a gradient.
    inputs: Vec<TensorId>,
    /// What the recorded ops made, and whether each wants a gradient (some input of its op
    /// does).
    produced: HashMap<TensorId, bool>,
    records: Vec<Record>,
    /// The first input that carried candle's graph without being a variable (a weight cast
    /// in the graph): the tape cannot carry its gradient, so the segment runs without it.
    foreign: Option<String>,
    /// Bytes of the recorded ops' outputs.
    output_bytes: u64,
}

/// The size of a segment's recording, for the profiler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentStats {
    /// Ops recorded.
    pub ops: usize,
    /// Bytes of their outputs: what the tape can hold until each op's backward has run, at
    /// most (some are freed early). Islands' internals and the copies of their inputs are
    /// not counted.
    pub output_bytes: u64,
}

thread_local! {
    static ACTIVE: RefCell<Option<Tape>> = const { RefCell::new(None) };
    static LAST: RefCell<Option<SegmentStats>> = const { RefCell::new(None) };
}

/// The size of the latest segment this thread recorded.
pub fn last_segment() -> Option<SegmentStats> {
    LAST.with(|l| *l.borrow())
}

/// Whether a segment is recording on this thread.
pub fn recording() -> bool {
    ACTIVE.with(|a| a.borrow().is_some())
}

/// `t` as a recorded op's forward reads it: detached inside a segment (the op goes on the
/// tape, not into candle's graph), `t` itself outside.
pub fn arg(t: &Tensor) -> Tensor {
    match recording() {
        true => t.detach(),
        false => t.clone(),
    }
}

impl Tape {
    fn new(inputs: Vec<TensorId>) -> Self {
        Self {
            inputs,
            produced: HashMap::new(),
            records: Vec::new(),
            foreign: None,
            output_bytes: 0,
        }
    }

    fn stats(&self) -> SegmentStats {
        SegmentStats {
            ops: self.records.len(),
            output_bytes: self.output_bytes,
        }
    }

    fn slot(&mut self, t: &Tensor) -> Slot {
        let id = t.id();
        if self.inputs.contains(&id) || self.produced.get(&id) == Some(&true) {
            Slot::Inner(id)
        } else if self.produced.contains_key(&id) {
            Slot::Constant
        } else if t.is_variable() {
            Slot::Param(t.clone())
        } else if t.track_op() {
            self.foreign
                .get_or_insert_with(|| format!("{:?} {:?}", t.dtype(), t.dims()));
            Slot::Constant
        } else {
            Slot::Constant
        }
    }

    /// The first parameter any op read: what the segment's node hangs on in candle's graph
    /// when its input carries no graph (a frozen embedding under LoRA).
    fn first_param(&self) -> Option<Tensor> {
        self.records.iter().find_map(|r| {
            r.inputs.iter().find_map(|s| match s {
                Slot::Param(p) => Some(p.clone()),
                _ => None,
            })
        })
    }

    /// Runs the recorded backwards in reverse order from the gradients of the `roots` (outputs
    /// of recorded ops): the gradients of the inputs (in [`Tape::new`]'s order; `None` where
    /// none reached one), and `(parameter, gradient)` pairs, one per parameter however many
    /// ops read it.
    fn backward(mut self, roots: Vec<(TensorId, Tensor)>) -> Result<(Grads, ParamGrads)> {
        // Gradients of what the segment made and of the parameters alike, by id: a parameter
        // read by several ops (a tied embedding: the lookup and the LM head) gets one
        // gradient, added into in place as an activation's is.
        let mut grads: HashMap<TensorId, Held> = HashMap::new();
        for (root, grad) in roots {
            let grad = match grads.remove(&root) {
                Some(h) => sum_grads(&h.grad, &grad)?,
                None => grad,
            };
            grads.insert(root, Held { grad, own: false });
        }
        let mut params: Vec<Tensor> = Vec::new();
        while let Some(rec) = self.records.pop() {
            let g: Vec<Option<Tensor>> = rec
                .outputs
                .iter()
                .map(|o| grads.remove(o).map(|h| h.grad))
                .collect();
            // Outputs nothing downstream read have no gradient, and their op none to give.
            if g.iter().all(Option::is_none) {
                continue;
            }
            let wants: Vec<bool> = rec.inputs.iter().map(Slot::wants).collect();
            // The gradient so far of the input the op can add into, where the op reads that
            // input only once and, to add in place, the tape holds its buffer alone.
            let acc = rec.into.and_then(|(i, fold)| {
                let id = rec.inputs.get(i)?.id()?;
                let once = rec.inputs.iter().filter(|s| s.id() == Some(id)).count() == 1;
                let held = grads.get(&id)?;
                let fits = match fold {
                    Fold::InPlace => held.own,
                    Fold::Read => true,
                };
                match once && fits {
                    true => grads.remove(&id).map(|h| (i, h.grad)),
                    false => None,
                }
            });
            let handed = acc.as_ref().map(|(i, _)| *i);
            let got = (rec.backward)(g, &wants, acc.map(|(_, t)| t))?;
            if handed.and_then(|i| got.get(i)).is_some_and(Option::is_none) {
                candle_core::bail!("tape: a backward dropped the gradient it was to add into");
            }
            if got.len() != rec.inputs.len() {
                candle_core::bail!(
                    "tape: a backward gave {} gradients for {} inputs",
                    got.len(),
                    rec.inputs.len()
                );
            }
            for (slot, g) in rec.inputs.into_iter().zip(got) {
                let Some(g) = g else { continue };
                let (id, g) = match slot {
                    Slot::Inner(id) => (id, g),
                    Slot::Param(p) => {
                        if !params.iter().any(|q| q.id() == p.id()) {
                            params.push(p.clone());
                        }
                        // A view into a larger buffer (a weight gradient packed beside dx)
                        // would keep that buffer alive until the optimizer step.
                        (p.id(), compact(g)?)
                    }
                    Slot::Constant => continue,
                };
                match grads.entry(id) {
                    Entry::Vacant(e) => {
                        e.insert(Held {
                            grad: g,
                            own: rec.fresh,
                        });
                    }
                    Entry::Occupied(mut e) => {
                        let sum = sum_grads(&e.get().grad, &g)?;
                        e.insert(Held {
                            grad: sum,
                            own: true,
                        });
                    }
                }
            }
        }
        let params = params
            .into_iter()
            .filter_map(|p| grads.remove(&p.id()).map(|h| (p, h.grad)))
            .collect();
        let dxs = self
            .inputs
            .iter()
            .map(|id| grads.remove(id).map(|h| h.grad))
            .collect();
        Ok((dxs, params))
    }
}

/// `a + b`, in f32 where the two differ in dtype: a compute copy read by two ops can get one
/// gradient in f32 (the embedding's) and one in its own dtype (a GEMM's).
pub(crate) fn sum_grads(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match a.dtype() == b.dtype() {
        true => a.add(b),
        false => a
            .to_dtype(candle_core::DType::F32)?
            .add(&b.to_dtype(candle_core::DType::F32)?),
    }
}

/// `g` in a buffer of its own where it is a view at an offset or with strides.
pub(crate) fn compact(g: Tensor) -> Result<Tensor> {
    match g.is_contiguous() && g.layout().start_offset() == 0 {
        true => Ok(g),
        false => g.force_contiguous(),
    }
}

/// Records that `output` was computed from `inputs` (each detached by [`arg`] before the
/// computation), with its backward: given the output's gradient and which inputs want one,
/// a gradient per input. Does nothing outside a segment.
pub fn record(
    inputs: &[&Tensor],
    output: &Tensor,
    backward: impl FnOnce(Tensor, &[bool]) -> Result<Grads> + Send + 'static,
) -> Result<()> {
    record_multi(inputs, &[output], move |mut g, wants| {
        match g.pop().flatten() {
            Some(g) => backward(g, wants),
            None => candle_core::bail!("tape: a backward ran without its output's gradient"),
        }
    })
}

/// [`record`] for an op with several outputs (views of one buffer, say): its backward gets
/// the gradient of each, `None` for one nothing downstream read (it runs when at least one
/// has a gradient).
pub fn record_multi(
    inputs: &[&Tensor],
    outputs: &[&Tensor],
    backward: impl FnOnce(Vec<Option<Tensor>>, &[bool]) -> Result<Grads> + Send + 'static,
) -> Result<()> {
    push(
        inputs,
        outputs,
        Box::new(move |g, wants, _| backward(g, wants)),
        None,
        false,
    )
}

/// [`record`] for an op whose backward returns buffers of its own (a GEMM's, say), which a
/// later op may add into in place.
pub fn record_owned(
    inputs: &[&Tensor],
    output: &Tensor,
    backward: impl FnOnce(Tensor, &[bool]) -> Result<Grads> + Send + 'static,
) -> Result<()> {
    let backward = one_output(move |g, wants, _| backward(g, wants));
    push(inputs, &[output], backward, None, true)
}

/// Records an op of one output whose backward returns buffers of its own and adds its
/// gradient of input `into` into the gradient that input already has, when handed one (see
/// `Record::into`): the handed gradient may be in another dtype than the one returned.
pub fn record_into(
    inputs: &[&Tensor],
    output: &Tensor,
    into: usize,
    backward: impl FnOnce(Tensor, &[bool], Option<Tensor>) -> Result<Grads> + Send + 'static,
) -> Result<()> {
    let fold = Some((into, Fold::InPlace));
    push(inputs, &[output], one_output(backward), fold, true)
}

/// [`record_into`] for a backward that only reads the gradient so far of input `onto` and
/// returns that input's whole gradient in a buffer of its own: it may be handed a gradient
/// another input shares (the residual add's).
pub fn record_onto(
    inputs: &[&Tensor],
    output: &Tensor,
    onto: usize,
    backward: impl FnOnce(Tensor, &[bool], Option<Tensor>) -> Result<Grads> + Send + 'static,
) -> Result<()> {
    let fold = Some((onto, Fold::Read));
    push(inputs, &[output], one_output(backward), fold, true)
}

/// A backward of one output as the tape calls it, that output's gradient unwrapped.
fn one_output(
    backward: impl FnOnce(Tensor, &[bool], Option<Tensor>) -> Result<Grads> + Send + 'static,
) -> Backward {
    Box::new(move |mut g, wants, acc| match g.pop().flatten() {
        Some(g) => backward(g, wants, acc),
        None => candle_core::bail!("tape: a backward ran without its output's gradient"),
    })
}

fn push(
    inputs: &[&Tensor],
    outputs: &[&Tensor],
    backward: Backward,
    into: Option<(usize, Fold)>,
    fresh: bool,
) -> Result<()> {
    ACTIVE.with(|a| {
        let mut a = a.borrow_mut();
        let Some(tape) = a.as_mut() else {
            return Ok(());
        };
        for o in outputs {
            if o.track_op() {
                candle_core::bail!(
                    "tape: a recorded op's output {:?} is in candle's graph (an input was not detached)",
                    o.dims()
                );
            }
        }
        let inputs: Vec<Slot> = inputs.iter().map(|t| tape.slot(t)).collect();
        let wants = inputs.iter().any(Slot::wants);
        for o in outputs {
            tape.produced.insert(o.id(), wants);
            tape.output_bytes += (o.elem_count() * o.dtype().size_in_bytes()) as u64;
        }
        tape.records.push(Record {
            inputs,
            outputs: outputs.iter().map(|o| o.id()).collect(),
            backward,
            into,
            fresh,
        });
        Ok(())
    })
}

/// Fails unless a residual `r` can be added to `x`: one shape and one dtype.
pub fn check_residual(x: &Tensor, r: &Tensor, what: &str) -> Result<()> {
    if r.shape() != x.shape() || r.dtype() != x.dtype() {
        candle_core::bail!(
            "{what}: residual {:?} {:?} for x {:?} {:?}",
            r.dims(),
            r.dtype(),
            x.dims(),
            x.dtype()
        );
    }
    Ok(())
}

/// Records a residual add fused into the norm after it: `both` (`[2, ...]`, computed from
/// `x`, `r` and the norm's `weights`) holds the norm of the sum `x + r`, then the sum (the
/// norm first, at the buffer's start, which the GEMMs that read it need aligned); returns
/// `(sum, norm)`. `grads(sum, dnorm, dsum)` gives the sum's whole gradient (the norm's dx and
/// the sum's own gradient, added in one pass) and one per weight; the sum's gradient is both
/// x's and r's.
pub fn record_add_norm(
    x: &Tensor,
    r: &Tensor,
    weights: &[&Tensor],
    both: &Tensor,
    grads: impl FnOnce(&Tensor, Tensor, Option<Tensor>) -> Result<(Tensor, Grads)> + Send + 'static,
) -> Result<(Tensor, Tensor)> {
    let (n, s) = (both.get(0)?, both.get(1)?);
    let sum = s.clone();
    let mut inputs = vec![x, r];
    inputs.extend_from_slice(weights);
    let count = inputs.len();
    record_multi(&inputs, &[&s, &n], move |mut g, _| {
        let (dnorm, dsum) = (g.pop().flatten(), g.pop().flatten());
        let mut out = match dnorm {
            Some(dn) => {
                let (d, dweights) = grads(&sum, dn, dsum)?;
                let mut out = vec![Some(d.clone()), Some(d)];
                out.extend(dweights);
                out
            }
            // Only the sum was read on: its gradient is both inputs'.
            None => vec![dsum.clone(), dsum],
        };
        out.resize(count, None);
        Ok(out)
    })?;
    Ok((s, n))
}

/// Whether none of `inputs` carries a gradient anywhere: no variable, and nothing computed
/// from one in candle's graph (generation's detached weights and their activations).
pub fn untracked(inputs: &[&Tensor]) -> bool {
    inputs.iter().all(|t| !t.track_op())
}

/// Which of `inputs` want a gradient on the current tape (all of them outside one).
pub fn wanted(inputs: &[&Tensor]) -> Vec<bool> {
    ACTIVE.with(|a| match a.borrow_mut().as_mut() {
        Some(tape) => inputs.iter().map(|t| tape.slot(t).wants()).collect(),
        None => vec![true; inputs.len()],
    })
}

/// Puts a tape back as this thread's when dropped, so that a panic inside a segment or an
/// island leaves the thread as it found it.
struct Restore(Option<Tape>);

impl Drop for Restore {
    fn drop(&mut self) {
        let tape = self.0.take();
        ACTIVE.with(|a| *a.borrow_mut() = tape);
    }
}

/// Runs `f` with this thread's tape set aside: the candle ops in it build candle's graph.
fn suspended<R>(f: impl FnOnce() -> R) -> R {
    let _restore = Restore(ACTIVE.with(|a| a.borrow_mut().take()));
    f()
}

/// `a + b`, the residual add: its backward hands the one gradient to both, without a copy.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !recording() {
        return a + b;
    }
    let y = (a.detach() + b.detach())?;
    record(&[a, b], &y, |g, _| Ok(vec![Some(g.clone()), Some(g)]))?;
    Ok(y)
}

/// A custom op of one input: `args` are `orig` as the op reads it (from [`arg`], made
/// contiguous or aligned as the op needs). Its backward is the op's own.
pub fn op1<C: CustomOp1 + Send + Sync + 'static>(
    orig: &Tensor,
    arg: Tensor,
    op: C,
) -> Result<Tensor> {
    if !recording() {
        return arg.apply_op1(op);
    }
    let y = arg.apply_op1_no_bwd(&op)?;
    let saved = y.clone();
    record(&[orig], &y, move |g, _| Ok(vec![op.bwd(&arg, &saved, &g)?]))?;
    Ok(y)
}

/// [`op1`] with a backward of its own, `(op, dy) -> dx`, that reads neither the input nor the
/// output: the tape keeps only the op (a copy or a mask needs nothing else).
pub fn op1_with<C, B>(orig: &Tensor, arg: Tensor, op: C, backward: B) -> Result<Tensor>
where
    C: CustomOp1 + Send + Sync + 'static,
    B: FnOnce(&C, Tensor) -> Result<Tensor> + Send + 'static,
{
    if !recording() {
        return arg.apply_op1(op);
    }
    let y = arg.apply_op1_no_bwd(&op)?;
    record(&[orig], &y, move |g, _| Ok(vec![Some(backward(&op, g)?)]))?;
    Ok(y)
}

/// A custom op of two inputs (see [`op1`]), with its own backward.
pub fn op2<C: CustomOp2 + Send + Sync + 'static>(
    orig: [&Tensor; 2],
    args: [Tensor; 2],
    op: C,
) -> Result<Tensor> {
    if !recording() {
        let [a, b] = args;
        return a.apply_op2(&b, op);
    }
    let y = args[0].apply_op2_no_bwd(&args[1], &op)?;
    let saved = y.clone();
    record(&orig, &y, move |g, _| {
        let (ga, gb) = op.bwd(&args[0], &args[1], &saved, &g)?;
        Ok(vec![ga, gb])
    })?;
    Ok(y)
}

/// [`op2`] with a backward of its own, `(op, args, dy, wants, acc)`, that does not read the
/// output: the tape does not keep it (a GEMM's output is often only its consumer's input,
/// and the consumer may not need it either). The backward returns buffers of its own, and
/// where `acc` is given (the first input's gradient so far, which the tape holds alone) the
/// first input's gradient it returns includes it: a GEMM adds into it in place.
pub fn op2_with<C, B>(orig: [&Tensor; 2], args: [Tensor; 2], op: C, backward: B) -> Result<Tensor>
where
    C: CustomOp2 + Send + Sync + 'static,
    B: FnOnce(&C, &[Tensor; 2], Tensor, &[bool], Option<Tensor>) -> Result<Grads> + Send + 'static,
{
    if !recording() {
        let [a, b] = args;
        return a.apply_op2(&b, op);
    }
    let y = args[0].apply_op2_no_bwd(&args[1], &op)?;
    record_into(&orig, &y, 0, move |g, wants, acc| {
        backward(&op, &args, g, wants, acc)
    })?;
    Ok(y)
}

/// A custom op of three inputs (see [`op1`]), with its own backward.
pub fn op3<C: CustomOp3 + Send + Sync + 'static>(
    orig: [&Tensor; 3],
    args: [Tensor; 3],
    op: C,
) -> Result<Tensor> {
    if !recording() {
        let [a, b, c] = args;
        return a.apply_op3(&b, &c, op);
    }
    let y = args[0].apply_op3_no_bwd(&args[1], &args[2], &op)?;
    let saved = y.clone();
    record(&orig, &y, move |g, _| {
        let (ga, gb, gc) = op.bwd(&args[0], &args[1], &args[2], &saved, &g)?;
        Ok(vec![ga, gb, gc])
    })?;
    Ok(y)
}

/// [`op3`] with a backward of its own that does not read the output and may add into the
/// first input's gradient so far (see [`op2_with`]).
pub fn op3_with<C, B>(orig: [&Tensor; 3], args: [Tensor; 3], op: C, backward: B) -> Result<Tensor>
where
    C: CustomOp3 + Send + Sync + 'static,
    B: FnOnce(&C, &[Tensor; 3], Tensor, &[bool], Option<Tensor>) -> Result<Grads> + Send + 'static,
{
    if !recording() {
        let [a, b, c] = args;
        return a.apply_op3(&b, &c, op);
    }
    let y = args[0].apply_op3_no_bwd(&args[1], &args[2], &op)?;
    record_into(&orig, &y, 0, move |g, wants, acc| {
        backward(&op, &args, g, wants, acc)
    })?;
    Ok(y)
}

/// `f(inputs)` for a composite of candle ops (a reference path). Inside a segment it runs on
/// copies of the inputs made candle variables, so candle's autograd differentiates it when
/// the tape's backward reaches it; the tape sees one op. Outside, `f` on the inputs.
pub fn island(inputs: &[&Tensor], f: impl FnOnce(&[Tensor]) -> Result<Tensor>) -> Result<Tensor> {
    if !recording() {
        let args: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
        return f(&args);
    }
    let wants = wanted(inputs);
    let vars = inputs
        .iter()
        .zip(&wants)
        .map(|(t, w)| match w {
            true => Ok(Var::from_tensor(&t.detach())?.as_tensor().clone()),
            false => Ok(t.detach()),
        })
        .collect::<Result<Vec<_>>>()?;
    let y = suspended(|| f(&vars))?;
    let out = y.detach();
    record(inputs, &out, move |g, wants| {
        if !y.track_op() {
            return Ok(vec![None; vars.len()]);
        }
        let g = g.to_dtype(y.dtype())?;
        let grads = (&y * &g)?.backward()?;
        Ok(vars
            .iter()
            .zip(wants)
            .map(|(v, w)| if *w { grads.get(v).cloned() } else { None })
            .collect())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests;
