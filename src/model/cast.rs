//! Weights in the compute dtype. Parameters are f32 master copies cast in every forward pass,
//! which training needs (the cast carries the gradient back to f32). Generation runs hundreds
//! of forward passes over unchanging weights, and per decode step the casts would move ~4x the
//! bytes of the weights themselves; inside [`FrozenWeights`] each weight is cast once and the
//! copy reused.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{DType, Result, Tensor, TensorId};

thread_local! {
    /// `Some` while a [`FrozenWeights`] guard is alive on this thread.
    static FROZEN: RefCell<Option<HashMap<(TensorId, DType), Tensor>>> = const { RefCell::new(None) };
}

/// `w` in `dtype`: cast once per [`FrozenWeights`] scope, or every call outside one.
pub fn weight(w: &Tensor, dtype: DType) -> Result<Tensor> {
    if w.dtype() == dtype {
        return Ok(w.clone());
    }
    let key = (w.id(), dtype);
    if let Some(hit) = FROZEN.with_borrow(|m| m.as_ref().and_then(|m| m.get(&key).cloned())) {
        return Ok(hit);
    }
    let cast = w.to_dtype(dtype)?;
    FROZEN.with_borrow_mut(|m| {
        if let Some(m) = m.as_mut() {
            m.insert(key, cast.detach());
        }
    });
    Ok(cast)
}

/// While alive, weights are taken to be constant on this thread: each is cast once. Nothing
/// may update a weight inside the scope (generation only reads them); the copies are dropped
/// with the guard.
pub struct FrozenWeights {
    outermost: bool,
}

impl FrozenWeights {
    pub fn enter() -> Self {
        let outermost = FROZEN.with_borrow_mut(|m| {
            let fresh = m.is_none();
            if fresh {
                *m = Some(HashMap::new());
            }
            fresh
        });
        Self { outermost }
    }
}

impl Drop for FrozenWeights {
    fn drop(&mut self) {
        if self.outermost {
            FROZEN.with_borrow_mut(|m| *m = None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn casts_once_inside_the_scope_and_every_time_outside() {
        let w = Tensor::new(&[1.5f32, -2.0], &Device::Cpu).unwrap();
        let a = weight(&w, DType::BF16).unwrap();
        let b = weight(&w, DType::BF16).unwrap();
        assert_ne!(a.id(), b.id(), "no scope: a fresh cast each call");
        {
            let _outer = FrozenWeights::enter();
            let c = weight(&w, DType::BF16).unwrap();
            {
                let _inner = FrozenWeights::enter();
                assert_eq!(weight(&w, DType::BF16).unwrap().id(), c.id());
            }
            // The inner guard leaves the outer scope's copies in place.
            assert_eq!(weight(&w, DType::BF16).unwrap().id(), c.id());
            assert_eq!(c.to_vec1::<half::bf16>().unwrap()[0].to_f32(), 1.5);
        }
        let d = weight(&w, DType::BF16).unwrap();
        assert_ne!(d.id(), weight(&w, DType::BF16).unwrap().id());
        assert_eq!(weight(&w, DType::F32).unwrap().id(), w.id());
    }
}
