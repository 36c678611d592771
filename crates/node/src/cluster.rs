//! The cluster handle: this node's raft node and its API client, and the few things every
//! part of the node asks of the cluster: the state, the leader, a barrier, a proposal,
//! and a request handed to another member (the leader, or a VM's host). Written once here.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use blixard_core::{ClusterId, Command, CommandOutput, EndpointKey, NodeId, State};
use blixard_net::api::{ApiError, ProgressSink, Request, ResponseFrame};
use blixard_net::client::ApiClient;
use blixard_net::{member_addr, EndpointAddr};
use blixard_raft::{ProposeError, RaftNode};

/// Milliseconds since the Unix epoch: what commands carry as their time (`apply` reads no
/// clock).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where member `node` can be reached, according to `state`.
pub fn member_addr_of(state: &State, node: NodeId) -> Option<EndpointAddr> {
    state
        .member(node)
        .and_then(|m| member_addr(&m.endpoint, &m.addrs))
}

/// A proposal's failure as the API reports it.
pub fn propose_error(e: ProposeError) -> ApiError {
    match e {
        ProposeError::NoLeader | ProposeError::NotLeader { leader: None } => ApiError::NoLeader,
        ProposeError::NotLeader { leader: Some(l) } => {
            ApiError::Unavailable(format!("leader {l} unreachable"))
        }
        ProposeError::Rejected(e) => ApiError::Rejected(e.to_string()),
        ProposeError::Dropped(e) => ApiError::Unavailable(e),
        ProposeError::Stopped => ApiError::Unavailable("the node is shutting down".into()),
    }
}

/// This node's view of the cluster, and its way to act on it.
pub struct ClusterHandle {
    pub node: RaftNode,
    pub cluster_id: ClusterId,
    pub client: ApiClient,
}

impl ClusterHandle {
    pub fn new(node: RaftNode, cluster_id: ClusterId, client: ApiClient) -> Self {
        Self {
            node,
            cluster_id,
            client,
        }
    }

    /// This node's id.
    pub fn me(&self) -> NodeId {
        self.node.id()
    }

    /// The state as this node has applied it (may lag the leader; see [`Self::barrier`]).
    pub fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.node.state()
    }

    /// The leader this node last heard of, as the raft thread publishes it (no round trip).
    pub fn leader(&self) -> Option<NodeId> {
        self.node.leader()
    }

    /// Waits until this node has applied everything committed when it asked (a ReadIndex
    /// round), unless `stale`.
    pub async fn barrier(&self, stale: bool) -> Result<(), ApiError> {
        if stale {
            Ok(())
        } else {
            self.node.read_barrier().await.map_err(propose_error)
        }
    }

    /// Proposes `command`; returns `apply`'s result once it is committed and applied here.
    pub async fn propose(&self, command: Command) -> Result<CommandOutput, ApiError> {
        self.node.propose(command).await.map_err(propose_error)
    }

    /// Every member: id, key, addresses.
    pub fn members(&self) -> Vec<(NodeId, EndpointKey, Vec<SocketAddr>)> {
        self.state()
            .members()
            .map(|m| (m.id, m.endpoint, m.addrs.clone()))
            .collect()
    }

    /// Hands `request` to member `node` (authorized there as `node:forward`) and returns
    /// its answer; progress it reports goes to `sink`. The error is the hand-over's own
    /// (no address, or the call failed), not the member's answer.
    pub async fn forward(
        &self,
        node: NodeId,
        request: Request,
        sink: &ProgressSink,
    ) -> Result<ResponseFrame, ForwardError> {
        let addr = member_addr_of(&self.state(), node).ok_or(ForwardError::NoAddress(node))?;
        self.client
            .forward(&addr, request, sink)
            .await
            .map_err(|e| ForwardError::Failed(node, e))
    }

    /// [`Self::forward`], its failure answered as unavailable.
    pub async fn forward_to(
        &self,
        node: NodeId,
        request: Request,
        sink: &ProgressSink,
    ) -> ResponseFrame {
        self.forward(node, request, sink)
            .await
            .unwrap_or_else(|e| Err(ApiError::Unavailable(e.to_string())))
    }

    /// Hands `request` to the leader when it is another node; `None` when this node leads
    /// or knows no leader, for the caller to handle it here.
    pub async fn forward_to_leader(
        &self,
        request: Request,
        sink: &ProgressSink,
    ) -> Option<Result<ResponseFrame, ForwardError>> {
        let leader = self.leader().filter(|l| *l != self.me())?;
        Some(self.forward(leader, request, sink).await)
    }
}

/// Why a request could not be handed to another member.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("node {0} has no known address")]
    NoAddress(NodeId),
    #[error("asking node {0}: {1}")]
    Failed(NodeId, blixard_net::client::ClientError),
}
