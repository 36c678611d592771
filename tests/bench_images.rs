//! Image transfer benchmark: real release `blixard` daemons on loopback.
//!
//! 1. A 1 GiB image (one random file in a plain directory) is imported on node 1.
//! 2. Node 2 pulls it; the fetch time (before unpacking) is compared with a plain TCP copy
//!    of the same bytes, file to file over loopback, measured in the same run.
//! 3. Delivery to 4 nodes, two ways on a fresh image: nodes 2–4 pulling at once from node 1,
//!    and `image pull --all`, which stages it (node 2 first, then nodes 3 and 4 from
//!    nodes 1 and 2).
//!
//! Run: `cargo build --release --bin blixard && cargo bench -p blixard-tests --bench images`.
//! Env: `BLIXARD_BIN`, `BENCH_IMAGE_MIB` (default 1024), `BENCH_UPLINK_MBIT` (below).
//!
//! On one machine every node shares its CPUs, so the transfers are CPU-bound. With
//! `BENCH_UPLINK_MBIT=N` (root, `unshare` and `tc` needed) the bench re-runs itself in a
//! private network namespace and caps what each daemon sends at N Mbit/s (an htb class on
//! its UDP port on loopback), as if each node were a host behind a link of that speed:
//! the regime where a holder's uplink, not the CPU, is the limit.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Instant;

use blixard_tests::bench::{check_binary_fresh, machine};
use blixard_tests::{binary, clock_ticks_per_sec, cpu_ticks, Cluster, Node};
use serde_json::Value;

const TARGET_RATIO: f64 = 0.8;
const TARGET_DELIVERY: f64 = 2.0;

fn image_mib() -> u64 {
    std::env::var("BENCH_IMAGE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

/// Writes `bytes` incompressible bytes, different for each `seed`: images with the same
/// bytes share their NAR blob, and a node holding one would fetch nothing for the other.
fn write_random(path: &Path, bytes: u64, seed: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut state: u64 = (0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9)) | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            // xorshift: incompressible, cheap.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}

/// Copies `src` to `dst` through a loopback TCP connection; returns seconds.
fn tcp_copy(src: &Path, dst: &Path) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let src = src.to_owned();
    let started = Instant::now();
    let sender = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut f = std::fs::File::open(src).unwrap();
        std::io::copy(&mut f, &mut conn).unwrap();
    });
    let mut conn = TcpStream::connect(addr).unwrap();
    let mut out = std::fs::File::create(dst).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = conn.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).unwrap();
    }
    out.sync_all().ok();
    sender.join().unwrap();
    started.elapsed().as_secs_f64()
}

fn pull(node: &Node, image: &str, bytes: u64) -> Value {
    let out = node.cli_ok(&["--output", "json", "image", "pull", image]);
    let p: Value = serde_json::from_str(&out).unwrap();
    fetched_all(&p, bytes);
    p
}

/// A pull that found the bytes already on the node measures nothing: make sure it did not.
fn fetched_all(p: &Value, bytes: u64) {
    let fetched = p["fetched_bytes"].as_u64().unwrap();
    assert!(
        fetched >= bytes,
        "n{} fetched only {fetched} bytes: {p}",
        p["node"]
    );
}

fn import(node: &Node, dir: &Path, name: &str) -> f64 {
    let started = Instant::now();
    node.cli_ok(&["image", "import", dir.to_str().unwrap(), "--name", name]);
    started.elapsed().as_secs_f64()
}

/// CPU seconds the cluster's daemons have used so far.
fn daemons_cpu(c: &Cluster) -> f64 {
    let pids: Vec<u32> = c.nodes.iter().filter_map(Node::pid).collect();
    cpu_ticks(&pids) as f64 / clock_ticks_per_sec()
}

fn uplink_mbit() -> Option<u32> {
    let v = std::env::var("BENCH_UPLINK_MBIT").ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("BENCH_UPLINK_MBIT={v:?} is not a number")),
    )
}

/// Runs `program args`, panicking with its stderr if it fails.
fn run(program: &str, args: &[&str]) {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Re-runs this bench in a private network namespace (so the shaping below touches nothing
/// else) and exits with its status; returns inside the namespace.
fn enter_netns() {
    if std::env::var_os("BENCH_IN_NETNS").is_some() {
        run("ip", &["link", "set", "lo", "up"]);
        return;
    }
    let status = std::process::Command::new("unshare")
        .arg("--net")
        .arg("--")
        .arg(std::env::current_exe().unwrap())
        .args(std::env::args_os().skip(1))
        .env("BENCH_IN_NETNS", "1")
        .status()
        .unwrap_or_else(|e| panic!("unshare: {e}"));
    std::process::exit(status.code().unwrap_or(1));
}

/// Caps what each node sends on loopback at `mbit`: one htb class per node, chosen by the
/// source port of its UDP socket (iroh sends everything from it).
fn shape(nodes: &[Node], mbit: u32) {
    run(
        "tc",
        &[
            "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "r2q", "1000",
        ],
    );
    for (i, node) in nodes.iter().enumerate() {
        let class = format!("1:{}", 10 + i);
        let rate = format!("{mbit}mbit");
        run(
            "tc",
            &[
                "class", "add", "dev", "lo", "parent", "1:", "classid", &class, "htb", "rate",
                &rate, "ceil", &rate,
            ],
        );
        let port = node.port.to_string();
        for (proto, prio, matcher) in [("ip", "1", "ip"), ("ipv6", "2", "ip6")] {
            run(
                "tc",
                &[
                    "filter", "add", "dev", "lo", "parent", "1:", "protocol", proto, "prio", prio,
                    "u32", "match", matcher, "sport", &port, "0xffff", "flowid", &class,
                ],
            );
        }
    }
}

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let bin = binary();
    check_binary_fresh(&bin);
    let uplink = uplink_mbit();
    if uplink.is_some() {
        enter_netns();
    }
    let mib = image_mib();
    let bytes = mib << 20;
    let c = Cluster::start(4, &[]);
    println!("{}", machine(c.root.path()));
    println!("binary {}, image {mib} MiB (one file)", bin.display());
    match uplink {
        Some(mbit) => {
            shape(&c.nodes, mbit);
            println!("each node's sending capped at {mbit} Mbit/s (the TCP copy is not)\n");
        }
        None => println!(),
    }

    let src = c.root.path().join("image-a");
    std::fs::create_dir_all(&src).unwrap();
    write_random(&src.join("disk.img"), bytes, 1);
    let import_secs = import(&c.nodes[0], &src, "bench-a");

    let tcp_secs = tcp_copy(&src.join("disk.img"), &c.root.path().join("tcp-copy.img"));
    std::fs::remove_file(c.root.path().join("tcp-copy.img")).unwrap();
    let cpu_before = daemons_cpu(&c);
    let p = pull(&c.nodes[1], "bench-a", bytes);
    let pull_cpu = daemons_cpu(&c) - cpu_before;
    let fetch_secs = p["fetch_millis"].as_u64().unwrap() as f64 / 1000.0;
    let total_secs = p["millis"].as_u64().unwrap() as f64 / 1000.0;
    let ratio = tcp_secs / fetch_secs;

    println!("| what | time | rate |");
    println!("|---|---|---|");
    println!(
        "| import on node 1 (NAR + blob store) | {import_secs:.2} s | {:.0} MiB/s |",
        mib_s(bytes, import_secs)
    );
    println!(
        "| plain TCP copy, file to file, loopback | {tcp_secs:.2} s | {:.0} MiB/s |",
        mib_s(bytes, tcp_secs)
    );
    println!(
        "| fetch node 1 → node 2 (blobs over Iroh) | {fetch_secs:.2} s | {:.0} MiB/s |",
        mib_s(bytes, fetch_secs)
    );
    println!(
        "| pull incl. unpack into the store dir | {total_secs:.2} s | {:.0} MiB/s |",
        mib_s(bytes, total_secs)
    );
    if uplink.is_some() {
        println!(
            "\nfetch / TCP throughput: not comparable (the fetch is capped, the TCP copy is not)"
        );
    } else {
        println!(
            "\nfetch / TCP throughput: {:.0} % (target ≥ {:.0} %) {}",
            ratio * 100.0,
            TARGET_RATIO * 100.0,
            if ratio >= TARGET_RATIO {
                "met"
            } else {
                "NOT met"
            }
        );
    }

    // Delivery to 4 nodes, on fresh images so nothing is cached.
    let single = fetch_secs;
    let mut rows = Vec::new();
    for (seed, name, staged) in [(2, "bench-b", false), (3, "bench-c", true)] {
        let dir = c.root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        write_random(&dir.join("disk.img"), bytes, seed);
        import(&c.nodes[0], &dir, name);
        std::fs::remove_dir_all(&dir).unwrap();
        let cpu_before = daemons_cpu(&c);
        let started = Instant::now();
        if staged {
            // Blixard's own delivery: each holder serves one new puller at a time.
            let out = c.nodes[0].cli_ok(&["--output", "json", "image", "pull", name, "--all"]);
            let d: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(d["already"], serde_json::json!([1]), "{d}");
            assert_eq!(d["pulled"].as_array().unwrap().len(), 3, "{d}");
            for p in d["pulled"].as_array().unwrap() {
                fetched_all(p, bytes);
                eprintln!(
                    "  n{} pulled in {:.2} s (fetch {:.2} s) from {}",
                    p["node"],
                    p["millis"].as_f64().unwrap() / 1000.0,
                    p["fetch_millis"].as_f64().unwrap() / 1000.0,
                    p["holders"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|h| format!("n{}", h["node"]))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        } else {
            std::thread::scope(|s| {
                let hs: Vec<_> = c.nodes[1..]
                    .iter()
                    .map(|n| s.spawn(move || pull(n, name, bytes)))
                    .collect();
                for h in hs {
                    h.join().unwrap();
                }
            });
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu = daemons_cpu(&c) - cpu_before;
        rows.push((
            if staged {
                "`image pull --all`: n2, then n3 + n4 from n1 and n2"
            } else {
                "n2, n3, n4 at once from n1"
            },
            secs,
            cpu,
        ));
    }
    // The daemons' CPU time divided by the CPUs is as fast as that work could go here,
    // however it was scheduled.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    println!(
        "\n| delivery to 4 nodes (incl. unpack) | time | × single fetch | × single pull | daemons' CPU | CPU ÷ {cpus} CPUs, × single fetch |"
    );
    println!("|---|---|---|---|---|---|");
    for (what, secs, cpu) in &rows {
        println!(
            "| {what} | {secs:.2} s | {:.2} | {:.2} | {cpu:.1} s | {:.2} |",
            secs / single,
            secs / total_secs,
            cpu / cpus / single
        );
    }
    println!("\nthe single pull used {pull_cpu:.1} CPU-seconds across the daemons");
    let best = rows.iter().map(|r| r.1).fold(f64::INFINITY, f64::min);
    println!(
        "\nbest delivery: {:.2} × a single fetch (target ≤ {TARGET_DELIVERY:.0} ×) {}",
        best / single,
        if best / single <= TARGET_DELIVERY {
            "met"
        } else {
            "NOT met"
        }
    );
}
