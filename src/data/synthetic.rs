//! The built-in task, used whenever no data is named: addition of small numbers. It is a
//! small world with a programmatic checker, so every stage has something real to learn and a
//! ground truth to be judged by:
//! - pretraining: a noisy corpus of `a+b=c` lines (some sums wrong, some lines truncated);
//! - SFT: pairs `"Q: a+b\nA: "` -> `"c"`, a format the base model never saw, written by a
//!   fallible demonstrator who forgets the carry on `carry_slip` of the sums that have one;
//! - reward: chosen = the right sum, rejected = the demonstrator's slip where it would make
//!   one, else a plausible wrong sum;
//! - RL: prompts with their expected answer, scored by [`exact_match`].
//!
//! The slipping demonstrator is what makes the pipeline worth running: judging a sum is easier
//! than writing it, as with human demonstrations and preferences. Imitation learns the slip
//! (greedy decoding picks it whenever it is the likelier answer); the checker and the
//! preference labels are always right, so the RL stages can remove it.
//!
//! Operand pairs are split by a seeded hash, so held-out prompts never occur in any training
//! data, pretraining included. Everything is generated from the seed; no files are needed.

use super::records::{PreferencePair, PromptRecord, Segment, SftExample};
use crate::train::rng::{splitmix64, Rng};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

#[derive(Clone, Debug)]
pub struct Synthetic {
    /// Operands are drawn from `0..=max_operand`.
    pub max_operand: u32,
    pub seed: u64,
    /// Fraction of pretraining lines whose sum is wrong.
    pub noise: f64,
    /// Probability that the SFT demonstrator drops the carry on a sum that has one.
    pub carry_slip: f64,
}

impl Default for Synthetic {
    fn default() -> Self {
        Self {
            max_operand: 19,
            seed: 0,
            noise: 0.2,
            carry_slip: 0.6,
        }
    }
}

pub fn has_carry(a: u32, b: u32) -> bool {
    a % 10 + b % 10 >= 10
}

pub fn prompt_text(a: u32, b: u32) -> String {
    format!("Q: {a}+{b}\nA: ")
}

/// The response up to the end of its first line, trimmed, equals the expected answer.
pub fn exact_match(response: &str, answer: &str) -> bool {
    response.lines().next().unwrap_or("").trim() == answer.trim()
}

/// Why [`exact_match`] cannot check `answer`, if it cannot: an empty one is matched by a
/// response that says nothing, and one of several lines by no response, since only a
/// response's first line is compared.
pub fn unmatchable(answer: &str) -> Option<&'static str> {
    let answer = answer.trim();
    if answer.is_empty() {
        Some("empty, so a response that says nothing would match it")
    } else if answer.contains('\n') {
        Some("spans several lines, and only a response's first line is compared with it")
    } else {
        None
    }
}

impl Synthetic {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            ..Self::default()
        }
    }

    /// One pair in five is held out for evaluation (63 of the 400 pairs at seed 0): enough
    /// prompts that one flipped answer moves accuracy by little more than a point.
    pub fn split_of(&self, a: u32, b: u32) -> Split {
        // The seed is spread over all 64 bits before it meets the pair. XORed in raw, seeds
        // 1-3 only flipped b's low bits, so their held-out sets were seed 0's with b permuted
        // in blocks of four: "seeds 0-2" were one split relabelled. Multiplying by an odd
        // constant keeps seed 0 (and every result measured on it) as it was.
        let key = self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let h = splitmix64(key ^ 0xADD ^ ((a as u64) << 32 | b as u64));
        if h.is_multiple_of(5) {
            Split::Eval
        } else {
            Split::Train
        }
    }

    pub fn pairs(&self, split: Split) -> Vec<(u32, u32)> {
        let n = self.max_operand;
        (0..=n)
            .flat_map(|a| (0..=n).map(move |b| (a, b)))
            .filter(|&(a, b)| self.split_of(a, b) == split)
            .collect()
    }

    fn sample(&self, split: Split, n: usize, tag: u64) -> Vec<(u32, u32)> {
        let pairs = self.pairs(split);
        let mut rng = Rng::new(self.seed ^ tag);
        (0..n).map(|_| pairs[rng.below(pairs.len())]).collect()
    }

    /// A plausible wrong sum: off by one or ten, digits swapped, or random.
    fn wrong_sum(&self, a: u32, b: u32, rng: &mut Rng) -> u32 {
        let c = a + b;
        loop {
            let w = match rng.below(5) {
                0 => c + 1,
                1 => c.saturating_sub(1),
                2 => c + 10,
                3 => c.saturating_sub(10),
                _ => rng.below(2 * self.max_operand as usize + 1) as u32,
            };
            if w != c {
                return w;
            }
        }
    }

    /// Documents of 8-24 lines of `a+b=c`, with `noise` of the sums wrong and a few lines cut.
    pub fn pretrain_documents(&self, n_docs: usize) -> Vec<String> {
        let pairs = self.pairs(Split::Train);
        let mut rng = Rng::new(self.seed ^ 0x9E7);
        (0..n_docs)
            .map(|_| {
                let lines = 8 + rng.below(17);
                let mut doc = String::new();
                for _ in 0..lines {
                    let (a, b) = pairs[rng.below(pairs.len())];
                    let c = if rng.f64() < self.noise {
                        self.wrong_sum(a, b, &mut rng)
                    } else {
                        a + b
                    };
                    if rng.f64() < 0.05 {
                        doc.push_str(&format!("{a}+{b}\n"));
                    } else {
                        doc.push_str(&format!("{a}+{b}={c}\n"));
                    }
                }
                doc
            })
            .collect()
    }

    pub fn sft_examples(&self, split: Split, n: usize) -> Vec<SftExample> {
        let mut rng = Rng::new(self.seed ^ 0x511);
        self.sample(split, n, 0x5F7)
            .into_iter()
            .map(|(a, b)| SftExample {
                segments: vec![
                    Segment {
                        text: prompt_text(a, b),
                        train: false,
                    },
                    Segment {
                        text: self.demonstrated_sum(a, b, &mut rng).to_string(),
                        train: true,
                    },
                ],
                append_eos: true,
                origin: None,
                train_all: false,
            })
            .collect()
    }

    /// What the demonstrator writes: the sum, except that with probability `carry_slip` a
    /// carry out of the units column is forgotten (7+5 -> 2).
    fn demonstrated_sum(&self, a: u32, b: u32, rng: &mut Rng) -> u32 {
        let c = a + b;
        if has_carry(a, b) && rng.f64() < self.carry_slip {
            c - 10
        } else {
            c
        }
    }

    /// Pairs as a judge would label two answers in the demonstrator's hand: the right sum
    /// against the demonstrator's slip where it makes one, else against a plausible wrong sum.
    pub fn preference_pairs(&self, split: Split, n: usize) -> Vec<PreferencePair> {
        let mut rng = Rng::new(self.seed ^ 0x9EF);
        self.sample(split, n, 0x9E0)
            .into_iter()
            .map(|(a, b)| {
                let slip = self.demonstrated_sum(a, b, &mut rng);
                let rejected = if slip != a + b {
                    slip
                } else {
                    self.wrong_sum(a, b, &mut rng)
                };
                PreferencePair {
                    prompt: prompt_text(a, b),
                    chosen: (a + b).to_string(),
                    rejected: rejected.to_string(),
                    append_eos: true,
                    origin: None,
                    margin: None,
                }
            })
            .collect()
    }

    /// RL / evaluation prompts with their expected answer. For `Split::Eval` with `n` at least
    /// the number of held-out pairs, every held-out pair appears once, in order.
    pub fn prompts(&self, split: Split, n: usize) -> Vec<PromptRecord> {
        let pairs = match split {
            Split::Eval if n >= self.pairs(Split::Eval).len() => self.pairs(Split::Eval),
            _ => self.sample(split, n, 0x960),
        };
        pairs
            .into_iter()
            .map(|(a, b)| {
                let answer = (a + b).to_string();
                let mut fields = serde_json::Map::new();
                fields.insert("prompt".into(), prompt_text(a, b).into());
                fields.insert("answer".into(), answer.clone().into());
                PromptRecord {
                    prompt: prompt_text(a, b),
                    answer: Some(answer),
                    fields,
                    origin: None,
                    templated: false,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_pairs_never_reach_training_data() {
        let s = Synthetic::new(3);
        let eval = s.pairs(Split::Eval);
        let train = s.pairs(Split::Train);
        assert!(!eval.is_empty() && train.len() > 3 * eval.len());
        let docs = s.pretrain_documents(200).join("");
        for (a, b) in &eval {
            assert!(!docs
                .lines()
                .any(|l| l == format!("{a}+{b}={}", a + b) || l.starts_with(&format!("{a}+{b}="))));
        }
        let sft = s.sft_examples(Split::Train, 500);
        for ex in &sft {
            assert!(!eval
                .iter()
                .any(|(a, b)| ex.segments[0].text == prompt_text(*a, *b)));
        }
        // Deterministic by seed.
        assert_eq!(
            s.pretrain_documents(3),
            Synthetic::new(3).pretrain_documents(3)
        );
        assert_ne!(
            s.pretrain_documents(3),
            Synthetic::new(4).pretrain_documents(3)
        );
    }

    #[test]
    fn checker_and_preferences_are_consistent() {
        let s = Synthetic::new(1);
        for p in s.preference_pairs(Split::Train, 100) {
            assert_ne!(p.chosen, p.rejected);
        }
        let pr = &s.prompts(Split::Eval, 10_000)[0];
        let ans = pr.answer.clone().unwrap();
        assert!(exact_match(&format!("{ans}\nmore"), &ans));
        assert!(exact_match(&format!(" {ans} "), &ans));
        assert!(!exact_match(&format!("{ans}1"), &ans));
        assert_eq!(
            s.prompts(Split::Eval, 10_000).len(),
            s.pairs(Split::Eval).len()
        );
    }

    /// Different task seeds hold out independent pairs: the number held out in each block of
    /// four consecutive b (for each a) is not one pattern shared by several seeds, as it was
    /// when a seed only permuted b's low bits.
    #[test]
    fn task_seeds_hold_out_independent_pairs() {
        let blocks = |seed| {
            let s = Synthetic::new(seed);
            let mut counts = vec![0u8; 20 * 5];
            for (a, b) in s.pairs(Split::Eval) {
                counts[a as usize * 5 + b as usize / 4] += 1;
            }
            counts
        };
        let patterns: Vec<_> = (0..8).map(blocks).collect();
        for i in 0..patterns.len() {
            for j in i + 1..patterns.len() {
                assert_ne!(patterns[i], patterns[j], "task seeds {i} and {j}");
            }
        }
        let sizes: Vec<_> = (0..8)
            .map(|seed| Synthetic::new(seed).pairs(Split::Eval).len())
            .collect();
        assert_eq!(sizes[0], 63, "seed 0's split moved: {sizes:?}");
        assert!(sizes.iter().any(|&n| n != 63), "{sizes:?}");
        assert!(sizes.iter().all(|&n| (50..=110).contains(&n)), "{sizes:?}");
    }

    /// Parses `Q: a+b\nA: ` back into its operands.
    fn operands(prompt: &str) -> (u32, u32) {
        let sum = prompt.trim_start_matches("Q: ").trim_end_matches("\nA: ");
        let (a, b) = sum.split_once('+').unwrap();
        (a.parse().unwrap(), b.parse().unwrap())
    }

    #[test]
    fn demonstrator_slips_only_on_carries_and_preferences_catch_it() {
        let s = Synthetic::new(2);
        let (mut carries, mut slips) = (0, 0);
        for ex in s.sft_examples(Split::Train, 4000) {
            let (a, b) = operands(&ex.segments[0].text);
            let c: u32 = ex.segments[1].text.parse().unwrap();
            if has_carry(a, b) {
                carries += 1;
                assert!(c == a + b || c + 10 == a + b, "{a}+{b} -> {c}");
                slips += usize::from(c != a + b);
            } else {
                assert_eq!(c, a + b, "slip without a carry: {a}+{b}");
            }
        }
        let rate = slips as f64 / carries as f64;
        assert!((rate - s.carry_slip).abs() < 0.05, "slip rate {rate}");
        let (mut slip_rejected, mut carry_pairs) = (0, 0);
        for p in s.preference_pairs(Split::Train, 2000) {
            let (a, b) = operands(&p.prompt);
            assert_eq!(p.chosen, (a + b).to_string());
            if has_carry(a, b) {
                carry_pairs += 1;
                slip_rejected += usize::from(p.rejected == (a + b - 10).to_string());
            }
        }
        // The judge sees the slip wherever the demonstrator makes it, plus the odd c-10 from
        // the plausible wrong sums.
        let rate = slip_rejected as f64 / carry_pairs as f64;
        assert!(
            rate > s.carry_slip - 0.05,
            "slip rejected in {rate} of carry pairs"
        );
        let clean = Synthetic {
            carry_slip: 0.0,
            ..Synthetic::new(2)
        };
        for ex in clean.sft_examples(Split::Train, 500) {
            let (a, b) = operands(&ex.segments[0].text);
            assert_eq!(ex.segments[1].text, (a + b).to_string());
        }
    }
}
