//! What the kernel benches share: the median of a set of timings, and the median of CUDA-event
//! timings on candle's stream. Each bench crate includes this file and uses part of it.
#![allow(dead_code)]

pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// Median milliseconds of `f` between CUDA events on candle's stream, after `warmup` untimed
/// calls (module loads, cuBLAS heuristics, allocator pools, and under
/// `TEMPER_GEMM_TUNE=timed` the timing of cuBLASLt's candidates for each GEMM, done in the
/// warm-up rather than left to a timed call). The repeats are queued back to
/// back and the host waits once, at the end (as `triton.testing.do_bench` does): where the
/// GPU work of a call outlasts the host's, the host runs ahead and each pair of events times
/// the GPU alone; where it does not, the host's time shows. scripts/bench_peers.py times
/// PyTorch the same way.
#[cfg(feature = "cuda")]
pub fn cuda_time_ms(
    dev: &candle_core::Device,
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> candle_core::Result<f64> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    use candle_core::cuda_backend::WrapErr;
    let stream = dev.as_cuda_device()?.cuda_stream();
    let ctx = stream.context().clone();
    temper::kernels::cuda::timing_first_calls(|| {
        for _ in 0..warmup {
            f()?;
        }
        candle_core::Result::Ok(())
    })?;
    dev.synchronize()?;
    let event = || ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).w();
    let pairs = (0..reps)
        .map(|_| Ok((event()?, event()?)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    for (start, end) in &pairs {
        start.record(&stream).w()?;
        f()?;
        end.record(&stream).w()?;
    }
    dev.synchronize()?;
    let times = pairs
        .iter()
        .map(|(start, end)| Ok(start.elapsed_ms(end).w()? as f64))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(median(times))
}

/// Opens or closes the CUDA profiler's capture range (what `ncu --profile-from-start off`
/// profiles); nothing without CUDA.
pub fn profiler_range(start: bool) {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::sys;
        // SAFETY: plain driver calls with no arguments, made after a device sync.
        let r = unsafe {
            match start {
                true => sys::cuProfilerStart(),
                false => sys::cuProfilerStop(),
            }
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            eprintln!(
                "cuProfiler{} returned {r:?}",
                if start { "Start" } else { "Stop" }
            );
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = start;
}
