//! A rollout still being trained on, kept in a checkpoint. PPO and GRPO train several
//! optimizer steps on one rollout where its minibatches are smaller than it (or it has more
//! than one epoch); a checkpoint taken between two of them, on schedule or at a preemption,
//! holds the rest of the rollout, so the resumed run trains on exactly what an uninterrupted
//! one would have.
//!
//! Under data parallelism every rank holds its own share of the rollout. Each is gathered on
//! rank 0 at the checkpoint ([`Unfinished::gather`]), which writes one file per rank,
//! `rollout.rank-R.safetensors`, and `rollout.json` naming them and the number of ranks. A
//! checkpoint missing a file it names is damaged (`train::checkpoint::damage`); a resume on
//! another number of ranks cannot split the shares again, and samples a new rollout.
//!
//! A share's file holds the rollout's tensors as they are (their dtype and bits), and its host
//! part as JSON in a `u8` tensor beside them. Floating-point numbers in the JSON are written
//! as their bits: a response no reward scored is NaN, which JSON has no word for.

use std::collections::{HashMap, VecDeque};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{Buffer, Rollout, Schedule};
use crate::dist::bytes::gather_on_root;
use crate::dist::Communicator;
use crate::stages::rollout_packing::RolloutDocs;
use crate::train::checkpoint::{LIST as MANIFEST, LISTED};

/// What [`MANIFEST`] holds.
#[derive(Serialize, Deserialize)]
struct Manifest {
    /// The ranks that held the rollout: a resume on as many reads it back.
    world: usize,
    /// Each rank's share, in rank order.
    files: Vec<String>,
}

fn share_file(rank: usize) -> String {
    format!("{LISTED}{rank}.safetensors")
}

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
    /// How they were cut: a resume that cuts rollouts otherwise samples a new one.
    plan: Schedule,
}

fn bits(x: &[f64]) -> Vec<u64> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn floats(x: &[u64]) -> Vec<f64> {
    x.iter().map(|&b| f64::from_bits(b)).collect()
}

impl<X: Extra> Buffer<X> {
    /// The rollout and the minibatches still to come, as a safetensors file's bytes.
    fn to_bytes(&self) -> Result<Vec<u8>> {
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
            plan: self.plan.clone(),
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
        Ok(safetensors::serialize(&map, None)?)
    }

    /// What [`Buffer::to_bytes`] wrote, read back onto `dev`; `path` names it in errors.
    fn from_bytes(bytes: &[u8], dev: &Device, path: String) -> Result<Self> {
        let map = candle_core::safetensors::load_buffer(bytes, dev)
            .with_context(|| format!("{path}: cannot read"))?;
        let mut t = Tensors { map, path };
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
            bail!("{}: minibatch row {i} of a rollout of {rows}", t.path);
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
        Ok(Self {
            ro,
            adv,
            loss_mask,
            batches: h
                .batches
                .into_iter()
                .map(|(rows, norm)| (rows, f64::from_bits(norm)))
                .collect::<VecDeque<_>>(),
            plan: h.plan,
            extra: X::from_tensors(&mut extras)?,
        })
    }
}

/// Every rank's unfinished rollout, serialised and gathered on rank 0 for its checkpoint; none
/// between rollouts.
#[derive(Default)]
pub struct Unfinished(Option<Vec<Vec<u8>>>);

impl Unfinished {
    /// Collective: every rank calls it before every checkpoint. The ranks' buffers are spent
    /// alike (each trains the same number of minibatches on its share).
    pub fn gather<X: Extra>(buffer: Option<&Buffer<X>>, comm: &dyn Communicator) -> Result<Self> {
        let mine = match buffer.filter(|b| !b.is_spent()) {
            Some(b) => b.to_bytes()?,
            None => vec![],
        };
        Ok(Self(gather_on_root(comm, mine)?))
    }

    /// Writes the shares and their manifest into checkpoint `dir` (rank 0's call).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let Some(shares) = self.0.as_ref().filter(|s| s.iter().any(|b| !b.is_empty())) else {
            return Ok(());
        };
        if let Some(r) = shares.iter().position(Vec::is_empty) {
            bail!("rank {r} had trained on all of its rollout where another had not");
        }
        let files: Vec<String> = (0..shares.len()).map(share_file).collect();
        for (f, b) in files.iter().zip(shares) {
            let path = dir.join(f);
            std::fs::write(&path, b)
                .with_context(|| format!("{}: cannot write", path.display()))?;
        }
        let m = Manifest {
            world: shares.len(),
            files,
        };
        let path = dir.join(MANIFEST);
        std::fs::write(&path, serde_json::to_vec_pretty(&m)?)
            .with_context(|| format!("{}: cannot write", path.display()))
    }
}

/// This rank's share of the rollout checkpoint `dir` holds, on `dev`; None where it holds
/// none (taken between rollouts), or where this run cannot go on with it: written by another
/// number of ranks, or cut into minibatches otherwise than `plan` cuts them (a resume that
/// changed `grad_accum`, say, whose DAPO normalisers the kept ones are not). Then the run
/// samples a new rollout, and rank 0 says that it leaves the curve.
pub fn read_unfinished<X: Extra>(
    dir: &Path,
    dev: &Device,
    comm: &dyn Communicator,
    (stage, plan): (&str, &Schedule),
) -> Result<Option<Buffer<X>>> {
    let leave = |why: String| {
        if comm.rank() == 0 {
            errln!(
                "[{stage}] {} holds the rest of a rollout {why}: the run samples a new rollout \
                 instead, so it will not follow the curve of an uninterrupted run exactly",
                dir.display()
            );
        }
        Ok(None)
    };
    let path = dir.join(MANIFEST);
    if !path.is_file() {
        return Ok(None);
    }
    let m: Manifest = std::fs::read(&path)
        .map_err(anyhow::Error::from)
        .and_then(|b| Ok(serde_json::from_slice(&b)?))
        .with_context(|| format!("{}: cannot read", path.display()))?;
    // A manifest that parses but lists other files than its ranks' shares is damaged, not a
    // rollout of other ranks: the checkpoint is set aside, as one with a truncated share is.
    let named: Vec<String> = (0..m.world).map(share_file).collect();
    if m.world == 0 || m.files != named {
        let listed = match m.files.is_empty() {
            true => "no share".to_string(),
            false => m.files.join(", "),
        };
        bail!(
            "{}: malformed: it lists {listed} for a rollout of {} rank(s)",
            path.display(),
            m.world
        );
    }
    if m.world != comm.world() {
        let ranks = comm.world();
        return leave(format!(
            "{} rank(s) were training on, and this run has {ranks}",
            m.world
        ));
    }
    let f = dir.join(&m.files[comm.rank()]);
    let bytes = std::fs::read(&f).with_context(|| format!("{}: cannot read", f.display()))?;
    let buf = Buffer::from_bytes(&bytes, dev, f.display().to_string())?;
    // Every rank's share was cut by the same plan, so the ranks leave theirs alike.
    if buf.plan != *plan {
        return leave(format!("cut as {}, where this run cuts {plan}", buf.plan));
    }
    Ok(Some(buf))
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
        let mut back =
            Buffer::<Two>::from_bytes(&buf.to_bytes().unwrap(), &dev, "f".into()).unwrap();
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

    /// Through a checkpoint directory: one with no manifest holds no rollout; a spent buffer
    /// writes none; a buffer without a reference's log-probabilities reads back without them;
    /// a run that cuts rollouts otherwise, or a manifest of two ranks on one, leaves it; a
    /// file that misses a tensor, or a manifest that lists no share, is refused, naming the
    /// file.
    #[test]
    fn a_checkpoint_keeps_a_rollout_only_while_it_has_minibatches_left() {
        use crate::dist::Solo;
        let dev = Device::Cpu;
        let mut ro = rollout(&dev);
        ro.ref_logprobs = None;
        ro.packed = None;
        let adv = ro.mask.clone();
        let plan = Schedule {
            epochs: 1,
            minibatch_size: 3,
            grad_accum: 1,
            mask_truncated: false,
        };
        let mut buf = Buffer::new(ro, adv, (), &plan, &mut Rng::new(1)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (d, solo) = (dir.path(), &Solo);
        let read = |d: &Path| read_unfinished::<()>(d, &dev, solo, ("grpo", &plan)).unwrap();
        assert!(read(d).is_none());
        buf.next_batch().unwrap();
        Unfinished::gather(Some(&buf), solo)
            .unwrap()
            .write(d)
            .unwrap();
        let back = read(d).expect("one minibatch left");
        assert!(back.ro.ref_logprobs.is_none() && back.ro.packed.is_none());
        assert!(d.join("rollout.rank-0.safetensors").is_file());
        let other = Schedule {
            grad_accum: 2,
            ..plan.clone()
        };
        let cut_otherwise = read_unfinished::<()>(d, &dev, solo, ("grpo", &other)).unwrap();
        assert!(cut_otherwise.is_none(), "another grad_accum's normalisers");
        let e = read_unfinished::<Two>(d, &dev, solo, ("ppo", &plan))
            .err()
            .expect("no values in the file")
            .to_string();
        assert!(
            e.contains("rollout.rank-0.safetensors") && e.contains("no tensor `values`"),
            "{e}"
        );
        let m = Manifest {
            world: 2,
            files: vec![share_file(0), share_file(1)],
        };
        std::fs::write(d.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(read(d).is_none(), "written by two ranks, read by one");
        // A manifest that parses but lists no share is damaged, not another world's rollout.
        std::fs::write(d.join(MANIFEST), r#"{"world":1,"files":[]}"#).unwrap();
        let e = read_unfinished::<()>(d, &dev, solo, ("grpo", &plan))
            .err()
            .expect("a manifest without its share")
            .to_string();
        assert!(
            e.contains("rollout.json: malformed: it lists no share for a rollout of 1 rank(s)"),
            "{e}"
        );

        buf.next_batch().unwrap();
        let spent = tempfile::tempdir().unwrap();
        Unfinished::gather(Some(&buf), solo)
            .unwrap()
            .write(spent.path())
            .unwrap();
        assert_eq!(std::fs::read_dir(spent.path()).unwrap().count(), 0);
    }
}
