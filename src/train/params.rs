//! Named parameters: every weight of a model is an f32 `Var` under a dotted name
//! (`layers.3.attn.q.weight`), so that safetensors files, optimizer state and the
//! trainable/frozen split all speak the same names.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};

use super::rng::Rng;

pub enum Init {
    Normal(f64),
    Zeros,
    Ones,
}

pub struct ParamStore {
    pub device: Device,
    vars: BTreeMap<String, Var>,
    rng: Rng,
}

impl ParamStore {
    pub fn new(device: Device, seed: u64) -> Self {
        Self {
            device,
            vars: BTreeMap::new(),
            rng: Rng::new(seed ^ 0x1417),
        }
    }

    /// Creates `name` with the given init (drawn on the host from the store's seeded RNG, so
    /// the same seed gives the same model on any device).
    pub fn create(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        if self.vars.contains_key(name) {
            bail!("parameter {name} defined twice");
        }
        let n: usize = shape.iter().product();
        let data: Vec<f32> = match init {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Normal(std) => (0..n).map(|_| (self.rng.normal() * std) as f32).collect(),
        };
        let t = Tensor::from_vec(data, shape, &self.device)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        self.vars.insert(name.to_string(), var);
        Ok(out)
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.vars.keys()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.vars.iter()
    }

    pub fn num_params(&self, filter: impl Fn(&str) -> bool) -> usize {
        self.vars
            .iter()
            .filter(|(n, _)| filter(n))
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// Writes the selected tensors to a safetensors file atomically.
    pub fn save(&self, path: &Path, filter: impl Fn(&str) -> bool) -> Result<()> {
        let map: HashMap<String, Tensor> = self
            .vars
            .iter()
            .filter(|(n, _)| filter(n))
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        save_tensors(path, &map)
    }

    /// Loads every tensor of `path` whose name `filter` accepts into the existing parameters,
    /// checking shapes. With `require_all`, every accepted parameter of the store must be found.
    pub fn load(
        &self,
        path: &Path,
        filter: impl Fn(&str) -> bool,
        require_all: bool,
    ) -> Result<usize> {
        let tensors = candle_core::safetensors::load(path, &self.device)
            .with_context(|| format!("{}: cannot read safetensors", path.display()))?;
        let mut loaded = 0;
        for (name, var) in self.vars.iter().filter(|(n, _)| filter(n)) {
            match tensors.get(name) {
                Some(t) => {
                    if t.dims() != var.dims() {
                        bail!(
                            "{}: tensor {name} has shape {:?}, the model expects {:?} (a checkpoint of a different model?)",
                            path.display(),
                            t.dims(),
                            var.dims()
                        );
                    }
                    var.set(&t.to_dtype(DType::F32)?)?;
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

pub fn save_tensors(path: &Path, map: &HashMap<String, Tensor>) -> Result<()> {
    let tmp = super::checkpoint::tmp_path(path);
    candle_core::safetensors::save(map, &tmp)
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}
