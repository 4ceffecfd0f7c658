//! The sampling kernel (`kernels/sample.cu`) against its reference, and decode attention
//! reading a KV cache in place, on fresh random inputs of awkward sizes (odd batches,
//! vocabularies that are not multiples of 32) with kernel outputs poisoned before the launch.
//!
//! Greedy must agree exactly. A sampled token may differ only where the row's uniform falls
//! within float rounding of a bucket edge (the kernel sums in f32 trees, the reference
//! sequentially in f64), or where a probability sits within rounding of the top-k/top-p
//! threshold; any other difference fails.
//!
//! Needs feature `cuda` and a CUDA device; otherwise every test prints
//! `SKIPPED (built without feature cuda): <name>` or `SKIPPED (no CUDA device): <name>` on
//! stderr and passes. `TEMPER_TEST_SEED=<seed>` replays a failure's inputs.

#[macro_use]
mod common;

gpu_test!(sample_kernel_matches_reference);
gpu_test!(masked_tokens_are_never_drawn);
gpu_test!(decode_attention_reads_the_cache_in_place);
gpu_test!(engine_on_the_gpu_agrees_with_the_cpu, alone);
gpu_test!(decode_step_kernels_match_reference);
gpu_test!(qkv_write_matches_the_cpu_op);
gpu_test!(fused_decode_step_matches_qkv_write_then_attention);
gpu_test!(held_tokens_and_a_device_draw_index_sample_as_the_reference);
gpu_test!(penalised_and_min_p_draws_sample_as_the_reference_and_mark_the_token);
gpu_test!(graph_replay_gives_the_eager_fixed_steps_tokens, alone);
gpu_test!(padded_rows_sample_in_place_as_the_reference);
gpu_test!(the_padded_lm_head_gives_the_heads_logits);
gpu_test!(programmatic_launches_give_the_plain_launches_tokens, alone);

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::{DType, Device, Tensor};
    use temper::config::{LoraConfig, ModelConfig};
    use temper::data::tokenizer::Tokenizer;
    use temper::generate::{generate, DecodeMode, EngineOpts, RowKeys, SampleCfg};
    use temper::kernels::attention::{attention_reference, AttnMask};
    use temper::kernels::cuda::attention::{attention_with, decode_fresh, AttnImpl};
    use temper::kernels::cuda::decode_gemm::{self, DecodeGemm};
    use temper::kernels::cuda::pdl::{self, Pdl};
    use temper::kernels::cuda::{compute_capability, GemmTune};
    use temper::kernels::decode_step::{advance, kv_write, qkv_write, Gain, HeadNorm};
    use temper::kernels::sample::{
        keep_threshold, keys_tensor, penalize_row, row_key, sample, sample_draw, sample_reference,
        uniform, Draw, Hold, SampleParams,
    };
    use temper::kernels::KernelChoice;
    use temper::model::linear::Ctx;
    use temper::model::Transformer;
    use temper::train::params::{Net, ParamStore};

    use crate::common::gpu::*;

    /// (rows, vocabulary): odd batches, vocabularies off the warp and block sizes, GPT-2's.
    const SHAPES: &[(usize, usize)] = &[(1, 1), (3, 7), (5, 33), (7, 1000), (9, 3001), (33, 50257)];

    fn params(temperature: f32, top_k: usize, top_p: f32) -> SampleParams {
        SampleParams {
            temperature,
            top_k,
            top_p,
            ..SampleParams::default()
        }
    }

    /// Why the kernel's `got` may differ from the reference's choice on this row, if it may.
    fn explained(row: &[f32], p: &SampleParams, u: f32, got: usize) -> Result<(), String> {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f32> = row
            .iter()
            .map(|&z| ((z - max) * (1.0 / p.temperature)).exp())
            .collect();
        let t = keep_threshold(&w, p);
        let rounding = 1e-5 * f64::from(t.max(1e-30));
        let filtered = p.filters_top_k(row.len()) || p.filters_top_p() || p.filters_min_p();
        if filtered && f64::from((w[got] - t).abs()) <= rounding.max(1e-6) {
            return Ok(()); // at the threshold: kept on one side, dropped on the other
        }
        if w[got] < t {
            return Err(format!(
                "token {got} (w {}) is below the threshold {t}",
                w[got]
            ));
        }
        let total: f64 = w.iter().filter(|&&x| x >= t).map(|&x| f64::from(x)).sum();
        let target = f64::from(u) * total;
        let before: f64 = w[..got]
            .iter()
            .filter(|&&x| x >= t)
            .map(|&x| f64::from(x))
            .sum();
        let after = before + f64::from(w[got]);
        let tol = 1e-4 * total;
        if before - tol <= target && target <= after + tol {
            Ok(())
        } else {
            Err(format!(
                "target {target} outside token {got}'s bucket [{before}, {after}] (mass {total})"
            ))
        }
    }

    /// The kernel's `got` against the reference's `want` on one row (`row`: the logits the
    /// reference sampled, `u` its uniform): the same token, or a sampled one whose difference
    /// [`explained`] accounts for.
    fn agrees(what: &str, row: &[f32], p: &SampleParams, u: f32, (got, want): (u32, u32)) {
        if got == want {
            return;
        }
        assert!(!p.is_greedy(), "{what}: greedy {got} vs {want}");
        if let Err(why) = explained(row, p, u, got as usize) {
            panic!("{what}: kernel {got} vs reference {want}: {why}");
        }
    }

    /// The kernel's draws from `on_device` (the logits of `cpu`, `[B, V]` on the host, as the
    /// kernel is handed them) against the reference's from `cpu`, row `i` keyed by `rows[i]`:
    /// every id below `V`, and each row the reference's or a difference [`agrees`] explains.
    fn draws_agree(
        what: &str,
        (cpu, on_device): (&Tensor, &Tensor),
        rows: &[u64],
        (draw_seed, pos): (u64, u64),
        p: &SampleParams,
    ) {
        let (b, v) = cpu.dims2().unwrap();
        let keys = keys_tensor(draw_seed, rows, &Device::Cpu).unwrap();
        let want = sample_reference(cpu, &keys, pos, None, p)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        let keys = keys.to_device(on_device.device()).unwrap();
        let got = sample(on_device, &keys, pos, p, KernelChoice::Custom)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        let logits = cpu
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap();
        for i in 0..b {
            let ctx = format!("{what}, row {i}");
            assert!((got[i] as usize) < v, "{ctx}: id {} out of range", got[i]);
            let u = uniform(row_key(draw_seed, rows[i]), pos);
            agrees(&ctx, &logits[i * v..(i + 1) * v], p, u, (got[i], want[i]));
        }
    }

    pub fn sample_kernel_matches_reference(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(0x5A3);
        let settings = [
            params(0.0, 0, 1.0),
            params(0.7, 0, 1.0),
            params(1.0, 5, 1.0),
            params(1.3, 0, 0.9),
            params(0.5, 50, 0.8),
            params(2.0, 1, 1.0),
        ];
        // The kernel reads the model's dtype directly: bf16 logits must choose as their f32
        // conversion does in the reference.
        for &(b, v) in SHAPES {
            for p in &settings {
                for dtype in [DType::F32, DType::BF16, DType::F16] {
                    let raw = rng.vec(b * v, -6.0, 6.0);
                    let cpu = Tensor::from_vec(raw, (b, v), &Device::Cpu)
                        .and_then(|t| t.to_dtype(dtype))
                        .unwrap();
                    let rows: Vec<u64> = (0..b as u64).map(|r| r * 7 + 3).collect();
                    let draw = (rng.next(), rng.below(1000) as u64);
                    let what = format!("seed {seed:#x}, {dtype:?}, B {b}, V {v}, {p:?}");
                    draws_agree(&what, (&cpu, &cpu.to_device(dev).unwrap()), &rows, draw, p);
                }
            }
        }
    }

    /// Rows further apart than the vocabulary (generation's padded LM head narrowed to `V`:
    /// 16-byte aligned rows at GPT-2's 50,257) are read in place, and nothing past `V` is
    /// read: the padding holds a logit larger than any row's, which greedy would pick.
    pub fn padded_rows_sample_in_place_as_the_reference(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(0x9AD);
        let settings = [
            params(0.0, 0, 1.0),
            params(0.8, 40, 0.9),
            params(1.0, 0, 1.0),
        ];
        for &(b, v) in SHAPES {
            let ld = v.next_multiple_of(8) + 8;
            for p in &settings {
                for dtype in [DType::F32, DType::BF16] {
                    let raw = rng.vec(b * v, -6.0, 6.0);
                    let mut wide = vec![1e4f32; b * ld];
                    for r in 0..b {
                        wide[r * ld..r * ld + v].copy_from_slice(&raw[r * v..(r + 1) * v]);
                    }
                    let cpu = Tensor::from_vec(raw.clone(), (b, v), &Device::Cpu)
                        .and_then(|t| t.to_dtype(dtype))
                        .unwrap();
                    let logits = Tensor::from_vec(wide, (b, ld), dev)
                        .and_then(|t| t.to_dtype(dtype))
                        .and_then(|t| t.narrow(1, 0, v))
                        .unwrap();
                    assert_eq!(logits.stride()[0], ld);
                    let rows: Vec<u64> = (0..b as u64).collect();
                    let draw = (rng.next(), rng.below(1000) as u64);
                    let what = format!("seed {seed:#x}, {dtype:?}, B {b}, V {v}, ld {ld}, {p:?}");
                    draws_agree(&what, (&cpu, &logits), &rows, draw, p);
                }
            }
        }
    }

    /// Generation's LM head at vocabularies no multiple of 8 (the presets' 258, GPT-2's
    /// 50,257), tied and untied: inside the frozen weights the padded head's logits, narrowed
    /// to `V` with rows a multiple of 8 apart, are the head's (candle's matmul) up to bf16
    /// rounding; outside them, and in f32, the head is not padded.
    pub fn the_padded_lm_head_gives_the_heads_logits(dev: &Device) {
        use temper::model::cast::FrozenWeights;
        let (mut rng, seed) = Rng::fresh(0x4EAD);
        for (vocab, tied) in [(258, true), (50257, true), (1003, false)] {
            let mut cfg = ModelConfig::preset("tiny").unwrap();
            cfg.vocab_size = vocab;
            cfg.tie_word_embeddings = tied;
            let mut store = ParamStore::new(dev.clone(), rng.next());
            let net = Transformer::new(&mut store.scope(Net::Policy), &cfg, None).unwrap();
            let h = cfg.hidden_size;
            for (b, t) in [(5, 1), (3, 2)] {
                let hidden = Tensor::from_vec(rng.vec(b * t * h, -2.0, 2.0), (b, t, h), dev)
                    .and_then(|x| x.to_dtype(DType::BF16))
                    .unwrap();
                let what = format!("seed {seed:#x}, V {vocab}, tied {tied}, B {b}, T {t}");
                let outside = net.sampling_logits(&hidden, KernelChoice::Custom).unwrap();
                assert!(outside.is_contiguous(), "{what}: padded outside generation");
                let _gen = FrozenWeights::enter();
                let got = net.sampling_logits(&hidden, KernelChoice::Custom).unwrap();
                assert_eq!(got.dims(), [b, t, vocab], "{what}");
                assert_eq!(
                    got.stride()[1],
                    vocab.next_multiple_of(8),
                    "{what}: not padded"
                );
                let want = net
                    .compute_logits(&hidden, KernelChoice::Reference)
                    .unwrap();
                let (atol, rtol) = elem_tol(DType::BF16);
                assert_close(&what, &got, &want, tol(DType::BF16), (atol, rtol));
                let f32_hidden = hidden.to_dtype(DType::F32).unwrap();
                let f32_logits = net
                    .sampling_logits(&f32_hidden, KernelChoice::Custom)
                    .unwrap();
                assert!(f32_logits.is_contiguous(), "{what}: f32 padded");
            }
        }
    }

    /// Logits masked to -inf (the stop ids under `min_new_tokens`), the last id among them,
    /// are never drawn, in any dtype, with or without top-k and top-p: not even where
    /// rounding sends the draw past the kept mass (u near 1, many draws).
    pub fn masked_tokens_are_never_drawn(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(0x3A5);
        let (b, v) = (257, 50257);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for p in [
                params(1.0, 0, 1.0),
                params(0.7, 40, 0.95),
                params(3.0, 0, 0.999),
            ] {
                let mut logits = rng.vec(b * v, -3.0, 3.0);
                let masked = |i: usize| i % v == v - 1 || i % v % 97 == 5;
                for (i, z) in logits.iter_mut().enumerate() {
                    if masked(i) {
                        *z = f32::NEG_INFINITY;
                    }
                }
                let t = Tensor::from_vec(logits, (b, v), dev)
                    .and_then(|t| t.to_dtype(dtype))
                    .unwrap();
                let rows: Vec<u64> = (0..b as u64).collect();
                for pos in 0..4 {
                    let keys = keys_tensor(rng.next(), &rows, dev).unwrap();
                    let got = sample(&t, &keys, pos, &p, KernelChoice::Custom)
                        .unwrap()
                        .to_vec1::<u32>()
                        .unwrap();
                    for (r, &id) in got.iter().enumerate() {
                        assert!(
                            !masked(id as usize),
                            "seed {seed:#x} {dtype:?} {p:?} row {r}: drew masked id {id}"
                        );
                    }
                }
            }
        }
    }

    /// Few query rows against a KV cache, read in place (a view of its first Tk positions) or
    /// whole, under left padding, a hole in a row's keys and the causal horizon: the decode
    /// stream (`attn_decode`: bf16/f16, head dim 64/128, <= 4 rows per kv head: one row, GQA
    /// groups of 2 to 4, two queries; one sequence, so the keys are split across blocks), the
    /// simple kernel where the stream does not apply (f32, 8 rows per kv head) and when forced,
    /// each against the reference.
    pub fn decode_attention_reads_the_cache_in_place(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(0xCAC);
        // (B, Hq, Hkv, capacity, Tk, D, Tq)
        let shapes = [
            (3, 4, 2, 40, 17, 64, 1),
            (5, 6, 3, 600, 513, 128, 1),
            (2, 12, 12, 384, 300, 64, 1),
            (1, 12, 12, 500, 451, 64, 1),
            (3, 8, 2, 70, 70, 128, 1),
            (2, 4, 4, 50, 33, 64, 2),
            (2, 6, 2, 64, 40, 64, 1),
            (3, 16, 2, 64, 40, 64, 1),
            (2, 8, 8, 300, 257, 128, 1),
        ];
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for &(b, hq, hkv, cap, tk, d, tq) in &shapes {
                let q = Tensor::from_vec(rng.vec(b * hq * tq * d, -1.0, 1.0), (b, hq, tq, d), dev)
                    .and_then(|t| t.to_dtype(dtype))
                    .unwrap();
                let buf = |rng: &mut Rng| {
                    Tensor::from_vec(rng.vec(b * hkv * cap * d, -1.0, 1.0), (b, hkv, cap, d), dev)
                        .and_then(|t| t.to_dtype(dtype))
                        .unwrap()
                };
                let (kb, vb) = (buf(&mut rng), buf(&mut rng));
                let (k, v) = (kb.narrow(2, 0, tk).unwrap(), vb.narrow(2, 0, tk).unwrap());
                assert_eq!(k.is_contiguous(), cap == tk);
                let mut valid = vec![1f32; b * tk];
                valid[..5].iter_mut().for_each(|x| *x = 0.0); // row 0 left-padded
                if b > 1 {
                    valid[tk + 3] = 0.0; // a hole in row 1
                }
                let valid = Tensor::from_vec(valid, (b, tk), dev).unwrap();
                let host = |t: &Tensor| {
                    t.to_dtype(DType::F32)
                        .and_then(|t| t.to_device(&Device::Cpu))
                        .unwrap()
                };
                let cpu_valid = valid.to_device(&Device::Cpu).unwrap();
                // Causal at the cache's end, and without a causal mask (a prefix of queries
                // that sees every key).
                for causal in [Some(tk - tq), None] {
                    let cpu_mask = AttnMask {
                        causal_offset: causal,
                        key_valid: Some(&cpu_valid),
                        segments: None,
                        window: None,
                        softcap: None,
                    };
                    let want =
                        attention_reference(&host(&q), &host(&k), &host(&v), &cpu_mask, 0.125)
                            .unwrap();
                    let mask = AttnMask {
                        causal_offset: causal,
                        key_valid: Some(&valid),
                        segments: None,
                        window: None,
                        softcap: None,
                    };
                    for imp in [AttnImpl::Auto, AttnImpl::Simple] {
                        let ctx = format!(
                            "seed {seed:#x}, {dtype:?}, {imp:?}, B {b}, Hq {hq}/{hkv}, Tq {tq}, Tk {tk}/{cap}, D {d}, causal {causal:?}"
                        );
                        let got = attention_with(&q, &k, &v, &mask, 0.125, imp)
                            .unwrap()
                            .expect("the kernel applies");
                        let (atol, rtol) = elem_tol(dtype);
                        assert_close(&ctx, &host(&got), &want, tol(dtype), (atol, rtol));
                    }
                }
            }
        }
    }

    /// The whole engine (prefill, in-place cache, sampling kernel, compaction) on the GPU
    /// against the CPU reference path, greedy in f32, on a random GQA model (weights are drawn
    /// on the host, so both devices hold the same ones). A random model's logits are nearly
    /// flat, so a near-tie may flip a row: most rows must agree token for token.
    pub fn engine_on_the_gpu_agrees_with_the_cpu(dev: &Device) {
        let mut cfg = ModelConfig::preset("tiny").unwrap();
        cfg.vocab_size = 259; // not a multiple of 32
        cfg.max_position_embeddings = 96;
        let tok = Tokenizer::bytes();
        let texts = [
            "a",
            "bb",
            "bb",
            "bb",
            "hello there",
            "x1",
            "x1",
            "a longer prompt",
        ];
        let prompts: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t).unwrap()).collect();
        let sc = SampleCfg {
            max_new_tokens: 40,
            temperature: 0.0,
            stop: vec!["e".into()],
            ..Default::default()
        };
        let run = |d: &Device| {
            let mut store = ParamStore::new(d.clone(), 21);
            let net = Transformer::new(&mut store.scope(Net::Policy), &cfg, None).unwrap();
            let ctx = Ctx::plain(DType::F32);
            let keys = RowKeys::range(5, 0, prompts.len());
            generate(&net, ctx, &tok, &prompts, &sc, &keys).unwrap()
        };
        let (gpu, cpu) = (run(dev), run(&Device::Cpu));
        let same = (0..texts.len())
            .filter(|&i| gpu.tokens[i] == cpu.tokens[i])
            .count();
        assert!(
            same + 1 >= texts.len(),
            "only {same} of {} rows agree:\n gpu {:?}\n cpu {:?}",
            texts.len(),
            gpu.tokens,
            cpu.tokens
        );
        assert_eq!(gpu.stats.prefill_rows, 5);
    }

    /// The decode step's in-place state ops (`kernels/decode_step.cu`) against their CPU
    /// reference: exact, since each only moves or counts. Cache lengths at the first and last
    /// position and past the end (nothing written), sizes off every power of two.
    pub fn decode_step_kernels_match_reference(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(0xDEC);
        let shapes = [
            (1, 1, 1, 1),
            (3, 5, 17, 7),
            (2, 3, 33, 129),
            (5, 12, 384, 64),
        ];
        for &(b, h, cap, d) in &shapes {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                for len in [0, cap / 2, cap - 1, cap, cap + 3] {
                    let ctx = format!("seed {seed:#x}, {dtype:?}, [{b}, {h}, {cap}, {d}], L {len}");
                    let make = |n: usize, shape: &[usize], rng: &mut Rng| {
                        Tensor::from_vec(rng.vec(n, -4.0, 4.0), shape, &Device::Cpu)
                            .and_then(|t| t.to_dtype(dtype))
                            .unwrap()
                    };
                    let cache = make(b * h * cap * d, &[b, h, cap, d], &mut rng);
                    let new = make(b * h * d, &[b, h, 1, d], &mut rng);
                    let step = Tensor::new(&[len as i64, 9], &Device::Cpu).unwrap();
                    let on_gpu = |t: &Tensor| t.to_device(dev).unwrap();
                    let (gc, gn, gs) = (on_gpu(&cache), on_gpu(&new), on_gpu(&step));
                    kv_write(&gc, &gn, &gs).unwrap();
                    kv_write(&cache, &new, &step).unwrap();
                    assert_eq!(host(&gc), host(&cache), "{ctx}: kv_write");
                }
            }
        }
        // The step's tail in one launch against the four CPU ops it stands for: rows past
        // the kernel's one block of 256, the next position at and past the capacity.
        for &(rows, cap) in &[(1usize, 1usize), (64, 384), (300, 7)] {
            for len in [0, cap.saturating_sub(2), cap - 1, cap + 2] {
                let ctx = format!("seed {seed:#x}: advance, {rows} rows, cap {cap}, L {len}");
                let u32s = |shape: &[usize], rng: &mut Rng| {
                    let v: Vec<u32> = (0..rows).map(|_| rng.below(1 << 20) as u32).collect();
                    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
                };
                let (ids, sampled) = (u32s(&[rows], &mut rng), u32s(&[rows], &mut rng));
                let positions = u32s(&[rows, 1], &mut rng);
                let mask =
                    Tensor::from_vec(rng.vec(rows * cap, 0.0, 1.0), (rows, cap), &Device::Cpu)
                        .and_then(|t| t.round())
                        .unwrap();
                let step = Tensor::new(&[len as i64, 5], &Device::Cpu).unwrap();
                let cpu = [&ids, &sampled, &positions, &step, &mask].map(|t| t.copy().unwrap());
                let gpu =
                    [&ids, &sampled, &positions, &step, &mask].map(|t| t.to_device(dev).unwrap());
                advance(&cpu[0], &cpu[1], &cpu[2], &cpu[3], &cpu[4]).unwrap();
                advance(&gpu[0], &gpu[1], &gpu[2], &gpu[3], &gpu[4]).unwrap();
                for (what, c, g) in ["ids", "sampled", "positions", "step", "mask"]
                    .into_iter()
                    .zip(&cpu)
                    .zip(&gpu)
                    .map(|((w, c), g)| (w, c, g))
                {
                    assert_eq!(host(g), host(c), "{ctx}: {what}");
                }
            }
        }
    }

    /// The decode step's stacked q/k/v split (`qkv_write`) against its CPU op: q, and k and v
    /// at the device length of both caches, exactly without rotary tables or head norms; with
    /// them (q and k normalised per head as Qwen3 does, or by Gemma's `1 + w` from f32
    /// offsets, rotated in f32, each rounded once, as on the CPU) within one rounding of the
    /// dtype. GQA and MHA, head dims 64, 128 and 256 and an odd one, lengths at the start, the
    /// last position and past the capacity (nothing written), y a view at an offset.
    pub fn qkv_write_matches_the_cpu_op(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(0x9C7);
        // (B, Hq, Hkv, cap, D)
        let shapes = [
            (1, 1, 1, 1, 2),
            (5, 12, 12, 9, 64),
            (3, 8, 2, 17, 128),
            (2, 6, 3, 5, 24),
            (3, 4, 1, 7, 256),
        ];
        let kinds = [
            (false, None),
            (true, None),
            (false, Some(Gain::AsIs)),
            (true, Some(Gain::AsIs)),
            (false, Some(Gain::PlusOne)),
            (true, Some(Gain::PlusOne)),
        ];
        for &(b, hq, hkv, cap, d) in &shapes {
            let (nq, nkv) = (hq * d, hkv * d);
            let width = nq + 2 * nkv;
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                for (rope, gain) in kinds {
                    let norm = gain.is_some();
                    for len in [0, cap - 1, cap] {
                        let ctx = format!(
                            "seed {seed:#x}, {dtype:?}, B {b} Hq {hq} Hkv {hkv} cap {cap} \
                             D {d}, rope {rope}, norm {gain:?}, L {len}"
                        );
                        let make = |n: usize, shape: &[usize], rng: &mut Rng| {
                            Tensor::from_vec(rng.vec(n, -3.0, 3.0), shape, &Device::Cpu)
                                .and_then(|t| t.to_dtype(dtype))
                                .unwrap()
                        };
                        // y as a view 3 rows into a larger buffer.
                        let y = make((b + 3) * width, &[b + 3, 1, width], &mut rng)
                            .narrow(0, 3, b)
                            .unwrap();
                        let (kc, vc) = (
                            make(b * hkv * cap * d, &[b, hkv, cap, d], &mut rng),
                            make(b * hkv * cap * d, &[b, hkv, cap, d], &mut rng),
                        );
                        let half = d / 2;
                        let angles = rng.vec(b * half, -3.0, 3.0);
                        let table = |f: fn(f32) -> f32| {
                            let v: Vec<f32> = angles.iter().map(|&a| f(a)).collect();
                            Tensor::from_vec(v, (b, 1, 1, half), &Device::Cpu)
                                .and_then(|t| t.to_dtype(dtype))
                                .unwrap()
                        };
                        let (cos, sin) = (table(f32::cos), table(f32::sin));
                        let step = Tensor::new(&[len as i64, 4], &Device::Cpu).unwrap();
                        // Gemma's weights are f32 offsets from one.
                        let weights = |rng: &mut Rng| match gain {
                            Some(Gain::PlusOne) => {
                                Tensor::from_vec(rng.vec(d, -1.0, 1.0), d, &Device::Cpu).unwrap()
                            }
                            _ => make(d, &[d], rng),
                        };
                        let (qg, kg) = (weights(&mut rng), weights(&mut rng));
                        // The op on `at`: q and the two caches it wrote. On the CPU the caches
                        // are the inputs themselves, so the GPU's copies are taken first.
                        let run = |at: &Device| {
                            let to = |t: &Tensor| t.to_device(at).unwrap();
                            let (kc, vc, cos, sin) = (to(&kc), to(&vc), to(&cos), to(&sin));
                            let (qg, kg) = (to(&qg), to(&kg));
                            let norm = gain.map(|gain| HeadNorm {
                                q: &qg,
                                k: &kg,
                                eps: 1e-6,
                                gain,
                            });
                            let tables = rope.then_some((&cos, &sin));
                            let q = qkv_write(&to(&y), &kc, &vc, &to(&step), nq, tables, norm);
                            [q.unwrap(), kc, vc]
                        };
                        let [gq, gk, gv] = run(dev);
                        let [cq, kc, vc] = run(&Device::Cpu);
                        assert_eq!(gq.dims(), [b, hq, 1, d], "{ctx}: q's shape");
                        for (what, g, c) in [("q", &gq, &cq), ("k", &gk, &kc), ("v", &gv, &vc)] {
                            let (g, c) = (host(g), host(c));
                            // One rounding of the dtype: the CPU op and the kernel both round
                            // the f32 norm and rotation once each; only f32's fused
                            // multiply-adds and the norm's order of summation may differ. A
                            // rounding of the norm that the rotation then mixes may cost two.
                            let ulp = match dtype {
                                DType::F32 => 1e-6,
                                DType::BF16 => 8e-3,
                                _ => 1e-3,
                            } * if rope && norm { 2.0 } else { 1.0 };
                            let bad = g.iter().zip(&c).position(|(a, b)| {
                                let exact = !rope && !norm;
                                let tol = if exact { 0.0 } else { ulp * b.abs().max(1.0) };
                                (a - b).abs() > tol
                            });
                            assert!(bad.is_none(), "{ctx}: {what} differs at {bad:?}");
                        }
                    }
                }
            }
        }
    }

    /// Generation's fused decode step (`decode_fresh`: split, rotation, cache write and
    /// attention in one launch) against the two launches it replaces, `qkv_write` then the
    /// decode attention, on copies of the same caches: the same output within the dtype's
    /// rounding, and the same caches (the new position within one rounding of the rotation,
    /// every other position bit for bit). GPT-2's shape (no rotation, 64 rows of 12 heads),
    /// Llama-style GQA with rotation and a padded mask, the first position, a batch of one
    /// whose keys split across blocks; Qwen3's per-head norms of q and k (with and without
    /// rotation, split and not); Gemma 3's head dim 256 with its norms' f32 offsets (four query
    /// heads on one kv head, and split), and Gemma 2's without norms; each shape also under
    /// Gemma 2's cap on the scores.
    pub fn fused_decode_step_matches_qkv_write_then_attention(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(0xF5E);
        // (B, Hq, Hkv, cap, L, D, rope, norm)
        let (none, as_is, plus_one) = (None, Some(Gain::AsIs), Some(Gain::PlusOne));
        let shapes = [
            (64, 12, 12, 384, 300, 64, false, none),
            (3, 8, 2, 200, 130, 128, true, none),
            (2, 4, 2, 48, 0, 64, true, none),
            (1, 2, 2, 1500, 1400, 128, false, none),
            (5, 16, 8, 160, 97, 128, true, as_is),
            (3, 2, 2, 70, 33, 64, false, as_is),
            (1, 4, 1, 1300, 1200, 128, true, as_is),
            (6, 4, 1, 300, 211, 256, true, plus_one),
            (1, 4, 1, 1300, 1250, 256, true, plus_one),
            (4, 8, 4, 200, 150, 256, true, none),
        ];
        // Every shape plain and under Gemma 2's cap on the scores (one that bites: the scores
        // here reach several units).
        let runs = shapes
            .iter()
            .flat_map(|&shape| [(shape, None), (shape, Some(1.5))]);
        for ((b, hq, hkv, cap, len, d, rope, gain), softcap) in runs {
            let norm = gain.is_some();
            for dtype in [DType::BF16, DType::F16] {
                let ctx = format!(
                    "seed {seed:#x}, {dtype:?}, B {b} Hq {hq} Hkv {hkv} cap {cap} L {len} D {d} \
                     rope {rope} norm {norm} softcap {softcap:?}"
                );
                let width = (hq + 2 * hkv) * d;
                let make = |n: usize, shape: &[usize], rng: &mut Rng| {
                    Tensor::from_vec(rng.vec(n, -2.0, 2.0), shape, dev)
                        .and_then(|t| t.to_dtype(dtype))
                        .unwrap()
                };
                let y = make(b * width, &[b, 1, width], &mut rng);
                let kc = make(b * hkv * cap * d, &[b, hkv, cap, d], &mut rng);
                let vc = make(b * hkv * cap * d, &[b, hkv, cap, d], &mut rng);
                let half = d / 2;
                let angles = rng.vec(b * half, -3.0, 3.0);
                let table = |f: fn(f32) -> f32| {
                    let v: Vec<f32> = angles.iter().map(|&a| f(a)).collect();
                    Tensor::from_vec(v, (b, 1, 1, half), dev)
                        .and_then(|t| t.to_dtype(dtype))
                        .unwrap()
                };
                let (cos, sin) = (table(f32::cos), table(f32::sin));
                let tables = rope.then_some((&cos, &sin));
                let weights = |rng: &mut Rng| match gain {
                    Some(Gain::PlusOne) => Tensor::from_vec(rng.vec(d, -1.0, 1.0), d, dev).unwrap(),
                    _ => make(d, &[d], rng),
                };
                let (qg, kg) = (weights(&mut rng), weights(&mut rng));
                let gains = gain.map(|gain| HeadNorm {
                    q: &qg,
                    k: &kg,
                    eps: 1e-6,
                    gain,
                });
                // Valid up to and including L, as advance leaves it; sequence 0 padded.
                let mut valid = vec![0f32; b * cap];
                for (i, row) in valid.chunks_mut(cap).enumerate() {
                    let pad = if i == 0 { len / 3 } else { 0 };
                    row[pad..=len].fill(1.0);
                }
                let valid = Tensor::from_vec(valid, (b, cap), dev).unwrap();
                let mask = AttnMask {
                    causal_offset: Some(cap - 1),
                    key_valid: Some(&valid),
                    segments: None,
                    window: None,
                    softcap,
                };
                let step = Tensor::new(&[len as i64, 3], dev).unwrap();
                let scale = 1.0 / (d as f64).sqrt();
                let copy = |t: &Tensor| t.copy().unwrap();
                let (fk, fv) = (copy(&kc), copy(&vc));
                let fused = decode_fresh(&y, (&fk, &fv), &step, hq, tables, gains, &mask, scale)
                    .unwrap()
                    .unwrap_or_else(|| panic!("{ctx}: the fused kernel should take the step"));
                let q = qkv_write(&y, &kc, &vc, &step, hq * d, tables, gains).unwrap();
                let two = attention_with(&q, &kc, &vc, &mask, scale, AttnImpl::Auto)
                    .unwrap()
                    .unwrap();
                assert_eq!(fused.dims(), [b, hq, 1, d], "{ctx}: shape");
                assert_close(&ctx, &fused, &two, tol(dtype), elem_tol(dtype));
                let ulp = if dtype == DType::BF16 { 8e-3 } else { 1e-3 };
                for (what, f, t) in [("k", &fk, &kc), ("v", &fv, &vc)] {
                    let (f, t) = (host(f), host(t));
                    let bad = f.iter().zip(&t).enumerate().position(|(i, (a, b))| {
                        // Position L of k within a rounding or two (the norm's sum is
                        // ordered otherwise, and the rotation mixes two rounded values).
                        let at_len = (i / d) % cap == len;
                        let tol = if at_len && (rope || norm) && what == "k" {
                            2.0 * ulp * b.abs().max(1.0)
                        } else {
                            0.0
                        };
                        (a - b).abs() > tol
                    });
                    assert!(bad.is_none(), "{ctx}: the {what} cache differs at {bad:?}");
                }
            }
        }
    }

    /// The sampling kernel with the draw index read from the device and stop ids held back
    /// (what a graph-replayed decode step passes) against the reference given the same: greedy
    /// exactly, draws up to the bucket-edge rounding `sample_kernel_matches_reference`
    /// explains; a held id is never drawn while the hold applies.
    pub fn held_tokens_and_a_device_draw_index_sample_as_the_reference(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(0x401D);
        for &(b, v) in &[(3, 7), (9, 3001), (33, 50257)] {
            for p in [
                params(0.0, 0, 1.0),
                params(1.0, 0, 1.0),
                params(0.8, 40, 0.9),
            ] {
                for dtype in [DType::F32, DType::BF16] {
                    let cpu = Tensor::from_vec(rng.vec(b * v, -3.0, 3.0), (b, v), &Device::Cpu)
                        .and_then(|t| t.to_dtype(dtype))
                        .unwrap();
                    // The largest logit of row 0 among the held ids, so greedy must avoid it.
                    let row0 = cpu.get(0).and_then(|r| r.to_dtype(DType::F32)).unwrap();
                    let top = row0.argmax(0).and_then(|t| t.to_scalar::<u32>()).unwrap() as usize;
                    let held = |i: usize| i == top || i % 11 == 3;
                    let mask: Vec<f32> = (0..v)
                        .map(|i| if held(i) { f32::NEG_INFINITY } else { 0.0 })
                        .collect();
                    let cpu_mask = Tensor::from_vec(mask, v, &Device::Cpu).unwrap();
                    let gpu_mask = cpu_mask.to_device(dev).unwrap();
                    let rows: Vec<u64> = (0..b as u64).map(|r| 5 * r + 1).collect();
                    let key_seed = rng.next();
                    let keys = keys_tensor(key_seed, &rows, &Device::Cpu).unwrap();
                    for (pos, until) in [(3u64, 5u64), (5, 5), (7, 0)] {
                        let ctx = format!(
                            "seed {seed:#x} {dtype:?} B {b} V {v} {p:?} draw {pos} hold<{until}"
                        );
                        let draw = Tensor::new(&[pos as i64], dev).unwrap();
                        let got = sample_draw(
                            &cpu.to_device(dev).unwrap(),
                            &keys.to_device(dev).unwrap(),
                            Draw::Device(&draw),
                            Some(Hold {
                                mask: &gpu_mask,
                                until,
                            }),
                            None,
                            &p,
                            KernelChoice::Custom,
                        )
                        .and_then(|t| t.to_vec1::<u32>())
                        .unwrap();
                        let want = sample_draw(
                            &cpu,
                            &keys,
                            Draw::At(pos),
                            Some(Hold {
                                mask: &cpu_mask,
                                until,
                            }),
                            None,
                            &p,
                            KernelChoice::Reference,
                        )
                        .and_then(|t| t.to_vec1::<u32>())
                        .unwrap();
                        let applies = pos < until;
                        let logits = cpu
                            .to_dtype(DType::F32)
                            .and_then(|t| {
                                t.broadcast_add(
                                    &cpu_mask
                                        .affine(if applies { 1.0 } else { 0.0 }, 0.0)
                                        .unwrap(),
                                )
                            })
                            .and_then(|t| t.flatten_all())
                            .and_then(|t| t.to_vec1::<f32>())
                            .unwrap();
                        for i in 0..b {
                            if applies {
                                assert!(
                                    !held(got[i] as usize),
                                    "{ctx} row {i}: drew held id {}",
                                    got[i]
                                );
                            }
                            let row = &logits[i * v..(i + 1) * v];
                            let u = uniform(row_key(key_seed, rows[i]), pos);
                            agrees(&format!("{ctx} row {i}"), row, &p, u, (got[i], want[i]));
                        }
                    }
                }
            }
        }
    }

    /// The repetition penalty (a random seen mask per row, row 0's largest logit among the
    /// seen, so greedy must pass it over; penalties above and below 1) and min-p, alone and
    /// with top-k and top-p, against the reference given the same: greedy exactly, draws up to
    /// the rounding `explained` allows on the penalised logits; and the kernel marks each
    /// row's drawn token in the seen mask, in place, and nothing else.
    pub fn penalised_and_min_p_draws_sample_as_the_reference_and_mark_the_token(dev: &Device) {
        let (mut rng, seed) = Rng::fresh(0x9E9);
        let with = |base: SampleParams, min_p: f32, repetition_penalty: f32| SampleParams {
            min_p,
            repetition_penalty,
            ..base
        };
        for &(b, v) in &[(3, 7), (9, 3001), (33, 50257)] {
            for p in [
                with(params(0.0, 0, 1.0), 0.0, 1.3),
                with(params(1.0, 0, 1.0), 0.0, 1.2),
                with(params(1.0, 0, 1.0), 0.05, 1.0),
                with(params(0.8, 40, 0.9), 0.1, 0.8),
                with(params(1.5, 0, 0.95), 0.02, 2.0),
            ] {
                for dtype in [DType::F32, DType::BF16] {
                    let ctx = format!("seed {seed:#x} {dtype:?} B {b} V {v} {p:?}");
                    // Row 0's largest logit is seen and its runner-up not, close enough that a
                    // penalty of 1.3 must hand greedy the runner-up (4 / 1.3 < 3.5).
                    let mut raw = rng.vec(b * v, -3.0, 3.0);
                    let top = rng.below(v);
                    let second = (top + 1) % v;
                    raw[top] = 4.0;
                    let mut mask: Vec<u8> =
                        (0..b * v).map(|_| u8::from(rng.below(10) == 0)).collect();
                    mask[top] = 1;
                    if v > 1 {
                        raw[second] = 3.5;
                        mask[second] = 0;
                    }
                    let cpu = Tensor::from_vec(raw, (b, v), &Device::Cpu)
                        .and_then(|t| t.to_dtype(dtype))
                        .unwrap();
                    let seen_cpu = Tensor::from_vec(mask.clone(), (b, v), &Device::Cpu).unwrap();
                    let seen_gpu = seen_cpu.to_device(dev).unwrap();
                    let rows: Vec<u64> = (0..b as u64).map(|r| 3 * r + 2).collect();
                    let key_seed = rng.next();
                    let keys = keys_tensor(key_seed, &rows, &Device::Cpu).unwrap();
                    let pos = rng.below(500) as u64;
                    let got = sample_draw(
                        &cpu.to_device(dev).unwrap(),
                        &keys.to_device(dev).unwrap(),
                        Draw::At(pos),
                        None,
                        Some(&seen_gpu),
                        &p,
                        KernelChoice::Custom,
                    )
                    .and_then(|t| t.to_vec1::<u32>())
                    .unwrap();
                    let want = sample_draw(
                        &cpu,
                        &keys,
                        Draw::At(pos),
                        None,
                        Some(&seen_cpu),
                        &p,
                        KernelChoice::Reference,
                    )
                    .and_then(|t| t.to_vec1::<u32>())
                    .unwrap();
                    let mut logits = cpu
                        .to_dtype(DType::F32)
                        .and_then(|t| t.flatten_all())
                        .and_then(|t| t.to_vec1::<f32>())
                        .unwrap();
                    if p.penalizes() {
                        for (row, s) in logits.chunks_mut(v).zip(mask.chunks(v)) {
                            penalize_row(row, s, p.repetition_penalty);
                        }
                    }
                    let mut marked = mask.clone();
                    for i in 0..b {
                        marked[i * v + got[i] as usize] = 1;
                        let row = &logits[i * v..(i + 1) * v];
                        let u = uniform(row_key(key_seed, rows[i]), pos);
                        agrees(&format!("{ctx} row {i}"), row, &p, u, (got[i], want[i]));
                    }
                    if p.is_greedy() && p.repetition_penalty > 1.0 {
                        assert_eq!(
                            got[0] as usize, second,
                            "{ctx}: the penalty did not flip row 0"
                        );
                    }
                    let after = seen_gpu
                        .flatten_all()
                        .and_then(|t| t.to_vec1::<u8>())
                        .unwrap();
                    assert!(
                        after == marked,
                        "{ctx}: the seen mask is not the drawn tokens marked"
                    );
                }
            }
        }
    }

    /// GPT-2's layout at a test's size: 3 layers of width 128, two heads of 64, 259 tokens.
    fn small_gpt2() -> ModelConfig {
        let mut gpt2 = ModelConfig::preset("gpt2").unwrap();
        gpt2.vocab_size = 259;
        gpt2.hidden_size = 128;
        gpt2.intermediate_size = 256;
        gpt2.num_hidden_layers = 3;
        gpt2.num_attention_heads = 2;
        gpt2.num_key_value_heads = 2;
        gpt2.max_position_embeddings = 128;
        gpt2
    }

    /// Llama's layout at a test's size: 2 layers of width 256, four query heads on one kv head.
    fn small_llama() -> ModelConfig {
        let mut llama = ModelConfig::preset("llama-tiny").unwrap();
        llama.vocab_size = 259;
        llama.hidden_size = 256;
        llama.intermediate_size = 512;
        llama.num_hidden_layers = 2;
        llama.num_attention_heads = 4;
        llama.num_key_value_heads = 1;
        llama.max_position_embeddings = 128;
        llama
    }

    /// The decode step replayed as a CUDA graph against the same fixed-shape step run op by
    /// op: the same kernels at the same shapes, so the same tokens exactly, sampled included;
    /// rows that end early make the engine compact (a new batch size: a new capture), and
    /// `min_new_tokens` holds stop ids back through the replays. The dynamic-shape step rounds
    /// differently (its attention reads fewer keys), so it need only agree on most rows.
    /// GPT-2's shape (learned positions, LayerNorm), then Llama's with four query heads per kv
    /// head (RoPE's table lookup, RMSNorm, SwiGLU, the grouped decode kernel) and LoRA
    /// adapters on its projections (their GEMMs on candle's cuBLAS handle), DoRA's too (row scales
    /// made before the capture), and Qwen3's (the
    /// per-head norms of q and k inside the fused decode kernel, heads of 128 on a width of
    /// 256), and Gemma 3's (heads of 256, its norms' f32 offsets in the fused kernel, a sliding
    /// window of 12 on the first layer, shorter than the sequences: the window's own key mask,
    /// made on the device inside the graph).
    pub fn graph_replay_gives_the_eager_fixed_steps_tokens(dev: &Device) {
        // Head dim 64: bf16 steps take the decode stream, f32 ones the simple kernel.
        let gpt2 = small_gpt2();
        let llama = small_llama();
        let qwen3 = ModelConfig {
            qk_norm: true,
            head_dim: Some(128),
            num_key_value_heads: 2,
            ..llama.clone()
        };
        let gemma3 = ModelConfig {
            qk_norm: true,
            norm_plus_one: true,
            head_dim: Some(256),
            sliding_window: Some(12),
            full_attention_layers: vec![1],
            ..llama.clone()
        };
        let lora = LoraConfig {
            rank: 8,
            ..LoraConfig::default()
        };
        // DoRA's generation reads its row scales, made in the eager step before the capture.
        let dora = LoraConfig {
            use_dora: true,
            ..lora.clone()
        };
        let mut compactions = 0;
        for (name, cfg, adapters) in [
            ("gpt2", &gpt2, None),
            ("llama gqa", &llama, None),
            ("llama gqa lora", &llama, Some(&lora)),
            ("llama gqa dora", &llama, Some(&dora)),
            ("qwen3 gqa", &qwen3, None),
            ("gemma3 gqa window", &gemma3, None),
        ] {
            let mut store = ParamStore::new(dev.clone(), 8);
            let net = Transformer::new(&mut store.scope(Net::Policy), cfg, adapters).unwrap();
            // Under TEMPER_GEMM_TUNE=timed a later run's GEMM could switch algorithm between
            // the runs compared, and its last bits with it.
            compactions += GemmTune::Heuristic.scope(|| graph_replay_matches(&net, name));
        }
        assert!(
            compactions > 0,
            "no run compacted its batch: no recapture was tested"
        );
    }

    /// The compactions the engine makes for `tokens` (each row's output, its stop token
    /// included): after each step, once at least a quarter of the active rows (and not all
    /// of them, nor at the last step) have finished, it drops them.
    fn expected_compactions(tokens: &[Vec<u32>], max_new: usize) -> usize {
        let done = |r: usize, t: usize| tokens[r].len() < max_new && tokens[r].len() <= t + 1;
        let mut active: Vec<usize> = (0..tokens.len()).collect();
        let mut n = 0;
        for t in 0..max_new {
            let d = active.iter().filter(|&&r| done(r, t)).count();
            if d == active.len() || t + 1 == max_new {
                break;
            }
            if d > 0 && 4 * d >= active.len() {
                n += 1;
                active.retain(|&r| !done(r, t));
            }
        }
        n
    }

    /// Checks one model's graph replays and returns how many compactions its runs made.
    fn graph_replay_matches(net: &Transformer, name: &str) -> usize {
        let mut compactions = 0;
        let tok = Tokenizer::bytes();
        let texts: Vec<String> = (0..23)
            .map(|i| format!("prompt {i}: {}", "ab".repeat(i % 5)))
            .collect();
        let prompts: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t).unwrap()).collect();
        for dtype in [DType::F32, DType::BF16] {
            for (temperature, top_k, top_p, min_new, min_p, penalty) in [
                (0.0, 0, 1.0, 0, 0.0, 1.0),
                (1.0, 0, 1.0, 6, 0.0, 1.0),
                (0.9, 30, 0.95, 0, 0.0, 1.0),
                // The seen mask, marked by the sampling inside the graph, across replays and
                // the recaptures after compaction.
                (0.0, 0, 1.0, 0, 0.0, 1.5),
                (1.0, 0, 1.0, 0, 0.05, 1.3),
            ] {
                let run = |decode: DecodeMode| {
                    let sc = SampleCfg {
                        max_new_tokens: 40,
                        min_new_tokens: min_new,
                        temperature,
                        top_k,
                        top_p,
                        min_p,
                        repetition_penalty: penalty,
                        stop: ["q", "z", "x", "k", "j", "v"].map(String::from).to_vec(),
                        engine: EngineOpts {
                            decode,
                            ..EngineOpts::default()
                        },
                    };
                    let ctx = Ctx::plain(dtype);
                    generate(
                        net,
                        ctx,
                        &tok,
                        &prompts,
                        &sc,
                        &RowKeys::range(9, 0, prompts.len()),
                    )
                    .unwrap()
                };
                let what = format!(
                    "{name} {dtype:?} T {temperature} top-k {top_k} top-p {top_p} min_new \
                     {min_new} min-p {min_p} penalty {penalty}"
                );
                let (graph, fixed, dynamic) = (
                    run(DecodeMode::Graph),
                    run(DecodeMode::Fixed),
                    run(DecodeMode::Dynamic),
                );
                assert_eq!(graph.tokens, fixed.tokens, "{what}: graph vs op by op");
                assert_eq!(graph.stats.decode_steps, fixed.stats.decode_steps, "{what}");
                // A capture that failed would fall back to the eager step and pass the above.
                let eager = 1 + graph.stats.compactions;
                assert!(
                    graph.stats.graph_replays + eager >= graph.stats.decode_steps,
                    "{what}: {:?}",
                    graph.stats
                );
                assert_eq!(fixed.stats.graph_replays, 0);
                // Whether rows stop early enough to compact depends on the random model's draws
                // (on the H200, Llama with LoRA at top-k 30 never did): the count must be the
                // one the outputs imply, and some run must compact.
                assert_eq!(
                    graph.stats.compactions,
                    expected_compactions(&graph.tokens, 40),
                    "{what}: compactions"
                );
                compactions += graph.stats.compactions;
                for t in &graph.tokens {
                    let early = &t[..t.len().min(min_new)];
                    assert!(early.iter().all(|&id| !tok.is_stop(id)), "{what}: {t:?}");
                }
                // bf16 logits of a random model tie often enough that rounding flips rows.
                if dtype == DType::F32 {
                    let same = (0..prompts.len())
                        .filter(|&i| graph.tokens[i] == dynamic.tokens[i])
                        .count();
                    assert!(
                        same * 4 >= prompts.len() * 3,
                        "{what}: only {same} of {} rows agree with the dynamic step",
                        prompts.len()
                    );
                }
            }
        }
        compactions
    }
    /// `TEMPER_PDL=on` (src/kernels/cuda/pdl.rs) changes how the decode step's kernels are
    /// launched, not what they compute: every token the same, greedy and sampled, with
    /// cuBLASLt's GEMMs and with ours (whose weight prefetch runs before its wait), through
    /// graphs that captured the programmatic launches (a failed capture would fall back to the
    /// eager step and pass the token check alone), with programmatic edges in them (our
    /// outputs allocated at the capture's start, src/kernels/cuda/capture_arena.rs). Outputs
    /// are not poisoned here: the memset before each output would order every kernel after
    /// the one ahead as a plain launch does.
    pub fn programmatic_launches_give_the_plain_launches_tokens(dev: &Device) {
        let cuda = dev.as_cuda_device().unwrap();
        if compute_capability(cuda).unwrap() < (9, 0) {
            eprintln!(
                "SKIPPED (programmatic launches need compute capability 9.0): \
                 programmatic_launches_give_the_plain_launches_tokens"
            );
            return;
        }
        let (gpt2, llama) = (small_gpt2(), small_llama());
        let tok = Tokenizer::bytes();
        let prompts: Vec<Vec<u32>> = (0..19)
            .map(|i| tok.encode(&format!("p{i} {}", "xy".repeat(i % 4))).unwrap())
            .collect();
        let poisoned = temper::kernels::cuda::poison_enabled();
        temper::kernels::cuda::set_poison(false);
        let launched = pdl::launches();
        for (name, cfg) in [("gpt2", &gpt2), ("llama gqa", &llama)] {
            let mut store = ParamStore::new(dev.clone(), 11);
            let net = Transformer::new(&mut store.scope(Net::Policy), cfg, None).unwrap();
            for gemm in [DecodeGemm::Cublaslt, DecodeGemm::Ours] {
                for (temperature, top_k, top_p) in [(0.0, 0, 1.0), (0.9, 30, 0.95)] {
                    let run = |pdl: Pdl| {
                        let sc = SampleCfg {
                            max_new_tokens: 24,
                            temperature,
                            top_k,
                            top_p,
                            stop: ["q", "z"].map(String::from).to_vec(),
                            ..SampleCfg::default()
                        };
                        let keys = RowKeys::range(5, 0, prompts.len());
                        let go =
                            || generate(&net, Ctx::plain(DType::BF16), &tok, &prompts, &sc, &keys);
                        GemmTune::Heuristic
                            .scope(|| gemm.scope(|| pdl.scope(go)))
                            .unwrap()
                    };
                    let what = format!("{name} {gemm:?} T {temperature} top-k {top_k}");
                    let ours = decode_gemm::launches();
                    let plain = run(Pdl::Off);
                    if gemm == DecodeGemm::Ours {
                        assert!(decode_gemm::launches() > ours, "{what}: no GEMM was ours");
                    }
                    let before = pdl::launches();
                    let early = run(Pdl::On);
                    assert!(pdl::launches() > before, "{what}: no programmatic launch");
                    // The capture allocates our kernels' outputs before its first kernel
                    // (capture_arena), so some of ours follow a kernel with no memory node
                    // between: a programmatic edge each.
                    let graph = temper::generate::last_capture();
                    eprintln!("{what}: graph {graph:?}");
                    let g = graph.expect("a census of the captured step");
                    assert!(g.programmatic > 0, "{what}: no programmatic edge: {g:?}");
                    assert_eq!(plain.tokens, early.tokens, "{what}");
                    assert!(early.stats.graph_replays > 0, "{what}: {:?}", early.stats);
                    assert_eq!(
                        plain.stats.graph_replays, early.stats.graph_replays,
                        "{what}: a capture failed under one launch and not the other"
                    );
                }
            }
        }
        temper::kernels::cuda::set_poison(poisoned);
        assert!(pdl::launches() > launched);
    }
}
