//! Task accuracy: greedy answers to held-out prompts, judged by the programmatic checker
//! (exact match against each prompt's `answer`), and what the RL stages report.

use std::path::Path;

use anyhow::{bail, Result};

use crate::config::Stage;
use crate::data::records::{place, PromptRecord};
use crate::data::synthetic::{exact_match, unmatchable, Split, Synthetic};
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
        accuracy(net, ctx, tok, prompts, max_new_tokens, (64, false))?.accuracy,
    ))
}

/// Where a setting of the built-in task's world came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The command line (`--task-seed`).
    Given,
    /// The checkpoint's run's `config.toml`.
    Checkpoint,
    /// temper's default: the checkpoint's run records none (a Hugging Face model, a run on
    /// the user's data, a checkpoint away from its run directory).
    Default,
}

impl Source {
    fn said(self) -> &'static str {
        match self {
            Source::Given => "given",
            Source::Checkpoint => "the checkpoint's run's",
            Source::Default => "the default: the checkpoint's run records none",
        }
    }
}

/// The built-in task's world `temper eval` scores a checkpoint in, with where its settings
/// came from.
#[derive(Clone, Debug)]
pub struct TaskWorld {
    pub task: Synthetic,
    pub seed_from: Source,
    pub max_operand_from: Source,
    /// The seed the checkpoint's run trained in, where its run records one.
    pub trained_seed: Option<u64>,
}

impl TaskWorld {
    /// The world the checkpoint `checkpoint` was trained in, as later stages take it from
    /// their `--init` run ([`inherit_task_world`](crate::stages::setup::inherit_task_world)):
    /// its held-out pairs are the ones its training never saw. `seed` (`--task-seed`), where
    /// given, replaces the seed; the operand range stays the checkpoint's.
    pub fn of_checkpoint(checkpoint: &Path, seed: Option<u64>) -> Result<Self> {
        let (recorded_seed, recorded_max) = crate::stages::setup::recorded_task_world(checkpoint)?;
        let defaults = Synthetic::default();
        let from = |recorded: bool| match recorded {
            true => Source::Checkpoint,
            false => Source::Default,
        };
        let (seed, seed_from) = match (seed, recorded_seed) {
            (Some(s), _) => (s, Source::Given),
            (None, r) => (r.unwrap_or(defaults.seed), from(r.is_some())),
        };
        let mut task = Synthetic::new(seed);
        task.max_operand = recorded_max.unwrap_or(defaults.max_operand);
        Ok(Self {
            task,
            seed_from,
            max_operand_from: from(recorded_max.is_some()),
            trained_seed: recorded_seed,
        })
    }

    /// What to say of a `--task-seed` other than the one the checkpoint's run trained in: each
    /// seed holds out other pairs, so some this world holds out are ones that run trained on,
    /// and the accuracy is no held-out one.
    pub fn other_world(&self) -> Option<String> {
        let trained = self.trained_seed?;
        (self.seed_from == Source::Given && trained != self.task.seed).then(|| {
            format!(
                "warning: --task-seed {}: the checkpoint's run trained in task_seed {trained}'s \
                 world, whose training pairs include some that this one holds out, so the \
                 accuracy is not a held-out one (without --task-seed, eval scores the run's own)",
                self.task.seed
            )
        })
    }

    /// Every held-out pair of the world, once, in order.
    pub fn prompts(&self) -> Vec<PromptRecord> {
        self.task.prompts(Split::Eval, usize::MAX)
    }

    /// The settings, for the user: `task_seed 3 (given), task_max_operand 29 (the
    /// checkpoint's run's)`.
    pub fn describe(&self) -> String {
        format!(
            "task_seed {} ({}), task_max_operand {} ({})",
            self.task.seed,
            self.seed_from.said(),
            self.task.max_operand,
            self.max_operand_from.said()
        )
    }
}

/// What to say of answers longer in tokens than `max_new_tokens` (named `setting` for the
/// user): no response within it can match them, so they count as wrong whatever the model
/// learnt. Said, not refused: a model may spell an answer in fewer tokens than its encoding
/// alone takes.
pub fn answers_out_of_reach(
    tok: &Tokenizer,
    prompts: &[PromptRecord],
    (setting, max_new_tokens): (&str, usize),
) -> Result<Option<String>> {
    let (mut count, mut first, mut answers) = (0, None, 0);
    for (i, p) in prompts.iter().enumerate() {
        let Some(answer) = &p.answer else { continue };
        answers += 1;
        let n = tok.encode(answer.trim())?.len();
        if n > max_new_tokens {
            count += 1;
            first.get_or_insert_with(|| (place(&p.origin, "prompt", i), n));
        }
    }
    Ok(first.map(|(at, n)| {
        format!(
            "warning: {count} of {answers} answers take more tokens than {setting} {max_new_tokens} \
             lets a response have (the first, {at}, takes {n}), so they count as wrong"
        )
    }))
}

/// Greedy decoding of every prompt (in batches), scored by exact match; with a line (or bar)
/// per batch where `shown` and there is more than one batch.
pub fn accuracy(
    net: &Transformer,
    ctx: Ctx,
    tok: &Tokenizer,
    prompts: &[PromptRecord],
    max_new_tokens: usize,
    (batch, shown): (usize, bool),
) -> Result<Accuracy> {
    if prompts.is_empty() {
        bail!("no evaluation prompts");
    }
    // Every answer is there before any prompt is decoded.
    let answers: Vec<&str> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| match (&p.answer, &p.origin) {
            (Some(a), _) => match unmatchable(a) {
                Some(why) => bail!(
                    "{}: field \"answer\": {why} (accuracy is an exact match with it)",
                    place(&p.origin, "prompt", i)
                ),
                None => Ok(a.as_str()),
            },
            (None, Some(at)) => {
                bail!(
                    "{at}: field \"answer\": missing or null (accuracy is an exact match with it)"
                )
            }
            (None, None) => bail!("prompt {:?} has no `answer` to check against", p.prompt),
        })
        .collect::<Result<_>>()?;
    let batch = batch.max(1);
    let progress = (shown && prompts.len() > batch)
        .then(|| crate::train::progress::Progress::new("eval", 0, prompts.len()).unit("prompts"));
    let cfg = SampleCfg {
        max_new_tokens,
        temperature: 0.0,
        stop: vec!["\n".into()],
        ..Default::default()
    };
    let mut correct = 0;
    let mut samples = Vec::new();
    for (c, chunk) in prompts.chunks(batch).enumerate() {
        let first = c * batch;
        let ids: Vec<Vec<u32>> = chunk.iter().map(|p| p.ids(tok)).collect::<Result<_>>()?;
        let keys = RowKeys::range(0, first as u64, ids.len());
        let g = generate(net, ctx, tok, &ids, &cfg, &keys)?;
        for ((p, text), answer) in chunk.iter().zip(g.texts).zip(&answers[first..]) {
            let ok = exact_match(&text, answer);
            correct += ok as usize;
            if samples.len() < 8 {
                samples.push((p.prompt.clone(), text, ok));
            }
        }
        if let Some(pr) = &progress {
            let done = first + chunk.len();
            pr.update(
                done,
                &format!("accuracy {:.4}", correct as f64 / done as f64),
            );
        }
    }
    if let Some(pr) = &progress {
        pr.finish();
    }
    Ok(Accuracy {
        accuracy: correct as f64 / prompts.len() as f64,
        n: prompts.len(),
        samples,
    })
}

/// What PPO and GRPO report on held-out prompts: greedy accuracy and mean reward, with the
/// last training rollout's KL to the reference as it was sampled (logged as `rollout_kl`:
/// not a held-out number, and a rollout behind the steps since), and PPO's KL coefficient.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
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
        f.extend(self.kl.map(|kl| ("rollout_kl", kl)));
        f.extend(self.beta.map(|b| ("beta", b)));
        f
    }
}

/// " (from X)" where the start was measured: prompts without answers score no accuracy, and
/// a run resumed from a checkpoint written before checkpoints kept the start has none.
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
/// number was not measured (see [`PolicyEval`]; a start a resumed run's checkpoint did not
/// keep).
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
            Some(kl) => format!("KL to reference {kl:.4} (its last rollout's)"),
            None => "no reference (beta = 0)".to_string(),
        };
        format!("{}: {accuracy}, {reward}, {kl}", self.stage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `temper eval` scores a checkpoint in the world its run trained in (the run's
    /// config.toml, found from the run directory, its final/ or a step checkpoint), a given
    /// seed in place of the run's; a checkpoint whose run records no world gets the defaults.
    #[test]
    fn eval_takes_the_task_world_from_the_checkpoints_run() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run");
        let step = run.join("checkpoints").join("step_00000002");
        for ckpt in [run.join("final"), step.clone()] {
            std::fs::create_dir_all(&ckpt).unwrap();
            std::fs::write(ckpt.join("meta.json"), "{}").unwrap();
        }
        let world = |dir: &Path, seed| TaskWorld::of_checkpoint(dir, seed).unwrap();
        // No config.toml: the defaults.
        let w = world(&run, None);
        assert_eq!((w.task.seed, w.task.max_operand), (0, 19));
        assert_eq!(
            (w.seed_from, w.max_operand_from),
            (Source::Default, Source::Default)
        );
        assert_eq!(
            w.describe(),
            "task_seed 0 (the default: the checkpoint's run records none), task_max_operand 19 \
             (the default: the checkpoint's run records none)"
        );
        std::fs::write(
            run.join("config.toml"),
            "stage = \"pretrain\"\n[data]\ntask_seed = 3\ntask_max_operand = 29\n",
        )
        .unwrap();
        for dir in [run.clone(), run.join("final"), step] {
            let w = world(&dir, None);
            assert_eq!(
                (w.task.seed, w.task.max_operand),
                (3, 29),
                "{}",
                dir.display()
            );
            assert_eq!(w.seed_from, Source::Checkpoint);
            assert_eq!(w.max_operand_from, Source::Checkpoint);
            let mut want = Synthetic::new(3);
            want.max_operand = 29;
            let pairs: Vec<String> = w.prompts().into_iter().map(|p| p.prompt).collect();
            let held: Vec<String> = want
                .prompts(Split::Eval, usize::MAX)
                .into_iter()
                .map(|p| p.prompt)
                .collect();
            assert_eq!(pairs, held);
            // Operands past the default range are tested.
            let operands = |p: &str| -> Vec<u32> {
                let sum = p.strip_prefix("Q: ").unwrap().lines().next().unwrap();
                sum.split('+').map(|x| x.parse().unwrap()).collect()
            };
            assert!(pairs.iter().any(|p| operands(p).iter().any(|&x| x > 19)));
        }
        // A seed given wins; the operand range stays the run's.
        let w = world(&run, Some(0));
        assert_eq!((w.task.seed, w.task.max_operand), (0, 29));
        assert_eq!(
            (w.seed_from, w.max_operand_from),
            (Source::Given, Source::Checkpoint)
        );
        assert_eq!(
            w.describe(),
            "task_seed 0 (given), task_max_operand 29 (the checkpoint's run's)"
        );
        // Another seed than the run's is said to be no held-out measure; its own is not.
        let said = w.other_world().expect("seed 0 against the run's 3");
        assert!(said
            .starts_with("warning: --task-seed 0: the checkpoint's run trained in task_seed 3's"));
        assert!(world(&run, Some(3)).other_world().is_none());
        assert!(world(&run, None).other_world().is_none());
        // A run on the user's data trained in no world of the built-in task.
        std::fs::write(
            run.join("config.toml"),
            "[data]\npath = \"x.jsonl\"\ntask_seed = 3\n",
        )
        .unwrap();
        let w = world(&run, None);
        assert_eq!((w.task.seed, w.task.max_operand), (0, 19));
        assert_eq!(w.seed_from, Source::Default);
    }

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
             0.250, KL to reference 0.0100 (its last rollout's)"
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
