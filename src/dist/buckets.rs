//! Gradient buckets: consecutive tensors packed into one flat f32 buffer of about
//! [`BUCKET_ELEMS`] values, so that a step issues a few large collectives instead of one per
//! parameter (GPT-2 124M has 148 parameter tensors; small messages waste the link).

use std::ops::Range;

use anyhow::Result;
use candle_core::{DType, Tensor};

/// 25 MB of f32 per bucket, PyTorch DDP's default.
pub const BUCKET_ELEMS: usize = 25 * 1024 * 1024 / 4;

/// Consecutive index ranges of `sizes` whose sum stays at or under `cap` (a tensor larger
/// than `cap` is a bucket of its own).
pub fn plan(sizes: &[usize], cap: usize) -> Vec<Range<usize>> {
    let mut out = vec![];
    let (mut start, mut filled) = (0, 0);
    for (i, &n) in sizes.iter().enumerate() {
        if filled > 0 && filled + n > cap {
            out.push(start..i);
            start = i;
            filled = 0;
        }
        filled += n;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// Runs `collective` on each bucket of `ts` as one host f32 buffer and writes the results
/// back in each tensor's shape, dtype and device.
pub fn through_host(
    ts: &mut [Tensor],
    mut collective: impl FnMut(&mut [f32]) -> Result<()>,
) -> Result<()> {
    let sizes: Vec<usize> = ts.iter().map(Tensor::elem_count).collect();
    for range in plan(&sizes, BUCKET_ELEMS) {
        let mut buf = Vec::with_capacity(sizes[range.clone()].iter().sum());
        for t in &ts[range.clone()] {
            buf.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        collective(&mut buf)?;
        let mut at = 0;
        for t in &mut ts[range] {
            let n = t.elem_count();
            let part = Tensor::from_slice(&buf[at..at + n], t.shape(), t.device())?;
            *t = part.to_dtype(t.dtype())?;
            at += n;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_tensor_once_in_order() {
        assert_eq!(plan(&[3, 3, 3, 10, 1], 6), vec![0..2, 2..3, 3..4, 4..5]);
        assert_eq!(plan(&[], 6), Vec::<Range<usize>>::new());
        assert_eq!(plan(&[7], 6), vec![0..1]);
        assert_eq!(plan(&[1, 1, 1], 6), vec![0..3]);
    }

    #[test]
    fn host_buckets_round_trip_shapes_and_dtypes() {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::arange(0f32, 6.0, &dev)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::new(&[1.5f32, -2.0], &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let mut ts = vec![a, b];
        through_host(&mut ts, |buf| {
            buf.iter_mut().for_each(|x| *x *= 2.0);
            Ok(())
        })
        .unwrap();
        assert_eq!(ts[0].dims(), &[2, 3]);
        assert_eq!(ts[1].dtype(), DType::BF16);
        assert_eq!(
            ts[0].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        );
        let b2 = ts[1]
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(b2, [3.0, -4.0]);
    }
}
