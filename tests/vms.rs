//! Process tests for VMs: real daemons place, fetch, start, watch, move and stop real
//! runners — a QEMU guest (TCG here) booting the Debian cloud kernel and a busybox
//! initramfs, and runners that only sleep where the guest would add nothing but time.
//!
//! Needs qemu-system-x86, busybox-static, cpio and the kernel that
//! `tests/fixtures/guest/build.sh` fetches (`scripts/test.sh` installs the rest).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use blixard_tests::runners::{guest_runner, write_runner};
use blixard_tests::{alive, wait_for, Cluster, Node};
use serde_json::Value;

/// One VM test at a time (under `cargo test`; nextest runs them in one test group).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Short liveness timings, so failover takes seconds: fence + stop + 2 × election < down.
const FAST: &str = "[capacity]\nvcpus = 4\nmemory_mib = 4096\n\
[vms]\ndown_timeout_ms = 6000\nfence_timeout_ms = 2000\nstop_timeout_ms = 1500\n";

/// Starts `labels.len()` nodes with `config` (written to a file) and the given labels.
fn cluster(config: &str, labels: &[&[&str]]) -> Cluster {
    let root = tempfile::Builder::new()
        .prefix("blixard-vms")
        .tempdir()
        .unwrap();
    let cfg = root.path().join("node.toml");
    std::fs::write(&cfg, config).unwrap();
    let mut nodes: Vec<Node> = (1..=labels.len())
        .map(|i| Node::new(root.path(), &format!("n{i}")))
        .collect();
    for (node, labels) in nodes.iter_mut().zip(labels) {
        node.extra = vec!["--config".into(), cfg.display().to_string()];
        for l in *labels {
            node.extra.extend(["--label".to_string(), l.to_string()]);
        }
    }
    nodes[0].start(&["--init"]);
    let mut c = Cluster { root, nodes };
    for i in 1..c.nodes.len() {
        let ticket = c.token();
        c.nodes[i].start(&["--join", &ticket]);
    }
    c.wait_voters(c.nodes.len());
    c
}

/// Kills every runner the cluster's nodes started (they outlive their daemons by
/// design), so a failing test leaves no guest behind.
struct Runners(PathBuf);

impl Drop for Runners {
    fn drop(&mut self) {
        for pid in runner_pids(&self.0) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
    }
}

/// The pids in every VM state dir under `root` that still run.
fn runner_pids(root: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    for node in std::fs::read_dir(root).into_iter().flatten().flatten() {
        for vm in std::fs::read_dir(node.path().join("vms"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Some(pid) = pid_in(&vm.path()) {
                out.push(pid);
            }
        }
    }
    out
}

fn pid_in(dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(dir.join("pid")).ok()?;
    let pid: u32 = text.split_whitespace().next()?.parse().ok()?;
    alive(pid).then_some(pid)
}

/// Imports the runner dir `dir` on `node` as image `name`.
fn import(node: &Node, dir: &Path, name: &str) {
    node.cli_ok(&["image", "import", dir.to_str().unwrap(), "--name", name]);
}

/// Imports on node 1 and has nodes 2 and 3 pull it too, so whichever host dies, the image
/// is still held elsewhere.
fn import_everywhere(c: &Cluster, dir: &Path, name: &str) {
    import(&c.nodes[0], dir, name);
    for n in ["n2", "n3"] {
        c.nodes[0].cli_ok(&["--node", n, "image", "pull", name]);
    }
}

fn json(node: &Node, args: &[&str]) -> Result<Value, String> {
    let mut a = args.to_vec();
    a.extend(["--output", "json"]);
    serde_json::from_str(&node.try_cli(&a)?).map_err(|e| e.to_string())
}

fn show(node: &Node, name: &str) -> Value {
    json(node, &["vm", "show", name]).unwrap()
}

/// Waits until VM `name` (as `node` sees it) is in `phase`; returns it.
fn wait_phase(node: &Node, name: &str, phase: &str, within: Duration) -> Value {
    wait_for(&format!("{name} {phase}"), within, || {
        let v = json(node, &["vm", "show", name, "--stale"])?;
        if v["phase"] == phase {
            Ok(v)
        } else {
            Err(format!("{} ({})", v["phase"], v["reason"]))
        }
    })
}

fn node_of(vm: &Value) -> usize {
    vm["node"].as_u64().expect("placed") as usize - 1
}

/// After a host came back: the watcher sees no host down, and VM `name` is placed on
/// `second` and runs there only, not on `first`.
fn assert_runs_only_on(c: &Cluster, watcher: usize, first: usize, second: usize, name: &str) {
    wait_for(
        "the old host to be up again",
        Duration::from_secs(60),
        || {
            let n = c.nodes[watcher].try_cli(&["node", "list"])?;
            if n.contains("down") {
                Err(n)
            } else {
                Ok(())
            }
        },
    );
    let v = show(&c.nodes[first], name);
    assert_eq!(node_of(&v), second);
    let key = format!("default@{name}");
    assert!(pid_on(c, second, &key).is_some());
    assert_eq!(pid_on(c, first, &key), None);
}

/// The pid of VM `tenant@name` on node `i`, if it runs there.
fn pid_on(c: &Cluster, i: usize, key: &str) -> Option<u32> {
    pid_in(&c.nodes[i].dir.join("vms").join(key))
}

#[test]
fn a_real_guest_boots_where_the_scheduler_put_it_and_stops() {
    let _one = serial();
    std::env::set_var("BLIXARD_TEST_ACCEL", "tcg");
    let c = cluster(FAST, &[&[], &[], &[]]);
    let _runners = Runners(c.root.path().to_owned());
    let image = c.root.path().join("guest-image");
    guest_runner(&image);
    import(&c.nodes[0], &image, "guest");

    // Created through node 2, watched from node 3.
    let out = c.nodes[1].cli_ok(&[
        "vm",
        "create",
        "g1",
        "--image",
        "guest",
        "--memory",
        "128",
        "--ready-marker",
        "BLIXARD-GUEST-UP",
        "--wait",
        "ready",
        "--wait-timeout",
        "240",
    ]);
    assert!(out.contains("observed:    ready"), "{out}");
    let vm = show(&c.nodes[2], "g1");
    let host = node_of(&vm);
    let pid = pid_on(&c, host, "default@g1").expect("the guest runs on its host");
    for other in (0..3).filter(|i| *i != host) {
        assert_eq!(pid_on(&c, other, "default@g1"), None, "only on its host");
    }
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(cmdline.contains("qemu-system-x86_64"), "{cmdline}");
    let logs = c.nodes[2].cli_ok(&["vm", "logs", "g1", "--lines", "50"]);
    assert!(logs.contains("BLIXARD-GUEST-UP"), "{logs}");
    let listed = c.nodes[2].cli_ok(&["vm", "list"]);
    assert!(
        listed.contains("g1") && listed.contains("ready"),
        "{listed}"
    );

    c.nodes[2].cli_ok(&["vm", "stop", "g1"]);
    wait_phase(&c.nodes[0], "g1", "stopped", Duration::from_secs(30));
    wait_for("the guest to exit", Duration::from_secs(30), || {
        if alive(pid) {
            Err("still running".into())
        } else {
            Ok(())
        }
    });
    // The image the VM uses cannot go while the VM exists.
    let (code, err) = match c.nodes[0].try_cli(&["image", "rm", "guest"]) {
        Ok(o) => (0, o),
        Err(e) => (1, e),
    };
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("used by VM default/g1"), "{err}");
    c.nodes[0].cli_ok(&["vm", "delete", "g1"]);
    wait_for("the state dir to go", Duration::from_secs(20), || {
        if c.nodes[host].dir.join("vms/default@g1").exists() {
            Err("still there".into())
        } else {
            Ok(())
        }
    });
}

#[test]
fn a_dead_hosts_vm_boots_on_a_survivor_and_never_twice() {
    let _one = serial();
    std::env::set_var("BLIXARD_TEST_ACCEL", "tcg");
    let mut c = cluster(FAST, &[&[], &[], &[]]);
    let _runners = Runners(c.root.path().to_owned());
    let image = c.root.path().join("guest-image");
    guest_runner(&image);
    import_everywhere(&c, &image, "guest");
    c.nodes[0].cli_ok(&[
        "vm",
        "create",
        "web",
        "--image",
        "guest",
        "--memory",
        "128",
        "--restart",
        "always",
        "--ready-marker",
        "BLIXARD-GUEST-UP",
        "--wait",
        "ready",
        "--wait-timeout",
        "240",
    ]);
    let first = node_of(&show(&c.nodes[0], "web"));
    let old_pid = pid_on(&c, first, "default@web").unwrap();
    let watcher = (0..3).find(|i| *i != first).unwrap();

    c.nodes[first].kill9();
    // Marked down, moved, and booted on a survivor.
    let moved = wait_for("the VM on a survivor", Duration::from_secs(240), || {
        let v = json(&c.nodes[watcher], &["vm", "show", "web", "--stale"])?;
        match v["node"].as_u64() {
            Some(n) if n as usize - 1 != first && v["phase"] == "ready" => Ok(v),
            _ => Err(format!("{} on {} ({})", v["phase"], v["node"], v["reason"])),
        }
    });
    let second = node_of(&moved);
    // Every survivor's audit log has the state change, the leader's also its decision.
    wait_for(
        "the down mark in the audit log",
        Duration::from_secs(10),
        || {
            let audit = std::fs::read_to_string(c.nodes[watcher].dir.join("audit.log")).unwrap();
            if audit.contains("\"change\":\"set_node_down\"") {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    );
    let history = moved["history"].to_string();
    assert!(
        history.contains(&format!("node {} is down", first + 1)),
        "{history}"
    );
    let nodes = c.nodes[watcher].cli_ok(&["node", "list"]);
    assert!(nodes.contains("down"), "{nodes}");
    let logs = c.nodes[watcher].cli_ok(&["vm", "logs", "web"]);
    assert!(logs.contains("BLIXARD-GUEST-UP"), "{logs}");

    // The old host comes back: its orphaned guest (the daemon died, not the machine)
    // is stopped, not resumed; the VM runs once, on the survivor.
    c.nodes[first].start(&[]);
    wait_for("the old copy to stop", Duration::from_secs(60), || {
        if alive(old_pid) {
            Err("the old guest still runs".into())
        } else {
            Ok(())
        }
    });
    assert_runs_only_on(&c, watcher, first, second, "web");
}

#[test]
fn a_restarted_daemon_adopts_its_running_vm() {
    let _one = serial();
    let mut c = cluster(FAST, &[&[]]);
    let _runners = Runners(c.root.path().to_owned());
    let image = c.root.path().join("sleeper");
    write_runner(&image, "echo sleeper up\nexec sleep 600");
    import(&c.nodes[0], &image, "sleeper");
    c.nodes[0].cli_ok(&[
        "vm", "create", "s", "--image", "sleeper", "--wait", "running",
    ]);
    let pid = pid_on(&c, 0, "default@s").unwrap();

    assert_eq!(c.nodes[0].stop(), 0);
    assert!(alive(pid), "stopping the daemon leaves the VM running");
    c.nodes[0].start(&[]);
    let v = wait_phase(&c.nodes[0], "s", "running", Duration::from_secs(30));
    assert_eq!(
        pid_on(&c, 0, "default@s"),
        Some(pid),
        "adopted, not restarted"
    );
    assert_eq!(v["restarts"], 0);
    // The adopted process is under control: a restart replaces it, a stop ends it.
    c.nodes[0].cli_ok(&["vm", "restart", "s"]);
    let new_pid = wait_for("a new runner", Duration::from_secs(30), || {
        match pid_on(&c, 0, "default@s") {
            Some(p) if p != pid => Ok(p),
            other => Err(format!("{other:?}")),
        }
    });
    assert!(!alive(pid));
    c.nodes[0].cli_ok(&["vm", "stop", "s"]);
    wait_phase(&c.nodes[0], "s", "stopped", Duration::from_secs(30));
    assert!(!alive(new_pid));
}

/// Runs `n` CLI commands at once; returns how many succeeded.
fn concurrently(node: &Node, n: usize, args: impl Fn(usize) -> Vec<String>) -> usize {
    let children: Vec<_> = (0..n)
        .map(|i| {
            std::process::Command::new(blixard_tests::binary())
                .arg("--data-dir")
                .arg(&node.dir)
                .args(args(i))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .filter(|o| o.status.success())
        .count()
}

#[test]
fn quotas_constraints_anti_affinity_and_drain() {
    let _one = serial();
    let c = cluster(FAST, &[&["zone=a"], &["zone=b"], &["zone=b"]]);
    let _runners = Runners(c.root.path().to_owned());
    let n1 = &c.nodes[0];
    let image = c.root.path().join("sleeper");
    write_runner(&image, "exec sleep 600");
    import(n1, &image, "sleeper");
    n1.cli_ok(&["tenant", "create", "acme"]);
    n1.cli_ok(&[
        "quota",
        "set",
        "acme",
        "--max-vms",
        "10",
        "--max-memory",
        "2GiB",
    ]);

    // 50 creates at once against a quota of 10: exactly 10 exist.
    let ok = concurrently(n1, 50, |i| {
        [
            "vm",
            "create",
            &format!("q{i}"),
            "--image",
            "sleeper",
            "--tenant",
            "acme",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(["--memory".into(), "64".into(), "--no-start".into()])
        .collect()
    });
    assert_eq!(ok, 10);
    let vms = json(n1, &["vm", "list", "--tenant", "acme"]).unwrap();
    assert_eq!(vms.as_array().unwrap().len(), 10);
    let quota = n1.cli_ok(&["quota", "show", "acme"]);
    assert!(quota.contains("10/10"), "{quota}");
    // A tenant that owns VMs is not removed; once they are gone, it is.
    let out = n1.cli(&["tenant", "rm", "acme"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("tenant acme still has 10 VMs"), "{err}");
    for i in 0..50 {
        let _ = n1.try_cli(&["vm", "delete", &format!("q{i}"), "--tenant", "acme"]);
    }
    n1.cli_ok(&["tenant", "rm", "acme"]);
    assert!(!n1.cli_ok(&["tenant", "list"]).contains("acme"));
    let out = n1.cli(&["tenant", "rm", "acme"]);
    assert_eq!(out.status.code(), Some(9), "no such tenant: not found");

    // Constraints: zone b only.
    for name in ["b1", "b2"] {
        n1.cli_ok(&[
            "vm",
            "create",
            name,
            "--image",
            "sleeper",
            "--memory",
            "64",
            "--constraint",
            "zone=b",
            "--wait",
            "running",
        ]);
        let host = node_of(&show(n1, name));
        assert!(host == 1 || host == 2, "{name} on n{}", host + 1);
    }
    // Anti-affinity: one per host, the fourth cannot be placed and says why.
    for i in 0..3 {
        n1.cli_ok(&[
            "vm",
            "create",
            &format!("p{i}"),
            "--image",
            "sleeper",
            "--memory",
            "64",
            "--anti-affinity",
            "pool",
            "--wait",
            "running",
        ]);
    }
    let hosts: std::collections::BTreeSet<usize> = (0..3)
        .map(|i| node_of(&show(n1, &format!("p{i}"))))
        .collect();
    assert_eq!(hosts.len(), 3);
    n1.cli_ok(&[
        "vm",
        "create",
        "p3",
        "--image",
        "sleeper",
        "--memory",
        "64",
        "--anti-affinity",
        "pool",
    ]);
    let stuck = wait_for("p3's reason", Duration::from_secs(20), || {
        let v = show(n1, "p3");
        match v["reason"].as_str() {
            Some(r) if r.starts_with("unschedulable") => Ok(r.to_string()),
            _ => Err(v.to_string()),
        }
    });
    assert!(
        stuck.contains("3 hosts: already runs a VM of group pool"),
        "{stuck}"
    );
    assert_eq!(show(n1, "p3")["phase"], "pending");
    // A group spread over zones: one VM per zone (a: n1, b: n2 and n3), the third waits.
    for name in ["z0", "z1", "z2"] {
        n1.cli_ok(&[
            "vm",
            "create",
            name,
            "--image",
            "sleeper",
            "--memory",
            "64",
            "--anti-affinity",
            "zp",
            "--spread-over",
            "zone",
        ]);
    }
    let placed = wait_for(
        "two of the zone group placed",
        Duration::from_secs(20),
        || {
            let hosts: Vec<usize> = ["z0", "z1", "z2"]
                .iter()
                .filter(|n| show(n1, n)["node"].is_u64())
                .map(|n| node_of(&show(n1, n)))
                .collect();
            if hosts.len() == 2 {
                Ok(hosts)
            } else {
                Err(format!("{hosts:?}"))
            }
        },
    );
    assert!(placed.contains(&0), "one in zone a: {placed:?}");
    assert!(
        placed.contains(&1) || placed.contains(&2),
        "one in zone b: {placed:?}"
    );
    let waiting = ["z0", "z1", "z2"]
        .into_iter()
        .find(|n| !show(n1, n)["node"].is_u64())
        .unwrap();
    let why = wait_for(
        "the third's reason",
        Duration::from_secs(20),
        || match show(n1, waiting)["reason"].as_str() {
            Some(r) if r.contains("zone=") => Ok(r.to_string()),
            other => Err(format!("{other:?}")),
        },
    );
    assert!(
        why.contains("2 hosts: already runs a VM of group zp")
            && why.contains("1 host: group zp already runs on zone=b"),
        "{why}"
    );
    let text = n1.cli_ok(&["vm", "show", waiting]);
    assert!(text.contains("anti-affinity: zp (one per zone)"), "{text}");
    for name in ["z0", "z1", "z2"] {
        n1.cli_ok(&["vm", "delete", name]);
    }
    // Too big for any host.
    n1.cli_ok(&[
        "vm", "create", "huge", "--image", "sleeper", "--memory", "8GiB",
    ]);
    let why = wait_for("huge's reason", Duration::from_secs(20), || {
        show(n1, "huge")["reason"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| "none yet".to_string())
    });
    assert!(why.contains("3 hosts: not enough memory"), "{why}");
    n1.cli_ok(&["vm", "delete", "huge"]);

    // Drain n2: everything moves off it (b-zone VMs to n3), and n2 takes nothing new.
    let on_n2: Vec<String> = json(n1, &["vm", "list", "--host", "n2"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["spec"]["name"].as_str().unwrap().to_string())
        .collect();
    assert!(!on_n2.is_empty());
    n1.cli_ok(&["node", "drain", "n2", "--wait", "--wait-timeout", "60"]);
    wait_for("n2 to be empty", Duration::from_secs(30), || {
        let on = json(n1, &["vm", "list", "--host", "n2"])?;
        let pids = std::fs::read_dir(c.nodes[1].dir.join("vms"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|d| pid_in(&d.path()))
            .count();
        if on.as_array().is_some_and(|a| a.is_empty()) && pids == 0 {
            Ok(())
        } else {
            Err(format!("{on} and {pids} runners on n2"))
        }
    });
    for name in &on_n2 {
        let v = show(n1, name);
        assert_ne!(v["node"], 2, "{name} moved off n2");
    }
    let nodes = n1.cli_ok(&["node", "list"]);
    assert!(nodes.contains("drained"), "{nodes}");
    n1.cli_ok(&["node", "undrain", "n2"]);
}

#[test]
fn operator_hooks_veto_creates_and_time_out() {
    let _one = serial();
    let root = tempfile::tempdir().unwrap();
    let hook = root.path().join("hook.sh");
    std::fs::write(
        &hook,
        "#!/bin/sh\n\
         vm=$(cat)\n\
         case \"$1:$vm\" in\n\
           before_vm_create:*'\"name\":\"deny'*) echo \"rack 7 is full\" >&2; exit 1;;\n\
           before_vm_create:*'\"name\":\"slow'*) sleep 30;;\n\
         esac\n\
         echo \"$1\" >> \"$(dirname \"$0\")/events\"\n\
         exit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = format!(
        "{FAST}hooks = [\"{}\"]\nhook_timeout_ms = 1000\n",
        hook.display()
    );
    let c = cluster(&config, &[&[]]);
    let _runners = Runners(c.root.path().to_owned());
    let n1 = &c.nodes[0];
    let image = c.root.path().join("sleeper");
    write_runner(&image, "exec sleep 600");
    import(n1, &image, "sleeper");

    let err = n1
        .try_cli(&["vm", "create", "deny-1", "--image", "sleeper"])
        .unwrap_err();
    assert!(err.starts_with("Some(5)"), "refused: {err}");
    assert!(err.contains("rack 7 is full"), "{err}");
    let started = std::time::Instant::now();
    let err = n1
        .try_cli(&["vm", "create", "slow-1", "--image", "sleeper"])
        .unwrap_err();
    assert!(err.contains("timed out after 1s"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let vms = json(n1, &["vm", "list"]).unwrap();
    assert_eq!(
        vms.as_array().unwrap().len(),
        0,
        "vetoed creates leave nothing"
    );

    n1.cli_ok(&[
        "vm", "create", "ok-1", "--image", "sleeper", "--wait", "running",
    ]);
    n1.cli_ok(&["vm", "delete", "ok-1"]);
    let events = wait_for("the hook's events", Duration::from_secs(10), || {
        let e = std::fs::read_to_string(root.path().join("events")).unwrap_or_default();
        if e.contains("after_vm_start") && e.contains("before_vm_delete") {
            Ok(e)
        } else {
            Err(e)
        }
    });
    assert!(events.starts_with("before_vm_create"), "{events}");
    // The audit log has every lifecycle step (written in the background: wait for the last).
    let audit = wait_for(
        "the delete in the audit log",
        Duration::from_secs(10),
        || {
            let audit = std::fs::read_to_string(n1.dir.join("audit.log")).unwrap_or_default();
            if audit.contains("\"change\":\"delete_vm\"") {
                Ok(audit)
            } else {
                Err(audit)
            }
        },
    );
    for step in [
        "before_vm_create",
        "\"starting\"",
        "\"running\"",
        "after_vm_start",
        "before_vm_delete",
        // … and every state change the node applied, with its raft index.
        "\"change\":\"create_vm\"",
        "\"change\":\"report_vm\"",
        "\"change\":\"delete_vm\"",
        "\"change\":\"add_image\"",
    ] {
        assert!(audit.contains(step), "{step} missing from the audit log");
    }
}

#[test]
fn bad_vms_are_refused_or_fail_with_the_reason() {
    let _one = serial();
    let c = cluster(FAST, &[&[]]);
    let _runners = Runners(c.root.path().to_owned());
    let n1 = &c.nodes[0];
    let dir = c.root.path();
    write_runner(&dir.join("sleeper"), "exec sleep 600");
    write_runner(
        &dir.join("crasher"),
        "echo 'guest: no root device'\necho 'kernel panic'\nexit 3",
    );
    std::fs::create_dir_all(dir.join("not-a-runner/share")).unwrap();
    std::fs::write(dir.join("not-a-runner/share/readme"), "hi").unwrap();
    for name in ["sleeper", "crasher", "not-a-runner"] {
        import(n1, &dir.join(name), name);
    }

    let refused = |args: &[&str], needle: &str| {
        let mut a = vec!["vm", "create"];
        a.extend(args);
        let err = n1.try_cli(&a).unwrap_err();
        assert!(err.contains(needle), "{args:?}: {err}");
    };
    refused(&["x", "--image", "nope"], "no image nope");
    refused(
        &["x", "--image", "sleeper", "--vcpus", "0"],
        "vcpus must be 1 to",
    );
    refused(
        &["x", "--image", "sleeper", "--memory", "64TiB"],
        "memory must be",
    );
    refused(
        &["x", "--image", "sleeper", "--memory", "1"],
        "memory must be",
    );
    refused(&["Bad/Name", "--image", "sleeper"], "names are");
    // VM names are host names (a guest built from NixOS takes its VM's name): no dot, no
    // underscore, no trailing dash, at most 63 characters.
    let long = "a".repeat(64);
    for name in ["web.prod", "web_1", "web-", long.as_str()] {
        refused(&[name, "--image", "sleeper"], "VM names are host names");
    }
    refused(
        &["x", "--image", "sleeper", "--tenant", "nobody"],
        "no tenant nobody",
    );
    n1.cli_ok(&["vm", "create", "dup", "--image", "sleeper", "--no-start"]);
    refused(&["dup", "--image", "sleeper"], "already exists");

    // A directory without bin/microvm-run fails on its host, saying so.
    let err = n1
        .try_cli(&[
            "vm",
            "create",
            "hollow",
            "--image",
            "not-a-runner",
            "--wait",
            "running",
        ])
        .unwrap_err();
    assert!(err.contains("no bin/microvm-run"), "{err}");
    // A runner that exits at once: failed, with its exit code and last console lines.
    let err = n1
        .try_cli(&[
            "vm",
            "create",
            "crash",
            "--image",
            "crasher",
            "--restart",
            "never",
            "--wait",
            "running",
        ])
        .unwrap_err();
    assert!(err.contains("exited with code 3"), "{err}");
    assert!(err.contains("kernel panic"), "{err}");
    let v = show(n1, "crash");
    assert_eq!(v["phase"], "failed");
    // With restart always it is restarted, backing off.
    n1.cli_ok(&[
        "vm",
        "create",
        "loop",
        "--image",
        "crasher",
        "--restart",
        "always",
    ]);
    let v = wait_for("restarts with backoff", Duration::from_secs(30), || {
        let v = show(n1, "loop");
        let reason = v["reason"].as_str().unwrap_or_default().to_string();
        if reason.contains("attempt 3") {
            Ok(v)
        } else {
            Err(reason)
        }
    });
    assert!(
        v["reason"].as_str().unwrap().contains("restarting in 4s"),
        "{v}"
    );
}

/// Drops every UDP packet to or from one node's port (loopback), until dropped.
struct Partition(u16);

impl Partition {
    fn cut(port: u16) -> Self {
        for dir in ["--dport", "--sport"] {
            let ok = std::process::Command::new("iptables")
                .args([
                    "-I",
                    "INPUT",
                    "-p",
                    "udp",
                    dir,
                    &port.to_string(),
                    "-j",
                    "DROP",
                ])
                .status()
                .unwrap_or_else(|e| panic!("iptables: {e} (apt-get install iptables; needs root)"));
            assert!(ok.success(), "iptables refused the partition rule");
        }
        Partition(port)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        for dir in ["--dport", "--sport"] {
            let _ = std::process::Command::new("iptables")
                .args([
                    "-D",
                    "INPUT",
                    "-p",
                    "udp",
                    dir,
                    &self.0.to_string(),
                    "-j",
                    "DROP",
                ])
                .status();
        }
    }
}

fn nanos_in(path: &Path) -> Option<u128> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[test]
fn a_partitioned_host_stops_its_vm_before_it_runs_elsewhere() {
    let _one = serial();
    let c = cluster(FAST, &[&[], &[], &[]]);
    let _runners = Runners(c.root.path().to_owned());
    let image = c.root.path().join("marker");
    // Records when it started and when it was told to stop, in its state dir.
    write_runner(
        &image,
        "date +%s%N > started\ntrap 'date +%s%N > stopped; exit 0' TERM\nsleep 600 &\nwait",
    );
    import_everywhere(&c, &image, "marker");
    c.nodes[0].cli_ok(&[
        "vm", "create", "m", "--image", "marker", "--wait", "running",
    ]);
    let first = node_of(&show(&c.nodes[0], "m"));
    let old_dir = c.nodes[first].dir.join("vms/default@m");
    let watcher = (0..3).find(|i| *i != first).unwrap();

    let cut = Partition::cut(c.nodes[first].port);
    // The cut-off host (its daemon alive) fences: it stops the VM on its own.
    let stopped = wait_for("the fence", Duration::from_secs(30), || {
        nanos_in(&old_dir.join("stopped")).ok_or_else(|| "still running".to_string())
    });
    // The majority moves the VM, and its new run starts only after the old one stopped.
    let moved = wait_for("the VM elsewhere", Duration::from_secs(60), || {
        let v = json(&c.nodes[watcher], &["vm", "show", "m", "--stale"])?;
        match v["node"].as_u64() {
            Some(n) if n as usize - 1 != first && v["phase"] == "running" => Ok(v),
            _ => Err(format!("{} on {} ({})", v["phase"], v["node"], v["reason"])),
        }
    });
    let second = node_of(&moved);
    let started = nanos_in(&c.nodes[second].dir.join("vms/default@m/started")).unwrap();
    assert!(
        stopped < started,
        "the old copy stopped {} ms after the new one started",
        (stopped.saturating_sub(started)) / 1_000_000
    );

    // Healed: the old host rejoins, is up again, and does not start its copy again.
    drop(cut);
    assert_runs_only_on(&c, watcher, first, second, "m");
}

/// The JSON lines of `node`'s audit log.
fn audit_lines(node: &Node) -> Vec<Value> {
    std::fs::read_to_string(node.dir.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn declare(path: &Path, vms: &[(&str, &Path, u32, &str)]) {
    let list: Vec<Value> = vms
        .iter()
        .map(|(name, runner, vcpus, placement)| {
            serde_json::json!({
                "name": name, "runner": runner, "vcpus": vcpus, "memory_mib": 64,
                "tenant": null, "labels": {"app": name}, "constraints": {},
                "restart": "always", "placement": placement, "ready_marker": null
            })
        })
        .collect();
    std::fs::write(path, serde_json::to_string_pretty(&list).unwrap()).unwrap();
}

#[test]
fn declared_vms_follow_the_hosts_file_and_leave_the_rest_alone() {
    let _one = serial();
    let root = tempfile::Builder::new()
        .prefix("blixard-declared")
        .tempdir()
        .unwrap();
    let _runners = Runners(root.path().to_owned());
    let runner = root.path().join("runner");
    write_runner(&runner, "exec sleep 600");
    let file = root.path().join("vms.json");
    declare(&file, &[("web", &runner, 1, "local")]);
    let plain = root.path().join("plain.toml");
    std::fs::write(&plain, FAST).unwrap();
    let with_file = root.path().join("declaring.toml");
    std::fs::write(
        &with_file,
        FAST.replace(
            "[vms]\n",
            &format!("[vms]\ndeclared_file = \"{}\"\n", file.display()),
        ),
    )
    .unwrap();
    let mut n1 = Node::new(root.path(), "n1");
    n1.extra = vec!["--config".into(), plain.display().to_string()];
    n1.start(&["--init"]);
    let ticket = n1
        .cli_ok(&["cluster", "token", "create"])
        .trim()
        .to_string();
    let mut n2 = Node::new(root.path(), "n2");
    n2.extra = vec!["--config".into(), with_file.display().to_string()];
    n2.start(&["--join", &ticket]);

    // Declared on n2 with local placement: it runs on n2 (bin-pack alone would pick n1).
    let web = wait_phase(&n1, "web", "running", Duration::from_secs(60));
    assert_eq!(web["node"], 2);
    assert_eq!(web["spec"]["labels"]["blixard.declared-by"], "n2");
    // The declaration went through the choke point as n2's own configuration: authorized
    // and audited like any caller's request; so did n2's reports of the VM's phases.
    let host = "the configuration of host 2";
    wait_for("n2's audit records", Duration::from_secs(30), || {
        let lines = audit_lines(&n2);
        let made = |request: &str| {
            lines.iter().any(|l| {
                l["principal"] == host
                    && l["request"] == request
                    && l["allowed"] == true
                    && l["outcome"] == "ok"
            })
        };
        match ["ImageImport", "VmCreate", "report_vm"]
            .into_iter()
            .find(|r| !made(r))
        {
            None => Ok(()),
            Some(missing) => Err(format!("no {missing} by {host}")),
        }
    });
    import(&n1, &runner, "manual");
    n1.cli_ok(&[
        "vm", "create", "manual", "--image", "manual", "--memory", "64",
    ]);

    // A changed declaration replaces the VM; a new one appears; the imperative one stays.
    declare(
        &file,
        &[("api", &runner, 1, "cluster"), ("web", &runner, 2, "local")],
    );
    n2.stop();
    n2.start(&[]);
    wait_for("web replaced", Duration::from_secs(60), || {
        let v = json(&n1, &["vm", "show", "web"])?;
        if v["spec"]["vcpus"] == 2 && v["phase"] == "running" {
            Ok(())
        } else {
            Err(v.to_string())
        }
    });
    wait_phase(&n1, "api", "running", Duration::from_secs(60));

    // Nothing declared: the declared VMs go; the imperative one is untouched.
    declare(&file, &[]);
    n2.stop();
    n2.start(&[]);
    wait_for("declared VMs deleted", Duration::from_secs(60), || {
        let names: Vec<String> = json(&n1, &["vm", "list"])?
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["spec"]["name"].as_str().unwrap().to_string())
            .collect();
        if names == ["manual"] {
            Ok(())
        } else {
            Err(format!("{names:?}"))
        }
    });

    // A bad file: the daemon refuses to start, naming the VM.
    std::fs::write(&file, r#"[{"name": "Bad!", "runner": "/x"}]"#).unwrap();
    n2.stop();
    let (code, out) = n2.run_expect_exit(&["--config", with_file.to_str().unwrap()]);
    assert_eq!(code, 8, "{out}");
    assert!(out.contains("declared VMs"), "{out}");
}

/// What VM `key` (tenant@name) on `node` last booted: its runner's `bin/microvm-run`.
fn booted_script(node: &Node, key: &str) -> Result<String, String> {
    std::fs::read_to_string(
        node.dir
            .join("vms")
            .join(key)
            .join("booted/bin/microvm-run"),
    )
    .map_err(|e| format!("{key}: {e}"))
}

/// Day-2 updates, as `nixos-rebuild switch` drives them: the host's declared file goes
/// through three generations, the second applied by SIGHUP (`systemctl reload`, what the
/// module does when only the file changes), the third by a restart. A VM whose closure
/// changed runs the new one; one that did not change keeps running untouched; a removed
/// one is deleted; the imperative VM is never touched.
#[test]
fn declared_vms_follow_three_generations_onto_their_new_closures() {
    let _one = serial();
    let root = tempfile::Builder::new()
        .prefix("blixard-generations")
        .tempdir()
        .unwrap();
    let _runners = Runners(root.path().to_owned());
    let gen = |n: u32| {
        let dir = root.path().join(format!("runner-gen{n}"));
        write_runner(&dir, &format!("echo gen{n}\nexec sleep 600"));
        dir
    };
    let (g1, g2, g3) = (gen(1), gen(2), gen(3));
    let file = root.path().join("vms.json");
    let config = root.path().join("node.toml");
    std::fs::write(
        &config,
        FAST.replace(
            "[vms]\n",
            &format!("[vms]\ndeclared_file = \"{}\"\n", file.display()),
        ),
    )
    .unwrap();
    let mut n1 = Node::new(root.path(), "n1");
    n1.extra = vec!["--config".into(), config.display().to_string()];

    // Generation 1: web and db on gen1.
    declare(&file, &[("web", &g1, 1, "local"), ("db", &g1, 1, "local")]);
    n1.start(&["--init"]);
    let wait_booted = |n1: &Node, key: &str, want: &str| {
        wait_for(&format!("{key} on {want}"), Duration::from_secs(60), || {
            let script = booted_script(n1, key)?;
            let running = pid_in(&n1.dir.join("vms").join(key));
            match running {
                Some(pid) if script.contains(want) => Ok(pid),
                _ => Err(format!("pid {running:?}, booted: {script}")),
            }
        })
    };
    let web1 = wait_booted(&n1, "default@web", "gen1");
    let db1 = wait_booted(&n1, "default@db", "gen1");
    let sleeper = root.path().join("sleeper");
    write_runner(&sleeper, "exec sleep 600");
    import(&n1, &sleeper, "sleeper");
    n1.cli_ok(&[
        "vm", "create", "manual", "--image", "sleeper", "--memory", "64",
    ]);
    let manual = wait_booted(&n1, "default@manual", "sleep");

    // Generation 2, by SIGHUP: web's closure changed; db's did not.
    declare(&file, &[("web", &g2, 1, "local"), ("db", &g1, 1, "local")]);
    let pid = n1.pid().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    let web2 = wait_booted(&n1, "default@web", "gen2");
    assert_ne!(web2, web1);
    assert!(!alive(web1), "the old web runner still runs");
    assert_eq!(pid_in(&n1.dir.join("vms/default@db")), Some(db1));
    assert_eq!(pid_in(&n1.dir.join("vms/default@manual")), Some(manual));
    wait_phase(&n1, "web", "running", Duration::from_secs(30));
    assert!(n1.log().contains("reloaded the declared VMs"));

    // A file that no longer reads changes nothing, and the daemon keeps running.
    std::fs::write(&file, "[{").unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    wait_for(
        "the bad file to be reported",
        Duration::from_secs(30),
        || {
            if n1
                .log()
                .contains("the VMs declared before stay as they are")
            {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    );
    assert_eq!(pid_in(&n1.dir.join("vms/default@web")), Some(web2));

    // Generation 3, by a restart: web is gone, db moves to gen3.
    declare(&file, &[("db", &g3, 1, "local")]);
    n1.stop();
    n1.start(&[]);
    let db3 = wait_booted(&n1, "default@db", "gen3");
    assert_ne!(db3, db1);
    wait_for("web deleted", Duration::from_secs(60), || {
        let mut names: Vec<String> = json(&n1, &["vm", "list"])?
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["spec"]["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        if names == ["db", "manual"] {
            Ok(())
        } else {
            Err(format!("{names:?}"))
        }
    });
    assert!(!alive(web2), "the deleted web runner still runs");
    assert_eq!(pid_in(&n1.dir.join("vms/default@manual")), Some(manual));
}
