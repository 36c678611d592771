//! Process tests: three real `blixard` daemons on loopback, driven through the CLI.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use blixard_tests::{wait_for, Cluster, Node};

const LONG: Duration = Duration::from_secs(60);

/// Waits until `node` (read locally, without a leader round) has `key = value`.
fn wait_meta(node: &Node, key: &str, value: &str) {
    wait_for(
        &format!("{} to have {key}={value}", node.name),
        LONG,
        || {
            let m = node.meta(true)?;
            if m[key].as_str() == Some(value) {
                Ok(())
            } else {
                Err(m.to_string())
            }
        },
    );
}

#[test]
fn cluster_forms_survives_leader_loss_and_the_old_leader_catches_up() {
    let mut c = Cluster::start(3, &[]);
    let status = c.nodes[1].status(false).unwrap();
    assert_eq!(status["members"].as_array().unwrap().len(), 3);
    assert_eq!(status["raft"]["voters"], serde_json::json!([1, 2, 3]));

    // A write through a follower is committed and visible, linearizably, everywhere.
    let leader = c.leader();
    let follower = (leader + 1) % 3;
    c.nodes[follower].cli_ok(&["cluster", "meta", "set", "color", "blue"]);
    for node in &c.nodes {
        let m = node.meta(false).unwrap();
        assert_eq!(m["color"], "blue", "linearizable read on {}", node.name);
    }

    // kill -9 the leader: the others elect a new one and writes go on.
    c.nodes[leader].kill9();
    let new_leader = c.leader();
    assert_ne!(new_leader, leader);
    let survivor = (0..3).find(|i| *i != leader && *i != new_leader).unwrap();
    wait_for("a write after failover", LONG, || {
        c.nodes[survivor].try_cli(&["cluster", "meta", "set", "color", "green"])
    });
    assert_eq!(c.nodes[new_leader].meta(false).unwrap()["color"], "green");

    // The old leader restarts from its data dir alone and catches up.
    c.nodes[leader].start(&[]);
    wait_meta(&c.nodes[leader], "color", "green");
    let s = c.nodes[leader].status(false).unwrap();
    assert_eq!(s["members"].as_array().unwrap().len(), 3);
    assert!(s["raft"]["term"].as_u64().unwrap() >= 2);
}

#[test]
fn a_lagging_node_catches_up_by_snapshot_after_compaction() {
    let mut c = Cluster::start(3, &["--snapshot-threshold", "20"]);
    let leader = c.leader();
    let lagging = (leader + 2) % 3;
    let writer = (leader + 1) % 3;
    c.nodes[lagging].kill9();
    for i in 0..60 {
        c.nodes[writer].cli_ok(&["cluster", "meta", "set", &format!("k{i}"), &i.to_string()]);
    }
    // The leader compacted its log past what the lagging node has.
    let s = c.nodes[leader].status(false).unwrap();
    assert!(
        s["raft"]["first_index"].as_u64().unwrap() > 20,
        "leader compacted: {s}"
    );

    c.nodes[lagging].start(&[]);
    wait_meta(&c.nodes[lagging], "k59", "59");
    let m = c.nodes[lagging].meta(true).unwrap();
    assert_eq!(m.as_object().unwrap().len(), 60);
    assert!(
        c.nodes[lagging].log().contains("received snapshot"),
        "caught up by snapshot: {}",
        c.nodes[lagging].log()
    );
}

/// A second host with a member's name (names default to the host name) is refused with
/// how to name it, and its token stays unspent; under another name it joins.
#[test]
fn a_second_member_with_a_taken_name_is_refused() {
    let c = Cluster::start(1, &[]);
    let ticket = c.token();
    let mut twin = Node::new(c.root.path(), "twin");
    let (code, out) = twin.run_expect_exit(&["--join", &ticket, "--name", "n1"]);
    assert_eq!(code, 5, "{out}");
    assert!(
        out.contains("already has a member named \"n1\"") && out.contains("--name NAME"),
        "{out}"
    );
    // Nothing joined; the same ticket admits the node under its own name.
    twin.start(&["--join", &ticket]);
    c.wait_voters(2);
    let status = c.nodes[0].status(false).unwrap();
    let mut names: Vec<&str> = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["n1", "twin"]);
}

#[test]
fn tokens_are_one_time_and_expire() {
    let c = Cluster::start(1, &[]);
    let ticket = c.token();
    let mut n2 = Node::new(c.root.path(), "n2");
    n2.start(&["--join", &ticket]);

    // The same ticket again, for a new node: refused.
    let n3 = Node::new(c.root.path(), "n3");
    let (code, out) = n3.run_expect_exit(&["--join", &ticket]);
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("join token already used"), "{out}");

    // An expired token: refused.
    let out = c.nodes[0].cli_ok(&[
        "cluster", "token", "create", "--ttl", "1s", "--output", "json",
    ]);
    let t: serde_json::Value = serde_json::from_str(&out).unwrap();
    let expires = t["expires_at_ms"].as_u64().unwrap();
    wait_for("the token to expire", LONG, || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        if now > expires {
            Ok(())
        } else {
            Err(format!("{now} <= {expires}"))
        }
    });
    let n4 = Node::new(c.root.path(), "n4");
    let (code, out) = n4.run_expect_exit(&["--join", t["ticket"].as_str().unwrap()]);
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("join token expired"), "{out}");
    // Neither failed join left a member behind.
    let s = c.nodes[0].status(false).unwrap();
    assert_eq!(s["members"].as_array().unwrap().len(), 2, "{s}");

    // Listed and revoked: a revoked token admits no one; a used one cannot be revoked.
    let ticket = c.token();
    let list = |c: &Cluster| -> Vec<serde_json::Value> {
        let out = c.nodes[0].cli_ok(&["cluster", "token", "list", "--output", "json"]);
        serde_json::from_str(&out).unwrap()
    };
    let tokens = list(&c);
    assert_eq!(tokens.len(), 3, "{tokens:?}");
    assert_eq!(
        tokens[0]["used_by"].as_u64(),
        Some(2),
        "the first token was used by node 2"
    );
    let fresh = tokens.last().unwrap()["id"].as_str().unwrap().to_string();
    let table = c.nodes[0].cli_ok(&["cluster", "token", "list"]);
    assert!(
        table.contains(&fresh[..16]) && table.contains("valid") && table.contains("used by 2"),
        "{table}"
    );
    let out = c.nodes[0].cli(&[
        "cluster",
        "token",
        "revoke",
        tokens[0]["id"].as_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.nodes[0].cli(&["cluster", "token", "revoke", "abc"]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.nodes[0].cli_ok(&["cluster", "token", "revoke", &fresh[..10]]);
    assert!(list(&c).iter().all(|t| t["id"] != fresh.as_str()));
    let n5 = Node::new(c.root.path(), "n5");
    let (code, out) = n5.run_expect_exit(&["--join", &ticket]);
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("unknown join token"), "{out}");
}

#[test]
fn a_removed_node_stops_and_cannot_come_back() {
    let mut c = Cluster::start(3, &[]);
    let out = c.nodes[0].cli(&["cluster", "leave", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.nodes[2].wait_exit(LONG), 7);
    let s = c.nodes[1].status(false).unwrap();
    assert_eq!(s["members"].as_array().unwrap().len(), 2);
    assert_eq!(s["raft"]["voters"], serde_json::json!([1, 2]));

    let (code, out) = c.nodes[2].run_expect_exit(&[]);
    assert_eq!(code, 7, "{out}");
    assert!(out.contains("was removed"), "{out}");

    // The cluster keeps working with two nodes; leaving twice is refused.
    c.nodes[1].cli_ok(&["cluster", "meta", "set", "after", "leave"]);
    let out = c.nodes[0].cli(&["cluster", "leave", "3"]);
    assert_eq!(out.status.code(), Some(5));
}

#[test]
fn a_remote_node_is_reachable_by_ticket_or_address() {
    let c = Cluster::start(1, &[]);
    let ticket = c.token();
    // Another directory's CLI, with the admin key of n1, aimed by --node.
    let key = c.nodes[0].dir.join("admin.key");
    let out = std::process::Command::new(blixard_tests::binary())
        .args(["--data-dir", "/nonexistent", "--credential"])
        .arg(&key)
        .args(["--node", &ticket, "cluster", "status", "--output", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let endpoint = s["members"][0]["endpoint"].as_str().unwrap().to_string();
    let addr = format!("{endpoint}@127.0.0.1:{}", c.nodes[0].port);
    let out = std::process::Command::new(blixard_tests::binary())
        .args(["--data-dir", "/nonexistent", "--credential"])
        .arg(&key)
        .args(["--node", &addr, "cluster", "status"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("leader n1"));
}

/// Tenants, quotas and the host list through the CLI.
#[test]
fn tenants_quotas_and_the_node_list() {
    let c = Cluster::start(2, &[]);
    let n1 = &c.nodes[0];
    n1.cli_ok(&["tenant", "create", "acme"]);
    let out = n1.cli(&["tenant", "create", "acme"]);
    assert_eq!(out.status.code(), Some(5), "a tenant is created once");
    n1.cli_ok(&[
        "quota",
        "set",
        "acme",
        "--max-vms",
        "10",
        "--max-vcpus",
        "16",
        "--max-memory",
        "8GiB",
    ]);
    let shown: serde_json::Value =
        serde_json::from_str(&c.nodes[1].cli_ok(&["--output", "json", "quota", "show", "acme"]))
            .unwrap();
    let q = &shown[0]["tenant"]["quota"];
    assert_eq!(q["max_vms"], 10);
    assert_eq!(q["max_vcpus"], 16);
    assert_eq!(q["max_memory_mib"], 8192);
    assert_eq!(shown[0]["used"]["vms"], 0);
    let out = n1.cli(&["quota", "set", "acme", "--max-memory", "lots"]);
    assert_eq!(out.status.code(), Some(2));
    let out = n1.cli(&["quota", "set", "nobody", "--max-vms", "1"]);
    assert_eq!(out.status.code(), Some(9), "no such tenant: not found");
    let table = n1.cli_ok(&["tenant", "list"]);
    assert!(table.contains("acme") && table.contains("0/10"), "{table}");

    let nodes: serde_json::Value =
        serde_json::from_str(&n1.cli_ok(&["--output", "json", "node", "list"])).unwrap();
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes.iter().filter(|n| n["leader"] == true).count(), 1);
    assert!(nodes.iter().all(|n| n["drained"] == false));
    assert!(nodes.iter().all(|n| n["allocated"]["vms"] == 0));
}

#[test]
fn declared_members_refuse_a_stranger_with_a_valid_ticket() {
    let root = tempfile::Builder::new()
        .prefix("blixard-members")
        .tempdir()
        .unwrap();
    // n2's identity is made before it starts, so the member list can name it.
    let mut n1 = Node::new(root.path(), "n1");
    let mut n2 = Node::new(root.path(), "n2");
    let n3 = Node::new(root.path(), "n3");
    std::fs::create_dir_all(&n2.dir).unwrap();
    let n2_key = blixard_net::keys::create(&n2.dir.join("node.key")).unwrap();
    let n2_id = blixard_net::key_of(&n2_key.public()).to_string();
    let members = root.path().join("members.json");
    // n1's key comes from its first start: list it after, and restart it with the list.
    n1.start(&["--init"]);
    let n1_id = n1.info().unwrap()["endpoint_id"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(
        &members,
        format!(
            r#"{{"node1": {{"name": "n1", "endpointId": "{n1_id}", "addresses": []}},
                "node2": {{"name": "n2", "endpointId": "{n2_id}", "addresses": []}}}}"#
        ),
    )
    .unwrap();
    let config = root.path().join("node.toml");
    std::fs::write(
        &config,
        format!("expected_members = \"{}\"\n", members.display()),
    )
    .unwrap();
    n1.stop();
    n1.start(&["--config", config.to_str().unwrap()]);

    // A listed node joins; a stranger with a perfectly good ticket is refused, naming why.
    let ticket = n1
        .cli_ok(&["cluster", "token", "create"])
        .trim()
        .to_string();
    n2.start(&["--join", &ticket, "--config", config.to_str().unwrap()]);
    let ticket = n1
        .cli_ok(&["cluster", "token", "create"])
        .trim()
        .to_string();
    let (code, out) = n3.run_expect_exit(&["--join", &ticket, "--name", "n3"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("not an expected member"), "{out}");
    let status = n1.status(false).unwrap();
    assert_eq!(status["members"].as_array().unwrap().len(), 2, "{status}");

    // A malformed list stops the daemon with a config error.
    std::fs::write(&members, "{\"node1\": {\"name\": \"n1\"}}").unwrap();
    n1.stop();
    let (code, out) = n1.run_expect_exit(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, 8, "{out}");
    assert!(out.contains("expected members"), "{out}");
}

#[test]
fn declared_addresses_reunite_a_cluster_whose_addresses_all_changed() {
    let mut c = Cluster::start(3, &[]);
    c.wait_voters(3);
    c.nodes[0].cli_ok(&["cluster", "meta", "set", "era", "old"]);
    let ids: Vec<String> = c
        .nodes
        .iter()
        .map(|n| {
            n.info().unwrap()["endpoint_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for n in &mut c.nodes {
        assert_eq!(n.stop(), 0);
    }
    // Every node comes back on a new port: the addresses in the cluster state are all
    // wrong, and only the declared member list says where the others are now.
    let members = c.root.path().join("members.json");
    let mut entries = Vec::new();
    for (n, id) in c.nodes.iter_mut().zip(&ids) {
        n.port = blixard_tests::free_port();
        entries.push(format!(
            r#""{}": {{"name": "{}", "endpointId": "{id}", "addresses": ["127.0.0.1:{}"]}}"#,
            n.name, n.name, n.port
        ));
    }
    std::fs::write(&members, format!("{{{}}}", entries.join(", "))).unwrap();
    let config = c.root.path().join("declared.toml");
    std::fs::write(
        &config,
        format!("expected_members = \"{}\"\n", members.display()),
    )
    .unwrap();
    for n in &mut c.nodes {
        n.start(&["--config", config.to_str().unwrap()]);
    }
    wait_for("a write after the move", LONG, || {
        c.nodes[2].try_cli(&["cluster", "meta", "set", "era", "new"])
    });
    for node in &c.nodes {
        wait_meta(node, "era", "new");
    }

    // An address that is not IP:PORT stops the daemon with a config error.
    std::fs::write(
        &members,
        format!(
            r#"{{"n1": {{"name": "n1", "endpointId": "{}", "addresses": ["node1:7000"]}}}}"#,
            ids[0]
        ),
    )
    .unwrap();
    c.nodes[0].stop();
    let (code, out) = c.nodes[0].run_expect_exit(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, 8, "{out}");
    assert!(out.contains("not IP:PORT"), "{out}");
}

/// The NixOS path: a node joins with `--join-file` (the module always passes it), and the
/// ticket is gone after a reboot (`/run/keys` is a tmpfs) or was used long ago. A node that
/// has joined resumes from its data dir alone; one whose data dir was lost is told to get a
/// new ticket, naming the option.
#[test]
fn a_joined_node_restarts_without_its_ticket_and_a_lost_one_asks_for_a_new_one() {
    let root = tempfile::Builder::new()
        .prefix("blixard-ticket")
        .tempdir()
        .unwrap();
    let mut n1 = Node::new(root.path(), "n1");
    n1.start(&["--init"]);
    let ticket_file = root.path().join("keys-blixard-ticket");
    let join_file = ["--join-file", ticket_file.to_str().unwrap()];
    // Each joins with a ticket of its own; both are used up afterwards.
    let mut used = Vec::new();
    let mut nodes = Vec::new();
    for name in ["n2", "n3"] {
        let ticket = n1
            .cli_ok(&["cluster", "token", "create", "--ttl", "5m"])
            .trim()
            .to_string();
        std::fs::write(&ticket_file, &ticket).unwrap();
        let mut n = Node::new(root.path(), name);
        n.start(&join_file);
        nodes.push(n);
        used.push(ticket);
    }
    let [n2, n3] = nodes.as_mut_slice() else {
        unreachable!()
    };
    n1.wait_voters(3);
    n1.cli_ok(&["cluster", "meta", "set", "before", "reboot"]);

    // "Reboot" n2: stop it, the ticket file is gone (or empty, damaged, or its own used
    // ticket), start it with the same flags. It is a member again within one election
    // timeout (10 ticks of 100 ms) of serving: it knows the leader, and reads and writes
    // through it work.
    let election_timeout = Duration::from_millis(1000);
    for ticket in [None, Some(""), Some("not a ticket"), Some(used[0].as_str())] {
        n2.stop();
        match ticket {
            None => std::fs::remove_file(&ticket_file).unwrap(),
            Some(t) => std::fs::write(&ticket_file, t).unwrap(),
        }
        n2.start(&join_file);
        let serving = std::time::Instant::now();
        n2.wait_knows_leader(LONG);
        let rejoined = serving.elapsed();
        assert!(
            rejoined < election_timeout,
            "n2 knew the leader {rejoined:?} after it served (ticket {ticket:?})"
        );
        assert_eq!(n2.meta(false).unwrap()["before"], "reboot");
        n2.cli_ok(&["cluster", "meta", "set", "after", "reboot"]);
        let note = if ticket == Some(used[0].as_str()) {
            "ignoring the join ticket"
        } else {
            "the join ticket is not needed"
        };
        let log = n2.log();
        assert!(log.contains(note), "ticket {ticket:?}: {log}");
        assert!(!log.contains("ERROR"), "{log}");
    }

    // n3 loses its data dir. Its used ticket is refused (exit 5); without one it is a
    // config error (exit 8). Both messages say how to get a new ticket, naming the option.
    n3.kill9();
    std::fs::remove_dir_all(&n3.dir).unwrap();
    std::fs::write(&ticket_file, &used[1]).unwrap();
    let (code, out) = n3.run_expect_exit(&join_file);
    assert_eq!(code, 5, "{out}");
    for needle in [
        "refused the join ticket",
        "already used",
        "blixard cluster token create",
        "services.blixard.joinTicketFile",
    ] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
    std::fs::remove_file(&ticket_file).unwrap();
    let (code, out) = n3.run_expect_exit(&join_file);
    assert_eq!(code, 8, "{out}");
    for needle in ["needs a join ticket", "services.blixard.joinTicketFile"] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
}

#[test]
fn a_node_told_to_stop_while_it_joins_stops_at_once() {
    // A ticket whose only member does not answer: n1's port is held by a silent socket.
    let mut c = Cluster::start(1, &[]);
    let ticket = c.token();
    let port = c.nodes[0].port;
    c.nodes[0].stop();
    let _silent = std::net::UdpSocket::bind(("127.0.0.1", port)).unwrap();

    let joiner = Node::new(c.root.path(), "n2");
    let log = std::fs::File::create(joiner.log_path()).unwrap();
    let mut child = std::process::Command::new(blixard_tests::binary())
        .args(["--data-dir", joiner.dir.to_str().unwrap(), "node", "run"])
        .args(["--listen", &format!("127.0.0.1:{}", joiner.port)])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(["--join", &ticket])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    // Its key exists once its signal handlers are in place and it is about to join.
    wait_for("n2's key", LONG, || {
        joiner
            .dir
            .join("node.key")
            .exists()
            .then_some(())
            .ok_or_else(|| joiner.log())
    });
    let sent = std::time::Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Well within the 10 s a join waits for an answer.
    let code = wait_for("n2 to stop", Duration::from_secs(5), || {
        child
            .try_wait()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "still running".to_string())
    });
    assert!(
        code.success(),
        "{code} after {:?}: {}",
        sent.elapsed(),
        joiner.log()
    );
    assert!(
        joiner.log().contains("SIGTERM while starting"),
        "{}",
        joiner.log()
    );
}

#[test]
fn writes_in_flight_when_the_leader_dies_complete_and_apply_once() {
    use std::sync::Arc;
    use std::time::Instant;

    use blixard_net::api::{MetaSet, TenantCreate, TenantList};
    use blixard_tests::api;

    const WRITERS_PER_NODE: usize = 4;
    let mut c = Cluster::start(3, &[]);
    let leader = c.leader();
    let addrs: Vec<_> = c.nodes.iter().map(api::addr_of).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = c.nodes[0].dir.join("admin.key");
    let client = Arc::new(rt.block_on(api::client(&key, Duration::from_secs(10))));

    // Writers through every node.
    let targets: Vec<_> = addrs.iter().map(|(_, a)| a.clone()).collect();
    let writers = api::Writers::start(&rt, &client, &targets, WRITERS_PER_NODE, "w");
    writers.wait_done(0, 100, LONG);
    let killed = Instant::now();
    c.nodes[leader].kill9();
    let new_leader = c.leader();
    writers.wait_done(writers.done(), 100, LONG);
    let writes = writers.stop(&rt);

    // Through the survivors every write succeeded, those in flight at the kill included:
    // a retry of a write applied before the kill got its first result, not "exists".
    let survivors: Vec<&api::Write> = writes.iter().filter(|w| w.node != leader).collect();
    let failed: Vec<String> = survivors
        .iter()
        .filter_map(|w| w.result.as_ref().err().map(|e| format!("{}: {e}", w.name)))
        .collect();
    assert!(
        failed.is_empty(),
        "writes through survivors failed: {failed:?}"
    );
    let (in_flight, slowest) = api::in_flight_at(&survivors, killed);
    eprintln!(
        "{} writes, {} through survivors, {} in flight at the kill; the last of those \
         completed {slowest:?} after it",
        writes.len(),
        survivors.len(),
        in_flight
    );
    // Not waiting out the client timeout (10 s) is the point; the 2-election-timeout
    // target is measured by the bench.
    assert!(
        slowest < Duration::from_secs(5),
        "a write in flight at the kill took {slowest:?} after it"
    );

    // Every acknowledged write is there, read linearizably from the new leader.
    let to = &addrs[new_leader].1;
    let (meta, tenants) = rt.block_on(async {
        let meta = client
            .call(
                to,
                blixard_net::api::MetaGet {
                    key: None,
                    stale: false,
                },
            )
            .await
            .unwrap();
        let tenants = client.call(to, TenantList { stale: false }).await.unwrap();
        (meta, tenants)
    });
    let meta: std::collections::HashSet<String> =
        meta.entries.into_iter().map(|(k, _)| k).collect();
    let tenants: std::collections::HashSet<String> =
        tenants.tenants.into_iter().map(|t| t.tenant.name).collect();
    for w in writes.iter().filter(|w| w.result.is_ok()) {
        assert!(
            meta.contains(&w.name) || tenants.contains(&w.name),
            "acknowledged write {} is missing",
            w.name
        );
    }

    // A retry of an applied write (the same request id, as the client sends after an
    // ambiguous answer) gets the first result and changes nothing; without the id the
    // same creation is refused.
    let follower = (0..3).find(|i| *i != leader && *i != new_leader).unwrap();
    let to = &addrs[follower].1;
    let frame = |id: u8, request: blixard_net::api::Request| {
        let mut f = blixard_net::api::RequestFrame::new(None, request);
        f.id = Some(blixard_core::RequestId([id; 16]));
        f
    };
    let create = || TenantCreate {
        name: "replayed".into(),
    };
    let set = |v: &str| MetaSet {
        key: "replayed".into(),
        value: Some(v.into()),
    };
    rt.block_on(async {
        for _ in 0..2 {
            let r = client
                .call_frame(to, frame(1, create().into()))
                .await
                .unwrap();
            assert!(r.is_ok(), "a replayed creation: {r:?}");
        }
        let r = client
            .call_frame(to, frame(2, create().into()))
            .await
            .unwrap();
        assert!(r.is_err(), "a second creation under another id: {r:?}");
        client
            .call_frame(to, frame(3, set("1").into()))
            .await
            .unwrap()
            .unwrap();
        client
            .call_frame(to, frame(4, set("2").into()))
            .await
            .unwrap()
            .unwrap();
        client
            .call_frame(to, frame(3, set("1").into()))
            .await
            .unwrap()
            .unwrap();
    });
    wait_meta(&c.nodes[follower], "replayed", "2");
    assert_eq!(c.nodes[new_leader].meta(false).unwrap()["replayed"], "2");

    // No request was applied twice: each survivor's audit log names every request id
    // it applied once.
    for (i, node) in c.nodes.iter().enumerate().filter(|(i, _)| *i != leader) {
        let audit = std::fs::read_to_string(node.dir.join("audit.log")).unwrap();
        let mut seen = std::collections::HashMap::new();
        for line in audit.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if let (Some(request), Some(index)) = (v["request"].as_str(), v["index"].as_u64()) {
                if let Some(first) = seen.insert(request.to_string(), index) {
                    panic!(
                        "n{}: request {request} applied at {first} and at {index}",
                        i + 1
                    );
                }
            }
        }
        assert!(
            seen.len() >= survivors.len(),
            "n{}: {} applied requests recorded, fewer than the {} acknowledged",
            i + 1,
            seen.len(),
            survivors.len()
        );
    }
    rt.block_on(client.endpoint().close());
}

#[test]
fn a_member_whose_state_differs_raises_the_alarm() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("checks.toml");
    std::fs::write(&config, "[raft]\nstate_check_interval_ms = 300\n").unwrap();
    let mut c = Cluster::start(3, &["--config", config.to_str().unwrap()]);
    c.nodes[0].cli_ok(&["cluster", "meta", "set", "color", "blue"]);
    wait_meta(&c.nodes[2], "color", "blue");

    // n3's copy of the value changes behind raft's back, first without its checksum:
    // the row is an error, the node refuses to start (exit 7).
    assert_eq!(c.nodes[2].stop(), 0);
    let db_file = c.nodes[2].dir.join("blixard.redb");
    edit_kv_row(&db_file, false);
    match c.nodes[2].try_start(&[]) {
        Err((code, log)) => {
            assert_eq!(code, Some(7), "{log}");
            assert!(log.contains("checksum mismatch"), "{log}");
        }
        Ok(()) => panic!("n3 started on a row whose checksum does not match"),
    }
    // Then as a valid row with a valid checksum: the file passes the open checks.
    edit_kv_row(&db_file, true);
    c.nodes[2].start(&[]);
    assert_eq!(c.nodes[2].meta(true).unwrap()["color"], "blud");

    // The leader's next checks find it out: n3 raises the alarm, the others do not.
    wait_for("n3's alarm", LONG, || {
        let s = c.nodes[2].status(true)?;
        s["raft"]["alarm"]
            .as_str()
            .map(str::to_string)
            .ok_or(format!("no alarm yet: {}", s["raft"]))
    });
    let text = c.nodes[2].cli_ok(&["cluster", "status", "--stale"]);
    assert!(text.contains("ALARM"), "{text}");
    assert!(c.nodes[2].log().contains("this node's state differs"));
    // The alarm is a metric too, for the BlixardStateCheckAlarm alert.
    let alarm = |n: &Node| {
        let body = blixard_tests::http::get(n.served_at("metrics"), "/metrics", &[])
            .unwrap()
            .body;
        body.lines()
            .find_map(|l| l.strip_prefix("blixard_raft_state_check_alarm "))
            .map(str::to_string)
    };
    assert_eq!(alarm(&c.nodes[2]).as_deref(), Some("1"));
    for n in &c.nodes[..2] {
        let s = n.status(true).unwrap();
        assert!(s["raft"]["alarm"].is_null(), "{}: {}", n.name, s["raft"]);
        assert!(s["raft"]["state_check"]["index"].as_u64().is_some());
        assert_eq!(alarm(n).as_deref(), Some("0"), "{}", n.name);
    }
}

/// Changes the stored value "blue" of the node's `kv` row to "blud", with a checksum
/// to match (`seal`) or keeping the old one.
fn edit_kv_row(db_file: &std::path::Path, seal: bool) {
    use redb::ReadableTable as _;
    const STATE: redb::TableDefinition<(&str, &[u8]), &[u8]> = redb::TableDefinition::new("state");
    let db = redb::Database::create(db_file).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(STATE).unwrap();
        let rows: Vec<(String, Vec<u8>, Vec<u8>)> = table
            .iter()
            .unwrap()
            .map(|r| {
                let (k, v) = r.unwrap();
                let (t, key) = k.value();
                (t.to_string(), key.to_vec(), v.value().to_vec())
            })
            .collect();
        let (t, key, mut stored) = rows
            .into_iter()
            .find(|(t, _, v)| t == "kv" && v.windows(3).any(|w| w == b"blu"))
            .expect("the kv row");
        let at = stored.windows(3).position(|w| w == b"blu").unwrap();
        stored[at + 3] = b'd';
        if seal {
            let slot = blixard_store::Slot::Row(&t, &key);
            // The checksum is the first 8 bytes (see blixard_store::seal).
            stored = blixard_store::seal(slot, &stored[8..]);
        }
        table
            .insert((t.as_str(), key.as_slice()), stored.as_slice())
            .unwrap();
    }
    txn.commit().unwrap();
}

/// A member killed and started again is reached by its peers at once: its first streams
/// carry a new incarnation, and they replace their connections to its old process
/// (which QUIC would notice only at its idle timeout). Measured by how soon a write
/// reaches it, read locally, while the other nodes' links to it are the issue.
#[test]
fn a_restarted_member_is_reached_again_at_once() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.leader();
    let follower = (leader + 1) % 3;
    c.nodes[leader].cli_ok(&["cluster", "meta", "set", "round", "0"]);
    wait_meta(&c.nodes[follower], "round", "0");
    for round in 1..=3 {
        c.nodes[follower].kill9();
        c.nodes[follower].start(&[]);
        let value = round.to_string();
        let written = std::time::Instant::now();
        c.nodes[leader].cli_ok(&["cluster", "meta", "set", "round", &value]);
        wait_for(
            &format!("round {round}: the write on the restarted member"),
            Duration::from_secs(3),
            || {
                let m = c.nodes[follower].meta(true)?;
                if m["round"].as_str() == Some(value.as_str()) {
                    Ok(())
                } else {
                    Err(m.to_string())
                }
            },
        );
        eprintln!(
            "round {round}: the restarted member had the write {} ms after it was acknowledged",
            written.elapsed().as_millis()
        );
    }
}

/// A long-lived client (another node forwarding, a program using the API) holds a
/// connection to a member's process; after that member restarts, the connection goes to a
/// process that is gone, and QUIC would notice only at its idle timeout (4 s). The client
/// notices that its request was never acknowledged and sends it again on a new connection.
#[test]
fn a_long_lived_client_reaches_a_restarted_member_at_once() {
    use blixard_net::api::{MetaSet, StatusRequest};
    use blixard_tests::api;
    use std::time::Instant;

    let mut c = Cluster::start(3, &[]);
    let follower = (c.leader() + 1) % 3;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(api::client(
        &c.nodes[0].dir.join("admin.key"),
        Duration::from_secs(10),
    ));
    let addr = api::addr_of(&c.nodes[follower]).1;
    rt.block_on(client.call(&addr, StatusRequest { stale: true }))
        .unwrap();
    for round in 1..=4 {
        c.nodes[follower].kill9();
        c.nodes[follower].start(&[]);
        c.nodes[follower].wait_knows_leader(LONG);
        let asked = Instant::now();
        // A write (sent again under its request id) and a read (changes nothing).
        let what = if round % 2 == 1 {
            rt.block_on(client.call(
                &addr,
                MetaSet {
                    key: "round".into(),
                    value: Some(round.to_string()),
                },
            ))
            .map(|_| "write")
        } else {
            rt.block_on(client.call(&addr, StatusRequest { stale: true }))
                .map(|_| "read")
        }
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let took = asked.elapsed();
        eprintln!("round {round}: the restarted member answered a {what} after {took:?}");
        assert!(
            took < Duration::from_millis(2500),
            "round {round}: the {what} took {took:?}; the dead connection was not dropped"
        );
    }
    wait_meta(&c.nodes[follower], "round", "3");
}

#[test]
fn writes_answer_one_json_object_and_console_lines_are_json_lines() {
    let c = Cluster::start(1, &[]);
    let _runners = blixard_tests::runners::Reaper(c.root.path().to_path_buf());
    let n = &c.nodes[0];
    // Each write with --output json prints one object on stdout saying what was applied.
    let write = |args: &[&str]| -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        // One JSON value and nothing else (the confirmations go to stderr).
        let out = n.cli_ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    };
    assert_eq!(
        write(&["cluster", "meta", "set", "owner", "ops"])["value"],
        "ops"
    );
    let key = blixard_net::key_of(&blixard_net::SecretKey::generate().public()).to_string();
    let other = blixard_net::key_of(&blixard_net::SecretKey::generate().public()).to_string();
    let u = write(&["user", "add", "vera", "--key", &key, "--role", "viewer"]);
    assert_eq!(
        (&u["name"], &u["roles"][0]),
        (&"vera".into(), &"viewer".into()),
        "{u}"
    );
    assert_eq!(
        write(&["user", "set-key", "vera", "--key", &other])["key"],
        other.as_str()
    );
    assert_eq!(write(&["user", "rm", "vera"])["removed"], true);
    assert_eq!(
        write(&["tenant", "create", "acme"])[0]["tenant"]["name"],
        "acme"
    );
    assert_eq!(write(&["tenant", "rm", "acme"])["removed"], true);
    let policies = c.root.path().join("policies.cedar");
    std::fs::write(&policies, n.cli_ok(&["policy", "show"])).unwrap();
    assert_eq!(
        write(&["policy", "set", policies.to_str().unwrap()])["replaced"],
        true
    );
    let ticket = write(&["cluster", "token", "create", "--ttl", "1h"]);
    assert!(ticket["ticket"].as_str().is_some(), "{ticket}");
    let tokens: serde_json::Value =
        serde_json::from_str(&n.cli_ok(&["cluster", "token", "list", "--output", "json"])).unwrap();
    let id = tokens[0]["id"].as_str().unwrap();
    assert_eq!(write(&["cluster", "token", "revoke", id])["id"], id);
    blixard_tests::runners::import_runner(
        n,
        c.root.path(),
        "talker",
        "echo first line\necho 'second \"quoted\" line'\nexec sleep 600",
    );
    assert_eq!(write(&["image", "pin", "talker"])["pinned"], true);
    assert_eq!(write(&["image", "unpin", "talker"])["pinned"], false);
    assert_eq!(write(&["node", "drain", "1"])["drained"], true);
    assert_eq!(write(&["node", "undrain", "1"])["drained"], false);
    let vm = write(&["vm", "create", "web", "--image", "talker"]);
    assert_eq!(vm["spec"]["name"], "web", "{vm}");

    // The console, one JSON object per line, quotes and all.
    let lines: Vec<serde_json::Value> =
        wait_for("the console's two lines", Duration::from_secs(60), || {
            let out = n.try_cli(&["vm", "logs", "web", "--output", "json"])?;
            let lines: Vec<serde_json::Value> = out
                .lines()
                .map(|l| serde_json::from_str(l).map_err(|e| format!("{e}: {l}")))
                .collect::<Result<_, _>>()?;
            if lines.len() >= 2 {
                Ok(lines)
            } else {
                Err(out)
            }
        });
    assert_eq!(lines[0]["line"], "first line", "{lines:?}");
    assert_eq!(lines[1]["line"], "second \"quoted\" line", "{lines:?}");
    assert_eq!(lines[0]["vm"], "web");
    // A drain that waits prints one object too: what it applied and where the VMs went
    // (here nowhere: there is no other host).
    let drained = write(&["node", "drain", "1", "--wait", "--wait-timeout", "60"]);
    assert_eq!(drained["moved"][0], "default/web", "{drained}");
    assert_eq!(drained["vms"][0]["spec"]["name"], "web", "{drained}");
    write(&["node", "undrain", "1"]);
    assert_eq!(write(&["vm", "delete", "web"])["deleted"], true);
    assert_eq!(write(&["image", "rm", "talker"])["removed"], true);
}
