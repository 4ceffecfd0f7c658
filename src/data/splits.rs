//! Data directories: the files of a corpus or record directory (recursively, in sorted path
//! order), and of one that names its splits as a Hugging Face dataset does
//! (`data/train-00000-of-00002.parquet` beside `data/test-00000-of-00001.parquet`), the split
//! asked for.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::console::warn_once;

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
    /// The config setting that names it too, where one does.
    key: Option<&'static str>,
}

impl<'a> Part<'a> {
    /// The train split, as `datasets` loads `split="train"`: `--data`.
    pub fn train() -> Self {
        Part {
            held_out: false,
            name: None,
            flag: "--train-split",
            key: Some("[data] train_split"),
        }
    }

    /// The validation split, else the test split: `--eval-data`.
    pub fn held_out() -> Self {
        Part {
            held_out: true,
            name: None,
            flag: "--eval-split",
            key: Some("[data] eval_split"),
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
        Part {
            flag,
            key: None,
            ..self
        }
    }

    /// How errors name the setting: the flag, or the config key where there is one.
    fn setting(&self) -> String {
        match self.key {
            Some(key) => format!("{} or {key}", self.flag),
            None => self.flag.to_string(),
        }
    }
}

/// The kinds of split `datasets` knows by name; any other name is a split of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Train,
    Validation,
    Test,
}

fn keyword(word: &str) -> Option<Kind> {
    match word {
        "train" | "training" => Some(Kind::Train),
        "validation" | "valid" | "dev" | "val" => Some(Kind::Validation),
        "test" | "testing" | "eval" | "evaluation" => Some(Kind::Test),
        _ => None,
    }
}

/// The kind of split a name (a file's stem, a directory) is, as `datasets` reads a split's
/// word between separators: the word alone, or with numbers (`train_00000`), or last after
/// others (`sft_train.jsonl`, the Hub converter's `partial-train/`). A word followed by
/// others names none (`training_day.txt`, `train-robbery.txt`, `train_prefs`: a split of its
/// own name).
fn kind(name: &str) -> Option<Kind> {
    let words: Vec<&str> = name
        .split(|c: char| "-_. ".contains(c))
        .filter(|w| !w.is_empty() && !w.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    keyword(words.last()?)
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
                "{}: split \"{name}\" ({}) names a split of a directory whose files name \
                 their splits, and this is one file",
                path.display(),
                part.setting()
            );
        }
        return Ok(vec![path.to_path_buf()]);
    }
    let (mut files, mut left_out) = (Vec::new(), Vec::new());
    collect_files(path, exts, &mut files, &mut left_out, &mut HashSet::new())?;
    files.sort();
    left_out.sort();
    // The card is said to be left out as what it is, whichever list it fell in.
    let cards: Vec<PathBuf> = (files.iter().chain(&left_out))
        .filter(|f| is_dataset_card(path, f))
        .cloned()
        .collect();
    files.retain(|f| !cards.contains(f));
    left_out.retain(|f| !cards.contains(f));
    // Many Hub datasets ship JSON Lines named `train.json`, which `datasets` reads as JSON.
    // Taken only where nothing else is data, so that a dataset's own metadata beside its
    // shards (`dataset_infos.json`, `save_to_disk`'s `state.json`) is never read as records,
    // and not from a model or a checkpoint (weights beside their JSON files), whose
    // `config.json` named as data would say less than that it is none.
    let weights = left_out
        .iter()
        .any(|f| f.to_string_lossy().ends_with(".safetensors"));
    if files.is_empty() && exts.contains(&".jsonl") && !weights {
        let (json, rest): (Vec<PathBuf>, Vec<PathBuf>) =
            left_out.into_iter().partition(|f| is_json_records(f));
        (files, left_out) = (json, rest);
    }
    if !cards.is_empty() {
        warn_once(format!(
            "warning: {}: {} left out: a dataset card, not data",
            path.display(),
            first_names(path, &cards)
        ));
    }
    if !left_out.is_empty() {
        warn_once(format!(
            "warning: {}: {} left out, not {} ({})",
            path.display(),
            n_files(left_out.len()),
            or_list(exts),
            first_names(path, &left_out)
        ));
    }
    refuse_compressed_twins(&files)?;
    split_files(path, files, part)
}

/// Refuses a file beside its own gzip (`train.jsonl` and `train.jsonl.gz`, as `gzip -k` leaves
/// them): both would be read, and every record trained twice.
fn refuse_compressed_twins(files: &[PathBuf]) -> Result<()> {
    let names: HashSet<&PathBuf> = files.iter().collect();
    for f in files {
        let name = f.to_string_lossy();
        let Some(cut) = name.len().checked_sub(3) else {
            continue;
        };
        if !name.is_char_boundary(cut) || !name[cut..].eq_ignore_ascii_case(".gz") {
            continue;
        }
        let plain = PathBuf::from(&name[..cut]);
        if names.contains(&plain) {
            bail!(
                "{} and {} are both read: the one is likely the other compressed (gzip -k \
                 leaves both), and every record would be read twice; remove one",
                plain.display(),
                f.display()
            );
        }
    }
    Ok(())
}

/// A Hugging Face dataset card: the README.md at a dataset's top, which opens with its YAML
/// metadata (`---`).
fn is_dataset_card(root: &Path, file: &Path) -> bool {
    let top = file.parent() == Some(root);
    let named = file
        .file_name()
        .is_some_and(|n| n.eq_ignore_ascii_case("readme.md"));
    top && named
        && std::fs::read(file).is_ok_and(|b| b.starts_with(b"---\n") || b.starts_with(b"---\r\n"))
}

/// Warns where held-out files are among the training files: the held-out loss would be
/// measured on what the run trains on. `by` names what chose them (`--eval-data`).
pub fn warn_shared(train: &[PathBuf], held: &[PathBuf], by: &str) {
    let canon = |p: &PathBuf| p.canonicalize().unwrap_or_else(|_| p.clone());
    let trained: HashSet<PathBuf> = train.iter().map(canon).collect();
    let shared: Vec<PathBuf> = held
        .iter()
        .filter(|p| trained.contains(&canon(p)))
        .cloned()
        .collect();
    if !shared.is_empty() {
        crate::warnln!(
            "warning: {by} reads {} of {} that --data trains on ({}): its held-out loss is \
             measured on training data",
            shared.len(),
            n_files(held.len()),
            first_names(Path::new(""), &shared)
        );
    }
}

/// A `.json` file that may hold JSON Lines: not one of the metadata files `datasets` writes.
fn is_json_records(f: &Path) -> bool {
    let name = f.file_name().map(|n| n.to_string_lossy().to_lowercase());
    let name = name.unwrap_or_default();
    let metadata = [
        "dataset_info.json",
        "dataset_infos.json",
        "dataset_dict.json",
        "state.json",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "adapter_config.json",
        "meta.json",
    ];
    name.ends_with(".json") && !metadata.contains(&name.as_str())
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
/// be left out. A directory that names no split is read whole.
fn split_files(root: &Path, files: Vec<PathBuf>, part: Part) -> Result<Vec<PathBuf>> {
    let asked = part.name.map(str::to_lowercase);
    let rel = |f: &PathBuf| f.strip_prefix(root).unwrap_or(f).to_path_buf();
    let mut placed: Vec<Option<Placed>> = files
        .iter()
        .map(|f| split_at(&rel(f), asked.as_deref()))
        .collect();
    // `train_prefs.jsonl` beside `test_prefs.jsonl` names no split by the rule above, which
    // keeps a corpus's `training_day.txt` read with the rest; but names that lead with words
    // of different kinds are a dataset's splits (`datasets` reads a leading word too), and
    // read whole they would train on the test split. They are splits of their own names, as
    // their shards would be.
    let leading: Vec<Option<Kind>> = files
        .iter()
        .zip(&placed)
        .map(|(f, at)| at.is_none().then(|| leading_kind(&rel(f))).flatten())
        .collect();
    let kinds: BTreeSet<Kind> = leading.iter().flatten().copied().collect();
    if kinds.len() > 1 {
        for ((f, at), lead) in files.iter().zip(&mut placed).zip(&leading) {
            if lead.is_some() {
                let r = rel(f);
                *at = Some(Placed {
                    name: stem_of(&r),
                    home: r.parent().unwrap_or(Path::new("")).to_path_buf(),
                    inner: None,
                });
            }
        }
    }
    let splits: BTreeSet<&str> = placed.iter().flatten().map(|p| p.name.as_str()).collect();
    let listed = || {
        let v: Vec<&str> = splits.iter().copied().collect();
        match v.len() {
            1 => format!("the split {}", v[0]),
            _ => format!("the splits {}", v.join(", ")),
        }
    };
    let has = |k: Kind| splits.iter().any(|s| kind(s) == Some(k));
    let own = splits.len() == 1 && !splits.iter().any(|s| kind(s).is_some());
    let want: Box<dyn Fn(&str) -> bool> = match (&asked, part.held_out) {
        (Some(n), _) if splits.contains(n.as_str()) => Box::new(move |s| s == n),
        (Some(n), _) if splits.is_empty() => bail!(
            "{}: split \"{n}\" ({}): its files name no splits (as \
             `{n}-00000-of-00001.parquet` or a `{n}/` directory would)",
            root.display(),
            part.setting()
        ),
        (Some(n), _) => bail!(
            "{}: no split \"{n}\" ({}); its files name {}",
            root.display(),
            part.setting(),
            listed()
        ),
        (None, _) if splits.is_empty() => return Ok(files),
        // One split of its own name, as a dataset of one split names it: read, its card and
        // other files left out as `datasets` leaves them.
        (None, _) if own => Box::new(|_| true),
        (None, false) if has(Kind::Train) => Box::new(|s| kind(s) == Some(Kind::Train)),
        (None, true) if has(Kind::Validation) => Box::new(|s| kind(s) == Some(Kind::Validation)),
        (None, true) if has(Kind::Test) => Box::new(|s| kind(s) == Some(Kind::Test)),
        (None, held_out) => bail!(
            "{}: its files name {} and none is a {} split by name: name the one to read with \
             {} NAME{}",
            root.display(),
            listed(),
            if held_out {
                "validation or test"
            } else {
                "train"
            },
            part.flag,
            part.key.map_or(String::new(), |k| format!(" ({k})"))
        ),
    };
    let (mut kept, mut other) = (Vec::new(), Vec::new());
    let (mut read, mut homes, mut inner) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for (f, at) in files.into_iter().zip(&placed) {
        match at.as_ref().filter(|p| want(&p.name)) {
            Some(p) => {
                read.insert(p.name.as_str());
                homes.insert(p.home.as_path());
                inner.extend(p.inner.as_deref());
                kept.push(f);
            }
            None => other.push(f),
        }
    }
    let read: Vec<&str> = read.into_iter().collect();
    // `--train-split data` of `data/train_prefs-*` and `data/test_prefs-*`: a directory of
    // several splits, which read as one would train on the held-out records.
    if inner.len() > 1 {
        let inner: Vec<&str> = inner.into_iter().collect();
        let chosen = match &asked {
            Some(_) => format!("split \"{}\" ({})", read.join(", "), part.setting()),
            None => format!("its {} split", read.join(" and ")),
        };
        bail!(
            "{}: {chosen} is a directory whose files name splits of their own ({}): name one \
             of those with {} NAME",
            root.display(),
            inner.join(", "),
            part.flag
        );
    }
    // `openai/gsm8k` holds `main/train-*` and `socratic/train-*`: one split of two configs,
    // which `datasets` loads one at a time, never mixed.
    if homes.len() > 1 {
        let homes: Vec<PathBuf> = homes.iter().map(|h| root.join(h)).collect();
        bail!(
            "{}: its {} split lies in {} directories ({}), as the configs of a Hugging Face \
             dataset do: give the directory of one ({}) instead",
            root.display(),
            read.join(" and "),
            homes.len(),
            first_names(root, &homes),
            homes[0].display()
        );
    }
    if !other.is_empty() {
        crate::warnln!(
            "warning: {}: its {} {} read ({} named so, as a Hugging Face dataset names its \
             splits); {} left out ({})",
            root.display(),
            read.join(" and "),
            if read.len() == 1 {
                "split is"
            } else {
                "splits are"
            },
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

/// The split a file belongs to by its path (in lower case), named at the innermost level
/// that names one: the file, named for a train, validation or test split (`test.jsonl`,
/// `sft_train.jsonl`) or for `asked`, or a shard of one (`train-00000-of-00002.parquet`); else
/// a directory named so (`train/`, the Hub converter's `default/partial-train/`); else a shard
/// of a split of its own name (`train_prefs-00000-of-00002.parquet`). Names that merely start
/// with a split's word (`training_day.txt`) name none.
#[cfg(test)]
fn split_of(rel: &Path, asked: Option<&str>) -> Option<String> {
    split_at(rel, asked).map(|p| p.name)
}

/// Where a file lies among a directory's splits.
struct Placed {
    /// Its split.
    name: String,
    /// Where the split lies: the directory named for it, else the file's own directory
    /// (relative to the root).
    home: PathBuf,
    /// Of a file under a directory named for its split, the split of its own name the file
    /// names besides (a directory of several splits' shards, asked for by its name).
    inner: Option<String>,
}

/// [`split_of`], and where the split lies.
fn split_at(rel: &Path, asked: Option<&str>) -> Option<Placed> {
    let named = |name: &str| kind(name).is_some() || asked == Some(name);
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().to_lowercase())
        .collect();
    let (_, dirs) = parts.split_last()?;
    let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
    let at = |name: &str, home: PathBuf, inner: Option<&str>| Placed {
        name: name.to_string(),
        home,
        inner: inner.map(str::to_string),
    };
    let stem = stem_of(rel);
    let shard = shard_of(&stem);
    if named(&stem) {
        return Some(at(&stem, parent, None));
    }
    if let Some(word) = shard.filter(|w| named(w)) {
        return Some(at(word, parent, None));
    }
    if let Some(i) = dirs.iter().rposition(|d| named(d)) {
        return Some(at(&dirs[i], rel.iter().take(i + 1).collect(), shard));
    }
    shard.map(|word| at(word, parent, None))
}

/// A file's name in lower case, without its extension.
fn stem_of(rel: &Path) -> String {
    let file = rel
        .file_name()
        .map(|f| f.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    // `train.jsonl.gz` is named as `train.jsonl` is.
    let file = match file.strip_suffix(".gz") {
        Some(inner) => inner.to_string(),
        None => file,
    };
    match file.rsplit_once('.') {
        Some((stem, _)) => stem.to_string(),
        None => file,
    }
}

/// The kind of split the first word of a file's name is (`train` of `train_prefs.jsonl`).
fn leading_kind(rel: &Path) -> Option<Kind> {
    let stem = stem_of(rel);
    let first = stem
        .split(|c: char| "-_. ".contains(c) || c.is_ascii_digit())
        .find(|w| !w.is_empty())?;
    keyword(first)
}

/// The split a shard's stem names: `train_prefs` of `train_prefs-00000-of-00002`, dots and
/// dashes in the name kept (`train.clean.100-00000-of-00001`).
fn shard_of(stem: &str) -> Option<&str> {
    let (head, n) = stem.rsplit_once("-of-")?;
    let (word, i) = head.rsplit_once('-')?;
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    (!word.is_empty() && digits(i) && digits(n)).then_some(word)
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

    /// A directory of `.json` files with no JSONL or Parquet reads them (as JSON Lines), its
    /// splits named as any; beside JSONL or Parquet shards, and `datasets`' metadata files
    /// always, they are left out.
    #[test]
    fn json_files_are_read_where_nothing_else_is_data() {
        let d = tree(&["train.json", "test.json", "dataset_infos.json"]);
        assert_eq!(read(&d, Part::train()).unwrap(), ["train.json"]);
        assert_eq!(read(&d, Part::held_out()).unwrap(), ["test.json"]);
        let d = tree(&["data/a.parquet", "extra.json"]);
        assert_eq!(read(&d, Part::train()).unwrap(), ["data/a.parquet"]);
        let d = tree(&["state.json", "notes.txt"]);
        assert!(read(&d, Part::train()).unwrap().is_empty());
        // A card beside them is no data, also where Markdown is (a corpus's); a model's
        // files are no records.
        let d = tree(&["README.md", "train.json"]);
        std::fs::write(d.path().join("README.md"), "---\nlicense: mit\n---\n").unwrap();
        let corpus = data_files(d.path(), Part::train(), &[".txt", ".md", ".jsonl"]).unwrap();
        assert_eq!(corpus, [d.path().join("train.json")]);
        let d = tree(&["config.json", "model.safetensors", "extra.json"]);
        assert!(read(&d, Part::train()).unwrap().is_empty());
    }

    /// A gzip-compressed file names its split as the file it compresses.
    #[test]
    fn compressed_files_name_their_splits() {
        let names = |d: &tempfile::TempDir, part: Part| -> Vec<String> {
            let exts = [".jsonl", ".jsonl.gz", ".parquet"];
            (data_files(d.path(), part, &exts).unwrap().iter())
                .map(|p| p.strip_prefix(d.path()).unwrap().display().to_string())
                .collect()
        };
        let d = tree(&["sft_train.jsonl.gz", "sft_test.jsonl.gz"]);
        assert_eq!(names(&d, Part::train()), ["sft_train.jsonl.gz"]);
        assert_eq!(names(&d, Part::held_out()), ["sft_test.jsonl.gz"]);
        let d = tree(&[
            "train-00000-of-00001.jsonl.gz",
            "test-00000-of-00001.jsonl.gz",
        ]);
        assert_eq!(names(&d, Part::train()), ["train-00000-of-00001.jsonl.gz"]);
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
            e.contains("no split \"train_sft\" (--train-split or [data] train_split); its files name the splits test, train, validation"),
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
            e.contains("its files name the split train and none is a validation or test split by name: name the one to read with --eval-split NAME ([data] eval_split)"),
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
                 is a train split by name: name the one to read with --train-split NAME \
                 ([data] train_split)"
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
    fn split_words_between_separators_and_inner_splits() {
        let split = |p: &str| split_of(Path::new(p), None);
        for (path, want) in [
            ("sft_train.jsonl", Some("sft_train")),
            ("train_00000.jsonl", Some("train_00000")),
            ("default/partial-train/0000.parquet", Some("partial-train")),
            (
                "train.clean.100-00000-of-00001.jsonl",
                Some("train.clean.100"),
            ),
            ("dev-notes.txt", None),
        ] {
            assert_eq!(split(path).as_deref(), want, "{path}");
        }
        assert_eq!(kind("sft_train"), Some(Kind::Train));
        assert_eq!(kind("partial-test"), Some(Kind::Test));
        assert_eq!(kind("train.clean.100"), None);
        assert_eq!(kind("train_prefs"), None);
        // The innermost name wins: a shard under a split's directory is of that split.
        assert_eq!(
            split("data/train/shard-00000-of-00004.jsonl").as_deref(),
            Some("train")
        );
        let d = tree(&[
            "sft_train.jsonl",
            "sft_test.jsonl",
            "data/train_prefs-00000-of-00001.parquet",
            "data/test_prefs-00000-of-00001.parquet",
        ]);
        assert_eq!(read(&d, Part::train()).unwrap(), ["sft_train.jsonl"]);
        assert_eq!(read(&d, Part::held_out()).unwrap(), ["sft_test.jsonl"]);
        // A directory asked for by name whose files name several splits of their own would
        // train on the held-out ones: refused.
        let e = err(read(&d, Part::train().named(Some("data"))));
        assert!(
            e.contains("split \"data\" (--train-split or [data] train_split) is a directory whose files name splits of their own (test_prefs, train_prefs)"),
            "{e}"
        );
        let nested = tree(&[
            "train/data/train_prefs-00000-of-00001.jsonl",
            "train/data/test_prefs-00000-of-00001.jsonl",
        ]);
        let e = err(read(&nested, Part::train()));
        assert!(
            e.contains("its train split is a directory whose files name splits of their own (test_prefs, train_prefs): name one of those with --train-split NAME"),
            "{e}"
        );
    }

    /// Files whose names lead with words of different kinds (`train_prefs.jsonl`,
    /// `test_prefs.jsonl`) are splits of their own names, one of which must be chosen, where
    /// read whole they trained on the test split; names leading with one kind alone (a
    /// corpus's `training_day.txt`) name no split, and are read with the rest.
    #[test]
    fn names_leading_with_different_kinds_are_splits_of_their_own() {
        let d = tree(&["train_prefs.jsonl", "test_prefs.jsonl", "train_gen.jsonl"]);
        let e = err(read(&d, Part::train()));
        assert!(
            e.contains(
                "its files name the splits test_prefs, train_gen, train_prefs and none is a \
                 train split by name: name the one to read with --train-split NAME"
            ),
            "{e}"
        );
        assert_eq!(
            read(&d, Part::train().named(Some("train_prefs"))).unwrap(),
            ["train_prefs.jsonl"]
        );
        assert_eq!(
            read(&d, Part::held_out().named(Some("test_prefs"))).unwrap(),
            ["test_prefs.jsonl"]
        );
        let corpus = tree(&["training_day.txt", "train-robbery.txt", "other.txt"]);
        assert_eq!(
            data_files(corpus.path(), Part::train(), &["txt"])
                .unwrap()
                .len(),
            3
        );
        // Beside splits named by kind, they are left out as any file naming none.
        let mixed = tree(&[
            "sft_train.jsonl",
            "sft_test.jsonl",
            "train_notes.jsonl",
            "test_notes.jsonl",
        ]);
        assert_eq!(read(&mixed, Part::train()).unwrap(), ["sft_train.jsonl"]);
        assert_eq!(read(&mixed, Part::held_out()).unwrap(), ["sft_test.jsonl"]);
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
            e.contains("its train split lies in 2 directories (main, socratic), as the configs of a Hugging Face dataset do: give the directory of one ("),
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
        // One split of its own name is read, as `datasets` reads a dataset of one split; its
        // dataset card and the files that name no split are left out.
        let d = tree(&[
            "chapter-00000-of-00002.jsonl",
            "chapter-00001-of-00002.jsonl",
            "notes.jsonl",
            "picture.png",
        ]);
        let chapters = [
            "chapter-00000-of-00002.jsonl",
            "chapter-00001-of-00002.jsonl",
        ];
        assert_eq!(read(&d, Part::train()).unwrap(), chapters);
        assert_eq!(read(&d, Part::held_out()).unwrap(), chapters);
        let plain = tree(&["a.jsonl", "b/c.parquet"]);
        assert_eq!(
            read(&plain, Part::train()).unwrap(),
            ["a.jsonl", "b/c.parquet"]
        );
        let e = err(read(&plain, Part::train().named(Some("train_sft"))));
        assert!(
            e.contains("split \"train_sft\" (--train-split or [data] train_split): its files name no splits"),
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
            e.contains(
                "split \"train\" (--eval-split or [data] eval_split) names a split of a directory"
            ),
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
