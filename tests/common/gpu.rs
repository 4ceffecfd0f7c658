//! What the GPU kernel tests share: running a test body on the device (with kernel outputs
//! poisoned) or saying visibly why not, a seeded generator that `TEMPER_TEST_SEED` replays,
//! inputs on the GPU with their CPU twins, and the global and element-wise comparisons
//! against a reference.
//!
//! Compiled only with feature `cuda` (tests/common/mod.rs); without it `gpu_test!`
//! (tests/common/mod.rs) prints `SKIPPED (built without feature cuda): <name>` instead.

use std::sync::{PoisonError, RwLock};

use candle_core::{DType, Device, Tensor};
use temper::kernels::cuda as kc;

pub fn device() -> Option<Device> {
    if !kc::cuda_available() {
        return None;
    }
    kc::set_poison(true);
    Device::new_cuda(0).ok()
}

/// Held shared by every GPU test of a test binary, and alone by a test that captures CUDA
/// graphs ([`run_alone`]). cargo runs a binary's tests in parallel threads, and another
/// thread's device work during a capture (a call that synchronises with the legacy stream,
/// a trim of graph memory, a freed pinned buffer) can invalidate it. The engine then falls
/// back to eager steps: the tokens stay right, but a test that counts replays fails.
static DEVICE_USE: RwLock<()> = RwLock::new(());

/// Runs `body` on the GPU when there is one, else prints `SKIPPED (no CUDA device): <name>`.
pub fn run(name: &str, body: impl FnOnce(&Device)) {
    let _shared = DEVICE_USE.read().unwrap_or_else(PoisonError::into_inner);
    on_device(name, body);
}

/// [`run`] with no other GPU test of this binary running beside it: for tests that capture
/// CUDA graphs.
pub fn run_alone(name: &str, body: impl FnOnce(&Device)) {
    let _only = DEVICE_USE.write().unwrap_or_else(PoisonError::into_inner);
    on_device(name, body);
}

fn on_device(name: &str, body: impl FnOnce(&Device)) {
    match device() {
        Some(dev) => body(&dev),
        None => super::skipped("no CUDA device", name),
    }
}

/// `n + pad` random values in `dtype`: on the GPU narrowed past the first `pad` (an offset
/// that defeats 16-byte loads when `pad` is odd) and reshaped to `dims`, and the same values
/// (already rounded to `dtype`) as f32 on the CPU.
pub fn gpu_and_cpu(
    rng: &mut Rng,
    dims: &[usize],
    (lo, hi): (f32, f32),
    dtype: DType,
    dev: &Device,
    pad: usize,
) -> (Tensor, Tensor) {
    let n: usize = dims.iter().product();
    let cpu = Tensor::from_vec(rng.vec(n + pad, lo, hi), n + pad, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .unwrap();
    let gpu = cpu
        .to_device(dev)
        .and_then(|t| t.narrow(0, pad, n))
        .and_then(|t| t.reshape(dims))
        .unwrap();
    let cpu32 = cpu
        .narrow(0, pad, n)
        .and_then(|t| t.reshape(dims))
        .and_then(|t| t.to_dtype(DType::F32))
        .unwrap();
    (gpu, cpu32)
}

/// xorshift64*: fresh inputs every run, reproducible from the printed seed.
pub struct Rng(pub u64);

impl Rng {
    /// A seed from the clock and `tag`, or `TEMPER_TEST_SEED` (decimal or 0x-hex) when
    /// set, so a printed seed replays its failure.
    pub fn fresh(tag: u64) -> (Self, u64) {
        let seed = match std::env::var("TEMPER_TEST_SEED") {
            Ok(v) => {
                parse_seed(&v).unwrap_or_else(|| panic!("TEMPER_TEST_SEED={v:?} is not a u64"))
            }
            Err(_) => {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1);
                t ^ tag.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            }
        } | 1; // xorshift never leaves 0; printed seeds are odd already
        (Self(seed), seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The values as f64 on the host. Copied first and converted on the CPU: candle's CUDA cast
/// of an empty tensor launches a kernel with a zero-block grid, which the driver refuses
/// with CUDA_ERROR_INVALID_VALUE (the failure the `(0, 64)` RMSNorm shapes hit here); an
/// empty tensor is not copied at all.
pub fn host(t: &Tensor) -> Vec<f64> {
    if t.elem_count() == 0 {
        return Vec::new();
    }
    t.to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("copy to host")
}

/// ‖a − b‖ / ‖b‖ (absolute when ‖b‖ is 0); infinite if `a` holds a NaN.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    if a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

pub fn parse_seed(v: &str) -> Option<u64> {
    let v = v.trim();
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

pub fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 5e-3,
        _ => 1e-2,
    }
}

/// Element-wise `(atol, rtol)` for values; gradients get twice this (see [`grad_tol`]).
/// `atol` is relative to the reference's scale, max(1, max|ref|): gradients, LoRA
/// outputs and long GAE sums reach tens to thousands, and rounding there scales with the summands.
pub fn elem_tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (1e-4, 1e-4),
        DType::F16 => (1e-2, 1e-2),
        _ => (2e-2, 2e-2),
    }
}

pub fn grad_tol(dtype: DType) -> (f64, f64) {
    let (atol, rtol) = elem_tol(dtype);
    (2.0 * atol, 2.0 * rtol)
}

/// Every element within `atol · max(1, max|b|) + rtol · |b|` of the reference `b`;
/// anything non-finite fails. The error names the worst element (largest |a − b| over
/// its bound) by its index in `dims`, with both values.
pub fn elem_check(
    a: &[f64],
    b: &[f64],
    dims: &[usize],
    (atol, rtol): (f64, f64),
) -> Result<(), String> {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1f64, |m, y| m.max(y.abs()));
    let mut worst: Option<(usize, f64)> = None;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let bound = atol * scale + rtol * y.abs();
        let ratio = if x.is_finite() && y.is_finite() {
            (x - y).abs() / bound
        } else {
            f64::INFINITY
        };
        if ratio > 1.0 && worst.is_none_or(|(_, w)| ratio > w) {
            worst = Some((i, ratio));
        }
    }
    match worst {
        None => Ok(()),
        Some((i, _)) => {
            let bad = a
                .iter()
                .zip(b)
                .filter(|(x, y)| {
                    !(x.is_finite() && y.is_finite())
                        || (*x - *y).abs() > atol * scale + rtol * y.abs()
                })
                .count();
            let mut idx = vec![0; dims.len()];
            let mut rest = i;
            for (k, &d) in dims.iter().enumerate().rev() {
                idx[k] = rest % d.max(1);
                rest /= d.max(1);
            }
            Err(format!(
                "{bad} of {} elements out of tolerance (atol {atol:.0e} x {scale:.3e}, \
                 rtol {rtol:.0e}); worst at {idx:?} (flat {i}): ours {:.6e}, reference \
                 {:.6e}, |diff| {:.3e} > bound {:.3e}",
                a.len(),
                a[i],
                b[i],
                (a[i] - b[i]).abs(),
                atol * scale + rtol * b[i].abs()
            ))
        }
    }
}

/// The global check (‖a − b‖ / ‖b‖ <= `rel`) and the element-wise one, `what` in the
/// message (with the seed). A single element gets the element-wise check alone: the global
/// one would then be its relative error, which rounding makes arbitrary where the value
/// itself is a cancellation's remainder (GELU far below zero, LayerNorm over one column).
pub fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, rel: f64, elem: (f64, f64)) {
    assert_eq!(ours.dims(), reference.dims(), "{what}: shapes");
    let (a, b) = (host(ours), host(reference));
    let e = rel_err(&a, &b);
    assert!(
        e <= rel || a.len() == 1,
        "{what}: rel err {e:.3e} > {rel:.0e}"
    );
    if let Err(msg) = elem_check(&a, &b, ours.dims(), elem) {
        panic!("{what}: {msg}");
    }
}
