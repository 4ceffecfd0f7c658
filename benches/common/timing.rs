//! What the kernel benches share: the median of a set of timings, and the median of CUDA-event
//! timings on candle's stream. Each bench crate includes this file and uses part of it.
#![allow(dead_code)]

pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// Median milliseconds of `f` between CUDA events on candle's stream, after `warmup` untimed
/// calls (module loads, cuBLAS heuristics, allocator pools).
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
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).w()?;
        let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).w()?;
        start.record(&stream).w()?;
        f()?;
        end.record(&stream).w()?;
        end.synchronize().w()?;
        times.push(start.elapsed_ms(&end).w()? as f64);
    }
    Ok(median(times))
}
