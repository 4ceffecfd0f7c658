//! The command line: one subcommand per stage plus generate, eval, export, tokenizer and
//! pipeline. Every hyperparameter comes from the stage defaults, then `--config FILE`, then
//! the flags below.

mod resolve;
mod stage_flags;
#[cfg(test)]
mod tests;
mod usage;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::config::{
    AdvantageEstimator, DTypeChoice, DeviceChoice, ImportanceSamplingLevel, LrScheduler, ReportTo,
    RewardSpec,
};
use crate::stages::export::{Dtype as ExportDtype, Format};
use crate::stages::pipeline::{Extra, PipelineOptions};
use stage_flags::per_stage_help;
pub use usage::usage_error_line;

/// A JSON object of chat-template variables.
pub type Kwargs = serde_json::Map<String, serde_json::Value>;

use crate::data::columns::Columns;

fn parse_kwargs(text: &str) -> Result<Kwargs> {
    crate::data::chat_template::parse_kwargs(text)
}

#[derive(Parser, Debug)]
#[command(
    name = "temper",
    version,
    about = "Pretrain, fine-tune (LoRA), reward-model and align (PPO, DPO, KTO, online DPO, GRPO) a GPT-style model"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The command line, where a value that reads as a negative number (`--seed -5`,
    /// `--temperature -1`) goes to its option's parser, which takes or refuses it, instead of
    /// being read as an unknown flag `-5` (clap's default). Set on every option that takes a
    /// value, so that one added later needs nothing of its own.
    pub fn command_line() -> clap::Command {
        fn negatives(cmd: clap::Command) -> clap::Command {
            cmd.mut_args(|a| match a.get_action().takes_values() {
                true => a.allow_negative_numbers(true),
                false => a,
            })
            .mut_subcommands(negatives)
        }
        per_stage_help(negatives(<Cli as clap::CommandFactory>::command()))
    }

    /// Parses `args` (the program's name first) with [`Cli::command_line`].
    pub fn try_parse_args<I, T>(args: I) -> std::result::Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut cmd = Self::command_line();
        let mut m = cmd.try_get_matches_from_mut(args)?;
        <Cli as clap::FromArgMatches>::from_arg_matches_mut(&mut m).map_err(|e| e.format(&mut cmd))
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Next-token pretraining on a text corpus (or the built-in task).
    Pretrain(StageArgs),
    /// Supervised fine-tuning on prompt/response or chat data, full or LoRA.
    Sft(StageArgs),
    /// Train a reward model on preference pairs (Bradley-Terry).
    Reward(StageArgs),
    /// RLHF with PPO against reward models or the task's checker.
    Ppo(StageArgs),
    /// Direct preference optimisation against a frozen reference.
    Dpo(StageArgs),
    /// Kahneman-Tversky optimisation: completions labelled desirable or undesirable, no pairs.
    Kto(StageArgs),
    /// Online DPO: two samples of each prompt from the policy, ranked by a reward, trained on
    /// with DPO's loss.
    #[command(name = "online-dpo", alias = "online_dpo")]
    OnlineDpo(StageArgs),
    /// Group relative policy optimisation.
    Grpo(StageArgs),
    /// Knowledge distillation from a frozen teacher (TRL's GKD): the student learns the
    /// teacher's token distributions on the data's completions or on its own samples.
    Distill(StageArgs),
    /// pretrain -> sft -> reward -> ppo (and optionally dpo, kto, online_dpo, grpo, distill) on the
    /// built-in task.
    Pipeline(PipelineArgs),
    /// Run a training stage data-parallel, one process per rank: `launch --nproc-per-node 2 -- pretrain ...`.
    Launch(LaunchArgs),
    /// Sample from a checkpoint.
    Generate(GenerateArgs),
    /// Task accuracy of a checkpoint on held-out prompts.
    Eval(EvalArgs),
    /// Write a checkpoint with its LoRA adapters merged into the base weights.
    Export(ExportArgs),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(TokenizerCmd),
}

/// The stage flags that are on alone and take `=false` (`--packing=false`) to turn off what
/// a config file turned on.
pub(crate) const ON_OFF_FLAGS: [&str; 6] = [
    "use-rslora",
    "use-dora",
    "packing",
    "padding-free",
    "precompute-ref-log-probs",
    "sync-ref-model",
];

// clap prints these doc comments as --help, where `[model]` is a TOML table, not a link.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Args, Debug, Clone, Default)]
pub struct StageArgs {
    /// TOML file with [model], [train], [lora], [data], [sft], [reward], [ppo], [dpo], [kto],
    /// [online_dpo], [grpo], [distill], [external_reward].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Run directory (config.toml, metrics.jsonl, checkpoints/, final/).
    #[arg(long, conflicts_with = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run in DIR from its latest checkpoint.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Start over in an --out that already holds a run: its checkpoints, final model, metrics
    /// and run files are deleted first (nothing else there). Without it such an --out is
    /// refused.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Checkpoint, run directory, Hugging Face model directory or PEFT adapter directory to
    /// start from (pretrain: continued pretraining).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// The training data: a JSONL or Parquet file, or a directory of them (its train split
    /// where its files name their splits, as a Hugging Face dataset's do; pretraining: text
    /// files too, or token shards); the built-in task when absent.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out data, in --data's form (a corpus or token shards for pretrain, records for
    /// the later stages; of a directory that names its splits, its validation split, else its
    /// test split): evaluated on instead of a part of --data, all of which then trains.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// The columns of --data (and --eval-data) that hold the fields the stage reads, where a
    /// dataset names them otherwise: e.g. prompt=question,answer=solution ([data] columns).
    #[arg(long, value_name = "FIELD=COLUMN,...", value_parser = Columns::parse)]
    pub columns: Option<Columns>,
    /// The split of a --data directory that trains, where its files name their splits as a
    /// Hugging Face dataset does (data/train_sft-00000-of-00001.parquet): e.g. train_sft
    /// ([data] train_split). Default: the one named train. "" clears a name the config gave.
    #[arg(long, value_name = "NAME")]
    pub train_split: Option<String>,
    /// The split held out: of --eval-data, or of --data where no --eval-data is given
    /// ([data] eval_split). Default: validation, else test. "" clears a name the config gave.
    #[arg(long, value_name = "NAME")]
    pub eval_split: Option<String>,
    /// A tokenizer.json (pretrain only; later stages use their checkpoint's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The chat template to render conversations with: a .jinja file, a tokenizer_config.json
    /// with a `chat_template`, or a model directory. Default: the --init model's own, else the
    /// built-in template. The run's checkpoints keep it (chat_template.jinja), as TRL does.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// Variables for the chat template, as a JSON object (TRL's chat_template_kwargs), e.g.
    /// '{"enable_thinking": false}' for Qwen3.
    #[arg(long, value_name = "JSON", value_parser = parse_kwargs)]
    pub chat_template_kwargs: Option<Kwargs>,
    /// auto (a CUDA device where there is one), cpu or cuda.
    #[arg(long, value_enum)]
    pub device: Option<DeviceChoice>,
    /// The compute dtype: bf16 on a GPU by default (f32 masters), f32 on a CPU.
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeChoice>,
    /// e.g. attention=flash,lora=fused,gae=cuda or all=reference.
    #[arg(long)]
    pub kernels: Option<String>,
    /// Model preset: tiny, small, llama-tiny, gpt2 (pretrain only).
    #[arg(long)]
    pub model: Option<String>,
    /// Optimizer steps (over any `[train] epochs`).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Passes over the training set, which then decide the steps (`[train] epochs`).
    #[arg(long, conflicts_with = "steps")]
    pub epochs: Option<f64>,
    /// Seed of the weights' initialisation, the data order, dropout and sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Sequences (examples, pairs) a micro-batch, per rank.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches a step accumulates.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Tokens a training row (pretrain, packed SFT).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Peak learning rate (warmup, then `--lr-scheduler`'s decay to `[train] min_lr_ratio`
    /// of it).
    #[arg(long)]
    pub lr: Option<f64>,
    /// How the learning rate falls after the warmup, to `--min-lr-ratio` of its peak: cosine,
    /// linear, or constant (transformers' `cosine_with_min_lr` and `constant_with_warmup` are
    /// read too). Default: cosine (pretrain, sft, reward, dpo, kto, distill fall to 0.1 of the
    /// peak; ppo, grpo and online-dpo keep it constant, min_lr_ratio 1).
    #[arg(long, value_enum)]
    pub lr_scheduler: Option<LrScheduler>,
    /// Where the learning rate ends, as a share of its peak (0 for transformers' linear and
    /// cosine schedules).
    #[arg(long)]
    pub min_lr_ratio: Option<f64>,
    /// The warmup as a share of the run's steps, instead of `[train] warmup_steps`.
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Steps between held-out evaluations.
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Steps between checkpoints.
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Steps between training lines (each a mean over its steps).
    #[arg(long)]
    pub log_every: Option<usize>,
    /// Time N steps (after 2 warm-up steps) by region, print the table and write
    /// profile.json; the run stops after them.
    #[arg(long, value_name = "N")]
    pub profile: Option<usize>,
    /// Also write the metrics as TensorBoard event files in the run directory's
    /// `tensorboard/` (TRL's `report_to`; `tensorboard --logdir runs/`).
    #[arg(long, value_enum)]
    pub report_to: Option<ReportTo>,
    /// LoRA adapters of this rank (0: full fine-tuning).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA's scale is alpha / rank (alpha / sqrt(rank) with --use-rslora).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// rsLoRA: scale the adapters by alpha / sqrt(rank) (`[lora] use_rslora`; TRL's and
    /// PEFT's use_rslora).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub use_rslora: Option<bool>,
    /// DoRA: adapters that also train each adapted weight's row lengths (`[lora] use_dora`;
    /// TRL's and PEFT's use_dora).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub use_dora: Option<bool>,
    /// Dropout on the adapters' input.
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// q,k,v,o,gate,up,down (or GPT-2's c_attn,c_proj,c_fc).
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// PPO, GRPO, online DPO reward: `task` (the checker), `PATH[:WEIGHT]` of a reward model,
    /// `cmd:COMMAND` or `http://HOST:PORT/PATH`; repeatable.
    #[arg(long = "reward")]
    pub rewards: Vec<RewardSpec>,
    /// KL coefficient (PPO's beta, DPO's, KTO's and online DPO's beta, GRPO's beta); for
    /// distill, the divergence's interpolation (0 forward KL, 1 reverse KL).
    #[arg(long)]
    pub beta: Option<f64>,
    /// PPO, GRPO, online DPO, distill: new tokens at most per sampled completion (`[ppo]` /
    /// `[grpo]` / `[online_dpo]` / `[distill] max_new_tokens`; TRL's --max_completion_length).
    /// Default 6, for the built-in task's answers of a few tokens.
    #[arg(long, value_name = "N")]
    pub max_new_tokens: Option<usize>,
    /// Distill: the model to learn from (`[distill] teacher`).
    #[arg(long, value_name = "RUN_OR_CKPT")]
    pub teacher: Option<PathBuf>,
    /// Distill: the share of optimizer steps trained on the student's own samples
    /// (`[distill] lmbda`; TRL's --lmbda).
    #[arg(long)]
    pub lmbda: Option<f64>,
    /// GRPO's advantage estimator: group_norm (GRPO), rloo, reinforce_plus_plus.
    #[arg(long, value_enum)]
    pub advantage_estimator: Option<AdvantageEstimator>,
    /// GRPO: the importance ratio per token, or per response (`sequence`: GSPO; TRL's
    /// --importance_sampling_level). GSPO's own clip range is far narrower: see README.
    #[arg(long, value_enum)]
    pub importance_sampling_level: Option<ImportanceSamplingLevel>,
    /// SFT: pack the examples into rows of --seq-len positions, each attending only to
    /// itself (`[sft] packing`; TRL's --packing). PPO, GRPO, online DPO: pack each
    /// minibatch's prompts and responses for the training forward, and a reward model's sequences (`[ppo]` /
    /// `[grpo]` / `[online_dpo] packing`; OpenRLHF's --packing_samples).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub packing: Option<bool>,
    /// DPO, KTO, reward: pack each batch's sequences (chosen and rejected, or labelled
    /// completions) into rows, each attending only to itself (`[dpo]` / `[kto]` / `[reward]
    /// padding_free`; TRL's --padding_free).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub padding_free: Option<bool>,
    /// SFT: loss on a prompt-completion record's completion only (`[sft]
    /// completion_only_loss`; TRL's --completion_only_loss). false: the prompt's tokens too.
    #[arg(long, value_name = "BOOL")]
    pub completion_only_loss: Option<bool>,
    /// SFT: loss on a conversation's assistant turns only (`[sft] assistant_only_loss`;
    /// TRL's --assistant_only_loss). false: every token of the conversation, as TRL's default.
    #[arg(long, value_name = "BOOL")]
    pub assistant_only_loss: Option<bool>,
    /// SFT: NEFTune's noise on the token embeddings in training (`[sft]
    /// neftune_noise_alpha`; TRL's --neftune_noise_alpha; 5 in its paper).
    #[arg(long, value_name = "ALPHA")]
    pub neftune_noise_alpha: Option<f64>,
    /// DPO: score every pair under the reference once before training, then drop it (`[dpo]
    /// precompute_ref_log_probs`; TRL's --precompute_ref_log_probs).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub precompute_ref_log_probs: Option<bool>,
    /// DPO: TR-DPO, the reference moved towards the policy every `[dpo]
    /// ref_model_sync_steps` steps (`[dpo] sync_ref_model`; TRL's --sync_ref_model).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub sync_ref_model: Option<bool>,
}

#[derive(Args, Debug)]
pub struct PipelineArgs {
    /// The pipeline's directory: one run directory per stage, and summary.json.
    #[arg(long, default_value = "runs/pipeline")]
    pub out: PathBuf,
    /// Extra stages after PPO, each from the SFT model: dpo, kto, online_dpo, grpo, rloo,
    /// reinforce_pp, gspo (grpo with sequence-level ratios), and distill (PPO's policy taught
    /// to the SFT model).
    #[arg(long, value_delimiter = ',', value_enum)]
    pub with: Vec<Extra>,
    /// auto (a CUDA device where there is one), cpu or cuda, for every stage (over a
    /// --config table's).
    #[arg(long, value_enum)]
    pub device: Option<DeviceChoice>,
    /// e.g. attention=flash,lora=fused or all=reference, for every stage (over a --config
    /// table's).
    #[arg(long)]
    pub kernels: Option<String>,
    /// The built-in task's world (its task_seed: which pairs are held out), and an offset of
    /// every stage's training seed (seed x 1000 + the stage's own).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Scale every stage's step count (0.25 for a quick smoke run), or its epochs where the
    /// config sets them.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// TOML with one table per step: [pretrain.train], [sft.lora], [ppo.ppo], ...; all of it
    /// checked before any step runs.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Start over where --out holds an earlier pipeline's runs: each stage's checkpoints,
    /// final model, metrics and run files are deleted as that stage starts. Without it such
    /// an --out is refused.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Continue the pipeline in --out: stages that finished are kept (their results read
    /// from summary.json), the one that was stopped resumes from its latest checkpoint with
    /// its own config.toml, and the rest run.
    #[arg(long)]
    pub resume: bool,
    /// Every stage also writes its metrics as TensorBoard event files, in its run directory's
    /// `tensorboard/` (`tensorboard --logdir` the pipeline's --out shows them side by side).
    #[arg(long, value_enum)]
    pub report_to: Option<ReportTo>,
}

#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Ranks on this machine: one process each (one per GPU), or threads with `--threads`.
    #[arg(long, default_value_t = 1)]
    pub nproc_per_node: usize,
    /// Machines in the job; run the same command on each with its own `--node-rank`.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This machine's place among the `--nnodes` (0 runs rank 0).
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Where rank 0 listens (the first node's address); 127.0.0.1 on a single node.
    #[arg(long)]
    pub master_addr: Option<String>,
    /// Rank 0's port; a free one on a single node, 29500 across nodes.
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Run the ranks as threads of this process (CPU only, one node, no network): for
    /// debugging.
    #[arg(long, conflicts_with_all = ["node_rank", "master_addr", "master_port"])]
    pub threads: bool,
    /// The stage and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

// As StageArgs: clap prints these docs, where `[:WEIGHT]` is an optional suffix, not a link.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A checkpoint, run directory, Hugging Face model directory or PEFT adapter directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A prompt, used as written (repeat the flag for more).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// JSONL or Parquet file of {"prompt": ...} records, or a directory of them; a prompt may
    /// be a list of chat messages, rendered with the chat template. Every field of a record is copied to its output lines (under
    /// the names --columns gives).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// The columns of --prompts that hold the fields read, where the file names them
    /// otherwise: e.g. prompt=question,answer=solution.
    #[arg(long, value_name = "FIELD=COLUMN,...", value_parser = Columns::parse)]
    pub columns: Option<Columns>,
    /// The split of a --prompts directory to read, where its files name their splits as a
    /// Hugging Face dataset does (data/train_prefs-00000-of-00001.parquet). Default: the one
    /// named train.
    #[arg(long, value_name = "NAME", requires = "prompts")]
    pub split: Option<String>,
    /// The chat template for message-list prompts: a .jinja file, a tokenizer_config.json or a
    /// model directory. Default: the checkpoint's own (its chat_template.jinja, else its
    /// tokenizer_config.json's), else the built-in template.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// Variables for the chat template, as a JSON object, e.g. '{"enable_thinking": false}'.
    #[arg(long, value_name = "JSON", value_parser = parse_kwargs)]
    pub chat_template_kwargs: Option<Kwargs>,
    /// Write the completions (JSONL) to FILE, flushed after every batch, instead of standard
    /// output.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Continue the --out file an interrupted run left, after its last complete line.
    #[arg(long)]
    pub resume: bool,
    /// Completions per prompt (vLLM's n, transformers' num_return_sequences); each prompt is
    /// prefilled once for all of them.
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Rows (prompts × samples) per engine call: what bounds the KV cache's memory.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// New tokens at most per completion. Default: the checkpoint's generation_config.json
    /// `max_new_tokens`, else 64 or half the model's context, whichever is less.
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// New tokens at least per completion: no stop id ends one before (transformers'
    /// `min_new_tokens`; stop strings still do). Default: the generation config's
    /// `min_new_tokens`, else 0.
    #[arg(long)]
    pub min_new_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy. Default: the checkpoint's generation_config.json
    /// (its `temperature`; greedy where `do_sample` is false; 1 where `do_sample` is true and
    /// it names none), as vLLM takes it, else 0.8.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Sample among the k most likely tokens only; 0 keeps them all. Default: the
    /// generation config's `top_k`, else 0.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample from the smallest set of tokens whose probability reaches p, and every token
    /// tied with the last one taken (transformers keeps as many of a tie as its sort
    /// reaches); 1 keeps them all.
    /// Default: the generation config's `top_p`, else 1.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Drop tokens less likely than this share of the most likely one (after top-k and top-p,
    /// as transformers orders them); 0 keeps them all. Default: the generation config's
    /// `min_p`, else 0.
    #[arg(long)]
    pub min_p: Option<f64>,
    /// Divide the logit of a token already in the prompt or the completion by this where it
    /// is positive, multiply where negative (transformers' and vLLM's rule); 1 is none.
    /// Default: the generation config's `repetition_penalty` (Qwen2.5's asks 1.05), else 1.
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    /// A string that ends a completion (cut before it); repeat the flag for more. EOS and
    /// the checkpoint's stop ids always end one. Taken as given: in bash a newline is
    /// `$'\n'` ("\n" is a backslash and an n).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Score every completion as the RL stages' --reward does (task, a reward model's
    /// directory, cmd:PROGRAM, http://HOST:PORT/PATH, each [:WEIGHT]; repeatable): each line
    /// gets `reward` (the weighted sum) and `rewards` (each source's score).
    #[arg(long = "reward")]
    pub rewards: Vec<RewardSpec>,
    /// With --samples N and --reward: write only each prompt's best-scored sample, the first
    /// of equals (best-of-N; rejection sampling). The file then trains `temper sft` as it
    /// is.
    #[arg(long)]
    pub best_of: bool,
    /// Seed of the sampling streams: the same seed gives the same completions, whatever
    /// --batch-size or --shard.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sample part K of N of the prompts (a contiguous share), one process per GPU: the parts'
    /// --out files, concatenated in order, are the one-process output.
    #[arg(long, value_name = "K/N", default_value = "0/1")]
    pub shard: crate::stages::generate::Shard,
    #[arg(long, value_enum, default_value_t)]
    pub device: DeviceChoice,
    /// Kernel choices, e.g. attention=reference or all=reference.
    #[arg(long, default_value = "")]
    pub kernels: String,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A checkpoint, run directory, Hugging Face model directory or PEFT adapter directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// JSONL or Parquet of {"prompt", "answer"}, or a directory of them; the built-in task's
    /// held-out prompts when absent. A prompt may be a list of chat messages, rendered with the
    /// chat template.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// The columns of --prompts that hold the fields read, where the file names them
    /// otherwise: e.g. prompt=question,answer=solution.
    #[arg(long, value_name = "FIELD=COLUMN,...", value_parser = Columns::parse)]
    pub columns: Option<Columns>,
    /// The split of a --prompts directory to read, where its files name their splits as a
    /// Hugging Face dataset does (data/test_prefs-00000-of-00001.parquet). Default:
    /// validation, else test.
    #[arg(long, value_name = "NAME", requires = "prompts")]
    pub split: Option<String>,
    /// The chat template for message-list prompts: a .jinja file, a tokenizer_config.json or a
    /// model directory. Default: the checkpoint's own (its chat_template.jinja, else its
    /// tokenizer_config.json's), else the built-in template.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// Variables for the chat template, as a JSON object, e.g. '{"enable_thinking": false}'.
    #[arg(long, value_name = "JSON", value_parser = parse_kwargs)]
    pub chat_template_kwargs: Option<Kwargs>,
    /// New tokens at most per greedy answer.
    #[arg(long, default_value_t = 8)]
    pub max_new_tokens: usize,
    #[arg(long, value_enum, default_value_t)]
    pub device: DeviceChoice,
    /// Seed of the built-in task's world (its held-out prompts). Default: the checkpoint's
    /// run's (0 for a model not trained on the built-in task). Not with --prompts, which gives
    /// the prompts.
    #[arg(long, conflicts_with = "prompts")]
    pub task_seed: Option<u64>,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// What to export: a run directory (its final/ checkpoint, else its latest), a checkpoint
    /// directory, a Hugging Face model or a PEFT adapter directory (read merged).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The directory to write (created; one that holds files needs --overwrite).
    #[arg(long)]
    pub out: PathBuf,
    /// temper (a checkpoint, adapters merged), hf (a Hugging Face model directory, adapters
    /// merged) or peft (the adapters alone, for PeftModel on the exported base).
    #[arg(long, value_enum, default_value = "temper")]
    pub format: Format,
    /// Write into an --out that already holds files: hf and temper replace an earlier export
    /// there whole (its weights, configs and tokenizer files that this export does not write
    /// again are removed, and named), peft writes the adapter beside what is there; other
    /// files are left as they are. Without it such an --out is refused (a Hugging Face
    /// model's directory, say, would have its weights and config replaced by another
    /// model's).
    #[arg(long)]
    pub overwrite: bool,
    /// The weights' type for hf and peft, named in config.json as transformers' `dtype`:
    /// f32 (default: the weights as trained, unrounded), bf16 or f16 (half the size, rounded).
    #[arg(long, value_enum)]
    pub dtype: Option<ExportDtype>,
    /// hf: split weights past SIZE bytes into model-0000K-of-0000N.safetensors with
    /// model.safetensors.index.json, as transformers' max_shard_size (5GB, 500MB, 2GiB).
    /// Default: 50GB, transformers' own.
    // No allow_hyphen_values: it would take a forgotten value's next flag as the size.
    #[arg(long, value_name = "SIZE", value_parser = crate::stages::export::parse_size)]
    pub max_shard_size: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub enum TokenizerCmd {
    /// Train a byte-level BPE tokenizer on text files.
    Train {
        /// Text, .jsonl or .parquet files (or directories of them) to learn the merges from.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// text=COLUMN: the column of .jsonl and .parquet files that holds the text.
        #[arg(long, value_name = "text=COLUMN", value_parser = Columns::parse)]
        columns: Option<Columns>,
        /// The split of a directory to read, where its files name their splits as a Hugging
        /// Face dataset does (data/train_sft-00000-of-00001.parquet). Default: the one named
        /// train.
        #[arg(long, value_name = "NAME")]
        split: Option<String>,
        #[arg(long, default_value_t = 4096)]
        vocab_size: usize,
        /// The tokenizer.json to write; an existing file needs --overwrite.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing --out.
        #[arg(long)]
        overwrite: bool,
    },
    /// Tokenize a corpus once into token shards (llm.c's .bin layout) that `pretrain --data
    /// DIR` memory-maps: no tokenizing at the start of every run, no corpus in memory.
    Encode {
        /// The corpus: a text, .jsonl or .parquet file, or a directory, as `pretrain --data`
        /// reads one.
        corpus: PathBuf,
        /// text=COLUMN: the column of .jsonl and .parquet files that holds the text.
        #[arg(long, value_name = "text=COLUMN", value_parser = Columns::parse)]
        columns: Option<Columns>,
        /// The split of a directory to read, where its files name their splits as a Hugging
        /// Face dataset does (data/train_sft-00000-of-00001.parquet). Default: the one named
        /// train.
        #[arg(long, value_name = "NAME")]
        split: Option<String>,
        /// The tokenizer.json to encode with (copied beside the shards, where pretraining
        /// finds it); the byte tokenizer when absent.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// An empty (or new) directory for train_NNNNNN.bin and val_NNNNNN.bin.
        #[arg(long)]
        out: PathBuf,
        /// Tokens per shard.
        #[arg(long, default_value_t = 100_000_000)]
        shard_tokens: usize,
        /// Share of documents held out as validation shards (0, or a corpus of fewer than 20
        /// documents: none, and pretraining holds out the training stream's tail). With the
        /// seed, the defaults match pretraining's own split of the same text, except where
        /// that split moves a document (none or every one drawn) or finds a side shorter than
        /// a window, and takes the tail instead.
        #[arg(long, default_value_t = 0.1)]
        val_fraction: f64,
        /// Seed of the document split (pretraining's default seed).
        #[arg(long, default_value_t = 1234)]
        seed: u64,
    },
}

impl PipelineArgs {
    pub fn options(&self) -> PipelineOptions {
        PipelineOptions {
            out: self.out.clone(),
            with: self.with.clone(),
            device: self.device,
            kernels: self.kernels.clone(),
            seed: self.seed,
            scale: self.scale,
            config: self.config.clone(),
            overwrite: self.overwrite,
            resume: self.resume,
            report_to: self.report_to,
        }
    }
}
