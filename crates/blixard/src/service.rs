//! The node's API service and peer book: what a node does with authorized requests, and
//! how the transport finds and admits peers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use blixard_core::{
    ClusterId, Command, CommandOutput, EndpointKey, JoinRequest, NewMember, NodeId, State,
};
use blixard_net::api::{
    ApiError, ClusterStatus, JoinCluster, Joined, Left, MetaEntries, MetaSetDone, Request,
    RequestFrame, Response, ResponseFrame, TokenCreated,
};
use blixard_net::authz::Principal;
use blixard_net::client::ApiClient;
use blixard_net::raft_transport::{PeerBook, Refusal};
use blixard_net::server::Service;
use blixard_net::ticket::{hash_secret, JoinTicket};
use blixard_net::{member_addr, EndpointAddr};
use blixard_raft::{ProposeError, RaftNode};
use tokio::sync::watch;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Members known before this node has the cluster state (from the join answer).
pub type Seeds = Vec<(NodeId, EndpointKey, Vec<SocketAddr>)>;

/// Finds peers in the cluster state (or the seeds) and decides who may speak raft.
pub struct Book {
    pub state: Arc<std::sync::RwLock<State>>,
    pub seeds: Seeds,
    pub me: NodeId,
    pub removed: Mutex<Option<watch::Sender<bool>>>,
}

impl Book {
    fn with_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        match self.state.read() {
            Ok(s) => f(&s),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }
}

impl PeerBook for Book {
    fn addr_of(&self, node: NodeId) -> Option<EndpointAddr> {
        let from_state = self.with_state(|s| {
            s.member(node)
                .and_then(|m| member_addr(&m.endpoint, &m.addrs))
        });
        from_state.or_else(|| {
            self.seeds
                .iter()
                .find(|(id, _, _)| *id == node)
                .and_then(|(_, key, addrs)| member_addr(key, addrs))
        })
    }

    fn admit(&self, key: &EndpointKey, from: NodeId) -> Result<(), Refusal> {
        self.with_state(|s| {
            if s.is_removed(from) {
                return Err(Refusal::Removed(from));
            }
            match s.member(from) {
                Some(m) if &m.endpoint == key => Ok(()),
                Some(_) => Err(Refusal::NotMember(from)),
                // Before this node has the state, trust the members it joined through.
                None if s.cluster().is_none()
                    && self.seeds.iter().any(|(id, k, _)| *id == from && k == key) =>
                {
                    Ok(())
                }
                None => Err(Refusal::NotMember(from)),
            }
        })
    }

    fn refused(&self, refusal: Refusal) {
        if refusal == Refusal::Removed(self.me) {
            if let Ok(guard) = self.removed.lock() {
                if let Some(tx) = guard.as_ref() {
                    tx.send_replace(true);
                }
            }
        }
    }
}

/// The API service of one node.
pub struct NodeService {
    pub node: RaftNode,
    pub cluster_id: ClusterId,
    pub client: ApiClient,
}

fn propose_error(e: ProposeError) -> ApiError {
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

impl NodeService {
    async fn barrier(&self, stale: bool) -> Result<(), ApiError> {
        if stale {
            Ok(())
        } else {
            self.node.read_barrier().await.map_err(propose_error)
        }
    }

    async fn propose(&self, command: Command) -> Result<CommandOutput, ApiError> {
        self.node.propose(command).await.map_err(propose_error)
    }

    fn members(&self) -> Vec<(NodeId, EndpointKey, Vec<SocketAddr>)> {
        self.node
            .state()
            .members()
            .map(|m| (m.id, m.endpoint, m.addrs.clone()))
            .collect()
    }

    /// Runs a membership change here if this node leads, else forwards it to the leader.
    async fn on_leader(
        &self,
        frame: &RequestFrame,
        result: Result<CommandOutput, ProposeError>,
    ) -> Result<Result<CommandOutput, ApiError>, ResponseFrame> {
        match result {
            Err(ProposeError::NotLeader {
                leader: Some(leader),
            }) if !frame.forwarded => {
                let addr = {
                    let state = self.node.state();
                    state
                        .member(NodeId(leader))
                        .and_then(|m| member_addr(&m.endpoint, &m.addrs))
                };
                let Some(addr) = addr else {
                    return Ok(Err(ApiError::NoLeader));
                };
                Err(
                    match self.client.forward(&addr, frame.request.clone()).await {
                        Ok(r) => r,
                        Err(e) => Err(ApiError::Unavailable(format!(
                            "forwarding to leader {leader}: {e}"
                        ))),
                    },
                )
            }
            other => Ok(other.map_err(propose_error)),
        }
    }

    async fn join_as(
        &self,
        frame: &RequestFrame,
        caller: EndpointKey,
        j: &JoinCluster,
    ) -> ResponseFrame {
        if j.name.is_empty() || j.name.len() > 64 {
            return Err(ApiError::BadRequest(
                "node names are 1 to 64 characters".into(),
            ));
        }
        if j.admin == caller {
            return Err(ApiError::BadRequest(
                "the admin credential must differ from the node key".into(),
            ));
        }
        let request = JoinRequest {
            node: NodeId(0),
            token_hash: hash_secret(&j.secret),
            now_ms: now_ms(),
            member: NewMember {
                name: j.name.clone(),
                endpoint: caller,
                addrs: j.addrs.clone(),
                labels: j.labels.clone(),
                capacity: j.capacity,
            },
            admin: j.admin,
        };
        let result = self.node.join(request).await;
        match self.on_leader(frame, result).await {
            Err(forwarded) => forwarded,
            Ok(Ok(CommandOutput::Joined { node })) => Ok(Response::Join(Joined {
                node,
                cluster_id: self.cluster_id,
                members: self.members(),
            })),
            Ok(Ok(other)) => Err(ApiError::Internal(format!(
                "unexpected join result {other:?}"
            ))),
            Ok(Err(e)) => Err(e),
        }
    }
}

impl Service for NodeService {
    fn cluster_id(&self) -> Option<ClusterId> {
        Some(self.cluster_id)
    }

    fn principal(&self, caller: &EndpointKey) -> Principal {
        let state = self.node.state();
        if let Some(m) = state.member_by_endpoint(caller) {
            Principal::Node(m.id, *caller)
        } else if state.admin(caller).is_some() {
            Principal::Admin(*caller)
        } else {
            Principal::Anonymous(*caller)
        }
    }

    async fn handle(&self, principal: Principal, frame: RequestFrame) -> ResponseFrame {
        match &frame.request {
            Request::Status(r) => {
                self.barrier(r.stale).await?;
                let raft = self.node.status().await.map_err(propose_error)?;
                let state = self.node.state();
                let meta = state.cluster().cloned().ok_or_else(|| {
                    ApiError::Unavailable("this node has not received the cluster state yet".into())
                })?;
                Ok(Response::Status(ClusterStatus {
                    cluster_id: meta.cluster_id,
                    name: meta.name,
                    node: self.node.id(),
                    raft,
                    members: state.members().cloned().collect(),
                    stale: r.stale,
                }))
            }
            Request::TokenCreate(t) => {
                if t.ttl_secs == 0 || t.ttl_secs > 7 * 24 * 3600 {
                    return Err(ApiError::BadRequest(
                        "token lifetimes are 1 second to 7 days".into(),
                    ));
                }
                let secret: [u8; 32] = rand::random();
                let now = now_ms();
                let expires_at_ms = now + t.ttl_secs * 1000;
                self.propose(Command::CreateJoinToken {
                    token_hash: hash_secret(&secret),
                    now_ms: now,
                    expires_at_ms,
                })
                .await?;
                let ticket = JoinTicket {
                    cluster_id: self.cluster_id,
                    members: self.members().into_iter().map(|(_, k, a)| (k, a)).collect(),
                    secret,
                };
                Ok(Response::TokenCreate(TokenCreated {
                    ticket: ticket.to_string(),
                    expires_at_ms,
                }))
            }
            Request::Join(j) => {
                // The first node checks that the joiner speaks for its own key; a forwarded
                // join comes from that (member) node.
                if !frame.forwarded && j.endpoint != *principal.key() {
                    return Err(ApiError::BadRequest(
                        "a node can only join with its own key".into(),
                    ));
                }
                self.join_as(&frame, j.endpoint, j).await
            }
            Request::Leave(l) => {
                {
                    let state = self.node.state();
                    if state.is_removed(l.node) {
                        return Err(ApiError::Rejected(format!(
                            "node {} was already removed",
                            l.node
                        )));
                    }
                    if state.member(l.node).is_none() {
                        return Err(ApiError::Rejected(format!(
                            "node {} is not a member",
                            l.node
                        )));
                    }
                }
                let result = self.node.remove(l.node, now_ms()).await;
                match self.on_leader(&frame, result).await {
                    Err(forwarded) => forwarded,
                    Ok(r) => r.map(|_| Response::Leave(Left { node: l.node })),
                }
            }
            Request::MetaSet(m) => {
                self.propose(Command::SetMeta {
                    key: m.key.clone(),
                    value: m.value.clone(),
                })
                .await?;
                Ok(Response::MetaSet(MetaSetDone {}))
            }
            Request::MetaGet(m) => {
                self.barrier(m.stale).await?;
                let state = self.node.state();
                let entries = match &m.key {
                    Some(k) => match state.meta_get(k) {
                        Some(v) => vec![(k.clone(), v.clone())],
                        None => return Err(ApiError::Rejected(format!("no metadata key {k:?}"))),
                    },
                    None => state
                        .meta_entries()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                };
                Ok(Response::MetaGet(MetaEntries { entries }))
            }
        }
    }
}
