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

    fn download(self, id: &str, revision: Option<&str>) -> String {
        let rev = revision.map_or(String::new(), |r| format!(" --revision {r}"));
        match self {
            Repo::Model => format!("hf download {id}{rev}"),
            Repo::Dataset => format!("hf download {id}{rev} --repo-type dataset"),
        }
    }
}

/// `path` as given where it is there; else, where it reads as a Hub repository's name
/// (`ORG/NAME`, or a directory inside one: `openai/gsm8k/main`), that repository's snapshot
/// in the Hub cache (its `refs/main` revision, or the one `ORG/NAME@REVISION` names: a branch,
/// a tag or a commit), said in one line. An `ORG/NAME` the cache does not hold is an error
/// naming `flag` and saying how to fetch it.
pub fn locate(path: &Path, repo: Repo, flag: &str) -> Result<PathBuf> {
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let Some(Named {
        id,
        revision,
        inner,
    }) = repo_id(path)
    else {
        return Ok(path.to_path_buf());
    };
    let id = id.as_str();
    let revision = revision.as_deref();
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
            repo.download(id, revision)
        );
    }
    let snapshot = snapshot_of(&dir, revision).map_err(|e| {
        let fetch = match e.downcast_ref::<Ambiguous>() {
            Some(_) => String::new(),
            None => format!("; `{}` fetches it", repo.download(id, revision)),
        };
        anyhow::anyhow!(
            "{flag} {}: the Hugging Face cache's {what} {id}: {e:#}{fetch}",
            path.display(),
        )
    })?;
    let at = snapshot.join(inner);
    crate::warnln!("[hub] {}: {}", path.display(), at.display());
    Ok(at)
}

/// The Hub name of a snapshot in the cache (`ORG/NAME` of
/// `.../models--ORG--NAME/snapshots/REV`), what an exported adapter names as its base so that
/// it loads on another machine; with its commit where that is not the one `refs/main` names
/// (PEFT's `revision`).
pub fn repo_of_snapshot(path: &Path) -> Option<(String, Option<String>)> {
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
    let commit = &parts[i + 1];
    let main = std::fs::read_to_string(path.parent()?.parent()?.join("refs/main"));
    let revision = match main {
        Ok(m) if m.trim() == commit => None,
        _ => Some(commit.clone()),
    };
    Some((repo.replacen("--", "/", 1), revision))
}

/// The snapshot of a cached repository at `revision`: a branch or tag its `refs/` holds, a
/// commit, or seven or more of a commit's first characters. Without one, what `refs/main`
/// names, or where there is none (a download of another revision), the only snapshot there is.
fn snapshot_of(dir: &Path, revision: Option<&str>) -> Result<PathBuf> {
    if let Some(rev) = revision {
        return snapshot_at(dir, rev);
    }
    if let Some(at) = by_ref(dir, "main") {
        return at;
    }
    let all = snapshot_names(dir);
    match all.len() {
        1 => Ok(dir.join("snapshots").join(&all[0])),
        0 => bail!("no snapshot: the download did not finish"),
        n => bail!(
            "{n} snapshots and no refs/main to choose one: give the snapshot's directory ({})",
            dir.join("snapshots").join(&all[0]).display()
        ),
    }
}

/// The snapshot that `refs/NAME` names (a branch, a tag, a pull request's `refs/pr/N`), where
/// the cache holds that ref.
fn by_ref(dir: &Path, name: &str) -> Option<Result<PathBuf>> {
    let commit = std::fs::read_to_string(dir.join("refs").join(name)).ok()?;
    let at = dir.join("snapshots").join(commit.trim());
    Some(match at.is_dir() {
        true => Ok(at),
        false => Err(anyhow::anyhow!(
            "refs/{name} names revision {}, which snapshots/ lacks",
            commit.trim()
        )),
    })
}

/// The names of the snapshots (commits) the cache holds of a repository, sorted.
fn snapshot_names(dir: &Path) -> Vec<String> {
    let mut all: Vec<String> = match std::fs::read_dir(dir.join("snapshots")) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect(),
        Err(_) => Vec::new(),
    };
    all.sort();
    all
}

/// The snapshot of revision `rev` (see [`snapshot_of`]).
fn snapshot_at(dir: &Path, rev: &str) -> Result<PathBuf> {
    if let Some(at) = by_ref(dir, rev) {
        return at;
    }
    let all = snapshot_names(dir);
    let hits: Vec<&String> = match all.iter().find(|s| *s == rev) {
        Some(exact) => vec![exact],
        None if rev.len() >= 7 => all.iter().filter(|s| s.starts_with(rev)).collect(),
        None => Vec::new(),
    };
    match hits[..] {
        [one] => Ok(dir.join("snapshots").join(one)),
        [] => {
            // Branches and tags are files; `refs/refs/pr/N`, a pull request's, is deeper.
            let mut refs: Vec<String> = match std::fs::read_dir(dir.join("refs")) {
                Ok(entries) => entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().is_file())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect(),
                Err(_) => Vec::new(),
            };
            refs.sort();
            let short = match rev.len() < 7 && all.iter().any(|s| s.starts_with(rev)) {
                true => "; a commit is named by seven of its characters or more",
                false => "",
            };
            bail!(
                "no revision {rev} (it holds {}{}the commits {}){short}",
                refs.join(", "),
                if refs.is_empty() { "" } else { " and " },
                all.join(", ")
            )
        }
        _ => Err(Ambiguous(format!(
            "revision {rev} is the start of {} commits' names: give more of it",
            hits.len()
        ))
        .into()),
    }
}

/// A revision that names several snapshots: the cache holds it, so no download is its cure.
#[derive(Debug)]
struct Ambiguous(String);

impl std::fmt::Display for Ambiguous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Ambiguous {}

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

/// A Hub repository a path names.
#[derive(Debug, PartialEq)]
struct Named {
    /// `NAME` or `ORG/NAME`.
    id: String,
    /// The revision after an `@`, where one is given.
    revision: Option<String>,
    /// The directory inside the snapshot.
    inner: PathBuf,
}

/// The repository a missing path names where it reads as one, and the directory inside its
/// snapshot: `NAME` or `ORG/NAME`, with `@REVISION` where it asks for one, then any
/// directories, each part of letters, digits, `-`, `_` and `.`, none opening with a dot; not
/// where its first part is a local directory (a run's `runs/sft` not yet made) or its name
/// ends as a file's does (`data/trian.jsonl`).
fn repo_id(path: &Path) -> Option<Named> {
    let s = path.to_str()?;
    let parts: Vec<&str> = s.split('/').collect();
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    let lower = s.to_lowercase();
    let local = parts.len() > 1 && Path::new(parts[0]).is_dir();
    let file = FILE_ENDINGS.iter().any(|e| lower.ends_with(e));
    // The repository's name is the first part where it carries the revision, else the second.
    let n = match parts[0].contains('@') {
        true => 1,
        false => parts.len().min(2),
    };
    let (name, mut revision) = match parts[n - 1].split_once('@') {
        Some((name, rev)) => (name, Some(rev.to_string())),
        None => (parts[n - 1], None),
    };
    // A pull request's revision, `refs/pr/N`, spans three parts.
    let mut n_inner = n;
    if revision.as_deref() == Some("refs")
        && parts.get(n) == Some(&"pr")
        && parts
            .get(n + 1)
            .is_some_and(|k| k.bytes().all(|b| b.is_ascii_digit()))
    {
        revision = Some(format!("refs/pr/{}", parts[n + 1]));
        n_inner = n + 2;
    }
    let all_ok = parts[..n - 1].iter().all(|p| ok(p))
        && ok(name)
        && revision.as_deref().is_none_or(|r| r.split('/').all(ok))
        && parts[n_inner..].iter().all(|p| ok(p));
    if !all_ok || local || file {
        return None;
    }
    let id = parts[..n - 1]
        .iter()
        .copied()
        .chain([name])
        .collect::<Vec<_>>()
        .join("/");
    Some(Named {
        id,
        revision,
        inner: parts[n_inner..].iter().collect(),
    })
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
        let named = |id: &str, revision: Option<&str>, inner: &str| {
            Some(Named {
                id: id.into(),
                revision: revision.map(str::to_string),
                inner: inner.into(),
            })
        };
        for id in [
            "gpt2",
            "Qwen/Qwen2.5-0.5B",
            "trl-lib/ultrafeedback_binarized",
        ] {
            assert_eq!(repo_id(Path::new(id)), named(id, None, ""));
        }
        let of = |p: &str| repo_id(Path::new(p));
        assert_eq!(of("openai/gsm8k/main"), named("openai/gsm8k", None, "main"));
        assert_eq!(
            of("openai/gsm8k@e53f048/socratic"),
            named("openai/gsm8k", Some("e53f048"), "socratic")
        );
        assert_eq!(of("gpt2@v1.0"), named("gpt2", Some("v1.0"), ""));
        assert_eq!(of("gpt2@v1/onnx"), named("gpt2", Some("v1"), "onnx"));
        assert_eq!(
            of("o/m@refs/pr/12/sub"),
            named("o/m", Some("refs/pr/12"), "sub")
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
            "org/m@",
            "org@x/m@y",
            "org/m@a@b",
            "org/m@../x",
            // The crate's own directory: a local folder's missing child is no Hub name.
            "src/x",
        ];
        for path in names_none {
            assert_eq!(repo_id(Path::new(path)), None, "{path}");
        }
        let of = |p: &str| repo_of_snapshot(Path::new(p));
        assert_eq!(
            of("/c/hub/models--Qwen--Qwen2.5-0.5B/snapshots/abc"),
            Some(("Qwen/Qwen2.5-0.5B".into(), Some("abc".into())))
        );
        assert_eq!(
            of("/c/hub/models--gpt2/snapshots/abc"),
            Some(("gpt2".into(), Some("abc".into())))
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
        assert_eq!(snapshot_of(&r, None).unwrap(), r.join("snapshots/bbb"));
        // Named by its Hub name, and by its commit where main is another.
        let named = |rev: &str| repo_of_snapshot(&r.join("snapshots").join(rev)).unwrap();
        assert_eq!(named("bbb"), ("o/m".into(), None));
        assert_eq!(named("aaa"), ("o/m".into(), Some("aaa".into())));
        let r = cache(d.path(), "models--o--one", &["ccc"], None);
        assert_eq!(snapshot_of(&r, None).unwrap(), r.join("snapshots/ccc"));
        let r = cache(d.path(), "models--o--two", &["d1", "d2"], None);
        let e = format!("{:#}", snapshot_of(&r, None).unwrap_err());
        assert!(e.contains("2 snapshots and no refs/main"), "{e}");
        let r = cache(d.path(), "models--o--gone", &["e1"], Some("e2"));
        let e = format!("{:#}", snapshot_of(&r, None).unwrap_err());
        assert!(
            e.contains("refs/main names revision e2, which snapshots/ lacks"),
            "{e}"
        );
        let r = d.path().join("models--o--none");
        std::fs::create_dir_all(&r).unwrap();
        let e = format!("{:#}", snapshot_of(&r, None).unwrap_err());
        assert!(
            e.contains("no snapshot: the download did not finish"),
            "{e}"
        );
    }

    /// `@REVISION`: a branch or tag `refs/` holds, a commit, or its first seven characters or
    /// more, whatever `refs/main` says.
    #[test]
    fn snapshots_by_revision() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = ("a1b2c3d4e5f6", "a1b2c3d9e9f9");
        let r = cache(d.path(), "models--o--m", &[a, b, "c0ffee0000"], Some(a));
        std::fs::write(r.join("refs/v2"), b).unwrap();
        let at = |rev: &str| snapshot_of(&r, Some(rev));
        assert_eq!(at("main").unwrap(), r.join("snapshots").join(a));
        assert_eq!(at("v2").unwrap(), r.join("snapshots").join(b));
        assert_eq!(at(b).unwrap(), r.join("snapshots").join(b));
        assert_eq!(at("c0ffee0").unwrap(), r.join("snapshots/c0ffee0000"));
        let e = format!("{:#}", at("a1b2c3d").unwrap_err());
        assert!(e.contains("the start of 2 commits' names"), "{e}");
        let e = format!("{:#}", at("c0ffee").unwrap_err());
        assert!(
            e.starts_with("no revision c0ffee (it holds main, v2 and the commits a1b2c3d4e5f6,")
                && e.ends_with("seven of its characters or more"),
            "{e}"
        );
        // A pull request's ref, deeper in refs/, which is no revision of its own.
        std::fs::create_dir_all(r.join("refs/refs/pr")).unwrap();
        std::fs::write(r.join("refs/refs/pr/3"), "c0ffee0000").unwrap();
        assert_eq!(at("refs/pr/3").unwrap(), r.join("snapshots/c0ffee0000"));
        let e = format!("{:#}", at("nope").unwrap_err());
        assert!(e.contains("it holds main, v2 and"), "{e}");
        std::fs::write(r.join("refs/old"), "gone").unwrap();
        let e = format!("{:#}", at("old").unwrap_err());
        assert!(e.contains("refs/old names revision gone"), "{e}");
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
        let got = locate(Path::new("org/set@abc/main"), Repo::Dataset, "--data").unwrap();
        assert_eq!(got, r.join("snapshots/abc/main"));
        let e = locate(Path::new("org/set@v9"), Repo::Dataset, "--data").unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("no revision v9")
                && e.ends_with(
                    "`hf download org/set --revision v9 --repo-type dataset` fetches it"
                ),
            "{e}"
        );
        // A cache entry without its snapshot says so, naming the flag, and how to fetch it.
        std::fs::create_dir_all(d.path().join("models--org--broken")).unwrap();
        let e = locate(Path::new("org/broken"), Repo::Model, "--init").unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.starts_with(
                "--init org/broken: the Hugging Face cache's model org/broken: no snapshot"
            ) && e.ends_with("`hf download org/broken` fetches it"),
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
