//! Tests of reading and writing Hugging Face directories.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::import::classifier_pad;
use super::names::{hf_shapes, temper_shapes, to_temper};
use super::peft::peft_to_temper;
use super::*;
use crate::config::{LinearScaling, MlpKind, ModelConfig, RopeScaling};

fn smollm3(extra: serde_json::Value) -> Result<ModelConfig> {
    let mut v = serde_json::json!({
        "model_type": "smollm3", "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 8, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64,
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    let cfg: HfConfig = serde_json::from_value(v).unwrap();
    cfg.to_model(Path::new("m/config.json")).map(|(_, c)| c)
}

fn family_config(model_type: &str, extra: serde_json::Value) -> Result<ModelConfig> {
    let mut e = extra;
    e["model_type"] = model_type.into();
    smollm3(e)
}

/// What GPT-2's config asks for that temper's GPT-2 does not compute is refused by field
/// (an untied head would otherwise be dropped, unscaled scores silently scaled); the
/// values transformers defaults to read.
#[test]
fn gpt2_configs_temper_cannot_compute_are_refused_by_field() {
    let gpt2 = |extra: serde_json::Value| {
        let mut v = serde_json::json!({
            "model_type": "gpt2", "vocab_size": 64, "n_embd": 32, "n_layer": 2,
            "n_head": 4, "n_positions": 64,
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        let cfg: HfConfig = serde_json::from_value(v).unwrap();
        cfg.to_model(Path::new("m/config.json")).map(|(_, c)| c)
    };
    let fine = serde_json::json!({"tie_word_embeddings": true, "scale_attn_weights": true,
        "scale_attn_by_inverse_layer_idx": false, "activation_function": "gelu_new"});
    assert!(gpt2(fine).unwrap().tie_word_embeddings);
    let fast = serde_json::json!({"activation_function": "gelu_fast"});
    assert!(gpt2(fast).is_ok());
    let packed = serde_json::json!({"quantization_config": {"quant_method": "gptq"}});
    let e = gpt2(packed).unwrap_err().to_string();
    assert!(
        e.contains("field \"quantization_config\": a gptq-quantized checkpoint"),
        "{e}"
    );
    assert!(gpt2(serde_json::json!({})).unwrap().tie_word_embeddings);
    for (extra, field) in [
        (
            serde_json::json!({"tie_word_embeddings": false}),
            "tie_word_embeddings",
        ),
        (
            serde_json::json!({"scale_attn_weights": false}),
            "scale_attn_weights",
        ),
        (
            serde_json::json!({"scale_attn_by_inverse_layer_idx": true}),
            "scale_attn_by_inverse_layer_idx",
        ),
        (
            serde_json::json!({"activation_function": "relu"}),
            "activation_function",
        ),
    ] {
        let e = gpt2(extra).unwrap_err().to_string();
        assert!(
            e.contains("m/config.json") && e.contains(&format!("\"{field}\"")),
            "{e}"
        );
    }
}

/// Qwen3Config's head_dim is 128 where config.json leaves it out (other families derive
/// it from hidden_size / heads), and `swish` is transformers' other name for silu.
#[test]
fn qwen3s_default_head_dim_and_swish_read_as_transformers_reads_them() {
    let qwen3 = family_config("qwen3", serde_json::json!({})).unwrap();
    assert_eq!((qwen3.head_dim, qwen3.head_dim()), (Some(128), 128));
    let given = family_config("qwen3", serde_json::json!({"head_dim": 16})).unwrap();
    assert_eq!(given.head_dim(), 16);
    let llama = family_config("llama", serde_json::json!({})).unwrap();
    assert_eq!(llama.head_dim(), 8);
    let swish = family_config("llama", serde_json::json!({"hidden_act": "swish"})).unwrap();
    assert_eq!((swish.mlp, &swish), (MlpKind::SwiGlu, &llama));
    let e = family_config("llama", serde_json::json!({"hidden_act": "gelu"})).unwrap_err();
    assert!(e.to_string().contains("hidden_act"), "{e}");
}

/// What each family's config class defaults a field to where config.json leaves it out
/// (transformers 5.25's AutoConfig gives these): the key-value heads (as many as the
/// query heads where null), SmolLM3's tied head and rotary base.
#[test]
fn absent_fields_take_each_config_classs_default() {
    let kv = |family: &str, given: Option<serde_json::Value>| {
        let mut v = serde_json::json!({
            "model_type": family, "vocab_size": 64, "hidden_size": 64,
            "intermediate_size": 64, "num_hidden_layers": 8, "num_attention_heads": 32,
            "max_position_embeddings": 64, "head_dim": 2,
        });
        if let Some(g) = given {
            v["num_key_value_heads"] = g;
        }
        let cfg: HfConfig = serde_json::from_value(v).unwrap();
        cfg.to_model(Path::new("m/config.json"))
            .unwrap()
            .1
            .num_key_value_heads
    };
    for (family, absent) in [
        ("llama", 32),
        ("mistral", 8),
        ("qwen2", 32),
        ("qwen3", 32),
        ("smollm3", 4),
        ("gemma2", 4),
        ("gemma3_text", 4),
    ] {
        assert_eq!(kv(family, None), absent, "{family}: absent");
        // Mistral's and Gemma's classes refuse a null.
        if !matches!(family, "mistral" | "gemma2" | "gemma3_text") {
            let null = kv(family, Some(serde_json::Value::Null));
            assert_eq!(null, 32, "{family}: null");
        }
        assert_eq!(kv(family, Some(2.into())), 2, "{family}: given");
    }
    let bare = serde_json::json!({});
    let smol = family_config("smollm3", bare.clone()).unwrap();
    assert!(smol.tie_word_embeddings, "SmolLM3Config ties its head");
    assert_eq!(
        smol.rope_theta, 2_000_000.0,
        "SmolLM3Config's default_theta"
    );
    for family in ["llama", "mistral", "qwen2", "qwen3"] {
        let cfg = family_config(family, bare.clone()).unwrap();
        assert!(!cfg.tie_word_embeddings, "{family}");
        assert_eq!(
            (cfg.rope_theta, cfg.rms_norm_eps),
            (10000.0, 1e-6),
            "{family}"
        );
    }
    let untied = serde_json::json!({"tie_word_embeddings": false, "rope_theta": 5e4});
    let smol = family_config("smollm3", untied).unwrap();
    assert_eq!((smol.tie_word_embeddings, smol.rope_theta), (false, 5e4));
    // transformers reads the first flag of each layer, so a longer list reads.
    let longer = serde_json::json!({"no_rope_layers": [1, 1, 0, 1, 1, 1, 0, 1, 0, 0]});
    assert_eq!(smollm3(longer).unwrap().nope_layers, [2, 6]);
}

/// Rotary settings as transformers 5.25 reads them: a `rope_scaling` that says anything
/// replaces `rope_parameters` (its base with it), the type defaults to `default`, Llama 3's
/// scaling counts from the context where it names no original length; rotary positions
/// on part of each head are refused by field.
#[test]
fn rotary_settings_read_as_transformers_reads_them() {
    let cfg = family_config(
        "llama",
        serde_json::json!({"rope_scaling": {"rope_type": "linear", "factor": 2.0},
            "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}, "rope_theta": 5.0}),
    )
    .unwrap();
    let linear = Some(RopeScaling::Linear(LinearScaling { factor: 2.0 }));
    assert_eq!((cfg.rope_theta, &cfg.rope_scaling), (5.0, &linear));
    let empty = serde_json::json!({"rope_scaling": {},
        "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 7.0}});
    let cfg = family_config("qwen2", empty).unwrap();
    assert_eq!((cfg.rope_theta, &cfg.rope_scaling), (7.0, &linear));
    let untyped = serde_json::json!({"rope_parameters": {"rope_theta": 5e5}});
    let cfg = family_config("mistral", untyped).unwrap();
    assert_eq!((cfg.rope_theta, &cfg.rope_scaling), (5e5, &None));
    let llama3 = serde_json::json!({"rope_parameters": {"rope_type": "llama3",
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_theta": 5e5}});
    match family_config("llama", llama3).unwrap().rope_scaling {
        Some(RopeScaling::Llama3(s)) => assert_eq!(s.original_max_position_embeddings, 64),
        other => panic!("{other:?}"),
    }
    let whole = serde_json::json!({"partial_rotary_factor": 1.0});
    assert!(family_config("llama", whole).is_ok());
    for (extra, field) in [
        (
            serde_json::json!({"partial_rotary_factor": 0.5}),
            "\"partial_rotary_factor\"",
        ),
        (
            serde_json::json!({"rope_parameters": {"rope_type": "default",
                "rope_theta": 1e4, "partial_rotary_factor": 0.5}}),
            "\"rope_parameters\"",
        ),
        (
            serde_json::json!({"rope_scaling": {"rope_type": "linear", "factor": 2.0,
                "partial_rotary_factor": 0.25}}),
            "\"rope_scaling\"",
        ),
    ] {
        let e = family_config("qwen3", extra).unwrap_err().to_string();
        assert!(
            e.contains("m/config.json") && e.contains(field) && e.contains("part of each"),
            "{e}"
        );
    }
    let per_kind = serde_json::json!({"rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6}}});
    let e = family_config("qwen2", per_kind).unwrap_err().to_string();
    assert!(
        e.contains("\"rope_parameters\"") && e.contains("Gemma 3 only"),
        "{e}"
    );
}

/// The tensors the import expects, by name and shape, are those the model creates, and
/// under Hugging Face's names (GPT-2's fused and transposed) they convert back to them.
#[test]
fn expected_tensors_are_what_the_model_creates() {
    use crate::train::params::{Net, ParamStore};
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");
    let sorted = |mut v: Vec<(String, Vec<usize>)>| {
        v.sort();
        v
    };
    for fam in [
        "llama",
        "qwen2",
        "qwen3",
        "mistral",
        "smollm3",
        "gemma2",
        "gemma3",
        "gemma3_mm",
        "gpt2",
        "llama_rm",
    ] {
        let path = fixtures.join(fam).join("config.json");
        let hf = HfConfig::read(&path).unwrap();
        let head = hf.head(&path).unwrap();
        let (family, mut cfg) = hf.to_model(&path).unwrap();
        if head == Head::Score {
            cfg.tie_word_embeddings = true;
        }
        let mut store = ParamStore::new(Device::Cpu, 0);
        crate::model::Transformer::new(&mut store.scope(Net::Policy), &cfg, None).unwrap();
        let made: Vec<(String, Vec<usize>)> = store
            .net(Net::Policy)
            .map(|(n, v, _)| (n.to_string(), v.dims().to_vec()))
            .collect();
        let ours = sorted(temper_shapes(&cfg));
        assert_eq!(sorted(made), ours, "{fam}");
        let mut back = Vec::new();
        for (name, shape) in hf_shapes(family, head, &cfg).unwrap() {
            let t = Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
            let parts = match name.as_str() {
                "score.weight" => vec![score_to_temper(&name, &t, cfg.hidden_size).unwrap()],
                _ => to_temper(family, &name, &t, &cfg).unwrap(),
            };
            back.extend(parts.into_iter().map(|(n, t)| (n, t.dims().to_vec())));
        }
        let mut want = ours;
        if head == Head::Score {
            want.push(("score.weight".into(), vec![cfg.hidden_size]));
        }
        assert_eq!(sorted(back), sorted(want), "{fam}");
    }
}

/// Sliding windows as transformers assigns them to layers, and back through the export.
#[test]
fn sliding_windows_come_from_each_familys_fields_and_export_back() {
    let w = |c: &ModelConfig| (c.sliding_window, c.full_attention_layers.clone());
    let none = (None, vec![]);
    let mistral = family_config("mistral", serde_json::json!({"sliding_window": 16})).unwrap();
    assert_eq!(w(&mistral), (Some(16), vec![]));
    // A window as long as the context hides nothing.
    let long = serde_json::json!({"sliding_window": 64});
    assert_eq!(w(&family_config("mistral", long).unwrap()), none);
    // Llama has no window: transformers ignores the field, and so does temper.
    let llama = serde_json::json!({"sliding_window": 16});
    assert_eq!(w(&family_config("llama", llama).unwrap()), none);
    // Qwen: only with use_sliding_window, from max_window_layers on (28 by default).
    let off = serde_json::json!({"sliding_window": 16, "max_window_layers": 3});
    assert_eq!(w(&family_config("qwen2", off).unwrap()), none);
    let on = serde_json::json!({
        "sliding_window": 16, "use_sliding_window": true, "max_window_layers": 3
    });
    let qwen2 = family_config("qwen2", on).unwrap();
    assert_eq!(w(&qwen2), (Some(16), vec![0, 1, 2]));
    let deep = serde_json::json!({"sliding_window": 16, "use_sliding_window": true});
    assert_eq!(w(&family_config("qwen3", deep).unwrap()), none);
    // Without use_sliding_window nothing slides, whatever layer_types says.
    let unused = serde_json::json!({
        "sliding_window": 16, "max_window_layers": 7,
        "layer_types": ["full_attention", "full_attention", "full_attention",
                        "full_attention", "full_attention", "full_attention",
                        "full_attention", "sliding_attention"]
    });
    assert_eq!(w(&family_config("qwen2", unused).unwrap()), none);
    // layer_types, where given, says which layers slide.
    let types = serde_json::json!({
        "sliding_window": 16, "use_sliding_window": true,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention",
                        "sliding_attention", "full_attention", "sliding_attention",
                        "sliding_attention", "sliding_attention"]
    });
    let qwen3 = family_config("qwen3", types).unwrap();
    assert_eq!(w(&qwen3), (Some(16), vec![1, 4]));
    // SmolLM3 without layer_types slides its NoPE layers, as transformers fills them in.
    let smol = serde_json::json!({"sliding_window": 16, "use_sliding_window": true});
    let smol = smollm3(smol).unwrap();
    assert_eq!(w(&smol), (Some(16), vec![0, 1, 2, 4, 5, 6]));
    // An absent window is transformers' default of 4096 (null is none); Mistral slides
    // every layer whatever layer_types says, as transformers' Mistral does.
    let long_ctx = serde_json::json!({
        "max_position_embeddings": 8192,
        "layer_types": ["full_attention", "chunked_attention", "full_attention",
                        "full_attention", "full_attention", "full_attention",
                        "full_attention", "full_attention"]
    });
    let deflt = family_config("mistral", long_ctx.clone()).unwrap();
    assert_eq!(w(&deflt), (Some(4096), vec![]));
    let mut null = long_ctx;
    null["sliding_window"] = serde_json::Value::Null;
    assert_eq!(w(&family_config("mistral", null).unwrap()), none);
    for (family, bad, why) in [
        (
            "qwen2",
            serde_json::json!({"layer_types": ["full_attention"]}),
            "1 entries for 8",
        ),
        (
            "mistral",
            serde_json::json!({"sliding_window": 0}),
            "at least 1",
        ),
        (
            "smollm3",
            serde_json::json!({
                "sliding_window": 16,
                "layer_types": ["sliding_attention", "full_attention", "full_attention",
                                "full_attention", "full_attention", "full_attention",
                                "full_attention", "full_attention"]
            }),
            "ambiguous",
        ),
    ] {
        let e = family_config(family, bad).unwrap_err().to_string();
        assert!(
            e.contains("m/config.json") && e.contains(why),
            "{family}: {e}"
        );
    }
    // What the export writes reads back as the same windows.
    for (family, cfg) in [
        (Family::Mistral, &mistral),
        (Family::Qwen2, &qwen2),
        (Family::Qwen3, &qwen3),
        (Family::SmolLm3, &smol),
    ] {
        let v = config_json(family, Head::Lm, cfg, &[2], Some(1), 0);
        let again: HfConfig = serde_json::from_value(v).unwrap();
        let (_, back) = again.to_model(Path::new("x/config.json")).unwrap();
        assert_eq!(w(&back), w(cfg), "{family:?}");
    }
}

/// SmolLM3's NoPE layers from its flags, or where they are absent from the interval as
/// transformers fills them in; a model with NoPE layers exports as SmolLM3.
#[test]
fn smollm3_nope_layers_come_from_the_flags_or_the_interval() {
    let flags = serde_json::json!({"no_rope_layers": [1, 1, 0, 1, 1, 1, 0, 0]});
    assert_eq!(smollm3(flags).unwrap().nope_layers, [2, 6, 7]);
    assert_eq!(smollm3(serde_json::json!({})).unwrap().nope_layers, [3, 7]);
    let every = serde_json::json!({"no_rope_layer_interval": 3});
    let cfg = smollm3(every).unwrap();
    assert_eq!(cfg.nope_layers, [2, 5]);
    assert_eq!(
        Family::of(&ModelConfig {
            hf_family: None,
            ..cfg
        }),
        Some(Family::SmolLm3)
    );
    let bad = smollm3(serde_json::json!({"no_rope_layers": [1, 2, 1, 1, 1, 1, 1, 1]}));
    let e = bad.unwrap_err().to_string();
    assert!(
        e.contains("m/config.json") && e.contains("no_rope_layers"),
        "{e}"
    );
    let e = smollm3(serde_json::json!({"no_rope_layer_interval": 0}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no_rope_layer_interval"), "{e}");
    // Older configs write -1 for no padding id.
    assert!(smollm3(serde_json::json!({"pad_token_id": -1})).is_ok());
}

/// A classifier's padding id where its config names none is its config class's default,
/// as transformers 5.24 gives it; null and -1 name none.
#[test]
fn a_classifier_pads_with_its_config_classs_default() {
    let cases = [
        (Family::SmolLm3, None, Some(128004)),
        (Family::Gemma3, None, Some(0)),
        (Family::Gemma2, None, Some(0)),
        (Family::Llama, None, None),
        (Family::Qwen2, None, None),
        (Family::SmolLm3, Some(None), None),
        (Family::Gemma3, Some(None), None),
        (Family::SmolLm3, Some(Some(-1)), None),
        (Family::Llama, Some(Some(2)), Some(2)),
    ];
    for (family, given, want) in cases {
        assert_eq!(classifier_pad(family, given), want, "{family:?} {given:?}");
    }
}

/// Gemma 3's configs as the hub holds them (written before transformers 5: the bases as
/// `rope_theta` and `rope_local_base_freq`, the layers by `sliding_window_pattern`) and as
/// transformers 5 writes them (`rope_parameters` per layer kind, `layer_types`) read the
/// same, and the export writes back what reads the same again; what temper does not
/// implement is refused by field.
#[test]
fn gemma3_configs_of_either_age_read_alike_and_export_back() {
    let old = family_config(
        "gemma3_text",
        serde_json::json!({"sliding_window": 4, "sliding_window_pattern": 3,
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": null,
            "query_pre_attn_scalar": 12, "final_logit_softcapping": null,
            "attn_logit_softcapping": null, "hidden_activation": "gelu_pytorch_tanh"}),
    )
    .unwrap();
    let (s, f) = ("sliding_attention", "full_attention");
    let new = family_config(
        "gemma3_text",
        serde_json::json!({"sliding_window": 4, "query_pre_attn_scalar": 12.0,
            "layer_types": [s, s, f, s, s, f, s, s],
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
    )
    .unwrap();
    assert_eq!(old, new);
    let local = new.rope_local.clone().unwrap();
    assert_eq!(
        (local.theta, local.layers),
        (10000.0, vec![0, 1, 3, 4, 6, 7])
    );
    assert_eq!(
        (new.rope_theta, &new.full_attention_layers[..]),
        (1e6, &[2, 5][..])
    );
    assert_eq!(new.sliding_window, Some(4));
    assert!(new.norm_plus_one && new.post_norms && new.embed_scale && new.qk_norm);
    assert_eq!(
        (new.mlp, new.head_dim, new.query_pre_attn_scalar),
        (MlpKind::GeGlu, Some(256), Some(12))
    );
    assert!(
        new.tie_word_embeddings,
        "Gemma 3 ties its head unless told not to"
    );
    // A model of temper's own with Gemma's layout exports as Gemma 3; one whose window
    // and second base disagree on a layer exports as nothing.
    let own = ModelConfig {
        hf_family: None,
        ..new.clone()
    };
    assert_eq!(Family::of(&own), Some(Family::Gemma3));
    let split = ModelConfig {
        full_attention_layers: vec![2],
        ..own.clone()
    };
    assert_eq!(Family::of(&split), None);
    let v = config_json(Family::Gemma3, Head::Lm, &new, &[1], Some(2), 0);
    assert_eq!(v["architectures"][0], "Gemma3ForCausalLM");
    assert_eq!(v["pad_token_id"], 0);
    assert_eq!(
        v["sliding_window_pattern"], 3,
        "for transformers before layer_types"
    );
    assert!(v.get("hidden_act").is_none());
    let back: HfConfig = serde_json::from_value(v).unwrap();
    assert_eq!(back.to_model(Path::new("x")).unwrap().1, new);
    // transformers types the layers even without a window: the bases still differ.
    let unwindowed =
        family_config("gemma3_text", serde_json::json!({"sliding_window": null})).unwrap();
    assert_eq!(unwindowed.sliding_window, None);
    assert_eq!(unwindowed.rope_local.unwrap().layers, [0, 1, 2, 3, 4, 6, 7]);
    for (extra, field) in [
        (
            serde_json::json!({"use_bidirectional_attention": true}),
            "use_bidirectional_attention",
        ),
        (
            serde_json::json!({"hidden_activation": "gelu"}),
            "hidden_activation",
        ),
        (
            serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}),
            "rope_scaling",
        ),
        (
            serde_json::json!({"rope_parameters": {"sliding_attention":
                {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e4}}}),
            "rope_parameters",
        ),
        (
            serde_json::json!({"layer_types": ["chunked_attention"]}),
            "layer_types",
        ),
    ] {
        let e = family_config("gemma3_text", extra).unwrap_err().to_string();
        assert!(e.contains("m/config.json") && e.contains(field), "{e}");
    }
    // The full layers' linear scaling (Gemma 3 from 4B up) is read, in either place.
    let linear = Some(RopeScaling::Linear(LinearScaling { factor: 8.0 }));
    for extra in [
        serde_json::json!({"rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
        serde_json::json!({"rope_parameters": {"full_attention":
            {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}}),
        // rope_scaling's keys laid over the full layers' (transformers' dict update).
        serde_json::json!({"rope_scaling": {}, "rope_parameters": {"full_attention":
            {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}}),
        serde_json::json!({"rope_scaling": {"factor": 8.0}, "rope_parameters":
            {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}}),
    ] {
        let cfg = family_config("gemma3_text", extra).unwrap();
        assert_eq!(cfg.rope_scaling, linear);
        assert_eq!(Family::of(&cfg), Some(Family::Gemma3));
    }
    // transformers wants an integer window and scale even where the model has neither.
    let bare = ModelConfig {
        sliding_window: None,
        full_attention_layers: Vec::new(),
        query_pre_attn_scalar: None,
        ..own
    };
    let v = config_json(Family::Gemma3, Head::Lm, &bare, &[1], Some(2), 0);
    let (window, scale) = (&v["sliding_window"], &v["query_pre_attn_scalar"]);
    assert_eq!((window, scale), (&64.into(), &256.into()));
    // An image-and-text model is read as its language model, which it must hold.
    let dir = std::env::temp_dir().join(format!("temper-gemma3-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.json");
    std::fs::write(&path, r#"{"model_type": "gemma3", "vision_config": {}}"#).unwrap();
    let e = HfConfig::read(&path).unwrap_err().to_string();
    assert!(
        e.contains("config.json") && e.contains("text_config"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Gemma 2's layers alternate from a sliding first one, its caps are 50 and 30 where
/// absent and none where null, and its export reads back the same.
#[test]
fn gemma2_caps_and_layers_read_as_transformers_and_export_back() {
    let g = family_config("gemma2", serde_json::json!({"sliding_window": 4})).unwrap();
    assert_eq!(
        (g.attn_logit_softcapping, g.final_logit_softcapping),
        (Some(50.0), Some(30.0))
    );
    assert_eq!(
        (g.sliding_window, &g.full_attention_layers[..]),
        (Some(4), &[1, 3, 5, 7][..])
    );
    assert!(g.rope_local.is_none() && !g.qk_norm && g.post_norms && g.norm_plus_one);
    assert_eq!((g.vocab_size, g.rope_theta), (64, 10000.0));
    assert_eq!(
        Family::of(&ModelConfig {
            hf_family: None,
            ..g.clone()
        }),
        Some(Family::Gemma2)
    );
    let v = config_json(Family::Gemma2, Head::Lm, &g, &[1], Some(2), 0);
    assert_eq!(v["architectures"][0], "Gemma2ForCausalLM");
    assert!(v.get("rope_parameters").is_none() && v.get("sliding_window_pattern").is_none());
    let back: HfConfig = serde_json::from_value(v).unwrap();
    assert_eq!(back.to_model(Path::new("x")).unwrap().1, g);
    let uncapped = family_config(
        "gemma2",
        serde_json::json!({"attn_logit_softcapping": null, "final_logit_softcapping": null}),
    )
    .unwrap();
    assert_eq!(
        (
            uncapped.attn_logit_softcapping,
            uncapped.final_logit_softcapping
        ),
        (None, None)
    );
    // Gemma 3 ignores a cap on the scores, as transformers does, and keeps one on the logits.
    let g3 = family_config(
        "gemma3_text",
        serde_json::json!({"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    )
    .unwrap();
    assert_eq!(
        (g3.attn_logit_softcapping, g3.final_logit_softcapping),
        (None, Some(30.0))
    );
}

/// What `Gemma3ForConditionalGeneration`'s class reads from the top level of its config
/// (the labels of a reward model, whether the head is tied) wins over its text_config, and
/// it caps no logits.
#[test]
fn gemma3s_image_and_text_config_reads_its_top_level_fields() {
    let dir = std::env::temp_dir().join(format!("temper-gemma3-top-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.json");
    let text = serde_json::json!({"model_type": "gemma3_text", "tie_word_embeddings": true,
        "final_logit_softcapping": 30.0,
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16});
    let top = serde_json::json!({"model_type": "gemma3", "tie_word_embeddings": false,
        "architectures": ["Gemma3ForSequenceClassification"], "id2label": {"0": "LABEL_0"},
        "text_config": text});
    std::fs::write(&path, top.to_string()).unwrap();
    let cfg = HfConfig::read(&path).unwrap();
    assert_eq!(cfg.head(&path).unwrap(), Head::Score);
    let model = cfg.to_model(&path).unwrap().1;
    // Its class caps no logits, whatever the text_config says.
    assert!(!model.tie_word_embeddings && model.final_logit_softcapping.is_none());
    std::fs::remove_dir_all(&dir).unwrap();
    // Its adapters' names: transformers 5's and 4.5x's, and none on the vision tower.
    for name in [
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight",
    ] {
        let t = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let mapped = peft_to_temper(name, &t).unwrap();
        assert_eq!(mapped[0].0, "model.layers.0.attn.q.lora_a");
        assert_eq!(mapped.len(), 1);
    }
    let vision = "base_model.model.model.vision_tower.vision_model.encoder.layers.0.\
                  self_attn.q_proj.lora_A.weight";
    let t = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(peft_to_temper(vision, &t)
        .unwrap_err()
        .to_string()
        .contains("vision"));
}

/// `rank_pattern` and `alpha_pattern` give their modules their own scale, the first key
/// that ends a module's name deciding, as PEFT's `get_pattern_key` reads them; a key that
/// is no regular expression is refused by field.
#[test]
fn per_module_ranks_and_alphas_scale_their_modules() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize("tests/fixtures/hf/llama").unwrap();
    let config = |ranks: serde_json::Value| {
        let v = serde_json::json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
            "rank_pattern": ranks, "alpha_pattern": {"layers\\.1\\.self_attn\\.v_proj": 3},
            "base_model_name_or_path": base,
        });
        std::fs::write(dir.path().join("adapter_config.json"), v.to_string()).unwrap();
    };
    config(serde_json::json!({"q_proj": 2, "proj": 100}));
    let ones = |shape: (usize, usize)| Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap();
    let mut tensors = HashMap::new();
    for layer in 0..2 {
        for (m, rank) in [("q_proj", 2), ("v_proj", 4)] {
            let name = format!("base_model.model.model.layers.{layer}.self_attn.{m}");
            tensors.insert(format!("{name}.lora_A.weight"), ones((rank, 8)));
            tensors.insert(format!("{name}.lora_B.weight"), ones((6, rank)));
        }
    }
    candle_core::safetensors::save(&tensors, dir.path().join("adapter_model.safetensors")).unwrap();
    let adapter = read_peft(dir.path(), &Device::Cpu).unwrap();
    let scale = |name: &str| {
        let t = &adapter.tensors[name];
        t.mean_all().unwrap().to_scalar::<f32>().unwrap()
    };
    // q: 8 / 2; v of layer 1: 3 / 4; v of layer 0: the config's 8 / 4 ("proj" ends no name
    // at a dot).
    assert_eq!(scale("model.layers.0.attn.q.lora_b"), 4.0);
    assert_eq!(scale("model.layers.1.attn.q.lora_b"), 4.0);
    assert_eq!(scale("model.layers.1.attn.v.lora_b"), 0.75);
    assert_eq!(scale("model.layers.0.attn.v.lora_b"), 2.0);
    config(serde_json::json!({"q_proj(": 2}));
    let e = read_peft(dir.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("adapter_config.json: field \"rank_pattern\": key `q_proj(`"),
        "{e}"
    );
}

/// Adapters PEFT would apply otherwise than as `W x + s B A x` (a LoRA variant's forward, an
/// initialisation that rewrites the base as PEFT loads it, trained biases or whole modules),
/// or whose factors lack their partner, are refused by the field (or tensor) that says so.
#[test]
fn adapters_peft_applies_otherwise_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize("tests/fixtures/hf/llama").unwrap();
    let ones = |shape: (usize, usize)| Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap();
    let q = "base_model.model.model.layers.0.self_attn.q_proj";
    let write = |extra: serde_json::Value, tensors: &[(&str, (usize, usize))]| {
        let mut v = serde_json::json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4,
            "base_model_name_or_path": base,
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        std::fs::write(dir.path().join("adapter_config.json"), v.to_string()).unwrap();
        let t: HashMap<String, Tensor> = (tensors.iter())
            .map(|(n, s)| (format!("{q}.{n}"), ones(*s)))
            .collect();
        candle_core::safetensors::save(&t, dir.path().join("adapter_model.safetensors")).unwrap();
        read_peft(dir.path(), &Device::Cpu)
            .err()
            .map(|e| format!("{e:#}"))
    };
    let pair = [("lora_A.weight", (2, 32)), ("lora_B.weight", (32, 2))];
    assert_eq!(write(serde_json::json!({}), &pair), None);
    // Settings at their defaults read as plain LoRA.
    let defaults = serde_json::json!({"use_qalora": false, "lora_bias": false,
        "alora_invocation_tokens": null, "target_parameters": [], "init_lora_weights": true,
        "modules_to_save": null, "velora_config": {"rank": 4}});
    assert_eq!(write(defaults, &pair), None);
    for (field, value) in [
        ("alora_invocation_tokens", serde_json::json!([1, 2])),
        ("use_qalora", true.into()),
        ("use_bdlora", serde_json::json!({"nblocks": 2})),
        ("lora_bias", true.into()),
        ("trainable_token_indices", serde_json::json!([5])),
        (
            "target_parameters",
            serde_json::json!(["experts.gate_up_proj"]),
        ),
        ("modules_to_save", serde_json::json!(["lm_head"])),
        ("init_lora_weights", "pissa_niter_4".into()),
        ("init_lora_weights", "OLoRA".into()),
        ("init_lora_weights", "lora_ga".into()),
    ] {
        let e = write(serde_json::json!({ field: value }), &pair).expect(field);
        assert!(
            e.contains(&format!("adapter_config.json: field \"{field}\"")) && !e.contains('\n'),
            "{e}"
        );
    }
    // A SEQ_CLS adapter's saved head is read.
    let head = serde_json::json!({"modules_to_save": ["classifier", "score"]});
    assert_eq!(write(head, &pair), None);
    let e = write(
        serde_json::json!({"bias": "lora_only"}),
        &[pair[0], pair[1], ("bias", (32, 1))],
    )
    .unwrap();
    assert!(
        e.contains("field \"bias\"") && e.contains("trains biases"),
        "{e}"
    );
    let e = write(serde_json::json!({}), &pair[1..]).unwrap();
    assert!(
        e.contains("lora_B.weight has no") && e.contains("lora_A.weight beside it"),
        "{e}"
    );
}

/// A PEFT adapter with `use_rslora` and `use_dora` merges as PEFT merges one: each B scaled
/// by `lora_alpha / sqrt(r)`, and each output row of `W + s B A` rescaled to its magnitude
/// (computed here on the host, row by row); GPT-2's c_attn magnitudes split into q's, k's
/// and v's outputs; a DoRA adapter without its magnitudes, a magnitude without its adapter,
/// or magnitudes in an adapter that says it is none, are refused.
#[test]
fn dora_and_rslora_adapters_merge_as_peft_merges_them() {
    use crate::stages::loader::read_checkpoint;
    let dir = tempfile::tempdir().unwrap();
    let base_dir = std::fs::canonicalize("tests/fixtures/hf/llama").unwrap();
    let config = |dora: bool| {
        let v = serde_json::json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
            "use_rslora": true, "use_dora": dora, "base_model_name_or_path": base_dir,
        });
        std::fs::write(dir.path().join("adapter_config.json"), v.to_string()).unwrap();
    };
    let dev = Device::Cpu;
    let randn = |shape: &[usize], seed: u64| -> Vec<f32> {
        let n: usize = shape.iter().product();
        (0..n)
            .map(|i| {
                let h = crate::train::rng::splitmix64(seed * 1_000_003 + i as u64);
                (h >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    };
    let (out, inp, r) = (32usize, 32usize, 4usize);
    let (a, b) = (randn(&[r, inp], 1), randn(&[out, r], 2));
    let m: Vec<f32> = randn(&[out], 3).iter().map(|x| 1.0 + x).collect();
    let pre = "base_model.model.model.layers.0.self_attn.q_proj";
    let mut tensors = HashMap::new();
    tensors.insert(
        format!("{pre}.lora_A.weight"),
        Tensor::from_vec(a.clone(), (r, inp), &dev).unwrap(),
    );
    tensors.insert(
        format!("{pre}.lora_B.weight"),
        Tensor::from_vec(b.clone(), (out, r), &dev).unwrap(),
    );
    let file = dir.path().join("adapter_model.safetensors");
    candle_core::safetensors::save(&tensors, &file).unwrap();
    config(true);
    let e = format!("{:#}", read_checkpoint(dir.path(), &dev).err().unwrap());
    assert!(
        e.contains("use_dora is true")
            && e.contains(&format!("{pre}.lora_magnitude_vector is missing")),
        "{e}"
    );
    // A magnitude with no adapter beside it scales nothing.
    let stray = "base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector";
    tensors.insert(stray.into(), Tensor::ones(64, DType::F32, &dev).unwrap());
    tensors.insert(
        format!("{pre}.lora_magnitude_vector"),
        Tensor::ones(out, DType::F32, &dev).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let e = format!("{:#}", read_checkpoint(dir.path(), &dev).err().unwrap());
    assert!(e.contains(&format!("{stray} has no")), "{e}");
    tensors.remove(stray);
    tensors.insert(
        format!("{pre}.lora_magnitude_vector"),
        Tensor::from_vec(m.clone(), out, &dev).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &file).unwrap();
    config(false);
    let e = format!("{:#}", read_checkpoint(dir.path(), &dev).err().unwrap());
    assert!(
        e.contains("field \"use_dora\"") && e.contains("magnitude"),
        "{e}"
    );
    config(true);
    let merged = read_checkpoint(dir.path(), &dev).unwrap().tensors;
    let base = read_checkpoint(&base_dir, &dev).unwrap().tensors;
    let name = "model.layers.0.attn.q.weight";
    let w: Vec<Vec<f32>> = base[name].to_vec2().unwrap();
    let got: Vec<Vec<f32>> = merged[name].to_vec2().unwrap();
    let s = 8.0 / 2.0; // rsLoRA: alpha / sqrt(r)
    for o in 0..out {
        let row: Vec<f32> = (0..inp)
            .map(|i| w[o][i] + s * (0..r).map(|k| b[o * r + k] * a[k * inp + i]).sum::<f32>())
            .collect();
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        for i in 0..inp {
            let want = m[o] / norm * row[i];
            assert!((got[o][i] - want).abs() <= 1e-5, "row {o} col {i}");
        }
    }
    // Layers without an adapter are the base's.
    let other = "model.layers.1.attn.q.weight";
    assert_eq!(
        (&merged[other] - &base[other])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    let mag = Tensor::arange(0f32, 12.0, &dev).unwrap();
    let parts = peft_to_temper(
        "base_model.model.transformer.h.1.attn.c_attn.lora_magnitude_vector",
        &mag,
    )
    .unwrap();
    let names: Vec<&str> = parts.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "model.layers.1.attn.q.lora_magnitude",
            "model.layers.1.attn.k.lora_magnitude",
            "model.layers.1.attn.v.lora_magnitude"
        ]
    );
    assert_eq!(parts[2].1.to_vec1::<f32>().unwrap(), [8.0, 9.0, 10.0, 11.0]);
}
