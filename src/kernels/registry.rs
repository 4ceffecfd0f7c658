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

/// The ops that have a swappable implementation. Strings are parsed into this only at the
/// edge ([`KernelSet::apply_spec`]); everything inside matches on it exhaustively.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KernelOp {
    Attention,
    Lora,
    Gae,
    RmsNorm,
    /// The optimizer step: gradient norm, clipping and AdamW.
    Adamw,
    /// The loss head: the targets' log-probabilities and their gradient.
    Logprobs,
    /// Token and position embedding lookups and their gradient.
    Embedding,
    /// Sampling the next token: temperature, top-k, top-p.
    Sample,
    /// LayerNorm (GPT-2's norm), forward and backward.
    LayerNorm,
    /// GPT-2's tanh GELU, forward and backward.
    Gelu,
    /// A linear layer's bias, with the GELU after it fused in; its gradient as a column sum.
    Bias,
    /// The linear layers' and the LM head's GEMMs (cuBLASLt) and their backward.
    Gemm,
    /// Llama's SwiGLU gating `silu(gate) * up`, forward and both gradients.
    SwiGlu,
    /// Rotary position embeddings of queries and keys, forward and backward.
    Rope,
    /// Attention's head layout: projections into heads and the output back, one copy each.
    Heads,
    /// Dropout with a mask hashed from (seed, index) where it is used, forward and backward.
    Dropout,
    /// Generation's decode step replayed as one CUDA graph; the reference runs it op by op at
    /// the cache's shapes (`src/generate/static_step.rs`).
    Decode,
}

impl KernelOp {
    /// Every op, in the order `Display` lists them.
    pub const ALL: [KernelOp; 17] = [
        Self::Attention,
        Self::Lora,
        Self::Gae,
        Self::RmsNorm,
        Self::Adamw,
        Self::Logprobs,
        Self::Embedding,
        Self::Sample,
        Self::LayerNorm,
        Self::Gelu,
        Self::Bias,
        Self::Gemm,
        Self::SwiGlu,
        Self::Rope,
        Self::Heads,
        Self::Dropout,
        Self::Decode,
    ];

    /// The name a user types (`--kernels attention=...`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Attention => "attention",
            Self::Lora => "lora",
            Self::Gae => "gae",
            Self::RmsNorm => "rmsnorm",
            Self::Adamw => "adamw",
            Self::Logprobs => "logprobs",
            Self::Embedding => "embedding",
            Self::Sample => "sample",
            Self::LayerNorm => "layernorm",
            Self::Gelu => "gelu",
            Self::Bias => "bias",
            Self::Gemm => "gemm",
            Self::SwiGlu => "swiglu",
            Self::Rope => "rope",
            Self::Heads => "heads",
            Self::Dropout => "dropout",
            Self::Decode => "decode",
        }
    }

    /// The name of our (custom) implementation (`--kernels attention=flash`).
    pub fn custom_name(self) -> &'static str {
        match self {
            Self::Attention => "flash",
            Self::Lora => "fused",
            Self::Gae => "cuda",
            Self::RmsNorm => "fused",
            Self::Adamw => "fused",
            Self::Logprobs => "fused",
            Self::Embedding => "fused",
            Self::Sample => "cuda",
            Self::LayerNorm => "fused",
            Self::Gelu => "fused",
            Self::Bias => "fused",
            Self::Gemm => "cublaslt",
            Self::SwiGlu => "fused",
            Self::Rope => "fused",
            Self::Heads => "cuda",
            Self::Dropout => "cuda",
            Self::Decode => "graph",
        }
    }

    /// The op a user-facing name stands for.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|op| op.name() == name)
    }
}

impl fmt::Display for KernelOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The ops that have a swappable implementation, with the name a user types for the custom
/// one (the same table as [`KernelOp::name`] and [`KernelOp::custom_name`]).
pub const OPS: [(&str, &str); 17] = [
    ("attention", "flash"),
    ("lora", "fused"),
    ("gae", "cuda"),
    ("rmsnorm", "fused"),
    ("adamw", "fused"),
    ("logprobs", "fused"),
    ("embedding", "fused"),
    ("sample", "cuda"),
    ("layernorm", "fused"),
    ("gelu", "fused"),
    ("bias", "fused"),
    ("gemm", "cublaslt"),
    ("swiglu", "fused"),
    ("rope", "fused"),
    ("heads", "cuda"),
    ("dropout", "cuda"),
    ("decode", "graph"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct KernelSet {
    pub attention: KernelChoice,
    pub lora: KernelChoice,
    pub gae: KernelChoice,
    pub rmsnorm: KernelChoice,
    pub adamw: KernelChoice,
    pub logprobs: KernelChoice,
    pub embedding: KernelChoice,
    /// Runs saved before the sampling kernel existed have no entry: they get the default.
    #[serde(default)]
    pub sample: KernelChoice,
    pub layernorm: KernelChoice,
    pub gelu: KernelChoice,
    /// Runs saved before the bias kernel existed have no entry: they get the default.
    #[serde(default)]
    pub bias: KernelChoice,
    /// Runs saved before the cuBLASLt GEMM existed have no entry: they get the default.
    #[serde(default)]
    pub gemm: KernelChoice,
    /// Runs saved before the SwiGLU and RoPE kernels existed have no entry: the default.
    #[serde(default)]
    pub swiglu: KernelChoice,
    #[serde(default)]
    pub rope: KernelChoice,
    /// Runs saved before the head-layout and dropout kernels existed have no entry: the
    /// default.
    #[serde(default)]
    pub heads: KernelChoice,
    #[serde(default)]
    pub dropout: KernelChoice,
    /// Runs saved before the decode step's CUDA graph existed have no entry: the default.
    #[serde(default)]
    pub decode: KernelChoice,
}

impl KernelSet {
    pub fn reference() -> Self {
        let mut k = Self::default();
        for op in KernelOp::ALL {
            *k.slot(op) = KernelChoice::Reference;
        }
        k
    }

    /// The choice for `op`, to change.
    pub fn slot(&mut self, op: KernelOp) -> &mut KernelChoice {
        match op {
            KernelOp::Attention => &mut self.attention,
            KernelOp::Lora => &mut self.lora,
            KernelOp::Gae => &mut self.gae,
            KernelOp::RmsNorm => &mut self.rmsnorm,
            KernelOp::Adamw => &mut self.adamw,
            KernelOp::Logprobs => &mut self.logprobs,
            KernelOp::Embedding => &mut self.embedding,
            KernelOp::Sample => &mut self.sample,
            KernelOp::LayerNorm => &mut self.layernorm,
            KernelOp::Gelu => &mut self.gelu,
            KernelOp::Bias => &mut self.bias,
            KernelOp::Gemm => &mut self.gemm,
            KernelOp::SwiGlu => &mut self.swiglu,
            KernelOp::Rope => &mut self.rope,
            KernelOp::Heads => &mut self.heads,
            KernelOp::Dropout => &mut self.dropout,
            KernelOp::Decode => &mut self.decode,
        }
    }

    /// The choice for `op` (read through [`KernelSet::slot`], the one map of ops to fields).
    pub fn get(&self, op: KernelOp) -> KernelChoice {
        let mut k = *self;
        *k.slot(op)
    }

    /// Applies `op=impl,op=impl` on top of `self`; `all=reference` switches every op.
    pub fn apply_spec(mut self, spec: &str) -> Result<Self> {
        for entry in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((op, name)) = entry.split_once('=') else {
                bail!("--kernels: `{entry}` is not of the form op=impl (e.g. attention=flash)");
            };
            let (op, name) = (op.trim(), name.trim());
            let ops: Vec<KernelOp> = if op == "all" {
                KernelOp::ALL.to_vec()
            } else {
                match KernelOp::parse(op) {
                    Some(op) => vec![op],
                    None => {
                        let known: Vec<_> = KernelOp::ALL.map(KernelOp::name).to_vec();
                        bail!("--kernels: unknown op `{op}` (known: {})", known.join(", "));
                    }
                }
            };
            for op in ops {
                let custom = op.custom_name();
                let choice = match name {
                    "reference" | "ref" => KernelChoice::Reference,
                    n if n == custom || n == "custom" => KernelChoice::Custom,
                    n => bail!(
                        "--kernels: `{op}` has no implementation `{n}` (use {custom} or reference)"
                    ),
                };
                *self.slot(op) = choice;
            }
        }
        Ok(self)
    }
}

impl fmt::Display for KernelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = KernelOp::ALL
            .iter()
            .map(|&op| {
                let name = match self.get(op) {
                    KernelChoice::Custom => op.custom_name(),
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
    // Before the key is kept: a rank thread that says nothing must not use up rank 0's line.
    if crate::console::follower() {
        return;
    }
    let key = format!("{op}: {reason}");
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned.insert(key) {
        errln!("warning: kernel {op}: {reason}; using the reference implementation");
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
            "attention=reference,lora=fused,gae=cuda,rmsnorm=fused,adamw=fused,logprobs=fused,embedding=fused,sample=cuda,layernorm=fused,gelu=fused,bias=fused,gemm=cublaslt,swiglu=fused,rope=fused,heads=cuda,dropout=cuda,decode=graph"
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

    /// A run saved before an op existed reads back with that op at its default.
    #[test]
    fn saved_sets_without_newer_ops_load() {
        let old = r#"{"attention":"reference","gelu":"reference"}"#;
        let k: KernelSet = serde_json::from_str(old).unwrap();
        assert_eq!(k.attention, KernelChoice::Reference);
        assert_eq!(k.gelu, KernelChoice::Reference);
        assert_eq!(k.swiglu, KernelChoice::Custom);
        assert_eq!(k.rope, KernelChoice::Custom);
        assert_eq!(k.heads, KernelChoice::Custom);
        assert_eq!(k.dropout, KernelChoice::Custom);
    }

    #[test]
    fn every_op_round_trips() {
        for op in KernelOp::ALL {
            assert_eq!(KernelOp::parse(op.name()), Some(op));
            assert_eq!(op.to_string(), op.name());
            assert!(OPS.contains(&(op.name(), op.custom_name())), "{op}");
            for choice in [KernelChoice::Reference, KernelChoice::Custom] {
                let mut k = KernelSet::default();
                *k.slot(op) = choice;
                assert_eq!(k.get(op), choice);
                for other in KernelOp::ALL.into_iter().filter(|&o| o != op) {
                    assert_eq!(k.get(other), KernelChoice::Custom, "{op} moved {other}");
                }
                let spec = k.to_string();
                assert_eq!(KernelSet::default().apply_spec(&spec).unwrap(), k, "{spec}");
                let impl_name = match choice {
                    KernelChoice::Reference => "reference",
                    KernelChoice::Custom => op.custom_name(),
                };
                let one = format!("{}={impl_name}", op.name());
                assert_eq!(KernelSet::default().apply_spec(&one).unwrap(), k, "{one}");
            }
        }
        assert_eq!(OPS.len(), KernelOp::ALL.len());
        assert_eq!(KernelOp::parse("attn"), None);
    }
}
