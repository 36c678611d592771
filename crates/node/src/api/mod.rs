//! The node's API: who a caller is, which policies are in force, where audited decisions
//! go, and which handler answers each request. Requests reach it only through the choke
//! point (`blixard_net::server`), from the network or, for the host's own configuration,
//! in process (see [`Api::call_as_host`]); the handlers are grouped by what they touch.

mod cluster;
mod images;
mod tenants;
mod vms;

use std::sync::Arc;
use std::time::Duration;

use blixard_authz::{Authorizer, RequestContext, Resource};
use blixard_core::{ClusterId, EndpointKey, NodeId, State, User};
use blixard_net::api::{ApiError, ProgressSink, Request, RequestFrame, Response, ResponseFrame};
use blixard_net::authz::{Lookup, Principal};
use blixard_net::server::Service;

use crate::audit::AuditLog;
use crate::cluster::ClusterHandle;
use crate::config::ExpectedMember;
use crate::gate::Gate;
use crate::images::Images;
use crate::vms::Vms;

/// Who `caller` is in `state`: a member node, an admin credential, a user, or anonymous.
pub(crate) fn principal_of(state: &State, caller: &EndpointKey) -> Principal {
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

/// The API of one node.
pub struct Api {
    pub cluster: Arc<ClusterHandle>,
    pub gate: Arc<Gate>,
    pub images: Arc<Images>,
    pub vms: Arc<Vms>,
    /// When set, only these keys (under these names) may join.
    pub expected: Option<Vec<ExpectedMember>>,
    /// How long a request may take (long-running ones: an hour).
    pub timeout: Duration,
    /// The node's figures (`node stats`) and the API's request metrics.
    stats: Option<crate::metrics::stats::Stats>,
}

impl Api {
    pub fn new(
        gate: Arc<Gate>,
        images: Arc<Images>,
        vms: Arc<Vms>,
        expected: Option<Vec<ExpectedMember>>,
        timeout: Duration,
    ) -> Self {
        Self {
            cluster: gate.cluster.clone(),
            gate,
            images,
            vms,
            expected,
            timeout,
            stats: None,
        }
    }

    /// Counts requests in `stats`' metrics and answers `node stats` from it.
    pub fn counting(mut self, stats: crate::metrics::stats::Stats) -> Self {
        self.stats = Some(stats);
        self
    }

    /// Whether `principal` may do an action on a resource, under the policies in force
    /// now: what list results are filtered by.
    pub(crate) fn may(&self, principal: &Principal) -> impl Fn(&'static str, &Resource) -> bool {
        let authorizer = self.authorizer();
        let context = RequestContext::now(principal.key().to_string());
        let principal = principal.clone();
        move |action, resource| {
            blixard_net::authz::allows(&authorizer, &principal, action, resource, &context)
        }
    }

    /// The host's own configuration (its declared VMs) speaking: `request` goes through the
    /// same choke point as a request from the network (authorization as this host,
    /// an audit record, then the handler).
    pub async fn call_as_host(&self, request: Request, progress: ProgressSink) -> ResponseFrame {
        blixard_net::server::call(
            self,
            self.gate.host(),
            RequestFrame::new(Some(self.cluster.cluster_id), request),
            self.timeout,
            progress,
        )
        .await
    }
}

impl Lookup for Api {
    fn user(&self, name: &str) -> Option<User> {
        self.gate.user(name)
    }
    fn image(&self, name: &str) -> Option<blixard_core::Image> {
        self.gate.image(name)
    }
    fn vm(&self, key: &str) -> Option<blixard_core::Vm> {
        self.gate.vm(key)
    }
    fn node_labels(&self, node: NodeId) -> Option<std::collections::BTreeMap<String, String>> {
        self.gate.node_labels(node)
    }
}

impl Service for Api {
    type Audit = AuditLog;

    fn cluster_id(&self) -> Option<ClusterId> {
        Some(self.cluster.cluster_id)
    }

    fn principal(&self, caller: &EndpointKey) -> Principal {
        principal_of(&self.cluster.state(), caller)
    }

    fn authorizer(&self) -> Arc<Authorizer> {
        self.gate.authorizer()
    }

    fn audit(&self) -> &AuditLog {
        &self.gate.audit
    }

    fn api_metrics(&self) -> Option<&blixard_net::metrics::ApiMetrics> {
        self.stats.as_ref().map(|s| &s.metrics.api)
    }

    async fn handle(
        &self,
        principal: Principal,
        frame: RequestFrame,
        progress: ProgressSink,
    ) -> ResponseFrame {
        crate::cluster::with_request_id(frame.id, self.dispatch(principal, frame, progress)).await
    }
}

impl Api {
    /// Hands `frame` to the function that answers its request.
    async fn dispatch(
        &self,
        principal: Principal,
        frame: RequestFrame,
        progress: ProgressSink,
    ) -> ResponseFrame {
        let c = &*self.cluster;
        let p = &principal;
        match &frame.request {
            Request::Status(r) => cluster::status(c, r).await,
            Request::TokenCreate(t) => cluster::token_create(c, t.ttl_secs, false).await,
            Request::LearnerTokenCreate(t) => cluster::token_create(c, t.ttl_secs, true).await,
            Request::RoleSet(r) => cluster::role_set(c, &frame, r).await,
            Request::Join(j) => cluster::join(self, p, &frame, j).await,
            Request::Leave(l) => cluster::leave(c, &frame, l).await,
            Request::MetaSet(m) => cluster::meta_set(c, m).await,
            Request::MetaGet(m) => cluster::meta_get(c, m).await,
            Request::UserAdd(u) => cluster::user_add(c, u).await,
            Request::AdminSetKey(a) => cluster::admin_set_key(c, a).await,
            Request::UserSetKey(u) => cluster::user_set_key(c, u).await,
            Request::UserRemove(u) => cluster::user_remove(c, u).await,
            Request::UserList(l) => cluster::user_list(self, p, l.stale).await,
            Request::PolicyGet(_) => cluster::policy_get(c),
            Request::PolicySet(s) => cluster::policy_set(c, s).await,
            Request::PolicyTest(t) => cluster::policy_test(self, t),
            Request::ImageImport(r) => images::import(&self.images, p, r, progress).await,
            Request::ImageList(r) => images::list(self, p, r.stale).await,
            Request::ImageShow(r) => images::show(&self.images, &r.name, r.stale).await,
            Request::ImagePull(r) => images::pull(&self.images, &frame, r, progress).await,
            Request::ImagePin(r) => images::pin(&self.images, &r.name, r.pinned).await,
            Request::ImageRemove(r) => images::remove(&self.images, &r.name).await,
            Request::CacheKey(_) => images::cache_key(&self.images),
            Request::TenantCreate(t) => tenants::create(c, &t.name).await,
            Request::TenantRemove(t) => tenants::remove(c, &t.name).await,
            Request::TokenList(l) => cluster::token_list(c, l.stale).await,
            Request::TokenRevoke(r) => cluster::token_revoke(c, &r.id).await,
            Request::TenantList(t) => tenants::list(self, p, t.stale).await,
            Request::QuotaSet(q) => tenants::quota_set(c, &q.tenant, q.quota).await,
            Request::QuotaShow(q) => tenants::quota_show(c, &q.tenant, q.stale).await,
            Request::NodeList(n) => tenants::node_list(c, n.stale).await,
            Request::VmCreate(r) => vms::create(self, p, &frame, r).await,
            Request::VmList(r) => vms::list(self, p, r).await,
            Request::VmShow(r) => vms::show(c, p, &r.vm, r.stale).await,
            Request::VmControl(r) => vms::control(c, p, r).await,
            Request::VmDelete(r) => vms::delete(c, &self.vms, p, &r.vm).await,
            Request::VmLogs(r) => vms::logs(c, &self.vms, p, &frame, r).await,
            Request::NodeDrain(r) => vms::drain(c, r).await,
            Request::ClusterBackup(_) => cluster::backup(c).await,
            Request::Events(r) => {
                let wait = Duration::from_millis(r.wait_ms);
                Ok(Response::Events(
                    c.events.wait(r.after, &r.topics, wait).await,
                ))
            }
            Request::NodeStats(_) => match &self.stats {
                Some(s) => s.read().await.map(|s| Response::NodeStats(Box::new(s))),
                None => Err(ApiError::Unavailable(
                    "this node keeps no statistics".into(),
                )),
            },
        }
    }
}
