//! The reward specs the on-policy stages are scored by, and `[external_reward]`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Where one term of the sequence score comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum RewardSource {
    /// The task's programmatic checker: 1 for an exact answer, 0 otherwise.
    Task,
    /// A reward-model checkpoint or run directory.
    Model(PathBuf),
    /// A long-lived process (`sh -c` of the command line) answering JSON lines.
    Command(String),
    /// An HTTP endpoint answering the same payloads, POSTed as a JSON array per batch.
    Http(String),
}

/// How temper treats user-defined reward processes and endpoints (`[external_reward]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExternalRewardConfig {
    /// Seconds a `cmd:` program may take over each reply (an HTTP endpoint over each
    /// request) before the reward counts as hung.
    pub timeout_s: f64,
    /// How often a process that died or hung is restarted (the batch is retried) before the
    /// run stops.
    pub max_restarts: usize,
}

impl Default for ExternalRewardConfig {
    fn default() -> Self {
        Self {
            timeout_s: 60.0,
            max_restarts: 2,
        }
    }
}

/// Refuses rewards whose weights are all 0: every score would be 0, and nothing would train.
pub fn check_weights(table: &str, rewards: &[RewardSpec]) -> Result<()> {
    if !rewards.is_empty() && rewards.iter().all(|r| r.weight == 0.0) {
        let named: Vec<String> = rewards.iter().map(ToString::to_string).collect();
        bail!(
            "{table}.rewards ({}): every weight is 0, so every score would be 0 and nothing \
             would train: give one a weight other than 0",
            named.join(", ")
        );
    }
    Ok(())
}

/// One weighted term of the sequence score, written `task[:W]` or `PATH[:W]` on the command
/// line and in config files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RewardSpec {
    pub source: RewardSource,
    pub weight: f64,
}

impl RewardSpec {
    pub fn task() -> Self {
        Self {
            source: RewardSource::Task,
            weight: 1.0,
        }
    }

    /// The first reward model of a list, from which PPO's value model is initialised.
    pub fn first_model(specs: &[RewardSpec]) -> Option<&PathBuf> {
        specs.iter().find_map(|s| match &s.source {
            RewardSource::Model(p) => Some(p),
            _ => None,
        })
    }
}

impl std::str::FromStr for RewardSpec {
    type Err = anyhow::Error;

    fn from_str(spec: &str) -> Result<Self> {
        let (name, weight) = split_weight(spec);
        if !weight.is_finite() {
            bail!("--reward {spec}: weight must be finite");
        }
        if name.is_empty() {
            bail!("--reward {spec}: names no reward (use task, cmd:PROGRAM, http://HOST:PORT/PATH or a reward model's directory)");
        }
        // `task:` with a weight that is not a number was read as a model directory named
        // "task:abc", and refused as a missing checkpoint.
        if let Some(w) = name.strip_prefix("task:") {
            bail!("--reward {spec}: the weight `{w}` is not a number (task[:W], e.g. task:0.5)");
        }
        let source = if name == "task" {
            RewardSource::Task
        } else if let Some(cmd) = name.strip_prefix("cmd:") {
            if cmd.trim().is_empty() {
                bail!("--reward {spec}: cmd: names no program");
            }
            RewardSource::Command(cmd.to_string())
        } else if name.starts_with("http://") {
            RewardSource::Http(name.to_string())
        } else if name.starts_with("https://") {
            bail!("--reward {spec}: https is not supported; serve the reward over http on this machine (or a proxy to it)");
        } else {
            RewardSource::Model(PathBuf::from(name))
        };
        Ok(Self { source, weight })
    }
}

/// `NAME[:W]` -> (NAME, W), W = 1 when absent. In a URL, a number after the last colon is the
/// port unless a path or a port follows the host (`http://h:8000` is a port, `http://h:8000/r:2`
/// and `http://h:8000:2` a weight; an IPv6 host's colons are inside its brackets).
fn split_weight(spec: &str) -> (&str, f64) {
    let Some((name, w)) = spec.rsplit_once(':') else {
        return (spec, 1.0);
    };
    let Ok(weight) = w.parse::<f64>() else {
        return (spec, 1.0);
    };
    let is_port = name.strip_prefix("http://").is_some_and(|rest| {
        let after_host = match rest.strip_prefix('[') {
            Some(r) => r.split_once(']').map_or("", |(_, after)| after),
            None => rest,
        };
        !rest.contains('/') && !after_host.contains(':')
    });
    if is_port {
        (spec, 1.0)
    } else {
        (name, weight)
    }
}

impl TryFrom<String> for RewardSpec {
    type Error = anyhow::Error;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<RewardSpec> for String {
    fn from(r: RewardSpec) -> String {
        r.to_string()
    }
}

impl std::fmt::Display for RewardSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            RewardSource::Task => write!(f, "task:{}", self.weight),
            RewardSource::Model(p) => write!(f, "{}:{}", p.display(), self.weight),
            RewardSource::Command(c) => write!(f, "cmd:{c}:{}", self.weight),
            RewardSource::Http(u) => write!(f, "{u}:{}", self.weight),
        }
    }
}
