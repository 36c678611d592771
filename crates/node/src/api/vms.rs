//! The `vm …` and `node drain` requests: what each checks of its caller and request, the
//! hooks that may veto it, and the command it proposes.

use blixard_core::{Command, Desired, State, Vm};
use blixard_host::Veto;
use blixard_net::api::{
    ApiError, NodeDrain, NodeDrained, ProgressSink, RequestFrame, Response, ResponseFrame,
    VmConsole, VmControl, VmCreate, VmDeleted, VmEntries, VmInfo, VmList, VmLogs, VmOp, VmRef,
};
use blixard_net::authz::{image_entity, vm_entity, vm_tenant, Principal};
use tracing::Instrument as _;

use super::Api;
use crate::cluster::{now_ms, ClusterHandle};
use crate::vms::{hook_vm, Vms};

fn vetoed(v: Veto) -> ApiError {
    ApiError::Rejected(format!("vetoed by hook {v}"))
}

/// The VM `r` names, for `principal`.
fn find<'s>(state: &'s State, principal: &Principal, r: &VmRef) -> Result<&'s Vm, ApiError> {
    let key = Vm::key(&vm_tenant(principal, r.tenant.as_ref()), &r.name);
    state
        .vm(&key)
        .ok_or_else(|| ApiError::NotFound(format!("no VM {key}")))
}

fn info(cluster: &ClusterHandle, key: &str) -> Result<VmInfo, ApiError> {
    let vm = cluster
        .state()
        .vm(key)
        .cloned()
        .ok_or_else(|| ApiError::NotFound(format!("no VM {key}")))?;
    Ok(VmInfo { vm: Box::new(vm) })
}

/// Creates a VM. The leader places it in the same command when it can (one commit from
/// request to placement instead of two), so a create reaching another node is handed to
/// the leader after its hooks ran here; if the leader cannot be reached, it is proposed
/// from here without a placement and the leader's scheduler places it.
pub(super) async fn create(
    api: &Api,
    principal: &Principal,
    frame: &RequestFrame,
    r: &VmCreate,
) -> ResponseFrame {
    let cluster = &api.cluster;
    let mut spec = (*r.spec).clone();
    // A forwarded create was resolved and admitted where it arrived.
    if !frame.forwarded {
        if !blixard_core::valid_vm_name(&spec.name) {
            return Err(ApiError::BadRequest(format!(
                "{:?}: {}",
                spec.name,
                blixard_core::VM_NAME_RULE
            )));
        }
        spec.tenant = vm_tenant(principal, Some(&spec.tenant).filter(|t| !t.is_empty()));
        if let Some(g) = &spec.anti_affinity {
            let parts: Vec<&str> = g.split(blixard_core::SPREAD_SEPARATOR).collect();
            if parts.len() > 2 || parts.iter().any(|p| p.is_empty() || p.len() > 64) {
                return Err(ApiError::BadRequest(format!(
                    "{g:?}: an anti-affinity group is GROUP, or GROUP@LABEL to spread it over a node label; each 1 to 64 bytes"
                )));
            }
            // Before then a member may read `@` as part of a group's name.
            let cluster = api.cluster.state().cluster_version();
            let needs = blixard_core::SPREAD_GROUPS_SINCE;
            if parts.len() == 2 && cluster < needs {
                return Err(ApiError::Rejected(format!(
                    "--spread-over needs cluster version {needs} (the cluster runs at {cluster}); upgrade every member first"
                )));
            }
        }
    }
    // The caller must be able to see the image (another tenant's is "no image", as if it
    // did not exist).
    let image = cluster.state().image(&spec.image).cloned();
    let visible = image
        .as_ref()
        .is_some_and(|i| frame.forwarded || api.may(principal)("image:read", &image_entity(i)));
    if !visible {
        return Err(ApiError::NotFound(format!("no image {}", spec.image)));
    }
    if !frame.forwarded {
        api.vms
            .hooks
            .before_vm_create(&hook_vm(&spec, None))
            .instrument(
                tracing::info_span!(target: blixard_net::trace::TARGET, "hooks before_vm_create"),
            )
            .await
            .map_err(vetoed)?;
        let request = VmCreate {
            spec: Box::new(spec.clone()),
            start: r.start,
        };
        match cluster
            .forward_to_leader(request.into(), &ProgressSink::none())
            .await
        {
            None => {}
            Some(Ok(answer)) => return answer,
            // Proposed from here instead; the scheduler places it.
            Some(Err(e)) => tracing::debug!("handing a create to the leader: {e}"),
        }
    }
    let key = Vm::key(&spec.tenant, &spec.name);
    let (placement, _in_flight) = if cluster.leader() == Some(cluster.me()) {
        let _span = tracing::info_span!(target: blixard_net::trace::TARGET, "schedule").entered();
        let state = cluster.state();
        let (p, guard) = api
            .vms
            .in_flight
            .place(&state, &key, &spec, &api.vms.scheduler);
        (p, Some(guard))
    } else {
        (None, None)
    };
    cluster
        .propose(Command::CreateVm {
            spec,
            start: r.start,
            now_ms: now_ms(),
            placement,
        })
        .await?;
    Ok(Response::VmCreate(info(cluster, &key)?))
}

pub(super) async fn list(api: &Api, principal: &Principal, r: &VmList) -> ResponseFrame {
    api.cluster.barrier(r.stale).await?;
    let may = api.may(principal);
    let vms = api
        .cluster
        .state()
        .vms()
        .filter(|v| r.tenant.as_ref().is_none_or(|t| &v.spec.tenant == t))
        .filter(|v| r.node.is_none_or(|n| v.node == Some(n)))
        .filter(|v| may("vm:read", &vm_entity(v)))
        .cloned()
        .collect();
    Ok(Response::VmList(VmEntries { vms }))
}

pub(super) async fn show(
    cluster: &ClusterHandle,
    principal: &Principal,
    r: &VmRef,
    stale: bool,
) -> ResponseFrame {
    cluster.barrier(stale).await?;
    let vm = find(&cluster.state(), principal, r)?.clone();
    Ok(Response::VmShow(VmInfo { vm: Box::new(vm) }))
}

pub(super) async fn control(
    cluster: &ClusterHandle,
    principal: &Principal,
    r: &VmControl,
) -> ResponseFrame {
    cluster.barrier(false).await?;
    let (key, up) = {
        let state = cluster.state();
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
    cluster
        .propose(Command::SetVmDesired {
            key: key.clone(),
            desired,
            restart,
            now_ms: now_ms(),
        })
        .await?;
    Ok(Response::VmControl(info(cluster, &key)?))
}

pub(super) async fn delete(
    cluster: &ClusterHandle,
    vms: &Vms,
    principal: &Principal,
    r: &VmRef,
) -> ResponseFrame {
    cluster.barrier(false).await?;
    let vm = find(&cluster.state(), principal, r)?.clone();
    vms.hooks
        .before_vm_delete(&hook_vm(&vm.spec, vm.node))
        .await
        .map_err(vetoed)?;
    cluster.propose(Command::DeleteVm { key: vm.id() }).await?;
    Ok(Response::VmDelete(VmDeleted {}))
}

/// The console is on the VM's host: answered there, forwarded from anywhere else.
pub(super) async fn logs(
    cluster: &ClusterHandle,
    vms: &Vms,
    principal: &Principal,
    frame: &RequestFrame,
    r: &VmLogs,
) -> ResponseFrame {
    cluster.barrier(false).await?;
    let me = cluster.me();
    let vm = find(&cluster.state(), principal, &r.vm)?.clone();
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
        // Ask for the same VM by its full key, whoever the caller is there.
        let mut request = r.clone();
        request.vm.tenant = Some(vm.spec.tenant.clone());
        return cluster
            .forward_to(host, request.into(), &ProgressSink::none())
            .await;
    }
    let dir = vms
        .supervisor
        .dir(&blixard_host::agent::local_name(&vm))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let (lines, from) = (r.lines, r.from);
    let (text, next) = tokio::task::spawn_blocking(move || dir.read_console(lines, from))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(format!("reading the console: {e}")))?;
    Ok(Response::VmLogs(VmConsole {
        node: me,
        text,
        next,
    }))
}

pub(super) async fn drain(cluster: &ClusterHandle, r: &NodeDrain) -> ResponseFrame {
    cluster.barrier(false).await?;
    let moved: Vec<String> = if r.drained {
        cluster
            .state()
            .vms()
            .filter(|v| v.node == Some(r.node))
            .map(Vm::id)
            .collect()
    } else {
        Vec::new()
    };
    cluster
        .propose(Command::SetDrained {
            node: r.node,
            drained: r.drained,
            now_ms: now_ms(),
        })
        .await?;
    Ok(Response::NodeDrain(NodeDrained { moved }))
}
