//! The one step loop every stage shares: micro-batches with gradient accumulation, global-norm
//! clipping, AdamW under the LR schedule, metrics, evaluation, checkpoints and resume. A stage
//! only says how to build a batch and compute its loss ([`Task`]).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::checkpoint::{write_atomic, CheckpointMeta, Checkpoints};
use super::loss::scalar;
use super::metrics::MetricsLog;
use super::optimizer::AdamW;
use super::params::ParamStore;
use super::progress::Progress;
use super::schedule::lr_at;
use crate::config::TrainConfig;
use crate::data::tokenizer::Tokenizer;

pub struct StepOut {
    pub loss: Tensor,
    /// Tokens processed by this micro-batch (for tokens/s).
    pub tokens: usize,
    /// Extra per-step numbers to log (averaged over micro-batches).
    pub metrics: Vec<(String, f64)>,
}

pub trait Task {
    /// The loss of the next micro-batch of optimizer step `step` (0-based).
    fn micro_batch(&mut self, step: usize) -> Result<StepOut>;
    /// Held-out metrics; the first entry should be `loss` where a loss is defined.
    fn evaluate(&mut self) -> Result<Vec<(String, f64)>>;
    /// Everything needed to continue exactly: data position, RNG state.
    fn state(&self) -> serde_json::Value;
    fn restore(&mut self, state: &serde_json::Value) -> Result<()>;
    /// Multiplier of the scheduled learning rate for parameter `name` (PPO's critic learns
    /// faster than its policy).
    fn lr_scale(&self, _name: &str) -> f64 {
        1.0
    }
}

/// The model a checkpoint holds: which parameters, and what to call it.
pub struct Saved<'a> {
    pub store: &'a ParamStore,
    pub meta: CheckpointMeta,
    pub tokenizer: &'a Tokenizer,
}

pub fn is_adapter(name: &str) -> bool {
    name.contains(".lora_")
}

impl Saved<'_> {
    /// Weights (adapters in their own file), meta.json and the tokenizer.
    pub fn write_model(&self, dir: &Path, step: usize) -> Result<()> {
        self.store
            .save(&dir.join("model.safetensors"), |n| !is_adapter(n))?;
        if self.store.names().any(|n| is_adapter(n)) {
            self.store
                .save(&dir.join("adapter.safetensors"), is_adapter)?;
        }
        let mut meta = self.meta.clone();
        meta.step = step;
        meta.write(dir)?;
        self.tokenizer.save_dir(dir)
    }

    /// Writes `run_dir/final` atomically (complete or absent).
    pub fn write_final(&self, run_dir: &Path, step: usize) -> Result<()> {
        let fin = run_dir.join("final");
        let tmp = run_dir.join("final.partial");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        self.write_model(&tmp, step)?;
        if fin.exists() {
            std::fs::remove_dir_all(&fin)?;
        }
        std::fs::rename(&tmp, &fin).with_context(|| format!("{}: cannot write", fin.display()))?;
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct LoopState {
    step: usize,
    adam_t: usize,
    task: serde_json::Value,
}

#[derive(Clone, Debug, Default)]
pub struct TrainSummary {
    pub steps: usize,
    pub last_train_loss: f64,
    pub first_eval: Vec<(String, f64)>,
    pub last_eval: Vec<(String, f64)>,
}

pub struct RunOpts<'a> {
    pub cfg: &'a TrainConfig,
    pub run_dir: &'a Path,
    pub resume: bool,
    pub label: &'a str,
    /// Evaluate before the first step too (a baseline for the curve).
    pub eval_at_start: bool,
}

pub fn train(
    task: &mut dyn Task,
    saved: &Saved,
    trainable: &dyn Fn(&str) -> bool,
    opts: &RunOpts,
) -> Result<TrainSummary> {
    let cfg = opts.cfg;
    let mut opt = AdamW::new(saved.store, trainable, cfg)?;
    opt.scale_lr(&|n| task.lr_scale(n));
    let ckpts = Checkpoints::new(opts.run_dir, cfg.keep_checkpoints)?;
    let mut start = 0;
    if opts.resume {
        if let Some(dir) = Checkpoints::latest(opts.run_dir)? {
            saved
                .store
                .load(&dir.join("model.safetensors"), |n| !is_adapter(n), true)?;
            if dir.join("adapter.safetensors").exists() {
                saved
                    .store
                    .load(&dir.join("adapter.safetensors"), is_adapter, true)?;
            }
            let text = std::fs::read_to_string(dir.join("state.json"))
                .with_context(|| format!("{}: state.json missing", dir.display()))?;
            let st: LoopState = serde_json::from_str(&text)
                .with_context(|| format!("{}/state.json: malformed", dir.display()))?;
            opt.load(&dir.join("optimizer.safetensors"), st.adam_t)?;
            task.restore(&st.task)?;
            start = st.step;
            eprintln!(
                "[{}] resumed from {} at step {start}",
                opts.label,
                dir.display()
            );
        } else {
            eprintln!(
                "[{}] nothing to resume in {}; starting fresh",
                opts.label,
                opts.run_dir.display()
            );
        }
    }
    let mut metrics = MetricsLog::open(opts.run_dir, opts.resume.then_some(start))?;
    let mut summary = TrainSummary::default();
    eprintln!(
        "[{}] {} trainable parameters, steps {}..{}",
        opts.label,
        opt.num_params(),
        start,
        cfg.steps
    );
    if opts.eval_at_start && start == 0 {
        let ev = task.evaluate()?;
        metrics.log(0, "val", &ev)?;
        eprintln!("[{}] step 0 val {}", opts.label, fmt_metrics(&ev));
        summary.first_eval = ev;
    }
    let progress = Progress::new(opts.label, start, cfg.steps);
    let mut window_tokens = 0usize;
    let mut window_start = Instant::now();
    // Extra numbers are averaged over the logging window, each over the steps that reported
    // it (a PPO rollout's statistics appear once per rollout).
    let mut window_extras: Vec<(String, f64, usize)> = Vec::new();
    for step in start..cfg.steps {
        let lr = lr_at(cfg, step);
        let mut acc: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0.0;
        let mut extras: Vec<(String, f64)> = Vec::new();
        for _ in 0..cfg.grad_accum {
            let out = task.micro_batch(step)?;
            let l = scalar(&out.loss)?;
            if !l.is_finite() {
                bail!(
                    "[{}] loss is {l} at step {step}; stopping (the last good checkpoint is in {})",
                    opts.label,
                    ckpts.dir.display()
                );
            }
            loss_sum += l;
            window_tokens += out.tokens;
            let grads = (out.loss / cfg.grad_accum as f64)?.backward()?;
            let g = opt.collect(&grads)?;
            acc = Some(match acc {
                None => g,
                Some(a) => a
                    .iter()
                    .zip(&g)
                    .map(|(x, y)| x + y)
                    .collect::<candle_core::Result<_>>()?,
            });
            for (k, v) in out.metrics {
                match extras.iter_mut().find(|(n, _)| *n == k) {
                    Some((_, s)) => *s += v / cfg.grad_accum as f64,
                    None => extras.push((k, v / cfg.grad_accum as f64)),
                }
            }
        }
        for (k, v) in extras {
            match window_extras.iter_mut().find(|(n, _, _)| *n == k) {
                Some((_, s, c)) => {
                    *s += v;
                    *c += 1;
                }
                None => window_extras.push((k, v, 1)),
            }
        }
        let mut grads = acc.expect("grad_accum >= 1");
        let norm = AdamW::clip(&mut grads, cfg.grad_clip)?;
        opt.step(&grads, lr)?;
        let s = step + 1;
        let loss = loss_sum / cfg.grad_accum as f64;
        summary.last_train_loss = loss;
        if s % cfg.log_every == 0 || s == cfg.steps {
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            let tps = window_tokens as f64 / secs;
            let mut fields = vec![
                ("loss".to_string(), loss),
                ("lr".to_string(), lr),
                ("grad_norm".to_string(), norm),
                ("tokens_per_s".to_string(), tps),
            ];
            fields.extend(window_extras.drain(..).map(|(k, s, c)| (k, s / c as f64)));
            metrics.log(s, "train", &fields)?;
            progress.update(s, &format!("loss {loss:.4} lr {lr:.2e} {:.0} tok/s", tps));
            window_tokens = 0;
            window_start = Instant::now();
        }
        if s % cfg.eval_every == 0 || s == cfg.steps {
            let ev = task.evaluate()?;
            metrics.log(s, "val", &ev)?;
            progress.println(&format!(
                "[{}] step {s} val {}",
                opts.label,
                fmt_metrics(&ev)
            ));
            summary.last_eval = ev;
        }
        if s % cfg.checkpoint_every == 0 || s == cfg.steps {
            ckpts.save(s, |dir| {
                saved.write_model(dir, s)?;
                opt.save(&dir.join("optimizer.safetensors"))?;
                let st = LoopState {
                    step: s,
                    adam_t: opt.t,
                    task: task.state(),
                };
                write_atomic(
                    &dir.join("state.json"),
                    serde_json::to_string(&st)?.as_bytes(),
                )
            })?;
        }
    }
    progress.finish();
    saved.write_final(opts.run_dir, cfg.steps)?;
    summary.steps = cfg.steps;
    Ok(summary)
}

pub fn fmt_metrics(m: &[(String, f64)]) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn get(m: &[(String, f64)], key: &str) -> Option<f64> {
    m.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
}
