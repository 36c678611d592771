//! The raft layer's metrics (`blixard_raft_*`), named after etcd's `etcd_server_*` and
//! `etcd_disk_*` families. Cheap to clone: every handle is an atomic behind an `Arc`.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A gauge of a raft index, term or count: never negative.
pub type Count = Gauge<u64, AtomicU64>;

/// The raft thread's and the state machine's figures.
#[derive(Clone, Debug)]
pub struct RaftMetrics {
    pub has_leader: Gauge,
    pub is_leader: Gauge,
    pub leader_changes_seen: Counter,
    pub term: Count,
    pub commit_index: Count,
    pub applied_index: Count,
    pub proposals_committed: Counter,
    pub proposals_failed: Counter,
    pub proposals_pending: Count,
    pub log_fsync_duration: Histogram,
    pub apply_duration: Histogram,
    pub snapshots_sent: Counter,
    pub state_check_alarm: Gauge,
}

impl Default for RaftMetrics {
    fn default() -> Self {
        Self {
            has_leader: Gauge::default(),
            is_leader: Gauge::default(),
            leader_changes_seen: Counter::default(),
            term: Count::default(),
            commit_index: Count::default(),
            applied_index: Count::default(),
            proposals_committed: Counter::default(),
            proposals_failed: Counter::default(),
            proposals_pending: Count::default(),
            // 0.5 ms to ~4 s, as etcd's wal_fsync_duration_seconds.
            log_fsync_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            // 10 µs to ~0.3 s: one command on the in-memory state machine.
            apply_duration: Histogram::new(exponential_buckets(0.00001, 2.0, 16)),
            snapshots_sent: Counter::default(),
            state_check_alarm: Gauge::default(),
        }
    }
}

impl RaftMetrics {
    /// Registers every family under `registry` (which carries the `blixard` prefix).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry;
        r.register(
            "raft_has_leader",
            "Whether this node knows a leader (1) or not (0)",
            self.has_leader.clone(),
        );
        r.register(
            "raft_is_leader",
            "Whether this node is the leader (1) or not (0)",
            self.is_leader.clone(),
        );
        r.register(
            "raft_leader_changes_seen",
            "Leader changes this node has seen since it started",
            self.leader_changes_seen.clone(),
        );
        r.register("raft_term", "The current raft term", self.term.clone());
        r.register(
            "raft_commit_index",
            "The highest log index known committed",
            self.commit_index.clone(),
        );
        r.register(
            "raft_applied_index",
            "The highest log index applied to the state machine",
            self.applied_index.clone(),
        );
        r.register(
            "raft_proposals_committed",
            "Log entries carrying a command that this node applied",
            self.proposals_committed.clone(),
        );
        r.register(
            "raft_proposals_failed",
            "Proposals made through this node that failed (no leader, dropped, leader lost)",
            self.proposals_failed.clone(),
        );
        r.register(
            "raft_proposals_pending",
            "Proposals made through this node that wait to be applied",
            self.proposals_pending.clone(),
        );
        r.register(
            "raft_log_fsync_duration_seconds",
            "Time to write and fsync one group of raft log batches",
            self.log_fsync_duration.clone(),
        );
        r.register(
            "raft_apply_duration_seconds",
            "Time to apply one committed command to the state machine",
            self.apply_duration.clone(),
        );
        r.register(
            "raft_snapshots_sent",
            "Snapshots this node sent to followers",
            self.snapshots_sent.clone(),
        );
        r.register(
            "raft_state_check_alarm",
            "1 when a state check found this node's state unlike another member's (its data may be damaged)",
            self.state_check_alarm.clone(),
        );
    }
}
