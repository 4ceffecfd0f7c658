//! Reading a Hugging Face model directory: its config, then its safetensors (one file or
//! shards), every name and shape checked before any tensor is converted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::config::{Head, HfConfig};
use super::names::{canonical_name, hf_shapes, is_gemma3_vision, name_in_file, to_temper};
use super::score::{fill_score_bias, score_to_temper};
use super::{Family, WEIGHTS, WEIGHTS_INDEX};
use crate::config::ModelConfig;
use crate::json_error::json_error;

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
pub(super) fn classifier_pad(family: Family, given: Option<Option<i64>>) -> Option<u32> {
    let default = match family {
        Family::Gemma2 | Family::Gemma3 => Some(0),
        Family::SmolLm3 => Some(128004),
        _ => None,
    };
    given.unwrap_or(default).and_then(|p| u32::try_from(p).ok())
}

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

/// Reads a model directory: its config, then every tensor (memory-mapped, one at a time),
/// renamed to temper's names. A tensor of no known name is an error naming it and its file.
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
        warnln!(
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
