use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::model::linear::Ctx;
use crate::model::{Fwd, Transformer};
use crate::train::loss::masked_mean;
use crate::train::params::ParamStore;
use crate::train::rng::Rng;

type Example = (Vec<u32>, Vec<bool>);

#[test]
fn best_fit_decreasing_places_every_item_once_within_capacity() {
    // Sizes in a shuffled order. 24 = 3 x 8 and 40 = 4 x 10: three and four exactly full bins
    // are the optimum. The second list takes five bins when the items are not sorted first
    // or go to the roomiest bin instead of the tightest.
    for (sizes, cap, optimum) in [
        (vec![1, 6, 2, 4, 3, 2, 5, 1], 8, 3),
        (vec![2, 5, 1, 9, 3, 2, 7, 4, 2, 5], 10, 4),
    ] {
        let bins = best_fit_decreasing(&sizes, cap).unwrap();
        assert_eq!(bins.len(), optimum, "{sizes:?}: {bins:?}");
        let mut seen: Vec<usize> = bins.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..sizes.len()).collect::<Vec<_>>());
        for b in &bins {
            assert!(
                b.iter().map(|&i| sizes[i]).sum::<usize>() <= cap,
                "{bins:?}"
            );
        }
    }
    // The 1 goes to the tightest bin that holds it (the 4 and 3's), not to the first (the
    // lone 6): best fit, not first fit. The two 6s tie by index, so the bins are a function of
    // the sizes alone.
    let bins = best_fit_decreasing(&[6, 6, 4, 3, 2, 1], 8).unwrap();
    assert_eq!(bins, [vec![0, 4], vec![1], vec![2, 3, 5]]);

    let mut rng = Rng::new(3);
    let sizes: Vec<usize> = (0..500).map(|_| rng.below(40)).collect();
    let bins = best_fit_decreasing(&sizes, 48).unwrap();
    let mut seen: Vec<usize> = bins.iter().flatten().copied().collect();
    seen.sort();
    assert_eq!(seen, (0..sizes.len()).collect::<Vec<_>>());
    let loads: Vec<usize> = bins
        .iter()
        .map(|b| b.iter().map(|&i| sizes[i]).sum())
        .collect();
    assert!(loads.iter().all(|&l| l <= 48), "{loads:?}");
    // Best fit leaves at most one bin half empty: two such bins' items would share one.
    assert!(
        loads.iter().filter(|&&l| 2 * l <= 48).count() <= 1,
        "{loads:?}"
    );
    assert!(best_fit_decreasing(&[3, 9], 8).is_err());
}

#[test]
fn packed_batch_lays_examples_end_to_end_with_restarting_positions() {
    let a: Example = (vec![5, 6, 7], vec![false, true, true]);
    let b: Example = (vec![8, 9], vec![false, false]);
    let c: Example = (vec![1, 2, 3, 4], vec![false, false, true, true]);
    let p = packed_batch(&[vec![&a, &b], vec![&c]], 0, 4, &Device::Cpu).unwrap();
    let v = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(
        v(&p.lm.inputs),
        [[5.0, 6.0, 8.0, 0.0], [1.0, 2.0, 3.0, 0.0]]
    );
    assert_eq!(
        v(&p.lm.targets),
        [[6.0, 7.0, 9.0, 0.0], [2.0, 3.0, 4.0, 0.0]]
    );
    assert_eq!(
        v(&p.lm.loss_mask),
        [[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]]
    );
    assert_eq!(
        v(&p.lm.key_valid),
        [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]]
    );
    assert_eq!(
        v(&p.segments.positions),
        [[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 2.0, 0.0]]
    );
    assert_eq!(
        v(&p.segments.start),
        [[0.0, 0.0, 2.0, 3.0], [0.0, 0.0, 0.0, 3.0]]
    );
    assert_eq!((p.lm.tokens, p.lm.last.as_slice()), (6, &[2, 2][..]));
    assert!(packed_batch(&[vec![&a, &c]], 0, 4, &Device::Cpu).is_err());
}

/// A 2-layer model of `preset`'s shape with a 61-token vocabulary and 32 positions.
fn small_model(preset: &str) -> (ParamStore, Transformer) {
    crate::model::test_model(preset, 11)
}

/// The masked mean of the response tokens' negative log-probabilities and its gradient for
/// every parameter, by name.
fn loss_and_grads(
    store: &ParamStore,
    net: &Transformer,
    b: &LmBatch,
    positions: Option<&Tensor>,
    segments: Option<&Segments>,
    (tape, recompute_blocks): (bool, bool),
) -> (f64, HashMap<String, Tensor>) {
    let f = Fwd {
        ctx: Ctx {
            tape,
            recompute_blocks,
            ..Ctx::plain(DType::F32)
        },
        positions,
        key_valid: None,
        segments,
    };
    let logp = net.target_logprobs(&b.inputs, &b.targets, &f).unwrap();
    let loss = masked_mean(&logp.neg().unwrap(), &b.loss_mask).unwrap();
    let grads = crate::tape::backward(&loss).unwrap();
    let by_name = store
        .iter()
        .map(|(n, v, _)| (n.clone(), grads.get(v.as_tensor()).unwrap().clone()))
        .collect();
    (f64::from(loss.to_scalar::<f32>().unwrap()), by_name)
}

/// Largest absolute difference, and the largest magnitude of `b`.
fn max_diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (a, b) = (flat(a), flat(b));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    (diff, b.iter().fold(0f32, |m, y| m.max(y.abs())))
}

/// Packing is only a layout: examples packed into rows, each attending to itself with
/// positions from 0, give the loss and every parameter's gradient that the same examples
/// give one per padded row. For learned positions, LayerNorm and GELU (GPT-2) and for rotary
/// positions, RMSNorm, SwiGLU and grouped-query attention (Llama), on candle's graph and on
/// the tape. Without the boundaries, the packed loss moves: the test sees attention across
/// examples.
#[test]
fn packed_rows_give_the_unpacked_loss_and_gradients() {
    let mut rng = Rng::new(7);
    // Awkward lengths: a 2-token example (one position), one that fills a row exactly
    // (17 tokens in rows of 16 positions) and rows left with padding.
    let lens = [2, 3, 5, 8, 17, 13, 6];
    let examples: Vec<Example> = lens
        .iter()
        .map(|&n| {
            let ids = (0..n).map(|_| rng.below(61) as u32).collect();
            let mut train: Vec<bool> = (0..n).map(|_| rng.f64() < 0.6).collect();
            train[n - 1] = true;
            (ids, train)
        })
        .collect();
    let len = 16;
    let sizes: Vec<usize> = examples.iter().map(|(ids, _)| ids.len() - 1).collect();
    let bins = best_fit_decreasing(&sizes, len).unwrap();
    assert_eq!(bins.len(), 3, "{bins:?}");
    let rows: Vec<Vec<&Example>> = bins
        .iter()
        .map(|b| b.iter().map(|&i| &examples[i]).collect())
        .collect();
    for preset in ["gpt2", "tiny"] {
        let (store, net) = small_model(preset);
        let unpacked = lm_batch(&examples, 0, 32, &Device::Cpu).unwrap();
        let packed = packed_batch(&rows, 0, len, &Device::Cpu).unwrap();
        assert_eq!(packed.lm.tokens, unpacked.tokens);
        // Candle's graph, the tape, and the tape with each block recomputed in the backward
        // (which must carry the segments into its second forward).
        for tape in [(false, false), (true, false), (true, true)] {
            let what = format!("{preset}, (tape, recompute) {tape:?}");
            let (l0, g0) = loss_and_grads(&store, &net, &unpacked, None, None, tape);
            let (l1, g1) =
                loss_and_grads(&store, &net, &packed.lm, None, Some(&packed.segments), tape);
            assert!(
                (l1 - l0).abs() <= 1e-5 * l0.abs(),
                "{what}: loss {l1} vs {l0}"
            );
            assert_eq!(g0.len(), g1.len());
            for (n, g) in &g0 {
                let (diff, scale) = max_diff(&g1[n], g);
                assert!(
                    diff <= 1e-5 * scale.max(1e-3),
                    "{what}: {n} off by {diff} at scale {scale}"
                );
            }
            let (crossed, _) = loss_and_grads(
                &store,
                &net,
                &packed.lm,
                Some(&packed.segments.positions),
                None,
                tape,
            );
            // A small random model's attention is near uniform, so the shift is small; it is
            // still tens of times the tolerance above.
            assert!(
                (crossed - l0).abs() > 1e-4 * l0.abs(),
                "{what}: attention across examples left the loss at {crossed} (alone {l0})"
            );
        }
    }
}

/// DPO's padding-free layout is only a layout too: each sequence's summed response
/// log-probability, and the gradient of a weighted sum of them, come out as from the padded
/// batch, whether the sequences fill one row (a short batch) or several (the context caps the
/// row at 16 positions).
#[test]
fn padding_free_sequences_give_the_padded_sums_and_gradients() {
    let mut rng = Rng::new(9);
    let lens = [4, 9, 2, 17, 6, 11];
    let seqs: Vec<Example> = lens
        .iter()
        .map(|&n| {
            let ids = (0..n).map(|_| rng.below(61) as u32).collect();
            let train = (0..n).map(|j| j >= n / 3).collect();
            (ids, train)
        })
        .collect();
    let weights = Tensor::new(&[0.5f32, -1.0, 2.0, 0.25, -0.75, 1.5], &Device::Cpu).unwrap();
    for preset in ["gpt2", "tiny"] {
        let (store, net) = small_model(preset);
        let run = |b: &SeqBatch| {
            let f = b.fwd(Ctx::plain(DType::F32));
            let lp = net
                .target_logprobs(&b.lm.inputs, &b.lm.targets, &f)
                .unwrap();
            let sums = b.per_seq(&(lp * &b.lm.loss_mask).unwrap()).unwrap();
            let loss = (&sums * &weights).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let g: HashMap<String, Tensor> = store
                .iter()
                .map(|(n, v, _)| (n.clone(), grads.get(v.as_tensor()).unwrap().clone()))
                .collect();
            (sums.to_vec1::<f32>().unwrap(), g)
        };
        let padded = SeqBatch::new(&seqs, 0, 32, false, &Device::Cpu).unwrap();
        let (want, g0) = run(&padded);
        for max_len in [32, 16] {
            let packed = SeqBatch::new(&seqs, 0, max_len, true, &Device::Cpu).unwrap();
            let rows = packed.lm.inputs.dim(0).unwrap();
            assert_eq!(rows, if max_len == 32 { 2 } else { 3 }, "{preset}");
            assert_eq!(packed.lm.tokens, padded.lm.tokens);
            let (got, g1) = run(&packed);
            for (s, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{preset} seq {s}: {a} vs {b}"
                );
            }
            for (n, g) in &g0 {
                let (diff, scale) = max_diff(&g1[n], g);
                assert!(
                    diff <= 1e-5 * scale.max(1e-3),
                    "{preset} {n}: {diff} at {scale}"
                );
            }
        }
    }
}

/// A plain example opens with BOS where the tokenizer writes one (TRL's SFT tokenises the
/// prompt with special tokens), once, and carries no loss on it; a chat template's rendering
/// is tokenised without special tokens, as transformers' `apply_chat_template` does.
#[test]
fn an_example_opens_with_the_tokenizers_bos_once() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama");
    let tok = Tokenizer::load_dir(&dir).unwrap();
    let plain = SftExample::prompt_response("2+2=", "4", true, None);
    let (ids, train) = encode_example(&tok, &plain).unwrap();
    let bare = [tok.encode("2+2=").unwrap(), tok.encode("4").unwrap()].concat();
    assert_eq!(ids[0], 300);
    assert_eq!(&ids[1..ids.len() - 1], bare.as_slice());
    assert_eq!(*ids.last().unwrap(), tok.eos_id());
    assert!(!train[0]);
    // A rendered chat is as its template wrote it: one BOS where it wrote one, none where not.
    for (text, bos) in [("<|begin_of_text|>2+2=", 1), ("2+2=", 0)] {
        let templated = SftExample::prompt_response(text, "4", false, None);
        let (ids, _) = encode_example(&tok, &templated).unwrap();
        assert_eq!(ids.iter().filter(|&&i| i == 300).count(), bos, "{ids:?}");
    }
    // Trained whole (`[sft] completion_only_loss = false`): every token carries loss, and
    // the EOS still follows the response alone.
    let whole = SftExample {
        train_all: true,
        ..plain.clone()
    };
    let (whole_ids, whole_train) = encode_example(&tok, &whole).unwrap();
    assert_eq!(whole_ids, ids);
    assert!(whole_train.iter().all(|&t| t), "{whole_train:?}");
    // Text that ends with EOS gets no second one (TRL appends it only where it is missing).
    let ended = SftExample::prompt_response("2+2=", "4<|eot_id|>", true, None);
    let (ids, _) = encode_example(&tok, &ended).unwrap();
    assert_eq!(
        ids.iter().filter(|&&i| i == tok.eos_id()).count(),
        1,
        "{ids:?}"
    );
}

/// WPO's weights against each sequence computed alone from its full logits in f64 (the mean
/// over its trained tokens of log p(y_t) - log sum_v p(v)^2, exponentiated), padded and
/// packed alike.
#[test]
fn wpo_weights_match_each_sequence_computed_alone() {
    let mut rng = Rng::new(4);
    let lens = [5, 12, 3, 9];
    let seqs: Vec<Example> = lens
        .iter()
        .map(|&n| {
            let ids = (0..n).map(|_| rng.below(61) as u32).collect();
            let train = (0..n).map(|j| j >= n / 2).collect();
            (ids, train)
        })
        .collect();
    let (_store, net) = small_model("tiny");
    let f = Fwd {
        ctx: Ctx::plain(DType::F32),
        positions: None,
        key_valid: None,
        segments: None,
    };
    let want: Vec<f64> = seqs
        .iter()
        .map(|(ids, train)| {
            let n = ids.len();
            let input = Tensor::new(&ids[..n - 1], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = net.forward(&input, &f, None).unwrap().squeeze(0).unwrap();
            let rows = logits.to_vec2::<f32>().unwrap();
            let (mut sum, mut count) = (0f64, 0usize);
            for (j, z) in rows.iter().enumerate() {
                if !train[j + 1] {
                    continue;
                }
                let m = z
                    .iter()
                    .fold(f64::NEG_INFINITY, |a, &x| a.max(f64::from(x)));
                let s1: f64 = z.iter().map(|&x| (f64::from(x) - m).exp()).sum();
                let s2: f64 = z.iter().map(|&x| (2.0 * (f64::from(x) - m)).exp()).sum();
                let lp = f64::from(z[ids[j + 1] as usize]) - m - s1.ln();
                sum += lp - (s2.ln() - 2.0 * s1.ln());
                count += 1;
            }
            (sum / count.max(1) as f64).exp()
        })
        .collect();
    for pack in [false, true] {
        let b = SeqBatch::new(&seqs, 0, 16, pack, &Device::Cpu).unwrap();
        let got = b
            .wpo_weights(&net, Ctx::plain(DType::F32))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (s, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (f64::from(*g) - w).abs() <= 1e-4 * w,
                "pack {pack} seq {s}: {g} vs {w}"
            );
        }
    }
    // A response the policy finds likelier weighs more: the weights are not all one value.
    assert!(
        want.iter().any(|w| (w - want[0]).abs() > 1e-3 * want[0]),
        "{want:?}"
    );
}
