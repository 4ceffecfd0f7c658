//! The TCP rendezvous at `MASTER_ADDR:MASTER_PORT`: rank 0 listens, every other rank
//! connects and says who it is, and once all have arrived rank 0 answers each with the same
//! payload (the NCCL unique id on GPUs, nothing on CPUs). Until then no rank has gone on, so a
//! signal or a timeout at rank 0 is told to every rank waiting and they stop alike, rather
//! than some ranks going on to setup with a peer that has left. Both sides give up after a
//! timeout with an error that names the address and the missing ranks, rather than hanging a
//! job that cannot start. The connections stay open: the CPU backend relays its collectives
//! over them, and a rank that dies closes its socket, which its peers see at once.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::preempt::{self, Preempted, StopPoint};

/// The stop of a wait for the other ranks, on a signal: one during the rest of a run's setup
/// stops it before its first step, and the wait may last its whole timeout.
fn stopped() -> anyhow::Error {
    Preempted {
        at: StopPoint::Meeting,
        told: false,
    }
    .into()
}

/// "tmpr": a stray connection (a port scanner, another job) is told apart from a rank.
const MAGIC: u32 = 0x746d_7072;

/// Rank 0's answers other than a payload's length: it stopped on a signal, or it gave up (a
/// rank never came, or one was refused), which its own error explains.
const ANSWER_STOPPED: u32 = u32::MAX;
const ANSWER_GAVE_UP: u32 = u32::MAX - 1;

/// How often a waiting side looks for a stop request.
const POLL: Duration = Duration::from_millis(100);

/// Rank 0's side: listens on every interface at `port` until `world - 1` ranks have
/// arrived, sends each `payload`, and returns their connections indexed by rank (slot 0 is
/// empty).
pub fn serve(
    port: u16,
    world: usize,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<Option<TcpStream>>> {
    serve_until(port, world, payload, timeout, &preempt::requested)
}

fn serve_until(
    port: u16,
    world: usize,
    payload: &[u8],
    timeout: Duration,
    stop: &dyn Fn() -> bool,
) -> Result<Vec<Option<TcpStream>>> {
    let listener = TcpListener::bind(("0.0.0.0", port))
        .with_context(|| format!("rank 0: cannot listen on MASTER_PORT {port}"))?;
    listener.set_nonblocking(true)?;
    let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    let gathered = gather(&listener, &mut peers, port, timeout, stop);
    // Every rank that arrived hears how the wait ended; one that has gone since is no matter.
    let answer = |s: &mut TcpStream, words: &[u8]| s.write_all(words).is_ok();
    let ended = match &gathered {
        Ok(()) => {
            let mut msg = (payload.len() as u32).to_le_bytes().to_vec();
            msg.extend_from_slice(payload);
            msg
        }
        Err(e) if e.downcast_ref::<Preempted>().is_some() => ANSWER_STOPPED.to_le_bytes().to_vec(),
        Err(_) => ANSWER_GAVE_UP.to_le_bytes().to_vec(),
    };
    let mut all_told = true;
    for s in peers.iter_mut().flatten() {
        all_told &= answer(s, &ended);
    }
    // A rank whose connection the kernel completed but `gather` had not yet taken would see
    // the listener's close as a reset: it hears the end too.
    if gathered.is_err() {
        while let Ok((mut s, _)) = listener.accept() {
            // Its hello read first: a socket closed with unread data resets the connection,
            // which may discard the answer before the rank reads it.
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            let _ = s.read_exact(&mut [0u8; 12]);
            let _ = s.write_all(&ended);
        }
    }
    gathered?;
    if !all_told {
        if stop() {
            return Err(stopped());
        }
        bail!("rank 0: a rank left before every rank had arrived");
    }
    for s in peers.iter_mut().flatten() {
        s.set_nodelay(true)?;
    }
    Ok(peers)
}

/// Accepts ranks into `peers` until every one has arrived, a stop is asked, or `timeout`.
fn gather(
    listener: &TcpListener,
    peers: &mut [Option<TcpStream>],
    port: u16,
    timeout: Duration,
    stop: &dyn Fn() -> bool,
) -> Result<()> {
    let world = peers.len();
    let deadline = Instant::now() + timeout;
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
                stream.set_read_timeout(None)?;
                peers[rank] = Some(stream);
                arrived += 1;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if stop() {
                    return Err(stopped());
                }
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
    Ok(())
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
/// 0 may start later), and returns the connection and rank 0's payload, which comes once
/// every rank has arrived.
pub fn join(
    addr: &str,
    port: u16,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<(TcpStream, Vec<u8>)> {
    join_until(addr, port, rank, world, timeout, &preempt::requested)
}

fn join_until(
    addr: &str,
    port: u16,
    rank: usize,
    world: usize,
    timeout: Duration,
    stop: &dyn Fn() -> bool,
) -> Result<(TcpStream, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    let unreachable = |why: String| {
        anyhow!(
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
        if stop() {
            return Err(stopped());
        }
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
    // Rank 0 answers within its own timeout of this connection, with the payload or with how
    // its wait ended; the margin covers the two clocks' starts and a stray connection's hello
    // that rank 0 waits for (10 s).
    let answer_by = Instant::now() + timeout + Duration::from_secs(30);
    let at = format!("rank {rank}: rank 0 at {addr}:{port}");
    let mut len = [0u8; 4];
    let said = |what: &'static str| {
        let at = at.clone();
        move |e: anyhow::Error| match e.downcast_ref::<Preempted>() {
            Some(_) => e,
            None => e.context(format!("{at} {what}")),
        }
    };
    read_waiting(&mut stream, &mut len, answer_by, stop).map_err(said("did not answer"))?;
    let len = match u32::from_le_bytes(len) {
        ANSWER_STOPPED => return Err(stopped()),
        ANSWER_GAVE_UP => {
            bail!("{at} gave up waiting for the other ranks (its error says why)")
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    read_waiting(&mut stream, &mut payload, answer_by, stop)
        .map_err(said("did not finish its answer"))?;
    stream.set_read_timeout(None)?;
    stream.set_nodelay(true)?;
    Ok((stream, payload))
}

/// Fills `buf` from `s`, looking for a stop request between reads, until `deadline`.
fn read_waiting(
    s: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    stop: &dyn Fn() -> bool,
) -> Result<()> {
    s.set_read_timeout(Some(POLL))?;
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => bail!("it closed the connection before every rank had arrived"),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stop() {
                    return Err(stopped());
                }
                if Instant::now() >= deadline {
                    bail!("no answer in time");
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
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
            s.spawn(move || join("127.0.0.1", port, 2, 3, t).unwrap_err());
            let msg = server.join().unwrap().unwrap_err().to_string();
            assert!(msg.contains("1 of 2 ranks arrived"), "{msg}");
            assert!(msg.contains("rank(s) 1 never connected"), "{msg}");
        });
    }

    /// No rank has its answer before every rank has arrived, so a stop at rank 0 reaches
    /// every rank still waiting.
    #[test]
    fn rank_zero_answers_once_every_rank_has_arrived() {
        let port = free_port();
        let t = Duration::from_secs(20);
        std::thread::scope(|s| {
            let server = s.spawn(move || serve(port, 3, b"id", t).unwrap());
            let first = s.spawn(move || join("127.0.0.1", port, 1, 3, t).unwrap().1);
            std::thread::sleep(Duration::from_millis(600));
            assert!(!first.is_finished(), "rank 1 went on before rank 2 arrived");
            let second = s.spawn(move || join("127.0.0.1", port, 2, 3, t).unwrap().1);
            assert_eq!(first.join().unwrap(), b"id");
            assert_eq!(second.join().unwrap(), b"id");
            server.join().unwrap();
        });
    }

    #[test]
    fn a_stop_at_rank_zero_stops_the_ranks_waiting_on_it() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let port = free_port();
        let t = Duration::from_secs(20);
        let asked = AtomicBool::new(false);
        let never = || false;
        let preempted = |r: Result<()>| {
            let e = r.unwrap_err();
            match e.downcast_ref::<Preempted>() {
                Some(p) => p.at,
                None => panic!("not a stop: {e:#}"),
            }
        };
        std::thread::scope(|s| {
            let asked = &asked;
            let stop = move || asked.load(Ordering::Relaxed);
            let server = s.spawn(move || serve_until(port, 3, b"", t, &stop).map(|_| ()));
            let waiting =
                s.spawn(move || join_until("127.0.0.1", port, 1, 3, t, &never).map(|_| ()));
            // Long enough for the join to connect on a loaded machine; one that connected late
            // is still told (the listener's backlog is drained).
            std::thread::sleep(Duration::from_millis(1500));
            let t0 = Instant::now();
            asked.store(true, Ordering::Relaxed);
            assert_eq!(preempted(server.join().unwrap()), StopPoint::Meeting);
            assert_eq!(preempted(waiting.join().unwrap()), StopPoint::Meeting);
            assert!(t0.elapsed() < Duration::from_secs(5));
        });
    }

    #[test]
    fn ranks_waiting_hear_that_rank_zero_gave_up() {
        let port = free_port();
        let t = Duration::from_secs(2);
        std::thread::scope(|s| {
            let server = s.spawn(move || serve(port, 3, b"", t));
            let waiting = s.spawn(move || join("127.0.0.1", port, 2, 3, 10 * t));
            let e = server.join().unwrap().unwrap_err().to_string();
            assert!(e.contains("rank(s) 1 never connected"), "{e}");
            let e = waiting.join().unwrap().unwrap_err().to_string();
            assert!(e.contains("gave up waiting for the other ranks"), "{e}");
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
