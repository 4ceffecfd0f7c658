//! Building models from checkpoints. Adapters found in a checkpoint are merged into its base
//! weights (`W + s * B A`), so a stage that adds LoRA on top of a LoRA-trained model gets the
//! trained model as its frozen base; `export` merges them the same way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::reward::Scorer;
use crate::config::{LoraConfig, Stage};
use crate::data::chat_template::{special_tokens_in, ChatTemplate};
use crate::data::tokenizer::Tokenizer;
use crate::model::{hf, ScalarHead, Transformer};
use crate::train::checkpoint::{
    resolve_checkpoint, resolve_checkpoint_for_model, CheckpointKind, CheckpointMeta,
};
use crate::train::params::{set_checked, Net, ParamStore, Role};

pub struct Loaded {
    pub dir: PathBuf,
    pub meta: CheckpointMeta,
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer: Tokenizer,
    /// Where the tokenizer's files (and a chat template's tokenizer_config.json) are: `dir`,
    /// or a PEFT adapter's base model.
    pub tokenizer_dir: PathBuf,
}

/// Reads a checkpoint (or a run directory's final/latest one) with adapters merged, or a
/// Hugging Face model directory (imported as a pretrained policy, or as a reward model where
/// it is a one-label `*ForSequenceClassification`).
pub fn read_checkpoint(path: &Path, device: &Device) -> Result<Loaded> {
    if hf::is_model_dir(path) {
        if hf::is_peft_dir(path) {
            crate::errln!(
                "warning: {}: holds a model and a PEFT adapter: temper reads the model and \
                 ignores the adapter, where transformers with peft installed loads the adapter",
                path.display()
            );
        }
        require_tokenizer(path)?;
        return import_hf(path, device);
    }
    if hf::is_peft_dir(path) {
        return import_peft(path, device);
    }
    let dir = resolve_checkpoint_for_model(path)?;
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
        let magnitudes = ad
            .keys()
            .any(|n| n.ends_with(crate::model::linear::DORA_MAGNITUDE));
        if magnitudes != lora.use_dora {
            bail!(
                "{}: meta.json's lora config has use_dora = {}, but the file holds {} \
                 (damaged, or from another run?)",
                adapter.display(),
                lora.use_dora,
                match magnitudes {
                    true => "DoRA magnitudes",
                    false => "no DoRA magnitudes",
                }
            );
        }
        merge_adapters(&mut tensors, &ad, lora.scale())
            .with_context(|| format!("{}: cannot merge adapters", adapter.display()))?;
    }
    let tokenizer = Tokenizer::load_dir(&dir)?;
    Ok(Loaded {
        tokenizer_dir: dir.clone(),
        dir,
        meta,
        tensors,
        tokenizer,
    })
}

/// Without its tokenizer a model would read the byte-level ids of a run from scratch: wrong
/// ids, and nothing would say so.
fn require_tokenizer(dir: &Path) -> Result<()> {
    if !dir.join(crate::data::tokenizer::FILE_NAME).is_file() {
        bail!(
            "{}: no tokenizer.json: temper reads a Hugging Face model's tokenizer from it (for a \
             model with a SentencePiece tokenizer.model only, transformers writes one: \
             AutoTokenizer.from_pretrained(dir).save_pretrained(dir))",
            dir.display()
        );
    }
    Ok(())
}

/// The model `path` (what `--init` names) holds, read from its config alone: a temper
/// checkpoint's meta.json, a Hugging Face model's config.json, a PEFT adapter's base's.
pub fn model_of(path: &Path) -> Result<crate::config::ModelConfig> {
    if hf::is_model_dir(path) {
        return Ok(hf::model_config(path)?.2);
    }
    if hf::is_peft_dir(path) {
        return Ok(hf::model_config(&hf::peft_base(path)?)?.2);
    }
    Ok(CheckpointMeta::read(&resolve_checkpoint(path)?)?.model)
}

fn import_hf(dir: &Path, device: &Device) -> Result<Loaded> {
    let imp = hf::import(dir, device)?;
    let tokenizer = Tokenizer::load_dir(dir)?;
    check_vocab(dir, &tokenizer, &imp.config)?;
    let (stage, kind) = match imp.head {
        hf::Head::Lm => (Stage::Pretrain, CheckpointKind::Policy),
        hf::Head::Score => (Stage::Reward, CheckpointKind::Reward),
    };
    Ok(Loaded {
        dir: dir.to_path_buf(),
        tokenizer_dir: dir.to_path_buf(),
        meta: CheckpointMeta {
            stage,
            kind,
            model: imp.config,
            lora: None,
            step: 0,
            base: None,
        },
        tensors: imp.tensors,
        tokenizer,
    })
}

fn check_vocab(dir: &Path, tokenizer: &Tokenizer, cfg: &crate::config::ModelConfig) -> Result<()> {
    if tokenizer.vocab_size() > cfg.vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens but the model's vocab_size is {}",
            dir.display(),
            tokenizer.vocab_size(),
            cfg.vocab_size
        );
    }
    Ok(())
}

/// A PEFT adapter on its Hugging Face base (`base_model_name_or_path`, relative to the
/// current directory or to the adapter's), merged: the adapted model as a pretrained policy,
/// or for a reward adapter (TRL's LoRA reward models: task type `SEQ_CLS`, or none beside a
/// saved score head) as a reward model with the adapter's score head.
fn import_peft(dir: &Path, device: &Device) -> Result<Loaded> {
    let adapter = hf::read_peft(dir, device)?;
    let base = &adapter.base;
    // TRL saves the tokenizer beside the adapter; the base's serves where it did not.
    if !dir.join(crate::data::tokenizer::FILE_NAME).is_file() {
        require_tokenizer(base)?;
    }
    let mut loaded = import_hf(base, device)?;
    // Each B already carries its module's scale.
    merge_adapters(&mut loaded.tensors, &adapter.tensors, 1.0).with_context(|| {
        format!(
            "{}: cannot merge the adapter into {}",
            dir.display(),
            base.display()
        )
    })?;
    // TRL saves the tokenizer it trained with beside the adapter, chat template and all; a
    // reward adapter's padding id is the one its classifier was trained to pass over.
    if dir.join("tokenizer.json").is_file() {
        loaded.tokenizer = Tokenizer::load_adapter_dir(dir, base)?;
        loaded.tokenizer_dir = dir.to_path_buf();
        check_vocab(dir, &loaded.tokenizer, &loaded.meta.model)?;
        // An adapter's tokenizer without a template renders with its base's
        // ([`template_of`]): carried in its files, so that what is written from it (an
        // export, a run's checkpoints) renders as it was rendered.
        if ChatTemplate::in_dir(dir)?.is_none() {
            if let Some(t) = ChatTemplate::in_dir(base)? {
                let (bos, eos) = t.special_tokens();
                loaded.tokenizer = (loaded.tokenizer)
                    .with_chat_template(t.source(), t.tool_use_source())
                    .with_template_tokens(bos, eos);
            }
        }
    }
    if adapter.head == hf::Head::Score {
        let file = dir.join("adapter_model.safetensors");
        classifier_from(&mut loaded, &adapter.score)
            .with_context(|| format!("{}: the score head", file.display()))?;
    }
    loaded.dir = dir.to_path_buf();
    Ok(loaded)
}

/// Whether [`read_checkpoint`] reads `path` as a PEFT adapter: one beside a model's own
/// weights is passed over for them.
pub fn reads_as_adapter(path: &Path) -> bool {
    hf::is_peft_dir(path) && !hf::is_model_dir(path)
}

/// The chat template of the model at `path` (a Hugging Face model directory, a PEFT adapter,
/// a temper checkpoint or run directory), where transformers would find it (see
/// [`ChatTemplate::in_dir`]); an adapter's own, else its base model's. None where it has
/// none, or where `path` is no model (reading it says why).
pub fn template_of(path: &Path) -> Result<Option<ChatTemplate>> {
    if reads_as_adapter(path) {
        return match ChatTemplate::in_dir(path)? {
            Some(t) => Ok(Some(t)),
            None => match hf::peft_base(path) {
                Ok(base) => ChatTemplate::in_dir(&base),
                Err(_) => Ok(None),
            },
        };
    }
    if hf::is_model_dir(path) {
        return ChatTemplate::in_dir(path);
    }
    match resolve_checkpoint(path) {
        Ok(dir) => ChatTemplate::in_dir(&dir),
        Err(_) => Ok(None),
    }
}

/// The `bos_token` and `eos_token` of the tokenizer the model at `path` is read with (see
/// [`template_of`] for where that is), which a template from a bare Jinja file renders;
/// empty where none is found.
pub fn model_tokens(path: &Path) -> Result<(String, String)> {
    // A PEFT adapter's own tokenizer where it has one, as [`import_peft`] reads it.
    let dir = if reads_as_adapter(path) {
        match path.join(crate::data::tokenizer::FILE_NAME).is_file() {
            true => path.to_path_buf(),
            false => match hf::peft_base(path) {
                Ok(base) => base,
                Err(_) => return Ok(Default::default()),
            },
        }
    } else if hf::is_model_dir(path) {
        path.to_path_buf()
    } else {
        match resolve_checkpoint(path) {
            Ok(dir) => dir,
            Err(_) => return Ok(Default::default()),
        }
    };
    // The tokenizer itself is read only where no config names the tokens.
    let unnamed = !dir.join("tokenizer_config.json").is_file();
    match unnamed && dir.join(crate::data::tokenizer::FILE_NAME).is_file() {
        true => template_tokens(&dir, &Tokenizer::load_dir(&dir)?),
        false => special_tokens_in(&dir),
    }
}

/// The `bos_token` and `eos_token` a bare template renders for tokenizer `tok` read from
/// `dir`: its tokenizer config's, or where it has none (a `tokenizer train` tokenizer, a run
/// begun from one), the tokenizer's own BOS and EOS, which the run's exports name there.
pub fn template_tokens(dir: &Path, tok: &Tokenizer) -> Result<(String, String)> {
    if dir.join("tokenizer_config.json").is_file() || tok.is_bytes() {
        return special_tokens_in(dir);
    }
    let (bos, eos) = tok.bos_eos_names();
    Ok((bos.unwrap_or_default(), eos.unwrap_or_default()))
}

/// `loaded` (a causal LM or a classifier) as the one-label classifier a reward adapter makes
/// of it: no LM head, `score` (Hugging Face names) as its reward head, and scored where it
/// was trained to be: at the last token that is not the padding id TRL's RewardTrainer gives
/// the classifier before it trains (the tokenizer's `pad_token`, else its EOS), whatever the
/// base config said.
fn classifier_from(loaded: &mut Loaded, score: &HashMap<String, Tensor>) -> Result<()> {
    let cfg = &mut loaded.meta.model;
    loaded.tensors.remove("lm_head.weight");
    cfg.tie_word_embeddings = true;
    cfg.score_pad = Some(loaded.tokenizer.named_pad_or_eos());
    let hidden = cfg.hidden_size;
    loaded.tensors.remove("score.bias");
    for (name, t) in score {
        let (ours, t) = hf::score_to_temper(name, t, hidden)?;
        loaded.tensors.insert(ours, t);
    }
    hf::fill_score_bias(&mut loaded.tensors, 0.0)?;
    loaded.meta.stage = Stage::Reward;
    loaded.meta.kind = CheckpointKind::Reward;
    Ok(())
}

/// `W <- W + scale * B A` for every `X.lora_a` / `X.lora_b` pair, under DoRA (an
/// `X.lora_magnitude` beside them) with its rows rescaled by
/// [`crate::model::linear::dora_rescaled`].
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
        // An adapter of another model (a base of another size or family) fits no weight: said
        // by the weight and the shapes, not by the matmul that would fail on them.
        let (out_dim, in_dim) = w.dims2()?;
        let (b_rows, rank_b) = b.dims2()?;
        let (rank_a, a_cols) = a.dims2()?;
        if (b_rows, a_cols, rank_a) != (out_dim, in_dim, rank_b) {
            bail!(
                "{stem}: the adapter's B [{b_rows}, {rank_b}] and A [{rank_a}, {a_cols}] do not \
                 fit the base's weight [{out_dim}, {in_dim}]: an adapter of another model \
                 (check its base_model_name_or_path)"
            );
        }
        let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
        let mut merged = (w.to_dtype(DType::F32)? + delta)?;
        if let Some(m) = adapters.get(&format!("{stem}.{}", crate::model::linear::DORA_MAGNITUDE)) {
            merged = crate::model::linear::dora_rescaled(&merged, m)?;
        }
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
    crate::model::linear::init_dora_magnitudes(store, net)
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
    // A tensor the model has no place for means the file is of another shape of model
    // (PPO's checkpoints also hold their critic, under `value.`).
    let mut extra: Vec<&String> = loaded
        .tensors
        .keys()
        .filter(|n| !n.starts_with(Net::Value.prefix()) && store.get(n).is_none())
        .collect();
    extra.sort();
    if let Some(n) = extra.first() {
        bail!(
            "{}: tensor {n} has no place in a model of this config ({} such tensors)",
            loaded.dir.display(),
            extra.len()
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A bare template renders the tokenizer config's special tokens, and where a tokenizer has
    /// no config (one `tokenizer train` wrote), its own EOS.
    #[test]
    fn a_bare_template_takes_the_tokenizers_tokens_without_a_config() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/gpt2");
        let d = tempfile::tempdir().unwrap();
        std::fs::copy(
            fixture.join("tokenizer.json"),
            d.path().join("tokenizer.json"),
        )
        .unwrap();
        let bare = Tokenizer::load_dir(d.path()).unwrap();
        let (_, eos) = template_tokens(d.path(), &bare).unwrap();
        assert_eq!(eos, "<|endoftext|>");
        let cfg = serde_json::json!({"bos_token": "<|endoftext|>", "eos_token": "[E]"});
        std::fs::write(d.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        assert_eq!(
            template_tokens(d.path(), &bare).unwrap(),
            ("<|endoftext|>".to_string(), "[E]".to_string())
        );
        assert_eq!(model_tokens(&fixture).unwrap().1, "<|endoftext|>");
    }

    /// An adapter whose factors fit no weight of the base (one of another model) is refused
    /// naming the module and the shapes; one that fits adds `scale B A`.
    #[test]
    fn an_adapter_that_does_not_fit_its_base_says_so() {
        let dev = Device::Cpu;
        let t = |rows: usize, cols: usize, v: f32| Tensor::full(v, (rows, cols), &dev).unwrap();
        let mut base = HashMap::from([("l.q.weight".to_string(), t(4, 3, 1.0))]);
        let fits = HashMap::from([
            ("l.q.lora_a".to_string(), t(2, 3, 0.5)),
            ("l.q.lora_b".to_string(), t(4, 2, 1.0)),
        ]);
        merge_adapters(&mut base, &fits, 2.0).unwrap();
        let w = base["l.q.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(w.iter().all(|&x| x == 3.0), "1 + 2 x (2 x 0.5): {w:?}");
        let other = HashMap::from([
            ("l.q.lora_a".to_string(), t(2, 5, 0.5)),
            ("l.q.lora_b".to_string(), t(4, 2, 1.0)),
        ]);
        let e = merge_adapters(&mut base, &other, 1.0)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "l.q: the adapter's B [4, 2] and A [2, 5] do not fit the base's weight [4, 3]: an \
             adapter of another model (check its base_model_name_or_path)"
        );
    }
}
