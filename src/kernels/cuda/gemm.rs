//! cuBLASLt GEMMs for `src/kernels/gemm.rs`: one handle and workspace per CUDA stream, the
//! algorithm chosen by cuBLASLt's heuristic once per problem and kept (`lt_plans`).
//!
//! Row-major `C [M, N] = op(A) op(B)` is column-major `C^T = op(B)^T op(A)^T`, so each form
//! hands cuBLASLt its operands swapped (B first) with `m = N`, `n = M`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::CudaDType;
use candle_core::{
    CudaStorage, CustomOp2, CustomOp3, DType, InplaceOp3, Layout, Shape, Tensor, WithDType,
};

use super::super::bias::BiasAct;
use super::super::spans::{self, Pass};
use super::super::KernelOp;
use super::lt_plans::{Epilogue, Lt, Problem};
use super::{alloc_out, contiguous_view, cuda_storage, DevPtrs};

type Result<T> = candle_core::Result<T>;

/// Which operands are transposed, in row-major terms (`a [M, K]` or `[K, M]`, `b [N, K]` or
/// `[K, N]`, `C [M, N]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    /// `a [M, K] · b[N, K]^T`: the forward `x W^T`.
    Nt,
    /// `a [M, K] · b [K, N]`: `dx = dy W`.
    Nn,
    /// `a[K, M]^T · b [K, N]`: `dW = dy^T x`.
    Tn,
}

impl Form {
    /// `(M, N, K)` from the operands' `(rows, cols)`.
    fn mnk(
        self,
        (ar, ac): (usize, usize),
        (br, bc): (usize, usize),
    ) -> Result<(usize, usize, usize)> {
        let (m, k, n, kb) = match self {
            Form::Nt => (ar, ac, br, bc),
            Form::Nn => (ar, ac, bc, br),
            Form::Tn => (ac, ar, bc, br),
        };
        if k != kb {
            candle_core::bail!("gemm {self:?}: inner sizes {k} and {kb} differ");
        }
        Ok((m, n, k))
    }

    /// cuBLASLt's view: A is our `b`, B our `a`.
    fn problem(self, dtype: DType, m: usize, n: usize, k: usize, epilogue: Epilogue) -> Problem {
        let (transa, lda) = match self {
            Form::Nt => (true, k),
            Form::Nn | Form::Tn => (false, n),
        };
        let (transb, ldb) = match self {
            Form::Nt | Form::Nn => (false, k),
            Form::Tn => (true, m),
        };
        Problem {
            dtype,
            transa,
            transb,
            m: n as u64,
            n: m as u64,
            k: k as u64,
            lda: lda as i64,
            ldb: ldb as i64,
            ldc: n as i64,
            epilogue,
        }
    }
}

/// cuBLASLt's heuristic assumes 256-byte aligned operands unless told otherwise; fresh
/// allocations are, views at an offset may not be.
const ALIGN: u64 = 256;

/// Whether `t` (bf16 or f16, contiguous) starts on a 256-byte boundary.
pub fn aligned(t: &Tensor) -> Result<bool> {
    let (s, l) = t.storage_and_layout();
    let s = cuda_storage(&s)?;
    let stream = s.device().cuda_stream();
    let ptr = match t.dtype() {
        DType::BF16 => contiguous_view::<half::bf16>(s, l)?.device_ptr(&stream).0,
        DType::F16 => contiguous_view::<half::f16>(s, l)?.device_ptr(&stream).0,
        _ => return Ok(false),
    };
    Ok(ptr % ALIGN == 0)
}

/// `t` contiguous and 256-byte aligned, as it is handed to cuBLASLt: itself, or a copy into
/// fresh storage (`force_contiguous`: `copy` would keep the view's offset), differentiable.
pub fn prepared(t: &Tensor) -> Result<Tensor> {
    let t = t.contiguous()?;
    if aligned(&t)? {
        Ok(t)
    } else {
        t.force_contiguous()
    }
}

/// Whether cuBLASLt serves `a` and `b`, whose last dimensions the GEMM contracts or writes as
/// rows (`k`, `n`; `inner` pairs the two sizes that must agree): both bf16 or both f16, the
/// inner sizes equal, and every row a non-empty multiple of 16 bytes.
fn takes(a: &Tensor, b: &Tensor, inner: (usize, usize), kn: (usize, usize)) -> bool {
    b.dtype() == a.dtype() && fits(a.dtype(), inner, kn)
}

/// [`takes`] for operands both in `dtype`.
fn fits(dtype: DType, inner: (usize, usize), (k, n): (usize, usize)) -> bool {
    let half = matches!(dtype, DType::BF16 | DType::F16);
    let rows_fit = k > 0 && n > 0 && k % 8 == 0 && n % 8 == 0;
    half && inner.0 == inner.1 && rows_fit
}

/// `N` where cuBLASLt takes the forward form `x W^T` (`x [..., K]` of at least two dimensions,
/// `W [N, K]`, see [`takes`]); `None` where it does not. The one eligibility check of every op
/// built on that form (the plain GEMM, the bias epilogue, the loss head).
pub(crate) fn takes_nt(x: &Tensor, w: &Tensor) -> Option<usize> {
    let (Some(&k), Ok((n, kw))) = (x.dims().last(), w.dims2()) else {
        return None;
    };
    (x.rank() >= 2 && takes(x, w, (k, kw), (k, n))).then_some(n)
}

/// The rows (a multiple of 8) that a weight of `n` rows of `k`, cast to `x`'s dtype, needs for
/// cuBLASLt to take `x W^T` where it does not take it as it is only because `n` is no multiple
/// of 8 (its output rows then a multiple of 16 bytes; GPT-2's vocabulary of 50,257); `None`
/// otherwise. Only the weight's shape is read: no cast is made to ask. The loss head, whose
/// logits live inside its own op, and generation's LM head pad by it.
pub(crate) fn pads_nt(x: &Tensor, (n, kw): (usize, usize)) -> Option<usize> {
    let &k = x.dims().last()?;
    let to = n.next_multiple_of(8);
    (x.rank() >= 2 && to != n && fits(x.dtype(), (k, kw), (k, to))).then_some(to)
}

/// `x W^T` through cuBLASLt for `x [..., K]` (any number of leading dimensions, taken as the
/// rows) and `W [N, K]`, giving `[..., N]`; `None` where it does not apply (f32, mixed dtypes,
/// rows not a multiple of 16 bytes, a scalar `x`). Taking the leading dimensions as they are
/// keeps reshapes out of the autograd graph: candle's backward costs every graph node a
/// zero-filled buffer and an add of its full size, and the LM head's output is the largest.
pub fn matmul_nt(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if takes_nt(x, w).is_none() {
        return Ok(None);
    }
    if let Some(y) = super::decode_gemm::for_generation(x, w, None, false)? {
        return Ok(Some(y));
    }
    let arg = crate::tape::arg;
    let args = [prepared(&arg(x))?, prepared(&arg(w))?];
    let y = crate::tape::op2_with([x, w], args, Gemm(Form::Nt), |_, [x, w], g, want, acc| {
        let (dx, dw) = spans::timed(KernelOp::Gemm, Pass::Backward, x.device(), || {
            grads_into(&g, x, w, [want[0], want[1]], acc)
        })?;
        Ok(vec![dx, dw])
    })?;
    // In a decode step's capture, freed after its last kernel (capture_arena).
    Ok(Some(super::capture_arena::kept(y)))
}

/// `dy W` through cuBLASLt (`dy [M, N]`, `W [N, K]`): the input gradient of [`matmul_nt`],
/// for benches that time a backward without autograd. `None` where cuBLASLt does not apply.
pub fn matmul_nn(dy: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let (Ok((_, n)), Ok((nw, k))) = (dy.dims2(), w.dims2()) else {
        return Ok(None);
    };
    if !takes(dy, w, (n, nw), (k, n)) {
        return Ok(None);
    }
    Ok(Some(
        prepared(dy)?.apply_op2_no_bwd(&prepared(w)?, &Gemm(Form::Nn))?,
    ))
}

struct Gemm(Form);

impl CustomOp2 for Gemm {
    fn name(&self) -> &'static str {
        "temper-gemm"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("the cuBLASLt GEMM runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        sa: &CudaStorage,
        la: &Layout,
        sb: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match sa.dtype() {
            DType::BF16 => run::<half::bf16>(self.0, (sa, la), (sb, lb), None),
            DType::F16 => run::<half::f16>(self.0, (sa, la), (sb, lb), None),
            dt => candle_core::bail!("gemm: no cuBLASLt path for {dt:?}"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        spans::timed(KernelOp::Gemm, Pass::Backward, x.device(), || {
            if self.0 != Form::Nt {
                candle_core::bail!("gemm: only the forward form is differentiated");
            }
            grads(grad, x, w, [x.track_op(), w.track_op()])
        })
    }
}

/// The gradients of `y = x W^T` for `dy` (`[..., N]`): `(dy W, dy^T x)`, each `None` where its
/// operand wants none (`want`: whether it tracks a gradient in candle's graph, or on the block
/// tape). A frozen operand (a LoRA base weight, handed over detached) gets none: its GEMM
/// would be a third of the layer's work, spent on nothing.
pub(crate) fn grads(
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    want: [bool; 2],
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    grads_into(dy, x, w, want, None)
}

/// [`grads`], with `dx` added into `acc` (x's gradient so far, a buffer nothing else holds)
/// where one is given: in place by the GEMM itself (beta = 1) where `acc` is a contiguous,
/// aligned matrix of dx's shape and dtype, else by an add. The returned `dx` then includes
/// `acc`.
fn grads_into(
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    [want_x, want_w]: [bool; 2],
    acc: Option<Tensor>,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let g = prepared(&dy.to_dtype(x.dtype())?)?;
    let dx = match (want_x, acc) {
        (true, Some(acc)) if accumulates(&acc, x)? => {
            acc.inplace_op3(&g, w, &GemmInto(Form::Nn))?;
            Some(acc)
        }
        (true, Some(acc)) => Some(g.apply_op2_no_bwd(w, &Gemm(Form::Nn))?.add(&acc)?),
        (true, None) => Some(g.apply_op2_no_bwd(w, &Gemm(Form::Nn))?),
        (false, acc) => acc,
    };
    let dw = match want_w {
        true => Some(g.apply_op2_no_bwd(x, &Gemm(Form::Tn))?),
        false => None,
    };
    Ok((dx, dw))
}

/// Whether the GEMM can add `dx` into `acc` in place: x's shape and dtype, contiguous from an
/// aligned start.
fn accumulates(acc: &Tensor, x: &Tensor) -> Result<bool> {
    Ok(acc.dims() == x.dims()
        && acc.dtype() == x.dtype()
        && acc.is_contiguous()
        && acc.rank() >= 2
        && aligned(acc)?)
}

/// `C += op(a) op(b)` in place, `C` the tensor the op is applied to (an existing gradient).
struct GemmInto(Form);

impl InplaceOp3 for GemmInto {
    fn name(&self) -> &'static str {
        "temper-gemm-into"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        candle_core::bail!("the cuBLASLt GEMM runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        sc: &mut CudaStorage,
        lc: &Layout,
        sa: &CudaStorage,
        la: &Layout,
        sb: &CudaStorage,
        lb: &Layout,
    ) -> Result<()> {
        match sa.dtype() {
            DType::BF16 => run_into::<half::bf16>(self.0, (sa, la), (sb, lb), (sc, lc)),
            DType::F16 => run_into::<half::f16>(self.0, (sa, la), (sb, lb), (sc, lc)),
            dt => candle_core::bail!("gemm: no cuBLASLt path for {dt:?}"),
        }
    }
}

/// `x W^T + b` through cuBLASLt, the bias added in the GEMM's epilogue as PyTorch's `addmm`
/// adds it: `x [..., K]`, `W [N, K]`, `b [N]` (its compute copy in the matrices' dtype, read
/// as it is, or the f32 master, cast inside the op). `None` where cuBLASLt does not take the GEMM. One autograd
/// node where the GEMM and the bias op were two; its backward adds the bias gradient as the
/// bias kernel's fixed-order column sum, in f32.
pub fn matmul_nt_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    match takes_nt(x, w) {
        Some(n) if b.dims() == [n] => {}
        _ => return Ok(None),
    }
    if let Some(y) = super::decode_gemm::for_generation(x, w, Some(b), false)? {
        return Ok(Some(y));
    }
    let arg = crate::tape::arg;
    let args = [prepared(&arg(x))?, prepared(&arg(w))?, arg(b).contiguous()?];
    let op = GemmBias(BiasAct::Identity);
    let y = crate::tape::op3_with([x, w, b], args, op, |_, [x, w, b], g, want, acc| {
        let want = [want[0], want[1], want[2]];
        // On the tape the bias gradient stays f32 even for a bf16 compute copy: the optimizer
        // reads either, and nothing adds to it.
        let (dx, dw, db) = bias_epilogue_grads(&g, x, w, b, want, acc, DType::F32)?;
        Ok(vec![dx, dw, db])
    })?;
    Ok(Some(super::capture_arena::kept(y)))
}

/// `gelu_tanh(x W^T + b)` through cuBLASLt, the bias and the GELU both in its epilogue
/// (PyTorch's `_addmm_activation`), for generation: the epilogue keeps no pre-activation for a
/// backward, so no input may carry a gradient (an error otherwise) and no tape may be
/// recording. The GELU reads the f32 sum, not one rounded to the dtype as the GEMM, then the
/// `bias` kernel, round it. `None` where cuBLASLt does not take the GEMM.
pub fn matmul_nt_bias_gelu(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    match takes_nt(x, w) {
        Some(n) if b.dims() == [n] => {}
        _ => return Ok(None),
    }
    if crate::tape::recording() || !crate::tape::untracked(&[x, w, b]) {
        candle_core::bail!("gemm: the GELU epilogue has no backward; its inputs want a gradient");
    }
    if let Some(y) = super::decode_gemm::for_generation(x, w, Some(b), true)? {
        return Ok(Some(y));
    }
    let op = GemmBias(BiasAct::GeluTanh);
    let y = prepared(x)?.apply_op3_no_bwd(&prepared(w)?, &b.contiguous()?, &op)?;
    Ok(Some(super::capture_arena::kept(y)))
}

/// `act(x W^T + b)`, `b` in any float dtype, added (and `act` applied) by the epilogue.
struct GemmBias(BiasAct);

impl CustomOp3 for GemmBias {
    fn name(&self) -> &'static str {
        "temper-gemm-bias"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("the cuBLASLt GEMM runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        sa: &CudaStorage,
        la: &Layout,
        sb: &CudaStorage,
        lb: &Layout,
        sbias: &CudaStorage,
        lbias: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        // A bias in the matrices' dtype (its compute copy) is read where it lies; an f32
        // master is cast, a launch of candle's per call.
        let cast;
        let whole = lbias.is_contiguous()
            && lbias.start_offset() == 0
            && storage_len(sbias)? == lbias.shape().elem_count();
        let bias = match sbias.dtype() == sa.dtype() && whole {
            true => sbias,
            false => {
                cast = sbias.to_dtype(lbias, sa.dtype())?;
                &cast
            }
        };
        let epilogue = Some((bias, self.0));
        match sa.dtype() {
            DType::BF16 => run::<half::bf16>(Form::Nt, (sa, la), (sb, lb), epilogue),
            DType::F16 => run::<half::f16>(Form::Nt, (sa, la), (sb, lb), epilogue),
            dt => candle_core::bail!("gemm: no cuBLASLt path for {dt:?}"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.0 != BiasAct::Identity {
            candle_core::bail!("gemm: the GELU epilogue has no backward");
        }
        let want = [x.track_op(), w.track_op(), b.track_op()];
        // candle's graph adds the gradient to the bias's own zero-filled one: its dtype.
        bias_epilogue_grads(grad, x, w, b, want, None, b.dtype())
    }
}

/// The gradients of `y = x W^T + b` for `dy`, each `None` where its operand wants none; `dx`
/// added into `acc` where one is given (see [`grads_into`]); the bias's in `db_dtype`.
fn bias_epilogue_grads(
    grad: &Tensor,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    [want_x, want_w, want_b]: [bool; 3],
    acc: Option<Tensor>,
    db_dtype: DType,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (dx, dw) = spans::timed(KernelOp::Gemm, Pass::Backward, x.device(), || {
        grads_into(grad, x, w, [want_x, want_w], acc)
    })?;
    let db = match want_b {
        true => Some(spans::timed(
            KernelOp::Bias,
            Pass::Backward,
            x.device(),
            || {
                // The identity's backward reads only dy; dy stands in for the pre-bias output.
                let g = grad.to_dtype(x.dtype())?;
                let (_, db) = super::super::bias::backward(&g, b, &g, BiasAct::Identity)?;
                db.to_dtype(db_dtype)
            },
        )?),
        false => None,
    };
    Ok((dx, dw, db))
}

/// Elements in a 16-bit storage (the bias epilogue reads a bias's whole storage).
fn storage_len(s: &CudaStorage) -> Result<usize> {
    Ok(match s.dtype() {
        DType::BF16 => s.as_cuda_slice::<half::bf16>()?.len(),
        DType::F16 => s.as_cuda_slice::<half::f16>()?.len(),
        _ => 0,
    })
}

/// `x W^T` on storages, for an op that runs the GEMM inside its own forward
/// (`cuda::loss_head`): `x [..., K]` and `W [N, K]`, both contiguous and 256-byte aligned
/// ([`prepared`]), bf16 or f16; `[..., N]`.
pub(crate) fn nt_storage(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    match x.0.dtype() {
        DType::BF16 => run::<half::bf16>(Form::Nt, x, w, None),
        DType::F16 => run::<half::f16>(Form::Nt, x, w, None),
        dt => candle_core::bail!("gemm: no cuBLASLt path for {dt:?}"),
    }
}

/// `C = op(a) op(b)` in `form`, plus `bias` (`[N]`, the matrices' dtype) on every row of C
/// and then its activation as cuBLASLt's epilogue when given.
fn run<T>(
    form: Form,
    (sa, la): (&CudaStorage, &Layout),
    (sb, lb): (&CudaStorage, &Layout),
    bias: Option<(&CudaStorage, BiasAct)>,
) -> Result<(CudaStorage, Shape)>
where
    T: CudaDType + WithDType + DeviceRepr + ValidAsZeroBits,
{
    let dev = sa.device();
    let (m, n, k) = form.mnk(rows_cols(la)?, rows_cols(lb)?)?;
    // `C`'s shape: `a`'s leading dimensions are its rows, except in `dy^T x`, whose rows are
    // `a`'s columns.
    let out = match form {
        Form::Nt | Form::Nn => {
            let mut d = la.shape().dims().to_vec();
            d.pop();
            d.push(n);
            Shape::from(d)
        }
        Form::Tn => Shape::from((m, n)),
    };
    let a = contiguous_view::<T>(sa, la)?;
    let b = contiguous_view::<T>(sb, lb)?;
    let epilogue = match bias {
        None => Epilogue::Plain,
        Some((_, BiasAct::Identity)) => Epilogue::Bias,
        Some((_, BiasAct::GeluTanh)) => Epilogue::BiasGelu,
    };
    let bias = match bias {
        Some((s, _)) => {
            let v = s.as_cuda_slice::<T>()?;
            if v.len() != n {
                candle_core::bail!("gemm: a bias of {} for {n} columns", v.len());
            }
            Some(v.slice(..))
        }
        None => None,
    };
    // SAFETY: beta = 0: the GEMM writes every element of C. An empty K (the backward of an
    // empty batch) leaves C unwritten, so it is zeroed.
    if k == 0 {
        if bias.is_some() {
            candle_core::bail!("gemm: a bias epilogue with an empty inner dimension");
        }
        let c = dev.alloc_zeros::<T>((m * n).max(1))?;
        return Ok((CudaStorage::wrap_cuda_slice(c, dev.clone()), out));
    }
    let mut c = unsafe { alloc_out::<T>(dev, m * n)? };
    if m > 0 && n > 0 && k > 0 {
        let lt = Lt::of(dev)?;
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let (pa, pb) = (ptrs.read(&a), ptrs.read(&b));
        let pbias = bias.as_ref().map(|v| ptrs.read(v));
        let pc = ptrs.write(&mut c);
        let problem = form.problem(T::DTYPE, m, n, k, epilogue);
        // SAFETY: a, b hold M*K and K*N elements in the layouts `problem` describes (cuBLASLt's
        // A is our b), c M*N, the bias N; all aligned (`prepared`, fresh allocations).
        unsafe { lt.matmul(&problem, 1.0, 0.0, pb, pa, pc, pbias) }?;
    }
    Ok((CudaStorage::wrap_cuda_slice(c, dev.clone()), out))
}

/// `C += op(a) op(b)` in `form` (beta = 1), `C` contiguous with the product's element count.
fn run_into<T>(
    form: Form,
    (sa, la): (&CudaStorage, &Layout),
    (sb, lb): (&CudaStorage, &Layout),
    (sc, lc): (&mut CudaStorage, &Layout),
) -> Result<()>
where
    T: CudaDType + WithDType + DeviceRepr + ValidAsZeroBits,
{
    let dev = sa.device().clone();
    let (m, n, k) = form.mnk(rows_cols(la)?, rows_cols(lb)?)?;
    let Some((start, end)) = lc.contiguous_offsets() else {
        candle_core::bail!("gemm: a strided output to add into ({lc:?})");
    };
    if end - start != m * n {
        candle_core::bail!(
            "gemm: adding a {m}x{n} product into {} elements",
            end - start
        );
    }
    if m == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    let a = contiguous_view::<T>(sa, la)?;
    let b = contiguous_view::<T>(sb, lb)?;
    let mut c = sc.as_cuda_slice_mut::<T>()?.slice_mut(start..end);
    let lt = Lt::of(&dev)?;
    let stream = dev.cuda_stream();
    let mut ptrs = DevPtrs::new(&stream);
    let (pa, pb) = (ptrs.read(&a), ptrs.read(&b));
    let pc = ptrs.write(&mut c);
    let problem = form.problem(T::DTYPE, m, n, k, Epilogue::Plain);
    // SAFETY: a, b hold M*K and K*N elements in the layouts `problem` describes, c M*N, which
    // the GEMM reads (beta = 1) and writes; all aligned (`accumulates`, `prepared`).
    unsafe { lt.matmul(&problem, 1.0, 1.0, pb, pa, pc, None) }
}

/// A contiguous operand as a matrix: its last dimension the columns, the rest the rows.
fn rows_cols(l: &Layout) -> Result<(usize, usize)> {
    match l.shape().dims().split_last() {
        Some((&cols, lead)) if !lead.is_empty() => Ok((lead.iter().product(), cols)),
        _ => candle_core::bail!("gemm: an operand of shape {:?}", l.shape()),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::{pads_nt, takes_nt};

    fn t(dims: &[usize], dtype: DType) -> Tensor {
        Tensor::zeros(dims, dtype, &Device::Cpu).unwrap()
    }

    /// GPT-2's vocabulary (50,257 rows of W) is no multiple of 8: cuBLASLt is not handed its
    /// logits' rows as they are, but the loss head takes it padded. An inner size off 8, f32
    /// or a single row stay off both.
    #[test]
    fn an_odd_vocabulary_is_taken_once_padded() {
        let x = t(&[2, 3, 64], DType::BF16);
        for n in [259, 50257] {
            let w = t(&[n, 64], DType::BF16);
            assert_eq!(takes_nt(&x, &w), None, "{n}");
            assert_eq!(pads_nt(&x, (n, 64)), Some(n.next_multiple_of(8)), "{n}");
        }
        // Taken as it is: nothing to pad.
        let w = t(&[264, 64], DType::BF16);
        assert_eq!(takes_nt(&x, &w), Some(264));
        assert_eq!(pads_nt(&x, (264, 64)), None);
        let odd_k = t(&[2, 3, 60], DType::BF16);
        assert_eq!(pads_nt(&odd_k, (259, 60)), None);
        assert_eq!(pads_nt(&x, (259, 60)), None, "inner sizes differ");
        assert_eq!(pads_nt(&t(&[2, 64], DType::F32), (259, 64)), None);
        assert_eq!(pads_nt(&t(&[64], DType::BF16), (259, 64)), None);
    }
}
