//! Embedding lookup (token and learned position embeddings) and its gradient.
//!
//! Contract: `table [V, H]` (the f32 master, or a compute copy in bf16 or f16: a tied
//! embedding is read through the LM head's copy), `ids [...]` (u32) give `[..., H]` in the
//! compute dtype; the gradient of the table is, for each row, the sum of the output
//! gradient's rows at the positions that read it, in ascending position order, in f32, added
//! to the table's gradient so far when the tape hands one over (a tied LM head's).
//!
//! The reference is `index_select` and a cast of the rows, whose backward on a GPU is
//! candle's one-block `index_add` (2 ms per call at GPT-2 B4 T1024). [`fused`] does the
//! lookup and cast in one launch, and its backward gives each used row one block that
//! sums that row's positions in a fixed order (grouped on the host): parallel and
//! deterministic. Its CPU implementation is the same maths, tested against the reference.
//!
//! Gemma scales its embedding rows by `sqrt(hidden)`; [`scaled`] folds the scale into the
//! fused lookup (each row times it in f32, rounded once) and its backward (each row's summed
//! gradient times it), where the reference multiplies the rows by candle's `affine`.
//!
//! On the tape (`crate::tape`) the forward queues a copy of the ids to page-locked host memory
//! and the backward groups them, the copy long finished: neither pass waits for the device to
//! drain. In candle's graph the backward reads them, waiting for the device to reach it.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Tensor, WithDType, D,
};

use super::host::slice;
use super::host_ids::HostIds;
use super::registry::{warn_fallback, KernelChoice};
use super::spans::{self, Pass};
use super::KernelOp;
use crate::tape;

type Result<T> = candle_core::Result<T>;

/// Whether [`embedding`] runs the fused op for a table on `dev`: then the table may be in any
/// float dtype, and its gradient still sums in f32 (the reference's sums in the table's).
pub fn fused_serves(dev: &Device, choice: KernelChoice) -> bool {
    choice == KernelChoice::Custom && dev.is_cuda()
}

pub fn embedding(
    table: &Tensor,
    ids: &Tensor,
    dtype: DType,
    choice: KernelChoice,
) -> Result<Tensor> {
    if fused_serves(table.device(), choice) {
        if floating(table.dtype()) && floating(dtype) {
            return fused(table, ids, dtype);
        }
        warn_fallback(
            "embedding",
            &format!("no kernel for a {:?} table to {dtype:?}", table.dtype()),
        );
    }
    reference_recorded(table, ids, dtype)
}

/// [`embedding`] times `scale` (Gemma's embedding scale, already rounded as the model rounds
/// it): one op where the fused lookup serves, else the reference's rows then candle's
/// `affine`.
pub fn scaled(
    table: &Tensor,
    ids: &Tensor,
    dtype: DType,
    scale: f32,
    choice: KernelChoice,
) -> Result<Tensor> {
    if fused_serves(table.device(), choice) && floating(table.dtype()) && floating(dtype) {
        return fused_scaled(table, ids, dtype, scale);
    }
    times(&embedding(table, ids, dtype, choice)?, scale)
}

/// Rows already looked up, times `scale`: candle's `affine`, on a tape as an island.
pub fn times(x: &Tensor, scale: f32) -> Result<Tensor> {
    tape::island(&[x], |a| a[0].affine(scale as f64, 0.0))
}

fn floating(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
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

/// [`reference`] as one op of a tape, its backward candle's for `index_select` (an
/// `index_add` of the rows into the gradient so far, or into zeros).
fn reference_recorded(table: &Tensor, ids: &Tensor, dtype: DType) -> Result<Tensor> {
    if !tape::recording() {
        return reference(table, ids, dtype);
    }
    let y = reference(&table.detach(), ids, dtype)?;
    let flat = ids.flatten_all()?;
    let (vocab, h) = table.dims2()?;
    let tdt = table.dtype();
    tape::record_into(&[table], &y, 0, move |g, want, acc| {
        if !want[0] {
            return Ok(vec![acc]);
        }
        let g = g.to_dtype(tdt)?.reshape((flat.elem_count(), h))?;
        let base = match acc {
            Some(a) => a.to_dtype(tdt)?,
            None => Tensor::zeros((vocab, h), tdt, g.device())?,
        };
        Ok(vec![Some(base.index_add(&flat, &g, 0)?)])
    })?;
    Ok(y)
}

/// The fused op on any device, differentiable in the table (on a tape, or in candle's graph).
pub fn fused(table: &Tensor, ids: &Tensor, dtype: DType) -> Result<Tensor> {
    fused_scaled(table, ids, dtype, 1.0)
}

/// [`fused`] with each row times `scale`, and so its gradient.
pub fn fused_scaled(table: &Tensor, ids: &Tensor, dtype: DType, scale: f32) -> Result<Tensor> {
    spans::timed(KernelOp::Embedding, Pass::Forward, table.device(), || {
        if table.rank() != 2 || !floating(table.dtype()) {
            candle_core::bail!(
                "embedding: the table must be a float [V, H], got {:?} {:?}",
                table.dtype(),
                table.dims()
            );
        }
        let (vocab, h) = table.dims2()?;
        let mut shape = ids.dims().to_vec();
        shape.push(h);
        // The op returns `[..., H]` itself: a reshape after it would be one more autograd node
        // of the activation's size.
        let op = Embedding {
            ids: ids.flatten_all()?.to_dtype(DType::U32)?.contiguous()?,
            dtype,
            shape: Shape::from(shape),
            scale,
        };
        let arg = tape::arg(table).contiguous()?;
        if !tape::recording() {
            return arg.apply_op1(op);
        }
        let y = arg.apply_op1_no_bwd(&op)?;
        if !tape::wanted(&[table])[0] {
            tape::record(&[table], &y, |_, _| Ok(vec![None]))?;
            return Ok(y);
        }
        let host = HostIds::start(&op.ids)?;
        tape::record_into(&[table], &y, 0, move |g, _, acc| {
            spans::timed(KernelOp::Embedding, Pass::Backward, g.device(), || {
                let dt = table_grad(&g, &host.get()?, (vocab, scale), acc.as_ref())?;
                Ok(vec![Some(dt)])
            })
        })?;
        Ok(y)
    })
}

struct Embedding {
    ids: Tensor,
    dtype: DType,
    /// The output's shape, `[..., H]` for ids `[...]`.
    shape: Shape,
    /// Each row's factor (1: none).
    scale: f32,
}

/// `tok[ids] + pos[positions]`, `[..., H]` in `dtype`: GPT-2's input, the token embedding
/// plus the learned position embedding. Where the fused kernel serves and both tables share a
/// float dtype, one op ([`fused2`]: one pass, the two rows summed in f32 and rounded once);
/// otherwise two lookups and an add.
pub fn token_and_position(
    tok: &Tensor,
    ids: &Tensor,
    pos: &Tensor,
    positions: &Tensor,
    dtype: DType,
    choice: KernelChoice,
) -> Result<Tensor> {
    let one = tok.dtype() == pos.dtype() && floating(tok.dtype()) && floating(dtype);
    if fused_serves(tok.device(), choice) && one {
        return fused2(tok, ids, pos, positions, dtype);
    }
    tape::add(
        &embedding(tok, ids, dtype, choice)?,
        &embedding(pos, positions, dtype, choice)?,
    )
}

/// [`token_and_position`]'s fused op on any device, differentiable in both tables: each
/// table's gradient is [`fused`]'s for its own ids, the token table's added to its gradient
/// so far on a tape (a tied LM head's).
pub fn fused2(
    tok: &Tensor,
    ids: &Tensor,
    pos: &Tensor,
    positions: &Tensor,
    dtype: DType,
) -> Result<Tensor> {
    spans::timed(KernelOp::Embedding, Pass::Forward, tok.device(), || {
        let ((vocab, h), (vocab2, h2)) = (tok.dims2()?, pos.dims2()?);
        let fits = h == h2 && ids.dims() == positions.dims() && tok.dtype() == pos.dtype();
        if !fits || !floating(tok.dtype()) {
            candle_core::bail!(
                "embedding: token table {:?} {:?}, position table {:?} {:?}, ids {:?}, \
                 positions {:?}: two float tables of one dtype and width, ids and positions of \
                 one shape",
                tok.dtype(),
                tok.dims(),
                pos.dtype(),
                pos.dims(),
                ids.dims(),
                positions.dims()
            );
        }
        let mut shape = ids.dims().to_vec();
        shape.push(h);
        let flat = |t: &Tensor| t.flatten_all()?.to_dtype(DType::U32)?.contiguous();
        let op = Embedding2 {
            ids: flat(ids)?,
            positions: flat(positions)?,
            dtype,
            shape: Shape::from(shape),
        };
        let (ta, pa) = (tape::arg(tok).contiguous()?, tape::arg(pos).contiguous()?);
        if !tape::recording() {
            return ta.apply_op2(&pa, op);
        }
        let y = ta.apply_op2_no_bwd(&pa, &op)?;
        let want = tape::wanted(&[tok, pos]);
        let start = |on: bool, t: &Tensor| on.then(|| HostIds::start(t)).transpose();
        let ht = start(want[0], &op.ids)?;
        let hp = start(want[1], &op.positions)?;
        tape::record_into(&[tok, pos], &y, 0, move |g, _, acc| {
            spans::timed(KernelOp::Embedding, Pass::Backward, g.device(), || {
                let grad = |host: HostIds, rows: usize, acc: Option<&Tensor>| {
                    table_grad(&g, &host.get()?, (rows, 1.0), acc)
                };
                let dt = match ht {
                    Some(host) => Some(grad(host, vocab, acc.as_ref())?),
                    None => acc,
                };
                let dp = match hp {
                    Some(host) => Some(grad(host, vocab2, None)?),
                    None => None,
                };
                Ok(vec![dt, dp])
            })
        })?;
        Ok(y)
    })
}

/// `(tok, pos) -> tok[ids] + pos[positions]`.
struct Embedding2 {
    ids: Tensor,
    positions: Tensor,
    dtype: DType,
    /// The output's shape, `[..., H]` for ids `[...]`.
    shape: Shape,
}

impl CustomOp2 for Embedding2 {
    fn name(&self) -> &'static str {
        "temper-embedding2"
    }

    fn cpu_fwd(
        &self,
        st: &CpuStorage,
        lt: &Layout,
        sp: &CpuStorage,
        lp: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let mut f = rows_f32(st, lt, &self.ids)?;
        let p = rows_f32(sp, lp, &self.positions)?;
        f.iter_mut().zip(p).for_each(|(o, r)| *o += r);
        Ok((rounded(f, self.dtype)?, self.shape.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        st: &candle_core::CudaStorage,
        lt: &Layout,
        sp: &candle_core::CudaStorage,
        lp: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::embedding::{forward, Extra};
        let pos = Extra::Positions(((sp, lp), &self.positions));
        let (out, _rows) = forward((st, lt), &self.ids, pos, self.dtype)?;
        Ok((out, self.shape.clone()))
    }

    /// In candle's graph each gradient is in its table's dtype (see [`Embedding`]'s).
    fn bwd(
        &self,
        tok: &Tensor,
        pos: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        spans::timed(KernelOp::Embedding, Pass::Backward, tok.device(), || {
            let grad_of = |table: &Tensor, ids: &Tensor| -> Result<Tensor> {
                let rows = table.dim(0)?;
                table_grad(grad, &ids.to_vec1::<u32>()?, (rows, 1.0), None)?.to_dtype(table.dtype())
            };
            let (dt, dp) = (grad_of(tok, &self.ids)?, grad_of(pos, &self.positions)?);
            Ok((Some(dt), Some(dp)))
        })
    }
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

/// [`group_by_row`] on the device that runs the backward, the rows outside the table left
/// out (their positions got NaN rows and give no gradient).
pub(crate) struct Grouping {
    /// `(rows used, offsets, order)` as u32 tensors; `None` when no row inside the table is.
    pub(crate) rows: Option<(Tensor, Tensor, Tensor)>,
}

impl Grouping {
    fn new(ids: &[u32], vocab: usize, dev: &Device) -> Result<Self> {
        let (uniq, offsets, order) = group_by_row(ids);
        let keep = uniq.iter().take_while(|&&u| (u as usize) < vocab).count();
        let rows = match keep {
            0 => None,
            _ => Some((
                Tensor::new(&uniq[..keep], dev)?,
                Tensor::new(&offsets[..=keep], dev)?,
                Tensor::new(order.as_slice(), dev)?,
            )),
        };
        Ok(Self { rows })
    }
}

/// f32 rows rounded once to the output's `dtype`.
fn rounded(rows: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(rows),
        DType::BF16 => CpuStorage::BF16(rows.into_iter().map(half::bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(rows.into_iter().map(half::f16::from_f32).collect()),
        dt => candle_core::bail!("embedding: unsupported dtype {dt:?}"),
    })
}

/// The rows of the `[V, H]` CPU table `s` at `ids`, widened to f32 (NaN for an id outside it).
fn rows_f32(s: &CpuStorage, l: &Layout, ids: &Tensor) -> Result<Vec<f32>> {
    let (_, h) = l.shape().dims2()?;
    let ids = ids.to_vec1::<u32>()?;
    Ok(match s.dtype() {
        DType::F32 => cpu_rows(slice::<f32>(s, l)?, &ids, h),
        DType::BF16 => cpu_rows(slice::<half::bf16>(s, l)?, &ids, h),
        DType::F16 => cpu_rows(slice::<half::f16>(s, l)?, &ids, h),
        dt => candle_core::bail!("embedding: unsupported table dtype {dt:?}"),
    })
}

fn cpu_rows<TT: WithDType>(table: &[TT], ids: &[u32], h: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(ids.len() * h);
    for &id in ids {
        match table.get(id as usize * h..(id as usize + 1) * h) {
            Some(row) => out.extend(row.iter().map(|&v| v.to_f64() as f32)),
            None => out.extend(std::iter::repeat_n(f32::NAN, h)),
        }
    }
    out
}

/// The table's f32 gradient on the CPU: `init` (zeros where none), each used row's sum of
/// its positions' `dy` rows, times `scale`, added to it.
fn cpu_grad<T: WithDType>(
    dy: &[T],
    grouping: &Grouping,
    (h, scale): (usize, f32),
    mut d: Vec<f32>,
) -> Result<Vec<f32>> {
    let Some((uniq, offsets, order)) = &grouping.rows else {
        return Ok(d);
    };
    let (uniq, offsets, order) = (
        uniq.to_vec1::<u32>()?,
        offsets.to_vec1::<u32>()?,
        order.to_vec1::<u32>()?,
    );
    for (u, &id) in uniq.iter().enumerate() {
        let row = &mut d[id as usize * h..(id as usize + 1) * h];
        for (c, r) in row.iter_mut().enumerate() {
            let mut acc = 0f32;
            for &p in &order[offsets[u] as usize..offsets[u + 1] as usize] {
                acc += dy[p as usize * h + c].to_f64() as f32;
            }
            // The sum first, then the add, as the kernel does.
            *r += acc * scale;
        }
    }
    Ok(d)
}

impl CustomOp1 for Embedding {
    fn name(&self) -> &'static str {
        "temper-embedding"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut rows = rows_f32(s, l, &self.ids)?;
        rows.iter_mut().for_each(|x| *x *= self.scale);
        Ok((rounded(rows, self.dtype)?, self.shape.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::embedding::{forward, Extra};
        let scale = Extra::Scale(self.scale);
        let (out, _rows) = forward((s, l), &self.ids, scale, self.dtype)?;
        Ok((out, self.shape.clone()))
    }

    /// In candle's graph the gradient is in the table's dtype: candle adds it to whatever else
    /// reaches the table (a tied head's gradient, in the compute dtype) as it is.
    fn bwd(&self, table: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        spans::timed(KernelOp::Embedding, Pass::Backward, table.device(), || {
            // The grouping needs the ids on the host: read here, in the backward, so that a
            // forward alone (generation) never waits for the device.
            let ids = self.ids.to_vec1::<u32>()?;
            let g = table_grad(grad, &ids, (table.dim(0)?, self.scale), None)?;
            g.to_dtype(table.dtype()).map(Some)
        })
    }
}

/// The fused op's backward for a given `dy` `[..., H]` of the rows `ids` `[...]` read: the
/// f32 gradient of a `[vocab, H]` table. What candle's autograd calls for [`fused`], here
/// without a graph; it copies the ids to the host (a wait for the device), as candle's graph's
/// backward of the op does. The tape's has them by then: [`backward_from_host`].
pub fn backward(dy: &Tensor, ids: &Tensor, vocab: usize) -> Result<Tensor> {
    backward_onto(dy, ids, vocab, None)
}

/// [`backward`] from ids already on the host, as a training step's tape has them by its
/// backward (their copy starts at the forward, `HostIds`): the grouping by row, its upload and
/// the kernel, without [`backward`]'s wait for the device and copy of the ids.
pub fn backward_from_host(dy: &Tensor, ids: &[u32], vocab: usize) -> Result<Tensor> {
    table_grad(dy, ids, (vocab, 1.0), None)
}

/// [`backward`] added to `init` (`[vocab, H]`, any float dtype: the gradient so far of a tied
/// table) in one pass: what the tape runs for a tied embedding read without a scale.
pub fn backward_onto(
    dy: &Tensor,
    ids: &Tensor,
    vocab: usize,
    init: Option<&Tensor>,
) -> Result<Tensor> {
    let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    table_grad(dy, &ids, (vocab, 1.0), init)
}

/// `dy [..., H]` of the positions that read the rows `ids` -> the `[vocab, H]` table's f32
/// gradient, `init` (the gradient so far) added where one is given. Every backward of the
/// lookup comes here: the positions grouped by row, then one launch.
fn table_grad(
    dy: &Tensor,
    ids: &[u32],
    (vocab, scale): (usize, f32),
    init: Option<&Tensor>,
) -> Result<Tensor> {
    let h = dy.dim(D::Minus1)?;
    let dy = dy.reshape((ids.len(), h))?;
    if let Some(i) = init {
        if i.dims() != [vocab, h] {
            candle_core::bail!(
                "embedding backward: a gradient so far of {:?} for a [{vocab}, {h}] table",
                i.dims()
            );
        }
    }
    #[cfg(test)]
    if init.is_some() {
        tests::ONTO.with(|c| c.set(c.get() + 1));
    }
    let grouping = Grouping::new(ids, vocab, dy.device())?;
    let op = EmbeddingBwd {
        grouping: &grouping,
        vocab,
        scale,
    };
    match init {
        None => dy.contiguous()?.apply_op1_no_bwd(&op),
        Some(i) => dy.contiguous()?.apply_op2_no_bwd(&i.contiguous()?, &op),
    }
}

/// Backward of [`Embedding`]: `dy [n, H] -> dtable [V, H]` f32, from zeros (one input) or from
/// the gradient so far (the second input, widened to f32).
struct EmbeddingBwd<'a> {
    grouping: &'a Grouping,
    vocab: usize,
    /// The forward's scale, which each row's sum takes.
    scale: f32,
}

impl EmbeddingBwd<'_> {
    fn cpu(&self, s: &CpuStorage, l: &Layout, init: Vec<f32>) -> Result<(CpuStorage, Shape)> {
        let (_, h) = l.shape().dims2()?;
        let (g, hs) = (self.grouping, (h, self.scale));
        let d = match s.dtype() {
            DType::F32 => cpu_grad(slice::<f32>(s, l)?, g, hs, init)?,
            DType::BF16 => cpu_grad(slice::<half::bf16>(s, l)?, g, hs, init)?,
            DType::F16 => cpu_grad(slice::<half::f16>(s, l)?, g, hs, init)?,
            dt => candle_core::bail!("embedding backward: unsupported dtype {dt:?}"),
        };
        Ok((CpuStorage::F32(d), Shape::from((self.vocab, h))))
    }
}

impl CustomOp1 for EmbeddingBwd<'_> {
    fn name(&self) -> &'static str {
        "temper-embedding-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, h) = l.shape().dims2()?;
        self.cpu(s, l, vec![0f32; self.vocab * h])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let rows = (self.vocab, self.scale);
        super::cuda::embedding::backward((s, l), self.grouping, rows, None)
    }
}

impl CustomOp2 for EmbeddingBwd<'_> {
    fn name(&self) -> &'static str {
        "temper-embedding-bwd-onto"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        si: &CpuStorage,
        li: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let init: Vec<f32> = match si.dtype() {
            DType::F32 => slice::<f32>(si, li)?.to_vec(),
            DType::BF16 => slice::<half::bf16>(si, li)?
                .iter()
                .map(|v| v.to_f32())
                .collect(),
            DType::F16 => slice::<half::f16>(si, li)?
                .iter()
                .map(|v| v.to_f32())
                .collect(),
            dt => candle_core::bail!("embedding backward: a gradient so far in {dt:?}"),
        };
        self.cpu(s, l, init)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        si: &candle_core::CudaStorage,
        li: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let rows = (self.vocab, self.scale);
        super::cuda::embedding::backward((s, l), self.grouping, rows, Some((si, li)))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var};

    thread_local! {
        /// Backwards on this thread that started from a gradient so far.
        pub(crate) static ONTO: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// The backward onto a gradient so far (f32, or a tied head's in bf16, widened) is that
    /// gradient plus the backward from zeros, bit for bit: the sum of each row's positions
    /// first, then one add, as two separate gradients would be added.
    #[test]
    fn the_backward_onto_a_gradient_so_far_adds_to_it() {
        let dev = Device::Cpu;
        let (v, h) = (9, 5);
        let ids = Tensor::new(&[[2u32, 8, 2], [0, 2, 11]], &dev).unwrap();
        let dy: Vec<f32> = (0..6 * h)
            .map(|i| ((i * 5 % 9) as f32 - 4.0) * 0.37)
            .collect();
        let dy = Tensor::from_vec(dy, (2, 3, h), &dev).unwrap();
        let init: Vec<f32> = (0..v * h)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.11)
            .collect();
        let init = Tensor::from_vec(init, (v, h), &dev).unwrap();
        let from_zero = backward(&dy, &ids, v).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let init = init.to_dtype(dtype).unwrap();
            let onto = backward_onto(&dy, &ids, v, Some(&init)).unwrap();
            assert_eq!(onto.dtype(), DType::F32);
            let want = (init.to_dtype(DType::F32).unwrap() + &from_zero).unwrap();
            assert_eq!(
                onto.to_vec2::<f32>().unwrap(),
                want.to_vec2::<f32>().unwrap(),
                "{dtype:?}"
            );
        }
        let wrong = Tensor::zeros((v + 1, h), DType::F32, &dev).unwrap();
        assert!(backward_onto(&dy, &ids, v, Some(&wrong)).is_err());
    }

    /// The token-and-position op equals two reference lookups and an add, rows and both
    /// tables' gradients (repeated ids and positions, an odd width), in f32 and bf16; in bf16
    /// its rows are the f32 sum rounded once, within one rounding of the reference's.
    #[test]
    fn token_and_position_matches_two_lookups_and_an_add() {
        let dev = Device::Cpu;
        let (v, t, h) = (13, 4, 7);
        let data = |n: usize, k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * k % 29) as f32 - 14.0) * 0.071)
                .collect()
        };
        let tok = Var::from_vec(data(v * h, 37), (v, h), &dev).unwrap();
        let pos = Var::from_vec(data(t * h, 11), (t, h), &dev).unwrap();
        let ids = Tensor::new(&[[3u32, 12, 3, 0], [5, 3, 12, 12]], &dev).unwrap();
        let positions = Tensor::new(&[[0u32, 1, 2, 3], [0, 1, 2, 3]], &dev).unwrap();
        let w: Vec<f32> = (0..8 * h).map(|i| (i % 7) as f32 - 3.0).collect();
        for dtype in [DType::F32, DType::BF16] {
            let w = Tensor::from_vec(w.clone(), (2, 4, h), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let run = |one: bool| {
                let y = match one {
                    true => fused2(tok.as_tensor(), &ids, pos.as_tensor(), &positions, dtype),
                    false => reference(tok.as_tensor(), &ids, dtype)
                        .and_then(|a| a + reference(pos.as_tensor(), &positions, dtype)?),
                }
                .unwrap();
                let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let f = |t: &Tensor| {
                    t.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                };
                (
                    f(&y),
                    f(g.get(tok.as_tensor()).unwrap()),
                    f(g.get(pos.as_tensor()).unwrap()),
                )
            };
            let (one, two) = (run(true), run(false));
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
            for (what, a, b) in [
                ("rows", &one.0, &two.0),
                ("dtok", &one.1, &two.1),
                ("dpos", &one.2, &two.2),
            ] {
                assert_eq!(a.len(), b.len());
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() <= tol * y.abs().max(1.0),
                        "{dtype:?} {what}: {x} vs {y}"
                    );
                }
            }
        }
    }

    /// A bf16 table (a tied embedding's compute copy) gives the rows the f32 master would,
    /// rounded: the copy is the master rounded, and rounding twice changes nothing.
    #[test]
    fn a_compute_copy_table_gives_the_masters_rows() {
        let dev = Device::Cpu;
        let data: Vec<f32> = (0..7 * 6)
            .map(|i| ((i * 29 % 17) as f32 - 8.0) * 0.0123)
            .collect();
        let master = Tensor::from_vec(data, (7, 6), &dev).unwrap();
        let copy = master.to_dtype(DType::BF16).unwrap();
        let ids = Tensor::new(&[6u32, 0, 3, 3], &dev).unwrap();
        let a = fused(&master, &ids, DType::BF16).unwrap();
        let b = fused(&copy, &ids, DType::BF16).unwrap();
        let host = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(host(&a), host(&b));
    }

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
            // Scaled (Gemma's lookup): the rows and the gradient times the scale, in candle's
            // graph and on a tape.
            let s = 6.0f32;
            let (ys, gs) = run(&|t, i, d| fused_scaled(t, i, d, s));
            // The f32 row times the scale, rounded once (the reference's rows would round
            // twice in bf16: the row, then the product).
            let scaled_ref = |t: &Tensor, i: &Tensor, d: DType| {
                reference(t, i, DType::F32)?.affine(6.0, 0.0)?.to_dtype(d)
            };
            let (ysr, gsr) = run(&scaled_ref);
            assert_eq!(f(&ys), f(&ysr), "{dtype:?} scaled rows");
            for (a, b) in f(&gs).iter().zip(f(&gsr)) {
                assert!(
                    (a - b).abs() <= 6.0 * tol * b.abs().max(1.0),
                    "{dtype:?} {a} vs {b}"
                );
            }
            let taped = crate::tape::segment(&ids, |ids| {
                let y = fused_scaled(table.as_tensor(), ids, dtype, s)?;
                Ok(crate::tape::island(&[&y], |a| (&a[0] * &w)?.sum_all())?)
            })
            .unwrap();
            let g_tape = crate::tape::backward(&taped).unwrap();
            assert_eq!(
                f(g_tape.get(table.as_tensor()).unwrap()),
                f(&gs),
                "{dtype:?} tape"
            );
        }
    }
}
