//! `temper pipeline`: pretrain -> sft -> reward -> ppo (and optionally dpo, kto, online DPO,
//! grpo, each from the SFT model, and distill, PPO's policy taught to the SFT model) on the
//! built-in task, one subdirectory per stage, ending
//! with a table of what each stage achieved on held-out data, also written to `summary.json`.
//!
//! `--config FILE` holds one top-level table per step, named as the step's directory
//! (`pretrain`, `sft`, `reward`, `ppo`, and `--with`'s `dpo` ... `distill`), each laid over
//! that step's configuration as a stage's own `--config` is: `[pretrain.train]`, `[sft.lora]`,
//! `[ppo.ppo]`, `[rloo.grpo]`. There is no table shared by every step. The whole file is
//! checked before any step runs (`check_config`): a top-level table that names no step, a key
//! its stage does not know, a value of the wrong type and a value the stage refuses are each
//! named by the file's line. A step's table the run does not select (`[dpo]` without `--with
//! dpo`) is checked as well, so one file may serve several pipelines, and is said not to run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use serde_json::{json, Map, Value};

use super::run_dir::earlier_run;
use super::{Env, Start};
use crate::config::{
    key_line, overlay, parse_toml, AdvantageEstimator, DeviceChoice, GrpoConfig,
    ImportanceSamplingLevel, LossType, ReportTo, RunConfig, Stage, STAGE_TABLES,
};
use crate::dist::preempt::Preempted;

/// The stages `--with` can add after PPO, each from the SFT model. `rloo` and
/// `reinforce_pp` are the grpo stage with another advantage estimator, `gspo` with
/// sequence-level ratios; `distill` teaches the PPO policy's distributions to the SFT model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Extra {
    Dpo,
    Kto,
    #[value(name = "online_dpo")]
    OnlineDpo,
    Grpo,
    Rloo,
    #[value(name = "reinforce_pp", alias = "reinforce++")]
    ReinforcePp,
    Gspo,
    Distill,
}

/// One step of the pipeline: a stage, the directory it writes, and (for the grpo stage) the
/// variant it runs.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Step {
    stage: Stage,
    name: &'static str,
    grpo: Option<GrpoVariant>,
}

/// The grpo stage's variants the pipeline runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum GrpoVariant {
    Estimator(AdvantageEstimator),
    /// GSPO's loss: sequence-level ratios clipped to [1 - 3e-4, 1 + 4e-4], each response's
    /// loss averaged over its tokens (the KL to the reference stays grpo's).
    Gspo,
}

impl GrpoVariant {
    fn apply(self, c: &mut GrpoConfig) {
        match self {
            GrpoVariant::Estimator(e) => c.advantage_estimator = e,
            GrpoVariant::Gspo => {
                c.importance_sampling_level = ImportanceSamplingLevel::Sequence;
                (c.cliprange, c.epsilon_high) = (3e-4, Some(4e-4));
                c.loss_type = LossType::Grpo;
            }
        }
    }
}

impl Step {
    fn plain(stage: Stage) -> Self {
        Self {
            stage,
            name: stage.name(),
            grpo: None,
        }
    }
}

impl From<Extra> for Step {
    fn from(e: Extra) -> Self {
        let grpo = |name, variant| Step {
            stage: Stage::Grpo,
            name,
            grpo: Some(variant),
        };
        let estimator = |name, est| grpo(name, GrpoVariant::Estimator(est));
        match e {
            Extra::Dpo => Step::plain(Stage::Dpo),
            Extra::Kto => Step::plain(Stage::Kto),
            Extra::OnlineDpo => Step::plain(Stage::OnlineDpo),
            Extra::Grpo => estimator("grpo", AdvantageEstimator::GroupNorm),
            Extra::Rloo => estimator("rloo", AdvantageEstimator::Rloo),
            Extra::ReinforcePp => estimator("reinforce_pp", AdvantageEstimator::ReinforcePlusPlus),
            Extra::Gspo => grpo("gspo", GrpoVariant::Gspo),
            Extra::Distill => Step::plain(Stage::Distill),
        }
    }
}

/// What the pipeline is asked to do.
#[derive(Clone)]
pub struct PipelineOptions {
    pub out: PathBuf,
    /// Extra stages after PPO, each from the SFT model.
    pub with: Vec<Extra>,
    pub device: Option<DeviceChoice>,
    pub kernels: Option<String>,
    pub seed: u64,
    /// Multiplies every stage's step count (0.25 for a quick smoke run).
    pub scale: f64,
    /// TOML with per-stage tables: `[pretrain.train]`, `[sft.lora]`, `[ppo.ppo]`, ...
    pub config: Option<PathBuf>,
    /// Start over where `out` holds an earlier pipeline's runs (else it is refused).
    pub overwrite: bool,
    /// Continue the pipeline in `out` (`resume_step`).
    pub resume: bool,
    /// Every step's `[train] report_to`, unless its table says otherwise.
    pub report_to: Option<ReportTo>,
}

/// How a resumed pipeline treats one of its steps.
enum Resumed {
    /// Finished: its result is read from summary.json.
    Done(Value),
    /// Stopped part-way: resumed from its latest checkpoint with its own config.toml.
    Stopped,
    /// Never started.
    NotStarted,
    /// A final model summary.json does not record: an earlier pipeline's, left by an
    /// `--overwrite` stopped before it reached this stage. Started over.
    Stale,
    /// A final model of this pipeline's that summary.json does not record: the stage that
    /// was running when the pipeline stopped, finished since by `temper <stage> --resume`, or
    /// killed between its final model and the summary. Its result is read again from its
    /// last checkpoint, not trained again.
    Unrecorded,
}

/// What a step's directory says of it under `--resume`: finished where it has a final model
/// and summary.json holds its result, stale where only the final model is there, stopped where
/// it holds a run, else not started.
fn resume_step(
    at: &Path,
    name: &str,
    results: &Map<String, Value>,
    running: Option<&str>,
) -> Resumed {
    let finished = at.join("final").join("meta.json").exists();
    match (results.get(name), finished) {
        (Some(v), true) => Resumed::Done(v.clone()),
        (None, true) if running == Some(name) && has_checkpoint(at) => Resumed::Unrecorded,
        (None, true) => Resumed::Stale,
        _ if earlier_run(at).is_some() => Resumed::Stopped,
        _ => Resumed::NotStarted,
    }
}

/// A stage resumed as `temper <stage> --resume` resumes it: with its own config.toml, and the
/// pipeline's `--device`, `--kernels` and `--report-to` where it has them (a resume may change
/// those, as the printed resume command says: a kernel set aside for a fault is set aside for
/// the stage that met it).
fn resumed_config(step: Step, at: &Path, opts: &PipelineOptions) -> Result<RunConfig> {
    let mut cfg = RunConfig::load_layers(step.stage, &[at.join("config.toml")])?.0;
    let before = (cfg.device, cfg.kernels.clone());
    command_flags(&mut cfg, opts);
    if before != (cfg.device, cfg.kernels.clone()) {
        crate::warnln!(
            "note: resuming {} with --device {} --kernels {:?} (it ran with {} {:?}), which its \
             config.toml will record",
            step.name,
            cfg.device.name(),
            cfg.kernels,
            before.0.name(),
            before.1
        );
    }
    Ok(cfg)
}

/// The pipeline command's own flags over a step's configuration, as a stage's flags override
/// its config file.
fn command_flags(cfg: &mut RunConfig, opts: &PipelineOptions) {
    if let Some(d) = opts.device {
        cfg.device = d;
    }
    if let Some(k) = &opts.kernels {
        cfg.kernels = k.clone();
    }
    if let Some(r) = opts.report_to {
        cfg.train.report_to = r;
    }
}

/// Whether the run in `at` has a complete checkpoint to resume from.
fn has_checkpoint(at: &Path) -> bool {
    crate::train::checkpoint::complete_steps(&at.join("checkpoints")).is_ok_and(|s| !s.is_empty())
}

/// summary.json as a pipeline left it: each stage's result, each stage's seconds, the
/// options it began with, and the stage it was running when it stopped.
#[derive(Default)]
struct Summary {
    results: Map<String, Value>,
    seconds: Map<String, Value>,
    options: Option<Value>,
    running: Option<String>,
    /// `--report-to` as the pipeline began with it, which a resume keeps where it gives none.
    report_to: Option<ReportTo>,
    /// Each step's table of `--config` as the pipeline last read it (absent where the
    /// pipeline began before these were kept).
    tables: Option<Map<String, Value>>,
}

/// summary.json's stage results, seconds and options, as an earlier run of the pipeline left
/// them.
fn read_summary(dir: &Path) -> Result<Summary> {
    let path = dir.join("summary.json");
    if !path.exists() {
        return Ok(Summary::default());
    }
    let text = std::fs::read_to_string(&path)?;
    let mut all: Map<String, Value> = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a pipeline summary", path.display()))?;
    let seconds = match all.remove("seconds") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let options = all.remove("options");
    let running = match all.remove("running") {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    let report_to = all
        .remove("report_to")
        .and_then(|v| serde_json::from_value(v).ok());
    let tables = match all.remove("tables") {
        Some(Value::Object(m)) => Some(m),
        _ => None,
    };
    Ok(Summary {
        results: all,
        seconds,
        options,
        running,
        report_to,
        tables,
    })
}

/// What decides the pipeline's stages, kept in summary.json: a resume under other options would
/// keep stages trained under the old ones beside new ones. The device and kernels may change.
fn options_json(opts: &PipelineOptions) -> Value {
    let config = opts.config.as_ref().map(|p| {
        let p = p.canonicalize().unwrap_or_else(|_| p.clone());
        p.display().to_string()
    });
    let with: Vec<&str> = opts.with.iter().map(|e| Step::from(*e).name).collect();
    json!({"seed": opts.seed, "scale": opts.scale, "with": with, "config": config})
}

/// One step's configuration inside the pipeline: its stage's defaults, the pipeline's
/// choices, then the user's table for the step (`[pretrain]`, ..., `[rloo]`) from `--config`.
fn stage_config(
    step: Step,
    opts: &PipelineOptions,
    user: Option<&toml::Value>,
) -> Result<RunConfig> {
    let dir = &opts.out;
    let stage = step.stage;
    let mut cfg = RunConfig::for_stage(stage);
    let table = user.and_then(|u| u.get(step.name));
    let chosen_warmup = table
        .and_then(|t| t.get("train")?.get("warmup_steps"))
        .is_some();
    if let Some(v) = step.grpo {
        v.apply(&mut cfg.grpo);
    }
    cfg.data.task_seed = opts.seed;
    match stage {
        Stage::Pretrain => {}
        Stage::Sft => cfg.init = Some(dir.join("pretrain")),
        Stage::Reward | Stage::Dpo | Stage::Kto | Stage::OnlineDpo | Stage::Grpo => {
            cfg.init = Some(dir.join("sft"))
        }
        Stage::Ppo => {
            cfg.init = Some(dir.join("sft"));
            cfg.ppo.value_init = Some(dir.join("reward"));
        }
        Stage::Distill => {
            cfg.init = Some(dir.join("sft"));
            cfg.distill.teacher = Some(dir.join("ppo"));
        }
    }
    if let Some(table) = table {
        let mut base = toml::Value::try_from(&cfg)?;
        overlay(&mut base, table.clone());
        cfg = base
            .try_into()
            .with_context(|| format!("pipeline config: invalid [{}] table", step.name))?;
    }
    // --seed moves each stage's seed, the table's where it sets one.
    command_flags(&mut cfg, opts);
    cfg.train.seed = opts.seed.wrapping_mul(1000).wrapping_add(cfg.train.seed);
    let made: Vec<PathBuf> = ["pretrain", "sft", "reward", "ppo"]
        .iter()
        .map(|s| dir.join(s))
        .collect();
    cfg.locate_hub_repos_but(&made)?;
    match cfg.train.epochs {
        // The training set's size decides this step's count (setup's epochs_to_steps, once
        // the data is read): --scale scales the passes over it instead. Scaling `steps` would
        // do nothing, as the epochs would override it.
        Some(e) => cfg.train.epochs = Some(e * opts.scale),
        None => {
            // At least one step, but a table's `steps = 0` stays 0, for the stage's check to
            // refuse by its line.
            let scaled = match cfg.train.steps {
                0 => 0.0,
                n => ((n as f64) * opts.scale).round().max(1.0),
            };
            // config.toml holds steps as an i64.
            if scaled >= i64::MAX as f64 {
                bail!(
                    "--scale {}: {} steps scale to {}, more than a run can count",
                    crate::config::shown_f64(opts.scale),
                    cfg.train.steps,
                    crate::config::shown_f64(scaled)
                );
            }
            let scaled = scaled as usize;
            cfg.train.steps = scaled;
            cfg.train.eval_every = cfg.train.eval_every.min(scaled);
            cfg.train.checkpoint_every = cfg.train.checkpoint_every.min(scaled);
            cfg.train.warmup_steps = match chosen_warmup {
                // A table's own warmup is scaled as its steps are, and kept: one longer than the
                // run is said by `check_config`, where the default's is cut silently.
                true => ((cfg.train.warmup_steps as f64) * opts.scale).round() as usize,
                false => cfg.train.warmup_steps.min(scaled / 2),
            };
        }
    }
    Ok(cfg)
}

/// The steps a pipeline runs: pretrain, sft, reward and ppo, then `with`'s in its order.
fn pipeline_steps(with: &[Extra]) -> Result<Vec<Step>> {
    let mut steps: Vec<Step> = [Stage::Pretrain, Stage::Sft, Stage::Reward, Stage::Ppo]
        .into_iter()
        .map(Step::plain)
        .collect();
    for e in with {
        let step = Step::from(*e);
        if steps.iter().any(|s| s.name == step.name) {
            bail!("--with: `{}` is named twice", step.name);
        }
        steps.push(step);
    }
    Ok(steps)
}

/// Every step a pipeline can run, each a top-level table `--config` may hold.
fn known_steps() -> Vec<Step> {
    let mut all = pipeline_steps(&[]).expect("no extra named twice");
    all.extend(Extra::value_variants().iter().map(|e| Step::from(*e)));
    all
}

/// Reads `--config` and checks all of it before any step runs: every top-level table names a
/// step, each step's table parses as its stage's config (no unknown key, no wrong type), its
/// `stage`, if given, is the step's, and the configuration each step would run with (the
/// steps selected, and any other step the file holds a table for) passes the stage's checks.
/// An error names the file and the line of the key at fault, else of the step's table. Without
/// a file the selected steps' configurations are checked all the same (`--kernels` among
/// them). Returns the file's table.
fn check_config(opts: &PipelineOptions, steps: &[Step]) -> Result<Option<toml::Value>> {
    let known = known_steps();
    let Some(path) = &opts.config else {
        for &step in steps {
            let cfg = stage_config(step, opts, None)?;
            cfg.validate()
                .map_err(|e| anyhow::anyhow!("pipeline step {}: {e:#}", step.name))?;
        }
        return Ok(None);
    };
    let shown = path.display().to_string();
    let text =
        std::fs::read_to_string(path).with_context(|| format!("{shown}: cannot read config"))?;
    let table: toml::Table = parse_toml(path, &text)?;
    let at = |line: Option<usize>| match line {
        Some(l) => format!("{shown}:{l}"),
        None => shown.clone(),
    };
    for key in table.keys() {
        if !known.iter().any(|s| s.name == key) {
            let names: Vec<&str> = known.iter().map(|s| s.name).collect();
            let shown_key = match table[key].is_table() {
                true => format!("[{key}]"),
                false => format!("`{key}`"),
            };
            bail!(
                "{}: {shown_key} is not a step of the pipeline: its top-level tables are the steps ({}), each holding that stage's config, e.g. [pretrain.train], [ppo.ppo]; no table is shared by every step",
                at(key_line(&text, &[key], true)),
                names.join(", ")
            );
        }
    }
    // Each step's table as its stage's config, for the line of an unknown key or a wrong type.
    parse_toml::<std::collections::BTreeMap<String, RunConfig>>(path, &text)?;
    let user = toml::Value::Table(table);
    // The model every later step trains, where the pretrain step builds it (not loads it).
    let pretrain = stage_config(Step::plain(Stage::Pretrain), opts, Some(&user)).ok();
    let built = pretrain.filter(|c| c.init.is_none()).map(|c| c.model);
    for &step in &known {
        let Some(own) = user.get(step.name) else {
            if steps.contains(&step) {
                stage_config(step, opts, None)?
                    .validate()
                    .map_err(|e| anyhow::anyhow!("pipeline step {}: {e:#}", step.name))?;
            }
            continue;
        };
        let table_line = key_line(&text, &[step.name], true);
        if let Some(stage) = own.get("stage") {
            if stage.as_str() != Some(step.stage.name()) {
                bail!(
                    "{}: [{}] stage = {stage}: the step runs stage \"{}\" (a step's stage is its own; leave `stage` out)",
                    at(key_line(&text, &[step.name, "stage"], false).or(table_line)),
                    step.name,
                    step.stage.name()
                );
            }
        }
        let cfg = stage_config(step, opts, Some(&user))
            .with_context(|| format!("{}: [{}]", at(table_line), step.name))?;
        missing_path(&cfg, own, &opts.out).map_err(|(key, e)| {
            let mut full = vec![step.name];
            full.extend(key);
            anyhow::anyhow!("{}: {}.{e}", at(key_line(&text, &full, false)), step.name)
        })?;
        for other in (own.as_table().into_iter().flat_map(|t| t.keys()))
            .filter(|k| STAGE_TABLES.contains(&k.as_str()))
            .filter(|k| !step.stage.own_tables().contains(&k.as_str()))
        {
            crate::warnln!(
                "warning: {}: [{}.{other}] is not read by the {} step (stage {}): ignored",
                at(key_line(&text, &[step.name, other], true)),
                step.name,
                step.name,
                step.stage.name()
            );
        }
        if let Err(e) = cfg.validate() {
            let e = format!("{e:#}");
            // `ppo.rollout_batch must ...`: the line of [ppo.ppo]'s rollout_batch; else of the
            // first other key the message names that the file sets (`... train.batch_size`).
            let named = e
                .split_whitespace()
                .map(|w| w.trim_matches(|c: char| !(c.is_alphanumeric() || c == '_')))
                .filter(|w| w.contains('.'))
                .find_map(|w| {
                    let mut key = vec![step.name];
                    key.extend(w.split('.'));
                    key_line(&text, &key, false)
                });
            bail!("{}: [{}] {e}", at(named.or(table_line)), step.name);
        }
        let warmup_set = key_line(&text, &[step.name, "train", "warmup_steps"], false);
        let t = &cfg.train;
        if let (Some(line), None, true) = (warmup_set, t.warmup_ratio, t.warmup_steps > t.steps) {
            crate::warnln!(
                "warning: {}: [{}] train.warmup_steps is {} (at --scale {}), more than the \
                 step's {} steps: the learning rate warms up over all but its last and does not \
                 decay",
                at(Some(line)),
                step.name,
                t.warmup_steps,
                crate::config::shown_f64(opts.scale),
                t.steps
            );
        }
        // Checked by the stage once it loads its init's model; here, before any step trains.
        let from_pipeline = cfg
            .init
            .as_deref()
            .is_some_and(|i| i.starts_with(&opts.out));
        if let (Stage::Sft, true, true, Some(m)) =
            (step.stage, cfg.sft.packing, from_pipeline, &built)
        {
            if cfg.train.seq_len > m.max_position_embeddings {
                let line = key_line(&text, &[step.name, "train", "seq_len"], false).or(key_line(
                    &text,
                    &[step.name, "sft", "packing"],
                    false,
                ));
                bail!(
                    "{}: [{}] packing: train.seq_len ({}) exceeds the context of the model the \
                     pretrain step builds (max_position_embeddings = {}); lower seq_len or turn \
                     packing off",
                    at(line.or(table_line)),
                    step.name,
                    cfg.train.seq_len,
                    m.max_position_embeddings
                );
            }
        }
        if !steps.contains(&step) {
            crate::errln!(
                "warning: {}: [{}] is checked but not run: the pipeline runs {} only with --with {}",
                at(table_line),
                step.name,
                step.name,
                step.name
            );
        }
    }
    one_task_world(opts, steps, &user).map_err(|(step, key, e)| {
        anyhow::anyhow!(
            "{}: [{step}.data] {key}: {e}",
            at(key_line(&text, &[step, "data", key], false))
        )
    })?;
    Ok(Some(user))
}

/// The paths a step's table sets that are not there, as `(key, message)`: read only once the
/// steps before it had trained, they failed late and named no file. One inside the pipeline's
/// own directory (a later step's `init` of an earlier step's model) is made by the pipeline.
fn missing_path(
    cfg: &RunConfig,
    table: &toml::Value,
    out: &Path,
) -> std::result::Result<(), (Vec<&'static str>, String)> {
    let made = |p: &Path| {
        let inside = lexical(p).strip_prefix(lexical(out)).map(Path::to_path_buf);
        let step = inside
            .ok()
            .and_then(|i| i.components().next().map(|c| c.as_os_str().to_owned()));
        step.is_some_and(|s| known_steps().iter().any(|k| s == k.name))
    };
    for (key, path) in cfg.path_settings() {
        let set = key.iter().try_fold(table, |t, k| t.get(k)).is_some();
        let Some(path) = path.filter(|p| set && !p.exists() && !made(p)) else {
            continue;
        };
        let relative = match path.is_relative() {
            true => " (a relative path is read from the working directory)",
            false => "",
        };
        return Err((
            key.to_vec(),
            format!(
                "{} = {}: no such file or directory{relative}",
                key.join("."),
                path.display()
            ),
        ));
    }
    Ok(())
}

/// `path` absolute, its `.` and `..` components resolved by name (a path that is not there
/// yet has no other form to compare).
fn lexical(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// The steps on the built-in task share its world (`task_seed`, `task_max_operand`): a step of
/// another world would hold out prompts its init trained on, and compare itself with a start
/// measured on other prompts. A table that sets a world of its own is refused, as
/// `(step, key, message)`, unless every such step sets the same.
fn one_task_world(
    opts: &PipelineOptions,
    steps: &[Step],
    user: &toml::Value,
) -> std::result::Result<(), (&'static str, &'static str, String)> {
    let mut first: Option<(&'static str, u64, u32)> = None;
    for &step in steps {
        let Ok(cfg) = stage_config(step, opts, Some(user)) else {
            continue;
        };
        if cfg.data.path.is_some() {
            continue;
        }
        let world = (cfg.data.task_seed, cfg.data.task_max_operand);
        let Some((name, seed, max)) = first else {
            first = Some((step.name, world.0, world.1));
            continue;
        };
        if world == (seed, max) {
            continue;
        }
        let key = match world.0 != seed {
            true => "task_seed",
            false => "task_max_operand",
        };
        // The step whose table sets the key is the odd one (the first, where it alone does).
        let sets = |name: &str| {
            let at = user.get(name).and_then(|t| t.get("data")?.get(key));
            at.is_some()
        };
        let (odd, odd_world, other, other_world) = match sets(step.name) || !sets(name) {
            true => (step.name, world, name, (seed, max)),
            false => (name, (seed, max), step.name, world),
        };
        let value = match key {
            "task_seed" => odd_world.0.to_string(),
            _ => odd_world.1.to_string(),
        };
        return Err((
            odd,
            key,
            format!(
                "{key} = {value}, where the {other} step's task has task_seed {} and \
                 task_max_operand {}: a pipeline's steps on the built-in task share one \
                 (--seed sets its task_seed; set the same in every step's table)",
                other_world.0, other_world.1
            ),
        ));
    }
    Ok(())
}

/// A measured number, or null where there was nothing to measure (JSON holds no NaN): a check
/// that reads the number then fails naming the field rather than comparing a NaN.
fn num(x: impl Into<Option<f64>>) -> Value {
    match x.into() {
        Some(x) if x.is_finite() => json!(x),
        _ => Value::Null,
    }
}

/// Runs one stage and returns its `summary.json` entry.
fn run_stage(stage: Stage, env: &Env) -> Result<Value> {
    Ok(match stage {
        Stage::Pretrain => {
            let r = super::pretrain::run(env)?;
            json!({"val_loss": num(r.val_loss), "first_val_loss": num(r.first_val_loss),
                   "train_loss": num(r.train_loss)})
        }
        Stage::Sft => {
            let r = super::sft::run(env)?;
            json!({"accuracy": num(r.accuracy), "base_accuracy": num(r.base_accuracy),
                   "eval_loss": num(r.eval_loss)})
        }
        Stage::Reward => {
            let r = super::reward::run(env)?;
            json!({"accuracy": num(r.accuracy), "initial_accuracy": num(r.first_accuracy)})
        }
        Stage::Ppo | Stage::Grpo | Stage::OnlineDpo => {
            let r = match stage {
                Stage::Ppo => super::ppo::run(env)?,
                Stage::OnlineDpo => super::online_dpo::run(env)?,
                _ => super::grpo::run(env)?,
            };
            json!({"accuracy": num(r.accuracy), "sft_accuracy": num(r.start_accuracy),
                   "mean_reward": num(r.mean_reward), "sft_mean_reward": num(r.start_mean_reward),
                   "kl": num(r.kl)})
        }
        Stage::Dpo => {
            let r = super::dpo::run(env)?;
            json!({"accuracy": num(r.accuracy), "sft_accuracy": num(r.start_accuracy),
                   "preference_accuracy": num(r.reward_accuracy),
                   "sft_preference_accuracy": num(r.start_reward_accuracy)})
        }
        Stage::Kto => {
            let r = super::kto::run(env)?;
            json!({"accuracy": num(r.accuracy), "sft_accuracy": num(r.start_accuracy),
                   "label_accuracy": num(r.label_accuracy),
                   "sft_label_accuracy": num(r.start_label_accuracy),
                   "reward_margin": num(r.reward_margin)})
        }
        Stage::Distill => {
            let r = super::distill::run(env)?;
            json!({"accuracy": num(r.accuracy), "sft_accuracy": num(r.start_accuracy),
                   "teacher_accuracy": num(r.teacher_accuracy), "eval_loss": num(r.eval_loss)})
        }
    })
}

pub fn run(opts: &PipelineOptions) -> Result<()> {
    if !(opts.scale.is_finite() && opts.scale > 0.0) {
        bail!("--scale must be a positive number, got {}", opts.scale);
    }
    let steps = pipeline_steps(&opts.with)?;
    // Checked whole before anything is created or trained.
    let user = check_config(opts, &steps)?;
    let dir = &opts.out;
    // summary.json is written before the first stage: a directory without it never held one
    // of temper's pipelines, and a resume there would run a whole new pipeline.
    if opts.resume && !dir.join("summary.json").is_file() {
        bail!(
            "--resume: {} holds no pipeline (no summary.json): start one without --resume",
            dir.display()
        );
    }
    // Held while the pipeline lasts: a second pipeline in --out would race for summary.json.
    let _lock = super::run_dir::lock(dir)?;
    let options = options_json(opts);
    let mut summary = match opts.resume {
        true => read_summary(dir)?,
        false => Summary::default(),
    };
    if let Some(saved) = summary.options.as_ref().filter(|s| **s != options) {
        bail!(
            "--resume: {} was started with {saved}, and this resume asks for {options}: \
             resume with the same --seed, --scale, --with and --config",
            dir.display()
        );
    }
    summary.options = Some(options);
    // A resume reports where the pipeline began reporting, unless told otherwise.
    let opts = &PipelineOptions {
        report_to: opts.report_to.or(summary.report_to),
        ..opts.clone()
    };
    summary.report_to = opts.report_to;
    let tables = step_tables(&steps, user.as_ref())?;
    if opts.resume {
        check_kept_tables(opts, &steps, &summary, &tables)?;
    }
    summary.tables = Some(tables);
    let running = summary.running.take();
    summary.seconds.remove("total");
    let start = match opts.overwrite {
        true => Start::Overwrite,
        false => Start::Fresh,
    };
    if start == Start::Fresh && !opts.resume {
        for step in &steps {
            let at = dir.join(step.name);
            if let Some(mark) = earlier_run(&at) {
                bail!(
                    "{}: already holds a run ({mark}) of an earlier pipeline: continue it with \
                     --resume, start over with --overwrite, or give another --out",
                    at.display()
                );
            }
        }
    }
    // Written before the first stage: an earlier pipeline's results, which a fresh start or an
    // overwrite leaves behind until each stage is run again, are not read as this one's.
    summary.write(dir)?;
    // Under --resume, once a stage runs again, the runs after it were trained from its
    // earlier self (an overwrite stopped part-way leaves them): started over, never kept.
    let mut upstream_ran = false;
    for &step in &steps {
        let t0 = Instant::now();
        let at = dir.join(step.name);
        let (cfg, start) = match (opts.resume, upstream_ran) {
            (false, _) => (stage_config(step, opts, user.as_ref())?, start),
            (true, true) => {
                let start = match earlier_run(&at) {
                    Some(_) => Start::Overwrite,
                    None => Start::Fresh,
                };
                (stage_config(step, opts, user.as_ref())?, start)
            }
            (true, false) => {
                match resume_step(&at, step.name, &summary.results, running.as_deref()) {
                    Resumed::Done(v) => {
                        outln!("[pipeline] {}: finished earlier, kept", step.name);
                        summary.results.insert(step.name.to_string(), v);
                        continue;
                    }
                    // As `temper <stage> --resume` continues a run: with the config it started with.
                    Resumed::Stopped => {
                        upstream_ran = true;
                        (resumed_config(step, &at, opts)?, Start::Resume)
                    }
                    Resumed::NotStarted => {
                        upstream_ran = true;
                        (stage_config(step, opts, user.as_ref())?, Start::Fresh)
                    }
                    Resumed::Stale => {
                        upstream_ran = true;
                        outln!(
                        "[pipeline] {}: its final model is an earlier pipeline's: trained again",
                        step.name
                    );
                        (stage_config(step, opts, user.as_ref())?, Start::Overwrite)
                    }
                    // Its final model set aside as a resume sets aside an earlier schedule's,
                    // the run resumes at its last checkpoint, which ends it again with its result.
                    Resumed::Unrecorded => {
                        super::run_dir::set_final_aside_for_result(&at)?;
                        outln!(
                        "[pipeline] {}: finished, but summary.json lacks its result: read again \
                         from its last checkpoint",
                        step.name
                    );
                        (resumed_config(step, &at, opts)?, Start::Resume)
                    }
                }
            }
        };
        let mut cfg = cfg;
        if start != Start::Resume {
            let table = user.as_ref().and_then(|u| u.get(step.name)?.get("model"));
            super::setup::take_init_model(&mut cfg, table, opts.config.as_deref())?;
        }
        // The stage running is named, so that a resume knows a final model summary.json
        // lacks for this pipeline's, not an earlier one's.
        summary.running = Some(step.name.to_string());
        summary.write(dir)?;
        crate::dist::preempt::set_phase(crate::dist::preempt::Phase::Setup);
        // A stage resumed goes on counting from the seconds its stopped part took.
        let before = match start {
            Start::Resume => (summary.seconds.get(step.name)).and_then(Value::as_f64),
            _ => None,
        };
        let env = Env::prepare(cfg, &at, start)?;
        // A step started over replaces what was there at once: the pipeline's summary decides
        // what is stale, and a step trained from an earlier upstream model put back would be
        // resumed as if it were this pipeline's.
        env.checkpointed()?;
        let result = run_stage(step.stage, &env);
        let secs = before.unwrap_or(0.0) + t0.elapsed().as_secs_f64();
        summary.seconds.insert(step.name.to_string(), json!(secs));
        // A summary that cannot be written (the full disk that stopped the stage, say) is
        // said, and the stage's own error, with its resume command, is the one returned.
        if let (Err(_), Err(w)) = (&result, summary.write(dir)) {
            crate::warnln!("warning: {}: {w:#}", dir.join("summary.json").display());
        }
        let result = result.map_err(|e| {
            // A signal's line says --resume of the stage's directory; the pipeline goes on from
            // the same place with its own --resume.
            let Some(at) = e.downcast_ref::<Preempted>().map(|p| p.at) else {
                return e;
            };
            // Only the pipeline's command: resuming the stage on its own would leave the
            // pipeline's summary without its result.
            e.context(format!(
                "{}: stopped by a signal {}; continue the pipeline with `{}`",
                step.name,
                at.state(),
                resume_command(opts)
            ))
        })?;
        summary.results.insert(step.name.to_string(), result);
        summary.running = None;
        summary.write(dir)?;
    }
    // The stages' own seconds, those of stages kept from an earlier call included.
    let total: f64 = (steps.iter())
        .filter_map(|s| summary.seconds.get(s.name).and_then(Value::as_f64))
        .sum();
    summary.seconds.insert("total".into(), json!(total));
    summary.write(dir)?;
    print_table(&steps, &summary.results);
    outln!("summary: {}", dir.join("summary.json").display());
    Ok(())
}

/// Each step's table of the `--config` file `user`, as JSON, for summary.json.
fn step_tables(steps: &[Step], user: Option<&toml::Value>) -> Result<Map<String, Value>> {
    let mut out = Map::new();
    for step in steps {
        if let Some(t) = user.and_then(|u| u.get(step.name)) {
            out.insert(step.name.to_string(), serde_json::to_value(t)?);
        }
    }
    Ok(out)
}

/// Refuses a resume whose `--config` changed the table of a step it keeps (finished, or
/// stopped and continued with its own config.toml): the pipeline would end as two
/// configurations' and say it was one. A step that starts now takes the file as it is, said
/// where its table changed.
fn check_kept_tables(
    opts: &PipelineOptions,
    steps: &[Step],
    summary: &Summary,
    tables: &Map<String, Value>,
) -> Result<()> {
    let Some(saved) = &summary.tables else {
        return Ok(());
    };
    let file = opts.config.as_deref().unwrap_or(Path::new("--config"));
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut kept = true;
    for step in steps {
        let at = opts.out.join(step.name);
        let status = resume_step(&at, step.name, &summary.results, summary.running.as_deref());
        let keeps = kept && !matches!(status, Resumed::NotStarted | Resumed::Stale);
        // As `run` goes on resuming after a step it ends again from its checkpoint.
        kept &= matches!(status, Resumed::Done(_) | Resumed::Unrecorded);
        let (old, new) = (saved.get(step.name), tables.get(step.name));
        if old == new {
            continue;
        }
        let changed = changed_keys(old, new).join(", ");
        let line = key_line(&text, &[step.name], true).map_or(String::new(), |l| format!(":{l}"));
        match keeps {
            true => bail!(
                "--resume: {}{line}: [{}] is not the table the pipeline ran its {} step with \
                 (changed: {changed}): put it back, or start the pipeline over with --overwrite",
                file.display(),
                step.name,
                step.name
            ),
            false => crate::warnln!(
                "note: {}{line}: [{}] changed since the pipeline began ({changed}): the {} step, \
                 not yet trained, takes it as it is now",
                file.display(),
                step.name,
                step.name
            ),
        }
    }
    Ok(())
}

/// The dotted keys whose values differ between two tables (either may be absent).
fn changed_keys(old: Option<&Value>, new: Option<&Value>) -> Vec<String> {
    fn leaves(prefix: &str, v: Option<&Value>, out: &mut Map<String, Value>) {
        match v {
            Some(Value::Object(m)) => {
                for (k, x) in m {
                    let key = match prefix {
                        "" => k.clone(),
                        p => format!("{p}.{k}"),
                    };
                    leaves(&key, Some(x), out);
                }
            }
            // `lr = 1` and `lr = 1.0` say one thing.
            Some(Value::Number(n)) => {
                out.insert(prefix.to_string(), json!(n.as_f64()));
            }
            Some(other) => {
                out.insert(prefix.to_string(), other.clone());
            }
            None => {}
        }
    }
    let (mut a, mut b) = (Map::new(), Map::new());
    leaves("", old, &mut a);
    leaves("", new, &mut b);
    let mut keys: Vec<String> = (a.keys().chain(b.keys()))
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// The command that continues the pipeline `opts` began: a resume checks that it asks for the
/// same seed, scale, stages and config, and takes the device and kernels it is given (so they
/// are given again: the later stages would otherwise take the defaults).
fn resume_command(opts: &PipelineOptions) -> String {
    let mut cmd = format!(
        "temper pipeline --out {} --resume",
        shell_word(&opts.out.display().to_string())
    );
    if let Some(d) = opts.device {
        cmd += &format!(" --device {}", d.name());
    }
    if let Some(k) = &opts.kernels {
        cmd += &format!(" --kernels {}", shell_word(k));
    }
    if !opts.with.is_empty() {
        let with: Vec<&str> = opts.with.iter().map(|e| Step::from(*e).name).collect();
        cmd += &format!(" --with {}", with.join(","));
    }
    if opts.seed != 0 {
        cmd += &format!(" --seed {}", opts.seed);
    }
    if opts.scale != 1.0 {
        cmd += &format!(" --scale {}", opts.scale);
    }
    if let Some(c) = &opts.config {
        cmd += &format!(" --config {}", shell_word(&c.display().to_string()));
    }
    cmd
}

/// `word` as a POSIX shell reads it back whole: as it is where nothing in it is special, else
/// single-quoted (a path with a space, say, which the printed command must not split).
fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:=,+@%".contains(c);
    match !word.is_empty() && word.chars().all(plain) {
        true => word.to_string(),
        false => format!("'{}'", word.replace('\'', r"'\''")),
    }
}

impl Summary {
    /// summary.json: the results beside the seconds, the options, and what is set of the rest.
    fn write(&self, dir: &Path) -> Result<()> {
        let mut all = self.results.clone();
        all.insert("seconds".into(), Value::Object(self.seconds.clone()));
        if let Some(o) = &self.options {
            all.insert("options".into(), o.clone());
        }
        if let Some(r) = self.report_to {
            all.insert("report_to".into(), serde_json::to_value(r)?);
        }
        if let Some(name) = &self.running {
            all.insert("running".into(), json!(name));
        }
        if let Some(t) = &self.tables {
            all.insert("tables".into(), Value::Object(t.clone()));
        }
        crate::io::write_atomic(
            &dir.join("summary.json"),
            serde_json::to_string_pretty(&Value::Object(all))?.as_bytes(),
        )
    }
}

fn print_table(steps: &[Step], summary: &Map<String, Value>) {
    let f = |v: Option<&Value>| {
        v.and_then(Value::as_f64)
            .map_or("-".to_string(), |x| format!("{x:.3}"))
    };
    outln!("{:<12} {:<28} compared with", "stage", "held-out result");
    for step in steps {
        let v = &summary[step.name];
        let (what, base) = match step.stage {
            Stage::Pretrain => (
                format!("val loss {}", f(v.get("val_loss"))),
                format!("initial val loss {}", f(v.get("first_val_loss"))),
            ),
            Stage::Sft => (
                format!("accuracy {}", f(v.get("accuracy"))),
                format!("base model {}", f(v.get("base_accuracy"))),
            ),
            Stage::Reward => (
                format!("pairwise accuracy {}", f(v.get("accuracy"))),
                format!("untrained head {}", f(v.get("initial_accuracy"))),
            ),
            Stage::Dpo | Stage::Kto => (
                format!("accuracy {}", f(v.get("accuracy"))),
                format!("sft {}", f(v.get("sft_accuracy"))),
            ),
            Stage::Distill => (
                format!("accuracy {}", f(v.get("accuracy"))),
                format!(
                    "sft {}, teacher (ppo) {}",
                    f(v.get("sft_accuracy")),
                    f(v.get("teacher_accuracy"))
                ),
            ),
            Stage::Ppo | Stage::Grpo | Stage::OnlineDpo => (
                format!("accuracy {}", f(v.get("accuracy"))),
                format!(
                    "sft {}, reward {} (sft {}), rollout KL {}",
                    f(v.get("sft_accuracy")),
                    f(v.get("mean_reward")),
                    f(v.get("sft_mean_reward")),
                    f(v.get("kl"))
                ),
            ),
        };
        outln!("{:<12} {what:<28} {base}", step.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(scale: f64) -> PipelineOptions {
        PipelineOptions {
            out: PathBuf::from("unused"),
            with: vec![],
            device: None,
            kernels: None,
            seed: 0,
            scale,
            config: None,
            overwrite: false,
            resume: false,
            report_to: None,
        }
    }

    /// The resume command a stopped pipeline prints reads back, through the CLI, as the options
    /// it began with, `--resume` aside: its device and kernels too, which summary.json does
    /// not keep, so that the later stages do not fall back to the defaults.
    #[test]
    fn the_printed_resume_command_reads_back_as_the_pipelines_options() {
        let mut began = options(0.05);
        began.out = PathBuf::from("runs/pipe");
        began.with = vec![Extra::Dpo, Extra::Rloo];
        began.device = Some(DeviceChoice::Cpu);
        began.kernels = Some("all=reference".into());
        began.seed = 3;
        began.config = Some(PathBuf::from("pipe.toml"));
        let cmd = resume_command(&began);
        let args: Vec<&str> = cmd.split(' ').collect();
        assert_eq!(args.len(), 17, "{cmd}: nothing here needs quoting");
        let crate::cli::Command::Pipeline(a) =
            crate::cli::Cli::try_parse_args(&args).unwrap().command
        else {
            panic!("{cmd}: not a pipeline");
        };
        let back = a.options();
        assert!(back.resume, "{cmd}");
        assert_eq!(back.out, began.out, "{cmd}");
        assert_eq!(back.with, began.with, "{cmd}");
        assert_eq!(back.device, began.device, "{cmd}");
        assert_eq!(back.kernels, began.kernels, "{cmd}");
        assert_eq!((back.seed, back.scale), (began.seed, began.scale), "{cmd}");
        assert_eq!(back.config, began.config, "{cmd}");
    }

    /// A path with a space or a quote in it comes back whole from the shell.
    #[test]
    fn the_resume_command_quotes_what_the_shell_would_split() {
        let mut began = options(0.05);
        began.out = PathBuf::from("my runs/it's here");
        began.config = Some(PathBuf::from("$HOME/pipe.toml"));
        let cmd = resume_command(&began);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf '%s\\n' {cmd}"))
            .output()
            .unwrap();
        let words = String::from_utf8(out.stdout).unwrap();
        let words: Vec<&str> = words.lines().collect();
        assert_eq!(
            words,
            [
                "temper",
                "pipeline",
                "--out",
                "my runs/it's here",
                "--resume",
                "--scale",
                "0.05",
                "--config",
                "$HOME/pipe.toml"
            ],
            "{cmd}"
        );
        assert_eq!(shell_word("runs/a-b_c.1"), "runs/a-b_c.1");
        assert_eq!(shell_word(""), "''");
    }

    /// A final model summary.json lacks a result for is this pipeline's where summary.json
    /// names its stage as the one running when the pipeline stopped (and a checkpoint is there
    /// to end it again from), else an earlier pipeline's.
    #[test]
    fn a_final_model_without_a_result_is_the_running_stages_or_stale() {
        let d = tempfile::tempdir().unwrap();
        let at = d.path().join("sft");
        std::fs::create_dir_all(at.join("final")).unwrap();
        std::fs::write(at.join("final/meta.json"), "{}").unwrap();
        let none = Map::new();
        let kind = |running| match resume_step(&at, "sft", &none, running) {
            Resumed::Unrecorded => "unrecorded",
            Resumed::Stale => "stale",
            _ => "other",
        };
        assert_eq!(kind(Some("sft")), "stale", "no checkpoint to end it from");
        let ck = at.join("checkpoints/step-0000004");
        std::fs::create_dir_all(&ck).unwrap();
        for f in ["state.json", "meta.json"] {
            std::fs::write(ck.join(f), "{}").unwrap();
        }
        assert_eq!(kind(Some("sft")), "unrecorded");
        assert_eq!(kind(Some("pretrain")), "stale");
        assert_eq!(kind(None), "stale");
        let mut done = Map::new();
        done.insert("sft".into(), json!({"accuracy": 0.5}));
        assert!(matches!(
            resume_step(&at, "sft", &done, Some("sft")),
            Resumed::Done(_)
        ));
        // summary.json names the running stage, and reads it back apart from the results.
        let report = Some(ReportTo::Tensorboard);
        let written = Summary {
            results: done.clone(),
            options: Some(json!({})),
            running: Some("reward".into()),
            report_to: report,
            ..Summary::default()
        };
        written.write(d.path()).unwrap();
        let back = read_summary(d.path()).unwrap();
        assert_eq!(back.running.as_deref(), Some("reward"));
        assert_eq!(back.report_to, report);
        assert_eq!(back.results, done);
        // A directory without summary.json holds no pipeline to resume.
        let opts = PipelineOptions {
            out: d.path().join("sft"),
            resume: true,
            ..options(1.0)
        };
        let e = run(&opts).unwrap_err().to_string();
        assert!(e.contains("holds no pipeline (no summary.json)"), "{e}");
    }

    /// `--scale` scales a step's count, or, where the user's table sets `epochs` (which then
    /// decide the count), the epochs.
    #[test]
    fn scale_takes_the_epochs_where_they_decide_the_steps() {
        let user: toml::Value = toml::from_str("[sft.train]\nepochs = 2.0\n").unwrap();
        let sft = stage_config(Step::plain(Stage::Sft), &options(0.25), Some(&user)).unwrap();
        assert_eq!(sft.train.epochs, Some(0.5));
        let unscaled = RunConfig::for_stage(Stage::Sft).train.steps;
        assert_eq!(sft.train.steps, unscaled, "steps are left to the epochs");

        let pretrain =
            stage_config(Step::plain(Stage::Pretrain), &options(0.25), Some(&user)).unwrap();
        let want = RunConfig::for_stage(Stage::Pretrain).train.steps as f64 * 0.25;
        assert_eq!(pretrain.train.epochs, None);
        assert_eq!(pretrain.train.steps, want.round() as usize);
    }

    /// The command's flags win over a table's keys, as a stage's flags win over its config
    /// file; --seed offsets the table's seed as it offsets the stage's own.
    #[test]
    fn the_commands_flags_win_over_the_config_tables() {
        let body = "[pretrain]\ndevice = \"cpu\"\nkernels = \"all=reference\"\n\
                    [pretrain.train]\nreport_to = \"none\"\nseed = 77\n";
        let user: toml::Value = toml::from_str(body).unwrap();
        let step = Step::plain(Stage::Pretrain);
        let table = stage_config(step, &options(1.0), Some(&user)).unwrap();
        assert_eq!(table.train.seed, 77);
        let mut opts = options(1.0);
        opts.device = Some(DeviceChoice::Auto);
        opts.kernels = Some("attention=flash".into());
        opts.report_to = Some(ReportTo::Tensorboard);
        opts.seed = 3;
        let cfg = stage_config(step, &opts, Some(&user)).unwrap();
        assert_eq!(cfg.device, DeviceChoice::Auto);
        assert_eq!(cfg.kernels, "attention=flash");
        assert_eq!(cfg.train.report_to, ReportTo::Tensorboard);
        assert_eq!((cfg.train.seed, cfg.data.task_seed), (3077, 3));
    }

    /// A table's `steps = 0` is refused by its line, not raised to the one step --scale
    /// leaves a scaled count.
    #[test]
    fn zero_steps_in_a_table_are_refused_by_line() {
        let e = config_error("[pretrain.train]\nsteps = 0\n", &[]);
        assert!(
            e.contains("pl.toml:2: [pretrain] train.steps must be positive"),
            "{e}"
        );
    }

    /// `check_config` on `body` written to `pl.toml`, with `--with` `with`: its error.
    fn config_error(body: &str, with: &[Extra]) -> String {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("pl.toml");
        std::fs::write(&path, body).unwrap();
        let mut opts = options(1.0);
        opts.config = Some(path);
        opts.with = with.to_vec();
        let steps = pipeline_steps(with).unwrap();
        let e = format!("{:#}", check_config(&opts, &steps).unwrap_err());
        assert!(!e.contains('\n'), "one line: {e}");
        e
    }

    /// Only the steps are top-level tables: a shared `[train]`, a misspelt step or a bare key
    /// is named with its line and the steps there are.
    #[test]
    fn a_top_level_table_must_name_a_step() {
        for (body, want) in [
            ("[train]\nlr = 1.0\n", "pl.toml:1: [train] is not a step"),
            (
                "[sft.train]\nsteps = 3\n\n[pretrian.train]\nsteps = 3\n",
                "pl.toml:4: [pretrian] is not a step",
            ),
            ("# seed\n\nseed = 3\n", "pl.toml:3: `seed` is not a step"),
        ] {
            let e = config_error(body, &[]);
            assert!(e.contains(want), "{body:?}: {e}");
            assert!(e.contains("pretrain, sft, reward, ppo, dpo"), "{e}");
            assert!(e.contains("rloo, reinforce_pp, gspo, distill"), "{e}");
        }
    }

    /// A step's table is its stage's config: an unknown key, a wrong type and a refused value
    /// are named by the line that sets them, in a later step's table and in one the run does
    /// not select.
    #[test]
    fn each_step_table_is_checked_as_its_stage_config() {
        let cases: [(&str, &[Extra], &[&str]); 7] = [
            (
                "[sft.train]\nsteps = 3\n\n[ppo.ppo]\nrollout_btach = 8\n",
                &[],
                &["pl.toml:5: ", "unknown field `rollout_btach`"],
            ),
            (
                "[ppo.train]\nlr = \"fast\"\n",
                &[],
                &["pl.toml:2: ", "\"fast\""],
            ),
            (
                "[pretrain.train]\nsteps = 3\n[ppo.ppo]\nkl_coef = 0.1\nrollout_batch = 0\n",
                &[],
                &["pl.toml:5: [ppo] ppo.rollout_batch"],
            ),
            (
                "[ppo]\nppo.cliprange = -1.0\n",
                &[],
                &["pl.toml:2: [ppo] ppo.cliprange"],
            ),
            // The message's first key is a default; the line is the one of the key it names
            // that the file sets.
            (
                "[kto.kto]\nbeta = 1.0\n[kto.train]\nlr = 1e-4\nbatch_size = 1\n",
                &[Extra::Kto],
                &["pl.toml:5: [kto] ", "train.batch_size must be at least 2"],
            ),
            // Not selected, checked all the same; the variant's own table name.
            (
                "[rloo.grpo]\nbeta = -1.0\n",
                &[],
                &["pl.toml:2: [rloo] grpo.beta"],
            ),
            (
                "[ppo]\nstage = \"sft\"\n",
                &[],
                &["pl.toml:2: [ppo] stage = \"sft\""],
            ),
        ];
        for (body, with, want) in cases {
            let e = config_error(body, with);
            for w in want {
                assert!(e.contains(w), "{body:?}: {e}");
            }
        }
    }

    /// A path a later step's table sets that is not there is refused by its line before any
    /// step runs; one inside the pipeline's own directory is made by an earlier step.
    #[test]
    fn a_later_steps_missing_path_is_refused_before_any_step_runs() {
        // Under --out, only a step's own directory is made by the pipeline.
        let e = config_error("[ppo.data]\npath = \"unused/pretrian/x.jsonl\"\n", &[]);
        assert!(
            e.contains("pl.toml:2: ppo.data.path = unused/pretrian/x.jsonl"),
            "{e}"
        );
        let e = config_error(
            "[sft.train]\nsteps = 3\n[ppo.data]\npath = \"missing.jsonl\"\n",
            &[],
        );
        assert!(
            e.contains("pl.toml:4: ppo.data.path = missing.jsonl: no such file or directory"),
            "{e}"
        );
        let e = config_error(
            "[distill.distill]\nteacher = \"gone_run\"\n",
            &[Extra::Distill],
        );
        assert!(
            e.contains("pl.toml:2: distill.distill.teacher = gone_run"),
            "{e}"
        );
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("pl.toml");
        let made = d.path().join("pipe/ppo").display().to_string();
        let spelt = format!("{}/./pipe/../pipe/sft", d.path().display());
        std::fs::write(
            &path,
            format!("[dpo]\ninit = {made:?}\n[reward]\ninit = {spelt:?}\n"),
        )
        .unwrap();
        let mut opts = options(1.0);
        (opts.out, opts.config) = (d.path().join("pipe"), Some(path));
        check_config(&opts, &pipeline_steps(&[Extra::Dpo]).unwrap()).unwrap();
    }

    /// The steps on the built-in task share one task world: a table that sets its own is
    /// refused by its line, and one set alike in every step's table passes.
    #[test]
    fn a_steps_own_task_world_is_refused() {
        let e = config_error("[sft.data]\ntask_seed = 5\n", &[]);
        assert!(
            e.contains("pl.toml:2: [sft.data] task_seed: task_seed = 5, where the pretrain step's task has task_seed 0"),
            "{e}"
        );
        let e = config_error("[pretrain.data]\ntask_max_operand = 9\n", &[]);
        assert!(
            e.contains("pl.toml:2: [pretrain.data] task_max_operand: task_max_operand = 9, where the sft step's task has task_seed 0 and task_max_operand 19"),
            "{e}"
        );
        let all: String = ["pretrain", "sft", "reward", "ppo"]
            .iter()
            .map(|s| format!("[{s}.data]\ntask_seed = 5\n"))
            .collect();
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("pl.toml");
        std::fs::write(&path, all).unwrap();
        let mut opts = options(1.0);
        opts.config = Some(path);
        check_config(&opts, &pipeline_steps(&[]).unwrap()).unwrap();
    }

    /// A warmup a table chooses is kept (scaled as its steps are), not cut to half the steps
    /// as the default's is.
    #[test]
    fn a_tables_warmup_is_kept() {
        let user: toml::Value =
            toml::from_str("[pretrain.train]\nsteps = 20\nwarmup_steps = 15\n").unwrap();
        let step = Step::plain(Stage::Pretrain);
        let warmup = |scale| {
            let cfg = stage_config(step, &options(scale), Some(&user)).unwrap();
            (cfg.train.steps, cfg.train.warmup_steps)
        };
        assert_eq!(warmup(1.0), (20, 15));
        assert_eq!(warmup(0.5), (10, 8));
        let plain: toml::Value = toml::from_str("[pretrain.train]\nsteps = 20\n").unwrap();
        let cfg = stage_config(step, &options(1.0), Some(&plain)).unwrap();
        assert!(cfg.train.warmup_steps <= 10);
    }

    /// A stopped step resumes with its own config.toml, and the resume's --device and
    /// --kernels.
    #[test]
    fn a_resumed_step_takes_the_resumes_device_and_kernels() {
        let d = tempfile::tempdir().unwrap();
        RunConfig::for_stage(Stage::Sft).save(d.path()).unwrap();
        let step = Step::plain(Stage::Sft);
        let kept = resumed_config(step, d.path(), &options(1.0)).unwrap();
        assert_eq!(kept.kernels, RunConfig::for_stage(Stage::Sft).kernels);
        let mut opts = options(1.0);
        opts.device = Some(DeviceChoice::Cpu);
        opts.kernels = Some("attention=reference".into());
        let cfg = resumed_config(step, d.path(), &opts).unwrap();
        assert_eq!(
            (cfg.device, cfg.kernels.as_str()),
            (DeviceChoice::Cpu, "attention=reference")
        );
    }

    /// A resume refuses a config whose table changed for a step it keeps (finished, or stopped
    /// and continued), and takes it for a step not yet trained.
    #[test]
    fn a_changed_table_of_a_kept_step_refuses_the_resume() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("pipe");
        std::fs::create_dir_all(out.join("pretrain/final")).unwrap();
        std::fs::write(out.join("pretrain/final/meta.json"), "{}").unwrap();
        let path = d.path().join("pl.toml");
        std::fs::write(
            &path,
            "[pretrain.train]\nlr = 0.01\n[ppo.train]\nlr = 0.5\n",
        )
        .unwrap();
        let mut opts = options(1.0);
        (opts.out, opts.config, opts.resume) = (out, Some(path), true);
        let steps = pipeline_steps(&[]).unwrap();
        let table = |body: &str| step_tables(&steps, Some(&toml::from_str(body).unwrap())).unwrap();
        let mut summary = Summary::default();
        summary
            .results
            .insert("pretrain".into(), json!({"val_loss": 1.0}));
        summary.tables = Some(table(
            "[pretrain.train]\nlr = 0.02\n[ppo.train]\nlr = 0.5\n",
        ));
        let now = table("[pretrain.train]\nlr = 0.01\n[ppo.train]\nlr = 0.5\n");
        let e = format!(
            "{:#}",
            check_kept_tables(&opts, &steps, &summary, &now).unwrap_err()
        );
        assert!(
            e.contains("pl.toml:1: [pretrain] is not the table the pipeline ran its pretrain step with (changed: train.lr)"),
            "{e}"
        );
        summary.tables = Some(table("[pretrain.train]\nlr = 0.01\n"));
        check_kept_tables(&opts, &steps, &summary, &now).unwrap();
        // A pipeline begun before the tables were kept is not checked.
        summary.tables = None;
        check_kept_tables(&opts, &steps, &summary, &now).unwrap();
    }

    /// A packed SFT step whose rows are longer than the context of the model the pretrain
    /// step builds is refused by its line before any step trains.
    #[test]
    fn packed_sft_rows_longer_than_the_pretrained_context_are_refused() {
        let body =
            "[pretrain.model]\nmax_position_embeddings = 32\n[pretrain.train]\nseq_len = 32\n\
                    [sft.sft]\npacking = true\n[sft.train]\nseq_len = 64\n";
        let e = config_error(body, &[]);
        assert!(
            e.contains("pl.toml:8: [sft] packing: train.seq_len (64) exceeds the context of the model the pretrain step builds (max_position_embeddings = 32)"),
            "{e}"
        );
    }

    /// A good file is returned whole; a step's `stage` may be said where it is the step's.
    #[test]
    fn a_good_config_passes() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("pl.toml");
        let body = "[pretrain.train]\nsteps = 3\n[ppo]\nstage = \"ppo\"\nppo.kl_coef = 0.2\n\
                    [gspo.train]\nsteps = 2\n";
        std::fs::write(&path, body).unwrap();
        let mut opts = options(1.0);
        opts.config = Some(path);
        let steps = pipeline_steps(&[Extra::Gspo]).unwrap();
        let user = check_config(&opts, &steps).unwrap().unwrap();
        assert_eq!(user["ppo"]["ppo"]["kl_coef"].as_float(), Some(0.2));
        assert!(check_config(&options(1.0), &steps).unwrap().is_none());
    }

    /// A bad file stops the pipeline before its directory is made.
    #[test]
    fn a_bad_config_stops_the_pipeline_before_it_starts() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("pl.toml");
        std::fs::write(&path, "[ppo.ppo]\nrollout_btach = 8\n").unwrap();
        let mut opts = options(1.0);
        (opts.out, opts.config) = (d.path().join("pipe"), Some(path));
        let e = format!("{:#}", run(&opts).unwrap_err());
        assert!(
            e.contains("pl.toml:2: unknown field `rollout_btach`"),
            "{e}"
        );
        assert!(!opts.out.exists());
    }

    #[test]
    fn scale_must_be_a_positive_number() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = run(&options(bad)).unwrap_err().to_string();
            assert!(
                err.contains("--scale must be a positive number"),
                "{bad}: {err}"
            );
        }
        let err = run(&options(1e300)).unwrap_err().to_string();
        assert!(
            err.contains("--scale 1e300: ") && err.ends_with("more than a run can count"),
            "{err}"
        );
    }
}
