//! From a stage's command line to its `RunConfig`: defaults, then `--config`, then flags,
//! with the checks and notes a resume, a Hugging Face model or a shared config file needs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use super::stage_flags::{command_name, refuse_out_of_scope};
use super::StageArgs;
use crate::config::{read_toml, LoraConfig, ModelConfig, RunConfig, Stage, STAGE_TABLES};
use crate::stages::Start;

/// TRL's default learning rate of a stage's trainer, where it has one of its own.
fn trl_lr(stage: Stage) -> Option<f64> {
    match stage {
        Stage::Sft => Some(2e-5),
        Stage::Dpo | Stage::Kto | Stage::Grpo => Some(1e-6),
        Stage::OnlineDpo => Some(5e-7),
        _ => None,
    }
}

/// The stages' default learning rates were tuned on the built-in task's small model; a
/// Hugging Face model trained at them (SFT's 2e-3) loses what it knew. Said once, for a run
/// from one or from a run that began from one, where the user set no rate of their own.
fn warn_task_lr(cfg: &RunConfig, flag: bool, user: Option<&toml::Value>) {
    let set = flag || user.is_some_and(|u| u.get("train").and_then(|t| t.get("lr")).is_some());
    if set || cfg.stage == Stage::Pretrain {
        return;
    }
    let trl = match trl_lr(cfg.stage) {
        Some(lr) => format!("TRL's {} trainer defaults to {lr:e}", cfg.stage),
        None => "a pretrained model is fine-tuned at 1e-6 to 1e-4".to_string(),
    };
    warnln!(
        "warning: [{}] lr {:e} is the built-in task's default, tuned for its small model from \
         scratch; {trl} (set --lr or [train] lr)",
        cfg.stage,
        cfg.train.lr
    );
}

/// A resume takes the settings a flag or a `--config` beside it changes (a longer schedule, a
/// lower learning rate) and records them in config.toml, which then no longer says what the
/// run's first part trained with: each change is said, with the value it replaces.
fn note_resume_changes(run: &RunConfig, now: &RunConfig, dir: &Path) -> Result<()> {
    fn leaves(prefix: &str, v: &toml::Value, out: &mut Vec<(String, toml::Value)>) {
        match v {
            toml::Value::Table(t) => {
                for (k, x) in t {
                    let key = match prefix {
                        "" => k.clone(),
                        p => format!("{p}.{k}"),
                    };
                    leaves(&key, x, out);
                }
            }
            other => out.push((prefix.to_string(), other.clone())),
        }
    }
    let (mut before, mut after) = (Vec::new(), Vec::new());
    leaves("", &toml::Value::try_from(run)?, &mut before);
    leaves("", &toml::Value::try_from(now)?, &mut after);
    let shown = |v: Option<&toml::Value>| v.map_or("none".to_string(), |v| v.to_string());
    // A path given relative names the file config.toml records absolute.
    let same = |a: &toml::Value, b: &toml::Value| {
        a == b
            || match (a.as_str(), b.as_str()) {
                (Some(x), Some(y)) => std::fs::canonicalize(x)
                    .is_ok_and(|x| std::fs::canonicalize(y).is_ok_and(|y| x == y)),
                _ => false,
            }
    };
    // Another stage's table changes nothing this run reads.
    let read = |k: &str| {
        let table = k.split('.').next().unwrap_or_default();
        !STAGE_TABLES.contains(&table) || now.stage.own_tables().contains(&table)
    };
    let changes: Vec<String> = after
        .iter()
        .filter(|(k, _)| read(k))
        .filter_map(|(k, v)| {
            let old = before.iter().find(|(b, _)| b == k).map(|(_, v)| v);
            (!old.is_some_and(|o| same(o, v))).then(|| format!("{k} {} -> {v}", shown(old)))
        })
        .chain(
            before
                .iter()
                .filter(|(k, _)| read(k) && !after.iter().any(|(a, _)| a == k))
                .map(|(k, v)| format!("{k} {v} -> none")),
        )
        .collect();
    if !changes.is_empty() {
        warnln!(
            "note: resuming {} with changed settings, which its config.toml will record: {}",
            dir.display(),
            changes.join(", ")
        );
    }
    Ok(())
}

/// A config file may serve several stages, each reading its own table; one that sets only
/// other stages' tables (`[dpo] beta` given to online-dpo, whose table is `[online_dpo]`)
/// changed nothing, and said nothing.
fn warn_other_stages_tables(stage: Stage, file: &Path, user: &toml::Value) {
    let own = stage.own_tables();
    let set: Vec<&str> = STAGE_TABLES
        .into_iter()
        .filter(|t| user.get(*t).is_some())
        .collect();
    if set.is_empty() || set.iter().any(|t| own.contains(t)) {
        return;
    }
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let first = set
        .iter()
        .filter_map(|t| crate::config::key_line(&text, &[t], true))
        .min();
    let at = match first {
        Some(line) => format!("{}:{line}", file.display()),
        None => file.display().to_string(),
    };
    let named: Vec<String> = set.iter().map(|t| format!("[{t}]")).collect();
    let whose = match stage {
        Stage::Pretrain => "whose settings are in [train] and [model]".to_string(),
        _ => format!("whose settings are in [{}]", stage.name()),
    };
    warnln!(
        "warning: {at}: {} not read by {stage}, {whose}: ignored",
        match named.len() {
            1 => format!("{} is", named[0]),
            _ => format!("{} are", named.join(", ")),
        }
    );
}

/// A path setting: its key in a config file, its value, and whether a flag gave it.
type Input<'a> = (&'a [&'a str], Option<&'a Path>, bool);

/// A path a config file sets that is not there, named by the last file that sets it: read
/// later, it failed on the bare path, which a user whose flags name no such file cannot place.
/// A path a flag gave is left to the reader, whose message names it.
fn missing_file_input(files: &[PathBuf], inputs: &[Input]) -> Result<()> {
    for &(key, path, flag) in inputs {
        let Some(path) = path.filter(|p| !flag && !p.exists()) else {
            continue;
        };
        let set_by = files.iter().rev().find_map(|f| {
            let text = std::fs::read_to_string(f).ok()?;
            let line = crate::config::key_line(&text, key, false)?;
            Some(format!("{}:{line}", f.display()))
        });
        let Some(at) = set_by else { continue };
        let relative = match path.is_relative() {
            true => " (a relative path is read from the working directory)",
            false => "",
        };
        bail!(
            "{at}: {} = {}: no such file or directory{relative}",
            key.join("."),
            path.display()
        );
    }
    Ok(())
}

/// The sampling stages' `max_new_tokens` (6) fits the built-in task's answers; on the user's
/// own prompts it cut nearly every completion short, and said nothing.
fn warn_task_new_tokens(cfg: &RunConfig, flag: bool, user: Option<&toml::Value>) {
    if flag || cfg.data.path.is_none() {
        return;
    }
    let (n, trl) = match cfg.stage {
        Stage::Ppo => (
            cfg.ppo.max_new_tokens,
            "TRL's PPO trainer samples up to 53 (response_length)",
        ),
        Stage::Grpo => (
            cfg.grpo.max_new_tokens,
            "TRL's GRPO and RLOO trainers sample up to 256 (max_completion_length)",
        ),
        Stage::OnlineDpo => (
            cfg.online_dpo.max_new_tokens,
            "TRL's online DPO trainer samples up to 64 (max_new_tokens)",
        ),
        Stage::Distill if !cfg.distill.samples() => return,
        Stage::Distill => (
            cfg.distill.max_new_tokens,
            "TRL's GKD trainer samples up to 128 (max_new_tokens)",
        ),
        _ => return,
    };
    let table = cfg.stage.name();
    let set = user.is_some_and(|u| u.get(table).and_then(|t| t.get("max_new_tokens")).is_some());
    if !set {
        warnln!(
            "warning: [{table}] max_new_tokens {n} is the built-in task's default, for its \
             answers of a few tokens; {trl} (set --max-new-tokens or [{table}] max_new_tokens)"
        );
    }
}

/// A schedule that falls to its own peak does not fall: the RL stages' `min_lr_ratio` is 1 (a
/// constant rate, as TRL's PPO trainer once kept), so a `linear` or `cosine` asked of them
/// would change nothing. Refused where a flag asked for it; said where a config file did (its
/// `[train]` table may serve a pipeline's other stages).
fn check_flat_schedule(cfg: &RunConfig, flag: bool) -> Result<()> {
    let t = &cfg.train;
    // Cosine is the RL stages' own default and constant never falls: linear alone was asked.
    if t.lr_scheduler == crate::config::LrScheduler::Linear && t.min_lr_ratio >= 1.0 {
        let line = format!(
            "train.lr_scheduler linear changes nothing with train.min_lr_ratio = {}{}: the \
             learning rate stays at its peak; give a --min-lr-ratio below 1 (0 for \
             transformers' schedules)",
            t.min_lr_ratio,
            match t.min_lr_ratio == RunConfig::for_stage(cfg.stage).train.min_lr_ratio {
                true => format!(" ({}'s default)", cfg.stage),
                false => String::new(),
            }
        );
        match flag {
            true => bail!("{line}"),
            false => warnln!("warning: {line}"),
        }
    }
    Ok(())
}

/// A constant schedule holds the peak to the last step: a `--min-lr-ratio` given beside it
/// would change nothing.
fn refuse_ratio_of_constant(cfg: &RunConfig, flag: bool) -> Result<()> {
    let t = &cfg.train;
    if flag && t.lr_scheduler == crate::config::LrScheduler::Constant && t.min_lr_ratio != 1.0 {
        bail!(
            "--min-lr-ratio {} changes nothing under train.lr_scheduler constant, which holds \
             the peak to the last step: give --lr-scheduler linear or cosine to fall to it",
            t.min_lr_ratio
        );
    }
    Ok(())
}

/// PPO and GRPO size their batches by rollouts, not by `[train] batch_size`: a `--batch-size`
/// given to them would change nothing. (A config file's `[train] batch_size` may serve a
/// pipeline's other stages, and stands.)
fn refuse_unused_batch_size(cfg: &RunConfig, flag: bool) -> Result<()> {
    if !flag {
        return Ok(());
    }
    let how = match cfg.stage {
        Stage::Ppo => format!(
            "a rollout is [ppo] rollout_batch = {} prompts, trained in minibatches of [ppo] \
             minibatch_size = {}",
            cfg.ppo.rollout_batch, cfg.ppo.minibatch_size
        ),
        Stage::Grpo => format!(
            "a rollout is [grpo] prompts_per_rollout = {} prompts of group_size = {} samples \
             each, trained in minibatches of [grpo] minibatch_size = {}",
            cfg.grpo.prompts_per_rollout, cfg.grpo.group_size, cfg.grpo.minibatch_size
        ),
        _ => return Ok(()),
    };
    bail!(
        "--batch-size is not read by {}: {how} (set those in a --config file)",
        cfg.stage
    );
}

/// `[lora]` settings in a config file that gives no rank shape adapters nobody makes: the flags
/// are refused so, but a file may serve a stage that gets its rank from `--lora-rank` and
/// another that trains every weight.
fn warn_lora_without_rank(cfg: &RunConfig, file: &Path, user: &toml::Value) {
    let Some(lora) = user.get("lora").and_then(toml::Value::as_table) else {
        return;
    };
    let set: Vec<&str> = ["alpha", "dropout", "targets"]
        .into_iter()
        .filter(|k| lora.contains_key(*k))
        .collect();
    if cfg.lora.enabled() || set.is_empty() {
        return;
    }
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let at = match crate::config::key_line(&text, &["lora", set[0]], false) {
        Some(line) => format!("{}:{line}", file.display()),
        None => file.display().to_string(),
    };
    let keys: Vec<String> = set.iter().map(|k| format!("lora.{k}")).collect();
    warnln!(
        "warning: {at}: {} without lora.rank (or --lora-rank): no adapters are made, every \
         weight trains, and {} ignored",
        keys.join(", "),
        match keys.len() {
            1 => "it is",
            _ => "they are",
        }
    );
}

/// The preference, reward and RL stages train with dropout off: their losses compare the
/// policy's log-probabilities or scores with a reference's, a rollout's or another
/// response's, which dropout's noise would perturb. A `--lora-dropout` given to them is
/// refused; one a config file sets (whose `[lora]` may serve a pipeline's SFT too) is said to
/// be unused rather than left in config.toml as if applied.
fn check_unused_dropout(cfg: &RunConfig, flag: bool) -> Result<()> {
    let off = matches!(
        cfg.stage,
        Stage::Reward | Stage::Ppo | Stage::Dpo | Stage::Kto | Stage::OnlineDpo | Stage::Grpo
    );
    if off && cfg.lora.enabled() && cfg.lora.dropout > 0.0 {
        let line = format!(
            "[lora] dropout {} is not applied: {} trains with dropout off (sft and distill \
             apply it)",
            cfg.lora.dropout, cfg.stage
        );
        match flag {
            true => bail!("--lora-dropout {line}"),
            false => warnln!("warning: {line}"),
        }
    }
    Ok(())
}

impl StageArgs {
    /// The flag this command line gave that sets the first key a validation error `e` names
    /// of those it set (`train.steps must be positive` for `--steps 0`).
    fn flag_setting(&self, e: &str) -> Option<&'static str> {
        let (beta, new_tokens) = (self.beta.is_some(), self.max_new_tokens.is_some());
        let given = [
            ("train.steps", "--steps", self.steps.is_some()),
            ("train.epochs", "--epochs", self.epochs.is_some()),
            (
                "train.batch_size",
                "--batch-size",
                self.batch_size.is_some(),
            ),
            (
                "train.grad_accum",
                "--grad-accum",
                self.grad_accum.is_some(),
            ),
            ("train.seq_len", "--seq-len", self.seq_len.is_some()),
            ("train.lr", "--lr", self.lr.is_some()),
            (
                "train.warmup_ratio",
                "--warmup-ratio",
                self.warmup_ratio.is_some(),
            ),
            (
                "train.min_lr_ratio",
                "--min-lr-ratio",
                self.min_lr_ratio.is_some(),
            ),
            (
                "train.eval_every",
                "--eval-every",
                self.eval_every.is_some(),
            ),
            (
                "train.checkpoint_every",
                "--checkpoint-every",
                self.checkpoint_every.is_some(),
            ),
            ("train.log_every", "--log-every", self.log_every.is_some()),
            ("train.profile", "--profile", self.profile.is_some()),
            ("train.report_to", "--report-to", self.report_to.is_some()),
            (
                "data.train_split",
                "--train-split",
                self.train_split.is_some(),
            ),
            ("data.eval_split", "--eval-split", self.eval_split.is_some()),
            ("lora.rank", "--lora-rank", self.lora_rank.is_some()),
            ("lora.alpha", "--lora-alpha", self.lora_alpha.is_some()),
            ("lora.use_rslora", "--use-rslora", self.use_rslora.is_some()),
            ("lora.use_dora", "--use-dora", self.use_dora.is_some()),
            (
                "lora.dropout",
                "--lora-dropout",
                self.lora_dropout.is_some(),
            ),
            (
                "lora.targets",
                "--lora-targets",
                self.lora_targets.is_some(),
            ),
            (
                "sft.neftune_noise_alpha",
                "--neftune-noise-alpha",
                self.neftune_noise_alpha.is_some(),
            ),
            ("ppo.kl_coef", "--beta", beta),
            ("dpo.beta", "--beta", beta),
            ("kto.beta", "--beta", beta),
            ("online_dpo.beta", "--beta", beta),
            ("grpo.beta", "--beta", beta),
            ("distill.beta", "--beta", beta),
            ("distill.lmbda", "--lmbda", self.lmbda.is_some()),
            ("ppo.max_new_tokens", "--max-new-tokens", new_tokens),
            ("grpo.max_new_tokens", "--max-new-tokens", new_tokens),
            ("online_dpo.max_new_tokens", "--max-new-tokens", new_tokens),
            ("distill.max_new_tokens", "--max-new-tokens", new_tokens),
        ];
        crate::config::settings_named(e).find_map(|(table, key)| {
            given
                .iter()
                .find(|(k, _, set)| *set && k.split_once('.') == Some((table, key)))
                .map(|(_, flag, _)| *flag)
        })
    }

    /// Stage defaults, then the resumed run's config.toml, then the config file, then flags.
    pub fn resolve(&self, stage: Stage) -> Result<(RunConfig, PathBuf, Start)> {
        let (files, out, resume): (Vec<PathBuf>, _, _) = match &self.resume {
            Some(dir) => {
                let saved = dir.join("config.toml");
                if !saved.exists() {
                    bail!(
                        "--resume {}: {}",
                        dir.display(),
                        match (dir.exists(), dir.is_dir()) {
                            (false, _) => "does not exist",
                            (true, false) => "is a file, not a run directory",
                            (true, true) => "no config.toml there (not a run directory)",
                        }
                    );
                }
                // Another stage's loss, learning rate and reference over this run's weights
                // would replace its final model and append to its metrics.
                let held = read_toml::<RunConfig>(&saved)?.stage;
                if held != stage {
                    bail!(
                        "--resume {}: it holds a {held} run, not a {stage} one (continue it with \
                         `temper {held} --resume {}`, or start a {stage} run from it with --init)",
                        dir.display(),
                        dir.display()
                    );
                }
                // A --config beside --resume changes what it names and keeps the rest of
                // the run's own settings.
                let files = std::iter::once(saved).chain(self.config.clone()).collect();
                (files, dir.clone(), true)
            }
            None => (
                self.config.clone().into_iter().collect(),
                self.out
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(format!("runs/{stage}"))),
                false,
            ),
        };
        let defaults = match &self.model {
            Some(p) => RunConfig::for_preset(stage, p),
            None => RunConfig::for_stage(stage),
        };
        let (mut cfg, user) = RunConfig::load_layers_over(defaults.clone(), &files)?;
        // The run's own config.toml alone: what a --config beside it changes is checked.
        let run = match resume {
            true => Some(RunConfig::load_layers_over(defaults, &files[..1])?.0),
            false => None,
        };
        if let Some(run) = &run {
            self.check_resume_flags(run, &cfg)?;
        }
        let file = files.last();
        // Whether the files alone make a valid config: if so, a value that fails below came
        // from a flag, and no file's line is to blame.
        let files_valid = cfg.validate().is_ok();
        self.apply(&mut cfg)?;
        cfg.locate_hub_repos()?;
        // A resume reads its starting model again (a LoRA run's base, a full fine-tune's
        // reference): one moved since is named by the run's own file, which says where it was.
        if let (true, Some(init)) = (resume, cfg.init.as_deref()) {
            if !init.exists() {
                let saved = files[0].as_path();
                let text = std::fs::read_to_string(saved).unwrap_or_default();
                let at = match crate::config::key_line(&text, &["init"], false) {
                    Some(line) => format!("{}:{line}", saved.display()),
                    None => saved.display().to_string(),
                };
                bail!(
                    "{at}: init = {}: no such directory; a resume reads the model the run began \
                     from again: put it back there, or set init in {} to where it is now",
                    init.display(),
                    saved.display()
                );
            }
        }
        // Whether a flag gave the setting (`[ppo] value_init` has none).
        let flag = |key: &[&str]| match key {
            ["init"] => self.init.is_some(),
            ["data", "path"] => self.data.is_some(),
            ["data", "eval_path"] => self.eval_data.is_some(),
            ["data", "tokenizer"] => self.tokenizer.is_some(),
            ["data", "chat_template"] => self.chat_template.is_some(),
            ["distill", "teacher"] => self.teacher.is_some(),
            _ => false,
        };
        let inputs: Vec<Input> = (cfg.path_settings().into_iter())
            .map(|(key, path)| (key, path, flag(key)))
            .collect();
        missing_file_input(&files, &inputs)?;
        refuse_unused_batch_size(&cfg, self.batch_size.is_some())?;
        check_flat_schedule(
            &cfg,
            self.lr_scheduler.is_some() || self.min_lr_ratio.is_some(),
        )?;
        refuse_ratio_of_constant(&cfg, self.min_lr_ratio.is_some())?;
        check_unused_dropout(&cfg, self.lora_dropout.is_some())?;
        let pretrained =
            (cfg.init.as_deref()).is_some_and(crate::stages::setup::descends_from_pretrained);
        if !resume && pretrained {
            warn_task_lr(&cfg, self.lr.is_some(), user.as_ref());
        }
        if !resume {
            warn_task_new_tokens(&cfg, self.max_new_tokens.is_some(), user.as_ref());
        }
        // The user's file (beside a --resume, the --config, not the run's config.toml).
        if let (Some(f), Some(u), Some(_)) = (file, user.as_ref(), &self.config) {
            warn_other_stages_tables(stage, f, u);
            warn_lora_without_rank(&cfg, f, u);
        }
        // A run from --init builds the model it loads: a preset is refused, and a [model]
        // table beside it that says otherwise is named. (A resumed run's config.toml records
        // the model it trains.)
        if !resume && cfg.init.is_some() {
            if let Some(p) = &self.model {
                bail!("--model {p}: a run from --init trains the model it loads, not a preset");
            }
            let table = user.as_ref().and_then(|u| u.get("model"));
            crate::stages::setup::take_init_model(&mut cfg, table, file.map(PathBuf::as_path))?;
            if cfg.lora.enabled() {
                crate::model::transformer::check_lora_targets(&cfg.lora, &cfg.model).map_err(
                    |e| match self.flag_setting(&e.to_string()) {
                        Some(flag) => anyhow::anyhow!("{flag}: {e}"),
                        None => e,
                    },
                )?;
            }
        }
        if !resume {
            crate::stages::setup::inherit_task_world(&mut cfg, user.as_ref())?;
        }
        // A value the file set that fails validation is named by the file and line.
        // Under --resume the value may be the run's own config.toml's, not the --config's:
        // the last file that sets the key names it.
        if let Err(e) = cfg.validate() {
            let e = e.to_string();
            let Some(f) = file.filter(|_| !files_valid) else {
                match self.flag_setting(&e) {
                    Some(flag) => bail!("{flag}: {e}"),
                    None => bail!("{e}"),
                }
            };
            let located = files.iter().rev().find_map(|f| {
                let at = crate::config::locate(f, &e);
                (at != f.display().to_string()).then_some(at)
            });
            bail!(
                "{}: {e}",
                located.unwrap_or_else(|| f.display().to_string())
            );
        }
        if let Some(run) = &run {
            note_resume_changes(run, &cfg, &out)?;
        }
        if self.max_new_tokens.is_some() && stage == Stage::Distill && !cfg.distill.samples() {
            bail!(
                "--max-new-tokens: distill samples nothing with [distill] lmbda = 0 and seq_kd \
                 off (it learns the data's own completions), so it would change nothing"
            );
        }
        // Refused before any model loads; a run that continues a checkpoint keeps what it
        // held out when it began.
        let continues = resume && crate::train::checkpoint::Checkpoints::any(&out);
        let holds_out = stage != Stage::Pretrain
            && cfg.data.path.is_some()
            && cfg.data.held_out_path().is_none();
        // Pretraining's text (not token shards, which are split when encoded) is cut into
        // a training and a validation split by val_fraction.
        let splits_text = stage == Stage::Pretrain
            && cfg.data.held_out_path().is_none()
            && !(cfg.data.path.as_deref()).is_some_and(crate::data::shards::is_shard_corpus);
        let zero = cfg.data.val_fraction == 0.0 && !continues;
        let e = match (holds_out, splits_text) {
            (true, _) if zero => Some(
                "data.val_fraction = 0: every stage evaluates on held-out records, at least \
                 one, so 0 would hold one out all the same; to train on all of --data, name \
                 held-out records with --eval-data",
            ),
            (_, true) if zero => Some(
                "data.val_fraction = 0: pretraining on text evaluates on a validation split of \
                 it; to train on all of --data, name held-out text with --eval-data",
            ),
            _ => None,
        };
        if let Some(e) = e {
            let at = files.iter().rev().find_map(|f| {
                let at = crate::config::locate(f, e);
                (at != f.display().to_string()).then_some(at)
            });
            bail!("{}{e}", at.map(|a| format!("{a}: ")).unwrap_or_default());
        }
        let start = match (resume, self.overwrite) {
            (true, _) => Start::Resume,
            (false, true) => Start::Overwrite,
            (false, false) => Start::Fresh,
        };
        if start == Start::Overwrite {
            let inputs = [&cfg.init, &cfg.ppo.value_init, &cfg.distill.teacher];
            let inputs: Vec<&Path> = inputs.into_iter().flatten().map(|p| p.as_path()).collect();
            crate::stages::run_dir::check_inputs_outside(&out, &inputs)?;
        }
        Ok((cfg, out, start))
    }

    /// A resumed run continues under what its checkpoint holds it to: its starting model, the
    /// seed and window its data position counts in, and its adapters. A flag that changes one
    /// is refused here, naming the run's value, rather than failing later on what it breaks.
    fn check_resume_flags(&self, run: &RunConfig, merged: &RunConfig) -> Result<()> {
        let same = |a: &Path, b: &Path| {
            let real = |p: &Path| std::fs::canonicalize(p).ok();
            a == b || real(a).is_some_and(|a| Some(a) == real(b))
        };
        // A Hub name is the snapshot the run's config.toml records.
        let init = (self.init.as_deref())
            .map(|i| crate::hub_cache::locate(i, crate::hub_cache::Repo::Model, "--init"))
            .transpose()?;
        if let Some(init) =
            (init.as_ref()).filter(|i| !run.init.as_ref().is_some_and(|r| same(i, r)))
        {
            let began = match &run.init {
                Some(p) => format!("began from {}", p.display()),
                None => "began from scratch".to_string(),
            };
            bail!(
                "--init {}: a resumed run continues from its own checkpoint (it {began}); start a \
                 new run to begin from another model",
                init.display()
            );
        }
        // Sorted: a config file lists targets in any order. A full fine-tune has none to keep.
        let names = |ts: &[crate::config::LoraTarget]| {
            let mut names: Vec<String> =
                ts.iter().map(|t| format!("{t:?}").to_lowercase()).collect();
            names.sort();
            names.dedup();
            names.join(",")
        };
        let targets = match &self.lora_targets {
            Some(t) if run.lora.enabled() => Some(names(&LoraConfig::parse_targets(t)?)),
            _ => None,
        };
        let adapted = |c: &RunConfig| match c.lora.enabled() && run.lora.enabled() {
            true => names(&c.lora.targets),
            false => String::new(),
        };
        // A setting of the adapters, held only where the run has them: (flag, key, the
        // flag's value, the run's, the run's with --config laid over it).
        let held_by_adapters =
            |flag, key, given: Option<String>, field: fn(&LoraConfig) -> String| {
                let laid = match run.lora.enabled() {
                    true => field(&merged.lora),
                    false => field(&run.lora),
                };
                (
                    flag,
                    key,
                    given.filter(|_| run.lora.enabled()),
                    field(&run.lora),
                    laid,
                )
            };
        // (flag, key, the flag's value, the run's, the run's with --config laid over it)
        let checks = [
            (
                "--seed",
                "train.seed",
                self.seed.map(|v| v.to_string()),
                run.train.seed.to_string(),
                merged.train.seed.to_string(),
            ),
            (
                "--seq-len",
                "train.seq_len",
                self.seq_len.map(|v| v.to_string()),
                run.train.seq_len.to_string(),
                merged.train.seq_len.to_string(),
            ),
            (
                "--lora-rank",
                "lora.rank",
                self.lora_rank.map(|v| v.to_string()),
                run.lora.rank.to_string(),
                merged.lora.rank.to_string(),
            ),
            (
                "--lora-targets",
                "lora.targets",
                targets,
                adapted(run),
                adapted(merged),
            ),
            // The adapters' scale: the checkpoint's adapters were trained under it, and
            // another would change the model they make (a full fine-tune has none).
            held_by_adapters(
                "--lora-alpha",
                "lora.alpha",
                self.lora_alpha.map(|v| v.to_string()),
                |l| l.alpha.to_string(),
            ),
            held_by_adapters(
                "--use-rslora",
                "lora.use_rslora",
                self.use_rslora.map(|v| v.to_string()),
                |l| l.use_rslora.to_string(),
            ),
            // DoRA's magnitudes are adapter tensors the checkpoint holds, or does not.
            held_by_adapters(
                "--use-dora",
                "lora.use_dora",
                self.use_dora.map(|v| v.to_string()),
                |l| l.use_dora.to_string(),
            ),
        ];
        // The model's shape is the checkpoint's: another preset would fail on its weights.
        if let Some(p) = &self.model {
            if ModelConfig::preset(p)? != run.model {
                bail!(
                    "--model {p}: the run trains the model its config.toml holds ([model]), \
                     whose weights its checkpoint has; resume without it"
                );
            }
        }
        let config = self.config.as_deref().unwrap_or(Path::new("--config"));
        for (flag, key, given, held, laid) in checks {
            let held_to =
                format!("the run trains with {held}, which its checkpoint holds a resume to");
            if let Some(g) = given.filter(|g| *g != held) {
                // An on/off flag's value goes after '=' (`--use-dora=false`).
                let sep = match g.as_str() {
                    "true" | "false" => "=",
                    _ => " ",
                };
                bail!("{flag}{sep}{g}: {held_to}; resume without it");
            }
            if laid != held {
                bail!("{}: {key} = {laid}: {held_to}", config.display());
            }
        }
        Ok(())
    }

    pub fn apply(&self, cfg: &mut RunConfig) -> Result<()> {
        let now = cfg.stage;
        // Flags read by some stages only; elsewhere they would do nothing, so they are refused.
        refuse_out_of_scope(
            &[
                ("teacher", "--teacher", self.teacher.is_some()),
                ("lmbda", "--lmbda", self.lmbda.is_some()),
                (
                    "advantage_estimator",
                    "--advantage-estimator",
                    self.advantage_estimator.is_some(),
                ),
                (
                    "importance_sampling_level",
                    "--importance-sampling-level",
                    self.importance_sampling_level.is_some(),
                ),
                ("packing", "--packing", self.packing.is_some()),
                (
                    "padding_free",
                    "--padding-free",
                    self.padding_free.is_some(),
                ),
                (
                    "completion_only_loss",
                    "--completion-only-loss",
                    self.completion_only_loss.is_some(),
                ),
                (
                    "assistant_only_loss",
                    "--assistant-only-loss",
                    self.assistant_only_loss.is_some(),
                ),
                (
                    "neftune_noise_alpha",
                    "--neftune-noise-alpha",
                    self.neftune_noise_alpha.is_some(),
                ),
                (
                    "precompute_ref_log_probs",
                    "--precompute-ref-log-probs",
                    self.precompute_ref_log_probs.is_some(),
                ),
                (
                    "sync_ref_model",
                    "--sync-ref-model",
                    self.sync_ref_model.is_some(),
                ),
                ("rewards", "--reward", !self.rewards.is_empty()),
                ("beta", "--beta", self.beta.is_some()),
                (
                    "max_new_tokens",
                    "--max-new-tokens",
                    self.max_new_tokens.is_some(),
                ),
                ("tokenizer", "--tokenizer", self.tokenizer.is_some()),
                (
                    "chat_template",
                    "--chat-template",
                    self.chat_template.is_some(),
                ),
                (
                    "chat_template_kwargs",
                    "--chat-template-kwargs",
                    self.chat_template_kwargs.is_some(),
                ),
                ("lora_rank", "--lora-rank", self.lora_rank.is_some()),
                ("lora_alpha", "--lora-alpha", self.lora_alpha.is_some()),
                ("use_rslora", "--use-rslora", self.use_rslora.is_some()),
                ("use_dora", "--use-dora", self.use_dora.is_some()),
                (
                    "lora_dropout",
                    "--lora-dropout",
                    self.lora_dropout.is_some(),
                ),
                (
                    "lora_targets",
                    "--lora-targets",
                    self.lora_targets.is_some(),
                ),
            ],
            now,
        )?;
        if let Some(p) = &self.model {
            // The preset's training schedule is a default below the config files
            // (`RunConfig::for_preset`, in `resolve`); its shape replaces theirs.
            cfg.model = ModelConfig::preset(p)?;
        }
        macro_rules! set {
            ($src:expr, $dst:expr) => {
                if let Some(v) = $src.clone() {
                    $dst = v;
                }
            };
        }
        set!(self.device, cfg.device);
        set!(self.dtype, cfg.train.dtype);
        set!(self.kernels, cfg.kernels);
        if let Some(s) = self.steps {
            (cfg.train.steps, cfg.train.epochs) = (s, None);
        }
        if self.epochs.is_some() {
            cfg.train.epochs = self.epochs;
        }
        set!(self.seed, cfg.train.seed);
        set!(self.batch_size, cfg.train.batch_size);
        set!(self.grad_accum, cfg.train.grad_accum);
        set!(self.seq_len, cfg.train.seq_len);
        set!(self.lr, cfg.train.lr);
        set!(self.lr_scheduler, cfg.train.lr_scheduler);
        set!(self.min_lr_ratio, cfg.train.min_lr_ratio);
        if self.warmup_ratio.is_some() {
            cfg.train.warmup_ratio = self.warmup_ratio;
        }
        set!(self.eval_every, cfg.train.eval_every);
        set!(self.checkpoint_every, cfg.train.checkpoint_every);
        set!(self.log_every, cfg.train.log_every);
        set!(self.profile, cfg.train.profile);
        set!(self.report_to, cfg.train.report_to);
        if cfg.train.profile > 0 {
            let replaced: Vec<&str> = [
                ("--steps", self.steps.is_some()),
                ("--epochs", self.epochs.is_some()),
                ("--eval-every", self.eval_every.is_some()),
                ("--checkpoint-every", self.checkpoint_every.is_some()),
            ]
            .into_iter()
            .filter_map(|(flag, given)| given.then_some(flag))
            .collect();
            if !replaced.is_empty() {
                bail!(
                    "{} would change nothing beside profile {}: a profiled run takes its timed \
                     steps and {} warm-up ones, with no evaluation or checkpoint between them",
                    replaced.join(", "),
                    cfg.train.profile,
                    crate::train::profile::WARMUP_STEPS
                );
            }
        }
        cfg.train.limit_to_profile();
        set!(self.lora_rank, cfg.lora.rank);
        set!(self.lora_alpha, cfg.lora.alpha);
        set!(self.lora_dropout, cfg.lora.dropout);
        set!(self.use_rslora, cfg.lora.use_rslora);
        set!(self.use_dora, cfg.lora.use_dora);
        if let Some(t) = &self.lora_targets {
            cfg.lora.targets = LoraConfig::parse_targets(t)?;
        }
        if self.data.is_some() {
            cfg.data.path = self.data.clone();
        }
        if self.eval_data.is_some() {
            cfg.data.eval_path = self.eval_data.clone();
        }
        if let Some(c) = &self.columns {
            cfg.data.columns = c.clone();
        }
        // An empty name clears one that a resumed run's config.toml or a config file gave.
        if let Some(s) = &self.train_split {
            cfg.data.train_split = Some(s.clone()).filter(|s| !s.is_empty());
        }
        if let Some(s) = &self.eval_split {
            cfg.data.eval_split = Some(s.clone()).filter(|s| !s.is_empty());
        }
        if self.tokenizer.is_some() {
            cfg.data.tokenizer = self.tokenizer.clone();
        }
        if self.chat_template.is_some() {
            cfg.data.chat_template = self.chat_template.clone();
        }
        if let Some(k) = &self.chat_template_kwargs {
            cfg.data.chat_template_kwargs = k.clone();
        }
        if self.init.is_some() {
            cfg.init = self.init.clone();
        }
        if !self.rewards.is_empty() {
            cfg.ppo.rewards = self.rewards.clone();
            cfg.grpo.rewards = self.rewards.clone();
            cfg.online_dpo.rewards = self.rewards.clone();
        }
        if let Some(e) = self.advantage_estimator {
            cfg.grpo.advantage_estimator = e;
        }
        if let Some(level) = self.importance_sampling_level {
            cfg.grpo.importance_sampling_level = level;
        }
        if let Some(n) = self.max_new_tokens {
            match cfg.stage {
                Stage::Ppo => cfg.ppo.max_new_tokens = n,
                Stage::Grpo => cfg.grpo.max_new_tokens = n,
                Stage::OnlineDpo => cfg.online_dpo.max_new_tokens = n,
                Stage::Distill => cfg.distill.max_new_tokens = n,
                // Refused above.
                _ => {}
            }
        }
        set!(self.completion_only_loss, cfg.sft.completion_only_loss);
        set!(self.assistant_only_loss, cfg.sft.assistant_only_loss);
        if self.neftune_noise_alpha.is_some() {
            cfg.sft.neftune_noise_alpha = self.neftune_noise_alpha;
        }
        set!(
            self.precompute_ref_log_probs,
            cfg.dpo.precompute_ref_log_probs
        );
        set!(self.sync_ref_model, cfg.dpo.sync_ref_model);
        let packing = match now {
            Stage::Sft => Some(&mut cfg.sft.packing),
            Stage::Ppo => Some(&mut cfg.ppo.packing),
            Stage::Grpo => Some(&mut cfg.grpo.packing),
            Stage::OnlineDpo => Some(&mut cfg.online_dpo.packing),
            _ => None,
        };
        let padding_free = match now {
            Stage::Dpo => Some(&mut cfg.dpo.padding_free),
            Stage::Kto => Some(&mut cfg.kto.padding_free),
            Stage::Reward => Some(&mut cfg.reward.padding_free),
            _ => None,
        };
        for (set, on) in [(self.packing, packing), (self.padding_free, padding_free)] {
            if let (Some(set), Some(on)) = (set, on) {
                *on = set;
            }
        }
        let lora_flags = [
            ("--lora-rank", self.lora_rank.is_some()),
            ("--lora-alpha", self.lora_alpha.is_some()),
            ("--use-rslora", self.use_rslora == Some(true)),
            ("--use-dora", self.use_dora == Some(true)),
            ("--lora-dropout", self.lora_dropout.is_some()),
            ("--lora-targets", self.lora_targets.is_some()),
        ];
        // Rows of seq_len tokens are pretraining's and packed SFT's; the other stages take each
        // record whole, up to the model's context ([data] truncation).
        let packed_sft = now == Stage::Sft && cfg.sft.packing;
        if self.seq_len.is_some() && now != Stage::Pretrain && !packed_sft {
            bail!(
                "--seq-len applies to pretrain and to sft with --packing (whose rows it sizes), \
                 not {}: records are taken whole, up to the model's context",
                match now {
                    Stage::Sft => "sft without packing",
                    other => command_name(other),
                }
            );
        }
        // LoRA's other settings shape adapters that only a rank creates: without one the run
        // would fine-tune every weight, as if they had not been given.
        if !cfg.lora.enabled() {
            if let Some((flag, _)) = lora_flags[1..].iter().find(|(_, set)| *set) {
                bail!("{flag} needs --lora-rank (or [lora] rank): without a rank there are no adapters, and every weight trains");
            }
        }
        // The running stage's coefficient only: another stage's table keeps its own value
        // (and its own checks).
        if let Some(b) = self.beta {
            match now {
                Stage::Ppo => cfg.ppo.kl_coef = b,
                Stage::Dpo => cfg.dpo.beta = b,
                Stage::Kto => cfg.kto.beta = b,
                Stage::OnlineDpo => cfg.online_dpo.beta = b,
                Stage::Grpo => cfg.grpo.beta = b,
                Stage::Distill => cfg.distill.beta = b,
                Stage::Pretrain | Stage::Sft | Stage::Reward => {}
            }
        }
        if self.teacher.is_some() {
            cfg.distill.teacher = self.teacher.clone();
        }
        set!(self.lmbda, cfg.distill.lmbda);
        Ok(())
    }
}
