//! `temper pipeline` at a reduced scale: every stage runs in one directory and does its job
//! on held-out data (the full-scale margins, PPO over SFT included, are recorded in
//! BENCHMARKS.md from `cargo run --release -- pipeline`).

mod common;

use common::*;

#[test]
fn pipeline_runs_every_stage_and_each_learns() {
    let d = tmp();
    let out = p(d.path(), "pipe");
    run_ok(&[
        "pipeline",
        "--out",
        out.to_str().unwrap(),
        "--scale",
        "0.4",
        "--with",
        "dpo,grpo",
        "--device",
        "cpu",
    ]);
    let text = std::fs::read_to_string(out.join("summary.json")).unwrap();
    let s: serde_json::Value = serde_json::from_str(&text).unwrap();
    let f = |stage: &str, key: &str| -> f64 {
        s[stage][key]
            .as_f64()
            .unwrap_or_else(|| panic!("summary.json lacks {stage}.{key}: {text}"))
    };
    assert!(
        f("pretrain", "val_loss") < 0.5 * f("pretrain", "first_val_loss"),
        "{text}"
    );
    assert!(f("sft", "accuracy") > f("sft", "base_accuracy"), "{text}");
    assert!(f("reward", "accuracy") > 0.6, "{text}");
    for stage in ["ppo", "grpo"] {
        let kl = f(stage, "kl");
        assert!(kl.is_finite() && kl >= 0.0, "{stage} KL {kl}: {text}");
        f(stage, "accuracy");
        f(stage, "sft_accuracy");
    }
    f("ppo", "mean_reward");
    f("dpo", "accuracy");
    for stage in ["pretrain", "sft", "reward", "ppo", "dpo", "grpo"] {
        assert!(
            out.join(stage).join("final/meta.json").exists(),
            "{stage} left no final checkpoint"
        );
        assert!(out.join(stage).join("metrics.jsonl").exists());
    }
}
