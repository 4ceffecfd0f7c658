//! `temper tokenizer encode`: a text corpus tokenized once into token shards
//! ([`super::shards`]), so that pretraining on it starts at once and keeps no corpus in
//! memory.
//!
//! Documents are read in the order [`super::corpus::load_documents`] reads them, a group of
//! files (up to [`GROUP_BYTES`] of text) at a time, encoded on every core, each opened as
//! the tokenizer opens a text (Llama's BOS) and followed by EOS; whole documents go to
//! validation by the same seeded hash as pretraining's split of a text corpus. So pretraining
//! on the shards sees the token streams pretraining from the text makes with the same
//! tokenizer.json and seed, where that split is by document (20 documents or more, the hash
//! sending at least one each way, each side at least a block). Shards written before
//! documents opened with BOS (temper before 2026-12-02) hold none.
//!
//! Beside the shards goes what names their tokenizer, which pretraining checks the run's
//! against ([`super::shards::check_corpus_tokenizer`]): a copy of its tokenizer.json, or for
//! the byte tokenizer, which has none, a [`BYTES_MARKER`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::corpus::{
    check_column_read, corpus_files, held_out, read_file_documents, Part, MIN_DOCS_FOR_DOC_SPLIT,
};
use super::document_ids::document_ids;
use super::shards::{write_shard, Width, BYTES_MARKER, BYTES_MARKER_TEXT};
use super::tokenizer::{Tokenizer, FILE_NAME};

/// Text read before a group of files is encoded: bounds the memory (a long document is
/// encoded in pieces on every core: [`super::document_ids`]).
pub const GROUP_BYTES: usize = 64 << 20;

/// What to write.
pub struct EncodeOpts<'a> {
    pub tok: &'a Tokenizer,
    /// The tokenizer.json `tok` came from: copied beside the shards, where pretraining finds
    /// it. The byte tokenizer has none: a [`BYTES_MARKER`] goes there instead.
    pub tokenizer_file: Option<&'a Path>,
    pub out: &'a Path,
    /// Tokens per shard (the last of each split holds the rest).
    pub shard_tokens: usize,
    pub val_fraction: f64,
    pub seed: u64,
    /// The field of JSONL and Parquet documents that holds their text.
    pub column: &'a str,
    /// Of a corpus directory that names its splits, the one encoded.
    pub part: Part<'a>,
}

/// What was written.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Encoded {
    pub documents: usize,
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub shards: Vec<PathBuf>,
}

/// One split's tokens, cut into shards of `shard_tokens` as they come.
struct Split<'a> {
    name: &'static str,
    opts: &'a EncodeOpts<'a>,
    width: Width,
    pending: Vec<u32>,
    written: usize,
    shards: Vec<PathBuf>,
}

impl Split<'_> {
    fn push(&mut self, mut doc: &[u32]) -> Result<()> {
        // A shard at a time out of the document, so a document much longer than a shard
        // costs no more than its length.
        while !doc.is_empty() {
            let room = self.opts.shard_tokens - self.pending.len();
            let (now, rest) = doc.split_at(room.min(doc.len()));
            self.pending.extend_from_slice(now);
            if self.pending.len() == self.opts.shard_tokens {
                self.flush()?;
            }
            doc = rest;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = self
            .opts
            .out
            .join(format!("{}_{:06}.bin", self.name, self.shards.len()));
        write_shard(&path, &self.pending, self.width)?;
        errln!(
            "[encode] wrote {} ({} tokens)",
            path.display(),
            self.pending.len()
        );
        self.written += self.pending.len();
        self.pending.clear();
        self.shards.push(path);
        Ok(())
    }
}

/// Tokenizes the corpus at `corpus` (a file or a directory, as pretraining reads one) into
/// `train_NNNNNN.bin` and `val_NNNNNN.bin` shards in `opts.out`.
pub fn encode_corpus(corpus: &Path, opts: &EncodeOpts) -> Result<Encoded> {
    if opts.shard_tokens == 0 {
        bail!("encode: --shard-tokens must be at least 1");
    }
    if !(0.0..1.0).contains(&opts.val_fraction) {
        bail!(
            "encode: --val-fraction must be in [0, 1), got {}",
            opts.val_fraction
        );
    }
    let created = !opts.out.exists();
    crate::io::create_dirs(opts.out)?;
    if super::shards::is_shard_corpus(opts.out) {
        bail!(
            "{}: already holds token shards; encode into an empty directory",
            opts.out.display()
        );
    }
    // What another tokenizer left there would name it as these shards' tokenizer.
    let other = match opts.tok.is_bytes() {
        true => FILE_NAME,
        false => BYTES_MARKER,
    };
    if opts.out.join(other).exists() {
        bail!(
            "{}: already holds a {other} of another encode, which would name the wrong \
             tokenizer for these shards; encode into an empty directory",
            opts.out.display()
        );
    }
    let encoded = encode_into(corpus, opts);
    if encoded.is_err() {
        remove_partial(opts.out, created);
    }
    encoded
}

/// After a failed encode, the shards it wrote (the directory held none before it began, so
/// every shard there is its own), and the directory where it made it: a half-encoded corpus
/// left behind would pretrain as if whole.
fn remove_partial(out: &Path, created: bool) {
    let ours = |name: &str| {
        let stem = name.strip_suffix(".bin").unwrap_or("");
        let number = stem.strip_prefix("train_").or(stem.strip_prefix("val_"));
        number.is_some_and(|n| n.len() == 6 && n.bytes().all(|b| b.is_ascii_digit()))
    };
    for entry in std::fs::read_dir(out).into_iter().flatten().flatten() {
        if ours(&entry.file_name().to_string_lossy()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    if created {
        // Only where nothing else was put there meanwhile: remove_dir leaves a full one.
        let _ = std::fs::remove_dir(out);
    }
}

/// [`encode_corpus`] into an `opts.out` checked to hold no shards.
fn encode_into(corpus: &Path, opts: &EncodeOpts) -> Result<Encoded> {
    let width = Width::for_vocab(opts.tok.vocab_size());
    let split = |name| Split {
        name,
        opts,
        width,
        pending: Vec::new(),
        written: 0,
        shards: Vec::new(),
    };
    let (mut train, mut val) = (split("train"), split("val"));
    let start = Instant::now();
    let mut documents = 0;
    let mut encoded_tokens = 0usize;
    let mut undecided: Vec<(bool, Vec<u32>)> = Vec::new();
    let files = corpus_files(corpus, opts.part)?;
    check_column_read(corpus, &files, opts.column)?;
    let mut next = 0;
    while next < files.len() {
        let mut docs = Vec::new();
        let mut bytes = 0;
        while next < files.len() && (bytes < GROUP_BYTES || docs.is_empty()) {
            let before = docs.len();
            read_file_documents(&files[next], opts.column, &mut docs)?;
            bytes += docs[before..].iter().map(String::len).sum::<usize>();
            next += 1;
        }
        docs.retain(|d| !d.is_empty());
        for ids in document_ids(&docs, opts.tok)? {
            let to_val =
                opts.val_fraction > 0.0 && held_out(opts.seed, documents, opts.val_fraction);
            encoded_tokens += ids.len();
            undecided.push((to_val, ids));
            documents += 1;
            // Pretraining splits a text of fewer documents at its tail, not by document; the
            // first ones wait until it is known that there are enough.
            if documents >= MIN_DOCS_FOR_DOC_SPLIT || opts.val_fraction == 0.0 {
                for (to_val, ids) in undecided.drain(..) {
                    match to_val {
                        true => val.push(&ids)?,
                        false => train.push(&ids)?,
                    }
                }
            }
        }
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        errln!(
            "[encode] {} files of {} read ({documents} documents, {:.0} tokens/s so far)",
            next,
            files.len(),
            encoded_tokens as f64 / secs
        );
    }
    if documents == 0 {
        bail!("{}: corpus is empty", corpus.display());
    }
    // Too few documents for a document split: all of it trains, and pretraining holds out
    // the stream's tail, as it does of the text.
    for (_, ids) in undecided.drain(..) {
        train.push(&ids)?;
    }
    train.flush()?;
    val.flush()?;
    if train.written == 0 {
        bail!(
            "{}: every document went to validation; lower --val-fraction",
            corpus.display()
        );
    }
    if opts.tok.is_bytes() {
        let dst = opts.out.join(BYTES_MARKER);
        crate::io::write_atomic(&dst, BYTES_MARKER_TEXT.as_bytes())?;
    } else if let Some(src) = opts.tokenizer_file {
        let dst = opts.out.join(FILE_NAME);
        let text = std::fs::read(src).with_context(|| format!("{}: cannot read", src.display()))?;
        crate::io::write_atomic(&dst, &text)?;
    }
    Ok(Encoded {
        documents,
        train_tokens: train.written,
        val_tokens: val.written,
        shards: [train.shards, val.shards].concat(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::corpus::{load_documents, pack_documents};
    use crate::data::shards::{open_corpus, TokenStream};

    /// Shards written from a text corpus hold the token streams pretraining packs from the
    /// same text, split the same way; a shard boundary may fall inside a document.
    #[test]
    fn shards_hold_the_streams_pretraining_packs_from_the_text() {
        let d = tempfile::tempdir().unwrap();
        let corpus = d.path().join("corpus");
        std::fs::create_dir(&corpus).unwrap();
        let lines: String = (0..30)
            .map(|i| {
                format!(
                    "{{\"text\": \"document {i}: {}\"}}\n",
                    "ab".repeat(i % 7 + 1)
                )
            })
            .collect();
        std::fs::write(corpus.join("a.jsonl"), lines).unwrap();
        std::fs::write(corpus.join("b.txt"), "a text file is one document\n").unwrap();
        std::fs::write(corpus.join("c.txt"), "").unwrap();
        let tok = Tokenizer::bytes();
        let out = d.path().join("shards");
        let opts = EncodeOpts {
            tok: &tok,
            tokenizer_file: None,
            out: &out,
            shard_tokens: 100,
            val_fraction: 0.2,
            column: "text",
            part: Part::train(),
            seed: 3,
        };
        let enc = encode_corpus(&corpus, &opts).unwrap();
        assert_eq!(enc.documents, 31);
        let packed = pack_documents(&load_documents(&corpus).unwrap(), &tok, 0.2, 17, 3).unwrap();
        let (train, val) = open_corpus(&out).unwrap();
        let read = |s: TokenStream| {
            let mut v = vec![];
            s.read(0, s.len(), tok.vocab_size(), &mut v).unwrap();
            v
        };
        assert!(!packed.val.is_empty() && enc.val_tokens == packed.val.len());
        assert_eq!(read(TokenStream::mapped(train)), packed.train);
        assert_eq!(read(TokenStream::mapped(val.unwrap())), packed.val);
        assert!(enc.shards.len() > 3, "{:?}", enc.shards);
        // A second encode into the same directory would mix two corpora.
        let e = format!("{:#}", encode_corpus(&corpus, &opts).unwrap_err());
        assert!(e.contains("already holds token shards"), "{e}");
    }

    /// An encode that fails (a later file without the text column) leaves no directory it made
    /// and none of its shards (the shard cleanup itself runs only past a 64 MB group, which
    /// this corpus does not reach); one that was there keeps its other files. The column read
    /// is the one named.
    #[test]
    fn a_failed_encode_leaves_no_shards_behind() {
        let d = tempfile::tempdir().unwrap();
        let corpus = d.path().join("corpus");
        std::fs::create_dir(&corpus).unwrap();
        let lines: String = (0..20)
            .map(|i| format!("{{\"content\": \"document {i} of the stack\"}}\n"))
            .collect();
        std::fs::write(corpus.join("a.jsonl"), lines).unwrap();
        std::fs::write(corpus.join("b.jsonl"), "{\"text\": \"no content\"}\n").unwrap();
        let tok = Tokenizer::bytes();
        let out = d.path().join("shards");
        let opts = EncodeOpts {
            tok: &tok,
            tokenizer_file: None,
            out: &out,
            shard_tokens: 50,
            val_fraction: 0.0,
            column: "content",
            part: Part::train(),
            seed: 0,
        };
        let e = format!("{:#}", encode_corpus(&corpus, &opts).unwrap_err());
        assert!(e.contains("b.jsonl:1: field \"content\": missing"), "{e}");
        assert!(!out.exists());
        // Into a directory that was there before: the shards go, the directory stays.
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        encode_corpus(&corpus, &opts).unwrap_err();
        let left: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["notes.txt"]);
        std::fs::remove_file(corpus.join("b.jsonl")).unwrap();
        let enc = encode_corpus(&corpus, &opts).unwrap();
        assert_eq!(enc.documents, 20);
        // The cleanup takes the shards' names alone.
        let names = [
            "train_000000.bin",
            "val_000012.bin",
            "train_1.bin",
            "model.bin",
        ];
        let mixed = d.path().join("mixed");
        std::fs::create_dir(&mixed).unwrap();
        for n in names {
            std::fs::write(mixed.join(n), "x").unwrap();
        }
        remove_partial(&mixed, true);
        let mut left: Vec<_> = std::fs::read_dir(&mixed)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["model.bin", "train_1.bin"]);
    }
}
