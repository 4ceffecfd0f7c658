//! The RL stages' training forward over packed rollouts (OpenRLHF's `--packing_samples`).
//!
//! A rollout is laid out padded: prompts left-padded to `L` columns, responses right-padded
//! to `R`, so every row costs `L + R` positions however short its prompt and response. Packed,
//! each row of a minibatch is one document, its prompt and its response but the last token
//! (whose state predicts nothing scored), set back to back with other rows' documents in
//! rows no wider than the padded ones (so no row costs more than a padded row). Attention
//! stays inside each document and positions restart at 0 in each ([`Segments`]), so each
//! row is computed as it is alone.
//!
//! The hidden states that predict response tokens are then picked out into the padded
//! `[b, R, H]` layout everything after the forward reads (the LM head, the value head, the
//! losses; [`pick_rows`]): a row's response slot past its length picks zeros, which no loss
//! reads.

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::batch::fit_rows;
use crate::kernels::segments::Segments;
use crate::model::linear::Ctx;
use crate::model::pick::pick_rows;
use crate::model::{Fwd, Transformer};

/// Each rollout row's tokens, kept on the host to lay out packed minibatches.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RolloutDocs {
    prompts: Vec<Vec<u32>>,
    responses: Vec<Vec<u32>>,
    pad: u32,
}

/// One packed forward: the rows, their documents, and where each response token's
/// predicting state lands.
pub struct PackedRows {
    /// `[rows, len]` u32.
    ids: Tensor,
    segments: Segments,
    /// `b * R` slots: each the flattened state that predicts its response token, or none.
    picks: Vec<Option<u32>>,
    /// `(b, R)`.
    slots: (usize, usize),
}

impl RolloutDocs {
    /// Row `i` is `prompts[i]` (non-empty, unpadded) followed by `responses[i]`.
    pub fn new(prompts: &[Vec<u32>], responses: &[Vec<u32>], pad: u32) -> Result<Self> {
        if prompts.len() != responses.len() {
            anyhow::bail!(
                "packing: {} prompts for {} responses",
                prompts.len(),
                responses.len()
            );
        }
        if prompts.iter().any(Vec::is_empty) {
            anyhow::bail!("packing: an empty prompt predicts no first response token");
        }
        Ok(Self {
            prompts: prompts.to_vec(),
            responses: responses.to_vec(),
            pad,
        })
    }

    /// Positions of row `i`'s document: the prompt and all but the last response token (the
    /// state after the last one predicts nothing scored); none for an empty response.
    fn doc_len(&self, i: usize) -> usize {
        match self.responses[i].len() {
            0 => 0,
            n => self.prompts[i].len() + n - 1,
        }
    }

    /// How rows `idx` pack into rows at most `width` positions wide (the padded rows'
    /// width); None where packing would not compute fewer positions than the padded
    /// layout's `idx.len() * width`.
    fn plan(&self, idx: &[usize], width: usize) -> Result<Option<Plan>> {
        if let Some(&i) = idx.iter().find(|&&i| i >= self.prompts.len()) {
            anyhow::bail!(
                "packing: row {i} of a rollout of {} rows",
                self.prompts.len()
            );
        }
        // Rows with nothing to score take no document; their slots all pick zeros.
        let docs: Vec<usize> = (0..idx.len())
            .filter(|&k| self.doc_len(idx[k]) > 0)
            .collect();
        if docs.is_empty() {
            return Ok(None);
        }
        let sizes: Vec<usize> = docs.iter().map(|&k| self.doc_len(idx[k])).collect();
        let Some((bins, len)) = fit_rows(&sizes, width, idx.len() * width)? else {
            return Ok(None);
        };
        Ok(Some(Plan {
            docs,
            sizes,
            bins,
            len,
        }))
    }

    /// The share of the padded layout's positions (`idx.len() * width`) that the forward of
    /// rows `idx` computes: below 1 where it packs.
    pub fn computed_share(&self, idx: &[usize], width: usize) -> Result<f64> {
        Ok(match self.plan(idx, width)? {
            Some(p) => (p.bins.len() * p.len) as f64 / (idx.len() * width).max(1) as f64,
            None => 1.0,
        })
    }

    /// Rows `idx` packed as `Self::plan` lays them out, their responses picked out to
    /// `resp_len` slots; None where the padded layout is no larger.
    pub fn pack(
        &self,
        idx: &[usize],
        width: usize,
        resp_len: usize,
        dev: &Device,
    ) -> Result<Option<PackedRows>> {
        let Some(Plan {
            docs,
            sizes,
            bins,
            len,
        }) = self.plan(idx, width)?
        else {
            return Ok(None);
        };
        let mut ids = vec![self.pad; bins.len() * len];
        let mut picks = vec![None; idx.len() * resp_len];
        let mut lens = Vec::with_capacity(bins.len());
        for (r, bin) in bins.iter().enumerate() {
            let mut at = r * len;
            let mut row = Vec::with_capacity(bin.len());
            for &d in bin {
                let k = docs[d];
                let (p, resp) = (&self.prompts[idx[k]], &self.responses[idx[k]]);
                let n = sizes[d];
                ids[at..at + p.len()].copy_from_slice(p);
                ids[at + p.len()..at + n].copy_from_slice(&resp[..n - p.len()]);
                // The state at document offset `|p| - 1 + t` predicts response token t.
                if resp.len() > resp_len {
                    anyhow::bail!(
                        "packing: a response of {} tokens in {resp_len} slots",
                        resp.len()
                    );
                }
                for t in 0..resp.len() {
                    picks[k * resp_len + t] = Some((at + p.len() - 1 + t) as u32);
                }
                at += n;
                row.push(n);
            }
            lens.push(row);
        }
        let shape = (bins.len(), len);
        Ok(Some(PackedRows {
            ids: Tensor::from_vec(ids, shape, dev)?,
            segments: Segments::from_lengths(&lens, len, dev)?,
            picks,
            slots: (idx.len(), resp_len),
        }))
    }
}

/// Documents `docs[d]` (minibatch slots) of `sizes[d]` positions, in `bins` of `len`.
struct Plan {
    docs: Vec<usize>,
    sizes: Vec<usize>,
    bins: Vec<Vec<usize>>,
    len: usize,
}

impl PackedRows {
    /// `(rows, positions per row)` of the forward.
    pub fn dims(&self) -> (usize, usize) {
        self.segments.dims()
    }

    /// `[b, R, H]`: the states that predict each response token, zeros past a response's end,
    /// as the padded layout's columns `L - 1 ..` give them.
    pub fn hidden(&self, net: &Transformer, ctx: Ctx) -> Result<Tensor> {
        let f = Fwd {
            ctx,
            positions: None,
            key_valid: None,
            segments: Some(&self.segments),
        };
        let h = net.hidden(&self.ids, &f, None)?;
        let (rows, len, width) = h.dims3()?;
        let picked = pick_rows(&h.reshape((rows * len, width))?, &self.picks)?;
        Ok(picked.reshape((self.slots.0, self.slots.1, width))?)
    }
}

#[cfg(test)]
mod tests;
