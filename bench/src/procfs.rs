//! What a process costs, read from /proc: CPU time and memory.

/// CPU seconds the process has used so far: to the nanosecond from its threads' scheduler counts, as
/// a short run (a few thousand messages) may use less than the 10 ms clock tick `stat` counts in;
/// from `stat` where those counts are not kept.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    scheduled_seconds(pid).or_else(|| ticked_seconds(pid))
}

/// The sum over the process's threads of the time each ran (the first field of `schedstat`, in ns).
fn scheduled_seconds(pid: u32) -> Option<f64> {
    let mut nanos: u64 = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let text = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        nanos += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(nanos as f64 / 1e9)
}

/// User plus system time from `stat`, in clock ticks.
fn ticked_seconds(pid: u32) -> Option<f64> {
    let fields = stat_fields(pid)?;
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks_per_second())
}

/// CPU seconds a process and every process under it have used so far: its own and its reaped
/// children's from `stat` (a server's connections come and go), and those of the children still
/// running, each with theirs.
pub fn tree_cpu_seconds(pid: u32) -> Option<f64> {
    let fields = stat_fields(pid)?;
    // utime, stime, cutime and cstime: fields 14 to 17 of the whole line.
    let ticks: i64 = fields[11..15]
        .iter()
        .map(|f| f.parse::<i64>().ok())
        .sum::<Option<i64>>()?;
    let own = ticks as f64 / clock_ticks_per_second();
    Some(
        own + children(pid)
            .into_iter()
            .filter_map(tree_cpu_seconds)
            .sum::<f64>(),
    )
}

/// The fields of /proc/<pid>/stat after the command name (the third field of the line on).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; fields after it are plain.
    let after = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<String> = after.split_whitespace().map(str::to_string).collect();
    (fields.len() > 15).then_some(fields)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// A memory figure from /proc/<pid>/status in MiB: `VmRSS` now, `VmHWM` at its peak.
pub fn memory_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The processes `pid` started (those still running).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_process() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some());
        let rss = memory_mib(me, "VmRSS:").unwrap();
        assert!(rss > 0.5, "{rss}");
        // Not compared with the RSS read before it: memory this test process's other threads give
        // back (glibc trims with MADV_DONTNEED) lowers the RSS without raising the peak first, so a
        // peak read later can be below an RSS read earlier.
        let peak = memory_mib(me, "VmHWM:").unwrap();
        assert!(peak > 0.5, "{peak}");
    }

    #[test]
    fn a_tree_counts_the_children_it_has_reaped() {
        let me = std::process::id();
        let before = tree_cpu_seconds(me).unwrap();
        // A child that counts to 300,000 (a few hundred ms of CPU), then is waited for.
        let status = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 300000 ]; do i=$((i + 1)); done"])
            .status()
            .unwrap();
        assert!(status.success());
        let after = tree_cpu_seconds(me).unwrap();
        assert!(after - before >= 0.05, "{before} → {after}");
    }
}
