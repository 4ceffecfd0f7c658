//! `temper pipeline`: pretrain -> sft -> reward -> ppo (and optionally dpo, grpo, each from
//! the SFT model) on the built-in task, one subdirectory per stage, ending with a table of
//! what each stage achieved on held-out data, also written to `summary.json`.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use super::{Env, RunConfig};
use crate::cli::PipelineArgs;

/// One stage's configuration inside the pipeline: its defaults, the pipeline's choices, then
/// the user's `[stage]` table from `--config`.
fn stage_config(
    stage: &str,
    args: &PipelineArgs,
    dir: &Path,
    user: Option<&toml::Value>,
) -> Result<RunConfig> {
    let mut cfg = RunConfig::for_stage(stage);
    if let Some(d) = &args.device {
        cfg.device = d.clone();
    }
    if let Some(k) = &args.kernels {
        cfg.kernels = k.clone();
    }
    cfg.train.seed = args.seed.wrapping_mul(1000).wrapping_add(cfg.train.seed);
    cfg.data.task_seed = args.seed;
    match stage {
        "pretrain" => {}
        "sft" => {
            cfg.init = Some(dir.join("pretrain"));
        }
        "reward" => cfg.init = Some(dir.join("sft")),
        "ppo" => {
            cfg.init = Some(dir.join("sft"));
            cfg.ppo.value_init = Some(dir.join("reward"));
        }
        "dpo" | "grpo" => cfg.init = Some(dir.join("sft")),
        _ => bail!("unknown pipeline stage {stage}"),
    }
    if let Some(table) = user.and_then(|u| u.get(stage)) {
        let mut base = toml::Value::try_from(&cfg)?;
        super::overlay(&mut base, table.clone());
        cfg = base
            .try_into()
            .with_context(|| format!("pipeline config: invalid [{stage}] table"))?;
    }
    let scaled = ((cfg.train.steps as f64) * args.scale).round().max(1.0) as usize;
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

pub fn run(args: &PipelineArgs) -> Result<()> {
    for s in &args.with {
        if s != "dpo" && s != "grpo" {
            bail!("--with: unknown stage `{s}` (dpo, grpo)");
        }
    }
    let user: Option<toml::Value> = match &args.config {
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
    let dir = &args.out;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut summary = Map::new();
    let mut seconds = Map::new();
    let started = Instant::now();
    let mut stages = vec!["pretrain", "sft", "reward", "ppo"];
    stages.extend(args.with.iter().map(String::as_str));
    for &stage in &stages {
        let t0 = Instant::now();
        let cfg = stage_config(stage, args, dir, user.as_ref())?;
        let env = Env::prepare(cfg, &dir.join(stage), false)?;
        let entry = match stage {
            "pretrain" => {
                let r = super::pretrain::run(&env)?;
                json!({"val_loss": num(r.val_loss), "first_val_loss": num(r.first_val_loss.unwrap_or(f64::NAN)),
                       "train_loss": num(r.train_loss)})
            }
            "sft" => {
                let r = super::sft::run(&env)?;
                json!({"accuracy": num(r.accuracy.unwrap_or(f64::NAN)),
                       "base_accuracy": num(r.base_accuracy.unwrap_or(f64::NAN)),
                       "eval_loss": num(r.eval_loss)})
            }
            "reward" => {
                let r = super::reward::run(&env)?;
                json!({"accuracy": num(r.accuracy), "initial_accuracy": num(r.first_accuracy.unwrap_or(f64::NAN))})
            }
            "ppo" | "grpo" => {
                let r = if stage == "ppo" {
                    super::ppo::run(&env)?
                } else {
                    super::grpo::run(&env)?
                };
                json!({"accuracy": num(r.accuracy), "sft_accuracy": num(r.start_accuracy),
                       "mean_reward": num(r.mean_reward), "sft_mean_reward": num(r.start_mean_reward),
                       "kl": num(r.kl)})
            }
            _ => {
                let r = super::dpo::run(&env)?;
                json!({"accuracy": num(r.accuracy), "sft_accuracy": num(r.start_accuracy),
                       "preference_accuracy": num(r.mean_reward),
                       "sft_preference_accuracy": num(r.start_mean_reward)})
            }
        };
        summary.insert(stage.to_string(), entry);
        seconds.insert(stage.to_string(), json!(t0.elapsed().as_secs_f64()));
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
    crate::train::checkpoint::write_atomic(
        &dir.join("summary.json"),
        serde_json::to_string_pretty(&Value::Object(all))?.as_bytes(),
    )
}

fn print_table(stages: &[&str], summary: &Map<String, Value>) {
    let f = |v: Option<&Value>| {
        v.and_then(Value::as_f64)
            .map_or("-".to_string(), |x| format!("{x:.3}"))
    };
    println!("{:<9} {:<28} compared with", "stage", "held-out result");
    for &stage in stages {
        let v = &summary[stage];
        let (what, base) = match stage {
            "pretrain" => (
                format!("val loss {}", f(v.get("val_loss"))),
                format!("initial val loss {}", f(v.get("first_val_loss"))),
            ),
            "sft" => (
                format!("accuracy {}", f(v.get("accuracy"))),
                format!("base model {}", f(v.get("base_accuracy"))),
            ),
            "reward" => (
                format!("pairwise accuracy {}", f(v.get("accuracy"))),
                format!("untrained head {}", f(v.get("initial_accuracy"))),
            ),
            "dpo" => (
                format!("accuracy {}", f(v.get("accuracy"))),
                format!("sft {}", f(v.get("sft_accuracy"))),
            ),
            _ => (
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
