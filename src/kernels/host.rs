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
