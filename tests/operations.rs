//! Process tests for docs/operations.md: backup, restore and disaster recovery on real
//! daemons. The procedures are read from the doc and run as written: each line of a block
//! marked `<!-- procedure: NAME -->` through `sh -c`, with `blixard` on the PATH and
//! `BLIXARD_DATA_DIR` set to the node's data dir; `blixard node run …` lines start the
//! node through the harness (with the same extra flags).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use blixard_tests::runners::{import_runner, write_runner, Reaper};
use blixard_tests::{binary, wait_for, Cluster, Node};
use serde_json::Value;

/// The command lines of the procedure `name` in docs/operations.md.
fn procedure(name: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md"),
    )
    .unwrap();
    let marker = format!("<!-- procedure: {name} -->");
    let (_, rest) = doc
        .split_once(&marker)
        .unwrap_or_else(|| panic!("no procedure {name} in docs/operations.md"));
    let block = rest
        .split_once("```sh\n")
        .and_then(|(_, b)| b.split_once("```"))
        .map(|(b, _)| b)
        .unwrap_or_else(|| panic!("procedure {name} has no sh block"));
    let lines: Vec<String> = block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    assert!(!lines.is_empty(), "procedure {name} is empty");
    lines
}

/// Runs procedure `name` on `node`, with `vars` in the environment; returns each line's
/// stdout (empty for the `node run` lines, which start `node`).
fn run(name: &str, node: &mut Node, vars: &[(&str, &str)]) -> Vec<String> {
    let bin_dir = binary().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut outs = Vec::new();
    for line in procedure(name) {
        if let Some(rest) = line.strip_prefix("blixard node run") {
            // The shell would expand "$VAR"; the harness starts the node itself.
            let mut rest = rest.to_string();
            for (k, v) in vars {
                rest = rest
                    .replace(&format!("\"${k}\""), v)
                    .replace(&format!("${k}"), v);
            }
            let args: Vec<&str> = rest.split_whitespace().collect();
            node.start(&args);
            outs.push(String::new());
            continue;
        }
        assert!(line.starts_with("blixard "), "{name}: {line}");
        let out = Command::new("sh")
            .arg("-ec")
            .arg(&line)
            .env("PATH", &path)
            .env("BLIXARD_DATA_DIR", &node.dir)
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: `{line}` failed ({:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        outs.push(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    outs
}

fn json(node: &Node, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["--output", "json"]);
    serde_json::from_str(&node.cli_ok(&a)).unwrap()
}

/// Waits until VM `name` (of the caller's tenant, or `--tenant T` in `extra`) runs, as
/// `node` sees it; returns it.
fn wait_running(node: &Node, name: &str, extra: &[&str]) -> Value {
    wait_for(&format!("{name} running"), Duration::from_secs(60), || {
        let mut args = vec!["vm", "show", name, "--stale", "--output", "json"];
        args.extend(extra);
        let v: Value = serde_json::from_str(&node.try_cli(&args)?).map_err(|e| e.to_string())?;
        if v["phase"] == "running" || v["phase"] == "starting" {
            Ok(v)
        } else {
            Err(format!("{} ({})", v["phase"], v["reason"]))
        }
    })
}

#[test]
fn a_backup_restores_into_a_new_cluster_that_serves_it() {
    let mut c = Cluster::start(3, &[]);
    let _runners = Reaper(c.root.path().to_path_buf());
    let n1 = &c.nodes[0];
    import_runner(n1, c.root.path(), "sleeper", "exec sleep 600");
    n1.cli_ok(&["cluster", "meta", "set", "owner", "ops"]);
    n1.cli_ok(&["tenant", "create", "acme"]);
    let user = blixard_net::SecretKey::generate();
    let key = blixard_net::key_of(&user.public()).to_string();
    n1.cli_ok(&["user", "add", "vera", "--key", &key, "--role", "viewer"]);
    n1.cli_ok(&[
        "vm", "create", "web", "--image", "sleeper", "--tenant", "acme",
    ]);
    wait_running(n1, "web", &["--tenant", "acme"]);
    let old_id = json(n1, &["cluster", "status"])["cluster_id"].clone();

    // The backup, taken through a follower, as the doc says.
    let backup = c.root.path().join("cluster.bkp");
    let backup_s = backup.to_str().unwrap();
    let mut n2 = Node::new(c.root.path(), "unused");
    n2.dir = c.nodes[1].dir.clone();
    let outs = run("backup", &mut n2, &[("BACKUP", backup_s)]);
    assert!(outs[0].contains("state at  index"), "{}", outs[0]);
    let mode = std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let v = json(n1, &["cluster", "backup", "verify", backup_s]);
    assert_eq!(v["cluster_id"], old_id);
    assert_eq!(v["cluster_name"], "blixard");
    assert!(v["index"].as_u64().unwrap() > 1, "{v}");
    assert_eq!(v["tables"]["members"], 3);
    assert_eq!(v["tables"]["vms"], 1);
    assert_eq!(v["tables"]["users"], 1);

    // Damage is refused with exit 7, by name.
    let bytes = std::fs::read(&backup).unwrap();
    let damaged = c.root.path().join("damaged.bkp");
    let mut d = bytes.clone();
    let mid = d.len() / 2;
    d[mid] ^= 0x20;
    std::fs::write(&damaged, &d).unwrap();
    let out = n1.cli(&["cluster", "backup", "verify", damaged.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&out.stderr).contains("checksum"));

    // A damaged backup is never restored.
    let refused = Node::new(c.root.path(), "refused");
    let out = refused.cli(&["node", "restore", damaged.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&out.stderr).contains("checksum"));
    assert!(
        !refused.dir.join("blixard.redb").exists(),
        "nothing is left behind"
    );

    // The old cluster is lost; a new node restores the backup into an empty data dir and
    // serves it as a new cluster. (It shares n1's store dir, as hosts share /nix/store, so
    // the image imported again is the same closure.)
    let n1_store = c.nodes[0].store_dir();
    for node in c.nodes.iter_mut() {
        assert_eq!(node.stop(), 0);
    }
    let mut fresh = Node::new(c.root.path(), "restored");
    fresh.extra = vec!["--store-dir".into(), n1_store.display().to_string()];
    run("restore", &mut fresh, &[("BACKUP", backup_s)]);
    let s = json(&fresh, &["cluster", "status"]);
    assert_ne!(s["cluster_id"], old_id, "a new cluster id by default");
    let members = s["members"].as_array().unwrap();
    assert_eq!(members.len(), 1, "{s}");
    assert_eq!(members[0]["id"], 4, "the next id: ids are never reused");
    // Named as `node restore` was told (here: nothing, so the host name).
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    assert_eq!(members[0]["name"], host.trim());
    assert!(fresh
        .cli_ok(&["cluster", "meta", "get", "owner"])
        .contains("ops"));
    assert!(fresh.cli_ok(&["user", "list"]).contains("vera"));
    assert!(fresh.cli_ok(&["tenant", "list"]).contains("acme"));
    // The VM comes back wanted running; its image is held by no one until it is imported
    // again, then it runs on the restored node.
    let vm = json(&fresh, &["vm", "show", "web", "--tenant", "acme"]);
    assert_eq!(vm["desired"], "running", "{vm}");
    let image = c.root.path().join("sleeper");
    fresh.cli_ok(&[
        "image",
        "import",
        image.to_str().unwrap(),
        "--name",
        "sleeper",
    ]);
    let vm = wait_running(&fresh, "web", &["--tenant", "acme"]);
    assert_eq!(vm["node"], 4);
    // A data dir that holds a node is never restored over.
    assert_eq!(fresh.stop(), 0);
    let out = fresh.cli(&["node", "restore", backup_s]);
    assert_eq!(out.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds node"));
}

#[test]
fn a_lost_majority_comes_back_with_force_new_cluster() {
    let mut c = Cluster::start(3, &[]);
    let _runners = Reaper(c.root.path().to_path_buf());
    let image = c.root.path().join("sleeper");
    write_runner(&image, "exec sleep 600");
    c.nodes[0].cli_ok(&[
        "image",
        "import",
        image.to_str().unwrap(),
        "--name",
        "sleeper",
    ]);
    for n in ["n2", "n3"] {
        c.nodes[0].cli_ok(&["--node", n, "image", "pull", "sleeper"]);
    }
    c.nodes[0].cli_ok(&["cluster", "meta", "set", "owner", "ops"]);
    // One VM on each host.
    for i in 1..=3 {
        c.nodes[0].cli_ok(&[
            "vm",
            "create",
            &format!("vm{i}"),
            "--image",
            "sleeper",
            "--anti-affinity",
            "spread",
        ]);
    }
    for i in 1..=3 {
        wait_running(&c.nodes[0], &format!("vm{i}"), &[]);
    }
    let survivor_vm = (1..=3)
        .map(|i| json(&c.nodes[2], &["vm", "show", &format!("vm{i}"), "--stale"]))
        .find(|v| v["node"] == 3)
        .expect("a VM on n3");

    // Two hosts lost for good.
    for i in 0..2 {
        c.nodes[i].kill9();
        std::fs::remove_dir_all(&c.nodes[i].dir).unwrap();
    }
    let out = c.nodes[2].cli(&["cluster", "meta", "set", "k", "v", "--timeout", "3"]);
    assert!(!out.status.success(), "a write without a majority");

    // The survivor, stopped and started once with the flag, as the doc says.
    // A stop with its peers gone and a write waiting for a leader still ends cleanly
    // within the bound (the close is not waited on for unreachable peers).
    assert_eq!(c.nodes[2].stop(), 0, "{}", c.nodes[2].log());
    let log = c.nodes[2].log();
    let stop = &log[log.rfind("SIGTERM: shutting down").unwrap()..];
    assert!(
        !stop.contains(" WARN ") && !stop.contains(" ERROR "),
        "{stop}"
    );
    let outs = run("force-new-cluster", &mut c.nodes[2], &[]);
    let ticket = outs[1].trim().to_string();
    assert!(c.nodes[2].log().contains("FORCED A NEW CLUSTER"));
    let n3 = &c.nodes[2];
    let s = json(n3, &["cluster", "status"]);
    assert_eq!(s["members"].as_array().unwrap().len(), 1, "{s}");
    assert!(n3
        .cli_ok(&["cluster", "meta", "get", "owner"])
        .contains("ops"));
    n3.cli_ok(&["cluster", "meta", "set", "k", "v"]);
    // Its own VM never stopped; the lost hosts' VMs wait to be placed.
    let v = json(
        n3,
        &["vm", "show", survivor_vm["spec"]["name"].as_str().unwrap()],
    );
    assert_eq!(
        (v["node"].clone(), v["generation"].clone()),
        (
            survivor_vm["node"].clone(),
            survivor_vm["generation"].clone()
        )
    );

    // Two fresh nodes join; the lost hosts' VMs run on them.
    for name in ["n4", "n5"] {
        let mut node = Node::new(c.root.path(), name);
        let t = if name == "n4" {
            ticket.clone()
        } else {
            c.nodes[2]
                .cli_ok(&["cluster", "token", "create"])
                .trim()
                .to_string()
        };
        node.start(&["--join", &t]);
        c.nodes.push(node);
    }
    let n3 = &c.nodes[2];
    wait_for("3 voters", Duration::from_secs(60), || {
        let s = json(n3, &["cluster", "status"]);
        let voters = s["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "Voter")
            .count();
        if voters == 3 {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    for i in 1..=3 {
        let v = wait_running(n3, &format!("vm{i}"), &[]);
        assert!([3, 4, 5].contains(&v["node"].as_u64().unwrap()), "{v}");
    }
}

/// Makes a node act as the release before the cluster version (log version 1).
const OLD: &str = "BLIXARD_TEST_LOG_VERSION";
/// The log version of this build.
const NOW: u32 = blixard_core::LOG_VERSION;

/// The versions part of `cluster status`, as `node` answers.
fn versions(node: &Node) -> Value {
    json(node, &["cluster", "status"])["versions"].clone()
}

/// Cluster metadata key `key` as `node` reads it.
fn meta_get(node: &Node, key: &str) -> Value {
    json(node, &["cluster", "meta", "get", key])[key].clone()
}

#[test]
fn a_rolling_upgrade_raises_the_cluster_version_once_every_member_runs_it() {
    let mut c = Cluster::start_each(3, |n| n.env = vec![(OLD.into(), "1".into())]);
    let leader = c.leader();
    let l = &c.nodes[leader];
    assert_eq!(versions(l)["cluster"], 1);
    l.cli_ok(&["tenant", "create", "old"]);
    // A command of log version 2 is refused while a member may not decode it.
    let out = l.cli(&["tenant", "rm", "old"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("needs cluster version 2"), "{err}");
    // So is a group spread over a label, which an older member reads as a plain name.
    let out = l.cli(&[
        "vm",
        "create",
        "spread",
        "--image",
        "none",
        "--anti-affinity",
        "db",
        "--spread-over",
        "zone",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("--spread-over needs cluster version 3"),
        "{err}"
    );

    // Followers first, the leader last, each by the doc's procedure.
    let mut order: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    order.push(leader);
    for (step, &i) in order.iter().enumerate() {
        assert_eq!(c.nodes[i].stop(), 0);
        c.nodes[i].env.clear();
        let outs = run("upgrade-member", &mut c.nodes[i], &[]);
        let me = format!("{} (log {NOW})", env!("CARGO_PKG_VERSION"));
        assert!(outs[1].contains(&me), "{}", outs[1]);
        c.nodes[i].wait_knows_leader(Duration::from_secs(30));
        // Writes go on through the upgrade.
        c.nodes[i].cli_ok(&["cluster", "meta", "set", &format!("step{step}"), "done"]);
        if step < 2 {
            assert_eq!(versions(&c.nodes[i])["cluster"], 1, "after step {step}");
        }
    }
    // The last member is back: the leader raises the cluster version.
    for n in &c.nodes {
        wait_for(
            "the current cluster version",
            Duration::from_secs(30),
            || {
                let v = versions(n);
                if v["cluster"] == NOW {
                    Ok(())
                } else {
                    Err(v.to_string())
                }
            },
        );
    }
    let leader = c.leader();
    let v = versions(&c.nodes[leader]);
    let members = v["members"].as_array().unwrap();
    assert_eq!(members.len(), 2, "{v}");
    for m in members {
        assert_eq!(m[1]["log"], NOW, "{v}");
        assert_eq!(m[1]["release"], env!("CARGO_PKG_VERSION"), "{v}");
    }
    c.nodes[leader].cli_ok(&["tenant", "rm", "old"]);
    for n in &c.nodes {
        assert_eq!(meta_get(n, "step2"), "done");
    }
}

#[test]
fn a_release_older_than_the_cluster_version_stops_rather_than_diverge() {
    let mut c = Cluster::start(2, &[]);
    assert_eq!(versions(&c.nodes[0])["cluster"], NOW);
    // A rollback below the cluster version is refused at start, naming both.
    assert_eq!(c.nodes[1].stop(), 0);
    c.nodes[1].env = vec![(OLD.into(), "1".into())];
    let (code, log) = c.nodes[1].try_start(&[]).unwrap_err();
    assert_eq!(code, Some(7), "{log}");
    assert!(
        log.contains(&format!(
            "runs at cluster version {NOW}, and this blixard applies log version 1"
        )),
        "{log}"
    );
    // On the current release again, it is a member and catches up.
    c.nodes[1].env.clear();
    c.nodes[1].start(&[]);
    c.nodes[1].wait_knows_leader(Duration::from_secs(30));
    c.nodes[0].cli_ok(&["cluster", "meta", "set", "after", "rollback"]);

    // A new member running the older release meets the cluster's state and stops, with
    // the reason, instead of serving state it cannot keep.
    let mut old = Node::new(c.root.path(), "n3");
    old.env = vec![(OLD.into(), "1".into())];
    let ticket = c.token();
    let (code, log) = match old.try_start(&["--join", &ticket]) {
        Err((code, log)) => (code, log),
        Ok(()) => {
            let code = old.wait_exit(Duration::from_secs(60));
            (Some(code), old.log())
        }
    };
    assert_eq!(code, Some(7), "{log}");
    assert!(
        log.contains("cannot be applied by this blixard") && log.contains("applies log version 1"),
        "{log}"
    );
    // The cluster is not harmed: it still takes writes.
    c.nodes[1].cli_ok(&["cluster", "meta", "set", "after", "old-joiner"]);
}

/// Copies directory `from` to `to` (files and subdirectories).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

#[test]
fn a_data_dir_of_an_earlier_release_opens_keeps_its_state_and_serves() {
    // tests/fixtures/make-datadir.sh wrote it with release 0.1.0 (log version 2, data
    // format 2); git keeps neither its modes nor its empty directories.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/datadir-0.1.0");
    let root = tempfile::Builder::new()
        .prefix("blixard-test")
        .tempdir()
        .unwrap();
    let mut n = Node::new(root.path(), "fixture");
    copy_dir(&fixture, &n.dir);
    std::fs::set_permissions(&n.dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    for key in ["node.key", "admin.key"] {
        std::fs::set_permissions(n.dir.join(key), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    n.start(&[]);
    let s = json(&n, &["cluster", "status"]);
    assert_eq!(s["name"], "fixture", "{s}");
    assert_eq!(s["members"].as_array().unwrap().len(), 1, "{s}");
    // Its only member now runs this release: the cluster version rises to it.
    wait_for(
        "the current cluster version",
        Duration::from_secs(30),
        || {
            let v = versions(&n);
            if v["cluster"] == NOW {
                Ok(())
            } else {
                Err(v.to_string())
            }
        },
    );
    // Every kind of state it was written with.
    assert_eq!(meta_get(&n, "owner"), "ops");
    let q = json(&n, &["quota", "show", "acme"]);
    assert_eq!(q[0]["tenant"]["quota"]["max_vcpus"], 8, "{q}");
    let users = n.cli_ok(&["user", "list"]);
    assert!(
        users.contains("vera") && users.contains("viewer"),
        "{users}"
    );
    let images = json(&n, &["image", "list"]);
    let sleeper = &images.as_array().unwrap()[0];
    assert_eq!(
        (&sleeper["name"], &sleeper["pinned"]),
        (&"sleeper".into(), &true.into()),
        "{images}"
    );
    let vm = json(&n, &["vm", "show", "web", "--tenant", "acme"]);
    assert_eq!(vm["desired"], "stopped", "{vm}");
    let tokens = json(&n, &["cluster", "token", "list", "--stale"]);
    assert_eq!(tokens.as_array().map(Vec::len), Some(1), "{tokens}");
    // It serves: new writes, including the newest commands, on the state it had.
    n.cli_ok(&["tenant", "create", "beta"]);
    n.cli_ok(&["tenant", "rm", "beta"]);
    n.cli_ok(&[
        "cluster",
        "meta",
        "set",
        "opened-by",
        env!("CARGO_PKG_VERSION"),
    ]);
    assert_eq!(n.stop(), 0);
    n.start(&[]);
    assert_eq!(meta_get(&n, "opened-by"), env!("CARGO_PKG_VERSION"));
}

#[test]
fn a_lost_host_is_replaced_by_a_new_one() {
    let rack = |n: &mut Node, r: &str| n.extra = vec!["--label".into(), format!("rack={r}")];
    let mut c = Cluster::start_each(3, |n| {
        let r = if n.name == "n3" { "r3" } else { "r1" };
        rack(n, r);
    });
    let _runners = Reaper(c.root.path().to_path_buf());
    let n1 = &c.nodes[0];
    import_runner(n1, c.root.path(), "sleeper", "exec sleep 600");
    n1.cli_ok(&[
        "vm",
        "create",
        "web",
        "--image",
        "sleeper",
        "--constraint",
        "rack=r3",
    ]);
    assert_eq!(wait_running(n1, "web", &[])["node"], 3);

    // n3 is lost for good: its process and its disk.
    c.nodes[2].kill9();
    std::fs::remove_dir_all(&c.nodes[2].dir).unwrap();
    let outs = run("replace-host-remove", &mut c.nodes[0], &[("OLD", "3")]);
    let ticket = outs[1].trim().to_string();
    let mut fresh = Node::new(c.root.path(), "n4");
    rack(&mut fresh, "r3");
    let outs = run("replace-host-join", &mut fresh, &[("TICKET", &ticket)]);
    assert!(outs[1].contains("n4"), "{}", outs[1]);
    c.nodes.push(fresh);
    wait_for("n1, n2 and n4 voting", Duration::from_secs(60), || {
        let s = json(&c.nodes[0], &["cluster", "status"]);
        let ids: Vec<u64> = s["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "Voter")
            .map(|m| m["id"].as_u64().unwrap())
            .collect();
        if ids == [1, 2, 4] {
            Ok(())
        } else {
            Err(s["members"].to_string())
        }
    });
    // The VM that needed rack r3 runs on the new host.
    let vm = wait_running(&c.nodes[0], "web", &[]);
    assert_eq!(vm["node"], 4, "{vm}");

    // Capacity, host by host, as the doc shows it.
    let outs = run("capacity", &mut c.nodes[0], &[]);
    assert!(
        outs[0].contains("n4") && !outs[0].contains("n3"),
        "{}",
        outs[0]
    );
    assert!(outs[1].contains("raft"), "{}", outs[1]);
}

/// Sends `sig` (`STOP`, `CONT`) to a node's daemon.
fn signal(node: &Node, sig: &str) {
    let pid = node.pid().unwrap().to_string();
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid])
        .status()
        .unwrap();
    assert!(ok.success(), "kill -{sig} {pid}");
}

/// The raft configuration as `node` sees it, linearizably: (voters, learners).
fn configuration(node: &Node) -> Result<(Vec<u64>, Vec<u64>), String> {
    let s = node.status(false)?;
    let ids = |k: &str| -> Vec<u64> {
        s["raft"][k]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default()
    };
    Ok((ids("voters"), ids("learners")))
}

/// Waits until `node` sees `voters` and `learners`, and the members' roles agree.
fn wait_configuration(node: &Node, voters: &[u64], learners: &[u64]) {
    let what = format!("voters {voters:?} and learners {learners:?}");
    wait_for(&what, Duration::from_secs(30), || {
        let (v, l) = configuration(node)?;
        let s = node.status(false)?;
        let roles_agree = s["members"].as_array().is_some_and(|ms| {
            ms.iter().all(|m| {
                let id = m["id"].as_u64().unwrap_or(0);
                let want = if learners.contains(&id) {
                    "Learner"
                } else {
                    "Voter"
                };
                m["role"] == want && m["status"] == "Active"
            })
        });
        if v == voters && l == learners && roles_agree {
            Ok(())
        } else {
            Err(format!("{v:?} / {l:?}: {}", s["members"]))
        }
    });
}

/// A write through `node`, expected to fail: its exit code.
fn failed_write(node: &Node, key: &str) -> i32 {
    let out = node.cli(&["cluster", "meta", "set", key, "x"]);
    assert!(!out.status.success(), "{key} was written");
    out.status.code().unwrap_or(-1)
}

#[test]
fn learners_replicate_and_serve_but_never_vote() {
    let zone = |n: &mut Node| n.extra = vec!["--label".into(), "zone=a".into()];
    let mut c = Cluster::start_each(3, zone);
    // Two learners in another site, by the doc's procedures.
    for i in 4..=5 {
        let mut node = Node::new(c.root.path(), &format!("n{i}"));
        let ticket = run("learner-token", &mut c.nodes[0], &[]).remove(0);
        let outs = run("learner-join", &mut node, &[("TICKET", ticket.trim())]);
        // Listed at once (as joining until it has caught up).
        let me = format!("n{i} ");
        let row = outs[1]
            .lines()
            .find(|l| l.starts_with(&me))
            .unwrap_or_default();
        assert!(row.contains("zone=b"), "{}", outs[1]);
        c.nodes.push(node);
    }
    wait_configuration(&c.nodes[0], &[1, 2, 3], &[4, 5]);
    // They stay learners (the leader promotes plain joiners within a tick or two).
    let watched = std::time::Instant::now();
    while watched.elapsed() < Duration::from_secs(2) {
        assert_eq!(configuration(&c.nodes[0]).unwrap().1, [4, 5]);
    }
    // A learner hosts VMs: one kept in zone b runs on a learner.
    let _runners = Reaper(c.root.path().to_path_buf());
    import_runner(&c.nodes[0], c.root.path(), "sleeper", "exec sleep 600");
    c.nodes[0].cli_ok(&[
        "vm",
        "create",
        "far",
        "--image",
        "sleeper",
        "--memory",
        "64",
        "--constraint",
        "zone=b",
    ]);
    let far = wait_running(&c.nodes[0], "far", &[]);
    assert!(far["node"] == 4 || far["node"] == 5, "{far}");
    let n4 = json(&c.nodes[3], &["node", "list", "--stale"]);
    let b = n4
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["member"]["id"] == 4)
        .cloned()
        .unwrap();
    assert_eq!(b["member"]["labels"]["zone"], "b", "{b}");

    // Writes commit while both learners are cut off; they catch up and serve them.
    signal(&c.nodes[3], "STOP");
    signal(&c.nodes[4], "STOP");
    c.nodes[0].cli_ok(&["cluster", "meta", "set", "cut", "off"]);
    c.nodes[1].cli_ok(&["cluster", "meta", "set", "still", "writing"]);
    signal(&c.nodes[3], "CONT");
    signal(&c.nodes[4], "CONT");
    for learner in &c.nodes[3..] {
        wait_for("the learner to catch up", Duration::from_secs(30), || {
            let m = learner.meta(true)?;
            if m["still"] == "writing" {
                Ok(())
            } else {
                Err(m.to_string())
            }
        });
    }
    // A learner answers linearizable reads and takes writes too (asking the leader).
    c.nodes[4].cli_ok(&["cluster", "meta", "set", "via", "learner"]);
    assert_eq!(meta_get(&c.nodes[3], "via"), "learner");

    // Two voters of three gone: no quorum, however many learners run; and no learner
    // takes the lead.
    let leader = c.leader();
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for &i in &others {
        c.nodes[i].kill9();
    }
    let code = failed_write(&c.nodes[leader], "no-quorum");
    assert!(code == 6 || code == 10, "exit {code}");
    let code = failed_write(&c.nodes[3], "no-quorum");
    assert!(code == 6 || code == 10, "exit {code}");
    for learner in &c.nodes[3..] {
        let s = learner.status(true).unwrap();
        assert_ne!(s["raft"]["role"], "leader", "{s}");
        assert_ne!(s["raft"]["role"], "candidate", "{s}");
    }
    for &i in &others {
        c.nodes[i].start(&[]);
    }
    c.leader();
    c.nodes[0].cli_ok(&["cluster", "meta", "set", "quorum", "back"]);

    // A learner that has fallen behind is not promoted.
    signal(&c.nodes[4], "STOP");
    for i in 0..70 {
        c.nodes[0].cli_ok(&["cluster", "meta", "set", "behind", &i.to_string()]);
    }
    let out = c.nodes[0].cli(&["cluster", "promote", "5"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("node 5 has not caught up with the leader"),
        "{err}"
    );
    signal(&c.nodes[4], "CONT");

    // Promote one learner, by the doc's procedure (a joint configuration change).
    let outs = run("promote", &mut c.nodes[0], &[("NODE", "4")]);
    let row = outs[1]
        .lines()
        .find(|l| l.starts_with("n4 "))
        .unwrap_or_default();
    assert!(row.contains("voter"), "{}", outs[1]);
    wait_configuration(&c.nodes[0], &[1, 2, 3, 4], &[5]);
    // Through a joint configuration, which the leader left.
    let leader = c.leader();
    wait_for(
        "the joint configuration left",
        Duration::from_secs(30),
        || {
            let log = c.nodes[leader].log();
            let joint = log
                .find("entered a joint configuration")
                .ok_or("no joint configuration yet")?;
            if log[joint..].contains("left the joint configuration") {
                Ok(())
            } else {
                Err(log[joint..].to_string())
            }
        },
    );
    let again = c.nodes[0].cli(&["cluster", "promote", "4"]);
    assert_eq!(again.status.code(), Some(5), "already a voter");
    // Demote it again: it stays a learner.
    let out = json(&c.nodes[2], &["cluster", "demote", "4"]);
    assert_eq!(out, serde_json::json!({"node": 4, "role": "learner"}));
    wait_configuration(&c.nodes[0], &[1, 2, 3], &[4, 5]);

    // The leader demoted (asked through a follower, which hands the request to it): it
    // hands its leadership on first, and the new leader makes the change.
    let leader = c.leader();
    let id = (leader + 1).to_string();
    let follower = (0..3).find(|i| *i != leader).unwrap();
    run("demote", &mut c.nodes[follower], &[("NODE", &id)]);
    let voters: Vec<u64> = (1..=3).filter(|n| *n != leader as u64 + 1).collect();
    let mut learners = vec![leader as u64 + 1, 4, 5];
    learners.sort_unstable();
    let other = voters[0] as usize - 1;
    wait_configuration(&c.nodes[other], &voters, &learners);
    assert_ne!(c.leader(), leader);
    // Two voters now: both are needed. Promote the old leader back.
    c.nodes[other].cli_ok(&["cluster", "promote", &id]);
    wait_configuration(&c.nodes[other], &[1, 2, 3], &[4, 5]);

    // The voters' site lost for good: a learner holds the whole state and brings the
    // cluster back as its only voter.
    for i in 0..3 {
        c.nodes[i].kill9();
    }
    assert_eq!(c.nodes[4].stop(), 0);
    run("force-new-cluster", &mut c.nodes[4], &[]);
    wait_configuration(&c.nodes[4], &[5], &[]);
    assert_eq!(meta_get(&c.nodes[4], "quorum"), "back");
    c.nodes[4].cli_ok(&["cluster", "meta", "set", "after", "site-loss"]);
}
