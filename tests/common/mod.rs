#![allow(dead_code)]
//! Helpers for the integration tests: running the CLI and reading what it wrote.

#[cfg(feature = "cuda")]
pub mod gpu;
pub mod kernel_sources;
pub mod shared;

#[allow(unused_imports)]
pub use shared::{chain_dir, shared, Shared};

/// A GPU test: `gpu_test!(name)` runs `gpu::name`, `gpu_test!(module::name)` runs
/// `module::name`, on the device (`common::gpu::run`, which says visibly when there is none);
/// with `, alone` (a test that captures CUDA graphs) no other GPU test of the binary runs
/// beside it (`common::gpu::run_alone`).
/// Built without feature `cuda` it prints `SKIPPED (built without feature cuda): <name>`.
#[macro_export]
macro_rules! gpu_test {
    ($name:ident) => {
        $crate::gpu_test!(gpu::$name);
    };
    ($name:ident, alone) => {
        $crate::gpu_test!(gpu::$name, alone);
    };
    ($module:ident :: $name:ident) => {
        $crate::gpu_test!(@with run $module::$name);
    };
    ($module:ident :: $name:ident, alone) => {
        $crate::gpu_test!(@with run_alone $module::$name);
    };
    (@with $runner:ident $module:ident :: $name:ident) => {
        #[test]
        fn $name() {
            #[cfg(feature = "cuda")]
            $crate::common::gpu::$runner(stringify!($name), $module::$name);
            #[cfg(not(feature = "cuda"))]
            $crate::common::skipped("built without feature cuda", stringify!($name));
        }
    };
}

/// Says why a test did not run. Straight to the stderr handle: `eprintln!` would be captured
/// and hidden.
pub fn skipped(reason: &str, name: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED ({reason}): {name}");
}

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// Polls `ready` every 20 ms until it holds, failing with `what` after `limit_s` seconds.
pub fn wait_until(limit_s: u64, what: &str, mut ready: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ready() {
        assert!(t0.elapsed() < Duration::from_secs(limit_s), "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGTERM to a child of this test, as a scheduler's preemption notice.
pub fn sigterm(child: &Child) {
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

pub fn temper() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_temper"));
    c.env("TEMPER_NO_BAR", "1");
    c.env("CANDLE_NUM_THREADS", "1");
    c
}

pub fn run_ok(args: &[&str]) -> Output {
    let out = temper().args(args).output().expect("spawn temper");
    assert!(
        out.status.success(),
        "temper {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A short CPU pretraining run with config file `config` into `out`, as later stages' init.
pub fn pretrain_on_cpu(config: &str, out: &Path, steps: u32) {
    let steps = steps.to_string();
    run_ok(&[
        "pretrain",
        "--config",
        config,
        "--out",
        out.to_str().unwrap(),
        "--steps",
        &steps,
        "--device",
        "cpu",
    ]);
}

/// Owned arguments as the `&str`s [`run_ok`] and [`run_err`] take.
pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Runs temper expecting failure; returns stderr.
pub fn run_err(args: &[&str]) -> String {
    let out = temper().args(args).output().expect("spawn temper");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "temper {args:?} should fail; stderr:\n{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
    err
}

pub fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    temper::train::metrics::read(&dir.join("metrics.jsonl")).unwrap()
}

/// The steps of a run's training metric lines, in the order logged.
pub fn train_steps(dir: &Path) -> Vec<u64> {
    metrics(dir)
        .iter()
        .filter(|m| m["split"] == "train")
        .map(|m| m["step"].as_u64().unwrap())
        .collect()
}

pub fn series(m: &[serde_json::Value], split: &str, key: &str) -> Vec<(u64, f64)> {
    m.iter()
        .filter(|v| v["split"] == split)
        .filter_map(|v| Some((v["step"].as_u64()?, v[key].as_f64()?)))
        .collect()
}

/// Largest absolute element-wise difference of two tensors of one shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// A copy of directory `from`'s files (not its subdirectories) in a new directory `to`.
pub fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in std::fs::read_dir(from).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
        }
    }
}

/// A copy of directory `from` and everything under it, as `to`.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let f = e.unwrap().path();
        let dest = to.join(f.file_name().unwrap());
        match f.is_dir() {
            true => copy_tree(&f, &dest),
            false => drop(std::fs::copy(&f, dest).unwrap()),
        }
    }
}

/// A small, fast model config for tests.
pub const TINY_TOML: &str = r#"
[model]
hidden_size = 64
intermediate_size = 160
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
max_position_embeddings = 64

[train]
batch_size = 16
seq_len = 48
eval_batches = 2
"#;
