//! Weights in the compute dtype. Parameters are f32 master copies; [`weight`] hands a layer
//! its weight in the compute dtype, in one of three ways:
//! - a **compute copy** registered by the optimizer ([`register_copy`]): a persistent bf16
//!   variable that AdamW rewrites in the pass that updates the master. The forward reads it
//!   and the backward leaves its gradient on it, so the step has no cast node: no cast in the
//!   forward, and no zero-filled f32 gradient plus cast and add per weight in the backward;
//! - inside [`FrozenWeights`] (generation): each weight cast once and the copy reused, since
//!   hundreds of decode steps over unchanging weights would otherwise each move ~4x the bytes
//!   of the weights in casts;
//! - otherwise a cast in the graph, which carries the gradient back to the f32 master.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Result, Tensor, TensorId};

thread_local! {
    /// `Some` while a [`FrozenWeights`] guard is alive on this thread.
    static FROZEN: RefCell<Option<HashMap<(TensorId, DType), Tensor>>> = const { RefCell::new(None) };
    /// [`frozen_stack`]'s stacks, by (first part, parts, dtype); emptied with the scope.
    static STACKS: RefCell<HashMap<(TensorId, usize, DType), Tensor>> = RefCell::new(HashMap::new());
    /// [`frozen_padded`]'s weights, by (weight, rows, dtype); emptied with the scope.
    static PADDED: RefCell<HashMap<(TensorId, usize, DType), Tensor>> = RefCell::new(HashMap::new());
    /// [`frozen_derived`]'s weights, by (key, dtype); emptied with the scope.
    static DERIVED: RefCell<HashMap<(TensorId, DType), Tensor>> = RefCell::new(HashMap::new());
}

/// Compute copies by their master's id. Global rather than per thread: tensor ids are unique
/// in the process, and a rank's optimizer and forward may run on different threads.
static COPIES: Mutex<Option<HashMap<TensorId, Tensor>>> = Mutex::new(None);

fn copies() -> MutexGuard<'static, Option<HashMap<TensorId, Tensor>>> {
    // A panic elsewhere cannot leave the map half-written: every access is one insert,
    // remove or lookup.
    COPIES.lock().unwrap_or_else(|e| e.into_inner())
}

/// From now on [`weight`] hands out `copy` (tracked: gradients land on it) for `master` in
/// `copy`'s dtype. The caller keeps `copy` equal to `master` rounded, and unregisters it
/// before it stops doing so.
pub fn register_copy(master: &Tensor, copy: &Tensor) {
    let before = copies()
        .get_or_insert_with(HashMap::new)
        .insert(master.id(), copy.clone());
    // Two owners would each rewrite the copy the other registered.
    debug_assert!(before.is_none(), "a second compute copy of one master");
}

/// Undoes [`register_copy`] if `copy` is still the one registered for `master`.
pub fn unregister_copy(master: &Tensor, copy: &Tensor) {
    let mut map = copies();
    if let Some(m) = map.as_mut() {
        if m.get(&master.id()).is_some_and(|c| c.id() == copy.id()) {
            m.remove(&master.id());
        }
    }
}

/// `w` in `dtype`: its compute copy if one is registered, else cast once per
/// [`FrozenWeights`] scope, or every call outside one.
pub fn weight(w: &Tensor, dtype: DType) -> Result<Tensor> {
    if w.dtype() == dtype {
        return Ok(held(w));
    }
    let copy = copies()
        .as_ref()
        .and_then(|m| m.get(&w.id()).filter(|c| c.dtype() == dtype).cloned());
    if let Some(c) = copy {
        // Generation and scoring record no graph: the same storage, untracked.
        return Ok(if untracked() { c.detach() } else { c });
    }
    let key = (w.id(), dtype);
    if let Some(hit) = FROZEN.with_borrow(|m| m.as_ref().and_then(|m| m.get(&key).cloned())) {
        return Ok(hit);
    }
    let cast = w.to_dtype(dtype)?;
    // In generation the first read is untracked too: a tracked weight makes every tensor
    // computed from it hold its inputs, so a forward would keep all of its activations alive
    // until its output is dropped (a prefill's whole graph).
    let frozen = FROZEN.with_borrow_mut(|m| {
        m.as_mut().map(|m| {
            let kept = cast.detach();
            m.insert(key, kept.clone());
            kept
        })
    });
    Ok(match frozen {
        Some(kept) => kept,
        None if untracked() => cast.detach(),
        None => cast,
    })
}

/// `w` in `dtype` where that costs no cast of its own and its gradient can stay f32: its
/// compute copy while a block tape records (which keeps whatever dtype an op's gradient comes
/// in; candle's graph would add an f32 gradient to the copy's bf16 one, so there the master
/// is read), or the one cast of a [`FrozenWeights`] scope (which [`weight`] then hands out
/// again); else `w` itself. For an op that reads any float dtype (the embedding lookup, the
/// GEMM's bias epilogue) whose gradient is f32 either way.
pub fn weight_if_kept(w: &Tensor, dtype: DType) -> Result<Tensor> {
    let kept = crate::tape::recording()
        && copies()
            .as_ref()
            .is_some_and(|m| m.get(&w.id()).is_some_and(|c| c.dtype() == dtype));
    match kept || frozen() {
        true => weight(w, dtype),
        false => Ok(held(w)),
    }
}

/// Whether a [`FrozenWeights`] scope is open on this thread: generation, where nothing wants a
/// gradient.
pub fn frozen() -> bool {
    FROZEN.with_borrow(|m| m.is_some())
}

thread_local! {
    /// Open [`Untracked`] scopes on this thread.
    static UNTRACKED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A scope in which forwards read every weight detached, so that they build no graph:
/// scoring a rollout (its old and reference log-probabilities, values and rewards), a frozen
/// reference's or teacher's forward, an evaluation. A weight read tracked makes each tensor
/// computed from it hold its inputs, so a forward would keep all of its activations alive
/// until its output is dropped, as if a backward were to follow. Unlike [`FrozenWeights`] it
/// caches no casts and picks no generation-only kernel (the GELU epilogue, the few-row decode
/// GEMM). On CUDA the fused residual-add norms take their forward-only pass for inputs that
/// carry no gradient, as a frozen reference's forward already did; on the CPU what it computes
/// is bit for bit the tracked forward's.
pub struct Untracked(std::marker::PhantomData<*const ()>);

impl Untracked {
    /// Opens the scope on this thread (the guard cannot leave it: it is not `Send`).
    pub fn enter() -> Self {
        UNTRACKED.set(UNTRACKED.get() + 1);
        Untracked(std::marker::PhantomData)
    }
}

impl Drop for Untracked {
    fn drop(&mut self) {
        UNTRACKED.set(UNTRACKED.get() - 1);
    }
}

/// Whether weights are read detached here: in generation or in an [`Untracked`] scope.
pub fn untracked() -> bool {
    frozen() || UNTRACKED.get() > 0
}

/// A weight read as held (not cast to the compute dtype); detached in generation and in
/// scoring ([`Untracked`]), which build no graph: a tracked weight would make a forward keep
/// every activation computed from it until its output is dropped.
pub fn held(w: &Tensor) -> Tensor {
    match untracked() {
        true => w.detach(),
        false => w.clone(),
    }
}

/// `parts` in `dtype` (each as [`weight`] gives it) stacked along their first dimension, built
/// once per [`FrozenWeights`] scope and untracked; `None` outside one. Generation's q, k and v
/// projections read one stacked weight in the decode step, one GEMM where they were three.
/// The stack is a copy: where the parts are f32 masters, their casts in this scope are dropped
/// in its favour; where they are registered compute copies (RL training), it is held beside
/// them for the scope (for a 7B Llama about 3 GB in bf16).
pub fn frozen_stack(parts: &[&Tensor], dtype: DType) -> Result<Option<Tensor>> {
    let Some(first) = parts.first() else {
        return Ok(None);
    };
    if !frozen() {
        return Ok(None);
    }
    let key = (first.id(), parts.len(), dtype);
    if let Some(hit) = STACKS.with_borrow(|m| m.get(&key).cloned()) {
        return Ok(Some(hit));
    }
    let cast = parts
        .iter()
        .map(|p| weight(p, dtype))
        .collect::<Result<Vec<_>>>()?;
    let stacked = Tensor::cat(&cast, 0)?.detach();
    STACKS.with_borrow_mut(|m| m.insert(key, stacked.clone()));
    // The parts' own casts (what the prefill read) are dropped, so that the scope holds the
    // weights once, stacked. A later reader casts again, which must not happen inside a CUDA
    // graph capture (the cast would be the graph's memory, kept past it): the decode step
    // reads only the stack.
    FROZEN.with_borrow_mut(|m| {
        if let Some(m) = m.as_mut() {
            for p in parts {
                m.remove(&(p.id(), dtype));
            }
        }
    });
    Ok(Some(stacked))
}

/// `w` (`[N, K]`) in `dtype` as [`weight`] gives it, with zero rows appended up to `rows`,
/// built once per [`FrozenWeights`] scope and untracked; `None` outside one. Generation's LM
/// head at a vocabulary whose rows cuBLASLt is not handed (GPT-2's 50,257): the padded head
/// is one GEMM of ours, where the head as it is fell to candle's matmul every decode step.
/// A tied head's cast, which the embedding lookup reads, is kept beside it (for GPT-2 77 MB
/// more); an untied head's, made here, is not.
pub fn frozen_padded(w: &Tensor, rows: usize, dtype: DType) -> Result<Option<Tensor>> {
    if !frozen() {
        return Ok(None);
    }
    let key = (w.id(), rows, dtype);
    if let Some(hit) = PADDED.with_borrow(|m| m.get(&key).cloned()) {
        return Ok(Some(hit));
    }
    let n = w.dim(0)?;
    if rows < n {
        candle_core::bail!("frozen_padded: {rows} rows are fewer than the weight's {n}");
    }
    // A cast this call makes is dropped once padded: the scope holds an untied head once.
    // A tied table's cast, which the embedding lookup read first, stays for the lookup.
    let cast_key = (w.id(), dtype);
    let kept = FROZEN.with_borrow(|m| m.as_ref().is_some_and(|m| m.contains_key(&cast_key)));
    let padded = weight(w, dtype)?.pad_with_zeros(0, 0, rows - n)?.detach();
    if !kept {
        FROZEN.with_borrow_mut(|m| m.as_mut().map(|m| m.remove(&cast_key)));
    }
    PADDED.with_borrow_mut(|m| m.insert(key, padded.clone()));
    Ok(Some(padded))
}

/// A tensor that `make` builds from parameters (DoRA's `g - 1` of a layer, under the key of its
/// magnitude vector), built once per [`FrozenWeights`] scope and untracked; `None` outside
/// one. Built in the eager step before a decode step's graph capture, so the capture reads it
/// and allocates nothing for it.
pub fn frozen_derived(
    key: &Tensor,
    dtype: DType,
    make: impl FnOnce() -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    if !frozen() {
        return Ok(None);
    }
    let key = (key.id(), dtype);
    if let Some(hit) = DERIVED.with_borrow(|m| m.get(&key).cloned()) {
        return Ok(Some(hit));
    }
    let made = make()?.to_dtype(dtype)?.detach();
    DERIVED.with_borrow_mut(|m| m.insert(key, made.clone()));
    Ok(Some(made))
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
            STACKS.with_borrow_mut(HashMap::clear);
            PADDED.with_borrow_mut(HashMap::clear);
            DERIVED.with_borrow_mut(HashMap::clear);
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

    /// Variables (f32 masters, registered compute copies) are read detached in an
    /// untracked scope, in either dtype, and tracked again once every scope has closed.
    #[test]
    fn an_untracked_scope_reads_every_weight_detached() {
        let w = candle_core::Var::new(&[1.5f32, -2.0], &Device::Cpu).unwrap();
        let w = w.as_tensor();
        let tracked = |t: Tensor| t.track_op();
        assert!(tracked(weight(w, DType::F32).unwrap()));
        assert!(tracked(weight(w, DType::BF16).unwrap()));
        {
            let _outer = Untracked::enter();
            {
                let _inner = Untracked::enter();
                assert!(!tracked(weight(w, DType::BF16).unwrap()));
            }
            assert!(!tracked(weight(w, DType::F32).unwrap()));
            assert!(!tracked(weight(w, DType::BF16).unwrap()));
            assert!(!tracked(held(w)));
            assert!(!tracked(weight_if_kept(w, DType::BF16).unwrap()));
        }
        assert!(tracked(weight(w, DType::F32).unwrap()));
        assert!(tracked(held(w)));
        // And in generation's scope, the first read of a weight as well as the cached ones.
        let _frozen = FrozenWeights::enter();
        assert!(!tracked(weight(w, DType::F32).unwrap()));
        assert!(!tracked(weight(w, DType::BF16).unwrap()));
        assert!(!tracked(weight(w, DType::BF16).unwrap()));
    }

    #[test]
    fn a_stack_is_built_once_per_scope_and_replaces_its_parts_casts() {
        let dev = candle_core::Device::Cpu;
        let q = Tensor::new(&[[1.5f32, -2.0], [0.25, 3.0]], &dev).unwrap();
        let k = Tensor::new(&[[4.0f32, 5.0]], &dev).unwrap();
        assert!(frozen_stack(&[&q, &k], DType::BF16).unwrap().is_none());
        {
            let _gen = FrozenWeights::enter();
            let q_cast = weight(&q, DType::BF16).unwrap();
            let s = frozen_stack(&[&q, &k], DType::BF16).unwrap().unwrap();
            assert_eq!(s.dims(), [3, 2]);
            assert!(!s.track_op());
            let rows = s.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(rows, [[1.5, -2.0], [0.25, 3.0], [4.0, 5.0]]);
            let again = frozen_stack(&[&q, &k], DType::BF16).unwrap().unwrap();
            assert_eq!(again.id(), s.id(), "built once per scope");
            assert_ne!(
                weight(&q, DType::BF16).unwrap().id(),
                q_cast.id(),
                "the cast dropped"
            );
        }
        let _next = FrozenWeights::enter();
        let fresh = frozen_stack(&[&q, &k], DType::BF16).unwrap().unwrap();
        assert_eq!(fresh.dims(), [3, 2], "a new scope builds its own");
    }

    #[test]
    fn a_padded_weight_is_built_once_per_scope_with_zero_rows() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1.5f32, -2.0], [0.25, 3.0], [4.0, 5.0]], &dev).unwrap();
        assert!(frozen_padded(&w, 8, DType::BF16).unwrap().is_none());
        {
            let _gen = FrozenWeights::enter();
            let p = frozen_padded(&w, 8, DType::BF16).unwrap().unwrap();
            assert_eq!((p.dims(), p.dtype()), (&[8, 2][..], DType::BF16));
            assert!(!p.track_op());
            let rows = p.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            let mut want = vec![vec![1.5, -2.0], vec![0.25, 3.0], vec![4.0, 5.0]];
            want.resize(8, vec![0.0, 0.0]);
            assert_eq!(rows, want);
            let again = frozen_padded(&w, 8, DType::BF16).unwrap().unwrap();
            assert_eq!(again.id(), p.id(), "built once per scope");
            // The cast made to pad was not kept; one made before (a tied table's) is.
            assert!(
                FROZEN.with_borrow(|m| !m.as_ref().unwrap().contains_key(&(w.id(), DType::BF16)))
            );
            let cast = weight(&w, DType::BF16).unwrap();
            assert!(frozen_padded(&w, 16, DType::BF16).unwrap().is_some());
            assert_eq!(
                weight(&w, DType::BF16).unwrap().id(),
                cast.id(),
                "a kept cast stays"
            );
            assert!(
                frozen_padded(&w, 2, DType::BF16).is_err(),
                "fewer rows than the weight"
            );
        }
        let _next = FrozenWeights::enter();
        let fresh = frozen_padded(&w, 8, DType::BF16).unwrap().unwrap();
        assert_eq!(fresh.dims(), [8, 2], "a new scope builds its own");
    }

    #[test]
    fn a_registered_copy_is_handed_out_in_its_dtype_until_unregistered() {
        let w = Tensor::new(&[1.5f32, -2.0], &Device::Cpu).unwrap();
        let copy = candle_core::Var::from_tensor(&w.to_dtype(DType::BF16).unwrap()).unwrap();
        register_copy(&w, copy.as_tensor());
        assert_eq!(weight(&w, DType::BF16).unwrap().id(), copy.as_tensor().id());
        assert!(weight(&w, DType::BF16).unwrap().is_variable());
        // Another dtype is still a cast.
        assert_eq!(weight(&w, DType::F16).unwrap().dtype(), DType::F16);
        // A stale copy's owner cannot unregister its successor.
        let other = Tensor::new(&[0f32], &Device::Cpu).unwrap();
        unregister_copy(&w, &other);
        assert_eq!(weight(&w, DType::BF16).unwrap().id(), copy.as_tensor().id());
        {
            let _gen = FrozenWeights::enter();
            let g = weight(&w, DType::BF16).unwrap();
            assert!(!g.track_op());
            copy.set(
                &Tensor::new(&[0.5f32, 4.0], &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(
                g.to_vec1::<half::bf16>().unwrap()[1].to_f32(),
                4.0,
                "shares the storage"
            );
        }
        unregister_copy(&w, copy.as_tensor());
        assert_ne!(weight(&w, DType::BF16).unwrap().id(), copy.as_tensor().id());
    }
}
