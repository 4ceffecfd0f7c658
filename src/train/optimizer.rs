//! AdamW with decoupled weight decay over f32 master weights, global-norm gradient clipping,
//! and state that saves to and loads from safetensors.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{backprop::GradStore, Tensor, Var};

use super::params::{save_tensors, ParamInfo, ParamStore};
use crate::config::TrainConfig;

pub struct AdamW {
    names: Vec<String>,
    infos: Vec<ParamInfo>,
    vars: Vec<Var>,
    decay: Vec<bool>,
    lr_scale: Vec<f64>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
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
            m: vec![],
            v: vec![],
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
            s.m.push(var.zeros_like()?);
            s.v.push(var.zeros_like()?);
        }
        if s.vars.is_empty() {
            bail!("no trainable parameters");
        }
        Ok(s)
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

    /// The gradient of every trainable parameter (zeros for one the loss did not reach).
    pub fn collect(&self, grads: &GradStore) -> Result<Vec<Tensor>> {
        self.vars
            .iter()
            .map(|v| match grads.get(v.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => Ok(v.zeros_like()?),
            })
            .collect()
    }

    /// Clips `grads` in place to global norm `max_norm` (0 = no clipping); returns the norm
    /// before clipping.
    pub fn clip(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
        let mut sq = 0f64;
        for g in grads.iter() {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        let norm = sq.sqrt();
        if max_norm > 0.0 && norm > max_norm {
            let s = max_norm / (norm + 1e-6);
            for g in grads.iter_mut() {
                *g = (&*g * s)?;
            }
        }
        Ok(norm)
    }

    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for (i, g) in grads.iter().enumerate().take(self.vars.len()) {
            self.m[i] = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let mhat = (&self.m[i] / bc1)?;
            let denom = ((&self.v[i] / bc2)?.sqrt()? + self.eps)?;
            let mut update = (mhat / denom)?;
            let p = self.vars[i].as_tensor();
            if self.decay[i] && self.weight_decay > 0.0 {
                update = (update + (p * self.weight_decay)?)?;
            }
            self.vars[i].set(&(p - (update * (lr * self.lr_scale[i]))?)?)?;
        }
        Ok(())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map = HashMap::new();
        for (i, n) in self.names.iter().enumerate() {
            map.insert(format!("m.{n}"), self.m[i].clone());
            map.insert(format!("v.{n}"), self.v[i].clone());
        }
        save_tensors(path, &map)
    }

    pub fn load(&mut self, path: &Path, t: usize) -> Result<()> {
        let dev = self.vars[0].device().clone();
        let map = candle_core::safetensors::load(path, &dev)
            .with_context(|| format!("{}: cannot read optimizer state", path.display()))?;
        for (i, n) in self.names.iter().enumerate() {
            for (slot, key) in [
                (&mut self.m[i], format!("m.{n}")),
                (&mut self.v[i], format!("v.{n}")),
            ] {
                let Some(x) = map.get(&key) else {
                    bail!("{}: optimizer state for {n} is missing", path.display());
                };
                if x.dims() != slot.dims() {
                    bail!(
                        "{}: optimizer state for {n} has the wrong shape",
                        path.display()
                    );
                }
                *slot = x.clone();
            }
        }
        self.t = t;
        Ok(())
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
}
