//! Process plumbing.

/// Asks the kernel to stop `command`'s process when the process that started it dies, even by
/// SIGKILL, so that no handler, stage process or private nats-server outlives its parent. It gets
/// SIGTERM, to stop as it would be told to.
pub fn die_with_parent(command: &mut std::process::Command) {
    signal_when_parent_dies(command, libc::SIGTERM);
}

/// Like [`die_with_parent`], with SIGKILL: for what needs no chance to clean up and may not stop
/// by itself once told to, such as a test's kube-apiserver, whose graceful stop waits on the etcd
/// that stopped beside it (seen here running on for minutes after its suite was killed).
pub fn killed_with_parent(command: &mut std::process::Command) {
    signal_when_parent_dies(command, libc::SIGKILL);
}

fn signal_when_parent_dies(command: &mut std::process::Command, signal: libc::c_int) {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe, which is all that is allowed between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (command, signal);
}

/// The arguments `pid` runs with (its program first); none once it is gone or a zombie, or for a
/// kernel thread. What finds a process of its own by its command line uses it, so that a pid taken
/// by another process is never mistaken for it.
pub fn arguments(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state …`: the state follows the last ')', the name may hold anything.
    let state = stat.rsplit_once(')')?.1.split_whitespace().next();
    if state == Some("Z") {
        return None;
    }
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let arguments: Vec<String> = bytes
        .split(|&b| b == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    (!arguments.is_empty()).then_some(arguments)
}
