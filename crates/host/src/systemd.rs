//! Supervising VM runners as transient systemd units, one per VM.
//!
//! `start` runs `systemd-run --unit blixard-vm-<name>.service` (an `@` in the name is
//! written `\x40`, as systemd escapes it) with the runner's `bin/microvm-run` as the main
//! process, in the VM's state dir, console appended to `console.log`, and:
//!
//! | property | from |
//! |---|---|
//! | `MemoryMax=` | guest RAM + 25 % + 64 MiB (as the process supervisor's cgroup) |
//! | `CPUQuota=` | 100 % per vCPU |
//! | `ExecStop=` | the runner's `bin/microvm-shutdown`, when it has one |
//! | `TimeoutStopSec=`, `KillMode=mixed` | the stop timeout; then SIGKILL for every process |
//! | `RemainAfterExit=yes` | an exited runner stays visible with its exit status |
//!
//! The unit belongs to systemd, not to the daemon: restarting `blixard` leaves it alone,
//! and the next daemon asks systemd for it. Once the supervisor has seen a runner exit, it
//! records the exit status in the state dir (`exit`) and lets systemd forget the unit, so
//! the name is free for the next start.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process::{delete_taps, prepare_start};
use crate::vmdir::{io, VmDir};
use crate::{taps, HostError, Limits, Runner, Supervisor, VmState};

const PREFIX: &str = "blixard-vm-";
const SUFFIX: &str = ".service";

/// Runs each VM as a transient systemd unit; needs `systemctl` and `systemd-run` on
/// `PATH` and a system manager to talk to.
#[derive(Debug)]
pub struct SystemdSupervisor {
    root: PathBuf,
    console_cap: u64,
    stop_timeout: Duration,
    /// Operator-given `Key=value` properties, after Blixard's own.
    extra: Vec<String>,
}

/// The unit of VM `name` (a checked name: ASCII letters, digits, `._-@`).
pub fn unit_name(name: &str) -> String {
    format!("{PREFIX}{}{SUFFIX}", name.replace('@', "\\x40"))
}

/// The VM of a unit this supervisor started, if it is one.
fn vm_of_unit(unit: &str) -> Option<String> {
    let inner = unit.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    Some(inner.replace("\\x40", "@"))
}

/// One unit as `systemctl show` reports it.
#[derive(Debug, Default, PartialEq, Eq)]
struct Unit {
    id: String,
    load: String,
    active: String,
    sub: String,
    main_pid: u32,
    /// `CLD_EXITED` (1): `status` is the exit code; otherwise the signal that killed it.
    exec_code: i32,
    exec_status: i32,
}

const PROPERTIES: &str = "Id,LoadState,ActiveState,SubState,MainPID,ExecMainCode,ExecMainStatus";

/// Parses `systemctl show` output: `Key=value` lines, one blank line between units.
fn parse_show(text: &str) -> Vec<Unit> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut u = Unit::default();
        let mut any = false;
        for line in block.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            any = true;
            match k {
                "Id" => u.id = v.to_string(),
                "LoadState" => u.load = v.to_string(),
                "ActiveState" => u.active = v.to_string(),
                "SubState" => u.sub = v.to_string(),
                "MainPID" => u.main_pid = v.parse().unwrap_or(0),
                "ExecMainCode" => u.exec_code = v.parse().unwrap_or(0),
                "ExecMainStatus" => u.exec_status = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        if any {
            out.push(u);
        }
    }
    out
}

impl Unit {
    fn state(&self) -> Option<VmState> {
        let exited = VmState::Exited {
            code: (self.exec_code == 1).then_some(self.exec_status),
        };
        if self.load == "not-found" {
            return None;
        }
        match self.active.as_str() {
            "failed" => Some(exited),
            "active" if self.sub == "exited" => Some(exited),
            "active" | "activating" | "reloading" | "deactivating" => {
                Some(VmState::Running { pid: self.main_pid })
            }
            // Stopped (and about to be forgotten), or never started.
            _ => None,
        }
    }
}

impl SystemdSupervisor {
    /// State dirs live under `root`; consoles are kept to about `console_cap` bytes; a
    /// runner still running `stop_timeout` after it was asked to stop is killed.
    pub fn new(root: &Path, console_cap: u64, stop_timeout: Duration) -> Result<Self, HostError> {
        std::fs::create_dir_all(root).map_err(io("-", "creating the state root"))?;
        Ok(Self {
            root: root.to_owned(),
            console_cap,
            stop_timeout,
            extra: Vec::new(),
        })
    }

    /// More properties for every unit (`User=`, `SupplementaryGroups=`, sandboxing, …),
    /// passed after Blixard's own (for single-valued properties, the later one counts).
    pub fn with_properties(mut self, extra: Vec<String>) -> Self {
        self.extra = extra;
        self
    }

    /// Checks that a system manager answers (for a clear error at daemon start).
    pub fn check(&self) -> Result<(), HostError> {
        systemctl("-", &["show", "-p", "Version"]).map(|_| ())
    }

    fn show(&self, name: &str) -> Result<Option<Unit>, HostError> {
        let text = systemctl(name, &["show", "-p", PROPERTIES, "--", &unit_name(name)])?;
        Ok(parse_show(&text).into_iter().next())
    }

    /// Lets systemd forget a unit that is not running (so its name can be used again).
    fn release(&self, name: &str) {
        let unit = unit_name(name);
        let _ = systemctl(name, &["stop", "--", &unit]);
        let _ = systemctl(name, &["reset-failed", "--", &unit]);
    }

    fn record_exit(&self, dir: &VmDir, code: Option<i32>) {
        dir.write_exit(code);
        dir.remove_unit();
        self.release(dir.name());
    }
}

/// Runs `systemctl ARGS`; its stdout, or its stderr as the error.
fn systemctl(vm: &str, args: &[&str]) -> Result<String, HostError> {
    run(vm, "systemctl", args)
}

fn run(vm: &str, program: &str, args: &[&str]) -> Result<String, HostError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| HostError::Systemd {
            vm: vm.to_string(),
            detail: format!("cannot run {program}: {e}"),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(HostError::Systemd {
            vm: vm.to_string(),
            detail: format!(
                "{program} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

impl Supervisor for SystemdSupervisor {
    fn dir(&self, name: &str) -> Result<VmDir, HostError> {
        VmDir::in_root(&self.root, name)
    }

    fn start_with(
        &self,
        name: &str,
        runner: &Runner,
        limits: Option<&Limits>,
    ) -> Result<u32, HostError> {
        // One look: a run's exit needs no recording here (this start replaces it).
        let held = self.show(name)?;
        if let Some(VmState::Running { pid }) = held.as_ref().and_then(Unit::state) {
            return Ok(pid);
        }
        let dir = self.dir(name)?;
        let (tap_names, tap_flags) = prepare_start(&dir, runner)?;
        // A unit of an earlier run that systemd still holds (exited, failed).
        if held.is_some_and(|u| u.load != "not-found") {
            self.release(name);
        }
        let made = taps::create(name, &tap_names, &tap_flags)?;

        let unit = unit_name(name);
        let console = dir.console();
        // Made here, so it is the daemon's (systemd would make it as root, and the daemon,
        // which trims it, may not be).
        dir.open_console()?;
        let mut props = vec![
            format!("Description=Blixard VM {name}"),
            "RemainAfterExit=yes".to_string(),
            "KillMode=mixed".to_string(),
            format!("TimeoutStopSec={}ms", self.stop_timeout.as_millis().max(1)),
            format!("WorkingDirectory={}", dir.path().display()),
            format!("StandardOutput=append:{}", console.display()),
            format!("StandardError=append:{}", console.display()),
        ];
        if let Some(stop) = runner.shutdown() {
            props.push(format!("ExecStop={}", stop.display()));
        }
        if let Some(l) = limits {
            if let Some(bytes) = l.memory_max() {
                props.push(format!("MemoryMax={bytes}"));
            }
            if l.vcpus > 0 {
                props.push(format!("CPUQuota={}%", u64::from(l.vcpus) * 100));
            }
        }
        props.extend(self.extra.iter().cloned());
        let run_path = runner.run();
        let run_arg = run_path.display().to_string();
        let mut args: Vec<String> = vec!["--quiet".into(), "--unit".into(), unit.clone()];
        for p in &props {
            args.push("--property".into());
            args.push(p.clone());
        }
        args.push("--".into());
        args.push(run_arg);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if let Err(e) = run(name, "systemd-run", &args) {
            taps::delete(name, &made);
            return Err(e);
        }
        dir.write_unit(&unit);
        dir.link_booted(runner)?;
        // systemd-run returns once the unit's main process is forked.
        match self.state(name)? {
            VmState::Running { pid } => {
                tracing::info!(vm = name, pid, %unit, runner = %runner.dir.display(), "started");
                Ok(pid)
            }
            // It already exited: the caller sees that on its next look.
            _ => Ok(0),
        }
    }

    fn state(&self, name: &str) -> Result<VmState, HostError> {
        let dir = self.dir(name)?;
        let unit = self.show(name)?;
        match unit.as_ref().and_then(Unit::state) {
            Some(VmState::Exited { code }) => {
                self.record_exit(&dir, code);
                Ok(VmState::Exited { code })
            }
            Some(state) => Ok(state),
            None => {
                if let Some(code) = dir.exit() {
                    return Ok(VmState::Exited { code });
                }
                if dir.has_unit() {
                    // It ran and systemd no longer knows it: the exit code is unknown.
                    self.record_exit(&dir, None);
                    return Ok(VmState::Exited { code: None });
                }
                Ok(VmState::Absent)
            }
        }
    }

    fn running(&self) -> Vec<(String, u32)> {
        let pattern = format!("{PREFIX}*{SUFFIX}");
        let Ok(text) = systemctl("-", &["show", "-p", PROPERTIES, "--", &pattern]) else {
            return Vec::new();
        };
        let mut out: Vec<(String, u32)> = parse_show(&text)
            .into_iter()
            .filter_map(|u| match u.state() {
                Some(VmState::Running { pid }) => Some((vm_of_unit(&u.id)?, pid)),
                _ => None,
            })
            .collect();
        out.sort();
        out
    }

    fn stop(&self, name: &str, timeout: Duration) -> Result<VmState, HostError> {
        let VmState::Running { .. } = self.state(name)? else {
            return Err(HostError::NotRunning(name.to_string()));
        };
        let dir = self.dir(name)?;
        let unit = unit_name(name);
        if timeout != self.stop_timeout {
            let _ = systemctl(
                name,
                &[
                    "set-property",
                    "--runtime",
                    "--",
                    &unit,
                    &format!("TimeoutStopSec={}ms", timeout.as_millis().max(1)),
                ],
            );
        }
        // Waits for the stop job: ExecStop (or SIGTERM), then SIGKILL after the timeout.
        systemctl(name, &["stop", "--", &unit])?;
        let state = match self.state(name)? {
            VmState::Running { .. } => {
                return Err(io(name, "stopping the unit")(
                    std::io::ErrorKind::TimedOut.into(),
                ))
            }
            other => other,
        };
        delete_taps(name, dir.booted().as_ref());
        Ok(state)
    }

    fn local_dirs(&self) -> Vec<String> {
        crate::vmdir::dirs_in(&self.root)
    }

    fn trim_console(&self, name: &str) -> Result<(), HostError> {
        self.dir(name)?.trim_console(self.console_cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_escape_the_at_sign_and_map_back() {
        assert_eq!(
            unit_name("default@web"),
            "blixard-vm-default\\x40web.service"
        );
        assert_eq!(
            vm_of_unit("blixard-vm-default\\x40web.service").as_deref(),
            Some("default@web")
        );
        assert_eq!(vm_of_unit("sshd.service"), None);
    }

    #[test]
    fn show_output_maps_to_vm_states() {
        let text = "Id=blixard-vm-a.service\nLoadState=loaded\nActiveState=active\nSubState=running\nMainPID=57\nExecMainCode=0\nExecMainStatus=0\n\n\
                    Id=blixard-vm-b.service\nLoadState=loaded\nActiveState=failed\nSubState=failed\nMainPID=0\nExecMainCode=1\nExecMainStatus=3\n\n\
                    Id=blixard-vm-c.service\nLoadState=loaded\nActiveState=failed\nSubState=failed\nMainPID=0\nExecMainCode=2\nExecMainStatus=9\n\n\
                    Id=blixard-vm-d.service\nLoadState=loaded\nActiveState=active\nSubState=exited\nMainPID=0\nExecMainCode=1\nExecMainStatus=0\n\n\
                    Id=blixard-vm-e.service\nLoadState=not-found\nActiveState=inactive\nSubState=dead\nMainPID=0\n";
        let states: Vec<Option<VmState>> = parse_show(text).iter().map(Unit::state).collect();
        assert_eq!(
            states,
            vec![
                Some(VmState::Running { pid: 57 }),
                Some(VmState::Exited { code: Some(3) }),
                Some(VmState::Exited { code: None }),
                Some(VmState::Exited { code: Some(0) }),
                None,
            ]
        );
    }
}
