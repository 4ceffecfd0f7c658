//! The NCCL backend at world size 1 on one GPU: its collectives leave values as they are
//! (one bucket and several, f32 and bf16), and a pretraining run whose gradients go through it
//! gives the losses of a run without it.
//!
//! Needs feature `nccl` and a CUDA device; otherwise each test prints why it did not run on
//! stderr and passes. A multi-GPU machine checks more: see docs/ARCHITECTURE.md
//! ("Checking data parallelism on several GPUs").

mod common;

macro_rules! nccl_test {
    ($name:ident) => {
        #[test]
        fn $name() {
            #[cfg(feature = "nccl")]
            common::gpu::run(stringify!($name), gpu::$name);
            #[cfg(not(feature = "nccl"))]
            {
                use std::io::Write;
                let reason = "SKIPPED (built without feature nccl)";
                let _ = writeln!(std::io::stderr(), "{reason}: {}", stringify!($name));
            }
        }
    };
}

nccl_test!(nccl_collectives_at_world_one_keep_values);
nccl_test!(nccl_at_world_one_trains_like_no_backend);

#[cfg(feature = "nccl")]
mod gpu {
    use std::sync::Arc;
    use std::time::Duration;

    use candle_core::{DType, Device, Tensor};
    use temper::config::{DeviceChoice, RunConfig, Stage};
    use temper::dist::{nccl::NcclGroup, Communicator, Rank, Solo};
    use temper::stages::{pretrain, Env, Start};

    fn group(dev: &Device) -> NcclGroup {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let rank = Rank {
            master: Some(("127.0.0.1".into(), port)),
            ..Rank::single()
        };
        NcclGroup::connect(&rank, dev, Duration::from_secs(30)).unwrap()
    }

    pub fn nccl_collectives_at_world_one_keep_values(dev: &Device) {
        let comm = group(dev);
        // 7M values: larger than one 25 MB bucket, so the split path runs too.
        let ts: Vec<Tensor> = [vec![7_000_001usize], vec![33, 65], vec![1]]
            .iter()
            .map(|s| Tensor::randn(0f32, 1.0, s.as_slice(), dev).unwrap())
            .chain([Tensor::randn(0f32, 1.0, (17, 3), dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()])
            .collect();
        let mut got = ts.clone();
        comm.all_reduce_mean_tensors(&mut got).unwrap();
        comm.broadcast_tensors(0, &mut got).unwrap();
        for (a, b) in ts.iter().zip(&got) {
            assert_eq!(a.dims(), b.dims());
            assert_eq!(a.dtype(), b.dtype());
            let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0);
        }
        let mut host = vec![1.5f32, -2.0, 3.25];
        comm.all_reduce_mean(&mut host).unwrap();
        assert_eq!(host, [1.5, -2.0, 3.25]);
    }

    pub fn nccl_at_world_one_trains_like_no_backend(_: &Device) {
        let run = |nccl: bool, dir: &std::path::Path| -> f64 {
            let mut cfg = RunConfig::for_stage(Stage::Pretrain);
            cfg.device = DeviceChoice::Cuda;
            cfg.train.steps = 8;
            cfg.train.eval_every = 8;
            cfg.train.log_every = 1;
            let mut env = Env::prepare_in(cfg, dir, Start::Fresh, Arc::new(Solo)).unwrap();
            if nccl {
                // On the run's own device, so NCCL shares its stream.
                let c: Arc<dyn Communicator> = Arc::new(group(&env.device));
                env.comm = c;
            }
            let loss = pretrain::run(&env).unwrap().train_loss;
            loss.expect("eight steps trained")
        };
        let d = tempfile::tempdir().unwrap();
        let solo = run(false, &d.path().join("solo"));
        let nccl = run(true, &d.path().join("nccl"));
        assert_eq!(solo, nccl, "NCCL at world size 1 changed the training");
    }
}
