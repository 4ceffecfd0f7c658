//! `temper generate`: completions for a list of prompts, through the rollout engine in
//! batches of rows, written as JSONL as each batch finishes.
//!
//! `--samples N` draws N completions per prompt (vLLM's `n`, transformers'
//! `num_return_sequences`). They are consecutive rows of one batch (its size is rounded to a
//! multiple of N), so the engine prefills each prompt once. Row `r` (prompt `r / N`, sample
//! `r % N`) draws from the random stream keyed by the seed and `r`, so a completion does not
//! depend on the batch size, nor on the `--shard` (a contiguous part of the prompts, one
//! process per GPU) that samples it: rows keep their numbers in the whole file.
//!
//! `--reward` scores every completion as the RL stages score a rollout (the checker, reward
//! models, programs, endpoints) and writes the weighted sum and each source's score into its
//! line; with `--best-of`, only each prompt's best-scored sample is written (best-of-N, the
//! rejection sampling OpenRLHF's and RAFT's loops fine-tune on: the file is SFT data as it is,
//! `prompt` and `completion`).
//!
//! An output file gets a settings file beside it (`FILE.settings.json`: checkpoint, seed,
//! samples, sampling parameters). `--resume` checks it, and checks every complete line of the
//! file against the row it stands for, before it drops a last line cut short and writes on: the
//! completions the interrupted run would have written, bit for bit on the CPU, up to the
//! rounding that batch shapes change on a GPU (see [`crate::generate`]).

use std::fs::{File, OpenOptions};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use super::rewards::{Batch, RewardFn};
use super::setup::encode_prompts;
use crate::config::{RewardSource, RewardSpec};
use crate::data::records::PromptRecord;
use crate::data::tokenizer::Tokenizer;
use crate::generate::{generate, RowKeys, SampleCfg};
use crate::model::linear::Ctx;
use crate::model::Transformer;
use crate::train::progress::Progress;

/// What to sample, and how many rows go through the engine at once.
pub struct Job<'a> {
    pub cfg: &'a SampleCfg,
    pub seed: u64,
    /// Completions per prompt (at least 1).
    pub samples: usize,
    /// Rows per engine call (at least 1), rounded down to a multiple of `samples` (at least
    /// `samples`) so that a prompt's samples share one prefill: what bounds the KV cache and
    /// the prefill's activations, whatever the number of prompts.
    pub batch_rows: usize,
    /// The part of the prompts this process samples (`--shard K/N`; `0/1`: all).
    pub shard: Shard,
    /// What scores each completion (`--reward`; none: no scores).
    pub rewards: &'a [RewardSpec],
    /// Write only each prompt's best-scored sample (`--best-of`).
    pub best_of: bool,
    /// `--chat-template` and `--chat-template-kwargs`, which render message-list prompts.
    pub template: Option<&'a Path>,
    pub template_kwargs: &'a Map<String, Value>,
    /// `cfg.max_new_tokens` as a prompt that does not fit names it: the flag, the generation
    /// config's, or the default.
    pub new_tokens_said: &'a str,
}

/// Part `index` of `count` (`--shard K/N`): a contiguous share of the prompts, so that the
/// parts' outputs, concatenated in order, are the output of one process over all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// The prompts of this part, of `n`.
    pub fn range(self, n: usize) -> std::ops::Range<usize> {
        self.index * n / self.count..(self.index + 1) * n / self.count
    }
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parsed = s
            .split_once('/')
            .and_then(|(k, n)| Some((k.trim().parse().ok()?, n.trim().parse().ok()?)));
        match parsed {
            Some((index, count)) if index < count => Ok(Shard { index, count }),
            _ => Err(format!("{s:?}: expected K/N with 0 <= K < N, as 0/4")),
        }
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Job<'_> {
    /// Refuses what cannot run, before anything is opened or written: no rows, or best-of
    /// without a reward or without several samples.
    pub fn check(&self) -> Result<()> {
        if self.samples == 0 || self.batch_rows == 0 {
            bail!("generate: --samples and --batch-size must be at least 1");
        }
        let c = self.cfg;
        // NaN sampled NUL bytes, a negative temperature ran greedy and inf uniformly, unsaid.
        if !crate::config::greedy_or_sampling(c.temperature) {
            bail!(
                "generate: --temperature must be {}, got {}",
                crate::config::greedy_or_sampling_words(),
                crate::config::shown_f64(c.temperature)
            );
        }
        if !(c.top_p > 0.0 && c.top_p <= 1.0) {
            bail!("generate: --top-p must be in (0, 1], got {}", c.top_p);
        }
        if !(0.0..=1.0).contains(&c.min_p) {
            bail!("generate: --min-p must be in [0, 1], got {}", c.min_p);
        }
        if !(c.repetition_penalty > 0.0 && c.repetition_penalty.is_finite()) {
            bail!(
                "generate: --repetition-penalty must be positive (1: none), got {}",
                c.repetition_penalty
            );
        }
        // transformers refuses it too: greedy decoding's samples of a prompt are one text.
        if c.temperature == 0.0 && self.samples > 1 {
            bail!(
                "generate: --samples {} with greedy decoding (temperature 0) writes {} identical \
                 completions of each prompt; sample with a --temperature above 0",
                self.samples,
                self.samples
            );
        }
        if self.best_of && (self.rewards.is_empty() || self.samples < 2) {
            bail!("generate: --best-of keeps each prompt's best-scored sample: it needs --reward and --samples 2 or more");
        }
        Ok(())
    }

    /// Lines of output per prompt: one under `best_of`, else one per sample.
    pub fn lines_per_prompt(&self) -> usize {
        match self.best_of {
            true => 1,
            false => self.samples,
        }
    }

    /// What decides the completions (the batch size does not): kept beside an output file
    /// and checked when it is resumed. The scoring and the chat template are named only where
    /// given, so a file written without them resumes as it did before they were recorded (one
    /// begun with `--chat-template` by an older temper, which did not record it, does not).
    pub fn settings(&self, checkpoint: &Path) -> Map<String, Value> {
        // Paths absolute, so that a run resumed from another directory matches.
        let absolute = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        let checkpoint = absolute(checkpoint);
        let c = self.cfg;
        let v = serde_json::json!({
            "checkpoint": checkpoint.display().to_string(),
            "samples": self.samples,
            "seed": self.seed,
            "max_new_tokens": c.max_new_tokens,
            "temperature": c.temperature,
            "top_k": c.top_k,
            "top_p": c.top_p,
            "stop": c.stop,
            "shard": self.shard.to_string(),
        });
        let Value::Object(mut m) = v else {
            unreachable!("a JSON object literal")
        };
        if !self.rewards.is_empty() {
            let specs: Vec<String> = self
                .rewards
                .iter()
                .map(|r| match &r.source {
                    RewardSource::Model(p) => RewardSpec {
                        source: RewardSource::Model(absolute(p)),
                        weight: r.weight,
                    }
                    .to_string(),
                    _ => r.to_string(),
                })
                .collect();
            m.insert("rewards".into(), specs.into());
        }
        if self.best_of {
            m.insert("best_of".into(), true.into());
        }
        // Named only where they filter, as the fields above that came later.
        if c.min_p > 0.0 {
            m.insert("min_p".into(), c.min_p.into());
        }
        if c.repetition_penalty != 1.0 {
            m.insert("repetition_penalty".into(), c.repetition_penalty.into());
        }
        if c.min_new_tokens > 0 {
            m.insert("min_new_tokens".into(), c.min_new_tokens.into());
        }
        if let Some(t) = self.template {
            m.insert(
                "chat_template".into(),
                absolute(t).display().to_string().into(),
            );
        }
        if !self.template_kwargs.is_empty() {
            let kwargs = Value::Object(self.template_kwargs.clone());
            m.insert("chat_template_kwargs".into(), kwargs);
        }
        m
    }
}

/// Where the completions go.
pub enum Sink {
    Stdout,
    /// A JSONL file, appended to and synced after every batch.
    File {
        path: PathBuf,
        file: File,
        /// Continue what the file holds (else it was empty or new).
        resume: bool,
    },
}

/// The settings file beside an output file.
fn settings_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".settings.json");
    out.with_file_name(name)
}

impl Sink {
    /// Standard output when `path` is `None`. A file that exists and is not empty is refused
    /// unless `resume`: it would otherwise be overwritten. `inputs` (the prompts file) may
    /// not be the output.
    pub fn open(path: Option<&Path>, resume: bool, inputs: &[&Path]) -> Result<Self> {
        let Some(path) = path else {
            if resume {
                bail!("generate: --resume continues an --out file; none was given");
            }
            return Ok(Sink::Stdout);
        };
        let canonical = |p: &Path| p.canonicalize().ok();
        if canonical(path).is_some() && inputs.iter().any(|i| canonical(i) == canonical(path)) {
            bail!(
                "{}: is also the prompts file; write the completions elsewhere",
                path.display()
            );
        }
        if path.is_dir() {
            bail!(
                "--out {}: is a directory; name the JSONL file to write the completions to",
                path.display()
            );
        }
        let nonempty = std::fs::metadata(path).is_ok_and(|m| m.len() > 0);
        if nonempty && !resume {
            bail!(
                "{}: exists and is not empty; pass --resume to continue it, or remove it",
                path.display()
            );
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .with_context(|| format!("{}: cannot open for writing", path.display()))?;
        Ok(Sink::File {
            path: path.to_path_buf(),
            file,
            resume: nonempty,
        })
    }

    /// Rows already generated (0 for standard output or a fresh file), after checking that
    /// the file was begun with these `settings` and that each complete line is the completion
    /// of the row it stands for (where a prompt has one line, `per_prompt = 1` under best-of:
    /// of one of its prompt's samples). A last line cut short by an interruption is then removed. A fresh file gets
    /// its settings file.
    fn resume_point(
        &mut self,
        requests: &[PromptRecord],
        (samples, per_prompt): (usize, usize),
        settings: &Map<String, Value>,
    ) -> Result<usize> {
        let Sink::File { path, file, resume } = self else {
            return Ok(0);
        };
        let meta = settings_path(path);
        if !*resume {
            let text = serde_json::to_string_pretty(settings)?;
            crate::io::write_atomic(&meta, text.as_bytes())?;
            return Ok(0);
        }
        check_settings(&meta, path, settings)?;
        let bytes =
            std::fs::read(&*path).with_context(|| format!("{}: cannot read", path.display()))?;
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let text = std::str::from_utf8(&bytes[..complete]).map_err(|e| {
            anyhow::anyhow!(
                "{}: not UTF-8 text before byte {}",
                path.display(),
                e.valid_up_to()
            )
        })?;
        let mut lines = 0;
        for (i, line) in text.lines().enumerate() {
            let at = format!("{}:{}", path.display(), i + 1);
            let v: Value = serde_json::from_str(line)
                .map_err(|e| anyhow::anyhow!("{at}: not a JSON completion line: {e}"))?;
            for field in ["completion", "finish_reason"] {
                if !v.get(field).is_some_and(Value::is_string) {
                    bail!("{at}: field {field}: missing (not a completion line)");
                }
            }
            let Some(req) = requests.get(lines / per_prompt) else {
                bail!(
                    "{at}: more completions than the {} prompts × {per_prompt} lines",
                    requests.len()
                );
            };
            if v.get("prompt") != req.fields.get("prompt") {
                let which = (req.origin.clone())
                    .unwrap_or_else(|| format!("--prompt number {}", lines / per_prompt + 1));
                bail!(
                    "{at}: field prompt: not the prompt at {which} (resume with the same prompts)"
                );
            }
            if samples > 1 {
                let sample = v.get("sample").and_then(Value::as_u64);
                let fits = match per_prompt {
                    1 => sample.is_some_and(|s| s < samples as u64),
                    _ => sample == Some((lines % samples) as u64),
                };
                if !fits {
                    bail!("{at}: field sample: {sample:?}, not the sample of line {lines}");
                }
            }
            lines += 1;
        }
        let rows = lines / per_prompt * samples + lines % per_prompt;
        if complete < bytes.len() {
            file.set_len(complete as u64).with_context(|| {
                format!("{}: cannot drop its cut-short last line", path.display())
            })?;
            file.seek(std::io::SeekFrom::End(0))?;
        }
        Ok(rows)
    }

    fn write(&mut self, lines: &str) -> Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(lines.as_bytes())?;
                out.flush()?;
            }
            Sink::File { path, file, .. } => {
                file.write_all(lines.as_bytes())
                    .and_then(|()| file.sync_data())
                    .with_context(|| format!("{}: cannot write", path.display()))?;
            }
        }
        Ok(())
    }
}

/// The settings' field that records the checkpoint's weight files
/// ([`crate::stages::frozen_inputs::weights_stamp`]).
pub const WEIGHTS: &str = "weights";

/// Refuses to resume `out` under settings other than those it was begun with.
fn check_settings(meta: &Path, out: &Path, now: &Map<String, Value>) -> Result<()> {
    let text = std::fs::read_to_string(meta).map_err(|_| {
        anyhow::anyhow!(
            "{}: missing, so the settings that wrote {} are unknown; remove {} to start over",
            meta.display(),
            out.display(),
            out.display()
        )
    })?;
    let then: Map<String, Value> =
        serde_json::from_str(&text).map_err(|e| crate::json_error::json_error(meta, &text, &e))?;
    let fields = now
        .keys()
        .chain(then.keys().filter(|k| !now.contains_key(*k)));
    for field in fields {
        let (was, is) = (then.get(field), now.get(field));
        // A file begun before the weights were recorded resumes on the path alone.
        if field == WEIGHTS && was.is_none() {
            continue;
        }
        if was != is && field == WEIGHTS {
            bail!(
                "{}: the checkpoint's weight files changed since {} was begun (now {}): its \
                 completions would come from two models; remove {} to start over",
                meta.display(),
                out.display(),
                is.and_then(Value::as_str).unwrap_or("none"),
                out.display()
            );
        }
        if was != is {
            let say = |v: Option<&Value>| v.map_or("nothing".to_string(), Value::to_string);
            bail!(
                "{}: field {field}: {} when {} was begun, {} now (resume with the same settings)",
                meta.display(),
                say(was),
                out.display(),
                say(is)
            );
        }
    }
    Ok(())
}

/// What a call did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    /// Rows found already written in a resumed file.
    pub resumed: usize,
    /// Rows generated by this call.
    pub rows: usize,
    pub new_tokens: usize,
    pub seconds: f64,
    /// The rewards of the completions written by this call, and how many.
    pub reward_sum: f64,
    pub scored: usize,
}

impl Summary {
    /// The mean reward of the completions this call wrote, where they were scored.
    pub fn mean_reward(&self) -> Option<f64> {
        (self.scored > 0).then(|| self.reward_sum / self.scored as f64)
    }
}

/// The row, within a batch of whole prompts' `samples` rows each, of each prompt's
/// best-scored sample: the first of equals.
fn best_of(scores: &[f64], samples: usize) -> Vec<usize> {
    scores
        .chunks(samples)
        .enumerate()
        .map(|(p, s)| {
            // A NaN (a broken reward model) never wins against a number.
            let better = |j: usize, b: usize| s[j] > s[b] || (s[b].is_nan() && !s[j].is_nan());
            let best = (1..s.len()).fold(0, |b, j| if better(j, b) { j } else { b });
            p * samples + best
        })
        .collect()
}

/// The prompts given on the command line, as records `{"prompt": text}`.
pub fn inline_prompts(texts: &[String]) -> Vec<PromptRecord> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut fields = Map::new();
            fields.insert("prompt".into(), Value::String(t.clone()));
            PromptRecord {
                prompt: t.clone(),
                answer: None,
                fields,
                origin: Some(format!("--prompt {}", i + 1)),
                templated: false,
            }
        })
        .collect()
}

/// Says which of the prompt records' own fields the output lines replace (a prompt-completion
/// dataset's reference `completion`, a scored file's `reward`), so that none is lost unsaid.
fn warn_replaced_fields(requests: &[PromptRecord], job: &Job, scored: bool) {
    let mut written = vec!["completion", "finish_reason"];
    if job.samples > 1 {
        written.push("sample");
    }
    if scored {
        written.extend(["reward", "rewards"]);
    }
    for field in written {
        let n = requests
            .iter()
            .filter(|r| r.fields.contains_key(field))
            .count();
        if n > 0 {
            crate::warnln!(
                "warning: {n} prompt records have their own \"{field}\", which the output lines \
                 replace with generate's (rename it in the file to keep it)"
            );
        }
    }
}

/// Samples `job.samples` completions for every request of `job.shard`'s part into `sink`:
/// one line per row, the request's fields (its `prompt` as given) with `completion`,
/// `finish_reason` (`stop`: EOS or a stop string; `length`: `max_new_tokens` ran out) and,
/// for more than one sample, `sample`; scored by `rewards` (loaded from `job.rewards`), with
/// `reward` (the weighted sum) and `rewards` (each source's score), and under `job.best_of`
/// only each prompt's best-scored sample (the first of equals).
#[allow(clippy::too_many_arguments)]
pub fn run(
    net: &Transformer,
    ctx: Ctx,
    tok: &Tokenizer,
    requests: &[PromptRecord],
    job: &Job,
    mut rewards: Option<&mut RewardFn>,
    settings: &Map<String, Value>,
    sink: &mut Sink,
) -> Result<Summary> {
    if requests.is_empty() {
        bail!("generate: no prompts");
    }
    job.check()?;
    if job.rewards.is_empty() != rewards.is_none() {
        bail!("generate: the rewards loaded are not the job's");
    }
    // This process's part of the prompts; its rows keep their numbers in the whole file.
    let part = job.shard.range(requests.len());
    let first_row = part.start * job.samples;
    let requests = &requests[part];
    warn_replaced_fields(requests, job, rewards.is_some());
    let context = net.cfg.max_position_embeddings;
    // Each prompt that does not fit is named by its record, before any is answered.
    let encoded = encode_prompts(tok, requests, job.cfg.max_new_tokens, context)
        .map_err(|e| anyhow::anyhow!("generate: {e} ({})", job.new_tokens_said))?;
    let total = requests.len() * job.samples;
    let resumed = sink.resume_point(requests, (job.samples, job.lines_per_prompt()), settings)?;
    let batch_rows = (job.batch_rows - job.batch_rows % job.samples).max(job.samples);
    let mut summary = Summary {
        resumed,
        ..Summary::default()
    };
    let start = Instant::now();
    // A line per batch is noise for a handful of prompts.
    let progress = (total - resumed > batch_rows)
        .then(|| Progress::new("generate", resumed, total).unit("rows"));
    let mut row = resumed;
    while row < total {
        let end = (row + batch_rows).min(total);
        let ids: Vec<Vec<u32>> = (row..end)
            .map(|r| encoded[r / job.samples].clone())
            .collect();
        let keys = RowKeys {
            seed: job.seed,
            rows: ((first_row + row) as u64..(first_row + end) as u64).collect(),
        };
        let g = generate(net, ctx, tok, &ids, job.cfg, &keys)?;
        let scores = match rewards.as_deref_mut() {
            Some(rw) => {
                let records: Vec<PromptRecord> = (row..end)
                    .map(|r| requests[r / job.samples].clone())
                    .collect();
                let batch = Batch {
                    records: &records,
                    seqs: &g.sequences(&ids),
                    texts: &g.texts,
                };
                Some(rw.score(&batch, tok.pad_id(), ctx)?)
            }
            None => None,
        };
        let kept: Vec<usize> = match (&scores, job.best_of) {
            (Some(s), true) => best_of(&s.total, job.samples),
            _ => (0..end - row).collect(),
        };
        let mut lines = String::new();
        for i in kept {
            let r = row + i;
            let mut v = requests[r / job.samples].fields.clone();
            v.insert("completion".into(), g.texts[i].clone().into());
            let reason = if g.finished[i] { "stop" } else { "length" };
            v.insert("finish_reason".into(), reason.into());
            if job.samples > 1 {
                v.insert("sample".into(), (r % job.samples).into());
            }
            if let Some(s) = &scores {
                v.insert("reward".into(), s.total[i].into());
                let by_source: Map<String, Value> = s
                    .by_source
                    .iter()
                    .map(|(name, x)| (name.clone(), x[i].into()))
                    .collect();
                v.insert("rewards".into(), Value::Object(by_source));
                // A response no reward applies to (all answered null) is left out of the mean.
                if !s.total[i].is_nan() {
                    summary.reward_sum += s.total[i];
                    summary.scored += 1;
                }
            }
            lines.push_str(&Value::Object(v).to_string());
            lines.push('\n');
        }
        sink.write(&lines)?;
        summary.rows += end - row;
        summary.new_tokens += g.stats.new_tokens;
        summary.seconds = start.elapsed().as_secs_f64();
        if let Some(p) = &progress {
            let rate = summary.new_tokens as f64 / summary.seconds.max(1e-9);
            let mut line = format!("{rate:.0} tokens/s");
            if let Some(mean) = summary.mean_reward() {
                line.push_str(&format!(", mean reward {mean:.4}"));
            }
            p.update(end, &line);
        }
        row = end;
    }
    if let Some(p) = &progress {
        p.finish();
    }
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}
