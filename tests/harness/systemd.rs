//! A real systemd as PID 1 of private pid, mount, cgroup, uts and ipc namespaces
//! (`tests/systemd-ns.sh`), for tests of the systemd VM supervisor on hosts without
//! systemd. The network namespace and /tmp are shared with the host. Needs root and
//! cgroup v1 (or hybrid).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{pid_ns, proc_nspid};

/// One namespace and its systemd; dropping it kills everything inside and removes
/// its cgroups.
pub struct SystemdNs {
    /// The namespace's PID 1 (systemd), as the host sees it.
    pub pid: u32,
    /// Unique per instance; its cgroups are `sdns-<name>` under the test's own.
    pub name: String,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("systemd-ns.sh")
}

impl SystemdNs {
    /// Starts one and waits until `systemctl is-system-running` says running;
    /// panics with the script's output if it does not.
    pub fn start() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "t{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(&name)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "starting systemd in namespaces ({}) failed ({}): {}",
            script().display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{}: no pid printed: {e}", script().display()));
        Self { pid, name }
    }

    /// The command prefix that runs a command inside: `nsenter -t PID -a --`.
    pub fn wrap(&self) -> Vec<String> {
        ["nsenter", "-t", &self.pid.to_string(), "-a", "--"]
            .map(String::from)
            .to_vec()
    }

    /// Runs `args` inside the namespaces.
    pub fn exec(&self, args: &[&str]) -> Output {
        let wrap = self.wrap();
        Command::new(&wrap[0])
            .args(&wrap[1..])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `systemctl args` inside; its stdout, trimmed, whatever the exit status
    /// (`is-active` and friends answer with it).
    pub fn systemctl(&self, args: &[&str]) -> String {
        let mut a = vec!["systemctl"];
        a.extend(args);
        let out = self.exec(&a);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `systemctl show -p <props> <unit>` as a map.
    pub fn show(&self, unit: &str, props: &[&str]) -> HashMap<String, String> {
        let joined = props.join(",");
        self.systemctl(&["show", "-p", &joined, "--", unit])
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The host pid of the process that has pid `ns_pid` inside.
    pub fn host_pid(&self, ns_pid: u32) -> Option<u32> {
        let ns = pid_ns(self.pid)?;
        crate::process::all_pids().into_iter().find(|&pid| {
            proc_nspid(pid).is_some_and(|p| p.len() > 1 && p.last() == Some(&ns_pid))
                && pid_ns(pid).as_ref() == Some(&ns)
        })
    }
}

impl Drop for SystemdNs {
    fn drop(&mut self) {
        let out = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(self.pid.to_string())
            .arg(&self.name)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "stopping systemd namespace {} failed: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("stopping systemd namespace {}: {e}", self.name),
        }
    }
}

/// A file of process `pid`'s cgroup (host pid) in the v1 hierarchy of `controller`,
/// e.g. `("memory", "memory.limit_in_bytes")`, trimmed.
pub fn cgroup_v1_file(pid: u32, controller: &str, file: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        controllers
            .split(',')
            .any(|c| c == controller)
            .then_some(path)
    })?;
    let full = format!("/sys/fs/cgroup/{controller}{path}/{file}");
    Some(std::fs::read_to_string(full).ok()?.trim().to_string())
}
