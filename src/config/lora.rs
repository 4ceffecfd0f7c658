//! LoRA: which projections get adapters, their rank, alpha and dropout.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The projections LoRA can attach to, by their Llama names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// In a config file, the names `--lora-targets` takes: a list, or one string of them
    /// (PEFT's `target_modules = "all-linear"`).
    #[serde(deserialize_with = "targets_from_names")]
    pub targets: Vec<LoraTarget>,
    /// rsLoRA (PEFT's `use_rslora`): scale by alpha / sqrt(rank) rather than alpha / rank, so
    /// that a higher rank does not shrink the adapter's updates.
    pub use_rslora: bool,
    /// DoRA (PEFT's `use_dora`): each adapted weight's rows get a trained length, the
    /// magnitude vector, apart from their direction, `W + s B A`.
    pub use_dora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 0,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec![LoraTarget::Q, LoraTarget::K, LoraTarget::V, LoraTarget::O],
            use_rslora: false,
            use_dora: false,
        }
    }
}

/// An adapter's scale as PEFT computes it: `alpha / r`, or under rsLoRA `alpha / sqrt(r)`.
pub fn scale_of(alpha: f64, rank: f64, rslora: bool) -> f64 {
    match rslora {
        true => alpha / rank.sqrt(),
        false => alpha / rank,
    }
}

impl LoraConfig {
    /// The config of an adapter on projection `t`, if `lora` puts one there.
    pub fn on(lora: Option<&LoraConfig>, t: LoraTarget) -> Option<&LoraConfig> {
        lora.filter(|l| l.targets.contains(&t))
    }

    pub fn enabled(&self) -> bool {
        self.rank > 0
    }

    pub fn scale(&self) -> f64 {
        scale_of(self.alpha, self.rank.max(1) as f64, self.use_rslora)
    }

    /// Parses `q,k,v,o,gate,up,down`, also accepting GPT-2's names (`c_attn` = q,k,v;
    /// `c_proj` = o and down; `c_fc` = up), and `all` (PEFT's `all-linear`).
    pub fn parse_targets(spec: &str) -> Result<Vec<LoraTarget>> {
        targets_of(spec.split(',')).map_err(|e| anyhow::anyhow!("--lora-targets: {e}"))
    }

    pub fn validate(&self) -> Result<()> {
        // Without a rank there are no adapters, and every weight would train.
        for (on, key) in [(self.use_rslora, "use_rslora"), (self.use_dora, "use_dora")] {
            if on && !self.enabled() {
                bail!("lora.{key} needs lora.rank: without a rank there are no adapters, and every weight trains");
            }
        }
        if self.enabled() && self.alpha.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            bail!("lora.alpha must be positive");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("lora.dropout must be in [0, 1)");
        }
        Ok(())
    }
}

/// The projections `names` name (see [`LoraConfig::parse_targets`]), sorted, each once.
fn targets_of<'a>(names: impl Iterator<Item = &'a str>) -> Result<Vec<LoraTarget>, String> {
    use LoraTarget::*;
    let mut out = Vec::new();
    for t in names.map(str::trim).filter(|s| !s.is_empty()) {
        match t {
            "q" | "q_proj" => out.push(Q),
            "k" | "k_proj" => out.push(K),
            "v" | "v_proj" => out.push(V),
            "o" | "o_proj" => out.push(O),
            "gate" | "gate_proj" => out.push(Gate),
            "up" | "up_proj" => out.push(Up),
            "down" | "down_proj" => out.push(Down),
            "c_attn" => out.extend([Q, K, V]),
            "c_proj" => out.extend([O, Down]),
            "c_fc" => out.push(Up),
            "all" | "all-linear" => out.extend([Q, K, V, O, Gate, Up, Down]),
            other => {
                return Err(format!(
                    "unknown module `{other}` (use q,k,v,o,gate,up,down, c_attn,c_proj,c_fc or all)"
                ))
            }
        }
    }
    out.sort();
    out.dedup();
    match out.is_empty() {
        true => Err("no module named".into()),
        false => Ok(out),
    }
}

/// `[lora] targets` as a list of names or one string of them, read as `--lora-targets` reads
/// its names: a config and the flag accept the same ones.
fn targets_from_names<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<LoraTarget>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Names {
        One(String),
        Many(Vec<String>),
    }
    let names = match Names::deserialize(d).map_err(|_| {
        serde::de::Error::custom(
            "invalid type: expected a list of module names, or one string of them",
        )
    })? {
        Names::One(s) => vec![s],
        Names::Many(v) => v,
    };
    // "invalid value": the config's reader then names the key.
    targets_of(names.iter().flat_map(|n| n.split(',')))
        .map_err(|e| serde::de::Error::custom(format!("invalid value: {e}")))
}
