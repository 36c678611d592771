//! Process tests for traces: three real daemons export their spans over OTLP/HTTP to a
//! receiver that decodes the protobufs, and one `vm create` is one trace across them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use std::process::{Command, Stdio};
use std::time::Duration;

use blixard_tests::otlp::{Receiver, Span};
use blixard_tests::runners::{write_runner, Reaper};
use blixard_tests::{binary, wait_for, Cluster, Node};

/// The one span of `trace` named `name` on node `instance` (`None`: the CLI's).
fn one<'a>(trace: &'a [Span], name: &str, instance: Option<&str>) -> &'a Span {
    let found: Vec<_> = trace
        .iter()
        .filter(|s| s.name == name && s.instance.as_deref() == instance)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "spans {name:?} on {instance:?} in {:#?}",
        tree(trace)
    );
    found[0]
}

/// The trace as `parent -> [child (node)]`, for failure messages.
fn tree(trace: &[Span]) -> BTreeMap<String, Vec<String>> {
    let name_of: BTreeMap<_, _> = trace
        .iter()
        .map(|s| (s.span_id.clone(), format!("{} ({:?})", s.name, s.instance)))
        .collect();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for s in trace {
        let parent = name_of
            .get(&s.parent)
            .cloned()
            .unwrap_or_else(|| format!("root {:?}", s.parent));
        out.entry(parent)
            .or_default()
            .push(format!("{} ({:?})", s.name, s.instance));
    }
    out
}

#[test]
fn one_vm_create_is_one_trace_across_three_nodes() {
    let receiver = Receiver::start();
    let root = tempfile::Builder::new()
        .prefix("blixard-traces")
        .tempdir()
        .unwrap();
    // Node 1 reads the endpoint from its config file, the others from the standard
    // environment variable. Spans go out every 200 ms instead of every 5 s.
    let config = root.path().join("n1.toml");
    std::fs::write(
        &config,
        format!("[telemetry]\notlp_endpoint = \"{}\"\n", receiver.endpoint()),
    )
    .unwrap();
    let mut nodes: Vec<Node> = (1..=3)
        .map(|i| Node::new(root.path(), &format!("n{i}")))
        .collect();
    for (i, node) in nodes.iter_mut().enumerate() {
        node.env
            .push(("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()));
        if i == 0 {
            node.extra = vec!["--config".into(), config.display().to_string()];
        } else {
            node.env
                .push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver.endpoint()));
        }
        node.extra
            .extend(["--label".into(), format!("host=h{}", i + 1)]);
    }
    let c = Cluster::start_nodes(root, nodes);
    let _runners = Reaper(c.root.path().to_path_buf());

    // The image is held by n1 (the leader) only; the VM may run on n3 only, so n3
    // fetches it.
    let image = c.root.path().join("sleeper");
    write_runner(&image, "exec sleep 600");
    c.nodes[0].cli_ok(&[
        "image",
        "import",
        image.to_str().unwrap(),
        "--name",
        "sleeper",
    ]);

    // The CLI talks to n2, a follower, which hands the create to the leader.
    let trace_id = traced(
        &c.nodes[1],
        &[
            "vm",
            "create",
            "web",
            "--image",
            "sleeper",
            "--constraint",
            "host=h3",
            "--wait",
            "running",
            "--wait-timeout",
            "60",
        ],
        Some(&receiver.endpoint()),
    );

    // Every span arrives: the CLI's at its exit, the nodes' within their batch delay.
    let wanted = [
        ("blixard vm create", None),
        ("api VmCreate", Some("n2")),
        ("forward VmCreate", Some("n2")),
        ("api VmCreate", Some("n1")),
        ("schedule", Some("n1")),
        ("raft propose create_vm", Some("n1")),
        ("raft apply create_vm", Some("n1")),
        ("raft apply create_vm", Some("n2")),
        ("raft apply create_vm", Some("n3")),
        ("image fetch", Some("n3")),
        ("runner exec", Some("n3")),
    ];
    let trace = wait_for("the trace's spans", Duration::from_secs(30), || {
        let trace = receiver.trace(&trace_id);
        let missing: Vec<_> = wanted
            .iter()
            .filter(|(name, node)| {
                !trace
                    .iter()
                    .any(|s| &s.name == name && s.instance.as_deref() == *node)
            })
            .collect();
        if missing.is_empty() {
            Ok(trace)
        } else {
            Err(format!("missing {missing:?}; have {:#?}", tree(&trace)))
        }
    });
    assert!(receiver.refused().is_empty(), "{:?}", receiver.refused());

    // The tree: CLI → n2's API → its forward → the leader's API → scheduling and the
    // proposal → each member's apply → n3's fetch and exec.
    let cli = one(&trace, "blixard vm create", None);
    assert_eq!(cli.parent, "", "the CLI's span is the root");
    assert_eq!(cli.service, "blixard-cli");
    let n2_api = one(&trace, "api VmCreate", Some("n2"));
    assert_eq!(n2_api.parent, cli.span_id);
    let forward = one(&trace, "forward VmCreate", Some("n2"));
    assert_eq!(forward.parent, n2_api.span_id);
    let n1_api = one(&trace, "api VmCreate", Some("n1"));
    assert_eq!(n1_api.parent, forward.span_id);
    assert_eq!(
        n1_api
            .attributes
            .get("blixard.forwarded")
            .map(String::as_str),
        Some("true")
    );
    assert_eq!(one(&trace, "schedule", Some("n1")).parent, n1_api.span_id);
    let propose = one(&trace, "raft propose create_vm", Some("n1"));
    assert_eq!(propose.parent, n1_api.span_id);
    for node in ["n1", "n2", "n3"] {
        let apply = one(&trace, "raft apply create_vm", Some(node));
        assert_eq!(apply.parent, propose.span_id, "apply on {node}");
    }
    let n3_apply = one(&trace, "raft apply create_vm", Some("n3"));
    assert_eq!(
        one(&trace, "image fetch", Some("n3")).parent,
        n3_apply.span_id
    );
    let exec = one(&trace, "runner exec", Some("n3"));
    assert_eq!(exec.parent, n3_apply.span_id);
    // The standard resource attributes.
    for s in trace.iter().filter(|s| s.instance.is_some()) {
        assert_eq!(s.service, "blixard", "{s:?}");
        assert!(s.host.as_deref().is_some_and(|h| !h.is_empty()), "{s:?}");
    }
    // Nothing of this trace was left parentless (a hop that lost the context).
    let ids: Vec<_> = trace.iter().map(|s| s.span_id.clone()).collect();
    for s in &trace {
        assert!(
            s.parent.is_empty() || ids.contains(&s.parent),
            "{} on {:?} has a parent outside the trace: {:#?}",
            s.name,
            s.instance,
            tree(&trace)
        );
    }
    assert_eq!(trace.iter().filter(|s| s.parent.is_empty()).count(), 1);

    // `--trace` without an endpoint of the CLI's own: the trace id still travels, and the
    // nodes' spans carry it (their parent, the CLI's span, is not exported).
    let id = traced(
        &c.nodes[1],
        &["cluster", "meta", "set", "owner", "ops"],
        None,
    );
    assert_ne!(id, trace_id);
    wait_for(
        "the node's span of the traced write",
        Duration::from_secs(30),
        || {
            let t = receiver.trace(&id);
            let api = t
                .iter()
                .find(|s| s.name == "api MetaSet" && s.instance.as_deref() == Some("n2"));
            match api {
                Some(api)
                    if !api.parent.is_empty() && t.iter().all(|s| s.service != "blixard-cli") =>
                {
                    Ok(())
                }
                _ => Err(format!("{:#?}", tree(&t))),
            }
        },
    );

    // Exports are counted: every batch here was taken.
    let counted = exports(&c.nodes[0]);
    assert!(counted.0 > 0 && counted.1 == 0, "{counted:?}");
}

/// Runs `blixard --trace ARGS` on `node`'s data dir, the CLI exporting its own span to
/// `endpoint` when given; returns the trace id it printed.
fn traced(node: &Node, args: &[&str], endpoint: Option<&str>) -> String {
    let mut cmd = Command::new(binary());
    cmd.arg("--data-dir")
        .arg(&node.dir)
        .arg("--trace")
        .args(args);
    match endpoint {
        Some(e) => cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", e),
        None => cmd.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT"),
    };
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "blixard {args:?}: {stderr}");
    let id = stderr
        .lines()
        .find_map(|l| l.strip_prefix("trace "))
        .unwrap_or_else(|| panic!("no trace id printed: {stderr}"))
        .trim()
        .to_string();
    assert_eq!(id.len(), 32, "{id}");
    id
}

/// `blixard_trace_exports_total` as `node` serves it: (ok, failed).
fn exports(node: &Node) -> (u64, u64) {
    let body = blixard_tests::http::get(node.served_at("metrics"), "/metrics", &[])
        .unwrap()
        .body;
    let get = |outcome: &str| {
        let prefix = format!("blixard_trace_exports_total{{outcome=\"{outcome}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {prefix} in {body}")) as u64
    };
    (get("ok"), get("failed"))
}

#[test]
fn a_collector_that_is_down_costs_the_spans_not_the_requests() {
    let root = tempfile::Builder::new()
        .prefix("blixard-traces-down")
        .tempdir()
        .unwrap();
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut node = Node::new(root.path(), "n1");
    node.env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ];
    node.start(&["--init"]);
    // Requests go on as before.
    for i in 0..5 {
        node.cli_ok(&["cluster", "meta", "set", &format!("k{i}"), "v"]);
    }
    wait_for(
        "failed exports to be counted",
        Duration::from_secs(30),
        || match exports(&node) {
            (_, 0) => Err("none failed yet".to_string()),
            _ => Ok(()),
        },
    );
    let log = node.log();
    assert_eq!(
        log.matches("exporting traces failed").count(),
        1,
        "one warning a minute at most: {log}"
    );
    assert_eq!(node.stop(), 0, "{}", node.log());
}

#[test]
fn a_bad_trace_endpoint_is_a_config_error() {
    let root = tempfile::Builder::new()
        .prefix("blixard-traces-bad")
        .tempdir()
        .unwrap();
    let config = root.path().join("bad.toml");
    std::fs::write(
        &config,
        "[telemetry]\notlp_endpoint = \"https://collector:4318\"\n",
    )
    .unwrap();
    let mut node = Node::new(root.path(), "n1");
    node.extra = vec!["--config".into(), config.display().to_string()];
    let (code, log) = node.try_start(&["--init"]).unwrap_err();
    assert_eq!(code, Some(8), "{log}");
    assert!(
        log.contains("telemetry.otlp_endpoint") && log.contains("only http://"),
        "{log}"
    );
    // The same from the environment.
    let mut node = Node::new(root.path(), "n2");
    node.env = vec![(
        "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
        "collector:4318".into(),
    )];
    let (code, log) = node.try_start(&["--init"]).unwrap_err();
    assert_eq!(code, Some(8), "{log}");
    assert!(log.contains("OTLP endpoint"), "{log}");
}
