//! Compiles `kernels/*.cu` to PTX when feature `cuda` is on, and does nothing otherwise.
//!
//! Every kernel file is compiled once per target arch (`TEMPER_CUDA_ARCHS`, default `80,90`;
//! an entry like `90a` targets the arch-specific ISA, loaded only on exactly that chip). The
//! PTX lands in `OUT_DIR` and `OUT_DIR/kernels_ptx.rs` embeds it as a table
//! `(stem, arch, ptx)` that `src/kernels/cuda/mod.rs` picks from at run time (the highest
//! arch not above the device's compute capability, which the driver JIT-compiles to the real
//! chip), plus `KERNEL_STEMS`, the stem of every `.cu` compiled.
//!
//! PTX rather than cubin because candle's module cache takes PTX text; so that a PTX error
//! shows at build time instead of on the device, each PTX is also assembled with `ptxas`
//! (output discarded). `TEMPER_PTXAS_VERBOSE=1` prints ptxas's register/spill report as cargo
//! warnings — the cheap first look before any device time is spent (scripts/ptxas-report.sh
//! prints the same per kernel and arch, and fails on spills).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

const DEFAULT_ARCHS: &str = "80,90";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        // CPU builds never touch the CUDA toolchain, so CI without one stays fast.
        return;
    }
    for var in [
        "TEMPER_CUDA_ARCHS",
        "TEMPER_NVCC_FLAGS",
        "TEMPER_PTXAS_VERBOSE",
        "NVCC",
        "CUDA_ROOT",
        "CUDA_PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let opts = Options::from_env();
    let cu = kernel_sources(&opts.kernel_dir);
    let jobs = spawn_nvcc(&opts, &cu);
    write_table(&opts, jobs, &cu);
}

/// What the build reads from its environment.
struct Options {
    kernel_dir: PathBuf,
    out_dir: PathBuf,
    archs: Vec<String>,
    nvcc: PathBuf,
    ptxas: PathBuf,
    extra: Vec<String>,
    verbose: bool,
}

impl Options {
    fn from_env() -> Self {
        let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets this"));
        Self {
            kernel_dir: manifest.join("kernels"),
            out_dir: PathBuf::from(env::var("OUT_DIR").expect("cargo sets this")),
            archs: parse_archs(
                &env::var("TEMPER_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.into()),
            ),
            nvcc: find_tool("nvcc"),
            ptxas: find_tool("ptxas"),
            extra: env::var("TEMPER_NVCC_FLAGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(String::from)
                .collect(),
            verbose: env::var("TEMPER_PTXAS_VERBOSE").is_ok_and(|v| v != "0" && !v.is_empty()),
        }
    }
}

/// Every `kernels/*.cu`, sorted; cargo reruns the build when anything in `kernels/` changes.
fn kernel_sources(kernel_dir: &Path) -> Vec<PathBuf> {
    // A directory entry makes cargo rerun on any file added, removed or touched inside it;
    // every file in it (the .cuh headers included) is also listed.
    println!("cargo:rerun-if-changed={}", kernel_dir.display());
    let mut sources: Vec<PathBuf> = fs::read_dir(kernel_dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    sources.sort();
    for p in &sources {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    sources
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect()
}

fn stem(p: &Path) -> String {
    p.file_stem().unwrap().to_string_lossy().into_owned()
}

/// One running nvcc: (stem, arch, PTX path, process, command line for errors).
type Job = (String, String, PathBuf, Child, String);

/// One nvcc per (file, arch), run concurrently: the machines that build this have few cores
/// but nvcc spends much of its time in separate front-end and back-end processes.
fn spawn_nvcc(opts: &Options, cu: &[PathBuf]) -> Vec<Job> {
    let mut jobs = Vec::new();
    for src in cu {
        let stem = stem(src);
        for arch in &opts.archs {
            let ptx = opts.out_dir.join(format!("{stem}_sm{arch}.ptx"));
            let mut cmd = Command::new(&opts.nvcc);
            cmd.arg("--ptx")
                .arg(format!("-arch=compute_{arch}"))
                .args(["-O3", "-std=c++17", "-lineinfo"])
                .arg("-I")
                .arg(&opts.kernel_dir)
                .args(&opts.extra)
                .arg("-o")
                .arg(&ptx)
                .arg(src);
            let child = cmd.spawn().unwrap_or_else(|e| {
                panic!("failed to start {}: {e}", opts.nvcc.display());
            });
            jobs.push((stem.clone(), arch.clone(), ptx, child, format!("{cmd:?}")));
        }
    }
    jobs
}

/// Waits for every nvcc, checks its PTX with ptxas, and writes `kernels_ptx.rs`: the embedded
/// PTX table and the list of kernel stems.
fn write_table(opts: &Options, jobs: Vec<Job>, cu: &[PathBuf]) {
    let mut table = String::from(
        "// @generated by build.rs: (kernel file stem, target arch, PTX text).\n\
         pub const KERNELS_PTX: &[(&str, &str, &str)] = &[\n",
    );
    for (stem, arch, ptx, mut child, shown) in jobs {
        let status = child.wait().expect("waiting for nvcc");
        if !status.success() {
            panic!("nvcc failed ({status}) compiling {stem}.cu for compute_{arch}:\n  {shown}");
        }
        check_with_ptxas(&opts.ptxas, &ptx, arch.as_str(), opts.verbose);
        writeln!(
            table,
            "    ({stem:?}, {arch:?}, include_str!({:?})),",
            ptx.display().to_string()
        )
        .unwrap();
    }
    table.push_str("];\n");
    let stems: Vec<String> = cu.iter().map(|p| stem(p)).collect();
    writeln!(
        table,
        "/// Stems of every `kernels/*.cu` that build.rs compiled and embedded.\n\
         pub const KERNEL_STEMS: &[&str] = &{stems:?};"
    )
    .unwrap();
    fs::write(opts.out_dir.join("kernels_ptx.rs"), table).expect("writing kernels_ptx.rs");
}

/// `80,90a` -> ["80", "90a"]; rejects anything that is not digits with an optional `a`.
fn parse_archs(spec: &str) -> Vec<String> {
    let archs: Vec<String> = spec
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_start_matches("sm_")
                .trim_start_matches("compute_")
                .to_string()
        })
        .collect();
    for a in &archs {
        let digits = a.trim_end_matches('a');
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
            panic!("TEMPER_CUDA_ARCHS: `{a}` is not an arch like 80, 90 or 90a (spec `{spec}`)");
        }
    }
    if archs.is_empty() {
        panic!("TEMPER_CUDA_ARCHS is empty; use e.g. TEMPER_CUDA_ARCHS=80,90");
    }
    archs
}

fn check_with_ptxas(ptxas: &Path, ptx: &Path, arch: &str, verbose: bool) {
    let mut cmd = Command::new(ptxas);
    cmd.arg(format!("-arch=sm_{arch}"))
        .arg("-o")
        .arg("/dev/null")
        .arg(ptx);
    if verbose {
        cmd.arg("-v");
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to start {}: {e}", ptxas.display()));
    if !out.status.success() {
        panic!(
            "ptxas rejected {} for sm_{arch}:\n{}",
            ptx.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if verbose {
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            println!("cargo:warning=ptxas sm_{arch}: {line}");
        }
    }
}

/// `NVCC` (for nvcc itself), then `CUDA_ROOT/bin`, `CUDA_PATH/bin`, then `PATH`.
fn find_tool(name: &str) -> PathBuf {
    if name == "nvcc" {
        if let Some(p) = env::var_os("NVCC") {
            return PathBuf::from(p);
        }
    } else if let Some(p) = env::var_os("NVCC") {
        // ptxas sits beside whichever nvcc was chosen.
        let sibling = PathBuf::from(p).with_file_name(name);
        if sibling.is_file() {
            return sibling;
        }
    }
    for var in ["CUDA_ROOT", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var) {
            let p = PathBuf::from(root).join("bin").join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "feature cuda needs {name} (CUDA 13.0): run scripts/install-cuda-toolchain.sh, then \
         `source <(scripts/install-cuda-toolchain.sh --env)` (or set NVCC / CUDA_ROOT) and build again"
    );
}
