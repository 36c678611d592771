//! The leader's loops: the scheduler (places every VM without a host, or records why it
//! cannot) and the liveness watch (marks hosts down when they go silent, and up again).
//! Idle on followers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blixard_core::{Command, MemberStatus, NodeId};

use super::{next_change, placement, Loops, Wake};
use crate::cluster::now_ms;

/// How often the leader samples its peers' activity.
const LIVENESS_POLL: Duration = Duration::from_millis(250);

/// The leader's scheduler and liveness watch; idle on followers.
pub async fn scheduler(ctx: Arc<Loops>) {
    let mut applied = ctx.cluster.node.applied();
    // When each peer was last seen active, as far as this leader knows.
    let mut seen: HashMap<NodeId, Instant> = HashMap::new();
    let mut was_leader = false;
    let never = tokio::sync::Notify::new();
    while next_change(&mut applied, &never, LIVENESS_POLL).await != Wake::Stopped {
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
        if let Err(e) = schedule_round(&ctx).await {
            tracing::debug!("scheduler: {e}");
        }
    }
}

async fn liveness(
    ctx: &Loops,
    active: &HashMap<u64, bool>,
    seen: &mut HashMap<NodeId, Instant>,
    now: Instant,
) -> Result<(), String> {
    let members: Vec<(NodeId, Option<u64>)> = {
        let state = ctx.cluster.node.state();
        state
            .members()
            .filter(|m| m.status == MemberStatus::Active)
            .map(|m| (m.id, state.down_since(m.id)))
            .collect()
    };
    for (node, down_since) in members {
        let first = *seen.entry(node).or_insert(now);
        let up = active.get(&node.0).copied().unwrap_or(false);
        if up {
            seen.insert(node, now);
        }
        let change = match (up, down_since) {
            (true, Some(_)) => Some(false),
            (false, None) if now.duration_since(first) >= ctx.vms.down_after => Some(true),
            _ => None,
        };
        if let Some(down) = change {
            tracing::warn!(%node, down, "host liveness changed");
            ctx.cluster
                .propose(Command::SetNodeDown {
                    node,
                    down,
                    now_ms: now_ms(),
                })
                .await
                .map_err(|e| e.to_string())?;
            ctx.audit
                .record_node(node, if down { "marked down" } else { "marked up" });
        }
    }
    Ok(())
}

/// Places every pending VM (or records why it cannot be placed), in key order.
async fn schedule_round(ctx: &Loops) -> Result<(), String> {
    let config = ctx.vms.scheduler;
    let decisions: Vec<Command> = {
        let state = ctx.cluster.node.state();
        let mut ledger = state.ledger();
        let members: Vec<_> = state.members().cloned().collect();
        let mut out = Vec::new();
        for vm in state.vms().filter(|v| v.node.is_none()) {
            let decision = placement(&members, &ledger, &vm.spec, &config);
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
                now_ms: now_ms(),
            });
        }
        out
    };
    for command in decisions {
        let (key, node, reason) = match &command {
            Command::PlaceVm {
                key, node, reason, ..
            } => (key.clone(), *node, reason.clone()),
            _ => continue,
        };
        match ctx.cluster.propose(command).await {
            // The leader's decisions are state changes too: in its audit log.
            Ok(_) => match node {
                Some(n) => ctx
                    .audit
                    .record_vm(&key, "scheduled", Some(&format!("placed on n{n}"))),
                None => ctx.audit.record_vm(&key, "pending", reason.as_deref()),
            },
            // A decision overtaken by another change is made again next round.
            Err(e) => tracing::debug!("placement refused: {e}"),
        }
    }
    Ok(())
}
