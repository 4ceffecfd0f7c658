//! PEFT LoRA adapter directories: the base they name, and their factors under temper's names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::config::At;
use super::names::{
    gemma3_language_name, is_gemma3_vision, layer_of, llama_to_temper, qkv_rows, GPT2_CONV, QKV,
};
use super::{is_model_dir, Family, Head};
use crate::json_error::json_error;

/// A PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`):
/// its base model's path, and its factors under temper's names (`model.layers.0.attn.q.lora_a`
/// `[r, in]`, `..lora_b` `[out, r]`), each B scaled by its module's `lora_alpha / r` (the
/// config's, or `alpha_pattern`'s and `rank_pattern`'s where they name the module; `lora_alpha /
/// sqrt(r)` under `use_rslora`), and under `use_dora` each module's magnitude vector
/// (`..lora_magnitude`, `[out]`), which the merge (`merge_adapters` in stages/loader.rs) applies. An adapter of TRL's
/// RewardTrainer with a peft_config makes its base a one-label classifier, a reward model,
/// whose new score head it saves whole (`modules_to_save`): task type `SEQ_CLS`, or none (the
/// `LoraConfig(modules_to_save=["score"])` of TRL's documentation) beside a score head.
pub struct PeftAdapter {
    pub base: PathBuf,
    pub tensors: HashMap<String, Tensor>,
    pub head: Head,
    /// A reward adapter's score head, under its Hugging Face names (`score.weight`
    /// `[1, H]`, perhaps `score.bias`).
    pub score: HashMap<String, Tensor>,
}

/// Whether `dir` is a PEFT adapter directory.
pub fn is_peft_dir(dir: &Path) -> bool {
    dir.join("adapter_config.json").is_file() && dir.join("adapter_model.safetensors").is_file()
}

/// Whether `dir` is a Hugging Face model or a PEFT adapter on one: a model trained elsewhere,
/// never on the built-in task.
pub fn is_pretrained_dir(dir: &Path) -> bool {
    is_model_dir(dir) || is_peft_dir(dir)
}

/// The parsed `adapter_config.json` of the adapter directory `dir`, and its path.
fn peft_config(dir: &Path) -> Result<(serde_json::Value, PathBuf)> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("{}: cannot read", cfg_path.display()))?;
    let v = serde_json::from_str(&text).map_err(|e| json_error(&cfg_path, &text, &e))?;
    Ok((v, cfg_path))
}

/// The base model directory an adapter names: `base_model_name_or_path`, relative to the
/// current directory or to the adapter's.
pub fn peft_base(dir: &Path) -> Result<PathBuf> {
    let (v, cfg_path) = peft_config(dir)?;
    base_named(dir, &v, &cfg_path)
}

/// [`peft_base`] of the adapter at `dir` whose `adapter_config.json` (at `cfg_path`) is `v`.
fn base_named(dir: &Path, v: &serde_json::Value, cfg_path: &Path) -> Result<PathBuf> {
    let at = At(cfg_path);
    let field = v.get("base_model_name_or_path");
    let named = field
        .and_then(|b| b.as_str())
        .map(PathBuf::from)
        .ok_or_else(|| {
            // temper's export leaves it null where the run's base was no Hugging Face model.
            let what = match field {
                None => "missing",
                Some(serde_json::Value::Null) => "null",
                Some(_) => "not a path",
            };
            at.refuse(
                "base_model_name_or_path",
                format!("{what}: the base model's directory is needed (set it to that directory)"),
            )
        })?;
    // A Hub adapter names its base by its Hub name (at PEFT's `revision`, where it gives
    // one), which the cache may hold: looked up only where no local directory is the base.
    let cached = || {
        let hub = crate::hub_cache::Repo::Model;
        let at = match v.get("revision").and_then(|r| r.as_str()) {
            Some(r) => PathBuf::from(format!("{}@{r}", named.display())),
            None => named.clone(),
        };
        crate::hub_cache::locate(&at, hub, "base_model_name_or_path")
    };
    if let Some(local) = [named.clone(), dir.join(&named)]
        .into_iter()
        .find(|p| is_model_dir(p))
    {
        return Ok(local);
    }
    match cached() {
        Ok(p) if is_model_dir(&p) => Ok(p),
        // The cache's own reason (a revision it lacks, and the download that fetches it).
        Err(e) => Err(at.refuse("base_model_name_or_path", format!("{e:#}"))),
        Ok(_) => Err(at.refuse(
            "base_model_name_or_path",
            format!("{} is not a Hugging Face model directory", named.display()),
        )),
    }
}

pub fn read_peft(dir: &Path, device: &Device) -> Result<PeftAdapter> {
    let (v, cfg_path) = peft_config(dir)?;
    let at = At(&cfg_path);
    if v.get("peft_type").and_then(|t| t.as_str()) != Some("LORA") {
        return Err(at.refuse("peft_type", "only LORA adapters are read"));
    }
    let flag = |name: &str| -> Result<bool> {
        match v.get(name) {
            None | Some(serde_json::Value::Null) => Ok(false),
            Some(f) => f
                .as_bool()
                .ok_or_else(|| at.refuse(name, "not true or false")),
        }
    };
    let (rslora, dora) = (flag("use_rslora")?, flag("use_dora")?);
    // None where the adapter names no task: then its tensors decide.
    let declared = match v.get("task_type").and_then(|t| t.as_str()) {
        None => None,
        Some("CAUSAL_LM") => Some(Head::Lm),
        Some("SEQ_CLS") => Some(Head::Score),
        Some(other) => {
            return Err(at.refuse(
                "task_type",
                format!("`{other}`: CAUSAL_LM and SEQ_CLS (a reward model) adapters are read"),
            ))
        }
    };
    // Layers copied into a deeper model than the base: no merge into the base holds them.
    if v.get("layer_replication").is_some_and(|x| !x.is_null()) {
        return Err(at.refuse(
            "layer_replication",
            "the adapter stacks copies of the base's layers, which temper does not build: merge \
             it with PEFT (merge_and_unload) and read the merged model",
        ));
    }
    refuse_other_forwards(&v, &at)?;
    let r = at.need(v.get("r").and_then(|x| x.as_f64()), "r")?;
    let alpha = at.need(v.get("lora_alpha").and_then(|x| x.as_f64()), "lora_alpha")?;
    let ranks = ModulePattern::read(&v, "rank_pattern", &at)?;
    let alphas = ModulePattern::read(&v, "alpha_pattern", &at)?;
    let base = base_named(dir, &v, &cfg_path)?;
    let file = dir.join("adapter_model.safetensors");
    let raw = candle_core::safetensors::load(&file, device)
        .with_context(|| format!("{}: cannot read", file.display()))?;
    let mut names: Vec<&String> = raw.keys().collect();
    names.sort();
    check_pairs(&names).with_context(|| file.display().to_string())?;
    if let Some(bias) = names.iter().find(|n| n.ends_with(".bias")) {
        return Err(at.refuse(
            "bias",
            format!(
                "{:?}: the adapter trains biases ({bias} in {}), which temper does not read: \
                 merge it with PEFT (merge_and_unload) and read the merged model",
                v.get("bias").unwrap_or(&serde_json::Value::Null),
                file.display()
            ),
        ));
    }
    match dora {
        true => check_magnitudes(&raw, &names).with_context(|| {
            format!(
                "{}: use_dora is true in {}",
                file.display(),
                cfg_path.display()
            )
        })?,
        false => {
            if let Some(name) = names.iter().find(|n| n.ends_with(MAGNITUDE)) {
                return Err(at.refuse(
                    "use_dora",
                    format!("false, but the adapter holds DoRA's magnitude {name}"),
                ));
            }
        }
    }
    let (mut tensors, mut score) = (HashMap::new(), HashMap::new());
    for (name, t) in raw {
        let t = t.to_dtype(DType::F32)?;
        let module = name.strip_prefix("base_model.model.");
        if let Some(m) = module.filter(|m| declared != Some(Head::Lm) && m.starts_with("score.")) {
            score.insert(m.to_string(), t);
            continue;
        }
        let module = module.and_then(|m| m.rsplit_once(".lora_").map(|(m, _)| m));
        // PEFT builds each module's factors at the rank its config gives, and refuses a file
        // whose factors are of another.
        if let (Some(m), true) = (module, name.ends_with(".lora_A.weight")) {
            let rank = ranks.of(m).unwrap_or(r);
            if t.dim(0)? as f64 != rank {
                return Err(at.refuse(
                    "r",
                    format!(
                        "{rank} for {m} (rank_pattern, else r), where its lora_A in {} has {} \
                         rows",
                        file.display(),
                        t.dim(0)?
                    ),
                ));
            }
        }
        let t = match (module, name.ends_with(".lora_B.weight")) {
            (Some(m), true) => {
                let (a, r) = (alphas.of(m).unwrap_or(alpha), ranks.of(m).unwrap_or(r));
                (t * crate::config::scale_of(a, r, rslora))?
            }
            _ => t,
        };
        let ours = peft_to_temper(&name, &t)
            .with_context(|| format!("{}: tensor {name}", file.display()))?;
        tensors.extend(ours);
    }
    let head = match declared {
        Some(h) => h,
        None if score.is_empty() => Head::Lm,
        None => Head::Score,
    };
    if head == Head::Score && !score.contains_key("score.weight") {
        bail!(
            "{}: a SEQ_CLS adapter without its score head (base_model.model.score.weight): \
             the classifier's head is not saved",
            file.display()
        );
    }
    Ok(PeftAdapter {
        base,
        tensors,
        head,
        score,
    })
}

/// Refuses the settings under which PEFT computes something other than `W x + s B A x` (and
/// DoRA's rescaling of it) from the saved factors, or rewrites the base model's weights as it
/// loads the adapter: merged as a plain LoRA they would give other logits, silently.
fn refuse_other_forwards(v: &serde_json::Value, at: &At) -> Result<()> {
    let set = |name: &str| v.get(name).filter(|x| !x.is_null() && **x != false);
    let merge = "merge it with PEFT (merge_and_unload) and read the merged model";
    // A LoRA variant's own forward (VeLoRA changes only the backward, and reads as LoRA).
    for (field, what) in [
        (
            "alora_invocation_tokens",
            "an aLoRA adapter acts only from its invocation tokens on",
        ),
        ("use_qalora", "QA-LoRA pools each factor's inputs by group"),
        ("use_bdlora", "BD-LoRA's factors are block-diagonal"),
        (
            "arrow_config",
            "Arrow routes each token among several adapters",
        ),
        ("kasa_config", "KaSA rescales the base's singular values"),
        ("monteclora_config", "MonteCLoRA samples its factors"),
        ("lora_bias", "the adapter's B has a bias"),
        (
            "trainable_token_indices",
            "the adapter trains rows of the embedding",
        ),
    ] {
        if let Some(x) = set(field) {
            return Err(at.refuse(
                field,
                format!("{x}: {what}, which temper does not read: {merge}"),
            ));
        }
    }
    if let Some(x) = v
        .get("target_parameters")
        .filter(|x| x.as_array().is_some_and(|a| !a.is_empty()))
    {
        return Err(at.refuse(
            "target_parameters",
            format!("{x}: the adapter targets parameters (an MoE's experts), not modules: {merge}"),
        ));
    }
    // A SEQ_CLS adapter saves its head (`score`; PEFT lists `classifier` beside it).
    if let Some(other) = (v.get("modules_to_save").and_then(|m| m.as_array()))
        .into_iter()
        .flatten()
        .find(|m| !matches!(m.as_str(), Some("score" | "classifier")))
    {
        return Err(at.refuse(
            "modules_to_save",
            format!("{other}: the adapter saves a whole module beside its factors, which temper reads only for a reward model's score head: {merge}"),
        ));
    }
    // These initialisations subtract the adapter's start from the base's weights as PEFT
    // loads it: the saved factors mean nothing on the untouched base.
    let init = v.get("init_lora_weights").and_then(|x| x.as_str());
    if let Some(init) = init.filter(|i| {
        let i = i.to_lowercase();
        ["pissa", "olora", "corda", "loftq", "lora_ga"]
            .iter()
            .any(|p| i.starts_with(p))
    }) {
        return Err(at.refuse(
            "init_lora_weights",
            format!(
                "`{init}` trains the factors against a base its start was taken out of (PEFT \
                 takes it out again as it loads PiSSA, OLoRA, CorDA and LoftQ adapters): save it \
                 converted (PEFT's path_initial_model_for_weight_conversion), or {merge}"
            ),
        ));
    }
    Ok(())
}

/// Every LoRA factor has its partner: a `lora_B` without its `lora_A` (or the reverse) would
/// leave its module unadapted, silently.
fn check_pairs(names: &[&String]) -> Result<()> {
    for name in names {
        for (this, other) in [
            (".lora_A.weight", ".lora_B.weight"),
            (".lora_B.weight", ".lora_A.weight"),
        ] {
            if let Some(module) = name.strip_suffix(this) {
                let partner = format!("{module}{other}");
                if !names.iter().any(|n| **n == partner) {
                    bail!("{name} has no {partner} beside it: a LoRA factor needs its partner");
                }
            }
        }
    }
    Ok(())
}

/// PEFT's `rank_pattern` or `alpha_pattern`: values for the modules whose names end in a key
/// (a regular expression), the first such key deciding, as PEFT reads them.
struct ModulePattern(Vec<(regex::Regex, f64)>);

impl ModulePattern {
    fn read(v: &serde_json::Value, field: &str, at: &At) -> Result<Self> {
        let Some(map) = v.get(field).and_then(|p| p.as_object()) else {
            return Ok(Self(Vec::new()));
        };
        let entries = map.iter().map(|(key, value)| {
            // The regex crate's errors draw the pattern over several lines.
            let re = regex::Regex::new(&format!("^(.*\\.)?(?:{key})$")).map_err(|e| {
                let why = e
                    .to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ");
                at.refuse(
                    field,
                    format!("key `{key}` is not a pattern temper reads ({why})"),
                )
            })?;
            let value = value
                .as_f64()
                .ok_or_else(|| at.refuse(field, format!("key `{key}`: not a number")))?;
            Ok((re, value))
        });
        Ok(Self(entries.collect::<Result<_>>()?))
    }

    /// The value for module `name` (`transformer.h.0.attn.c_attn`), if a key matches it.
    fn of(&self, name: &str) -> Option<f64> {
        self.0
            .iter()
            .find(|(re, _)| re.is_match(name))
            .map(|(_, v)| *v)
    }
}

/// The suffix of a DoRA magnitude vector's name in a PEFT adapter (PEFT saves the parameter
/// `lora_magnitude_vector.default.weight` under this name).
const MAGNITUDE: &str = ".lora_magnitude_vector";

/// Every module of a DoRA adapter (the file's tensors `raw`, their `names` sorted) with a B
/// has its magnitude vector, one length per output, and every magnitude its module's B.
fn check_magnitudes(raw: &HashMap<String, Tensor>, names: &[&String]) -> Result<()> {
    for name in names {
        if let Some(module) = name.strip_suffix(".lora_B.weight") {
            let key = format!("{module}{MAGNITUDE}");
            let Some(m) = raw.get(&key) else {
                bail!("{key} is missing: a DoRA adapter has a magnitude vector for each module");
            };
            let out = raw[*name].dim(0)?;
            if m.dims() != [out] {
                bail!(
                    "{key} has shape {:?}, not [{out}], its module's outputs",
                    m.dims()
                );
            }
        } else if let Some(module) = name.strip_suffix(MAGNITUDE) {
            if !raw.contains_key(&format!("{module}.lora_B.weight")) {
                bail!("{name} has no {module}.lora_B.weight beside it: no adapter to scale");
            }
        }
    }
    Ok(())
}

/// `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` ->
/// `model.layers.0.attn.q.lora_a`, and GPT-2's through [`gpt2_peft_to_temper`].
pub(super) fn peft_to_temper(name: &str, t: &Tensor) -> Result<Vec<(String, Tensor)>> {
    let rest = name
        .strip_prefix("base_model.model.")
        .context("not a PEFT LoRA tensor name")?;
    let (module, factor) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, "lora_a")
    } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
        (m, "lora_b")
    } else if let Some(m) = rest.strip_suffix(MAGNITUDE) {
        (m, "lora_magnitude")
    } else {
        bail!("not a LoRA factor (lora_A / lora_B) or DoRA magnitude (lora_magnitude_vector)");
    };
    if let Some(gpt2) = module.strip_prefix("transformer.") {
        return gpt2_peft_to_temper(gpt2, factor, t);
    }
    // LoRA factors sit on the projections, named alike in every llama-like family (in Gemma
    // 3's image-and-text models, inside its language model).
    if is_gemma3_vision(module) {
        bail!("a LoRA factor of Gemma 3's vision tower: temper trains the language model alone");
    }
    let module = gemma3_language_name(module);
    let ours = llama_to_temper(Family::Llama, &format!("{module}.weight"))?;
    let ours = format!("{}.{factor}", ours.trim_end_matches(".weight"));
    Ok(vec![(ours, t.clone())])
}

/// A PEFT factor of GPT-2's module `module` (`h.0.attn.c_attn`) under temper's names. PEFT
/// keeps a Conv1D's factors in a linear layer's layout (A `[r, in]`, B `[out, r]`;
/// `fan_in_fan_out` transposes only their product), so they map as they stand, except that
/// c_attn's output rows are q's, k's and v's in turn: each of the three takes its third of B,
/// with the whole A.
fn gpt2_peft_to_temper(module: &str, factor: &str, t: &Tensor) -> Result<Vec<(String, Tensor)>> {
    let (i, tail) = layer_of(module, "h.")
        .context("not a LoRA factor of a GPT-2 layer (transformer.h.N....)")?;
    let pre = format!("model.layers.{i}");
    if tail == "attn.c_attn" {
        // B's rows, and DoRA's magnitudes, are outputs: q's, k's and v's in turn.
        let rows = t.dim(0)?;
        let by_output = factor != "lora_a";
        if by_output && rows % 3 != 0 {
            bail!("c_attn's {factor} has {rows} rows, not q's, k's and v's outputs in three equal parts");
        }
        let parts = match by_output {
            true => qkv_rows(t, rows / 3)?,
            false => vec![t.clone(); 3],
        };
        let named = QKV.iter().zip(parts);
        return Ok(named
            .map(|(which, part)| (format!("{pre}.attn.{which}.{factor}"), part))
            .collect());
    }
    match GPT2_CONV.iter().find(|(hf, _)| *hf == tail) {
        Some((_, ours)) => Ok(vec![(format!("{pre}.{ours}.{factor}"), t.clone())]),
        None => {
            bail!("{tail}: LoRA on GPT-2 is read on c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj")
        }
    }
}
