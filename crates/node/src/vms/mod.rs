//! The node's VM machinery and settings: the supervisor, the lifecycle hooks, the
//! scheduler's settings and the liveness timings; the one placement decision; what a
//! hook sees of a VM. The leader's loops are in `scheduler`; the host agent (in
//! `blixard-host`) runs over the node through `host`; the `vm …` requests are in
//! `api::vms`.

pub mod hooks;
pub mod host;
pub mod scheduler;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use blixard_core::{NodeId, Placement, SchedulerConfig, VmSpec};
use blixard_host::{HookChain, HookVm, Supervisor};

use crate::audit::AuditLog;
use crate::cluster::ClusterHandle;
use crate::gate::Gate;
use crate::images::Images;

/// What the VM loops (the leader's scheduler, every host's reconciler) work with.
pub struct Loops {
    pub cluster: Arc<ClusterHandle>,
    /// Where the loops' changes to cluster state are authorized (as this host) and audited.
    pub gate: Arc<Gate>,
    pub vms: Arc<Vms>,
    pub images: Arc<Images>,
    pub audit: Arc<AuditLog>,
    pub metrics: crate::metrics::VmMetrics,
    /// The traces of the VMs' latest commands, for the host's spans.
    pub traces: Arc<crate::telemetry::EntryTraces>,
}

/// The node's VM machinery: the supervisor, the hooks, the scheduler's settings and the
/// liveness timings.
pub struct Vms {
    pub supervisor: Arc<dyn Supervisor>,
    /// Where runners (image roots) are found on this host: the images' store dir.
    pub runner_store: PathBuf,
    pub hooks: HookChain,
    pub scheduler: SchedulerConfig,
    /// The leader marks a host down after this long without contact.
    pub down_after: Duration,
    /// A host that has had no leader for this long stops its VMs.
    pub fence_after: Duration,
    /// How long a runner gets to stop before it is killed.
    pub stop_timeout: Duration,
    /// Creates this node (as leader) has placed and proposed, not yet applied.
    pub in_flight: InFlight,
}

/// The placements of creates the leader has proposed and not yet applied. Creates that
/// arrive together are decided before any of them is applied; each must count the ones
/// decided before it, or all go to the host that was emptiest before the burst.
#[derive(Debug, Default)]
pub struct InFlight {
    next: std::sync::atomic::AtomicU64,
    placed: std::sync::Mutex<Vec<(u64, String, VmSpec, NodeId)>>,
}

/// An in-flight placement; it no longer counts once dropped (its create applied, or
/// failed).
pub struct InFlightGuard<'a> {
    set: &'a InFlight,
    id: u64,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut placed) = self.set.placed.lock() {
            placed.retain(|(id, ..)| *id != self.id);
        }
    }
}

impl InFlight {
    /// Places `spec` (key `key`) against `state`'s ledger plus the placements still in
    /// flight, and holds this one in flight until the guard drops.
    pub fn place(
        &self,
        state: &blixard_core::State,
        key: &str,
        spec: &VmSpec,
        config: &SchedulerConfig,
    ) -> (Option<Placement>, InFlightGuard<'_>) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let guard = InFlightGuard { set: self, id };
        let members: Vec<_> = state.members().cloned().collect();
        let mut ledger = state.ledger();
        let mut placed = self.placed.lock().ok();
        // One applied since is in the state's ledger already.
        for (_, other, other_spec, node) in placed.iter().flat_map(|p| p.iter()) {
            if state.vm(other).is_none() {
                ledger.add_spec(other_spec, *node);
            }
        }
        let decision = placement(&members, &ledger, spec, config).ok();
        if let (Some(p), Some(placed)) = (&decision, placed.as_mut()) {
            placed.push((id, key.to_string(), spec.clone(), p.node));
        }
        (decision, guard)
    }
}

/// Where the scheduler would put `spec` now, given what is placed (`ledger`): the one
/// placement decision, made by the leader when a create arrives and by its scheduler for
/// every VM still without a host.
pub fn placement(
    members: &[blixard_core::Member],
    ledger: &blixard_core::Ledger,
    spec: &VmSpec,
    config: &SchedulerConfig,
) -> Result<Placement, blixard_core::PlaceError> {
    blixard_core::place(members, spec, ledger, config).map(|node| Placement {
        node,
        cpu_overcommit_pct: config.cpu_overcommit_pct,
        memory_overcommit_pct: config.memory_overcommit_pct,
    })
}

/// What a hook sees of a VM.
pub fn hook_vm(spec: &VmSpec, node: Option<NodeId>) -> HookVm {
    HookVm {
        name: spec.name.clone(),
        tenant: spec.tenant.clone(),
        image: spec.image.clone(),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        labels: spec.labels.clone(),
        node: node.map(|n| format!("n{n}")),
    }
}
