//! The models a run reads from outside its directory on every start: a full fine-tune's
//! reference (its `--init`), reward models, a distillation teacher. A resume reads them again
//! from their paths, so one replaced in between (an init run trained further, whose `final/`
//! is then another model) would hold the rest of the run to another model than its first
//! part, on a curve that is no longer the run's. Each start records what it read
//! (`frozen_inputs.json`: each weight file's size and modification time) and a resume
//! refuses a model that changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::loader::Loaded;
use super::Env;

pub const FILE: &str = "frozen_inputs.json";

/// What one model's weights were when read: the directory they came from, and each weight
/// file's name, bytes and modification time (nanoseconds since the epoch).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Seen {
    dir: PathBuf,
    files: Vec<(String, u64, u128)>,
}

/// `dir`'s weight files, each named `prefix` + its file name: the path a run records may be
/// relative, and its resume's absolute.
fn weight_files(dir: &Path, prefix: &str, into: &mut Vec<(String, u64, u128)>) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let meta = std::fs::metadata(&path)
            .with_context(|| format!("{}: cannot read its metadata", path.display()))?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        into.push((format!("{prefix}{name}"), meta.len(), modified));
    }
    Ok(())
}

fn seen(loaded: &Loaded) -> Result<Seen> {
    let mut files = Vec::new();
    weight_files(&loaded.dir, "", &mut files)?;
    // A PEFT adapter's base model lives elsewhere.
    if super::loader::reads_as_adapter(&loaded.dir) {
        let base = crate::model::hf::peft_base(&loaded.dir)?;
        weight_files(&base, "the base model's ", &mut files)?;
    }
    files.sort();
    Ok(Seen {
        dir: std::fs::canonicalize(&loaded.dir).unwrap_or_else(|_| loaded.dir.clone()),
        files,
    })
}

/// What `loaded`'s weights are in one line (the directory, each weight file's bytes and
/// modification time), for a later reader to tell whether they changed: `generate --resume`
/// appends to completions that another model began otherwise.
pub fn weights_stamp(loaded: &Loaded) -> Result<String> {
    let s = seen(loaded)?;
    let files: Vec<String> = (s.files.iter())
        .map(|(name, bytes, modified)| format!("{name} {bytes} bytes modified {modified}"))
        .collect();
    Ok(format!("{}: {}", s.dir.display(), files.join(", ")))
}

/// How `now` differs from `before`, in a few words.
fn difference(before: &Seen, now: &Seen) -> String {
    if before.dir != now.dir {
        return format!(
            "it resolved to {} when the run began, to {} now",
            before.dir.display(),
            now.dir.display()
        );
    }
    let name = |f: &(String, u64, u128)| f.0.clone();
    for f in &before.files {
        match now.files.iter().find(|g| g.0 == f.0) {
            None => return format!("{} is gone", name(f)),
            Some(g) if g != f => return format!("{} was rewritten", name(f)),
            Some(_) => {}
        }
    }
    match now
        .files
        .iter()
        .find(|g| !before.files.iter().any(|f| f.0 == g.0))
    {
        Some(g) => format!("{} is new", name(g)),
        None => "its weight files differ".to_string(),
    }
}

fn read(path: &Path) -> Result<BTreeMap<String, Seen>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{}: malformed (delete it to record anew)", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", path.display())),
    }
}

impl Env {
    /// `role` (e.g. "the reference (--init)") was read from `loaded`: recorded on a fresh
    /// start, and on a resume compared with what the run began with. A run from before this
    /// record, or whose start did not read `role`, records it now.
    pub fn check_frozen(&self, role: &str, loaded: &Loaded) -> Result<()> {
        let now = seen(loaded)?;
        let path = self.run_dir.join(FILE);
        let mut all = read(&path)?;
        // A resume with no checkpoint to continue starts over: nothing trained against it yet.
        let continues = self.continues();
        match all.get(role) {
            Some(before) if continues && *before != now => bail!(
                "{}: {role} changed since the run began ({}): a resumed run reads it again, and \
                 would train the rest of its steps against another model than its first part. \
                 Put the original back, or start a new run from this run's checkpoint with \
                 --init (where it is the same model copied anew, which changes only its files' \
                 times, delete {} to record it as it is now)",
                loaded.dir.display(),
                difference(before, &now),
                path.display()
            ),
            Some(_) if continues => return Ok(()),
            _ => {}
        }
        if self.comm.rank() == 0 {
            all.insert(role.to_string(), now);
            crate::io::write_atomic(&path, serde_json::to_string_pretty(&all)?.as_bytes())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen_of(dir: &Path, files: &[(&str, u64, u128)]) -> Seen {
        Seen {
            dir: dir.to_path_buf(),
            files: files
                .iter()
                .map(|(n, b, t)| (n.to_string(), *b, *t))
                .collect(),
        }
    }

    #[test]
    fn a_difference_names_what_changed() {
        let a = seen_of(Path::new("/r/final"), &[("m.safetensors", 10, 1)]);
        let moved = seen_of(
            Path::new("/r/checkpoints/step-4"),
            &[("m.safetensors", 10, 1)],
        );
        assert!(difference(&a, &moved).contains("resolved to /r/final"));
        let rewritten = seen_of(Path::new("/r/final"), &[("m.safetensors", 10, 2)]);
        assert_eq!(difference(&a, &rewritten), "m.safetensors was rewritten");
        let gone = seen_of(Path::new("/r/final"), &[]);
        assert_eq!(difference(&a, &gone), "m.safetensors is gone");
        let grown = seen_of(
            Path::new("/r/final"),
            &[("m.safetensors", 10, 1), ("n.safetensors", 1, 1)],
        );
        assert_eq!(difference(&a, &grown), "n.safetensors is new");
    }
}
