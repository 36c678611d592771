//! The stability suite's load and measurements: clients writing and reading registers
//! and inserting unique keys through every node, each operation recorded with the time
//! it was sent and answered; the final reads, the recovery probe, per-node metrics and
//! the per-scenario report.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blixard_net::api::{ApiError, MetaGet, MetaSet, StatusRequest};
use blixard_net::client::{ApiClient, ClientError};
use blixard_net::EndpointAddr;
use serde_json::{json, Value};
use tokio::runtime::Handle;

use crate::linear::{self, Kind, Verdict};
use crate::proxy::Rng;
use crate::{clock_ticks_per_sec, proc_cpu_ticks, proc_status_kib};

/// One operation as the client saw it.
#[derive(Clone, Debug)]
pub struct Rec {
    /// The node (index in the targets) it was sent to.
    pub node: usize,
    pub key: String,
    pub kind: Kind,
    pub call: Instant,
    pub ret: Instant,
    /// Why it failed; a failed write's outcome is unknown.
    pub error: Option<String>,
}

impl Rec {
    pub fn is_write(&self) -> bool {
        matches!(self.kind, Kind::Write(_))
    }
}

/// Writers and readers through every node, until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    errors: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Rec>>>,
    pub tag: String,
}

/// The shape of a load.
#[derive(Clone, Debug)]
pub struct LoadShape {
    /// Clients per node, each with one operation in flight.
    pub per_node: usize,
    /// Shared registers (keys every client writes and reads).
    pub registers: usize,
    /// A pause between one client's operations (none: as fast as answers come).
    pub pace: Option<Duration>,
    pub seed: u64,
}

impl Load {
    /// Starts the clients on `rt`. Keys start with `tag`: registers `{tag}r<k>`, unique
    /// inserts `{tag}u<client>-<i>`.
    pub fn start(
        rt: &Handle,
        client: &Arc<ApiClient>,
        targets: &[EndpointAddr],
        shape: &LoadShape,
        tag: &str,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for (node, to) in targets.iter().enumerate() {
            for c in 0..shape.per_node {
                let me = node * shape.per_node + c;
                let (client, to) = (client.clone(), to.clone());
                let (stop, acked, errors) = (stop.clone(), acked.clone(), errors.clone());
                let (tag, shape) = (tag.to_string(), shape.clone());
                let mut rng = Rng::new(shape.seed ^ (me as u64 + 1).wrapping_mul(0x51_7cc1));
                tasks.push(rt.spawn(async move {
                    let mut recs = Vec::new();
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let dice = rng.below(100);
                        let (key, kind) = if dice < 40 {
                            let k = rng.below(shape.registers.max(1) as u64);
                            (format!("{tag}r{k}"), Kind::Write(format!("{me}-{i}")))
                        } else if dice < 60 {
                            let k = rng.below(shape.registers.max(1) as u64);
                            (format!("{tag}r{k}"), Kind::Read(None))
                        } else {
                            (format!("{tag}u{me}-{i}"), Kind::Write("1".into()))
                        };
                        i += 1;
                        let call = Instant::now();
                        let (kind, error) = match kind {
                            Kind::Write(v) => {
                                let set = MetaSet {
                                    key: key.clone(),
                                    value: Some(v.clone()),
                                };
                                let r = client.call(&to, set).await;
                                (Kind::Write(v), r.err().map(|e| e.to_string()))
                            }
                            Kind::Read(_) => {
                                let get = MetaGet {
                                    key: Some(key.clone()),
                                    stale: false,
                                };
                                match client.call(&to, get).await {
                                    Ok(m) => (Kind::Read(value_of(&m.entries, &key)), None),
                                    // Answered after the read barrier: the key is absent.
                                    Err(ClientError::Api(ApiError::Rejected(m)))
                                        if m.starts_with("no metadata key") =>
                                    {
                                        (Kind::Read(None), None)
                                    }
                                    Err(e) => (Kind::Read(None), Some(e.to_string())),
                                }
                            }
                        };
                        let failed = error.is_some();
                        recs.push(Rec {
                            node,
                            key,
                            kind,
                            call,
                            ret: Instant::now(),
                            error,
                        });
                        if failed {
                            errors.fetch_add(1, Ordering::Relaxed);
                            // A node cut off fails fast once its connection is gone.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        } else {
                            acked.fetch_add(1, Ordering::Relaxed);
                            if let Some(p) = shape.pace {
                                tokio::time::sleep(p).await;
                            }
                        }
                    }
                    recs
                }));
            }
        }
        Load {
            stop,
            acked,
            errors,
            tasks,
            tag: tag.to_string(),
        }
    }

    /// Operations answered successfully so far.
    pub fn acked(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }

    pub fn errors(&self) -> usize {
        self.errors.load(Ordering::Relaxed)
    }

    /// Waits until `n` more operations than now are answered, failing after `within`.
    pub fn wait_progress(&self, n: usize, within: Duration) -> Result<Duration, String> {
        let since = self.acked();
        let started = Instant::now();
        let deadline = started + within;
        loop {
            let got = self.acked() - since;
            if got >= n {
                return Ok(started.elapsed());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the load made {got} of {n} operations in {within:?} ({} errors)",
                    self.errors()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the clients and returns every operation they made.
    pub fn stop(self, rt: &Handle) -> Vec<Rec> {
        self.stop.store(true, Ordering::Relaxed);
        let tasks = self.tasks;
        rt.block_on(async move {
            let mut all = Vec::new();
            for t in tasks {
                if let Ok(recs) = t.await {
                    all.extend(recs);
                }
            }
            all
        })
    }
}

fn value_of(entries: &[(String, String)], key: &str) -> Option<String> {
    entries
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
}

/// A linearizable read of every key, through one node.
#[derive(Clone, Debug)]
pub struct FinalRead {
    pub node: usize,
    pub call: Instant,
    pub ret: Instant,
    pub entries: HashMap<String, String>,
}

/// Reads every key through each node (linearizably), retrying each for `within`.
pub fn final_reads(
    rt: &Handle,
    client: &Arc<ApiClient>,
    targets: &[EndpointAddr],
    within: Duration,
) -> Result<Vec<FinalRead>, String> {
    let mut out = Vec::new();
    for (node, to) in targets.iter().enumerate() {
        let deadline = Instant::now() + within;
        loop {
            let call = Instant::now();
            let get = MetaGet {
                key: None,
                stale: false,
            };
            match rt.block_on(client.call(to, get)) {
                Ok(m) => {
                    out.push(FinalRead {
                        node,
                        call,
                        ret: Instant::now(),
                        entries: m.entries.into_iter().collect(),
                    });
                    break;
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("the final read through node {node} failed: {e}"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
    Ok(out)
}

/// Probes until every node names the same leader in the same term and a write through
/// each of them is applied; returns how long that took from `healed`, and the probes'
/// operations (part of the history).
pub fn recover(
    rt: &Handle,
    probe: &Arc<ApiClient>,
    targets: &[EndpointAddr],
    tag: &str,
    healed: Instant,
    within: Duration,
) -> (Result<Duration, String>, Vec<Rec>) {
    let mut recs = Vec::new();
    let mut round = 0u64;
    let deadline = healed + within;
    loop {
        round += 1;
        let status = rt.block_on(async {
            let mut seen = Vec::new();
            for to in targets {
                let s = probe.call(to, StatusRequest { stale: true }).await;
                seen.push(s.map(|s| (s.raft.leader, s.raft.term)).ok());
            }
            seen
        });
        let agreed = status.iter().all(|s| {
            s.is_some_and(|(l, t)| l.is_some() && Some((l, t)) == status[0].map(|x| (x.0, x.1)))
        });
        let mut probes_ok = false;
        if agreed {
            let writes = rt.block_on(async {
                let calls = targets.iter().enumerate().map(|(node, to)| {
                    let key = format!("{tag}p{node}");
                    let value = format!("probe-{round}");
                    let (probe, to) = (probe.clone(), to.clone());
                    async move {
                        let call = Instant::now();
                        let set = MetaSet {
                            key: key.clone(),
                            value: Some(value.clone()),
                        };
                        let r = probe.call(&to, set).await;
                        Rec {
                            node,
                            key,
                            kind: Kind::Write(value),
                            call,
                            ret: Instant::now(),
                            error: r.err().map(|e| e.to_string()),
                        }
                    }
                });
                futures_join_all(calls).await
            });
            probes_ok = writes.iter().all(|r| r.error.is_none());
            recs.extend(writes);
        }
        if probes_ok {
            return (Ok(healed.elapsed()), recs);
        }
        if Instant::now() > deadline {
            return (
                Err(format!(
                    "not recovered {within:?} after the heal: statuses {status:?}"
                )),
                recs,
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Awaits every future (no extra dependency for a join).
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// What one node says about itself, and what /proc says about its process.
#[derive(Clone, Debug, Default)]
pub struct NodeMetrics {
    pub pid: Option<u32>,
    pub role: String,
    pub leader: Option<u64>,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub rss_kib: Option<u64>,
    pub cpu_secs: Option<f64>,
}

/// Every node's status (read locally) and its process's memory and CPU time.
pub fn metrics(
    rt: &Handle,
    client: &Arc<ApiClient>,
    targets: &[EndpointAddr],
    pids: &[Option<u32>],
) -> Vec<NodeMetrics> {
    let tick = clock_ticks_per_sec();
    targets
        .iter()
        .enumerate()
        .map(|(i, to)| {
            let pid = pids.get(i).copied().flatten();
            let mut m = NodeMetrics {
                pid,
                rss_kib: pid.and_then(|p| proc_status_kib(p, "VmRSS")),
                cpu_secs: pid.and_then(proc_cpu_ticks).map(|t| t as f64 / tick),
                ..Default::default()
            };
            if let Ok(s) = rt.block_on(client.call(to, StatusRequest { stale: true })) {
                m.role = s.raft.role.clone();
                m.leader = s.raft.leader;
                m.term = s.raft.term;
                m.commit = s.raft.commit;
                m.applied = s.raft.applied;
            } else {
                m.role = "unreachable".into();
            }
            m
        })
        .collect()
}

/// What a history says: counts, lost writes, the checker's verdict, the errors seen.
#[derive(Clone, Debug)]
pub struct Analysis {
    pub writes_acked: usize,
    pub writes_unknown: usize,
    pub reads_ok: usize,
    pub reads_failed: usize,
    /// Acknowledged unique inserts missing from a final read.
    pub lost: Vec<String>,
    pub verdict: Verdict,
    pub check_time: Duration,
    /// Errors by kind (numbers and ids blanked), with counts.
    pub errors: BTreeMap<String, usize>,
    /// Latency of acknowledged writes: p50, p99, max.
    pub write_latency: (Duration, Duration, Duration),
}

/// Builds the history from the load's and the probes' operations and the final reads,
/// checks it, and counts.
pub fn analyse(recs: &[Rec], finals: &[FinalRead], tag: &str) -> Analysis {
    let t0 = recs
        .iter()
        .map(|r| r.call)
        .chain(finals.iter().map(|f| f.call))
        .min()
        .unwrap_or_else(Instant::now);
    let ns = |t: Instant| t.saturating_duration_since(t0).as_nanos() as u64;
    let mut ops = Vec::new();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let (mut writes_acked, mut writes_unknown, mut reads_ok, mut reads_failed) = (0, 0, 0, 0);
    let mut latencies = Vec::new();
    for r in recs {
        if let Some(e) = &r.error {
            *errors.entry(error_kind(e)).or_default() += 1;
        }
        match (&r.kind, &r.error) {
            (Kind::Write(_), None) => {
                writes_acked += 1;
                latencies.push(r.ret - r.call);
            }
            (Kind::Write(_), Some(_)) => writes_unknown += 1,
            (Kind::Read(_), None) => reads_ok += 1,
            (Kind::Read(_), Some(_)) => {
                reads_failed += 1;
                continue;
            }
        }
        ops.push(linear::Op {
            key: r.key.clone(),
            kind: r.kind.clone(),
            call: ns(r.call),
            ret: r.error.is_none().then(|| ns(r.ret)),
        });
    }
    let keys: BTreeSet<&str> = recs.iter().map(|r| r.key.as_str()).collect();
    let mut lost = BTreeSet::new();
    for f in finals {
        for key in &keys {
            ops.push(linear::Op {
                key: key.to_string(),
                kind: Kind::Read(f.entries.get(*key).cloned()),
                call: ns(f.call),
                ret: Some(ns(f.ret)),
            });
        }
        for r in recs {
            let unique = r.key.starts_with(&format!("{tag}u"));
            if unique && r.error.is_none() && r.is_write() && !f.entries.contains_key(&r.key) {
                lost.insert(r.key.clone());
            }
        }
    }
    let started = Instant::now();
    let verdict = linear::check(&ops);
    let check_time = started.elapsed();
    latencies.sort_unstable();
    let pick = |q: f64| -> Duration {
        if latencies.is_empty() {
            Duration::ZERO
        } else {
            latencies[((latencies.len() - 1) as f64 * q).round() as usize]
        }
    };
    Analysis {
        writes_acked,
        writes_unknown,
        reads_ok,
        reads_failed,
        lost: lost.into_iter().collect(),
        verdict,
        check_time,
        errors,
        write_latency: (pick(0.5), pick(0.99), pick(1.0)),
    }
}

/// An error message with node ids and numbers blanked, so alike errors count together.
pub fn error_kind(e: &str) -> String {
    let mut out = String::new();
    let mut token = String::new();
    let flush = |token: &mut String, out: &mut String| {
        let hexish = token.len() >= 6 && token.chars().all(|c| c.is_ascii_hexdigit());
        if token.chars().all(|c| c.is_ascii_digit()) && !token.is_empty() {
            out.push('N');
        } else if hexish {
            out.push_str("<id>");
        } else {
            out.push_str(token);
        }
        token.clear();
    };
    for c in e.chars() {
        if c.is_ascii_alphanumeric() {
            token.push(c);
        } else {
            flush(&mut token, &mut out);
            out.push(c);
        }
    }
    flush(&mut token, &mut out);
    out.chars().take(100).collect()
}

/// One scenario's outcome.
#[derive(Clone, Debug)]
pub struct Report {
    pub scenario: String,
    pub mode: String,
    /// What was done to the cluster, and for how long.
    pub fault: String,
    pub fault_time: Duration,
    /// From the heal until the cluster agreed on a leader and wrote through every node;
    /// `None` where the scenario has no heal.
    pub recovery: Option<Result<Duration, String>>,
    pub analysis: Analysis,
    pub before: Vec<NodeMetrics>,
    pub after: Vec<NodeMetrics>,
    /// Scenario-specific figures.
    pub extra: Vec<(String, String)>,
    /// Problems found besides the history's (a node that died, a stalled load).
    pub problems: Vec<String>,
}

impl Report {
    pub fn linearizable(&self) -> bool {
        self.analysis.verdict == Verdict::Linearizable
    }

    /// Why the scenario failed, if it did: writes lost, a history no order explains, no
    /// recovery, or another problem.
    pub fn failures(&self) -> Vec<String> {
        let mut out = self.problems.clone();
        if !self.analysis.lost.is_empty() {
            out.push(format!(
                "{} acknowledged writes lost, e.g. {:?}",
                self.analysis.lost.len(),
                &self.analysis.lost[..self.analysis.lost.len().min(5)]
            ));
        }
        match &self.analysis.verdict {
            Verdict::Linearizable => {}
            Verdict::Violation(why) => out.push(why.clone()),
            Verdict::Undecided(why) => out.push(format!("linearizability undecided: {why}")),
        }
        if let Some(Err(e)) = &self.recovery {
            out.push(e.clone());
        }
        out
    }

    pub fn json(&self) -> Value {
        let a = &self.analysis;
        let metrics = |m: &[NodeMetrics]| -> Value {
            m.iter()
                .map(|n| {
                    json!({
                        "pid": n.pid, "role": n.role, "leader": n.leader, "term": n.term,
                        "commit": n.commit, "applied": n.applied,
                        "rss_kib": n.rss_kib, "cpu_secs": n.cpu_secs,
                    })
                })
                .collect()
        };
        json!({
            "scenario": self.scenario,
            "mode": self.mode,
            "fault": self.fault,
            "fault_secs": self.fault_time.as_secs_f64(),
            "recovery_secs": match &self.recovery {
                Some(Ok(d)) => json!(d.as_secs_f64()),
                Some(Err(_)) => json!("not recovered"),
                None => Value::Null,
            },
            "writes_acked": a.writes_acked,
            "writes_unknown": a.writes_unknown,
            "writes_lost": a.lost.len(),
            "reads_ok": a.reads_ok,
            "reads_failed": a.reads_failed,
            "linearizable": match &a.verdict {
                Verdict::Linearizable => json!(true),
                Verdict::Violation(_) => json!(false),
                Verdict::Undecided(_) => json!("undecided"),
            },
            "check_secs": a.check_time.as_secs_f64(),
            "write_latency_ms": {
                "p50": a.write_latency.0.as_secs_f64() * 1e3,
                "p99": a.write_latency.1.as_secs_f64() * 1e3,
                "max": a.write_latency.2.as_secs_f64() * 1e3,
            },
            "errors": a.errors,
            "before": metrics(&self.before),
            "after": metrics(&self.after),
            "extra": self.extra.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "failures": self.failures(),
        })
    }

    /// Prints the report and appends it, as one JSON line, to `BLIXARD_STABILITY_REPORT`
    /// when that is set (scripts/stability.sh renders the table from it).
    pub fn emit(&self) {
        let a = &self.analysis;
        let recovery = match &self.recovery {
            Some(Ok(d)) => format!("{:.2} s", d.as_secs_f64()),
            Some(Err(_)) => "NOT RECOVERED".into(),
            None => "-".into(),
        };
        let errors: usize = a.errors.values().sum();
        eprintln!(
            "\n== stability: {} ({}) ==\nfault: {} for {:.1} s\nrecovery after heal: {recovery}\n\
             writes acknowledged {}, unknown {}, lost {}; reads {} ok, {} failed; \
             linearizable: {} (checked in {:.2} s)\nwrite latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n\
             errors seen ({errors}): {:?}",
            self.scenario,
            self.mode,
            self.fault,
            self.fault_time.as_secs_f64(),
            a.writes_acked,
            a.writes_unknown,
            a.lost.len(),
            a.reads_ok,
            a.reads_failed,
            match &a.verdict {
                Verdict::Linearizable => "yes",
                Verdict::Violation(_) => "NO",
                Verdict::Undecided(_) => "undecided",
            },
            a.check_time.as_secs_f64(),
            a.write_latency.0.as_secs_f64() * 1e3,
            a.write_latency.1.as_secs_f64() * 1e3,
            a.write_latency.2.as_secs_f64() * 1e3,
            a.errors,
        );
        for (i, (b, af)) in self.before.iter().zip(&self.after).enumerate() {
            eprintln!(
                "n{}: {} → {}, term {} → {}, commit {} → {}, applied {} → {}, RSS {} → {} MiB, CPU {:.1} s",
                i + 1,
                b.role,
                af.role,
                b.term,
                af.term,
                b.commit,
                af.commit,
                b.applied,
                af.applied,
                b.rss_kib.map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
                af.rss_kib.map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
                match (b.cpu_secs, af.cpu_secs) {
                    (Some(x), Some(y)) if b.pid == af.pid => y - x,
                    // Restarted: only the new process's time is known.
                    (_, Some(y)) => y,
                    _ => f64::NAN,
                },
            );
        }
        for (k, v) in &self.extra {
            eprintln!("{k}: {v}");
        }
        for f in self.failures() {
            eprintln!("FAILURE: {f}");
        }
        if let Ok(path) = std::env::var("BLIXARD_STABILITY_REPORT") {
            use std::io::Write;
            let line = format!("{}\n", self.json());
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path);
            match file {
                Ok(mut f) => {
                    let _ = f.write_all(line.as_bytes());
                }
                Err(e) => eprintln!("warning: cannot append to {path}: {e}"),
            }
        }
    }
}

/// Samples the peak resident memory of processes in the background, until stopped.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<u64>>,
}

impl RssSampler {
    /// Samples `pids` every 100 ms.
    pub fn start(pids: Vec<Option<u32>>) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = vec![0u64; pids.len()];
            while !flag.load(Ordering::Relaxed) {
                for (i, pid) in pids.iter().enumerate() {
                    if let Some(kib) = pid.and_then(|p| proc_status_kib(p, "VmRSS")) {
                        peak[i] = peak[i].max(kib);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        });
        RssSampler { stop, handle }
    }

    /// The peak of each process, in KiB (0: never seen).
    pub fn stop(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}
