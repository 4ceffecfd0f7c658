//! The stages: each builds its batches and computes its loss; the loop is shared
//! (`train::runner`). Around them: [`setup`] (loading the init model, data splits, starting
//! the loop), [`loader`] (models from checkpoints), [`batch`] (records to token batches),
//! [`rl`] (the RL maths PPO and GRPO share) and [`rollout`] (sampling and scoring responses).
//! A stage module is its task (`micro_batch`, `evaluate`) and a `run(env)` that assembles it.
//! The commands that train nothing have modules here too: [`generate`], [`eval`], [`export`].

pub mod batch;
pub mod completions;
pub mod distill;
pub mod dpo;
pub mod entropy_control;
pub mod eval;
pub mod export;
pub mod frozen_inputs;
pub mod generate;
pub mod grpo;
pub mod kto;
pub mod loader;
pub mod online_dpo;
pub mod pipeline;
pub mod ppo;
pub mod pretrain;
pub mod rank_settings;
pub mod ref_sync;
pub mod reward;
pub mod rewards;
pub mod rl;
pub mod rollout;
pub mod rollout_packing;
pub mod run_dir;
pub mod sampling_defaults;
pub mod setup;
pub mod sft;
pub mod truncate;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::Device;

use crate::config::RunConfig;
use crate::dist::{Communicator, Rank, Solo};
use crate::kernels::KernelSet;
pub use run_dir::Start;

/// What every stage is handed by the CLI.
pub struct Env {
    pub cfg: RunConfig,
    pub device: Device,
    pub kernels: KernelSet,
    pub run_dir: PathBuf,
    pub resume: bool,
    /// The data-parallel group this process (or thread) trains in.
    pub comm: Arc<dyn Communicator>,
    /// The earlier run `--overwrite` set aside, until this one has a checkpoint (rank 0).
    set_aside: Option<run_dir::SetAside>,
    /// The run directory's lock, held while the run lasts (rank 0).
    _lock: Option<std::fs::File>,
}

/// The settings' own checks and the held-out file's, before a run directory is touched
/// (`--overwrite` would clear it) or a rank connects.
fn check_settings(cfg: &RunConfig) -> Result<()> {
    cfg.validate()?;
    setup::check_eval_data(cfg)
}

impl Env {
    /// Validates the config, creates the run directory, writes `config.toml` (a resumed run:
    /// once its checkpoint is restored) and the run's metadata (device, kernels), and prints
    /// them.
    pub fn prepare(cfg: RunConfig, run_dir: &Path, start: Start) -> Result<Self> {
        Self::prepare_in(cfg, run_dir, start, Arc::new(Solo))
    }

    /// [`Env::prepare`] for one rank of a data-parallel group: only rank 0 writes the run
    /// directory's files and prints.
    pub fn prepare_in(
        cfg: RunConfig,
        run_dir: &Path,
        start: Start,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        check_settings(&cfg)?;
        let device = crate::device::select(cfg.device)?;
        Self::assemble(cfg, run_dir, start, device, comm, None)
    }

    /// [`Env::prepare`] for the process `rank` places in a job (torchrun, SLURM, `temper
    /// launch`): its own GPU, and a communicator connected to the other ranks. The config and
    /// the run directory are checked before connecting, so a bad one fails every rank at once.
    pub fn join(cfg: RunConfig, run_dir: &Path, start: Start, rank: &Rank) -> Result<Self> {
        check_settings(&cfg)?;
        // A directory another run holds is said so first: it holds a run, whose --resume or
        // --overwrite would be refused too.
        let held = match rank.rank == 0 && run_dir.is_dir() {
            true => Some(run_dir::lock(run_dir)?),
            false => None,
        };
        if start == Start::Fresh {
            run_dir::check_fresh(run_dir)?;
        }
        let ordinal = crate::device::rank_ordinal(
            rank.local_rank,
            std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(),
        );
        let device = crate::device::select_ordinal(cfg.device, ordinal)?;
        let comm = crate::dist::connect(rank, &device)?;
        rank_settings::check_same_settings(&cfg, &*comm)?;
        Self::assemble(cfg, run_dir, start, device, comm, held)
    }

    /// `held`: the run directory's lock where the caller took it already.
    fn assemble(
        cfg: RunConfig,
        run_dir: &Path,
        start: Start,
        device: Device,
        comm: Arc<dyn Communicator>,
        held: Option<std::fs::File>,
    ) -> Result<Self> {
        let mut cfg = cfg;
        let kept_in_loss = cfg.stage == crate::config::Stage::Grpo
            && cfg.grpo.record_kl_place(start == Start::Resume);
        if kept_in_loss && comm.rank() == 0 {
            crate::errln!(
                "[grpo] this rloo run began before rloo took its KL off the score: it keeps its \
                 KL term in the loss (kl_in_reward = false in its config.toml)"
            );
        }
        let mut env = Self {
            device,
            kernels: cfg.kernel_set()?,
            cfg,
            run_dir: run_dir.to_path_buf(),
            resume: start == Start::Resume,
            comm,
            set_aside: None,
            _lock: None,
        };
        if env.cfg.train.gradient_checkpointing && !env.weights_are_variables() {
            anyhow::bail!(
                "train.gradient_checkpointing needs the tape, and the tape every weight read as \
                 a variable: f32 compute, or bf16 with train.compute_copies = true"
            );
        }
        crate::out_of_memory::set_hint(crate::out_of_memory::hint_of(
            &format!("the {} run", env.cfg.stage.name()),
            &env.cfg.memory_sizes(),
        ));
        if env.comm.rank() == 0 {
            env._lock = Some(match held {
                Some(lock) => lock,
                None => run_dir::lock(run_dir)?,
            });
            env.set_aside = run_dir::begin(run_dir, start)?;
            env.write_run_files()?;
        }
        Ok(env)
    }

    /// Whether the run continues from a checkpoint: a `--resume` that finds none starts over,
    /// and is checked as a fresh start is.
    pub fn continues(&self) -> bool {
        self.resume && crate::train::checkpoint::Checkpoints::any(&self.run_dir)
    }

    /// Called once the run has written a checkpoint: an earlier run `--overwrite` set aside
    /// is deleted now that this one can stand in its place.
    /// A set-aside that cannot be deleted is said to be, and the run goes on: it has a good
    /// checkpoint, and the leftover costs only disk.
    pub fn checkpointed(&self) -> Result<()> {
        if let Some(Err(e)) = self.set_aside.as_ref().map(|s| s.discard()) {
            errln!("warning: {e:#}: delete it by hand");
        }
        Ok(())
    }

    /// `config.toml` and `run.json` (device, the kernels that run and those chosen, dtype) in
    /// the run directory.
    pub fn save_run_files(&self) -> Result<()> {
        let (cfg, dir) = (&self.cfg, &self.run_dir);
        cfg.save(dir)?;
        let meta = serde_json::json!({
            "stage": cfg.stage,
            "device": crate::device::describe(&self.device),
            "kernels": crate::device::describe_kernels(&self.device, &self.kernels),
            "kernel_choices": self.kernels.to_string(),
            "dtype": format!("{:?}", self.dtype()),
            "temper_version": env!("CARGO_PKG_VERSION"),
        });
        crate::io::write_atomic(
            &dir.join("run.json"),
            serde_json::to_string_pretty(&meta)?.as_bytes(),
        )
    }

    /// The run directory with `config.toml` and `run.json`, announced on stderr. A resumed
    /// run writes the two files only once its checkpoint is restored
    /// ([`Env::save_run_files`] through `RunOpts::on_resumed`), so that a resume refused for a
    /// setting the checkpoint cannot continue under leaves the run's own in place.
    fn write_run_files(&self) -> Result<()> {
        let (cfg, dir) = (&self.cfg, &self.run_dir);
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create run directory", dir.display()))?;
        if !self.resume {
            self.save_run_files()?;
        }
        let device = crate::device::describe(&self.device);
        errln!(
            "[{}] device {device} dtype {:?} kernels {} -> {}",
            cfg.stage,
            self.dtype(),
            crate::device::describe_kernels(&self.device, &self.kernels),
            dir.display()
        );
        Ok(())
    }

    pub fn dtype(&self) -> candle_core::DType {
        crate::device::compute_dtype(self.cfg.train.dtype, &self.device)
    }

    pub fn ctx(&self, use_lora: bool, dropout_seed: Option<u64>) -> crate::model::linear::Ctx {
        crate::model::linear::Ctx {
            dtype: self.dtype(),
            kernels: self.kernels,
            use_lora,
            dropout_seed,
            neftune_alpha: None,
            tape: self.tape(),
            recompute_blocks: self.cfg.train.gradient_checkpointing,
        }
    }

    /// Whether training forwards record the blocks on our tape: as configured, where every
    /// trainable weight is read as a variable (f32 compute, or bf16 compute copies).
    fn tape(&self) -> bool {
        let t = &self.cfg.train;
        let variables = self.weights_are_variables();
        if t.tape == crate::config::TapeChoice::On && !variables && !crate::console::follower() {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                errln!(
                    "warning: [train] tape = \"on\" is ignored: the tape needs every weight read \
                     as a variable (f32 compute, or bf16 with compute_copies = true)"
                )
            });
        }
        // Checkpointing without the tape is refused when the run starts (`assemble`).
        (t.tape.enabled(&self.device) || t.gradient_checkpointing) && variables
    }

    /// Whether training reads every trainable weight as a variable, as the tape needs: f32
    /// compute, or bf16 compute copies.
    fn weights_are_variables(&self) -> bool {
        match self.dtype() {
            candle_core::DType::F32 => true,
            candle_core::DType::BF16 => self.cfg.train.compute_copies,
            _ => false,
        }
    }
}
