//! Scaled-dot-product attention over `[batch, heads, time, head_dim]` tensors, with causal
//! masking (a query offset for the KV-cache decode path), per-sequence key padding and GQA.
//!
//! Contract shared by the reference and the CUDA kernel: query `i` sits at absolute position
//! `offset + i` and may see key `j` when `j <= offset + i` (if causal), `j > offset + i - w`
//! (under a sliding window of `w`) and key `j` is valid; a query row that can see no key at
//! all (a left-padding position) outputs zeros. Under a soft cap `c` (Gemma 2) each score `s`
//! (after the scale) becomes `c tanh(s / c)` before the mask and the softmax.

use candle_core::{DType, Result, Tensor, D};

use super::decode_step::HeadNorm;
use super::registry::{warn_fallback, KernelChoice};
pub use super::segments::Segments;

#[derive(Clone, Copy, Debug, Default)]
pub struct AttnMask<'a> {
    /// `Some(offset)` for causal attention; `offset` is the number of cached keys before the
    /// first query (0 for a full forward pass).
    pub causal_offset: Option<usize>,
    /// `[batch, keys]`, 1.0 where a key is a real token and 0.0 where it is padding.
    pub key_valid: Option<&'a Tensor>,
    /// Document boundaries of packed rows.
    pub segments: Option<&'a Segments>,
    /// A sliding window (causal only): query `i` sees no key at or before `offset + i - w`.
    /// Positions are key indices, so a left-padded row counts its padding, as transformers
    /// counts cache positions.
    pub window: Option<usize>,
    /// Gemma 2's cap on the scores (`attn_logit_softcapping`): not a mask, but like one it is
    /// part of which softmax a call computes, and it goes everywhere a mask goes.
    pub softcap: Option<f64>,
}

impl AttnMask<'_> {
    /// A sliding window counts back from a causal query's position and holds the query.
    pub fn check_window(&self) -> Result<()> {
        match (self.window, self.causal_offset) {
            (Some(0), _) => candle_core::bail!("attention: a sliding window of 0 keys"),
            (Some(_), None) => {
                candle_core::bail!("attention: a sliding window needs a causal mask")
            }
            _ => Ok(()),
        }
    }

    /// A soft cap is a positive, finite number of score units.
    pub fn check_softcap(&self) -> Result<()> {
        match self.softcap {
            Some(c) if !(c.is_finite() && c > 0.0) => {
                candle_core::bail!("attention: a soft cap of {c} on the scores (it must be > 0)")
            }
            _ => Ok(()),
        }
    }

    /// Segments apply to a full causal forward over one packed row per sequence: refuse them
    /// anywhere else rather than mask the wrong keys.
    pub fn check_segments(&self, b: usize, tq: usize, tk: usize) -> Result<()> {
        let Some(s) = self.segments else {
            return Ok(());
        };
        // Packed rows have no padding keys to mask; a key mask beside them is untested.
        if self.causal_offset != Some(0)
            || tq != tk
            || s.dims() != (b, tq)
            || self.key_valid.is_some()
        {
            candle_core::bail!(
                "attention: segments {:?} need a causal pass at offset 0 over [batch {b}, {tq}] \
                 queries and keys and no key mask (causal offset {:?}, {tk} keys, key mask {})",
                s.dims(),
                self.causal_offset,
                self.key_valid.is_some()
            );
        }
        Ok(())
    }
}

/// q: `[B, Hq, Tq, D]`, k and v: `[B, Hkv, Tk, D]` with `Hq % Hkv == 0`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
    choice: KernelChoice,
) -> Result<Tensor> {
    if choice == KernelChoice::Custom {
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let y = super::spans::timed(
                super::KernelOp::Attention,
                super::spans::Pass::Forward,
                q.device(),
                || super::cuda::attention::attention(q, k, v, mask, scale),
            )?;
            if let Some(y) = y {
                return Ok(y);
            }
            warn_fallback(
                "attention",
                &format!("no flash kernel for {:?} head_dim {}", q.dtype(), q.dim(3)?),
            );
            return reference_recorded(q, k, v, mask, scale);
        }
        if !q.device().is_cpu() || cfg!(feature = "cuda") {
            warn_fallback("attention", "the flash kernel runs on CUDA only");
        }
    }
    reference_recorded(q, k, v, mask, scale)
}

/// Generation's decode step at fixed shapes with q, k and v in one row of stacked projections
/// `y` (`[B, 1, (Hq + 2 Hkv) D]`): where our kernel takes it (CUDA, 16-bit, head dim 64 or
/// 128, up to 4 query heads per kv head), one launch splits `y`, normalises each q and k head
/// by `norm` (Qwen3) and rotates q and k by `rope` where given, writes k and v at position
/// `step[0]` of the caches (`[B, Hkv, cap, D]`) and attends, as `decode_step::qkv_write` and
/// then [`attention`] would; returns `[B, Hq, 1, D]`. `None` elsewhere, having done nothing:
/// the caller takes those two steps.
#[allow(clippy::too_many_arguments)]
pub fn attention_stacked(
    y: &Tensor,
    caches: (&Tensor, &Tensor),
    step: &Tensor,
    hq: usize,
    rope: Option<(&Tensor, &Tensor)>,
    norm: Option<HeadNorm>,
    mask: &AttnMask,
    scale: f64,
    choice: KernelChoice,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if choice == KernelChoice::Custom && y.device().is_cuda() {
        return super::spans::timed(
            super::KernelOp::Attention,
            super::spans::Pass::Forward,
            y.device(),
            || super::cuda::attention::decode_fresh(y, caches, step, hq, rope, norm, mask, scale),
        );
    }
    let _ = (y, caches, step, hq, rope, norm, mask, scale, choice);
    Ok(None)
}

/// [`attention_reference`] as one op of a block tape (`crate::tape`).
fn reference_recorded(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
) -> Result<Tensor> {
    crate::tape::island(&[q, k, v], |a| {
        #[cfg(feature = "cuda")]
        if a[0].device().is_cuda() {
            // On a GPU the composite's [B, H, T, T] intermediates would stay alive to the
            // end of the backward: recompute them there instead.
            return super::cuda::attention_recompute::attention(&a[0], &a[1], &a[2], mask, scale);
        }
        attention_reference(&a[0], &a[1], &a[2], mask, scale)
    })
}

/// Repeats each KV head `groups` times so that GQA reduces to ordinary multi-head attention.
pub fn repeat_kv(x: &Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(x.clone());
    }
    let (b, h, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, h, groups, t, d))?
        .reshape((b, h * groups, t, d))
}

/// `[B, 1, Tq, Tk]` of 1.0 (may attend) / 0.0, in f32.
pub fn allowed_mask(
    mask: &AttnMask,
    b: usize,
    tq: usize,
    tk: usize,
    dev: &candle_core::Device,
) -> Result<Option<Tensor>> {
    mask.check_window()?;
    let causal = match mask.causal_offset {
        Some(offset) => {
            let w = mask.window;
            let seen =
                move |i: usize, j: usize| j <= offset + i && w.is_none_or(|w| j + w > offset + i);
            let rows: Vec<f32> = (0..tq)
                .flat_map(|i| (0..tk).map(move |j| if seen(i, j) { 1.0 } else { 0.0 }))
                .collect();
            Some(Tensor::from_vec(rows, (1, 1, tq, tk), dev)?)
        }
        None => None,
    };
    let keys = match mask.key_valid {
        Some(kv) => Some(kv.to_dtype(DType::F32)?.reshape((b, 1, 1, tk))?),
        None => None,
    };
    mask.check_segments(b, tq, tk)?;
    let docs = match mask.segments {
        Some(s) => Some(s.same_document(dev)?),
        None => None,
    };
    let both = |x: Option<Tensor>, y: Option<Tensor>| -> Result<Option<Tensor>> {
        Ok(match (x, y) {
            (Some(x), Some(y)) => Some(x.broadcast_mul(&y)?),
            (x, y) => x.or(y),
        })
    };
    both(both(causal, keys)?, docs)
}

/// candle's composite in f32: the scores materialised, capped where the mask says, masked,
/// softmaxed.
pub fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
) -> Result<Tensor> {
    let (b, hq, tq, _) = q.dims4()?;
    let (_, hkv, tk, _) = k.dims4()?;
    if hq % hkv != 0 {
        candle_core::bail!("attention: {hq} query heads is not a multiple of {hkv} kv heads");
    }
    let dtype = q.dtype();
    let k = repeat_kv(&k.to_dtype(DType::F32)?, hq / hkv)?;
    let v = repeat_kv(&v.to_dtype(DType::F32)?, hq / hkv)?;
    mask.check_softcap()?;
    let q = q.to_dtype(DType::F32)?;
    let mut scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    if let Some(cap) = mask.softcap {
        scores = ((scores / cap)?.tanh()? * cap)?;
    }
    let probs = match allowed_mask(mask, b, tq, tk, q.device())? {
        Some(allowed) => {
            // Masked scores get a large negative bias rather than -inf so that a row with no
            // visible key stays finite; multiplying by `allowed` then turns that row into zeros.
            let bias = ((allowed.clone() - 1.0)? * 1e30)?;
            let p = softmax_last(&scores.broadcast_add(&bias)?)?;
            p.broadcast_mul(&allowed)?
        }
        None => softmax_last(&scores)?,
    };
    probs.matmul(&v.contiguous()?)?.to_dtype(dtype)
}

/// Differentiable softmax over the last dimension (candle-nn's fused one has no backward).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Under a cap `c` the softmax reads `c tanh(s / c)`: one query over three keys, by hand.
    #[test]
    fn a_soft_cap_bends_the_scores_before_the_softmax() {
        let dev = Device::Cpu;
        let q = Tensor::new(&[2.0f32], &dev).unwrap().reshape((1, 1, 1, 1));
        let k = Tensor::new(&[-1.0f32, 0.5, 3.0], &dev)
            .unwrap()
            .reshape((1, 1, 3, 1));
        let v = Tensor::new(&[1.0f32, 10.0, 100.0], &dev)
            .unwrap()
            .reshape((1, 1, 3, 1));
        let (q, k, v) = (q.unwrap(), k.unwrap(), v.unwrap());
        let (cap, scale) = (2.0f64, 0.5f64);
        let mask = AttnMask {
            softcap: Some(cap),
            ..Default::default()
        };
        let y = attention_reference(&q, &k, &v, &mask, scale).unwrap();
        let scores = [-1.0f64, 0.5, 3.0].map(|kj| cap * (2.0 * kj * scale / cap).tanh());
        let e = scores.map(f64::exp);
        let want = (e[0] + 10.0 * e[1] + 100.0 * e[2]) / e.iter().sum::<f64>();
        let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        let plain = attention_reference(&q, &k, &v, &AttnMask::default(), scale).unwrap();
        let plain = plain.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((plain - want).abs() > 1.0, "the cap changed nothing");
    }

    #[test]
    fn single_query_is_softmax_weighted_values() {
        let dev = Device::Cpu;
        // One head, head_dim 1, two keys: scores q*k = [0, ln 3] -> weights [1/4, 3/4].
        let q = Tensor::new(&[1.0f32], &dev)
            .unwrap()
            .reshape((1, 1, 1, 1))
            .unwrap();
        let k = Tensor::new(&[0.0f32, 3f32.ln()], &dev)
            .unwrap()
            .reshape((1, 1, 2, 1))
            .unwrap();
        let v = Tensor::new(&[4.0f32, 8.0], &dev)
            .unwrap()
            .reshape((1, 1, 2, 1))
            .unwrap();
        let y = attention_reference(&q, &k, &v, &AttnMask::default(), 1.0).unwrap();
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((y[0] - 7.0).abs() < 1e-5, "{y:?}");
        // Causal at position 0 sees only the first key.
        let m = AttnMask {
            causal_offset: Some(0),
            key_valid: None,
            segments: None,
            window: None,
            softcap: None,
        };
        let y = attention_reference(&q, &k, &v, &m, 1.0).unwrap();
        assert!((y.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] - 4.0).abs() < 1e-6);
        // A padded first key leaves only the second; a row with no key gives zero.
        let valid = Tensor::new(&[[0.0f32, 1.0]], &dev).unwrap();
        let m = AttnMask {
            causal_offset: None,
            key_valid: Some(&valid),
            segments: None,
            window: None,
            softcap: None,
        };
        let y = attention_reference(&q, &k, &v, &m, 1.0).unwrap();
        assert!((y.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] - 8.0).abs() < 1e-6);
        let m = AttnMask {
            causal_offset: Some(0),
            key_valid: Some(&valid),
            segments: None,
            window: None,
            softcap: None,
        };
        let y = attention_reference(&q, &k, &v, &m, 1.0).unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0], 0.0);
    }

    #[test]
    fn packed_rows_attend_within_their_documents_only() {
        let dev = Device::Cpu;
        let docs = [vec![3, 1, 5], vec![9]];
        let t = 10;
        let segments = Segments::from_lengths(&docs, t, &dev).unwrap();
        let q = Tensor::randn(0f32, 1.0, (2, 4, t, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 2, t, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 2, t, 8), &dev).unwrap();
        let packed = AttnMask {
            causal_offset: Some(0),
            key_valid: None,
            segments: Some(&segments),
            window: None,
            softcap: None,
        };
        let y = attention_reference(&q, &k, &v, &packed, 0.3).unwrap();
        let alone = AttnMask {
            causal_offset: Some(0),
            key_valid: None,
            segments: None,
            window: None,
            softcap: None,
        };
        // Each document (and each row's padding) gives what it gives on its own.
        for (b, row) in docs.iter().enumerate() {
            let used: usize = row.iter().sum();
            let mut at = 0;
            for n in row.iter().copied().chain([t - used]) {
                let part = |x: &Tensor| x.narrow(0, b, 1).unwrap().narrow(2, at, n).unwrap();
                let want = attention_reference(&part(&q), &part(&k), &part(&v), &alone, 0.3);
                let diff = (part(&y) - want.unwrap()).unwrap().abs().unwrap();
                let diff = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-6, "row {b}, document at {at}: {diff}");
                at += n;
            }
        }
        // Segments outside a full causal pass are refused.
        let cached = AttnMask {
            causal_offset: Some(3),
            ..packed
        };
        assert!(attention_reference(&q, &k, &v, &cached, 0.3).is_err());
    }

    /// Under a window of w, each query attends exactly as it would over its last w keys
    /// alone, at any cache offset; a window without a causal mask, or of no keys, is refused.
    #[test]
    fn a_sliding_window_is_attention_over_each_querys_last_keys() {
        let dev = Device::Cpu;
        let (tq, offset, w) = (9, 4, 3);
        let tk = offset + tq;
        let q = Tensor::randn(0f32, 1.0, (2, 4, tq, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 2, tk, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 2, tk, 8), &dev).unwrap();
        let windowed = AttnMask {
            causal_offset: Some(offset),
            key_valid: None,
            segments: None,
            window: Some(w),
            softcap: None,
        };
        let y = attention_reference(&q, &k, &v, &windowed, 0.3).unwrap();
        let full = AttnMask {
            window: None,
            causal_offset: None,
            ..windowed
        };
        for i in 0..tq {
            let end = offset + i + 1;
            let keys = |x: &Tensor| x.narrow(2, end - w, w).unwrap();
            let qi = q.narrow(2, i, 1).unwrap();
            let want = attention_reference(&qi, &keys(&k), &keys(&v), &full, 0.3).unwrap();
            let diff = (y.narrow(2, i, 1).unwrap() - want).unwrap().abs().unwrap();
            let diff = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-6, "query {i}: {diff}");
        }
        let unwindowed = attention_reference(
            &q,
            &k,
            &v,
            &AttnMask {
                window: None,
                ..windowed
            },
            0.3,
        );
        let moved = (unwindowed.unwrap() - &y).unwrap().abs().unwrap();
        assert!(moved.max_all().unwrap().to_scalar::<f32>().unwrap() > 1e-3);
        for bad in [
            AttnMask {
                causal_offset: None,
                ..windowed
            },
            AttnMask {
                window: Some(0),
                ..windowed
            },
        ] {
            assert!(attention_reference(&q, &k, &v, &bad, 0.3).is_err());
        }
    }

    #[test]
    fn gqa_equals_repeated_heads() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 4, 3, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 2, 3, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 2, 3, 8), &dev).unwrap();
        let m = AttnMask {
            causal_offset: Some(0),
            key_valid: None,
            segments: None,
            window: None,
            softcap: None,
        };
        let a = attention_reference(&q, &k, &v, &m, 0.3).unwrap();
        let k2 = repeat_kv(&k, 2).unwrap();
        let v2 = repeat_kv(&v, 2).unwrap();
        let b = attention_reference(&q, &k2, &v2, &m, 0.3).unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        // Head 1 of q uses kv head 0, head 2 uses kv head 1.
        let q1 = q.narrow(1, 2, 1).unwrap();
        let single = attention_reference(
            &q1,
            &k.narrow(1, 1, 1).unwrap(),
            &v.narrow(1, 1, 1).unwrap(),
            &m,
            0.3,
        )
        .unwrap();
        let full = attention_reference(&q, &k, &v, &m, 0.3).unwrap();
        let d = (single - full.narrow(1, 2, 1).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
