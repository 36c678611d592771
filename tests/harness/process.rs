//! What /proc says about a process: liveness, namespaces, memory, CPU time.

/// Whether process `pid` runs (a zombie does not: in a container nobody may reap it).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

/// The pid namespace path of process `pid` (`pid:[inode]`), as a string.
pub fn pid_ns(pid: u32) -> Option<String> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()?;
    Some(link.to_string_lossy().into_owned())
}

/// The `NSpid` line of `/proc/<pid>/status`: the process's pid in each pid namespace it
/// is in, outermost (the caller's) first.
pub fn proc_nspid(pid: u32) -> Option<Vec<u32>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().map(|p| p.parse().ok()).collect()
}

/// The parent of process `pid`.
fn proc_ppid(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("PPid:"))?
        .trim()
        .parse()
        .ok()
}

/// The pids of all processes, as this process sees them.
pub(crate) fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// A descendant of `ancestor` whose pid in its own pid namespace is `inner`: a process
/// started through a wrapper such as `nsenter`, found by the pid it reports.
pub fn descendant_with_inner_pid(ancestor: u32, inner: u32) -> Option<u32> {
    all_pids().into_iter().find(|&pid| {
        pid != ancestor
            && proc_nspid(pid).is_some_and(|ns| ns.last() == Some(&inner))
            && std::iter::successors(proc_ppid(pid), |&p| proc_ppid(p))
                .take(64)
                .take_while(|&p| p != 0)
                .any(|p| p == ancestor)
    })
}

/// A `kB` field (`VmRSS`, `VmHWM`, ...) of `/proc/<pid>/status`, in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// User plus system CPU time a process has used, in clock ticks (`/proc/<pid>/stat`).
pub fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = text
        .get(text.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The CPU time, in clock ticks, the processes `pids` have used (those still running).
pub fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| proc_cpu_ticks(*p)).sum()
}

/// The kernel's clock ticks per second, the unit of [`proc_cpu_ticks`].
pub fn clock_ticks_per_sec() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}
