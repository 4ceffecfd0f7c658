//! The LayerNorm kernels (`kernels/layernorm.cu`) against the reference composite, on fresh
//! random inputs of awkward shapes (one column, GPT-2's 768, an odd 1031; one row, many rows),
//! in f32, bf16 and f16: the output and all three gradients under candle's autograd, and the
//! weight gradients bit-identical between two runs (fixed-order column sums).
//!
//! Needs feature `cuda` and a CUDA device; otherwise it prints why it did not run on stderr
//! and passes. Tolerances: tests/common/gpu.rs (`tol`, `elem_tol`, `grad_tol`).

mod common;

#[test]
fn layernorm_kernel_matches_reference() {
    #[cfg(feature = "cuda")]
    common::gpu::run(
        "layernorm_kernel_matches_reference",
        gpu::layernorm_kernel_matches_reference,
    );
    #[cfg(not(feature = "cuda"))]
    {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED (built without feature cuda): layernorm_kernel_matches_reference"
        );
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::{DType, Device, Tensor, Var};
    use temper::kernels::layernorm::{fused, reference};

    use super::common::gpu::{assert_close, elem_tol, grad_tol, host, tol, Rng};

    pub fn layernorm_kernel_matches_reference(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(0x1a7e);
        for &(rows, cols) in &[(1usize, 768usize), (513, 768), (7, 1031), (33, 1)] {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let t = |n: usize, lo: f32, hi: f32, shape: &[usize], rng: &mut Rng| {
                    Tensor::from_vec(rng.vec(n, lo, hi), shape, dev).unwrap()
                };
                let x = Var::from_tensor(
                    &t(rows * cols, -3.0, 3.0, &[rows, cols], &mut rng)
                        .to_dtype(dtype)
                        .unwrap(),
                )
                .unwrap();
                let w = Var::from_tensor(&t(cols, 0.5, 1.5, &[cols], &mut rng)).unwrap();
                let b = Var::from_tensor(&t(cols, -0.5, 0.5, &[cols], &mut rng)).unwrap();
                let dy = t(rows * cols, -1.0, 1.0, &[rows, cols], &mut rng)
                    .to_dtype(dtype)
                    .unwrap();
                let run =
                    |f: &dyn Fn(&Tensor, &Tensor, &Tensor, f64) -> candle_core::Result<Tensor>| {
                        let y = f(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
                        let g = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
                        let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
                        (y, get(&x), get(&w), get(&b))
                    };
                let ours = run(&fused);
                let refs = run(&reference);
                let what = |s: &str| format!("seed {seed:#x} {rows}x{cols} {dtype:?} {s}");
                assert_close(&what("y"), &ours.0, &refs.0, tol(dtype), elem_tol(dtype));
                assert_close(&what("dx"), &ours.1, &refs.1, tol(dtype), grad_tol(dtype));
                assert_close(&what("dw"), &ours.2, &refs.2, tol(dtype), grad_tol(dtype));
                assert_close(&what("db"), &ours.3, &refs.3, tol(dtype), grad_tol(dtype));
                let again = run(&fused);
                assert_eq!(
                    host(&ours.2),
                    host(&again.2),
                    "{}",
                    what("dw differs between runs")
                );
            }
        }
    }
}
