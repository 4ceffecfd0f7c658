//! The fused optimizer step (`kernels/adamw.cu`: gradient norm, clipping, AdamW) against the
//! reference on fresh random parameters of awkward sizes (one element, one past a chunk of
//! 65536, odd 2-D shapes), over three steps with clipping active on some of them, with and
//! without weight decay and per-parameter learning-rate scales.
//!
//! Needs feature `cuda` and a CUDA device; otherwise it prints why it did not run on stderr
//! and passes. Tolerance: every weight and moment within 1e-5 relative (the update repeats
//! the reference's f32 operations one by one; only the norm's summation order differs).

mod common;

#[test]
fn adamw_kernel_matches_reference() {
    #[cfg(feature = "cuda")]
    common::gpu::run(
        "adamw_kernel_matches_reference",
        gpu::adamw_kernel_matches_reference,
    );
    #[cfg(not(feature = "cuda"))]
    {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED (built without feature cuda): adamw_kernel_matches_reference"
        );
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::{Device, Tensor, Var};
    use temper::kernels::adamw::{update, Hyper, Slot};
    use temper::kernels::KernelChoice;

    use super::common::gpu::{assert_close, Rng};

    pub fn adamw_kernel_matches_reference(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(0xada3);
        let shapes: [&[usize]; 5] = [&[1], &[65537], &[3, 70001], &[129, 33], &[7]];
        let cpu = Device::Cpu;
        let make = |rng: &mut Rng, s: &[usize], lo: f32, hi: f32| {
            let n = s.iter().product();
            Tensor::from_vec(rng.vec(n, lo, hi), s, &cpu).unwrap()
        };
        let p0: Vec<Tensor> = shapes
            .iter()
            .map(|s| make(&mut rng, s, -1.0, 1.0))
            .collect();
        let m0: Vec<Tensor> = shapes
            .iter()
            .map(|s| make(&mut rng, s, -0.1, 0.1))
            .collect();
        let v0: Vec<Tensor> = shapes
            .iter()
            .map(|s| make(&mut rng, s, 0.0, 0.01))
            .collect();
        let on = |ts: &[Tensor], d: &Device| -> Vec<Tensor> {
            ts.iter().map(|t| t.to_device(d).unwrap()).collect()
        };
        let vars = |d: &Device| -> Vec<Var> {
            p0.iter()
                .map(|t| Var::from_tensor(&t.to_device(d).unwrap()).unwrap())
                .collect()
        };
        let (pg, pc) = (vars(dev), vars(&cpu));
        let (mut mg, mut vg) = (on(&m0, dev), on(&v0, dev));
        let (mut mc, mut vc) = (m0.clone(), v0.clone());
        for (t, max_norm) in [(1usize, 1.0), (2, 1e9), (3, 0.5)] {
            let grads: Vec<Tensor> = shapes
                .iter()
                .map(|s| make(&mut rng, s, -0.05, 0.05))
                .collect();
            let h = Hyper {
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                t,
                max_norm,
            };
            let gg = on(&grads, dev);
            let run = |vars: &[Var], ms: &mut [Tensor], vs: &mut [Tensor], gs: &[Tensor], k| {
                let mut slots: Vec<Slot> = vars
                    .iter()
                    .zip(ms.iter_mut().zip(vs.iter_mut()))
                    .zip(gs)
                    .enumerate()
                    // The last parameter is another rank's (ZeRO-1): in the norm, not updated.
                    .filter(|(i, _)| *i + 1 < vars.len())
                    .map(|(i, ((param, (m, v)), grad))| Slot {
                        param,
                        m,
                        v,
                        grad,
                        lr: 1e-3 * (1.0 + i as f64),
                        weight_decay: if i % 2 == 0 { 0.1 } else { 0.0 },
                    })
                    .collect();
                update(gs, &mut slots, &h, k).unwrap()
            };
            let n_gpu = run(&pg, &mut mg, &mut vg, &gg, KernelChoice::Custom);
            let n_cpu = run(&pc, &mut mc, &mut vc, &grads, KernelChoice::Reference);
            assert!(
                (n_gpu - n_cpu).abs() <= 1e-5 * n_cpu,
                "seed {seed:#x} step {t}: norm {n_gpu} vs {n_cpu}"
            );
            for i in 0..shapes.len() {
                let what = |x: &str| format!("seed {seed:#x} step {t} param {i} {x}");
                assert_close(
                    &what("weight"),
                    pg[i].as_tensor(),
                    pc[i].as_tensor(),
                    1e-5,
                    (1e-6, 1e-5),
                );
                assert_close(&what("m"), &mg[i], &mc[i], 1e-5, (1e-7, 1e-5));
                assert_close(&what("v"), &vg[i], &vc[i], 1e-5, (1e-9, 1e-5));
            }
        }
    }
}
