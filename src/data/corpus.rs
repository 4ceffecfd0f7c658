//! Pretraining corpora: reading documents from files or directory trees, and packing them
//! into train / validation token streams.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub use super::document_ids::document_ids;
use super::parquet_rows::{is_parquet, read_rows};
use super::records::{kind, parse_jsonl, read_text, Loc, Place};
use super::splits::data_files;
pub use super::splits::Part;
use super::tokenizer::Tokenizer;

/// File endings read from a corpus directory; anything else there (images, configs, ...) is
/// skipped so that a dataset folder can be pointed at as it is.
const CORPUS_EXTS: [&str; 7] = [
    ".txt",
    ".md",
    ".text",
    ".jsonl",
    ".parquet",
    ".txt.gz",
    ".jsonl.gz",
];

/// Reads a corpus: a text file (one document; a file whose name ends .jsonl or .json is JSONL
/// with a string field "text", one document per line, blank lines skipped; one ending .parquet
/// a Parquet file with a string column "text", one document per row), or a directory
/// (recursively; files ending .txt, .md, .text, .jsonl, .parquet, or .txt.gz and .jsonl.gz
/// (read through gzip, as any file starting with its magic bytes is), in any case, in sorted path
/// order; others left out, and said to be; of one whose files name their splits, the train
/// split's: [`Part`]). Empty documents are dropped; a corpus left with none is an error.
pub fn load_documents(path: &Path) -> Result<Vec<String>> {
    load_documents_from(path, "text", Part::train())
}

/// [`load_documents`], JSONL and Parquet documents read from the field `column` (TRL's
/// `dataset_text_field`), of a directory that names its splits the `part`.
pub fn load_documents_from(path: &Path, column: &str, part: Part) -> Result<Vec<String>> {
    documents_of(path, &corpus_files(path, part)?, column)
}

/// `1 document`, `2 documents`: a count as the run's lines say it.
pub fn documents(n: usize) -> String {
    match n {
        1 => "1 document".into(),
        n => format!("{n} documents"),
    }
}

/// Refuses a text column other than `text` named for a corpus of plain text files alone,
/// each one document with no columns: the setting would change nothing.
pub(crate) fn check_column_read(path: &Path, files: &[PathBuf], column: &str) -> Result<()> {
    if column != "text" && !files.iter().any(|f| is_parquet(f) || is_jsonl(f)) {
        bail!(
            "{}: --columns (data.columns) names the text column `{column}`, but the corpus \
             holds no JSONL or Parquet file: a plain text file is one document, with no columns",
            path.display()
        );
    }
    Ok(())
}

/// A file read as JSON lines: `.jsonl`, or `.json` (what `datasets` writes under that name),
/// gzipped or not.
fn is_jsonl(path: &Path) -> bool {
    path.file_name().is_some_and(|n| {
        let n = n.to_string_lossy().to_lowercase();
        let n = n.strip_suffix(".gz").unwrap_or(&n);
        n.ends_with(".jsonl") || n.ends_with(".json")
    })
}

/// The documents of the corpus `path`'s `files` ([`corpus_files`]).
pub(crate) fn documents_of(path: &Path, files: &[PathBuf], column: &str) -> Result<Vec<String>> {
    check_column_read(path, files, column)?;
    let mut docs = Vec::new();
    for f in files {
        read_file_documents(f, column, &mut docs)?;
    }
    docs.retain(|d| !d.is_empty());
    if docs.is_empty() {
        let what = if path.is_dir() {
            " (no non-empty .txt, .md, .text, .jsonl, .parquet, .txt.gz or .jsonl.gz file under \
             it, nor, alone, a .json one)"
        } else {
            ""
        };
        // A directory of damaged or foreign shards is no text corpus either: say why its
        // .bin files were not read as shards.
        let bin = (std::fs::read_dir(path).into_iter().flatten().flatten())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "bin"))
            .min();
        let shards = match bin {
            Some(b) => format!(
                "; {} does not start with a token shard's magic number (20240520 or \
                 20240801), so it was not read as a shard",
                b.display()
            ),
            None => String::new(),
        };
        bail!("{}: corpus is empty{what}{shards}", path.display());
    }
    Ok(docs)
}

/// The files of a corpus in the order [`load_documents`] reads them: the file itself, or a
/// directory's corpus files (recursively, in sorted path order; of its `part` where its files
/// name their splits).
pub(crate) fn corpus_files(path: &Path, part: Part) -> Result<Vec<PathBuf>> {
    std::fs::metadata(path).with_context(|| format!("{}: cannot read corpus", path.display()))?;
    data_files(path, part, &CORPUS_EXTS)
}

/// Appends the documents of one corpus file (empty ones too) to `docs`, a JSONL or Parquet
/// file's from its field `column`.
pub(crate) fn read_file_documents(path: &Path, column: &str, docs: &mut Vec<String>) -> Result<()> {
    if is_parquet(path) {
        let rows = read_rows(path, Some(&[column]))?;
        return (0..).zip(rows).try_for_each(|(row_index, row)| {
            let at = Loc {
                path,
                at: Place::Row(row_index),
            };
            document(&at, &row, column).map(|d| docs.push(d.to_string()))
        });
    }
    let text = read_text(path)?;
    // `.json` too, as the other stages read their data files; read as plain text, its records
    // were one document of JSON.
    if !is_jsonl(path) {
        docs.push(text);
        return Ok(());
    }
    for (at, obj) in parse_jsonl(path, &text)? {
        docs.push(document(&Loc { path, at }, &obj, column)?.to_string());
    }
    Ok(())
}

/// A record's document: its string field `column`.
fn document<'o>(
    at: &Loc,
    obj: &'o serde_json::Map<String, Value>,
    column: &str,
) -> Result<&'o str> {
    match obj.get(column) {
        Some(Value::String(s)) => Ok(s),
        None => Err(at.field(column, "missing")),
        Some(v) => Err(at.field(column, &format!("expected a string, got {}", kind(v)))),
    }
}

pub struct PackedCorpus {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
}

/// Below this many documents a whole-document split gives too coarse (or empty) a
/// validation set, so the stream's tail is held out instead.
pub(crate) const MIN_DOCS_FOR_DOC_SPLIT: usize = 20;

/// Tokenises each document, appends EOS after each, and splits deterministically by `seed`.
///
/// With at least 20 documents whole documents go to validation with probability
/// `val_fraction` (a seeded hash of the document index, so the split is stable). Otherwise,
/// or when that leaves a split shorter than one block, the joined token stream's last
/// `val_fraction` is held out ([`split_tail`]). Each split holds at least `block` tokens or it
/// errors.
pub fn pack_documents(
    docs: &[String],
    tok: &Tokenizer,
    val_fraction: f64,
    block: usize,
    seed: u64,
) -> Result<PackedCorpus> {
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        bail!("data.val_fraction must be between 0 and 1 (exclusive), got {val_fraction}: pretraining on text needs both a training and a validation split");
    }
    if block == 0 {
        bail!("pack_documents: block length must be at least 1");
    }
    let streams = document_ids(docs, tok)?;
    if streams.len() >= MIN_DOCS_FOR_DOC_SPLIT {
        if let Some(p) = split_documents(&streams, val_fraction, block, seed) {
            return Ok(p);
        }
    }
    split_tail(&streams.concat(), val_fraction, block)
}

/// Whole-document split, or None when a side would be shorter than one block.
fn split_documents(
    streams: &[Vec<u32>],
    val_fraction: f64,
    block: usize,
    seed: u64,
) -> Option<PackedCorpus> {
    let u: Vec<f64> = (0..streams.len())
        .map(|i| unit(seed, DOC_STREAM, i as u64))
        .collect();
    let mut to_val: Vec<bool> = (0..streams.len())
        .map(|i| held_out(seed, i, val_fraction))
        .collect();
    // With a small fraction the coin flips can pick nothing (or everything); the document
    // that came closest joins the empty side, which keeps the split a function of the seed.
    if !to_val.iter().any(|&v| v) {
        to_val[argmin(&u)] = true;
    }
    if to_val.iter().all(|&v| v) {
        let neg: Vec<f64> = u.iter().map(|x| -x).collect();
        to_val[argmin(&neg)] = false;
    }
    let mut p = PackedCorpus {
        train: Vec::new(),
        val: Vec::new(),
    };
    for (s, v) in streams.iter().zip(&to_val) {
        if *v {
            p.val.extend_from_slice(s);
        } else {
            p.train.extend_from_slice(s);
        }
    }
    (p.train.len() >= block && p.val.len() >= block).then_some(p)
}

/// The stream's last `val_fraction` held out (at least one block, and never all but less than
/// one), the rest trained: nanoGPT's split of a single text, and the one a token-shard corpus
/// without validation shards gets, so a text and its shards hold out the same tokens. It is
/// one span, which neither the seed nor the context moves: held-out windows never straddle a
/// trained stretch, and losses of runs with other seeds or contexts compare.
fn split_tail(stream: &[u32], val_fraction: f64, block: usize) -> Result<PackedCorpus> {
    if stream.len() < 2 * block {
        bail!(
            "the corpus is too small for a context of {block} tokens: it has {} tokens, and at least {} (one block for training and one for validation) are needed; use more text or a shorter context",
            stream.len(),
            2 * block
        );
    }
    let held = ((stream.len() as f64 * val_fraction) as usize).clamp(block, stream.len() - block);
    let (train, val) = stream.split_at(stream.len() - held);
    Ok(PackedCorpus {
        train: train.to_vec(),
        val: val.to_vec(),
    })
}

/// Whether document `index` (counting the corpus's non-empty documents from 0) goes to
/// validation under the whole-document split, before the split's repair of an empty side.
pub(crate) fn held_out(seed: u64, index: usize, val_fraction: f64) -> bool {
    unit(seed, DOC_STREAM, index as u64) < val_fraction
}

/// The document split's hash stream.
const DOC_STREAM: u64 = 0x646f_6373;

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn mix(seed: u64, stream: u64, index: u64) -> u64 {
    splitmix64(splitmix64(seed ^ stream) ^ index)
}

/// A uniform number in [0, 1) from the top 53 bits of the hash.
fn unit(seed: u64, stream: u64, index: u64) -> f64 {
    (mix(seed, stream, index) >> 11) as f64 / (1u64 << 53) as f64
}

fn argmin(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x < xs[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenizer::BYTE_EOS;

    fn err<T>(r: Result<T>) -> String {
        let e = format!("{:#}", r.err().expect("expected an error"));
        assert!(!e.contains('\n'), "multi-line error: {e}");
        e
    }

    #[test]
    fn text_file_is_one_document() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("book.txt");
        std::fs::write(&p, "line one\n\nline two\n").unwrap();
        assert_eq!(load_documents(&p).unwrap(), vec!["line one\n\nline two\n"]);
        // Any name is a text file when given directly.
        let p = d.path().join("README");
        std::fs::write(&p, "x").unwrap();
        assert_eq!(load_documents(&p).unwrap(), vec!["x"]);
    }

    #[test]
    fn jsonl_documents() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.jsonl");
        std::fs::write(
            &p,
            "{\"text\": \"a\\nb\", \"id\": 1}\n\n{\"text\": \"\"}\n{\"text\": \"c\"}\n",
        )
        .unwrap();
        assert_eq!(load_documents(&p).unwrap(), vec!["a\nb", "c"]);
        // A .json file given directly is JSON lines too, as the other stages read it.
        let j = d.path().join("c.json");
        std::fs::copy(&p, &j).unwrap();
        assert_eq!(load_documents(&j).unwrap(), vec!["a\nb", "c"]);
    }

    #[test]
    fn a_dataset_snapshot_is_read_as_its_train_split() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::write(root.join("README.md"), "---\nlicense: mit\n---\n# card").unwrap();
        for (name, text) in [
            ("data/train-00000-of-00002.jsonl", "t0"),
            ("data/train-00001-of-00002.jsonl", "t1"),
            ("data/test-00000-of-00001.jsonl", "held"),
            ("data/validation.jsonl", "val"),
        ] {
            std::fs::write(root.join(name), format!("{{\"text\": \"{text}\"}}\n")).unwrap();
        }
        assert_eq!(load_documents(root).unwrap(), ["t0", "t1"]);
        // Held out: the validation split, else the test split.
        let held = |root: &Path| load_documents_from(root, "text", Part::held_out());
        assert_eq!(held(root).unwrap(), ["val"]);
        std::fs::remove_file(root.join("data/validation.jsonl")).unwrap();
        assert_eq!(held(root).unwrap(), ["held"]);
        std::fs::remove_file(root.join("data/test-00000-of-00001.jsonl")).unwrap();
        assert!(err(held(root)).contains(
            "its files name the split train and none is a validation or test split by name"
        ));
        // No split named: the directory is read whole, its dataset card aside (a README.md
        // that is no card is a document).
        for f in [
            "data/train-00000-of-00002.jsonl",
            "data/train-00001-of-00002.jsonl",
        ] {
            std::fs::remove_file(root.join(f)).unwrap();
        }
        std::fs::write(root.join("training_day.txt"), "day").unwrap();
        assert_eq!(load_documents(root).unwrap(), ["day"]);
        std::fs::write(root.join("README.md"), "# notes").unwrap();
        assert_eq!(load_documents(root).unwrap(), ["# notes", "day"]);
    }

    #[test]
    fn directory_recursive_sorted_filtered() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("b/deep")).unwrap();
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::write(root.join("b/deep/z.md"), "md").unwrap();
        std::fs::write(root.join("b/1.text"), "text").unwrap();
        std::fs::write(
            root.join("a/x.jsonl"),
            "{\"text\": \"j1\"}\n{\"text\": \"j2\"}\n",
        )
        .unwrap();
        std::fs::write(root.join("c.txt"), "txt").unwrap();
        std::fs::write(root.join("c.json"), "{ignored").unwrap();
        std::fs::write(root.join("img.png"), [0xffu8, 0x00]).unwrap();
        std::fs::write(root.join("empty.txt"), "").unwrap();
        std::fs::write(root.join("d.TXT"), "upper").unwrap();
        std::fs::write(root.join(".DS_Store"), "x").unwrap();
        assert_eq!(
            load_documents(root).unwrap(),
            vec!["j1", "j2", "text", "md", "txt", "upper"]
        );
    }

    #[cfg(unix)]
    #[test]
    fn directory_symlink_loop_terminates() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/a.txt"), "a").unwrap();
        std::os::unix::fs::symlink(d.path(), d.path().join("sub/up")).unwrap();
        assert_eq!(load_documents(d.path()).unwrap(), vec!["a"]);
    }

    #[test]
    fn load_errors() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("gone");
        let e = err(load_documents(&missing));
        assert!(
            e.starts_with(&format!("{}: cannot read corpus", missing.display())),
            "{e}"
        );

        let p = d.path().join("c.jsonl");
        let cases: &[(&str, &str)] = &[
            (
                "{\"text\": \"ok\"}\n\nnope\n",
                "c.jsonl:3: not valid JSON: expected ident at column 2",
            ),
            (
                "x\n",
                "c.jsonl:1: not valid JSON: expected value at column 1",
            ),
            ("{\"body\": \"x\"}\n", "c.jsonl:1: field \"text\": missing"),
            (
                "{\"text\": 7}\n",
                "c.jsonl:1: field \"text\": expected a string, got a number",
            ),
            (
                "{\"text\": null}\n",
                "c.jsonl:1: field \"text\": expected a string, got null",
            ),
            (
                "\"text\"\n",
                "c.jsonl:1: expected a JSON object, got a string",
            ),
        ];
        for (body, want) in cases {
            std::fs::write(&p, body).unwrap();
            let e = err(load_documents(&p));
            assert!(e.ends_with(want), "{body:?}: got {e}");
        }

        // Errors inside a directory name the file inside it.
        let dir = d.path().join("corpus");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("bad.jsonl"), "{\"text\": 1}\n").unwrap();
        assert!(err(load_documents(&dir)).contains("bad.jsonl:1: field \"text\""));

        let bin = d.path().join("bin.txt");
        std::fs::write(&bin, b"ok\n\xff\xfe").unwrap();
        assert!(err(load_documents(&bin)).ends_with("bin.txt:2: not valid UTF-8 text"));
    }

    #[test]
    fn empty_corpora() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("e.txt");
        std::fs::write(&f, "").unwrap();
        assert_eq!(
            err(load_documents(&f)),
            format!("{}: corpus is empty", f.display())
        );
        let j = d.path().join("e.jsonl");
        std::fs::write(&j, "\n{\"text\": \"\"}\n").unwrap();
        assert!(err(load_documents(&j)).ends_with("e.jsonl: corpus is empty"));
        let dir = d.path().join("dir");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("notes.csv"), "a,b").unwrap();
        assert!(err(load_documents(&dir)).contains("dir: corpus is empty"));
        std::fs::write(dir.join("train_000000.bin"), [0u8; 16]).unwrap();
        assert!(err(load_documents(&dir)).contains("train_000000.bin does not start with"));
    }

    fn docs(n: usize, len: usize) -> Vec<String> {
        (0..n).map(|i| format!("{i:>len$}")).collect()
    }

    #[test]
    fn eos_after_each_document() {
        let tok = Tokenizer::bytes();
        let ds = vec!["ab".to_string(), "c".to_string()];
        let p = pack_documents(&ds, &tok, 0.5, 2, 0).unwrap();
        // Stream "a b EOS c EOS": its last half (two tokens) held out.
        let (a, b) = (b'a' as u32, b'b' as u32);
        assert_eq!(p.train, [a, b, BYTE_EOS]);
        assert_eq!(p.val, [b'c' as u32, BYTE_EOS]);

        // Whole-document split: every document ends with EOS in whichever split it went.
        let ds = docs(40, 5);
        let p = pack_documents(&ds, &tok, 0.25, 4, 3).unwrap();
        for s in [&p.train, &p.val] {
            assert_eq!(s.len() % 6, 0);
            assert!(s
                .chunks(6)
                .all(|c| c[5] == BYTE_EOS && !c[..5].contains(&BYTE_EOS)));
        }
        assert_eq!(p.train.len() + p.val.len(), 40 * 6);
    }

    #[test]
    fn document_split_is_deterministic_and_seeded() {
        let tok = Tokenizer::bytes();
        let ds = docs(200, 8);
        let a = pack_documents(&ds, &tok, 0.1, 16, 7).unwrap();
        let b = pack_documents(&ds, &tok, 0.1, 16, 7).unwrap();
        assert_eq!((&a.train, &a.val), (&b.train, &b.val));
        let c = pack_documents(&ds, &tok, 0.1, 16, 8).unwrap();
        assert_ne!(a.val, c.val);
        // Roughly the requested fraction of the 200 documents went to validation.
        let n_val = a.val.len() / 9;
        assert!((8..=35).contains(&n_val), "{n_val}");
        // The split is per document: adding documents at the end does not move earlier ones.
        let more = docs(220, 8);
        let d = pack_documents(&more, &tok, 0.1, 16, 7).unwrap();
        assert!(d.val.starts_with(&a.val));
    }

    #[test]
    fn tiny_fraction_still_gets_a_validation_document() {
        let tok = Tokenizer::bytes();
        let ds = docs(25, 30);
        for seed in 0..20 {
            let p = pack_documents(&ds, &tok, 1e-9, 8, seed).unwrap();
            assert_eq!(p.val.len(), 31, "seed {seed}");
            let p = pack_documents(&ds, &tok, 1.0 - 1e-9, 8, seed).unwrap();
            assert_eq!(p.train.len(), 31, "seed {seed}");
        }
    }

    /// A few documents are split as one stream: its last `val_fraction`, the same whatever
    /// the seed or the context (but at least one block each way).
    #[test]
    fn tail_split_for_few_documents() {
        let tok = Tokenizer::bytes();
        let text: String = (0..1000)
            .map(|i| char::from(b'!' + (i % 90) as u8))
            .collect();
        let stream: Vec<u32> = (text.bytes().map(u32::from)).chain([BYTE_EOS]).collect();
        let ds = vec![text];
        for (seed, block) in [(1, 10), (2, 10), (1, 33)] {
            let p = pack_documents(&ds, &tok, 0.1, block, seed).unwrap();
            assert_eq!((p.train.as_slice(), p.val.as_slice()), stream.split_at(901));
        }

        // Two blocks: one each way, even with a fraction that rounds to zero or to all.
        let ds = vec!["y".repeat(19)];
        for vf in [0.01, 0.99] {
            let p = pack_documents(&ds, &tok, vf, 10, 0).unwrap();
            assert_eq!((p.train.len(), p.val.len()), (10, 10));
        }
    }

    #[test]
    fn few_documents_with_tiny_val_fall_back_to_the_tail() {
        // 20 short documents, but a context longer than any validation pick.
        let tok = Tokenizer::bytes();
        let ds = docs(20, 9);
        let p = pack_documents(&ds, &tok, 0.1, 40, 0).unwrap();
        assert_eq!((p.train.len(), p.val.len()), (160, 40));
        let stream = document_ids(&ds, &tok).unwrap().concat();
        assert_eq!(p.val, stream[160..]);
    }

    /// A text column named for plain text files alone would change nothing: refused.
    #[test]
    fn a_column_for_plain_text_alone_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let txt = d.path().join("a.txt");
        std::fs::write(&txt, "one document").unwrap();
        let e = err(load_documents_from(&txt, "body", Part::train()));
        assert!(
            e.contains("a.txt: --columns") && e.contains("`body`"),
            "{e}"
        );
        assert_eq!(
            load_documents_from(&txt, "text", Part::train())
                .unwrap()
                .len(),
            1
        );
        std::fs::write(d.path().join("b.jsonl"), "{\"body\": \"two\"}\n").unwrap();
        assert_eq!(
            load_documents_from(d.path(), "body", Part::train())
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn pack_errors() {
        let tok = Tokenizer::bytes();
        let ds = vec!["short".to_string()];
        let e = err(pack_documents(&ds, &tok, 0.1, 257, 0));
        assert!(
            e.contains("too small for a context of 257 tokens")
                && e.contains("6 tokens")
                && e.contains("514"),
            "{e}"
        );
        for vf in [0.0, 1.0, -0.5, f64::NAN] {
            let e = err(pack_documents(&ds, &tok, vf, 2, 0));
            assert!(e.contains("val_fraction"), "{e}");
        }
        assert!(err(pack_documents(&ds, &tok, 0.1, 0, 0)).contains("block"));
        assert!(err(pack_documents(&[], &tok, 0.1, 4, 0)).contains("too small"));
    }
}
