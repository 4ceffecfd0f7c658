//! `config.json` as each family writes it, for `export --format hf`.

use super::rope::scaling_json;
use super::{Family, Head};
use crate::config::ModelConfig;

/// `config.json` for `cfg` as `family` writes it with `head` on top, with the tokenizer's
/// stop, BOS and padding ids. The padding id is written only where it is needed: for SmolLM3,
/// whose config otherwise defaults it to an id of its own vocabulary, which a smaller one does
/// not hold, and for a classifier, which transformers scores at each sequence's last token
/// that is not it (an imported one keeps its own, `ModelConfig::score_pad`).
pub fn config_json(
    family: Family,
    head: Head,
    cfg: &ModelConfig,
    eos: &[u32],
    bos: Option<u32>,
    pad: u32,
) -> serde_json::Value {
    use serde_json::json;
    let eos_v = match eos {
        [one] => json!(one),
        many => json!(many),
    };
    // Elsewhere a padding id would freeze that row of the embedding in PyTorch's training
    // (nn.Embedding's padding_idx); none where the tokenizer pads with a stop token, whose
    // row must train and which ends the sequences temper scores (transformers would then read
    // a classifier one token earlier than temper does).
    let pad_v = match eos.contains(&pad) {
        true => serde_json::Value::Null,
        false => json!(pad),
    };
    let arch = head.architecture(family);
    let mut v = match family {
        Family::Gpt2 => json!({
            "architectures": [arch],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.hidden_size,
            "n_layer": cfg.num_hidden_layers,
            "n_head": cfg.num_attention_heads,
            "n_inner": cfg.intermediate_size,
            "n_positions": cfg.max_position_embeddings,
            "layer_norm_epsilon": cfg.rms_norm_eps,
            "activation_function": "gelu_new",
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "tie_word_embeddings": true,
            "bos_token_id": bos,
            "eos_token_id": eos_v,
            "torch_dtype": "float32",
        }),
        _ => {
            let ty = family.name();
            let scaling = cfg.rope_scaling.as_ref().map(scaling_json);
            let mut v = json!({
                "architectures": [arch],
                "model_type": ty,
                "vocab_size": cfg.vocab_size,
                "hidden_size": cfg.hidden_size,
                "intermediate_size": cfg.intermediate_size,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_attention_heads": cfg.num_attention_heads,
                "num_key_value_heads": cfg.num_key_value_heads,
                "head_dim": cfg.head_dim(),
                "max_position_embeddings": cfg.max_position_embeddings,
                "rms_norm_eps": cfg.rms_norm_eps,
                "rope_theta": cfg.rope_theta,
                "rope_scaling": scaling,
                "tie_word_embeddings": cfg.tie_word_embeddings,
                "hidden_act": "silu",
                "attention_bias": false,
                "bos_token_id": bos,
                "eos_token_id": eos_v,
                "torch_dtype": "float32",
            });
            let types: Vec<&str> = (0..cfg.num_hidden_layers)
                .map(|l| match cfg.layer_window(l) {
                    Some(_) => "sliding_attention",
                    None => "full_attention",
                })
                .collect();
            if matches!(family, Family::Qwen2 | Family::Qwen3 | Family::SmolLm3) {
                v["use_sliding_window"] = json!(cfg.sliding_window.is_some());
                v["sliding_window"] = json!(cfg.sliding_window);
                v["layer_types"] = json!(types);
                if family != Family::SmolLm3 {
                    // Older transformers read only this: the layers below it see everything.
                    let leading = (0..cfg.num_hidden_layers)
                        .take_while(|&l| cfg.layer_window(l).is_none())
                        .count();
                    v["max_window_layers"] = json!(leading);
                }
            }
            if family == Family::SmolLm3 {
                let flags: Vec<u8> = (0..cfg.num_hidden_layers)
                    .map(|l| u8::from(!cfg.nope_layers.contains(&l)))
                    .collect();
                v["no_rope_layers"] = json!(flags);
                v["mlp_bias"] = json!(false);
                v["pad_token_id"] = pad_v.clone();
            }
            if family == Family::Mistral {
                // Every layer of a Mistral slides (`HfFamily::of` exports no other).
                v["sliding_window"] = json!(cfg.sliding_window);
            }
            if matches!(family, Family::Gemma2 | Family::Gemma3) {
                gemma_fields(family, &mut v, cfg, pad_v.clone());
            }
            v
        }
    };
    if head == Head::Score {
        v["id2label"] = json!({"0": "LABEL_0"});
        v["label2id"] = json!({"LABEL_0": 0});
        v["pad_token_id"] = cfg.score_pad.map_or(pad_v, |p| json!(p));
    }
    v
}

/// Gemma's own fields over the llama-like ones of `v`. Gemma 3's layers' kinds come from its
/// second rotary base (`HfFamily::of` exports no model whose window says otherwise), Gemma
/// 2's from its window; Gemma 3's bases and its full layers' scaling go both where
/// transformers 5 reads them and where earlier versions did (`rope_theta`,
/// `rope_local_base_freq`, `rope_scaling`). Their configs default the padding id to 0, so
/// `pad` is always written.
fn gemma_fields(
    family: Family,
    v: &mut serde_json::Value,
    cfg: &ModelConfig,
    pad: serde_json::Value,
) {
    use serde_json::json;
    let gemma3 = family == Family::Gemma3;
    let layers = cfg.num_hidden_layers;
    let slides = |l: usize| match gemma3 {
        true => cfg.rotates_locally(l),
        false => cfg.layer_window(l).is_some(),
    };
    let types: Vec<&str> = (0..layers)
        .map(|l| match slides(l) {
            true => "sliding_attention",
            false => "full_attention",
        })
        .collect();
    let obj = v.as_object_mut().expect("a JSON object");
    obj.remove("hidden_act");
    for (k, x) in [
        ("hidden_activation", json!("gelu_pytorch_tanh")),
        // transformers wants both, as integers, even where no layer slides.
        (
            "query_pre_attn_scalar",
            json!(cfg.query_pre_attn_scalar.unwrap_or(cfg.head_dim())),
        ),
        (
            "sliding_window",
            json!(cfg.sliding_window.unwrap_or(cfg.max_position_embeddings)),
        ),
        ("layer_types", json!(types)),
        (
            "final_logit_softcapping",
            json!(cfg.final_logit_softcapping),
        ),
        ("attn_logit_softcapping", json!(cfg.attn_logit_softcapping)),
        ("pad_token_id", pad),
    ] {
        obj.insert(k.into(), x);
    }
    if !gemma3 {
        return;
    }
    let local_theta = cfg.rope_local.as_ref().map_or(cfg.rope_theta, |r| r.theta);
    let mut full = json!({"rope_type": "default"});
    if let Some(s) = &cfg.rope_scaling {
        full = scaling_json(s);
    }
    full["rope_theta"] = json!(cfg.rope_theta);
    obj.insert("rope_local_base_freq".into(), json!(local_theta));
    obj.insert(
        "rope_parameters".into(),
        json!({
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
        }),
    );
    obj.insert("use_bidirectional_attention".into(), json!(false));
    // For transformers from before `layer_types`, which read only this (6 where absent):
    // written where the layers keep to one.
    let every = (0..layers)
        .find(|&l| !slides(l))
        .map_or(layers + 1, |l| l + 1);
    if (0..layers).all(|l| slides(l) != (l + 1).is_multiple_of(every)) {
        obj.insert("sliding_window_pattern".into(), json!(every));
    }
}
