//! What the custom ops' CPU implementations share: an input as a slice, and the
//! `(rows, cols)` of a `[..., cols]` layout. (The ops make their inputs contiguous before
//! they are applied, so a strided one is a bug, reported rather than read wrongly.)

use candle_core::{CpuStorage, Layout, Result, WithDType};

pub fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("a custom op's input is not contiguous ({l:?})"),
    }
}

/// `(rows, cols)` of a `[..., cols]` layout: every leading dimension is a row.
pub fn rows_cols(l: &Layout) -> Result<(usize, usize)> {
    let Some((&cols, lead)) = l.dims().split_last() else {
        candle_core::bail!("a row-wise custom op needs at least one dimension");
    };
    Ok((lead.iter().product(), cols))
}

/// What the custom ops' CPU tests share: a tensor's values, and the elementwise comparison of
/// a fused op's output (or gradient) with its reference's.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{DType, Tensor};

    /// `t`'s values as f32, flattened.
    pub fn values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("a float tensor")
    }

    /// The largest absolute value in `t`.
    pub fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.max(0))
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_scalar::<f32>())
            .expect("a float tensor")
    }

    /// Every element of `ours` finite and within `tol * max(1, |reference|)` of `reference`.
    pub fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, tol: f32) {
        assert_eq!(ours.dims(), reference.dims(), "{what}: shapes");
        for (i, (x, r)) in values(ours).iter().zip(values(reference)).enumerate() {
            assert!(
                x.is_finite() && (x - r).abs() <= tol * r.abs().max(1.0),
                "{what}: element {i}: {x} vs {r}"
            );
        }
    }
}
