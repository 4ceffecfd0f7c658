//! Pre-tokenized pretraining corpora: token shards in llm.c's `.bin` layout, memory-mapped.
//!
//! A shard is a header of 256 little-endian i32 (a magic number that names the token width,
//! a version, the token count) followed by the tokens: u16 under magic 20240520 (version 1,
//! llm.c's GPT-2 shards) or u32 under magic 20240801 (version 7, its Llama 3 shards). So the
//! shards llm.c's scripts write (FineWeb, TinyStories, ...) train temper as they are, and
//! `temper tokenizer encode` writes the same files from text, with what names their tokenizer
//! beside them (a copy of its tokenizer.json, or for the byte tokenizer a [`BYTES_MARKER`]),
//! which a run's tokenizer is checked against ([`check_corpus_tokenizer`]). A corpus is a shard
//! file, or a directory holding shards (`.bin` files that start with a shard's magic number;
//! other files there, a README or a stray `.bin`, are left alone): those whose name has a
//! `_`-separated part `val`, `valid` or `validation` (`fineweb_val_000000.bin`,
//! `val_000000.bin`, `x_validation_000000.bin`) are the validation split, the others
//! the training split, each read in name order as one stream. Nothing is read ahead: a run starts at once whatever the corpus
//! size, and a batch copies its windows out of the page cache.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use memmap2::Mmap;

use super::tokenizer::{Tokenizer, BYTE_EOS, BYTE_PAD, FILE_NAME};

/// Bytes of a shard's header.
pub const HEADER_BYTES: usize = 256 * 4;

/// How a shard stores its tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    U16,
    U32,
}

impl Width {
    /// The narrowest width that holds every id of a vocabulary of `vocab` tokens.
    pub fn for_vocab(vocab: usize) -> Self {
        if vocab <= 1 << 16 {
            Width::U16
        } else {
            Width::U32
        }
    }

    fn bytes(self) -> usize {
        match self {
            Width::U16 => 2,
            Width::U32 => 4,
        }
    }

    /// `(magic, version)` of the header.
    fn header(self) -> (i32, i32) {
        match self {
            Width::U16 => (20240520, 1),
            Width::U32 => (20240801, 7),
        }
    }

    fn from_header(magic: i32, version: i32, at: &Path) -> Result<Self> {
        let w = match magic {
            20240520 => Width::U16,
            20240801 => Width::U32,
            _ => bail!(
                "{}: header field magic: {magic} is not a token shard's (20240520: u16 tokens, 20240801: u32 tokens)",
                at.display()
            ),
        };
        if version != w.header().1 {
            bail!(
                "{}: header field version: {version}, expected {} for magic {magic}",
                at.display(),
                w.header().1
            );
        }
        Ok(w)
    }
}

/// One memory-mapped shard.
struct Shard {
    path: PathBuf,
    map: Mmap,
    width: Width,
    len: usize,
}

impl Shard {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
        // SAFETY: the map is read-only and private to this process. Another process
        // truncating the file under it would fault the reader, as with any mapped corpus;
        // shards are written once (atomically, by `write_shard`) and then only read.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("{}: cannot map", path.display()))?;
        if map.len() < HEADER_BYTES {
            bail!(
                "{}: {} bytes, shorter than a token shard's {HEADER_BYTES}-byte header",
                path.display(),
                map.len()
            );
        }
        let field =
            |i: usize| i32::from_le_bytes(map[4 * i..4 * i + 4].try_into().expect("4 bytes"));
        let width = Width::from_header(field(0), field(1), path)?;
        let len = usize::try_from(field(2)).map_err(|_| {
            anyhow::anyhow!(
                "{}: header field ntok: {} is negative",
                path.display(),
                field(2)
            )
        })?;
        let held = (map.len() - HEADER_BYTES) / width.bytes();
        if HEADER_BYTES + len * width.bytes() != map.len() {
            bail!(
                "{}: header field ntok: {len} tokens, but the file holds {held} (cut short, or not a shard)",
                path.display()
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            width,
            len,
        })
    }

    /// The first index in `from..to` whose id is `vocab` or more.
    fn first_past(&self, from: usize, to: usize, vocab: usize) -> Option<usize> {
        let w = self.width.bytes();
        let bytes = &self.map[HEADER_BYTES + from * w..HEADER_BYTES + to * w];
        let id = |b: &[u8]| match self.width {
            Width::U16 => usize::from(u16::from_le_bytes([b[0], b[1]])),
            Width::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
        };
        bytes
            .chunks_exact(w)
            .position(|b| id(b) >= vocab)
            .map(|j| from + j)
    }

    /// Tokens `from..to` appended to `out`.
    fn copy(&self, from: usize, to: usize, out: &mut Vec<u32>) {
        debug_assert!(from <= to && to <= self.len);
        let w = self.width.bytes();
        let bytes = &self.map[HEADER_BYTES + from * w..HEADER_BYTES + to * w];
        match self.width {
            Width::U16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]]))),
            ),
            Width::U32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
        }
    }
}

/// Shards read back to back as one token stream.
pub struct Shards {
    shards: Vec<Shard>,
    /// `starts[i]`: the stream position of shard i's first token; one more entry, the total.
    starts: Vec<usize>,
}

impl Shards {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let shards = paths
            .iter()
            .map(|p| Shard::open(p))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| {
                // Each shard is one memory map, and the kernel allows about 65,000 a process
                // (vm.max_map_count): tiny shards run out of maps, not memory.
                let maps_out = e
                    .root_cause()
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.raw_os_error() == Some(libc::ENOMEM));
                match maps_out {
                    true => e.context(format!(
                        "{} shards, one memory map each: too many for the kernel's limit of \
                         maps (vm.max_map_count); re-encode with a larger --shard-tokens",
                        paths.len()
                    )),
                    false => e,
                }
            })?;
        let mut starts = vec![0];
        for s in &shards {
            starts.push(starts.last().expect("starts at 0") + s.len);
        }
        Ok(Self { shards, starts })
    }

    pub fn len(&self) -> usize {
        *self.starts.last().expect("starts at 0")
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stream positions `from..to` appended to `out`, across shard boundaries.
    fn copy(&self, from: usize, to: usize, out: &mut Vec<u32>) {
        let mut pos = from;
        while pos < to {
            let i = self.starts.partition_point(|&s| s <= pos) - 1;
            let end = to.min(self.starts[i + 1]);
            self.shards[i].copy(pos - self.starts[i], end - self.starts[i], out);
            pos = end;
        }
    }

    /// The first stream position in `from..to` whose id is `vocab` or more, scanned on every
    /// core: a shard of another tokenizer is refused before training rather than at the
    /// first window that reads the id, steps later.
    fn first_past(&self, from: usize, to: usize, vocab: usize) -> Option<usize> {
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        for (i, shard) in self.shards.iter().enumerate() {
            let (lo, hi) = (from.max(self.starts[i]), to.min(self.starts[i + 1]));
            if lo >= hi || (shard.width == Width::U16 && vocab > usize::from(u16::MAX)) {
                continue;
            }
            let (lo, hi) = (lo - self.starts[i], hi - self.starts[i]);
            let per = (hi - lo).div_ceil(threads).max(1 << 20);
            let found = std::thread::scope(|s| {
                let parts: Vec<_> = (lo..hi)
                    .step_by(per)
                    .map(|a| s.spawn(move || shard.first_past(a, (a + per).min(hi), vocab)))
                    .collect();
                (parts.into_iter()).find_map(|p| p.join().expect("a scanning thread panicked"))
            });
            if let Some(j) = found {
                return Some(self.starts[i] + j);
            }
        }
        None
    }

    /// The shard and the index within it of stream position `pos`, for errors.
    fn locate(&self, pos: usize) -> (&Path, usize) {
        let i = (self.starts.partition_point(|&s| s <= pos) - 1).min(self.shards.len() - 1);
        (&self.shards[i].path, pos - self.starts[i])
    }
}

/// A pretraining split: tokens in memory (tokenized from text at the start of the run), or
/// a range of memory-mapped shards.
#[derive(Clone)]
pub enum TokenStream {
    Owned(Arc<Vec<u32>>),
    Mapped {
        shards: Arc<Shards>,
        from: usize,
        to: usize,
    },
}

impl TokenStream {
    pub fn owned(tokens: Vec<u32>) -> Self {
        TokenStream::Owned(Arc::new(tokens))
    }

    pub fn mapped(shards: Shards) -> Self {
        let to = shards.len();
        TokenStream::Mapped {
            shards: Arc::new(shards),
            from: 0,
            to,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            TokenStream::Owned(t) => t.len(),
            TokenStream::Mapped { from, to, .. } => to - from,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(head, tail)`: the first `at` tokens and the rest.
    pub fn split_at(&self, at: usize) -> (Self, Self) {
        match self {
            TokenStream::Owned(t) => (Self::owned(t[..at].to_vec()), Self::owned(t[at..].to_vec())),
            TokenStream::Mapped { shards, from, to } => {
                let cut = from + at.min(to - from);
                let part = |from, to| TokenStream::Mapped {
                    shards: shards.clone(),
                    from,
                    to,
                };
                (part(*from, cut), part(cut, *to))
            }
        }
    }

    /// Fails as [`TokenStream::read`] of the first id that is `vocab` or more among the first
    /// `limit` would, before any is read: what a run checks of memory-mapped shards at its
    /// start (tokens tokenized here are the tokenizer's own). A shard of another tokenizer
    /// shows such ids at once; the rest of the corpus is checked as it is read, so that a run
    /// still starts without reading its whole corpus.
    pub fn check_ids(&self, vocab: usize, limit: usize) -> Result<()> {
        let TokenStream::Mapped { shards, from, to } = self else {
            return Ok(());
        };
        match shards.first_past(*from, (*to).min(from.saturating_add(limit)), vocab) {
            Some(pos) => self.read(pos - from, 1, vocab, &mut Vec::new()),
            None => Ok(()),
        }
    }

    /// Tokens `start..start + n` appended to `out`, each checked to be below `vocab`: a shard
    /// made with another tokenizer fails here, naming the shard and the token's index in it.
    pub fn read(&self, start: usize, n: usize, vocab: usize, out: &mut Vec<u32>) -> Result<()> {
        let first = out.len();
        match self {
            TokenStream::Owned(t) => out.extend_from_slice(&t[start..start + n]),
            TokenStream::Mapped { shards, from, to } => {
                debug_assert!(from + start + n <= *to, "a read past the split's end");
                shards.copy(from + start, from + start + n, out)
            }
        }
        if let Some(j) = out[first..].iter().position(|&id| id as usize >= vocab) {
            let id = out[first + j];
            return Err(match self {
                TokenStream::Owned(_) => {
                    anyhow::anyhow!(
                        "token {id} at {} is not below the vocabulary's {vocab}",
                        start + j
                    )
                }
                TokenStream::Mapped { shards, from, .. } => {
                    let (path, index) = shards.locate(from + start + j);
                    anyhow::anyhow!(
                        "{}: token {index} is {id}, not below the tokenizer's vocabulary of {vocab} (a shard of another tokenizer? name the one it was made with: --tokenizer or --init)",
                        path.display()
                    )
                }
            });
        }
        Ok(())
    }
}

/// Whether `path` is a shard corpus: a `.bin` file, or a directory holding one.
pub fn is_shard_corpus(path: &Path) -> bool {
    if path.is_dir() {
        return shard_files(path).is_ok_and(|f| !f.is_empty());
    }
    is_shard_name(path)
}

fn is_shard_name(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "bin")
}

/// The name parts that mark a validation shard: llm.c's `val`, and the Hub's split names.
const VAL_PARTS: [&str; 3] = ["val", "valid", "validation"];

/// Whether a shard file belongs to the validation split.
fn is_val_shard(p: &Path) -> bool {
    p.file_stem()
        .is_some_and(|s| (s.to_string_lossy().split('_')).any(|part| VAL_PARTS.contains(&part)))
}

/// Whether `p` starts with a shard's magic number (u16 or u32 tokens).
fn has_shard_magic(p: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 4];
    File::open(p)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && matches!(i32::from_le_bytes(head), 20240520 | 20240801)
}

/// The shards directly in `dir` (`.bin` files with a shard's magic number), in name order.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read directory", dir.display()))?
    {
        let p = entry
            .with_context(|| format!("{}: cannot read directory", dir.display()))?
            .path();
        if p.is_file() && is_shard_name(&p) && has_shard_magic(&p) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// A shard corpus's training split and, where it has validation shards, its validation split.
pub fn open_corpus(path: &Path) -> Result<(Shards, Option<Shards>)> {
    let files = if path.is_dir() {
        shard_files(path)?
    } else {
        vec![path.to_path_buf()]
    };
    let (val, train): (Vec<PathBuf>, Vec<PathBuf>) =
        files.into_iter().partition(|p| is_val_shard(p));
    if train.is_empty() {
        bail!(
            "{}: no training shard (every .bin there is a validation shard: its name has a part `val`, `valid` or `validation`)",
            path.display()
        );
    }
    let train = Shards::open(&train)?;
    let val = if val.is_empty() {
        None
    } else {
        Some(Shards::open(&val)?)
    };
    Ok((train, val))
}

/// A held-out shard corpus (`--eval-data`): the shard file itself, or a directory's validation
/// shards where it has any, else all its shards (a directory of validation shards alone is no
/// training corpus to [`open_corpus`], but is held-out data).
pub fn open_held_out(path: &Path) -> Result<Shards> {
    if !path.is_dir() {
        return Shards::open(&[path.to_path_buf()]);
    }
    let files = shard_files(path)?;
    let val: Vec<PathBuf> = files.iter().filter(|p| is_val_shard(p)).cloned().collect();
    Shards::open(if val.is_empty() { &files } else { &val })
}

/// The file `temper tokenizer encode` writes beside shards of the byte tokenizer, which has
/// no tokenizer.json: the ids they hold are bytes (0-255), EOS ([`BYTE_EOS`]) and PAD.
pub const BYTES_MARKER: &str = "tokenizer.bytes";

/// What [`BYTES_MARKER`] says, for whoever opens it.
pub const BYTES_MARKER_TEXT: &str =
    "temper's byte-level tokenizer: ids 0-255 are bytes, 256 is EOS, 257 is PAD\n";

/// File `name` beside a shard corpus (in its directory, or beside a shard file), where it is.
fn beside_corpus(corpus: &Path, name: &str) -> Option<PathBuf> {
    let dir = match corpus.is_dir() {
        true => Some(corpus),
        false => corpus.parent(),
    };
    dir.map(|d| d.join(name)).filter(|p| p.is_file())
}

/// The tokenizer.json beside a shard corpus (in its directory, or beside a shard file), which
/// `temper tokenizer encode` copies there: the tokenizer whose ids the shards hold.
pub fn corpus_tokenizer_file(corpus: &Path) -> Option<PathBuf> {
    beside_corpus(corpus, FILE_NAME)
}

/// The [`BYTES_MARKER`] beside a shard corpus, where `temper tokenizer encode` wrote its shards
/// with the byte tokenizer.
pub fn corpus_bytes_marker(corpus: &Path) -> Option<PathBuf> {
    beside_corpus(corpus, BYTES_MARKER)
}

/// Text encoded by both tokenizers: a vocabulary alike with other merges, normalizer or
/// pre-tokenizer cuts text otherwise, which the ids of this (cases, digits, punctuation,
/// runs of spaces, newlines and tabs, accents, CJK, an emoji, special tokens after a space)
/// show.
const PROBE: &str = "The quick brown fox, 1234567890 -- jumped!  Over\tthe lazy dog's\n\n\
    \"naïve café\" (Ünïcödé) 東京 🙂 <|endoftext|> </s> [INST] x=y+1; print(a[0])\r\n  end.";

/// Checks a run's tokenizer `tok` (read from `from`: a tokenizer.json, or the directory of a
/// model whose tokenizer it is) against the tokenizer.json a shard corpus was written with,
/// where one is beside it. Refused, in one line naming both files and the first id that
/// differs: a run in which some shard id stands for another token than in the shards'
/// tokenizer. A run tokenizer that only adds tokens (chat tokens for continued pretraining)
/// passes, as every shard id keeps its meaning. Shards of the byte tokenizer (a
/// [`BYTES_MARKER`] beside them) refuse any other tokenizer, in one line naming the corpus,
/// and pass the byte tokenizer. Returns a warning, for the caller to print, where the ids agree
/// but the two split text differently, where the file beside the shards cannot be read as a
/// tokenizer, or where the shards have neither file beside them (llm.c's, or byte shards
/// temper wrote before it marked them): nothing to check against. A text corpus passes
/// silently.
pub fn check_corpus_tokenizer(
    corpus: &Path,
    tok: &Tokenizer,
    from: &Path,
) -> Result<Option<String>> {
    if !is_shard_corpus(corpus) {
        return Ok(None);
    }
    let from = match from.join(FILE_NAME) {
        inside if from.is_dir() && inside.is_file() => inside,
        _ => from.to_path_buf(),
    };
    let file = match (corpus_tokenizer_file(corpus), corpus_bytes_marker(corpus)) {
        (Some(file), None) => file,
        (Some(file), Some(marker)) => bail!(
            "{}: token shards with both {} and {} beside them, so which tokenizer wrote them \
             is unknown: remove the file of the one that did not",
            corpus.display(),
            file.display(),
            marker.display()
        ),
        (None, Some(_)) if tok.is_bytes() => return Ok(None),
        (None, Some(marker)) => bail!(
            "{}: the token shards there were written with temper's byte-level tokenizer ({} \
             says so), and the run's tokenizer, from {}, is another, in which their ids (bytes) \
             stand for other tokens; encode the corpus again with the run's tokenizer (temper \
             tokenizer encode --tokenizer), or train from scratch with the shards' (without \
             --tokenizer or --init)",
            corpus.display(),
            marker.display(),
            from.display()
        ),
        (None, None) => {
            return Ok(Some(format!(
                "{}: the token shards there have neither a {FILE_NAME} nor a {BYTES_MARKER} \
                 beside them (llm.c's, or temper's from before it marked byte-level shards), \
                 so whether they hold the ids of the run's tokenizer ({}) is not checked",
                corpus.display(),
                from.display()
            )))
        }
    };
    // The raw tokenizer, not `Tokenizer::from_file`: that one wants an EOS it can find by
    // name, which the shards' ids do not depend on (an --init model's tokenizer_config.json
    // may name an EOS spelt otherwise, DeepSeek's `<|EOT|>`). A file that is no tokenizer at
    // all only costs the check: before it existed such runs trained, and the ids themselves
    // are still checked against the vocabulary's size as they are read.
    let written = match std::fs::read_to_string(&file)
        .map_err(anyhow::Error::from)
        .and_then(|t| {
            t.parse::<tokenizers::Tokenizer>()
                .map_err(|e| anyhow::anyhow!("{e}"))
        }) {
        Ok(w) => w,
        Err(e) => {
            return Ok(Some(format!(
                "{}: not a tokenizer.json ({e}), so whether the token shards of {} \
                 hold the ids of the run's tokenizer ({}) is not checked",
                file.display(),
                corpus.display(),
                from.display()
            )))
        }
    };
    match compare(&written, tok)? {
        Agreement::Same => Ok(None),
        Agreement::OtherIds { id, shards, run } => bail!(
            "{}: the token shards of {} were written with this tokenizer, and the run's \
             tokenizer, from {}, is another, in which the shards' ids stand for other tokens: \
             id {id} is {shards:?} in the shards' and {} in the run's; encode the corpus again \
             with the run's tokenizer (temper tokenizer encode --tokenizer), or train from \
             scratch with the shards' (--tokenizer {})",
            file.display(),
            corpus.display(),
            from.display(),
            match run {
                Some(t) => format!("{t:?}"),
                None => "no token".to_string(),
            },
            file.display()
        ),
        // Not refused: the ids are fixed in the shards and mean the same tokens to both, so
        // the model learns what it would with the shards' tokenizer. What differs is how text
        // becomes ids later (generation, evaluation, the exported model), where the run's
        // tokenizer will split some text in ways the model never saw; a tokenizer fixed up on
        // purpose (a normalizer, SentencePiece's prefix space) does exactly that, so the user
        // is told rather than stopped.
        Agreement::OtherSplit {
            at,
            part,
            shards,
            run,
        } => Ok(Some(format!(
            "{} (the tokenizer the token shards of {} were written with) and the run's \
             tokenizer, {}, give every token the same id but split text differently: from byte \
             {at} of a probe text, {part:?}, the shards' tokenizer gives {shards:?} and the \
             run's {run:?}; the model learns the shards' split and will be used with the \
             run's (encode the corpus again with the run's tokenizer for them to agree)",
            file.display(),
            corpus.display(),
            from.display()
        ))),
    }
}

/// How a run's tokenizer stands to the one a shard corpus was written with.
#[derive(Debug, PartialEq)]
enum Agreement {
    /// Every shard id is the same token to the run, and both split the probe alike.
    Same,
    /// Shard id `id` is token `shards` to the shards' tokenizer and `run` (none: no token)
    /// to the run's.
    OtherIds {
        id: u32,
        shards: String,
        run: Option<String>,
    },
    /// The ids agree, but the probe splits otherwise from byte `at` (`part` of it on): the
    /// next few tokens of each.
    OtherSplit {
        at: usize,
        part: String,
        shards: Vec<String>,
        run: Vec<String>,
    },
}

/// Token `id` of the run's tokenizer, as the vocabulary spells it; the byte tokenizer's are
/// named so that no vocabulary's spelling equals one.
fn run_token(tok: &Tokenizer, id: u32) -> Option<String> {
    match tok {
        Tokenizer::Hf { inner, .. } => inner.id_to_token(id),
        _ => match id {
            0..=255 => Some(format!("<byte {id:#04x}>")),
            _ if id == BYTE_EOS => Some("<byte-tokenizer EOS>".to_string()),
            _ if id == BYTE_PAD => Some("<byte-tokenizer PAD>".to_string()),
            _ => None,
        },
    }
}

/// Compares the shards' tokenizer `written` with the run's `tok`: first every id of
/// `written` (smallest first, so the error names the first that differs), then the split of
/// [`PROBE`] without the tokens only the run has (they cut the text where the shards'
/// tokenizer cannot, and no shard holds them).
fn compare(written: &tokenizers::Tokenizer, tok: &Tokenizer) -> Result<Agreement> {
    let mut ids: Vec<u32> = written.get_vocab(true).into_values().collect();
    ids.sort_unstable();
    ids.dedup();
    for &id in &ids {
        let Some(shards) = written.id_to_token(id) else {
            continue;
        };
        let run = run_token(tok, id);
        if run.as_deref() != Some(shards.as_str()) {
            return Ok(Agreement::OtherIds { id, shards, run });
        }
    }
    let mut probe = PROBE.to_string();
    if let Tokenizer::Hf { inner, .. } = tok {
        // By content, not id: a token the shards' tokenizer has under another id still splits.
        for added in inner.get_added_tokens_decoder().values() {
            if written.token_to_id(&added.content).is_none() && !added.content.is_empty() {
                probe = probe.replace(&added.content, "");
            }
        }
    }
    let enc = written
        .encode(probe.as_str(), false)
        .map_err(|e| anyhow::anyhow!("tokenizer failed to encode text: {e}"))?;
    let shards: Vec<(u32, Range<usize>)> = (enc.get_ids().iter())
        .zip(enc.get_offsets())
        .map(|(&id, &(a, b))| (id, a..b))
        .collect();
    let run = tok.encode_offsets(&probe)?;
    let Some(i) = (0..shards.len().max(run.len()))
        .find(|&i| shards.get(i).map(|t| t.0) != run.get(i).map(|t| t.0))
    else {
        return Ok(Agreement::Same);
    };
    let start = |t: Option<&(u32, Range<usize>)>| t.map_or(probe.len(), |t| t.1.start);
    let at = start(shards.get(i)).min(start(run.get(i)));
    // Whole characters: an offset can fall inside one a byte-level token cuts.
    let at = (0..=at)
        .rev()
        .find(|&b| probe.is_char_boundary(b))
        .unwrap_or(0);
    let part: String = probe[at..].chars().take(16).collect();
    let names = |ids: &[(u32, Range<usize>)]| -> Vec<String> {
        ids.iter()
            .skip(i)
            .take(4)
            .map(|(id, _)| {
                written
                    .id_to_token(*id)
                    .unwrap_or_else(|| format!("<id {id}>"))
            })
            .collect()
    };
    Ok(Agreement::OtherSplit {
        at,
        part,
        shards: names(&shards),
        run: names(&run),
    })
}

/// Writes `tokens` as a shard at `path`, atomically: a reader never sees half a shard.
pub fn write_shard(path: &Path, tokens: &[u32], width: Width) -> Result<()> {
    let ntok = i32::try_from(tokens.len()).map_err(|_| {
        anyhow::anyhow!(
            "{}: {} tokens, more than a shard holds (2^31 - 1)",
            path.display(),
            tokens.len()
        )
    })?;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + tokens.len() * width.bytes());
    let (magic, version) = width.header();
    for (i, v) in (0..256)
        .map(|i| match i {
            0 => magic,
            1 => version,
            2 => ntok,
            _ => 0,
        })
        .enumerate()
    {
        debug_assert_eq!(bytes.len(), 4 * i);
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    for &t in tokens {
        match width {
            Width::U16 => {
                let t = u16::try_from(t).map_err(|_| {
                    anyhow::anyhow!("{}: token {t} does not fit a u16 shard", path.display())
                })?;
                bytes.extend_from_slice(&t.to_le_bytes());
            }
            Width::U32 => bytes.extend_from_slice(&t.to_le_bytes()),
        }
    }
    crate::io::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err<T>(r: Result<T>) -> String {
        let e = format!("{:#}", r.err().expect("expected an error"));
        assert!(!e.contains('\n'), "multi-line error: {e}");
        e
    }

    fn read_all(s: &TokenStream, vocab: usize) -> Vec<u32> {
        let mut out = vec![];
        s.read(0, s.len(), vocab, &mut out).unwrap();
        out
    }

    #[test]
    fn shards_read_back_as_one_stream_across_their_boundaries() {
        let d = tempfile::tempdir().unwrap();
        let a: Vec<u32> = (0..37).map(|i| i * 1000).collect();
        let b: Vec<u32> = (0..5).map(|i| 65_535 - i).collect();
        let c: Vec<u32> = vec![70_000, 1, 2];
        write_shard(&d.path().join("x_train_000000.bin"), &a, Width::U16).unwrap();
        write_shard(&d.path().join("x_train_000001.bin"), &b, Width::U16).unwrap();
        write_shard(&d.path().join("x_train_000002.bin"), &c, Width::U32).unwrap();
        write_shard(&d.path().join("x_val_000000.bin"), &[7, 8, 9], Width::U16).unwrap();
        write_shard(&d.path().join("x_validation_1.bin"), &[10], Width::U16).unwrap();
        // A part that only begins as the split names do is no validation shard's mark.
        assert!(!is_val_shard(Path::new("x_train_valley.bin")));
        // An empty shard in the middle, and files that are no shards, change nothing.
        write_shard(&d.path().join("x_train_000001a.bin"), &[], Width::U32).unwrap();
        std::fs::write(d.path().join("notes.txt"), "not a shard").unwrap();
        std::fs::write(d.path().join("weights.bin"), [0u8; 2000]).unwrap();
        assert!(is_shard_corpus(d.path()));
        let (train, val) = open_corpus(d.path()).unwrap();
        let train = TokenStream::mapped(train);
        let all: Vec<u32> = [a.clone(), b.clone(), c.clone()].concat();
        assert_eq!(read_all(&train, 100_000), all);
        assert_eq!(
            read_all(&TokenStream::mapped(val.unwrap()), 11),
            vec![7, 8, 9, 10]
        );
        // A window over both boundaries, and a split inside a shard.
        let mut out = vec![];
        train.read(35, 9, 100_000, &mut out).unwrap();
        assert_eq!(out, all[35..44]);
        for cut in [40, 37, 42, 0, all.len()] {
            let (head, tail) = train.split_at(cut);
            assert_eq!(read_all(&head, 100_000), all[..cut], "cut {cut}");
            assert_eq!(read_all(&tail, 100_000), all[cut..], "cut {cut}");
        }
        // A token the model's vocabulary does not have names its shard and index.
        let e = err(train.read(0, all.len(), 65_536, &mut vec![]));
        assert!(e.contains("x_train_000002.bin: token 0 is 70000"), "{e}");
        // The whole stream is checked before any read; a split past the id passes.
        let all_of = usize::MAX;
        assert_eq!(err(train.check_ids(65_536, all_of)), e);
        let e = err(train.check_ids(36_000, all_of));
        assert!(e.contains("x_train_000000.bin: token 36 is 36000"), "{e}");
        let e = err(train.check_ids(36_001, all_of));
        assert!(e.contains("x_train_000001.bin: token 0 is 65535"), "{e}");
        train.check_ids(70_001, all_of).unwrap();
        let (head, tail) = train.split_at(42);
        head.check_ids(65_536, all_of).unwrap();
        // Only the first `limit` tokens are scanned.
        train.check_ids(65_536, 42).unwrap();
        assert!(err(tail.check_ids(65_536, 1)).contains("x_train_000002.bin: token 0"));
        // A u16 shard refuses an id it cannot hold.
        let e = err(write_shard(
            &d.path().join("big.bin"),
            &[70_000],
            Width::U16,
        ));
        assert!(e.contains("big.bin") && e.contains("70000"), "{e}");
        assert!(!d.path().join("big.bin").exists());
    }

    /// Shards keep the tokenizer they were encoded with beside them. A run tokenizer in
    /// which a shard id stands for another token (other special tokens, another vocabulary,
    /// the byte tokenizer) is refused in one line naming both files and the first id that
    /// differs; the same tokenizer from a file formatted otherwise, one that only adds tokens,
    /// one whose EOS no built-in name finds and a text corpus pass; the same ids splitting text
    /// otherwise, a file beside the shards that is no tokenizer, or shards with no tokenizer.json
    /// (nor a byte tokenizer's mark), pass with a warning naming the files.
    #[test]
    fn shards_refuse_a_run_whose_tokenizer_is_not_theirs() {
        use crate::data::encode::{encode_corpus, EncodeOpts};
        let d = tempfile::tempdir().unwrap();
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let gpt2 = fixtures.join("hf/gpt2/tokenizer.json");
        let tok = Tokenizer::from_file(&gpt2).unwrap();
        let corpus = d.path().join("corpus.txt");
        std::fs::write(
            &corpus,
            "the quick brown fox jumps over the lazy dog\n".repeat(20),
        )
        .unwrap();
        let shards = d.path().join("shards");
        let opts = EncodeOpts {
            tok: &tok,
            tokenizer_file: Some(&gpt2),
            out: &shards,
            shard_tokens: 1000,
            val_fraction: 0.0,
            column: "text",
            part: crate::data::splits::Part::train(),
            seed: 0,
        };
        encode_corpus(&corpus, &opts).unwrap();
        let beside = shards.join(FILE_NAME).display().to_string();
        let passes = |other: &Tokenizer, from: &Path| {
            let w = check_corpus_tokenizer(&shards, other, from).unwrap();
            assert_eq!(w, None, "{}", from.display());
        };
        passes(&tok, &gpt2);
        let w = check_corpus_tokenizer(&shards.join("train_000000.bin"), &tok, &gpt2).unwrap();
        assert_eq!(w, None);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&gpt2).unwrap()).unwrap();
        let write = |name: &str, json: &serde_json::Value| {
            let p = d.path().join(name);
            std::fs::write(&p, serde_json::to_string(json).unwrap()).unwrap();
            p
        };
        let load = |p: &Path| Tokenizer::from_file(p).unwrap();
        // Compact, its keys in reverse order: the same tokenizer.
        let reversed: serde_json::Map<String, serde_json::Value> = (json.as_object().unwrap())
            .iter()
            .rev()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let at = write("compact.json", &reversed.into());
        assert_ne!(std::fs::read(&at).unwrap(), std::fs::read(&gpt2).unwrap());
        passes(&load(&at), &at);
        // Chat tokens added after the vocabulary: every shard id keeps its token. `[INST]` is
        // in the probe, which the shards' tokenizer splits into pieces.
        let mut added = json.clone();
        let tokens = added["added_tokens"].as_array_mut().unwrap();
        for (id, content) in [(301, "[INST]"), (302, "<|im_start|>")] {
            let mut t = tokens[0].clone();
            t["id"] = id.into();
            t["content"] = content.into();
            tokens.push(t);
        }
        let at = write("added.json", &added);
        assert!(load(&at).encode("[INST]").unwrap() == vec![301]);
        passes(&load(&at), &at);
        // Refused naming both files, the first id that differs and its token on each side.
        let refused = |other: &Tokenizer, from: &Path, named: &Path, differs: &str| {
            let e = err(check_corpus_tokenizer(&shards, other, from));
            let named = named.display().to_string();
            assert!(
                e.contains(&beside) && e.contains(&named) && e.contains(differs),
                "{e}"
            );
            assert!(!e.contains("bpe(vocab="), "{e}");
        };
        // Llama's specials where GPT-2 has <|endoftext|>, its vocabulary otherwise the same.
        let llama = fixtures.join("hf/llama");
        refused(
            &load(&llama.join(FILE_NAME)),
            &llama,
            &llama.join(FILE_NAME),
            "id 300 is \"<|endoftext|>\" in the shards' and \"<|begin_of_text|>\" in the run's",
        );
        let metaspace = fixtures.join("sentencepiece/metaspace/tokenizer.json");
        refused(&load(&metaspace), &metaspace, &metaspace, "id 0 is \"!\"");
        // The byte tokenizer, as an --init model trained on byte shards has it.
        let run = d.path().join("byte-run");
        std::fs::create_dir(&run).unwrap();
        refused(
            &Tokenizer::bytes(),
            &run,
            &run,
            "\"<byte 0x00>\" in the run's",
        );
        // Past the shards' vocabulary: no token.
        let mut fewer = json.clone();
        fewer["added_tokens"] = serde_json::json!([]);
        let at = write("fewer.json", &fewer);
        let mut named = load(&gpt2);
        if let Tokenizer::Hf { inner, .. } = &mut named {
            *inner = std::sync::Arc::new(std::fs::read_to_string(&at).unwrap().parse().unwrap());
        }
        refused(&named, &at, &at, "and no token in the run's");
        // The same vocabulary without its merges: every word cut into letters.
        let warned = |other: &Tokenizer, from: &Path, split: &str| {
            let w = check_corpus_tokenizer(&shards, other, from).unwrap();
            let w = w.expect("a warning");
            let from = from.display().to_string();
            assert!(
                w.contains(&beside)
                    && w.contains(&from)
                    && w.contains("same id but split text differently")
                    && w.contains(split)
                    && !w.contains('\n'),
                "{w}"
            );
        };
        let mut unmerged = json.clone();
        unmerged["model"]["merges"] = serde_json::json!([]);
        let at = write("unmerged.json", &unmerged);
        assert!(load(&at).same_vocabulary(&tok));
        warned(
            &load(&at),
            &at,
            "from byte 0 of a probe text, \"The quick brown ",
        );
        // Nothing to compare with.
        let w = check_corpus_tokenizer(&corpus, &Tokenizer::bytes(), &run).unwrap();
        assert_eq!(w, None);
        // A file beside the shards that is no tokenizer costs the check, not the run.
        std::fs::write(shards.join(FILE_NAME), "{").unwrap();
        let w = check_corpus_tokenizer(&shards, &Tokenizer::bytes(), &run).unwrap();
        let w = w.expect("a warning");
        assert!(
            w.contains(&beside) && w.contains("not a tokenizer.json"),
            "{w}"
        );
        // Nothing beside the shards (llm.c's): nothing to check against, and the run is told.
        std::fs::remove_file(shards.join(FILE_NAME)).unwrap();
        let w = check_corpus_tokenizer(&shards, &Tokenizer::bytes(), &run).unwrap();
        let w = w.expect("a warning");
        assert!(
            w.contains(&shards.display().to_string()) && w.contains("is not checked"),
            "{w}"
        );

        // SentencePiece's two ways to put `▁` before words: the same vocabulary and ids, a
        // space after a special token split otherwise. One line saying so, not "other text".
        let sp = d.path().join("sp");
        std::fs::create_dir(&sp).unwrap();
        write_shard(&sp.join("train_000000.bin"), &[3, 4, 5], Width::U16).unwrap();
        let legacy = fixtures.join("sentencepiece/legacy/tokenizer.json");
        std::fs::copy(&legacy, sp.join(FILE_NAME)).unwrap();
        let w = check_corpus_tokenizer(&sp, &load(&metaspace), &metaspace).unwrap();
        let w = w.expect("a warning");
        let (sp_beside, m) = (sp.join(FILE_NAME), metaspace.display().to_string());
        assert!(
            w.contains(&sp_beside.display().to_string())
                && w.contains(&m)
                && w.contains("same id but split text differently"),
            "{w}"
        );

        // An EOS only a model's tokenizer_config.json names (DeepSeek's spelling): the
        // shards' tokenizer.json is compared as it is, with no EOS to find.
        let mut eot = json.clone();
        eot["added_tokens"][0]["content"] = "<|EOT|>".into();
        let model = d.path().join("model");
        std::fs::create_dir(&model).unwrap();
        let eot_file = model.join(FILE_NAME);
        std::fs::write(&eot_file, serde_json::to_string(&eot).unwrap()).unwrap();
        std::fs::write(
            model.join("tokenizer_config.json"),
            r#"{"eos_token": "<|EOT|>"}"#,
        )
        .unwrap();
        assert!(Tokenizer::from_file(&eot_file).is_err());
        let eot_tok = Tokenizer::load_dir(&model).unwrap();
        std::fs::copy(&eot_file, shards.join(FILE_NAME)).unwrap();
        passes(&eot_tok, &model);
    }

    /// Shards of the byte tokenizer are marked as such ([`BYTES_MARKER`], as it has no
    /// tokenizer.json): a run of another tokenizer over them is refused in one line naming
    /// the corpus, a byte-level one (with a chat template or without) passes, and a byte-level
    /// run over shards of another tokenizer is refused as before. Shards from before the mark
    /// (nothing beside them) train with a warning that nothing was checked; shards with both
    /// files are refused, and an encode into a directory holding the other's file too.
    #[test]
    fn byte_shards_refuse_another_tokenizer_and_another_tokenizers_shards_refuse_bytes() {
        use crate::data::encode::{encode_corpus, EncodeOpts};
        let d = tempfile::tempdir().unwrap();
        let gpt2 = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/gpt2");
        let gpt2_file = gpt2.join(FILE_NAME);
        let bpe = Tokenizer::from_file(&gpt2_file).unwrap();
        let corpus = d.path().join("docs.jsonl");
        std::fs::write(&corpus, "{\"text\": \"the quick brown fox\"}\n".repeat(20)).unwrap();
        let encode = |tok: &Tokenizer, file: Option<&Path>, out: &Path| {
            let opts = EncodeOpts {
                tok,
                tokenizer_file: file,
                out,
                shard_tokens: 100,
                val_fraction: 0.0,
                column: "text",
                part: crate::data::splits::Part::train(),
                seed: 0,
            };
            encode_corpus(&corpus, &opts)
        };
        let bytes = d.path().join("sh3");
        encode(&Tokenizer::bytes(), None, &bytes).unwrap();
        let marker = bytes.join(BYTES_MARKER);
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), BYTES_MARKER_TEXT);
        assert!(!bytes.join(FILE_NAME).exists());
        assert_eq!(corpus_bytes_marker(&bytes), Some(marker.clone()));

        let run = d.path().join("byte-run");
        std::fs::create_dir(&run).unwrap();
        let templated = Tokenizer::bytes().with_chat_template(Some("{{ messages }}"), None);
        for tok in [Tokenizer::bytes(), templated] {
            assert_eq!(check_corpus_tokenizer(&bytes, &tok, &run).unwrap(), None);
        }
        let dir = bytes.display().to_string();
        for (corpus, from) in [
            (bytes.clone(), gpt2_file.clone()),
            (bytes.join("train_000000.bin"), gpt2.clone()),
        ] {
            let e = err(check_corpus_tokenizer(&corpus, &bpe, &from));
            assert!(
                e.contains(&dir)
                    && e.contains("byte-level tokenizer")
                    && e.contains(&gpt2_file.display().to_string()),
                "{e}"
            );
        }

        // A byte-level run over the shards of another tokenizer.
        let shards = d.path().join("bpe");
        encode(&bpe, Some(&gpt2_file), &shards).unwrap();
        assert!(shards.join(FILE_NAME).is_file() && !shards.join(BYTES_MARKER).exists());
        let e = err(check_corpus_tokenizer(&shards, &Tokenizer::bytes(), &run));
        assert!(
            e.contains(&shards.display().to_string()) && e.contains("<byte 0x00>"),
            "{e}"
        );

        // Both files: which one wrote the shards is unknown.
        std::fs::copy(&marker, shards.join(BYTES_MARKER)).unwrap();
        for tok in [&bpe, &Tokenizer::bytes()] {
            let e = err(check_corpus_tokenizer(&shards, tok, &gpt2_file));
            assert!(e.contains(BYTES_MARKER) && e.contains("unknown"), "{e}");
        }

        // Shards from before the mark: unchecked, with a warning naming them.
        std::fs::remove_file(&marker).unwrap();
        for tok in [&bpe, &Tokenizer::bytes()] {
            let w = check_corpus_tokenizer(&bytes, tok, &gpt2_file).unwrap();
            let w = w.expect("a warning");
            assert!(
                w.contains(&dir) && w.contains("is not checked") && !w.contains('\n'),
                "{w}"
            );
        }

        // An encode leaves no other tokenizer's file beside its shards.
        for (tok, file, left) in [
            (&Tokenizer::bytes(), None, FILE_NAME),
            (&bpe, Some(gpt2_file.as_path()), BYTES_MARKER),
        ] {
            let out = d.path().join(format!("left-{left}"));
            std::fs::create_dir(&out).unwrap();
            std::fs::write(out.join(left), "{}").unwrap();
            let e = err(encode(tok, file, &out));
            assert!(e.contains(left) && e.contains("empty directory"), "{e}");
            assert!(!is_shard_corpus(&out));
        }
    }

    #[test]
    fn a_bad_shard_fails_naming_the_file_and_the_header_field() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.bin");
        write_shard(&p, &[1, 2, 3, 4], Width::U16).unwrap();
        let good = std::fs::read(&p).unwrap();
        let cases: [(&str, Vec<u8>); 4] = [
            ("magic", [&[1u8, 2, 3, 4][..], &good[4..]].concat()),
            (
                "version",
                [&good[..4], &[2u8, 0, 0, 0][..], &good[8..]].concat(),
            ),
            ("ntok", good[..good.len() - 2].to_vec()),
            ("header", good[..100].to_vec()),
        ];
        for (field, bytes) in cases {
            std::fs::write(&p, bytes).unwrap();
            let e = err(Shards::open(std::slice::from_ref(&p)));
            assert!(e.contains("s.bin") && e.contains(field), "{field}: {e}");
        }
        // Validation shards alone are no training corpus.
        let v = d.path().join("only");
        std::fs::create_dir(&v).unwrap();
        write_shard(&v.join("val_000000.bin"), &[1], Width::U16).unwrap();
        let e = err(open_corpus(&v));
        assert!(e.contains("no training shard"), "{e}");
    }
}
