//! The data-parallel gradient all-reduce over NCCL for GPT-2 124M's parameter set (148
//! tensors, 124.4M f32 values): temper's bucketed path (pack each 25 MB bucket, one NCCL
//! all-reduce, unpack) against one raw NCCL all-reduce of the same bytes in one buffer. Both
//! run at the world size this process is given (1 on a single GPU, where NCCL's all-reduce is
//! a device copy; under torchrun's variables, one process per GPU (`cuda:LOCAL_RANK`), the
//! real thing). GB/s is algorithm bandwidth: the buffer's bytes over the time (NCCL's bus
//! bandwidth is that times 2 (n - 1) / n).
//!
//! Run: `cargo bench --features nccl --bench allreduce` (or the packed binary from
//! gpu-build.sh). Without feature `nccl`, or without a GPU, it says so and exits.

#[cfg(feature = "nccl")]
fn main() -> anyhow::Result<()> {
    use std::time::Instant;

    use candle_core::{DType, Device, Tensor};
    use temper::dist::{nccl::NcclGroup, Communicator, Rank};

    let rank = match Rank::from_env(|k| std::env::var(k).ok())? {
        r if r.world > 1 => r,
        _ => Rank {
            master: Some(("127.0.0.1".into(), free_port()?)),
            ..Rank::single()
        },
    };
    let Ok(dev) = Device::new_cuda(rank.local_rank) else {
        eprintln!("SKIPPED (no CUDA device {}): allreduce", rank.local_rank);
        return Ok(());
    };
    let comm = NcclGroup::connect(&rank, &dev, std::time::Duration::from_secs(60))?;
    let (d, v, l, ctx) = (768usize, 50257usize, 12usize, 1024usize);
    let mut shapes: Vec<Vec<usize>> = vec![vec![v, d], vec![ctx, d]];
    for _ in 0..l {
        for s in [
            vec![d],
            vec![d],
            vec![d, 3 * d],
            vec![3 * d],
            vec![d, d],
            vec![d],
            vec![d],
            vec![d],
            vec![d, 4 * d],
            vec![4 * d],
            vec![4 * d, d],
            vec![d],
        ] {
            shapes.push(s);
        }
    }
    shapes.extend([vec![d], vec![d]]);
    let n: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    let grads: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn(0f32, 1.0, s.as_slice(), &dev))
        .collect::<candle_core::Result<_>>()?;
    let flat = Tensor::randn(0f32, 1.0, n, &dev)?;
    let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        for _ in 0..3 {
            f()?;
        }
        dev.synchronize()?;
        let mut ts = vec![];
        for _ in 0..20 {
            let t0 = Instant::now();
            f()?;
            dev.synchronize()?;
            ts.push(t0.elapsed().as_secs_f64());
        }
        ts.sort_by(f64::total_cmp);
        Ok(ts[ts.len() / 2])
    };
    let bucketed = time(&mut || {
        let mut g = grads.clone();
        comm.all_reduce_mean_tensors(&mut g)?;
        Ok(())
    })?;
    let raw = time(&mut || {
        let mut g = vec![flat.clone()];
        comm.all_reduce_mean_tensors(&mut g)?;
        Ok(())
    })?;
    let bytes = (n * DType::F32.size_in_bytes()) as f64;
    // One JSON line per measurement, as scripts/gpu-check.sh reads them.
    for (imp, secs) in [("ours-bucketed", bucketed), ("ours-one-buffer", raw)] {
        println!(
            "{}",
            serde_json::json!({
                "bench": "allreduce",
                "shape": format!("gpt2-124m world{}", comm.world()),
                "impl": imp,
                "tensors": shapes.len(),
                "values": n,
                "ms": secs * 1e3,
                "gbps": bytes / secs / 1e9,
            })
        );
    }
    Ok(())
}

#[cfg(feature = "nccl")]
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(not(feature = "nccl"))]
fn main() {
    eprintln!("SKIPPED (built without feature nccl): allreduce");
}
