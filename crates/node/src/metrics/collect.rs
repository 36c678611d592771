//! The gauges read when scraped: membership, this host's capacity and allocation, VMs by
//! phase and tenant, images held, Cedar's decisions, audit records lost, the peers'
//! connections, and the data dir's file system.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use blixard_core::{Allocated, Capacity, MemberRole, MemberStatus, Phase};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::Sources;

pub(super) struct State {
    s: Arc<Sources>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("node", &self.s.node.id())
            .finish()
    }
}

impl State {
    pub(super) fn new(s: Arc<Sources>) -> Self {
        Self { s }
    }
}

/// Every phase, so a gauge that drops to zero is reported as zero, not as gone.
const PHASES: [Phase; 9] = [
    Phase::Pending,
    Phase::Scheduled,
    Phase::Fetching,
    Phase::Starting,
    Phase::Running,
    Phase::Ready,
    Phase::Stopping,
    Phase::Stopped,
    Phase::Failed,
];

/// What one scrape reads from cluster state, under the state's lock once.
#[derive(Default)]
pub(crate) struct Figures {
    /// (role, status) → members.
    pub members: BTreeMap<(&'static str, &'static str), u64>,
    /// What this node offers to VMs.
    pub capacity: Capacity,
    /// What the VMs placed on this node take (the scheduler's ledger).
    pub allocated: Allocated,
    /// (phase, tenant) → VMs placed here (and, on the leader, VMs placed nowhere).
    pub vms: BTreeMap<(String, String), u64>,
    pub images_held: u64,
    pub image_bytes: u64,
}

/// Reads the figures from the node's state.
pub(crate) fn figures(node: &blixard_raft::RaftNode) -> Figures {
    let me = node.id();
    let leader = node.leader() == Some(me);
    let state = node.state();
    let mut f = Figures::default();
    for role in ["voter", "learner"] {
        for status in ["active", "joining", "down", "drained"] {
            f.members.insert((role, status), 0);
        }
    }
    for m in state.members() {
        let role = match m.role {
            MemberRole::Voter => "voter",
            MemberRole::Learner => "learner",
        };
        let status = if m.status == MemberStatus::Joining {
            "joining"
        } else if state.down_since(m.id).is_some() {
            "down"
        } else if state.is_drained(m.id) {
            "drained"
        } else {
            "active"
        };
        *f.members.entry((role, status)).or_insert(0) += 1;
        if m.id == me {
            f.capacity = m.capacity;
        }
    }
    f.allocated = state
        .ledger()
        .allocated
        .get(&me)
        .copied()
        .unwrap_or_default();
    for vm in state.vms() {
        let counted = match vm.node {
            Some(n) => n == me,
            None => leader,
        };
        if counted {
            *f.vms
                .entry((vm.phase.to_string(), vm.spec.tenant.clone()))
                .or_insert(0) += 1;
        }
    }
    // Every phase of every tenant seen, so each series drops to zero rather than vanishing.
    let tenants: Vec<String> = f
        .vms
        .keys()
        .map(|(_, t)| t.clone())
        .chain([blixard_core::DEFAULT_TENANT.to_string()])
        .collect();
    for t in tenants {
        for p in PHASES {
            f.vms.entry((p.to_string(), t.clone())).or_insert(0);
        }
    }
    for image in state.images().filter(|i| i.holders.contains(&me)) {
        f.images_held += 1;
        f.image_bytes = f.image_bytes.saturating_add(image.nar_size);
    }
    f
}

fn mib_bytes(mib: u64) -> u64 {
    mib.saturating_mul(1 << 20)
}

/// Free and total bytes of the file system holding `dir`.
pub(crate) fn disk(dir: &Path) -> Option<(u64, u64)> {
    let st = rustix::fs::statvfs(dir).ok()?;
    let block = st.f_frsize;
    Some((
        st.f_bavail.saturating_mul(block),
        st.f_blocks.saturating_mul(block),
    ))
}

/// One gauge without labels.
pub(super) fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: impl prometheus_client::encoding::EncodeGaugeValue + Copy + std::fmt::Debug + Send + Sync,
) -> Result<(), std::fmt::Error> {
    let m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(v).encode(m)
}

impl Collector for State {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let f = figures(&self.s.node);
        {
            let mut fam = e.encode_descriptor(
                "cluster_members",
                "Cluster members as this node's state knows them, by role and status",
                None,
                MetricType::Gauge,
            )?;
            for ((role, status), n) in &f.members {
                let labels = [("role", *role), ("status", *status)];
                ConstGauge::new(*n).encode(fam.encode_family(&labels)?)?;
            }
        }
        gauge(
            &mut e,
            "node_capacity_vcpus",
            "vCPUs this node offers to VMs",
            f.capacity.vcpus,
        )?;
        gauge(
            &mut e,
            "node_capacity_memory_bytes",
            "Memory this node offers to VMs",
            mib_bytes(f.capacity.memory_mib),
        )?;
        gauge(
            &mut e,
            "node_allocated_vcpus",
            "vCPUs of the VMs placed on this node",
            f.allocated.vcpus,
        )?;
        gauge(
            &mut e,
            "node_allocated_memory_bytes",
            "Memory of the VMs placed on this node",
            mib_bytes(f.allocated.memory_mib),
        )?;
        {
            let mut fam = e.encode_descriptor(
                "vms",
                "VMs placed on this node (and, on the leader, VMs placed nowhere), by phase and tenant; summed over nodes it is the cluster's",
                None,
                MetricType::Gauge,
            )?;
            for ((phase, tenant), n) in &f.vms {
                let labels = [("phase", phase.as_str()), ("tenant", tenant.as_str())];
                ConstGauge::new(*n).encode(fam.encode_family(&labels)?)?;
            }
        }
        gauge(
            &mut e,
            "images_held",
            "Images this node holds completely",
            f.images_held,
        )?;
        gauge(
            &mut e,
            "image_store_bytes",
            "NAR bytes of the images this node holds",
            f.image_bytes,
        )?;
        {
            let (allowed, denied, errors) = self.s.decisions.get();
            let mut fam = e.encode_descriptor(
                "authz_decisions",
                "Cedar authorization decisions on this node, by decision (allow, deny, error)",
                None,
                MetricType::Counter,
            )?;
            for (decision, n) in [("allow", allowed), ("deny", denied), ("error", errors)] {
                let labels = [("decision", decision)];
                ConstCounter::new(n).encode(fam.encode_family(&labels)?)?;
            }
        }
        {
            let m = e.encode_descriptor(
                "audit_records_dropped",
                "Audit records lost (given up while waiting for room, or queued after the writer stopped)",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(self.s.audit.dropped()).encode(m)?;
        }
        let links = self.s.links.snapshot();
        {
            let relayed = links.iter().filter(|l| l.relayed).count() as i64;
            let direct = links.len() as i64 - relayed;
            let mut fam = e.encode_descriptor(
                "peer_connections",
                "Open raft connections to peers, by the path in use (direct or relay)",
                None,
                MetricType::Gauge,
            )?;
            for (kind, n) in [("direct", direct), ("relay", relayed)] {
                let labels = [("kind", kind)];
                ConstGauge::new(n).encode(fam.encode_family(&labels)?)?;
            }
        }
        {
            let mut fam = e.encode_descriptor(
                "peer_rtt_seconds",
                "Round-trip time of the raft connection to each peer (by node id)",
                None,
                MetricType::Gauge,
            )?;
            for l in &links {
                let peer = l.peer.0.to_string();
                let labels = [("peer", peer.as_str())];
                ConstGauge::new(l.rtt.as_secs_f64()).encode(fam.encode_family(&labels)?)?;
            }
        }
        if let Some((free, total)) = disk(&self.s.data_dir) {
            gauge(
                &mut e,
                "data_dir_available_bytes",
                "Bytes available to the daemon on the file system of its data dir",
                free,
            )?;
            gauge(
                &mut e,
                "data_dir_size_bytes",
                "Size of the file system of the daemon's data dir",
                total,
            )?;
        }
        Ok(())
    }
}
