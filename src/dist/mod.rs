//! Data parallelism: where a process sits in a job ([`Rank`], from torchrun's or SLURM's
//! environment), the collective operations the training loop needs ([`Communicator`]), and
//! three backends for them:
//! - `nccl::NcclGroup` (feature `nccl`): one process per GPU, NCCL collectives on candle's
//!   stream, its unique id handed out by rank 0 over TCP ([`rendezvous`]);
//! - [`tcp::TcpGroup`]: CPU processes (torchrun-style runs without a GPU, `temper launch` on a
//!   CPU), collectives relayed through rank 0 over the same TCP connections;
//! - [`threads::ThreadGroup`]: ranks as threads of one process, for tests and CPU debugging.
//!
//! Every backend sums in rank order, so all of them give bit-identical results on the CPU.

pub mod buckets;
pub mod bytes;
pub mod launch;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod preempt;
pub mod rank;
pub mod rendezvous;
pub mod tcp;
pub mod threads;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

pub use rank::{first_host, Rank};
pub use threads::ThreadGroup;

/// The collectives data parallelism needs, over the ranks of one job.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Replaces `data` on every rank by the element-wise mean over ranks.
    fn all_reduce_mean(&self, data: &mut [f32]) -> Result<()>;
    /// Replaces `data` on every rank by rank `root`'s.
    fn broadcast(&self, root: usize, data: &mut [f32]) -> Result<()>;

    /// Whether the training loop may skip averaging gradients: true for a group of one,
    /// except a backend that is being exercised at world size 1 (NCCL on one GPU).
    fn skips_collectives(&self) -> bool {
        self.world() == 1
    }

    /// Averages tensors over ranks, a bucket of about [`buckets::BUCKET_ELEMS`] values per
    /// collective rather than one collective per tensor. The default goes through the host;
    /// a GPU backend overrides it to stay on the device.
    fn all_reduce_mean_tensors(&self, ts: &mut [Tensor]) -> Result<()> {
        buckets::through_host(ts, |buf| self.all_reduce_mean(buf))
    }

    /// Replaces tensors on every rank by rank `root`'s, in buckets.
    fn broadcast_tensors(&self, root: usize, ts: &mut [Tensor]) -> Result<()> {
        buckets::through_host(ts, |buf| self.broadcast(root, buf))
    }
}

/// Every rank's `mine`, in rank order, on every rank (an all-gather of unequal lengths):
/// the lengths by one all-reduce, then each rank's values by a broadcast from it.
pub fn gather_f32(comm: &dyn Communicator, mine: &[f32]) -> Result<Vec<f32>> {
    let world = comm.world();
    if world == 1 {
        return Ok(mine.to_vec());
    }
    let mut lens = vec![0f32; world];
    lens[comm.rank()] = mine.len() as f32;
    comm.all_reduce_mean(&mut lens)?;
    let mut all = Vec::new();
    for (root, mean) in lens.into_iter().enumerate() {
        let n = (mean * world as f32).round() as usize;
        if n == 0 {
            continue;
        }
        let mut buf = match root == comm.rank() {
            true => mine.to_vec(),
            false => vec![0.0; n],
        };
        comm.broadcast(root, &mut buf)?;
        all.extend(buf);
    }
    Ok(all)
}

/// What a rank waiting in a collective gets when another rank of its group failed: the
/// failure to report is that rank's own.
#[derive(Debug)]
pub struct PeerFailed;

impl std::fmt::Display for PeerFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("another rank failed")
    }
}

impl std::error::Error for PeerFailed {}

/// A single process: every collective is the identity.
pub struct Solo;

impl Communicator for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn world(&self) -> usize {
        1
    }

    fn all_reduce_mean(&self, _data: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn broadcast(&self, _root: usize, _data: &mut [f32]) -> Result<()> {
        Ok(())
    }
}

/// How long rank 0 waits for the others to arrive, and they for it
/// (`TEMPER_DIST_TIMEOUT_S`, default 300 s: a node of a SLURM job may start minutes late).
pub fn rendezvous_timeout() -> Result<Duration> {
    match std::env::var("TEMPER_DIST_TIMEOUT_S") {
        Err(_) => Ok(Duration::from_secs(300)),
        Ok(v) => match v.trim().parse::<f64>().map(Duration::try_from_secs_f64) {
            Ok(Ok(d)) if !d.is_zero() => Ok(d),
            _ => bail!("TEMPER_DIST_TIMEOUT_S={v:?} is not a positive number of seconds"),
        },
    }
}

/// The communicator of a process that `rank` places in a job: nothing to talk to alone;
/// NCCL between GPUs; TCP relayed through rank 0 between CPU processes.
pub fn connect(rank: &Rank, device: &Device) -> Result<Arc<dyn Communicator>> {
    if rank.world == 1 {
        return Ok(Arc::new(Solo));
    }
    let timeout = rendezvous_timeout()?;
    if device.is_cuda() {
        #[cfg(feature = "nccl")]
        return Ok(Arc::new(nccl::NcclGroup::connect(rank, device, timeout)?));
        #[cfg(not(feature = "nccl"))]
        bail!(
            "rank {} of {} on a GPU needs NCCL: this temper was built without it (rebuild with --features nccl)",
            rank.rank,
            rank.world
        );
    }
    Ok(Arc::new(tcp::TcpGroup::connect(rank, timeout)?))
}
