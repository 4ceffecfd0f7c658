//! GRPO's entropy bonus and its adaptive coefficient (Skywork-OR1; TRL's `entropy_coef` and
//! `use_adaptive_entropy`). The bonus is the mean entropy of the tokens that carry the policy
//! loss, subtracted from the loss times a coefficient. Under adaptive control the coefficient
//! moves after each optimizer step, by that step's mean entropy over every rank, and applies
//! only in steps that follow one at or below the target: a collapse raises the bonus, a
//! healthy entropy lowers it and turns it off.

use anyhow::Result;

use crate::config::GrpoConfig;
use crate::dist::Communicator;

/// The coefficient, the last step's entropy, and the current step's running sums.
#[derive(Clone, Debug, PartialEq)]
pub struct EntropyControl {
    pub coef: f64,
    adaptive: Option<Adaptive>,
    /// The mean entropy of the last optimizer step, over every rank; none before the first
    /// (so adaptive control applies no bonus until it has measured one, as TRL starts it).
    last: Option<f64>,
    /// The current step's entropy sum and token count on this rank.
    window: (f64, f64),
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Adaptive {
    min: f64,
    max: f64,
    delta: f64,
    target: f64,
}

impl EntropyControl {
    pub fn new(c: &GrpoConfig) -> Self {
        Self {
            coef: c.entropy_coef,
            adaptive: c.use_adaptive_entropy.then_some(Adaptive {
                min: c.entropy_coef_min,
                max: c.entropy_coef_max,
                delta: c.entropy_coef_delta,
                target: c.entropy_target,
            }),
            last: None,
            window: (0.0, 0.0),
        }
    }

    /// The coefficient this step's bonus takes.
    pub fn applied(&self) -> f64 {
        match self.adaptive {
            Some(a) if !self.last.is_some_and(|e| e <= a.target) => 0.0,
            _ => self.coef,
        }
    }

    /// Adds one micro-batch's entropy sum over the tokens the bonus reads, and their count.
    pub fn observe(&mut self, sum: f64, tokens: f64) {
        self.window.0 += sum;
        self.window.1 += tokens;
    }

    /// At an optimizer step's end: the step's mean entropy over every rank, and under
    /// adaptive control the next coefficient.
    pub fn end_step(&mut self, comm: &dyn Communicator) -> Result<()> {
        let w = std::mem::take(&mut self.window);
        let Some(a) = self.adaptive else {
            return Ok(());
        };
        let mut w = [w.0 as f32, w.1 as f32];
        comm.all_reduce_mean(&mut w)?;
        // No tokens read counts as no entropy, as TRL's clamped count makes it.
        let entropy = match w[1] > 0.0 {
            true => f64::from(w[0]) / f64::from(w[1]),
            false => 0.0,
        };
        self.coef = match entropy <= a.target {
            true => (self.coef + a.delta).min(a.max),
            false => (self.coef - a.delta).max(a.min),
        };
        self.last = Some(entropy);
        Ok(())
    }

    /// What a checkpoint keeps.
    pub fn state(&self) -> serde_json::Value {
        serde_json::json!({"coef": self.coef, "last_entropy": self.last})
    }

    /// Reads [`EntropyControl::state`] back under adaptive control, as TRL restores it; a
    /// fixed coefficient is the configuration's (a run resumed with another one takes it),
    /// and a checkpoint from before the control keeps the configured start.
    pub fn restore(&mut self, s: &serde_json::Value) {
        self.window = (0.0, 0.0);
        if self.adaptive.is_none() {
            return;
        }
        if let Some(coef) = s["coef"].as_f64() {
            self.coef = coef;
        }
        self.last = s["last_entropy"].as_f64();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::{Solo, ThreadGroup};

    fn adaptive() -> GrpoConfig {
        GrpoConfig {
            entropy_coef: 0.01,
            use_adaptive_entropy: true,
            entropy_coef_min: 0.0,
            entropy_coef_max: 0.02,
            entropy_coef_delta: 0.005,
            entropy_target: 1.0,
            ..GrpoConfig::default()
        }
    }

    /// No bonus before a step has been measured; a low entropy raises the coefficient up to
    /// its cap and turns the bonus on, a high one lowers it to its floor and turns it off.
    #[test]
    fn the_coefficient_follows_the_entropy_within_its_bounds() {
        let mut e = EntropyControl::new(&adaptive());
        assert_eq!(e.applied(), 0.0);
        let step = |e: &mut EntropyControl, mean: f64| {
            e.observe(mean * 10.0, 10.0);
            e.end_step(&Solo).unwrap();
        };
        step(&mut e, 0.5);
        assert!((e.coef - 0.015).abs() < 1e-12 && e.applied() == e.coef);
        step(&mut e, 0.5);
        step(&mut e, 0.5);
        assert!((e.coef - 0.02).abs() < 1e-12, "capped: {}", e.coef);
        for _ in 0..6 {
            step(&mut e, 3.0);
        }
        assert_eq!((e.coef, e.applied()), (0.0, 0.0));
        let kept = e.state();
        let mut back = EntropyControl::new(&adaptive());
        back.restore(&kept);
        assert_eq!(back, e);
        // A fixed coefficient is the configuration's, whatever the checkpoint kept.
        let fixed_cfg = GrpoConfig {
            entropy_coef: 0.03,
            ..GrpoConfig::default()
        };
        let mut fixed = EntropyControl::new(&fixed_cfg);
        fixed.restore(&kept);
        assert_eq!(fixed, EntropyControl::new(&fixed_cfg));
        // A fixed coefficient applies from the first step and never moves.
        let mut fixed = EntropyControl::new(&GrpoConfig {
            entropy_coef: 0.01,
            ..GrpoConfig::default()
        });
        step(&mut fixed, 0.1);
        assert_eq!((fixed.coef, fixed.applied()), (0.01, 0.01));
    }

    /// The step's entropy is the mean over every rank's tokens, not the mean of the ranks'
    /// means: here 0.9 (below the target 1), where the means' mean is 1.39.
    #[test]
    fn the_steps_entropy_weighs_every_ranks_tokens() {
        let group = ThreadGroup::new(2);
        let got: Vec<f64> = std::thread::scope(|sc| {
            let hs: Vec<_> = group
                .iter()
                .zip([(2.0, 1.0), (7.0, 9.0)])
                .map(|(c, (sum, n))| {
                    sc.spawn(move || {
                        let mut e = EntropyControl::new(&adaptive());
                        e.observe(sum, n);
                        e.end_step(c).unwrap();
                        e.coef
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(got.iter().all(|&c| (c - 0.015).abs() < 1e-12), "{got:?}");
    }
}
