//! Image transfer benchmark: real release `blixard` daemons on loopback.
//!
//! 1. A 1 GiB image (one random file in a plain directory) is imported on node 1.
//! 2. Node 2 pulls it; the fetch time (before unpacking) is compared with a plain TCP copy
//!    of the same bytes, file to file over loopback, measured in the same run.
//! 3. Delivery to 4 nodes, two ways on a fresh image: nodes 2–4 pulling at once from node 1,
//!    and staged (node 2 first, then nodes 3 and 4 from nodes 1 and 2).
//!
//! Run: `cargo build --release --bin blixard && cargo bench -p blixard-tests --bench images`.
//! Env: `BLIXARD_BIN`, `BENCH_IMAGE_MIB` (default 1024).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Instant;

use blixard_tests::bench::{check_binary_fresh, machine};
use blixard_tests::{binary, Cluster, Node};
use serde_json::Value;

const TARGET_RATIO: f64 = 0.8;
const TARGET_DELIVERY: f64 = 2.0;

fn image_mib() -> u64 {
    std::env::var("BENCH_IMAGE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

fn write_random(path: &Path, bytes: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
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

fn pull(node: &Node, image: &str) -> Value {
    let out = node.cli_ok(&["--output", "json", "image", "pull", image]);
    serde_json::from_str(&out).unwrap()
}

fn import(node: &Node, dir: &Path, name: &str) -> f64 {
    let started = Instant::now();
    node.cli_ok(&["image", "import", dir.to_str().unwrap(), "--name", name]);
    started.elapsed().as_secs_f64()
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
    let mib = image_mib();
    let bytes = mib << 20;
    let c = Cluster::start(4, &[]);
    println!("{}", machine(c.root.path()));
    println!("binary {}, image {mib} MiB (one file)\n", bin.display());

    let src = c.root.path().join("image-a");
    std::fs::create_dir_all(&src).unwrap();
    write_random(&src.join("disk.img"), bytes);
    let import_secs = import(&c.nodes[0], &src, "bench-a");

    let tcp_secs = tcp_copy(&src.join("disk.img"), &c.root.path().join("tcp-copy.img"));
    std::fs::remove_file(c.root.path().join("tcp-copy.img")).unwrap();
    let p = pull(&c.nodes[1], "bench-a");
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

    // Delivery to 4 nodes, on fresh images so nothing is cached.
    let single = fetch_secs;
    let mut rows = Vec::new();
    for (name, staged) in [("bench-b", false), ("bench-c", true)] {
        let dir = c.root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        write_random(&dir.join("disk.img"), bytes);
        import(&c.nodes[0], &dir, name);
        std::fs::remove_dir_all(&dir).unwrap();
        let started = Instant::now();
        std::thread::scope(|s| {
            if staged {
                pull(&c.nodes[1], name);
                let a = s.spawn(|| pull(&c.nodes[2], name));
                let b = s.spawn(|| pull(&c.nodes[3], name));
                a.join().unwrap();
                b.join().unwrap();
            } else {
                let hs: Vec<_> = c.nodes[1..]
                    .iter()
                    .map(|n| s.spawn(move || pull(n, name)))
                    .collect();
                for h in hs {
                    h.join().unwrap();
                }
            }
        });
        let secs = started.elapsed().as_secs_f64();
        rows.push((
            if staged {
                "staged: n2, then n3 + n4 from n1 and n2"
            } else {
                "n2, n3, n4 at once from n1"
            },
            secs,
        ));
    }
    println!("\n| delivery to 4 nodes (incl. unpack) | time | × single fetch |");
    println!("|---|---|---|");
    for (what, secs) in &rows {
        println!("| {what} | {secs:.2} s | {:.2} |", secs / single);
    }
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
