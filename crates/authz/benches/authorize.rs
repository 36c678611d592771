//! Times `Authorizer::authorize` for a few representative requests and prints a table.
//!
//! `cargo bench -p blixard-authz --bench authorize`; `AUTHZ_BENCH_ITERS` sets the number of
//! calls per round (default 5 000); each request is timed over 7 rounds.

use std::hint::black_box;
use std::time::Instant;

use blixard_authz::{Authorizer, RequestContext, Resource, Subject};

struct Case {
    name: &'static str,
    subject: Subject,
    action: &'static str,
    resource: Resource,
    allowed: bool,
}

fn cases() -> Vec<Case> {
    let vm = Resource::Vm {
        name: "web".into(),
        tenant: "acme".into(),
        labels: vec!["tier=front".into(), "env=prod".into(), "zone=a".into()],
    };
    let operator = Subject::User {
        name: "alice".into(),
        roles: vec!["operator".into()],
        tenant: Some("acme".into()),
    };
    let viewer = Subject::User {
        name: "bob".into(),
        roles: vec!["viewer".into()],
        tenant: Some("acme".into()),
    };
    let admin = Subject::User {
        name: "admin-n1".into(),
        roles: vec!["admin".into()],
        tenant: None,
    };
    vec![
        Case {
            name: "admin writes meta (cluster:manage)",
            subject: admin.clone(),
            action: "cluster:manage",
            resource: Resource::Cluster,
            allowed: true,
        },
        Case {
            name: "tenant operator reads a labelled VM",
            subject: operator,
            action: "vm:read",
            resource: vm.clone(),
            allowed: true,
        },
        Case {
            name: "host reads the cluster",
            subject: Subject::Node { id: 2 },
            action: "cluster:read",
            resource: Resource::Cluster,
            allowed: true,
        },
        Case {
            name: "viewer manages a VM (denied)",
            subject: viewer,
            action: "vm:manage",
            resource: vm,
            allowed: false,
        },
        Case {
            name: "admin fetches blobs (schema refuses)",
            subject: admin,
            action: "blob:fetch",
            resource: Resource::Cluster,
            allowed: false,
        },
    ]
}

/// Timed rounds per request.
const ROUNDS: usize = 7;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iters: u32 = match std::env::var("AUTHZ_BENCH_ITERS") {
        Ok(v) => v.parse()?,
        Err(_) => 5_000,
    };
    let authorizer = Authorizer::with_defaults()?;
    let context = RequestContext {
        time_ms: 1_700_000_000_000,
        source: "ab".repeat(32),
    };
    println!(
        "{:<40} {:>8} {:>8} {:>8}",
        "request (µs per call)", "min", "median", "allowed"
    );
    for case in cases() {
        let verdict = authorizer.authorize(&case.subject, case.action, &case.resource, &context)?;
        if verdict.allowed != case.allowed {
            return Err(format!(
                "{}: expected allowed={}, got {verdict:?}",
                case.name, case.allowed
            )
            .into());
        }
        for _ in 0..iters / 10 {
            black_box(authorizer.authorize(
                black_box(&case.subject),
                black_box(case.action),
                black_box(&case.resource),
                black_box(&context),
            )?);
        }
        // Several rounds, reporting the fastest and the median: the machine is shared.
        let mut rounds: Vec<f64> = (0..ROUNDS)
            .map(|_| {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(authorizer.authorize(
                        black_box(&case.subject),
                        black_box(case.action),
                        black_box(&case.resource),
                        black_box(&context),
                    ))
                    .ok();
                }
                start.elapsed().as_secs_f64() * 1e6 / f64::from(iters)
            })
            .collect();
        rounds.sort_by(f64::total_cmp);
        println!(
            "{:<40} {:>8.2} {:>8.2} {:>8}",
            case.name,
            rounds[0],
            rounds[rounds.len() / 2],
            verdict.allowed
        );
    }
    Ok(())
}
