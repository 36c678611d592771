//! The node's side of VMs: the API handlers for `vm …` and `node drain`, the built-in
//! lifecycle hooks, and the node's VM settings. The loops that place and run VMs are in
//! [`crate::agent`].

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blixard_core::{
    place, Command, Desired, NodeId, Placement, SchedulerConfig, State, Vm, VmSpec,
};
use blixard_host::{HookChain, HookFuture, HookVm, Supervisor, Veto, VmLifecycleHook};
use blixard_net::api::{
    ApiError, NodeDrain, NodeDrained, ProgressSink, RequestFrame, Response, ResponseFrame,
    VmConsole, VmControl, VmCreate, VmDeleted, VmEntries, VmInfo, VmList, VmLogs, VmOp, VmRef,
};
use blixard_net::authz::{image_entity, vm_entity, vm_tenant, Principal};
use blixard_raft::RaftNode;

use crate::service::{member_addr_of, now_ms, NodeService};

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

/// Built-in: refuses a create the tenant's quota cannot take, before anything is
/// proposed. (`apply` checks again, in log order, so racing creates cannot overshoot.)
pub struct QuotaAdmission(pub RaftNode);

impl VmLifecycleHook for QuotaAdmission {
    fn name(&self) -> &str {
        "quota"
    }

    fn before_vm_create<'a>(&'a self, vm: &'a HookVm) -> HookFuture<'a> {
        let verdict = {
            let state = self.0.state();
            match state.tenant(&vm.tenant) {
                Some(t) => t
                    .quota
                    .admits(state.tenant_usage(&vm.tenant), vm.vcpus, vm.memory_mib)
                    .map_err(|what| Veto {
                        hook: "quota".into(),
                        reason: format!("tenant {} would exceed its quota: {what}", vm.tenant),
                    }),
                // No such tenant (yet): apply decides.
                None => Ok(()),
            }
        };
        Box::pin(async move { verdict })
    }
}

/// Built-in: every lifecycle event in the node's audit log.
pub struct AuditHook(pub Arc<crate::audit::AuditLog>);

impl AuditHook {
    fn event<'a>(&'a self, event: &'static str, vm: &'a HookVm) -> HookFuture<'a> {
        self.0
            .record_vm(&Vm::key(&vm.tenant, &vm.name), event, None);
        Box::pin(async { Ok(()) })
    }
}

impl VmLifecycleHook for AuditHook {
    fn name(&self) -> &str {
        "audit"
    }
    fn before_vm_create<'a>(&'a self, vm: &'a HookVm) -> HookFuture<'a> {
        self.event("before_vm_create", vm)
    }
    fn after_vm_start<'a>(&'a self, vm: &'a HookVm) -> HookFuture<'a> {
        self.event("after_vm_start", vm)
    }
    fn before_vm_delete<'a>(&'a self, vm: &'a HookVm) -> HookFuture<'a> {
        self.event("before_vm_delete", vm)
    }
}

fn vetoed(v: Veto) -> ApiError {
    ApiError::Rejected(format!("vetoed by hook {v}"))
}

/// The VM `r` names, for `principal`.
fn find<'s>(state: &'s State, principal: &Principal, r: &VmRef) -> Result<&'s Vm, ApiError> {
    let key = Vm::key(&vm_tenant(principal, r.tenant.as_ref()), &r.name);
    state
        .vm(&key)
        .ok_or_else(|| ApiError::Rejected(format!("no VM {key}")))
}

impl NodeService {
    fn vm_info(&self, key: &str) -> Result<VmInfo, ApiError> {
        let vm = self
            .node
            .state()
            .vm(key)
            .cloned()
            .ok_or_else(|| ApiError::Rejected(format!("no VM {key}")))?;
        Ok(VmInfo { vm: Box::new(vm) })
    }

    /// Creates a VM. The leader places it in the same command when it can (one commit
    /// from request to placement instead of two), so a create reaching another node is
    /// handed to the leader after its hooks ran here.
    pub(crate) async fn vm_create(
        &self,
        principal: &Principal,
        frame: &RequestFrame,
        r: &VmCreate,
    ) -> ResponseFrame {
        let mut spec = (*r.spec).clone();
        // A forwarded create was resolved and admitted where it arrived.
        if !frame.forwarded && !blixard_core::valid_vm_name(&spec.name) {
            return Err(ApiError::BadRequest(format!(
                "{:?}: {}",
                spec.name,
                blixard_core::VM_NAME_RULE
            )));
        }
        if !frame.forwarded {
            spec.tenant = vm_tenant(principal, Some(&spec.tenant).filter(|t| !t.is_empty()));
        }
        // The caller must be able to see the image (another tenant's is "no image", as
        // if it did not exist).
        let image = self.node.state().image(&spec.image).cloned();
        let visible = image.as_ref().is_some_and(|i| {
            frame.forwarded || self.may(principal)("image:read", &image_entity(i))
        });
        if !visible {
            return Err(ApiError::Rejected(format!("no image {}", spec.image)));
        }
        if !frame.forwarded {
            self.vms
                .hooks
                .before_vm_create(&hook_vm(&spec, None))
                .await
                .map_err(vetoed)?;
        }
        let me = self.node.id();
        let leader = self
            .node
            .status()
            .await
            .ok()
            .and_then(|s| s.leader)
            .map(NodeId);
        if leader != Some(me) && !frame.forwarded {
            let addr = leader.and_then(|l| member_addr_of(&self.node.state(), l));
            if let Some(addr) = addr {
                let request = VmCreate {
                    spec: Box::new(spec.clone()),
                    start: r.start,
                };
                match self
                    .client
                    .forward(&addr, request.into(), &ProgressSink::none())
                    .await
                {
                    Ok(answer) => return answer,
                    // Proposed from here instead; the scheduler places it.
                    Err(e) => tracing::debug!("handing a create to the leader: {e}"),
                }
            }
        }
        let placement = if leader == Some(me) {
            let config = self.vms.scheduler;
            let state = self.node.state();
            let members: Vec<_> = state.members().cloned().collect();
            place(&members, &spec, &state.ledger(), &config)
                .ok()
                .map(|node| Placement {
                    node,
                    cpu_overcommit_pct: config.cpu_overcommit_pct,
                    memory_overcommit_pct: config.memory_overcommit_pct,
                })
        } else {
            None
        };
        let key = Vm::key(&spec.tenant, &spec.name);
        self.propose(Command::CreateVm {
            spec,
            start: r.start,
            now_ms: now_ms(),
            placement,
        })
        .await?;
        Ok(Response::VmCreate(self.vm_info(&key)?))
    }

    pub(crate) async fn vm_list(&self, principal: &Principal, r: &VmList) -> ResponseFrame {
        self.barrier(r.stale).await?;
        let may = self.may(principal);
        let vms = self
            .node
            .state()
            .vms()
            .filter(|v| r.tenant.as_ref().is_none_or(|t| &v.spec.tenant == t))
            .filter(|v| r.node.is_none_or(|n| v.node == Some(n)))
            .filter(|v| may("vm:read", &vm_entity(v)))
            .cloned()
            .collect();
        Ok(Response::VmList(VmEntries { vms }))
    }

    pub(crate) async fn vm_show(
        &self,
        principal: &Principal,
        r: &VmRef,
        stale: bool,
    ) -> ResponseFrame {
        self.barrier(stale).await?;
        let vm = find(&self.node.state(), principal, r)?.clone();
        Ok(Response::VmShow(VmInfo { vm: Box::new(vm) }))
    }

    pub(crate) async fn vm_control(&self, principal: &Principal, r: &VmControl) -> ResponseFrame {
        self.barrier(false).await?;
        let (key, up) = {
            let state = self.node.state();
            let vm = find(&state, principal, &r.vm)?;
            (vm.id(), vm.desired == Desired::Running && vm.phase.is_up())
        };
        let (desired, restart) = match r.op {
            // Starting a VM that should run but does not (it failed, or exited under
            // `--restart never`) is a request to run it again.
            VmOp::Start => (Desired::Running, !up),
            VmOp::Stop => (Desired::Stopped, false),
            VmOp::Restart => (Desired::Running, true),
        };
        self.propose(Command::SetVmDesired {
            key: key.clone(),
            desired,
            restart,
            now_ms: now_ms(),
        })
        .await?;
        Ok(Response::VmControl(self.vm_info(&key)?))
    }

    pub(crate) async fn vm_delete(&self, principal: &Principal, r: &VmRef) -> ResponseFrame {
        self.barrier(false).await?;
        let vm = find(&self.node.state(), principal, r)?.clone();
        self.vms
            .hooks
            .before_vm_delete(&hook_vm(&vm.spec, vm.node))
            .await
            .map_err(vetoed)?;
        self.propose(Command::DeleteVm { key: vm.id() }).await?;
        Ok(Response::VmDelete(VmDeleted {}))
    }

    /// The console is on the VM's host: answered there, forwarded from anywhere else.
    pub(crate) async fn vm_logs(
        &self,
        principal: &Principal,
        frame: &RequestFrame,
        r: &VmLogs,
    ) -> ResponseFrame {
        self.barrier(false).await?;
        let me = self.node.id();
        let vm = find(&self.node.state(), principal, &r.vm)?.clone();
        // The host that has the console: where it is placed, or where it last ran.
        let host = vm
            .node
            .or_else(|| vm.history.iter().rev().find_map(|t| t.node));
        let Some(host) = host else {
            return Err(ApiError::Rejected(format!(
                "VM {} has not been placed on a host yet",
                vm.id()
            )));
        };
        if host != me {
            if frame.forwarded {
                return Err(ApiError::BadRequest(
                    "a forwarded console request must be for the node it reached".into(),
                ));
            }
            let addr = member_addr_of(&self.node.state(), host)
                .ok_or_else(|| ApiError::Unavailable(format!("node {host} has no address")))?;
            // Ask for the same VM by its full key, whoever the caller is there.
            let mut request = r.clone();
            request.vm.tenant = Some(vm.spec.tenant.clone());
            return match self
                .client
                .forward(&addr, request.into(), &ProgressSink::none())
                .await
            {
                Ok(r) => r,
                Err(e) => Err(ApiError::Unavailable(format!("asking node {host}: {e}"))),
            };
        }
        let path = self
            .vms
            .supervisor
            .console_path(&Vms::local_name(&vm))
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let (lines, from) = (r.lines, r.from);
        let (text, next) = tokio::task::spawn_blocking(move || read_console(&path, lines, from))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Internal(format!("reading the console: {e}")))?;
        Ok(Response::VmLogs(VmConsole {
            node: me,
            text,
            next,
        }))
    }

    pub(crate) async fn node_drain(&self, r: &NodeDrain) -> ResponseFrame {
        self.barrier(false).await?;
        let moved: Vec<String> = if r.drained {
            self.node
                .state()
                .vms()
                .filter(|v| v.node == Some(r.node))
                .map(Vm::id)
                .collect()
        } else {
            Vec::new()
        };
        self.propose(Command::SetDrained {
            node: r.node,
            drained: r.drained,
            now_ms: now_ms(),
        })
        .await?;
        Ok(Response::NodeDrain(NodeDrained { moved }))
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
