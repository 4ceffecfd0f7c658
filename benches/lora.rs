//! LoRA linear layer: our fused op, candle's plain GEMM `x W^T`, our cuBLASLt GEMM (the
//! `gemm` kernel op every linear layer uses) and the unfused reference, at
//! r=16 M=8192 K=N=4096 and r=8 M=4096 K=N=768 (bf16), in milliseconds. The bench prints no
//! ratios: scripts/gpu-check.sh divides these times by PyTorch's plain GEMM and PyTorch's
//! unfused LoRA, measured by scripts/bench_peers.py in the same device call. (Candle's own
//! plain GEMM is no yardstick: it is slower than PyTorch's at the large shape, so a ratio to
//! it flatters the fused op.)
//!
//! fwd: `y` only. fwd+bwd: W frozen, the backward driven by a fixed random dY, as PyTorch's
//! `autograd.grad(y, inputs, dy)` is: the fused op's forward and then its backward called
//! directly (`LoraDirect`: dx, dA, dB); for the plain GEMM, `x W^T` and then `dY W` (dx, all
//! its backward computes), the same for the cuBLASLt GEMM; the reference through candle's autograd seeded through `y * dy`
//! (one elementwise product each way, no reduction). Times are medians of CUDA-event timings
//! after warm-up. Every measurement is also printed as one JSON line (`{"bench":"lora",...}`).
//!
//! With `TEMPER_BENCH_ONCE=1` (scripts/gpu-check.sh's ncu section) it runs one fused fwd+bwd at
//! the first shape inside the CUDA profiler's capture range, after one untimed warm-up, and
//! nothing else: `ncu --profile-from-start off` then sees exactly the kernels of one step.
//!
//! Run: `cargo bench --features cuda --bench lora`. Without feature `cuda` (or a device) it
//! times the reference on a tiny CPU shape.

use std::time::Instant;

use candle_core::{Device, Tensor};
use temper::kernels::lora::{lora_linear_reference, LoraArgs};
use temper::kernels::KernelChoice;

#[path = "common/timing.rs"]
mod timing;
use timing::median;

/// candle's plain GEMM `x W^T`: the reference of the `gemm` op.
fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    temper::kernels::gemm::linear(x, w, bias, KernelChoice::Reference)
}

fn main() -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if temper::kernels::cuda::cuda_available() {
        return cuda::run();
    }
    if cfg!(feature = "cuda") {
        println!("lora bench: no CUDA device found; timing the reference on the CPU only");
    } else {
        println!(
            "lora bench: the fused kernel needs `--features cuda` (and a GPU); timing the \
             reference on a tiny CPU shape"
        );
    }
    let dev = Device::Cpu;
    let (m, k, n, r) = (256, 128, 128, 8);
    let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
    let w = Tensor::randn(0f32, 0.1, (n, k), &dev)?;
    let a = Tensor::randn(0f32, 0.1, (r, k), &dev)?;
    let b = Tensor::randn(0f32, 0.1, (n, r), &dev)?;
    let args = LoraArgs {
        w: &w,
        bias: None,
        a: &a,
        b: &b,
        scale: 2.0,
    };
    let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> candle_core::Result<f64> {
        f()?;
        let mut times = Vec::new();
        for _ in 0..20 {
            let t0 = Instant::now();
            f()?;
            times.push(t0.elapsed().as_secs_f64());
        }
        Ok(median(times))
    };
    let plain = time(&|| linear(&x, &w, None))?;
    let refr = time(&|| lora_linear_reference(&x, &x, &args))?;
    println!(
        "CPU f32 r={r} M={m} K={k} N={n}: plain GEMM {:.3} ms, reference LoRA {:.3} ms ({:.2}x)",
        plain * 1e3,
        refr * 1e3,
        refr / plain
    );
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::timing::{cuda_time_ms, profiler_range};
    use super::*;
    use candle_core::{DType, Var};
    use temper::kernels::cuda::gemm::matmul_nn;
    use temper::kernels::cuda::lora::{lora_linear_with, DyPath, LoraDirect};
    use temper::kernels::cuda::GemmTune;

    /// Untimed calls before timing: module loads, cuBLAS heuristics, allocator pools.
    const WARMUP: usize = 3;

    #[derive(Clone, Copy)]
    enum Which {
        Plain,
        Lt,
        Fused(DyPath),
        Reference,
    }

    impl Which {
        fn name(&self) -> &'static str {
            match self {
                Which::Plain => "candle-plain",
                Which::Lt => "ours-gemm",

                Which::Fused(DyPath::Auto) => "fused",
                Which::Fused(DyPath::Fused) => "fused-dy-once",
                Which::Fused(DyPath::Cublas) => "fused-dy-cublas",
                Which::Reference => "reference",
            }
        }

        fn fwd(&self, x: &Tensor, args: &LoraArgs) -> candle_core::Result<Tensor> {
            match self {
                Which::Plain => linear(x, args.w, None),
                Which::Lt => temper::kernels::cuda::gemm::matmul_nt(x, args.w)?
                    .ok_or_else(|| candle_core::Error::Msg("no cuBLASLt path here".into())),
                Which::Fused(path) => lora_linear_with(x, args, *path)?
                    .ok_or_else(|| candle_core::Error::Msg("no fused kernel here".into())),
                Which::Reference => lora_linear_reference(x, x, args),
            }
        }

        /// Forward, then the gradients a frozen-W LoRA layer needs, from `dy`.
        fn fwd_bwd(
            &self,
            x: &Tensor,
            args: &LoraArgs,
            dy: &Tensor,
        ) -> candle_core::Result<Box<dyn FnMut() -> candle_core::Result<()>>> {
            let (x, w, dy) = (x.clone(), args.w.clone(), dy.clone());
            Ok(match *self {
                Which::Plain => Box::new(move || {
                    linear(&x, &w, None)?;
                    dy.matmul(&w).map(|_| ())
                }),
                Which::Lt => Box::new(move || {
                    temper::kernels::cuda::gemm::matmul_nt(&x, &w)?
                        .ok_or_else(|| candle_core::Error::Msg("no cuBLASLt path here".into()))?;
                    matmul_nn(&dy, &w)?
                        .ok_or_else(|| candle_core::Error::Msg("no cuBLASLt path here".into()))
                        .map(|_| ())
                }),
                Which::Fused(path) => {
                    let direct = LoraDirect::new(&x, args, path)?
                        .ok_or_else(|| candle_core::Error::Msg("no fused kernel here".into()))?;
                    check_direct(self.name(), &direct, &x, args, &dy, path)?;
                    Box::new(move || {
                        let y = direct.forward()?;
                        direct.backward(&y, &dy).map(|_| ())
                    })
                }
                Which::Reference => {
                    let xv = Var::from_tensor(&x)?;
                    let av = Var::from_tensor(args.a)?;
                    let bv = Var::from_tensor(args.b)?;
                    let scale = args.scale;
                    Box::new(move || {
                        let args = LoraArgs {
                            w: &w,
                            bias: None,
                            a: &av,
                            b: &bv,
                            scale,
                        };
                        let y = lora_linear_reference(&xv, &xv, &args)?;
                        // backward() seeds a non-scalar root with ones: dL/dy = dy.
                        (y * &dy)?.backward().map(|_| ())
                    })
                }
            })
        }
    }

    /// The direct backward must give autograd's gradients (the same kernels). Printed as a
    /// JSON line with `"bench":"check"` for scripts/gpu-check.sh.
    fn check_direct(
        name: &str,
        direct: &LoraDirect,
        x: &Tensor,
        args: &LoraArgs,
        dy: &Tensor,
        path: DyPath,
    ) -> candle_core::Result<()> {
        let vars = [
            Var::from_tensor(x)?,
            Var::from_tensor(args.a)?,
            Var::from_tensor(args.b)?,
        ];
        let args_v = LoraArgs {
            w: args.w,
            bias: None,
            a: &vars[1],
            b: &vars[2],
            scale: args.scale,
        };
        let y = lora_linear_with(&vars[0], &args_v, path)?
            .ok_or_else(|| candle_core::Error::Msg("no fused kernel here".into()))?;
        let grads = (y * dy)?.backward()?;
        let yd = direct.forward()?;
        let (dx, da, db) = direct.backward(&yd, dy)?;
        let mut worst = 0f64;
        for (var, g) in vars.iter().zip([dx, da, db]) {
            let a = grads
                .get(var.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg("autograd gave no gradient".into()))?
                .to_dtype(DType::F32)?;
            let diff = (&a - g.to_dtype(DType::F32)?)?.abs()?.max_all()?;
            let scale = a.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-30);
            worst = worst.max((diff.to_scalar::<f32>()? / scale) as f64);
        }
        let (m, k) = x.dims2()?;
        let (n, r) = args.b.dims2()?;
        println!(
            "{{\"bench\":\"check\",\"of\":\"lora\",\"shape\":\"r{r} M{m} K{k} N{n}\",\"impl\":\"{name}\",\"what\":\"direct backward vs autograd\",\"max_rel_diff\":{worst:.3e}}}"
        );
        Ok(())
    }

    pub fn run() -> candle_core::Result<()> {
        let dev = Device::new_cuda(0)?;
        let once = std::env::var_os("TEMPER_BENCH_ONCE").is_some();
        println!("lora, bf16, milliseconds (medians of CUDA-event timings; peers: scripts/bench_peers.py)");
        println!(
            "{:<22} {:<16} {:>10} {:>12}",
            "shape", "impl", "fwd ms", "fwd+bwd ms"
        );
        for (r, m, k, n) in [
            (16usize, 8192usize, 4096usize, 4096usize),
            (8, 4096, 768, 768),
        ] {
            let shape = format!("r{r} M{m} K{k} N{n}");
            let rnd = |dims: (usize, usize), std: f64| -> candle_core::Result<Tensor> {
                Tensor::randn(0f32, std as f32, dims, &dev)?.to_dtype(DType::BF16)
            };
            let x = rnd((m, k), 1.0)?;
            let w = rnd((n, k), 1.0 / (k as f64).sqrt())?;
            let a = rnd((r, k), 1.0 / (k as f64).sqrt())?;
            let b = rnd((n, r), 0.1)?;
            let dy = rnd((m, n), 1.0)?;
            let args = LoraArgs {
                w: &w,
                bias: None,
                a: &a,
                b: &b,
                scale: 2.0,
            };
            if once {
                let mut step = Which::Fused(DyPath::Auto).fwd_bwd(&x, &args, &dy)?;
                step()?;
                dev.synchronize()?;
                profiler_range(true);
                step()?;
                dev.synchronize()?;
                profiler_range(false);
                return Ok(());
            }
            let variants = [
                Which::Plain,
                Which::Lt,
                Which::Fused(DyPath::Auto),
                Which::Fused(DyPath::Fused),
                Which::Fused(DyPath::Cublas),
                Which::Reference,
            ];
            // Then our GEMM and the fused op again with cuBLASLt's candidates timed
            // (`TEMPER_GEMM_TUNE=timed`), as "<impl>-timed".
            let timed = [Which::Lt, Which::Fused(DyPath::Auto)];
            let runs = variants.iter().map(|&w| (w, GemmTune::current()));
            for (which, tune) in runs.chain(timed.map(|w| (w, GemmTune::Timed))) {
                let (fwd, both) = tune.scope(|| -> candle_core::Result<(f64, f64)> {
                    let fwd = cuda_time_ms(&dev, WARMUP, 20, || which.fwd(&x, &args).map(|_| ()))?;
                    let both = cuda_time_ms(&dev, WARMUP, 20, which.fwd_bwd(&x, &args, &dy)?)?;
                    Ok((fwd, both))
                })?;
                let name = match tune {
                    GemmTune::Timed => format!("{}-timed", which.name()),
                    GemmTune::Heuristic => which.name().to_string(),
                };
                println!("{shape:<22} {name:<16} {fwd:>10.3} {both:>12.3}");
                println!(
                    "{{\"bench\":\"lora\",\"shape\":\"{shape}\",\"impl\":\"{name}\",\"fwd_ms\":{fwd:.4},\"fwd_bwd_ms\":{both:.4}}}"
                );
            }
        }
        Ok(())
    }
}
