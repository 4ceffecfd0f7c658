//! Tensor names and shapes both ways between temper and each family's files (GPT-2's
//! Conv1D weights transposed and its q, k and v split out of `c_attn` and fused back).

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use super::{Family, Head};
use crate::config::{MlpKind, ModelConfig, NormKind, PositionKind};

/// Every tensor of a model of `cfg` under temper's names, with its shape, in the model's
/// order: what `Transformer::new` creates (a test holds the two together).
pub(super) fn temper_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
    let (qw, kv) = (cfg.attn_width(), cfg.num_key_value_heads * hd);
    let mut out = vec![("model.embed.weight".to_string(), vec![cfg.vocab_size, h])];
    if cfg.position == PositionKind::Learned {
        out.push((
            "model.pos_embed.weight".into(),
            vec![cfg.max_position_embeddings, h],
        ));
    }
    let norm = |out: &mut Vec<(String, Vec<usize>)>, pre: &str| {
        out.push((format!("{pre}.weight"), vec![h]));
        if cfg.norm == NormKind::LayerNorm {
            out.push((format!("{pre}.bias"), vec![h]));
        }
    };
    let linear = |out: &mut Vec<(String, Vec<usize>)>, pre: &str, inp, width, bias| {
        out.push((format!("{pre}.weight"), vec![width, inp]));
        if bias {
            out.push((format!("{pre}.bias"), vec![width]));
        }
    };
    let qkv_bias = cfg.bias || cfg.qkv_bias;
    for l in 0..cfg.num_hidden_layers {
        let pre = format!("model.layers.{l}");
        norm(&mut out, &format!("{pre}.attn_norm"));
        linear(&mut out, &format!("{pre}.attn.q"), h, qw, qkv_bias);
        linear(&mut out, &format!("{pre}.attn.k"), h, kv, qkv_bias);
        linear(&mut out, &format!("{pre}.attn.v"), h, kv, qkv_bias);
        linear(&mut out, &format!("{pre}.attn.o"), qw, h, cfg.bias);
        if cfg.qk_norm {
            out.push((format!("{pre}.attn.q_norm.weight"), vec![hd]));
            out.push((format!("{pre}.attn.k_norm.weight"), vec![hd]));
        }
        if cfg.post_norms {
            norm(&mut out, &format!("{pre}.attn_post_norm"));
        }
        norm(&mut out, &format!("{pre}.mlp_norm"));
        if cfg.mlp != MlpKind::Gelu {
            linear(&mut out, &format!("{pre}.mlp.gate"), h, i, cfg.bias);
        }
        linear(&mut out, &format!("{pre}.mlp.up"), h, i, cfg.bias);
        linear(&mut out, &format!("{pre}.mlp.down"), i, h, cfg.bias);
        if cfg.post_norms {
            norm(&mut out, &format!("{pre}.mlp_post_norm"));
        }
    }
    norm(&mut out, "model.final_norm");
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
    }
    out
}

/// The tensors a Hugging Face file of `family` holds for a model of `cfg` with `head` on top,
/// with their shapes there, under the names of [`canonical_name`]: GPT-2's Conv1D weights
/// `[in, out]` and q, k, v fused in `c_attn`; a classifier's `score.weight` `[1, H]` (its
/// bias, which it lacks, temper fills in).
pub(super) fn hf_shapes(
    family: Family,
    head: Head,
    cfg: &ModelConfig,
) -> Result<Vec<(String, Vec<usize>)>> {
    let ours = temper_shapes(cfg);
    let width = |name: &str| {
        ours.iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, s)| s[0])
    };
    let mut out = Vec::with_capacity(ours.len() + 1);
    for (name, shape) in &ours {
        if family != Family::Gpt2 {
            out.push((temper_to_llama(family, name)?, shape.clone()));
            continue;
        }
        let Some((hf, conv)) = gpt2_place(name)? else {
            continue;
        };
        let mut shape = shape.clone();
        if name.contains(".attn.q.") {
            shape[0] = ["q", "k", "v"]
                .iter()
                .map(|w| width(&name.replace(".attn.q.", &format!(".attn.{w}."))))
                .sum();
        }
        if conv {
            shape.reverse();
        }
        out.push((hf, shape));
    }
    if head == Head::Score {
        out.push(("score.weight".into(), vec![1, cfg.hidden_size]));
    }
    Ok(out)
}

/// A tensor's name in a file of `family` as [`hf_shapes`] names it: GPT-2's without the
/// `transformer.` that `save_pretrained` puts before it, Gemma 3's as its language model's.
pub(super) fn canonical_name(family: Family, name: &str) -> &str {
    match family {
        Family::Gpt2 => name.strip_prefix("transformer.").unwrap_or(name),
        Family::Gemma3 => gemma3_language_name(name),
        _ => name,
    }
}

/// Name `canon` of [`hf_shapes`] as spelled by files whose tensors include one named `like`:
/// with GPT-2's `transformer.`, or the prefixes of Gemma 3's image-and-text models, where
/// `like` has them. A classifier's head has none.
pub(super) fn name_in_file(family: Family, canon: &str, like: &str) -> String {
    if canon.starts_with("score.") {
        return canon.into();
    }
    match family {
        Family::Gpt2 if like.starts_with("transformer.") => format!("transformer.{canon}"),
        Family::Gemma3 if like.starts_with("language_model.") => format!("language_model.{canon}"),
        Family::Gemma3 if like.starts_with("model.language_model.") => {
            match canon.strip_prefix("model.") {
                Some(rest) => format!("model.language_model.{rest}"),
                None => canon.into(),
            }
        }
        _ => canon.into(),
    }
}

/// GPT-2 buffers saved by older checkpoints: the causal mask, not weights.
fn is_buffer(family: Family, name: &str) -> bool {
    match family {
        Family::Gpt2 => name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias"),
        _ => name.ends_with(".rotary_emb.inv_freq"),
    }
}

/// One HF tensor as temper's tensor(s): renamed, and for GPT-2 transposed (Conv1D) and
/// split (`c_attn` into q, k, v). Buffers and a tied head's copy map to nothing.
pub(super) fn to_temper(
    family: Family,
    name: &str,
    t: &Tensor,
    cfg: &ModelConfig,
) -> Result<Vec<(String, Tensor)>> {
    let name = match family {
        Family::Gemma3 => gemma3_language_name(name),
        _ => name,
    };
    if is_buffer(family, name) || (name == "lm_head.weight" && cfg.tie_word_embeddings) {
        return Ok(vec![]);
    }
    match family {
        Family::Gpt2 => gpt2_to_temper(name, t, cfg),
        _ => Ok(vec![(llama_to_temper(family, name)?, t.clone())]),
    }
}

/// Where Gemma 3's image-and-text models keep their language model: `language_model.` before
/// its own names as transformers 4.5x and 5 save it, `model.language_model.` in place of
/// `model.` as transformers 5 holds it in memory.
pub(super) fn gemma3_language_name(name: &str) -> &str {
    if let Some(rest) = name.strip_prefix("language_model.") {
        return rest;
    }
    match name.strip_prefix("model.language_model.") {
        // `model.` stays: the rest of the name starts where the prefix's last dot was.
        Some(_) => &name["model.language_".len()..],
        None => name,
    }
}

/// Whether `name` is a tensor of Gemma 3's vision tower or its projection into the language
/// model, which temper leaves out.
pub(super) fn is_gemma3_vision(name: &str) -> bool {
    let name = name.strip_prefix("model.").unwrap_or(name);
    name.starts_with("vision_tower.") || name.starts_with("multi_modal_projector.")
}

const LLAMA_LAYER: [(&str, &str); 11] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "mlp_norm.weight"),
    ("self_attn.q_proj.weight", "attn.q.weight"),
    ("self_attn.k_proj.weight", "attn.k.weight"),
    ("self_attn.v_proj.weight", "attn.v.weight"),
    ("self_attn.o_proj.weight", "attn.o.weight"),
    ("self_attn.q_proj.bias", "attn.q.bias"),
    ("self_attn.k_proj.bias", "attn.k.bias"),
    ("self_attn.v_proj.bias", "attn.v.bias"),
    ("mlp.gate_proj.weight", "mlp.gate.weight"),
    ("mlp.up_proj.weight", "mlp.up.weight"),
];
const LLAMA_LAYER_MORE: [(&str, &str); 3] = [
    ("mlp.down_proj.weight", "mlp.down.weight"),
    ("self_attn.q_norm.weight", "attn.q_norm.weight"),
    ("self_attn.k_norm.weight", "attn.k_norm.weight"),
];
const LLAMA_TOP: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "model.embed.weight"),
    ("model.norm.weight", "model.final_norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
];

/// Gemma's four norms a layer: Llama's `post_attention_layernorm` is the MLP's input norm,
/// Gemma's the attention output's.
const GEMMA_NORMS: [(&str, &str); 4] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "attn_post_norm.weight"),
    ("pre_feedforward_layernorm.weight", "mlp_norm.weight"),
    ("post_feedforward_layernorm.weight", "mlp_post_norm.weight"),
];

/// The per-layer name pairs of a llama-like `family`, its own first.
fn layer_names(family: Family) -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    let own: &[(&str, &str)] = match family {
        Family::Gemma2 | Family::Gemma3 => &GEMMA_NORMS,
        _ => &[],
    };
    own.iter().chain(&LLAMA_LAYER).chain(&LLAMA_LAYER_MORE)
}

pub(super) fn layer_of<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let rest = name.strip_prefix(prefix)?;
    let (i, tail) = rest.split_once('.')?;
    Some((i.parse().ok()?, tail))
}

pub(super) fn llama_to_temper(family: Family, name: &str) -> Result<String> {
    if let Some((_, ours)) = LLAMA_TOP.iter().find(|(hf, _)| *hf == name) {
        return Ok(ours.to_string());
    }
    if let Some((i, tail)) = layer_of(name, "model.layers.") {
        if let Some((_, ours)) = layer_names(family).find(|(hf, _)| *hf == tail) {
            return Ok(format!("model.layers.{i}.{ours}"));
        }
    }
    bail!("not a weight of this model family (an unexpected extra tensor)")
}

/// The Hugging Face name of temper tensor `name` in a llama-like `family`.
pub fn hf_name(family: Family, name: &str) -> Result<String> {
    match family {
        Family::Gpt2 => bail!("GPT-2 fuses q, k and v: its tensors have no one-to-one names"),
        _ => temper_to_llama(family, name),
    }
}

fn temper_to_llama(family: Family, name: &str) -> Result<String> {
    if let Some((hf, _)) = LLAMA_TOP.iter().find(|(_, ours)| *ours == name) {
        return Ok(hf.to_string());
    }
    if let Some((i, tail)) = layer_of(name, "model.layers.") {
        if let Some((hf, _)) = layer_names(family).find(|(_, ours)| *ours == tail) {
            return Ok(format!("model.layers.{i}.{hf}"));
        }
    }
    bail!("temper tensor {name} has no Hugging Face name")
}

/// GPT-2's per-layer tensors that are renamed without reshaping.
const GPT2_LAYER: [(&str, &str); 4] = [
    ("ln_1.weight", "attn_norm.weight"),
    ("ln_1.bias", "attn_norm.bias"),
    ("ln_2.weight", "mlp_norm.weight"),
    ("ln_2.bias", "mlp_norm.bias"),
];
/// The projections GPT-2's `c_attn` fuses, in the order of its output rows.
pub(super) const QKV: [&str; 3] = ["q", "k", "v"];

/// q's, k's and v's rows (`h` each) of a tensor laid out as `c_attn`'s output.
pub(super) fn qkv_rows(t: &Tensor, h: usize) -> Result<Vec<Tensor>> {
    (0..QKV.len())
        .map(|j| Ok(t.narrow(0, j * h, h)?.contiguous()?))
        .collect()
}

/// GPT-2's Conv1D layers (weights stored `[in, out]`) and temper's linear for each.
pub(super) const GPT2_CONV: [(&str, &str); 3] = [
    ("attn.c_proj", "attn.o"),
    ("mlp.c_fc", "mlp.up"),
    ("mlp.c_proj", "mlp.down"),
];
/// GPT-2's name of temper's projection `module` (`attn.o` -> `attn.c_proj`), for the three
/// that are GPT-2 modules of their own (q, k and v share `attn.c_attn`).
pub fn gpt2_conv_of(module: &str) -> Option<&'static str> {
    GPT2_CONV
        .iter()
        .find(|(_, ours)| *ours == module)
        .map(|(hf, _)| *hf)
}

const GPT2_TOP: [(&str, &str); 4] = [
    ("wte.weight", "model.embed.weight"),
    ("wpe.weight", "model.pos_embed.weight"),
    ("ln_f.weight", "model.final_norm.weight"),
    ("ln_f.bias", "model.final_norm.bias"),
];

fn gpt2_to_temper(name: &str, t: &Tensor, cfg: &ModelConfig) -> Result<Vec<(String, Tensor)>> {
    // `save_pretrained` of GPT2LMHeadModel prefixes `transformer.`; the original hub files
    // do not.
    let name = name.strip_prefix("transformer.").unwrap_or(name);
    if let Some((_, ours)) = GPT2_TOP.iter().find(|(hf, _)| *hf == name) {
        return Ok(vec![(ours.to_string(), t.clone())]);
    }
    let Some((i, tail)) = layer_of(name, "h.") else {
        bail!("not a weight of this model family (an unexpected extra tensor)");
    };
    let pre = format!("model.layers.{i}");
    if let Some((_, ours)) = GPT2_LAYER.iter().find(|(hf, _)| *hf == tail) {
        return Ok(vec![(format!("{pre}.{ours}"), t.clone())]);
    }
    let (module, param) = tail
        .rsplit_once('.')
        .context("not a weight of this model family")?;
    let is_weight = param == "weight";
    // Conv1D keeps `[in, out]`; temper's linear is `[out, in]`.
    let t = if is_weight {
        t.t()?.contiguous()?
    } else {
        t.clone()
    };
    if module == "attn.c_attn" {
        let parts = qkv_rows(&t, cfg.hidden_size)?;
        let named = QKV.iter().zip(parts);
        return Ok(named
            .map(|(which, part)| (format!("{pre}.attn.{which}.{param}"), part))
            .collect());
    }
    match GPT2_CONV.iter().find(|(hf, _)| *hf == module) {
        Some((_, ours)) => Ok(vec![(format!("{pre}.{ours}.{param}"), t)]),
        None => bail!("not a weight of this model family (an unexpected extra tensor)"),
    }
}

/// Temper's tensors under Hugging Face names (GPT-2: transposed back and q/k/v fused).
pub fn export_tensors(
    family: Family,
    tensors: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    match family {
        Family::Gpt2 => {
            for (name, t) in tensors {
                if let Some((hf, t)) = temper_to_gpt2(name, t, tensors)? {
                    out.insert(hf, t);
                }
            }
        }
        _ => {
            for (name, t) in tensors {
                out.insert(temper_to_llama(family, name)?, t.clone());
            }
        }
    }
    Ok(out)
}

fn temper_to_gpt2(
    name: &str,
    t: &Tensor,
    all: &HashMap<String, Tensor>,
) -> Result<Option<(String, Tensor)>> {
    let Some((hf, conv)) = gpt2_place(name)? else {
        return Ok(None);
    };
    let t = match name.contains(".attn.q.") {
        true => {
            let part = |w: &str| {
                let n = name.replace(".attn.q.", &format!(".attn.{w}."));
                all.get(&n).with_context(|| format!("{n} missing"))
            };
            Tensor::cat(&[t, part("k")?, part("v")?], 0)?
        }
        false => t.clone(),
    };
    let t = match conv {
        true => t.t()?.contiguous()?,
        false => t,
    };
    Ok(Some((format!("transformer.{hf}"), t)))
}

/// Where temper's GPT-2 tensor `name` goes in a Hugging Face file (less `transformer.`): its
/// name there, and whether it is a Conv1D weight, stored `[in, out]`. None for k and v,
/// which join q in `c_attn`.
fn gpt2_place(name: &str) -> Result<Option<(String, bool)>> {
    if let Some((hf, _)) = GPT2_TOP.iter().find(|(_, ours)| *ours == name) {
        return Ok(Some((hf.to_string(), false)));
    }
    let (i, tail) = layer_of(name, "model.layers.")
        .with_context(|| format!("temper tensor {name} has no GPT-2 name"))?;
    let pre = format!("h.{i}");
    if let Some((hf, _)) = GPT2_LAYER.iter().find(|(_, ours)| *ours == tail) {
        return Ok(Some((format!("{pre}.{hf}"), false)));
    }
    let (module, param) = tail
        .rsplit_once('.')
        .with_context(|| format!("temper tensor {name} has no GPT-2 name"))?;
    let conv = param == "weight";
    match module {
        "attn.k" | "attn.v" => Ok(None),
        "attn.q" => Ok(Some((format!("{pre}.attn.c_attn.{param}"), conv))),
        _ => match GPT2_CONV.iter().find(|(_, ours)| *ours == module) {
            Some((hf, _)) => Ok(Some((format!("{pre}.{hf}.{param}"), conv))),
            None => bail!("temper tensor {name} has no GPT-2 name"),
        },
    }
}
