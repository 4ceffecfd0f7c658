//! Tests of the stages' tables.

use std::path::PathBuf;

use super::*;
use crate::config::assert_refuses;

/// WPO reads TRL's name and refuses the losses that sort the pairs.
#[test]
fn dpo_reads_use_weighting_and_refuses_it_with_sorted_losses() {
    let c: DpoConfig = toml::from_str("use_weighting = true").unwrap();
    assert!(c.use_weighting);
    c.validate().unwrap();
    for loss in [DpoLoss::Aot, DpoLoss::AotUnpaired] {
        let e = DpoConfig {
            use_weighting: true,
            loss_type: vec![DpoLoss::Sigmoid, loss],
            ..DpoConfig::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("dpo.use_weighting") && !e.contains('\n') && !e.contains("  "),
            "{e}"
        );
    }
}

#[test]
fn ppo_and_grpo_refuse_coefficients_out_of_their_range() {
    PpoConfig::default().validate().unwrap();
    let bad = |f, field| assert_refuses(PpoConfig::validate, "ppo", f, field);
    bad(|c| c.max_new_tokens = 0, "max_new_tokens");
    bad(|c| c.kl_coef = -1.0, "kl_coef");
    bad(|c| c.vf_coef = f64::NAN, "vf_coef");
    bad(|c| c.cliprange_value = -1.0, "cliprange_value");
    bad(|c| c.gamma = 1.5, "gamma");
    bad(|c| c.lam = 2.0, "lam");
    bad(|c| c.target_kl = 0.0, "target_kl");
    let grpo = |f, field| assert_refuses(GrpoConfig::validate, "grpo", f, field);
    grpo(|c| c.max_new_tokens = 0, "max_new_tokens");
    grpo(|c| c.epochs = 0, "epochs");
}

#[test]
fn online_dpo_refuses_what_would_break_its_sampling_or_loss() {
    let ok = OnlineDpoConfig::default();
    ok.validate().unwrap();
    assert_eq!(ok.loss().beta, ok.beta);
    let bad = |f, field| assert_refuses(OnlineDpoConfig::validate, "online_dpo", f, field);
    bad(|c| c.beta = 0.0, "beta");
    bad(|c| c.temperature = f64::NAN, "temperature");
    bad(|c| c.top_p = 0.0, "top_p");
    bad(|c| c.min_p = 1.5, "min_p");
    bad(|c| c.min_p = f64::NAN, "min_p");
    bad(|c| c.repetition_penalty = 0.0, "repetition_penalty");
    bad(
        |c| c.repetition_penalty = f64::INFINITY,
        "repetition_penalty",
    );
    bad(|c| c.rpo_alpha = -1.0, "rpo_alpha");
    bad(|c| c.max_new_tokens = 0, "max_new_tokens");
    bad(|c| c.label_smoothing = 0.6, "label_smoothing");
    bad(
        |c| {
            c.loss_type = DpoLoss::Ipo;
            c.label_smoothing = 0.1
        },
        "label_smoothing",
    );
    bad(|c| c.discopop_tau = 0.0, "discopop_tau");
    let tau = OnlineDpoConfig {
        discopop_tau: 0.2,
        ..ok
    };
    assert_eq!(tau.loss().discopop_tau, 0.2);
}

/// TR-DPO reads TRL's names and refuses a reference it could not move: one precomputed,
/// or none (SimPO), or an update of none or past the policy.
#[test]
fn dpo_reads_tr_dpo_and_refuses_what_it_could_not_sync() {
    let text = "sync_ref_model = true\nref_model_mixup_alpha = 0.5\nref_model_sync_steps = 64";
    let c: DpoConfig = toml::from_str(text).unwrap();
    assert!(c.sync_ref_model);
    assert_eq!((c.ref_model_mixup_alpha, c.ref_model_sync_steps), (0.5, 64));
    c.validate().unwrap();
    let bad = |f: fn(&mut DpoConfig), field: &str| {
        let mut c = DpoConfig {
            sync_ref_model: true,
            ..DpoConfig::default()
        };
        f(&mut c);
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains(&format!("dpo.{field}")) && !e.contains('\n'),
            "{e}"
        );
    };
    bad(|c| c.ref_model_mixup_alpha = 0.0, "ref_model_mixup_alpha");
    bad(|c| c.ref_model_mixup_alpha = 1.5, "ref_model_mixup_alpha");
    bad(|c| c.ref_model_sync_steps = 0, "ref_model_sync_steps");
    bad(|c| c.precompute_ref_log_probs = true, "sync_ref_model");
    bad(|c| c.loss_type = vec![DpoLoss::Simpo], "sync_ref_model");
}

/// `loss_type` takes one name or TRL's list, with `loss_weights`; a list that names a loss
/// twice, weights that do not match it, and "sft" beside `rpo_alpha`'s own NLL are refused,
/// each in one line naming the key.
#[test]
fn dpo_reads_a_list_of_losses_with_weights() {
    let one: DpoConfig = toml::from_str("loss_type = \"ipo\"").unwrap();
    assert_eq!(one.loss_type, [DpoLoss::Ipo]);
    // A misspelt name, alone or in a list, is answered with the names it takes.
    for text in [
        "loss_type = \"sigmod\"",
        "loss_type = [\"ipo\", \"sigmod\"]",
    ] {
        let e = toml::from_str::<DpoConfig>(text).unwrap_err().to_string();
        assert!(e.contains("sigmod") && e.contains("apo_zero"), "{e}");
    }
    let text = "loss_type = [\"sigmoid\", \"bco_pair\", \"sft\"]\n\
                loss_weights = [0.8, 0.2, 1.0]\nrpo_alpha = 0.0";
    let mpo: DpoConfig = toml::from_str(text).unwrap();
    mpo.validate().unwrap();
    let losses: Vec<_> = mpo.losses().collect();
    let want = [
        (DpoLoss::Sigmoid, 0.8),
        (DpoLoss::BcoPair, 0.2),
        (DpoLoss::Sft, 1.0),
    ];
    assert_eq!(losses, want);
    assert_eq!(mpo.sft_weight(), 1.0);
    assert!(mpo.needs_reference() && mpo.has(DpoLoss::BcoPair));
    assert_eq!(mpo.loss_names(), "sigmoid + bco_pair + sft");
    let back: DpoConfig = toml::from_str(&toml::to_string(&mpo).unwrap()).unwrap();
    assert_eq!(back, mpo);
    let sft_only: DpoConfig = toml::from_str("loss_type = [\"sft\"]\nrpo_alpha = 0.0").unwrap();
    sft_only.validate().unwrap();
    assert!(!sft_only.needs_reference());
    let bad = |text: &str, says: &str| {
        let c: DpoConfig = toml::from_str(text).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(says) && !e.contains('\n'), "{e}");
    };
    bad(
        "loss_type = [\"sigmoid\", \"sft\"]",
        "dpo.loss_type lists \"sft\"",
    );
    bad("loss_type = [\"ipo\", \"ipo\"]", "names \"ipo\" twice");
    bad("loss_type = []", "dpo.loss_type names no loss");
    bad(
        "loss_type = [\"sigmoid\", \"hinge\"]\nloss_weights = [1.0]",
        "dpo.loss_weights has 1 weights for 2",
    );
    bad(
        "loss_weights = [-1.0]",
        "dpo.loss_weights must be 0 or positive",
    );
    bad("ld_alpha = 1.5", "dpo.ld_alpha must be in [0, 1]");
    bad(
        "loss_type = [\"hinge\", \"ipo\"]\nlabel_smoothing = 0.1",
        "not hinge + ipo",
    );
    let f: DpoConfig = toml::from_str(
        "f_divergence_type = \"alpha_divergence\"\n\
                                       f_alpha_divergence_coef = 0.3",
    )
    .unwrap();
    assert_eq!(f.f_divergence_type, FDivergence::AlphaDivergence);
    f.validate().unwrap();
    bad(
        "loss_type = \"simpo\"\nf_divergence_type = \"forward_kl\"",
        "dpo.f_divergence_type",
    );
    bad(
        "loss_type = [\"sigmoid\", \"bco_pair\"]\nf_divergence_type = \"forward_kl\"",
        "dpo.f_divergence_type: loss_type \"bco_pair\"",
    );
    bad("rpo_alpha = -1.0", "dpo.rpo_alpha must be 0 or positive");
    bad("rpo_alpha = nan", "dpo.rpo_alpha must be 0 or positive");
    let aot: DpoConfig = toml::from_str("loss_type = \"aot\"\nlabel_smoothing = 0.1").unwrap();
    aot.validate().unwrap();
    let online: OnlineDpoConfig = toml::from_str("loss_type = \"sft\"").unwrap();
    let e = online.validate().unwrap_err().to_string();
    assert!(e.contains("online_dpo.loss_type = \"sft\""), "{e}");
}

/// GSPO's one ratio per response needs one advantage per response.
#[test]
fn grpo_refuses_sequence_ratios_over_per_token_advantages() {
    let mut c = GrpoConfig {
        importance_sampling_level: ImportanceSamplingLevel::Sequence,
        ..GrpoConfig::default()
    };
    c.validate().unwrap();
    c.advantage_estimator = AdvantageEstimator::Rloo;
    c.validate().unwrap();
    c.advantage_estimator = AdvantageEstimator::ReinforcePlusPlus;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("grpo.importance_sampling_level"), "{e}");
}

/// The KL acts where each peer puts it by default: GRPO's in the loss, RLOO's off the
/// score (TRL's RLOOTrainer), REINFORCE++'s in the per-token reward; `kl_in_reward` moves
/// GRPO's and RLOO's, and is refused where it could not take effect.
#[test]
fn grpo_places_the_kl_as_each_estimator_does_unless_told() {
    use AdvantageEstimator::*;
    let at = |est, kl_in_reward| GrpoConfig {
        advantage_estimator: est,
        kl_in_reward,
        ..GrpoConfig::default()
    };
    assert_eq!(at(GroupNorm, None).kl_place(), KlPlace::Loss);
    assert_eq!(at(Rloo, None).kl_place(), KlPlace::SequenceReward);
    assert_eq!(at(ReinforcePlusPlus, None).kl_place(), KlPlace::TokenReward);
    assert_eq!(
        at(GroupNorm, Some(true)).kl_place(),
        KlPlace::SequenceReward
    );
    assert_eq!(at(Rloo, Some(false)).kl_place(), KlPlace::Loss);
    assert_eq!(
        at(ReinforcePlusPlus, Some(true)).kl_place(),
        KlPlace::TokenReward
    );
    let c: GrpoConfig = toml::from_str("kl_in_reward = true").unwrap();
    assert_eq!(c.kl_in_reward, Some(true));
    c.validate().unwrap();
    let e = at(ReinforcePlusPlus, Some(false))
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("grpo.kl_in_reward"), "{e}");
    let gdpo = GrpoConfig {
        multi_objective_aggregation: MultiObjective::NormalizeThenSum,
        ..at(GroupNorm, Some(true))
    };
    let e = gdpo.validate().unwrap_err().to_string();
    assert!(e.contains("grpo.kl_in_reward"), "{e}");
    let corrected = GrpoConfig {
        use_bias_correction_kl: true,
        ..at(Rloo, None)
    };
    let e = corrected.validate().unwrap_err().to_string();
    assert!(e.contains("grpo.use_bias_correction_kl"), "{e}");
    GrpoConfig {
        use_bias_correction_kl: true,
        ..at(Rloo, Some(false))
    }
    .validate()
    .unwrap();
    // A new run records where its KL acts; a resumed rloo run that recorded nothing keeps
    // the loss term it began with; what a run recorded stays.
    let recorded = |mut c: GrpoConfig, resumed| (c.record_kl_place(resumed), c);
    let (old, c) = recorded(at(Rloo, None), false);
    assert_eq!((old, c.kl_in_reward), (false, Some(true)));
    let (old, c) = recorded(at(GroupNorm, None), false);
    assert_eq!((old, c.kl_in_reward), (false, Some(false)));
    let (old, c) = recorded(at(Rloo, None), true);
    assert_eq!((old, c.kl_place()), (true, KlPlace::Loss));
    let (old, c) = recorded(at(Rloo, Some(true)), true);
    assert_eq!((old, c.kl_place()), (false, KlPlace::SequenceReward));
    let (old, c) = recorded(at(ReinforcePlusPlus, None), false);
    assert_eq!((old, c.kl_in_reward), (false, None));
}

/// TRL's newer GRPO knobs read by their names, and each setting whose maths would not
/// hold is refused naming its key: CISPO without its ratio cap, VESPO over sequence
/// ratios, GDPO under another estimator, a quantile outside [0, 1], TR-DPO without a
/// reference, and GRPO's losses asked of PPO.
#[test]
fn grpo_reads_trls_newer_knobs_and_refuses_what_would_not_hold() {
    let text = "loss_type = \"cispo\"\nepsilon_high = 5.0\ntop_entropy_quantile = 0.2\n\
                multi_objective_aggregation = \"normalize_then_sum\"\nsync_ref_model = true\n\
                off_policy_mask_threshold = 0.5\nuse_adaptive_entropy = true";
    let c: GrpoConfig = toml::from_str(text).unwrap();
    c.validate().unwrap();
    assert_eq!(c.loss_type, LossType::Cispo);
    assert_eq!(
        c.multi_objective_aggregation,
        MultiObjective::NormalizeThenSum
    );
    assert!(c.needs_entropy() && c.entropy_bonus());
    assert!(!GrpoConfig::default().needs_entropy());
    let refused = |c: GrpoConfig, key: &str| {
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(key), "{key}: {e}");
    };
    refused(
        GrpoConfig {
            loss_type: LossType::Cispo,
            ..GrpoConfig::default()
        },
        "grpo.epsilon_high",
    );
    refused(
        GrpoConfig {
            loss_type: LossType::Vespo,
            importance_sampling_level: ImportanceSamplingLevel::Sequence,
            ..GrpoConfig::default()
        },
        "grpo.importance_sampling_level",
    );
    refused(
        GrpoConfig {
            multi_objective_aggregation: MultiObjective::NormalizeThenSum,
            advantage_estimator: AdvantageEstimator::Rloo,
            ..GrpoConfig::default()
        },
        "normalize_then_sum",
    );
    refused(
        GrpoConfig {
            top_entropy_quantile: 1.5,
            ..GrpoConfig::default()
        },
        "grpo.top_entropy_quantile",
    );
    let sampling: GrpoConfig =
        toml::from_str("min_p = 0.05\nrepetition_penalty = 1.05\ntop_k = 20").unwrap();
    sampling.validate().unwrap();
    assert_eq!((sampling.min_p, sampling.repetition_penalty), (0.05, 1.05));
    refused(
        GrpoConfig {
            min_p: -0.1,
            ..GrpoConfig::default()
        },
        "grpo.min_p",
    );
    refused(
        GrpoConfig {
            repetition_penalty: -1.0,
            ..GrpoConfig::default()
        },
        "grpo.repetition_penalty",
    );
    refused(
        GrpoConfig {
            sync_ref_model: true,
            beta: 0.0,
            ..GrpoConfig::default()
        },
        "grpo.sync_ref_model",
    );
    refused(
        GrpoConfig {
            off_policy_mask_threshold: Some(0.0),
            ..GrpoConfig::default()
        },
        "grpo.off_policy_mask_threshold",
    );
    refused(
        GrpoConfig {
            use_adaptive_entropy: true,
            entropy_coef_min: 1.0,
            entropy_coef_max: 0.5,
            ..GrpoConfig::default()
        },
        "grpo.use_adaptive_entropy",
    );
    let c: GrpoConfig =
        toml::from_str("reward_clip_range = [-1.0, 2.5]\nnormalize_advantages = true").unwrap();
    assert_eq!(c.reward_clip_range, Some([-1.0, 2.5]));
    c.validate().unwrap();
    refused(
        GrpoConfig {
            reward_clip_range: Some([1.0, 1.0]),
            ..GrpoConfig::default()
        },
        "grpo.reward_clip_range",
    );
    refused(
        GrpoConfig {
            normalize_advantages: true,
            advantage_estimator: AdvantageEstimator::ReinforcePlusPlus,
            ..GrpoConfig::default()
        },
        "grpo.normalize_advantages",
    );
    for loss in [
        LossType::Cispo,
        LossType::Sapo,
        LossType::Luspo,
        LossType::Vespo,
    ] {
        let e = PpoConfig {
            loss_type: loss,
            ..PpoConfig::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("ppo.loss_type") && e.contains(loss.name()),
            "{e}"
        );
    }
}

/// Two-sided clipping's cap must lie above the clipped ratio's upper bound; Dr. GRPO's
/// loss type reads by TRL's name.
#[test]
fn grpo_reads_dr_grpo_and_a_delta_above_the_clip() {
    let c: GrpoConfig = toml::from_str("loss_type = \"dr_grpo\"\ndelta = 1.5").unwrap();
    assert_eq!((c.loss_type, c.delta), (LossType::DrGrpo, Some(1.5)));
    c.validate().unwrap();
    let e = GrpoConfig {
        top_p: 0.0,
        ..GrpoConfig::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("grpo.top_p"), "{e}");
    for (delta, high) in [(1.2, None), (1.25, Some(0.28)), (f64::INFINITY, None)] {
        let c = GrpoConfig {
            delta: Some(delta),
            epsilon_high: high,
            ..GrpoConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("grpo.delta"), "{e}");
    }
}

/// Rewards whose weights are all 0 score every response 0: refused by every stage that takes
/// them; one weight of 0 among others is a source switched off, and kept.
#[test]
fn rewards_weighted_all_zero_are_refused() {
    let specs = |v: &[&str]| -> Vec<RewardSpec> { v.iter().map(|s| s.parse().unwrap()).collect() };
    let grpo = GrpoConfig {
        rewards: specs(&["task:0", "cmd:python3 v.py:0"]),
        ..GrpoConfig::default()
    };
    let e = grpo.validate().unwrap_err().to_string();
    assert!(
        e.contains("grpo.rewards (task:0, cmd:python3 v.py:0): every weight is 0"),
        "{e}"
    );
    let ppo = PpoConfig {
        rewards: specs(&["task:0"]),
        ..PpoConfig::default()
    };
    assert!(ppo
        .validate()
        .unwrap_err()
        .to_string()
        .contains("ppo.rewards"));
    let online = OnlineDpoConfig {
        rewards: specs(&["task:0"]),
        ..OnlineDpoConfig::default()
    };
    assert!(online
        .validate()
        .unwrap_err()
        .to_string()
        .contains("online_dpo.rewards"));
    let grpo = GrpoConfig {
        rewards: specs(&["task:0", "task:1"]),
        ..GrpoConfig::default()
    };
    grpo.validate().unwrap();
}

#[test]
fn reward_specs_parse_and_print() {
    let r: RewardSpec = "task".parse().unwrap();
    assert_eq!(r, RewardSpec::task());
    let m: RewardSpec = "runs/rm:0.5".parse().unwrap();
    assert_eq!(m.source, RewardSource::Model("runs/rm".into()));
    assert_eq!(m.weight, 0.5);
    assert_eq!(m.to_string(), "runs/rm:0.5");
    // A path with a colon that is not a weight stays a path.
    let c: RewardSpec = "c:/rm".parse().unwrap();
    assert_eq!(
        (c.source, c.weight),
        (RewardSource::Model("c:/rm".into()), 1.0)
    );
    assert!("task:inf".parse::<RewardSpec>().is_err());
    let e = "task:abc".parse::<RewardSpec>().unwrap_err().to_string();
    assert!(e.contains("the weight `abc` is not a number"), "{e}");
    let c: RewardSpec = "cmd:python3 v.py --strict:0.5".parse().unwrap();
    assert_eq!(
        c.source,
        RewardSource::Command("python3 v.py --strict".into())
    );
    assert_eq!(c.weight, 0.5);
    assert_eq!(c.to_string().parse::<RewardSpec>().unwrap(), c);
    let h: RewardSpec = "http://127.0.0.1:8000".parse().unwrap();
    assert_eq!(
        (h.source, h.weight),
        (RewardSource::Http("http://127.0.0.1:8000".into()), 1.0)
    );
    let h: RewardSpec = "http://127.0.0.1:8000/score:2".parse().unwrap();
    assert_eq!(
        (h.source, h.weight),
        (
            RewardSource::Http("http://127.0.0.1:8000/score".into()),
            2.0
        )
    );
    // A weight after the port, with no path; an IPv6 host's colons are its own.
    for (spec, url, weight) in [
        ("http://127.0.0.1:8000:0.5", "http://127.0.0.1:8000", 0.5),
        ("http://[::1]:8000", "http://[::1]:8000", 1.0),
        ("http://[::1]:8000:2", "http://[::1]:8000", 2.0),
    ] {
        let h: RewardSpec = spec.parse().unwrap();
        assert_eq!(
            (h.source, h.weight),
            (RewardSource::Http(url.into()), weight)
        );
    }
    assert!("https://x/score".parse::<RewardSpec>().is_err());
    assert_eq!(
        RewardSpec::first_model(&[r, m.clone()]),
        Some(&PathBuf::from("runs/rm"))
    );
}

/// Settings that would do nothing are refused by name: GDPO's decoupled advantages ignore the
/// summed score's clip, the whole-rollout normalisation and other estimators (a KL in the
/// reward is refused apart); the bias correction corrects no KL at beta 0; an adaptive KL from 0 stays 0.
#[test]
fn settings_that_would_do_nothing_under_others_are_refused() {
    let gdpo = |c: &mut GrpoConfig| {
        c.multi_objective_aggregation = MultiObjective::NormalizeThenSum;
    };
    let mut c = GrpoConfig::default();
    gdpo(&mut c);
    c.validate().unwrap();
    type Change = (fn(&mut GrpoConfig), &'static str);
    let changes: [Change; 3] = [
        (
            |c| c.reward_clip_range = Some([0.0, 1.0]),
            "reward_clip_range",
        ),
        (|c| c.normalize_advantages = true, "normalize_advantages"),
        (
            |c| c.advantage_estimator = AdvantageEstimator::Rloo,
            "advantage_estimator",
        ),
    ];
    for (change, what) in changes {
        let mut c = GrpoConfig::default();
        gdpo(&mut c);
        change(&mut c);
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("grpo.multi_objective_aggregation") && e.contains(what),
            "{what}: {e}"
        );
    }
    assert_refuses(
        GrpoConfig::validate,
        "grpo",
        |c| {
            c.beta = 0.0;
            c.use_bias_correction_kl = true;
        },
        "use_bias_correction_kl",
    );
    assert_refuses(
        PpoConfig::validate,
        "ppo",
        |c| {
            c.kl_coef = 0.0;
            c.adaptive_kl = true;
        },
        "adaptive_kl",
    );
}

/// Online DPO trains with one loss: a name or a list of one, and a longer list is refused as
/// such, by its key.
#[test]
fn online_dpo_takes_one_loss() {
    let path = std::path::Path::new("c.toml");
    let read = |v: &str| {
        let text = format!("[online_dpo]\nloss_type = {v}\n");
        crate::config::parse_toml::<crate::config::RunConfig>(path, &text)
    };
    assert_eq!(read("\"ipo\"").unwrap().online_dpo.loss_type, DpoLoss::Ipo);
    assert_eq!(
        read("[\"ipo\"]").unwrap().online_dpo.loss_type,
        DpoLoss::Ipo
    );
    let e = read("[\"sigmoid\", \"sft\"]").unwrap_err().to_string();
    assert!(
        e.starts_with("c.toml:2: online_dpo.loss_type: invalid value: one loss name"),
        "{e}"
    );
}
