//! Checkpoints that survive a kill at any moment: each is written into a temporary directory
//! that is renamed into place only when complete, then `latest` is switched atomically, then
//! old ones beyond `keep` are removed. A reader never sees a half-written checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{LoraConfig, ModelConfig, Stage};
use crate::io::{write_atomic, write_dir_atomic};

/// What a checkpoint's weights are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointKind {
    /// A transformer with its LM head (PPO's also holds its critic under `value.`).
    Policy,
    /// A transformer with a scalar score head.
    Reward,
}

impl std::fmt::Display for CheckpointKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CheckpointKind::Policy => "policy",
            CheckpointKind::Reward => "reward",
        })
    }
}

/// What a checkpoint holds, so a later stage can rebuild the model without its run's config.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// The stage that wrote it.
    pub stage: Stage,
    pub kind: CheckpointKind,
    pub model: ModelConfig,
    pub lora: Option<LoraConfig>,
    pub step: usize,
    /// The Hugging Face model directory (absolute) whose weights are a LoRA run's frozen base,
    /// where it began from one: what a PEFT export names as `base_model_name_or_path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<PathBuf>,
}

impl CheckpointMeta {
    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join("meta.json");
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "{}: not a temper checkpoint (meta.json is missing)",
                dir.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{}: malformed", p.display()))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        write_atomic(
            &dir.join("meta.json"),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )
    }

    pub fn expect_kind(&self, dir: &Path, kind: CheckpointKind) -> Result<()> {
        if self.kind != kind {
            bail!(
                "{}: holds a {} model (from stage {}), but a {kind} model is needed here",
                dir.display(),
                self.kind,
                self.stage
            );
        }
        Ok(())
    }
}

pub struct Checkpoints {
    pub dir: PathBuf,
    keep: usize,
}

impl Checkpoints {
    pub fn new(run_dir: &Path, keep: usize) -> Result<Self> {
        let dir = run_dir.join("checkpoints");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        Ok(Self { dir, keep })
    }

    /// Writes checkpoint `step` with `write(dir)` and makes it the latest.
    pub fn save(&self, step: usize, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let name = format!("step-{step:07}");
        let fin = self.dir.join(&name);
        write_dir_atomic(&fin, write)?;
        write_atomic(&self.dir.join("latest"), name.as_bytes())?;
        self.prune()?;
        Ok(fin)
    }

    fn prune(&self) -> Result<()> {
        let mut done = complete_steps(&self.dir)?;
        while done.len() > self.keep {
            std::fs::remove_dir_all(done.remove(0))?;
        }
        Ok(())
    }

    /// The newest complete checkpoint of a run directory: the one `checkpoints/latest` names,
    /// or where that pointer is missing or empty (lost, or cut off as it was written) the
    /// newest complete `step-*` directory, said on the terminal. Without the fallback a
    /// resume found nothing, started over, and pruned the run's real checkpoints.
    pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
        let dir = run_dir.join("checkpoints");
        let pointer = dir.join("latest");
        let name = match std::fs::read_to_string(&pointer) {
            Ok(name) => name.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("{}", pointer.display())),
        };
        if name.is_empty() {
            let newest = match dir.is_dir() {
                true => complete_steps(&dir)?.pop(),
                false => None,
            };
            if let Some(p) = &newest {
                crate::errln!(
                    "{}: missing or empty; taking the newest complete checkpoint, {}",
                    pointer.display(),
                    p.display()
                );
            }
            return Ok(newest);
        }
        let p = dir.join(&name);
        if !p.is_dir() {
            bail!(
                "{}: points to a missing checkpoint {}",
                pointer.display(),
                p.display()
            );
        }
        Ok(Some(p))
    }
}

/// A checkpoint directory's `step-*` directories whose writing finished (a directory is
/// renamed to its final name once complete, and holds its state and meta), oldest first.
pub(crate) fn complete_steps(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut done: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-") && !n.contains('.'))
                && p.join("state.json").is_file()
                && p.join("meta.json").is_file()
        })
        .collect();
    done.sort();
    Ok(done)
}

/// Accepts a checkpoint directory, or a run directory (its `final/`, else its latest
/// checkpoint).
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join("meta.json").exists() {
        return Ok(path.to_path_buf());
    }
    if path.join("final").join("meta.json").exists() {
        return Ok(path.join("final"));
    }
    if let Some(p) = Checkpoints::latest(path)? {
        return Ok(p);
    }
    if !path.exists() {
        bail!("{}: no such checkpoint or run directory", path.display());
    }
    // A Hugging Face directory is read before this; one here lacks its weights.
    if path.join("config.json").exists() {
        let bin = match path.join("pytorch_model.bin").exists() {
            true => " (temper reads safetensors, not pytorch_model.bin: convert it first)",
            false => ": not a complete Hugging Face model",
        };
        bail!(
            "{}: has a config.json but no model.safetensors (or model.safetensors.index.json) \
             beside it{bin}",
            path.display()
        );
    }
    bail!(
        "{}: holds no checkpoint (no meta.json, final/ or checkpoints/latest)",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a directory lacks is said: a Hugging Face config without its weights, a run
    /// whose `latest` pointer was lost (the newest complete checkpoint is taken, not a
    /// half-written one).
    #[test]
    fn a_directory_without_a_usable_checkpoint_says_what_it_lacks() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config.json"), "{}").unwrap();
        let e = resolve_checkpoint(d.path()).unwrap_err().to_string();
        assert!(e.contains("no model.safetensors"), "{e}");
        std::fs::write(d.path().join("pytorch_model.bin"), "").unwrap();
        let e = resolve_checkpoint(d.path()).unwrap_err().to_string();
        assert!(e.contains("not pytorch_model.bin"), "{e}");

        let run = tempfile::tempdir().unwrap();
        let ck = run.path().join("checkpoints");
        for name in [
            "step-0000002",
            "step-0000004",
            "step-0000006.partial",
            "step-0000008",
        ] {
            std::fs::create_dir_all(ck.join(name)).unwrap();
            // step-0000008 was copied without its files: not complete either.
            if name != "step-0000008" {
                std::fs::write(ck.join(name).join("state.json"), "{}").unwrap();
                std::fs::write(ck.join(name).join("meta.json"), "{}").unwrap();
            }
        }
        let newest = Checkpoints::latest(run.path()).unwrap().unwrap();
        assert_eq!(newest, ck.join("step-0000004"));
        std::fs::write(ck.join("latest"), "step-0000002\n").unwrap();
        assert_eq!(
            Checkpoints::latest(run.path()).unwrap().unwrap(),
            ck.join("step-0000002")
        );
    }
}
