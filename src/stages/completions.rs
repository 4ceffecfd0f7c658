//! `completions.jsonl` in an RL run's directory: for each rollout, a few sampled prompts with
//! their responses, total reward, each reward source's score, KL to the reference (where the
//! stage holds one) and length.
//! Reading it is how one catches reward hacking or responses collapsing in length.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

use super::rollout::Rollout;
use crate::data::records::PromptRecord;
use crate::train::metrics::keep_steps_upto;

pub struct CompletionLog {
    path: PathBuf,
    file: Option<File>,
    per_rollout: usize,
}

impl CompletionLog {
    pub fn new(run_dir: &Path, per_rollout: usize) -> Self {
        Self {
            path: run_dir.join("completions.jsonl"),
            file: None,
            per_rollout,
        }
    }

    /// Opens the file at the first rollout, keeping only lines of earlier steps: a fresh run
    /// starts it anew, a resumed one drops what the interrupted run logged after its
    /// checkpoint.
    fn open(&mut self, step: usize) -> Result<&mut File> {
        if self.file.is_none() {
            // Creates the file if need be, so the append below finds it.
            if !self.path.exists() {
                crate::io::write_atomic(&self.path, b"")?;
            }
            keep_steps_upto(&self.path, step.saturating_sub(1))?;
            let f = OpenOptions::new()
                .append(true)
                .open(&self.path)
                .with_context(|| format!("{}: cannot open", self.path.display()))?;
            self.file = Some(f);
        }
        Ok(self.file.as_mut().expect("just opened"))
    }

    /// Rows logged per rollout (0: none).
    pub fn per_rollout(&self) -> usize {
        self.per_rollout
    }

    /// Logs up to `per_rollout` rows of rollout `ro` (spread evenly over it), sampled for
    /// optimizer step `step` (1-based, as `metrics.jsonl` counts). `kl` is each row's summed
    /// per-token KL.
    pub fn write(
        &mut self,
        step: usize,
        records: &[PromptRecord],
        ro: &Rollout,
        kl: Option<&[f64]>,
    ) -> Result<()> {
        let n = records.len();
        let k = self.per_rollout.min(n);
        let rows: Vec<usize> = (0..k).map(|j| j * n / k).collect();
        self.write_rows(step, records, ro, kl, &rows)
    }

    /// [`CompletionLog::write`] of the chosen `rows` (nothing where `per_rollout` is 0).
    pub fn write_rows(
        &mut self,
        step: usize,
        records: &[PromptRecord],
        ro: &Rollout,
        kl: Option<&[f64]>,
        rows: &[usize],
    ) -> Result<()> {
        if self.per_rollout == 0 || rows.is_empty() {
            return Ok(());
        }
        let mut text = String::new();
        for &i in rows {
            let by_source: Map<String, Value> = ro
                .scores_by_source
                .iter()
                .map(|(name, s)| (name.clone(), json!(s[i])))
                .collect();
            let mut line = json!({
                "step": step,
                "prompt": records[i].prompt,
                "response": ro.texts[i],
                "reward": ro.scores[i],
                "rewards": by_source,
                "length": ro.lengths[i],
                "finished": ro.finished[i],
            });
            if let Some(kl) = kl {
                line["kl"] = json!(kl[i]);
            }
            text.push_str(&line.to_string());
            text.push('\n');
        }
        let path = self.path.clone();
        let f = self.open(step)?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.flush())
            .with_context(|| format!("{}: cannot write", path.display()))
    }
}
