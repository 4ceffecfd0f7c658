//! The model's shape: Hugging Face `LlamaConfig` field names plus the GPT-2 variants.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormKind {
    RmsNorm,
    LayerNorm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PositionKind {
    Rope,
    Learned,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MlpKind {
    SwiGlu,
    Gelu,
}

/// Field names follow Hugging Face's `LlamaConfig`; `norm`, `position`, `mlp` and `bias` cover
/// the GPT-2 shape, so loading a real checkpoint later is a loader, not a redesign.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub norm: NormKind,
    pub position: PositionKind,
    pub mlp: MlpKind,
    pub bias: bool,
    pub dropout: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self::preset("tiny").expect("tiny preset exists")
    }
}

impl ModelConfig {
    /// Named shapes: `tiny` (the built-in task on a CPU), `small`, `gpt2` (GPT-2 small: 12
    /// layers, 768 wide, context 1024) and `llama-tiny` (RMSNorm, RoPE, SwiGLU, GQA).
    pub fn preset(name: &str) -> Result<Self> {
        let llama = |hidden: usize, layers: usize, heads: usize, kv: usize, ctx: usize| Self {
            vocab_size: 258,
            hidden_size: hidden,
            intermediate_size: hidden * 8 / 3 / 32 * 32 + 32,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            max_position_embeddings: ctx,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_word_embeddings: true,
            norm: NormKind::RmsNorm,
            position: PositionKind::Rope,
            mlp: MlpKind::SwiGlu,
            bias: false,
            dropout: 0.0,
        };
        Ok(match name {
            "tiny" => llama(128, 4, 4, 2, 64),
            "small" => llama(256, 6, 8, 4, 256),
            "llama-tiny" => llama(192, 4, 6, 2, 256),
            "gpt2" => Self {
                vocab_size: 50304,
                hidden_size: 768,
                intermediate_size: 3072,
                num_hidden_layers: 12,
                num_attention_heads: 12,
                num_key_value_heads: 12,
                max_position_embeddings: 1024,
                rms_norm_eps: 1e-5,
                rope_theta: 10000.0,
                tie_word_embeddings: true,
                norm: NormKind::LayerNorm,
                position: PositionKind::Learned,
                mlp: MlpKind::Gelu,
                bias: true,
                dropout: 0.0,
            },
            other => bail!("unknown model preset `{other}` (known: tiny, small, llama-tiny, gpt2)"),
        })
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                bail!("model.{name} must be positive");
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "model.num_attention_heads ({}) must divide model.hidden_size ({})",
                self.num_attention_heads,
                self.hidden_size
            );
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "model.num_key_value_heads ({}) must divide model.num_attention_heads ({})",
                self.num_key_value_heads,
                self.num_attention_heads
            );
        }
        if self.position == PositionKind::Rope && !self.head_dim().is_multiple_of(2) {
            bail!(
                "model: rotary positions need an even head dim, got {}",
                self.head_dim()
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("model.dropout must be in [0, 1), got {}", self.dropout);
        }
        if self.rms_norm_eps <= 0.0 || self.rope_theta <= 0.0 {
            bail!("model.rms_norm_eps and model.rope_theta must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_bad_shapes_are_named() {
        for p in ["tiny", "small", "llama-tiny", "gpt2"] {
            ModelConfig::preset(p).unwrap().validate().unwrap();
        }
        let c = ModelConfig {
            num_attention_heads: 5,
            ..ModelConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("num_attention_heads") && e.contains("hidden_size"),
            "{e}"
        );
        let c = ModelConfig {
            num_key_value_heads: 3,
            ..ModelConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("num_key_value_heads"));
        assert!(ModelConfig::preset("nope").is_err());
    }
}
