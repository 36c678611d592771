//! VMs, tenants and quotas as cluster state knows them, and the scheduler: a pure function
//! from the state to a placement, which the leader proposes as a command.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{BlobHash, NodeId};
use crate::state::{Capacity, Member, MemberStatus};

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
    pub fn admits(&self, used: Allocated, vcpus: u32, memory_mib: u64) -> Result<(), String> {
        let count = u64::from(used.vms) + 1;
        let vcpus = used.vcpus + u64::from(vcpus);
        let memory = used.memory_mib + memory_mib;
        if let Some(max) = self.max_vms.filter(|m| count > u64::from(*m)) {
            return Err(format!("{count} VMs > {max}"));
        }
        if let Some(max) = self.max_vcpus.filter(|m| vcpus > u64::from(*m)) {
            return Err(format!("{vcpus} vCPUs > {max}"));
        }
        if let Some(max) = self.max_memory_mib.filter(|m| memory > *m) {
            return Err(format!("{memory} MiB > {max} MiB"));
        }
        Ok(())
    }
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
    /// VMs of the same group never share a host.
    pub anti_affinity: Option<String>,
    pub restart: RestartPolicy,
    /// A line the guest prints on its console once it is ready; without one, a running
    /// VM is as ready as Blixard can tell.
    pub ready_marker: Option<String>,
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

/// A host chosen for a VM, with the overcommit the choice was made under (so `apply`
/// re-checks the fit the same way on every node).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub node: NodeId,
    pub cpu_overcommit_pct: u32,
    pub memory_overcommit_pct: u32,
}

/// How the scheduler picks among hosts that fit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    /// Fill the fullest host that still fits (fewer hosts busy).
    #[default]
    BinPack,
    /// The emptiest host (load spread out).
    Spread,
}

/// The scheduler's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    pub strategy: Strategy,
    /// How much of a host's vCPUs may be promised, in percent (100 = no overcommit).
    pub cpu_overcommit_pct: u32,
    /// The same for memory.
    pub memory_overcommit_pct: u32,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            strategy: Strategy::BinPack,
            cpu_overcommit_pct: 100,
            memory_overcommit_pct: 100,
        }
    }
}

/// What is promised on one host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocated {
    pub vcpus: u64,
    pub memory_mib: u64,
    pub vms: u32,
}

/// The hosts' allocations and anti-affinity groups, built once per scheduling round so
/// placing many VMs costs O(VMs × hosts), not O(VMs² × hosts).
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    pub allocated: BTreeMap<NodeId, Allocated>,
    /// The hosts each anti-affinity group uses.
    pub groups: BTreeMap<String, std::collections::BTreeSet<NodeId>>,
    /// Hosts being drained: they take no new VMs.
    pub drained: std::collections::BTreeSet<NodeId>,
    /// Hosts the leader has marked down.
    pub down: std::collections::BTreeSet<NodeId>,
}

impl Ledger {
    pub fn from_vms<'a>(vms: impl IntoIterator<Item = &'a Vm>) -> Self {
        let mut ledger = Ledger::default();
        for vm in vms {
            if let Some(node) = vm.node {
                ledger.add(vm, node);
            }
        }
        ledger
    }

    pub fn add(&mut self, vm: &Vm, node: NodeId) {
        self.add_spec(&vm.spec, node);
    }

    /// Records a VM of `spec` on `node` (e.g. after each decision of a scheduling round).
    pub fn add_spec(&mut self, spec: &VmSpec, node: NodeId) {
        let a = self.allocated.entry(node).or_default();
        a.vcpus += u64::from(spec.vcpus);
        a.memory_mib += spec.memory_mib;
        a.vms += 1;
        if let Some(g) = &spec.anti_affinity {
            self.groups.entry(g.clone()).or_default().insert(node);
        }
    }
}

fn limit(capacity: u64, pct: u32) -> u64 {
    capacity.saturating_mul(u64::from(pct)) / 100
}

/// Whether `vm` fits on `member` given what is already there; the reason if not.
pub fn fits(
    member: &Member,
    vm: &VmSpec,
    ledger: &Ledger,
    config: &SchedulerConfig,
) -> Result<(), String> {
    let used = ledger
        .allocated
        .get(&member.id)
        .copied()
        .unwrap_or_default();
    let group = vm.anti_affinity.as_ref().and_then(|g| ledger.groups.get(g));
    check(member, vm, used, group, ledger, config)
}

/// [`fits`] with the host's allocation and the VM's group already looked up.
fn check(
    member: &Member,
    vm: &VmSpec,
    used: Allocated,
    group: Option<&std::collections::BTreeSet<NodeId>>,
    ledger: &Ledger,
    config: &SchedulerConfig,
) -> Result<(), String> {
    if member.status != MemberStatus::Active {
        return Err("not active".into());
    }
    if ledger.drained.contains(&member.id) {
        return Err("drained".into());
    }
    if ledger.down.contains(&member.id) {
        return Err("down".into());
    }
    for (k, v) in &vm.constraints {
        if k == NODE_CONSTRAINT {
            if v.strip_prefix('n').and_then(|n| n.parse().ok()) != Some(member.id.0) {
                return Err(format!("is not {v}"));
            }
        } else if member.labels.get(k) != Some(v) {
            return Err(format!("lacks label {k}={v}"));
        }
    }
    if group.is_some_and(|hosts| hosts.contains(&member.id)) {
        let g = vm.anti_affinity.as_deref().unwrap_or_default();
        return Err(format!("already runs a VM of group {g}"));
    }
    let Capacity { vcpus, memory_mib } = member.capacity;
    if used.vcpus + u64::from(vm.vcpus) > limit(u64::from(vcpus), config.cpu_overcommit_pct) {
        return Err("not enough vCPUs".into());
    }
    if used.memory_mib + vm.memory_mib > limit(memory_mib, config.memory_overcommit_pct) {
        return Err("not enough memory".into());
    }
    Ok(())
}

/// Picks a host for `vm` among `members`: deterministic for the same inputs (ties go to
/// the lowest node id). On failure, says why for every host, grouped ("3 hosts: not
/// enough memory; 1 host: lacks label zone=a").
pub fn place<'a>(
    members: impl IntoIterator<Item = &'a Member>,
    vm: &VmSpec,
    ledger: &Ledger,
    config: &SchedulerConfig,
) -> Result<NodeId, String> {
    let mut best: Option<(u64, NodeId)> = None;
    let mut reasons: BTreeMap<String, u32> = BTreeMap::new();
    let mut hosts = 0;
    let group = vm.anti_affinity.as_ref().and_then(|g| ledger.groups.get(g));
    for m in members {
        hosts += 1;
        let used = ledger.allocated.get(&m.id).copied().unwrap_or_default();
        if let Err(why) = check(m, vm, used, group, ledger, config) {
            *reasons.entry(why).or_default() += 1;
            continue;
        }
        // Utilisation after placing, in parts per million of the larger dimension.
        let cpu =
            (used.vcpus + u64::from(vm.vcpus)) * 1_000_000 / u64::from(m.capacity.vcpus).max(1);
        let mem = (used.memory_mib + vm.memory_mib) * 1_000_000 / m.capacity.memory_mib.max(1);
        let load = cpu.max(mem);
        let score = match config.strategy {
            Strategy::BinPack => u64::MAX - load,
            Strategy::Spread => load,
        };
        // Lower score wins; ties go to the lower node id (members come in id order).
        if best.is_none_or(|(s, _)| score < s) {
            best = Some((score, m.id));
        }
    }
    match best {
        Some((_, node)) => Ok(node),
        None if hosts == 0 => Err("no hosts".into()),
        None => Err(reasons
            .into_iter()
            .map(|(why, n)| format!("{n} host{}: {why}", if n == 1 { "" } else { "s" }))
            .collect::<Vec<_>>()
            .join("; ")),
    }
}

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
