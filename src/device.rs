//! Picks the device (`--device cpu|cuda|auto`) and the compute dtype.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

use crate::config::{DTypeChoice, DeviceChoice};
use crate::kernels::KernelSet;

pub fn select(choice: DeviceChoice) -> Result<Device> {
    select_ordinal(choice, 0)
}

/// The device of a data-parallel rank: GPU `ordinal` (its `LOCAL_RANK`) when on CUDA.
pub fn select_ordinal(choice: DeviceChoice, ordinal: usize) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => cuda(ordinal, true),
        DeviceChoice::Auto => cuda(ordinal, false),
    }
}

/// The GPU a rank uses: `cuda:LOCAL_RANK`, unless the scheduler already gave each task its own
/// single GPU (`srun --gpus-per-task=1` sets `CUDA_VISIBLE_DEVICES` to one id), which is then
/// `cuda:0`.
pub fn rank_ordinal(local_rank: usize, visible: Option<&str>) -> usize {
    match visible.map(|v| v.split(',').filter(|s| !s.trim().is_empty()).count()) {
        Some(1) => 0,
        _ => local_rank,
    }
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize, required: bool) -> Result<Device> {
    match Device::new_cuda(ordinal) {
        Ok(d) => Ok(d),
        Err(e) if required => bail!("--device cuda: no usable CUDA device {ordinal}: {e}"),
        Err(_) => Ok(Device::Cpu),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda(_ordinal: usize, required: bool) -> Result<Device> {
    if required {
        bail!("--device cuda: this temper was built without CUDA (rebuild with --features cuda)");
    }
    Ok(Device::Cpu)
}

/// bf16 compute on CUDA by default (master weights and optimizer state stay f32); f32 on CPU,
/// where bf16 matmuls are slow.
pub fn compute_dtype(choice: DTypeChoice, device: &Device) -> DType {
    match choice {
        DTypeChoice::F32 => DType::F32,
        DTypeChoice::Bf16 => DType::BF16,
        DTypeChoice::Auto if device.is_cuda() => DType::BF16,
        DTypeChoice::Auto => DType::F32,
    }
}

pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        _ => "cpu".into(),
    }
}

/// The kernel choices as a run on `device` takes them, for the line a run starts with: on
/// CUDA each op's choice; on the CPU every op runs the reference whatever `--kernels` chose
/// (temper's kernels are CUDA's), so naming flash attention or cuBLASLt there would mislead.
/// run.json has both: this as `kernels`, the choices as `kernel_choices` (what the run's
/// config.toml asks of a resume on a GPU).
pub fn describe_kernels(device: &Device, kernels: &KernelSet) -> String {
    kernels_line(device.is_cuda(), kernels)
}

/// [`describe_kernels`] by whether the device is CUDA, so that the CUDA line is tested
/// without a GPU.
fn kernels_line(cuda: bool, kernels: &KernelSet) -> String {
    match cuda {
        true => kernels.to_string(),
        false => "reference (temper's own kernels run on CUDA only)".to_string(),
    }
}

/// Host memory the kernel says is available (`MemAvailable` of /proc/meminfo), if known.
pub fn host_available_bytes() -> Option<u128> {
    crate::out_of_memory::available_bytes().map(u128::from)
}

/// Refuses a model whose f32 weights alone exceed the host's available memory, before any
/// of it is allocated (every weight is drawn on the host first).
pub fn ensure_fits(cfg: &crate::config::ModelConfig) -> Result<()> {
    let params = cfg.num_params();
    let bytes = params.saturating_mul(4);
    if let Some(avail) = host_available_bytes() {
        if bytes > avail {
            bail!(
                "the model has {params} parameters and needs {:.1} GB for its f32 weights alone; this machine has {:.1} GB available",
                bytes as f64 / 1e9,
                avail as f64 / 1e9
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_with_one_visible_gpu_uses_it() {
        assert_eq!(rank_ordinal(3, None), 3);
        assert_eq!(rank_ordinal(3, Some("0,1,2,3")), 3);
        assert_eq!(rank_ordinal(3, Some("5")), 0);
    }

    /// On the CPU the start line names no CUDA kernel, whatever was chosen.
    #[test]
    fn the_cpu_names_only_the_reference_kernels() {
        for k in [KernelSet::default(), KernelSet::reference()] {
            let line = describe_kernels(&Device::Cpu, &k);
            assert_eq!(line, "reference (temper's own kernels run on CUDA only)");
        }
    }

    /// On CUDA the start line lists every op's choice as `--kernels` spells it: given back
    /// to `--kernels`, it makes the same choices, whichever ops run the reference.
    #[test]
    fn cuda_names_every_choice_as_kernels_takes_it() {
        for spec in [
            "",
            "attention=reference",
            "all=reference",
            "gemm=reference,lora=ref",
        ] {
            let k = KernelSet::default().apply_spec(spec).unwrap();
            let line = kernels_line(true, &k);
            let back = KernelSet::reference().apply_spec(&line).unwrap();
            assert_eq!(back, k, "{spec:?}: {line}");
            assert_ne!(line, kernels_line(false, &k));
        }
    }
}
