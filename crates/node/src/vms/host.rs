//! The host agent (`blixard_host::agent`) run over this node: cluster state from the raft
//! node, reports proposed as `ReportVm` (and recorded in the audit log), images fetched
//! from their holders, runners found in the images' store dir, and the after-start hooks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use blixard_core::{Command, Image, Phase, Vm};
use blixard_host::agent::{local_name, Agent, AgentConfig, Cluster};
use blixard_net::api::{ApiError, ProgressSink};

use super::{hook_vm, Loops};
use crate::cluster::now_ms;

/// How long a report may wait for the cluster; the host acts on its own either way.
const REPORT_TIMEOUT: Duration = Duration::from_secs(2);

impl Cluster for Loops {
    fn now_ms(&self) -> u64 {
        now_ms()
    }

    fn assigned(&self) -> BTreeMap<String, Vm> {
        let me = self.cluster.me();
        self.cluster
            .state()
            .vms()
            .filter(|v| v.node == Some(me))
            .map(|v| (local_name(v), v.clone()))
            .collect()
    }

    fn known(&self) -> BTreeSet<String> {
        self.cluster.state().vms().map(Vm::id).collect()
    }

    fn vm(&self, key: &str) -> Option<Vm> {
        self.cluster.state().vm(key).cloned()
    }

    fn image(&self, name: &str) -> Option<Image> {
        self.cluster.state().image(name).cloned()
    }

    fn has_leader(&self) -> bool {
        self.cluster.leader().is_some()
    }

    async fn sync(&self) -> bool {
        matches!(
            tokio::time::timeout(REPORT_TIMEOUT, self.cluster.barrier(false)).await,
            Ok(Ok(()))
        )
    }

    async fn report(&self, vm: &Vm, phase: Phase, reason: Option<String>) {
        let command = Command::ReportVm {
            key: vm.id(),
            node: self.cluster.me(),
            generation: vm.generation,
            phase,
            reason: reason.clone(),
            now_ms: now_ms(),
        };
        match tokio::time::timeout(REPORT_TIMEOUT, self.gate.propose_as_host(command)).await {
            Ok(Ok(_)) => {
                self.audit
                    .record_vm(&vm.id(), &phase.to_string(), reason.as_deref())
                    .await
            }
            Ok(Err(e)) => tracing::debug!(vm = %vm.id(), %phase, "report not recorded: {e}"),
            Err(_) => tracing::debug!(vm = %vm.id(), %phase, "report timed out"),
        }
    }

    fn runner_dir(&self, image: &Image) -> PathBuf {
        let base = image.root.rsplit('/').next().unwrap_or_default();
        self.vms.runner_store.join(base)
    }

    type FetchError = ApiError;
    async fn fetch(&self, image: &Image) -> Result<(), ApiError> {
        self.images
            .pull_here(image, ProgressSink::none())
            .await
            .map(|_| ())
    }

    async fn after_start(&self, vm: &Vm) {
        self.vms
            .hooks
            .after_vm_start(&hook_vm(&vm.spec, vm.node))
            .await;
    }

    fn started(&self, vm: &Vm, ok: bool, restart: bool) {
        let since_create = Duration::from_millis(now_ms().saturating_sub(vm.created_at_ms));
        self.metrics.started(ok, restart, Some(since_create));
    }

    fn reconciled(&self, took: Duration) {
        self.metrics.reconciled(took);
    }

    fn span(&self, vm: &Vm, what: &'static str) -> tracing::Span {
        self.traces.vm_span(&vm.id(), what)
    }
}

/// Runs the host agent until the node stops.
pub async fn reconciler(loops: Arc<Loops>) {
    let config = AgentConfig {
        fence_after: loops.vms.fence_after,
        stop_timeout: loops.vms.stop_timeout,
    };
    let changed = loops.cluster.node.changed();
    let supervisor = loops.vms.supervisor.clone();
    let agent = Arc::new(Agent::new(loops, supervisor, config));
    agent.run(changed).await;
}
