//! `temper export --format peft`: the LoRA adapters alone, under PEFT's names with its
//! `adapter_config.json`, for `PeftModel.from_pretrained` on the exported base.
//!
//! GPT-2's q, k and v share one Conv1D, `c_attn`, where temper gives each its own adapter.
//! PEFT holds them exactly as one adapter on `c_attn` of rank `n * r` (n of q, k, v adapted):
//! A stacks the n A's, and B is block-diagonal, each B in its projection's rows and its own
//! columns, so that `B A` is the three updates side by side. `rank_pattern` and
//! `alpha_pattern` give `c_attn` that rank and `n * lora_alpha` (`sqrt(n) * lora_alpha` under
//! rsLoRA), which keeps its scale.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::json;

use super::{check_range, family_of, layer_order, write_file, Dtype};
use crate::config::{HfFamily, LoraConfig, LoraTarget, ModelConfig};
use crate::data::tokenizer::Tokenizer;
use crate::model::hf;
use crate::model::linear::DORA_MAGNITUDE;
use crate::train::checkpoint::{resolve_checkpoint_for_model, CheckpointKind};
use crate::train::params::Net;

/// PEFT's name of temper's LoRA factor `name` (`model.layers.0.attn.q.lora_a`) in a
/// llama-like family; on a base of Gemma 3's image-and-text models (`within_images`), as
/// transformers 5 names its language model's modules (`model.language_model.layers.0...`),
/// where `PeftModel.from_pretrained` looks for them.
fn peft_name(name: &str, family: HfFamily, within_images: bool) -> Result<String> {
    let (module, factor) = split_factor(name)?;
    let hf_weight = hf::hf_name(family, &format!("{module}.weight"))?;
    let hf_module = hf_weight.trim_end_matches(".weight");
    let hf_module = match hf_module.strip_prefix("model.") {
        Some(rest) if within_images => format!("model.language_model.{rest}"),
        _ => hf_module.to_string(),
    };
    Ok(format!("base_model.model.{hf_module}.{factor}"))
}

/// `model.layers.0.attn.q.lora_a` -> (`model.layers.0.attn.q`, PEFT's `lora_A.weight`).
fn split_factor(name: &str) -> Result<(&str, &'static str)> {
    let (module, factor) = name
        .rsplit_once('.')
        .with_context(|| format!("{name}: not an adapter"))?;
    let peft = PEFT_FACTORS.iter().find(|(ours, _)| *ours == factor);
    match peft {
        Some((_, theirs)) => Ok((module, theirs)),
        None => bail!("{name}: not an adapter"),
    }
}

/// temper's adapter tensors and the name PEFT saves each under, after its module's: A, B and
/// DoRA's magnitude vector (saved without PEFT's `.weight`, as PEFT saves it).
const PEFT_FACTORS: [(&str, &str); 3] = [
    ("lora_a", "lora_A.weight"),
    ("lora_b", "lora_B.weight"),
    (DORA_MAGNITUDE, "lora_magnitude_vector"),
];

/// The q, k, v projections, in the order of their rows in GPT-2's `c_attn`.
const QKV: [(&str, LoraTarget); 3] = [
    ("q", LoraTarget::Q),
    ("k", LoraTarget::K),
    ("v", LoraTarget::V),
];

/// GPT-2's adapters under PEFT's names, q, k and v joined on `c_attn` (see the module's
/// comment), and how many of the three each layer's `c_attn` adapter joins.
fn gpt2_tensors(
    adapters: &HashMap<String, Tensor>,
    lora: &LoraConfig,
    model: &ModelConfig,
    base: &dyn Fn(&str) -> Result<Tensor>,
) -> Result<(HashMap<String, Tensor>, usize)> {
    let mut used = HashSet::new();
    let mut get = |name: String| {
        let t = adapters
            .get(&name)
            .cloned()
            .with_context(|| format!("{name}: missing from the checkpoint's adapters"));
        used.insert(name);
        t
    };
    let joined: Vec<&str> = QKV
        .iter()
        .filter(|(_, t)| lora.targets.contains(t))
        .map(|(w, _)| *w)
        .collect();
    let mut out = HashMap::new();
    for i in 0..model.num_hidden_layers {
        let pre = format!("model.layers.{i}");
        let peft = |module: &str, factor: &str| {
            format!("base_model.model.transformer.h.{i}.{module}.{factor}")
        };
        if !joined.is_empty() {
            let mut a = Vec::new();
            let mut b = HashMap::new();
            for w in &joined {
                a.push(get(format!("{pre}.attn.{w}.lora_a"))?);
                b.insert(*w, get(format!("{pre}.attn.{w}.lora_b"))?);
            }
            let zeros = Tensor::zeros((model.hidden_size, lora.rank), a[0].dtype(), &Device::Cpu)?;
            let rows = QKV
                .iter()
                .map(|(w, _)| {
                    let blocks: Vec<&Tensor> = joined
                        .iter()
                        .map(|j| b.get(w).filter(|_| j == w).unwrap_or(&zeros))
                        .collect();
                    Tensor::cat(&blocks, 1)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            out.insert(peft("attn.c_attn", "lora_A.weight"), Tensor::cat(&a, 0)?);
            out.insert(peft("attn.c_attn", "lora_B.weight"), Tensor::cat(&rows, 0)?);
            if lora.use_dora {
                // DoRA on c_attn rescales all of its rows: a projection temper did not adapt
                // keeps its rows' own lengths, which leave it as it is.
                let lengths = QKV
                    .iter()
                    .map(|(w, _)| match joined.contains(w) {
                        true => get(format!("{pre}.attn.{w}.{DORA_MAGNITUDE}")),
                        false => row_lengths(&base(&format!("{pre}.attn.{w}.weight"))?),
                    })
                    .collect::<Result<Vec<_>>>()?;
                let m = Tensor::cat(&lengths, 0)?;
                out.insert(peft("attn.c_attn", "lora_magnitude_vector"), m);
            }
        }
        for (ours, target) in [
            ("attn.o", LoraTarget::O),
            ("mlp.up", LoraTarget::Up),
            ("mlp.down", LoraTarget::Down),
        ] {
            if !lora.targets.contains(&target) {
                continue;
            }
            let conv = hf::gpt2_conv_of(ours).context("GPT-2's modules")?;
            for (factor, peft_factor) in PEFT_FACTORS {
                if factor == DORA_MAGNITUDE && !lora.use_dora {
                    continue;
                }
                let t = get(format!("{pre}.{ours}.{factor}"))?;
                out.insert(peft(conv, peft_factor), t);
            }
        }
    }
    let mut left: Vec<&String> = adapters.keys().filter(|n| !used.contains(*n)).collect();
    if !left.is_empty() {
        left.sort();
        bail!(
            "adapters its lora config (targets {:?}) does not account for: {left:?}",
            lora.targets
        );
    }
    Ok((out, joined.len()))
}

/// Each row's length, in f32: a DoRA magnitude that leaves its layer as it is.
fn row_lengths(w: &Tensor) -> Result<Tensor> {
    let w = w.to_dtype(candle_core::DType::F32)?;
    Ok(w.sqr()?.sum(1)?.sqrt()?)
}

/// The module a PEFT tensor name adapts, as `target_modules` names it: the projection
/// (`q_proj`), or for GPT-2 with its parent (`attn.c_proj`, which `mlp.c_proj` shares a name
/// with).
fn target_of(name: &str, family: HfFamily) -> Result<String> {
    let module = PEFT_FACTORS
        .iter()
        .find_map(|(_, theirs)| name.strip_suffix(&format!(".{theirs}")))
        .context("adapter name")?;
    let parts: Vec<&str> = module.rsplit('.').take(2).collect();
    Ok(match family {
        HfFamily::Gpt2 => format!("{}.{}", parts[1], parts[0]),
        _ => parts[0].to_string(),
    })
}

pub(super) fn peft(checkpoint: &Path, out: &Path, dtype: Dtype) -> Result<()> {
    if crate::stages::loader::reads_as_adapter(checkpoint) {
        bail!(
            "{}: already a PEFT adapter, which temper reads merged into its base: use it as it \
             is, or --format hf for the merged model",
            checkpoint.display()
        );
    }
    if hf::is_model_dir(checkpoint) {
        bail!(
            "{}: a Hugging Face model, which holds no LoRA adapters: --format peft writes a \
             temper LoRA run's",
            checkpoint.display()
        );
    }
    let dir = resolve_checkpoint_for_model(checkpoint)?;
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
    let within_images = meta
        .base
        .as_deref()
        .is_some_and(hf::is_gemma3_image_and_text);
    // Which of Gemma 3's layouts the factors go by is read from the base: one gone from disk
    // cannot say, and the text-only names are then a guess.
    let base_unread = meta
        .base
        .as_deref()
        .filter(|b| !b.join("config.json").is_file());
    if let (Some(b), HfFamily::Gemma3) = (base_unread, family) {
        crate::errln!(
            "warning: {}: the run's base is gone, so whether it is Gemma 3's image-and-text \
             model (whose language model PEFT names model.language_model.) cannot be read: the \
             adapter is named for the text-only model",
            b.display()
        );
    }
    let policy: HashMap<String, Tensor> = adapters
        .into_iter()
        .filter(|(n, _)| !n.starts_with(Net::Value.prefix()))
        .collect();
    let weights = dir.join("model.safetensors");
    // Read only for a GPT-2 DoRA adapter that leaves one of q, k, v out.
    let base = |name: &str| -> Result<Tensor> {
        // SAFETY: mapped read-only and the tensor copied out at once; temper never writes a
        // file it has mapped.
        let file = unsafe { candle_core::safetensors::MmapedSafetensors::new(&weights) }
            .with_context(|| format!("{}: cannot read", weights.display()))?;
        file.load(name, &Device::Cpu)
            .with_context(|| format!("{}: tensor {name}", weights.display()))
    };
    let (tensors, joined) = match family {
        HfFamily::Gpt2 => gpt2_tensors(&policy, lora, &meta.model, &base)?,
        _ => {
            let named = policy
                .iter()
                .map(|(name, t)| Ok((peft_name(name, family, within_images)?, t.clone())));
            (named.collect::<Result<_>>()?, 0)
        }
    };
    let mut modules = tensors
        .keys()
        .map(|n| target_of(n, family))
        .collect::<Result<Vec<_>>>()?;
    modules.sort();
    modules.dedup();
    // A list of projection names would put adapters on the vision tower's q_proj, k_proj and
    // v_proj too: PEFT reads a string as one regular expression over the whole module name.
    let targets = match within_images {
        true => json!(format!(
            r"(.*\.)?language_model\..*\.({})",
            modules.join("|")
        )),
        false => json!(modules),
    };
    check_range(&tensors, dtype)?;
    let mut names: Vec<&String> = tensors.keys().collect();
    layer_order(&mut names);
    write_file(
        &out.join("adapter_model.safetensors"),
        &names,
        &tensors,
        dtype,
    )?;
    let (mut ranks, mut alphas) = (json!({}), json!({}));
    if joined > 1 {
        // The joined adapter's scale must stay the one each part trained under.
        let n = joined as f64;
        ranks["attn.c_attn"] = json!(joined * lora.rank);
        alphas["attn.c_attn"] = json!(match lora.use_rslora {
            true => n.sqrt() * lora.alpha,
            false => n * lora.alpha,
        });
    }
    // A base from the Hub cache by its Hub name (and its commit, where that is not main's),
    // which loads on any machine.
    let hub = meta
        .base
        .as_deref()
        .and_then(crate::hub_cache::repo_of_snapshot);
    let (base, revision) = match (hub, meta.base.as_deref()) {
        (Some((name, rev)), _) => (Some(name), rev),
        (None, b) => (b.map(|b| b.display().to_string()), None),
    };
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "use_rslora": lora.use_rslora,
        "use_dora": lora.use_dora,
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "lora_dropout": lora.dropout,
        "target_modules": targets,
        "bias": "none",
        // PEFT sets it for GPT-2's Conv1D layers whatever the file says, with a warning.
        "fan_in_fan_out": family == HfFamily::Gpt2,
        "inference_mode": true,
        "base_model_name_or_path": base,
        "revision": revision,
    });
    if meta.base.is_none() {
        crate::errln!(
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
    // As TRL saves an adapter: with the tokenizer (and chat template) it trained with; the
    // byte tokenizer as the tokenizer.json an hf export of its base carries.
    let tokenizer = Tokenizer::load_dir(&dir)?;
    if matches!(tokenizer, Tokenizer::Bytes) {
        let json = crate::data::tokenizer::byte_level_json()?;
        crate::io::write_atomic(&out.join("tokenizer.json"), json.as_bytes())?;
    }
    tokenizer.save_dir(out)
}
