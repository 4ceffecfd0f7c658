//! The TCP rendezvous at `MASTER_ADDR:MASTER_PORT`: rank 0 listens, every other rank
//! connects and says who it is, and rank 0 answers each with the same payload (the NCCL
//! unique id on GPUs, nothing on CPUs). Both sides give up after a timeout with an error that
//! names the address and the missing ranks, rather than hanging a job that cannot start.
//! The connections stay open: the CPU backend relays its collectives over them, and a rank
//! that dies closes its socket, which its peers see at once.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::preempt::{self, Preempted, StopPoint};

/// A signal that came while the ranks wait for each other stops the wait, as one during the
/// rest of a run's setup stops it before its first step: the wait may last its whole timeout.
fn stop_if_asked() -> Result<()> {
    if preempt::requested() {
        return Err(Preempted {
            at: StopPoint::Meeting,
            told: false,
        }
        .into());
    }
    Ok(())
}

/// "tmpr": a stray connection (a port scanner, another job) is told apart from a rank.
const MAGIC: u32 = 0x746d_7072;

/// Rank 0's side: listens on every interface at `port` until `world - 1` ranks have
/// arrived, sends each `payload`, and returns their connections indexed by rank (slot 0 is
/// empty).
pub fn serve(
    port: u16,
    world: usize,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<Option<TcpStream>>> {
    let listener = TcpListener::bind(("0.0.0.0", port))
        .with_context(|| format!("rank 0: cannot listen on MASTER_PORT {port}"))?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    let mut arrived = 1;
    while arrived < world {
        match listener.accept() {
            Ok((stream, from)) => {
                stream.set_nonblocking(false)?;
                // A peer that connects but never speaks must not stall the others.
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                let Some(rank) = greet(&stream, from, world)? else {
                    continue;
                };
                if peers[rank].is_some() {
                    bail!(
                        "rank 0: two processes say they are rank {rank} (the second from {from})"
                    );
                }
                let mut s = stream;
                s.write_all(&(payload.len() as u32).to_le_bytes())?;
                s.write_all(payload)?;
                s.set_read_timeout(None)?;
                s.set_nodelay(true)?;
                peers[rank] = Some(s);
                arrived += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                stop_if_asked()?;
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (1..world)
                        .filter(|&r| peers[r].is_none())
                        .map(|r| r.to_string())
                        .collect();
                    bail!(
                        "rank 0: {} of {} ranks arrived at port {port} within {:.0} s; rank(s) {} never connected (are they running, and can they reach this host?)",
                        arrived - 1,
                        world - 1,
                        timeout.as_secs_f64(),
                        missing.join(", ")
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("rank 0: accepting a rank's connection"),
        }
    }
    Ok(peers)
}

/// Reads a peer's hello: `Some(rank)` for a rank of this job; `None` (connection dropped)
/// for anything that does not speak the protocol.
fn greet(mut s: &TcpStream, from: SocketAddr, world: usize) -> Result<Option<usize>> {
    let mut hello = [0u8; 12];
    if s.read_exact(&mut hello).is_err() {
        return Ok(None);
    }
    let word = |i: usize| u32::from_le_bytes(hello[i * 4..i * 4 + 4].try_into().unwrap());
    if word(0) != MAGIC {
        return Ok(None);
    }
    let (rank, their_world) = (word(1) as usize, word(2) as usize);
    if their_world != world {
        bail!("rank 0: rank {rank} (at {from}) was started with WORLD_SIZE {their_world}, rank 0 with {world}");
    }
    if rank == 0 || rank >= world {
        bail!("rank 0: a process at {from} says it is rank {rank} of {world}");
    }
    Ok(Some(rank))
}

/// Another rank's side: connects to rank 0 at `addr:port`, retrying until `timeout` (rank
/// 0 may start later), and returns the connection and rank 0's payload.
pub fn join(
    addr: &str,
    port: u16,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<(TcpStream, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    let unreachable = |why: String| {
        anyhow::anyhow!(
            "rank {rank}: could not reach rank 0 at MASTER_ADDR:MASTER_PORT = {addr}:{port} within {:.0} s ({why}); is rank 0 running, and is the port open?",
            timeout.as_secs_f64()
        )
    };
    let mut stream = loop {
        let last = match (addr, port).to_socket_addrs() {
            Ok(addrs) => {
                let mut err = String::from("no address");
                let mut got = None;
                for a in addrs {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match TcpStream::connect_timeout(&a, left.max(Duration::from_millis(1))) {
                        Ok(s) => {
                            got = Some(s);
                            break;
                        }
                        Err(e) => err = e.to_string(),
                    }
                }
                match got {
                    Some(s) => break s,
                    None => err,
                }
            }
            Err(e) => format!("cannot resolve {addr}: {e}"),
        };
        stop_if_asked()?;
        if Instant::now() >= deadline {
            return Err(unreachable(last));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut hello = Vec::with_capacity(12);
    for w in [MAGIC, rank as u32, world as u32] {
        hello.extend(w.to_le_bytes());
    }
    stream.write_all(&hello)?;
    let left = deadline.saturating_duration_since(Instant::now());
    stream.set_read_timeout(Some(left.max(Duration::from_secs(1))))?;
    let mut len = [0u8; 4];
    stream
        .read_exact(&mut len)
        .map_err(|e| unreachable(format!("connected, but rank 0 did not answer: {e}")))?;
    let mut payload = vec![0u8; u32::from_le_bytes(len) as usize];
    stream.read_exact(&mut payload)?;
    stream.set_read_timeout(None)?;
    stream.set_nodelay(true)?;
    Ok((stream, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        crate::dist::launch::free_port().unwrap()
    }

    #[test]
    fn ranks_meet_and_get_rank_zeros_payload() {
        let port = free_port();
        let t = Duration::from_secs(10);
        std::thread::scope(|s| {
            let server = s.spawn(move || serve(port, 3, b"id", t).unwrap());
            let joins: Vec<_> = (1..3)
                .map(|r| s.spawn(move || join("127.0.0.1", port, r, 3, t).unwrap().1))
                .collect();
            for j in joins {
                assert_eq!(j.join().unwrap(), b"id");
            }
            let peers = server.join().unwrap();
            assert!(peers[0].is_none() && peers[1].is_some() && peers[2].is_some());
        });
    }

    #[test]
    fn a_rank_that_cannot_reach_rank_zero_fails_within_its_timeout() {
        let port = free_port();
        let start = Instant::now();
        let e = join("127.0.0.1", port, 1, 2, Duration::from_millis(500)).unwrap_err();
        let msg = e.to_string();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(msg.contains("could not reach rank 0"), "{msg}");
        assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    }

    #[test]
    fn rank_zero_names_the_ranks_that_never_came() {
        let port = free_port();
        let t = Duration::from_millis(800);
        std::thread::scope(|s| {
            let server = s.spawn(move || serve(port, 3, b"", t));
            s.spawn(move || join("127.0.0.1", port, 2, 3, t).unwrap());
            let msg = server.join().unwrap().unwrap_err().to_string();
            assert!(msg.contains("1 of 2 ranks arrived"), "{msg}");
            assert!(msg.contains("rank(s) 1 never connected"), "{msg}");
        });
    }

    #[test]
    fn a_rank_from_another_world_size_is_refused() {
        let port = free_port();
        let t = Duration::from_secs(5);
        std::thread::scope(|s| {
            let server = s.spawn(move || serve(port, 2, b"", t));
            s.spawn(move || {
                let _ = join("127.0.0.1", port, 1, 4, t);
            });
            let msg = server.join().unwrap().unwrap_err().to_string();
            assert!(msg.contains("WORLD_SIZE 4"), "{msg}");
        });
    }
}
