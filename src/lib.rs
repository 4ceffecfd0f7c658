//! temper: one crate that trains a decoder-only language model through pretraining, SFT (with
//! LoRA), reward modelling, PPO, DPO and GRPO, with swappable CUDA kernels for the hot paths.

#[macro_use]
pub mod console;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod dist;
pub mod generate;
pub mod hub_cache;
pub mod io;
pub mod json_error;
pub mod kernels;
pub mod model;
pub mod out_of_memory;
pub mod stages;
pub mod tape;
pub mod train;
