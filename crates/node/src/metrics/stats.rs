//! `blixard node stats`: the key figures of the `/metrics` families, from the same
//! sources, answered over the API.

use std::sync::Arc;

use blixard_core::{Allocated, Capacity, NodeId};
use blixard_net::api::{ApiError, NodeStats, PeerLink};

use super::{collect, process, NodeMetrics, Sources};

/// What `node stats` reads: the sources of the scrape-time gauges and the counters.
pub struct Stats {
    pub sources: Arc<Sources>,
    pub metrics: NodeMetrics,
}

impl Stats {
    pub async fn read(&self) -> Result<NodeStats, ApiError> {
        let s = &self.sources;
        let status = s
            .node
            .status()
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        let raft = s.node.metrics();
        let f = collect::figures(&s.node);
        let p = process::read().unwrap_or_default();
        let (allowed, denied, _) = s.decisions.get();
        let (api_ok, api_failed) = self.metrics.api.totals();
        let (starts_ok, starts_failed) = self.metrics.vms.totals();
        let mut vms = std::collections::BTreeMap::new();
        for ((phase, _), n) in &f.vms {
            *vms.entry(phase.clone()).or_insert(0) += u64::try_from(*n).unwrap_or(0);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Ok(NodeStats {
            node: NodeId(status.id),
            role: status.role,
            leader: status.leader.map(NodeId),
            term: status.term,
            commit_index: status.commit,
            applied_index: status.applied,
            leader_changes_seen: raft.leader_changes_seen.get(),
            proposals_committed: raft.proposals_committed.get(),
            proposals_failed: raft.proposals_failed.get(),
            proposals_pending: u64::try_from(raft.proposals_pending.get()).unwrap_or(0),
            state_check_alarm: status.alarm.is_some(),
            members: f
                .members
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|((role, status), n)| {
                    (format!("{role}/{status}"), u64::try_from(*n).unwrap_or(0))
                })
                .collect(),
            capacity: Capacity {
                vcpus: u32::try_from(f.capacity_vcpus).unwrap_or(0),
                memory_mib: u64::try_from(f.capacity_memory_bytes).unwrap_or(0) >> 20,
            },
            allocated: Allocated {
                vcpus: u64::try_from(f.allocated_vcpus).unwrap_or(0),
                memory_mib: u64::try_from(f.allocated_memory_bytes).unwrap_or(0) >> 20,
                vms: 0,
            },
            vms,
            vm_starts_ok: starts_ok,
            vm_starts_failed: starts_failed,
            images_held: u64::try_from(f.images_held).unwrap_or(0),
            image_store_bytes: u64::try_from(f.image_bytes).unwrap_or(0),
            cache_sent_bytes: self.metrics.cache.sent_bytes(),
            api_requests_ok: api_ok,
            api_requests_failed: api_failed,
            authz_allowed: allowed,
            authz_denied: denied,
            audit_records_dropped: s.audit.dropped(),
            peers: s
                .links
                .snapshot()
                .into_iter()
                .map(|l| PeerLink {
                    node: l.peer,
                    path: if l.relayed { "relay" } else { "direct" }.into(),
                    rtt_micros: u64::try_from(l.rtt.as_micros()).unwrap_or(u64::MAX),
                })
                .collect(),
            resident_memory_bytes: p.resident_bytes,
            cpu_millis: (p.cpu_seconds * 1000.0) as u64,
            open_fds: p.open_fds,
            uptime_secs: (now - p.start_time_seconds).max(0.0) as u64,
            data_dir_available_bytes: collect::disk(&s.data_dir).map(|(free, _)| free),
        })
    }
}
