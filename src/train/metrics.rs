//! `metrics.jsonl`: one JSON object per line (`step`, `split`, `loss`, ...), appended and
//! flushed as it goes so a killed run keeps everything it logged; with `[train] report_to =
//! "tensorboard"`, TensorBoard's event files as well.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Map, Value};

use super::tensorboard::EventFile;
use crate::config::ReportTo;

pub struct MetricsLog {
    path: PathBuf,
    file: File,
    /// `[train] report_to = "tensorboard"`: the same numbers as TensorBoard scalars.
    events: Option<EventFile>,
}

impl MetricsLog {
    /// Opens `run_dir/metrics.jsonl` for appending. When resuming from `keep_upto`, lines of
    /// later steps (written after that checkpoint by the interrupted run) are dropped, so the
    /// file shows one curve.
    pub fn open(run_dir: &Path, keep_upto: Option<usize>, report_to: ReportTo) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        if let Some(upto) = keep_upto {
            keep_steps_upto(&path, upto)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        let events = match (report_to, keep_upto) {
            (ReportTo::Tensorboard, _) => {
                let logged = scalars(&path)?;
                Some(EventFile::open(run_dir, keep_upto, &logged)?)
            }
            // Not written now, but left consistent with metrics.jsonl for a later resume.
            (ReportTo::None, Some(upto)) => {
                super::tensorboard::keep_upto_if_any(run_dir, upto)?;
                None
            }
            (ReportTo::None, None) => None,
        };
        Ok(Self { path, file, events })
    }

    pub fn log(&mut self, step: usize, split: &str, fields: &[(&str, f64)]) -> Result<()> {
        let mut m = Map::new();
        m.insert("step".into(), step.into());
        m.insert("split".into(), split.into());
        for (k, v) in fields {
            let v = if v.is_finite() {
                Value::from(*v)
            } else {
                Value::Null
            };
            m.insert(k.to_string(), v);
        }
        writeln!(self.file, "{}", Value::Object(m))
            .with_context(|| format!("{}: cannot write", self.path.display()))?;
        self.file.flush()?;
        if let Some(events) = &mut self.events {
            events.scalars(
                step,
                fields.iter().map(|(k, v)| (format!("{split}/{k}"), *v)),
            )?;
        }
        Ok(())
    }
}

/// Rewrites a JSONL log (if it exists) keeping only the records whose `step` is at most
/// `upto`: what a run resumed from step `upto` logged already, without what the interrupted
/// run logged after its checkpoint.
pub fn keep_steps_upto(path: &Path, upto: usize) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let kept: Vec<String> = BufReader::new(File::open(path)?)
        .lines()
        .map_while(|l| l.ok())
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(Value::as_u64))
                .is_some_and(|s| s as usize <= upto)
        })
        .collect();
    let text: String = kept.iter().map(|l| format!("{l}\n")).collect();
    crate::io::write_atomic(path, text.as_bytes())
}

/// Every number of a metrics file as `(step, SPLIT/FIELD, value)`, a null as NaN (what
/// [`MetricsLog::log`] gives TensorBoard); none where there is no file.
fn scalars(path: &Path) -> Result<Vec<super::tensorboard::Scalar>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for rec in read(path)? {
        let (Some(step), Some(split)) = (rec["step"].as_u64(), rec["split"].as_str()) else {
            continue;
        };
        for (k, v) in rec.as_object().into_iter().flatten() {
            if k != "step" && k != "split" {
                out.push((step, format!("{split}/{k}"), v.as_f64().unwrap_or(f64::NAN)));
            }
        }
    }
    Ok(out)
}

/// Reads back every record of a metrics file (tests and the pipeline summary use it).
pub fn read(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))
        })
        .collect()
}
