//! `temper launch`: starts this node's ranks as child processes with torchrun's environment
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`),
//! watches them, and stops this node's ranks when one of them fails, so that they never hang
//! on a dead local rank. (A whole node that vanishes is the scheduler's to clean up: NCCL has
//! no timeout of its own.) SIGTERM or SIGUSR1 sent to the launcher is passed on to every rank,
//! which then checkpoint and stop together. A launcher that is killed outright (SIGKILL, the
//! OOM killer) cannot pass anything on: the kernel sends its ranks SIGTERM as it dies
//! (`PR_SET_PDEATHSIG`), so they checkpoint and stop rather than train on, orphaned, holding
//! the run directory and the GPUs. (A launcher killed more than 5 s after it passed a signal
//! on ends its ranks at once, as a second signal to them would: the kill escalates the stop.)

use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::preempt::{self, EXIT_PREEMPTED};

/// The most ranks `launch` starts on one node: each loads its own model, and no machine has
/// GPUs or cores for more (a digit too many started threads until the kernel killed them).
pub const MAX_LOCAL_RANKS: usize = 1024;

/// Refuses a job of no ranks, or of more on a node than [`MAX_LOCAL_RANKS`].
pub fn check_counts(nproc_per_node: usize, nnodes: usize) -> Result<()> {
    if nproc_per_node == 0 || nnodes == 0 {
        bail!("launch: --nproc-per-node and --nnodes must be at least 1");
    }
    if nproc_per_node > MAX_LOCAL_RANKS {
        bail!(
            "launch: --nproc-per-node {nproc_per_node} is more than {MAX_LOCAL_RANKS} ranks on \
             one node, each with its own copy of the model"
        );
    }
    Ok(())
}

/// Where this node's ranks sit in the job.
#[derive(Clone, Debug)]
pub struct Layout {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl Layout {
    pub fn world(&self) -> usize {
        self.nproc_per_node * self.nnodes
    }

    fn check(&self) -> Result<()> {
        check_counts(self.nproc_per_node, self.nnodes)?;
        if self.node_rank >= self.nnodes {
            bail!(
                "launch: --node-rank {} is not below --nnodes {}",
                self.node_rank,
                self.nnodes
            );
        }
        Ok(())
    }

    /// The torchrun environment of local rank `local`, and [`LAUNCHED`].
    pub fn env(&self, local: usize) -> Vec<(&'static str, String)> {
        vec![
            (LAUNCHED, "1".into()),
            (
                "RANK",
                (self.node_rank * self.nproc_per_node + local).to_string(),
            ),
            ("WORLD_SIZE", self.world().to_string()),
            ("LOCAL_RANK", local.to_string()),
            ("LOCAL_WORLD_SIZE", self.nproc_per_node.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
        ]
    }
}

/// Set in the environment of the ranks `temper launch` starts.
const LAUNCHED: &str = "TEMPER_LAUNCHED";

/// Whether this process is a rank of `temper launch` (`var` reads the environment).
pub fn launched(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> bool {
    var(LAUNCHED).is_some()
}

/// Has the kernel send the child `signal` when this process dies, however it dies (Linux):
/// a launch's ranks SIGTERM, so that they checkpoint; a reward program SIGKILL.
#[cfg(target_os = "linux")]
pub(crate) fn signal_when_parent_dies(cmd: &mut Command, signal: libc::c_int) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec the closure calls only async-signal-safe functions
    // (prctl, getppid) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died before the prctl took hold, so nobody will send it: the child
            // ends here, before it execs. (raise would run the parent's own handler, which
            // the child keeps until exec.)
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn signal_when_parent_dies(_: &mut Command, _: i32) {}

/// How the ranks of a launch ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Every rank finished.
    Done,
    /// A signal stopped the job and every rank checkpointed: `--resume` continues it.
    Preempted,
}

/// A port on this machine that nothing holds now, for a single-node job's rank 0 to listen
/// on once it starts. Below the kernel's ephemeral range (32768 and up on Linux): a port the
/// kernel handed out and took back could go to any connecting socket before rank 0 binds it
/// (seen as "cannot listen on MASTER_PORT" among parallel tests). Each call of a process tries
/// the next candidate, so calls close together get different ports.
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 500) as u16 * 20;
    (0..2000)
        .map(|_| base + NEXT.fetch_add(1, Ordering::Relaxed) % 2000)
        .find(|&p| std::net::TcpListener::bind(("0.0.0.0", p)).is_ok())
        .context("launch: no free port between 20000 and 32000")
}

/// Runs `program args` once per local rank and waits for all of them.
pub fn run(layout: &Layout, program: &std::path::Path, args: &[String]) -> Result<Ended> {
    layout.check()?;
    let mut children: Vec<(usize, Child)> = vec![];
    for local in 0..layout.nproc_per_node {
        let mut cmd = Command::new(program);
        cmd.args(args).envs(layout.env(local));
        // SLURM's variables would otherwise compete with ours in the child.
        for k in ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"] {
            cmd.env_remove(k);
        }
        signal_when_parent_dies(&mut cmd, libc::SIGTERM);
        match cmd.spawn() {
            Ok(c) => children.push((local, c)),
            Err(e) => {
                kill_all(&mut children);
                return Err(e)
                    .with_context(|| format!("launch: cannot start {}", program.display()));
            }
        }
    }
    let rank_of = |local: usize| layout.node_rank * layout.nproc_per_node + local;
    let mut forwarded = false;
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; children.len()];
    loop {
        if preempt::requested() && !forwarded {
            forwarded = true;
            for (i, (_, c)) in children.iter().enumerate() {
                // A reaped child's pid may already belong to another process.
                if statuses[i].is_none() {
                    // SAFETY: kill(2) on our own, not yet reaped, child's pid.
                    unsafe {
                        libc::kill(c.id() as libc::pid_t, preempt::signal());
                    }
                }
            }
        }
        let mut failed = Vec::new();
        for (i, (local, c)) in children.iter_mut().enumerate() {
            if statuses[i].is_some() {
                continue;
            }
            let waited = match c.try_wait() {
                Ok(w) => w,
                Err(e) => {
                    kill_all(&mut children);
                    return Err(e).context("launch: waiting for a rank");
                }
            };
            if let Some(st) = waited {
                statuses[i] = Some(st);
                if !st.success() && st.code() != Some(i32::from(EXIT_PREEMPTED)) {
                    failed.push((rank_of(*local), st));
                }
            }
        }
        if !failed.is_empty() {
            kill_all(&mut children);
            bail!("{}", failure_line(failed));
        }
        if statuses.iter().all(Option::is_some) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let preempted = statuses
        .iter()
        .any(|s| s.and_then(|s| s.code()) == Some(i32::from(EXIT_PREEMPTED)));
    Ok(if preempted {
        Ended::Preempted
    } else {
        Ended::Done
    })
}

/// How long the ranks left running get to end on SIGTERM once one has failed, before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Stops and reaps every child: SIGTERM first, so that a rank ends as a failed run does (an
/// `--overwrite`'s set-aside run put back; a dead peer fails its next collective), then
/// SIGKILL for those still running after [`STOP_GRACE`] (one blocked in an NCCL collective
/// with a dead peer never returns).
fn kill_all(children: &mut [(usize, Child)]) {
    // try_wait reaps an ended child, and only a child not yet reaped may be signalled: its pid
    // is still its own.
    let running = |c: &mut Child| matches!(c.try_wait(), Ok(None));
    for (_, c) in children.iter_mut() {
        if running(c) {
            // SAFETY: kill(2) on our own, not yet reaped, child's pid.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    let deadline = std::time::Instant::now() + STOP_GRACE;
    while std::time::Instant::now() < deadline && children.iter_mut().any(|(_, c)| running(c)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
    }
    for (_, c) in children.iter_mut() {
        let _ = c.wait();
    }
}

/// The launch's error for ranks found failed in one poll (in rank order). A rank killed by a
/// signal is named first: one that lost its peer exits with an error in the same instant, and
/// the first in rank order is as likely to be that one.
fn failure_line(mut failed: Vec<(usize, ExitStatus)>) -> String {
    use std::os::unix::process::ExitStatusExt;
    failed.sort_by_key(|(rank, st)| (st.signal().is_none(), *rank));
    let (who, st) = failed[0];
    let mut line = format!("launch: rank {who} failed ({})", describe(st));
    for (rank, st) in &failed[1..] {
        line += &format!(", and rank {rank} ({})", describe(*st));
    }
    line + "; stopped the other ranks on this node"
}

fn describe(st: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown status".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rank_killed_by_a_signal_is_blamed_before_one_that_lost_its_peer() {
        use std::os::unix::process::ExitStatusExt;
        let (exited, killed) = (ExitStatus::from_raw(1 << 8), ExitStatus::from_raw(9));
        assert_eq!(
            failure_line(vec![(0, exited), (1, killed)]),
            "launch: rank 1 failed (killed by signal 9), and rank 0 (exit status 1); \
             stopped the other ranks on this node"
        );
        assert_eq!(
            failure_line(vec![(2, exited)]),
            "launch: rank 2 failed (exit status 1); stopped the other ranks on this node"
        );
    }

    #[test]
    fn ranks_are_numbered_node_by_node() {
        let l = Layout {
            nproc_per_node: 4,
            nnodes: 2,
            node_rank: 1,
            master_addr: "n0".into(),
            master_port: 29500,
        };
        let env = l.env(2);
        let get = |k: &str| env.iter().find(|(n, _)| *n == k).unwrap().1.clone();
        assert_eq!(get("RANK"), "6");
        assert_eq!(get("WORLD_SIZE"), "8");
        assert_eq!(get("LOCAL_RANK"), "2");
        assert_eq!(get("MASTER_ADDR"), "n0");
    }

    #[test]
    fn rank_counts_are_checked_before_any_rank_starts() {
        check_counts(8, 2).unwrap();
        check_counts(MAX_LOCAL_RANKS, 1).unwrap();
        for (n, nodes) in [(0, 1), (1, 0)] {
            let e = check_counts(n, nodes).unwrap_err().to_string();
            assert!(e.contains("must be at least 1"), "{e}");
        }
        let e = check_counts(100_000, 1).unwrap_err().to_string();
        assert!(
            e.contains("--nproc-per-node 100000 is more than 1024"),
            "{e}"
        );
    }

    /// One node of two ranks, for scripts that never connect.
    fn two_local_ranks() -> Layout {
        Layout {
            nproc_per_node: 2,
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 1,
        }
    }

    #[test]
    fn a_failing_rank_brings_the_others_down() {
        let l = two_local_ranks();
        // Rank 0 sleeps "forever"; rank 1 fails at once.
        let script = "if [ \"$RANK\" = 1 ]; then exit 3; fi; sleep 60".to_string();
        let start = std::time::Instant::now();
        let e = run(&l, std::path::Path::new("sh"), &["-c".into(), script]).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(20));
        let msg = e.to_string();
        assert!(msg.contains("rank 1 failed (exit status 3)"), "{msg}");
    }

    /// The ranks left running get SIGTERM and time to end on it (a run puts back what its
    /// `--overwrite` set aside), not an outright SIGKILL.
    #[test]
    fn the_other_ranks_get_to_end_on_sigterm() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().display();
        let l = two_local_ranks();
        // Rank 1 fails once rank 0 is ready to clean up.
        let script = format!(
            "if [ \"$RANK\" = 1 ]; then while [ ! -e {dir}/ready ]; do sleep 0.05; done; exit 3; fi; \
             trap 'touch {dir}/cleaned; exit 0' TERM; touch {dir}/ready; \
             while :; do sleep 0.1; done"
        );
        let e = run(&l, std::path::Path::new("sh"), &["-c".into(), script]).unwrap_err();
        assert!(e.to_string().contains("rank 1 failed"), "{e}");
        assert!(
            d.path().join("cleaned").exists(),
            "rank 0 was killed outright"
        );
    }
}
