//! The sequence score of PPO and GRPO: a weighted sum of sources, each of which is the task's
//! checker, a frozen reward model, a user's process (`cmd:PROGRAM`) or a user's HTTP endpoint
//! (`http://HOST:PORT/PATH`). Every source's scores are kept apart as well as summed, so a
//! completion log can show which source gave what. A source that cannot score a batch stops
//! the run with an error naming it: a rollout is never silently scored 0.

mod command;
mod http;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde_json::{Map, Value};

use super::loader::{read_checkpoint, scored_from, Loaded};
use super::reward::Scorer;
use crate::config::{ExternalRewardConfig, RewardSource, RewardSpec};
use crate::data::records::{place, PromptRecord};
use crate::data::synthetic::{exact_match, unmatchable};
use crate::data::tokenizer::Tokenizer;
use crate::model::linear::Ctx;
use crate::train::params::{Net, ParamStore, Role};

pub use command::CommandReward;
pub use http::HttpReward;

/// A user-defined reward: scores a batch of `{prompt, response, ...record fields}` requests.
pub trait External {
    fn score(&mut self, requests: &[Value]) -> Result<Vec<f64>>;
}

enum Kind {
    Task,
    /// A frozen reward model (its tensors outlive the store that created them).
    Model(Box<Scorer>),
    External(Box<dyn External>),
}

struct Source {
    name: String,
    weight: f64,
    kind: Kind,
}

pub struct RewardFn {
    sources: Vec<Source>,
    pub names: Vec<String>,
    /// Whether reward models score the sequences packed (the RL stage's `packing`).
    pub pack_models: bool,
}

/// One batch's scores: the weighted total, and each source's unweighted scores. A source that
/// does not apply to a response (an external reward answering `{"reward": null}`, as TRL's
/// reward functions return None) scores it NaN; the total sums the sources that apply, and is
/// NaN where none does (the response is unscorable).
pub struct Scores {
    pub total: Vec<f64>,
    pub by_source: Vec<(String, Vec<f64>)>,
}

/// What a batch of responses is scored on.
pub struct Batch<'a> {
    pub records: &'a [PromptRecord],
    /// Prompt + response token ids (for reward models).
    pub seqs: &'a [Vec<u32>],
    /// Decoded responses (for the checker and external rewards).
    pub texts: &'a [String],
}

impl RewardFn {
    /// Loads every source `specs` names: reward models into their own frozen stores, external
    /// processes started.
    /// Reward models are frozen in `dtype` (the compute dtype); `read` is told each one read,
    /// by its name (a run checks that a resume reads the models it began with).
    pub fn load(
        specs: &[RewardSpec],
        (device, dtype): (&Device, DType),
        tok: &Tokenizer,
        ext: &ExternalRewardConfig,
        read: &dyn Fn(&str, &Loaded) -> Result<()>,
    ) -> Result<Self> {
        if specs.is_empty() {
            bail!("no reward named: use --reward task, --reward PATH[:WEIGHT], --reward cmd:PROGRAM or --reward http://HOST:PORT/PATH");
        }
        let mut sources = Vec::new();
        for (spec, name) in specs.iter().zip(numbered(source_names(specs))) {
            let kind = match &spec.source {
                RewardSource::Task => Kind::Task,
                RewardSource::Model(path) => {
                    let loaded = read_checkpoint(path, device)?;
                    read(&frozen_role(path, spec.weight), &loaded)?;
                    if loaded.tokenizer.vocab_size() != tok.vocab_size() {
                        bail!(
                            "{}: the reward model's tokenizer differs from the policy's",
                            path.display()
                        );
                    }
                    let mut store = ParamStore::new(device.clone(), 0);
                    store.freeze(Net::Policy, &[Role::Base, Role::Head], dtype);
                    let scorer = scored_from(&loaded, &mut store, Net::Policy, None, false)?;
                    Kind::Model(Box::new(scorer))
                }
                RewardSource::Command(cmd) => {
                    Kind::External(Box::new(CommandReward::start(cmd, ext)?))
                }
                RewardSource::Http(url) => Kind::External(Box::new(HttpReward::new(url, ext)?)),
            };
            sources.push(Source {
                name,
                weight: spec.weight,
                kind,
            });
        }
        let names = sources.iter().map(|s| s.name.clone()).collect();
        Ok(Self {
            sources,
            names,
            pack_models: false,
        })
    }

    /// Whether the checker is a source, so every prompt needs an `answer`.
    pub fn uses_task(&self) -> bool {
        self.sources.iter().any(|s| matches!(s.kind, Kind::Task))
    }

    pub fn score(&mut self, batch: &Batch, pad: u32, ctx: Ctx) -> Result<Scores> {
        let n = batch.seqs.len();
        let mut total = vec![0f64; n];
        let mut by_source = Vec::with_capacity(self.sources.len());
        for src in &mut self.sources {
            let s = match &mut src.kind {
                Kind::Task => task_scores(batch)?,
                Kind::Model(m) => {
                    let ctx = Ctx {
                        use_lora: false,
                        dropout_seed: None,
                        neftune_alpha: None,
                        tape: false,
                        recompute_blocks: false,
                        ..ctx
                    };
                    let s = m
                        .score(batch.seqs, pad, ctx, self.pack_models)?
                        .to_dtype(DType::F32)?;
                    let s: Vec<f64> = s.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
                    // Only an explicit null means "does not apply": a model's NaN is a fault.
                    if let Some(i) = s.iter().position(|x| !x.is_finite()) {
                        bail!("reward {}: scored response {i} {}", src.name, s[i]);
                    }
                    s
                }
                Kind::External(e) => {
                    let s = e
                        .score(&requests(batch))
                        .with_context(|| format!("reward {}", src.name))?;
                    if s.len() != n {
                        bail!(
                            "reward {}: answered {} scores for {n} responses",
                            src.name,
                            s.len()
                        );
                    }
                    s
                }
            };
            for (t, x) in total.iter_mut().zip(&s) {
                if !x.is_nan() {
                    *t += src.weight * x;
                }
            }
            by_source.push((src.name.clone(), s));
        }
        for (i, t) in total.iter_mut().enumerate() {
            if by_source.iter().all(|(_, s)| s[i].is_nan()) {
                *t = f64::NAN;
            }
        }
        Ok(Scores { total, by_source })
    }
}

/// How each source is named in the metrics and the completion log: as given, but a reward
/// model by its Hub name, else by the last components of its absolute path that tell it from
/// the other reward models. A resume reads the absolute paths its config.toml records, so a
/// name from the path as typed changed there and split each source's series in two.
fn source_names(specs: &[RewardSpec]) -> Vec<String> {
    let paths: Vec<Option<PathBuf>> = (specs.iter())
        .map(|s| match &s.source {
            RewardSource::Model(p) => Some(absolute(p)),
            _ => None,
        })
        .collect();
    let models: Vec<PathBuf> = paths.iter().flatten().cloned().collect();
    specs
        .iter()
        .zip(&paths)
        .map(|(s, path)| match path {
            Some(path) => {
                let name = match crate::hub_cache::repo_of_snapshot(path) {
                    Some((repo, _)) => repo,
                    None => distinct_tail(path, &models).display().to_string(),
                };
                format!("{name}:{}", s.weight)
            }
            None => s.to_string(),
        })
        .collect()
}

/// `names` with each one given before numbered from its second: two sources of one name
/// (`--reward task:0.5 --reward task:0.5`, or one reward model by two spellings of its path)
/// would share one key in the completion log and the metrics.
fn numbered(names: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        out.push(match names[..i].iter().filter(|n| *n == name).count() {
            0 => name.clone(),
            n => format!("{name} ({})", n + 1),
        });
    }
    out
}

/// A reward model's path as a resume reads it from config.toml: made absolute (not
/// canonical: a symlink stays as named).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The fewest last components of `path` that no other of `paths` ends with.
fn distinct_tail(path: &Path, paths: &[PathBuf]) -> PathBuf {
    let parts: Vec<_> = path.components().collect();
    (1..parts.len())
        .map(|n| parts[parts.len() - n..].iter().collect::<PathBuf>())
        .find(|tail| paths.iter().all(|o| o == path || !o.ends_with(tail)))
        .unwrap_or_else(|| path.to_path_buf())
}

/// The name a run records a reward model's weights under (`frozen_inputs.json`): its path made
/// absolute, since a run's start reads the path as given and its resume the config's absolute
/// one, and a key that differed between them would compare nothing.
fn frozen_role(path: &Path, weight: f64) -> String {
    format!("the reward model {}:{weight}", absolute(path).display())
}

/// The checker: 1 for a response whose first line is the answer, else 0.
fn task_scores(batch: &Batch) -> Result<Vec<f64>> {
    batch
        .records
        .iter()
        .zip(batch.texts)
        .enumerate()
        .map(|(i, (p, t))| {
            let Some(answer) = &p.answer else {
                bail!(
                    "{}: the task reward needs an \"answer\" field",
                    place(&p.origin, "prompt", i)
                );
            };
            Ok(f64::from(u8::from(exact_match(t, answer))))
        })
        .collect()
}

/// The payload an external reward sees per response, shaped as TRL hands its reward
/// functions their arguments, so that one ported from TRL reads what it read there: the
/// prompt record's fields (its `answer` included), `prompt` as the record wrote it (a string,
/// or a conversation's list of messages), `completion` as TRL's `completions` (the text, or
/// for a conversation `[{"role": "assistant", "content": text}]`), `response` (the text) and
/// `prompt_text` (the prompt as the model read it, rendered by its chat template).
fn requests(batch: &Batch) -> Vec<Value> {
    batch
        .records
        .iter()
        .zip(batch.texts)
        .map(|(p, t)| {
            let mut m: Map<String, Value> = p.fields.clone();
            if let Some(a) = &p.answer {
                m.entry("answer").or_insert_with(|| Value::from(a.clone()));
            }
            let text = Value::from(t.clone());
            let completion = match m.get("prompt") {
                Some(Value::Array(_)) => serde_json::json!([{"role": "assistant", "content": t}]),
                _ => text.clone(),
            };
            m.entry("prompt")
                .or_insert_with(|| Value::from(p.prompt.clone()));
            m.insert("prompt_text".into(), Value::from(p.prompt.clone()));
            m.insert("completion".into(), completion);
            m.insert("response".into(), text);
            Value::Object(m)
        })
        .collect()
}

/// Reads a reward from one reply object `{"reward": number}`, or `{"reward": null}` for a
/// response the reward does not apply to (NaN); `what` says where it came from.
pub(crate) fn parse_reply(v: &Value, what: &str) -> Result<f64> {
    if v.get("reward").is_some_and(Value::is_null) {
        return Ok(f64::NAN);
    }
    let r = v.get("reward").and_then(Value::as_f64).with_context(|| {
        format!(
            "{what}: expected {{\"reward\": number}} (or null), got {}",
            clip(&v.to_string())
        )
    })?;
    // Training reads rewards as f32: a larger one would be an infinite reward there, and the
    // loss NaN with nothing to say which reply gave it.
    if !(r as f32).is_finite() {
        bail!(
            "{what}: reward {r} is not finite in f32 (|reward| <= {:e})",
            f32::MAX
        );
    }
    Ok(r)
}

/// At most 200 characters of a reply, for error messages.
pub(crate) fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(200).collect();
    if out.len() < s.len() {
        out.push_str("...");
    }
    out
}

/// Checks before training that every prompt of `sets` has what the sources need, and says
/// where a record's own field is one an external reward's request replaces.
pub fn check_prompts(rewards: &RewardFn, sets: &[&[PromptRecord]]) -> Result<()> {
    if rewards.uses_task() {
        for prompts in sets {
            for (i, p) in prompts.iter().enumerate() {
                let Some(answer) = &p.answer else {
                    bail!(
                        "{}: the task reward needs an \"answer\" field in every prompt record",
                        place(&p.origin, "prompt", i)
                    );
                };
                if let Some(why) = unmatchable(answer) {
                    bail!(
                        "{}: field \"answer\": {why} (the task reward is an exact match with it)",
                        place(&p.origin, "prompt", i)
                    );
                }
            }
        }
    }
    if let Some(w) = replaced_fields(rewards, sets) {
        crate::warnln!("warning: {w}");
    }
    Ok(())
}

/// The fields of the prompt records that a request to an external reward ([`requests`])
/// replaces: a dataset keeping its reference answer in `response` would otherwise have the
/// verifier compare the model's response with itself.
fn replaced_fields(rewards: &RewardFn, sets: &[&[PromptRecord]]) -> Option<String> {
    let external: Vec<&str> = (rewards.sources.iter())
        .filter(|s| matches!(s.kind, Kind::External(_)))
        .map(|s| s.name.as_str())
        .collect();
    let first = external.first()?;
    let said: Vec<String> = ["response", "completion", "prompt_text"]
        .into_iter()
        .filter_map(|field| {
            let n: usize = sets
                .iter()
                .map(|set| set.iter().filter(|r| r.fields.contains_key(field)).count())
                .sum();
            (n > 0).then(|| format!("\"{field}\" ({n})"))
        })
        .collect();
    if said.is_empty() {
        return None;
    }
    Some(format!(
        "prompt records have their own {}, which a request to {first}{} replaces with the \
         model's (rename the field in the file to pass it on)",
        said.join(", "),
        match external.len() {
            1 => String::new(),
            n => format!(" and {} other external reward(s)", n - 1),
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reward model is named by as much of its path's end as tells it from the others, the
    /// same from a relative path as from its absolute one (what a resume reads).
    #[test]
    fn reward_models_are_named_by_their_paths_distinct_ends() {
        let specs =
            |xs: &[&str]| -> Vec<RewardSpec> { xs.iter().map(|x| x.parse().unwrap()).collect() };
        let here = std::env::current_dir().unwrap();
        let absolute = here.join("runs/a/rm");
        assert_eq!(
            source_names(&specs(&["task", "runs/a/rm:0.5", "runs/b/rm", "runs/rm2"])),
            ["task:1", "a/rm:0.5", "b/rm:1", "rm2:1"]
        );
        assert_eq!(
            source_names(&specs(&[
                &format!("{}:0.5", absolute.display()),
                "./runs/b/rm"
            ])),
            ["a/rm:0.5", "b/rm:1"]
        );
        assert_eq!(source_names(&specs(&["rm", "rm:2"])), ["rm:1", "rm:2"]);
        // One model by two spellings of its path: one name, numbered the second time.
        assert_eq!(
            numbered(source_names(&specs(&["../runs/rm", "./../runs/rm"]))),
            ["rm:1", "rm:1 (2)"]
        );
    }

    /// A source named as an earlier one is numbered: each keeps its own key in the completion
    /// log and the metrics.
    #[test]
    fn sources_of_one_name_are_numbered() {
        let specs: Vec<RewardSpec> = ["task:0.5", "task:0.5", "task:0.5", "task:1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let tok = Tokenizer::bytes();
        let ext = ExternalRewardConfig::default();
        let dev = (&Device::Cpu, DType::F32);
        let r = RewardFn::load(&specs, dev, &tok, &ext, &|_, _| Ok(())).unwrap();
        assert_eq!(
            r.names,
            ["task:0.5", "task:0.5 (2)", "task:0.5 (3)", "task:1"]
        );
    }

    /// A run started with a relative `--reward` and resumed from its config's absolute path
    /// records and looks up its weights under one name.
    #[test]
    fn a_reward_model_is_recorded_under_its_absolute_path() {
        let relative = Path::new("runs/rm");
        let absolute = std::env::current_dir().unwrap().join("runs/rm");
        assert_eq!(frozen_role(relative, 1.0), frozen_role(&absolute, 1.0));
        assert_eq!(
            frozen_role(&absolute, 0.5),
            format!("the reward model {}:0.5", absolute.display())
        );
    }

    /// A record's own `response` or `completion`, which a request to an external reward
    /// replaces, is said, counted over the sets; with only the task reward, nothing is.
    #[test]
    fn fields_a_request_replaces_are_said() {
        struct Never;
        impl External for Never {
            fn score(&mut self, _: &[Value]) -> Result<Vec<f64>> {
                unreachable!()
            }
        }
        let record = |extra: &[&str]| {
            let mut fields = Map::new();
            for f in extra {
                fields.insert(f.to_string(), "gold".into());
            }
            PromptRecord {
                prompt: "1+1=".into(),
                answer: Some("2".into()),
                fields,
                origin: None,
                templated: false,
            }
        };
        let train = [
            record(&["response"]),
            record(&[]),
            record(&["response", "completion"]),
        ];
        let eval = [record(&["response"])];
        let source = |name: &str, kind| Source {
            name: name.into(),
            weight: 1.0,
            kind,
        };
        let mut rewards = RewardFn {
            sources: vec![source("task", Kind::Task)],
            names: vec!["task".into()],
            pack_models: false,
        };
        assert_eq!(replaced_fields(&rewards, &[&train, &eval]), None);
        rewards
            .sources
            .push(source("cmd:python3 v.py", Kind::External(Box::new(Never))));
        assert_eq!(
            replaced_fields(&rewards, &[&train, &eval]).unwrap(),
            "prompt records have their own \"response\" (3), \"completion\" (1), which a \
             request to cmd:python3 v.py replaces with the model's (rename the field in the \
             file to pass it on)"
        );
        assert_eq!(replaced_fields(&rewards, &[&[record(&[])]]), None);
    }

    /// A request carries the prompt as its record wrote it and the completion as TRL hands
    /// them to a reward function, with the text forms beside them.
    #[test]
    fn requests_read_as_trls_reward_arguments() {
        let record = |prompt: Value, rendered: &str| {
            let mut fields = Map::new();
            fields.insert("prompt".into(), prompt);
            fields.insert("solution".into(), "6".into());
            PromptRecord {
                prompt: rendered.into(),
                answer: None,
                fields,
                origin: None,
                templated: false,
            }
        };
        let chat = serde_json::json!([{"role": "user", "content": "2+4?"}]);
        let records = [
            record(chat.clone(), "<|user|>\n2+4?\n<|assistant|>\n"),
            record("2+4=".into(), "2+4="),
        ];
        let texts = ["6".to_string(), "6".to_string()];
        let seqs = [vec![], vec![]];
        let got = requests(&Batch {
            records: &records,
            seqs: &seqs,
            texts: &texts,
        });
        assert_eq!(
            got[0],
            serde_json::json!({
                "prompt": chat,
                "solution": "6",
                "completion": [{"role": "assistant", "content": "6"}],
                "response": "6",
                "prompt_text": "<|user|>\n2+4?\n<|assistant|>\n",
            })
        );
        assert_eq!(
            got[1],
            serde_json::json!({
                "prompt": "2+4=",
                "solution": "6",
                "completion": "6",
                "response": "6",
                "prompt_text": "2+4=",
            })
        );
    }

    /// A reply's reward is a finite number, or null for a response it does not apply to (NaN
    /// here); anything else is refused naming where it came from.
    #[test]
    fn a_reply_is_a_number_or_null() {
        let read = |text: &str| parse_reply(&serde_json::from_str(text).unwrap(), "reply 1");
        assert_eq!(read(r#"{"reward": 0.5}"#).unwrap(), 0.5);
        assert!(read(r#"{"reward": null}"#).unwrap().is_nan());
        for bad in [
            r#"{"reward": "high"}"#,
            r#"{"score": 1}"#,
            r#"{"reward": [1]}"#,
            r#"{"reward": 1e39}"#,
            r#"{"reward": -1e300}"#,
        ] {
            let e = read(bad).map(|_| ()).unwrap_err().to_string();
            assert!(e.starts_with("reply 1: "), "{bad}: {e}");
        }
    }
}
