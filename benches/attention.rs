//! Attention: our flash kernel against the materialised reference, causal bf16 at
//! B=8 H=16 S=2048 D=128, B=16 H=32 S=1024 D=64 and (Gemma's head dim) B=8 H=8 S=2048 D=256,
//! and the decode forward (one query row per head against a cache) at GPT-2 small's, a GQA
//! shape and Gemma 3 1B's (4 query heads on 1 kv head, D 256). The PyTorch peers (SDPA flash
//! and cuDNN; SDPA's own choice for decode) for the same shapes come from
//! scripts/bench_peers.py, run in the same device call by scripts/gpu-check.sh, which divides
//! one by the other.
//!
//! FLOPs (as scripts/bench_peers.py counts them): forward 4·B·H·S²·D, halved under the causal
//! mask; forward+backward 3.5x that. Times are medians of CUDA-event timings after warm-up.
//! fwd+bwd for our kernels is the forward and then the backward kernels called directly with a
//! fixed random dO (`AttentionDirect`), as PyTorch's `autograd.grad(y, (q, k, v), dy)` does: no
//! scalar loss, no reduction. The reference has no such entry point; its backward runs through
//! candle's autograd seeded through `y * dy` (one elementwise product each way, no reduction).
//! Every measurement is also printed as one JSON line (`{"bench":"attention",...}`).
//!
//! With `TEMPER_BENCH_PACKED=1` it times only packed rows instead (SFT packing, pretraining's
//! document mask): B=8 H=16 S=2048 D=128 rows each holding the documents of
//! [`PACKED_DOCS`], every query attending only within its document; the PyTorch peer is
//! FlexAttention with the same document mask (scripts/bench_peers.py `attention_packed`).
//! FLOPs there count the visible (query, key) pairs: 4·B·H·D·Σ n(n+1)/2.
//!
//! With `TEMPER_BENCH_SOFTCAP=1` it times only Gemma 2's capped attention: scores capped as
//! `50 tanh(s / 50)`, causal, at Gemma 2 2B's heads (8 query heads on 4 kv heads, D=256),
//! B=4 S=2048 bf16; the PyTorch peers are transformers' eager Gemma 2 attention (the default
//! it runs Gemma 2 with: the scores materialised, capped, masked, an f32 softmax) and
//! FlexAttention compiled with the cap as its score modifier (scripts/bench_peers.py
//! `attention_softcap`).
//!
//! Besides the pass times, the backward's own is printed as (fwd+bwd) - fwd. With
//! `TEMPER_BENCH_ONCE=1` (scripts/gpu-check.sh's ncu section) only our tensor-core variants
//! run, each pass once with no warm-up and no check, so that ncu's first launches are one of
//! each kernel rather than twenty of the first. `TEMPER_BENCH_DECODE=1` runs the decode
//! shapes alone (with `TEMPER_BENCH_ONCE=1`, each kernel once: gpu-check's decode profile).
//!
//! Run: `cargo bench --features cuda --bench attention` (or the packed binary from
//! scripts/gpu-build.sh). Without feature `cuda` (or a device) it times the reference on a
//! tiny CPU shape.

use std::time::Instant;

use candle_core::{Device, Tensor};
use temper::kernels::attention::{attention_reference, AttnMask};

#[path = "common/timing.rs"]
mod timing;
use timing::median;

/// The documents of each packed row, 2048 tokens in all: scripts/bench_peers.py's
/// `PACKED_DOCS` holds the same lengths.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const PACKED_DOCS: [usize; 9] = [300, 50, 700, 128, 17, 512, 90, 3, 248];

fn main() -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if temper::kernels::cuda::cuda_available() {
        return cuda::run();
    }
    if cfg!(feature = "cuda") {
        println!("attention bench: no CUDA device found; timing the reference on the CPU only");
    } else {
        println!(
            "attention bench: our kernel needs `--features cuda` (and a GPU); timing the \
             reference on a tiny CPU shape"
        );
    }
    let dev = Device::Cpu;
    let (b, h, s, d) = (1, 2, 128, 32);
    let q = Tensor::randn(0f32, 1.0, (b, h, s, d), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (b, h, s, d), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (b, h, s, d), &dev)?;
    let mask = AttnMask {
        causal_offset: Some(0),
        key_valid: None,
        segments: None,
        window: None,
        softcap: None,
    };
    let scale = 1.0 / (d as f64).sqrt();
    attention_reference(&q, &k, &v, &mask, scale)?;
    let mut times = Vec::new();
    for _ in 0..10 {
        let t0 = Instant::now();
        attention_reference(&q, &k, &v, &mask, scale)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let t = median(times);
    let flops = 4.0 * (b * h * s * s * d) as f64 / 2.0;
    println!(
        "reference (CPU, f32) B={b} H={h} S={s} D={d} causal: {:.3} ms, {:.2} GFLOP/s",
        t * 1e3,
        flops / t / 1e9
    );
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::timing::cuda_time_ms;
    use super::*;
    use candle_core::{DType, Var};
    use temper::kernels::cuda::attention::{
        attention_with, AttentionDirect, AttnImpl, MAX_HEAD_DIM,
    };

    /// Untimed calls before timing: module loads, cuBLAS heuristics, allocator pools.
    const WARMUP: usize = 2;

    fn mask() -> AttnMask<'static> {
        AttnMask {
            causal_offset: Some(0),
            key_valid: None,
            segments: None,
            window: None,
            softcap: None,
        }
    }

    #[derive(Clone, Copy)]
    enum Which {
        Ours(AttnImpl),
        Reference,
    }

    impl Which {
        fn name(&self) -> &'static str {
            match self {
                Which::Ours(AttnImpl::Mma) => "ours-mma",
                Which::Ours(AttnImpl::MmaWide) => "ours-mma-wide",
                Which::Ours(AttnImpl::MmaNarrow) => "ours-mma-narrow",
                Which::Ours(AttnImpl::Simple) => "ours-simple",
                Which::Ours(AttnImpl::Auto) => "ours",
                Which::Reference => "reference",
            }
        }

        fn run(
            &self,
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            scale: f64,
        ) -> candle_core::Result<Tensor> {
            match self {
                Which::Ours(imp) => attention_with(q, k, v, &mask(), scale, *imp)?
                    .ok_or_else(|| candle_core::Error::Msg("no kernel for this shape".into())),
                Which::Reference => attention_reference(q, k, v, &mask(), scale),
            }
        }
    }

    /// The direct backward must give autograd's gradients: the same kernels, though the
    /// tensor-core dQ adds with atomics, so not always bit for bit. Printed as a JSON line
    /// with `"bench":"check"` for scripts/gpu-check.sh.
    fn check_direct(
        shape: &str,
        name: &str,
        direct: &AttentionDirect,
        [q, k, v]: [&Tensor; 3],
        dy: &Tensor,
        scale: f64,
        imp: AttnImpl,
    ) -> candle_core::Result<()> {
        let vars = [
            Var::from_tensor(q)?,
            Var::from_tensor(k)?,
            Var::from_tensor(v)?,
        ];
        let y = attention_with(&vars[0], &vars[1], &vars[2], &mask(), scale, imp)?
            .ok_or_else(|| candle_core::Error::Msg("no kernel for this shape".into()))?;
        let grads = (y * dy)?.backward()?;
        let yd = direct.forward()?;
        let (dq, dk, dv) = direct.backward(&yd, dy)?;
        let mut worst = 0f64;
        for (var, g) in vars.iter().zip([dq, dk, dv]) {
            let a = grads
                .get(var.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg("autograd gave no gradient".into()))?
                .to_dtype(DType::F32)?;
            let diff = (&a - g.to_dtype(DType::F32)?)?.abs()?.max_all()?;
            let scale = a.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-30);
            worst = worst.max((diff.to_scalar::<f32>()? / scale) as f64);
        }
        println!(
            "{{\"bench\":\"check\",\"of\":\"attention\",\"shape\":\"{shape}\",\"impl\":\"{name}\",\"what\":\"direct backward vs autograd\",\"max_rel_diff\":{worst:.3e}}}"
        );
        Ok(())
    }

    fn report(shape: &str, which: &str, pass: &str, ms: f64, flops: f64) {
        let tflops = flops / (ms * 1e-3) / 1e12;
        println!("{shape:<24} {which:<12} {pass:<8} {ms:>10.3} ms {tflops:>8.1} TFLOP/s");
        println!(
            "{{\"bench\":\"attention\",\"shape\":\"{shape}\",\"impl\":\"{which}\",\"pass\":\"{pass}\",\"ms\":{ms:.4},\"tflops\":{tflops:.2}}}"
        );
    }

    pub fn run() -> candle_core::Result<()> {
        let dev = Device::new_cuda(0)?;
        if std::env::var_os("TEMPER_BENCH_PACKED").is_some() {
            return packed(&dev);
        }
        if std::env::var_os("TEMPER_BENCH_SOFTCAP").is_some() {
            return softcapped(&dev);
        }
        let once = std::env::var_os("TEMPER_BENCH_ONCE").is_some();
        if std::env::var_os("TEMPER_BENCH_DECODE").is_some() {
            return decode(&dev, once);
        }
        println!(
            "attention, causal bf16 (medians of CUDA-event timings; peers: scripts/bench_peers.py)"
        );
        for (b, h, s, d) in [
            (8usize, 16usize, 2048usize, 128usize),
            (16, 32, 1024, 64),
            (8, 8, 2048, 256),
        ] {
            let shape = format!("B{b} H{h} S{s} D{d}");
            let fwd_flops = 4.0 * (b * h * s * s * d) as f64 / 2.0;
            let scale = 1.0 / (d as f64).sqrt();
            let mk = |seed: f64| -> candle_core::Result<Tensor> {
                // Fresh random data (never zeros: they can run faster than real inputs).
                (Tensor::randn(0f32, 1.0, (b, h, s, d), &dev)? + seed)?.to_dtype(DType::BF16)
            };
            let (q, k, v) = (mk(0.0)?, mk(0.01)?, mk(-0.01)?);
            let dy = mk(0.0)?;
            let variants = [
                Which::Ours(AttnImpl::Mma),
                Which::Ours(AttnImpl::MmaWide),
                Which::Ours(AttnImpl::MmaNarrow),
                Which::Ours(AttnImpl::Simple),
                Which::Reference,
            ];
            let tensor_cores = |w: &Which| {
                matches!(
                    w,
                    Which::Ours(AttnImpl::Mma | AttnImpl::MmaWide | AttnImpl::MmaNarrow)
                )
            };
            // Head dim 256 has one forward tiling (`MmaWide` is `Mma` there), two backwards
            // (`MmaNarrow`'s is the one sm_86 and sm_89 take), and no simple kernel.
            let runs = |w: &Which| match w {
                Which::Ours(AttnImpl::MmaWide | AttnImpl::Simple) => d <= MAX_HEAD_DIM,
                Which::Ours(AttnImpl::MmaNarrow) => d > MAX_HEAD_DIM,
                _ => true,
            };
            let variants = variants.into_iter().filter(runs);
            for which in variants.filter(|w| !once || tensor_cores(w)) {
                // The CUDA-core and materialised versions are far slower: fewer repeats.
                let (warmup, reps) = match (once, tensor_cores(&which)) {
                    (true, _) => (0, 1),
                    (false, true) => (WARMUP, 20),
                    (false, false) => (WARMUP, 3),
                };
                let fwd = cuda_time_ms(&dev, warmup, reps, || {
                    which.run(&q, &k, &v, scale).map(|_| ())
                })?;
                report(&shape, which.name(), "fwd", fwd, fwd_flops);
                let both = match which {
                    Which::Ours(imp) => {
                        let direct = AttentionDirect::new(&q, &k, &v, &mask(), scale, imp)?
                            .ok_or_else(|| {
                                candle_core::Error::Msg("no kernel for this shape".into())
                            })?;
                        if !once {
                            let qkv = [&q, &k, &v];
                            check_direct(&shape, which.name(), &direct, qkv, &dy, scale, imp)?;
                        }
                        cuda_time_ms(&dev, warmup, reps, || {
                            let y = direct.forward()?;
                            direct.backward(&y, &dy).map(|_| ())
                        })?
                    }
                    Which::Reference => {
                        let (qv, kv, vv) = (
                            Var::from_tensor(&q)?,
                            Var::from_tensor(&k)?,
                            Var::from_tensor(&v)?,
                        );
                        cuda_time_ms(&dev, warmup, reps, || {
                            let y = which.run(&qv, &kv, &vv, scale)?;
                            // backward() seeds a non-scalar root with ones: dL/dy = dy.
                            (y * &dy)?.backward().map(|_| ())
                        })?
                    }
                };
                report(&shape, which.name(), "fwd+bwd", both, 3.5 * fwd_flops);
                // Text only: scripts/gpu_check_table.py derives the same for ours and the peers.
                let bwd = both - fwd;
                let tflops = 2.5 * fwd_flops / (bwd * 1e-3) / 1e12;
                println!(
                    "{shape:<24} {:<12} {:<8} {bwd:>10.3} ms {tflops:>8.1} TFLOP/s  ((fwd+bwd) - fwd)",
                    which.name(),
                    "bwd"
                );
            }
        }
        if once {
            return Ok(());
        }
        decode(&dev, false)
    }

    /// Packed rows: our kernels (`Auto`: the tensor cores) under the document mask of
    /// [`PACKED_DOCS`], forward and forward+backward (direct, as above).
    fn packed(dev: &Device) -> candle_core::Result<()> {
        use temper::kernels::attention::Segments;
        let (b, h, s, d) = (8usize, 16usize, 2048usize, 128usize);
        assert_eq!(PACKED_DOCS.iter().sum::<usize>(), s);
        let shape = format!("packed B{b} H{h} S{s} D{d}");
        let pairs: usize = PACKED_DOCS.iter().map(|n| n * (n + 1) / 2).sum();
        let fwd_flops = 4.0 * (b * h * d * pairs) as f64;
        let segments = Segments::from_lengths(&vec![PACKED_DOCS.to_vec(); b], s, dev)?;
        let mask = AttnMask {
            causal_offset: Some(0),
            key_valid: None,
            segments: Some(&segments),
            window: None,
            softcap: None,
        };
        let mk = |seed: f64| -> candle_core::Result<Tensor> {
            (Tensor::randn(0f32, 1.0, (b, h, s, d), dev)? + seed)?.to_dtype(DType::BF16)
        };
        let (q, k, v, dy) = (mk(0.0)?, mk(0.01)?, mk(-0.01)?, mk(0.0)?);
        let scale = 1.0 / (d as f64).sqrt();
        println!("attention over packed rows (documents {PACKED_DOCS:?} in each row), bf16");
        let direct = AttentionDirect::new(&q, &k, &v, &mask, scale, AttnImpl::Auto)?
            .ok_or_else(|| candle_core::Error::Msg("no kernel for this shape".into()))?;
        time_direct(dev, "attention_packed", &shape, &direct, &dy, fwd_flops)
    }

    /// Times `direct`'s forward and forward+backward (driven by `dy`) and prints both, as text
    /// and as `bench` JSON lines (`impl` "ours"), TFLOP/s from the forward's `fwd_flops`.
    fn time_direct(
        dev: &Device,
        bench: &str,
        shape: &str,
        direct: &AttentionDirect,
        dy: &Tensor,
        fwd_flops: f64,
    ) -> candle_core::Result<()> {
        let fwd = cuda_time_ms(dev, WARMUP, 20, || direct.forward().map(|_| ()))?;
        let both = cuda_time_ms(dev, WARMUP, 20, || {
            let y = direct.forward()?;
            direct.backward(&y, dy).map(|_| ())
        })?;
        for (pass, ms, flops) in [("fwd", fwd, fwd_flops), ("fwd+bwd", both, 3.5 * fwd_flops)] {
            let tflops = flops / (ms * 1e-3) / 1e12;
            println!("{shape:<36} ours     {pass:<8} {ms:>10.3} ms {tflops:>8.1} TFLOP/s");
            println!(
                "{{\"bench\":\"{bench}\",\"shape\":\"{shape}\",\"impl\":\"ours\",\"pass\":\"{pass}\",\"ms\":{ms:.4},\"tflops\":{tflops:.2}}}"
            );
        }
        Ok(())
    }

    /// Gemma 2's capped scores: our kernels (`Auto`) at Gemma 2 2B's heads, forward and
    /// forward+backward (direct, as above), checked against the reference's gradients first.
    fn softcapped(dev: &Device) -> candle_core::Result<()> {
        let (b, hq, hkv, s, d, cap) = (4usize, 8usize, 4usize, 2048usize, 256usize, 50.0);
        let shape = format!("softcap B{b} Hq{hq} Hkv{hkv} S{s} D{d}");
        let fwd_flops = 4.0 * (b * hq * s * s * d) as f64 / 2.0;
        let mask = AttnMask {
            softcap: Some(cap),
            ..mask()
        };
        let mk = |h: usize, seed: f64| -> candle_core::Result<Tensor> {
            (Tensor::randn(0f32, 1.0, (b, h, s, d), dev)? + seed)?.to_dtype(DType::BF16)
        };
        let (q, k, v, dy) = (mk(hq, 0.0)?, mk(hkv, 0.01)?, mk(hkv, -0.01)?, mk(hq, 0.0)?);
        let scale = 1.0 / (d as f64).sqrt();
        println!("attention with Gemma 2's soft cap ({cap}), causal bf16");
        let direct = AttentionDirect::new(&q, &k, &v, &mask, scale, AttnImpl::Auto)?
            .ok_or_else(|| candle_core::Error::Msg("no kernel for this shape".into()))?;
        let y = direct.forward()?;
        let y_ref = attention_reference(&q, &k, &v, &mask, scale)?;
        let err = (y.to_dtype(DType::F32)? - y_ref.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        println!("{shape}: max |ours - reference| {err:.2e} (bf16 output)");
        if err > 0.05 {
            candle_core::bail!("{shape}: the capped kernel is off the reference by {err}");
        }
        time_direct(dev, "attention_softcap", &shape, &direct, &dy, fwd_flops)
    }

    /// One query row per head against a cache of T keys (a generation step): GPT-2 small at
    /// 64 rows and the mean cache length of `bench-generate`, and a Llama-style GQA shape.
    /// A decode step streams the cache, so the figure beside the time is the bytes of keys
    /// and values read per second, against the card's copy bandwidth.
    /// `once`: each kernel launched once, untimed but for ncu (`TEMPER_BENCH_DECODE=1` with
    /// `TEMPER_BENCH_ONCE=1`: scripts/gpu-check.sh's decode profile).
    fn decode(dev: &Device, once: bool) -> candle_core::Result<()> {
        println!("attention decode, bf16, one query row per head (GB/s: keys and values read)");
        for (b, hq, hkv, t, d) in [
            (64usize, 12usize, 12usize, 320usize, 64usize),
            (16, 32, 8, 2048, 128),
            (64, 4, 1, 1024, 256),
        ] {
            let shape = format!("decode B{b} Hq{hq} Hkv{hkv} T{t} D{d}");
            let mk = |dims: (usize, usize, usize, usize)| -> candle_core::Result<Tensor> {
                Tensor::randn(0f32, 1.0, dims, dev)?.to_dtype(DType::BF16)
            };
            let (q, k, v) = (mk((b, hq, 1, d))?, mk((b, hkv, t, d))?, mk((b, hkv, t, d))?);
            let mask = AttnMask {
                causal_offset: Some(t - 1),
                key_valid: None,
                segments: None,
                window: None,
                softcap: None,
            };
            let scale = 1.0 / (d as f64).sqrt();
            let bytes = (2 * b * hkv * t * d * 2) as f64;
            let imps = [("ours", AttnImpl::Auto), ("ours-simple", AttnImpl::Simple)];
            for (name, imp) in imps
                .into_iter()
                .filter(|(_, imp)| d <= MAX_HEAD_DIM || *imp != AttnImpl::Simple)
            {
                let (warmup, reps) = if once { (0, 1) } else { (WARMUP, 50) };
                let ms = cuda_time_ms(dev, warmup, reps, || {
                    attention_with(&q, &k, &v, &mask, scale, imp).map(|_| ())
                })?;
                let gbps = bytes / (ms * 1e-3) / 1e9;
                println!("{shape:<34} {name:<12} {ms:>8.4} ms {gbps:>8.0} GB/s");
                println!(
                    "{{\"bench\":\"attention_decode\",\"shape\":\"{shape}\",\"impl\":\"{name}\",\"ms\":{ms:.5},\"gbps\":{gbps:.1}}}"
                );
            }
        }
        Ok(())
    }
}
