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
    pub accuracy: f64,
    pub mean_reward: f64,
    /// KL to the reference; None where the stage holds none (GRPO with beta = 0).
    pub kl: Option<f64>,
    pub beta: Option<f64>,
}

impl Report for PolicyEval {
    fn fields(&self) -> Vec<(&'static str, f64)> {
        let mut f = vec![
            ("accuracy", self.accuracy),
            ("mean_reward", self.mean_reward),
        ];
        f.extend(self.kl.map(|kl| ("kl", kl)));
        f.extend(self.beta.map(|b| ("beta", b)));
        f
    }
}

/// " (from X)" where the start was measured: a resumed run evaluates no start, and prompts
/// without answers score no accuracy.
pub fn from_start(x: f64) -> String {
    match x.is_nan() {
        true => String::new(),
        false => format!(" (from {x:.3})"),
    }
}

/// An RL stage's outcome: where the policy ended, against where it started.
pub struct PolicyResult {
    pub stage: Stage,
    pub accuracy: f64,
    pub start_accuracy: f64,
    pub mean_reward: f64,
    pub start_mean_reward: f64,
    /// None without a reference (GRPO with beta = 0).
    pub kl: Option<f64>,
}

impl PolicyResult {
    pub fn from_summary(stage: Stage, s: &TrainSummary<PolicyEval>) -> Self {
        let last = s.last_eval.as_ref();
        let first = s.first_eval.as_ref();
        Self {
            stage,
            accuracy: last.map_or(f64::NAN, |e| e.accuracy),
            start_accuracy: first.map_or(f64::NAN, |e| e.accuracy),
            mean_reward: last.map_or(f64::NAN, |e| e.mean_reward),
            start_mean_reward: first.map_or(f64::NAN, |e| e.mean_reward),
            kl: last.and_then(|e| e.kl),
        }
    }

    pub fn describe(&self) -> String {
        let evaluated = !(self.accuracy.is_nan() && self.mean_reward.is_nan());
        format!(
            "{}: accuracy {:.3}{}, mean reward {:.3}{}, {}",
            self.stage,
            self.accuracy,
            from_start(self.start_accuracy),
            self.mean_reward,
            from_start(self.start_mean_reward),
            match (self.kl, evaluated) {
                (Some(kl), _) => format!("KL to reference {kl:.4}"),
                (None, true) => "no reference (beta = 0)".to_string(),
                (None, false) => "no held-out evaluation ran".to_string(),
            }
        )
    }
}
