//! The one authorization choke point. Every API request passes [`authorize`] with the
//! caller's authenticated identity before any handler runs: the request kind names one
//! Cedar action and one resource, and the cluster's policies decide.

use blixard_authz::{Authorizer, RequestContext, Resource, Subject, Verdict};
use blixard_core::{EndpointKey, Image, NodeId, User};
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, Request};

/// Who is calling, as established from the connection's authenticated endpoint id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// A node's admin credential (written into its data dir): acts with the role `admin`.
    Admin(EndpointKey, NodeId),
    /// A user registered with `blixard user add`.
    User(User),
    /// A cluster member, acting as a host.
    Node(NodeId, EndpointKey),
    /// A host's own configuration (its declared VMs) acting on the cluster through the
    /// node itself, in process; the key is the node's.
    Host(NodeId, EndpointKey),
    /// Anyone else: authenticated (the key is real) but unknown to the cluster.
    Anonymous(EndpointKey),
}

impl Principal {
    pub fn key(&self) -> &EndpointKey {
        match self {
            Principal::Admin(k, _)
            | Principal::Node(_, k)
            | Principal::Host(_, k)
            | Principal::Anonymous(k) => k,
            Principal::User(u) => &u.key,
        }
    }

    /// The principal as Cedar sees it.
    pub fn subject(&self) -> Subject {
        match self {
            Principal::Admin(_, node) => Subject::User {
                name: format!("admin-n{node}"),
                roles: vec!["admin".into()],
                tenant: None,
            },
            Principal::User(u) => Subject::User {
                name: u.name.clone(),
                roles: u.roles.clone(),
                tenant: u.tenant.clone(),
            },
            Principal::Node(n, _) => Subject::Node { id: n.0 },
            Principal::Host(n, _) => Subject::Host { id: n.0 },
            Principal::Anonymous(k) => Subject::Anonymous { key: k.to_string() },
        }
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Admin(_, n) => write!(f, "the admin credential of node {n}"),
            Principal::User(u) => write!(f, "user {}", u.name),
            Principal::Node(n, _) => write!(f, "node {n}"),
            Principal::Host(n, _) => write!(f, "the configuration of host {n}"),
            Principal::Anonymous(k) => write!(f, "unknown key {k}"),
        }
    }
}

/// Looks up what a resource is, for requests that name one.
pub trait Lookup {
    fn user(&self, name: &str) -> Option<User>;
    fn image(&self, name: &str) -> Option<Image>;
    /// A VM by its key (`tenant/name`).
    fn vm(&self, key: &str) -> Option<blixard_core::Vm>;
    /// A member's labels.
    fn node_labels(&self, node: NodeId) -> Option<std::collections::BTreeMap<String, String>>;
}

/// Labels as Cedar sees them: `key=value` strings.
pub fn label_strings(labels: &std::collections::BTreeMap<String, String>) -> Vec<String> {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// The Cedar form of host `node` (an unknown one has no labels).
pub fn node_resource(node: NodeId, lookup: &dyn Lookup) -> Resource {
    Resource::Node {
        id: node.0,
        labels: lookup
            .node_labels(node)
            .map(|l| label_strings(&l))
            .unwrap_or_default(),
    }
}

/// The Cedar form of the user named `name`, or the cluster when there is no such user.
fn known_user(name: &str, lookup: &dyn Lookup) -> Resource {
    lookup
        .user(name)
        .map(|u| user_resource(&u))
        .unwrap_or(Resource::Cluster)
}

/// The Cedar form of the image named `name` (an unknown name is treated as a shared
/// image, so the refusal or "no such image" reveals nothing about other tenants).
pub fn image_resource(name: &str, lookup: &dyn Lookup) -> Resource {
    Resource::Image {
        name: name.to_string(),
        tenant: lookup.image(name).and_then(|i| i.tenant),
    }
}

/// The Cedar form of an image.
pub fn image_entity(i: &Image) -> Resource {
    Resource::Image {
        name: i.name.clone(),
        tenant: i.tenant.clone(),
    }
}

impl Principal {
    /// The caller's tenant, if it is a user bound to one.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Principal::User(u) => u.tenant.as_deref(),
            _ => None,
        }
    }
}

/// The tenant a VM request means: the one named, else the caller's, else `default`.
pub fn vm_tenant(principal: &Principal, tenant: Option<&String>) -> String {
    tenant
        .cloned()
        .or_else(|| principal.tenant().map(str::to_string))
        .unwrap_or_else(|| blixard_core::DEFAULT_TENANT.to_string())
}

/// The Cedar form of the VM a request names: its labels when it exists, none when not
/// (the refusal or "no VM" reveals nothing else).
fn vm_ref_resource(principal: &Principal, r: &crate::api::VmRef, lookup: &dyn Lookup) -> Resource {
    let tenant = vm_tenant(principal, r.tenant.as_ref());
    let labels = lookup
        .vm(&blixard_core::Vm::key(&tenant, &r.name))
        .map(|v| label_strings(&v.spec.labels))
        .unwrap_or_default();
    Resource::Vm {
        name: r.name.clone(),
        tenant,
        labels,
    }
}

/// The Cedar form of a VM.
pub fn vm_entity(vm: &blixard_core::Vm) -> Resource {
    Resource::Vm {
        name: vm.spec.name.clone(),
        tenant: vm.spec.tenant.clone(),
        labels: label_strings(&vm.spec.labels),
    }
}

/// The Cedar form of a user resource.
pub fn user_resource(u: &User) -> Resource {
    Resource::User {
        name: u.name.clone(),
        roles: u.roles.clone(),
        tenant: u.tenant.clone(),
    }
}

/// The Cedar action and resource of a request. One action per request kind; a request
/// forwarded by a member node to the leader is `node:forward` (it was authorized for its
/// real caller where it arrived).
pub fn action_of(
    principal: &Principal,
    request: &Request,
    forwarded: bool,
    lookup: &dyn Lookup,
) -> (&'static str, Resource) {
    if forwarded {
        return ("node:forward", Resource::Cluster);
    }
    match request {
        Request::Status(_) | Request::MetaGet(_) | Request::NodeStats(_) => {
            ("cluster:read", Resource::Cluster)
        }
        Request::TokenCreate(_)
        | Request::LearnerTokenCreate(_)
        | Request::RoleSet(_)
        | Request::TokenList(_)
        | Request::TokenRevoke(_)
        | Request::Leave(_)
        | Request::MetaSet(_)
        | Request::AdminSetKey(_) => ("cluster:manage", Resource::Cluster),
        Request::Join(_) => ("cluster:join", Resource::Cluster),
        // The whole state, the binary cache's signing key included: admins only by default.
        Request::ClusterBackup(_) => ("cluster:backup", Resource::Cluster),
        // Every tenant's changes: not for a tenant's users by default.
        Request::Events(_) => ("events:read", Resource::Cluster),
        Request::UserAdd(u) => (
            "user:manage",
            Resource::User {
                name: u.name.clone(),
                roles: u.roles.clone(),
                tenant: u.tenant.clone(),
            },
        ),
        // A user that does not exist is the cluster, so a refusal names no one.
        Request::UserSetKey(r) => ("user:manage", known_user(&r.name, lookup)),
        Request::UserRemove(r) => ("user:manage", known_user(&r.name, lookup)),
        // Listing needs the right to see oneself; the results are then filtered user by
        // user with the same action.
        Request::UserList(_) => (
            "user:read",
            match principal {
                Principal::User(u) => user_resource(u),
                Principal::Admin(..) => Resource::User {
                    name: principal.subject_name(),
                    roles: vec!["admin".into()],
                    tenant: None,
                },
                _ => Resource::Cluster,
            },
        ),
        Request::PolicyGet(_) | Request::PolicyTest(_) => ("policy:read", Resource::Cluster),
        Request::PolicySet(_) => ("policy:set", Resource::Cluster),
        Request::ImageImport(i) => (
            "image:manage",
            Resource::Image {
                name: i.name.clone(),
                tenant: i
                    .tenant
                    .clone()
                    .or_else(|| principal.tenant().map(str::to_string)),
            },
        ),
        // Listing needs the right to read the cluster; the results are then filtered
        // image by image with `image:read`.
        Request::ImageList(_) | Request::CacheKey(_) => ("cluster:read", Resource::Cluster),
        Request::ImageShow(i) => ("image:read", image_resource(&i.name, lookup)),
        Request::ImagePull(i) => ("image:manage", image_resource(&i.name, lookup)),
        Request::ImagePin(i) => ("image:manage", image_resource(&i.name, lookup)),
        Request::ImageRemove(i) => ("image:manage", image_resource(&i.name, lookup)),
        Request::TenantCreate(t) => (
            "tenant:manage",
            Resource::Tenant {
                name: t.name.clone(),
            },
        ),
        Request::TenantRemove(t) => (
            "tenant:manage",
            Resource::Tenant {
                name: t.name.clone(),
            },
        ),
        Request::QuotaSet(q) => (
            "tenant:manage",
            Resource::Tenant {
                name: q.tenant.clone(),
            },
        ),
        Request::QuotaShow(q) => (
            "tenant:read",
            Resource::Tenant {
                name: q.tenant.clone(),
            },
        ),
        // Listing needs the right to read the cluster; the results are then filtered
        // tenant by tenant with `tenant:read`.
        Request::TenantList(_) | Request::NodeList(_) | Request::VmList(_) => {
            ("cluster:read", Resource::Cluster)
        }
        // A new VM is judged with the labels it asks for; an existing one with its own.
        Request::VmCreate(c) => (
            "vm:manage",
            Resource::Vm {
                name: c.spec.name.clone(),
                tenant: vm_tenant(principal, Some(&c.spec.tenant).filter(|t| !t.is_empty())),
                labels: label_strings(&c.spec.labels),
            },
        ),
        Request::VmShow(r) => ("vm:read", vm_ref_resource(principal, &r.vm, lookup)),
        Request::VmLogs(r) => ("vm:read", vm_ref_resource(principal, &r.vm, lookup)),
        Request::VmControl(r) => ("vm:manage", vm_ref_resource(principal, &r.vm, lookup)),
        Request::VmDelete(r) => ("vm:manage", vm_ref_resource(principal, &r.vm, lookup)),
        Request::NodeDrain(d) => ("node:manage", node_resource(d.node, lookup)),
    }
}

impl Principal {
    fn subject_name(&self) -> String {
        match self.subject() {
            Subject::User { name, .. } => name,
            Subject::Node { id } | Subject::Host { id } => format!("n{id}"),
            Subject::Anonymous { key } => key,
        }
    }
}

/// Whether a request changes state: its decisions and outcomes are audited (of the other
/// requests, only the denials).
pub fn is_mutating(request: &Request) -> bool {
    !matches!(
        request,
        Request::Status(_)
            | Request::NodeStats(_)
            | Request::MetaGet(_)
            | Request::UserList(_)
            | Request::PolicyGet(_)
            | Request::PolicyTest(_)
            | Request::ImageList(_)
            | Request::ImageShow(_)
            | Request::CacheKey(_)
            | Request::TenantList(_)
            | Request::QuotaShow(_)
            | Request::NodeList(_)
            | Request::VmList(_)
            | Request::VmShow(_)
            | Request::VmLogs(_)
            | Request::TokenList(_)
            | Request::Events(_)
    )
}

/// Decides whether `principal` may make `request`. A refusal names the action and the
/// resource as the caller asked for them, and nothing else.
pub fn authorize(
    authorizer: &Authorizer,
    principal: &Principal,
    request: &Request,
    forwarded: bool,
    context: &RequestContext,
    lookup: &dyn Lookup,
) -> Result<Decision, ApiError> {
    let (action, resource) = action_of(principal, request, forwarded, lookup);
    Ok(decide(authorizer, principal, action, &resource, context))
}

/// The Cedar action and resource of a change a host's machinery makes for itself (a
/// command the node proposes outside any request): a report of a VM's phase, a
/// placement, a host marked down or up, the node's own addresses, an image held or no
/// longer. `None` for any other command: those are made only by requests, which the
/// request's own action covers.
pub fn command_action(
    command: &blixard_core::Command,
    lookup: &dyn Lookup,
) -> Option<(&'static str, Resource)> {
    use blixard_core::Command;
    let vm = |key: &str| match lookup.vm(key) {
        Some(vm) => vm_entity(&vm),
        None => {
            let (tenant, name) = key.split_once('/').unwrap_or(("", key));
            Resource::Vm {
                name: name.to_string(),
                tenant: tenant.to_string(),
                labels: Vec::new(),
            }
        }
    };
    Some(match command {
        Command::ReportVm { key, .. } => ("vm:report", vm(key)),
        Command::PlaceVm { key, .. } => ("vm:schedule", vm(key)),
        Command::SetNodeDown { node, .. } => ("node:liveness", node_resource(*node, lookup)),
        // The leader's housekeeping of the cluster as a whole. Raising the cluster version
        // shares the state check's action rather than adding one: stored policies from
        // before it would not name a new action, and would keep the version down forever.
        Command::CheckState { .. } | Command::SetClusterVersion { .. } => {
            ("cluster:check", Resource::Cluster)
        }
        Command::UpdateAddrs { node, .. } => ("node:update", node_resource(*node, lookup)),
        Command::SetImageHolder { name, .. } => ("image:hold", image_resource(name, lookup)),
        _ => return None,
    })
}

/// Decides whether `principal` may make `command` itself (see [`command_action`]); a
/// command that only requests make is refused as a bad request.
pub fn authorize_command(
    authorizer: &Authorizer,
    principal: &Principal,
    command: &blixard_core::Command,
    context: &RequestContext,
    lookup: &(dyn Lookup + Sync),
) -> Result<Decision, ApiError> {
    let (action, resource) = command_action(command, lookup).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "{} is made only by a request, not by a host for itself",
            command.kind()
        ))
    })?;
    Ok(decide(authorizer, principal, action, &resource, context))
}

/// Decides whether `principal` may open a connection for `action` (on the cluster), e.g.
/// `blob:fetch` for the iroh-blobs protocol.
pub fn authorize_connection(
    authorizer: &Authorizer,
    principal: &Principal,
    action: &'static str,
    caller: &EndpointKey,
) -> Decision {
    let context = RequestContext::now(caller.to_string());
    decide(authorizer, principal, action, &Resource::Cluster, &context)
}

/// Whether `principal` may do `action` on `resource`: what list results are filtered by.
pub fn allows(
    authorizer: &Authorizer,
    principal: &Principal,
    action: &'static str,
    resource: &Resource,
    context: &RequestContext,
) -> bool {
    decide(authorizer, principal, action, resource, context).allowed
}

/// Asks Cedar. A request Cedar cannot even form (e.g. a resource type the action does not
/// apply to) is a refusal, never an allowance.
fn decide(
    authorizer: &Authorizer,
    principal: &Principal,
    action: &'static str,
    resource: &Resource,
    context: &RequestContext,
) -> Decision {
    let verdict = authorizer
        .authorize(&principal.subject(), action, resource, context)
        .unwrap_or_else(|e| Verdict {
            allowed: false,
            reasons: Vec::new(),
            errors: vec![e.to_string()],
        });
    Decision {
        action,
        resource: resource.to_string(),
        allowed: verdict.allowed,
        reasons: verdict.reasons,
        errors: verdict.errors,
    }
}

/// The outcome of one authorization, for the caller and the audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub action: &'static str,
    pub resource: String,
    pub allowed: bool,
    pub reasons: Vec<String>,
    pub errors: Vec<String>,
}

impl Decision {
    /// The error a refused caller sees.
    pub fn refusal(&self, principal: &Principal) -> ApiError {
        ApiError::Unauthorized {
            caller: principal.to_string(),
            action: format!("{} on {}", self.action, self.resource),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{LeaveCluster, StatusRequest};

    struct NoUsers;
    impl Lookup for NoUsers {
        fn user(&self, _: &str) -> Option<User> {
            None
        }
        fn image(&self, _: &str) -> Option<Image> {
            None
        }
        fn vm(&self, _: &str) -> Option<blixard_core::Vm> {
            None
        }
        fn node_labels(&self, _: NodeId) -> Option<std::collections::BTreeMap<String, String>> {
            None
        }
    }

    fn ctx() -> RequestContext {
        RequestContext {
            time_ms: 0,
            source: String::new(),
        }
    }

    #[test]
    fn strangers_may_only_join_and_nodes_only_read_and_forward() {
        let a = Authorizer::with_defaults().unwrap();
        let stranger = Principal::Anonymous(EndpointKey([1; 32]));
        let node = Principal::Node(NodeId(3), EndpointKey([3; 32]));
        let admin = Principal::Admin(EndpointKey([2; 32]), NodeId(1));
        let status = Request::Status(StatusRequest::default());
        let leave = Request::Leave(LeaveCluster { node: NodeId(2) });
        let ok = |p: &Principal, r: &Request, fwd: bool| {
            authorize(&a, p, r, fwd, &ctx(), &NoUsers).unwrap().allowed
        };
        assert!(!ok(&stranger, &status, false));
        assert!(!ok(&stranger, &leave, false));
        assert!(!ok(&stranger, &leave, true), "strangers cannot forward");
        assert!(ok(&admin, &leave, false));
        assert!(ok(&node, &status, false));
        assert!(!ok(&node, &leave, false));
        assert!(ok(&node, &leave, true));
    }

    /// The host acting for itself: which of its own changes (commands) and which requests
    /// of its configuration each principal may make. The rows are the principals, the
    /// columns the commands, then the requests.
    #[test]
    fn the_host_matrix() {
        use blixard_core::{BlobHash, Command, Phase};

        use crate::api::{ImageImport, UserRemove, VmCreate, VmDelete, VmRef};
        let a = Authorizer::with_defaults().unwrap();
        let commands = [
            Command::ReportVm {
                key: "acme/web".into(),
                node: NodeId(3),
                generation: 1,
                phase: Phase::Running,
                reason: None,
                now_ms: 0,
            },
            Command::PlaceVm {
                key: "acme/web".into(),
                generation: 1,
                node: Some(NodeId(3)),
                reason: None,
                cpu_overcommit_pct: 100,
                memory_overcommit_pct: 100,
                now_ms: 0,
            },
            Command::SetNodeDown {
                node: NodeId(2),
                down: true,
                now_ms: 0,
            },
            Command::CheckState { previous: None },
            Command::SetClusterVersion { version: 2 },
            // its own addresses, then another host's
            Command::UpdateAddrs {
                node: NodeId(3),
                addrs: vec![],
            },
            Command::UpdateAddrs {
                node: NodeId(2),
                addrs: vec![],
            },
            Command::SetImageHolder {
                name: "web".into(),
                manifest: BlobHash([0; 32]),
                node: NodeId(3),
                held: true,
            },
        ];
        let vm = VmRef {
            name: "web".into(),
            tenant: Some("acme".into()),
        };
        let requests: Vec<Request> = vec![
            ImageImport {
                name: "declared-x".into(),
                path: "/nix/store/x".into(),
                tenant: None,
                pin: false,
            }
            .into(),
            VmCreate {
                spec: Box::new(blixard_core::VmSpec {
                    name: "web".into(),
                    tenant: "acme".into(),
                    image: "declared-x".into(),
                    vcpus: 1,
                    memory_mib: 64,
                    labels: Default::default(),
                    constraints: Default::default(),
                    anti_affinity: None,
                    restart: blixard_core::RestartPolicy::Always,
                    ready_marker: None,
                }),
                start: true,
            }
            .into(),
            VmDelete { vm }.into(),
            UserRemove { name: "bob".into() }.into(),
            Request::Leave(LeaveCluster { node: NodeId(2) }),
        ];
        let host = Principal::Host(NodeId(3), EndpointKey([3; 32]));
        let node = Principal::Node(NodeId(3), EndpointKey([3; 32]));
        let admin = Principal::Admin(EndpointKey([2; 32]), NodeId(1));
        let stranger = Principal::Anonymous(EndpointKey([1; 32]));
        let (t, f) = (true, false);
        //            Report Place Down Check Version Addrs(own) Addrs(other) Hold | Import Create Delete URm Leave
        let rows: [(&Principal, [bool; 13]); 4] = [
            (&host, [t, t, t, t, t, t, f, t, t, t, t, f, f]),
            (&node, [f, f, f, f, f, f, f, f, f, f, f, f, f]),
            (&admin, [f, f, f, f, f, f, f, f, t, t, t, t, t]),
            (&stranger, [f, f, f, f, f, f, f, f, f, f, f, f, f]),
        ];
        for (who, row) in rows {
            let mut got = Vec::new();
            for c in &commands {
                got.push(
                    authorize_command(&a, who, c, &ctx(), &NoUsers)
                        .unwrap()
                        .allowed,
                );
            }
            for r in &requests {
                got.push(
                    authorize(&a, who, r, false, &ctx(), &NoUsers)
                        .unwrap()
                        .allowed,
                );
            }
            assert_eq!(got, row, "{who}");
        }
        // A command only requests make is not a host's to make, whoever asks.
        let meta = Command::SetMeta {
            key: "k".into(),
            value: None,
        };
        assert!(authorize_command(&a, &host, &meta, &ctx(), &NoUsers).is_err());
    }
}
