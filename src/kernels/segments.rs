//! Document boundaries inside packed rows, for attention that must not cross them.
//!
//! A packed row holds several documents back to back (SFT packing): token `i` of a row may
//! attend to key `j` only when both lie in the same document. Documents are contiguous, so
//! that is `start[i] <= j` (under the causal mask `j <= i`), and, seen from the key,
//! `i < end[j]`: the forward and the dQ pass read `start` per query, the dK/dV pass reads
//! `end` per key. Both are built here from the documents' lengths, which is what makes them
//! consistent: `start` is non-decreasing along a row, `start[i] <= i < end[i]`, and for
//! `j <= i`, `start[i] <= j` exactly when `i < end[j]`. The kernels rely on all three.

use candle_core::{Device, Result, Tensor};

#[derive(Clone, Debug)]
pub struct Segments {
    /// `[B, T]` u32: the row index of the first token of each token's document.
    pub start: Tensor,
    /// `[B, T]` u32: one past the row index of the last token of each token's document.
    pub end: Tensor,
    /// `[B, T]` u32: each token's position in its document. The model reads these where the
    /// forward names no positions of its own, so that position embeddings see every
    /// document as if it were alone.
    pub positions: Tensor,
    rows: usize,
    len: usize,
}

impl Segments {
    /// Rows of `len` tokens, each holding documents of the given lengths back to back; the
    /// positions after the last document (padding) form one more document of their own.
    pub fn from_lengths(docs: &[Vec<usize>], len: usize, dev: &Device) -> Result<Self> {
        let mut start = Vec::with_capacity(docs.len() * len);
        let mut end = Vec::with_capacity(docs.len() * len);
        for row in docs {
            let used: usize = row.iter().sum();
            if used > len {
                candle_core::bail!("segments: documents of {used} tokens in a row of {len}");
            }
            let mut at = 0;
            for &n in row.iter().chain(std::iter::once(&(len - used))) {
                start.extend(std::iter::repeat_n(at as u32, n));
                end.extend(std::iter::repeat_n((at + n) as u32, n));
                at += n;
            }
        }
        let positions: Vec<u32> = start
            .iter()
            .enumerate()
            .map(|(k, &s)| (k % len) as u32 - s)
            .collect();
        let shape = (docs.len(), len);
        Ok(Self {
            start: Tensor::from_vec(start, shape, dev)?,
            end: Tensor::from_vec(end, shape, dev)?,
            positions: Tensor::from_vec(positions, shape, dev)?,
            rows: docs.len(),
            len,
        })
    }

    /// Rows of `len` ids (`ids` holds them back to back) cut after every `sep`: the
    /// documents of EOS-joined text, a row's first one possibly begun in an earlier row.
    pub fn split_after(ids: &[u32], len: usize, sep: u32, dev: &Device) -> Result<Self> {
        if len == 0 || !ids.len().is_multiple_of(len) {
            candle_core::bail!("segments: {} ids are not rows of {len}", ids.len());
        }
        let docs: Vec<Vec<usize>> = ids
            .chunks(len)
            .map(|row| {
                row.split_inclusive(|&t| t == sep)
                    .map(<[u32]>::len)
                    .collect()
            })
            .collect();
        Self::from_lengths(&docs, len, dev)
    }

    /// `(rows, tokens per row)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.len)
    }

    /// `[B, 1, T, T]` f32: 1.0 where query `i` and key `j` share a document,
    /// `start[i] <= j < end[i]`, built where `dev` is (no host copy of `B·T²`).
    pub fn same_document(&self, dev: &Device) -> Result<Tensor> {
        let (b, t) = (self.rows, self.len);
        let keys = Tensor::arange(0u32, t as u32, dev)?.reshape((1, 1, 1, t))?;
        let bound = |x: &Tensor| x.to_device(dev)?.reshape((b, 1, t, 1));
        let after_start = keys.broadcast_ge(&bound(&self.start)?)?;
        let before_end = keys.broadcast_lt(&bound(&self.end)?)?;
        (after_start * before_end)?.to_dtype(candle_core::DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_and_ends_follow_the_documents_and_padding_is_its_own() {
        let s = Segments::from_lengths(&[vec![2, 3], vec![6]], 7, &Device::Cpu).unwrap();
        let start = s.start.to_vec2::<u32>().unwrap();
        let end = s.end.to_vec2::<u32>().unwrap();
        assert_eq!(start, [[0, 0, 2, 2, 2, 5, 5], [0, 0, 0, 0, 0, 0, 6]]);
        assert_eq!(end, [[2, 2, 5, 5, 5, 7, 7], [6, 6, 6, 6, 6, 6, 7]]);
        // For j <= i, start[i] <= j exactly when i < end[j]: the kernels' two readings agree.
        for (start, end) in start.iter().zip(&end) {
            for (i, &s) in start.iter().enumerate() {
                for (j, &e) in end.iter().enumerate().take(i + 1) {
                    assert_eq!(s as usize <= j, i < e as usize);
                }
            }
        }
        let m = s.same_document(&Device::Cpu).unwrap();
        let m = m.squeeze(1).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(m[0][3], [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
        assert_eq!(m[1][6], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
        assert!(Segments::from_lengths(&[vec![4, 4]], 7, &Device::Cpu).is_err());
        let pos = s.positions.to_vec2::<u32>().unwrap();
        assert_eq!(pos, [[0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 0]]);
    }

    #[test]
    fn text_splits_after_each_separator() {
        let ids = [5, 9, 0, 7, 0, 0, 3, 4, 8, 0, 1, 2];
        let s = Segments::split_after(&ids, 6, 0, &Device::Cpu).unwrap();
        let start = s.start.to_vec2::<u32>().unwrap();
        assert_eq!(start, [[0, 0, 0, 3, 3, 5], [0, 0, 0, 0, 4, 4]]);
        assert!(Segments::split_after(&ids, 5, 0, &Device::Cpu).is_err());
    }
}
