//! Our kernels' outputs in a decode step's capture, allocated at its start and freed at its
//! end, so that two of the step's kernels can meet in the graph (`TEMPER_PDL=on`).
//!
//! A programmatic launch overlaps the kernel ahead only across a programmatic edge, which
//! capture makes only where the node ahead is a kernel. Each launcher allocates its output
//! just before its launch, and the step's temporaries are freed as they drop: in a capture
//! those are memory nodes between most pairs of kernels, and the graph cannot be rewired
//! afterwards (the driver removes no edge from a graph that holds memory nodes). So the order
//! is changed where it is made:
//! - the eager step that precedes every capture runs under [`record`]: [`super::alloc_out`]
//!   notes each request's size, in order;
//! - the capture runs under [`serve`]: every noted size is allocated first (the graph's
//!   allocations, before any kernel) and `alloc_out` hands them out in order; the tensors
//!   [`super::tensor_from_slice`] wraps and the launchers' own temporaries ([`keep`]) are
//!   kept until the step ends, when their frees follow the last kernel.
//!
//! A request that finds no buffer of its size is allocated as before, in place. What the
//! model's code drops (a custom op's output, once its scope ends) is still freed where it
//! drops, between two kernels, as are candle's own ops' buffers: the generate bench's graph
//! census (`generate::last_capture`) counts the kernel-to-kernel and programmatic edges left.

use std::any::Any;
use std::cell::RefCell;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaSlice, CudaStream, DeviceRepr};
use candle_core::cuda_backend::WrapErr;

enum State {
    Off,
    /// The eager step: each request's bytes, in order.
    Recording(Vec<usize>),
    /// The capture: the buffers allocated at its start, not yet handed out, and what the
    /// step made so far.
    Serving {
        ready: Vec<(usize, sys::CUdeviceptr)>,
        kept: Vec<Box<dyn Any>>,
        stream: Arc<CudaStream>,
    },
}

thread_local! {
    static STATE: RefCell<State> = const { RefCell::new(State::Off) };
}

/// The sizes an eager step requested, in order: what [`serve`] allocates up front.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan(Vec<usize>);

/// Runs `f` noting the bytes of each output `alloc_out` allocates on this thread.
pub fn record<R>(f: impl FnOnce() -> R) -> (R, Plan) {
    STATE.with_borrow_mut(|s| *s = State::Recording(Vec::new()));
    let guard = Reset;
    let r = f();
    std::mem::forget(guard);
    let plan = match STATE.with_borrow_mut(|s| std::mem::replace(s, State::Off)) {
        State::Recording(sizes) => Plan(sizes),
        _ => Plan::default(),
    };
    (r, plan)
}

/// Runs `f` (a capture's body, on `stream`) with `plan`'s buffers allocated first and handed
/// out in order, and everything kept until `f` returns; then drops what was kept and frees
/// what was not handed out, in that order, after the step's last kernel.
pub fn serve<R>(
    stream: &Arc<CudaStream>,
    plan: &Plan,
    f: impl FnOnce() -> R,
) -> candle_core::Result<R> {
    let mut ready = Vec::with_capacity(plan.0.len());
    for &bytes in &plan.0 {
        // SAFETY: uninitialised memory, handed out only to launchers whose kernels write it
        // all before anything reads it (alloc_out's contract).
        match unsafe { stream.alloc::<u8>(bytes) } {
            Ok(buf) => ready.push((bytes, buf.leak())),
            Err(e) => {
                release(stream, ready);
                return Err(e).w();
            }
        }
    }
    STATE.with_borrow_mut(|s| {
        *s = State::Serving {
            ready,
            kept: Vec::new(),
            stream: stream.clone(),
        }
    });
    let guard = Reset;
    let r = f();
    std::mem::forget(guard);
    match STATE.with_borrow_mut(|s| std::mem::replace(s, State::Off)) {
        State::Serving {
            ready,
            kept,
            stream,
        } => {
            drop(kept);
            release(&stream, ready);
            Ok(r)
        }
        // A buffer never freed in the graph would fail its every replay.
        _ => candle_core::bail!("capture_arena: the capture's buffers were lost before its end"),
    }
}

/// Puts the state back to `Off` where a record or a serve unwinds: no later allocation on
/// this thread may be noted, or handed an abandoned capture's buffer. What was kept drops
/// (outside the borrow); the unused buffers are abandoned with their capture.
struct Reset;

impl Drop for Reset {
    fn drop(&mut self) {
        let abandoned = STATE.with_borrow_mut(|s| std::mem::replace(s, State::Off));
        drop(abandoned);
    }
}

/// Frees buffers allocated by [`serve`] and never handed out.
fn release(stream: &Arc<CudaStream>, ready: Vec<(usize, sys::CUdeviceptr)>) {
    for (bytes, ptr) in ready {
        // SAFETY: a buffer of this many bytes that `serve` allocated on `stream` and leaked;
        // owned again here, once, and freed on drop.
        drop(unsafe { stream.upgrade_device_ptr::<u8>(ptr, bytes) });
    }
}

/// A buffer of `len` elements for `alloc_out`: noted while recording (`None`: allocate as
/// usual); while serving, the first buffer of that size not handed out yet, if any.
pub(super) fn take<T: DeviceRepr>(stream: &Arc<CudaStream>, len: usize) -> Option<CudaSlice<T>> {
    let bytes = len * std::mem::size_of::<T>();
    STATE.with_borrow_mut(|s| match s {
        State::Off => None,
        State::Recording(sizes) => {
            sizes.push(bytes);
            None
        }
        State::Serving {
            ready,
            stream: ours,
            ..
        } => {
            if !Arc::ptr_eq(ours, stream) {
                return None;
            }
            let ptr = pick(ready, bytes)?;
            // SAFETY: `bytes` bytes allocated by `serve` on this stream, handed out once; the
            // slice frees them when it drops (kept until the step ends).
            Some(unsafe { stream.upgrade_device_ptr::<T>(ptr, len) })
        }
    })
}

/// The first buffer of `bytes` not handed out yet, taken from `ready`: an eager step and its
/// capture request the same sizes in the same order, and where they part (an extra or a
/// missing request) the others still find theirs.
fn pick(ready: &mut Vec<(usize, sys::CUdeviceptr)>, bytes: usize) -> Option<sys::CUdeviceptr> {
    let at = ready.iter().position(|&(b, _)| b == bytes)?;
    Some(ready.remove(at).1)
}

/// Keeps `what` (a step's tensor or temporary buffer) until the capture's body returns,
/// where one is being served; drops it now otherwise.
pub fn keep<A: Any>(what: A) {
    let spare = STATE.with_borrow_mut(|s| match s {
        State::Serving { kept, .. } => {
            kept.push(Box::new(what));
            None
        }
        _ => Some(what),
    });
    drop(spare);
}

/// `t`, kept until the capture's body returns where one is being served: a custom op's
/// output, which the model's code would otherwise drop (and free) between two kernels.
pub fn kept(t: candle_core::Tensor) -> candle_core::Tensor {
    if serving() {
        keep(t.clone());
    }
    t
}

/// Whether a capture is being served on this thread.
pub fn serving() -> bool {
    STATE.with_borrow(|s| matches!(s, State::Serving { .. }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(bytes: usize) {
        STATE.with_borrow_mut(|s| {
            if let State::Recording(v) = s {
                v.push(bytes);
            }
        })
    }

    /// Recording keeps the requests' sizes in order; outside a record or a serve nothing is
    /// noted, and `keep` drops at once.
    #[test]
    fn recording_notes_the_sizes_in_order() {
        let ((), plan) = record(|| [16, 8, 16].into_iter().for_each(note));
        assert_eq!(plan, Plan(vec![16, 8, 16]));
        note(4);
        let ((), again) = record(|| ());
        assert_eq!(again, Plan::default());
        assert!(!serving());
        let dropped = std::rc::Rc::new(());
        keep(dropped.clone());
        assert_eq!(std::rc::Rc::strong_count(&dropped), 1);
    }

    /// A record whose body unwinds leaves nothing behind: the next allocation on the thread
    /// is noted by nobody, and the next record starts empty.
    #[test]
    fn an_unwinding_record_puts_the_state_back() {
        let unwound = std::panic::catch_unwind(|| {
            record(|| {
                note(8);
                panic!("the eager step failed");
            })
        });
        assert!(unwound.is_err());
        assert!(STATE.with_borrow(|s| matches!(s, State::Off)));
        let ((), plan) = record(|| note(4));
        assert_eq!(plan, Plan(vec![4]));
    }

    /// Each request takes the first ready buffer of its size; a size with none left (an
    /// extra request) takes nothing, and the requests after it still find theirs.
    #[test]
    fn requests_take_the_first_buffer_of_their_size() {
        let mut ready = vec![(16, 100), (8, 200), (16, 300), (32, 400)];
        assert_eq!(pick(&mut ready, 16), Some(100));
        assert_eq!(pick(&mut ready, 64), None);
        assert_eq!(pick(&mut ready, 16), Some(300));
        assert_eq!(pick(&mut ready, 32), Some(400));
        assert_eq!(ready, vec![(8, 200)]);
    }
}
