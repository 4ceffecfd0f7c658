//! The alignment stages on a tiny model through the CLI: LoRA leaving the base bitwise
//! unchanged, PPO's first-minibatch ratio of 1, DPO starting at log 2, and clear errors for bad
//! input. (The losses' maths on hand-computed cases is tested beside the code.)

mod common;

use common::*;

/// The chain pretrain -> sft (LoRA) -> export (adapters merged), reward -> ppo (LoRA), dpo (LoRA) on a
/// tiny model, run once per test binary and shared by the tests in here, each of which checks
/// one promise a stage keeps besides learning (which the pipeline test checks). Their names,
/// `stage_chain::*`, sort after the other tests', which libtest starts first: the slowest of
/// those then runs beside the chain instead of after it.
mod stage_chain {
    use super::common::*;
    use candle_core::Device;
    use std::collections::HashMap;

    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;

    /// A fresh directory for the chain's runs, and their config file.
    struct Base {
        dir: tempfile::TempDir,
        config: String,
    }

    fn base() -> &'static Base {
        static BASE: Shared<Base> = OnceLock::new();
        shared(&BASE, "chain directory", || {
            let dir = chain_dir(env!("CARGO_TARGET_TMPDIR"), "stages-chain-");
            let cfg = p(dir.path(), "c.toml");
            std::fs::write(&cfg, format!("{TINY_TOML}\n[sft]\neval_prompts = 40\n[ppo]\neval_prompts = 40\nrollout_batch = 16\nminibatch_size = 8\n[dpo]\neval_prompts = 20\neval_pairs = 16\n")).unwrap();
            let config = cfg.to_str().unwrap().to_string();
            Base { dir, config }
        })
    }

    fn config() -> &'static str {
        &base().config
    }

    /// Where the chain's run `name` goes.
    fn run_dir(name: &str) -> PathBuf {
        p(base().dir.path(), name)
    }

    fn arg(path: &Path) -> &str {
        path.to_str().unwrap()
    }

    fn pre() -> &'static Path {
        static PRE: Shared<PathBuf> = OnceLock::new();
        shared(&PRE, "pretraining run", || {
            let pre = run_dir("pre");
            pretrain_on_cpu(config(), &pre, 30);
            pre
        })
        .as_path()
    }

    /// SFT from `pre` with LoRA of rank 4 on q, v and up.
    fn sft() -> &'static Path {
        static SFT: Shared<PathBuf> = OnceLock::new();
        shared(&SFT, "LoRA SFT run", || {
            let sft = run_dir("sft");
            run_ok(&[
                "sft",
                "--config",
                config(),
                "--init",
                arg(pre()),
                "--out",
                arg(&sft),
                "--steps",
                "20",
                "--lora-rank",
                "4",
                "--lora-targets",
                "q,v,up",
                "--device",
                "cpu",
            ]);
            sft
        })
        .as_path()
    }

    /// `export` of the LoRA SFT run: a temper checkpoint, its adapters merged.
    fn merged() -> &'static Path {
        static MERGED: Shared<PathBuf> = OnceLock::new();
        shared(&MERGED, "merged export of the SFT run", || {
            let merged = run_dir("merged");
            run_ok(&["export", "--checkpoint", arg(sft()), "--out", arg(&merged)]);
            merged
        })
        .as_path()
    }

    /// A reward model from the SFT run.
    fn rm() -> &'static Path {
        static RM: Shared<PathBuf> = OnceLock::new();
        shared(&RM, "reward model run", || {
            let rm = run_dir("rm");
            run_ok(&[
                "reward",
                "--config",
                config(),
                "--init",
                arg(sft()),
                "--out",
                arg(&rm),
                "--steps",
                "10",
                "--device",
                "cpu",
            ]);
            rm
        })
        .as_path()
    }

    struct PpoRun {
        dir: PathBuf,
        stderr: String,
    }

    /// PPO with LoRA from the SFT run, rewarded by the task's checker and the reward model at 0.5,
    /// logging every step.
    fn ppo() -> &'static PpoRun {
        static PPO: Shared<PpoRun> = OnceLock::new();
        shared(&PPO, "LoRA PPO run", || {
            let dir = run_dir("ppo");
            let out = temper()
                .args([
                    "ppo",
                    "--config",
                    config(),
                    "--init",
                    arg(sft()),
                    "--out",
                    arg(&dir),
                    "--steps",
                    "8",
                    "--log-every",
                    "1",
                    "--reward",
                    "task",
                    "--reward",
                    &format!("{}:0.5", rm().display()),
                    "--lora-rank",
                    "4",
                    "--device",
                    "cpu",
                ])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(out.status.success(), "{stderr}");
            PpoRun { dir, stderr }
        })
    }

    /// DPO with LoRA from the SFT run.
    fn dpo() -> &'static Path {
        static DPO: Shared<PathBuf> = OnceLock::new();
        shared(&DPO, "LoRA DPO run", || {
            let dpo = run_dir("dpo");
            run_ok(&[
                "dpo",
                "--config",
                config(),
                "--init",
                arg(sft()),
                "--out",
                arg(&dpo),
                "--steps",
                "4",
                "--lora-rank",
                "4",
                "--device",
                "cpu",
            ]);
            dpo
        })
        .as_path()
    }

    /// A full fine-tune reads its reference from `--init` again on a resume: one that changed
    /// since the run began is refused, naming it, rather than trained against. A resume that
    /// changes a setting says so, with the value it replaces; a config file that sets only
    /// another stage's table is said to be ignored.
    #[test]
    fn a_resume_refuses_a_changed_reference_and_says_what_it_changes() {
        let init = run_dir("moving-init");
        copy_files(merged(), &init);
        let out = run_dir("frozen-ref");
        let other = run_dir("frozen-ref.toml");
        std::fs::write(&other, "[kto]\nbeta = 0.5\n[lora]\nalpha = 32\n").unwrap();
        let o = run_ok(&[
            "dpo",
            "--config",
            arg(&other),
            "--init",
            arg(&init),
            "--out",
            arg(&out),
            "--steps",
            "4",
            "--checkpoint-every",
            "2",
            "--device",
            "cpu",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("frozen-ref.toml:1: [kto] is not read by dpo"),
            "{err}"
        );
        assert!(
            err.contains("frozen-ref.toml:4: lora.alpha without lora.rank"),
            "{err}"
        );
        let ckpts = out.join("checkpoints");
        std::fs::remove_dir_all(ckpts.join("step-0000004")).unwrap();
        std::fs::remove_dir_all(out.join("final")).unwrap();
        std::fs::write(ckpts.join("latest"), "step-0000002").unwrap();
        let o = run_ok(&["dpo", "--resume", arg(&out), "--lr", "1e-4"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("changed settings") && err.contains("train.lr"),
            "{err}"
        );
        std::fs::remove_dir_all(ckpts.join("step-0000004")).unwrap();
        std::fs::remove_dir_all(out.join("final")).unwrap();
        std::fs::write(ckpts.join("latest"), "step-0000002").unwrap();
        // The init rewritten in place: the same path, other weights' file.
        let weights = init.join("model.safetensors");
        let bytes = std::fs::read(&weights).unwrap();
        std::fs::remove_file(&weights).unwrap();
        std::fs::write(&weights, bytes).unwrap();
        let e = run_err(&["dpo", "--resume", arg(&out)]);
        assert!(
            e.contains("the reference (--init) changed since the run began")
                && e.contains("model.safetensors was rewritten"),
            "{e}"
        );
    }

    /// A checkpoint's tensors, flattened.
    fn weights(file: &Path) -> HashMap<String, Vec<f32>> {
        candle_core::safetensors::load(file, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(name, t)| (name, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect()
    }

    /// `eval` checks every prompt's answer before it decodes any (a missing one is named by
    /// file and line at once), and shows a line per batch of prompts.
    #[test]
    fn eval_checks_answers_first_and_shows_progress() {
        let dir = run_dir("eval-progress");
        std::fs::create_dir_all(&dir).unwrap();
        let prompts = |n: usize, without: Option<usize>| -> PathBuf {
            let lines: String = (1..=n)
                .map(|i| match Some(i) == without {
                    true => format!("{{\"prompt\": \"{i}+1=\"}}\n"),
                    false => format!("{{\"prompt\": \"{i}+1=\", \"answer\": \"{}\"}}\n", i + 1),
                })
                .collect();
            let f = dir.join(format!("p{n}-{without:?}.jsonl"));
            std::fs::write(&f, lines).unwrap();
            f
        };
        let eval =
            |f: &Path| ["eval", "--checkpoint", arg(pre()), "--prompts", arg(f)].map(String::from);
        let bad = prompts(70, Some(70));
        let mut args = eval(&bad).to_vec();
        args.extend(["--max-new-tokens".into(), "2".into()]);
        let e = run_err(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(e.contains(":70: field \"answer\": missing"), "{e}");
        assert!(!e.contains("[eval]"), "decoded before the check: {e}");
        let good = prompts(70, None);
        let mut args = eval(&good).to_vec();
        args.extend(["--max-new-tokens".into(), "2".into()]);
        let out = run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("[eval] prompts 64/70"), "{said}");
        assert!(!said.contains("take more tokens"), "{said}");

        // An answer no response can match is refused; one longer than a response can be is
        // said to count as wrong.
        let file = |name: &str, answer: &str| -> PathBuf {
            let f = dir.join(name);
            let line = serde_json::json!({"prompt": "1+1=", "answer": answer});
            std::fs::write(
                &f,
                format!("{{\"prompt\": \"2+2=\", \"answer\": \"4\"}}\n{line}\n"),
            )
            .unwrap();
            f
        };
        for (name, answer, why) in [
            ("blank.jsonl", "  ", "empty"),
            ("lines.jsonl", "2\n3", "spans several lines"),
        ] {
            let e = run_err(&eval(&file(name, answer)).each_ref().map(String::as_str));
            assert!(
                e.contains(&format!("{name}:2: field \"answer\": {why}")),
                "{e}"
            );
        }
        let long = file("long.jsonl", "123456789");
        let out = run_ok(&eval(&long).each_ref().map(String::as_str));
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("1 of 2 answers take more tokens than --max-new-tokens 8")
                && said.contains("long.jsonl:2, takes 9"),
            "{said}"
        );
    }

    /// SFT refuses a loss scope set off its default where no record reads it: the built-in
    /// task's and a prompt-completion file's examples have no assistant turns to mask, a file
    /// of conversations no completion.
    #[test]
    fn sft_refuses_a_loss_scope_no_record_reads() {
        let dir = run_dir("sft-scope");
        std::fs::create_dir_all(&dir).unwrap();
        let chats = dir.join("chats.jsonl");
        let line = r#"{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}"#;
        std::fs::write(&chats, format!("{line}\n").repeat(12)).unwrap();
        let sft = |extra: &[&str]| {
            let out = dir.join("out");
            let mut a = vec![
                "sft",
                "--init",
                arg(pre()),
                "--out",
                arg(&out),
                "--steps",
                "1",
            ];
            a.extend_from_slice(extra);
            run_err(&a)
        };
        let e = sft(&["--assistant-only-loss", "false"]);
        assert!(
            e.contains("[sft] assistant_only_loss = false (--assistant-only-loss) changes nothing"),
            "{e}"
        );
        let e = sft(&["--data", arg(&chats), "--completion-only-loss", "false"]);
        assert!(
            e.contains("completion_only_loss = false")
                && e.contains("no training record is a prompt-completion record"),
            "{e}"
        );
    }

    /// `generate` refuses settings that cannot do what they say: greedy samples of a prompt
    /// (all one text), a `--max-new-tokens` that leaves no room for a prompt (named as the
    /// flag, not as the prompt's fault), more `--min-new-tokens` than new tokens; and says
    /// that sampling filters do nothing under greedy decoding.
    #[test]
    fn generate_refuses_settings_that_cannot_hold() {
        let gen = |extra: &[&str]| -> Vec<String> {
            let mut v = vec!["generate", "--checkpoint", arg(pre()), "--prompt", "1+1="];
            v.extend_from_slice(extra);
            v.into_iter().map(String::from).collect()
        };
        let err =
            |extra: &[&str]| run_err(&gen(extra).iter().map(String::as_str).collect::<Vec<_>>());
        let e = err(&["--temperature", "0", "--samples", "3"]);
        assert!(e.contains("--samples 3 with greedy decoding"), "{e}");
        let e = err(&["--max-new-tokens", "1000"]);
        assert!(
            e.contains("generate: --max-new-tokens 1000 leaves no room for a prompt"),
            "{e}"
        );
        let e = err(&["--max-new-tokens", "4", "--min-new-tokens", "6"]);
        assert!(
            e.contains(
                "--min-new-tokens 6 is more than the 4 new tokens allowed (--max-new-tokens 4)"
            ),
            "{e}"
        );
        let e = err(&["--max-new-tokens", "63"]);
        assert!(
            e.contains("--prompt 1: field \"prompt\"") && e.contains("(--max-new-tokens 63)"),
            "{e}"
        );
        let args = gen(&[
            "--temperature",
            "0",
            "--top-k",
            "3",
            "--max-new-tokens",
            "2",
        ]);
        let out = run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("warning: generate: --top-k filters what is sampled"),
            "{said}"
        );
    }

    /// A byte-level model exported for transformers carries a `tokenizer.json` that encodes
    /// as the byte tokenizer does, and reads back (as `--init` and `generate` read it) to the
    /// same logits; a reward model's tokenizer pads with the id its config.json names.
    #[test]
    fn a_byte_level_model_exports_for_transformers_with_its_tokenizer() {
        let rm_out = run_dir("rm-hf");
        run_ok(&[
            "export",
            "--checkpoint",
            arg(rm()),
            "--out",
            arg(&rm_out),
            "--format",
            "hf",
        ]);
        let read = |f: &str| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(rm_out.join(f)).unwrap()).unwrap()
        };
        let (cfg, tc) = (read("config.json"), read("tokenizer_config.json"));
        assert_eq!(cfg["pad_token_id"], 257);
        assert_eq!(tc["pad_token"], "<|pad|>", "{tc}");
        let out = run_dir("pre-hf");
        run_ok(&[
            "export",
            "--checkpoint",
            arg(pre()),
            "--out",
            arg(&out),
            "--format",
            "hf",
        ]);
        let tc = std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap();
        let tc: serde_json::Value = serde_json::from_str(&tc).unwrap();
        assert_eq!(
            (&tc["eos_token"], &tc["pad_token"]),
            (&"<|endoftext|>".into(), &"<|pad|>".into())
        );
        let loaded = temper::stages::loader::read_checkpoint(&out, &Device::Cpu).unwrap();
        let text = "2+3=5\n<|user|> héllo";
        let ids: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(loaded.tokenizer.encode(text).unwrap(), ids);
        assert_eq!(
            (loaded.tokenizer.eos_id(), loaded.tokenizer.pad_id()),
            (256, 257)
        );
        let (theirs, ours) = (super::logits_of(&out, &ids), super::logits_of(pre(), &ids));
        assert!(max_abs_diff(&theirs, &ours) <= 1e-5);
    }

    /// An SFT step weighs every response token once however it is cut into micro-batches
    /// (transformers' `num_items_in_batch`): `--batch-size 8` and `--batch-size 4 --grad-accum
    /// 2` take the same loss and gradient over examples of unequal lengths, and the held-out
    /// loss is a mean over its tokens whatever the batch size.
    #[test]
    fn sft_steps_weigh_tokens_alike_however_the_batch_is_cut() {
        let run = |name: &str, split: &[&str]| {
            let dir = run_dir(name);
            let mut args = vec![
                "sft",
                "--config",
                config(),
                "--init",
                arg(pre()),
                "--out",
                arg(&dir),
                "--steps",
                "2",
                "--log-every",
                "1",
                "--eval-every",
                "2",
                "--lr",
                "1e-4",
                "--device",
                "cpu",
            ];
            args.extend(split);
            run_ok(&args);
            let m = metrics(&dir);
            (
                series(&m, "train", "loss"),
                series(&m, "train", "grad_norm"),
                series(&m, "val", "loss"),
            )
        };
        let whole = run("sft-b8", &["--batch-size", "8"]);
        let cut = run("sft-b4x2", &["--batch-size", "4", "--grad-accum", "2"]);
        for (what, a, b) in [("loss", &whole.0, &cut.0), ("grad_norm", &whole.1, &cut.1)] {
            assert_eq!(a.len(), 2, "{what}: {a:?}");
            for ((s, x), (_, y)) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                    "step {s} {what}: {x} vs {y}"
                );
            }
        }
        // Held out at step 0, in chunks of 8 and of 4.
        let (x, y) = (whole.2[0].1, cut.2[0].1);
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(1.0),
            "held-out {x} vs {y}"
        );
    }

    #[test]
    fn lora_sft_leaves_the_base_weights_bitwise_unchanged() {
        let base = weights(&pre().join("final/model.safetensors"));
        let after = weights(&sft().join("final/model.safetensors"));
        assert_eq!(base.len(), after.len());
        for (name, a) in &base {
            assert_eq!(a, &after[name], "{name} changed");
        }
    }

    #[test]
    fn lora_sft_saves_only_the_adapters_in_their_own_file() {
        let adapters =
            candle_core::safetensors::load(sft().join("final/adapter.safetensors"), &Device::Cpu)
                .unwrap();
        // An A and a B for each of q, v and up in each of the 2 layers.
        assert!(
            adapters.keys().all(|k| k.contains(".lora_")) && adapters.len() == 2 * 3 * 2,
            "{:?}",
            adapters.keys()
        );
    }

    #[test]
    fn export_merge_writes_a_checkpoint_without_adapters() {
        assert!(!merged().join("adapter.safetensors").exists());
    }

    /// `export --format peft --dtype bf16` writes the adapters in bf16 (PEFT reads any type),
    /// the same factors as the run's to bf16's rounding, beside the byte tokenizer's
    /// tokenizer.json, as an hf export of the base carries it.
    #[test]
    fn peft_export_writes_its_adapters_in_the_dtype_asked_for() {
        let out = run_dir("peft-bf16");
        #[rustfmt::skip]
        run_ok(&["export", "--checkpoint", arg(sft()), "--out", arg(&out), "--format", "peft",
                 "--dtype", "bf16"]);
        let tokenizer = std::fs::read_to_string(out.join("tokenizer.json")).unwrap();
        assert!(tokenizer.contains("ByteLevel"), "{tokenizer}");
        let file = out.join("adapter_model.safetensors");
        let written = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
        assert!(written
            .values()
            .all(|t| t.dtype() == candle_core::DType::BF16));
        // Each tensor's values, in order; the two sides name them differently.
        let trained = weights(&sft().join("final/adapter.safetensors"));
        let mut want: Vec<Vec<f32>> = trained
            .values()
            .map(|v| {
                v.iter()
                    .map(|x| half::bf16::from_f32(*x).to_f32())
                    .collect()
            })
            .collect();
        let mut got: Vec<Vec<f32>> = written
            .values()
            .map(|t| {
                let t = t.to_dtype(candle_core::DType::F32).unwrap();
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect();
        want.sort_by(|a, b| a.partial_cmp(b).unwrap());
        got.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(got, want);
    }

    #[test]
    fn ppo_refuses_a_policy_where_a_reward_model_is_expected() {
        let e = run_err(&[
            "ppo",
            "--config",
            config(),
            "--init",
            arg(sft()),
            "--reward",
            arg(sft()),
            "--out",
            arg(&run_dir("x")),
            "--device",
            "cpu",
        ]);
        assert!(e.contains("policy") && e.contains("reward"), "{e}");
    }

    #[test]
    fn lora_ppo_says_its_reference_is_the_base_with_adapters_off() {
        let err = &ppo().stderr;
        assert!(err.contains("adapters off"), "{err}");
    }

    /// PPO's training records of the steps that sampled a rollout (the step of each rollout's
    /// first minibatch); there must be some.
    fn ppo_rollout_steps() -> Vec<serde_json::Value> {
        let first: Vec<_> = metrics(&ppo().dir)
            .into_iter()
            .filter(|v| v["split"] == "train" && v["rollout"] == 1.0)
            .collect();
        assert!(!first.is_empty());
        first
    }

    #[test]
    fn ppo_ratio_is_one_in_each_rollouts_first_minibatch() {
        for v in ppo_rollout_steps() {
            assert!(
                (v["ratio"].as_f64().unwrap() - 1.0).abs() < 1e-5,
                "ratio in the first minibatch: {v}"
            );
        }
    }

    /// Every rollout logs its diagnostics and time split; `train_s`, the training since the
    /// rollout before, from the second on.
    #[test]
    fn ppo_logs_its_rollout_and_minibatch_diagnostics() {
        for (i, v) in ppo_rollout_steps().iter().enumerate() {
            assert_eq!(v.get("train_s").is_some(), i > 0, "train_s: {v}");
            for k in [
                "score",
                "kl",
                "entropy",
                "clipfrac",
                "approx_kl",
                "value_loss",
                "explained_variance",
                "response_length",
                "gen_s",
                "gen_tokens_per_s",
                "gen_graph_replays",
                "score_s",
            ] {
                assert!(v.get(k).is_some(), "{k} not logged: {v}");
            }
        }
    }

    #[test]
    fn lora_ppo_leaves_the_merged_sft_base_untouched() {
        let ppo_w = weights(&ppo().dir.join("final/model.safetensors"));
        let merged_w = weights(&merged().join("model.safetensors"));
        for (name, a) in &merged_w {
            assert_eq!(a, &ppo_w[name], "{name}");
        }
    }

    /// DPO's relatives (`[dpo] loss_type`, label smoothing) each learn a preference: the
    /// held-out implicit-reward accuracy goes from ties at the start (policy = reference) to
    /// nearly every pair, and the held-out loss falls. A smoothing the
    /// loss cannot take is refused, naming the field.
    #[test]
    fn dpo_relatives_each_learn_a_preference() {
        let dir = run_dir("dpo-relatives");
        std::fs::create_dir_all(&dir).unwrap();
        let words = [
            "apple", "river", "stone", "cloud", "green", "table", "music", "light",
        ];
        let write = |name: &str, offset: usize, n: usize| {
            let body: String = (0..n)
                .map(|i| {
                    let (a, b) = (words[(i + offset) % 8], words[(3 * i + offset + 1) % 8]);
                    let w = format!("{a} {b}");
                    format!(
                        "{}\n",
                        serde_json::json!({"prompt": format!("say {w}: "), "chosen": w, "rejected": w.to_uppercase()})
                    )
                })
                .collect();
            let path = dir.join(name);
            std::fs::write(&path, body).unwrap();
            path
        };
        let (train, eval) = (write("prefs.jsonl", 0, 120), write("eval.jsonl", 5, 24));
        // DPO from the pretrained model on the pairs, under `[dpo] loss_type = loss`,
        // `label_smoothing = smoothing` and the lines `more`, into `name`, with `extra` flags.
        let dpo = |name: &str, loss: &str, smoothing: f64, more: &str, extra: &[&str]| {
            let cfg = dir.join(format!("{name}.toml"));
            // One name quoted, or TRL's list as it is.
            let loss = match loss.starts_with('[') {
                true => loss.to_string(),
                false => format!("\"{loss}\""),
            };
            let table = format!("[dpo]\nloss_type = {loss}\nlabel_smoothing = {smoothing}\n{more}");
            std::fs::write(&cfg, format!("{TINY_TOML}\n{table}")).unwrap();
            let out = dir.join(name);
            let mut args: Vec<String> = [
                "dpo",
                "--config",
                arg(&cfg),
                "--init",
                arg(pre()),
                "--data",
                arg(&train),
                "--out",
                arg(&out),
                "--device",
                "cpu",
            ]
            .iter()
            .map(|a| a.to_string())
            .collect();
            args.extend(extra.iter().map(|a| a.to_string()));
            (out, args)
        };
        let extra = [
            "--eval-data",
            arg(&eval),
            "--steps",
            "30",
            "--lr",
            "1e-3",
            "--eval-every",
            "30",
        ];
        // NCA without the chosen NLL (`rpo_alpha`, 1 by default): the NLL drives the chosen
        // log-ratio past NCA's optimum (beta c = ln 2), where its loss climbs again. DiscoPOP
        // at tau 0.2: at its default 0.05 the blend rises so steeply through h = 0 that the
        // loss pushes every margin slightly negative first, and on these uniform pairs none
        // gets past the bump (on the built-in task it does: BENCHMARKS.md).
        for (loss, smoothing, more) in [
            ("sigmoid", 0.1, ""),
            ("robust", 0.1, ""),
            ("hinge", 0.0, ""),
            ("ipo", 0.0, ""),
            ("simpo", 0.0, ""),
            ("orpo", 0.0, ""),
            ("exo_pair", 0.0, ""),
            ("nca_pair", 0.0, "rpo_alpha = 0.0"),
            ("sppo_hard", 0.0, ""),
            ("apo_zero", 0.0, ""),
            ("apo_down", 0.0, ""),
            ("discopop", 0.0, "discopop_tau = 0.2"),
            ("bco_pair", 0.0, ""),
            ("sigmoid_norm", 0.0, ""),
            ("aot", 0.1, ""),
            ("aot_unpaired", 0.0, ""),
        ] {
            let (out, args) = dpo(loss, loss, smoothing, more, &extra);
            let o = run_ok(&strs(&args));
            let err = String::from_utf8_lossy(&o.stderr);
            let reference_free = ["simpo", "orpo"].contains(&loss);
            let said = if reference_free {
                "reference: none"
            } else {
                "reference: a frozen copy"
            };
            assert!(err.contains(said), "{loss}: {err}");
            let m = metrics(&out);
            let (acc, loss_v) = (
                series(&m, "val", "reward_accuracy"),
                series(&m, "val", "loss"),
            );
            let (first, last) = (loss_v[0].1, loss_v.last().unwrap().1);
            // Where policy and reference agree, each loss starts at its own value: ln 2 for
            // DPO with or without smoothing and for robust DPO, 1 for the hinge, and
            // (1 / (2 beta))^2 = 25 for IPO at the default beta 0.1, twice that for hard SPPO
            // (both log-ratios 5 from their targets), EXO's KL from labels smoothed by 1e-3,
            // 2 ln 2 for NCA, 1 for either APO and DiscoPOP's even blend of ln 2 and 1. SimPO
            // and ORPO read no reference and start elsewhere: the base model already puts
            // more per-token probability on the lowercase responses.
            let exo = 0.5 * (0.5f64.ln() - 0.999f64.ln()) + 0.5 * (0.5f64.ln() - 1e-3f64.ln());
            let start = match loss {
                "sigmoid" | "robust" | "sigmoid_norm" | "aot" | "aot_unpaired" => Some(2f64.ln()),
                "hinge" | "apo_zero" | "apo_down" => Some(1.0),
                "ipo" => Some(25.0),
                "sppo_hard" => Some(50.0),
                "exo_pair" => Some(exo),
                "nca_pair" | "bco_pair" => Some(2.0 * 2f64.ln()),
                "discopop" => Some(0.5 * 2f64.ln() + 0.5),
                _ => None,
            };
            match start {
                Some(v) => assert!(
                    (first - v).abs() < 1e-3,
                    "{loss} starts at {first}, not {v}"
                ),
                None => assert!((first - 2f64.ln()).abs() > 1e-3, "{loss} starts at ln 2"),
            }
            assert!(acc.last().unwrap().1 >= 0.9, "{loss}: {acc:?}");
            assert!(last < first, "{loss}: held-out loss {first} -> {last}");
        }
        // TRL's padding_free: the same losses from packed rows (the unit test
        // `padding_free_sequences_give_the_padded_sums_and_gradients` checks the sums and
        // gradients exactly; over 30 steps only rounding may part the curves).
        let packed_extra = [&extra[..], &["--padding-free"]].concat();
        let (out, args) = dpo("packed", "sigmoid", 0.1, "", &packed_extra);
        run_ok(&strs(&args));
        let packed = series(&metrics(&out), "train", "loss");
        let padded = series(&metrics(&dir.join("sigmoid")), "train", "loss");
        assert_eq!(packed.len(), padded.len());
        for ((step, a), (_, b)) in packed.iter().zip(&padded) {
            assert!(
                (a - b).abs() <= 1e-3 * b.abs().max(1e-3),
                "step {step}: {a} vs {b}"
            );
        }
        // TRL's precompute_ref_log_probs: the reference scores every pair before training and
        // is dropped; the steps and the held-out losses are the ones it would have given.
        let early = [&extra[..], &["--precompute-ref-log-probs"]].concat();
        let (out, args) = dpo("precomputed", "sigmoid", 0.1, "", &early);
        let o = run_ok(&strs(&args));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("precomputed for 120 training and 24 held-out pairs"),
            "{err}"
        );
        for (split, field) in [("train", "loss"), ("train", "dpo_loss"), ("val", "loss")] {
            let early = series(&metrics(&out), split, field);
            let late = series(&metrics(&dir.join("sigmoid")), split, field);
            assert_eq!(early.len(), late.len());
            for ((step, a), (_, b)) in early.iter().zip(&late) {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1e-3),
                    "{split} {field} at step {step}: {a} vs {b}"
                );
            }
        }
        // TRL's sync_ref_model (TR-DPO): the reference moves 0.6 of the way to the policy
        // after steps 10, 20 and 30, so the held-out loss parts from plain DPO's after step 10
        // (and only then) and it still learns. A run cut at step 15 and resumed retraces the
        // whole one: the checkpoint kept the moved reference.
        let tr = "sync_ref_model = true\nref_model_sync_steps = 10\n";
        let every_step = [&extra[..], &["--log-every", "1"]].concat();
        let (out, args) = dpo("tr_dpo", "sigmoid", 0.1, tr, &every_step);
        let o = run_ok(&strs(&args));
        let err = String::from_utf8_lossy(&o.stderr);
        let moves = err.matches("the reference moved 0.6 of the way").count();
        assert_eq!(moves, 3, "{err}");
        let m = metrics(&out);
        let dpo_loss = series(&m, "train", "dpo_loss");
        let (out_plain, args) = dpo("tr_plain", "sigmoid", 0.1, "", &every_step);
        run_ok(&strs(&args));
        let plain = series(&metrics(&out_plain), "train", "dpo_loss");
        assert_eq!(dpo_loss.len(), 30);
        for ((step, a), (_, b)) in dpo_loss.iter().zip(&plain) {
            match *step <= 10 {
                true => assert!((a - b).abs() <= 1e-6, "step {step}: {a} vs {b}"),
                false => assert!(
                    (a - b).abs() > 1e-6,
                    "step {step}: the reference did not move"
                ),
            }
        }
        let acc = series(&m, "val", "reward_accuracy");
        assert!(acc.last().unwrap().1 >= 0.9, "tr-dpo: {acc:?}");
        let every = [&every_step[..], &["--checkpoint-every", "15"]].concat();
        let (cut, args) = dpo("tr_cut", "sigmoid", 0.1, tr, &every);
        run_ok(&strs(&args));
        let ckpts = cut.join("checkpoints");
        assert!(ckpts.join("step-0000015/reference.safetensors").exists());
        std::fs::remove_dir_all(ckpts.join("step-0000030")).unwrap();
        std::fs::remove_dir_all(cut.join("final")).unwrap();
        std::fs::write(ckpts.join("latest"), "step-0000015").unwrap();
        run_ok(&["dpo", "--resume", arg(&cut)]);
        let resumed = series(&metrics(&cut), "train", "loss");
        assert_eq!(
            resumed,
            series(&m, "train", "loss"),
            "the resumed run left the curve"
        );
        // Resumed again from step 15 with sync_ref_model off: the reference is the one the
        // checkpoint kept (moved at step 10), held still, so the curve follows the synced run
        // until its next move at step 20, and leaves it after.
        std::fs::remove_dir_all(ckpts.join("step-0000030")).unwrap();
        std::fs::remove_dir_all(cut.join("final")).unwrap();
        std::fs::write(ckpts.join("latest"), "step-0000015").unwrap();
        let config = cut.join("config.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        assert!(text.contains("sync_ref_model = true"), "{text}");
        std::fs::write(
            &config,
            text.replace("sync_ref_model = true", "sync_ref_model = false"),
        )
        .unwrap();
        let o = run_ok(&["dpo", "--resume", arg(&cut)]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("held still from here"), "{err}");
        let still = series(&metrics(&cut), "train", "dpo_loss");
        assert_eq!(still.len(), 30);
        for ((step, a), (_, b)) in still.iter().zip(&dpo_loss) {
            match *step <= 20 {
                true => assert_eq!(a, b, "step {step}"),
                false => assert_ne!(a, b, "step {step}: the reference moved"),
            }
        }
        // f-DPO: the sigmoid loss over the Jensen-Shannon scores log sigmoid(u) of the
        // log-ratios, which start equal (ln 2 again) and learn the preference.
        let js = "f_divergence_type = \"js_divergence\"\n";
        let (out, args) = dpo("js", "sigmoid", 0.0, js, &extra);
        run_ok(&strs(&args));
        let m = metrics(&out);
        let (acc, loss_v) = (
            series(&m, "val", "reward_accuracy"),
            series(&m, "val", "loss"),
        );
        assert!((loss_v[0].1 - 2f64.ln()).abs() < 1e-3, "js: {loss_v:?}");
        assert!(acc.last().unwrap().1 >= 0.9, "js: {acc:?}");
        assert!(loss_v.last().unwrap().1 < loss_v[0].1, "js: {loss_v:?}");
        // LD-DPO: at ld_alpha 1 every token counts once, the plain curve to the bit; at 0.5
        // the tokens past a pair's shared length count half, and it learns.
        let every_step_extra = [&extra[..], &["--log-every", "1"]].concat();
        let (one, args) = dpo(
            "ld_one",
            "sigmoid",
            0.1,
            "ld_alpha = 1.0\n",
            &every_step_extra,
        );
        run_ok(&strs(&args));
        assert_eq!(
            series(&metrics(&one), "train", "loss"),
            series(&metrics(&out_plain), "train", "loss"),
            "ld_alpha = 1 is DPO"
        );
        let (half, args) = dpo("ld_half", "sigmoid", 0.1, "ld_alpha = 0.5\n", &extra);
        run_ok(&strs(&args));
        let acc = series(&metrics(&half), "val", "reward_accuracy");
        assert!(acc.last().unwrap().1 >= 0.9, "ld_alpha 0.5: {acc:?}");
        // WPO (TRL's use_weighting): each pair's loss times its responses' weights under the
        // policy, so the held-out loss no longer starts at ln 2; it learns the preference.
        let (wpo, args) = dpo("wpo", "sigmoid", 0.0, "use_weighting = true\n", &extra);
        run_ok(&strs(&args));
        let m = metrics(&wpo);
        let (acc, loss_v) = (
            series(&m, "val", "reward_accuracy"),
            series(&m, "val", "loss"),
        );
        assert!((loss_v[0].1 - 2f64.ln()).abs() > 1e-3, "wpo: {loss_v:?}");
        let weights = series(&m, "train", "wpo_weight");
        assert!(
            !weights.is_empty() && weights.iter().all(|w| w.1 > 0.0 && w.1.is_finite()),
            "wpo: {weights:?}"
        );
        assert!(acc.last().unwrap().1 >= 0.9, "wpo: {acc:?}");
        assert!(loss_v.last().unwrap().1 < loss_v[0].1, "wpo: {loss_v:?}");
        // TRL's list of losses: MPO's sigmoid, bco_pair and the chosen NLL, weighted.
        let mpo = "[\"sigmoid\", \"bco_pair\", \"sft\"]";
        let weights = "loss_weights = [0.8, 0.2, 1.0]\nrpo_alpha = 0.0\n";
        let (out, args) = dpo("mpo", mpo, 0.0, weights, &extra);
        let o = run_ok(&strs(&args));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("loss sigmoid + bco_pair + sft"), "{err}");
        let m = metrics(&out);
        let (acc, loss_v) = (
            series(&m, "val", "reward_accuracy"),
            series(&m, "val", "loss"),
        );
        assert!(acc.last().unwrap().1 >= 0.9, "mpo: {acc:?}");
        assert!(loss_v.last().unwrap().1 < loss_v[0].1, "mpo: {loss_v:?}");
        let lora = [&extra[..], &["--sync-ref-model", "--lora-rank", "4"]].concat();
        let e = run_err(&strs(&dpo("tr_lora", "sigmoid", 0.1, "", &lora).1));
        assert!(
            e.contains("dpo.sync_ref_model needs full fine-tuning")
                && e.trim().lines().count() == 1,
            "{e}"
        );
        let e = run_err(&strs(&dpo("bad", "ipo", 0.1, "", &[]).1));
        assert!(
            e.contains("dpo.label_smoothing") && e.trim().lines().count() == 1,
            "{e}"
        );
    }

    /// KTO learns from completions labelled desirable or undesirable, some given as pairs
    /// (read unpaired): its held-out loss starts at 0.5 (policy = reference) and falls, and
    /// nearly every held-out example ends on its label's side of the KL baseline. APO-zero runs
    /// no KL estimate; packed rows take the padded steps; a bad label and a batch too small to
    /// estimate the KL are refused in one line.
    #[test]
    fn kto_learns_from_labelled_completions() {
        let dir = run_dir("kto");
        std::fs::create_dir_all(&dir).unwrap();
        let words = [
            "apple", "river", "stone", "cloud", "green", "table", "music", "light",
        ];
        // Every third record a pair; the others alternate desirable (lowercase) and
        // undesirable (uppercase) completions. Prompts of one to three words, so that packed
        // rows differ from padded ones.
        let write = |name: &str, offset: usize, n: usize| {
            let body: String = (0..n)
                .map(|i| {
                    let k = i + offset;
                    let w: Vec<&str> = (0..=k % 3).map(|j| words[(3 * k + j) % 8]).collect();
                    let w = w.join(" ");
                    let prompt = format!("say {w}: ");
                    let line = match i % 3 {
                        0 => serde_json::json!({"prompt": prompt, "chosen": w, "rejected": w.to_uppercase()}),
                        1 => serde_json::json!({"prompt": prompt, "completion": w, "label": true}),
                        _ => serde_json::json!({"prompt": prompt, "completion": w.to_uppercase(), "label": false}),
                    };
                    format!("{line}\n")
                })
                .collect();
            let path = dir.join(name);
            std::fs::write(&path, body).unwrap();
            path
        };
        let (train, eval) = (write("kto.jsonl", 0, 120), write("eval.jsonl", 7, 24));
        let kto = |name: &str, table: &str, data: &Path, extra: &[&str]| {
            let cfg = dir.join(format!("{name}.toml"));
            std::fs::write(&cfg, format!("{TINY_TOML}\n[kto]\n{table}")).unwrap();
            let out = dir.join(name);
            let mut args: Vec<String> = [
                "kto",
                "--config",
                arg(&cfg),
                "--init",
                arg(pre()),
                "--data",
                arg(data),
                "--eval-data",
                arg(&eval),
                "--out",
                arg(&out),
                "--steps",
                "30",
                "--lr",
                "1e-3",
                "--eval-every",
                "30",
                "--device",
                "cpu",
            ]
            .iter()
            .map(|a| a.to_string())
            .collect();
            args.extend(extra.iter().map(|a| a.to_string()));
            (out, args)
        };
        for loss in ["kto", "apo_zero_unpaired"] {
            let (out, args) = kto(loss, &format!("loss_type = \"{loss}\"\n"), &train, &[]);
            let o = run_ok(&strs(&args));
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(err.contains("reference: a frozen copy"), "{err}");
            // 40 pairs unpaired, 40 desirable and 40 undesirable records.
            assert!(
                err.contains("[kto] 80 desirable and 80 undesirable training examples\n"),
                "{err}"
            );
            let m = metrics(&out);
            let loss_v = series(&m, "val", "loss");
            let (first, last) = (loss_v[0].1, loss_v.last().unwrap().1);
            assert!((first - 0.5).abs() < 1e-4, "{loss} starts at {first}");
            assert!(
                last < first - 0.05,
                "{loss}: held-out loss {first} -> {last}"
            );
            let acc = series(&m, "val", "label_accuracy");
            // Every held-out example starts on the baseline, a tie counting one half.
            assert!(
                acc[0].1 == 0.5 && acc.last().unwrap().1 >= 0.9,
                "{loss}: {acc:?}"
            );
            let margin = series(&m, "val", "reward_margin");
            assert!(margin.last().unwrap().1 > 0.5, "{loss}: {margin:?}");
            let kl = series(&m, "train", "kl");
            if loss == "kto" {
                assert!(
                    !kl.is_empty() && kl.iter().all(|(_, k)| *k >= 0.0),
                    "{kl:?}"
                );
            } else {
                assert!(kl.is_empty(), "apo_zero_unpaired logged a KL: {kl:?}");
            }
        }
        // The KL baseline moves KTO's steps away from APO-zero's once it is above 0.
        let train_loss = |name: &str| series(&metrics(&dir.join(name)), "train", "loss");
        let (with_kl, without) = (train_loss("kto"), train_loss("apo_zero_unpaired"));
        assert!(
            with_kl
                .iter()
                .zip(&without)
                .any(|(a, b)| (a.1 - b.1).abs() > 1e-3),
            "{with_kl:?} vs {without:?}"
        );
        // Under LoRA the reference is the base with the adapters off, and only the adapters
        // train and are saved.
        let (out, args) = kto("lora", "", &train, &["--lora-rank", "4"]);
        let o = run_ok(&strs(&args));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("reference: the base with adapters off"),
            "{err}"
        );
        let loss_v = series(&metrics(&out), "val", "loss");
        let (first, last) = (loss_v[0].1, loss_v.last().unwrap().1);
        assert!(
            (first - 0.5).abs() < 1e-4 && last < 0.4,
            "LoRA: {first} -> {last}"
        );
        assert!(out.join("final/adapter.safetensors").exists());
        // TRL's padding_free: the same losses from packed rows, the KL's mismatched sequences
        // packed too.
        let (out, args) = kto("packed", "", &train, &["--padding-free"]);
        run_ok(&strs(&args));
        let packed = series(&metrics(&out), "train", "loss");
        let padded = series(&metrics(&dir.join("kto")), "train", "loss");
        assert_eq!(packed.len(), padded.len());
        for ((step, a), (_, b)) in packed.iter().zip(&padded) {
            assert!(
                (a - b).abs() <= 1e-3 * b.abs().max(1e-3),
                "step {step}: {a} vs {b}"
            );
        }
        let bad = dir.join("bad.jsonl");
        std::fs::write(
            &bad,
            "{\"prompt\": \"p\", \"completion\": \"c\", \"label\": true}\n{\"prompt\": \"p\", \"completion\": \"c\", \"label\": \"yes\"}\n",
        )
        .unwrap();
        let (_, args) = kto("bad", "", &bad, &[]);
        let e = run_err(&strs(&args));
        let last = e.trim().lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: ")
                && last.ends_with(
                    "bad.jsonl:2: field \"label\": expected true or false (or 1 or 0), got a string \"yes\""
                ),
            "{e}"
        );
        let (_, args) = kto("one", "", &train, &["--batch-size", "1"]);
        let e = run_err(&strs(&args));
        assert!(
            e.contains("train.batch_size must be at least 2") && e.trim().lines().count() == 1,
            "{e}"
        );
    }

    /// `[reward] center_rewards_coefficient` (TRL's) holds the scores' mean near 0, where
    /// Bradley-Terry alone, which fixes only differences, lets it drift (to 5.3 here); the
    /// training loss adds the term to Bradley-Terry's, logged apart.
    #[test]
    fn reward_centring_holds_the_scores_mean_near_zero() {
        let dir = run_dir("rm-centring");
        std::fs::create_dir_all(&dir).unwrap();
        let centred = dir.join("c.toml");
        let text = std::fs::read_to_string(config()).unwrap();
        std::fs::write(
            &centred,
            format!("{text}\n[reward]\ncenter_rewards_coefficient = 0.1\n"),
        )
        .unwrap();
        let run = |name: &str, cfg: &str| {
            let out = dir.join(name);
            #[rustfmt::skip]
            run_ok(&["reward", "--config", cfg, "--init", arg(sft()), "--out", arg(&out),
                     "--steps", "40", "--log-every", "1", "--eval-every", "40", "--device", "cpu"]);
            metrics(&out)
        };
        let (off, on) = (run("off", config()), run("on", arg(&centred)));
        let held_out = |m: &[serde_json::Value], key: &str| series(m, "val", key).last().unwrap().1;
        let (drift, held) = (held_out(&off, "reward_mean"), held_out(&on, "reward_mean"));
        assert!(drift.abs() > 1.0 && held.abs() < 0.2, "{drift} vs {held}");
        let (loss, bt) = (
            series(&on, "train", "loss"),
            series(&on, "train", "bt_loss"),
        );
        assert_eq!(loss.len(), bt.len());
        assert!(
            loss.iter().zip(&bt).all(|(l, b)| l.1 > b.1),
            "{loss:?} vs {bt:?}"
        );
        assert!(series(&off, "train", "bt_loss").is_empty());
    }

    /// `reward --padding-free` scores each micro-batch's chosen and rejected sequences packed:
    /// the padded run's losses step for step (the unit test
    /// `packed_sequences_score_and_train_as_padded_ones` checks scores and gradients exactly).
    /// Prompts of one to four words, so that a batch's sequences differ in length and pack.
    #[test]
    fn padding_free_reward_modelling_takes_the_padded_steps() {
        let dir = run_dir("rm-padding-free");
        std::fs::create_dir_all(&dir).unwrap();
        let words = ["apple", "river", "stone", "cloud", "green", "table"];
        let body: String = (0..64)
            .map(|i| {
                let w: Vec<&str> = (0..=i % 4).map(|k| words[(i + k) % 6]).collect();
                let w = w.join(" ");
                let line = serde_json::json!({"prompt": format!("say {w}: "), "chosen": w,
                    "rejected": w.to_uppercase()});
                format!("{line}\n")
            })
            .collect();
        let data = dir.join("prefs.jsonl");
        std::fs::write(&data, body).unwrap();
        let run = |name: &str, extra: &[&str]| {
            let out = dir.join(name);
            let mut a = vec![
                "reward",
                "--config",
                config(),
                "--init",
                arg(sft()),
                "--data",
                arg(&data),
                "--out",
                arg(&out),
                "--steps",
                "6",
                "--log-every",
                "1",
                "--device",
                "cpu",
            ];
            a.extend(extra);
            run_ok(&a);
            let saved = std::fs::read_to_string(out.join("config.toml")).unwrap();
            let on = saved.contains("padding_free = true");
            (series(&metrics(&out), "train", "loss"), on)
        };
        let (padded, off) = run("padded", &[]);
        let (packed, on) = run("packed", &["--padding-free"]);
        // The flag reaches the run's configuration, which `Scorer::score` is called with.
        assert!(on && !off);
        assert_eq!(padded.len(), 6, "{padded:?}");
        assert_eq!(packed.len(), padded.len());
        for ((step, a), (_, b)) in packed.iter().zip(&padded) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1e-2),
                "step {step}: packed {a}, padded {b}"
            );
        }
    }

    #[test]
    fn lora_dpo_starts_at_log_2() {
        let first_val = series(&metrics(dpo()), "val", "loss")[0].1;
        assert!(
            (first_val - 2f64.ln()).abs() < 1e-4,
            "DPO starts at log 2, got {first_val}"
        );
    }
}

#[test]
fn malformed_stage_data_and_long_prompts_fail_clearly() {
    let d = tmp();
    let dir = d.path();
    let cfg = p(dir, "c.toml");
    std::fs::write(&cfg, TINY_TOML).unwrap();
    let c = cfg.to_str().unwrap();
    let pre = p(dir, "pre");
    pretrain_on_cpu(c, &pre, 2);
    // Runs `stage` from `pre` on `data`, which must fail; returns the error.
    let stage_fails = |stage: &str, data: &std::path::Path, out: &str| {
        run_err(&[
            stage,
            "--config",
            c,
            "--init",
            pre.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            p(dir, out).to_str().unwrap(),
        ])
    };
    let bad = p(dir, "sft.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\"}\n",
    )
    .unwrap();
    let e = stage_fails("sft", &bad, "s");
    assert!(e.contains("sft.jsonl:2") && e.contains("response"), "{e}");
    let prefs = p(dir, "prefs.jsonl");
    std::fs::write(
        &prefs,
        "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": 3}\n",
    )
    .unwrap();
    let e = stage_fails("reward", &prefs, "r");
    assert!(e.contains("prefs.jsonl:1") && e.contains("rejected"), "{e}");
    let prompts = p(dir, "prompts.jsonl");
    let long = "x".repeat(200);
    std::fs::write(&prompts, format!("{{\"prompt\": \"{long}\", \"answer\": \"1\"}}\n{{\"prompt\": \"y\", \"answer\": \"1\"}}\n")).unwrap();
    let e = stage_fails("ppo", &prompts, "p");
    assert!(
        e.contains("prompts.jsonl:1") && e.contains("\"prompt\"") && e.contains("context"),
        "{e}"
    );
    let sft_long = p(dir, "long_sft.jsonl");
    std::fs::write(
        &sft_long,
        format!("{{\"prompt\": \"a\", \"response\": \"b\"}}\n{{\"prompt\": \"{long}\", \"response\": \"1\"}}\n"),
    )
    .unwrap();
    let e = stage_fails("sft", &sft_long, "s3");
    assert!(
        e.contains("long_sft.jsonl:2") && e.contains("context"),
        "{e}"
    );
    let long_prefs = p(dir, "long_prefs.jsonl");
    std::fs::write(
        &long_prefs,
        format!("{{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}}\n{{\"prompt\": \"q\", \"chosen\": \"{long}\", \"rejected\": \"c\"}}\n{{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"d\"}}\n"),
    )
    .unwrap();
    for stage in ["reward", "dpo"] {
        let e = stage_fails(stage, &long_prefs, &format!("{stage}_long"));
        assert!(
            e.contains("long_prefs.jsonl:2") && e.contains("context"),
            "{stage}: {e}"
        );
    }
    let e = run_err(&[
        "sft",
        "--config",
        c,
        "--out",
        p(dir, "s2").to_str().unwrap(),
    ]);
    assert!(e.contains("--init"), "{e}");
}

/// `[data] truncation` fits records longer than the context (64 positions, so 65 tokens of
/// a training sequence) instead of refusing them: `drop` leaves them out, `keep_end` keeps
/// their last tokens, `keep_start` their first (and leaves out one whose response would be
/// cut away entirely), each said in one line. PPO refuses the cut modes and leaves prompts
/// out under `drop`.
#[test]
fn over_long_records_are_left_out_or_cut_as_data_truncation_says() {
    let d = tmp();
    let dir = d.path();
    let cfg = p(dir, "c.toml");
    std::fs::write(&cfg, TINY_TOML).unwrap();
    let pre = p(dir, "pre");
    pretrain_on_cpu(cfg.to_str().unwrap(), &pre, 2);
    let long = "x".repeat(200);
    // One long record first, so that it is in the training split; the last is held out.
    let write = |name: &str, long_line: String, short: &dyn Fn(usize) -> String| {
        let path = p(dir, name);
        let lines: Vec<String> = std::iter::once(long_line)
            .chain((0..5).map(short))
            .collect();
        std::fs::write(&path, lines.join("\n")).unwrap();
        path
    };
    let sft = write(
        "sft.jsonl",
        format!("{{\"prompt\": \"{long}\", \"response\": \"1\"}}"),
        &|i| format!("{{\"prompt\": \"a{i}\", \"response\": \"b\"}}"),
    );
    let prefs = write(
        "prefs.jsonl",
        format!("{{\"prompt\": \"q\", \"chosen\": \"{long}\", \"rejected\": \"c\"}}"),
        &|i| format!("{{\"prompt\": \"a{i}\", \"chosen\": \"b\", \"rejected\": \"c\"}}"),
    );
    let labelled = write(
        "kto.jsonl",
        format!("{{\"prompt\": \"{long}\", \"completion\": \"1\", \"label\": true}}"),
        &|i| {
            format!(
                "{{\"prompt\": \"a{i}\", \"completion\": \"b\", \"label\": {}}}",
                i % 2 == 0
            )
        },
    );
    let prompts = write(
        "prompts.jsonl",
        format!("{{\"prompt\": \"{long}\", \"answer\": \"1\"}}"),
        &|i| format!("{{\"prompt\": \"{i}+1=\", \"answer\": \"{}\"}}", i + 1),
    );
    // Runs `stage` for one step on `data` under `truncation`; its stderr, and whether it ran.
    let run = |stage: &str, data: &std::path::Path, truncation: &str| -> (String, bool) {
        let c = p(dir, &format!("{stage}-{truncation}.toml"));
        let extra = "[ppo]\nrollout_batch = 4\nminibatch_size = 4\neval_prompts = 2\n";
        let text = format!("{TINY_TOML}\n[data]\ntruncation = \"{truncation}\"\n{extra}");
        std::fs::write(&c, text).unwrap();
        let out = temper()
            .args([
                stage,
                "--config",
                c.to_str().unwrap(),
                "--init",
                pre.to_str().unwrap(),
            ])
            .args([
                "--data",
                data.to_str().unwrap(),
                "--steps",
                "1",
                "--eval-every",
                "100",
            ])
            .args(["--device", "cpu", "--out"])
            .arg(p(dir, &format!("{stage}-{truncation}")))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        (err, out.status.success())
    };
    // Each run, and the end of the line it prints: "[stage] 1 of 5 training {what} were
    // longer than {limit} tokens ([data] truncation = \"{mode}\"): {outcome}".
    let cut = |n: usize| format!("1 cut to their last {n} tokens");
    let cases: [(&str, &std::path::Path, &str, &str, usize, String); 8] = [
        ("sft", &sft, "drop", "examples", 65, "1 left out".into()),
        ("sft", &sft, "keep_end", "examples", 65, cut(65)),
        // The first 65 tokens are all prompt: nothing would be left to learn.
        (
            "sft",
            &sft,
            "keep_start",
            "examples",
            65,
            "1 left out".into(),
        ),
        (
            "dpo",
            &prefs,
            "keep_start",
            "pairs",
            65,
            "1 cut to their first 65 tokens".into(),
        ),
        ("kto", &labelled, "drop", "records", 65, "1 left out".into()),
        // keep_end cuts the long prompt's start and keeps the completion.
        ("kto", &labelled, "keep_end", "records", 65, cut(65)),
        // A pair's two completions together: the long chosen one cut, the rejected one whole.
        (
            "kto",
            &prefs,
            "keep_start",
            "records",
            65,
            "1 cut to their first 65 tokens".into(),
        ),
        // A reward model reads whole sequences, no shift: 64 tokens. The long reply fills
        // them, so keep_end would keep none of the prompt: the pair is left out.
        (
            "reward",
            &prefs,
            "keep_end",
            "pairs",
            64,
            "1 left out".into(),
        ),
    ];
    for (stage, data, mode, what, limit, outcome) in cases {
        let (err, ok) = run(stage, data, mode);
        let line = format!(
            "[{stage}] 1 of 5 training {what} were longer than {limit} tokens ([data] truncation = \"{mode}\"): {outcome}\n"
        );
        assert!(ok && err.contains(&line), "{stage} {mode}: {err}");
    }
    let (err, ok) = run("reward", &prefs, "keep_start");
    assert!(
        !ok && err.contains("a reward model is scored at a sequence's last token"),
        "{err}"
    );
    let (err, ok) = run("ppo", &prompts, "drop");
    assert!(
        ok && err.contains("[ppo] 1 of 5 training prompts left no room for"),
        "{err}"
    );
    let (err, ok) = run("ppo", &prompts, "keep_end");
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(
        !ok && last.starts_with("error: ")
            && last.contains(
                "ppo-keep_end.toml:16: data.truncation = \"keep_end\": ppo's prompts are not cut"
            ),
        "{err}"
    );
    let (err, ok) = run("sft", &sft, "error");
    assert!(
        !ok && err.contains(
            "sft.jsonl:1: 202 tokens, more than the 65 that fit the model's context of 64"
        ),
        "{err}"
    );
    let (err, ok) = run("ppo", &prompts, "error");
    assert!(
        !ok && err.contains("([data] truncation = \"drop\" leaves such prompts out)"),
        "{err}"
    );
}

#[test]
fn sft_learns_chat_data_rendered_by_a_tokenizer_config_template() {
    let d = tmp();
    let dir = d.path();
    let cfg = p(dir, "c.toml");
    std::fs::write(&cfg, TINY_TOML).unwrap();
    let c = cfg.to_str().unwrap();
    let tpl = p(dir, "tokenizer_config.json");
    // ChatML's shape with one-letter markers: the tiny test model's context is 64 tokens.
    let chatml = "{% for m in messages %}{{ '<' + m['role'][0] + '>' + m['content'].strip() + '</>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<a>' }}{% endif %}";
    std::fs::write(
        &tpl,
        serde_json::json!({"eos_token": "</>", "chat_template": chatml}).to_string(),
    )
    .unwrap();
    let data = p(dir, "chat.jsonl");
    let lines: Vec<String> = (0..240u32)
        .map(|i| {
            let (a, b) = (i % 17, (i * 7) % 23);
            serde_json::json!({"messages": [
                {"role": "system", "content": "add"},
                {"role": "user", "content": format!(" {a}+{b} ")},
                {"role": "assistant", "content": format!("{}", a + b)},
            ]})
            .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let pre = p(dir, "pre");
    pretrain_on_cpu(c, &pre, 20);
    let sft = p(dir, "sft");
    let base = [
        "sft",
        "--config",
        c,
        "--init",
        pre.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    let args = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let o = run_ok(&strs(&args(&[
        "--chat-template",
        tpl.to_str().unwrap(),
        "--chat-template-kwargs",
        r#"{"enable_thinking": false}"#,
        "--out",
        sft.to_str().unwrap(),
        "--steps",
        "60",
        "--eval-every",
        "20",
    ])));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("not used"), "{err}");
    let val = series(&metrics(&sft), "val", "loss");
    let (first, last) = (val[0].1, val[val.len() - 1].1);
    assert!(
        last < 0.6 * first,
        "held-out assistant loss {first} -> {last}"
    );
    let written = std::fs::read_to_string(sft.join("config.toml")).unwrap();
    assert!(written.contains("chat_template"), "{written}");
    assert!(written.contains("enable_thinking = false"), "{written}");
    // Without one the built-in template renders the conversations, and the run says so: its
    // checkpoints carry no template for transformers to render them alike.
    let builtin = p(dir, "sft-builtin");
    let o = run_ok(&strs(&args(&[
        "--out",
        builtin.to_str().unwrap(),
        "--steps",
        "2",
    ])));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("conversations render with temper's built-in chat template"),
        "{err}"
    );

    // Two turns whose template drops the first answer's working, as Qwen3's drops earlier
    // thoughts: refused without {% generation %} markers, trained with them.
    let marked = "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<a>' }}{% generation %}{% if loop.last %}{{ m['content'] }}{% else %}{{ m['content'].split('</t>')[-1] }}{% endif %}{{ '</>\n' }}{% endgeneration %}{% else %}{{ '<u>' + m['content'].strip() + '</>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<a>' }}{% endif %}";
    let turns = p(dir, "turns.jsonl");
    let lines: Vec<String> = (0..240u32)
        .map(|i| {
            let (a, b, c) = (i % 17, (i * 7) % 23, (i * 3) % 11);
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("{a}+{b}")},
                {"role": "assistant", "content": format!("<t>{a}+{b}</t>{}", a + b)},
                {"role": "user", "content": format!("{c}+{c}")},
                {"role": "assistant", "content": format!("<t>{c}+{c}</t>{}", 2 * c)},
            ]})
            .to_string()
        })
        .collect();
    std::fs::write(&turns, lines.join("\n")).unwrap();
    let on_turns = |template: &str, out: &str| -> Vec<String> {
        let file = p(dir, &format!("{out}.jinja"));
        std::fs::write(&file, template).unwrap();
        let (file, out) = (file.to_str().unwrap(), p(dir, out));
        let (turns, pre) = (turns.to_str().unwrap(), pre.to_str().unwrap());
        [
            "sft",
            "--config",
            c,
            "--init",
            pre,
            "--data",
            turns,
            "--device",
            "cpu",
            "--chat-template",
            file,
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "60",
            "--eval-every",
            "20",
        ]
        .map(String::from)
        .to_vec()
    };
    let bare = marked
        .replace("{% generation %}", "")
        .replace("{% endgeneration %}", "");
    let e = run_err(&strs(&on_turns(&bare, "bare")));
    assert!(
        e.contains("turns.jsonl:1")
            && e.contains("{% generation %}")
            && e.contains("assistant_only_loss = false"),
        "{e}"
    );
    // Trained on every token, as TRL trains without assistant_only_loss, the conversation is
    // rendered once and the unmarked template serves.
    let mut whole = on_turns(&bare, "whole");
    whole.extend(["--assistant-only-loss", "false"].map(String::from));
    run_ok(&strs(&whole));
    let val = series(&metrics(&p(dir, "whole")), "val", "loss");
    let (first, last) = (val[0].1, val[val.len() - 1].1);
    assert!(
        last < 0.75 * first,
        "held-out loss on whole conversations {first} -> {last}"
    );
    let written = std::fs::read_to_string(p(dir, "whole").join("config.toml")).unwrap();
    assert!(written.contains("assistant_only_loss = false"), "{written}");
    run_ok(&strs(&on_turns(marked, "marked")));
    let val = series(&metrics(&p(dir, "marked")), "val", "loss");
    let (first, last) = (val[0].1, val[val.len() - 1].1);
    assert!(
        last < 0.6 * first,
        "held-out assistant loss with generation blocks {first} -> {last}"
    );

    // Keywords asked of data with no conversation are said to go unused (the template is
    // saved with the model all the same).
    let plain = p(dir, "plain.jsonl");
    let lines: Vec<String> = (0..40u32)
        .map(|i| {
            serde_json::json!({"prompt": format!("{i}+1="), "completion": format!("{}", i + 1)})
                .to_string()
        })
        .collect();
    std::fs::write(&plain, lines.join("\n")).unwrap();
    let o = run_ok(
        &[
            &base[..6],
            &[
                plain.to_str().unwrap(),
                "--device",
                "cpu",
                "--chat-template",
                tpl.to_str().unwrap(),
                "--chat-template-kwargs",
                r#"{"enable_thinking": false}"#,
                "--out",
                p(dir, "plain").to_str().unwrap(),
                "--steps",
                "1",
            ],
        ]
        .concat(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "warning: --chat-template-kwargs ([data] chat_template_kwargs) is not used: no \
             record of {} is a conversation",
            plain.display()
        )),
        "{err}"
    );

    // Template variables with no Jinja template to read them are refused.
    let e = run_err(&strs(&args(&[
        "--chat-template-kwargs",
        r#"{"enable_thinking": false}"#,
        "--out",
        p(dir, "w").to_str().unwrap(),
    ])));
    assert!(
        e.contains("chat_template_kwargs") && e.contains("no Jinja chat template"),
        "{e}"
    );

    // A config without a template, and a template that raises, fail naming what is wrong.
    let empty = p(dir, "plain_config.json");
    std::fs::write(&empty, r#"{"eos_token": "</s>"}"#).unwrap();
    let e = run_err(&strs(&args(&[
        "--chat-template",
        empty.to_str().unwrap(),
        "--out",
        p(dir, "x").to_str().unwrap(),
    ])));
    assert!(
        e.contains("plain_config.json") && e.contains("chat_template"),
        "{e}"
    );
    let strict = p(dir, "strict.jinja");
    std::fs::write(&strict, "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}").unwrap();
    let e = run_err(&strs(&args(&[
        "--chat-template",
        strict.to_str().unwrap(),
        "--out",
        p(dir, "y").to_str().unwrap(),
    ])));
    assert!(
        e.contains("chat.jsonl:1") && e.contains("no system role"),
        "{e}"
    );
}

/// SFT on packed rows (`[sft] packing`) learns the built-in task: held-out loss (unpacked,
/// so comparable with an unpacked run's) falls to a fraction of where it starts and accuracy
/// rises far above the base model's. Sums of one digit without the demonstrator's slips, so
/// the tiny model learns them in a few hundred steps. Resuming it unpacked is refused, and
/// (`--packing` on an unpacked config) an example too long for a row is refused by its file
/// and line.
#[test]
fn packed_sft_learns_the_task() {
    let d = tmp();
    let dir = d.path();
    let cfg = p(dir, "c.toml");
    std::fs::write(
        &cfg,
        format!("{TINY_TOML}\n[sft]\npacking = true\n[data]\ntask_max_operand = 9\ntask_carry_slip = 0.0\n"),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let pre = p(dir, "pre");
    pretrain_on_cpu(c, &pre, 200);
    let sft = p(dir, "sft");
    #[rustfmt::skip]
    let out = run_ok(&["sft", "--config", c, "--init", pre.to_str().unwrap(),
                       "--out", sft.to_str().unwrap(), "--steps", "300", "--eval-every", "5",
                       "--device", "cpu"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[sft] packing: 4000 examples into") && err.contains("rows of 48 positions"),
        "{err}"
    );
    let val = series(&metrics(&sft), "val", "loss");
    let (first, last) = (val[0].1, val[val.len() - 1].1);
    assert!(
        last < 0.25 * first,
        "held-out response loss {first} -> {last}"
    );
    // "sft: accuracy A (base model B)"
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("sft: accuracy"))
        .unwrap_or_else(|| panic!("{text}"));
    let nums: Vec<f64> = line
        .split(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
        .filter_map(|w| w.parse().ok())
        .collect();
    let (acc, base) = (nums[0], nums[1]);
    assert!(acc > base + 0.25, "{line}");

    // The sampler's position counts packed rows: resuming without packing is refused (a
    // --config beside --resume is laid over the run's own, so it says packing = false).
    let unpacked = p(dir, "unpacked.toml");
    std::fs::write(
        &unpacked,
        format!(
            "{TINY_TOML}\n[data]\ntask_max_operand = 9\ntask_carry_slip = 0.0\n\
             [sft]\npacking = false\n"
        ),
    )
    .unwrap();
    #[rustfmt::skip]
    let e = run_err(&["sft", "--resume", sft.to_str().unwrap(), "--init", pre.to_str().unwrap(),
                      "--config", unpacked.to_str().unwrap(), "--steps", "310", "--device", "cpu"]);
    assert!(e.contains("packing = true"), "{e}");
    // Nor with rows of another length: the sampler's position would name other examples.
    #[rustfmt::skip]
    let e = run_err(&["sft", "--resume", sft.to_str().unwrap(), "--init", pre.to_str().unwrap(),
                      "--seq-len", "40", "--steps", "310", "--device", "cpu"]);
    assert!(e.contains("--seq-len 40: the run trains with 48"), "{e}");
    // Another stage's packing flag is refused rather than ignored.
    #[rustfmt::skip]
    let e = run_err(&["dpo", "--packing", "--init", sft.to_str().unwrap(), "--device", "cpu"]);
    assert!(
        e.contains("--packing applies to sft, ppo, grpo and online-dpo, not dpo"),
        "{e}"
    );
    // A refused resume leaves the run's configuration as it was.
    let saved = std::fs::read_to_string(sft.join("config.toml")).unwrap();
    assert!(
        saved.contains("packing = true") && saved.contains("seq_len = 48"),
        "{saved}"
    );

    let data = p(dir, "long.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"1+1\", \"response\": \"2\"}\n{\"prompt\": \"12345+67890\", \"response\": \"80235\"}\n{\"prompt\": \"2+2\", \"response\": \"4\"}\n",
    )
    .unwrap();
    #[rustfmt::skip]
    let e = run_err(&["sft", "--config", unpacked.to_str().unwrap(), "--packing",
                      "--init", pre.to_str().unwrap(), "--data", data.to_str().unwrap(),
                      "--seq-len", "12", "--out", p(dir, "long").to_str().unwrap(),
                      "--device", "cpu"]);
    assert!(
        e.contains("long.jsonl:2") && e.contains("seq_len") && e.contains("packing"),
        "{e}"
    );
    // Where records are cut, the training examples are cut to the rows, and the held-out ones,
    // evaluated unpacked, only to the model's context.
    let cut = p(dir, "cut.toml");
    std::fs::write(
        &cut,
        format!(
            "{TINY_TOML}\n[data]\ntask_max_operand = 9\ntruncation = \"keep_start\"\n\
             [sft]\npacking = true\n"
        ),
    )
    .unwrap();
    #[rustfmt::skip]
    let out = run_ok(&["sft", "--config", cut.to_str().unwrap(), "--init", pre.to_str().unwrap(),
                       "--data", data.to_str().unwrap(), "--eval-data", data.to_str().unwrap(),
                       "--seq-len", "12", "--steps", "1", "--out", p(dir, "cut").to_str().unwrap(),
                       "--device", "cpu"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("training examples") && !err.contains("held-out examples"),
        "{err}"
    );
}

/// Pretraining under `[data] document_mask` (the built-in corpus's documents are 8 to 24
/// lines, so most windows of 48 tokens cross one) learns: held-out loss falls below half its
/// start. That each document is then scored as if alone is the unit test
/// `stages::pretrain::tests::masked_documents_score_as_if_alone`.
#[test]
fn pretraining_under_a_document_mask_learns() {
    let d = tmp();
    let dir = d.path();
    let cfg = p(dir, "c.toml");
    std::fs::write(&cfg, format!("{TINY_TOML}\n[data]\ndocument_mask = true\n")).unwrap();
    let out = p(dir, "pre");
    #[rustfmt::skip]
    let log = run_ok(&["pretrain", "--config", cfg.to_str().unwrap(), "--out",
                       out.to_str().unwrap(), "--steps", "150", "--eval-every", "50",
                       "--device", "cpu"]);
    let saved = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(saved.contains("document_mask = true"), "{saved}");
    let err = String::from_utf8_lossy(&log.stderr);
    assert!(err.contains("[pretrain] document mask:"), "{err}");
    let val = series(&metrics(&out), "val", "loss");
    let (first, last) = (val[0].1, val[val.len() - 1].1);
    assert!(last < 0.5 * first, "held-out loss {first} -> {last}");
}

#[test]
fn later_stages_inherit_the_task_world_of_their_init() {
    let d = tmp();
    let dir = d.path();
    let cfg = p(dir, "c.toml");
    std::fs::write(&cfg, format!("{TINY_TOML}\n[data]\ntask_seed = 3\n")).unwrap();
    let plain = p(dir, "plain.toml");
    std::fs::write(&plain, format!("{TINY_TOML}\n[sft]\neval_prompts = 8\n")).unwrap();
    let pre = p(dir, "pre");
    let sft = p(dir, "sft");
    pretrain_on_cpu(cfg.to_str().unwrap(), &pre, 2);
    #[rustfmt::skip]
    run_ok(&["sft", "--config", plain.to_str().unwrap(), "--init", pre.to_str().unwrap(),
             "--out", sft.to_str().unwrap(), "--steps", "1", "--device", "cpu"]);
    let written = std::fs::read_to_string(sft.join("config.toml")).unwrap();
    assert!(written.contains("task_seed = 3"), "{written}");
}

/// The Hugging Face fixture of `family` (tests/fixtures/hf/), a model directory temper reads.
fn hf_fixture(family: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(family)
}

/// temper's logits (`[T, V]`, f32) of `ids` under the model in `dir`, as read by `--init`.
fn logits_of(dir: &std::path::Path, ids: &[u32]) -> candle_core::Tensor {
    use candle_core::{DType, Device, Tensor};
    use temper::model::linear::Ctx;
    use temper::model::Fwd;
    let loaded = temper::stages::loader::read_checkpoint(dir, &Device::Cpu).unwrap();
    let mut store = temper::train::params::ParamStore::new(Device::Cpu, 0);
    let net = temper::stages::loader::policy_from(&loaded, &mut store, None).unwrap();
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let f = Fwd {
        ctx: Ctx::plain(DType::F32),
        positions: None,
        key_valid: None,
        segments: None,
    };
    net.forward(&x, &f, None).unwrap().squeeze(0).unwrap()
}

/// `export --format hf` writes the type `--dtype` asks for, says it in config.json, and past
/// `--max-shard-size` writes transformers' shards and index; temper reads each back (`--init`
/// and generate), with the f32 export's logits to rounding of the type; an export over an
/// earlier one with the other layout leaves none of the earlier weight files to be read.
#[test]
fn hf_export_writes_the_dtype_and_shards_asked_for_and_reads_them_back() {
    use candle_core::{DType, Device};
    let d = tmp();
    let src = hf_fixture("llama");
    let export = |out: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["export", "--checkpoint", src.to_str().unwrap()];
        args.extend(["--out", out.to_str().unwrap(), "--format", "hf"]);
        args.extend(extra);
        run_ok(&args)
    };
    let config = |dir: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
    };
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 300).collect();

    // The default: f32, one file, as before.
    let f32_dir = p(d.path(), "f32");
    export(&f32_dir, &[]);
    assert!(f32_dir.join("model.safetensors").is_file());
    assert!(!f32_dir.join("model.safetensors.index.json").exists());
    assert_eq!(config(&f32_dir)["dtype"], "float32");
    let want = logits_of(&f32_dir, &ids);
    let source = logits_of(&src, &ids);
    assert!(max_abs_diff(&want, &source) <= 1e-5);
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();

    // The tolerances are a few times what was measured: 0.7% and 0.08% of the largest logit.
    for (dtype, torch, stored, tol) in [
        ("bf16", "bfloat16", DType::BF16, 0.02),
        ("f16", "float16", DType::F16, 0.004),
    ] {
        let dir = p(d.path(), dtype);
        let said = export(&dir, &["--dtype", dtype, "--max-shard-size", "40KB"]);
        let said = String::from_utf8_lossy(&said.stdout);
        assert!(said.contains(dtype) && said.contains("shards"), "{said}");
        assert!(!dir.join("model.safetensors").exists());
        let c = config(&dir);
        assert_eq!(
            (&c["dtype"], &c["torch_dtype"]),
            (&torch.into(), &torch.into())
        );
        let index: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let map = index["weight_map"].as_object().unwrap();
        let mut files: Vec<&str> = map.values().map(|f| f.as_str().unwrap()).collect();
        files.sort();
        files.dedup();
        let n = files.len();
        assert!(n > 2, "{n} shards of a 300 KB model at 40 KB");
        let (mut total, mut seen) = (0u64, 0);
        for (k, file) in files.iter().enumerate() {
            assert_eq!(*file, format!("model-{:05}-of-{n:05}.safetensors", k + 1));
            let tensors = candle_core::safetensors::load(dir.join(file), &Device::Cpu).unwrap();
            let mut bytes = 0u64;
            for (name, t) in &tensors {
                assert_eq!(t.dtype(), stored, "{name}");
                assert_eq!(map[name], *file, "{name}");
                bytes += (t.elem_count() * stored.size_in_bytes()) as u64;
            }
            assert!(
                bytes <= 40_000 || tensors.len() == 1,
                "{file}: {bytes} bytes"
            );
            (total, seen) = (total + bytes, seen + tensors.len());
        }
        assert_eq!(seen, map.len());
        assert_eq!(index["metadata"]["total_size"], total);
        let got = logits_of(&dir, &ids);
        let diff = max_abs_diff(&got, &want);
        assert!(
            diff <= tol * scale,
            "{dtype}: logits differ by {diff} (of {scale})"
        );
    }

    // The sharded bf16 model through the CLI: sampled from, and trained from.
    let bf16 = p(d.path(), "bf16");
    run_ok(&[
        "generate",
        "--checkpoint",
        bf16.to_str().unwrap(),
        "--prompt",
        "ab",
        "--max-new-tokens",
        "2",
        "--temperature",
        "0",
        "--device",
        "cpu",
    ]);
    let cfg = p(d.path(), "c.toml");
    std::fs::write(
        &cfg,
        "[sft]\neval_prompts = 4\n[train]\nbatch_size = 4\nseq_len = 32\neval_batches = 1\n",
    )
    .unwrap();
    #[rustfmt::skip]
    run_ok(&["sft", "--config", cfg.to_str().unwrap(), "--init", bf16.to_str().unwrap(),
             "--out", p(d.path(), "sft").to_str().unwrap(), "--steps", "1", "--device", "cpu"]);

    // One layout over the other: the earlier weight files go, so the new ones are read.
    export(&bf16, &["--overwrite"]);
    let left: Vec<String> = std::fs::read_dir(&bf16)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("safetensors"))
        .collect();
    assert_eq!(left, ["model.safetensors"]);
    assert!(max_abs_diff(&logits_of(&bf16, &ids), &want) <= 1e-5);
    export(
        &f32_dir,
        &["--overwrite", "--max-shard-size", "2GiB", "--dtype", "bf16"],
    );
    assert!(f32_dir.join("model.safetensors").is_file());
    export(&f32_dir, &["--overwrite", "--max-shard-size", "100000"]);
    assert!(!f32_dir.join("model.safetensors").exists());
    assert!(max_abs_diff(&logits_of(&f32_dir, &ids), &want) <= 1e-5);

    // What does not apply is refused, in one line.
    let out = p(d.path(), "refused");
    for (extra, said) in [
        (
            &["--format", "temper", "--dtype", "bf16"][..],
            "f32 weights",
        ),
        (
            &["--format", "peft", "--max-shard-size", "1GB"][..],
            "applies to --format hf",
        ),
    ] {
        let mut args = vec!["export", "--checkpoint", src.to_str().unwrap(), "--out"];
        args.push(out.to_str().unwrap());
        args.extend(extra);
        let e = run_err(&args);
        assert!(e.contains(said) && e.trim().lines().count() == 1, "{e}");
    }
    assert!(!out.exists());
}

/// A negative number reaches its option's parser (clap alone reads `-1` as an unknown flag):
/// temper's own refusal of a negative temperature, a one-line refusal naming an unsigned
/// option. Usage errors are one line pointing at the command's help, with clap's exit code
/// 2, those of a stage `launch` runs included; help and version are clap's own.
#[test]
fn negative_numbers_reach_their_options_and_usage_errors_are_one_line() {
    let model = hf_fixture("llama");
    let model = model.to_str().unwrap();
    let usage = |args: &[&str]| {
        let out = temper().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && !err.contains("Usage:"),
            "{err}"
        );
        err
    };
    let at_temperature = |t: &str| {
        run_err(&[
            "generate",
            "--checkpoint",
            model,
            "--prompt",
            "ab",
            "--temperature",
            t,
        ])
    };
    let e = at_temperature("-1");
    assert!(
        e.contains(
            "--temperature must be 0 (greedy) or a finite number of at least 0.00001, got -1"
        ),
        "{e}"
    );
    // A temperature so low that the logits over it overflow: refused, not sampled as NUL bytes.
    let e = at_temperature("1e-40");
    assert!(e.contains("--temperature must be 0 (greedy)"), "{e}");
    let e = usage(&["generate", "--checkpoint", model, "--seed", "-5"]);
    assert!(
        e.contains("'--seed <SEED>'") && e.contains("0 or more"),
        "{e}"
    );
    let e = usage(&["pretrain", "--steps", "-1"]);
    assert!(
        e.contains("--steps") && e.contains("`temper pretrain --help`"),
        "{e}"
    );
    let e = usage(&["generate", "--checkpoint", model, "--sed", "5"]);
    assert!(
        e.contains("'--sed'") && e.contains("'--seed'") && e.contains("`temper generate --help`"),
        "{e}"
    );
    let e = usage(&["export", "--checkpoint", model]);
    assert!(e.contains("not provided: --out <OUT>"), "{e}");
    let e = usage(&[
        "export",
        "--checkpoint",
        model,
        "--out",
        "x",
        "--dtype",
        "f64",
    ]);
    assert!(e.contains("possible values: f32, bf16, f16"), "{e}");
    let e = usage(&[
        "export",
        "--checkpoint",
        model,
        "--out",
        "x",
        "--max-shard-size=-5GB",
    ]);
    assert!(e.contains("'--max-shard-size <SIZE>'"), "{e}");
    let e = usage(&["tokenizer", "train", "--out", "x"]);
    assert!(e.contains("`temper tokenizer train --help`"), "{e}");
    // clap reads these values as flags: the error names the flag and the spelling that works.
    let e = usage(&["dpo", "--init", model, "--lr", "-1e-3"]);
    assert!(e.contains("--lr -1e-3") && e.contains("--lr=-1e-3"), "{e}");
    let e = usage(&[
        "generate",
        "--checkpoint",
        model,
        "--prompt",
        "-1e5 is small",
    ]);
    assert!(e.contains("--prompt='-1e5 is small'"), "{e}");
    // Inside `launch -- STAGE`, the stage's command line too.
    let e = usage(&[
        "launch",
        "--nproc-per-node",
        "1",
        "--",
        "sft",
        "--stpes",
        "3",
    ]);
    assert!(
        e.starts_with("error: launch: ") && e.contains("'--stpes'") && e.contains("'--steps'"),
        "{e}"
    );
    let e = usage(&[
        "launch",
        "--nproc-per-node",
        "1",
        "--",
        "generate",
        "--checkpoint",
        model,
    ]);
    assert!(
        e.contains("launch runs a training stage") && e.contains("online-dpo, grpo, distill"),
        "{e}"
    );

    let help = temper().args(["generate", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.status.success() && text.starts_with("Sample from a checkpoint"),
        "{text}"
    );
    assert!(text.contains("Usage: temper generate") && text.lines().count() > 20);
    // A stage's help lists its own flags only, and ends with its defaults.
    let help = temper().args(["dpo", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success(), "{text}");
    assert!(
        text.contains("--beta") && text.contains("--sync-ref-model") && !text.contains("--teacher"),
        "{text}"
    );
    assert!(
        text.contains("Defaults of `temper dpo`")
            && text.contains("[dpo]\n")
            && text.contains("beta = 0.1"),
        "{text}"
    );
    let help = temper().args(["grpo", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("--max-new-tokens")
            && text.contains("group_size = ")
            && text.contains("[lora]\n")
            && !text.contains("--padding-free")
            && !text.contains("--batch-size"),
        "{text}"
    );
    // val_fraction = 0 would hold out one record all the same: refused by its line, before
    // any model loads.
    let d = tmp();
    let prefs = p(d.path(), "prefs.jsonl");
    std::fs::write(
        &prefs,
        "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n".repeat(4),
    )
    .unwrap();
    let vf0 = p(d.path(), "vf0.toml");
    std::fs::write(&vf0, "[data]\nval_fraction = 0\n").unwrap();
    let e = run_err(&[
        "dpo",
        "--init",
        model,
        "--data",
        prefs.to_str().unwrap(),
        "--config",
        vf0.to_str().unwrap(),
        "--out",
        p(d.path(), "vf0").to_str().unwrap(),
    ]);
    assert!(
        e.contains("vf0.toml:2: data.val_fraction = 0") && e.contains("--eval-data"),
        "{e}"
    );
    let version = temper().arg("--version").output().unwrap();
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout),
        format!("temper {}\n", env!("CARGO_PKG_VERSION"))
    );
}

/// `--eval-data` is the held-out set of `--data`: pretraining evaluates on it (text, JSONL or
/// token shards, as `--data` is read) and trains on the whole of `--data`; a file that cannot
/// be read is an error naming it; a stage on the built-in task, which holds out its own
/// examples, refuses it in one line rather than leaving it unread.
#[test]
fn eval_data_is_pretrainings_held_out_set_or_refused() {
    use temper::data::shards::{write_shard, Width};
    let d = tmp();
    let dir = d.path();
    let cfg = p(dir, "c.toml");
    std::fs::write(&cfg, TINY_TOML).unwrap();
    let c = cfg.to_str().unwrap();
    let s = |path: &std::path::Path| path.to_str().unwrap().to_string();
    let pretrain = |out: &str, extra: &[&str]| {
        let out = p(dir, out);
        let mut args = vec!["pretrain", "--config", c, "--steps", "1", "--device", "cpu"];
        let out_s = s(&out);
        args.extend(["--out", &out_s]);
        args.extend(extra);
        let log = run_ok(&args);
        (out, String::from_utf8_lossy(&log.stderr).to_string())
    };
    let first_val = |out: &std::path::Path| series(&metrics(out), "val", "loss")[0];

    // One document of words (the byte tokenizer: a token a byte, and EOS after each document).
    let words = ["the", "cat", "sat", "on", "a", "mat", "and", "ran", "far"];
    let text: Vec<&str> = (0..600).map(|i| words[(i * 7 + i / 9) % 9]).collect();
    let text = text.join(" ");
    let corpus = p(dir, "corpus.txt");
    std::fs::write(&corpus, &text).unwrap();
    // A held-out JSONL file of two documents, unlike the corpus.
    let (a, b) = ("zq".repeat(60), "xv".repeat(45));
    let eval = p(dir, "eval.jsonl");
    std::fs::write(
        &eval,
        format!("{{\"text\": \"{a}\"}}\n{{\"text\": \"{b}\"}}\n"),
    )
    .unwrap();
    let (corpus_s, eval_s) = (s(&corpus), s(&eval));

    let (split, log) = pretrain("split", &["--data", &corpus_s]);
    let whole = text.len() + 1;
    assert!(!log.contains(&format!("{whole} train")), "{log}");
    let (held, log) = pretrain("held", &["--data", &corpus_s, "--eval-data", &eval_s]);
    let val_tokens = a.len() + 1 + b.len() + 1;
    assert!(
        log.contains(&format!("{whole} train / {val_tokens} val tokens"))
            && log.contains("held out (--eval-data): 2 documents of"),
        "{log}"
    );
    let (s0, h0) = (first_val(&split), first_val(&held));
    assert_eq!((s0.0, h0.0), (0, 0));
    assert!((s0.1 - h0.1).abs() > 1e-3, "{} vs {}", s0.1, h0.1);
    let saved = std::fs::read_to_string(held.join("config.toml")).unwrap();
    assert!(saved.contains("eval_path"), "{saved}");

    // Token shards: the whole of --data's training shards trains (its validation shard is not
    // read); of a held-out directory holding validation shards alone, all of them evaluate.
    let shards = p(dir, "shards");
    let held_shards = p(dir, "held_shards");
    std::fs::create_dir_all(&shards).unwrap();
    std::fs::create_dir_all(&held_shards).unwrap();
    let ids = |n: usize, k: u32| (0..n as u32).map(|i| (i * k) % 250).collect::<Vec<_>>();
    write_shard(&shards.join("d_train_000.bin"), &ids(3000, 7), Width::U16).unwrap();
    write_shard(&shards.join("d_val_000.bin"), &ids(400, 3), Width::U16).unwrap();
    write_shard(
        &held_shards.join("e_val_000.bin"),
        &ids(150, 11),
        Width::U16,
    )
    .unwrap();
    write_shard(&held_shards.join("e_val_001.bin"), &ids(90, 13), Width::U16).unwrap();
    let (_, log) = pretrain(
        "shards",
        &["--data", &s(&shards), "--eval-data", &s(&held_shards)],
    );
    assert!(log.contains("3000 train / 240 val tokens"), "{log}");

    // One line naming the missing file: pretraining, and a stage on --data (split_holdout).
    let missing = s(&p(dir, "missing.jsonl"));
    let one_error_line = |e: &str, needles: &[&str]| {
        let errors: Vec<&str> = e.lines().filter(|l| l.starts_with("error")).collect();
        assert!(
            errors.len() == 1 && e.trim_end().ends_with(errors[0]),
            "{e}"
        );
        for n in needles {
            assert!(errors[0].contains(n), "{n}: {e}");
        }
    };
    #[rustfmt::skip]
    let e = run_err(&["pretrain", "--config", c, "--data", &corpus_s, "--eval-data", &missing,
                      "--out", &s(&p(dir, "m1")), "--steps", "1", "--device", "cpu"]);
    one_error_line(&e, &["--eval-data", &missing]);
    let sft_data = p(dir, "sft.jsonl");
    std::fs::write(
        &sft_data,
        "{\"prompt\": \"the cat \", \"response\": \"sat\"}\n{\"prompt\": \"a \", \"response\": \"mat\"}\n",
    )
    .unwrap();
    let held_s = s(&held);
    #[rustfmt::skip]
    let e = run_err(&["sft", "--config", c, "--init", &held_s, "--data", &s(&sft_data),
                      "--eval-data", &missing, "--out", &s(&p(dir, "m2")), "--device", "cpu"]);
    one_error_line(&e, &["--eval-data", &missing]);
    // ... and a held-out file that is there serves the stage.
    #[rustfmt::skip]
    run_ok(&["sft", "--config", c, "--init", &held_s, "--data", &s(&sft_data), "--eval-data",
             &s(&sft_data), "--out", &s(&p(dir, "sft")), "--steps", "1", "--device", "cpu"]);

    // The built-in task (no --data) holds out its own examples: refused, in one line.
    for stage in ["pretrain", "sft", "reward", "dpo", "grpo"] {
        let out = s(&p(dir, &format!("builtin-{stage}")));
        let mut args = vec![stage, "--config", c, "--eval-data", &eval_s, "--out", &out];
        if stage != "pretrain" {
            args.extend(["--init", &held_s]);
        }
        args.extend(["--steps", "1", "--device", "cpu"]);
        let e = run_err(&args);
        one_error_line(&e, &["--eval-data", &eval_s, "built-in task", "--data"]);
    }
    // Refused before --overwrite clears anything: the earlier run is left whole.
    let sft_run = s(&p(dir, "sft"));
    #[rustfmt::skip]
    let e = run_err(&["sft", "--config", c, "--init", &held_s, "--eval-data", &eval_s,
                      "--out", &sft_run, "--overwrite", "--device", "cpu"]);
    one_error_line(&e, &["--eval-data", "built-in task"]);
    assert!(p(dir, "sft").join("final/meta.json").exists());
}

/// A Hugging Face dataset as `hf download --repo-type dataset` leaves it: shards named for
/// splits of the dataset's own names under data/, and a README card. Each command reads the
/// split asked for, and one that cannot tell which to read says so in one line.
#[test]
fn a_dataset_directory_is_read_by_the_split_asked_for() {
    let d = tmp();
    let dir = d.path();
    let cfg = p(dir, "c.toml");
    std::fs::write(&cfg, TINY_TOML).unwrap();
    let c = cfg.to_str().unwrap();
    let pre = p(dir, "pre");
    pretrain_on_cpu(c, &pre, 2);
    let s = |path: &std::path::Path| path.to_str().unwrap().to_string();
    let ds = p(dir, "ds");
    std::fs::create_dir_all(ds.join("data")).unwrap();
    std::fs::write(ds.join("README.md"), "---\nlicense: mit\n---\n").unwrap();
    let sft = |from: usize, n: usize| -> String {
        (from..from + n)
            .map(|i| {
                format!(
                    "{{\"prompt\": \"{i} + 1 = \", \"completion\": \"{}\"}}\n",
                    i + 1
                )
            })
            .collect()
    };
    let shards = [
        ("train_sft-00000-of-00002.jsonl", sft(0, 7)),
        ("train_sft-00001-of-00002.jsonl", sft(7, 5)),
        ("test_sft-00000-of-00001.jsonl", sft(50, 3)),
        (
            "train_prefs-00000-of-00001.jsonl",
            "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n".into(),
        ),
    ];
    for (name, body) in &shards {
        std::fs::write(ds.join("data").join(name), body).unwrap();
    }
    let (pre_s, ds_s) = (s(&pre), s(&ds));
    let sft_run = |out: &str, extra: &[&str]| {
        let out = s(&p(dir, out));
        let mut args = vec!["sft", "--config", c, "--init", &pre_s, "--data", &ds_s];
        args.extend(extra);
        args.extend(["--out", &out, "--steps", "1", "--device", "cpu"]);
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    fn argv(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }

    // No split named train: refused in one line that lists the splits and the flag.
    let e = run_err(&argv(&sft_run("none", &[])));
    let errors: Vec<&str> = e.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{e}");
    assert!(
        errors[0].contains("its files name the splits test_sft, train_prefs, train_sft")
            && errors[0].contains("--train-split NAME"),
        "{e}"
    );
    // Both splits named: all twelve training records train, the three of test_sft evaluate.
    let log = run_ok(&argv(&sft_run(
        "both",
        &["--train-split", "train_sft", "--eval-split", "test_sft"],
    )));
    let log = String::from_utf8_lossy(&log.stderr);
    assert!(
        log.contains("12 examples train;")
            && log.contains("12 examples train; 3 held out (--eval-split test_sft)"),
        "{log}"
    );
    assert!(
        log.contains("its train_sft split is read (2 files"),
        "{log}"
    );
    // The training split alone: a part of it is held out, as of a file.
    let log = run_ok(&argv(&sft_run("train", &["--train-split", "TRAIN_SFT"])));
    let log = String::from_utf8_lossy(&log.stderr);
    assert!(log.contains("11 examples train, 1 held out"), "{log}");
    // A split asked of one file, or one the directory lacks, is refused.
    let one = ds.join("data/test_sft-00000-of-00001.jsonl");
    let e = run_err(&argv(&sft_run(
        "file",
        &[
            "--eval-data",
            &s(&one),
            "--train-split",
            "train_sft",
            "--eval-split",
            "x",
        ],
    )));
    assert!(
        e.contains("split \"x\" (--eval-split or [data] eval_split) names a split of a directory"),
        "{e}"
    );
    let e = run_err(&argv(&sft_run("lacks", &["--train-split", "train_gen"])));
    assert!(e.contains("no split \"train_gen\" (--train-split or [data] train_split); its files name the splits test_sft, train_prefs, train_sft"), "{e}");
    // Without --data the split names nothing.
    let e = run_err(&[
        "sft",
        "--config",
        c,
        "--init",
        &pre_s,
        "--train-split",
        "train_sft",
        "--out",
        &s(&p(dir, "builtin")),
        "--device",
        "cpu",
    ]);
    assert!(
        e.contains("data.train_split = \"train_sft\" names a split of a --data directory"),
        "{e}"
    );

    // generate reads its --prompts directory's split: the three test prompts, in order.
    let out = run_ok(&[
        "generate",
        "--checkpoint",
        &pre_s,
        "--prompts",
        &ds_s,
        "--split",
        "test_sft",
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
    ]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let prompts: Vec<&str> = lines
        .iter()
        .map(|l| l["prompt"].as_str().unwrap())
        .collect();
    assert_eq!(prompts, ["50 + 1 = ", "51 + 1 = ", "52 + 1 = "]);

    // Pretraining: a corpus directory's own train and held-out splits by name.
    let corpus = p(dir, "corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    let doc = |w: &str| format!("{{\"text\": \"{}\"}}\n", w.repeat(40));
    std::fs::write(corpus.join("web-00000-of-00001.jsonl"), doc("the cat sat ")).unwrap();
    std::fs::write(corpus.join("heldout-00000-of-00001.jsonl"), doc("zq")).unwrap();
    let log = run_ok(&[
        "pretrain",
        "--config",
        c,
        "--data",
        &s(&corpus),
        "--train-split",
        "web",
        "--eval-split",
        "heldout",
        "--out",
        &s(&p(dir, "pre2")),
        "--steps",
        "1",
        "--device",
        "cpu",
    ]);
    let log = String::from_utf8_lossy(&log.stderr);
    assert!(log.contains("481 train / 81 val tokens"), "{log}");
    assert!(
        log.contains("held out (--eval-split heldout): 1 document of"),
        "{log}"
    );
    // A held-out split that is the training split is said to be.
    let log = run_ok(&argv(&sft_run(
        "same",
        &["--train-split", "train_sft", "--eval-split", "train_sft"],
    )));
    let log = String::from_utf8_lossy(&log.stderr);
    assert!(
        log.contains("warning: --eval-split train_sft reads 2 of 2 files that --data trains on"),
        "{log}"
    );
}
