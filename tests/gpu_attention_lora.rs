//! Our flash-attention and fused-LoRA kernels against the CPU references (values, and
//! gradients against the reference's autograd), on fresh random inputs of awkward sizes, with
//! every kernel output poisoned (NaN bytes) before the launch.
//!
//! Needs feature `cuda` and a CUDA device; otherwise every test prints
//! `SKIPPED (built without feature cuda): <name>` or `SKIPPED (no CUDA device): <name>` on
//! stderr (past cargo's output capture) and passes.
//! Tolerances (the values of `tol`, `elem_tol` and `grad_tol` in tests/common/gpu.rs): ‖out − ref‖ / ‖ref‖ under 1e-5 for f32, 1e-2 for bf16,
//! 5e-3 for f16, twice that for gradients; and, so that a local error cannot hide in the
//! global norm, every element within `atol · max(1, max|ref|) + rtol · |ref|` with
//! (atol, rtol) = (1e-4, 1e-4) for f32, (2e-2, 2e-2) for bf16, (1e-2, 1e-2) for f16, twice
//! that for gradients; NaN never passes. Each run draws a new seed, printed in any failure
//! message; `TEMPER_TEST_SEED=<seed>` replays it (every test then uses that seed).

#[macro_use]
mod common;

// One test per kernel check: runs the body on the GPU when there is one, else says why not
// (`gpu_test!`, tests/common/mod.rs).
gpu_test!(attention_forward_matches_reference);
gpu_test!(attention_gradients_match_reference_autograd);
gpu_test!(attention_dispatcher_uses_the_kernel);
gpu_test!(attention_packed_rows_match_reference);
gpu_test!(wide_backward_takes_128_keys_where_the_card_allows);
gpu_test!(lora_forward_matches_reference);
gpu_test!(lora_gradients_match_reference_autograd);
gpu_test!(lora_dispatcher_uses_the_kernel);

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::{DType, Device, Tensor, Var};
    use temper::kernels::attention::{self, AttnMask, Segments};
    use temper::kernels::cuda::attention::{
        attention_with, bwd_block_k_on, takes_head_dim, AttnImpl,
    };
    use temper::kernels::cuda::compute_capability;
    use temper::kernels::cuda::cudarc::driver::sys::CUdevice_attribute;
    use temper::kernels::cuda::lora::{lora_linear_with, DyPath};
    use temper::kernels::lora::{self, LoraArgs};
    use temper::kernels::KernelChoice;

    use crate::common::gpu::*;

    /// The exact values (bf16 and f16 widen to f64 exactly).
    fn bits(t: &Tensor) -> Vec<u64> {
        host(t).iter().map(|x| x.to_bits()).collect()
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
        gpu_and_cpu(rng, dims, (lo, hi), dtype, dev, 0)
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
        /// A sliding window (causal cases only).
        window: Option<usize>,
        /// Gemma 2's cap on the scores.
        softcap: Option<f64>,
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
            window: None,
            softcap: None,
        }
    }

    const fn capped(c: Case, cap: f64) -> Case {
        Case {
            softcap: Some(cap),
            ..c
        }
    }

    const fn windowed(c: Case, w: usize) -> Case {
        Case {
            window: Some(w),
            ..c
        }
    }

    /// Sizes off every tile (64- and 128-row mma tiles, 32-key simple tiles), T = 1, batch 3, GQA 4:1,
    /// heavy left and right padding, Tq < Tk with a causal offset, long-cache decode (split),
    /// and Gemma's head dim 256 (16-bit only).
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
        // Several 128-row blocks at D = 64 (the wide forward's heaviest-first order, q0 > 0).
        case((2, 2, 1), (301, 301, 64), Some(0), Pad::Right),
        // Sliding windows: band edges across every tile, a split decode over a long cache, the
        // CUDA-core kernels at an odd head dim, left padding inside the window.
        windowed(case((3, 4, 1), (77, 77, 64), Some(0), Pad::Right), 20),
        windowed(case((2, 2, 1), (301, 301, 64), Some(0), Pad::None), 100),
        windowed(case((2, 2, 2), (130, 130, 128), Some(0), Pad::Left), 37),
        windowed(case((1, 8, 2), (5, 1000, 128), Some(995), Pad::None), 300),
        windowed(case((3, 4, 1), (1, 301, 64), Some(300), Pad::Left), 64),
        windowed(case((2, 6, 3), (97, 97, 96), Some(0), Pad::Left), 33),
        // Head dim 256: the 64-row tensor-core forward and the backward whose warps split the
        // head dim; the decode stream (4 rows a kv head, one key a warp, a split cache) under
        // `Auto`; a short query block whose rows the stream does not take; a sliding window.
        case((2, 4, 1), (97, 97, 256), Some(0), Pad::Left),
        case((3, 4, 1), (1, 301, 256), Some(300), Pad::Left),
        case((2, 8, 4), (5, 300, 256), Some(295), Pad::None),
        case((2, 2, 2), (70, 130, 256), None, Pad::Holes),
        windowed(case((2, 4, 1), (150, 150, 256), Some(0), Pad::Right), 40),
        // Gemma 2's soft cap, where it bites (scores of about unit size): the tensor cores'
        // forward and backward, the decode stream split over a long cache, the CUDA-core
        // kernels at an odd head dim, a window at head dim 256.
        capped(case((3, 4, 1), (77, 77, 64), Some(0), Pad::Right), 1.0),
        capped(case((2, 2, 2), (130, 130, 128), None, Pad::Holes), 0.7),
        capped(case((1, 8, 2), (1, 1000, 128), Some(999), Pad::Left), 1.0),
        capped(case((2, 6, 3), (97, 97, 96), Some(0), Pad::Left), 0.8),
        capped(
            windowed(case((2, 4, 1), (150, 150, 256), Some(0), Pad::Right), 40),
            1.0,
        ),
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

    /// The implementations that take the case. At head dim 256 (no simple kernel) `Auto` too,
    /// which sends a few query rows to the decode stream; none where the card's blocks cannot
    /// hold the shared memory of its forward and of a backward (the reference's then).
    fn impls(dtype: DType, d: usize, dev: &Device) -> Vec<AttnImpl> {
        let sixteen = matches!(dtype, DType::BF16 | DType::F16);
        if d == 256 {
            if !sixteen {
                return vec![];
            }
            let cuda = dev.as_cuda_device().unwrap();
            if !takes_head_dim(cuda, dtype, d, AttnImpl::Mma).unwrap() {
                eprintln!("attention: no kernel for head dim 256 on this card (shared memory)");
                return vec![];
            }
            // MmaNarrow: the narrow backward sm_86 and sm_89 take, tested here too.
            return vec![
                AttnImpl::Auto,
                AttnImpl::Mma,
                AttnImpl::MmaWide,
                AttnImpl::MmaNarrow,
            ];
        }
        let mut v = vec![AttnImpl::Simple];
        if sixteen && (d == 64 || d == 128) {
            v.push(AttnImpl::Mma);
            v.push(AttnImpl::MmaWide);
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
                    segments: None,
                    window: c.window,
                    softcap: c.softcap,
                };
                let mask_c = AttnMask {
                    causal_offset: c.causal,
                    key_valid: inp.valid.as_ref().map(|v| &v.1),
                    segments: None,
                    window: c.window,
                    softcap: c.softcap,
                };
                let y_ref =
                    attention::attention_reference(&inp.q.1, &inp.k.1, &inp.v.1, &mask_c, scale)
                        .unwrap();
                for imp in impls(dtype, c.d, dev) {
                    let y = attention_with(&inp.q.0, &inp.k.0, &inp.v.0, &mask_g, scale, imp)
                        .unwrap()
                        .expect("kernel covers the case");
                    assert_eq!(y.dims(), inp.q.0.dims());
                    assert_eq!(y.dtype(), dtype);
                    assert_close(
                        &format!("attention fwd {imp:?} {dtype:?} {c:?} (seed {seed})"),
                        &y,
                        &y_ref,
                        tol(dtype),
                        elem_tol(dtype),
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
                    segments: None,
                    window: c.window,
                    softcap: c.softcap,
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
                for imp in impls(dtype, c.d, dev) {
                    let (qg, kg, vg) = (
                        Var::from_tensor(&inp.q.0).unwrap(),
                        Var::from_tensor(&inp.k.0).unwrap(),
                        Var::from_tensor(&inp.v.0).unwrap(),
                    );
                    let mask_g = AttnMask {
                        causal_offset: c.causal,
                        key_valid: inp.valid.as_ref().map(|v| &v.0),
                        segments: None,
                        window: c.window,
                        softcap: c.softcap,
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
                        assert_close(
                            &format!("attention {what} {imp:?} {dtype:?} {c:?} (seed {seed})"),
                            g,
                            g_r,
                            2.0 * tol(dtype),
                            grad_tol(dtype),
                        );
                    }
                }
            }
        }
    }

    /// Random documents back to back in each of `b` rows of `t` tokens, some rows ending in
    /// padding: mostly short documents, so that tiles hold several boundaries.
    fn packed_rows(rng: &mut Rng, b: usize, t: usize) -> Segments {
        let docs: Vec<Vec<usize>> = (0..b)
            .map(|_| {
                let used = t - (rng.uniform(0.0, t as f32 / 6.0) as usize);
                let mut row = Vec::new();
                let mut at = 0;
                while at < used {
                    let long = rng.uniform(0.0, 1.0) < 0.2;
                    let n = rng.uniform(1.0, if long { 150.0 } else { 40.0 }) as usize;
                    let n = n.clamp(1, used - at);
                    row.push(n);
                    at += n;
                }
                row
            })
            .collect();
        Segments::from_lengths(&docs, t, &Device::Cpu).unwrap()
    }

    /// Packed rows (SFT packing): every implementation's forward and gradients against the
    /// reference's, which masks each query to its own document.
    pub fn attention_packed_rows_match_reference(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(14);
        let cases = [
            case((2, 4, 2), (301, 301, 64), Some(0), Pad::None),
            case((2, 2, 1), (173, 173, 128), Some(0), Pad::None),
            case((2, 4, 2), (90, 90, 40), Some(0), Pad::None),
        ];
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for c in &cases {
                let inp = attn_inputs(&mut rng, c, dtype, dev);
                let segments = packed_rows(&mut rng, c.b, c.tq);
                let (dy_g, dy_c) = pair(&mut rng, &[c.b, c.hq, c.tq, c.d], -1.0, 1.0, dtype, dev);
                let mask = AttnMask {
                    causal_offset: Some(0),
                    key_valid: None,
                    segments: Some(&segments),
                    window: None,
                    softcap: None,
                };
                let scale = 1.0 / (c.d as f64).sqrt();
                let vars = |x: &(Tensor, Tensor), on_gpu: bool| {
                    Var::from_tensor(if on_gpu { &x.0 } else { &x.1 }).unwrap()
                };
                let (qc, kc, vc) = (
                    vars(&inp.q, false),
                    vars(&inp.k, false),
                    vars(&inp.v, false),
                );
                let y_ref = attention::attention_reference(&qc, &kc, &vc, &mask, scale).unwrap();
                let g_ref = (&y_ref * &dy_c)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for imp in impls(dtype, c.d, dev) {
                    let what = format!("{imp:?} {dtype:?} {c:?} (seed {seed})");
                    let (qg, kg, vg) = (vars(&inp.q, true), vars(&inp.k, true), vars(&inp.v, true));
                    let y = attention_with(&qg, &kg, &vg, &mask, scale, imp)
                        .unwrap()
                        .expect("kernel covers the case");
                    assert_close(
                        &format!("packed attention fwd {what}"),
                        &y,
                        &y_ref,
                        tol(dtype),
                        elem_tol(dtype),
                    );
                    let grads = (y * &dy_g).unwrap().sum_all().unwrap().backward().unwrap();
                    for (name, ours, theirs) in
                        [("dq", &qg, &qc), ("dk", &kg, &kc), ("dv", &vg, &vc)]
                    {
                        assert_close(
                            &format!("packed attention {name} {what}"),
                            grads.get(ours).expect("gradient"),
                            g_ref.get(theirs).expect("reference gradient"),
                            2.0 * tol(dtype),
                            grad_tol(dtype),
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
            segments: None,
            window: None,
            softcap: None,
        };
        let mask_c = AttnMask {
            causal_offset: c.causal,
            key_valid: inp.valid.as_ref().map(|v| &v.1),
            segments: None,
            window: None,
            softcap: None,
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
        assert_close(
            &format!("attention dispatcher bf16 (seed {seed})"),
            &y,
            &y_ref,
            1e-2,
            elem_tol(DType::BF16),
        );
        // A fallback to the reference would pass that too. The dispatcher must return exactly
        // what the kernel does: the forward is deterministic (no atomics, fixed order).
        let imp = AttnImpl::from_env();
        let y_kernel = attention_with(&inp.q.0, &inp.k.0, &inp.v.0, &mask_g, 0.125, imp)
            .unwrap()
            .expect("kernel covers bf16, head dim 64");
        assert!(
            bits(&y) == bits(&y_kernel),
            "attention dispatcher: not bit-for-bit the kernel's output ({imp:?}; seed {seed})"
        );
        if imp != AttnImpl::Simple {
            // The tensor-core kernel rounds P to bf16 before P V, so the reference run on the
            // same GPU inputs differs from it in many elements: the comparison above can tell a
            // fallback from the kernel. (The simple kernel keeps P in f32 and may round to the
            // reference's bits everywhere, so this is not asserted for it.)
            let y_gpu_ref =
                attention::attention_reference(&inp.q.0, &inp.k.0, &inp.v.0, &mask_g, 0.125)
                    .unwrap();
            assert!(
                bits(&y_gpu_ref) != bits(&y_kernel),
                "attention: the reference matches the mma kernel bit for bit, so the dispatcher \
                 check cannot tell them apart (seed {seed})"
            );
        }
        // f64, and f32 at head dim 256, have no kernel: the dispatcher must fall back, not fail.
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
        // A larger layer: the base GEMM (y += x W^T) and dx += dY W, both accumulating, have
        // cuBLASLt's candidates timed in scratch.
        (&[1031], 1536, 4096, 16, true),
        // Several 64 x 64 dY tiles per `lora_dy` block (the cp.async prefetch of tile t + 1
        // while t is used, accumulation over later tiles) with ragged M and N edges. With
        // r = 20 (RP = 32), `DyPlan::new` gives, for every SM count 108..=132 (A100 to
        // H100/H200):
        // - M 3000, N 1032: regions of 128 x 128, grid 9 x 24; interior blocks run 2 x 2
        //   tiles, the last row of blocks 56 rows (one ragged m-tile), the last column 8
        //   columns (one ragged n-tile), both in blocks of 2 tiles except the corner.
        // - M 2408, N 1096: regions of 128 x 128, grid 9 x 19 (192 x 128 or 128 x 192 on
        //   other SM counts between 80 and 169), so every block runs at least 2 x 2 tiles,
        //   and the last region's rows (2408 - 18 * 128 = 104) and columns
        //   (1096 - 8 * 128 = 72) end in a ragged tile after a full one.
        (&[3000], 256, 1032, 20, true),
        (&[8, 301], 192, 1096, 20, false),
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
                let y_ref = lora::lora_linear_reference(&inp.x.1, &inp.x.1, &args_c).unwrap();
                // Twice: the heuristic's answers (the default), then (at or above
                // `TUNE_MIN_FLOP`) cuBLASLt's candidates timed and the fastest run.
                for timed in [false, true] {
                    use temper::kernels::cuda::{timing_first_calls, GemmTune};
                    let call = if timed { "timed" } else { "untimed" };
                    let fwd = || lora_linear_with(&inp.x.0, &args_g, DyPath::Auto);
                    let y = match timed {
                        true => GemmTune::Timed.scope(|| timing_first_calls(fwd)),
                        false => fwd(),
                    }
                    .unwrap()
                    .expect("kernel covers the dtype");
                    assert_eq!(y.dims(), y_ref.dims());
                    assert_eq!(y.dtype(), dtype);
                    assert_close(
                        &format!("lora fwd {dtype:?} {shape:?} (seed {seed}), {call}"),
                        &y,
                        &y_ref,
                        tol(dtype),
                        elem_tol(dtype),
                    );
                }
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
                        assert_close(
                            &format!("lora {what} {path:?} {dtype:?} {shape:?} (seed {seed})"),
                            g,
                            g_r,
                            2.0 * tol(dtype),
                            grad_tol(dtype),
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
        assert_close(
            &format!("lora dispatcher bf16 (seed {seed})"),
            &y,
            &y_ref,
            1e-2,
            elem_tol(DType::BF16),
        );
        // A fallback to the reference would pass that too. The dispatcher must return exactly
        // what the fused op does (its forward is three cuBLAS calls and a packing kernel on
        // one stream: deterministic; the dY path only matters for the backward) ...
        let y_kernel = lora_linear_with(&inp.x.0, &args_g, DyPath::Auto)
            .unwrap()
            .expect("kernel covers bf16");
        assert!(
            bits(&y) == bits(&y_kernel),
            "lora dispatcher: not bit-for-bit the fused op's output (seed {seed})"
        );
        // ... which the reference on the same GPU inputs is not: it rounds the base product,
        // the bias sum, x A^T, the up-projection and the scaling to bf16 separately, where the
        // fused op folds all of it into one f32 accumulator.
        let y_gpu_ref = lora::lora_linear_reference(&inp.x.0, &inp.x.0, &args_g).unwrap();
        assert!(
            bits(&y_gpu_ref) != bits(&y_kernel),
            "lora: the reference matches the fused op bit for bit, so the dispatcher check \
             cannot tell them apart (seed {seed})"
        );
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

    /// `MmaWide`'s backward falls back to 64 keys a block where the card's opt-in shared
    /// memory per block is too small for 128: the gradient tests would then pass without the
    /// 128-key kernel having run. At D = 64 it needs 84,992 bytes; at D = 128, 109,056, which
    /// an A100 (163 KiB) or an H100/H200 (227 KiB) allows and sm_86/sm_89 (99 KiB) do not. `Auto` and `Mma` take 64:
    /// when `Auto` adopts the wide tiles this test is meant to fail, and to change with it.
    /// At head dim 256 every card gets a backward: 64 keys, or where that does not fit the
    /// narrow 32 (which `MmaNarrow` takes everywhere).
    pub fn wide_backward_takes_128_keys_where_the_card_allows(dev: &Device) {
        let cuda = dev.as_cuda_device().unwrap();
        let cc = compute_capability(cuda).unwrap();
        let optin = cuda
            .cuda_stream()
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .unwrap() as usize;
        for d in [64, 128] {
            for imp in [AttnImpl::Auto, AttnImpl::Mma] {
                assert_eq!(bwd_block_k_on(cuda, imp, d).unwrap(), 64, "{imp:?} D {d}");
            }
            let wide = bwd_block_k_on(cuda, AttnImpl::MmaWide, d).unwrap();
            // The kernel's shared memory at 128 keys (the static_asserts in
            // kernels/attention.cuh), against the card's limit.
            let needs = if d == 64 { 84_992 } else { 109_056 };
            let want = if needs <= optin { 128 } else { 64 };
            let sm = format!("sm_{}{} (opt-in {optin} bytes) D {d}", cc.0, cc.1);
            assert_eq!(wide, want, "{sm}: the wide backward's keys");
            if matches!(cc, (8, 0) | (9, 0)) {
                assert_eq!(wide, 128, "{sm}");
            }
        }
        // Head dim 256: 64 keys where the card's blocks hold the 64-key backward (153,088
        // bytes, sm_80 and sm_90), else the narrow 32 (71,424: sm_86, sm_89); MmaNarrow takes
        // the narrow one everywhere, so that the gradient tests above run its kernel here.
        let sm = format!("sm_{}{} (opt-in {optin} bytes) D 256", cc.0, cc.1);
        let want = if 153_088 <= optin { 64 } else { 32 };
        for imp in [AttnImpl::Auto, AttnImpl::Mma, AttnImpl::MmaWide] {
            assert_eq!(
                bwd_block_k_on(cuda, imp, 256).unwrap(),
                want,
                "{sm} {imp:?}"
            );
        }
        assert_eq!(
            bwd_block_k_on(cuda, AttnImpl::MmaNarrow, 256).unwrap(),
            32,
            "{sm}"
        );
        if matches!(cc, (8, 6) | (8, 9)) {
            assert_eq!(want, 32, "{sm}: the narrow backward");
        }
    }
}
