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

/// What shows that `dir` holds a run: a checkpoint, a final model, or metrics. A start that
/// failed in its first step leaves only `config.toml`, `run.json`, an empty `checkpoints/`
/// (every rank makes one) and an empty `metrics.jsonl`, and holds none.
fn run_marks(dir: &Path) -> [(&'static str, bool); 3] {
    let metrics = std::fs::metadata(dir.join("metrics.jsonl")).is_ok_and(|m| m.len() > 0);
    // Complete checkpoints count without their pointer: a fresh start would prune them.
    let ckpts = dir.join("checkpoints");
    let steps = ckpts.is_dir()
        && crate::train::checkpoint::complete_steps(&ckpts).is_ok_and(|s| !s.is_empty());
    [
        (
            "checkpoints",
            dir.join("checkpoints/latest").exists() || steps,
        ),
        ("final", dir.join("final").exists()),
        ("metrics.jsonl", metrics),
    ]
}

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
    run_marks(dir).into_iter().find(|m| m.1).map(|m| m.0)
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

/// Refuses an overwrite of `dir` where a model the run reads (`inputs`: its `--init`, value
/// model, teacher) lies inside it: the deletion would take the run's own starting point.
pub fn check_inputs_outside(dir: &Path, inputs: &[&Path]) -> Result<()> {
    let Ok(out) = std::fs::canonicalize(dir) else {
        return Ok(());
    };
    for input in inputs {
        if std::fs::canonicalize(input).is_ok_and(|p| p.starts_with(&out)) {
            bail!(
                "--overwrite {}: {} lies inside it and would be deleted; give another --out",
                dir.display(),
                input.display()
            );
        }
    }
    Ok(())
}

/// Deletes the files of the run `dir` holds, and nothing else there.
pub fn clear(dir: &Path) -> Result<()> {
    // The final models an earlier run's resumes set aside (`final-step-N`) are its too, and
    // so are a `final.partial` its kill left half-written and a `final.superseded` one left
    // between the two renames of a replacement.
    let aside: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| {
                n.starts_with("final-step-")
                    || n.starts_with("final-earlier")
                    || n.strip_prefix("final")
                        .is_some_and(|s| crate::io::LEFTOVER_SUFFIXES.contains(&s))
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    for name in RUN_FILES
        .iter()
        .copied()
        .chain(aside.iter().map(String::as_str))
    {
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
        // A failed first step's leftovers are no run.
        std::fs::create_dir_all(dir.join("checkpoints")).unwrap();
        std::fs::write(dir.join("metrics.jsonl"), "").unwrap();
        begin(&dir, Start::Fresh).unwrap();
        std::fs::create_dir_all(dir.join("checkpoints/step-0000004")).unwrap();
        for f in [
            "checkpoints/latest",
            "metrics.jsonl",
            "config.toml",
            "data.jsonl",
        ] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let e = begin(&dir, Start::Fresh).unwrap_err().to_string();
        assert!(
            e.contains("checkpoints") && e.contains("--resume") && e.contains("--overwrite"),
            "{e}"
        );
        begin(&dir, Start::Resume).unwrap();
        let init = dir.join("checkpoints/step-0000004");
        let e = check_inputs_outside(&dir, &[d.path(), &init]).unwrap_err();
        assert!(e.to_string().contains("step-0000004"), "{e}");
        std::fs::create_dir_all(dir.join("final-step-0000002")).unwrap();
        std::fs::create_dir_all(dir.join("final.partial")).unwrap();
        std::fs::create_dir_all(dir.join("final.superseded")).unwrap();
        begin(&dir, Start::Overwrite).unwrap();
        assert_eq!(earlier_run(&dir), None);
        assert!(!dir.join("config.toml").exists());
        assert!(
            !dir.join("final-step-0000002").exists(),
            "a set-aside final is the run's"
        );
        assert!(
            !dir.join("final.partial").exists() && !dir.join("final.superseded").exists(),
            "a killed write's leftovers too"
        );
        assert!(dir.join("data.jsonl").exists(), "the user's own file stays");
        begin(&dir, Start::Fresh).unwrap();
        // Complete checkpoints without their pointer are a run: a fresh start would prune them.
        let step = dir.join("checkpoints/step-0000006");
        std::fs::create_dir_all(&step).unwrap();
        std::fs::write(step.join("state.json"), "{}").unwrap();
        std::fs::write(step.join("meta.json"), "{}").unwrap();
        assert_eq!(earlier_run(&dir), Some("checkpoints"));
    }
}
