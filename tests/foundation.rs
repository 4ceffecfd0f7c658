//! The foundation end to end: pretraining learns, a SIGKILLed run resumes onto the same
//! curve, the blocks' tape trains as candle's graph does, bad input fails with one clear line,
//! the KV cache agrees with a full forward, every parameter receives a gradient, and `temper
//! generate` samples a prompt file in batches, resumably, with chat prompts templated, a
//! run directory holds one run, and a closed stdout/stderr pipe does not end a run.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use temper::config::ModelConfig;
use temper::kernels::KernelSet;
use temper::model::linear::Ctx;
use temper::model::{Fwd, KvCache, Transformer};
use temper::train::params::{Net, ParamStore};

fn ctx() -> Ctx {
    Ctx {
        dtype: DType::F32,
        kernels: KernelSet::default(),
        use_lora: true,
        dropout_seed: None,
        neftune_alpha: None,
        tape: false,
        recompute_blocks: false,
    }
}

#[test]
fn pretrain_learns_the_builtin_task() {
    let d = tmp();
    let cfg = p(d.path(), "c.toml");
    std::fs::write(&cfg, TINY_TOML).unwrap();
    let run = p(d.path(), "run");
    run_ok(&[
        "pretrain",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--steps",
        "120",
        "--eval-every",
        "40",
        "--device",
        "cpu",
    ]);
    let val = series(&metrics(&run), "val", "loss");
    let (first, last) = (val[0].1, val.last().unwrap().1);
    let half_log_vocab = 0.5 * (258f64).ln();
    assert!(
        last < half_log_vocab && last < 0.5 * first,
        "val loss {first} -> {last}"
    );
    for key in ["loss", "lr", "grad_norm", "tokens_per_s"] {
        assert!(
            !series(&metrics(&run), "train", key).is_empty(),
            "{key} not logged"
        );
    }
    assert!(run.join("config.toml").exists() && run.join("final/model.safetensors").exists());
    // The final checkpoint generates text of the task's shape.
    let generate = |extra: &[&str]| {
        let r = run.to_str().unwrap();
        let base = [
            "generate",
            "--checkpoint",
            r,
            "--prompt",
            "12+3",
            "--device",
            "cpu",
        ];
        run_ok(&[&base[..], extra].concat())
    };
    let out = generate(&["--max-new-tokens", "12", "--temperature", "0"]);
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert!(
        v["completion"].as_str().unwrap().contains('\n')
            || v["completion"].as_str().unwrap().starts_with('=')
    );
    // With no --max-new-tokens the default fits the small model's context (64 new tokens
    // would fill all of it, and every prompt was refused).
    let out = generate(&[]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}

/// The training loop with the blocks on temper's tape (`[train] tape = "on"`, which the CPU
/// does not pick by itself) follows the curve of candle's graph: in f32 to rounding, in bf16
/// with compute copies to bf16 rounding (a tensor's several gradients may be summed in another
/// order), over accumulated micro-batches; and the tape was not set aside. With
/// `gradient_checkpointing` (which turns the tape on by itself) each block is recomputed in
/// the backward, and the curve is the tape's.
#[test]
fn the_block_tape_trains_as_candles_graph() {
    let d = tmp();
    let run = |name: &str, dtype: &str, extra: &str, taped: bool| {
        let cfg = p(d.path(), &format!("{name}.toml"));
        let toml = format!("{TINY_TOML}grad_accum = 2\n{extra}\n");
        std::fs::write(&cfg, toml).unwrap();
        let out = p(d.path(), name);
        let o = run_ok(&[
            "pretrain",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "10",
            "--eval-every",
            "10",
            "--log-every",
            "1",
            "--dtype",
            dtype,
            "--device",
            "cpu",
        ]);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!err.contains("tape is off"), "{name}: {err}");
        let on = err.contains("the forward runs on temper's tape");
        assert_eq!(on, taped, "{name}: whether the tape ran\n{err}");
        // "... holding X MiB of outputs"
        let held = err.split("holding ").nth(1).map(|r| {
            let mib = r.split_whitespace().next().unwrap();
            mib.parse::<f64>().unwrap()
        });
        (series(&metrics(&out), "train", "loss"), held)
    };
    for (dtype, tol) in [("f32", 1e-4), ("bf16", 1e-2)] {
        let (taped, full) = run(&format!("{dtype}-tape"), dtype, "tape = \"on\"", true);
        let (graph, _) = run(&format!("{dtype}-graph"), dtype, "tape = \"off\"", false);
        let (recomputed, kept) = run(
            &format!("{dtype}-recompute"),
            dtype,
            "gradient_checkpointing = true",
            true,
        );
        let (full, kept) = (full.unwrap(), kept.unwrap());
        assert!(
            kept < full,
            "{dtype}: recomputed blocks hold {kept} MiB, the tape {full}"
        );
        assert_eq!(taped.len(), 10);
        for (((s, a), (_, b)), (_, c)) in taped.iter().zip(&graph).zip(&recomputed) {
            assert!(
                (a - b).abs() <= tol * b.abs(),
                "{dtype} step {s}: {a} on the tape, {b} in candle's graph"
            );
            assert!(
                (a - c).abs() <= 1e-3 * tol * a.abs(),
                "{dtype} step {s}: {a} on the tape, {c} recomputed"
            );
        }
        assert!(
            taped[9].1 < taped[0].1 - 0.3,
            "{dtype}: no learning on the tape: {taped:?}"
        );
    }
    let cfg = p(d.path(), "bad.toml");
    let toml = format!("{TINY_TOML}gradient_checkpointing = true\ntape = \"off\"\n");
    std::fs::write(&cfg, toml).unwrap();
    let e = run_err(&[
        "pretrain",
        "--config",
        cfg.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(
        e.contains("train.gradient_checkpointing") && e.trim().lines().count() == 1,
        "{e}"
    );
}

/// Starts `temper args` writing its run to `out` and SIGKILLs it once a checkpoint of step
/// `step` or later is in place.
fn kill_at_checkpoint(args: &[String], out: &Path, step: usize) {
    let mut child = temper().args(args).spawn().unwrap();
    let latest = out.join("checkpoints/latest");
    let want = format!("step-{step:07}");
    wait_until(300, "no checkpoint appeared", || {
        std::fs::read_to_string(&latest).is_ok_and(|s| s.trim() >= want.as_str())
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

/// bf16 compute trains the f32 masters through bf16 compute copies that AdamW rewrites
/// (`train.compute_copies`, on by default): the curve is the one of casting every master in
/// every step, to the last bits the tied embedding's two gradients may sum in another order
/// in, over accumulated micro-batches too; and a run killed and resumed rebuilds its copies from
/// the checkpoint's masters and continues the same curve exactly.
#[test]
fn bf16_compute_copies_follow_the_casts_and_resume_exactly() {
    let d = tmp();
    let write = |name: &str, extra: &str| {
        let cfg = p(d.path(), name);
        std::fs::write(&cfg, format!("{TINY_TOML}grad_accum = 2\n{extra}")).unwrap();
        cfg
    };
    let (copies, casts) = (
        write("c.toml", ""),
        write("n.toml", "compute_copies = false\n"),
    );
    let args = |cfg: &Path, out: &Path| -> Vec<String> {
        [
            "pretrain",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "12",
            "--checkpoint-every",
            "4",
            "--eval-every",
            "4",
            "--log-every",
            "1",
            "--dtype",
            "bf16",
            "--device",
            "cpu",
        ]
        .map(String::from)
        .to_vec()
    };
    // The losses, and how many weights the forward read as copies (from the run's report).
    let run = |cfg: &Path, name: &str| {
        let out = p(d.path(), name);
        let a = args(cfg, &out);
        let o = run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        let read: usize = err
            .lines()
            .find(|l| l.contains("parameter tensors are read as bf16 compute copies"))
            .and_then(|l| l.split(']').nth(1)?.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        (series(&metrics(&out), "train", "loss"), read)
    };
    let (with, read) = run(&copies, "copies");
    let (without, none) = run(&casts, "casts");
    assert!(
        read > 0 && none == 0,
        "{read} weights read as copies, {none} with them off"
    );
    assert_eq!(with.len(), 12);
    for ((s, a), (_, b)) in with.iter().zip(&without) {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs(),
            "step {s}: {a} with copies, {b} without"
        );
    }
    assert!(
        with[11].1 < with[0].1 - 0.5,
        "bf16 training did not learn: {with:?}"
    );

    let cut = p(d.path(), "cut");
    kill_at_checkpoint(&args(&copies, &cut), &cut, 4);
    run_ok(&["pretrain", "--resume", cut.to_str().unwrap()]);
    assert_eq!(
        series(&metrics(&cut), "train", "loss"),
        with,
        "the resumed curve differs from the uninterrupted one"
    );
}

#[test]
fn sigkill_then_resume_continues_the_same_curve() {
    let d = tmp();
    let cfg = p(d.path(), "c.toml");
    std::fs::write(&cfg, TINY_TOML).unwrap();
    let args = |out: &str| {
        vec![
            "pretrain".to_string(),
            "--config".into(),
            cfg.to_str().unwrap().into(),
            "--out".into(),
            out.into(),
            "--steps".into(),
            "30".into(),
            "--checkpoint-every".into(),
            "10".into(),
            "--eval-every".into(),
            "10".into(),
            // The checkpoint at 10 falls inside a logging window (8..12): the resumed run
            // averages the window's steps from before the stop too.
            "--log-every".into(),
            "4".into(),
            "--device".into(),
            "cpu".into(),
        ]
    };
    let full = p(d.path(), "full");
    run_ok(
        &args(full.to_str().unwrap())
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );

    let cut = p(d.path(), "cut");
    kill_at_checkpoint(&args(cut.to_str().unwrap()), &cut, 10);
    run_ok(&["pretrain", "--resume", cut.to_str().unwrap()]);
    let a = series(&metrics(&full), "train", "loss");
    let b = series(&metrics(&cut), "train", "loss");
    assert_eq!(a.len(), 8);
    assert_eq!(a, b, "the resumed curve differs from the uninterrupted one");
    assert_eq!(
        series(&metrics(&full), "val", "loss"),
        series(&metrics(&cut), "val", "loss")
    );

    // With no checkpoint to resume from, the run starts over: its step-0 evaluation is
    // logged once, not after the one the stopped run logged.
    std::fs::remove_dir_all(cut.join("checkpoints")).unwrap();
    std::fs::remove_dir_all(cut.join("final")).unwrap();
    let o = run_ok(&["pretrain", "--resume", cut.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing to resume"));
    let m = metrics(&cut);
    assert_eq!(
        series(&m, "val", "loss"),
        series(&metrics(&full), "val", "loss")
    );
    assert_eq!(series(&m, "train", "loss"), a);
}

#[test]
fn bad_input_ends_with_one_clear_line() {
    let d = tmp();
    let dir = d.path();
    // --resume names what the path is, where it is no run directory; generate's --out is a
    // file, never a directory.
    let file = p(dir, "afile");
    std::fs::write(&file, "x").unwrap();
    for (path, says) in [
        (p(dir, "nosuch"), "does not exist"),
        (file, "is a file, not a run directory"),
        (
            dir.to_path_buf(),
            "no config.toml there (not a run directory)",
        ),
    ] {
        let e = run_err(&["sft", "--resume", path.to_str().unwrap()]);
        assert!(
            e.contains(&format!("--resume {}: {says}", path.display())),
            "{e}"
        );
    }
    let llama = fixture("llama");
    let gen = ["generate", "--checkpoint", &llama, "--prompt", "a", "--out"];
    let e = run_err(&[&gen[..], &[dir.to_str().unwrap(), "--device", "cpu"]].concat());
    assert!(e.contains("is a directory; name the JSONL file"), "{e}");
    let missing = p(dir, "nope.txt");
    let e = run_err(&[
        "pretrain",
        "--data",
        missing.to_str().unwrap(),
        "--out",
        p(dir, "r1").to_str().unwrap(),
    ]);
    assert!(e.contains("nope.txt"), "{e}");
    let empty = p(dir, "empty.txt");
    std::fs::write(&empty, "").unwrap();
    let e = run_err(&[
        "pretrain",
        "--data",
        empty.to_str().unwrap(),
        "--out",
        p(dir, "r2").to_str().unwrap(),
    ]);
    assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");
    let bad = p(dir, "bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{\"txt\": \"oops\"}\n").unwrap();
    let e = run_err(&[
        "pretrain",
        "--data",
        bad.to_str().unwrap(),
        "--out",
        p(dir, "r3").to_str().unwrap(),
    ]);
    assert!(e.contains("bad.jsonl:2") && e.contains("text"), "{e}");
    std::fs::write(&bad, "{\"text\": \"fine\"}\nnot json\n").unwrap();
    let e = run_err(&[
        "pretrain",
        "--data",
        bad.to_str().unwrap(),
        "--out",
        p(dir, "r4").to_str().unwrap(),
    ]);
    assert!(e.contains("bad.jsonl:2"), "{e}");
    let cfg = p(dir, "c.toml");
    std::fs::write(
        &cfg,
        "[model]\nhidden_size = 100\nnum_attention_heads = 3\n",
    )
    .unwrap();
    let e = run_err(&[
        "pretrain",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        p(dir, "r5").to_str().unwrap(),
    ]);
    assert!(
        e.contains("num_attention_heads") && e.contains("hidden_size"),
        "{e}"
    );
    std::fs::write(&cfg, "[train]\nstepz = 3\n").unwrap();
    let e = run_err(&[
        "pretrain",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        p(dir, "r6").to_str().unwrap(),
    ]);
    assert!(e.contains("c.toml:2") && e.contains("stepz"), "{e}");
    // A value no stage would take is refused by line, in a table this stage does not read
    // too; another stage's config.toml (which names its stage, and its --init) is refused.
    for (i, (body, want)) in [
        (
            "[train]\nadam_eps = -1e-8\n",
            "c.toml:2: train.adam_eps must be 0 or more",
        ),
        (
            "[train]\nlr = 1e-3\n[dpo]\nbeta = -1\n",
            "c.toml:4: dpo.beta must be positive",
        ),
        (
            "[data]\ntask_carry_slip = 2\n",
            "c.toml:2: data.task_carry_slip must be",
        ),
        (
            "[train]\nsteps = 3\nlr = \"fast\"\n",
            "c.toml:3: train.lr: invalid type: string \"fast\", expected a number",
        ),
        (
            "[train]\nbatch_size = -2\n",
            "c.toml:2: train.batch_size: invalid value",
        ),
        (
            "stage = \"sft\"\n\n[train]\nsteps = 3\n",
            "c.toml:1: stage = \"sft\": the config.toml of a sft run",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        std::fs::write(&cfg, body).unwrap();
        let out = p(dir, &format!("r7-{i}"));
        let args = ["pretrain", "--config", cfg.to_str().unwrap(), "--out"];
        let e = run_err(&[&args[..], &[out.to_str().unwrap()]].concat());
        assert!(e.contains(want), "{body}: {e}");
    }
}

fn tiny(cfg: &mut ModelConfig) -> (ParamStore, Transformer) {
    cfg.hidden_size = 32;
    cfg.intermediate_size = 64;
    cfg.num_hidden_layers = 2;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = 2;
    cfg.max_position_embeddings = 32;
    let mut store = ParamStore::new(Device::Cpu, 3);
    let net = Transformer::new(&mut store.scope(Net::Policy), cfg, None).unwrap();
    (store, net)
}

#[test]
fn kv_cache_gives_the_logits_of_a_full_forward() {
    for preset in ["tiny", "gpt2"] {
        let mut cfg = ModelConfig::preset(preset).unwrap();
        cfg.vocab_size = 50;
        let (_s, net) = tiny(&mut cfg);
        let ids: Vec<u32> = (0..11).map(|i| (i * 7 + 3) % 50).collect();
        let full_ids = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let f = Fwd {
            ctx: ctx(),
            positions: None,
            key_valid: None,
            segments: None,
        };
        let full = net.forward(&full_ids, &f, None).unwrap();
        let mut cache = KvCache::new(net.num_layers());
        let mut parts = vec![net
            .forward(&full_ids.narrow(1, 0, 5).unwrap(), &f, Some(&mut cache))
            .unwrap()];
        for t in 5..11 {
            parts.push(
                net.forward(&full_ids.narrow(1, t, 1).unwrap(), &f, Some(&mut cache))
                    .unwrap(),
            );
        }
        let inc = Tensor::cat(&parts, 1).unwrap();
        let diff = max_abs_diff(&full, &inc);
        assert!(diff < 1e-4, "{preset}: KV-cache logits differ by {diff}");
    }
}

/// NEFTune's noise reaches a training forward (one with a seed) and no other: a forward
/// without a seed, as evaluation and generation run, gives the plain logits; two seeds give
/// two noises.
#[test]
fn neftune_noise_reaches_training_forwards_alone() {
    let mut cfg = ModelConfig::default();
    let (_s, net) = tiny(&mut cfg);
    let ids = Tensor::new(&[[3u32, 9, 4, 1, 7]], &Device::Cpu).unwrap();
    let logits = |neftune_alpha, dropout_seed| {
        let f = Fwd {
            ctx: Ctx {
                neftune_alpha,
                dropout_seed,
                ..ctx()
            },
            positions: None,
            key_valid: None,
            segments: None,
        };
        net.forward(&ids, &f, None).unwrap()
    };
    let plain = logits(None, None);
    assert_eq!(max_abs_diff(&plain, &logits(Some(5.0), None)), 0.0);
    let (a, b) = (logits(Some(5.0), Some(1)), logits(Some(5.0), Some(2)));
    assert!(max_abs_diff(&plain, &a) > 1e-4);
    assert!(max_abs_diff(&a, &b) > 1e-4);
    assert_eq!(max_abs_diff(&a, &logits(Some(5.0), Some(1))), 0.0);
}

#[test]
fn left_padded_generation_matches_unpadded() {
    let mut cfg = ModelConfig::default();
    let (_s, net) = tiny(&mut cfg);
    let tok = temper::data::tokenizer::Tokenizer::bytes();
    let greedy = temper::generate::SampleCfg {
        max_new_tokens: 6,
        temperature: 0.0,
        ..Default::default()
    };
    let short = tok.encode("ab").unwrap();
    let long = tok.encode("hello there").unwrap();
    let keys = temper::generate::RowKeys::range(0, 0, 2);
    let both =
        temper::generate::generate(&net, ctx(), &tok, &[short.clone(), long], &greedy, &keys)
            .unwrap();
    let one = temper::generate::RowKeys::range(0, 0, 1);
    let alone = temper::generate::generate(&net, ctx(), &tok, &[short], &greedy, &one).unwrap();
    assert_eq!(both.tokens[0], alone.tokens[0]);
}

#[test]
fn every_parameter_receives_a_gradient() {
    for preset in ["tiny", "gpt2"] {
        let mut cfg = ModelConfig::preset(preset).unwrap();
        cfg.vocab_size = 40;
        cfg.tie_word_embeddings = preset == "tiny";
        let (store, net) = tiny(&mut cfg);
        let ids = Tensor::new(&[[1u32, 5, 9, 2, 7, 3]], &Device::Cpu).unwrap();
        let f = Fwd {
            ctx: ctx(),
            positions: None,
            key_valid: None,
            segments: None,
        };
        let logits = net
            .forward(&ids.narrow(1, 0, 5).unwrap(), &f, None)
            .unwrap();
        let mask = Tensor::ones((1, 5), DType::F32, &Device::Cpu).unwrap();
        let loss = temper::train::loss::cross_entropy(
            &logits,
            &ids.narrow(1, 1, 5).unwrap(),
            &mask,
            temper::kernels::KernelChoice::Custom,
        )
        .unwrap();
        let grads = loss.backward().unwrap();
        for (name, var, _) in store.iter() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{preset}: {name} has no gradient"));
            let n = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0, "{preset}: {name} has a zero gradient");
        }
    }
}

/// A Hugging Face fixture model (tests/fixtures/hf/), as `temper generate --checkpoint` takes it.
fn fixture(family: &str) -> String {
    format!("{}/tests/fixtures/hf/{family}", env!("CARGO_MANIFEST_DIR"))
}

/// `temper generate --prompts FILE` with `extra` flags, the completions' lines parsed.
fn generate_lines(checkpoint: &str, prompts: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec![
        "generate",
        "--checkpoint",
        checkpoint,
        "--prompts",
        prompts.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    let out = run_ok(&args);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `temper generate` samples as the checkpoint's generation_config.json asks where no flag
/// says otherwise (transformers' and vLLM's defaults): greedy where `do_sample` is false; its
/// temperature and top-k where it gives them; a flag wins over it.
#[test]
fn generate_takes_its_sampling_defaults_from_the_generation_config() {
    let d = tmp();
    let model = p(d.path(), "llama");
    copy_files(Path::new(&fixture("llama")), &model);
    let prompts = p(d.path(), "prompts.jsonl");
    let lines: String = (0..4)
        .map(|i| format!("{{\"prompt\": \"{i} plus {i} is\"}}\n"))
        .collect();
    std::fs::write(&prompts, lines).unwrap();
    let gen = model.join("generation_config.json");
    let with_config = |extra: serde_json::Value| {
        let mut v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                PathBuf::from(fixture("llama")).join("generation_config.json"),
            )
            .unwrap(),
        )
        .unwrap();
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        std::fs::write(&gen, v.to_string()).unwrap();
    };
    let texts = |extra: &[&str]| -> Vec<String> {
        let mut flags = vec!["--max-new-tokens", "6", "--seed", "3"];
        flags.extend_from_slice(extra);
        generate_lines(model.to_str().unwrap(), &prompts, &flags)
            .iter()
            .map(|l| l["completion"].as_str().unwrap().to_string())
            .collect()
    };
    let greedy = texts(&["--temperature", "0"]);
    let sampled = texts(&["--temperature", "1.5", "--top-k", "40"]);
    assert_ne!(
        greedy, sampled,
        "the test needs sampling to differ from greedy"
    );
    with_config(serde_json::json!({"do_sample": false, "temperature": 1.5}));
    assert_eq!(texts(&[]), greedy, "do_sample false is greedy");
    with_config(serde_json::json!({"do_sample": true, "temperature": 1.5, "top_k": 40}));
    assert_eq!(texts(&[]), sampled, "the config's temperature and top_k");
    assert_eq!(texts(&["--temperature", "0"]), greedy, "a flag wins");
}

/// A copy `name` beside the completions file `full`, as an interruption leaves one: its first
/// `keep` lines and half of the next, with `full`'s settings file. Returns its path and text.
fn cut_short(full: &Path, name: &str, keep: usize) -> (PathBuf, String) {
    let text = std::fs::read_to_string(full).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let partial = format!(
        "{}\n{}",
        lines[..keep].join("\n"),
        &lines[keep][..lines[keep].len() / 2]
    );
    let cut = full.with_file_name(name);
    std::fs::write(&cut, &partial).unwrap();
    let settings = |p: &Path| {
        let mut n = p.file_name().unwrap().to_os_string();
        n.push(".settings.json");
        p.with_file_name(n)
    };
    std::fs::copy(settings(full), settings(&cut)).unwrap();
    (cut, partial)
}

/// Seven prompts with an id each, as a prompts file in `dir`.
fn numbered_prompts(dir: &Path) -> PathBuf {
    let path = p(dir, "prompts.jsonl");
    let body: String = (1..=7)
        .map(|i| format!("{{\"prompt\": \"{i}+{}=\", \"id\": {i}}}\n", 2 * i))
        .collect();
    std::fs::write(&path, body).unwrap();
    path
}

/// `temper generate` runs a prompt file through the engine in batches of rows: the
/// completions, drawn `--samples` per prompt, do not depend on the batch size or on how the
/// prompts are split between processes (`--shard`), and each line keeps its record's fields.
#[test]
fn generated_completions_do_not_depend_on_the_batch_size() {
    let d = tmp();
    let prompts = numbered_prompts(d.path());
    let gpt2 = fixture("gpt2");
    let flags = |batch: &'static str| {
        [
            "--samples",
            "3",
            "--max-new-tokens",
            "6",
            "--temperature",
            "1",
            "--seed",
            "5",
            "--batch-size",
            batch,
        ]
    };
    let whole = generate_lines(&gpt2, &prompts, &flags("64"));
    let batched = generate_lines(&gpt2, &prompts, &flags("4"));
    assert_eq!(whole.len(), 21);
    assert_eq!(whole, batched);
    for (r, line) in whole.iter().enumerate() {
        assert_eq!(line["id"], (r / 3 + 1) as u64, "{line}");
        assert_eq!(line["sample"], (r % 3) as u64, "{line}");
        let reason = line["finish_reason"].as_str().unwrap();
        assert!(reason == "stop" || reason == "length", "{line}");
    }
    // Three processes, each with its --shard of the prompts: their files, concatenated in
    // order, are the one-process output.
    let mut parts = vec![];
    for k in 0..3 {
        let out = p(d.path(), &format!("part-{k}.jsonl"));
        let shard = format!("{k}/3");
        let mut extra: Vec<&str> = flags("4").to_vec();
        extra.extend(["--shard", &shard, "--out", out.to_str().unwrap()]);
        assert!(generate_lines(&gpt2, &prompts, &extra).is_empty());
        let text = std::fs::read_to_string(&out).unwrap();
        parts.extend(
            text.lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()),
        );
    }
    assert_eq!(parts, whole);
    // The samples of a prompt are draws of their own, not one draw three times.
    let texts = |r: usize| whole[r]["completion"].as_str().unwrap().to_string();
    assert!(
        (0..7).any(|i| texts(3 * i) != texts(3 * i + 1) || texts(3 * i) != texts(3 * i + 2)),
        "{whole:?}"
    );
}

/// An `--out` file cut short (mid-batch, its last line half-written) is continued by
/// `--resume` to the file an uninterrupted run writes. Without `--resume` it is left alone; a
/// resume with other prompts or other settings, over a line that is no completion, or into the
/// prompts file itself is refused in one line and leaves the file as it was. A prompt too long
/// for the model fails before anything is written, naming its line.
#[test]
fn an_interrupted_generation_resumes_after_its_last_complete_line() {
    let d = tmp();
    let prompts = numbered_prompts(d.path());
    let gpt2 = fixture("gpt2");
    let run = |out: &Path, prompts: &Path, extra: &[&str]| {
        let (out, prompts) = (out.to_str().unwrap(), prompts.to_str().unwrap());
        let mut args = vec![
            "generate",
            "--checkpoint",
            &gpt2,
            "--prompts",
            prompts,
            "--out",
            out,
            "--samples",
            "2",
            "--batch-size",
            "4",
            "--max-new-tokens",
            "5",
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let ok = |args: Vec<String>| run_ok(&strs(&args));
    let err = |args: Vec<String>| run_err(&strs(&args));

    let full = p(d.path(), "full.jsonl");
    ok(run(&full, &prompts, &[]));
    let text = std::fs::read_to_string(&full).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 14);

    // Seven complete lines (batches of four rows: the cut is inside the second) and half of
    // the eighth.
    let (cut, partial) = cut_short(&full, "cut.jsonl", 7);
    let untouched = |e: &str| {
        // One line of error (a warning about a setting may precede it).
        let said = e.trim().lines().filter(|l| !l.starts_with("warning: "));
        assert_eq!(said.count(), 1, "{e}");
        assert_eq!(
            std::fs::read_to_string(&cut).unwrap(),
            partial,
            "the file was touched"
        );
    };
    let e = err(run(&cut, &prompts, &[]));
    assert!(e.contains("cut.jsonl") && e.contains("--resume"), "{e}");
    untouched(&e);
    let e = err(run(&cut, &prompts, &["--resume", "--seed", "9"]));
    assert!(e.contains("cut.jsonl.settings.json: field seed"), "{e}");
    untouched(&e);
    let e = err(run(
        &cut,
        &prompts,
        &["--resume", "--repetition-penalty", "1.2"],
    ));
    assert!(
        e.contains("settings.json: field repetition_penalty: nothing when"),
        "{e}"
    );
    untouched(&e);
    let e = err(run(&cut, &prompts, &["--resume", "--min-p", "1.5"]));
    assert!(e.contains("--min-p must be in [0, 1]"), "{e}");
    untouched(&e);
    for t in ["nan", "-1", "inf"] {
        let e = err(run(
            &cut,
            &prompts,
            &["--resume", &format!("--temperature={t}")],
        ));
        assert!(e.contains("--temperature must be 0 (greedy)"), "{e}");
        untouched(&e);
    }
    // The filters run (on the CPU reference here) and are recorded for a resume.
    let filtered = p(d.path(), "filtered.jsonl");
    let flags = ["--repetition-penalty", "1.3", "--min-p", "0.05"];
    ok(run(&filtered, &prompts, &flags));
    assert_eq!(
        std::fs::read_to_string(&filtered).unwrap().lines().count(),
        14
    );
    let meta = std::fs::read_to_string(p(d.path(), "filtered.jsonl.settings.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(meta["repetition_penalty"], 1.3);
    assert_eq!(meta["min_p"], 0.05);
    let quiet = [
        "--resume",
        "--chat-template-kwargs",
        r#"{"enable_thinking": false}"#,
    ];
    let e = err(run(&cut, &prompts, &quiet));
    assert!(
        e.contains("settings.json: field chat_template_kwargs"),
        "{e}"
    );
    untouched(&e);
    let other = p(d.path(), "other.jsonl");
    std::fs::write(&other, "{\"prompt\": \"something else\"}\n").unwrap();
    let e = err(run(&cut, &other, &["--resume"]));
    assert!(
        e.contains("cut.jsonl:1") && e.contains("field prompt"),
        "{e}"
    );
    untouched(&e);
    let e = err(run(&prompts, &prompts, &["--resume"]));
    assert!(e.contains("also the prompts file"), "{e}");

    let o = ok(run(&cut, &prompts, &["--resume"]));
    assert!(String::from_utf8_lossy(&o.stderr).contains("resumed after 7"));
    assert_eq!(std::fs::read_to_string(&cut).unwrap(), text);

    // A file whose lines are no completions (a prompts file, say) is not resumed over.
    let notes = p(d.path(), "notes.jsonl");
    std::fs::copy(&prompts, &notes).unwrap();
    std::fs::copy(
        p(d.path(), "full.jsonl.settings.json"),
        p(d.path(), "notes.jsonl.settings.json"),
    )
    .unwrap();
    let e = err(run(&notes, &prompts, &["--resume"]));
    assert!(e.contains("notes.jsonl:1: field completion"), "{e}");
    assert_eq!(
        std::fs::read(&notes).unwrap(),
        std::fs::read(&prompts).unwrap()
    );

    let long = p(d.path(), "long.jsonl");
    let big = "9".repeat(2000);
    std::fs::write(
        &long,
        format!("{{\"prompt\": \"1\"}}\n{{\"prompt\": \"{big}\"}}\n"),
    )
    .unwrap();
    let fresh = p(d.path(), "fresh.jsonl");
    let e = err(run(&fresh, &long, &[]));
    assert!(
        e.contains("long.jsonl:2: field \"prompt\"") && e.contains("context"),
        "{e}"
    );
    assert!(std::fs::read_to_string(&fresh)
        .unwrap_or_default()
        .is_empty());
}

/// `temper generate --reward` scores every completion into its line (the weighted sum and each
/// source's score); `--best-of` writes only each prompt's best-scored sample, the first of
/// equals, which is the same completion the unfiltered run drew for that row; an interrupted
/// best-of file resumes to the uninterrupted one, and neither a file begun without the reward
/// nor a best-of run without a reward or without several samples is accepted. The checker
/// needs every prompt's `answer`, and says which line lacks it.
#[test]
fn generate_scores_completions_and_keeps_the_best_of_each_prompts_samples() {
    let d = tmp();
    let prompts = numbered_prompts(d.path());
    let gpt2 = fixture("gpt2");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/varied_reward.py");
    let reward = format!("cmd:python3 {}", script.display());
    let flags = [
        "--samples",
        "3",
        "--max-new-tokens",
        "6",
        "--temperature",
        "1",
        "--seed",
        "5",
        "--batch-size",
        "6",
        "--reward",
        reward.as_str(),
    ];
    let all = generate_lines(&gpt2, &prompts, &flags);
    assert_eq!(all.len(), 21);
    for line in &all {
        let text = line["completion"].as_str().unwrap();
        let distinct = text.chars().collect::<std::collections::HashSet<_>>().len();
        let r = line["reward"].as_f64().unwrap();
        assert!((r - distinct as f64 / 10.0).abs() < 1e-9, "{line}");
        let by = line["rewards"].as_object().unwrap();
        assert_eq!(by.len(), 1, "{line}");
        assert_eq!(by.values().next().unwrap().as_f64(), Some(r), "{line}");
    }
    let mut best_flags = flags.to_vec();
    best_flags.push("--best-of");
    let best = generate_lines(&gpt2, &prompts, &best_flags);
    assert_eq!(best.len(), 7);
    let mut some_not_first = false;
    for (i, line) in best.iter().enumerate() {
        let group = &all[3 * i..3 * i + 3];
        let score = |l: &serde_json::Value| l["reward"].as_f64().unwrap();
        let top = (1..3).fold(0, |b, j| {
            if score(&group[j]) > score(&group[b]) {
                j
            } else {
                b
            }
        });
        assert_eq!(line, &group[top], "prompt {i}");
        some_not_first |= top > 0;
    }
    assert!(some_not_first, "every best sample was the first: {all:?}");

    // A best-of file cut after three lines and half a fourth resumes to the whole file.
    let run = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--checkpoint",
            gpt2.as_str(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ];
        a.extend(extra);
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let full = p(d.path(), "best.jsonl");
    run_ok(&strs(&run(&full, &best_flags)));
    let text = std::fs::read_to_string(&full).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 7);
    let (cut, partial) = cut_short(&full, "cut.jsonl", 3);
    // Resumed without the reward: refused, the file untouched.
    let mut unscored = flags[..10].to_vec();
    unscored.push("--resume");
    let e = run_err(&strs(&run(&cut, &unscored)));
    assert!(
        e.contains("cut.jsonl.settings.json: field") && e.contains("when"),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(&cut).unwrap(), partial);
    let mut resume = best_flags.clone();
    resume.push("--resume");
    let o = run_ok(&strs(&run(&cut, &resume)));
    assert!(String::from_utf8_lossy(&o.stderr).contains("resumed after 3 completions"));
    assert_eq!(std::fs::read_to_string(&cut).unwrap(), text);

    let e = run_err(&strs(&run(
        &p(d.path(), "x.jsonl"),
        &["--samples", "3", "--best-of"],
    )));
    assert!(e.contains("--best-of") && e.contains("--reward"), "{e}");
    let e = run_err(&strs(&run(
        &p(d.path(), "y.jsonl"),
        &["--reward", reward.as_str(), "--best-of"],
    )));
    assert!(e.contains("--samples 2 or more"), "{e}");
    let e = run_err(&strs(&run(&p(d.path(), "z.jsonl"), &["--reward", "task"])));
    assert!(
        e.contains("prompts.jsonl:1") && e.contains("\"answer\""),
        "{e}"
    );
}

/// A prompt given as chat messages is rendered with the checkpoint's chat template (its
/// tokenizer_config.json), or with `--chat-template` when given (and the variables of
/// `--chat-template-kwargs`), and then generates what that rendering as a plain prompt
/// generates.
#[test]
fn chat_prompts_are_rendered_with_the_checkpoints_template() {
    use temper::data::chat_template::ChatTemplate;
    let d = tmp();
    let qwen = fixture("qwen2");
    let msgs = serde_json::json!([{"role": "user", "content": "What is 2+3?"}]);
    let chat = p(d.path(), "chat.jsonl");
    std::fs::write(&chat, format!("{}\n", serde_json::json!({"prompt": msgs}))).unwrap();
    let jinja = p(d.path(), "mine.jinja");
    // With thinking off it adds text the random fixture model continues differently.
    std::fs::write(
        &jinja,
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>\
         {% if enable_thinking is defined and not enable_thinking %} 7 9 {% endif %}",
    )
    .unwrap();
    let quiet = r#"{"enable_thinking": false}"#;
    let rendered_with = |template: &Path, kwargs: &str| {
        let kwargs = temper::data::chat_template::parse_kwargs(kwargs).unwrap();
        let t = ChatTemplate::load(template)
            .unwrap()
            .with_kwargs(&kwargs)
            .unwrap();
        t.render(msgs.as_array().unwrap(), true).unwrap()
    };
    let rendered = |template: &Path| rendered_with(template, "{}");
    let greedy = ["--temperature", "0", "--max-new-tokens", "8"];
    let completion = |prompts: &Path, extra: &[&str]| {
        let mut flags = greedy.to_vec();
        flags.extend_from_slice(extra);
        let lines = generate_lines(&qwen, prompts, &flags);
        lines[0]["completion"].as_str().unwrap().to_string()
    };
    let plain = |text: String| {
        let path = p(d.path(), "plain.jsonl");
        std::fs::write(
            &path,
            format!("{}\n", serde_json::json!({ "prompt": text })),
        )
        .unwrap();
        completion(&path, &[])
    };
    let own = plain(rendered(
        &PathBuf::from(&qwen).join("tokenizer_config.json"),
    ));
    let mine = plain(rendered(&jinja));
    let builtin = plain(temper::data::records::render_chat_prompt(&[(
        "user",
        "What is 2+3?",
    )]));
    // The three renderings must generate apart for this test to tell them apart.
    assert!(
        own != mine && own != builtin && mine != builtin,
        "{own:?} {mine:?} {builtin:?}"
    );
    assert_eq!(completion(&chat, &[]), own);
    assert_eq!(
        completion(&chat, &["--chat-template", jinja.to_str().unwrap()]),
        mine
    );
    let mine_quiet = plain(rendered_with(&jinja, quiet));
    assert_ne!(
        mine_quiet, mine,
        "the variable must change what is generated"
    );
    let flags = ["--chat-template", jinja.to_str().unwrap()];
    let with_kwargs = [&flags[..], &["--chat-template-kwargs", quiet]].concat();
    assert_eq!(completion(&chat, &with_kwargs), mine_quiet);
}

/// `temper tokenizer encode` writes a corpus as token shards once, and pretraining on them
/// (memory-mapped, no tokenizing) learns as it does from the text: held-out loss halves. The
/// tokenizer travels with the shards, and a run with another (named, or an --init model's) is
/// refused naming both files; without it, a shard's id past the fallback byte tokenizer fails
/// the run naming the shard.
#[test]
fn pretraining_learns_from_token_shards() {
    let d = tmp();
    let docs = temper::data::synthetic::Synthetic::new(0).pretrain_documents(600);
    let corpus = p(d.path(), "corpus.jsonl");
    let body: String = docs
        .iter()
        .map(|t| format!("{}\n", serde_json::json!({ "text": t })))
        .collect();
    std::fs::write(&corpus, body).unwrap();
    let cfg = p(d.path(), "c.toml");
    std::fs::write(&cfg, TINY_TOML).unwrap();
    let (corpus, cfg) = (corpus.to_str().unwrap(), cfg.to_str().unwrap());

    let shards = p(d.path(), "shards");
    let s = shards.to_str().unwrap();
    let enc = run_ok(&[
        "tokenizer",
        "encode",
        corpus,
        "--out",
        s,
        "--shard-tokens",
        "20000",
    ]);
    // "... N train / M val tokens (...)" from encode, "N train / M val tokens" from pretrain.
    let counts = |text: &str| {
        let at = text.find(" val tokens").expect("a token count line");
        let words: Vec<&str> = text[..at].split_whitespace().rev().take(4).collect();
        (words[3].to_string(), words[0].to_string())
    };
    let encoded = counts(&String::from_utf8_lossy(&enc.stdout));
    assert!(shards.join("train_000001.bin").exists() && shards.join("val_000000.bin").exists());
    let run = p(d.path(), "run");
    let r = run.to_str().unwrap();
    let o = run_ok(&[
        "pretrain",
        "--config",
        cfg,
        "--data",
        s,
        "--out",
        r,
        "--steps",
        "100",
        "--eval-every",
        "50",
        "--device",
        "cpu",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("(memory-mapped)"), "{err}");
    assert_eq!(
        counts(&err),
        encoded,
        "pretraining read other splits than encode wrote"
    );
    let val = series(&metrics(&run), "val", "loss");
    let (first, last) = (val[0].1, val.last().unwrap().1);
    assert!(last < 0.5 * first, "val loss {first} -> {last}");

    // Validation shards shorter than a window: the training stream's tail is held out.
    let short = p(d.path(), "short");
    std::fs::create_dir(&short).unwrap();
    let ids: Vec<u32> = (0..3000).map(|i| (i * 7 % 250) as u32).collect();
    use temper::data::shards::{write_shard, Width};
    write_shard(&short.join("train_000000.bin"), &ids, Width::U16).unwrap();
    write_shard(&short.join("val_000000.bin"), &ids[..20], Width::U16).unwrap();
    std::fs::write(short.join("README.md"), "not part of the corpus").unwrap();
    let short_run = p(d.path(), "short-run");
    let o = run_ok(&[
        "pretrain",
        "--config",
        cfg,
        "--data",
        short.to_str().unwrap(),
        "--out",
        short_run.to_str().unwrap(),
        "--steps",
        "1",
        "--eval-every",
        "1",
        "--device",
        "cpu",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("hold 20 tokens, less than a window of 49"),
        "{err}"
    );

    // Shards of a BPE tokenizer, found beside them; gone, the byte tokenizer cannot read them.
    let bpe = p(d.path(), "bpe.json");
    let train = [
        "tokenizer",
        "train",
        corpus,
        "--vocab-size",
        "400",
        "--out",
        bpe.to_str().unwrap(),
    ];
    run_ok(&train);
    // A second train does not overwrite it unasked.
    let e = run_err(&train);
    assert!(e.contains("bpe.json exists: give --overwrite"), "{e}");
    run_ok(&[&train[..], &["--overwrite"]].concat());
    // A vocabulary the corpus cannot fill is said to fall short.
    let big = p(d.path(), "big.json");
    let big = big.to_str().unwrap();
    let o = run_ok(&[
        "tokenizer",
        "train",
        corpus,
        "--vocab-size",
        "100000",
        "--out",
        big,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("fewer than --vocab-size 100000"), "{err}");
    assert!(err.contains("[tokenizer] learnt in"), "{err}");
    // An --out that cannot be written is refused before the corpus is read and trained on.
    let file = p(d.path(), "a-file");
    std::fs::write(&file, "").unwrap();
    let under = file.join("tok.json");
    let e = run_err(&[&train[..6], &[under.to_str().unwrap()]].concat());
    assert!(e.contains("a-file: a file, where the directory"), "{e}");
    assert!(!e.contains("[tokenizer] learning"), "trained first: {e}");
    let bpe_shards = p(d.path(), "bpe-shards");
    let b = bpe_shards.to_str().unwrap();
    run_ok(&[
        "tokenizer",
        "encode",
        corpus,
        "--out",
        b,
        "--tokenizer",
        bpe.to_str().unwrap(),
    ]);
    // Two steps of pretraining on the BPE shards into `name`.
    let pretrain = |name: &str| {
        let out = p(d.path(), name);
        let out = out.to_str().unwrap();
        let args = [
            "pretrain",
            "--config",
            cfg,
            "--data",
            b,
            "--out",
            out,
            "--steps",
            "2",
            "--eval-every",
            "2",
            "--device",
            "cpu",
        ];
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let o = run_ok(&strs(&pretrain("bpe-run")));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("tokenizer bpe(vocab="),
        "not found beside the shards: {err}"
    );
    // Exported for transformers, the trained vocabulary goes with a tokenizer_config.json
    // naming its own special tokens (without one AutoTokenizer takes model_type's defaults).
    let hf_out = p(d.path(), "bpe-hf");
    let run = p(d.path(), "bpe-run");
    let (r, h) = (run.to_str().unwrap(), hf_out.to_str().unwrap());
    run_ok(&["export", "--checkpoint", r, "--out", h, "--format", "hf"]);
    let tc = std::fs::read_to_string(hf_out.join("tokenizer_config.json")).unwrap();
    let tc: serde_json::Value = serde_json::from_str(&tc).unwrap();
    assert_eq!(tc["tokenizer_class"], "PreTrainedTokenizerFast", "{tc}");
    assert!(
        tc["eos_token"].is_string() && tc["pad_token"].is_string(),
        "{tc}"
    );
    // Another tokenizer than the shards' (named, or an --init model's byte tokenizer) is
    // refused, naming both files: the shards' ids would stand for other tokens.
    let gpt2 = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/gpt2");
    let gpt2 = gpt2.join("tokenizer.json");
    let beside = bpe_shards.join("tokenizer.json").display().to_string();
    let mut named = pretrain("named-run");
    named.extend(["--tokenizer".to_string(), gpt2.display().to_string()]);
    let e = run_err(&strs(&named));
    assert!(
        e.contains(&beside) && e.contains(&gpt2.display().to_string()),
        "{e}"
    );
    let r_bytes = p(d.path(), "run").display().to_string();
    let mut from_bytes = pretrain("init-run");
    from_bytes.extend(["--init".to_string(), r_bytes.clone()]);
    let e = run_err(&strs(&from_bytes));
    assert!(e.contains(&beside) && e.contains(&r_bytes), "{e}");
    from_bytes.extend(["--tokenizer".to_string(), gpt2.display().to_string()]);
    let e = run_err(&strs(&from_bytes));
    assert!(e.contains("leave out --tokenizer"), "{e}");
    // The shards' tokenizer with a chat token added keeps every shard id: it trains, silently.
    // Lowercasing first, the same ids split text otherwise: it trains, and says so.
    let shards_tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&bpe).unwrap()).unwrap();
    let variant = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut json = shards_tok.clone();
        edit(&mut json);
        let path = p(d.path(), name);
        std::fs::write(&path, json.to_string()).unwrap();
        let mut args = pretrain(&format!("{name}-run"));
        args.extend(["--tokenizer".to_string(), path.display().to_string()]);
        let o = run_ok(&strs(&args));
        (path, String::from_utf8_lossy(&o.stderr).to_string())
    };
    let (added, err) = variant("added.json", &|json| {
        let tokens = json["added_tokens"].as_array_mut().unwrap();
        let mut chat = tokens[0].clone();
        chat["id"] = 1000.into();
        chat["content"] = "<|im_start|>".into();
        tokens.push(chat);
    });
    let tokenizer_warning = |l: &str| l.contains("warning") && l.contains("tokenizer");
    assert!(!err.lines().any(tokenizer_warning), "{err}");
    // That file edited before a resume (its added token gone) is refused: the rest of the
    // run would train on other ids than its checkpoint's.
    std::fs::write(&added, shards_tok.to_string()).unwrap();
    let added_run = p(d.path(), "added.json-run");
    std::fs::remove_dir_all(added_run.join("final")).unwrap();
    let r = added_run.to_str().unwrap();
    let e = run_err(&["pretrain", "--resume", r, "--steps", "3"]);
    assert!(
        e.contains(&added.display().to_string()) && e.contains("maps tokens to other ids"),
        "{e}"
    );
    let (lower, err) = variant("lower.json", &|json| {
        json["normalizer"] = serde_json::json!({"type": "Lowercase"});
    });
    let warned = err.lines().find(|l| l.contains("split text differently"));
    assert!(
        warned.is_some_and(|l| l.contains(&beside) && l.contains(&lower.display().to_string())),
        "{err}"
    );
    std::fs::remove_file(bpe_shards.join("tokenizer.json")).unwrap();
    let args = pretrain("lost-run");
    let args = strs(&args);
    let e = run_err(&args);
    assert!(
        e.contains("_000000.bin: token") && e.contains("--tokenizer"),
        "{e}"
    );
}

/// The run's saved configuration names its files by absolute paths, so that a run started
/// with relative ones (in its config file, from its directory) resumes from any other
/// directory and reads the same files.
#[test]
fn a_run_with_relative_paths_resumes_from_another_directory() {
    let d = tmp();
    let (work, elsewhere) = (p(d.path(), "work"), p(d.path(), "elsewhere"));
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let words = "the quick brown fox jumps over the lazy dog. ".repeat(200);
    std::fs::write(work.join("corpus.txt"), words).unwrap();
    let toml = format!("{TINY_TOML}checkpoint_every = 1\n\n[data]\npath = \"corpus.txt\"\n");
    std::fs::write(work.join("c.toml"), toml).unwrap();
    let run = |dir: &Path, args: &[&str]| {
        let out = temper().current_dir(dir).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            out.status.success(),
            "temper {args:?} in {}:\n{err}",
            dir.display()
        );
    };
    let common = ["--device", "cpu"];
    run(
        &work,
        &[
            &[
                "pretrain", "--config", "c.toml", "--out", "run", "--steps", "2",
            ],
            &common[..],
        ]
        .concat(),
    );
    let saved = std::fs::read_to_string(work.join("run/config.toml")).unwrap();
    let corpus = std::path::absolute(work.join("corpus.txt")).unwrap();
    assert!(
        saved.contains(&format!("path = \"{}\"", corpus.display())),
        "{saved}"
    );
    run(
        &elsewhere,
        &[
            &["pretrain", "--resume", "../work/run", "--steps", "4"],
            &common[..],
        ]
        .concat(),
    );
    let steps = train_steps(&work.join("run"));
    assert_eq!(steps.last(), Some(&4), "{steps:?}");
}

/// `[train] epochs` (TRL's `num_train_epochs`) decides the steps from the training set's size:
/// said at the start, run, and written to the run's config.toml; `--steps` on the command line
/// overrides it, and a rollout stage refuses it.
#[test]
fn epochs_decide_the_steps_from_the_training_set() {
    let d = tmp();
    let corpus = p(d.path(), "corpus.txt");
    std::fs::write(&corpus, "a stitch in time saves nine. ".repeat(150)).unwrap();
    let cfg = p(d.path(), "c.toml");
    std::fs::write(
        &cfg,
        format!("{TINY_TOML}epochs = 1.5\neval_every = 1000\n"),
    )
    .unwrap();
    let out = p(d.path(), "run");
    let (c, o, data) = (
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
        corpus.to_str().unwrap(),
    );
    let log = run_ok(&[
        "pretrain", "--config", c, "--data", data, "--out", o, "--device", "cpu",
    ]);
    let err = String::from_utf8_lossy(&log.stderr);
    let line = err
        .lines()
        .find(|l| l.contains("epochs of"))
        .unwrap_or_else(|| panic!("{err}"));
    // "[pretrain] 1.5 epochs of N items at 16 a step: S steps"
    let num = |after: &str| -> usize {
        let rest = &line[line.find(after).unwrap() + after.len()..];
        rest.split(' ').next().unwrap().parse().unwrap()
    };
    let (items, steps) = (num("epochs of "), num("a step: "));
    assert!(items > 16, "{line}");
    assert_eq!(steps, (1.5 * items as f64 / 16.0).ceil() as usize, "{line}");
    let trained = |dir: &Path| train_steps(dir).into_iter().max().map(|s| s as usize);
    assert_eq!(trained(&out), Some(steps));
    let saved = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        saved.contains(&format!("steps = {steps}\n")) && saved.contains("epochs = 1.5"),
        "{saved}"
    );

    let out2 = p(d.path(), "run2");
    let o2 = out2.to_str().unwrap();
    run_ok(&[
        "pretrain", "--config", c, "--data", data, "--out", o2, "--device", "cpu", "--steps", "2",
    ]);
    assert_eq!(trained(&out2), Some(2));

    let e = run_err(&["grpo", "--epochs", "2", "--out", o2, "--device", "cpu"]);
    assert!(
        e.contains("train.epochs") && e.contains("train.steps"),
        "{e}"
    );
}

/// A run directory holds one run: a fresh start into one that holds a run is refused (its
/// checkpoints and metrics untouched), `--overwrite` starts it over with the old run's files
/// gone once the new one has a checkpoint (and back if it fails before), and a resume with no
/// steps left to train is refused before it writes anything.
#[test]
fn a_run_directory_is_not_reused_by_accident() {
    let d = tmp();
    let cfg = p(d.path(), "c.toml");
    std::fs::write(
        &cfg,
        format!("{TINY_TOML}steps = 3\ncheckpoint_every = 1\n"),
    )
    .unwrap();
    let out = p(d.path(), "run");
    let (c, o) = (cfg.to_str().unwrap(), out.to_str().unwrap());
    let pretrain = |extra: &[&'static str]| {
        let mut a = vec!["pretrain", "--config", c, "--out", o, "--device", "cpu"];
        a.extend(extra);
        a
    };
    run_ok(&pretrain(&[]));
    let before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let e = run_err(&pretrain(&[]));
    assert!(
        e.contains("already holds a run") && e.contains("--overwrite"),
        "{e}"
    );
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), before);
    // An --overwrite whose data cannot be read fails before its first checkpoint: the run it
    // would have replaced is put back whole.
    let e = run_err(&pretrain(&[
        "--overwrite",
        "--data",
        "/nonexistent/corpus.txt",
    ]));
    assert!(
        e.contains("/nonexistent/corpus.txt") && e.contains("set aside is back in its place"),
        "{e}"
    );
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), before);
    assert!(out.join("final/model.safetensors").is_file() && !out.join(".overwritten").exists());
    let e = run_err(&["pretrain", "--resume", o, "--device", "cpu"]);
    assert!(e.contains("nothing to train"), "{e}");
    let toml = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(toml.contains("steps = 3"), "{toml}");
    run_ok(&pretrain(&["--steps", "2", "--overwrite"]));
    let steps = train_steps(&out);
    assert_eq!(steps.last(), Some(&2), "{steps:?}");
    assert!(
        steps.iter().all(|&s| s <= 2),
        "the old run's lines are gone: {steps:?}"
    );
    assert!(!out.join("checkpoints/step-0000003").exists());
    // Stopped at its last step's checkpoint before final/ (a signal there): the resume
    // trains nothing and writes final/.
    std::fs::remove_dir_all(out.join("final")).unwrap();
    // What the checkpoint holds a resume to is refused as a flag, naming the run's value.
    let e = run_err(&["pretrain", "--resume", o, "--seed", "5"]);
    assert!(e.contains("--seed 5: the run trains with 1234"), "{e}");
    let e = run_err(&["pretrain", "--resume", o, "--init", c]);
    assert!(e.contains("continues from its own checkpoint"), "{e}");
    run_ok(&["pretrain", "--resume", o, "--device", "cpu"]);
    assert!(out.join("final/model.safetensors").is_file());
    // An --overwrite that would delete the model it starts from is refused.
    let init = out.join("final");
    let i = init.to_str().unwrap();
    let e = run_err(&[
        "pretrain",
        "--config",
        c,
        "--out",
        o,
        "--init",
        i,
        "--overwrite",
    ]);
    assert!(e.contains("would be deleted"), "{e}");
    assert!(init.join("model.safetensors").is_file());
    run_ok(&["pretrain", "--resume", o, "--steps", "3", "--device", "cpu"]);
    // Resumed past it, the shorter schedule's final/ is set aside under its step, so that a
    // stage started from the run takes the newer model; nothing is deleted.
    let step = |dir: &Path| {
        let meta = std::fs::read_to_string(dir.join("meta.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&meta).unwrap()["step"].as_u64()
    };
    assert_eq!(step(&out.join("final")), Some(3));
    assert_eq!(step(&out.join("final-step-0000002")), Some(2));
    // Another stage does not continue this run (it would replace its final model).
    let e = run_err(&["sft", "--resume", o, "--device", "cpu"]);
    assert!(e.contains("holds a pretrain run"), "{e}");
    let e = run_err(&["pretrain", "--resume", o, "--out", c, "--steps", "4"]);
    assert!(e.contains("--out") && e.contains("--resume"), "{e}");
    // A --config beside --resume is laid over the run's own: its small [model] stays (the
    // defaults' larger one would not load the checkpoint).
    let more = p(d.path(), "more.toml");
    std::fs::write(&more, "[train]\nsteps = 4\n").unwrap();
    let m = more.to_str().unwrap();
    run_ok(&["pretrain", "--resume", o, "--config", m, "--device", "cpu"]);
    let toml = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        toml.contains("steps = 4") && toml.contains("hidden_size = 64"),
        "{toml}"
    );
    // Without checkpoints/latest (lost, or emptied), the newest complete checkpoint is taken:
    // the run goes on from step 4, where it used to start over and prune its checkpoints.
    std::fs::write(out.join("checkpoints/latest"), "").unwrap();
    let e = run_ok(&["pretrain", "--resume", o, "--steps", "5", "--device", "cpu"]);
    let e = String::from_utf8_lossy(&e.stderr);
    assert!(e.contains("newest complete checkpoint"), "{e}");
    let steps = train_steps(&out);
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    assert_eq!(steps.last(), Some(&5), "{steps:?}");
}

/// A run that diverges stops at the first step whose gradient norm is not finite, before any
/// checkpoint holds the spoilt weights: its error names the step and the last good checkpoint
/// (or says there is none yet), whose weights are all finite.
#[test]
fn a_diverging_run_stops_before_a_checkpoint_holds_its_spoilt_weights() {
    let d = tmp();
    let cfg = p(d.path(), "c.toml");
    std::fs::write(&cfg, TINY_TOML).unwrap();
    let run = |name: &str, every: &str| {
        let out = p(d.path(), name);
        let e = run_err(&[
            "pretrain",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--lr",
            "1e30",
            "--steps",
            "30",
            "--checkpoint-every",
            every,
            "--device",
            "cpu",
        ]);
        (out, e)
    };
    let (out, e) = run("every-step", "1");
    let latest = std::fs::read_to_string(out.join("checkpoints/latest")).unwrap();
    let ckpt = out.join("checkpoints").join(latest.trim());
    assert!(
        e.contains("gradient norm is NaN at step ")
            && e.contains(&format!("the last good checkpoint is {}", ckpt.display())),
        "{e}"
    );
    let weights =
        candle_core::safetensors::load(ckpt.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    for (name, t) in weights {
        let v = t
            .flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        assert!(
            v.to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite()),
            "{name} in {}",
            ckpt.display()
        );
    }
    let (_, e) = run("never", "100");
    assert!(
        e.contains("stopping (no checkpoint was written yet)"),
        "{e}"
    );
}

/// A batch size with digits too many asks the host for more memory than any machine has: the
/// run ends with one line that says so and names the settings that size it, not with Rust's
/// abort on a refused allocation (a byte count and a core dump). 10^14 rows of token ids are
/// 800 TB, more than a 64-bit process can map whatever the kernel's overcommit policy.
#[test]
fn a_batch_too_large_for_memory_ends_with_one_line_naming_its_size() {
    let d = tmp();
    let cfg = p(d.path(), "c.toml");
    std::fs::write(&cfg, TINY_TOML).unwrap();
    let out = temper()
        .args([
            "pretrain",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            p(d.path(), "run").to_str().unwrap(),
            "--batch-size",
            "100000000000000",
            "--steps",
            "2",
            "--device",
            "cpu",
        ])
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{e}");
    let last = e.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: out of host memory: ")
            && last.contains(
                "in the pretrain run (train.batch_size = 100000000000000, train.seq_len = "
            )
            && !e.contains("memory allocation of"),
        "{e}"
    );
}

/// `temper pretrain ... 2>&1 | tee log` and Ctrl-C: the signal ends `tee` too, and every later
/// line goes to a pipe nobody reads. A write error there must not end the run: it trains to
/// `final/`, or, signalled, checkpoints and exits 75 as src/dist/preempt.rs says.
#[test]
fn a_closed_output_pipe_does_not_end_a_run() {
    use std::process::Stdio;
    let d = tmp();
    let cfg = p(d.path(), "c.toml");
    std::fs::write(&cfg, format!("{TINY_TOML}log_every = 1\n")).unwrap();
    let start = |name: &str, steps: &str| {
        let out = p(d.path(), name);
        let mut child = temper()
            .args([
                "pretrain",
                "--config",
                cfg.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--steps",
                steps,
                "--eval-every",
                "2",
                "--device",
                "cpu",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Closes the read ends: every write the run makes fails with EPIPE.
        drop(child.stdout.take());
        drop(child.stderr.take());
        (child, out)
    };

    let (mut child, out) = start("done", "4");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(out.join("final/model.safetensors").is_file());

    // SIGTERM rather than SIGINT: a test run from a shell's background job inherits an
    // ignored SIGINT, which src/dist/preempt.rs keeps ignored; both take the same path.
    let (mut child, out) = start("stopped", "1000");
    wait_until(120, "the run logged nothing", || {
        metrics_if_any(&out) >= 2 || {
            assert!(child.try_wait().unwrap().is_none(), "the run ended early");
            false
        }
    });
    sigterm(&child);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(75), "{status}");
    let at = std::fs::read_to_string(out.join("checkpoints/latest")).unwrap();
    assert!(out.join("checkpoints").join(at.trim()).is_dir(), "{at}");
}

/// How many lines of metrics.jsonl the run in `dir` has written so far.
fn metrics_if_any(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
}

/// The lines of a run's stderr that contain `what`.
fn lines_with<'a>(err: &'a str, what: &str) -> Vec<&'a str> {
    err.lines().filter(|l| l.contains(what)).collect()
}

/// What a kill after step 4's checkpoint leaves of a 6-step run that checkpoints every 2
/// steps: no final model, no step-6 checkpoint, `latest` naming step 4 (the metrics the run
/// logged after it stay, as a killed run leaves them).
fn stop_after_step_4(dir: &Path) {
    std::fs::remove_dir_all(dir.join("final")).unwrap();
    std::fs::remove_dir_all(dir.join("checkpoints/step-0000006")).unwrap();
    std::fs::write(dir.join("checkpoints/latest"), "step-0000004").unwrap();
}

/// `--report-to tensorboard` writes every number of `metrics.jsonl` as a TensorBoard scalar
/// `SPLIT/FIELD` at its step, and a resumed run's event file shows one curve, as its
/// `metrics.jsonl` does: what the stopped run logged after its last checkpoint is dropped.
#[test]
fn tensorboard_scalars_follow_metrics_jsonl_through_a_resume() {
    let d = tmp();
    let cfg = p(d.path(), "c.toml");
    std::fs::write(
        &cfg,
        format!("{TINY_TOML}steps = 6\ncheckpoint_every = 2\nlog_every = 1\neval_every = 2\n"),
    )
    .unwrap();
    let full = p(d.path(), "full");
    let (c, f) = (cfg.to_str().unwrap(), full.to_str().unwrap());
    let tb = ["--report-to", "tensorboard"];
    run_ok(
        &[
            &["pretrain", "--config", c, "--out", f, "--device", "cpu"][..],
            &tb,
        ]
        .concat(),
    );
    // Every logged number, as TensorBoard holds it (f32).
    let logged = |dir: &Path| -> Vec<(u64, String, f32)> {
        let mut out = Vec::new();
        for m in metrics(dir) {
            let (step, split) = (m["step"].as_u64().unwrap(), m["split"].as_str().unwrap());
            for (k, v) in m.as_object().unwrap() {
                if let Some(v) = v.as_f64().filter(|_| k != "step") {
                    out.push((step, format!("{split}/{k}"), v as f32));
                }
            }
        }
        out.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        out
    };
    let scalars = |dir: &Path| {
        let mut s = temper::train::tensorboard::read_scalars(dir).unwrap();
        s.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        s
    };
    let whole = logged(&full);
    let tags: Vec<&str> = whole.iter().map(|s| s.1.as_str()).collect();
    assert!(
        tags.contains(&"train/loss") && tags.contains(&"val/loss"),
        "{tags:?}"
    );
    assert_eq!(scalars(&full), whole);

    // A kill after step 4's checkpoint, with steps 5 and 6 logged: the resume drops them
    // from both logs and logs them again.
    let dir = p(d.path(), "stopped");
    copy_tree(&full, &dir);
    stop_after_step_4(&dir);
    run_ok(&[
        "pretrain",
        "--resume",
        dir.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let resumed = scalars(&dir);
    assert_eq!(resumed, logged(&dir));
    let steps = |s: &[(u64, String, f32)]| s.iter().map(|r| (r.0, r.1.clone())).collect::<Vec<_>>();
    assert_eq!(steps(&resumed), steps(&whole), "one curve, each step once");
    for (a, b) in resumed.iter().zip(&whole) {
        if a.1.ends_with("loss") {
            assert!(
                (a.2 - b.2).abs() <= 1e-4 * b.2.abs().max(1.0),
                "{a:?} vs {b:?}"
            );
        }
    }
    let files = std::fs::read_dir(dir.join("tensorboard")).unwrap().count();
    assert_eq!(files, 1, "the resume continues the run's event file");

    // Asked for on a resume only, it holds the whole curve: the steps before the resume are
    // written from metrics.jsonl. So after a resume that wrote none, which left a gap.
    let late = p(d.path(), "late");
    copy_tree(&dir, &late);
    std::fs::remove_dir_all(late.join("tensorboard")).unwrap();
    stop_after_step_4(&late);
    let o = late.to_str().unwrap();
    run_ok(&[&["pretrain", "--resume", o, "--device", "cpu"][..], &tb].concat());
    assert_eq!(scalars(&late), logged(&late));
    stop_after_step_4(&late);
    let off = ["--report-to", "none", "--steps", "8"];
    run_ok(&[&["pretrain", "--resume", o, "--device", "cpu"][..], &off].concat());
    let on = ["--report-to", "tensorboard", "--steps", "10"];
    run_ok(&[&["pretrain", "--resume", o, "--device", "cpu"][..], &on].concat());
    assert_eq!(
        scalars(&late),
        logged(&late),
        "one curve through a resume without it"
    );
}

/// A run stopped after its last step's checkpoint, before its final model, ends on resume
/// with the evaluation that checkpoint kept: the same result as the run never stopped, and
/// metrics.jsonl logs it once. A finished run whose checkpoints were deleted is refused, not
/// started over over its metrics; so is another `--lora-alpha` (or `--use-rslora`) for a LoRA
/// run's adapters.
#[test]
fn a_run_stopped_at_its_last_checkpoint_ends_with_its_evaluation() {
    let d = tmp();
    let cfg = p(d.path(), "c.toml");
    std::fs::write(
        &cfg,
        format!("{TINY_TOML}steps = 4\ncheckpoint_every = 2\nlog_every = 1\neval_every = 2\n"),
    )
    .unwrap();
    let full = p(d.path(), "full");
    let (c, f) = (cfg.to_str().unwrap(), full.to_str().unwrap());
    let done = run_ok(&["pretrain", "--config", c, "--out", f, "--device", "cpu"]);
    let result = |out: &std::process::Output| {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.starts_with("pretrain:"))
            .map(str::to_string);
        line.unwrap_or_else(|| panic!("no result line: {text}"))
    };
    assert!(result(&done).contains("val loss"), "{}", result(&done));

    let stopped = p(d.path(), "stopped");
    copy_tree(&full, &stopped);
    std::fs::remove_dir_all(stopped.join("final")).unwrap();
    let o = stopped.to_str().unwrap();
    let again = run_ok(&["pretrain", "--resume", o, "--device", "cpu"]);
    assert_eq!(result(&again), result(&done));
    assert!(stopped.join("final/model.safetensors").is_file());
    assert_eq!(
        metrics(&stopped),
        metrics(&full),
        "the last evaluation logged once"
    );

    let bare = p(d.path(), "bare");
    copy_tree(&full, &bare);
    std::fs::remove_dir_all(bare.join("checkpoints")).unwrap();
    let o = bare.to_str().unwrap();
    let e = run_err(&["pretrain", "--resume", o, "--device", "cpu", "--steps", "6"]);
    assert!(
        e.contains("holds a final model but no checkpoint to resume from") && e.contains("--init"),
        "{e}"
    );
    assert_eq!(
        metrics(&bare),
        metrics(&full),
        "nothing of the run is touched"
    );

    // LoRA: the adapters' alpha is the run's.
    let sft = p(d.path(), "sft");
    let s = sft.to_str().unwrap();
    let lora = ["--lora-rank", "4", "--lora-alpha", "8", "--steps", "2"];
    run_ok(
        &[
            &["sft", "--init", f, "--out", s, "--device", "cpu"][..],
            &lora,
        ]
        .concat(),
    );
    let e = run_err(&["sft", "--resume", s, "--lora-alpha", "16", "--steps", "3"]);
    assert!(
        e.contains("--lora-alpha 16") && e.contains("trains with 8"),
        "{e}"
    );
    // rsLoRA's scale too.
    let e = run_err(&["sft", "--resume", s, "--use-rslora", "--steps", "3"]);
    assert!(
        e.contains("--use-rslora=true") && e.contains("trains with false"),
        "{e}"
    );
    // And the run's config.toml edited since: the checkpoint's adapters decide.
    let toml = sft.join("config.toml");
    let held = std::fs::read_to_string(&toml).unwrap();
    let edited = held.replace("use_dora = false", "use_dora = true");
    assert_ne!(edited, held);
    std::fs::write(&toml, edited).unwrap();
    let e = run_err(&["sft", "--resume", s, "--steps", "3", "--device", "cpu"]);
    assert!(
        e.contains("config.toml:")
            && e.contains(": lora.use_dora = true: the checkpoint's adapters (")
            && e.contains("meta.json) were trained with false"),
        "{e}"
    );
    std::fs::write(&toml, held).unwrap();
    run_ok(&[
        "sft",
        "--resume",
        s,
        "--lora-alpha",
        "8",
        "--steps",
        "3",
        "--device",
        "cpu",
    ]);
    // Its base moved: named by the line of the run's config.toml that holds it.
    std::fs::rename(&full, p(d.path(), "moved")).unwrap();
    let e = run_err(&["sft", "--resume", s, "--steps", "4", "--device", "cpu"]);
    assert!(
        e.contains("config.toml:") && e.contains("init = ") && e.contains("put it back"),
        "{e}"
    );
}

/// A latest checkpoint that does not load (cut short, or garbled) does not end a resume: the
/// run goes on from the newest older one that loads, onto the curve of a run never stopped,
/// says so in one line, and renames the bad one `step-N.corrupt` (kept, not pruned, not
/// tried again). Where none loads, the error names the newest one's file and nothing moves.
#[test]
fn a_corrupt_latest_checkpoint_resumes_from_the_one_before() {
    let d = tmp();
    let cfg = p(d.path(), "c.toml");
    std::fs::write(
        &cfg,
        format!(
            "{TINY_TOML}steps = 6\ncheckpoint_every = 2\nkeep_checkpoints = 3\nlog_every = 1\n\
             eval_every = 2\n"
        ),
    )
    .unwrap();
    let full = p(d.path(), "full");
    let (c, f) = (cfg.to_str().unwrap(), full.to_str().unwrap());
    run_ok(&["pretrain", "--config", c, "--out", f, "--device", "cpu"]);
    let curve = |dir: &Path| {
        let m = metrics(dir);
        (series(&m, "train", "loss"), series(&m, "val", "loss"))
    };
    let truncate = |file: &Path| {
        let bytes = std::fs::read(file).unwrap();
        std::fs::write(file, &bytes[..bytes.len() / 2]).unwrap();
    };
    // What a kill after step 4's checkpoint leaves, with that checkpoint's `file` cut short.
    let stopped = |name: &str, file: &str| {
        let dir = p(d.path(), name);
        copy_tree(&full, &dir);
        stop_after_step_4(&dir);
        truncate(&dir.join("checkpoints/step-0000004").join(file));
        dir
    };
    for (name, file) in [("cut", "model.safetensors"), ("garbled", "state.json")] {
        let dir = stopped(name, file);
        let file = format!("step-0000004/{file}");
        let o = dir.to_str().unwrap();
        // A reader takes no other checkpoint on its own; it names the intact one where what
        // it reads is damaged (the weights), and reads on where only a resume's file is.
        let gen = ["generate", "--checkpoint", o, "--prompt", "a"];
        if name == "cut" {
            let e = run_err(&gen);
            assert!(
                e.contains(&file) && e.contains("step-0000002 is intact"),
                "{name}: {e}"
            );
        } else {
            run_ok(&gen);
        }
        let out = run_ok(&["pretrain", "--resume", o, "--device", "cpu"]);
        let err = String::from_utf8_lossy(&out.stderr);
        let warned = lines_with(&err, "warning:");
        assert_eq!(warned.len(), 1, "{name}: {err}");
        assert!(
            warned[0].contains(&file)
                && warned[0].contains("step-0000004.corrupt")
                && warned[0].contains("resuming from"),
            "{name}: {}",
            warned[0]
        );
        assert_eq!(lines_with(&err, "resumed from").len(), 1, "{name}: {err}");
        assert!(err.contains("step-0000002 at step 2"), "{name}: {err}");
        assert_eq!(curve(&dir), curve(&full), "{name}: not the same curve");
        let ck = dir.join("checkpoints");
        let mut left: Vec<String> = std::fs::read_dir(&ck)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "latest",
                "step-0000002",
                "step-0000004",
                "step-0000004.corrupt",
                "step-0000006"
            ],
            "{name}"
        );
        let latest = std::fs::read_to_string(ck.join("latest")).unwrap();
        assert_eq!(latest.trim(), "step-0000006");
        assert!(dir.join("final/model.safetensors").is_file());
    }

    // A pointer behind a newer complete checkpoint (a kill between the checkpoint's rename and
    // the pointer's switch, or a pointer set back by hand) is followed, the newer one named.
    let behind = p(d.path(), "behind");
    copy_tree(&full, &behind);
    stop_after_step_4(&behind);
    std::fs::write(behind.join("checkpoints/latest"), "step-0000002").unwrap();
    let out = run_ok(&[
        "pretrain",
        "--resume",
        behind.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    let warned = lines_with(&err, "warning:");
    assert_eq!(warned.len(), 1, "{err}");
    assert!(
        warned[0].contains("names step-0000002")
            && warned[0].contains("step-0000004 is passed over"),
        "{}",
        warned[0]
    );
    assert!(err.contains("step-0000002 at step 2"), "{err}");
    assert_eq!(curve(&behind), curve(&full));

    // Damage that reads as files: a state.json that parses but lacks what temper writes, and
    // weights that are not finite (no checkpoint is written so). Set aside as the others.
    let state4 = full.join("checkpoints/step-0000004/state.json");
    for name in ["fields", "nan"] {
        let dir = stopped(name, "state.json");
        let ck = dir.join("checkpoints/step-0000004");
        match name {
            "fields" => std::fs::write(ck.join("state.json"), "{\"step\": 4}").unwrap(),
            _ => {
                std::fs::copy(&state4, ck.join("state.json")).unwrap();
                let weights = ck.join("model.safetensors");
                let mut all = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
                let (key, t) = all
                    .iter()
                    .next()
                    .map(|(k, t)| (k.clone(), t.clone()))
                    .unwrap();
                let nan = (t.ones_like().unwrap() * f64::NAN).unwrap();
                all.insert(key, nan);
                candle_core::safetensors::save(&all, &weights).unwrap();
            }
        }
        let out = run_ok(&[
            "pretrain",
            "--resume",
            dir.to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        let warned = lines_with(&err, "warning:");
        let why = match name {
            "fields" => "malformed",
            _ => "not finite",
        };
        assert!(
            warned.len() == 1 && warned[0].contains(why) && warned[0].contains(".corrupt"),
            "{name}: {err}"
        );
        assert_eq!(curve(&dir), curve(&full), "{name}: not the same curve");
    }

    // An intact checkpoint that does not load (here weights of another model) is the run's
    // fault, not the checkpoint's: the resume stops, and nothing is set aside or passed over.
    let dir = stopped("other", "meta.json");
    std::fs::write(dir.join("checkpoints/step-0000004/meta.json"), "{}").unwrap();
    let other = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let weights = dir.join("checkpoints/step-0000004/model.safetensors");
    candle_core::safetensors::save(&std::collections::HashMap::from([("x", other)]), &weights)
        .unwrap();
    let e = run_err(&[
        "pretrain",
        "--resume",
        dir.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(e.contains("step-0000004"), "{e}");
    assert!(
        !dir.join("checkpoints/step-0000004.corrupt").exists(),
        "{e}"
    );
    let latest = std::fs::read_to_string(dir.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), "step-0000004");

    // Neither checkpoint loads: each one's file and reason, and the directory as it was.
    let dir = stopped("none", "model.safetensors");
    truncate(&dir.join("checkpoints/step-0000002/optimizer.safetensors"));
    let e = run_err(&[
        "pretrain",
        "--resume",
        dir.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(
        e.contains("step-0000004/model.safetensors") && e.contains("cannot read safetensors"),
        "{e}"
    );
    assert!(
        e.contains("step-0000002/optimizer.safetensors"),
        "the older one's reason too: {e}"
    );
    assert!(!dir.join("checkpoints/step-0000004.corrupt").exists());
    let latest = std::fs::read_to_string(dir.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), "step-0000004");
}

/// A `[train] warmup_steps` a config file chose that is longer than the run is said once,
/// naming the key and the file's line; the default's (20, longer than a short run) is not,
/// nor is the run's own config.toml's on a resume.
#[test]
fn a_chosen_warmup_longer_than_the_run_is_said_once() {
    let d = tmp();
    let chosen = p(d.path(), "w.toml");
    std::fs::write(&chosen, format!("{TINY_TOML}warmup_steps = 50\n")).unwrap();
    let plain = p(d.path(), "c.toml");
    std::fs::write(&plain, TINY_TOML).unwrap();
    let run = |cfg: &Path, name: &str, steps: &str| {
        let out = p(d.path(), name);
        let o = run_ok(&[
            "pretrain",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            steps,
            "--device",
            "cpu",
        ]);
        (String::from_utf8_lossy(&o.stderr).into_owned(), out)
    };
    let (err, out) = run(&chosen, "chosen", "2");
    let said = lines_with(&err, "warmup_steps");
    assert_eq!(said.len(), 1, "{err}");
    let line = TINY_TOML.lines().count() + 1;
    assert!(
        said[0].starts_with("warning:")
            && said[0].contains(&format!("w.toml:{line}: train.warmup_steps = 50")),
        "{}",
        said[0]
    );
    let o = out.to_str().unwrap();
    let resumed = run_ok(&["pretrain", "--resume", o, "--steps", "3", "--device", "cpu"]);
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(lines_with(&err, "warmup_steps").is_empty(), "{err}");
    let (err, _) = run(&plain, "default", "2");
    assert!(lines_with(&err, "warmup_steps").is_empty(), "{err}");
}

/// `temper eval` without `--prompts` scores a checkpoint on the held-out pairs of the world
/// its run trained in (`[data] task_seed` and `task_max_operand` of the run's config.toml),
/// from the run directory or its final/, and says which; `--task-seed` given replaces the
/// run's seed (0 too, the flag's old default), keeping its operand range.
#[test]
fn eval_scores_the_held_out_pairs_of_the_checkpoints_world() {
    use temper::data::synthetic::{Split, Synthetic};
    let d = tmp();
    let cfg = p(d.path(), "c.toml");
    let world = "[data]\ntask_seed = 3\ntask_max_operand = 29\n";
    std::fs::write(&cfg, format!("{TINY_TOML}{world}")).unwrap();
    let run = p(d.path(), "run");
    pretrain_on_cpu(cfg.to_str().unwrap(), &run, 2);
    let held_out = |seed, max_operand| {
        let mut s = Synthetic::new(seed);
        s.max_operand = max_operand;
        s.pairs(Split::Eval).len()
    };
    let eval = |ckpt: &Path, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        let o = run_ok(&args);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        (v, String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let n = held_out(3, 29);
    assert_ne!(n, held_out(0, 19));
    for ckpt in [run.clone(), run.join("final")] {
        let (v, err) = eval(&ckpt, &[]);
        assert_eq!(v["n"], n, "{v}");
        assert_eq!(
            (v["task_seed"].as_u64(), v["task_max_operand"].as_u64()),
            (Some(3), Some(29))
        );
        let said = lines_with(&err, "held-out pairs");
        assert_eq!(said.len(), 1, "{err}");
        assert!(
            said[0].contains("task_seed 3 (the checkpoint's run's)")
                && said[0].contains("task_max_operand 29 (the checkpoint's run's)"),
            "{err}"
        );
    }
    for (flag, seed) in [(&["--task-seed", "0"][..], 0), (&["--task-seed=5"][..], 5)] {
        let (v, err) = eval(&run, flag);
        assert_eq!(v["n"], held_out(seed, 29), "{flag:?}: {v}");
        assert_eq!(
            (v["task_seed"].as_u64(), v["task_max_operand"].as_u64()),
            (Some(seed), Some(29))
        );
        assert!(err.contains(&format!("task_seed {seed} (given)")), "{err}");
        // Another world than the run's 3: its held-out pairs are not all held out of the run.
        assert!(
            err.contains(&format!(
                "warning: --task-seed {seed}: the checkpoint's run trained in task_seed 3's"
            )),
            "{err}"
        );
    }
}

/// A `temper generate` line whose sample stopped at once (`"completion": ""`, `"stop"`)
/// trains `temper sft --data` as it is: the EOS after the prompt, which teaches stopping,
/// is its target (a plain prompt's and, under the built-in chat template, a chat prompt's).
#[test]
fn sft_trains_on_generates_empty_completions() {
    let d = tmp();
    let cfg = p(d.path(), "c.toml");
    std::fs::write(&cfg, TINY_TOML).unwrap();
    let init = p(d.path(), "init");
    pretrain_on_cpu(cfg.to_str().unwrap(), &init, 2);
    let data = p(d.path(), "bo.jsonl");
    let lines = [
        serde_json::json!({"prompt": "Q: 2+3\nA: ", "completion": "", "finish_reason": "stop"}),
        serde_json::json!({"prompt": "Q: 1+3\nA: ", "completion": "4", "finish_reason": "stop"}),
        serde_json::json!({
            "prompt": [{"role": "user", "content": "Hi"}],
            "completion": "",
            "finish_reason": "stop",
        }),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&data, text).unwrap();
    let out = p(d.path(), "sft");
    run_ok(&[
        "sft",
        "--init",
        init.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "2",
        "--device",
        "cpu",
    ]);
    assert!(out.join("final/model.safetensors").exists());
}

/// A prompts directory whose split has an empty shard among others (a split cut into more
/// shards than it has rows) serves the other shards' prompts, to `generate` and to `eval`,
/// and says which shard it skipped.
#[test]
fn an_empty_prompt_shard_among_others_is_skipped_with_a_warning() {
    let d = tmp();
    let dir = p(d.path(), "prompts");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let shard = |i: usize, body: &str| {
        let f = dir.join(format!("data/test-0000{i}-of-00002.jsonl"));
        std::fs::write(&f, body).unwrap();
    };
    shard(0, "");
    shard(
        1,
        "{\"prompt\": \"1 plus 1 is\", \"answer\": \"2\"}\n\
         {\"prompt\": \"2 plus 2 is\", \"answer\": \"4\"}\n",
    );
    let llama = fixture("llama");
    let dir_s = dir.to_str().unwrap();
    let warned = "warning: 1 of the 2 files of";
    for (cmd, extra) in [
        ("generate", ["--split", "test", "--max-new-tokens", "2"]),
        ("eval", ["--split", "test", "--max-new-tokens", "2"]),
    ] {
        let mut args = vec![cmd, "--checkpoint", &llama, "--prompts", dir_s];
        args.extend(extra);
        args.extend(["--device", "cpu"]);
        let out = run_ok(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(warned) && err.contains("test-00000-of-00002.jsonl"),
            "{cmd}: {err}"
        );
        if cmd == "generate" {
            let lines = String::from_utf8_lossy(&out.stdout).lines().count();
            assert_eq!(lines, 2, "{cmd}: one completion a prompt");
        }
    }
}

/// A run directory without its final model (stopped, or still training) is read at its latest
/// checkpoint, and a reader says so, naming it: a run begun from a run half trained is
/// otherwise noticed only when a later resume finds its init changed.
#[test]
fn reading_an_unfinished_run_names_the_checkpoint_it_reads() {
    let d = tmp();
    let cfg = p(d.path(), "c.toml");
    std::fs::write(&cfg, TINY_TOML).unwrap();
    let run = p(d.path(), "run");
    let (c, r) = (cfg.to_str().unwrap(), run.to_str().unwrap());
    run_ok(&[
        "pretrain",
        "--config",
        c,
        "--out",
        r,
        "--steps",
        "2",
        "--checkpoint-every",
        "1",
        "--device",
        "cpu",
    ]);
    let gen = |ckpt: &Path| {
        let args = [
            "generate",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--prompt",
            "1",
        ];
        let o = run_ok(&[&args[..], &["--max-new-tokens", "2", "--device", "cpu"]].concat());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let warned = "the run has no final model (it is unfinished, or was stopped); reading its \
                  latest checkpoint";
    assert!(!gen(&run).contains(warned), "a finished run");
    std::fs::remove_dir_all(run.join("final")).unwrap();
    let err = gen(&run);
    assert!(
        err.contains(warned) && err.contains("step-0000002"),
        "{err}"
    );
    assert!(
        !gen(&run.join("checkpoints/step-0000001")).contains(warned),
        "a checkpoint named"
    );
}

/// `generate --resume` refuses a checkpoint whose weights changed since the file was begun (a
/// run trained further, a model rewritten in place): the completions would come from two
/// models.
#[test]
fn a_generation_resumed_on_changed_weights_is_refused() {
    let d = tmp();
    let prompts = numbered_prompts(d.path());
    let model = p(d.path(), "model");
    copy_files(Path::new(&fixture("gpt2")), &model);
    let full = p(d.path(), "full.jsonl");
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--checkpoint",
            model.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-new-tokens",
            "3",
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    run_ok(&strs(&run(&full, &[])));
    let (cut, partial) = cut_short(&full, "cut.jsonl", 3);
    let weights = model.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::remove_file(&weights).unwrap();
    std::fs::write(&weights, &bytes).unwrap();
    let e = run_err(&strs(&run(&cut, &["--resume"])));
    assert!(
        e.contains("cut.jsonl.settings.json: the checkpoint's weight files changed since")
            && e.contains("model.safetensors"),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(&cut).unwrap(), partial);
    // Begun on the weights as they are now, it resumes to the whole file.
    let now = p(d.path(), "now.jsonl");
    run_ok(&strs(&run(&now, &[])));
    let (cut, _) = cut_short(&now, "cut-now.jsonl", 3);
    run_ok(&strs(&run(&cut, &["--resume"])));
    assert_eq!(
        std::fs::read_to_string(&cut).unwrap(),
        std::fs::read_to_string(&now).unwrap()
    );
}

/// A tokenizer_config.json that sets add_eos_token and leaves add_bos_token out is read as
/// transformers 5 reads it (no BOS), and said to be, since transformers 4's Llama tokenizer
/// read it otherwise; with both flags set nothing is said.
#[test]
fn one_add_token_flag_alone_is_said_to_drop_the_bos() {
    let d = tmp();
    let model = p(d.path(), "llama");
    copy_tree(Path::new(&fixture("llama")), &model);
    let config = model.join("tokenizer_config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let gen = |model: &Path| {
        let m = model.to_str().unwrap();
        let out = run_ok(&[
            "generate",
            "--checkpoint",
            m,
            "--prompt",
            "hi",
            "--max-new-tokens",
            "1",
        ]);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    c["add_eos_token"] = true.into();
    std::fs::write(&config, c.to_string()).unwrap();
    let said = gen(&model);
    assert!(
        said.contains("sets add_eos_token but not add_bos_token"),
        "{said}"
    );
    c["add_bos_token"] = true.into();
    std::fs::write(&config, c.to_string()).unwrap();
    assert!(!gen(&model).contains("add_bos_token"));
}
