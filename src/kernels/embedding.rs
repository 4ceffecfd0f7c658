//! Embedding lookup (token and learned position embeddings) and its gradient.
//!
//! Contract: `table [V, H]` (f32 master weights), `ids [...]` (u32) give `[..., H]` in the
//! compute dtype; the gradient of the table is, for each row, the sum of the output
//! gradient's rows at the positions that read it, in ascending position order, in f32.
//!
//! The reference is `index_select` and a cast of the rows, whose backward on a GPU is
//! candle's one-block `index_add` (2 ms per call at GPT-2 B4 T1024). [`fused`] does the
//! lookup and cast in one launch, and its backward gives each used row one block that
//! sums that row's positions in a fixed order (grouped on the host): parallel and
//! deterministic. Its CPU implementation is the same maths, tested against the reference.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, WithDType, D};

use super::host::slice;
use super::registry::{warn_fallback, KernelChoice};
use super::spans::{self, Pass};
use super::KernelOp;

type Result<T> = candle_core::Result<T>;

pub fn embedding(
    table: &Tensor,
    ids: &Tensor,
    dtype: DType,
    choice: KernelChoice,
) -> Result<Tensor> {
    // A table stored in a low precision (a frozen base) has no gradient to take, and the
    // reference's lookup needs no cast of it: nothing to gain from the kernel.
    if choice == KernelChoice::Custom && table.device().is_cuda() && table.dtype() == DType::F32 {
        if matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return fused(table, ids, dtype);
        }
        warn_fallback("embedding", &format!("no kernel for {dtype:?} output"));
    }
    reference(table, ids, dtype)
}

pub fn reference(table: &Tensor, ids: &Tensor, dtype: DType) -> Result<Tensor> {
    let h = table.dim(1)?;
    let mut shape = ids.dims().to_vec();
    shape.push(h);
    // Rows first, then the cast: only the rows read are converted, and their gradient
    // accumulates in the table's own precision.
    table
        .index_select(&ids.flatten_all()?, 0)?
        .to_dtype(dtype)?
        .reshape(shape)
}

/// The fused op on any device, differentiable in the table.
pub fn fused(table: &Tensor, ids: &Tensor, dtype: DType) -> Result<Tensor> {
    spans::timed(KernelOp::Embedding, Pass::Forward, table.device(), || {
        if table.rank() != 2 || table.dtype() != DType::F32 {
            candle_core::bail!(
                "embedding: the table must be an f32 [V, H], got {:?} {:?}",
                table.dtype(),
                table.dims()
            );
        }
        let h = table.dim(1)?;
        let mut shape = ids.dims().to_vec();
        shape.push(h);
        // The op returns `[..., H]` itself: a reshape after it would be one more autograd node
        // of the activation's size.
        let op = Embedding {
            ids: ids.flatten_all()?.to_dtype(DType::U32)?.contiguous()?,
            dtype,
            shape: Shape::from(shape),
        };
        table.contiguous()?.apply_op1(op)
    })
}

struct Embedding {
    ids: Tensor,
    dtype: DType,
    /// The output's shape, `[..., H]` for ids `[...]`.
    shape: Shape,
}

/// Positions grouped by the row they read: `(rows used, offsets into order, order)`, each
/// row's positions ascending. The backward's summation order, the same on CPU and GPU.
pub fn group_by_row(ids: &[u32]) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut order: Vec<u32> = (0..ids.len() as u32).collect();
    order.sort_by_key(|&p| (ids[p as usize], p));
    let (mut uniq, mut offsets) = (vec![], vec![]);
    for (k, &p) in order.iter().enumerate() {
        let id = ids[p as usize];
        if uniq.last() != Some(&id) {
            uniq.push(id);
            offsets.push(k as u32);
        }
    }
    offsets.push(order.len() as u32);
    (uniq, offsets, order)
}

fn cpu_rows<T: WithDType>(table: &[f32], ids: &[u32], h: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(ids.len() * h);
    for &id in ids {
        match table.get(id as usize * h..(id as usize + 1) * h) {
            Some(row) => out.extend(row.iter().map(|&v| T::from_f64(v as f64))),
            None => out.extend(std::iter::repeat_n(T::from_f64(f64::NAN), h)),
        }
    }
    out
}

fn cpu_grad<T: WithDType>(dy: &[T], ids: &[u32], vocab: usize, h: usize) -> Vec<f32> {
    let mut d = vec![0f32; vocab * h];
    let (uniq, offsets, order) = group_by_row(ids);
    for (u, &id) in uniq.iter().enumerate() {
        if id as usize >= vocab {
            continue;
        }
        let row = &mut d[id as usize * h..(id as usize + 1) * h];
        for (c, r) in row.iter_mut().enumerate() {
            let mut acc = 0f32;
            for &p in &order[offsets[u] as usize..offsets[u + 1] as usize] {
                acc += dy[p as usize * h + c].to_f64() as f32;
            }
            *r = acc;
        }
    }
    d
}

impl CustomOp1 for Embedding {
    fn name(&self) -> &'static str {
        "temper-embedding"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, h) = l.shape().dims2()?;
        let table = slice::<f32>(s, l)?;
        let ids = self.ids.to_vec1::<u32>()?;
        let out = match self.dtype {
            DType::F32 => CpuStorage::F32(cpu_rows(table, &ids, h)),
            DType::BF16 => CpuStorage::BF16(cpu_rows(table, &ids, h)),
            DType::F16 => CpuStorage::F16(cpu_rows(table, &ids, h)),
            dt => candle_core::bail!("embedding: unsupported dtype {dt:?}"),
        };
        Ok((out, self.shape.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (out, _rows) = super::cuda::embedding::forward(s, l, &self.ids, self.dtype)?;
        Ok((out, self.shape.clone()))
    }

    fn bwd(&self, table: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        spans::timed(KernelOp::Embedding, Pass::Backward, table.device(), || {
            // The grouping needs the ids on the host: read here, in the backward, so that a
            // forward alone (generation) never waits for the device.
            let ids = self.ids.to_vec1::<u32>()?;
            let (vocab, h) = table.dims2()?;
            table_grad(&grad.reshape((ids.len(), h))?, ids, vocab).map(Some)
        })
    }
}

/// The fused op's backward for a given `dy` `[..., H]` of the rows `ids` `[...]` read: the
/// f32 gradient of a `[vocab, H]` table. What candle's autograd calls for [`fused`], here
/// without a graph (benches/train_ops.rs times it so); it reads the ids on the host, as the
/// op's own backward does.
pub fn backward(dy: &Tensor, ids: &Tensor, vocab: usize) -> Result<Tensor> {
    let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let h = dy.dim(D::Minus1)?;
    table_grad(&dy.reshape((ids.len(), h))?, ids, vocab)
}

/// `dy [n, H]` of the rows `ids` (`n` of them) read -> the table's gradient.
fn table_grad(dy: &Tensor, ids: Vec<u32>, vocab: usize) -> Result<Tensor> {
    dy.contiguous()?
        .apply_op1_no_bwd(&EmbeddingBwd { ids, vocab })
}

/// Backward of [`Embedding`]: `dy [n, H] -> dtable [V, H]` f32.
struct EmbeddingBwd {
    ids: Vec<u32>,
    vocab: usize,
}

impl CustomOp1 for EmbeddingBwd {
    fn name(&self) -> &'static str {
        "temper-embedding-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, h) = l.shape().dims2()?;
        let d = match s.dtype() {
            DType::F32 => cpu_grad(slice::<f32>(s, l)?, &self.ids, self.vocab, h),
            DType::BF16 => cpu_grad(slice::<half::bf16>(s, l)?, &self.ids, self.vocab, h),
            DType::F16 => cpu_grad(slice::<half::f16>(s, l)?, &self.ids, self.vocab, h),
            dt => candle_core::bail!("embedding backward: unsupported dtype {dt:?}"),
        };
        Ok((CpuStorage::F32(d), Shape::from((self.vocab, h))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::embedding::backward(s, l, &self.ids, self.vocab)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The direct backward is the table gradient autograd gives (the same op, without a
    /// graph), with autograd seeded through `y * dy` as benches/train_ops.rs drives the
    /// reference; ids in a leading batch dimension, repeated.
    #[test]
    fn direct_backward_is_autograds_gradient() {
        let dev = Device::Cpu;
        let (v, h) = (9, 5);
        let data: Vec<f32> = (0..v * h).map(|i| (i % 11) as f32 * 0.1 - 0.5).collect();
        let table = Var::from_vec(data, (v, h), &dev).unwrap();
        let ids = Tensor::new(&[[2u32, 8, 2], [0, 2, 8]], &dev).unwrap();
        let dy: Vec<f32> = (0..6 * h)
            .map(|i| ((i * 3 % 7) as f32 - 3.0) * 0.5)
            .collect();
        let dy = Tensor::from_vec(dy, (2, 3, h), &dev).unwrap();
        let y = fused(table.as_tensor(), &ids, DType::F32).unwrap();
        let grads = (&y * &dy).unwrap().backward().unwrap();
        let auto = grads
            .get(table.as_tensor())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let direct = backward(&dy, &ids, v).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(direct, auto);
    }

    #[test]
    fn rows_are_grouped_in_position_order() {
        let (u, o, ord) = group_by_row(&[5, 2, 5, 9, 2, 5]);
        assert_eq!(u, [2, 5, 9]);
        assert_eq!(o, [0, 2, 5, 6]);
        assert_eq!(ord, [1, 4, 0, 2, 5, 3]);
    }

    /// The fused op's rows and table gradient (repeated ids, an odd width) equal the
    /// reference's under candle's autograd, in f32 and bf16.
    #[test]
    fn fused_op_matches_the_reference_and_its_gradient() {
        let dev = Device::Cpu;
        let (v, h) = (11, 7);
        let data: Vec<f32> = (0..v * h)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.13)
            .collect();
        let table = Var::from_vec(data, (v, h), &dev).unwrap();
        let ids = Tensor::new(&[[3u32, 7, 3], [10, 0, 3]], &dev).unwrap();
        let wd: Vec<f32> = (0..6 * h).map(|i| (i % 5) as f32 - 2.0).collect();
        for dtype in [DType::F32, DType::BF16] {
            let w = Tensor::from_vec(wd.clone(), (2, 3, h), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let run = |f: &dyn Fn(&Tensor, &Tensor, DType) -> Result<Tensor>| {
                let y = f(table.as_tensor(), &ids, dtype).unwrap();
                let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                (y, g.get(table.as_tensor()).unwrap().clone())
            };
            let (yf, gf) = run(&fused);
            let (yr, gr) = run(&reference);
            assert_eq!(yf.dims(), &[2, 3, h]);
            assert_eq!(yf.dtype(), dtype);
            let f = |t: &Tensor| {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            assert_eq!(f(&yf), f(&yr), "{dtype:?} rows");
            assert_eq!(gf.dtype(), DType::F32);
            // The reference accumulates repeated rows in the compute dtype, the op in f32.
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            for (a, b) in f(&gf).iter().zip(f(&gr)) {
                assert!(
                    (a - b).abs() <= tol * b.abs().max(1.0),
                    "{dtype:?} grad {a} vs {b}"
                );
            }
        }
    }
}
