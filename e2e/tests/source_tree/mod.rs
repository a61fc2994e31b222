//! The workspace's product source, as the rooms and sizes tests read it.

use std::path::{Path, PathBuf};

/// The crates whose source is checked, each by its source folder.
pub const CRATES: &[&str] = &[
    "crds/src",
    "platform/src",
    "operator/src",
    "stage-runtime/src",
    "local/src",
    "ops/src",
    "cli/src",
    "bench/src",
    "e2e/src",
];

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ sits in the workspace")
        .to_path_buf()
}

/// Every `.rs` file below `folder`, in order, unit-test files (`tests.rs`) left out.
pub fn rust_files(folder: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    walk(folder, &mut files);
    files
}

fn walk(folder: &Path, files: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(folder)
        .expect("the folder exists")
        .map(|e| e.expect("a folder entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs")
            && path.file_stem().is_some_and(|s| s != "tests")
        {
            files.push(path);
        }
    }
}

/// A file's lines up to its unit tests (`#[cfg(test)]` on a `mod`; one on a single item, such as a
/// re-export only tests use, is product code around it).
pub fn product_lines(text: &str) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    let end = lines
        .windows(2)
        .position(|w| w[0].trim() == "#[cfg(test)]" && w[1].trim_start().starts_with("mod "))
        .unwrap_or(lines.len());
    lines[..end].to_vec()
}
