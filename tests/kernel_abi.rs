//! The kernels' ABI, checked without a GPU: every `#[repr(C)]` struct a launcher in
//! `src/kernels/cuda/` hands to a kernel must list the same fields, in the same order, with
//! the same machine types, as the struct of that name in `kernels/`.
//!
//! The size and alignment asserts on both sides cannot see two fields of one size swapped, or
//! an `f32` where the kernel reads an `int`; either would run and compute garbage. The
//! launchers fill the mirrors by field name, so a mismatch in order is exactly the bug this
//! catches. Both sides are read as text, so the test runs on CPU CI, where the CUDA launchers
//! are not compiled.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use common::kernel_sources::{entry_points, files, strip_comments};

/// A field's machine type, as both languages spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Machine {
    /// A device pointer: any `T *` in C, `DevPtr` (a `u64` alias) in Rust.
    Ptr,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

#[derive(Debug, PartialEq, Eq)]
struct Field {
    name: String,
    ty: Machine,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A Rust file's text without comments and without its `#[cfg(test)]` module (by convention
/// the file's last item), whose probes are not kernel ABI.
fn rust_source(path: &Path) -> String {
    let src = strip_comments(&fs::read_to_string(path).unwrap());
    let test_mod = src
        .match_indices("#[cfg(test)]")
        .map(|(i, _)| i)
        .find(|&i| {
            let item = src[i + "#[cfg(test)]".len()..].trim_start();
            item.starts_with("mod ") || item.starts_with("pub(crate) mod ")
        });
    match test_mod {
        Some(i) => src[..i].to_string(),
        None => src,
    }
}

/// The body between `struct Name {` and its closing brace, for every struct in `src`
/// (structs here never nest).
fn struct_bodies(src: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("struct ") {
        let after = &rest[i + "struct ".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let tail = after[name.len()..].trim_start();
        if !name.is_empty() && tail.starts_with('{') {
            let close = tail.find('}').expect("a struct's closing brace");
            out.push((name.clone(), tail[1..close].to_string()));
            rest = &tail[close..];
        } else {
            rest = after;
        }
    }
    out
}

fn c_type(words: &[&str], pointer: bool) -> Result<Machine, String> {
    if pointer {
        return Ok(Machine::Ptr);
    }
    let words: Vec<&str> = words
        .iter()
        .copied()
        .filter(|w| *w != "const" && *w != "volatile")
        .collect();
    Ok(match words.as_slice() {
        ["int"] | ["signed"] | ["signed", "int"] => Machine::I32,
        ["unsigned"] | ["unsigned", "int"] => Machine::U32,
        ["long", "long"] | ["long", "long", "int"] | ["int64_t"] => Machine::I64,
        ["unsigned", "long", "long"] | ["unsigned", "long", "long", "int"] | ["uint64_t"] => {
            Machine::U64
        }
        ["float"] => Machine::F32,
        ["double"] => Machine::F64,
        other => {
            return Err(format!(
                "C type `{}` is not one the ABI uses",
                other.join(" ")
            ))
        }
    })
}

/// `float beta1, beta2;` and `const void *q;` alike: one field per declarator.
fn c_fields(body: &str) -> Result<Vec<Field>, String> {
    let mut out = Vec::new();
    for decl in body.split(';').map(str::trim).filter(|d| !d.is_empty()) {
        if decl.starts_with("static") || decl.contains('(') || decl.contains('[') {
            return Err(format!("`{decl}` is not a plain field"));
        }
        let mut parts = decl.split(',');
        let first = parts.next().unwrap().replace('*', " * ");
        let words: Vec<&str> = first.split_whitespace().collect();
        let (name, head) = words.split_last().ok_or("an empty declaration")?;
        // `T *p`, `T *const p`, `T **p`: a star anywhere in the declarator makes a pointer.
        let pointer = head.contains(&"*");
        let base: Vec<&str> = head.iter().copied().filter(|w| *w != "*").collect();
        out.push(Field {
            name: name.to_string(),
            ty: c_type(&base, pointer)?,
        });
        for more in parts {
            let more = more.trim();
            let pointer = more.starts_with('*');
            out.push(Field {
                name: more.trim_start_matches('*').trim().to_string(),
                ty: c_type(&base, pointer)?,
            });
        }
    }
    Ok(out)
}

fn rust_fields(body: &str) -> Result<Vec<Field>, String> {
    let mut out = Vec::new();
    for line in body.split(',').map(str::trim).filter(|l| !l.is_empty()) {
        let line = line
            .trim_start_matches("pub(crate) ")
            .trim_start_matches("pub ");
        let (name, ty) = line
            .split_once(':')
            .ok_or_else(|| format!("`{line}` is not a field"))?;
        let ty = match ty.trim() {
            "DevPtr" => Machine::Ptr,
            "u64" => Machine::U64,
            "i64" => Machine::I64,
            "u32" => Machine::U32,
            "i32" => Machine::I32,
            "f32" => Machine::F32,
            "f64" => Machine::F64,
            other => return Err(format!("Rust type `{other}` is not one the ABI uses")),
        };
        out.push(Field {
            name: name.trim().to_string(),
            ty,
        });
    }
    Ok(out)
}

/// Where the C fields and the Rust mirror's disagree, one line per field position.
fn mismatches(c: &[Field], rs: &[Field]) -> Vec<String> {
    (0..c.len().max(rs.len()))
        .filter_map(|i| match (c.get(i), rs.get(i)) {
            (Some(cf), Some(rf)) if cf == rf => None,
            (cf, rf) => Some(format!("field {i}: C has {cf:?}, Rust has {rf:?}")),
        })
        .collect()
}

/// Every `#[repr(C)]` struct under `src/kernels/cuda/`, by name, with the file it is in.
fn rust_mirrors() -> BTreeMap<String, (PathBuf, Vec<Field>)> {
    let mut out = BTreeMap::new();
    for path in files(&root().join("src/kernels/cuda"), &["rs"]) {
        let src = rust_source(&path);
        // `#[repr(C)]` and `#[repr(C, align(16))]` alike; the item it sits on must be the next
        // braced struct, after any further attributes and derives.
        for (i, _) in src.match_indices("#[repr(C") {
            let mut item = src[i..].split_once(']').unwrap().1.trim_start();
            while item.starts_with("#[") {
                item = item.split_once(']').unwrap().1.trim_start();
            }
            let item = item
                .trim_start_matches("pub(crate) ")
                .trim_start_matches("pub ");
            assert!(
                item.starts_with("struct "),
                "{}: #[repr(C...)] on something other than a braced struct: {}",
                path.display(),
                &item[..item.len().min(60)]
            );
            let (name, body) = struct_bodies(item).into_iter().next().unwrap_or_else(|| {
                panic!("{}: #[repr(C)] on a struct without braces", path.display())
            });
            let fields =
                rust_fields(&body).unwrap_or_else(|e| panic!("{}: {name}: {e}", path.display()));
            let clash = out.insert(name.clone(), (path.clone(), fields));
            assert!(clash.is_none(), "two Rust mirrors named {name}");
        }
    }
    out
}

/// Every struct under `kernels/`, by name, with the file it is in.
fn c_structs() -> BTreeMap<String, (PathBuf, String)> {
    let mut out = BTreeMap::new();
    for path in files(&root().join("kernels"), &["cuh", "cu"]) {
        let src = strip_comments(&fs::read_to_string(&path).unwrap());
        for (name, body) in struct_bodies(&src) {
            let clash = out.insert(name.clone(), (path.clone(), body));
            assert!(clash.is_none(), "two kernel structs named {name}");
        }
    }
    out
}

/// The structs a kernel entry point takes by value: `__global__ void f(const XParams p)`.
fn kernel_argument_structs() -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = entry_points(&root().join("kernels"))
        .into_iter()
        .flat_map(|e| {
            let file = e.file;
            e.args.into_iter().filter_map(move |arg| {
                let ty = arg
                    .split_whitespace()
                    .find(|w| *w != "const" && *w != "__grid_constant__")?;
                ty.ends_with("Params")
                    .then(|| (ty.to_string(), file.clone()))
            })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[test]
fn every_rust_mirror_matches_its_kernel_struct_field_for_field() {
    let mirrors = rust_mirrors();
    let kernels = c_structs();
    assert!(
        mirrors.len() >= 17,
        "found only {} #[repr(C)] mirrors: is the parser still reading them?",
        mirrors.len()
    );
    let mut wrong = Vec::new();
    for (name, (rs_path, rs)) in &mirrors {
        let Some((c_path, body)) = kernels.get(name) else {
            wrong.push(format!(
                "{}: {name} has no struct in kernels/",
                rs_path.display()
            ));
            continue;
        };
        let c = c_fields(body).unwrap_or_else(|e| panic!("{}: {name}: {e}", c_path.display()));
        for m in mismatches(&c, rs) {
            wrong.push(format!(
                "{name}: {m} (C: {}, Rust: {})",
                c_path.display(),
                rs_path.display()
            ));
        }
    }
    assert!(wrong.is_empty(), "ABI mismatches:\n{}", wrong.join("\n"));
}

#[test]
fn every_kernel_argument_struct_has_a_rust_mirror() {
    let mirrors = rust_mirrors();
    let args = kernel_argument_structs();
    assert!(
        args.len() >= 15,
        "found only {} argument structs: is the parser still reading the entry points?",
        args.len()
    );
    let missing: Vec<String> = args
        .iter()
        .filter(|(name, _)| !mirrors.contains_key(name))
        .map(|(name, path)| format!("{}: {name}", path.display()))
        .collect();
    assert!(
        missing.is_empty(),
        "kernel argument structs without a #[repr(C)] mirror in src/kernels/cuda/:\n{}",
        missing.join("\n")
    );
}

#[test]
fn every_launcher_passes_the_struct_its_kernels_take() {
    // The launcher of `kernels/X.cu` is any file under src/ that loads the stem "X"
    // (`load_func(dev, "X", ..)`, or through a `&str` constant); the mirror it fills must be
    // the struct X's entry points take. Whitespace is collapsed first, so that a call rustfmt
    // wrapped over lines is still seen.
    let launchers: Vec<(PathBuf, String)> = files(&root().join("src"), &["rs"])
        .into_iter()
        .map(|p| {
            let src = rust_source(&p);
            let flat = src
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .replace("( ", "(");
            (p, flat)
        })
        .collect();
    let args = kernel_argument_structs();
    let mut wrong = Vec::new();
    let mut stems = 0;
    for path in files(&root().join("kernels"), &["cu"]) {
        let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
        let takes: Vec<&String> = args
            .iter()
            .filter(|(_, p)| *p == path)
            .map(|(s, _)| s)
            .collect();
        let [takes] = takes.as_slice() else {
            wrong.push(format!(
                "{}: entry points take {takes:?}, not one struct",
                path.display()
            ));
            continue;
        };
        let quoted = format!("\"{stem}\"");
        let by: Vec<&(PathBuf, String)> = launchers
            .iter()
            .filter(|(_, s)| {
                s.contains(&format!("load_func(dev, {quoted}"))
                    || s.contains(&format!("&str = {quoted};"))
            })
            .collect();
        if by.is_empty() {
            wrong.push(format!("{}: no launcher names {quoted}", path.display()));
        }
        for (rs, src) in by {
            if !src.contains(&format!("struct {takes} {{")) {
                wrong.push(format!(
                    "{} loads {quoted} but has no mirror of {takes}",
                    rs.display()
                ));
            }
        }
        stems += 1;
    }
    assert!(stems >= 15, "found only {stems} kernel files");
    assert!(
        wrong.is_empty(),
        "launcher mismatches:\n{}",
        wrong.join("\n")
    );
}

/// Every `impl KernelParams for X { const STEMS: .. = &[..]; }` under src/, as (X, its
/// stems, file); a stem written as a `&str` constant is read from that constant in the file.
fn kernel_params_impls() -> Vec<(String, Vec<String>, PathBuf)> {
    let mut out = Vec::new();
    for path in files(&root().join("src"), &["rs"]) {
        let src = rust_source(&path);
        for (i, _) in src.match_indices("impl KernelParams for ") {
            let rest = &src[i + "impl KernelParams for ".len()..];
            let name = rest.split_whitespace().next().unwrap().to_string();
            let body = &rest[rest.find('{').unwrap() + 1..rest.find('}').unwrap()];
            let list = &body[body.find("&[").expect("STEMS = &[..]") + 2..body.rfind(']').unwrap()];
            let stems = list
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| match t.strip_prefix('"') {
                    Some(q) => q.trim_end_matches('"').to_string(),
                    None => {
                        let def = format!("const {t}: &str = \"");
                        let at = src.find(&def).unwrap_or_else(|| {
                            panic!("{}: no `{def}..` for STEMS", path.display())
                        }) + def.len();
                        src[at..at + src[at..].find('"').unwrap()].to_string()
                    }
                })
                .collect();
            out.push((name, stems, path.clone()));
        }
    }
    out
}

#[test]
fn every_kernel_file_belongs_to_the_params_type_its_entry_points_take() {
    // `launch` refuses a kernel whose file is not in its params type's STEMS; this checks
    // the STEMS themselves: each kernel file is named by exactly one params type, the one its
    // entry points take.
    let impls = kernel_params_impls();
    let mirrors = rust_mirrors();
    let args = kernel_argument_structs();
    let mut wrong = Vec::new();
    for path in files(&root().join("kernels"), &["cu"]) {
        let stem = path.file_stem().unwrap().to_str().unwrap();
        let owners: Vec<&String> = impls
            .iter()
            .filter(|(_, stems, _)| stems.iter().any(|s| s == stem))
            .map(|(name, _, _)| name)
            .collect();
        let takes: Vec<&String> = args
            .iter()
            .filter(|(_, p)| *p == path)
            .map(|(s, _)| s)
            .collect();
        if owners.len() != 1 || owners != takes {
            wrong.push(format!(
                "kernels/{stem}.cu: entry points take {takes:?}, KernelParams STEMS name it for {owners:?}"
            ));
        }
    }
    for (name, stems, path) in &impls {
        if !mirrors.contains_key(name) {
            wrong.push(format!(
                "{}: {name} is KernelParams but no #[repr(C)] mirror",
                path.display()
            ));
        }
        for stem in stems {
            if !root().join(format!("kernels/{stem}.cu")).exists() {
                wrong.push(format!(
                    "{}: {name} names kernels/{stem}.cu, which does not exist",
                    path.display()
                ));
            }
        }
    }
    assert!(
        impls.len() >= 16,
        "found only {} KernelParams impls",
        impls.len()
    );
    assert!(
        wrong.is_empty(),
        "KernelParams mismatches:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_parsers_read_what_they_must() {
    // A guard on the checks above: each parser reads a known struct as intended, and a
    // swapped pair of same-sized fields, a value for a pointer, a float for an int and a
    // missing field are each seen as a mismatch.
    let c = c_fields(
        "const void *q; float beta1, beta2; unsigned long long seed; int *a, b; float *const r",
    )
    .unwrap();
    let names: Vec<(&str, Machine)> = c.iter().map(|f| (f.name.as_str(), f.ty)).collect();
    assert_eq!(
        names,
        [
            ("q", Machine::Ptr),
            ("beta1", Machine::F32),
            ("beta2", Machine::F32),
            ("seed", Machine::U64),
            ("a", Machine::Ptr),
            ("b", Machine::I32),
            ("r", Machine::Ptr),
        ]
    );
    let fields = |s: &str| rust_fields(s).unwrap();
    let same = "q: DevPtr, beta1: f32, beta2: f32, seed: u64, a: DevPtr, b: i32, r: DevPtr,";
    assert!(mismatches(&c, &fields(same)).is_empty());
    let swapped = fields(&same.replace("beta1: f32, beta2", "beta2: f32, beta1"));
    assert_eq!(
        mismatches(&c, &swapped),
        [
            "field 1: C has Some(Field { name: \"beta1\", ty: F32 }), Rust has Some(Field { name: \"beta2\", ty: F32 })",
            "field 2: C has Some(Field { name: \"beta2\", ty: F32 }), Rust has Some(Field { name: \"beta1\", ty: F32 })",
        ]
    );
    for (wrong, why) in [
        (
            same.replace("seed: u64", "seed: DevPtr"),
            "a pointer for a value",
        ),
        (same.replace("q: DevPtr", "q: u64"), "a value for a pointer"),
        (same.replace("b: i32", "b: f32"), "f32 for int"),
        (same.replace(" r: DevPtr,", ""), "a missing field"),
    ] {
        assert_eq!(mismatches(&c, &fields(&wrong)).len(), 1, "{why}");
    }
    assert!(c_fields("int x[4];").is_err());
    assert!(rust_fields("x: usize,").is_err());
    let stripped = strip_comments("a /* b */ c // d\ne \"kernels/*.cu\" f '\"' g /* h */ i");
    assert_eq!(
        stripped.split_whitespace().collect::<Vec<_>>(),
        ["a", "c", "e", "\"kernels/*.cu\"", "f", "'\"'", "g", "i"]
    );
}
