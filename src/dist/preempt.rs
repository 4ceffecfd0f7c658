//! Preemption: SLURM warns a job before killing it (`--signal=USR1@90`) and schedulers send
//! SIGTERM; a user at the terminal presses Ctrl-C (SIGINT). The first of these sets a flag
//! that the training loop reads after each step: every rank finishes the step, rank 0 writes a
//! checkpoint, and the run exits with [`EXIT_PREEMPTED`], so `--resume` continues on the exact
//! curve and nothing since the last periodic checkpoint is lost.
//!
//! The same signal often arrives twice at once (SLURM signals every process of the step, and
//! `temper launch` passes its own on to its ranks), so repeats within [`GRACE_S`] seconds of
//! the first are ignored; a signal after that ends the process at once (the default action).
//! Checkpoints are written atomically, so the last complete one stays readable.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU8, Ordering};

use anyhow::Result;

/// The exit status of a run stopped by a signal after writing its checkpoint (EX_TEMPFAIL:
/// "try again", which is what `--resume` does).
pub const EXIT_PREEMPTED: u8 = 75;

/// Seconds after the first signal during which another one is taken as the same request.
pub const GRACE_S: i64 = 5;

static REQUESTED: AtomicBool = AtomicBool::new(false);
/// The first signal's number and time (CLOCK_MONOTONIC seconds).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static FIRST_AT: AtomicI64 = AtomicI64::new(0);
/// Whether the handler keeps the first signal's line to itself (a rank whose launcher, or
/// whose rank 0, says it).
static QUIET: AtomicBool = AtomicBool::new(false);

/// Keeps the "stopping after this step" line of [`install`]'s handler off the terminal.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::SeqCst);
}

/// What the process is doing when a signal comes, which the handler's line says: a run in
/// its setup stops before its first step, one training after the step under way, and a
/// launcher passes the signal on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Setup = 0,
    Training = 1,
    Launching = 2,
}

static PHASE: AtomicU8 = AtomicU8::new(Phase::Setup as u8);

pub fn set_phase(phase: Phase) {
    PHASE.store(phase as u8, Ordering::SeqCst);
}

/// The handler's first line for the phase numbered `phase`.
fn stopping_line(phase: u8) -> &'static [u8] {
    const _: () = assert!(GRACE_S == 5, "the lines name the grace period");
    match phase {
        p if p == Phase::Training as u8 => b"\ntemper: stopping after this step, with a checkpoint (signal again after 5 s to stop at once)\n",
        p if p == Phase::Launching as u8 => b"\ntemper: stopping the ranks, each after its step, with a checkpoint (signal again after 5 s to stop at once)\n",
        _ => b"\ntemper: stopping once the setup is done, before the first step (signal again after 5 s to stop at once)\n",
    }
}

fn monotonic_s() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) is async-signal-safe and writes only `ts`.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec
}

extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe work here: atomics, clock_gettime, signal and raise.
    let now = monotonic_s();
    if !REQUESTED.swap(true, Ordering::SeqCst) {
        SIGNAL.store(sig, Ordering::SeqCst);
        FIRST_AT.store(now, Ordering::SeqCst);
        // Otherwise a Ctrl-C would seem to do nothing until the step ends.
        if QUIET.load(Ordering::SeqCst) {
            return;
        }
        let msg = stopping_line(PHASE.load(Ordering::SeqCst));
        // SAFETY: write(2) is async-signal-safe; `msg` outlives the call; errno is put back
        // for the code the signal interrupted.
        unsafe {
            let errno = *libc::__errno_location();
            libc::write(2, msg.as_ptr().cast(), msg.len());
            *libc::__errno_location() = errno;
        }
        return;
    }
    if now - FIRST_AT.load(Ordering::SeqCst) > GRACE_S {
        // The helpers' process groups first: a reward program of its own group (so that a
        // Ctrl-C does not kill it mid-step) would otherwise outlive the run, hung or not.
        for g in &GROUPS {
            let pgid = g.load(Ordering::SeqCst);
            if pgid > 0 {
                // SAFETY: kill(2) is async-signal-safe.
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
            }
        }
        // SAFETY: signal(2) and raise(3) are async-signal-safe.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }
}

/// The process groups of helper processes (`--reward cmd:` programs) that a run stopped at
/// once kills with it; a fixed table, since the handler may not allocate or lock.
static GROUPS: [AtomicI32; 32] = [const { AtomicI32::new(0) }; 32];

/// Has the process group `pgid` killed when a second signal ends the run at once. Beyond the
/// table's size a group goes unrecorded; its program still ends with the run's normal exit.
pub fn kill_group_on_stop(pgid: i32) {
    for g in &GROUPS {
        if g.compare_exchange(0, pgid, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return;
        }
    }
}

/// Forgets a group [`kill_group_on_stop`] recorded, once its program is gone.
pub fn forget_group(pgid: i32) {
    for g in &GROUPS {
        let _ = g.compare_exchange(pgid, 0, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// Installs the handler for SIGTERM, SIGUSR1 and SIGINT.
pub fn install() -> Result<()> {
    for sig in [libc::SIGTERM, libc::SIGUSR1, libc::SIGINT] {
        // SAFETY: the handler does only async-signal-safe work.
        let prev = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
        if prev == libc::SIG_ERR {
            anyhow::bail!("cannot install the handler for signal {sig}");
        }
        // A job started in the background ignores the terminal's Ctrl-C, and keeps doing so.
        if sig == libc::SIGINT && prev == libc::SIG_IGN {
            // SAFETY: as above.
            unsafe { libc::signal(sig, libc::SIG_IGN) };
        }
    }
    Ok(())
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// The signal that asked for the stop (0 before one came).
pub fn signal() -> i32 {
    SIGNAL.load(Ordering::SeqCst)
}

/// The error a preempted run returns, so `main` exits with [`EXIT_PREEMPTED`].
#[derive(Debug)]
pub struct Preempted {
    pub at: StopPoint,
    /// Already said on this terminal: a launcher of the node whose rank 0 said it.
    pub told: bool,
}

/// Where a stopped run stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopPoint {
    /// After this step, whose checkpoint the run holds (written then, or resumed from).
    After(usize),
    /// A fresh run stopped before its first step, during its setup: nothing was trained or
    /// checkpointed (an `--overwrite` run's predecessor is back in its place), and the same
    /// command starts it again.
    BeforeTraining,
    /// While the ranks waited for each other, before anything of the run was read or
    /// written: the same command (a resume among them) starts it again.
    Meeting,
    /// A launcher's view, which only sees its ranks exit.
    Unknown,
}

impl StopPoint {
    /// The run's state in a few words, for a line that goes on to say how to continue it.
    pub fn state(self) -> String {
        match self {
            StopPoint::After(s) => format!("after step {s}, with a checkpoint there"),
            StopPoint::BeforeTraining => "before its first step, with nothing trained".into(),
            StopPoint::Meeting => {
                "while its ranks waited for each other, its run directory untouched".into()
            }
            StopPoint::Unknown => "where its ranks stopped".into(),
        }
    }
}

impl std::fmt::Display for Preempted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let next = match self.at {
            StopPoint::BeforeTraining | StopPoint::Meeting => {
                "run the same command again to start it"
            }
            StopPoint::After(_) | StopPoint::Unknown => "continue with --resume",
        };
        write!(f, "stopped by a signal {}; {next}", self.at.state())
    }
}

impl std::error::Error for Preempted {}
