//! Our flash-attention and fused-LoRA kernels against the CPU references (values, and
//! gradients against the reference's autograd), on fresh random inputs of awkward sizes, with
//! every kernel output poisoned (NaN bytes) before the launch.
//!
//! Needs feature `cuda` and a CUDA device; otherwise every test prints
//! `SKIPPED (no CUDA device): <name>` on stderr (past cargo's output capture) and passes.
//! Tolerances (device library METHOD.md): ‖out − ref‖ / ‖ref‖ under 1e-5 for f32, 1e-2 for bf16,
//! 5e-3 for f16, twice that for gradients; NaN never passes. Each run draws a new seed,
//! printed in any failure message.

use std::io::Write;

/// One test per kernel check: runs the body on the GPU when there is one, else says so.
macro_rules! gpu_test {
    ($name:ident) => {
        #[test]
        fn $name() {
            #[cfg(feature = "cuda")]
            if let Some(dev) = gpu::device() {
                gpu::$name(&dev);
                return;
            }
            // Straight to the stderr handle: `eprintln!` would be captured and hidden.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED (no CUDA device): {}",
                stringify!($name)
            );
        }
    };
}

gpu_test!(attention_forward_matches_reference);
gpu_test!(attention_gradients_match_reference_autograd);
gpu_test!(attention_dispatcher_uses_the_kernel);
gpu_test!(lora_forward_matches_reference);
gpu_test!(lora_gradients_match_reference_autograd);
gpu_test!(lora_dispatcher_uses_the_kernel);

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::{DType, Device, Tensor, Var};
    use temper::kernels::attention::{self, AttnMask};
    use temper::kernels::cuda::attention::{attention_with, AttnImpl};
    use temper::kernels::cuda::lora::{lora_linear_with, DyPath};
    use temper::kernels::cuda::{self as kc};
    use temper::kernels::lora::{self, LoraArgs};
    use temper::kernels::KernelChoice;

    pub fn device() -> Option<Device> {
        if !kc::cuda_available() {
            return None;
        }
        kc::set_poison(true);
        Device::new_cuda(0).ok()
    }

    /// xorshift64*: fresh inputs every run, reproducible from the printed seed.
    struct Rng(u64);

    impl Rng {
        fn fresh(tag: u64) -> (Self, u64) {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            let seed = (t ^ tag.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
            (Self(seed), seed)
        }
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
            lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
        }
        fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
            (0..n).map(|_| self.uniform(lo, hi)).collect()
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    fn host(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .expect("copy to host")
    }

    /// ‖a − b‖ / ‖b‖ (absolute when ‖b‖ is 0); infinite if `a` holds a NaN.
    fn rel_err(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        if a.iter().any(|x| !x.is_finite()) {
            return f64::INFINITY;
        }
        let num: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f64>()
            .sqrt();
        let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
        if den == 0.0 {
            num
        } else {
            num / den
        }
    }

    fn tol(dtype: DType) -> f64 {
        match dtype {
            DType::F32 => 1e-5,
            DType::F16 => 5e-3,
            _ => 1e-2,
        }
    }

    /// Random values in `dtype` on the GPU and the same (rounded) values as f32 on the CPU.
    fn pair(
        rng: &mut Rng,
        dims: &[usize],
        lo: f32,
        hi: f32,
        dtype: DType,
        dev: &Device,
    ) -> (Tensor, Tensor) {
        let n: usize = dims.iter().product();
        let cpu = Tensor::from_vec(rng.vec(n, lo, hi), dims, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .unwrap();
        let gpu = cpu.to_device(dev).unwrap();
        (gpu, cpu.to_dtype(DType::F32).unwrap())
    }

    #[derive(Clone, Copy, Debug)]
    enum Pad {
        None,
        Left,
        Right,
        /// Random holes inside the sequence, and one sequence with no valid key at all.
        Holes,
    }

    #[derive(Clone, Copy, Debug)]
    struct Case {
        b: usize,
        hq: usize,
        hkv: usize,
        tq: usize,
        tk: usize,
        d: usize,
        causal: Option<usize>,
        pad: Pad,
    }

    const fn case(
        (b, hq, hkv): (usize, usize, usize),
        (tq, tk, d): (usize, usize, usize),
        causal: Option<usize>,
        pad: Pad,
    ) -> Case {
        Case {
            b,
            hq,
            hkv,
            tq,
            tk,
            d,
            causal,
            pad,
        }
    }

    /// Sizes off every tile (64-row mma tiles, 32-key simple tiles), T = 1, batch 3, GQA 4:1,
    /// heavy left and right padding, Tq < Tk with a causal offset, long-cache decode (split).
    const CASES: &[Case] = &[
        case((3, 4, 1), (77, 77, 64), Some(0), Pad::Right),
        case((2, 2, 2), (130, 130, 128), Some(0), Pad::Left),
        case((3, 8, 2), (1, 1, 64), Some(0), Pad::None),
        case((3, 4, 1), (1, 301, 64), Some(300), Pad::Left),
        case((1, 8, 2), (5, 1000, 128), Some(995), Pad::None),
        case((2, 4, 4), (40, 100, 128), Some(60), Pad::Right),
        case((3, 2, 1), (65, 65, 64), None, Pad::Holes),
        case((2, 2, 1), (33, 70, 80), None, Pad::Holes),
        case((1, 1, 1), (200, 200, 32), Some(0), Pad::None),
        case((2, 6, 3), (97, 97, 96), Some(0), Pad::Left),
        case((3, 4, 1), (150, 150, 128), Some(0), Pad::Holes),
    ];

    /// `[B, Tk]` validity: heavy padding (down to a handful of valid keys), or none.
    fn key_mask(rng: &mut Rng, c: &Case) -> Option<Vec<f32>> {
        let (b, tk) = (c.b, c.tk);
        let mut m = vec![1f32; b * tk];
        match c.pad {
            Pad::None => return None,
            Pad::Left | Pad::Right => {
                for i in 0..b {
                    // Sequence 0 keeps everything; the others lose up to 90%.
                    let pad = if i == 0 {
                        0
                    } else {
                        rng.below(tk * 9 / 10 + 1)
                    };
                    for j in 0..pad {
                        let col = if matches!(c.pad, Pad::Left) {
                            j
                        } else {
                            tk - 1 - j
                        };
                        m[i * tk + col] = 0.0;
                    }
                }
            }
            Pad::Holes => {
                for (i, row) in m.chunks_mut(tk).enumerate() {
                    if i == 1 {
                        row.fill(0.0);
                        continue;
                    }
                    for v in row.iter_mut() {
                        if rng.below(4) == 0 {
                            *v = 0.0;
                        }
                    }
                }
            }
        }
        Some(m)
    }

    fn impls(dtype: DType, d: usize) -> Vec<AttnImpl> {
        let mut v = vec![AttnImpl::Simple];
        if matches!(dtype, DType::BF16 | DType::F16) && (d == 64 || d == 128) {
            v.push(AttnImpl::Mma);
        }
        v
    }

    struct Inputs {
        q: (Tensor, Tensor),
        k: (Tensor, Tensor),
        v: (Tensor, Tensor),
        valid: Option<(Tensor, Tensor)>,
    }

    fn attn_inputs(rng: &mut Rng, c: &Case, dtype: DType, dev: &Device) -> Inputs {
        let q = pair(rng, &[c.b, c.hq, c.tq, c.d], -1.5, 1.5, dtype, dev);
        let k = pair(rng, &[c.b, c.hkv, c.tk, c.d], -1.5, 1.5, dtype, dev);
        let v = pair(rng, &[c.b, c.hkv, c.tk, c.d], -1.0, 1.0, dtype, dev);
        let valid = key_mask(rng, c).map(|m| {
            let cpu = Tensor::from_vec(m, (c.b, c.tk), &Device::Cpu).unwrap();
            (cpu.to_device(dev).unwrap(), cpu)
        });
        Inputs { q, k, v, valid }
    }

    pub fn attention_forward_matches_reference(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(11);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for c in CASES {
                let inp = attn_inputs(&mut rng, c, dtype, dev);
                let scale = 1.0 / (c.d as f64).sqrt() * rng.uniform(0.5, 2.0) as f64;
                let mask_g = AttnMask {
                    causal_offset: c.causal,
                    key_valid: inp.valid.as_ref().map(|v| &v.0),
                };
                let mask_c = AttnMask {
                    causal_offset: c.causal,
                    key_valid: inp.valid.as_ref().map(|v| &v.1),
                };
                let y_ref =
                    attention::attention_reference(&inp.q.1, &inp.k.1, &inp.v.1, &mask_c, scale)
                        .unwrap();
                for imp in impls(dtype, c.d) {
                    let y = attention_with(&inp.q.0, &inp.k.0, &inp.v.0, &mask_g, scale, imp)
                        .unwrap()
                        .expect("kernel covers the case");
                    assert_eq!(y.dims(), inp.q.0.dims());
                    assert_eq!(y.dtype(), dtype);
                    let e = rel_err(&host(&y), &host(&y_ref));
                    assert!(
                        e <= tol(dtype),
                        "attention fwd {imp:?} {dtype:?} {c:?}: rel err {e:.3e} (seed {seed})"
                    );
                }
            }
        }
    }

    pub fn attention_gradients_match_reference_autograd(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(12);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for c in CASES {
                let inp = attn_inputs(&mut rng, c, dtype, dev);
                let (dy_g, dy_c) = pair(&mut rng, &[c.b, c.hq, c.tq, c.d], -1.0, 1.0, dtype, dev);
                let scale = 1.0 / (c.d as f64).sqrt();
                let mask_c = AttnMask {
                    causal_offset: c.causal,
                    key_valid: inp.valid.as_ref().map(|v| &v.1),
                };
                let (qc, kc, vc) = (
                    Var::from_tensor(&inp.q.1).unwrap(),
                    Var::from_tensor(&inp.k.1).unwrap(),
                    Var::from_tensor(&inp.v.1).unwrap(),
                );
                let y_ref = attention::attention_reference(&qc, &kc, &vc, &mask_c, scale).unwrap();
                let g_ref = (y_ref * &dy_c)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for imp in impls(dtype, c.d) {
                    let (qg, kg, vg) = (
                        Var::from_tensor(&inp.q.0).unwrap(),
                        Var::from_tensor(&inp.k.0).unwrap(),
                        Var::from_tensor(&inp.v.0).unwrap(),
                    );
                    let mask_g = AttnMask {
                        causal_offset: c.causal,
                        key_valid: inp.valid.as_ref().map(|v| &v.0),
                    };
                    let y = attention_with(&qg, &kg, &vg, &mask_g, scale, imp)
                        .unwrap()
                        .expect("kernel covers the case");
                    let grads = (y * &dy_g).unwrap().sum_all().unwrap().backward().unwrap();
                    for (what, ours, theirs) in
                        [("dq", &qg, &qc), ("dk", &kg, &kc), ("dv", &vg, &vc)]
                    {
                        let g = grads
                            .get(ours)
                            .unwrap_or_else(|| panic!("{what}: no gradient ({imp:?} {c:?})"));
                        assert_eq!(g.dims(), ours.dims());
                        assert_eq!(g.dtype(), dtype);
                        let g_r = g_ref.get(theirs).expect("reference gradient");
                        let e = rel_err(&host(g), &host(g_r));
                        assert!(
                            e <= 2.0 * tol(dtype),
                            "attention {what} {imp:?} {dtype:?} {c:?}: rel err {e:.3e} (seed {seed})"
                        );
                    }
                }
            }
        }
    }

    pub fn attention_dispatcher_uses_the_kernel(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(13);
        let c = case((2, 4, 2), (70, 70, 64), Some(0), Pad::Left);
        let inp = attn_inputs(&mut rng, &c, DType::BF16, dev);
        let mask_g = AttnMask {
            causal_offset: c.causal,
            key_valid: inp.valid.as_ref().map(|v| &v.0),
        };
        let mask_c = AttnMask {
            causal_offset: c.causal,
            key_valid: inp.valid.as_ref().map(|v| &v.1),
        };
        let y = attention::attention(
            &inp.q.0,
            &inp.k.0,
            &inp.v.0,
            &mask_g,
            0.125,
            KernelChoice::Custom,
        )
        .unwrap();
        assert!(y.device().is_cuda());
        let y_ref =
            attention::attention_reference(&inp.q.1, &inp.k.1, &inp.v.1, &mask_c, 0.125).unwrap();
        let e = rel_err(&host(&y), &host(&y_ref));
        assert!(e <= 1e-2, "dispatcher bf16: {e:.3e} (seed {seed})");
        // f64 and head dim 256 have no kernel: the dispatcher must fall back, not fail.
        let q64 = inp.q.0.to_dtype(DType::F64).unwrap();
        let k64 = inp.k.0.to_dtype(DType::F64).unwrap();
        let v64 = inp.v.0.to_dtype(DType::F64).unwrap();
        assert!(
            attention_with(&q64, &k64, &v64, &mask_g, 0.1, AttnImpl::Auto)
                .unwrap()
                .is_none()
        );
        attention::attention(&q64, &k64, &v64, &mask_g, 0.1, KernelChoice::Custom).unwrap();
        let wide = Tensor::zeros((1, 1, 3, 256), DType::F32, dev).unwrap();
        assert!(attention_with(
            &wide,
            &wide,
            &wide,
            &AttnMask::default(),
            0.1,
            AttnImpl::Auto
        )
        .unwrap()
        .is_none());
    }

    /// `(M as batch dims, K, N, r, bias)`.
    const LORA_SHAPES: &[(&[usize], usize, usize, usize, bool)] = &[
        (&[1], 8, 8, 4, false),
        (&[37], 100, 72, 5, true),
        (&[3, 17], 64, 200, 16, true),
        (&[129], 768, 768, 8, false),
        (&[2, 33], 256, 1000, 33, true),
        (&[5], 96, 40, 64, false),
        (&[300], 128, 384, 128, true),
        (&[1000], 64, 70, 16, false), // N % 8 != 0: the cuBLAS path for dY
    ];

    struct LoraInputs {
        x: (Tensor, Tensor),
        w: (Tensor, Tensor),
        a: (Tensor, Tensor),
        b: (Tensor, Tensor),
        bias: Option<(Tensor, Tensor)>,
        scale: f64,
    }

    fn lora_inputs(
        rng: &mut Rng,
        (lead, k, n, r, has_bias): (&[usize], usize, usize, usize, bool),
        dtype: DType,
        dev: &Device,
    ) -> LoraInputs {
        let mut xd = lead.to_vec();
        xd.push(k);
        let ws = 1.0 / (k as f32).sqrt();
        LoraInputs {
            x: pair(rng, &xd, -1.0, 1.0, dtype, dev),
            w: pair(rng, &[n, k], -ws, ws, dtype, dev),
            a: pair(rng, &[r, k], -ws, ws, dtype, dev),
            // B non-zero (it starts at zero in training) so the adapter term is checked.
            b: pair(rng, &[n, r], -0.5, 0.5, dtype, dev),
            bias: has_bias.then(|| pair(rng, &[n], -0.5, 0.5, dtype, dev)),
            scale: rng.uniform(0.5, 4.0) as f64,
        }
    }

    fn dy_paths(dtype: DType) -> Vec<DyPath> {
        if dtype == DType::F32 {
            vec![DyPath::Cublas]
        } else {
            vec![DyPath::Fused, DyPath::Cublas]
        }
    }

    pub fn lora_forward_matches_reference(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(21);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for &shape in LORA_SHAPES {
                let inp = lora_inputs(&mut rng, shape, dtype, dev);
                let args_g = LoraArgs {
                    w: &inp.w.0,
                    bias: inp.bias.as_ref().map(|b| &b.0),
                    a: &inp.a.0,
                    b: &inp.b.0,
                    scale: inp.scale,
                };
                let args_c = LoraArgs {
                    w: &inp.w.1,
                    bias: inp.bias.as_ref().map(|b| &b.1),
                    a: &inp.a.1,
                    b: &inp.b.1,
                    scale: inp.scale,
                };
                let y = lora_linear_with(&inp.x.0, &args_g, DyPath::Auto)
                    .unwrap()
                    .expect("kernel covers the dtype");
                let y_ref = lora::lora_linear_reference(&inp.x.1, &inp.x.1, &args_c).unwrap();
                assert_eq!(y.dims(), y_ref.dims());
                assert_eq!(y.dtype(), dtype);
                let e = rel_err(&host(&y), &host(&y_ref));
                assert!(
                    e <= tol(dtype),
                    "lora fwd {dtype:?} {shape:?}: rel err {e:.3e} (seed {seed})"
                );
            }
        }
    }

    pub fn lora_gradients_match_reference_autograd(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(22);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for &shape in LORA_SHAPES {
                let inp = lora_inputs(&mut rng, shape, dtype, dev);
                let y_dims = {
                    let mut d = shape.0.to_vec();
                    d.push(shape.2);
                    d
                };
                let (dy_g, dy_c) = pair(&mut rng, &y_dims, -1.0, 1.0, dtype, dev);
                let (xc, ac, bc) = (
                    Var::from_tensor(&inp.x.1).unwrap(),
                    Var::from_tensor(&inp.a.1).unwrap(),
                    Var::from_tensor(&inp.b.1).unwrap(),
                );
                let args_c = LoraArgs {
                    w: &inp.w.1,
                    bias: inp.bias.as_ref().map(|b| &b.1),
                    a: &ac,
                    b: &bc,
                    scale: inp.scale,
                };
                let y_ref = lora::lora_linear_reference(&xc, &xc, &args_c).unwrap();
                let g_ref = (y_ref * &dy_c)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for path in dy_paths(dtype) {
                    let (xg, ag, bg) = (
                        Var::from_tensor(&inp.x.0).unwrap(),
                        Var::from_tensor(&inp.a.0).unwrap(),
                        Var::from_tensor(&inp.b.0).unwrap(),
                    );
                    let args_g = LoraArgs {
                        w: &inp.w.0,
                        bias: inp.bias.as_ref().map(|b| &b.0),
                        a: &ag,
                        b: &bg,
                        scale: inp.scale,
                    };
                    let y = lora_linear_with(&xg, &args_g, path)
                        .unwrap()
                        .expect("kernel covers the dtype");
                    let grads = (y * &dy_g).unwrap().sum_all().unwrap().backward().unwrap();
                    for (what, ours, theirs) in
                        [("dx", &xg, &xc), ("dA", &ag, &ac), ("dB", &bg, &bc)]
                    {
                        let g = grads
                            .get(ours)
                            .unwrap_or_else(|| panic!("{what}: no gradient ({path:?} {shape:?})"));
                        assert_eq!(g.dims(), ours.dims());
                        assert_eq!(g.dtype(), dtype);
                        let g_r = g_ref.get(theirs).expect("reference gradient");
                        let e = rel_err(&host(g), &host(g_r));
                        assert!(
                            e <= 2.0 * tol(dtype),
                            "lora {what} {path:?} {dtype:?} {shape:?}: rel err {e:.3e} (seed {seed})"
                        );
                    }
                }
            }
        }
    }

    pub fn lora_dispatcher_uses_the_kernel(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(23);
        let inp = lora_inputs(&mut rng, (&[4, 9], 64, 96, 8, true), DType::BF16, dev);
        let args_g = LoraArgs {
            w: &inp.w.0,
            bias: inp.bias.as_ref().map(|b| &b.0),
            a: &inp.a.0,
            b: &inp.b.0,
            scale: inp.scale,
        };
        let args_c = LoraArgs {
            w: &inp.w.1,
            bias: inp.bias.as_ref().map(|b| &b.1),
            a: &inp.a.1,
            b: &inp.b.1,
            scale: inp.scale,
        };
        let y = lora::lora_linear(&inp.x.0, &args_g, KernelChoice::Custom).unwrap();
        assert!(y.device().is_cuda());
        let y_ref = lora::lora_linear_reference(&inp.x.1, &inp.x.1, &args_c).unwrap();
        let e = rel_err(&host(&y), &host(&y_ref));
        assert!(e <= 1e-2, "lora dispatcher bf16: {e:.3e} (seed {seed})");
        // f64 has no kernel: the dispatcher must fall back, not fail.
        let cast = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let (x64, w64, a64, b64) = (
            cast(&inp.x.0),
            cast(&inp.w.0),
            cast(&inp.a.0),
            cast(&inp.b.0),
        );
        let args64 = LoraArgs {
            w: &w64,
            bias: None,
            a: &a64,
            b: &b64,
            scale: 2.0,
        };
        assert!(lora_linear_with(&x64, &args64, DyPath::Auto)
            .unwrap()
            .is_none());
        lora::lora_linear(&x64, &args64, KernelChoice::Custom).unwrap();
    }
}
