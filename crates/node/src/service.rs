//! The node's API service and peer book: what a node does with authorized requests, and
//! how the transport finds and admits peers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use blixard_authz::{Authorizer, RequestContext, Resource};
use blixard_core::{
    ClusterId, Command, CommandOutput, EndpointKey, JoinRequest, NewMember, NodeId, State, User,
};
use blixard_net::api::{
    ApiError, ClusterStatus, JoinCluster, Joined, Left, MetaEntries, MetaSetDone, PolicySetDone,
    PolicyText, PolicyVerdict, ProgressSink, Request, RequestFrame, Response, ResponseFrame,
    TokenCreated, UserAdded, UserEntries, UserRemoved,
};
use blixard_net::authz::{user_resource, Lookup, Principal};
use blixard_net::client::ApiClient;
use blixard_net::raft_transport::{PeerBook, Refusal};
use blixard_net::server::{AuditEvent, Service};
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

/// Where member `node` can be reached, according to `state`.
pub(crate) fn member_addr_of(state: &State, node: NodeId) -> Option<EndpointAddr> {
    state
        .member(node)
        .and_then(|m| member_addr(&m.endpoint, &m.addrs))
}

/// Members known before this node has the cluster state (from the join answer).
pub type Seeds = Vec<(NodeId, EndpointKey, Vec<SocketAddr>)>;

/// Finds peers in the cluster state (or the seeds) and decides who may speak raft.
pub struct Book {
    pub state: Arc<std::sync::RwLock<State>>,
    pub seeds: Seeds,
    /// Addresses the configuration declares for members' keys (`expected_members`), tried
    /// besides those in the cluster state: a host whose address changed is found there.
    pub declared: Vec<(EndpointKey, Vec<SocketAddr>)>,
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
        let known = self.with_state(|s| s.member(node).map(|m| (m.endpoint, m.addrs.clone())));
        let (key, mut addrs) = known.or_else(|| {
            self.seeds
                .iter()
                .find(|(id, _, _)| *id == node)
                .map(|(_, key, addrs)| (*key, addrs.clone()))
        })?;
        for (k, declared) in &self.declared {
            if *k == key {
                for a in declared {
                    if !addrs.contains(a) {
                        addrs.push(*a);
                    }
                }
            }
        }
        member_addr(&key, &addrs)
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
    pub audit: Arc<crate::audit::AuditLog>,
    /// The authorizer for the policy text it was built from (`None` = the defaults).
    pub policies: Mutex<(Option<String>, Arc<Authorizer>)>,
    pub images: crate::images::Images,
    pub vms: crate::vms::Vms,
    /// When set, only these keys (under these names) may join.
    pub expected: Option<Vec<crate::config::ExpectedMember>>,
}

impl NodeService {
    pub fn new(
        node: RaftNode,
        cluster_id: ClusterId,
        client: ApiClient,
        audit: Arc<crate::audit::AuditLog>,
        images: crate::images::Images,
        vms: crate::vms::Vms,
        expected: Option<Vec<crate::config::ExpectedMember>>,
    ) -> Result<Self, String> {
        let defaults = Authorizer::with_defaults().map_err(|e| e.to_string())?;
        Ok(Self {
            node,
            cluster_id,
            client,
            audit,
            policies: Mutex::new((None, Arc::new(defaults))),
            images,
            vms,
            expected,
        })
    }

    fn principal_of(state: &State, caller: &EndpointKey) -> Principal {
        if let Some(m) = state.member_by_endpoint(caller) {
            Principal::Node(m.id, *caller)
        } else if let Some(a) = state.admin(caller) {
            Principal::Admin(*caller, a.node)
        } else if let Some(u) = state.user_by_key(caller) {
            Principal::User(u.clone())
        } else {
            Principal::Anonymous(*caller)
        }
    }

    /// Parses `user:NAME`, `node:ID` or `key:HEX` for `policy test`.
    fn principal_spec(&self, spec: &str) -> Result<Principal, ApiError> {
        let state = self.node.state();
        let bad = || {
            ApiError::BadRequest(format!(
                "principal {spec:?}: expected user:NAME, node:ID or key:HEX"
            ))
        };
        match spec.split_once(':').ok_or_else(bad)? {
            ("user", name) => state
                .user(name)
                .cloned()
                .map(Principal::User)
                .ok_or_else(|| ApiError::Rejected(format!("no user {name}"))),
            ("node", id) => {
                let id: NodeId = id.parse().map_err(|_| bad())?;
                state
                    .member(id)
                    .map(|m| Principal::Node(id, m.endpoint))
                    .ok_or_else(|| ApiError::Rejected(format!("node {id} is not a member")))
            }
            ("key", hex) => {
                let key: EndpointKey = hex.parse().map_err(|_| bad())?;
                Ok(Self::principal_of(&state, &key))
            }
            _ => Err(bad()),
        }
    }

    fn resource_spec(&self, spec: &str) -> Result<Resource, ApiError> {
        if spec == "cluster" {
            return Ok(Resource::Cluster);
        }
        match spec.split_once(':') {
            Some(("user", name)) => self
                .node
                .state()
                .user(name)
                .map(user_resource)
                .ok_or_else(|| ApiError::Rejected(format!("no user {name}"))),
            Some(("image", name)) => Ok(blixard_net::authz::image_resource(name, self)),
            Some(("tenant", name)) => Ok(Resource::Tenant {
                name: name.to_string(),
            }),
            Some(("vm", key)) => {
                let (tenant, name) = key.split_once('/').ok_or_else(|| {
                    ApiError::BadRequest(format!("resource {spec:?}: expected vm:TENANT/NAME"))
                })?;
                let r = blixard_net::api::VmRef {
                    name: name.to_string(),
                    tenant: Some(tenant.to_string()),
                };
                Ok(match self.node.state().vm(key) {
                    Some(vm) => blixard_net::authz::vm_entity(vm),
                    None => Resource::Vm {
                        name: r.name,
                        tenant: tenant.to_string(),
                        labels: Vec::new(),
                    },
                })
            }
            Some(("node", id)) => {
                let id: NodeId = id.parse().map_err(|_| {
                    ApiError::BadRequest(format!("resource {spec:?}: expected node:ID"))
                })?;
                Ok(blixard_net::authz::node_resource(id, self))
            }
            _ => Err(ApiError::BadRequest(format!(
                "resource {spec:?}: expected cluster, user:NAME, image:NAME, tenant:NAME, vm:TENANT/NAME or node:ID"
            ))),
        }
    }
}

impl NodeService {
    /// What list results are filtered by: whether `principal` may do an action on a
    /// resource, under the policies in force now.
    pub(crate) fn may(&self, principal: &Principal) -> impl Fn(&'static str, &Resource) -> bool {
        let authorizer = self.authorizer();
        let context = RequestContext::now(principal.key().to_string());
        let principal = principal.clone();
        move |action, resource| {
            blixard_net::authz::allows(&authorizer, &principal, action, resource, &context)
        }
    }
}

impl Lookup for NodeService {
    fn user(&self, name: &str) -> Option<User> {
        self.node.state().user(name).cloned()
    }
    fn image(&self, name: &str) -> Option<blixard_core::Image> {
        self.node.state().image(name).cloned()
    }
    fn vm(&self, key: &str) -> Option<blixard_core::Vm> {
        self.node.state().vm(key).cloned()
    }
    fn node_labels(&self, node: NodeId) -> Option<std::collections::BTreeMap<String, String>> {
        self.node.state().member(node).map(|m| m.labels.clone())
    }
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
    pub(crate) async fn barrier(&self, stale: bool) -> Result<(), ApiError> {
        if stale {
            Ok(())
        } else {
            self.node.read_barrier().await.map_err(propose_error)
        }
    }

    pub(crate) async fn propose(&self, command: Command) -> Result<CommandOutput, ApiError> {
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
                let addr = member_addr_of(&self.node.state(), NodeId(leader));
                let Some(addr) = addr else {
                    return Ok(Err(ApiError::NoLeader));
                };
                Err(
                    match self
                        .client
                        .forward(&addr, frame.request.clone(), &ProgressSink::none())
                        .await
                    {
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
        Self::principal_of(&self.node.state(), caller)
    }

    fn authorizer(&self) -> Arc<Authorizer> {
        let current = self.node.state().policies().cloned();
        let mut cache = match self.policies.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if cache.0 != current {
            match current.as_deref().map(Authorizer::new).unwrap_or_else(Authorizer::with_defaults) {
                Ok(a) => *cache = (current, Arc::new(a)),
                Err(e) => tracing::error!("stored policies do not validate with this version ({e}); keeping the previous ones"),
            }
        }
        cache.1.clone()
    }

    fn audit(&self, event: AuditEvent) {
        self.audit.record(&event);
    }

    async fn handle(
        &self,
        principal: Principal,
        frame: RequestFrame,
        progress: ProgressSink,
    ) -> ResponseFrame {
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
                // Declared membership: a stranger is refused even with a valid ticket.
                if let Some(expected) = &self.expected {
                    if !expected
                        .iter()
                        .any(|m| m.endpoint_id == j.endpoint && m.name == j.name)
                    {
                        return Err(ApiError::Rejected(format!(
                            "node {} ({}) is not an expected member of this cluster (expected_members)",
                            j.name, j.endpoint
                        )));
                    }
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
            Request::UserAdd(u) => {
                self.propose(Command::AddUser(User {
                    name: u.name.clone(),
                    key: u.key,
                    roles: u.roles.clone(),
                    tenant: u.tenant.clone(),
                    created_at_ms: now_ms(),
                }))
                .await?;
                Ok(Response::UserAdd(UserAdded {}))
            }
            Request::AdminSetKey(a) => {
                self.propose(Command::SetAdminKey {
                    node: a.node,
                    key: a.key,
                    now_ms: now_ms(),
                })
                .await?;
                Ok(Response::AdminSetKey(blixard_net::api::AdminKeySet {}))
            }
            Request::UserSetKey(u) => {
                self.propose(Command::SetUserKey {
                    name: u.name.clone(),
                    key: u.key,
                })
                .await?;
                Ok(Response::UserSetKey(blixard_net::api::UserKeySet {}))
            }
            Request::UserRemove(u) => {
                self.propose(Command::RemoveUser {
                    name: u.name.clone(),
                })
                .await?;
                Ok(Response::UserRemove(UserRemoved {}))
            }
            Request::UserList(l) => {
                self.barrier(l.stale).await?;
                // Filtered by authorization: the caller sees the users it may read.
                let may = self.may(&principal);
                let users = self
                    .node
                    .state()
                    .users()
                    .filter(|u| may("user:read", &user_resource(u)))
                    .cloned()
                    .collect();
                Ok(Response::UserList(UserEntries { users }))
            }
            Request::PolicyGet(_) => {
                let stored = self.node.state().policies().cloned();
                Ok(Response::PolicyGet(PolicyText {
                    default: stored.is_none(),
                    text: stored.unwrap_or_else(|| blixard_authz::DEFAULT_POLICIES.to_string()),
                }))
            }
            Request::PolicySet(p) => {
                // Validate here; apply only stores what passed.
                Authorizer::new(&p.text).map_err(|e| ApiError::Rejected(e.to_string()))?;
                self.propose(Command::SetPolicies {
                    text: p.text.clone(),
                })
                .await?;
                Ok(Response::PolicySet(PolicySetDone {}))
            }
            Request::PolicyTest(t) => {
                let who = self.principal_spec(&t.principal)?;
                let resource = self.resource_spec(&t.resource)?;
                if !blixard_authz::ACTIONS.contains(&t.action.as_str()) {
                    return Err(ApiError::BadRequest(format!(
                        "unknown action {:?}; actions: {}",
                        t.action,
                        blixard_authz::ACTIONS.join(", ")
                    )));
                }
                let context = RequestContext::now(who.key().to_string());
                let v = self
                    .authorizer()
                    .authorize(&who.subject(), &t.action, &resource, &context)
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                Ok(Response::PolicyTest(PolicyVerdict {
                    principal: who.to_string(),
                    allowed: v.allowed,
                    reasons: v.reasons,
                    errors: v.errors,
                }))
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
            Request::ImageImport(r) => self.image_import(&principal, r, progress).await,
            Request::ImageList(r) => self.image_list(&principal, r.stale).await,
            Request::ImageShow(r) => self.image_show(&r.name, r.stale).await,
            Request::ImagePull(r) => self.image_pull(&frame, r, progress).await,
            Request::ImagePin(r) => self.image_pin(&r.name, r.pinned).await,
            Request::ImageRemove(r) => self.image_remove(&r.name).await,
            Request::CacheKey(_) => self.cache_key(),
            Request::TenantCreate(t) => self.tenant_create(&t.name).await,
            Request::TenantList(t) => self.tenant_list(&principal, t.stale).await,
            Request::QuotaSet(q) => self.quota_set(&q.tenant, q.quota).await,
            Request::QuotaShow(q) => self.quota_show(&q.tenant, q.stale).await,
            Request::NodeList(n) => self.node_list(n.stale).await,
            Request::VmCreate(r) => self.vm_create(&principal, &frame, r).await,
            Request::VmList(r) => self.vm_list(&principal, r).await,
            Request::VmShow(r) => self.vm_show(&principal, &r.vm, r.stale).await,
            Request::VmControl(r) => self.vm_control(&principal, r).await,
            Request::VmDelete(r) => self.vm_delete(&principal, &r.vm).await,
            Request::VmLogs(r) => self.vm_logs(&principal, &frame, r).await,
            Request::NodeDrain(r) => self.node_drain(r).await,
        }
    }
}
