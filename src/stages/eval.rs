//! Task accuracy: greedy answers to held-out prompts, judged by the programmatic checker
//! (exact match against each prompt's `answer`), and the mean reward.

use anyhow::{bail, Result};

use crate::data::records::PromptRecord;
use crate::data::synthetic::exact_match;
use crate::data::tokenizer::Tokenizer;
use crate::generate::{generate, SampleCfg};
use crate::model::linear::Ctx;
use crate::model::Transformer;
use crate::train::rng::Rng;

pub struct Accuracy {
    pub accuracy: f64,
    pub n: usize,
    pub samples: Vec<(String, String, bool)>,
}

/// Greedy decoding of every prompt (in batches), scored by exact match.
pub fn accuracy(
    net: &Transformer,
    ctx: Ctx,
    tok: &Tokenizer,
    prompts: &[PromptRecord],
    max_new_tokens: usize,
    batch: usize,
) -> Result<Accuracy> {
    if prompts.is_empty() {
        bail!("no evaluation prompts");
    }
    let cfg = SampleCfg {
        max_new_tokens,
        temperature: 0.0,
        stop: vec!["\n".into()],
        ..Default::default()
    };
    let mut rng = Rng::new(0);
    let mut correct = 0;
    let mut samples = Vec::new();
    for chunk in prompts.chunks(batch.max(1)) {
        let ids: Vec<Vec<u32>> = chunk
            .iter()
            .map(|p| tok.encode(&p.prompt))
            .collect::<Result<_>>()?;
        let g = generate(net, ctx, tok, &ids, &cfg, &mut rng)?;
        for (p, text) in chunk.iter().zip(g.texts) {
            let Some(answer) = &p.answer else {
                bail!("prompt {:?} has no `answer` to check against", p.prompt);
            };
            let ok = exact_match(&text, answer);
            correct += ok as usize;
            if samples.len() < 8 {
                samples.push((p.prompt.clone(), text, ok));
            }
        }
    }
    Ok(Accuracy {
        accuracy: correct as f64 / prompts.len() as f64,
        n: prompts.len(),
        samples,
    })
}
