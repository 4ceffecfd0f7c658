//! `temper pipeline`: pretrain -> sft -> reward -> ppo (and optionally dpo, grpo, each from
//! the SFT model) on the built-in task, one subdirectory per stage, ending with a table of
//! what each stage achieved on held-out data, also written to `summary.json`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use super::Env;
use crate::config::{overlay, DeviceChoice, RunConfig, Stage};

/// What the pipeline is asked to do.
pub struct PipelineOptions {
    pub out: PathBuf,
    /// Extra stages after PPO, each from the SFT model: dpo, grpo.
    pub with: Vec<Stage>,
    pub device: Option<DeviceChoice>,
    pub kernels: Option<String>,
    pub seed: u64,
    /// Multiplies every stage's step count (0.25 for a quick smoke run).
    pub scale: f64,
    /// TOML with per-stage tables: `[pretrain.train]`, `[sft.lora]`, `[ppo.ppo]`, ...
    pub config: Option<PathBuf>,
}

/// One stage's configuration inside the pipeline: its defaults, the pipeline's choices, then
/// the user's `[stage]` table from `--config`.
fn stage_config(
    stage: Stage,
    opts: &PipelineOptions,
    user: Option<&toml::Value>,
) -> Result<RunConfig> {
    let dir = &opts.out;
    let mut cfg = RunConfig::for_stage(stage);
    if let Some(d) = opts.device {
        cfg.device = d;
    }
    if let Some(k) = &opts.kernels {
        cfg.kernels = k.clone();
    }
    cfg.train.seed = opts.seed.wrapping_mul(1000).wrapping_add(cfg.train.seed);
    cfg.data.task_seed = opts.seed;
    match stage {
        Stage::Pretrain => {}
        Stage::Sft => cfg.init = Some(dir.join("pretrain")),
        Stage::Reward | Stage::Dpo | Stage::Grpo => cfg.init = Some(dir.join("sft")),
        Stage::Ppo => {
            cfg.init = Some(dir.join("sft"));
            cfg.ppo.value_init = Some(dir.join("reward"));
        }
    }
    if let Some(table) = user.and_then(|u| u.get(stage.name())) {
        let mut base = toml::Value::try_from(&cfg)?;
        overlay(&mut base, table.clone());
        cfg = base
            .try_into()
            .with_context(|| format!("pipeline config: invalid [{stage}] table"))?;
    }
    let scaled = ((cfg.train.steps as f64) * opts.scale).round().max(1.0) as usize;
    cfg.train.steps = scaled;
    cfg.train.eval_every = cfg.train.eval_every.min(scaled);
    cfg.train.checkpoint_every = cfg.train.checkpoint_every.min(scaled);
    cfg.train.warmup_steps = cfg.train.warmup_steps.min(scaled / 2);
    Ok(cfg)
}

fn num(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

/// Runs one stage and returns its `summary.json` entry.
fn run_stage(stage: Stage, env: &Env) -> Result<Value> {
    let nan = f64::NAN;
    Ok(match stage {
        Stage::Pretrain => {
            let r = super::pretrain::run(env)?;
            json!({"val_loss": num(r.val_loss), "first_val_loss": num(r.first_val_loss.unwrap_or(nan)),
                   "train_loss": num(r.train_loss)})
        }
        Stage::Sft => {
            let r = super::sft::run(env)?;
            json!({"accuracy": num(r.accuracy.unwrap_or(nan)),
                   "base_accuracy": num(r.base_accuracy.unwrap_or(nan)),
                   "eval_loss": num(r.eval_loss)})
        }
        Stage::Reward => {
            let r = super::reward::run(env)?;
            json!({"accuracy": num(r.accuracy), "initial_accuracy": num(r.first_accuracy.unwrap_or(nan))})
        }
        Stage::Ppo | Stage::Grpo => {
            let r = if stage == Stage::Ppo {
                super::ppo::run(env)?
            } else {
                super::grpo::run(env)?
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
    })
}

pub fn run(opts: &PipelineOptions) -> Result<()> {
    for s in &opts.with {
        if !matches!(s, Stage::Dpo | Stage::Grpo) {
            bail!("--with: `{s}` is not an extra stage (dpo, grpo)");
        }
    }
    let user: Option<toml::Value> = match &opts.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("{}: cannot read", p.display()))?;
            Some(
                toml::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {}", p.display(), e.message()))?,
            )
        }
        None => None,
    };
    let dir = &opts.out;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut summary = Map::new();
    let mut seconds = Map::new();
    let started = Instant::now();
    let mut stages = vec![Stage::Pretrain, Stage::Sft, Stage::Reward, Stage::Ppo];
    stages.extend(opts.with.iter().copied());
    for &stage in &stages {
        let t0 = Instant::now();
        let cfg = stage_config(stage, opts, user.as_ref())?;
        let env = Env::prepare(cfg, &dir.join(stage.name()), false)?;
        summary.insert(stage.name().to_string(), run_stage(stage, &env)?);
        seconds.insert(stage.name().to_string(), json!(t0.elapsed().as_secs_f64()));
        write_summary(dir, &summary, &seconds)?;
    }
    seconds.insert("total".into(), json!(started.elapsed().as_secs_f64()));
    write_summary(dir, &summary, &seconds)?;
    print_table(&stages, &summary);
    println!("summary: {}", dir.join("summary.json").display());
    Ok(())
}

fn write_summary(
    dir: &Path,
    summary: &Map<String, Value>,
    seconds: &Map<String, Value>,
) -> Result<()> {
    let mut all = summary.clone();
    all.insert("seconds".into(), Value::Object(seconds.clone()));
    crate::io::write_atomic(
        &dir.join("summary.json"),
        serde_json::to_string_pretty(&Value::Object(all))?.as_bytes(),
    )
}

fn print_table(stages: &[Stage], summary: &Map<String, Value>) {
    let f = |v: Option<&Value>| {
        v.and_then(Value::as_f64)
            .map_or("-".to_string(), |x| format!("{x:.3}"))
    };
    println!("{:<9} {:<28} compared with", "stage", "held-out result");
    for &stage in stages {
        let v = &summary[stage.name()];
        let (what, base) = match stage {
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
            Stage::Dpo => (
                format!("accuracy {}", f(v.get("accuracy"))),
                format!("sft {}", f(v.get("sft_accuracy"))),
            ),
            Stage::Ppo | Stage::Grpo => (
                format!("accuracy {}", f(v.get("accuracy"))),
                format!(
                    "sft {}, reward {} (sft {}), KL {}",
                    f(v.get("sft_accuracy")),
                    f(v.get("mean_reward")),
                    f(v.get("sft_mean_reward")),
                    f(v.get("kl"))
                ),
            ),
        };
        println!("{stage:<9} {what:<28} {base}");
    }
}
