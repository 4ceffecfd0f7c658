//! The rollout engine: batched sampling with a preallocated KV cache, for `temper generate`,
//! evaluation and every RL stage.
//!
//! Per call: prompts repeated back to back (a GRPO/RLOO group) are prefilled once and their
//! cache rows copied on the device (`prefill`); each step samples every active row on the
//! device ([`crate::kernels::sample`]) and only the chosen ids come to the host; rows that have
//! finished leave the batch once enough of them have (`engine`). Each row's uniforms are
//! keyed by (seed, global row id, index of the response token), so the random stream a row sees does not depend
//! on the batch, the rank, or whether compaction and shared prefill are on. On the CPU its
//! tokens are then bit-identical too (tested); on a GPU the logits themselves round
//! differently with the batch's shape (cuBLAS algorithms, the decode kernel's split), so a
//! greedy near-tie or a draw at a bucket edge may go the other way.

mod engine;
mod prefill;
mod static_step;

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::kernels::sample::SampleParams;

pub use engine::generate;
#[cfg(feature = "cuda")]
pub use static_step::{last_capture, GraphCensus};

#[derive(Clone, Debug)]
pub struct SampleCfg {
    pub max_new_tokens: usize,
    /// The first this many new tokens are never stop tokens: their logits are masked, as
    /// Hugging Face's `min_new_tokens` does (benches that need every row to run
    /// `max_new_tokens`). Stop strings, as Hugging Face's `stop_strings`, apply from the first
    /// token.
    pub min_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// 0 means no top-k filter.
    pub top_k: usize,
    /// 1.0 means no nucleus filter.
    pub top_p: f64,
    /// 0.0 means no min-p filter (Hugging Face's `min_p`: tokens less likely than this share
    /// of the most likely one are dropped).
    pub min_p: f64,
    /// 1.0 means none (Hugging Face's and vLLM's `repetition_penalty`: a token already in the
    /// prompt or the response has its logit divided by it where positive, multiplied where
    /// negative).
    pub repetition_penalty: f64,
    pub stop: Vec<String>,
    pub engine: EngineOpts,
}

impl Default for SampleCfg {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            min_new_tokens: 0,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            stop: vec![],
            engine: EngineOpts::default(),
        }
    }
}

impl SampleCfg {
    pub fn params(&self) -> SampleParams {
        SampleParams {
            temperature: self.temperature as f32,
            top_k: self.top_k,
            top_p: self.top_p as f32,
            min_p: self.min_p as f32,
            repetition_penalty: self.repetition_penalty as f32,
        }
    }
}

/// The engine's savings, each of which leaves the tokens unchanged on the CPU (tests switch
/// them off to check that; on a GPU, up to the rounding that batch shapes change).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineOpts {
    /// Drop finished rows from the batch once a quarter of the active rows have finished.
    pub compact: bool,
    /// Prefill a prompt repeated back to back once and copy its cache rows.
    pub share_prefill: bool,
    pub decode: DecodeMode,
}

impl Default for EngineOpts {
    fn default() -> Self {
        Self {
            compact: true,
            share_prefill: true,
            decode: DecodeMode::Graph,
        }
    }
}

/// How a decode step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeMode {
    /// Shapes follow the cache: attention reads the cached positions only, the step's state
    /// (cache length, positions, draw index) stays on the host.
    Dynamic,
    /// Fixed shapes with the state on the device (`static_step`), op by op: attention reads
    /// the whole cache under a mask. What a graph replays, runnable anywhere.
    Fixed,
    /// On CUDA, the fixed-shape step captured once per batch size and replayed as a CUDA
    /// graph; elsewhere, under `--kernels decode=reference` (or `sample=reference`,
    /// `attention=reference`, which read the host), or while op spans are recorded (`temper
    /// profile`), [`DecodeMode::Dynamic`].
    Graph,
}

/// Which random stream each prompt samples from: the seed and each prompt's global row id.
/// A data-parallel rank passes the global ids of its slice, so row `r` draws the same tokens
/// whichever rank or batch generates it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowKeys {
    pub seed: u64,
    pub rows: Vec<u64>,
}

impl RowKeys {
    /// Rows `first..first + n`.
    pub fn range(seed: u64, first: u64, n: usize) -> Self {
        Self {
            seed,
            rows: (first..first + n as u64).collect(),
        }
    }
}

/// What a call cost: wall-clock seconds and the tokens it generated.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GenStats {
    pub seconds: f64,
    /// Response tokens over all rows.
    pub new_tokens: usize,
    /// Rows actually prefilled (fewer than the prompts when groups share a prefill).
    pub prefill_rows: usize,
    /// Decode steps run (forward passes after the prefill).
    pub decode_steps: usize,
    /// Times finished rows were dropped from the batch.
    pub compactions: usize,
    /// Decode steps replayed from a CUDA graph (`DecodeMode::Graph` on CUDA).
    pub graph_replays: usize,
    /// Decode steps run at fixed shapes (`DecodeMode::Fixed`, or `Graph`), replayed or not.
    pub fixed_steps: usize,
}

impl GenStats {
    pub fn tokens_per_s(&self) -> f64 {
        self.new_tokens as f64 / self.seconds.max(1e-9)
    }
}

pub struct Generation {
    /// Response tokens of each prompt, ending with EOS when the model stopped by itself.
    pub tokens: Vec<Vec<u32>>,
    /// Decoded responses, cut before a stop string.
    pub texts: Vec<String>,
    /// Whether each response ended by EOS or a stop string (not by running out of tokens).
    pub finished: Vec<bool>,
    pub stats: GenStats,
}

/// A left-padded prompt batch: ids, key mask and per-row positions starting at 0 on each
/// row's first real token.
pub fn left_pad(prompts: &[Vec<u32>], pad: u32, dev: &Device) -> Result<(Tensor, Tensor, Tensor)> {
    let l = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if l == 0 || prompts.iter().any(Vec::is_empty) {
        anyhow::bail!("generation needs non-empty prompts");
    }
    let b = prompts.len();
    let mut ids = vec![pad; b * l];
    let mut valid = vec![0f32; b * l];
    let mut pos = vec![0u32; b * l];
    for (i, p) in prompts.iter().enumerate() {
        let off = l - p.len();
        for (j, &t) in p.iter().enumerate() {
            ids[i * l + off + j] = t;
            valid[i * l + off + j] = 1.0;
            pos[i * l + off + j] = j as u32;
        }
    }
    Ok((
        Tensor::from_vec(ids, (b, l), dev)?,
        Tensor::from_vec(valid, (b, l), dev)?,
        Tensor::from_vec(pos, (b, l), dev)?,
    ))
}

/// Each prompt followed by its response.
pub fn concat(prompts: &[Vec<u32>], responses: &[Vec<u32>]) -> Vec<Vec<u32>> {
    prompts
        .iter()
        .zip(responses)
        .map(|(p, r)| p.iter().chain(r).copied().collect())
        .collect()
}

impl Generation {
    /// Each of `prompts` followed by its generated tokens.
    pub fn sequences(&self, prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
        concat(prompts, &self.tokens)
    }
}
