//! Committed-write benchmark: a 3-node cluster of real release `blixard` daemons on
//! loopback, loaded with `MetaSet` requests (each one a committed raft write) by
//! concurrent writers in this process.
//!
//! Run: `cargo build --release --bin blixard && cargo bench -p blixard-tests --bench writes`.
//! Env: `BLIXARD_BIN` (the binary; default target/release/blixard), `BENCH_SECS` (measured
//! seconds per level, default 10), `BENCH_TRACES` (set: the nodes export trace spans to an
//! OTLP receiver in this process), `BENCH_KEEP_LOGS` (a dir to copy the daemons' logs
//! to). Each level runs a 2 s warm-up first.
//!
//! Prints a one-line machine description and markdown tables to stdout.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use blixard_net::api::{MetaSet, StatusRequest};
use blixard_net::client::ApiClient;
use blixard_net::EndpointAddr;
use blixard_tests::api::{self, Writers};
use blixard_tests::bench::{check_binary_fresh, machine};
use blixard_tests::{
    binary, clock_ticks_per_sec, cpu_ticks, proc_cpu_ticks, proc_status_kib, Cluster,
};

const WARMUP: Duration = Duration::from_secs(2);
const IDLE: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Writers per follower in the failover rounds.
const FAILOVER_WRITERS: usize = 32;
/// The cluster's election timeout (default raft settings).
const ELECTION_MS: u64 = 1000;

/// Targets from the issue.
const TARGET_COMMITS_64: f64 = 10_000.0;
const TARGET_P99_1_MS: f64 = 10.0;
const TARGET_IDLE_RSS_MIB: f64 = 30.0;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Leader,
    Follower,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Leader => "leader",
            Via::Follower => "follower",
        }
    }
}

const LEVELS: &[(Via, usize)] = &[
    (Via::Leader, 1),
    (Via::Leader, 16),
    (Via::Leader, 64),
    (Via::Follower, 1),
    (Via::Follower, 64),
];

struct LevelResult {
    via: Via,
    writers: usize,
    commits: usize,
    secs: f64,
    errors: u64,
    first_error: Option<String>,
    /// Sorted latencies of the requests completed in the window, in microseconds.
    latencies_us: Vec<u64>,
    /// CPU used by the three daemons and by this process during the window, in cores.
    cpu_daemons: f64,
    cpu_bench: f64,
}

impl LevelResult {
    fn throughput(&self) -> f64 {
        self.commits as f64 / self.secs
    }

    /// The `p`-quantile (nearest rank), in milliseconds.
    fn quantile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let rank = ((p * self.latencies_us.len() as f64).ceil() as usize).max(1) - 1;
        self.latencies_us[rank.min(self.latencies_us.len() - 1)] as f64 / 1000.0
    }

    fn max_ms(&self) -> f64 {
        self.latencies_us
            .last()
            .map_or(f64::NAN, |v| *v as f64 / 1000.0)
    }

    fn mean_ms(&self) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        self.latencies_us.iter().sum::<u64>() as f64 / self.latencies_us.len() as f64 / 1000.0
    }
}

fn bench_secs() -> u64 {
    match std::env::var("BENCH_SECS") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("BENCH_SECS={s:?} is not a number of seconds")),
        Err(_) => 10,
    }
}

async fn run_level(
    client: Arc<ApiClient>,
    to: EndpointAddr,
    via: Via,
    writers: usize,
    measure: Duration,
    daemon_pids: &[u32],
    ticks_per_sec: f64,
) -> LevelResult {
    let start = Instant::now();
    let t0 = start + WARMUP;
    let t1 = t0 + measure;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let client = client.clone();
        let to = to.clone();
        let prefix = format!("bench/{}/{writers}/{w}", via.name());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            let mut i = 0u64;
            loop {
                let sent = Instant::now();
                if sent >= t1 {
                    break;
                }
                let request = MetaSet {
                    key: format!("{prefix}/{i}"),
                    value: Some(i.to_string()),
                };
                i += 1;
                let result = client.call(&to, request).await;
                let done = Instant::now();
                let in_window = done >= t0 && done <= t1;
                match result {
                    Ok(_) if in_window => latencies.push((done - sent).as_micros() as u64),
                    Ok(_) => {}
                    Err(e) => {
                        if in_window {
                            errors += 1;
                        }
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            (latencies, errors, first_error)
        }));
    }
    // CPU over the measured window.
    tokio::time::sleep_until(t0.into()).await;
    let daemons_before = cpu_ticks(daemon_pids);
    let bench_before = proc_cpu_ticks(std::process::id()).unwrap_or(0);
    tokio::time::sleep_until(t1.into()).await;
    let daemons_after = cpu_ticks(daemon_pids);
    let bench_after = proc_cpu_ticks(std::process::id()).unwrap_or(0);

    let mut latencies_us = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (l, e, f) = t.await.unwrap();
        latencies_us.extend(l);
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    latencies_us.sort_unstable();
    let secs = measure.as_secs_f64();
    LevelResult {
        via,
        writers,
        commits: latencies_us.len(),
        secs,
        errors,
        first_error,
        latencies_us,
        cpu_daemons: (daemons_after - daemons_before) as f64 / ticks_per_sec / secs,
        cpu_bench: bench_after.saturating_sub(bench_before) as f64 / ticks_per_sec / secs,
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn main() {
    let measure = Duration::from_secs(bench_secs());
    let bin = binary();
    check_binary_fresh(&bin);
    eprintln!("bench: daemon binary {}", bin.display());
    let ticks_per_sec = clock_ticks_per_sec();

    // BENCH_TRACES=1: every node exports its trace spans to a receiver in this process
    // (as to a collector on the host), to measure what tracing costs.
    let receiver = std::env::var_os("BENCH_TRACES").map(|_| blixard_tests::otlp::Receiver::start());
    eprintln!(
        "bench: starting a 3-node cluster{}",
        if receiver.is_some() {
            " exporting traces"
        } else {
            ""
        }
    );
    let mut cluster = {
        let root = tempfile::Builder::new()
            .prefix("blixard-bench")
            .tempdir()
            .unwrap();
        let nodes = (1..=3)
            .map(|i| {
                let mut node = blixard_tests::Node::new(root.path(), &format!("n{i}"));
                if let Some(r) = &receiver {
                    node.env = vec![("OTEL_EXPORTER_OTLP_ENDPOINT".into(), r.endpoint())];
                }
                node
            })
            .collect();
        Cluster::start_nodes(root, nodes)
    };
    let machine = machine(cluster.root.path());

    let pids: Vec<u32> = cluster.nodes.iter().map(|n| n.pid().unwrap()).collect();
    let addrs: Vec<(u64, EndpointAddr)> = cluster.nodes.iter().map(api::addr_of).collect();

    eprintln!("bench: idle for {IDLE:?}");
    std::thread::sleep(IDLE);
    let rss_idle: Vec<Option<u64>> = pids.iter().map(|p| proc_status_kib(*p, "VmRSS")).collect();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (results, leader_before, leader_after) = runtime.block_on(async {
        let client =
            Arc::new(api::client(&cluster.nodes[0].dir.join("admin.key"), REQUEST_TIMEOUT).await);

        let leader_of = |s: blixard_net::api::ClusterStatus| s.raft.leader.expect("a leader");
        let status = client
            .call(&addrs[0].1, StatusRequest { stale: false })
            .await
            .unwrap();
        let leader_id = leader_of(status);
        let leader = addrs
            .iter()
            .position(|(id, _)| *id == leader_id)
            .expect("the leader is one of the three nodes");
        let follower = (leader + 1) % addrs.len();

        let mut results = Vec::new();
        for &(via, writers) in LEVELS {
            let idx = match via {
                Via::Leader => leader,
                Via::Follower => follower,
            };
            eprintln!(
                "bench: {writers} writer(s) via the {} (n{}), {WARMUP:?} warm-up + {measure:?}",
                via.name(),
                addrs[idx].0
            );
            let r = run_level(
                client.clone(),
                addrs[idx].1.clone(),
                via,
                writers,
                measure,
                &pids,
                ticks_per_sec,
            )
            .await;
            if let Some(e) = &r.first_error {
                eprintln!("bench: {} error(s) in the window; first: {e}", r.errors);
            }
            results.push(r);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let status = client
            .call(&addrs[0].1, StatusRequest { stale: false })
            .await
            .unwrap();
        let leader_after = leader_of(status);
        client.endpoint().close().await;
        (results, leader_id, leader_after)
    });
    let rss_after: Vec<Option<u64>> = pids.iter().map(|p| proc_status_kib(*p, "VmRSS")).collect();
    let hwm_after: Vec<Option<u64>> = pids.iter().map(|p| proc_status_kib(*p, "VmHWM")).collect();
    let failovers = failovers(&runtime, &mut cluster, &addrs);

    // Report.
    println!();
    println!("Machine: {machine}");
    println!(
        "Daemon: {} ; {} s measured per level after a {} s warm-up; one client process, \
         one QUIC connection per target node; every request sets a new key",
        bin.display(),
        measure.as_secs(),
        WARMUP.as_secs()
    );
    if leader_after != leader_before {
        println!(
            "WARNING: leadership moved from n{leader_before} to n{leader_after} during the run"
        );
    }
    println!();
    println!(
        "| via | writers | commits/s | p50 ms | p99 ms | max ms | mean ms | errors | CPU daemons (cores) | CPU bench (cores) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &results {
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.2} | {:.2} |",
            r.via.name(),
            r.writers,
            r.throughput(),
            r.quantile_ms(0.50),
            r.quantile_ms(0.99),
            r.max_ms(),
            r.mean_ms(),
            r.errors,
            r.cpu_daemons,
            r.cpu_bench
        );
    }
    println!();
    println!("| node | role | RSS idle (MiB) | RSS after load (MiB) | peak RSS, VmHWM (MiB) |");
    println!("|---|---|---:|---:|---:|");
    for (i, (id, _)) in addrs.iter().enumerate() {
        let role = if *id == leader_before {
            "leader"
        } else {
            "follower"
        };
        println!(
            "| n{id} | {role} | {} | {} | {} |",
            mib(rss_idle[i]),
            mib(rss_after[i]),
            mib(hwm_after[i])
        );
    }
    let total_keys: usize = results.iter().map(|r| r.commits).sum();
    println!();
    println!(
        "(about {total_keys} metadata keys were written in the measured windows, plus warm-ups)"
    );

    println!();
    println!(
        "Failover: {FAILOVER_WRITERS} writers through each follower; the leader killed (-9) \
         once they run, then restarted and caught up before the next round. Election \
         timeout {ELECTION_MS} ms (10 ticks of 100 ms, randomised by raft-rs up to twice that)."
    );
    println!();
    println!(
        "| round | in flight at the kill | new leader seen after (s) | last in-flight write done after (s) | writes failed |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for (i, f) in failovers.iter().enumerate() {
        println!(
            "| {} | {} | {:.2} | {:.2} | {} |",
            i + 1,
            f.in_flight,
            f.elected.as_secs_f64(),
            f.slowest.as_secs_f64(),
            f.failed
        );
    }

    // Targets.
    let find = |via, writers| {
        results
            .iter()
            .find(|r| r.via == via && r.writers == writers)
            .unwrap()
    };
    let t64 = find(Via::Leader, 64).throughput();
    let p99_1 = find(Via::Leader, 1).quantile_ms(0.99);
    let idle_max = rss_idle.iter().flatten().max().copied().unwrap_or(0) as f64 / 1024.0;
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!();
    println!(
        "- >= {TARGET_COMMITS_64:.0} commits/s at 64 writers (leader): {t64:.0} -> {}",
        verdict(t64 >= TARGET_COMMITS_64)
    );
    println!(
        "- p99 <= {TARGET_P99_1_MS} ms at 1 writer (leader): {p99_1:.2} ms -> {}",
        verdict(p99_1 <= TARGET_P99_1_MS)
    );
    println!(
        "- idle daemon RSS <= {TARGET_IDLE_RSS_MIB} MiB: max {idle_max:.1} MiB -> {}",
        verdict(idle_max <= TARGET_IDLE_RSS_MIB)
    );
    let worst = failovers
        .iter()
        .map(|f| f.slowest)
        .max()
        .unwrap_or_default();
    let failed: usize = failovers.iter().map(|f| f.failed).sum();
    println!(
        "- writes in flight at a leader kill done within 2 election timeouts ({} ms), none \
         failed: slowest {:.2} s, {failed} failed -> {}",
        2 * ELECTION_MS,
        worst.as_secs_f64(),
        verdict(worst <= Duration::from_millis(2 * ELECTION_MS) && failed == 0)
    );
    if let Some(r) = &receiver {
        println!("- trace spans received from the nodes: {}", r.count());
    }
    // BENCH_KEEP_LOGS=DIR: the daemons' logs are copied there (the cluster's dir goes).
    if let Some(dir) = std::env::var_os("BENCH_KEEP_LOGS") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        for node in &cluster.nodes {
            let _ = std::fs::copy(node.log_path(), dir.join(format!("{}.log", node.name)));
        }
        eprintln!("bench: daemon logs copied to {}", dir.display());
    }
    drop(cluster);
}

/// One leader kill under load.
struct Failover {
    in_flight: usize,
    elected: Duration,
    slowest: Duration,
    failed: usize,
}

/// Kills the leader under writes through the followers, `BENCH_FAILOVERS` times (default
/// 5), restarting it after each.
fn failovers(
    rt: &tokio::runtime::Runtime,
    cluster: &mut Cluster,
    addrs: &[(u64, EndpointAddr)],
) -> Vec<Failover> {
    let rounds: usize = std::env::var("BENCH_FAILOVERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let key = cluster.nodes[0].dir.join("admin.key");
    let client = Arc::new(rt.block_on(api::client(&key, REQUEST_TIMEOUT)));
    let mut out = Vec::new();
    for round in 0..rounds {
        let leader = cluster.leader();
        let followers: Vec<EndpointAddr> = (0..addrs.len())
            .filter(|i| *i != leader)
            .map(|i| addrs[i].1.clone())
            .collect();
        eprintln!("bench: failover {}: killing n{}", round + 1, leader + 1);
        let writers = Writers::start(
            rt,
            &client,
            &followers,
            FAILOVER_WRITERS,
            &format!("f{round}-"),
        );
        writers.wait_done(0, 500, Duration::from_secs(60));
        let killed = Instant::now();
        cluster.nodes[leader].kill9();
        cluster.leader();
        let elected = killed.elapsed();
        writers.wait_done(writers.done(), 500, Duration::from_secs(60));
        let writes = writers.stop(rt);
        let all: Vec<&api::Write> = writes.iter().collect();
        let (in_flight, slowest) = api::in_flight_at(&all, killed);
        let failed = writes.iter().filter(|w| w.result.is_err()).count();
        if let Some(w) = writes.iter().find(|w| w.result.is_err()) {
            eprintln!("bench: first failed write: {}: {:?}", w.name, w.result);
        }
        out.push(Failover {
            in_flight,
            elected,
            slowest,
            failed,
        });
        cluster.nodes[leader].start(&[]);
        cluster.nodes[leader].wait_knows_leader(Duration::from_secs(60));
        cluster.wait_voters(3);
    }
    rt.block_on(client.endpoint().close());
    out
}
