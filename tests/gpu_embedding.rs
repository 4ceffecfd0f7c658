//! The embedding kernels (`kernels/embedding.cu`) against the reference on fresh random
//! tables and ids of awkward sizes: many repeats of a few ids (the backward's grouping), a
//! width that is not a multiple of 32, f32 / bf16 / f16 outputs; and the gradient is the same
//! bit for bit on two runs (no atomics).
//!
//! Needs feature `cuda` and a CUDA device; otherwise it prints why it did not run on stderr
//! and passes. Rows must match exactly (a cast of the same f32); gradients within
//! `grad_tol` of tests/common/gpu.rs (the reference sums repeated rows in the compute dtype).

mod common;

#[test]
fn embedding_kernel_matches_reference() {
    #[cfg(feature = "cuda")]
    common::gpu::run(
        "embedding_kernel_matches_reference",
        gpu::embedding_kernel_matches_reference,
    );
    #[cfg(not(feature = "cuda"))]
    {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED (built without feature cuda): embedding_kernel_matches_reference"
        );
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::{DType, Device, Tensor, Var};
    use temper::kernels::embedding::{fused, reference};

    use super::common::gpu::{assert_close, grad_tol, host, tol, Rng};

    pub fn embedding_kernel_matches_reference(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(0xe3b);
        for &(vocab, h, n, distinct) in &[
            (50257usize, 771usize, 1031usize, 7usize),
            (13, 5, 64, 13),
            (1, 33, 3, 1),
        ] {
            let table = Var::from_tensor(
                &Tensor::from_vec(rng.vec(vocab * h, -1.0, 1.0), (vocab, h), dev).unwrap(),
            )
            .unwrap();
            let pool: Vec<u32> = (0..distinct).map(|_| rng.below(vocab) as u32).collect();
            let ids: Vec<u32> = (0..n).map(|_| pool[rng.below(distinct)]).collect();
            let ids = Tensor::from_vec(ids, n, dev).unwrap();
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let dy = Tensor::from_vec(rng.vec(n * h, -1.0, 1.0), (n, h), dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let run = |f: &dyn Fn(&Tensor, &Tensor, DType) -> candle_core::Result<Tensor>| {
                    let y = f(table.as_tensor(), &ids, dtype).unwrap();
                    let g = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
                    (y, g.get(table.as_tensor()).unwrap().clone())
                };
                let (yk, gk) = run(&fused);
                let (yr, gr) = run(&reference);
                let what = |s: &str| format!("seed {seed:#x} V{vocab} H{h} n{n} {dtype:?} {s}");
                assert_eq!(host(&yk), host(&yr), "{}", what("rows"));
                assert_close(
                    &what("table gradient"),
                    &gk,
                    &gr,
                    tol(dtype),
                    grad_tol(dtype),
                );
                let (_, again) = run(&fused);
                assert_eq!(
                    host(&gk),
                    host(&again),
                    "{}",
                    what("gradient differs between runs")
                );
            }
        }
    }
}
