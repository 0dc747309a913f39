//! `unsafe` code of the product lives in three files: two of this crate (see the crate docs,
//! "Safety model"), `src/sys.rs` and `src/mapping.rs`, and the `faultline` command's benchmark
//! baselines (`faultline-cli/src/bench/baseline.rs`: the `userfaultfd` crate's `copy` is an
//! `unsafe fn`, and the kernel baseline touches a file mapping from user space). This test reads
//! the sources of every product crate (each crate under `crates/` but the test helpers) and fails
//! naming any other file that holds the `unsafe` keyword outside a comment, and if `faultline` or
//! `faultline-daemon` stops forbidding unsafe code at its root (`forbid`, unlike `deny`, cannot be
//! undone by a module's `allow`) or the command stops denying it.

use std::path::{Path, PathBuf};

/// The files allowed to hold `unsafe`, relative to `crates/`.
const ALLOWED: [&str; 3] = [
    "faultline-uffd/src/sys.rs",
    "faultline-uffd/src/mapping.rs",
    "faultline-cli/src/bench/baseline.rs",
];
/// Crates that are not product code.
const NOT_PRODUCT: [&str; 1] = ["faultline-testing"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Whether `line`, without its `//` comment, uses the keyword `unsafe` (not `unsafe_code`).
fn uses_unsafe(line: &str) -> bool {
    let code = line.split("//").next().unwrap_or("");
    code.match_indices("unsafe").any(|(at, w)| {
        let before = code[..at].chars().next_back();
        let after = code[at + w.len()..].chars().next();
        let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        !ident(before) && !ident(after)
    })
}

#[test]
fn unsafe_code_is_confined_to_sys_and_mapping() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crates directory");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(crates).expect("read crates/") {
        let dir = entry.expect("a directory entry").path();
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !NOT_PRODUCT.contains(&name) {
            rust_files(&dir.join("src"), &mut files);
        }
    }
    assert!(
        files.len() > 50,
        "the product's sources were not found: {files:?}"
    );
    let mut offenders = Vec::new();
    let mut allowed_seen = 0;
    for file in &files {
        let rel = file
            .strip_prefix(crates)
            .expect("under crates/")
            .to_string_lossy()
            .replace('\\', "/");
        let text = std::fs::read_to_string(file).expect("read a source file");
        let hits: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| uses_unsafe(l))
            .map(|(i, _)| i + 1)
            .collect();
        if ALLOWED.contains(&rel.as_str()) {
            allowed_seen += usize::from(!hits.is_empty());
        } else if !hits.is_empty() {
            offenders.push(format!("{rel}: lines {hits:?}"));
        }
    }
    assert!(
        offenders.is_empty(),
        "`unsafe` outside {ALLOWED:?}:\n{}",
        offenders.join("\n")
    );
    assert_eq!(allowed_seen, ALLOWED.len(), "the scan does see unsafe code");

    for root in ["faultline/src/lib.rs", "faultline-daemon/src/lib.rs"] {
        let text = std::fs::read_to_string(crates.join(root)).expect("read a crate root");
        assert!(
            text.lines().any(|l| l.trim() == "#![forbid(unsafe_code)]"),
            "{root} must forbid unsafe code"
        );
    }
    let main = std::fs::read_to_string(crates.join("faultline-cli/src/main.rs")).expect("main.rs");
    assert!(
        main.lines()
            .any(|l| l.trim().starts_with("#![deny(unsafe_code)]")),
        "faultline-cli/src/main.rs must deny unsafe code"
    );
}

#[test]
fn the_scan_tells_code_from_comments_and_lint_names() {
    assert!(uses_unsafe("    let x = unsafe { f() };"));
    assert!(uses_unsafe("pub unsafe fn f() {}"));
    assert!(!uses_unsafe("#![forbid(unsafe_code)]"));
    assert!(!uses_unsafe("    // SAFETY: not unsafe here"));
    assert!(!uses_unsafe("//! the `unsafe` contract"));
}
