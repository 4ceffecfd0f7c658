//! Hugging Face Hub names (`Qwen/Qwen2.5-0.5B`, `trl-lib/ultrafeedback_binarized`) read from
//! the local Hub cache, where `hf download` and transformers keep what they fetched, as
//! `from_pretrained` and `load_dataset` read them. temper itself downloads nothing.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// What a Hub repository holds: the cache keeps models and datasets apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repo {
    Model,
    Dataset,
}

impl Repo {
    fn prefix(self) -> &'static str {
        match self {
            Repo::Model => "models",
            Repo::Dataset => "datasets",
        }
    }

    fn download(self, id: &str) -> String {
        match self {
            Repo::Model => format!("hf download {id}"),
            Repo::Dataset => format!("hf download {id} --repo-type dataset"),
        }
    }
}

/// `path` as given where it is there; else, where it reads as a Hub repository's name, that
/// repository's snapshot in the Hub cache (its `refs/main` revision), said in one line. An
/// `ORG/NAME` the cache does not hold is an error naming `flag` and saying how to fetch it.
pub fn locate(path: &Path, repo: Repo, flag: &str) -> Result<PathBuf> {
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let Some(id) = repo_id(path) else {
        return Ok(path.to_path_buf());
    };
    let Some(root) = cache_root() else {
        return Ok(path.to_path_buf());
    };
    let dir = root.join(format!("{}--{}", repo.prefix(), id.replace('/', "--")));
    // A bare name (`gpt2`) is as likely a mistyped local path: its own error says so.
    if !dir.is_dir() && !id.contains('/') {
        return Ok(path.to_path_buf());
    }
    if !dir.is_dir() {
        bail!(
            "{flag} {id}: no such file or directory, nor a {} the Hugging Face cache holds \
             ({}): `{}` fetches it (temper downloads nothing)",
            match repo {
                Repo::Model => "model",
                Repo::Dataset => "dataset",
            },
            root.display(),
            repo.download(id)
        );
    }
    let snapshot = snapshot_of(&dir)?;
    crate::errln!("[hub] {id}: {}", snapshot.display());
    Ok(snapshot)
}

/// The snapshot of a cached repository that `refs/main` names; without one (a download of
/// another revision), the only snapshot there is.
fn snapshot_of(dir: &Path) -> Result<PathBuf> {
    let snapshots = dir.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(dir.join("refs/main")) {
        let at = snapshots.join(rev.trim());
        if at.is_dir() {
            return Ok(at);
        }
    }
    let mut all: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .with_context(|| format!("{}: cannot read", snapshots.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    all.sort();
    match all.len() {
        1 => Ok(all.remove(0)),
        0 => bail!(
            "{}: no snapshot: the download did not finish",
            dir.display()
        ),
        n => bail!(
            "{}: {n} snapshots and no refs/main to choose one: give the snapshot's directory \
             ({})",
            dir.display(),
            all[0].display()
        ),
    }
}

/// The repository a path names where it reads as one: `NAME` or `ORG/NAME`, of letters,
/// digits, `-`, `_` and `.`, neither part opening with a dot.
fn repo_id(path: &Path) -> Option<&str> {
    let s = path.to_str()?;
    let parts: Vec<&str> = s.split('/').collect();
    let ok = |p: &&str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    (parts.len() <= 2 && parts.iter().all(ok)).then_some(s)
}

/// Where the Hub cache is, as huggingface_hub finds it: `HF_HUB_CACHE`, else `HF_HOME/hub`,
/// else `XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
fn cache_root() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/huggingface/hub")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_read_as_repositories() {
        for id in [
            "gpt2",
            "Qwen/Qwen2.5-0.5B",
            "trl-lib/ultrafeedback_binarized",
        ] {
            assert_eq!(repo_id(Path::new(id)), Some(id));
        }
        for path in [
            "/abs/x",
            "a/b/c",
            "./x",
            "../x",
            "x/",
            ".hidden/x",
            "a b/c",
            "",
        ] {
            assert_eq!(repo_id(Path::new(path)), None, "{path}");
        }
    }

    /// A cache as huggingface_hub lays it out, the repository's snapshots beside the
    /// revision `refs/main` names.
    fn cache(dir: &Path, repo: &str, revs: &[&str], main: Option<&str>) -> PathBuf {
        let r = dir.join(repo);
        for rev in revs {
            std::fs::create_dir_all(r.join("snapshots").join(rev)).unwrap();
        }
        if let Some(m) = main {
            std::fs::create_dir_all(r.join("refs")).unwrap();
            std::fs::write(r.join("refs/main"), format!("{m}\n")).unwrap();
        }
        r
    }

    #[test]
    fn snapshots_by_refs_main_else_the_only_one() {
        let d = tempfile::tempdir().unwrap();
        let r = cache(d.path(), "models--o--m", &["aaa", "bbb"], Some("bbb"));
        assert_eq!(snapshot_of(&r).unwrap(), r.join("snapshots/bbb"));
        let r = cache(d.path(), "models--o--one", &["ccc"], None);
        assert_eq!(snapshot_of(&r).unwrap(), r.join("snapshots/ccc"));
        let r = cache(d.path(), "models--o--two", &["d1", "d2"], None);
        let e = format!("{:#}", snapshot_of(&r).unwrap_err());
        assert!(e.contains("2 snapshots and no refs/main"), "{e}");
    }

    /// The variables are read by every test of the binary, so one test sets them and checks
    /// all that depends on them.
    #[test]
    fn hub_names_resolve_through_the_cache() {
        let d = tempfile::tempdir().unwrap();
        let r = cache(d.path(), "datasets--org--set", &["abc"], Some("abc"));
        std::env::set_var("HF_HUB_CACHE", d.path());
        assert_eq!(cache_root().unwrap(), d.path());
        let got = locate(Path::new("org/set"), Repo::Dataset, "--data").unwrap();
        assert_eq!(got, r.join("snapshots/abc"));
        // A model of that name is not there: the error says how to fetch it.
        let e = locate(Path::new("org/set"), Repo::Model, "--init").unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.starts_with("--init org/set: no such file or directory, nor a model the Hugging Face cache holds")
                && e.contains("`hf download org/set` fetches it"),
            "{e}"
        );
        // A path that is there, or that names no repository, is left as it is.
        let here = d.path().join("datasets--org--set");
        assert_eq!(locate(&here, Repo::Model, "--init").unwrap(), here);
        for path in ["no/such/place", "gpt2"] {
            let p = Path::new(path);
            assert_eq!(locate(p, Repo::Model, "--init").unwrap(), p);
        }
        std::env::remove_var("HF_HUB_CACHE");
    }
}
