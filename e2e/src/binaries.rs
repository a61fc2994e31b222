//! Where the workspace's programs and this package's other test binaries are built.

use std::path::{Path, PathBuf};

/// `target/<profile>`: the test runs from its `deps` folder.
pub(crate) fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps")
        .to_path_buf()
}

/// The newest build of another test binary of this package (`tests/<name>.rs` or `tests/<name>/`),
/// for a test that runs a suite as a program of its own (to kill it): cargo builds every test
/// binary of a `cargo test` before it runs any. None when it is not built.
pub fn test_binary(name: &str) -> Option<PathBuf> {
    let prefix = format!("{name}-");
    std::fs::read_dir(profile_dir().join("deps"))
        .ok()?
        .flatten()
        .filter(|entry| {
            let file = entry.file_name();
            let file = file.to_string_lossy();
            // `pods-<16 hex digits>`, without the `.d` beside it.
            file.strip_prefix(&prefix)
                .is_some_and(|hash| hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()))
        })
        .filter_map(|entry| {
            use std::os::unix::fs::PermissionsExt;
            let meta = entry.metadata().ok()?;
            let runnable = meta.is_file() && meta.permissions().mode() & 0o111 != 0;
            runnable.then(|| (meta.modified().ok(), entry.path()))
        })
        .max()
        .map(|(_, path)| path)
}

/// A binary of the workspace, built beside the test (`cargo build --workspace --bins`).
pub fn binary(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}
