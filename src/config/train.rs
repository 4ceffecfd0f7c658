//! The one training loop's knobs, shared by every stage.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DTypeChoice {
    /// bf16 compute on CUDA (with f32 master weights), f32 on CPU.
    #[default]
    Auto,
    F32,
    Bf16,
}

/// How the learning rate falls after its warmup, to `min_lr_ratio` of its peak at the last
/// step (TRL's and transformers' `lr_scheduler_type`, whose names are taken too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    /// Half a cosine wave (nanoGPT's, llm.c's).
    #[default]
    #[serde(alias = "cosine_with_min_lr")]
    #[value(alias = "cosine_with_min_lr")]
    Cosine,
    /// A straight line.
    Linear,
    /// It does not fall: the peak from the warmup's end to the last step.
    #[serde(alias = "constant_with_warmup")]
    #[value(alias = "constant_with_warmup")]
    Constant,
}

/// Where a run's metrics go besides `metrics.jsonl` and the terminal (TRL's `report_to`).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    Default,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ReportTo {
    /// Nowhere else.
    #[default]
    None,
    /// TensorBoard event files in the run directory's `tensorboard/` (`tensorboard --logdir
    /// runs/`; `wandb sync --sync-tensorboard` uploads them). `all` on the command line, as
    /// TRL's `--report_to all` (TensorBoard being the one destination temper writes).
    #[value(alias = "all")]
    Tensorboard,
}

impl ReportTo {
    /// A name, or a list of them as TRL's `report_to` takes it: `[]` and `["none"]` are
    /// `none`; `all` (a name or in a list) is every destination temper writes, TensorBoard.
    fn one_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Clone, Copy)]
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ReportTo;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("`none`, `tensorboard`, `all`, or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ReportTo, E> {
                match v {
                    "none" => Ok(ReportTo::None),
                    "tensorboard" | "all" => Ok(ReportTo::Tensorboard),
                    other => Err(E::unknown_variant(other, &["none", "tensorboard", "all"])),
                }
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ReportTo, A::Error> {
                let mut to = ReportTo::None;
                while let Some(name) = seq.next_element::<String>()? {
                    to = to.max(self.visit_str(&name)?);
                }
                Ok(to)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// ZeRO stage 1: whether each data-parallel rank keeps only its share of AdamW's moments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ShardOptimizer {
    /// On whenever there is more than one rank, where it saves memory.
    #[default]
    Auto,
    On,
    Off,
}

impl ShardOptimizer {
    pub fn enabled(self, world: usize) -> bool {
        match self {
            Self::Auto => world > 1,
            Self::On => true,
            Self::Off => false,
        }
    }
}

/// Whether a training forward records the transformer blocks on temper's own tape
/// (`crate::tape`) instead of candle's autograd graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TapeChoice {
    /// On CUDA, where the blocks are our kernels and the tape saves candle's per-node passes;
    /// off on the CPU, where the blocks are candle's reference composites and the tape would
    /// only wrap them.
    #[default]
    Auto,
    On,
    Off,
}

impl TapeChoice {
    pub fn enabled(self, device: &candle_core::Device) -> bool {
        match self {
            Self::Auto => device.is_cuda(),
            Self::On => true,
            Self::Off => false,
        }
    }
}

/// The one training loop's knobs, shared by every stage.
///
/// `batch_size` is per rank: a step sees `batch_size × grad_accum × world size` sequences
/// (examples, pairs, prompts), which the run prints at its start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub steps: usize,
    /// Passes over the training set (TRL's `num_train_epochs`; a fraction is a part of one):
    /// when set, it decides `steps`, `ceil(epochs × items / (batch_size × grad_accum × world
    /// size))`, items being the stage's training examples, pairs or pretraining windows
    /// (packed rows under `[sft] packing`). pretrain, sft, reward, dpo, kto and distill; a
    /// rollout stage (ppo, grpo, online_dpo) draws its prompts per rollout and runs `steps`.
    /// `--steps` on the command line sets `steps` instead.
    pub epochs: Option<f64>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub min_lr_ratio: f64,
    /// How the learning rate falls after the warmup.
    pub lr_scheduler: LrScheduler,
    pub warmup_steps: usize,
    /// The warmup as a share of the run's steps (TRL's `warmup_ratio`): where set, it decides
    /// the warmup instead of `warmup_steps`, and scales with `steps` or `epochs`.
    pub warmup_ratio: Option<f64>,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    pub grad_clip: f64,
    pub eval_every: usize,
    /// Global batches of held-out windows each pretraining evaluation reads, the stream's
    /// first (`batch_size * grad_accum` windows for each rank, read by rank 0); the later
    /// stages evaluate their whole held-out split.
    pub eval_batches: usize,
    pub checkpoint_every: usize,
    pub keep_checkpoints: usize,
    pub log_every: usize,
    pub seed: u64,
    pub dtype: DTypeChoice,
    /// With bf16 compute, keep a bf16 copy of every trainable weight that AdamW rewrites in
    /// the pass that updates the f32 master, and let the forward read it, instead of casting
    /// each master in every step (and carrying its gradient back through the cast).
    pub compute_copies: bool,
    /// Record the transformer blocks on temper's tape rather than candle's graph. It needs
    /// every trainable weight read as a variable: f32 compute, or bf16 with `compute_copies`.
    pub tape: TapeChoice,
    /// Keep only each transformer block's inputs from the training forward and run the block
    /// again in the backward (TRL's and PyTorch's `gradient_checkpointing`): activation
    /// memory of one block instead of every block's, for a second forward of each. It needs
    /// the tape, which it turns on where `tape` is `auto` (the CPU included).
    pub gradient_checkpointing: bool,
    /// Shard AdamW's state across data-parallel ranks (ZeRO-1).
    pub shard_optimizer: ShardOptimizer,
    /// Time this many steps by region after a warm-up and print the table (0: off); the run
    /// then takes those steps and the warm-up only, with no evaluation or checkpoint between
    /// (`TrainConfig::limit_to_profile`).
    pub profile: usize,
    /// Where metrics go besides `metrics.jsonl` and the terminal: a name, or TRL's list of
    /// them (`["tensorboard"]`).
    #[serde(deserialize_with = "ReportTo::one_or_list")]
    pub report_to: ReportTo,
    /// The config file that chose `warmup_steps`, with the value it chose; none for a default
    /// (`RunConfig::load_layers` fills it in). Never written or read as a key: a run's
    /// `config.toml` records every value, chosen or not. A warmup longer than the run is
    /// said only of a value a user chose, as a short run shortens the default's silently.
    #[serde(skip)]
    pub warmup_steps_from: Option<(PathBuf, usize)>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 300,
            epochs: None,
            batch_size: 32,
            grad_accum: 1,
            seq_len: 64,
            lr: 3e-3,
            min_lr_ratio: 0.1,
            lr_scheduler: LrScheduler::Cosine,
            warmup_steps: 20,
            warmup_ratio: None,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            adam_eps: 1e-8,
            grad_clip: 1.0,
            eval_every: 50,
            eval_batches: 4,
            checkpoint_every: 100,
            keep_checkpoints: 2,
            log_every: 10,
            seed: 1234,
            dtype: DTypeChoice::Auto,
            compute_copies: true,
            tape: TapeChoice::Auto,
            gradient_checkpointing: false,
            shard_optimizer: ShardOptimizer::Auto,
            profile: 0,
            report_to: ReportTo::None,
            warmup_steps_from: None,
        }
    }
}

impl TrainConfig {
    /// With `profile` on, only the timed steps and their warm-up, and no evaluation or
    /// checkpoint between them, whether `--profile` or a config file asked.
    pub fn limit_to_profile(&mut self) {
        if self.profile > 0 {
            let steps = self.profile + crate::train::profile::WARMUP_STEPS;
            (self.steps, self.epochs) = (steps, None);
            self.eval_every = steps;
            self.checkpoint_every = steps;
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.gradient_checkpointing && self.tape == TapeChoice::Off {
            anyhow::bail!(
                "train.gradient_checkpointing needs the blocks on temper's tape, but train.tape is \"off\""
            );
        }
        super::check_counts(
            "train",
            &[
                ("steps", self.steps),
                ("batch_size", self.batch_size),
                ("grad_accum", self.grad_accum),
                ("seq_len", self.seq_len),
                ("eval_every", self.eval_every),
                ("eval_batches", self.eval_batches),
                ("checkpoint_every", self.checkpoint_every),
                ("keep_checkpoints", self.keep_checkpoints),
                ("log_every", self.log_every),
            ],
        )?;
        if let Some(e) = self.epochs {
            if !(e > 0.0 && e.is_finite()) {
                bail!("train.epochs must be a positive number, got {e}");
            }
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("train.lr must be a positive number, got {}", self.lr);
        }
        if let Some(r) = self.warmup_ratio {
            if !(0.0..=1.0).contains(&r) {
                bail!("train.warmup_ratio must be in [0, 1], got {r}");
            }
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            bail!(
                "train.min_lr_ratio must be in [0, 1], got {}",
                self.min_lr_ratio
            );
        }
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                bail!("train.{name} must be in [0, 1), got {beta}");
            }
        }
        for (name, v) in [
            ("grad_clip", self.grad_clip),
            ("weight_decay", self.weight_decay),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                bail!("train.{name} must be 0 or more, got {v}");
            }
        }
        // As PyTorch's AdamW refuses it: a negative epsilon can divide by a near-zero root.
        if !(self.adam_eps >= 0.0 && self.adam_eps.is_finite()) {
            bail!("train.adam_eps must be 0 or more, got {}", self.adam_eps);
        }
        Ok(())
    }
}
