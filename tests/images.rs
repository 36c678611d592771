//! Process tests for images: a real Nix closure imported on one node of a real cluster,
//! fetched by the others over Iroh, compared byte for byte, served to a real Nix client
//! as a binary cache; corrupt and vanished holders; pinning.
//!
//! Needs Nix (Debian's `nix-bin`; `scripts/test.sh` installs it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use blixard_tests::{random_file, wait_for, Cluster, Node};
use serde_json::Value;

const NIX_CONFIG: &str =
    "experimental-features = nix-command flakes\nsandbox = false\nbuild-users-group =\nsubstituters =";

fn nix_env() {
    // Single-user Nix as root, without a daemon or substituters (see the platform notes).
    std::env::set_var("NIX_CONFIG", NIX_CONFIG);
}

fn nix(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (install Nix: apt-get install nix-bin)", args[0]));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Builds the test closure (two store paths; the runner refers to the lib) and returns
/// the runner's store path.
fn build_closure(tag: &str, big_mib: u32) -> String {
    let expr = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/image-closure.nix");
    nix(&[
        "nix-build",
        expr,
        "--no-out-link",
        "--argstr",
        "tag",
        tag,
        "--arg",
        "big",
        &big_mib.to_string(),
    ])
}

fn closure_of(path: &str) -> Vec<String> {
    nix(&["nix-store", "-qR", path])
        .lines()
        .map(str::to_string)
        .collect()
}

/// Compares two trees: names, kinds, file bytes, executable bits, symlink targets.
fn assert_same_tree(a: &Path, b: &Path) {
    let ma = std::fs::symlink_metadata(a).unwrap();
    let mb =
        std::fs::symlink_metadata(b).unwrap_or_else(|e| panic!("{} is missing: {e}", b.display()));
    assert_eq!(ma.file_type(), mb.file_type(), "{}", b.display());
    if ma.file_type().is_symlink() {
        assert_eq!(
            std::fs::read_link(a).unwrap(),
            std::fs::read_link(b).unwrap(),
            "{}",
            b.display()
        );
    } else if ma.is_file() {
        assert_eq!(
            ma.permissions().mode() & 0o100,
            mb.permissions().mode() & 0o100,
            "executable bit of {}",
            b.display()
        );
        assert!(
            std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
            "contents of {} differ",
            b.display()
        );
    } else {
        let names = |d: &Path| {
            let mut v: Vec<_> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(a), names(b), "entries of {}", b.display());
        for name in names(a) {
            assert_same_tree(&a.join(&name), &b.join(&name));
        }
    }
}

fn assert_closure_in(node: &Node, closure: &[String]) {
    for p in closure {
        let base = Path::new(p).file_name().unwrap();
        assert_same_tree(Path::new(p), &node.store_dir().join(base));
    }
}

fn json(node: &Node, args: &[&str]) -> Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    serde_json::from_str(&node.cli_ok(&all)).unwrap()
}

fn holders(node: &Node, image: &str) -> Vec<u64> {
    let list = json(node, &["image", "list"]);
    list.as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == image)
        .map(|i| ids(&i["holders"]))
        .unwrap_or_default()
}

/// Tests 1 and 2 of the issue: a real closure through a 3-node cluster, and a real Nix
/// client copying it from a node's binary cache with signatures checked.
#[test]
fn a_nix_closure_travels_byte_for_byte_and_nix_copies_it_from_the_cache() {
    nix_env();
    let root = build_closure("travel", 1);
    let closure = closure_of(&root);
    assert_eq!(closure.len(), 2, "{closure:?}");
    let c = Cluster::start(3, &[]);
    let (n1, n2, n3) = (&c.nodes[0], &c.nodes[1], &c.nodes[2]);

    let image = json(n1, &["image", "import", &root, "--name", "web"]);
    assert_eq!(image["root"], root.as_str());
    assert_eq!(image["nar_count"], 2);
    // Pulled through node 1's CLI on node 2 (by id), and by node 3 itself.
    n1.cli_ok(&["--node", "n2", "image", "pull", "web"]);
    let pulled = json(n3, &["image", "pull", "web"]);
    assert_eq!(pulled["fetched_blobs"], 2, "{pulled}");
    assert_closure_in(n2, &closure);
    assert_closure_in(n3, &closure);
    assert_eq!(holders(n1, "web"), vec![1, 2, 3]);
    // Pulling again is a no-op.
    let again = json(n3, &["image", "pull", "web"]);
    assert_eq!(again["fetched_blobs"], 0);

    let show = json(n2, &["image", "show", "web"]);
    let paths: Vec<&str> = show["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    let mut expected: Vec<&str> = closure.iter().map(String::as_str).collect();
    let mut got = paths.clone();
    expected.sort();
    got.sort();
    assert_eq!(got, expected);

    // A real Nix client, into an empty store, with signatures required.
    let key = json(n3, &["image", "cache-key"]);
    let public = key["public_key"].as_str().unwrap().to_string();
    let url = key["url"].as_str().unwrap().to_string();
    let scratch = tempfile::tempdir().unwrap();
    let copy = |store: &Path, trusted: &str| {
        Command::new("nix")
            .args(["copy", "--from", &url, "--to"])
            .arg(store)
            .args(["--option", "trusted-public-keys", trusted])
            .args(["--option", "require-sigs", "true"])
            .args(["--option", "narinfo-cache-negative-ttl", "0"])
            .arg(&root)
            .env("NIX_CONFIG", NIX_CONFIG)
            .env("XDG_CACHE_HOME", scratch.path().join("cache"))
            .output()
            .unwrap()
    };
    let good = scratch.path().join("good");
    let out = copy(&good, &public);
    assert!(
        out.status.success(),
        "nix copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in &closure {
        nix(&[
            "nix-store",
            "--store",
            good.to_str().unwrap(),
            "--verify-path",
            p,
        ]);
        let inside = good.join(p.trim_start_matches('/'));
        assert_same_tree(Path::new(p), &inside);
    }
    let wrong = "blixard-wrong-1:Hb8tKcr5lHMOnm1E2y3zcm0wMjC0VSCUXvBg+zYXxVQ=";
    let out = copy(&scratch.path().join("bad"), wrong);
    assert!(!out.status.success(), "a wrong key must be refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("signature"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The blob data file of `blob` in `node`'s store.
fn blob_file(node: &Node, blob: &str) -> PathBuf {
    node.dir
        .join("blobs")
        .join("data")
        .join(format!("{blob}.data"))
}

/// Test 3: a holder whose copy is corrupt on disk is dropped and reported, the fetch
/// completes from another; with every holder gone the pull fails clearly and leaves
/// nothing in the store dir.
#[test]
fn a_corrupt_holder_is_dropped_and_vanished_holders_are_a_clear_error() {
    nix_env();
    // Large enough to be split into pieces served by both holders.
    let root = build_closure("corrupt", 40);
    let closure = closure_of(&root);
    let mut c = Cluster::start(3, &[]);
    let (n1, n2, n3) = (&c.nodes[0], &c.nodes[1], &c.nodes[2]);
    n1.cli_ok(&["image", "import", &root, "--name", "web"]);
    n2.cli_ok(&["image", "pull", "web"]);

    // Corrupt node 1's copy of the big NAR on disk, every 16 KiB group of it.
    let show = json(n1, &["image", "show", "web"]);
    let big = show["paths"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|p| p["nar_size"].as_u64().unwrap())
        .unwrap()["blob"]
        .as_str()
        .unwrap()
        .to_string();
    let file = blob_file(n1, &big);
    let mut bytes = std::fs::read(&file).unwrap();
    for i in (0..bytes.len()).step_by(16 * 1024) {
        bytes[i] ^= 0xff;
    }
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(&bytes).unwrap();
    }

    let pulled = json(n3, &["image", "pull", "web"]);
    assert_closure_in(n3, &closure);
    let reports = pulled["holders"].as_array().unwrap();
    let n1_report = reports.iter().find(|h| h["node"] == 1).unwrap();
    assert!(
        n1_report["error"].is_string(),
        "node 1 served corrupt data and must be reported: {pulled}"
    );
    let n2_report = reports.iter().find(|h| h["node"] == 2).unwrap();
    assert!(n2_report["error"].is_null(), "{pulled}");

    // A plain directory (a non-Nix host's runner), held only by node 1, which then dies.
    let src = c.root.path().join("lonely");
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::fs::write(src.join("bin/microvm-run"), "#!/bin/sh\necho lonely\n").unwrap();
    std::fs::set_permissions(
        src.join("bin/microvm-run"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let image = json(
        &c.nodes[0],
        &["image", "import", src.to_str().unwrap(), "--name", "lonely"],
    );
    let lonely_root = image["root"].as_str().unwrap().to_string();
    let base = Path::new(&lonely_root).file_name().unwrap().to_owned();
    assert!(base.to_string_lossy().ends_with("-lonely"));
    // Imported plain directories are unpacked on the importing node too.
    assert_same_tree(&src, &c.nodes[0].store_dir().join(&base));
    c.nodes[0].kill9();
    let out = c.nodes[2].cli(&["image", "pull", "lonely"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(
        stderr.contains("n1"),
        "the error names the holder: {stderr}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(c.nodes[2].store_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("lonely") || n.starts_with(".blixard"))
        .collect();
    assert!(leftovers.is_empty(), "partial paths left: {leftovers:?}");
}

/// Imports, on `node`, a plain directory `root/name` holding one file of `mib` MiB of
/// random bytes (`seed`), as image `name`.
fn import_random(node: &Node, root: &Path, name: &str, mib: usize, seed: u64) -> Value {
    let src = root.join(name);
    std::fs::create_dir_all(&src).unwrap();
    random_file(&src.join("disk.img"), mib, seed);
    json(
        node,
        &["image", "import", src.to_str().unwrap(), "--name", name],
    )
}

/// The nodes a pull report lists as having served it.
fn pulled_from(p: &Value) -> Vec<u64> {
    p["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["node"].as_u64().unwrap())
        .collect()
}

/// A config file with short liveness timings, so a killed node is marked down within
/// seconds (the directory must outlive the cluster).
fn fast_liveness() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node.toml");
    std::fs::write(
        &cfg,
        "[vms]\ndown_timeout_ms = 6000\nfence_timeout_ms = 2000\nstop_timeout_ms = 1500\n",
    )
    .unwrap();
    (dir, cfg)
}

/// Waits until `node` sees member `id` marked down.
fn wait_down(node: &Node, id: u64) {
    wait_for(
        &format!("n{id} marked down"),
        Duration::from_secs(30),
        || {
            let nodes = json(node, &["node", "list"]);
            let entry = nodes
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["member"]["id"] == id);
            match entry {
                Some(n) if n["down_since_ms"].is_u64() => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    );
}

/// A holder the leader has marked down is not asked while another is up: the pull
/// neither waits for it nor lists it.
#[test]
fn a_holder_marked_down_is_not_asked_while_another_is_up() {
    nix_env();
    let (_cfg_dir, cfg) = fast_liveness();
    let mut c = Cluster::start(3, &["--config", cfg.to_str().unwrap()]);
    import_random(&c.nodes[0], c.root.path(), "solo", 4, 21);
    c.nodes[1].cli_ok(&["image", "pull", "solo"]);
    c.nodes[1].kill9();
    wait_down(&c.nodes[0], 2);
    let p = json(&c.nodes[2], &["image", "pull", "solo"]);
    assert_eq!(pulled_from(&p), vec![1], "{p}");
    assert_eq!(p["fetched_blobs"], 1, "{p}");
}

/// Node ids from a JSON list.
fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect()
}

/// `image pull --all` delivers in rounds: each holder serves one new puller at a time,
/// so node 2 pulls from node 1, then nodes 3 and 4 from nodes 1 and 2. With `--to`, a
/// node that cannot be reached fails alone, and the command says which; `--all` skips a
/// node marked down.
#[test]
fn pull_to_all_delivers_in_rounds_from_every_holder() {
    nix_env();
    let (_cfg_dir, cfg) = fast_liveness();
    let mut c = Cluster::start(4, &["--config", cfg.to_str().unwrap()]);
    let image = import_random(&c.nodes[0], c.root.path(), "fleet", 8, 11);
    let src = c.root.path().join("fleet");
    let base = Path::new(image["root"].as_str().unwrap())
        .file_name()
        .unwrap()
        .to_owned();

    let d = json(&c.nodes[0], &["image", "pull", "fleet", "--all"]);
    assert_eq!(ids(&d["already"]), vec![1], "{d}");
    assert!(d["failed"].as_array().unwrap().is_empty(), "{d}");
    let pulled = d["pulled"].as_array().unwrap();
    let nodes: Vec<u64> = pulled.iter().map(|p| p["node"].as_u64().unwrap()).collect();
    assert_eq!(nodes, vec![2, 3, 4], "{d}");
    for p in pulled {
        assert_eq!(p["fetched_blobs"], 1, "{p}");
        let from = pulled_from(p);
        // n3 and n4 start once n2 holds it (and one may find the other done already).
        // The image is one 8 MiB piece, which other pullers never serve: a node listed
        // here was a holder when the pull began.
        if p["node"] == 2 {
            assert_eq!(from, vec![1], "{d}");
        } else {
            assert!(
                from.contains(&1) && from.contains(&2),
                "who n{} pulled from: {d}",
                p["node"]
            );
        }
    }
    for node in &c.nodes {
        assert_same_tree(&src, &node.store_dir().join(&base));
    }
    assert_eq!(holders(&c.nodes[0], "fleet"), vec![1, 2, 3, 4]);
    // A node that has every blob serves the next pullers while it unpacks: n3 and n4
    // start before n2's pull has ended.
    import_random(&c.nodes[0], c.root.path(), "fleet1", 8, 13);
    let out = c.nodes[0].cli(&["image", "pull", "fleet1", "--all"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let at = |text: &str| {
        stderr
            .find(text)
            .unwrap_or_else(|| panic!("{text}: {stderr}"))
    };
    assert!(at("n3: pulling") < at("n2 fetched fleet1"), "{stderr}");
    assert!(at("n4: pulling") < at("n2 fetched fleet1"), "{stderr}");
    assert!(
        stderr.contains("delivered fleet1 to 3 of 3 nodes"),
        "{stderr}"
    );

    // Again: nothing to do.
    let again = json(&c.nodes[2], &["image", "pull", "fleet", "--all"]);
    assert_eq!(ids(&again["already"]), vec![1, 2, 3, 4], "{again}");
    assert!(again["pulled"].as_array().unwrap().is_empty(), "{again}");

    // Bad input: a node that is not a member, and --to with --all.
    let out = c.nodes[0].cli(&["image", "pull", "fleet", "--to", "n2,n9"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("n9 is not a member"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.nodes[0].cli(&["image", "pull", "fleet", "--to", "n2", "--all"]);
    assert_eq!(out.status.code(), Some(2));

    // A node that is gone fails alone; the others get the image.
    import_random(&c.nodes[0], c.root.path(), "fleet2", 1, 12);
    c.nodes[3].kill9();
    let out = c.nodes[0].cli(&["image", "pull", "fleet2", "--to", "n4,n2,n3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("n4: failed"), "{stderr}");
    assert!(
        stderr.contains("delivered fleet2 to 2 of 3 nodes"),
        "{stderr}"
    );
    assert!(stderr.contains("1 of 3 pulls failed (n4)"), "{stderr}");
    assert_eq!(holders(&c.nodes[0], "fleet2"), vec![1, 2, 3]);

    // Once the leader marks it down, --all skips it and finds nothing to do.
    wait_down(&c.nodes[0], 4);
    let out = c.nodes[0].cli(&["image", "pull", "fleet2", "--all"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("n4 skipped: marked down"), "{stderr}");
    assert!(stderr.contains("nothing to do"), "{stderr}");
    let d = json(&c.nodes[1], &["image", "pull", "fleet2", "--all"]);
    assert_eq!(ids(&d["skipped_down"]), vec![4], "{d}");
    assert_eq!(ids(&d["already"]), vec![1, 2, 3], "{d}");
}

/// Test 5 (until VMs exist): a pinned image cannot be removed; unpinned it can, and its
/// holders drop it.
#[test]
fn pinned_images_stay_and_removed_images_go() {
    nix_env();
    let c = Cluster::start(1, &[]);
    let n1 = &c.nodes[0];
    let src = c.root.path().join("demo");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello"), "hello\n").unwrap();
    n1.cli_ok(&[
        "image",
        "import",
        src.to_str().unwrap(),
        "--name",
        "demo",
        "--pin",
    ]);
    let out = n1.cli(&["image", "rm", "demo"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pinned"));
    // The same name with other content is refused; the same content is not a new image.
    std::fs::write(src.join("hello"), "changed\n").unwrap();
    let out = n1.cli(&["image", "import", src.to_str().unwrap(), "--name", "demo"]);
    assert_eq!(out.status.code(), Some(5));
    n1.cli_ok(&["image", "unpin", "demo"]);
    n1.cli_ok(&["image", "rm", "demo"]);
    assert!(json(n1, &["image", "list"]).as_array().unwrap().is_empty());
    let out = n1.cli(&["image", "show", "demo"]);
    assert_eq!(out.status.code(), Some(9), "a removed image is not found");
    // Bad input: a relative path through the API, a missing path, a bad name.
    let out = n1.cli(&["image", "import", "/nonexistent/x", "--name", "x"]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = n1.cli(&[
        "image",
        "import",
        src.to_str().unwrap(),
        "--name",
        "Bad Name",
    ]);
    assert_eq!(out.status.code(), Some(5));
}

/// An import tags its blobs before the cluster records the image; a janitor round in
/// between (here every 10 ms, through a 96 MiB import's unpack) must not take them for
/// a removed image's and drop them.
#[test]
fn the_janitor_leaves_an_import_in_flight_alone() {
    nix_env();
    let root = tempfile::tempdir().unwrap();
    // A store path of its own (the cache serves /nix/store paths): 96 MiB of noise.
    let src = root.path().join("janitor-race");
    std::fs::create_dir_all(&src).unwrap();
    random_file(&src.join("disk.img"), 96, 11);
    let path = nix(&["nix-store", "--add", src.to_str().unwrap()]);
    let mut n1 = Node::new(root.path(), "n1");
    std::fs::create_dir_all(&n1.dir).unwrap();
    std::fs::write(
        n1.dir.join("blixard.toml"),
        "[images]\njanitor_interval_ms = 10\n",
    )
    .unwrap();
    n1.env.push((
        "BLIXARD_LOG".into(),
        "info,raft=warn,blixard_node::images=debug".into(),
    ));
    n1.start(&["--init"]);
    n1.cli_ok(&["image", "import", &path, "--name", "big"]);
    // A dropped image leaves the cache's index at once (its blobs go at the next GC).
    let base = Path::new(&path).file_name().unwrap().to_string_lossy();
    let cache = n1.served_at("cache").to_string();
    let info = http(&cache, "GET", &format!("/{}.narinfo", &base[..32]), &[]);
    assert_eq!(info.status, 200, "{}", info.head);
    let log = std::fs::read_to_string(n1.log_path()).unwrap();
    assert!(
        !log.contains("dropping the blobs of a removed image"),
        "the janitor dropped the image being imported:\n{log}"
    );
    // And the janitor did run while the import was under way.
    assert!(
        log.contains("an import is under way"),
        "no janitor round met the import:\n{log}"
    );
}

/// A two-node cluster in `root` whose second node runs with `n2_config` as its
/// `blixard.toml`.
fn two_nodes(root: &Path, n2_config: &str) -> (Node, Node) {
    let mut n1 = Node::new(root, "n1");
    let mut n2 = Node::new(root, "n2");
    std::fs::create_dir_all(&n2.dir).unwrap();
    std::fs::write(n2.dir.join("blixard.toml"), n2_config).unwrap();
    n1.start(&["--init"]);
    let ticket = n1
        .cli_ok(&["cluster", "token", "create"])
        .trim()
        .to_string();
    n2.start(&["--join", &ticket]);
    (n1, n2)
}

/// Writes `mib` MiB of incompressible bytes (different per `seed`).
/// Unpinned images beyond a node's cache size are evicted least-recently-used first;
/// pinned ones stay, and the cluster stops listing the node as their holder.
#[test]
fn images_beyond_the_cache_size_are_evicted_least_recently_used() {
    nix_env();
    let root = tempfile::Builder::new()
        .prefix("blixard-test")
        .tempdir()
        .unwrap();
    let (n1, n2) = two_nodes(root.path(), "[images]\ncache_size_mib = 5\n");
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        let dir = root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        random_file(&dir.join("disk.img"), 2, i as u64 + 1);
        let mut args = vec!["image", "import", dir.to_str().unwrap(), "--name", name];
        if name == "a" {
            args.push("--pin");
        }
        n1.cli_ok(&args);
    }
    // 6 MiB pulled into a 5 MiB cache: b, the least recently used unpinned image, goes.
    for name in ["a", "b", "c"] {
        n2.cli_ok(&["image", "pull", name]);
    }
    wait_for("node 2 to evict b", Duration::from_secs(30), || {
        let held: Vec<(String, Vec<u64>)> = ["a", "b", "c"]
            .iter()
            .map(|n| (n.to_string(), holders(&n1, n)))
            .collect();
        if held
            == [
                ("a".to_string(), vec![1, 2]),
                ("b".to_string(), vec![1]),
                ("c".to_string(), vec![1, 2]),
            ]
        {
            Ok(())
        } else {
            Err(format!("{held:?}"))
        }
    });
    // The node that evicted it can take it back on demand (from its blob store while
    // garbage collection has not yet reclaimed the blobs, else from node 1).
    n2.cli_ok(&["image", "pull", "b"]);
    assert_eq!(holders(&n1, "b"), vec![1, 2]);
}

/// On a host whose store Nix manages (`materialise = "nix"`), a pulled image reaches the
/// store through the node's own binary cache with `nix copy`, signatures checked, so Nix
/// registers every path.
#[test]
fn a_nix_host_gets_images_through_its_own_binary_cache() {
    nix_env();
    let path = build_closure("nixhost", 1);
    let closure = closure_of(&path);
    let root = tempfile::Builder::new()
        .prefix("blixard-test")
        .tempdir()
        .unwrap();
    let store = root.path().join("n2-nix");
    let (n1, n2) = two_nodes(
        root.path(),
        &format!(
            "[images]\nmaterialise = \"nix\"\nnix_store = \"{}\"\n",
            store.display()
        ),
    );
    n1.cli_ok(&["image", "import", &path, "--name", "web"]);
    let pulled = json(&n2, &["image", "pull", "web"]);
    assert_eq!(pulled["materialised"][0], path.as_str(), "{pulled}");
    for p in &closure {
        nix(&[
            "nix-store",
            "--store",
            store.to_str().unwrap(),
            "--verify-path",
            p,
        ]);
        assert_same_tree(Path::new(p), &store.join(p.trim_start_matches('/')));
    }
    // Nothing was unpacked beside Nix.
    assert!(!n2.store_dir().exists() || std::fs::read_dir(n2.store_dir()).unwrap().count() == 0);
}

/// Three nodes pulling one large image at once, from the one node that holds it: each
/// may also take pieces from the others (whatever part of the blob each has verified so
/// far). Every pull completes byte for byte, every byte is accounted to a source that
/// could have it, and all four nodes end up as holders. How many pieces come from the
/// other pullers depends on timing, so it is printed, not asserted (typically a third);
/// the selection itself is unit-tested in `blixard_images::fetch`.
#[test]
fn concurrent_pulls_complete_and_account_for_every_byte() {
    let mut c = Cluster::start(4, &[]);
    let dir = c.root.path().join("big");
    std::fs::create_dir_all(&dir).unwrap();
    // 160 MiB: ten 16 MiB pieces, more than the four streams to the holder take at once.
    random_file(&dir.join("disk.img"), 160, 7);
    let (n1, rest) = c.nodes.split_first_mut().unwrap();
    n1.cli_ok(&["image", "import", dir.to_str().unwrap(), "--name", "big"]);
    let pulls: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = rest
            .iter()
            .map(|n| s.spawn(move || json(n, &["image", "pull", "big"])))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let root = json(n1, &["image", "show", "big"])["image"]["root"]
        .as_str()
        .unwrap()
        .to_string();
    let base = Path::new(&root).file_name().unwrap();
    let original = std::fs::read(dir.join("disk.img")).unwrap();
    for (n, pull) in rest.iter().zip(&pulls) {
        let copy = std::fs::read(n.store_dir().join(base).join("disk.img")).unwrap();
        assert!(copy == original, "{} has different bytes", n.name);
        let fetched = pull["fetched_bytes"].as_u64().unwrap();
        assert!(fetched >= 160 << 20, "{pull}");
        let sources = pull["holders"].as_array().unwrap();
        let served: u64 = sources.iter().map(|s| s["bytes"].as_u64().unwrap()).sum();
        assert_eq!(served, fetched, "{pull}");
        for s in sources {
            let node = s["node"].as_u64().unwrap();
            assert!((1..=4).contains(&node) && node != pull["node"].as_u64().unwrap());
            assert!(s["error"].is_null(), "{pull}");
        }
        eprintln!("{}: {sources:?}", n.name);
    }
    assert_eq!(holders(n1, "big"), vec![1, 2, 3, 4]);
}

// The binary cache under load: every response whole or visibly failed, bounded
// concurrency, timeouts, Range, and running out of file descriptors.

/// A node with `config` as its `blixard.toml`, holding image "big": the test closure
/// tagged `tag`, its lib holding `mib` MiB of noise. Gives the node, its cache's address,
/// the closure's root path, and the lib's NAR: its path on the cache, size and sha256
/// (hex) as the narinfo says.
struct CacheNode {
    _root: tempfile::TempDir,
    node: Node,
    addr: String,
    closure: String,
    nar: String,
    size: u64,
    sha256: String,
}

fn cache_node(tag: &str, config: &str, mib: u32) -> CacheNode {
    cache_node_wrapped(tag, config, mib, None)
}

/// `cache_node`, the daemon started through `wrap`.
fn cache_node_wrapped(tag: &str, config: &str, mib: u32, wrap: Option<Vec<String>>) -> CacheNode {
    nix_env();
    let closure = build_closure(&format!("cache-{tag}"), mib);
    let lib = closure_of(&closure)
        .into_iter()
        .find(|p| p.contains("blixard-test-lib-"))
        .unwrap();
    let root = tempfile::Builder::new()
        .prefix("blixard-test")
        .tempdir()
        .unwrap();
    let mut node = Node::new(root.path(), "n1");
    node.wrap = wrap;
    std::fs::create_dir_all(&node.dir).unwrap();
    std::fs::write(node.dir.join("blixard.toml"), config).unwrap();
    node.start(&["--init"]);
    node.cli_ok(&["image", "import", &closure, "--name", "big"]);
    let url = json(&node, &["image", "cache-key"])["url"]
        .as_str()
        .unwrap()
        .to_string();
    let addr = url.trim_start_matches("http://").to_string();
    let base = Path::new(&lib)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let info = http(&addr, "GET", &format!("/{}.narinfo", &base[..32]), &[]);
    assert_eq!(info.status, 200, "{}", info.head);
    let text = String::from_utf8_lossy(&info.body).into_owned();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .trim()
            .to_string()
    };
    let nix32 = field("NarHash:");
    let sha256 = nix(&[
        "nix-hash",
        "--type",
        "sha256",
        "--to-base16",
        nix32.trim_start_matches("sha256:"),
    ]);
    CacheNode {
        _root: root,
        node,
        addr,
        closure,
        nar: format!("/{}", field("URL:")),
        size: field("NarSize:").parse().unwrap(),
        sha256,
    }
}

/// A response as a plain HTTP/1.1 client sees it.
struct Http {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Http {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// Reads a response head; returns it and the body bytes read with it.
fn read_head(s: &mut std::net::TcpStream) -> (String, Vec<u8>) {
    try_read_head(s).unwrap_or_else(|got| panic!("closed before a response head: {got:?}"))
}

/// `read_head`, or what came before the connection ended without a head.
fn try_read_head(s: &mut std::net::TcpStream) -> Result<(String, Vec<u8>), Vec<u8>> {
    use std::io::Read;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).into_owned();
            return Ok((head, got[end + 4..].to_vec()));
        }
        match s.read(&mut buf) {
            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return Err(got),
        }
    }
}

fn status_of(head: &str) -> u16 {
    head.split(' ').nth(1).unwrap().parse().unwrap()
}

fn send(addr: &str, method: &str, path: &str, headers: &[&str]) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: cache\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s
}

/// One request on its own connection; the body is whatever came before the server
/// closed it.
fn http(addr: &str, method: &str, path: &str, headers: &[&str]) -> Http {
    use std::io::Read;
    let mut s = send(addr, method, path, headers);
    let (head, mut body) = read_head(&mut s);
    let _ = s.read_to_end(&mut body);
    Http {
        status: status_of(&head),
        head,
        body,
    }
}

/// What one download of a NAR came to.
#[derive(Debug, PartialEq)]
enum Download {
    /// 200, every byte the head announced, and the sha256 (hex) of them.
    Whole(String),
    /// 503 with a Retry-After.
    Refused,
    /// Anything else: the status, what the head announced, and the bytes that came.
    Other(u16, Option<u64>, u64),
    /// The connection ended before a response head.
    NoHead,
}

/// Downloads `path`, hashing as it reads.
fn download(addr: &str, path: &str) -> Download {
    use sha2::Digest;
    use std::io::Read;
    let mut s = send(addr, "GET", path, &[]);
    let Ok((head, first)) = try_read_head(&mut s) else {
        return Download::NoHead;
    };
    let status = status_of(&head);
    let length: Option<u64> = head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    });
    if status == 503 && head.to_ascii_lowercase().contains("retry-after:") {
        return Download::Refused;
    }
    let mut hasher = sha2::Sha256::new();
    hasher.update(&first);
    let mut got = first.len() as u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                got += n as u64;
            }
        }
    }
    if status == 200 && length == Some(got) {
        let hex: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Download::Whole(hex)
    } else {
        Download::Other(status, length, got)
    }
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What `clients` downloads of `c`'s NAR at once came to: how many were whole, how many
/// refused, the rest, and how long they took.
struct Parallel {
    whole: usize,
    refused: usize,
    bad: Vec<Download>,
    took: Duration,
}

fn parallel_downloads(c: &CacheNode, clients: usize) -> Parallel {
    let started = std::time::Instant::now();
    let outcomes: Vec<Download> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| s.spawn(|| download(&c.addr, &c.nar)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let took = started.elapsed();
    let want = Download::Whole(c.sha256.clone());
    let whole = outcomes.iter().filter(|o| **o == want).count();
    let refused = outcomes.iter().filter(|o| **o == Download::Refused).count();
    let bad = outcomes
        .into_iter()
        .filter(|o| *o != Download::Refused && *o != want)
        .collect();
    let busy = c
        .node
        .log()
        .lines()
        .filter(|l| l.contains("inbox is full"))
        .count();
    eprintln!(
        "{clients} downloads of a {} byte NAR: {whole} whole, {refused} refused (503), in {took:?}; the blob store said busy {busy} times",
        c.size
    );
    Parallel {
        whole,
        refused,
        bad,
        took,
    }
}

/// 200 clients download one large NAR at once from a node with the default limits: each
/// download is whole (its sha256 the narinfo's NarHash) or refused with 503, never a 200
/// cut short. BLIXARD_TEST_CACHE_MIB and BLIXARD_TEST_CACHE_CLIENTS make it heavier
/// (e.g. 200 MiB, as the report that found the cut bodies used).
#[test]
fn parallel_nar_downloads_are_whole_or_refused() {
    let (mib, clients) = (
        env_or("BLIXARD_TEST_CACHE_MIB", 24),
        env_or("BLIXARD_TEST_CACHE_CLIENTS", 200),
    );
    let c = cache_node(&format!("parallel-{mib}"), "", mib as u32);
    let p = parallel_downloads(&c, clients);
    assert!(
        p.bad.is_empty(),
        "{} neither whole nor 503: {:?}",
        p.bad.len(),
        p.bad
    );
    assert!(
        p.whole >= 32.min(clients),
        "at least the 32 streams the cache takes at once: {}",
        p.whole
    );
    // The refusals are logged, but not one line each.
    let log = c.node.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("refusing NAR downloads"))
        .count();
    assert!(p.refused == 0 || lines >= 1, "{log}");
    assert!(
        lines <= 1 + p.took.as_secs() as usize / 10,
        "{lines} lines for {} refusals",
        p.refused
    );
    assert!(!log.contains("aborting a response"), "{log}");
}

/// With the stream limit above the blob store's queue for one blob (32), 200 downloads
/// of one NAR at once are all whole: a body whose read the store turns away as busy asks
/// again (how often the store said busy is printed; it varies from run to run).
#[test]
fn parallel_nar_downloads_beyond_the_store_queue_are_whole() {
    let clients = env_or("BLIXARD_TEST_CACHE_CLIENTS", 200);
    let c = cache_node(
        "parallel-queue",
        "[images]\ncache_max_connections = 256\ncache_max_streams = 256\n",
        8,
    );
    let p = parallel_downloads(&c, clients);
    assert_eq!(
        (p.whole, p.refused),
        (clients, 0),
        "{} not whole: {:?}",
        p.bad.len(),
        p.bad
    );
    let log = c.node.log();
    assert!(!log.contains("aborting a response"), "{log}");
}

/// Range requests return exactly the slices of the whole NAR; an unsatisfiable one is 416.
#[test]
fn nar_ranges_are_slices_of_the_whole() {
    let c = cache_node("ranges", "", 3);
    let full = http(&c.addr, "GET", &c.nar, &[]);
    assert_eq!(full.status, 200);
    assert_eq!(full.header("accept-ranges").as_deref(), Some("bytes"));
    assert_eq!(full.body.len() as u64, c.size);
    let size = full.body.len();
    for (range, want) in [
        ("bytes=0-1023", 0..1024),
        ("bytes=1048576-2097151", 1 << 20..2 << 20),
        ("bytes=3000000-", 3_000_000..size),
        ("bytes=-100", size - 100..size),
        ("bytes=17-17", 17..18),
    ] {
        let part = http(&c.addr, "GET", &c.nar, &[&format!("Range: {range}")]);
        assert_eq!(part.status, 206, "{range}: {}", part.head);
        assert_eq!(
            part.header("content-range").unwrap(),
            format!("bytes {}-{}/{size}", want.start, want.end - 1)
        );
        assert!(part.body == full.body[want], "{range}: other bytes");
    }
    for range in [
        format!("bytes={size}-"),
        "bytes=10-5".to_string(),
        "bytes=-0".to_string(),
    ] {
        let bad = http(&c.addr, "GET", &c.nar, &[&format!("Range: {range}")]);
        assert_eq!(bad.status, 416, "{range}");
        assert_eq!(
            bad.header("content-range").unwrap(),
            format!("bytes */{size}")
        );
    }
}

/// Raises this test's open-file limit to its hard limit (it opens over a thousand
/// sockets).
fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let l = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: l.maximum,
            maximum: l.maximum,
        },
    );
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Connections waiting in the accept queue of the listener on 127.0.0.1:`port`.
fn accept_queue(port: u16) -> usize {
    let local = format!("0100007F:{port:04X}");
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    tcp.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // For a listener (state 0A), rx_queue is its accept queue.
            if f.get(1) != Some(&local.as_str()) || f.get(3) != Some(&"0A") {
                return None;
            }
            usize::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok()
        })
        .unwrap_or_else(|| panic!("no listener on port {port}"))
}

/// 1000 idle connections (900 that never send a byte, 100 kept alive after a request)
/// and 100 that send half a request head are all closed by the server in time (short
/// timeouts here: 1 s for a head, 2 s idle), and their descriptors released, while a
/// normal request is answered meanwhile.
#[test]
fn idle_and_half_sent_connections_are_closed_in_time() {
    use std::io::{Read, Write};
    use std::time::Instant;
    raise_nofile();
    let (header, idle) = (Duration::from_millis(1000), Duration::from_millis(2000));
    let c = cache_node(
        "idle",
        &format!(
            "[images]\ncache_header_timeout_ms = {}\ncache_idle_timeout_ms = {}\ncache_max_connections = 2000\n",
            header.as_millis(),
            idle.as_millis()
        ),
        1,
    );
    let pid = c.node.pid().unwrap();
    let port: u16 = c.addr.rsplit(':').next().unwrap().parse().unwrap();
    let fds_before = open_fds(pid);
    let slack = Duration::from_secs(2);
    // Each connection is watched by a thread of its own from the moment it opens: its
    // kind, its timeout, and how long the server took to close it (None: not in time).
    let closed: Vec<(&str, Duration, Option<Duration>)> = std::thread::scope(|scope| {
        let mut watchers = Vec::new();
        for i in 0..1100 {
            // Paced so the listen queue never overflows: a connection the kernel had to
            // hold back would be accepted seconds after the client thinks it connected.
            if i % 50 == 0 {
                wait_for(
                    "the cache to accept",
                    Duration::from_secs(10),
                    || match accept_queue(port) {
                        0 => Ok(()),
                        n => Err(format!("{n} waiting")),
                    },
                );
            }
            let mut s = std::net::TcpStream::connect(&c.addr).unwrap();
            let (kind, timeout) = if i < 900 {
                ("silent", header)
            } else if i < 1000 {
                s.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: cache\r\n\r\n")
                    .unwrap();
                let (head, mut body) = read_head(&mut s);
                let len: usize = Http {
                    status: status_of(&head),
                    head,
                    body: Vec::new(),
                }
                .header("content-length")
                .unwrap()
                .parse()
                .unwrap();
                while body.len() < len {
                    let mut buf = [0u8; 512];
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0);
                    body.extend_from_slice(&buf[..n]);
                }
                ("kept-alive", idle)
            } else {
                s.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: cach")
                    .unwrap();
                ("half-sent", header)
            };
            let since = Instant::now();
            let watcher = std::thread::Builder::new()
                .stack_size(64 << 10)
                .spawn_scoped(scope, move || {
                    let ok = closed_within(&mut s, timeout + slack);
                    (kind, timeout, ok.then(|| since.elapsed()))
                })
                .unwrap();
            watchers.push(watcher);
        }
        let ok = http(&c.addr, "GET", "/nix-cache-info", &[]);
        assert_eq!(ok.status, 200, "a normal request meanwhile");
        watchers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut took_by_kind: std::collections::BTreeMap<&str, (Duration, Duration)> =
        Default::default();
    for (i, (kind, timeout, took)) in closed.into_iter().enumerate() {
        let took = took.unwrap_or_else(|| panic!("{kind} connection {i} still open"));
        // Not closed before its timeout (the server's clock may start a little before
        // ours: it counts from accepting).
        assert!(
            took + Duration::from_millis(50) >= timeout,
            "{kind} connection {i} closed after {took:?}"
        );
        let e = took_by_kind
            .entry(kind)
            .or_insert((Duration::MAX, Duration::ZERO));
        *e = (e.0.min(took), e.1.max(took));
    }
    eprintln!("closed (fastest, slowest): {took_by_kind:?}");
    wait_for("the descriptors released", Duration::from_secs(5), || {
        let now = open_fds(pid);
        if now <= fds_before + 5 {
            Ok(())
        } else {
            Err(format!("{now} open, {fds_before} before"))
        }
    });
}

/// Eight `nix copy` processes at once, each with 64 parallel connections and signatures
/// required, from a cache that sends two NARs at a time: Nix takes the 503s it gets as
/// the transient errors they are and asks again, and every copy completes.
#[test]
fn nix_copies_from_the_cache_over_64_connections() {
    let c = cache_node("conns64-0", "[images]\ncache_max_streams = 2\n", 8);
    let mut roots = vec![c.closure.clone()];
    for i in 1..8 {
        let root = build_closure(&format!("cache-conns64-{i}"), 8);
        c.node
            .cli_ok(&["image", "import", &root, "--name", &format!("web{i}")]);
        roots.push(root);
    }
    let key = json(&c.node, &["image", "cache-key"]);
    let scratch = tempfile::tempdir().unwrap();
    let copies: Vec<_> = roots
        .iter()
        .enumerate()
        .map(|(i, root)| {
            let store = scratch.path().join(format!("store{i}"));
            let child = Command::new("nix")
                .args(["copy", "--from", key["url"].as_str().unwrap(), "--to"])
                .arg(&store)
                .args([
                    "--option",
                    "trusted-public-keys",
                    key["public_key"].as_str().unwrap(),
                ])
                .args(["--option", "require-sigs", "true"])
                .args(["--option", "http-connections", "64"])
                .args(["--option", "narinfo-cache-negative-ttl", "0"])
                .arg(root)
                .env("NIX_CONFIG", NIX_CONFIG)
                .env("XDG_CACHE_HOME", scratch.path().join(format!("cache{i}")))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (root, store, child)
        })
        .collect();
    for (root, store, child) in copies {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nix copy {root}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for p in closure_of(root) {
            nix(&[
                "nix-store",
                "--store",
                store.to_str().unwrap(),
                "--verify-path",
                &p,
            ]);
        }
    }
    let log = c.node.log();
    assert!(!log.contains("aborting a response"), "{log}");
    for l in log.lines().filter(|l| l.contains("refusing NAR downloads")) {
        eprintln!("{l}");
    }
}

/// The soft and hard open-file limits of process `pid`.
fn nofile_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut f = line["Max open files".len()..].split_whitespace();
    (f.next().unwrap().into(), f.next().unwrap().into())
}

/// Whether the server ends `s` (a response, then the close; or a reset) within `within`.
fn closed_within(s: &mut std::net::TcpStream, within: Duration) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// The daemon raises its open-file limit to the hard limit (it is started with a soft
/// limit of 512 here). With few descriptors left, the cache refuses connections at once
/// (one log line for the run) and leaves the rest to the API, which keeps answering;
/// with none left, accept fails, the connection waits in the listen queue (again one
/// line however often accept fails) and is served once descriptors are back.
#[test]
fn out_of_descriptors_the_cache_refuses_and_the_api_keeps_working() {
    use rustix::process::{prlimit, Pid, Resource, Rlimit};
    let wrap = ["sh", "-c", "ulimit -Sn 512 && \"$0\" \"$@\""]
        .map(String::from)
        .to_vec();
    let c = cache_node_wrapped("fds", "", 1, Some(wrap));
    let pid = c.node.pid().unwrap();
    let (soft, hard) = nofile_limits(pid);
    assert_eq!(
        soft, hard,
        "the daemon raised its soft limit to the hard one"
    );
    assert_ne!(soft, "512");
    let rpid = Pid::from_raw(pid as i32);
    let hard: u64 = hard.parse().unwrap();
    let raised = Rlimit {
        current: Some(hard),
        maximum: Some(hard),
    };
    let set_soft = |soft: u64| {
        prlimit(
            rpid,
            Resource::Nofile,
            Rlimit {
                current: Some(soft),
                maximum: raised.maximum,
            },
        )
        .unwrap();
    };
    let lines = |what: &str| c.node.log().lines().filter(|l| l.contains(what)).count();
    const SHORT: &str = "binary cache: out of file descriptors";
    const AGAIN: &str = "binary cache: accepting connections again";

    // Few left: 50 connections, each refused at once; the API answers meanwhile.
    set_soft(open_fds(pid) as u64 + 60);
    let mut refused: Vec<_> = (0..50)
        .map(|_| send(&c.addr, "GET", "/nix-cache-info", &[]))
        .collect();
    for (i, s) in refused.iter_mut().enumerate() {
        assert!(
            closed_within(s, Duration::from_secs(5)),
            "connection {i} still open"
        );
    }
    c.node.cli_ok(&["cluster", "status"]);
    assert_eq!(lines(SHORT), 1, "{}", c.node.log());
    prlimit(rpid, Resource::Nofile, raised).unwrap();
    assert_eq!(http(&c.addr, "GET", "/nix-cache-info", &[]).status, 200);
    assert_eq!(lines(AGAIN), 1, "{}", c.node.log());

    // None left (0 to 2 are always open): accept fails over and over; the connection
    // waits, and one line says so.
    set_soft(3);
    let mut waiting = send(&c.addr, "GET", "/nix-cache-info", &[]);
    wait_for("the cache to run out", Duration::from_secs(10), || {
        if lines("cannot accept connections") == 1 {
            Ok(())
        } else {
            Err(c.node.log())
        }
    });
    assert!(
        !closed_within(&mut waiting, Duration::from_secs(1)),
        "the connection waits in the listen queue"
    );
    prlimit(rpid, Resource::Nofile, raised).unwrap();
    let (head, _) = read_head(&mut waiting);
    assert_eq!(status_of(&head), 200, "served once descriptors are back");
    c.node.cli_ok(&["cluster", "status"]);
    let log = c.node.log();
    assert_eq!(lines(SHORT), 2, "one line per run: {log}");
    assert_eq!(lines(AGAIN), 2, "{log}");
    let waited: u64 = log
        .lines()
        .rfind(|l| l.contains(AGAIN))
        .and_then(|l| l.split("after ").nth(1)?.split(' ').next()?.parse().ok())
        .unwrap();
    assert!(
        waited >= 1000,
        "accept failed for {waited} ms: more than once"
    );
    for l in log.lines().filter(|l| l.contains("binary cache")) {
        eprintln!("{l}");
    }
}

/// A daemon started with a relative `--data-dir` (its cwd's) imports images: the blob
/// store once failed with "adding a NAR: Error::Io" there.
#[test]
fn a_relative_data_dir_holds_images() {
    let root = tempfile::Builder::new()
        .prefix("blixard-reldir")
        .tempdir()
        .unwrap();
    let image = root.path().join("img");
    blixard_tests::runners::write_runner(&image, "exec sleep 600");
    let store = root.path().join("store");
    let port = blixard_tests::free_port();
    let mut daemon = Command::new(blixard_tests::binary())
        .current_dir(root.path())
        .args(["node", "run", "--data-dir", "rel", "--init", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args([
            "--cache-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--store-dir",
        ])
        .arg(&store)
        .stderr(std::fs::File::create(root.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    wait_for("the node to serve", Duration::from_secs(30), || {
        if root.path().join("rel/node.json").exists() {
            Ok(())
        } else {
            Err(std::fs::read_to_string(root.path().join("log")).unwrap_or_default())
        }
    });
    let out = Command::new(blixard_tests::binary())
        .current_dir(root.path())
        .args(["--data-dir", "rel", "image", "import"])
        .arg(&image)
        .args(["--name", "web"])
        .output()
        .unwrap();
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
