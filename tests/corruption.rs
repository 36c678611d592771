//! A damaged data file is refused with exit 7 or served exactly as it was: never a
//! panic, never other data.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use blixard_tests::{binary, env_or, next, Cluster, Node};
use serde_json::Value;

/// redb's page size.
const PAGE: usize = 4096;

/// Everything a client can read back from a one-node cluster, linearizably.
fn contents(node: &Node) -> Value {
    let read = |args: &[&str]| -> Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        serde_json::from_str(&node.cli_ok(&all)).unwrap()
    };
    let mut status = read(&["cluster", "status"]);
    // Addresses and the raft position change with every start; who the members are
    // (ids, keys, roles) must not.
    let members: Vec<Value> = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| serde_json::json!([m["id"], m["endpoint"], m["role"], m["name"]]))
        .collect();
    status = Value::Array(members);
    serde_json::json!({
        "members": status,
        "meta": read(&["cluster", "meta", "get"]),
        "users": read(&["user", "list"]),
        "tenants": read(&["tenant", "list"]),
        "policy": node.cli_ok(&["policy", "show"]),
    })
}

/// `node check-data` on `dir`: its exit code and output.
fn check_data(dir: &Path) -> (i32, String, String) {
    let out = Command::new(binary())
        .arg("--data-dir")
        .arg(dir)
        .args(["--output", "json", "node", "check-data"])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// Bytes flipped in every page of a stopped node's data file, BLIXARD_TEST_FLIPS offsets
/// per page (default 2): `node check-data` on each copy passes with the original state
/// digest or exits 7 with one line. BLIXARD_TEST_STARTS copies (default 24; 0 = all) are
/// also started as daemons: each serves exactly the original data or exits 7.
#[test]
fn every_damaged_page_is_refused_or_served_unchanged() {
    let flips = env_or("BLIXARD_TEST_FLIPS", 2);
    let starts = env_or("BLIXARD_TEST_STARTS", 24);
    let mut seed = env_or("BLIXARD_TEST_SEED", 17);
    eprintln!("seed {seed}, {flips} flips per page, {starts} daemon starts (0 = all)");

    let mut c = Cluster::start(1, &[]);
    {
        let n = &c.nodes[0];
        for i in 0..40 {
            n.cli_ok(&[
                "cluster",
                "meta",
                "set",
                &format!("key{i}"),
                &format!("value {i}"),
            ]);
        }
        n.cli_ok(&["tenant", "create", "acme"]);
        n.cli_ok(&["quota", "set", "acme", "--max-vms", "3", "--max-vcpus", "4"]);
        let key = blixard_net::SecretKey::generate();
        let hex = blixard_net::key_of(&key.public()).to_string();
        n.cli_ok(&[
            "user", "add", "alice", "--key", &hex, "--role", "operator", "--tenant", "acme",
        ]);
        n.cli_ok(&["cluster", "token", "create", "--ttl", "1h"]);
    }
    let truth = contents(&c.nodes[0]);
    assert_eq!(c.nodes[0].stop(), 0);
    let original = c.nodes[0].dir.clone();
    let (code, out, err) = check_data(&original);
    assert_eq!(code, 0, "the undamaged file: {err}");
    let digest = serde_json::from_str::<Value>(&out).unwrap()["state_digest"].clone();

    let db = std::fs::read(original.join("blixard.redb")).unwrap();
    let pages = db.len().div_ceil(PAGE);
    let root = c.root.path().to_path_buf();
    let scratch = root.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let mut refused = 0;
    let mut passed = 0;
    let mut copies = Vec::new();
    for page in 0..pages {
        for _ in 0..flips {
            let len = PAGE.min(db.len() - page * PAGE);
            let at = page * PAGE + (next(&mut seed) as usize) % len;
            let mask = (next(&mut seed) % 255 + 1) as u8;
            let mut damaged = db.clone();
            damaged[at] ^= mask;
            std::fs::write(scratch.join("blixard.redb"), &damaged).unwrap();
            let (code, out, err) = check_data(&scratch);
            copies.push((at, mask));
            match code {
                0 => {
                    let got = serde_json::from_str::<Value>(&out).unwrap()["state_digest"].clone();
                    assert_eq!(
                        got, digest,
                        "byte {at} ^ {mask:#x}: other data passed the check"
                    );
                    passed += 1;
                }
                7 => {
                    assert!(err.starts_with("error: "), "byte {at}: {err}");
                    assert_eq!(err.trim().lines().count(), 1, "byte {at}: {err}");
                    refused += 1;
                }
                _ => panic!("byte {at} ^ {mask:#x}: check-data exited {code}: {err}"),
            }
        }
    }
    eprintln!(
        "{pages} pages, {} copies: {refused} refused, {} passed with the original digest",
        copies.len(),
        passed
    );

    // Daemons on a sample of the damaged copies (those refused and those passed alike).
    let total = copies.len() as u64;
    let want = if starts == 0 {
        total
    } else {
        starts.min(total)
    };
    let (mut served, mut exited) = (0, 0);
    for i in 0..want {
        let pick = if starts == 0 {
            i
        } else {
            next(&mut seed) % total
        };
        let flip = copies[pick as usize];
        let mut node = Node::new(&root, &format!("copy{i}"));
        copy_dir(&original, &node.dir);
        let mut damaged = db.clone();
        damaged[flip.0] ^= flip.1;
        std::fs::write(node.dir.join("blixard.redb"), &damaged).unwrap();
        match node.try_start(&[]) {
            Ok(()) => {
                assert_eq!(
                    contents(&node),
                    truth,
                    "byte {} ^ {:#x} served other data",
                    flip.0,
                    flip.1
                );
                assert_eq!(node.stop(), 0);
                served += 1;
            }
            Err((code, log)) => {
                assert_eq!(code, Some(7), "byte {} ^ {:#x}: {log}", flip.0, flip.1);
                assert!(!log.contains("panicked"), "{log}");
                exited += 1;
            }
        }
    }
    eprintln!("daemons: {served} served the original data, {exited} exited 7");
}
