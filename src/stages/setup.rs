//! What every stage does before and after its own part: load the `--init` checkpoint, build
//! the policy and its frozen reference, split data into train and held-out sets, check prompts
//! against the context, and hand the task to the shared loop with its checkpoint identity.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::loader::{
    model_tokens, policy_from, read_checkpoint, template_of, template_tokens, Loaded,
};
use super::rollout::FrozenReference;
use super::Env;
use crate::config::{Holdout, LoraConfig, ModelConfig, RunConfig, Stage, Truncation};
use crate::data::chat_template::ChatTemplate;
use crate::data::records::{
    load_shards, place, prompts_from, record_files, skipped_shards, ColumnReader, PromptRecord,
};
use crate::data::splits::warn_shared;
use crate::data::synthetic::{Split, Synthetic};
use crate::data::tokenizer::Tokenizer;
use crate::model::{hf, Transformer};
use crate::train::checkpoint::{resolve_checkpoint, CheckpointKind, CheckpointMeta};
use crate::train::params::{Net, ParamInfo, ParamStore, Role};
use crate::train::runner::{self, RunOpts, Saved, Task, TrainSummary};
use serde_json::{Map, Value};

/// The built-in task's world, as this run's config describes it.
pub fn synthetic(env: &Env) -> Synthetic {
    if env.cfg.stage != Stage::Pretrain {
        warn_template_unread(env, None, None);
    }
    let mut s = Synthetic::new(env.cfg.data.task_seed);
    s.max_operand = env.cfg.data.task_max_operand;
    s.carry_slip = env.cfg.data.task_carry_slip;
    s
}

/// Checks the held-out data file (`--eval-data`, `[data] eval_path`) where one is named: it
/// must exist (an error naming it otherwise), and it is the held-out set of `--data`, so on the
/// built-in task (no `--data`), which holds out its own examples, it is refused rather than
/// left unread. Run once per stage, by `Env`'s preparation, before the run directory is
/// touched; the stages then read `eval_path` as it is.
pub fn check_eval_data(cfg: &RunConfig) -> Result<()> {
    let data = &cfg.data;
    let Some(eval) = data.eval_path.as_deref() else {
        return Ok(());
    };
    if data.path.is_none() {
        bail!(
            "--eval-data {}: {} without --data runs the built-in task, which holds out its own \
             examples; --eval-data is the held-out set of a --data corpus: give --data too, or \
             leave --eval-data out",
            eval.display(),
            cfg.stage.name()
        );
    }
    std::fs::metadata(eval)
        .with_context(|| format!("--eval-data {}: cannot read", eval.display()))?;
    Ok(())
}

/// The checkpoint named by `--init`, with adapters merged; `what` says what the stage needs.
/// The chat template the run renders conversations with goes into its tokenizer's files
/// where they do not hold it already (a template given with `[data] chat_template`, as TRL's
/// `chat_template_path` does; a PEFT adapter's base's where its own tokenizer has none), so
/// that its checkpoints and exports render conversations as it trained on them.
pub fn init_checkpoint(env: &Env, what: &str) -> Result<Loaded> {
    let init =
        env.cfg.init.as_ref().with_context(|| {
            format!("{} needs --init CHECKPOINT ({what})", env.cfg.stage.name())
        })?;
    let mut loaded = read_checkpoint(init, &env.device)?;
    env.cfg
        .check_new_tokens(loaded.meta.model.max_position_embeddings)?;
    let used = match &env.cfg.data.chat_template {
        Some(path) => Some(
            ChatTemplate::load(path)?
                .with_model_tokens(template_tokens(&loaded.tokenizer_dir, &loaded.tokenizer)?),
        ),
        // A model whose template cannot be read still serves runs that render none.
        None => template_of(init).ok().flatten(),
    };
    let Some(used) = used else {
        return Ok(loaded);
    };
    let own = ChatTemplate::in_dir(&loaded.tokenizer_dir).ok().flatten();
    if own.is_some_and(|own| own.same_as(&used)) {
        return Ok(loaded);
    }
    // The byte-level tokenizer keeps the template too, with the tokens it names (text to it).
    let (bos, eos) = used.special_tokens();
    loaded.tokenizer = loaded
        .tokenizer
        .with_chat_template(used.source(), used.tool_use_source())
        .with_template_tokens(bos, eos);
    Ok(loaded)
}

/// The LoRA config when adapters are on.
pub fn lora(cfg: &RunConfig) -> Option<&LoraConfig> {
    cfg.lora.enabled().then_some(&cfg.lora)
}

/// The `--init` policy a stage trains (`what` says what it needs), with fresh adapters on a
/// frozen base under LoRA, its store and its tokenizer.
pub fn trained_policy(env: &Env, what: &str) -> Result<(ParamStore, Transformer, Tokenizer)> {
    let loaded = init_checkpoint(env, what)?;
    let mut store = ParamStore::new(env.device.clone(), env.cfg.train.seed);
    if lora(&env.cfg).is_some() {
        store.freeze(Net::Policy, &[Role::Base], env.dtype());
    }
    let net = policy_from(&loaded, &mut store, lora(&env.cfg))?;
    Ok((store, net, loaded.tokenizer))
}

/// A policy to train and the frozen reference it is held to (PPO, DPO, GRPO).
pub struct PolicyPair {
    /// The policy's parameters (and, for PPO, its critic's).
    pub store: ParamStore,
    pub policy: Transformer,
    /// None where the stage's loss reads no reference ([`PolicyPair::load_with`]).
    pub reference: Option<FrozenReference>,
    pub loaded: Loaded,
}

impl PolicyPair {
    /// The store, policy, reference and tokenizer, with the loaded copy of the weights
    /// dropped: the stores hold them now, and the copy would double the memory.
    pub fn into_parts(self) -> (ParamStore, Transformer, Option<FrozenReference>, Tokenizer) {
        (
            self.store,
            self.policy,
            self.reference,
            self.loaded.tokenizer,
        )
    }

    /// Loads the `--init` policy, with fresh adapters when LoRA is on, and its reference.
    pub fn load(env: &Env) -> Result<Self> {
        Self::load_with(env, true)
    }

    /// [`PolicyPair::load`]; `reference` false holds none (no frozen copy, and under LoRA no
    /// adapters-off forward), for a loss that reads no reference.
    pub fn load_with(env: &Env, reference: bool) -> Result<Self> {
        let loaded = init_checkpoint(env, "an SFT model")?;
        let lora = lora(&env.cfg);
        let mut store = ParamStore::new(env.device.clone(), env.cfg.train.seed);
        // Under LoRA the base is frozen: one copy, in the compute dtype, shared with the
        // reference (the same weights with the adapters off).
        if lora.is_some() {
            store.freeze(Net::Policy, &[Role::Base], env.dtype());
        }
        let policy = policy_from(&loaded, &mut store, lora)?;
        let copy = match lora {
            Some(_) => None,
            None if !reference => None,
            None => {
                // TR-DPO's moved reference is restored from the checkpoint instead.
                let synced = match env.cfg.stage {
                    Stage::Dpo => env.cfg.dpo.sync_ref_model,
                    Stage::Grpo => env.cfg.grpo.sync_ref_model,
                    _ => false,
                };
                if !synced {
                    env.check_frozen("the reference (--init)", &loaded)?;
                }
                let mut rs = ParamStore::new(env.device.clone(), 0);
                rs.freeze(Net::Policy, &[Role::Base, Role::Head], env.dtype());
                let net = policy_from(&loaded, &mut rs, None)?;
                Some((net, rs))
            }
        };
        Ok(Self {
            store,
            policy,
            reference: reference.then(|| FrozenReference::new(copy)),
            loaded,
        })
    }
}

/// The chat template conversational records are rendered with: `--chat-template` (or
/// `[data] chat_template`: a `.jinja` file, a tokenizer_config.json or a model directory),
/// else the `--init` model's own (see [`template_of`]), else none (the built-in template);
/// with `[data] chat_template_kwargs` among its variables.
pub fn chat_template(env: &Env) -> Result<Option<ChatTemplate>> {
    let data = &env.cfg.data;
    let found = match (&data.chat_template, &env.cfg.init) {
        (Some(t), None) => Some(ChatTemplate::load(t)?),
        (Some(t), Some(model)) => {
            Some(ChatTemplate::load(t)?.with_model_tokens(model_tokens(model)?))
        }
        (None, None) => None,
        (None, Some(model)) => template_of(model)?,
    };
    with_kwargs(found, &data.chat_template_kwargs)
}

/// `explicit` when given, else `loaded`'s own (see [`template_of`]), else none; with `kwargs`
/// among its variables.
pub fn chat_template_of(
    explicit: Option<&Path>,
    kwargs: &Map<String, Value>,
    loaded: &Loaded,
) -> Result<Option<ChatTemplate>> {
    let found = match explicit {
        Some(t) => Some(
            ChatTemplate::load(t)?
                .with_model_tokens(template_tokens(&loaded.tokenizer_dir, &loaded.tokenizer)?),
        ),
        None => template_of(&loaded.dir)?,
    };
    with_kwargs(found, kwargs)
}

/// Says that the chat template keywords the run asked for (`--chat-template-kwargs`, `[data]
/// chat_template_kwargs`) went unused where `template` rendered no record of `data` (the
/// built-in task's, where `data` is none). (A template given renders nothing then either, but
/// is saved with the model, as TRL's `chat_template_path` is: that is not said.)
pub fn warn_template_unread(env: &Env, template: Option<&ChatTemplate>, data: Option<&Path>) {
    let d = &env.cfg.data;
    if d.chat_template_kwargs.is_empty() || template.is_some_and(ChatTemplate::used) {
        return;
    }
    let whose = match (data, &d.eval_path) {
        (Some(p), Some(e)) => format!(
            "no record of {} or {} is a conversation",
            p.display(),
            e.display()
        ),
        (Some(p), None) => format!("no record of {} is a conversation", p.display()),
        (None, _) => "the built-in task has no conversations".to_string(),
    };
    crate::console::warn_once(format!(
        "warning: --chat-template-kwargs ([data] chat_template_kwargs) is not used: {whose}; \
         plain text is tokenized as it is"
    ));
}

/// `template` with `kwargs`; kwargs without a Jinja template to read them are refused, as
/// the built-in template takes none.
fn with_kwargs(
    template: Option<ChatTemplate>,
    kwargs: &Map<String, Value>,
) -> Result<Option<ChatTemplate>> {
    match template {
        Some(t) => Ok(Some(t.with_kwargs(kwargs)?)),
        None if kwargs.is_empty() => Ok(None),
        None => bail!(
            "chat_template_kwargs: no Jinja chat template reads them (the model has none and \
             no --chat-template is given; the built-in template takes no variables)"
        ),
    }
}

/// `1 example`, `2 examples`: a count of `what` (a plural).
fn counted(n: usize, what: &str) -> String {
    match n {
        1 => format!("1 {}", what.strip_suffix('s').unwrap_or(what)),
        n => format!("{n} {what}"),
    }
}

/// `(train, held-out)`: the held-out file when one is named (all of the data then trains),
/// else `val_fraction` of the records (at least one), as `[data] holdout` says: drawn from
/// the whole file by a fixed hash of each record's place, as TRL's `train_test_split`
/// shuffles (a file sorted by label or topic would otherwise hold out only its tail), and the
/// same whatever the seed, so that a later stage on the same file holds out the same records;
/// or the file's tail. Each part keeps the file's order.
pub fn split_holdout<T>(
    env: &Env,
    path: &Path,
    load: impl Fn(&Path) -> Result<Vec<T>>,
    what: &str,
) -> Result<(Vec<T>, Vec<T>)> {
    let data = &env.cfg.data;
    let load_all = |files: &[PathBuf], dir: &Path| -> Result<Vec<T>> {
        let (all, empty) = load_shards(files, &load)?;
        if let (Some(w), true) = (skipped_shards(files, &empty, dir), env.comm.rank() == 0) {
            crate::errln!("warning: {w}");
        }
        say_builtin_template(env);
        Ok(all)
    };
    let train_files = record_files(path, data.train_part())?;
    let mut all = load_all(&train_files, path)?;
    if let Some(e) = data.held_out_path() {
        let eval_files = record_files(e, data.held_out_part())?;
        if env.comm.rank() == 0 {
            warn_shared(&train_files, &eval_files, &data.held_out_by());
        }
        let eval = load_all(&eval_files, e)?;
        if env.comm.rank() == 0 {
            let from = match e == path {
                true => data.held_out_by(),
                false => e.display().to_string(),
            };
            crate::errln!(
                "[{}] {}: {} {}; {} held out ({from})",
                env.cfg.stage,
                path.display(),
                counted(all.len(), what),
                match all.len() {
                    1 => "trains",
                    _ => "train",
                },
                eval.len()
            );
        }
        return Ok((all, eval));
    }
    if all.len() < 2 {
        bail!(
            "{}: needs at least 2 {what} to hold one out",
            path.display()
        );
    }
    let n = ((all.len() as f64 * env.cfg.data.val_fraction).round() as usize).max(1);
    let held: std::collections::HashSet<usize> = match env.cfg.data.holdout {
        Holdout::Random => held_out_indices(all.len(), n),
        Holdout::Tail => (all.len() - n..all.len()).collect(),
    };
    let (mut train, mut eval) = (Vec::with_capacity(all.len() - n), Vec::with_capacity(n));
    for (i, record) in all.drain(..).enumerate() {
        match held.contains(&i) {
            true => eval.push(record),
            false => train.push(record),
        }
    }
    if env.comm.rank() == 0 {
        crate::errln!(
            "[{}] {}: {} {}, {} held out ([data] val_fraction {}, holdout {}; \
             --eval-data names others)",
            env.cfg.stage,
            path.display(),
            counted(train.len(), what),
            match train.len() {
                1 => "trains",
                _ => "train",
            },
            eval.len(),
            env.cfg.data.val_fraction,
            match env.cfg.data.holdout {
                Holdout::Random => "random",
                Holdout::Tail => "tail",
            }
        );
    }
    Ok((train, eval))
}

/// Says, once, that the data's conversations rendered with the built-in template: TRL refuses
/// conversations for a tokenizer without a chat template, and a model trained on temper's
/// template leaves with none that transformers or vLLM would render its chats with.
fn say_builtin_template(env: &Env) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static SAID: AtomicBool = AtomicBool::new(false);
    let rendered = crate::data::records::BUILTIN_TEMPLATE_RENDERED.load(Ordering::Relaxed);
    if rendered && env.comm.rank() == 0 && !SAID.swap(true, Ordering::Relaxed) {
        crate::errln!(
            "note: [{}] conversations render with temper's built-in chat template \
             (\"<|user|>\\n...\\n<|assistant|>\\n\"): the model has none and no --chat-template \
             is given, so its checkpoints and exports carry none, and transformers or vLLM would \
             render its chats otherwise (--chat-template FILE trains with one they read)",
            env.cfg.stage
        );
    }
}

/// `n` of the indices `0..len`: those whose hashes are smallest.
fn held_out_indices(len: usize, n: usize) -> std::collections::HashSet<usize> {
    let key = crate::train::rng::splitmix64(0x5EED_4E1D);
    let mut order: Vec<(u64, usize)> = (0..len)
        .map(|i| (crate::train::rng::splitmix64(key ^ i as u64), i))
        .collect();
    order.sort_unstable();
    order.into_iter().take(n).map(|(_, i)| i).collect()
}

/// Training and held-out prompts: the built-in task's, or the prompt files named.
pub fn prompt_sets(
    env: &Env,
    n_train: usize,
    n_eval: usize,
) -> Result<(Vec<PromptRecord>, Vec<PromptRecord>)> {
    let (train, eval) = prompt_sets_unchecked(env, n_train, n_eval)?;
    if train.is_empty() || eval.is_empty() {
        bail!(
            "{}: needs training and held-out prompts ({} and {} here)",
            env.cfg.stage,
            train.len(),
            eval.len()
        );
    }
    Ok((train, eval))
}

fn prompt_sets_unchecked(
    env: &Env,
    n_train: usize,
    n_eval: usize,
) -> Result<(Vec<PromptRecord>, Vec<PromptRecord>)> {
    match &env.cfg.data.path {
        None => {
            let s = synthetic(env);
            Ok((
                s.prompts(Split::Train, n_train),
                s.prompts(Split::Eval, n_eval),
            ))
        }
        Some(p) => {
            let template = chat_template(env)?;
            let reader = ColumnReader::new(&env.cfg.data.columns);
            let read = |f: &Path| reader.read(f);
            let load = |f: &Path| prompts_from(f, read(f)?, template.as_ref());
            let sets = split_holdout(env, p, load, "prompts")?;
            reader.check(p)?;
            warn_template_unread(env, template.as_ref(), Some(p));
            Ok(sets)
        }
    }
}

/// Every prompt's ids, each checked to fit the context with room for `new_tokens` of
/// response (errors name the record).
pub fn encode_prompts(
    tok: &Tokenizer,
    prompts: &[PromptRecord],
    new_tokens: usize,
    ctx: usize,
) -> Result<Vec<Vec<u32>>> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ids = p.ids(tok)?;
            let (n, place) = (ids.len(), place(&p.origin, "prompt", i));
            if n == 0 {
                bail!("{place}: field \"prompt\": empty after tokenisation");
            }
            if n + new_tokens > ctx {
                bail!(
                    "{place}: field \"prompt\": {n} tokens plus {new_tokens} new tokens exceed the model's context of {ctx} tokens"
                );
            }
            Ok(ids)
        })
        .collect()
}

/// PPO's and GRPO's training and held-out prompts ([`prompt_sets`]) fitted to the context
/// with room for `new_tokens` (`fit_prompts`), each set checked by `check` (that the
/// reward sources find what they need).
pub fn rollout_prompt_sets(
    env: &Env,
    tok: &Tokenizer,
    counts: (usize, usize),
    new_tokens: usize,
    ctx: usize,
    check: impl Fn(&[&[PromptRecord]]) -> Result<()>,
) -> Result<(Vec<PromptRecord>, Vec<PromptRecord>)> {
    let (train, eval) = prompt_sets(env, counts.0, counts.1)?;
    let fit = |set, what| fit_prompts(env, tok, set, new_tokens, ctx, what);
    let (train, eval) = (fit(train, "training")?, fit(eval, "held-out")?);
    if train.is_empty() || eval.is_empty() {
        bail!(
            "{}: no training or no held-out prompt is left once fitted to the model's context with room for its responses (the lines above say which were left out, and why)",
            env.cfg.stage
        );
    }
    check(&[&train, &eval])?;
    Ok((train, eval))
}

/// The prompts of a rollout set that fit the context with room for `new_tokens` (PPO, GRPO):
/// under `[data] truncation = "drop"` those that do not are left out, said in one line;
/// otherwise one that does not is an error naming its record ([`encode_prompts`]).
fn fit_prompts(
    env: &Env,
    tok: &Tokenizer,
    prompts: Vec<PromptRecord>,
    new_tokens: usize,
    ctx: usize,
    what: &str,
) -> Result<Vec<PromptRecord>> {
    if env.cfg.data.truncation != Truncation::Drop {
        encode_prompts(tok, &prompts, new_tokens, ctx).map_err(|e| match e.to_string() {
            m if m.contains("exceed") => {
                anyhow::anyhow!("{m} ([data] truncation = \"drop\" leaves such prompts out)")
            }
            _ => e,
        })?;
        return Ok(prompts);
    }
    let n = prompts.len();
    let mut kept = Vec::with_capacity(n);
    for (i, p) in prompts.into_iter().enumerate() {
        let len = p.ids(tok)?.len();
        if len == 0 {
            let place = place(&p.origin, "prompt", i);
            bail!("{place}: field \"prompt\": empty after tokenisation");
        }
        if len + new_tokens <= ctx {
            kept.push(p);
        }
    }
    let dropped = n - kept.len();
    if dropped > 0 && env.comm.rank() == 0 {
        errln!(
            "[{}] {dropped} of {n} {what} prompts left no room for {new_tokens} new tokens in the model's context of {ctx} ([data] truncation = \"drop\"): left out",
            env.cfg.stage
        );
    }
    Ok(kept)
}

/// How a stage runs the shared loop: what its checkpoints hold, and whether to evaluate
/// before the first step.
pub struct Plan<'a> {
    pub kind: CheckpointKind,
    pub model: &'a ModelConfig,
    pub lora: Option<&'a LoraConfig>,
    pub tokenizer: &'a Tokenizer,
    pub eval_at_start: bool,
}

impl<'a> Plan<'a> {
    /// A policy's plan (transformer + LM head), evaluated before the first step.
    pub fn policy(
        model: &'a ModelConfig,
        lora: Option<&'a LoraConfig>,
        tokenizer: &'a Tokenizer,
    ) -> Self {
        Self {
            kind: CheckpointKind::Policy,
            model,
            lora,
            tokenizer,
            eval_at_start: true,
        }
    }
}

/// `init` as an absolute path where it is a Hugging Face model directory: the base a LoRA
/// run's adapters sit on unchanged (a checkpoint's or a PEFT adapter's adapters are merged
/// into the base they load, which is then no model directory of its own).
fn hf_base(init: Option<&Path>) -> Option<PathBuf> {
    let init = init.filter(|p| crate::model::hf::is_model_dir(p))?;
    std::fs::canonicalize(init).ok()
}

/// The run's configuration with `steps` from `[train] epochs` where that is set: enough steps
/// of `batch_size × grad_accum × world` items for `epochs` passes over the task's training set
/// (said on stderr).
fn epochs_to_steps<T: Task>(env: &Env, task: &T) -> Result<RunConfig> {
    let mut cfg = env.cfg.clone();
    let (Some(epochs), Some(items)) = (cfg.train.epochs, task.epoch_items()) else {
        return Ok(cfg);
    };
    let t = &mut cfg.train;
    let per_step = t.batch_size * t.grad_accum * env.comm.world();
    let steps = (epochs * items as f64 / per_step as f64).ceil();
    // config.toml holds steps as an i64.
    if steps > i64::MAX as f64 {
        bail!("train.epochs = {epochs}: {items} items at {per_step} a step come to {steps:.0} steps, more than a run can count");
    }
    t.steps = (steps as usize).max(1);
    if env.comm.rank() == 0 {
        errln!(
            "[{}] {epochs} epoch{} of {items} items at {per_step} a step: {} steps",
            cfg.stage,
            if epochs == 1.0 { "" } else { "s" },
            t.steps
        );
    }
    Ok(cfg)
}

/// Runs the shared loop on `task` over the parameters of `store` that `trainable` accepts,
/// as `plan` says.
pub fn train<T: Task>(
    env: &Env,
    task: &mut T,
    store: &ParamStore,
    plan: Plan,
    trainable: &dyn Fn(ParamInfo) -> bool,
) -> Result<TrainSummary<T::Eval>> {
    let cfg = &env.cfg;
    let saved = Saved {
        store,
        meta: CheckpointMeta {
            stage: cfg.stage,
            kind: plan.kind,
            model: plan.model.clone(),
            lora: plan.lora.cloned(),
            step: 0,
            base: plan.lora.and(hf_base(cfg.init.as_deref())),
        },
        tokenizer: plan.tokenizer,
    };
    // The run's files name the steps the epochs came to (the rank that writes them, again on
    // a resume).
    let run = epochs_to_steps(env, task)?;
    let by_epochs = run.train.steps != cfg.train.steps;
    let write_files = || {
        env.save_run_files()?;
        match by_epochs {
            true => run.save(&env.run_dir),
            false => Ok(()),
        }
    };
    if by_epochs && env.comm.rank() == 0 && !env.resume {
        run.save(&env.run_dir)?;
    }
    let checkpointed = || env.checkpointed();
    runner::train(
        task,
        &saved,
        trainable,
        &RunOpts {
            cfg: &run.train,
            comm: env.comm.as_ref(),
            run_dir: &env.run_dir,
            resume: env.resume,
            on_resumed: env
                .resume
                .then_some(&write_files as &dyn Fn() -> Result<()>),
            on_checkpoint: Some(&checkpointed),
            label: cfg.stage.name(),
            eval_at_start: plan.eval_at_start,
            optimizer: env.kernels.adamw,
        },
    )
}

/// A run from `--init` trains the model it loads: `cfg.model` becomes that model, so that the
/// run's checks and its config.toml are about it. Keys of `user_model` (a config file's
/// `[model]` table, from `file`) that say otherwise are named as unused: one file may serve a
/// pretraining run and the stages after it, where they agree.
pub fn take_init_model(
    cfg: &mut RunConfig,
    user_model: Option<&toml::Value>,
    file: Option<&Path>,
) -> Result<()> {
    let Some(init) = &cfg.init else {
        return Ok(());
    };
    cfg.model = super::loader::model_of(init)?;
    let (Some(toml::Value::Table(user)), Some(file)) = (user_model, file) else {
        return Ok(());
    };
    let ours = toml::Value::try_from(&cfg.model)?;
    // `rope_theta = 10000` is the model's 10000.0.
    let number = |v: &toml::Value| v.as_float().or(v.as_integer().map(|i| i as f64));
    let same = |a: &toml::Value, b: &toml::Value| match (number(a), number(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    };
    let differ: Vec<&str> = user
        .iter()
        .filter(|(k, v)| !ours.get(k.as_str()).is_some_and(|o| same(o, v)))
        .map(|(k, _)| k.as_str())
        .collect();
    if !differ.is_empty() {
        crate::warnln!(
            "warning: {}: [model] {} not used: a run from --init trains the model it loads \
             ({}), which its config.toml records",
            file.display(),
            match differ.len() {
                1 => format!("{} is", differ[0]),
                _ => format!("{} are", differ.join(", ")),
            },
            init.display()
        );
    }
    Ok(())
}

/// Later stages on the built-in task use the world their init was trained in: a different
/// task seed would put the new stage's held-out pairs into the init's training data. The world
/// comes from the init run's `config.toml` unless the user's config (`user`, the file's table)
/// names it.
pub fn inherit_task_world(cfg: &mut RunConfig, user: Option<&toml::Value>) -> Result<()> {
    let Some(init) = &cfg.init else {
        return Ok(());
    };
    // A run on the user's data has no world to take; nor has a Hugging Face model, never
    // trained on the built-in task (`recorded_task_world`).
    if cfg.data.path.is_some() {
        return Ok(());
    }
    let user_sets = user
        .and_then(|v| v.get("data"))
        .is_some_and(|d| d.get("task_seed").is_some() || d.get("task_max_operand").is_some());
    if user_sets {
        return Ok(());
    }
    let (seed, max) = recorded_task_world(init)?;
    if let Some(seed) = seed {
        cfg.data.task_seed = seed;
    }
    if let Some(max) = max {
        cfg.data.task_max_operand = max;
    }
    Ok(())
}

/// Whether `init` is a Hugging Face model, or a run (or one of its checkpoints) that began
/// from one through any chain of runs, each `config.toml` naming its own `init`: a stage from
/// an SFT run of a pretrained model holds that model's knowledge as much as one from the
/// model itself. Unreadable links end the chain (no).
pub fn descends_from_pretrained(init: &Path) -> bool {
    let mut at = init.to_path_buf();
    for _ in 0..64 {
        if hf::is_pretrained_dir(&at) {
            return true;
        }
        let Ok(ckpt) = resolve_checkpoint(&at) else {
            return false;
        };
        let Some(run_cfg) = run_config_of(&ckpt) else {
            return false;
        };
        let text = std::fs::read_to_string(&run_cfg).unwrap_or_default();
        let next = toml::from_str::<toml::Value>(&text)
            .ok()
            .and_then(|v| v.get("init")?.as_str().map(PathBuf::from));
        let Some(next) = next else {
            return false;
        };
        // A relative init is the run's own working directory's; failing that, its directory's.
        at = match next.is_relative() && !next.exists() {
            true => run_cfg.parent().map_or(next.clone(), |d| d.join(&next)),
            false => next,
        };
    }
    false
}

/// The `config.toml` of the run checkpoint `ckpt` belongs to (`RUN/final`,
/// `RUN/checkpoints/step-N`, or a run directory itself); none for one away from its run.
fn run_config_of(ckpt: &Path) -> Option<PathBuf> {
    ckpt.ancestors()
        .take(3)
        .map(|d| d.join("config.toml"))
        .find(|p| p.is_file())
}

/// The built-in task's `task_seed` and `task_max_operand` that the run of checkpoint `init`
/// records in its `config.toml`, each where it records one: none for a Hugging Face model, a
/// run on the user's data or a checkpoint away from its run directory.
pub fn recorded_task_world(init: &Path) -> Result<(Option<u64>, Option<u32>)> {
    if hf::is_pretrained_dir(init) {
        return Ok((None, None));
    }
    let Some(run_cfg) = run_config_of(&resolve_checkpoint(init)?) else {
        return Ok((None, None));
    };
    let text = std::fs::read_to_string(&run_cfg)?;
    let v: toml::Value = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", run_cfg.display(), e.message()))?;
    let Some(data) = v.get("data").filter(|d| d.get("path").is_none()) else {
        return Ok((None, None));
    };
    let int = |key: &str| data.get(key).and_then(toml::Value::as_integer);
    Ok((
        int("task_seed").map(|s| s as u64),
        int("task_max_operand").map(|m| m as u32),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run from a Hugging Face model, and a run from that run (by its directory or its
    /// final checkpoint, a relative init among them), descend from it; a run from scratch
    /// does not, nor does a chain with a missing link.
    #[test]
    fn init_chains_lead_back_to_a_pretrained_model() {
        let d = tempfile::tempdir().unwrap();
        let run = |name: &str, init: Option<&str>| {
            let dir = d.path().join(name);
            std::fs::create_dir_all(dir.join("final")).unwrap();
            std::fs::write(dir.join("final/meta.json"), "{}").unwrap();
            let line = init.map_or(String::new(), |i| format!("init = {i:?}\n"));
            std::fs::write(dir.join("config.toml"), format!("{line}stage = \"sft\"\n")).unwrap();
            dir
        };
        let hf = d.path().join("hf");
        std::fs::create_dir_all(&hf).unwrap();
        std::fs::write(hf.join("config.json"), "{}").unwrap();
        std::fs::write(hf.join("model.safetensors"), "").unwrap();
        assert!(descends_from_pretrained(&hf));
        let sft = run("sft", Some(hf.to_str().unwrap()));
        let dpo = run("dpo", Some(sft.join("final").to_str().unwrap()));
        assert!(descends_from_pretrained(&sft));
        assert!(descends_from_pretrained(&dpo.join("final")));
        // Relative to the run's directory where it is not found as given.
        let rel = run("rel", Some("../sft"));
        assert!(descends_from_pretrained(&rel));
        let scratch = run("scratch", None);
        assert!(!descends_from_pretrained(&scratch));
        let broken = run("broken", Some("/nonexistent/run"));
        assert!(!descends_from_pretrained(&broken));
    }

    /// A tokenizer_config.json without a template, or with `"chat_template": null` (as some
    /// base models ship), has none; one with a template gives it.
    #[test]
    fn a_null_chat_template_is_no_template() {
        let d = tempfile::tempdir().unwrap();
        let tc = d.path().join("tokenizer_config.json");
        assert!(ChatTemplate::in_dir(d.path()).unwrap().is_none());
        for body in [r#"{"eos_token": "x"}"#, r#"{"chat_template": null}"#] {
            std::fs::write(&tc, body).unwrap();
            assert!(ChatTemplate::in_dir(d.path()).unwrap().is_none(), "{body}");
        }
        std::fs::write(&tc, r#"{"chat_template": "{{ messages[0]['content'] }}!"}"#).unwrap();
        let t = ChatTemplate::in_dir(d.path()).unwrap().expect("a template");
        let m = [serde_json::json!({"role": "user", "content": "hi"})];
        assert_eq!(t.render(&m, true).unwrap(), "hi!");
    }

    /// The held-out records are drawn from the whole file, not its tail: a file sorted by
    /// label holds out some of each.
    #[test]
    fn held_out_records_come_from_the_whole_file() {
        let held = held_out_indices(100, 10);
        assert_eq!(held.len(), 10);
        // A smaller fraction holds out some of the same records, never others.
        assert!(held_out_indices(100, 3).is_subset(&held_out_indices(100, 10)));
        let first_half = held.iter().filter(|&&i| i < 50).count();
        assert!((1..10).contains(&first_half), "{held:?}");
    }
}
