//! Ranks as threads of one process: CPU data parallelism inside one process, and the
//! reference the other backends are tested against.

use std::sync::{Arc, Condvar, Mutex};

use anyhow::{bail, Result};

use super::{Communicator, PeerFailed};

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
            return Err(PeerFailed.into());
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
            return Err(PeerFailed.into());
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

    fn broadcast(&self, root: usize, data: &mut [f32]) -> Result<()> {
        let shared = &*self.shared;
        let lock = || shared.slots.lock().unwrap_or_else(|e| e.into_inner());
        if self.rank == root {
            lock()[root] = data.to_vec();
        }
        shared.barrier()?;
        {
            let slots = lock();
            let from = &slots[root];
            if from.len() != data.len() {
                bail!(
                    "broadcast: rank {root} sent {} values, rank {} expected {}",
                    from.len(),
                    self.rank,
                    data.len()
                );
            }
            data.copy_from_slice(from);
        }
        shared.barrier()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn thread_ranks_broadcast_the_roots_values() {
        let group = ThreadGroup::new(3);
        std::thread::scope(|s| {
            for c in &group {
                s.spawn(move || {
                    let mut v = vec![c.rank() as f32; 4];
                    c.broadcast(2, &mut v).unwrap();
                    assert_eq!(v, vec![2.0; 4]);
                });
            }
        });
    }

    /// Unequal lengths, one of them empty, gather in rank order on every rank.
    #[test]
    fn thread_ranks_gather_unequal_lengths() {
        let group = ThreadGroup::new(3);
        std::thread::scope(|s| {
            for c in &group {
                s.spawn(move || {
                    let r = c.rank();
                    let mine: Vec<f32> = (0..[2, 0, 3][r]).map(|i| (10 * r + i) as f32).collect();
                    let all = crate::dist::gather_f32(c, &mine).unwrap();
                    assert_eq!(all, [0.0, 1.0, 20.0, 21.0, 22.0]);
                });
            }
        });
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
