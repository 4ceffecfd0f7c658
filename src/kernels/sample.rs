//! Next-token sampling from a batch of logits `[B, V]`: temperature, top-k, top-p, with each
//! row's uniform draw taken from a counter-based hash of (seed, global row id, position).
//!
//! Why counter-based: a row's tokens must not depend on which batch, rank or slot it was
//! generated in (data-parallel rollouts split a batch across ranks; the engine compacts
//! finished rows away and shares a prompt's prefill across its group). A sequential stream
//! would tie every draw to the draws before it in the batch.
//!
//! The maths, shared by the reference below and `kernels/sample.cu`:
//! 1. `p_i = exp((z_i - max z) / T)` in f32 (unnormalised; the largest is exactly 1). `T <= 0`
//!    is greedy: the first index of the largest logit, no draw.
//! 2. top-k: the largest threshold `tk` with `#{p_i >= tk} >= k`, found by bisection over the
//!    bit patterns of non-negative f32 (ordered like their values), so it lands exactly on the
//!    k-th largest `p` without a sort. Ties at the threshold are all kept.
//! 3. top-p: among the kept, the largest threshold `tp` whose kept mass reaches
//!    `top_p * (kept mass)`, by the same bisection: the smallest set of most likely tokens
//!    that reaches p (ties kept).
//! 4. the draw: `target = u * (final kept mass)`; the token is the first index (vocabulary
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
}

impl SampleParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
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

/// The kept-set threshold of steps 2 and 3: tokens with `p_i >= threshold` may be drawn.
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
    t
}

/// One row: the token drawn from `logits` under `params` with uniform `u` (the reference).
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
    sample_draw(logits, keys, Draw::At(pos), None, params, choice)
}

/// Tokens held back from the first draws: `mask` (`[V]` f32, 0 or -inf, on the logits'
/// device) is added to every row's logits while the draw index is below `until` (Hugging
/// Face's `min_new_tokens`, with the stop ids at -inf).
#[derive(Clone, Copy, Debug)]
pub struct Hold<'a> {
    pub mask: &'a Tensor,
    pub until: u64,
}

/// [`sample`] at a [`Draw`], with the tokens of `hold` held back while it applies.
pub fn sample_draw(
    logits: &Tensor,
    keys: &Tensor,
    draw: Draw,
    hold: Option<Hold>,
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
    if choice == KernelChoice::Custom {
        #[cfg(feature = "cuda")]
        if logits.device().is_cuda() {
            return super::cuda::sample::sample(logits, keys, draw, hold, params);
        }
        if !logits.device().is_cpu() || cfg!(feature = "cuda") {
            warn_fallback("sample", "the sampling kernel runs on CUDA only");
        }
    }
    let pos = draw.on_host()?;
    match hold {
        Some(h) if pos < h.until => {
            let held = logits.to_dtype(DType::F32)?.broadcast_add(h.mask)?;
            sample_reference(&held, keys, pos, params)
        }
        _ => sample_reference(logits, keys, pos, params),
    }
}

/// [`sample`] on the host, row by row with [`sample_row`].
pub fn sample_reference(
    logits: &Tensor,
    keys: &Tensor,
    pos: u64,
    params: &SampleParams,
) -> Result<Tensor> {
    let (b, _) = logits.dims2()?;
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let keys = keys.to_vec1::<i64>()?;
    if keys.len() != b {
        candle_core::bail!("sample: {} row keys for {b} rows", keys.len());
    }
    let ids: Vec<u32> = rows
        .iter()
        .zip(&keys)
        .map(|(row, &k)| sample_row(row, params, uniform(k as u64, pos)))
        .collect();
    Tensor::from_vec(ids, b, logits.device())
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
        }
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
        let total: f64 = p.iter().map(|&x| f64::from(x)).sum();
        let n = 40_000u64;
        let counts = draws(&logits, &sampled(temp, 0, 1.0), n);
        // Pearson's chi-square with 6 degrees of freedom: P(chi2 > 22.5) ~ 0.001.
        let chi2: f64 = counts
            .iter()
            .zip(&p)
            .map(|(&c, &w)| {
                let e = n as f64 * f64::from(w) / total;
                (c as f64 - e).powi(2) / e
            })
            .sum();
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
