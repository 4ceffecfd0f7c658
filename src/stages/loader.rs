//! Building models from checkpoints. Adapters found in a checkpoint are merged into its base
//! weights (`W + s * B A`), so a stage that adds LoRA on top of a LoRA-trained model gets the
//! trained model as its frozen base, and `export --merge` is the same operation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::data::tokenizer::Tokenizer;
use crate::model::{LoraConfig, ScalarHead, Transformer};
use crate::train::checkpoint::{resolve_checkpoint, CheckpointMeta};
use crate::train::params::ParamStore;
use crate::train::runner::is_adapter;

pub struct Loaded {
    pub dir: PathBuf,
    pub meta: CheckpointMeta,
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer: Tokenizer,
}

/// Reads a checkpoint (or a run directory's final/latest one) with adapters merged.
pub fn read_checkpoint(path: &Path, device: &Device) -> Result<Loaded> {
    let dir = resolve_checkpoint(path)?;
    let meta = CheckpointMeta::read(&dir)?;
    let file = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, device)
        .with_context(|| format!("{}: cannot read weights", file.display()))?;
    let adapter = dir.join("adapter.safetensors");
    if adapter.exists() {
        let Some(lora) = &meta.lora else {
            bail!(
                "{}: adapters present but meta.json names no LoRA config",
                dir.display()
            );
        };
        let ad = candle_core::safetensors::load(&adapter, device)
            .with_context(|| format!("{}: cannot read adapters", adapter.display()))?;
        merge_adapters(&mut tensors, &ad, lora.scale())
            .with_context(|| format!("{}: cannot merge adapters", adapter.display()))?;
    }
    let tokenizer = Tokenizer::load_dir(&dir)?;
    Ok(Loaded {
        dir,
        meta,
        tensors,
        tokenizer,
    })
}

/// `W <- W + scale * B A` for every `X.lora_a` / `X.lora_b` pair.
pub fn merge_adapters(
    base: &mut HashMap<String, Tensor>,
    adapters: &HashMap<String, Tensor>,
    scale: f64,
) -> Result<()> {
    for (name, a) in adapters.iter().filter(|(n, _)| n.ends_with(".lora_a")) {
        let stem = name.trim_end_matches(".lora_a");
        let b = adapters
            .get(&format!("{stem}.lora_b"))
            .with_context(|| format!("{stem}.lora_b missing"))?;
        let wname = format!("{stem}.weight");
        let w = base
            .get(&wname)
            .with_context(|| format!("{wname} missing"))?;
        let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
        let merged = (w.to_dtype(DType::F32)? + delta)?;
        base.insert(wname, merged);
    }
    Ok(())
}

/// Sets every non-adapter parameter of `store` under `store_prefix` from `tensors` (names
/// without the prefix), checking that each exists with the right shape.
pub fn fill_store(
    store: &ParamStore,
    store_prefix: &str,
    tensors: &HashMap<String, Tensor>,
    dir: &Path,
) -> Result<()> {
    for (name, var) in store.iter() {
        if is_adapter(name) {
            continue;
        }
        let Some(src) = name.strip_prefix(store_prefix) else {
            continue;
        };
        let Some(t) = tensors.get(src) else {
            bail!(
                "{}: has no tensor {src} (a checkpoint of a different model or kind?)",
                dir.display()
            );
        };
        if t.dims() != var.dims() {
            bail!(
                "{}: tensor {src} has shape {:?}, expected {:?} (a checkpoint of a different model?)",
                dir.display(),
                t.dims(),
                var.dims()
            );
        }
        var.set(&t.to_dtype(DType::F32)?)?;
    }
    Ok(())
}

/// A policy (transformer + LM head) from a `policy` checkpoint, with fresh adapters when
/// `lora` is enabled.
pub fn policy_from(
    loaded: &Loaded,
    store: &mut ParamStore,
    prefix: &str,
    lora: Option<&LoraConfig>,
) -> Result<Transformer> {
    loaded.meta.expect_kind(&loaded.dir, "policy")?;
    let net = Transformer::new(store, prefix, &loaded.meta.model, lora)?;
    fill_store(store, "", &loaded.tensors, &loaded.dir)?;
    Ok(net)
}

/// A transformer + scalar head from a `reward` checkpoint, or (with `from_policy`) from a
/// policy checkpoint with a fresh head. Parameters live under `store_prefix` (e.g. `value.`).
pub fn scored_from(
    loaded: &Loaded,
    store: &mut ParamStore,
    store_prefix: &str,
    lora: Option<&LoraConfig>,
    from_policy: bool,
) -> Result<(Transformer, ScalarHead)> {
    let want = if from_policy { "policy" } else { "reward" };
    loaded.meta.expect_kind(&loaded.dir, want)?;
    let net = Transformer::new(
        store,
        &format!("{store_prefix}model"),
        &loaded.meta.model,
        lora,
    )?;
    let zero_head = from_policy && store_prefix == "value.";
    let head = ScalarHead::new(
        store,
        &format!("{store_prefix}score"),
        loaded.meta.model.hidden_size,
        zero_head,
    )?;
    if from_policy {
        // The fresh head keeps its init; everything else comes from the policy.
        for (name, var) in store.iter() {
            let Some(src) = name.strip_prefix(store_prefix) else {
                continue;
            };
            if is_adapter(name) || src.starts_with("score.") {
                continue;
            }
            let t = loaded
                .tensors
                .get(src)
                .with_context(|| format!("{}: has no tensor {src}", loaded.dir.display()))?;
            if t.dims() != var.dims() {
                bail!("{}: tensor {src} has the wrong shape", loaded.dir.display());
            }
            var.set(&t.to_dtype(DType::F32)?)?;
        }
    } else {
        fill_store(store, store_prefix, &loaded.tensors, &loaded.dir)?;
    }
    Ok((net, head))
}
