//! Why a command was refused.

use serde::{Deserialize, Serialize};

use crate::ids::{EndpointKey, NodeId};

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
    #[error("node {node} has not caught up with the leader (it holds the log to index {matched} of {commit}); promote it once it has")]
    NotCaughtUp {
        node: NodeId,
        matched: u64,
        commit: u64,
    },
    #[error("node {0} is the only voter; promote another member before demoting it")]
    OnlyVoter(NodeId),
    #[error("node {0} is already a {role}", role = .1.as_str())]
    SameRole(NodeId, crate::member::MemberRole),
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
    #[error("{0} cannot be applied once per request id")]
    NotOnce(String),
    #[error("tenant {0} still has {1}; remove them first")]
    TenantInUse(String, String),
    // Appended: stored results (`state::requests`) name variants by position.
    #[error("{kind} needs cluster version {needs}, and the cluster runs at version {cluster} until every member runs a blixard of log version {needs} or newer (`blixard cluster status` shows each member's)")]
    NeedsVersion {
        kind: String,
        needs: u32,
        cluster: u32,
    },
}

impl ApplyError {
    /// Whether the command names something that does not exist (a user, a member, an
    /// image, a tenant, a VM): the caller hears "not found", not "refused". A join with an
    /// unknown token is refused: the token is a credential, not what the join names.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            ApplyError::UnknownMember(_)
                | ApplyError::UnknownUser(_)
                | ApplyError::UnknownImage(_)
                | ApplyError::UnknownTenant(_)
                | ApplyError::UnknownVm(_)
        )
    }
}
