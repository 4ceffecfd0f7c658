//! Hugging Face model directories in and out: `config.json` (read through its own serde
//! struct, then converted to [`ModelConfig`]), `model.safetensors` or shards listed in
//! `model.safetensors.index.json` (memory-mapped, read tensor by tensor), for the families
//! `llama` (Llama 3's `rope_scaling` included), `qwen2` (bias on q/k/v), `qwen3` (RMSNorm of
//! each head's q and k), `mistral` (a sliding window), `smollm3` (Llama's layout with every
//! fourth layer's rotary positions left out), `gemma3_text` (Gemma 3's text model: norms
//! after each branch with gains held as offsets from one, GeGLU, a scaled embedding, and
//! sliding layers with a rotary base of their own) and `gpt2`; sliding windows where the family has
//! them (`sliding_window`, `use_sliding_window`, `max_window_layers`, `layer_types`)
//! (Conv1D weights stored `[in, out]`, q/k/v fused in `c_attn`, learned positions). Names are
//! translated both ways, so `export --format hf` writes back exactly what was read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

pub use crate::config::HfFamily as Family;
use crate::config::{
    LinearScaling, Llama3Scaling, LocalRope, MlpKind, ModelConfig, NormKind, PositionKind,
    RopeScaling,
};
use crate::json_error::json_error;

/// The fields of a `config.json` temper reads; everything else in the file is ignored unless
/// it changes the architecture (checked in [`HfConfig::to_model`]).
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    model_type: Option<String>,
    /// The language model of an image-and-text model (Gemma 3 from 4B up).
    /// Read only for Gemma 3: other families' may not be ours to parse.
    text_config: Option<serde_json::Value>,
    /// The model class: `*ForCausalLM` (a policy) or `*ForSequenceClassification` (a reward
    /// model).
    architectures: Option<Vec<String>>,
    /// A classifier's labels: a reward model has one.
    id2label: Option<serde_json::Map<String, serde_json::Value>>,
    /// The reward bias temper's export keeps beside the classifier ([`SCORE_BIAS_FIELD`]).
    temper_score_bias: Option<f32>,
    num_labels: Option<usize>,
    /// A classifier scores each sequence at its last token that is not this id (some older
    /// configs write -1 for none).
    /// Absent (Gemma's default, 0) differs from null (none).
    #[serde(default, deserialize_with = "present")]
    pad_token_id: Option<Option<i64>>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    /// Absent (the config class's default: 8 in Mistral, 32 in Qwen, 4 in SmolLM3 and Gemma)
    /// differs from null (as many as the query heads).
    #[serde(default, deserialize_with = "present")]
    num_key_value_heads: Option<Option<usize>>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5 writes the rotary settings (theta included) here instead.
    rope_parameters: Option<serde_json::Value>,
    /// Rotary positions on only part of each head, which temper does not implement (also
    /// read inside the rotary settings).
    partial_rotary_factor: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    // Gemma 3's.
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<usize>,
    /// The sliding layers' rotary base in configs written before transformers 5.
    rope_local_base_freq: Option<f64>,
    /// Every this-many-th layer sees the whole context, where `layer_types` is absent.
    sliding_window_pattern: Option<usize>,
    // Gemma 2's caps (30 and 50 where absent); Gemma 3 reads the first only.
    #[serde(default, deserialize_with = "present")]
    final_logit_softcapping: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    attn_logit_softcapping: Option<Option<f64>>,
    use_bidirectional_attention: Option<bool>,
    /// Absent (transformers' default, 4096 in Mistral and Qwen) differs from null (none).
    #[serde(default, deserialize_with = "present")]
    sliding_window: Option<Option<usize>>,
    use_sliding_window: Option<bool>,
    /// Qwen2 and Qwen3: the layers below this one see the whole context (where `layer_types`
    /// does not say).
    max_window_layers: Option<usize>,
    /// Per layer, `full_attention` or `sliding_attention` (transformers 5).
    layer_types: Option<Vec<String>>,
    /// SmolLM3: per layer, 1 where it takes rotary positions, 0 where not (NoPE); without it,
    /// every `no_rope_layer_interval`-th layer (default 4) takes none, as transformers builds it.
    no_rope_layers: Option<Vec<u8>>,
    no_rope_layer_interval: Option<usize>,
    // GPT-2's names.
    n_embd: Option<usize>,
    n_layer: Option<usize>,
    n_head: Option<usize>,
    n_inner: Option<usize>,
    n_positions: Option<usize>,
    layer_norm_epsilon: Option<f64>,
    activation_function: Option<String>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    scale_attn_weights: Option<bool>,
    /// GPTQ's, AWQ's, FP8's or bitsandbytes' packing of the weights, which temper does not read.
    quantization_config: Option<serde_json::Value>,
}

/// A field that may be absent (`None`) or null (`Some(None)`).
fn present<'de, D, T>(d: D) -> std::result::Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// The `model_type` of Gemma 3's image-and-text models.
const GEMMA3_MULTIMODAL: &str = "gemma3";

/// `file: field ...` errors for one `config.json`.
struct At<'a>(&'a Path);

impl At<'_> {
    fn need<T: Copy>(&self, v: Option<T>, field: &str) -> Result<T> {
        v.with_context(|| format!("{}: field \"{field}\" is missing", self.0.display()))
    }

    fn refuse(&self, field: &str, why: impl std::fmt::Display) -> anyhow::Error {
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

    /// Per layer, whether it is a sliding layer as transformers types it: `layer_types` where
    /// the family reads it, else Qwen's from `max_window_layers` on, SmolLM3's NoPE layers,
    /// all but every `sliding_window_pattern`-th (6) of Gemma 3's, every layer of Mistral's.
    fn sliding_layers(
        &self,
        path: &Path,
        family: Family,
        layers: usize,
        nope: &[usize],
    ) -> Result<Vec<bool>> {
        let at = At(path);
        let reads_types = matches!(
            family,
            Family::Qwen2 | Family::Qwen3 | Family::SmolLm3 | Family::Gemma2 | Family::Gemma3
        );
        if let Some(types) = self.layer_types.as_ref().filter(|_| reads_types) {
            if types.len() != layers {
                return Err(at.refuse(
                    "layer_types",
                    format!("{} entries for {layers} layers", types.len()),
                ));
            }
            let mut flags = Vec::with_capacity(layers);
            for t in types {
                flags.push(match t.as_str() {
                    "full_attention" => false,
                    "sliding_attention" => true,
                    other => {
                        return Err(at.refuse(
                            "layer_types",
                            format!(
                                "`{other}` layers are not implemented (full_attention and \
                                 sliding_attention are)"
                            ),
                        ))
                    }
                });
            }
            return Ok(flags);
        }
        let pattern = self.sliding_window_pattern.unwrap_or(6);
        if family == Family::Gemma3 && pattern == 0 {
            return Err(at.refuse("sliding_window_pattern", "must be positive"));
        }
        Ok((0..layers)
            .map(|l| match family {
                Family::Qwen2 | Family::Qwen3 => l >= self.max_window_layers.unwrap_or(28),
                Family::SmolLm3 => nope.contains(&l),
                Family::Gemma2 => l % 2 == 0,
                Family::Gemma3 => (l + 1) % pattern != 0,
                _ => true,
            })
            .collect())
    }

    /// The sliding window and the layers it spares, as transformers decides them: Mistral's
    /// `sliding_window` (4096 where the field is absent) is every layer's, whatever
    /// `layer_types` says; Qwen2's, Qwen3's (4096 where absent) and SmolLM3's only with
    /// `use_sliding_window`, Gemma 3's (4096 where absent) always, in the `sliding` layers
    /// ([`Self::sliding_layers`]). A window no shorter than the context never hides a key and
    /// is dropped; Llama has none.
    fn windows(
        &self,
        path: &Path,
        family: Family,
        ctx: usize,
        sliding: &[bool],
    ) -> Result<(Option<usize>, Vec<usize>)> {
        let at = At(path);
        let layers = sliding.len();
        let default = match family {
            Family::Mistral | Family::Qwen2 | Family::Qwen3 | Family::Gemma2 | Family::Gemma3 => {
                Some(4096)
            }
            _ => None,
        };
        let field = self.sliding_window.unwrap_or(default);
        let qwen_like = matches!(family, Family::Qwen2 | Family::Qwen3 | Family::SmolLm3);
        let window = match family {
            _ if qwen_like => field.filter(|_| self.use_sliding_window == Some(true)),
            Family::Mistral | Family::Gemma2 | Family::Gemma3 => field,
            _ => None,
        };
        if window == Some(0) {
            return Err(at.refuse("sliding_window", "must be at least 1"));
        }
        let types = self.layer_types.as_ref().filter(|_| qwen_like);
        let slides = |types: &Vec<String>| types.iter().any(|t| t == "sliding_attention");
        // Without use_sliding_window Qwen slides nothing, whatever layer_types says (some
        // transformers versions wrote sliding_attention from max_window_layers on regardless).
        // SmolLM3 keeps `sliding_window` then, and transformers masks those layers with it
        // while its attention ignores it: no one reading of such a file is right.
        if family == Family::SmolLm3
            && window.is_none()
            && field.is_some()
            && types.is_some_and(slides)
        {
            return Err(at.refuse(
                "use_sliding_window",
                "false beside a sliding_window and sliding_attention layers is ambiguous",
            ));
        }
        match window.filter(|&w| w < ctx) {
            Some(w) if sliding.contains(&true) => {
                let full = (0..layers).filter(|&l| !sliding[l]).collect();
                Ok((Some(w), full))
            }
            _ => Ok((None, Vec::new())),
        }
    }

    /// SmolLM3's layers without rotary positions, from `no_rope_layers` (one 0/1 flag a
    /// layer) or, where absent, every `no_rope_layer_interval`-th layer.
    fn nope_layers(&self, path: &Path, layers: usize) -> Result<Vec<usize>> {
        let at = At(path);
        let Some(flags) = &self.no_rope_layers else {
            let every = self.no_rope_layer_interval.unwrap_or(4);
            if every == 0 {
                return Err(at.refuse("no_rope_layer_interval", "must be positive"));
            }
            return Ok((0..layers).filter(|l| (l + 1) % every == 0).collect());
        };
        // transformers reads the first flag of each layer, so a longer list is no error.
        if flags.len() < layers {
            return Err(at.refuse(
                "no_rope_layers",
                format!("{} flags for {layers} layers", flags.len()),
            ));
        }
        let flags = &flags[..layers];
        if let Some(f) = flags.iter().find(|&&f| f > 1) {
            return Err(at.refuse(
                "no_rope_layers",
                format!("{f}: each flag is 1 (rotary positions) or 0 (none)"),
            ));
        }
        Ok((0..layers).filter(|&l| flags[l] == 0).collect())
    }

    /// The rotary settings of one kind of layer: Gemma 3's entry for `full_attention` or
    /// `sliding_attention` in `rope_parameters`; elsewhere the whole object, which a
    /// `rope_scaling` that says anything replaces, as transformers reads them.
    fn rope_params(&self, family: Family, kind: &str) -> Option<&serde_json::Value> {
        if family == Family::Gemma3 {
            return self.rope_parameters.as_ref()?.get(kind);
        }
        self.rope_scaling
            .as_ref()
            .filter(|v| says_anything(v))
            .or(self.rope_parameters.as_ref())
    }

    /// Rotary positions on part of each head (`partial_rotary_factor` below 1), at the top
    /// level or in the rotary settings, are refused by field; so are settings per kind of
    /// layer outside Gemma 3, which would otherwise read as no settings at all.
    fn rope_refusals(&self, at: &At, family: Family) -> Result<()> {
        let nested = self
            .rope_params(family, "full_attention")
            .filter(|_| family != Family::Gemma3)
            .and_then(|p| p.as_object())
            .is_some_and(|o| {
                o.contains_key("full_attention") || o.contains_key("sliding_attention")
            });
        if nested {
            return Err(at.refuse(
                self.rope_field(family),
                "rotary settings per kind of layer are read for Gemma 3 only",
            ));
        }
        let settings: Vec<(&serde_json::Value, &str)> = match family {
            Family::Gemma3 => ["full_attention", "sliding_attention"]
                .into_iter()
                .filter_map(|kind| self.rope_params(family, kind))
                .map(|p| (p, "rope_parameters"))
                .chain(self.rope_scaling.iter().map(|s| (s, "rope_scaling")))
                .collect(),
            _ => self
                .rope_params(family, "full_attention")
                .map(|p| (p, self.rope_field(family)))
                .into_iter()
                .collect(),
        };
        let inner = settings
            .into_iter()
            .filter_map(|(p, field)| Some((p.get("partial_rotary_factor")?.as_f64(), field)));
        let top = self
            .partial_rotary_factor
            .map(|f| (Some(f), "partial_rotary_factor"));
        for (factor, field) in top.into_iter().chain(inner) {
            if factor != Some(1.0) {
                return Err(at.refuse(
                    field,
                    format!(
                        "partial_rotary_factor {}: rotary positions on part of each head are \
                         not implemented",
                        factor.map_or("(not a number)".into(), |f| f.to_string())
                    ),
                ));
            }
        }
        Ok(())
    }

    fn theta(&self, family: Family) -> f64 {
        let default = match family {
            Family::Gemma3 => 1_000_000.0,
            // SmolLM3Config's `default_theta`.
            Family::SmolLm3 => 2_000_000.0,
            _ => 10000.0,
        };
        self.rope_params(family, "full_attention")
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .or(self.rope_theta)
            .unwrap_or(default)
    }

    /// Gemma 3's sliding layers' rotary base.
    fn local_theta(&self) -> f64 {
        self.rope_params(Family::Gemma3, "sliding_attention")
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .or(self.rope_local_base_freq)
            .unwrap_or(10000.0)
    }

    /// The rotary scaling of the model's positions: `rope_scaling` where it says anything, else
    /// what transformers 5 writes in `rope_parameters` (Gemma 3: `rope_scaling` over its full
    /// layers'; its sliding layers take none).
    fn rope_scaling(&self, path: &Path, family: Family, ctx: usize) -> Result<Option<RopeScaling>> {
        let at = At(path);
        let field = self.rope_field(family);
        if family == Family::Gemma3 {
            if let Some(v) = self.rope_params(family, "sliding_attention") {
                if parse_scaling(v, &at, "rope_parameters", ctx)?.is_some() {
                    return Err(at.refuse(
                        "rope_parameters",
                        "scaled rotary positions in the sliding layers are not implemented",
                    ));
                }
            }
        }
        // Gemma 3 lays `rope_scaling`'s keys over its full layers' settings (a `{"factor": 8}`
        // keeps their `rope_type`, a `{}` all of them), as its config class updates the one
        // with the other.
        let laid;
        let full = match (family, self.rope_scaling.as_ref()) {
            (Family::Gemma3, Some(serde_json::Value::Object(over))) => {
                let mut params = match self.rope_params(family, "full_attention") {
                    Some(serde_json::Value::Object(o)) => o.clone(),
                    _ => serde_json::Map::new(),
                };
                params.extend(over.iter().map(|(k, v)| (k.clone(), v.clone())));
                laid = serde_json::Value::Object(params);
                Some(&laid)
            }
            (Family::Gemma3, Some(v)) if !v.is_null() => Some(v),
            _ => self.rope_params(family, "full_attention"),
        };
        match full {
            Some(v) => parse_scaling(v, &at, field, ctx),
            None => Ok(None),
        }
    }

    /// The field the rotary settings of [`Self::rope_params`] come from.
    fn rope_field(&self, family: Family) -> &'static str {
        let scaling = self.rope_scaling.as_ref();
        let read = match family {
            Family::Gemma3 => scaling.is_some(),
            _ => scaling.is_some_and(says_anything),
        };
        match read {
            true => "rope_scaling",
            false => "rope_parameters",
        }
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

/// Whether a JSON value is one Python counts as true (not null, not an empty object), as
/// transformers asks of `rope_scaling` before it takes it over `rope_parameters`.
fn says_anything(v: &serde_json::Value) -> bool {
    !v.is_null() && v.as_object().is_none_or(|o| !o.is_empty())
}

/// One rotary scaling object of `config.json` (`rope_type` or the older `type`; none for
/// `default`, as where it names neither), refused by `field` where temper does not implement
/// it. Llama 3's scaling counts from the context (`ctx`) where it names no
/// `original_max_position_embeddings`, as transformers fills it in.
fn parse_scaling(
    v: &serde_json::Value,
    at: &At,
    field: &str,
    ctx: usize,
) -> Result<Option<RopeScaling>> {
    if v.is_null() {
        return Ok(None);
    }
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64> {
        v.get(k)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| at.refuse(field, format!("{kind} scaling needs {k}")))
    };
    Ok(match kind {
        "default" => None,
        "llama3" => Some(RopeScaling::Llama3(Llama3Scaling {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: match v.get("original_max_position_embeddings") {
                None => ctx,
                Some(_) => num("original_max_position_embeddings")? as usize,
            },
        })),
        "linear" => Some(RopeScaling::Linear(LinearScaling {
            factor: num("factor")?,
        })),
        other => {
            return Err(at.refuse(
                field,
                format!("rope_type `{other}` is not implemented (llama3 and linear are)"),
            ))
        }
    })
}

/// `scaling` as `config.json` writes it.
fn scaling_json(scaling: &RopeScaling) -> serde_json::Value {
    match scaling {
        RopeScaling::Llama3(s) => serde_json::json!({
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }),
        RopeScaling::Linear(s) => serde_json::json!({"rope_type": "linear", "factor": s.factor}),
    }
}

/// A Hugging Face model's weights in one file, as `save_pretrained` names it.
pub const WEIGHTS: &str = "model.safetensors";
/// The index of a model's weights in shards, as `save_pretrained` names it.
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// Whether `dir` is a Hugging Face model directory (and not a temper checkpoint).
pub fn is_model_dir(dir: &Path) -> bool {
    dir.join("config.json").is_file()
        && !dir.join("meta.json").exists()
        && (dir.join(WEIGHTS).is_file() || dir.join(WEIGHTS_INDEX).is_file())
}

/// The safetensors files of a model directory: the single `model.safetensors`, or the shards
/// its `model.safetensors.index.json` names, with that index's path and `weight_map`.
struct Weights {
    files: Vec<PathBuf>,
    index: Option<(PathBuf, serde_json::Map<String, serde_json::Value>)>,
}

impl Weights {
    fn of(dir: &Path) -> Result<Self> {
        let single = dir.join(WEIGHTS);
        if single.is_file() {
            return Ok(Self {
                files: vec![single],
                index: None,
            });
        }
        let index = dir.join(WEIGHTS_INDEX);
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("{}: cannot read", index.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| json_error(&index, &text, &e))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: field \"weight_map\" is missing", index.display()))?
            .clone();
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        Ok(Self {
            files,
            index: Some((index, map)),
        })
    }

    /// Tensor `name` (as the file names it) is in none of the files: the error names the file
    /// it should be in (the single file, the shard the index places it in) or the index that
    /// does not list it.
    fn missing(&self, name: &str, family: Family) -> anyhow::Error {
        let model = format!("config.json's {} model has one", family.name());
        let Some((index, map)) = &self.index else {
            return anyhow::anyhow!("{}: no tensor {name} ({model})", self.files[0].display());
        };
        match map.get(name).and_then(|f| f.as_str()) {
            Some(shard) => anyhow::anyhow!(
                "{}: no tensor {name}, which {} places there ({model})",
                index
                    .parent()
                    .unwrap_or(Path::new(""))
                    .join(shard)
                    .display(),
                index.file_name().unwrap_or_default().to_string_lossy()
            ),
            None => anyhow::anyhow!(
                "{}: field \"weight_map\" names no tensor {name} ({model})",
                index.display()
            ),
        }
    }
}

/// A Hugging Face model read into temper's names: its family, shape and tensors (f32).
pub struct Imported {
    pub family: Family,
    pub head: Head,
    pub config: ModelConfig,
    pub tensors: HashMap<String, Tensor>,
}

/// The padding id a classifier of `family` reads its score before, from its config's
/// `pad_token_id` (absent: outer none; null: inner none): where it names none, the default
/// of the family's config class (Gemma's 0, SmolLM3's 128004; none for the others). An id
/// that is negative (older configs write -1) or past u32 is none.
fn classifier_pad(family: Family, given: Option<Option<i64>>) -> Option<u32> {
    let default = match family {
        Family::Gemma2 | Family::Gemma3 => Some(0),
        Family::SmolLm3 => Some(128004),
        _ => None,
    };
    given.unwrap_or(default).and_then(|p| u32::try_from(p).ok())
}

/// Reads a model directory: its config, then every tensor (memory-mapped, one at a time),
/// renamed to temper's names. A tensor of no known name is an error naming it and its file.
/// The model of the Hugging Face model directory `dir`, its family and head, from its
/// config.json alone.
pub fn model_config(dir: &Path) -> Result<(Family, Head, ModelConfig)> {
    let cfg_path = dir.join("config.json");
    let hf = HfConfig::read(&cfg_path)?;
    let head = hf.head(&cfg_path)?;
    let (family, mut config) = hf.to_model(&cfg_path)?;
    if head == Head::Score {
        // A classifier has no language-model head: its scorer reads the hidden states only.
        config.tie_word_embeddings = true;
        config.score_pad = classifier_pad(family, hf.pad_token_id);
    }
    Ok((family, head, config))
}

pub fn import(dir: &Path, device: &Device) -> Result<Imported> {
    let (family, head, config) = model_config(dir)?;
    let hf = HfConfig::read(&dir.join("config.json"))?;
    // Checked here, under the names and shapes of the files, before anything is converted.
    let expected = hf_shapes(family, head, &config)?;
    let want: HashMap<&str, &[usize]> = expected
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    let mut seen = std::collections::HashSet::new();
    // A name the files spell with GPT-2's or Gemma 3's prefix, to name a missing one so.
    let mut like = None;
    let mut tensors = HashMap::new();
    let mut vision = 0;
    let weights = Weights::of(dir)?;
    // Every file's header is read, and every name and shape checked, before any tensor is
    // converted: a 7B model missing one tensor fails in a moment, not after minutes of loading.
    let mut maps = Vec::with_capacity(weights.files.len());
    for file in &weights.files {
        // SAFETY: the file is memory-mapped read-only and each tensor copied out of it at
        // once; temper never writes a file it has mapped.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(file) }
            .with_context(|| format!("{}: cannot map weights", file.display()))?;
        for (name, view) in st.tensors() {
            if family == Family::Gemma3 && is_gemma3_vision(&name) {
                vision += 1;
                continue;
            }
            let canon = canonical_name(family, &name);
            if let Some(&shape) = want.get(canon) {
                if view.shape() != shape {
                    bail!(
                        "{}: tensor {name} has shape {:?}, config.json's {} model wants {shape:?}",
                        file.display(),
                        view.shape(),
                        family.name()
                    );
                }
                seen.insert(canon.to_string());
            }
            if canon != name {
                like.get_or_insert_with(|| name.clone());
            }
        }
        maps.push((file, st));
    }
    if let Some((name, _)) = expected.iter().find(|(n, _)| !seen.contains(n)) {
        let named = name_in_file(family, name, like.as_deref().unwrap_or(""));
        return Err(weights.missing(&named, family));
    }
    for (file, st) in &maps {
        for (name, _) in st.tensors() {
            if family == Family::Gemma3 && is_gemma3_vision(&name) {
                continue;
            }
            let t = st
                .load(&name, device)
                .with_context(|| format!("{}: cannot read tensor {name}", file.display()))?
                .to_dtype(DType::F32)?;
            let parts = match head {
                Head::Score if name.starts_with("score.") => {
                    score_to_temper(&name, &t, config.hidden_size).map(|p| vec![p])
                }
                _ => to_temper(family, &name, &t, &config),
            };
            for (ours, part) in
                parts.with_context(|| format!("{}: tensor {name}", file.display()))?
            {
                tensors.insert(ours, part);
            }
        }
    }
    if vision > 0 {
        errln!(
            "{}: {vision} tensors of Gemma 3's vision tower and projector left out: temper \
             trains, and exports, the language model alone",
            dir.display()
        );
    }
    if head == Head::Score {
        fill_score_bias(&mut tensors, hf.temper_score_bias.unwrap_or(0.0))?;
    }
    Ok(Imported {
        family,
        head,
        config,
        tensors,
    })
}

/// A one-label classifier's `score.weight` (`[1, H]`) or `score.bias` (`[1]`) as temper's
/// reward head holds it (`[H]`, `[1]`).
pub fn score_to_temper(name: &str, t: &Tensor, hidden: usize) -> Result<(String, Tensor)> {
    match name {
        "score.weight" if t.dims() == [1, hidden] => Ok((name.into(), t.reshape(hidden)?)),
        "score.bias" if t.dims() == [1] => Ok((name.into(), t.clone())),
        "score.weight" | "score.bias" => bail!(
            "shape {:?}: a one-label score head over {hidden} hidden units wants {}",
            t.dims(),
            if name == "score.weight" {
                format!("[1, {hidden}]")
            } else {
                "[1]".into()
            }
        ),
        _ => bail!("not a weight of a reward model's score head"),
    }
}

/// temper's reward head has a bias, a classifier's score layer none: where `tensors` (with
/// their `score.weight`) hold no `score.bias`, `bias` (temper's own, kept beside the config)
/// or 0.
pub fn fill_score_bias(tensors: &mut HashMap<String, Tensor>, bias: f32) -> Result<()> {
    if tensors.contains_key("score.bias") {
        return Ok(());
    }
    let device = tensors
        .get("score.weight")
        .context("a reward head without its score.weight")?
        .device()
        .clone();
    tensors.insert("score.bias".into(), Tensor::new(&[bias], &device)?);
    Ok(())
}

/// The `config.json` field that carries temper's reward bias, which a Hugging Face
/// classifier's score layer has no place for: transformers keeps it as an attribute and
/// leaves it out of its scores; temper reads it back into `score.bias`.
pub const SCORE_BIAS_FIELD: &str = "temper_score_bias";

/// A reward model's head as a one-label classifier's `score.weight` (`[1, H]`) and the bias
/// that has no place there (Adam moves it off zero even where its gradient is zero but for
/// rounding; `center_rewards_coefficient` trains it).
pub fn score_to_hf(w: &Tensor, b: &Tensor) -> Result<(Tensor, f32)> {
    let bias = b.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok((
        w.reshape((1, w.elem_count()))?,
        bias.first().copied().unwrap_or(0.0),
    ))
}

/// Every tensor of a model of `cfg` under temper's names, with its shape, in the model's
/// order: what `Transformer::new` creates (a test holds the two together).
fn temper_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
    let (qw, kv) = (cfg.attn_width(), cfg.num_key_value_heads * hd);
    let mut out = vec![("model.embed.weight".to_string(), vec![cfg.vocab_size, h])];
    if cfg.position == PositionKind::Learned {
        out.push((
            "model.pos_embed.weight".into(),
            vec![cfg.max_position_embeddings, h],
        ));
    }
    let norm = |out: &mut Vec<(String, Vec<usize>)>, pre: &str| {
        out.push((format!("{pre}.weight"), vec![h]));
        if cfg.norm == NormKind::LayerNorm {
            out.push((format!("{pre}.bias"), vec![h]));
        }
    };
    let linear = |out: &mut Vec<(String, Vec<usize>)>, pre: &str, inp, width, bias| {
        out.push((format!("{pre}.weight"), vec![width, inp]));
        if bias {
            out.push((format!("{pre}.bias"), vec![width]));
        }
    };
    let qkv_bias = cfg.bias || cfg.qkv_bias;
    for l in 0..cfg.num_hidden_layers {
        let pre = format!("model.layers.{l}");
        norm(&mut out, &format!("{pre}.attn_norm"));
        linear(&mut out, &format!("{pre}.attn.q"), h, qw, qkv_bias);
        linear(&mut out, &format!("{pre}.attn.k"), h, kv, qkv_bias);
        linear(&mut out, &format!("{pre}.attn.v"), h, kv, qkv_bias);
        linear(&mut out, &format!("{pre}.attn.o"), qw, h, cfg.bias);
        if cfg.qk_norm {
            out.push((format!("{pre}.attn.q_norm.weight"), vec![hd]));
            out.push((format!("{pre}.attn.k_norm.weight"), vec![hd]));
        }
        if cfg.post_norms {
            norm(&mut out, &format!("{pre}.attn_post_norm"));
        }
        norm(&mut out, &format!("{pre}.mlp_norm"));
        if cfg.mlp != MlpKind::Gelu {
            linear(&mut out, &format!("{pre}.mlp.gate"), h, i, cfg.bias);
        }
        linear(&mut out, &format!("{pre}.mlp.up"), h, i, cfg.bias);
        linear(&mut out, &format!("{pre}.mlp.down"), i, h, cfg.bias);
        if cfg.post_norms {
            norm(&mut out, &format!("{pre}.mlp_post_norm"));
        }
    }
    norm(&mut out, "model.final_norm");
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
    }
    out
}

/// The tensors a Hugging Face file of `family` holds for a model of `cfg` with `head` on top,
/// with their shapes there, under the names of [`canonical_name`]: GPT-2's Conv1D weights
/// `[in, out]` and q, k, v fused in `c_attn`; a classifier's `score.weight` `[1, H]` (its
/// bias, which it lacks, temper fills in).
fn hf_shapes(family: Family, head: Head, cfg: &ModelConfig) -> Result<Vec<(String, Vec<usize>)>> {
    let ours = temper_shapes(cfg);
    let width = |name: &str| {
        ours.iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, s)| s[0])
    };
    let mut out = Vec::with_capacity(ours.len() + 1);
    for (name, shape) in &ours {
        if family != Family::Gpt2 {
            out.push((temper_to_llama(family, name)?, shape.clone()));
            continue;
        }
        let Some((hf, conv)) = gpt2_place(name)? else {
            continue;
        };
        let mut shape = shape.clone();
        if name.contains(".attn.q.") {
            shape[0] = ["q", "k", "v"]
                .iter()
                .map(|w| width(&name.replace(".attn.q.", &format!(".attn.{w}."))))
                .sum();
        }
        if conv {
            shape.reverse();
        }
        out.push((hf, shape));
    }
    if head == Head::Score {
        out.push(("score.weight".into(), vec![1, cfg.hidden_size]));
    }
    Ok(out)
}

/// A tensor's name in a file of `family` as [`hf_shapes`] names it: GPT-2's without the
/// `transformer.` that `save_pretrained` puts before it, Gemma 3's as its language model's.
fn canonical_name(family: Family, name: &str) -> &str {
    match family {
        Family::Gpt2 => name.strip_prefix("transformer.").unwrap_or(name),
        Family::Gemma3 => gemma3_language_name(name),
        _ => name,
    }
}

/// Name `canon` of [`hf_shapes`] as spelled by files whose tensors include one named `like`:
/// with GPT-2's `transformer.`, or the prefixes of Gemma 3's image-and-text models, where
/// `like` has them. A classifier's head has none.
fn name_in_file(family: Family, canon: &str, like: &str) -> String {
    if canon.starts_with("score.") {
        return canon.into();
    }
    match family {
        Family::Gpt2 if like.starts_with("transformer.") => format!("transformer.{canon}"),
        Family::Gemma3 if like.starts_with("language_model.") => format!("language_model.{canon}"),
        Family::Gemma3 if like.starts_with("model.language_model.") => {
            match canon.strip_prefix("model.") {
                Some(rest) => format!("model.language_model.{rest}"),
                None => canon.into(),
            }
        }
        _ => canon.into(),
    }
}

/// GPT-2 buffers saved by older checkpoints: the causal mask, not weights.
fn is_buffer(family: Family, name: &str) -> bool {
    match family {
        Family::Gpt2 => name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias"),
        _ => name.ends_with(".rotary_emb.inv_freq"),
    }
}

/// One HF tensor as temper's tensor(s): renamed, and for GPT-2 transposed (Conv1D) and
/// split (`c_attn` into q, k, v). Buffers and a tied head's copy map to nothing.
fn to_temper(
    family: Family,
    name: &str,
    t: &Tensor,
    cfg: &ModelConfig,
) -> Result<Vec<(String, Tensor)>> {
    let name = match family {
        Family::Gemma3 => gemma3_language_name(name),
        _ => name,
    };
    if is_buffer(family, name) || (name == "lm_head.weight" && cfg.tie_word_embeddings) {
        return Ok(vec![]);
    }
    match family {
        Family::Gpt2 => gpt2_to_temper(name, t, cfg),
        _ => Ok(vec![(llama_to_temper(family, name)?, t.clone())]),
    }
}

/// Where Gemma 3's image-and-text models keep their language model: `language_model.` before
/// its own names as transformers 4.5x and 5 save it, `model.language_model.` in place of
/// `model.` as transformers 5 holds it in memory.
fn gemma3_language_name(name: &str) -> &str {
    if let Some(rest) = name.strip_prefix("language_model.") {
        return rest;
    }
    match name.strip_prefix("model.language_model.") {
        // `model.` stays: the rest of the name starts where the prefix's last dot was.
        Some(_) => &name["model.language_".len()..],
        None => name,
    }
}

/// Whether `name` is a tensor of Gemma 3's vision tower or its projection into the language
/// model, which temper leaves out.
fn is_gemma3_vision(name: &str) -> bool {
    let name = name.strip_prefix("model.").unwrap_or(name);
    name.starts_with("vision_tower.") || name.starts_with("multi_modal_projector.")
}

const LLAMA_LAYER: [(&str, &str); 11] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "mlp_norm.weight"),
    ("self_attn.q_proj.weight", "attn.q.weight"),
    ("self_attn.k_proj.weight", "attn.k.weight"),
    ("self_attn.v_proj.weight", "attn.v.weight"),
    ("self_attn.o_proj.weight", "attn.o.weight"),
    ("self_attn.q_proj.bias", "attn.q.bias"),
    ("self_attn.k_proj.bias", "attn.k.bias"),
    ("self_attn.v_proj.bias", "attn.v.bias"),
    ("mlp.gate_proj.weight", "mlp.gate.weight"),
    ("mlp.up_proj.weight", "mlp.up.weight"),
];
const LLAMA_LAYER_MORE: [(&str, &str); 3] = [
    ("mlp.down_proj.weight", "mlp.down.weight"),
    ("self_attn.q_norm.weight", "attn.q_norm.weight"),
    ("self_attn.k_norm.weight", "attn.k_norm.weight"),
];
const LLAMA_TOP: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "model.embed.weight"),
    ("model.norm.weight", "model.final_norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
];

/// Gemma's four norms a layer: Llama's `post_attention_layernorm` is the MLP's input norm,
/// Gemma's the attention output's.
const GEMMA_NORMS: [(&str, &str); 4] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "attn_post_norm.weight"),
    ("pre_feedforward_layernorm.weight", "mlp_norm.weight"),
    ("post_feedforward_layernorm.weight", "mlp_post_norm.weight"),
];

/// The per-layer name pairs of a llama-like `family`, its own first.
fn layer_names(family: Family) -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    let own: &[(&str, &str)] = match family {
        Family::Gemma2 | Family::Gemma3 => &GEMMA_NORMS,
        _ => &[],
    };
    own.iter().chain(&LLAMA_LAYER).chain(&LLAMA_LAYER_MORE)
}

fn layer_of<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let rest = name.strip_prefix(prefix)?;
    let (i, tail) = rest.split_once('.')?;
    Some((i.parse().ok()?, tail))
}

fn llama_to_temper(family: Family, name: &str) -> Result<String> {
    if let Some((_, ours)) = LLAMA_TOP.iter().find(|(hf, _)| *hf == name) {
        return Ok(ours.to_string());
    }
    if let Some((i, tail)) = layer_of(name, "model.layers.") {
        if let Some((_, ours)) = layer_names(family).find(|(hf, _)| *hf == tail) {
            return Ok(format!("model.layers.{i}.{ours}"));
        }
    }
    bail!("not a weight of this model family (an unexpected extra tensor)")
}

/// The Hugging Face name of temper tensor `name` in a llama-like `family`.
pub fn hf_name(family: Family, name: &str) -> Result<String> {
    match family {
        Family::Gpt2 => bail!("GPT-2 fuses q, k and v: its tensors have no one-to-one names"),
        _ => temper_to_llama(family, name),
    }
}

fn temper_to_llama(family: Family, name: &str) -> Result<String> {
    if let Some((hf, _)) = LLAMA_TOP.iter().find(|(_, ours)| *ours == name) {
        return Ok(hf.to_string());
    }
    if let Some((i, tail)) = layer_of(name, "model.layers.") {
        if let Some((hf, _)) = layer_names(family).find(|(_, ours)| *ours == tail) {
            return Ok(format!("model.layers.{i}.{hf}"));
        }
    }
    bail!("temper tensor {name} has no Hugging Face name")
}

/// GPT-2's per-layer tensors that are renamed without reshaping.
const GPT2_LAYER: [(&str, &str); 4] = [
    ("ln_1.weight", "attn_norm.weight"),
    ("ln_1.bias", "attn_norm.bias"),
    ("ln_2.weight", "mlp_norm.weight"),
    ("ln_2.bias", "mlp_norm.bias"),
];
/// The projections GPT-2's `c_attn` fuses, in the order of its output rows.
const QKV: [&str; 3] = ["q", "k", "v"];

/// q's, k's and v's rows (`h` each) of a tensor laid out as `c_attn`'s output.
fn qkv_rows(t: &Tensor, h: usize) -> Result<Vec<Tensor>> {
    (0..QKV.len())
        .map(|j| Ok(t.narrow(0, j * h, h)?.contiguous()?))
        .collect()
}

/// GPT-2's Conv1D layers (weights stored `[in, out]`) and temper's linear for each.
const GPT2_CONV: [(&str, &str); 3] = [
    ("attn.c_proj", "attn.o"),
    ("mlp.c_fc", "mlp.up"),
    ("mlp.c_proj", "mlp.down"),
];
/// GPT-2's name of temper's projection `module` (`attn.o` -> `attn.c_proj`), for the three
/// that are GPT-2 modules of their own (q, k and v share `attn.c_attn`).
pub fn gpt2_conv_of(module: &str) -> Option<&'static str> {
    GPT2_CONV
        .iter()
        .find(|(_, ours)| *ours == module)
        .map(|(hf, _)| *hf)
}

const GPT2_TOP: [(&str, &str); 4] = [
    ("wte.weight", "model.embed.weight"),
    ("wpe.weight", "model.pos_embed.weight"),
    ("ln_f.weight", "model.final_norm.weight"),
    ("ln_f.bias", "model.final_norm.bias"),
];

fn gpt2_to_temper(name: &str, t: &Tensor, cfg: &ModelConfig) -> Result<Vec<(String, Tensor)>> {
    // `save_pretrained` of GPT2LMHeadModel prefixes `transformer.`; the original hub files
    // do not.
    let name = name.strip_prefix("transformer.").unwrap_or(name);
    if let Some((_, ours)) = GPT2_TOP.iter().find(|(hf, _)| *hf == name) {
        return Ok(vec![(ours.to_string(), t.clone())]);
    }
    let Some((i, tail)) = layer_of(name, "h.") else {
        bail!("not a weight of this model family (an unexpected extra tensor)");
    };
    let pre = format!("model.layers.{i}");
    if let Some((_, ours)) = GPT2_LAYER.iter().find(|(hf, _)| *hf == tail) {
        return Ok(vec![(format!("{pre}.{ours}"), t.clone())]);
    }
    let (module, param) = tail
        .rsplit_once('.')
        .context("not a weight of this model family")?;
    let is_weight = param == "weight";
    // Conv1D keeps `[in, out]`; temper's linear is `[out, in]`.
    let t = if is_weight {
        t.t()?.contiguous()?
    } else {
        t.clone()
    };
    if module == "attn.c_attn" {
        let parts = qkv_rows(&t, cfg.hidden_size)?;
        let named = QKV.iter().zip(parts);
        return Ok(named
            .map(|(which, part)| (format!("{pre}.attn.{which}.{param}"), part))
            .collect());
    }
    match GPT2_CONV.iter().find(|(hf, _)| *hf == module) {
        Some((_, ours)) => Ok(vec![(format!("{pre}.{ours}.{param}"), t)]),
        None => bail!("not a weight of this model family (an unexpected extra tensor)"),
    }
}

/// Temper's tensors under Hugging Face names (GPT-2: transposed back and q/k/v fused).
pub fn export_tensors(
    family: Family,
    tensors: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    match family {
        Family::Gpt2 => {
            for (name, t) in tensors {
                if let Some((hf, t)) = temper_to_gpt2(name, t, tensors)? {
                    out.insert(hf, t);
                }
            }
        }
        _ => {
            for (name, t) in tensors {
                out.insert(temper_to_llama(family, name)?, t.clone());
            }
        }
    }
    Ok(out)
}

fn temper_to_gpt2(
    name: &str,
    t: &Tensor,
    all: &HashMap<String, Tensor>,
) -> Result<Option<(String, Tensor)>> {
    let Some((hf, conv)) = gpt2_place(name)? else {
        return Ok(None);
    };
    let t = match name.contains(".attn.q.") {
        true => {
            let part = |w: &str| {
                let n = name.replace(".attn.q.", &format!(".attn.{w}."));
                all.get(&n).with_context(|| format!("{n} missing"))
            };
            Tensor::cat(&[t, part("k")?, part("v")?], 0)?
        }
        false => t.clone(),
    };
    let t = match conv {
        true => t.t()?.contiguous()?,
        false => t,
    };
    Ok(Some((format!("transformer.{hf}"), t)))
}

/// Where temper's GPT-2 tensor `name` goes in a Hugging Face file (less `transformer.`): its
/// name there, and whether it is a Conv1D weight, stored `[in, out]`. None for k and v,
/// which join q in `c_attn`.
fn gpt2_place(name: &str) -> Result<Option<(String, bool)>> {
    if let Some((hf, _)) = GPT2_TOP.iter().find(|(_, ours)| *ours == name) {
        return Ok(Some((hf.to_string(), false)));
    }
    let (i, tail) = layer_of(name, "model.layers.")
        .with_context(|| format!("temper tensor {name} has no GPT-2 name"))?;
    let pre = format!("h.{i}");
    if let Some((hf, _)) = GPT2_LAYER.iter().find(|(_, ours)| *ours == tail) {
        return Ok(Some((format!("{pre}.{hf}"), false)));
    }
    let (module, param) = tail
        .rsplit_once('.')
        .with_context(|| format!("temper tensor {name} has no GPT-2 name"))?;
    let conv = param == "weight";
    match module {
        "attn.k" | "attn.v" => Ok(None),
        "attn.q" => Ok(Some((format!("{pre}.attn.c_attn.{param}"), conv))),
        _ => match GPT2_CONV.iter().find(|(_, ours)| *ours == module) {
            Some((hf, _)) => Ok(Some((format!("{pre}.{hf}.{param}"), conv))),
            None => bail!("temper tensor {name} has no GPT-2 name"),
        },
    }
}

/// `config.json` for `cfg` as `family` writes it with `head` on top, with the tokenizer's
/// stop, BOS and padding ids. The padding id is written only where it is needed: for SmolLM3,
/// whose config otherwise defaults it to an id of its own vocabulary, which a smaller one does
/// not hold, and for a classifier, which transformers scores at each sequence's last token
/// that is not it (an imported one keeps its own, `ModelConfig::score_pad`).
pub fn config_json(
    family: Family,
    head: Head,
    cfg: &ModelConfig,
    eos: &[u32],
    bos: Option<u32>,
    pad: u32,
) -> serde_json::Value {
    use serde_json::json;
    let eos_v = match eos {
        [one] => json!(one),
        many => json!(many),
    };
    // Elsewhere a padding id would freeze that row of the embedding in PyTorch's training
    // (nn.Embedding's padding_idx); none where the tokenizer pads with a stop token, whose
    // row must train and which ends the sequences temper scores (transformers would then read
    // a classifier one token earlier than temper does).
    let pad_v = match eos.contains(&pad) {
        true => serde_json::Value::Null,
        false => json!(pad),
    };
    let arch = head.architecture(family);
    let mut v = match family {
        Family::Gpt2 => json!({
            "architectures": [arch],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.hidden_size,
            "n_layer": cfg.num_hidden_layers,
            "n_head": cfg.num_attention_heads,
            "n_inner": cfg.intermediate_size,
            "n_positions": cfg.max_position_embeddings,
            "layer_norm_epsilon": cfg.rms_norm_eps,
            "activation_function": "gelu_new",
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "tie_word_embeddings": true,
            "bos_token_id": bos,
            "eos_token_id": eos_v,
            "torch_dtype": "float32",
        }),
        _ => {
            let ty = family.name();
            let scaling = cfg.rope_scaling.as_ref().map(scaling_json);
            let mut v = json!({
                "architectures": [arch],
                "model_type": ty,
                "vocab_size": cfg.vocab_size,
                "hidden_size": cfg.hidden_size,
                "intermediate_size": cfg.intermediate_size,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_attention_heads": cfg.num_attention_heads,
                "num_key_value_heads": cfg.num_key_value_heads,
                "head_dim": cfg.head_dim(),
                "max_position_embeddings": cfg.max_position_embeddings,
                "rms_norm_eps": cfg.rms_norm_eps,
                "rope_theta": cfg.rope_theta,
                "rope_scaling": scaling,
                "tie_word_embeddings": cfg.tie_word_embeddings,
                "hidden_act": "silu",
                "attention_bias": false,
                "bos_token_id": bos,
                "eos_token_id": eos_v,
                "torch_dtype": "float32",
            });
            let types: Vec<&str> = (0..cfg.num_hidden_layers)
                .map(|l| match cfg.layer_window(l) {
                    Some(_) => "sliding_attention",
                    None => "full_attention",
                })
                .collect();
            if matches!(family, Family::Qwen2 | Family::Qwen3 | Family::SmolLm3) {
                v["use_sliding_window"] = json!(cfg.sliding_window.is_some());
                v["sliding_window"] = json!(cfg.sliding_window);
                v["layer_types"] = json!(types);
                if family != Family::SmolLm3 {
                    // Older transformers read only this: the layers below it see everything.
                    let leading = (0..cfg.num_hidden_layers)
                        .take_while(|&l| cfg.layer_window(l).is_none())
                        .count();
                    v["max_window_layers"] = json!(leading);
                }
            }
            if family == Family::SmolLm3 {
                let flags: Vec<u8> = (0..cfg.num_hidden_layers)
                    .map(|l| u8::from(!cfg.nope_layers.contains(&l)))
                    .collect();
                v["no_rope_layers"] = json!(flags);
                v["mlp_bias"] = json!(false);
                v["pad_token_id"] = pad_v.clone();
            }
            if family == Family::Mistral {
                // Every layer of a Mistral slides (`HfFamily::of` exports no other).
                v["sliding_window"] = json!(cfg.sliding_window);
            }
            if matches!(family, Family::Gemma2 | Family::Gemma3) {
                gemma_fields(family, &mut v, cfg, pad_v.clone());
            }
            v
        }
    };
    if head == Head::Score {
        v["id2label"] = json!({"0": "LABEL_0"});
        v["label2id"] = json!({"LABEL_0": 0});
        v["pad_token_id"] = cfg.score_pad.map_or(pad_v, |p| json!(p));
    }
    v
}

/// Gemma's own fields over the llama-like ones of `v`. Gemma 3's layers' kinds come from its
/// second rotary base (`HfFamily::of` exports no model whose window says otherwise), Gemma
/// 2's from its window; Gemma 3's bases and its full layers' scaling go both where
/// transformers 5 reads them and where earlier versions did (`rope_theta`,
/// `rope_local_base_freq`, `rope_scaling`). Their configs default the padding id to 0, so
/// `pad` is always written.
fn gemma_fields(
    family: Family,
    v: &mut serde_json::Value,
    cfg: &ModelConfig,
    pad: serde_json::Value,
) {
    use serde_json::json;
    let gemma3 = family == Family::Gemma3;
    let layers = cfg.num_hidden_layers;
    let slides = |l: usize| match gemma3 {
        true => cfg.rotates_locally(l),
        false => cfg.layer_window(l).is_some(),
    };
    let types: Vec<&str> = (0..layers)
        .map(|l| match slides(l) {
            true => "sliding_attention",
            false => "full_attention",
        })
        .collect();
    let obj = v.as_object_mut().expect("a JSON object");
    obj.remove("hidden_act");
    for (k, x) in [
        ("hidden_activation", json!("gelu_pytorch_tanh")),
        // transformers wants both, as integers, even where no layer slides.
        (
            "query_pre_attn_scalar",
            json!(cfg.query_pre_attn_scalar.unwrap_or(cfg.head_dim())),
        ),
        (
            "sliding_window",
            json!(cfg.sliding_window.unwrap_or(cfg.max_position_embeddings)),
        ),
        ("layer_types", json!(types)),
        (
            "final_logit_softcapping",
            json!(cfg.final_logit_softcapping),
        ),
        ("attn_logit_softcapping", json!(cfg.attn_logit_softcapping)),
        ("pad_token_id", pad),
    ] {
        obj.insert(k.into(), x);
    }
    if !gemma3 {
        return;
    }
    let local_theta = cfg.rope_local.as_ref().map_or(cfg.rope_theta, |r| r.theta);
    let mut full = json!({"rope_type": "default"});
    if let Some(s) = &cfg.rope_scaling {
        full = scaling_json(s);
    }
    full["rope_theta"] = json!(cfg.rope_theta);
    obj.insert("rope_local_base_freq".into(), json!(local_theta));
    obj.insert(
        "rope_parameters".into(),
        json!({
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
        }),
    );
    obj.insert("use_bidirectional_attention".into(), json!(false));
    // For transformers from before `layer_types`, which read only this (6 where absent):
    // written where the layers keep to one.
    let every = (0..layers)
        .find(|&l| !slides(l))
        .map_or(layers + 1, |l| l + 1);
    if (0..layers).all(|l| slides(l) != (l + 1).is_multiple_of(every)) {
        obj.insert("sliding_window_pattern".into(), json!(every));
    }
}

/// A PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`):
/// its base model's path, and its factors under temper's names (`model.layers.0.attn.q.lora_a`
/// `[r, in]`, `..lora_b` `[out, r]`), each B scaled by its module's `lora_alpha / r` (the
/// config's, or `alpha_pattern`'s and `rank_pattern`'s where they name the module). An adapter of TRL's
/// RewardTrainer with a peft_config makes its base a one-label classifier, a reward model,
/// whose new score head it saves whole (`modules_to_save`): task type `SEQ_CLS`, or none (the
/// `LoraConfig(modules_to_save=["score"])` of TRL's documentation) beside a score head.
pub struct PeftAdapter {
    pub base: PathBuf,
    pub tensors: HashMap<String, Tensor>,
    pub head: Head,
    /// A reward adapter's score head, under its Hugging Face names (`score.weight`
    /// `[1, H]`, perhaps `score.bias`).
    pub score: HashMap<String, Tensor>,
}

/// Whether `dir` is a PEFT adapter directory.
pub fn is_peft_dir(dir: &Path) -> bool {
    dir.join("adapter_config.json").is_file() && dir.join("adapter_model.safetensors").is_file()
}

/// Whether `dir` is a Hugging Face model or a PEFT adapter on one: a model trained elsewhere,
/// never on the built-in task.
pub fn is_pretrained_dir(dir: &Path) -> bool {
    is_model_dir(dir) || is_peft_dir(dir)
}

/// The parsed `adapter_config.json` of the adapter directory `dir`, and its path.
fn peft_config(dir: &Path) -> Result<(serde_json::Value, PathBuf)> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("{}: cannot read", cfg_path.display()))?;
    let v = serde_json::from_str(&text).map_err(|e| json_error(&cfg_path, &text, &e))?;
    Ok((v, cfg_path))
}

/// The base model directory an adapter names: `base_model_name_or_path`, relative to the
/// current directory or to the adapter's.
pub fn peft_base(dir: &Path) -> Result<PathBuf> {
    let (v, cfg_path) = peft_config(dir)?;
    base_named(dir, &v, &cfg_path)
}

/// [`peft_base`] of the adapter at `dir` whose `adapter_config.json` (at `cfg_path`) is `v`.
fn base_named(dir: &Path, v: &serde_json::Value, cfg_path: &Path) -> Result<PathBuf> {
    let at = At(cfg_path);
    let named = v
        .get("base_model_name_or_path")
        .and_then(|b| b.as_str())
        .map(PathBuf::from)
        .ok_or_else(|| {
            at.refuse(
                "base_model_name_or_path",
                "missing: the base model's directory is needed",
            )
        })?;
    [named.clone(), dir.join(&named)]
        .into_iter()
        .find(|p| is_model_dir(p))
        .ok_or_else(|| {
            at.refuse(
                "base_model_name_or_path",
                format!("{} is not a Hugging Face model directory", named.display()),
            )
        })
}

pub fn read_peft(dir: &Path, device: &Device) -> Result<PeftAdapter> {
    let (v, cfg_path) = peft_config(dir)?;
    let at = At(&cfg_path);
    if v.get("peft_type").and_then(|t| t.as_str()) != Some("LORA") {
        return Err(at.refuse("peft_type", "only LORA adapters are read"));
    }
    for (flag, what) in [("use_dora", "DoRA"), ("use_rslora", "rsLoRA scaling")] {
        if v.get(flag).and_then(|f| f.as_bool()) == Some(true) {
            return Err(at.refuse(flag, format!("{what} is not implemented")));
        }
    }
    // None where the adapter names no task: then its tensors decide.
    let declared = match v.get("task_type").and_then(|t| t.as_str()) {
        None => None,
        Some("CAUSAL_LM") => Some(Head::Lm),
        Some("SEQ_CLS") => Some(Head::Score),
        Some(other) => {
            return Err(at.refuse(
                "task_type",
                format!("`{other}`: CAUSAL_LM and SEQ_CLS (a reward model) adapters are read"),
            ))
        }
    };
    let r = at.need(v.get("r").and_then(|x| x.as_f64()), "r")?;
    let alpha = at.need(v.get("lora_alpha").and_then(|x| x.as_f64()), "lora_alpha")?;
    let ranks = ModulePattern::read(&v, "rank_pattern", &at)?;
    let alphas = ModulePattern::read(&v, "alpha_pattern", &at)?;
    let base = base_named(dir, &v, &cfg_path)?;
    let file = dir.join("adapter_model.safetensors");
    let raw = candle_core::safetensors::load(&file, device)
        .with_context(|| format!("{}: cannot read", file.display()))?;
    let (mut tensors, mut score) = (HashMap::new(), HashMap::new());
    for (name, t) in raw {
        let t = t.to_dtype(DType::F32)?;
        let module = name.strip_prefix("base_model.model.");
        if let Some(m) = module.filter(|m| declared != Some(Head::Lm) && m.starts_with("score.")) {
            score.insert(m.to_string(), t);
            continue;
        }
        let module = module.and_then(|m| m.rsplit_once(".lora_").map(|(m, _)| m));
        let t = match (module, name.ends_with(".lora_B.weight")) {
            (Some(m), true) => (t * (alphas.of(m).unwrap_or(alpha) / ranks.of(m).unwrap_or(r)))?,
            _ => t,
        };
        let ours = peft_to_temper(&name, &t)
            .with_context(|| format!("{}: tensor {name}", file.display()))?;
        tensors.extend(ours);
    }
    let head = match declared {
        Some(h) => h,
        None if score.is_empty() => Head::Lm,
        None => Head::Score,
    };
    if head == Head::Score && !score.contains_key("score.weight") {
        bail!(
            "{}: a SEQ_CLS adapter without its score head (base_model.model.score.weight): \
             the classifier's head is not saved",
            file.display()
        );
    }
    Ok(PeftAdapter {
        base,
        tensors,
        head,
        score,
    })
}

/// PEFT's `rank_pattern` or `alpha_pattern`: values for the modules whose names end in a key
/// (a regular expression), the first such key deciding, as PEFT reads them.
struct ModulePattern(Vec<(regex::Regex, f64)>);

impl ModulePattern {
    fn read(v: &serde_json::Value, field: &str, at: &At) -> Result<Self> {
        let Some(map) = v.get(field).and_then(|p| p.as_object()) else {
            return Ok(Self(Vec::new()));
        };
        let entries = map.iter().map(|(key, value)| {
            let re = regex::Regex::new(&format!("^(.*\\.)?(?:{key})$"))
                .map_err(|e| at.refuse(field, format!("key `{key}`: {e}")))?;
            let value = value
                .as_f64()
                .ok_or_else(|| at.refuse(field, format!("key `{key}`: not a number")))?;
            Ok((re, value))
        });
        Ok(Self(entries.collect::<Result<_>>()?))
    }

    /// The value for module `name` (`transformer.h.0.attn.c_attn`), if a key matches it.
    fn of(&self, name: &str) -> Option<f64> {
        self.0
            .iter()
            .find(|(re, _)| re.is_match(name))
            .map(|(_, v)| *v)
    }
}

/// `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` ->
/// `model.layers.0.attn.q.lora_a`, and GPT-2's through [`gpt2_peft_to_temper`].
fn peft_to_temper(name: &str, t: &Tensor) -> Result<Vec<(String, Tensor)>> {
    let rest = name
        .strip_prefix("base_model.model.")
        .context("not a PEFT LoRA tensor name")?;
    let (module, factor) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, "lora_a")
    } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
        (m, "lora_b")
    } else {
        bail!("not a LoRA factor (lora_A / lora_B)");
    };
    if let Some(gpt2) = module.strip_prefix("transformer.") {
        return gpt2_peft_to_temper(gpt2, factor, t);
    }
    // LoRA factors sit on the projections, named alike in every llama-like family (in Gemma
    // 3's image-and-text models, inside its language model).
    if is_gemma3_vision(module) {
        bail!("a LoRA factor of Gemma 3's vision tower: temper trains the language model alone");
    }
    let module = gemma3_language_name(module);
    let ours = llama_to_temper(Family::Llama, &format!("{module}.weight"))?;
    let ours = format!("{}.{factor}", ours.trim_end_matches(".weight"));
    Ok(vec![(ours, t.clone())])
}

/// A PEFT factor of GPT-2's module `module` (`h.0.attn.c_attn`) under temper's names. PEFT
/// keeps a Conv1D's factors in a linear layer's layout (A `[r, in]`, B `[out, r]`;
/// `fan_in_fan_out` transposes only their product), so they map as they stand, except that
/// c_attn's output rows are q's, k's and v's in turn: each of the three takes its third of B,
/// with the whole A.
fn gpt2_peft_to_temper(module: &str, factor: &str, t: &Tensor) -> Result<Vec<(String, Tensor)>> {
    let (i, tail) = layer_of(module, "h.")
        .context("not a LoRA factor of a GPT-2 layer (transformer.h.N....)")?;
    let pre = format!("model.layers.{i}");
    if tail == "attn.c_attn" {
        let rows = t.dim(0)?;
        if factor == "lora_b" && rows % 3 != 0 {
            bail!("c_attn's lora_B has {rows} rows, not q's, k's and v's outputs in three equal parts");
        }
        let parts = match factor {
            "lora_b" => qkv_rows(t, rows / 3)?,
            _ => vec![t.clone(); 3],
        };
        let named = QKV.iter().zip(parts);
        return Ok(named
            .map(|(which, part)| (format!("{pre}.attn.{which}.{factor}"), part))
            .collect());
    }
    match GPT2_CONV.iter().find(|(hf, _)| *hf == tail) {
        Some((_, ours)) => Ok(vec![(format!("{pre}.{ours}.{factor}"), t.clone())]),
        None => {
            bail!("{tail}: LoRA on GPT-2 is read on c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm3(extra: serde_json::Value) -> Result<ModelConfig> {
        let mut v = serde_json::json!({
            "model_type": "smollm3", "vocab_size": 64, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 8, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 64,
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        let cfg: HfConfig = serde_json::from_value(v).unwrap();
        cfg.to_model(Path::new("m/config.json")).map(|(_, c)| c)
    }

    fn family_config(model_type: &str, extra: serde_json::Value) -> Result<ModelConfig> {
        let mut e = extra;
        e["model_type"] = model_type.into();
        smollm3(e)
    }

    /// What GPT-2's config asks for that temper's GPT-2 does not compute is refused by field
    /// (an untied head would otherwise be dropped, unscaled scores silently scaled); the
    /// values transformers defaults to read.
    #[test]
    fn gpt2_configs_temper_cannot_compute_are_refused_by_field() {
        let gpt2 = |extra: serde_json::Value| {
            let mut v = serde_json::json!({
                "model_type": "gpt2", "vocab_size": 64, "n_embd": 32, "n_layer": 2,
                "n_head": 4, "n_positions": 64,
            });
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            let cfg: HfConfig = serde_json::from_value(v).unwrap();
            cfg.to_model(Path::new("m/config.json")).map(|(_, c)| c)
        };
        let fine = serde_json::json!({"tie_word_embeddings": true, "scale_attn_weights": true,
            "scale_attn_by_inverse_layer_idx": false, "activation_function": "gelu_new"});
        assert!(gpt2(fine).unwrap().tie_word_embeddings);
        let fast = serde_json::json!({"activation_function": "gelu_fast"});
        assert!(gpt2(fast).is_ok());
        let packed = serde_json::json!({"quantization_config": {"quant_method": "gptq"}});
        let e = gpt2(packed).unwrap_err().to_string();
        assert!(
            e.contains("field \"quantization_config\": a gptq-quantized checkpoint"),
            "{e}"
        );
        assert!(gpt2(serde_json::json!({})).unwrap().tie_word_embeddings);
        for (extra, field) in [
            (
                serde_json::json!({"tie_word_embeddings": false}),
                "tie_word_embeddings",
            ),
            (
                serde_json::json!({"scale_attn_weights": false}),
                "scale_attn_weights",
            ),
            (
                serde_json::json!({"scale_attn_by_inverse_layer_idx": true}),
                "scale_attn_by_inverse_layer_idx",
            ),
            (
                serde_json::json!({"activation_function": "relu"}),
                "activation_function",
            ),
        ] {
            let e = gpt2(extra).unwrap_err().to_string();
            assert!(
                e.contains("m/config.json") && e.contains(&format!("\"{field}\"")),
                "{e}"
            );
        }
    }

    /// Qwen3Config's head_dim is 128 where config.json leaves it out (other families derive
    /// it from hidden_size / heads), and `swish` is transformers' other name for silu.
    #[test]
    fn qwen3s_default_head_dim_and_swish_read_as_transformers_reads_them() {
        let qwen3 = family_config("qwen3", serde_json::json!({})).unwrap();
        assert_eq!((qwen3.head_dim, qwen3.head_dim()), (Some(128), 128));
        let given = family_config("qwen3", serde_json::json!({"head_dim": 16})).unwrap();
        assert_eq!(given.head_dim(), 16);
        let llama = family_config("llama", serde_json::json!({})).unwrap();
        assert_eq!(llama.head_dim(), 8);
        let swish = family_config("llama", serde_json::json!({"hidden_act": "swish"})).unwrap();
        assert_eq!((swish.mlp, &swish), (MlpKind::SwiGlu, &llama));
        let e = family_config("llama", serde_json::json!({"hidden_act": "gelu"})).unwrap_err();
        assert!(e.to_string().contains("hidden_act"), "{e}");
    }

    /// What each family's config class defaults a field to where config.json leaves it out
    /// (transformers 5.25's AutoConfig gives these): the key-value heads (as many as the
    /// query heads where null), SmolLM3's tied head and rotary base.
    #[test]
    fn absent_fields_take_each_config_classs_default() {
        let kv = |family: &str, given: Option<serde_json::Value>| {
            let mut v = serde_json::json!({
                "model_type": family, "vocab_size": 64, "hidden_size": 64,
                "intermediate_size": 64, "num_hidden_layers": 8, "num_attention_heads": 32,
                "max_position_embeddings": 64, "head_dim": 2,
            });
            if let Some(g) = given {
                v["num_key_value_heads"] = g;
            }
            let cfg: HfConfig = serde_json::from_value(v).unwrap();
            cfg.to_model(Path::new("m/config.json"))
                .unwrap()
                .1
                .num_key_value_heads
        };
        for (family, absent) in [
            ("llama", 32),
            ("mistral", 8),
            ("qwen2", 32),
            ("qwen3", 32),
            ("smollm3", 4),
            ("gemma2", 4),
            ("gemma3_text", 4),
        ] {
            assert_eq!(kv(family, None), absent, "{family}: absent");
            // Mistral's and Gemma's classes refuse a null.
            if !matches!(family, "mistral" | "gemma2" | "gemma3_text") {
                let null = kv(family, Some(serde_json::Value::Null));
                assert_eq!(null, 32, "{family}: null");
            }
            assert_eq!(kv(family, Some(2.into())), 2, "{family}: given");
        }
        let bare = serde_json::json!({});
        let smol = family_config("smollm3", bare.clone()).unwrap();
        assert!(smol.tie_word_embeddings, "SmolLM3Config ties its head");
        assert_eq!(
            smol.rope_theta, 2_000_000.0,
            "SmolLM3Config's default_theta"
        );
        for family in ["llama", "mistral", "qwen2", "qwen3"] {
            let cfg = family_config(family, bare.clone()).unwrap();
            assert!(!cfg.tie_word_embeddings, "{family}");
            assert_eq!(
                (cfg.rope_theta, cfg.rms_norm_eps),
                (10000.0, 1e-6),
                "{family}"
            );
        }
        let untied = serde_json::json!({"tie_word_embeddings": false, "rope_theta": 5e4});
        let smol = family_config("smollm3", untied).unwrap();
        assert_eq!((smol.tie_word_embeddings, smol.rope_theta), (false, 5e4));
        // transformers reads the first flag of each layer, so a longer list reads.
        let longer = serde_json::json!({"no_rope_layers": [1, 1, 0, 1, 1, 1, 0, 1, 0, 0]});
        assert_eq!(smollm3(longer).unwrap().nope_layers, [2, 6]);
    }

    /// Rotary settings as transformers 5.25 reads them: a `rope_scaling` that says anything
    /// replaces `rope_parameters` (its base with it), the type defaults to `default`, Llama 3's
    /// scaling counts from the context where it names no original length; rotary positions
    /// on part of each head are refused by field.
    #[test]
    fn rotary_settings_read_as_transformers_reads_them() {
        let cfg = family_config(
            "llama",
            serde_json::json!({"rope_scaling": {"rope_type": "linear", "factor": 2.0},
                "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}, "rope_theta": 5.0}),
        )
        .unwrap();
        let linear = Some(RopeScaling::Linear(LinearScaling { factor: 2.0 }));
        assert_eq!((cfg.rope_theta, &cfg.rope_scaling), (5.0, &linear));
        let empty = serde_json::json!({"rope_scaling": {},
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 7.0}});
        let cfg = family_config("qwen2", empty).unwrap();
        assert_eq!((cfg.rope_theta, &cfg.rope_scaling), (7.0, &linear));
        let untyped = serde_json::json!({"rope_parameters": {"rope_theta": 5e5}});
        let cfg = family_config("mistral", untyped).unwrap();
        assert_eq!((cfg.rope_theta, &cfg.rope_scaling), (5e5, &None));
        let llama3 = serde_json::json!({"rope_parameters": {"rope_type": "llama3",
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_theta": 5e5}});
        match family_config("llama", llama3).unwrap().rope_scaling {
            Some(RopeScaling::Llama3(s)) => assert_eq!(s.original_max_position_embeddings, 64),
            other => panic!("{other:?}"),
        }
        let whole = serde_json::json!({"partial_rotary_factor": 1.0});
        assert!(family_config("llama", whole).is_ok());
        for (extra, field) in [
            (
                serde_json::json!({"partial_rotary_factor": 0.5}),
                "\"partial_rotary_factor\"",
            ),
            (
                serde_json::json!({"rope_parameters": {"rope_type": "default",
                    "rope_theta": 1e4, "partial_rotary_factor": 0.5}}),
                "\"rope_parameters\"",
            ),
            (
                serde_json::json!({"rope_scaling": {"rope_type": "linear", "factor": 2.0,
                    "partial_rotary_factor": 0.25}}),
                "\"rope_scaling\"",
            ),
        ] {
            let e = family_config("qwen3", extra).unwrap_err().to_string();
            assert!(
                e.contains("m/config.json") && e.contains(field) && e.contains("part of each"),
                "{e}"
            );
        }
        let per_kind = serde_json::json!({"rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1e6}}});
        let e = family_config("qwen2", per_kind).unwrap_err().to_string();
        assert!(
            e.contains("\"rope_parameters\"") && e.contains("Gemma 3 only"),
            "{e}"
        );
    }

    /// The tensors the import expects, by name and shape, are those the model creates, and
    /// under Hugging Face's names (GPT-2's fused and transposed) they convert back to them.
    #[test]
    fn expected_tensors_are_what_the_model_creates() {
        use crate::train::params::{Net, ParamStore};
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");
        let sorted = |mut v: Vec<(String, Vec<usize>)>| {
            v.sort();
            v
        };
        for fam in [
            "llama",
            "qwen2",
            "qwen3",
            "mistral",
            "smollm3",
            "gemma2",
            "gemma3",
            "gemma3_mm",
            "gpt2",
            "llama_rm",
        ] {
            let path = fixtures.join(fam).join("config.json");
            let hf = HfConfig::read(&path).unwrap();
            let head = hf.head(&path).unwrap();
            let (family, mut cfg) = hf.to_model(&path).unwrap();
            if head == Head::Score {
                cfg.tie_word_embeddings = true;
            }
            let mut store = ParamStore::new(Device::Cpu, 0);
            crate::model::Transformer::new(&mut store.scope(Net::Policy), &cfg, None).unwrap();
            let made: Vec<(String, Vec<usize>)> = store
                .net(Net::Policy)
                .map(|(n, v, _)| (n.to_string(), v.dims().to_vec()))
                .collect();
            let ours = sorted(temper_shapes(&cfg));
            assert_eq!(sorted(made), ours, "{fam}");
            let mut back = Vec::new();
            for (name, shape) in hf_shapes(family, head, &cfg).unwrap() {
                let t = Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
                let parts = match name.as_str() {
                    "score.weight" => vec![score_to_temper(&name, &t, cfg.hidden_size).unwrap()],
                    _ => to_temper(family, &name, &t, &cfg).unwrap(),
                };
                back.extend(parts.into_iter().map(|(n, t)| (n, t.dims().to_vec())));
            }
            let mut want = ours;
            if head == Head::Score {
                want.push(("score.weight".into(), vec![cfg.hidden_size]));
            }
            assert_eq!(sorted(back), sorted(want), "{fam}");
        }
    }

    /// Sliding windows as transformers assigns them to layers, and back through the export.
    #[test]
    fn sliding_windows_come_from_each_familys_fields_and_export_back() {
        let w = |c: &ModelConfig| (c.sliding_window, c.full_attention_layers.clone());
        let none = (None, vec![]);
        let mistral = family_config("mistral", serde_json::json!({"sliding_window": 16})).unwrap();
        assert_eq!(w(&mistral), (Some(16), vec![]));
        // A window as long as the context hides nothing.
        let long = serde_json::json!({"sliding_window": 64});
        assert_eq!(w(&family_config("mistral", long).unwrap()), none);
        // Llama has no window: transformers ignores the field, and so does temper.
        let llama = serde_json::json!({"sliding_window": 16});
        assert_eq!(w(&family_config("llama", llama).unwrap()), none);
        // Qwen: only with use_sliding_window, from max_window_layers on (28 by default).
        let off = serde_json::json!({"sliding_window": 16, "max_window_layers": 3});
        assert_eq!(w(&family_config("qwen2", off).unwrap()), none);
        let on = serde_json::json!({
            "sliding_window": 16, "use_sliding_window": true, "max_window_layers": 3
        });
        let qwen2 = family_config("qwen2", on).unwrap();
        assert_eq!(w(&qwen2), (Some(16), vec![0, 1, 2]));
        let deep = serde_json::json!({"sliding_window": 16, "use_sliding_window": true});
        assert_eq!(w(&family_config("qwen3", deep).unwrap()), none);
        // Without use_sliding_window nothing slides, whatever layer_types says.
        let unused = serde_json::json!({
            "sliding_window": 16, "max_window_layers": 7,
            "layer_types": ["full_attention", "full_attention", "full_attention",
                            "full_attention", "full_attention", "full_attention",
                            "full_attention", "sliding_attention"]
        });
        assert_eq!(w(&family_config("qwen2", unused).unwrap()), none);
        // layer_types, where given, says which layers slide.
        let types = serde_json::json!({
            "sliding_window": 16, "use_sliding_window": true,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention",
                            "sliding_attention", "full_attention", "sliding_attention",
                            "sliding_attention", "sliding_attention"]
        });
        let qwen3 = family_config("qwen3", types).unwrap();
        assert_eq!(w(&qwen3), (Some(16), vec![1, 4]));
        // SmolLM3 without layer_types slides its NoPE layers, as transformers fills them in.
        let smol = serde_json::json!({"sliding_window": 16, "use_sliding_window": true});
        let smol = smollm3(smol).unwrap();
        assert_eq!(w(&smol), (Some(16), vec![0, 1, 2, 4, 5, 6]));
        // An absent window is transformers' default of 4096 (null is none); Mistral slides
        // every layer whatever layer_types says, as transformers' Mistral does.
        let long_ctx = serde_json::json!({
            "max_position_embeddings": 8192,
            "layer_types": ["full_attention", "chunked_attention", "full_attention",
                            "full_attention", "full_attention", "full_attention",
                            "full_attention", "full_attention"]
        });
        let deflt = family_config("mistral", long_ctx.clone()).unwrap();
        assert_eq!(w(&deflt), (Some(4096), vec![]));
        let mut null = long_ctx;
        null["sliding_window"] = serde_json::Value::Null;
        assert_eq!(w(&family_config("mistral", null).unwrap()), none);
        for (family, bad, why) in [
            (
                "qwen2",
                serde_json::json!({"layer_types": ["full_attention"]}),
                "1 entries for 8",
            ),
            (
                "mistral",
                serde_json::json!({"sliding_window": 0}),
                "at least 1",
            ),
            (
                "smollm3",
                serde_json::json!({
                    "sliding_window": 16,
                    "layer_types": ["sliding_attention", "full_attention", "full_attention",
                                    "full_attention", "full_attention", "full_attention",
                                    "full_attention", "full_attention"]
                }),
                "ambiguous",
            ),
        ] {
            let e = family_config(family, bad).unwrap_err().to_string();
            assert!(
                e.contains("m/config.json") && e.contains(why),
                "{family}: {e}"
            );
        }
        // What the export writes reads back as the same windows.
        for (family, cfg) in [
            (Family::Mistral, &mistral),
            (Family::Qwen2, &qwen2),
            (Family::Qwen3, &qwen3),
            (Family::SmolLm3, &smol),
        ] {
            let v = config_json(family, Head::Lm, cfg, &[2], Some(1), 0);
            let again: HfConfig = serde_json::from_value(v).unwrap();
            let (_, back) = again.to_model(Path::new("x/config.json")).unwrap();
            assert_eq!(w(&back), w(cfg), "{family:?}");
        }
    }

    /// SmolLM3's NoPE layers from its flags, or where they are absent from the interval as
    /// transformers fills them in; a model with NoPE layers exports as SmolLM3.
    #[test]
    fn smollm3_nope_layers_come_from_the_flags_or_the_interval() {
        let flags = serde_json::json!({"no_rope_layers": [1, 1, 0, 1, 1, 1, 0, 0]});
        assert_eq!(smollm3(flags).unwrap().nope_layers, [2, 6, 7]);
        assert_eq!(smollm3(serde_json::json!({})).unwrap().nope_layers, [3, 7]);
        let every = serde_json::json!({"no_rope_layer_interval": 3});
        let cfg = smollm3(every).unwrap();
        assert_eq!(cfg.nope_layers, [2, 5]);
        assert_eq!(
            Family::of(&ModelConfig {
                hf_family: None,
                ..cfg
            }),
            Some(Family::SmolLm3)
        );
        let bad = smollm3(serde_json::json!({"no_rope_layers": [1, 2, 1, 1, 1, 1, 1, 1]}));
        let e = bad.unwrap_err().to_string();
        assert!(
            e.contains("m/config.json") && e.contains("no_rope_layers"),
            "{e}"
        );
        let e = smollm3(serde_json::json!({"no_rope_layer_interval": 0}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no_rope_layer_interval"), "{e}");
        // Older configs write -1 for no padding id.
        assert!(smollm3(serde_json::json!({"pad_token_id": -1})).is_ok());
    }

    /// A classifier's padding id where its config names none is its config class's default,
    /// as transformers 5.24 gives it; null and -1 name none.
    #[test]
    fn a_classifier_pads_with_its_config_classs_default() {
        let cases = [
            (Family::SmolLm3, None, Some(128004)),
            (Family::Gemma3, None, Some(0)),
            (Family::Gemma2, None, Some(0)),
            (Family::Llama, None, None),
            (Family::Qwen2, None, None),
            (Family::SmolLm3, Some(None), None),
            (Family::Gemma3, Some(None), None),
            (Family::SmolLm3, Some(Some(-1)), None),
            (Family::Llama, Some(Some(2)), Some(2)),
        ];
        for (family, given, want) in cases {
            assert_eq!(classifier_pad(family, given), want, "{family:?} {given:?}");
        }
    }

    /// Gemma 3's configs as the hub holds them (written before transformers 5: the bases as
    /// `rope_theta` and `rope_local_base_freq`, the layers by `sliding_window_pattern`) and as
    /// transformers 5 writes them (`rope_parameters` per layer kind, `layer_types`) read the
    /// same, and the export writes back what reads the same again; what temper does not
    /// implement is refused by field.
    #[test]
    fn gemma3_configs_of_either_age_read_alike_and_export_back() {
        let old = family_config(
            "gemma3_text",
            serde_json::json!({"sliding_window": 4, "sliding_window_pattern": 3,
                "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": null,
                "query_pre_attn_scalar": 12, "final_logit_softcapping": null,
                "attn_logit_softcapping": null, "hidden_activation": "gelu_pytorch_tanh"}),
        )
        .unwrap();
        let (s, f) = ("sliding_attention", "full_attention");
        let new = family_config(
            "gemma3_text",
            serde_json::json!({"sliding_window": 4, "query_pre_attn_scalar": 12,
                "layer_types": [s, s, f, s, s, f, s, s],
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
        )
        .unwrap();
        assert_eq!(old, new);
        let local = new.rope_local.clone().unwrap();
        assert_eq!(
            (local.theta, local.layers),
            (10000.0, vec![0, 1, 3, 4, 6, 7])
        );
        assert_eq!(
            (new.rope_theta, &new.full_attention_layers[..]),
            (1e6, &[2, 5][..])
        );
        assert_eq!(new.sliding_window, Some(4));
        assert!(new.norm_plus_one && new.post_norms && new.embed_scale && new.qk_norm);
        assert_eq!(
            (new.mlp, new.head_dim, new.query_pre_attn_scalar),
            (MlpKind::GeGlu, Some(256), Some(12))
        );
        assert!(
            new.tie_word_embeddings,
            "Gemma 3 ties its head unless told not to"
        );
        // A model of temper's own with Gemma's layout exports as Gemma 3; one whose window
        // and second base disagree on a layer exports as nothing.
        let own = ModelConfig {
            hf_family: None,
            ..new.clone()
        };
        assert_eq!(Family::of(&own), Some(Family::Gemma3));
        let split = ModelConfig {
            full_attention_layers: vec![2],
            ..own.clone()
        };
        assert_eq!(Family::of(&split), None);
        let v = config_json(Family::Gemma3, Head::Lm, &new, &[1], Some(2), 0);
        assert_eq!(v["architectures"][0], "Gemma3ForCausalLM");
        assert_eq!(v["pad_token_id"], 0);
        assert_eq!(
            v["sliding_window_pattern"], 3,
            "for transformers before layer_types"
        );
        assert!(v.get("hidden_act").is_none());
        let back: HfConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back.to_model(Path::new("x")).unwrap().1, new);
        // transformers types the layers even without a window: the bases still differ.
        let unwindowed =
            family_config("gemma3_text", serde_json::json!({"sliding_window": null})).unwrap();
        assert_eq!(unwindowed.sliding_window, None);
        assert_eq!(unwindowed.rope_local.unwrap().layers, [0, 1, 2, 3, 4, 6, 7]);
        for (extra, field) in [
            (
                serde_json::json!({"use_bidirectional_attention": true}),
                "use_bidirectional_attention",
            ),
            (
                serde_json::json!({"hidden_activation": "gelu"}),
                "hidden_activation",
            ),
            (
                serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}),
                "rope_scaling",
            ),
            (
                serde_json::json!({"rope_parameters": {"sliding_attention":
                    {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e4}}}),
                "rope_parameters",
            ),
            (
                serde_json::json!({"layer_types": ["chunked_attention"]}),
                "layer_types",
            ),
        ] {
            let e = family_config("gemma3_text", extra).unwrap_err().to_string();
            assert!(e.contains("m/config.json") && e.contains(field), "{e}");
        }
        // The full layers' linear scaling (Gemma 3 from 4B up) is read, in either place.
        let linear = Some(RopeScaling::Linear(LinearScaling { factor: 8.0 }));
        for extra in [
            serde_json::json!({"rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
            serde_json::json!({"rope_parameters": {"full_attention":
                {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}}),
            // rope_scaling's keys laid over the full layers' (transformers' dict update).
            serde_json::json!({"rope_scaling": {}, "rope_parameters": {"full_attention":
                {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}}),
            serde_json::json!({"rope_scaling": {"factor": 8.0}, "rope_parameters":
                {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}}),
        ] {
            let cfg = family_config("gemma3_text", extra).unwrap();
            assert_eq!(cfg.rope_scaling, linear);
            assert_eq!(Family::of(&cfg), Some(Family::Gemma3));
        }
        // transformers wants an integer window and scale even where the model has neither.
        let bare = ModelConfig {
            sliding_window: None,
            full_attention_layers: Vec::new(),
            query_pre_attn_scalar: None,
            ..own
        };
        let v = config_json(Family::Gemma3, Head::Lm, &bare, &[1], Some(2), 0);
        let (window, scale) = (&v["sliding_window"], &v["query_pre_attn_scalar"]);
        assert_eq!((window, scale), (&64.into(), &256.into()));
        // An image-and-text model is read as its language model, which it must hold.
        let dir = std::env::temp_dir().join(format!("temper-gemma3-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, r#"{"model_type": "gemma3", "vision_config": {}}"#).unwrap();
        let e = HfConfig::read(&path).unwrap_err().to_string();
        assert!(
            e.contains("config.json") && e.contains("text_config"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Gemma 2's layers alternate from a sliding first one, its caps are 50 and 30 where
    /// absent and none where null, and its export reads back the same.
    #[test]
    fn gemma2_caps_and_layers_read_as_transformers_and_export_back() {
        let g = family_config("gemma2", serde_json::json!({"sliding_window": 4})).unwrap();
        assert_eq!(
            (g.attn_logit_softcapping, g.final_logit_softcapping),
            (Some(50.0), Some(30.0))
        );
        assert_eq!(
            (g.sliding_window, &g.full_attention_layers[..]),
            (Some(4), &[1, 3, 5, 7][..])
        );
        assert!(g.rope_local.is_none() && !g.qk_norm && g.post_norms && g.norm_plus_one);
        assert_eq!((g.vocab_size, g.rope_theta), (64, 10000.0));
        assert_eq!(
            Family::of(&ModelConfig {
                hf_family: None,
                ..g.clone()
            }),
            Some(Family::Gemma2)
        );
        let v = config_json(Family::Gemma2, Head::Lm, &g, &[1], Some(2), 0);
        assert_eq!(v["architectures"][0], "Gemma2ForCausalLM");
        assert!(v.get("rope_parameters").is_none() && v.get("sliding_window_pattern").is_none());
        let back: HfConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back.to_model(Path::new("x")).unwrap().1, g);
        let uncapped = family_config(
            "gemma2",
            serde_json::json!({"attn_logit_softcapping": null, "final_logit_softcapping": null}),
        )
        .unwrap();
        assert_eq!(
            (
                uncapped.attn_logit_softcapping,
                uncapped.final_logit_softcapping
            ),
            (None, None)
        );
        // Gemma 3 ignores a cap on the scores, as transformers does, and keeps one on the logits.
        let g3 = family_config(
            "gemma3_text",
            serde_json::json!({"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
        )
        .unwrap();
        assert_eq!(
            (g3.attn_logit_softcapping, g3.final_logit_softcapping),
            (None, Some(30.0))
        );
    }

    /// What `Gemma3ForConditionalGeneration`'s class reads from the top level of its config
    /// (the labels of a reward model, whether the head is tied) wins over its text_config, and
    /// it caps no logits.
    #[test]
    fn gemma3s_image_and_text_config_reads_its_top_level_fields() {
        let dir = std::env::temp_dir().join(format!("temper-gemma3-top-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        let text = serde_json::json!({"model_type": "gemma3_text", "tie_word_embeddings": true,
            "final_logit_softcapping": 30.0,
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16});
        let top = serde_json::json!({"model_type": "gemma3", "tie_word_embeddings": false,
            "architectures": ["Gemma3ForSequenceClassification"], "id2label": {"0": "LABEL_0"},
            "text_config": text});
        std::fs::write(&path, top.to_string()).unwrap();
        let cfg = HfConfig::read(&path).unwrap();
        assert_eq!(cfg.head(&path).unwrap(), Head::Score);
        let model = cfg.to_model(&path).unwrap().1;
        // Its class caps no logits, whatever the text_config says.
        assert!(!model.tie_word_embeddings && model.final_logit_softcapping.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
        // Its adapters' names: transformers 5's and 4.5x's, and none on the vision tower.
        for name in [
            "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight",
        ] {
            let t = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
            let mapped = peft_to_temper(name, &t).unwrap();
            assert_eq!(mapped[0].0, "model.layers.0.attn.q.lora_a");
            assert_eq!(mapped.len(), 1);
        }
        let vision = "base_model.model.model.vision_tower.vision_model.encoder.layers.0.\
                      self_attn.q_proj.lora_A.weight";
        let t = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(peft_to_temper(vision, &t)
            .unwrap_err()
            .to_string()
            .contains("vision"));
    }

    /// `rank_pattern` and `alpha_pattern` give their modules their own scale, the first key
    /// that ends a module's name deciding, as PEFT's `get_pattern_key` reads them; a key that
    /// is no regular expression is refused by field.
    #[test]
    fn per_module_ranks_and_alphas_scale_their_modules() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize("tests/fixtures/hf/llama").unwrap();
        let config = |ranks: serde_json::Value| {
            let v = serde_json::json!({
                "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
                "rank_pattern": ranks, "alpha_pattern": {"layers\\.1\\.self_attn\\.v_proj": 3},
                "base_model_name_or_path": base,
            });
            std::fs::write(dir.path().join("adapter_config.json"), v.to_string()).unwrap();
        };
        config(serde_json::json!({"q_proj": 2, "proj": 100}));
        let ones = Tensor::ones((6, 2), DType::F32, &Device::Cpu).unwrap();
        let mut tensors = HashMap::new();
        for layer in 0..2 {
            for m in ["q_proj", "v_proj"] {
                let name =
                    format!("base_model.model.model.layers.{layer}.self_attn.{m}.lora_B.weight");
                tensors.insert(name, ones.clone());
            }
        }
        candle_core::safetensors::save(&tensors, dir.path().join("adapter_model.safetensors"))
            .unwrap();
        let adapter = read_peft(dir.path(), &Device::Cpu).unwrap();
        let scale = |name: &str| {
            let t = &adapter.tensors[name];
            t.mean_all().unwrap().to_scalar::<f32>().unwrap()
        };
        // q: 8 / 2; v of layer 1: 3 / 4; v of layer 0: the config's 8 / 4 ("proj" ends no name
        // at a dot).
        assert_eq!(scale("model.layers.0.attn.q.lora_b"), 4.0);
        assert_eq!(scale("model.layers.1.attn.q.lora_b"), 4.0);
        assert_eq!(scale("model.layers.1.attn.v.lora_b"), 0.75);
        assert_eq!(scale("model.layers.0.attn.v.lora_b"), 2.0);
        config(serde_json::json!({"q_proj(": 2}));
        let e = read_peft(dir.path(), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("adapter_config.json: field \"rank_pattern\": key `q_proj(`"),
            "{e}"
        );
    }
}
