//! Runs shared by the tests of one test binary: the first test that needs a run builds it,
//! the others wait for it. A build that panics is recorded, not retried, so each test that
//! needs it then fails at once with the cause, and no half-built run is read or built again.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

pub type Shared<T> = OnceLock<Result<T, String>>;

pub fn shared<T>(cell: &'static Shared<T>, what: &str, build: impl FnOnce() -> T) -> &'static T {
    let built = cell.get_or_init(|| {
        catch_unwind(AssertUnwindSafe(build)).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic without a message".into())
        })
    });
    match built {
        Ok(t) => t,
        Err(e) => {
            panic!("the shared {what} failed to build (once, for every test that needs it):\n{e}")
        }
    }
}

/// A fresh directory under `parent` (the test binary's `CARGO_TARGET_TMPDIR`) for a chain of
/// shared runs. A static is never dropped, so each process's directory outlives it; those of
/// earlier processes with the same `prefix` are removed here once an hour old, long after
/// their tests ended.
pub fn chain_dir(parent: &str, prefix: &str) -> tempfile::TempDir {
    let parent = Path::new(parent);
    std::fs::create_dir_all(parent).unwrap();
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        let stale = entry.file_name().to_string_lossy().starts_with(prefix)
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < hour_ago);
        if stale {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(parent)
        .unwrap()
}
