//! Documents tokenized on every core, a long one in pieces.
//!
//! A Hugging Face tokenizer holds about 200 bytes of bookkeeping per byte of a text it
//! encodes in one call (the normalized string's alignments and its pre-tokens), on one core: a
//! 21 MB text file took 4.4 GB and 18 s, and a 1 GB one would not fit. So a long document is
//! cut into pieces of about [`PIECE_BYTES`], encoded apart on every core and joined. A cut
//! goes into a run of whitespace that breaks a line, at its end or before its last character,
//! where the pre-tokenizers of Llama 3 and GPT-2 (and their kin) end a pre-token; and it is
//! kept only where the tokenizer agrees, checked on the text around it ([`agrees_at`]): its
//! own pre-tokens of the stretch meet at the cut, whole ones each side, and the two sides' ids
//! joined are the ids of the whole stretch. A tokenizer that reads the start of a text apart
//! (SentencePiece's prepended `▁`), or has no pre-tokenizer, is never cut and encodes a
//! document in one call, as before.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result};

use super::tokenizer::Tokenizer;

/// About how much text is encoded in one call.
pub const PIECE_BYTES: usize = 256 << 10;

/// Text on each side of a cut encoded to check it.
const CHECK_BYTES: usize = 1 << 10;

/// Each document's ids, followed by EOS, each opened as the tokenizer opens a text (Llama's
/// BOS): what pretraining packs and `tokenizer encode` writes. The ids are those of encoding
/// each document in one call; the work is spread over every core.
pub fn document_ids(docs: &[String], tok: &Tokenizer) -> Result<Vec<Vec<u32>>> {
    ids_in_pieces(docs, tok, (PIECE_BYTES, CHECK_BYTES))
}

/// [`document_ids`] with pieces of about `piece` bytes, each cut checked on `check` bytes of
/// text each side.
fn ids_in_pieces(
    docs: &[String],
    tok: &Tokenizer,
    (piece, check): (usize, usize),
) -> Result<Vec<Vec<u32>>> {
    // The cuts of every document first (a few small encodes each), then every piece of every
    // document, each taken by the next free core.
    let cuts = on_every_core(docs.len(), |i| cuts(tok, &docs[i], (piece, check)))?;
    let pieces: Vec<(usize, &str)> = (docs.iter().zip(&cuts).enumerate())
        .flat_map(|(i, (d, c))| c.windows(2).map(move |w| (i, &d[w[0]..w[1]])))
        .collect();
    let progress = Progress::new(pieces.iter().map(|(_, t)| t.len()).sum());
    let ids = on_every_core(pieces.len(), |p| {
        let (doc, text) = pieces[p];
        let ids = tok
            .encode(text)
            .with_context(|| format!("document {}", doc + 1));
        progress.add(text.len());
        ids
    })?;
    let eos = tok.eos_id();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); docs.len()];
    for ((doc, _), ids) in pieces.iter().zip(ids) {
        out[*doc].extend_from_slice(&ids);
    }
    for ids in &mut out {
        let open = tok.opening_before(ids).to_vec();
        ids.splice(0..0, open);
        ids.push(eos);
    }
    Ok(out)
}

/// A line every [`Progress::EVERY_S`] seconds while a large text is tokenized.
struct Progress {
    total: usize,
    done: AtomicUsize,
    start: Instant,
    next_s: Mutex<f64>,
}

impl Progress {
    const EVERY_S: f64 = 10.0;
    /// Less text than this takes seconds: no lines.
    const FROM_BYTES: usize = 32 << 20;

    fn new(total: usize) -> Self {
        Progress {
            total,
            done: AtomicUsize::new(0),
            start: Instant::now(),
            next_s: Mutex::new(Self::EVERY_S),
        }
    }

    fn add(&self, bytes: usize) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if self.total < Self::FROM_BYTES || done == self.total {
            return;
        }
        let secs = self.start.elapsed().as_secs_f64();
        let Ok(mut next) = self.next_s.try_lock() else {
            return;
        };
        if secs < *next {
            return;
        }
        *next = secs + Self::EVERY_S;
        let rate = done as f64 / secs;
        crate::warnln!(
            "[tokenize] {} of {} MB ({:.1} MB/s, about {:.0} s left)",
            done >> 20,
            self.total >> 20,
            rate / 1e6,
            (self.total - done) as f64 / rate
        );
    }
}

/// Where `text` is cut, as byte offsets from 0 to its length: a piece between each two.
fn cuts(tok: &Tokenizer, text: &str, (piece, check): (usize, usize)) -> Result<Vec<usize>> {
    let mut cuts = vec![0];
    // The byte tokenizer's ids are the bytes: nothing to bound.
    if !tok.is_bytes() {
        // The added tokens' texts, read once a document, when a first cut is tried.
        let added = std::cell::OnceCell::new();
        let mut from = piece;
        'pieces: while from < text.len() {
            let tries = candidates(text, from, TRIES);
            for &at in &tries {
                if text.len() - at < piece / 2 {
                    break 'pieces;
                }
                let added = added.get_or_init(|| tok.added_texts());
                if agrees_at(tok, added, text, at, check)? {
                    cuts.push(at);
                    from = at + piece;
                    continue 'pieces;
                }
            }
            // Refused cuts are not retried line by line: a tokenizer that refuses a few
            // refuses most, and each try costs three encodes.
            match tries.last() {
                Some(&at) => from = at + piece,
                None => break,
            }
        }
    }
    cuts.push(text.len());
    Ok(cuts)
}

/// Cuts tried before the search moves on a piece.
const TRIES: usize = 4;

/// Up to `n` places at or after `from` to cut, in order: around each run of whitespace that
/// holds a line break and lies between two other characters, the run's end (where Llama 3's
/// pre-tokenizer ends a pre-token) and the place before its last character (where GPT-2's
/// does: it gives a run's last character to what follows, but a text's trailing run ends
/// whole).
fn candidates(text: &str, from: usize, n: usize) -> Vec<usize> {
    let from = floor_boundary(text, from.min(text.len()));
    let mut found = Vec::new();
    // The run being read: whether it breaks a line, and where its last character starts.
    let mut run: Option<(bool, usize)> = None;
    let mut seen_text = false;
    for (i, c) in text[from..].char_indices() {
        let i = i + from;
        if c.is_whitespace() {
            if seen_text {
                let breaks = run.is_some_and(|(b, _)| b);
                run = Some((breaks || c == '\n', i));
            }
            continue;
        }
        if let Some((true, last)) = run {
            for at in [last, i] {
                if found.len() < n {
                    found.push(at);
                }
            }
            if found.len() >= n {
                break;
            }
        }
        run = None;
        seen_text = true;
    }
    found
}

/// `text` in pieces of about `piece` bytes, each cut where GPT-2's pre-tokenizer splits the
/// text alike whole and cut (before the last character of a run of whitespace that breaks a
/// line: [`candidates`]), so that a byte-level BPE trained on the pieces counts the words a
/// whole text gives, without holding the whole text's pre-tokenization.
pub(crate) fn gpt2_pieces(text: &str, piece: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0usize;
    while let Some(&at) = candidates(text, start.saturating_add(piece), 1).first() {
        if text.len() - at < piece / 2 {
            break;
        }
        pieces.push(&text[start..at]);
        start = at;
    }
    pieces.push(&text[start..]);
    pieces
}

/// Whether `text` may be cut at `at`: the tokenizer's pre-tokens of the `check` bytes each
/// side meet there, with a whole one before and after the two that meet (so that where the
/// stretch starts and ends moves no pre-token at the cut: a run of 2,000 newlines is one
/// pre-token to Llama 3, whose ids a cut inside it would change), and the ids of the stretch
/// are those of its two sides encoded apart (which added tokens and the model decide), and no
/// text of an added token (`added`) holds the cut. A tokenizer without a pre-tokenizer reads
/// the whole text as one pre-token: never cut.
fn agrees_at(
    tok: &Tokenizer,
    added: &[String],
    text: &str,
    at: usize,
    check: usize,
) -> Result<bool> {
    let start = floor_boundary(text, at.saturating_sub(check));
    let end = floor_boundary(text, (at + check).min(text.len()));
    let Some(spans) = tok.pre_token_spans(&text[start..end])? else {
        return Ok(false);
    };
    // The tokenizer finds its added tokens before it pre-tokenizes, scanning from the text's
    // start: one whose text straddles the cut would be split by it.
    if added.iter().any(|t| straddles(text, at, t)) {
        return Ok(false);
    }
    let cut = at - start;
    if spans.iter().any(|s| s.start < cut && cut < s.end) {
        return Ok(false);
    }
    let before = spans.iter().filter(|s| s.end <= cut).count();
    let after = spans.iter().filter(|s| s.start >= cut).count();
    if before < 2 || after < 2 {
        return Ok(false);
    }
    let whole = tok.encode(&text[start..end])?;
    let left = tok.encode(&text[start..at])?;
    let right = tok.encode(&text[at..end])?;
    Ok(whole.len() == left.len() + right.len()
        && whole[..left.len()] == left[..]
        && whole[left.len()..] == right[..])
}

/// Whether an occurrence of `token` in `text` holds the offset `at` inside it.
fn straddles(text: &str, at: usize, token: &str) -> bool {
    if token.len() < 2 {
        return false;
    }
    let from = floor_boundary(text, at.saturating_sub(token.len() - 1));
    let to = floor_boundary(text, (at + token.len() - 1).min(text.len()));
    text[from..to]
        .match_indices(token)
        .any(|(i, _)| from + i < at && at < from + i + token.len())
}

fn floor_boundary(text: &str, mut i: usize) -> usize {
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// `job(0..n)`, each index taken by the next free core, the results in index order; the
/// first failure (by index) is returned.
fn on_every_core<T: Send>(n: usize, job: impl Fn(usize) -> Result<T> + Sync) -> Result<Vec<T>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(n);
    if threads <= 1 {
        return (0..n).map(job).collect();
    }
    let next = AtomicUsize::new(0);
    let done: Vec<Vec<(usize, Result<T>)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return done;
                        }
                        done.push((i, job(i)));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a tokenizing thread panicked"))
            .collect()
    });
    let mut slots: Vec<Option<Result<T>>> = (0..n).map(|_| None).collect();
    for (i, r) in done.into_iter().flatten() {
        slots[i] = Some(r);
    }
    slots
        .into_iter()
        .map(|r| r.expect("every index taken"))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::data::corpus::Part;
    use crate::data::tokenizer::train_bpe;

    fn fixture(dir: &str) -> Tokenizer {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        Tokenizer::from_file(&root.join(dir).join("tokenizer.json")).unwrap()
    }

    /// Lines of varied text: words, numbers, punctuation, blank lines, indents, non-ASCII.
    fn text(lines: usize) -> String {
        let mut rng = crate::train::rng::Rng::new(7);
        let words = [
            "the",
            "king",
            " said",
            "42",
            "1234567",
            "ünïcödé",
            "—",
            "'s",
            "don't",
            "  ",
            "\t",
            "x.y",
            "!!",
            "日本",
            "a",
        ];
        let mut s = String::new();
        for line in 0..lines {
            for _ in 0..rng.below(12) {
                s.push_str(words[rng.below(words.len())]);
                s.push(' ');
            }
            s.push('\n');
            if line % 7 == 0 {
                s.push_str("\n\n");
            }
            if line % 5 == 0 {
                s.push_str("    ");
            }
        }
        s
    }

    fn whole(tok: &Tokenizer, doc: &str) -> Vec<u32> {
        let mut ids = tok.encode_start(doc).unwrap();
        ids.push(tok.eos_id());
        ids
    }

    /// The byte tokenizer's tokenizer.json, to vary.
    fn byte_level() -> serde_json::Value {
        serde_json::from_str(&crate::data::tokenizer::byte_level_json().unwrap()).unwrap()
    }

    /// The tokenizer `json` describes.
    fn tokenizer_of(json: &serde_json::Value) -> Tokenizer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, json.to_string()).unwrap();
        Tokenizer::from_file(&path).unwrap()
    }

    /// Llama 3's pre-tokenizer: a Split on its regex, then byte level.
    fn llama3_pre_tokenizer() -> serde_json::Value {
        serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex":
                "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
             "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
             "use_regex": false}]})
    }

    /// A byte-level BPE trained on [`text`], and the same with Llama 3's pre-tokenizer (a
    /// Split on its regex, then byte level) in place of GPT-2's.
    fn trained_bpe() -> (Tokenizer, Tokenizer) {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("c.txt");
        std::fs::write(&corpus, text(400)).unwrap();
        let path = dir.path().join("tokenizer.json");
        let gpt2 = train_bpe(&[corpus], ("text", Part::train()), 400, &path).unwrap();
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        json["pre_tokenizer"] = llama3_pre_tokenizer();
        std::fs::write(&path, json.to_string()).unwrap();
        (gpt2, Tokenizer::from_file(&path).unwrap())
    }

    #[test]
    fn pieces_join_to_the_whole_documents_ids() {
        // Paragraphs apart by blank lines: GPT-2 and Llama 3 each split the run between
        // them where the other does not.
        let paragraphs = "The king said: 42 words, and more.\n\n".repeat(60);
        let docs = vec![text(300), "short".to_string(), paragraphs, text(120)];
        let (gpt2, llama3) = trained_bpe();
        for (name, tok) in [
            ("gpt2 pre-tokenizer", gpt2),
            ("llama 3 pre-tokenizer", llama3),
            ("gpt2 fixture", fixture("hf/gpt2")),
            ("llama fixture", fixture("hf/llama")),
        ] {
            for doc in [&docs[0], &docs[2]] {
                let made = cuts(&tok, doc, (200, 64)).unwrap();
                assert!(made.len() > 8, "{name}: cuts {made:?}");
            }
            let ids = ids_in_pieces(&docs, &tok, (200, 64)).unwrap();
            for (d, ids) in docs.iter().zip(&ids) {
                assert_eq!(ids, &whole(&tok, d), "{name}");
            }
        }
    }

    /// SentencePiece's `▁` before a text's first word would be written at every cut: each is
    /// refused, and a document is encoded whole.
    #[test]
    fn a_tokenizer_that_reads_a_texts_start_apart_is_not_cut() {
        let doc = "hi ok\n[INST] hi\nok hi\n".repeat(40);
        for dir in ["sentencepiece/metaspace", "sentencepiece/legacy"] {
            let tok = fixture(dir);
            assert_eq!(cuts(&tok, &doc, (50, 20)).unwrap(), vec![0, doc.len()]);
            let ids = ids_in_pieces(std::slice::from_ref(&doc), &tok, (50, 20)).unwrap();
            assert_eq!(ids[0], whole(&tok, &doc), "{dir}");
        }
    }

    /// A pre-token longer than the stretch checked around a cut (a run of newlines, one
    /// pre-token to Llama 3, whose pairs a merge joins) is never cut: a stretch that starts
    /// inside it agrees with the cut's two sides where the whole document does not.
    #[test]
    fn a_pre_token_longer_than_the_check_is_not_cut() {
        let mut json = byte_level();
        json["pre_tokenizer"] = llama3_pre_tokenizer();
        json["model"]["vocab"]["ĊĊ"] = 258.into();
        json["model"]["merges"] = serde_json::json!(["Ċ Ċ"]);
        let tok = tokenizer_of(&json);
        // The search reaches the run from the words before it, and first tries the place
        // before its last newline: 64 newlines and one each side agree (32 pairs and one
        // left over either way), where the whole run's 300 are 150 pairs.
        let doc = format!(
            "{}{}a{}X {}",
            "some words\n".repeat(10),
            "word ".repeat(20),
            "\n".repeat(300),
            "some words\n".repeat(30)
        );
        let ids = ids_in_pieces(std::slice::from_ref(&doc), &tok, (200, 64)).unwrap();
        assert_eq!(ids[0], whole(&tok, &doc));
        assert_eq!(ids[0].iter().filter(|&&i| i == 258).count(), 150);
        // Cuts are still made away from the run.
        assert!(cuts(&tok, &doc, (200, 64)).unwrap().len() > 2);
    }

    /// An added token whose text straddles a cut would be split by it: no cut there.
    #[test]
    fn an_added_token_across_a_cut_keeps_it_whole() {
        let mut json = byte_level();
        json["pre_tokenizer"] = llama3_pre_tokenizer();
        let added = serde_json::json!({"id": 258, "content": ".\n.", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": false});
        json["added_tokens"].as_array_mut().unwrap().push(added);
        let tok = tokenizer_of(&json);
        let doc = format!(".{}", "\n.".repeat(400));
        let ids = ids_in_pieces(std::slice::from_ref(&doc), &tok, (100, 32)).unwrap();
        assert_eq!(ids[0], whole(&tok, &doc));
        assert!(straddles("a.\n.b", 2, ".\n."));
        assert!(!straddles("a.\n.b", 1, ".\n."));
        assert!(!straddles("a.\n.b", 4, ".\n."));
    }

    /// A tokenizer without a pre-tokenizer reads a text as one pre-token: never cut.
    #[test]
    fn a_tokenizer_without_a_pre_tokenizer_is_not_cut() {
        let mut json = byte_level();
        json["pre_tokenizer"] = serde_json::Value::Null;
        let tok = tokenizer_of(&json);
        let doc = text(100);
        assert_eq!(cuts(&tok, &doc, (50, 20)).unwrap(), vec![0, doc.len()]);
    }

    #[test]
    fn cuts_go_into_whitespace_that_breaks_a_line() {
        let tok = fixture("hf/gpt2");
        let doc = format!("{}\n\n  indented\r\nnext\n", "word \nsaid. ".repeat(30));
        let made = cuts(&tok, &doc, (10, 8)).unwrap();
        assert!(made.len() > 10, "{made:?}");
        for &c in &made[1..made.len() - 1] {
            let (before, after) = doc.split_at(c);
            let left = before.len() - before.trim_end().len();
            let right = after.len() - after.trim_start().len();
            let run = &doc[c - left..c + right];
            assert!(run.contains('\n') && right <= 1, "cut {c} in {run:?}");
        }
        // Text with no line break is one piece.
        let line = "word ".repeat(100);
        assert_eq!(cuts(&tok, &line, (10, 8)).unwrap(), vec![0, line.len()]);
        // The byte tokenizer is never cut.
        assert_eq!(cuts(&Tokenizer::bytes(), &doc, (10, 8)).unwrap().len(), 2);
    }

    #[test]
    fn candidates_are_both_ends_of_a_last_run_character() {
        let t = "ab \n\ncd  ef\ngh";
        assert_eq!(candidates(t, 0, 10), vec![4, 5, 11, 12]);
        assert_eq!(candidates(t, 0, 3), vec![4, 5, 11]);
        // A run the search starts inside is not one it saw whole.
        assert_eq!(candidates(t, 3, 10), vec![11, 12]);
        assert_eq!(candidates("\n\nab", 0, 10), Vec::<usize>::new());
        assert_eq!(candidates("é\n\u{3000}日", 0, 10), vec![3, 6]);
    }

    #[test]
    fn results_keep_their_order_and_the_first_failure_wins() {
        let out = on_every_core(100, |i| Ok(i * 2)).unwrap();
        assert_eq!(out, (0..100).map(|i| i * 2).collect::<Vec<_>>());
        let e = on_every_core(50, |i| match i {
            7 | 30 => Err(anyhow::anyhow!("failed at {i}")),
            i => Ok(i),
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "failed at 7");
    }
}
