//! The built-in lifecycle hooks every node runs beside the operator's: quota admission
//! (before a create) and the audit log (every event).

use std::sync::Arc;

use blixard_core::Vm;
use blixard_host::{HookFuture, HookVm, Veto, VmLifecycleHook};
use blixard_raft::RaftNode;

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
        Box::pin(async move {
            self.0
                .record_vm(&Vm::key(&vm.tenant, &vm.name), event, None)
                .await;
            Ok(())
        })
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
