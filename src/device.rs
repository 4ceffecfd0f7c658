//! Picks the device (`--device cpu|cuda|auto`) and the compute dtype.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

use crate::config::{DTypeChoice, DeviceChoice};

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

/// Host memory the kernel says is available (`MemAvailable` of /proc/meminfo), if known.
pub fn host_available_bytes() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
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
