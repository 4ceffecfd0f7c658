use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Result};

use temper::cli::{
    Cli, Command, EvalArgs, ExportArgs, GenerateArgs, LaunchArgs, StageArgs, TokenizerCmd,
};
use temper::config::Stage;
use temper::data::columns::Columns;
use temper::data::encode::{encode_corpus, EncodeOpts};
use temper::data::records::load_prompts_lazily;
use temper::data::splits::Part;
use temper::data::tokenizer::{train_bpe, Tokenizer};
use temper::dist::preempt::{self, Preempted, StopPoint, EXIT_PREEMPTED};
use temper::dist::{launch, Communicator, PeerFailed, Rank, ThreadGroup};
use temper::generate::SampleCfg;
use temper::hub_cache::{locate, Repo};
use temper::kernels::KernelSet;
use temper::model::linear::Ctx;
use temper::stages::eval::NOT_EVALUATED;
use temper::stages::loader::{policy_from, read_checkpoint};
use temper::stages::rewards::{check_prompts, RewardFn};
use temper::stages::sampling_defaults;
use temper::stages::setup::chat_template_of;
use temper::stages::{self, Env};
use temper::train::params::ParamStore;
use temper::{errln, outln, warnln};

#[global_allocator]
static HOST: temper::out_of_memory::HostAlloc = temper::out_of_memory::HostAlloc;

fn main() -> ExitCode {
    // A bug should still end with one readable line, not a backtrace; one that cannot panic
    // again on a closed stderr, as a panic inside the hook aborts (src/console.rs).
    std::panic::set_hook(Box::new(|info| {
        errln!("error: internal error: {info}");
    }));
    // candle's CPU thread pool spins at every barrier; on a small or shared machine (CI, a
    // laptop running other work) that costs more than the parallelism gains, so CPU runs use
    // one thread unless CANDLE_NUM_THREADS says otherwise.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_args(&args) {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e, &args),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<Preempted>().is_some() => {
            // Rank 0 says where the run stopped; the other ranks, and a launcher whose rank 0
            // said it on the same terminal, add nothing.
            if !e.downcast_ref::<Preempted>().is_some_and(|p| p.told) {
                temper::warnln!("{e}");
            }
            ExitCode::from(EXIT_PREEMPTED)
        }
        Err(e) if e.downcast_ref::<UsageError>().is_some() => {
            errln!("error: {e}");
            ExitCode::from(USAGE_ERROR)
        }
        Err(e) => {
            errln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Help and version as clap prints them (help on stdout, or on stderr where a command was
/// left out); any other usage error as one line, with exit code 2 as clap gives it.
fn usage_error(e: &clap::Error, args: &[std::ffi::OsString]) -> ExitCode {
    use clap::error::ErrorKind;
    if !e.use_stderr() || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        e.exit();
    }
    errln!("error: {}", temper::cli::usage_error_line(e, args));
    ExitCode::from(USAGE_ERROR)
}

/// clap's exit code for a command line it cannot read, kept for scripts that test for it.
const USAGE_ERROR: u8 = 2;

/// A command line that a command reads further than clap does (`launch -- STAGE ...`) and
/// cannot: it exits as clap's own usage errors do.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// The training stage a command runs, with its arguments.
fn training_stage(c: &Command) -> Option<(Stage, &StageArgs)> {
    Some(match c {
        Command::Pretrain(a) => (Stage::Pretrain, a),
        Command::Sft(a) => (Stage::Sft, a),
        Command::Reward(a) => (Stage::Reward, a),
        Command::Ppo(a) => (Stage::Ppo, a),
        Command::Dpo(a) => (Stage::Dpo, a),
        Command::Kto(a) => (Stage::Kto, a),
        Command::OnlineDpo(a) => (Stage::OnlineDpo, a),
        Command::Grpo(a) => (Stage::Grpo, a),
        Command::Distill(a) => (Stage::Distill, a),
        _ => return None,
    })
}

/// Runs a training stage in `env` and returns what it achieved, as a line for the user.
fn run_stage(stage: Stage, env: &Env) -> Result<String> {
    Ok(match stage {
        Stage::Pretrain => match stages::pretrain::run(env)?.val_loss {
            Some(l) => format!("pretrain: val loss {l:.4} (perplexity {:.2})", l.exp()),
            None => format!("pretrain: {NOT_EVALUATED}"),
        },
        Stage::Sft => {
            let r = stages::sft::run(env)?;
            let mut line = match r.eval_loss {
                Some(l) => format!("sft: held-out loss {l:.4}"),
                None => format!("sft: {NOT_EVALUATED}"),
            };
            if let (Some(b), Some(acc)) = (r.base_accuracy, r.accuracy) {
                line.push_str(&format!("\nsft: accuracy {acc:.3} (base model {b:.3})"));
            }
            line
        }
        Stage::Reward => match stages::reward::run(env)?.accuracy {
            Some(a) => format!("reward: held-out pairwise accuracy {a:.3}"),
            None => format!("reward: {NOT_EVALUATED}"),
        },
        Stage::Ppo => stages::ppo::run(env)?.describe(),
        Stage::Dpo => stages::dpo::run(env)?.describe(),
        Stage::Kto => stages::kto::run(env)?.describe(),
        Stage::OnlineDpo => stages::online_dpo::run(env)?.describe(),
        Stage::Grpo => stages::grpo::run(env)?.describe(),
        Stage::Distill => stages::distill::run(env)?.describe(),
    })
}

fn run(cli: Cli) -> Result<()> {
    if let Some((stage, a)) = training_stage(&cli.command) {
        let rank = Rank::from_env(|k| std::env::var(k).ok())?;
        temper::console::set_follower(!rank.is_main());
        // Under `temper launch` the launcher says that a signal came; so does rank 0 alone
        // under torchrun or srun, which signal every rank.
        preempt::set_quiet(!rank.is_main() || launch::launched(|k| std::env::var_os(k)));
        preempt::install()?;
        let (cfg, out, start) = a.resolve(stage)?;
        let env = Env::join(cfg, &out, start, &rank)?;
        let line = run_stage(stage, &env)?;
        if rank.is_main() {
            outln!("{line}");
        }
        return Ok(());
    }
    match cli.command {
        // Run above.
        Command::Pretrain(_)
        | Command::Sft(_)
        | Command::Reward(_)
        | Command::Ppo(_)
        | Command::Dpo(_)
        | Command::Kto(_)
        | Command::OnlineDpo(_)
        | Command::Grpo(_)
        | Command::Distill(_) => {}
        Command::Launch(a) => launch_cmd(&a)?,
        Command::Pipeline(a) => {
            // A signal stops the running stage at a checkpoint, as it stops a stage's own run.
            preempt::install()?;
            stages::pipeline::run(&a.options())?
        }
        Command::Generate(mut a) => {
            locate_inputs(&mut a.checkpoint, &mut a.prompts, &mut a.chat_template)?;
            generate_cmd(&a)?
        }
        Command::Eval(mut a) => {
            locate_inputs(&mut a.checkpoint, &mut a.prompts, &mut a.chat_template)?;
            eval_cmd(&a)?
        }
        Command::Export(mut a) => {
            a.checkpoint = locate(&a.checkpoint, Repo::Model, "--checkpoint")?;
            export_cmd(&a)?
        }
        Command::Tokenizer(TokenizerCmd::Train {
            files,
            columns,
            split,
            vocab_size,
            out,
            overwrite,
        }) => {
            if out.exists() && !overwrite {
                bail!(
                    "tokenizer train: {} exists: give --overwrite to replace it",
                    out.display()
                );
            }
            let files = (files.iter())
                .map(|f| locate(f, Repo::Dataset, "tokenizer train"))
                .collect::<Result<Vec<_>>>()?;
            let columns = text_columns(columns, "tokenizer train")?;
            // Before the corpus is read and trained on, which can take long.
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                temper::io::create_dirs(dir)?;
            }
            if out.is_dir() {
                bail!(
                    "tokenizer train: {}: a directory, where the tokenizer's file goes",
                    out.display()
                );
            }
            let part = Part::train().named(split.as_deref()).asked_by("--split");
            let t = train_bpe(&files, (columns.column("text"), part), vocab_size, &out)?;
            outln!("wrote {} ({})", out.display(), t.describe());
            // BPE stops merging where the corpus has no pair left to merge.
            if t.vocab_size() < vocab_size {
                warnln!(
                    "warning: tokenizer train: learnt {} tokens, fewer than --vocab-size \
                     {vocab_size}: the corpus has no more pairs to merge",
                    t.vocab_size()
                );
            }
        }
        Command::Tokenizer(TokenizerCmd::Encode {
            corpus,
            columns,
            split,
            tokenizer,
            out,
            shard_tokens,
            val_fraction,
            seed,
        }) => {
            let corpus = locate(&corpus, Repo::Dataset, "tokenizer encode")?;
            let tokenizer = (tokenizer.as_deref())
                .map(|t| locate(t, Repo::Model, "--tokenizer"))
                .transpose()?;
            let tok = match &tokenizer {
                Some(p) => Tokenizer::from_file(p)?,
                None => Tokenizer::bytes(),
            };
            // A model directory's tokenizer.json is the file copied beside the shards.
            let file = tokenizer.as_deref().map(temper::data::tokenizer::file_of);
            let columns = text_columns(columns, "tokenizer encode")?;
            let opts = EncodeOpts {
                column: columns.column("text"),
                part: Part::train().named(split.as_deref()).asked_by("--split"),
                tok: &tok,
                tokenizer_file: file.as_deref(),
                out: &out,
                shard_tokens,
                val_fraction,
                seed,
            };
            let e = encode_corpus(&corpus, &opts)?;
            outln!(
                "wrote {} shards to {}: {} documents, {} train / {} val tokens ({})",
                e.shards.len(),
                out.display(),
                e.documents,
                e.train_tokens,
                e.val_tokens,
                tok.describe()
            );
            if val_fraction > 0.0 && e.val_tokens == 0 {
                errln!(
                    "warning: --val-fraction {val_fraction}: no document went to validation ({}; \
                     the split is by whole document): pretraining on these shards holds out the \
                     training stream's tail instead",
                    temper::data::corpus::documents(e.documents)
                );
            }
        }
    }
    Ok(())
}

/// A tokenizer command's `--columns`, which names the text column alone.
fn text_columns(given: Option<Columns>, who: &str) -> Result<Columns> {
    let columns = given.unwrap_or_default();
    columns.check_as(Stage::Pretrain.record_fields(), who, "--columns")?;
    Ok(columns)
}

/// `--columns` of a prompt file, checked against the fields `who` reads; refused without
/// `--prompts` (`file`), which it would leave unread.
/// The Hub names among `generate`'s and `eval`'s inputs, read from the Hugging Face cache.
fn locate_inputs(
    checkpoint: &mut PathBuf,
    prompts: &mut Option<PathBuf>,
    chat_template: &mut Option<PathBuf>,
) -> Result<()> {
    *checkpoint = locate(checkpoint, Repo::Model, "--checkpoint")?;
    if let Some(p) = prompts {
        *p = locate(p, Repo::Dataset, "--prompts")?;
    }
    if let Some(t) = chat_template {
        *t = locate(t, Repo::Model, "--chat-template")?;
    }
    Ok(())
}

fn prompt_columns(given: Option<&Columns>, file: Option<&Path>, who: &str) -> Result<Columns> {
    if given.is_some() && file.is_none() {
        bail!("--columns names the columns of a --prompts file, and {who} is given none");
    }
    let columns = given.cloned().unwrap_or_default();
    columns.check_as(Stage::Grpo.record_fields(), who, "--columns")?;
    Ok(columns)
}

fn generate_cmd(a: &GenerateArgs) -> Result<()> {
    let device = temper::device::select(a.device)?;
    let loaded = read_checkpoint(&a.checkpoint, &device)?;
    let mut store = ParamStore::new(device.clone(), 0);
    let net = policy_from(&loaded, &mut store, None)?;
    let mut requests = stages::generate::inline_prompts(&a.prompt);
    let kwargs = a.chat_template_kwargs.clone().unwrap_or_default();
    let columns = prompt_columns(a.columns.as_ref(), a.prompts.as_deref(), "generate")?;
    if let Some(p) = &a.prompts {
        let part = Part::train().named(a.split.as_deref()).asked_by("--split");
        requests.extend(load_prompts_lazily((p, part), &columns, || {
            chat_template_of(a.chat_template.as_deref(), &kwargs, &loaded)
        })?);
    }
    check_template_used(
        a.chat_template.as_deref(),
        a.chat_template_kwargs.is_some(),
        &requests,
    )?;
    if requests.is_empty() {
        bail!("generate: give --prompt TEXT or --prompts FILE.jsonl");
    }
    if a.stop.iter().any(String::is_empty) {
        bail!("generate: --stop \"\" would end every completion before its first token");
    }
    if a.max_new_tokens == Some(0) {
        bail!("generate: --max-new-tokens must be positive");
    }
    let own = sampling_defaults::FromConfig::of(&loaded.tokenizer, &loaded.tokenizer_dir)?;
    // Unset, at most half the context: the built-in task's model holds 64 positions, and the
    // default 64 new tokens refused every prompt there.
    let context = loaded.meta.model.max_position_embeddings;
    // Where the number came from, as errors name it.
    let (max_new_tokens, said) = match (a.max_new_tokens, own.max_new_tokens) {
        (Some(n), _) => (n, format!("--max-new-tokens {n}")),
        (None, Some(n)) => (n, format!("the generation config's max_new_tokens {n}")),
        (None, None) => {
            let n = sampling_defaults::MAX_NEW_TOKENS.min((context / 2).max(1));
            (
                n,
                format!("the default max_new_tokens {n}, which --max-new-tokens sets"),
            )
        }
    };
    if max_new_tokens >= context {
        bail!(
            "generate: {said} leaves no room for a prompt in the model's context of {context} tokens"
        );
    }
    if let Some(n) = a.min_new_tokens.filter(|&n| n > max_new_tokens) {
        bail!("generate: --min-new-tokens {n} is more than the {max_new_tokens} new tokens allowed ({said})");
    }
    let cfg = SampleCfg {
        max_new_tokens,
        temperature: a.temperature.unwrap_or(own.temperature_or_default()),
        top_k: (a.top_k.or(own.top_k)).unwrap_or(sampling_defaults::TOP_K),
        top_p: (a.top_p.or(own.top_p)).unwrap_or(sampling_defaults::TOP_P),
        min_p: (a.min_p.or(own.min_p)).unwrap_or(0.0),
        repetition_penalty: (a.repetition_penalty.or(own.repetition_penalty)).unwrap_or(1.0),
        min_new_tokens: (a.min_new_tokens.or(own.min_new_tokens))
            .unwrap_or(0)
            .min(max_new_tokens),
        stop: a.stop.clone(),
        ..Default::default()
    };
    if let Some(said) = own.describe() {
        errln!("[generate] the checkpoint's generation_config.json sets {said} (flags override)");
    }
    let filters = [
        ("--top-k", a.top_k.is_some()),
        ("--top-p", a.top_p.is_some()),
        ("--min-p", a.min_p.is_some()),
    ];
    let unused: Vec<&str> = filters.iter().filter(|f| f.1).map(|f| f.0).collect();
    if cfg.temperature == 0.0 && !unused.is_empty() {
        let verb = match unused.len() {
            1 => "filters",
            _ => "filter",
        };
        errln!(
            "warning: generate: {} {verb} what is sampled, and temperature 0 decodes greedily",
            unused.join(", ")
        );
    }
    if own.samples_untempered() && a.temperature.is_none() {
        errln!(
            "[generate] temperature {} (the generation config asks to sample and names no \
             temperature; vLLM and transformers read it so)",
            sampling_defaults::CONFIG_TEMPERATURE
        );
    }
    if !own.unread.is_empty() {
        errln!(
            "warning: generate: the checkpoint's generation_config.json sets {}, which \
             transformers' generate applies and temper does not",
            own.unread.join(", ")
        );
    }
    let ctx = Ctx {
        dtype: temper::device::compute_dtype(Default::default(), &device),
        kernels: KernelSet::default().apply_spec(&a.kernels)?,
        use_lora: false,
        dropout_seed: None,
        neftune_alpha: None,
        tape: false,
        recompute_blocks: false,
    };
    let job = stages::generate::Job {
        cfg: &cfg,
        seed: a.seed,
        samples: a.samples,
        batch_rows: a.batch_size,
        shard: a.shard,
        rewards: &a.rewards,
        best_of: a.best_of,
        template: a.chat_template.as_deref(),
        template_kwargs: &kwargs,
        new_tokens_said: &said,
    };
    job.check()?;
    temper::out_of_memory::set_hint(temper::out_of_memory::hint_of(
        "temper generate",
        &[
            ("--batch-size", a.batch_size),
            ("--samples", a.samples),
            ("--max-new-tokens", max_new_tokens),
        ],
    ));
    let mut rewards = match a.rewards.is_empty() {
        true => None,
        false => {
            let r = RewardFn::load(
                &a.rewards,
                (&device, ctx.dtype),
                &loaded.tokenizer,
                &Default::default(),
                &|_, _| Ok(()),
            )?;
            check_prompts(&r, &[&requests])?;
            Some(r)
        }
    };
    let inputs: Vec<&std::path::Path> = a.prompts.iter().map(|p| p.as_path()).collect();
    let mut sink = stages::generate::Sink::open(a.out.as_deref(), a.resume, &inputs)?;
    let mut settings = job.settings(&a.checkpoint);
    settings.insert(
        stages::generate::WEIGHTS.into(),
        stages::frozen_inputs::weights_stamp(&loaded)?.into(),
    );
    let s = stages::generate::run(
        &net,
        ctx,
        &loaded.tokenizer,
        &requests,
        &job,
        rewards.as_mut(),
        &settings,
        &mut sink,
    )?;
    // Under --best-of a line stands for each prompt's samples.
    let per_line = a.samples / job.lines_per_prompt();
    if s.resumed > 0 {
        let lines = s.resumed / per_line;
        errln!("resumed after {lines} completions already written");
    }
    errln!(
        "generated {} completions, {} tokens in {:.2}s ({:.1} tokens/s)",
        s.rows,
        s.new_tokens,
        s.seconds,
        s.new_tokens as f64 / s.seconds.max(1e-9)
    );
    if let Some(mean) = s.mean_reward() {
        let what = match a.best_of {
            true => format!(", the best of each prompt's {}", a.samples),
            false => String::new(),
        };
        errln!(
            "wrote {} scored completions{what}: mean reward {mean:.4}",
            s.scored
        );
    }
    Ok(())
}

/// `--chat-template` and `--chat-template-kwargs` render conversational prompts (`"prompt":
/// [messages]`) only. The template file is read even where no prompt needs it, so that a wrong
/// path is refused rather than passed over; given for plain prompts, both are said to be
/// unused.
fn check_template_used(
    template: Option<&Path>,
    kwargs: bool,
    prompts: &[temper::data::records::PromptRecord],
) -> Result<()> {
    if let Some(t) = template {
        temper::data::chat_template::ChatTemplate::load(t)?;
    }
    let chat = prompts
        .iter()
        .any(|r| r.fields.get("prompt").is_some_and(|p| p.is_array()));
    for (given, flag) in [
        (template.is_some(), "--chat-template"),
        (kwargs, "--chat-template-kwargs"),
    ] {
        if given && !chat {
            errln!(
                "warning: {flag} is not used: no prompt is a conversation (a {{\"prompt\": \
                 [messages]}} record); plain text is tokenized as it is"
            );
        }
    }
    Ok(())
}

fn eval_cmd(a: &EvalArgs) -> Result<()> {
    if a.max_new_tokens == 0 {
        bail!("eval: --max-new-tokens must be positive (every answer would be empty)");
    }
    temper::out_of_memory::set_hint(temper::out_of_memory::hint_of(
        "temper eval",
        &[("--max-new-tokens", a.max_new_tokens)],
    ));
    let device = temper::device::select(a.device)?;
    let loaded = read_checkpoint(&a.checkpoint, &device)?;
    let mut store = ParamStore::new(device.clone(), 0);
    let net = policy_from(&loaded, &mut store, None)?;
    let task_seed = a.task_seed;
    // The built-in task's world where its held-out pairs are scored, for the result line.
    let mut task = None;
    let columns = prompt_columns(a.columns.as_ref(), a.prompts.as_deref(), "eval")?;
    let prompts = match &a.prompts {
        Some(p) => {
            let kwargs = a.chat_template_kwargs.clone().unwrap_or_default();
            let part = Part::held_out()
                .named(a.split.as_deref())
                .asked_by("--split");
            load_prompts_lazily((p, part), &columns, || {
                chat_template_of(a.chat_template.as_deref(), &kwargs, &loaded)
            })?
        }
        None => {
            let world = stages::eval::TaskWorld::of_checkpoint(&a.checkpoint, task_seed)?;
            if let Some(w) = world.other_world() {
                errln!("{w}");
            }
            let prompts = world.prompts();
            errln!(
                "[eval] the built-in task's {} held-out pairs: {}",
                prompts.len(),
                world.describe()
            );
            task = Some(world.task);
            prompts
        }
    };
    check_template_used(
        a.chat_template.as_deref(),
        a.chat_template_kwargs.is_some(),
        &prompts,
    )?;
    let ctx = Ctx {
        dtype: temper::device::compute_dtype(Default::default(), &device),
        kernels: KernelSet::default(),
        use_lora: false,
        dropout_seed: None,
        neftune_alpha: None,
        tape: false,
        recompute_blocks: false,
    };
    let context = loaded.meta.model.max_position_embeddings;
    if a.max_new_tokens >= context {
        bail!(
            "eval: --max-new-tokens {} leaves no room for a prompt in the model's context of {context} tokens",
            a.max_new_tokens
        );
    }
    // Each prompt that does not fit is named by its record, before any is answered.
    stages::setup::encode_prompts(&loaded.tokenizer, &prompts, a.max_new_tokens, context)
        .map_err(|e| anyhow::anyhow!("eval: {e} (--max-new-tokens {})", a.max_new_tokens))?;
    let reach = ("--max-new-tokens", a.max_new_tokens);
    if let Some(w) = stages::eval::answers_out_of_reach(&loaded.tokenizer, &prompts, reach)? {
        errln!("{w}");
    }
    let r = stages::eval::accuracy(
        &net,
        ctx,
        &loaded.tokenizer,
        &prompts,
        a.max_new_tokens,
        (64, true),
    )?;
    // Prompt and answer as JSON strings: escaped as a Python or JSON reader reads them back.
    let json = |s: &str| serde_json::Value::from(s).to_string();
    for (p, t, ok) in &r.samples {
        errln!(
            "{} {} -> {}",
            if *ok { "ok " } else { "bad" },
            json(p),
            json(t)
        );
    }
    let mut line = serde_json::json!({"accuracy": r.accuracy, "n": r.n});
    if let Some(t) = task {
        line["task_seed"] = t.seed.into();
        line["task_max_operand"] = t.max_operand.into();
    }
    outln!("{line}");
    Ok(())
}

fn export_cmd(a: &ExportArgs) -> Result<()> {
    let opts = stages::export::Options {
        format: a.format,
        overwrite: a.overwrite,
        dtype: a.dtype,
        max_shard_size: a.max_shard_size,
    };
    let what = stages::export::export(&a.checkpoint, &a.out, &opts)?;
    outln!("wrote {} ({what})", a.out.display());
    Ok(())
}

/// `temper launch --nproc-per-node N [--nnodes M --node-rank R --master-addr A
/// --master-port P] -- STAGE ARGS`: this node's data-parallel ranks of one training stage,
/// as child processes (or, with `--threads`, as threads of this process). A rank that fails
/// stops the others, and the launch fails with its error.
fn launch_cmd(a: &LaunchArgs) -> Result<()> {
    let argv: Vec<std::ffi::OsString> = std::iter::once("temper".into())
        .chain(a.command.iter().map(Into::into))
        .collect();
    let inner = match Cli::try_parse_args(&argv) {
        Ok(inner) => inner,
        // `launch ... -- sft --help`: the stage's own help.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let line = temper::cli::usage_error_line(&e, &argv);
            return Err(UsageError(format!("launch: {line}")).into());
        }
    };
    let Some((stage, args)) = training_stage(&inner.command) else {
        let e = "launch runs a training stage (pretrain, sft, reward, ppo, dpo, kto, \
                 online-dpo, grpo, distill)";
        return Err(UsageError(e.to_string()).into());
    };
    launch::check_counts(a.nproc_per_node, a.nnodes)?;
    if !a.threads {
        preempt::set_phase(preempt::Phase::Launching);
    }
    preempt::install()?;
    if a.threads {
        // clap refuses --threads beside the rendezvous flags.
        if a.nnodes != 1 {
            bail!("launch: --threads runs ranks inside one process, on one node");
        }
        return launch_threads(a.nproc_per_node, stage, args);
    }
    let single = a.nnodes == 1;
    let layout = launch::Layout {
        nproc_per_node: a.nproc_per_node,
        nnodes: a.nnodes,
        node_rank: a.node_rank,
        master_addr: match (&a.master_addr, single) {
            (Some(h), _) => h.clone(),
            (None, true) => "127.0.0.1".into(),
            (None, false) => bail!("launch: --nnodes {} needs --master-addr (the address of the node with --node-rank 0)", a.nnodes),
        },
        master_port: match (a.master_port, single) {
            (Some(p), _) => p,
            (None, true) => launch::free_port()?,
            (None, false) => 29500,
        },
    };
    let exe = std::env::current_exe()?;
    match launch::run(&layout, &exe, &a.command)? {
        launch::Ended::Done => Ok(()),
        launch::Ended::Preempted => Err(Preempted {
            at: StopPoint::Unknown,
            told: layout.node_rank == 0,
        }
        .into()),
    }
}

/// Ranks as threads of this process, sharing nothing but a [`ThreadGroup`].
fn launch_threads(n: usize, stage: Stage, args: &StageArgs) -> Result<()> {
    let (cfg, out, start) = args.resolve(stage)?;
    let group: Vec<Arc<ThreadGroup>> = ThreadGroup::new(n).into_iter().map(Arc::new).collect();
    let results: Vec<Result<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .iter()
            .map(|comm| {
                let (cfg, out) = (cfg.clone(), out.clone());
                s.spawn(move || {
                    temper::console::set_follower_thread(comm.rank() != 0);
                    let c: Arc<dyn Communicator> = comm.clone();
                    let r =
                        Env::prepare_in(cfg, &out, start, c).and_then(|env| run_stage(stage, &env));
                    if r.is_err() {
                        comm.abort();
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a rank panicked")))
            })
            .collect()
    });
    // The first rank's own error, not the `PeerFailed` of the ranks it stopped.
    let mut own: Option<anyhow::Error> = None;
    let mut stopped: Option<anyhow::Error> = None;
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok(line) if rank == 0 => outln!("{line}"),
            Ok(_) => {}
            Err(e) => {
                let slot = match e.downcast_ref::<PeerFailed>() {
                    Some(_) => &mut stopped,
                    None => &mut own,
                };
                // A stop's own line says all: every rank stopped alike.
                let e = match e.downcast_ref::<Preempted>() {
                    Some(_) => e,
                    None => e.context(format!("rank {rank}")),
                };
                slot.get_or_insert(e);
            }
        }
    }
    match own.or(stopped) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
