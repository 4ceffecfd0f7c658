//! The rotary settings of `config.json`: base, partial rotation, scaling, and where each
//! family keeps them (`rope_scaling`, `rope_parameters`, Gemma 3's per-kind entries).

use std::path::Path;

use anyhow::Result;

use super::config::{At, HfConfig};
use super::Family;
use crate::config::{LinearScaling, Llama3Scaling, RopeScaling};

impl HfConfig {
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
    pub(super) fn rope_refusals(&self, at: &At, family: Family) -> Result<()> {
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

    pub(super) fn theta(&self, family: Family) -> f64 {
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
    pub(super) fn local_theta(&self) -> f64 {
        self.rope_params(Family::Gemma3, "sliding_attention")
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .or(self.rope_local_base_freq)
            .unwrap_or(10000.0)
    }

    /// The rotary scaling of the model's positions: `rope_scaling` where it says anything, else
    /// what transformers 5 writes in `rope_parameters` (Gemma 3: `rope_scaling` over its full
    /// layers'; its sliding layers take none).
    pub(super) fn rope_scaling(
        &self,
        path: &Path,
        family: Family,
        ctx: usize,
    ) -> Result<Option<RopeScaling>> {
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
pub(super) fn scaling_json(scaling: &RopeScaling) -> serde_json::Value {
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
