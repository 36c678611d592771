//! Bad input gets one clear error line and a documented exit code, and loses nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::time::Duration;

use blixard_net::api::{ApiError, ResponseFrame, ResponseItem};
use blixard_net::{endpoint, frame, member_addr, SecretKey, API_ALPN};
use blixard_tests::{binary, Cluster, Node};

fn cli_with_key(node: &Node, key: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(binary())
        .arg("--data-dir")
        .arg(&node.dir)
        .arg("--credential")
        .arg(key)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configs_data_dirs_and_tickets_are_refused_clearly() {
    let c = Cluster::start(1, &[]);
    let root = c.root.path();

    // A config with a typo: exit 8, naming the key.
    let cfg = root.join("bad.toml");
    std::fs::write(&cfg, "lisen = \"127.0.0.1:1\"\n").unwrap();
    let fresh = Node::new(root, "fresh");
    let (code, out) = fresh.run_expect_exit(&["--init", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 8, "{out}");
    assert!(out.contains("lisen"), "{out}");
    assert_eq!(out.trim().lines().count(), 1, "one line: {out}");

    // A data dir with no cluster and no --init/--join.
    let (code, out) = fresh.run_expect_exit(&[]);
    assert_eq!(code, 7, "{out}");
    assert!(out.contains("holds no cluster"), "{out}");

    // A damaged ticket.
    let (code, out) = Node::new(root, "t").run_expect_exit(&["--join", "blixard1zzzz"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("damaged"), "{out}");

    // A running node's data dir is locked.
    let (code, out) = c.nodes[0].run_expect_exit(&[]);
    assert_eq!(code, 7, "{out}");
    assert!(out.contains("in use"), "{out}");

    // A ticket of another cluster for an existing data dir.
    let other = Cluster::start(1, &[]);
    let foreign = other.token();
    let mut c = c;
    c.nodes[0].stop();
    let (code, out) = c.nodes[0].run_expect_exit(&["--join", &foreign]);
    assert_eq!(code, 7, "{out}");
    assert!(out.contains("belongs to cluster"), "{out}");
}

#[test]
fn a_corrupt_database_is_an_error_not_a_new_cluster() {
    let mut c = Cluster::start(1, &[]);
    c.nodes[0].stop();
    let db = c.nodes[0].dir.join("blixard.redb");
    let mut bytes = std::fs::read(&db).unwrap();
    for b in bytes.iter_mut().take(4096) {
        *b ^= 0x5a;
    }
    std::fs::write(&db, &bytes).unwrap();
    let (code, out) = c.nodes[0].run_expect_exit(&[]);
    assert_eq!(code, 7, "{out}");
    assert!(out.contains("cannot open database"), "{out}");
    // Nothing was rewritten.
    assert_eq!(std::fs::read(&db).unwrap(), bytes);
}

/// A node killed without removing its node.json: the CLI says at once that it is not
/// running (the file names its process), rather than waiting for its timeout; a running
/// node still answers, and a node.json from an older daemon (no process stamp) is tried.
#[test]
fn the_cli_says_at_once_that_its_node_is_not_running() {
    let mut c = Cluster::start(1, &[]);
    c.nodes[0].cli_ok(&["cluster", "status"]);
    let pid = c.nodes[0].pid().unwrap();
    c.nodes[0].kill9();
    let info = c.nodes[0].dir.join("node.json");
    assert!(info.exists(), "kill -9 leaves node.json behind");
    let asked = std::time::Instant::now();
    let out = c.nodes[0].cli(&["cluster", "status"]);
    let took = asked.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("is not running") && err.contains(&format!("process {pid} is gone")),
        "{err}"
    );
    assert!(took < Duration::from_secs(2), "took {took:?}: {err}");
    // Without the stamp (a node.json from an older daemon) the CLI cannot tell, and tries.
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&info).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("process");
    std::fs::write(&info, v.to_string()).unwrap();
    let out = Command::new(binary())
        .arg("--data-dir")
        .arg(&c.nodes[0].dir)
        .args(["--timeout", "1", "cluster", "status"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && !err.contains("is not running"),
        "{err}"
    );
    c.nodes[0].start(&[]);
    c.nodes[0].cli_ok(&["cluster", "status"]);
}

#[test]
fn a_member_whose_node_key_is_lost_does_not_get_a_new_identity() {
    let mut c = Cluster::start(1, &[]);
    c.nodes[0].stop();
    let key = c.nodes[0].dir.join("node.key");
    std::fs::remove_file(&key).unwrap();
    let (code, out) = c.nodes[0].run_expect_exit(&[]);
    assert_eq!(code, 7, "{out}");
    assert!(out.contains("identity is gone"), "{out}");
    assert!(!key.exists(), "no new key was made");
}

#[test]
fn wrong_credentials_are_refused() {
    let c = Cluster::start(1, &[]);
    let root = c.root.path();
    // A valid key the cluster does not know.
    let stranger = root.join("stranger.key");
    std::fs::write(
        &stranger,
        format!(
            "{}\n",
            blixard_core::EndpointKey(SecretKey::generate().to_bytes())
        ),
    )
    .unwrap();
    set_mode(&stranger, 0o600);
    let (code, out) = cli_with_key(&c.nodes[0], &stranger, &["cluster", "status"]);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("not authorized"), "{out}");

    // A key file others can read is refused before use.
    set_mode(&stranger, 0o644);
    let (code, out) = cli_with_key(&c.nodes[0], &stranger, &["cluster", "status"]);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("chmod 600"), "{out}");

    // A missing key.
    let (code, out) = cli_with_key(&c.nodes[0], &root.join("none.key"), &["cluster", "status"]);
    assert_eq!(code, 4, "{out}");
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_and_unknown_alpns_do_not_hurt_the_node() {
    let c = Cluster::start(1, &[]);
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.nodes[0].dir.join("node.json")).unwrap())
            .unwrap();
    let key: blixard_core::EndpointKey = info["endpoint_id"].as_str().unwrap().parse().unwrap();
    let addr = member_addr(
        &key,
        &[format!("127.0.0.1:{}", c.nodes[0].port).parse().unwrap()],
    )
    .unwrap();
    let ep = endpoint::bind(
        SecretKey::generate(),
        "127.0.0.1:0".parse().unwrap(),
        None,
        vec![],
    )
    .await
    .unwrap();

    // An unknown ALPN is refused at the handshake.
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        ep.connect(addr.clone(), b"blixard/nope/1"),
    )
    .await;
    assert!(matches!(r, Ok(Err(_))), "unknown ALPN must not connect");

    let conn = ep.connect(addr.clone(), API_ALPN).await.unwrap();
    // Garbage in a well-sized frame.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 5, 0xff, 0xfe, 0xfd, 0xfc, 0xfb])
        .await
        .unwrap();
    send.finish().unwrap();
    let answer: ResponseFrame = done(frame::read(&mut recv).await.unwrap());
    assert!(matches!(answer, Err(ApiError::BadRequest(_))), "{answer:?}");

    // A length prefix past the limit.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    send.finish().unwrap();
    let answer: ResponseFrame = done(frame::read(&mut recv).await.unwrap());
    match answer {
        Err(ApiError::BadRequest(m)) => assert!(m.contains("exceeds"), "{m}"),
        other => panic!("expected a size refusal, got {other:?}"),
    }

    // A truncated frame: the stream ends mid-body.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 1, 0, 1, 2]).await.unwrap();
    send.finish().unwrap();
    let answer: ResponseFrame = done(frame::read(&mut recv).await.unwrap());
    assert!(matches!(answer, Err(ApiError::BadRequest(_))), "{answer:?}");

    // A stranger speaking raft: refused after its hello, before any raft message is read.
    let raft = ep
        .connect(addr.clone(), blixard_net::RAFT_ALPN)
        .await
        .unwrap();
    let (mut send, mut recv) = raft.open_bi().await.unwrap();
    let cluster: blixard_core::ClusterId = info["cluster_id"].as_str().unwrap().parse().unwrap();
    let hello = blixard_net::raft_transport::Hello {
        cluster,
        from: blixard_core::NodeId(1),
        to: blixard_core::NodeId(1),
        incarnation: None,
        version: None,
    };
    frame::write(&mut send, &hello).await.unwrap();
    let verdict: Result<(), blixard_net::raft_transport::Refusal> =
        frame::read(&mut recv).await.unwrap();
    assert_eq!(
        verdict,
        Err(blixard_net::raft_transport::Refusal::NotMember(
            blixard_core::NodeId(1)
        ))
    );

    // A well-formed request from a stranger: refused by the choke point.
    let client = blixard_net::client::ApiClient::new(ep.clone(), None, Duration::from_secs(10));
    let r = client
        .call(&addr, blixard_net::api::StatusRequest { stale: true })
        .await;
    assert!(
        matches!(
            r,
            Err(blixard_net::client::ClientError::Api(
                ApiError::Unauthorized { .. }
            ))
        ),
        "{r:?}"
    );
    ep.close().await;

    // The node still serves its admin.
    c.nodes[0].status(false).unwrap();
}

fn done(item: ResponseItem) -> ResponseFrame {
    match item {
        ResponseItem::Done(answer) => answer,
        other => panic!("expected an answer, got {other:?}"),
    }
}

/// Runs the CLI against `node` with its own `--timeout`; returns (exit code, stderr).
fn cli_within(node: &Node, secs: u32, args: &[&str]) -> (i32, String) {
    let out = Command::new(binary())
        .arg("--data-dir")
        .arg(&node.dir)
        .args(["--timeout", &secs.to_string()])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn exit_codes_tell_not_found_from_refused_and_no_leader_from_an_unknown_outcome() {
    // Short request timeouts keep the waits of the no-leader cases short.
    let mut c = Cluster::start_each(3, |n| {
        std::fs::create_dir_all(&n.dir).unwrap();
        std::fs::write(n.dir.join("blixard.toml"), "request_timeout_ms = 2000\n").unwrap();
    });
    let n1 = &c.nodes[0];
    // Not found (9): what the request names does not exist.
    for args in [
        &["cluster", "meta", "get", "absent"][..],
        &["vm", "show", "nothing"],
        &["user", "rm", "nobody"],
        &["tenant", "rm", "nobody"],
        &["quota", "show", "nobody"],
    ] {
        let (code, err) = cli_within(n1, 10, args);
        assert_eq!(code, 9, "{args:?}: {err}");
        assert!(err.starts_with("error: not found: no "), "{args:?}: {err}");
    }
    // Refused (5): it exists, and the cluster will not do it.
    let (code, err) = cli_within(n1, 10, &["tenant", "rm", "default"]);
    assert_eq!(code, 5, "{err}");

    // Outcome unknown (10): the leader takes the write but, cut off from both followers,
    // cannot commit it; the retries that follow it find no leader, and the answer stays
    // "unknown" (the first attempt may yet be applied).
    let leader = c.leader();
    for i in (0..3).filter(|i| *i != leader) {
        c.nodes[i].kill9();
    }
    let l = &c.nodes[leader];
    let (code, err) = cli_within(l, 4, &["cluster", "meta", "set", "k", "v"]);
    assert_eq!(code, 10, "{err}");
    assert!(err.contains("may or may not have been applied"), "{err}");

    // No leader (6): nothing happened, for reads and for writes.
    blixard_tests::wait_for(
        "the survivor to know no leader",
        Duration::from_secs(30),
        || {
            let s = l.status(true)?;
            if s["raft"]["leader"].is_null() {
                Ok(())
            } else {
                Err(s["raft"]["leader"].to_string())
            }
        },
    );
    let (code, err) = cli_within(l, 10, &["cluster", "meta", "get", "k"]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("no leader"), "{err}");
    let (code, err) = cli_within(l, 4, &["cluster", "meta", "set", "k2", "v"]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("no leader"), "{err}");
}
