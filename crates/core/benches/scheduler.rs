//! Scheduler benchmark: placing 10,000 VMs on 1,000 hosts, one decision after another,
//! with the ledger updated after each (as the leader's scheduling round does).
//!
//! Run: `cargo bench -p blixard-core --bench scheduler`. Prints a markdown table.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Instant;

use blixard_core::{
    place, Capacity, EndpointKey, Ledger, Member, MemberRole, MemberStatus, NodeId, RestartPolicy,
    SchedulerConfig, Strategy, VmSpec,
};

const HOSTS: u64 = 1_000;
const VMS: u64 = 10_000;
const TARGET_SECS: f64 = 1.0;

fn hosts() -> Vec<Member> {
    (1..=HOSTS)
        .map(|i| Member {
            id: NodeId(i),
            name: format!("h{i}"),
            endpoint: EndpointKey([0; 32]),
            addrs: Vec::new(),
            labels: BTreeMap::from([("zone".to_string(), format!("z{}", i % 4))]),
            capacity: Capacity {
                vcpus: 64,
                memory_mib: 256 * 1024,
            },
            role: MemberRole::Voter,
            status: MemberStatus::Active,
            joined_at_ms: 0,
        })
        .collect()
}

fn vm(i: u64) -> VmSpec {
    let mut constraints = BTreeMap::new();
    if i.is_multiple_of(10) {
        constraints.insert("zone".to_string(), format!("z{}", i % 4));
    }
    VmSpec {
        name: format!("vm{i}"),
        tenant: "bench".into(),
        image: "img".into(),
        vcpus: 1 + (i % 4) as u32,
        memory_mib: 512 << (i % 4),
        labels: BTreeMap::new(),
        constraints,
        anti_affinity: i.is_multiple_of(7).then(|| format!("group{}", i % 50)),
        restart: RestartPolicy::Always,
        ready_marker: None,
    }
}

fn run(strategy: Strategy) -> (f64, u64) {
    let members = hosts();
    let config = SchedulerConfig {
        strategy,
        ..SchedulerConfig::default()
    };
    let mut ledger = Ledger::default();
    let mut placed = 0;
    let started = Instant::now();
    for i in 0..VMS {
        let spec = vm(i);
        if let Ok(node) = place(&members, &spec, &ledger, &config) {
            ledger.add_spec(&spec, node);
            placed += 1;
        }
    }
    (started.elapsed().as_secs_f64(), placed)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!("| strategy | VMs placed | hosts | total | per VM |");
    println!("|---|---|---|---|---|");
    let mut worst: f64 = 0.0;
    for strategy in [Strategy::BinPack, Strategy::Spread] {
        let (secs, placed) = run(strategy);
        worst = worst.max(secs);
        println!(
            "| {strategy:?} | {placed} of {VMS} | {HOSTS} | {:.0} ms | {:.1} µs |",
            secs * 1000.0,
            secs * 1e6 / VMS as f64
        );
    }
    println!(
        "\nslowest: {:.0} ms (target < {:.0} ms) {}",
        worst * 1000.0,
        TARGET_SECS * 1000.0,
        if worst < TARGET_SECS {
            "met"
        } else {
            "NOT met"
        }
    );
}
