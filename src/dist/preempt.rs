//! Preemption: SLURM warns a job before killing it (`--signal=USR1@90`) and schedulers send
//! SIGTERM. The first SIGTERM or SIGUSR1 sets a flag that the training loop reads after each
//! step: every rank finishes the step, rank 0 writes a checkpoint, and the run exits with
//! [`EXIT_PREEMPTED`], so `--resume` continues on the exact curve. A second signal kills the
//! process at once (the default action is restored); checkpoints are written atomically, so
//! the last complete one stays readable.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;

/// The exit status of a run stopped by a signal after writing its checkpoint (EX_TEMPFAIL:
/// "try again", which is what `--resume` does).
pub const EXIT_PREEMPTED: u8 = 75;

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe work here: a store, and restoring the default action so that a
    // second signal ends the process.
    REQUESTED.store(true, Ordering::SeqCst);
    // SAFETY: signal(2) is async-signal-safe.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
    }
}

/// Installs the handler for SIGTERM and SIGUSR1.
pub fn install() -> Result<()> {
    for sig in [libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: the handler only touches an atomic and calls signal(2).
        let prev = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
        if prev == libc::SIG_ERR {
            anyhow::bail!("cannot install the handler for signal {sig}");
        }
    }
    Ok(())
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// The error a preempted run returns, so `main` exits with [`EXIT_PREEMPTED`].
#[derive(Debug)]
pub struct Preempted {
    /// The step the checkpoint holds; unknown to a launcher, which only sees its ranks exit.
    pub step: Option<usize>,
}

impl std::fmt::Display for Preempted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.step {
            Some(s) => write!(
                f,
                "stopped by a signal after step {s}, with a checkpoint there; continue with --resume"
            ),
            None => write!(
                f,
                "stopped by a signal; every rank wrote its checkpoint; continue with --resume"
            ),
        }
    }
}

impl std::error::Error for Preempted {}
