//! Bytes over the f32 collectives: each rank's buffer gathered on rank 0 (an unfinished
//! rollout's share, for rank 0's checkpoint), and one rank's sent to all (rank 0's settings,
//! which every rank checks its own against).
//!
//! Three bytes ride in each f32 as an integer below 2^24, which every f32 holds exactly, so
//! the bytes come through whatever a backend does with the floats (no NaN bit patterns, no
//! rounding). A length rides as two such halves.

use anyhow::Result;

use super::Communicator;

const HALF: u64 = 1 << 24;

/// Every rank's `mine` on rank 0, in rank order; None on the other ranks. Collective: every
/// rank calls it, with a buffer of any length (empty included). Taken by value: a single
/// process hands its own back without a copy.
pub fn gather_on_root(comm: &dyn Communicator, mine: Vec<u8>) -> Result<Option<Vec<Vec<u8>>>> {
    let world = comm.world();
    if world == 1 {
        return Ok(Some(vec![mine]));
    }
    let root = comm.rank() == 0;
    let mut all = Vec::with_capacity(world);
    for from in 0..world {
        let (words, n) = broadcast_packed(comm, from, &mine)?;
        // Only rank 0 unpacks them; the others take part in the broadcast and drop them.
        all.push(match root {
            true => unpack(&words, n),
            false => vec![],
        });
    }
    Ok(root.then_some(all))
}

/// Rank `from`'s `mine` on every rank (the other ranks' `mine` is not read). Collective.
pub fn broadcast_from(comm: &dyn Communicator, from: usize, mine: &[u8]) -> Result<Vec<u8>> {
    let (words, n) = broadcast_packed(comm, from, mine)?;
    Ok(match from == comm.rank() {
        true => mine.to_vec(),
        false => unpack(&words, n),
    })
}

/// Rank `from`'s `mine`, packed, on every rank, with its length in bytes.
fn broadcast_packed(
    comm: &dyn Communicator,
    from: usize,
    mine: &[u8],
) -> Result<(Vec<f32>, usize)> {
    let own = from == comm.rank();
    let len = mine.len() as u64;
    let mut l = match own {
        true => [(len / HALF) as f32, (len % HALF) as f32],
        false => [0.0; 2],
    };
    comm.broadcast(from, &mut l)?;
    let n = (l[0] as u64 * HALF + l[1] as u64) as usize;
    if n == 0 {
        return Ok((vec![], 0));
    }
    let mut words = match own {
        true => pack(mine),
        false => vec![0.0; n.div_ceil(3)],
    };
    comm.broadcast(from, &mut words)?;
    Ok((words, n))
}

fn pack(b: &[u8]) -> Vec<f32> {
    b.chunks(3)
        .map(|c| {
            let w = c
                .iter()
                .enumerate()
                .fold(0u32, |w, (i, &x)| w | u32::from(x) << (8 * i));
            w as f32
        })
        .collect()
}

fn unpack(w: &[f32], n: usize) -> Vec<u8> {
    let mut b: Vec<u8> = w
        .iter()
        .flat_map(|&f| {
            let x = f as u32;
            [x as u8, (x >> 8) as u8, (x >> 16) as u8]
        })
        .collect();
    b.truncate(n);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::ThreadGroup;

    /// Three ranks' buffers of awkward lengths (none, one byte, a length that is no multiple
    /// of 3) and every byte value reach rank 0 whole and in rank order; the others get none.
    #[test]
    fn every_ranks_bytes_reach_rank_0_whole() {
        let mine = |r: usize| -> Vec<u8> {
            match r {
                0 => (0..=255u8).chain(0..=255u8).rev().collect(),
                1 => vec![],
                _ => (0..1000u32).map(|i| (i * 7919 % 251) as u8).collect(),
            }
        };
        assert_eq!(pack(&[255, 255, 255])[0], (HALF - 1) as f32);
        let group = ThreadGroup::new(3);
        let got: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = group
                .iter()
                .map(|c| s.spawn(move || gather_on_root(c, mine(c.rank())).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(got[0], Some((0..3).map(mine).collect::<Vec<_>>()));
        assert!(got[1].is_none() && got[2].is_none());
        let sent: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = group
                .iter()
                .map(|c| s.spawn(move || broadcast_from(c, 2, &mine(c.rank())).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(sent, vec![mine(2); 3]);
    }
}
