//! Pre-tokenized pretraining corpora: token shards in llm.c's `.bin` layout, memory-mapped.
//!
//! A shard is a header of 256 little-endian i32 (a magic number that names the token width,
//! a version, the token count) followed by the tokens: u16 under magic 20240520 (version 1,
//! llm.c's GPT-2 shards) or u32 under magic 20240801 (version 7, its Llama 3 shards). So the
//! shards llm.c's scripts write (FineWeb, TinyStories, ...) train temper as they are, and
//! `temper tokenizer encode` writes the same files from text. A corpus is a shard file, or a
//! directory holding shards (`.bin` files that start with a shard's magic number; other files
//! there, a README or a stray `.bin`, are left alone): those whose name has a `_`-separated
//! part `val` (`fineweb_val_000000.bin`, `val_000000.bin`) are the validation split, the others
//! the training split, each read in name order as one stream. Nothing is read ahead: a run starts at once whatever the corpus
//! size, and a batch copies its windows out of the page cache.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use memmap2::Mmap;

use super::tokenizer::{Tokenizer, FILE_NAME};

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
            .collect::<Result<Vec<_>>>()?;
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

/// Whether a shard file belongs to the validation split.
fn is_val_shard(p: &Path) -> bool {
    p.file_stem()
        .is_some_and(|s| s.to_string_lossy().split('_').any(|part| part == "val"))
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
            "{}: no training shard (every .bin there is a validation shard: its name has a part `val`)",
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

/// The tokenizer.json beside a shard corpus (in its directory, or beside a shard file), which
/// `temper tokenizer encode` copies there: the tokenizer whose ids the shards hold.
pub fn corpus_tokenizer_file(corpus: &Path) -> Option<PathBuf> {
    let dir = match corpus.is_dir() {
        true => Some(corpus),
        false => corpus.parent(),
    };
    dir.map(|d| d.join(FILE_NAME)).filter(|p| p.is_file())
}

/// Text encoded by both tokenizers: a vocabulary alike with other merges, normalizer or
/// pre-tokenizer cuts text otherwise, which the ids of this (cases, digits, punctuation,
/// runs of spaces, newlines and tabs, accents, CJK, an emoji) show.
const PROBE: &str = "The quick brown fox, 1234567890 -- jumped!  Over\tthe lazy dog's\n\n\
    \"naïve café\" (Ünïcödé) 東京 🙂 <|endoftext|> </s> [INST] x=y+1; print(a[0])\r\n  end.";

/// Refuses a run whose tokenizer `tok` (read from `from`: a tokenizer.json, or the directory
/// of a model whose tokenizer it is) is not the tokenizer a shard corpus was written with,
/// where its tokenizer.json is beside it: the ids would stand for other text. Tokenizers
/// agree where they map every token to the same id (special tokens included) and cut the
/// probe text alike; how their files are formatted does not matter. A text corpus, or
/// shards with no tokenizer.json (llm.c's, or encoded with the byte tokenizer), pass.
pub fn check_corpus_tokenizer(corpus: &Path, tok: &Tokenizer, from: &Path) -> Result<()> {
    if !is_shard_corpus(corpus) {
        return Ok(());
    }
    let Some(file) = corpus_tokenizer_file(corpus) else {
        return Ok(());
    };
    let written = Tokenizer::from_file(&file)?;
    if same_tokenizer(&written, tok)? {
        return Ok(());
    }
    let from = match from.join(FILE_NAME) {
        inside if from.is_dir() && inside.is_file() => inside,
        _ => from.to_path_buf(),
    };
    bail!(
        "{}: the token shards of {} were written with this tokenizer ({}), and the run's \
         tokenizer, from {} ({}), is another, whose ids stand for other text: encode the corpus \
         again with the run's tokenizer (temper tokenizer encode --tokenizer), or train from \
         scratch with the shards' (--tokenizer {})",
        file.display(),
        corpus.display(),
        written.describe(),
        from.display(),
        tok.describe(),
        file.display()
    )
}

/// Whether `a` and `b` give every token the same id and cut [`PROBE`] alike.
fn same_tokenizer(a: &Tokenizer, b: &Tokenizer) -> Result<bool> {
    Ok(a.same_vocabulary(b) && a.encode(PROBE)? == b.encode(PROBE)?)
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
            read_all(&TokenStream::mapped(val.unwrap()), 10),
            vec![7, 8, 9]
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
        // A u16 shard refuses an id it cannot hold.
        let e = err(write_shard(
            &d.path().join("big.bin"),
            &[70_000],
            Width::U16,
        ));
        assert!(e.contains("big.bin") && e.contains("70000"), "{e}");
        assert!(!d.path().join("big.bin").exists());
    }

    /// Shards keep the tokenizer they were encoded with beside them. A run whose tokenizer is
    /// another (other special tokens, another vocabulary, the byte tokenizer, the same
    /// vocabulary cutting text otherwise) is refused in one line naming both files; the same
    /// tokenizer from a file formatted otherwise, a text corpus, and shards with no
    /// tokenizer.json pass.
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
            seed: 0,
        };
        encode_corpus(&corpus, &opts).unwrap();
        let beside = shards.join(FILE_NAME).display().to_string();
        check_corpus_tokenizer(&shards, &tok, &gpt2).unwrap();
        check_corpus_tokenizer(&shards.join("train_000000.bin"), &tok, &gpt2).unwrap();
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&gpt2).unwrap()).unwrap();
        let write = |name: &str, json: &serde_json::Value| {
            let p = d.path().join(name);
            std::fs::write(&p, serde_json::to_string(json).unwrap()).unwrap();
            (Tokenizer::from_file(&p).unwrap(), p)
        };
        // Compact, its keys in reverse order: the same tokenizer.
        let reversed: serde_json::Map<String, serde_json::Value> = (json.as_object().unwrap())
            .iter()
            .rev()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let (compact, at) = write("compact.json", &reversed.into());
        assert_ne!(std::fs::read(&at).unwrap(), std::fs::read(&gpt2).unwrap());
        check_corpus_tokenizer(&shards, &compact, &at).unwrap();
        let refused = |other: &Tokenizer, from: &Path, named: &Path| {
            let e = err(check_corpus_tokenizer(&shards, other, from));
            let named = named.display().to_string();
            assert!(e.contains(&beside) && e.contains(&named), "{e}");
        };
        // Llama's specials where GPT-2 has <|endoftext|>: id 300 stands for another token.
        let llama = fixtures.join("hf/llama");
        let llama_tok = Tokenizer::from_file(&llama.join(FILE_NAME)).unwrap();
        refused(&llama_tok, &llama, &llama.join(FILE_NAME));
        let metaspace = fixtures.join("sentencepiece/metaspace/tokenizer.json");
        refused(
            &Tokenizer::from_file(&metaspace).unwrap(),
            &metaspace,
            &metaspace,
        );
        let run = d.path().join("byte-run");
        refused(&Tokenizer::bytes(), &run, &run);
        // The same vocabulary without its merges: every word cut into letters.
        json["model"]["merges"] = serde_json::json!([]);
        let (unmerged, at) = write("unmerged.json", &json);
        assert!(unmerged.same_vocabulary(&tok));
        refused(&unmerged, &at, &at);
        // Nothing to compare with.
        check_corpus_tokenizer(&corpus, &Tokenizer::bytes(), &run).unwrap();
        std::fs::remove_file(shards.join(FILE_NAME)).unwrap();
        check_corpus_tokenizer(&shards, &Tokenizer::bytes(), &run).unwrap();
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
