//! RMSNorm: our kernel against the reference (candle ops), bf16, at rows x cols = 16384 x 768
//! (GPT-2 small, B16 T1024) and 8192 x 4096 (a 7B-wide layer). PyTorch's `F.rms_norm` at the
//! same shapes comes from scripts/bench_peers.py, run in the same device call by
//! scripts/gpu-check.sh, which divides one by the other.
//!
//! fwd: `y` only. fwd+bwd: the forward and then the backward driven by a fixed random dY, as
//! PyTorch's `autograd.grad(y, (x, w), dy)` is: our op's backward called directly
//! (`RmsNormDirect`: dx and dw); the reference through candle's autograd seeded through
//! `y * dy` (one elementwise product each way, no reduction). GB/s counts the fewest bytes:
//! fwd reads x and writes y, fwd+bwd also reads x and dY and writes dx (w and the per-row
//! statistics are small). Times are medians of CUDA-event timings after warm-up. Every
//! measurement is also printed as one JSON line (`{"bench":"rmsnorm",...}`).
//!
//! Run: `cargo bench --features cuda --bench rmsnorm` (or the packed binary from
//! scripts/gpu-build.sh). Without feature `cuda` (or a device) it times the reference on the
//! CPU at a small shape.

use std::time::Instant;

use candle_core::{Device, Tensor};
use temper::kernels::rmsnorm::rms_norm_reference;

#[path = "common/timing.rs"]
mod timing;
use timing::median;

fn main() -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if temper::kernels::cuda::cuda_available() {
        return cuda::run();
    }
    println!("rmsnorm bench: no CUDA kernel here (feature `cuda` and a GPU); timing the reference on the CPU");
    let (rows, cols) = (512, 256);
    let x = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu)?;
    let w = Tensor::randn(1f32, 0.1, cols, &Device::Cpu)?;
    rms_norm_reference(&x, &w, 1e-5)?;
    let mut times = Vec::new();
    for _ in 0..20 {
        let t0 = Instant::now();
        rms_norm_reference(&x, &w, 1e-5)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    println!(
        "reference (CPU, f32) {rows}x{cols}: {:.3} ms",
        median(times) * 1e3
    );
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::timing::cuda_time_ms;
    use super::*;
    use candle_core::{DType, Var};
    use temper::kernels::cuda::rmsnorm::{rms_norm_op, RmsNormDirect};
    use temper::kernels::rmsnorm::Gain;

    /// Untimed calls before timing: module loads, cuBLAS heuristics, allocator pools.
    const WARMUP: usize = 3;

    /// The direct backward must give autograd's gradients (the same kernels). Printed as a
    /// JSON line with `"bench":"check"` for scripts/gpu-check.sh.
    fn check_direct(
        shape: &str,
        direct: &RmsNormDirect,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        eps: f64,
    ) -> candle_core::Result<()> {
        let vars = [Var::from_tensor(x)?, Var::from_tensor(w)?];
        let grads = (rms_norm_op(&vars[0], &vars[1], eps, Gain::AsIs)? * dy)?.backward()?;
        let yd = direct.forward()?;
        let (dx, dw) = direct.backward(&yd, dy)?;
        let mut worst = 0f64;
        for (var, g) in vars.iter().zip([dx, dw]) {
            let a = grads
                .get(var.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg("autograd gave no gradient".into()))?
                .to_dtype(DType::F32)?;
            let diff = (&a - g.to_dtype(DType::F32)?)?.abs()?.max_all()?;
            let scale = a.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-30);
            worst = worst.max((diff.to_scalar::<f32>()? / scale) as f64);
        }
        println!(
            "{{\"bench\":\"check\",\"of\":\"rmsnorm\",\"shape\":\"{shape}\",\"impl\":\"ours\",\"what\":\"direct backward vs autograd\",\"max_rel_diff\":{worst:.3e}}}"
        );
        Ok(())
    }

    pub fn run() -> candle_core::Result<()> {
        let dev = Device::new_cuda(0)?;
        let eps = 1e-5;
        println!("rmsnorm, bf16 (medians of CUDA-event timings; peer: scripts/bench_peers.py)");
        println!(
            "{:<14} {:<10} {:>9} {:>7} {:>12} {:>7}",
            "shape", "impl", "fwd ms", "GB/s", "fwd+bwd ms", "GB/s"
        );
        for (rows, cols) in [(16_384usize, 768usize), (8192, 4096)] {
            let shape = format!("{rows}x{cols}");
            let bf16 = |t: Tensor| t.to_dtype(DType::BF16);
            let x = bf16(Tensor::randn(0f32, 1.0, (rows, cols), &dev)?)?;
            let w = bf16(Tensor::randn(1f32, 0.1, cols, &dev)?)?;
            let dy = bf16(Tensor::randn(0f32, 1.0, (rows, cols), &dev)?)?;
            let elem = (rows * cols * 2) as f64;
            let (fwd_bytes, both_bytes) = (2.0 * elem, 5.0 * elem);

            let direct = RmsNormDirect::new(&x, &w, eps, Gain::AsIs)?;
            check_direct(&shape, &direct, &x, &w, &dy, eps)?;
            let ours_fwd = cuda_time_ms(&dev, WARMUP, 50, || {
                rms_norm_op(&x, &w, eps, Gain::AsIs).map(|_| ())
            })?;
            let ours_both = cuda_time_ms(&dev, WARMUP, 50, || {
                let y = direct.forward()?;
                direct.backward(&y, &dy).map(|_| ())
            })?;

            let ref_fwd = cuda_time_ms(&dev, WARMUP, 20, || {
                rms_norm_reference(&x, &w, eps).map(|_| ())
            })?;
            let (xv, wv) = (Var::from_tensor(&x)?, Var::from_tensor(&w)?);
            let ref_both = cuda_time_ms(&dev, WARMUP, 20, || {
                let y = rms_norm_reference(&xv, &wv, eps)?;
                // backward() seeds a non-scalar root with ones: dL/dy = dy.
                (y * &dy)?.backward().map(|_| ())
            })?;

            for (name, fwd, both) in [
                ("ours", ours_fwd, ours_both),
                ("reference", ref_fwd, ref_both),
            ] {
                let (gf, gb) = (fwd_bytes / fwd / 1e6, both_bytes / both / 1e6);
                println!("{shape:<14} {name:<10} {fwd:>9.4} {gf:>7.0} {both:>12.4} {gb:>7.0}");
                println!(
                    "{{\"bench\":\"rmsnorm\",\"shape\":\"{shape}\",\"impl\":\"{name}\",\"fwd_ms\":{fwd:.5},\"fwd_bwd_ms\":{both:.5},\"fwd_gbps\":{gf:.1},\"fwd_bwd_gbps\":{gb:.1}}}"
                );
            }
        }
        Ok(())
    }
}
