//! Per-op timing for `--profile`: while a profiled step runs, the forward and the backward of
//! each kernel op on our path are bracketed by two marks (CUDA events on the device's stream,
//! or the host clock on a CPU), so the profile can say how much of a step our ops take and
//! how much is left to everything else (candle's own ops, copies, casts). Outside a profiled
//! step nothing is recorded and a span costs one thread-local check.

use std::cell::RefCell;
use std::time::Instant;

use candle_core::{Device, Result};

use super::KernelOp;

/// A point in time on the device's stream (GPU) or the host clock (CPU).
pub enum Mark {
    Host(Instant),
    #[cfg(feature = "cuda")]
    Cuda(
        candle_core::cuda_backend::cudarc::driver::CudaEvent,
        Instant,
    ),
}

impl Mark {
    /// Now, on `dev`'s stream for a CUDA device (recorded, not waited for).
    pub fn now(dev: &Device) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = dev {
            use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
            let e = d
                .cuda_stream()
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| candle_core::Error::Msg(format!("recording a CUDA event: {e:?}")))?;
            return Ok(Mark::Cuda(e, Instant::now()));
        }
        let _ = dev;
        Ok(Mark::Host(Instant::now()))
    }

    /// When the host issued the mark.
    pub fn host(&self) -> Instant {
        match self {
            Mark::Host(t) => *t,
            #[cfg(feature = "cuda")]
            Mark::Cuda(_, t) => *t,
        }
    }

    /// Milliseconds from `self` to `end`: device time between two CUDA events (waits for
    /// `end`), host time otherwise.
    pub fn ms_until(&self, end: &Mark) -> Result<f64> {
        match (self, end) {
            #[cfg(feature = "cuda")]
            (Mark::Cuda(a, _), Mark::Cuda(b, _)) => a
                .elapsed_ms(b)
                .map(f64::from)
                .map_err(|e| candle_core::Error::Msg(format!("reading CUDA events: {e:?}"))),
            _ => Ok((end.host() - self.host()).as_secs_f64() * 1e3),
        }
    }
}

/// Which half of an op a span timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pass {
    Forward,
    Backward,
}

impl Pass {
    pub fn name(self) -> &'static str {
        match self {
            Pass::Forward => "fwd",
            Pass::Backward => "bwd",
        }
    }
}

pub struct OpSpan {
    pub op: KernelOp,
    pub pass: Pass,
    pub start: Mark,
    pub end: Mark,
}

#[derive(Default)]
struct Log {
    /// Spans open on this thread: an op called inside another's span is the outer one's
    /// time, not a second entry.
    depth: usize,
    spans: Vec<OpSpan>,
}

thread_local! {
    static LOG: RefCell<Option<Log>> = const { RefCell::new(None) };
}

/// Starts recording this thread's op spans (a no-op if already recording).
pub fn start() {
    LOG.with_borrow_mut(|l| {
        l.get_or_insert_with(Log::default);
    });
}

/// Whether this thread records op spans (their CUDA events would not survive a graph
/// capture).
pub fn recording() -> bool {
    LOG.with_borrow(Option::is_some)
}

/// Stops recording and returns what was recorded since [`start`].
pub fn take() -> Vec<OpSpan> {
    LOG.with_borrow_mut(|l| l.take().map(|l| l.spans).unwrap_or_default())
}

/// Runs `f`, the `pass` of `op` on `dev`, and records its span while recording is on.
pub fn timed<T>(
    op: KernelOp,
    pass: Pass,
    dev: &Device,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let outer = LOG.with_borrow_mut(|l| match l {
        Some(l) => {
            l.depth += 1;
            l.depth == 1
        }
        None => false,
    });
    if !outer {
        let out = f();
        LOG.with_borrow_mut(|l| {
            if let Some(l) = l {
                l.depth -= 1;
            }
        });
        return out;
    }
    let start = Mark::now(dev);
    let out = f();
    let end = Mark::now(dev);
    LOG.with_borrow_mut(|l| {
        if let Some(l) = l {
            l.depth -= 1;
            if let (Ok(start), Ok(end), true) = (start, end, out.is_ok()) {
                l.spans.push(OpSpan {
                    op,
                    pass,
                    start,
                    end,
                });
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_while_on_and_only_the_outermost_span() {
        let dev = Device::Cpu;
        timed(KernelOp::Gelu, Pass::Forward, &dev, || Ok(())).unwrap();
        start();
        timed(KernelOp::Bias, Pass::Forward, &dev, || {
            timed(KernelOp::Gelu, Pass::Forward, &dev, || Ok(()))
        })
        .unwrap();
        timed(KernelOp::Gemm, Pass::Backward, &dev, || Ok(())).unwrap();
        let _ = timed(KernelOp::Rope, Pass::Forward, &dev, || -> Result<()> {
            candle_core::bail!("failed")
        });
        let spans = take();
        let got: Vec<(KernelOp, Pass)> = spans.iter().map(|s| (s.op, s.pass)).collect();
        assert_eq!(
            got,
            [
                (KernelOp::Bias, Pass::Forward),
                (KernelOp::Gemm, Pass::Backward)
            ]
        );
        assert!(spans
            .iter()
            .all(|s| s.start.ms_until(&s.end).unwrap() >= 0.0));
        timed(KernelOp::Gelu, Pass::Forward, &dev, || Ok(())).unwrap();
        assert!(take().is_empty(), "recording stopped with take");
    }
}
