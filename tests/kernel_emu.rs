//! The CUDA kernels run on the CPU, in the emulator of tests/kernel_emu/, against their
//! references (scripts/kernel-emu.sh): their index maths, tiles, masks and mma fragment
//! layouts are checked here on every CI run, GPU or not, with a fresh seed each time. The
//! device tests (tests/gpu_*.rs) still decide speed and what only hardware shows.

use std::process::Command;

#[test]
fn cuda_kernels_match_their_references_in_the_cpu_emulator() {
    let gxx = Command::new("g++").arg("-dumpversion").output();
    let major = gxx
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| v.trim().split('.').next()?.parse::<u32>().ok());
    match major {
        Some(m) if m >= 12 => {}
        other => {
            eprintln!(
                "SKIPPED: the kernel emulator needs g++ 12 or newer (found {other:?}); \
                 the CUDA kernels were not run on the CPU"
            );
            return;
        }
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg("scripts/kernel-emu.sh")
        .current_dir(root)
        .output()
        .expect("run scripts/kernel-emu.sh");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kernel emulator failed:\n{log}");
    assert!(log.contains("all drivers passed"), "{log}");
}
