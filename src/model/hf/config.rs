//! `config.json` as temper reads it: the fields it takes, the family and head it names, and
//! the temper model it describes (rotary settings in `rope.rs`, sliding and NoPE layers in
//! `windows.rs`).

use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

use super::Family;
use crate::config::{LocalRope, MlpKind, ModelConfig, NormKind, PositionKind};
use crate::json_error::json_error;

/// The fields of a `config.json` temper reads; everything else in the file is ignored unless
/// it changes the architecture (checked in [`HfConfig::to_model`]).
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    pub(super) model_type: Option<String>,
    /// The language model of an image-and-text model (Gemma 3 from 4B up).
    /// Read only for Gemma 3: other families' may not be ours to parse.
    pub(super) text_config: Option<serde_json::Value>,
    /// The model class: `*ForCausalLM` (a policy) or `*ForSequenceClassification` (a reward
    /// model).
    pub(super) architectures: Option<Vec<String>>,
    /// A classifier's labels: a reward model has one.
    pub(super) id2label: Option<serde_json::Map<String, serde_json::Value>>,
    /// The reward bias temper's export keeps beside the classifier
    /// ([`SCORE_BIAS_FIELD`](super::SCORE_BIAS_FIELD)).
    pub(super) temper_score_bias: Option<f32>,
    pub(super) num_labels: Option<usize>,
    /// A classifier scores each sequence at its last token that is not this id (some older
    /// configs write -1 for none).
    /// Absent (Gemma's default, 0) differs from null (none).
    #[serde(default, deserialize_with = "present")]
    pub(super) pad_token_id: Option<Option<i64>>,
    pub(super) vocab_size: Option<usize>,
    pub(super) hidden_size: Option<usize>,
    pub(super) intermediate_size: Option<usize>,
    pub(super) num_hidden_layers: Option<usize>,
    pub(super) num_attention_heads: Option<usize>,
    /// Absent (the config class's default: 8 in Mistral, 32 in Qwen, 4 in SmolLM3 and Gemma)
    /// differs from null (as many as the query heads).
    #[serde(default, deserialize_with = "present")]
    pub(super) num_key_value_heads: Option<Option<usize>>,
    pub(super) head_dim: Option<usize>,
    pub(super) max_position_embeddings: Option<usize>,
    pub(super) rms_norm_eps: Option<f64>,
    pub(super) rope_theta: Option<f64>,
    pub(super) rope_scaling: Option<serde_json::Value>,
    /// transformers 5 writes the rotary settings (theta included) here instead.
    pub(super) rope_parameters: Option<serde_json::Value>,
    /// Rotary positions on only part of each head, which temper does not implement (also
    /// read inside the rotary settings).
    pub(super) partial_rotary_factor: Option<f64>,
    pub(super) tie_word_embeddings: Option<bool>,
    pub(super) attention_bias: Option<bool>,
    pub(super) mlp_bias: Option<bool>,
    pub(super) hidden_act: Option<String>,
    // Gemma 3's.
    pub(super) hidden_activation: Option<String>,
    /// A whole number, which transformers also takes written as a float (`256.0`).
    #[serde(default, deserialize_with = "whole")]
    pub(super) query_pre_attn_scalar: Option<usize>,
    /// The sliding layers' rotary base in configs written before transformers 5.
    pub(super) rope_local_base_freq: Option<f64>,
    /// Every this-many-th layer sees the whole context, where `layer_types` is absent.
    pub(super) sliding_window_pattern: Option<usize>,
    // Gemma 2's caps (30 and 50 where absent); Gemma 3 reads the first only.
    #[serde(default, deserialize_with = "present")]
    pub(super) final_logit_softcapping: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    pub(super) attn_logit_softcapping: Option<Option<f64>>,
    pub(super) use_bidirectional_attention: Option<bool>,
    /// Absent (transformers' default, 4096 in Mistral and Qwen) differs from null (none).
    #[serde(default, deserialize_with = "present")]
    pub(super) sliding_window: Option<Option<usize>>,
    pub(super) use_sliding_window: Option<bool>,
    /// Qwen2 and Qwen3: the layers below this one see the whole context (where `layer_types`
    /// does not say).
    pub(super) max_window_layers: Option<usize>,
    /// Per layer, `full_attention` or `sliding_attention` (transformers 5).
    pub(super) layer_types: Option<Vec<String>>,
    /// SmolLM3: per layer, 1 where it takes rotary positions, 0 where not (NoPE); without it,
    /// every `no_rope_layer_interval`-th layer (default 4) takes none, as transformers builds it.
    pub(super) no_rope_layers: Option<Vec<u8>>,
    pub(super) no_rope_layer_interval: Option<usize>,
    // GPT-2's names.
    pub(super) n_embd: Option<usize>,
    pub(super) n_layer: Option<usize>,
    pub(super) n_head: Option<usize>,
    pub(super) n_inner: Option<usize>,
    pub(super) n_positions: Option<usize>,
    pub(super) layer_norm_epsilon: Option<f64>,
    pub(super) activation_function: Option<String>,
    pub(super) scale_attn_by_inverse_layer_idx: Option<bool>,
    pub(super) scale_attn_weights: Option<bool>,
    /// GPTQ's, AWQ's, FP8's or bitsandbytes' packing of the weights, which temper does not read.
    pub(super) quantization_config: Option<serde_json::Value>,
}

/// A field that may be absent (`None`) or null (`Some(None)`).
fn present<'de, D, T>(d: D) -> std::result::Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A whole number written as an integer or as a float with no fraction (`256` or `256.0`).
fn whole<'de, D>(d: D) -> std::result::Result<Option<usize>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::Error;
    match Option::<f64>::deserialize(d)? {
        None => Ok(None),
        Some(x) if x >= 0.0 && x.fract() == 0.0 && x < 2f64.powi(53) => Ok(Some(x as usize)),
        Some(x) => Err(D::Error::custom(format!(
            "expected a whole number, got {x}"
        ))),
    }
}

/// The `model_type` of Gemma 3's image-and-text models.
const GEMMA3_MULTIMODAL: &str = "gemma3";

/// Whether model directory `dir` holds one of Gemma 3's image-and-text models, whose language
/// model transformers keeps under `model.language_model.` (false where its config.json does
/// not read).
pub fn is_gemma3_image_and_text(dir: &Path) -> bool {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&text)
        .is_ok_and(|v| v["model_type"] == GEMMA3_MULTIMODAL)
}

/// `file: field ...` errors for one `config.json`.
pub(super) struct At<'a>(pub(super) &'a Path);

impl At<'_> {
    pub(super) fn need<T: Copy>(&self, v: Option<T>, field: &str) -> Result<T> {
        v.with_context(|| format!("{}: field \"{field}\" is missing", self.0.display()))
    }

    pub(super) fn refuse(&self, field: &str, why: impl std::fmt::Display) -> anyhow::Error {
        anyhow::anyhow!("{}: field \"{field}\": {why}", self.0.display())
    }
}

/// What sits on the transformer of a Hugging Face model directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    /// `*ForCausalLM` (`GPT2LMHeadModel`): the language-model head; imported as a policy.
    Lm,
    /// `*ForSequenceClassification` with one label, as TRL's RewardTrainer saves a reward
    /// model: `score.weight` `[1, H]` (no bias) read at each sequence's last token that is not
    /// its `pad_token_id`; imported as a reward model (temper's `score.weight` `[H]`, a zero
    /// `score.bias`, and `ModelConfig::score_pad`).
    Score,
}

impl Head {
    /// The class name transformers loads this family's model with.
    pub fn architecture(self, family: Family) -> &'static str {
        use Family::*;
        match (self, family) {
            (Head::Lm, Gpt2) => "GPT2LMHeadModel",
            (Head::Lm, Llama) => "LlamaForCausalLM",
            (Head::Lm, Qwen2) => "Qwen2ForCausalLM",
            (Head::Lm, Qwen3) => "Qwen3ForCausalLM",
            (Head::Lm, Mistral) => "MistralForCausalLM",
            (Head::Lm, SmolLm3) => "SmolLM3ForCausalLM",
            (Head::Lm, Gemma2) => "Gemma2ForCausalLM",
            (Head::Lm, Gemma3) => "Gemma3ForCausalLM",
            (Head::Score, Gpt2) => "GPT2ForSequenceClassification",
            (Head::Score, Llama) => "LlamaForSequenceClassification",
            (Head::Score, Qwen2) => "Qwen2ForSequenceClassification",
            (Head::Score, Qwen3) => "Qwen3ForSequenceClassification",
            (Head::Score, Mistral) => "MistralForSequenceClassification",
            (Head::Score, SmolLm3) => "SmolLM3ForSequenceClassification",
            (Head::Score, Gemma2) => "Gemma2ForSequenceClassification",
            (Head::Score, Gemma3) => "Gemma3TextForSequenceClassification",
        }
    }
}

impl HfConfig {
    /// `path`'s config; of Gemma 3's image-and-text models, its language model's (its
    /// `text_config`, under the top level's model class), which is what temper trains.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| json_error(path, &text, &e))?;
        if cfg.model_type.as_deref() != Some(GEMMA3_MULTIMODAL) {
            return Ok(cfg);
        }
        let at = At(path);
        let inner = cfg
            .text_config
            .ok_or_else(|| at.refuse("text_config", "missing"))?;
        let mut inner: Self =
            serde_json::from_value(inner).map_err(|e| at.refuse("text_config", e))?;
        match inner.model_type.as_deref() {
            None | Some("gemma3_text") => inner.model_type = Some("gemma3_text".into()),
            Some(other) => {
                return Err(at.refuse(
                    "text_config",
                    format!("model_type `{other}`: Gemma 3's language model is gemma3_text"),
                ))
            }
        }
        // What the model class reads from the top level: its labels (a reward model's) and,
        // in transformers 5, whether the head is tied.
        inner.architectures = cfg.architectures;
        inner.id2label = cfg.id2label.or(inner.id2label);
        inner.num_labels = cfg.num_labels.or(inner.num_labels);
        inner.temper_score_bias = cfg.temper_score_bias.or(inner.temper_score_bias);
        inner.tie_word_embeddings = cfg.tie_word_embeddings.or(Some(true));
        // Gemma3ForConditionalGeneration caps no logits, whatever its text_config says.
        inner.final_logit_softcapping = Some(None);
        Ok(inner)
    }

    pub fn family(&self, path: &Path) -> Result<Family> {
        let at = At(path);
        let t = self
            .model_type
            .as_deref()
            .ok_or_else(|| at.refuse("model_type", "missing"))?;
        Ok(match t {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "mistral" => Family::Mistral,
            "smollm3" => Family::SmolLm3,
            "gemma2" => Family::Gemma2,
            "gemma3_text" => Family::Gemma3,
            "gpt2" => Family::Gpt2,
            other => {
                return Err(at.refuse(
                    "model_type",
                    format!(
                        "`{other}` is not a family temper reads \
                         (llama, qwen2, qwen3, mistral, smollm3, gemma2, gemma3_text, gpt2)"
                    ),
                ))
            }
        })
    }

    /// The head the model class puts on the transformer: a language model's, or a one-label
    /// classifier's (a reward model); any other class is refused naming the field.
    pub fn head(&self, path: &Path) -> Result<Head> {
        let at = At(path);
        let Some(arch) = self.architectures.as_ref().and_then(|a| a.first()) else {
            return Ok(Head::Lm);
        };
        if arch.ends_with("ForSequenceClassification") {
            // transformers' default is two labels where the file names none.
            let labels = match (&self.id2label, self.num_labels) {
                (Some(m), _) => m.len(),
                (None, n) => n.unwrap_or(2),
            };
            if labels != 1 {
                return Err(at.refuse(
                    "id2label",
                    format!("{labels} labels: a reward model scores with one (num_labels = 1)"),
                ));
            }
            return Ok(Head::Score);
        }
        // Gemma 3's image-and-text model reaches here as its language model ([`Self::read`]).
        if arch.ends_with("ForCausalLM")
            || arch.ends_with("LMHeadModel")
            || arch == "Gemma3ForConditionalGeneration"
        {
            return Ok(Head::Lm);
        }
        Err(at.refuse(
            "architectures",
            format!(
                "`{arch}`: temper reads causal language models (*ForCausalLM) and one-label \
                 reward models (*ForSequenceClassification)"
            ),
        ))
    }

    /// The temper model this config describes; features temper does not implement are
    /// refused naming the field.
    pub fn to_model(&self, path: &Path) -> Result<(Family, ModelConfig)> {
        let family = self.family(path)?;
        // Said here, by field: the first packed tensor (`qweight`, `weight_scale_inv`) would
        // otherwise be refused as not a weight of the model.
        if let Some(q) = &self.quantization_config {
            let method = q["quant_method"].as_str().unwrap_or("unnamed");
            return Err(At(path).refuse(
                "quantization_config",
                format!(
                    "a {method}-quantized checkpoint is not read: give its bf16 or f32 weights"
                ),
            ));
        }
        let cfg = match family {
            Family::Gpt2 => self.gpt2(path)?,
            _ => self.llama_like(path, family)?,
        };
        cfg.validate()
            .with_context(|| format!("{}: unusable model shape", path.display()))?;
        Ok((family, cfg))
    }

    fn llama_like(&self, path: &Path, family: Family) -> Result<ModelConfig> {
        let at = At(path);
        let gemma = matches!(family, Family::Gemma2 | Family::Gemma3);
        let gemma3 = family == Family::Gemma3;
        if gemma {
            self.gemma_refusals(&at)?;
        } else if let Some(act) = self
            .hidden_act
            .as_deref()
            // transformers' ACT2FN maps both names to the same SiLU.
            .filter(|a| !matches!(*a, "silu" | "swish"))
        {
            return Err(at.refuse(
                "hidden_act",
                format!("`{act}`: only silu (SwiGLU) is implemented"),
            ));
        }
        if self.attention_bias == Some(true) && family != Family::Qwen2 {
            return Err(at.refuse("attention_bias", "a bias on o_proj is not implemented"));
        }
        if self.mlp_bias == Some(true) {
            return Err(at.refuse("mlp_bias", "MLP biases are not implemented"));
        }
        // Gemma2Config's and Gemma3TextConfig's defaults, on which the text_config of Gemma
        // 3's image-and-text models relies for most of its fields.
        let or_gemma = |v: Option<usize>, default: usize| v.or(gemma.then_some(default));
        let (vocab_default, ctx_default) = match gemma3 {
            true => (262_208, 131_072),
            false => (256_000, 8192),
        };
        let ctx = at.need(
            or_gemma(self.max_position_embeddings, ctx_default),
            "max_position_embeddings",
        )?;
        let heads = at.need(or_gemma(self.num_attention_heads, 8), "num_attention_heads")?;
        let layers = at.need(or_gemma(self.num_hidden_layers, 26), "num_hidden_layers")?;
        let nope_layers = match family {
            Family::SmolLm3 => self.nope_layers(path, layers)?,
            _ => Vec::new(),
        };
        let sliding = self.sliding_layers(path, family, layers, &nope_layers)?;
        let (sliding_window, full_attention_layers) = self.windows(path, family, ctx, &sliding)?;
        // The config classes' defaults where the file leaves a field out (transformers' own):
        // Qwen3Config's head_dim is 128, not hidden_size / heads; SmolLM3 ties its head.
        let (kv_default, tied_default, head_dim) = match (gemma, family) {
            (true, _) => (4, true, Some(self.head_dim.unwrap_or(256))),
            (false, Family::Qwen3) => (32, false, Some(self.head_dim.unwrap_or(128))),
            (false, Family::Qwen2) => (32, false, self.head_dim),
            (false, Family::Mistral) => (8, false, self.head_dim),
            (false, Family::SmolLm3) => (4, true, self.head_dim),
            (false, _) => (heads, false, self.head_dim),
        };
        self.rope_refusals(&at, family)?;
        let rope_local = match gemma3 {
            true => Some(LocalRope {
                theta: self.local_theta(),
                layers: (0..layers).filter(|&l| sliding[l]).collect(),
            }),
            false => None,
        };
        Ok(ModelConfig {
            vocab_size: at.need(or_gemma(self.vocab_size, vocab_default), "vocab_size")?,
            hidden_size: at.need(or_gemma(self.hidden_size, 2304), "hidden_size")?,
            intermediate_size: at
                .need(or_gemma(self.intermediate_size, 9216), "intermediate_size")?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: self
                .num_key_value_heads
                .map_or(kv_default, |n| n.unwrap_or(heads)),
            max_position_embeddings: ctx,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: self.theta(family),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(tied_default),
            norm: NormKind::RmsNorm,
            position: PositionKind::Rope,
            mlp: match gemma {
                true => MlpKind::GeGlu,
                false => MlpKind::SwiGlu,
            },
            bias: false,
            qkv_bias: family == Family::Qwen2,
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            nope_layers,
            sliding_window,
            full_attention_layers,
            head_dim,
            rope_scaling: self.rope_scaling(path, family, ctx)?,
            rope_local,
            norm_plus_one: gemma,
            post_norms: gemma,
            embed_scale: gemma,
            query_pre_attn_scalar: match gemma {
                true => Some(self.query_pre_attn_scalar.unwrap_or(256)),
                false => None,
            },
            attn_logit_softcapping: match family {
                Family::Gemma2 => self.attn_logit_softcapping.unwrap_or(Some(50.0)),
                _ => None,
            },
            final_logit_softcapping: match family {
                Family::Gemma2 => self.final_logit_softcapping.unwrap_or(Some(30.0)),
                Family::Gemma3 => self.final_logit_softcapping.flatten(),
                _ => None,
            },
            dropout: 0.0,
            hf_family: Some(family),
            score_pad: None,
        })
    }

    /// What of a Gemma config temper does not implement, by field.
    fn gemma_refusals(&self, at: &At) -> Result<()> {
        // Gemma reads `hidden_activation` alone; a `hidden_act` beside it changes nothing.
        let act = self
            .hidden_activation
            .as_deref()
            .unwrap_or("gelu_pytorch_tanh");
        if act != "gelu_pytorch_tanh" {
            return Err(at.refuse(
                "hidden_activation",
                format!("`{act}`: only gelu_pytorch_tanh (GeGLU) is implemented"),
            ));
        }
        if self.use_bidirectional_attention == Some(true) {
            return Err(at.refuse(
                "use_bidirectional_attention",
                "bidirectional attention (EmbeddingGemma) is not implemented",
            ));
        }
        Ok(())
    }

    fn gpt2(&self, path: &Path) -> Result<ModelConfig> {
        let at = At(path);
        if let Some(act) = self
            .activation_function
            .as_deref()
            // transformers' gelu_fast is the same tanh approximation, written another way.
            .filter(|a| !matches!(*a, "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast"))
        {
            return Err(at.refuse(
                "activation_function",
                format!("`{act}`: only the tanh GELU (gelu_new) is implemented"),
            ));
        }
        if self.scale_attn_by_inverse_layer_idx == Some(true) {
            return Err(at.refuse(
                "scale_attn_by_inverse_layer_idx",
                "scaling attention by the layer index is not implemented",
            ));
        }
        // transformers divides the attention scores by sqrt(head_dim) only where this is true.
        if self.scale_attn_weights == Some(false) {
            return Err(at.refuse(
                "scale_attn_weights",
                "false: attention scores not divided by sqrt(head_dim) are not implemented",
            ));
        }
        // temper's GPT-2 reads its logits through the embedding; an untied lm_head.weight
        // would be dropped as the tied copy.
        if self.tie_word_embeddings == Some(false) {
            return Err(at.refuse(
                "tie_word_embeddings",
                "false: a GPT-2 head apart from its embedding is not implemented",
            ));
        }
        let hidden = at.need(self.n_embd, "n_embd")?;
        let heads = at.need(self.n_head, "n_head")?;
        // GPT-2's layout is temper's `gpt2` preset; the sizes come from the file.
        let preset = ModelConfig::preset("gpt2")?;
        Ok(ModelConfig {
            vocab_size: at.need(self.vocab_size, "vocab_size")?,
            hidden_size: hidden,
            intermediate_size: self.n_inner.unwrap_or(4 * hidden),
            num_hidden_layers: at.need(self.n_layer, "n_layer")?,
            num_attention_heads: heads,
            num_key_value_heads: heads,
            max_position_embeddings: at.need(self.n_positions, "n_positions")?,
            rms_norm_eps: self.layer_norm_epsilon.unwrap_or(1e-5),
            hf_family: Some(Family::Gpt2),
            score_pad: None,
            ..preset
        })
    }
}
