//! Which stages each stage flag applies to, and each stage's own `--help` and defaults.

use anyhow::{bail, Result};

use crate::config::{RunConfig, Stage};

/// The stage subcommands and the stage each runs.
pub(super) const STAGE_COMMANDS: [(&str, Stage); 9] = [
    ("pretrain", Stage::Pretrain),
    ("sft", Stage::Sft),
    ("reward", Stage::Reward),
    ("ppo", Stage::Ppo),
    ("dpo", Stage::Dpo),
    ("kto", Stage::Kto),
    ("online-dpo", Stage::OnlineDpo),
    ("grpo", Stage::Grpo),
    ("distill", Stage::Distill),
];

/// The stage command that runs `stage` (`online-dpo` for [`Stage::OnlineDpo`]).
pub(super) fn command_name(stage: Stage) -> &'static str {
    STAGE_COMMANDS
        .iter()
        .find(|(_, s)| *s == stage)
        .map_or(stage.name(), |(name, _)| name)
}

/// The stages a stage flag applies to, and what a refusal calls them where the list alone
/// would not say why.
struct Scope {
    stages: &'static [Stage],
    which: Option<&'static str>,
}

/// The stage flags (by field) that only some stages read, and those stages: each stage's `--help`
/// leaves out the others' flags, and [`StageArgs::apply`](super::StageArgs::apply) refuses them
/// where given; but `seq_len` (which packed SFT reads too), `batch_size` (refused by the
/// rollout stages with what sizes their batches; their config may set it for a pipeline's
/// other stages) and `model` (refused beside --init), which `apply` and `resolve` check with
/// more than the stage to go by.
fn flag_scope(flag: &str) -> Option<Scope> {
    use Stage::*;
    const FROM_INIT: &[Stage] = &[Sft, Reward, Ppo, Dpo, Kto, OnlineDpo, Grpo, Distill];
    let (stages, which): (&'static [Stage], _) = match flag {
        "teacher" | "lmbda" => (&[Distill], None),
        "advantage_estimator" | "importance_sampling_level" => (&[Grpo], None),
        "packing" => (&[Sft, Ppo, Grpo, OnlineDpo], None),
        "padding_free" => (&[Dpo, Kto, Reward], None),
        "completion_only_loss" | "assistant_only_loss" | "neftune_noise_alpha" => (&[Sft], None),
        "precompute_ref_log_probs" | "sync_ref_model" => (&[Dpo], None),
        "rewards" => (
            &[Ppo, Grpo, OnlineDpo],
            Some("ppo, grpo and online-dpo (the stages that score their own samples)"),
        ),
        "beta" => (&[Ppo, Dpo, Kto, OnlineDpo, Grpo, Distill], None),
        "max_new_tokens" => (
            &[Ppo, Grpo, OnlineDpo, Distill],
            Some("ppo, grpo, online-dpo and distill (the stages that sample)"),
        ),
        "tokenizer" | "model" => (
            &[Pretrain],
            Some("pretrain (a stage from --init uses its model's tokenizer)"),
        ),
        // Refused by `apply` with more than the stage to go by.
        "seq_len" => (&[Pretrain, Sft], None),
        // PPO and GRPO size their batches by rollouts.
        "batch_size" => (&[Pretrain, Sft, Reward, Dpo, Kto, OnlineDpo, Distill], None),
        "chat_template" | "chat_template_kwargs" => (
            FROM_INIT,
            Some("the stages that render conversations (pretraining reads text as it is)"),
        ),
        "lora_rank" | "lora_alpha" | "use_rslora" | "use_dora" | "lora_dropout"
        | "lora_targets" => (
            FROM_INIT,
            Some("the stages from --init (pretraining trains every weight)"),
        ),
        _ => return None,
    };
    Some(Scope { stages, which })
}

pub(super) fn flag_stages(flag: &str) -> Option<&'static [Stage]> {
    flag_scope(flag).map(|s| s.stages)
}

/// Refuses each of `given` (field, flag as typed, whether it was given) that `now` would not
/// read.
pub(super) fn refuse_out_of_scope(given: &[(&str, &str, bool)], now: Stage) -> Result<()> {
    for &(field, flag, _) in given.iter().filter(|g| g.2) {
        let scope = flag_scope(field).expect("a scoped flag");
        if scope.stages.contains(&now) {
            continue;
        }
        let which = scope.which.map_or_else(
            || {
                let names: Vec<&str> = scope.stages.iter().map(|&s| command_name(s)).collect();
                match names.split_last() {
                    Some((last, rest)) if !rest.is_empty() => {
                        format!("{} and {last}", rest.join(", "))
                    }
                    _ => names.join(""),
                }
            },
            str::to_string,
        );
        bail!("{flag} applies to {which}, not {}", command_name(now));
    }
    Ok(())
}

/// Each stage's `--help`: its own flags only, and after them its defaults, as the tables of a
/// `--config` file would set them.
pub(super) fn per_stage_help(cmd: clap::Command) -> clap::Command {
    STAGE_COMMANDS.iter().fold(cmd, |cmd, &(name, stage)| {
        cmd.mut_subcommand(name, |sub| {
            let sub = sub.after_help(stage_defaults(name, stage));
            sub.mut_args(|a| {
                match flag_stages(a.get_id().as_str()).is_some_and(|s| !s.contains(&stage)) {
                    true => a.hide(true),
                    false => a,
                }
            })
        })
    })
}

/// The defaults of `stage`'s run as TOML: `[train]`, pretraining's `[model]`, and the stage's
/// own table.
pub(super) fn stage_defaults(name: &str, stage: Stage) -> String {
    let cfg = RunConfig::for_stage(stage);
    let Ok(all) = toml::Value::try_from(&cfg) else {
        return String::new();
    };
    let tables = match stage {
        Stage::Pretrain => vec!["train", "model", "data"],
        other => vec!["train", "data", "lora", other.name()],
    };
    let mut text = format!(
        "Defaults of `temper {name}` on the built-in task (a --config file's tables set them; \
         the flags above override both{}):",
        match stage {
            Stage::Pretrain => "; `--model gpt2` brings nanoGPT's schedule",
            Stage::Distill => "; --teacher is required",
            _ => "",
        }
    );
    for t in tables {
        let Some(table) = all.get(t) else { continue };
        // Written under its own name, so that a sub-table comes out as `[data.columns]`, the
        // header a config file takes, not a bare `[columns]`.
        let mut one = toml::map::Map::new();
        one.insert(t.to_string(), table.clone());
        let body = toml::to_string(&toml::Value::Table(one)).unwrap_or_default();
        text.push_str(&format!("\n\n{}", body.trim_end()));
    }
    text
}
