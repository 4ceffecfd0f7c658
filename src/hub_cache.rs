//! Hugging Face Hub names (`Qwen/Qwen2.5-0.5B`, `trl-lib/ultrafeedback_binarized`) read from
//! the local Hub cache, where `hf download` and transformers keep what they fetched, as
//! `from_pretrained` and `load_dataset` read them. temper itself downloads nothing.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

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

/// `path` as given where it is there; else, where it reads as a Hub repository's name
/// (`ORG/NAME`, or a directory inside one: `openai/gsm8k/main`), that repository's snapshot
/// in the Hub cache (its `refs/main` revision), said in one line. An `ORG/NAME` the cache does
/// not hold is an error naming `flag` and saying how to fetch it.
pub fn locate(path: &Path, repo: Repo, flag: &str) -> Result<PathBuf> {
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let Some((id, inner)) = repo_id(path) else {
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
    let what = match repo {
        Repo::Model => "model",
        Repo::Dataset => "dataset",
    };
    if !dir.is_dir() {
        bail!(
            "{flag} {}: no such file or directory, nor a {what} the Hugging Face cache holds \
             ({}): `{}` fetches it (temper downloads nothing)",
            path.display(),
            root.display(),
            repo.download(id)
        );
    }
    let snapshot = snapshot_of(&dir).map_err(|e| {
        anyhow::anyhow!(
            "{flag} {}: the Hugging Face cache's {what} {id}: {e:#}; `{}` fetches it again",
            path.display(),
            repo.download(id)
        )
    })?;
    let at = snapshot.join(inner);
    crate::errln!("[hub] {}: {}", path.display(), at.display());
    Ok(at)
}

/// The Hub name of a snapshot in the cache (`ORG/NAME` of
/// `.../models--ORG--NAME/snapshots/REV`), what an exported adapter names as its base so that
/// it loads on another machine.
pub fn repo_of_snapshot(path: &Path) -> Option<String> {
    let parts: Vec<String> = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let i = parts.iter().rposition(|p| p == "snapshots")?;
    // The snapshot itself, not a directory inside it: that is no repository's root.
    if i == 0 || parts.len() != i + 2 {
        return None;
    }
    let repo = parts[i - 1].strip_prefix("models--")?;
    Some(repo.replacen("--", "/", 1))
}

/// The snapshot of a cached repository that `refs/main` names; without one (a download of
/// another revision), the only snapshot there is.
fn snapshot_of(dir: &Path) -> Result<PathBuf> {
    let snapshots = dir.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(dir.join("refs/main")) {
        let at = snapshots.join(rev.trim());
        if !at.is_dir() {
            bail!(
                "refs/main names revision {}, which snapshots/ lacks",
                rev.trim()
            );
        }
        return Ok(at);
    }
    let mut all: Vec<PathBuf> = match std::fs::read_dir(&snapshots) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect(),
        Err(_) => Vec::new(),
    };
    all.sort();
    match all.len() {
        1 => Ok(all.remove(0)),
        0 => bail!("no snapshot: the download did not finish"),
        n => bail!(
            "{n} snapshots and no refs/main to choose one: give the snapshot's directory ({})",
            all[0].display()
        ),
    }
}

/// File endings of what a path names where it names a file: such a path is a file that is not
/// there, not a Hub name.
const FILE_ENDINGS: [&str; 9] = [
    ".jsonl",
    ".json",
    ".parquet",
    ".safetensors",
    ".txt",
    ".toml",
    ".jinja",
    ".bin",
    ".md",
];

/// The repository a missing path names where it reads as one, and the directory inside its
/// snapshot: `NAME` or `ORG/NAME`, then any directories, each part of letters, digits, `-`,
/// `_` and `.`, none opening with a dot; not where its first part is a local directory (a
/// run's `runs/sft` not yet made) or its name ends as a file's does (`data/trian.jsonl`).
fn repo_id(path: &Path) -> Option<(&str, PathBuf)> {
    let s = path.to_str()?;
    let parts: Vec<&str> = s.split('/').collect();
    let ok = |p: &&str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    let lower = s.to_lowercase();
    let local = parts.len() > 1 && Path::new(parts[0]).is_dir();
    let file = FILE_ENDINGS.iter().any(|e| lower.ends_with(e));
    if !parts.iter().all(ok) || local || file {
        return None;
    }
    let n = parts.len().min(2);
    let id = &s[..parts[..n].iter().map(|p| p.len()).sum::<usize>() + n - 1];
    Some((id, parts[n..].iter().collect()))
}

/// Where the Hub cache is, as huggingface_hub finds it: `HF_HUB_CACHE` (or its older name
/// `HUGGINGFACE_HUB_CACHE`), else `HF_HOME/hub`, else `XDG_CACHE_HOME/huggingface/hub`, else
/// `~/.cache/huggingface/hub`; a leading `~` is the home directory.
fn cache_root() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").filter(|v| !v.is_empty());
    let var = |k: &str| {
        let v = PathBuf::from(std::env::var_os(k).filter(|v| !v.is_empty())?);
        Some(match (v.strip_prefix("~"), &home) {
            (Ok(rest), Some(h)) => Path::new(h).join(rest),
            _ => v,
        })
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")))
        .or_else(|| home.map(|h| PathBuf::from(h).join(".cache/huggingface/hub")))
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
            assert_eq!(repo_id(Path::new(id)), Some((id, PathBuf::new())));
        }
        assert_eq!(
            repo_id(Path::new("openai/gsm8k/main")),
            Some(("openai/gsm8k", PathBuf::from("main")))
        );
        let names_none = [
            "/abs/x",
            "./x",
            "../x",
            "x/",
            ".hidden/x",
            "a b/c",
            "",
            "data/trian.jsonl",
            "org/model.safetensors",
            // The crate's own directory: a local folder's missing child is no Hub name.
            "src/x",
        ];
        for path in names_none {
            assert_eq!(repo_id(Path::new(path)), None, "{path}");
        }
        let of = |p: &str| repo_of_snapshot(Path::new(p));
        assert_eq!(
            of("/c/hub/models--Qwen--Qwen2.5-0.5B/snapshots/abc").as_deref(),
            Some("Qwen/Qwen2.5-0.5B")
        );
        assert_eq!(
            of("/c/hub/models--gpt2/snapshots/abc").as_deref(),
            Some("gpt2")
        );
        assert_eq!(of("/c/hub/models--o--m/snapshots/abc/sub"), None);
        assert_eq!(of("/c/hub/datasets--o--d/snapshots/abc"), None);
        assert_eq!(of("/runs/sft"), None);
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
        let r = cache(d.path(), "models--o--gone", &["e1"], Some("e2"));
        let e = format!("{:#}", snapshot_of(&r).unwrap_err());
        assert!(
            e.contains("refs/main names revision e2, which snapshots/ lacks"),
            "{e}"
        );
        let r = d.path().join("models--o--none");
        std::fs::create_dir_all(&r).unwrap();
        let e = format!("{:#}", snapshot_of(&r).unwrap_err());
        assert!(
            e.contains("no snapshot: the download did not finish"),
            "{e}"
        );
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
        let got = locate(Path::new("org/set/main"), Repo::Dataset, "--data").unwrap();
        assert_eq!(got, r.join("snapshots/abc/main"));
        // A cache entry without its snapshot says so, naming the flag, and how to fetch it.
        std::fs::create_dir_all(d.path().join("models--org--broken")).unwrap();
        let e = locate(Path::new("org/broken"), Repo::Model, "--init").unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.starts_with(
                "--init org/broken: the Hugging Face cache's model org/broken: no snapshot"
            ) && e.ends_with("`hf download org/broken` fetches it again"),
            "{e}"
        );
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
        for path in ["src/no-such", "gpt2"] {
            let p = Path::new(path);
            assert_eq!(locate(p, Repo::Model, "--init").unwrap(), p);
        }
        std::env::remove_var("HF_HUB_CACHE");
    }
}
