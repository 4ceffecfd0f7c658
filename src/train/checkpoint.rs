//! Checkpoints that survive a kill at any moment: each is written into a temporary directory
//! that is renamed into place only when complete, then `latest` is switched atomically, then
//! old ones beyond `keep` are removed. A reader never sees a half-written checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
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
        let fin = self.dir.join(format!("step-{step:07}"));
        write_dir_atomic(&fin, write)?;
        self.make_latest(&fin)?;
        self.prune(step)?;
        Ok(fin)
    }

    /// Points `checkpoints/latest` at checkpoint `dir`.
    pub fn make_latest(&self, dir: &Path) -> Result<()> {
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        write_atomic(&self.dir.join("latest"), name.as_bytes())
    }

    /// Removes the oldest complete checkpoints up to `saved`, the step just written, beyond
    /// `keep`. Those of higher steps, left by an earlier attempt that went further than the
    /// checkpoint this one resumed from, are not counted: they would otherwise outrank, and
    /// prune, the checkpoints this attempt wrote and the one it resumed from. Each is replaced
    /// when the run reaches its step. Each is renamed `step-N.removing` before it is removed,
    /// so that a run killed halfway leaves no `step-N` without its state, and the next prune
    /// finishes what it left. A removal that fails (an NFS file a reader holds open) is said
    /// and the run goes on: the checkpoint just written is whole.
    fn prune(&self, saved: usize) -> Result<()> {
        let mut done = complete_steps(&self.dir)?;
        done.retain(|p| step_of(p).is_some_and(|s| s <= saved));
        let mut gone = half_removed(&self.dir)?;
        while done.len() > self.keep {
            let old = done.remove(0);
            let name = old.file_name().unwrap_or_default().to_string_lossy();
            let doomed = old.with_file_name(format!("{name}{REMOVING}"));
            match std::fs::rename(&old, &doomed) {
                Ok(()) => gone.push(doomed),
                Err(e) => warn_unremoved(&old, &e),
            }
        }
        for doomed in gone {
            if let Err(e) = std::fs::remove_dir_all(&doomed) {
                warn_unremoved(&doomed, &e);
            }
        }
        Ok(())
    }

    /// The newest complete checkpoint of a run directory: the one `checkpoints/latest` names,
    /// or where that pointer is missing or empty (lost, or cut off as it was written) the
    /// newest complete `step-*` directory, said on the terminal. Without the fallback a
    /// resume found nothing, started over, and pruned the run's real checkpoints.
    pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
        let newest = Self::newest_first(run_dir)?.into_iter().next();
        if let Some(p) = newest.as_ref().filter(|p| !p.is_dir()) {
            bail!("{}", missing_latest(run_dir, p));
        }
        Ok(newest)
    }

    /// Whether `run_dir` holds a checkpoint a resume may continue from (a `--resume` that
    /// finds none starts over).
    pub fn any(run_dir: &Path) -> bool {
        Self::candidates(run_dir, false).is_ok_and(|c| !c.is_empty())
    }

    /// The checkpoint a resume would continue from, found without a word: the best candidate
    /// that is there and whole (a resume sets the others aside and says so itself).
    pub fn resumable(run_dir: &Path) -> Option<PathBuf> {
        let candidates = Self::candidates(run_dir, false).ok()?;
        (candidates.into_iter()).find(|c| c.is_dir() && damage(c, ReadFor::Resume).is_none())
    }

    /// What a resume may continue from, best first: [`Checkpoints::latest`]'s choice (which
    /// may be missing, where the pointer names a directory that is gone), then the complete
    /// checkpoints of lower steps, newest first.
    pub fn newest_first(run_dir: &Path) -> Result<Vec<PathBuf>> {
        Self::candidates(run_dir, true)
    }

    /// [`Checkpoints::newest_first`], saying a fallback from a lost pointer where `say`
    /// (once a resume: a check before it stays quiet).
    fn candidates(run_dir: &Path, say: bool) -> Result<Vec<PathBuf>> {
        let dir = run_dir.join("checkpoints");
        let pointer = dir.join("latest");
        let name = match std::fs::read_to_string(&pointer) {
            Ok(name) => name.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("{}", pointer.display())),
        };
        let mut older = match dir.is_dir() {
            true => complete_steps(&dir)?,
            false => Vec::new(),
        };
        let newest = match name.is_empty() {
            false => dir.join(&name),
            true => match older.pop() {
                Some(p) => {
                    if say {
                        crate::warnln!(
                            "{}: missing or empty; taking the newest complete checkpoint, {}",
                            pointer.display(),
                            p.display()
                        );
                    }
                    p
                }
                None => return Ok(Vec::new()),
            },
        };
        let below = step_of(&newest);
        // A kill between a checkpoint's rename and the pointer's switch leaves a newer
        // complete one the pointer does not name; so does a pointer set back by hand. Which
        // it is cannot be told, so the pointer is followed, and the newer one named.
        let passed = (older.iter()).rfind(|p| below.is_some_and(|b| step_of(p) > Some(b)));
        if let (true, Some(p)) = (say, passed) {
            crate::warnln!(
                "warning: {} names {name}; the newer complete checkpoint {} is passed over (point latest \
                 at it to resume from there)",
                pointer.display(),
                p.display()
            );
        }
        older.retain(|p| p != &newest && below.is_none_or(|b| step_of(p) < Some(b)));
        Ok(std::iter::once(newest)
            .chain(older.into_iter().rev())
            .collect())
    }
}

/// What [`Checkpoints::latest`] says of a pointer to a directory that is not there.
pub fn missing_latest(run_dir: &Path, target: &Path) -> String {
    format!(
        "{}: points to a missing checkpoint {}",
        run_dir.join("checkpoints").join("latest").display(),
        target.display()
    )
}

/// Renames checkpoint `dir` that does not load to `step-N.corrupt` (`.corrupt-2`, ... where
/// that is taken): out of `complete_steps`, so that it is neither tried again nor pruned,
/// and kept for a look. Returns the new path.
pub fn set_aside(dir: &Path) -> Result<PathBuf> {
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let aside = (1..)
        .map(|k| match k {
            1 => dir.with_file_name(format!("{name}.corrupt")),
            k => dir.with_file_name(format!("{name}.corrupt-{k}")),
        })
        .find(|p| std::fs::symlink_metadata(p).is_err())
        .expect("an unused name");
    std::fs::rename(dir, &aside)
        .with_context(|| format!("{}: cannot rename to {}", dir.display(), aside.display()))?;
    Ok(aside)
}

/// Who reads a checkpoint, which decides the files whose damage matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFor {
    /// A resume: everything, optimizer state and the task's own files included.
    Resume,
    /// generate, export, eval, --init: the model and its tokenizer.
    Model,
}

/// The JSON files temper parses from a checkpoint (others, as a carried
/// `special_tokens_map.json`, are copied and never read, so they cannot damage it).
const READ_JSON: [&str; 6] = [
    "state.json",
    "meta.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    LIST,
];

/// A checkpoint's JSON that names other files of it in `files`, each of which a resume reads:
/// an unfinished rollout's shares, one per rank (src/stages/rollout/saved.rs writes both).
pub const LIST: &str = "rollout.json";

/// How the files [`LIST`] names begin.
pub const LISTED: &str = "rollout.rank-";

/// The first file [`LIST`] names that `dir` lacks, or why the list does not read; the list
/// itself where `dir` has files it would name.
fn listed_missing(dir: &Path) -> Option<anyhow::Error> {
    let list = dir.join(LIST);
    let Ok(bytes) = std::fs::read(&list) else {
        let listed = std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .find(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(LISTED))
            })?;
        return Some(anyhow!(
            "{}: missing (it names {})",
            list.display(),
            listed.file_name().to_string_lossy()
        ));
    };
    let files = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| {
            v["files"]
                .as_array()?
                .iter()
                .map(|f| f.as_str().map(str::to_owned))
                .collect::<Option<Vec<String>>>()
        });
    let Some(files) = files else {
        return Some(anyhow!("{}: malformed: no list of files", list.display()));
    };
    files
        .iter()
        .map(|f| dir.join(f))
        .find(|f| !f.is_file())
        .map(|f| anyhow!("{}: missing (named in {LIST})", f.display()))
}

/// What makes checkpoint `dir` unreadable as written for `use_`, where anything does: a file
/// every checkpoint has missing, a JSON file temper reads that does not parse, or a
/// safetensors file whose length is not what its header describes (cut short by a full disk
/// or a torn copy). Only such damage lets a resume fall back to an older checkpoint: an
/// intact one that does not load (another model's weights, a setting the run began without)
/// is the run's configuration at fault, which no older checkpoint mends.
pub fn damage(dir: &Path, use_: ReadFor) -> Option<anyhow::Error> {
    let needed: &[&str] = match use_ {
        ReadFor::Resume => &[
            "state.json",
            "meta.json",
            "model.safetensors",
            "optimizer.safetensors",
        ],
        ReadFor::Model => &["meta.json", "model.safetensors"],
    };
    for name in needed {
        if !dir.join(name).is_file() {
            return Some(anyhow!("{}: missing", dir.join(name).display()));
        }
    }
    if use_ == ReadFor::Resume {
        if let Some(e) = listed_missing(dir) {
            return Some(e);
        }
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => return Some(anyhow!("{}: cannot list: {e}", dir.display())),
    };
    let mut files: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
    files.sort();
    files.into_iter().find_map(|f| {
        let name = f.file_name()?.to_str()?;
        let read = match use_ {
            ReadFor::Resume => true,
            ReadFor::Model => {
                matches!(name, "model.safetensors" | "adapter.safetensors")
                    || name.starts_with("tokenizer")
                    || name == "meta.json"
            }
        };
        if !read {
            return None;
        }
        let reason = match f.extension().and_then(|e| e.to_str()) {
            Some("json") if READ_JSON.contains(&name) => std::fs::read(&f)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    serde_json::from_slice::<serde_json::Value>(&b)
                        .map(drop)
                        .map_err(|e| format!("malformed: {e}"))
                })
                .err(),
            Some("safetensors") => safetensors_damage(&f)
                .err()
                .map(|r| format!("cannot read safetensors: {r}")),
            _ => None,
        }?;
        Some(anyhow!("{}: {reason}", f.display()))
    })
}

/// Whether a safetensors file is as long as its header says, read without its data.
fn safetensors_damage(path: &Path) -> std::result::Result<(), String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| format!("{len} bytes, shorter than a header"))?;
    let n = u64::from_le_bytes(n);
    // The safetensors crate's own bound on a header.
    if n > len - 8 || n > 100_000_000 {
        return Err(format!("a header of {n} bytes in a file of {len}"));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format!("header: {e}"))?;
    let end = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    match (8 + n).checked_add(end) {
        Some(want) if want == len => Ok(()),
        Some(want) => Err(format!("{len} bytes where its header describes {want}")),
        None => Err(format!("a data offset of {end} bytes")),
    }
}

/// The step of a checkpoint directory named `step-N`; none for any other name (`.partial`,
/// `.corrupt`, `latest`).
pub(crate) fn step_of(p: &Path) -> Option<usize> {
    let digits = p.file_name()?.to_str()?.strip_prefix("step-")?;
    match digits.bytes().all(|b| b.is_ascii_digit()) {
        true => digits.parse().ok(),
        false => None,
    }
}

/// The suffix of a checkpoint directory being pruned.
const REMOVING: &str = ".removing";

/// What a prune killed halfway left in checkpoint directory `dir`: its `.removing`
/// directories.
fn half_removed(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))?;
    Ok(entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().ends_with(REMOVING))
        })
        .collect())
}

fn warn_unremoved(dir: &Path, e: &std::io::Error) {
    crate::warnln!(
        "warning: {}: cannot remove this old checkpoint ({e}); the run goes on, and the next \
         checkpoint's save tries again",
        dir.display()
    );
}

/// A checkpoint directory's `step-*` directories whose writing finished (a directory is
/// renamed to its final name once complete, and holds its state and meta), oldest first: by
/// step, which a name's zero padding orders only below ten million.
pub(crate) fn complete_steps(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut done: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .with_context(|| format!("{}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.join("state.json").is_file() && p.join("meta.json").is_file())
        .filter_map(|p| Some((step_of(&p)?, p)))
        .collect();
    done.sort();
    Ok(done.into_iter().map(|(_, p)| p).collect())
}

/// [`resolve_checkpoint`] for a reader of the model: where a run directory has no final model
/// (a run unfinished, or stopped) and its latest checkpoint is read instead, it says so once,
/// since a run begun from a run half trained is otherwise noticed only when the run's later
/// resume finds its init changed. A final model damaged on disk is refused naming the intact
/// checkpoint the reader could take, as a damaged latest checkpoint is.
pub fn resolve_checkpoint_for_model(path: &Path) -> Result<PathBuf> {
    static SAID: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let dir = resolve_checkpoint(path)?;
    let fin = path.join("final");
    // A run's final model, or a checkpoint named itself (whose run is two levels up).
    let run = match dir == fin {
        true => Some(path),
        false => (dir == path && step_of(&dir).is_some())
            .then(|| {
                dir.parent()
                    .filter(|c| c.ends_with("checkpoints"))?
                    .parent()
            })
            .flatten(),
    };
    if dir == fin || (dir == path && dir.join("meta.json").exists()) {
        if let Some(e) = damage(&dir, ReadFor::Model) {
            match run.map(|r| intact_besides(r, &dir)).transpose()?.flatten() {
                Some(c) => bail!("{e}; the checkpoint {} is intact: name it", c.display()),
                None => bail!("{e}"),
            }
        }
    }
    if step_of(&dir).is_some() && !path.join("meta.json").exists() {
        let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
        if !said.contains(&dir) {
            said.push(dir.clone());
            crate::warnln!(
                "warning: {}: the run has no final model (it is unfinished, or was stopped); \
                 reading its latest checkpoint, {}",
                path.display(),
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// The newest checkpoint of run `run` other than `p` that a reader can take.
fn intact_besides(run: &Path, p: &Path) -> Result<Option<PathBuf>> {
    Ok(Checkpoints::newest_first(run)?
        .into_iter()
        .filter(|c| c != p)
        .find(|c| damage(c, ReadFor::Model).is_none()))
}

/// Accepts a checkpoint directory, or a run directory (its `final/`, else its latest
/// checkpoint).
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        bail!(
            "{}: a file, where a directory is read (a temper run or checkpoint, a Hugging Face \
             model or a PEFT adapter): name the directory",
            path.display()
        );
    }
    if path.join("meta.json").exists() {
        return Ok(path.to_path_buf());
    }
    if path.join("final").join("meta.json").exists() {
        return Ok(path.join("final"));
    }
    if let Some(p) = Checkpoints::newest_first(path)?.into_iter().next() {
        // Only a resume passes over a damaged checkpoint (and sets it aside), or a pointer to
        // one that is gone; a reader names the one it could take instead.
        let damaged = match p.is_dir() {
            true => damage(&p, ReadFor::Model),
            false => Some(anyhow!("{}", missing_latest(path, &p))),
        };
        if let Some(e) = damaged {
            match intact_besides(path, &p)? {
                Some(c) => bail!(
                    "{e}; {} is intact: name it, or --resume the run to set this one aside",
                    c.display()
                ),
                None => bail!("{e}"),
            }
        }
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
    // The run an interrupted --overwrite set aside is not read, but it is there.
    let aside = path.join(crate::stages::run_dir::SET_ASIDE);
    let aside = match aside.is_dir() {
        true => format!(
            "; the run an --overwrite set aside is in {} (move its files back to read it)",
            aside.display()
        ),
        false => String::new(),
    };
    bail!(
        "{}: holds no checkpoint (no meta.json, final/ or checkpoints/latest){aside}",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Damage is what a reader would trip over: a resume over every file, a model's reader
    /// over the model's; a file temper never parses, however written, is not damage.
    #[test]
    fn damage_is_what_the_reader_reads_cut_short() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let t = candle_core::Tensor::zeros(5, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
        let weights = std::collections::HashMap::from([("w", t)]);
        for f in ["model.safetensors", "optimizer.safetensors"] {
            candle_core::safetensors::save(&weights, dir.join(f)).unwrap();
        }
        for f in ["state.json", "meta.json"] {
            std::fs::write(dir.join(f), "{}").unwrap();
        }
        std::fs::write(dir.join("special_tokens_map.json"), "{\"x\": NaN}").unwrap();
        assert!(damage(dir, ReadFor::Resume).is_none());
        let cut = |f: &str, keep: usize| {
            let b = std::fs::read(dir.join(f)).unwrap();
            std::fs::write(dir.join(f), &b[..keep.min(b.len())]).unwrap();
        };
        cut("optimizer.safetensors", 30);
        let e = damage(dir, ReadFor::Resume).unwrap().to_string();
        assert!(
            e.contains("optimizer.safetensors: cannot read safetensors"),
            "{e}"
        );
        assert!(
            damage(dir, ReadFor::Model).is_none(),
            "a model's reader reads no optimizer"
        );
        std::fs::remove_file(dir.join("optimizer.safetensors")).unwrap();
        let e = damage(dir, ReadFor::Resume).unwrap().to_string();
        assert!(e.contains("optimizer.safetensors: missing"), "{e}");
        // A header whose offsets run past any file, and one of 2^64 - 1 bytes.
        let mut huge =
            br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551615]}}"#
                .to_vec();
        let mut file = (huge.len() as u64).to_le_bytes().to_vec();
        file.append(&mut huge);
        std::fs::write(dir.join("model.safetensors"), &file).unwrap();
        let e = damage(dir, ReadFor::Model).unwrap().to_string();
        assert!(
            e.contains("model.safetensors: cannot read safetensors"),
            "{e}"
        );
        std::fs::write(dir.join("model.safetensors"), u64::MAX.to_le_bytes()).unwrap();
        assert!(damage(dir, ReadFor::Model).is_some());
        std::fs::write(dir.join("meta.json"), "{").unwrap();
        let e = damage(dir, ReadFor::Model).unwrap().to_string();
        assert!(e.contains("meta.json: malformed"), "{e}");
    }

    /// A resume needs every share its `rollout.json` names, and the list where shares are;
    /// a model's reader needs none.
    #[test]
    fn a_rollout_share_the_list_names_is_needed_to_resume() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let t = candle_core::Tensor::zeros(5, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
        let weights = std::collections::HashMap::from([("w", t)]);
        for f in [
            "model.safetensors",
            "optimizer.safetensors",
            "r0.safetensors",
        ] {
            candle_core::safetensors::save(&weights, dir.join(f)).unwrap();
        }
        for f in ["state.json", "meta.json"] {
            std::fs::write(dir.join(f), "{}").unwrap();
        }
        let list = |files: &str| {
            let text = format!("{{\"world\": 2, \"files\": {files}}}");
            std::fs::write(dir.join(LIST), text).unwrap();
        };
        list(r#"["r0.safetensors", "r1.safetensors"]"#);
        let e = damage(dir, ReadFor::Resume).unwrap().to_string();
        assert!(
            e.contains("r1.safetensors: missing (named in rollout.json)"),
            "{e}"
        );
        assert!(damage(dir, ReadFor::Model).is_none());
        list("3");
        let e = damage(dir, ReadFor::Resume).unwrap().to_string();
        assert!(e.contains("rollout.json: malformed"), "{e}");
        list(r#"["r0.safetensors"]"#);
        assert!(damage(dir, ReadFor::Resume).is_none());
        std::fs::rename(
            dir.join("r0.safetensors"),
            dir.join("rollout.rank-0.safetensors"),
        )
        .unwrap();
        std::fs::remove_file(dir.join(LIST)).unwrap();
        let e = damage(dir, ReadFor::Resume).unwrap().to_string();
        assert!(
            e.contains("rollout.json: missing (it names rollout.rank-0.safetensors)"),
            "{e}"
        );
    }

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
            // step-0000008 was copied without its files: not complete either.
            match name {
                "step-0000008" => std::fs::create_dir_all(ck.join(name)).unwrap(),
                _ => {
                    complete(&ck, name);
                }
            }
        }
        let newest = Checkpoints::latest(run.path()).unwrap().unwrap();
        assert_eq!(newest, ck.join("step-0000004"));
        std::fs::write(ck.join("latest"), "step-0000002\n").unwrap();
        assert_eq!(
            Checkpoints::latest(run.path()).unwrap().unwrap(),
            ck.join("step-0000002")
        );
        // A pointer to a checkpoint that is gone: a reader is told which one it could take.
        let t = candle_core::Tensor::zeros(3, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
        let weights = std::collections::HashMap::from([("w", t)]);
        candle_core::safetensors::save(&weights, ck.join("step-0000004/model.safetensors"))
            .unwrap();
        std::fs::write(ck.join("latest"), "step-0000009\n").unwrap();
        let e = resolve_checkpoint(run.path()).unwrap_err().to_string();
        assert!(
            e.contains("points to a missing checkpoint")
                && e.contains("step-0000004 is intact: name it"),
            "{e}"
        );
        // A directory that holds only the run an --overwrite set aside says where it is.
        let aside = tempfile::tempdir().unwrap();
        std::fs::create_dir(aside.path().join(".overwritten")).unwrap();
        let e = resolve_checkpoint(aside.path()).unwrap_err().to_string();
        assert!(
            e.contains("holds no checkpoint") && e.contains(".overwritten (move its files back"),
            "{e}"
        );
    }

    /// A run's damaged final model names the intact checkpoint a reader could take instead,
    /// as a damaged latest checkpoint does; so does a damaged checkpoint named itself.
    #[test]
    fn a_damaged_final_model_names_an_intact_checkpoint() {
        let run = tempfile::tempdir().unwrap();
        let weights = |d: &Path| {
            let t =
                candle_core::Tensor::zeros(4, candle_core::DType::F32, &candle_core::Device::Cpu);
            candle_core::safetensors::save(
                &std::collections::HashMap::from([("w".to_string(), t.unwrap())]),
                d.join("model.safetensors"),
            )
            .unwrap();
        };
        let step = complete(&run.path().join("checkpoints"), "step-0000003");
        weights(&step);
        let fin = run.path().join("final");
        std::fs::create_dir_all(&fin).unwrap();
        std::fs::write(fin.join("meta.json"), "{}").unwrap();
        weights(&fin);
        assert_eq!(resolve_checkpoint_for_model(run.path()).unwrap(), fin);
        let bytes = std::fs::read(fin.join("model.safetensors")).unwrap();
        std::fs::write(fin.join("model.safetensors"), &bytes[..bytes.len() - 3]).unwrap();
        // Reading `named` is refused naming its damaged `file` and `step`, which is intact.
        let names_intact = |named: &Path, file: &str| {
            let e = resolve_checkpoint_for_model(named).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{file}: cannot read safetensors"))
                    && e.ends_with(&format!(
                        "; the checkpoint {} is intact: name it",
                        step.display()
                    )),
                "{e}"
            );
        };
        names_intact(run.path(), "final/model.safetensors");
        // A damaged checkpoint named itself says the same of another.
        let later = complete(&run.path().join("checkpoints"), "step-0000006");
        std::fs::write(later.join("model.safetensors"), &bytes[..bytes.len() - 3]).unwrap();
        names_intact(&later, "step-0000006/model.safetensors");
        assert_eq!(resolve_checkpoint_for_model(&step).unwrap(), step);
    }

    /// A complete checkpoint directory `name` under `ck`.
    fn complete(ck: &Path, name: &str) -> PathBuf {
        let d = ck.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("state.json"), "{}").unwrap();
        std::fs::write(d.join("meta.json"), "{}").unwrap();
        d
    }

    fn names(ps: &[PathBuf]) -> Vec<String> {
        ps.iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    /// Checkpoints count by their step, not their name's order (which the zero padding keeps
    /// only below ten million); a `.partial` or `.corrupt` one never counts, whatever its step.
    #[test]
    fn complete_checkpoints_are_ordered_by_step_and_leftovers_do_not_count() {
        let d = tempfile::tempdir().unwrap();
        let ck = d.path();
        for name in [
            "step-10000000",
            "step-9999999",
            "step-0000004.partial",
            "step-20000000.corrupt",
            "step-+000005",
        ] {
            complete(ck, name);
        }
        std::fs::write(ck.join("latest"), "step-10000000").unwrap();
        assert_eq!(
            names(&complete_steps(ck).unwrap()),
            ["step-9999999", "step-10000000"]
        );
    }

    /// A save prunes the oldest of the checkpoints up to its own step: never the one it wrote,
    /// nor (for one of a higher step, left by an earlier attempt that went further) the one
    /// before it that a resume continued from, and nothing set aside or unfinished; what an
    /// earlier prune left half removed goes.
    #[test]
    fn pruning_keeps_the_checkpoint_just_written_and_the_one_resumed_from() {
        let run = tempfile::tempdir().unwrap();
        let ckpts = Checkpoints::new(run.path(), 2).unwrap();
        let ck = &ckpts.dir;
        // An earlier attempt reached step 30; this one resumed from step 10.
        for name in ["step-0000005", "step-0000010", "step-0000030"] {
            complete(ck, name);
        }
        std::fs::create_dir_all(ck.join("step-0000040.partial")).unwrap();
        // What a run killed as it pruned left, under its `.removing` name.
        std::fs::create_dir_all(ck.join("step-0000004.removing")).unwrap();
        std::fs::write(ck.join("step-0000004.removing/meta.json"), "{}").unwrap();
        let bad = complete(ck, "step-0000050");
        assert_eq!(set_aside(&bad).unwrap(), ck.join("step-0000050.corrupt"));
        let write = |dir: &Path| {
            std::fs::write(dir.join("state.json"), "{}")?;
            Ok(std::fs::write(dir.join("meta.json"), "{}")?)
        };
        ckpts.save(20, write).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(ck)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "latest",
                "step-0000010",
                "step-0000020",
                "step-0000030",
                "step-0000040.partial",
                "step-0000050.corrupt"
            ]
        );
        assert_eq!(
            Checkpoints::latest(run.path()).unwrap().unwrap(),
            ck.join("step-0000020")
        );
        // What a resume tries: the pointer's, then the complete ones below it, newest first.
        assert_eq!(
            names(&Checkpoints::newest_first(run.path()).unwrap()),
            ["step-0000020", "step-0000010"]
        );
        // A second bad checkpoint of one step keeps the first one set aside.
        let again = complete(ck, "step-0000050");
        assert_eq!(
            set_aside(&again).unwrap(),
            ck.join("step-0000050.corrupt-2")
        );
        // A pointer to a directory that is gone: tried first (and failing), then the others.
        std::fs::write(ck.join("latest"), "step-0000025").unwrap();
        assert_eq!(
            names(&Checkpoints::newest_first(run.path()).unwrap()),
            ["step-0000025", "step-0000020", "step-0000010"]
        );
        let e = Checkpoints::latest(run.path()).unwrap_err().to_string();
        assert!(e.contains("points to a missing checkpoint"), "{e}");
    }
}
