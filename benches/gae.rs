//! GAE: our scan kernel against the reference at B=512,T=1024 and B=4096,T=4096.
//!
//! Kernel time is the median of CUDA-event timings around single launches (after warm-up),
//! rotating among enough input sets that they do not all sit in L2. GB/s counts the fewest
//! bytes the op must move: three f32 inputs read and two f32 outputs written; the ceiling to
//! hold it against is the device-to-device copy rate that scripts/bench_peers.py measures in
//! the same device call (scripts/gpu-check.sh puts the two side by side, with PyTorch's
//! TRL-style loop). `gae` (with the statistics read back to the host) and the reference
//! (host loop, as the dispatcher runs it for `gae=reference`) are timed by synchronised wall
//! clock. Without feature `cuda` (or without a device) only the reference runs, at a small shape.
//!
//! Run: `cargo bench --features cuda --bench gae` (or the packed binary from gpu-build.sh).

use std::time::Instant;

use candle_core::{Device, Tensor};
use temper::kernels::gae::gae_reference;

struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Rewards, values and a right-padded mask (lengths uniform in [T/4, T]) on `dev`.
fn inputs(b: usize, t: usize, seed: u64, dev: &Device) -> candle_core::Result<[Tensor; 3]> {
    let mut rng = Rng(seed | 1);
    let r: Vec<f32> = (0..b * t).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
    let v: Vec<f32> = (0..b * t).map(|_| rng.next_f32() * 4.0 - 2.0).collect();
    let mut m = vec![0f32; b * t];
    for i in 0..b {
        let len = t / 4 + (rng.next_f32() * (t - t / 4 + 1) as f32) as usize;
        m[i * t..i * t + len.min(t)].fill(1.0);
    }
    Ok([
        Tensor::from_vec(r, (b, t), dev)?,
        Tensor::from_vec(v, (b, t), dev)?,
        Tensor::from_vec(m, (b, t), dev)?,
    ])
}

#[path = "common/timing.rs"]
mod timing;
use timing::median;

fn time_reference(b: usize, t: usize, dev: &Device, reps: usize) -> candle_core::Result<f64> {
    let [r, v, m] = inputs(b, t, 7, dev)?;
    gae_reference(&r, &v, &m, 0.99, 0.95)?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        dev.synchronize()?;
        let t0 = Instant::now();
        let out = gae_reference(&r, &v, &m, 0.99, 0.95)?;
        out.advantages.device().synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

fn main() -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if temper::kernels::cuda::cuda_available() {
        return cuda::run();
    }
    if cfg!(feature = "cuda") {
        println!("gae bench: no CUDA device found; timing the reference only");
    } else {
        println!("gae bench: the CUDA kernel needs `--features cuda`; timing the reference only");
    }
    let (b, t) = (64, 256);
    let s = time_reference(b, t, &Device::Cpu, 20)?;
    println!("reference (CPU) B={b} T={t}: {:.3} ms", s * 1e3);
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    use candle_core::cuda_backend::WrapErr;
    use temper::kernels::cuda::gae::{gae, gae_device};

    pub fn run() -> candle_core::Result<()> {
        let dev = Device::new_cuda(0)?;
        let cdev = dev.as_cuda_device()?.clone();
        let stream = cdev.cuda_stream();
        let ctx = stream.context().clone();
        println!(
            "{:>12} {:>11} {:>9} {:>12} {:>13} {:>9}",
            "B x T", "kernel us", "GB/s", "gae+read us", "reference ms", "speedup"
        );
        for (b, t) in [(512usize, 1024usize), (4096, 4096)] {
            let bytes = (5 * 4 * b * t) as f64;
            // Enough input sets to cover ~4x a 50 MB L2, so repeats do not time the cache.
            let sets = ((200e6 / bytes).ceil() as usize).clamp(1, 16);
            let data: Vec<[Tensor; 3]> = (0..sets)
                .map(|i| inputs(b, t, 100 + i as u64, &dev))
                .collect::<candle_core::Result<_>>()?;
            for [r, v, m] in &data {
                gae_device(r, v, m, 0.99, 0.95)?; // warm-up: module load, JIT, pools
            }
            dev.synchronize()?;

            let reps = 50;
            let mut kernel = Vec::with_capacity(reps);
            for i in 0..reps {
                let [r, v, m] = &data[i % sets];
                let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).w()?;
                let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).w()?;
                start.record(&stream).w()?;
                let out = gae_device(r, v, m, 0.99, 0.95)?;
                end.record(&stream).w()?;
                kernel.push(start.elapsed_ms(&end).w()? as f64 * 1e-3);
                drop(out);
            }
            let kernel = median(kernel);

            let mut full = Vec::with_capacity(reps);
            for i in 0..reps {
                let [r, v, m] = &data[i % sets];
                dev.synchronize()?;
                let t0 = Instant::now();
                let out = gae(r, v, m, 0.99, 0.95)?.expect("gae kernel");
                dev.synchronize()?;
                full.push(t0.elapsed().as_secs_f64());
                drop(out);
            }
            let full = median(full);

            let ref_reps = if b * t > 4_000_000 { 3 } else { 7 };
            let reference = time_reference(b, t, &dev, ref_reps)?;
            println!(
                "{:>12} {:>11.1} {:>9.0} {:>12.1} {:>13.2} {:>8.0}x",
                format!("{b}x{t}"),
                kernel * 1e6,
                bytes / kernel / 1e9,
                full * 1e6,
                reference * 1e3,
                reference / kernel
            );
            let shape = format!("B{b} T{t}");
            for (name, secs) in [
                ("ours-kernel", kernel),
                ("ours-gae+read", full),
                ("reference", reference),
            ] {
                println!(
                    "{{\"bench\":\"gae\",\"shape\":\"{shape}\",\"impl\":\"{name}\",\"ms\":{:.5},\"gbps\":{:.1}}}",
                    secs * 1e3,
                    bytes / secs / 1e9
                );
            }
        }
        Ok(())
    }
}
