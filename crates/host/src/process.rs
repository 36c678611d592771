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
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cgroup::{self, Limits};
use crate::vmdir::{io, VmDir};
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

/// Sends `signal` to the process group `pgid` (a runner's group is its own pid).
pub(crate) fn signal_group(pgid: u32, signal: rustix::process::Signal) {
    let Some(pid) = i32::try_from(pgid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    if let Err(e) = rustix::process::kill_process_group(pid, signal) {
        tracing::debug!(pgid, "signalling the process group: {e}");
    }
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
    pub fn dir(&self, name: &str) -> Result<VmDir, HostError> {
        VmDir::in_root(&self.root, name)
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
        let dir = self.dir(name)?;
        let (tap_names, tap_flags) = prepare_start(&dir, runner)?;
        self.release_cgroup(&dir);
        let console = dir.open_console()?;
        let err = console
            .try_clone()
            .map_err(io(name, "opening the console log"))?;
        let made = taps::create(name, &tap_names, &tap_flags)?;
        let cgroup = limits.and_then(|l| self.cgroup_for(name, l));
        let spawned = Command::new(runner.run())
            .current_dir(dir.path())
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
                    if let Err(e) = dir.write_cgroup(&cg) {
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
        dir.write_pid(pid, started)?;
        dir.link_booted(runner)?;
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
    fn release_cgroup(&self, dir: &VmDir) {
        let Some(text) = dir.cgroup() else {
            return;
        };
        if text.is_empty() || cgroup::remove(dir.name(), Path::new(&text)) {
            dir.remove_cgroup_file();
        }
    }

    /// The VM's process state. Reaps a runner this supervisor started once it exits.
    pub fn state(&self, name: &str) -> Result<VmState, HostError> {
        let dir = self.dir(name)?;
        if let Ok(mut children) = self.children.lock() {
            if let Some(child) = children.get_mut(name) {
                match child.try_wait() {
                    Ok(None) => return Ok(VmState::Running { pid: child.id() }),
                    Ok(Some(status)) => {
                        let code = status.code();
                        children.remove(name);
                        dir.write_exit(code);
                        dir.remove_pid();
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
        if let Some(code) = dir.exit() {
            return Ok(VmState::Exited { code });
        }
        if dir.has_pid() {
            // It ran under an earlier daemon and is gone; its exit code is unknown.
            dir.remove_pid();
            dir.write_exit(None);
            return Ok(VmState::Exited { code: None });
        }
        Ok(VmState::Absent)
    }

    /// The pid in the `pid` file if that process still runs (same start time).
    fn adoptable(&self, dir: &VmDir) -> Option<u32> {
        let (pid, started) = dir.pid()?;
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
        let dir = self.dir(name)?;
        let booted = dir.booted();
        let shutdown = booted.as_ref().and_then(|r| r.shutdown());
        match shutdown {
            Some(cmd) => {
                // Started, not waited for: a hanging shutdown script must not hold the
                // stop past its timeout (the group is killed below if need be).
                match Command::new(cmd)
                    .current_dir(dir.path())
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
                        signal_group(pid, rustix::process::Signal::TERM);
                    }
                }
            }
            None => signal_group(pid, rustix::process::Signal::TERM),
        }
        let state = match self.wait_gone(name, timeout)? {
            Some(state) => state,
            None => {
                tracing::warn!(vm = name, pid, "did not stop in {timeout:?}; killing it");
                signal_group(pid, rustix::process::Signal::KILL);
                self.wait_gone(name, Duration::from_secs(10))?
                    .ok_or_else(|| {
                        io(name, "killing the runner")(std::io::ErrorKind::TimedOut.into())
                    })?
            }
        };
        delete_taps(name, booted.as_ref());
        self.release_cgroup(&dir);
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
        self.dir(name)?.console_tail(lines)
    }

    /// Keeps the console log near its cap: past it, only the newest half stays.
    pub fn trim_console(&self, name: &str) -> Result<(), HostError> {
        self.dir(name)?.trim_console(self.console_cap)
    }
}

impl Supervisor for ProcessSupervisor {
    fn dir(&self, name: &str) -> Result<VmDir, HostError> {
        ProcessSupervisor::dir(self, name)
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

    fn local_dirs(&self) -> Vec<String> {
        crate::vmdir::dirs_in(&self.root)
    }

    fn trim_console(&self, name: &str) -> Result<(), HostError> {
        ProcessSupervisor::trim_console(self, name)
    }
}

/// What every start does first, whatever runs the runner: reads the runner's tap list
/// and flags (a bad one fails the start before anything changes), makes the state dir,
/// points `current` at the runner and forgets the last run's exit code.
pub(crate) fn prepare_start(
    dir: &VmDir,
    runner: &Runner,
) -> Result<(Vec<String>, Vec<&'static str>), HostError> {
    let tap_names = runner.tap_interfaces()?;
    let tap_flags = if tap_names.is_empty() {
        Vec::new()
    } else {
        taps::flags(runner)?
    };
    dir.create()?;
    dir.link_current(runner)?;
    dir.clear_exit();
    Ok((tap_names, tap_flags))
}

/// After a stop: deletes the tap interfaces the VM's runner lists.
pub(crate) fn delete_taps(name: &str, booted: Option<&Runner>) {
    match booted.map(Runner::tap_interfaces) {
        Some(Ok(names)) => taps::delete(name, &names),
        Some(Err(e)) => tracing::warn!(vm = name, "not deleting tap interfaces: {e}"),
        None => {}
    }
}
