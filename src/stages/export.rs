//! `temper export`: a checkpoint (or run directory) written as a temper checkpoint with its
//! adapters merged, as a Hugging Face model directory that
//! `transformers.AutoModelForCausalLM.from_pretrained` loads as it is (a reward model:
//! `AutoModelForSequenceClassification`, one label, as TRL's RewardTrainer saves one), or as a
//! PEFT adapter directory for `PeftModel.from_pretrained` on the exported base.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::json;

use super::loader::{read_checkpoint, Loaded};
use crate::config::HfFamily;
use crate::model::hf;
use crate::train::checkpoint::{resolve_checkpoint, CheckpointKind};
use crate::train::params::Net;

/// What `export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A temper checkpoint, adapters merged into the base weights.
    Temper,
    /// A Hugging Face model directory (adapters merged).
    Hf,
    /// The LoRA adapters alone, with PEFT's names and `adapter_config.json`, beside the
    /// tokenizer they trained with.
    Peft,
}

/// `overwrite`: write into an `out` that already holds files (never the checkpoint's own
/// directory, or one holding it).
pub fn export(checkpoint: &Path, out: &Path, format: Format, overwrite: bool) -> Result<()> {
    check_out(checkpoint, out, overwrite)?;
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    match format {
        Format::Temper => temper(checkpoint, out),
        Format::Hf => hf_dir(checkpoint, out),
        Format::Peft => peft(checkpoint, out),
    }
}

/// An `out` that holds files is refused unless `overwrite` says to write into it; one that is
/// or holds the checkpoint being read always is: the export would replace the files it reads
/// (or mix its own into a run directory) and a failure halfway would leave neither whole.
fn check_out(checkpoint: &Path, out: &Path, overwrite: bool) -> Result<()> {
    let Ok(mut entries) = std::fs::read_dir(out) else {
        return Ok(()); // absent (created next), or not a directory (which that says)
    };
    // The directory given and the one read (a run's final/ or latest checkpoint).
    let read = [
        Some(checkpoint.to_path_buf()),
        resolve_checkpoint(checkpoint).ok(),
    ];
    if let Ok(o) = out.canonicalize() {
        for c in read.iter().flatten() {
            if c.canonicalize().is_ok_and(|c| c.starts_with(&o)) {
                bail!(
                    "--out {}: holds the checkpoint being exported ({}); export into another directory",
                    out.display(),
                    c.display()
                );
            }
        }
    }
    if let (Some(first), false) = (entries.next(), overwrite) {
        let name = first.map_or_else(
            |_| "?".into(),
            |e| e.file_name().to_string_lossy().into_owned(),
        );
        bail!(
            "--out {}: not empty (it holds {name}, among others maybe); pass --overwrite to write into it anyway (files of the same names are replaced), or choose a new directory",
            out.display()
        );
    }
    Ok(())
}

fn temper(checkpoint: &Path, out: &Path) -> Result<()> {
    let loaded = read_checkpoint(checkpoint, &Device::Cpu)?;
    crate::train::params::save_tensors(&out.join("model.safetensors"), &loaded.tensors)?;
    let mut meta = loaded.meta.clone();
    meta.lora = None;
    meta.write(out)?;
    loaded.tokenizer.save_dir(out)
}

/// The policy's own tensors (a PPO checkpoint also holds its critic).
fn policy_tensors(loaded: &Loaded) -> Result<HashMap<String, Tensor>> {
    loaded
        .meta
        .expect_kind(&loaded.dir, CheckpointKind::Policy)?;
    Ok(loaded
        .tensors
        .iter()
        .filter(|(n, _)| !n.starts_with(Net::Value.prefix()))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect())
}

fn hf_dir(checkpoint: &Path, out: &Path) -> Result<()> {
    let loaded = read_checkpoint(checkpoint, &Device::Cpu)?;
    let cfg = &loaded.meta.model;
    let family = family_of(cfg)?;
    let head = match loaded.meta.kind {
        CheckpointKind::Policy => hf::Head::Lm,
        CheckpointKind::Reward => hf::Head::Score,
    };
    let (tensors, bias) = match head {
        hf::Head::Score => reward_tensors(family, &loaded)?,
        hf::Head::Lm => (hf::export_tensors(family, &policy_tensors(&loaded)?)?, 0.0),
    };
    hf::write_safetensors(&out.join("model.safetensors"), &tensors)?;
    let tok = &loaded.tokenizer;
    if matches!(tok, crate::data::tokenizer::Tokenizer::Bytes) {
        errln!(
            "warning: {}: the byte-level tokenizer has no tokenizer.json to write, and \
             transformers (and temper's --init) need one beside the model",
            out.display()
        );
    }
    let stops = tok.stop_ids();
    let mut config = hf::config_json(family, head, cfg, &stops, tok.bos_id(), tok.pad_id());
    if head == hf::Head::Score {
        // Without a padding id transformers reads the last token as temper does, and refuses
        // batches of more than one (loud) instead of reading one token earlier (silent).
        if config["pad_token_id"].is_null() {
            errln!(
                "warning: the tokenizer pads with a stop token ({}), which ends the sequences \
                 temper scores: config.json names no pad_token_id, so that transformers reads \
                 the last token as temper does (and refuses batches of more than one)",
                tok.pad_id()
            );
        }
        if bias != 0.0 {
            config[hf::SCORE_BIAS_FIELD] = json!(bias);
            errln!(
                "warning: the reward model's score.bias ({bias}) has no place in a Hugging Face \
                 classifier: transformers' scores are temper's minus it; config.json keeps it \
                 as {}, which temper reads back",
                hf::SCORE_BIAS_FIELD
            );
        }
    }
    crate::io::write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    // An imported model's own tokenizer files (and generation config) go back as they came.
    tok.save_dir(out)?;
    // One temper trained (`temper tokenizer train`) has no tokenizer_config.json: without one
    // AutoTokenizer picks a class by model_type, whose defaults (Llama's <s> BOS, say) are not
    // this vocabulary's. PreTrainedTokenizerFast reads tokenizer.json as it is (transformers
    // 5 keeps the name for its TokenizersBackend).
    if !out.join("tokenizer_config.json").exists() && out.join("tokenizer.json").exists() {
        let name = |id: Option<u32>| id.and_then(|i| tok.token_name(i));
        let tokenizer_config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": name(Some(tok.eos_id())),
            // A classifier's config.json names no pad_token_id, on purpose (above).
            "pad_token": match head {
                hf::Head::Score => None,
                hf::Head::Lm => name(Some(tok.pad_id())),
            },
            "bos_token": name(tok.bos_id()),
            "model_max_length": cfg.max_position_embeddings,
        });
        crate::io::write_atomic(
            &out.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&tokenizer_config)?.as_bytes(),
        )?;
    }
    if !out.join("generation_config.json").exists() {
        let gen = json!({"bos_token_id": tok.bos_id(), "eos_token_id": stops});
        crate::io::write_atomic(
            &out.join("generation_config.json"),
            serde_json::to_string_pretty(&gen)?.as_bytes(),
        )?;
    }
    Ok(())
}

/// A reward model's transformer with Hugging Face's names, and its head as a one-label
/// classifier's `score.weight`, with the bias that has no place there; an unused
/// language-model head (of a reward model begun from an untied policy) is left out, as a
/// classifier has none.
fn reward_tensors(family: HfFamily, loaded: &Loaded) -> Result<(HashMap<String, Tensor>, f32)> {
    let t = &loaded.tensors;
    let body: HashMap<String, Tensor> = t
        .iter()
        .filter(|(n, _)| n.starts_with("model."))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    let mut out = hf::export_tensors(family, &body)?;
    let (Some(w), Some(b)) = (t.get("score.weight"), t.get("score.bias")) else {
        bail!(
            "{}: a reward checkpoint without its score head",
            loaded.dir.display()
        );
    };
    let (w, bias) = hf::score_to_hf(w, b)?;
    out.insert("score.weight".into(), w);
    Ok((out, bias))
}

fn family_of(cfg: &crate::config::ModelConfig) -> Result<HfFamily> {
    let gemma_family = matches!(cfg.hf_family, Some(HfFamily::Gemma2 | HfFamily::Gemma3));
    if (cfg.has_gemma_features() || gemma_family) && HfFamily::of(cfg).is_none() {
        bail!(
            "this model has part of Gemma's layout but not all of it: gemma2 and gemma3_text \
             both write mlp = \"geglu\", norm_plus_one, post_norms and embed_scale together, \
             without biases, NoPE layers or llama3 rotary scaling; gemma2 without qk_norm or \
             rope_local, gemma3_text with qk_norm, without attn_logit_softcapping and with a \
             window over exactly the layers of rope_local; and model.hf_family, where set, must \
             be the one the layout makes"
        );
    }
    if let (Some(f), None) = (cfg.hf_family, HfFamily::of(cfg)) {
        if !cfg.nope_layers.is_empty() && f != HfFamily::SmolLm3 {
            bail!(
                "model.hf_family = \"{}\" has no place for model.nope_layers {:?}: only \
                 smollm3 writes layers without rotary positions",
                f.name(),
                cfg.nope_layers
            );
        }
        bail!(
            "model.hf_family = \"{}\" has no place for model.sliding_window {:?} with \
             model.full_attention_layers {:?}: mistral writes a window over every layer, \
             qwen2, qwen3, smollm3, gemma2 and gemma3_text one over any layers, llama and gpt2 none",
            f.name(),
            cfg.sliding_window,
            cfg.full_attention_layers
        );
    }
    HfFamily::of(cfg).context(
        "this model's layout (norm, positions, MLP, biases) matches no Hugging Face family temper writes (llama, qwen2, qwen3, mistral, smollm3, gemma2, gemma3_text, gpt2)",
    )
}

/// PEFT's name of temper's LoRA factor `name` (`model.layers.0.attn.q.lora_a`).
fn peft_name(name: &str, family: HfFamily) -> Result<String> {
    let (module, factor) = name
        .rsplit_once('.')
        .with_context(|| format!("{name}: not an adapter"))?;
    let which = match factor {
        "lora_a" => "lora_A",
        "lora_b" => "lora_B",
        _ => bail!("{name}: not an adapter"),
    };
    if family == HfFamily::Gpt2 {
        bail!("PEFT export of GPT-2 adapters is not supported (its q, k, v share one c_attn): use --format hf, which merges them");
    }
    let hf_weight = hf::hf_name(family, &format!("{module}.weight"))?;
    let hf_module = hf_weight.trim_end_matches(".weight");
    Ok(format!("base_model.model.{hf_module}.{which}.weight"))
}

fn peft(checkpoint: &Path, out: &Path) -> Result<()> {
    let dir = resolve_checkpoint(checkpoint)?;
    let meta = crate::train::checkpoint::CheckpointMeta::read(&dir)?;
    let Some(lora) = &meta.lora else {
        bail!(
            "{}: holds no LoRA adapters (meta.json names no lora config)",
            dir.display()
        );
    };
    let file = dir.join("adapter.safetensors");
    let adapters = candle_core::safetensors::load(&file, &Device::Cpu)
        .with_context(|| format!("{}: cannot read adapters", file.display()))?;
    if meta.kind != CheckpointKind::Policy {
        bail!(
            "{}: a reward model's adapters leave its score head out of a PEFT causal-LM \
             adapter: use --format hf, which merges them and writes the classifier",
            dir.display()
        );
    }
    let family = family_of(&meta.model)?;
    let mut tensors = HashMap::new();
    let mut modules = Vec::new();
    for (name, t) in adapters
        .iter()
        .filter(|(n, _)| !n.starts_with(Net::Value.prefix()))
    {
        let p = peft_name(name, family)?;
        let module = p.rsplit('.').nth(2).context("adapter name")?.to_string();
        modules.push(module);
        tensors.insert(p, t.clone());
    }
    modules.sort();
    modules.dedup();
    hf::write_safetensors(&out.join("adapter_model.safetensors"), &tensors)?;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "base_model_name_or_path": meta.base,
    });
    if meta.base.is_none() {
        errln!(
            "warning: {}: the run's base was no Hugging Face model directory (a checkpoint, or \
             a model with adapters merged in), so adapter_config.json names no \
             base_model_name_or_path: set it to that base exported with --format hf",
            out.display()
        );
    }
    crate::io::write_atomic(
        &out.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    // As TRL saves an adapter: with the tokenizer (and chat template) it trained with.
    crate::data::tokenizer::Tokenizer::load_dir(&dir)?.save_dir(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    /// A family named in the config that would drop NoPE layers or a sliding window is
    /// refused naming what it would drop.
    #[test]
    fn a_family_that_would_drop_layers_or_windows_names_them() {
        let tiny = ModelConfig::preset("tiny").unwrap();
        let nope = ModelConfig {
            nope_layers: vec![1],
            hf_family: Some(HfFamily::Llama),
            ..tiny.clone()
        };
        let e = family_of(&nope).unwrap_err().to_string();
        assert!(e.contains("nope_layers") && e.contains("llama"), "{e}");
        let window = ModelConfig {
            sliding_window: Some(8),
            full_attention_layers: vec![0],
            hf_family: Some(HfFamily::Mistral),
            ..tiny
        };
        let e = family_of(&window).unwrap_err().to_string();
        assert!(
            e.contains("sliding_window") && e.contains("full_attention_layers [0]"),
            "{e}"
        );
        let qwen = ModelConfig {
            hf_family: Some(HfFamily::Qwen3),
            ..window
        };
        assert_eq!(family_of(&qwen).unwrap(), HfFamily::Qwen3);
    }
}
