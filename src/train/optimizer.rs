//! AdamW with decoupled weight decay over f32 master weights, global-norm gradient clipping,
//! and state that saves to and loads from safetensors. Under data parallelism the moments
//! can be sharded (ZeRO stage 1): each parameter has one owning rank, which alone keeps its
//! moments and updates it, and then sends the new weights to the others.
//!
//! With a bf16 compute dtype the optimizer can keep each weight's **compute copy**
//! ([`AdamW::keep_compute_copies`]): a persistent bf16 variable that the forward reads in place
//! of casting the master (see `model::cast`), that the backward leaves the gradient on, and
//! that the update rewrites in the same pass as the master. This is the mixed-precision layout
//! of apex's O2 and DeepSpeed: f32 masters in the optimizer, bf16 weights in the model.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{backprop::GradStore, DType, Tensor, Var};

use super::params::{save_tensors, ParamInfo, ParamStore};
use crate::config::TrainConfig;
use crate::dist::Communicator;
use crate::kernels::adamw::{self, Hyper, Slot};
use crate::kernels::KernelChoice;

pub struct AdamW {
    names: Vec<String>,
    infos: Vec<ParamInfo>,
    vars: Vec<Var>,
    decay: Vec<bool>,
    lr_scale: Vec<f64>,
    /// Each parameter's compute copy, when [`keep_compute_copies`](Self::keep_compute_copies)
    /// made them (on every rank: the forward reads them all).
    copies: Vec<Option<Var>>,
    /// The moments, on the rank that owns the parameter (all of them when unsharded).
    m: Vec<Option<Tensor>>,
    v: Vec<Option<Tensor>>,
    /// Each parameter's owning rank; all 0 when unsharded.
    owner: Vec<usize>,
    rank: usize,
    world: usize,
    pub t: usize,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    pub fn new(
        store: &ParamStore,
        trainable: &dyn Fn(ParamInfo) -> bool,
        cfg: &TrainConfig,
    ) -> Result<Self> {
        let mut s = Self {
            names: vec![],
            infos: vec![],
            vars: vec![],
            decay: vec![],
            lr_scale: vec![],
            copies: vec![],
            m: vec![],
            v: vec![],
            owner: vec![],
            rank: 0,
            world: 1,
            t: 0,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.adam_eps,
            weight_decay: cfg.weight_decay,
        };
        for (name, var, info) in store.iter().filter(|(_, _, i)| trainable(*i) && !i.frozen) {
            s.names.push(name.clone());
            s.vars.push(var.clone());
            s.decay.push(info.decay);
            s.lr_scale.push(1.0);
            s.infos.push(info);
            s.copies.push(None);
            s.m.push(Some(var.zeros_like()?));
            s.v.push(Some(var.zeros_like()?));
            s.owner.push(0);
        }
        if s.vars.is_empty() {
            bail!("no trainable parameters");
        }
        Ok(s)
    }

    /// From now on the forward reads each trainable weight as a persistent copy in `dtype`
    /// (bf16) that every update rewrites, rather than casting the f32 master in every step.
    /// Call it after the masters are loaded: from then on nothing but this optimizer may
    /// write them, or the forward would read stale copies. Other dtypes keep the cast.
    pub fn keep_compute_copies(&mut self, dtype: DType) -> Result<()> {
        if dtype != DType::BF16 {
            return Ok(());
        }
        for (slot, var) in self.copies.iter_mut().zip(&self.vars) {
            if slot.is_none() {
                let copy = Var::from_tensor(&var.as_tensor().to_dtype(dtype)?)?;
                crate::model::cast::register_copy(var.as_tensor(), copy.as_tensor());
                *slot = Some(copy);
            }
        }
        Ok(())
    }

    /// Rewrites parameter `i`'s compute copy from its master.
    fn refresh_copy(&self, i: usize) -> Result<()> {
        if let Some(c) = &self.copies[i] {
            c.set(&self.vars[i].as_tensor().to_dtype(c.dtype())?)?;
        }
        Ok(())
    }

    /// Sets each parameter's learning-rate multiplier.
    pub fn scale_lr(&mut self, scale: &dyn Fn(ParamInfo) -> f64) {
        for (s, info) in self.lr_scale.iter_mut().zip(&self.infos) {
            *s = scale(*info);
        }
    }

    pub fn num_params(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// Keeps only this rank's share of the moments: whole parameters, each given to the rank
    /// with the fewest elements so far, largest first, so the shares come out even.
    pub fn shard(&mut self, rank: usize, world: usize) {
        let mut order: Vec<usize> = (0..self.vars.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(self.vars[i].elem_count()));
        let mut load = vec![0usize; world];
        for i in order {
            let r = (0..world).min_by_key(|&r| load[r]).unwrap_or(0);
            load[r] += self.vars[i].elem_count();
            self.owner[i] = r;
        }
        (self.rank, self.world) = (rank, world);
        for i in 0..self.vars.len() {
            if self.owner[i] != rank {
                self.m[i] = None;
                self.v[i] = None;
            }
        }
    }

    pub fn sharded(&self) -> bool {
        self.world > 1
    }

    /// Parameters whose moments this rank keeps.
    pub fn owned_params(&self) -> usize {
        (0..self.vars.len())
            .filter(|&i| self.m[i].is_some())
            .map(|i| self.vars[i].elem_count())
            .sum()
    }

    fn owned_by(&self, rank: usize) -> Vec<usize> {
        (0..self.vars.len())
            .filter(|&i| self.owner[i] == rank)
            .collect()
    }

    /// After a sharded step, every rank gets the weights their owners updated.
    pub fn sync_weights(&self, comm: &dyn Communicator) -> Result<()> {
        if !self.sharded() {
            return Ok(());
        }
        for r in 0..self.world {
            let idx = self.owned_by(r);
            let mut ts: Vec<Tensor> = idx
                .iter()
                .map(|&i| self.vars[i].as_tensor().clone())
                .collect();
            comm.broadcast_tensors(r, &mut ts)?;
            if r != self.rank {
                for (&i, t) in idx.iter().zip(&ts) {
                    self.vars[i].set(t)?;
                    self.refresh_copy(i)?;
                }
            }
        }
        Ok(())
    }
    /// The gradient of every trainable parameter (zeros for one the loss did not reach): its
    /// compute copy's in bf16 when only the copy got one (the update reads it as it is), the
    /// master's in f32 when only the master did (an op that reads the f32 master itself: the
    /// embedding lookup, LayerNorm, the bias kernels), and their sum in f32 when both did (a
    /// tied embedding).
    ///
    /// A copy that got no gradient was not read, and is dropped: the forward reads those
    /// weights as f32 masters, and keeping their copies would cost a rewrite every step and
    /// their memory (an untied embedding table, in bf16) for nothing. Should a dropped weight
    /// be read through `model::cast::weight` later, it is cast there, as without copies.
    pub fn collect(&mut self, grads: &GradStore) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(self.vars.len());
        for (v, c) in self.vars.iter().zip(self.copies.iter_mut()) {
            let master = grads.get(v.as_tensor());
            let copy = c.as_ref().and_then(|c| grads.get(c.as_tensor()));
            if let (Some(unread), None) = (c.as_ref(), copy) {
                crate::model::cast::unregister_copy(v.as_tensor(), unread.as_tensor());
                *c = None;
            }
            out.push(match (master, copy) {
                (Some(g), None) | (None, Some(g)) => g.clone(),
                (Some(g), Some(gc)) => (g + gc.to_dtype(DType::F32)?)?,
                (None, None) => v.zeros_like()?,
            });
        }
        Ok(out)
    }

    /// How many parameter tensors this optimizer trains.
    pub fn num_tensors(&self) -> usize {
        self.vars.len()
    }

    /// How many weights the forward reads as compute copies.
    pub fn compute_copies(&self) -> usize {
        self.copies.iter().flatten().count()
    }

    /// One step: the global norm of `grads` (every parameter's, owned or not), clipping to
    /// `max_norm` (0: none), and AdamW on the parameters this rank owns (all of them when
    /// unsharded), by `kernel`'s implementation. Returns the norm before clipping.
    pub fn update(
        &mut self,
        grads: &[Tensor],
        lr: f64,
        max_norm: f64,
        kernel: KernelChoice,
    ) -> Result<f64> {
        self.t += 1;
        let h = Hyper {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            t: self.t,
            max_norm,
        };
        let mut slots = vec![];
        for (i, (m, v)) in self.m.iter_mut().zip(self.v.iter_mut()).enumerate() {
            let (Some(m), Some(v)) = (m.as_mut(), v.as_mut()) else {
                continue;
            };
            slots.push(Slot {
                param: &self.vars[i],
                m,
                v,
                grad: &grads[i],
                copy: self.copies[i].as_ref(),
                lr: lr * self.lr_scale[i],
                weight_decay: match self.decay[i] {
                    true => self.weight_decay,
                    false => 0.0,
                },
            });
        }
        adamw::update(grads, &mut slots, &h, kernel)
    }

    /// [`update`](Self::update) without clipping, by the reference.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.update(grads, lr, 0.0, KernelChoice::Reference)
            .map(|_| ())
    }

    /// Every moment, by name, gathered on rank 0 (`None` on the others); every rank must
    /// call it. A checkpoint holds the whole state whatever the sharding, so it resumes on
    /// any number of ranks.
    pub fn gather_state(&self, comm: &dyn Communicator) -> Result<Option<HashMap<String, Tensor>>> {
        let main = comm.rank() == 0;
        let mut map = HashMap::new();
        for r in 0..self.world {
            let idx = self.owned_by(r);
            let mut ts = vec![];
            for &i in &idx {
                for slot in [&self.m[i], &self.v[i]] {
                    ts.push(match slot {
                        Some(t) => t.clone(),
                        None => self.vars[i].zeros_like()?,
                    });
                }
            }
            if r != 0 && self.sharded() {
                comm.broadcast_tensors(r, &mut ts)?;
            }
            if main {
                for (k, &i) in idx.iter().enumerate() {
                    let n = &self.names[i];
                    map.insert(format!("m.{n}"), ts[2 * k].clone());
                    map.insert(format!("v.{n}"), ts[2 * k + 1].clone());
                }
            }
        }
        Ok(main.then_some(map))
    }

    /// Writes the state [`gather_state`](Self::gather_state) returned.
    pub fn save(state: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
        save_tensors(path, state)
    }

    /// Loads a saved state, keeping this rank's share of it: read on the host and only the
    /// owned moments moved to the device, so a sharded run resumes within its sharded memory.
    pub fn load(&mut self, path: &Path, t: usize) -> Result<()> {
        let dev = self.vars[0].device().clone();
        let map = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
            .with_context(|| format!("{}: cannot read optimizer state", path.display()))?;
        for (i, n) in self.names.iter().enumerate() {
            if self.owner[i] != self.rank {
                continue;
            }
            for (slot, key) in [
                (&mut self.m[i], format!("m.{n}")),
                (&mut self.v[i], format!("v.{n}")),
            ] {
                let Some(x) = map.get(&key) else {
                    bail!("{}: optimizer state for {n} is missing", path.display());
                };
                if x.dims() != self.vars[i].dims() {
                    bail!(
                        "{}: optimizer state for {n} has the wrong shape",
                        path.display()
                    );
                }
                *slot = Some(x.to_device(&dev)?);
            }
        }
        self.t = t;
        Ok(())
    }
}

impl Drop for AdamW {
    fn drop(&mut self) {
        for (v, c) in self.vars.iter().zip(&self.copies) {
            if let Some(c) = c {
                crate::model::cast::unregister_copy(v.as_tensor(), c.as_tensor());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::params::{Init, Net};
    use candle_core::Device;

    /// Adam's first step moves every parameter by lr (times its scale) against its gradient's
    /// sign, whatever the gradient's size.
    #[test]
    fn learning_rate_scale_is_per_parameter() {
        let mut store = ParamStore::new(Device::Cpu, 0);
        store
            .scope(Net::Policy)
            .weight("w", &[3], Init::Zeros)
            .unwrap();
        store
            .scope(Net::Value)
            .weight("w", &[3], Init::Zeros)
            .unwrap();
        let cfg = TrainConfig {
            weight_decay: 0.0,
            ..TrainConfig::default()
        };
        let mut opt = AdamW::new(&store, &|_| true, &cfg).unwrap();
        opt.scale_lr(&|p| if p.net == Net::Value { 10.0 } else { 1.0 });
        let g = Tensor::new(&[0.5f32, -2.0, 1e-3], &Device::Cpu).unwrap();
        opt.step(&[g.clone(), g], 0.01).unwrap();
        let read = |n: &str| store.get(n).unwrap().as_tensor().to_vec1::<f32>().unwrap();
        let (p, v) = (read("w"), read("value.w"));
        for (i, sign) in [-1.0f32, 1.0, -1.0].into_iter().enumerate() {
            assert!((p[i] - sign * 0.01).abs() < 1e-4, "{p:?}");
            assert!((v[i] - sign * 0.1).abs() < 1e-3, "{v:?}");
        }
    }

    /// With bf16 compute, training through compute copies ends on the same f32 masters, bit
    /// for bit, as casting every master in every forward (GPT-2 and Llama shapes, untied: a
    /// tied embedding's lookup and head gradients may sum in another order); each copy stays
    /// its master rounded; and the weights' cast nodes are gone from the graph.
    #[test]
    fn compute_copies_train_exactly_as_casting_the_masters() {
        use crate::config::ModelConfig;
        use crate::model::linear::Ctx;
        use crate::model::{Fwd, Transformer};

        let run = |preset: &str, copies: bool| -> (Vec<Vec<f32>>, Vec<usize>) {
            // The shared cut-down shape, with up to 4 kv heads (GPT-2's 4 heads unshared).
            let mut cfg = ModelConfig::for_tests(preset);
            let kv = ModelConfig::preset(preset).unwrap().num_key_value_heads;
            cfg.num_key_value_heads = kv.min(4);
            cfg.tie_word_embeddings = false;
            let mut store = ParamStore::new(Device::Cpu, 5);
            let net = Transformer::new(&mut store.scope(Net::Policy), &cfg, None).unwrap();
            let mut opt = AdamW::new(&store, &|_| true, &TrainConfig::default()).unwrap();
            if copies {
                opt.keep_compute_copies(DType::BF16).unwrap();
            }
            let f = Fwd {
                ctx: Ctx::plain(DType::BF16),
                positions: None,
                key_valid: None,
                segments: None,
            };
            let ids: Vec<u32> = (0..3 * 13).map(|i| (i * 7 + 3) % 61).collect();
            let all = Tensor::from_vec(ids, (3, 13), &Device::Cpu).unwrap();
            let x = all.narrow(1, 0, 12).unwrap().contiguous().unwrap();
            let y = all.narrow(1, 1, 12).unwrap().contiguous().unwrap();
            let mut nodes = vec![];
            for _ in 0..3 {
                let loss = net.target_logprobs(&x, &y, &f).unwrap();
                let loss = loss.neg().unwrap().mean_all().unwrap();
                nodes.push(loss.sorted_nodes().len());
                let grads = opt.collect(&loss.backward().unwrap()).unwrap();
                opt.update(&grads, 1e-2, 1.0, KernelChoice::Reference)
                    .unwrap();
            }
            if copies {
                // The embedding lookups read the f32 tables (and GPT-2's LayerNorm its f32
                // weight and bias): those copies got no gradient and were dropped.
                let kept = opt.compute_copies();
                assert!(kept > 0 && kept < opt.num_tensors(), "{kept} copies kept");
            }
            for (v, c) in opt.vars.iter().zip(&opt.copies) {
                if let Some(c) = c {
                    let bits = |t: &Tensor| -> Vec<half::bf16> {
                        t.flatten_all().unwrap().to_vec1().unwrap()
                    };
                    let want = v.as_tensor().to_dtype(DType::BF16).unwrap();
                    assert!(
                        bits(c.as_tensor()) == bits(&want),
                        "a copy drifted from its master"
                    );
                }
            }
            let masters = store
                .iter()
                .map(|(_, v, _)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
                .collect();
            (masters, nodes)
        };
        for preset in ["tiny", "gpt2"] {
            let (cast, cast_nodes) = run(preset, false);
            let (copied, copy_nodes) = run(preset, true);
            assert_eq!(cast, copied, "{preset}: masters differ");
            // One node fewer per weight read through a cast: the matrices, biases and RMSNorm
            // weights (the embeddings and LayerNorm read the f32 masters).
            assert!(
                copy_nodes[0] < cast_nodes[0],
                "{preset}: {copy_nodes:?} nodes with copies, {cast_nodes:?} without"
            );
        }
    }

    /// Two ranks each stepping their share and exchanging weights end where one unsharded
    /// optimizer does, bit for bit, and the gathered state is the unsharded one.
    #[test]
    fn sharded_steps_match_unsharded_ones() {
        let make = || {
            let mut store = ParamStore::new(Device::Cpu, 3);
            let mut sc = store.scope(Net::Policy);
            for (n, len) in [("a", 5), ("b", 9), ("c", 2), ("d", 7)] {
                sc.weight(n, &[len], Init::Normal(1.0)).unwrap();
            }
            store
        };
        let cfg = TrainConfig::default();
        let grads = |store: &ParamStore, k: usize| -> Vec<Tensor> {
            store
                .iter()
                .map(|(_, v, _)| ((v.as_tensor() * (k as f64 + 1.0)).unwrap().sin()).unwrap())
                .collect()
        };
        let one = make();
        let mut plain = AdamW::new(&one, &|_| true, &cfg).unwrap();
        for k in 0..3 {
            plain.step(&grads(&one, k), 0.01).unwrap();
        }
        let plain_state = plain.gather_state(&crate::dist::Solo).unwrap().unwrap();
        let group = crate::dist::ThreadGroup::new(2);
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = group
                .iter()
                .map(|c| {
                    let cfg = &cfg;
                    s.spawn(move || {
                        let store = make();
                        let mut opt = AdamW::new(&store, &|_| true, cfg).unwrap();
                        opt.shard(c.rank(), 2);
                        opt.keep_compute_copies(DType::BF16).unwrap();
                        assert!(opt.owned_params() < opt.num_params());
                        for k in 0..3 {
                            opt.step(&grads(&store, k), 0.01).unwrap();
                            opt.sync_weights(c).unwrap();
                        }
                        // Every copy is its master's, the owner's update or the broadcast's.
                        for (v, cp) in opt.vars.iter().zip(&opt.copies) {
                            let want = v.as_tensor().to_dtype(DType::BF16).unwrap();
                            let got = cp.as_ref().unwrap().as_tensor();
                            assert_eq!(
                                got.to_vec1::<half::bf16>().unwrap(),
                                want.to_vec1::<half::bf16>().unwrap()
                            );
                        }
                        let w: Vec<Vec<f32>> = store
                            .iter()
                            .map(|(_, v, _)| v.as_tensor().to_vec1::<f32>().unwrap())
                            .collect();
                        (w, opt.gather_state(c).unwrap())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want: Vec<Vec<f32>> = one
            .iter()
            .map(|(_, v, _)| v.as_tensor().to_vec1::<f32>().unwrap())
            .collect();
        for (w, _) in &results {
            assert_eq!(w, &want);
        }
        let state = results[0].1.as_ref().unwrap();
        assert!(results[1].1.is_none());
        for (k, t) in &plain_state {
            assert_eq!(
                t.to_vec1::<f32>().unwrap(),
                state[k].to_vec1::<f32>().unwrap(),
                "{k}"
            );
        }
    }
}
