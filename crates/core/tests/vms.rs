//! VMs in the state machine: quotas checked in apply, placements re-checked, and the
//! scheduler's rules.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use blixard_core::{
    place, ApplyError, BlobHash, Capacity, ClusterId, Command, Desired, EndpointKey, Image,
    JoinRequest, NewMember, NodeId, Phase, Quota, RestartPolicy, SchedulerConfig, State, Strategy,
    VmSpec,
};

fn member(n: u8, vcpus: u32, memory_mib: u64, labels: &[(&str, &str)]) -> NewMember {
    NewMember {
        name: format!("node{n}"),
        endpoint: EndpointKey([n; 32]),
        addrs: vec![SocketAddr::from(([127, 0, 0, 1], 7000 + u16::from(n)))],
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        capacity: Capacity { vcpus, memory_mib },
    }
}

/// A one-node cluster (node 1 in zone a) at cluster version `version`.
fn bootstrapped_at(version: u32) -> State {
    let mut s = State::new();
    s.apply(&Command::Bootstrap {
        cluster_id: ClusterId([1; 16]),
        name: "t".into(),
        member: member(1, 4, 4096, &[("zone", "a")]),
        admin: EndpointKey([200; 32]),
        now_ms: 1,
    })
    .unwrap();
    s.apply(&Command::SetClusterVersion { version }).unwrap();
    s
}

/// A cluster of `hosts` (4 vCPUs / 4 GiB each; node 1 in zone a, then alternating b, a),
/// with tenant acme and image web.
fn cluster(hosts: u8) -> State {
    let mut s = bootstrapped_at(blixard_core::LOG_VERSION);
    for n in 2..=hosts {
        let hash = [n; 32];
        s.apply(&Command::CreateJoinToken {
            token_hash: hash,
            now_ms: 1,
            expires_at_ms: 1_000,
        })
        .unwrap();
        let zone = if n % 2 == 0 { "b" } else { "a" };
        s.apply(&Command::Join(JoinRequest {
            node: NodeId(u64::from(n)),
            token_hash: hash,
            now_ms: 2,
            member: member(n, 4, 4096, &[("zone", zone)]),
            admin: EndpointKey([100 + n; 32]),
        }))
        .unwrap();
        s.apply(&Command::SetRole {
            node: NodeId(u64::from(n)),
            role: blixard_core::MemberRole::Voter,
        })
        .unwrap();
    }
    s.apply(&Command::CreateTenant {
        name: "acme".into(),
        now_ms: 3,
    })
    .unwrap();
    s.apply(&Command::AddImage(Image {
        name: "web".into(),
        manifest: BlobHash([9; 32]),
        root: "/nix/store/x-web".into(),
        store_dir: "/nix/store".into(),
        nar_count: 1,
        nar_size: 10,
        holders: [NodeId(1)].into(),
        pinned: false,
        tenant: None,
        created_at_ms: 3,
    }))
    .unwrap();
    s
}

fn spec(name: &str, vcpus: u32, memory_mib: u64) -> VmSpec {
    VmSpec {
        name: name.into(),
        tenant: "acme".into(),
        image: "web".into(),
        vcpus,
        memory_mib,
        labels: BTreeMap::new(),
        constraints: BTreeMap::new(),
        anti_affinity: None,
        restart: RestartPolicy::Always,
        ready_marker: None,
    }
}

fn create(s: &mut State, spec: VmSpec) -> Result<(), ApplyError> {
    s.apply(&Command::CreateVm {
        spec,
        start: true,
        now_ms: 5,
        placement: None,
    })
    .map(|_| ())
}

/// Runs the scheduler for `key` and applies its decision, as the leader would.
fn schedule(s: &mut State, key: &str, config: &SchedulerConfig) -> Result<NodeId, String> {
    let vm = s.vm(key).unwrap().clone();
    let decision = place(s.members(), &vm.spec, &s.ledger(), config).map_err(|e| e.to_string());
    s.apply(&Command::PlaceVm {
        key: key.into(),
        generation: vm.generation,
        node: decision.as_ref().ok().copied(),
        reason: decision.as_ref().err().cloned(),
        cpu_overcommit_pct: config.cpu_overcommit_pct,
        memory_overcommit_pct: config.memory_overcommit_pct,
        now_ms: 6,
    })
    .unwrap();
    decision
}

#[test]
fn fifty_creates_never_exceed_the_quota() {
    let mut s = cluster(1);
    s.apply(&Command::SetQuota {
        tenant: "acme".into(),
        quota: Quota {
            max_vms: Some(10),
            max_vcpus: Some(16),
            max_memory_mib: Some(8192),
        },
    })
    .unwrap();
    // Fifty creates in whatever order the log holds them: apply sees them one by one.
    let mut ok = 0;
    let mut refused = Vec::new();
    for i in 0..50 {
        match create(&mut s, spec(&format!("vm{i}"), 1 + i % 2, 512)) {
            Ok(()) => ok += 1,
            Err(e) => refused.push(e),
        }
    }
    let vms: Vec<_> = s.vms().collect();
    assert_eq!(vms.len(), ok);
    assert!(!vms.is_empty() && vms.len() <= 10);
    assert!(vms.iter().map(|v| v.spec.vcpus).sum::<u32>() <= 16);
    assert!(vms.iter().map(|v| v.spec.memory_mib).sum::<u64>() <= 8192);
    assert!(refused
        .iter()
        .all(|e| matches!(e, ApplyError::QuotaExceeded { .. })));
    assert!(refused[0].to_string().contains("quota of tenant acme"));
}

#[test]
fn bad_creates_are_refused_with_the_reason() {
    let mut s = cluster(1);
    let cases = [
        (spec("Bad Name", 1, 256), "names"),
        (spec("zero", 0, 256), "vcpus"),
        (spec("huge", 10_000, 256), "vcpus"),
        (spec("tiny", 1, 1), "memory"),
        (spec("absurd", 1, u64::MAX), "memory"),
    ];
    for (spec, word) in cases {
        let e = create(&mut s, spec).unwrap_err();
        assert!(e.to_string().contains(word), "{e}");
    }
    let mut unknown = spec("x", 1, 256);
    unknown.image = "nope".into();
    assert_eq!(
        create(&mut s, unknown),
        Err(ApplyError::UnknownImage("nope".into()))
    );
    let mut other = spec("x", 1, 256);
    other.tenant = "globex".into();
    assert_eq!(
        create(&mut s, other),
        Err(ApplyError::UnknownTenant("globex".into()))
    );
    create(&mut s, spec("web1", 1, 256)).unwrap();
    assert_eq!(
        create(&mut s, spec("web1", 1, 256)),
        Err(ApplyError::VmExists("acme/web1".into()))
    );
    // The image a VM uses cannot be removed.
    assert!(matches!(
        s.apply(&Command::RemoveImage { name: "web".into() }),
        Err(ApplyError::ImageInUse(..))
    ));
    s.apply(&Command::DeleteVm {
        key: "acme/web1".into(),
    })
    .unwrap();
    s.apply(&Command::RemoveImage { name: "web".into() })
        .unwrap();
}

#[test]
fn bin_pack_fills_hosts_and_spread_balances_them() {
    let config = SchedulerConfig::default();
    let mut s = cluster(3);
    for i in 0..4 {
        create(&mut s, spec(&format!("p{i}"), 1, 512)).unwrap();
        schedule(&mut s, &format!("acme/p{i}"), &config).unwrap();
    }
    let hosts: BTreeSet<_> = s.vms().map(|v| v.node.unwrap()).collect();
    assert_eq!(hosts.len(), 1, "bin-pack uses one host: {hosts:?}");

    let spread = SchedulerConfig {
        strategy: Strategy::Spread,
        ..config
    };
    let mut s = cluster(3);
    for i in 0..3 {
        create(&mut s, spec(&format!("s{i}"), 1, 512)).unwrap();
        schedule(&mut s, &format!("acme/s{i}"), &spread).unwrap();
    }
    let hosts: BTreeSet<_> = s.vms().map(|v| v.node.unwrap()).collect();
    assert_eq!(hosts.len(), 3, "spread uses every host: {hosts:?}");
}

#[test]
fn spread_balances_zones_before_hosts() {
    let spread = SchedulerConfig {
        strategy: Strategy::Spread,
        ..SchedulerConfig::default()
    };
    // Zone a is nodes 1 and 3, zone b node 2. Node 1 is 3/4 full, node 2 1/4, node 3
    // empty: zone a is 37.5 % loaded on average, zone b 25 %.
    let mut s = cluster(3);
    for (name, node, vcpus) in [("big", 1, 3), ("small", 2, 1)] {
        let mut v = spec(name, vcpus, 256);
        v.constraints
            .insert(blixard_core::NODE_CONSTRAINT.into(), format!("n{node}"));
        create(&mut s, v).unwrap();
        assert_eq!(
            schedule(&mut s, &format!("acme/{name}"), &spread).unwrap(),
            NodeId(node)
        );
    }
    // The emptiest host is node 3, but zone b is the emptier zone: node 2 it is.
    create(&mut s, spec("next", 1, 256)).unwrap();
    assert_eq!(schedule(&mut s, "acme/next", &spread).unwrap(), NodeId(2));
    // Now zone b is the fuller (50 % against 37.5 %): zone a, and in it the emptier host.
    create(&mut s, spec("after", 1, 256)).unwrap();
    assert_eq!(schedule(&mut s, "acme/after", &spread).unwrap(), NodeId(3));
    // Bin-pack knows no zones: the fullest host that fits.
    create(&mut s, spec("packed", 1, 256)).unwrap();
    let packed = schedule(&mut s, "acme/packed", &SchedulerConfig::default()).unwrap();
    assert_eq!(packed, NodeId(1));
}

#[test]
fn constraints_anti_affinity_drain_and_capacity_are_honoured() {
    let config = SchedulerConfig::default();
    let mut s = cluster(4);
    // zone=b is nodes 2 and 4; a pool of 3 anti-affine VMs there cannot all fit.
    for i in 0..3 {
        let mut v = spec(&format!("b{i}"), 1, 256);
        v.constraints.insert("zone".into(), "b".into());
        v.anti_affinity = Some("pool".into());
        create(&mut s, v).unwrap();
    }
    let a = schedule(&mut s, "acme/b0", &config).unwrap();
    let b = schedule(&mut s, "acme/b1", &config).unwrap();
    assert_ne!(a, b);
    assert!([a, b].iter().all(|n| n.0 % 2 == 0), "zone b only");
    let why = schedule(&mut s, "acme/b2", &config).unwrap_err();
    assert!(
        why.contains("2 hosts: already runs a VM of group pool"),
        "{why}"
    );
    assert!(why.contains("lacks label zone=b"), "{why}");
    let stuck = s.vm("acme/b2").unwrap();
    assert_eq!(stuck.phase, Phase::Pending);
    assert_eq!(stuck.reason.as_deref(), Some(why.as_str()));

    // A drained host takes nothing new.
    for n in 1..=3 {
        s.apply(&Command::SetDrained {
            node: NodeId(n),
            drained: true,
            now_ms: 6,
        })
        .unwrap();
    }
    create(&mut s, spec("d", 1, 256)).unwrap();
    assert_eq!(schedule(&mut s, "acme/d", &config), Ok(NodeId(4)));

    // Capacity, and overcommit.
    create(&mut s, spec("big", 4, 1024)).unwrap();
    let why = schedule(&mut s, "acme/big", &config).unwrap_err();
    assert!(why.contains("not enough vCPUs"), "{why}");
    let generous = SchedulerConfig {
        cpu_overcommit_pct: 200,
        ..config
    };
    let vm = s.vm("acme/big").unwrap().clone();
    assert_eq!(
        place(s.members(), &vm.spec, &s.ledger(), &generous),
        Ok(NodeId(4))
    );
}

#[test]
fn stale_or_impossible_placements_are_refused() {
    let config = SchedulerConfig::default();
    let mut s = cluster(2);
    create(&mut s, spec("v", 3, 1024)).unwrap();
    create(&mut s, spec("w", 3, 1024)).unwrap();
    schedule(&mut s, "acme/v", &config).unwrap();
    let placed = s.vm("acme/v").unwrap().node.unwrap();
    let place_on = |s: &mut State, key: &str, generation: u64, node: NodeId| {
        s.apply(&Command::PlaceVm {
            key: key.into(),
            generation,
            node: Some(node),
            reason: None,
            cpu_overcommit_pct: 100,
            memory_overcommit_pct: 100,
            now_ms: 7,
        })
    };
    // A decision made for an older generation is refused.
    assert!(matches!(
        place_on(&mut s, "acme/v", 0, placed),
        Err(ApplyError::StalePlacement(_))
    ));
    // Two decisions made from the same view for the same host: the second no longer fits.
    assert!(matches!(
        place_on(&mut s, "acme/w", 0, placed),
        Err(ApplyError::DoesNotFit { .. })
    ));
}

fn report(s: &mut State, key: &str, node: NodeId, phase: Phase) -> Result<(), ApplyError> {
    let generation = s.vm(key).unwrap().generation;
    s.apply(&Command::ReportVm {
        key: key.into(),
        node,
        generation,
        phase,
        reason: None,
        now_ms: 7,
    })
    .map(|_| ())
}

#[test]
fn hosts_report_their_own_vms_and_lost_hosts_give_them_up() {
    let config = SchedulerConfig::default();
    let mut s = cluster(3);
    let mut never = spec("pet", 1, 256);
    never.restart = RestartPolicy::Never;
    create(&mut s, spec("cattle", 1, 256)).unwrap();
    create(&mut s, never).unwrap();
    let host = schedule(&mut s, "acme/cattle", &config).unwrap();
    assert_eq!(
        schedule(&mut s, "acme/pet", &config),
        Ok(host),
        "bin-packed"
    );
    let other = NodeId(if host.0 == 1 { 2 } else { 1 });

    // Only the VM's host reports, and only for the current placement.
    report(&mut s, "acme/cattle", host, Phase::Running).unwrap();
    assert!(matches!(
        report(&mut s, "acme/cattle", other, Phase::Running),
        Err(ApplyError::StaleReport(_))
    ));
    let stale = s.vm("acme/cattle").unwrap().generation - 1;
    assert!(matches!(
        s.apply(&Command::ReportVm {
            key: "acme/cattle".into(),
            node: host,
            generation: stale,
            phase: Phase::Failed,
            reason: None,
            now_ms: 8,
        }),
        Err(ApplyError::StaleReport(_))
    ));
    let phases: Vec<Phase> = s
        .vm("acme/cattle")
        .unwrap()
        .history
        .iter()
        .map(|t| t.phase)
        .collect();
    assert_eq!(phases, [Phase::Pending, Phase::Scheduled, Phase::Running]);

    // Restart requests count; stop and start set the desired state.
    for (desired, restart) in [(Desired::Running, true), (Desired::Stopped, false)] {
        s.apply(&Command::SetVmDesired {
            key: "acme/cattle".into(),
            desired,
            restart,
            now_ms: 9,
        })
        .unwrap();
    }
    let vm = s.vm("acme/cattle").unwrap();
    assert_eq!((vm.restarts, vm.desired), (1, Desired::Stopped));

    // The host goes down: the VM that restarts moves, the one that never does waits.
    s.apply(&Command::SetNodeDown {
        node: host,
        down: true,
        now_ms: 10,
    })
    .unwrap();
    let cattle = s.vm("acme/cattle").unwrap();
    assert_eq!((cattle.node, cattle.phase), (None, Phase::Pending));
    assert_eq!(
        cattle.reason.as_deref(),
        Some(format!("node {host} is down").as_str())
    );
    let pet = s.vm("acme/pet").unwrap();
    assert_eq!((pet.node, pet.phase), (Some(host), Phase::Failed));
    let moved = schedule(&mut s, "acme/cattle", &config).unwrap();
    assert_ne!(moved, host, "a down host takes nothing");
    // Its old report no longer counts.
    assert!(report(&mut s, "acme/cattle", host, Phase::Running).is_err());

    // Draining moves everything, whatever the policy.
    s.apply(&Command::SetNodeDown {
        node: host,
        down: false,
        now_ms: 11,
    })
    .unwrap();
    s.apply(&Command::SetDrained {
        node: host,
        drained: true,
        now_ms: 12,
    })
    .unwrap();
    assert_eq!(s.vm("acme/pet").unwrap().node, None);
    assert_eq!(
        s.ledger().allocated.get(&host).map(|a| a.vms).unwrap_or(0),
        0
    );
}

#[test]
fn the_default_tenant_exists_once_used() {
    let mut s = cluster(1);
    let mut v = spec("v", 1, 256);
    v.tenant = blixard_core::DEFAULT_TENANT.into();
    create(&mut s, v.clone()).unwrap();
    assert!(s.tenant("default").is_some());
    assert!(matches!(create(&mut s, v), Err(ApplyError::VmExists(_))));
    let mut other = spec("w", 1, 256);
    other.tenant = "nope".into();
    assert!(matches!(
        create(&mut s, other),
        Err(ApplyError::UnknownTenant(_))
    ));
}

#[test]
fn a_create_can_carry_its_placement_if_it_still_fits() {
    let config = SchedulerConfig::default();
    let mut s = cluster(2);
    let at = |node: u64| {
        Some(blixard_core::Placement {
            node: NodeId(node),
            cpu_overcommit_pct: config.cpu_overcommit_pct,
            memory_overcommit_pct: config.memory_overcommit_pct,
        })
    };
    let create_at = |s: &mut State, name: &str, vcpus: u32, node: u64| {
        s.apply(&Command::CreateVm {
            spec: spec(name, vcpus, 256),
            start: true,
            now_ms: 5,
            placement: at(node),
        })
        .unwrap();
        s.vm(&format!("acme/{name}")).unwrap().clone()
    };
    let a = create_at(&mut s, "a", 3, 2);
    assert_eq!(
        (a.node, a.phase, a.generation),
        (Some(NodeId(2)), Phase::Scheduled, 1)
    );
    // Decided against an older state: it no longer fits there, so it waits instead.
    let b = create_at(&mut s, "b", 3, 2);
    assert_eq!((b.node, b.phase, b.generation), (None, Phase::Pending, 0));
    assert_eq!(schedule(&mut s, "acme/b", &config), Ok(NodeId(1)));
    // An unknown host is no placement either.
    let c = create_at(&mut s, "c", 1, 9);
    assert_eq!(c.node, None);
}

#[test]
fn a_tenant_is_removed_only_once_it_owns_nothing() {
    let mut s = cluster(1);
    let remove = |s: &mut State, name: &str| {
        s.apply(&Command::RemoveTenant { name: name.into() })
            .map(|_| ())
    };
    create(&mut s, spec("v", 1, 256)).unwrap();
    s.apply(&Command::AddUser(blixard_core::User {
        name: "otto".into(),
        key: EndpointKey([50; 32]),
        roles: vec!["operator".into()],
        tenant: Some("acme".into()),
        created_at_ms: 4,
    }))
    .unwrap();
    match remove(&mut s, "acme") {
        Err(ApplyError::TenantInUse(t, what)) => {
            assert_eq!((t.as_str(), what.as_str()), ("acme", "1 VM, 1 user"))
        }
        other => panic!("{other:?}"),
    }
    s.apply(&Command::DeleteVm {
        key: "acme/v".into(),
    })
    .unwrap();
    s.apply(&Command::RemoveUser {
        name: "otto".into(),
    })
    .unwrap();
    remove(&mut s, "acme").unwrap();
    assert!(s.tenant("acme").is_none());
    assert!(matches!(
        remove(&mut s, "acme"),
        Err(ApplyError::UnknownTenant(_))
    ));
    assert!(matches!(
        remove(&mut s, blixard_core::DEFAULT_TENANT),
        Err(ApplyError::InvalidTenant(_))
    ));
    // A VM cannot be created in it any more.
    assert!(matches!(
        create(&mut s, spec("w", 1, 256)),
        Err(ApplyError::UnknownTenant(_))
    ));
}

#[test]
fn a_group_spread_over_zones_takes_one_host_per_zone() {
    let config = SchedulerConfig::default();
    // Zone a: nodes 1 and 3; zone b: nodes 2 and 4.
    let mut s = cluster(4);
    let spread = |name: &str| {
        let mut v = spec(name, 1, 256);
        v.anti_affinity = Some("db@zone".into());
        v
    };
    assert_eq!(spread("x").group(), Some("db"));
    assert_eq!(spread("x").spread_over(), Some("zone"));
    // The first VM of the group pins a host of zone a or b; the second goes to the other
    // zone, though two more hosts are free in the first.
    for name in ["z0", "z1", "z2"] {
        create(&mut s, spread(name)).unwrap();
    }
    let a = schedule(&mut s, "acme/z0", &config).unwrap();
    let b = schedule(&mut s, "acme/z1", &config).unwrap();
    assert_ne!(a.0 % 2, b.0 % 2, "n{a} and n{b} share a zone");
    let why = schedule(&mut s, "acme/z2", &config).unwrap_err();
    assert!(why.contains("group db already runs on zone=a"), "{why}");
    assert!(why.contains("group db already runs on zone=b"), "{why}");

    // A plain VM of the same group counts against the zone rule, and a host-spread VM of
    // the group only avoids hosts.
    let mut plain = spec("host-only", 1, 256);
    plain.anti_affinity = Some("db".into());
    create(&mut s, plain).unwrap();
    let h = schedule(&mut s, "acme/host-only", &config).unwrap();
    assert!(h != a && h != b);

    // A placement decided elsewhere is re-checked in apply: z2 on a taken zone stays
    // pending.
    let generation = s.vm("acme/z2").unwrap().generation;
    s.apply(&Command::PlaceVm {
        key: "acme/z2".into(),
        generation,
        node: Some(a),
        reason: None,
        cpu_overcommit_pct: 100,
        memory_overcommit_pct: 100,
        now_ms: 7,
    })
    .unwrap_err();
    assert_eq!(s.vm("acme/z2").unwrap().phase, Phase::Pending);

    // Hosts without the label take none of the group.
    let mut rack = spec("r0", 1, 256);
    rack.anti_affinity = Some("web@rack".into());
    create(&mut s, rack).unwrap();
    let why = schedule(&mut s, "acme/r0", &config).unwrap_err();
    assert!(
        why.contains("4 hosts: lacks label rack (its group spreads over it)"),
        "{why}"
    );
}

#[test]
fn before_cluster_version_3_a_group_with_an_at_is_only_a_name() {
    let v = |name: &str| {
        let mut v = spec(name, 1, 256);
        v.anti_affinity = Some("db@zone".into());
        v
    };
    // A cluster a release before version 3 made reads `db@zone` as one group of that
    // name, kept off shared hosts only; so does this one until the version rises, and
    // every member of a mixed cluster judges a placement alike.
    let old = bootstrapped_at(2);
    let ledger = old.ledger();
    assert!(!ledger.spread_groups);
    assert_eq!(ledger.group_of(&v("x")), Some("db@zone"));
    assert_eq!(ledger.spread_of(&v("x")), None);
    // A create of such a VM is no newer than any other create.
    let command = Command::CreateVm {
        spec: v("x"),
        start: true,
        now_ms: 5,
        placement: None,
    };
    assert_eq!(command.since(), 1);
    // At version 3 it spreads: two of three fit, in two zones.
    let config = SchedulerConfig::default();
    let mut s = cluster(4);
    let ledger = s.ledger();
    assert_eq!(ledger.group_of(&v("x")), Some("db"));
    assert_eq!(ledger.spread_of(&v("x")), Some("zone"));
    for name in ["y0", "y1", "y2"] {
        create(&mut s, v(name)).unwrap();
    }
    schedule(&mut s, "acme/y0", &config).unwrap();
    schedule(&mut s, "acme/y1", &config).unwrap();
    schedule(&mut s, "acme/y2", &config).unwrap_err();
}
