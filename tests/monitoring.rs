//! The monitoring that ships with Blixard, checked against the real thing: the alert and
//! recording rules pass `promtool check rules` and their unit tests (`promtool test
//! rules`), every alert has a unit test that fires it, every metric a dashboard panel or a
//! rule names is served by a live node, and a real Prometheus scrapes a three-node
//! cluster, loads the rules, and answers queries about it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use blixard_tests::http;
use blixard_tests::{free_port, wait_for, Cluster};
use serde_json::Value;

fn monitoring() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../monitoring")
        .canonicalize()
        .unwrap()
}

/// A tool from Debian's `prometheus` package, which scripts/test.sh installs.
fn tool(name: &str) -> PathBuf {
    let path = PathBuf::from("/usr/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: install Debian's prometheus package (scripts/test.sh does)",
        path.display()
    );
    path
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

#[test]
fn the_rules_pass_promtool_and_every_alert_has_a_test_that_fires_it() {
    let dir = monitoring();
    let text = run_ok(
        Command::new(tool("promtool"))
            .args(["check", "rules"])
            .arg(dir.join("rules.yml")),
    );
    assert!(text.contains("SUCCESS"), "{text}");
    let tests = dir.join("tests/alerts.test.yml");
    let text = run_ok(
        Command::new(tool("promtool"))
            .args(["test", "rules"])
            .arg(&tests),
    );
    assert!(text.contains("SUCCESS"), "{text}");

    // Every alert is named in a test that expects it to fire (a non-empty exp_alerts).
    let rules = std::fs::read_to_string(dir.join("rules.yml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 10, "{alerts:?}");
    let tests = std::fs::read_to_string(tests).unwrap();
    for alert in alerts {
        let fired = tests
            .split("alertname: ")
            .skip(1)
            .any(|t| t.starts_with(alert) && t.contains("exp_labels"));
        assert!(fired, "alert {alert} has no unit test that fires it");
    }
}

/// Every `blixard_…` and `process_…` metric an expression names.
fn metrics_named(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &expr[i..];
        let starts = rest.starts_with("blixard_") || rest.starts_with("process_");
        let boundary = i == 0
            || !(bytes[i - 1].is_ascii_alphanumeric()
                || bytes[i - 1] == b'_'
                || bytes[i - 1] == b':');
        if starts && boundary {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            out.insert(rest[..end].to_string());
            i += end;
        } else {
            i += 1;
        }
    }
    out
}

/// The metrics the dashboard's panels and the rules' expressions use.
fn referenced() -> BTreeSet<String> {
    let dir = monitoring();
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("grafana-dashboard.json")).unwrap())
            .unwrap();
    let mut names = BTreeSet::new();
    let mut panels = 0;
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            panels += 1;
            names.extend(metrics_named(t["expr"].as_str().unwrap()));
        }
    }
    assert!(panels > 20, "the dashboard has {panels} queries");
    assert!(names.len() > 25, "the dashboard names only {names:?}");
    let rules = std::fs::read_to_string(dir.join("rules.yml")).unwrap();
    for line in rules.lines() {
        let line = line.trim();
        if line.starts_with("expr:") || line.starts_with("sum") || line.starts_with("/ ") {
            names.extend(metrics_named(line));
        }
    }
    names
}

/// The metric families docs/monitoring.md lists in its table.
fn documented() -> BTreeSet<String> {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/monitoring.md");
    let doc = std::fs::read_to_string(doc).unwrap();
    // The reference table: the "## Metrics" section (other tables name spans).
    let (_, section) = doc.split_once("\n## Metrics\n").expect("a Metrics section");
    let section = section.split("\n## ").next().unwrap_or_default();
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect()
}

/// The families (`# TYPE` lines) a node serves at /metrics.
fn families(addr: SocketAddr) -> BTreeSet<String> {
    let r = http::get(addr, "/metrics", &[]).unwrap();
    r.body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect()
}

/// The sample names a node serves at /metrics.
fn served(addr: SocketAddr, accept: &[&str]) -> BTreeSet<String> {
    let r = http::get(addr, "/metrics", accept).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    r.body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(targets: &[SocketAddr]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let targets: Vec<String> = targets.iter().map(|a| format!("\"{a}\"")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: blixard\n    static_configs:\n      - targets: [{}]\n",
            monitoring().join("rules.yml").display(),
            targets.join(", ")
        );
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(&cfg, config).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The result vector of an instant query: (labels, value) per series.
    fn query(&self, q: &str) -> Result<Vec<(Value, String)>, String> {
        let path = format!("/api/v1/query?query={}", http::encode(q));
        let r = http::get(self.addr, &path, &[]).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&r.body).map_err(|e| format!("{e}: {}", r.body))?;
        if v["status"] != "success" {
            return Err(r.body);
        }
        Ok(v["data"]["result"]
            .as_array()
            .ok_or_else(|| r.body.clone())?
            .iter()
            .map(|s| {
                (
                    s["metric"].clone(),
                    s["value"][1].as_str().unwrap_or("").to_string(),
                )
            })
            .collect())
    }
}

#[test]
fn a_real_prometheus_scrapes_a_three_node_cluster_and_every_metric_used_is_served() {
    let mut c = Cluster::start(3, &[]);
    c.wait_voters(3);
    // Some of everything the families count: API requests, a refusal, a cache request.
    for n in &c.nodes {
        n.cli_ok(&["cluster", "status"]);
        n.cli_ok(&["node", "stats"]);
    }
    let cache = c.nodes[0].served_at("cache");
    assert_eq!(
        http::get(cache, "/nix-cache-info", &[]).unwrap().status,
        200
    );
    let metrics: Vec<SocketAddr> = c.nodes.iter().map(|n| n.served_at("metrics")).collect();

    // Every metric a panel or a rule uses is served, in both formats.
    let mut seen = BTreeSet::new();
    for m in &metrics {
        seen.extend(served(*m, &[]));
        let open = served(*m, &["Accept: application/openmetrics-text; version=1.0.0"]);
        assert!(open.contains("blixard_raft_has_leader"), "{open:?}");
    }
    let missing: Vec<String> = referenced()
        .into_iter()
        .filter(|name| {
            !seen.contains(name)
                && !seen.contains(&format!("{name}_bucket"))
                && !seen.contains(&format!("{name}_total"))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "used but not served: {missing:?}; served: {seen:?}"
    );
    // The reference table in docs/monitoring.md is exactly what a node serves.
    let mut served_families = BTreeSet::new();
    for m in &metrics {
        served_families.extend(families(*m));
    }
    let documented = documented();
    assert!(documented.len() > 40, "{documented:?}");
    let undocumented: Vec<&String> = served_families.difference(&documented).collect();
    let unserved: Vec<&String> = documented.difference(&served_families).collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "served but not in docs/monitoring.md: {undocumented:?}; documented but not served: {unserved:?}"
    );

    // node stats agrees with the metrics.
    let stats: Value =
        serde_json::from_str(&c.nodes[0].cli_ok(&["--output", "json", "node", "stats"])).unwrap();
    assert_eq!(stats["members"]["voter/active"], 3, "{stats}");
    assert!(stats["api_requests_ok"].as_u64().unwrap() >= 2, "{stats}");

    let prom = Prometheus::start(&metrics);
    let all_have_a_leader = wait_for(
        "Prometheus to see a leader on every node",
        Duration::from_secs(60),
        || {
            let r = prom.query("blixard_raft_has_leader")?;
            if r.len() == 3 && r.iter().all(|(_, v)| v == "1") {
                Ok(r)
            } else {
                Err(format!("{r:?}; prometheus log: {}", prom.log()))
            }
        },
    );
    assert!(all_have_a_leader.iter().all(|(l, _)| l["job"] == "blixard"));
    let leaders = prom.query("sum(blixard_raft_is_leader)").unwrap();
    assert_eq!(leaders[0].1, "1", "{leaders:?}");
    // The rules load and evaluate in a real Prometheus; no alert fires on a healthy cluster.
    wait_for("the rules to be evaluated", Duration::from_secs(30), || {
        let r = http::get(prom.addr, "/api/v1/rules", &[]).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&r.body).map_err(|e| e.to_string())?;
        let groups = v["data"]["groups"].as_array().cloned().unwrap_or_default();
        let rules: Vec<&Value> = groups
            .iter()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        let healthy = rules.iter().filter(|r| r["health"] == "ok").count();
        if groups.len() == 2 && healthy == rules.len() && healthy > 15 {
            Ok(())
        } else {
            Err(r.body)
        }
    });
    let firing = prom.query("ALERTS{alertstate=\"firing\"}").unwrap();
    assert!(
        firing.is_empty(),
        "alerts firing on a healthy cluster: {firing:?}"
    );

    // A node that stops is seen down.
    c.nodes[2].stop();
    let stopped = metrics[2].to_string();
    wait_for("Prometheus to see n3 down", Duration::from_secs(30), || {
        let r = prom.query("up == 0")?;
        if r.len() == 1 && r[0].0["instance"] == stopped.as_str() {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
}

#[test]
fn the_metrics_endpoint_cannot_be_pinned_by_idle_connections() {
    let c = Cluster::start(1, &[]);
    let m = c.nodes[0].served_at("metrics");
    // Hold every connection slot without sending a request.
    let idle: Vec<std::net::TcpStream> = (0..32)
        .map(|_| std::net::TcpStream::connect(m).unwrap())
        .collect();
    // One more is closed at once, without an answer.
    wait_for(
        "a connection beyond the limit to be closed",
        Duration::from_secs(5),
        || match http::get(m, "/metrics", &[]) {
            Err(_) => Ok(()),
            Ok(r) => Err(format!("answered {}", r.status)),
        },
    );
    // The idle ones are closed after the head timeout (10 s); then scrapes work again.
    let r = wait_for("a scrape to work again", Duration::from_secs(30), || {
        http::get(m, "/metrics", &[]).map_err(|e| e.to_string())
    });
    assert_eq!(r.status, 200);
    assert!(r.body.contains("blixard_raft_has_leader 1"), "{}", r.body);
    drop(idle);
    // Not a path or a method it serves.
    assert_eq!(http::get(m, "/", &[]).unwrap().status, 404);
}

/// The lines a child process prints, as they come (read on a thread of their own).
fn lines_of(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead as _;
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Collects JSON lines from `rx` until `done` holds for what was collected (or fails).
fn events_until(
    rx: &std::sync::mpsc::Receiver<String>,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while !done(&seen) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(serde_json::from_str(&line).unwrap()),
            Err(_) => panic!("no {what} within 60 s; saw {seen:?}"),
        }
    }
    seen
}

#[test]
fn events_stream_the_changes_as_members_apply_them() {
    let c = Cluster::start(2, &[]);
    let _runners = blixard_tests::runners::Reaper(c.root.path().to_path_buf());
    let n1 = &c.nodes[0];
    // The latest changes, once: the second member's join among them.
    let latest: Vec<Value> = n1
        .cli_ok(&["events", "--output", "json", "--kind", "member"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        latest
            .iter()
            .any(|e| e["kind"] == "join" && e["name"] == "n2"),
        "{latest:?}"
    );
    assert!(latest.iter().all(|e| e["topic"] == "member"), "{latest:?}");

    // A stream of one kind from the follower, as a VM is created, placed and runs.
    let mut follow = Command::new(blixard_tests::binary())
        .arg("--data-dir")
        .arg(&c.nodes[1].dir)
        .args(["events", "--follow", "--kind", "vm", "--output", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = lines_of(&mut follow);
    blixard_tests::runners::import_runner(n1, c.root.path(), "sleeper", "exec sleep 600");
    n1.cli_ok(&["cluster", "meta", "set", "not", "a-vm-event"]);
    n1.cli_ok(&["vm", "create", "web", "--image", "sleeper"]);
    let seen = events_until(&lines, "running report", |seen| {
        seen.iter()
            .any(|e| e["kind"] == "report_vm" && e["what"].as_str().unwrap().starts_with("running"))
    });
    let _ = follow.kill();
    let _ = follow.wait();
    let kinds: Vec<&str> = seen.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"create_vm"), "{seen:?}");
    assert!(
        seen.iter()
            .any(|e| e["what"].as_str().unwrap().starts_with("starting on n")),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|e| e["topic"] == "vm" && e["name"] == "default/web"),
        "{seen:?}"
    );
    let indexes: Vec<u64> = seen.iter().map(|e| e["index"].as_u64().unwrap()).collect();
    assert!(
        indexes.windows(2).all(|w| w[0] < w[1]),
        "in index order: {indexes:?}"
    );

    // Both members streamed the same changes: the follower's are the leader's.
    let after = indexes[0] - 1;
    let on_leader: Vec<Value> = n1
        .cli_ok(&[
            "events",
            "--output",
            "json",
            "--kind",
            "vm",
            "--after",
            &after.to_string(),
        ])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // (Each applied them at its own time: `at_ms` is the member's.)
    let without_time = |events: &[Value]| -> Vec<Value> {
        events
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e.as_object_mut().unwrap().remove("at_ms");
                e
            })
            .collect()
    };
    assert_eq!(
        without_time(&on_leader[..seen.len()]),
        without_time(&seen),
        "leader and follower agree"
    );

    // Every tenant's changes: a viewer bound to no tenant may watch; a tenant's may not.
    let dir = c.root.path();
    for (name, tenant, code) in [("vic", None, 0), ("tess", Some("default"), 4)] {
        let key = SecretKeyFile::new(dir, name);
        let mut args = vec![
            "user",
            "add",
            name,
            "--key",
            &key.public,
            "--role",
            "viewer",
        ];
        if let Some(t) = tenant {
            args.extend(["--tenant", t]);
        }
        n1.cli_ok(&args);
        let out = Command::new(blixard_tests::binary())
            .arg("--data-dir")
            .arg(&n1.dir)
            .arg("--credential")
            .arg(&key.path)
            .args(["events", "--kind", "vm"])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(code),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A user's secret key in a file, and its public key.
struct SecretKeyFile {
    path: PathBuf,
    public: String,
}

impl SecretKeyFile {
    fn new(dir: &Path, name: &str) -> Self {
        let path = dir.join(format!("{name}.key"));
        let secret = blixard_net::keys::create(&path).unwrap();
        Self {
            path,
            public: blixard_net::key_of(&secret.public()).to_string(),
        }
    }
}
