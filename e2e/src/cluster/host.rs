//! What the cluster does to this machine, and undoes: commands run in or out of its network
//! namespace, daemons started in it and stopped by PID, cgroups, mounts and the link.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::error::ClusterError;

/// A command with its arguments, for messages.
pub fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs `command`, and says what it printed when it fails.
pub fn run(command: &mut Command) -> Result<String, ClusterError> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ClusterError::Command {
            command: describe(command),
            output: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(ClusterError::Command {
            command: describe(command),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
            .trim()
            .to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `ip ARGS` on this machine.
pub fn ip(args: &[&str]) -> Result<String, ClusterError> {
    run(Command::new("ip").args(args))
}

/// A command that runs in the network namespace `netns` (only the network: mounts and cgroups stay
/// this machine's, which the kubelet and the container runtime must share).
pub fn in_netns(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{netns}"))
        .arg("--")
        .arg(program);
    command
}

/// Starts a daemon in `netns`, in a session of its own (it outlives the command that started it and
/// gets no terminal's signals), with its output in `log`. Returns its PID: nsenter execs the program.
pub fn spawn_daemon(
    netns: &str,
    program: &Path,
    args: &[String],
    log: &Path,
) -> Result<u32, ClusterError> {
    let out = std::fs::File::create(log).map_err(|e| ClusterError::io(log, e))?;
    let err = out.try_clone().map_err(|e| ClusterError::io(log, e))?;
    let mut command = in_netns(netns, program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: setsid(2) is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = command.spawn().map_err(|e| ClusterError::Command {
        command: describe(&command),
        output: e.to_string(),
    })?;
    Ok(child.id())
}

/// The command line of a live process, arguments separated by spaces; None once it is gone (or a
/// zombie).
pub fn command_line(pid: u32) -> Option<String> {
    switchyard_platform::os::arguments(pid).map(|args| args.join(" "))
}

/// Whether `pid` still runs the program it was started as (a PID can be reused once it is gone).
pub fn is_running(pid: u32, program: &str) -> bool {
    command_line(pid).is_some_and(|c| c.contains(program))
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory effects; a PID that is gone gives ESRCH, which is fine.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// Stops the process `pid` if it still runs `program`: SIGTERM, then SIGKILL after `grace`.
pub fn stop(pid: u32, program: &str, grace: Duration) {
    if !is_running(pid, program) {
        return;
    }
    signal(pid, libc::SIGTERM);
    let started = Instant::now();
    while started.elapsed() < grace {
        if !is_running(pid, program) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(pid, libc::SIGKILL);
    let started = Instant::now();
    while is_running(pid, program) && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// PIDs of every process whose command line contains `needle`.
pub fn processes_with(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| command_line(*pid).is_some_and(|c| c.contains(needle)))
        .collect()
}

/// Kills every process `pids` with SIGKILL and waits (bounded) until they are gone.
pub fn kill_all(pids: &[u32]) {
    for pid in pids {
        signal(*pid, libc::SIGKILL);
    }
    let started = Instant::now();
    while pids.iter().any(|p| command_line(*p).is_some())
        && started.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The cgroup v1 hierarchies (and the unified one) this machine mounts under /sys/fs/cgroup.
pub fn cgroup_hierarchies() -> Vec<PathBuf> {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    mounts
        .lines()
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let (_, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
            (kind == "cgroup" || kind == "cgroup2").then(|| PathBuf::from(point))
        })
        .collect()
}

/// Creates `root` (such as `/switchyard/name/node0`) in every hierarchy; in cpuset, each new level
/// takes its parent's CPUs and memory nodes, without which no task may join it.
pub fn create_cgroup(root: &str) -> Result<(), ClusterError> {
    for hierarchy in cgroup_hierarchies() {
        let mut path = hierarchy.clone();
        for part in root.trim_matches('/').split('/') {
            let parent = path.clone();
            path.push(part);
            if !path.is_dir() {
                std::fs::create_dir(&path).map_err(|e| ClusterError::io(&path, e))?;
            }
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let own = path.join(file);
                if own.exists()
                    && std::fs::read_to_string(&own)
                        .map(|s| s.trim().is_empty())
                        .unwrap_or(false)
                {
                    let value = std::fs::read_to_string(parent.join(file)).unwrap_or_default();
                    std::fs::write(&own, value.trim()).map_err(|e| ClusterError::io(&own, e))?;
                }
            }
        }
    }
    Ok(())
}

/// Every process in `root` or below it, in any hierarchy.
pub fn cgroup_processes(root: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for hierarchy in cgroup_hierarchies() {
        let top = hierarchy.join(root.trim_start_matches('/'));
        collect_procs(&top, &mut pids);
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

fn collect_procs(dir: &Path, pids: &mut Vec<u32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_procs(&entry.path(), pids);
            }
        }
    }
}

/// Removes `root` and everything below it from every hierarchy (deepest first; a cgroup with a
/// process left stays, and is named).
pub fn remove_cgroup(root: &str) -> Vec<PathBuf> {
    let mut left = Vec::new();
    for hierarchy in cgroup_hierarchies() {
        let top = hierarchy.join(root.trim_start_matches('/'));
        remove_tree(&top, &mut left);
        // The levels above the node's own (`/switchyard/<name>`), once empty.
        let mut parent = top.parent().map(Path::to_path_buf);
        while let Some(dir) = parent {
            if dir == hierarchy || std::fs::remove_dir(&dir).is_err() {
                break;
            }
            parent = dir.parent().map(Path::to_path_buf);
        }
    }
    left
}

fn remove_tree(dir: &Path, left: &mut Vec<PathBuf>) {
    if !dir.is_dir() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&entry.path(), left);
            }
        }
    }
    if std::fs::remove_dir(dir).is_err() {
        left.push(dir.to_path_buf());
    }
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut points: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(unescape_mount_point)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
}

/// mountinfo writes a space as `\040` (and a few others likewise).
fn unescape_mount_point(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            if let Ok(code) = u8::from_str_radix(&field[i + 1..i + 4], 8) {
                out.push(code as char);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

/// Unmounts everything at or below `dir`; what stays mounted is returned.
pub fn unmount_all(dir: &Path) -> Vec<PathBuf> {
    for _ in 0..3 {
        let points = mounts_under(dir);
        if points.is_empty() {
            return points;
        }
        for point in points {
            let Ok(c) = std::ffi::CString::new(point.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            // SAFETY: umount2(2) with a valid NUL-terminated path; MNT_DETACH lets a busy mount go
            // once its last user does.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
    mounts_under(dir)
}

/// Waits for `done`, up to `limit`; the error says what it waited for.
pub fn wait_for(
    limit: Duration,
    what: &str,
    mut done: impl FnMut() -> Result<bool, ClusterError>,
) -> Result<Duration, ClusterError> {
    let started = Instant::now();
    let mut last = None;
    loop {
        match done() {
            Ok(true) => return Ok(started.elapsed()),
            Ok(false) => {}
            Err(e) => last = Some(e.to_string()),
        }
        if started.elapsed() >= limit {
            return Err(ClusterError::Timeout {
                what: what.to_string(),
                limit,
                last,
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_with_spaces_are_read_back() {
        assert_eq!(unescape_mount_point("/a\\040b/c"), "/a b/c");
        assert_eq!(unescape_mount_point("/plain"), "/plain");
    }
}
