//! Where a process sits in a job: its rank, the world size and rank 0's address, from
//! torchrun's or SLURM's environment.

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
        let port = match num("MASTER_PORT")? {
            None => 29500,
            Some(p) => u16::try_from(p)
                .ok()
                .filter(|&p| p > 0)
                .with_context(|| format!("MASTER_PORT={p} is not a port (1-65535)"))?,
        };
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

/// The first host of a SLURM node list: `gpu[01-04],cpu7` -> `gpu01`,
/// `node[1-2]-ib` -> `node1-ib`.
pub fn first_host(list: &str) -> String {
    let list = list.trim();
    // The first entry ends at a comma outside brackets.
    let mut depth = 0;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let first = &list[..end];
    match first.split_once('[') {
        Some((prefix, rest)) => {
            let n = rest.split(['-', ',', ']']).next().unwrap_or("");
            let suffix = rest.split_once(']').map_or("", |(_, s)| s);
            format!("{prefix}{n}{suffix}")
        }
        None => first.to_string(),
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
        assert_eq!(first_host("node[1-2,5]-ib,login3"), "node1-ib");
        assert_eq!(first_host("cpu7"), "cpu7");
        assert!(Rank::from_env(env(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_PORT", "70000")
        ]))
        .is_err());
        assert_eq!(Rank::from_env(env(&[])).unwrap(), Rank::single());
        assert!(Rank::from_env(env(&[("RANK", "4"), ("WORLD_SIZE", "4")])).is_err());
        assert!(Rank::from_env(env(&[("RANK", "x"), ("WORLD_SIZE", "4")])).is_err());
    }
}
