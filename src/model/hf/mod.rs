//! Hugging Face model directories in and out, for the families `llama` (Llama 3's
//! `rope_scaling` included), `qwen2` (bias on q/k/v), `qwen3` (RMSNorm of each head's q and k),
//! `mistral` (a sliding window), `smollm3` (Llama's layout with every fourth layer's rotary
//! positions left out), `gemma2` and `gemma3_text` (norms after each branch with gains held as
//! offsets from one, GeGLU, a scaled embedding, sliding layers) and `gpt2` (Conv1D weights stored
//! `[in, out]`, q/k/v fused in `c_attn`, learned positions):
//! - `config.rs` reads `config.json` through its own serde struct into a
//!   [`ModelConfig`](crate::config::ModelConfig), with `rope.rs` (rotary settings) and
//!   `windows.rs` (sliding and NoPE layers);
//! - `import.rs` reads `model.safetensors` or the shards `model.safetensors.index.json` lists
//!   (memory-mapped, tensor by tensor), every name and shape checked first;
//! - `names.rs` translates names and shapes both ways, so `export --format hf` writes back
//!   exactly what was read, and `config_json.rs` writes `config.json`;
//! - `score.rs` holds a reward model's head as a one-label classifier does; `peft.rs` reads PEFT
//!   LoRA adapter directories.

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
pub use config::{is_gemma3_image_and_text, Head, HfConfig};
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
