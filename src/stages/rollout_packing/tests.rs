use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::stages::rollout::{layout, response_hidden, response_logprobs, Rollout, Sampled};
use crate::train::params::ParamStore;
use crate::train::rng::Rng;

/// Prompts of 5, 2, 9, 1, 7 and 3 tokens with responses of 3, 0, 6, 6, 1 and 4: an empty
/// response, one as long as the longest and the longest prompt among them.
fn rollout(temperature: f64) -> (Rollout, RolloutDocs) {
    let mut rng = Rng::new(21);
    let mut tokens = |n: usize| -> Vec<u32> { (0..n).map(|_| 1 + rng.below(60) as u32).collect() };
    let prompts: Vec<Vec<u32>> = [5, 2, 9, 1, 7, 3].iter().map(|&n| tokens(n)).collect();
    let responses: Vec<Vec<u32>> = [3, 0, 6, 6, 1, 4].iter().map(|&n| tokens(n)).collect();
    let s = Sampled {
        gen_tokens: responses.clone(),
        texts: vec![String::new(); prompts.len()],
        finished: vec![true; prompts.len()],
        temperature,
    };
    let ro = layout(&prompts, &s, 0, &Device::Cpu).unwrap();
    (ro, RolloutDocs::new(&prompts, &responses, 0).unwrap())
}

fn ctx((tape, recompute_blocks): (bool, bool)) -> Ctx {
    Ctx {
        tape,
        recompute_blocks,
        ..Ctx::plain(DType::F32)
    }
}

/// Masked response log-probabilities and entropies, and every parameter's gradient by name.
type Scored = (Vec<Vec<f32>>, Vec<Vec<f32>>, HashMap<String, Tensor>);

/// The response log-probabilities and entropies of rows `idx`, and the gradient of every
/// parameter for a weighted sum of both over the response tokens.
fn scored(store: &ParamStore, net: &Transformer, ctx: Ctx, ro: &Rollout, idx: &[usize]) -> Scored {
    let (lp, ent) = response_logprobs(net, ctx, ro, idx, true).unwrap();
    let ent = ent.unwrap();
    let i = Tensor::from_vec(
        idx.iter().map(|&i| i as u32).collect(),
        idx.len(),
        &Device::Cpu,
    )
    .unwrap();
    let mask = ro.mask.index_select(&i, 0).unwrap();
    let (b, r) = mask.dims2().unwrap();
    let w: Vec<f32> = (0..b * r).map(|k| ((k * 7) % 5) as f32 - 1.5).collect();
    let w = Tensor::from_vec(w, (b, r), &Device::Cpu).unwrap();
    let loss = ((&lp * &w).unwrap() + (&ent * 0.3).unwrap())
        .unwrap()
        .mul(&mask)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = crate::tape::backward(&loss).unwrap();
    let g = store
        .iter()
        .map(|(n, v, _)| (n.clone(), grads.get(v.as_tensor()).unwrap().clone()))
        .collect();
    let masked = |t: &Tensor| t.mul(&mask).unwrap().to_vec2::<f32>().unwrap();
    (masked(&lp), masked(&ent), g)
}

fn close(a: &[Vec<f32>], b: &[Vec<f32>], what: &str) {
    for (i, (x, y)) in a.iter().flatten().zip(b.iter().flatten()).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * y.abs().max(1.0),
            "{what} [{i}]: {x} vs {y}"
        );
    }
}

/// Packing is only a layout: rows packed into fewer, narrower rows, each attending to itself
/// with positions from 0, give the padded layout's log-probabilities, entropies and every
/// parameter's gradient, for any rows of the rollout in any order, in candle's graph, on the
/// tape and with recomputed blocks; and the states of response slots past a response's end
/// are zeros.
#[test]
fn packed_rollout_rows_score_and_train_as_padded_ones() {
    let (padded, docs) = rollout(0.7);
    let (l, r) = (padded.prompt_cols, padded.resp_len);
    assert_eq!((l, r), (9, 6));
    let packed = Rollout {
        packed: Some(docs.clone()),
        ..rollout(0.7).0
    };
    let all = [4, 0, 2, 5, 1, 3];
    // Documents of 7, 0, 14, 6, 7 and 6 positions in rows of at most the padded 15: 14 | 7 7
    // | 6 6, cut to the fullest, 14.
    let rows = docs.pack(&all, l + r, r, &Device::Cpu).unwrap().unwrap();
    assert_eq!(rows.dims(), (3, 14));
    assert_eq!(docs.computed_share(&all, l + r).unwrap(), 42.0 / 90.0);
    for preset in ["gpt2", "llama-tiny"] {
        let (store, net) = crate::model::test_model(preset, 13);
        for mode in [(false, false), (true, false), (true, true)] {
            for idx in [&all[..], &[2, 1, 3]] {
                let what = format!("{preset} {mode:?} rows {idx:?}");
                let (lp0, ent0, g0) = scored(&store, &net, ctx(mode), &padded, idx);
                let (lp1, ent1, g1) = scored(&store, &net, ctx(mode), &packed, idx);
                close(&lp1, &lp0, &format!("{what}: log-probabilities"));
                close(&ent1, &ent0, &format!("{what}: entropies"));
                for (n, g) in &g0 {
                    let (a, b) = (flat(&g1[n]), flat(g));
                    let scale = b.iter().fold(0f32, |m, y| m.max(y.abs())).max(1e-3);
                    for (x, y) in a.iter().zip(&b) {
                        assert!((x - y).abs() <= 1e-5 * scale, "{what}: {n}: {x} vs {y}");
                    }
                }
            }
        }
        let h = response_hidden(&net, ctx((false, false)), &packed, &all).unwrap();
        let h = h.abs().unwrap().sum(2).unwrap().to_vec2::<f32>().unwrap();
        for (k, &i) in all.iter().enumerate() {
            for (t, &s) in h[k].iter().enumerate() {
                let real = t < padded.lengths[i];
                assert_eq!(s > 0.0, real, "{preset}: row {i} slot {t}: |h| = {s}");
            }
        }
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// A minibatch that packing would not shrink stays padded, as does one with nothing to
/// score; a row past the rollout is refused.
#[test]
fn packing_falls_back_where_it_saves_nothing() {
    let (ro, docs) = rollout(1.0);
    let width = ro.prompt_cols + ro.resp_len;
    // The 14-position document alone packs into a row of 14 where padded rows are 15 wide,
    // not where they are 14; a row with an empty response leaves nothing to pack.
    assert!(docs.pack(&[2], width, 6, &Device::Cpu).unwrap().is_some());
    assert!(docs.pack(&[2], 14, 6, &Device::Cpu).unwrap().is_none());
    assert!(docs.pack(&[1], width, 6, &Device::Cpu).unwrap().is_none());
    // Documents of 14 and 6 positions take a row of 14 each, as padded rows would.
    assert_eq!(docs.computed_share(&[2, 3], 14).unwrap(), 1.0);
    // A row with an empty response takes none.
    assert_eq!(docs.computed_share(&[1, 2], 14).unwrap(), 0.5);
    assert!(docs.pack(&[6], width, 6, &Device::Cpu).is_err());
    assert!(RolloutDocs::new(&[vec![]], &[vec![3]], 0).is_err());
}
