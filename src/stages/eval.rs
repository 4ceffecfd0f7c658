//! Task accuracy: greedy answers to held-out prompts, judged by the programmatic checker
//! (exact match against each prompt's `answer`), and what the RL stages report.

use anyhow::{bail, Result};

use crate::config::Stage;
use crate::data::records::PromptRecord;
use crate::data::synthetic::exact_match;
use crate::data::tokenizer::Tokenizer;
use crate::generate::{generate, RowKeys, SampleCfg};
use crate::model::linear::Ctx;
use crate::model::Transformer;
use crate::train::runner::{Report, TrainSummary};

pub struct Accuracy {
    pub accuracy: f64,
    pub n: usize,
    pub samples: Vec<(String, String, bool)>,
}

/// What a stage's summary says where it ran no held-out evaluation (a resumed run that had
/// finished, say).
pub const NOT_EVALUATED: &str = "no held-out evaluation ran";

/// What a preference stage's summary says where [`task_accuracy`] is None: it covers both
/// cases, no held-out prompts (a user's pairs or records) and one without an answer.
pub const NO_TASK_ACCURACY: &str =
    "no task accuracy (no held-out prompts, or one has no answer to check against)";

/// The held-out task accuracy the preference stages report: [`accuracy`] over `prompts` in
/// batches of 64, or None where there are none or some have no answer (a user's data).
pub fn task_accuracy(
    net: &Transformer,
    ctx: Ctx,
    tok: &Tokenizer,
    prompts: &[PromptRecord],
    max_new_tokens: usize,
) -> Result<Option<f64>> {
    if prompts.is_empty() || prompts.iter().any(|p| p.answer.is_none()) {
        return Ok(None);
    }
    Ok(Some(
        accuracy(net, ctx, tok, prompts, max_new_tokens, 64)?.accuracy,
    ))
}

/// Greedy decoding of every prompt (in batches), scored by exact match.
pub fn accuracy(
    net: &Transformer,
    ctx: Ctx,
    tok: &Tokenizer,
    prompts: &[PromptRecord],
    max_new_tokens: usize,
    batch: usize,
) -> Result<Accuracy> {
    if prompts.is_empty() {
        bail!("no evaluation prompts");
    }
    let cfg = SampleCfg {
        max_new_tokens,
        temperature: 0.0,
        stop: vec!["\n".into()],
        ..Default::default()
    };
    let mut correct = 0;
    let mut samples = Vec::new();
    for (c, chunk) in prompts.chunks(batch.max(1)).enumerate() {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|p| p.ids(tok)).collect::<Result<_>>()?;
        let keys = RowKeys::range(0, (c * batch.max(1)) as u64, ids.len());
        let g = generate(net, ctx, tok, &ids, &cfg, &keys)?;
        for (p, text) in chunk.iter().zip(g.texts) {
            let Some(answer) = &p.answer else {
                match &p.origin {
                    Some(at) => bail!(
                        "{at}: field \"answer\": missing (accuracy is an exact match with it)"
                    ),
                    None => bail!("prompt {:?} has no `answer` to check against", p.prompt),
                }
            };
            let ok = exact_match(&text, answer);
            correct += ok as usize;
            if samples.len() < 8 {
                samples.push((p.prompt.clone(), text, ok));
            }
        }
    }
    Ok(Accuracy {
        accuracy: correct as f64 / prompts.len() as f64,
        n: prompts.len(),
        samples,
    })
}

/// What PPO and GRPO report on held-out prompts: greedy accuracy and mean reward, with the
/// last rollout's KL to the reference (and PPO's KL coefficient).
#[derive(Clone, Debug)]
pub struct PolicyEval {
    /// None where some held-out prompt has no answer to check against (a user's prompts
    /// scored by a reward of their own).
    pub accuracy: Option<f64>,
    /// None where no reward scored any held-out response.
    pub mean_reward: Option<f64>,
    /// KL to the reference; None where the stage holds none (GRPO with beta = 0).
    pub kl: Option<f64>,
    pub beta: Option<f64>,
}

impl Report for PolicyEval {
    fn fields(&self) -> Vec<(&'static str, f64)> {
        let mut f = vec![];
        f.extend(self.accuracy.map(|a| ("accuracy", a)));
        f.extend(self.mean_reward.map(|r| ("mean_reward", r)));
        f.extend(self.kl.map(|kl| ("kl", kl)));
        f.extend(self.beta.map(|b| ("beta", b)));
        f
    }
}

/// " (from X)" where the start was measured: a resumed run evaluates no start, and prompts
/// without answers score no accuracy.
pub fn from_start(x: Option<f64>) -> String {
    match x {
        Some(x) => format!(" (from {x:.3})"),
        None => String::new(),
    }
}

/// `what X (from Y)` where `what` was measured, else `missing`: a summary says what it could
/// not score rather than print NaN.
pub fn measured(what: &str, end: Option<f64>, start: Option<f64>, missing: &str) -> String {
    match end {
        Some(x) => format!("{what} {x:.3}{}", from_start(start)),
        None => missing.to_string(),
    }
}

/// An RL stage's outcome: where the policy ended, against where it started. None where a
/// number was not measured (see [`PolicyEval`]; a resumed run measures no start).
pub struct PolicyResult {
    pub stage: Stage,
    /// Whether a held-out evaluation ran at all.
    pub evaluated: bool,
    pub accuracy: Option<f64>,
    pub start_accuracy: Option<f64>,
    pub mean_reward: Option<f64>,
    pub start_mean_reward: Option<f64>,
    /// None without a reference (GRPO with beta = 0).
    pub kl: Option<f64>,
}

impl PolicyResult {
    pub fn from_summary(stage: Stage, s: &TrainSummary<PolicyEval>) -> Self {
        let last = s.last_eval.as_ref();
        let first = s.first_eval.as_ref();
        Self {
            stage,
            evaluated: last.is_some(),
            accuracy: last.and_then(|e| e.accuracy),
            start_accuracy: first.and_then(|e| e.accuracy),
            mean_reward: last.and_then(|e| e.mean_reward),
            start_mean_reward: first.and_then(|e| e.mean_reward),
            kl: last.and_then(|e| e.kl),
        }
    }

    pub fn describe(&self) -> String {
        if !self.evaluated {
            return format!("{}: {NOT_EVALUATED}", self.stage);
        }
        let accuracy = measured(
            "accuracy",
            self.accuracy,
            self.start_accuracy,
            "no accuracy (a held-out prompt has no answer to check against)",
        );
        let reward = measured(
            "mean reward",
            self.mean_reward,
            self.start_mean_reward,
            "no mean reward (no reward scored a held-out response)",
        );
        let kl = match self.kl {
            Some(kl) => format!("KL to reference {kl:.4}"),
            None => "no reference (beta = 0)".to_string(),
        };
        format!("{}: {accuracy}, {reward}, {kl}", self.stage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(accuracy: Option<f64>, mean_reward: Option<f64>) -> PolicyResult {
        PolicyResult {
            stage: Stage::Grpo,
            evaluated: true,
            accuracy,
            start_accuracy: accuracy.map(|a| a / 2.0),
            mean_reward,
            start_mean_reward: None,
            kl: Some(0.01),
        }
    }

    /// Prompts without answers, or responses no reward scored, leave a number unmeasured: the
    /// summary and the metrics log say so, and hold no NaN.
    #[test]
    fn an_unmeasured_number_is_said_not_printed_as_nan() {
        let line = result(None, Some(0.25)).describe();
        assert_eq!(
            line,
            "grpo: no accuracy (a held-out prompt has no answer to check against), mean reward \
             0.250, KL to reference 0.0100"
        );
        let line = result(Some(0.5), None).describe();
        assert!(
            line.starts_with("grpo: accuracy 0.500 (from 0.250), no mean reward"),
            "{line}"
        );
        let none = PolicyResult {
            evaluated: false,
            ..result(None, None)
        };
        assert_eq!(none.describe(), "grpo: no held-out evaluation ran");
        let eval = PolicyEval {
            accuracy: None,
            mean_reward: Some(0.25),
            kl: None,
            beta: None,
        };
        assert_eq!(eval.fields(), vec![("mean_reward", 0.25)]);
    }
}
