//! Supervising VM runners as plain processes, for hosts without systemd (and the tests).
//!
//! Each runner runs in its own process group with its console appended to a file, so it
//! outlives the daemon: restarting `blixard` never kills a VM, and the new daemon adopts
//! it again from the `pid` file (pid plus the kernel's start time, so a reused pid is not
//! mistaken for the VM).
//!
//! Before a runner starts, the supervisor makes the tap interfaces it lists (see `taps`)
//! and, when the VM has [`Limits`], puts it in a cgroup of its own (see `cgroup`); both are
//! given back after [`ProcessSupervisor::stop`].

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cgroup::{self, Limits};
use crate::{taps, HostError, Runner, Supervisor};

/// What the supervisor knows about a VM's process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmState {
    Running {
        pid: u32,
    },
    /// It ran and stopped; the exit code when this supervisor saw it.
    Exited {
        code: Option<i32>,
    },
    /// Never started here.
    Absent,
}

/// Runs and watches VM runners; one per host.
#[derive(Debug)]
pub struct ProcessSupervisor {
    root: PathBuf,
    console_cap: u64,
    /// Where VM cgroups are made; `None`: no cgroups.
    cgroup_parent: Option<PathBuf>,
    /// Runners this supervisor started (so it can reap them and see their exit codes).
    children: Mutex<HashMap<String, Child>>,
}

pub(crate) fn io<'a>(
    vm: &'a str,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> HostError + 'a {
    move |source| HostError::Io {
        vm: vm.to_string(),
        what,
        source,
    }
}

/// The kernel's start time of `pid` (field 22 of /proc/PID/stat), if it runs.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); zombies are not running.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn signal_group(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, "--", &format!("-{pid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl ProcessSupervisor {
    /// State dirs live under `root` (one per VM); consoles are kept to about `console_cap`
    /// bytes by [`ProcessSupervisor::trim_console`].
    pub fn new(root: &Path, console_cap: u64) -> Result<Self, HostError> {
        std::fs::create_dir_all(root).map_err(io("-", "creating the state root"))?;
        Ok(Self {
            root: root.to_owned(),
            console_cap,
            cgroup_parent: Some(PathBuf::from(cgroup::DEFAULT_PARENT)),
            children: Mutex::new(HashMap::new()),
        })
    }

    /// Where VMs with [`Limits`] get their cgroups (`<parent>/vm-<name>`); by default
    /// `/sys/fs/cgroup/blixard.slice`. `None` turns cgroups off: limits are not enforced.
    pub fn with_cgroup_parent(mut self, parent: Option<PathBuf>) -> Self {
        self.cgroup_parent = parent;
        self
    }

    /// The VM's state dir (`<root>/<name>`); the name is checked.
    pub fn state_dir(&self, name: &str) -> Result<PathBuf, HostError> {
        state_dir_in(&self.root, name)
    }

    pub fn console_path(&self, name: &str) -> Result<PathBuf, HostError> {
        Ok(self.state_dir(name)?.join("console.log"))
    }

    /// Starts `runner` as VM `name` without limits; if it already runs, returns its pid.
    pub fn start(&self, name: &str, runner: &Runner) -> Result<u32, HostError> {
        self.start_with(name, runner, None)
    }

    /// Starts `runner` as VM `name`; if it already runs, returns its pid (and changes
    /// nothing, limits included).
    ///
    /// First the tap interfaces the runner lists are made (an existing tap is reused); a
    /// bad list, or a tap that cannot be made, fails the start before anything runs. With
    /// `limits`, the runner then goes into its cgroup where cgroup v2 allows (see
    /// [`ProcessSupervisor::with_cgroup_parent`]); where it does not, the VM runs without
    /// them and a warning says why. The state dir's `cgroup` file names the cgroup used.
    ///
    /// The runner is moved into its cgroup by the supervisor right after it is spawned
    /// (moving it from inside the child before `exec` would need `unsafe`, which the
    /// workspace forbids). A process the runner script forks in the short window between
    /// spawn and that write stays outside the cgroup; the hypervisor the script `exec`s is
    /// the runner's own process, and so is inside.
    pub fn start_with(
        &self,
        name: &str,
        runner: &Runner,
        limits: Option<&Limits>,
    ) -> Result<u32, HostError> {
        if let VmState::Running { pid } = self.state(name)? {
            return Ok(pid);
        }
        let dir = self.state_dir(name)?;
        let (tap_names, tap_flags) = prepare_start(name, &dir, runner)?;
        self.release_cgroup(name, &dir);
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("console.log"))
            .map_err(io(name, "opening the console log"))?;
        let err = console
            .try_clone()
            .map_err(io(name, "opening the console log"))?;
        let made = taps::create(name, &tap_names, &tap_flags)?;
        let cgroup = limits.and_then(|l| self.cgroup_for(name, l));
        let spawned = Command::new(runner.run())
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(err)
            // Its own process group: signals to the daemon's group do not reach it, and
            // stopping it reaches everything it started.
            .process_group(0)
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                taps::delete(name, &made);
                if let Some(cg) = &cgroup {
                    cgroup::remove(name, cg);
                }
                return Err(io(name, "starting bin/microvm-run")(e));
            }
        };
        let pid = child.id();
        if let Some(cg) = cgroup {
            match cgroup::attach(&cg, pid) {
                Ok(()) => {
                    let text = format!("{}\n", cg.display());
                    if let Err(e) = write_atomic(&dir.join("cgroup"), text.as_bytes()) {
                        tracing::warn!(vm = name, "could not record the cgroup: {e}");
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        vm = name,
                        cgroup = %cg.display(),
                        "limits not enforced: could not move the runner into its cgroup: {e}"
                    );
                    cgroup::remove(name, &cg);
                }
            }
        }
        let started = start_time(pid).unwrap_or(0);
        write_atomic(&dir.join("pid"), format!("{pid} {started}\n").as_bytes())
            .map_err(io(name, "writing the pid file"))?;
        relink(&dir.join("booted"), &runner.dir).map_err(io(name, "linking booted"))?;
        if let Ok(mut c) = self.children.lock() {
            c.insert(name.to_string(), child);
        }
        tracing::info!(vm = name, pid, runner = %runner.dir.display(), "started");
        Ok(pid)
    }

    /// The VM's cgroup for `limits`, or `None` (with the warning saying why) when there is
    /// none to be had.
    fn cgroup_for(&self, name: &str, limits: &Limits) -> Option<PathBuf> {
        let Some(parent) = &self.cgroup_parent else {
            tracing::info!(vm = name, "cgroups are turned off; limits not enforced");
            return None;
        };
        match cgroup::setup(parent, name, limits) {
            Ok(setup) => {
                if !setup.unenforced.is_empty() {
                    tracing::warn!(
                        vm = name,
                        cgroup = %setup.path.display(),
                        "some limits not enforced: {}",
                        setup.unenforced.join("; ")
                    );
                }
                Some(setup.path)
            }
            Err(why) => {
                tracing::warn!(
                    vm = name,
                    "limits not enforced: no cgroup for the VM: {why}"
                );
                None
            }
        }
    }

    /// Removes the cgroup named in the state dir's `cgroup` file, if any, and the file.
    fn release_cgroup(&self, name: &str, dir: &Path) {
        let file = dir.join("cgroup");
        let Ok(text) = std::fs::read_to_string(&file) else {
            return;
        };
        let cg = PathBuf::from(text.trim());
        if text.trim().is_empty() || cgroup::remove(name, &cg) {
            let _ = std::fs::remove_file(&file);
        }
    }

    /// The VM's process state. Reaps a runner this supervisor started once it exits.
    pub fn state(&self, name: &str) -> Result<VmState, HostError> {
        let dir = self.state_dir(name)?;
        if let Ok(mut children) = self.children.lock() {
            if let Some(child) = children.get_mut(name) {
                match child.try_wait() {
                    Ok(None) => return Ok(VmState::Running { pid: child.id() }),
                    Ok(Some(status)) => {
                        let code = status.code();
                        children.remove(name);
                        let text = code.map(|c| c.to_string()).unwrap_or_default();
                        let _ = write_atomic(&dir.join("exit"), text.as_bytes());
                        let _ = std::fs::remove_file(dir.join("pid"));
                        return Ok(VmState::Exited { code });
                    }
                    Err(e) => return Err(io(name, "waiting for the runner")(e)),
                }
            }
        }
        // Not our child: a runner from before a daemon restart, or none.
        if let Some(pid) = self.adoptable(&dir) {
            return Ok(VmState::Running { pid });
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("exit")) {
            return Ok(VmState::Exited {
                code: text.trim().parse().ok(),
            });
        }
        if dir.join("pid").exists() {
            // It ran under an earlier daemon and is gone; its exit code is unknown.
            let _ = std::fs::remove_file(dir.join("pid"));
            let _ = write_atomic(&dir.join("exit"), b"");
            return Ok(VmState::Exited { code: None });
        }
        Ok(VmState::Absent)
    }

    /// The pid in `dir/pid` if that process still runs (same start time).
    fn adoptable(&self, dir: &Path) -> Option<u32> {
        let text = std::fs::read_to_string(dir.join("pid")).ok()?;
        let mut parts = text.split_whitespace();
        let pid: u32 = parts.next()?.parse().ok()?;
        let started: u64 = parts.next()?.parse().ok()?;
        (start_time(pid)? == started).then_some(pid)
    }

    /// The VMs whose runners still run (e.g. after a daemon restart), by name.
    pub fn running(&self) -> Vec<(String, u32)> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut out: Vec<(String, u32)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                match self.state(&name) {
                    Ok(VmState::Running { pid }) => Some((name, pid)),
                    _ => None,
                }
            })
            .collect();
        out.sort();
        out
    }

    /// Stops VM `name`: `bin/microvm-shutdown` when the runner has one, else SIGTERM to
    /// its process group; SIGKILL if it still runs after `timeout`. Once it is gone, the
    /// tap interfaces its runner lists are deleted and its cgroup is removed.
    pub fn stop(&self, name: &str, timeout: Duration) -> Result<VmState, HostError> {
        let VmState::Running { pid } = self.state(name)? else {
            return Err(HostError::NotRunning(name.to_string()));
        };
        let dir = self.state_dir(name)?;
        let booted = booted(&dir);
        let shutdown = booted.as_ref().and_then(|r| r.shutdown());
        match shutdown {
            Some(cmd) => {
                // Started, not waited for: a hanging shutdown script must not hold the
                // stop past its timeout (the group is killed below if need be).
                match Command::new(cmd)
                    .current_dir(&dir)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                {
                    Ok(mut child) => {
                        std::thread::spawn(move || child.wait());
                    }
                    Err(e) => {
                        tracing::warn!(vm = name, "bin/microvm-shutdown: {e}; sending SIGTERM");
                        signal_group(pid, "-TERM");
                    }
                }
            }
            None => signal_group(pid, "-TERM"),
        }
        let state = match self.wait_gone(name, timeout)? {
            Some(state) => state,
            None => {
                tracing::warn!(vm = name, pid, "did not stop in {timeout:?}; killing it");
                signal_group(pid, "-KILL");
                self.wait_gone(name, Duration::from_secs(10))?
                    .ok_or_else(|| {
                        io(name, "killing the runner")(std::io::ErrorKind::TimedOut.into())
                    })?
            }
        };
        delete_taps(name, booted.as_ref());
        self.release_cgroup(name, &dir);
        Ok(state)
    }

    fn wait_gone(&self, name: &str, within: Duration) -> Result<Option<VmState>, HostError> {
        let deadline = Instant::now() + within;
        loop {
            match self.state(name)? {
                VmState::Running { .. } if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                VmState::Running { .. } => return Ok(None),
                other => return Ok(Some(other)),
            }
        }
    }

    /// The last `lines` lines of the VM's console.
    pub fn console_tail(&self, name: &str, lines: usize) -> Result<Vec<String>, HostError> {
        console_tail(name, &self.console_path(name)?, lines)
    }

    /// Keeps the console log near its cap: past it, only the newest half stays.
    pub fn trim_console(&self, name: &str) -> Result<(), HostError> {
        trim_console(name, &self.console_path(name)?, self.console_cap)
    }
}

impl Supervisor for ProcessSupervisor {
    fn state_dir(&self, name: &str) -> Result<PathBuf, HostError> {
        ProcessSupervisor::state_dir(self, name)
    }

    fn start_with(
        &self,
        name: &str,
        runner: &Runner,
        limits: Option<&Limits>,
    ) -> Result<u32, HostError> {
        ProcessSupervisor::start_with(self, name, runner, limits)
    }

    fn state(&self, name: &str) -> Result<VmState, HostError> {
        ProcessSupervisor::state(self, name)
    }

    fn running(&self) -> Vec<(String, u32)> {
        ProcessSupervisor::running(self)
    }

    fn stop(&self, name: &str, timeout: Duration) -> Result<VmState, HostError> {
        ProcessSupervisor::stop(self, name, timeout)
    }

    fn trim_console(&self, name: &str) -> Result<(), HostError> {
        ProcessSupervisor::trim_console(self, name)
    }
}

/// What every start does first, whatever runs the runner: reads the runner's tap list
/// and flags (a bad one fails the start before anything changes), makes the state dir,
/// points `current` at the runner and forgets the last run's exit code.
pub(crate) fn prepare_start(
    name: &str,
    dir: &Path,
    runner: &Runner,
) -> Result<(Vec<String>, Vec<&'static str>), HostError> {
    let tap_names = runner.tap_interfaces()?;
    let tap_flags = if tap_names.is_empty() {
        Vec::new()
    } else {
        taps::flags(runner)?
    };
    std::fs::create_dir_all(dir).map_err(io(name, "creating the state dir"))?;
    relink(&dir.join("current"), &runner.dir).map_err(io(name, "linking current"))?;
    let _ = std::fs::remove_file(dir.join("exit"));
    Ok((tap_names, tap_flags))
}

/// The runner a VM's last start used (`booted`), if it is still there.
pub(crate) fn booted(dir: &Path) -> Option<Runner> {
    std::fs::read_link(dir.join("booted"))
        .ok()
        .and_then(|r| Runner::new(&r).ok())
}

/// After a stop: deletes the tap interfaces the VM's runner lists.
pub(crate) fn delete_taps(name: &str, booted: Option<&Runner>) {
    match booted.map(Runner::tap_interfaces) {
        Some(Ok(names)) => taps::delete(name, &names),
        Some(Err(e)) => tracing::warn!(vm = name, "not deleting tap interfaces: {e}"),
        None => {}
    }
}

/// The VM's state dir under `root`; the name is checked (it becomes a path and, under
/// systemd, a unit name).
pub(crate) fn state_dir_in(root: &Path, name: &str) -> Result<PathBuf, HostError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
    if ok {
        Ok(root.join(name))
    } else {
        Err(HostError::BadName(name.to_string()))
    }
}

/// The last `lines` lines of a console log (none if it does not exist yet).
pub(crate) fn console_tail(
    name: &str,
    path: &Path,
    lines: usize,
) -> Result<Vec<String>, HostError> {
    let text = match std::fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(name, "reading the console log")(e)),
    };
    let all: Vec<&str> = text.lines().collect();
    Ok(all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| l.to_string())
        .collect())
}

/// Keeps a console log near `cap` bytes: past it, only the newest half stays. The runner
/// appends (`O_APPEND`), so it goes on writing at the new end.
pub(crate) fn trim_console(name: &str, path: &Path, cap: u64) -> Result<(), HostError> {
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    else {
        return Ok(());
    };
    let len = f.metadata().map_err(io(name, "console size"))?.len();
    if len <= cap {
        return Ok(());
    }
    let keep = cap / 2;
    let mut tail = Vec::with_capacity(keep as usize);
    f.seek(SeekFrom::Start(len - keep))
        .and_then(|_| f.take(keep).read_to_end(&mut tail))
        .map_err(io(name, "reading the console log"))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io(name, "trimming the console log"))?;
    f.set_len(0)
        .and_then(|_| f.seek(SeekFrom::Start(0)))
        .and_then(|_| f.write_all(&tail))
        .map_err(io(name, "trimming the console log"))?;
    Ok(())
}

/// Points `link` at `target`, replacing what was there.
pub(crate) fn relink(link: &Path, target: &Path) -> std::io::Result<()> {
    // Each directory change costs a journal handle, and on a host whose raft log fsyncs
    // all the time that is a large share of a start: make only the ones needed.
    match std::fs::read_link(link) {
        Ok(old) if old == target => return Ok(()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match std::os::unix::fs::symlink(target, link) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                done => return done,
            }
        }
        Err(_) => {}
    }
    let tmp = link.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link)
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relink_makes_replaces_and_keeps_links() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("current");
        let (a, b) = (dir.path().join("runner-a"), dir.path().join("runner-b"));
        // Absent: made.
        relink(&link, &a).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), a);
        // Already right: kept (same inode, nothing rewritten).
        let ino =
            |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::symlink_metadata(p).unwrap());
        let before = ino(&link);
        relink(&link, &a).unwrap();
        assert_eq!(ino(&link), before);
        // Elsewhere: replaced, with no temporary link left behind.
        relink(&link, &b).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), b);
        assert!(!link.with_extension("new").exists());
        // A file in the way is replaced too.
        std::fs::remove_file(&link).unwrap();
        std::fs::write(&link, b"not a link").unwrap();
        relink(&link, &a).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), a);
    }
}
