//! The `epserve` binary that end-to-end tests start. Cargo only hands `CARGO_BIN_EXE_*` to a
//! package's own tests, and the end-to-end tests are a package of their own, so the binary is found
//! where Cargo puts it: beside the test executable's `deps/` directory (or at `EPSERVE_BIN`).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::repository_root;

/// The path of the `epserve` binary built for this test run. Panics, saying what to run, when it is
/// missing or older than the sources it is built from (a stale binary would test old code).
pub fn epserve_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("EPSERVE_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/epserve
    let profile_dir = exe.parent().and_then(Path::parent).expect("the test executable is in target/<profile>/deps");
    let binary = profile_dir.join(format!("epserve{}", std::env::consts::EXE_SUFFIX));
    let built = std::fs::metadata(&binary).and_then(|m| m.modified()).unwrap_or_else(|_| {
        panic!("{} is missing: build it with `cargo build -p epserve-cli` (scripts/test does)", binary.display())
    });
    if let Some((newest, path)) = newest_source(&repository_root()) {
        assert!(
            newest <= built,
            "{} is older than {}: rebuild it with `cargo build -p epserve-cli` (scripts/test does)",
            binary.display(),
            path.display()
        );
    }
    binary
}

/// The most recently modified file that the binary is built from: sources, protos, manifests and
/// embedded assets, outside test-only directories and `tests.rs` modules.
fn newest_source(root: &Path) -> Option<(SystemTime, PathBuf)> {
    const SKIP: [&str; 8] = ["target", "tests", "testkit", "benches", "bench", "docs", "scripts", "deploy"];
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                if !name.starts_with('.') && !SKIP.contains(&name.as_str()) {
                    stack.push(path);
                }
                continue;
            }
            // `tests.rs` is a `#[cfg(test)]` module by this project's convention: not in the binary.
            let source = name != "tests.rs"
                && [".rs", ".proto", ".toml", ".jinja", ".txt"].iter().any(|ext| name.ends_with(ext));
            if let (true, Ok(modified)) = (source, meta.modified())
                && newest.as_ref().is_none_or(|(t, _)| modified > *t)
            {
                newest = Some((modified, path));
            }
        }
    }
    newest
}
