//! A reward model's head as a one-label classifier holds it, both ways.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

/// A one-label classifier's `score.weight` (`[1, H]`) or `score.bias` (`[1]`) as temper's
/// reward head holds it (`[H]`, `[1]`).
pub fn score_to_temper(name: &str, t: &Tensor, hidden: usize) -> Result<(String, Tensor)> {
    match name {
        "score.weight" if t.dims() == [1, hidden] => Ok((name.into(), t.reshape(hidden)?)),
        "score.bias" if t.dims() == [1] => Ok((name.into(), t.clone())),
        "score.weight" | "score.bias" => bail!(
            "shape {:?}: a one-label score head over {hidden} hidden units wants {}",
            t.dims(),
            if name == "score.weight" {
                format!("[1, {hidden}]")
            } else {
                "[1]".into()
            }
        ),
        _ => bail!("not a weight of a reward model's score head"),
    }
}

/// temper's reward head has a bias, a classifier's score layer none: where `tensors` (with
/// their `score.weight`) hold no `score.bias`, `bias` (temper's own, kept beside the config)
/// or 0.
pub fn fill_score_bias(tensors: &mut HashMap<String, Tensor>, bias: f32) -> Result<()> {
    if tensors.contains_key("score.bias") {
        return Ok(());
    }
    let device = tensors
        .get("score.weight")
        .context("a reward head without its score.weight")?
        .device()
        .clone();
    tensors.insert("score.bias".into(), Tensor::new(&[bias], &device)?);
    Ok(())
}

/// The `config.json` field that carries temper's reward bias, which a Hugging Face
/// classifier's score layer has no place for: transformers keeps it as an attribute and
/// leaves it out of its scores; temper reads it back into `score.bias`.
pub const SCORE_BIAS_FIELD: &str = "temper_score_bias";

/// A reward model's head as a one-label classifier's `score.weight` (`[1, H]`) and the bias
/// that has no place there (Adam moves it off zero even where its gradient is zero but for
/// rounding; `center_rewards_coefficient` trains it).
pub fn score_to_hf(w: &Tensor, b: &Tensor) -> Result<(Tensor, f32)> {
    let bias = b.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok((
        w.reshape((1, w.elem_count()))?,
        bias.first().copied().unwrap_or(0.0),
    ))
}
