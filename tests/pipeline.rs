//! `temper pipeline` at its default scale, the README's main job, with every extra stage:
//! every stage runs in one directory and does its job on held-out data. Every RL stage beat
//! SFT on seeds 0, 1 and 2 (BENCHMARKS.md); this test runs seed 0, where each margin is at
//! least 27 points on 63 held-out prompts, and asks for more than 12. Distillation from the PPO
//! policy took the SFT model from 0.571 to 0.968 there.

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
        "--with",
        "dpo,kto,online_dpo,grpo,rloo,reinforce_pp,gspo,distill",
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
    let rm = f("reward", "accuracy");
    assert!(
        rm > 0.65 && rm > f("reward", "initial_accuracy"),
        "reward model near chance: {text}"
    );
    // The SFT model imitates the demonstrator's carry slips; the checker and the preference
    // labels do not, so each RL stage must beat SFT clearly.
    for stage in [
        "ppo",
        "dpo",
        "kto",
        "online_dpo",
        "grpo",
        "rloo",
        "reinforce_pp",
        "gspo",
    ] {
        assert!(
            f(stage, "accuracy") > f(stage, "sft_accuracy") + 0.12,
            "{stage} not clearly above SFT: {text}"
        );
    }
    // The student learns what its teacher knows: the PPO policy's sums, which the SFT data
    // (the demonstrator's, slips and all) does not hold. The teacher's accuracy, measured by
    // the distill stage, is the PPO stage's own: the same model, prompts and greedy decoding.
    assert!(
        f("distill", "accuracy") > f("distill", "sft_accuracy") + 0.12,
        "distill not clearly above SFT: {text}"
    );
    assert_eq!(f("distill", "sft_accuracy"), f("sft", "accuracy"), "{text}");
    assert_eq!(
        f("distill", "teacher_accuracy"),
        f("ppo", "accuracy"),
        "{text}"
    );
    assert!(f("distill", "eval_loss") >= 0.0, "{text}");
    for stage in ["ppo", "online_dpo", "grpo", "rloo", "reinforce_pp", "gspo"] {
        let kl = f(stage, "kl");
        assert!(kl.is_finite() && kl >= 0.0, "{stage} KL {kl}: {text}");
        for key in ["accuracy", "sft_accuracy", "mean_reward", "sft_mean_reward"] {
            f(stage, key);
        }
        // The task reward is exact match, so the greedy mean reward is the accuracy.
        assert!(
            (f(stage, "mean_reward") - f(stage, "accuracy")).abs() < 1e-9,
            "{text}"
        );
    }
    for stage in [
        "pretrain",
        "sft",
        "reward",
        "ppo",
        "dpo",
        "kto",
        "online_dpo",
        "grpo",
        "rloo",
        "reinforce_pp",
        "gspo",
        "distill",
    ] {
        assert!(
            out.join(stage).join("final/meta.json").exists(),
            "{stage} left no final checkpoint"
        );
        assert!(out.join(stage).join("metrics.jsonl").exists());
    }
    for stage in ["ppo", "online_dpo", "grpo", "rloo", "reinforce_pp", "gspo"] {
        let log = std::fs::read_to_string(out.join(stage).join("completions.jsonl")).unwrap();
        assert!(
            log.lines().count() >= 8,
            "{stage}: completions.jsonl too short"
        );
    }
}
