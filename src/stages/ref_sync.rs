//! TR-DPO's reference updates (Gorbatovski et al., "Learn Your Reference Model for Real Good
//! Alignment"; TRL's `sync_ref_model`): every few optimizer steps the frozen reference moves
//! part of the way to the policy, so that the KL anchor follows the model instead of holding
//! it near where it started.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::DType;

use crate::train::params::ParamStore;

/// The file a checkpoint keeps the moved reference in.
pub const REFERENCE_FILE: &str = "reference.safetensors";

/// When and how far the reference moves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RefSync {
    /// The policy's weight in each update.
    pub alpha: f64,
    /// Optimizer steps between updates.
    pub every: usize,
}

impl RefSync {
    /// Whether the reference moves once optimizer step `done` (1-based) has run: after every
    /// `every`-th, as TRL's callback does at a step's end.
    pub fn due(&self, done: usize) -> bool {
        done > 0 && done.is_multiple_of(self.every)
    }

    /// `reference <- alpha * policy + (1 - alpha) * reference`, each tensor in f32 and stored
    /// back in the reference's dtype (the compute dtype: bf16 on a GPU). Every reference
    /// tensor must have its namesake in `policy` (the same model, loaded into both).
    pub fn mix(&self, reference: &ParamStore, policy: &ParamStore) -> Result<()> {
        for (name, var, _) in reference.iter() {
            let p = policy
                .get(name)
                .with_context(|| format!("TR-DPO: the policy has no tensor {name}"))?;
            let f32 = |t: &candle_core::Tensor| t.to_dtype(DType::F32);
            let r = f32(var.as_tensor())?;
            let mixed = ((f32(p.as_tensor())? - &r)? * self.alpha)?.add(&r)?;
            var.set(&mixed.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Writes `reference` to checkpoint `dir`.
    pub fn save(reference: &ParamStore, dir: &Path) -> Result<()> {
        reference.save(&dir.join(REFERENCE_FILE), |_| true)
    }

    /// Reads the reference a checkpoint kept into `reference`; an error when the checkpoint
    /// has none (one written without `[stage] sync_ref_model`).
    pub fn load(reference: &ParamStore, dir: &Path, stage: &str) -> Result<()> {
        if !Self::load_kept(reference, dir)? {
            anyhow::bail!(
                "{}: missing; the run resumed with [{stage}] sync_ref_model on, but this \
                 checkpoint was written without it (resume with it off, or start a new run)",
                dir.join(REFERENCE_FILE).display()
            );
        }
        Ok(())
    }

    /// Reads the reference checkpoint `dir` kept, if it kept one, into `reference`; whether
    /// it did.
    pub fn load_kept(reference: &ParamStore, dir: &Path) -> Result<bool> {
        let path = dir.join(REFERENCE_FILE);
        if !path.exists() {
            return Ok(false);
        }
        reference.load(&path, |_| true, true)?;
        Ok(true)
    }
}

/// A stage's side of TR-DPO, for the runner's hooks (`train::runner::Task`): the updates,
/// and the reference in checkpoints. The reference is passed in at each call, as the stage
/// holds it: the frozen copy's weights, or none under LoRA.
pub struct MovingReference {
    /// The updates, where `[stage] sync_ref_model` is on.
    pub sync: Option<RefSync>,
    pub stage: &'static str,
    /// Whether this process reports (rank 0).
    pub reports: bool,
}

impl MovingReference {
    /// Moves `reference` towards `policy` if optimizer step `done` is due.
    pub fn after_step(
        &self,
        reference: Option<&ParamStore>,
        policy: &ParamStore,
        done: usize,
    ) -> Result<()> {
        let (Some(sync), Some(reference)) = (&self.sync, reference) else {
            return Ok(());
        };
        if sync.due(done) {
            sync.mix(reference, policy)?;
            if self.reports {
                errln!(
                    "[{}] step {done}: the reference moved {} of the way to the policy (TR-DPO)",
                    self.stage,
                    sync.alpha
                );
            }
        }
        Ok(())
    }

    /// Keeps the moving reference in checkpoint `dir`.
    pub fn write(&self, reference: Option<&ParamStore>, dir: &Path) -> Result<()> {
        match (&self.sync, reference) {
            (Some(_), Some(reference)) => RefSync::save(reference, dir),
            _ => Ok(()),
        }
    }

    /// Reads back the reference checkpoint `dir` kept. A run that moved its reference and
    /// resumes with sync off goes on from the reference it had, now held still, not from the
    /// initial one.
    pub fn read(&self, reference: Option<&ParamStore>, dir: &Path) -> Result<()> {
        let Some(reference) = reference else {
            return Ok(());
        };
        if self.sync.is_some() {
            return RefSync::load(reference, dir, self.stage);
        }
        if RefSync::load_kept(reference, dir)? && self.reports {
            errln!(
                "[{}] the reference is the one {} kept, held still from here \
                 (sync_ref_model is off)",
                self.stage,
                dir.join(REFERENCE_FILE).display()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::params::{Init, Net};
    use candle_core::{Device, Tensor};

    fn store(values: &[f32], seed: u64) -> ParamStore {
        let mut s = ParamStore::new(Device::Cpu, seed);
        s.scope(Net::Policy)
            .weight("w", &[values.len()], Init::Zeros)
            .unwrap();
        let t = Tensor::new(values, &Device::Cpu).unwrap();
        s.get("w").unwrap().set(&t).unwrap();
        s
    }

    fn values(s: &ParamStore) -> Vec<f32> {
        s.get("w").unwrap().as_tensor().to_vec1().unwrap()
    }

    #[test]
    fn the_reference_moves_alpha_of_the_way_to_the_policy_on_every_nth_step() {
        let sync = RefSync {
            alpha: 0.25,
            every: 3,
        };
        let (reference, policy) = (store(&[0.0, 4.0, -8.0], 1), store(&[4.0, 4.0, 8.0], 2));
        sync.mix(&reference, &policy).unwrap();
        assert_eq!(values(&reference), [1.0, 4.0, -4.0]);
        sync.mix(&reference, &policy).unwrap();
        assert_eq!(values(&reference), [1.75, 4.0, -1.0]);
        assert_eq!(values(&policy), [4.0, 4.0, 8.0], "the policy is untouched");
        let due: Vec<usize> = (0..10).filter(|&d| sync.due(d)).collect();
        assert_eq!(due, [3, 6, 9]);
    }

    #[test]
    fn a_checkpoint_keeps_the_reference_and_one_without_it_is_refused() {
        let dir = std::env::temp_dir().join(format!("temper-ref-sync-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let moved = store(&[1.5, -2.0], 1);
        RefSync::save(&moved, &dir).unwrap();
        let fresh = store(&[0.0, 0.0], 2);
        RefSync::load(&fresh, &dir, "dpo").unwrap();
        assert_eq!(values(&fresh), [1.5, -2.0]);
        std::fs::remove_file(dir.join(REFERENCE_FILE)).unwrap();
        let e = RefSync::load(&fresh, &dir, "grpo").unwrap_err().to_string();
        assert!(e.contains("reference.safetensors: missing"), "{e}");
        assert!(e.contains("[grpo] sync_ref_model"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
