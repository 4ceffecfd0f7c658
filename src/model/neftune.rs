//! NEFTune (Jain et al., 2023; TRL's and transformers' `neftune_noise_alpha`): in training,
//! uniform noise in `[-m, m]` with `m = alpha / sqrt(T · H)` is added to the token
//! embeddings of a `[B, T, H]` batch, which improves instruction tuning at no other cost.
//!
//! The noise is drawn as dropout's masks are (`kernels::dropout`): element `i` from
//! `splitmix64(seed + i · golden)`, so a run resumed from a checkpoint draws the noise it
//! would have, on any device. It is made on the host, spread over the CPU's threads, and
//! copied to the device: one `[B, T, H]` upload per training forward, which a GPU run pays
//! only when NEFTune is on.

use candle_core::{Result, Tensor};

use crate::train::rng::splitmix64;

/// `x` `[B, T, H]` plus NEFTune's noise at strength `alpha` under `seed`. Rows of packed
/// sequences (`packed`) count as one row of `B · T` tokens, as TRL's padding-free packing
/// hands transformers the whole batch as one. The noise is a constant: the gradient passes
/// through unchanged.
pub fn noised(x: &Tensor, alpha: f64, seed: u64, packed: bool) -> Result<Tensor> {
    let (b, t, h) = x.dims3()?;
    let len = if packed { b * t } else { t };
    let m = alpha / ((len * h) as f64).sqrt();
    let noise = Tensor::from_vec(
        uniform(x.elem_count(), m as f32, seed),
        x.shape(),
        x.device(),
    )?
    .to_dtype(x.dtype())?;
    crate::tape::island(&[x], |a| a[0].add(&noise))
}

/// `n` values uniform in `[-m, m)`, element `i` a function of `(seed, i)` alone.
fn uniform(n: usize, m: f32, seed: u64) -> Vec<f32> {
    let mut out = vec![0f32; n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let chunk = n.div_ceil(threads).max(1 << 16);
    std::thread::scope(|s| {
        for (c, part) in out.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                let first = (c * chunk) as u64;
                for (j, v) in part.iter_mut().enumerate() {
                    let i = first + j as u64;
                    let hash = splitmix64(seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
                    // The top 24 bits as a fraction in [0, 1): exact in f32.
                    let u = (hash >> 40) as f32 / (1u32 << 24) as f32;
                    *v = (2.0 * u - 1.0) * m;
                }
            });
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The noise fills `[-m, m)` with m = alpha / sqrt(T H), as uniformly as its variance
    /// shows (m² / 3), with mean about 0; one seed draws one noise on any split into threads,
    /// and another seed another.
    #[test]
    fn the_noise_is_uniform_within_alpha_over_root_t_h() {
        let (b, t, h) = (3, 70, 1000);
        let x = Tensor::zeros((b, t, h), DType::F32, &Device::Cpu).unwrap();
        let y = noised(&x, 5.0, 9, false).unwrap();
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let m = 5.0 / ((t * h) as f64).sqrt();
        assert!(v.iter().all(|&e| (e as f64).abs() <= m), "outside ±{m}");
        let n = v.len() as f64;
        let mean = v.iter().map(|&e| e as f64).sum::<f64>() / n;
        let var = v.iter().map(|&e| (e as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.01 * m, "mean {mean} against m {m}");
        assert!((var / (m * m / 3.0) - 1.0).abs() < 0.01, "variance {var}");
        assert_eq!(
            noised(&x, 5.0, 9, false).unwrap().to_vec3::<f32>().unwrap(),
            y.to_vec3::<f32>().unwrap()
        );
        let other = noised(&x, 5.0, 10, false).unwrap();
        assert_ne!(other.to_vec3::<f32>().unwrap(), y.to_vec3::<f32>().unwrap());
        // Packed rows are one row of B T tokens: the bound shrinks by sqrt(B).
        let packed = noised(&x, 5.0, 9, true).unwrap();
        let (p, u) = (
            packed.abs().unwrap().max_all().unwrap(),
            y.abs().unwrap().max_all().unwrap(),
        );
        let ratio = p.to_scalar::<f32>().unwrap() / u.to_scalar::<f32>().unwrap();
        assert!((ratio - 1.0 / (b as f32).sqrt()).abs() < 1e-4, "{ratio}");
        // Element i depends on (seed, i) alone: a shorter draw is the longer one's start.
        let short = uniform(1000, 1.0, 9);
        let long = uniform(300_000, 1.0, 9);
        assert_eq!(short[..], long[..1000]);
        assert_eq!(uniform(300_000, 1.0, 9)[250_000], long[250_000]);
    }

    /// The noise is a constant added: the gradient reaches the embeddings unchanged.
    #[test]
    fn the_gradient_passes_through_the_noise() {
        let x = candle_core::Var::from_tensor(
            &Tensor::rand(-1f32, 1.0, (2, 5, 8), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let w = Tensor::rand(-1f32, 1.0, (2, 5, 8), &Device::Cpu).unwrap();
        let y = noised(x.as_tensor(), 5.0, 3, false).unwrap();
        let g = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = g.get(&x).unwrap();
        assert_eq!(gx.to_vec3::<f32>().unwrap(), w.to_vec3::<f32>().unwrap());
    }
}
