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
pub mod norm;
pub mod pick;
pub mod rope;
pub mod transformer;

pub use heads::ScalarHead;
pub use kv_cache::KvCache;
pub use transformer::{Fwd, Transformer};
