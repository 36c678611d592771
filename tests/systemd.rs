//! Process tests for the systemd VM supervisor: a real systemd runs as PID 1 of private
//! namespaces (`tests/systemd-ns.sh`, `blixard_tests::systemd::SystemdNs`) and the daemon
//! runs inside them, so the units it starts are that systemd's and the pids it reports
//! are in its own pid namespace. Needs root and cgroup v1 (or hybrid), as on CI.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use blixard_tests::runners::import_runner;
use blixard_tests::systemd::{cgroup_v1_file, SystemdNs};
use blixard_tests::{alive, wait_for, Cluster, Node};
use serde_json::Value;

/// The mount points this process sees.
fn mount_points() -> BTreeSet<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(String::from))
        // Named network namespaces (`ip netns add`) are the stability and partition
        // tests', which nextest may run meanwhile; systemd in a namespace makes none.
        .filter(|m| !m.starts_with("/run/netns/"))
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

    let n1 = &c.nodes[0];
    import_runner(
        n1,
        c.root.path(),
        "sleeper",
        "echo systemd runner up\nexec sleep 1000",
    );
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

/// How the NixOS module hands `joinTicketFile` to the daemon (nix/lib.nix `joinTicket`):
/// the unit properties and the arguments after `node run`.
fn module_join_ticket(file: &Path) -> (Vec<String>, Vec<String>) {
    let expr = format!(
        "(import {}/../nix/lib.nix).joinTicket {:?}",
        env!("CARGO_MANIFEST_DIR"),
        file.display().to_string()
    );
    let out = std::process::Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json", "-E", &expr])
        .output()
        .expect("nix-instantiate (scripts/test.sh installs nix-bin)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let props = v["serviceConfig"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
        .collect();
    let args = v["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    (props, args)
}

/// The join ticket as the NixOS module delivers it, under a real systemd: a systemd
/// credential loaded (as root) from a root-only file, with an empty fallback. The node
/// joins; after a "reboot" (the unit stopped, the ticket file gone) the unit still starts
/// and the node is a member again. Without the fallback, the same unit fails to start
/// (243/CREDENTIALS): the case the fallback is there for.
#[test]
fn the_join_ticket_reaches_the_daemon_as_a_systemd_credential() {
    let ns = SystemdNs::start();
    let root = tempfile::Builder::new()
        .prefix("blixard-credential")
        .tempdir()
        .unwrap();
    let mut n1 = Node::new(root.path(), "n1");
    n1.start(&["--init"]);
    let keys = root.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o750)).unwrap();
    let ticket = keys.join("blixard-ticket");
    std::fs::write(
        &ticket,
        n1.cli_ok(&["cluster", "token", "create", "--ttl", "5m"])
            .trim(),
    )
    .unwrap();
    std::fs::set_permissions(&ticket, std::fs::Permissions::from_mode(0o400)).unwrap();
    let (props, args) = module_join_ticket(&ticket);
    assert_eq!(
        props,
        [
            format!("LoadCredential=join-ticket:{}", ticket.display()),
            "SetCredential=join-ticket:".to_string()
        ]
    );

    // n2 as a unit of the namespace's systemd; the CLI reaches it from the host.
    let n2 = Node::new(root.path(), "n2");
    let log = n2.log_path();
    let start_unit = |unit: &str, props: &[String]| {
        let mut cmd: Vec<String> = [
            "systemd-run",
            "--quiet",
            "--unit",
            unit,
            "-p",
            "Type=notify",
        ]
        .map(String::from)
        .to_vec();
        for p in props {
            cmd.extend(["-p".to_string(), p.clone()]);
        }
        cmd.extend([
            "-p".to_string(),
            format!("StandardOutput=append:{}", log.display()),
            "-p".to_string(),
            format!("StandardError=append:{}", log.display()),
            "--setenv=BLIXARD_LOG=info".to_string(),
            "--".to_string(),
            blixard_tests::binary().display().to_string(),
        ]);
        cmd.extend(
            [
                "node",
                "run",
                "--data-dir",
                n2.dir.to_str().unwrap(),
                "--listen",
                &format!("127.0.0.1:{}", n2.port),
                "--name",
                "n2",
                "--cache-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--store-dir",
                n2.store_dir().to_str().unwrap(),
            ]
            .map(String::from),
        );
        cmd.extend(args.iter().cloned());
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        ns.exec(&cmd)
    };
    let out = start_unit("blixard-n2", &props);
    assert!(
        out.status.success(),
        "{}: {}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    n1.wait_voters(2);
    // The daemon's copy is private to the unit (its user: root here, `blixard` on NixOS).
    let out = ns.exec(&[
        "stat",
        "-c",
        "%a %U",
        "/run/credentials/blixard-n2.service/join-ticket",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "400 root");

    // "Reboot": the unit stops, /run/keys is empty, the unit starts again.
    ns.systemctl(&["stop", "blixard-n2.service"]);
    wait_for("n2 to stop", Duration::from_secs(30), || {
        match ns.systemctl(&["is-active", "blixard-n2.service"]).as_str() {
            "inactive" | "failed" | "unknown" => Ok(()),
            s => Err(s.to_string()),
        }
    });
    std::fs::remove_file(&ticket).unwrap();
    let out = start_unit("blixard-n2", &props);
    assert!(
        out.status.success(),
        "{}: {}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(ns.systemctl(&["is-active", "blixard-n2.service"]), "active");
    n2.wait_knows_leader(Duration::from_secs(30));
    n2.cli_ok(&["cluster", "meta", "set", "after", "reboot"]);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("the join ticket is not needed"), "{text}");
    ns.systemctl(&["stop", "blixard-n2.service"]);

    // Without the fallback a missing file fails the unit before the daemon runs.
    let _ = start_unit("blixard-n2-nofallback", &props[..1]);
    let p = wait_for("the unit to fail", Duration::from_secs(30), || {
        let p = ns.show(
            "blixard-n2-nofallback.service",
            &["ActiveState", "ExecMainStatus"],
        );
        if prop(&p, "ActiveState") == "failed" {
            Ok(p)
        } else {
            Err(format!("{p:?}"))
        }
    });
    assert_eq!(prop(&p, "ExecMainStatus"), "243", "{p:?}");
}
