//! VMs, tenants and quotas as cluster state knows them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{BlobHash, NodeId};

/// The longest VM name: a DNS label's (RFC 1123), as a guest's host name is its VM name.
pub const MAX_VM_NAME: usize = 63;

/// What a new VM may be called: a host name (one DNS label, as NixOS' `networking.hostName`
/// takes it): 1 to 63 of a-z 0-9 and `-`, starting and ending with a letter or digit. A
/// guest built from a NixOS configuration is named after its VM, so a name the guest cannot
/// take is refused before the VM exists. Checked where a create enters (the API, the
/// declared-VM file), not in `State::apply`: VMs recorded under the older, looser rule
/// ([`crate::valid_name`]) still replay.
pub fn valid_vm_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_VM_NAME
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// Why [`valid_vm_name`] refuses a name, for error messages.
pub const VM_NAME_RULE: &str =
    "VM names are host names: 1 to 63 of a-z 0-9 -, starting and ending with a letter or digit";

/// A tenant and its quota.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub name: String,
    pub quota: Quota,
    pub created_at_ms: u64,
}

/// Limits on what a tenant's VMs may use together; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    pub max_vms: Option<u32>,
    pub max_vcpus: Option<u32>,
    pub max_memory_mib: Option<u64>,
}

impl Quota {
    /// Whether one more VM of `vcpus` and `memory_mib` fits beside what the tenant's VMs
    /// use (`used`); if not, the limit it breaks ("11 VMs > 10").
    pub fn admits(&self, used: Allocated, vcpus: u32, memory_mib: u64) -> Result<(), QuotaError> {
        let count = u64::from(used.vms) + 1;
        let vcpus = used.vcpus + u64::from(vcpus);
        let memory_mib = used.memory_mib + memory_mib;
        if let Some(max) = self.max_vms.filter(|m| count > u64::from(*m)) {
            return Err(QuotaError::Vms { count, max });
        }
        if let Some(max) = self.max_vcpus.filter(|m| vcpus > u64::from(*m)) {
            return Err(QuotaError::Vcpus { vcpus, max });
        }
        if let Some(max) = self.max_memory_mib.filter(|m| memory_mib > *m) {
            return Err(QuotaError::Memory { memory_mib, max });
        }
        Ok(())
    }
}

/// What VMs use together: on one host (for the scheduler) or of one tenant (for its quota).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocated {
    pub vcpus: u64,
    pub memory_mib: u64,
    pub vms: u32,
}

/// The limit of a [`Quota`] that one more VM would break.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    #[error("{count} VMs > {max}")]
    Vms { count: u64, max: u32 },
    #[error("{vcpus} vCPUs > {max}")]
    Vcpus { vcpus: u64, max: u32 },
    #[error("{memory_mib} MiB > {max} MiB")]
    Memory { memory_mib: u64, max: u64 },
}

/// What the host does when a VM's runner exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    Stopped,
}

/// What the VM's host last reported (or the scheduler decided).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Pending,
    Scheduled,
    Fetching,
    Starting,
    Running,
    Ready,
    Stopping,
    Stopped,
    Failed,
}

/// What a VM is made of, as given at creation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Unique within its tenant.
    pub name: String,
    pub tenant: String,
    /// The image by name; the VM is pinned to the image's manifest at creation.
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub labels: BTreeMap<String, String>,
    /// Node labels the host must have, with these values.
    pub constraints: BTreeMap<String, String>,
    /// VMs of the same group never share a host. `GROUP@LABEL` (`--spread-over LABEL`)
    /// asks for more: this VM shares no value of the node label `LABEL` (e.g. `zone`)
    /// with the group's other VMs. See [`VmSpec::group`] and [`VmSpec::spread_over`].
    pub anti_affinity: Option<String>,
    pub restart: RestartPolicy,
    /// A line the guest prints on its console once it is ready; without one, a running
    /// VM is as ready as Blixard can tell.
    pub ready_marker: Option<String>,
}

/// Between an anti-affinity group and the node label it spreads over, in
/// [`VmSpec::anti_affinity`].
pub const SPREAD_SEPARATOR: char = '@';

/// The cluster version from which `GROUP@LABEL` spreads a group over a label; before,
/// the whole string is a group's name, as older releases read it.
pub const SPREAD_GROUPS_SINCE: u32 = 3;

impl VmSpec {
    /// The VM's anti-affinity group, without the label it spreads over.
    pub fn group(&self) -> Option<&str> {
        let g = self.anti_affinity.as_deref()?;
        Some(g.split_once(SPREAD_SEPARATOR).map_or(g, |(group, _)| group))
    }

    /// The node label whose values the group's VMs may not share (`--spread-over`).
    pub fn spread_over(&self) -> Option<&str> {
        let (_, label) = self
            .anti_affinity
            .as_deref()?
            .split_once(SPREAD_SEPARATOR)?;
        (!label.is_empty()).then_some(label)
    }
}

/// A VM in cluster state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub spec: VmSpec,
    /// The image's manifest when the VM was created.
    pub manifest: BlobHash,
    pub desired: Desired,
    /// The host it is placed on.
    pub node: Option<NodeId>,
    /// Bumped by every placement, so a stale decision or report is refused.
    pub generation: u64,
    pub phase: Phase,
    /// Why it is in its phase (e.g. why it cannot be placed).
    pub reason: Option<String>,
    /// Bumped by every `vm restart`, so the host restarts a running VM once per request.
    pub restarts: u64,
    /// The latest transitions, oldest first (at most [`HISTORY`]).
    pub history: Vec<Transition>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// One step in a VM's life, as `vm show` lists them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub at_ms: u64,
    pub phase: Phase,
    pub node: Option<NodeId>,
    pub reason: Option<String>,
}

/// How many transitions a VM keeps.
pub const HISTORY: usize = 16;

impl Vm {
    /// The key of a VM in its table: `tenant/name`.
    pub fn key(tenant: &str, name: &str) -> String {
        format!("{tenant}/{name}")
    }

    /// The VM's key in its table.
    pub fn id(&self) -> String {
        Self::key(&self.spec.tenant, &self.spec.name)
    }

    /// Moves to `phase` (recording the step when phase, node or reason changed).
    pub fn transition(&mut self, phase: Phase, reason: Option<String>, now_ms: u64) {
        let same = self
            .history
            .last()
            .is_some_and(|t| t.phase == phase && t.node == self.node && t.reason == reason);
        self.phase = phase;
        self.reason = reason.clone();
        self.updated_at_ms = now_ms;
        if !same {
            if self.history.len() >= HISTORY {
                self.history.remove(0);
            }
            self.history.push(Transition {
                at_ms: now_ms,
                phase,
                node: self.node,
                reason,
            });
        }
    }

    /// Takes the VM off its host, pending a new placement.
    pub fn unplace(&mut self, reason: String, now_ms: u64) {
        self.node = None;
        self.generation += 1;
        self.transition(Phase::Pending, Some(reason), now_ms);
    }
}

impl Phase {
    /// Whether the host has the VM's runner going.
    pub fn is_up(self) -> bool {
        matches!(self, Phase::Running | Phase::Ready)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Phase::Pending => "pending",
            Phase::Scheduled => "scheduled",
            Phase::Fetching => "fetching",
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Ready => "ready",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
        };
        f.write_str(s)
    }
}

/// A constraint key that names a host instead of a label: `blixard.node=n2` pins a VM to
/// node 2 (what `placement = "local"` of a declared VM means).
pub const NODE_CONSTRAINT: &str = "blixard.node";

/// The default tenant: VMs created without one belong to it. It exists implicitly, with
/// no quota, until someone sets one.
pub const DEFAULT_TENANT: &str = "default";

/// The most vCPUs and memory one VM may ask for.
pub const MAX_VCPUS: u32 = 256;
pub const MIN_MEMORY_MIB: u64 = 16;
pub const MAX_MEMORY_MIB: u64 = 4 << 20;

#[cfg(test)]
mod name_tests {
    use super::*;

    #[test]
    fn vm_names_are_host_names() {
        let long = "a".repeat(63);
        for ok in ["web", "a", "0", "web-1", "1web", long.as_str()] {
            assert!(valid_vm_name(ok), "{ok}");
        }
        let too_long = "a".repeat(64);
        for bad in [
            "",
            "web.prod",
            "web_1",
            "web-",
            "-web",
            "Web",
            "web 1",
            "wéb",
            too_long.as_str(),
        ] {
            assert!(!valid_vm_name(bad), "{bad:?}");
        }
    }
}
