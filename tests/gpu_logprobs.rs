//! The fused loss head (`kernels/logprobs.cu`: targets' log-probabilities and their gradient)
//! against the reference composite, on fresh random logits of awkward shapes (a vocabulary of
//! 1, 37 and GPT-2's 50257; odd row counts), in f32, bf16 and f16, with an upstream gradient
//! that is zero on some rows (masked tokens), as the training loss drives it.
//!
//! Needs feature `cuda` and a CUDA device; otherwise it prints why it did not run on stderr
//! and passes. Tolerances: tests/common/gpu.rs (`tol`, `grad_tol`), with the seed in any
//! failure message (`TEMPER_TEST_SEED` replays it).

mod common;

#[test]
fn logprobs_kernel_matches_reference() {
    #[cfg(feature = "cuda")]
    common::gpu::run(
        "logprobs_kernel_matches_reference",
        gpu::logprobs_kernel_matches_reference,
    );
    #[cfg(not(feature = "cuda"))]
    {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED (built without feature cuda): logprobs_kernel_matches_reference"
        );
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::{DType, Device, Tensor, Var};
    use temper::kernels::logprobs::{fused, reference};

    use super::common::gpu::{assert_close, grad_tol, tol, Rng};

    pub fn logprobs_kernel_matches_reference(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(0x10b5);
        for &(rows, vocab) in &[(3usize, 1usize), (17, 37), (5, 50257), (1, 50257)] {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let x = Tensor::from_vec(rng.vec(rows * vocab, -8.0, 8.0), (rows, vocab), dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let t: Vec<u32> = (0..rows).map(|_| rng.below(vocab) as u32).collect();
                let t = Tensor::from_vec(t, rows, dev).unwrap();
                let w: Vec<f32> = (0..rows)
                    .map(|i| {
                        if i % 3 == 1 {
                            0.0
                        } else {
                            rng.uniform(-1.0, 1.0)
                        }
                    })
                    .collect();
                let w = Tensor::from_vec(w, rows, dev).unwrap();
                let run = |f: &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>| {
                    let v = Var::from_tensor(&x).unwrap();
                    let lp = f(v.as_tensor(), &t).unwrap();
                    let g = (&lp * &w).unwrap().sum_all().unwrap().backward().unwrap();
                    (lp, g.get(v.as_tensor()).unwrap().clone())
                };
                let (lp_k, dx_k) = run(&fused);
                let (lp_r, dx_r) = run(&reference);
                let what = |s: &str| format!("seed {seed:#x} {rows}x{vocab} {dtype:?} {s}");
                assert_eq!(dx_k.dtype(), dtype, "{}", what("gradient dtype"));
                assert_close(
                    &what("logp"),
                    &lp_k,
                    &lp_r,
                    tol(DType::F32) * 10.0,
                    (1e-4, 1e-4),
                );
                assert_close(
                    &what("dlogits"),
                    &dx_k,
                    &dx_r.to_dtype(dtype).unwrap(),
                    tol(dtype),
                    grad_tol(dtype),
                );
            }
        }
    }
}
