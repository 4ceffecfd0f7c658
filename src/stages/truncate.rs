//! Records longer than the model's context, under `[data] truncation` (TRL's `max_length`
//! with `truncation_mode`): refused by file and line (`error`, the default), left out
//! (`drop`), or cut to their first (`keep_start`) or last (`keep_end`) tokens. A cut record is
//! left out too where a sequence keeps no token that carries loss, where `keep_end` leaves a
//! sequence none of its prompt (the window starts inside the response), or where a pair's two
//! sequences come out the same. The stage prints one line saying how many records were cut or
//! left out.

use anyhow::{bail, Result};

use super::batch::{encode_example, Encoded};
use super::Env;
use crate::config::Truncation;
use crate::data::records::SftExample;
use crate::data::tokenizer::Tokenizer;

/// Fits the sequences of one set of records (the training or the held-out ones) to at most
/// `max_tokens`, counting what it changed.
pub struct Fitter {
    how: Truncation,
    max_tokens: usize,
    /// What the records are, for the report ("training examples").
    what: String,
    seen: usize,
    cut: usize,
    dropped: usize,
    /// Pairs whose two sequences are the same tokens, left out before any cut, and where the
    /// first of them is (its file and line).
    identical: usize,
    first_identical: Option<String>,
}

impl Fitter {
    pub fn new(how: Truncation, max_tokens: usize, what: &str) -> Self {
        Self {
            how,
            max_tokens,
            what: what.to_string(),
            seen: 0,
            cut: 0,
            dropped: 0,
            identical: 0,
            first_identical: None,
        }
    }

    /// A record's sequences (a pair's two, or one), each token with whether it carries loss
    /// (the first token never does: it is only ever an input), fitted together: all kept, cut
    /// as the mode says, or all left out (None) when any must be. `place` names the record
    /// in an error; `context` is the model's, for the message. A sequence's prompt is its
    /// tokens before the first one that carries loss.
    pub fn fit(
        &mut self,
        mut seqs: Vec<Encoded>,
        place: impl FnOnce() -> String,
        context: usize,
    ) -> Result<Option<Vec<Encoded>>> {
        self.seen += 1;
        // The same sequence on both sides prefers nothing: left out and counted, not trained on
        // in silence. Most pairwise losses give it no gradient; the chosen side's NLL, NCA's and
        // SPPO's pulls and KTO's unequal label weights would train on it for no preference.
        if seqs.len() > 1 && seqs.iter().all(|s| s.0 == seqs[0].0) {
            self.identical += 1;
            self.first_identical.get_or_insert_with(place);
            return Ok(None);
        }
        let longest = seqs.iter().map(|s| s.0.len()).max().unwrap_or(0);
        if longest <= self.max_tokens {
            return Ok(Some(seqs));
        }
        let max = self.max_tokens;
        // Text learnt whole (SFT's `text` records, and any record trained on every token) has
        // no prompt to lose.
        let prompted: Vec<bool> = seqs
            .iter()
            .map(|(_, m)| m.first() == Some(&false))
            .collect();
        match self.how {
            Truncation::Error => bail!(
                "{}: {longest} tokens, more than the {max} that fit the model's context of {context}{} ([data] truncation = \"keep_end\", \"keep_start\" or \"drop\" fits such records instead)",
                place(),
                // A language model's last token is only ever a target; a scorer reads every one.
                if max > context { " (the last token is only a target)" } else { "" }
            ),
            Truncation::Drop => {
                self.dropped += 1;
                return Ok(None);
            }
            Truncation::KeepStart => {
                for (ids, mask) in &mut seqs {
                    ids.truncate(max);
                    mask.truncate(max);
                }
            }
            Truncation::KeepEnd => {
                for (ids, mask) in &mut seqs {
                    let from = ids.len().saturating_sub(max);
                    ids.drain(..from);
                    mask.drain(..from);
                }
            }
        }
        let nothing_to_learn = |m: &[bool]| !m.iter().skip(1).any(|&t| t);
        let same = seqs.len() > 1 && seqs.iter().all(|s| s.0 == seqs[0].0);
        let lost_prompt = |i: usize, m: &[bool]| prompted[i] && m.first() == Some(&true);
        if same
            || seqs
                .iter()
                .enumerate()
                .any(|(i, (_, m))| nothing_to_learn(m) || lost_prompt(i, m))
        {
            self.dropped += 1;
            return Ok(None);
        }
        self.cut += 1;
        Ok(Some(seqs))
    }

    /// A record's examples (a pair's two, or one) encoded as SFT encodes them and fitted
    /// together ([`Fitter::fit`]).
    pub fn encode(
        &mut self,
        tok: &Tokenizer,
        examples: &[SftExample],
        place: impl FnOnce() -> String,
        context: usize,
    ) -> Result<Option<Vec<Encoded>>> {
        let seqs = examples
            .iter()
            .map(|ex| encode_example(tok, ex))
            .collect::<Result<Vec<_>>>()?;
        self.fit(seqs, place, context)
    }

    /// The line to print when any record was cut or left out.
    pub fn report(&self, stage: &str) -> Option<String> {
        if self.cut + self.dropped == 0 {
            return None;
        }
        let kept = match self.how {
            Truncation::KeepStart => "first",
            _ => "last",
        };
        let mut parts = Vec::new();
        if self.cut > 0 {
            parts.push(format!(
                "{} cut to their {kept} {} tokens",
                self.cut, self.max_tokens
            ));
        }
        if self.dropped > 0 {
            parts.push(format!("{} left out", self.dropped));
        }
        Some(format!(
            "[{stage}] {} of {} {} were longer than {} tokens ([data] truncation = \"{}\"): {}",
            self.cut + self.dropped,
            self.seen,
            self.what,
            self.max_tokens,
            self.how.name(),
            parts.join(", ")
        ))
    }

    /// Prints [`Fitter::report`] for `env`'s stage where there is one, on rank 0.
    pub fn say(&self, env: &Env) {
        if env.comm.rank() != 0 {
            return;
        }
        if let Some(line) = self.report(env.cfg.stage.name()) {
            errln!("{line}");
        }
        if let Some(line) = self.identical_report(env.cfg.stage.name()) {
            errln!("{line}");
        }
    }

    /// The line to print when any pair's two sides were the same tokens.
    pub fn identical_report(&self, stage: &str) -> Option<String> {
        (self.identical > 0).then(|| {
            let first = match (&self.first_identical, self.identical) {
                (Some(at), 1) => format!(" ({at})"),
                (Some(at), _) => format!(" (the first: {at})"),
                (None, _) => String::new(),
            };
            format!(
                "[{stage}] {} of {} {} were left out: their two sides are the same tokens, so \
                 there is nothing to prefer{first}",
                self.identical, self.seen, self.what
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sequence of `prompt` untrained tokens then `reply` trained ones, numbered from 0.
    fn seq(prompt: usize, reply: usize) -> Encoded {
        let ids = (0..(prompt + reply) as u32).collect();
        let mask = (0..prompt + reply).map(|i| i >= prompt).collect();
        (ids, mask)
    }

    fn fit(how: Truncation, max: usize, seqs: Vec<Encoded>) -> (Option<Vec<Encoded>>, Fitter) {
        let mut f = Fitter::new(how, max, "pairs");
        let out = f.fit(seqs, || "data.jsonl:7".to_string(), max - 1).unwrap();
        (out, f)
    }

    #[test]
    fn each_mode_fits_a_long_record() {
        // Fits already: untouched, and nothing to report.
        let (out, f) = fit(Truncation::Error, 8, vec![seq(3, 5)]);
        assert_eq!(out.unwrap(), vec![seq(3, 5)]);
        assert_eq!(f.report("dpo"), None);
        let mut f = Fitter::new(Truncation::Error, 6, "pairs");
        let e = f
            .fit(vec![seq(3, 2), seq(3, 5)], || "data.jsonl:7".into(), 5)
            .unwrap_err();
        let e = e.to_string();
        assert!(
            e.starts_with(
                "data.jsonl:7: 8 tokens, more than the 6 that fit the model's context of 5 (the last token is only a target)"
            ),
            "{e}"
        );
        // A pair is cut or left out whole.
        let (out, f) = fit(Truncation::Drop, 6, vec![seq(3, 2), seq(3, 5)]);
        assert!(out.is_none());
        assert_eq!(
            f.report("dpo").unwrap(),
            "[dpo] 1 of 1 pairs were longer than 6 tokens ([data] truncation = \"drop\"): 1 left out"
        );
        let (out, _) = fit(Truncation::KeepStart, 6, vec![seq(3, 2), seq(3, 5)]);
        let out = out.unwrap();
        assert_eq!(out[0], seq(3, 2));
        assert_eq!(out[1].0, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(out[1].1, vec![false, false, false, true, true, true]);
        let (out, f) = fit(Truncation::KeepEnd, 6, vec![seq(3, 5)]);
        let out = out.unwrap();
        assert_eq!(out[0].0, vec![2, 3, 4, 5, 6, 7]);
        assert_eq!(out[0].1, vec![false, true, true, true, true, true]);
        assert!(f
            .report("sft")
            .unwrap()
            .contains("1 cut to their last 6 tokens"));
    }

    #[test]
    fn a_pair_is_left_out_when_one_side_or_both_come_out_unusable() {
        // keep_start: the second side's reply starts past the limit, the first's does not.
        let (out, _) = fit(Truncation::KeepStart, 6, vec![seq(3, 5), seq(7, 2)]);
        assert!(out.is_none());
        // keep_end: the first side's window starts inside its reply (no prompt left).
        let (out, _) = fit(Truncation::KeepEnd, 6, vec![seq(2, 7), seq(3, 2)]);
        assert!(out.is_none());
        let (out, _) = fit(Truncation::KeepEnd, 6, vec![seq(3, 5), seq(3, 2)]);
        assert!(out.is_some());
        // Two sides that share their first six tokens are the same pair once cut.
        let (out, f) = fit(Truncation::KeepStart, 6, vec![seq(3, 5), seq(3, 4)]);
        assert!(out.is_none());
        assert!(f.report("dpo").unwrap().ends_with("1 left out"));
    }

    /// A pair whose sides are the same tokens is left out whether or not it fits, and said
    /// apart from the cuts; a single record is never "the same" as itself.
    #[test]
    fn a_pair_with_the_same_sides_is_left_out_and_counted() {
        let (out, f) = fit(Truncation::Error, 8, vec![seq(3, 2), seq(3, 2)]);
        assert!(out.is_none());
        assert_eq!(f.report("dpo"), None);
        assert_eq!(
            f.identical_report("dpo").unwrap(),
            "[dpo] 1 of 1 pairs were left out: their two sides are the same tokens, so there \
             is nothing to prefer (data.jsonl:7)"
        );
        let (out, f) = fit(Truncation::Error, 8, vec![seq(3, 2)]);
        assert!(out.is_some() && f.identical_report("sft").is_none());
    }

    #[test]
    fn a_cut_that_leaves_nothing_to_learn_leaves_the_record_out() {
        // keep_start: the reply starts past the limit.
        let (out, f) = fit(Truncation::KeepStart, 4, vec![seq(5, 3)]);
        assert!(out.is_none());
        assert!(f.report("sft").unwrap().ends_with("1 left out"));
        // keep_end: a window that starts inside the reply keeps none of the prompt.
        let (out, _) = fit(Truncation::KeepEnd, 2, vec![seq(5, 3)]);
        assert!(out.is_none());
        let (out, _) = fit(Truncation::KeepEnd, 4, vec![seq(5, 3)]);
        assert_eq!(out.unwrap()[0].1, vec![false, true, true, true]);
    }

    /// Text learnt whole (an SFT `text` record, or any trained on every token) has no prompt
    /// to lose: it is cut, either end.
    #[test]
    fn text_learnt_whole_is_cut_not_left_out() {
        for how in [Truncation::KeepStart, Truncation::KeepEnd] {
            let (out, _) = fit(how, 4, vec![seq(0, 9)]);
            assert_eq!(out.unwrap()[0].1, vec![true; 4], "{how:?}");
        }
    }
}
