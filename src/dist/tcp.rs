//! CPU processes as ranks: the collectives go through rank 0 over the rendezvous
//! connections. Rank 0 sums the ranks' buffers in rank order, as [`super::ThreadGroup`]
//! does, so process ranks and thread ranks give bit-identical results. This backend exists
//! for CPU runs and for testing the multi-process path in CI; GPUs use NCCL.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{rendezvous, Communicator, Rank};

pub struct TcpGroup {
    rank: usize,
    world: usize,
    /// Rank 0: one connection per other rank (slot 0 empty). Other ranks: only slot 0, the
    /// connection to rank 0.
    links: Vec<Option<Mutex<TcpStream>>>,
}

impl TcpGroup {
    /// Meets the other ranks at `rank.master`.
    pub fn connect(rank: &Rank, timeout: Duration) -> Result<Self> {
        let Some((addr, port)) = &rank.master else {
            bail!(
                "rank {} of {}: MASTER_ADDR is not set, so the ranks cannot find each other",
                rank.rank,
                rank.world
            );
        };
        let links = if rank.is_main() {
            rendezvous::serve(*port, rank.world, &[], timeout)?
                .into_iter()
                .map(|s| s.map(Mutex::new))
                .collect()
        } else {
            let (s, _) = rendezvous::join(addr, *port, rank.rank, rank.world, timeout)?;
            vec![Some(Mutex::new(s))]
        };
        Ok(Self {
            rank: rank.rank,
            world: rank.world,
            links,
        })
    }

    fn link(&self, peer: usize) -> std::sync::MutexGuard<'_, TcpStream> {
        self.links[peer]
            .as_ref()
            .expect("a link to this peer")
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, peer: usize, data: &[f32]) -> Result<()> {
        let mut bytes = Vec::with_capacity(8 + data.len() * 4);
        bytes.extend((data.len() as u64).to_le_bytes());
        for x in data {
            bytes.extend(x.to_le_bytes());
        }
        self.link(peer)
            .write_all(&bytes)
            .with_context(|| self.lost(peer))
    }

    /// Reads one buffer of `out.len()` values from `peer`.
    fn recv(&self, peer: usize, out: &mut [f32]) -> Result<()> {
        let mut s = self.link(peer);
        let mut len = [0u8; 8];
        s.read_exact(&mut len).with_context(|| self.lost(peer))?;
        let n = u64::from_le_bytes(len) as usize;
        if n != out.len() {
            bail!(
                "rank {peer} sent {n} values where rank {} expected {} (the ranks disagree about the model or the step)",
                self.rank,
                out.len()
            );
        }
        let mut bytes = vec![0u8; n * 4];
        s.read_exact(&mut bytes).with_context(|| self.lost(peer))?;
        for (x, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *x = f32::from_le_bytes(b.try_into().unwrap());
        }
        Ok(())
    }

    fn lost(&self, peer: usize) -> String {
        format!(
            "rank {}: lost the connection to rank {peer} (another rank failed or was stopped)",
            self.rank
        )
    }
}

impl Communicator for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&self, data: &mut [f32]) -> Result<()> {
        if self.rank != 0 {
            self.send(0, data)?;
            return self.recv(0, data);
        }
        let mut sum = data.to_vec();
        let mut theirs = vec![0f32; data.len()];
        for peer in 1..self.world {
            self.recv(peer, &mut theirs)?;
            for (s, x) in sum.iter_mut().zip(&theirs) {
                *s += x;
            }
        }
        let n = self.world as f32;
        for (d, s) in data.iter_mut().zip(&sum) {
            *d = s / n;
        }
        for peer in 1..self.world {
            self.send(peer, data)?;
        }
        Ok(())
    }

    fn broadcast(&self, root: usize, data: &mut [f32]) -> Result<()> {
        match self.rank {
            0 => {
                if root != 0 {
                    self.recv(root, data)?;
                }
                for peer in (1..self.world).filter(|&p| p != root) {
                    self.send(peer, data)?;
                }
                Ok(())
            }
            r if r == root => self.send(0, data),
            _ => self.recv(0, data),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::ThreadGroup;

    fn group(world: usize) -> Vec<TcpGroup> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..world)
                .map(|r| {
                    s.spawn(move || {
                        let rank = Rank {
                            rank: r,
                            world,
                            local_rank: r,
                            master: Some(("127.0.0.1".into(), port)),
                        };
                        TcpGroup::connect(&rank, Duration::from_secs(10)).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Runs `f` on every rank of a group at once.
    fn on_all<C: Communicator, T: Send>(g: &[C], f: impl Fn(&C) -> T + Sync) -> Vec<T> {
        std::thread::scope(|s| {
            let hs: Vec<_> = g.iter().map(|c| s.spawn(|| f(c))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn process_ranks_reduce_bit_for_bit_like_thread_ranks() {
        let values = |r: usize| -> Vec<f32> {
            (0..1000)
                .map(|i| ((i * 7 + r * 13) as f32).sin() * 1e3)
                .collect()
        };
        let mean = |c: &dyn Communicator| {
            let mut v = values(c.rank());
            c.all_reduce_mean(&mut v).unwrap();
            v
        };
        let tcp = on_all(&group(3), |c| mean(c));
        let threads = on_all(&ThreadGroup::new(3), |c| mean(c));
        for v in &tcp {
            assert_eq!(v, &threads[0]);
        }
    }

    #[test]
    fn process_ranks_broadcast_from_any_root() {
        let g = group(3);
        for root in 0..3 {
            let out = on_all(&g, |c| {
                let mut v = vec![c.rank() as f32; 5];
                c.broadcast(root, &mut v).unwrap();
                v
            });
            for v in out {
                assert_eq!(v, vec![root as f32; 5]);
            }
        }
    }

    #[test]
    fn a_rank_that_goes_away_fails_the_others() {
        let mut g = group(2);
        let gone = g.pop().unwrap();
        drop(gone);
        let e = g[0].all_reduce_mean(&mut [1.0]).unwrap_err();
        assert!(
            format!("{e:#}").contains("lost the connection to rank 1"),
            "{e:#}"
        );
    }
}
