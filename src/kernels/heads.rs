//! Attention's head layout: the `[B, T, n·d]` projections as `[B, n, T, d]` heads
//! ([`split`]), and the attention output back to `[B, T, n·d]` ([`merge`]). Both are the one
//! permutation "swap dimensions 1 and 2 of a `[B, P, Q, d]` tensor", with P and Q exchanged;
//! the backward of each is the other.
//!
//! The reference is candle's reshape, transpose and copy: three autograd nodes on the way in
//! and two on the way out, and candle's backward costs every node a zero-filled buffer and an
//! add of the tensor's full size. The custom op is one node and one copy each way
//! (`kernels/heads.cu`; on the CPU the same permutation in Rust, tested against the
//! reference). Where P or Q is 1 (a decode step's single token) the permutation moves
//! nothing, and both take a reshape (a copy only if the input is not contiguous).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, WithDType};

use super::host::slice;
use super::registry::{warn_fallback, KernelChoice};
use super::spans::{self, Pass};
use super::KernelOp;
use crate::tape;

type Result<T> = candle_core::Result<T>;

/// `[B, T, n·d]` -> `[B, n, T, d]`, contiguous.
pub fn split(y: &Tensor, n: usize, choice: KernelChoice) -> Result<Tensor> {
    let (b, t, w) = y.dims3()?;
    if n == 0 || w % n != 0 {
        candle_core::bail!("heads: width {w} is not a multiple of {n} heads");
    }
    let d = w / n;
    if t == 1 || n == 1 {
        return tape::island(&[y], |a| a[0].reshape((b, n, t, d)));
    }
    if use_fused(y, choice) {
        return fused(y, (b, t, n, d), false);
    }
    tape::island(&[y], |a| split_reference(&a[0], n))
}

/// `[B, n, T, d]` -> `[B, T, n·d]`, contiguous.
pub fn merge(y: &Tensor, choice: KernelChoice) -> Result<Tensor> {
    let (b, n, t, d) = y.dims4()?;
    if t == 1 || n == 1 {
        return tape::island(&[y], |a| a[0].contiguous()?.reshape((b, t, n * d)));
    }
    if use_fused(y, choice) {
        return fused(y, (b, n, t, d), true);
    }
    tape::island(&[y], |a| merge_reference(&a[0]))
}

fn use_fused(y: &Tensor, choice: KernelChoice) -> bool {
    if choice != KernelChoice::Custom || !y.device().is_cuda() {
        return false;
    }
    let ok = matches!(y.dtype(), DType::F32 | DType::BF16 | DType::F16);
    if !ok {
        warn_fallback("heads", &format!("no kernel for {:?}", y.dtype()));
    }
    ok
}

/// candle's composite for [`split`].
pub fn split_reference(y: &Tensor, n: usize) -> Result<Tensor> {
    let (b, t, w) = y.dims3()?;
    y.reshape((b, t, n, w / n))?.transpose(1, 2)?.contiguous()
}

/// candle's composite for [`merge`].
pub fn merge_reference(y: &Tensor) -> Result<Tensor> {
    let (b, n, t, d) = y.dims4()?;
    y.transpose(1, 2)?.reshape((b, t, n * d))
}

/// The custom op on any device: `y` holds `[b, p, q, d]` (in any shape of that many
/// elements); the result is `[b, q, p, d]`, or with `flat` `[b, q, p·d]` (the op shapes its
/// own output: a reshape after it would be another autograd node), differentiable.
pub fn fused(y: &Tensor, (b, p, q, d): (usize, usize, usize, usize), flat: bool) -> Result<Tensor> {
    spans::timed(KernelOp::Heads, Pass::Forward, y.device(), || {
        let arg = tape::arg(y).contiguous()?;
        let (dtype, shape) = (arg.dtype(), arg.shape().clone());
        // On the tape the backward keeps neither the input nor the output: it is the inverse
        // copy of the gradient.
        tape::op1_with(y, arg, Swap { b, p, q, d, flat }, move |op, g| {
            op.back(&g, dtype, &shape)
        })
    })
}

/// Dimensions 1 and 2 of a contiguous `[b, p, q, d]` exchanged.
#[derive(Clone, Copy, Debug)]
struct Swap {
    b: usize,
    p: usize,
    q: usize,
    d: usize,
    /// The output as `[b, q, p·d]`.
    flat: bool,
}

impl Swap {
    fn out_shape(&self) -> Shape {
        match self.flat {
            true => Shape::from((self.b, self.q, self.p * self.d)),
            false => Shape::from((self.b, self.q, self.p, self.d)),
        }
    }

    fn check(&self, l: &Layout) -> Result<()> {
        let n = self.b * self.p * self.q * self.d;
        if l.shape().elem_count() != n {
            candle_core::bail!("heads: {:?} is not {:?}", l.shape(), self);
        }
        Ok(())
    }
}

/// `x [b, p, q, d]` into `[b, q, p, d]`.
fn permute<T: Copy>(x: &[T], Swap { b, p, q, d, .. }: Swap) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    for bi in 0..b {
        for qi in 0..q {
            for pi in 0..p {
                let at = ((bi * p + pi) * q + qi) * d;
                out.extend_from_slice(&x[at..at + d]);
            }
        }
    }
    out
}

impl CustomOp1 for Swap {
    fn name(&self) -> &'static str {
        "temper-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.check(l)?;
        fn go<T: WithDType>(s: &CpuStorage, l: &Layout, op: Swap) -> Result<Vec<T>> {
            Ok(permute(slice::<T>(s, l)?, op))
        }
        let out = match s.dtype() {
            DType::F32 => CpuStorage::F32(go(s, l, *self)?),
            DType::BF16 => CpuStorage::BF16(go(s, l, *self)?),
            DType::F16 => CpuStorage::F16(go(s, l, *self)?),
            dt => candle_core::bail!("heads: unsupported dtype {dt:?}"),
        };
        Ok((out, self.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.check(l)?;
        let out = super::cuda::heads::swap(s, l, (self.b, self.p, self.q, self.d))?;
        Ok((out, self.out_shape()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        self.back(grad, arg.dtype(), arg.shape()).map(Some)
    }
}

impl Swap {
    /// The gradient of an input of `dtype` and `shape` for the output's gradient: the
    /// inverse swap.
    fn back(&self, grad: &Tensor, dtype: DType, shape: &Shape) -> Result<Tensor> {
        spans::timed(KernelOp::Heads, Pass::Backward, grad.device(), || {
            let back = Swap {
                p: self.q,
                q: self.p,
                ..*self
            };
            // The gradient comes back in the input's shape whatever `flat` made the output.
            let g = grad.to_dtype(dtype)?.contiguous()?;
            g.apply_op1_no_bwd(&back)?.reshape(shape)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::host::testing::values;
    use candle_core::{Device, Var};

    fn ramp(dims: &[usize], dtype: DType) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        Tensor::from_vec(v, dims, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .unwrap()
    }

    /// The op's permutation is the reference's, exactly, both ways and in every dtype, at sizes
    /// where no two dimensions agree; and the gradients are the inverse permutation.
    #[test]
    fn split_and_merge_match_the_reference_with_gradients() {
        let (b, t, n, d) = (3, 7, 5, 6);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let y = Var::from_tensor(&ramp(&[b, t, n * d], dtype)).unwrap();
            let ours = fused(y.as_tensor(), (b, t, n, d), false).unwrap();
            let refs = split_reference(y.as_tensor(), n).unwrap();
            assert_eq!(ours.dims(), [b, n, t, d]);
            assert_eq!(values(&ours), values(&refs), "{dtype:?} split");
            let back = fused(&ours, (b, n, t, d), true).unwrap();
            assert_eq!(back.dims(), [b, t, n * d]);
            assert_eq!(values(&back), values(y.as_tensor()), "{dtype:?} round trip");
            assert_eq!(
                values(&back),
                values(&merge_reference(&refs).unwrap()),
                "{dtype:?} merge"
            );
            // d(sum(out * w))/dy is w permuted back: compare with the reference's gradient.
            let w = ramp(&[b, n, t, d], dtype).affine(0.5, 1.0).unwrap();
            let grad = |out: &Tensor| {
                let g = (out * &w).unwrap().sum_all().unwrap().backward().unwrap();
                values(g.get(y.as_tensor()).unwrap())
            };
            assert_eq!(grad(&ours), grad(&refs), "{dtype:?} split gradient");
            let z = Var::from_tensor(&ramp(&[b, n, t, d], dtype)).unwrap();
            let w2 = ramp(&[b, t, n * d], dtype).affine(-0.5, 2.0).unwrap();
            let zgrad = |out: &Tensor| {
                let g = (out * &w2).unwrap().sum_all().unwrap().backward().unwrap();
                values(g.get(z.as_tensor()).unwrap())
            };
            let merged = fused(z.as_tensor(), (b, n, t, d), true).unwrap();
            let merged_ref = merge_reference(z.as_tensor()).unwrap();
            assert_eq!(values(&merged), values(&merged_ref), "{dtype:?} merge");
            assert_eq!(
                zgrad(&merged),
                zgrad(&merged_ref),
                "{dtype:?} merge gradient"
            );
        }
    }

    /// A single token or head moves nothing: both paths are a reshape, equal to the reference.
    #[test]
    fn a_single_token_or_head_is_a_reshape() {
        for (b, t, n, d) in [(2, 1, 4, 3), (2, 5, 1, 3)] {
            let y = ramp(&[b, t, n * d], DType::F32);
            let s = split(&y, n, KernelChoice::Custom).unwrap();
            assert_eq!(values(&s), values(&split_reference(&y, n).unwrap()));
            let m = merge(&s, KernelChoice::Custom).unwrap();
            assert_eq!(values(&m), values(&y));
        }
        assert!(split(&ramp(&[1, 2, 7], DType::F32), 2, KernelChoice::Custom).is_err());
    }
}
