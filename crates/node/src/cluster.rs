//! The cluster handle: this node's raft node and its API client, and the few things every
//! part of the node asks of the cluster: the state, the leader, a barrier, a proposal,
//! and a request handed to another member (the leader, or a VM's host). Written once here.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::Instrument as _;

use blixard_core::{ClusterId, Command, CommandOutput, EndpointKey, NodeId, RequestId, State};
use blixard_net::api::{ApiError, ProgressSink, Request, ResponseFrame};
use blixard_net::client::ApiClient;
use blixard_net::raft_transport::PeerVersions;
use blixard_net::{member_addr, EndpointAddr};
use blixard_raft::{ProposeError, RaftNode};

tokio::task_local! {
    /// The request id of the API request being handled (see [`with_request_id`]).
    static REQUEST: RequestScope;
}

/// A request's id and how many commands it has proposed so far.
struct RequestScope {
    id: RequestId,
    proposed: AtomicU32,
}

/// Runs `work` (the handling of one request) so that the commands it proposes are applied
/// once under `id` (the `n`th as `id.nth(n)`), and the requests it forwards carry `id`.
/// Without an id, `work` runs as it is.
pub async fn with_request_id<F: std::future::Future>(id: Option<RequestId>, work: F) -> F::Output {
    match id {
        Some(id) => {
            let scope = RequestScope {
                id,
                proposed: AtomicU32::new(0),
            };
            REQUEST.scope(scope, work).await
        }
        None => work.await,
    }
}

/// The id of the request being handled, if it has one.
fn request_id() -> Option<RequestId> {
    REQUEST.try_with(|r| r.id).ok()
}

/// `command` as the request being handled proposes it: under the next of its ids.
fn once(command: Command) -> Command {
    match REQUEST.try_with(|r| r.id.nth(r.proposed.fetch_add(1, Ordering::Relaxed))) {
        Ok(id) => Command::Once {
            id,
            now_ms: now_ms(),
            command: Box::new(command),
        },
        Err(_) => command,
    }
}

/// How long a linearizable read waits for a leader when none is known: two election
/// timeouts at the default timings (a restarted follower hears the leader within one
/// heartbeat; an election takes about one timeout).
pub const LEADER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

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
        ProposeError::Rejected(e) if e.is_not_found() => ApiError::NotFound(e.to_string()),
        ProposeError::Rejected(e) => ApiError::Rejected(e.to_string()),
        ProposeError::Dropped(e) => ApiError::Unavailable(e),
        e @ (ProposeError::TimedOut | ProposeError::LeaderChanged) => {
            ApiError::OutcomeUnknown(e.to_string())
        }
        ProposeError::Stopped => ApiError::Unavailable("the node is shutting down".into()),
    }
}

/// This node's view of the cluster, and its way to act on it.
pub struct ClusterHandle {
    pub node: RaftNode,
    pub cluster_id: ClusterId,
    pub client: ApiClient,
    /// What each peer runs, from its raft hello (for the cluster version).
    pub versions: PeerVersions,
    /// The log version this node applies (`version::log_version`).
    pub log_version: u32,
    /// How long a proposal waits to be applied before its caller hears that there is no
    /// leader (it was never handed to one) or that its outcome is unknown: a little less
    /// than the request timeout, so that the answer says which.
    pub write_timeout: std::time::Duration,
    /// The changes this node applied, for `blixard events`.
    pub events: std::sync::Arc<crate::events::Events>,
}

impl ClusterHandle {
    pub fn new(
        node: RaftNode,
        cluster_id: ClusterId,
        client: ApiClient,
        versions: PeerVersions,
        log_version: u32,
        request_timeout: std::time::Duration,
    ) -> Self {
        let margin = (request_timeout / 10).min(std::time::Duration::from_millis(500));
        Self {
            node,
            cluster_id,
            client,
            versions,
            log_version,
            write_timeout: request_timeout.saturating_sub(margin),
            events: Default::default(),
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
    ///
    /// A node that knows no leader yet (it has just started, or an election is on) waits
    /// up to [`LEADER_WAIT`] (within the write timeout) for one first: a script that
    /// starts a node and reads from it gets an answer, not "no leader".
    pub async fn barrier(&self, stale: bool) -> Result<(), ApiError> {
        if stale {
            return Ok(());
        }
        if self.leader().is_none() {
            let mut watch = self.node.leader_watch();
            let wait = LEADER_WAIT.min(self.write_timeout);
            let _ = tokio::time::timeout(wait, watch.wait_for(|l| *l != 0)).await;
        }
        self.node.read_barrier().await.map_err(propose_error)
    }

    /// Proposes `command`; returns `apply`'s result once it is committed and applied here.
    /// Inside a request with an id ([`with_request_id`]) it is applied once under that id,
    /// and proposed again if the leader changes before it is applied.
    pub async fn propose(&self, command: Command) -> Result<CommandOutput, ApiError> {
        // A command newer than the cluster version is never proposed: a member that
        // cannot decode it would stop at it (`apply` refuses it too, should a proposal
        // race a version change; the version only ever goes up).
        self.state()
            .admits_version(&command)
            .map_err(|refused| ApiError::Rejected(refused.to_string()))?;
        let span = tracing::info_span!(
            target: blixard_net::trace::TARGET,
            "propose",
            otel.name = %format_args!("raft propose {}", command.kind()),
        );
        self.node
            .propose_within(once(command), self.write_timeout)
            .instrument(span)
            .await
            .map_err(propose_error)
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
            .forward(&addr, request, request_id(), sink)
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
        let mut watch = self.node.leader_watch();
        // A leader that dies leaves its connection silent until it times out; once
        // another leader is known, the caller proposes from here instead (under the same
        // request id, so a write the old leader did apply is not applied again).
        let moved = async move {
            while watch.changed().await.is_ok() {
                let now = *watch.borrow();
                if now != 0 && now != leader.0 {
                    return;
                }
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            answer = self.forward(leader, request, sink) => Some(answer),
            () = moved => Some(Err(ForwardError::LeaderChanged(leader))),
        }
    }
}

/// Why a request could not be handed to another member.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("node {0} has no known address")]
    NoAddress(NodeId),
    #[error("node {0} stopped being the leader before it answered")]
    LeaderChanged(NodeId),
    #[error("asking node {0}: {1}")]
    Failed(NodeId, blixard_net::client::ClientError),
}
