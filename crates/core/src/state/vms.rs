//! Tenants, quotas and VMs: creation (quotas checked here, in log order), placement,
//! desired state, host reports and deletion.

use super::{Applied, ApplyError, State};
use crate::command::CommandOutput;
use crate::ids::{valid_name, NodeId};
use crate::scheduler::{fits, FitError, Ledger, Placement, SchedulerConfig};
use crate::vm::{
    Allocated, Desired, Phase, Quota, Tenant, Vm, VmSpec, DEFAULT_TENANT, MAX_MEMORY_MIB,
    MAX_VCPUS, MIN_MEMORY_MIB, SPREAD_GROUPS_SINCE,
};

impl State {
    pub(super) fn create_tenant(&mut self, name: &String, now_ms: u64) -> Applied {
        if !valid_name(name) {
            return Err(ApplyError::InvalidTenant(format!(
                "{name:?}: names are 1 to 64 of a-z 0-9 . _ -"
            )));
        }
        if self.tenants.contains(name) {
            return Err(ApplyError::TenantExists(name.clone()));
        }
        self.insert_tenant(name, now_ms);
        Ok(CommandOutput::Done)
    }

    pub(super) fn remove_tenant(&mut self, name: &String) -> Applied {
        if name == DEFAULT_TENANT {
            return Err(ApplyError::InvalidTenant(format!(
                "the {DEFAULT_TENANT} tenant cannot be removed"
            )));
        }
        if !self.tenants.contains(name) {
            return Err(ApplyError::UnknownTenant(name.clone()));
        }
        let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        let vms = self.vms.values().filter(|v| &v.spec.tenant == name).count();
        let images = self
            .images
            .values()
            .filter(|i| i.tenant.as_ref() == Some(name))
            .count();
        let users = self
            .users
            .values()
            .filter(|u| u.tenant.as_ref() == Some(name))
            .count();
        let held: Vec<String> = [(vms, "VM"), (images, "image"), (users, "user")]
            .into_iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| count(n, what))
            .collect();
        if !held.is_empty() {
            return Err(ApplyError::TenantInUse(name.clone(), held.join(", ")));
        }
        self.tenants.remove(name);
        Ok(CommandOutput::Done)
    }

    pub(super) fn set_quota(&mut self, tenant: &String, quota: Quota) -> Applied {
        if tenant == DEFAULT_TENANT && !self.tenants.contains(tenant) {
            self.insert_tenant(tenant, 0);
        }
        if self.tenants.update(tenant, |t| t.quota = quota) {
            Ok(CommandOutput::Done)
        } else {
            Err(ApplyError::UnknownTenant(tenant.clone()))
        }
    }

    /// Adds a tenant with no quota limits.
    fn insert_tenant(&mut self, name: &str, created_at_ms: u64) {
        self.tenants.insert(
            name.to_string(),
            Tenant {
                name: name.to_string(),
                quota: Quota::default(),
                created_at_ms,
            },
        );
    }

    pub(super) fn create_vm(
        &mut self,
        spec: &VmSpec,
        start: bool,
        now_ms: u64,
        placement: Option<&Placement>,
    ) -> Applied {
        let invalid = |m: String| Err(ApplyError::InvalidVm(m));
        if !valid_name(&spec.name) {
            return invalid(format!(
                "{:?}: names are 1 to 64 of a-z 0-9 . _ -",
                spec.name
            ));
        }
        if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
            return invalid(format!("vcpus must be 1 to {MAX_VCPUS}"));
        }
        if spec.memory_mib < MIN_MEMORY_MIB || spec.memory_mib > MAX_MEMORY_MIB {
            return invalid(format!(
                "memory must be {MIN_MEMORY_MIB} MiB to {MAX_MEMORY_MIB} MiB"
            ));
        }
        if spec.tenant == DEFAULT_TENANT && !self.tenants.contains(&spec.tenant) {
            self.insert_tenant(&spec.tenant, now_ms);
        }
        let tenant = self
            .tenants
            .get(&spec.tenant)
            .ok_or_else(|| ApplyError::UnknownTenant(spec.tenant.clone()))?;
        let image = self
            .images
            .get(&spec.image)
            .ok_or_else(|| ApplyError::UnknownImage(spec.image.clone()))?;
        let key = Vm::key(&spec.tenant, &spec.name);
        if self.vms.contains(&key) {
            return Err(ApplyError::VmExists(key));
        }
        // The quota, against the tenant's VMs as applied so far.
        tenant
            .quota
            .admits(self.tenant_usage(&spec.tenant), spec.vcpus, spec.memory_mib)
            .map_err(|what| ApplyError::QuotaExceeded {
                tenant: spec.tenant.clone(),
                what: what.to_string(),
            })?;
        if let Some(m) = &spec.ready_marker {
            if m.is_empty() || m.len() > 256 || m.contains('\n') {
                return invalid("a ready marker is one line of 1 to 256 bytes".into());
            }
        }
        let mut vm = Vm {
            spec: spec.clone(),
            manifest: image.manifest,
            desired: if start {
                Desired::Running
            } else {
                Desired::Stopped
            },
            node: None,
            generation: 0,
            phase: Phase::Pending,
            reason: None,
            restarts: 0,
            history: Vec::new(),
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
        };
        vm.transition(Phase::Pending, None, now_ms);
        if let Some(p) = placement {
            // No longer fitting is not an error: the VM waits for the scheduler.
            if self.fits_on(p, spec) == Some(Ok(())) {
                vm.node = Some(p.node);
                vm.generation += 1;
                vm.transition(Phase::Scheduled, None, now_ms);
            }
        }
        self.vms.insert(key, vm);
        Ok(CommandOutput::Done)
    }

    /// The scheduler's decision for a pending VM: `placement`, or none (and why).
    pub(super) fn place_vm(
        &mut self,
        key: &String,
        generation: u64,
        placement: Option<Placement>,
        reason: &Option<String>,
        now_ms: u64,
    ) -> Applied {
        let vm = self
            .vms
            .get(key)
            .ok_or_else(|| ApplyError::UnknownVm(key.clone()))?;
        if vm.generation != generation || vm.node.is_some() {
            return Err(ApplyError::StalePlacement(key.clone()));
        }
        if let Some(p) = &placement {
            self.fits_on(p, &vm.spec)
                .ok_or(ApplyError::UnknownMember(p.node))?
                .map_err(|why| ApplyError::DoesNotFit {
                    vm: key.clone(),
                    node: p.node,
                    why: why.to_string(),
                })?;
        }
        let (node, reason) = (placement.map(|p| p.node), reason.clone());
        self.vms.update(key, |v| {
            // A refused placement keeps the generation: the next decision is for the same
            // pending VM.
            if node.is_some() {
                v.node = node;
                v.generation += 1;
                v.transition(Phase::Scheduled, reason, now_ms);
            } else {
                v.transition(Phase::Pending, reason, now_ms);
            }
        });
        Ok(CommandOutput::Done)
    }

    pub(super) fn delete_vm(&mut self, key: &String) -> Applied {
        match self.vms.remove(key) {
            Some(_) => Ok(CommandOutput::Done),
            None => Err(ApplyError::UnknownVm(key.clone())),
        }
    }

    pub(super) fn set_vm_desired(
        &mut self,
        key: &String,
        desired: Desired,
        restart: bool,
        now_ms: u64,
    ) -> Applied {
        if self.vms.update(key, |v| {
            v.desired = desired;
            if restart {
                v.restarts += 1;
            }
            v.updated_at_ms = now_ms;
        }) {
            Ok(CommandOutput::Done)
        } else {
            Err(ApplyError::UnknownVm(key.clone()))
        }
    }

    pub(super) fn report_vm(
        &mut self,
        key: &String,
        node: NodeId,
        generation: u64,
        phase: Phase,
        reason: &Option<String>,
        now_ms: u64,
    ) -> Applied {
        let vm = self
            .vms
            .get(key)
            .ok_or_else(|| ApplyError::UnknownVm(key.clone()))?;
        if vm.node != Some(node) || vm.generation != generation {
            return Err(ApplyError::StaleReport(key.clone()));
        }
        let reason = reason.clone();
        self.vms
            .update(key, |v| v.transition(phase, reason, now_ms));
        Ok(CommandOutput::Done)
    }

    /// Re-checks a placement decided elsewhere: whether `spec` fits on its member under
    /// the overcommit it was decided with (the reason if not); `None` if the placement's
    /// node is no member.
    fn fits_on(&self, placement: &Placement, spec: &VmSpec) -> Option<Result<(), FitError>> {
        let config = SchedulerConfig {
            cpu_overcommit_pct: placement.cpu_overcommit_pct,
            memory_overcommit_pct: placement.memory_overcommit_pct,
            ..SchedulerConfig::default()
        };
        let member = self.members.get(&placement.node)?;
        Some(fits(member, spec, &self.ledger(), &config))
    }

    /// Unplaces the VMs on `node` that `which` selects.
    pub(super) fn unplace_from(
        &mut self,
        node: NodeId,
        why: &str,
        now_ms: u64,
        which: impl Fn(&Vm) -> bool,
    ) {
        let keys: Vec<String> = self
            .vms
            .iter()
            .filter(|(_, v)| v.node == Some(node) && which(v))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.vms
                .update(&key, |v| v.unplace(why.to_string(), now_ms));
        }
    }

    /// What is placed where, for the scheduler.
    pub fn ledger(&self) -> Ledger {
        let spread_groups = self.cluster_version() >= SPREAD_GROUPS_SINCE;
        let mut ledger = Ledger::from_vms(self.vms.values(), spread_groups);
        ledger.drained = self.drained.iter().map(|(n, _)| *n).collect();
        ledger.down = self.down.iter().map(|(n, _)| *n).collect();
        // Looked up for the hosts of a group (by a VM that spreads its group), so only
        // needed once groups spread and some VM, placed or pending, has one.
        if spread_groups && self.vms.values().any(|v| v.spec.anti_affinity.is_some()) {
            ledger.host_labels = self
                .members
                .values()
                .map(|m| (m.id, m.labels.clone()))
                .collect();
        }
        ledger
    }

    pub fn vms(&self) -> impl Iterator<Item = &Vm> {
        self.vms.values()
    }

    pub fn vm(&self, key: &str) -> Option<&Vm> {
        self.vms.get(&key.to_string())
    }

    pub fn tenant(&self, name: &str) -> Option<&Tenant> {
        self.tenants.get(&name.to_string())
    }

    pub fn tenants(&self) -> impl Iterator<Item = &Tenant> {
        self.tenants.values()
    }

    /// What a tenant's VMs use together.
    pub fn tenant_usage(&self, tenant: &str) -> Allocated {
        let mut used = Allocated::default();
        for v in self.vms.values().filter(|v| v.spec.tenant == tenant) {
            used.vms += 1;
            used.vcpus += u64::from(v.spec.vcpus);
            used.memory_mib += v.spec.memory_mib;
        }
        used
    }
}
