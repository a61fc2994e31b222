//! The processes a test's run starts: found by their parent and command line, and signalled.

/// Sends `signal` to `pid`: a process of the test's own run (a stage, a nats-server), found by its
/// parent. A process already gone is no error.
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory effects; a pid that is gone gives ESRCH, which is fine here.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// Pids of the direct children of `parent` whose command line contains `needle`.
pub fn children_with(parent: u32, needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let ppid: u32 = after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == parent && command_line(pid).contains(needle) {
            found.push(pid);
        }
    }
    found
}

/// A process's command line, its arguments separated by spaces (and ending with one).
pub fn command_line(pid: u32) -> String {
    switchyard_platform::os::arguments(pid)
        .unwrap_or_default()
        .iter()
        .map(|arg| format!("{arg} "))
        .collect()
}
