//! Cluster members as state knows them, and the credentials that admit nodes and admins.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::ids::{ClusterId, EndpointKey, NodeId};

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

/// A member's place in the raft configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberRole {
    /// Receives the log but does not vote; a new member starts here.
    Learner,
    Voter,
}

impl MemberRole {
    /// `voter` or `learner`, as the CLI shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberRole::Learner => "learner",
            MemberRole::Voter => "voter",
        }
    }
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

/// A one-time join token, known only by the hash of its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub used_by: Option<NodeId>,
}
