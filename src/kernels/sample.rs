//! Next-token sampling from a batch of logits `[B, V]`: repetition penalty, temperature,
//! top-k, top-p and min-p, with each row's uniform draw taken from a counter-based hash of
//! (seed, global row id, index of the draw in the row's response).
//!
//! Why counter-based: a row's tokens must not depend on which batch, rank or slot it was
//! generated in (data-parallel rollouts split a batch across ranks; the engine compacts
//! finished rows away and shares a prompt's prefill across its group). A sequential stream
//! would tie every draw to the draws before it in the batch.
//!
//! The maths, shared by the reference below and `kernels/sample.cu`, in Hugging Face
//! `generate`'s order:
//! 0. repetition penalty `r` (Hugging Face's and vLLM's): a token already in the row (its
//!    prompt or its response so far, the `seen` mask) has its logit divided by `r` where
//!    positive and multiplied by `r` where negative, in f32. It applies before greedy too.
//! 1. `p_i = exp((z_i - max z) / T)` in f32 (unnormalised; the largest is exactly 1). `T <= 0`
//!    is greedy: the first index of the largest logit, no draw.
//! 2. top-k: the largest threshold `tk` with `#{p_i >= tk} >= k`, found by bisection over the
//!    bit patterns of non-negative f32 (ordered like their values), so it lands exactly on the
//!    k-th largest `p` without a sort. Ties at the threshold are all kept.
//! 3. top-p: among the kept, the largest threshold `tp` whose kept mass reaches
//!    `top_p * (kept mass)`, by the same bisection: the smallest set of most likely tokens
//!    that reaches p (ties kept).
//! 4. min-p: tokens with `p_i < min_p` go as well (Hugging Face's `min_p` keeps
//!    `prob >= min_p * max prob`, and the largest `p` is 1 here), after top-k and top-p as
//!    there: the threshold is the larger of the two.
//! 5. the draw: `target = u * (final kept mass)`; the token is the first index (vocabulary
//!    order, no sort) whose running kept mass exceeds `target`.
//!
//! Sums differ in order between the reference (sequential) and the kernel (a tree), so a
//! sampled token may differ where `u` falls within float rounding of a bucket edge; greedy
//! agrees exactly.

use candle_core::{DType, Result, Tensor};

use super::registry::{warn_fallback, KernelChoice};
use crate::train::rng::splitmix64;

/// What shapes the distribution a token is drawn from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleParams {
    /// 0 (or less) means greedy.
    pub temperature: f32,
    /// 0 means no top-k filter.
    pub top_k: usize,
    /// 1.0 means no nucleus filter.
    pub top_p: f32,
    /// 0.0 means no min-p filter.
    pub min_p: f32,
    /// 1.0 means no repetition penalty.
    pub repetition_penalty: f32,
}

impl Default for SampleParams {
    /// Plain sampling at temperature 1.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
        }
    }
}

impl SampleParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Whether top-k changes anything for a vocabulary of `v`.
    pub fn filters_top_k(&self, v: usize) -> bool {
        self.top_k > 0 && self.top_k < v
    }

    pub fn filters_top_p(&self) -> bool {
        self.top_p < 1.0
    }

    pub fn filters_min_p(&self) -> bool {
        self.min_p > 0.0
    }

    /// Whether the draw reads which tokens each row has seen.
    pub fn penalizes(&self) -> bool {
        self.repetition_penalty != 1.0
    }
}

/// Step 0 of the module doc for one logit: `z` of a token the row has seen.
pub fn penalized(z: f32, penalty: f32) -> f32 {
    if z < 0.0 {
        z * penalty
    } else {
        z / penalty
    }
}

/// Step 0 over a row: `seen` holds 1 at the tokens the row has seen.
pub fn penalize_row(logits: &mut [f32], seen: &[u8], penalty: f32) {
    for (z, &s) in logits.iter_mut().zip(seen) {
        if s != 0 {
            *z = penalized(*z, penalty);
        }
    }
}

/// The per-row key of the uniform stream: one hash of (seed, global row id), computed once
/// per row on the host.
pub fn row_key(seed: u64, row: u64) -> u64 {
    splitmix64(seed ^ splitmix64(row))
}

/// The uniform in [0, 1) for draw `pos` of the row keyed `key`: 24 bits, so it is exact in
/// f32 and the kernel computes the same number.
pub fn uniform(key: u64, pos: u64) -> f32 {
    let bits = splitmix64(key ^ splitmix64(pos.wrapping_add(0x5A3B)));
    (bits >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// First index of the largest value (NaN-free logits assumed; ties go to the lowest index).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// The unnormalised probabilities of step 1 of the module doc.
fn weights(logits: &[f32], temperature: f32) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let inv_t = 1.0 / temperature;
    logits.iter().map(|&z| ((z - max) * inv_t).exp()).collect()
}

/// The largest threshold `t` in [0, 1] (as f32 bits) for which `holds(t)`; `holds(0)` must be
/// true and `holds` monotone (true below some point, false above).
fn largest_threshold(holds: impl Fn(f32) -> bool) -> f32 {
    let (mut lo, mut hi) = (0u32, 1f32.to_bits() + 1);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if holds(f32::from_bits(mid)) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    f32::from_bits(lo)
}

fn mass_above(p: &[f32], t: f32) -> f64 {
    p.iter().filter(|&&x| x >= t).map(|&x| f64::from(x)).sum()
}

/// The kept-set threshold of steps 2 to 4: tokens with `p_i >= threshold` may be drawn.
pub fn keep_threshold(p: &[f32], params: &SampleParams) -> f32 {
    let mut t = 0.0f32;
    if params.filters_top_k(p.len()) {
        let k = params.top_k;
        t = largest_threshold(|x| p.iter().filter(|&&y| y >= x).count() >= k);
    }
    if params.filters_top_p() {
        let goal = f64::from(params.top_p) * mass_above(p, t);
        let tk = t;
        t = largest_threshold(|x| mass_above(p, x.max(tk)) >= goal).max(tk);
    }
    if params.filters_min_p() {
        t = t.max(params.min_p);
    }
    t
}

/// One row: the token drawn from `logits` (already penalised) under `params` with uniform `u`
/// (the reference).
pub fn sample_row(logits: &[f32], params: &SampleParams, u: f32) -> u32 {
    if params.is_greedy() {
        return argmax(logits);
    }
    let p = weights(logits, params.temperature);
    let t = keep_threshold(&p, params);
    let target = f64::from(u) * mass_above(&p, t);
    let mut acc = 0.0f64;
    let mut last = 0;
    for (i, &x) in p.iter().enumerate() {
        // As the kernel: a zero weight (a logit masked to -inf) is never kept.
        if x >= t && x > 0.0 {
            acc += f64::from(x);
            last = i;
            if acc > target {
                return i as u32;
            }
        }
    }
    last as u32
}

/// Which draw of each row's stream a step takes.
#[derive(Clone, Copy, Debug)]
pub enum Draw<'a> {
    At(u64),
    /// The value of a one-element i64 tensor on the logits' device, read when the sampling
    /// runs: a decode step replayed as a CUDA graph advances it on the device.
    Device(&'a Tensor),
}

impl Draw<'_> {
    /// The draw index, read to the host for [`Draw::Device`].
    fn on_host(self) -> Result<u64> {
        Ok(match self {
            Draw::At(p) => p,
            Draw::Device(t) => t.flatten_all()?.to_vec1::<i64>()?[0] as u64,
        })
    }
}

/// The next token of every row of `logits` (`[B, V]`, any float dtype): `keys` (`[B]` i64, the bits of
/// [`row_key`]) and `pos` give each row's uniform. Returns `[B]` u32 on the logits' device.
pub fn sample(
    logits: &Tensor,
    keys: &Tensor,
    pos: u64,
    params: &SampleParams,
    choice: KernelChoice,
) -> Result<Tensor> {
    sample_draw(logits, keys, Draw::At(pos), None, None, params, choice)
}

/// Tokens held back from the first draws: `mask` (`[V]` f32, 0 or -inf, on the logits'
/// device) is added to every row's logits while the draw index is below `until` (Hugging
/// Face's `min_new_tokens`, with the stop ids at -inf).
#[derive(Clone, Copy, Debug)]
pub struct Hold<'a> {
    pub mask: &'a Tensor,
    pub until: u64,
}

/// [`sample`] at a [`Draw`], with the tokens of `hold` held back while it applies. `seen`
/// (`[B, V]` u8, 1 at the tokens each row already holds, on the logits' device) is what the
/// repetition penalty reads, and each row's drawn token is marked in it, in place; it must be
/// given where `params` penalizes.
pub fn sample_draw(
    logits: &Tensor,
    keys: &Tensor,
    draw: Draw,
    hold: Option<Hold>,
    seen: Option<&Tensor>,
    params: &SampleParams,
    choice: KernelChoice,
) -> Result<Tensor> {
    if let Draw::Device(t) = draw {
        if t.elem_count() != 1 || t.dtype() != DType::I64 {
            candle_core::bail!(
                "sample: the draw index {:?} {:?} is not one i64",
                t.dims(),
                t.dtype()
            );
        }
    }
    if let Some(h) = hold {
        let v = logits.dim(1)?;
        if h.mask.dims() != [v] || h.mask.dtype() != DType::F32 {
            candle_core::bail!("sample: the hold mask {:?} is not [{v}] f32", h.mask.dims());
        }
    }
    match seen {
        Some(s) if s.dims() != logits.dims() || s.dtype() != DType::U8 || !s.is_contiguous() => {
            candle_core::bail!(
                "sample: the seen mask {:?} {:?} is not a contiguous {:?} u8",
                s.dims(),
                s.dtype(),
                logits.dims()
            )
        }
        Some(s) if !s.device().same_device(logits.device()) => {
            candle_core::bail!("sample: the seen mask is on another device than the logits")
        }
        None if params.penalizes() => {
            candle_core::bail!("sample: a repetition penalty needs the rows' seen tokens")
        }
        _ => {}
    }
    if choice == KernelChoice::Custom {
        #[cfg(feature = "cuda")]
        if logits.device().is_cuda() {
            return super::cuda::sample::sample(logits, keys, draw, hold, seen, params);
        }
        if !logits.device().is_cpu() || cfg!(feature = "cuda") {
            warn_fallback("sample", "the sampling kernel runs on CUDA only");
        }
    }
    let pos = draw.on_host()?;
    let ids = match hold {
        Some(h) if pos < h.until => {
            let held = logits.to_dtype(DType::F32)?.broadcast_add(h.mask)?;
            sample_reference(&held, keys, pos, seen, params)?
        }
        _ => sample_reference(logits, keys, pos, seen, params)?,
    };
    if let Some(s) = seen {
        mark_seen(s, &ids)?;
    }
    Ok(ids)
}

/// [`sample`] on the host, row by row with [`sample_row`], each row penalised by its `seen`
/// tokens first where `params` penalizes (`seen` is read, not marked).
pub fn sample_reference(
    logits: &Tensor,
    keys: &Tensor,
    pos: u64,
    seen: Option<&Tensor>,
    params: &SampleParams,
) -> Result<Tensor> {
    let (b, _) = logits.dims2()?;
    let mut rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let keys = keys.to_vec1::<i64>()?;
    if keys.len() != b {
        candle_core::bail!("sample: {} row keys for {b} rows", keys.len());
    }
    if params.penalizes() {
        let Some(seen) = seen else {
            candle_core::bail!("sample: a repetition penalty needs the rows' seen tokens");
        };
        for (row, s) in rows.iter_mut().zip(seen.to_vec2::<u8>()?) {
            penalize_row(row, &s, params.repetition_penalty);
        }
    }
    let ids: Vec<u32> = rows
        .iter()
        .zip(&keys)
        .map(|(row, &k)| sample_row(row, params, uniform(k as u64, pos)))
        .collect();
    Tensor::from_vec(ids, b, logits.device())
}

/// `seen[r, ids[r]] = 1` for every row, in place (`seen` `[B, V]` u8, `ids` `[B]` u32).
pub fn mark_seen(seen: &Tensor, ids: &Tensor) -> Result<()> {
    let b = ids.elem_count();
    let ones = Tensor::ones((b, 1), DType::U8, seen.device())?;
    seen.scatter_set(&ids.to_dtype(DType::U32)?.reshape((b, 1))?, &ones, 1)
}

/// The `[B, V]` u8 mask of the tokens in each of `rows` (a row's prompt, say), which the
/// repetition penalty reads. Only the ids cross to the device, not the mask (`B x V` bytes:
/// 150 MB at 1024 rows of Qwen's vocabulary). A token outside the vocabulary is an error.
pub fn seen_tokens(rows: &[Vec<u32>], v: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let b = rows.len();
    let seen = Tensor::zeros((b, v), DType::U8, dev)?;
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    if width == 0 {
        return Ok(seen);
    }
    // Each row padded to the longest by repeating its first token (marking twice is marking);
    // an empty row writes its 0 over token 0, so that every write to an element agrees.
    let mut ids = Vec::with_capacity(b * width);
    let mut marks = Vec::with_capacity(b * width);
    for (r, row) in rows.iter().enumerate() {
        if let Some(&t) = row.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("sample: token {t} of row {r} is outside the vocabulary of {v}");
        }
        let fill = row.first().copied().unwrap_or(0);
        ids.extend(
            row.iter()
                .copied()
                .chain(std::iter::repeat(fill))
                .take(width),
        );
        marks.extend(std::iter::repeat_n(u8::from(!row.is_empty()), width));
    }
    let ids = Tensor::from_vec(ids, (b, width), dev)?;
    let marks = Tensor::from_vec(marks, (b, width), dev)?;
    seen.scatter_set(&ids, &marks, 1)?;
    Ok(seen)
}

/// `keys` as the `[B]` i64 tensor [`sample`] takes.
pub fn keys_tensor(seed: u64, rows: &[u64], dev: &candle_core::Device) -> Result<Tensor> {
    let k: Vec<i64> = rows.iter().map(|&r| row_key(seed, r) as i64).collect();
    Tensor::from_vec(k, rows.len(), dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampled(temperature: f32, top_k: usize, top_p: f32) -> SampleParams {
        SampleParams {
            temperature,
            top_k,
            top_p,
            ..SampleParams::default()
        }
    }

    /// Pearson's chi-square of draw `counts` against the unnormalised weights `p`.
    fn chi_square(counts: &[usize], p: &[f32]) -> f64 {
        let n = counts.iter().sum::<usize>() as f64;
        let total: f64 = p.iter().map(|&x| f64::from(x)).sum();
        counts
            .iter()
            .zip(p)
            .map(|(&c, &w)| {
                let e = n * f64::from(w) / total;
                (c as f64 - e).powi(2) / e
            })
            .sum()
    }

    fn draws(logits: &[f32], params: &SampleParams, n: u64) -> Vec<usize> {
        let mut counts = vec![0; logits.len()];
        for pos in 0..n {
            counts[sample_row(logits, params, uniform(row_key(9, 3), pos)) as usize] += 1;
        }
        counts
    }

    #[test]
    fn uniforms_are_keyed_by_row_and_position_and_spread_evenly() {
        let k = row_key(1, 2);
        assert_eq!(uniform(k, 5), uniform(row_key(1, 2), 5));
        assert_ne!(uniform(k, 5), uniform(k, 6));
        assert_ne!(uniform(k, 5), uniform(row_key(1, 3), 5));
        assert_ne!(uniform(k, 5), uniform(row_key(2, 2), 5));
        let n = 20_000;
        let mut bins = [0usize; 10];
        for pos in 0..n {
            let u = uniform(k, pos);
            assert!((0.0..1.0).contains(&u));
            bins[(u * 10.0) as usize] += 1;
        }
        for b in bins {
            assert!((b as f64 - 2000.0).abs() < 200.0, "{bins:?}");
        }
    }

    #[test]
    fn greedy_and_top_k_one_take_the_first_largest_logit() {
        let logits = [0.5f32, 3.0, -1.0, 3.0, 2.9];
        assert_eq!(sample_row(&logits, &SampleParams::greedy(), 0.99), 1);
        for pos in 0..200 {
            let u = uniform(row_key(4, 0), pos);
            // Ties at the threshold are kept, so k = 1 keeps both 3.0s: the draw picks one.
            let t = sample_row(&logits, &sampled(0.8, 1, 1.0), u);
            assert!(t == 1 || t == 3, "{t}");
        }
        let distinct = [0.5f32, 3.0, -1.0, 2.99, 2.9];
        for pos in 0..200 {
            let u = uniform(row_key(4, 0), pos);
            assert_eq!(sample_row(&distinct, &sampled(1.3, 1, 1.0), u), 1);
        }
    }

    #[test]
    fn top_k_keeps_exactly_the_k_largest() {
        let logits = [0.0f32, 5.0, 1.0, 4.9, -3.0, 4.0];
        let counts = draws(&logits, &sampled(2.0, 3, 1.0), 3000);
        assert_eq!(counts[0] + counts[2] + counts[4], 0, "{counts:?}");
        assert!(
            counts[1] > 0 && counts[3] > 0 && counts[5] > 0,
            "{counts:?}"
        );
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities at T = 1: ~[0.006, 0.472, 0.017, 0.427, 0.0002, 0.077].
        let logits = [0.0f32, 5.0, 1.0, 4.9, -3.0, 3.3];
        let p = weights(&logits, 1.0);
        let total: f64 = p.iter().map(|&x| f64::from(x)).sum();
        let probs: Vec<f64> = p.iter().map(|&x| f64::from(x) / total).collect();
        // 0.3 is reached by the top token alone; 0.5 needs the top two; 0.95 the top three.
        for (top_p, kept) in [(0.3f32, vec![1]), (0.5, vec![1, 3]), (0.95, vec![1, 3, 5])] {
            let counts = draws(&logits, &sampled(1.0, 0, top_p), 4000);
            let seen: Vec<usize> = (0..6).filter(|&i| counts[i] > 0).collect();
            assert_eq!(seen, kept, "top_p {top_p}: {counts:?} (probs {probs:?})");
            let t = keep_threshold(&p, &sampled(1.0, 0, top_p));
            let set: Vec<usize> = (0..6).filter(|&i| p[i] >= t).collect();
            assert_eq!(set, kept, "top_p {top_p}");
        }
        // With top-k first, p applies to the renormalised top-k mass.
        let t = keep_threshold(&p, &sampled(1.0, 2, 0.6));
        let set: Vec<usize> = (0..6).filter(|&i| p[i] >= t).collect();
        assert_eq!(set, vec![1, 3]);
    }

    #[test]
    fn draws_follow_softmax_at_the_temperature() {
        let logits = [0.3f32, -1.0, 2.0, 0.0, 1.1, -0.4, 1.7];
        let temp = 0.7f32;
        let p = weights(&logits, temp);
        let n = 40_000u64;
        let counts = draws(&logits, &sampled(temp, 0, 1.0), n);
        // Pearson's chi-square with 6 degrees of freedom: P(chi2 > 22.5) ~ 0.001.
        let chi2 = chi_square(&counts, &p);
        assert!(chi2 < 22.5, "chi2 {chi2}: {counts:?}");
    }

    /// A logit masked to -inf, the last one included, is never drawn, however close to 1 the
    /// uniform is and whatever the filters.
    #[test]
    fn masked_logits_are_never_drawn() {
        let row = [1.0f32, f32::NEG_INFINITY, 2.0, 0.5, f32::NEG_INFINITY];
        for params in [
            sampled(1.0, 0, 1.0),
            sampled(0.5, 3, 0.9),
            sampled(4.0, 0, 0.99),
        ] {
            for u in [0.0f32, 0.3, 0.999_999_9, 1.0 - f32::EPSILON] {
                let id = sample_row(&row, &params, u);
                assert!(row[id as usize].is_finite(), "{params:?} u {u}: drew {id}");
            }
        }
    }

    #[test]
    fn min_p_drops_tokens_below_a_share_of_the_most_likely() {
        // Probabilities at T = 1 relative to the largest: [0.0067, 1, 0.018, 0.905, 0.0003, 0.165].
        let logits = [0.0f32, 5.0, 1.0, 4.9, -3.0, 3.2];
        let p = weights(&logits, 1.0);
        for (min_p, kept) in [
            (0.01f32, vec![1, 2, 3, 5]),
            (0.1, vec![1, 3, 5]),
            (0.5, vec![1, 3]),
        ] {
            let params = SampleParams {
                min_p,
                ..sampled(1.0, 0, 1.0)
            };
            let t = keep_threshold(&p, &params);
            let set: Vec<usize> = (0..6).filter(|&i| p[i] >= t).collect();
            assert_eq!(set, kept, "min_p {min_p}");
            let counts = draws(&logits, &params, 4000);
            let seen: Vec<usize> = (0..6).filter(|&i| counts[i] > 0).collect();
            assert_eq!(seen, kept, "min_p {min_p}: {counts:?}");
        }
        // After top-k, as Hugging Face orders them: the stricter of the two wins.
        let params = SampleParams {
            min_p: 0.01,
            ..sampled(1.0, 2, 1.0)
        };
        let t = keep_threshold(&p, &params);
        assert_eq!((0..6).filter(|&i| p[i] >= t).collect::<Vec<_>>(), [1, 3]);
        // At a higher temperature the same min_p keeps more.
        let hot = SampleParams {
            min_p: 0.1,
            ..sampled(3.0, 0, 1.0)
        };
        let ph = weights(&logits, 3.0);
        let t = keep_threshold(&ph, &hot);
        assert_eq!((0..6).filter(|&i| ph[i] >= t).count(), 5);
    }

    #[test]
    fn the_repetition_penalty_shrinks_seen_logits_toward_zero_from_either_side() {
        assert_eq!(penalized(3.0, 1.5), 2.0);
        assert_eq!(penalized(-3.0, 1.5), -4.5);
        assert_eq!(penalized(0.0, 1.5), 0.0);
        assert_eq!(penalized(f32::NEG_INFINITY, 1.5), f32::NEG_INFINITY);
        // Below 1 it favours what was seen.
        assert_eq!(penalized(3.0, 0.5), 6.0);
        let mut row = [2.0f32, 1.9, -1.0, -1.2];
        penalize_row(&mut row, &[1, 0, 1, 0], 1.25);
        assert_eq!(row, [1.6, 1.9, -1.25, -1.2]);
    }

    /// Greedy under a strong penalty, on the same logits step after step: each drawn token is
    /// marked in place, so the next step takes the best one not yet drawn, and a prompt's
    /// tokens start marked.
    #[test]
    fn drawn_tokens_are_marked_and_penalised_from_the_next_step() {
        let dev = candle_core::Device::Cpu;
        let logits = Tensor::new(
            &[[3.0f32, 2.9, 2.8, 2.7, 2.6], [1.0, 0.5, 0.2, 0.9, 0.8]],
            &dev,
        )
        .unwrap();
        let params = SampleParams {
            repetition_penalty: 10.0,
            ..SampleParams::greedy()
        };
        let keys = keys_tensor(1, &[0, 1], &dev).unwrap();
        let seen = seen_tokens(&[vec![], vec![0, 3]], 5, &dev).unwrap();
        let mut got = vec![];
        for pos in 0..4 {
            let ids = sample_draw(
                &logits,
                &keys,
                Draw::At(pos),
                None,
                Some(&seen),
                &params,
                KernelChoice::Reference,
            )
            .unwrap();
            got.push(ids.to_vec1::<u32>().unwrap());
        }
        assert_eq!(got, [[0, 4], [1, 1], [2, 2], [3, 0]]);
        assert_eq!(
            seen.to_vec2::<u8>().unwrap(),
            [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
        );
        let err = sample_draw(
            &logits,
            &keys,
            Draw::At(0),
            None,
            None,
            &params,
            KernelChoice::Reference,
        )
        .unwrap_err();
        assert!(err.to_string().contains("seen tokens"), "{err}");
        let err = seen_tokens(&[vec![5]], 5, &dev).unwrap_err();
        assert!(err.to_string().contains("token 5 of row 0"), "{err}");
        let mask = seen_tokens(&[vec![3, 1, 3], vec![], vec![4]], 5, &dev).unwrap();
        assert_eq!(
            mask.to_vec2::<u8>().unwrap(),
            [[0, 1, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]
        );
    }

    /// Sampled draws follow the softmax of the penalised logits.
    #[test]
    fn penalised_draws_follow_the_penalised_softmax() {
        let dev = candle_core::Device::Cpu;
        let raw = [0.3f32, -1.0, 2.0, 0.0, 1.1];
        let mask = [0u8, 1, 1, 0, 1];
        let params = SampleParams {
            repetition_penalty: 1.8,
            ..sampled(0.9, 0, 1.0)
        };
        let mut want = raw;
        penalize_row(&mut want, &mask, 1.8);
        let p = weights(&want, 0.9);
        let logits = Tensor::new(&[raw], &dev).unwrap();
        let seen = Tensor::new(&[mask], &dev).unwrap();
        let keys = keys_tensor(5, &[2], &dev).unwrap();
        let n = 20_000u64;
        let mut counts = [0usize; 5];
        for pos in 0..n {
            let id = sample_reference(&logits, &keys, pos, Some(&seen), &params).unwrap();
            counts[id.to_vec1::<u32>().unwrap()[0] as usize] += 1;
        }
        // 4 degrees of freedom: P(chi2 > 18.5) ~ 0.001.
        let chi2 = chi_square(&counts, &p);
        assert!(chi2 < 18.5, "chi2 {chi2}: {counts:?}");
    }

    #[test]
    fn the_batch_op_samples_each_row_from_its_own_key() {
        let dev = candle_core::Device::Cpu;
        let rows = [
            [0.0f32, 1.0, 2.0, 0.5],
            [2.0, 1.0, 0.0, 1.5],
            [0.1, 0.2, 0.3, 0.4],
        ];
        let logits = Tensor::new(&rows, &dev).unwrap();
        let params = sampled(1.0, 0, 0.9);
        let keys = keys_tensor(11, &[7, 8, 9], &dev).unwrap();
        let all = sample(&logits, &keys, 3, &params, KernelChoice::Custom)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        for (i, row) in rows.iter().enumerate() {
            let one = Tensor::new(&[*row], &dev).unwrap();
            let key = keys_tensor(11, &[7 + i as u64], &dev).unwrap();
            let alone = sample(&one, &key, 3, &params, KernelChoice::Reference)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap();
            assert_eq!(alone[0], all[i], "row {i}");
        }
    }
}
