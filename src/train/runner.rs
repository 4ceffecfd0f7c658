//! The one step loop every stage shares: micro-batches with gradient accumulation, global-norm
//! clipping, AdamW under the LR schedule, metrics, evaluation, checkpoints and resume. A stage
//! only says how to build a batch and compute its loss ([`Task`]).

use std::borrow::Borrow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::checkpoint::{
    damage, missing_latest, set_aside, step_of, CheckpointMeta, Checkpoints, ReadFor,
};
use super::loss::scalar;
use super::metrics::MetricsLog;
use super::optimizer::AdamW;
use super::params::{ParamInfo, ParamStore, Role};
use super::profile::{Mark, Profiler, Region, WARMUP_STEPS};
use super::progress::Progress;
use super::schedule::{lr_at, warmup_cut};
use crate::config::TrainConfig;
use crate::data::tokenizer::Tokenizer;
use crate::dist::preempt::{self, Preempted, StopPoint};
use crate::dist::Communicator;
use crate::io::{write_atomic, write_dir_atomic};
use crate::kernels::KernelChoice;

pub struct StepOut {
    pub loss: Tensor,
    /// Tokens processed by this micro-batch (for tokens/s).
    pub tokens: usize,
    /// Extra numbers to log, each averaged over the micro-batches that reported it.
    pub metrics: Vec<(&'static str, f64)>,
}

/// A stage's held-out evaluation: typed for the stage that reads it, flattened for the log.
pub trait Report: Clone + Serialize + serde::de::DeserializeOwned {
    /// Name and value of every number, for `metrics.jsonl` (`loss` first where there is one).
    fn fields(&self) -> Vec<(&'static str, f64)>;
}

pub trait Task {
    type Eval: Report;
    /// The loss of the next micro-batch of optimizer step `step` (0-based).
    fn micro_batch(&mut self, step: usize) -> Result<StepOut>;
    fn evaluate(&mut self) -> Result<Self::Eval>;
    /// Everything needed to continue exactly: data position, RNG state.
    fn state(&self) -> serde_json::Value;
    fn restore(&mut self, state: &serde_json::Value) -> Result<()>;
    /// Multiplier of the scheduled learning rate for a parameter (PPO's critic learns faster
    /// than its policy).
    fn lr_scale(&self, _param: ParamInfo) -> f64 {
        1.0
    }

    /// Called on every rank before each checkpoint, which rank 0 alone writes: a collective
    /// where a task's state lies on every rank (PPO's and GRPO's shares of a rollout still
    /// being trained on, gathered for [`Task::write_files`]).
    fn before_checkpoint(&mut self) -> Result<()> {
        Ok(())
    }

    /// The items one pass over the training set draws (examples, pairs, windows), for
    /// `[train] epochs`; `None` for a stage whose length is `train.steps` alone.
    fn epoch_items(&self) -> Option<usize> {
        None
    }

    /// What one micro-batch draws on each rank, for the lines that give a data-parallel
    /// run's global batch: `[train] batch_size` items unless the stage's own setting says.
    fn micro_batch_size(&self, cfg: &TrainConfig) -> MicroBatch {
        MicroBatch {
            key: "--batch-size",
            size: cfg.batch_size,
        }
    }
    /// The metrics a train line on the terminal shows after its loss, where a step logs them
    /// (all go to metrics.jsonl): an RL stage's reward and KL, which a TRL user watches.
    fn shown_metrics(&self) -> &'static [&'static str] {
        &[]
    }
    /// Called once optimizer step `done` (1-based) has updated the weights on every rank,
    /// before that step's evaluation and checkpoint (TR-DPO moves DPO's and GRPO's reference
    /// here; GRPO's adaptive entropy control takes the step's entropy).
    fn after_step(&mut self, _done: usize) -> Result<()> {
        Ok(())
    }

    /// Writes what the task keeps in checkpoint `dir` beside the model, the optimizer and
    /// [`Task::state`]: weights of its own (DPO's or GRPO's reference, which TR-DPO moves).
    fn write_files(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }

    /// Reads back what [`Task::write_files`] wrote to checkpoint `dir`, before
    /// [`Task::restore`].
    fn read_files(&mut self, _dir: &Path) -> Result<()> {
        Ok(())
    }
}

/// A stage's per-rank micro-batch: the setting that sizes it, and its size.
#[derive(Clone, Copy, Debug)]
pub struct MicroBatch {
    pub key: &'static str,
    pub size: usize,
}

/// The model a checkpoint holds: which parameters, and what to call it.
pub struct Saved<'a> {
    pub store: &'a ParamStore,
    pub meta: CheckpointMeta,
    pub tokenizer: &'a Tokenizer,
}

fn is_adapter(p: ParamInfo) -> bool {
    p.role == Role::Adapter
}

impl Saved<'_> {
    /// Weights (adapters in their own file), meta.json and the tokenizer.
    pub fn write_model(&self, dir: &Path, step: usize) -> Result<()> {
        self.store
            .save(&dir.join("model.safetensors"), |p| !is_adapter(p))?;
        if self.store.has_adapters() {
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
        write_dir_atomic(&run_dir.join("final"), |dir| self.write_model(dir, step))
    }

    /// Restores weights from checkpoint `dir` (adapters from their own file).
    fn load_model(&self, dir: &Path, run_dir: &Path) -> Result<()> {
        self.check_adapters(dir, run_dir)?;
        self.store
            .load(&dir.join("model.safetensors"), |p| !is_adapter(p), true)?;
        if dir.join("adapter.safetensors").exists() {
            self.store
                .load(&dir.join("adapter.safetensors"), is_adapter, true)?;
        }
        Ok(())
    }
}

impl Saved<'_> {
    /// The adapters checkpoint `dir` holds are the ones this run would make: a `config.toml`
    /// (in `run_dir`) edited since (another alpha, rsLoRA or DoRA) would train them at another
    /// scale, or leave DoRA's magnitudes unread. The first field that differs is named at its
    /// line. A checkpoint whose meta.json does not read is left to the damage checks.
    fn check_adapters(&self, dir: &Path, run_dir: &Path) -> Result<()> {
        let Ok(held) = CheckpointMeta::read(dir) else {
            return Ok(());
        };
        let fields = |l: Option<&crate::config::LoraConfig>| -> [(&str, String); 5] {
            let none = crate::config::LoraConfig {
                rank: 0,
                ..Default::default()
            };
            let l = l.filter(|l| l.enabled()).unwrap_or(&none);
            let mut targets: Vec<String> = l
                .targets
                .iter()
                .map(|t| format!("{t:?}").to_lowercase())
                .collect();
            targets.sort();
            [
                ("rank", l.rank.to_string()),
                ("alpha", l.alpha.to_string()),
                ("targets", targets.join(",")),
                ("use_rslora", l.use_rslora.to_string()),
                ("use_dora", l.use_dora.to_string()),
            ]
        };
        let (theirs, ours) = (fields(held.lora.as_ref()), fields(self.meta.lora.as_ref()));
        let Some(((key, was), (_, now))) = theirs.iter().zip(&ours).find(|(t, o)| t.1 != o.1)
        else {
            return Ok(());
        };
        let toml = run_dir.join("config.toml");
        let line = std::fs::read_to_string(&toml)
            .ok()
            .and_then(|text| crate::config::key_line(&text, &["lora", key], false))
            .map_or(String::new(), |n| format!(":{n}"));
        bail!(
            "{}{line}: lora.{key} = {now}: the checkpoint's adapters ({}) were trained with \
             {was}; a resume trains the adapters its checkpoint holds (put it back)",
            toml.display(),
            dir.join("meta.json").display()
        )
    }
}

#[derive(Serialize, Deserialize)]
struct LoopState {
    step: usize,
    adam_t: usize,
    task: serde_json::Value,
    /// The logging window the checkpoint fell inside (absent from checkpoints before it was
    /// kept: their resumes average from the restart).
    #[serde(default)]
    window: Window,
    /// The evaluation before the first step, for the summary's "from" of a resumed run.
    #[serde(default)]
    first_eval: Option<serde_json::Value>,
    /// The latest evaluation and train loss, for the summary of a run resumed at its last
    /// step (stopped after its last checkpoint, before its final model).
    #[serde(default)]
    last_eval: Option<serde_json::Value>,
    #[serde(default)]
    last_train_loss: Option<f64>,
    /// The ranks the run trained on (absent from checkpoints before it was kept): batch
    /// settings are per rank, so a resume on another number changes each step's global batch.
    #[serde(default)]
    world: Option<usize>,
    /// Sequences each rank put into one optimizer step (micro-batch x accumulation), beside
    /// `world`: a resume that also changes `--batch-size` or `--grad-accum` compares its global
    /// batch with the one trained on, not with its own settings on the old ranks.
    #[serde(default)]
    rank_batch: Option<usize>,
}

/// The train loss and extra metrics summed since the last log, each with its count: a log
/// line averages over its window, as the Hugging Face Trainer's loss does. Kept in the
/// checkpoint, so that a run resumed between two logs averages over the same steps as one
/// never stopped.
#[derive(Clone, Default, Serialize, Deserialize)]
struct Window {
    loss: f64,
    steps: usize,
    metrics: Averages<String>,
}

impl Window {
    /// A non-finite metric is left out of its mean (the log writes it as null, and the
    /// checkpoint's JSON could not read it back); the loss is finite, or the step stopped.
    fn add(&mut self, out: &Stepped) {
        self.loss += out.loss;
        self.steps += 1;
        for (key, v) in out.extras.iter().filter(|(_, v)| v.is_finite()) {
            self.metrics.add(*key, *v);
        }
    }

    /// The window's mean loss and metric means, and a fresh window.
    fn drain(&mut self) -> (f64, Vec<(String, f64)>) {
        let mut w = std::mem::take(self);
        (w.loss / w.steps.max(1) as f64, w.metrics.drain())
    }
}

#[derive(Clone, Debug)]
pub struct TrainSummary<E> {
    pub steps: usize,
    /// The loss of the last train line logged (its window's mean); None where no step ran (a
    /// resumed run that had finished).
    pub last_train_loss: Option<f64>,
    /// The evaluation before the first step (with `eval_at_start`; a resumed run's from its
    /// checkpoint).
    pub first_eval: Option<E>,
    pub last_eval: Option<E>,
}

pub struct RunOpts<'a> {
    pub cfg: &'a TrainConfig,
    /// The data-parallel group: gradients, losses and metrics are averaged over it, and only
    /// its rank 0 writes logs and checkpoints.
    pub comm: &'a dyn Communicator,
    pub run_dir: &'a Path,
    pub resume: bool,
    /// What a resumed run writes over the run directory's `config.toml` and `run.json` once
    /// its checkpoint has been restored (rank 0 only): a resume refused for a setting the
    /// checkpoint cannot continue under leaves the run's own files in place.
    pub on_resumed: Option<&'a dyn Fn() -> Result<()>>,
    /// Called after each checkpoint and the final model are written (rank 0): what stood in
    /// the run directory before an `--overwrite` can go.
    pub on_checkpoint: Option<&'a dyn Fn() -> Result<()>>,
    pub label: &'a str,
    /// Evaluate before the first step too (a baseline for the curve).
    pub eval_at_start: bool,
    /// The optimizer step's implementation (`--kernels adamw=...`).
    pub optimizer: KernelChoice,
}

/// Sums of the extra metrics over one step's micro-batches or one logging window, each with
/// the number of reports, so that a number reported once (a PPO rollout's statistics) is not
/// diluted by the micro-batches that did not report it.
/// Keyed by `&'static str` within a step, by `String` in a [`Window`], which a checkpoint
/// writes and reads back.
#[derive(Clone, Default, Serialize, Deserialize)]
struct Averages<K>(Vec<(K, f64, usize)>);

impl<K> Averages<K> {
    /// Compares by `Q` and makes a key only for a metric not seen before: a [`Window`] takes
    /// the same names at every step.
    fn add<Q>(&mut self, key: &Q, v: f64)
    where
        K: Borrow<Q>,
        Q: PartialEq + ToOwned<Owned = K> + ?Sized,
    {
        match self.0.iter_mut().find(|(k, _, _)| k.borrow() == key) {
            Some((_, s, c)) => {
                *s += v;
                *c += 1;
            }
            None => self.0.push((key.to_owned(), v, 1)),
        }
    }

    fn drain(&mut self) -> Vec<(K, f64)> {
        self.0
            .drain(..)
            .map(|(k, s, c)| (k, s / c as f64))
            .collect()
    }
}

/// One optimizer step's outcome.
struct Stepped {
    loss: f64,
    grad_norm: f64,
    tokens: usize,
    extras: Vec<(&'static str, f64)>,
}

/// Everything the loop carries between steps.
struct Loop<'a, T: Task> {
    task: &'a mut T,
    saved: &'a Saved<'a>,
    opts: &'a RunOpts<'a>,
    opt: AdamW,
    ckpts: Checkpoints,
    /// Rank 0's log; none on the other ranks.
    metrics: Option<MetricsLog>,
    /// `--profile`: region times of the steps after the warm-up.
    prof: Option<Profiler>,
    prof_tokens: usize,
    window: Window,
    first_eval: Option<T::Eval>,
    /// The latest evaluation and train loss: the summary's, and the checkpoint's for a run
    /// resumed at its last step.
    last_eval: Option<T::Eval>,
    last_train_loss: Option<f64>,
}

pub fn train<T: Task>(
    task: &mut T,
    saved: &Saved,
    trainable: &dyn Fn(ParamInfo) -> bool,
    opts: &RunOpts,
) -> Result<TrainSummary<T::Eval>> {
    let cfg = opts.cfg;
    let mut opt = AdamW::new(saved.store, trainable, cfg)?;
    opt.scale_lr(&|p| task.lr_scale(p));
    let world = opts.comm.world();
    if cfg.shard_optimizer.enabled(world) {
        opt.shard(opts.comm.rank(), world);
    }
    let ckpts = Checkpoints::new(opts.run_dir, cfg.keep_checkpoints)?;
    let resumed = match opts.resume {
        true => resume(task, saved, &mut opt, &ckpts, opts)?,
        false => None,
    };
    let start = resumed.as_ref().map_or(0, |st| st.step);
    // After the resume, which rewrites the masters the copies start from.
    if cfg.compute_copies {
        opt.keep_compute_copies(crate::device::compute_dtype(cfg.dtype, &saved.store.device))?;
    }
    let main = opts.comm.rank() == 0;
    let batch = task.micro_batch_size(cfg);
    if main && opts.resume && resumed.is_none() {
        // Nothing to resume: the run starts over, and its step-0 evaluation would be logged
        // a second time.
        for log in ["metrics.jsonl", super::tensorboard::DIR] {
            crate::io::remove_any(&opts.run_dir.join(log))
                .with_context(|| format!("{log}: cannot remove before starting over"))?;
        }
    }
    let metrics = match main {
        true => Some(MetricsLog::open(
            opts.run_dir,
            resumed.is_some().then_some(start),
            cfg.report_to,
        )?),
        false => None,
    };
    if main {
        errln!(
            "[{}] {} trainable parameters, steps {}..{}{}",
            opts.label,
            opt.num_params(),
            start,
            cfg.steps,
            match world {
                1 => String::new(),
                n => format!(
                    ", data parallel over {n} ranks (global batch {} = {} per rank x {} accumulated x {n}){}",
                    batch.size * cfg.grad_accum * n,
                    batch.size,
                    cfg.grad_accum,
                    match opt.sharded() {
                        true => format!(
                            ", AdamW state sharded: {} parameters' moments on rank 0",
                            opt.owned_params()
                        ),
                        false => String::new(),
                    }
                ),
            }
        );
    }
    if let Some(cut) = warmup_cut(cfg).filter(|_| main) {
        errln!("warning: [{}] {cut}", opts.label);
    }
    let prof = (cfg.profile > 0).then(|| Profiler::new(&saved.store.device));
    let (window, first_eval, last) = match resumed {
        Some(st) => {
            // A baseline that does not read back (a non-finite number, written as null) only
            // costs the summary its "from".
            let first = st.first_eval.and_then(|v| serde_json::from_value(v).ok());
            let last_eval = st.last_eval.and_then(|v| serde_json::from_value(v).ok());
            (st.window, first, (last_eval, st.last_train_loss))
        }
        None => Default::default(),
    };
    let mut lp = Loop {
        task,
        saved,
        opts,
        opt,
        ckpts,
        metrics,
        prof,
        prof_tokens: 0,
        window,
        first_eval,
        last_eval: last.0,
        last_train_loss: last.1,
    };
    lp.run(start)
}

/// Replaces each gradient by its mean over the group, in f32: a compute copy's bf16 gradient
/// is widened first, as PyTorch's DDP averages the f32 gradients of an autocast model.
fn average_gradients(comm: &dyn Communicator, grads: &mut [Tensor]) -> Result<()> {
    for g in grads.iter_mut() {
        if g.dtype() != DType::F32 {
            *g = g.to_dtype(DType::F32)?;
        }
    }
    // candle's backward hands back every gradient at once, so the buckets cannot overlap it;
    // they do keep the collectives few and large.
    comm.all_reduce_mean_tensors(grads)
}

/// `acc + g` over micro-batches, in f32: a compute copy's gradient comes in bf16, and a sum
/// of bf16 gradients would round at every micro-batch.
fn accumulate(acc: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    let up = |t: &Tensor| t.to_dtype(DType::F32);
    up(acc)? + up(g)?
}

fn write_resumed_files(opts: &RunOpts) -> Result<()> {
    match opts.on_resumed {
        Some(write) if opts.comm.rank() == 0 => write(),
        _ => Ok(()),
    }
}

/// Restores weights, optimizer, data position and RNG from the run's latest checkpoint that
/// loads; returns the step to continue from. A newer one that does not load (cut short, or
/// garbled) is renamed aside by [`set_aside`], said in one line each: the run continues from
/// its last good checkpoint, as a run that never wrote the bad one would.
fn resume<T: Task>(
    task: &mut T,
    saved: &Saved,
    opt: &mut AdamW,
    ckpts: &Checkpoints,
    opts: &RunOpts,
) -> Result<Option<LoopState>> {
    let candidates = Checkpoints::newest_first(opts.run_dir)?;
    if candidates.is_empty() {
        let fin = opts.run_dir.join("final");
        if fin.exists() {
            // Its checkpoints deleted to save space, a finished run would start over, and its
            // metrics and final model go with the new run's.
            bail!(
                "{}: holds a final model but no checkpoint to resume from (checkpoints/ is \
                 empty or gone): begin a new run from it with --init {}, or start this one over \
                 with --overwrite",
                opts.run_dir.display(),
                fin.display()
            );
        }
        warnln!(
            "[{}] nothing to resume in {}; starting fresh",
            opts.label,
            opts.run_dir.display()
        );
        write_resumed_files(opts)?;
        return Ok(None);
    }
    let mut failed: Vec<(PathBuf, anyhow::Error)> = Vec::new();
    let mut loaded = None;
    let mut fatal = None;
    for dir in candidates {
        match load_checkpoint(&dir, task, saved, opt, opts) {
            Ok(Ok(st)) => {
                loaded = Some((dir, st));
                break;
            }
            Ok(Err(e)) => failed.push((dir, e)),
            Err(e) => {
                fatal = Some(e);
                break;
            }
        }
    }
    // Every rank says what it loaded before any gives up, so that none waits on a rank that
    // has left (an optimizer shard, say, fails on its own rank alone).
    let step = loaded.as_ref().map_or(NONE_LOADED, |(_, st)| st.step);
    let agree = ranks_agree(opts.comm, step)?;
    if let Some(e) = fatal {
        return Err(e);
    }
    if !agree {
        bail!(
            "[{}] the ranks did not all resume from the same checkpoint (this one {}): a \
             checkpoint read on one rank did not load on another{}",
            opts.label,
            match &loaded {
                Some((dir, _)) => format!("from {}", dir.display()),
                None => "from none".to_string(),
            },
            reasons(&failed)
        );
    }
    let Some((dir, st)) = loaded else {
        let (newest, e) = failed.remove(0);
        return Err(match failed.is_empty() {
            true => e,
            false => e.context(format!(
                "{}: cannot resume from it, nor from an older checkpoint{}",
                newest.display(),
                reasons(&failed)
            )),
        });
    };
    task.restore(&st.task)?;
    if opts.comm.rank() == 0 && !failed.is_empty() {
        // The pointer first: a reader between the two steps finds the good checkpoint.
        ckpts.make_latest(&dir)?;
        for (bad, e) in &failed {
            // Only a step directory of this run's own: `latest` may name another path.
            let own = bad.parent() == Some(opts.run_dir.join("checkpoints").as_path())
                && step_of(bad).is_some();
            let aside = match own && bad.is_dir() {
                true => format!(
                    "; {} is set aside as {}",
                    bad.display(),
                    set_aside(bad)?.display()
                ),
                false => String::new(),
            };
            warnln!(
                "warning: [{}] {}{aside}; resuming from {}",
                opts.label,
                one_line(e),
                dir.display()
            );
        }
    }
    write_resumed_files(opts)?;
    if opts.comm.rank() == 0 {
        set_aside_stale_final(opts)?;
    }
    warnln!(
        "[{}] resumed from {} at step {}",
        opts.label,
        dir.display(),
        st.step
    );
    let batch = task.micro_batch_size(opts.cfg);
    let accum = opts.cfg.grad_accum;
    // A checkpoint that kept the ranks but not their batch is from before a resume could
    // change both: its per-rank batch is taken as this run's.
    let was = |world| (world, st.rank_batch.unwrap_or(batch.size * accum));
    let change = |world| world_change(batch, accum, was(world), opts.comm.world());
    if let Some(note) = st.world.and_then(change) {
        warnln!("note: [{}] {note}", opts.label);
    }
    Ok(Some(st))
}

/// What a resume on `now` ranks of a run that trained on `was.0` ranks of `was.1` sequences
/// each changes: batch settings are per rank, so each optimizer step's global batch scales with
/// the ranks while the schedule, counted in steps, does not. DeepSpeed keeps a configured
/// global batch by recomputing the accumulation; temper's settings name the per-rank batch,
/// so it says what to give instead. Nothing where the settings given already keep it.
fn world_change(
    batch: MicroBatch,
    accum: usize,
    (was, was_per_rank): (usize, usize),
    now: usize,
) -> Option<String> {
    let (before, after) = (was_per_rank * was, batch.size * accum * now);
    if was == now || was == 0 || before == after {
        return None;
    }
    let keep = match (
        before % (batch.size * now),
        before % (accum * now),
        before % now,
    ) {
        (0, ..) => format!(
            "--grad-accum {} keeps it at {before}",
            before / (batch.size * now)
        ),
        (_, 0, _) => format!(
            "{} {} keeps it at {before}",
            batch.key,
            before / (accum * now)
        ),
        (.., 0) => format!(
            "{} {} with --grad-accum 1 keeps it at {before}",
            batch.key,
            before / now
        ),
        _ => format!(
            "to keep it, choose {} and --grad-accum so that their product times {now} is \
             {before}",
            batch.key
        ),
    };
    Some(format!(
        "resumed on {now} rank(s), where its checkpoint was trained on {was}: {} and \
         --grad-accum are per rank, so each step's global batch is now {after} ({} per rank x \
         {accum} accumulated x {now}) where it was {before} ({was_per_rank} per rank x {was}), \
         on the same learning-rate schedule; {keep}",
        batch.key, batch.size,
    ))
}

/// A step no checkpoint has, for a rank that loaded none.
const NONE_LOADED: usize = usize::MAX >> 16;

/// The reasons checkpoints did not load, one per checkpoint, for the end of one line.
fn reasons(failed: &[(PathBuf, anyhow::Error)]) -> String {
    failed
        .iter()
        .map(|(_, e)| format!(" ({})", one_line(e)))
        .collect()
}

/// Reads checkpoint `dir`'s state and restores its weights, optimizer state and task files:
/// the inner error where the checkpoint is damaged (see [`damage`]), which an older one may
/// mend, the outer one where an intact checkpoint does not load or the run is past `steps`,
/// which no older checkpoint would mend.
fn load_checkpoint<T: Task>(
    dir: &Path,
    task: &mut T,
    saved: &Saved,
    opt: &mut AdamW,
    opts: &RunOpts,
) -> Result<Result<LoopState>> {
    if !dir.is_dir() {
        return Ok(Err(anyhow!(missing_latest(opts.run_dir, dir))));
    }
    if let Some(e) = damage(dir, ReadFor::Resume) {
        return Ok(Err(e));
    }
    let state = dir.join("state.json");
    let text = std::fs::read_to_string(&state)
        .with_context(|| format!("{}: cannot read", state.display()))?;
    // temper writes every field (later ones default where an older checkpoint lacks them):
    // JSON that parses without them is damage, which an older checkpoint may mend.
    let st = match serde_json::from_str::<LoopState>(&text) {
        Ok(st) => st,
        Err(e) => return Ok(Err(anyhow!("{}: malformed: {e}", state.display()))),
    };
    // Before anything is written: the run's config.toml keeps the steps it ran to. A run
    // stopped at its last step's checkpoint, before final/, resumes to write it.
    let finished = st.step == opts.cfg.steps && opts.run_dir.join("final").exists();
    if st.step > opts.cfg.steps || finished {
        bail!(
            "{}: the run is at step {} already, and steps is {}: nothing to train (give a \
             larger --steps, or --epochs, to continue it)",
            opts.run_dir.display(),
            st.step,
            opts.cfg.steps
        );
    }
    saved.load_model(dir, opts.run_dir)?;
    // No checkpoint is written with weights that are not finite: such weights were damaged
    // on disk, and training on would stop at its first loss naming this checkpoint as good.
    if let Some(name) = saved.store.first_non_finite()? {
        return Ok(Err(anyhow!(
            "{}: {name} holds values that are not finite (damaged on disk: no checkpoint is \
             written so)",
            dir.join("model.safetensors").display()
        )));
    }
    opt.load(&dir.join("optimizer.safetensors"), st.adam_t)?;
    task.read_files(dir)?;
    Ok(Ok(st))
}

/// Whether every rank resumed from the step rank 0 did: each reads the checkpoints itself,
/// and one whose read failed where another's did not would train from another step.
fn ranks_agree(comm: &dyn Communicator, step: usize) -> Result<bool> {
    if comm.world() == 1 {
        return Ok(true);
    }
    // Two halves, each exact in an f32.
    let halves = |s: usize| [(s >> 24) as f32, (s & 0xff_ffff) as f32];
    let mut first = halves(step);
    comm.broadcast(0, &mut first)?;
    let mut differs = [f32::from(u8::from(first != halves(step)))];
    comm.all_reduce_mean(&mut differs)?;
    Ok(differs[0] == 0.0)
}

/// An error's chain on one line, for a warning that must not run over several.
fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A run resumed to train further has a final/ of its earlier, shorter schedule: renamed to
/// `final-step-N` (its step), so that `--init`, `generate` and `export` of the run take the
/// newer checkpoints instead of it, and nothing is deleted.
fn set_aside_stale_final(opts: &RunOpts) -> Result<()> {
    let fin = opts.run_dir.join("final");
    if !fin.is_dir() {
        return Ok(());
    }
    let base = match CheckpointMeta::read(&fin).ok().map(|m| m.step) {
        Some(s) => format!("final-step-{s:07}"),
        None => "final-earlier".to_string(),
    };
    // A name already taken (a resume of an earlier resume that ended at the same step) gets
    // a suffix: neither model is deleted.
    let name = (1..)
        .map(|k| match k {
            1 => base.clone(),
            k => format!("{base}-{k}"),
        })
        .find(|n| !opts.run_dir.join(n).exists())
        .expect("an unused name");
    std::fs::rename(&fin, opts.run_dir.join(&name))?;
    errln!(
        "[{}] {}: the earlier schedule's final model, now {name}",
        opts.label,
        fin.display()
    );
    Ok(())
}

impl<T: Task> Loop<'_, T> {
    fn main(&self) -> bool {
        self.opts.comm.rank() == 0
    }

    /// Rank 0 logs; the other ranks have no log.
    fn log(&mut self, step: usize, split: &str, fields: &[(&str, f64)]) -> Result<()> {
        match &mut self.metrics {
            Some(m) => m.log(step, split, fields),
            None => Ok(()),
        }
    }

    /// Held-out evaluation on rank 0 (every rank holds the same weights).
    fn evaluate(&mut self, s: usize) -> Result<Option<T::Eval>> {
        if !self.main() {
            return Ok(None);
        }
        // Evaluation keeps no graph: its forwards hold no activations past their outputs.
        let ev = {
            let _untracked = crate::model::cast::Untracked::enter();
            self.task.evaluate()?
        };
        let fields = ev.fields();
        self.log(s, "val", &fields)?;
        errln!(
            "[{}] step {s} val {}",
            self.opts.label,
            fmt_metrics(&fields)
        );
        Ok(Some(ev))
    }

    fn run(&mut self, start: usize) -> Result<TrainSummary<T::Eval>> {
        let cfg = self.opts.cfg;
        let label = self.opts.label;
        // A signal during the setup (loading a large model, reading the data) stops the run
        // here, before an evaluation and a step that may take minutes more: a resumed run
        // holds its checkpoint already, and a fresh one has nothing to keep.
        if self.stop_requested()? {
            let at = match start {
                0 => StopPoint::BeforeTraining,
                s => StopPoint::After(s),
            };
            return Err(Preempted { at, told: false }.into());
        }
        // Until the process ends, or a pipeline's next stage begins its setup: a signal after
        // the last step lets the run end as it would, with its final model.
        preempt::set_phase(preempt::Phase::Training);
        if self.opts.eval_at_start && start == 0 {
            self.first_eval = self.evaluate(0)?;
        }
        // Resumed at its last step (stopped after that step's checkpoint, before its final
        // model): the evaluation that checkpoint kept, else one now, so the run ends with one.
        if start == cfg.steps && self.last_eval.is_none() {
            self.last_eval = self.evaluate(start)?;
        }
        let progress = self.main().then(|| Progress::new(label, start, cfg.steps));
        let mut window_tokens = 0usize;
        let mut window_start = Instant::now();
        for step in start..cfg.steps {
            let lr = lr_at(cfg, step);
            let timed = step >= start + WARMUP_STEPS;
            let out = self.step(step, lr, timed)?;
            if step == start && self.main() && self.opt.compute_copies() > 0 {
                // After the first step, which dropped the copies the forward does not read.
                errln!(
                    "[{label}] {} of {} parameter tensors are read as bf16 compute copies, the \
                     others as f32 masters",
                    self.opt.compute_copies(),
                    self.opt.num_tensors()
                );
            }
            if step == start && self.main() {
                if let Some(s) = crate::tape::last_segment() {
                    errln!(
                        "[{label}] the forward runs on temper's tape ([train] tape): {} ops a \
                         forward, outside candle's autograd graph, holding {:.2} MiB of outputs",
                        s.ops,
                        s.output_bytes as f64 / (1 << 20) as f64
                    );
                }
            }
            if let (true, Some(p)) = (timed, &mut self.prof) {
                p.step_done();
                self.prof_tokens += out.tokens;
            }
            window_tokens += out.tokens;
            self.window.add(&out);
            let s = step + 1;
            self.task.after_step(s)?;
            if s % cfg.log_every == 0 || s == cfg.steps {
                let secs = window_start.elapsed().as_secs_f64().max(1e-9);
                let tps = window_tokens as f64 / secs;
                let (loss, means) = self.window.drain();
                // The summary's loss is the one metrics.jsonl holds, not the last step's alone.
                self.last_train_loss = Some(loss);
                let mut fields = vec![
                    ("loss", loss),
                    ("lr", lr),
                    ("grad_norm", out.grad_norm),
                    ("tokens_per_s", tps),
                ];
                fields.extend(means.iter().map(|(k, v)| (k.as_str(), *v)));
                self.log(s, "train", &fields)?;
                if let Some(p) = &progress {
                    let shown: String = (self.task.shown_metrics().iter())
                        .filter_map(|k| means.iter().find(|(m, _)| m == k))
                        .map(|(k, v)| format!(" {k} {v:.4}"))
                        .collect();
                    p.update(
                        s,
                        &format!("loss {loss:.4}{shown} lr {lr:.2e} {tps:.0} tok/s"),
                    );
                }
                window_tokens = 0;
                window_start = Instant::now();
            }
            let paused = Instant::now();
            if s % cfg.eval_every == 0 || s == cfg.steps {
                if let Some(ev) = self.evaluate(s)? {
                    self.last_eval = Some(ev);
                }
            }
            let checkpointed = s == cfg.steps || s % cfg.checkpoint_every == 0;
            if checkpointed {
                self.checkpoint(s)?;
            }
            // Evaluations and checkpoints are not training: the window's tokens/s leaves them out.
            window_start += paused.elapsed();
            if self.stop_requested()? {
                if !checkpointed {
                    self.checkpoint(s)?;
                }
                return Err(Preempted {
                    at: StopPoint::After(s),
                    told: false,
                }
                .into());
            }
        }
        if let Some(p) = &progress {
            p.finish();
        }
        if self.main() {
            self.saved.write_final(self.opts.run_dir, cfg.steps)?;
            self.checkpointed()?;
            if let Some(p) = self.prof.as_ref().filter(|p| p.steps() > 0) {
                let per_step = self.prof_tokens as f64 / p.steps() as f64;
                errprint!("[{label}] {}", p.table(per_step)?);
                p.write(self.opts.run_dir, per_step)?;
            }
        }
        Ok(TrainSummary {
            steps: cfg.steps,
            last_train_loss: self.last_train_loss,
            first_eval: self.first_eval.clone(),
            last_eval: self.last_eval.clone(),
        })
    }

    /// Whether any rank saw SIGTERM or SIGUSR1: every rank must stop after the same step.
    fn stop_requested(&self) -> Result<bool> {
        let mut flag = [f32::from(u8::from(preempt::requested()))];
        self.opts.comm.all_reduce_mean(&mut flag)?;
        Ok(flag[0] > 0.0)
    }

    /// Averages gradients, loss, tokens and extra metrics over the data-parallel group.
    fn all_reduce(&self, grads: &mut [Tensor], out: &mut Stepped) -> Result<()> {
        let comm = self.opts.comm;
        let world = comm.world();
        if comm.skips_collectives() {
            return Ok(());
        }
        average_gradients(comm, grads)?;
        let mut numbers: Vec<f32> = vec![out.loss as f32, out.tokens as f32];
        numbers.extend(out.extras.iter().map(|(_, v)| *v as f32));
        comm.all_reduce_mean(&mut numbers)?;
        out.loss = f64::from(numbers[0]);
        out.tokens = (f64::from(numbers[1]) * world as f64).round() as usize;
        for ((_, v), x) in out.extras.iter_mut().zip(&numbers[2..]) {
            *v = f64::from(*x);
        }
        Ok(())
    }

    /// Accumulates the gradients of `grad_accum` micro-batches, averages them over the
    /// data-parallel group, clips them and steps AdamW.
    fn step(&mut self, step: usize, lr: f64, timed: bool) -> Result<Stepped> {
        let accum = self.opts.cfg.grad_accum;
        let mut acc: Option<Vec<Tensor>> = None;
        let mut losses = Vec::with_capacity(accum);
        let mut tokens = 0;
        let mut extras = Averages::default();
        if let (Some(p), true) = (&self.prof, timed) {
            p.step_started();
        }
        let prof = |lp: &Self| -> Result<Option<Mark>> {
            match (&lp.prof, timed) {
                (Some(p), true) => Ok(Some(p.mark()?)),
                _ => Ok(None),
            }
        };
        let span = |lp: &mut Self, region: Region, m: Option<Mark>| -> Result<()> {
            match (&mut lp.prof, m) {
                (Some(p), Some(m)) => p.span(region, m),
                _ => Ok(()),
            }
        };
        for _ in 0..accum {
            let m = prof(self)?;
            let out = self.task.micro_batch(step)?;
            span(self, Region::Forward, m)?;
            if let (Some(p), true) = (&mut self.prof, timed) {
                p.note_graph(&out.loss);
            }
            let m = prof(self)?;
            tokens += out.tokens;
            let grads = crate::tape::backward(&(&out.loss / accum as f64)?)?;
            // Read after the backward is queued, not before: reading the loss waits for the
            // device, and a wait between the forward and the backward leaves the GPU idle while
            // the host issues the first backward kernels. Detached, so the graph goes now.
            losses.push(out.loss.detach());
            let g = self.opt.collect(&grads)?;
            acc = Some(match acc {
                None => g,
                Some(a) => a
                    .iter()
                    .zip(&g)
                    .map(|(x, y)| accumulate(x, y))
                    .collect::<candle_core::Result<_>>()?,
            });
            span(self, Region::Backward, m)?;
            for (k, v) in out.metrics {
                extras.add(&k, v);
            }
        }
        let mut grads = acc.expect("grad_accum >= 1");
        let mut loss_sum = 0.0;
        for l in &losses {
            loss_sum += scalar(l)?;
        }
        let mut out = Stepped {
            loss: loss_sum / accum as f64,
            grad_norm: 0.0,
            tokens,
            extras: extras.drain(),
        };
        let m = prof(self)?;
        self.all_reduce(&mut grads, &mut out)?;
        span(self, Region::GradSync, m)?;
        // Checked after the average, which carries a NaN from any rank: every rank stops after
        // the same step, none waits in a collective for one that left.
        if !out.loss.is_finite() {
            bail!(
                "[{}] loss is {} at step {}; stopping ({})",
                self.opts.label,
                out.loss,
                step + 1,
                self.last_good()
            );
        }
        let m = prof(self)?;
        let clip = self.opts.cfg.grad_clip;
        out.grad_norm = self.opt.update(&grads, lr, clip, self.opts.optimizer)?;
        span(self, Region::Optimizer, m)?;
        // The norm comes back with the update applied, so the weights are spoilt: the run
        // stops before any checkpoint holds them (every rank has the same global norm).
        if !out.grad_norm.is_finite() {
            bail!(
                "[{}] gradient norm is {} at step {} (loss {:.4}); stopping ({})",
                self.opts.label,
                out.grad_norm,
                step + 1,
                out.loss,
                self.last_good()
            );
        }
        if self.opt.sharded() {
            let m = prof(self)?;
            self.opt.sync_weights(self.opts.comm)?;
            span(self, Region::WeightSync, m)?;
        }
        Ok(out)
    }

    /// Where a run that stops now can be resumed from, for its error.
    fn last_good(&self) -> String {
        match Checkpoints::latest(self.opts.run_dir) {
            Ok(Some(dir)) => format!("the last good checkpoint is {}", dir.display()),
            Ok(None) => "no checkpoint was written yet".to_string(),
            Err(e) => format!(
                "the last good checkpoint is in {}: {e}",
                self.ckpts.dir.display()
            ),
        }
    }

    /// Rank 0 writes the checkpoint; with a sharded optimizer every rank first sends it its
    /// share of the state. Weights that are not finite (an update that overflowed) are not
    /// written: every rank holds them all, and stops alike.
    fn checkpoint(&mut self, s: usize) -> Result<()> {
        if let Some(name) = self.saved.store.first_non_finite()? {
            bail!(
                "[{}] after step {s} {name} holds values that are not finite; stopping without \
                 a checkpoint ({})",
                self.opts.label,
                self.last_good()
            );
        }
        self.task.before_checkpoint()?;
        let Some(state) = self.opt.gather_state(self.opts.comm)? else {
            return Ok(());
        };
        let (saved, opt, task) = (self.saved, &self.opt, &*self.task);
        let (window, first_eval) = (&self.window, self.first_eval.as_ref());
        let (last_eval, last_train_loss) = (self.last_eval.as_ref(), self.last_train_loss);
        let world = self.opts.comm.world();
        let rank_batch = self.task.micro_batch_size(self.opts.cfg).size * self.opts.cfg.grad_accum;
        self.ckpts.save(s, |dir| {
            saved.write_model(dir, s)?;
            AdamW::save(&state, &dir.join("optimizer.safetensors"))?;
            task.write_files(dir)?;
            let st = LoopState {
                step: s,
                adam_t: opt.t,
                task: task.state(),
                window: window.clone(),
                first_eval: first_eval.map(serde_json::to_value).transpose()?,
                last_eval: last_eval.map(serde_json::to_value).transpose()?,
                last_train_loss,
                world: Some(world),
                rank_batch: Some(rank_batch),
            };
            write_atomic(
                &dir.join("state.json"),
                serde_json::to_string(&st)?.as_bytes(),
            )
        })?;
        self.checkpointed()
    }

    fn checkpointed(&self) -> Result<()> {
        match self.opts.on_checkpoint {
            Some(f) => f(),
            None => Ok(()),
        }
    }
}

pub fn fmt_metrics(m: &[(&str, f64)]) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_on_other_ranks_says_how_the_global_batch_changes() {
        let b = |size| MicroBatch {
            key: "--batch-size",
            size,
        };
        assert!(world_change(b(8), 1, (4, 8), 4).is_none());
        assert!(
            world_change(b(8), 1, (0, 8), 4).is_none(),
            "a count never recorded"
        );
        let fewer = world_change(b(8), 2, (4, 16), 2).unwrap();
        assert!(fewer.contains("resumed on 2 rank(s), where its checkpoint was trained on 4"));
        assert!(fewer.contains(
            "global batch is now 32 (8 per rank x 2 accumulated x 2) where it was 64 (16 per \
             rank x 4)"
        ));
        assert!(fewer.ends_with("--grad-accum 4 keeps it at 64"), "{fewer}");
        // One rank of 8 resumed on two: half the batch per rank, not a product to find.
        let halved = world_change(b(8), 1, (1, 8), 2).unwrap();
        assert!(halved.ends_with("--batch-size 4 keeps it at 8"), "{halved}");
        let accumulated = world_change(b(8), 3, (1, 8), 2).unwrap();
        assert!(
            accumulated.ends_with("--batch-size 4 with --grad-accum 1 keeps it at 8"),
            "{accumulated}"
        );
        let odd = world_change(b(8), 1, (2, 8), 3).unwrap();
        assert!(odd.contains("is now 24 (8 per rank x 1 accumulated x 3) where it was 16"));
        assert!(
            odd.ends_with(
                "choose --batch-size and --grad-accum so that their product times 3 is 16"
            ),
            "{odd}"
        );
        // Two ranks of 8 resumed on one with --grad-accum 2 keep the global batch: nothing to
        // say. With --grad-accum 4 the batch doubles, and the way back is --grad-accum 2, not
        // a product of the new settings and the old ranks.
        assert!(world_change(b(8), 2, (2, 8), 1).is_none());
        let doubled = world_change(b(8), 4, (2, 8), 1).unwrap();
        assert!(doubled.contains("is now 32 (8 per rank x 4 accumulated x 1) where it was 16"));
        assert!(
            doubled.ends_with("--grad-accum 2 keeps it at 16"),
            "{doubled}"
        );
    }

    #[test]
    fn each_metric_is_averaged_over_the_reports_it_has() {
        let mut a = Averages::default();
        a.add(&"kl", 0.4);
        a.add(&"loss", 1.0);
        a.add(&"loss", 3.0);
        assert_eq!(a.drain(), [("kl", 0.4), ("loss", 2.0)]);
        assert!(a.drain().is_empty());
    }

    /// Two ranks' bf16 gradients 1 and 1 + 2^-7 average to 1 + 2^-8, which bf16 cannot hold:
    /// the mean comes back in f32, exact; and micro-batches sum in f32 the same way.
    #[test]
    fn bf16_gradients_average_and_accumulate_in_f32() {
        let dev = candle_core::Device::Cpu;
        let bf = |x: f32| {
            Tensor::new(&[x, -x], &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let group = crate::dist::ThreadGroup::new(2);
        let means: Vec<Vec<f32>> = std::thread::scope(|s| {
            let hs: Vec<_> = group
                .iter()
                .map(|c| {
                    let g = bf(1.0 + c.rank() as f32 / 128.0);
                    s.spawn(move || {
                        let mut gs = [g];
                        average_gradients(c, &mut gs).unwrap();
                        assert_eq!(gs[0].dtype(), DType::F32);
                        gs[0].to_vec1::<f32>().unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for m in &means {
            assert_eq!(m, &[1.0 + 1.0 / 256.0, -1.0 - 1.0 / 256.0]);
        }
        let sum = accumulate(&bf(1.0), &bf(1.0 / 256.0)).unwrap();
        assert_eq!(
            sum.to_vec1::<f32>().unwrap(),
            [1.0 + 1.0 / 256.0, -1.0 - 1.0 / 256.0]
        );
    }
}
