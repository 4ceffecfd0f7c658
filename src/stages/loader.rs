//! Building models from checkpoints. Adapters found in a checkpoint are merged into its base
//! weights (`W + s * B A`), so a stage that adds LoRA on top of a LoRA-trained model gets the
//! trained model as its frozen base, and `export --merge` is the same operation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::reward::Scorer;
use crate::config::LoraConfig;
use crate::data::tokenizer::Tokenizer;
use crate::model::{ScalarHead, Transformer};
use crate::train::checkpoint::{resolve_checkpoint, CheckpointKind, CheckpointMeta};
use crate::train::params::{set_checked, Net, ParamStore, Role};

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

/// Sets every base and head parameter of network `net` in `store` from `tensors` (named as
/// inside the network), checking that each exists with the right shape. With `skip_heads`, the
/// heads keep their fresh init (a value model started from a policy).
pub fn fill_store(
    store: &ParamStore,
    net: Net,
    tensors: &HashMap<String, Tensor>,
    dir: &Path,
    skip_heads: bool,
) -> Result<()> {
    for (name, var, info) in store.net(net) {
        if info.role == Role::Adapter || (skip_heads && info.role == Role::Head) {
            continue;
        }
        let Some(t) = tensors.get(name) else {
            bail!(
                "{}: has no tensor {name} (a checkpoint of a different model or kind?)",
                dir.display()
            );
        };
        set_checked(var, t, name, dir)?;
    }
    Ok(())
}

/// A policy (transformer + LM head) from a `policy` checkpoint, with fresh adapters when
/// `lora` is enabled.
pub fn policy_from(
    loaded: &Loaded,
    store: &mut ParamStore,
    lora: Option<&LoraConfig>,
) -> Result<Transformer> {
    loaded
        .meta
        .expect_kind(&loaded.dir, CheckpointKind::Policy)?;
    let net = Transformer::new(&mut store.scope(Net::Policy), &loaded.meta.model, lora)?;
    fill_store(store, Net::Policy, &loaded.tensors, &loaded.dir, false)?;
    Ok(net)
}

/// A transformer + scalar head from a `reward` checkpoint, or (with `from_policy`) from a
/// policy checkpoint with a fresh head, as network `net` of `store`.
pub fn scored_from(
    loaded: &Loaded,
    store: &mut ParamStore,
    net: Net,
    lora: Option<&LoraConfig>,
    from_policy: bool,
) -> Result<Scorer> {
    let want = if from_policy {
        CheckpointKind::Policy
    } else {
        CheckpointKind::Reward
    };
    loaded.meta.expect_kind(&loaded.dir, want)?;
    let mut scope = store.scope(net);
    let body = Transformer::new(&mut scope, &loaded.meta.model, lora)?;
    // A fresh value head starts at zero, so the first advantages are the returns themselves.
    let zero_head = from_policy && net == Net::Value;
    let head = ScalarHead::load(scope.pp("score"), loaded.meta.model.hidden_size, zero_head)?;
    fill_store(store, net, &loaded.tensors, &loaded.dir, from_policy)?;
    Ok(Scorer { net: body, head })
}
