//! The optimizer step: the global gradient norm, clipping to it, and AdamW with decoupled
//! weight decay over f32 master weights, writing each weight's compute copy (bf16) in the same
//! pass where it has one.
//!
//! Contract: `norm = sqrt(sum of g^2 over every gradient)`; when `max_norm > 0` and
//! `norm > max_norm` each gradient is scaled by `max_norm / (norm + 1e-6)`; then for each
//! parameter `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
//! `p -= lr * (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd p)`, then `copy = p`
//! rounded to the copy's dtype. A gradient is f32, or bf16 when it is a compute copy's; it is
//! read as f32 either way.
//!
//! The reference is candle's elementwise ops, a dozen launches and a one-block sum per
//! tensor on a GPU; the kernel (`kernels/adamw.cu`) does the whole step in three launches
//! with one read-back of the norm.

use anyhow::Result;
use candle_core::{DType, Tensor, Var};

use super::KernelChoice;

/// The moments and gradient of one parameter AdamW updates.
pub struct Slot<'a> {
    pub param: &'a Var,
    pub m: &'a mut Tensor,
    pub v: &'a mut Tensor,
    pub grad: &'a Tensor,
    /// The weight's compute copy, rewritten from the updated master.
    pub copy: Option<&'a Var>,
    /// The learning rate times the parameter's scale.
    pub lr: f64,
    /// Its weight decay (0 for a parameter without).
    pub weight_decay: f64,
}

/// What one step shares across parameters.
#[derive(Clone, Copy, Debug)]
pub struct Hyper {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// The step number, from 1, for the bias corrections.
    pub t: usize,
    /// Clip to this global norm (0: no clipping).
    pub max_norm: f64,
}

/// Clips by the global norm of `grads` (every gradient of the step, owned or not) and
/// updates `slots`; returns the norm before clipping.
pub fn update(
    grads: &[Tensor],
    slots: &mut [Slot],
    h: &Hyper,
    choice: KernelChoice,
) -> Result<f64> {
    if choice == KernelChoice::Custom {
        #[cfg(feature = "cuda")]
        if grads.first().is_some_and(|g| g.device().is_cuda()) {
            match super::cuda::adamw::update(grads, slots, h)? {
                Some(norm) => return Ok(norm),
                None => super::registry::warn_fallback(
                    "adamw",
                    "a parameter, moment or gradient is not contiguous f32 (bf16 for a \
                     gradient or compute copy)",
                ),
            }
        }
    }
    update_reference(grads, slots, h)
}

pub fn update_reference(grads: &[Tensor], slots: &mut [Slot], h: &Hyper) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads {
        sq += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    let norm = sq.sqrt();
    let clip = (h.max_norm > 0.0 && norm > h.max_norm).then(|| h.max_norm / (norm + 1e-6));
    let (b1, b2) = (h.beta1, h.beta2);
    let bc1 = 1.0 - b1.powi(h.t as i32);
    let bc2 = 1.0 - b2.powi(h.t as i32);
    for s in slots.iter_mut() {
        let g = s.grad.to_dtype(DType::F32)?;
        let g = match clip {
            Some(c) => (g * c)?,
            None => g,
        };
        *s.m = ((&*s.m * b1)? + (&g * (1.0 - b1))?)?;
        *s.v = ((&*s.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
        let mhat = (&*s.m / bc1)?;
        let denom = ((&*s.v / bc2)?.sqrt()? + h.eps)?;
        let mut upd = (mhat / denom)?;
        let p = s.param.as_tensor();
        if s.weight_decay != 0.0 {
            upd = (upd + (p * s.weight_decay)?)?;
        }
        let new = (p - (upd * s.lr)?)?;
        if let Some(c) = s.copy {
            c.set(&new.to_dtype(c.dtype())?)?;
        }
        s.param.set(&new)?;
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Adam's first step moves a parameter by lr against its gradient's sign whatever the
    /// gradient's size; clipping only rescales (so the first step does not change), and the
    /// norm reported is the one before clipping.
    #[test]
    fn first_step_is_lr_times_the_sign_and_norm_is_before_clipping() {
        let dev = Device::Cpu;
        let p = Var::from_slice(&[1.0f32, 1.0, 1.0], 3, &dev).unwrap();
        let g = Tensor::new(&[3.0f32, -4.0, 0.0], &dev).unwrap();
        let (mut m, mut v) = (g.zeros_like().unwrap(), g.zeros_like().unwrap());
        let h = Hyper {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            t: 1,
            max_norm: 1.0,
        };
        let mut slots = [Slot {
            param: &p,
            m: &mut m,
            v: &mut v,
            grad: &g,
            copy: None,
            lr: 0.1,
            weight_decay: 0.0,
        }];
        let norm = update_reference(std::slice::from_ref(&g), &mut slots, &h).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (got[0] - 0.9).abs() < 1e-5 && (got[1] - 1.1).abs() < 1e-5,
            "{got:?}"
        );
        assert_eq!(got[2], 1.0);
        // The moments saw the clipped gradient: m = 0.1 * 3 / 5.
        assert!((m.to_vec1::<f32>().unwrap()[0] - 0.06).abs() < 1e-6);
    }
}
