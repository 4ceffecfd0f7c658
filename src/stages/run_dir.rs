//! One run per run directory. A fresh run in a directory that already holds one would mix the
//! two runs' metrics, and the checkpoint pruning (which keeps the highest steps) would delete
//! the new run's checkpoints in favour of the old one's, leaving `checkpoints/latest` pointing
//! at nothing. So a stage refuses such a directory unless told to resume it or start it over.
//!
//! Started over (`--overwrite`), the earlier run is set aside in the directory, not deleted,
//! until the new run writes its first checkpoint: a new run that fails before that (a bad
//! data file, a reward that will not answer) puts the earlier one back. A signal after its
//! first step checkpoints the new run, which then stands in the earlier one's place; one
//! during its setup puts the earlier one back too. Until then the directory holds both runs'
//! files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};

/// How a stage begins its run directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A new run: the directory must hold none.
    Fresh,
    /// A new run in place of an earlier one, whose files are set aside until the new run has
    /// a checkpoint (`--overwrite`).
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

/// Everything a run writes in its directory, which `--overwrite` replaces.
const RUN_FILES: [&str; 10] = [
    "checkpoints",
    super::frozen_inputs::FILE,
    "final",
    "metrics.jsonl",
    crate::train::tensorboard::DIR,
    "config.toml",
    "run.json",
    "profile.json",
    "completions.jsonl",
    "summary.json",
];

/// Renames the final model of the run in `dir` as a replacement of it does while it writes
/// the new one (`final.superseded`, which the next final model's write removes): a run
/// resumed at its last checkpoint then ends again, with its result, instead of refusing to
/// train a finished run. A pipeline's stage that finished without its result recorded.
pub fn set_final_aside_for_result(dir: &Path) -> Result<()> {
    let (fin, aside) = (dir.join("final"), dir.join("final.superseded"));
    crate::io::remove_any(&aside).with_context(|| format!("{}: cannot remove", aside.display()))?;
    std::fs::rename(&fin, &aside).with_context(|| format!("{}: cannot rename", fin.display()))
}

/// Holds `dir` (made where it is not there) for this process until the returned file is
/// dropped: a second run started in it while the first trains (a requeued job beside the one
/// still running, a resume typed twice) would write the same checkpoints and rewrite the
/// metrics the first still appends to. The OS lets the lock go with the process, however it
/// ends, so a killed run leaves nothing to clean up.
pub fn lock(dir: &Path) -> Result<std::fs::File> {
    if dir.is_file() {
        bail!(
            "{}: a file, where the run's directory goes (--out names a directory)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let path = dir.join(LOCK);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("{}: cannot open", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "{}: another temper process is running in it (it holds {}): wait for it to end, \
             or give another --out",
            dir.display(),
            path.display()
        ),
        // A file system without locks (some network mounts) runs unguarded, as before.
        Err(std::fs::TryLockError::Error(_)) => Ok(file),
    }
}

/// The file [`lock`] holds, hidden as tools' own files are.
const LOCK: &str = ".lock";

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
/// model, teacher) lies inside it: replacing the run would take the run's own starting point.
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

/// Where `--overwrite` keeps the earlier run until the new one has a checkpoint.
pub const SET_ASIDE: &str = ".overwritten";
/// Written in [`SET_ASIDE`] once the whole earlier run is there: without it, a setting aside
/// or a putting back was cut short, and what the directory holds of a run belongs with it.
const WHOLE: &str = ".whole";

/// Whether `dir` holds a model of its run: a checkpoint or a final model (metrics alone,
/// which a run logs before its first checkpoint, are not one).
fn holds_model(dir: &Path) -> bool {
    run_marks(dir)
        .into_iter()
        .any(|(mark, set)| set && mark != "metrics.jsonl")
}

/// What is said of a set-aside run that a start finds in `dir` with no checkpoint beside it.
fn left_aside(dir: &Path) -> String {
    format!(
        "{}: holds no checkpoint of its own, and the run an interrupted --overwrite set aside \
         in {}: move its files back to --resume it, or --overwrite to replace it",
        dir.display(),
        dir.join(SET_ASIDE).display()
    )
}

/// The names of the entries of the run `dir` holds, and nothing else there.
fn run_entries(dir: &Path) -> Vec<String> {
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
    RUN_FILES
        .iter()
        .map(|n| n.to_string())
        .chain(aside)
        .filter(|n| std::fs::symlink_metadata(dir.join(n)).is_ok())
        .collect()
}

fn remove(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p)?.is_dir() {
        true => std::fs::remove_dir_all(p),
        false => std::fs::remove_file(p),
    }
}

/// Deletes the files of the run `dir` holds, and nothing else there.
pub fn clear(dir: &Path) -> Result<()> {
    for name in run_entries(dir) {
        let p = dir.join(name);
        remove(&p).with_context(|| format!("{}: cannot delete (--overwrite)", p.display()))?;
    }
    Ok(())
}

/// An earlier run `--overwrite` set aside in `dir/`[`SET_ASIDE`]: deleted by
/// [`SetAside::discard`] once the new run has a checkpoint, put back if it is dropped before
/// (the new run failed first).
#[derive(Debug)]
pub struct SetAside {
    dir: PathBuf,
    discarded: AtomicBool,
}

impl SetAside {
    /// Moves the run `dir` holds into `dir/`[`SET_ASIDE`]. One an interrupted overwrite left
    /// there stays the earlier run where the directory holds no run beside it (the interrupted
    /// one wrote no checkpoint); otherwise it is the older of two, and deleted.
    fn take(dir: &Path) -> Result<Self> {
        let aside = dir.join(SET_ASIDE);
        let whole = aside.join(WHOLE);
        let cut_short = aside.exists() && !whole.exists();
        if aside.exists() && !cut_short && !holds_model(dir) {
            // An overwrite stopped before its first checkpoint: the run it set aside is still
            // the earlier one, and what stands beside it is nothing.
            clear(dir)?;
        } else {
            if aside.exists() && !cut_short {
                // Stopped after its checkpoint, before the set-aside was deleted: the newer
                // run is the one in the directory.
                std::fs::remove_dir_all(&aside)
                    .with_context(|| format!("{}: cannot delete (--overwrite)", aside.display()))?;
            }
            let entries = run_entries(dir);
            if !entries.is_empty() || cut_short {
                std::fs::create_dir_all(&aside)
                    .with_context(|| format!("{}: cannot create (--overwrite)", aside.display()))?;
                for name in entries {
                    let (from, to) = (dir.join(&name), aside.join(&name));
                    // Cut short, an entry is on one side or the other; one on both is the
                    // set-aside's.
                    let moved = match to.exists() {
                        true => remove(&from),
                        false => std::fs::rename(&from, &to),
                    };
                    moved.with_context(|| {
                        format!("{}: cannot set aside (--overwrite)", from.display())
                    })?;
                }
                std::fs::write(&whole, b"")
                    .with_context(|| format!("{}: cannot write", whole.display()))?;
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            discarded: AtomicBool::new(!aside.exists()),
        })
    }

    /// Deletes the earlier run: the new one has a checkpoint to stand in its place.
    pub fn discard(&self) -> Result<()> {
        if self.discarded.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let aside = self.dir.join(SET_ASIDE);
        std::fs::remove_dir_all(&aside)
            .with_context(|| format!("{}: cannot delete (--overwrite)", aside.display()))
    }

    fn restore(&self) -> Result<()> {
        let aside = self.dir.join(SET_ASIDE);
        // First: a kill from here on leaves a set-aside the next start completes, not one it
        // takes for whole beside a model that is half the earlier run's.
        std::fs::remove_file(aside.join(WHOLE))?;
        clear(&self.dir)?;
        for entry in std::fs::read_dir(&aside)? {
            let name = entry?.file_name();
            std::fs::rename(aside.join(&name), self.dir.join(&name))?;
        }
        std::fs::remove_dir(&aside)?;
        Ok(())
    }
}

impl Drop for SetAside {
    fn drop(&mut self) {
        if self.discarded.load(Ordering::SeqCst) {
            return;
        }
        let (dir, aside) = (self.dir.display(), SET_ASIDE);
        match self.restore() {
            Ok(()) => crate::errln!(
                "{dir}: the new run stopped before its first checkpoint, so the run --overwrite \
                 set aside is back in its place"
            ),
            Err(e) => crate::errln!(
                "{dir}: the new run stopped before its first checkpoint, and the run --overwrite \
                 set aside could not be put back ({e}): it is in {dir}/{aside}"
            ),
        }
    }
}

/// Prepares `dir` for a start: refuses a fresh one over an earlier run, sets one aside for an
/// overwrite (returned, to be discarded once the new run has a checkpoint).
pub fn begin(dir: &Path, start: Start) -> Result<Option<SetAside>> {
    let aside = dir.join(SET_ASIDE);
    match start {
        Start::Fresh => {
            if aside.exists() && !holds_model(dir) {
                bail!("{}", left_aside(dir));
            }
            check_fresh(dir).map(|()| None)
        }
        Start::Overwrite => SetAside::take(dir).map(Some),
        Start::Resume if aside.exists() => {
            if !holds_model(dir) {
                bail!("{}", left_aside(dir));
            }
            // The run checkpointed and stopped before the set-aside was deleted.
            std::fs::remove_dir_all(&aside)
                .with_context(|| format!("{}: cannot delete", aside.display()))?;
            Ok(None)
        }
        Start::Resume => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file where the run's directory goes is said to be one, not "File exists".
    #[test]
    fn a_file_as_the_run_directory_is_named() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("notes.txt");
        std::fs::write(&f, "mine").unwrap();
        let e = lock(&f).unwrap_err().to_string();
        assert!(
            e.ends_with(
                "notes.txt: a file, where the run's directory goes (--out names a directory)"
            ),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "mine");
    }

    /// A second lock of a held directory is refused, naming it; the lock goes with its file.
    #[test]
    fn a_run_directory_is_held_by_one_process() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("run");
        let held = lock(&dir).unwrap();
        let e = lock(&dir).unwrap_err().to_string();
        assert!(e.contains("another temper process is running in it"), "{e}");
        drop(held);
        lock(&dir).unwrap();
    }

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
        let aside = begin(&dir, Start::Overwrite).unwrap().unwrap();
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
        let kept = dir.join(SET_ASIDE);
        assert!(kept.join("config.toml").exists() && kept.join("checkpoints/latest").exists());
        // The new run fails before its first checkpoint: the earlier one is put back, and the
        // new one's files go.
        std::fs::write(dir.join("run.json"), "new").unwrap();
        drop(aside);
        assert_eq!(earlier_run(&dir), Some("checkpoints"));
        assert!(dir.join("final-step-0000002").exists() && !kept.exists());
        assert!(!dir.join("run.json").exists(), "the failed run's own file");
        // Killed before its first checkpoint (the guard never dropped), with metrics logged:
        // a fresh start or a resume says where the earlier run is, and the next overwrite
        // keeps it set aside, as the interrupted one left no model in its place.
        std::mem::forget(begin(&dir, Start::Overwrite).unwrap());
        std::fs::write(dir.join("config.toml"), "interrupted").unwrap();
        std::fs::write(dir.join("metrics.jsonl"), "{}\n").unwrap();
        for start in [Start::Fresh, Start::Resume] {
            let e = begin(&dir, start).unwrap_err().to_string();
            assert!(e.contains(".overwritten: move its files back"), "{e}");
        }
        let aside = begin(&dir, Start::Overwrite).unwrap().unwrap();
        assert!(kept.join("checkpoints/latest").exists() && !dir.join("config.toml").exists());
        // Killed while setting aside: the next overwrite completes it.
        drop(aside);
        std::fs::create_dir_all(&kept).unwrap();
        std::fs::rename(dir.join("config.toml"), kept.join("config.toml")).unwrap();
        let aside = begin(&dir, Start::Overwrite).unwrap().unwrap();
        assert!(kept.join("config.toml").exists() && kept.join("checkpoints/latest").exists());
        assert!(earlier_run(&dir).is_none());
        // A checkpoint written, the earlier run is deleted for good.
        aside.discard().unwrap();
        drop(aside);
        assert!(!kept.exists() && earlier_run(&dir).is_none());
        assert!(dir.join("data.jsonl").exists());
        // Killed between a checkpoint and the deletion: a resume deletes the set-aside.
        std::fs::create_dir_all(dir.join("final")).unwrap();
        std::mem::forget(begin(&dir, Start::Overwrite).unwrap());
        std::fs::create_dir_all(dir.join("final")).unwrap();
        assert!(kept.exists());
        begin(&dir, Start::Resume).unwrap();
        assert!(!kept.exists());
        clear(&dir).unwrap();
        begin(&dir, Start::Fresh).unwrap();
        // Complete checkpoints without their pointer are a run: a fresh start would prune them.
        let step = dir.join("checkpoints/step-0000006");
        std::fs::create_dir_all(&step).unwrap();
        std::fs::write(step.join("state.json"), "{}").unwrap();
        std::fs::write(step.join("meta.json"), "{}").unwrap();
        assert_eq!(earlier_run(&dir), Some("checkpoints"));
    }
}
