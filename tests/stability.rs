//! The P2P stability suite (issue 17): real daemons, each in a network namespace of its
//! own, with clients writing and reading through every node while the network fails:
//! partitions (symmetric, a minority leader, one-way) with iptables, latency and loss
//! through a userspace proxy, nodes behind NATs that reach each other only through a
//! local Iroh relay, 1,000 API clients at once, and image fetches under load. Each
//! scenario reports the recovery time after the heal, the writes acknowledged and lost
//! (must be 0), the errors seen, whether the history is linearizable (a real checker,
//! `harness/linear.rs`), and each node's raft status, memory and CPU before and after.
//!
//! `BLIXARD_STABILITY=long` runs every scenario longer and more often;
//! `BLIXARD_STABILITY_REPORT=FILE` appends each report as a JSON line (scripts/stability.sh
//! renders the tables). The soak test (ignored here) is `scripts/stability.sh --soak HOURS`.
//! Needs root (CI runs as root): without it every test fails, loudly. docs/stability.md.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blixard_net::api::{MetaGet, MetaSet, UserAdd};
use blixard_net::client::ApiClient;
use blixard_net::{endpoint, key_of, EndpointAddr, SecretKey};
use blixard_tests::linear::Verdict;
use blixard_tests::load::{
    analyse, final_reads, metrics, recover, FinalRead, Load, LoadShape, NodeMetrics, Rec, Report,
    RssSampler,
};
use blixard_tests::netns::{proxy_port, Net, NsGuard, Topology, HUB_IP, NODE_PORT, RELAY_PORT};
use blixard_tests::proxy::{Impairment, Proxy, Rng};
use blixard_tests::{api, binary, wait_for, Cluster, Node};
use tokio::runtime::Runtime;

/// One client call's budget (the nodes answer within `request_timeout_ms` = 5 s).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a cluster may take to recover after a heal before the scenario fails.
const RECOVERY_LIMIT: Duration = Duration::from_secs(60);

/// Short (CI) or long (`BLIXARD_STABILITY=long`).
#[derive(Clone, Copy, Debug)]
struct Mode {
    long: bool,
}

impl Mode {
    fn get() -> Mode {
        Mode {
            long: std::env::var("BLIXARD_STABILITY").as_deref() == Ok("long"),
        }
    }

    fn name(self) -> &'static str {
        if self.long {
            "long"
        } else {
            "short"
        }
    }

    /// How long a fault lasts.
    fn fault(self) -> Duration {
        Duration::from_secs(if self.long { 30 } else { 5 })
    }

    /// How often each scenario runs.
    fn rounds(self) -> usize {
        if self.long {
            3
        } else {
            1
        }
    }

    fn shape(self, seed: u64) -> LoadShape {
        LoadShape {
            per_node: 2,
            registers: 4,
            pace: None,
            seed,
        }
    }
}

/// The local Iroh relay (`tests/relay`, built by scripts/test.sh), run in the hub.
struct Relay {
    child: Option<Child>,
    log: PathBuf,
}

fn relay_binary() -> PathBuf {
    if let Ok(p) = std::env::var("BLIXARD_RELAY_BIN") {
        return PathBuf::from(p);
    }
    let bin = binary().with_file_name("blixard-test-relay");
    assert!(
        bin.exists(),
        "{} not found: the NAT scenario needs the test relay. Build it with \
         `cargo build --manifest-path tests/relay/Cargo.toml` (scripts/test.sh and \
         scripts/stability.sh do), or set BLIXARD_RELAY_BIN",
        bin.display()
    );
    bin
}

impl Relay {
    /// Starts the relay from the calling thread (which must be in the hub).
    fn start(log: &Path) -> Relay {
        let mut relay = Relay {
            child: None,
            log: log.to_path_buf(),
        };
        relay.restart();
        relay
    }

    fn restart(&mut self) {
        assert!(self.child.is_none(), "the relay already runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(relay_binary())
            .arg(format!("{HUB_IP}:{RELAY_PORT}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let addr = SocketAddr::from((HUB_IP, RELAY_PORT));
        wait_for("the relay to serve", Duration::from_secs(20), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster in namespaces and what drives it. Fields drop in order: clients, proxy,
/// runtime, daemons, relay, then the thread leaves the hub and the namespaces go.
struct Bed {
    client: Arc<ApiClient>,
    probe: Arc<ApiClient>,
    proxy: Option<Proxy>,
    rt: Runtime,
    cluster: Cluster,
    relay: Option<Relay>,
    _hub: NsGuard,
    net: Net,
    targets: Vec<EndpointAddr>,
    mode: Mode,
    /// Scenario names used so far (keys are tagged with them).
    rounds: usize,
}

impl Bed {
    fn new(topology: Topology, n: usize, mode: Mode) -> Bed {
        let net = Net::new(topology, n);
        let hub = net.enter_hub();
        // Built inside the hub: its threads, and every socket they open, stay there.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let root = tempfile::Builder::new()
            .prefix("blixard-stability")
            .tempdir()
            .unwrap();
        let proxy = (topology == Topology::Proxied).then(|| {
            let mut links = Vec::new();
            for (i, _) in net.nodes.iter().enumerate() {
                for (j, to) in net.nodes.iter().enumerate().filter(|(j, _)| *j != i) {
                    let listen = SocketAddr::from((HUB_IP, proxy_port(i, j)));
                    links.push((i, j, listen, to.addr()));
                }
            }
            rt.block_on(Proxy::start(HUB_IP.into(), &links, 0x5eed))
        });
        let relay =
            (topology == Topology::Nat).then(|| Relay::start(&root.path().join("relay.log")));
        let mut config = "request_timeout_ms = 5000\n".to_string();
        if topology == Topology::Nat {
            config.push_str(&format!("relay_url = \"http://{HUB_IP}:{RELAY_PORT}\"\n"));
        }
        let config_path = root.path().join("node.toml");
        std::fs::write(&config_path, config).unwrap();
        let nodes: Vec<Node> = net
            .nodes
            .iter()
            .enumerate()
            .map(|(i, place)| {
                let mut node = Node::new(root.path(), &format!("n{}", i + 1));
                node.netns = Some(place.ns.clone());
                node.listen_ip = place.ip.to_string();
                node.port = NODE_PORT;
                node.extra = vec!["--config".into(), config_path.display().to_string()];
                node
            })
            .collect();
        let cluster = Cluster::start_nodes(root, nodes);
        let targets: Vec<EndpointAddr> = cluster.nodes.iter().map(|n| api::addr_of(n).1).collect();
        let key = cluster.nodes[0].dir.join("admin.key");
        let bind = SocketAddr::from((HUB_IP, 0));
        let client = Arc::new(rt.block_on(api::client_on(&key, bind, CLIENT_TIMEOUT)));
        let probe = Arc::new(rt.block_on(api::client_on(&key, bind, Duration::from_secs(2))));
        Bed {
            client,
            probe,
            proxy,
            rt,
            cluster,
            relay,
            _hub: hub,
            net,
            targets,
            mode,
            rounds: 0,
        }
    }

    fn pids(&self) -> Vec<Option<u32>> {
        self.cluster.nodes.iter().map(Node::pid).collect()
    }

    fn metrics(&self) -> Vec<NodeMetrics> {
        metrics(self.rt.handle(), &self.client, &self.targets, &self.pids())
    }

    /// The leader's index, as the nodes agree on it (read locally).
    fn leader(&self) -> usize {
        self.try_leader().unwrap_or_else(|e| panic!("{e}"))
    }

    /// The leader's index, or why the nodes did not agree on one within the limit.
    fn try_leader(&self) -> Result<usize, String> {
        let deadline = Instant::now() + RECOVERY_LIMIT;
        loop {
            let m = self.metrics();
            let leaders: Vec<Option<u64>> = m.iter().map(|x| x.leader).collect();
            if let Some(l) = leaders[0].filter(|l| leaders.iter().all(|x| *x == Some(*l))) {
                return Ok(l as usize - 1);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the nodes did not agree on a leader within {RECOVERY_LIMIT:?}: {leaders:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits `d`, noting any daemon that exits meanwhile.
    fn hold(&mut self, d: Duration, problems: &mut Vec<String>) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.check_alive(problems);
            let left = end.saturating_duration_since(Instant::now());
            std::thread::sleep(left.min(Duration::from_millis(100)));
        }
    }

    /// Notes daemons that exited without being told to.
    fn check_alive(&mut self, problems: &mut Vec<String>) {
        for node in &mut self.cluster.nodes {
            if let Some(child) = node.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    problems.push(format!("{} exited by itself: {status}", node.name));
                    node.child = None;
                }
            }
        }
    }

    /// Adds `n` users with the viewer role (keys from `seed`) and returns their
    /// secret keys: the clients of the many-clients scenarios.
    fn add_users(&self, n: usize, seed: u64) -> Vec<[u8; 32]> {
        let mut rng = Rng::new(seed);
        let secrets: Vec<[u8; 32]> = (0..n)
            .map(|_| {
                let mut bytes = [0u8; 32];
                for chunk in bytes.chunks_mut(8) {
                    chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
                }
                bytes
            })
            .collect();
        let (client, to) = (self.client.clone(), self.targets[0].clone());
        let keys: Vec<_> = secrets
            .iter()
            .map(|s| key_of(&SecretKey::from_bytes(s).public()))
            .collect();
        let failed = self.rt.block_on(async move {
            let sem = Arc::new(tokio::sync::Semaphore::new(32));
            let mut tasks = Vec::new();
            for (i, key) in keys.into_iter().enumerate() {
                let (client, to, sem) = (client.clone(), to.clone(), sem.clone());
                tasks.push(tokio::spawn(async move {
                    let _permit = sem.acquire_owned().await;
                    let add = UserAdd {
                        name: format!("client{i}"),
                        key,
                        roles: vec!["viewer".into()],
                        tenant: None,
                    };
                    client.call(&to, add).await.err().map(|e| e.to_string())
                }));
            }
            let mut failed = Vec::new();
            for t in tasks {
                if let Ok(Some(e)) = t.await {
                    failed.push(e);
                }
            }
            failed
        });
        assert!(
            failed.is_empty(),
            "adding users failed: {:?}",
            &failed[..failed.len().min(3)]
        );
        // The key they read.
        let set = MetaSet {
            key: "stability".into(),
            value: Some("yes".into()),
        };
        self.rt
            .block_on(self.client.call(&self.targets[0], set))
            .unwrap();
        secrets
    }

    fn close(self) {
        let (client, probe) = (self.client.clone(), self.probe.clone());
        self.rt.block_on(async {
            client.endpoint().close().await;
            probe.endpoint().close().await;
        });
    }
}

/// What a scenario does between the load's start and its end.
struct Plan<'a> {
    name: String,
    /// What is done to the cluster, for the report.
    fault: String,
    /// Applies the fault, holds it, and heals it, noting problems.
    run: Run<'a>,
}

/// The heal's instant (None when there is nothing to heal) and figures of the plan's own.
type Ran = (Option<Instant>, Vec<(String, String)>);
type Run<'a> = Box<dyn FnOnce(&mut Bed, &Load, &mut Vec<String>) -> Ran + 'a>;

/// Runs one scenario: load through every node, the plan, the recovery, the final reads
/// and the check. Emits and returns the report.
fn scenario(bed: &mut Bed, plan: Plan) -> Report {
    bed.rounds += 1;
    let tag = format!("{}{}-", plan.name, bed.rounds);
    let mut problems = Vec::new();
    let before = bed.metrics();
    let sampler = RssSampler::start(bed.pids());
    let load = Load::start(
        bed.rt.handle(),
        &bed.client,
        &bed.targets,
        &bed.mode.shape(bed.rounds as u64),
        &tag,
    );
    if let Err(e) = load.wait_progress(20, Duration::from_secs(30)) {
        problems.push(format!("before the fault: {e}"));
    }
    let started = Instant::now();
    let (healed, mut extra) = (plan.run)(bed, &load, &mut problems);
    let fault_time = healed.unwrap_or_else(Instant::now) - started;
    let (recovery, probes) = match healed {
        Some(at) => {
            let (r, probes) = recover(
                bed.rt.handle(),
                &bed.probe,
                &bed.targets,
                &tag,
                at,
                RECOVERY_LIMIT,
            );
            (Some(r), probes)
        }
        None => (None, Vec::new()),
    };
    // The load goes on after the recovery.
    if let Err(e) = load.wait_progress(20, Duration::from_secs(30)) {
        problems.push(format!("after the heal: {e}"));
    }
    let mut recs = load.stop(bed.rt.handle());
    let during = window(&recs, started, healed.unwrap_or_else(Instant::now));
    extra.insert(0, ("during the fault".into(), during));
    let peaks: Vec<String> = sampler
        .stop()
        .iter()
        .enumerate()
        .map(|(i, kib)| format!("n{} {:.0}", i + 1, *kib as f64 / 1024.0))
        .collect();
    extra.push(("peak RSS MiB".into(), peaks.join(", ")));
    recs.extend(probes);
    let finals = match final_reads(bed.rt.handle(), &bed.client, &bed.targets, RECOVERY_LIMIT) {
        Ok(f) => f,
        Err(e) => {
            problems.push(e);
            Vec::<FinalRead>::new()
        }
    };
    bed.check_alive(&mut problems);
    let after = bed.metrics();
    let analysis = analyse(&recs, &finals, &tag);
    let report = Report {
        scenario: plan.name,
        mode: bed.mode.name().into(),
        fault: plan.fault,
        fault_time,
        recovery,
        analysis,
        before,
        after,
        extra,
        problems,
    };
    report.emit();
    report
}

/// The operations between `from` and `to`: how many were answered, how many failed,
/// and the acknowledged writes' latency.
fn window(recs: &[Rec], from: Instant, to: Instant) -> String {
    let inside: Vec<&Rec> = recs
        .iter()
        .filter(|r| r.call >= from && r.call < to)
        .collect();
    let ok = inside.iter().filter(|r| r.error.is_none()).count();
    let mut lat: Vec<Duration> = inside
        .iter()
        .filter(|r| r.error.is_none() && r.is_write())
        .map(|r| r.ret - r.call)
        .collect();
    lat.sort_unstable();
    let q = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p).round() as usize)
            .map_or("-".to_string(), |d| {
                format!("{:.0} ms", d.as_secs_f64() * 1e3)
            })
    };
    format!(
        "{ok} operations answered, {} failed; write latency p50 {}, p99 {}",
        inside.len() - ok,
        q(0.5),
        q(0.99)
    )
}

/// A partition made with iptables, held for the mode's fault time, then healed.
fn partition<'a>(
    name: &str,
    fault: String,
    cut: impl FnOnce(&Bed) -> blixard_tests::netns::Cut + 'a,
) -> Plan<'a> {
    Plan {
        name: name.into(),
        fault,
        run: Box::new(move |bed, _load, problems| {
            let c = cut(bed);
            let d = bed.mode.fault();
            bed.hold(d, problems);
            c.heal();
            (Some(Instant::now()), Vec::new())
        }),
    }
}

fn assert_all_passed(reports: &[Report]) {
    let failed: Vec<String> = reports
        .iter()
        .flat_map(|r| {
            r.failures()
                .into_iter()
                .map(move |f| format!("{}: {f}", r.scenario))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "stability failures:\n{}",
        failed.join("\n")
    );
}

/// Partitions with iptables: a follower cut off both ways, the leader in the minority,
/// one direction only (the leader's packets to a follower, then a follower's to the
/// leader), and in long mode a flapping leader.
#[test]
fn partitions() {
    let mode = Mode::get();
    let mut bed = Bed::new(Topology::Bridge, 3, mode);
    let mut reports = Vec::new();
    for _ in 0..mode.rounds() {
        let leader = bed.leader();
        let follower = (leader + 1) % 3;
        reports.push(scenario(
            &mut bed,
            partition(
                "symmetric",
                format!(
                    "follower n{} cut off from both others, both ways",
                    follower + 1
                ),
                move |b| b.net.isolate(follower),
            ),
        ));
        let leader = bed.leader();
        let old = leader;
        let mut report = scenario(
            &mut bed,
            partition(
                "minority-leader",
                format!(
                    "leader n{} cut off from both followers, both ways",
                    leader + 1
                ),
                move |b| b.net.isolate(leader),
            ),
        );
        // The majority elected another leader; the old one follows it after the heal.
        let after: Vec<Option<u64>> = report.after.iter().map(|m| m.leader).collect();
        if after.iter().any(|l| *l == Some(old as u64 + 1)) {
            report.problems.push(format!(
                "n{} still leads after its minority partition: {after:?}",
                old + 1
            ));
        }
        reports.push(report);
        let leader = bed.leader();
        let follower = (leader + 1) % 3;
        reports.push(scenario(
            &mut bed,
            partition(
                "one-way",
                format!(
                    "packets from leader n{} to follower n{} dropped",
                    leader + 1,
                    follower + 1
                ),
                move |b| b.net.cut(leader, follower),
            ),
        ));
        let leader = bed.leader();
        let follower = (leader + 2) % 3;
        reports.push(scenario(
            &mut bed,
            partition(
                "one-way-reverse",
                format!(
                    "packets from follower n{} to leader n{} dropped",
                    follower + 1,
                    leader + 1
                ),
                move |b| b.net.cut(follower, leader),
            ),
        ));
        if mode.long {
            let leader = bed.leader();
            reports.push(scenario(
                &mut bed,
                Plan {
                    name: "flapping".into(),
                    fault: format!("leader n{} cut off and healed every 2 s", leader + 1),
                    run: Box::new(move |bed, _load, problems| {
                        let end = Instant::now() + bed.mode.fault();
                        while Instant::now() < end {
                            let c = bed.net.isolate(leader);
                            bed.hold(Duration::from_secs(2), problems);
                            c.heal();
                            bed.hold(Duration::from_secs(2), problems);
                        }
                        (Some(Instant::now()), Vec::new())
                    }),
                },
            ));
        }
    }
    bed.close();
    assert_all_passed(&reports);
}

/// Latency and loss between all nodes through the userspace proxy (seeded loss).
#[test]
fn latency_and_loss() {
    let mode = Mode::get();
    let mut bed = Bed::new(Topology::Proxied, 3, mode);
    let ms = Duration::from_millis;
    let mut cases = vec![("latency+loss", ms(50), ms(10), 0.05)];
    if mode.long {
        cases = vec![
            ("latency", ms(100), ms(20), 0.0),
            ("loss", ms(0), ms(0), 0.10),
            ("latency+loss", ms(50), ms(10), 0.05),
            ("heavy-loss", ms(5), ms(5), 0.30),
        ];
    }
    let mut reports = Vec::new();
    for _ in 0..mode.rounds() {
        for &(name, delay, jitter, loss) in &cases {
            let imp = Impairment {
                delay,
                jitter,
                loss,
            };
            reports.push(scenario(
                &mut bed,
                Plan {
                    name: name.into(),
                    fault: format!(
                        "every link: {} ms ± {} ms one way, {:.0}% loss each way",
                        delay.as_millis(),
                        jitter.as_millis(),
                        loss * 100.0
                    ),
                    run: Box::new(move |bed, _load, problems| {
                        let proxy = bed.proxy.as_ref().unwrap();
                        let (f0, d0) = proxy.counts();
                        proxy.impair(imp);
                        let d = bed.mode.fault();
                        bed.hold(d, problems);
                        let proxy = bed.proxy.as_ref().unwrap();
                        proxy.impair(Impairment::default());
                        let (f1, d1) = proxy.counts();
                        let extra = vec![(
                            "proxy".into(),
                            format!("{} packets forwarded, {} dropped", f1 - f0, d1 - d0),
                        )];
                        (Some(Instant::now()), extra)
                    }),
                },
            ));
        }
    }
    bed.close();
    assert_all_passed(&reports);
}

/// Every node behind its own NAT, reaching the others only through a local Iroh relay:
/// the cluster forms and replicates through it; the relay is killed and restarted.
#[test]
fn nat_and_relay() {
    let mode = Mode::get();
    let mut bed = Bed::new(Topology::Nat, 3, mode);
    let mut reports = Vec::new();
    for _ in 0..mode.rounds() {
        reports.push(scenario(
            &mut bed,
            Plan {
                name: "relay-restart".into(),
                fault: "every node behind a NAT, the relay their only path; the relay killed, \
                        restarted after the fault time"
                    .into(),
                run: Box::new(|bed, _load, problems| {
                    bed.relay.as_mut().unwrap().kill();
                    let d = bed.mode.fault();
                    bed.hold(d, problems);
                    bed.relay.as_mut().unwrap().restart();
                    let healed = Instant::now();
                    let drops = bed.net.nat_drops();
                    let extra = vec![(
                        "NAT".into(),
                        format!(
                            "{drops} direct packets between nodes dropped by the routers so far"
                        ),
                    )];
                    (Some(healed), extra)
                }),
            },
        ));
    }
    bed.close();
    assert_all_passed(&reports);
}

/// 1,000 API clients (distinct endpoints and keys) connected at once, each asking twice,
/// the second time all together; then an image imported on one node and pulled by the
/// others at once; both while the load runs.
#[test]
fn many_clients_and_image_fetch() {
    let mode = Mode::get();
    let mut bed = Bed::new(Topology::Bridge, 3, mode);
    let clients = 1000;
    let users = bed.add_users(clients, 0xc11e);
    let mut reports = Vec::new();
    for round in 0..mode.rounds() {
        let users = users.clone();
        reports.push(scenario(
            &mut bed,
            Plan {
                name: "1000-clients".into(),
                fault: format!("{clients} API clients connected at once, each a user of its own"),
                run: Box::new(move |bed, _load, problems| {
                    let (extra, failed) = many_clients(bed, &users);
                    problems.extend(failed);
                    (None, extra)
                }),
            },
        ));
        let mib = if mode.long { 256 } else { 32 };
        reports.push(scenario(
            &mut bed,
            Plan {
                name: "image-fetch".into(),
                fault: format!("a {mib} MiB image imported on n1, pulled by n2 and n3 at once"),
                run: Box::new(move |bed, _load, problems| {
                    let extra = image_fetch(bed, &format!("img{round}"), mib, problems);
                    (None, extra)
                }),
            },
        ));
    }
    bed.close();
    assert_all_passed(&reports);
}

/// One client per secret key (users added by [`Bed::add_users`]), each on an endpoint
/// of its own: connects and reads linearizably (at most 64 connecting at once), waits
/// until all have, then all read again at once. Returns the figures and the problems
/// (any failed request is one).
fn many_clients(bed: &Bed, secrets: &[[u8; 32]]) -> (Vec<(String, String)>, Vec<String>) {
    let n = secrets.len();
    let targets = bed.targets.clone();
    let secrets = secrets.to_vec();
    let started = Instant::now();
    let results = bed.rt.block_on(async move {
        let all_connected = Arc::new(tokio::sync::Barrier::new(n));
        let all_done = Arc::new(tokio::sync::Barrier::new(n));
        let connecting = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = Vec::new();
        for (i, bytes) in secrets.into_iter().enumerate() {
            let to = targets[i % targets.len()].clone();
            let (all_connected, all_done, connecting) =
                (all_connected.clone(), all_done.clone(), connecting.clone());
            tasks.push(tokio::spawn(async move {
                let read = MetaGet {
                    key: Some("stability".into()),
                    stale: false,
                };
                let permit = connecting.acquire_owned().await;
                let ep = endpoint::bind(
                    SecretKey::from_bytes(&bytes),
                    SocketAddr::from((HUB_IP, 0)),
                    None,
                    vec![],
                )
                .await;
                let client = ep.map(|ep| ApiClient::new(ep, None, Duration::from_secs(30)));
                let first = match &client {
                    Ok(c) => c
                        .call(&to, read.clone())
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(format!("bind: {e}")),
                };
                drop(permit);
                all_connected.wait().await;
                let t = Instant::now();
                let second = match &client {
                    Ok(c) => c
                        .call(&to, read)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(format!("bind: {e}")),
                };
                let latency = t.elapsed();
                all_done.wait().await;
                if let Ok(c) = client {
                    c.endpoint().close().await;
                }
                (first, second, latency)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let elapsed = started.elapsed();
    let mut problems = Vec::new();
    let first_ok = results.iter().filter(|r| r.0.is_ok()).count();
    let second_ok = results.iter().filter(|r| r.1.is_ok()).count();
    for e in results
        .iter()
        .filter_map(|r| r.0.as_ref().err().or(r.1.as_ref().err()))
        .take(3)
    {
        problems.push(format!("a client's read failed: {e}"));
    }
    if first_ok < n || second_ok < n {
        problems.push(format!(
            "of {n} clients, {first_ok} got their first answer and {second_ok} their second"
        ));
    }
    let mut lat: Vec<Duration> = results
        .iter()
        .filter(|r| r.1.is_ok())
        .map(|r| r.2)
        .collect();
    lat.sort_unstable();
    let q = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p).round() as usize)
            .map_or("-".to_string(), |d| {
                format!("{:.0} ms", d.as_secs_f64() * 1e3)
            })
    };
    let extra = vec![(
        "clients".into(),
        format!(
            "{n} endpoints; {first_ok} answered on connecting, {second_ok} all at once \
                 (latency p50 {}, p99 {}, max {}); {:.1} s in all",
            q(0.5),
            q(0.99),
            q(1.0),
            elapsed.as_secs_f64()
        ),
    )];
    (extra, problems)
}

/// Writes `mib` MiB of incompressible bytes (different per `seed`).
fn random_file(path: &Path, mib: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut bytes = vec![0u8; mib << 20];
    for chunk in bytes.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(path, bytes).unwrap();
}

/// Imports a `mib` MiB image on n1 and pulls it on every other node at once.
fn image_fetch(
    bed: &Bed,
    name: &str,
    mib: usize,
    problems: &mut Vec<String>,
) -> Vec<(String, String)> {
    let src = bed.cluster.root.path().join(name);
    std::fs::create_dir_all(&src).unwrap();
    random_file(&src.join("disk.img"), mib, mib as u64);
    let t = Instant::now();
    let n1 = &bed.cluster.nodes[0];
    if let Err(e) = n1.try_cli(&["image", "import", src.to_str().unwrap(), "--name", name]) {
        problems.push(format!("image import: {e}"));
        return Vec::new();
    }
    let import = t.elapsed();
    let t = Instant::now();
    let pulls: Vec<(String, Result<Duration, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = bed.cluster.nodes[1..]
            .iter()
            .map(|node| {
                s.spawn(move || {
                    let t = Instant::now();
                    let r = node.try_cli(&["image", "pull", name]).map(|_| t.elapsed());
                    (node.name.clone(), r)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all = t.elapsed();
    let mut figures = Vec::new();
    for (node, r) in &pulls {
        match r {
            Ok(d) => figures.push(format!("{node} {:.1} s", d.as_secs_f64())),
            Err(e) => problems.push(format!("image pull on {node}: {e}")),
        }
    }
    // Every node holds it now.
    let list = n1
        .try_cli(&["--output", "json", "image", "list"])
        .unwrap_or_default();
    let holders: Vec<u64> = serde_json::from_str::<serde_json::Value>(&list)
        .ok()
        .and_then(|v| {
            let image = v.as_array()?.iter().find(|i| i["name"] == name)?.clone();
            Some(
                image["holders"]
                    .as_array()?
                    .iter()
                    .filter_map(|h| h.as_u64().or_else(|| h["node"].as_u64()))
                    .collect(),
            )
        })
        .unwrap_or_default();
    for id in 1..=bed.cluster.nodes.len() as u64 {
        if !holders.contains(&id) {
            problems.push(format!("n{id} is not listed as a holder of {name}: {list}"));
        }
    }
    vec![(
        "image".into(),
        format!(
            "import {:.1} s; pulls {} ({:.1} s for both, {:.1} MiB/s each)",
            import.as_secs_f64(),
            figures.join(", "),
            all.as_secs_f64(),
            mib as f64 / all.as_secs_f64()
        ),
    )]
}

/// Hours of mixed load with a fault every cycle, through the proxy (partitions as
/// blocked links, latency and loss), kill -9 of a node or the leader, image pulls and
/// bursts of clients. Records every cycle's report and the failures per hour: the
/// baseline for the mean time between failures. `BLIXARD_SOAK_HOURS` (default 0.05).
#[test]
#[ignore = "hours long: run by scripts/stability.sh --soak HOURS"]
fn soak() {
    let hours: f64 = std::env::var("BLIXARD_SOAK_HOURS")
        .ok()
        .and_then(|h| h.parse().ok())
        .unwrap_or(0.05);
    let mode = Mode { long: true };
    let mut bed = Bed::new(Topology::Proxied, 3, mode);
    let users = bed.add_users(200, 0xc11e);
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(hours * 3600.0);
    let mut rng = Rng::new(0x50a6);
    let mut cycles = Vec::new();
    let mut failures = Vec::new();
    let kinds = [
        "isolate-follower",
        "isolate-leader",
        "one-way",
        "latency+loss",
        "kill-follower",
        "kill-leader",
        "image-fetch",
        "client-burst",
    ];
    let mut cycle = 0;
    while Instant::now() < end {
        cycle += 1;
        let kind = kinds[rng.below(kinds.len() as u64) as usize];
        let hold = Duration::from_secs(10 + rng.below(21));
        // A cluster that cannot agree on a leader is a failure; the soak goes on.
        let leader = match bed.try_leader() {
            Ok(l) => l,
            Err(e) => {
                let at = started.elapsed().as_secs_f64() / 3600.0;
                failures.push((at, "before a cycle".to_string(), e));
                0
            }
        };
        let follower = (leader + 1 + rng.below(2) as usize) % 3;
        let plan = soak_plan(kind, hold, leader, follower, cycle, users.clone());
        let report = scenario(&mut bed, plan);
        let failed = report.failures();
        let at = started.elapsed().as_secs_f64() / 3600.0;
        if !failed.is_empty() {
            failures.push((at, kind.to_string(), failed.join("; ")));
        }
        cycles.push((kind, report));
        // A daemon that died is restarted so the soak goes on (its death was counted).
        for node in &mut bed.cluster.nodes {
            if node.child.is_none() {
                node.start(&[]);
            }
        }
        // Remove the cycle's keys so the state stays small over hours.
        cleanup(&bed, &format!("{kind}{}-", bed.rounds));
    }
    let elapsed_h = started.elapsed().as_secs_f64() / 3600.0;
    let summary = soak_summary(&cycles, &failures, elapsed_h);
    eprintln!("{summary}");
    if let Ok(path) = std::env::var("BLIXARD_SOAK_SUMMARY") {
        std::fs::write(&path, &summary).unwrap();
    }
    bed.close();
}

fn soak_plan(
    kind: &str,
    hold: Duration,
    leader: usize,
    follower: usize,
    cycle: usize,
    users: Vec<[u8; 32]>,
) -> Plan<'static> {
    let name = kind.to_string();
    let secs = hold.as_secs();
    let (fault, run): (String, Run<'static>) = match kind {
        "isolate-follower" | "isolate-leader" => {
            let victim = if kind == "isolate-leader" {
                leader
            } else {
                follower
            };
            (
                format!("n{} cut off both ways (proxy) for {secs} s", victim + 1),
                Box::new(move |bed, _, problems| {
                    let proxy = bed.proxy.as_ref().unwrap();
                    for other in (0..3).filter(|o| *o != victim) {
                        proxy.block(victim, other, true);
                        proxy.block(other, victim, true);
                    }
                    bed.hold(hold, problems);
                    bed.proxy.as_ref().unwrap().unblock_all();
                    (Some(Instant::now()), Vec::new())
                }),
            )
        }
        "one-way" => (
            format!(
                "leader n{} → follower n{} dropped (proxy) for {secs} s",
                leader + 1,
                follower + 1
            ),
            Box::new(move |bed, _, problems| {
                bed.proxy.as_ref().unwrap().block(leader, follower, true);
                bed.hold(hold, problems);
                bed.proxy.as_ref().unwrap().unblock_all();
                (Some(Instant::now()), Vec::new())
            }),
        ),
        "latency+loss" => (
            format!("every link 80 ms ± 20 ms, 10% loss for {secs} s"),
            Box::new(move |bed, _, problems| {
                bed.proxy.as_ref().unwrap().impair(Impairment {
                    delay: Duration::from_millis(80),
                    jitter: Duration::from_millis(20),
                    loss: 0.10,
                });
                bed.hold(hold, problems);
                bed.proxy.as_ref().unwrap().impair(Impairment::default());
                (Some(Instant::now()), Vec::new())
            }),
        ),
        "kill-follower" | "kill-leader" => {
            let victim = if kind == "kill-leader" {
                leader
            } else {
                follower
            };
            (
                format!("n{} killed (SIGKILL), restarted after {secs} s", victim + 1),
                Box::new(move |bed, _, problems| {
                    bed.cluster.nodes[victim].kill9();
                    bed.hold(hold, problems);
                    bed.cluster.nodes[victim].start(&[]);
                    (Some(Instant::now()), Vec::new())
                }),
            )
        }
        "image-fetch" => (
            "a 16 MiB image imported on n1, pulled by the others".into(),
            Box::new(move |bed, _, problems| {
                let extra = image_fetch(bed, &format!("soak{cycle}"), 16, problems);
                let _ = bed.cluster.nodes[0].try_cli(&["image", "rm", &format!("soak{cycle}")]);
                (None, extra)
            }),
        ),
        _ => (
            "200 API clients at once".into(),
            Box::new(move |bed, _, problems| {
                let (extra, failed) = many_clients(bed, &users);
                problems.extend(failed);
                (None, extra)
            }),
        ),
    };
    Plan { name, fault, run }
}

/// Deletes every key starting with `tag`.
fn cleanup(bed: &Bed, tag: &str) {
    let client = bed.client.clone();
    let to = bed.targets[0].clone();
    let tag = tag.to_string();
    bed.rt.block_on(async move {
        let Ok(all) = client
            .call(
                &to,
                MetaGet {
                    key: None,
                    stale: false,
                },
            )
            .await
        else {
            return;
        };
        let keys: Vec<String> = all
            .entries
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k.starts_with(&tag))
            .collect();
        let sem = Arc::new(tokio::sync::Semaphore::new(16));
        let mut tasks = Vec::new();
        for key in keys {
            let (client, to, sem) = (client.clone(), to.clone(), sem.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = sem.acquire_owned().await;
                let _ = client.call(&to, MetaSet { key, value: None }).await;
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

fn soak_summary(
    cycles: &[(&str, Report)],
    failures: &[(f64, String, String)],
    hours: f64,
) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "# Soak: {:.2} h, {} cycles, {} failures ({:.2} per hour)\n\n",
        hours,
        cycles.len(),
        failures.len(),
        failures.len() as f64 / hours.max(1e-9)
    ));
    match failures.len() {
        0 => out.push_str(&format!(
            "Mean time between failures: more than {hours:.2} h (none seen).\n\n"
        )),
        n => out.push_str(&format!(
            "Mean time between failures: {:.2} h.\n\n",
            hours / n as f64
        )),
    }
    out.push_str("| fault | cycles | failed | recovery mean (s) | recovery max (s) | writes acked | lost | linearizable |\n|---|---|---|---|---|---|---|---|\n");
    let mut kinds: Vec<&str> = cycles.iter().map(|(k, _)| *k).collect();
    kinds.sort_unstable();
    kinds.dedup();
    for kind in kinds {
        let rs: Vec<&Report> = cycles
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, r)| r)
            .collect();
        let rec: Vec<f64> = rs
            .iter()
            .filter_map(|r| match &r.recovery {
                Some(Ok(d)) => Some(d.as_secs_f64()),
                _ => None,
            })
            .collect();
        let failed = rs.iter().filter(|r| !r.failures().is_empty()).count();
        out.push_str(&format!(
            "| {kind} | {} | {failed} | {} | {} | {} | {} | {} |\n",
            rs.len(),
            if rec.is_empty() {
                "-".into()
            } else {
                format!("{:.2}", rec.iter().sum::<f64>() / rec.len() as f64)
            },
            if rec.is_empty() {
                "-".into()
            } else {
                format!("{:.2}", rec.iter().cloned().fold(0.0, f64::max))
            },
            rs.iter().map(|r| r.analysis.writes_acked).sum::<usize>(),
            rs.iter().map(|r| r.analysis.lost.len()).sum::<usize>(),
            if rs
                .iter()
                .all(|r| r.analysis.verdict == Verdict::Linearizable)
            {
                "yes"
            } else {
                "NO"
            },
        ));
    }
    if !failures.is_empty() {
        out.push_str("\n## Failures\n\n");
        for (at, kind, why) in failures {
            out.push_str(&format!("- at {at:.2} h, {kind}: {why}\n"));
        }
    }
    out
}
