//! The engine against a naive loop, and its savings against themselves switched off.

use candle_core::{Device, Tensor};

use super::*;
use crate::config::ModelConfig;
use crate::generate::{DecodeMode, EngineOpts};
use crate::kernels::sample::argmax;
use crate::train::params::{Net, ParamStore};

fn ctx() -> Ctx {
    Ctx::plain(DType::F32)
}

/// A small random model over the byte vocabulary; `gpt2` picks learned positions, LayerNorm
/// and GELU instead of RoPE, RMSNorm and SwiGLU; `qwen3` adds Qwen3's per-head norms of q and
/// k (large random gains, not the ones they start at) on heads wider than hidden / heads,
/// `gemma3` the same norms with Gemma's gains (`1 + w` from f32 offsets, in every norm);
/// `gemma2` caps the attention scores and the logits (Gemma 2's soft caps, tighter);
/// `smollm3` leaves the rotary positions out of its second layer (NoPE); `window` slides a
/// window of 3 positions over its first layer (the second sees everything), `window-wide` one
/// of 40, longer than any sequence here, over both.
fn net(preset: &str) -> (ParamStore, Transformer) {
    let cfg = config(preset);
    let mut store = ParamStore::new(Device::Cpu, 5);
    let net = Transformer::new(&mut store.scope(Net::Policy), &cfg, None).unwrap();
    let sharpen = cfg.qk_norm
        || !cfg.nope_layers.is_empty()
        || cfg.sliding_window.is_some()
        || cfg.attn_logit_softcapping.is_some();
    if sharpen {
        // Large gains sharpen attention, and matrices at 1 / sqrt(fan-in) let it move the
        // residual stream: a wrong key or query then changes the tokens.
        for (name, var, _) in store.iter() {
            let value = match var.dims() {
                _ if name.ends_with("q_norm.weight") || name.ends_with("k_norm.weight") => {
                    Tensor::randn(0f32, 3.0, var.dims(), &Device::Cpu)
                }
                &[_, fan_in] => {
                    Tensor::randn(0f32, (fan_in as f32).powf(-0.5), var.dims(), &Device::Cpu)
                }
                _ => continue,
            };
            var.set(&value.unwrap()).unwrap();
        }
    }
    (store, net)
}

/// [`net`]'s model configuration for `preset`, at its small sizes.
fn config(preset: &str) -> ModelConfig {
    let mut cfg = match preset {
        "qwen3" => ModelConfig {
            qk_norm: true,
            head_dim: Some(16),
            ..ModelConfig::preset("tiny").unwrap()
        },
        "gemma3" => ModelConfig {
            qk_norm: true,
            norm_plus_one: true,
            head_dim: Some(16),
            ..ModelConfig::preset("tiny").unwrap()
        },
        // Caps that bite at these sizes' scores and logits.
        "gemma2" => ModelConfig {
            attn_logit_softcapping: Some(0.5),
            final_logit_softcapping: Some(2.0),
            ..ModelConfig::preset("tiny").unwrap()
        },
        "smollm3" => ModelConfig {
            nope_layers: vec![1],
            ..ModelConfig::preset("tiny").unwrap()
        },
        "window" => ModelConfig {
            sliding_window: Some(3),
            full_attention_layers: vec![1],
            ..ModelConfig::preset("tiny").unwrap()
        },
        "window-wide" => ModelConfig {
            sliding_window: Some(40),
            ..ModelConfig::preset("tiny").unwrap()
        },
        _ => ModelConfig::preset(preset).unwrap(),
    };
    cfg.vocab_size = Tokenizer::bytes().vocab_size();
    cfg.hidden_size = 32;
    cfg.intermediate_size = 64;
    cfg.num_hidden_layers = 2;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = 2;
    cfg.max_position_embeddings = 48;
    cfg
}

/// Greedy decoding of `max_new_tokens` tokens at `decode`'s shapes.
fn greedy(max_new_tokens: usize, decode: DecodeMode) -> SampleCfg {
    SampleCfg {
        max_new_tokens,
        temperature: 0.0,
        engine: EngineOpts {
            decode,
            ..EngineOpts::default()
        },
        ..Default::default()
    }
}

fn prompts(tok: &Tokenizer, texts: &[&str]) -> Vec<Vec<u32>> {
    texts.iter().map(|t| tok.encode(t).unwrap()).collect()
}

/// Greedy decoding of one prompt with a full forward pass over the whole sequence per token,
/// every token of the sequence so far (prompt and response) penalised by `penalty` first (1:
/// none).
fn naive_greedy(
    net: &Transformer,
    tok: &Tokenizer,
    prompt: &[u32],
    n: usize,
    penalty: f32,
) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let ids = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let f = Fwd {
            ctx: ctx(),
            positions: None,
            key_valid: None,
            segments: None,
        };
        let logits = net.forward(&ids, &f, None).unwrap();
        let last = logits.narrow(1, seq.len() - 1, 1).unwrap();
        let mut row = last.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut seen = vec![0u8; row.len()];
        seq.iter().for_each(|&t| seen[t as usize] = 1);
        crate::kernels::sample::penalize_row(&mut row, &seen, penalty);
        let id = argmax(&row);
        out.push(id);
        seq.push(id);
        if tok.is_stop(id) {
            break;
        }
    }
    out
}

#[test]
fn greedy_equals_a_full_recompute_loop() {
    let tok = Tokenizer::bytes();
    let texts = ["ab", "hello there", "hello there", "q", "xyz!"];
    for (preset, decode) in [
        ("tiny", DecodeMode::Dynamic),
        ("gpt2", DecodeMode::Dynamic),
        ("tiny", DecodeMode::Fixed),
        ("gpt2", DecodeMode::Fixed),
        ("qwen3", DecodeMode::Dynamic),
        ("qwen3", DecodeMode::Fixed),
        ("gemma3", DecodeMode::Dynamic),
        ("gemma3", DecodeMode::Fixed),
        ("gemma2", DecodeMode::Dynamic),
        ("gemma2", DecodeMode::Fixed),
        ("smollm3", DecodeMode::Dynamic),
        ("smollm3", DecodeMode::Fixed),
        ("window", DecodeMode::Dynamic),
        ("window", DecodeMode::Fixed),
        ("window-wide", DecodeMode::Fixed),
    ] {
        let (_s, net) = net(preset);
        let ps = prompts(&tok, &texts);
        let cfg = greedy(12, decode);
        let g = generate(
            &net,
            ctx(),
            &tok,
            &ps,
            &cfg,
            &RowKeys::range(0, 0, ps.len()),
        )
        .unwrap();
        for (i, p) in ps.iter().enumerate() {
            let want = naive_greedy(&net, &tok, p, cfg.max_new_tokens, 1.0);
            assert_eq!(
                g.tokens[i], want,
                "{preset} {decode:?}: prompt {i} {:?}",
                texts[i]
            );
        }
        assert_eq!(
            g.stats.prefill_rows, 4,
            "the repeated prompt is not prefilled twice"
        );
        // Fixed shapes place the query at the cache's end, a window that hides keys (3
        // positions here) included: its sliding layers read a key mask of their own.
        let fixed = decode == DecodeMode::Fixed;
        assert_eq!(g.stats.fixed_steps > 0, fixed, "{preset} {decode:?}");
        assert_eq!(
            g.stats.new_tokens,
            g.tokens.iter().map(Vec::len).sum::<usize>()
        );
    }
}

/// A Gemma-3-shaped model whose store is frozen in bf16 (a distillation teacher's, a LoRA
/// base's) keeps its norms' offsets in bf16: the fixed-shape step's fused q/k norm takes them
/// cast up to f32, and generates what the dynamic-shape steps generate.
#[test]
fn a_frozen_gemma_decodes_in_fixed_shapes() {
    let mut store = ParamStore::new(Device::Cpu, 5);
    store.freeze(
        Net::Policy,
        &[crate::train::params::Role::Base],
        DType::BF16,
    );
    let net = Transformer::new(&mut store.scope(Net::Policy), &config("gemma3"), None).unwrap();
    let tok = Tokenizer::bytes();
    let ps = prompts(&tok, &["ab", "hello there", "xyz!"]);
    let run = |decode| {
        let keys = RowKeys::range(0, 0, ps.len());
        let cfg = greedy(8, decode);
        generate(&net, Ctx::plain(DType::BF16), &tok, &ps, &cfg, &keys).unwrap()
    };
    let (fixed, dynamic) = (run(DecodeMode::Fixed), run(DecodeMode::Dynamic));
    assert!(fixed.stats.fixed_steps > 0);
    assert_eq!(fixed.tokens, dynamic.tokens);
}

/// Sampling that ends rows at different steps: any lowercase letter is a stop string, about
/// one chance in ten per token under a near-uniform random model.
fn sampled(max_new_tokens: usize, engine: EngineOpts) -> SampleCfg {
    SampleCfg {
        max_new_tokens,
        temperature: 1.0,
        top_k: 200,
        top_p: 0.97,
        stop: ('a'..='z').map(String::from).collect(),
        engine,
        ..Default::default()
    }
}

/// The savings, and the fixed-shape decode step (what a CUDA graph replays; on the CPU it
/// runs op by op), against everything switched off.
#[test]
fn compaction_shared_prefill_and_fixed_shapes_leave_the_tokens_unchanged() {
    let tok = Tokenizer::bytes();
    let texts = [
        "G1", "G1", "G1", "G1", "two", "two", "Z", "four!", "four!", "four!",
    ];
    let (_s, net) = net("tiny");
    let ps = prompts(&tok, &texts);
    let keys = RowKeys::range(17, 100, ps.len());
    let mut runs = Vec::new();
    // The third pass also penalises repeats, the fourth filters by min-p as well (0.6: the
    // random model is nearly flat, and 0.3 still kept every token it drew): the seen tokens,
    // marked on the device, follow their rows through compaction, shared prefill and the
    // fixed step.
    let passes = [
        (0.0, 1.0, 0.0),
        (1.0, 1.0, 0.0),
        (1.0, 1.3, 0.0),
        (1.0, 1.3, 0.6),
    ];
    for (temperature, penalty, min_p) in passes {
        for (compact, share_prefill, decode) in [
            (false, false, DecodeMode::Dynamic),
            (true, false, DecodeMode::Dynamic),
            (false, true, DecodeMode::Dynamic),
            (true, true, DecodeMode::Dynamic),
            (false, false, DecodeMode::Fixed),
            (true, true, DecodeMode::Fixed),
        ] {
            let mut cfg = sampled(
                24,
                EngineOpts {
                    compact,
                    share_prefill,
                    decode,
                },
            );
            cfg.temperature = temperature;
            cfg.repetition_penalty = penalty;
            cfg.min_p = min_p;
            let g = generate(&net, ctx(), &tok, &ps, &cfg, &keys).unwrap();
            let prefilled = if share_prefill { 4 } else { ps.len() };
            assert_eq!(g.stats.prefill_rows, prefilled);
            if !compact {
                assert_eq!(g.stats.compactions, 0);
            } else if temperature > 0.0 {
                assert!(g.stats.compactions > 0, "{:?}", g.stats);
            }
            runs.push(((temperature, compact, share_prefill, decode), g));
        }
    }
    for pair in runs.chunks(6) {
        let (base_opts, base) = &pair[0];
        let lengths: Vec<usize> = base.tokens.iter().map(Vec::len).collect();
        assert!(
            lengths.iter().min() < lengths.iter().max(),
            "rows must end at different steps for compaction to matter: {lengths:?}"
        );
        for (opts, g) in &pair[1..] {
            assert_eq!(g.tokens, base.tokens, "{opts:?} vs {base_opts:?}");
            assert_eq!(g.texts, base.texts, "{opts:?}");
            assert_eq!(g.finished, base.finished, "{opts:?}");
        }
    }
    // Members of a group draw their own continuations.
    let (_, sampled_run) = &runs[9];
    let group: Vec<&Vec<u32>> = sampled_run.tokens[..4].iter().collect();
    assert!(group.windows(2).any(|w| w[0] != w[1]), "{group:?}");
    assert_ne!(
        runs[12].1.tokens, sampled_run.tokens,
        "the penalty changed nothing"
    );
    assert_ne!(
        runs[18].1.tokens, runs[12].1.tokens,
        "min-p changed nothing"
    );
}

/// Greedy with a repetition penalty against a full recompute that penalises every token of
/// the sequence so far (prompt and response) before its argmax, in both step shapes; and the
/// penalty changes the responses of a model that repeats itself.
#[test]
fn repetition_penalty_equals_a_full_recompute_loop() {
    let tok = Tokenizer::bytes();
    let (_s, net) = net("tiny");
    let texts = ["ab", "hello there", "hello there", "q", "xyz!"];
    let ps = prompts(&tok, &texts);
    let penalty = 2.5f32;
    for decode in [DecodeMode::Dynamic, DecodeMode::Fixed] {
        let cfg = SampleCfg {
            repetition_penalty: f64::from(penalty),
            ..greedy(16, decode)
        };
        let keys = RowKeys::range(0, 0, ps.len());
        let g = generate(&net, ctx(), &tok, &ps, &cfg, &keys).unwrap();
        for (i, p) in ps.iter().enumerate() {
            let want = naive_greedy(&net, &tok, p, cfg.max_new_tokens, penalty);
            assert_eq!(g.tokens[i], want, "{decode:?}: prompt {i} {:?}", texts[i]);
        }
        let plain = SampleCfg {
            repetition_penalty: 1.0,
            ..cfg
        };
        let p = generate(&net, ctx(), &tok, &ps, &plain, &keys).unwrap();
        assert_ne!(
            p.tokens, g.tokens,
            "{decode:?}: the penalty changed nothing"
        );
        // Unpenalised greedy repeats tokens; under a penalty of 2.5 fewer do.
        let repeats = |g: &Generation| -> usize {
            g.tokens
                .iter()
                .zip(&ps)
                .map(|(t, p)| {
                    let mut seen: std::collections::HashSet<u32> = p.iter().copied().collect();
                    t.iter().filter(|&&id| !seen.insert(id)).count()
                })
                .sum()
        };
        assert!(
            repeats(&g) < repeats(&p),
            "{decode:?}: {} repeats penalised, {} not",
            repeats(&g),
            repeats(&p)
        );
    }
}

#[test]
fn a_rows_tokens_do_not_depend_on_its_batch() {
    let tok = Tokenizer::bytes();
    let texts = ["a1", "bb22", "a1", "c", "dddd4", "e5", "e5", "f"];
    let (_s, net) = net("tiny");
    let ps = prompts(&tok, &texts);
    let cfg = sampled(16, EngineOpts::default());
    let whole = generate(&net, ctx(), &tok, &ps, &cfg, &RowKeys::range(3, 0, 8)).unwrap();
    let front = generate(&net, ctx(), &tok, &ps[..4], &cfg, &RowKeys::range(3, 0, 4)).unwrap();
    let back = generate(&net, ctx(), &tok, &ps[4..], &cfg, &RowKeys::range(3, 4, 4)).unwrap();
    let split: Vec<Vec<u32>> = front.tokens.into_iter().chain(back.tokens).collect();
    assert_eq!(whole.tokens, split);
    // Another seed is another stream.
    let other = generate(&net, ctx(), &tok, &ps, &cfg, &RowKeys::range(4, 0, 8)).unwrap();
    assert_ne!(whole.tokens, other.tokens);
}

/// `min_new_tokens` holds back stop tokens only: every row runs the full length when only
/// stop tokens could end it, and stop strings still end rows early (as Hugging Face's
/// `stop_strings` do under its `min_new_tokens`).
#[test]
fn min_new_tokens_holds_back_stop_tokens_not_stop_strings() {
    let tok = Tokenizer::bytes();
    let (_s, net) = net("tiny");
    let ps = prompts(&tok, &["hi", "there", "a", "b", "c", "d"]);
    let mut cfg = sampled(10, EngineOpts::default());
    cfg.min_new_tokens = 10;
    let strings = cfg.stop.clone();
    cfg.stop.clear();
    let g = generate(&net, ctx(), &tok, &ps, &cfg, &RowKeys::range(0, 0, 6)).unwrap();
    assert!(g.tokens.iter().all(|t| t.len() == 10), "{:?}", g.tokens);
    assert_eq!(g.stats.decode_steps, 9);
    cfg.stop = strings;
    let g = generate(&net, ctx(), &tok, &ps, &cfg, &RowKeys::range(0, 0, 6)).unwrap();
    assert!(g.tokens.iter().any(|t| t.len() < 10), "{:?}", g.tokens);
    for text in &g.texts {
        assert!(!text.contains(|c: char| c.is_ascii_lowercase()), "{text:?}");
    }
}

/// Before `min_new_tokens`, a stop token cannot be drawn; after it, it can. Draws from a
/// nearly flat distribution (a high temperature) over 200 rows make a stop token in the first
/// five draws all but certain without the mask.
#[test]
fn min_new_tokens_masks_stop_tokens_then_lets_them_end() {
    let tok = Tokenizer::bytes();
    let (_s, net) = net("tiny");
    let texts: Vec<String> = (0..200).map(|i| format!("p{i}")).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ps = prompts(&tok, &refs);
    let cfg = SampleCfg {
        max_new_tokens: 12,
        min_new_tokens: 5,
        temperature: 1000.0,
        ..Default::default()
    };
    let g = generate(&net, ctx(), &tok, &ps, &cfg, &RowKeys::range(3, 0, 200)).unwrap();
    // The fixed-shape step holds the stop ids back on the device, by the draw index it keeps
    // there: the same tokens.
    let mut fixed = cfg.clone();
    fixed.engine.decode = DecodeMode::Fixed;
    let f = generate(&net, ctx(), &tok, &ps, &fixed, &RowKeys::range(3, 0, 200)).unwrap();
    assert_eq!(f.tokens, g.tokens);
    for t in &g.tokens {
        assert!(t.len() >= 5, "{t:?}");
        assert!(t[..5].iter().all(|&id| !tok.is_stop(id)), "{t:?}");
    }
    let ended = g.tokens.iter().filter(|t| t.len() < 12).count();
    assert!(ended > 0, "no row drew a stop token after the first five");
}

/// The stop-string check decodes only a response's tail each step: a stop string is still
/// found where it first ends (multi-byte characters and several stop strings included), the
/// text is cut before its first occurrence, and a response without one runs on.
#[test]
fn stop_strings_are_found_from_the_tail() {
    let tok = Tokenizer::bytes();
    let cfg = SampleCfg {
        stop: vec!["END".into(), "é!".into()],
        ..SampleCfg::default()
    };
    let long = "x".repeat(200);
    for (text, ends_at, kept) in [
        (format!("{long}abcENDxyz"), 206, format!("{long}abc")),
        (format!("{long}ééé!tail"), 207, format!("{long}éé")),
        (format!("{long}EN D"), usize::MAX, String::new()),
    ] {
        let ids = tok.encode(&text).unwrap();
        let mut resp = Responses::new(1);
        let mut ended = usize::MAX;
        for (i, &id) in ids.iter().enumerate() {
            resp.push(0, id, &tok, &cfg).unwrap();
            if resp.finished[0] && ended == usize::MAX {
                ended = i + 1;
            }
        }
        assert_eq!(ended, ends_at, "{text}");
        if ended != usize::MAX {
            assert_eq!(resp.texts[0], kept);
            assert_eq!(resp.tokens[0].len(), ends_at, "no tokens after the stop");
        }
    }
}

/// The cache's bytes are its layers' keys and values at every position of every row, and a
/// cache beyond the host's memory is refused before a row is prefilled.
#[test]
fn a_cache_beyond_host_memory_is_refused_before_prefill() {
    let cfg = ModelConfig {
        head_dim: Some(16),
        ..ModelConfig::preset("tiny").unwrap()
    };
    let per_position = 2 * cfg.num_key_value_heads * 16 * 4 * cfg.num_hidden_layers;
    assert_eq!(
        cache_bytes(&cfg, 3, 5, DType::F32),
        15 * per_position as u128
    );
    assert_eq!(
        cache_bytes(&cfg, 3, 5, DType::BF16),
        15 * per_position as u128 / 2
    );
    check_cache_fits(&cfg, 3, 5, DType::F32, &Device::Cpu).unwrap();
    if crate::device::host_available_bytes().is_some() {
        let e = check_cache_fits(&cfg, usize::MAX / 2, 64, DType::F32, &Device::Cpu);
        let e = e.unwrap_err().to_string();
        assert!(
            e.contains("for the KV cache alone") && e.ends_with("generate fewer rows at once"),
            "{e}"
        );
    }
}

/// Inside generation's frozen scope a forward builds no graph: were any weight read tracked,
/// every activation computed from it would hold its inputs, and a prefill would keep all of
/// its activations alive until its logits were dropped (800 KB a row on the tiny model, where
/// the cache holds 45). Outside the scope the same forward is tracked, for training.
#[test]
fn generation_builds_no_graph_from_the_weights() {
    for preset in ["tiny", "gpt2", "qwen3", "gemma3"] {
        let (_store, net) = net(preset);
        let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
        let f = Fwd {
            ctx: ctx(),
            positions: None,
            key_valid: None,
            segments: None,
        };
        assert!(net.forward(&ids, &f, None).unwrap().track_op(), "{preset}");
        let _frozen = FrozenWeights::enter();
        for pass in ["first", "cached"] {
            let logits = net.forward(&ids, &f, None).unwrap();
            assert!(!logits.track_op(), "{preset}, {pass} pass");
        }
    }
}
