use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use super::*;
use crate::config::{LocalRope, LoraConfig, LoraTarget, MlpKind, ModelConfig, TrainConfig};
use crate::kernels::bias::BiasAct;
use crate::kernels::{self, KernelChoice, KernelSet};
use crate::model::linear::Ctx;
use crate::model::{Fwd, Transformer};
use crate::train::optimizer::AdamW;
use crate::train::params::{Net, ParamStore, Role};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = crate::train::rng::splitmix64(s);
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    let host = |t: &Tensor| -> Vec<f32> {
        let t = t.to_dtype(DType::F32).unwrap();
        t.flatten_all().unwrap().to_vec1().unwrap()
    };
    let (a, b) = (host(a), host(b));
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    (diff, scale)
}

/// A block-like chain of our custom ops through their CPU implementations (the forms the
/// tape records on CUDA: `op1`/`op2`/`op3` and their own backwards, the residual add fused
/// into LayerNorm with its two outputs), with a residual that is read three times, a constant
/// (the rotary tables) and a weight read twice.
fn chain(x: &Tensor, p: &[Tensor]) -> candle_core::Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    let (heads, d) = (3, c / 3);
    let h = kernels::layernorm::fused(x, &p[0], &p[1], 1e-5)?;
    let q = kernels::gemm::linear(&h, &p[2], None, KernelChoice::Reference)?;
    let q = kernels::heads::fused(&q, (b, t, heads, d), false)?;
    let cos = randn(&[b, 1, t, d / 2], 91);
    let sin = randn(&[b, 1, t, d / 2], 92);
    let q = kernels::rope::fused(&q, &cos, &sin)?;
    let q = kernels::heads::fused(&q, (b, heads, t, d), true)?;
    let dropped = kernels::dropout::fused(&q, kernels::dropout::Mask::new(0.2, 5)?)?;
    // The residual add fused into the norm that reads it (two ops outside a tape).
    let (x1, h1) = kernels::layernorm::add_fused(x, &dropped, &p[7], &p[8], 1e-5)?;
    let u = kernels::gemm::linear(&h1, &p[3], Some(&p[4]), KernelChoice::Reference)?;
    let g = kernels::bias::fused(&u, &p[5], BiasAct::GeluTanh)?;
    let u2 = kernels::gelu::fused(&u)?;
    let m = kernels::swiglu::fused(&g, &u2)?;
    let y = kernels::gemm::linear(&m, &p[6], None, KernelChoice::Reference)?;
    // The same weight again, and the residual a third time.
    let y2 = kernels::gemm::linear(&x1, &p[2], None, KernelChoice::Reference)?;
    add(&add(&x1, &y)?, &add(&y2, x)?)
}

/// The tape's gradients of a chain of custom ops are candle's autograd's, for the input and
/// every weight, and the segment is one node of candle's graph.
#[test]
fn custom_ops_on_the_tape_match_candles_autograd() {
    let (b, t, c, f) = (2, 7, 12, 20);
    let dims: [&[usize]; 9] = [
        &[c],
        &[c],
        &[c, c],
        &[f, c],
        &[f],
        &[f],
        &[c, f],
        &[c],
        &[c],
    ];
    let run = |taped: bool| {
        let x = Var::from_tensor(&randn(&[b, t, c], 1)).unwrap();
        let ps: Vec<Var> = dims
            .iter()
            .enumerate()
            .map(|(i, d)| Var::from_tensor(&(randn(d, 10 + i as u64) * 0.5).unwrap()).unwrap())
            .collect();
        let pt: Vec<Tensor> = ps.iter().map(|v| v.as_tensor().clone()).collect();
        let y = match taped {
            true => segment(x.as_tensor(), |x| Ok(chain(x, &pt)?)).unwrap(),
            false => chain(x.as_tensor(), &pt).unwrap(),
        };
        let dy = randn(&[b, t, c], 3);
        let loss = (&y * &dy).unwrap().sum_all().unwrap();
        // On the tape: the input, the segment's node, the product and the sum (two nodes in
        // candle). In candle's graph: every op.
        let nodes = loss.sorted_nodes().len();
        assert!((nodes <= 5) == taped, "{nodes} nodes, taped {taped}");
        let grads = backward(&loss).unwrap();
        let mut out = vec![y];
        out.push(grads.get(x.as_tensor()).expect("dx").clone());
        for p in &ps {
            out.push(
                grads
                    .get(p.as_tensor())
                    .expect("a weight's gradient")
                    .clone(),
            );
        }
        out
    };
    let (taped, plain) = (run(true), run(false));
    for (i, (a, b)) in taped.iter().zip(&plain).enumerate() {
        let (diff, scale) = max_diff(a, b);
        assert!(
            diff <= 1e-5 * scale.max(1.0),
            "tensor {i}: {diff} off at scale {scale}"
        );
    }
}

struct Setup {
    preset: &'static str,
    /// LoRA adapters with this dropout rate (on a frozen base), or none.
    lora: Option<f64>,
    dtype: DType,
    copies: bool,
    /// The adapters are DoRA's.
    dora: bool,
}

impl Setup {
    const fn new(preset: &'static str, lora: Option<f64>, dtype: DType, copies: bool) -> Self {
        Self {
            preset,
            lora,
            dtype,
            copies,
            dora: false,
        }
    }

    const fn dora(self) -> Self {
        Self { dora: true, ..self }
    }

    fn describe(&self) -> String {
        let Setup {
            preset,
            lora,
            dtype,
            copies,
            dora,
        } = self;
        format!("{preset} lora {lora:?} dora {dora} {dtype:?} copies {copies}")
    }
}

/// The shape the tape is checked on for `preset`: a preset's, or a family's layout on the
/// tiny one.
fn model_config(preset: &str) -> ModelConfig {
    match preset {
        // Qwen3's layout: per-head norms of q and k, heads wider than hidden / heads.
        "qwen3" => ModelConfig {
            qk_norm: true,
            head_dim: Some(16),
            ..ModelConfig::for_tests("tiny")
        },
        // A sliding window of 5 over the 12 positions in the first layer, none in the second.
        "window" => ModelConfig {
            sliding_window: Some(5),
            full_attention_layers: vec![1],
            ..ModelConfig::for_tests("tiny")
        },
        // Gemma 3's layout: norms after each branch with gains 1 + w, GeGLU, a scaled
        // embedding, its own attention scale, and a window and a rotary base of its own in the
        // first layer.
        "gemma3" => ModelConfig {
            qk_norm: true,
            head_dim: Some(16),
            norm_plus_one: true,
            post_norms: true,
            embed_scale: true,
            mlp: MlpKind::GeGlu,
            query_pre_attn_scalar: Some(12),
            sliding_window: Some(5),
            full_attention_layers: vec![1],
            rope_local: Some(LocalRope {
                theta: 100.0,
                layers: vec![0],
            }),
            ..ModelConfig::for_tests("tiny")
        },
        // Gemma 2's: Gemma 3's without the norms of q and k or the second base, with caps on
        // the scores and the logits low enough to bind.
        "gemma2" => ModelConfig {
            qk_norm: false,
            rope_local: None,
            attn_logit_softcapping: Some(1.0),
            final_logit_softcapping: Some(2.0),
            ..model_config("gemma3")
        },
        preset => ModelConfig::for_tests(preset),
    }
}

/// `(loss, gradient per parameter name)` of a 2-layer model's next-token loss, with dropout,
/// its blocks on the tape or not.
fn model_grads(s: &Setup, tape: bool) -> (f32, HashMap<String, Tensor>) {
    let (loss, grads, _) = model_grads_with(s, tape, false);
    (loss, grads)
}

/// [`model_grads`], with each block recomputed in the backward or not, and the size of the
/// forward's recording.
fn model_grads_with(
    s: &Setup,
    tape: bool,
    recompute_blocks: bool,
) -> (f32, HashMap<String, Tensor>, Option<SegmentStats>) {
    let mut cfg = model_config(s.preset);
    cfg.dropout = 0.1;
    let lora = s.lora.map(|dropout| LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout,
        targets: vec![
            LoraTarget::Q,
            LoraTarget::V,
            LoraTarget::O,
            LoraTarget::Up,
            LoraTarget::Down,
        ],
        use_rslora: false,
        use_dora: s.dora,
    });
    let mut store = ParamStore::new(Device::Cpu, 5);
    if lora.is_some() {
        store.freeze(Net::Policy, &[Role::Base], DType::F32);
    }
    let net = Transformer::new(&mut store.scope(Net::Policy), &cfg, lora.as_ref()).unwrap();
    let mut opt = AdamW::new(&store, &|_| true, &TrainConfig::default()).unwrap();
    if s.copies {
        opt.keep_compute_copies(s.dtype).unwrap();
    }
    let f = Fwd {
        ctx: Ctx {
            dtype: s.dtype,
            kernels: KernelSet::default(),
            use_lora: lora.is_some(),
            dropout_seed: Some(17),
            neftune_alpha: None,
            tape,
            recompute_blocks,
        },
        positions: None,
        key_valid: None,
        segments: None,
    };
    let ids: Vec<u32> = (0..3 * 13).map(|i| (i * 7 + 3) % 61).collect();
    let all = Tensor::from_vec(ids, (3, 13), &Device::Cpu).unwrap();
    let x = all.narrow(1, 0, 12).unwrap().contiguous().unwrap();
    let y = all.narrow(1, 1, 12).unwrap().contiguous().unwrap();
    let loss = net.target_logprobs(&x, &y, &f).unwrap();
    let recorded = last_segment();
    let loss = loss.neg().unwrap().mean_all().unwrap();
    let grads = opt.collect(&backward(&loss).unwrap()).unwrap();
    let by_name = store
        .iter()
        .filter(|(_, _, i)| !i.frozen)
        .map(|(n, _, _)| n.clone())
        .zip(grads)
        .collect();
    (loss.to_scalar::<f32>().unwrap(), by_name, recorded)
}

/// The models the tape is checked on: LoRA without its dropout (the adapter reads x itself)
/// and with it, f32 and bf16 with compute copies; DoRA's adapters with and without dropout.
const TAPE_MODELS: [Setup; 14] = [
    Setup::new("gpt2", None, DType::F32, false),
    Setup::new("tiny", None, DType::F32, false),
    Setup::new("gpt2", Some(0.0), DType::F32, false),
    Setup::new("tiny", Some(0.1), DType::F32, false),
    Setup::new("gpt2", None, DType::BF16, true),
    Setup::new("tiny", Some(0.1), DType::BF16, true),
    Setup::new("qwen3", None, DType::F32, false),
    Setup::new("qwen3", Some(0.1), DType::BF16, true),
    Setup::new("window", None, DType::F32, false),
    Setup::new("gemma3", None, DType::F32, false),
    Setup::new("gemma3", Some(0.1), DType::BF16, true),
    Setup::new("gemma2", Some(0.1), DType::BF16, true),
    Setup::new("tiny", Some(0.1), DType::F32, false).dora(),
    Setup::new("gpt2", Some(0.0), DType::BF16, true).dora(),
];

/// Whole models (GPT-2, Llama, Qwen3 and Gemma 3 shapes and a sliding window, with dropout; LoRA with a frozen embedding, so the
/// segment's input carries no graph) give the same loss and the same gradient for every
/// parameter with their blocks on the tape as in candle's graph: on the CPU the blocks are
/// reference composites and reference GEMMs, which the tape records as islands and as GEMMs
/// with a hand-written backward.
#[test]
fn models_train_the_same_on_the_tape() {
    // And bf16 masters cast in the graph: the tape cannot carry them and steps aside.
    let setups = TAPE_MODELS
        .into_iter()
        .chain([Setup::new("tiny", None, DType::BF16, false)]);
    for s in setups {
        let (what, dtype) = (s.describe(), s.dtype);
        let (l1, g1) = model_grads(&s, true);
        let (l0, g0) = model_grads(&s, false);
        assert_eq!(l1, l0, "{what}: the loss differs");
        assert!(!g0.is_empty(), "{what}: no gradients");
        let mut names: Vec<_> = g0.keys().collect();
        names.sort();
        let tol = match dtype {
            DType::F32 => 1e-5,
            _ => 1e-2,
        };
        for n in names {
            let (diff, scale) = max_diff(&g1[n], &g0[n]);
            assert!(
                diff <= tol * scale.max(1e-3),
                "{what}: {n} off by {diff} at scale {scale}"
            );
        }
    }
}

/// With each block recomputed in its backward (`gradient_checkpointing`), the models of the
/// test above give the tape's loss and gradients (dropout masks, LoRA on a frozen base and
/// bf16 compute copies included), while the forward's recording keeps a fraction of the
/// bytes: each block's inputs and outputs instead of its activations.
#[test]
fn recomputed_blocks_give_the_tapes_gradients_and_keep_less() {
    for s in TAPE_MODELS {
        let what = s.describe();
        let (l1, g1, kept) = model_grads_with(&s, true, true);
        let (l0, g0, full) = model_grads_with(&s, true, false);
        assert_eq!(l1, l0, "{what}: the loss differs");
        for (n, g) in &g0 {
            let (diff, scale) = max_diff(&g1[n], g);
            assert!(
                diff <= 1e-6 * scale.max(1e-3),
                "{what}: {n} off by {diff} at scale {scale}"
            );
        }
        let (kept, full) = (kept.unwrap().output_bytes, full.unwrap().output_bytes);
        assert!(
            3 * kept < full,
            "{what}: {kept} bytes recorded against {full}"
        );
    }
}

/// Outside a segment every recorded form is the plain candle op, in candle's graph.
#[test]
fn outside_a_segment_ops_build_candles_graph() {
    assert!(!recording());
    let a = Var::from_tensor(&randn(&[3, 4], 1)).unwrap();
    let b = randn(&[3, 4], 2);
    let y = add(a.as_tensor(), &b).unwrap();
    assert!(y.track_op());
    let y = island(&[&y], |t| t[0].exp()).unwrap();
    assert!(y.track_op());
    let g = backward(&y.sum_all().unwrap()).unwrap();
    let want = (a.as_tensor() + &b).unwrap().exp().unwrap();
    let (diff, _) = max_diff(g.get(a.as_tensor()).unwrap(), &want);
    assert_eq!(diff, 0.0);
}

/// `x * w` (`w [C]` on every row), on the CPU, for the test below.
struct Scale;

impl CustomOp2 for Scale {
    fn name(&self) -> &'static str {
        "test-scale"
    }

    fn cpu_fwd(
        &self,
        sx: &candle_core::CpuStorage,
        lx: &candle_core::Layout,
        sw: &candle_core::CpuStorage,
        lw: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (candle_core::CpuStorage::F32(x), candle_core::CpuStorage::F32(w)) = (sx, sw) else {
            candle_core::bail!("scale: f32 only");
        };
        let (Some((x0, x1)), Some((w0, w1))) = (lx.contiguous_offsets(), lw.contiguous_offsets())
        else {
            candle_core::bail!("scale: contiguous inputs only");
        };
        let w = &w[w0..w1];
        let y = x[x0..x1]
            .iter()
            .enumerate()
            .map(|(i, v)| v * w[i % w.len()])
            .collect();
        Ok((candle_core::CpuStorage::F32(y), lx.shape().clone()))
    }
}

/// `acc += d` in place, on the CPU.
struct AddInto;

impl candle_core::InplaceOp2 for AddInto {
    fn name(&self) -> &'static str {
        "test-add-into"
    }

    fn cpu_fwd(
        &self,
        acc: &mut candle_core::CpuStorage,
        _: &candle_core::Layout,
        d: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<()> {
        match (acc, d) {
            (candle_core::CpuStorage::F32(a), candle_core::CpuStorage::F32(d)) => {
                a.iter_mut().zip(d).for_each(|(a, d)| *a += d);
                Ok(())
            }
            _ => candle_core::bail!("add-into: f32 only"),
        }
    }
}

static HANDED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// `x * w` recorded with `op2_with`, whose backward adds `dx` into the gradient it is handed,
/// in place, as the GEMM does.
fn scale(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    op2_with([x, w], [arg(x), arg(w)], Scale, |_, [x, w], g, _, acc| {
        let dx = g.broadcast_mul(w)?;
        let dw = (&g * x)?.sum((0, 1))?;
        let dx = match acc {
            Some(acc) => {
                HANDED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                acc.inplace_op2(&dx, &AddInto)?;
                acc
            }
            None => dx,
        };
        Ok(vec![Some(dx), Some(dw)])
    })
}

/// A tensor read by several ops that can add into its gradient gets one buffer, added into in
/// place, and the gradients are candle's autograd's; a gradient the tape does not hold alone
/// (the residual add's, handed to both of its inputs) is never written in place.
#[test]
fn gradients_are_added_into_in_place_only_where_the_tape_holds_them_alone() {
    let run = |taped: bool| {
        let x = Var::from_tensor(&randn(&[2, 5, 6], 1)).unwrap();
        let ws: Vec<Var> = (0..4)
            .map(|i| Var::from_tensor(&randn(&[6], 20 + i)).unwrap())
            .collect();
        let w: Vec<Tensor> = ws.iter().map(|v| v.as_tensor().clone()).collect();
        // On the tape the recorded op; in candle's graph its composite.
        let scale = |x: &Tensor, w: &Tensor| match taped {
            true => scale(x, w),
            false => x.broadcast_mul(w),
        };
        let f = |x: &Tensor| -> Result<Tensor> {
            // x read three times by ops that add in place.
            let a = add(
                &add(&scale(x, &w[0])?, &scale(x, &w[1])?)?,
                &scale(x, &w[2])?,
            )?;
            // `a` reaches the final add and an op that adds in place: the add's gradient
            // comes first and is shared with `u`'s.
            let u = scale(&a, &w[3])?;
            add(&a, &u)
        };
        let y = match taped {
            true => segment(x.as_tensor(), |x| Ok(f(x)?)).unwrap(),
            false => f(x.as_tensor()).unwrap(),
        };
        let loss = (&y * randn(&[2, 5, 6], 3)).unwrap().sum_all().unwrap();
        let grads = backward(&loss).unwrap();
        let mut out = vec![grads.get(x.as_tensor()).unwrap().clone()];
        out.extend(ws.iter().map(|v| grads.get(v.as_tensor()).unwrap().clone()));
        out
    };
    HANDED.store(0, std::sync::atomic::Ordering::Relaxed);
    let plain = run(false);
    assert_eq!(HANDED.load(std::sync::atomic::Ordering::Relaxed), 0);
    let taped = run(true);
    assert_eq!(
        HANDED.load(std::sync::atomic::Ordering::Relaxed),
        2,
        "x's second and third readers add into its gradient; `a`'s is shared"
    );
    for (i, (a, b)) in taped.iter().zip(&plain).enumerate() {
        let (diff, scale) = max_diff(a, b);
        assert!(
            diff <= 1e-5 * scale.max(1.0),
            "tensor {i}: {diff} off at {scale}"
        );
    }
}

/// A table read by the embedding lookup and by the LM head's GEMM (tied embeddings) gets one
/// gradient on the tape: the head's GEMM leaves its fresh dW, the lookup's backward starts
/// from it instead of zeros (no add of two table-sized gradients), and the gradients are
/// candle's autograd's. The segment's input is the ids, which carry no graph.
#[test]
fn a_tied_tables_two_gradients_meet_in_the_lookups_backward() {
    use crate::kernels::embedding::tests::ONTO;
    let dev = Device::Cpu;
    // The lookups as two ops and an add, or as the one token-and-position op.
    let run = |taped: bool, one_op: bool| {
        let table = Var::from_tensor(&randn(&[11, 6], 1)).unwrap();
        let pos = Var::from_tensor(&randn(&[5, 6], 2)).unwrap();
        let ids = Tensor::new(&[[3u32, 7, 3, 10, 0], [1, 3, 3, 9, 7]], &dev).unwrap();
        let targets = Tensor::new(&[[7u32, 3, 10, 0, 1], [3, 3, 9, 7, 2]], &dev).unwrap();
        let positions = Tensor::new(&[0u32, 1, 2, 3, 4], &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .broadcast_as((2, 5))
            .unwrap()
            .contiguous()
            .unwrap();
        let f = |ids: &Tensor| -> anyhow::Result<Tensor> {
            let (t, pt) = (table.as_tensor(), pos.as_tensor());
            let x = match one_op {
                true => kernels::embedding::fused2(t, ids, pt, &positions, DType::F32)?,
                false => add(
                    &kernels::embedding::fused(t, ids, DType::F32)?,
                    &kernels::embedding::fused(pt, &positions, DType::F32)?,
                )?,
            };
            let h = island(&[&x], |a| a[0].tanh())?;
            let r = KernelChoice::Reference;
            let head = kernels::logprobs::Head {
                w: t,
                shaping: kernels::logprobs::Shaping::NONE,
            };
            Ok(kernels::logprobs::head_logprobs(&h, head, &targets, r, r)?)
        };
        let y = match taped {
            true => segment(&ids, f).unwrap(),
            false => f(&ids).unwrap(),
        };
        let loss = (&y * randn(&[2, 5], 3)).unwrap().sum_all().unwrap();
        let grads = backward(&loss).unwrap();
        [table.as_tensor(), pos.as_tensor()].map(|v| grads.get(v).unwrap().clone())
    };
    let plain = run(false, false);
    for one_op in [false, true] {
        ONTO.with(|c| c.set(0));
        let graph = run(false, one_op);
        assert_eq!(ONTO.with(|c| c.get()), 0);
        let taped = run(true, one_op);
        assert_eq!(
            ONTO.with(|c| c.get()),
            1,
            "one op {one_op}: the lookup's backward starts from the head's gradient"
        );
        for (i, ((a, b), c)) in taped.iter().zip(&graph).zip(&plain).enumerate() {
            assert_eq!(a.dtype(), DType::F32);
            for (other, what) in [(b, "candle's graph"), (c, "two ops in candle's graph")] {
                let (diff, scale) = max_diff(a, other);
                assert!(
                    diff <= 1e-6 * scale.max(1.0),
                    "one op {one_op}, tensor {i}: {diff} off {what} at {scale}"
                );
            }
        }
    }
}
