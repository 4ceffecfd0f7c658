//! `temper generate`'s sampling settings where no flag gives them: the checkpoint's
//! `generation_config.json`, as vLLM (`--generation-config auto`) takes them (Qwen3 asks for
//! temperature 0.6, top-k 20, top-p 0.95), a temperature left out of a config that sets
//! `do_sample` being 1 as in vLLM and transformers; else temper's own. Like vLLM, and unlike
//! transformers' `generate`, it samples where the config does not set `do_sample`, and applies
//! no top-k the config does not name (transformers' default is 50).

use std::path::Path;

use anyhow::{anyhow, Result};
use serde_json::Value;

use crate::data::tokenizer::{Tokenizer, GENERATION_CONFIG};

/// temper's own defaults, where neither a flag nor the generation config says.
pub const TEMPERATURE: f64 = 0.8;
/// The temperature of a model whose generation config asks to sample and names none (vLLM's
/// and transformers').
pub const CONFIG_TEMPERATURE: f64 = 1.0;
pub const TOP_K: usize = 0;
pub const TOP_P: f64 = 1.0;
pub const MAX_NEW_TOKENS: usize = 64;

/// What a generation config says about sampling; `None` where it says nothing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FromConfig {
    /// Greedy where `do_sample` is false (transformers ignores the temperature then).
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub max_new_tokens: Option<usize>,
    pub min_new_tokens: Option<usize>,
    /// Whether the config sets `do_sample: true`: the model's authors ask for sampling (a
    /// config temper or transformers writes with the ids alone says nothing of it).
    pub do_sample: bool,
    /// The fields it sets that would change what transformers generates and temper does not
    /// apply, each with its value.
    pub unread: Vec<String>,
}

impl FromConfig {
    /// The sampling fields of the `generation_config.json` the tokenizer of the model in
    /// `dir` carries (none where it carries none); a field of the wrong type names the file
    /// and the field.
    pub fn of(tok: &Tokenizer, dir: &Path) -> Result<Self> {
        let Some(text) = tok.carried(GENERATION_CONFIG) else {
            return Ok(Self::default());
        };
        let file = dir.join(GENERATION_CONFIG);
        let v: Value = serde_json::from_str(text)
            .map_err(|e| crate::json_error::json_error(&file, text, &e))?;
        Self::parse(&v, &file)
    }

    /// The temperature where no flag gives one: the config's, else 1 where the config asks to
    /// sample (as vLLM and transformers read it), else temper's own.
    pub fn temperature_or_default(&self) -> f64 {
        match self.samples_untempered() {
            true => CONFIG_TEMPERATURE,
            false => self.temperature.unwrap_or(TEMPERATURE),
        }
    }

    /// Whether the temperature comes from [`CONFIG_TEMPERATURE`].
    pub fn samples_untempered(&self) -> bool {
        self.do_sample && self.temperature.is_none()
    }

    fn parse(v: &Value, file: &Path) -> Result<Self> {
        let field = |key: &str| v.get(key).filter(|x| !x.is_null());
        let wrong =
            |key: &str, want: &str| anyhow!("{}: field \"{key}\": expected {want}", file.display());
        let number = |key: &str| -> Result<Option<f64>> {
            field(key)
                .map(|x| x.as_f64().ok_or_else(|| wrong(key, "a number")))
                .transpose()
        };
        let count = |key: &str| -> Result<Option<usize>> {
            field(key)
                .map(|x| {
                    x.as_u64()
                        .map(|n| n as usize)
                        .ok_or_else(|| wrong(key, "a whole number"))
                })
                .transpose()
        };
        let do_sample = field("do_sample")
            .map(|x| {
                x.as_bool()
                    .ok_or_else(|| wrong("do_sample", "true or false"))
            })
            .transpose()?;
        let within = |key: &str, ok: fn(f64) -> bool, want: &str| -> Result<Option<f64>> {
            match number(key)? {
                Some(x) if !ok(x) => Err(wrong(key, want)),
                x => Ok(x),
            }
        };
        // Checked here, naming the file: past this point a bad value reads as a bad flag.
        let temperature = match do_sample {
            Some(false) => Some(0.0),
            _ => within(
                "temperature",
                crate::config::greedy_or_sampling,
                &crate::config::greedy_or_sampling_words(),
            )?,
        };
        Ok(Self {
            temperature,
            top_k: count("top_k")?,
            top_p: within("top_p", |p| p > 0.0 && p <= 1.0, "a number in (0, 1]")?,
            min_p: within("min_p", |p| (0.0..=1.0).contains(&p), "a number in [0, 1]")?,
            repetition_penalty: within(
                "repetition_penalty",
                |r| r > 0.0 && r.is_finite(),
                "a positive number",
            )?,
            max_new_tokens: count("max_new_tokens")?,
            min_new_tokens: count("min_new_tokens")?,
            do_sample: do_sample == Some(true),
            unread: unread(v),
        })
    }

    /// The fields it gives, for the line that says where the settings came from.
    pub fn describe(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(t) = self.temperature {
            parts.push(format!("temperature {t}"));
        }
        if let Some(k) = self.top_k {
            parts.push(format!("top_k {k}"));
        }
        if let Some(p) = self.top_p {
            parts.push(format!("top_p {p}"));
        }
        if let Some(p) = self.min_p {
            parts.push(format!("min_p {p}"));
        }
        if let Some(r) = self.repetition_penalty {
            parts.push(format!("repetition_penalty {r}"));
        }
        if let Some(n) = self.max_new_tokens {
            parts.push(format!("max_new_tokens {n}"));
        }
        if let Some(n) = self.min_new_tokens {
            parts.push(format!("min_new_tokens {n}"));
        }
        (!parts.is_empty()).then(|| parts.join(", "))
    }
}

/// The fields of a generation config that change what transformers' `generate` draws and
/// that temper does not apply, where they are set to something other than their no-op
/// default: said, rather than passed over.
fn unread(v: &Value) -> Vec<String> {
    let set = |key: &str, no_op: &dyn Fn(&Value) -> bool| {
        v.get(key)
            .filter(|x| !x.is_null() && !no_op(x))
            .map(|x| format!("{key} {x}"))
    };
    let equals = |n: f64| move |x: &Value| x.as_f64() == Some(n);
    let empty = |x: &Value| x.as_array().is_some_and(|a| a.is_empty());
    let mut fields: Vec<String> = [
        set("num_beams", &equals(1.0)),
        set("num_beam_groups", &equals(1.0)),
        set("penalty_alpha", &equals(0.0)),
        set("no_repeat_ngram_size", &equals(0.0)),
        set("min_length", &equals(0.0)),
        set("typical_p", &equals(1.0)),
        set("epsilon_cutoff", &equals(0.0)),
        set("eta_cutoff", &equals(0.0)),
        set("bad_words_ids", &empty),
        set("suppress_tokens", &empty),
        set("begin_suppress_tokens", &empty),
        set("sequence_bias", &|_| false),
        set("stop_strings", &empty),
        set("forced_bos_token_id", &|_| false),
        set("forced_eos_token_id", &|_| false),
    ]
    .into_iter()
    .flatten()
    .collect();
    // max_length bounds the prompt and the completion together; temper reads max_new_tokens.
    if v.get("max_new_tokens").is_none_or(Value::is_null) {
        fields.extend(set("max_length", &|_| false));
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Qwen3's settings come through; `do_sample: false` is greedy whatever the temperature;
    /// a config without sampling fields (a base model's) gives none; a field of the wrong type
    /// names itself.
    #[test]
    fn a_generation_configs_sampling_fields_become_defaults() {
        let file = || Path::new("m/generation_config.json");
        let qwen3 = json!({"do_sample": true, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
                           "eos_token_id": [151645, 151643]});
        assert_eq!(
            FromConfig::parse(&qwen3, file()).unwrap(),
            FromConfig {
                temperature: Some(0.6),
                top_k: Some(20),
                top_p: Some(0.95),
                do_sample: true,
                ..FromConfig::default()
            }
        );
        // Qwen2.5-Instruct's asks for a repetition penalty as well.
        let qwen25 = json!({"do_sample": true, "repetition_penalty": 1.05, "temperature": 0.7,
                            "top_p": 0.8, "top_k": 20, "min_p": 0.0});
        let q = FromConfig::parse(&qwen25, file()).unwrap();
        assert_eq!((q.repetition_penalty, q.min_p), (Some(1.05), Some(0.0)));
        assert!(q.describe().unwrap().contains("repetition_penalty 1.05"));
        for (bad, field) in [
            (json!({"repetition_penalty": 0.0}), "repetition_penalty"),
            (json!({"min_p": 2.0}), "min_p"),
            (json!({"top_p": 0.0}), "top_p"),
            (json!({"temperature": -1.0}), "temperature"),
            (json!({"temperature": 1e-40}), "temperature"),
        ] {
            let e = FromConfig::parse(&bad, file()).unwrap_err().to_string();
            assert!(e.contains(&format!("field \"{field}\"")), "{e}");
        }
        let greedy = json!({"do_sample": false, "temperature": 0.7, "max_new_tokens": 300});
        let g = FromConfig::parse(&greedy, file()).unwrap();
        assert_eq!((g.temperature, g.max_new_tokens), (Some(0.0), Some(300)));
        assert_eq!(
            FromConfig::parse(&json!({"bos_token_id": 1, "top_k": null}), file()).unwrap(),
            FromConfig::default()
        );
        // A config that asks to sample and names no temperature samples at 1, as vLLM and
        // transformers read it; one that says nothing of sampling (temper's exports), temper's
        // own.
        let asks = FromConfig::parse(&json!({"do_sample": true, "top_p": 0.9}), file()).unwrap();
        assert_eq!(asks.temperature_or_default(), 1.0);
        let ids = FromConfig::parse(&json!({"eos_token_id": 2}), file()).unwrap();
        assert_eq!(ids.temperature_or_default(), TEMPERATURE);
        // Fields transformers would apply and temper does not are listed, no-op values not.
        let odd = json!({"no_repeat_ngram_size": 3, "typical_p": 1.0, "max_length": 4096,
                         "suppress_tokens": [], "min_new_tokens": 5, "num_beams": 1});
        let o = FromConfig::parse(&odd, file()).unwrap();
        assert_eq!(o.unread, ["no_repeat_ngram_size 3", "max_length 4096"]);
        assert_eq!(o.min_new_tokens, Some(5));
        let bounded = json!({"max_length": 4096, "max_new_tokens": 100});
        assert!(FromConfig::parse(&bounded, file())
            .unwrap()
            .unread
            .is_empty());
        assert_eq!(FromConfig::default().describe(), None);
        let e = FromConfig::parse(&json!({"top_k": "20"}), file()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("m/generation_config.json: field \"top_k\""),
            "{e}"
        );
    }
}
