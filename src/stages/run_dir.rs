//! One run per run directory. A fresh run in a directory that already holds one would mix the
//! two runs' metrics, and the checkpoint pruning (which keeps the highest steps) would delete
//! the new run's checkpoints in favour of the old one's, leaving `checkpoints/latest` pointing
//! at nothing. So a stage refuses such a directory unless told to resume it or start it over.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// How a stage begins its run directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A new run: the directory must hold none.
    Fresh,
    /// A new run where an earlier one's files are deleted first (`--overwrite`).
    Overwrite,
    /// The run the directory holds, from its latest checkpoint (`--resume`).
    Resume,
}

/// What shows that `dir` holds a run: its checkpoints, final model or metrics. A start that
/// failed before its first step leaves only `config.toml` and `run.json`, and holds none.
const RUN_MARKS: [&str; 3] = ["checkpoints", "final", "metrics.jsonl"];

/// Everything a run writes in its directory, which `--overwrite` deletes.
const RUN_FILES: [&str; 8] = [
    "checkpoints",
    "final",
    "metrics.jsonl",
    "config.toml",
    "run.json",
    "profile.json",
    "completions.jsonl",
    "summary.json",
];

/// The first sign that `dir` holds a run, if it does.
pub fn earlier_run(dir: &Path) -> Option<&'static str> {
    RUN_MARKS.into_iter().find(|m| dir.join(m).exists())
}

/// Refuses a fresh start in a directory that holds a run.
pub fn check_fresh(dir: &Path) -> Result<()> {
    if let Some(mark) = earlier_run(dir) {
        bail!(
            "{}: already holds a run ({mark}): continue it with --resume {}, start it over with \
             --overwrite, or give another --out",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Deletes the files of the run `dir` holds, and nothing else there.
pub fn clear(dir: &Path) -> Result<()> {
    for name in RUN_FILES {
        let p = dir.join(name);
        let gone = match std::fs::symlink_metadata(&p) {
            Err(_) => continue,
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p),
            Ok(_) => std::fs::remove_file(&p),
        };
        gone.with_context(|| format!("{}: cannot delete (--overwrite)", p.display()))?;
    }
    Ok(())
}

/// Prepares `dir` for a start: refuses a fresh one over an earlier run, clears one for an
/// overwrite.
pub fn begin(dir: &Path, start: Start) -> Result<()> {
    match start {
        Start::Fresh => check_fresh(dir),
        Start::Overwrite => clear(dir),
        Start::Resume => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with a run's files is refused for a fresh start, naming the flags that
    /// continue or replace it; an overwrite deletes those files and keeps the user's own.
    #[test]
    fn a_run_directory_holds_one_run() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("run");
        begin(&dir, Start::Fresh).unwrap();
        std::fs::create_dir_all(dir.join("checkpoints/step-0000004")).unwrap();
        for f in ["metrics.jsonl", "config.toml", "data.jsonl"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let e = begin(&dir, Start::Fresh).unwrap_err().to_string();
        assert!(
            e.contains("checkpoints") && e.contains("--resume") && e.contains("--overwrite"),
            "{e}"
        );
        begin(&dir, Start::Resume).unwrap();
        begin(&dir, Start::Overwrite).unwrap();
        assert_eq!(earlier_run(&dir), None);
        assert!(!dir.join("config.toml").exists());
        assert!(dir.join("data.jsonl").exists(), "the user's own file stays");
        begin(&dir, Start::Fresh).unwrap();
        // A failed start's files alone are no run.
        std::fs::write(dir.join("config.toml"), "x").unwrap();
        begin(&dir, Start::Fresh).unwrap();
    }
}
