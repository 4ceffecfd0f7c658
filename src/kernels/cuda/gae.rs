//! GAE and GRPO group normalisation on CUDA (`kernels/gae.cu`): one launch each.
//!
//! [`gae`] is what the dispatcher calls; it reads the whitening statistics back to the host
//! (the contract returns them as `f64`), which synchronises the stream. [`gae_device`] stops
//! before that copy and leaves `[count, mean, var]` on the device, for callers that whiten on
//! the GPU and for timing the kernel alone.

use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::{DType, Result, Tensor};

use super::super::gae::GaeOutput;
use super::{
    alloc_out, contiguous_view, cuda_storage, launch, launch_1d, load_func, DevPtr, KernelParams,
};
use super::{tensor_from_slice, to_i32, DevPtrs, LaunchConfig};

/// The one argument of every kernel in kernels/gae.cu: the Rust mirror of `struct GaeParams`
/// in kernels/gae.cuh (field comments there). Same fields, order and types (device pointers
/// as `u64`, 0 = null); the size asserts on both sides catch a mismatch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct GaeParams {
    rewards: DevPtr,
    values: DevPtr,
    mask: DevPtr,
    adv: DevPtr,
    ret: DevPtr,
    partials: DevPtr,
    counter: DevPtr,
    stats: DevPtr,
    out: DevPtr,
    eps: f64,
    t: i32,
    n_groups: i32,
    group: i32,
    gamma: f32,
    gl: f32,
    pad_: i32,
}
const _: () = assert!(std::mem::size_of::<GaeParams>() == 104);
const _: () = assert!(std::mem::align_of::<GaeParams>() == 8);
// SAFETY: plain old data with the C layout of the kernels' struct (asserted above).
unsafe impl DeviceRepr for GaeParams {}
impl KernelParams for GaeParams {
    const STEMS: &'static [&'static str] = &["gae"];
}

/// Steps per thread in `gae_scan_f32*` (`E` in the kernel).
const STEPS_PER_THREAD: usize = 8;
/// Threads per block of the scan, at most (`kMaxThreads` in the kernel).
const MAX_THREADS: usize = 256;

/// Advantages `[B, T]`, returns `[B, T]` and the statistics `[count, mean, unbiased var]`
/// (f64) of the advantages over valid tokens, all still on the device. Inputs of another
/// float dtype (or an integer mask) are converted to f32 first, as the reference does.
pub fn gae_device(
    rewards: &Tensor,
    values: &Tensor,
    mask: &Tensor,
    gamma: f64,
    lambda: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t) = rewards.dims2()?;
    for (name, x) in [("values", values), ("mask", mask)] {
        if x.dims() != [b, t] {
            candle_core::bail!("gae: {name} is {:?}, rewards are [{b}, {t}]", x.dims());
        }
    }
    let dev = rewards.device().as_cuda_device()?;
    let f32c = |x: &Tensor| -> Result<Tensor> { x.to_dtype(DType::F32)?.contiguous() };
    let (r, v, m) = (f32c(rewards)?, f32c(values)?, f32c(mask)?);
    let n = b * t;

    if n == 0 {
        // No valid token: (count, mean, var) = (0, 0, 0), as in the reference.
        let z = Tensor::zeros((b, t), DType::F32, rewards.device())?;
        let stats = Tensor::zeros(3, DType::F64, rewards.device())?;
        return Ok((z.clone(), z, stats));
    }
    // SAFETY: the scan writes every advantage and return, one partial per block, and the
    // last block the three statistics.
    let mut adv = unsafe { alloc_out::<f32>(dev, n)? };
    let mut ret = unsafe { alloc_out::<f32>(dev, n)? };
    let mut stats = unsafe { alloc_out::<f64>(dev, 3)? };
    {
        let (rs, rl) = r.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (ms, ml) = m.storage_and_layout();
        let rv = contiguous_view::<f32>(cuda_storage(&rs)?, rl)?;
        let vv = contiguous_view::<f32>(cuda_storage(&vs)?, vl)?;
        let mv = contiguous_view::<f32>(cuda_storage(&ms)?, ml)?;
        let (name, threads) = scan_kernel(t, [rl, vl, ml]);
        let mut partials = unsafe { alloc_out::<f64>(dev, 3 * b)? };
        let mut counter = dev.alloc_zeros::<u32>(1)?;
        let func = load_func(dev, "gae", name)?;
        let grid = to_i32(b, "B")? as u32;
        let gamma32 = gamma as f32;
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let p = GaeParams {
            rewards: ptrs.read(&rv),
            values: ptrs.read(&vv),
            mask: ptrs.read(&mv),
            adv: ptrs.write(&mut adv),
            ret: ptrs.write(&mut ret),
            partials: ptrs.write(&mut partials),
            counter: ptrs.write(&mut counter),
            stats: ptrs.write(&mut stats),
            t: to_i32(t, "T")?,
            gamma: gamma32,
            // Same rounding as the reference's `gamma * lambda * next_a` (f32, left to right).
            gl: gamma32 * lambda as f32,
            ..GaeParams::default()
        };
        // SAFETY: inputs and outputs hold B * T, partials 3 * B; the counter is zeroed.
        unsafe { launch(dev, &func, name, cfg, &p) }?;
    }
    Ok((
        tensor_from_slice(adv, dev, (b, t)),
        tensor_from_slice(ret, dev, (b, t)),
        tensor_from_slice(stats, dev, 3),
    ))
}

/// The scan kernel for rows of `t` steps and its threads per row (one block per row).
fn scan_kernel(t: usize, layouts: [&candle_core::Layout; 3]) -> (&'static str, usize) {
    // float4 loads need every row start 16-byte aligned (allocations are 256-aligned).
    let vec4 = t.is_multiple_of(4) && layouts.iter().all(|l| l.start_offset().is_multiple_of(4));
    let threads = t
        .div_ceil(STEPS_PER_THREAD)
        .div_ceil(32)
        .clamp(1, MAX_THREADS / 32)
        * 32;
    let name = if vec4 {
        "gae_scan_f32_vec4"
    } else {
        "gae_scan_f32"
    };
    (name, threads)
}

/// The dispatcher's entry point (contract in `src/kernels/gae.rs`).
pub fn gae(
    rewards: &Tensor,
    values: &Tensor,
    mask: &Tensor,
    gamma: f64,
    lambda: f64,
) -> Result<Option<GaeOutput>> {
    let (advantages, returns, stats) = gae_device(rewards, values, mask, gamma, lambda)?;
    let stats = stats.to_vec1::<f64>()?;
    Ok(Some(GaeOutput {
        advantages,
        returns,
        mean: stats[1],
        var: stats[2],
    }))
}

/// GRPO: `(r - mean_group) / (std_group + eps)`, unbiased std, groups laid out one after
/// another in a 1-D `rewards`.
pub fn group_normalize(rewards: &Tensor, group: usize, eps: f64) -> Result<Option<Tensor>> {
    let n = rewards.dims1()?;
    if group == 0 || !n.is_multiple_of(group) {
        candle_core::bail!("group_normalize: {n} rewards do not split into groups of {group}");
    }
    let dev = rewards.device().as_cuda_device()?;
    let r = rewards.to_dtype(DType::F32)?.contiguous()?;
    // SAFETY: one warp per group writes every element of its group.
    let mut out = unsafe { alloc_out::<f32>(dev, n)? };
    if n > 0 {
        let (rs, rl) = r.storage_and_layout();
        let rv = contiguous_view::<f32>(cuda_storage(&rs)?, rl)?;
        let groups = n / group;
        const THREADS: u32 = 256;
        let cfg = launch_1d(groups * 32, THREADS);
        let func = load_func(dev, "gae", "grpo_group_norm_f32")?;
        let stream = dev.cuda_stream();
        let mut ptrs = DevPtrs::new(&stream);
        let p = GaeParams {
            rewards: ptrs.read(&rv),
            out: ptrs.write(&mut out),
            n_groups: to_i32(groups, "groups")?,
            group: to_i32(group, "group")?,
            eps,
            ..GaeParams::default()
        };
        // SAFETY: rewards and out hold n = groups * group; one warp per group.
        unsafe { launch(dev, &func, "grpo_group_norm_f32", cfg, &p) }?;
    }
    Ok(Some(tensor_from_slice(out, dev, n)))
}
