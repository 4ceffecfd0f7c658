//! Reading the CUDA sources as text, for the tests that check them without a GPU
//! (tests/kernel_abi.rs, tests/gpu_check_scripts.rs): files, comments, entry points.

use std::fs;
use std::path::{Path, PathBuf};

/// Every file below `dir` (subfolders included) whose extension is one of `exts`, sorted.
pub fn files(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p, exts));
        } else if p
            .extension()
            .and_then(|x| x.to_str())
            .is_some_and(|x| exts.contains(&x))
        {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The source with `//` and `/* */` comments blanked out. String and character literals are
/// kept whole, so that a `"kernels/*.cu"` in a string does not open a comment.
pub fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(c) = rest.chars().next() {
        if let Some(r) = rest.strip_prefix("//") {
            rest = r.find('\n').map_or("", |i| &r[i..]);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map_or("", |i| &r[i + 2..]);
            out.push(' ');
        } else if c == '"' {
            // Up to the closing quote that no backslash escapes.
            let body = &rest[1..];
            let mut end = body.len();
            let mut escaped = false;
            for (i, ch) in body.char_indices() {
                match ch {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    _ => {}
                }
            }
            out.push_str(&rest[..1 + end]);
            rest = &rest[1 + end..];
        } else if let Some(lit) = char_literal(rest) {
            out.push_str(lit);
            rest = &rest[lit.len()..];
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// `'x'` or `'\\x'` at the start of `s` (not a Rust lifetime such as `'a`).
fn char_literal(s: &str) -> Option<&str> {
    let b = s.as_bytes();
    if b.first() != Some(&b'\'') {
        return None;
    }
    let len = if b.get(1) == Some(&b'\\') { 4 } else { 3 };
    (b.len() >= len && b[len - 1] == b'\'').then(|| &s[..len])
}

/// One `__global__` entry point of a kernel file, as written: its name token (a macro's
/// `gelu_fwd_##SUFFIX` included) and its parameter declarations.
pub struct EntryPoint {
    pub file: PathBuf,
    pub name: String,
    pub args: Vec<String>,
}

/// Every entry point in the `.cu` and `.cuh` files of `kernels`, file by file in order.
pub fn entry_points(kernels: &Path) -> Vec<EntryPoint> {
    let mut out = Vec::new();
    for file in files(kernels, &["cu", "cuh"]) {
        let src = strip_comments(&fs::read_to_string(&file).unwrap());
        for (i, _) in src.match_indices("__global__") {
            // The parameter list is the last parenthesised group before the body, after any
            // `__launch_bounds__(...)`; the name is the word just before it.
            let sig = &src[i..i + src[i..].find('{').unwrap()];
            let open = sig.rfind('(').unwrap();
            let close = sig.rfind(')').unwrap();
            let name = sig[..open].split_whitespace().last().unwrap().to_string();
            let args = sig[open + 1..close]
                .split(',')
                .map(str::to_string)
                .collect();
            out.push(EntryPoint {
                file: file.clone(),
                name,
                args,
            });
        }
    }
    out
}
