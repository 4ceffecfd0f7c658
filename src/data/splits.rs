//! Data directories: the files of a corpus or record directory (recursively, in sorted path
//! order), and of one that names its splits as a Hugging Face dataset does
//! (`data/train-00000-of-00002.parquet` beside `data/test-00000-of-00001.parquet`), the split
//! asked for.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Which split of a directory that names its splits is read: the train split (`--data`), the
/// held-out one (`--eval-data`: validation, else test), or the one a flag names (TRL's
/// `dataset_train_split` and `dataset_test_split`), which a dataset whose splits have names of
/// its own (`train_prefs`, `test_sft`) needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part<'a> {
    held_out: bool,
    name: Option<&'a str>,
    /// The flag that names a split here, for errors that ask for one.
    flag: &'static str,
}

impl<'a> Part<'a> {
    /// The train split, as `datasets` loads `split="train"`: `--data`.
    pub fn train() -> Self {
        Part {
            held_out: false,
            name: None,
            flag: "--train-split",
        }
    }

    /// The validation split, else the test split: `--eval-data`.
    pub fn held_out() -> Self {
        Part {
            held_out: true,
            name: None,
            flag: "--eval-split",
        }
    }

    /// The split named `name` where one is, instead of the part's default.
    pub fn named(self, name: Option<&'a str>) -> Self {
        Part {
            name: name.or(self.name),
            ..self
        }
    }

    /// The same part, asked for by `flag` in errors (a command whose flag is not the stages').
    pub fn asked_by(self, flag: &'static str) -> Self {
        Part { flag, ..self }
    }
}

/// The kinds of split `datasets` knows by name; any other name is a split of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Train,
    Validation,
    Test,
}

fn kind(name: &str) -> Option<Kind> {
    match name {
        "train" | "training" => Some(Kind::Train),
        "validation" | "valid" | "dev" | "val" => Some(Kind::Validation),
        "test" | "testing" | "eval" | "evaluation" => Some(Kind::Test),
        _ => None,
    }
}

/// The files of a data file or directory: the file itself, or a directory's files whose names
/// end with one of `exts` (in any case; recursively, in sorted path order; of its `part` where
/// its files name their splits). The others are left out, and said to be, hidden ones aside.
pub(crate) fn data_files(path: &Path, part: Part, exts: &[&str]) -> Result<Vec<PathBuf>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if !meta.is_dir() {
        if let Some(name) = part.name {
            bail!(
                "{}: {} {name} names a split of a directory whose files name their splits, and \
                 this is one file: read whole, it needs no split named",
                path.display(),
                part.flag
            );
        }
        return Ok(vec![path.to_path_buf()]);
    }
    let (mut files, mut left_out) = (Vec::new(), Vec::new());
    collect_files(path, exts, &mut files, &mut left_out, &mut HashSet::new())?;
    files.sort();
    left_out.sort();
    let files = split_files(path, files, part)?;
    if !left_out.is_empty() {
        crate::errln!(
            "warning: {}: {} left out, not {} ({})",
            path.display(),
            n_files(left_out.len()),
            or_list(exts),
            first_names(path, &left_out)
        );
    }
    Ok(files)
}

/// `1 file`, `2 files`.
fn n_files(n: usize) -> String {
    match n {
        1 => "1 file".into(),
        n => format!("{n} files"),
    }
}

/// `.a, .b or .c`.
fn or_list(exts: &[&str]) -> String {
    match exts.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// Of a directory whose files name their splits, the files of `part`; the others are said to
/// be left out (the README dataset card among them). A directory that names no split, or only
/// one that is no train, validation or test split by name (`chapter-00001-of-00009.txt`), is
/// read whole.
fn split_files(root: &Path, files: Vec<PathBuf>, part: Part) -> Result<Vec<PathBuf>> {
    let asked = part.name.map(str::to_lowercase);
    let placed: Vec<Option<(String, PathBuf)>> = files
        .iter()
        .map(|f| split_at(f.strip_prefix(root).unwrap_or(f), asked.as_deref()))
        .collect();
    let splits: BTreeSet<&str> = placed.iter().flatten().map(|(s, _)| s.as_str()).collect();
    let listed = || {
        let v: Vec<&str> = splits.iter().copied().collect();
        v.join(", ")
    };
    let has = |k: Kind| splits.iter().any(|s| kind(s) == Some(k));
    let whole = splits.len() <= 1 && !splits.iter().any(|s| kind(s).is_some());
    let want: Box<dyn Fn(&str) -> bool> = match (&asked, part.held_out) {
        (Some(n), _) if splits.contains(n.as_str()) => Box::new(move |s| s == n),
        (Some(n), _) if splits.is_empty() => bail!(
            "{}: {} {n}: its files name no splits (as `{n}-00000-of-00001.parquet` or a `{n}/` \
             directory would)",
            root.display(),
            part.flag
        ),
        (Some(n), _) => bail!(
            "{}: {} {n}: no split of that name; its files name {}",
            root.display(),
            part.flag,
            listed()
        ),
        (None, _) if whole => return Ok(files),
        (None, false) if has(Kind::Train) => Box::new(|s| kind(s) == Some(Kind::Train)),
        (None, true) if has(Kind::Validation) => Box::new(|s| kind(s) == Some(Kind::Validation)),
        (None, true) if has(Kind::Test) => Box::new(|s| kind(s) == Some(Kind::Test)),
        (None, true) if has(Kind::Train) => bail!(
            "{}: names a train split and no validation or test split to hold out (its files \
             name {}; {} names one)",
            root.display(),
            listed(),
            part.flag
        ),
        (None, held_out) => bail!(
            "{}: its files name the splits {} and none is a {} split by name: name the one to \
             read with {} NAME",
            root.display(),
            listed(),
            if held_out {
                "validation or test"
            } else {
                "train"
            },
            part.flag
        ),
    };
    let (mut kept, mut other) = (Vec::new(), Vec::new());
    let (mut read, mut homes) = (BTreeSet::new(), BTreeSet::new());
    for (f, at) in files.into_iter().zip(&placed) {
        match at.as_ref().filter(|(s, _)| want(s)) {
            Some((s, home)) => {
                read.insert(s.as_str());
                homes.insert(home.as_path());
                kept.push(f);
            }
            None => other.push(f),
        }
    }
    // `openai/gsm8k` holds `main/train-*` and `socratic/train-*`: one split of two configs,
    // which `datasets` loads one at a time, never mixed.
    if homes.len() > 1 {
        let homes: Vec<PathBuf> = homes.iter().map(|h| root.join(h)).collect();
        bail!(
            "{}: its {} split lies in {} directories ({}), as the configs of a Hugging Face \
             dataset do: name one of them",
            root.display(),
            read.into_iter().collect::<Vec<_>>().join(" and "),
            homes.len(),
            first_names(root, &homes)
        );
    }
    if !other.is_empty() {
        let read: Vec<&str> = read.into_iter().collect();
        crate::errln!(
            "warning: {}: its {} split is read ({} named so, as a Hugging Face dataset names \
             its splits); {} left out ({})",
            root.display(),
            read.join(" and "),
            n_files(kept.len()),
            n_files(other.len()).replacen(' ', " other ", 1),
            first_names(root, &other)
        );
    }
    Ok(kept)
}

/// The first three of `files` by their paths under `root`, "..." after them where there are
/// more: what a warning about left-out files names.
fn first_names(root: &Path, files: &[PathBuf]) -> String {
    let mut names: Vec<String> = files
        .iter()
        .take(3)
        .map(|p| p.strip_prefix(root).unwrap_or(p).display().to_string())
        .collect();
    if files.len() > 3 {
        names.push("...".into());
    }
    names.join(", ")
}

/// The split a file belongs to by its path (in lower case): under a directory named for a
/// train, validation or test split (`train/`, `validation/`) or for `asked`, a file named so
/// (`test.jsonl`), or a shard of any split (`train_prefs-00000-of-00002.parquet`). Other names
/// that merely start with a split's word (`training_day.txt`) belong to none.
#[cfg(test)]
fn split_of(rel: &Path, asked: Option<&str>) -> Option<String> {
    split_at(rel, asked).map(|(name, _)| name)
}

/// [`split_of`], and where the split lies: the directory named for it, else the file's own
/// directory (relative, as `rel` is).
fn split_at(rel: &Path, asked: Option<&str>) -> Option<(String, PathBuf)> {
    let named = |name: &str| kind(name).is_some() || asked == Some(name);
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().to_lowercase())
        .collect();
    let (file, dirs) = parts.split_last()?;
    if let Some(i) = dirs.iter().position(|d| named(d)) {
        return Some((dirs[i].clone(), rel.iter().take(i + 1).collect()));
    }
    let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
    let stem = file.split('.').next().unwrap_or(file);
    if named(stem) {
        return Some((stem.to_string(), parent));
    }
    // `train-00000-of-00002`: a shard of its split.
    let (word, shard) = stem.split_once('-')?;
    let (i, n) = shard.split_once("-of-")?;
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    (!word.is_empty() && digits(i) && digits(n)).then(|| (word.to_string(), parent))
}

fn collect_files(
    dir: &Path,
    exts: &[&str],
    out: &mut Vec<PathBuf>,
    left_out: &mut Vec<PathBuf>,
    seen: &mut HashSet<PathBuf>,
) -> Result<()> {
    // Symlinked directories are followed, so a link back up the tree must not loop forever.
    let canonical = dir
        .canonicalize()
        .with_context(|| format!("{}: cannot read directory", dir.display()))?;
    if !seen.insert(canonical) {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read directory", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("{}: cannot read directory", dir.display()))?;
        let p = entry.path();
        let meta =
            std::fs::metadata(&p).with_context(|| format!("{}: cannot read", p.display()))?;
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        // Hidden files and directories are nobody's data, as `datasets` passes them over:
        // `hf download --local-dir` keeps its `.cache/huggingface/` beside the files, a
        // .DS_Store or a .gitattributes lies about, all left out unsaid.
        if name.starts_with('.') {
            continue;
        }
        if meta.is_dir() {
            collect_files(&p, exts, out, left_out, seen)?;
        } else if exts.iter().any(|e| name.ends_with(e)) {
            out.push(p);
        } else {
            left_out.push(p);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXTS: [&str; 2] = [".jsonl", ".parquet"];

    fn err<T>(r: Result<T>) -> String {
        let e = format!("{:#}", r.err().expect("expected an error"));
        assert!(!e.contains('\n'), "multi-line error: {e}");
        e
    }

    /// A directory holding empty files at `names`.
    fn tree(names: &[&str]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for n in names {
            let p = d.path().join(n);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "").unwrap();
        }
        d
    }

    /// The files `part` reads of `d`, by their paths under it.
    fn read(d: &tempfile::TempDir, part: Part) -> Result<Vec<String>> {
        Ok(data_files(d.path(), part, &EXTS)?
            .iter()
            .map(|p| p.strip_prefix(d.path()).unwrap().display().to_string())
            .collect())
    }

    #[test]
    fn split_names_of_paths() {
        let split = |p: &str| split_of(Path::new(p), None);
        assert_eq!(split("train/part.txt").as_deref(), Some("train"));
        assert_eq!(split("data/valid.jsonl").as_deref(), Some("valid"));
        assert_eq!(split("eval.jsonl").as_deref(), Some("eval"));
        assert_eq!(
            split("data/Test-00003-of-00010.parquet").as_deref(),
            Some("test")
        );
        assert_eq!(
            split("data/train_prefs-00000-of-00001.parquet").as_deref(),
            Some("train_prefs")
        );
        // Names that only start with a split's word name none, so an ordinary corpus with a
        // `training_day.txt` is read whole.
        for name in [
            "training_day.txt",
            "Train_station.txt",
            "train-robbery.txt",
            "devices.txt",
            "-00000-of-00001.jsonl",
            "train-x-of-2.jsonl",
        ] {
            assert_eq!(split(name), None, "{name}");
        }
        // A split asked for by name is known by its directory and its file name too.
        assert_eq!(
            split_of(Path::new("sft/part-0.jsonl"), Some("sft")).as_deref(),
            Some("sft")
        );
        assert_eq!(
            split_of(Path::new("sft.jsonl"), Some("sft")).as_deref(),
            Some("sft")
        );
    }

    #[test]
    fn standard_splits_are_found_by_kind() {
        let d = tree(&[
            "README.md",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "data/test-00000-of-00001.parquet",
            "data/validation.jsonl",
        ]);
        assert_eq!(
            read(&d, Part::train()).unwrap(),
            [
                "data/train-00000-of-00002.parquet",
                "data/train-00001-of-00002.parquet"
            ]
        );
        assert_eq!(
            read(&d, Part::held_out()).unwrap(),
            ["data/validation.jsonl"]
        );
        // A split named outright is read whatever the part.
        assert_eq!(
            read(&d, Part::held_out().named(Some("TEST"))).unwrap(),
            ["data/test-00000-of-00001.parquet"]
        );
        let e = err(read(&d, Part::train().named(Some("train_sft"))));
        assert!(
            e.contains("--train-split train_sft: no split of that name; its files name test, train, validation"),
            "{e}"
        );
        std::fs::remove_file(d.path().join("data/validation.jsonl")).unwrap();
        assert_eq!(
            read(&d, Part::held_out()).unwrap(),
            ["data/test-00000-of-00001.parquet"]
        );
        std::fs::remove_file(d.path().join("data/test-00000-of-00001.parquet")).unwrap();
        let e = err(read(&d, Part::held_out()));
        assert!(
            e.contains("names a train split and no validation or test split to hold out"),
            "{e}"
        );
    }

    #[test]
    fn splits_of_their_own_names_must_be_chosen() {
        // ultrafeedback_binarized's layout: six splits, none named plain train or test.
        let d = tree(&[
            "data/train_prefs-00000-of-00001.parquet",
            "data/test_prefs-00000-of-00001.parquet",
            "data/train_sft-00000-of-00002.parquet",
            "data/train_sft-00001-of-00002.parquet",
            "data/test_sft-00000-of-00001.parquet",
        ]);
        let e = err(read(&d, Part::train()));
        assert!(
            e.contains(
                "its files name the splits test_prefs, test_sft, train_prefs, train_sft and none \
                 is a train split by name: name the one to read with --train-split NAME"
            ),
            "{e}"
        );
        let e = err(read(&d, Part::held_out().asked_by("--split")));
        assert!(e.contains("none is a validation or test split by name: name the one to read with --split NAME"), "{e}");
        assert_eq!(
            read(&d, Part::train().named(Some("train_sft"))).unwrap(),
            [
                "data/train_sft-00000-of-00002.parquet",
                "data/train_sft-00001-of-00002.parquet"
            ]
        );
        assert_eq!(
            read(&d, Part::held_out().named(Some("test_prefs"))).unwrap(),
            ["data/test_prefs-00000-of-00001.parquet"]
        );
    }

    #[test]
    fn one_split_in_two_configs_is_refused() {
        let d = tree(&[
            "main/train-00000-of-00001.parquet",
            "main/test-00000-of-00001.parquet",
            "socratic/train-00000-of-00001.parquet",
            "socratic/test-00000-of-00001.parquet",
        ]);
        let e = err(read(&d, Part::train()));
        assert!(
            e.contains("its train split lies in 2 directories (main, socratic), as the configs"),
            "{e}"
        );
        assert_eq!(
            data_files(&d.path().join("main"), Part::held_out(), &EXTS).unwrap(),
            [d.path().join("main/test-00000-of-00001.parquet")]
        );
        // Files under one split's directory are one split, however deep.
        let deep = tree(&["train/a/x.jsonl", "train/b/y.jsonl", "test/z.jsonl"]);
        assert_eq!(
            read(&deep, Part::train()).unwrap(),
            ["train/a/x.jsonl", "train/b/y.jsonl"]
        );
    }

    #[test]
    fn one_split_of_its_own_or_none_is_read_whole() {
        let d = tree(&[
            "chapter-00000-of-00002.jsonl",
            "chapter-00001-of-00002.jsonl",
            "notes.jsonl",
            "picture.png",
        ]);
        let all = [
            "chapter-00000-of-00002.jsonl",
            "chapter-00001-of-00002.jsonl",
            "notes.jsonl",
        ];
        assert_eq!(read(&d, Part::train()).unwrap(), all);
        assert_eq!(read(&d, Part::held_out()).unwrap(), all);
        let plain = tree(&["a.jsonl", "b/c.parquet"]);
        assert_eq!(
            read(&plain, Part::train()).unwrap(),
            ["a.jsonl", "b/c.parquet"]
        );
        let e = err(read(&plain, Part::train().named(Some("train_sft"))));
        assert!(
            e.contains("--train-split train_sft: its files name no splits"),
            "{e}"
        );
        // A file is read as it is, whatever its name; a split asked of it is an error rather
        // than the whole file read as that split.
        let one = plain.path().join("train-00000-of-00001.jsonl");
        std::fs::write(&one, "").unwrap();
        assert_eq!(
            data_files(&one, Part::held_out(), &EXTS).unwrap(),
            std::slice::from_ref(&one)
        );
        let e = err(data_files(
            &one,
            Part::held_out().named(Some("train")),
            &EXTS,
        ));
        assert!(
            e.contains("--eval-split train names a split of a directory"),
            "{e}"
        );
    }

    #[test]
    fn left_out_files_are_listed() {
        let d = tree(&[
            "b/deep/z.parquet",
            "a.jsonl",
            "c.json",
            "img.PNG",
            ".DS_Store",
            ".cache/huggingface/download/a.jsonl",
            ".cache/huggingface/download/a.jsonl.metadata",
        ]);
        let (mut files, mut left_out) = (Vec::new(), Vec::new());
        collect_files(
            d.path(),
            &EXTS,
            &mut files,
            &mut left_out,
            &mut HashSet::new(),
        )
        .unwrap();
        files.sort();
        left_out.sort();
        let names = |v: &[PathBuf]| -> Vec<String> {
            v.iter()
                .map(|p| p.strip_prefix(d.path()).unwrap().display().to_string())
                .collect()
        };
        assert_eq!(names(&files), ["a.jsonl", "b/deep/z.parquet"]);
        assert_eq!(names(&left_out), ["c.json", "img.PNG"]);
        assert_eq!(or_list(&EXTS), ".jsonl or .parquet");
        assert_eq!(or_list(&[".txt", ".md", ".jsonl"]), ".txt, .md or .jsonl");
    }
}
