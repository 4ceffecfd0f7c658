//! Writes that survive a kill at any moment: everything goes to a temporary name in the same
//! directory and is renamed into place only when complete, so a reader sees the old file (or
//! directory) or the new one, never half of one. On failure the temporary is removed.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

/// `path` with `.tmpPID` appended to its file name.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
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

/// Writes `bytes` to `path` atomically, creating its directory if needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create directory", dir.display()))?;
    }
    let tmp = tmp_path(path);
    if let Err(e) = std::fs::write(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(anyhow!("{}: cannot write: {e}", tmp.display()));
    }
    rename_into_place(&tmp, path)
}

/// Fills directory `path` with `write(tmp_dir)` in `path.partial` and renames it into place:
/// the directory is complete or absent (an older version stays until the new one is whole).
pub fn write_dir_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    let tmp = path.with_file_name(name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("{}: cannot remove", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    write(&tmp)?;
    if path.exists() {
        std::fs::remove_dir_all(path)
            .with_context(|| format!("{}: cannot replace", path.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let left: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["a.json"]);
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
