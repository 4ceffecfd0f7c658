//! Data parallelism: where a process sits in a job ([`Rank`], from torchrun's or SLURM's
//! environment), the collective operations the training loop needs ([`Communicator`]), and an
//! in-process backend that runs ranks as threads ([`ThreadGroup`]) for CPU runs and tests.
//! A GPU backend (NCCL) implements the same trait.

pub mod preempt;

use std::sync::{Arc, Condvar, Mutex};

use anyhow::{bail, Context, Result};

/// A process's place in a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rank {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// Where rank 0 listens for the others (`MASTER_ADDR:MASTER_PORT`).
    pub master: Option<(String, u16)>,
}

impl Rank {
    /// One process alone.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world: 1,
            local_rank: 0,
            master: None,
        }
    }

    /// The rank torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`)
    /// or SLURM's `srun` (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, the first host of
    /// `SLURM_JOB_NODELIST`) gives this process; a single process when neither set it.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let num = |key: &str| -> Result<Option<usize>> {
            get(key)
                .map(|v| {
                    v.trim().parse::<usize>().with_context(|| {
                        format!("environment variable {key}={v:?} is not a number")
                    })
                })
                .transpose()
        };
        let (rank, world, local) = if let Some(r) = num("RANK")? {
            let w = num("WORLD_SIZE")?.context("RANK is set but WORLD_SIZE is not")?;
            (r, w, num("LOCAL_RANK")?.unwrap_or(0))
        } else if let Some(r) = num("SLURM_PROCID")? {
            let w = num("SLURM_NTASKS")?.context("SLURM_PROCID is set but SLURM_NTASKS is not")?;
            (r, w, num("SLURM_LOCALID")?.unwrap_or(0))
        } else {
            return Ok(Self::single());
        };
        if world == 0 || rank >= world {
            bail!("rank {rank} is not below the world size {world}");
        }
        let addr = get("MASTER_ADDR").or_else(|| get("SLURM_JOB_NODELIST").map(|l| first_host(&l)));
        let port = num("MASTER_PORT")?.map(|p| p as u16).unwrap_or(29500);
        Ok(Self {
            rank,
            world,
            local_rank: local,
            master: addr.map(|a| (a, port)),
        })
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}

/// The first host of a SLURM node list: `gpu[01-04],cpu7` -> `gpu01`.
pub fn first_host(list: &str) -> String {
    let first = list.split(',').next().unwrap_or("").trim();
    match first.split_once('[') {
        Some((prefix, rest)) => {
            let n = rest.split(['-', ',', ']']).next().unwrap_or("");
            format!("{prefix}{n}")
        }
        None => first.to_string(),
    }
}

/// The collectives data parallelism needs, over the ranks of one job.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Replaces `data` on every rank by the element-wise mean over ranks.
    fn all_reduce_mean(&self, data: &mut [f32]) -> Result<()>;
}

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
}

/// Ranks as threads of one process, for CPU data parallelism and its tests. The sum is taken
/// in rank order, so every rank gets bit-identical results. A rank that fails calls
/// [`ThreadGroup::abort`], and every rank waiting in a collective gets an error instead of
/// waiting forever.
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    world: usize,
    slots: Mutex<Vec<Vec<f32>>>,
    /// (ranks arrived, generation, aborted)
    gate: Mutex<(usize, u64, bool)>,
    cv: Condvar,
}

impl Shared {
    /// Waits until every rank arrives (or one aborts).
    fn barrier(&self) -> Result<()> {
        let mut g = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        if g.2 {
            bail!("another rank failed");
        }
        let gen = g.1;
        g.0 += 1;
        if g.0 == self.world {
            g.0 = 0;
            g.1 += 1;
            self.cv.notify_all();
            return Ok(());
        }
        while g.1 == gen && !g.2 {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        if g.2 {
            bail!("another rank failed");
        }
        Ok(())
    }
}

impl ThreadGroup {
    /// One communicator per rank of a `world`-rank group.
    pub fn new(world: usize) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            world,
            slots: Mutex::new(vec![Vec::new(); world]),
            gate: Mutex::new((0, 0, false)),
            cv: Condvar::new(),
        });
        (0..world)
            .map(|rank| ThreadGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Releases every rank waiting in a collective, with an error.
    pub fn abort(&self) {
        let mut g = self.shared.gate.lock().unwrap_or_else(|e| e.into_inner());
        g.2 = true;
        self.shared.cv.notify_all();
    }
}

impl Communicator for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_mean(&self, data: &mut [f32]) -> Result<()> {
        let shared = &*self.shared;
        let lock = || shared.slots.lock().unwrap_or_else(|e| e.into_inner());
        lock()[self.rank] = data.to_vec();
        shared.barrier()?;
        {
            let slots = lock();
            if slots.iter().any(|s| s.len() != data.len()) {
                bail!("all-reduce: ranks sent buffers of different lengths");
            }
            let n = shared.world as f32;
            for (i, x) in data.iter_mut().enumerate() {
                *x = slots.iter().map(|s| s[i]).sum::<f32>() / n;
            }
        }
        // Nobody overwrites a slot before every rank has read them all.
        shared.barrier()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_come_from_torchrun_or_slurm() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let r = Rank::from_env(env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap();
        assert_eq!((r.rank, r.world, r.local_rank), (3, 8, 1));
        assert_eq!(r.master, Some(("10.0.0.1".into(), 1234)));
        let s = Rank::from_env(env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[07-08],gpu11"),
        ]))
        .unwrap();
        assert_eq!((s.rank, s.world, s.local_rank), (5, 16, 1));
        assert_eq!(s.master, Some(("gpu07".into(), 29500)));
        assert_eq!(Rank::from_env(env(&[])).unwrap(), Rank::single());
        assert!(Rank::from_env(env(&[("RANK", "4"), ("WORLD_SIZE", "4")])).is_err());
        assert!(Rank::from_env(env(&[("RANK", "x"), ("WORLD_SIZE", "4")])).is_err());
    }

    #[test]
    fn thread_ranks_all_reduce_to_the_same_mean() {
        let group = ThreadGroup::new(3);
        let out: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let r = c.rank() as f32;
                        let mut v = vec![r, 10.0 * r];
                        c.all_reduce_mean(&mut v).unwrap();
                        c.all_reduce_mean(&mut v).unwrap();
                        v
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for v in &out {
            assert_eq!(v, &vec![1.0, 10.0]);
        }
    }

    #[test]
    fn an_aborted_group_releases_waiting_ranks() {
        let group = ThreadGroup::new(2);
        std::thread::scope(|s| {
            let waiting = s.spawn(|| group[0].all_reduce_mean(&mut [1.0]));
            std::thread::sleep(std::time::Duration::from_millis(50));
            group[1].abort();
            assert!(waiting.join().unwrap().is_err());
        });
    }
}
