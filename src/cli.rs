//! The command line: one subcommand per stage plus generate, eval, export, tokenizer and
//! pipeline. Every hyperparameter comes from the stage defaults, then `--config FILE`, then
//! the flags below.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};

use crate::config::{
    read_toml, AdvantageEstimator, DTypeChoice, DeviceChoice, ImportanceSamplingLevel, LoraConfig,
    ModelConfig, RewardSpec, RunConfig, Stage,
};
use crate::stages::export::{Dtype as ExportDtype, Format};
use crate::stages::Start;

/// A JSON object of chat-template variables.
pub type Kwargs = serde_json::Map<String, serde_json::Value>;

fn parse_kwargs(text: &str) -> Result<Kwargs> {
    crate::data::chat_template::parse_kwargs(text)
}
use crate::stages::pipeline::{Extra, PipelineOptions};

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

/// The stage subcommands and the stage each runs.
const STAGE_COMMANDS: [(&str, Stage); 9] = [
    ("pretrain", Stage::Pretrain),
    ("sft", Stage::Sft),
    ("reward", Stage::Reward),
    ("ppo", Stage::Ppo),
    ("dpo", Stage::Dpo),
    ("kto", Stage::Kto),
    ("online-dpo", Stage::OnlineDpo),
    ("grpo", Stage::Grpo),
    ("distill", Stage::Distill),
];

/// The stage command that runs `stage` (`online-dpo` for [`Stage::OnlineDpo`]).
fn command_name(stage: Stage) -> &'static str {
    STAGE_COMMANDS
        .iter()
        .find(|(_, s)| *s == stage)
        .map_or(stage.name(), |(name, _)| name)
}

/// The stages a stage flag applies to, and what a refusal calls them where the list alone
/// would not say why.
struct Scope {
    stages: &'static [Stage],
    which: Option<&'static str>,
}

/// The stage flags (by field) that only some stages read, and those stages: each stage's
/// `--help` leaves out the others' flags, and [`StageArgs::apply`] refuses them where given;
/// but `seq_len` (which packed SFT reads too), `batch_size` (said to be unused by the rollout
/// stages, whose config may set it for a pipeline's other stages) and `model` (refused beside
/// --init), which `apply` and `resolve` check with more than the stage to go by.
fn flag_scope(flag: &str) -> Option<Scope> {
    use Stage::*;
    const FROM_INIT: &[Stage] = &[Sft, Reward, Ppo, Dpo, Kto, OnlineDpo, Grpo, Distill];
    let (stages, which): (&'static [Stage], _) = match flag {
        "teacher" | "lmbda" => (&[Distill], None),
        "advantage_estimator" | "importance_sampling_level" => (&[Grpo], None),
        "packing" => (&[Sft, Ppo, Grpo, OnlineDpo], None),
        "padding_free" => (&[Dpo, Kto, Reward], None),
        "completion_only_loss" | "assistant_only_loss" | "neftune_noise_alpha" => (&[Sft], None),
        "precompute_ref_log_probs" | "sync_ref_model" => (&[Dpo], None),
        "rewards" => (
            &[Ppo, Grpo, OnlineDpo],
            Some("ppo, grpo and online-dpo (the stages that score their own samples)"),
        ),
        "beta" => (&[Ppo, Dpo, Kto, OnlineDpo, Grpo, Distill], None),
        "max_new_tokens" => (
            &[Ppo, Grpo, OnlineDpo, Distill],
            Some("ppo, grpo, online-dpo and distill (the stages that sample)"),
        ),
        "tokenizer" | "model" => (
            &[Pretrain],
            Some("pretrain (a stage from --init uses its model's tokenizer)"),
        ),
        // Refused by `apply` with more than the stage to go by.
        "seq_len" => (&[Pretrain, Sft], None),
        // PPO and GRPO size their batches by rollouts.
        "batch_size" => (&[Pretrain, Sft, Reward, Dpo, Kto, OnlineDpo, Distill], None),
        "chat_template" | "chat_template_kwargs" => (
            FROM_INIT,
            Some("the stages that render conversations (pretraining reads text as it is)"),
        ),
        "lora_rank" | "lora_alpha" | "lora_dropout" | "lora_targets" => (
            FROM_INIT,
            Some("the stages from --init (pretraining trains every weight)"),
        ),
        _ => return None,
    };
    Some(Scope { stages, which })
}

fn flag_stages(flag: &str) -> Option<&'static [Stage]> {
    flag_scope(flag).map(|s| s.stages)
}

/// Refuses each of `given` (field, flag as typed, whether it was given) that `now` would not
/// read.
fn refuse_out_of_scope(given: &[(&str, &str, bool)], now: Stage) -> Result<()> {
    for &(field, flag, _) in given.iter().filter(|g| g.2) {
        let scope = flag_scope(field).expect("a scoped flag");
        if scope.stages.contains(&now) {
            continue;
        }
        let which = scope.which.map_or_else(
            || {
                let names: Vec<&str> = scope.stages.iter().map(|&s| command_name(s)).collect();
                match names.split_last() {
                    Some((last, rest)) if !rest.is_empty() => {
                        format!("{} and {last}", rest.join(", "))
                    }
                    _ => names.join(""),
                }
            },
            str::to_string,
        );
        bail!("{flag} applies to {which}, not {}", command_name(now));
    }
    Ok(())
}

/// Each stage's `--help`: its own flags only, and after them its defaults, as the tables of a
/// `--config` file would set them.
fn per_stage_help(cmd: clap::Command) -> clap::Command {
    STAGE_COMMANDS.iter().fold(cmd, |cmd, &(name, stage)| {
        cmd.mut_subcommand(name, |sub| {
            let sub = sub.after_help(stage_defaults(name, stage));
            sub.mut_args(|a| {
                match flag_stages(a.get_id().as_str()).is_some_and(|s| !s.contains(&stage)) {
                    true => a.hide(true),
                    false => a,
                }
            })
        })
    })
}

/// The defaults of `stage`'s run as TOML: `[train]`, pretraining's `[model]`, and the stage's
/// own table.
fn stage_defaults(name: &str, stage: Stage) -> String {
    let cfg = RunConfig::for_stage(stage);
    let Ok(all) = toml::Value::try_from(&cfg) else {
        return String::new();
    };
    let tables = match stage {
        Stage::Pretrain => vec!["train", "model", "data"],
        other => vec!["train", "data", "lora", other.name()],
    };
    let mut text = format!(
        "Defaults of `temper {name}` on the built-in task (a --config file's tables set them; \
         the flags above override both{}):",
        match stage {
            Stage::Pretrain => "; `--model gpt2` brings nanoGPT's schedule",
            Stage::Distill => "; --teacher is required",
            _ => "",
        }
    );
    for t in tables {
        let Some(table) = all.get(t) else { continue };
        let body = toml::to_string(table).unwrap_or_default();
        text.push_str(&format!("\n\n[{t}]\n{}", body.trim_end()));
    }
    text
}

/// A usage error of the command line `args` as one line, as temper's other errors are:
/// clap's message with the details it sets on lines of their own (a missing argument, the
/// possible values, a tip) and, for its usage block, a pointer to the help of the command
/// given. A negative number given to a count or a seed is said as such (clap says "invalid
/// digit found in string").
pub fn usage_error_line(e: &clap::Error, args: &[std::ffi::OsString]) -> String {
    let line = negative_count(e)
        .or_else(|| negative_value(e, args))
        .unwrap_or_else(|| {
            let text = e.render().to_string();
            let mut lines = text.lines();
            let first = lines.next().unwrap_or_default();
            let first = first.strip_prefix("error: ").unwrap_or(first).trim_end();
            let details: Vec<&str> = lines
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(|l| l.trim().trim_start_matches('[').trim_end_matches(']'))
                .filter(|l| !l.is_empty())
                .collect();
            match (details.is_empty(), first.ends_with(':')) {
                (true, _) => first.to_string(),
                (false, true) => format!("{first} {}", details.join(", ")),
                (false, false) => format!("{first}; {}", details.join("; ")),
            }
        });
    format!("{line} (see `{} --help`)", command_path(args))
}

/// clap takes a value such as `-1e-3`, `-.5` or a prompt "-1e5 is small" after a flag for a
/// flag of its own, and says only that `-1` is unexpected: the flag and the `=` spelling that
/// passes the value are named instead.
fn negative_value(e: &clap::Error, args: &[std::ffi::OsString]) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    // What clap could not place ("-1" of "-1e-3"): the value after a flag that starts so.
    let Some(ContextValue::String(unexpected)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let args: Vec<&str> = args.iter().filter_map(|a| a.to_str()).collect();
    args.windows(2).find_map(|w| {
        let (flag, value) = (w[0], w[1]);
        let numeric = value
            .strip_prefix('-')
            .is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit() || c == '.'));
        let placed = value.starts_with(unexpected.as_str());
        (numeric && placed && flag.starts_with("--") && !flag.contains('=')).then(|| {
            let quoted = match value.contains(' ') {
                true => format!("'{value}'"),
                false => value.to_string(),
            };
            format!(
                "{flag} {quoted}: a value that starts with '-' and a digit or '.' is read as a \
                 flag here; write it {flag}={quoted}"
            )
        })
    })
}

fn negative_count(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::ValueValidation {
        return None;
    }
    let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
        e.get(ContextKind::InvalidArg),
        e.get(ContextKind::InvalidValue),
    ) else {
        return None;
    };
    let negative = value.trim().parse::<f64>().is_ok_and(|v| v < 0.0);
    let unsigned = std::error::Error::source(e).is_some_and(|s| s.is::<std::num::ParseIntError>());
    (negative && unsigned)
        .then(|| format!("invalid value '{value}' for '{arg}': a whole number, 0 or more"))
}

/// The (sub)command `args` name, as far as they name one: `temper tokenizer train`.
fn command_path(args: &[std::ffi::OsString]) -> String {
    let mut cmd = Cli::command_line();
    let mut path = vec![cmd.get_name().to_string()];
    for a in args.iter().skip(1) {
        let Some(sub) = cmd.find_subcommand(a).cloned() else {
            break;
        };
        path.push(sub.get_name().to_string());
        cmd = sub;
    }
    path.join(" ")
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
    /// Data file or directory; the built-in task when absent.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out data, in --data's form (a corpus or token shards for pretrain, records for
    /// the later stages): evaluated on instead of a part of --data, all of which then trains.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
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
    /// Peak learning rate (warmup, then cosine decay to `[train] min_lr_ratio` of it).
    #[arg(long)]
    pub lr: Option<f64>,
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
    /// LoRA adapters of this rank (0: full fine-tuning).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA's scale is alpha / rank.
    #[arg(long)]
    pub lora_alpha: Option<f64>,
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
    #[arg(long)]
    pub packing: bool,
    /// DPO, KTO, reward: pack each batch's sequences (chosen and rejected, or labelled
    /// completions) into rows, each attending only to itself (`[dpo]` / `[kto]` / `[reward]
    /// padding_free`; TRL's --padding_free).
    #[arg(long)]
    pub padding_free: bool,
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
    #[arg(long)]
    pub precompute_ref_log_probs: bool,
    /// DPO: TR-DPO, the reference moved towards the policy every `[dpo]
    /// ref_model_sync_steps` steps (`[dpo] sync_ref_model`; TRL's --sync_ref_model).
    #[arg(long)]
    pub sync_ref_model: bool,
}

#[derive(Args, Debug)]
pub struct PipelineArgs {
    #[arg(long, default_value = "runs/pipeline")]
    pub out: PathBuf,
    /// Extra stages after PPO, each from the SFT model: dpo, kto, online_dpo, grpo, rloo,
    /// reinforce_pp, gspo (grpo with sequence-level ratios), and distill (PPO's policy taught
    /// to the SFT model).
    #[arg(long, value_delimiter = ',', value_enum)]
    pub with: Vec<Extra>,
    #[arg(long, value_enum)]
    pub device: Option<DeviceChoice>,
    #[arg(long)]
    pub kernels: Option<String>,
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
    /// Run the ranks as threads of this process (CPU only, one node): for debugging.
    #[arg(long)]
    pub threads: bool,
    /// The stage and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A checkpoint, run directory, Hugging Face model directory or PEFT adapter directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A prompt, used as written (repeat the flag for more).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// JSONL file of {"prompt": ...} records; a prompt may be a list of chat messages, rendered
    /// with the chat template. Every field of a record is copied to its output lines.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
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
    /// Sampling temperature; 0 is greedy. Default: the checkpoint's generation_config.json
    /// (its `temperature`; greedy where `do_sample` is false), as vLLM takes it, else 0.8.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Sample among the k most likely tokens only; 0 keeps them all. Default: the
    /// generation config's `top_k`, else 0.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample from the smallest set of tokens whose probability reaches p; 1 keeps them all.
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
    /// JSONL of {"prompt", "answer"}; the built-in task's held-out prompts when absent. A
    /// prompt may be a list of chat messages, rendered with the chat template.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
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
    /// run's (0 for a model not trained on the built-in task).
    #[arg(long)]
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
    /// Write into an --out that already holds files: those export writes are replaced (and
    /// an earlier export's weight files these do not replace, model.safetensors or shards,
    /// removed), the rest left as they are. Without it such an --out is refused (a Hugging
    /// Face model's directory, say, would have its weights and config replaced by another
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
        /// Text or .jsonl files to learn the merges from.
        #[arg(required = true)]
        files: Vec<PathBuf>,
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
        /// The corpus: a text or .jsonl file, or a directory, as `pretrain --data` reads one.
        corpus: PathBuf,
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
        /// Share of documents held out as validation shards (0: none; pretraining then holds
        /// out the training stream's tail). With the seed, the defaults match pretraining's
        /// own split of the same text.
        #[arg(long, default_value_t = 0.1)]
        val_fraction: f64,
        /// Seed of the document split (pretraining's default seed).
        #[arg(long, default_value_t = 1234)]
        seed: u64,
    },
}

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
        !STAGE_TABLES.contains(&table) || own_tables(now.stage).contains(&table)
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
    let own = own_tables(stage);
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

/// The stages' own tables of a config file.
const STAGE_TABLES: [&str; 9] = [
    "sft",
    "reward",
    "ppo",
    "dpo",
    "kto",
    "online_dpo",
    "grpo",
    "distill",
    "external_reward",
];

/// Those of [`STAGE_TABLES`] that `stage` reads.
fn own_tables(stage: Stage) -> &'static [&'static str] {
    match stage {
        Stage::Pretrain => &[],
        Stage::Sft => &["sft"],
        Stage::Reward => &["reward"],
        Stage::Ppo => &["ppo", "external_reward"],
        Stage::Dpo => &["dpo"],
        Stage::Kto => &["kto"],
        Stage::OnlineDpo => &["online_dpo", "external_reward"],
        Stage::Grpo => &["grpo", "external_reward"],
        Stage::Distill => &["distill"],
    }
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

/// PPO and GRPO size their batches by rollouts, not by `[train] batch_size`: a `--batch-size`
/// given to them changed nothing, and said nothing.
fn warn_unused_batch_size(cfg: &RunConfig, flag: bool) {
    if !flag {
        return;
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
        _ => return,
    };
    warnln!("warning: --batch-size is not used by {}: {how}", cfg.stage);
}

/// The preference, reward and RL stages train with dropout off: their losses compare the
/// policy's log-probabilities or scores with a reference's, a rollout's or another
/// response's, which dropout's noise would perturb. A LoRA dropout the run asks for is said to
/// be unused rather than left in config.toml as if applied.
fn warn_unused_dropout(cfg: &RunConfig) {
    let off = matches!(
        cfg.stage,
        Stage::Reward | Stage::Ppo | Stage::Dpo | Stage::Kto | Stage::OnlineDpo | Stage::Grpo
    );
    if off && cfg.lora.enabled() && cfg.lora.dropout > 0.0 {
        warnln!(
            "warning: [lora] dropout {} is not applied: {} trains with dropout off (sft and \
             distill apply it)",
            cfg.lora.dropout,
            cfg.stage
        );
    }
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
            ("lora.rank", "--lora-rank", self.lora_rank.is_some()),
            ("lora.alpha", "--lora-alpha", self.lora_alpha.is_some()),
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
        warn_unused_batch_size(&cfg, self.batch_size.is_some());
        warn_unused_dropout(&cfg);
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
        let holds_out =
            stage != Stage::Pretrain && cfg.data.path.is_some() && cfg.data.eval_path.is_none();
        // Pretraining's text (not token shards, which are split when encoded) is cut into
        // a training and a validation split by val_fraction.
        let splits_text = stage == Stage::Pretrain
            && cfg.data.eval_path.is_none()
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
        if let Some(init) =
            (self.init.as_ref()).filter(|i| !run.init.as_ref().is_some_and(|r| same(i, r)))
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
        ];
        let config = self.config.as_deref().unwrap_or(Path::new("--config"));
        for (flag, key, given, held, laid) in checks {
            let held_to =
                format!("the run trains with {held}, which its checkpoint holds a resume to");
            if let Some(g) = given.filter(|g| *g != held) {
                bail!("{flag} {g}: {held_to}; resume without it");
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
                ("packing", "--packing", self.packing),
                ("padding_free", "--padding-free", self.padding_free),
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
                    self.precompute_ref_log_probs,
                ),
                ("sync_ref_model", "--sync-ref-model", self.sync_ref_model),
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
        set!(self.eval_every, cfg.train.eval_every);
        set!(self.checkpoint_every, cfg.train.checkpoint_every);
        set!(self.log_every, cfg.train.log_every);
        set!(self.profile, cfg.train.profile);
        cfg.train.limit_to_profile();
        set!(self.lora_rank, cfg.lora.rank);
        set!(self.lora_alpha, cfg.lora.alpha);
        set!(self.lora_dropout, cfg.lora.dropout);
        if let Some(t) = &self.lora_targets {
            cfg.lora.targets = LoraConfig::parse_targets(t)?;
        }
        if self.data.is_some() {
            cfg.data.path = self.data.clone();
        }
        if self.eval_data.is_some() {
            cfg.data.eval_path = self.eval_data.clone();
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
        cfg.dpo.precompute_ref_log_probs |= self.precompute_ref_log_probs;
        cfg.dpo.sync_ref_model |= self.sync_ref_model;
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
            if let Some(on) = on {
                *on |= set;
            }
        }
        let lora_flags = [
            ("--lora-rank", self.lora_rank.is_some()),
            ("--lora-alpha", self.lora_alpha.is_some()),
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own checks of the whole command line (a setting that does not fit an option's
    /// kind, as negative numbers on a flag that takes no value, say), where clap is built with
    /// debug assertions (Cargo.toml's dev profile builds dependencies without them).
    #[test]
    fn the_command_line_passes_claps_checks() {
        Cli::command_line().debug_assert();
    }

    /// A negative number reaches its option: taken by a signed one, refused by an unsigned
    /// one in a line naming it; clap's other errors come out as one line too.
    #[test]
    fn negative_numbers_reach_their_options() {
        let parse = |line: &str| {
            let args: Vec<std::ffi::OsString> = line.split(' ').map(Into::into).collect();
            Cli::try_parse_args(&args).map_err(|e| usage_error_line(&e, &args))
        };
        let Ok(Cli {
            command: Command::Generate(g),
        }) = parse("temper generate --checkpoint c --temperature -1 --prompt -2")
        else {
            panic!("a negative temperature and prompt are values")
        };
        assert_eq!(
            (g.temperature, &g.prompt[..]),
            (Some(-1.0), &["-2".to_string()][..])
        );
        let e = parse("temper sft --lora-rank -4").unwrap_err();
        assert_eq!(
            e,
            "invalid value '-4' for '--lora-rank <LORA_RANK>': a whole number, 0 or more \
             (see `temper sft --help`)"
        );
        let e = parse("temper tokenizer encode c --out o --shard-tokens").unwrap_err();
        assert!(
            e.contains("'--shard-tokens <SHARD_TOKENS>'") && !e.contains('\n'),
            "{e}"
        );
        assert!(e.ends_with("(see `temper tokenizer encode --help`)"), "{e}");
    }

    /// The `gpt2` preset's schedule is a default: a config file's value stands, even one equal
    /// to the stage's own default, and a flag beats both.
    #[test]
    fn the_gpt2_preset_brings_its_own_schedule_and_files_and_flags_still_win() {
        let d = tempfile::tempdir().unwrap();
        let resolve = |file: Option<&str>, lr: Option<f64>| {
            let config = file.map(|text| {
                let f = d.path().join("c.toml");
                std::fs::write(&f, text).unwrap();
                f
            });
            let args = StageArgs {
                model: Some("gpt2".into()),
                config,
                lr,
                out: Some(d.path().join("run")),
                ..Default::default()
            };
            let (cfg, _, _) = args.resolve(Stage::Pretrain).unwrap();
            (cfg.train.lr, cfg.train.warmup_steps)
        };
        assert_eq!(resolve(None, None), (6e-4, 700));
        let stage_default = RunConfig::for_stage(Stage::Pretrain).train;
        let text = format!(
            "[train]\nlr = {:?}\nwarmup_steps = {}\n",
            stage_default.lr, stage_default.warmup_steps
        );
        assert_eq!(
            resolve(Some(&text), None),
            (stage_default.lr, stage_default.warmup_steps)
        );
        assert_eq!(resolve(Some("[train]\nsteps = 9\n"), None), (6e-4, 700));
        assert_eq!(resolve(Some(&text), Some(1e-4)).0, 1e-4);
    }

    /// --reward, --beta, --tokenizer and LoRA's flags are refused where the stage would not
    /// read them, and taken where it would.
    #[test]
    fn flags_a_stage_would_not_read_are_refused() {
        let refused = |args: StageArgs, stage: Stage| {
            args.apply(&mut RunConfig::for_stage(stage))
                .unwrap_err()
                .to_string()
        };
        let reward = || StageArgs {
            rewards: vec!["task".parse().unwrap()],
            ..Default::default()
        };
        let e = refused(reward(), Stage::Sft);
        assert!(
            e.starts_with("--reward applies to ppo, grpo and online-dpo"),
            "{e}"
        );
        assert!(e.ends_with("not sft"), "{e}");
        for stage in [Stage::Ppo, Stage::Grpo, Stage::OnlineDpo] {
            reward().apply(&mut RunConfig::for_stage(stage)).unwrap();
        }
        let beta = || StageArgs {
            beta: Some(0.3),
            ..Default::default()
        };
        assert!(refused(beta(), Stage::Sft).contains("--beta applies to ppo, dpo"));
        assert!(refused(beta(), Stage::Reward).ends_with("not reward"));
        let mut cfg = RunConfig::for_stage(Stage::Dpo);
        beta().apply(&mut cfg).unwrap();
        assert_eq!(cfg.dpo.beta, 0.3);
        let tokenizer = StageArgs {
            tokenizer: Some("tok.json".into()),
            ..Default::default()
        };
        let e = refused(tokenizer, Stage::Sft);
        assert!(e.starts_with("--tokenizer applies to pretrain"), "{e}");
        let lora = || StageArgs {
            lora_rank: Some(4),
            ..Default::default()
        };
        let e = refused(lora(), Stage::Pretrain);
        assert!(
            e.starts_with("--lora-rank applies to the stages from --init"),
            "{e}"
        );
        let mut cfg = RunConfig::for_stage(Stage::Sft);
        lora().apply(&mut cfg).unwrap();
        assert_eq!(cfg.lora.rank, 4);
        let template = StageArgs {
            chat_template: Some("t.jinja".into()),
            ..Default::default()
        };
        let e = refused(template, Stage::Pretrain);
        assert!(
            e.starts_with("--chat-template applies to the stages that render"),
            "{e}"
        );
        // --seq-len sizes the rows of pretraining and of packed SFT only.
        let seq = |packing: bool| StageArgs {
            seq_len: Some(32),
            packing,
            ..Default::default()
        };
        let e = refused(seq(false), Stage::Sft);
        assert!(
            e.contains("--seq-len") && e.contains("not sft without packing"),
            "{e}"
        );
        assert!(refused(seq(false), Stage::Dpo).contains("not dpo"));
        for (stage, packing) in [(Stage::Pretrain, false), (Stage::Sft, true)] {
            let mut cfg = RunConfig::for_stage(stage);
            seq(packing).apply(&mut cfg).unwrap();
            assert_eq!(cfg.train.seq_len, 32);
        }
    }

    /// A value that fails validation is named by the line of the file that set it, and by
    /// the flag where a flag set it.
    #[test]
    fn a_bad_value_is_blamed_on_what_set_it() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("e.toml");
        std::fs::write(
            &f,
            "[train]\nbeta1 = 0.9\nbeta2 = 1.5\n[lora]\ndropout = 0.1\n",
        )
        .unwrap();
        let resolve = |file: &Path, dropout: Option<f64>| {
            let args = StageArgs {
                config: Some(file.to_path_buf()),
                lora_dropout: dropout,
                out: Some(d.path().join("run")),
                ..Default::default()
            };
            args.resolve(Stage::Sft).unwrap_err().to_string()
        };
        let e = resolve(&f, None);
        assert!(
            e.starts_with(&format!("{}:3: train.beta2", f.display())),
            "{e}"
        );
        let good = d.path().join("good.toml");
        std::fs::write(&good, "[lora]\nrank = 4\ndropout = 0.1\n").unwrap();
        let e = resolve(&good, Some(1.5));
        assert_eq!(e, "--lora-dropout: lora.dropout must be in [0, 1)");
        // With no file at all, the flag is named too.
        let no_file = StageArgs {
            steps: Some(0),
            out: Some(d.path().join("run")),
            ..Default::default()
        };
        let e = no_file.resolve(Stage::Sft).unwrap_err().to_string();
        assert_eq!(e, "--steps: train.steps must be positive");
        // A stage's own coefficient, set by the shared --beta.
        let beta = StageArgs {
            beta: Some(0.0),
            out: Some(d.path().join("run")),
            ..Default::default()
        };
        let e = beta.resolve(Stage::Dpo).unwrap_err().to_string();
        assert!(e.starts_with("--beta: dpo.beta must be positive"), "{e}");
    }

    /// `[train] profile` in a config file limits the run as `--profile` does: the timed steps
    /// and their warm-up, with no evaluation or checkpoint between.
    #[test]
    fn a_profile_from_a_file_limits_the_run_as_the_flag_does() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("p.toml");
        std::fs::write(&f, "[train]\nsteps = 500\nprofile = 3\n").unwrap();
        let from_file = StageArgs {
            config: Some(f),
            out: Some(d.path().join("a")),
            ..Default::default()
        };
        let from_flag = StageArgs {
            profile: Some(3),
            out: Some(d.path().join("b")),
            ..Default::default()
        };
        let train = |a: StageArgs| a.resolve(Stage::Pretrain).unwrap().0.train;
        let (a, b) = (train(from_file), train(from_flag));
        let steps = 3 + crate::train::profile::WARMUP_STEPS;
        for t in [a, b] {
            assert_eq!((t.profile, t.steps, t.epochs), (3, steps, None));
            assert_eq!((t.eval_every, t.checkpoint_every), (steps, steps));
        }
    }

    /// Every scoped flag is refused by exactly the stages whose `--help` leaves it out (one
    /// list, `flag_scope`, decides both), with the flag as typed and the stage's command.
    #[test]
    fn a_scoped_flag_is_refused_where_its_help_is_hidden() {
        type Set = fn(&mut StageArgs);
        let flags: [(&str, &str, Set); 21] = [
            ("teacher", "--teacher", |a| a.teacher = Some("t".into())),
            ("lmbda", "--lmbda", |a| a.lmbda = Some(0.5)),
            ("advantage_estimator", "--advantage-estimator", |a| {
                a.advantage_estimator = Some(AdvantageEstimator::Rloo)
            }),
            (
                "importance_sampling_level",
                "--importance-sampling-level",
                |a| a.importance_sampling_level = Some(ImportanceSamplingLevel::Sequence),
            ),
            ("packing", "--packing", |a| a.packing = true),
            ("padding_free", "--padding-free", |a| a.padding_free = true),
            ("completion_only_loss", "--completion-only-loss", |a| {
                a.completion_only_loss = Some(false)
            }),
            ("assistant_only_loss", "--assistant-only-loss", |a| {
                a.assistant_only_loss = Some(false)
            }),
            ("neftune_noise_alpha", "--neftune-noise-alpha", |a| {
                a.neftune_noise_alpha = Some(5.0)
            }),
            (
                "precompute_ref_log_probs",
                "--precompute-ref-log-probs",
                |a| a.precompute_ref_log_probs = true,
            ),
            ("sync_ref_model", "--sync-ref-model", |a| {
                a.sync_ref_model = true
            }),
            ("rewards", "--reward", |a| {
                a.rewards = vec!["task".parse().unwrap()]
            }),
            ("beta", "--beta", |a| a.beta = Some(0.2)),
            ("max_new_tokens", "--max-new-tokens", |a| {
                a.max_new_tokens = Some(8)
            }),
            ("tokenizer", "--tokenizer", |a| {
                a.tokenizer = Some("t.json".into())
            }),
            ("chat_template", "--chat-template", |a| {
                a.chat_template = Some("t.jinja".into())
            }),
            ("chat_template_kwargs", "--chat-template-kwargs", |a| {
                a.chat_template_kwargs = Some(Kwargs::new())
            }),
            ("lora_rank", "--lora-rank", |a| a.lora_rank = Some(4)),
            ("lora_alpha", "--lora-alpha", |a| a.lora_alpha = Some(8.0)),
            ("lora_dropout", "--lora-dropout", |a| {
                a.lora_dropout = Some(0.1)
            }),
            ("lora_targets", "--lora-targets", |a| {
                a.lora_targets = Some("q".into())
            }),
        ];
        for (field, flag, set) in flags {
            let stages = flag_stages(field).expect(field);
            for (command, stage) in STAGE_COMMANDS {
                let mut args = StageArgs::default();
                set(&mut args);
                let got = args.apply(&mut RunConfig::for_stage(stage));
                match stages.contains(&stage) {
                    true => assert!(
                        got.as_ref()
                            .map_or_else(|e| !e.to_string().contains("applies to"), |_| true),
                        "{flag} on {command}: {got:?}"
                    ),
                    false => {
                        let e = got.expect_err(flag).to_string();
                        assert!(
                            e.starts_with(&format!("{flag} applies to"))
                                && e.ends_with(&format!("not {command}")),
                            "{flag} on {command}: {e}"
                        );
                    }
                }
            }
        }
        let e = StageArgs {
            packing: true,
            ..Default::default()
        }
        .apply(&mut RunConfig::for_stage(Stage::Kto))
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "--packing applies to sft, ppo, grpo and online-dpo, not kto"
        );
    }

    /// GRPO's flags set GRPO's config, and elsewhere are refused rather than ignored.
    #[test]
    fn grpo_flags_apply_to_grpo_alone() {
        let args = StageArgs {
            importance_sampling_level: Some(ImportanceSamplingLevel::Sequence),
            advantage_estimator: Some(AdvantageEstimator::Rloo),
            ..Default::default()
        };
        let mut cfg = RunConfig::for_stage(Stage::Grpo);
        args.apply(&mut cfg).unwrap();
        assert_eq!(
            cfg.grpo.importance_sampling_level,
            ImportanceSamplingLevel::Sequence
        );
        assert_eq!(cfg.grpo.advantage_estimator, AdvantageEstimator::Rloo);
        let e = args
            .apply(&mut RunConfig::for_stage(Stage::Ppo))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--advantage-estimator applies to grpo, not ppo"),
            "{e}"
        );
    }

    /// SFT's own flags (loss scope, NEFTune) set `[sft]`, and elsewhere are refused.
    #[test]
    fn sft_flags_apply_to_sft_alone() {
        let args = StageArgs {
            completion_only_loss: Some(false),
            ..Default::default()
        };
        let mut cfg = RunConfig::for_stage(Stage::Sft);
        args.apply(&mut cfg).unwrap();
        assert!(!cfg.sft.completion_only_loss && cfg.sft.assistant_only_loss);
        let args = StageArgs {
            assistant_only_loss: Some(false),
            ..Default::default()
        };
        args.apply(&mut cfg).unwrap();
        assert!(!cfg.sft.completion_only_loss && !cfg.sft.assistant_only_loss);
        let e = args
            .apply(&mut RunConfig::for_stage(Stage::Dpo))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--assistant-only-loss applies to sft, not dpo"),
            "{e}"
        );
        let args = StageArgs {
            neftune_noise_alpha: Some(5.0),
            ..Default::default()
        };
        args.apply(&mut cfg).unwrap();
        assert_eq!(cfg.sft.neftune_noise_alpha, Some(5.0));
        let e = args
            .apply(&mut RunConfig::for_stage(Stage::Grpo))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--neftune-noise-alpha applies to sft, not grpo"),
            "{e}"
        );
        cfg.sft.neftune_noise_alpha = Some(0.0);
        let e = cfg.sft.validate().unwrap_err().to_string();
        assert!(e.contains("sft.neftune_noise_alpha"), "{e}");
    }
}
