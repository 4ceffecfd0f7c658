//! Which implementation each op uses. An ablation is two runs that differ in one `--kernels`
//! entry, so the set is printed at start and saved in the run's metadata.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Mutex;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// `Custom` is our kernel (CUDA; on a CPU some ops have a fused CPU path too), `Reference`
/// the plain candle composite that runs anywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KernelChoice {
    #[default]
    Custom,
    Reference,
}

/// The ops that have a swappable implementation, with the name a user types for the custom one.
pub const OPS: [(&str, &str); 4] = [
    ("attention", "flash"),
    ("lora", "fused"),
    ("gae", "cuda"),
    ("rmsnorm", "fused"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct KernelSet {
    pub attention: KernelChoice,
    pub lora: KernelChoice,
    pub gae: KernelChoice,
    pub rmsnorm: KernelChoice,
}

impl KernelSet {
    pub fn reference() -> Self {
        Self {
            attention: KernelChoice::Reference,
            lora: KernelChoice::Reference,
            gae: KernelChoice::Reference,
            rmsnorm: KernelChoice::Reference,
        }
    }

    fn slot(&mut self, op: &str) -> Option<&mut KernelChoice> {
        match op {
            "attention" => Some(&mut self.attention),
            "lora" => Some(&mut self.lora),
            "gae" => Some(&mut self.gae),
            "rmsnorm" => Some(&mut self.rmsnorm),
            _ => None,
        }
    }

    fn get(&self, op: &str) -> KernelChoice {
        match op {
            "attention" => self.attention,
            "lora" => self.lora,
            "gae" => self.gae,
            _ => self.rmsnorm,
        }
    }

    /// Applies `op=impl,op=impl` on top of `self`; `all=reference` switches every op.
    pub fn apply_spec(mut self, spec: &str) -> Result<Self> {
        for entry in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((op, name)) = entry.split_once('=') else {
                bail!("--kernels: `{entry}` is not of the form op=impl (e.g. attention=flash)");
            };
            let (op, name) = (op.trim(), name.trim());
            let ops: Vec<&str> = if op == "all" {
                OPS.iter().map(|(o, _)| *o).collect()
            } else {
                vec![op]
            };
            for op in ops {
                let Some(&(_, custom)) = OPS.iter().find(|(o, _)| *o == op) else {
                    let known: Vec<_> = OPS.iter().map(|(o, _)| *o).collect();
                    bail!("--kernels: unknown op `{op}` (known: {})", known.join(", "));
                };
                let choice = match name {
                    "reference" | "ref" => KernelChoice::Reference,
                    n if n == custom || n == "custom" => KernelChoice::Custom,
                    n => bail!(
                        "--kernels: `{op}` has no implementation `{n}` (use {custom} or reference)"
                    ),
                };
                *self.slot(op).expect("op listed in OPS") = choice;
            }
        }
        Ok(self)
    }
}

impl fmt::Display for KernelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = OPS
            .iter()
            .map(|(op, custom)| {
                let name = match self.get(op) {
                    KernelChoice::Custom => *custom,
                    KernelChoice::Reference => "reference",
                };
                format!("{op}={name}")
            })
            .collect();
        write!(f, "{}", parts.join(","))
    }
}

static WARNED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// A custom kernel that cannot serve a call (wrong device, dtype or shape) falls back to the
/// reference; the user hears about it once per op and reason, never silently gets a wrong answer.
pub fn warn_fallback(op: &str, reason: &str) {
    let key = format!("{op}: {reason}");
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned.insert(key) {
        eprintln!("warning: kernel {op}: {reason}; using the reference implementation");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_and_rejects_unknowns() {
        let k = KernelSet::default()
            .apply_spec("attention=reference, gae=cuda")
            .unwrap();
        assert_eq!(k.attention, KernelChoice::Reference);
        assert_eq!(k.gae, KernelChoice::Custom);
        assert_eq!(
            k.to_string(),
            "attention=reference,lora=fused,gae=cuda,rmsnorm=fused"
        );
        assert_eq!(KernelSet::default().apply_spec(&k.to_string()).unwrap(), k);
        assert_eq!(
            KernelSet::default().apply_spec("all=reference").unwrap(),
            KernelSet::reference()
        );
        assert!(KernelSet::default().apply_spec("attn=flash").is_err());
        assert!(KernelSet::default().apply_spec("lora=flash").is_err());
        assert!(KernelSet::default().apply_spec("lora").is_err());
    }
}
