//! The host allocator of the `temper` binary: the system's, except that an allocation the
//! system refuses ends the process with one line that says how much was asked, how much the
//! machine has, and which of the run's settings decide the size, where Rust's default would
//! print only the byte count and abort with a core dump. A batch size with a digit too many
//! is the usual cause, and the user needs to be told which setting to lower.
//!
//! Nothing is lost by exiting here: checkpoints are written to a temporary directory and
//! renamed into place, so the last good one stays readable.
//!
//! The failure path allocates nothing (the line is formatted into a stack buffer and written
//! to fd 2, /proc/meminfo read into another), since the allocator that just failed would be
//! asked again.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicPtr, Ordering};

/// Exit status after a refused allocation: an ordinary failure, as any other error of a run.
const EXIT_STATUS: i32 = 1;

/// What the process is doing and the settings that size its allocations, for the line a
/// refused allocation prints: "the pretrain run (train.batch_size = 64, train.seq_len = 128)".
static HINT: AtomicPtr<String> = AtomicPtr::new(std::ptr::null_mut());

/// Says what the process is doing, for the line a refused allocation prints. The previous
/// hint is leaked rather than freed: a failing allocation on another thread may be reading
/// it, and a process sets only a few.
pub fn set_hint(hint: String) {
    HINT.store(Box::into_raw(Box::new(hint)), Ordering::Release);
}

/// The hint last set, for an error that a size check raises before allocating.
pub fn hint() -> Option<&'static str> {
    let hint = HINT.load(Ordering::Acquire);
    // SAFETY: a hint is leaked when replaced, so a pointer once stored stays valid for ever.
    (!hint.is_null()).then(|| unsafe { (*hint).as_str() })
}

/// "`what` (key = value, ...)", the hint of a run or command sized by `sizes`.
pub fn hint_of(what: &str, sizes: &[(&str, usize)]) -> String {
    let sizes: Vec<String> = sizes.iter().map(|(k, v)| format!("{k} = {v}")).collect();
    match sizes.is_empty() {
        true => what.to_string(),
        false => format!("{what} ({})", sizes.join(", ")),
    }
}

/// The system allocator, with the failure line above.
pub struct HostAlloc;

unsafe impl GlobalAlloc for HostAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        refused_ends_process(System.alloc(layout), layout.size())
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        refused_ends_process(System.alloc_zeroed(layout), layout.size())
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        refused_ends_process(System.realloc(ptr, layout, new_size), new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

fn refused_ends_process(ptr: *mut u8, size: usize) -> *mut u8 {
    if ptr.is_null() {
        let mut line = StackLine::default();
        write_line(&mut line, size, available_bytes(), hint());
        // SAFETY: fd 2 is the process's stderr; a failed or short write leaves nothing to do.
        unsafe {
            libc::write(2, line.buf.as_ptr().cast(), line.len);
            libc::_exit(EXIT_STATUS);
        }
    }
    ptr
}

/// The line a refused allocation of `size` bytes prints.
fn write_line(
    out: &mut impl std::fmt::Write,
    size: usize,
    available: Option<u64>,
    hint: Option<&str>,
) {
    let gb = |b: f64| b / 1e9;
    let _ = write!(
        out,
        "error: out of host memory: {:.1} GB asked for",
        gb(size as f64)
    );
    if let Some(avail) = available {
        let _ = write!(out, ", {:.1} GB available", gb(avail as f64));
    }
    match hint {
        Some(hint) => {
            let _ = write!(out, ", in {hint}: lower the size that is too large");
        }
        None => {
            let _ = write!(out, ": lower the batch or sequence sizes");
        }
    }
    let _ = writeln!(out, " (checkpoints already written are intact)");
}

/// A line formatted without the heap; what does not fit is cut.
struct StackLine {
    buf: [u8; 1024],
    len: usize,
}

impl Default for StackLine {
    fn default() -> Self {
        StackLine {
            buf: [0; 1024],
            len: 0,
        }
    }
}

impl std::fmt::Write for StackLine {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        // Keep the last byte for the newline that a cut line would otherwise lose.
        let room = (self.buf.len() - 1).saturating_sub(self.len);
        let take = s.len().min(room);
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        if take < s.len() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b'\n';
                self.len += 1;
            }
            return Err(std::fmt::Error);
        }
        Ok(())
    }
}

/// `MemAvailable` of /proc/meminfo, read without the heap (so that the failure line can read
/// it; every other reader goes through [`crate::device::host_available_bytes`]).
pub fn available_bytes() -> Option<u64> {
    let mut buf = [0u8; 4096];
    // SAFETY: a NUL-terminated path, and a read into a buffer of the length given.
    let n = unsafe {
        let fd = libc::open(c"/proc/meminfo".as_ptr(), libc::O_RDONLY);
        if fd < 0 {
            return None;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        n
    };
    mem_available(&buf[..usize::try_from(n).ok()?])
}

fn mem_available(meminfo: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(meminfo).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_the_sizes_of_the_run() {
        let hint = hint_of(
            "the pretrain run",
            &[("train.batch_size", 1_000_000), ("train.seq_len", 64)],
        );
        let mut line = String::new();
        write_line(&mut line, 32_768_000_000, Some(22_100_000_000), Some(&hint));
        assert_eq!(
            line,
            "error: out of host memory: 32.8 GB asked for, 22.1 GB available, in the pretrain run (train.batch_size = 1000000, train.seq_len = 64): lower the size that is too large (checkpoints already written are intact)\n"
        );
        let mut line = String::new();
        write_line(&mut line, 2_000_000_000, None, None);
        assert_eq!(
            line,
            "error: out of host memory: 2.0 GB asked for: lower the batch or sequence sizes (checkpoints already written are intact)\n"
        );
    }

    #[test]
    fn a_line_too_long_is_cut_and_still_ends() {
        let mut line = StackLine::default();
        write_line(&mut line, 1, None, Some(&"x".repeat(5000)));
        assert_eq!(line.len, line.buf.len());
        assert_eq!(line.buf[line.len - 1], b'\n');
    }

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text =
            b"MemTotal:       24000000 kB\nMemFree:        100 kB\nMemAvailable:   2000 kB\n";
        assert_eq!(mem_available(text), Some(2000 * 1024));
        assert_eq!(mem_available(b"MemTotal: 1 kB\n"), None);
    }
}
