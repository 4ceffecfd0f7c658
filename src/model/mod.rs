//! The decoder-only transformer, its LoRA adapters, scalar heads and KV cache.

pub mod heads;
pub mod kv_cache;
pub mod linear;
pub mod transformer;

pub use heads::ScalarHead;
pub use kv_cache::KvCache;
pub use linear::{LoraConfig, LoraTarget};
pub use transformer::{Fwd, Transformer};
