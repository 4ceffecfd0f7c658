//! Writes that survive a kill at any moment: everything goes to a temporary name in the same
//! directory and is renamed into place only when complete, so a reader sees the old file (or
//! directory) or the new one, never half of one. On failure the temporary is removed.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

/// `path` with `.tmpPID` appended to its file name.
pub fn tmp_path(path: &Path) -> PathBuf {
    with_suffix(path, &format!(".tmp{}", std::process::id()))
}

/// Renames a finished temporary file over `path`, removing the temporary if that fails.
pub fn rename_into_place(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(tmp);
        anyhow!("{}: cannot write: {e}", path.display())
    })
}

/// Gives `file` the permissions a newly created file gets here (0644 under umask 022), which
/// a writer that goes through a private temporary file (0600) leaves it without: a checkpoint
/// written by one user is then readable by the group that shares the runs.
pub fn default_permissions(file: &Path) -> Result<()> {
    let mut probe = file.as_os_str().to_os_string();
    probe.push(".mode");
    let probe = PathBuf::from(probe);
    let perms = std::fs::File::create(&probe)
        .and_then(|f| f.metadata())
        .map(|m| m.permissions());
    let _ = std::fs::remove_file(&probe);
    let perms = perms.with_context(|| format!("{}: cannot create", probe.display()))?;
    std::fs::set_permissions(file, perms)
        .with_context(|| format!("{}: cannot set permissions", file.display()))
}

/// `bytes` read from `path` as text; bytes that are no UTF-8 are named by their line.
pub fn utf8_text(path: &Path, bytes: Vec<u8>) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
        anyhow!("{}:{line}: not valid UTF-8 text", path.display())
    })
}

/// Creates directory `dir` and those above it. Where a file stands in the way, it is named
/// (the system says only "File exists", of the directory asked for).
pub fn create_dirs(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| match dir.ancestors().find(|a| a.is_file()) {
        Some(file) => anyhow!(
            "{}: a file, where the directory {} goes",
            file.display(),
            dir.display()
        ),
        None => anyhow!("{}: cannot create directory: {e}", dir.display()),
    })
}

/// Writes `bytes` to `path` atomically, creating its directory if needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_dirs(dir)?;
    }
    let tmp = tmp_path(path);
    if let Err(e) = std::fs::write(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(anyhow!("{}: cannot write: {e}", tmp.display()));
    }
    rename_into_place(&tmp, path)
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Removes `path` whatever it is: a directory with its contents, a file or a link.
pub fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The suffix of the directory [`write_dir_atomic`] fills before it renames it into place.
const PARTIAL: &str = ".partial";

/// The suffix of a directory [`write_dir_atomic`] replaces, while it does.
const SUPERSEDED: &str = ".superseded";

/// The suffixes of what [`write_dir_atomic`] may leave beside a directory when killed: a run
/// directory's clean-up removes them with the rest of the run.
pub const LEFTOVER_SUFFIXES: [&str; 2] = [PARTIAL, SUPERSEDED];

/// Fills directory `path` with `write(tmp_dir)` in `path.partial` and renames it into place:
/// the directory is complete or absent (an older version stays until the new one is whole).
/// A `path.partial` left by a process killed while writing is replaced; one this call made is
/// removed when the write fails. The files are on the disk before the directory is renamed,
/// and the rename is before this returns.
pub fn write_dir_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = with_suffix(path, PARTIAL);
    remove_any(&tmp).with_context(|| format!("{}: cannot remove", tmp.display()))?;
    let filled = std::fs::create_dir_all(&tmp)
        .with_context(|| format!("{}: cannot create", tmp.display()))
        .and_then(|()| write(&tmp))
        .and_then(|()| sync_tree(&tmp));
    if let Err(e) = filled {
        // The write's error is the one to report; a temporary that cannot be removed either
        // is replaced by the next write.
        let _ = remove_any(&tmp);
        return Err(e);
    }
    // The old directory is renamed aside, not deleted, until the new one is in place: a kill
    // between the two renames leaves it whole as `path.superseded`, and a failed rename puts
    // it back. (Not `.old`, a name a user may give a copy of their own.)
    let old = with_suffix(path, SUPERSEDED);
    let replacing = path.exists();
    if replacing {
        remove_any(&old).with_context(|| format!("{}: cannot remove", old.display()))?;
        std::fs::rename(path, &old)
            .with_context(|| format!("{}: cannot replace", path.display()))?;
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        if replacing {
            let _ = std::fs::rename(&old, path);
        }
        return Err(anyhow!("{}: cannot write: {e}", path.display()));
    }
    // Also one a kill between the renames of an earlier replacement left.
    let _ = remove_any(&old);
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => sync_dir(Path::new(".")),
    }
}

/// Flushes every file under `dir`, and `dir` itself, to the disk. Without it the rename that
/// publishes a directory can reach the disk before its files' contents do: after a power
/// loss or a crash of the machine, a checkpoint that was complete and named `latest` reads
/// back as empty files, while the prune that followed its write removed the older ones.
fn sync_tree(dir: &Path) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?;
    for entry in entries {
        let p = entry
            .with_context(|| format!("{}: cannot list", dir.display()))?
            .path();
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
            sync_tree(&p)?;
        } else {
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("{}: cannot flush to disk", p.display()))?;
        }
    }
    sync_dir(dir)
}

/// Flushes directory `dir`'s entries (names created, renamed or removed in it) to the disk.
/// A file system that cannot flush a directory (some network and user-space ones refuse the
/// call) keeps its own guarantees, and is not an error.
fn sync_dir(dir: &Path) -> Result<()> {
    match std::fs::File::open(dir).and_then(|f| f.sync_all()) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
            ) =>
        {
            Ok(())
        }
        r => r.with_context(|| format!("{}: cannot flush to disk", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names in directory `dir`, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn atomic_writes_leave_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sub").join("a.json");
        write_atomic(&f, b"1").unwrap();
        write_atomic(&f, b"2").unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "2");
        let d = dir.path().join("final");
        write_dir_atomic(&d, |t| write_atomic(&t.join("x"), b"x")).unwrap();
        assert!(write_dir_atomic(&d, |_| Err(anyhow!("boom"))).is_err());
        // A failed write leaves the previous complete directory readable.
        assert_eq!(std::fs::read_to_string(d.join("x")).unwrap(), "x");
        assert_eq!(listing(&dir.path().join("sub")), ["a.json"]);
        // A replaced directory leaves nothing beside it, nor does one a kill between the
        // renames left as `final.superseded`.
        std::fs::create_dir_all(dir.path().join("final.superseded")).unwrap();
        write_dir_atomic(&d, |t| write_atomic(&t.join("y"), b"y")).unwrap();
        assert!(!d.join("x").exists() && d.join("y").exists());
        assert_eq!(listing(dir.path()), ["final", "sub"]);
    }

    /// A directory write that fails leaves no `.partial` beside the directory, and one left
    /// by a killed writer (a directory with files in it, or a stray file) does not stop the
    /// next write.
    #[test]
    fn a_failed_directory_write_leaves_no_partial() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("step-0000004");
        let names = || listing(dir.path());
        let e = write_dir_atomic(&d, |t| {
            write_atomic(&t.join("half"), b"x")?;
            Err(anyhow!("disk full"))
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "disk full");
        assert!(names().is_empty(), "{:?}", names());

        let partial = dir.path().join("step-0000004.partial");
        std::fs::create_dir_all(partial.join("sub")).unwrap();
        std::fs::write(partial.join("sub").join("stale"), b"old").unwrap();
        write_dir_atomic(&d, |t| write_atomic(&t.join("x"), b"1")).unwrap();
        assert_eq!(names(), ["step-0000004"]);
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1, "nothing stale");

        std::fs::write(&partial, b"stray").unwrap();
        write_dir_atomic(&d, |t| write_atomic(&t.join("x"), b"2")).unwrap();
        assert_eq!(names(), ["step-0000004"]);
        assert_eq!(std::fs::read_to_string(d.join("x")).unwrap(), "2");
    }

    /// Saved tensors get a plain new file's permissions, not the 0600 of the temporary file
    /// the safetensors writer goes through.
    #[test]
    fn saved_tensors_are_as_readable_as_any_new_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let f = dir.path().join("model.safetensors");
        let t = candle_core::Tensor::zeros(3, candle_core::DType::F32, &candle_core::Device::Cpu);
        let map = std::collections::HashMap::from([("w".to_string(), t.unwrap())]);
        crate::train::params::save_tensors(&f, &map).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&f), mode(&plain));
        let left = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(left, 2, "no probe or temporary left");
    }
}
