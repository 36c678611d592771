//! The scheduler: a pure function from hosts, a [`Ledger`] of what is placed where and a
//! VM to a host, or why there is none. The leader proposes its decision as a command;
//! `apply` re-checks it with [`fits`].

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;
use crate::member::{Capacity, Member, MemberStatus};
use crate::vm::{Allocated, Vm, VmSpec, NODE_CONSTRAINT};

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
    /// Spread over zones first (the `zone` label: the zone whose hosts are the least
    /// loaded on average), then the emptiest host in that zone: losing a zone loses as
    /// few VMs as it can.
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

/// The hosts' allocations and anti-affinity groups, built once per scheduling round so
/// placing many VMs costs O(VMs × hosts), not O(VMs² × hosts).
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    pub allocated: BTreeMap<NodeId, Allocated>,
    /// The hosts each anti-affinity group uses.
    pub groups: BTreeMap<String, BTreeSet<NodeId>>,
    /// Hosts being drained: they take no new VMs.
    pub drained: BTreeSet<NodeId>,
    /// Hosts the leader has marked down.
    pub down: BTreeSet<NodeId>,
    /// The hosts' labels, for groups that spread over a label ([`VmSpec::spread_over`]).
    pub host_labels: BTreeMap<NodeId, BTreeMap<String, String>>,
    /// Whether `GROUP@LABEL` spreads a group over a label: from cluster version 3 on.
    /// Before, the whole string is the group's name, as older releases read it, so that
    /// every member of a mixed cluster judges a placement alike.
    pub spread_groups: bool,
}

impl Ledger {
    /// The placed VMs' allocations and groups; `spread_groups` as [`Ledger::spread_groups`].
    pub fn from_vms<'a>(vms: impl IntoIterator<Item = &'a Vm>, spread_groups: bool) -> Self {
        let mut ledger = Ledger {
            spread_groups,
            ..Ledger::default()
        };
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
        if let Some(g) = self.group_of(spec) {
            self.groups.entry(g.to_string()).or_default().insert(node);
        }
    }
}

impl Ledger {
    /// The VM's anti-affinity group ([`VmSpec::group`], or the whole string before
    /// cluster version 3).
    pub fn group_of<'a>(&self, spec: &'a VmSpec) -> Option<&'a str> {
        if self.spread_groups {
            spec.group()
        } else {
            spec.anti_affinity.as_deref()
        }
    }

    /// The node label the VM's group spreads over ([`VmSpec::spread_over`]; none before
    /// cluster version 3).
    pub fn spread_of<'a>(&self, spec: &'a VmSpec) -> Option<&'a str> {
        self.spread_groups.then(|| spec.spread_over()).flatten()
    }
}

/// Why a VM does not fit on a host.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FitError {
    #[error("not active")]
    NotActive,
    #[error("drained")]
    Drained,
    #[error("down")]
    Down,
    /// The VM is pinned to another node by [`NODE_CONSTRAINT`] (its value, e.g. `n2`).
    #[error("is not {0}")]
    NotNode(String),
    #[error("lacks label {key}={value}")]
    LacksLabel { key: String, value: String },
    #[error("already runs a VM of group {0}")]
    AntiAffinity(String),
    /// The VM's group spreads over a node label this host lacks.
    #[error("lacks label {0} (its group spreads over it)")]
    LacksSpreadLabel(String),
    /// Another VM of the group runs on a host with the same value of the label.
    #[error("group {group} already runs on {label}")]
    SpreadTaken { group: String, label: String },
    #[error("not enough vCPUs")]
    Vcpus,
    #[error("not enough memory")]
    Memory,
}

/// Why [`place`] found no host for a VM.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    #[error("no hosts")]
    NoHosts,
    /// Every host refused: each reason with how many hosts gave it, ordered by the
    /// reasons' text ("3 hosts: not enough memory; 1 host: lacks label zone=a").
    #[error("{}", summary(.0))]
    NoneFits(Vec<(FitError, u32)>),
}

fn summary(reasons: &[(FitError, u32)]) -> String {
    reasons
        .iter()
        .map(|(why, n)| format!("{n} host{}: {why}", if *n == 1 { "" } else { "s" }))
        .collect::<Vec<_>>()
        .join("; ")
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
) -> Result<(), FitError> {
    let used = ledger
        .allocated
        .get(&member.id)
        .copied()
        .unwrap_or_default();
    let group = ledger.group_of(vm).and_then(|g| ledger.groups.get(g));
    check(member, vm, used, group, ledger, config)
}

/// [`fits`] with the host's allocation and the VM's group already looked up.
fn check(
    member: &Member,
    vm: &VmSpec,
    used: Allocated,
    group: Option<&BTreeSet<NodeId>>,
    ledger: &Ledger,
    config: &SchedulerConfig,
) -> Result<(), FitError> {
    if member.status != MemberStatus::Active {
        return Err(FitError::NotActive);
    }
    if ledger.drained.contains(&member.id) {
        return Err(FitError::Drained);
    }
    if ledger.down.contains(&member.id) {
        return Err(FitError::Down);
    }
    for (k, v) in &vm.constraints {
        if k == NODE_CONSTRAINT {
            if v.strip_prefix('n').and_then(|n| n.parse().ok()) != Some(member.id.0) {
                return Err(FitError::NotNode(v.clone()));
            }
        } else if member.labels.get(k) != Some(v) {
            return Err(FitError::LacksLabel {
                key: k.clone(),
                value: v.clone(),
            });
        }
    }
    if group.is_some_and(|hosts| hosts.contains(&member.id)) {
        let g = ledger.group_of(vm).unwrap_or_default().to_string();
        return Err(FitError::AntiAffinity(g));
    }
    if let Some(label) = ledger.spread_of(vm) {
        let Some(value) = member.labels.get(label) else {
            return Err(FitError::LacksSpreadLabel(label.to_string()));
        };
        let taken = group.is_some_and(|hosts| {
            hosts.iter().any(|h| {
                ledger
                    .host_labels
                    .get(h)
                    .and_then(|l| l.get(label))
                    .is_some_and(|v| v == value)
            })
        });
        if taken {
            return Err(FitError::SpreadTaken {
                group: ledger.group_of(vm).unwrap_or_default().to_string(),
                label: format!("{label}={value}"),
            });
        }
    }
    let Capacity { vcpus, memory_mib } = member.capacity;
    if used.vcpus + u64::from(vm.vcpus) > limit(u64::from(vcpus), config.cpu_overcommit_pct) {
        return Err(FitError::Vcpus);
    }
    if used.memory_mib + vm.memory_mib > limit(memory_mib, config.memory_overcommit_pct) {
        return Err(FitError::Memory);
    }
    Ok(())
}

/// The label that names a host's zone (site, rack, datacenter).
pub const ZONE_LABEL: &str = "zone";

fn zone_of(m: &Member) -> &str {
    m.labels.get(ZONE_LABEL).map_or("", String::as_str)
}

/// Load in parts per million of the larger dimension.
fn load_of(used: Allocated, capacity: Capacity) -> u64 {
    let cpu = used.vcpus * 1_000_000 / u64::from(capacity.vcpus).max(1);
    let mem = used.memory_mib * 1_000_000 / capacity.memory_mib.max(1);
    cpu.max(mem)
}

/// Picks a host for `vm` among `members`: deterministic for the same inputs (ties go to
/// the lowest node id). On failure, says why for every host, grouped.
pub fn place<'a>(
    members: impl IntoIterator<Item = &'a Member>,
    vm: &VmSpec,
    ledger: &Ledger,
    config: &SchedulerConfig,
) -> Result<NodeId, PlaceError> {
    let spread = config.strategy == Strategy::Spread;
    // The hosts that fit: their zone (an index into `zones`), their load after placing,
    // their id. `zones`: each zone's name, its hosts' summed load and how many hosts that
    // can take VMs at all (for `spread`; zones are few, a linear search beats a map).
    let mut fit: Vec<(usize, u64, NodeId)> = Vec::new();
    let mut zones: Vec<(&str, u64, u64)> = Vec::new();
    // Grouped by the reason's text, so reasons that read the same count as one.
    let mut reasons: BTreeMap<String, (FitError, u32)> = BTreeMap::new();
    let mut hosts = 0;
    let group = ledger.group_of(vm).and_then(|g| ledger.groups.get(g));
    for m in members {
        hosts += 1;
        let used = ledger.allocated.get(&m.id).copied().unwrap_or_default();
        let verdict = check(m, vm, used, group, ledger, config);
        let zone = if spread {
            let name = zone_of(m);
            let i = match zones.iter().position(|(z, _, _)| *z == name) {
                Some(i) => i,
                None => {
                    zones.push((name, 0, 0));
                    zones.len() - 1
                }
            };
            let takes_vms = !matches!(
                verdict,
                Err(FitError::NotActive | FitError::Drained | FitError::Down)
            );
            if takes_vms {
                zones[i].1 += load_of(used, m.capacity);
                zones[i].2 += 1;
            }
            i
        } else {
            0
        };
        if let Err(why) = verdict {
            reasons.entry(why.to_string()).or_insert((why, 0)).1 += 1;
            continue;
        }
        let after = Allocated {
            vcpus: used.vcpus + u64::from(vm.vcpus),
            memory_mib: used.memory_mib + vm.memory_mib,
            ..used
        };
        fit.push((zone, load_of(after, m.capacity), m.id));
    }
    // Lower score wins; ties go to the lower node id (members come in id order).
    let score = |&(zone, load, _): &(usize, u64, NodeId)| {
        if spread {
            let (_, sum, n) = zones[zone];
            (sum / n.max(1), load)
        } else {
            (0, u64::MAX - load)
        }
    };
    let mut best: Option<((u64, u64), NodeId)> = None;
    for candidate in &fit {
        let s = score(candidate);
        if best.is_none_or(|(b, _)| s < b) {
            best = Some((s, candidate.2));
        }
    }
    match best {
        Some((_, node)) => Ok(node),
        None if hosts == 0 => Err(PlaceError::NoHosts),
        None => Err(PlaceError::NoneFits(reasons.into_values().collect())),
    }
}
