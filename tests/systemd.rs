//! Process tests for the systemd VM supervisor: a real systemd runs as PID 1 of private
//! namespaces (`tests/systemd-ns.sh`, `blixard_tests::systemd::SystemdNs`) and the daemon
//! runs inside them, so the units it starts are that systemd's and the pids it reports
//! are in its own pid namespace. Needs root and cgroup v1 (or hybrid), as on CI.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use blixard_tests::runners::write_runner;
use blixard_tests::systemd::{cgroup_v1_file, SystemdNs};
use blixard_tests::{alive, wait_for, Cluster, Node};
use serde_json::Value;

/// The mount points this process sees.
fn mount_points() -> BTreeSet<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(String::from))
        .collect()
}

/// Directories named `name` under `dir`, at most `depth` levels down.
fn find_dirs(dir: &Path, name: &str, depth: usize, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if entry.file_name() == name {
            out.push(path.display().to_string());
        } else if depth > 1 {
            find_dirs(&path, name, depth - 1, out);
        }
    }
}

/// What the host has in the places the namespace hides or shares: none of it may change.
fn host_files() -> Vec<String> {
    let mut out = Vec::new();
    for dir in [
        "/run/systemd",
        "/etc/systemd/system",
        "/var/log/journal",
        "/dev",
    ] {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| format!("{dir}/{}", e.file_name().to_string_lossy()))
            // Pseudo-terminals come and go with other processes.
            .filter(|n| !n.starts_with("/dev/pts/"))
            .collect();
        names.sort();
        out.extend(names);
    }
    out
}

#[test]
fn systemd_in_namespaces_runs_units_with_limits_and_leaves_nothing() {
    let mounts = mount_points();
    let files = host_files();
    let ns = SystemdNs::start();
    let name = ns.name.clone();
    let pid1 = ns.pid;
    assert_eq!(ns.systemctl(&["is-system-running"]), "running");

    let out = ns.exec(&[
        "systemd-run",
        "--unit",
        "blixard-selftest",
        "-p",
        "MemoryMax=64M",
        "/bin/sleep",
        "1000",
    ]);
    assert!(
        out.status.success(),
        "systemd-run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unit = "blixard-selftest.service";
    let props = wait_for("the unit to run", Duration::from_secs(10), || {
        let p = ns.show(unit, &["ActiveState", "SubState", "MainPID"]);
        if prop(&p, "ActiveState") == "active"
            && prop(&p, "SubState") == "running"
            && prop(&p, "MainPID") != "0"
        {
            Ok(p)
        } else {
            Err(format!("{p:?}"))
        }
    });
    let main: u32 = props["MainPID"].parse().unwrap();
    let host = ns
        .host_pid(main)
        .expect("the unit's main process seen from the host");
    assert_ne!(host, main, "pids inside are the namespace's own");
    let cmdline = std::fs::read_to_string(format!("/proc/{host}/cmdline")).unwrap();
    assert!(cmdline.starts_with("/bin/sleep\x001000"), "{cmdline:?}");
    // The limit reached the kernel: the unit's memory cgroup, read from the host.
    assert_eq!(
        cgroup_v1_file(host, "memory", "memory.limit_in_bytes").as_deref(),
        Some("67108864")
    );
    let cgroup = std::fs::read_to_string(format!("/proc/{host}/cgroup")).unwrap();
    assert!(
        cgroup.contains(&format!("/sdns-{name}/system.slice/{unit}")),
        "{cgroup}"
    );

    ns.systemctl(&["stop", unit]);
    wait_for("the unit to stop", Duration::from_secs(10), || {
        let p = ns.show(unit, &["ActiveState", "MainPID"]);
        if prop(&p, "ActiveState") == "inactive" && prop(&p, "MainPID") == "0" && !alive(host) {
            Ok(())
        } else {
            Err(format!("{p:?}"))
        }
    });

    drop(ns);
    assert!(!alive(pid1), "the namespace's systemd is gone");
    let mut cgroups = Vec::new();
    find_dirs(
        Path::new("/sys/fs/cgroup"),
        &format!("sdns-{name}"),
        6,
        &mut cgroups,
    );
    assert_eq!(cgroups, Vec::<String>::new(), "cgroups left behind");
    assert_eq!(mount_points(), mounts, "mounts left behind");
    assert_eq!(host_files(), files, "host files changed");
}

/// A wrapped node: the daemon runs in the namespace's pid namespace, `pid`, `kill9` and
/// `stop` act on it by its host pid, the CLI reaches it from the host.
#[test]
fn a_daemon_runs_inside_the_namespace() {
    let ns = SystemdNs::start();
    let root = tempfile::Builder::new()
        .prefix("blixard-systemd")
        .tempdir()
        .unwrap();
    let mut node = Node::new(root.path(), "n1");
    node.wrap = Some(ns.wrap());
    node.start(&["--init"]);
    let host = node.pid().unwrap();
    let inner = node.info().unwrap()["pid"].as_u64().unwrap() as u32;
    assert_ne!(host, inner);
    assert_eq!(ns.host_pid(inner), Some(host));
    assert_eq!(
        blixard_tests::pid_ns(host),
        blixard_tests::pid_ns(ns.pid),
        "in the namespace's pid namespace"
    );
    let mut c = Cluster {
        root,
        nodes: vec![node],
    };
    c.wait_voters(1);

    c.nodes[0].kill9();
    assert!(!alive(host));
    assert_eq!(c.nodes[0].pid(), None);
    c.nodes[0].start(&[]);
    let again = c.nodes[0].pid().unwrap();
    assert_ne!(again, host);
    c.wait_voters(1);
    assert_eq!(c.nodes[0].stop(), 0);
    assert!(!alive(again));
    // Exit codes come through the wrapper.
    let mut fresh = Node::new(c.root.path(), "t");
    fresh.wrap = Some(ns.wrap());
    let (code, out) = fresh.run_expect_exit(&["--join", "blixard1zzzz"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("damaged"), "{out}");
}

/// Property `key` of a `SystemdNs::show` answer, or "" if missing.
fn prop<'a>(p: &'a HashMap<String, String>, key: &str) -> &'a str {
    p.get(key).map_or("", String::as_str)
}

/// Fast liveness timings (as in tests/vms.rs) and the systemd supervisor.
const CONFIG: &str = "[capacity]\nvcpus = 4\nmemory_mib = 4096\n\
[vms]\nsupervisor = \"systemd\"\n\
down_timeout_ms = 6000\nfence_timeout_ms = 2000\nstop_timeout_ms = 1500\n";

/// The transient unit of VM `default@web` (`@` escaped).
const UNIT: &str = "blixard-vm-default\\x40web.service";

fn json(node: &Node, args: &[&str]) -> Result<Value, String> {
    let mut a = args.to_vec();
    a.extend(["--output", "json"]);
    serde_json::from_str(&node.try_cli(&a)?).map_err(|e| e.to_string())
}

/// Waits until VM `web` is running after `failures` failed runs (its history) and its
/// unit runs, with a main pid other than `not`; returns that pid (inside the namespace).
fn wait_running(ns: &SystemdNs, node: &Node, failures: usize, not: Option<u32>) -> u32 {
    wait_for(
        &format!("web running after {failures} failures, main pid not {not:?}"),
        Duration::from_secs(60),
        || {
            let v = json(node, &["vm", "show", "web"])?;
            let p = ns.show(UNIT, &["ActiveState", "SubState", "MainPID"]);
            let main: u32 = prop(&p, "MainPID").parse().unwrap_or(0);
            let failed = v["history"]
                .as_array()
                .map_or(0, |h| h.iter().filter(|t| t["phase"] == "failed").count());
            if v["phase"] == "running"
                && failed == failures
                && prop(&p, "ActiveState") == "active"
                && prop(&p, "SubState") == "running"
                && main != 0
                && Some(main) != not
            {
                Ok(main)
            } else {
                Err(format!(
                    "{} ({}), {failed} failures; unit {p:?}",
                    v["phase"], v["reason"]
                ))
            }
        },
    )
}

#[test]
fn vms_run_as_systemd_units() {
    let ns = SystemdNs::start();
    let root = tempfile::Builder::new()
        .prefix("blixard-systemd")
        .tempdir()
        .unwrap();
    let cfg = root.path().join("node.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let mut node = Node::new(root.path(), "n1");
    node.extra = vec!["--config".into(), cfg.display().to_string()];
    node.wrap = Some(ns.wrap());
    node.start(&["--init"]);
    let mut c = Cluster {
        root,
        nodes: vec![node],
    };
    c.wait_voters(1);

    let image = c.root.path().join("sleeper");
    write_runner(&image, "echo systemd runner up\nexec sleep 1000");
    let n1 = &c.nodes[0];
    n1.cli_ok(&[
        "image",
        "import",
        image.to_str().unwrap(),
        "--name",
        "sleeper",
    ]);
    n1.cli_ok(&[
        "vm", "create", "web", "--image", "sleeper", "--vcpus", "1", "--memory", "64", "--wait",
        "running",
    ]);
    let main = wait_running(&ns, n1, 0, None);

    // Limits on the unit's cgroup: guest RAM + 25 % + 64 MiB; one vCPU's worth of CPU.
    let host = ns.host_pid(main).expect("the VM's main process");
    assert_eq!(
        cgroup_v1_file(host, "memory", "memory.limit_in_bytes").as_deref(),
        Some("150994944")
    );
    assert_eq!(
        cgroup_v1_file(host, "cpu", "cpu.cfs_quota_us").as_deref(),
        Some("100000")
    );
    assert_eq!(
        cgroup_v1_file(host, "cpu", "cpu.cfs_period_us").as_deref(),
        Some("100000")
    );
    wait_for(
        "the runner's line in vm logs",
        Duration::from_secs(20),
        || {
            let logs = n1.try_cli(&["vm", "logs", "web"])?;
            if logs.contains("systemd runner up") {
                Ok(())
            } else {
                Err(logs)
            }
        },
    );

    // The daemon dies; the VM does not, and the restarted daemon adopts it.
    c.nodes[0].kill9();
    assert!(alive(host), "the VM outlives its daemon");
    c.nodes[0].start(&[]);
    let n1 = &c.nodes[0];
    assert_eq!(
        wait_running(&ns, n1, 0, None),
        main,
        "adopted, not restarted"
    );

    // The VM dies; the daemon sees it fail (killed by a signal) and starts it again.
    let out = ns.exec(&["kill", "-9", &main.to_string()]);
    assert!(out.status.success(), "{out:?}");
    wait_running(&ns, n1, 1, Some(main));
    let v = json(n1, &["vm", "show", "web"]).unwrap();
    let reasons: Vec<&str> = v["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["reason"].as_str())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("killed by a signal")),
        "{reasons:?}"
    );

    n1.cli_ok(&["vm", "stop", "web"]);
    wait_for("the unit to stop", Duration::from_secs(30), || {
        let p = ns.show(UNIT, &["ActiveState"]);
        match prop(&p, "ActiveState") {
            "inactive" | "failed" => Ok(()),
            _ => Err(format!("{p:?}")),
        }
    });
    n1.cli_ok(&["vm", "delete", "web"]);
    wait_for(
        "web and its unit to be gone",
        Duration::from_secs(30),
        || {
            let vms = n1.try_cli(&["vm", "list"])?;
            let p = ns.show(UNIT, &["LoadState"]);
            if !vms.contains("web") && prop(&p, "LoadState") == "not-found" {
                Ok(())
            } else {
                Err(format!("{vms}; unit {p:?}"))
            }
        },
    );
    // The cluster (and its daemon) goes before the namespace.
    drop(c);
}
