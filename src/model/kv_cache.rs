//! Keys and values of the tokens seen so far, per layer, so that each generated token costs
//! one query against the cache instead of a forward pass over the whole prefix.
//!
//! Each layer's keys and values live in one buffer `[B, Hkv, capacity, D]`, allocated once
//! and written in place (`slice_set`); attention reads the first `len` positions as a narrow
//! view. Appending by concatenation would copy the whole cache every token.
//!
//! A decode step replayed as a CUDA graph cannot carry the length as a host value: after
//! [`KvCache::fix_shapes`] an append writes at the length held on the device
//! (`crate::kernels::decode_step`) and attention reads the buffers at their full capacity,
//! the positions past the length masked out by the step's key mask.

use candle_core::{DType, Result, Tensor};

use crate::kernels::decode_step::{self, HeadNorm};

#[derive(Default)]
pub struct KvCache {
    /// Per layer: the key and value buffers, `[B, Hkv, capacity, D]`.
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    /// Positions to allocate on the first append; a cache made with [`KvCache::new`] starts
    /// at what the first append needs and doubles when full.
    capacity: usize,
    /// After [`KvCache::fix_shapes`]: the decode step's `[2]` i64 state, whose first element
    /// is the length appends write at.
    fixed: Option<Tensor>,
    /// After [`KvCache::fix_shapes`]: `[1, capacity]` f32, each key's index.
    key_index: Option<Tensor>,
}

impl KvCache {
    /// A cache that grows as needed (doubling, so appends stay amortised O(1) per token).
    pub fn new(num_layers: usize) -> Self {
        Self::with_capacity(num_layers, 0)
    }

    /// A cache whose buffers hold `capacity` positions from the start: generation knows its
    /// longest sequence up front, so nothing is ever reallocated.
    pub fn with_capacity(num_layers: usize, capacity: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
            capacity,
            fixed: None,
            key_index: None,
        }
    }

    /// From now on each append is one position, written where `step[0]` (a `[2]` i64 tensor
    /// on the cache's device, equal to [`KvCache::len`]) says, and returns the whole buffers;
    /// the caller advances `step` and, per executed step, [`KvCache::advance`]. The buffers
    /// must already hold their final capacity.
    pub fn fix_shapes(&mut self, step: Tensor) -> Result<()> {
        for (k, _) in self.layers.iter().flatten() {
            if k.dim(2)? != self.capacity {
                candle_core::bail!("a cache with fixed shapes needs its buffers at full capacity");
            }
        }
        // Made here, before any capture: a step's ops upload nothing from the host.
        let cap = u32::try_from(self.capacity).map_err(candle_core::Error::wrap)?;
        let index = Tensor::arange(0u32, cap, step.device())?.to_dtype(DType::F32)?;
        self.key_index = Some(index.reshape((1, self.capacity))?);
        self.fixed = Some(step);
        Ok(())
    }

    /// With fixed shapes, `key_valid` (`[B, capacity]`) less the keys that a sliding window of
    /// `w` positions hides from this step's query, which sits at key index `L = step[0]` and
    /// sees keys from `L - w + 1` on. Computed from the device length, so a replayed graph
    /// stays right; each query otherwise sits at the cache's end (`causal_offset`), where a
    /// window would count back from the wrong key. `None` without fixed shapes, or where the
    /// window is as long as the cache.
    pub fn windowed(&self, key_valid: &Tensor, w: usize) -> Result<Option<Tensor>> {
        let (Some(step), Some(index)) = (&self.fixed, &self.key_index) else {
            return Ok(None);
        };
        // A window as long as the cache hides nothing from any query in it.
        if w >= self.capacity {
            return Ok(None);
        }
        let first = (step.narrow(0, 0, 1)?.to_dtype(DType::F32)? - (w as f64 - 1.0))?;
        let inside = index.broadcast_ge(&first)?.to_dtype(key_valid.dtype())?;
        Ok(Some(key_valid.broadcast_mul(&inside)?))
    }

    /// One more position was written by a step with fixed shapes.
    pub fn advance(&mut self) {
        self.len += 1;
    }

    /// The causal offset of `t` new queries: the cached length, or with fixed shapes the
    /// capacity less `t` (the last query sees every position; the key mask hides the unwritten
    /// ones).
    pub fn causal_offset(&self, t: usize) -> usize {
        match self.fixed {
            Some(_) => self.capacity.saturating_sub(t),
            None => self.len,
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers hold before they must grow.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// With fixed shapes: one position's stacked projections `y` (`[B, 1, nq + 2 Hkv D]`: q,
    /// then k, then v) split by one kernel, q and k normalised by `norm` and rotated by `rope`
    /// (cos, sin) where given, k and v written at the device length
    /// ([`decode_step::qkv_write`]); returns q `[B, nq / D, 1, D]` and the whole buffers, as
    /// [`KvCache::append`] returns them. `None` without fixed shapes.
    pub fn append_stacked(
        &self,
        layer: usize,
        y: &Tensor,
        nq: usize,
        rope: Option<(&Tensor, &Tensor)>,
        norm: Option<HeadNorm>,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        let Some((bk, bv, step)) = self.fixed_buffers(layer)? else {
            return Ok(None);
        };
        let q = decode_step::qkv_write(y, bk, bv, step, nq, rope, norm)?;
        Ok(Some((q, bk.clone(), bv.clone())))
    }

    /// With fixed shapes: `layer`'s key and value buffers (`[B, Hkv, capacity, D]`) and the
    /// device step (`[2]` i64, the length first), for a kernel that writes the new position
    /// itself (`attention::attention_stacked`); `None` without fixed shapes.
    pub fn fixed_buffers(&self, layer: usize) -> Result<Option<(&Tensor, &Tensor, &Tensor)>> {
        let Some(step) = &self.fixed else {
            return Ok(None);
        };
        let Some((bk, bv)) = &self.layers[layer] else {
            candle_core::bail!("a cache with fixed shapes appends to allocated buffers");
        };
        Ok(Some((bk, bv, step)))
    }

    /// Whether appends write at the device length ([`KvCache::fix_shapes`]).
    pub fn is_fixed(&self) -> bool {
        self.fixed.is_some()
    }

    /// Writes `k`, `v` (`[B, Hkv, T, D]`) for `layer` after the cached positions and returns
    /// views of every cached position (`[B, Hkv, len + T, D]`, strided along the positions).
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        if let Some((bk, bv, step)) = self.fixed_buffers(layer)? {
            if t != 1 {
                candle_core::bail!("a cache with fixed shapes appends one position, not {t}");
            }
            decode_step::kv_write(bk, k, step)?;
            decode_step::kv_write(bv, v, step)?;
            return Ok((bk.clone(), bv.clone()));
        }
        let need = self.len + t;
        let grow = match &self.layers[layer] {
            Some((bk, _)) => bk.dim(2)? < need,
            None => true,
        };
        if grow {
            let cap = need.max(self.capacity).max(2 * self.len);
            let old = self.layers[layer].take();
            let nk = self.alloc(k, cap, old.as_ref().map(|o| &o.0))?;
            let nv = self.alloc(v, cap, old.as_ref().map(|o| &o.1))?;
            self.layers[layer] = Some((nk, nv));
            if layer + 1 == self.layers.len() {
                self.capacity = cap;
            }
        }
        let (bk, bv) = self.layers[layer].as_ref().expect("allocated above");
        bk.slice_set(&k.contiguous()?, 2, self.len)?;
        bv.slice_set(&v.contiguous()?, 2, self.len)?;
        let out = (bk.narrow(2, 0, need)?, bv.narrow(2, 0, need)?);
        if layer + 1 == self.layers.len() {
            self.len = need;
        }
        Ok(out)
    }

    /// A zeroed buffer shaped like `like` with `cap` positions, holding the cached positions
    /// of `old` when there is one.
    fn alloc(&self, like: &Tensor, cap: usize, old: Option<&Tensor>) -> Result<Tensor> {
        let (b, h, _, d) = like.dims4()?;
        let buf = Tensor::zeros((b, h, cap, d), like.dtype(), like.device())?;
        if let Some(old) = old {
            if self.len > 0 {
                buf.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
        }
        Ok(buf)
    }

    /// Keeps only the given batch rows, in that order (`rows` `[B']` u32; a row may repeat):
    /// generation drops finished rows, and copies a shared prompt's rows to its group.
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(rows, 0)?;
            *v = v.index_select(rows, 0)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn appends_in_place_and_reads_every_cached_position() {
        let dev = Device::Cpu;
        let full = Tensor::arange(0f32, 2.0 * 3.0 * 7.0 * 4.0, &dev)
            .unwrap()
            .reshape((2, 3, 7, 4))
            .unwrap();
        for capacity in [0, 7, 9] {
            let mut c = KvCache::with_capacity(2, capacity);
            let mut seen = None;
            for (start, len) in [(0, 3), (3, 1), (4, 1), (5, 2)] {
                let part = full.narrow(2, start, len).unwrap();
                for layer in 0..2 {
                    seen = Some(c.append(layer, &part, &(&part * 2.0).unwrap()).unwrap());
                }
                assert_eq!(c.len(), start + len);
            }
            let (k, v) = seen.unwrap();
            let dk = (k - &full).unwrap().abs().unwrap().max_all().unwrap();
            let dv = (v - (&full * 2.0).unwrap()).unwrap().abs().unwrap();
            assert_eq!(dk.to_scalar::<f32>().unwrap(), 0.0, "capacity {capacity}");
            assert_eq!(dv.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
            assert!(c.capacity() >= 7);
            if capacity == 9 {
                assert_eq!(c.capacity(), 9, "a preallocated cache never grows");
            }
        }
        // Row selection keeps the cached positions of the chosen rows.
        let mut c = KvCache::with_capacity(1, 8);
        c.append(0, &full, &full).unwrap();
        c.select_rows(&Tensor::new(&[1u32, 1, 0], &dev).unwrap())
            .unwrap();
        let part = Tensor::zeros((3, 3, 1, 4), DType::F32, &dev).unwrap();
        let (k, _) = c.append(0, &part, &part).unwrap();
        assert_eq!(k.dims(), [3, 3, 8, 4]);
        let want = full.index_select(&Tensor::new(&[1u32, 1, 0], &dev).unwrap(), 0);
        let d = (k.narrow(2, 0, 7).unwrap() - want.unwrap())
            .unwrap()
            .abs()
            .unwrap();
        assert_eq!(d.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
}
