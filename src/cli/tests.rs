//! Tests of the command line.

use std::path::Path;

use super::stage_flags::{flag_stages, stage_defaults, STAGE_COMMANDS};
use super::*;
use crate::config::{RunConfig, Stage};

/// clap's own checks of the whole command line (a setting that does not fit an option's
/// kind, as negative numbers on a flag that takes no value, say), where clap is built with
/// debug assertions (Cargo.toml's dev profile builds dependencies without them).
#[test]
fn the_command_line_passes_claps_checks() {
    Cli::command_line().debug_assert();
}

/// A negative number reaches its option: taken by a signed one, refused by an unsigned
/// one in a line naming it; clap's other errors come out as one line too.
#[test]
fn negative_numbers_reach_their_options() {
    let parse = |line: &str| {
        let args: Vec<std::ffi::OsString> = line.split(' ').map(Into::into).collect();
        Cli::try_parse_args(&args).map_err(|e| usage_error_line(&e, &args))
    };
    let Ok(Cli {
        command: Command::Generate(g),
    }) = parse("temper generate --checkpoint c --temperature -1 --prompt -2")
    else {
        panic!("a negative temperature and prompt are values")
    };
    assert_eq!(
        (g.temperature, &g.prompt[..]),
        (Some(-1.0), &["-2".to_string()][..])
    );
    let e = parse("temper sft --lora-rank -4").unwrap_err();
    assert_eq!(
        e,
        "invalid value '-4' for '--lora-rank <LORA_RANK>': a whole number, 0 or more \
         (see `temper sft --help`)"
    );
    let e = parse("temper tokenizer encode c --out o --shard-tokens").unwrap_err();
    assert!(
        e.contains("'--shard-tokens <SHARD_TOKENS>'") && !e.contains('\n'),
        "{e}"
    );
    assert!(e.ends_with("(see `temper tokenizer encode --help`)"), "{e}");
}

/// The `gpt2` preset's schedule is a default: a config file's value stands, even one equal
/// to the stage's own default, and a flag beats both.
#[test]
fn the_gpt2_preset_brings_its_own_schedule_and_files_and_flags_still_win() {
    let d = tempfile::tempdir().unwrap();
    let resolve = |file: Option<&str>, lr: Option<f64>| {
        let config = file.map(|text| {
            let f = d.path().join("c.toml");
            std::fs::write(&f, text).unwrap();
            f
        });
        let args = StageArgs {
            model: Some("gpt2".into()),
            config,
            lr,
            out: Some(d.path().join("run")),
            ..Default::default()
        };
        let (cfg, _, _) = args.resolve(Stage::Pretrain).unwrap();
        (cfg.train.lr, cfg.train.warmup_steps)
    };
    assert_eq!(resolve(None, None), (6e-4, 700));
    let stage_default = RunConfig::for_stage(Stage::Pretrain).train;
    let text = format!(
        "[train]\nlr = {:?}\nwarmup_steps = {}\n",
        stage_default.lr, stage_default.warmup_steps
    );
    assert_eq!(
        resolve(Some(&text), None),
        (stage_default.lr, stage_default.warmup_steps)
    );
    assert_eq!(resolve(Some("[train]\nsteps = 9\n"), None), (6e-4, 700));
    assert_eq!(resolve(Some(&text), Some(1e-4)).0, 1e-4);
}

/// --reward, --beta, --tokenizer and LoRA's flags are refused where the stage would not
/// read them, and taken where it would.
#[test]
fn flags_a_stage_would_not_read_are_refused() {
    let refused = |args: StageArgs, stage: Stage| {
        args.apply(&mut RunConfig::for_stage(stage))
            .unwrap_err()
            .to_string()
    };
    let reward = || StageArgs {
        rewards: vec!["task".parse().unwrap()],
        ..Default::default()
    };
    let e = refused(reward(), Stage::Sft);
    assert!(
        e.starts_with("--reward applies to ppo, grpo and online-dpo"),
        "{e}"
    );
    assert!(e.ends_with("not sft"), "{e}");
    for stage in [Stage::Ppo, Stage::Grpo, Stage::OnlineDpo] {
        reward().apply(&mut RunConfig::for_stage(stage)).unwrap();
    }
    let beta = || StageArgs {
        beta: Some(0.3),
        ..Default::default()
    };
    assert!(refused(beta(), Stage::Sft).contains("--beta applies to ppo, dpo"));
    assert!(refused(beta(), Stage::Reward).ends_with("not reward"));
    let mut cfg = RunConfig::for_stage(Stage::Dpo);
    beta().apply(&mut cfg).unwrap();
    assert_eq!(cfg.dpo.beta, 0.3);
    let tokenizer = StageArgs {
        tokenizer: Some("tok.json".into()),
        ..Default::default()
    };
    let e = refused(tokenizer, Stage::Sft);
    assert!(e.starts_with("--tokenizer applies to pretrain"), "{e}");
    let lora = || StageArgs {
        lora_rank: Some(4),
        ..Default::default()
    };
    let e = refused(lora(), Stage::Pretrain);
    assert!(
        e.starts_with("--lora-rank applies to the stages from --init"),
        "{e}"
    );
    let mut cfg = RunConfig::for_stage(Stage::Sft);
    lora().apply(&mut cfg).unwrap();
    assert_eq!(cfg.lora.rank, 4);
    let template = StageArgs {
        chat_template: Some("t.jinja".into()),
        ..Default::default()
    };
    let e = refused(template, Stage::Pretrain);
    assert!(
        e.starts_with("--chat-template applies to the stages that render"),
        "{e}"
    );
    // --seq-len sizes the rows of pretraining and of packed SFT only.
    let seq = |packing: bool| StageArgs {
        seq_len: Some(32),
        packing: packing.then_some(true),
        ..Default::default()
    };
    let e = refused(seq(false), Stage::Sft);
    assert!(
        e.contains("--seq-len") && e.contains("not sft without packing"),
        "{e}"
    );
    assert!(refused(seq(false), Stage::Dpo).contains("not dpo"));
    for (stage, packing) in [(Stage::Pretrain, false), (Stage::Sft, true)] {
        let mut cfg = RunConfig::for_stage(stage);
        seq(packing).apply(&mut cfg).unwrap();
        assert_eq!(cfg.train.seq_len, 32);
    }
}

/// A value that fails validation is named by the line of the file that set it, and by
/// the flag where a flag set it.
#[test]
fn a_bad_value_is_blamed_on_what_set_it() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("e.toml");
    std::fs::write(
        &f,
        "[train]\nbeta1 = 0.9\nbeta2 = 1.5\n[lora]\ndropout = 0.1\n",
    )
    .unwrap();
    let resolve = |file: &Path, dropout: Option<f64>| {
        let args = StageArgs {
            config: Some(file.to_path_buf()),
            lora_dropout: dropout,
            out: Some(d.path().join("run")),
            ..Default::default()
        };
        args.resolve(Stage::Sft).unwrap_err().to_string()
    };
    let e = resolve(&f, None);
    assert!(
        e.starts_with(&format!("{}:3: train.beta2", f.display())),
        "{e}"
    );
    let good = d.path().join("good.toml");
    std::fs::write(&good, "[lora]\nrank = 4\ndropout = 0.1\n").unwrap();
    let e = resolve(&good, Some(1.5));
    assert_eq!(e, "--lora-dropout: lora.dropout must be in [0, 1)");
    // With no file at all, the flag is named too.
    let no_file = StageArgs {
        steps: Some(0),
        out: Some(d.path().join("run")),
        ..Default::default()
    };
    let e = no_file.resolve(Stage::Sft).unwrap_err().to_string();
    assert_eq!(e, "--steps: train.steps must be positive");
    // A stage's own coefficient, set by the shared --beta.
    let beta = StageArgs {
        beta: Some(0.0),
        out: Some(d.path().join("run")),
        ..Default::default()
    };
    let e = beta.resolve(Stage::Dpo).unwrap_err().to_string();
    assert!(e.starts_with("--beta: dpo.beta must be positive"), "{e}");
}

/// `[train] profile` in a config file limits the run as `--profile` does: the timed steps
/// and their warm-up, with no evaluation or checkpoint between.
#[test]
fn a_profile_from_a_file_limits_the_run_as_the_flag_does() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("p.toml");
    std::fs::write(&f, "[train]\nsteps = 500\nprofile = 3\n").unwrap();
    let from_file = StageArgs {
        config: Some(f),
        out: Some(d.path().join("a")),
        ..Default::default()
    };
    let from_flag = StageArgs {
        profile: Some(3),
        out: Some(d.path().join("b")),
        ..Default::default()
    };
    let train = |a: StageArgs| a.resolve(Stage::Pretrain).unwrap().0.train;
    let (a, b) = (train(from_file), train(from_flag));
    let steps = 3 + crate::train::profile::WARMUP_STEPS;
    for t in [a, b] {
        assert_eq!((t.profile, t.steps, t.epochs), (3, steps, None));
        assert_eq!((t.eval_every, t.checkpoint_every), (steps, steps));
    }
}

/// A `--min-lr-ratio` beside a constant schedule, which never falls to it, is refused; a
/// constant schedule with the default ratio runs.
#[test]
fn a_floor_for_a_schedule_that_does_not_fall_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let args = |ratio: Option<f64>| StageArgs {
        lr_scheduler: Some(crate::config::LrScheduler::Constant),
        min_lr_ratio: ratio,
        out: Some(d.path().join("run")),
        ..Default::default()
    };
    let e = args(Some(0.5))
        .resolve(Stage::Pretrain)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("--min-lr-ratio 0.5 changes nothing under train.lr_scheduler constant"),
        "{e}"
    );
    args(None).resolve(Stage::Pretrain).unwrap();
    // The RL stages hold the rate (min_lr_ratio 1): a linear schedule asked alone is refused.
    let linear = |ratio: Option<f64>| StageArgs {
        lr_scheduler: Some(crate::config::LrScheduler::Linear),
        min_lr_ratio: ratio,
        out: Some(d.path().join("ppo")),
        ..Default::default()
    };
    let e = linear(None).resolve(Stage::Ppo).unwrap_err().to_string();
    assert!(
        e.starts_with(
            "train.lr_scheduler linear changes nothing with train.min_lr_ratio = 1 (ppo's default)"
        ),
        "{e}"
    );
    linear(Some(0.0)).resolve(Stage::Ppo).unwrap();
}

/// A LoRA dropout flag given to a stage that trains with dropout off is refused.
#[test]
fn a_dropout_the_stage_does_not_apply_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let args = StageArgs {
        lora_rank: Some(4),
        lora_dropout: Some(0.1),
        out: Some(d.path().join("run")),
        ..Default::default()
    };
    let e = args.resolve(Stage::Dpo).unwrap_err().to_string();
    assert!(
        e.starts_with(
            "--lora-dropout [lora] dropout 0.1 is not applied: dpo trains with dropout off"
        ),
        "{e}"
    );
    args.resolve(Stage::Sft).unwrap();
}

/// Every scoped flag is refused by exactly the stages whose `--help` leaves it out (one
/// list, `flag_scope`, decides both), with the flag as typed and the stage's command.
#[test]
fn a_scoped_flag_is_refused_where_its_help_is_hidden() {
    type Set = fn(&mut StageArgs);
    let flags: [(&str, &str, Set); 23] = [
        ("teacher", "--teacher", |a| a.teacher = Some("t".into())),
        ("lmbda", "--lmbda", |a| a.lmbda = Some(0.5)),
        ("advantage_estimator", "--advantage-estimator", |a| {
            a.advantage_estimator = Some(AdvantageEstimator::Rloo)
        }),
        (
            "importance_sampling_level",
            "--importance-sampling-level",
            |a| a.importance_sampling_level = Some(ImportanceSamplingLevel::Sequence),
        ),
        ("packing", "--packing", |a| a.packing = Some(true)),
        ("padding_free", "--padding-free", |a| {
            a.padding_free = Some(true)
        }),
        ("completion_only_loss", "--completion-only-loss", |a| {
            a.completion_only_loss = Some(false)
        }),
        ("assistant_only_loss", "--assistant-only-loss", |a| {
            a.assistant_only_loss = Some(false)
        }),
        ("neftune_noise_alpha", "--neftune-noise-alpha", |a| {
            a.neftune_noise_alpha = Some(5.0)
        }),
        (
            "precompute_ref_log_probs",
            "--precompute-ref-log-probs",
            |a| a.precompute_ref_log_probs = Some(true),
        ),
        ("sync_ref_model", "--sync-ref-model", |a| {
            a.sync_ref_model = Some(true)
        }),
        ("rewards", "--reward", |a| {
            a.rewards = vec!["task".parse().unwrap()]
        }),
        ("beta", "--beta", |a| a.beta = Some(0.2)),
        ("max_new_tokens", "--max-new-tokens", |a| {
            a.max_new_tokens = Some(8)
        }),
        ("tokenizer", "--tokenizer", |a| {
            a.tokenizer = Some("t.json".into())
        }),
        ("chat_template", "--chat-template", |a| {
            a.chat_template = Some("t.jinja".into())
        }),
        ("chat_template_kwargs", "--chat-template-kwargs", |a| {
            a.chat_template_kwargs = Some(Kwargs::new())
        }),
        ("lora_rank", "--lora-rank", |a| a.lora_rank = Some(4)),
        ("lora_alpha", "--lora-alpha", |a| a.lora_alpha = Some(8.0)),
        ("use_rslora", "--use-rslora", |a| a.use_rslora = Some(true)),
        ("use_dora", "--use-dora", |a| a.use_dora = Some(true)),
        ("lora_dropout", "--lora-dropout", |a| {
            a.lora_dropout = Some(0.1)
        }),
        ("lora_targets", "--lora-targets", |a| {
            a.lora_targets = Some("q".into())
        }),
    ];
    for (field, flag, set) in flags {
        let stages = flag_stages(field).expect(field);
        for (command, stage) in STAGE_COMMANDS {
            let mut args = StageArgs::default();
            set(&mut args);
            let got = args.apply(&mut RunConfig::for_stage(stage));
            match stages.contains(&stage) {
                true => assert!(
                    got.as_ref()
                        .map_or_else(|e| !e.to_string().contains("applies to"), |_| true),
                    "{flag} on {command}: {got:?}"
                ),
                false => {
                    let e = got.expect_err(flag).to_string();
                    assert!(
                        e.starts_with(&format!("{flag} applies to"))
                            && e.ends_with(&format!("not {command}")),
                        "{flag} on {command}: {e}"
                    );
                }
            }
        }
    }
    let e = StageArgs {
        packing: Some(true),
        ..Default::default()
    }
    .apply(&mut RunConfig::for_stage(Stage::Kto))
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "--packing applies to sft, ppo, grpo and online-dpo, not kto"
    );
}

/// GRPO's flags set GRPO's config, and elsewhere are refused rather than ignored.
#[test]
fn grpo_flags_apply_to_grpo_alone() {
    let args = StageArgs {
        importance_sampling_level: Some(ImportanceSamplingLevel::Sequence),
        advantage_estimator: Some(AdvantageEstimator::Rloo),
        ..Default::default()
    };
    let mut cfg = RunConfig::for_stage(Stage::Grpo);
    args.apply(&mut cfg).unwrap();
    assert_eq!(
        cfg.grpo.importance_sampling_level,
        ImportanceSamplingLevel::Sequence
    );
    assert_eq!(cfg.grpo.advantage_estimator, AdvantageEstimator::Rloo);
    let e = args
        .apply(&mut RunConfig::for_stage(Stage::Ppo))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--advantage-estimator applies to grpo, not ppo"),
        "{e}"
    );
}

/// SFT's own flags (loss scope, NEFTune) set `[sft]`, and elsewhere are refused.
#[test]
fn sft_flags_apply_to_sft_alone() {
    let args = StageArgs {
        completion_only_loss: Some(false),
        ..Default::default()
    };
    let mut cfg = RunConfig::for_stage(Stage::Sft);
    args.apply(&mut cfg).unwrap();
    assert!(!cfg.sft.completion_only_loss && cfg.sft.assistant_only_loss);
    let args = StageArgs {
        assistant_only_loss: Some(false),
        ..Default::default()
    };
    args.apply(&mut cfg).unwrap();
    assert!(!cfg.sft.completion_only_loss && !cfg.sft.assistant_only_loss);
    let e = args
        .apply(&mut RunConfig::for_stage(Stage::Dpo))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--assistant-only-loss applies to sft, not dpo"),
        "{e}"
    );
    let args = StageArgs {
        neftune_noise_alpha: Some(5.0),
        ..Default::default()
    };
    args.apply(&mut cfg).unwrap();
    assert_eq!(cfg.sft.neftune_noise_alpha, Some(5.0));
    let e = args
        .apply(&mut RunConfig::for_stage(Stage::Grpo))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--neftune-noise-alpha applies to sft, not grpo"),
        "{e}"
    );
    cfg.sft.neftune_noise_alpha = Some(0.0);
    let e = cfg.sft.validate().unwrap_err().to_string();
    assert!(e.contains("sft.neftune_noise_alpha"), "{e}");
}

/// A data file a config file names that is not there is named by that file's line, and a
/// flag that names one in its place is not blamed on the file.
#[test]
fn a_missing_input_a_config_names_is_named_by_its_line() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("c.toml");
    let missing = d.path().join("gone.jsonl");
    let text = format!(
        "[train]\nsteps = 3\n[data]\npath = {:?}\n",
        missing.display()
    );
    std::fs::write(&f, text).unwrap();
    let args = |data: Option<&Path>| StageArgs {
        config: Some(f.clone()),
        data: data.map(Path::to_path_buf),
        out: Some(d.path().join("run")),
        ..Default::default()
    };
    let e = args(None).resolve(Stage::Pretrain).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{}:4: data.path = {}: no such file or directory",
            f.display(),
            missing.display()
        )
    );
    let corpus = d.path().join("corpus.txt");
    std::fs::write(&corpus, "text ".repeat(200)).unwrap();
    args(Some(&corpus)).resolve(Stage::Pretrain).unwrap();
    // A flag's missing path is its reader's to name, not blamed on the file's line.
    let also_gone = d.path().join("also-gone.jsonl");
    if let Err(e) = args(Some(&also_gone)).resolve(Stage::Pretrain) {
        assert!(!e.to_string().contains("c.toml"), "{e}");
    }
}

/// The defaults a stage's help ends with are a config file that stage reads as it is, its
/// sub-tables under their dotted headers (`[data.columns]`, which a bare `[columns]` was).
#[test]
fn a_stages_help_defaults_read_back_as_its_config() {
    let d = tempfile::tempdir().unwrap();
    for stage in [Stage::Pretrain, Stage::Sft, Stage::Dpo, Stage::Grpo] {
        let text = stage_defaults(stage.name(), stage);
        let body = text.split_once("\n\n").unwrap().1;
        assert!(body.contains("[data.columns]"), "{body}");
        let f = d.path().join(format!("{}.toml", stage.name()));
        std::fs::write(&f, body).unwrap();
        let (cfg, _) = RunConfig::load_layers_over(RunConfig::for_stage(stage), &[f]).unwrap();
        // Compared as written: the config also notes which file set what.
        let written = |c: &RunConfig| toml::Value::try_from(c).unwrap();
        assert_eq!(
            written(&cfg),
            written(&RunConfig::for_stage(stage)),
            "{}",
            stage.name()
        );
    }
}

/// An on/off flag given alone turns its setting on, and `=false` turns off what a config file
/// turned on.
#[test]
fn an_on_off_flag_turns_a_config_files_true_off() {
    let parse = |line: &str| {
        let args: Vec<std::ffi::OsString> = line.split(' ').map(Into::into).collect();
        Cli::try_parse_args(&args).map_err(|e| usage_error_line(&e, &args))
    };
    let sft = |line: &str| match parse(line) {
        Ok(Cli {
            command: Command::Sft(a),
        }) => a,
        other => panic!("{line}: {other:?}"),
    };
    assert_eq!(sft("temper sft --packing").packing, Some(true));
    assert_eq!(sft("temper sft --packing=false").packing, Some(false));
    assert_eq!(sft("temper sft --use-dora=true").use_dora, Some(true));
    assert_eq!(sft("temper sft").packing, None);
    // The list the usage error reads is the stage's flags that take an optional value.
    let sft_cmd = Cli::command_line();
    let sft_cmd = sft_cmd.find_subcommand("sft").unwrap();
    let mut optional: Vec<&str> = (sft_cmd.get_arguments())
        .filter(|a| {
            a.get_num_args()
                .is_some_and(|n| n.min_values() == 0 && n.max_values() == 1)
        })
        .filter_map(|a| a.get_long())
        .collect();
    optional.sort_unstable();
    let mut listed = ON_OFF_FLAGS.to_vec();
    listed.sort_unstable();
    assert_eq!(optional, listed);
    assert_eq!(
        parse("temper sft --packing false").unwrap_err(),
        "--packing false: an on/off flag takes a value after '=' only; write it \
         --packing=false (see `temper sft --help`)"
    );
    let e = parse("temper eval --checkpoint c --prompts p.jsonl --task-seed 3").unwrap_err();
    assert!(e.contains("--task-seed") && e.contains("--prompts"), "{e}");
    assert!(parse("temper launch --threads --nnodes 1 -- sft").is_ok());
    let e = parse("temper launch --threads --master-port 4000 -- sft").unwrap_err();
    assert!(
        e.contains("--threads") && e.contains("--master-port"),
        "{e}"
    );
    // A plain switch takes no value at all: clap's own words stand.
    let e = parse("temper sft --overwrite false").unwrap_err();
    assert!(!e.contains("write it"), "{e}");
    let e = parse("temper sft --packing=maybe").unwrap_err();
    assert!(e.contains("--packing") && !e.contains('\n'), "{e}");
    let mut cfg = RunConfig::for_stage(Stage::Sft);
    (cfg.sft.packing, cfg.lora.use_dora) = (true, true);
    sft("temper sft --packing=false --use-dora=false")
        .apply(&mut cfg)
        .unwrap();
    assert!(!cfg.sft.packing && !cfg.lora.use_dora);
    let mut cfg = RunConfig::for_stage(Stage::Dpo);
    (cfg.dpo.precompute_ref_log_probs, cfg.dpo.padding_free) = (true, true);
    let dpo = StageArgs {
        precompute_ref_log_probs: Some(false),
        padding_free: Some(false),
        ..Default::default()
    };
    dpo.apply(&mut cfg).unwrap();
    assert!(!cfg.dpo.precompute_ref_log_probs && !cfg.dpo.padding_free);
}
