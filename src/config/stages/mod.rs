//! Each stage's own table: `[sft]`, `[reward]`, `[ppo]`, `[dpo]`, `[kto]`, `[online_dpo]`,
//! `[grpo]`, and the reward specs the on-policy stages are scored by.

mod dpo;
mod grpo;
mod kto;
mod online_dpo;
mod ppo;
mod reward;
mod rewards;
mod sampling;
mod sft;
#[cfg(test)]
mod tests;

pub use dpo::*;
pub use grpo::*;
pub use kto::*;
pub use online_dpo::*;
pub use ppo::*;
pub use reward::*;
pub use rewards::*;
pub use sampling::*;
pub use sft::*;
