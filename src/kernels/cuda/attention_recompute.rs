//! The reference attention on CUDA as one node of candle's graph that keeps only q, k and v
//! and recomputes the composite in its backward (activation checkpointing). The composite
//! keeps about six `[B, H, Tq, Tk]` f32 tensors a layer until the backward ends (4.8 GB a
//! GPT-2 layer at B16 T1024), which put a training step with the reference kernels out of a
//! 141 GB card's memory.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor, Var,
};

use super::super::attention::{attention_reference, AttnMask, Segments};
use super::tensor_from_storage;

/// `attention_reference(q, k, v, mask, scale)`, differentiable, holding only its inputs.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
) -> Result<Tensor> {
    let op = Recomputed {
        causal_offset: mask.causal_offset,
        key_valid: mask.key_valid.map(Tensor::detach),
        segments: mask.segments.cloned(),
        window: mask.window,
        softcap: mask.softcap,
        scale,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

struct Recomputed {
    causal_offset: Option<usize>,
    key_valid: Option<Tensor>,
    segments: Option<Segments>,
    window: Option<usize>,
    softcap: Option<f64>,
    scale: f64,
}

impl Recomputed {
    fn run(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let mask = AttnMask {
            causal_offset: self.causal_offset,
            key_valid: self.key_valid.as_ref(),
            segments: self.segments.as_ref(),
            window: self.window,
            softcap: self.softcap,
        };
        attention_reference(q, k, v, &mask, self.scale)
    }
}

/// An input of the op as a tensor outside any graph (a copy of its storage).
fn detached(s: &CudaStorage, l: &Layout) -> Result<Tensor> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("reference attention: a strided input ({l:?})");
    }
    Ok(tensor_from_storage(s.try_clone(l)?, l.shape().clone()))
}

impl CustomOp3 for Recomputed {
    fn name(&self) -> &'static str {
        "temper-attention-recomputed"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the recomputed reference attention is for CUDA tensors")
    }

    fn cuda_fwd(
        &self,
        sq: &CudaStorage,
        lq: &Layout,
        sk: &CudaStorage,
        lk: &Layout,
        sv: &CudaStorage,
        lv: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let y = self.run(&detached(sq, lq)?, &detached(sk, lk)?, &detached(sv, lv)?)?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, y.shape().clone())),
            _ => candle_core::bail!("reference attention: the output left the GPU"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [vq, vk, vv] = [q, k, v].map(|t| Var::from_tensor(&t.detach()));
        let (vq, vk, vv) = (vq?, vk?, vv?);
        let y = self.run(vq.as_tensor(), vk.as_tensor(), vv.as_tensor())?;
        let grads = (y * grad)?.sum_all()?.backward()?;
        let get = |input: &Tensor, var: &Var| match input.track_op() {
            true => grads.get(var.as_tensor()).cloned(),
            false => None,
        };
        Ok((get(q, &vq), get(k, &vk), get(v, &vv)))
    }
}
