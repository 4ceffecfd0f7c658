//! The optimizer step on CUDA (`kernels/adamw.cu`): a table of chunks of every tensor, one
//! launch for the per-chunk sums of squares, one for the norm, one for the update. Weights,
//! moments and compute copies are updated in place: the optimizer owns the moments and the
//! copies, and a parameter's storage is what `Var::set` would overwrite anyway.

use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr};
use candle_core::{DType, Layout, Result, Storage, Tensor};
use half::bf16;

use super::super::adamw::{Hyper, Slot};
use super::{
    alloc_out, contiguous_view, cuda_storage, launch, load_func, to_i32, DevPtr, KernelParams,
};
use super::{DevPtrs, LaunchConfig};

/// The Rust mirror of `struct AdamwChunk` in kernels/adamw.cuh (field comments there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct AdamwChunk {
    p: DevPtr,
    m: DevPtr,
    v: DevPtr,
    g: DevPtr,
    copy: DevPtr,
    start: u32,
    len: u32,
    lr: f32,
    wd: f32,
    g_bf16: i32,
    pad: i32,
}
const _: () = assert!(std::mem::size_of::<AdamwChunk>() == 64);
// SAFETY: plain old data with the C layout of the kernels' struct (asserted above).
unsafe impl DeviceRepr for AdamwChunk {}

/// The Rust mirror of `struct AdamwParams` in kernels/adamw.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct AdamwParams {
    chunks: DevPtr,
    partials: DevPtr,
    norm: DevPtr,
    n_chunks: i32,
    n_partials: i32,
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    inv_bc1: f32,
    inv_bc2: f32,
    eps: f32,
    max_norm: f32,
}
const _: () = assert!(std::mem::size_of::<AdamwParams>() == 64);
const _: () = assert!(std::mem::align_of::<AdamwParams>() == 8);
// SAFETY: as above.
unsafe impl DeviceRepr for AdamwParams {}
impl KernelParams for AdamwParams {
    const STEMS: &'static [&'static str] = &["adamw"];
}

/// Elements per chunk: a block's work, large enough to amortise the table row, small enough
/// that GPT-2's 124M parameters give thousands of blocks.
const CHUNK: usize = 1 << 16;
const THREADS: u32 = 256;

/// Every tensor's storage, borrowed, with its layout.
fn guards(ts: &[Tensor]) -> Vec<(impl std::ops::Deref<Target = Storage> + '_, &Layout)> {
    ts.iter().map(|t| t.storage_and_layout()).collect()
}

/// Typed views of borrowed contiguous f32 storages.
fn views<'a, G: std::ops::Deref<Target = Storage>>(
    gs: &'a [(G, &'a Layout)],
) -> Result<Vec<CudaView<'a, f32>>> {
    gs.iter()
        .map(|(s, l)| contiguous_view::<f32>(cuda_storage(s)?, l))
        .collect()
}

/// A borrowed gradient: f32, or bf16 (a compute copy's).
enum GradView<'a> {
    F32(CudaView<'a, f32>),
    Bf16(CudaView<'a, bf16>),
}

impl<'a> GradView<'a> {
    fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::Bf16(v) => v.len(),
        }
    }

    /// The device pointer and whether it is bf16.
    fn ptr(&'a self, ptrs: &mut DevPtrs<'a>) -> (u64, i32) {
        match self {
            Self::F32(v) => (ptrs.read(v), 0),
            Self::Bf16(v) => (ptrs.read(v), 1),
        }
    }
}

fn grad_views<'a, G: std::ops::Deref<Target = Storage>>(
    gs: &'a [(G, &'a Layout)],
) -> Result<Vec<GradView<'a>>> {
    gs.iter()
        .map(|(s, l)| {
            let dtype = s.dtype();
            let s = cuda_storage(s)?;
            Ok(match dtype {
                DType::BF16 => GradView::Bf16(contiguous_view::<bf16>(s, l)?),
                _ => GradView::F32(contiguous_view::<f32>(s, l)?),
            })
        })
        .collect()
}

fn chunks(n: usize) -> impl Iterator<Item = (u32, u32)> {
    (0..n.div_ceil(CHUNK)).map(move |c| {
        let start = c * CHUNK;
        (start as u32, (n - start).min(CHUNK) as u32)
    })
}

/// The whole step; `None` when some weight or moment is not contiguous f32, or some gradient
/// or copy not contiguous f32 or bf16 as it may be (the dispatcher then uses the reference).
pub fn update(grads: &[Tensor], slots: &mut [Slot], h: &Hyper) -> Result<Option<f64>> {
    let f32c = |t: &Tensor| t.dtype() == DType::F32 && t.is_contiguous();
    let bf16c = |t: &Tensor| t.dtype() == DType::BF16 && t.is_contiguous();
    let gradc = |t: &Tensor| f32c(t) || bf16c(t);
    let fits = grads.iter().all(gradc)
        && slots.iter().all(|s| {
            f32c(s.param.as_tensor())
                && f32c(s.m)
                && f32c(s.v)
                && gradc(s.grad)
                && s.copy
                    .is_none_or(|c| bf16c(c.as_tensor()) && c.elem_count() == s.param.elem_count())
        })
        && grads
            .iter()
            .chain(slots.iter().map(|s| s.grad))
            .all(|g| u32::try_from(g.elem_count()).is_ok());
    if !fits || grads.is_empty() {
        return Ok(None);
    }
    let dev = grads[0].device().as_cuda_device()?;
    let stream = dev.cuda_stream();

    // Every storage stays borrowed (and every pointer live) until the launches are queued.
    let params: Vec<Tensor> = slots.iter().map(|s| s.param.as_tensor().clone()).collect();
    let step_grads: Vec<Tensor> = slots.iter().map(|s| s.grad.clone()).collect();
    let (pg, gg, sg) = (guards(&params), guards(grads), guards(&step_grads));
    let ms: Vec<Tensor> = slots.iter().map(|s| s.m.clone()).collect();
    let vs: Vec<Tensor> = slots.iter().map(|s| s.v.clone()).collect();
    let (mg, vg) = (guards(&ms), guards(&vs));
    let copies: Vec<Option<Tensor>> = slots
        .iter()
        .map(|s| s.copy.map(|c| c.as_tensor().clone()))
        .collect();
    let cg: Vec<_> = copies
        .iter()
        .map(|c| c.as_ref().map(|c| c.storage_and_layout()))
        .collect();
    let cv = cg
        .iter()
        .map(|c| match c {
            Some((s, l)) => contiguous_view::<bf16>(cuda_storage(s)?, l).map(Some),
            None => Ok(None),
        })
        .collect::<Result<Vec<_>>>()?;
    let (pv, gv, sv, mv, vv) = (
        views(&pg)?,
        grad_views(&gg)?,
        grad_views(&sg)?,
        views(&mg)?,
        views(&vg)?,
    );
    let mut ptrs = DevPtrs::new(&stream);

    let mut norm_table = vec![];
    for g in &gv {
        let (gp, g_bf16) = g.ptr(&mut ptrs);
        for (start, len) in chunks(g.len()) {
            norm_table.push(AdamwChunk {
                g: gp,
                g_bf16,
                start,
                len,
                ..AdamwChunk::default()
            });
        }
    }
    let mut step_table = vec![];
    for (i, s) in slots.iter().enumerate() {
        // The kernel writes weights and moments through these read pointers: the optimizer
        // holds the only reference to each moment, and a parameter is written in place as
        // `Var::set` would.
        let (p, m, v, (g, g_bf16)) = (
            ptrs.read(&pv[i]),
            ptrs.read(&mv[i]),
            ptrs.read(&vv[i]),
            sv[i].ptr(&mut ptrs),
        );
        // Written through a read pointer too: the optimizer holds the only other reference.
        let copy = ptrs.read_opt(cv[i].as_ref());
        for (start, len) in chunks(sv[i].len()) {
            step_table.push(AdamwChunk {
                p,
                m,
                v,
                g,
                copy,
                start,
                len,
                lr: s.lr as f32,
                wd: s.weight_decay as f32,
                g_bf16,
                pad: 0,
            });
        }
    }
    let norm_rows = stream
        .clone_htod(&norm_table)
        .map_err(candle_core::Error::wrap)?;
    let step_rows = match step_table.is_empty() {
        true => None,
        false => Some(
            stream
                .clone_htod(&step_table)
                .map_err(candle_core::Error::wrap)?,
        ),
    };
    // SAFETY: the sum of squares writes one partial per norm chunk, the finish the norm.
    let mut partials = unsafe { alloc_out::<f32>(dev, norm_table.len())? };
    let mut norm = unsafe { alloc_out::<f32>(dev, 1)? };
    let mut own = DevPtrs::new(&stream);
    let (b1, b2) = (h.beta1, h.beta2);
    let bc1 = 1.0 - b1.powi(h.t as i32);
    let bc2 = 1.0 - b2.powi(h.t as i32);
    let mut p = AdamwParams {
        chunks: own.read(&norm_rows),
        partials: own.write(&mut partials),
        norm: own.write(&mut norm),
        n_chunks: to_i32(norm_table.len(), "chunks")?,
        n_partials: to_i32(norm_table.len(), "chunks")?,
        beta1: b1 as f32,
        beta2: b2 as f32,
        one_minus_beta1: (1.0 - b1) as f32,
        one_minus_beta2: (1.0 - b2) as f32,
        inv_bc1: (1.0 / bc1) as f32,
        inv_bc2: (1.0 / bc2) as f32,
        eps: h.eps as f32,
        max_norm: h.max_norm as f32,
    };
    let cfg = |blocks: usize| LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = load_func(dev, "adamw", "adamw_sumsq_f32")?;
    // SAFETY: one block per norm chunk, each within its gradient.
    unsafe { launch(dev, &f, "adamw_sumsq_f32", cfg(norm_table.len()), &p) }?;
    let f = load_func(dev, "adamw", "adamw_norm_finish_f32")?;
    // SAFETY: one block reads n_partials partials and writes the norm.
    unsafe { launch(dev, &f, "adamw_norm_finish_f32", cfg(1), &p) }?;
    if let Some(rows) = &step_rows {
        p.chunks = own.read(rows);
        p.n_chunks = to_i32(step_table.len(), "chunks")?;
        let f = load_func(dev, "adamw", "adamw_step_f32")?;
        // SAFETY: one block per step chunk, each within its parameter, moments and gradient.
        unsafe { launch(dev, &f, "adamw_step_f32", cfg(step_table.len()), &p) }?;
    }
    drop(own);
    drop(ptrs);
    let n = stream.clone_dtoh(&norm).map_err(candle_core::Error::wrap)?;
    Ok(Some(f64::from(n[0])))
}
