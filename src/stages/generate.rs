//! `temper generate`: completions for a list of prompts, through the rollout engine in
//! batches of rows, written as JSONL as each batch finishes.
//!
//! `--samples N` draws N completions per prompt (vLLM's `n`, transformers'
//! `num_return_sequences`). They are consecutive rows, so the engine prefills each prompt once.
//! Row `r` (prompt `r / N`, sample `r % N`) draws from the random stream keyed by the seed and
//! `r`. A completion therefore does not depend on the batch size. A run resumed from its output
//! file writes the completions the interrupted run would have written; on the CPU they match
//! bit for bit, on a GPU up to the rounding that batch shapes change (see [`crate::generate`]).

use std::fs::{File, OpenOptions};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

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
    /// Rows per engine call (at least 1): what bounds the KV cache and the prefill's
    /// activations, whatever the number of prompts.
    pub batch_rows: usize,
}

/// Where the completions go.
pub enum Sink {
    Stdout,
    /// A JSONL file, appended to and flushed after every batch.
    File {
        path: PathBuf,
        file: File,
    },
}

impl Sink {
    /// Standard output when `path` is `None`. A file that exists and is not empty is refused
    /// unless `resume`: it would otherwise be overwritten.
    pub fn open(path: Option<&Path>, resume: bool) -> Result<Self> {
        let Some(path) = path else {
            if resume {
                bail!("generate: --resume continues an --out file; none was given");
            }
            return Ok(Sink::Stdout);
        };
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
        })
    }

    /// Rows already written (0 for standard output): the complete lines of the file, each
    /// checked to be the completion of the row it stands for. A last line cut short by an
    /// interruption is removed.
    fn resume_point(&mut self, requests: &[PromptRecord], samples: usize) -> Result<usize> {
        let Sink::File { path, file } = self else {
            return Ok(0);
        };
        let text = std::fs::read_to_string(&*path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            file.set_len(complete as u64).with_context(|| {
                format!("{}: cannot drop its cut-short last line", path.display())
            })?;
            file.seek(std::io::SeekFrom::End(0))?;
        }
        let mut rows = 0;
        for (i, line) in text[..complete].lines().enumerate() {
            let at = format!("{}:{}", path.display(), i + 1);
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("{at}: not a JSON completion line"))?;
            let Some(req) = requests.get(rows / samples) else {
                bail!(
                    "{at}: more completions than the {} prompts × {samples} samples",
                    requests.len()
                );
            };
            if v.get("prompt") != req.fields.get("prompt") {
                bail!("{at}: field prompt: not the prompt of row {rows} (resume with the same prompts and --samples)");
            }
            let sample = v.get("sample").and_then(Value::as_u64).unwrap_or(0);
            if sample != (rows % samples) as u64 {
                bail!(
                    "{at}: field sample: {sample}, expected {} (resume with the same --samples)",
                    rows % samples
                );
            }
            rows += 1;
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
            Sink::File { path, file } => {
                file.write_all(lines.as_bytes())
                    .and_then(|()| file.sync_data())
                    .with_context(|| format!("{}: cannot write", path.display()))?;
            }
        }
        Ok(())
    }
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
}

/// The prompts given on the command line, as records `{"prompt": text}`.
pub fn inline_prompts(texts: &[String]) -> Vec<PromptRecord> {
    texts
        .iter()
        .map(|t| {
            let mut fields = Map::new();
            fields.insert("prompt".into(), Value::String(t.clone()));
            PromptRecord {
                prompt: t.clone(),
                answer: None,
                fields,
                origin: None,
            }
        })
        .collect()
}

/// Samples `job.samples` completions for every request into `sink`: one line per row, the
/// request's fields (its `prompt` as given) with `completion`, `finish_reason` (`stop`: EOS
/// or a stop string; `length`: `max_new_tokens` ran out) and, for more than one sample,
/// `sample`.
pub fn run(
    net: &Transformer,
    ctx: Ctx,
    tok: &Tokenizer,
    requests: &[PromptRecord],
    job: &Job,
    sink: &mut Sink,
) -> Result<Summary> {
    if requests.is_empty() {
        bail!("generate: no prompts");
    }
    if job.samples == 0 || job.batch_rows == 0 {
        bail!("generate: --samples and --batch-size must be at least 1");
    }
    let encoded = requests
        .iter()
        .map(|r| {
            let ids = tok.encode(&r.prompt)?;
            if ids.is_empty() {
                bail!(
                    "{}: field prompt: no tokens",
                    r.origin.as_deref().unwrap_or("--prompt")
                );
            }
            Ok(ids)
        })
        .collect::<Result<Vec<_>>>()?;
    let total = requests.len() * job.samples;
    let resumed = sink.resume_point(requests, job.samples)?;
    let mut summary = Summary {
        resumed,
        ..Summary::default()
    };
    let start = Instant::now();
    // A line per batch is noise for a handful of prompts.
    let progress = (total - resumed > job.batch_rows)
        .then(|| Progress::new("generate", resumed, total).unit("rows"));
    let mut row = resumed;
    while row < total {
        let end = (row + job.batch_rows).min(total);
        let ids: Vec<Vec<u32>> = (row..end)
            .map(|r| encoded[r / job.samples].clone())
            .collect();
        let keys = RowKeys {
            seed: job.seed,
            rows: (row as u64..end as u64).collect(),
        };
        let g = generate(net, ctx, tok, &ids, job.cfg, &keys)?;
        let mut lines = String::new();
        for (i, r) in (row..end).enumerate() {
            let mut v = requests[r / job.samples].fields.clone();
            v.insert("completion".into(), g.texts[i].clone().into());
            let reason = if g.finished[i] { "stop" } else { "length" };
            v.insert("finish_reason".into(), reason.into());
            if job.samples > 1 {
                v.insert("sample".into(), (r % job.samples).into());
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
            p.update(end, &format!("{rate:.0} tokens/s"));
        }
        row = end;
    }
    if let Some(p) = &progress {
        p.finish();
    }
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}
