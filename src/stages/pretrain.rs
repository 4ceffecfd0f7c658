//! Pretraining: next-token cross-entropy over packed token streams (documents joined with
//! EOS), with held-out loss and perplexity (on `--eval-data` where it is given, else on a part
//! of `--data` held out).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use super::loader::{policy_from, read_checkpoint};
use super::setup::{self, Plan};
use super::Env;
use crate::data::corpus::{
    corpus_files, document_ids, documents, documents_of, load_documents_from, pack_documents, Part,
};
use crate::data::sampler::{state_u64, WindowSampler};
use crate::data::shards::{
    check_corpus_tokenizer, corpus_tokenizer_file, is_shard_corpus, open_corpus, open_held_out,
    TokenStream,
};
use crate::data::splits::warn_shared;
use crate::data::tokenizer::Tokenizer;
use crate::kernels::segments::Segments;
use crate::model::{Fwd, Transformer};
use crate::train::loss::scalar;
use crate::train::params::{Net, ParamStore};
use crate::train::rng::splitmix64;
use crate::train::runner::{Report, StepOut, Task};

struct PretrainTask<'a> {
    env: &'a Env,
    net: Transformer,
    train: TokenStream,
    val: TokenStream,
    /// The tokenizer's vocabulary: an id at or past it comes from another tokenizer.
    vocab: usize,
    /// Where documents end (`[data] document_mask`).
    eos: u32,
    sampler: WindowSampler,
    micro: u64,
}

/// Tokens of each memory-mapped split checked against the vocabulary before the first step
/// (64 MB of u16 ids, a fraction of a second): a shard of another tokenizer fails there rather
/// than at the first window that reads one of its ids, steps later.
const CHECKED_AT_START: usize = 1 << 25;

/// A batch of windows: inputs, targets and, under `[data] document_mask`, the documents'
/// boundaries (with each token's position in its document).
struct Windows {
    x: Tensor,
    y: Tensor,
    documents: Option<Segments>,
}

impl PretrainTask<'_> {
    fn batch(&self, stream: &TokenStream, starts: &[usize]) -> Result<Windows> {
        let t = self.env.cfg.train.seq_len;
        let mut x = Vec::with_capacity(starts.len() * t);
        let mut y = Vec::with_capacity(starts.len() * t);
        let mut window = Vec::with_capacity(t + 1);
        for &s in starts {
            window.clear();
            stream.read(s, t + 1, self.vocab, &mut window)?;
            x.extend_from_slice(&window[..t]);
            y.extend_from_slice(&window[1..]);
        }
        let dev = &self.env.device;
        let documents = match self.env.cfg.data.document_mask {
            true => Some(Segments::split_after(&x, t, self.eos, dev)?),
            false => None,
        };
        Ok(Windows {
            x: Tensor::from_vec(x, (starts.len(), t), dev)?,
            y: Tensor::from_vec(y, (starts.len(), t), dev)?,
            documents,
        })
    }

    fn loss(&self, w: &Windows, dropout_seed: Option<u64>) -> Result<Tensor> {
        let f = Fwd {
            ctx: self.env.ctx(true, dropout_seed),
            positions: None,
            key_valid: None,
            segments: w.documents.as_ref(),
        };
        let logp = self.net.target_logprobs(&w.x, &w.y, &f)?;
        Ok(logp.neg()?.mean_all()?)
    }
}

/// Held-out next-token loss and its perplexity.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PretrainEval {
    pub loss: f64,
}

impl Report for PretrainEval {
    fn fields(&self) -> Vec<(&'static str, f64)> {
        vec![("loss", self.loss), ("perplexity", self.loss.exp())]
    }
}

impl Task for PretrainTask<'_> {
    type Eval = PretrainEval;

    fn epoch_items(&self) -> Option<usize> {
        Some(self.sampler.len())
    }

    fn micro_batch(&mut self, _step: usize) -> Result<StepOut> {
        let t = self.env.cfg.train.seq_len;
        let comm = self.env.comm.as_ref();
        let starts: Vec<usize> = self
            .sampler
            .next_slice(self.env.cfg.train.batch_size, comm.rank(), comm.world())
            .into_iter()
            .map(|w| w * t)
            .collect();
        let w = self.batch(&self.train, &starts)?;
        self.micro += 1;
        let seed =
            (self.net.cfg.dropout > 0.0).then(|| splitmix64(self.env.cfg.train.seed ^ self.micro));
        let loss = self.loss(&w, seed)?;
        Ok(StepOut {
            loss,
            tokens: starts.len() * t,
            metrics: vec![],
        })
    }

    /// The mean loss of the first [`eval_windows`] held-out windows (rank 0 alone evaluates):
    /// the same windows however a global batch is cut into ranks and micro-batches.
    fn evaluate(&mut self) -> Result<PretrainEval> {
        let cfg = &self.env.cfg.train;
        let t = cfg.seq_len;
        let n = eval_windows(cfg, self.env.comm.world(), self.val.len());
        let mut total = 0.0;
        for chunk in (0..n).collect::<Vec<_>>().chunks(cfg.batch_size) {
            let starts: Vec<usize> = chunk.iter().map(|w| w * t).collect();
            let w = self.batch(&self.val, &starts)?;
            total += scalar(&self.loss(&w, None)?)? * starts.len() as f64;
        }
        Ok(PretrainEval {
            loss: total / n.max(1) as f64,
        })
    }

    fn state(&self) -> serde_json::Value {
        let mut s = self.sampler.state();
        s["micro"] = self.micro.into();
        s
    }

    fn restore(&mut self, s: &serde_json::Value) -> Result<()> {
        self.sampler.restore(s)?;
        self.micro = state_u64(s, "micro");
        Ok(())
    }
}

/// The held-out windows each evaluation scores: `eval_batches` global batches (per-rank
/// batch times accumulation times ranks, so that `--batch-size 8` and `--batch-size 4
/// --grad-accum 2`, or two ranks of 4, score the same ones), or all of a shorter stream.
fn eval_windows(cfg: &crate::config::TrainConfig, world: usize, val_tokens: usize) -> usize {
    let global = cfg.batch_size * cfg.grad_accum * world;
    ((val_tokens - 1) / cfg.seq_len).min(cfg.eval_batches * global)
}

pub struct PretrainResult {
    pub first_val_loss: Option<f64>,
    /// None where no held-out evaluation ran (a resumed run that had finished, say).
    pub val_loss: Option<f64>,
    /// The loss of the last train line logged; None where no step ran (a resumed run that
    /// had finished).
    pub train_loss: Option<f64>,
}

/// The training and validation token streams, and what they came from (for the log).
///
/// With a held-out file (`--eval-data`) the whole of `--data` trains and the file is the
/// validation stream ([`held_out_streams`]). Otherwise a token-shard corpus (`temper tokenizer
/// encode`, or llm.c's) is memory-mapped: its validation shards, or where they hold less than
/// one window (or there are none) the last `val_fraction` of its training stream (at least one
/// window), are held out. A text corpus, or the built-in task, is tokenized and split by
/// document ([`pack_documents`]).
fn streams(
    env: &Env,
    tok: &Tokenizer,
    eval: Option<&Path>,
) -> Result<(TokenStream, TokenStream, String)> {
    let cfg = &env.cfg;
    let t = cfg.train.seq_len;
    let shards = [cfg.data.path.as_deref(), eval]
        .into_iter()
        .flatten()
        .find(|p| is_shard_corpus(p));
    if let (Some(p), false) = (shards, cfg.data.columns.is_empty()) {
        bail!(
            "data.columns names the text column of a text corpus, and {} is token shards, \
             already tokenized: leave the columns out",
            p.display()
        );
    }
    let sides = [
        (
            cfg.data.path.as_deref(),
            &cfg.data.train_split,
            "--train-split",
        ),
        (eval, &cfg.data.eval_split, "--eval-split"),
    ];
    for (path, split, flag) in sides {
        if let (Some(p), Some(name)) = (path.filter(|p| is_shard_corpus(p)), split) {
            bail!(
                "{flag} {name}: {} is token shards, whose training and validation shards are \
                 named by `temper tokenizer encode`, not by a dataset's splits: leave the split \
                 out",
                p.display()
            );
        }
    }
    if let Some(eval) = eval {
        let data = (cfg.data.path.as_deref()).context("--eval-data is refused without --data")?;
        let parts = (cfg.data.train_part(), cfg.data.held_out_part());
        let column = cfg.data.columns.column("text");
        let by = cfg.data.held_out_by();
        return held_out_streams((data, eval, &by), (column, parts), tok, t);
    }
    if let Some(path) = cfg.data.path.as_deref().filter(|p| is_shard_corpus(p)) {
        let (train, val) = open_corpus(path)?;
        let train = TokenStream::mapped(train);
        let why_tail = match val {
            Some(val) if val.len() > t => {
                let what = format!("token shards {} (memory-mapped)", path.display());
                return Ok((train, TokenStream::mapped(val), what));
            }
            Some(val) => format!(
                "its validation shards hold {} tokens, less than a window of {}",
                val.len(),
                t + 1
            ),
            None => "it has no validation shard".to_string(),
        };
        let held = ((train.len() as f64 * cfg.data.val_fraction) as usize).max(t + 1);
        let (train, val) = train.split_at(train.len().saturating_sub(held));
        let what = format!(
            "token shards {} (memory-mapped; {why_tail}, so the training stream's last {} tokens are held out)",
            path.display(),
            val.len()
        );
        return Ok((train, val, what));
    }
    let docs = match &cfg.data.path {
        Some(p) => load_documents_from(p, cfg.data.columns.column("text"), cfg.data.train_part())?,
        None => setup::synthetic(env).pretrain_documents(4000),
    };
    let packed = pack_documents(&docs, tok, cfg.data.val_fraction, t + 1, cfg.train.seed);
    let packed = match &cfg.data.path {
        Some(p) => packed.with_context(|| p.display().to_string())?,
        None => packed?,
    };
    Ok((
        TokenStream::owned(packed.train),
        TokenStream::owned(packed.val),
        documents(docs.len()),
    ))
}

/// `--data` whole as the training stream and the held-out file `eval` as the validation
/// stream, each read as `--data` is: token shards memory-mapped (of `--data`, its training
/// shards; of `eval`, the file, or a directory's validation shards where it has any, else all
/// its shards), text, JSONL or a directory of them tokenized document by document, each
/// document followed by EOS (as [`pack_documents`] packs them). Either too short for a window
/// of `t + 1` tokens is an error naming it.
fn held_out_streams(
    (data, eval, by): (&Path, &Path, &str),
    (column, parts): (&str, (Part, Part)),
    tok: &Tokenizer,
    t: usize,
) -> Result<(TokenStream, TokenStream, String)> {
    // A text corpus's files, of the split asked for; token shards have none.
    let text_files = |p: &Path, part| match is_shard_corpus(p) {
        true => Ok(None),
        false => corpus_files(p, part).map(Some),
    };
    let (train_files, eval_files) = (text_files(data, parts.0)?, text_files(eval, parts.1)?);
    if let (Some(a), Some(b)) = (&train_files, &eval_files) {
        warn_shared(a, b, by);
    }
    let (train, train_what) = match &train_files {
        None => {
            let (train, val) = open_corpus(data)?;
            let unread = match val {
                Some(_) => {
                    format!("; its validation shards are not read: {by} is held out instead")
                }
                None => String::new(),
            };
            let what = format!("token shards {} (memory-mapped{unread})", data.display());
            (TokenStream::mapped(train), what)
        }
        Some(files) => text_stream(data, (files, column), tok)?,
    };
    let (val, val_what) = match &eval_files {
        None => {
            let what = format!("token shards {} (memory-mapped)", eval.display());
            (TokenStream::mapped(open_held_out(eval)?), what)
        }
        Some(files) => text_stream(eval, (files, column), tok)?,
    };
    if train.len() <= t {
        bail!(
            "{}: {} training tokens, too few for a window of {} (with --eval-data the whole of \
             --data trains)",
            data.display(),
            train.len(),
            t + 1
        );
    }
    if val.len() <= t {
        bail!(
            "{by} {}: {} tokens, too few for a held-out window of {}",
            eval.display(),
            val.len(),
            t + 1
        );
    }
    let what = format!("{train_what}, all of it trained; held out ({by}): {val_what}");
    Ok((train, val, what))
}

/// A text corpus (a file, JSONL, or a directory of them: [`load_documents`]), its `files`,
/// as one token stream, each document followed by EOS, and what it is (for the log).
fn text_stream(
    path: &Path,
    (files, column): (&[PathBuf], &str),
    tok: &Tokenizer,
) -> Result<(TokenStream, String)> {
    let docs = documents_of(path, files, column)?;
    let ids = document_ids(&docs, tok)
        .with_context(|| path.display().to_string())?
        .concat();
    let what = format!("{} of {}", documents(docs.len()), path.display());
    Ok((TokenStream::owned(ids), what))
}

/// `--tokenizer`, else the tokenizer.json that `temper tokenizer encode` left beside a shard
/// corpus, else the byte tokenizer.
pub fn tokenizer(env: &Env) -> Result<Tokenizer> {
    if let Some(p) = &env.cfg.data.tokenizer {
        return Tokenizer::from_file(p);
    }
    if let Some(data) = env.cfg.data.path.as_deref().filter(|p| is_shard_corpus(p)) {
        if let Some(beside) = corpus_tokenizer_file(data) {
            return Tokenizer::from_file(&beside);
        }
    }
    Ok(Tokenizer::bytes())
}

/// A resume reads its tokenizer file again: one edited since (ids swapped, tokens added) would
/// train the rest of the run on other ids than its checkpoint's embedding rows learnt, and
/// write the new file into its final model. Refused, naming both.
fn same_tokenizer_as_checkpoint(env: &Env, tok: &Tokenizer) -> Result<()> {
    let Some(ckpt) = crate::train::checkpoint::Checkpoints::resumable(&env.run_dir) else {
        return Ok(());
    };
    // A byte-level run's checkpoints keep no tokenizer.json (and its resume names no file);
    // one that does not read is the resume's to set aside, not this check's to refuse.
    if !ckpt.join("tokenizer.json").is_file() {
        return Ok(());
    }
    let Ok(kept) = Tokenizer::load_dir(&ckpt) else {
        return Ok(());
    };
    if kept.same_vocabulary(tok) {
        return Ok(());
    }
    let now = match &env.cfg.data.tokenizer {
        Some(p) => p.display().to_string(),
        None => "the tokenizer read now".to_string(),
    };
    bail!(
        "{now}: maps tokens to other ids than the tokenizer the run trained with, which its \
         checkpoint {} keeps: put that one back (copy it from there), or start a new run",
        ckpt.display()
    );
}

/// Says how many documents the first few training windows hold: a corpus that separates
/// documents by another token than the tokenizer's EOS would silently get no mask.
fn document_mask_note(train: &TokenStream, t: usize, vocab: usize, eos: u32) -> Result<()> {
    let n = (train.len() - 1).min(16 * t);
    let mut ids = Vec::with_capacity(n);
    train.read(0, n, vocab, &mut ids)?;
    let ends = ids.iter().filter(|&&id| id == eos).count();
    warnln!(
        "[pretrain] document mask: {ends} documents end (EOS id {eos}) in the first {n} tokens, \
         {:.1} a window of {t}",
        ends as f64 * t as f64 / n as f64
    );
    if ends == 0 {
        warnln!(
            "[pretrain] warning: no EOS in the first {n} tokens; if the corpus separates its \
             documents by another token, [data] document_mask masks nothing"
        );
    }
    Ok(())
}

pub fn run(env: &Env) -> Result<PretrainResult> {
    let cfg = &env.cfg;
    // The held-out file (checked by `Env`'s preparation).
    let eval = cfg.data.held_out_path();
    // Continued pretraining starts from `--init` (a temper checkpoint or a Hugging Face
    // model) with its own shape and tokenizer: its embedding rows are that tokenizer's ids.
    if let (Some(i), Some(t)) = (&cfg.init, &cfg.data.tokenizer) {
        bail!(
            "--tokenizer {} with --init {}: continued pretraining keeps the model's own \
             tokenizer (its embedding rows are that tokenizer's ids); leave out --tokenizer",
            t.display(),
            i.display()
        );
    }
    let init = match &cfg.init {
        Some(p) => Some(read_checkpoint(p, &env.device)?),
        None => None,
    };
    let tok = match &init {
        Some(l) => l.tokenizer.clone(),
        None => tokenizer(env)?,
    };
    if env.continues() {
        same_tokenizer_as_checkpoint(env, &tok)?;
    }
    // Where the run's tokenizer came from, unless it is the one beside the shards.
    let tok_from = match &init {
        Some(l) => Some(l.tokenizer_dir.as_path()),
        None => cfg.data.tokenizer.as_deref(),
    };
    if let (Some(data), Some(from)) = (cfg.data.path.as_deref(), tok_from) {
        if let Some(warning) = check_corpus_tokenizer(data, &tok, from)? {
            warnln!("warning: [pretrain] {warning}");
        }
    }
    // Held-out shards are checked as the training shards are, against the tokenizer the run
    // reads them with: the one named, else the one beside the training shards, else the
    // byte-level tokenizer (which a held-out corpus written with a tokenizer.json is not).
    if let Some(eval) = eval.filter(|p| is_shard_corpus(p)) {
        let beside = (cfg.data.path.as_deref())
            .filter(|p| is_shard_corpus(p))
            .and_then(corpus_tokenizer_file);
        let from = match (tok_from, beside) {
            (Some(from), _) => from.to_path_buf(),
            (None, Some(beside)) => beside,
            (None, None) => PathBuf::from("the default byte-level tokenizer"),
        };
        if let Some(warning) = check_corpus_tokenizer(eval, &tok, &from)? {
            warnln!("warning: [pretrain] --eval-data: {warning}");
        }
    }
    let mut model_cfg = match &init {
        Some(l) => l.meta.model.clone(),
        None => cfg.model.clone(),
    };
    if model_cfg.vocab_size < tok.vocab_size() {
        if env.comm.rank() == 0 {
            errln!(
                "[pretrain] the model's vocabulary is the tokenizer's {} tokens, more than \
                 model.vocab_size = {} (a larger size is kept: padding, as GPT-2's 50304)",
                tok.vocab_size(),
                model_cfg.vocab_size
            );
        }
        model_cfg.vocab_size = tok.vocab_size();
    }
    if cfg.train.seq_len > model_cfg.max_position_embeddings {
        bail!(
            "train.seq_len ({}) exceeds model.max_position_embeddings ({})",
            cfg.train.seq_len,
            model_cfg.max_position_embeddings
        );
    }
    let (train, val, source) = streams(env, &tok, eval)?;
    let t = cfg.train.seq_len;
    let windows = train.len().saturating_sub(1) / t;
    if windows == 0 || val.len() <= t {
        bail!(
            "the corpus is too small for seq_len {t}: {} training and {} validation tokens",
            train.len(),
            val.len()
        );
    }
    // llm.c refuses a corpus smaller than a step; a step here wraps into the next epoch
    // and holds the same windows twice.
    let step_windows = cfg.train.batch_size * cfg.train.grad_accum * env.comm.world();
    if windows < step_windows {
        warnln!(
            "warning: the corpus holds {windows} training windows of {t} tokens, fewer than a \
             step's {step_windows}: each step trains on some windows more than once"
        );
    }
    let scored = eval_windows(&cfg.train, env.comm.world(), val.len()) * t;
    warnln!(
        "[pretrain] tokenizer {}, {source}, {} train / {} val tokens ({} scored by each \
         evaluation: [train] eval_batches {} global batches)",
        tok.describe(),
        train.len(),
        val.len(),
        scored,
        cfg.train.eval_batches
    );
    for stream in [&train, &val] {
        stream.check_ids(tok.vocab_size(), CHECKED_AT_START)?;
    }
    if cfg.data.document_mask {
        document_mask_note(&train, t, tok.vocab_size(), tok.eos_id())?;
    }
    let mut store = ParamStore::new(env.device.clone(), cfg.train.seed);
    let net = match &init {
        Some(l) => policy_from(l, &mut store, None)?,
        None => Transformer::new(&mut store.scope(Net::Policy), &model_cfg, None)?,
    };
    let mut task = PretrainTask {
        env,
        net,
        train,
        val,
        vocab: tok.vocab_size(),
        eos: tok.eos_id(),
        sampler: WindowSampler::new(windows, cfg.train.seed),
        micro: 0,
    };
    let summary = setup::train(
        env,
        &mut task,
        &store,
        Plan::policy(&model_cfg, None, &tok),
        &|_| true,
    )?;
    Ok(PretrainResult {
        first_val_loss: summary.first_eval.map(|e| e.loss),
        val_loss: summary.last_eval.map(|e| e.loss),
        train_loss: summary.last_train_loss,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::config::ModelConfig;
    use crate::kernels::segments::Segments;
    use crate::model::linear::Ctx;
    use crate::model::{Fwd, Transformer};
    use crate::train::params::{Net, ParamStore};

    /// Per-token log-probabilities of `x -> y` (`[B, T]`), with the documents masked or not.
    fn logprobs(net: &Transformer, x: &[u32], y: &[u32], t: usize, docs: Option<u32>) -> Vec<f32> {
        let dev = Device::Cpu;
        let rows = x.len() / t;
        let segments = docs.map(|eos| Segments::split_after(x, t, eos, &dev).unwrap());
        let f = Fwd {
            ctx: Ctx::plain(DType::F32),
            positions: None,
            key_valid: None,
            segments: segments.as_ref(),
        };
        let x = Tensor::from_slice(x, (rows, t), &dev).unwrap();
        let y = Tensor::from_slice(y, (rows, t), &dev).unwrap();
        let lp = net.target_logprobs(&x, &y, &f).unwrap();
        lp.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Under the document mask a window is its documents run one by one: each token's
    /// log-probability is the one it has with its document alone, for rotary and for learned
    /// positions; without it the documents see each other.
    #[test]
    fn masked_documents_score_as_if_alone() {
        let eos = 0;
        // Documents (EOS-terminated) across two windows of 9: the second window starts
        // inside the third document.
        let stream: Vec<u32> = vec![
            5, 6, 7, 0, 8, 0, 9, 10, 11, 12, 13, 0, 14, 15, 16, 0, 17, 18, 19,
        ];
        let t = 9;
        for preset in ["tiny", "gpt2"] {
            let cfg = ModelConfig::for_tests(preset);
            let mut store = ParamStore::new(Device::Cpu, 3);
            let net = Transformer::new(&mut store.scope(Net::Policy), &cfg, None).unwrap();
            let (x, y) = (&stream[..2 * t], &stream[1..2 * t + 1]);
            let masked = logprobs(&net, x, y, t, Some(eos));
            let mut at = 0;
            for row in 0..2 {
                let w = &x[row * t..(row + 1) * t];
                for doc in w.split_inclusive(|&id| id == eos) {
                    let n = doc.len();
                    let alone = logprobs(&net, doc, &y[at..at + n], n, None);
                    for (k, (a, b)) in masked[at..at + n].iter().zip(&alone).enumerate() {
                        assert!(
                            (a - b).abs() < 1e-5,
                            "{preset}: token {}: {a} vs {b}",
                            at + k
                        );
                    }
                    at += n;
                }
            }
            let open = logprobs(&net, x, y, t, None);
            let moved = open
                .iter()
                .zip(&masked)
                .filter(|(a, b)| (*a - *b).abs() > 1e-4);
            assert!(moved.count() > 5, "{preset}: the mask changes nothing");
        }
    }
}
