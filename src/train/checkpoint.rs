//! Checkpoints that survive a kill at any moment: each is written into a temporary directory
//! that is renamed into place only when complete, then `latest` is switched atomically, then
//! old ones beyond `keep` are removed. A reader never sees a half-written checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::model::LoraConfig;

pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

/// What a checkpoint holds, so a later stage can rebuild the model without its run's config.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// The stage that wrote it: pretrain, sft, reward, ppo, dpo, grpo.
    pub stage: String,
    /// What the weights are: `policy` (transformer + LM head) or `reward` (transformer + score
    /// head); the value model of PPO is saved as `value`.
    pub kind: String,
    pub model: ModelConfig,
    pub lora: Option<LoraConfig>,
    pub step: usize,
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

    pub fn expect_kind(&self, dir: &Path, kind: &str) -> Result<()> {
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
        let tmp = self.dir.join(format!("{name}.partial"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        write(&tmp)?;
        if fin.exists() {
            std::fs::remove_dir_all(&fin)?;
        }
        std::fs::rename(&tmp, &fin)?;
        write_atomic(&self.dir.join("latest"), name.as_bytes())?;
        self.prune()?;
        Ok(fin)
    }

    fn prune(&self) -> Result<()> {
        let mut done: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_dir()
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("step-") && !n.contains('.'))
            })
            .collect();
        done.sort();
        while done.len() > self.keep {
            std::fs::remove_dir_all(done.remove(0))?;
        }
        Ok(())
    }

    /// The newest complete checkpoint of a run directory.
    pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
        let pointer = run_dir.join("checkpoints").join("latest");
        if !pointer.exists() {
            return Ok(None);
        }
        let name = std::fs::read_to_string(&pointer)?;
        let p = run_dir.join("checkpoints").join(name.trim());
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
    bail!(
        "{}: holds no checkpoint (no meta.json, final/ or checkpoints/latest)",
        path.display()
    )
}
