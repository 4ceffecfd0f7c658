//! One pretraining step (forward, backward, AdamW) with our kernels against the same step
//! with the reference implementations, in one run. On CUDA it uses the GPT-2-small shape
//! (12 layers, 768 wide, context 1024, batch 16, bf16 compute, f32 master weights); on a CPU
//! a tiny shape, so the harness itself stays checked.
//!
//! `cargo bench --bench train_step [-- --steps N --batch B --seq T --impl ours|reference|both|ours-casts|ours-graph|ours-recompute]`
//!
//! Two ablations of `ours`: `ours-casts`, our kernels with `[train] compute_copies = false`,
//! each f32 master cast in every step instead of AdamW's bf16 compute copies (and so the
//! blocks in candle's graph: the tape needs the copies); and `ours-graph`, with
//! `[train] tape = "off"`, the blocks recorded in candle's autograd graph instead of our tape
//! (src/tape/mod.rs). `reference` runs candle's graph too. `ours-recompute` is ours with
//! `[train] gradient_checkpointing`: each block's activations dropped after the forward and
//! recomputed in the backward (src/tape/recompute.rs), memory for time.
//!
//! Besides the human lines it prints one JSON line per implementation
//! (`{"bench":"train_step",...}`, tokens/s from the median step) for scripts/gpu-check.sh,
//! which runs each implementation in its own process so that the GPU's peak memory it reads
//! belongs to one of them. After the timed steps, one more step runs under `--profile`'s
//! profiler (src/train/profile.rs) and is not timed with them: its region and kernel-op table
//! and the autograd graph's size are printed, and the graph as one JSON line
//! (`{"bench":"train_step_graph",...}`).

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use temper::config::{ModelConfig, TrainConfig};
use temper::kernels::KernelSet;
use temper::model::linear::Ctx;
use temper::model::{Fwd, Transformer};
use temper::train::loss::scalar;
use temper::train::optimizer::AdamW;
use temper::train::params::{Net, ParamStore};
use temper::train::profile::{Mark, Profiler, Region};

#[path = "common/timing.rs"]
mod timing;
use timing::profiler_range;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The high-water mark of the bytes in use in the device's default memory pool (where
/// candle's stream-ordered allocations come from) since the last call, which resets it: the
/// allocator's own peak, comparable with PyTorch's `max_memory_allocated`, where nvidia-smi's
/// samples can miss a peak that lasts milliseconds. `None` without CUDA.
fn pool_peak_bytes() -> Option<u64> {
    #[cfg(feature = "cuda")]
    {
        use cudarc::driver::sys;
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        // SAFETY: plain driver queries on device 0, the bench's device, whose context the
        // bench has made; `value` is the u64 the attribute is documented to be.
        unsafe {
            let mut dev = 0;
            let mut pool = std::ptr::null_mut();
            let mut value = 0u64;
            let ok = sys::cuDeviceGet(&mut dev, 0) == sys::CUresult::CUDA_SUCCESS
                && sys::cuDeviceGetDefaultMemPool(&mut pool, dev) == sys::CUresult::CUDA_SUCCESS
                && sys::cuMemPoolGetAttribute(pool, attr, (&mut value as *mut u64).cast())
                    == sys::CUresult::CUDA_SUCCESS;
            let mut zero = 0u64;
            let _ = sys::cuMemPoolSetAttribute(pool, attr, (&mut zero as *mut u64).cast());
            ok.then_some(value)
        }
    }
    #[cfg(not(feature = "cuda"))]
    None
}

/// One implementation of the step: its kernels, whether AdamW keeps bf16 compute copies
/// (`[train] compute_copies`) or the forward casts each master, and whether the blocks are
/// recorded on our tape (`[train] tape`), and whether they are recomputed in the backward
/// (`[train] gradient_checkpointing`).
#[derive(Clone, Copy)]
struct Impl {
    name: &'static str,
    kernels: KernelSet,
    copies: bool,
    tape: bool,
    recompute: bool,
}

/// Median step time in seconds, the losses of every step, and the profile of one more step.
fn run(
    dev: &Device,
    cfg: &ModelConfig,
    imp: Impl,
    dtype: DType,
    b: usize,
    t: usize,
    steps: usize,
) -> Result<(f64, Vec<f64>, Profiler)> {
    let kernels = imp.kernels;
    let mut store = ParamStore::new(dev.clone(), 7);
    let net = Transformer::new(&mut store.scope(Net::Policy), cfg, None)?;
    let tc = TrainConfig::default();
    let mut opt = AdamW::new(&store, &|_| true, &tc)?;
    // As the training loop does (`train.compute_copies`, on by default).
    if imp.copies {
        opt.keep_compute_copies(dtype)?;
    }
    let ctx = Ctx {
        dtype,
        kernels,
        use_lora: false,
        dropout_seed: None,
        neftune_alpha: None,
        tape: imp.tape,
        recompute_blocks: imp.recompute,
    };
    let data: Vec<u32> = (0..b * (t + 1))
        .map(|i| ((i * 7919 + 13) % cfg.vocab_size) as u32)
        .collect();
    let all = Tensor::from_vec(data, (b, t + 1), dev)?;
    let x = all.narrow(1, 0, t)?.contiguous()?;
    let y = all.narrow(1, 1, t)?.contiguous()?;
    let mut times = vec![];
    let mut losses = vec![];
    let mut prof = Profiler::new(dev);
    // Two warm-up steps, the timed ones, then one profiled step outside the timing. Only that
    // step records events: the timed ones carry no profiler work.
    // With TEMPER_CUDA_PROFILER_STEP set, the first timed step runs inside
    // cuProfilerStart/Stop, so that `ncu --profile-from-start off` sees exactly one
    // steady-state step (scripts/gpu-check.sh, docs/GPU.md).
    let ncu_range = std::env::var_os("TEMPER_CUDA_PROFILER_STEP").is_some();
    for i in 0..steps + 3 {
        let profiled = i == steps + 2;
        let ncu_step = ncu_range && i == 2;
        if ncu_step {
            dev.synchronize()?;
            profiler_range(true);
        }
        let mark = |p: &Profiler| -> Result<Option<Mark>> {
            Ok(match profiled {
                true => Some(p.mark()?),
                false => None,
            })
        };
        if profiled {
            prof.step_started();
        }
        let t0 = Instant::now();
        let m = mark(&prof)?;
        let f = Fwd {
            ctx,
            positions: None,
            key_valid: None,
            segments: None,
        };
        let loss = net.target_logprobs(&x, &y, &f)?.neg()?.mean_all()?;
        if let Some(m) = m {
            prof.note_graph(&loss);
            prof.span(Region::Forward, m)?;
        }
        let m = mark(&prof)?;
        let grads = opt.collect(&temper::tape::backward(&loss)?)?;
        if let Some(m) = m {
            prof.span(Region::Backward, m)?;
        }
        let m = mark(&prof)?;
        opt.update(&grads, 3e-4, 1.0, kernels.adamw)?;
        if let Some(m) = m {
            prof.span(Region::Optimizer, m)?;
            prof.step_done();
        }
        losses.push(scalar(&loss)?); // forces a device sync
        if ncu_step {
            dev.synchronize()?;
            profiler_range(false);
        }
        if i >= 2 && !profiled {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], losses, prof))
}

fn main() -> Result<()> {
    let (dev, mut cfg, dtype, b, t) = match Device::new_cuda(0) {
        Ok(d) => (d, ModelConfig::preset("gpt2")?, DType::BF16, 16, 1024),
        Err(_) => {
            println!("train_step: no CUDA device; timing the tiny shape on the CPU (the GPU comparison needs --features cuda and a GPU)");
            (Device::Cpu, ModelConfig::preset("tiny")?, DType::F32, 8, 64)
        }
    };
    let b = arg("--batch", b);
    let t = arg("--seq", t);
    let steps = arg("--steps", 5);
    cfg.max_position_embeddings = cfg.max_position_embeddings.max(t);
    let tokens = (b * t) as f64;
    let which = std::env::args()
        .skip_while(|a| a != "--impl")
        .nth(1)
        .unwrap_or_else(|| "both".into());
    if !matches!(
        which.as_str(),
        "ours" | "reference" | "both" | "ours-casts" | "ours-graph" | "ours-recompute"
    ) {
        anyhow::bail!(
            "--impl {which}: expected ours, reference, both, ours-casts, ours-graph or ours-recompute"
        );
    }
    println!(
        "shape: layers {} hidden {} batch {b} seq {t} dtype {dtype:?}",
        cfg.num_hidden_layers, cfg.hidden_size
    );
    let mut results = vec![];
    let imps = [
        ("ours", KernelSet::default(), true, true, false),
        ("reference", KernelSet::reference(), true, false, false),
        ("ours-casts", KernelSet::default(), false, false, false),
        ("ours-graph", KernelSet::default(), true, false, false),
        ("ours-recompute", KernelSet::default(), true, true, true),
    ]
    .map(|(name, kernels, copies, tape, recompute)| Impl {
        name,
        kernels,
        copies,
        tape,
        recompute,
    });
    for imp in imps {
        let name = imp.name;
        let picked = match which.as_str() {
            "both" => matches!(name, "ours" | "reference"),
            w => w == name,
        };
        if !picked {
            continue;
        }
        dev.synchronize()?;
        let _ = pool_peak_bytes();
        let (secs, losses, prof) = run(&dev, &cfg, imp, dtype, b, t, steps)?;
        dev.synchronize()?;
        let pool_peak = pool_peak_bytes();
        println!(
            "{name:<9} {:>9.1} ms/step {:>10.0} tokens/s",
            secs * 1e3,
            tokens / secs
        );
        let pool = pool_peak.map_or(String::new(), |p| {
            format!(",\"pool_peak_gib\":{:.3}", p as f64 / (1u64 << 30) as f64)
        });
        println!(
            "{{\"bench\":\"train_step\",\"impl\":\"{name}\",\"batch\":{b},\"seq\":{t},\"ms\":{:.3},\"tokens_per_s\":{:.1},\"first_loss\":{:.5},\"last_loss\":{:.5}{pool}}}",
            secs * 1e3,
            tokens / secs,
            losses.first().copied().unwrap_or(f64::NAN),
            losses.last().copied().unwrap_or(f64::NAN)
        );
        print!("{name}: {}", prof.table(tokens)?);
        if let Some(g) = prof.graph() {
            println!(
                "{{\"bench\":\"train_step_graph\",\"impl\":\"{name}\",\"nodes\":{},\"held_bytes\":{},\"zero_filled_bytes\":{},\"tape_ops\":{},\"tape_output_bytes\":{}}}",
                g.nodes, g.held_bytes, g.zero_filled_bytes, g.tape_ops, g.tape_output_bytes
            );
        }
        results.push((secs, losses));
    }
    if let [(ours, l_ours), (refr, l_ref)] = results.as_slice() {
        let max_dev = l_ours
            .iter()
            .zip(l_ref)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        println!(
            "speed-up {:.2}x; largest loss difference over {} steps {max_dev:.2e}",
            refr / ours,
            l_ours.len()
        );
    }
    Ok(())
}
