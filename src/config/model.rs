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
    /// `down(gelu(gate x) * up x)` with GELU's tanh approximation (Gemma's
    /// `gelu_pytorch_tanh`).
    GeGlu,
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
    /// Bias on the q, k and v projections even where `bias` is off (Qwen2).
    pub qkv_bias: bool,
    /// RMSNorm over each head's queries and keys, before the rotary positions (Qwen3).
    pub qk_norm: bool,
    /// Layers (0-based) whose attention takes no rotary positions (SmolLM3's NoPE layers,
    /// every fourth there); empty for every other model.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nope_layers: Vec<usize>,
    /// Sliding-window attention (Mistral's `sliding_window`): a query sees itself and the
    /// `sliding_window - 1` positions before it, in every layer but `full_attention_layers`;
    /// none: every layer sees the whole context.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Layers (0-based) that see the whole context although `sliding_window` is set (Qwen2's
    /// first `max_window_layers`); empty: every layer slides.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub full_attention_layers: Vec<usize>,
    /// Width of one attention head; none means `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// Rotary frequency scaling for long contexts (`rope_scaling`: Llama 3's, or linear).
    pub rope_scaling: Option<RopeScaling>,
    /// Layers that rotate by a base of their own, unscaled (Gemma 3's `sliding_attention`
    /// layers, by `rope_local_base_freq`); none: every layer rotates by `rope_theta`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_local: Option<LocalRope>,
    /// RMSNorm gains held as offsets from one and applied as `1 + w` in f32 (Gemma), so that
    /// a gain near one keeps its precision in bf16.
    #[serde(skip_serializing_if = "is_false")]
    pub norm_plus_one: bool,
    /// A norm on each branch's output before its residual add, after attention and after the
    /// MLP (Gemma's `post_attention_layernorm` and `post_feedforward_layernorm`).
    #[serde(skip_serializing_if = "is_false")]
    pub post_norms: bool,
    /// Token embeddings multiplied by `sqrt(hidden_size)` (Gemma), the factor rounded to the
    /// compute dtype, as transformers rounds it to the weights' dtype; the tied LM head reads
    /// the table unscaled.
    #[serde(skip_serializing_if = "is_false")]
    pub embed_scale: bool,
    /// Attention logits scaled by `1 / sqrt(query_pre_attn_scalar)` (Gemma); none:
    /// `1 / sqrt(head_dim)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<usize>,
    /// Attention's scores capped as `cap * tanh(s / cap)` before the mask (Gemma 2's
    /// `attn_logit_softcapping`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<f64>,
    /// The logits capped the same way (Gemma 2's `final_logit_softcapping`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
    pub dropout: f64,
    /// The Hugging Face family the model was imported as; `export --format hf` writes it
    /// back as that family.
    pub hf_family: Option<HfFamily>,
    /// A reward model imported from a Hugging Face classifier: its `pad_token_id`, which
    /// transformers never scores (it reads a sequence at its last token that is not this
    /// id), so temper's scorer passes over trailing ones too, and the export writes it back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score_pad: Option<u32>,
}

fn is_false(b: &bool) -> bool {
    !b
}

/// The model families temper reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HfFamily {
    Llama,
    Qwen2,
    Qwen3,
    Mistral,
    Gpt2,
    #[serde(rename = "smollm3")]
    SmolLm3,
    /// Gemma 2 (`gemma2`: 2B, 9B, 27B).
    Gemma2,
    /// Gemma 3's text model (`gemma3_text`: Gemma 3 270M and 1B, and the language model of
    /// the larger image-and-text ones).
    #[serde(rename = "gemma3_text")]
    Gemma3,
}

impl HfFamily {
    pub fn name(self) -> &'static str {
        match self {
            HfFamily::Llama => "llama",
            HfFamily::Qwen2 => "qwen2",
            HfFamily::Qwen3 => "qwen3",
            HfFamily::Mistral => "mistral",
            HfFamily::Gpt2 => "gpt2",
            HfFamily::SmolLm3 => "smollm3",
            HfFamily::Gemma2 => "gemma2",
            HfFamily::Gemma3 => "gemma3_text",
        }
    }

    /// The family `cfg` was imported as, else the one whose layout it has (for exporting
    /// temper's own models); none for a layout no family has.
    pub fn of(cfg: &ModelConfig) -> Option<Self> {
        // Gemma's layout is Gemma's alone: no other family writes its norms, embedding scale,
        // attention scale or second rotary base, and it writes nothing else.
        let gemma_family = matches!(cfg.hf_family, Some(HfFamily::Gemma2 | HfFamily::Gemma3));
        if cfg.has_gemma_features() || gemma_family {
            let gemma = cfg.norm_plus_one
                && cfg.post_norms
                && cfg.embed_scale
                && cfg.mlp == MlpKind::GeGlu
                && cfg.norm == NormKind::RmsNorm
                && cfg.position == PositionKind::Rope
                && !cfg.bias
                && !cfg.qkv_bias
                && cfg.nope_layers.is_empty()
                && !matches!(cfg.rope_scaling, Some(RopeScaling::Llama3(_)));
            // Gemma 3 normalises q and k and has a second rotary base, and writes one kind per
            // layer, so its window and that base go together; it drops a cap on attention's
            // scores (transformers ignores the field). Gemma 2 has neither norm nor base.
            let one_kind = cfg.sliding_window.is_none()
                || (0..cfg.num_hidden_layers)
                    .all(|l| cfg.layer_window(l).is_some() == cfg.rotates_locally(l));
            let family = match cfg.qk_norm {
                true => {
                    (one_kind && cfg.attn_logit_softcapping.is_none()).then_some(HfFamily::Gemma3)
                }
                false => cfg.rope_local.is_none().then_some(HfFamily::Gemma2),
            };
            let named = cfg.hf_family.is_none_or(|f| Some(f) == family);
            return family.filter(|_| gemma && named);
        }
        if let Some(f) = cfg.hf_family {
            // Only SmolLM3 writes layers without rotary positions, and Mistral's window is
            // every layer's: elsewhere they would be lost.
            let keeps_nope = cfg.nope_layers.is_empty() || f == HfFamily::SmolLm3;
            let keeps_window = match f {
                HfFamily::Qwen2 | HfFamily::Qwen3 | HfFamily::SmolLm3 => true,
                HfFamily::Mistral => cfg.full_attention_layers.is_empty(),
                HfFamily::Llama | HfFamily::Gpt2 => cfg.sliding_window.is_none(),
                HfFamily::Gemma2 | HfFamily::Gemma3 => unreachable!("answered above"),
            };
            return (keeps_nope && keeps_window && f.holds_layout_of(cfg)).then_some(f);
        }
        let windowed = cfg.sliding_window.is_some();
        let llama_like = llama_like(cfg);
        if gpt2_like(cfg) && cfg.nope_layers.is_empty() && !windowed {
            Some(HfFamily::Gpt2)
        } else if !cfg.nope_layers.is_empty()
            || (windowed && !cfg.full_attention_layers.is_empty() && !cfg.qk_norm && !cfg.qkv_bias)
        {
            // Only SmolLM3 has layers without rotary positions, and of Llama's layout only it
            // slides some layers and not others.
            (llama_like && !cfg.qk_norm && !cfg.qkv_bias).then_some(HfFamily::SmolLm3)
        } else if llama_like && cfg.qk_norm {
            (!cfg.qkv_bias).then_some(HfFamily::Qwen3)
        } else if llama_like && cfg.qkv_bias {
            Some(HfFamily::Qwen2)
        } else if llama_like && windowed {
            Some(HfFamily::Mistral)
        } else if llama_like {
            Some(HfFamily::Llama)
        } else {
            None
        }
    }

    /// Whether this (non-Gemma) family's modules hold every weight of `cfg`'s layers and
    /// compute as they do: a `[model] hf_family` set by hand is checked, or an export would
    /// drop q/k norms or biases without a word. Qwen2's q, k and v biases may be absent
    /// (transformers starts them at zero).
    pub fn holds_layout_of(self, cfg: &ModelConfig) -> bool {
        match self {
            HfFamily::Gpt2 => gpt2_like(cfg),
            HfFamily::Llama | HfFamily::Mistral | HfFamily::SmolLm3 => {
                llama_like(cfg) && !cfg.qk_norm && !cfg.qkv_bias
            }
            HfFamily::Qwen2 => llama_like(cfg) && !cfg.qk_norm,
            HfFamily::Qwen3 => llama_like(cfg) && cfg.qk_norm && !cfg.qkv_bias,
            HfFamily::Gemma2 | HfFamily::Gemma3 => unreachable!("checked by HfFamily::of"),
        }
    }
}

/// RMSNorm, rotary positions, SwiGLU and no biases but maybe q, k and v's: Llama's layout
/// and its kin's.
fn llama_like(cfg: &ModelConfig) -> bool {
    cfg.norm == NormKind::RmsNorm
        && cfg.position == PositionKind::Rope
        && cfg.mlp == MlpKind::SwiGlu
        && !cfg.bias
}

/// GPT-2's layout: LayerNorm, learned positions, GELU, biases everywhere, a tied head.
fn gpt2_like(cfg: &ModelConfig) -> bool {
    cfg.norm == NormKind::LayerNorm
        && cfg.position == PositionKind::Learned
        && cfg.mlp == MlpKind::Gelu
        && cfg.bias
        && !cfg.qkv_bias
        && !cfg.qk_norm
        && cfg.tie_word_embeddings
}

/// Rotary frequency scaling for contexts longer than the model was first trained on. Told
/// apart by their fields (a table of `factor` alone is linear), so that configs written
/// before linear scaling existed read as they did.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum RopeScaling {
    Llama3(Llama3Scaling),
    /// `rope_type = "linear"`: every frequency divided by `factor` (Gemma 3's full layers
    /// from 4B up).
    Linear(LinearScaling),
}

/// Llama 3's frequency-dependent rotary scaling (`rope_type = "llama3"` in `config.json`):
/// wavelengths longer than `original_max_position_embeddings / low_freq_factor` are stretched
/// by `factor`, shorter than `.. / high_freq_factor` kept, and those between blended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearScaling {
    pub factor: f64,
}

/// Every field either kind has, so that a misspelt one is named (an untagged enum's error
/// would name none).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScalingFields {
    factor: f64,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

impl<'de> Deserialize<'de> for RopeScaling {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let f = ScalingFields::deserialize(d)?;
        match (
            f.low_freq_factor,
            f.high_freq_factor,
            f.original_max_position_embeddings,
        ) {
            (None, None, None) => Ok(RopeScaling::Linear(LinearScaling { factor: f.factor })),
            (Some(low), Some(high), Some(orig)) => Ok(RopeScaling::Llama3(Llama3Scaling {
                factor: f.factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: orig,
            })),
            _ => Err(serde::de::Error::custom(
                "llama3 scaling needs low_freq_factor, high_freq_factor and \
                 original_max_position_embeddings together; linear scaling has factor alone",
            )),
        }
    }
}

impl RopeScaling {
    /// Scales the inverse frequency `inv_freq` of one rotary pair.
    pub fn apply(&self, inv_freq: f64) -> f64 {
        match self {
            RopeScaling::Llama3(s) => s.apply(inv_freq),
            RopeScaling::Linear(s) => inv_freq / s.factor,
        }
    }
}

impl Llama3Scaling {
    fn apply(&self, inv_freq: f64) -> f64 {
        let old = self.original_max_position_embeddings as f64;
        let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
        if wavelen < old / self.high_freq_factor {
            inv_freq
        } else if wavelen > old / self.low_freq_factor {
            inv_freq / self.factor
        } else {
            let smooth = (old / wavelen - self.low_freq_factor)
                / (self.high_freq_factor - self.low_freq_factor);
            (1.0 - smooth) * inv_freq / self.factor + smooth * inv_freq
        }
    }
}

/// Gemma 3's second rotary base and the layers that use it. Kept apart from the sliding
/// window: transformers picks a layer's base by its type even where no window is set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalRope {
    pub theta: f64,
    /// 0-based.
    pub layers: Vec<usize>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self::preset("tiny").expect("tiny preset exists")
    }
}

impl ModelConfig {
    /// `preset`'s shape cut down for unit tests: 2 layers 48 wide, 4 heads (at most 2 kv
    /// heads), a 61-token vocabulary and 32 positions.
    #[cfg(test)]
    pub fn for_tests(preset: &str) -> Self {
        let mut cfg = Self::preset(preset).unwrap();
        (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers,
        ) = (48, 96, 2);
        cfg.num_attention_heads = 4;
        cfg.num_key_value_heads = cfg.num_key_value_heads.min(2);
        (cfg.vocab_size, cfg.max_position_embeddings) = (61, 32);
        cfg
    }

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
            qkv_bias: false,
            qk_norm: false,
            nope_layers: Vec::new(),
            sliding_window: None,
            full_attention_layers: Vec::new(),
            head_dim: None,
            rope_scaling: None,
            rope_local: None,
            norm_plus_one: false,
            post_norms: false,
            embed_scale: false,
            query_pre_attn_scalar: None,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            dropout: 0.0,
            hf_family: None,
            score_pad: None,
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
                qkv_bias: false,
                qk_norm: false,
                nope_layers: Vec::new(),
                sliding_window: None,
                full_attention_layers: Vec::new(),
                head_dim: None,
                rope_scaling: None,
                rope_local: None,
                norm_plus_one: false,
                post_norms: false,
                embed_scale: false,
                query_pre_attn_scalar: None,
                attn_logit_softcapping: None,
                final_logit_softcapping: None,
                dropout: 0.0,
                hf_family: None,
                score_pad: None,
            },
            other => bail!("unknown model preset `{other}` (known: tiny, small, llama-tiny, gpt2)"),
        })
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether any of Gemma's departures from Llama's layout is on.
    pub fn has_gemma_features(&self) -> bool {
        self.norm_plus_one
            || self.post_norms
            || self.embed_scale
            || self.mlp == MlpKind::GeGlu
            || self.query_pre_attn_scalar.is_some()
            || self.rope_local.is_some()
            || self.attn_logit_softcapping.is_some()
            || self.final_logit_softcapping.is_some()
    }

    /// Whether `layer` rotates by the second base (`rope_local`).
    pub fn rotates_locally(&self, layer: usize) -> bool {
        self.rope_local
            .as_ref()
            .is_some_and(|r| r.layers.contains(&layer))
    }

    /// The scale of attention's logits: `1 / sqrt(query_pre_attn_scalar)`, else
    /// `1 / sqrt(head_dim)`.
    pub fn attn_scale(&self) -> f64 {
        1.0 / (self.query_pre_attn_scalar.unwrap_or(self.head_dim()) as f64).sqrt()
    }

    /// The attention window of `layer`: `sliding_window` unless the layer is one of
    /// `full_attention_layers`.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        self.sliding_window
            .filter(|_| !self.full_attention_layers.contains(&layer))
    }

    /// Number of parameters of the model (as u128: a mistyped size must not overflow).
    pub fn num_params(&self) -> u128 {
        let u = |x: usize| x as u128;
        let (h, v, i) = (
            u(self.hidden_size),
            u(self.vocab_size),
            u(self.intermediate_size),
        );
        let (aw, kvw) = (
            u(self.attn_width()),
            u(self.num_key_value_heads * self.head_dim()),
        );
        let b = |on: bool, n: u128| if on { n } else { 0 };
        let norm = h + b(self.norm == NormKind::LayerNorm, h);
        let norms_per_layer = if self.post_norms { 4 } else { 2 };
        let qkv_bias = self.bias || self.qkv_bias;
        let attn = h * aw + 2 * h * kvw + aw * h + b(qkv_bias, aw + 2 * kvw) + b(self.bias, h);
        let gates = if self.mlp == MlpKind::Gelu { 1 } else { 2 };
        let mlp = gates * h * i + i * h + b(self.bias, gates * i + h);
        let qk_norm = b(self.qk_norm, 2 * u(self.head_dim()));
        let layer = norms_per_layer * norm + attn + qk_norm + mlp;
        let pos = b(
            self.position == PositionKind::Learned,
            u(self.max_position_embeddings) * h,
        );
        let head = b(!self.tie_word_embeddings, v * h);
        v * h + pos + u(self.num_hidden_layers) * layer + norm + head
    }

    /// Width of the concatenated attention heads (the q and o projections' inner size).
    pub fn attn_width(&self) -> usize {
        self.num_attention_heads * self.head_dim()
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
        super::check_counts("model", &positive)?;
        if self.head_dim == Some(0) {
            bail!("model.head_dim must be positive");
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
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
        for (field, layers) in [
            ("nope_layers", &self.nope_layers),
            ("full_attention_layers", &self.full_attention_layers),
        ] {
            if let Some(&l) = layers.iter().find(|&&l| l >= self.num_hidden_layers) {
                bail!(
                    "model.{field} names layer {l} of a model with {} layers",
                    self.num_hidden_layers
                );
            }
        }
        if !self.nope_layers.is_empty() && self.position != PositionKind::Rope {
            bail!("model.nope_layers needs rotary positions (position = \"rope\") elsewhere");
        }
        if self.sliding_window == Some(0) {
            bail!("model.sliding_window must be at least 1 (the query itself)");
        }
        if !self.full_attention_layers.is_empty() && self.sliding_window.is_none() {
            bail!("model.full_attention_layers needs model.sliding_window for the other layers");
        }
        for (name, v) in [
            ("rms_norm_eps", self.rms_norm_eps),
            ("rope_theta", self.rope_theta),
        ] {
            if v.is_nan() || v <= 0.0 {
                bail!("model.{name} must be positive, got {v}");
            }
        }
        if let Some(local) = &self.rope_local {
            if local.theta <= 0.0 {
                bail!("model.rope_local.theta must be positive");
            }
            if let Some(&l) = local.layers.iter().find(|&&l| l >= self.num_hidden_layers) {
                bail!(
                    "model.rope_local.layers names layer {l} of a model with {} layers",
                    self.num_hidden_layers
                );
            }
        }
        for (field, cap) in [
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ] {
            if cap.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
                bail!("model.{field} must be positive");
            }
        }
        if self.query_pre_attn_scalar == Some(0) {
            bail!("model.query_pre_attn_scalar must be positive");
        }
        if self.norm_plus_one && self.norm != NormKind::RmsNorm {
            bail!("model.norm_plus_one needs norm = \"rmsnorm\"");
        }
        if let Some(s) = &self.rope_scaling {
            let (factor, bands) = match s {
                RopeScaling::Llama3(l) => (l.factor, l.high_freq_factor > l.low_freq_factor),
                RopeScaling::Linear(l) => (l.factor, true),
            };
            if !(factor.is_finite() && factor > 0.0 && bands) {
                bail!(
                    "model.rope_scaling: factor must be positive (and llama3's \
                     high_freq_factor above its low_freq_factor), got {s:?}"
                );
            }
        }
        if self.rope_local.is_some() && self.position != PositionKind::Rope {
            bail!("model.rope_local needs rotary positions (position = \"rope\")");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_known_models() {
        // GPT-2 small with its padded vocabulary: 124M (nanoGPT counts 124,475,904 with the
        // 50304-token embedding).
        assert_eq!(
            ModelConfig::preset("gpt2").unwrap().num_params(),
            124_475_904
        );
        let huge = ModelConfig {
            vocab_size: 99_999_999_999,
            ..ModelConfig::default()
        };
        assert!(huge.num_params() > 1_000_000_000_000);
    }

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
        let c = ModelConfig {
            nope_layers: vec![1, 4],
            ..ModelConfig::preset("tiny").unwrap()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("nope_layers") && e.contains("layer 4"), "{e}");
        let c = ModelConfig {
            nope_layers: vec![1],
            ..ModelConfig::preset("gpt2").unwrap()
        };
        assert!(c.validate().unwrap_err().to_string().contains("rotary"));
    }

    /// A sliding window exports with a family that writes it: Mistral's where every layer
    /// slides, SmolLM3's (or Qwen's) where some do not; never Llama's or GPT-2's.
    #[test]
    fn sliding_windows_export_with_a_family_that_keeps_them() {
        let all = ModelConfig {
            sliding_window: Some(8),
            ..ModelConfig::preset("tiny").unwrap()
        };
        all.validate().unwrap();
        assert_eq!(HfFamily::of(&all), Some(HfFamily::Mistral));
        let some = ModelConfig {
            full_attention_layers: vec![0, 3],
            ..all.clone()
        };
        assert_eq!(HfFamily::of(&some), Some(HfFamily::SmolLm3));
        let qwen = ModelConfig {
            qkv_bias: true,
            ..some.clone()
        };
        assert_eq!(HfFamily::of(&qwen), Some(HfFamily::Qwen2));
        for (f, keeps) in [
            (HfFamily::Mistral, false),
            (HfFamily::Llama, false),
            // Qwen3's layers normalise q and k, which these do not.
            (HfFamily::Qwen3, false),
            (HfFamily::Qwen2, true),
        ] {
            let cfg = ModelConfig {
                hf_family: Some(f),
                ..some.clone()
            };
            assert_eq!(HfFamily::of(&cfg), keeps.then_some(f), "{f:?}");
        }
        let gpt2 = ModelConfig {
            sliding_window: Some(8),
            ..ModelConfig::preset("gpt2").unwrap()
        };
        assert_eq!(HfFamily::of(&gpt2), None);
        for (bad, field) in [
            (
                ModelConfig {
                    sliding_window: Some(0),
                    ..all.clone()
                },
                "sliding_window",
            ),
            (
                ModelConfig {
                    full_attention_layers: vec![4],
                    ..all.clone()
                },
                "layer 4",
            ),
            (
                ModelConfig {
                    sliding_window: None,
                    ..some.clone()
                },
                "needs model.sliding_window",
            ),
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
        assert_eq!(some.layer_window(0), None);
        assert_eq!(some.layer_window(1), Some(8));
    }

    /// A family named by hand exports only a model whose layers its modules hold whole: no
    /// q/k norms or biases dropped, no q/k norms made up.
    #[test]
    fn a_named_family_must_hold_the_layout() {
        let tiny = ModelConfig::preset("tiny").unwrap();
        let with = |f: HfFamily, qk_norm: bool, qkv_bias: bool| ModelConfig {
            hf_family: Some(f),
            qk_norm,
            qkv_bias,
            ..tiny.clone()
        };
        for (f, qk_norm, qkv_bias, keeps) in [
            (HfFamily::Llama, false, false, true),
            (HfFamily::Llama, true, false, false),
            (HfFamily::Llama, false, true, false),
            (HfFamily::Mistral, false, true, false),
            (HfFamily::Qwen2, false, true, true),
            (HfFamily::Qwen2, false, false, true),
            (HfFamily::Qwen2, true, true, false),
            (HfFamily::Qwen3, true, false, true),
            (HfFamily::Qwen3, false, false, false),
            (HfFamily::Qwen3, true, true, false),
            (HfFamily::Gpt2, false, false, false),
        ] {
            let cfg = with(f, qk_norm, qkv_bias);
            assert_eq!(
                HfFamily::of(&cfg),
                keeps.then_some(f),
                "{f:?} {qk_norm} {qkv_bias}"
            );
        }
        let gpt2 = ModelConfig {
            hf_family: Some(HfFamily::Gpt2),
            ..ModelConfig::preset("gpt2").unwrap()
        };
        assert_eq!(HfFamily::of(&gpt2), Some(HfFamily::Gpt2));
    }

    /// A model with NoPE layers exports as SmolLM3, the one family that writes them, even
    /// where it was imported as another (which would drop them): then as none.
    #[test]
    fn nope_layers_export_as_smollm3_or_not_at_all() {
        let nope = ModelConfig {
            nope_layers: vec![3],
            ..ModelConfig::preset("tiny").unwrap()
        };
        assert_eq!(HfFamily::of(&nope), Some(HfFamily::SmolLm3));
        let llama = ModelConfig {
            hf_family: Some(HfFamily::Llama),
            ..nope.clone()
        };
        assert_eq!(HfFamily::of(&llama), None);
        let qk = ModelConfig {
            qk_norm: true,
            ..nope
        };
        assert_eq!(HfFamily::of(&qk), None);
    }

    /// A checkpoint's `[model.rope_scaling]` reads as the kind its fields make, a misspelt
    /// field is named, and a scaling that would divide by zero is refused.
    #[test]
    fn rope_scalings_read_by_their_fields() {
        #[derive(Serialize, Deserialize)]
        struct Holder {
            rope_scaling: RopeScaling,
        }
        let read = |text: &str| toml::from_str::<Holder>(text).map(|h| h.rope_scaling);
        let llama3 = read(
            "[rope_scaling]\nfactor = 8\nlow_freq_factor = 1.0\nhigh_freq_factor = 4.0\n\
             original_max_position_embeddings = 8192\n",
        )
        .unwrap();
        assert!(matches!(&llama3, RopeScaling::Llama3(l) if l.factor == 8.0));
        let linear = read("[rope_scaling]\nfactor = 8.0\n").unwrap();
        assert_eq!(linear, RopeScaling::Linear(LinearScaling { factor: 8.0 }));
        for s in [llama3, linear] {
            let text = toml::to_string(&Holder {
                rope_scaling: s.clone(),
            })
            .unwrap();
            assert_eq!(read(&text).unwrap(), s);
        }
        let e = read("[rope_scaling]\nfactor = 8.0\nlow_freq_facter = 1.0\n").unwrap_err();
        assert!(e.to_string().contains("low_freq_facter"), "{e}");
        let e = read("[rope_scaling]\nfactor = 8.0\nlow_freq_factor = 1.0\n").unwrap_err();
        assert!(e.to_string().contains("together"), "{e}");
        let zero = ModelConfig {
            rope_scaling: Some(RopeScaling::Linear(LinearScaling { factor: 0.0 })),
            ..ModelConfig::preset("tiny").unwrap()
        };
        assert!(zero
            .validate()
            .unwrap_err()
            .to_string()
            .contains("rope_scaling"));
    }
}
