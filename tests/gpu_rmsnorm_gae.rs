//! Our RMSNorm and GAE CUDA kernels against the CPU references, on fresh random inputs of
//! awkward sizes, with every kernel output poisoned (NaN bytes) before the launch.
//!
//! Needs feature `cuda` and a CUDA device; otherwise every test prints
//! `SKIPPED (built without feature cuda): <name>` or `SKIPPED (no CUDA device): <name>` on
//! stderr (past cargo's output capture) and passes.
//! Tolerances (the values of `tol`, `elem_tol` and `grad_tol` in tests/common/gpu.rs): ‖out − ref‖ / ‖ref‖ under 1e-5 for f32, 1e-2 for bf16,
//! 5e-3 for f16 (twice that for RMSNorm gradients); and, so that a local error cannot hide in
//! the global norm, every element within `atol · max(1, max|ref|) + rtol · |ref|` with
//! (atol, rtol) = (1e-4, 1e-4) for f32, (2e-2, 2e-2) for bf16, (1e-2, 1e-2) for f16, twice
//! that for gradients; NaN never passes. Each run draws a new seed, printed in any failure
//! message; `TEMPER_TEST_SEED=<seed>` replays it (every test then uses that seed).

#[macro_use]
mod common;

// One test per kernel check: runs the body on the GPU when there is one, else says why not
// (`gpu_test!`, tests/common/mod.rs).
gpu_test!(rmsnorm_forward_matches_reference);
gpu_test!(rmsnorm_gradients_match_reference_autograd);
gpu_test!(rmsnorm_dispatcher_uses_the_kernel);
gpu_test!(rmsnorm_add_fused_matches_the_add_then_the_reference);
gpu_test!(rmsnorm_plus_one_f32_gains_match_the_reference);
gpu_test!(gae_matches_reference);
gpu_test!(gae_padding_is_an_episode_boundary_and_never_leaks);
gpu_test!(gae_empty_and_all_padding_batches);
gpu_test!(group_normalize_matches_reference);

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::{DType, Device, Tensor, Var};
    use temper::kernels::cuda::{gae as kgae, rmsnorm as krms};
    use temper::kernels::rmsnorm::Gain;
    use temper::kernels::{gae, rmsnorm, KernelChoice};

    use crate::common::gpu::*;

    const RMS_SHAPES: &[(usize, usize)] = &[
        (1, 1),
        (3, 7),
        (5, 33),
        (17, 768),
        (2, 1000),
        (13, 4096),
        (3, 8192),
        (2, 8193), // wider than the register path: the generic kernels
        (3, 20001),
        (0, 64), // no rows at all
    ];

    /// x in `dtype` on the GPU (optionally at an offset that defeats 16-byte loads) and the same
    /// values, already rounded to `dtype`, as f32 on the CPU.
    fn input(
        rng: &mut Rng,
        shape: (usize, usize),
        lo: f32,
        hi: f32,
        dtype: DType,
        dev: &Device,
        misalign: bool,
    ) -> (Tensor, Tensor) {
        let dims = [shape.0, shape.1];
        gpu_and_cpu(rng, &dims, (lo, hi), dtype, dev, usize::from(misalign))
    }

    pub fn rmsnorm_forward_matches_reference(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(1);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for &shape in RMS_SHAPES {
                for misalign in [false, true] {
                    let (x, x_ref) = input(&mut rng, shape, -2.0, 2.0, dtype, dev, misalign);
                    let (w, w_ref) = input(&mut rng, (1, shape.1), 0.5, 1.5, dtype, dev, false);
                    let (w, w_ref) = (w.squeeze(0).unwrap(), w_ref.squeeze(0).unwrap());
                    // One all-zero row: the inverse rms is then 1/sqrt(eps), exercising eps.
                    let (x, x_ref) = if shape.0 >= 3 {
                        let zero = |t: &Tensor| {
                            let z = t.narrow(0, 1, 1).unwrap().zeros_like().unwrap();
                            Tensor::cat(
                                &[
                                    &t.narrow(0, 0, 1).unwrap(),
                                    &z,
                                    &t.narrow(0, 2, shape.0 - 2).unwrap(),
                                ],
                                0,
                            )
                            .unwrap()
                        };
                        (zero(&x), zero(&x_ref))
                    } else {
                        (x, x_ref)
                    };
                    let y = krms::rms_norm(&x, &w, 1e-5, Gain::AsIs)
                        .unwrap()
                        .expect("kernel covers dtype");
                    assert_eq!(y.dims(), x.dims());
                    assert_eq!(y.dtype(), dtype);
                    let y_ref = rmsnorm::rms_norm_reference(&x_ref, &w_ref, 1e-5).unwrap();
                    assert_close(
                        &format!(
                            "rmsnorm fwd {dtype:?} {shape:?} misalign={misalign} (seed {seed})"
                        ),
                        &y,
                        &y_ref,
                        tol(dtype),
                        elem_tol(dtype),
                    );
                }
            }
        }
        // Leading dimensions other than one: [2, 3, 100].
        let (x, x_ref) = input(&mut rng, (6, 100), -1.0, 1.0, DType::F32, dev, false);
        let (w, w_ref) = input(&mut rng, (1, 100), 0.5, 1.5, DType::F32, dev, false);
        let x = x.reshape((2, 3, 100)).unwrap();
        let x_ref = x_ref.reshape((2, 3, 100)).unwrap();
        let y = krms::rms_norm_op(&x, &w.squeeze(0).unwrap(), 1e-6, Gain::AsIs).unwrap();
        let y_ref = rmsnorm::rms_norm_reference(&x_ref, &w_ref.squeeze(0).unwrap(), 1e-6).unwrap();
        assert_eq!(y.dims(), &[2, 3, 100]);
        assert_close(
            &format!("rmsnorm fwd rank 3 (seed {seed})"),
            &y,
            &y_ref,
            1e-5,
            elem_tol(DType::F32),
        );
    }

    pub fn rmsnorm_gradients_match_reference_autograd(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(2);
        let shapes: &[(usize, usize)] = &[
            (3, 7),
            (37, 96),
            (129, 768),
            (5, 1000),
            (301, 4096),
            (3, 8193),
            (1000, 64),
            (0, 64),
        ];
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for &shape in shapes {
                let (x, x_ref) = input(&mut rng, shape, -2.0, 2.0, dtype, dev, false);
                let (w, w_ref) = input(&mut rng, (1, shape.1), 0.5, 1.5, dtype, dev, false);
                let (dy, dy_ref) = input(&mut rng, shape, -1.0, 1.0, dtype, dev, false);
                let x = Var::from_tensor(&x).unwrap();
                let w = Var::from_tensor(&w.squeeze(0).unwrap()).unwrap();
                let x_ref = Var::from_tensor(&x_ref).unwrap();
                let w_ref = Var::from_tensor(&w_ref.squeeze(0).unwrap()).unwrap();

                let y = krms::rms_norm_op(&x, &w, 1e-5, Gain::AsIs).unwrap();
                let grads = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
                let y_ref = rmsnorm::rms_norm_reference(&x_ref, &w_ref, 1e-5).unwrap();
                let grads_ref = (y_ref * &dy_ref)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();

                for (what, ours, theirs) in [("dx", &x, &x_ref), ("dw", &w, &w_ref)] {
                    let g = grads
                        .get(ours)
                        .unwrap_or_else(|| panic!("{what}: no gradient"));
                    // With no rows candle's autograd leaves dx out (and dw, a sum over no
                    // rows, is zero): the reference gradient is then zeros.
                    let zeros = theirs.zeros_like().unwrap();
                    let g_ref = grads_ref.get(theirs).unwrap_or(&zeros);
                    assert_eq!(g.dims(), ours.dims());
                    assert_eq!(g.dtype(), dtype);
                    assert_close(
                        &format!("rmsnorm {what} {dtype:?} {shape:?} (seed {seed})"),
                        g,
                        g_ref,
                        tol(dtype) * 2.0,
                        grad_tol(dtype),
                    );
                    let a = host(g);
                    if shape.0 > 0 {
                        assert!(a.iter().any(|&v| v != 0.0), "{what} all zero {shape:?}");
                    }
                }
            }
        }
    }

    /// The residual add fused into RMSNorm on a block tape (`add_fused`): against candle's
    /// add and the reference norm on the CPU, the output (sum plus norm, so both outputs are
    /// read on) and the gradients of x, the residual and w; and with the residual one element
    /// off alignment (the scalar kernels; a constant then, since a variable is a fresh copy).
    pub fn rmsnorm_add_fused_matches_the_add_then_the_reference(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(4);
        // 8200: the generic (K = 0) path with 16-byte accesses; 8193 the same with scalar ones.
        let shapes: &[(usize, usize)] = &[
            (3, 7),
            (37, 96),
            (129, 768),
            (5, 1000),
            (3, 8193),
            (3, 8200),
        ];
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for &shape in shapes {
                for misalign in [false, true] {
                    let (x, x_ref) = input(&mut rng, shape, -2.0, 2.0, dtype, dev, false);
                    let (r, r_ref) = input(&mut rng, shape, -2.0, 2.0, dtype, dev, misalign);
                    let (w, w_ref) = input(&mut rng, (1, shape.1), 0.5, 1.5, dtype, dev, false);
                    let (dy, dy_ref) = input(&mut rng, shape, -1.0, 1.0, dtype, dev, false);
                    let var = |t: &Tensor| Var::from_tensor(t).unwrap();
                    let (x, w) = (var(&x), var(&w.squeeze(0).unwrap()));
                    let r = match misalign {
                        true => r,
                        false => var(&r).as_tensor().clone(),
                    };
                    let (x_ref, r_ref) = (var(&x_ref), var(&r_ref));
                    let w_ref = var(&w_ref.squeeze(0).unwrap());
                    let wt = w.as_tensor();
                    let y = temper::tape::segment(x.as_tensor(), |x| {
                        let (s, n) = krms::add_fused(x, &r, wt, 1e-5, Gain::AsIs)?;
                        Ok(temper::tape::add(&s, &n)?)
                    })
                    .unwrap();
                    let loss = (&y * &dy).unwrap().sum_all().unwrap();
                    let grads = temper::tape::backward(&loss).unwrap();
                    let sum = (x_ref.as_tensor() + r_ref.as_tensor()).unwrap();
                    let norm = rmsnorm::rms_norm_reference(&sum, &w_ref, 1e-5).unwrap();
                    let y_ref = (&sum + norm).unwrap();
                    let loss_ref = (&y_ref * &dy_ref).unwrap().sum_all().unwrap();
                    let grads_ref = loss_ref.backward().unwrap();
                    let what = |s: &str| {
                        format!(
                            "rmsnorm add {s} {dtype:?} {shape:?} misalign {misalign} (seed {seed})"
                        )
                    };
                    assert_close(&what("y"), &y, &y_ref, tol(dtype), elem_tol(dtype));
                    let mut pairs = vec![
                        ("dx", x.as_tensor(), x_ref.as_tensor()),
                        ("dw", wt, w_ref.as_tensor()),
                    ];
                    if !misalign {
                        pairs.push(("dr", &r, r_ref.as_tensor()));
                    }
                    for (name, ours, theirs) in pairs {
                        let g = grads.get(ours).unwrap_or_else(|| panic!("{name}: none"));
                        // With no rows candle's autograd leaves dx out (and dw, a sum over no
                        // rows, is zero): the reference gradient is then zeros.
                        let zeros = theirs.zeros_like().unwrap();
                        let g_ref = grads_ref.get(theirs).unwrap_or(&zeros);
                        assert_close(&what(name), g, g_ref, tol(dtype) * 2.0, grad_tol(dtype));
                    }
                }
            }
        }
    }

    pub fn rmsnorm_dispatcher_uses_the_kernel(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(3);
        let (x, x_ref) = input(&mut rng, (9, 320), -1.0, 1.0, DType::BF16, dev, false);
        let (w, w_ref) = input(&mut rng, (1, 320), 0.5, 1.5, DType::BF16, dev, false);
        let (w, w_ref) = (w.squeeze(0).unwrap(), w_ref.squeeze(0).unwrap());
        let y = rmsnorm::rms_norm(&x, &w, 1e-5, Gain::AsIs, KernelChoice::Custom).unwrap();
        assert!(y.device().is_cuda());
        let y_ref = rmsnorm::rms_norm_reference(&x_ref, &w_ref, 1e-5).unwrap();
        assert_close(
            &format!("rmsnorm dispatcher bf16 (seed {seed})"),
            &y,
            &y_ref,
            1e-2,
            elem_tol(DType::BF16),
        );
        // f64 has no kernel: the dispatcher must fall back, not fail.
        let x64 = x.to_dtype(DType::F64).unwrap();
        let w64 = w.to_dtype(DType::F64).unwrap();
        assert!(krms::rms_norm(&x64, &w64, 1e-5, Gain::AsIs)
            .unwrap()
            .is_none());
        rmsnorm::rms_norm(&x64, &w64, 1e-5, Gain::AsIs, KernelChoice::Custom).unwrap();
    }

    /// Gemma's norms: the gain `1 + w` formed in f32 from f32 offsets, under f32, bf16 and f16
    /// compute (the `_wf32` kernels for the 16-bit ones), against the reference by
    /// `Gain::PlusOne` on the CPU: the op's output and its gradients (dw in f32), and the
    /// residual add fused in on a block tape; w also one element off alignment (the scalar
    /// kernels), through the dispatcher.
    pub fn rmsnorm_plus_one_f32_gains_match_the_reference(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(5);
        let shapes: &[(usize, usize)] = &[(3, 7), (37, 96), (129, 1152), (5, 1000), (3, 8200)];
        let gain = Gain::PlusOne;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for &shape in shapes {
                let what = |s: &str| format!("rmsnorm 1+w {s} {dtype:?} {shape:?} (seed {seed})");
                let (x, x_ref) = input(&mut rng, shape, -2.0, 2.0, dtype, dev, false);
                let (r, r_ref) = input(&mut rng, shape, -2.0, 2.0, dtype, dev, false);
                let (w, w_ref) = input(&mut rng, (1, shape.1), -0.6, 0.6, DType::F32, dev, false);
                let (dy, dy_ref) = input(&mut rng, shape, -1.0, 1.0, dtype, dev, false);
                let var = |t: &Tensor| Var::from_tensor(t).unwrap();
                let (x, r, w) = (var(&x), var(&r), var(&w.squeeze(0).unwrap()));
                let (x_ref, r_ref) = (var(&x_ref), var(&r_ref));
                let w_ref = var(&w_ref.squeeze(0).unwrap());
                let reference = |x: &Tensor| {
                    let g = gain.of(w_ref.as_tensor()).unwrap();
                    rmsnorm::rms_norm_reference(x, &g, 1e-6).unwrap()
                };

                // The op alone, through candle's autograd.
                let y = krms::rms_norm_op(&x, &w, 1e-6, gain).unwrap();
                assert_eq!(y.dtype(), dtype);
                let y_ref = reference(x_ref.as_tensor());
                assert_close(&what("y"), &y, &y_ref, tol(dtype), elem_tol(dtype));
                let grads = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
                let loss_ref = (&y_ref * &dy_ref).unwrap().sum_all().unwrap();
                let grads_ref = loss_ref.backward().unwrap();
                let dw = grads.get(w.as_tensor()).expect("dw");
                assert_eq!(dw.dtype(), DType::F32, "dw in the offsets' dtype");
                for (name, ours, theirs) in [("dx", &x, &x_ref), ("dw", &w, &w_ref)] {
                    let g = grads.get(ours).unwrap_or_else(|| panic!("{name}: none"));
                    let g_ref = grads_ref.get(theirs).unwrap();
                    assert_close(&what(name), g, g_ref, tol(dtype) * 2.0, grad_tol(dtype));
                }

                // The residual add fused in, on a block tape.
                let wt = w.as_tensor();
                let y = temper::tape::segment(x.as_tensor(), |x| {
                    let (s, n) = krms::add_fused(x, &r, wt, 1e-6, gain)?;
                    Ok(temper::tape::add(&s, &n)?)
                })
                .unwrap();
                let grads = temper::tape::backward(&(&y * &dy).unwrap().sum_all().unwrap());
                let grads = grads.unwrap();
                let sum = (x_ref.as_tensor() + r_ref.as_tensor()).unwrap();
                let y_ref = (&sum + reference(&sum)).unwrap();
                let grads_ref = (&y_ref * &dy_ref).unwrap().sum_all().unwrap();
                let grads_ref = grads_ref.backward().unwrap();
                assert_close(&what("add y"), &y, &y_ref, tol(dtype), elem_tol(dtype));
                for (name, ours, theirs) in [
                    ("add dx", x.as_tensor(), x_ref.as_tensor()),
                    ("add dr", r.as_tensor(), r_ref.as_tensor()),
                    ("add dw", wt, w_ref.as_tensor()),
                ] {
                    let g = grads.get(ours).unwrap_or_else(|| panic!("{name}: none"));
                    let g_ref = grads_ref.get(theirs).unwrap();
                    assert_close(&what(name), g, g_ref, tol(dtype) * 2.0, grad_tol(dtype));
                }

                // w one element off its 16-byte boundary: the scalar kernels, via the
                // dispatcher.
                let (wm, wm_ref) = input(&mut rng, (1, shape.1), -0.6, 0.6, DType::F32, dev, true);
                let (wm, wm_ref) = (wm.squeeze(0).unwrap(), wm_ref.squeeze(0).unwrap());
                let y = rmsnorm::rms_norm(&x, &wm, 1e-6, gain, KernelChoice::Custom).unwrap();
                let g = gain.of(&wm_ref).unwrap();
                let y_ref = rmsnorm::rms_norm_reference(x_ref.as_tensor(), &g, 1e-6).unwrap();
                let name = what("misaligned w");
                assert_close(&name, &y, &y_ref, tol(dtype), elem_tol(dtype));
            }
        }
    }

    /// Right padding with random lengths (some rows empty, some full); with `holes`, also
    /// padding inside the response, which must end the episode there too.
    fn make_mask(rng: &mut Rng, b: usize, t: usize, heavy: bool, holes: bool) -> Vec<f32> {
        let mut m = vec![0f32; b * t];
        for i in 0..b {
            let len = match rng.below(6) {
                0 => 0,
                1 => t,
                _ if heavy => rng.below(t / 8 + 2).min(t),
                _ => rng.below(t + 1),
            };
            for j in 0..len {
                m[i * t + j] = 1.0;
            }
            if holes && len > 2 {
                for _ in 0..1 + len / 50 {
                    m[i * t + rng.below(len)] = 0.0;
                }
            }
        }
        m
    }

    struct GaeCase {
        b: usize,
        t: usize,
        gamma: f64,
        lambda: f64,
        heavy: bool,
        holes: bool,
    }

    fn check_gae(dev: &Device, rng: &mut Rng, seed: u64, c: &GaeCase, nan_padding: bool) {
        let (b, t) = (c.b, c.t);
        let mask = make_mask(rng, b, t, c.heavy, c.holes);
        let mut rewards = rng.vec(b * t, -1.0, 1.0);
        let mut values = rng.vec(b * t, -2.0, 2.0);
        if nan_padding {
            for (i, &m) in mask.iter().enumerate() {
                if m == 0.0 {
                    rewards[i] = f32::NAN;
                    values[i] = f32::INFINITY;
                }
            }
        }
        let cpu = |v: &Vec<f32>| Tensor::from_vec(v.clone(), (b, t), &Device::Cpu).unwrap();
        let (r_c, v_c, m_c) = (cpu(&rewards), cpu(&values), cpu(&mask));
        let r_g = r_c.to_device(dev).unwrap();
        let v_g = v_c.to_device(dev).unwrap();
        let m_g = m_c.to_device(dev).unwrap();
        let ours = kgae::gae(&r_g, &v_g, &m_g, c.gamma, c.lambda)
            .unwrap()
            .expect("gae kernel");
        let refr = gae::gae_reference(&r_c, &v_c, &m_c, c.gamma, c.lambda).unwrap();
        let what = format!(
            "gae B={b} T={t} gamma={} lambda={} heavy={} holes={} nan_padding={nan_padding} (seed {seed})",
            c.gamma, c.lambda, c.heavy, c.holes
        );
        assert_eq!(ours.advantages.dims(), &[b, t]);
        assert_eq!(ours.returns.dims(), &[b, t]);
        let (a, a_ref) = (host(&ours.advantages), host(&refr.advantages));
        let (rt, rt_ref) = (host(&ours.returns), host(&refr.returns));
        let ea = rel_err(&a, &a_ref);
        let er = rel_err(&rt, &rt_ref);
        assert!(ea <= 1e-5, "{what}: advantages rel err {ea:.3e}");
        assert!(er <= 1e-5, "{what}: returns rel err {er:.3e}");
        let f32_tol = elem_tol(DType::F32);
        if let Err(msg) = elem_check(&a, &a_ref, &[b, t], f32_tol) {
            panic!("{what}: advantages: {msg}");
        }
        if let Err(msg) = elem_check(&rt, &rt_ref, &[b, t], f32_tol) {
            panic!("{what}: returns: {msg}");
        }
        for (i, &m) in mask.iter().enumerate() {
            if m == 0.0 {
                assert!(a[i] == 0.0 && rt[i] == 0.0, "{what}: padding {i} not zero");
            }
        }
        let scale = refr.var.sqrt().max(refr.mean.abs()).max(1e-12);
        let em = (ours.mean - refr.mean).abs() / scale;
        let ev = (ours.var - refr.var).abs() / refr.var.max(1e-12);
        assert!(em <= 1e-5, "{what}: mean {} vs {}", ours.mean, refr.mean);
        assert!(
            ev <= 1e-5 || (ours.var - refr.var).abs() < 1e-12,
            "{what}: var {} vs {}",
            ours.var,
            refr.var
        );
    }

    pub fn gae_matches_reference(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(4);
        // T around the 8-step thread segment, the block chunk (up to 256 * 8 = 2048 steps),
        // multiples of 4 (16-byte loads) and not, several chunks per row.
        let shapes: &[(usize, usize)] = &[
            (1, 1),
            (3, 5),
            (7, 13),
            (4, 8),
            (5, 31),
            (9, 256),
            (33, 257),
            (16, 1000),
            (6, 2048),
            (5, 2055),
            (3, 4096),
            (2, 5003),
            (64, 1024),
        ];
        for &(b, t) in shapes {
            let (gamma, lambda) = (rng.uniform(0.9, 1.0) as f64, rng.uniform(0.9, 1.0) as f64);
            for (heavy, holes) in [(false, false), (true, false), (false, true)] {
                let c = GaeCase {
                    b,
                    t,
                    gamma,
                    lambda,
                    heavy,
                    holes,
                };
                check_gae(dev, &mut rng, seed, &c, false);
            }
        }
        // gamma = lambda = 1: the recurrence is a plain suffix sum, no decay to hide errors.
        for &(b, t) in &[(4usize, 100usize), (3, 1000)] {
            let c = GaeCase {
                b,
                t,
                gamma: 1.0,
                lambda: 1.0,
                heavy: false,
                holes: true,
            };
            check_gae(dev, &mut rng, seed, &c, false);
        }
    }

    pub fn gae_padding_is_an_episode_boundary_and_never_leaks(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(5);
        for &(b, t) in &[(8usize, 37usize), (5, 300), (3, 2100), (12, 64)] {
            let c = GaeCase {
                b,
                t,
                gamma: 0.99,
                lambda: 0.95,
                heavy: false,
                holes: true,
            };
            check_gae(dev, &mut rng, seed, &c, true);
        }
        // An integer mask converts like the reference does.
        let (b, t) = (6, 50);
        let mask = make_mask(&mut rng, b, t, false, true);
        let r = Tensor::from_vec(rng.vec(b * t, -1.0, 1.0), (b, t), &Device::Cpu).unwrap();
        let v = Tensor::from_vec(rng.vec(b * t, -1.0, 1.0), (b, t), &Device::Cpu).unwrap();
        let m = Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap();
        let m_u8 = m.to_dtype(DType::U8).unwrap();
        let ours = kgae::gae(
            &r.to_device(dev).unwrap(),
            &v.to_device(dev).unwrap(),
            &m_u8.to_device(dev).unwrap(),
            0.97,
            0.9,
        )
        .unwrap()
        .unwrap();
        let refr = gae::gae_reference(&r, &v, &m, 0.97, 0.9).unwrap();
        assert_close(
            &format!("gae u8 mask advantages (seed {seed})"),
            &ours.advantages,
            &refr.advantages,
            1e-5,
            elem_tol(DType::F32),
        );
        assert_close(
            &format!("gae u8 mask returns (seed {seed})"),
            &ours.returns,
            &refr.returns,
            1e-5,
            elem_tol(DType::F32),
        );
    }

    pub fn gae_empty_and_all_padding_batches(dev: &Device) {
        for &(b, t) in &[(0usize, 5usize), (3, 0)] {
            let z = Tensor::zeros((b, t), DType::F32, dev).unwrap();
            let out = kgae::gae(&z, &z, &z, 0.99, 0.95).unwrap().unwrap();
            assert_eq!(out.advantages.dims(), &[b, t]);
            assert_eq!((out.mean, out.var), (0.0, 0.0));
        }
        let (mut rng, _) = Rng::fresh(6);
        let (b, t) = (5, 77);
        let r = Tensor::from_vec(rng.vec(b * t, -1.0, 1.0), (b, t), dev).unwrap();
        let v = Tensor::from_vec(rng.vec(b * t, -1.0, 1.0), (b, t), dev).unwrap();
        let m = Tensor::zeros((b, t), DType::F32, dev).unwrap();
        let out = kgae::gae(&r, &v, &m, 0.99, 0.95).unwrap().unwrap();
        assert!(host(&out.advantages).iter().all(|&x| x == 0.0));
        assert!(host(&out.returns).iter().all(|&x| x == 0.0));
        assert_eq!((out.mean, out.var), (0.0, 0.0));
        // One valid token: mean is that advantage, the unbiased variance is 0.
        let mut mask = vec![0f32; b * t];
        mask[2 * t + 10] = 1.0;
        let m = Tensor::from_vec(mask, (b, t), dev).unwrap();
        let out = kgae::gae(&r, &v, &m, 0.99, 0.95).unwrap().unwrap();
        let a = host(&out.advantages);
        assert_eq!(out.var, 0.0);
        assert!((out.mean - a[2 * t + 10]).abs() < 1e-7);
    }

    pub fn group_normalize_matches_reference(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(7);
        for &group in &[1usize, 2, 3, 7, 16, 33, 64, 100] {
            for &n_groups in &[1usize, 5, 37, 1000] {
                let n = group * n_groups;
                let mut r = rng.vec(n, -3.0, 3.0);
                if group > 1 {
                    // A constant group: zero std, so the output is 0 / eps = 0.
                    let c = r[0];
                    r[..group].iter_mut().for_each(|x| *x = c);
                }
                let cpu = Tensor::from_vec(r, n, &Device::Cpu).unwrap();
                let ours = kgae::group_normalize(&cpu.to_device(dev).unwrap(), group, 1e-4)
                    .unwrap()
                    .unwrap();
                let refr = gae::group_normalize_reference(&cpu, group, 1e-4).unwrap();
                assert_close(
                    &format!("group_normalize G={group} n={n_groups} (seed {seed})"),
                    &ours,
                    &refr,
                    1e-5,
                    elem_tol(DType::F32),
                );
                let via = gae::group_normalize(
                    &cpu.to_device(dev).unwrap(),
                    group,
                    1e-4,
                    KernelChoice::Custom,
                )
                .unwrap();
                assert!(via.device().is_cuda());
            }
        }
        let r = Tensor::zeros(10, DType::F32, dev).unwrap();
        assert!(kgae::group_normalize(&r, 3, 1e-4).is_err());
        assert!(kgae::group_normalize(&r, 0, 1e-4).is_err());
        let empty = Tensor::zeros(0, DType::F32, dev).unwrap();
        assert_eq!(
            kgae::group_normalize(&empty, 4, 1e-4)
                .unwrap()
                .unwrap()
                .dims(),
            &[0]
        );
    }
}
