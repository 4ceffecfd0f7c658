//! Real models in and out, on the tiny random Hugging Face fixtures that
//! `scripts/make_hf_fixtures.py` built with transformers (tests/fixtures/hf/): each family's
//! logits match transformers' to 1e-4, greedy decoding gives transformers' tokens, exporting
//! an import writes back the same tensors bit for bit, a PEFT adapter merges to PEFT's
//! logits, Qwen3's q and k norms train, a reward model saved by transformers scores as it
//! does, and bad configs or tensors fail with one line naming the file.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use temper::generate::{generate, RowKeys, SampleCfg};
use temper::model::linear::Ctx;
use temper::model::{Fwd, Transformer};
use temper::stages::loader::{policy_from, read_checkpoint, scored_from};
use temper::train::checkpoint::CheckpointKind;
use temper::train::params::{Net, ParamStore};

const FAMILIES: [&str; 8] = [
    "llama", "qwen2", "qwen3", "mistral", "smollm3", "gemma2", "gemma3", "gpt2",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

fn expected(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap()
}

fn ctx() -> Ctx {
    Ctx::plain(DType::F32)
}

fn load(dir: &Path) -> (Transformer, temper::data::tokenizer::Tokenizer) {
    let loaded = read_checkpoint(dir, &Device::Cpu).unwrap();
    let mut store = ParamStore::new(Device::Cpu, 0);
    let net = policy_from(&loaded, &mut store, None).unwrap();
    (net, loaded.tokenizer)
}

/// Largest absolute difference between temper's logits for `ids` and `want` (`[T][V]`).
fn max_diff(net: &Transformer, ids: &[u32], want: &serde_json::Value) -> f64 {
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let f = Fwd {
        ctx: ctx(),
        positions: None,
        key_valid: None,
        segments: None,
    };
    let got = net.forward(&x, &f, None).unwrap().squeeze(0).unwrap();
    let got = got.to_vec2::<f32>().unwrap();
    let mut worst = 0f64;
    for (row, w) in got.iter().zip(want.as_array().unwrap()) {
        for (a, b) in row.iter().zip(w.as_array().unwrap()) {
            worst = worst.max((*a as f64 - b.as_f64().unwrap()).abs());
        }
    }
    worst
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn every_family_matches_transformers_logits_and_greedy_tokens() {
    for fam in FAMILIES.into_iter().chain(["gemma3_mm"]) {
        let dir = fixture(fam);
        let e = expected(&dir);
        let (net, tok) = load(&dir);
        for (i, ids) in e["input_ids"].as_array().unwrap().iter().enumerate() {
            let d = max_diff(&net, &ids_of(ids), &e["logits"][i]);
            assert!(d <= 1e-4, "{fam}: sequence {i} logits differ by {d}");
        }
        let prompt = ids_of(&e["input_ids"][0]);
        let cfg = SampleCfg {
            max_new_tokens: 8,
            temperature: 0.0,
            ..Default::default()
        };
        let g = generate(&net, ctx(), &tok, &[prompt], &cfg, &RowKeys::range(0, 0, 1)).unwrap();
        assert_eq!(g.tokens[0], ids_of(&e["greedy"]), "{fam}: greedy tokens");
    }
}

/// `temper export --checkpoint from --out out --format format`.
fn export(from: &Path, out: &Path, format: &str) {
    run_ok(&[
        "export",
        "--checkpoint",
        from.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--format",
        format,
    ]);
}

/// The `config.json` of the model directory `dir`.
fn config_of(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

fn safetensors_map(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

#[test]
fn exporting_an_import_writes_back_the_same_tensors_bit_for_bit() {
    let d = tmp();
    for fam in FAMILIES {
        let out = p(d.path(), fam);
        export(&fixture(fam), &out, "hf");
        let a = safetensors_map(&fixture(fam).join("model.safetensors"));
        let b = safetensors_map(&out.join("model.safetensors"));
        let mut names: Vec<_> = a.keys().collect();
        names.sort();
        let mut got: Vec<_> = b.keys().collect();
        got.sort();
        assert_eq!(names, got, "{fam}: tensor names");
        for n in names {
            let (x, y) = (&a[n], &b[n]);
            assert_eq!(x.dims(), y.dims(), "{fam}: {n}");
            let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{fam}: {n} changed"
            );
        }
        // The export is a model directory temper (like transformers) reads again.
        let e = expected(&fixture(fam));
        let (net, _) = load(&out);
        assert!(max_diff(&net, &ids_of(&e["input_ids"][0]), &e["logits"][0]) <= 1e-4);
        for f in ["config.json", "generation_config.json", "tokenizer.json"] {
            assert!(out.join(f).is_file(), "{fam}: {f} missing");
        }
        let header = std::fs::read(out.join("model.safetensors")).unwrap();
        let text = String::from_utf8_lossy(&header[8..header.len().min(4096)]);
        assert!(text.contains(r#""format":"pt""#), "{fam}: no pt metadata");
    }
}

/// An export into a directory that already holds files (a user's Hugging Face model, say) is
/// refused, leaving it as it was, unless `--overwrite` asks for it; one into the directory it
/// reads from, or one holding it, is refused even then.
#[test]
fn export_refuses_a_non_empty_out_unless_asked_and_never_its_own_checkpoint() {
    let d = tmp();
    let theirs = p(d.path(), "theirs");
    export(&fixture("gpt2"), &theirs, "hf");
    let before = std::fs::read(theirs.join("model.safetensors")).unwrap();
    let llama = fixture("llama");
    let args = |from: &Path, out: &Path, extra: &[&'static str]| {
        let mut a = vec!["export".to_string(), "--checkpoint".into()];
        a.push(from.to_str().unwrap().into());
        a.extend(["--out".into(), out.to_str().unwrap().into()]);
        a.extend(["--format".into(), "hf".into()]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let e = run_err(&strs(&args(&llama, &theirs, &[])));
    assert!(e.contains("not empty") && e.contains("--overwrite"), "{e}");
    assert_eq!(
        std::fs::read(theirs.join("model.safetensors")).unwrap(),
        before
    );
    assert_eq!(config_of(&theirs)["model_type"], "gpt2");

    run_ok(&strs(&args(&llama, &theirs, &["--overwrite"])));
    assert_eq!(config_of(&theirs)["model_type"], "llama");
    let (net, _) = load(&theirs);
    let e = expected(&llama);
    assert!(max_diff(&net, &ids_of(&e["input_ids"][0]), &e["logits"][0]) <= 1e-4);

    for out in [theirs.as_path(), d.path()] {
        let e = run_err(&strs(&args(&theirs, out, &["--overwrite"])));
        assert!(e.contains("holds the checkpoint being exported"), "{e}");
    }
    // A run directory is read from its final/: that is refused as --out too.
    let run = p(d.path(), "run");
    let toml = p(d.path(), "c.toml");
    std::fs::write(&toml, TINY_TOML).unwrap();
    pretrain_on_cpu(toml.to_str().unwrap(), &run, 1);
    let model = std::fs::read(run.join("final/model.safetensors")).unwrap();
    let e = run_err(&strs(&args(&run, &run.join("final"), &["--overwrite"])));
    assert!(e.contains("holds the checkpoint being exported"), "{e}");
    // Nor inside the checkpoint, nor among the run's checkpoints.
    for out in [run.join("final/hf"), run.join("checkpoints")] {
        for from in [run.clone(), run.join("final")] {
            let e = run_err(&strs(&args(&from, &out, &["--overwrite"])));
            assert!(
                e.contains(
                    "where the model being exported is kept; export into a directory of its own"
                ),
                "{e}"
            );
        }
    }
    assert!(!run.join("final/hf").exists());
    assert!(!run.join("checkpoints/config.json").exists());
    // Beside them, in the run's own directory, is the user's to choose.
    run_ok(&strs(&args(&run, &run.join("hf"), &[])));
    assert!(run.join("hf/model.safetensors").exists());
    assert_eq!(
        std::fs::read(run.join("final/model.safetensors")).unwrap(),
        model
    );
}

/// An `--overwrite` replaces an earlier export of any format whole: its files this export does
/// not write again (an hf export's config.json, shards and another model's tokenizer under a
/// temper checkpoint; a temper checkpoint's meta.json, read as temper's own, under an hf
/// export) are removed and said, and what is left reads as the new export. A failed export
/// leaves none of the directories it made.
#[test]
fn an_overwrite_replaces_an_earlier_export_of_any_format() {
    let d = tmp();
    let out = p(d.path(), "out");
    let toml = p(d.path(), "c.toml");
    std::fs::write(&toml, TINY_TOML).unwrap();
    let run = p(d.path(), "run");
    pretrain_on_cpu(toml.to_str().unwrap(), &run, 1);
    let export_over = |from: &Path, format: &str, extra: &[&str]| {
        let mut a = vec!["export", "--checkpoint", from.to_str().unwrap()];
        a.extend(["--out", out.to_str().unwrap(), "--format", format]);
        a.extend(extra);
        String::from_utf8_lossy(&run_ok(&a).stderr).to_string()
    };
    export_over(&fixture("qwen2"), "hf", &["--max-shard-size", "100KB"]);
    assert!(out.join("model.safetensors.index.json").is_file());
    let said = export_over(&run, "temper", &["--overwrite"]);
    assert!(said.contains("removed an earlier export's files"), "{said}");
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["meta.json", "model.safetensors"], "{said}");
    let (net, tok) = load(&out);
    assert_eq!(tok.vocab_size(), net.cfg.vocab_size);

    let said = export_over(&run, "hf", &["--overwrite"]);
    assert!(said.contains("meta.json"), "{said}");
    assert!(!out.join("meta.json").exists() && out.join("config.json").is_file());
    let (net, tok) = load(&out);
    assert_eq!(tok.vocab_size(), net.cfg.vocab_size);

    let deep = p(d.path(), "new/deep/dir");
    let e = run_err(&[
        "export",
        "--checkpoint",
        p(d.path(), "no_such_run").to_str().unwrap(),
        "--out",
        deep.to_str().unwrap(),
    ]);
    assert!(e.contains("no_such_run"), "{e}");
    assert!(!p(d.path(), "new").exists());
}

/// A LoRA run's base, which its adapters need, is refused as an export's --out, with
/// --overwrite too, and left as it was.
#[test]
fn an_export_into_the_runs_base_is_refused() {
    let d = tmp();
    let base = p(d.path(), "base");
    copy_tree(&fixture("llama"), &base);
    let data = counting_data(d.path());
    let sft = p(d.path(), "sft");
    sft_on_cpu(&base, &data, &sft, &["--steps", "1", "--lora-rank", "2"]);
    let before = std::fs::read(base.join("model.safetensors")).unwrap();
    for format in ["peft", "hf", "temper"] {
        let e = run_err(&[
            "export",
            "--checkpoint",
            sft.to_str().unwrap(),
            "--out",
            base.to_str().unwrap(),
            "--format",
            format,
            "--overwrite",
        ]);
        assert!(e.contains("holds the base model"), "{format}: {e}");
    }
    assert_eq!(
        std::fs::read(base.join("model.safetensors")).unwrap(),
        before
    );
    assert!(!base.join("adapter_config.json").exists());
}

/// Gemma 3's image-and-text model (4B and up) is read as its language model: the vision tower
/// is left out, the full layers' linear rotary scaling kept, and the export is that language
/// model (`Gemma3ForCausalLM`), its tensors the originals' bit for bit.
#[test]
fn gemma3s_image_and_text_model_exports_as_its_language_model() {
    let d = tmp();
    let (src, out) = (fixture("gemma3_mm"), p(d.path(), "hf"));
    export(&src, &out, "hf");
    let cfg = config_of(&out);
    assert_eq!(cfg["model_type"], "gemma3_text");
    assert_eq!(cfg["architectures"][0], "Gemma3ForCausalLM");
    let full = &cfg["rope_parameters"]["full_attention"];
    assert_eq!(
        (&full["rope_type"], &full["factor"]),
        (&"linear".into(), &8.0.into())
    );
    assert_eq!(
        cfg["layer_types"],
        config_of(&src)["text_config"]["layer_types"]
    );
    let a = safetensors_map(&src.join("model.safetensors"));
    let b = safetensors_map(&out.join("model.safetensors"));
    let mut language: Vec<_> = a
        .keys()
        .filter_map(|n| n.strip_prefix("language_model."))
        .collect();
    language.sort();
    let mut got: Vec<_> = b.keys().map(|n| n.as_str()).collect();
    got.sort();
    assert_eq!(language, got);
    for n in got {
        let (x, y) = (&a[&format!("language_model.{n}")], &b[n]);
        assert_eq!(max_abs_diff(x, y), 0.0, "{n} changed");
    }
    let e = expected(&src);
    let (net, _) = load(&out);
    assert!(max_diff(&net, &ids_of(&e["input_ids"][1]), &e["logits"][1]) <= 1e-4);
}

#[test]
fn a_peft_adapter_merges_onto_its_base_as_peft_does() {
    let dir = fixture("llama_lora");
    let e = expected(&dir);
    // The adapter's config names its base relative to the repository root, where cargo
    // runs integration tests.
    let (net, _) = load(&dir);
    let d = max_diff(&net, &ids_of(&e["input_ids"][0]), &e["merged_logits"][0]);
    assert!(d <= 1e-4, "merged logits differ by {d}");
}

#[test]
fn llama3_stop_ids_come_from_the_generation_config() {
    let (_, tok) = load(&fixture("llama"));
    // <|end_of_text|> = 301 and <|eot_id|> = 302 both end a rollout.
    assert!(tok.is_stop(301) && tok.is_stop(302), "{:?}", tok.stop_ids());
    assert_eq!(
        tok.eos_id(),
        302,
        "tokenizer_config.json names <|eot_id|> as EOS"
    );
    assert_eq!(tok.bos_id(), Some(300));
    let (_, q) = load(&fixture("qwen2"));
    assert!(
        q.is_stop(302),
        "qwen2 stops on <|im_end|>: {:?}",
        q.stop_ids()
    );
    // An adapter saved with its own tokenizer and no generation config (as TRL saves one)
    // reads its tokenizer, and still stops where its base's generation config says.
    let d = tmp();
    let adapter = p(d.path(), "adapter");
    copy_files(&fixture("llama_lora"), &adapter);
    std::fs::copy(
        fixture("llama").join("tokenizer.json"),
        adapter.join("tokenizer.json"),
    )
    .unwrap();
    let tc = fixture("llama").join("tokenizer_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tc).unwrap()).unwrap();
    v["eos_token"] = "<|end_of_text|>".into();
    std::fs::write(adapter.join("tokenizer_config.json"), v.to_string()).unwrap();
    let tok = read_checkpoint(&adapter, &Device::Cpu).unwrap().tokenizer;
    assert_eq!(tok.eos_id(), 301, "the adapter's own tokenizer_config.json");
    assert!(
        tok.is_stop(302),
        "the base's stop ids: {:?}",
        tok.stop_ids()
    );
}

/// Without a generation_config.json transformers builds the generation config from
/// config.json, whose `eos_token_id` then ends generations (an image-and-text model's
/// from its text_config where the top level names none); with one, config.json's counts for
/// nothing. The stop ids stay with the tokenizer wherever it is saved; a classifier, which
/// transformers never generates with, takes none from config.json; a bad id is refused by
/// file and field.
#[test]
fn without_a_generation_config_config_jsons_stop_ids_end_generations() {
    let d = tmp();
    let with_config = |name: &str, fam: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let dir = p(d.path(), name);
        copy_files(&fixture(fam), &dir);
        std::fs::remove_file(dir.join("generation_config.json")).ok();
        let mut cfg = config_of(&dir);
        edit(&mut cfg);
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        dir
    };
    // config.json names <|end_of_text|> (301), tokenizer_config.json <|eot_id|> (302).
    let llama = with_config("llama", "llama", &|_| {});
    let tok = read_checkpoint(&llama, &Device::Cpu).unwrap().tokenizer;
    assert_eq!(tok.stop_ids(), [301, 302]);
    let saved = p(d.path(), "saved");
    std::fs::create_dir_all(&saved).unwrap();
    tok.save_dir(&saved).unwrap();
    let again = temper::data::tokenizer::Tokenizer::load_dir(&saved).unwrap();
    assert_eq!(again.stop_ids(), [301, 302], "saved with the tokenizer");
    let listed = with_config("listed", "llama", &|c| {
        c["eos_token_id"] = serde_json::json!([7, 301])
    });
    let tok = read_checkpoint(&listed, &Device::Cpu).unwrap().tokenizer;
    assert_eq!(tok.stop_ids(), [7, 301, 302]);
    // generation_config.json (eos_token_id [301, 302]) wins.
    std::fs::copy(
        fixture("llama").join("generation_config.json"),
        listed.join("generation_config.json"),
    )
    .unwrap();
    let tok = read_checkpoint(&listed, &Device::Cpu).unwrap().tokenizer;
    assert_eq!(tok.stop_ids(), [301, 302]);
    let mm = with_config("mm", "gemma3_mm", &|c| {
        c["eos_token_id"] = serde_json::Value::Null;
        c["text_config"]["eos_token_id"] = serde_json::json!([1, 305]);
    });
    let tok = read_checkpoint(&mm, &Device::Cpu).unwrap().tokenizer;
    assert!(tok.is_stop(305), "{:?}", tok.stop_ids());
    let rm = read_checkpoint(&fixture("llama_rm"), &Device::Cpu).unwrap();
    assert_eq!(
        rm.tokenizer.stop_ids(),
        [302],
        "a classifier's config.json stops nothing"
    );
    let bad = with_config("bad", "llama", &|c| c["eos_token_id"] = "<|eot_id|>".into());
    let e = read_err(&bad);
    assert!(
        e.contains("bad/config.json: field \"eos_token_id\"") && e.contains("token id"),
        "{e}"
    );
    let bad = with_config("bad_mm", "gemma3_mm", &|c| {
        c.as_object_mut().unwrap().remove("eos_token_id");
        c["text_config"]["eos_token_id"] = serde_json::json!([1, -1]);
    });
    let e = read_err(&bad);
    assert!(
        e.contains("bad_mm/config.json: field \"text_config.eos_token_id\""),
        "{e}"
    );
}

/// A copy of fixture `fam` with `edit` applied to its config and tensors.
fn broken(
    fam: &str,
    root: &Path,
    edit: impl Fn(&mut serde_json::Value, &mut HashMap<String, Tensor>),
) -> PathBuf {
    let out = p(root, &format!("{fam}-broken"));
    copy_files(&fixture(fam), &out);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let mut t = safetensors_map(&out.join("model.safetensors"));
    edit(&mut cfg, &mut t);
    std::fs::write(out.join("config.json"), cfg.to_string()).unwrap();
    candle_core::safetensors::save(&t, out.join("model.safetensors")).unwrap();
    out
}

fn sft_err(init: &Path, root: &Path) -> String {
    run_err(&[
        "sft",
        "--init",
        init.to_str().unwrap(),
        "--out",
        p(root, "out").to_str().unwrap(),
        "--steps",
        "1",
        "--device",
        "cpu",
    ])
}

#[test]
fn bad_configs_and_tensors_fail_naming_the_file() {
    let d = tmp();
    let unknown = broken("llama", &p(d.path(), "a"), |c, _| {
        c["model_type"] = "bert".into()
    });
    let e = sft_err(&unknown, d.path());
    assert!(
        e.contains("config.json") && e.contains("model_type") && e.contains("bert"),
        "{e}"
    );
    let window = broken("mistral", &p(d.path(), "b"), |c, _| {
        c["sliding_window"] = 0.into()
    });
    let e = sft_err(&window, d.path());
    assert!(
        e.contains("config.json") && e.contains("sliding_window"),
        "{e}"
    );
    let layers = broken("qwen3", &p(d.path(), "f"), |c, _| {
        c["layer_types"] = serde_json::json!(["chunked_attention", "full_attention"])
    });
    let e = sft_err(&layers, d.path());
    assert!(
        e.contains("config.json") && e.contains("layer_types") && e.contains("chunked_attention"),
        "{e}"
    );
    let untied = broken("gpt2", &p(d.path(), "k"), |c, _| {
        c["tie_word_embeddings"] = false.into()
    });
    let e = sft_err(&untied, d.path());
    assert!(
        e.contains("config.json") && e.contains("tie_word_embeddings"),
        "{e}"
    );
    let flags = broken("smollm3", &p(d.path(), "h"), |c, _| {
        c["no_rope_layers"] = serde_json::json!([1, 0])
    });
    let e = sft_err(&flags, d.path());
    assert!(
        e.contains("config.json") && e.contains("no_rope_layers") && e.contains("2 flags for 3"),
        "{e}"
    );
    let labels = broken("llama_rm", &p(d.path(), "i"), |c, _| {
        c["id2label"] = serde_json::json!({"0": "LABEL_0", "1": "LABEL_1"})
    });
    let e = sft_err(&labels, d.path());
    assert!(
        e.contains("config.json") && e.contains("id2label") && e.contains("2 labels"),
        "{e}"
    );
    let class = broken("llama_rm", &p(d.path(), "j"), |c, _| {
        c["architectures"] = serde_json::json!(["LlamaForTokenClassification"])
    });
    let e = sft_err(&class, d.path());
    assert!(
        e.contains("config.json") && e.contains("architectures"),
        "{e}"
    );
    let no_norm = broken("qwen3", &p(d.path(), "g"), |_, t| {
        t.remove("model.layers.0.self_attn.k_norm.weight");
    });
    let e = sft_err(&no_norm, d.path());
    assert!(
        e.contains(
            "qwen3-broken/model.safetensors: no tensor model.layers.0.self_attn.k_norm.weight"
        ),
        "{e}"
    );
    let missing = broken("llama", &p(d.path(), "c"), |_, t| {
        t.remove("model.layers.1.mlp.up_proj.weight");
    });
    let e = sft_err(&missing, d.path());
    assert!(
        e.contains("model.safetensors: no tensor model.layers.1.mlp.up_proj.weight"),
        "{e}"
    );
    let extra = broken("llama", &p(d.path(), "d"), |_, t| {
        let x = t["model.norm.weight"].clone();
        t.insert("model.extra.weight".into(), x);
    });
    let e = sft_err(&extra, d.path());
    assert!(
        e.contains("model.safetensors") && e.contains("model.extra.weight"),
        "{e}"
    );
    let shape = broken("qwen2", &p(d.path(), "e"), |_, t| {
        let x = Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap();
        t.insert("model.layers.0.self_attn.q_proj.bias".into(), x);
    });
    let e = sft_err(&shape, d.path());
    assert!(
        e.contains("model.safetensors: tensor model.layers.0.self_attn.q_proj.bias has shape [7]"),
        "{e}"
    );
    let errors: Vec<&str> = e.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one error line: {e}");
}

#[test]
fn a_model_too_large_or_misshapen_is_refused_naming_its_file() {
    let d = tmp();
    let big = p(d.path(), "big.toml");
    std::fs::write(&big, "[model]\nvocab_size = 99999999999\n").unwrap();
    let out = p(d.path(), "r");
    let e = run_err(&[
        "pretrain",
        "--config",
        big.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(
        e.contains("12800000738304 parameters") && e.contains("GB"),
        "{e}"
    );
    let zero = p(d.path(), "zero.toml");
    std::fs::write(
        &zero,
        "[train]\nsteps = 2\n\n[model]\nnum_hidden_layers = 0\n",
    )
    .unwrap();
    let e = run_err(&[
        "pretrain",
        "--config",
        zero.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(
        e.contains("zero.toml:5: model.num_hidden_layers must be positive"),
        "{e}"
    );
}

/// 30 steps of continued pretraining from the model at `init` into `out`, on a small
/// repetitive corpus beside `out`; the held-out loss must fall by a fifth.
fn pretrain_from(init: &Path, out: &Path) {
    let corpus = out.with_extension("txt");
    std::fs::write(&corpus, "3+4=7\nthe cat sat on the mat\n".repeat(200)).unwrap();
    let flags = ["--steps", "30", "--seq-len", "32", "--lr", "3e-3"];
    stage_on_cpu("pretrain", init, &corpus, out, &flags);
    let val = series(&metrics(out), "val", "loss");
    assert!(
        val.last().unwrap().1 < 0.8 * val[0].1,
        "continued pretraining from {} learns: {val:?}",
        init.display()
    );
}

#[test]
fn continued_pretraining_and_lora_sft_start_from_a_hugging_face_model_and_export_back() {
    let d = tmp();
    let pre = p(d.path(), "pre");
    pretrain_from(&fixture("qwen2"), &pre);
    // The checkpoint keeps the imported family and tokenizer files, so it exports as Qwen2.
    let out = p(d.path(), "hf");
    export(&pre, &out, "hf");
    let cfg = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(cfg.contains("\"qwen2\""), "{cfg}");
    assert!(out.join("tokenizer_config.json").is_file());
    // LoRA SFT on the Llama fixture, its adapter written with PEFT's names.
    let data = counting_data(d.path());
    let sft = p(d.path(), "sft");
    sft_on_cpu(
        &fixture("llama"),
        &data,
        &sft,
        &["--steps", "10", "--lora-rank", "4", "--lora-targets", "q,v"],
    );
    let peft = p(d.path(), "peft");
    export(&sft, &peft, "peft");
    let a = safetensors_map(&peft.join("adapter_model.safetensors"));
    let mut names: Vec<_> = a.keys().cloned().collect();
    names.sort();
    assert_eq!(names.len(), 8, "{names:?}");
    assert_eq!(
        names[0],
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    );
    let cfg = std::fs::read_to_string(peft.join("adapter_config.json")).unwrap();
    assert!(
        cfg.contains("\"q_proj\"") && cfg.contains("\"LORA\""),
        "{cfg}"
    );
    // It names its base, so it reads back: merged, the model the run's own export merges.
    let v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    let base = std::fs::canonicalize(fixture("llama")).unwrap();
    assert_eq!(v["base_model_name_or_path"], base.to_str().unwrap());
    let (merged, back) = (p(d.path(), "merged"), p(d.path(), "back"));
    export(&sft, &merged, "hf");
    export(&peft, &back, "hf");
    assert_same_weights(&merged, &back, 1e-6);
}

/// 40 SFT records, `{i}+1=` answered `{i + 1}`, in `dir/sft.jsonl`.
fn counting_data(dir: &Path) -> PathBuf {
    let data = p(dir, "sft.jsonl");
    let lines: String = (0..40)
        .map(|i| format!("{{\"prompt\": \"{i}+1=\", \"response\": \"{}\"}}\n", i + 1))
        .collect();
    std::fs::write(&data, lines).unwrap();
    data
}

/// The Hugging Face exports in `a` and `b` hold the same tensors, each within `tol`.
fn assert_same_weights(a: &Path, b: &Path, tol: f32) {
    let (a, b) = (
        safetensors_map(&a.join("model.safetensors")),
        safetensors_map(&b.join("model.safetensors")),
    );
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let moved = max_abs_diff(t, &b[name]);
        assert!(moved < tol, "{name}: {moved}");
    }
}

/// GPT-2's q, k and v share one Conv1D, c_attn, where temper gives each its own adapter. The
/// PEFT export holds them as PEFT would one adapter on c_attn: A stacked, B block-diagonal
/// (here q's and v's, k's rows zero), `rank_pattern` and `alpha_pattern` keeping the scale,
/// and attn.c_proj told apart from mlp.c_proj. PEFT's own merge of it, `W + alpha/r (B A)^T`
/// on Conv1D's `[in, out]` weights (computed here from the files alone, as PEFT's
/// `get_delta_weight` with `fan_in_fan_out` does), is the run's merged export, and temper reads
/// the adapter back to the same model. Under rsLoRA (`--use-rslora`) the scale is `alpha /
/// sqrt(r)`, c_attn's alpha `sqrt(2) alpha` for its joined rank `2 r`, and the config says
/// `use_rslora`.
#[test]
fn gpt2_adapters_export_to_peft_on_c_attn_and_read_back_merged() {
    for rslora in [false, true] {
        gpt2_adapters_export_to_peft(rslora);
    }
}

fn gpt2_adapters_export_to_peft(rslora: bool) {
    let d = tmp();
    let data = counting_data(d.path());
    let sft = p(d.path(), "sft");
    let flags = ["--steps", "10", "--lora-rank", "4", "--lora-alpha", "8"];
    let rs: &[&str] = if rslora { &["--use-rslora"] } else { &[] };
    let flags = [&flags[..], &["--lora-targets", "q,v,o,down"], rs].concat();
    sft_on_cpu(&fixture("gpt2"), &data, &sft, &flags);
    let peft = p(d.path(), "peft");
    export(&sft, &peft, "peft");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peft.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["attn.c_attn", "attn.c_proj", "mlp.c_proj"]),
        "{cfg}"
    );
    assert_eq!(cfg["rank_pattern"], serde_json::json!({"attn.c_attn": 8}));
    // PEFT's scale of each module: its alpha over its rank, or the rank's root.
    let scale = |alpha: f64, rank: f64| match rslora {
        true => alpha / rank.sqrt(),
        false => alpha / rank,
    };
    let c_attn_alpha = cfg["alpha_pattern"]["attn.c_attn"].as_f64().unwrap();
    assert!(
        (scale(c_attn_alpha, 8.0) - scale(8.0, 4.0)).abs() < 1e-12,
        "{cfg}"
    );
    assert_eq!(cfg["use_rslora"], rslora);
    assert_eq!(cfg["fan_in_fan_out"], true);
    let adapter = safetensors_map(&peft.join("adapter_model.safetensors"));
    // Two layers of three modules, A and B each.
    assert_eq!(adapter.len(), 12, "{:?}", adapter.keys());
    let factor = |layer: usize, module: &str, which: &str| {
        let name = format!("base_model.model.transformer.h.{layer}.{module}.lora_{which}.weight");
        adapter[&name].to_dtype(DType::F32).unwrap()
    };
    let b = factor(0, "attn.c_attn", "B");
    assert_eq!(b.dims(), &[96, 8]);
    assert_eq!(factor(0, "attn.c_attn", "A").dims(), &[8, 32]);
    let k_rows = b
        .narrow(0, 32, 32)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(k_rows.to_scalar::<f32>().unwrap(), 0.0, "k is not adapted");
    let (q_b, v_b) = (b.narrow(0, 0, 32).unwrap(), b.narrow(0, 64, 32).unwrap());
    let block = |t: &Tensor, col: usize| t.narrow(1, col, 4).unwrap().abs().unwrap().max_all();
    let off_diagonal = block(&q_b, 4).unwrap().to_scalar::<f32>().unwrap()
        + block(&v_b, 0).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(off_diagonal, 0.0, "B is block-diagonal");
    assert!(
        block(&q_b, 0).unwrap().to_scalar::<f32>().unwrap() > 0.0,
        "q trained"
    );
    let base = safetensors_map(&fixture("gpt2").join("model.safetensors"));
    let merged = p(d.path(), "merged");
    export(&sft, &merged, "hf");
    let m = safetensors_map(&merged.join("model.safetensors"));
    for layer in 0..2 {
        for (module, scale) in [
            ("attn.c_attn", scale(c_attn_alpha, 8.0)),
            ("attn.c_proj", scale(8.0, 4.0)),
            ("mlp.c_proj", scale(8.0, 4.0)),
            ("mlp.c_fc", 0.0),
        ] {
            let name = format!("transformer.h.{layer}.{module}.weight");
            let w = base[&name].to_dtype(DType::F32).unwrap();
            let want = match scale > 0.0 {
                true => {
                    let (a, b) = (factor(layer, module, "A"), factor(layer, module, "B"));
                    (w + (b.matmul(&a).unwrap().t().unwrap() * scale).unwrap()).unwrap()
                }
                false => w,
            };
            let moved = max_abs_diff(&want, &m[&name].to_dtype(DType::F32).unwrap());
            assert!(moved < 1e-5, "{name}: PEFT's merge differs by {moved}");
        }
    }
    let back = p(d.path(), "back");
    export(&peft, &back, "hf");
    assert_same_weights(&merged, &back, 1e-6);
    if !rslora {
        // Over a model's directory the adapter would be read as that model by temper and as
        // the adapter by transformers: the export leaves the model there and says so, as a
        // read does.
        let (sft, back) = (sft.to_str().unwrap(), back.to_str().unwrap());
        let args = [
            "export",
            "--checkpoint",
            sft,
            "--out",
            back,
            "--format",
            "peft",
        ];
        let out = run_ok(&[&args[..], &["--overwrite"]].concat());
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("holds a model's weights beside the adapter (left there)"),
            "{said}"
        );
        let gen = [
            "generate",
            "--checkpoint",
            back,
            "--prompt",
            "1",
            "--max-new-tokens",
            "1",
        ];
        let out = run_ok(&gen);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("holds a model and a PEFT adapter"), "{said}");
    }
}

/// DoRA (`--use-dora`) trains: a fresh DoRA model is its base (its first held-out loss is
/// plain LoRA's), the loss falls, and its PEFT export (`use_dora`, a magnitude vector per
/// adapted module, GPT-2's c_attn one of all its 96 outputs where k has no adapter) reads back
/// to the run's merged export, k's weights as they were.
#[test]
fn dora_adapters_train_and_export_to_peft_and_back() {
    let d = tmp();
    let data = counting_data(d.path());
    let val_losses = |run: &Path| -> Vec<f64> {
        let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["split"] == "val")
            .map(|v| v["loss"].as_f64().unwrap())
            .collect()
    };
    for (fam, targets) in [("gpt2", "q,v,o,down"), ("llama", "q,v,down")] {
        let flags = [
            "--steps",
            "30",
            "--lora-rank",
            "4",
            "--lora-targets",
            targets,
        ];
        let (lora, dora) = (
            p(d.path(), &format!("lora-{fam}")),
            p(d.path(), &format!("dora-{fam}")),
        );
        sft_on_cpu(&fixture(fam), &data, &lora, &flags);
        sft_on_cpu(
            &fixture(fam),
            &data,
            &dora,
            &[&flags[..], &["--use-dora"]].concat(),
        );
        let (plain, ours) = (val_losses(&lora), val_losses(&dora));
        assert_eq!(plain[0], ours[0], "{fam}: a fresh DoRA model is its base");
        assert!(
            ours[ours.len() - 1] < ours[0] - 0.2,
            "{fam}: DoRA learns: {ours:?}"
        );
        let (peft, merged, back) = (
            p(d.path(), &format!("peft-{fam}")),
            p(d.path(), &format!("merged-{fam}")),
            p(d.path(), &format!("back-{fam}")),
        );
        export(&dora, &peft, "peft");
        export(&dora, &merged, "hf");
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(peft.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["use_dora"], true, "{cfg}");
        let adapter = safetensors_map(&peft.join("adapter_model.safetensors"));
        let magnitudes: Vec<&String> = adapter
            .keys()
            .filter(|n| n.ends_with(".lora_magnitude_vector"))
            .collect();
        let modules = targets.split(',').count() - usize::from(fam == "gpt2");
        assert_eq!(magnitudes.len(), 2 * modules, "{fam}: {magnitudes:?}");
        export(&peft, &back, "hf");
        assert_same_weights(&merged, &back, 1e-5);
        if fam == "gpt2" {
            let m = &adapter["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"];
            assert_eq!(m.dims(), &[96]);
            // k's columns of c_attn (Conv1D: [in, out]), read back through PEFT's DoRA on all
            // of c_attn, are the base's.
            let w = |dir: &Path| {
                let t = safetensors_map(&dir.join("model.safetensors"))
                    .remove("transformer.h.0.attn.c_attn.weight")
                    .unwrap();
                t.narrow(1, 32, 32).unwrap()
            };
            let moved = max_abs_diff(&w(&back), &w(&fixture("gpt2")));
            assert!(moved < 1e-6, "k moved by {moved}");
        }
    }
}

/// A LoRA run on one of Gemma 3's image-and-text models exports its adapters under the names
/// transformers 5 gives that model's language model (`model.language_model.layers...`, where
/// `PeftModel.from_pretrained` on the base looks), its `target_modules` a pattern that keeps
/// off the vision tower's projections of the same names, and reads back to the run's merged
/// export.
#[test]
fn gemma3_image_and_text_adapters_export_under_its_language_models_names() {
    let d = tmp();
    let data = counting_data(d.path());
    let run = p(d.path(), "lora");
    let flags = [
        "--steps",
        "4",
        "--lora-rank",
        "4",
        "--lora-targets",
        "q,v,down",
    ];
    sft_on_cpu(&fixture("gemma3_mm"), &data, &run, &flags);
    let (peft, merged, back) = (
        p(d.path(), "peft"),
        p(d.path(), "merged"),
        p(d.path(), "back"),
    );
    export(&run, &peft, "peft");
    export(&run, &merged, "hf");
    let adapter = safetensors_map(&peft.join("adapter_model.safetensors"));
    let prefix = "base_model.model.model.language_model.layers.";
    assert!(
        !adapter.is_empty() && adapter.keys().all(|n| n.starts_with(prefix)),
        "{:?}",
        adapter.keys().collect::<Vec<_>>()
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peft.join("adapter_config.json")).unwrap())
            .unwrap();
    let pattern = cfg["target_modules"].as_str().expect("one pattern");
    let targets = regex::Regex::new(&format!("^(?:{pattern})$")).unwrap();
    for (module, adapted) in [
        ("model.language_model.layers.0.self_attn.q_proj", true),
        ("language_model.model.layers.1.mlp.down_proj", true),
        ("model.language_model.layers.0.self_attn.k_proj", false),
        (
            "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj",
            false,
        ),
    ] {
        assert_eq!(targets.is_match(module), adapted, "{module}: {pattern}");
    }
    export(&peft, &back, "hf");
    assert_same_weights(&merged, &back, 1e-5);
}

/// What a run or an export would not use is refused, or said to be unused, in one line:
/// LoRA settings without a rank, a projection the model has not, a file named where a model
/// directory is read, `--format peft` of a model without temper's adapters, no new tokens,
/// and a chat template plain prompts do not read.
#[test]
fn settings_and_inputs_that_would_do_nothing_are_refused_or_named() {
    let d = tmp();
    let data = p(d.path(), "sft.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"1+1=\", \"response\": \"2\"}\n".repeat(8),
    )
    .unwrap();
    let sft = |init: &Path, out: &str, extra: &[&str]| {
        let (init, data, out) = (
            init.to_str().unwrap(),
            data.to_str().unwrap(),
            p(d.path(), out),
        );
        let mut args = vec!["sft", "--init", init, "--data", data, "--device", "cpu"];
        args.extend(["--steps", "1", "--out", out.to_str().unwrap()]);
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let e = run_err(&strs(&sft(&fixture("llama"), "a", &["--lora-alpha", "4"])));
    assert!(e.contains("--lora-alpha needs --lora-rank"), "{e}");
    let flags = ["--lora-rank", "2", "--lora-targets", "q,gate"];
    let e = run_err(&strs(&sft(&fixture("gpt2"), "b", &flags)));
    assert!(
        e.contains("names gate, which this model's MLP has not"),
        "{e}"
    );
    // A [model] table beside --init that says otherwise is named as unused, and config.toml
    // records the model the run trains.
    let cfg = p(d.path(), "model.toml");
    std::fs::write(&cfg, "[model]\nhidden_size = 256\nnum_hidden_layers = 2\n").unwrap();
    let out = run_ok(&strs(&sft(
        &fixture("llama"),
        "m",
        &["--config", cfg.to_str().unwrap()],
    )));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("model.toml: [model] hidden_size is not used"),
        "{said}"
    );
    let recorded = std::fs::read_to_string(p(d.path(), "m").join("config.toml")).unwrap();
    assert!(recorded.contains("hidden_size = 32\n"), "{recorded}");
    // `all` adapts the projections GPT-2 has.
    run_ok(&strs(&sft(
        &fixture("gpt2"),
        "c",
        &["--lora-rank", "2", "--lora-targets", "all"],
    )));
    let weights = fixture("llama").join("model.safetensors");
    let e = run_err(&strs(&sft(&weights, "d", &[])));
    assert!(e.contains("a file, where a directory is read"), "{e}");
    let out = p(d.path(), "x");
    let export = |from: &Path| {
        let args = ["export", "--checkpoint", from.to_str().unwrap(), "--out"];
        run_err(&[&args[..], &[out.to_str().unwrap(), "--format", "peft"]].concat())
    };
    assert!(
        export(&fixture("llama")).contains("a Hugging Face model, which holds no LoRA adapters")
    );
    assert!(export(&fixture("llama_lora")).contains("already a PEFT adapter"));
    let model = fixture("llama");
    let eval = [
        "eval",
        "--checkpoint",
        model.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    let e = run_err(&[&eval[..], &["--max-new-tokens", "0"]].concat());
    assert!(e.contains("--max-new-tokens must be positive"), "{e}");
    let e = run_err(&[&eval[..], &["--chat-template", "/nonexistent/t.jinja"]].concat());
    assert!(e.contains("/nonexistent/t.jinja"), "{e}");
    let template = p(d.path(), "t.jinja");
    std::fs::write(
        &template,
        "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    )
    .unwrap();
    let flags = [
        "--chat-template",
        template.to_str().unwrap(),
        "--max-new-tokens",
        "1",
    ];
    let out = run_ok(&[&eval[..], &flags].concat());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("warning: --chat-template is not used"),
        "{said}"
    );
    // A model directory serves as --tokenizer, as --chat-template takes one.
    let corpus = p(d.path(), "corpus.txt");
    std::fs::write(&corpus, "the cat sat on the mat\n").unwrap();
    let shards = p(d.path(), "shards");
    let args = ["tokenizer", "encode", corpus.to_str().unwrap(), "--out"];
    let more = [
        shards.to_str().unwrap(),
        "--tokenizer",
        model.to_str().unwrap(),
    ];
    let out = run_ok(&[&args[..], &more].concat());
    assert!(shards.join("tokenizer.json").is_file());
    // One document: none held out, and said so.
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("no document went to validation (1 document;"),
        "{said}"
    );
}

/// An adapter whose tokenizer has no chat template renders with its base's, and an export of
/// it carries that template, so transformers renders the exported model the same way.
#[test]
fn an_adapter_exports_with_the_template_it_renders_with() {
    let d = tmp();
    let out = p(d.path(), "rm");
    export(&fixture("llama_rm_lora"), &out, "hf");
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("llama").join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    let want = base["chat_template"].as_str().unwrap();
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    let got = match std::fs::read_to_string(out.join("chat_template.jinja")) {
        Ok(text) => text,
        Err(_) => tc["chat_template"].as_str().unwrap_or_default().to_string(),
    };
    assert_eq!(got, want);
}

/// `temper sft` from `init` on `data` into `out` on the CPU, with `extra` flags.
fn sft_on_cpu(init: &Path, data: &Path, out: &Path, extra: &[&str]) {
    stage_on_cpu("sft", init, data, out, extra);
}

/// `temper STAGE` from `init` on `data` into `out` on the CPU, with `extra` flags.
fn stage_on_cpu(stage: &str, init: &Path, data: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec![
        stage,
        "--init",
        init.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    run_ok(&args);
}

/// TRL's language-modelling records (`{"text"}`) train SFT on every token, opened with the
/// Llama fixture's BOS as transformers tokenises them: the held-out loss falls.
#[test]
fn sft_learns_trl_language_modelling_records() {
    let d = tmp();
    let data = p(d.path(), "text.jsonl");
    let lines: String = (0..60)
        .map(|i| {
            let (a, b) = (i % 13, i % 7);
            format!("{{\"text\": \"{a} plus {b} is {}.\"}}\n", a + b)
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    let out = p(d.path(), "sft");
    sft_on_cpu(
        &fixture("llama"),
        &data,
        &out,
        &["--steps", "40", "--eval-every", "10"],
    );
    let val = series(&metrics(&out), "val", "loss");
    assert!(
        val.last().unwrap().1 < 0.85 * val[0].1,
        "held-out loss on text records: {val:?}"
    );
    // NEFTune (TRL's neftune_noise_alpha): the same run with noise on its embeddings trains
    // on other losses from its first step, and learns as well.
    let noised = p(d.path(), "neftune");
    sft_on_cpu(
        &fixture("llama"),
        &data,
        &noised,
        &[
            "--steps",
            "40",
            "--eval-every",
            "10",
            "--neftune-noise-alpha",
            "5",
        ],
    );
    let train = |run: &Path| series(&metrics(run), "train", "loss")[0].1;
    assert_ne!(train(&out), train(&noised));
    let val_noised = series(&metrics(&noised), "val", "loss");
    assert!(
        val_noised.last().unwrap().1 < 0.85 * val_noised[0].1,
        "held-out loss with NEFTune: {val_noised:?}"
    );
    let cfg = std::fs::read_to_string(noised.join("config.toml")).unwrap();
    assert!(cfg.contains("neftune_noise_alpha = 5.0"), "{cfg}");
    // DFT (TRL's loss_type = "dft"): each token's NLL weighed by its probability, so the
    // first step's training loss is below the NLL's, and the held-out NLL still falls.
    let dft = p(d.path(), "dft");
    let table = p(d.path(), "dft.toml");
    std::fs::write(&table, "[sft]\nloss_type = \"dft\"\n").unwrap();
    let flags = ["--steps", "40", "--eval-every", "10", "--config"];
    sft_on_cpu(
        &fixture("llama"),
        &data,
        &dft,
        &[&flags[..], &[table.to_str().unwrap()]].concat(),
    );
    assert!(
        train(&dft) < 0.5 * train(&out),
        "{} vs {}",
        train(&dft),
        train(&out)
    );
    let val_dft = series(&metrics(&dft), "val", "loss");
    assert!(
        val_dft.last().unwrap().1 < 0.9 * val_dft[0].1,
        "held-out NLL under DFT: {val_dft:?}"
    );
}

/// Qwen3's per-head norms of q and k, and Gemma's four norms a layer (Gemma 3's besides), train with
/// the rest (full fine-tuning from the fixture: the loss falls and the gains move) and go back
/// out under their Hugging Face names, with the config fields that shape them.
#[test]
fn qwen3_and_gemma3_models_train_their_own_norms_and_export_them_back() {
    let gemma_norms = [
        "self_attn.q_norm",
        "self_attn.k_norm",
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ];
    let cases: [(&str, &[&str], usize); 3] = [
        ("qwen3", &["self_attn.q_norm", "self_attn.k_norm"], 2),
        ("gemma3", &gemma_norms, 3),
        ("gemma2", &gemma_norms[2..], 3),
    ];
    for (fam, norms, layers) in cases {
        let d = tmp();
        let (run, out) = (p(d.path(), "run"), p(d.path(), "hf"));
        let init = fixture(fam);
        pretrain_from(&init, &run);
        export(&run, &out, "hf");
        let (cfg, want_cfg) = (config_of(&out), config_of(&init));
        for field in [
            "model_type",
            "head_dim",
            "layer_types",
            "query_pre_attn_scalar",
            "attn_logit_softcapping",
            "final_logit_softcapping",
        ] {
            assert_eq!(cfg[field], want_cfg[field], "{fam}: {field}");
        }
        let (a, b) = (
            safetensors_map(&init.join("model.safetensors")),
            safetensors_map(&out.join("model.safetensors")),
        );
        let mut names: Vec<_> = b.keys().collect();
        names.sort();
        let mut want: Vec<_> = a.keys().collect();
        want.sort();
        assert_eq!(names, want, "{fam}");
        for layer in 0..layers {
            for which in norms {
                let n = format!("model.layers.{layer}.{which}.weight");
                let moved = max_abs_diff(&a[&n], &b[&n]);
                assert!(moved > 1e-4, "{fam}: {n} did not train: moved {moved}");
            }
        }
    }
}

/// SmolLM3's NoPE layer trains with the rest and goes back out marked as such: the export's
/// config keeps `no_rope_layers`, and transformers' padding id stays inside the vocabulary.
#[test]
fn a_smollm3_model_trains_and_exports_its_nope_layers_back() {
    let d = tmp();
    let (run, out) = (p(d.path(), "run"), p(d.path(), "hf"));
    pretrain_from(&fixture("smollm3"), &run);
    export(&run, &out, "hf");
    let cfg = config_of(&out);
    assert_eq!(cfg["model_type"], "smollm3");
    assert_eq!(cfg["no_rope_layers"], serde_json::json!([1, 0, 1]));
    let pad = cfg["pad_token_id"].as_u64().unwrap();
    assert!(pad < cfg["vocab_size"].as_u64().unwrap(), "{cfg}");
}

/// The llama fixture as a checkpoint of two shards and their index, in `out`, with `edit`
/// applied to the index's `weight_map` and to the shards' tensors (by file name).
fn sharded_llama(
    out: &Path,
    edit: impl Fn(&mut serde_json::Map<String, serde_json::Value>, &str, &mut HashMap<String, Tensor>),
) {
    std::fs::create_dir_all(out).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(fixture("llama").join(f), out.join(f)).unwrap();
    }
    let all = safetensors_map(&fixture("llama").join("model.safetensors"));
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    let mut shards = Vec::new();
    for (k, part) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", k + 1);
        let shard: HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        for n in part {
            weight_map.insert((*n).clone(), file.clone().into());
        }
        shards.push((file, shard));
    }
    for (file, mut shard) in shards {
        edit(&mut weight_map, &file, &mut shard);
        candle_core::safetensors::save(&shard, out.join(&file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(out.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn a_sharded_checkpoint_loads_through_its_index() {
    let d = tmp();
    let out = p(d.path(), "sharded");
    sharded_llama(&out, |_, _, _| {});
    let e = expected(&fixture("llama"));
    let (net, _) = load(&out);
    assert!(max_diff(&net, &ids_of(&e["input_ids"][1]), &e["logits"][1]) <= 1e-4);
}

/// The one-line error of reading the model at `dir`.
fn read_err(dir: &Path) -> String {
    let e = read_checkpoint(dir, &Device::Cpu).err().expect("an error");
    assert_eq!(e.chain().count(), 1, "one line: {e:#}");
    e.to_string()
}

/// A tensor missing from a Hugging Face checkpoint, or of the wrong shape, is named as the
/// files name it, with the file it should be in: the single file, the shard the index
/// places it in, or the index that lists no such tensor.
#[test]
fn a_missing_or_misshapen_tensor_is_named_as_its_files_name_it() {
    let d = tmp();
    let q = "model.layers.1.self_attn.q_proj.weight";
    let gone = p(d.path(), "gone");
    sharded_llama(&gone, |_, _, t| {
        t.remove(q);
    });
    let e = read_err(&gone);
    assert!(
        e.contains(&format!("gone/model-00002-of-00002.safetensors: no tensor {q}, which model.safetensors.index.json places there")),
        "{e}"
    );
    let unlisted = p(d.path(), "unlisted");
    sharded_llama(&unlisted, |m, _, t| {
        m.remove(q);
        t.remove(q);
    });
    let e = read_err(&unlisted);
    assert!(
        e.contains(&format!(
            "unlisted/model.safetensors.index.json: field \"weight_map\" names no tensor {q}"
        )),
        "{e}"
    );
    let wide = p(d.path(), "wide");
    sharded_llama(&wide, |_, _, t| {
        if t.contains_key(q) {
            t.insert(
                q.into(),
                Tensor::zeros((3, 32), DType::F32, &Device::Cpu).unwrap(),
            );
        }
    });
    let e = read_err(&wide);
    assert!(
        e.contains(&format!("wide/model-00002-of-00002.safetensors: tensor {q} has shape [3, 32], config.json's llama model wants [32, 32]")),
        "{e}"
    );
    // GPT-2's fused q, k and v under the prefix its file has; Gemma 3's language model inside
    // its image-and-text model likewise.
    let gpt2 = broken("gpt2", &p(d.path(), "g"), |_, t| {
        t.remove("transformer.h.1.attn.c_attn.weight");
    });
    let e = read_err(&gpt2);
    assert!(
        e.contains("model.safetensors: no tensor transformer.h.1.attn.c_attn.weight"),
        "{e}"
    );
    let gpt2 = broken("gpt2", &p(d.path(), "h"), |_, t| {
        let x = Tensor::zeros((96, 32), DType::F32, &Device::Cpu).unwrap();
        t.insert("transformer.h.0.attn.c_attn.weight".into(), x);
    });
    let e = read_err(&gpt2);
    assert!(
        e.contains("tensor transformer.h.0.attn.c_attn.weight has shape [96, 32], config.json's gpt2 model wants [32, 96]"),
        "{e}"
    );
    let mm = broken("gemma3_mm", &p(d.path(), "m"), |_, t| {
        t.remove("language_model.model.layers.1.self_attn.k_norm.weight");
    });
    let e = read_err(&mm);
    assert!(
        e.contains("no tensor language_model.model.layers.1.self_attn.k_norm.weight"),
        "{e}"
    );
    // A reward model's classifier head, which transformers saves without a bias.
    let rm = broken("llama_rm", &p(d.path(), "r"), |_, t| {
        t.remove("score.weight");
    });
    let e = read_err(&rm);
    assert!(
        e.contains("model.safetensors: no tensor score.weight"),
        "{e}"
    );
}

/// Conversational records (TRL's format) are rendered with the model's own chat template in
/// every stage that reads them; here DPO and GRPO on the Llama-3-style fixture.
#[test]
fn conversational_preferences_and_prompts_use_the_models_chat_template() {
    let d = tmp();
    let prefs = p(d.path(), "prefs.jsonl");
    let prompts = p(d.path(), "prompts.jsonl");
    let (mut a, mut b) = (String::new(), String::new());
    for i in 0..12 {
        let user = format!(r#"[{{"role": "user", "content": "{i}+1?"}}]"#);
        let reply = |c: usize| format!(r#"[{{"role": "assistant", "content": "{c}"}}]"#);
        a.push_str(&format!(
            "{{\"prompt\": {user}, \"chosen\": {}, \"rejected\": {}}}\n",
            reply(i + 1),
            reply(i + 2)
        ));
        b.push_str(&format!(
            "{{\"prompt\": {user}, \"answer\": \"{}\"}}\n",
            i + 1
        ));
    }
    std::fs::write(&prefs, a).unwrap();
    std::fs::write(&prompts, b).unwrap();
    let init = fixture("llama");
    let cfg = p(d.path(), "c.toml");
    std::fs::write(&cfg, "[grpo]\nprompts_per_rollout = 2\ngroup_size = 2\nminibatch_size = 4\nlog_completions = 2\n").unwrap();
    for stage in ["dpo", "grpo"] {
        let data = if stage == "dpo" { &prefs } else { &prompts };
        let out = p(d.path(), stage);
        let mut flags = vec!["--config", cfg.to_str().unwrap(), "--steps", "1"];
        if stage == "dpo" {
            flags.extend(["--batch-size", "4"]);
        }
        stage_on_cpu(stage, &init, data, &out, &flags);
        if stage == "grpo" {
            let log = std::fs::read_to_string(out.join("completions.jsonl")).unwrap();
            assert!(
                log.contains("<|start_header_id|>user<|end_header_id|>"),
                "{log}"
            );
        }
    }
}

/// A model saved by transformers 4.5x or later keeps its chat template in
/// `chat_template.jinja`, which transformers prefers to the one in `tokenizer_config.json`:
/// temper renders conversations with it too and keeps it in its checkpoints. A template given
/// to a run (`--chat-template`, as TRL's `chat_template_path`) goes into the run's
/// checkpoints in place of the model's (its `tool_use` template too), so the next stage
/// renders with it unasked, and into its Hugging Face and PEFT exports (and into the
/// `chat_template` of the `tokenizer_config.json` that held one), the tokenizer's own files
/// otherwise as they came.
#[test]
fn chat_templates_are_read_and_kept_where_transformers_saves_them() {
    let d = tmp();
    let llama = fixture("llama");
    let template = |tag: &str| {
        format!(
            "{{% for m in messages %}}<{tag} {{{{ m['role'] }}}}>{{{{ m['content'] }}}}{{% endfor %}}\
             {{% if add_generation_prompt %}}<{tag} assistant>{{% endif %}}"
        )
    };
    let saved = p(d.path(), "saved");
    copy_files(&llama, &saved);
    std::fs::write(saved.join("chat_template.jinja"), template("saved")).unwrap();
    let tool_use = "additional_chat_templates/tool_use.jinja";
    std::fs::create_dir_all(saved.join("additional_chat_templates")).unwrap();
    std::fs::write(saved.join(tool_use), template("tools")).unwrap();
    let prompts = p(d.path(), "prompts.jsonl");
    let chat = p(d.path(), "chat.jsonl");
    let (mut a, mut b) = (String::new(), String::new());
    for i in 0..12 {
        let user = format!(r#"{{"role": "user", "content": "{i}+1?"}}"#);
        a.push_str(&format!(
            "{{\"prompt\": [{user}], \"answer\": \"{}\"}}\n",
            i + 1
        ));
        b.push_str(&format!(
            "{{\"messages\": [{user}, {{\"role\": \"assistant\", \"content\": \"{}\"}}]}}\n",
            i + 1
        ));
    }
    std::fs::write(&prompts, a).unwrap();
    std::fs::write(&chat, b).unwrap();
    let cfg = p(d.path(), "c.toml");
    std::fs::write(&cfg, "[grpo]\nprompts_per_rollout = 2\ngroup_size = 2\nminibatch_size = 4\nlog_completions = 2\n").unwrap();
    let train = |stage: &str, init: &Path, data: &Path, out: &Path, extra: &[&str]| {
        let flags = ["--config", cfg.to_str().unwrap(), "--steps", "1"];
        // GRPO sizes its batches by its rollouts, and refuses --batch-size.
        let batch: &[&str] = match stage {
            "grpo" => &[],
            _ => &["--batch-size", "4"],
        };
        stage_on_cpu(stage, init, data, out, &[&flags[..], batch, extra].concat());
    };
    let read = |path: PathBuf| {
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let prompted_with = |init: &Path, name: &str| {
        let out = p(d.path(), name);
        train("grpo", init, &prompts, &out, &[]);
        (read(out.join("completions.jsonl")), out)
    };
    let (log, grpo) = prompted_with(&saved, "grpo-saved");
    assert!(
        log.contains("<saved user>")
            && log.contains("+1?<saved assistant>")
            && !log.contains("header_id"),
        "{log}"
    );
    assert_eq!(
        read(grpo.join("final/chat_template.jinja")),
        template("saved")
    );
    assert_eq!(read(grpo.join("final").join(tool_use)), template("tools"));

    let mine = p(d.path(), "mine.jinja");
    std::fs::write(&mine, template("mine")).unwrap();
    let sft = p(d.path(), "sft");
    let given = ["--chat-template", mine.to_str().unwrap()];
    let lora = ["--lora-rank", "4", "--lora-targets", "q,v"];
    train(
        "sft",
        &saved,
        &chat,
        &sft,
        &[&given[..], &lora[..]].concat(),
    );
    assert_eq!(
        read(sft.join("final/chat_template.jinja")),
        template("mine")
    );
    // The given template has no tool_use one, so the model's would not render as trained.
    assert!(!sft.join("final").join(tool_use).exists());
    let (log, _) = prompted_with(&sft, "grpo-sft");
    assert!(
        log.contains("<mine user>") && log.contains("+1?<mine assistant>"),
        "{log}"
    );
    for format in ["hf", "peft"] {
        let out = p(d.path(), format);
        export(&sft, &out, format);
        assert_eq!(read(out.join("chat_template.jinja")), template("mine"));
        // The config's own template is the one given too; the rest of it as it came.
        let config = |dir: &Path| -> serde_json::Value {
            serde_json::from_str(&read(dir.join("tokenizer_config.json"))).unwrap()
        };
        let mut want = config(&llama);
        assert!(want["chat_template"].is_string(), "{want}");
        want["chat_template"] = template("mine").into();
        assert_eq!(config(&out), want, "{format}");
        assert!(out.join("tokenizer.json").is_file(), "{format}");
    }
}

/// A model with named chat templates only (`additional_chat_templates/`, no
/// `chat_template.jinja`) has no default in transformers, which refuses a conversation only
/// when it renders one: plain records train, a conversation given tools renders with
/// `tool_use` and keeps it in the checkpoint, and one without is refused by file and line.
#[test]
fn a_model_with_named_chat_templates_only_trains_what_needs_no_default() {
    let d = tmp();
    let named = p(d.path(), "named");
    copy_files(&fixture("llama"), &named);
    let tool_use = "additional_chat_templates/tool_use.jinja";
    std::fs::create_dir_all(named.join("additional_chat_templates")).unwrap();
    let tools = "{% for m in messages %}<t{{ tools | length }} {{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<t{{ tools | length }} assistant>{% endif %}";
    std::fs::write(named.join(tool_use), tools).unwrap();
    let write = |name: &str, line: &dyn Fn(u32) -> String| {
        let path = p(d.path(), name);
        let lines: String = (0..8).map(|i| line(i) + "\n").collect();
        std::fs::write(&path, lines).unwrap();
        path
    };
    let plain = write("plain.jsonl", &|i| {
        format!(r#"{{"prompt": "{i}+1=", "completion": "{}"}}"#, i + 1)
    });
    let with_tools = write("tools.jsonl", &|i| {
        format!(
            r#"{{"messages": [{{"role": "user", "content": "{i}+1?"}}, {{"role": "assistant", "content": "{}"}}], "tools": [{{"name": "add"}}]}}"#,
            i + 1
        )
    });
    let bare = write("bare.jsonl", &|i| {
        format!(
            r#"{{"messages": [{{"role": "user", "content": "{i}+1?"}}, {{"role": "assistant", "content": "{}"}}]}}"#,
            i + 1
        )
    });
    let steps = ["--steps", "1", "--batch-size", "4"];
    for data in [&plain, &with_tools] {
        let out = p(d.path(), "ok");
        sft_on_cpu(&named, data, &out, &steps);
        let kept = out.join("final");
        assert_eq!(std::fs::read_to_string(kept.join(tool_use)).unwrap(), tools);
        assert!(!kept.join("chat_template.jinja").exists());
        std::fs::remove_dir_all(&out).unwrap();
    }
    let out = p(d.path(), "refused");
    let e = run_err(&[
        "sft",
        "--init",
        named.to_str().unwrap(),
        "--data",
        bare.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(
        e.contains("bare.jsonl:1") && e.contains("holds named chat templates (tool_use)"),
        "{e}"
    );
}

/// Scores of `seqs` by the reward model at `dir` (a temper checkpoint or a Hugging Face
/// classifier), packed or not.
fn rm_scores(dir: &Path, seqs: &[Vec<u32>], pack: bool) -> Vec<f32> {
    let loaded = read_checkpoint(dir, &Device::Cpu).unwrap();
    assert_eq!(
        loaded.meta.kind,
        CheckpointKind::Reward,
        "{}",
        dir.display()
    );
    let mut store = ParamStore::new(Device::Cpu, 0);
    let rm = scored_from(&loaded, &mut store, Net::Policy, None, false).unwrap();
    let pad = loaded.tokenizer.pad_id();
    let s = rm.score(seqs, pad, ctx(), pack).unwrap();
    s.to_vec1::<f32>().unwrap()
}

/// A reward fixture's test sequences and the scores its reference implementation gave them.
fn rm_expected(dir: &Path) -> (Vec<Vec<u32>>, Vec<f64>) {
    let e = expected(dir);
    let seqs = e["input_ids"].as_array().unwrap().iter().map(ids_of);
    let scores = e["scores"].as_array().unwrap().iter();
    (
        seqs.collect(),
        scores.map(|s| s.as_f64().unwrap()).collect(),
    )
}

fn close_scores(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!((*g as f64 - w).abs() < 1e-4, "{what}: {got:?} vs {want:?}");
    }
}

/// A reward model as TRL's RewardTrainer saves one (a one-label LlamaForSequenceClassification
/// whose padding id is also its EOS) loads as a reward model and scores as transformers does,
/// at each sequence's last token that is not the padding id, packed or not (the third
/// sequence, trailing padding passed over, packs beside the first), and exports back bit for
/// bit with its padding id; one temper trains from the llama fixture (whose tokenizer pads
/// with a stop token) exports as such a classifier without a padding id, reads back with its
/// own scores, and serves as a GRPO run's `--reward`.
#[test]
fn a_hugging_face_reward_model_scores_trains_and_exports_as_transformers_reads_it() {
    let d = tmp();
    let fix = fixture("llama_rm");
    let (seqs, want) = rm_expected(&fix);
    assert_eq!(seqs.len(), 3);
    for pack in [false, true] {
        close_scores(
            &rm_scores(&fix, &seqs, pack),
            &want,
            &format!("pack {pack}"),
        );
    }
    // Exported as a classifier: its directory and config.
    let classifier = |from: &Path, name: &str| {
        let out = p(d.path(), name);
        export(from, &out, "hf");
        let cfg = config_of(&out);
        assert_eq!(
            cfg["architectures"],
            serde_json::json!(["LlamaForSequenceClassification"])
        );
        assert_eq!(cfg["id2label"], serde_json::json!({"0": "LABEL_0"}));
        (out, cfg)
    };
    let (back, cfg) = classifier(&fix, "back");
    assert_eq!(cfg["pad_token_id"], 301, "the classifier's own padding id");
    let (a, b) = (
        safetensors_map(&fix.join("model.safetensors")),
        safetensors_map(&back.join("model.safetensors")),
    );
    let mut names: Vec<_> = a.keys().collect();
    names.sort();
    let mut got: Vec<_> = b.keys().collect();
    got.sort();
    assert_eq!(names, got);
    for n in names {
        assert_eq!(max_abs_diff(&a[n], &b[n]), 0.0, "{n} changed");
    }
    // A reward model of temper's own, from the llama fixture, on preference pairs.
    let prefs = p(d.path(), "prefs.jsonl");
    let pairs: String = (0..16)
        .map(|i| {
            format!(
                "{{\"prompt\": \"{i}+1=\", \"chosen\": \"{}\", \"rejected\": \"{}\"}}\n",
                i + 1,
                i + 7
            )
        })
        .collect();
    std::fs::write(&prefs, pairs).unwrap();
    let rm = p(d.path(), "rm");
    stage_on_cpu("reward", &fixture("llama"), &prefs, &rm, &["--steps", "4"]);
    let (hf, cfg) = classifier(&rm, "rm-hf");
    assert!(cfg["pad_token_id"].is_null(), "{cfg}");
    let (ours, theirs) = (rm_scores(&rm, &seqs, false), rm_scores(&hf, &seqs, false));
    for (x, y) in ours.iter().zip(&theirs) {
        assert!((x - y).abs() < 1e-5, "{ours:?} vs {theirs:?}");
    }
    let prompts = p(d.path(), "prompts.jsonl");
    let lines: String = (0..8)
        .map(|i| format!("{{\"prompt\": \"{i}+1=\", \"answer\": \"{}\"}}\n", i + 1))
        .collect();
    std::fs::write(&prompts, lines).unwrap();
    let cfg = p(d.path(), "g.toml");
    std::fs::write(
        &cfg,
        "[grpo]\nprompts_per_rollout = 2\ngroup_size = 2\nminibatch_size = 4\n",
    )
    .unwrap();
    let grpo = p(d.path(), "grpo");
    let flags = [
        "--config",
        cfg.to_str().unwrap(),
        "--reward",
        hf.to_str().unwrap(),
        "--steps",
        "1",
    ];
    stage_on_cpu("grpo", &fixture("llama"), &prompts, &grpo, &flags);
    let scores = series(&metrics(&grpo), "train", "score");
    assert!(!scores.is_empty(), "the GRPO run scored its rollouts");
}

/// A LoRA reward model as TRL's RewardTrainer saves one with the peft_config of its
/// documentation (no task type; LoRA on the llama fixture, a causal LM, and the new score head
/// saved whole, with the tokenizer it trained with, which names no padding token) loads as a
/// reward model and scores as the classifier was trained: at the last token that is not the
/// padding id TRL gave it, that tokenizer's EOS (the base's own padding token is another),
/// padded and packed. It exports as a classifier that carries that padding id and scores the
/// same. Declared SEQ_CLS it reads the same; the padding id is that tokenizer's pad_token
/// where it names one, and the base tokenizer's without one beside the adapter; an adapter of
/// another task, a CAUSAL_LM one beside a score head, and a SEQ_CLS one without it are refused
/// naming the file.
#[test]
fn a_trl_lora_reward_adapter_scores_as_it_was_trained() {
    let d = tmp();
    let fix = fixture("llama_rm_lora");
    let (seqs, want) = rm_expected(&fix);
    for pack in [false, true] {
        close_scores(
            &rm_scores(&fix, &seqs, pack),
            &want,
            &format!("pack {pack}"),
        );
    }
    let out = p(d.path(), "rm-hf");
    export(&fix, &out, "hf");
    let cfg = config_of(&out);
    assert_eq!(
        cfg["architectures"],
        serde_json::json!(["LlamaForSequenceClassification"])
    );
    assert_eq!(cfg["pad_token_id"], expected(&fix)["pad_token_id"], "{cfg}");
    close_scores(&rm_scores(&out, &seqs, false), &want, "exported");

    // A copy of adapter `from` (its tokenizer too) with task type `task`.
    let edited = |name: &str, from: &Path, task: &str| {
        let dir = p(d.path(), name);
        copy_files(from, &dir);
        let path = dir.join("adapter_config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        v["task_type"] = task.into();
        std::fs::write(&path, v.to_string()).unwrap();
        dir
    };
    let declared = edited("declared", &fix, "SEQ_CLS");
    close_scores(&rm_scores(&declared, &seqs, false), &want, "SEQ_CLS");
    // The padding id: the adapter's tokenizer's pad_token where it names one (TRL saves the
    // one it set), and without a tokenizer beside the adapter the base's (its pad_token 301).
    let pad_of = |dir: &Path| {
        read_checkpoint(dir, &Device::Cpu)
            .unwrap()
            .meta
            .model
            .score_pad
    };
    assert_eq!(
        pad_of(&fix),
        Some(302),
        "EOS, the adapter tokenizer naming no pad"
    );
    let named = edited("named", &fix, "SEQ_CLS");
    let tc = named.join("tokenizer_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tc).unwrap()).unwrap();
    v["pad_token"] = "<|end_of_text|>".into();
    std::fs::write(&tc, v.to_string()).unwrap();
    assert_eq!(
        pad_of(&named),
        Some(301),
        "the adapter tokenizer's pad_token"
    );
    let bare = edited("bare", &fix, "SEQ_CLS");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::remove_file(bare.join(f)).unwrap();
    }
    assert_eq!(pad_of(&bare), Some(301), "the base tokenizer's pad_token");
    let err = |dir: &Path| match read_checkpoint(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    };
    for (name, from, task, says) in [
        ("tokens", fix.clone(), "TOKEN_CLS", "TOKEN_CLS"),
        ("causal", fix.clone(), "CAUSAL_LM", "score.weight"),
        ("headless", fixture("llama_lora"), "SEQ_CLS", "score head"),
    ] {
        let e = err(&edited(name, &from, task));
        assert!(e.contains("adapter_") && e.contains(says), "{name}: {e}");
    }
}

/// A chat is tokenised as transformers tokenises it: the whole rendering at once. Encoded span
/// by span, a SentencePiece tokenizer starts each span afresh: Llama 2's legacy normalizer
/// prepends a `▁` to every trained turn, and Mistral v0.3's `Metaspace` writes `▁[` for a
/// later turn's `[INST]`. Loss falls on the answers' tokens (their opening `▁` included) and
/// EOS, nothing else.
#[test]
fn a_chat_is_tokenised_whole_on_sentencepiece_tokenizers() {
    use temper::data::chat_template::ChatTemplate;
    use temper::data::records::{load_sft_templated, LossScope, SftExample};
    use temper::data::tokenizer::Tokenizer;
    use temper::stages::batch::encode_example;

    let d = tmp();
    let data = p(d.path(), "chat.jsonl");
    let turn = |role: &str, text: &str| serde_json::json!({"role": role, "content": text});
    let msgs = [
        turn("user", "hi"),
        turn("assistant", "ok"),
        turn("user", "hi"),
        turn("assistant", "ok"),
    ];
    std::fs::write(&data, serde_json::json!({ "messages": msgs }).to_string()).unwrap();
    let rendered = "<s>[INST] hi [/INST] ok</s>[INST] hi [/INST] ok</s>";
    for name in ["legacy", "metaspace"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/sentencepiece")
            .join(name);
        let tok = Tokenizer::load_dir(&dir).unwrap();
        let template = ChatTemplate::load(&dir).unwrap();
        assert_eq!(template.render(&msgs, false).unwrap(), rendered);
        let xs = load_sft_templated(&data, Some(&template), LossScope::default()).unwrap();
        let (ids, train) = encode_example(&tok, &xs[0]).unwrap();
        assert_eq!(ids, tok.encode(rendered).unwrap(), "{name}");
        let piecewise: Vec<u32> = xs[0]
            .segments
            .iter()
            .flat_map(|s| tok.encode(&s.text).unwrap())
            .collect();
        assert_ne!(
            piecewise, ids,
            "{name}: the fixture must tell the two apart"
        );
        let (ok, eos) = (tok.encode("[/INST] ok").unwrap(), tok.eos_id());
        let answer = *ok.last().unwrap();
        let trained: Vec<u32> = ids
            .iter()
            .zip(&train)
            .filter(|(_, &t)| t)
            .map(|(&i, _)| i)
            .collect();
        assert_eq!(trained, [answer, eos, answer, eos], "{name}: {train:?}");
        assert_eq!(tok.decode(&[answer]).unwrap().trim(), "ok", "{name}");
        // A token that starts in the prompt (the space before the answer) and ends in the
        // answer carries loss: else the answer's first word would teach nothing.
        let split = SftExample::prompt_response("[INST] hi [/INST] ", "ok</s>", false, None);
        let (ids, train) = encode_example(&tok, &split).unwrap();
        assert_eq!(
            ids,
            tok.encode("[INST] hi [/INST] ok</s>").unwrap(),
            "{name}"
        );
        let n = ids.len();
        assert_eq!(&ids[n - 2..], [answer, eos], "{name}");
        assert_eq!(train.iter().filter(|&&t| t).count(), 2, "{name}: {train:?}");
        assert!(train[n - 2] && train[n - 1], "{name}: {train:?}");
    }
}

/// A chat template given to a byte-level run (`--chat-template`) goes into its checkpoints as
/// `chat_template.jinja`, as it does for a Hugging Face tokenizer (the byte tokenizer has no
/// tokenizer.json, and the template's markers are plain bytes to it): the next stage renders
/// prompts with it unasked (Qwen2's `<|im_start|>`), not with the built-in template.
#[test]
fn a_byte_level_runs_chat_template_goes_into_its_checkpoints() {
    let d = tmp();
    let cfg = p(d.path(), "c.toml");
    let toml = TINY_TOML
        .replace(
            "max_position_embeddings = 64",
            "max_position_embeddings = 256",
        )
        .replace("seq_len = 48", "seq_len = 128");
    let grpo = "[grpo]\nprompts_per_rollout = 2\ngroup_size = 2\nminibatch_size = 4\nlog_completions = 2\n";
    std::fs::write(&cfg, format!("{toml}\n{grpo}")).unwrap();
    let c = cfg.to_str().unwrap();
    let pre = p(d.path(), "pre");
    pretrain_on_cpu(c, &pre, 2);
    assert!(!pre.join("final/tokenizer.json").exists());
    let (chat, prompts) = (p(d.path(), "chat.jsonl"), p(d.path(), "prompts.jsonl"));
    let (mut a, mut b) = (String::new(), String::new());
    for i in 0..12 {
        let user = format!(r#"{{"role": "user", "content": "{i}+1?"}}"#);
        a.push_str(&format!(
            "{{\"messages\": [{user}, {{\"role\": \"assistant\", \"content\": \"{}\"}}]}}\n",
            i + 1
        ));
        b.push_str(&format!(
            "{{\"prompt\": [{user}], \"answer\": \"{}\"}}\n",
            i + 1
        ));
    }
    std::fs::write(&chat, a).unwrap();
    std::fs::write(&prompts, b).unwrap();
    let qwen2 = fixture("qwen2");
    let config = std::fs::read_to_string(qwen2.join("tokenizer_config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    let template = config["chat_template"].as_str().unwrap().to_string();
    let flags = ["--config", c, "--steps", "2", "--batch-size", "4"];
    let sft = p(d.path(), "sft");
    let given = ["--chat-template", qwen2.to_str().unwrap()];
    stage_on_cpu("sft", &pre, &chat, &sft, &[&flags[..], &given[..]].concat());
    let final_dir = sft.join("final");
    let kept = std::fs::read_to_string(final_dir.join("chat_template.jinja")).unwrap();
    assert_eq!(kept, template);
    assert!(!final_dir.join("tokenizer.json").exists());
    let grpo = p(d.path(), "grpo");
    // Without --batch-size, which GRPO refuses.
    stage_on_cpu("grpo", &sft, &prompts, &grpo, &flags[..4]);
    let log = std::fs::read_to_string(grpo.join("completions.jsonl")).unwrap();
    assert!(
        log.contains("<|im_start|>user\\n")
            && log.contains("+1?<|im_end|>\\n<|im_start|>assistant\\n"),
        "{log}"
    );
    assert!(!log.contains("<|user|>"), "{log}");
    // And its checkpoints keep it in turn.
    let again = std::fs::read_to_string(grpo.join("final/chat_template.jinja")).unwrap();
    assert_eq!(again, template);
}

/// The lines of `stderr` from the error on (the log before it aside).
fn error_lines(stderr: &str) -> usize {
    let at = stderr.find("error: ").expect("an error");
    stderr[at..].trim().lines().count()
}

/// Token shards of the byte tokenizer (`temper tokenizer encode` without --tokenizer) are
/// marked as such beside them, as a BPE's have its tokenizer.json: another tokenizer over them
/// is refused in one line naming the shards, as the byte tokenizer over a BPE's shards is, and
/// the byte tokenizer trains on them.
#[test]
fn byte_shards_and_bpe_shards_each_refuse_the_others_tokenizer() {
    let d = tmp();
    let docs = p(d.path(), "docs.jsonl");
    let body: String = (0..300)
        .map(|i| {
            format!(
                "{{\"text\": \"document {i}: the quick brown fox, {}\"}}\n",
                i * 7
            )
        })
        .collect();
    std::fs::write(&docs, body).unwrap();
    let cfg = p(d.path(), "c.toml");
    std::fs::write(&cfg, TINY_TOML).unwrap();
    let gpt2 = fixture("gpt2").join("tokenizer.json");
    let encode = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "tokenizer",
            "encode",
            docs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run_ok(&args);
    };
    let pretrain = |data: &Path, out: &str, extra: &[&str]| {
        let mut args = vec![
            "pretrain".to_string(),
            "--config".to_string(),
            cfg.display().to_string(),
            "--data".to_string(),
            data.display().to_string(),
            "--out".to_string(),
            p(d.path(), out).display().to_string(),
            "--steps".to_string(),
            "2".to_string(),
            "--device".to_string(),
            "cpu".to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let sh3 = p(d.path(), "sh3");
    encode(&sh3, &[]);
    assert!(sh3.join("tokenizer.bytes").is_file() && !sh3.join("tokenizer.json").exists());
    let e = run_err(&strs(&pretrain(
        &sh3,
        "bpe-run",
        &["--tokenizer", gpt2.to_str().unwrap()],
    )));
    assert!(
        e.contains(&sh3.display().to_string())
            && e.contains("byte-level tokenizer")
            && e.contains(&gpt2.display().to_string()),
        "{e}"
    );
    assert_eq!(error_lines(&e), 1, "{e}");
    assert!(!p(d.path(), "bpe-run").join("final").exists());
    run_ok(&strs(&pretrain(&sh3, "byte-run", &[])));

    let bpe = p(d.path(), "bpe");
    encode(&bpe, &["--tokenizer", gpt2.to_str().unwrap()]);
    assert!(bpe.join("tokenizer.json").is_file() && !bpe.join("tokenizer.bytes").exists());
    let byte_run = p(d.path(), "byte-run").display().to_string();
    let e = run_err(&strs(&pretrain(&bpe, "init-run", &["--init", &byte_run])));
    assert!(
        e.contains(&bpe.display().to_string()) && e.contains("<byte 0x"),
        "{e}"
    );
    assert_eq!(error_lines(&e), 1, "{e}");
}

/// Hub names read from the Hugging Face cache, as `from_pretrained` and `load_dataset` read
/// them: a model and a dataset that `hf download` fetched, laid out as huggingface_hub lays
/// out its cache (snapshots by revision, `refs/main` naming the one in use).
#[test]
fn hub_names_are_read_from_the_hugging_face_cache() {
    let d = tmp();
    let cache = p(d.path(), "hub");
    let model = cache.join("models--org--tiny-llama");
    let snapshot = model.join("snapshots/0123abc");
    std::fs::create_dir_all(&snapshot).unwrap();
    for f in std::fs::read_dir(fixture("llama")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, snapshot.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::create_dir_all(model.join("refs")).unwrap();
    std::fs::write(model.join("refs/main"), "0123abc").unwrap();
    let data = cache.join("datasets--org--sums/snapshots/r1/data");
    std::fs::create_dir_all(&data).unwrap();
    let records: String = (0..12)
        .map(|i| {
            format!(
                "{{\"prompt\": \"{i}+1=\", \"completion\": \"{}\"}}\n",
                i + 1
            )
        })
        .collect();
    std::fs::write(data.join("train-00000-of-00001.jsonl"), records).unwrap();
    let hub = |args: &[&str]| {
        let mut c = temper();
        c.env("HF_HUB_CACHE", &cache).args(args);
        c.output().unwrap()
    };
    let out = p(d.path(), "sft");
    let run = hub(&[
        "sft",
        "--init",
        "org/tiny-llama",
        "--data",
        "org/sums",
        "--steps",
        "1",
        "--lora-rank",
        "2",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{log}");
    assert!(
        log.contains(&format!("[hub] org/tiny-llama: {}", snapshot.display())),
        "{log}"
    );
    // config.toml records the snapshots, which a resumed run reads wherever it runs.
    let saved = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(saved.contains(&snapshot.display().to_string()), "{saved}");
    assert!(
        saved.contains("datasets--org--sums/snapshots/r1"),
        "{saved}"
    );
    let gen = hub(&[
        "generate",
        "--checkpoint",
        "org/tiny-llama",
        "--prompt",
        "ab",
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
    ]);
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );
    // Resumed with the same Hub name it began from.
    let out_s = out.to_str().unwrap();
    let more = hub(&[
        "sft",
        "--resume",
        out_s,
        "--init",
        "org/tiny-llama",
        "--steps",
        "2",
        "--device",
        "cpu",
    ]);
    assert!(
        more.status.success(),
        "{}",
        String::from_utf8_lossy(&more.stderr)
    );
    // Its adapter names its base by the Hub name, which loads on any machine, and the adapter
    // is read back through the cache.
    let adapter = p(d.path(), "adapter");
    let export = hub(&[
        "export",
        "--checkpoint",
        out_s,
        "--out",
        adapter.to_str().unwrap(),
        "--format",
        "peft",
    ]);
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["base_model_name_or_path"], "org/tiny-llama");
    let gen = hub(&[
        "generate",
        "--checkpoint",
        adapter.to_str().unwrap(),
        "--prompt",
        "ab",
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
    ]);
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );
    // A name the cache does not hold says how to fetch it, in one line.
    let absent = hub(&["generate", "--checkpoint", "org/absent", "--prompt", "ab"]);
    let e = String::from_utf8_lossy(&absent.stderr);
    assert!(!absent.status.success());
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains("--checkpoint org/absent: no such file or directory, nor a model the Hugging Face cache holds")
            && e.contains("`hf download org/absent` fetches it"),
        "{e}"
    );
}
