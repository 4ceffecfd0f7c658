//! Hugging Face model directories in and out: `config.json` (read through its own serde
//! struct, then converted to [`ModelConfig`]), `model.safetensors` or shards listed in
//! `model.safetensors.index.json` (memory-mapped, read tensor by tensor), for the families
//! `llama` (Llama 3's `rope_scaling` included), `qwen2` (bias on q/k/v), `qwen3` (RMSNorm of
//! each head's q and k), `mistral` (a sliding window), `smollm3` (Llama's layout with every
//! fourth layer's rotary positions left out), `gemma3_text` (Gemma 3's text model: norms
//! after each branch with gains held as offsets from one, GeGLU, a scaled embedding, and
//! sliding layers with a rotary base of their own) and `gpt2`; sliding windows where the family has
//! them (`sliding_window`, `use_sliding_window`, `max_window_layers`, `layer_types`)
//! (Conv1D weights stored `[in, out]`, q/k/v fused in `c_attn`, learned positions). Names are
//! translated both ways, so `export --format hf` writes back exactly what was read.

mod config;
mod config_json;
mod import;
mod names;
mod peft;
mod rope;
mod score;
#[cfg(test)]
mod tests;
mod windows;

use std::path::Path;

pub use crate::config::HfFamily as Family;
pub use config::{Head, HfConfig};
pub use config_json::config_json;
pub use import::{import, model_config, Imported};
pub use names::{export_tensors, gpt2_conv_of, hf_name};
pub use peft::{is_peft_dir, is_pretrained_dir, peft_base, read_peft, PeftAdapter};
pub use score::{fill_score_bias, score_to_hf, score_to_temper, SCORE_BIAS_FIELD};

/// A Hugging Face model's weights in one file, as `save_pretrained` names it.
pub const WEIGHTS: &str = "model.safetensors";
/// The index of a model's weights in shards, as `save_pretrained` names it.
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// Whether `dir` is a Hugging Face model directory (and not a temper checkpoint).
pub fn is_model_dir(dir: &Path) -> bool {
    dir.join("config.json").is_file()
        && !dir.join("meta.json").exists()
        && (dir.join(WEIGHTS).is_file() || dir.join(WEIGHTS_INDEX).is_file())
}
