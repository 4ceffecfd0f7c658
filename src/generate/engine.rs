//! The decode loop: one prefill, then per token one cached forward pass of the active rows,
//! one sampling launch, and `B` ids copied to the host. On CUDA the forward and the sampling
//! of a step replay one CUDA graph (`super::static_step`), queued before the host reads the
//! previous step's ids.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use super::prefill::PrefillPlan;
use super::static_step::{Entry, StaticStep};
use super::{left_pad, DecodeMode, GenStats, Generation, RowKeys, SampleCfg};
use crate::data::tokenizer::Tokenizer;
use crate::kernels::host_ids::HostIds;
use crate::kernels::sample::{keys_tensor, sample_draw, seen_tokens, Draw, Hold};
use crate::kernels::KernelChoice;
use crate::model::cast::FrozenWeights;
use crate::model::linear::Ctx;
use crate::model::{Fwd, KvCache, Transformer};

/// Samples up to `cfg.max_new_tokens` for every prompt; prompt `i` draws from the stream of
/// `keys.rows[i]`.
pub fn generate(
    net: &Transformer,
    ctx: Ctx,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    cfg: &SampleCfg,
    keys: &RowKeys,
) -> Result<Generation> {
    let start = Instant::now();
    if prompts.is_empty() {
        bail!("generation needs at least one prompt");
    }
    if keys.rows.len() != prompts.len() {
        bail!(
            "generation: {} row keys for {} prompts",
            keys.rows.len(),
            prompts.len()
        );
    }
    let dev = net.device().clone();
    let b = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let limit = net.cfg.max_position_embeddings;
    if longest + cfg.max_new_tokens > limit {
        bail!(
            "a prompt of {longest} tokens plus {} new tokens exceeds the model's context of {limit} tokens",
            cfg.max_new_tokens
        );
    }
    // Weights are constant for the whole call: cast to the compute dtype once, not per token.
    let _frozen = FrozenWeights::enter();
    let mut resp = Responses::new(b);
    let mut stats = GenStats::default();
    if cfg.max_new_tokens == 0 {
        return resp.finish(tok, stats, start);
    }

    // Prefill: the distinct prompts only, logits at the last column only.
    let plan = PrefillPlan::new(prompts, cfg.engine.share_prefill);
    let firsts: Vec<Vec<u32>> = plan.firsts.iter().map(|&i| prompts[i].clone()).collect();
    stats.prefill_rows = firsts.len();
    let (ids, prompt_valid, positions) = left_pad(&firsts, tok.pad_id(), &dev)?;
    let capacity = longest + cfg.max_new_tokens;
    check_cache_fits(&net.cfg, b, capacity, ctx.dtype, &dev)?;
    let mut cache = KvCache::with_capacity(net.num_layers(), capacity);
    let f = Fwd {
        ctx,
        positions: Some(&positions),
        key_valid: Some(&prompt_valid),
        segments: None,
    };
    let hidden = net.hidden(&ids, &f, Some(&mut cache))?;
    // Logits stay in the compute dtype: the sampling kernel reads bf16 as it is.
    let mut last = net
        .sampling_logits(&hidden.narrow(1, longest - 1, 1)?, ctx.kernels.gemm)?
        .squeeze(1)?
        .detach();
    drop(hidden);
    // Every generated position is a real key (finished rows too, until they leave).
    let ones = Tensor::ones((firsts.len(), cfg.max_new_tokens), DType::F32, &dev)?;
    let mut valid = Tensor::cat(&[&prompt_valid, &ones], 1)?;
    if let Some(rows) = plan.expansion(&dev)? {
        cache.select_rows(&rows)?;
        // Contiguous first: candle's index_select reads no narrowed view (the padded head's).
        last = last.contiguous()?.index_select(&rows, 0)?;
        valid = valid.index_select(&rows, 0)?;
    }

    let mut active = Active::new(prompts, keys, &dev)?;
    let params = cfg.params();
    // The tokens each row holds, for the repetition penalty: its prompt now, and each drawn
    // token as the sampling marks it on the device.
    let mut seen = match params.penalizes() {
        true => Some(seen_tokens(prompts, last.dim(1)?, &dev)?),
        false => None,
    };
    let early = stop_mask(tok, &last, cfg.min_new_tokens)?;
    let hold = early.as_ref().map(|mask| Hold {
        mask,
        until: cfg.min_new_tokens as u64,
    });
    // A fixed-shape step places its query at the cache's end; a sliding window, which counts
    // back from the query's true position, reaches the sliding layers as a key mask of its own
    // made from the device length (`KvCache::windowed`).
    let asked_fixed = cfg.engine.decode == DecodeMode::Fixed;
    let graph = replays_graph(cfg.engine.decode, &ctx, &dev);
    let fixed_shapes = graph || asked_fixed;
    let mut fixed: Option<StaticStep> = None;
    // One fixed-shape step (a graph replay where it can), counted.
    let fixed_step = |step: &mut StaticStep, cache: &mut KvCache, stats: &mut GenStats| {
        let _profiled = ProfilerRange::at(stats.decode_steps);
        let replayed = step.run(net, ctx, cache, hold, &params, graph)?;
        stats.graph_replays += usize::from(replayed);
        stats.decode_steps += 1;
        stats.fixed_steps += 1;
        anyhow::Ok(())
    };
    let mut next = sample_draw(
        &last,
        &active.keys,
        Draw::At(0),
        hold,
        seen.as_ref(),
        &params,
        ctx.kernels.sample,
    )?;
    for t in 0..cfg.max_new_tokens {
        // `next` (or the fixed step's ids) holds draw t of every active row. The fixed step
        // runs ahead: draw t + 1 is queued behind the copy of draw t's ids before the host
        // waits for them, so that on CUDA the device computes it while the host takes in
        // draw t and queues the next, instead of idling between steps. The price: rows that
        // draw t finishes cost that one step more before compaction drops them, and a call
        // whose rows all finish early computes one step it does not use.
        let pending = HostIds::start(match &fixed {
            Some(step) => step.ids(),
            None => &next,
        })?;
        let ran_ahead = match &mut fixed {
            Some(step) if t + 1 < cfg.max_new_tokens => {
                fixed_step(step, &mut cache, &mut stats)?;
                true
            }
            _ => false,
        };
        let ids = pending.get()?;
        for (&row, &id) in active.rows.iter().zip(&ids) {
            resp.push(row, id, tok, cfg)?;
        }
        let done = active.rows.iter().filter(|&&r| resp.finished[r]).count();
        if done == active.len() || t + 1 == cfg.max_new_tokens {
            break;
        }
        if cfg.engine.compact && done > 0 && 4 * done >= active.len() {
            let keep = active.keep_unfinished(&resp.finished, &dev)?;
            // The fixed step first: it drops its graph, whose memory the cache's copy can
            // then reuse.
            match &mut fixed {
                Some(step) => step.select_rows(&keep)?,
                None => {
                    valid = valid.index_select(&keep, 0)?;
                    next = next.index_select(&keep, 0)?;
                    if let Some(s) = &mut seen {
                        *s = s.index_select(&keep, 0)?;
                    }
                }
            }
            cache.select_rows(&keep)?;
            stats.compactions += 1;
        }
        if ran_ahead {
            continue;
        }
        let draw = t + 1;
        if fixed_shapes && fixed.is_none() {
            let entry = Entry {
                ids: &next,
                positions: &active.positions,
                valid: &valid,
                keys: &active.keys,
                seen: seen.take(),
                draw: draw as u64,
            };
            fixed = Some(StaticStep::enter(&mut cache, entry, &dev)?);
        }
        if let Some(step) = &mut fixed {
            fixed_step(step, &mut cache, &mut stats)?;
            continue;
        }
        let _profiled = ProfilerRange::at(stats.decode_steps);
        let n = active.len();
        // Contiguous f32 once per step, not once per layer inside attention.
        let key_valid = valid
            .narrow(1, 0, cache.len() + 1)?
            .to_dtype(candle_core::DType::F32)?
            .contiguous()?;
        let f = Fwd {
            ctx,
            positions: Some(&active.positions),
            key_valid: Some(&key_valid),
            segments: None,
        };
        let hidden = net.hidden(&next.reshape((n, 1))?, &f, Some(&mut cache))?;
        let logits = net
            .sampling_logits(&hidden, ctx.kernels.gemm)?
            .squeeze(1)?
            .detach();
        active.positions = active.positions.affine(1.0, 1.0)?;
        next = sample_draw(
            &logits,
            &active.keys,
            Draw::At(draw as u64),
            hold,
            seen.as_ref(),
            &params,
            ctx.kernels.sample,
        )?;
        stats.decode_steps += 1;
    }
    resp.finish(tok, stats, start)
}

/// With `TEMPER_CUDA_PROFILER_DECODE_STEP=K` (a CUDA build), decode step K of each call runs
/// inside the CUDA profiler's capture range, so that `ncu --profile-from-start off` profiles
/// exactly one steady-state step (`scripts/gpu-check.sh`, section ncu-decode).
struct ProfilerRange(bool);

impl ProfilerRange {
    fn at(step: usize) -> Self {
        #[cfg(feature = "cuda")]
        {
            static STEP: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
            let chosen = STEP.get_or_init(|| {
                std::env::var("TEMPER_CUDA_PROFILER_DECODE_STEP")
                    .ok()
                    .and_then(|v| v.parse().ok())
            });
            if *chosen == Some(step) {
                // SAFETY: a driver call without arguments.
                unsafe { crate::kernels::cuda::cudarc::driver::sys::cuProfilerStart() };
                return Self(true);
            }
        }
        let _ = step;
        Self(false)
    }
}

impl Drop for ProfilerRange {
    fn drop(&mut self) {
        let opened = self.0;
        // SAFETY: as in `at`. The range closes once the step is queued, before its kernels
        // have run (the host queues the next step before it waits for this one's ids): ncu,
        // which profiles per launch, sees them; a range-based profiler would cut them off.
        #[cfg(feature = "cuda")]
        if opened {
            unsafe { crate::kernels::cuda::cudarc::driver::sys::cuProfilerStop() };
        }
        #[cfg(not(feature = "cuda"))]
        let _ = opened;
    }
}

/// Whether decode steps replay a CUDA graph: asked for, on CUDA, with our attention and
/// sampling (their references read or upload host data in the step, which a capture
/// forbids), not while op spans are recorded (their events would be captured), and where
/// cudarc's own stream bookkeeping stays out of the capture (`static_step::capturable`).
fn replays_graph(mode: DecodeMode, ctx: &Ctx, dev: &candle_core::Device) -> bool {
    let k = &ctx.kernels;
    mode == DecodeMode::Graph
        && dev.is_cuda()
        && [k.decode, k.sample, k.attention]
            .iter()
            .all(|&c| c == KernelChoice::Custom)
        && !crate::kernels::spans::recording()
        && super::static_step::capturable(dev)
}

/// `[V]` f32: -inf at the stop ids, 0 elsewhere, added to the logits of the first
/// `min_new_tokens` draws so that none of them can end a response (as Hugging Face's
/// `min_new_tokens` does); `None` when there is no such draw.
fn stop_mask(tok: &Tokenizer, logits: &Tensor, min_new_tokens: usize) -> Result<Option<Tensor>> {
    if min_new_tokens == 0 {
        return Ok(None);
    }
    let v = logits.dim(1)?;
    let mut mask = vec![0f32; v];
    for id in tok.stop_ids() {
        if let Some(m) = mask.get_mut(id as usize) {
            *m = f32::NEG_INFINITY;
        }
    }
    Ok(Some(Tensor::from_vec(mask, v, logits.device())?))
}

/// The rows still in the batch: which prompt each slot holds, its sampling key, and the
/// position its next token is fed at.
struct Active {
    rows: Vec<usize>,
    /// `[n]` i64 row keys ([`crate::kernels::sample::row_key`]).
    keys: Tensor,
    /// `[n, 1]` u32.
    positions: Tensor,
}

impl Active {
    fn new(prompts: &[Vec<u32>], keys: &RowKeys, dev: &candle_core::Device) -> Result<Self> {
        let b = prompts.len();
        let pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
        Ok(Self {
            rows: (0..b).collect(),
            keys: keys_tensor(keys.seed, &keys.rows, dev)?,
            positions: Tensor::from_vec(pos, (b, 1), dev)?,
        })
    }

    fn len(&self) -> usize {
        self.rows.len()
    }

    /// Drops the finished rows; returns the slots kept (`[n']` u32), for the caller to select
    /// the same rows of the cache and of whatever else it holds per slot.
    fn keep_unfinished(&mut self, finished: &[bool], dev: &candle_core::Device) -> Result<Tensor> {
        let slots: Vec<u32> = (0..self.rows.len() as u32)
            .filter(|&s| !finished[self.rows[s as usize]])
            .collect();
        let keep = Tensor::from_vec(slots.clone(), slots.len(), dev)?;
        self.rows = slots.iter().map(|&s| self.rows[s as usize]).collect();
        self.keys = self.keys.index_select(&keep, 0)?;
        self.positions = self.positions.index_select(&keep, 0)?;
        Ok(keep)
    }
}

/// Responses in progress: their tokens, and which have ended (EOS or a stop string).
struct Responses {
    tokens: Vec<Vec<u32>>,
    texts: Vec<String>,
    finished: Vec<bool>,
}

impl Responses {
    fn new(b: usize) -> Self {
        Self {
            tokens: vec![Vec::new(); b],
            texts: vec![String::new(); b],
            finished: vec![false; b],
        }
    }

    /// Appends `id` to row `row` unless it has ended, and ends it at a stop token or string.
    fn push(&mut self, row: usize, id: u32, tok: &Tokenizer, cfg: &SampleCfg) -> Result<()> {
        if self.finished[row] {
            return Ok(());
        }
        let toks = &mut self.tokens[row];
        toks.push(id);
        if tok.is_stop(id) {
            self.finished[row] = true;
            self.texts[row] = tok.decode(toks)?;
        } else if !cfg.stop.is_empty() {
            // A stop string new at this step ends in its last few tokens (each token is at
            // least one byte): decode that tail every step, and the whole response only once
            // a stop string shows up there, so the check is linear in the response's length.
            let longest = cfg.stop.iter().map(String::len).max().unwrap_or(0);
            let tail = tok.decode(&toks[toks.len().saturating_sub(4 * longest + 8)..])?;
            if cfg.stop.iter().any(|s| tail.contains(s.as_str())) {
                let text = tok.decode(toks)?;
                if let Some(cut) = cfg.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                    self.finished[row] = true;
                    self.texts[row] = text[..cut].to_string();
                }
            }
        }
        Ok(())
    }

    fn finish(
        mut self,
        tok: &Tokenizer,
        mut stats: GenStats,
        start: Instant,
    ) -> Result<Generation> {
        for i in 0..self.tokens.len() {
            if !self.finished[i] {
                self.texts[i] = tok.decode(&self.tokens[i])?;
            }
        }
        stats.new_tokens = self.tokens.iter().map(Vec::len).sum();
        stats.seconds = start.elapsed().as_secs_f64();
        Ok(Generation {
            tokens: self.tokens,
            texts: self.texts,
            finished: self.finished,
            stats,
        })
    }
}

/// Refuses, on the CPU, a generation whose KV cache alone (`rows` × `capacity` positions)
/// would not fit in the host's available memory: the kernel's overcommit would let it start
/// and its out-of-memory killer end it without a word. (A GPU's allocator reports its own.)
fn check_cache_fits(
    cfg: &crate::config::ModelConfig,
    rows: usize,
    capacity: usize,
    dtype: DType,
    dev: &candle_core::Device,
) -> Result<()> {
    if !dev.is_cpu() {
        return Ok(());
    }
    let bytes = cache_bytes(cfg, rows, capacity, dtype);
    let Some(avail) = crate::device::host_available_bytes() else {
        return Ok(());
    };
    if bytes > avail {
        let place = crate::out_of_memory::hint().map_or(String::new(), |h| format!(" in {h}"));
        bail!(
            "generating {rows} rows of up to {capacity} positions needs {:.1} GB for the KV cache \
             alone, and {:.1} GB are available{place}: generate fewer rows at once",
            bytes as f64 / 1e9,
            avail as f64 / 1e9
        );
    }
    Ok(())
}

/// Bytes of the keys and values of `rows` sequences of `capacity` positions in every layer.
fn cache_bytes(
    cfg: &crate::config::ModelConfig,
    rows: usize,
    capacity: usize,
    dtype: DType,
) -> u128 {
    let per_position = 2 * cfg.num_key_value_heads * cfg.head_dim() * dtype.size_in_bytes();
    rows as u128 * capacity as u128 * cfg.num_hidden_layers as u128 * per_position as u128
}

#[cfg(test)]
mod tests;
