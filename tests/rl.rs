//! The RL stages' promises besides learning (which the pipeline test checks): user-defined
//! rewards over a process or HTTP, clear failures of those rewards with the last checkpoint
//! kept, the completion log, the advantage estimators' runs, and refusals of settings that
//! would make the maths wrong.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use common::*;

/// A tiny pretrained + SFT'd model on the built-in task, shared by every test here.
struct Chain {
    dir: tempfile::TempDir,
    config: String,
}

fn chain() -> &'static Chain {
    static CHAIN: Shared<Chain> = OnceLock::new();
    shared(&CHAIN, "pretrain + SFT chain", || {
        let dir = chain_dir(env!("CARGO_TARGET_TMPDIR"), "rl-chain-");
        let cfg = p(dir.path(), "c.toml");
        // Small rollouts and few held-out prompts keep each RL run to seconds; one minibatch
        // per rollout makes every step sample a new rollout.
        std::fs::write(
            &cfg,
            format!(
                "{TINY_TOML}\n[sft]\neval_prompts = 8\n[ppo]\neval_prompts = 4\nrollout_batch = 8\nminibatch_size = 8\nppo_epochs = 1\n[grpo]\neval_prompts = 4\nprompts_per_rollout = 4\ngroup_size = 2\nminibatch_size = 8\nlog_completions = 3\n[distill]\neval_prompts = 8\n[online_dpo]\neval_prompts = 4\nlog_completions = 4\n"
            ),
        )
        .unwrap();
        let config = cfg.to_str().unwrap().to_string();
        let pre = p(dir.path(), "pre");
        pretrain_on_cpu(&config, &pre, 20);
        run_ok(&[
            "sft",
            "--config",
            &config,
            "--init",
            s(&pre),
            "--out",
            s(&p(dir.path(), "sft")),
            "--steps",
            "20",
            "--device",
            "cpu",
        ]);
        Chain { dir, config }
    })
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn sft() -> PathBuf {
    p(chain().dir.path(), "sft")
}

/// `temper grpo` from the shared SFT model into a fresh directory, with `extra` flags.
fn grpo_args(out: &Path, steps: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "grpo",
        "--config",
        &chain().config,
        "--init",
        s(&sft()),
        "--out",
        s(out),
        "--steps",
        steps,
        "--checkpoint-every",
        "1",
        "--device",
        "cpu",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn verifier() -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/verifiers/math_verifier.py");
    format!("python3 {}", script.display())
}

fn completions(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("completions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_command_reward_scores_rollouts_beside_the_checker() {
    let dir = tmp();
    let out = p(dir.path(), "g");
    let cmd = format!("cmd:{}:0.5", verifier());
    run_ok(&args(&grpo_args(
        &out,
        "2",
        &["--reward", "task", "--reward", &cmd],
    )));
    let lines = completions(&out);
    // Two rollouts, three completions each, every source's score beside the total.
    assert_eq!(lines.len(), 6, "{lines:?}");
    for l in &lines {
        let by = l["rewards"].as_object().unwrap();
        assert_eq!(by.len(), 2, "{l}");
        let task = by["task:1"].as_f64().unwrap();
        let verified = by[&format!("cmd:{}:0.5", verifier())].as_f64().unwrap();
        let total = l["reward"].as_f64().unwrap();
        assert!((total - (task + 0.5 * verified)).abs() < 1e-9, "{l}");
        for key in ["prompt", "response", "kl", "length", "step"] {
            assert!(!l[key].is_null(), "{key} missing: {l}");
        }
    }
    assert_eq!(lines[0]["step"], 1);
    assert_eq!(lines[5]["step"], 2);
}

/// The verifier script in HTTP mode, on a free port of 127.0.0.1; killed when dropped.
struct Server(Child, u16);

impl Server {
    fn start() -> Self {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/verifiers/math_verifier.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--http", "0"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .trim_start_matches("listening on ")
            .parse()
            .unwrap();
        Server(child, port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_http_reward_scores_rollouts() {
    let server = Server::start();
    let dir = tmp();
    let out = p(dir.path(), "g");
    let url = format!("http://127.0.0.1:{}/score", server.1);
    run_ok(&args(&grpo_args(&out, "1", &["--reward", &url])));
    let lines = completions(&out);
    assert_eq!(lines.len(), 3);
    for l in &lines {
        let r = l["rewards"][&format!("{url}:1")].as_f64().unwrap();
        assert!(r == 0.0 || r == 1.0, "{l}");
    }
    let m = metrics(&out);
    assert!(!series(&m, "val", "mean_reward").is_empty());
}

/// A reward process that fails after `after` requests, under `[external_reward]` settings.
fn failing_run(
    mode: &str,
    after: usize,
    restarts: usize,
) -> (PathBuf, tempfile::TempDir, Result<(), String>) {
    let dir = tmp();
    let out = p(dir.path(), "g");
    let cfg = p(dir.path(), "c.toml");
    let base = std::fs::read_to_string(&chain().config).unwrap();
    std::fs::write(
        &cfg,
        format!("{base}\n[external_reward]\ntimeout_s = 1.0\nmax_restarts = {restarts}\n"),
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bad_reward.py");
    let cmd = format!("cmd:python3 {} {mode} {after}", script.display());
    let mut a = grpo_args(&out, "3", &["--reward", &cmd]);
    a[2] = cfg.to_str().unwrap().to_string();
    let o = temper().args(args(&a)).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let res = if o.status.success() { Ok(()) } else { Err(err) };
    (out, dir, res)
}

/// Start evaluation asks for 4 rewards and each rollout for 8: after 12 the reward fails
/// during step 2's rollout, once step 1's checkpoint is written.
#[test]
fn a_reward_process_that_dies_hangs_or_answers_garbage_stops_clearly_and_keeps_the_checkpoint() {
    for mode in ["die", "hang", "garbage"] {
        let (out, _dir, res) = failing_run(mode, 12, 0);
        let err = res.expect_err(mode);
        let last = err.lines().last().unwrap_or("");
        assert!(
            last.starts_with("error: ") && last.contains("reward cmd:"),
            "{mode}: {err}"
        );
        let why = match mode {
            "die" => "closed its output",
            "hang" => "no reply",
            _ => "not JSON",
        };
        assert!(last.contains(why), "{mode}: {err}");
        let latest = std::fs::read_to_string(out.join("checkpoints/latest")).unwrap();
        assert_eq!(latest.trim(), "step-0000001", "{mode}");
        assert!(out.join("checkpoints/step-0000001/meta.json").exists());
        // The checkpoint resumes: a run with a working reward continues from it.
        run_ok(&[
            "grpo",
            "--resume",
            s(&out),
            "--reward",
            "task",
            "--steps",
            "2",
        ]);
    }
}

/// A reward program that hangs does not outlive a run ended at once: by a second signal (the
/// run kills the program's process group as it goes) or by SIGKILL (the kernel kills a
/// program that execs in its shell's place).
#[test]
fn a_hung_reward_program_ends_with_a_run_stopped_at_once() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bad_reward.py");
    for hard in [false, true] {
        let dir = tmp();
        let (out, pidfile) = (p(dir.path(), "g"), p(dir.path(), "pid"));
        let cfg = p(dir.path(), "c.toml");
        let base = std::fs::read_to_string(&chain().config).unwrap();
        std::fs::write(
            &cfg,
            format!("{base}\n[external_reward]\ntimeout_s = 600.0\n"),
        )
        .unwrap();
        // Plain under the shell for the second signal; exec'd for SIGKILL.
        let exec = if hard { "exec " } else { "" };
        let cmd = format!(
            "cmd:{exec}python3 {} hang 0 {}",
            script.display(),
            pidfile.display()
        );
        let mut a = grpo_args(&out, "3", &["--reward", &cmd]);
        a[2] = s(&cfg).to_string();
        let mut child = temper()
            .args(args(&a))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_until(120, "the reward program's pid", || pidfile.exists());
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().parse().unwrap();
        let alive = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
                !st.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
        };
        assert!(alive());
        if hard {
            child.kill().unwrap();
        } else {
            sigterm(&child);
            std::thread::sleep(std::time::Duration::from_millis(6500));
            sigterm(&child);
        }
        child.wait().unwrap();
        wait_until(10, "the hung reward program to end", || !alive());
    }
}

#[test]
fn a_reward_process_that_dies_is_restarted_within_its_limit() {
    let (out, _dir, res) = failing_run("die", 12, 2);
    res.unwrap();
    assert!(out.join("final/meta.json").exists());
}

#[test]
fn every_estimator_runs_and_logs_its_rollouts() {
    for est in ["rloo", "reinforce_plus_plus", "group_norm"] {
        let dir = tmp();
        let out = p(dir.path(), est);
        // group_norm's run also takes the ratio per response (GSPO); rloo's runs Dr. GRPO's
        // loss with two-sided clipping.
        let mut extra = vec!["--advantage-estimator", est];
        if est == "group_norm" {
            extra.extend(["--importance-sampling-level", "sequence"]);
        }
        let dr = p(dir.path(), "dr.toml");
        if est == "rloo" {
            let base = std::fs::read_to_string(&chain().config).unwrap();
            let cfg = base.replace(
                "[grpo]\n",
                "[grpo]\nloss_type = \"dr_grpo\"\ndelta = 2.0\ntop_k = 20\ntop_p = 0.9\n",
            );
            assert_ne!(cfg, base);
            std::fs::write(&dr, cfg).unwrap();
        }
        let mut a = grpo_args(&out, "2", &extra);
        if est == "rloo" {
            assert_eq!(a[1], "--config");
            a[2] = s(&dr).to_string();
        }
        run_ok(&args(&a));
        let m = metrics(&out);
        let scores = series(&m, "train", "score");
        assert!(!scores.is_empty(), "{est}");
        assert_eq!(completions(&out).len(), 6, "{est}");
        let cfg = std::fs::read_to_string(out.join("config.toml")).unwrap();
        assert!(
            cfg.contains(&format!("advantage_estimator = \"{est}\"")),
            "{cfg}"
        );
        if est == "rloo" {
            assert!(cfg.contains("loss_type = \"dr_grpo\""), "{cfg}");
            assert!(cfg.contains("delta = 2.0"), "{cfg}");
            assert!(
                cfg.contains("top_p = 0.9") && cfg.contains("top_k = 20"),
                "{cfg}"
            );
        }
        let level = if est == "group_norm" {
            "sequence"
        } else {
            "token"
        };
        assert!(
            cfg.contains(&format!("importance_sampling_level = \"{level}\"")),
            "{cfg}"
        );
    }
}

#[test]
fn ppo_refuses_top_k_and_prompts_without_answers_name_their_line() {
    let dir = tmp();
    let cfg = p(dir.path(), "k.toml");
    let base = std::fs::read_to_string(&chain().config).unwrap();
    std::fs::write(&cfg, base.replace("[ppo]\n", "[ppo]\ntop_k = 5\n")).unwrap();
    let e = run_err(&[
        "ppo",
        "--config",
        s(&cfg),
        "--init",
        s(&sft()),
        "--out",
        s(&p(dir.path(), "k")),
        "--device",
        "cpu",
    ]);
    assert!(e.contains("ppo.top_k"), "{e}");
    let prompts = p(dir.path(), "prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"1+1=\", \"answer\": \"2\"}\n{\"prompt\": \"2+2=\"}\n",
    )
    .unwrap();
    let e = run_err(&[
        "grpo",
        "--config",
        &chain().config,
        "--init",
        s(&sft()),
        "--out",
        s(&p(dir.path(), "a")),
        "--data",
        s(&prompts),
        "--eval-data",
        s(&prompts),
        "--device",
        "cpu",
    ]);
    assert!(
        e.contains("prompts.jsonl:2") && e.contains("\"answer\""),
        "{e}"
    );
}

/// Under LoRA, PPO, DPO and online DPO keep one copy of the base (the reference is the base
/// with the adapters off), and on a bf16 run that copy is bf16: only the adapters (and PPO's critic)
/// carry f32.
#[test]
fn lora_ppo_and_dpo_on_a_bf16_base_keep_one_bf16_copy() {
    for stage in ["ppo", "dpo", "online-dpo"] {
        let dir = tmp();
        let out = p(dir.path(), stage);
        let o = run_ok(&[
            stage,
            "--config",
            &chain().config,
            "--init",
            s(&sft()),
            "--out",
            s(&out),
            "--steps",
            "1",
            "--lora-rank",
            "4",
            "--dtype",
            "bf16",
            "--device",
            "cpu",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        if stage != "dpo" {
            assert!(err.contains("the base with adapters off"), "{err}");
        }
        let fin = out.join("final");
        let base = candle_core::safetensors::load(
            fin.join("model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let w = &base["model.layers.0.attn.q.weight"];
        assert_eq!(
            w.dtype(),
            candle_core::DType::BF16,
            "{stage}: the frozen base"
        );
        if let Some(v) = base.get("value.model.layers.0.attn.q.weight") {
            assert_eq!(
                v.dtype(),
                candle_core::DType::F32,
                "{stage}: the critic trains in f32"
            );
        }
        let ad = candle_core::safetensors::load(
            fin.join("adapter.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert!(
            ad.values().all(|t| t.dtype() == candle_core::DType::F32),
            "{stage}: adapters"
        );
    }
}

/// GRPO with beta = 0 (TRL's default) loads and runs no reference and reports no KL, and
/// takes the first step that beta > 0 takes: there the policy is the reference, so the KL
/// term and its gradient are zero.
#[test]
fn grpo_without_kl_runs_no_reference_and_takes_the_same_first_step() {
    let dir = tmp();
    let run = |beta: &str| {
        let out = p(dir.path(), &format!("beta-{beta}"));
        let o = run_ok(&args(&grpo_args(
            &out,
            "2",
            &["--beta", beta, "--log-every", "1"],
        )));
        (out.clone(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (none, none_err) = run("0");
    let (some, some_err) = run("0.04");
    assert!(
        none_err.contains("reference: none (beta = 0)"),
        "{none_err}"
    );
    assert!(some_err.contains("reference: a frozen copy"), "{some_err}");
    let m0 = metrics(&none);
    assert!(
        m0.iter()
            .all(|r| r.get("kl").is_none() && r.get("kl_token").is_none()),
        "{m0:?}"
    );
    assert!(completions(&none).iter().all(|l| l.get("kl").is_none()));
    assert!(metrics(&some).iter().any(|r| r.get("kl_token").is_some()));
    let (l0, l1) = (
        series(&m0, "train", "loss"),
        series(&metrics(&some), "train", "loss"),
    );
    assert_eq!(l0[0].0, 1);
    assert!((l0[0].1 - l1[0].1).abs() < 1e-6, "{l0:?} vs {l1:?}");
}

/// With several optimizer steps per rollout, a checkpoint falls due inside a rollout and is
/// taken there: it keeps the rest of the rollout (`rollout.json` and its share), so `--resume`
/// trains on exactly what the uninterrupted run did. Three cases:
/// - GRPO, minibatches of 4 of a rollout's 8 rows (two steps a rollout), checkpoints every 3:
///   step 3 is the first half of the second rollout;
/// - GRPO packed, minibatches of 3 (three a rollout) and two per step, so rollouts straddle
///   steps, checkpoints every 2: step 2 ends one minibatch into the second rollout;
/// - PPO (with its critic's values and returns), minibatches of 4 of 8 rows over two epochs
///   (four steps a rollout), checkpoints every 5: one step into the second rollout, whose
///   KL (unlike the first's, taken where the policy is the reference) is not zero.
///
/// Each run resumed from its first checkpoint retraces the whole one: its training losses and
/// its evaluations. In the last two an evaluation falls after the resume and before the next
/// rollout (GRPO's at 3, PPO's at 6), where it reports the KL of the rollout the checkpoint
/// kept.
#[test]
fn rl_checkpoints_inside_a_rollout_resume_exactly() {
    let dir = tmp();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/varied_reward.py");
    let reward = format!("cmd:python3 {}", script.display());
    let grpo = |mb: usize| {
        format!("[grpo]\neval_prompts = 4\nprompts_per_rollout = 4\ngroup_size = 2\nminibatch_size = {mb}\nlog_completions = 0\nbeta = 0.04\n")
    };
    let ppo = "[ppo]\neval_prompts = 4\nrollout_batch = 8\nminibatch_size = 4\nppo_epochs = 2\nlog_completions = 0\n";
    let cases = [
        ("grpo", grpo(4), 1, (3, 3), &[3, 6][..], &[][..]),
        ("grpo", grpo(3), 2, (2, 3), &[2, 4, 6], &["--packing"]),
        ("ppo", ppo.to_string(), 1, (5, 3), &[5, 6], &[]),
    ];
    for (i, (stage, table, accum, (every, eval), want, extra)) in cases.into_iter().enumerate() {
        let case = p(dir.path(), &format!("case{i}"));
        std::fs::create_dir(&case).unwrap();
        let cfg = p(&case, "c.toml");
        let train = format!("log_every = 1\ngrad_accum = {accum}\nkeep_checkpoints = 5\n");
        std::fs::write(&cfg, format!("{TINY_TOML}\n{train}{table}")).unwrap();
        let run = |out: &Path, every: usize| {
            let init = sft();
            let (every, eval) = (every.to_string(), eval.to_string());
            let mut a = vec![
                stage,
                "--config",
                s(&cfg),
                "--init",
                s(&init),
                "--out",
                s(out),
                "--steps",
                "6",
                "--checkpoint-every",
                &every,
                "--eval-every",
                &eval,
                "--reward",
                &reward,
                "--device",
                "cpu",
            ];
            a.extend(extra);
            let o = run_ok(&a);
            String::from_utf8_lossy(&o.stderr).into_owned()
        };
        let (whole, cut) = (p(&case, "whole"), p(&case, "cut"));
        run(&whole, 100);
        let err = run(&cut, every);
        assert!(!err.contains("checkpoints every"), "case {i}: {err}");
        let ckpts = cut.join("checkpoints");
        let mut names: Vec<String> = std::fs::read_dir(&ckpts)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("step-"))
            .collect();
        names.sort();
        let steps: Vec<String> = want.iter().map(|k| format!("step-{k:07}")).collect();
        assert_eq!(names, steps, "case {i}: checkpoints on schedule");
        let first = ckpts.join(&steps[0]);
        assert!(
            first.join("rollout.json").is_file()
                && first.join("rollout.rank-0.safetensors").is_file(),
            "case {i}: the first checkpoint keeps its rollout"
        );
        for later in &steps[1..] {
            std::fs::remove_dir_all(ckpts.join(later)).unwrap();
        }
        std::fs::remove_dir_all(cut.join("final")).unwrap();
        std::fs::write(ckpts.join("latest"), &steps[0]).unwrap();
        let other_beta = p(&case, "other-beta");
        copy_tree(&cut, &other_beta);
        run_ok(&[stage, "--resume", s(&cut)]);
        let (mw, mc) = (metrics(&whole), metrics(&cut));
        let (a, b) = (series(&mw, "train", "loss"), series(&mc, "train", "loss"));
        assert_eq!(a.len(), 6, "{a:?}");
        assert!(
            a.iter().any(|(_, l)| l.abs() > 1e-6),
            "every loss is zero: {a:?}"
        );
        assert_eq!(a, b, "case {i}: the resumed run left the curve");
        // A rollout's train_s is the training since the rollout before: none for the first.
        let rollouts: Vec<_> = mw.iter().filter(|v| v.get("gen_s").is_some()).collect();
        assert!(rollouts.len() > 1, "case {i}: {rollouts:?}");
        for (k, v) in rollouts.iter().enumerate() {
            assert_eq!(v.get("train_s").is_some(), k > 0, "case {i}: {v}");
        }
        for key in ["rollout_kl", "mean_reward"] {
            let (a, b) = (series(&mw, "val", key), series(&mc, "val", key));
            assert_eq!(a.len(), 1 + 6 / eval, "case {i} val {key}: {a:?}");
            assert_eq!(a, b, "case {i}: val {key}");
        }
        // A fixed KL coefficient is the configuration's: a resume given another takes it.
        if stage == "ppo" {
            run_ok(&[stage, "--resume", s(&other_beta), "--beta", "0.3"]);
            let beta = series(&metrics(&other_beta), "val", "beta");
            assert_eq!(beta.first().map(|b| b.1), Some(0.05), "{beta:?}");
            assert_eq!(beta.last().map(|b| b.1), Some(0.3), "{beta:?}");
        }
    }
}

/// TRL's newer GRPO objectives and knobs, each run from the shared SFT model on a reward that
/// varies within groups, so every loss term is live:
/// - CISPO with DeepSeek-V3.2's off-policy mask and importance-corrected KL, the top-entropy
///   mask and adaptive entropy control, whose target is set above any entropy here, so its
///   coefficient climbs by `entropy_coef_delta` each step and the bonus applies from step 2;
/// - VESPO with GDPO's per-source normalisation over two rewards;
/// - LUSPO at the sequence level;
/// - SAPO with TR-DPO's moving reference, moved after every step, so the KL of every step
///   after the first differs from a run without it; a run cut at step 2 and resumed
///   retraces the whole one, reference and all;
///
/// and each logs its own metrics (the learning itself is `every_objective_learns_a_bandit`'s).
#[test]
fn grpos_newer_objectives_run_log_and_resume() {
    let dir = tmp();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/varied_reward.py");
    let reward = format!("cmd:python3 {}", script.display());
    let run = |name: &str, knobs: &str, steps: &str, every: &str, rewards: &[&str]| {
        let case = p(dir.path(), name);
        std::fs::create_dir(&case).unwrap();
        let cfg = p(&case, "c.toml");
        let table = format!(
            "[grpo]
eval_prompts = 4
prompts_per_rollout = 4
group_size = 2
minibatch_size = 8
log_completions = 0
beta = 0.04
{knobs}"
        );
        std::fs::write(
            &cfg,
            format!(
                "{TINY_TOML}
log_every = 1
{table}"
            ),
        )
        .unwrap();
        let out = p(&case, "run");
        let init = sft();
        let mut a = vec![
            "grpo",
            "--config",
            s(&cfg),
            "--init",
            s(&init),
            "--out",
            s(&out),
            "--steps",
            steps,
            "--checkpoint-every",
            every,
            "--eval-every",
            "100",
            "--device",
            "cpu",
        ];
        for r in rewards {
            a.extend(["--reward", r]);
        }
        let o = run_ok(&a);
        (out, String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let one = [reward.as_str()];
    // Two epochs over each rollout: the second's ratios leave 1, so the off-policy mask (at a
    // threshold any drift passes) and the importance-corrected KL have something to do.
    let cispo = "loss_type = \"cispo\"\nepsilon_high = 5.0\nepochs = 2\noff_policy_mask_threshold = 1e-6\nuse_bias_correction_kl = true\ntop_entropy_quantile = 0.5\nuse_adaptive_entropy = true\nentropy_coef = 0.01\nentropy_target = 100.0\n";
    let (out, _) = run("cispo", cispo, "3", "100", &one);
    let m = metrics(&out);
    let coef: Vec<f64> = series(&m, "train", "entropy_coef")
        .iter()
        .map(|x| x.1)
        .collect();
    assert_eq!(coef.len(), 3, "{coef:?}");
    for (c, want) in coef.iter().zip([0.01, 0.015, 0.02]) {
        assert!((c - want).abs() < 1e-9, "{coef:?}");
    }
    for key in ["entropy", "off_policy_masked", "kl_token", "clipfrac"] {
        let x = series(&m, "train", key);
        assert_eq!(x.len(), 3, "cispo: no {key}");
        assert!(
            x.iter().all(|(_, v)| v.is_finite() && *v >= 0.0),
            "{key}: {x:?}"
        );
    }
    // Step 2 is the second epoch over the first rollout: responses with a negative advantage
    // the update made less likely are masked there, and none at the on-policy step 1.
    let masked = series(&m, "train", "off_policy_masked");
    assert!(masked[0].1 == 0.0 && masked[1].1 > 0.0, "{masked:?}");
    let vespo =
        "loss_type = \"vespo\"\nepochs = 2\nmulti_objective_aggregation = \"normalize_then_sum\"\n";
    let (out, _) = run("vespo", vespo, "2", "100", &[reward.as_str(), "task:0.5"]);
    let m = metrics(&out);
    let phi = series(&m, "train", "vespo_phi");
    // The first epoch is on-policy, every weight 1; the second's responses have moved.
    assert_eq!(phi.len(), 2, "{phi:?}");
    assert!(
        (phi[0].1 - 1.0).abs() < 1e-4 && (phi[1].1 - 1.0).abs() > 1e-4,
        "{phi:?}"
    );
    let luspo = "loss_type = \"luspo\"\nimportance_sampling_level = \"sequence\"\n";
    let (out, _) = run("luspo", luspo, "2", "100", &one);
    assert!(series(&metrics(&out), "train", "loss")
        .iter()
        .any(|(_, l)| l.abs() > 1e-6));
    let sapo = "loss_type = \"sapo\"\nsync_ref_model = true\nref_model_sync_steps = 1\n";
    let (whole, err) = run("sapo", sapo, "4", "100", &one);
    assert_eq!(
        err.matches("the reference moved 0.6 of the way").count(),
        4,
        "{err}"
    );
    let (cut, _) = run("sapo_cut", sapo, "4", "2", &one);
    let ckpts = cut.join("checkpoints");
    assert!(ckpts.join("step-0000002/reference.safetensors").exists());
    std::fs::remove_dir_all(ckpts.join("step-0000004")).unwrap();
    std::fs::remove_dir_all(cut.join("final")).unwrap();
    std::fs::write(ckpts.join("latest"), "step-0000002").unwrap();
    run_ok(&["grpo", "--resume", s(&cut)]);
    let kl = |run: &Path| series(&metrics(run), "train", "kl_token");
    let (a, b) = (kl(&whole), kl(&cut));
    assert_eq!(a.len(), 4, "{a:?}");
    assert!(a.iter().skip(1).any(|(_, k)| k.abs() > 1e-9), "{a:?}");
    assert_eq!(a, b, "the resumed run left the curve");
    // TRL's RLOO knobs: scores clipped into [0, 1e-9] leave the group's differences far below
    // eps, so the first step's gradient all but vanishes next to the unclipped run's; the
    // advantages normalised over the rollout train as well.
    let rloo = "advantage_estimator = \"rloo\"\nnormalize_advantages = true\n";
    let (free, _) = run("rloo", rloo, "1", "100", &one);
    let clipped = format!("{rloo}reward_clip_range = [0.0, 1e-9]\n");
    let grad = |r: &Path| series(&metrics(r), "train", "grad_norm")[0].1;
    let (clip_run, _) = run("rloo_clip", &clipped, "1", "100", &one);
    assert!(grad(&free) > 1e-4, "{}", grad(&free));
    assert!(
        grad(&clip_run) < 1e-3 * grad(&free),
        "{} vs {}",
        grad(&clip_run),
        grad(&free)
    );
    // Without the moves the first step is the same, and the KL of every later one differs.
    let (plain, _) = run("sapo_plain", "loss_type = \"sapo\"\n", "4", "100", &one);
    for ((step, x), (_, y)) in a.iter().zip(&kl(&plain)) {
        assert_eq!(*step == 1, x == y, "step {step}: {x} vs {y}");
    }
    let cfg = p(&dir.path().join("sapo"), "c.toml");
    let out = p(dir.path(), "lora");
    let e = run_err(&[
        "grpo",
        "--config",
        s(&cfg),
        "--init",
        s(&sft()),
        "--out",
        s(&out),
        "--lora-rank",
        "4",
        "--device",
        "cpu",
    ]);
    assert!(
        e.contains("grpo.sync_ref_model needs full fine-tuning")
            && e.lines().filter(|l| l.starts_with("error")).count() == 1,
        "{e}"
    );
}

/// A reward that applies to some responses only (`{"reward": null}` for the others, as a
/// multi-task verifier answers and TRL's reward functions return None): GRPO leaves those
/// responses out of its groups and trains on the rest, logs the share it could not score and
/// their null rewards; PPO, whose returns need every score, stops in one line naming the
/// reward.
#[test]
fn a_reward_that_applies_to_some_responses_only() {
    let dir = tmp();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/partial_reward.py");
    let reward = format!("cmd:python3 {}", script.display());
    let out = p(dir.path(), "grpo");
    run_ok(&args(&grpo_args(&out, "2", &["--reward", &reward])));
    let unscored = series(&metrics(&out), "train", "unscored");
    assert!(
        !unscored.is_empty() && unscored.iter().all(|(_, u)| *u > 0.0 && *u < 1.0),
        "{unscored:?}"
    );
    let log = completions(&out);
    assert!(
        log.iter().any(|c| c["reward"].is_null()),
        "no null reward logged"
    );
    assert!(log.iter().any(|c| c["reward"].is_f64()), "no reward logged");
    let e = run_err(&[
        "ppo",
        "--config",
        &chain().config,
        "--init",
        s(&sft()),
        "--out",
        s(&p(dir.path(), "ppo")),
        "--steps",
        "1",
        "--reward",
        &reward,
        "--device",
        "cpu",
    ]);
    let errors: Vec<&str> = e.lines().filter(|l| l.starts_with("error")).collect();
    assert!(
        errors.len() == 1
            && errors[0].contains("ppo: ")
            && errors[0].contains("scored by no reward"),
        "{e}"
    );
}

/// `--packing` (OpenRLHF's `--packing_samples`) changes the layout of PPO's, GRPO's and
/// online DPO's training forward, not its maths: the packed runs take the unpacked runs' steps and log
/// the share of the padded positions they compute, and a stage without packing refuses the
/// flag. The loss alone would not show a wrong pick (with one minibatch a rollout the ratio
/// is 1 whatever the log-probabilities are); the entropy, the value loss and the KL to the
/// reference read the log-probabilities and values themselves, and a pick one position off
/// moves them by 4e-3 relative and more.
#[test]
fn packed_rl_training_takes_the_padded_steps() {
    let dir = tmp();
    // Scores that vary between samples, so that the steps move the policy.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/varied_reward.py");
    let reward = format!("cmd:python3 {}", script.display());
    for (stage, keys) in [
        ("ppo", &["loss", "entropy", "value_loss", "approx_kl"][..]),
        ("grpo", &["loss", "kl_token", "approx_kl"][..]),
        (
            "online-dpo",
            &["loss", "kl", "logps_chosen", "logps_rejected"][..],
        ),
    ] {
        let run = |packing: bool| {
            let out = p(dir.path(), &format!("{stage}-{packing}"));
            let mut a = grpo_args(
                &out,
                "3",
                &["--log-every", "1", "--reward", &reward, "--beta", "0.05"],
            );
            a[0] = stage.to_string();
            if packing {
                a.push("--packing".into());
            }
            run_ok(&args(&a));
            metrics(&out)
        };
        let (padded, packed) = (run(false), run(true));
        let share = series(&packed, "train", "packed_share");
        assert!(!share.is_empty(), "{stage}: {packed:?}");
        assert!(
            share.iter().all(|&(_, s)| s > 0.0 && s < 1.0),
            "{stage}: {share:?}"
        );
        assert!(series(&padded, "train", "packed_share").is_empty());
        for key in keys {
            let (a, b) = (series(&padded, "train", key), series(&packed, "train", key));
            assert_eq!(a.len(), 3, "{stage} {key}: {a:?}");
            assert_eq!(a.len(), b.len(), "{stage} {key}");
            for ((s0, x), (s1, y)) in a.iter().zip(&b) {
                assert_eq!(s0, s1);
                assert!(
                    (x - y).abs() <= 1e-4 * x.abs() + 1e-8,
                    "{stage} step {s0} {key}: padded {x}, packed {y}"
                );
            }
        }
    }
    let e = run_err(&["reward", "--packing", "--device", "cpu"]);
    assert!(
        e.contains("--packing applies to sft, ppo, grpo and online-dpo, not reward"),
        "{e}"
    );
}

/// Online DPO trains on the pairs its scores rank. With a reward that differs between a
/// prompt's two samples it ranks pairs and logs their loss, the implicit reward's accuracy and
/// the KL; at the first step the policy is the reference, so each pair's loss is log 2 and the
/// KL 0, and the steps move the policy. With a reward that scores every sample alike no pair
/// is ranked: the loss and the gradient are zero, and the run still ends with its model.
/// Two accumulated micro-batches take the step of one batch of both; SimPO loads no
/// reference.
#[test]
fn online_dpo_trains_on_the_pairs_its_scores_rank_and_none_where_they_tie() {
    let dir = tmp();
    let fixture = |name: &str| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        format!("cmd:python3 {}", script.display())
    };
    // The chain's config ends inside its [online_dpo] table: a key appended joins it.
    let config_with = |name: &str, key: &str| {
        let path = p(dir.path(), name);
        let text = std::fs::read_to_string(&chain().config).unwrap();
        std::fs::write(&path, format!("{text}{key}\n")).unwrap();
        s(&path).to_string()
    };
    let run_in = |name: &str, config: &str, reward: &str, extra: &[&str]| {
        let out = p(dir.path(), name);
        let mut flags = vec!["--log-every", "1", "--reward", reward];
        flags.extend(extra);
        let mut a = grpo_args(&out, "3", &flags);
        a[0] = "online-dpo".into();
        a[2] = config.to_string();
        let o = run_ok(&args(&a));
        (out, String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let run = |name: &str, reward: &str| run_in(name, &chain().config, reward, &[]).0;
    let varied_reward = fixture("varied_reward.py");
    let varied = run("varied", &varied_reward);
    let m = metrics(&varied);
    let ranked = series(&m, "train", "ranked_share");
    assert_eq!(ranked.len(), 3, "{m:?}");
    assert!(
        ranked.iter().all(|&(_, r)| r > 0.0 && r <= 1.0),
        "{ranked:?}"
    );
    for key in ["dpo_loss", "reward_accuracy", "score_margin", "kl"] {
        assert_eq!(series(&m, "train", key).len(), 3, "{key}: {m:?}");
    }
    let loss = series(&m, "train", "dpo_loss");
    assert!((loss[0].1 - 2f64.ln()).abs() < 1e-4, "{loss:?}");
    let kl = series(&m, "train", "kl");
    assert!(kl[0].1.abs() < 1e-5 && kl[2].1 > 0.0, "{kl:?}");
    let margin = series(&m, "train", "score_margin");
    assert!(margin.iter().all(|&(_, x)| x > 0.0), "{margin:?}");
    let grad = series(&m, "train", "grad_norm");
    assert!(grad.iter().all(|&(_, g)| g > 0.0), "{grad:?}");
    // Two pairs a step, each sample beside the one it was ranked against.
    let logged = completions(&varied);
    assert_eq!(logged.len(), 12);
    for pair in logged.chunks(2) {
        assert_eq!(pair[0]["prompt"], pair[1]["prompt"], "{pair:?}");
    }

    // A step of two accumulated micro-batches of 2 prompts samples the rows of one batch of
    // 4 and takes its step: the loss is a mean over all the step's ranked pairs, the RPO term
    // one over all its chosen tokens. (At step 2 the two micro-batches rank different numbers
    // of pairs: the mean of each micro-batch's mean failed here.)
    let rpo = config_with("rpo.toml", "rpo_alpha = 1.0");
    let (whole, _) = run_in("whole", &rpo, &varied_reward, &["--batch-size", "4"]);
    let (split, _) = run_in(
        "split",
        &rpo,
        &varied_reward,
        &["--batch-size", "2", "--grad-accum", "2"],
    );
    for key in ["loss", "grad_norm"] {
        let (a, b) = (
            series(&metrics(&whole), "train", key),
            series(&metrics(&split), "train", key),
        );
        assert_eq!(a.len(), 3, "{key}: {a:?}");
        assert!(a.iter().any(|&(_, x)| x != 0.0), "{key}: {a:?}");
        for ((s, x), (_, y)) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-4 * x.abs() + 1e-7,
                "{key} step {s}: {x} vs {y}"
            );
        }
    }

    // SimPO reads no reference: none is loaded, and no KL is logged.
    let simpo = config_with("simpo.toml", "loss_type = \"simpo\"");
    let (out, err) = run_in("simpo", &simpo, &varied_reward, &[]);
    assert!(
        err.contains("loss simpo") && err.contains("reference: none"),
        "{err}"
    );
    assert!(metrics(&out).iter().all(|r| r.get("kl").is_none()));

    let tied = run("tied", &fixture("constant_reward.py"));
    let m = metrics(&tied);
    let ranked = series(&m, "train", "ranked_share");
    assert_eq!(ranked.len(), 3, "{m:?}");
    for key in ["ranked_share", "loss", "grad_norm"] {
        let v = series(&m, "train", key);
        assert!(v.iter().all(|&(_, x)| x == 0.0), "{key}: {v:?}");
    }
    assert!(series(&m, "train", "dpo_loss").is_empty());
    assert!(tied.join("final/meta.json").exists());
}

fn pre() -> PathBuf {
    p(chain().dir.path(), "pre")
}

/// `temper distill` teaches the SFT model's distributions to the pretrained one: the held-out
/// divergence to the teacher falls, `--lmbda` is the share of on-policy steps (their sampled
/// completions' lengths logged), `seq_kd` samples the teacher instead, and `--resume`
/// retraces the uninterrupted run, sampled steps included. A teacher with another vocabulary,
/// a missing teacher and `--teacher` on another stage are refused.
#[test]
fn distill_brings_the_student_to_its_teacher_and_resumes_exactly() {
    let dir = tmp();
    let run = |name: &str, extra: &[&str]| -> PathBuf {
        let out = p(dir.path(), name);
        let (student, teacher) = (pre(), sft());
        let mut a = vec![
            "distill",
            "--config",
            &chain().config,
            "--init",
            s(&student),
            "--out",
            s(&out),
            "--log-every",
            "1",
            "--device",
            "cpu",
        ];
        a.extend(["--teacher", s(&teacher)]);
        a.extend(extra);
        run_ok(&a);
        out
    };
    let learnt = run(
        "learnt",
        &["--steps", "16", "--eval-every", "16", "--lr", "2e-3"],
    );
    let m = metrics(&learnt);
    let eval = series(&m, "val", "loss");
    assert_eq!(eval.len(), 2, "{m:?}");
    assert!(
        eval[1].1 < 0.8 * eval[0].1,
        "the divergence to the teacher did not fall: {eval:?}"
    );
    let on = series(&m, "train", "on_policy");
    assert_eq!(on.len(), 16, "{m:?}");
    let sampled = on.iter().filter(|&&(_, x)| x == 1.0).count();
    assert!((3..=13).contains(&sampled), "{on:?}");
    assert_eq!(series(&m, "train", "sampled_len").len(), sampled, "{m:?}");

    // All on the data's completions, at beta 0 (the forward KL); then seq_kd, every step on
    // the teacher's samples.
    let off = run("off", &["--steps", "2", "--lmbda", "0", "--beta", "0"]);
    let m = metrics(&off);
    assert!(series(&m, "train", "on_policy")
        .iter()
        .all(|&(_, x)| x == 0.0));
    assert!(series(&m, "train", "sampled_len").is_empty(), "{m:?}");
    let seq_kd = p(dir.path(), "seq_kd.toml");
    let text = std::fs::read_to_string(&chain().config).unwrap();
    let text = text.replace("[distill]\n", "[distill]\nseq_kd = true\n");
    std::fs::write(&seq_kd, text).unwrap();
    let out = p(dir.path(), "teacher_samples");
    let teacher = sft();
    run_ok(&[
        "distill",
        "--config",
        s(&seq_kd),
        "--init",
        s(&pre()),
        "--teacher",
        s(&teacher),
        "--out",
        s(&out),
        "--steps",
        "2",
        "--lmbda",
        "0",
        "--log-every",
        "1",
        "--device",
        "cpu",
    ]);
    let m = metrics(&out);
    assert_eq!(series(&m, "train", "sampled_len").len(), 2, "{m:?}");
    assert!(series(&m, "train", "on_policy")
        .iter()
        .all(|&(_, x)| x == 0.0));

    // Resumed from step 2 of 4, the run retraces the whole one.
    let flags = ["--steps", "4", "--eval-every", "100", "--lmbda", "0.5"];
    let whole = run("whole", &flags);
    let cut = run("cut", &[&flags[..], &["--checkpoint-every", "2"]].concat());
    let ckpts = cut.join("checkpoints");
    std::fs::remove_dir_all(ckpts.join("step-0000004")).unwrap();
    std::fs::remove_dir_all(cut.join("final")).unwrap();
    std::fs::write(ckpts.join("latest"), "step-0000002").unwrap();
    run_ok(&["distill", "--resume", s(&cut)]);
    let (a, b) = (
        series(&metrics(&whole), "train", "loss"),
        series(&metrics(&cut), "train", "loss"),
    );
    assert_eq!(a.len(), 4, "{a:?}");
    assert_eq!(a, b, "the resumed run left the curve");
    let on = series(&metrics(&whole), "train", "on_policy");
    assert!(
        on.iter().any(|&(s, x)| s > 2 && x == 1.0),
        "no sampled step after the cut: {on:?}"
    );

    // A teacher with half the student's context, and prompts that leave the samples less
    // room in it than max_new_tokens (6): every step samples, each sample stops where the
    // shorter context ends, and both models read the sequences whole. LoRA trains adapters.
    let short = p(dir.path(), "short.toml");
    let text = TINY_TOML
        .replace(
            "max_position_embeddings = 64",
            "max_position_embeddings = 32",
        )
        .replace("seq_len = 48", "seq_len = 24");
    std::fs::write(&short, text).unwrap();
    let short_teacher = p(dir.path(), "short_teacher");
    pretrain_on_cpu(s(&short), &short_teacher, 2);
    let data = p(dir.path(), "long_prompts.jsonl");
    let line = |i: usize| format!("{{\"prompt\": \"{:>30}\", \"response\": \"ab\"}}\n", i);
    std::fs::write(&data, (0..12).map(line).collect::<String>()).unwrap();
    let out = p(dir.path(), "cramped");
    run_ok(&[
        "distill",
        "--config",
        &chain().config,
        "--init",
        s(&pre()),
        "--teacher",
        s(&short_teacher),
        "--data",
        s(&data),
        "--lmbda",
        "1",
        "--steps",
        "2",
        "--log-every",
        "1",
        "--batch-size",
        "4",
        "--lora-rank",
        "4",
        "--out",
        s(&out),
        "--device",
        "cpu",
    ]);
    let m = metrics(&out);
    let len = series(&m, "train", "sampled_len");
    assert_eq!(len.len(), 2, "{m:?}");
    assert!(len.iter().all(|&(_, l)| l > 0.0 && l <= 2.0), "{len:?}");
    assert!(out.join("final/adapter.safetensors").exists());

    // Another vocabulary, no teacher, a teacher for another stage.
    let hf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama");
    let e = run_err(&[
        "distill",
        "--config",
        &chain().config,
        "--init",
        s(&pre()),
        "--teacher",
        s(&hf),
        "--out",
        s(&p(dir.path(), "vocab")),
        "--device",
        "cpu",
    ]);
    assert!(
        e.contains("tokenizer") && e.contains("not the student's"),
        "{e}"
    );
    let e = run_err(&[
        "distill",
        "--config",
        &chain().config,
        "--init",
        s(&pre()),
        "--out",
        s(&p(dir.path(), "none")),
        "--device",
        "cpu",
    ]);
    assert!(e.contains("--teacher"), "{e}");
    let e = run_err(&[
        "sft",
        "--init",
        s(&pre()),
        "--teacher",
        s(&hf),
        "--device",
        "cpu",
    ]);
    assert!(e.contains("--teacher applies to distill, not sft"), "{e}");
}

/// `--batch-size` sizes nothing in PPO or GRPO (their rollouts do): refused, with what does.
#[test]
fn batch_size_is_refused_by_the_rollout_stages() {
    let d = tmp();
    for (stage, table) in [
        ("ppo", Some("[ppo] rollout_batch")),
        ("grpo", Some("[grpo] prompts_per_rollout")),
        ("sft", None),
    ] {
        let out = p(d.path(), stage);
        let err = run_err(&[
            stage,
            "--batch-size",
            "8",
            "--out",
            s(&out),
            "--device",
            "cpu",
        ]);
        match table {
            Some(table) => assert!(
                err.contains(&format!(
                    "error: --batch-size is not read by {stage}: a rollout is {table}"
                )),
                "{stage}: {err}"
            ),
            None => assert!(!err.contains("--batch-size is not read"), "{stage}: {err}"),
        }
    }
}

/// Where there is nothing to score (held-out prompts without answers, a user's preference pairs
/// or labelled records, held-out records of one label), a stage's summary says so in place of
/// a NaN, its held-out lines in metrics.jsonl leave the number out, and what was measured is
/// reported as ever.
#[test]
fn a_stage_with_nothing_to_score_says_so_in_place_of_nan() {
    let dir = tmp();
    let summary = |o: &std::process::Output| {
        let line = String::from_utf8_lossy(&o.stdout).to_string();
        // As a word, as `{}` prints an f64 NaN: "nan" inside a word ("nano") is no number.
        let mut words = line.split(|c: char| !c.is_alphanumeric());
        assert!(!words.any(|w| w.eq_ignore_ascii_case("nan")), "{line}");
        line
    };
    let held_out = |out: &Path| -> Vec<serde_json::Value> {
        let m = metrics(out);
        let val: Vec<_> = m.into_iter().filter(|m| m["split"] == "val").collect();
        assert!(!val.is_empty());
        for m in &val {
            assert!(m.as_object().unwrap().values().all(|v| !v.is_null()), "{m}");
        }
        val
    };
    // GRPO scored by a reward of its own, on prompts without answers: no accuracy.
    let prompts = p(dir.path(), "prompts.jsonl");
    let lines: String = (0..8)
        .map(|i| format!("{{\"prompt\": \"{i}+1=\"}}\n"))
        .collect();
    std::fs::write(&prompts, lines).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/constant_reward.py");
    let reward = format!("cmd:python3 {}", script.display());
    let out = p(dir.path(), "grpo");
    let flags = ["--reward", &reward, "--data", s(&prompts)];
    let flags = [&flags[..], &["--eval-data", s(&prompts)]].concat();
    let o = run_ok(&args(&grpo_args(&out, "1", &flags)));
    let line = summary(&o);
    assert!(
        line.contains("grpo: no accuracy (a held-out prompt has no answer")
            && line.contains("mean reward 1.000 (from 1.000)"),
        "{line}"
    );
    for m in held_out(&out) {
        assert!(
            m.get("accuracy").is_none() && m["mean_reward"] == 1.0,
            "{m}"
        );
    }

    // DPO on a user's pairs, KTO on a user's records whose held-out ones are all desirable.
    let words = [
        "apple", "river", "stone", "cloud", "green", "table", "music", "light",
    ];
    let records = |name: &str, line: &dyn Fn(&str) -> serde_json::Value| {
        let path = p(dir.path(), name);
        let body: String = (0..16)
            .map(|i| format!("{}\n", line(words[i % 8])))
            .collect();
        std::fs::write(&path, body).unwrap();
        path
    };
    let pairs = records(
        "pairs.jsonl",
        &|w| serde_json::json!({"prompt": format!("say {w}: "), "chosen": w, "rejected": w.to_uppercase()}),
    );
    let desirable = records(
        "desirable.jsonl",
        &|w| serde_json::json!({"prompt": format!("say {w}: "), "completion": w, "label": true}),
    );
    let run = |stage: &str, data: &Path, eval: &Path| {
        let out = p(dir.path(), stage);
        let o = run_ok(&[
            stage,
            "--config",
            &chain().config,
            "--init",
            s(&sft()),
            "--data",
            s(data),
            "--eval-data",
            s(eval),
            "--out",
            s(&out),
            "--steps",
            "1",
            "--device",
            "cpu",
        ]);
        (summary(&o), held_out(&out))
    };
    let (line, val) = run("dpo", &pairs, &pairs);
    assert!(
        line.contains(
            "dpo: no task accuracy (no held-out prompts, or one has no answer to check against), \
             implicit-reward accuracy"
        ),
        "{line}"
    );
    assert!(val.iter().all(|m| m.get("accuracy").is_none()), "{val:?}");
    let (line, val) = run("kto", &pairs, &desirable);
    assert!(
        line.contains(
            "kto: no task accuracy (no held-out prompts, or one has no answer to check against), \
             held-out examples"
        ) && line.contains("no reward margin (the held-out examples have one label only)"),
        "{line}"
    );
    assert!(
        val.iter()
            .all(|m| m.get("reward_margin").is_none() && m["reward_desirable"].is_f64()),
        "{val:?}"
    );
}
