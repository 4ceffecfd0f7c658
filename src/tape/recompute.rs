//! Activation checkpointing on the tape: a function of a few tensors (a transformer block)
//! recorded as one op that keeps only its inputs. Its forward runs on a scratch tape that is
//! dropped at once, with everything the function's ops saved for their backwards; its
//! backward runs the function again on a tape of its own and backpropagates through that.
//! Per block the tape then holds the block's inputs and outputs instead of its activations,
//! for one more forward of the block in the backward (PyTorch's and TRL's
//! `gradient_checkpointing`).
//!
//! The recomputation runs the same kernels on the same inputs, with one exception: under
//! `TEMPER_GEMM_TUNE=timed` a GEMM's algorithm may change between the forward and its
//! recomputation (once its problem is timed), and with it the last bits of the recomputed
//! activations. The gradients are then those of a forward a rounding away from the one whose
//! outputs went downstream. The profiler (`--profile`) counts the recomputed forwards inside
//! the backward's time.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use super::segment::hand_to_candle;
use super::{Grads, Restore, Tape, ACTIVE};

/// A function [`recomputed`] runs twice: its inputs in, its outputs out.
pub type Recomputable = Arc<dyn Fn(&[Tensor]) -> anyhow::Result<Vec<Tensor>> + Send + Sync>;

/// `f(xs)` recorded as one op whose backward runs `f` again (see the module docs). Outside a
/// segment, `f(xs)` as it is. `f` must compute the same thing both times: what it reads
/// besides its inputs (weights, masks, a dropout seed) must not change before the backward.
pub fn recomputed(xs: &[&Tensor], f: Recomputable) -> anyhow::Result<Vec<Tensor>> {
    if !super::recording() {
        return f(&xs.iter().map(|&x| x.clone()).collect::<Vec<_>>());
    }
    let inputs: Vec<Tensor> = xs.iter().map(|x| x.detach()).collect();
    // Which inputs want a gradient, as the recording tape sees them.
    let wanted: Vec<bool> = ACTIVE.with(|a| {
        let mut a = a.borrow_mut();
        let tape = a.as_mut().expect("recording");
        xs.iter().map(|x| tape.slot(x).wants()).collect()
    });
    let (outputs, scratch) = on_tape_of_its_own(tape_for(&inputs, &wanted), || f(&inputs))?;
    if let Some(what) = scratch.foreign.clone() {
        // The segment around falls back to candle's graph, where `f` runs as it is.
        ACTIVE.with(|a| {
            if let Some(t) = a.borrow_mut().as_mut() {
                t.foreign.get_or_insert(what);
            }
        });
    }
    // The op wants a gradient where an input does or where the function read a parameter
    // (an adapter on a frozen base): that parameter joins the op's inputs, so that the
    // recording tape walks into the op, and gets its gradient through the recomputation.
    let anchor = scratch.first_param();
    drop(scratch);
    // An output that is a view into a larger buffer (the stream a fused add and norm wrote
    // beside the normed copy) would keep all of that buffer alive until the backward: the
    // op keeps a buffer of its own instead.
    let outputs: Vec<Tensor> = outputs
        .iter()
        .map(|y| super::compact(y.detach()))
        .collect::<Result<_>>()?;
    let mut recorded: Vec<&Tensor> = xs.to_vec();
    recorded.extend(anchor.as_ref());
    let anchored = anchor.is_some();
    super::record_multi(
        &recorded,
        &outputs.iter().collect::<Vec<_>>(),
        // Which inputs want a gradient was settled in the forward (`wanted`), as the tape's
        // classification of them does not change.
        move |grads, _wants| {
            let mut dxs = backward(&inputs, &wanted, &f, grads)?;
            if anchored {
                dxs.push(None);
            }
            Ok(dxs)
        },
    )?;
    Ok(outputs)
}

/// The backward of a recomputed op: `f` again on a tape of its own, then that tape's backward
/// from the outputs' gradients. The parameters' gradients go to candle's store as a segment's
/// do; the inputs' come back.
fn backward(
    inputs: &[Tensor],
    wanted: &[bool],
    f: &Recomputable,
    grads: Vec<Option<Tensor>>,
) -> Result<Grads> {
    let (outputs, tape) = on_tape_of_its_own(tape_for(inputs, wanted), || f(inputs))
        .map_err(|e| candle_core::Error::Msg(format!("recomputing a block: {e:#}")))?;
    if let Some(what) = &tape.foreign {
        // A weight the forward read as a variable is now cast in candle's graph: its
        // gradient would be lost.
        candle_core::bail!("recomputing a block: it read a {what} tensor in candle's graph");
    }
    let roots: Vec<_> = outputs
        .iter()
        .zip(grads)
        .filter_map(|(y, g)| g.map(|g| (y.id(), g)))
        .collect();
    // The recomputed outputs are not needed past their ids: the tape holds what it saved.
    drop(outputs);
    let (dxs, params) = tape.backward(roots)?;
    hand_to_candle(params);
    let mut dxs = dxs.into_iter();
    Ok(wanted
        .iter()
        .map(|&w| if w { dxs.next().flatten() } else { None })
        .collect())
}

/// A tape whose inputs are those of `inputs` that want a gradient.
fn tape_for(inputs: &[Tensor], wanted: &[bool]) -> Tape {
    let ids = inputs
        .iter()
        .zip(wanted)
        .filter(|(_, &w)| w)
        .map(|(x, _)| x.id())
        .collect();
    Tape::new(ids)
}

/// `f()` with `tape` as this thread's, and the tape it recorded; the thread's own tape (the
/// segment recording around it, if any) is put back afterwards, a panic included.
fn on_tape_of_its_own<R>(
    tape: Tape,
    f: impl FnOnce() -> anyhow::Result<R>,
) -> anyhow::Result<(R, Tape)> {
    let outer = ACTIVE.with(|a| a.borrow_mut().replace(tape));
    let restore = Restore(outer);
    let r = f();
    let recorded = ACTIVE.with(|a| a.borrow_mut().take());
    drop(restore);
    let recorded = recorded.expect("the tape set above");
    Ok((r?, recorded))
}
