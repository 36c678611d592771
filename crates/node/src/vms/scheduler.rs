//! The leader's loops: the scheduler (places every VM without a host, or records why it
//! cannot) and the liveness watch (marks hosts down when they go silent, and up again).
//! Idle on followers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument as _;

use blixard_core::{Command, MemberStatus, NodeId, SchedulerConfig, State};

use blixard_host::agent::{next_change, Wake};

use super::{placement, Loops};
use crate::cluster::now_ms;

/// How often the leader samples its peers' activity.
const LIVENESS_POLL: Duration = Duration::from_millis(250);

/// The leader's scheduler and liveness watch; idle on followers.
pub async fn scheduler(ctx: Arc<Loops>) {
    let mut changed = ctx.cluster.node.changed();
    // When each peer was last seen active, as far as this leader knows.
    let mut seen: HashMap<NodeId, Instant> = HashMap::new();
    let mut was_leader = false;
    let never = tokio::sync::Notify::new();
    while next_change(&mut changed, &never, LIVENESS_POLL).await != Wake::Stopped {
        let Ok(status) = ctx.cluster.node.status().await else {
            continue;
        };
        let me = ctx.cluster.node.id();
        if status.leader != Some(me.0) {
            was_leader = false;
            continue;
        }
        if !was_leader {
            // A new leader knows nothing of the past: every peer gets a full timeout.
            seen.clear();
            was_leader = true;
        }
        let now = Instant::now();
        let mut active: HashMap<u64, bool> = status
            .peers
            .iter()
            .map(|p| (p.id, p.recently_active))
            .collect();
        active.insert(me.0, true);
        if let Err(e) = liveness(&ctx, &active, &mut seen, now).await {
            tracing::debug!("liveness: {e}");
        }
        if let Err(e) = crate::version::raise(&ctx.gate).await {
            tracing::debug!("cluster version: {e}");
        }
        if let Err(e) = schedule_round(&ctx).await {
            tracing::debug!("scheduler: {e}");
        }
    }
}

/// Marks hosts down (or up again) in cluster state, as [`liveness_changes`] decides.
async fn liveness(
    ctx: &Loops,
    active: &HashMap<u64, bool>,
    seen: &mut HashMap<NodeId, Instant>,
    now: Instant,
) -> Result<(), String> {
    let members: Vec<(NodeId, Option<u64>)> = {
        let state = ctx.cluster.state();
        state
            .members()
            .filter(|m| m.status == MemberStatus::Active)
            .map(|m| (m.id, state.down_since(m.id)))
            .collect()
    };
    for (node, down) in liveness_changes(&members, active, seen, now, ctx.vms.down_after) {
        tracing::warn!(%node, down, "host liveness changed");
        ctx.gate
            .propose_as_host(Command::SetNodeDown {
                node,
                down,
                now_ms: now_ms(),
            })
            .await
            .map_err(|e| e.to_string())?;
        ctx.audit
            .record_node(node, if down { "marked down" } else { "marked up" })
            .await;
    }
    Ok(())
}

/// The placements the leader proposes now, in key order: a host for every VM without one
/// (each decision counted before the next, so they never overbook a host), or why there
/// is none, unless that reason is already recorded.
pub fn placements(state: &State, config: &SchedulerConfig, now_ms: u64) -> Vec<Command> {
    let mut ledger = state.ledger();
    let members: Vec<_> = state.members().cloned().collect();
    let mut out = Vec::new();
    for vm in state.vms().filter(|v| v.node.is_none()) {
        let decision = placement(&members, &ledger, &vm.spec, config);
        if let Ok(p) = &decision {
            ledger.add_spec(&vm.spec, p.node);
        }
        let (node, reason) = match decision {
            Ok(p) => (Some(p.node), None),
            Err(why) => {
                let why = format!("unschedulable: {why}");
                // Already recorded: nothing to propose.
                if vm.reason.as_deref() == Some(why.as_str()) {
                    continue;
                }
                (None, Some(why))
            }
        };
        out.push(Command::PlaceVm {
            key: vm.id(),
            generation: vm.generation,
            node,
            reason,
            cpu_overcommit_pct: config.cpu_overcommit_pct,
            memory_overcommit_pct: config.memory_overcommit_pct,
            now_ms,
        });
    }
    out
}

/// Which active members change liveness now: a host down that is active again comes up;
/// a host up that has not been active for `down_after` (as this leader has seen it, from
/// the first time it looked) goes down. `members`: (id, down since); `active`: raft's view
/// of each peer; `seen`: when each was last seen active, kept across rounds.
pub fn liveness_changes(
    members: &[(NodeId, Option<u64>)],
    active: &HashMap<u64, bool>,
    seen: &mut HashMap<NodeId, Instant>,
    now: Instant,
    down_after: Duration,
) -> Vec<(NodeId, bool)> {
    let mut out = Vec::new();
    for &(node, down_since) in members {
        let first = *seen.entry(node).or_insert(now);
        let up = active.get(&node.0).copied().unwrap_or(false);
        if up {
            seen.insert(node, now);
        }
        match (up, down_since) {
            (true, Some(_)) => out.push((node, false)),
            (false, None) if now.duration_since(first) >= down_after => out.push((node, true)),
            _ => {}
        }
    }
    out
}

/// Places every pending VM (or records why it cannot be placed), in key order.
async fn schedule_round(ctx: &Loops) -> Result<(), String> {
    let decisions = placements(&ctx.cluster.state(), &ctx.vms.scheduler, now_ms());
    for command in decisions {
        let (key, node, reason) = match &command {
            Command::PlaceVm {
                key, node, reason, ..
            } => (key.clone(), *node, reason.clone()),
            _ => continue,
        };
        let span = ctx.traces.vm_span(&key, "schedule");
        match ctx.gate.propose_as_host(command).instrument(span).await {
            // The leader's decisions are state changes too: in its audit log.
            Ok(_) => match node {
                Some(n) => {
                    let placed = format!("placed on n{n}");
                    ctx.audit.record_vm(&key, "scheduled", Some(&placed)).await
                }
                None => {
                    ctx.audit
                        .record_vm(&key, "pending", reason.as_deref())
                        .await
                }
            },
            // A decision overtaken by another change is made again next round.
            Err(e) => tracing::debug!("placement refused: {e}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;

    use blixard_core::{
        BlobHash, Capacity, ClusterId, EndpointKey, Image, JoinRequest, MemberRole, NewMember,
        RestartPolicy, Strategy, VmSpec,
    };

    use super::*;

    fn member(n: u8, vcpus: u32) -> NewMember {
        NewMember {
            name: format!("n{n}"),
            endpoint: EndpointKey([n; 32]),
            addrs: vec![SocketAddr::from(([127, 0, 0, 1], 7000 + u16::from(n)))],
            labels: BTreeMap::new(),
            capacity: Capacity {
                vcpus,
                memory_mib: 4096,
            },
        }
    }

    /// Hosts with these vCPUs each, image `web`, and VMs of these vCPUs (created without a
    /// placement, as a follower proposes them).
    fn state(hosts: &[u32], vms: &[u32]) -> State {
        let mut s = State::new();
        s.apply(&Command::Bootstrap {
            cluster_id: ClusterId([1; 16]),
            name: "t".into(),
            member: member(1, hosts[0]),
            admin: EndpointKey([200; 32]),
            now_ms: 1,
        })
        .unwrap();
        for (i, vcpus) in hosts.iter().enumerate().skip(1) {
            let n = i as u8 + 1;
            s.apply(&Command::CreateJoinToken {
                token_hash: [n; 32],
                now_ms: 1,
                expires_at_ms: 1_000,
            })
            .unwrap();
            s.apply(&Command::Join(JoinRequest {
                node: NodeId(u64::from(n)),
                token_hash: [n; 32],
                now_ms: 2,
                member: member(n, *vcpus),
                admin: EndpointKey([100 + n; 32]),
            }))
            .unwrap();
            s.apply(&Command::SetRole {
                node: NodeId(u64::from(n)),
                role: MemberRole::Voter,
            })
            .unwrap();
        }
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
        for (i, vcpus) in vms.iter().enumerate() {
            s.apply(&Command::CreateVm {
                spec: web(&format!("vm{i}"), *vcpus),
                start: true,
                now_ms: 4,
                placement: None,
            })
            .unwrap();
        }
        s
    }

    fn config(strategy: Strategy) -> SchedulerConfig {
        SchedulerConfig {
            strategy,
            cpu_overcommit_pct: 100,
            memory_overcommit_pct: 100,
        }
    }

    /// (vm, host or the reason) of each proposed placement.
    fn decided(commands: &[Command]) -> Vec<(String, Result<u64, String>)> {
        commands
            .iter()
            .map(|c| match c {
                Command::PlaceVm {
                    key, node, reason, ..
                } => (
                    key.clone(),
                    node.map(|n| n.0).ok_or(reason.clone().unwrap_or_default()),
                ),
                other => panic!("not a placement: {other:?}"),
            })
            .collect()
    }

    fn web(name: &str, vcpus: u32) -> VmSpec {
        VmSpec {
            name: name.into(),
            tenant: "default".into(),
            image: "web".into(),
            vcpus,
            memory_mib: 64,
            labels: BTreeMap::new(),
            constraints: BTreeMap::new(),
            anti_affinity: None,
            restart: RestartPolicy::Always,
            ready_marker: None,
        }
    }

    /// Creates decided before any of them is applied (a burst at the leader) count the
    /// ones decided before them: spread over three equal hosts, three creates go to three
    /// hosts, not all to the first. Once applied, or failed, a placement counts only
    /// through the state.
    #[test]
    fn creates_decided_together_count_each_other() {
        let s = state(&[8, 8, 8], &[]);
        let in_flight = crate::vms::InFlight::default();
        let cfg = config(Strategy::Spread);
        let mut guards = Vec::new();
        let mut hosts = Vec::new();
        for i in 0..3 {
            let name = format!("b{i}");
            let key = blixard_core::Vm::key("default", &name);
            let (p, g) = in_flight.place(&s, &key, &web(&name, 2), &cfg);
            hosts.push(p.unwrap().node.0);
            guards.push(g);
        }
        hosts.sort();
        assert_eq!(hosts, vec![1, 2, 3]);
        drop(guards);
        let key = blixard_core::Vm::key("default", "b3");
        let (again, b3) = in_flight.place(&s, &key, &web("b3", 2), &cfg);
        let alone = crate::vms::placement(
            &s.members().cloned().collect::<Vec<_>>(),
            &s.ledger(),
            &web("b3", 2),
            &cfg,
        )
        .unwrap();
        assert_eq!(again.unwrap().node, alone.node);
        drop(b3);
        // A placement whose create has been applied is not counted twice: packing, the
        // second half of a host goes where the first half was applied.
        let pack = config(Strategy::BinPack);
        let mut applied = s.clone();
        let x = blixard_core::Vm::key("default", "x");
        let (p, _held) = in_flight.place(&applied, &x, &web("x", 4), &pack);
        let p = p.unwrap();
        applied
            .apply(&Command::CreateVm {
                spec: web("x", 4),
                start: true,
                now_ms: 5,
                placement: Some(p),
            })
            .unwrap();
        assert_eq!(applied.vm(&x).and_then(|v| v.node), Some(p.node));
        let y = blixard_core::Vm::key("default", "y");
        let (next, _g) = in_flight.place(&applied, &y, &web("y", 4), &pack);
        assert_eq!(next.unwrap().node, p.node);
    }

    #[test]
    fn each_placement_counts_before_the_next_and_what_fits_nowhere_says_why() {
        // Two hosts of 4 vCPUs; VMs of 3, 3 and 3: the third fits nowhere.
        let s = state(&[4, 4], &[3, 3, 3]);
        let got = decided(&placements(&s, &config(Strategy::BinPack), 9));
        assert_eq!(got[0], ("default/vm0".into(), Ok(1)));
        assert_eq!(got[1], ("default/vm1".into(), Ok(2)));
        let why = got[2].1.clone().unwrap_err();
        assert!(why.starts_with("unschedulable: "), "{why}");
        // Bin-pack fills host 1 before host 2; spread takes the emptiest.
        let s = state(&[4, 4], &[1, 1]);
        let pack = decided(&placements(&s, &config(Strategy::BinPack), 9));
        assert_eq!(
            pack.iter().map(|(_, h)| h.clone()).collect::<Vec<_>>(),
            [Ok(1), Ok(1)]
        );
        let spread = decided(&placements(&s, &config(Strategy::Spread), 9));
        assert_eq!(
            spread.iter().map(|(_, h)| h.clone()).collect::<Vec<_>>(),
            [Ok(1), Ok(2)]
        );
    }

    #[test]
    fn a_reason_already_recorded_is_not_proposed_again() {
        let mut s = state(&[2], &[4]);
        let first = placements(&s, &config(Strategy::BinPack), 9);
        assert_eq!(first.len(), 1);
        s.apply(&first[0]).unwrap();
        assert!(placements(&s, &config(Strategy::BinPack), 10).is_empty());
    }

    #[test]
    fn liveness_marks_silent_hosts_down_after_the_timeout_and_up_again() {
        let t0 = Instant::now();
        let after = Duration::from_secs(30);
        let members = [(NodeId(1), None), (NodeId(2), None), (NodeId(3), Some(5))];
        let mut seen = HashMap::new();
        let active: HashMap<u64, bool> = [(1, true), (2, false), (3, true)].into();
        // A new leader gives every host the full timeout; a host down and active is up.
        assert_eq!(
            liveness_changes(&members, &active, &mut seen, t0, after),
            [(NodeId(3), false)]
        );
        let later = t0 + Duration::from_secs(29);
        assert!(liveness_changes(&members[..2], &active, &mut seen, later, after).is_empty());
        let later = t0 + after;
        assert_eq!(
            liveness_changes(&members[..2], &active, &mut seen, later, after),
            [(NodeId(2), true)]
        );
    }
}
