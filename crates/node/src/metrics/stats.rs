//! `blixard node stats`: the key figures of the `/metrics` families, from the same
//! sources, answered over the API.

use std::sync::Arc;

use blixard_core::NodeId;
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
            *vms.entry(phase.clone()).or_insert(0) += n;
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
            proposals_pending: raft.proposals_pending.get(),
            state_check_alarm: status.alarm.is_some(),
            members: f
                .members
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|((role, status), n)| (format!("{role}/{status}"), *n))
                .collect(),
            capacity: f.capacity,
            allocated: f.allocated,
            vms,
            vm_starts_ok: starts_ok,
            vm_starts_failed: starts_failed,
            images_held: f.images_held,
            image_store_bytes: f.image_bytes,
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
