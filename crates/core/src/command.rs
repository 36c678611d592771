//! The closed set of state changes: every write to cluster state is one [`Command`].

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::ids::{BlobHash, ClusterId, EndpointKey, NodeId, RequestId};
use crate::image::Image;
use crate::member::{Capacity, MemberRole};
use crate::scheduler::Placement;
use crate::user::User;
use crate::vm::{Desired, Phase, Quota, VmSpec};

/// The log version this build applies: the newest [`Command::since`] it knows.
///
/// | version | added |
/// |---|---|
/// | 1 | every command up to `CheckState` (releases before the cluster version existed) |
/// | 2 | `RemoveTenant`, `RevokeJoinToken`, `SetClusterVersion` |
/// | 3 | `CreateLearnerToken`, `ChangeRole`; from cluster version 3 on, an anti-affinity group `GROUP@LABEL` spreads over the node label `LABEL` (before, it is a plain group name, as older releases read it) |
///
/// A command is proposed only once the cluster version (the lowest log version among its
/// members, raised by the leader) reaches its `since`: a member that cannot decode it never
/// meets it. New commands are appended with the next version.
pub const LOG_VERSION: u32 = 3;

/// A command as it travels through the raft log: who proposed it, so that the proposing
/// node can hand the result of `apply` back to its caller.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The node whose caller waits for the result; `None` for internal commands.
    pub proposer: Option<NodeId>,
    /// Unique per proposer (and per proposer restart, since it starts from a random value).
    pub request_id: u64,
    pub command: Command,
}

/// What a new member brings: its identity, where it listens, and what it offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewMember {
    pub name: String,
    pub endpoint: EndpointKey,
    pub addrs: Vec<SocketAddr>,
    pub labels: BTreeMap<String, String>,
    pub capacity: Capacity,
}

/// A join request, after the API layer has hashed the secret from the ticket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The id the new member will get: the leader proposes it from `next_node_id`, and
    /// `apply` refuses the join if that is no longer the next id.
    pub node: NodeId,
    pub token_hash: [u8; 32],
    pub now_ms: u64,
    pub member: NewMember,
    /// The admin credential the joining node writes into its own data dir.
    pub admin: EndpointKey,
}

/// Every operation that changes cluster state. Versioned through the envelope's encoding;
/// new operations are appended as new variants, existing variants never change shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Does nothing; proposed by a new leader and by tests.
    Noop,
    /// Records the cluster's identity and first member. Legal once, on an empty state; it is
    /// applied by `--init` to build the cluster's first snapshot, never proposed.
    Bootstrap {
        cluster_id: ClusterId,
        name: String,
        member: NewMember,
        admin: EndpointKey,
        now_ms: u64,
    },
    /// Sets (or with `None` clears) a cluster metadata key.
    SetMeta { key: String, value: Option<String> },
    /// Registers a one-time join token by the hash of its secret.
    CreateJoinToken {
        token_hash: [u8; 32],
        now_ms: u64,
        expires_at_ms: u64,
    },
    /// Spends a join token and registers the new member; allocates its node id. Followed
    /// by a configuration change that adds the node as a learner.
    Join(JoinRequest),
    /// The context of a configuration change that adds or promotes a node.
    SetRole { node: NodeId, role: MemberRole },
    /// The context of a configuration change that removes a node. Its id is never reused
    /// and its endpoint may not rejoin with its old data.
    RemoveMember { node: NodeId, now_ms: u64 },
    /// A member reports the addresses it now listens on (after a restart).
    UpdateAddrs {
        node: NodeId,
        addrs: Vec<SocketAddr>,
    },
    /// Adds a user. Names and keys are unique across users, members and admin credentials.
    AddUser(User),
    /// Removes a user by name.
    RemoveUser { name: String },
    /// Replaces the cluster's authorization policies. The text was validated against the
    /// schema before it was proposed; `apply` only stores it.
    SetPolicies { text: String },
    /// Registers an image imported on `image.holders` (one node). Re-registering the same
    /// name with the same manifest adds the holder; a different manifest is refused.
    AddImage(Image),
    /// A node reports that it now holds (`held`) or no longer holds an image completely.
    /// Refused when the name is now bound to another manifest.
    SetImageHolder {
        name: String,
        manifest: BlobHash,
        node: NodeId,
        held: bool,
    },
    /// Pins or unpins an image.
    PinImage { name: String, pinned: bool },
    /// Removes an image from the cluster; refused while it is pinned.
    RemoveImage { name: String },
    /// Sets the cluster's binary-cache signing key (Nix's `name:base64` secret form). Legal
    /// once: when a key is already set this changes nothing, so racing first imports agree.
    SetCacheKey { secret: String },
    /// Creates a tenant (with no quota limits).
    CreateTenant { name: String, now_ms: u64 },
    /// Replaces a tenant's quota. Existing VMs stay even if they now exceed it.
    SetQuota { tenant: String, quota: Quota },
    /// Creates a VM (desired running when `start`, else stopped). Refused when the
    /// tenant's quota would be exceeded: checked here, in log order, so concurrent
    /// creates cannot overshoot. With a `placement` (the leader's scheduler decided at
    /// once) the VM is placed there if it still fits, saving a round; else it is pending.
    CreateVm {
        spec: VmSpec,
        start: bool,
        now_ms: u64,
        placement: Option<Placement>,
    },
    /// The scheduler's decision for a pending VM: a host, or why there is none. Legal only
    /// for the generation it was made for; the host must still fit the VM.
    PlaceVm {
        key: String,
        generation: u64,
        node: Option<NodeId>,
        reason: Option<String>,
        cpu_overcommit_pct: u32,
        memory_overcommit_pct: u32,
        now_ms: u64,
    },
    /// Deletes a VM.
    DeleteVm { key: String },
    /// Marks a host as drained (takes no new VMs, and its VMs move elsewhere) or not.
    SetDrained {
        node: NodeId,
        drained: bool,
        now_ms: u64,
    },
    /// Replaces a user's key (rotation); name, roles and tenant stay. The new key must be
    /// unused, like a new user's.
    SetUserKey { name: String, key: EndpointKey },
    /// Replaces a node's admin credential (rotation): the node's old credentials go, the
    /// new key (unused by anyone) takes their place.
    SetAdminKey {
        node: NodeId,
        key: EndpointKey,
        now_ms: u64,
    },
    /// The leader marks a host down (no contact for the down timeout) or up again. Its
    /// VMs with a restart policy are taken off it, to be placed elsewhere; the others
    /// are marked failed and wait for it.
    SetNodeDown {
        node: NodeId,
        down: bool,
        now_ms: u64,
    },
    /// `vm start` / `vm stop` / `vm restart`: the desired state, and for a restart one
    /// more restart request.
    SetVmDesired {
        key: String,
        desired: Desired,
        restart: bool,
        now_ms: u64,
    },
    /// A host reports what its VM is doing. Legal only from the VM's host, for its
    /// current placement.
    ReportVm {
        key: String,
        node: NodeId,
        generation: u64,
        phase: Phase,
        reason: Option<String>,
        now_ms: u64,
    },
    /// `command`, applied at most once under `id`: a second `Once` with an id applied
    /// before (within the dedup window, see `state::requests`) returns the first one's
    /// result and changes nothing. What a client's retry of a write, or a node's
    /// re-proposal after a leader change, is wrapped in.
    Once {
        id: RequestId,
        now_ms: u64,
        command: Box<Command>,
    },
    /// The leader's periodic state check (as etcd's corruption check): every member
    /// records a digest of its state as it applies this entry, and compares `previous`
    /// (the proposer's record of an earlier check entry) with its own record of that
    /// entry. Changes nothing.
    CheckState { previous: Option<StateDigest> },
    /// Removes a tenant; refused while it owns VMs or images or has users (and for the
    /// default tenant).
    RemoveTenant { name: String },
    /// Revokes an unused join token: a join with it is refused from now on.
    RevokeJoinToken { token_hash: [u8; 32] },
    /// Raises the cluster version: the leader proposes it once every member runs a
    /// blixard that applies this log version. Never lowers it.
    SetClusterVersion { version: u32 },
    /// Registers a one-time join token whose node joins as a learner and stays one (it
    /// is not promoted once it catches up) until `cluster promote`.
    CreateLearnerToken {
        token_hash: [u8; 32],
        now_ms: u64,
        expires_at_ms: u64,
    },
    /// `cluster promote` / `cluster demote`: the context of a joint configuration change
    /// that makes `node` a voter (no longer kept a learner) or a learner that stays one.
    ChangeRole { node: NodeId, role: MemberRole },
}

/// What a command changed, as `blixard events` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    pub topic: Topic,
    /// The thing changed: a VM's `tenant/name`, a member's `nN`, an image's name, …
    pub name: String,
    /// What happened to it, in a few words.
    pub what: String,
}

/// The kinds of things events are about (`blixard events --kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Topic {
    Vm,
    Member,
    Image,
    Tenant,
    User,
    Cluster,
}

impl Topic {
    pub const ALL: [Topic; 6] = [
        Topic::Vm,
        Topic::Member,
        Topic::Image,
        Topic::Tenant,
        Topic::User,
        Topic::Cluster,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Topic::Vm => "vm",
            Topic::Member => "member",
            Topic::Image => "image",
            Topic::Tenant => "tenant",
            Topic::User => "user",
            Topic::Cluster => "cluster",
        }
    }
}

impl std::str::FromStr for Topic {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Topic::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                format!("unknown event kind {s:?} (vm, member, image, tenant, user, cluster)")
            })
    }
}

/// A digest of the state machine as a member applied the check entry at `index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDigest {
    pub index: u64,
    pub digest: u64,
}

impl Command {
    /// A short name for logs and the audit trail.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Noop => "noop",
            Command::Bootstrap { .. } => "bootstrap",
            Command::SetMeta { .. } => "set_meta",
            Command::CreateJoinToken { .. } => "create_join_token",
            Command::Join(_) => "join",
            Command::SetRole { .. } => "set_role",
            Command::RemoveMember { .. } => "remove_member",
            Command::UpdateAddrs { .. } => "update_addrs",
            Command::AddUser(_) => "add_user",
            Command::RemoveUser { .. } => "remove_user",
            Command::SetPolicies { .. } => "set_policies",
            Command::AddImage(_) => "add_image",
            Command::SetImageHolder { .. } => "set_image_holder",
            Command::PinImage { .. } => "pin_image",
            Command::RemoveImage { .. } => "remove_image",
            Command::SetCacheKey { .. } => "set_cache_key",
            Command::CreateTenant { .. } => "create_tenant",
            Command::SetQuota { .. } => "set_quota",
            Command::CreateVm { .. } => "create_vm",
            Command::PlaceVm { .. } => "place_vm",
            Command::DeleteVm { .. } => "delete_vm",
            Command::SetDrained { .. } => "set_drained",
            Command::SetUserKey { .. } => "set_user_key",
            Command::SetAdminKey { .. } => "set_admin_key",
            Command::SetNodeDown { .. } => "set_node_down",
            Command::SetVmDesired { .. } => "set_vm_desired",
            Command::ReportVm { .. } => "report_vm",
            Command::Once { command, .. } => command.kind(),
            Command::CheckState { .. } => "check_state",
            Command::RemoveTenant { .. } => "remove_tenant",
            Command::RevokeJoinToken { .. } => "revoke_join_token",
            Command::SetClusterVersion { .. } => "set_cluster_version",
            Command::CreateLearnerToken { .. } => "create_learner_token",
            Command::ChangeRole { .. } => "change_role",
        }
    }

    /// The log version that introduced this command: a blixard that applies an older
    /// log version cannot decode it. See [`LOG_VERSION`].
    pub fn since(&self) -> u32 {
        match self {
            Command::Once { command, .. } => command.since(),
            Command::RemoveTenant { .. }
            | Command::RevokeJoinToken { .. }
            | Command::SetClusterVersion { .. } => 2,
            Command::CreateLearnerToken { .. } | Command::ChangeRole { .. } => 3,
            _ => 1,
        }
    }

    /// What the command changes, for the event stream (`blixard events`): `None` for
    /// commands that change nothing an operator watches (a no-op, a state check).
    pub fn subject(&self) -> Option<Subject> {
        let s = |topic: Topic, name: String, what: String| Some(Subject { topic, name, what });
        let on_off = |b: bool, yes: &str, no: &str| if b { yes } else { no }.to_string();
        match self {
            Command::Noop | Command::CheckState { .. } => None,
            Command::Once { command, .. } => command.subject(),
            Command::Bootstrap { name, .. } => s(Topic::Cluster, name.clone(), "created".into()),
            Command::SetMeta { key, value } => s(
                Topic::Cluster,
                format!("meta/{key}"),
                match value {
                    Some(_) => "set".into(),
                    None => "deleted".into(),
                },
            ),
            Command::CreateJoinToken { .. } => {
                s(Topic::Cluster, "join-token".into(), "created".into())
            }
            Command::CreateLearnerToken { .. } => s(
                Topic::Cluster,
                "join-token".into(),
                "created (learner)".into(),
            ),
            Command::RevokeJoinToken { .. } => {
                s(Topic::Cluster, "join-token".into(), "revoked".into())
            }
            Command::SetPolicies { .. } => s(Topic::Cluster, "policies".into(), "replaced".into()),
            Command::SetCacheKey { .. } => s(Topic::Cluster, "cache-key".into(), "set".into()),
            Command::SetClusterVersion { version } => s(
                Topic::Cluster,
                "version".into(),
                format!("raised to {version}"),
            ),
            Command::Join(r) => s(
                Topic::Member,
                r.member.name.clone(),
                format!("joined as n{}", r.node),
            ),
            Command::SetRole { node, role } | Command::ChangeRole { node, role } => s(
                Topic::Member,
                format!("n{node}"),
                format!("now a {role:?}").to_lowercase(),
            ),
            Command::RemoveMember { node, .. } => {
                s(Topic::Member, format!("n{node}"), "removed".into())
            }
            Command::UpdateAddrs { node, .. } => s(
                Topic::Member,
                format!("n{node}"),
                "addresses changed".into(),
            ),
            Command::SetAdminKey { node, .. } => s(
                Topic::Member,
                format!("n{node}"),
                "admin key rotated".into(),
            ),
            Command::SetDrained { node, drained, .. } => s(
                Topic::Member,
                format!("n{node}"),
                on_off(*drained, "drained", "undrained"),
            ),
            Command::SetNodeDown { node, down, .. } => s(
                Topic::Member,
                format!("n{node}"),
                on_off(*down, "down", "up"),
            ),
            Command::AddUser(u) => s(Topic::User, u.name.clone(), "added".into()),
            Command::RemoveUser { name } => s(Topic::User, name.clone(), "removed".into()),
            Command::SetUserKey { name, .. } => s(Topic::User, name.clone(), "key rotated".into()),
            Command::AddImage(i) => s(Topic::Image, i.name.clone(), "imported".into()),
            Command::SetImageHolder {
                name, node, held, ..
            } => s(
                Topic::Image,
                name.clone(),
                format!("{} n{node}", on_off(*held, "held by", "dropped by")),
            ),
            Command::PinImage { name, pinned } => s(
                Topic::Image,
                name.clone(),
                on_off(*pinned, "pinned", "unpinned"),
            ),
            Command::RemoveImage { name } => s(Topic::Image, name.clone(), "removed".into()),
            Command::CreateTenant { name, .. } => s(Topic::Tenant, name.clone(), "created".into()),
            Command::SetQuota { tenant, .. } => {
                s(Topic::Tenant, tenant.clone(), "quota set".into())
            }
            Command::RemoveTenant { name } => s(Topic::Tenant, name.clone(), "removed".into()),
            Command::CreateVm { spec, start, .. } => s(
                Topic::Vm,
                format!("{}/{}", spec.tenant, spec.name),
                on_off(*start, "created", "created stopped"),
            ),
            Command::PlaceVm {
                key, node, reason, ..
            } => s(
                Topic::Vm,
                key.clone(),
                match (node, reason) {
                    (Some(n), _) => format!("placed on n{n}"),
                    (None, Some(r)) => r.clone(),
                    (None, None) => "unplaced".into(),
                },
            ),
            Command::DeleteVm { key } => s(Topic::Vm, key.clone(), "deleted".into()),
            Command::SetVmDesired {
                key,
                desired,
                restart,
                ..
            } => s(
                Topic::Vm,
                key.clone(),
                if *restart {
                    "restart requested".into()
                } else {
                    format!("desired {desired:?}").to_lowercase()
                },
            ),
            Command::ReportVm {
                key,
                node,
                phase,
                reason,
                ..
            } => s(
                Topic::Vm,
                key.clone(),
                match reason {
                    Some(r) => format!("{phase} on n{node}: {r}"),
                    None => format!("{phase} on n{node}"),
                },
            ),
        }
    }

    /// The client request id it is applied once under (`Command::Once`).
    pub fn request_id(&self) -> Option<RequestId> {
        match self {
            Command::Once { id, .. } => Some(*id),
            _ => None,
        }
    }
}

/// The successful result of applying a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutput {
    Done,
    /// A join was accepted: the node id allocated to the new member.
    Joined {
        node: NodeId,
    },
}
