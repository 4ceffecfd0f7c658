//! The alignment stages on a tiny model: the maths on hand-computed cases, LoRA leaving the
//! base bitwise unchanged, PPO's first-minibatch ratio of 1, and clear errors for bad input.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use temper::stages::dpo::{dpo_loss, with_chosen_nll};
use temper::stages::ppo::{kl_estimate, policy_loss, value_loss, KlEstimator};

fn t(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

fn s(x: &Tensor) -> f64 {
    x.to_scalar::<f32>().unwrap() as f64
}

#[test]
fn dpo_loss_is_log2_when_policy_equals_reference() {
    let lp = Tensor::new(&[-3.0f32, -1.5, -7.0], &Device::Cpu).unwrap();
    let lr = Tensor::new(&[-2.0f32, -4.0, -0.5], &Device::Cpu).unwrap();
    let (loss, _) = dpo_loss(&lp, &lr, &lp, &lr, 0.1).unwrap();
    assert!((s(&loss) - 2f64.ln()).abs() < 1e-6);
    // margin beta*((0 - -1) - (0 - 0)) = 0.5 -> -log sigmoid(0.5)
    let z = Tensor::new(&[0.0f32], &Device::Cpu).unwrap();
    let m1 = Tensor::new(&[-1.0f32], &Device::Cpu).unwrap();
    let (loss, acc) = dpo_loss(&z, &z, &m1, &z, 0.5).unwrap();
    assert!((s(&loss) - (1.0 + (-0.5f64).exp()).ln()).abs() < 1e-6);
    assert_eq!(acc, 1.0);
}

#[test]
fn rpo_term_is_the_chosen_nll_per_token() {
    // Chosen responses of 2 and 3 tokens with summed log-probs -1 and -4: NLL 5/5 = 1 per
    // token, so alpha 0.5 adds 0.5.
    let loss = Tensor::new(0.25f32, &Device::Cpu).unwrap();
    let lp = t(&[-1.0, -4.0]);
    let n = t(&[2.0, 3.0]);
    assert!((s(&with_chosen_nll(&loss, &lp, &n, 0.5).unwrap()) - 0.75).abs() < 1e-6);
    assert_eq!(s(&with_chosen_nll(&loss, &lp, &n, 0.0).unwrap()), 0.25);
}

#[test]
fn ppo_losses_match_hand_computation() {
    // Token 0: ratio e^0.5 = 1.6487 > 1.2 with A = 1 -> clipped objective 1.2 (loss -1.2).
    // Token 1: ratio 1, A = -2 -> loss 2. Token 2 is padding.
    let old = t(&[0.0, 0.0, 0.0]);
    let new = t(&[0.5, 0.0, 9.0]);
    let adv = t(&[1.0, -2.0, 5.0]);
    let mask = t(&[1.0, 1.0, 0.0]);
    let (loss, clipfrac, approx_kl, _) = policy_loss(&new, &old, &adv, &mask, 0.2).unwrap();
    assert!((s(&loss) - (-1.2 + 2.0) / 2.0).abs() < 1e-6, "{}", s(&loss));
    assert!((clipfrac - 0.5).abs() < 1e-9);
    assert!((approx_kl - 0.5 * 0.25 / 2.0).abs() < 1e-7);
    // A negative advantage with a ratio below 1 - eps takes the unclipped, larger loss.
    let (loss, _, _, _) =
        policy_loss(&t(&[-1.0]), &t(&[0.0]), &t(&[-1.0]), &t(&[1.0]), 0.2).unwrap();
    assert!((s(&loss) - (-1.0f64).exp()).abs() > 0.0 && (s(&loss) - 0.8).abs() < 1e-6);
    // Value: v = 2, v_old = 0, R = 1, clip 0.5 -> vclip 0.5; max((1)^2, (0.5)^2) = 1 -> 0.5.
    let vl = value_loss(&t(&[2.0]), &t(&[0.0]), &t(&[1.0]), &t(&[1.0]), 0.5).unwrap();
    assert!((s(&vl) - 0.5).abs() < 1e-6);
    // v = 0.2, v_old = 0, R = 3: vclip = 0.2; 0.5 * 2.8^2.
    let vl = value_loss(&t(&[0.2]), &t(&[0.0]), &t(&[3.0]), &t(&[1.0]), 0.5).unwrap();
    assert!((s(&vl) - 0.5 * 2.8f64.powi(2)).abs() < 1e-5);
}

#[test]
fn kl_estimators_match_their_formulas() {
    let lp = t(&[-1.0, -2.0]);
    let lr = t(&[-1.5, -1.0]);
    let k1 = kl_estimate(&lp, &lr, KlEstimator::K1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(k1, vec![0.5, -1.0]);
    let k3 = kl_estimate(&lp, &lr, KlEstimator::K3)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (k, d) in k3.iter().zip([0.5f64, -1.0]) {
        // k3 = e^{-d} + d - 1 with d = logp - logp_ref
        assert!((*k as f64 - ((-d).exp() + d - 1.0)).abs() < 1e-6);
        assert!(*k >= 0.0);
    }
}

/// pretrain -> sft (LoRA) -> reward -> ppo (LoRA) -> dpo on a tiny model, checking what each
/// stage promises besides learning (which the pipeline test checks).
#[test]
fn stages_chain_with_lora_and_keep_their_promises() {
    let d = tmp();
    let dir = d.path();
    let cfg = p(dir, "c.toml");
    std::fs::write(&cfg, format!("{TINY_TOML}\n[sft]\neval_prompts = 40\n[ppo]\neval_prompts = 40\nrollout_batch = 16\nminibatch_size = 8\n[dpo]\neval_prompts = 20\neval_pairs = 16\n")).unwrap();
    let c = cfg.to_str().unwrap();
    let pre = p(dir, "pre");
    pretrain_on_cpu(c, &pre, 30);
    let sft = p(dir, "sft");
    run_ok(&[
        "sft",
        "--config",
        c,
        "--init",
        pre.to_str().unwrap(),
        "--out",
        sft.to_str().unwrap(),
        "--steps",
        "20",
        "--lora-rank",
        "4",
        "--lora-targets",
        "q,v,up",
        "--device",
        "cpu",
    ]);
    // LoRA: base tensors byte-identical, adapters saved on their own.
    let base =
        candle_core::safetensors::load(pre.join("final/model.safetensors"), &Device::Cpu).unwrap();
    let after =
        candle_core::safetensors::load(sft.join("final/model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(base.len(), after.len());
    for (name, a) in &base {
        let b = &after[name];
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{name} changed"
        );
    }
    let adapters =
        candle_core::safetensors::load(sft.join("final/adapter.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(adapters.keys().all(|k| k.contains(".lora_")) && adapters.len() == 2 * 3 * 2);
    // export --merge writes a plain checkpoint that evaluates.
    let merged = p(dir, "merged");
    run_ok(&[
        "export",
        "--checkpoint",
        sft.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
        "--merge",
    ]);
    assert!(!merged.join("adapter.safetensors").exists());

    let rm = p(dir, "rm");
    run_ok(&[
        "reward",
        "--config",
        c,
        "--init",
        sft.to_str().unwrap(),
        "--out",
        rm.to_str().unwrap(),
        "--steps",
        "10",
        "--device",
        "cpu",
    ]);
    // A policy where a reward model is expected is refused clearly.
    let e = run_err(&[
        "ppo",
        "--config",
        c,
        "--init",
        sft.to_str().unwrap(),
        "--reward",
        sft.to_str().unwrap(),
        "--out",
        p(dir, "x").to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(e.contains("policy") && e.contains("reward"), "{e}");

    let ppo = p(dir, "ppo");
    let out = temper()
        .args([
            "ppo",
            "--config",
            c,
            "--init",
            sft.to_str().unwrap(),
            "--out",
            ppo.to_str().unwrap(),
            "--steps",
            "8",
            "--log-every",
            "1",
            "--reward",
            "task",
            "--reward",
            &format!("{}:0.5", rm.display()),
            "--lora-rank",
            "4",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("adapters off"), "{err}");
    let m = metrics(&ppo);
    let first: Vec<_> = m
        .iter()
        .filter(|v| v["split"] == "train" && v["rollout"] == 1.0)
        .collect();
    assert!(!first.is_empty());
    for v in first {
        assert!(
            (v["ratio"].as_f64().unwrap() - 1.0).abs() < 1e-5,
            "ratio in the first minibatch: {v}"
        );
        for k in [
            "score",
            "kl",
            "entropy",
            "clipfrac",
            "approx_kl",
            "value_loss",
            "explained_variance",
            "response_length",
            "gen_time_s",
        ] {
            assert!(v.get(k).is_some(), "{k} not logged: {v}");
        }
    }
    // PPO with LoRA leaves the (merged SFT) base untouched.
    let ppo_w =
        candle_core::safetensors::load(ppo.join("final/model.safetensors"), &Device::Cpu).unwrap();
    let merged_w =
        candle_core::safetensors::load(merged.join("model.safetensors"), &Device::Cpu).unwrap();
    for (name, a) in &merged_w {
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            ppo_w[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{name}"
        );
    }

    let dpo = p(dir, "dpo");
    run_ok(&[
        "dpo",
        "--config",
        c,
        "--init",
        sft.to_str().unwrap(),
        "--out",
        dpo.to_str().unwrap(),
        "--steps",
        "4",
        "--lora-rank",
        "4",
        "--device",
        "cpu",
    ]);
    let first_val = series(&metrics(&dpo), "val", "loss")[0].1;
    assert!(
        (first_val - 2f64.ln()).abs() < 1e-4,
        "DPO starts at log 2, got {first_val}"
    );
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
    run_ok(&strs(&args(&[
        "--chat-template",
        tpl.to_str().unwrap(),
        "--out",
        sft.to_str().unwrap(),
        "--steps",
        "60",
        "--eval-every",
        "20",
    ])));
    let val = series(&metrics(&sft), "val", "loss");
    let (first, last) = (val[0].1, val[val.len() - 1].1);
    assert!(
        last < 0.6 * first,
        "held-out assistant loss {first} -> {last}"
    );
    let written = std::fs::read_to_string(sft.join("config.toml")).unwrap();
    assert!(written.contains("chat_template"), "{written}");

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

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
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
