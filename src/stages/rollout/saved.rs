//! A rollout still being trained on, kept in a checkpoint. PPO and GRPO train several
//! optimizer steps on one rollout where its minibatches are smaller than it (or it has more
//! than one epoch); a checkpoint taken between two of them, on schedule or at a preemption,
//! holds the rest of the rollout, so the resumed run trains on exactly what an uninterrupted
//! one would have.
//!
//! One file, `rollout.safetensors`: the rollout's tensors as they are (their dtype and bits),
//! and its host part as JSON in a `u8` tensor beside them. One file is whole or damaged as one
//! (a checkpoint's damage check reads every safetensors' length), never half of a pair.
//! Floating-point numbers in the JSON are written as their bits: a response no reward scored
//! is NaN, which JSON has no word for.

use std::collections::{HashMap, VecDeque};
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{Buffer, Rollout};
use crate::dist::Communicator;
use crate::stages::rollout_packing::RolloutDocs;

/// The file a checkpoint keeps an unfinished rollout in.
pub const FILE: &str = "rollout.safetensors";

const HOST: &str = "host_json";

/// What a stage keeps per rollout beyond the rollout itself, as named tensors.
pub trait Extra: Sized {
    fn tensors(&self) -> Vec<(&'static str, Tensor)>;
    /// Takes back what [`Extra::tensors`] named.
    fn from_tensors(t: &mut Tensors) -> Result<Self>;
}

impl Extra for () {
    fn tensors(&self) -> Vec<(&'static str, Tensor)> {
        vec![]
    }

    fn from_tensors(_: &mut Tensors) -> Result<Self> {
        Ok(())
    }
}

/// The tensors a rollout file holds, taken out by name.
pub struct Tensors {
    map: HashMap<String, Tensor>,
    path: String,
}

impl Tensors {
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        self.map
            .remove(name)
            .ok_or_else(|| anyhow!("{}: no tensor `{name}`", self.path))
    }

    fn take_opt(&mut self, name: &str) -> Option<Tensor> {
        self.map.remove(name)
    }
}

/// The rollout's and its schedule's numbers and text.
#[derive(Serialize, Deserialize)]
struct Host {
    prompt_cols: usize,
    resp_len: usize,
    temperature: u64,
    scores: Vec<u64>,
    scores_by_source: Vec<(String, Vec<u64>)>,
    texts: Vec<String>,
    finished: Vec<bool>,
    lengths: Vec<usize>,
    prompt_lens: Vec<usize>,
    packed: Option<RolloutDocs>,
    /// The minibatches still to train on: their rows and DAPO normalisers.
    batches: Vec<(Vec<usize>, u64)>,
}

fn bits(x: &[f64]) -> Vec<u64> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn floats(x: &[u64]) -> Vec<f64> {
    x.iter().map(|&b| f64::from_bits(b)).collect()
}

impl<X: Extra> Buffer<X> {
    /// Writes the rollout and the minibatches still to come into checkpoint `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let ro = &self.ro;
        let host = Host {
            prompt_cols: ro.prompt_cols,
            resp_len: ro.resp_len,
            temperature: ro.temperature.to_bits(),
            scores: bits(&ro.scores),
            scores_by_source: ro
                .scores_by_source
                .iter()
                .map(|(n, s)| (n.clone(), bits(s)))
                .collect(),
            texts: ro.texts.clone(),
            finished: ro.finished.clone(),
            lengths: ro.lengths.clone(),
            prompt_lens: ro.prompt_lens.clone(),
            packed: ro.packed.clone(),
            batches: self
                .batches
                .iter()
                .map(|(rows, norm)| (rows.clone(), norm.to_bits()))
                .collect(),
        };
        let json = serde_json::to_vec(&host)?;
        let n = json.len();
        let mut map: HashMap<String, Tensor> = HashMap::new();
        map.insert(HOST.into(), Tensor::from_vec(json, n, &Device::Cpu)?);
        let mut put = |name: &str, t: &Tensor| {
            map.insert(name.to_string(), t.clone());
        };
        put("ids", &ro.ids);
        put("key_valid", &ro.key_valid);
        put("positions", &ro.positions);
        put("resp_tokens", &ro.resp_tokens);
        put("mask", &ro.mask);
        put("old_logprobs", &ro.old_logprobs);
        if let Some(r) = &ro.ref_logprobs {
            put("ref_logprobs", r);
        }
        put("adv", &self.adv);
        put("loss_mask", &self.loss_mask);
        for (name, t) in self.extra.tensors() {
            put(&format!("extra.{name}"), &t);
        }
        let path = dir.join(FILE);
        candle_core::safetensors::save(&map, &path)
            .with_context(|| format!("{}: cannot write", path.display()))
    }

    /// The rollout checkpoint `dir` holds, on `dev`; None where it holds none (it was taken
    /// between rollouts).
    pub fn read(dir: &Path, dev: &Device) -> Result<Option<Self>> {
        let path = dir.join(FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let shown = path.display().to_string();
        let map = candle_core::safetensors::load(&path, dev)
            .with_context(|| format!("{shown}: cannot read"))?;
        let mut t = Tensors { map, path: shown };
        let json = t.take(HOST)?.to_vec1::<u8>()?;
        let h: Host =
            serde_json::from_slice(&json).with_context(|| format!("{}: malformed", t.path))?;
        let ro = Rollout {
            ids: t.take("ids")?,
            key_valid: t.take("key_valid")?,
            positions: t.take("positions")?,
            prompt_cols: h.prompt_cols,
            resp_len: h.resp_len,
            resp_tokens: t.take("resp_tokens")?,
            mask: t.take("mask")?,
            old_logprobs: t.take("old_logprobs")?,
            ref_logprobs: t.take_opt("ref_logprobs"),
            temperature: f64::from_bits(h.temperature),
            scores: floats(&h.scores),
            scores_by_source: h
                .scores_by_source
                .iter()
                .map(|(n, s)| (n.clone(), floats(s)))
                .collect(),
            texts: h.texts,
            finished: h.finished,
            lengths: h.lengths,
            prompt_lens: h.prompt_lens,
            packed: h.packed,
        };
        let rows = ro.lengths.len();
        if let Some(i) = h.batches.iter().flat_map(|(r, _)| r).find(|&&i| i >= rows) {
            anyhow::bail!("{}: minibatch row {i} of a rollout of {rows}", t.path);
        }
        let adv = t.take("adv")?;
        let loss_mask = t.take("loss_mask")?;
        let mut extras = Tensors {
            map: t
                .map
                .drain()
                .filter_map(|(k, v)| Some((k.strip_prefix("extra.")?.to_string(), v)))
                .collect(),
            path: t.path.clone(),
        };
        Ok(Some(Self {
            ro,
            adv,
            loss_mask,
            batches: h
                .batches
                .into_iter()
                .map(|(rows, norm)| (rows, f64::from_bits(norm)))
                .collect::<VecDeque<_>>(),
            extra: X::from_tensors(&mut extras)?,
        }))
    }
}

/// Whether a checkpoint taken now resumes exactly: between rollouts, or anywhere in a
/// single process, whose checkpoint keeps the rollout. Under data parallelism each rank holds
/// its own share of the rollout, which rank 0's checkpoint does not, so there a checkpoint
/// that falls due mid-rollout waits for the rollout's end.
pub fn resumable_now<X>(buffer: Option<&Buffer<X>>, comm: &dyn Communicator) -> bool {
    comm.world() == 1 || buffer.is_none_or(Buffer::is_spent)
}

/// Writes the rollout still being trained on, if any, into checkpoint `dir`.
pub fn write_unfinished<X: Extra>(
    buffer: Option<&Buffer<X>>,
    comm: &dyn Communicator,
    dir: &Path,
) -> Result<()> {
    match buffer.filter(|b| !b.is_spent() && comm.world() == 1) {
        Some(b) => b.write(dir),
        None => Ok(()),
    }
}

/// The rollout checkpoint `dir` holds, if any. Over several ranks, one a single process
/// wrote is left: a rank would need its share of the rows, and the minibatches are the whole
/// rollout's, so the run samples a new rollout and says that it leaves the curve.
pub fn read_unfinished<X: Extra>(
    dir: &Path,
    dev: &Device,
    comm: &dyn Communicator,
    stage: &str,
) -> Result<Option<Buffer<X>>> {
    if comm.world() == 1 {
        return Buffer::read(dir, dev);
    }
    if dir.join(FILE).is_file() && comm.rank() == 0 {
        errln!(
            "[{stage}] {} holds the rest of a rollout one process was training on; over {} \
             ranks the run samples a new rollout instead, so it will not follow the curve of \
             an uninterrupted run exactly",
            dir.display(),
            comm.world()
        );
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::rollout::Schedule;
    use crate::train::rng::Rng;
    use candle_core::DType;

    struct Two(Tensor);

    impl Extra for Two {
        fn tensors(&self) -> Vec<(&'static str, Tensor)> {
            vec![("values", self.0.clone())]
        }

        fn from_tensors(t: &mut Tensors) -> Result<Self> {
            Ok(Self(t.take("values")?))
        }
    }

    fn rollout(dev: &Device) -> Rollout {
        let (b, r) = (5, 3);
        let f = |k: f32| Tensor::arange(0f32, (b * r) as f32, dev).unwrap() * f64::from(k);
        let f = |k: f32| f(k).unwrap().reshape((b, r)).unwrap();
        Rollout {
            ids: Tensor::arange(0u32, (b * (r + 2)) as u32, dev)
                .unwrap()
                .reshape((b, r + 2))
                .unwrap(),
            key_valid: Tensor::ones((b, r + 2), DType::F32, dev).unwrap(),
            positions: Tensor::zeros((b, r + 2), DType::U32, dev).unwrap(),
            prompt_cols: 2,
            resp_len: r,
            resp_tokens: Tensor::ones((b, r), DType::U32, dev).unwrap(),
            mask: f(0.5),
            old_logprobs: f(-0.1),
            ref_logprobs: Some(f(-0.3)),
            temperature: 0.7,
            scores: vec![1.0, f64::NAN, 0.1 + 0.2, -0.0, 3.0],
            scores_by_source: vec![("len".into(), vec![f64::NAN, 1.0, 2.0, 3.0, 1e-300])],
            texts: ["a", "b\n\"c\"", "", "é", "e"].map(String::from).to_vec(),
            finished: vec![true, false, true, true, false],
            lengths: vec![3, 1, 2, 0, 3],
            prompt_lens: vec![2, 1, 2, 2, 1],
            packed: Some(
                RolloutDocs::new(
                    &[vec![1, 2], vec![3], vec![4, 5], vec![6, 7], vec![8]],
                    &[vec![9, 9, 9], vec![9], vec![9, 9], vec![], vec![9, 9, 9]],
                    0,
                )
                .unwrap(),
            ),
        }
    }

    fn same(a: &Tensor, b: &Tensor) {
        assert_eq!(a.dtype(), b.dtype());
        assert_eq!(a.dims(), b.dims());
        let (a, b) = (
            a.flatten_all().unwrap().to_dtype(DType::F64).unwrap(),
            b.flatten_all().unwrap().to_dtype(DType::F64).unwrap(),
        );
        let (a, b) = (a.to_vec1::<f64>().unwrap(), b.to_vec1::<f64>().unwrap());
        assert_eq!(bits(&a), bits(&b));
    }

    /// A buffer part-trained, written and read back, holds the same rollout to the bit (NaN
    /// scores, the packing's documents and the text included) and the same minibatches still
    /// to come, in their order, with their normalisers.
    #[test]
    fn an_unfinished_rollout_reads_back_as_it_was_written() {
        let dev = Device::Cpu;
        let ro = rollout(&dev);
        let adv = ro.old_logprobs.affine(3.0, 0.25).unwrap();
        let values = ro.mask.affine(-1.0, 0.5).unwrap();
        let plan = Schedule {
            epochs: 2,
            minibatch_size: 2,
            grad_accum: 1,
            mask_truncated: true,
        };
        let mut buf = Buffer::new(ro, adv, Two(values), &plan, &mut Rng::new(7)).unwrap();
        buf.next_batch().unwrap();
        let dir = tempfile::tempdir().unwrap();
        buf.write(dir.path()).unwrap();
        let mut back = Buffer::<Two>::read(dir.path(), &dev).unwrap().unwrap();
        let (a, b) = (&buf.ro, &back.ro);
        for (x, y) in [
            (&a.ids, &b.ids),
            (&a.key_valid, &b.key_valid),
            (&a.positions, &b.positions),
            (&a.resp_tokens, &b.resp_tokens),
            (&a.mask, &b.mask),
            (&a.old_logprobs, &b.old_logprobs),
            (
                a.ref_logprobs.as_ref().unwrap(),
                b.ref_logprobs.as_ref().unwrap(),
            ),
            (&buf.adv, &back.adv),
            (&buf.loss_mask, &back.loss_mask),
            (&buf.extra.0, &back.extra.0),
        ] {
            same(x, y);
        }
        assert_eq!((a.prompt_cols, a.resp_len), (b.prompt_cols, b.resp_len));
        assert_eq!(a.temperature.to_bits(), b.temperature.to_bits());
        assert_eq!(bits(&a.scores), bits(&b.scores));
        assert_eq!(a.scores_by_source.len(), 1);
        assert_eq!(a.scores_by_source[0].0, b.scores_by_source[0].0);
        assert_eq!(
            bits(&a.scores_by_source[0].1),
            bits(&b.scores_by_source[0].1)
        );
        assert_eq!(a.texts, b.texts);
        assert_eq!(a.finished, b.finished);
        assert_eq!(a.lengths, b.lengths);
        assert_eq!(a.prompt_lens, b.prompt_lens);
        assert_eq!(
            format!("{:?}", a.packed),
            format!("{:?}", b.packed),
            "the packing's documents"
        );
        // Five rows in minibatches of 2 over two epochs: 6, one trained before the write.
        let mut left = 0;
        while let Some((rows, norm)) = buf.next_batch() {
            let (r2, n2) = back.next_batch().expect("as many minibatches");
            assert_eq!((rows, norm.to_bits()), (r2, n2.to_bits()));
            left += 1;
        }
        assert_eq!(left, 5);
        assert!(back.is_spent());
    }

    /// A buffer without a reference's log-probabilities reads back without them; a
    /// checkpoint with no rollout file holds none; a file that misses a tensor is refused,
    /// naming the file and the tensor.
    #[test]
    fn what_a_rollout_file_lacks_reads_back_as_lacking() {
        let dev = Device::Cpu;
        let mut ro = rollout(&dev);
        ro.ref_logprobs = None;
        ro.packed = None;
        let adv = ro.mask.clone();
        let plan = Schedule {
            epochs: 1,
            minibatch_size: 5,
            grad_accum: 1,
            mask_truncated: false,
        };
        let buf = Buffer::new(ro, adv, (), &plan, &mut Rng::new(1)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        assert!(Buffer::<()>::read(dir.path(), &dev).unwrap().is_none());
        buf.write(dir.path()).unwrap();
        let back = Buffer::<()>::read(dir.path(), &dev).unwrap().unwrap();
        assert!(back.ro.ref_logprobs.is_none() && back.ro.packed.is_none());
        let e = Buffer::<Two>::read(dir.path(), &dev)
            .err()
            .expect("no values in the file")
            .to_string();
        assert!(
            e.contains("rollout.safetensors") && e.contains("no tensor `values`"),
            "{e}"
        );
    }
}
