//! The node's VM machinery and settings: the supervisor, the lifecycle hooks, the
//! scheduler's settings and the liveness timings; what a hook sees of a VM; reading a
//! console. The leader's loops are in `scheduler`, the host's in `host`; the `vm …`
//! requests in `api::vms`.

pub mod hooks;
pub mod host;
pub mod scheduler;

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blixard_core::{NodeId, Placement, SchedulerConfig, Vm, VmSpec};
use blixard_host::{HookChain, HookVm, Supervisor};

use crate::audit::AuditLog;
use crate::cluster::ClusterHandle;
use crate::images::Images;

/// How often the loops look even when nothing was applied.
pub(crate) const IDLE: Duration = Duration::from_secs(1);

/// What the VM loops (the leader's scheduler, every host's reconciler) work with.
pub struct Loops {
    pub cluster: Arc<ClusterHandle>,
    pub vms: Arc<Vms>,
    pub images: Arc<Images>,
    pub audit: Arc<AuditLog>,
}

/// Why a loop woke up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// A new raft entry was applied.
    Applied,
    /// A wake-up call, or `at_most` passed.
    Other,
    /// The node stopped.
    Stopped,
}

/// Waits for the next applied entry, a wake-up, or `at_most`.
pub(crate) async fn next_change(
    applied: &mut tokio::sync::watch::Receiver<u64>,
    wake: &tokio::sync::Notify,
    at_most: Duration,
) -> Wake {
    tokio::select! {
        r = applied.changed() => if r.is_ok() { Wake::Applied } else { Wake::Stopped },
        _ = wake.notified() => Wake::Other,
        _ = tokio::time::sleep(at_most) => Wake::Other,
    }
}

/// The most console a `vm logs` answer carries.
pub const MAX_LOG_BYTES: u64 = 256 * 1024;

/// The node's VM machinery: the supervisor, the hooks, and the timings of liveness.
pub struct Vms {
    pub supervisor: Arc<dyn Supervisor>,
    /// Where the supervisor keeps one state dir per VM.
    pub root: PathBuf,
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
    /// VMs whose image is being fetched here now.
    pub fetching: Mutex<HashSet<String>>,
    /// Wakes the reconciler (e.g. when a fetch finished).
    pub wake: tokio::sync::Notify,
}

impl Vms {
    /// The VMs that have a state dir here, by supervisor name.
    pub fn local_dirs(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| n.contains('@'))
            .collect()
    }

    /// Starts `vm`'s runner under the supervisor.
    pub fn start(
        &self,
        name: &str,
        runner: &blixard_host::Runner,
        vm: &Vm,
    ) -> Result<u32, blixard_host::HostError> {
        let limits = blixard_host::Limits {
            vcpus: vm.spec.vcpus,
            memory_mib: vm.spec.memory_mib,
        };
        self.supervisor.start_with(name, runner, Some(&limits))
    }
    /// The supervisor's name for a VM: `tenant@name` (unique, and a valid directory name).
    pub fn local_name(vm: &Vm) -> String {
        format!("{}@{}", vm.spec.tenant, vm.spec.name)
    }

    /// The state-table key of a supervisor name.
    pub fn key_of_local(name: &str) -> Option<String> {
        name.split_once('@').map(|(t, n)| Vm::key(t, n))
    }

    pub fn state_dir(&self, name: &str) -> Option<PathBuf> {
        self.supervisor.state_dir(name).ok()
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
) -> Result<Placement, String> {
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

/// The console from byte `from` (or its last `lines` lines), at most [`MAX_LOG_BYTES`], and
/// the offset to continue from. A log trimmed since `from` is read from its start.
pub fn read_console(
    path: &std::path::Path,
    lines: u32,
    from: Option<u64>,
) -> std::io::Result<(String, u64)> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((String::new(), 0)),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let start = match from {
        Some(off) if off <= len => off,
        Some(_) => 0,
        None => len.saturating_sub(MAX_LOG_BYTES),
    };
    let end = len.min(start + MAX_LOG_BYTES);
    f.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::with_capacity((end - start) as usize);
    f.take(end - start).read_to_end(&mut bytes)?;
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    if from.is_none() {
        let all: Vec<&str> = text.lines().collect();
        let keep = all[all.len().saturating_sub(lines as usize)..].join("\n");
        text = if keep.is_empty() { keep } else { keep + "\n" };
    }
    Ok((text, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consoles_are_read_by_lines_or_from_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        assert_eq!(read_console(&p, 10, None).unwrap(), (String::new(), 0));
        std::fs::write(&p, "a\nb\nc\n").unwrap();
        assert_eq!(read_console(&p, 2, None).unwrap(), ("b\nc\n".into(), 6));
        assert_eq!(read_console(&p, 2, Some(4)).unwrap(), ("c\n".into(), 6));
        // Trimmed since: start over.
        assert_eq!(
            read_console(&p, 2, Some(60)).unwrap(),
            ("a\nb\nc\n".into(), 6)
        );
        assert_eq!(Vms::key_of_local("acme@web").as_deref(), Some("acme/web"));
    }
}
