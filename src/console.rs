//! Lines for the terminal that ignore write errors. Rust ignores SIGPIPE, so once the reader of
//! a pipe is gone (`temper ... 2>&1 | tee log` and a Ctrl-C, which ends `tee` too; `temper ...
//! | head`) every write fails with EPIPE, and `eprintln!`/`println!` panic on that: a run
//! stopping with a checkpoint (src/dist/preempt.rs) would die before writing it. Output the run
//! does not depend on goes through these macros instead.

/// `eprintln!` that ignores a failed write.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stderr().lock(), $($arg)*);
    }};
}

static FOLLOWER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

std::thread_local! {
    static FOLLOWER_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this process as a data-parallel rank other than 0: rank 0 already gives the
/// lines about the run that every rank would print (`warnln!`).
pub fn set_follower(on: bool) {
    FOLLOWER.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Marks the calling thread as a rank other than 0, for ranks that are threads of one
/// process (`launch --threads`).
pub fn set_follower_thread(on: bool) {
    FOLLOWER_THREAD.with(|f| f.set(on));
}

pub fn follower() -> bool {
    FOLLOWER.load(std::sync::atomic::Ordering::Relaxed) || FOLLOWER_THREAD.with(|f| f.get())
}

/// Prints a warning on rank 0 the first time this process meets it: a directory read for its
/// train split and again for its held-out one says what it leaves out once, and a condition met
/// at every rollout is said at the first.
pub fn warn_once(line: String) {
    // Before the line is kept: a rank thread that says nothing must not use up rank 0's.
    if follower() {
        return;
    }
    static SAID: std::sync::Mutex<std::collections::BTreeSet<String>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if said.insert(line.clone()) {
        crate::errln!("{line}");
    }
}

/// [`errln!`] on rank 0 (and in a single process) only: a line about the run as a whole (its
/// data, its settings, where it resumed), which every rank would print alike.
#[macro_export]
macro_rules! warnln {
    ($($arg:tt)*) => {{
        if !$crate::console::follower() {
            $crate::errln!($($arg)*);
        }
    }};
}

/// `eprint!` that ignores a failed write.
#[macro_export]
macro_rules! errprint {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::write!(::std::io::stderr().lock(), $($arg)*);
    }};
}

/// `println!` that ignores a failed write.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stdout().lock(), $($arg)*);
    }};
}
