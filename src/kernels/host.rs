//! What the custom ops' CPU implementations share: an input as a slice, and the
//! `(rows, cols)` of a `[..., cols]` layout. (The ops make their inputs contiguous before
//! they are applied, so a strided one is a bug, reported rather than read wrongly.) And what
//! the two norms' fused residual add shares: the rounded sum and the paired output's shape.

use candle_core::{CpuStorage, Layout, Result, Shape, Storage, WithDType};

pub fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("a custom op's input is not contiguous ({l:?})"),
    }
}

/// The CPU storage of a tensor an op holds rather than takes as an input (a residual, a
/// gradient).
pub fn cpu_storage(s: &Storage) -> Result<&CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("a CPU op was handed a tensor held on another device"),
    }
}

/// `x + r` elementwise, each sum rounded to `T` once, as a separate add rounds it: what a norm
/// with the residual add fused into it normalises.
pub fn rounded_sum<T: WithDType>(x: &[T], r: &[T]) -> Vec<T> {
    let f = |v: &T| v.to_f64() as f32;
    x.iter()
        .zip(r)
        .map(|(a, b)| T::from_f64((f(a) + f(b)) as f64))
        .collect()
}

/// The output shape of a norm over `l`: `[2, ...]` when it also returns the sum it normalised
/// (the norm, then the sum), else `l`'s.
pub fn norm_out_shape(l: &Layout, with_sum: bool) -> Shape {
    match with_sum {
        true => Shape::from([&[2][..], l.dims()].concat()),
        false => l.shape().clone(),
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
