//! Image transfer benchmark: real release `blixard` daemons on loopback, and the real
//! peers in the same run.
//!
//! 1. A 1 GiB image (a Nix store path of one incompressible file, built from
//!    `fixtures/bench-closure.nix`) is imported on node 1, whose store dir is `/nix/store`
//!    (so, as on a NixOS host, the import need not unpack it).
//! 2. Node 2 pulls it; the fetch time (before unpacking) is compared with a plain TCP copy
//!    of the same bytes, file to file over loopback, and with `iperf3` on loopback.
//! 3. Delivery to 4 nodes, two ways on a fresh image: nodes 2–4 pulling at once from node 1,
//!    and `image pull --all`, which stages it (node 2 first, then nodes 3 and 4 from
//!    nodes 1 and 2).
//! 4. The binary cache against nginx: two closures (one store path of one 1 GiB file; 64
//!    paths of 64 files each, 1 GiB in all) imported on node 1 and written with
//!    `nix copy --to file://…` for Debian's nginx to serve; then every NAR fetched with
//!    curl over 1 and 16 connections, and the closure copied into an empty store with
//!    `nix copy --from` (best of three, alternating), from each.
//!
//! Run: `scripts/bench-images.sh` (installs nginx, iperf3 and Nix when missing), or
//! `cargo build --release --bin blixard && cargo bench -p blixard-tests --bench images`.
//! Env: `BLIXARD_BIN`, `BENCH_IMAGE_MIB` (default 1024), `BENCH_UPLINK_MBIT` (below),
//! `BENCH_CACHE=0` to leave out step 4.
//!
//! On one machine every node shares its CPUs, so the transfers are CPU-bound. With
//! `BENCH_UPLINK_MBIT=N` (root, `unshare` and `tc` needed) the bench re-runs itself in a
//! private network namespace and caps what each daemon sends at N Mbit/s (an htb class on
//! its UDP port on loopback), as if each node were a host behind a link of that speed:
//! the regime where a holder's uplink, not the CPU, is the limit.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blixard_tests::bench::{check_binary_fresh, machine};
use blixard_tests::{binary, clock_ticks_per_sec, cpu_ticks, Cluster, Node};
use serde_json::Value;

const TARGET_RATIO: f64 = 0.8;
const TARGET_DELIVERY: f64 = 1.3;
const TARGET_CACHE: f64 = 0.8;

/// Single-user Nix as root, without a daemon or substituters (the platform notes).
const NIX_CONFIG: &str =
    "experimental-features = nix-command flakes\nsandbox = false\nbuild-users-group =\nsubstituters =";

fn image_mib() -> u64 {
    std::env::var("BENCH_IMAGE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

fn run_nix(cmd: &mut Command) -> String {
    let out = cmd
        .env("NIX_CONFIG", NIX_CONFIG)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (install Nix: apt-get install nix-bin)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A closure in the host's Nix store: its root, and each path with its NAR size.
struct Closure {
    root: String,
    paths: Vec<(String, u64)>,
}

impl Closure {
    fn bytes(&self) -> u64 {
        self.paths.iter().map(|p| p.1).sum()
    }

    /// The one store path holding data (the closures of steps 1–3).
    fn part(&self) -> &str {
        &self
            .paths
            .iter()
            .find(|p| p.0.contains("-blixard-bench-part-"))
            .unwrap()
            .0
    }
}

/// Builds `fixtures/bench-closure.nix`: `paths` store paths of `files` incompressible
/// files, `mib` MiB each, under a root. Each `tag` has bytes of its own: images with the
/// same bytes share their NAR blobs, and a node holding one would fetch nothing for the
/// other. Built once per tag and size; later runs find the paths in the store.
fn closure(tag: &str, paths: u32, files: u32, mib: u64) -> Closure {
    let expr = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/bench-closure.nix");
    let tag = format!("{tag}-{paths}x{files}x{mib}");
    let root = run_nix(
        Command::new("nix-build")
            .arg(expr)
            .arg("--no-out-link")
            .args(["--argstr", "tag", &tag])
            .args(["--arg", "paths", &paths.to_string()])
            .args(["--arg", "files", &files.to_string()])
            .args(["--arg", "mib", &mib.to_string()]),
    );
    let info: Value = serde_json::from_str(&run_nix(Command::new("nix").args([
        "path-info",
        "--json",
        "--recursive",
        &root,
    ])))
    .unwrap();
    let paths = info
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["path"].as_str().unwrap().to_string(),
                p["narSize"].as_u64().unwrap(),
            )
        })
        .collect();
    Closure { root, paths }
}

/// Writes back what earlier steps left dirty in the page cache, so a timed step does not
/// pay for it.
fn settle() {
    let _ = Command::new("sync").status();
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
    // No fsync: a fetch does not sync the blob store's file either.
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

fn import(node: &Node, path: &str, name: &str) -> f64 {
    let started = Instant::now();
    node.cli_ok(&["image", "import", path, "--name", name]);
    started.elapsed().as_secs_f64()
}

/// CPU seconds the cluster's daemons have used so far.
fn daemons_cpu(c: &Cluster) -> f64 {
    let pids: Vec<u32> = c.nodes.iter().filter_map(Node::pid).collect();
    cpu_ticks(&pids) as f64 / clock_ticks_per_sec()
}

/// Whether step 4 runs (not with `BENCH_CACHE=0`, nor with the uplinks capped).
fn cache_bench() -> bool {
    std::env::var("BENCH_CACHE").map_or(true, |v| v != "0") && uplink_mbit().is_none()
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

/// A port free on loopback now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts connections on `addr`.
fn wait_listening(what: &str, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} does not listen on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Loopback TCP with `iperf3` for 3 s over `streams` connections: MiB/s received.
fn iperf3(streams: u32) -> f64 {
    let port = free_port().to_string();
    let _server = Killed(
        Command::new("iperf3")
            .args(["--server", "--port", &port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 (apt-get install iperf3, or run scripts/bench-images.sh)"),
    );
    wait_listening("iperf3", format!("127.0.0.1:{port}").parse().unwrap());
    let out = Command::new("iperf3")
        .args([
            "--client",
            "127.0.0.1",
            "--port",
            &port,
            "--time",
            "3",
            "--json",
        ])
        .args(["--parallel", &streams.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "iperf3: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap()
        / 8.0
        / (1u64 << 20) as f64
}

/// Debian's nginx serving `root` as static files on loopback (sendfile on, a worker per
/// CPU): the baseline that binary caches are measured against.
fn nginx(root: &Path, work: &Path) -> (Killed, String) {
    std::fs::create_dir_all(work).unwrap();
    let port = free_port();
    let conf = work.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes auto;\ndaemon off;\nerror_log {work}/error.log;\npid {work}/nginx.pid;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000;\n\
             server {{ listen 127.0.0.1:{port}; root {root}; }} }}\n",
            work = work.display(),
            root = root.display()
        ),
    )
    .unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(work)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx (apt-get install nginx-light, or run scripts/bench-images.sh)");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening("nginx", addr);
    (Killed(child), format!("http://{addr}"))
}

/// GETs `url` with curl; the body as text.
fn curl_text(url: &str) -> String {
    let out = Command::new("curl")
        .args(["--silent", "--fail", url])
        .output()
        .unwrap();
    assert!(out.status.success(), "curl {url}: {:?}", out.status);
    String::from_utf8(out.stdout).unwrap()
}

/// The NAR URLs of `closure` on the binary cache at `base`, from its narinfos, and the
/// bytes they hold.
fn nar_urls(base: &str, closure: &Closure) -> (Vec<String>, u64) {
    let urls = closure
        .paths
        .iter()
        .map(|(path, _)| {
            let name = Path::new(path).file_name().unwrap().to_string_lossy();
            let info = curl_text(&format!("{base}/{}.narinfo", &name[..32]));
            let url = info
                .lines()
                .find_map(|l| l.strip_prefix("URL: "))
                .unwrap_or_else(|| panic!("no URL in {info}"));
            format!("{base}/{url}")
        })
        .collect();
    (urls, closure.bytes())
}

/// `clients` curl processes at once, each fetching every URL in order over one
/// connection; seconds until the last is done. Every response must be whole.
fn curl_all(urls: &[String], bytes: u64, clients: usize, work: &Path) -> f64 {
    let list = work.join("curl-urls");
    let mut cfg = String::new();
    for u in urls {
        cfg.push_str(&format!("url = \"{u}\"\noutput = \"/dev/null\"\n"));
    }
    std::fs::write(&list, cfg).unwrap();
    let started = Instant::now();
    let children: Vec<Child> = (0..clients)
        .map(|_| {
            Command::new("curl")
                .args(["--silent", "--fail", "--config"])
                .arg(&list)
                .args(["--write-out", "%{size_download}\n"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "curl: {:?}", out.status);
        let got: u64 = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().parse::<u64>().unwrap())
            .sum();
        assert_eq!(got, bytes, "curl fetched {got} of {bytes} bytes");
    }
    started.elapsed().as_secs_f64()
}

/// `nix copy --from base` of the closure into an empty local store under `work`
/// (signatures not required: nginx serves the unsigned copy); seconds.
fn nix_copy_from(base: &str, closure: &Closure, work: &Path, tag: &str) -> f64 {
    let store = work.join(format!("copy-{tag}"));
    let started = Instant::now();
    run_nix(
        Command::new("nix")
            .args(["copy", "--from", base, "--to"])
            .arg(&store)
            .args(["--option", "require-sigs", "false"])
            .args(["--option", "narinfo-cache-negative-ttl", "0"])
            .arg(&closure.root)
            // Its own narinfo cache: nothing learnt from the other server.
            .env("XDG_CACHE_HOME", store.with_extension("cache")),
    );
    let secs = started.elapsed().as_secs_f64();
    remove_store(&store);
    secs
}

/// Removes a chroot store Nix wrote (its files are read-only).
fn remove_store(dir: &Path) {
    let _ = Command::new("chmod").arg("-R").arg("u+w").arg(dir).status();
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(dir.with_extension("cache"));
}

/// Step 4: the binary cache against nginx serving the same NARs, for `closure`: table rows,
/// each with nginx's time over ours where both served.
fn cache_vs_nginx(
    c: &Cluster,
    label: &str,
    closure: &Closure,
    name: &str,
) -> Vec<(String, Option<f64>)> {
    let work = c.root.path().join(format!("cache-{name}"));
    std::fs::create_dir_all(&work).unwrap();
    let bytes = closure.bytes();
    settle();
    let import_secs = import(&c.nodes[0], &closure.root, name);
    let files = work.join("file-cache");
    run_nix(
        Command::new("nix")
            .args(["copy", "--to"])
            .arg(format!("file://{}?compression=none", files.display()))
            .arg(&closure.root),
    );
    let (_nginx, nginx_base) = nginx(&files, &work.join("nginx"));
    let ours = format!("http://{}", c.nodes[0].served_at("cache"));
    let (our_urls, _) = nar_urls(&ours, closure);
    let (their_urls, _) = nar_urls(&nginx_base, closure);
    let mut rows = vec![(
        format!(
            "| {label} | import on node 1 | {:.2} s, {:.0} MiB/s | | |",
            import_secs,
            mib_s(bytes, import_secs)
        ),
        None,
    )];
    settle();
    for clients in [1usize, 16] {
        let ours = curl_all(&our_urls, bytes, clients, &work);
        let theirs = curl_all(&their_urls, bytes, clients, &work);
        let total = bytes * clients as u64;
        rows.push((
            format!(
                "| {label} | curl, every NAR, {clients} connection{} | {:.0} MiB/s | {:.0} MiB/s | {:.2} × |",
                if clients == 1 { "" } else { "s" },
                mib_s(total, ours),
                mib_s(total, theirs),
                theirs / ours
            ),
            Some(theirs / ours),
        ));
    }
    // Best of three each, alternating: the copies write 1 GiB each into a fresh store,
    // and how long the page cache takes to absorb that varies by 2-3x from one copy to
    // the next on a virtual disk.
    let (mut ours_copy, mut theirs_copy) = (f64::INFINITY, f64::INFINITY);
    for round in 0..3 {
        let one = |base: &str, tag: &str| {
            settle();
            nix_copy_from(base, closure, &work, &format!("{tag}-{round}"))
        };
        if round != 1 {
            ours_copy = ours_copy.min(one(&ours, "ours"));
            theirs_copy = theirs_copy.min(one(&nginx_base, "nginx"));
        } else {
            theirs_copy = theirs_copy.min(one(&nginx_base, "nginx"));
            ours_copy = ours_copy.min(one(&ours, "ours"));
        }
    }
    rows.push((
        format!(
            "| {label} | `nix copy --from` into an empty store, best of 3 | {ours_copy:.2} s | {theirs_copy:.2} s | {:.2} × |",
            theirs_copy / ours_copy
        ),
        Some(theirs_copy / ours_copy),
    ));
    let _ = std::fs::remove_dir_all(&work);
    rows
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
    // Built before the cluster starts, so the daemons' clocks and CPU counts see none of it.
    let a = closure("a", 1, 1, mib);
    let fresh = [closure("b", 1, 1, mib), closure("c", 1, 1, mib)];
    let cache_closures = cache_bench().then(|| {
        [
            ("one file", closure("single", 1, 1, mib)),
            ("64 × 64 files", closure("many", 64, 64, (mib / 64).max(1))),
        ]
    });
    let bytes = a.bytes();
    // Node 1's store dir is the host's, as on a NixOS host: its imports need no unpack.
    let c = Cluster::start_each(4, |node| {
        if node.name == "n1" {
            node.extra = vec!["--store-dir".into(), "/nix/store".into()];
        }
    });
    println!("{}", machine(c.root.path()));
    println!("binary {}, image {mib} MiB (one file)", bin.display());
    match uplink {
        Some(mbit) => {
            shape(&c.nodes, mbit);
            println!("each node's sending capped at {mbit} Mbit/s (the TCP copy is not)\n");
        }
        None => println!(),
    }

    settle();
    let import_secs = import(&c.nodes[0], &a.root, "bench-a");
    settle();
    let tcp_secs = tcp_copy(
        &Path::new(a.part()).join("f0"),
        &c.root.path().join("tcp-copy.img"),
    );
    std::fs::remove_file(c.root.path().join("tcp-copy.img")).unwrap();
    let iperf = [iperf3(1), iperf3(16)];
    settle();
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
        "| iperf3 on loopback, 1 and 16 connections, 3 s | | {:.0} and {:.0} MiB/s |",
        iperf[0], iperf[1]
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
        let of_iperf = mib_s(bytes, fetch_secs) / iperf[0];
        let worst = ratio.min(of_iperf);
        println!(
            "\nfetch / TCP throughput: {:.0} % of the file-to-file copy, {:.0} % of iperf3's one connection (target ≥ {:.0} %) {}",
            ratio * 100.0,
            of_iperf * 100.0,
            TARGET_RATIO * 100.0,
            if worst >= TARGET_RATIO {
                "met"
            } else {
                "NOT met"
            }
        );
        println!(
            "whole pull / TCP: {:.0} % of the copy, {:.0} % of iperf3 (target ≥ 50 %)",
            tcp_secs / total_secs * 100.0,
            mib_s(bytes, total_secs) / iperf[0] * 100.0
        );
    }

    // Delivery to 4 nodes, on fresh images so nothing is cached.
    let single = fetch_secs;
    let mut rows = Vec::new();
    for (image, name, staged) in [(&fresh[0], "bench-b", false), (&fresh[1], "bench-c", true)] {
        import(&c.nodes[0], &image.root, name);
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
        "\nbest delivery: {:.2} × a single fetch (target ≤ {TARGET_DELIVERY:.1} ×) {}",
        best / single,
        if best / single <= TARGET_DELIVERY {
            "met"
        } else {
            "NOT met"
        }
    );

    if let Some(closures) = cache_closures {
        println!("\n| closure (1 GiB) | what | Blixard's binary cache | nginx, the same NARs | nginx time / ours |");
        println!("|---|---|---|---|---|");
        let mut worst = f64::INFINITY;
        for (i, (label, closure)) in closures.iter().enumerate() {
            for (row, ratio) in cache_vs_nginx(&c, label, closure, &format!("cache-{i}")) {
                worst = worst.min(ratio.unwrap_or(f64::INFINITY));
                println!("{row}");
            }
        }
        println!(
            "\nbinary cache vs nginx, worst row: {worst:.2} × (target ≥ {TARGET_CACHE}) {}",
            if worst >= TARGET_CACHE {
                "met"
            } else {
                "NOT met"
            }
        );
    }
}
