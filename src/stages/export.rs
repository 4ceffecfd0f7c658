//! `temper export`: a checkpoint (or run directory) written as a temper checkpoint with its
//! adapters merged, as a Hugging Face model directory that
//! `transformers.AutoModelForCausalLM.from_pretrained` loads as it is (a reward model:
//! `AutoModelForSequenceClassification`, one label, as TRL's RewardTrainer saves one), or as a
//! PEFT adapter directory for `PeftModel.from_pretrained` on the exported base.
//!
//! A Hugging Face directory's weights are written as transformers' `save_pretrained` writes
//! them: in the `--dtype` asked for, named in config.json, and past `--max-shard-size` split
//! into `model-0000K-of-0000N.safetensors` with a `model.safetensors.index.json`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::loader::{read_checkpoint, Loaded};
use crate::config::HfFamily;
use crate::data::tokenizer::{byte_level_json, ids_field, Tokenizer, GENERATION_CONFIG};
use crate::model::hf;
use crate::train::checkpoint::{resolve_checkpoint, CheckpointKind};
use crate::train::params::Net;

mod peft;

/// What `export` writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A temper checkpoint, adapters merged into the base weights.
    #[default]
    Temper,
    /// A Hugging Face model directory (adapters merged).
    Hf,
    /// The LoRA adapters alone, with PEFT's names and `adapter_config.json`, beside the
    /// tokenizer they trained with.
    Peft,
}

/// The type a Hugging Face or PEFT export writes its weights in.
///
/// f32 is the default: temper trains f32 master weights (bf16 is its compute type on a GPU,
/// not its weights' type), so an f32 export holds exactly what was trained, and `--init` from
/// it continues from the same weights. bf16 halves the files and is what transformers 5
/// saves after TRL trains a bf16 model as loaded (its `dtype="auto"`), but it rounds every
/// weight to 8 bits of mantissa: a fine-tuning update smaller than that rounding (most of one
/// at a learning rate of 1e-5) is lost, so it is asked for, not assumed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    /// The f32 weights temper trains, unrounded.
    #[default]
    F32,
    /// bfloat16: half the size, f32's range, 8 bits of mantissa.
    Bf16,
    /// float16: half the size, 11 bits of mantissa, magnitudes up to 65504.
    F16,
}

impl Dtype {
    fn candle(self) -> DType {
        match self {
            Dtype::F32 => DType::F32,
            Dtype::Bf16 => DType::BF16,
            Dtype::F16 => DType::F16,
        }
    }

    /// Its name in config.json (`dtype`, and `torch_dtype` before transformers 4.56).
    pub fn torch_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::Bf16 => "bfloat16",
            Dtype::F16 => "float16",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }
}

/// `save_pretrained`'s default `max_shard_size` in transformers 5 ("50GB"; 4.x had "5GB").
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 50_000_000_000;

/// A shard size as transformers takes `max_shard_size`: a number and a unit, KB, MB, GB or TB
/// in powers of 1000 as huggingface_hub reads them (any case, a fraction allowed: "1.5GB"),
/// or KiB, MiB, GiB or TiB in powers of 1024 as transformers' own `convert_file_size_to_int`
/// reads them; a bare whole number is bytes, as transformers takes an int.
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = (t[..split].trim(), &t[split..]);
    let scale: u64 = match unit.to_ascii_uppercase().as_str() {
        "" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        "TIB" => 1 << 40,
        _ => return Err(format!(
            "unit `{unit}`: KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 5GB, 500MB, 2GiB"
        )),
    };
    let bytes = match (
        unit.is_empty(),
        number.parse::<u64>(),
        number.parse::<f64>(),
    ) {
        (_, Ok(n), _) => n.checked_mul(scale),
        (false, _, Ok(x)) if x.is_finite() && x >= 0.0 => Some((x * scale as f64) as u64),
        _ => {
            return Err(format!(
                "`{t}`: a size is a number and a unit, e.g. 5GB, 500MB, 2GiB (a bare number: bytes)"
            ))
        }
    };
    match bytes {
        Some(0) => Err(format!("`{t}`: a shard holds at least one byte")),
        Some(b) => Ok(b),
        None => Err(format!("`{t}`: too large")),
    }
}

/// What `export` writes, and how.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub format: Format,
    /// Write into an `out` that already holds files (never the checkpoint's own directory,
    /// or one holding it).
    pub overwrite: bool,
    /// The weights' type (hf and peft); f32 where not given.
    pub dtype: Option<Dtype>,
    /// Bytes of tensors in one file at most (hf); [`DEFAULT_MAX_SHARD_SIZE`] where not given.
    pub max_shard_size: Option<u64>,
}

/// Writes the export and says what it wrote (format, type, files), for the user.
pub fn export(checkpoint: &Path, out: &Path, opts: &Options) -> Result<String> {
    let format = opts.format;
    if let (Some(d), Format::Temper) = (opts.dtype, format) {
        if d != Dtype::F32 {
            bail!(
                "--dtype {}: a temper checkpoint keeps the f32 weights training resumes from; \
                 give --format hf or peft for {} weights",
                d.name(),
                d.name()
            );
        }
    }
    if opts.max_shard_size.is_some() && format != Format::Hf {
        bail!("--max-shard-size applies to --format hf (a temper checkpoint and a PEFT adapter are one file each)");
    }
    check_out(checkpoint, out, opts.overwrite)?;
    if out.is_file() {
        bail!(
            "--out {}: a file, where the export's directory goes",
            out.display()
        );
    }
    // The directories this export makes, `out` first: those it leaves empty (its checkpoint
    // did not read) go again.
    let made: Vec<&Path> = out.ancestors().take_while(|d| !d.exists()).collect();
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let earlier = earlier_export_files(out);
    let written = write(checkpoint, out, opts);
    if written.is_err() {
        for dir in made {
            if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none()) {
                let _ = std::fs::remove_dir(dir);
            }
        }
        return written;
    }
    // An adapter goes beside what is there: a PEFT export over a model's directory removes
    // none of the model (said below), as an earlier adapter export's files are all rewritten.
    if format != Format::Peft {
        remove_earlier_export(out, &earlier)?;
    }
    written
}

/// Whether `name` (relative to an export's directory) is a file some export of temper's
/// writes: the weights of any format, their configs, and the tokenizer's files.
fn is_export_file(name: &str) -> bool {
    const NAMES: [&str; 11] = [
        "meta.json",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        crate::data::chat_template::TEMPLATE_FILE,
        "adapter_config.json",
        "adapter_model.safetensors",
        hf::WEIGHTS,
        hf::WEIGHTS_INDEX,
    ];
    let template_dir = format!("{}/", crate::data::chat_template::NAMED_TEMPLATES_DIR);
    NAMES.contains(&name)
        || is_shard_name(name)
        || name
            .strip_prefix(&template_dir)
            .is_some_and(|n| n.ends_with(".jinja"))
}

/// A file's identity and contents' stamp: one written again (replaced, or rewritten in place)
/// differs.
type Stamp = (u64, u64, Option<std::time::SystemTime>, u64);

/// The export files `out` holds before an export writes there, each with its [`Stamp`].
fn earlier_export_files(out: &Path) -> Vec<(String, Stamp)> {
    use std::os::unix::fs::MetadataExt;
    let template_dir = out.join(crate::data::chat_template::NAMED_TEMPLATES_DIR);
    let listed = |dir: &Path| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect::<Vec<_>>()
    };
    let mut files = listed(out);
    files.extend(listed(&template_dir));
    files
        .into_iter()
        .filter_map(|p| {
            let name = p.strip_prefix(out).ok()?.to_str()?.to_string();
            let m = std::fs::symlink_metadata(&p).ok()?;
            (m.is_file() && is_export_file(&name))
                .then(|| (name, (m.dev(), m.ino(), m.modified().ok(), m.len())))
        })
        .collect()
}

/// Removes the files of an earlier export (`earlier`, as [`earlier_export_files`] found them)
/// that this one did not write again: left, they described another model beside this one's
/// weights (an earlier hf export's config.json and shards beside a temper checkpoint, read as
/// a model with none of its weights; a `meta.json` that has temper read the directory as its
/// own checkpoint; another model's tokenizer). Each is said.
fn remove_earlier_export(out: &Path, earlier: &[(String, Stamp)]) -> Result<()> {
    let now: std::collections::HashMap<String, Stamp> =
        earlier_export_files(out).into_iter().collect();
    let mut removed = Vec::new();
    for (name, stamp) in earlier {
        if now.get(name) == Some(stamp) {
            let path = out.join(name);
            std::fs::remove_file(&path)
                .with_context(|| format!("{}: cannot remove", path.display()))?;
            removed.push(name.as_str());
        }
    }
    if !removed.is_empty() {
        errln!(
            "note: {}: removed an earlier export's files this one does not write: {}",
            out.display(),
            removed.join(", ")
        );
    }
    Ok(())
}

/// [`export`]'s writing into `out`, which is there.
fn write(checkpoint: &Path, out: &Path, opts: &Options) -> Result<String> {
    let (format, dtype) = (opts.format, opts.dtype.unwrap_or_default());
    match format {
        Format::Temper => temper(checkpoint, out).map(|()| "temper checkpoint".into()),
        Format::Hf => {
            let max = opts.max_shard_size.unwrap_or(DEFAULT_MAX_SHARD_SIZE);
            let files = hf_dir(checkpoint, out, dtype, max)?;
            let files = match files {
                1 => "one file".to_string(),
                n => format!("{n} shards"),
            };
            Ok(format!("Hugging Face model, {}, {files}", dtype.name()))
        }
        Format::Peft => {
            peft::peft(checkpoint, out, dtype)?;
            if hf::is_model_dir(out) || out.join("meta.json").is_file() {
                errln!(
                    "warning: {}: holds a model's weights beside the adapter (left there): \
                     temper would read that model and ignore the adapter, where transformers \
                     with peft installed loads the adapter; export the adapter into a \
                     directory of its own",
                    out.display()
                );
            }
            Ok(format!("PEFT adapter, {}", dtype.name()))
        }
    }
}

/// An `out` that holds files is refused unless `overwrite` says to write into it; one that is
/// or holds the checkpoint being read always is: the export would replace the files it reads
/// (or mix its own into a run directory) and a failure halfway would leave neither whole.
fn check_out(checkpoint: &Path, out: &Path, overwrite: bool) -> Result<()> {
    // The checkpoint read (a run's final/ or latest checkpoint), and the directory given.
    let resolved_read = resolve_checkpoint(checkpoint)
        .ok()
        .and_then(|c| c.canonicalize().ok());
    let read: Vec<PathBuf> = (checkpoint.canonicalize().ok().into_iter())
        .chain(resolved_read.clone())
        .collect();
    if let Some(o) = resolved(out) {
        if let Some(c) = read.iter().find(|c| c.starts_with(&o)) {
            bail!(
                "--out {}: holds the checkpoint being exported ({}); export into another directory",
                out.display(),
                c.display()
            );
        }
        // Nor inside where a run keeps its models: the export's files would mix with a
        // checkpoint's, or lie among the checkpoints.
        // The checkpoint read, not a run directory given for it: an export into the run's own
        // directory beside its models (runs/sft/hf) is the user's to choose.
        let kept: Vec<PathBuf> = resolved_read
            .iter()
            .flat_map(|c| models_of_run(c))
            .collect();
        if let Some(home) = kept.iter().find(|k| o.starts_with(k)) {
            bail!(
                "--out {}: lies inside {}, where the model being exported is kept; export into \
                 a directory of its own",
                out.display(),
                home.display()
            );
        }
    }
    // A LoRA run's frozen base is read as well: an export there would replace (or, under
    // --overwrite, remove) the files of the model the run's adapters need.
    let base = resolved_read
        .as_deref()
        .and_then(|c| crate::train::checkpoint::CheckpointMeta::read(c).ok())
        .and_then(|m| m.base)
        .and_then(|b| b.canonicalize().ok());
    if let (Some(base), Some(o)) = (base, resolved(out)) {
        if o == base {
            bail!(
                "--out {}: holds the base model ({}) the run's adapters were trained on, which \
                 an export there would replace; export into another directory",
                out.display(),
                base.display()
            );
        }
    }
    let Ok(mut entries) = std::fs::read_dir(out) else {
        return Ok(()); // absent (created next), or not a directory (which that says)
    };
    if let (Some(first), false) = (entries.next(), overwrite) {
        let name = first.map_or_else(
            |_| "?".into(),
            |e| e.file_name().to_string_lossy().into_owned(),
        );
        bail!(
            "--out {}: not empty (it holds {name}, among others maybe); pass --overwrite to write into it anyway (an earlier export there is replaced: its weights, configs and tokenizer files), or choose a new directory",
            out.display()
        );
    }
    Ok(())
}

/// `path` made absolute with its symbolic links resolved, the part that does not exist yet
/// appended as given.
fn resolved(path: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(path).ok()?;
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = existing.canonicalize() {
            return Some(rest.iter().rev().fold(c, |p, r| p.join(r)));
        }
        rest.push(existing.file_name()?.to_os_string());
        existing = existing.parent()?;
    }
}

/// Where the run of checkpoint `dir` (canonical) keeps its models: the checkpoint itself, and
/// the run's `final/` and `checkpoints/` where `dir` is one of them.
fn models_of_run(dir: &Path) -> Vec<PathBuf> {
    let mut kept = vec![dir.to_path_buf()];
    let run = match dir.file_name().and_then(|n| n.to_str()) {
        Some("final") => dir.parent(),
        _ => dir
            .parent()
            .filter(|p| p.file_name().is_some_and(|n| n == "checkpoints"))
            .and_then(Path::parent),
    };
    if let Some(run) = run {
        kept.extend([run.join("final"), run.join("checkpoints")]);
    }
    kept
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

/// Writes the Hugging Face model directory; returns how many weight files it wrote.
fn hf_dir(checkpoint: &Path, out: &Path, dtype: Dtype, max_shard: u64) -> Result<usize> {
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
    let files = write_weights(out, &tensors, dtype, max_shard)?;
    let tok = &loaded.tokenizer;
    let plain_bytes = matches!(tok, Tokenizer::Bytes);
    if plain_bytes {
        // transformers (and temper's --init of this directory) need a tokenizer.json.
        crate::io::write_atomic(&out.join("tokenizer.json"), byte_level_json()?.as_bytes())?;
    } else if tok.is_bytes() {
        errln!(
            "warning: {}: the byte-level tokenizer with a chat template has no tokenizer.json \
             to write (its template renders its tokens as text, which no vocabulary of \
             transformers' reads so), and transformers (and temper's --init) need one beside \
             the model",
            out.display()
        );
    }
    let stops = tok.stop_ids();
    let mut config = hf::config_json(family, head, cfg, &stops, tok.bos_id(), tok.pad_id());
    // transformers 5 reads `dtype` and loads in it by default; earlier versions `torch_dtype`.
    config["dtype"] = json!(dtype.torch_name());
    config["torch_dtype"] = json!(dtype.torch_name());
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
    // Decided by what the tokenizer carries, not by what --out holds: an --overwrite of
    // another model's export would otherwise keep its files.
    let hf_tokenizer = !tok.is_bytes() || plain_bytes;
    if hf_tokenizer && tok.carried("tokenizer_config.json").is_none() {
        let (bos, eos) = tok.bos_eos_names();
        let mut tokenizer_config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": eos,
            // A classifier's is the padding id config.json names (none where the tokenizer pads
            // with a stop token, above): a tokenizer padding with another would have
            // transformers score padded rows at a padding token.
            "pad_token": match head {
                hf::Head::Score => config["pad_token_id"]
                    .as_u64()
                    .and_then(|id| tok.token_name(u32::try_from(id).ok()?)),
                hf::Head::Lm => tok.token_name(tok.pad_id()),
            },
            "bos_token": bos,
            "model_max_length": cfg.max_position_embeddings,
        });
        if plain_bytes {
            // transformers before 5 tidies spaces before punctuation on decode by default;
            // the byte tokenizer gives back the text as it was.
            tokenizer_config["clean_up_tokenization_spaces"] = json!(false);
        }
        crate::io::write_atomic(
            &out.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&tokenizer_config)?.as_bytes(),
        )?;
    }
    let gen = generation_config(tok.carried(GENERATION_CONFIG), tok.bos_id(), &stops)?;
    crate::io::write_atomic(
        &out.join(GENERATION_CONFIG),
        serde_json::to_string_pretty(&gen)?.as_bytes(),
    )?;
    Ok(files)
}

/// The exported generation config: the model's own where it came with one, its other fields
/// kept, and every id temper stops on in `eos_token_id`, the only stops transformers reads
/// (the tokenizer's EOS, which SFT trains a model to end with, may be missing from a base
/// model's list). Its own ids keep their order: `generate` pads with the first.
fn generation_config(
    carried: Option<&str>,
    bos: Option<u32>,
    stops: &[u32],
) -> Result<serde_json::Value> {
    let Some(text) = carried else {
        return Ok(json!({"bos_token_id": bos, "eos_token_id": stops}));
    };
    let mut gen: serde_json::Value = serde_json::from_str(text)
        .with_context(|| format!("the tokenizer's carried {GENERATION_CONFIG}"))?;
    if !gen.is_object() {
        bail!("the tokenizer's carried {GENERATION_CONFIG} is not a JSON object");
    }
    // Read as the tokenizer read it when it loaded the file, which it refused otherwise.
    let field = gen.get("eos_token_id");
    let mut ids = ids_field(field, "eos_token_id", Path::new(GENERATION_CONFIG))?;
    for &s in stops {
        if !ids.contains(&s) {
            ids.push(s);
        }
    }
    gen["eos_token_id"] = match ids[..] {
        [one] => json!(one),
        _ => json!(ids),
    };
    Ok(gen)
}

/// The name of shard `k` (from 1) of `n`, as transformers names them.
fn shard_name(k: usize, n: usize) -> String {
    format!("model-{k:05}-of-{n:05}.safetensors")
}

/// Whether `name` is a shard's name (`model-00001-of-00003.safetensors`).
fn is_shard_name(name: &str) -> bool {
    let Some(mid) = name
        .strip_prefix("model-")
        .and_then(|n| n.strip_suffix(".safetensors"))
    else {
        return false;
    };
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    mid.split_once("-of-")
        .is_some_and(|(k, n)| digits(k) && digits(n))
}

/// `names` ordered as a model's layers are (`layers.2` before `layers.10`), so that a shard
/// holds neighbouring layers.
fn layer_order(names: &mut [&String]) {
    fn key(name: &str) -> Vec<(String, u64)> {
        name.split('.')
            .map(|part| match part.parse::<u64>() {
                Ok(n) => (String::new(), n),
                Err(_) => (part.to_string(), 0),
            })
            .collect()
    }
    names.sort_by_cached_key(|n| key(n));
}

/// The shards of tensors of `sizes` bytes (in order), as huggingface_hub splits a state dict:
/// each shard takes tensors while they fit in `max` bytes, and a tensor larger than that gets
/// a shard of its own.
fn plan_shards(sizes: &[u64], max: u64) -> Vec<std::ops::Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && bytes + size > max {
            shards.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < sizes.len() {
        shards.push(start..sizes.len());
    }
    shards
}

/// Refuses f16 for weights past its range, which would be written as infinities; checked
/// before any file is written.
fn check_range(tensors: &HashMap<String, Tensor>, dtype: Dtype) -> Result<()> {
    if dtype != Dtype::F16 {
        return Ok(());
    }
    for (name, t) in tensors {
        let max = t
            .abs()?
            .max_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        if max > f32::from(half::f16::MAX) {
            bail!("{name} holds values up to {max}, past f16's 65504: export as bf16 or f32");
        }
    }
    Ok(())
}

/// Writes `tensors` in `dtype` as one safetensors file with the `{"format": "pt"}` metadata
/// transformers expects, converting only these tensors, so that a model is never held twice.
fn write_file(
    path: &Path,
    names: &[&String],
    tensors: &HashMap<String, Tensor>,
    dtype: Dtype,
) -> Result<()> {
    let mut views = Vec::with_capacity(names.len());
    for &name in names {
        let t = tensors[name].to_dtype(dtype.candle())?.contiguous()?;
        views.push((name.as_str(), t));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views.iter().map(|(n, t)| (*n, t)), Some(meta))
        .with_context(|| format!("{}: cannot serialise", path.display()))?;
    crate::io::write_atomic(path, &bytes)
}

/// Writes a model's weights as `save_pretrained` does: `model.safetensors`, or where they
/// pass `max_shard` bytes, shards and `model.safetensors.index.json`. Weight files of an
/// earlier export into the same directory that these do not replace are removed: a stale
/// `model.safetensors` would be read instead of the index (by transformers and temper alike),
/// and stale shards would lie beside the ones the index names. Returns the number of files.
/// (`model.safetensors` is read before an index, so the single file replaces the model the
/// moment it is renamed into place, and the rest goes after it.)
fn write_weights(
    out: &Path,
    tensors: &HashMap<String, Tensor>,
    dtype: Dtype,
    max_shard: u64,
) -> Result<usize> {
    check_range(tensors, dtype)?;
    let mut names: Vec<&String> = tensors.keys().collect();
    layer_order(&mut names);
    let bytes = |n: &String| (tensors[n].elem_count() * dtype.candle().size_in_bytes()) as u64;
    let sizes: Vec<u64> = names.iter().map(|n| bytes(n)).collect();
    let shards = plan_shards(&sizes, max_shard);
    if shards.len() <= 1 {
        write_file(&out.join(hf::WEIGHTS), &names, tensors, dtype)?;
        remove_stale(out, &[hf::WEIGHTS.to_string()])?;
        return Ok(1);
    }
    // An earlier model.safetensors would be read instead of the index, and an earlier index
    // would name shards half replaced: all go first, so that until the new index is written
    // a reader finds no weights at all, never stale or mixed ones.
    remove_stale(out, &[])?;
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (k, range) in shards.into_iter().enumerate() {
        let file = shard_name(k + 1, n);
        write_file(&out.join(&file), &names[range.clone()], tensors, dtype)?;
        for name in &names[range] {
            weight_map.insert(name.as_str(), file.clone());
        }
    }
    let total_parameters: usize = tensors.values().map(Tensor::elem_count).sum();
    let index = json!({
        "metadata": {"total_parameters": total_parameters, "total_size": sizes.iter().sum::<u64>()},
        "weight_map": weight_map,
    });
    let text = serde_json::to_string_pretty(&index)? + "\n";
    crate::io::write_atomic(&out.join(hf::WEIGHTS_INDEX), text.as_bytes())?;
    Ok(n)
}

/// Removes the weight files (`model.safetensors`, its index, shards) in `out` other than
/// `keep`.
fn remove_stale(out: &Path, keep: &[String]) -> Result<()> {
    let entries =
        std::fs::read_dir(out).with_context(|| format!("{}: cannot list", out.display()))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let weights = name == hf::WEIGHTS || name == hf::WEIGHTS_INDEX || is_shard_name(&name);
        if weights && !keep.contains(&name) && e.path().is_file() {
            std::fs::remove_file(e.path())
                .with_context(|| format!("{}: cannot remove", e.path().display()))?;
        }
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
        if !f.holds_layout_of(cfg) {
            bail!(
                "model.hf_family = \"{}\" does not hold this model's layers (norm = {:?}, \
                 position = {:?}, mlp = {:?}, bias = {}, qk_norm = {}, qkv_bias = {}, \
                 tie_word_embeddings = {}): llama, mistral, smollm3, qwen2 and qwen3 are \
                 RMSNorm, rope and SwiGLU without biases, where llama, mistral and smollm3 have \
                 neither q/k norms nor q, k and v biases, qwen2 the biases, qwen3 the norms; \
                 gpt2 is LayerNorm, learned positions, GELU and biases with a tied head; name \
                 the family the layout makes, or leave hf_family out",
                f.name(),
                cfg.norm,
                cfg.position,
                cfg.mlp,
                cfg.bias,
                cfg.qk_norm,
                cfg.qkv_bias,
                cfg.tie_word_embeddings
            );
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    /// The model's own stop ids keep their order, temper's are added, other fields stay.
    #[test]
    fn the_generation_config_stops_where_temper_stops() {
        let own = r#"{"bos_token_id": 1, "eos_token_id": 9, "temperature": 0.6}"#;
        let gen = generation_config(Some(own), Some(1), &[2, 9]).unwrap();
        assert_eq!(gen["eos_token_id"], serde_json::json!([9, 2]));
        assert_eq!(gen["temperature"], serde_json::json!(0.6));
        let gen = generation_config(Some(own), Some(1), &[9]).unwrap();
        assert_eq!(gen["eos_token_id"], serde_json::json!(9));
        let gen = generation_config(None, None, &[3, 4]).unwrap();
        assert_eq!(gen["eos_token_id"], serde_json::json!([3, 4]));
        assert!(generation_config(Some("[1]"), None, &[3]).is_err());
    }

    /// Sizes read as transformers (and huggingface_hub under it) read `max_shard_size`, and a
    /// size that is not one is refused saying what one is.
    #[test]
    fn shard_sizes_read_as_transformers_reads_them() {
        for (text, bytes) in [
            ("5GB", 5_000_000_000),
            ("500MB", 500_000_000),
            ("2GiB", 2 << 30),
            ("1.5gb", 1_500_000_000),
            (" 20 KB ", 20_000),
            ("3KiB", 3072),
            ("1TB", 1_000_000_000_000),
            ("4096", 4096),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for bad in [
            "",
            "0GB",
            "-1GB",
            "5XB",
            "GB",
            "1.5",
            "nanGB",
            "99999999999TB",
        ] {
            let Err(e) = parse_size(bad) else {
                panic!("{bad:?} accepted")
            };
            assert!(
                !e.contains('\n')
                    && (e.contains("GB") || e.contains("byte") || e.contains("large")),
                "{bad:?}: {e}"
            );
        }
        assert_eq!(parse_size("5"), Ok(5));
    }

    /// Tensors fill a shard in order while they fit; one larger than a shard is alone.
    #[test]
    fn shards_split_as_huggingface_hub_splits_them() {
        let one = plan_shards(&[4, 4, 4], 100);
        assert!(one.len() == 1 && one[0] == (0..3), "{one:?}");
        assert_eq!(plan_shards(&[4, 4, 4], 8), [0..2, 2..3]);
        assert_eq!(plan_shards(&[4, 20, 4, 4], 8), [0..1, 1..2, 2..4]);
        assert_eq!(plan_shards(&[20, 4], 8), [0..1, 1..2]);
        assert!(plan_shards(&[], 8).is_empty());
        assert_eq!(shard_name(2, 11), "model-00002-of-00011.safetensors");
        assert!(is_shard_name(&shard_name(2, 11)));
        for not in [
            "model.safetensors",
            "model-1-of-2.safetensors",
            "model-00001-of-00002.bin",
        ] {
            assert!(!is_shard_name(not), "{not}");
        }
        let names: Vec<String> = [
            "model.layers.10.w",
            "model.norm.weight",
            "model.layers.2.w",
            "lm_head.weight",
        ]
        .map(String::from)
        .into();
        let mut order: Vec<&String> = names.iter().collect();
        layer_order(&mut order);
        assert_eq!(
            order,
            [
                "lm_head.weight",
                "model.layers.2.w",
                "model.layers.10.w",
                "model.norm.weight"
            ]
        );
    }

    /// A weight past f16's range is refused for f16 (it would be written as an infinity), not
    /// for bf16, whose range is f32's.
    #[test]
    fn f16_refuses_weights_past_its_range() {
        let big = Tensor::new(&[1.0f32, -7e4], &Device::Cpu).unwrap();
        let tensors = HashMap::from([("w".to_string(), big)]);
        let e = check_range(&tensors, Dtype::F16).unwrap_err().to_string();
        assert!(
            e.contains("w holds values up to 70000") && e.contains("bf16"),
            "{e}"
        );
        check_range(&tensors, Dtype::Bf16).unwrap();
    }

    /// A family named in the config that would drop NoPE layers or a sliding window, or whose
    /// layers lack the model's q/k norms, is refused naming what it would drop.
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
            hf_family: Some(HfFamily::Qwen2),
            ..window.clone()
        };
        assert_eq!(family_of(&qwen).unwrap(), HfFamily::Qwen2);
        // Qwen3's layers normalise q and k, which these do not.
        let qwen3 = ModelConfig {
            hf_family: Some(HfFamily::Qwen3),
            ..window
        };
        let e = family_of(&qwen3).unwrap_err().to_string();
        assert!(
            e.contains("\"qwen3\" does not hold") && e.contains("qk_norm = false"),
            "{e}"
        );
    }
}
