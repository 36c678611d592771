//! The replicated cluster state and its deterministic `apply`.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::command::{Command, CommandOutput, JoinRequest, MemberRole, NewMember};
use crate::encoding::DecodeError;
use crate::ids::{BlobHash, ClusterId, EndpointKey, NodeId};
use crate::image::{Image, MAX_IMAGE_BYTES, MAX_IMAGE_NARS};
use crate::table::{Row, Table};
use crate::vm::{
    fits, Desired, Ledger, Phase, Placement, Quota, RestartPolicy, SchedulerConfig, Tenant, Vm,
    VmSpec, DEFAULT_TENANT, MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB,
};

/// The longest metadata key and value accepted.
const MAX_META_KEY: usize = 128;
const MAX_META_VALUE: usize = 4096;

/// What a node offers to VMs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// The cluster's identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMeta {
    pub cluster_id: ClusterId,
    pub name: String,
    pub created_at_ms: u64,
    /// The next node id to allocate; ids are never reused.
    pub next_node_id: u64,
}

/// A member's status as the state machine knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberStatus {
    /// Admitted by a join token; not yet in the raft configuration.
    Joining,
    Active,
}

/// A cluster member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub name: String,
    pub endpoint: EndpointKey,
    pub addrs: Vec<SocketAddr>,
    pub labels: BTreeMap<String, String>,
    pub capacity: Capacity,
    pub role: MemberRole,
    pub status: MemberStatus,
    pub joined_at_ms: u64,
}

/// A node's admin credential: the key the CLI uses from that node's data dir.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminCredential {
    pub node: NodeId,
    pub created_at_ms: u64,
}

/// A user: a named key with roles and an optional tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub key: EndpointKey,
    pub roles: Vec<String>,
    pub tenant: Option<String>,
    pub created_at_ms: u64,
}

/// Names of users, roles and tenants: 1 to 64 of `a-z 0-9 . _ -`, starting with a letter
/// or digit.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
}

/// A one-time join token, known only by the hash of its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub used_by: Option<NodeId>,
}

/// Why a command was refused. A refused command changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ApplyError {
    #[error("the cluster is not bootstrapped")]
    NotBootstrapped,
    #[error("the cluster is already bootstrapped")]
    AlreadyBootstrapped,
    #[error("unknown join token")]
    TokenUnknown,
    #[error("join token already used (by node {0})")]
    TokenUsed(NodeId),
    #[error("join token expired")]
    TokenExpired,
    #[error("join token already exists")]
    TokenExists,
    #[error("node {0} is not a member")]
    UnknownMember(NodeId),
    #[error("node {0} was removed from the cluster; its id is never reused")]
    MemberRemoved(NodeId),
    #[error("endpoint {0} already belongs to member {1}")]
    EndpointInUse(EndpointKey, NodeId),
    #[error("invalid metadata: {0}")]
    InvalidMeta(String),
    #[error("node id {0} was allocated concurrently; retry the join")]
    StaleNodeId(NodeId),
    #[error("raft refused the configuration change: {0}")]
    ConfChangeRefused(String),
    #[error("user {0} already exists")]
    UserExists(String),
    #[error("no user {0}")]
    UnknownUser(String),
    #[error("key {0} is already in use by {1}")]
    KeyInUse(EndpointKey, String),
    #[error("invalid user: {0}")]
    InvalidUser(String),
    #[error("node {0} is the last voter; add another node before removing it")]
    LastVoter(NodeId),
    #[error("invalid image: {0}")]
    InvalidImage(String),
    #[error("no image {0}")]
    UnknownImage(String),
    #[error(
        "image {0} already exists with a different closure; remove it first or pick another name"
    )]
    ImageExists(String),
    #[error("image {0} now names another closure")]
    ImageChanged(String),
    #[error("image {0} is pinned; unpin it first")]
    ImagePinned(String),
    #[error("image {0} is used by VM {1}")]
    ImageInUse(String, String),
    #[error("tenant {0} already exists")]
    TenantExists(String),
    #[error("no tenant {0}")]
    UnknownTenant(String),
    #[error("invalid tenant: {0}")]
    InvalidTenant(String),
    #[error("VM {0} already exists")]
    VmExists(String),
    #[error("no VM {0}")]
    UnknownVm(String),
    #[error("invalid VM: {0}")]
    InvalidVm(String),
    #[error("quota of tenant {tenant} exceeded: {what}")]
    QuotaExceeded { tenant: String, what: String },
    #[error("stale placement for VM {0} (it changed since the decision)")]
    StalePlacement(String),
    #[error("stale report for VM {0} (it was placed again since)")]
    StaleReport(String),
    #[error("VM {vm} does not fit on node {node}: {why}")]
    DoesNotFit {
        vm: String,
        node: NodeId,
        why: String,
    },
}

/// The whole replicated state. Each field is a [`Table`]; see [`State::tables_mut`].
#[derive(Clone, Debug)]
pub struct State {
    meta: Table<u8, ClusterMeta>,
    members: Table<NodeId, Member>,
    removed: Table<NodeId, u64>,
    admins: Table<EndpointKey, AdminCredential>,
    tokens: Table<[u8; 32], JoinToken>,
    kv: Table<String, String>,
    users: Table<String, User>,
    policies: Table<u8, String>,
    images: Table<String, Image>,
    cache_key: Table<u8, String>,
    tenants: Table<String, Tenant>,
    vms: Table<String, Vm>,
    drained: Table<NodeId, bool>,
    /// Hosts marked down by the leader, and since when.
    down: Table<NodeId, u64>,
}

impl Default for State {
    fn default() -> Self {
        Self::new()
    }
}

impl State {
    pub fn new() -> Self {
        Self {
            meta: Table::new("meta"),
            members: Table::new("members"),
            removed: Table::new("removed"),
            admins: Table::new("admins"),
            tokens: Table::new("join_tokens"),
            kv: Table::new("kv"),
            users: Table::new("users"),
            policies: Table::new("policies"),
            images: Table::new("images"),
            cache_key: Table::new("cache_key"),
            tenants: Table::new("tenants"),
            vms: Table::new("vms"),
            drained: Table::new("drained"),
            down: Table::new("down"),
        }
    }

    /// Applies one command. Deterministic: the same state and command give the same
    /// result and the same changed rows on every node.
    pub fn apply(&mut self, command: &Command) -> Result<CommandOutput, ApplyError> {
        if !matches!(command, Command::Bootstrap { .. }) && self.cluster().is_none() {
            return Err(ApplyError::NotBootstrapped);
        }
        match command {
            Command::Noop => Ok(CommandOutput::Done),
            Command::Bootstrap {
                cluster_id,
                name,
                member,
                admin,
                now_ms,
            } => self.bootstrap(*cluster_id, name, member, *admin, *now_ms),
            Command::SetMeta { key, value } => self.set_meta(key, value.as_deref()),
            Command::CreateJoinToken {
                token_hash,
                now_ms,
                expires_at_ms,
            } => {
                if self.tokens.contains(token_hash) {
                    return Err(ApplyError::TokenExists);
                }
                self.tokens.insert(
                    *token_hash,
                    JoinToken {
                        created_at_ms: *now_ms,
                        expires_at_ms: *expires_at_ms,
                        used_by: None,
                    },
                );
                Ok(CommandOutput::Done)
            }
            Command::Join(request) => self.join(request),
            Command::SetRole { node, role } => {
                self.check_not_removed(*node)?;
                let role = *role;
                if self.members.update(node, |m| {
                    m.role = role;
                    m.status = MemberStatus::Active;
                }) {
                    Ok(CommandOutput::Done)
                } else {
                    Err(ApplyError::UnknownMember(*node))
                }
            }
            Command::RemoveMember { node, now_ms } => {
                self.check_not_removed(*node)?;
                let voters = self
                    .members
                    .values()
                    .filter(|m| m.role == MemberRole::Voter)
                    .count();
                match self.members.get(node) {
                    None => return Err(ApplyError::UnknownMember(*node)),
                    Some(m) if m.role == MemberRole::Voter && voters <= 1 => {
                        return Err(ApplyError::LastVoter(*node))
                    }
                    Some(_) => {}
                }
                self.members.remove(node);
                self.removed.insert(*node, *now_ms);
                self.remove_admins_of(*node);
                let held: Vec<String> = self
                    .images
                    .iter()
                    .filter(|(_, i)| i.holders.contains(node))
                    .map(|(k, _)| k.clone())
                    .collect();
                for name in held {
                    self.images.update(&name, |i| {
                        i.holders.remove(node);
                    });
                }
                self.drained.remove(node);
                self.down.remove(node);
                self.unplace_from(
                    *node,
                    &format!("node {node} left the cluster"),
                    *now_ms,
                    |_| true,
                );
                Ok(CommandOutput::Done)
            }
            Command::AddUser(user) => self.add_user(user),
            Command::RemoveUser { name } => match self.users.remove(name) {
                Some(_) => Ok(CommandOutput::Done),
                None => Err(ApplyError::UnknownUser(name.clone())),
            },
            Command::SetPolicies { text } => {
                self.policies.insert(0, text.clone());
                Ok(CommandOutput::Done)
            }
            Command::AddImage(image) => self.add_image(image),
            Command::SetImageHolder {
                name,
                manifest,
                node,
                held,
            } => {
                let image = self
                    .images
                    .get(name)
                    .ok_or_else(|| ApplyError::UnknownImage(name.clone()))?;
                if image.manifest != *manifest {
                    return Err(ApplyError::ImageChanged(name.clone()));
                }
                if *held {
                    self.check_not_removed(*node)?;
                    if self.members.get(node).is_none() {
                        return Err(ApplyError::UnknownMember(*node));
                    }
                }
                let (node, held) = (*node, *held);
                self.images.update(name, |i| {
                    if held {
                        i.holders.insert(node);
                    } else {
                        i.holders.remove(&node);
                    }
                });
                Ok(CommandOutput::Done)
            }
            Command::PinImage { name, pinned } => {
                let pinned = *pinned;
                if self.images.update(name, |i| i.pinned = pinned) {
                    Ok(CommandOutput::Done)
                } else {
                    Err(ApplyError::UnknownImage(name.clone()))
                }
            }
            Command::RemoveImage { name } => match self.images.get(name) {
                None => Err(ApplyError::UnknownImage(name.clone())),
                Some(i) if i.pinned => Err(ApplyError::ImagePinned(name.clone())),
                Some(_) => {
                    if let Some((vm, _)) = self.vms.iter().find(|(_, v)| &v.spec.image == name) {
                        return Err(ApplyError::ImageInUse(name.clone(), vm.clone()));
                    }
                    self.images.remove(name);
                    Ok(CommandOutput::Done)
                }
            },
            Command::CreateTenant { name, now_ms } => {
                if !valid_name(name) {
                    return Err(ApplyError::InvalidTenant(format!(
                        "{name:?}: names are 1 to 64 of a-z 0-9 . _ -"
                    )));
                }
                if self.tenants.contains(name) {
                    return Err(ApplyError::TenantExists(name.clone()));
                }
                self.tenants.insert(
                    name.clone(),
                    Tenant {
                        name: name.clone(),
                        quota: Quota::default(),
                        created_at_ms: *now_ms,
                    },
                );
                Ok(CommandOutput::Done)
            }
            Command::SetQuota { tenant, quota } => {
                if tenant == DEFAULT_TENANT && !self.tenants.contains(tenant) {
                    self.tenants.insert(
                        tenant.clone(),
                        Tenant {
                            name: tenant.clone(),
                            quota: Quota::default(),
                            created_at_ms: 0,
                        },
                    );
                }
                let quota = *quota;
                if self.tenants.update(tenant, |t| t.quota = quota) {
                    Ok(CommandOutput::Done)
                } else {
                    Err(ApplyError::UnknownTenant(tenant.clone()))
                }
            }
            Command::CreateVm {
                spec,
                start,
                now_ms,
                placement,
            } => self.create_vm(spec, start, *now_ms, placement.as_ref()),
            Command::PlaceVm {
                key,
                generation,
                node,
                reason,
                cpu_overcommit_pct,
                memory_overcommit_pct,
                now_ms,
            } => {
                let vm = self
                    .vms
                    .get(key)
                    .ok_or_else(|| ApplyError::UnknownVm(key.clone()))?;
                if vm.generation != *generation || vm.node.is_some() {
                    return Err(ApplyError::StalePlacement(key.clone()));
                }
                if let Some(n) = node {
                    self.fits_on(*n, &vm.spec, *cpu_overcommit_pct, *memory_overcommit_pct)
                        .ok_or(ApplyError::UnknownMember(*n))?
                        .map_err(|why| ApplyError::DoesNotFit {
                            vm: key.clone(),
                            node: *n,
                            why,
                        })?;
                }
                let (node, reason, now) = (*node, reason.clone(), *now_ms);
                self.vms.update(key, |v| {
                    // A refused placement keeps the generation: the next decision is for
                    // the same pending VM.
                    if node.is_some() {
                        v.node = node;
                        v.generation += 1;
                        v.transition(Phase::Scheduled, reason, now);
                    } else {
                        v.transition(Phase::Pending, reason, now);
                    }
                });
                Ok(CommandOutput::Done)
            }
            Command::DeleteVm { key } => match self.vms.remove(key) {
                Some(_) => Ok(CommandOutput::Done),
                None => Err(ApplyError::UnknownVm(key.clone())),
            },
            Command::SetDrained {
                node,
                drained,
                now_ms,
            } => {
                if self.members.get(node).is_none() {
                    return Err(ApplyError::UnknownMember(*node));
                }
                if *drained {
                    self.drained.insert(*node, true);
                    // Every VM moves: stopped here, placed and started elsewhere.
                    self.unplace_from(
                        *node,
                        &format!("moved off drained node {node}"),
                        *now_ms,
                        |_| true,
                    );
                } else {
                    self.drained.remove(node);
                }
                Ok(CommandOutput::Done)
            }
            Command::SetNodeDown { node, down, now_ms } => {
                if self.members.get(node).is_none() {
                    return Err(ApplyError::UnknownMember(*node));
                }
                if !*down {
                    self.down.remove(node);
                    return Ok(CommandOutput::Done);
                }
                if self.down.contains(node) {
                    return Ok(CommandOutput::Done);
                }
                self.down.insert(*node, *now_ms);
                // VMs that should come back run elsewhere; the rest wait for their host.
                let why = format!("node {node} is down");
                self.unplace_from(*node, &why, *now_ms, |v| {
                    v.spec.restart != RestartPolicy::Never
                });
                let stuck: Vec<String> = self
                    .vms
                    .iter()
                    .filter(|(_, v)| v.node == Some(*node))
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in stuck {
                    let why = why.clone();
                    self.vms
                        .update(&key, |v| v.transition(Phase::Failed, Some(why), *now_ms));
                }
                Ok(CommandOutput::Done)
            }
            Command::SetVmDesired {
                key,
                desired,
                restart,
                now_ms,
            } => {
                let (desired, restart, now) = (*desired, *restart, *now_ms);
                if self.vms.update(key, |v| {
                    v.desired = desired;
                    if restart {
                        v.restarts += 1;
                    }
                    v.updated_at_ms = now;
                }) {
                    Ok(CommandOutput::Done)
                } else {
                    Err(ApplyError::UnknownVm(key.clone()))
                }
            }
            Command::ReportVm {
                key,
                node,
                generation,
                phase,
                reason,
                now_ms,
            } => {
                let vm = self
                    .vms
                    .get(key)
                    .ok_or_else(|| ApplyError::UnknownVm(key.clone()))?;
                if vm.node != Some(*node) || vm.generation != *generation {
                    return Err(ApplyError::StaleReport(key.clone()));
                }
                let (phase, reason, now) = (*phase, reason.clone(), *now_ms);
                self.vms.update(key, |v| v.transition(phase, reason, now));
                Ok(CommandOutput::Done)
            }
            Command::SetUserKey { name, key } => {
                if !self.users.contains(name) {
                    return Err(ApplyError::UnknownUser(name.clone()));
                }
                if let Some(holder) = self.key_holder(key) {
                    return Err(ApplyError::KeyInUse(*key, holder));
                }
                let key = *key;
                self.users.update(name, |u| u.key = key);
                Ok(CommandOutput::Done)
            }
            Command::SetAdminKey { node, key, now_ms } => {
                self.check_not_removed(*node)?;
                if self.members.get(node).is_none() {
                    return Err(ApplyError::UnknownMember(*node));
                }
                if let Some(holder) = self.key_holder(key) {
                    return Err(ApplyError::KeyInUse(*key, holder));
                }
                self.remove_admins_of(*node);
                self.admins.insert(
                    *key,
                    AdminCredential {
                        node: *node,
                        created_at_ms: *now_ms,
                    },
                );
                Ok(CommandOutput::Done)
            }
            Command::SetCacheKey { secret } => {
                if !self.cache_key.contains(&0) {
                    self.cache_key.insert(0, secret.clone());
                }
                Ok(CommandOutput::Done)
            }
            Command::UpdateAddrs { node, addrs } => {
                self.check_not_removed(*node)?;
                if self.members.update(node, |m| m.addrs = addrs.clone()) {
                    Ok(CommandOutput::Done)
                } else {
                    Err(ApplyError::UnknownMember(*node))
                }
            }
        }
    }

    fn bootstrap(
        &mut self,
        cluster_id: ClusterId,
        name: &str,
        member: &NewMember,
        admin: EndpointKey,
        now_ms: u64,
    ) -> Result<CommandOutput, ApplyError> {
        if self.cluster().is_some() {
            return Err(ApplyError::AlreadyBootstrapped);
        }
        let first = NodeId(1);
        self.meta.insert(
            0,
            ClusterMeta {
                cluster_id,
                name: name.to_string(),
                created_at_ms: now_ms,
                next_node_id: 2,
            },
        );
        self.members
            .insert(first, new_member(first, member, MemberRole::Voter, now_ms));
        self.admins.insert(
            admin,
            AdminCredential {
                node: first,
                created_at_ms: now_ms,
            },
        );
        Ok(CommandOutput::Joined { node: first })
    }

    fn set_meta(&mut self, key: &str, value: Option<&str>) -> Result<CommandOutput, ApplyError> {
        if key.is_empty() || key.len() > MAX_META_KEY || key.chars().any(char::is_control) {
            return Err(ApplyError::InvalidMeta(format!(
                "keys are 1 to {MAX_META_KEY} printable characters"
            )));
        }
        match value {
            Some(v) if v.len() > MAX_META_VALUE => Err(ApplyError::InvalidMeta(format!(
                "values are at most {MAX_META_VALUE} bytes"
            ))),
            Some(v) => {
                self.kv.insert(key.to_string(), v.to_string());
                Ok(CommandOutput::Done)
            }
            None => {
                self.kv.remove(&key.to_string());
                Ok(CommandOutput::Done)
            }
        }
    }

    fn join(&mut self, request: &JoinRequest) -> Result<CommandOutput, ApplyError> {
        let token = self
            .tokens
            .get(&request.token_hash)
            .ok_or(ApplyError::TokenUnknown)?;
        if let Some(node) = token.used_by {
            return Err(ApplyError::TokenUsed(node));
        }
        if request.now_ms >= token.expires_at_ms {
            return Err(ApplyError::TokenExpired);
        }
        if let Some(existing) = self.member_by_endpoint(&request.member.endpoint) {
            return Err(ApplyError::EndpointInUse(
                request.member.endpoint,
                existing.id,
            ));
        }
        let Some(mut meta) = self.cluster().cloned() else {
            return Err(ApplyError::NotBootstrapped);
        };
        let node = NodeId(meta.next_node_id);
        if request.node != node {
            return Err(ApplyError::StaleNodeId(request.node));
        }
        meta.next_node_id += 1;
        self.meta.insert(0, meta);
        self.tokens
            .update(&request.token_hash, |t| t.used_by = Some(node));
        let mut member = new_member(node, &request.member, MemberRole::Learner, request.now_ms);
        member.status = MemberStatus::Joining;
        self.members.insert(node, member);
        self.admins.insert(
            request.admin,
            AdminCredential {
                node,
                created_at_ms: request.now_ms,
            },
        );
        Ok(CommandOutput::Joined { node })
    }

    fn add_user(&mut self, user: &User) -> Result<CommandOutput, ApplyError> {
        if !valid_name(&user.name) {
            return Err(ApplyError::InvalidUser(format!(
                "{:?}: names are 1 to 64 of a-z 0-9 . _ -",
                user.name
            )));
        }
        if user.roles.is_empty() || !user.roles.iter().all(|r| valid_name(r)) {
            return Err(ApplyError::InvalidUser(
                "give at least one role, each 1 to 64 of a-z 0-9 . _ -".into(),
            ));
        }
        if let Some(t) = &user.tenant {
            if !valid_name(t) {
                return Err(ApplyError::InvalidUser(format!(
                    "invalid tenant name {t:?}"
                )));
            }
        }
        if self.users.contains(&user.name) {
            return Err(ApplyError::UserExists(user.name.clone()));
        }
        if let Some(holder) = self.key_holder(&user.key) {
            return Err(ApplyError::KeyInUse(user.key, holder));
        }
        self.users.insert(user.name.clone(), user.clone());
        Ok(CommandOutput::Done)
    }

    fn add_image(&mut self, image: &Image) -> Result<CommandOutput, ApplyError> {
        let invalid = |m: String| Err(ApplyError::InvalidImage(m));
        if !valid_name(&image.name) {
            return invalid(format!(
                "{:?}: names are 1 to 64 of a-z 0-9 . _ -",
                image.name
            ));
        }
        if image.nar_count == 0 || image.nar_count > MAX_IMAGE_NARS {
            return invalid(format!("an image lists 1 to {MAX_IMAGE_NARS} store paths"));
        }
        if image.nar_size > MAX_IMAGE_BYTES {
            return invalid(format!("an image is at most {MAX_IMAGE_BYTES} bytes"));
        }
        if !image.root.starts_with(&format!("{}/", image.store_dir)) {
            return invalid(format!(
                "root {} is not in store dir {}",
                image.root, image.store_dir
            ));
        }
        if let Some(t) = &image.tenant {
            if !valid_name(t) {
                return invalid(format!("invalid tenant name {t:?}"));
            }
        }
        for node in &image.holders {
            self.check_not_removed(*node)?;
            if self.members.get(node).is_none() {
                return Err(ApplyError::UnknownMember(*node));
            }
        }
        match self.images.get(&image.name) {
            Some(existing) if existing.manifest != image.manifest => {
                Err(ApplyError::ImageExists(image.name.clone()))
            }
            Some(_) => {
                let holders = image.holders.clone();
                self.images
                    .update(&image.name, |i| i.holders.extend(holders));
                Ok(CommandOutput::Done)
            }
            None => {
                self.images.insert(image.name.clone(), image.clone());
                Ok(CommandOutput::Done)
            }
        }
    }

    /// Drops every admin credential of `node`.
    fn remove_admins_of(&mut self, node: NodeId) {
        let creds: Vec<EndpointKey> = self
            .admins
            .iter()
            .filter(|(_, c)| c.node == node)
            .map(|(k, _)| *k)
            .collect();
        for key in creds {
            self.admins.remove(&key);
        }
    }

    fn create_vm(
        &mut self,
        spec: &VmSpec,
        start: &bool,
        now_ms: u64,
        placement: Option<&Placement>,
    ) -> Result<CommandOutput, ApplyError> {
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
            self.tenants.insert(
                spec.tenant.clone(),
                Tenant {
                    name: spec.tenant.clone(),
                    quota: Quota::default(),
                    created_at_ms: now_ms,
                },
            );
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
                what,
            })?;
        if let Some(m) = &spec.ready_marker {
            if m.is_empty() || m.len() > 256 || m.contains('\n') {
                return invalid("a ready marker is one line of 1 to 256 bytes".into());
            }
        }
        let mut vm = Vm {
            spec: spec.clone(),
            manifest: image.manifest,
            desired: if *start {
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
            let fit = self.fits_on(p.node, spec, p.cpu_overcommit_pct, p.memory_overcommit_pct);
            // No longer fitting is not an error: the VM waits for the scheduler.
            if fit == Some(Ok(())) {
                vm.node = Some(p.node);
                vm.generation += 1;
                vm.transition(Phase::Scheduled, None, now_ms);
            }
        }
        self.vms.insert(key, vm);
        Ok(CommandOutput::Done)
    }

    /// Re-checks a placement decided elsewhere: whether `spec` fits on member `node` under
    /// the overcommit it was decided with (the reason if not); `None` if `node` is no member.
    fn fits_on(
        &self,
        node: NodeId,
        spec: &VmSpec,
        cpu_overcommit_pct: u32,
        memory_overcommit_pct: u32,
    ) -> Option<Result<(), String>> {
        let config = SchedulerConfig {
            cpu_overcommit_pct,
            memory_overcommit_pct,
            ..SchedulerConfig::default()
        };
        let member = self.members.get(&node)?;
        Some(fits(member, spec, &self.ledger(), &config))
    }

    /// Unplaces the VMs on `node` that `which` selects.
    fn unplace_from(&mut self, node: NodeId, why: &str, now_ms: u64, which: impl Fn(&Vm) -> bool) {
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
        let mut ledger = Ledger::from_vms(self.vms.values());
        ledger.drained = self.drained.iter().map(|(n, _)| *n).collect();
        ledger.down = self.down.iter().map(|(n, _)| *n).collect();
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
    pub fn tenant_usage(&self, tenant: &str) -> crate::vm::Allocated {
        let mut used = crate::vm::Allocated::default();
        for v in self.vms.values().filter(|v| v.spec.tenant == tenant) {
            used.vms += 1;
            used.vcpus += u64::from(v.spec.vcpus);
            used.memory_mib += v.spec.memory_mib;
        }
        used
    }

    pub fn is_drained(&self, node: NodeId) -> bool {
        self.drained.contains(&node)
    }

    /// Since when the leader has had `node` marked down, if it is.
    pub fn down_since(&self, node: NodeId) -> Option<u64> {
        self.down.get(&node).copied()
    }

    pub fn images(&self) -> impl Iterator<Item = &Image> {
        self.images.values()
    }

    pub fn image(&self, name: &str) -> Option<&Image> {
        self.images.get(&name.to_string())
    }

    /// The images whose manifest is `manifest` (normally one).
    pub fn images_by_manifest(&self, manifest: &BlobHash) -> impl Iterator<Item = &Image> {
        let manifest = *manifest;
        self.images.values().filter(move |i| i.manifest == manifest)
    }

    /// The binary-cache signing key (Nix's secret-key form), once the first import set it.
    pub fn cache_key(&self) -> Option<&String> {
        self.cache_key.get(&0)
    }

    /// Who holds `key`: a member, an admin credential or a user.
    pub fn key_holder(&self, key: &EndpointKey) -> Option<String> {
        if let Some(m) = self.member_by_endpoint(key) {
            return Some(format!("node {}", m.id));
        }
        if let Some(a) = self.admins.get(key) {
            return Some(format!("the admin credential of node {}", a.node));
        }
        self.user_by_key(key).map(|u| format!("user {}", u.name))
    }

    pub fn users(&self) -> impl Iterator<Item = &User> {
        self.users.values()
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(&name.to_string())
    }

    pub fn user_by_key(&self, key: &EndpointKey) -> Option<&User> {
        self.users.values().find(|u| &u.key == key)
    }

    /// The policies set with `SetPolicies`; `None` means the built-in defaults.
    pub fn policies(&self) -> Option<&String> {
        self.policies.get(&0)
    }

    fn check_not_removed(&self, node: NodeId) -> Result<(), ApplyError> {
        if self.removed.contains(&node) {
            Err(ApplyError::MemberRemoved(node))
        } else {
            Ok(())
        }
    }

    // ---- reads ----

    /// The id the next joining node will get.
    pub fn next_node_id(&self) -> Option<NodeId> {
        self.cluster().map(|m| NodeId(m.next_node_id))
    }

    pub fn cluster(&self) -> Option<&ClusterMeta> {
        self.meta.get(&0)
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub fn member(&self, node: NodeId) -> Option<&Member> {
        self.members.get(&node)
    }

    pub fn member_by_endpoint(&self, endpoint: &EndpointKey) -> Option<&Member> {
        self.members.values().find(|m| &m.endpoint == endpoint)
    }

    pub fn is_removed(&self, node: NodeId) -> bool {
        self.removed.contains(&node)
    }

    pub fn admin(&self, key: &EndpointKey) -> Option<&AdminCredential> {
        self.admins.get(key)
    }

    pub fn meta_get(&self, key: &str) -> Option<&String> {
        self.kv.get(&key.to_string())
    }

    pub fn meta_entries(&self) -> impl Iterator<Item = (&String, &String)> {
        self.kv.iter()
    }

    // ---- persistence ----

    /// The rows changed since the last call; the storage layer writes them with the
    /// applied index in one transaction.
    pub fn drain_changes(&mut self) -> Vec<Row> {
        let mut out = Vec::new();
        self.meta.drain_changes(&mut out);
        self.members.drain_changes(&mut out);
        self.removed.drain_changes(&mut out);
        self.admins.drain_changes(&mut out);
        self.tokens.drain_changes(&mut out);
        self.kv.drain_changes(&mut out);
        self.users.drain_changes(&mut out);
        self.policies.drain_changes(&mut out);
        self.images.drain_changes(&mut out);
        self.cache_key.drain_changes(&mut out);
        self.tenants.drain_changes(&mut out);
        self.vms.drain_changes(&mut out);
        self.drained.drain_changes(&mut out);
        self.down.drain_changes(&mut out);
        out
    }

    /// Every row: the body of a snapshot.
    pub fn all_rows(&self) -> Vec<Row> {
        let mut out = Vec::new();
        self.meta.all_rows(&mut out);
        self.members.all_rows(&mut out);
        self.removed.all_rows(&mut out);
        self.admins.all_rows(&mut out);
        self.tokens.all_rows(&mut out);
        self.kv.all_rows(&mut out);
        self.users.all_rows(&mut out);
        self.policies.all_rows(&mut out);
        self.images.all_rows(&mut out);
        self.cache_key.all_rows(&mut out);
        self.tenants.all_rows(&mut out);
        self.vms.all_rows(&mut out);
        self.drained.all_rows(&mut out);
        self.down.all_rows(&mut out);
        out
    }

    /// Rebuilds a state from stored rows. Unknown tables are an error: they mean the data
    /// was written by a newer Blixard.
    pub fn from_rows<'a>(
        rows: impl IntoIterator<Item = (&'a str, &'a [u8], &'a [u8])>,
    ) -> Result<Self, LoadError> {
        let mut state = State::new();
        for (table, key, value) in rows {
            let result = match table {
                "meta" => state.meta.load(key, value),
                "members" => state.members.load(key, value),
                "removed" => state.removed.load(key, value),
                "admins" => state.admins.load(key, value),
                "join_tokens" => state.tokens.load(key, value),
                "kv" => state.kv.load(key, value),
                "users" => state.users.load(key, value),
                "policies" => state.policies.load(key, value),
                "images" => state.images.load(key, value),
                "cache_key" => state.cache_key.load(key, value),
                "tenants" => state.tenants.load(key, value),
                "vms" => state.vms.load(key, value),
                "drained" => state.drained.load(key, value),
                "down" => state.down.load(key, value),
                other => return Err(LoadError::UnknownTable(other.to_string())),
            };
            result.map_err(|source| LoadError::Row {
                table: table.to_string(),
                source,
            })?;
        }
        Ok(state)
    }

    /// A digest of the whole state, equal on nodes that applied the same log.
    pub fn digest(&self) -> u64 {
        // FNV-1a: stable across builds and platforms, unlike std's hasher.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for row in self.all_rows() {
            for byte in row
                .table
                .bytes()
                .chain(row.key.iter().copied())
                .chain(row.value.iter().flatten().copied())
            {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
        hash
    }
}

fn new_member(id: NodeId, m: &NewMember, role: MemberRole, now_ms: u64) -> Member {
    Member {
        id,
        name: m.name.clone(),
        endpoint: m.endpoint,
        addrs: m.addrs.clone(),
        labels: m.labels.clone(),
        capacity: m.capacity,
        role,
        status: MemberStatus::Active,
        joined_at_ms: now_ms,
    }
}

/// Stored state could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("unknown state table {0:?} (written by a newer blixard?)")]
    UnknownTable(String),
    #[error("corrupt row in table {table:?}")]
    Row {
        table: String,
        #[source]
        source: DecodeError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_member(n: u8) -> NewMember {
        NewMember {
            name: format!("node{n}"),
            endpoint: EndpointKey([n; 32]),
            addrs: vec![SocketAddr::from(([127, 0, 0, 1], 7000 + u16::from(n)))],
            labels: BTreeMap::new(),
            capacity: Capacity {
                vcpus: 4,
                memory_mib: 4096,
            },
        }
    }

    fn bootstrapped() -> State {
        let mut s = State::new();
        s.apply(&Command::Bootstrap {
            cluster_id: ClusterId([1; 16]),
            name: "test".into(),
            member: new_member(1),
            admin: EndpointKey([100; 32]),
            now_ms: 1_000,
        })
        .unwrap();
        s
    }

    fn token(s: &mut State, secret: u8, expires: u64) -> [u8; 32] {
        let hash = [secret; 32];
        s.apply(&Command::CreateJoinToken {
            token_hash: hash,
            now_ms: 1_000,
            expires_at_ms: expires,
        })
        .unwrap();
        hash
    }

    fn join(
        s: &mut State,
        hash: [u8; 32],
        n: u8,
        now_ms: u64,
    ) -> Result<CommandOutput, ApplyError> {
        let node = NodeId(s.cluster().unwrap().next_node_id);
        s.apply(&Command::Join(JoinRequest {
            node,
            token_hash: hash,
            now_ms,
            member: new_member(n),
            admin: EndpointKey([100 + n; 32]),
        }))
    }

    #[test]
    fn nothing_applies_before_bootstrap_and_bootstrap_applies_once() {
        let mut s = State::new();
        assert_eq!(s.apply(&Command::Noop), Err(ApplyError::NotBootstrapped));
        let mut s = bootstrapped();
        let again = s.apply(&Command::Bootstrap {
            cluster_id: ClusterId([2; 16]),
            name: "other".into(),
            member: new_member(9),
            admin: EndpointKey([9; 32]),
            now_ms: 5,
        });
        assert_eq!(again, Err(ApplyError::AlreadyBootstrapped));
        assert_eq!(s.cluster().unwrap().cluster_id, ClusterId([1; 16]));
        assert!(s.admin(&EndpointKey([100; 32])).is_some());
    }

    #[test]
    fn join_tokens_are_one_time_and_expire() {
        let mut s = bootstrapped();
        let t = token(&mut s, 7, 10_000);
        assert_eq!(
            join(&mut s, t, 2, 2_000),
            Ok(CommandOutput::Joined { node: NodeId(2) })
        );
        assert_eq!(
            join(&mut s, t, 3, 2_000),
            Err(ApplyError::TokenUsed(NodeId(2)))
        );
        let t2 = token(&mut s, 8, 3_000);
        assert_eq!(join(&mut s, t2, 3, 3_000), Err(ApplyError::TokenExpired));
        assert_eq!(join(&mut s, [9; 32], 3, 1), Err(ApplyError::TokenUnknown));
        let t3 = token(&mut s, 10, 10_000);
        // The same endpoint cannot join twice.
        assert!(matches!(
            join(&mut s, t3, 2, 2_000),
            Err(ApplyError::EndpointInUse(_, NodeId(2)))
        ));
        assert_eq!(
            join(&mut s, t3, 3, 2_000),
            Ok(CommandOutput::Joined { node: NodeId(3) })
        );
        assert_eq!(s.member(NodeId(3)).unwrap().status, MemberStatus::Joining);
    }

    #[test]
    fn removed_ids_are_never_reused_or_revived() {
        let mut s = bootstrapped();
        let t = token(&mut s, 7, 10_000);
        join(&mut s, t, 2, 2_000).unwrap();
        s.apply(&Command::SetRole {
            node: NodeId(2),
            role: MemberRole::Voter,
        })
        .unwrap();
        s.apply(&Command::RemoveMember {
            node: NodeId(2),
            now_ms: 3_000,
        })
        .unwrap();
        assert!(s.is_removed(NodeId(2)));
        assert!(s.admin(&EndpointKey([102; 32])).is_none());
        assert_eq!(
            s.apply(&Command::SetRole {
                node: NodeId(2),
                role: MemberRole::Voter
            }),
            Err(ApplyError::MemberRemoved(NodeId(2)))
        );
        let t = token(&mut s, 8, 10_000);
        assert_eq!(
            join(&mut s, t, 4, 2_000),
            Ok(CommandOutput::Joined { node: NodeId(3) })
        );
        assert_eq!(
            s.apply(&Command::RemoveMember {
                node: NodeId(1),
                now_ms: 1
            }),
            Err(ApplyError::LastVoter(NodeId(1)))
        );
    }

    #[test]
    fn refused_commands_change_nothing() {
        let mut s = bootstrapped();
        s.drain_changes();
        let before = s.digest();
        assert!(s
            .apply(&Command::SetMeta {
                key: String::new(),
                value: Some("x".into())
            })
            .is_err());
        assert!(join(&mut s, [3; 32], 3, 1).is_err());
        assert!(s.drain_changes().is_empty());
        assert_eq!(s.digest(), before);
    }

    #[test]
    fn rows_rebuild_the_same_state() {
        let mut s = bootstrapped();
        let t = token(&mut s, 7, 10_000);
        join(&mut s, t, 2, 2_000).unwrap();
        s.apply(&Command::SetMeta {
            key: "owner".into(),
            value: Some("ops".into()),
        })
        .unwrap();
        let rows = s.all_rows();
        let loaded = State::from_rows(rows.iter().map(|r| {
            (
                r.table.as_str(),
                r.key.as_slice(),
                r.value.as_deref().unwrap(),
            )
        }))
        .unwrap();
        assert_eq!(loaded.digest(), s.digest());
        assert_eq!(loaded.meta_get("owner").map(String::as_str), Some("ops"));
    }

    #[test]
    fn changes_track_inserts_and_deletes() {
        let mut s = bootstrapped();
        s.drain_changes();
        s.apply(&Command::SetMeta {
            key: "a".into(),
            value: Some("1".into()),
        })
        .unwrap();
        s.apply(&Command::SetMeta {
            key: "a".into(),
            value: None,
        })
        .unwrap();
        let changes = s.drain_changes();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].table, "kv");
        assert_eq!(changes[0].value, None);
    }

    #[test]
    fn users_have_unique_names_and_keys() {
        let mut s = bootstrapped();
        let alice = User {
            name: "alice".into(),
            key: EndpointKey([50; 32]),
            roles: vec!["operator".into()],
            tenant: Some("acme".into()),
            created_at_ms: 5,
        };
        s.apply(&Command::AddUser(alice.clone())).unwrap();
        assert_eq!(s.user_by_key(&EndpointKey([50; 32])), Some(&alice));
        assert_eq!(
            s.apply(&Command::AddUser(alice.clone())),
            Err(ApplyError::UserExists("alice".into()))
        );
        let mut bob = alice.clone();
        bob.name = "bob".into();
        assert!(matches!(
            s.apply(&Command::AddUser(bob.clone())),
            Err(ApplyError::KeyInUse(..))
        ));
        bob.key = EndpointKey([100; 32]); // the admin credential of node 1
        assert!(matches!(
            s.apply(&Command::AddUser(bob.clone())),
            Err(ApplyError::KeyInUse(..))
        ));
        bob.key = EndpointKey([51; 32]);
        bob.name = "Bob!".into();
        assert!(matches!(
            s.apply(&Command::AddUser(bob.clone())),
            Err(ApplyError::InvalidUser(_))
        ));
        bob.name = "bob".into();
        bob.roles = vec![];
        assert!(matches!(
            s.apply(&Command::AddUser(bob)),
            Err(ApplyError::InvalidUser(_))
        ));
        s.apply(&Command::RemoveUser {
            name: "alice".into(),
        })
        .unwrap();
        assert!(s.user("alice").is_none());
        assert_eq!(
            s.apply(&Command::RemoveUser {
                name: "alice".into()
            }),
            Err(ApplyError::UnknownUser("alice".into()))
        );
    }

    #[test]
    fn stored_rows_from_format_version_1_still_decode() {
        // Fixture: a `kv` row as format version 1 writes it. If this test fails, the
        // encoding changed: add a new version instead of changing this one.
        let key = [1u8, 5, b'o', b'w', b'n', b'e', b'r'];
        let value = [1u8, 3, b'o', b'p', b's'];
        let s = State::from_rows([("kv", &key[..], &value[..])]).unwrap();
        assert_eq!(s.meta_get("owner").map(String::as_str), Some("ops"));
        let future = [2u8, 3, b'o', b'p', b's'];
        assert!(matches!(
            State::from_rows([("kv", &key[..], &future[..])]),
            Err(LoadError::Row { .. })
        ));
        assert!(matches!(
            State::from_rows([("vms_v9", &key[..], &value[..])]),
            Err(LoadError::UnknownTable(_))
        ));
    }

    fn image(name: &str, manifest: u8, holder: u64) -> Image {
        Image {
            name: name.into(),
            manifest: BlobHash([manifest; 32]),
            root: "/nix/store/aaaa-web".into(),
            store_dir: "/nix/store".into(),
            nar_count: 2,
            nar_size: 1024,
            holders: [NodeId(holder)].into(),
            pinned: false,
            tenant: None,
            created_at_ms: 5,
        }
    }

    #[test]
    fn images_register_gain_holders_pin_and_go() {
        let mut s = bootstrapped();
        let t = token(&mut s, 9, 10_000);
        join(&mut s, t, 2, 2_000).unwrap();
        s.apply(&Command::AddImage(image("web", 1, 1))).unwrap();
        // The same closure again from another node adds a holder; another closure under the
        // same name is refused.
        s.apply(&Command::AddImage(image("web", 1, 2))).unwrap();
        assert_eq!(
            s.image("web").unwrap().holders,
            [NodeId(1), NodeId(2)].into()
        );
        assert_eq!(
            s.apply(&Command::AddImage(image("web", 2, 1))),
            Err(ApplyError::ImageExists("web".into()))
        );
        assert_eq!(
            s.apply(&Command::SetImageHolder {
                name: "web".into(),
                manifest: BlobHash([2; 32]),
                node: NodeId(2),
                held: false
            }),
            Err(ApplyError::ImageChanged("web".into()))
        );
        s.apply(&Command::SetImageHolder {
            name: "web".into(),
            manifest: BlobHash([1; 32]),
            node: NodeId(2),
            held: false,
        })
        .unwrap();
        assert_eq!(s.image("web").unwrap().holders, [NodeId(1)].into());
        // Holders must be members.
        assert_eq!(
            s.apply(&Command::AddImage(image("other", 3, 7))),
            Err(ApplyError::UnknownMember(NodeId(7)))
        );
        // Bad shapes.
        let mut bad = image("Bad Name", 4, 1);
        assert!(matches!(
            s.apply(&Command::AddImage(bad.clone())),
            Err(ApplyError::InvalidImage(_))
        ));
        bad = image("ok", 4, 1);
        bad.root = "/elsewhere/x".into();
        assert!(matches!(
            s.apply(&Command::AddImage(bad.clone())),
            Err(ApplyError::InvalidImage(_))
        ));
        bad = image("ok", 4, 1);
        bad.nar_count = 0;
        assert!(matches!(
            s.apply(&Command::AddImage(bad)),
            Err(ApplyError::InvalidImage(_))
        ));
        // Pinned images stay.
        s.apply(&Command::PinImage {
            name: "web".into(),
            pinned: true,
        })
        .unwrap();
        assert_eq!(
            s.apply(&Command::RemoveImage { name: "web".into() }),
            Err(ApplyError::ImagePinned("web".into()))
        );
        s.apply(&Command::PinImage {
            name: "web".into(),
            pinned: false,
        })
        .unwrap();
        s.apply(&Command::RemoveImage { name: "web".into() })
            .unwrap();
        assert!(s.image("web").is_none());
        assert_eq!(
            s.apply(&Command::RemoveImage { name: "web".into() }),
            Err(ApplyError::UnknownImage("web".into()))
        );
    }

    #[test]
    fn removed_members_stop_holding_images_and_the_cache_key_is_set_once() {
        let mut s = bootstrapped();
        let t = token(&mut s, 9, 10_000);
        join(&mut s, t, 2, 2_000).unwrap();
        s.apply(&Command::AddImage(image("web", 1, 2))).unwrap();
        s.apply(&Command::RemoveMember {
            node: NodeId(2),
            now_ms: 3_000,
        })
        .unwrap();
        assert!(s.image("web").unwrap().holders.is_empty());
        s.apply(&Command::SetCacheKey {
            secret: "first".into(),
        })
        .unwrap();
        s.apply(&Command::SetCacheKey {
            secret: "second".into(),
        })
        .unwrap();
        assert_eq!(s.cache_key().map(String::as_str), Some("first"));
        let copy = State::from_rows(s.all_rows().iter().map(|r| {
            (
                r.table.as_str(),
                r.key.as_slice(),
                r.value.as_deref().unwrap_or_default(),
            )
        }))
        .unwrap();
        assert_eq!(copy.digest(), s.digest());
    }

    #[test]
    fn a_user_key_is_rotated_in_place_and_must_be_unused() {
        let mut s = bootstrapped();
        let user = |name: &str, key: u8| User {
            name: name.into(),
            key: EndpointKey([key; 32]),
            roles: vec!["viewer".into()],
            tenant: Some("acme".into()),
            created_at_ms: 1,
        };
        s.apply(&Command::AddUser(user("alice", 40))).unwrap();
        s.apply(&Command::AddUser(user("bob", 41))).unwrap();
        s.apply(&Command::SetUserKey {
            name: "alice".into(),
            key: EndpointKey([42; 32]),
        })
        .unwrap();
        let alice = s.user("alice").unwrap();
        assert_eq!(alice.key, EndpointKey([42; 32]));
        assert_eq!(alice.tenant.as_deref(), Some("acme"));
        assert!(
            s.user_by_key(&EndpointKey([40; 32])).is_none(),
            "the old key is gone"
        );
        assert!(matches!(
            s.apply(&Command::SetUserKey {
                name: "alice".into(),
                key: EndpointKey([41; 32]),
            }),
            Err(ApplyError::KeyInUse(..))
        ));
        assert!(matches!(
            s.apply(&Command::SetUserKey {
                name: "carol".into(),
                key: EndpointKey([43; 32]),
            }),
            Err(ApplyError::UnknownUser(_))
        ));
    }

    #[test]
    fn an_admin_credential_is_rotated_in_place() {
        let mut s = bootstrapped();
        let old = EndpointKey([100; 32]);
        assert!(s.admin(&old).is_some());
        s.apply(&Command::SetAdminKey {
            node: NodeId(1),
            key: EndpointKey([101; 32]),
            now_ms: 5,
        })
        .unwrap();
        assert!(s.admin(&old).is_none(), "the old credential is gone");
        assert_eq!(s.admin(&EndpointKey([101; 32])).unwrap().node, NodeId(1));
        // A key someone holds (here: node 1's own endpoint key) is refused.
        assert!(matches!(
            s.apply(&Command::SetAdminKey {
                node: NodeId(1),
                key: EndpointKey([1; 32]),
                now_ms: 6,
            }),
            Err(ApplyError::KeyInUse(..))
        ));
        assert!(matches!(
            s.apply(&Command::SetAdminKey {
                node: NodeId(9),
                key: EndpointKey([102; 32]),
                now_ms: 6,
            }),
            Err(ApplyError::UnknownMember(_))
        ));
    }
}
