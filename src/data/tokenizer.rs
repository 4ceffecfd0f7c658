//! Tokenizers: a byte-level one that needs no training (the default, so that every stage
//! works out of the box) and any Hugging Face `tokenizer.json`, plus a BPE trainer.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use super::chat_template::{named_templates, DEFAULT, NAMED_TEMPLATES_DIR, TEMPLATE_FILE};
use super::corpus::{load_documents_from, Part};
use super::document_ids::{gpt2_pieces, PIECE_BYTES};

/// End-of-sequence id of the byte tokenizer: the first id after the 256 byte values.
pub const BYTE_EOS: u32 = 256;
/// Padding id of the byte tokenizer.
pub const BYTE_PAD: u32 = 257;
/// Vocabulary size of the byte tokenizer: 256 bytes + EOS + PAD.
pub const BYTE_VOCAB: usize = 258;

/// Names tried, in order, for the end-of-sequence token of a `tokenizer.json`; they cover
/// GPT-2, Llama/Mistral, Gemma and Llama 3 style vocabularies.
const EOS_NAMES: [&str; 5] = [
    "<|endoftext|>",
    "</s>",
    "<eos>",
    "<|eos|>",
    "<|end_of_text|>",
];
const PAD_NAMES: [&str; 2] = ["<|pad|>", "<pad>"];

/// Special tokens given to a BPE trained by [`train_bpe`]; the first must be an EOS name
/// and the second a PAD name so that [`Tokenizer::from_file`] finds them again.
const TRAINED_SPECIALS: [&str; 2] = ["<|endoftext|>", "<|pad|>"];

pub const GENERATION_CONFIG: &str = "generation_config.json";

/// A Hugging Face model directory's own config, whose stop ids count where it has no
/// [`GENERATION_CONFIG`].
const MODEL_CONFIG: &str = "config.json";

/// File name of a saved tokenizer inside a run or checkpoint directory.
pub const FILE_NAME: &str = "tokenizer.json";

#[derive(Clone)]
pub enum Tokenizer {
    Bytes,
    /// The byte tokenizer with the chat template a run chose for it: the ids of
    /// [`Tokenizer::Bytes`], and `files`, `(path relative to the directory, text)` of its
    /// template files and of the `tokenizer_config.json` that names the `bos_token` and
    /// `eos_token` the template renders (see [`Tokenizer::with_template_tokens`]), saved
    /// beside its checkpoints as a Hugging Face tokenizer's are, so that the next stage renders
    /// conversations as the run trained on them. A template's markers (`<|im_start|>`) are
    /// plain text to the byte tokenizer, encoded byte by byte alike wherever it renders, so
    /// nothing else needs keeping. Never without a template file: the byte tokenizer without
    /// one is [`Tokenizer::Bytes`].
    BytesWithTemplate {
        files: Arc<Vec<(String, String)>>,
    },
    Hf {
        inner: Arc<tokenizers::Tokenizer>,
        eos: u32,
        pad: u32,
        specials: Arc<Specials>,
    },
}

/// What a model directory says about special tokens besides `tokenizer.json`: the stop ids of
/// `generation_config.json` (`eos_token_id`, one id or a list: Llama 3 stops on both
/// `<|end_of_text|>` and `<|eot_id|>`), and the files around it (see `CARRIED`), kept to
/// write back.
#[derive(Clone, Debug, Default)]
pub struct Specials {
    /// Every id that ends a generation, EOS included.
    pub stops: Vec<u32>,
    pub bos: Option<u32>,
    /// Whether `tokenizer_config.json` names the padding token (`pad_token`), rather than
    /// temper choosing one.
    pub pad_named: bool,
    /// `(path relative to the directory, text)` of each file of `CARRIED` it has, and of its
    /// named chat templates.
    pub files: Vec<(String, String)>,
    /// The special tokens the tokenizer's post-processor puts before a text (Llama's and
    /// Mistral's BOS; none for Qwen or GPT-2), as transformers' `tokenizer(text)` adds them:
    /// BOS or nothing as `add_bos_token` says where `tokenizer_config.json` sets it or
    /// `add_eos_token` (see `flagged_opening`).
    pub opening: Vec<u32>,
    /// The `truncation` and `padding` its tokenizer.json set, which temper does not apply
    /// (it encodes text whole, as transformers does unless a call asks) but writes back, for
    /// transformers to take its defaults from.
    pub saved_truncation: Option<tokenizers::TruncationParams>,
    pub saved_padding: Option<tokenizers::PaddingParams>,
}

/// The ids `inner`'s post-processor puts before any text: those of a probe encoded with
/// special tokens, before where the probe's own ids begin.
fn opening_ids(inner: &tokenizers::Tokenizer) -> Vec<u32> {
    let ids = |special: bool| {
        inner
            .encode_fast("a", special)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    };
    let (with, bare) = (ids(true), ids(false));
    if bare.is_empty() {
        return vec![];
    }
    match with.windows(bare.len()).position(|w| w == bare) {
        Some(at) => with[..at].to_vec(),
        None => vec![],
    }
}

/// The opening tokens `tokenizer_config.json` (`cfg`, read from `path`) asks for, where it sets
/// `add_bos_token` or `add_eos_token`: transformers then rebuilds the post-processor from the
/// two flags (one left out counts as false), whatever `tokenizer.json` says. None where it
/// sets neither. `add_eos_token` adds nothing here: temper ends every plain document and
/// every trained segment with one EOS already, as TRL does whatever the flag says, so the
/// flag only decides whether the tokenizer's own encoding would have written it.
fn flagged_opening(
    cfg: &serde_json::Value,
    path: &Path,
    bos: Option<u32>,
) -> Result<Option<Vec<u32>>> {
    let flag = |key: &str| -> Result<Option<bool>> {
        match cfg.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => bail!(
                "{}: field \"{key}\": expected true or false, got {other}",
                path.display()
            ),
        }
    };
    let (add_bos, add_eos) = (flag("add_bos_token")?, flag("add_eos_token")?);
    if add_bos.is_none() && add_eos.is_none() {
        return Ok(None);
    }
    match (add_bos.unwrap_or(false), bos) {
        (false, _) => Ok(Some(vec![])),
        (true, Some(id)) => Ok(Some(vec![id])),
        (true, None) => bail!(
            "{}: field \"add_bos_token\": true, but no \"bos_token\" names the token to add",
            path.display()
        ),
    }
}

/// The id of the `eos_token` that `dir`'s `tokenizer_config.json` names, where it has one.
fn named_eos(dir: &Path, inner: &tokenizers::Tokenizer) -> Result<Option<u32>> {
    let files: Vec<_> = carried_file(dir, "tokenizer_config.json".to_string())?
        .into_iter()
        .collect();
    let Some(v) = carried_json(&files, dir, "tokenizer_config.json")? else {
        return Ok(None);
    };
    let Some(name) = token_field(&v, "eos_token") else {
        return Ok(None);
    };
    let path = dir.join("tokenizer_config.json");
    inner.token_to_id(&name).map(Some).with_context(|| {
        format!(
            "{}: field \"eos_token\": token {name:?} is not in tokenizer.json",
            path.display()
        )
    })
}

/// The files beside `tokenizer.json` that go wherever the tokenizer goes: its config and
/// generation config (read for the special tokens), and, only carried, the chat template
/// transformers 4.5x and later save apart and the special-token map older ones saved.
const CARRIED: [&str; 4] = [
    "tokenizer_config.json",
    GENERATION_CONFIG,
    TEMPLATE_FILE,
    "special_tokens_map.json",
];

/// The config that names the `bos_token` and `eos_token` a byte tokenizer's chat template
/// renders (the byte tokenizer has no such tokens of its own).
const BYTE_TOKENS_FILE: &str = "tokenizer_config.json";

/// Whether carried file `name` is a chat template (the default one or a named one).
fn is_template_file(name: &str) -> bool {
    name == TEMPLATE_FILE
        || name
            .strip_prefix(NAMED_TEMPLATES_DIR)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// `files` with `source` as the chat template and `tool_use` as the `tool_use` template
/// (none: none), in place of the ones it had.
fn replace_templates(
    files: &mut Vec<(String, String)>,
    source: Option<&str>,
    tool_use: Option<&str>,
) {
    let tool_use_file = format!("{NAMED_TEMPLATES_DIR}/tool_use.jinja");
    // A named default would win over the one written here.
    let default_file = format!("{NAMED_TEMPLATES_DIR}/{DEFAULT}.jinja");
    files.retain(|(name, _)| {
        name != TEMPLATE_FILE && *name != tool_use_file && *name != default_file
    });
    if let Some(source) = source {
        files.push((TEMPLATE_FILE.to_string(), source.to_string()));
    }
    if let Some(t) = tool_use {
        files.push((tool_use_file, t.to_string()));
    }
    config_templates(files, source, tool_use);
}

/// A `tokenizer_config.json` among `files` that holds a `chat_template` (as transformers
/// before 4.50 saved one) holds the given templates instead: transformers 5 reads the
/// `.jinja` files over it, but what reads the config alone (an older transformers, a
/// converter) would render with the old one. One without a template is left as it was.
fn config_templates(files: &mut [(String, String)], source: Option<&str>, tool_use: Option<&str>) {
    let Some((_, text)) = files.iter_mut().find(|(n, _)| n == "tokenizer_config.json") else {
        return;
    };
    let Ok(serde_json::Value::Object(mut config)) = serde_json::from_str(text) else {
        return;
    };
    let Some(old) = config.get("chat_template") else {
        return;
    };
    let named = |name: &str, t: &str| serde_json::json!({"name": name, "template": t});
    // Named templates other than these two stay, as their `.jinja` files do.
    let others: Vec<serde_json::Value> = match old {
        serde_json::Value::Array(list) => list
            .iter()
            .filter(|t| !matches!(t["name"].as_str(), Some(DEFAULT | "tool_use")))
            .cloned()
            .collect(),
        _ => vec![],
    };
    match (source, tool_use, others.is_empty()) {
        (Some(s), None, true) => config.insert("chat_template".into(), s.into()),
        (None, None, true) => config.remove("chat_template"),
        (s, t, _) => {
            let list: Vec<_> = (s.map(|s| named(DEFAULT, s)).into_iter())
                .chain(t.map(|t| named("tool_use", t)))
                .chain(others)
                .collect();
            config.insert("chat_template".into(), list.into())
        }
    };
    if let Ok(new) = serde_json::to_string_pretty(&config) {
        *text = new;
    }
}

/// The files a byte-level run directory `dir` keeps for its chat template: its templates
/// and the config naming the tokens they render (see [`Tokenizer::BytesWithTemplate`]).
fn byte_template_files(dir: &Path) -> Result<Vec<(String, String)>> {
    files_with_templates(dir, &[TEMPLATE_FILE, BYTE_TOKENS_FILE])
}

/// `"<tok>"` or `{"content": "<tok>", ...}` (both appear in tokenizer_config.json files).
fn token_field(v: &serde_json::Value, key: &str) -> Option<String> {
    let f = v.get(key)?;
    f.as_str()
        .or_else(|| f.get("content").and_then(|c| c.as_str()))
        .map(str::to_string)
}

/// Field `field` of a file at `path`, `x` (absent: none): one id or a list of ids; none where
/// it is null. Anything else is an error naming the file and the field: a stop id dropped
/// unread would let generations run past their end.
pub(crate) fn ids_field(
    x: Option<&serde_json::Value>,
    field: &str,
    path: &Path,
) -> Result<Vec<u32>> {
    let id = |x: &serde_json::Value| {
        x.as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .with_context(|| {
                format!(
                    "{}: field \"{field}\": expected a token id or a list of them, got {x}",
                    path.display()
                )
            })
    };
    match x {
        None | Some(serde_json::Value::Null) => Ok(vec![]),
        Some(serde_json::Value::Array(a)) => a.iter().map(id).collect(),
        Some(x) => Ok(vec![id(x)?]),
    }
}

/// The generation config transformers builds where model directory `dir` has no
/// `generation_config.json`: from its `config.json` (`GenerationConfig.from_model_config`),
/// whose `eos_token_id` and `bos_token_id` count (where one is null or absent, that of the
/// model inside it: an image-and-text model's `text_config`). None where `dir` has no
/// `config.json`, it names no `eos_token_id`, or it is a classifier's, which generates
/// nothing. Returned as a `generation_config.json` that says the same, so that the stop ids
/// stay with the tokenizer wherever it is saved, as transformers' `save_pretrained` writes one.
fn generation_of_model_config(dir: &Path) -> Result<Option<String>> {
    let config = carried_file(dir, MODEL_CONFIG.to_string())?;
    let Some(v) = carried_json(config.as_slice(), dir, MODEL_CONFIG)? else {
        return Ok(None);
    };
    let path = dir.join(MODEL_CONFIG);
    let classifier = v["architectures"]
        .get(0)
        .and_then(|a| a.as_str())
        .is_some_and(|a| a.ends_with("ForSequenceClassification"));
    if classifier {
        return Ok(None);
    }
    let inner = ["decoder", "generator", "text_config"]
        .iter()
        .find_map(|k| {
            let c = v
                .get(*k)
                .filter(|c| c.as_object().is_some_and(|o| !o.is_empty()))?;
            Some((*k, c))
        });
    let mut generation = serde_json::Map::new();
    for key in ["bos_token_id", "eos_token_id"] {
        let (x, field) = match (v.get(key).filter(|x| !x.is_null()), inner) {
            (Some(x), _) => (x, key.to_string()),
            (None, Some((name, c))) => match c.get(key).filter(|x| !x.is_null()) {
                Some(x) => (x, format!("{name}.{key}")),
                None => continue,
            },
            (None, None) => continue,
        };
        // The stop ids are checked; a BOS temper does not read from here goes along only
        // where it is one.
        match (key, ids_field(Some(x), &field, &path)) {
            (_, Ok(_)) => {
                generation.insert(key.into(), x.clone());
            }
            ("eos_token_id", Err(e)) => return Err(e),
            (_, Err(_)) => {}
        }
    }
    if !generation.contains_key("eos_token_id") {
        return Ok(None);
    }
    Ok(Some(serde_json::to_string_pretty(&generation)?))
}

/// The files of [`CARRIED`] that `dir` has, and its named chat templates.
fn carried_files(dir: &Path) -> Result<Vec<(String, String)>> {
    files_with_templates(dir, &CARRIED)
}

/// The files `names` that `dir` has, and its named chat templates.
fn files_with_templates(dir: &Path, names: &[&str]) -> Result<Vec<(String, String)>> {
    let mut names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    names.extend(
        named_templates(dir)?
            .into_iter()
            .map(|n| format!("{NAMED_TEMPLATES_DIR}/{n}.jinja")),
    );
    let mut files = Vec::new();
    for name in names {
        files.extend(carried_file(dir, name)?);
    }
    Ok(files)
}

/// `(name, text)` of file `name` in `dir`, where it has one.
fn carried_file(dir: &Path, name: String) -> Result<Option<(String, String)>> {
    let path = dir.join(&name);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(Some((name, text)))
}

/// The JSON of carried file `name` (read from `dir`), where there is one.
fn carried_json(
    files: &[(String, String)],
    dir: &Path,
    name: &str,
) -> Result<Option<serde_json::Value>> {
    let Some((_, text)) = files.iter().find(|(n, _)| n == name) else {
        return Ok(None);
    };
    let path = dir.join(name);
    serde_json::from_str(text)
        .map(Some)
        .map_err(|e| crate::json_error::json_error(&path, text, &e))
}

impl std::fmt::Debug for Tokenizer {
    // The HF tokenizer's own Debug dumps the whole vocabulary; the summary is enough.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer({})", self.describe())
    }
}

/// The tokenizer.json `path` names: itself, or a model directory's.
pub fn file_of(path: &Path) -> PathBuf {
    match path.is_dir() {
        true => path.join(FILE_NAME),
        false => path.to_path_buf(),
    }
}

impl Tokenizer {
    pub fn bytes() -> Self {
        Tokenizer::Bytes
    }

    /// The byte tokenizer keeping `files` (see [`Tokenizer::BytesWithTemplate`]); plain
    /// [`Tokenizer::Bytes`] where they hold no chat template, as the rest serves none.
    fn bytes_with(files: Vec<(String, String)>) -> Self {
        if files.iter().any(|(name, _)| is_template_file(name)) {
            Tokenizer::BytesWithTemplate {
                files: Arc::new(files),
            }
        } else {
            Tokenizer::Bytes
        }
    }

    /// Whether this is temper's byte-level tokenizer (ids 0-255 the bytes, then EOS and PAD),
    /// with a chat template or without.
    pub fn is_bytes(&self) -> bool {
        matches!(self, Tokenizer::Bytes | Tokenizer::BytesWithTemplate { .. })
    }

    /// The files this tokenizer writes beside `tokenizer.json` (the byte tokenizer: instead
    /// of one).
    fn files(&self) -> &[(String, String)] {
        match self {
            Tokenizer::Bytes => &[],
            Tokenizer::BytesWithTemplate { files } => files,
            Tokenizer::Hf { specials, .. } => &specials.files,
        }
    }

    /// Loads any Hugging Face `tokenizer.json` (or a model directory's), finding its EOS and PAD
    /// tokens by name.
    pub fn from_file(path: &Path) -> Result<Self> {
        // A model directory's tokenizer is read with its config's EOS.
        let dir = Some(path).filter(|p| p.is_dir());
        Self::from_file_in(&file_of(path), dir)
    }

    /// [`Tokenizer::from_file`] for the `tokenizer.json` of model directory `dir`: the EOS its
    /// `tokenizer_config.json` names (`eos_token`) comes before any name searched for, so a
    /// vocabulary that spells its EOS otherwise still loads.
    fn from_file_in(path: &Path, dir: Option<&Path>) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read tokenizer", path.display()))?;
        let inner: tokenizers::Tokenizer = text.parse().map_err(|e| {
            anyhow!(
                "{}: not a valid Hugging Face tokenizer.json: {e}",
                path.display()
            )
        })?;
        let named = match dir {
            Some(dir) => named_eos(dir, &inner)?,
            None => None,
        };
        Self::from_hf(inner, named).with_context(|| path.display().to_string())
    }

    /// A tokenizer of `inner` whose EOS is `eos` where given, else the first of [`EOS_NAMES`]
    /// it has.
    fn from_hf(mut inner: tokenizers::Tokenizer, eos: Option<u32>) -> Result<Self> {
        // A tokenizer.json may carry the truncation and padding its last user set; transformers
        // encodes without them unless a call asks, and so does temper: each document whole.
        // They are kept to write back.
        let saved_truncation = inner.get_truncation().cloned();
        let saved_padding = inner.get_padding().cloned();
        inner
            .with_truncation(None)
            .map_err(|e| anyhow!("cannot turn off its truncation: {e}"))?;
        inner.with_padding(None);
        let found = || EOS_NAMES.iter().find_map(|t| inner.token_to_id(t));
        let Some(eos) = eos.or_else(found) else {
            bail!(
                "no end-of-sequence token (tokenizer_config.json names no \"eos_token\", and the \
                 vocabulary has none of {})",
                EOS_NAMES
                    .iter()
                    .map(|t| format!("\"{t}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        // Without a dedicated pad token EOS doubles as padding; padded positions are masked
        // out of every loss, so the choice only has to be a valid id.
        let pad = PAD_NAMES
            .iter()
            .find_map(|t| inner.token_to_id(t))
            .unwrap_or(eos);
        let opening = opening_ids(&inner);
        Ok(Tokenizer::Hf {
            inner: Arc::new(inner),
            eos,
            pad,
            specials: Arc::new(Specials {
                stops: vec![eos],
                opening,
                saved_truncation,
                saved_padding,
                ..Specials::default()
            }),
        })
    }

    /// Applies a model directory's `tokenizer_config.json` (BOS, EOS and PAD by name) and the
    /// `generation_config.json` of `generation` (the stop ids; `dir` itself, or the base
    /// model of an adapter that has none) to a tokenizer loaded from its `tokenizer.json`.
    fn with_model_files(self, dir: &Path, generation: &Path) -> Result<Self> {
        let Tokenizer::Hf {
            inner,
            mut eos,
            mut pad,
            specials: bare,
        } = self
        else {
            return Ok(self);
        };
        let mut files = carried_files(dir)?;
        if generation != dir {
            files.extend(carried_file(generation, GENERATION_CONFIG.to_string())?);
        }
        let mut specials = Specials {
            opening: bare.opening.clone(),
            saved_truncation: bare.saved_truncation.clone(),
            saved_padding: bare.saved_padding.clone(),
            ..Specials::default()
        };
        let id_of = |path: &Path, key: &str, name: &str| -> Result<u32> {
            inner.token_to_id(name).with_context(|| {
                format!(
                    "{}: field \"{key}\": token {name:?} is not in tokenizer.json",
                    path.display()
                )
            })
        };
        let tc_path = dir.join("tokenizer_config.json");
        if let Some(v) = carried_json(&files, dir, "tokenizer_config.json")? {
            if let Some(t) = token_field(&v, "eos_token") {
                eos = id_of(&tc_path, "eos_token", &t)?;
            }
            pad = match token_field(&v, "pad_token") {
                Some(t) => {
                    specials.pad_named = true;
                    id_of(&tc_path, "pad_token", &t)?
                }
                None => pad,
            };
            if let Some(t) = token_field(&v, "bos_token") {
                specials.bos = Some(id_of(&tc_path, "bos_token", &t)?);
            }
            if let Some(opening) = flagged_opening(&v, &tc_path, specials.bos)? {
                // transformers 4's Llama and Gemma tokenizers read a missing add_bos_token
                // as true, and 5 as false: one flag alone drops the BOS only under 5.
                let bos_unsaid = v.get("add_bos_token").is_none_or(|b| b.is_null());
                // Once a file: a run loads its policy's, reference's and reward model's.
                if bos_unsaid && opening.is_empty() && !bare.opening.is_empty() {
                    crate::console::warn_once(format!(
                        "warning: {}: sets add_eos_token but not add_bos_token, which \
                         transformers 5 reads as false (as temper does: no BOS opens a \
                         text, though tokenizer.json adds one) and 4's Llama and Gemma \
                         tokenizers as true; set add_bos_token to say which",
                        tc_path.display()
                    ));
                }
                specials.opening = opening;
            }
        }
        specials.stops.push(eos);
        // transformers reads generation_config.json alone where there is one.
        if !files.iter().any(|(n, _)| n == GENERATION_CONFIG) {
            if let Some(text) = generation_of_model_config(generation)? {
                files.push((GENERATION_CONFIG.to_string(), text));
            }
        }
        if let Some(v) = carried_json(&files, generation, GENERATION_CONFIG)? {
            let path = generation.join(GENERATION_CONFIG);
            specials
                .stops
                .extend(ids_field(v.get("eos_token_id"), "eos_token_id", &path)?);
        }
        specials.files = files;
        specials.stops.sort_unstable();
        specials.stops.dedup();
        Ok(Tokenizer::Hf {
            inner,
            eos,
            pad,
            specials: Arc::new(specials),
        })
    }

    /// This tokenizer with `source` as its chat template (`chat_template.jinja`, which wins
    /// over a template in `tokenizer_config.json` here as in transformers) and `tool_use` as
    /// its `tool_use` template (none: none). The byte tokenizer keeps them too (see
    /// [`Tokenizer::BytesWithTemplate`]), without the tokens its former template rendered:
    /// [`Tokenizer::with_template_tokens`] gives those of the new one.
    pub fn with_chat_template(self, source: Option<&str>, tool_use: Option<&str>) -> Self {
        match self {
            Tokenizer::Hf {
                inner,
                eos,
                pad,
                specials,
            } => {
                let mut specials = (*specials).clone();
                replace_templates(&mut specials.files, source, tool_use);
                Tokenizer::Hf {
                    inner,
                    eos,
                    pad,
                    specials: Arc::new(specials),
                }
            }
            Tokenizer::Bytes | Tokenizer::BytesWithTemplate { .. } => {
                let mut files = self.files().to_vec();
                // The tokens the template it had rendered go with it.
                files.retain(|(name, _)| name != BYTE_TOKENS_FILE);
                replace_templates(&mut files, source, tool_use);
                Self::bytes_with(files)
            }
        }
    }

    /// This tokenizer with `bos` and `eos` as the `bos_token` and `eos_token` its chat template
    /// renders, as the template's `tokenizer_config.json` names them (empty: it names none).
    /// The byte tokenizer has no such tokens, so a template given to a byte-level run renders
    /// its config's: they go into a `tokenizer_config.json` beside its template (none where both
    /// are empty), where the next stage reads them with it. A Hugging Face tokenizer keeps its
    /// own config, which names its own tokens; a byte tokenizer without a chat template keeps
    /// none.
    pub fn with_template_tokens(self, bos: &str, eos: &str) -> Self {
        let Tokenizer::BytesWithTemplate { files } = &self else {
            return self;
        };
        let mut files = (**files).clone();
        files.retain(|(name, _)| name != BYTE_TOKENS_FILE);
        let mut config = serde_json::Map::new();
        for (key, token) in [("bos_token", bos), ("eos_token", eos)] {
            if !token.is_empty() {
                config.insert(key.into(), token.into());
            }
        }
        if !config.is_empty() {
            let text = serde_json::to_string_pretty(&config).expect("a map of strings");
            files.push((BYTE_TOKENS_FILE.to_string(), text));
        }
        Self::bytes_with(files)
    }

    /// The text of a file carried beside `tokenizer.json` (see `CARRIED`; the byte
    /// tokenizer's chat template files, see [`Tokenizer::BytesWithTemplate`]), where it has it.
    pub fn carried(&self, name: &str) -> Option<&str> {
        self.files()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, text)| text.as_str())
    }

    /// Whether `id` ends a generation (EOS, or another stop id of the model's
    /// `generation_config.json`).
    pub fn is_stop(&self, id: u32) -> bool {
        match self {
            Tokenizer::Bytes | Tokenizer::BytesWithTemplate { .. } => id == BYTE_EOS,
            Tokenizer::Hf { specials, .. } => specials.stops.contains(&id),
        }
    }

    /// The ids that end a generation.
    pub fn stop_ids(&self) -> Vec<u32> {
        match self {
            Tokenizer::Bytes | Tokenizer::BytesWithTemplate { .. } => vec![BYTE_EOS],
            Tokenizer::Hf { specials, .. } => specials.stops.clone(),
        }
    }

    pub fn bos_id(&self) -> Option<u32> {
        match self {
            Tokenizer::Bytes | Tokenizer::BytesWithTemplate { .. } => None,
            Tokenizer::Hf { specials, .. } => specials.bos,
        }
    }

    /// The tokenizer saved in a run directory, or the byte tokenizer when none was saved
    /// (byte-level runs save no tokenizer.json, only the chat template a run chose, see
    /// [`Tokenizer::save_dir`]), with that template.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(FILE_NAME);
        if path.is_file() {
            Self::from_file_in(&path, Some(dir))?.with_model_files(dir, dir)
        } else {
            Ok(Self::bytes_with(byte_template_files(dir)?))
        }
    }

    /// The tokenizer TRL saves beside a PEFT adapter (`dir`), with the generation config of
    /// its base model (`base`) where the adapter has none of its own (TRL saves none there),
    /// so that the base's stop ids (Llama 3's `<|eot_id|>`) still end generations.
    pub fn load_adapter_dir(dir: &Path, base: &Path) -> Result<Self> {
        let generation = match dir.join(GENERATION_CONFIG).is_file() {
            true => dir,
            false => base,
        };
        Self::from_file_in(&dir.join(FILE_NAME), Some(dir))?.with_model_files(dir, generation)
    }

    /// Writes `tokenizer.json` and the files carried beside it into `dir`; the byte tokenizer
    /// writes only the chat template files it keeps (none for plain [`Tokenizer::Bytes`]).
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        if let Tokenizer::Hf {
            inner, specials, ..
        } = self
        {
            let (t, p) = (&specials.saved_truncation, &specials.saved_padding);
            match t.is_some() || p.is_some() {
                true => {
                    let mut saved = (**inner).clone();
                    saved
                        .with_truncation(t.clone())
                        .map_err(|e| anyhow!("{}: {e}", dir.display()))?;
                    saved.with_padding(p.clone());
                    write_hf(&saved, &dir.join(FILE_NAME))?;
                }
                false => write_hf(inner, &dir.join(FILE_NAME))?,
            }
        }
        for (name, text) in self.files() {
            crate::io::write_atomic(&dir.join(name), text.as_bytes())?;
        }
        Ok(())
    }

    /// Token ids of `text`, without BOS/EOS or any other added special token.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes | Tokenizer::BytesWithTemplate { .. } => {
                Ok(text.bytes().map(u32::from).collect())
            }
            Tokenizer::Hf { inner, .. } => {
                let enc = inner
                    .encode_fast(text, false)
                    .map_err(|e| anyhow!("tokenizer failed to encode text: {e}"))?;
                Ok(enc.get_ids().to_vec())
            }
        }
    }

    /// The text of each token added to the vocabulary (special or not), which the tokenizer
    /// finds in a text before anything else.
    pub(crate) fn added_texts(&self) -> Vec<String> {
        match self {
            Tokenizer::Hf { inner, .. } => (inner.get_added_tokens_decoder().into_values())
                .map(|t| t.content)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The byte ranges in `text` of its pre-tokens (after the tokenizer's normalizer), whose
    /// ids the model finds apart: for a Hugging Face tokenizer with a pre-tokenizer; none for
    /// one without (the whole text is then one pre-token) or for the byte tokenizer.
    pub(crate) fn pre_token_spans(&self, text: &str) -> Result<Option<Vec<Range<usize>>>> {
        use tokenizers::{Normalizer, OffsetReferential, OffsetType, PreTokenizer};
        let Tokenizer::Hf { inner, .. } = self else {
            return Ok(None);
        };
        let Some(pre) = inner.get_pre_tokenizer() else {
            return Ok(None);
        };
        let failed = |e| anyhow!("tokenizer failed to pre-tokenize text: {e}");
        let mut split = tokenizers::PreTokenizedString::from(text);
        if let Some(n) = inner.get_normalizer() {
            split.normalize(|s| n.normalize(s)).map_err(failed)?;
        }
        pre.pre_tokenize(&mut split).map_err(failed)?;
        Ok(Some(
            split
                .get_splits(OffsetReferential::Original, OffsetType::Byte)
                .into_iter()
                .map(|(_, (a, b), _)| a..b)
                .collect(),
        ))
    }

    /// [`Tokenizer::encode`] with each token's byte range in `text`: where the tokenizer
    /// rewrites the text (a SentencePiece `▁` it prepends, say), the range of the text the
    /// token came from.
    pub fn encode_offsets(&self, text: &str) -> Result<Vec<(u32, Range<usize>)>> {
        match self {
            Tokenizer::Bytes | Tokenizer::BytesWithTemplate { .. } => Ok(text
                .bytes()
                .enumerate()
                .map(|(i, b)| (u32::from(b), i..i + 1))
                .collect()),
            Tokenizer::Hf { inner, .. } => {
                let enc = inner
                    .encode(text, false)
                    .map_err(|e| anyhow!("tokenizer failed to encode text: {e}"))?;
                Ok(enc
                    .get_ids()
                    .iter()
                    .zip(enc.get_offsets())
                    .map(|(&id, &(a, b))| (id, a..b))
                    .collect())
            }
        }
    }

    /// Token ids of plain text where a sequence opens (a document, a prompt, an example): as
    /// [`Tokenizer::encode`], after the special tokens the tokenizer puts first (Llama's BOS),
    /// as transformers' `tokenizer(text)` and TRL's SFT of plain text do, unless the text
    /// begins with them already.
    pub fn encode_start(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.encode(text)?;
        Ok([self.opening_before(&ids), &ids].concat())
    }

    /// The special tokens [`Tokenizer::encode_start`] puts before `ids`: the opening ones
    /// (BOS), unless `ids` begins with them already.
    pub fn opening_before(&self, ids: &[u32]) -> &[u32] {
        match self {
            Tokenizer::Hf { specials, .. } if !ids.starts_with(&specials.opening) => {
                &specials.opening
            }
            _ => &[],
        }
    }

    /// Text of `ids` with stop ids (EOS) and PAD left out. Ids the tokenizer does not know (a model
    /// whose vocabulary was rounded up can sample them) never fail the call: the byte
    /// tokenizer shows them as U+FFFD, a Hugging Face tokenizer drops them.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let pad = self.pad_id();
        let kept = ids
            .iter()
            .copied()
            .filter(|&i| !self.is_stop(i) && i != pad);
        match self {
            Tokenizer::Bytes | Tokenizer::BytesWithTemplate { .. } => {
                let mut out = String::new();
                let mut run = Vec::new();
                for id in kept {
                    match u8::try_from(id) {
                        Ok(b) => run.push(b),
                        Err(_) => {
                            out.push_str(&String::from_utf8_lossy(&run));
                            run.clear();
                            out.push(char::REPLACEMENT_CHARACTER);
                        }
                    }
                }
                out.push_str(&String::from_utf8_lossy(&run));
                Ok(out)
            }
            Tokenizer::Hf { inner, .. } => {
                let kept: Vec<u32> = kept.collect();
                // Other special tokens (chat markers, say) stay visible: only EOS and PAD
                // are bookkeeping.
                inner
                    .decode(&kept, false)
                    .map_err(|e| anyhow!("tokenizer failed to decode ids: {e}"))
            }
        }
    }

    /// Whether `other` maps every token to the same id (special tokens included): two models
    /// whose distributions are compared token by token need that. The byte tokenizer's is
    /// that of the tokenizer.json an hf export of its model carries ([`byte_level_json`]).
    pub fn same_vocabulary(&self, other: &Tokenizer) -> bool {
        match (self, other) {
            (Tokenizer::Hf { inner: a, .. }, Tokenizer::Hf { inner: b, .. }) => {
                a.get_vocab(true) == b.get_vocab(true)
            }
            (Tokenizer::Hf { inner, .. }, bytes) | (bytes, Tokenizer::Hf { inner, .. }) => {
                let exported = byte_level_json()
                    .ok()
                    .and_then(|json| json.parse::<tokenizers::Tokenizer>().ok());
                bytes.is_bytes()
                    && exported.is_some_and(|e| e.get_vocab(true) == inner.get_vocab(true))
            }
            _ => self.is_bytes() && other.is_bytes(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes | Tokenizer::BytesWithTemplate { .. } => BYTE_VOCAB,
            Tokenizer::Hf { inner, .. } => {
                let vocab = inner.get_vocab(true);
                // Sparse added-token ids can lie past the count; the model's embedding must
                // still cover them.
                let past_max = vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0);
                vocab.len().max(past_max)
            }
        }
    }

    pub fn eos_id(&self) -> u32 {
        match self {
            Tokenizer::Bytes | Tokenizer::BytesWithTemplate { .. } => BYTE_EOS,
            Tokenizer::Hf { eos, .. } => *eos,
        }
    }

    /// The vocabulary's spelling of token `id` (a Hugging Face tokenizer's; none for bytes).
    pub fn token_name(&self, id: u32) -> Option<String> {
        match self {
            // The names its tokenizer.json gives them ([`byte_level_json`]).
            Tokenizer::Bytes if id == BYTE_EOS => Some(EOS_NAMES[0].to_string()),
            Tokenizer::Bytes if id == BYTE_PAD => Some(PAD_NAMES[0].to_string()),
            Tokenizer::Bytes | Tokenizer::BytesWithTemplate { .. } => None,
            Tokenizer::Hf { inner, .. } => inner.id_to_token(id),
        }
    }

    /// The spellings of its BOS (where it has one) and EOS tokens, as an exported
    /// tokenizer_config.json names them.
    pub fn bos_eos_names(&self) -> (Option<String>, Option<String>) {
        let bos = self.bos_id().and_then(|i| self.token_name(i));
        (bos, self.token_name(self.eos_id()))
    }

    pub fn pad_id(&self) -> u32 {
        match self {
            Tokenizer::Bytes | Tokenizer::BytesWithTemplate { .. } => BYTE_PAD,
            Tokenizer::Hf { pad, .. } => *pad,
        }
    }

    /// The padding id Hugging Face trainers (TRL's) take: the `pad_token` the tokenizer's
    /// files name, else its EOS.
    pub fn named_pad_or_eos(&self) -> u32 {
        match self {
            Tokenizer::Hf { specials, pad, .. } if specials.pad_named => *pad,
            _ => self.eos_id(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Tokenizer::Bytes | Tokenizer::BytesWithTemplate { .. } => "bytes".to_string(),
            Tokenizer::Hf { inner, .. } => {
                use tokenizers::models::ModelWrapper as M;
                let kind = match inner.get_model() {
                    M::BPE(_) => "bpe",
                    M::WordPiece(_) => "wordpiece",
                    M::WordLevel(_) => "wordlevel",
                    M::Unigram(_) => "unigram",
                };
                format!("{kind}(vocab={})", self.vocab_size())
            }
        }
    }
}

/// Writes through a temporary file in the same directory and renames it, so that a crash
/// never leaves a truncated tokenizer.json that a later run would fail to parse.
fn write_hf(tok: &tokenizers::Tokenizer, path: &Path) -> Result<()> {
    let json = tok
        .to_string(true)
        .map_err(|e| anyhow!("{}: cannot serialise tokenizer: {e}", path.display()))?;
    crate::io::write_atomic(path, json.as_bytes())
}

/// The byte tokenizer as a Hugging Face `tokenizer.json`, for a model exported to
/// transformers: a byte-level BPE without merges, so that each byte is its own token with its
/// own id, then EOS (`<|endoftext|>`, 256) and PAD (`<|pad|>`, 257) as special tokens, which
/// [`Tokenizer::from_file`] finds again by name. It encodes text as the byte tokenizer does,
/// but for those two names in the text, which it reads as the special tokens (as GPT-2's does).
pub fn byte_level_json() -> Result<String> {
    // GPT-2's map of bytes to printable characters: the printable Latin-1 ones stand for
    // themselves, the others for the characters from U+0100 up, in byte order.
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256u32;
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        let c = match printable(b) {
            true => char::from(b),
            false => {
                next += 1;
                char::from_u32(next - 1).expect("a character below U+0200")
            }
        };
        vocab.insert(c.to_string(), b.into());
    }
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": false, "use_regex": false});
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(BYTE_EOS, EOS_NAMES[0]), special(BYTE_PAD, PAD_NAMES[0])],
        "normalizer": null,
        "pre_tokenizer": level,
        "post_processor": null,
        "decoder": level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []},
    });
    // Parsed before it is written: what tokenizers cannot read is a bug here, not a file.
    let tok: tokenizers::Tokenizer = json
        .to_string()
        .parse()
        .map_err(|e| anyhow!("the byte tokenizer's tokenizer.json: {e}"))?;
    tok.to_string(true)
        .map_err(|e| anyhow!("the byte tokenizer's tokenizer.json: {e}"))
}

/// The largest vocabulary [`train_bpe`] trains.
pub const MAX_TRAINED_VOCAB: usize = 1 << 20;

/// Trains a byte-level BPE of `vocab_size` tokens on `files` and writes it to `out`.
///
/// Each entry of `files` is read as a corpus by [`load_documents_from`], so directories and
/// `.jsonl` and `.parquet` files (their `column` fields; of a directory that names its splits,
/// the `part`) work as they do for pretraining.
pub fn train_bpe(
    files: &[PathBuf],
    (column, part): (&str, Part),
    vocab_size: usize,
    out: &Path,
) -> Result<Tokenizer> {
    // The byte alphabet and the special tokens are always in the vocabulary, so a smaller
    // size could not be honoured.
    let min = 256 + TRAINED_SPECIALS.len();
    if vocab_size < min {
        bail!("tokenizer vocab_size {vocab_size} is too small: a byte-level BPE needs at least {min} (256 bytes + {} special tokens)", TRAINED_SPECIALS.len());
    }
    // The trainer sizes its tables by the vocabulary asked for, so an absurd size aborts
    // (or overflows a capacity) before a merge is learnt.
    if vocab_size > MAX_TRAINED_VOCAB {
        bail!("tokenizer vocab_size {vocab_size} is too large: at most {MAX_TRAINED_VOCAB}, four times the largest vocabulary of the model families temper reads (Gemma 3's 262144)");
    }
    if files.is_empty() {
        bail!("train_bpe: no training files given");
    }
    let mut docs = Vec::new();
    for f in files {
        docs.extend(load_documents_from(f, column, part)?);
    }
    let tok = learn_bpe(&docs, vocab_size, PIECE_BYTES)?;
    write_hf(&tok, out)?;
    Tokenizer::from_hf(tok, None)
}

/// A byte-level BPE of `vocab_size` tokens learnt from `docs`, each fed to the trainer in
/// pieces of about `piece` bytes cut where GPT-2's pre-tokenizer splits alike
/// ([`gpt2_pieces`]): the words counted are a whole document's, and a long one does not hold
/// some 200 bytes of memory per byte while it is counted.
fn learn_bpe(docs: &[String], vocab_size: usize, piece: usize) -> Result<tokenizers::Tokenizer> {
    let mut tok = tokenizers::Tokenizer::new(BPE::default());
    // No prefix space: encode then decode must give back exactly the input text.
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::new(false, true, true)));
    let specials = TRAINED_SPECIALS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(0)
        // The trainer's own bars (counting words, then merges) where a terminal shows them.
        .show_progress(crate::train::progress::bars_shown())
        .special_tokens(specials)
        // Every byte gets a token even if the corpus lacks it, so no input is ever unknown.
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let bytes: usize = docs.iter().map(String::len).sum();
    crate::errln!(
        "[tokenizer] learning {vocab_size} tokens from {} ({:.1} MB)",
        crate::data::corpus::documents(docs.len()),
        bytes as f64 / 1e6
    );
    let start = std::time::Instant::now();
    let pieces = docs.iter().flat_map(|d| gpt2_pieces(d, piece));
    tok.train(&mut trainer, pieces)
        .map_err(|e| anyhow!("BPE training failed: {e}"))?;
    crate::errln!(
        "[tokenizer] learnt in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes outside what a byte-level BPE can be, or what the trainer can hold, are refused
    /// before any file is read.
    #[test]
    fn a_vocabulary_size_out_of_range_is_refused() {
        let out = Path::new("/nonexistent/tok.json");
        let e = train_bpe(&[], ("text", Part::train()), 100, out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vocab_size 100 is too small"), "{e}");
        for size in [MAX_TRAINED_VOCAB + 1, usize::MAX] {
            let e = train_bpe(&[], ("text", Part::train()), size, out)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("vocab_size {size} is too large")),
                "{e}"
            );
        }
    }

    fn sample_text() -> String {
        let mut s = String::new();
        for i in 0..200 {
            s.push_str(&format!(
                "The quick brown fox jumps over the lazy dog {i} times.\nQ: {i}+{}\nA: {}\n",
                i % 7,
                i + i % 7
            ));
        }
        s
    }

    #[test]
    fn bytes_round_trip_non_ascii() {
        let t = Tokenizer::bytes();
        let text = "héllo wörld — 日本語 🦀\n";
        let ids = t.encode(text).unwrap();
        assert_eq!(ids.len(), text.len());
        assert!(ids.iter().all(|&i| i < 256));
        assert_eq!(t.decode(&ids).unwrap(), text);
        assert_eq!(t.vocab_size(), BYTE_VOCAB);
        assert_eq!(t.describe(), "bytes");
    }

    #[test]
    fn bytes_decode_skips_eos_pad_and_is_lossy() {
        let t = Tokenizer::bytes();
        let mut ids = t.encode("ab").unwrap();
        ids.push(BYTE_EOS);
        ids.push(BYTE_PAD);
        ids.push(0xff); // a lone invalid UTF-8 byte
        ids.push(999); // past the vocabulary
        ids.extend(t.encode("c").unwrap());
        assert_eq!(t.decode(&ids).unwrap(), "ab\u{FFFD}\u{FFFD}c");
    }

    #[test]
    fn train_bpe_round_trips_and_saves() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("c.txt");
        std::fs::write(&corpus, sample_text()).unwrap();
        let out = dir.path().join("sub/tok.json");
        let t = train_bpe(&[corpus], ("text", Part::train()), 300, &out).unwrap();
        assert!(out.is_file());
        assert!(t.vocab_size() > BYTE_VOCAB && t.vocab_size() <= 300);
        assert_eq!(t.describe(), format!("bpe(vocab={})", t.vocab_size()));

        let text = "The quick brown fox: 12+5 — naïve 🦀\n\n  spaces ";
        let ids = t.encode(text).unwrap();
        // Merges were learnt, so common words take fewer tokens than bytes.
        let fox = t.encode("The quick brown fox").unwrap();
        assert!(fox.len() < "The quick brown fox".len());
        assert_eq!(t.decode(&ids).unwrap(), text);

        // EOS and PAD are the trained specials and decode skips them.
        let Tokenizer::Hf {
            inner, eos, pad, ..
        } = &t
        else {
            panic!("expected an HF tokenizer")
        };
        assert_eq!(Some(*eos), inner.token_to_id("<|endoftext|>"));
        assert_eq!(Some(*pad), inner.token_to_id("<|pad|>"));
        assert_ne!(eos, pad);
        let mut with = ids.clone();
        with.push(*eos);
        with.push(*pad);
        assert_eq!(t.decode(&with).unwrap(), text);

        // The written file loads back to the same tokenizer.
        let again = Tokenizer::from_file(&out).unwrap();
        assert_eq!(again.encode(text).unwrap(), ids);
        assert_eq!(again.eos_id(), t.eos_id());
        assert_eq!(again.pad_id(), t.pad_id());
    }

    /// The truncation and padding a tokenizer.json carries are not applied: a document is
    /// encoded whole, as transformers encodes a text unless a call asks otherwise.
    #[test]
    fn a_tokenizer_jsons_truncation_and_padding_are_not_applied() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/gpt2");
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture.join(FILE_NAME)).unwrap())
                .unwrap();
        let plain = Tokenizer::from_file(&fixture.join(FILE_NAME)).unwrap();
        json["truncation"] = serde_json::json!({"direction": "Right", "max_length": 4,
            "strategy": "LongestFirst", "stride": 0});
        json["padding"] = serde_json::json!({"strategy": {"Fixed": 64}, "direction": "Right",
            "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "!"});
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, json.to_string()).unwrap();
        let t = Tokenizer::from_file(&path).unwrap();
        let text = "hello world, hello again";
        assert!(plain.encode(text).unwrap().len() > 4);
        assert_eq!(t.encode(text).unwrap(), plain.encode(text).unwrap());
        // Written back as they were, for transformers' defaults.
        let out = dir.path().join("out");
        t.save_dir(&out).unwrap();
        let back: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(FILE_NAME)).unwrap()).unwrap();
        assert_eq!(back["truncation"]["max_length"], 4);
        assert_eq!(back["padding"]["pad_token"], "!");
        // And through a model directory, whose tokenizer_config.json is read too.
        std::fs::copy(
            fixture.join("tokenizer_config.json"),
            dir.path().join("tokenizer_config.json"),
        )
        .unwrap();
        let from_dir = Tokenizer::load_dir(dir.path()).unwrap();
        assert_eq!(from_dir.encode(text).unwrap(), plain.encode(text).unwrap());
        let again = dir.path().join("again");
        from_dir.save_dir(&again).unwrap();
        let back: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(again.join(FILE_NAME)).unwrap()).unwrap();
        assert_eq!(back["truncation"]["max_length"], 4);
        assert_eq!(back["padding"]["pad_token"], "!");
    }

    /// A BPE learnt from documents fed in pieces is the one learnt from them whole.
    #[test]
    fn a_bpe_learnt_in_pieces_is_the_one_learnt_whole() {
        let mut rng = crate::train::rng::Rng::new(5);
        let words = [
            "the", " king", "'s", "42", "\n", "\n\n", " ", "  ", "\t", ".", "é", "日本",
        ];
        let doc = |n: usize, rng: &mut crate::train::rng::Rng| -> String {
            (0..n).map(|_| words[rng.below(words.len())]).collect()
        };
        let docs: Vec<String> = (0..3).map(|i| doc(3000 + i * 500, &mut rng)).collect();
        assert!(gpt2_pieces(&docs[0], 64).len() > 50);
        let whole = learn_bpe(&docs, 500, usize::MAX).unwrap();
        let cut = learn_bpe(&docs, 500, 64).unwrap();
        assert!(whole.get_vocab_size(true) > 400);
        assert_eq!(
            cut.to_string(false).unwrap(),
            whole.to_string(false).unwrap()
        );
    }

    /// The byte tokenizer's `tokenizer.json` encodes and decodes as the byte tokenizer does,
    /// with its EOS and PAD found again by name.
    #[test]
    fn the_byte_tokenizer_as_a_tokenizer_json_encodes_as_it_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, byte_level_json().unwrap()).unwrap();
        let hf = Tokenizer::from_file(&path).unwrap();
        let bytes = Tokenizer::bytes();
        assert_eq!((hf.eos_id(), hf.pad_id()), (BYTE_EOS, BYTE_PAD));
        assert_eq!(hf.vocab_size(), BYTE_VOCAB);
        let mut rng = crate::train::rng::Rng::new(11);
        let alphabet: Vec<char> = " \n\t\r!~ÿ\u{7f}\u{0}aZ<|>é日本語🙂\u{ad}\u{a0}"
            .chars()
            .collect();
        for len in [0, 1, 2, 7, 40] {
            let text: String = (0..len)
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            let ids = bytes.encode(&text).unwrap();
            assert_eq!(hf.encode(&text).unwrap(), ids, "{text:?}");
            assert_eq!(hf.decode(&ids).unwrap(), text, "{text:?}");
        }
        let ascii: Vec<u32> = (0..128).collect();
        assert_eq!(hf.encode(&bytes.decode(&ascii).unwrap()).unwrap(), ascii);
    }

    #[test]
    fn save_and_load_dir() {
        let dir = tempfile::tempdir().unwrap();
        // No tokenizer.json means bytes; saving bytes writes nothing.
        assert!(matches!(
            Tokenizer::load_dir(dir.path()).unwrap(),
            Tokenizer::Bytes
        ));
        Tokenizer::bytes().save_dir(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        let corpus = dir.path().join("c.txt");
        std::fs::write(&corpus, sample_text()).unwrap();
        let t = train_bpe(
            &[corpus],
            ("text", Part::train()),
            280,
            &dir.path().join("a.json"),
        )
        .unwrap();
        let run = dir.path().join("run");
        t.save_dir(&run).unwrap();
        let names: Vec<_> = std::fs::read_dir(&run)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("tokenizer.json")]);
        let back = Tokenizer::load_dir(&run).unwrap();
        assert_eq!(back.vocab_size(), t.vocab_size());
        assert_eq!(back.encode("fox 42").unwrap(), t.encode("fox 42").unwrap());
    }

    /// A model directory's chat template files (as transformers 4.5x and later save them) and
    /// its special-token map go wherever its tokenizer goes, unchanged; a chat template given
    /// to the tokenizer replaces its `chat_template.jinja` and leaves the rest.
    #[test]
    fn chat_template_files_travel_with_the_tokenizer() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("model");
        std::fs::create_dir_all(src.join(NAMED_TEMPLATES_DIR)).unwrap();
        std::fs::write(src.join(FILE_NAME), word_level_json(&["</s>"])).unwrap();
        let files = [
            (
                "tokenizer_config.json",
                r#"{"eos_token": "</s>", "chat_template": "{{ old }}"}"#,
            ),
            (TEMPLATE_FILE, "{{ messages }}"),
            ("special_tokens_map.json", r#"{"eos_token": "</s>"}"#),
            ("additional_chat_templates/tool_use.jinja", "{{ tools }}"),
            ("additional_chat_templates/default.jinja", "{{ default }}"),
        ];
        for (name, text) in files {
            std::fs::write(src.join(name), text).unwrap();
        }
        let read = |dir: &Path, name: &str| std::fs::read_to_string(dir.join(name)).ok();
        let t = Tokenizer::load_dir(&src).unwrap();
        let copy = d.path().join("copy");
        t.clone().save_dir(&copy).unwrap();
        for (name, text) in files {
            assert_eq!(read(&copy, name).as_deref(), Some(text), "{name}");
        }
        let mine = d.path().join("mine");
        t.clone()
            .with_chat_template(Some("mine"), Some("my tools"))
            .save_dir(&mine)
            .unwrap();
        assert_eq!(read(&mine, TEMPLATE_FILE).as_deref(), Some("mine"));
        // A named default would win over the template given.
        assert!(!mine
            .join("additional_chat_templates/default.jinja")
            .exists());
        assert_eq!(
            read(&mine, "additional_chat_templates/tool_use.jinja").as_deref(),
            Some("my tools")
        );
        let plain = d.path().join("plain");
        t.clone()
            .with_chat_template(Some("mine"), None)
            .save_dir(&plain)
            .unwrap();
        assert!(!plain.join("additional_chat_templates").exists());
        // A template in the config is the one given too, where a reader of it alone finds it.
        let config = |dir: &Path| -> serde_json::Value {
            serde_json::from_str(&read(dir, "tokenizer_config.json").unwrap()).unwrap()
        };
        assert_eq!(config(&plain)["chat_template"], "mine");
        assert_eq!(config(&plain)["eos_token"], "</s>");
        assert_eq!(
            config(&mine)["chat_template"],
            serde_json::json!([
                {"name": "default", "template": "mine"},
                {"name": "tool_use", "template": "my tools"}
            ])
        );
        let none = d.path().join("none");
        t.clone()
            .with_chat_template(None, None)
            .save_dir(&none)
            .unwrap();
        assert!(config(&none).get("chat_template").is_none());
        // A list of named templates keeps the ones of other names.
        let listed = d.path().join("listed");
        std::fs::create_dir_all(&listed).unwrap();
        std::fs::write(listed.join(FILE_NAME), word_level_json(&["</s>"])).unwrap();
        std::fs::write(
            listed.join("tokenizer_config.json"),
            r#"{"chat_template": [{"name": "default", "template": "old"},
                {"name": "rag", "template": "{{ documents }}"}]}"#,
        )
        .unwrap();
        let again = d.path().join("again");
        Tokenizer::load_dir(&listed)
            .unwrap()
            .with_chat_template(Some("mine"), None)
            .save_dir(&again)
            .unwrap();
        assert_eq!(
            config(&again)["chat_template"],
            serde_json::json!([
                {"name": "default", "template": "mine"},
                {"name": "rag", "template": "{{ documents }}"}
            ])
        );
        let reread = Tokenizer::load_dir(&mine).unwrap();
        assert_eq!(reread.eos_id(), t.eos_id());
    }

    /// The byte tokenizer maps tokens to ids as the tokenizer.json an hf export of its model
    /// carries, and not as GPT-2's.
    #[test]
    fn the_byte_tokenizers_vocabulary_is_its_exported_tokenizer_jsons() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(FILE_NAME);
        std::fs::write(&path, byte_level_json().unwrap()).unwrap();
        let exported = Tokenizer::from_file(&path).unwrap();
        assert!(!exported.is_bytes());
        assert!(exported.same_vocabulary(&Tokenizer::bytes()));
        assert!(Tokenizer::bytes().same_vocabulary(&exported));
        let gpt2 =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/gpt2/tokenizer.json");
        let gpt2 = Tokenizer::from_file(&gpt2).unwrap();
        assert!(!gpt2.same_vocabulary(&Tokenizer::bytes()));
        assert!(!Tokenizer::bytes().same_vocabulary(&gpt2));
    }

    /// A chat template given to a byte-level run stays with its tokenizer: saved beside its
    /// checkpoint (with the `bos_token` and `eos_token` it rendered), loaded back with it, and
    /// saved again by the next stage, so that a run from that checkpoint renders conversations
    /// as this one trained on them. The ids are the byte tokenizer's all along; without a
    /// template it is the plain byte tokenizer again, and writes nothing.
    #[test]
    fn the_byte_tokenizer_keeps_a_chosen_chat_template() {
        use crate::data::chat_template::ChatTemplate;
        let d = tempfile::tempdir().unwrap();
        let read = |dir: &Path, name: &str| std::fs::read_to_string(dir.join(name)).ok();
        let chatml = "{% for m in messages %}{{ bos_token }}<|im_start|>{{ m['role'] }}\n\
                      {{ m['content'] }}<|im_end|>{{ eos_token }}\n{% endfor %}\
                      {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let tools = "{{ tools }}";
        let tok = Tokenizer::bytes()
            .with_chat_template(Some(chatml), Some(tools))
            .with_template_tokens("", "</s>");
        assert!(tok.is_bytes() && tok.same_vocabulary(&Tokenizer::bytes()));
        assert_eq!(
            (tok.vocab_size(), tok.eos_id(), tok.pad_id()),
            (BYTE_VOCAB, BYTE_EOS, BYTE_PAD)
        );
        assert_eq!(tok.encode("<|im_start|>").unwrap().len(), 12);
        assert_eq!(tok.describe(), "bytes");
        let ckpt = d.path().join("ckpt");
        std::fs::create_dir(&ckpt).unwrap();
        tok.save_dir(&ckpt).unwrap();
        assert!(!ckpt.join(FILE_NAME).exists());
        assert_eq!(read(&ckpt, TEMPLATE_FILE).as_deref(), Some(chatml));
        let tool_use = format!("{NAMED_TEMPLATES_DIR}/tool_use.jinja");
        assert_eq!(read(&ckpt, &tool_use).as_deref(), Some(tools));

        // Loaded back, the template renders as it did where it was given.
        let back = Tokenizer::load_dir(&ckpt).unwrap();
        assert!(matches!(back, Tokenizer::BytesWithTemplate { .. }));
        assert_eq!(back.carried(TEMPLATE_FILE), Some(chatml));
        let given =
            ChatTemplate::from_source(chatml.into(), "".into(), "</s>".into(), &ckpt).unwrap();
        let reread = ChatTemplate::in_dir(&ckpt).unwrap().unwrap();
        assert_eq!(reread.source(), Some(chatml));
        assert_eq!(reread.tool_use_source(), Some(tools));
        let msgs = [serde_json::json!({"role": "user", "content": "hi"})];
        let rendered = reread.render(&msgs, true).unwrap();
        assert_eq!(rendered, given.render(&msgs, true).unwrap());
        assert_eq!(
            rendered,
            "<|im_start|>user\nhi<|im_end|></s>\n<|im_start|>assistant\n"
        );

        // The next stage's checkpoint keeps it too.
        let next = d.path().join("next");
        std::fs::create_dir(&next).unwrap();
        back.save_dir(&next).unwrap();
        for name in [TEMPLATE_FILE, &tool_use, BYTE_TOKENS_FILE] {
            assert_eq!(read(&next, name), read(&ckpt, name), "{name}");
        }

        // Another template replaces this one and the tokens it rendered.
        let other = back
            .clone()
            .with_chat_template(Some("{{ messages }}"), None);
        assert_eq!(other.carried(TEMPLATE_FILE), Some("{{ messages }}"));
        assert_eq!(other.carried(&tool_use), None);
        assert_eq!(other.carried(BYTE_TOKENS_FILE), None);
        // None: the plain byte tokenizer, which keeps no files.
        let none = back.with_chat_template(None, None);
        assert!(matches!(none, Tokenizer::Bytes));
        assert!(matches!(
            Tokenizer::bytes().with_template_tokens("<s>", "</s>"),
            Tokenizer::Bytes
        ));
        let empty = d.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        none.save_dir(&empty).unwrap();
        assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
    }

    /// A sequence opens as transformers' `tokenizer(text)` opens it: with BOS where the
    /// tokenizer's post-processor writes one (the Llama and Mistral fixtures; ids checked
    /// against transformers 5.24), with nothing where it writes none (Qwen2, GPT-2), and
    /// never with a second BOS after the one a chat template wrote.
    #[test]
    fn a_sequence_opens_as_transformers_opens_it() {
        let fixture = |name: &str| {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");
            Tokenizer::load_dir(&dir.join(name)).unwrap()
        };
        let bare = [258, 75, 75, 78, 220, 276, 81, 75, 67];
        let llama = fixture("llama");
        let mut with_bos = vec![300];
        with_bos.extend(bare);
        assert_eq!(llama.encode("hello world").unwrap(), bare);
        assert_eq!(llama.encode_start("hello world").unwrap(), with_bos);
        assert_eq!(
            llama.encode_start("<|begin_of_text|>hello world").unwrap(),
            with_bos
        );
        let mistral = fixture("mistral");
        assert_eq!(
            mistral.encode_start("hello world").unwrap(),
            [1, 261, 78, 78, 81, 223, 279, 84, 78, 70]
        );
        for name in ["qwen2", "gpt2"] {
            assert_eq!(
                fixture(name).encode_start("hello world").unwrap(),
                bare,
                "{name}"
            );
        }
        assert_eq!(
            Tokenizer::bytes().encode_start("hi").unwrap(),
            [b'h' as u32, b'i' as u32]
        );
    }

    /// `add_bos_token` and `add_eos_token` rule over tokenizer.json's post-processor, as
    /// transformers rebuilds it from them: Llama's fixture writes BOS, but not once its config
    /// says `add_bos_token: false`; a tokenizer.json that writes none opens with BOS under
    /// `add_bos_token: true`. `add_eos_token: true` leaves a plain document ending with one EOS.
    #[test]
    fn add_bos_and_eos_token_flags_decide_the_opening() {
        use crate::data::records::{Segment, SftExample};
        use crate::stages::batch::encode_example;
        let d = tempfile::tempdir().unwrap();
        let llama = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama");
        let with_config = |name: &str, tokenizer: &str, config: &str| {
            let dir = d.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(FILE_NAME), tokenizer).unwrap();
            std::fs::write(dir.join("tokenizer_config.json"), config).unwrap();
            Tokenizer::load_dir(&dir)
        };
        let llama_json = std::fs::read_to_string(llama.join(FILE_NAME)).unwrap();
        let config = r#"{"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
            "add_bos_token": false, "add_eos_token": true}"#;
        let t = with_config("no_bos", &llama_json, config).unwrap();
        let bare = t.encode("hello world").unwrap();
        assert_eq!(
            Tokenizer::load_dir(&llama)
                .unwrap()
                .encode_start("hello world")
                .unwrap()[0],
            300
        );
        assert_eq!(t.encode_start("hello world").unwrap(), bare);
        let doc = SftExample {
            segments: vec![Segment {
                text: "hello world".into(),
                train: true,
            }],
            append_eos: true,
            origin: None,
            train_all: false,
        };
        let (ids, _) = encode_example(&t, &doc).unwrap();
        assert_eq!(ids, [bare.as_slice(), &[t.eos_id()]].concat());

        let plain = word_level_json(&["<s>", "</s>"]);
        let t = with_config(
            "bos",
            &plain,
            r#"{"bos_token": "<s>", "add_bos_token": true}"#,
        )
        .unwrap();
        assert_eq!(t.encode_start("a b").unwrap(), [2, 0, 1]);
        let e = with_config("no_name", &plain, r#"{"add_bos_token": true}"#).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("tokenizer_config.json") && e.contains("add_bos_token"),
            "{e}"
        );
        let e = with_config("bad", &plain, r#"{"add_eos_token": "yes"}"#).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("tokenizer_config.json") && e.contains("add_eos_token"),
            "{e}"
        );
    }

    /// A minimal WordLevel tokenizer.json with the given extra vocabulary entries.
    fn word_level_json(extra: &[&str]) -> String {
        let mut vocab = vec![("\"a\"".to_string(), 0), ("\"b\"".to_string(), 1)];
        for (i, t) in extra.iter().enumerate() {
            vocab.push((format!("\"{t}\""), i + 2));
        }
        let vocab: Vec<String> = vocab.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,
            "decoder":null,"model":{{"type":"WordLevel","vocab":{{{}}},"unk_token":"a"}}}}"#,
            vocab.join(", ")
        )
    }

    #[test]
    fn eos_and_pad_detection() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.json");

        std::fs::write(&p, word_level_json(&["<pad>", "</s>", "<eos>"])).unwrap();
        let t = Tokenizer::from_file(&p).unwrap();
        // "</s>" comes before "<eos>" in the preference order.
        assert_eq!(t.eos_id(), 3);
        assert_eq!(t.pad_id(), 2);
        assert_eq!(t.vocab_size(), 5);
        assert_eq!(t.describe(), "wordlevel(vocab=5)");

        std::fs::write(&p, word_level_json(&["<|end_of_text|>"])).unwrap();
        let t = Tokenizer::from_file(&p).unwrap();
        assert_eq!(t.eos_id(), 2);
        assert_eq!(t.pad_id(), 2, "pad falls back to eos");

        std::fs::write(&p, word_level_json(&["<unk>"])).unwrap();
        let e = format!("{:#}", Tokenizer::from_file(&p).unwrap_err());
        assert!(e.contains("t.json"), "{e}");
        assert!(e.contains("no end-of-sequence token"), "{e}");
        assert!(!e.contains('\n'));
    }

    /// The `eos_token` tokenizer_config.json names is taken even where the vocabulary has none
    /// of the names searched for; the search is the fallback for a config that names none.
    #[test]
    fn the_configs_eos_token_needs_no_known_name() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(FILE_NAME), word_level_json(&["<|im_end|>"])).unwrap();
        let e = format!("{:#}", Tokenizer::load_dir(d.path()).unwrap_err());
        assert!(e.contains("no end-of-sequence token"), "{e}");
        let config = d.path().join("tokenizer_config.json");
        std::fs::write(&config, r#"{"eos_token": {"content": "<|im_end|>"}}"#).unwrap();
        let t = Tokenizer::load_dir(d.path()).unwrap();
        assert_eq!((t.eos_id(), t.pad_id()), (2, 2));
        assert_eq!(t.stop_ids(), [2]);
        std::fs::write(&config, r#"{"eos_token": "<|eot|>"}"#).unwrap();
        let e = format!("{:#}", Tokenizer::load_dir(d.path()).unwrap_err());
        assert!(
            e.contains("tokenizer_config.json") && e.contains("eos_token") && !e.contains('\n'),
            "{e}"
        );
    }

    #[test]
    fn file_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope/tokenizer.json");
        let e = format!("{:#}", Tokenizer::from_file(&missing).unwrap_err());
        assert!(e.contains(&missing.display().to_string()), "{e}");

        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{not json").unwrap();
        let e = format!("{:#}", Tokenizer::from_file(&bad).unwrap_err());
        assert!(e.contains("bad.json") && e.contains("not a valid"), "{e}");

        let e = format!(
            "{:#}",
            train_bpe(
                std::slice::from_ref(&missing),
                ("text", Part::train()),
                300,
                &dir.path().join("o.json")
            )
            .unwrap_err()
        );
        assert!(e.contains(&missing.display().to_string()), "{e}");
        let e = format!(
            "{:#}",
            train_bpe(
                &[bad],
                ("text", Part::train()),
                10,
                &dir.path().join("o.json")
            )
            .unwrap_err()
        );
        assert!(e.contains("vocab_size 10"), "{e}");
    }
}
