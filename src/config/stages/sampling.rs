//! The checks every sampling stage shares: temperatures, clipping knobs, response
//! lengths and the sampling filters.

use anyhow::{bail, Result};

/// A finite number above zero (NaN is not).
pub(crate) fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

/// The lowest sampling temperature taken. Below it sampling is greedy in all but name (as
/// vLLM treats it), and far below it the logits over it overflow: 1e-40 sampled NUL bytes
/// and stopped RL runs at a NaN loss that named nothing.
pub const MIN_TEMPERATURE: f64 = 1e-5;

/// Whether `t` samples: finite and at least [`MIN_TEMPERATURE`].
fn samples_at(t: f64) -> bool {
    t.is_finite() && t >= MIN_TEMPERATURE
}

/// Whether `t` is greedy (0) or samples: what generation takes, from a flag or a model's
/// generation_config.json.
pub fn greedy_or_sampling(t: f64) -> bool {
    t == 0.0 || samples_at(t)
}

/// What [`greedy_or_sampling`] takes, in words.
pub fn greedy_or_sampling_words() -> String {
    format!(
        "0 (greedy) or a finite number of at least {}",
        crate::config::shown_f64(MIN_TEMPERATURE)
    )
}

/// A sampling temperature at least [`MIN_TEMPERATURE`], finite, else the line that says so.
pub(crate) fn check_temperature(key: &str, t: f64) -> Result<()> {
    if !samples_at(t) {
        bail!(
            "{key} must be at least {} and finite, got {}",
            crate::config::shown_f64(MIN_TEMPERATURE),
            crate::config::shown_f64(t)
        );
    }
    Ok(())
}

/// Checks shared by the RL stages' sampling and clipping knobs.
pub(super) fn check_sampling(
    stage: &str,
    temperature: f64,
    clip: f64,
    clip_high: Option<f64>,
) -> Result<()> {
    check_temperature(&format!("{stage}.temperature"), temperature)?;
    if !positive(clip) {
        bail!("{stage}.cliprange must be positive, got {clip}");
    }
    if let Some(h) = clip_high.filter(|h| !positive(*h)) {
        bail!("{stage}.epsilon_high must be positive, got {h}");
    }
    Ok(())
}

/// A rollout's response length: a response of no tokens has nothing to train.
pub(crate) fn check_new_tokens(stage: &str, n: usize) -> Result<()> {
    if n == 0 {
        bail!("{stage}.max_new_tokens must be positive");
    }
    Ok(())
}

/// The sampling filters a stage's rollouts take (`top_k` needs no check).
pub(crate) fn check_filters(stage: &str, top_p: f64, min_p: f64, penalty: f64) -> Result<()> {
    if !(top_p > 0.0 && top_p <= 1.0) {
        bail!("{stage}.top_p must be in (0, 1], got {top_p}");
    }
    if !(0.0..=1.0).contains(&min_p) {
        bail!("{stage}.min_p must be in [0, 1], got {min_p}");
    }
    if !positive(penalty) {
        bail!("{stage}.repetition_penalty must be positive (1: none), got {penalty}");
    }
    Ok(())
}
