//! The optimizer step on CUDA (`kernels/adamw.cu`): a table of chunks of every tensor, one
//! launch for the per-chunk sums of squares, one for the norm, one for the update. Weights and
//! moments are updated in place: the optimizer owns the moments, and a parameter's storage is
//! what `Var::set` would overwrite anyway.

use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr};
use candle_core::{DType, Layout, Result, Storage, Tensor};

use super::super::adamw::{Hyper, Slot};
use super::{alloc_out, contiguous_view, cuda_storage, launch, load_func, to_i32};
use super::{DevPtrs, LaunchConfig};

/// The Rust mirror of `struct AdamwChunk` in kernels/adamw.cuh (field comments there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct AdamwChunk {
    p: u64,
    m: u64,
    v: u64,
    g: u64,
    start: u32,
    len: u32,
    lr: f32,
    wd: f32,
}
const _: () = assert!(std::mem::size_of::<AdamwChunk>() == 48);
// SAFETY: plain old data with the C layout of the kernels' struct (asserted above).
unsafe impl DeviceRepr for AdamwChunk {}

/// The Rust mirror of `struct AdamwParams` in kernels/adamw.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct AdamwParams {
    chunks: u64,
    partials: u64,
    norm: u64,
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

fn chunks(n: usize) -> impl Iterator<Item = (u32, u32)> {
    (0..n.div_ceil(CHUNK)).map(move |c| {
        let start = c * CHUNK;
        (start as u32, (n - start).min(CHUNK) as u32)
    })
}

/// The whole step; `None` when some tensor is not contiguous f32 (the dispatcher then uses
/// the reference).
pub fn update(grads: &[Tensor], slots: &mut [Slot], h: &Hyper) -> Result<Option<f64>> {
    let f32c = |t: &Tensor| t.dtype() == DType::F32 && t.is_contiguous();
    let fits = grads.iter().all(f32c)
        && slots
            .iter()
            .all(|s| f32c(s.param.as_tensor()) && f32c(s.m) && f32c(s.v) && f32c(s.grad))
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
    let (pv, gv, sv, mv, vv) = (
        views(&pg)?,
        views(&gg)?,
        views(&sg)?,
        views(&mg)?,
        views(&vg)?,
    );
    let mut ptrs = DevPtrs::new(&stream);

    let mut norm_table = vec![];
    for g in &gv {
        let gp = ptrs.read(g);
        for (start, len) in chunks(g.len()) {
            norm_table.push(AdamwChunk {
                g: gp,
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
        let (p, m, v, g) = (
            ptrs.read(&pv[i]),
            ptrs.read(&mv[i]),
            ptrs.read(&vv[i]),
            ptrs.read(&sv[i]),
        );
        for (start, len) in chunks(sv[i].len()) {
            step_table.push(AdamwChunk {
                p,
                m,
                v,
                g,
                start,
                len,
                lr: s.lr as f32,
                wd: s.weight_decay as f32,
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
