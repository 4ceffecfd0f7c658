//! Named parameters: every weight of a model is an f32 `Var` under a dotted name
//! (`model.layers.3.attn.q.weight`), so that safetensors files, optimizer state and the
//! trainable/frozen split all speak the same names. Models create their parameters through a
//! [`Scope`] (candle's `VarBuilder::pp` pattern), which also records what each parameter is
//! ([`Role`], weight decay) and which network of the stage owns it ([`Net`]), so that stages
//! choose trainable sets, learning rates and files by type rather than by name.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};

use super::rng::Rng;

#[derive(Clone, Copy, Debug)]
pub enum Init {
    Normal(f64),
    Zeros,
    Ones,
}

/// What a parameter is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A weight of the transformer (embedding, projection, norm, LM head).
    Base,
    /// A LoRA factor: the only thing trained when LoRA is on, saved in its own file.
    Adapter,
    /// A scalar head (reward score or value) on top of the transformer.
    Head,
}

/// Which network of a stage owns a parameter: PPO keeps its policy and its critic in one
/// store (and one checkpoint), the critic's names under `value.`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Net {
    Policy,
    Value,
}

impl Net {
    /// The name prefix of the network's parameters in a store and its checkpoint files.
    pub fn prefix(self) -> &'static str {
        match self {
            Net::Policy => "",
            Net::Value => "value.",
        }
    }
}

/// Everything known about one parameter besides its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamInfo {
    pub role: Role,
    pub net: Net,
    /// Norm gains, biases and embeddings get no weight decay (minGPT's convention; nanoGPT,
    /// llm.c and the Hugging Face Trainer decay the embeddings too).
    pub decay: bool,
    /// Never trained: stored in the compute dtype (bf16 on a GPU, so a frozen base costs half
    /// an f32 copy) and handed to the model detached, so autograd computes no gradient for it.
    pub frozen: bool,
}

struct Entry {
    var: Var,
    info: ParamInfo,
}

pub struct ParamStore {
    pub device: Device,
    vars: BTreeMap<String, Entry>,
    rng: Rng,
    /// Which parameters are created frozen, and in which dtype.
    frozen: Vec<(Net, Role, DType)>,
}

impl ParamStore {
    pub fn new(device: Device, seed: u64) -> Self {
        Self {
            device,
            vars: BTreeMap::new(),
            rng: Rng::new(seed ^ 0x1417),
            frozen: vec![],
        }
    }

    /// Parameters of `net` with one of `roles` created from now on are frozen, stored in
    /// `dtype` (see [`ParamInfo::frozen`]). Their random init is still drawn, so freezing
    /// changes no other parameter's init.
    pub fn freeze(&mut self, net: Net, roles: &[Role], dtype: DType) {
        self.frozen.extend(roles.iter().map(|&r| (net, r, dtype)));
    }

    /// The root scope of network `net`: names start with `net.prefix()`.
    pub fn scope(&mut self, net: Net) -> Scope<'_> {
        Scope {
            prefix: net.prefix().trim_end_matches('.').to_string(),
            net,
            store: self,
        }
    }

    /// Creates `name` with the given init (drawn on the host from the store's seeded RNG, so
    /// the same seed gives the same model on any device).
    fn create(
        &mut self,
        name: String,
        shape: &[usize],
        init: Init,
        mut info: ParamInfo,
    ) -> Result<Tensor> {
        if self.vars.contains_key(&name) {
            bail!("parameter {name} defined twice");
        }
        let n: usize = shape.iter().product();
        let data: Vec<f32> = match init {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Normal(std) => (0..n).map(|_| (self.rng.normal() * std) as f32).collect(),
        };
        let t = Tensor::from_vec(data, shape, &self.device)?;
        let frozen = self
            .frozen
            .iter()
            .find(|(n, r, _)| *n == info.net && *r == info.role)
            .map(|&(_, _, dt)| dt);
        info.frozen = frozen.is_some();
        let var = Var::from_tensor(&t.to_dtype(frozen.unwrap_or(DType::F32))?)?;
        // A detached tensor shares the variable's storage, so loading weights into the
        // variable later still reaches the model.
        let out = match frozen {
            Some(_) => var.as_tensor().detach(),
            None => var.as_tensor().clone(),
        };
        self.vars.insert(name, Entry { var, info });
        Ok(out)
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.get(name).map(|e| &e.var)
    }

    pub fn info(&self, name: &str) -> Option<ParamInfo> {
        self.vars.get(name).map(|e| e.info)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.vars.keys()
    }

    /// Every parameter in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Var, ParamInfo)> {
        self.vars.iter().map(|(n, e)| (n, &e.var, e.info))
    }

    /// The parameters of network `net`, with their names inside the network (the prefix
    /// stripped), as its checkpoint files name them.
    pub fn net(&self, net: Net) -> impl Iterator<Item = (&str, &Var, ParamInfo)> {
        self.iter()
            .filter(move |(_, _, i)| i.net == net)
            .map(move |(n, v, i)| {
                let local = n.strip_prefix(net.prefix()).unwrap_or(n);
                (local, v, i)
            })
    }

    pub fn has_adapters(&self) -> bool {
        self.iter().any(|(_, _, i)| i.role == Role::Adapter)
    }

    pub fn num_params(&self, filter: impl Fn(ParamInfo) -> bool) -> usize {
        self.iter()
            .filter(|(_, _, i)| filter(*i))
            .map(|(_, v, _)| v.elem_count())
            .sum()
    }

    /// The first trained parameter (in name order) holding a value that is not finite: each
    /// one's sum, which carries a NaN or an infinity through and which finite weights are far
    /// from overflowing, read back in one transfer. Summed in the parameter's own dtype (no
    /// copy of a vocabulary-sized matrix), but for f16, whose sums of legitimate weights can
    /// pass its 65504. Frozen weights are left out: training never changes them.
    pub fn first_non_finite(&self) -> Result<Option<&str>> {
        let sum = |t: &Tensor| -> candle_core::Result<Tensor> {
            match t.dtype() {
                DType::F16 => t.to_dtype(DType::F32)?.sum_all(),
                _ => t.sum_all()?.to_dtype(DType::F32),
            }
        };
        let trained: Vec<(&String, &Var)> = self
            .iter()
            .filter(|(_, _, i)| !i.frozen)
            .map(|(n, v, _)| (n, v))
            .collect();
        if trained.is_empty() {
            return Ok(None);
        }
        let sums = trained
            .iter()
            .map(|(_, v)| sum(v.as_tensor()))
            .collect::<candle_core::Result<Vec<Tensor>>>()?;
        let sums = Tensor::stack(&sums, 0)?.to_vec1::<f32>()?;
        Ok(trained
            .into_iter()
            .zip(sums)
            .find(|(_, s)| !s.is_finite())
            .map(|((n, _), _)| n.as_str()))
    }

    /// Writes the selected tensors to a safetensors file atomically.
    pub fn save(&self, path: &Path, filter: impl Fn(ParamInfo) -> bool) -> Result<()> {
        let map: HashMap<String, Tensor> = self
            .iter()
            .filter(|(_, _, i)| filter(*i))
            .map(|(n, v, _)| (n.clone(), v.as_tensor().clone()))
            .collect();
        save_tensors(path, &map)
    }

    /// Loads every tensor of `path` whose parameter `filter` accepts into the existing
    /// parameters, checking shapes. With `require_all`, every accepted parameter of the store
    /// must be found.
    pub fn load(
        &self,
        path: &Path,
        filter: impl Fn(ParamInfo) -> bool,
        require_all: bool,
    ) -> Result<usize> {
        let tensors = candle_core::safetensors::load(path, &self.device)
            .with_context(|| format!("{}: cannot read safetensors", path.display()))?;
        let mut loaded = 0;
        for (name, var, _) in self.iter().filter(|(_, _, i)| filter(*i)) {
            match tensors.get(name) {
                Some(t) => {
                    set_checked(var, t, name, path)?;
                    loaded += 1;
                }
                None if require_all => bail!(
                    "{}: tensor {name} is missing (a checkpoint of a different model or stage?)",
                    path.display()
                ),
                None => {}
            }
        }
        Ok(loaded)
    }
}

/// Sets `var` from `t` (any float dtype), refusing a shape mismatch with a message naming the
/// tensor and the file it came from.
pub fn set_checked(var: &Var, t: &Tensor, name: &str, file: &Path) -> Result<()> {
    if t.dims() != var.dims() {
        bail!(
            "{}: tensor {name} has shape {:?}, the model expects {:?} (a checkpoint of a different model?)",
            file.display(),
            t.dims(),
            var.dims()
        );
    }
    var.set(&t.to_dtype(var.dtype())?)?;
    Ok(())
}

/// A view of a [`ParamStore`] under a name prefix, for one network: `scope.pp("layers.0")`
/// names what it creates `layers.0.*`.
pub struct Scope<'a> {
    store: &'a mut ParamStore,
    prefix: String,
    net: Net,
}

impl Scope<'_> {
    /// A sub-scope: names gain `.name`.
    pub fn pp(&mut self, name: &str) -> Scope<'_> {
        Scope {
            prefix: self.join(name),
            net: self.net,
            store: &mut *self.store,
        }
    }

    pub fn device(&self) -> &Device {
        &self.store.device
    }

    /// The scope's own full name (its prefix).
    pub fn name(&self) -> &str {
        &self.prefix
    }

    /// The full name `name` gets in this scope.
    pub fn join(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    fn make(
        &mut self,
        name: &str,
        shape: &[usize],
        init: Init,
        role: Role,
        decay: bool,
    ) -> Result<Tensor> {
        let info = ParamInfo {
            role,
            net: self.net,
            decay,
            frozen: false,
        };
        let full = self.join(name);
        self.store.create(full, shape, init, info)
    }

    /// A matrix of the network, trained with weight decay.
    pub fn weight(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        self.make(name, shape, init, Role::Base, true)
    }

    /// A norm gain, bias or embedding: no weight decay.
    pub fn gain(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        self.make(name, shape, init, Role::Base, false)
    }

    /// A LoRA factor.
    pub fn adapter(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        self.make(name, shape, init, Role::Adapter, true)
    }

    /// An adapter's vector that scales (DoRA's magnitudes): no weight decay, which would pull
    /// a layer's rows towards zero length rather than towards the base layer.
    pub fn adapter_gain(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        self.make(name, shape, init, Role::Adapter, false)
    }

    /// A scalar head's weight (`decay`) or bias.
    pub fn head(&mut self, name: &str, shape: &[usize], init: Init, decay: bool) -> Result<Tensor> {
        self.make(name, shape, init, Role::Head, decay)
    }
}

pub fn save_tensors(path: &Path, map: &HashMap<String, Tensor>) -> Result<()> {
    let tmp = crate::io::tmp_path(path);
    // The file meant, not its temporary; candle's message holds its cause already, which a
    // context would print twice.
    candle_core::safetensors::save(map, &tmp).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::anyhow!("{}: cannot write: {e}", path.display())
    })?;
    crate::io::default_permissions(&tmp)?;
    crate::io::rename_into_place(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trained weight that overflowed to infinity, or went NaN, is named; finite ones,
    /// however large, are not; a frozen one is not read.
    #[test]
    fn the_first_weight_that_is_not_finite_is_named() {
        let mut store = ParamStore::new(Device::Cpu, 0);
        {
            let mut root = store.scope(Net::Policy);
            root.weight("a", &[3], Init::Zeros).unwrap();
            root.weight("b", &[2, 2], Init::Zeros).unwrap();
        }
        let set = |name: &str, v: &[f32], shape: &[usize]| {
            let t = Tensor::from_slice(v, shape, &Device::Cpu).unwrap();
            store.get(name).unwrap().set(&t).unwrap();
        };
        set("a", &[6e4, 6e4, 6e4], &[3]);
        assert_eq!(store.first_non_finite().unwrap(), None);
        // A frozen weight is not read (training never changes it).
        let mut frozen = ParamStore::new(Device::Cpu, 0);
        frozen.freeze(Net::Policy, &[Role::Base], DType::BF16);
        frozen
            .scope(Net::Policy)
            .weight("h", &[3], Init::Zeros)
            .unwrap();
        frozen
            .scope(Net::Policy)
            .adapter("g", &[3], Init::Zeros)
            .unwrap();
        let inf = Tensor::from_slice(&[f32::INFINITY, 0.0, 0.0], 3, &Device::Cpu).unwrap();
        let h = frozen.get("h").unwrap();
        h.set(&inf.to_dtype(h.dtype()).unwrap()).unwrap();
        assert_eq!(frozen.first_non_finite().unwrap(), None, "frozen");
        frozen.get("g").unwrap().set(&inf).unwrap();
        assert_eq!(frozen.first_non_finite().unwrap(), Some("g"));
        set("b", &[1.0, f32::INFINITY, 0.0, 0.0], &[2, 2]);
        assert_eq!(store.first_non_finite().unwrap(), Some("b"));
        set("a", &[f32::NAN, 0.0, 0.0], &[3]);
        assert_eq!(store.first_non_finite().unwrap(), Some("a"));
    }

    #[test]
    fn scopes_name_and_tag_parameters() {
        let mut store = ParamStore::new(Device::Cpu, 0);
        {
            let mut root = store.scope(Net::Policy);
            let mut model = root.pp("model");
            let mut blk = model.pp("layers.0");
            blk.weight("q.weight", &[2, 2], Init::Zeros).unwrap();
            blk.adapter("q.lora_a", &[1, 2], Init::Zeros).unwrap();
        }
        {
            let mut v = store.scope(Net::Value);
            v.head("score.bias", &[1], Init::Zeros, false).unwrap();
            assert!(v.head("score.bias", &[1], Init::Zeros, false).is_err());
        }
        let names: Vec<_> = store.names().cloned().collect();
        assert_eq!(
            names,
            [
                "model.layers.0.q.lora_a",
                "model.layers.0.q.weight",
                "value.score.bias"
            ]
        );
        let info = store.info("model.layers.0.q.lora_a").unwrap();
        assert_eq!((info.role, info.net), (Role::Adapter, Net::Policy));
        let local: Vec<_> = store
            .net(Net::Value)
            .map(|(n, _, _)| n.to_string())
            .collect();
        assert_eq!(local, ["score.bias"]);
        assert!(store.has_adapters());
    }

    #[test]
    fn a_frozen_base_is_stored_in_its_dtype_and_untracked_but_loadable() {
        let mut store = ParamStore::new(Device::Cpu, 0);
        store.freeze(Net::Policy, &[Role::Base], DType::BF16);
        let mut root = store.scope(Net::Policy);
        let w = root.weight("w", &[2], Init::Ones).unwrap();
        let a = root.adapter("a", &[2], Init::Ones).unwrap();
        assert_eq!((w.dtype(), a.dtype()), (DType::BF16, DType::F32));
        assert!(store.info("w").unwrap().frozen && !store.info("a").unwrap().frozen);
        // Gradients reach the adapter only.
        let y = (w.to_dtype(DType::F32).unwrap() * &a)
            .unwrap()
            .sum_all()
            .unwrap();
        let g = y.backward().unwrap();
        assert!(g.get(&w).is_none() && g.get(&a).is_some());
        // Weights loaded into the frozen variable reach the tensor the model holds.
        let src = Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap();
        set_checked(store.get("w").unwrap(), &src, "w", Path::new("f")).unwrap();
        let got = w.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, [3.0, 4.0]);
    }
}
