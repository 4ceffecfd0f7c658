//! Every configuration a run reads: serde structs from a TOML file (`--config`), overridden by
//! CLI flags, validated with errors that name the offending field, and written back to the run
//! directory as `config.toml`. Nothing here depends on the rest of the crate except the
//! atomic file writes, so every other layer can read its configuration from here.

mod distill;
mod lora;
mod model;
mod run;
mod stages;
mod train;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

pub use distill::DistillConfig;
pub use lora::{scale_of, LoraConfig, LoraTarget};
pub use model::{
    HfFamily, LinearScaling, Llama3Scaling, LocalRope, MlpKind, ModelConfig, NormKind,
    PositionKind, RopeScaling,
};
pub use run::{
    overlay, DataConfig, DeviceChoice, Holdout, RunConfig, Stage, Truncation, STAGE_TABLES,
};
pub use stages::{
    greedy_or_sampling, greedy_or_sampling_words, AdvantageEstimator, DpoConfig, DpoLoss,
    ExternalRewardConfig, FDivergence, GrpoConfig, ImportanceSamplingLevel, KlEstimator, KlPlace,
    KtoConfig, KtoLoss, LossType, MultiObjective, OnlineDpoConfig, PpoConfig, RewardConfig,
    RewardSource, RewardSpec, ScaleRewards, SftConfig, SftLoss,
};
pub use train::{DTypeChoice, LrScheduler, ReportTo, ShardOptimizer, TapeChoice, TrainConfig};

/// Reads a TOML file into `T`, naming the file (and TOML's line/column and field) on error.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    parse_toml(path, &read_config_text(path)?)
}

/// A config file's text; bytes that are no UTF-8 are named by their line.
pub fn read_config_text(path: &Path) -> Result<String> {
    let bytes =
        std::fs::read(path).with_context(|| format!("{}: cannot read config", path.display()))?;
    crate::io::utf8_text(path, bytes)
}

/// `text`, read from `path`, as a `T`; an error names the file and the line.
pub fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start].matches('\n').count() + 1)
            .map(|l| format!(":{l}"))
            .unwrap_or_default();
        // One line: toml's messages may run over several ("invalid table header" and why).
        let message: Vec<&str> = e.message().lines().map(str::trim).collect();
        let message = message.join(": ");
        // A value of the wrong type or range is named by its key, which toml's message leaves
        // out ("invalid type: string \"fast\", expected f64").
        let message = suggest_field(&message).unwrap_or(message);
        let message = crate::json_error::plain_types(&message);
        let key = e.span().and_then(|s| key_at(text, s.start));
        let of_a_value = ["invalid ", "unknown variant", "number too "];
        match key.filter(|_| of_a_value.iter().any(|m| message.starts_with(m))) {
            Some(key) => anyhow::anyhow!("{}{line}: {key}: {message}", path.display()),
            None => anyhow::anyhow!("{}{line}: {message}", path.display()),
        }
    })
}

/// TRL's (and transformers' TrainingArguments') names for temper's settings, with the table
/// that holds each, for a config written from a TRL recipe.
const TRL_NAMES: [(&str, &str, &str); 21] = [
    ("lr_scheduler_type", "lr_scheduler", "train"),
    ("num_generations", "group_size", "grpo"),
    ("dataset_train_split", "train_split", "data"),
    ("dataset_test_split", "eval_split", "data"),
    ("max_completion_length", "max_new_tokens", "grpo"),
    ("response_length", "max_new_tokens", "ppo"),
    ("num_ppo_epochs", "ppo_epochs", "ppo"),
    ("beta", "kl_coef", "ppo"),
    ("learning_rate", "lr", "train"),
    ("per_device_train_batch_size", "batch_size", "train"),
    ("gradient_accumulation_steps", "grad_accum", "train"),
    ("max_steps", "steps", "train"),
    ("num_train_epochs", "epochs", "train"),
    ("max_grad_norm", "grad_clip", "train"),
    ("logging_steps", "log_every", "train"),
    ("eval_steps", "eval_every", "train"),
    ("save_steps", "checkpoint_every", "train"),
    ("save_total_limit", "keep_checkpoints", "train"),
    ("lora_r", "rank", "lora"),
    ("r", "rank", "lora"),
    ("target_modules", "targets", "lora"),
];

/// serde's "unknown field `x`, expected one of `a`, `b`, ..." (fifty names for some tables)
/// as the one field meant: TRL's name for one of the table's fields (or, where the table has
/// none by that name, where temper keeps it), else a field a letter or two from `x`.
fn suggest_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let known: Vec<&str> = rest
        .strip_prefix(", expected one of ")
        .or_else(|| rest.strip_prefix(", expected "))?
        .split(", ")
        .flat_map(|k| k.split(" or "))
        .map(|k| k.trim_matches('`'))
        .collect();
    let trl = |here: bool| {
        TRL_NAMES
            .iter()
            .find(|(trl, ours, _)| *trl == field && known.contains(ours) == here)
    };
    if let Some((_, ours, _)) = trl(true) {
        return Some(format!(
            "unknown field `{field}`: did you mean `{ours}` (TRL's `{field}`)?"
        ));
    }
    let (best, d) = known
        .iter()
        .map(|k| (*k, edit_distance(field, k)))
        .min_by_key(|(_, d)| *d)?;
    if d <= 1.max(field.len() / 4) {
        return Some(format!("unknown field `{field}`: did you mean `{best}`?"));
    }
    trl(false).map(|(_, ours, table)| {
        format!("unknown field `{field}`: TRL's `{field}` is `[{table}] {ours}` in temper")
    })
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1)
                .min(row[j] + 1)
                .min(prev + usize::from(ca != *cb));
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// The dotted key of the `key = value` line that byte `start` of TOML `text` falls on, under
/// the nearest `[table]` header above it; none on a line that sets no key.
fn key_at(text: &str, start: usize) -> Option<String> {
    let line_start = text[..start.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
    if key.is_empty() || key.starts_with('[') {
        return None;
    }
    let table = text[..line_start].lines().rev().find_map(|l| {
        let header = l.trim().strip_prefix('[')?.split(']').next()?;
        Some(header.trim_start_matches('[').trim().to_string())
    });
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_string(),
    })
}

/// `x` as a person writes it: plainly where that is short, else in exponent form (`1e-40`,
/// not forty digits after the point).
pub fn shown_f64(x: f64) -> String {
    let plain = x.to_string();
    match plain.len() > 12 && x.is_finite() && x != 0.0 {
        true => format!("{x:e}"),
        false => plain,
    }
}

/// Refuses the first of `counts` (settings of table `table`) that is 0.
pub(crate) fn check_counts(table: &str, counts: &[(&str, usize)]) -> Result<()> {
    match counts.iter().find(|(_, v)| *v == 0) {
        Some((name, _)) => anyhow::bail!("{table}.{name} must be positive"),
        None => Ok(()),
    }
}

/// The first setting (dotted, under `at`) whose integer a TOML file cannot hold: a run's
/// config.toml records every setting, and TOML's integers stop at `i64::MAX`.
pub(crate) fn beyond_toml(v: &serde_json::Value, at: &str) -> Option<String> {
    match v {
        serde_json::Value::Number(n) => n
            .as_u64()
            .is_some_and(|n| n > i64::MAX as u64)
            .then(|| at.to_string()),
        serde_json::Value::Object(m) => m.iter().find_map(|(k, v)| {
            let key = match at {
                "" => k.clone(),
                _ => format!("{at}.{k}"),
            };
            beyond_toml(v, &key)
        }),
        serde_json::Value::Array(a) => a.iter().find_map(|v| beyond_toml(v, at)),
        _ => None,
    }
}

/// The settings (`table.key`) a validation message names, in its order: `model.num_heads (4)
/// must divide model.hidden_size (130)` names two, of which the file may set either.
pub fn settings_named(message: &str) -> impl Iterator<Item = (&str, &str)> {
    let word = |w: &str| {
        w.starts_with(|c: char| c.is_ascii_lowercase())
            && w.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    message
        .split(|c: char| c.is_whitespace() || "()[],:;=`\"'/".contains(c))
        .map(|w| w.trim_end_matches('.'))
        .filter_map(|w| w.split_once('.'))
        .filter(move |(t, k)| word(t) && word(k))
}

/// `file:line` of the first setting a validation message names that the file sets
/// (`model.num_hidden_layers must ...` -> the `num_hidden_layers` line of the file's
/// `[model]` table), else `file`.
pub fn locate(file: &Path, message: &str) -> String {
    let shown = file.display().to_string();
    let Ok(text) = std::fs::read_to_string(file) else {
        return shown;
    };
    let line =
        settings_named(message).find_map(|(table, key)| key_line(&text, &[table, key], false));
    match line {
        Some(line) => format!("{shown}:{line}"),
        None => shown,
    }
}

/// The 1-based line of TOML `text` that sets the dotted key `key` (a table header or a
/// `key = value` line, dotted keys and the tables they sit in joined), or with `prefix`, the
/// first line that sets anything under it. Lines only: a key inside an inline table or a
/// multi-line value is not found.
pub fn key_line(text: &str, key: &[&str], prefix: bool) -> Option<usize> {
    fn split(dotted: &str) -> Vec<String> {
        dotted
            .split('.')
            .map(|k| k.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
            .collect()
    }
    let mut header: Vec<String> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        let path = if let Some(h) = l.strip_prefix('[') {
            let h = h.trim_start_matches('[');
            let Some(end) = h.find(']') else { continue };
            header = split(&h[..end]);
            header.clone()
        } else if let Some((k, _)) = l.split_once('=').filter(|_| !l.starts_with('#')) {
            header.iter().cloned().chain(split(k)).collect()
        } else {
            continue;
        };
        let hit = match prefix {
            true => path.len() >= key.len() && path.iter().zip(key).all(|(a, b)| a == b),
            false => path.len() == key.len() && path.iter().zip(key).all(|(a, b)| a == b),
        };
        if hit {
            return Some(i + 1);
        }
    }
    None
}

/// Writes `value` as TOML to `path` atomically.
pub fn write_toml<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = toml::to_string_pretty(value).context("serialising config")?;
    crate::io::write_atomic(path, text.as_bytes())
}

pub fn resolve(path: &Path, base: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// Asserts that `validate` refuses a default config changed by `change`, naming
/// `table.field`.
#[cfg(test)]
pub(crate) fn assert_refuses<C: Default>(
    validate: fn(&C) -> Result<()>,
    table: &str,
    change: fn(&mut C),
    field: &str,
) {
    let mut c = C::default();
    change(&mut c);
    let e = validate(&c).unwrap_err().to_string();
    assert!(e.contains(&format!("{table}.{field}")), "{e}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A setting a run's config.toml could not record (TOML's integers stop at i64::MAX) is
    /// refused by its key.
    #[test]
    fn a_setting_beyond_tomls_integers_is_named() {
        let mut cfg = RunConfig::for_stage(Stage::Grpo);
        cfg.validate().unwrap();
        cfg.grpo.max_new_tokens = usize::MAX;
        let e = cfg.validate().unwrap_err().to_string();
        assert_eq!(e, "grpo.max_new_tokens must be at most 9223372036854775807");
        cfg.grpo.max_new_tokens = 8;
        cfg.train.seed = u64::MAX;
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.starts_with("train.seed must be at most"), "{e}");
    }

    /// A value toml or serde refuses is named by its table and key: a wrong type, a word no
    /// variant has, an integer no field type holds.
    #[test]
    fn a_refused_value_names_its_key() {
        let path = Path::new("c.toml");
        for (text, want) in [
            (
                "[train]\nlr = \"fast\"\n",
                "c.toml:2: train.lr: invalid type",
            ),
            (
                "[train]\ndtype = \"fp8\"\n",
                "c.toml:2: train.dtype: unknown variant `fp8`",
            ),
            (
                "[train]\nseed = 1\nwarmup_steps = 18446744073709551615\n",
                "c.toml:3: train.warmup_steps: number too large",
            ),
        ] {
            let e = parse_toml::<RunConfig>(path, text).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
        }
    }

    /// rsLoRA and DoRA without a rank are refused: there would be no adapters, and every
    /// weight would train.
    #[test]
    fn adapter_kinds_without_a_rank_are_refused() {
        for key in ["use_rslora", "use_dora"] {
            let text = format!("[lora]\n{key} = true\n");
            let mut cfg = parse_toml::<RunConfig>(Path::new("c.toml"), &text).unwrap();
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.starts_with(&format!("lora.{key} needs lora.rank")), "{e}");
            cfg.lora.rank = 4;
            cfg.validate().unwrap();
        }
    }

    /// `[lora] targets` takes the names `--lora-targets` takes (PEFT's and GPT-2's module
    /// names, `all`, PEFT's `all-linear`), as a list or one string; others are refused by key.
    #[test]
    fn lora_targets_read_the_names_the_flag_reads() {
        use crate::config::LoraTarget::*;
        let path = Path::new("c.toml");
        for (value, want) in [
            ("[\"q_proj\", \"v_proj\"]", vec![Q, V]),
            ("[\"c_attn\"]", vec![Q, K, V]),
            ("\"all-linear\"", vec![Q, K, V, O, Gate, Up, Down]),
            ("\"q,o\"", vec![Q, O]),
            ("[\"down\", \"up\", \"up\"]", vec![Up, Down]),
        ] {
            let text = format!("[lora]\nrank = 4\ntargets = {value}\n");
            let cfg = parse_toml::<RunConfig>(path, &text).unwrap();
            assert_eq!(cfg.lora.targets, want, "{value}");
            let flag = value.replace(['[', ']', '"', ' '], "");
            assert_eq!(
                LoraConfig::parse_targets(&flag).unwrap(),
                want,
                "--lora-targets {flag}"
            );
        }
        for (value, want) in [
            (
                "[\"qq\"]",
                "c.toml:3: lora.targets: invalid value: unknown module `qq`",
            ),
            (
                "[]",
                "c.toml:3: lora.targets: invalid value: no module named",
            ),
            (
                "3",
                "c.toml:3: lora.targets: invalid type: expected a list of module names",
            ),
        ] {
            let text = format!("[lora]\nrank = 4\ntargets = {value}\n");
            let e = parse_toml::<RunConfig>(path, &text)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(want), "{value}: {e}");
        }
    }

    /// `report_to` takes TRL's list as well as a name: `[]` and `["none"]` are none, `all`
    /// is TensorBoard; a destination temper does not write is refused by its key.
    #[test]
    fn report_to_reads_a_name_or_trls_list() {
        let path = Path::new("c.toml");
        for (value, want) in [
            ("\"tensorboard\"", ReportTo::Tensorboard),
            ("[\"tensorboard\"]", ReportTo::Tensorboard),
            ("[\"none\", \"all\"]", ReportTo::Tensorboard),
            ("[]", ReportTo::None),
            ("[\"none\"]", ReportTo::None),
            ("\"none\"", ReportTo::None),
        ] {
            let text = format!("[train]\nreport_to = {value}\n");
            let cfg = parse_toml::<RunConfig>(path, &text).unwrap();
            assert_eq!(cfg.train.report_to, want, "{value}");
        }
        let text = "[train]\nreport_to = [\"tensorboard\", \"wandb\"]\n";
        let e = parse_toml::<RunConfig>(path, text).unwrap_err().to_string();
        assert!(
            e.starts_with("c.toml:2: train.report_to: unknown variant `wandb`"),
            "{e}"
        );
    }

    #[test]
    fn key_lines_join_headers_and_dotted_keys() {
        let text = "# [ppo]\n[ppo]\nppo.kl_coef = 1 # a = b\n\n[ppo.train]\n  lr=2\n\
                    [[x.y]]\n\"q\" . r = 3\n";
        assert_eq!(key_line(text, &["ppo"], true), Some(2));
        assert_eq!(key_line(text, &["ppo", "ppo", "kl_coef"], false), Some(3));
        assert_eq!(key_line(text, &["ppo", "train"], false), Some(5));
        assert_eq!(key_line(text, &["ppo", "train", "lr"], false), Some(6));
        assert_eq!(key_line(text, &["x", "y", "q", "r"], false), Some(8));
        assert_eq!(key_line(text, &["ppo", "ppo", "lr"], false), None);
        assert_eq!(key_line(text, &["sft"], true), None);
    }

    /// A TRL name, or a near miss, is answered with the field meant; a name far from every
    /// field keeps serde's list.
    #[test]
    fn unknown_fields_name_the_one_meant() {
        let parse = |text: &str| {
            parse_toml::<crate::config::RunConfig>(Path::new("c.toml"), text)
                .unwrap_err()
                .to_string()
        };
        let e = parse("[grpo]\nnum_generations = 4\n");
        assert_eq!(
            e,
            "c.toml:2: unknown field `num_generations`: did you mean `group_size` (TRL's \
             `num_generations`)?"
        );
        let e = parse("[train]\nlearning_rate = 1e-5\n");
        assert!(
            e.ends_with("did you mean `lr` (TRL's `learning_rate`)?"),
            "{e}"
        );
        let e = parse("[ppo]\nmax_new_token = 8\n");
        assert!(
            e.ends_with("unknown field `max_new_token`: did you mean `max_new_tokens`?"),
            "{e}"
        );
        let e = parse("[ppo]\nzzzz = 8\n");
        assert!(
            e.contains("expected one of") && e.contains("`max_new_tokens`"),
            "{e}"
        );
        // Outside the table that holds it: where temper keeps it.
        let e = parse("learning_rate = 1e-5\n");
        assert!(
            e.ends_with("TRL's `learning_rate` is `[train] lr` in temper"),
            "{e}"
        );
        let e = parse("[train]\nnum_generations = 4\n");
        assert!(e.ends_with("is `[grpo] group_size` in temper"), "{e}");
        let e = parse("[ppo]\nbeta = 0.1\n");
        assert!(e.ends_with("did you mean `kl_coef` (TRL's `beta`)?"), "{e}");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "ab"), 2);
    }

    #[test]
    fn numbers_are_shown_as_written() {
        let cases = [
            (0.25, "0.25"),
            (-1.0, "-1"),
            (1e-40, "1e-40"),
            (1e300, "1e300"),
        ];
        for (x, shown) in cases {
            assert_eq!(shown_f64(x), shown);
        }
        assert_eq!(shown_f64(f64::NAN), "NaN");
        assert_eq!(shown_f64(0.123456789012345), "1.23456789012345e-1");
    }

    #[test]
    fn validation_errors_point_at_the_line_that_set_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[train]\nsteps = 3\n\n[model]\nhidden_size = 64\nnum_hidden_layers = 0\n",
        )
        .unwrap();
        let at = locate(&p, "model.num_hidden_layers must be positive");
        assert!(at.ends_with("c.toml:6"), "{at}");
        assert!(locate(&p, "nothing to find").ends_with("c.toml"));
        // The message's first setting is not the file's: the one it sets is found.
        let at = locate(
            &p,
            "model.num_attention_heads (4) must divide model.hidden_size (130)",
        );
        assert!(at.ends_with("c.toml:5"), "{at}");
        let at = locate(&p, "ppo.top_k / train.steps: e.g. 0.5 or 1.0");
        assert!(at.ends_with("c.toml:2"), "{at}");
        let at = locate(&p, "it must be less than train.steps.");
        assert!(at.ends_with("c.toml:2"), "{at}");
    }

    /// A stage's sampled lengths must leave room for a prompt; its built-in task counts must
    /// be positive; the task's operands must split into both sides.
    #[test]
    fn sizes_a_stage_cannot_run_with_are_refused_by_key() {
        let mut cfg = RunConfig::for_stage(Stage::Ppo);
        cfg.ppo.max_new_tokens = 64;
        let e = cfg.check_new_tokens(64).unwrap_err().to_string();
        assert!(
            e.starts_with("ppo.max_new_tokens = 64 leaves no room"),
            "{e}"
        );
        cfg.check_new_tokens(65).unwrap();
        let mut cfg = RunConfig::for_stage(Stage::Sft);
        cfg.sft.eval_max_new_tokens = 100;
        let e = cfg.check_new_tokens(64).unwrap_err().to_string();
        assert!(e.starts_with("sft.eval_max_new_tokens = 100"), "{e}");
        // With --data the built-in task's held-out accuracy, and its lengths, are not taken.
        cfg.data.path = Some("records.jsonl".into());
        cfg.check_new_tokens(64).unwrap();
        let mut cfg = RunConfig::for_stage(Stage::Distill);
        cfg.distill.max_new_tokens = 100;
        cfg.distill.lmbda = 0.0;
        cfg.check_new_tokens(64).unwrap();
        let mut cfg = RunConfig::for_stage(Stage::Dpo);
        cfg.dpo.eval_pairs = 0;
        let e = cfg.validate().unwrap_err().to_string();
        assert_eq!(e, "dpo.eval_pairs must be positive");
        cfg.data.path = Some("pairs.jsonl".into());
        cfg.validate().unwrap();
        // SFT without a held-out accuracy is a choice.
        let mut cfg = RunConfig::for_stage(Stage::Sft);
        cfg.sft.eval_prompts = 0;
        cfg.validate().unwrap();
        let mut cfg = RunConfig::for_stage(Stage::Sft);
        for (operand, ok) in [(8, false), (9, true), (999, true), (1000, false)] {
            cfg.data.task_max_operand = operand;
            assert_eq!(cfg.validate().is_ok(), ok, "{operand}");
        }
    }

    /// Dr. GRPO's normaliser counts a minibatch's responses, so a rollout must split into
    /// equal minibatches.
    #[test]
    fn dr_grpo_needs_equal_minibatches() {
        let mut cfg = RunConfig::for_stage(Stage::Grpo);
        cfg.grpo.loss_type = LossType::DrGrpo;
        (cfg.grpo.prompts_per_rollout, cfg.grpo.group_size) = (4, 8);
        cfg.grpo.minibatch_size = 16;
        cfg.validate().unwrap();
        cfg.grpo.minibatch_size = 24;
        let e = cfg.validate().unwrap_err().to_string();
        assert!(
            e.contains("grpo.loss_type = \"dr_grpo\"") && e.contains("32 responses"),
            "{e}"
        );
    }

    /// A resumed run's config.toml with a --config over it: the later file's keys win, the
    /// rest stay; its steps without epochs end the epochs the run began with.
    #[test]
    fn config_layers_overlay_and_steps_end_earlier_epochs() {
        let d = tempfile::tempdir().unwrap();
        let saved = d.path().join("config.toml");
        std::fs::write(
            &saved,
            "[train]\nepochs = 2.0\nlr = 0.001\n[model]\nhidden_size = 64\n",
        )
        .unwrap();
        let more = d.path().join("more.toml");
        std::fs::write(&more, "[train]\nsteps = 50\n").unwrap();
        let (cfg, user) = RunConfig::load_layers(Stage::Sft, &[saved.clone(), more]).unwrap();
        assert_eq!((cfg.train.steps, cfg.train.epochs), (50, None));
        assert_eq!((cfg.train.lr, cfg.model.hidden_size), (0.001, 64));
        assert!(
            user.unwrap().get("model").is_none(),
            "the last file's own table"
        );
        let (cfg, _) = RunConfig::load_layers(Stage::Sft, std::slice::from_ref(&saved)).unwrap();
        assert_eq!(cfg.train.epochs, Some(2.0));
        assert_eq!(cfg.data.holdout, Holdout::Random, "a user's file");
        // A run's own config.toml from before `holdout` resumes holding out the file's tail.
        std::fs::write(&saved, "stage = \"sft\"\n[train]\nlr = 0.001\n").unwrap();
        let (cfg, _) = RunConfig::load_layers(Stage::Sft, std::slice::from_ref(&saved)).unwrap();
        assert_eq!(cfg.data.holdout, Holdout::Tail);
        let text = "stage = \"sft\"\n[data]\nholdout = \"random\"\n";
        std::fs::write(&saved, text).unwrap();
        let (cfg, _) = RunConfig::load_layers(Stage::Sft, &[saved]).unwrap();
        assert_eq!(cfg.data.holdout, Holdout::Random);
    }

    #[test]
    fn toml_errors_name_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "hidden_size = 64\nnum_layers = 3\n").unwrap();
        let e = read_toml::<ModelConfig>(&p).unwrap_err().to_string();
        assert!(e.contains("c.toml:2") && e.contains("num_layers"), "{e}");
    }
}
