//! Shared prefill: a prompt repeated back to back (the G samples of a GRPO or RLOO group) is
//! run through the model once; its cache rows are then copied to every member on the device.

use candle_core::{Device, Result, Tensor};

/// Which prompts are prefilled, and which prefilled row each prompt's generation starts from.
#[derive(Debug, PartialEq, Eq)]
pub struct PrefillPlan {
    /// Index (into the prompts) of each prefilled row: the first of each run of repeats.
    pub firsts: Vec<usize>,
    /// For each prompt, its row among the prefilled ones.
    pub source: Vec<u32>,
}

impl PrefillPlan {
    /// One prefill per run of identical consecutive prompts (`share`), or one per prompt.
    pub fn new(prompts: &[Vec<u32>], share: bool) -> Self {
        let mut firsts = Vec::new();
        let mut source = Vec::with_capacity(prompts.len());
        for (i, p) in prompts.iter().enumerate() {
            let repeat = share && firsts.last().is_some_and(|&f: &usize| prompts[f] == *p);
            if !repeat {
                firsts.push(i);
            }
            source.push(firsts.len() as u32 - 1);
        }
        Self { firsts, source }
    }

    /// The rows to `index_select` the prefilled batch by, or `None` when every prompt was
    /// prefilled on its own.
    pub fn expansion(&self, dev: &Device) -> Result<Option<Tensor>> {
        if self.firsts.len() == self.source.len() {
            return Ok(None);
        }
        Tensor::from_vec(self.source.clone(), self.source.len(), dev).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_repeats_share_one_row() {
        let (a, b) = (vec![1u32, 2], vec![3u32]);
        let prompts = [a.clone(), a.clone(), b.clone(), b.clone(), b, a.clone()];
        let plan = PrefillPlan::new(&prompts, true);
        assert_eq!(plan.firsts, vec![0, 2, 5]);
        assert_eq!(plan.source, vec![0, 0, 1, 1, 1, 2]);
        assert!(plan.expansion(&Device::Cpu).unwrap().is_some());
        let each = PrefillPlan::new(&prompts, false);
        assert_eq!(each.firsts, (0..6).collect::<Vec<_>>());
        assert!(each.expansion(&Device::Cpu).unwrap().is_none());
    }
}
