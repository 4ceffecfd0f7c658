//! The decode step's state, written in place where it lives on the device, so that one
//! capture of the step (a CUDA graph, `src/generate/static_step.rs`) stays right when it is
//! replayed: the KV cache length and the draw index sit in a `step` tensor (`[2]` i64: cache
//! length `L`, draw index) that the step's own last ops advance, instead of in host scalars
//! that a capture would freeze at their captured values.
//!
//! Each op mutates its first tensor in place: on the CPU the reference below, on CUDA
//! `kernels/decode_step.cu` (tested against it on the device, `tests/gpu_sample.rs`).
//! [`qkv_write`] also returns q: on the CPU it is composed of the reference ops, on CUDA one
//! launch.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, InplaceOp3, Layout, Tensor};

use super::host::slice;
pub use super::rmsnorm::Gain;

type Result<T> = candle_core::Result<T>;

/// Writes `new` (`[B, H, 1, D]`) at position `L = step[0]` of `cache` (`[B, H, cap, D]`,
/// contiguous); writes nothing once `L >= cap`.
pub fn kv_write(cache: &Tensor, new: &Tensor, step: &Tensor) -> Result<()> {
    let (b, h, _, d) = cache.dims4()?;
    if new.dims() != [b, h, 1, d] || new.dtype() != cache.dtype() {
        candle_core::bail!(
            "kv_write: {:?} {:?} is not one position of a {:?} {:?} cache",
            new.dims(),
            new.dtype(),
            cache.dims(),
            cache.dtype()
        );
    }
    if !cache.is_contiguous() {
        candle_core::bail!("kv_write: the cache must be contiguous");
    }
    check_step(step)?;
    cache.inplace_op3(&new.contiguous()?, step, &KvWrite)
}

/// Qwen3's (and Gemma 3's) RMSNorm of each q and k head over its `D` values, applied before
/// the rotation: the weights (`[D]` each) and the epsilon.
#[derive(Clone, Copy, Debug)]
pub struct HeadNorm<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub eps: f64,
    /// How the weights give the gains: as they are, in the projections' dtype (Qwen3), or
    /// Gemma's f32 offsets from one, the gain `1 + w` formed in f32 ([`Gain::PlusOne`]).
    pub gain: Gain,
}

impl HeadNorm<'_> {
    /// Whether the weights are `[d]` vectors of the dtype the gain wants: `dtype`, or f32 for
    /// Gemma's offsets.
    pub fn fits(&self, d: usize, dtype: DType) -> bool {
        let want = match self.gain {
            Gain::AsIs => dtype,
            Gain::PlusOne => DType::F32,
        };
        [self.q, self.k]
            .iter()
            .all(|g| g.dims() == [d] && g.dtype() == want)
    }
}

/// One decode position's stacked projections `y` (`[B, 1, nq + 2 nkv]`: q, then k, then v,
/// each `[heads, D]`) split in one pass: returns q as `[B, nq / D, 1, D]` and writes k and v at
/// position `L = step[0]` of `kcache` and `vcache` (`[B, nkv / D, cap, D]`, contiguous, `y`'s
/// dtype), as [`kv_write`] does each (nothing once `L >= cap`). With `norm`, each q and k head
/// is RMS-normalised as `rmsnorm::rms_norm` normalises it (by its gains as they are, or
/// Gemma's `1 + w`); with `rope` (`cos`, `sin`
/// `[B, 1, 1, D / 2]` in `y`'s dtype, the rows' positions) q and k are then rotated, as
/// `rope::fused` rotates them. With q, k and v from one GEMM this is one launch where the
/// separate projections took three GEMMs, two norms, two rotations and two writes.
pub fn qkv_write(
    y: &Tensor,
    kcache: &Tensor,
    vcache: &Tensor,
    step: &Tensor,
    nq: usize,
    rope: Option<(&Tensor, &Tensor)>,
    norm: Option<HeadNorm>,
) -> Result<Tensor> {
    let (b, hkv, _, d) = kcache.dims4()?;
    let width = nq + 2 * hkv * d;
    let fits = y.dims() == [b, 1, width] && nq.is_multiple_of(d.max(1));
    if !fits || vcache.dims() != kcache.dims() || !kcache.is_contiguous() || !vcache.is_contiguous()
    {
        candle_core::bail!(
            "qkv_write: y {:?} with {nq} query columns for caches {:?} and {:?}",
            y.dims(),
            kcache.dims(),
            vcache.dims()
        );
    }
    let dtype = y.dtype();
    if kcache.dtype() != dtype || vcache.dtype() != dtype {
        candle_core::bail!("qkv_write: y {dtype:?} for {:?} caches", kcache.dtype());
    }
    check_step(step)?;
    let rope = match rope {
        Some((cos, sin)) => {
            let table = [b, 1, 1, d / 2];
            let fit = |t: &Tensor| t.dims() == table && t.dtype() == dtype && d % 2 == 0;
            if !fit(cos) || !fit(sin) {
                candle_core::bail!(
                    "qkv_write: rotation tables {:?} {:?} and {:?} for {table:?} {dtype:?}",
                    cos.dims(),
                    cos.dtype(),
                    sin.dims()
                );
            }
            Some((cos.contiguous()?, sin.contiguous()?))
        }
        None => None,
    };
    let norm = match norm {
        Some(n) if !n.fits(d, dtype) => candle_core::bail!(
            "qkv_write: head norm gains {:?} {:?} and {:?} {:?} for head dim {d} {dtype:?}",
            n.q.dims(),
            n.q.dtype(),
            n.k.dims(),
            n.k.dtype()
        ),
        Some(n) => Some((n.q.contiguous()?, n.k.contiguous()?, n)),
        None => None,
    };
    let y = y.reshape((b, width))?;
    #[cfg(feature = "cuda")]
    if y.device().is_cuda() {
        let rope = rope.as_ref().map(|(c, s)| (c, s));
        let norm = norm.as_ref().map(|(q, k, n)| HeadNorm { q, k, ..*n });
        let q = super::cuda::decode_step::qkv_write(&y, (kcache, vcache), step, nq, rope, norm)?;
        return q.reshape((b, nq / d.max(1), 1, d));
    }
    // Elsewhere the same from the reference ops: q, k and v as [B, heads, 1, D], q and k
    // normalised and rotated as the norm and rope kernels do it, k and v written by
    // `kv_write` (which writes nothing past the capacity).
    // `gain`: Some(q's or k's gains) for q and k, which are normalised (where the model has
    // the norm) and rotated; None for v.
    let part = |from: usize, width: usize, gain: Option<Option<&Tensor>>| -> Result<Tensor> {
        let mut t = y.narrow(1, from, width)?.reshape((b, width / d, 1, d))?;
        if let (Some(Some(w)), Some((_, _, n))) = (gain, &norm) {
            t = super::rmsnorm::rms_norm_reference(&t, &n.gain.of(w)?, n.eps)?;
        }
        match (&rope, gain) {
            (Some((cos, sin)), Some(_)) => super::rope::fused(&t, cos, sin),
            _ => Ok(t),
        }
    };
    let nkv = hkv * d;
    let (qg, kg) = match &norm {
        Some((q, k, _)) => (Some(q), Some(k)),
        None => (None, None),
    };
    kv_write(kcache, &part(nq, nkv, Some(kg))?, step)?;
    kv_write(vcache, &part(nq + nkv, nkv, None)?, step)?;
    part(0, nq, Some(qg))
}

/// `mask[r, L] = 1` for every row of `mask` (`[B, cap]` f32, contiguous), `L = step[0]`;
/// nothing once `L >= cap`. A part of [`advance`]'s CPU path: on CUDA `advance_step` does it.
fn mark_key(mask: &Tensor, step: &Tensor) -> Result<()> {
    if mask.rank() != 2 || mask.dtype() != DType::F32 || !mask.is_contiguous() {
        candle_core::bail!(
            "mark_key: the mask {:?} {:?} is not a contiguous [B, cap] f32",
            mask.dims(),
            mask.dtype()
        );
    }
    check_step(step)?;
    mask.inplace_op2(step, &MarkKey)
}

/// The decode step's tail, in place: `ids = sampled`, every position `+ 1`, the cache length
/// and the draw index (`step`) `+ 1`, and `mask[r, L + 1] = 1` (the position the next step
/// writes; nothing past the capacity). `ids` and `sampled` are `[n]` u32, `positions`
/// `[n, 1]` u32, `mask` `[n, cap]` f32, all contiguous. One launch on CUDA; elsewhere the four
/// ops it stands for, in order.
pub fn advance(
    ids: &Tensor,
    sampled: &Tensor,
    positions: &Tensor,
    step: &Tensor,
    mask: &Tensor,
) -> Result<()> {
    let n = ids.elem_count();
    let u32_rows = |t: &Tensor| {
        t.dtype() == DType::U32
            && t.elem_count() == n
            && t.dim(0).ok() == Some(n)
            && t.is_contiguous()
    };
    let fits = ids.rank() == 1
        && [ids, sampled, positions].into_iter().all(u32_rows)
        && mask.rank() == 2
        && mask.dim(0)? == n
        && mask.dtype() == DType::F32
        && mask.is_contiguous();
    if !fits {
        candle_core::bail!(
            "advance: ids {:?}, sampled {:?}, positions {:?} and mask {:?} {:?} do not fit",
            ids.dims(),
            sampled.dims(),
            positions.dims(),
            mask.dims(),
            mask.dtype()
        );
    }
    check_step(step)?;
    // The path follows ids' device; the CPU ops would refuse a CUDA tensor only halfway.
    if [sampled, positions, step, mask]
        .iter()
        .any(|t| !t.device().same_device(ids.device()))
    {
        candle_core::bail!("advance: ids, sampled, positions, step and mask must share a device");
    }
    #[cfg(feature = "cuda")]
    if ids.device().is_cuda() {
        return super::cuda::decode_step::advance(ids, sampled, positions, step, mask);
    }
    ids.slice_set(sampled, 0, 0)?;
    increment(positions)?;
    increment(step)?;
    mark_key(mask, step)
}

/// Adds 1 to every element of `t` (u32 or i64, contiguous), in place. A part of
/// [`advance`]'s CPU path, as [`mark_key`].
fn increment(t: &Tensor) -> Result<()> {
    if !matches!(t.dtype(), DType::U32 | DType::I64) || !t.is_contiguous() {
        candle_core::bail!("increment: {:?} is not a contiguous u32 or i64", t.dtype());
    }
    t.inplace_op1(&Increment)
}

fn check_step(step: &Tensor) -> Result<()> {
    if step.dims() != [2] || step.dtype() != DType::I64 {
        candle_core::bail!("decode step: `step` {:?} is not [2] i64", step.dims());
    }
    Ok(())
}

/// `step[0]` as a position, `None` when it is outside `0..cap`.
fn position(step: &CpuStorage, l: &Layout, cap: usize) -> Result<Option<usize>> {
    let len = slice::<i64>(step, l)?[0];
    Ok(usize::try_from(len).ok().filter(|&p| p < cap))
}

struct KvWrite;

impl InplaceOp3 for KvWrite {
    fn name(&self) -> &'static str {
        "temper-kv-write"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        lc: &Layout,
        new: &CpuStorage,
        ln: &Layout,
        step: &CpuStorage,
        ls: &Layout,
    ) -> Result<()> {
        let &[_, _, cap, d] = lc.dims() else {
            candle_core::bail!("kv_write: cache {:?}", lc.dims());
        };
        let Some(pos) = position(step, ls, cap)? else {
            return Ok(());
        };
        let start = lc.start_offset();
        fn put<T: candle_core::WithDType>(
            dst: &mut [T],
            src: &[T],
            (start, cap, d, pos): (usize, usize, usize, usize),
        ) {
            for (r, row) in src.chunks(d.max(1)).enumerate() {
                let at = start + (r * cap + pos) * d;
                dst[at..at + row.len()].copy_from_slice(row);
            }
        }
        let geometry = (start, cap, d, pos);
        match cache {
            CpuStorage::F32(dst) => put(dst, slice::<f32>(new, ln)?, geometry),
            CpuStorage::BF16(dst) => put(dst, slice::<half::bf16>(new, ln)?, geometry),
            CpuStorage::F16(dst) => put(dst, slice::<half::f16>(new, ln)?, geometry),
            other => candle_core::bail!("kv_write: no CPU path for {:?}", other.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        lc: &Layout,
        new: &candle_core::CudaStorage,
        ln: &Layout,
        step: &candle_core::CudaStorage,
        ls: &Layout,
    ) -> Result<()> {
        super::cuda::decode_step::kv_write((cache, lc), (new, ln), (step, ls))
    }
}

struct MarkKey;

impl InplaceOp2 for MarkKey {
    fn name(&self) -> &'static str {
        "temper-mark-key"
    }

    fn cpu_fwd(
        &self,
        mask: &mut CpuStorage,
        lm: &Layout,
        step: &CpuStorage,
        ls: &Layout,
    ) -> Result<()> {
        let &[rows, cap] = lm.dims() else {
            candle_core::bail!("mark_key: mask {:?}", lm.dims());
        };
        let (CpuStorage::F32(m), Some(pos)) = (mask, position(step, ls, cap)?) else {
            return Ok(());
        };
        let start = lm.start_offset();
        for r in 0..rows {
            m[start + r * cap + pos] = 1.0;
        }
        Ok(())
    }
}

struct Increment;

impl InplaceOp1 for Increment {
    fn name(&self) -> &'static str {
        "temper-increment"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let n = l.shape().elem_count();
        let start = l.start_offset();
        match s {
            CpuStorage::U32(v) => v[start..start + n].iter_mut().for_each(|x| *x += 1),
            CpuStorage::I64(v) => v[start..start + n].iter_mut().for_each(|x| *x += 1),
            other => candle_core::bail!("increment: no CPU path for {:?}", other.dtype()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The step's tail: the sampled ids over the fed ones, positions and both step counters
    /// one on, the next position marked (none past the capacity); mismatched rows refused.
    #[test]
    fn advance_moves_the_whole_state_one_step() {
        let dev = Device::Cpu;
        let u32s = |v: &[u32], shape: &[usize]| Tensor::from_vec(v.to_vec(), shape, &dev).unwrap();
        for (len, marked) in [(1i64, Some(2usize)), (2, Some(3)), (3, None)] {
            let ids = u32s(&[7, 8], &[2]);
            let sampled = u32s(&[40, 41], &[2]);
            let positions = u32s(&[10, 12], &[2, 1]);
            let step = Tensor::new(&[len, 6], &dev).unwrap();
            let mask = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
            advance(&ids, &sampled, &positions, &step, &mask).unwrap();
            assert_eq!(ids.to_vec1::<u32>().unwrap(), [40, 41]);
            assert_eq!(
                positions.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
                [11, 13]
            );
            assert_eq!(step.to_vec1::<i64>().unwrap(), [len + 1, 7]);
            let mut want = vec![vec![0f32; 4]; 2];
            if let Some(p) = marked {
                want.iter_mut().for_each(|row| row[p] = 1.0);
            }
            assert_eq!(mask.to_vec2::<f32>().unwrap(), want, "L {len}");
        }
        let step = Tensor::new(&[0i64, 0], &dev).unwrap();
        let mask = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        let two = u32s(&[1, 2], &[2]);
        let err = advance(&two, &two, &u32s(&[1, 2], &[2, 1]), &step, &mask).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
    }

    #[test]
    fn the_step_writes_its_state_in_place() {
        let dev = Device::Cpu;
        let (b, h, cap, d) = (3, 2, 5, 4);
        let cache = Tensor::zeros((b, h, cap, d), DType::F32, &dev).unwrap();
        let new = Tensor::arange(1f32, (b * h * d + 1) as f32, &dev)
            .unwrap()
            .reshape((b, h, 1, d))
            .unwrap();
        let step = Tensor::new(&[2i64, 7], &dev).unwrap();
        kv_write(&cache, &new, &step).unwrap();
        let got = cache.narrow(2, 2, 1).unwrap();
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            new.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let total = cache.sum_all().unwrap().to_scalar::<f32>().unwrap();
        let want = new.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(total, want, "only position 2 is written");

        let mask = Tensor::zeros((b, cap), DType::F32, &dev).unwrap();
        increment(&step).unwrap();
        assert_eq!(step.to_vec1::<i64>().unwrap(), [3, 8]);
        mark_key(&mask, &step).unwrap();
        for row in mask.to_vec2::<f32>().unwrap() {
            assert_eq!(row, [0.0, 0.0, 0.0, 1.0, 0.0]);
        }
        let pos = Tensor::new(&[[4u32], [9]], &dev).unwrap();
        increment(&pos).unwrap();
        assert_eq!(pos.to_vec2::<u32>().unwrap(), [[5], [10]]);

        // Past the capacity nothing is written.
        let full = Tensor::new(&[5i64, 0], &dev).unwrap();
        let before = cache.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        kv_write(&cache, &new, &full).unwrap();
        mark_key(&mask, &full).unwrap();
        assert_eq!(
            cache.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            before
        );
        assert_eq!(mask.sum_all().unwrap().to_scalar::<f32>().unwrap(), 3.0);
    }

    /// The stacked split: q as the first columns, k and v at the device length as
    /// `kv_write` puts them; nothing written at or past the capacity; q and k rotated as the
    /// rope op rotates them when tables are given.
    #[test]
    fn qkv_write_splits_q_and_writes_k_and_v_at_the_length() {
        let dev = Device::Cpu;
        let (b, hq, hkv, cap, d) = (3, 4, 2, 5, 4);
        let (nq, nkv) = (hq * d, hkv * d);
        let y = Tensor::arange(0f32, (b * (nq + 2 * nkv)) as f32, &dev)
            .unwrap()
            .reshape((b, 1, nq + 2 * nkv))
            .unwrap();
        let caches = || {
            let z = || Tensor::zeros((b, hkv, cap, d), DType::F32, &dev).unwrap();
            (z(), z())
        };
        let (kc, vc) = caches();
        let step = Tensor::new(&[2i64, 0], &dev).unwrap();
        let q = qkv_write(&y, &kc, &vc, &step, nq, None, None).unwrap();
        let y2 = y.squeeze(1).unwrap();
        let part = |from: usize, n: usize, h: usize| {
            y2.narrow(1, from, n)
                .unwrap()
                .reshape((b, h, 1, d))
                .unwrap()
        };
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(q.dims(), [b, hq, 1, d]);
        assert_eq!(flat(&q), flat(&part(0, nq, hq)));
        let (kw, vw) = caches();
        kv_write(&kw, &part(nq, nkv, hkv), &step).unwrap();
        kv_write(&vw, &part(nq + nkv, nkv, hkv), &step).unwrap();
        assert_eq!(flat(&kc), flat(&kw));
        assert_eq!(flat(&vc), flat(&vw));
        assert!(flat(&kc).iter().any(|&x| x != 0.0));
        // At the capacity: q still comes out, the caches stay as they were.
        let full = Tensor::new(&[cap as i64, 0], &dev).unwrap();
        let (kc, vc) = caches();
        let q = qkv_write(&y, &kc, &vc, &full, nq, None, None).unwrap();
        assert_eq!(flat(&q), flat(&part(0, nq, hq)));
        assert!(flat(&kc).iter().chain(&flat(&vc)).all(|&x| x == 0.0));
        // A y that does not fit the caches is refused.
        assert!(qkv_write(
            &y.narrow(2, 0, nq + nkv).unwrap(),
            &kc,
            &vc,
            &step,
            nq,
            None,
            None
        )
        .is_err());
        // With rotary tables q and k come out rotated as the rope op rotates them, v not.
        let half = d / 2;
        let table = |f: fn(f32) -> f32| {
            let v: Vec<f32> = (0..b * half).map(|i| f(0.7 * i as f32 - 1.0)).collect();
            Tensor::from_vec(v, (b, 1, 1, half), &dev).unwrap()
        };
        let (cos, sin) = (table(f32::cos), table(f32::sin));
        let (kc, vc) = caches();
        let q = qkv_write(&y, &kc, &vc, &step, nq, Some((&cos, &sin)), None).unwrap();
        let rot = |t: Tensor| crate::kernels::rope::fused(&t, &cos, &sin).unwrap();
        assert_eq!(flat(&q), flat(&rot(part(0, nq, hq))));
        let (kw, vw) = caches();
        kv_write(&kw, &rot(part(nq, nkv, hkv)), &step).unwrap();
        kv_write(&vw, &part(nq + nkv, nkv, hkv), &step).unwrap();
        assert_eq!(flat(&kc), flat(&kw));
        assert_eq!(flat(&vc), flat(&vw));
        assert_ne!(
            flat(&q),
            flat(&part(0, nq, hq)),
            "the rotation did something"
        );
        // With head norms (Qwen3) q and k are normalised with their own gains, then rotated;
        // v is neither.
        let gains = |from: f32| Tensor::new(&[from, 0.5, -1.5, 2.0], &dev).unwrap();
        let (qg, kg) = (gains(1.25), gains(0.75));
        let eps = 1e-5;
        let norm = HeadNorm {
            q: &qg,
            k: &kg,
            eps,
            gain: Gain::AsIs,
        };
        let (kc, vc) = caches();
        let q = qkv_write(&y, &kc, &vc, &step, nq, Some((&cos, &sin)), Some(norm)).unwrap();
        let normed = |t: Tensor, g: &Tensor| {
            let t = crate::kernels::rmsnorm::rms_norm_reference(&t, g, eps).unwrap();
            rot(t)
        };
        assert_eq!(flat(&q), flat(&normed(part(0, nq, hq), &qg)));
        let (kw, vw) = caches();
        kv_write(&kw, &normed(part(nq, nkv, hkv), &kg), &step).unwrap();
        kv_write(&vw, &part(nq + nkv, nkv, hkv), &step).unwrap();
        assert_eq!(flat(&kc), flat(&kw));
        assert_eq!(flat(&vc), flat(&vw));
        // Without tables, one q head by hand: x / rms(x) * g.
        let q = qkv_write(&y, &kc, &vc, &step, nq, None, Some(norm)).unwrap();
        let head = flat(&q.narrow(1, 1, 1).unwrap().narrow(0, 2, 1).unwrap());
        let x = flat(
            &part(0, nq, hq)
                .narrow(1, 1, 1)
                .unwrap()
                .narrow(0, 2, 1)
                .unwrap(),
        );
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps as f32).sqrt();
        for ((got, x), g) in head.iter().zip(&x).zip(flat(&qg)) {
            assert!((got - x / rms * g).abs() < 1e-5, "{got} vs {}", x / rms * g);
        }
        // Gains of another length are refused.
        let short = Tensor::new(&[1f32, 1.0], &dev).unwrap();
        let bad = HeadNorm {
            q: &short,
            k: &kg,
            eps,
            gain: Gain::AsIs,
        };
        assert!(qkv_write(&y, &kc, &vc, &step, nq, None, Some(bad)).is_err());
        // Gemma's offsets: f32 weights w giving the gains 1 + w, as the norm of Gain::PlusOne;
        // offsets in another dtype are refused.
        let norm = HeadNorm {
            gain: Gain::PlusOne,
            ..norm
        };
        let (kc, vc) = caches();
        let q = qkv_write(&y, &kc, &vc, &step, nq, Some((&cos, &sin)), Some(norm)).unwrap();
        let plus_one = |t: Tensor, w: &Tensor| {
            let g = Gain::PlusOne.of(w).unwrap();
            rot(crate::kernels::rmsnorm::rms_norm_reference(&t, &g, eps).unwrap())
        };
        assert_eq!(flat(&q), flat(&plus_one(part(0, nq, hq), &qg)));
        assert_ne!(
            flat(&q),
            flat(&normed(part(0, nq, hq), &qg)),
            "the offset applied"
        );
        let (kw, _) = caches();
        kv_write(&kw, &plus_one(part(nq, nkv, hkv), &kg), &step).unwrap();
        assert_eq!(flat(&kc), flat(&kw));
        let (qh, kh) = (
            qg.to_dtype(DType::F16).unwrap(),
            kg.to_dtype(DType::F16).unwrap(),
        );
        let half_offsets = HeadNorm {
            q: &qh,
            k: &kh,
            ..norm
        };
        assert!(qkv_write(&y, &kc, &vc, &step, nq, None, Some(half_offsets)).is_err());
    }
}
