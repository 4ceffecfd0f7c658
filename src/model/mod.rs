//! The decoder-only transformer, its LoRA adapters, scalar heads and KV cache. A
//! [`Transformer`] is embeddings, then [`block::Block`]s (norm -> [`attention::Attention`] +
//! residual, norm -> [`mlp::Mlp`] + residual), then a final norm and the LM head; each piece
//! creates its parameters with `load(scope.pp("name"), cfg)`.

pub mod attention;
pub mod block;
pub mod cast;
pub mod heads;
pub mod hf;
pub mod kv_cache;
pub mod linear;
pub mod mlp;
pub mod neftune;
pub mod norm;
pub mod pick;
pub mod rope;
pub mod transformer;

pub use heads::ScalarHead;
pub use kv_cache::KvCache;
pub use transformer::{Fwd, Transformer};

/// A 2-layer model of `preset`'s shape ([`crate::config::ModelConfig::for_tests`]) without
/// dropout, and the store holding its parameters.
#[cfg(test)]
pub(crate) fn test_model(
    preset: &str,
    seed: u64,
) -> (crate::train::params::ParamStore, Transformer) {
    use crate::train::params::{Net, ParamStore};
    let mut cfg = crate::config::ModelConfig::for_tests(preset);
    cfg.dropout = 0.0;
    let mut store = ParamStore::new(candle_core::Device::Cpu, seed);
    let net = Transformer::new(&mut store.scope(Net::Policy), &cfg, None).unwrap();
    (store, net)
}
