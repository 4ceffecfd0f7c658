//! Which layers slide a window and which take no rotary positions, read from `config.json`
//! as transformers reads each family's fields.

use std::path::Path;

use anyhow::Result;

use super::config::{At, HfConfig};
use super::Family;

impl HfConfig {
    /// Per layer, whether it is a sliding layer as transformers types it: `layer_types` where
    /// the family reads it, else Qwen's from `max_window_layers` on, SmolLM3's NoPE layers,
    /// all but every `sliding_window_pattern`-th (6) of Gemma 3's, every layer of Mistral's.
    pub(super) fn sliding_layers(
        &self,
        path: &Path,
        family: Family,
        layers: usize,
        nope: &[usize],
    ) -> Result<Vec<bool>> {
        let at = At(path);
        let reads_types = matches!(
            family,
            Family::Qwen2 | Family::Qwen3 | Family::SmolLm3 | Family::Gemma2 | Family::Gemma3
        );
        if let Some(types) = self.layer_types.as_ref().filter(|_| reads_types) {
            if types.len() != layers {
                return Err(at.refuse(
                    "layer_types",
                    format!("{} entries for {layers} layers", types.len()),
                ));
            }
            let mut flags = Vec::with_capacity(layers);
            for t in types {
                flags.push(match t.as_str() {
                    "full_attention" => false,
                    "sliding_attention" => true,
                    other => {
                        return Err(at.refuse(
                            "layer_types",
                            format!(
                                "`{other}` layers are not implemented (full_attention and \
                                 sliding_attention are)"
                            ),
                        ))
                    }
                });
            }
            return Ok(flags);
        }
        let pattern = self.sliding_window_pattern.unwrap_or(6);
        if family == Family::Gemma3 && pattern == 0 {
            return Err(at.refuse("sliding_window_pattern", "must be positive"));
        }
        Ok((0..layers)
            .map(|l| match family {
                Family::Qwen2 | Family::Qwen3 => l >= self.max_window_layers.unwrap_or(28),
                Family::SmolLm3 => nope.contains(&l),
                Family::Gemma2 => l % 2 == 0,
                Family::Gemma3 => (l + 1) % pattern != 0,
                _ => true,
            })
            .collect())
    }

    /// The sliding window and the layers it spares, as transformers decides them: Mistral's
    /// `sliding_window` (4096 where the field is absent) is every layer's, whatever
    /// `layer_types` says; Qwen2's, Qwen3's (4096 where absent) and SmolLM3's only with
    /// `use_sliding_window`, Gemma 3's (4096 where absent) always, in the `sliding` layers
    /// ([`Self::sliding_layers`]). A window no shorter than the context never hides a key and
    /// is dropped; Llama has none.
    pub(super) fn windows(
        &self,
        path: &Path,
        family: Family,
        ctx: usize,
        sliding: &[bool],
    ) -> Result<(Option<usize>, Vec<usize>)> {
        let at = At(path);
        let layers = sliding.len();
        let default = match family {
            Family::Mistral | Family::Qwen2 | Family::Qwen3 | Family::Gemma2 | Family::Gemma3 => {
                Some(4096)
            }
            _ => None,
        };
        let field = self.sliding_window.unwrap_or(default);
        let qwen_like = matches!(family, Family::Qwen2 | Family::Qwen3 | Family::SmolLm3);
        let window = match family {
            _ if qwen_like => field.filter(|_| self.use_sliding_window == Some(true)),
            Family::Mistral | Family::Gemma2 | Family::Gemma3 => field,
            _ => None,
        };
        if window == Some(0) {
            return Err(at.refuse("sliding_window", "must be at least 1"));
        }
        let types = self.layer_types.as_ref().filter(|_| qwen_like);
        let slides = |types: &Vec<String>| types.iter().any(|t| t == "sliding_attention");
        // Without use_sliding_window Qwen slides nothing, whatever layer_types says (some
        // transformers versions wrote sliding_attention from max_window_layers on regardless).
        // SmolLM3 keeps `sliding_window` then, and transformers masks those layers with it
        // while its attention ignores it: no one reading of such a file is right.
        if family == Family::SmolLm3
            && window.is_none()
            && field.is_some()
            && types.is_some_and(slides)
        {
            return Err(at.refuse(
                "use_sliding_window",
                "false beside a sliding_window and sliding_attention layers is ambiguous",
            ));
        }
        match window.filter(|&w| w < ctx) {
            Some(w) if sliding.contains(&true) => {
                let full = (0..layers).filter(|&l| !sliding[l]).collect();
                Ok((Some(w), full))
            }
            _ => Ok((None, Vec::new())),
        }
    }

    /// SmolLM3's layers without rotary positions, from `no_rope_layers` (one 0/1 flag a
    /// layer) or, where absent, every `no_rope_layer_interval`-th layer.
    pub(super) fn nope_layers(&self, path: &Path, layers: usize) -> Result<Vec<usize>> {
        let at = At(path);
        let Some(flags) = &self.no_rope_layers else {
            let every = self.no_rope_layer_interval.unwrap_or(4);
            if every == 0 {
                return Err(at.refuse("no_rope_layer_interval", "must be positive"));
            }
            return Ok((0..layers).filter(|l| (l + 1) % every == 0).collect());
        };
        // transformers reads the first flag of each layer, so a longer list is no error.
        if flags.len() < layers {
            return Err(at.refuse(
                "no_rope_layers",
                format!("{} flags for {layers} layers", flags.len()),
            ));
        }
        let flags = &flags[..layers];
        if let Some(f) = flags.iter().find(|&&f| f > 1) {
            return Err(at.refuse(
                "no_rope_layers",
                format!("{f}: each flag is 1 (rotary positions) or 0 (none)"),
            ));
        }
        Ok((0..layers).filter(|&l| flags[l] == 0).collect())
    }
}
