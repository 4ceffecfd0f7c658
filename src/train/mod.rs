//! The one training loop every stage shares, and what it needs: AdamW, the LR schedule,
//! checkpoints, metrics and progress reporting.

pub mod checkpoint;
pub mod loss;
pub mod metrics;
pub mod optimizer;
pub mod params;
pub mod profile;
pub mod progress;
pub mod rng;
pub mod runner;
pub mod schedule;
pub mod tensorboard;
