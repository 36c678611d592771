//! The cluster's own requests: status, join tokens, joining and leaving, metadata, users,
//! the admin credential, and the Cedar policies.

use blixard_authz::{Authorizer, RequestContext, Resource};
use blixard_core::backup::BackupHeader;
use blixard_core::{
    ApplyError, Command, CommandOutput, EndpointKey, JoinRequest, Member, NewMember, NodeId, User,
};
use blixard_net::api::{
    AdminKeySet, AdminSetKey, ApiError, BackupData, ClusterStatus, JoinCluster, Joined,
    LeaveCluster, Left, MemberVersion, MetaEntries, MetaGet, MetaSet, MetaSetDone, PolicySet,
    PolicySetDone, PolicyTest, PolicyText, PolicyVerdict, ProgressSink, RequestFrame, Response,
    ResponseFrame, RoleSet, RoleSetDone, StatusRequest, TokenCreated, TokenEntries, TokenEntry,
    TokenRevoked, UserAdd, UserAdded, UserEntries, UserKeySet, UserRemove, UserRemoved, UserSetKey,
    Versions,
};
use blixard_net::authz::{user_resource, Principal};
use blixard_net::ticket::{hash_secret, JoinTicket};
use blixard_raft::ProposeError;

use blixard_net::server::Service;

use super::Api;
use crate::cluster::{now_ms, propose_error, ClusterHandle, ForwardError};

pub(super) async fn status(cluster: &ClusterHandle, r: &StatusRequest) -> ResponseFrame {
    cluster.barrier(r.stale).await?;
    let raft = cluster.node.status().await.map_err(propose_error)?;
    let state = cluster.state();
    let meta = state.cluster().cloned().ok_or_else(|| {
        ApiError::Unavailable("this node has not received the cluster state yet".into())
    })?;
    Ok(Response::Status(ClusterStatus {
        cluster_id: meta.cluster_id,
        name: meta.name,
        node: cluster.me(),
        raft: Box::new(raft),
        members: state.members().cloned().collect(),
        stale: r.stale,
        versions: Some(Versions {
            cluster: state.cluster_version(),
            log: cluster.log_version,
            release: crate::version::RELEASE.to_string(),
            members: state
                .members()
                .filter(|m| m.id != cluster.me())
                .map(|m| {
                    let said = cluster.versions.of(m.id).map(|v| match v {
                        Some(v) => MemberVersion {
                            log: v.log,
                            release: Some(v.release),
                        },
                        None => MemberVersion {
                            log: 1,
                            release: None,
                        },
                    });
                    (m.id, said)
                })
                .collect(),
        }),
    }))
}

/// The whole state in a backup file: after a read barrier (every write acknowledged
/// before the request is in it), at this node's applied index, taken between two rounds of
/// its raft thread. Writes go on meanwhile.
pub(super) async fn backup(cluster: &ClusterHandle) -> ResponseFrame {
    cluster.barrier(false).await?;
    let copy = cluster.node.copy_state().await.map_err(propose_error)?;
    let meta = cluster.state().cluster().cloned().ok_or_else(|| {
        ApiError::Unavailable("this node has not received the cluster state yet".into())
    })?;
    let header = BackupHeader {
        cluster_id: meta.cluster_id,
        cluster_name: meta.name,
        index: copy.index,
        term: copy.term,
        created_at_ms: now_ms(),
        node: cluster.me(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let rows = copy.rows.len();
    let bytes = blixard_core::backup::encode(&header, copy.rows)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    tracing::info!(
        index = copy.index,
        rows,
        bytes = bytes.len(),
        "backup taken"
    );
    Ok(Response::ClusterBackup(BackupData { bytes }))
}

/// `cluster token create [--learner]`.
pub(super) async fn token_create(
    cluster: &ClusterHandle,
    ttl_secs: u64,
    learner: bool,
) -> ResponseFrame {
    if ttl_secs == 0 || ttl_secs > 7 * 24 * 3600 {
        return Err(ApiError::BadRequest(
            "token lifetimes are 1 second to 7 days".into(),
        ));
    }
    let secret: [u8; 32] = rand::random();
    let now = now_ms();
    let expires_at_ms = now + ttl_secs * 1000;
    let token_hash = hash_secret(&secret);
    cluster
        .propose(if learner {
            Command::CreateLearnerToken {
                token_hash,
                now_ms: now,
                expires_at_ms,
            }
        } else {
            Command::CreateJoinToken {
                token_hash,
                now_ms: now,
                expires_at_ms,
            }
        })
        .await?;
    let ticket = JoinTicket {
        cluster_id: cluster.cluster_id,
        members: cluster
            .members()
            .into_iter()
            .map(|(_, k, a)| (k, a))
            .collect(),
        secret,
    };
    let created = TokenCreated {
        ticket: ticket.to_string(),
        expires_at_ms,
    };
    Ok(if learner {
        Response::LearnerTokenCreate(created)
    } else {
        Response::TokenCreate(created)
    })
}

/// A membership change runs where raft can propose it, on the leader: a follower hands
/// the request there. `result` is this node's attempt.
async fn on_leader(
    cluster: &ClusterHandle,
    frame: &RequestFrame,
    result: Result<CommandOutput, ProposeError>,
) -> Result<CommandOutput, ResponseFrame> {
    match result {
        Err(ProposeError::NotLeader {
            leader: Some(leader),
        }) if !frame.forwarded => Err(cluster
            .forward(NodeId(leader), frame.request.clone(), &ProgressSink::none())
            .await
            .unwrap_or_else(|e| match e {
                ForwardError::NoAddress(_) => Err(ApiError::NoLeader),
                ForwardError::Failed(_, e) => Err(ApiError::Unavailable(format!(
                    "forwarding to leader {leader}: {e}"
                ))),
                e @ ForwardError::LeaderChanged(_) => Err(ApiError::Unavailable(e.to_string())),
            })),
        other => other.map_err(|e| Err(propose_error(e))),
    }
}

pub(super) async fn token_list(cluster: &ClusterHandle, stale: bool) -> ResponseFrame {
    cluster.barrier(stale).await?;
    let mut tokens: Vec<TokenEntry> = cluster
        .state()
        .join_tokens()
        .map(|(hash, t)| TokenEntry {
            id: hex(hash),
            created_at_ms: t.created_at_ms,
            expires_at_ms: t.expires_at_ms,
            used_by: t.used_by,
        })
        .collect();
    tokens.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
    Ok(Response::TokenList(TokenEntries { tokens }))
}

/// The shortest id prefix `token revoke` takes.
const MIN_TOKEN_PREFIX: usize = 8;

pub(super) async fn token_revoke(cluster: &ClusterHandle, id: &str) -> ResponseFrame {
    let id = id.to_ascii_lowercase();
    if id.len() < MIN_TOKEN_PREFIX || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::BadRequest(format!(
            "a token id is {MIN_TOKEN_PREFIX} to 64 hex digits (`cluster token list` shows them)"
        )));
    }
    cluster.barrier(false).await?;
    let matching: Vec<[u8; 32]> = cluster
        .state()
        .join_tokens()
        .filter(|(hash, _)| hex(hash.as_slice()).starts_with(&id))
        .map(|(hash, _)| *hash)
        .collect();
    let token_hash = match matching.as_slice() {
        [one] => *one,
        [] => return Err(ApiError::NotFound(format!("no join token {id}"))),
        _ => {
            return Err(ApiError::BadRequest(format!(
                "{} join tokens start with {id}; give more of the id",
                matching.len()
            )))
        }
    };
    cluster
        .propose(Command::RevokeJoinToken { token_hash })
        .await?;
    Ok(Response::TokenRevoke(TokenRevoked {
        id: hex(&token_hash),
    }))
}

fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

pub(super) async fn join(
    api: &Api,
    principal: &Principal,
    frame: &RequestFrame,
    j: &JoinCluster,
) -> ResponseFrame {
    // The first node checks that the joiner speaks for its own key; a forwarded join comes
    // from that (member) node.
    if !frame.forwarded && j.endpoint != *principal.key() {
        return Err(ApiError::BadRequest(
            "a node can only join with its own key".into(),
        ));
    }
    // Declared membership: a stranger is refused even with a valid ticket.
    if let Some(expected) = &api.expected {
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
    if j.name.is_empty() || j.name.len() > 64 {
        return Err(ApiError::BadRequest(
            "node names are 1 to 64 characters".into(),
        ));
    }
    let caller: EndpointKey = j.endpoint;
    if j.admin == caller {
        return Err(ApiError::BadRequest(
            "the admin credential must differ from the node key".into(),
        ));
    }
    let cluster = &api.cluster;
    // Names default to the host name: two hosts with the same one (cloned images, a
    // generic name) would be two members no one can tell apart. Checked here, before the
    // proposal, so that logs written before the check apply as they did.
    let taken = {
        let state = cluster.state();
        let found = state
            .members()
            .find(|m| m.name == j.name && m.endpoint != caller && !state.is_removed(m.id))
            .map(|m| m.id);
        found
    };
    if let Some(other) = taken {
        return Err(ApiError::Rejected(format!(
            "this cluster already has a member named {:?} ({other}); give this node another name \
             (`blixard node run --name NAME`, `name = \"NAME\"` in its config file, or \
             `services.blixard.name` on NixOS)",
            j.name
        )));
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
    let result = cluster.node.join(request).await;
    match on_leader(cluster, frame, result).await {
        Err(forwarded) => forwarded,
        Ok(CommandOutput::Joined { node }) => Ok(Response::Join(Joined {
            node,
            cluster_id: cluster.cluster_id,
            members: cluster.members(),
        })),
        Ok(other) => Err(ApiError::Internal(format!(
            "unexpected join result {other:?}"
        ))),
    }
}

pub(super) async fn leave(
    cluster: &ClusterHandle,
    frame: &RequestFrame,
    l: &LeaveCluster,
) -> ResponseFrame {
    current_member(&cluster.state(), l.node)?;
    let result = cluster.node.remove(l.node, now_ms()).await;
    match on_leader(cluster, frame, result).await {
        Err(forwarded) => forwarded,
        Ok(_) => Ok(Response::Leave(Left { node: l.node })),
    }
}

/// `node` as a current member, or why a membership change cannot name it.
fn current_member(state: &blixard_core::State, node: NodeId) -> Result<&Member, ApiError> {
    if state.is_removed(node) {
        return Err(ApiError::Rejected(format!(
            "node {node} was already removed"
        )));
    }
    state
        .member(node)
        .ok_or_else(|| ApiError::NotFound(format!("node {node} is not a member")))
}

/// How long `cluster demote` of the leader waits for the leadership it handed on.
const HAND_OVER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// `cluster promote` / `cluster demote`: a joint configuration change, on the leader.
pub(super) async fn role_set(
    cluster: &ClusterHandle,
    frame: &RequestFrame,
    r: &RoleSet,
) -> ResponseFrame {
    {
        let state = cluster.state();
        let command = Command::ChangeRole {
            node: r.node,
            role: r.role,
        };
        state
            .admits_version(&command)
            .map_err(|refused| ApiError::Rejected(refused.to_string()))?;
        if current_member(&state, r.node)?.role == r.role {
            return Err(ApiError::Rejected(
                ApplyError::SameRole(r.node, r.role).to_string(),
            ));
        }
    }
    let result = cluster.node.change_role(r.node, r.role).await;
    if matches!(result, Err(ProposeError::NotLeader { leader: None })) && r.node == cluster.me() {
        // This node led and is being demoted: it handed its leadership on. Once the new
        // leader is known, the change is asked of it (also when this request was handed
        // here: the new leader is another node, so it goes no further).
        let mut watch = cluster.node.leader_watch();
        let me = cluster.me().0;
        let moved = tokio::time::timeout(HAND_OVER_WAIT, watch.wait_for(|l| *l != 0 && *l != me))
            .await
            .is_ok_and(|r| r.is_ok());
        let Some(leader) = cluster.leader().filter(|l| moved && *l != cluster.me()) else {
            return Err(ApiError::Unavailable(
                "this node leads and handed its leadership on, but no other leader was elected in time; try again".into(),
            ));
        };
        return cluster
            .forward_to(leader, frame.request.clone(), &ProgressSink::none())
            .await;
    }
    match on_leader(cluster, frame, result).await {
        Err(forwarded) => forwarded,
        Ok(_) => {
            tracing::info!(node = %r.node, role = ?r.role, "member role changed");
            Ok(Response::RoleSet(RoleSetDone {
                node: r.node,
                role: r.role,
            }))
        }
    }
}

pub(super) async fn meta_set(cluster: &ClusterHandle, m: &MetaSet) -> ResponseFrame {
    cluster
        .propose(Command::SetMeta {
            key: m.key.clone(),
            value: m.value.clone(),
        })
        .await?;
    Ok(Response::MetaSet(MetaSetDone {}))
}

pub(super) async fn meta_get(cluster: &ClusterHandle, m: &MetaGet) -> ResponseFrame {
    cluster.barrier(m.stale).await?;
    let state = cluster.state();
    let entries = match &m.key {
        Some(k) => match state.meta_get(k) {
            Some(v) => vec![(k.clone(), v.clone())],
            None => return Err(ApiError::NotFound(format!("no metadata key {k:?}"))),
        },
        None => state
            .meta_entries()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    Ok(Response::MetaGet(MetaEntries { entries }))
}

pub(super) async fn user_add(cluster: &ClusterHandle, u: &UserAdd) -> ResponseFrame {
    cluster
        .propose(Command::AddUser(User {
            name: u.name.clone(),
            key: u.key,
            roles: u.roles.clone(),
            tenant: u.tenant.clone(),
            created_at_ms: now_ms(),
        }))
        .await?;
    Ok(Response::UserAdd(UserAdded {}))
}

pub(super) async fn admin_set_key(cluster: &ClusterHandle, a: &AdminSetKey) -> ResponseFrame {
    cluster
        .propose(Command::SetAdminKey {
            node: a.node,
            key: a.key,
            now_ms: now_ms(),
        })
        .await?;
    Ok(Response::AdminSetKey(AdminKeySet {}))
}

pub(super) async fn user_set_key(cluster: &ClusterHandle, u: &UserSetKey) -> ResponseFrame {
    cluster
        .propose(Command::SetUserKey {
            name: u.name.clone(),
            key: u.key,
        })
        .await?;
    Ok(Response::UserSetKey(UserKeySet {}))
}

pub(super) async fn user_remove(cluster: &ClusterHandle, u: &UserRemove) -> ResponseFrame {
    cluster
        .propose(Command::RemoveUser {
            name: u.name.clone(),
        })
        .await?;
    Ok(Response::UserRemove(UserRemoved {}))
}

/// The users the caller may read.
pub(super) async fn user_list(api: &Api, principal: &Principal, stale: bool) -> ResponseFrame {
    api.cluster.barrier(stale).await?;
    let may = api.may(principal);
    let users = api
        .cluster
        .state()
        .users()
        .filter(|u| may("user:read", &user_resource(u)))
        .cloned()
        .collect();
    Ok(Response::UserList(UserEntries { users }))
}

pub(super) fn policy_get(cluster: &ClusterHandle) -> ResponseFrame {
    let stored = cluster.state().policies().cloned();
    Ok(Response::PolicyGet(PolicyText {
        default: stored.is_none(),
        text: stored.unwrap_or_else(|| blixard_authz::DEFAULT_POLICIES.to_string()),
    }))
}

pub(super) async fn policy_set(cluster: &ClusterHandle, p: &PolicySet) -> ResponseFrame {
    // Validate here; apply only stores what passed.
    Authorizer::new(&p.text).map_err(|e| ApiError::Rejected(e.to_string()))?;
    cluster
        .propose(Command::SetPolicies {
            text: p.text.clone(),
        })
        .await?;
    Ok(Response::PolicySet(PolicySetDone {}))
}

pub(super) fn policy_test(api: &Api, t: &PolicyTest) -> ResponseFrame {
    let who = principal_spec(api, &t.principal)?;
    let resource = resource_spec(api, &t.resource)?;
    if !blixard_authz::ACTIONS.contains(&t.action.as_str()) {
        return Err(ApiError::BadRequest(format!(
            "unknown action {:?}; actions: {}",
            t.action,
            blixard_authz::ACTIONS.join(", ")
        )));
    }
    let context = RequestContext::now(who.key().to_string());
    let v = api
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

/// Parses `user:NAME`, `node:ID` or `key:HEX` for `policy test`.
fn principal_spec(api: &Api, spec: &str) -> Result<Principal, ApiError> {
    let state = api.cluster.state();
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
            .ok_or_else(|| ApiError::NotFound(format!("no user {name}"))),
        ("node", id) => {
            let id: NodeId = id.parse().map_err(|_| bad())?;
            state
                .member(id)
                .map(|m| Principal::Node(id, m.endpoint))
                .ok_or_else(|| ApiError::NotFound(format!("node {id} is not a member")))
        }
        ("key", hex) => {
            let key: EndpointKey = hex.parse().map_err(|_| bad())?;
            Ok(super::principal_of(&state, &key))
        }
        _ => Err(bad()),
    }
}

/// Parses a resource for `policy test`.
fn resource_spec(api: &Api, spec: &str) -> Result<Resource, ApiError> {
    if spec == "cluster" {
        return Ok(Resource::Cluster);
    }
    match spec.split_once(':') {
        Some(("user", name)) => api
            .cluster
            .state()
            .user(name)
            .map(user_resource)
            .ok_or_else(|| ApiError::NotFound(format!("no user {name}"))),
        Some(("image", name)) => Ok(blixard_net::authz::image_resource(name, api)),
        Some(("tenant", name)) => Ok(Resource::Tenant {
            name: name.to_string(),
        }),
        Some(("vm", key)) => {
            let (tenant, name) = key.split_once('/').ok_or_else(|| {
                ApiError::BadRequest(format!("resource {spec:?}: expected vm:TENANT/NAME"))
            })?;
            Ok(match api.cluster.state().vm(key) {
                Some(vm) => blixard_net::authz::vm_entity(vm),
                None => Resource::Vm {
                    name: name.to_string(),
                    tenant: tenant.to_string(),
                    labels: Vec::new(),
                },
            })
        }
        Some(("node", id)) => {
            let id: NodeId = id.parse().map_err(|_| {
                ApiError::BadRequest(format!("resource {spec:?}: expected node:ID"))
            })?;
            Ok(blixard_net::authz::node_resource(id, api))
        }
        _ => Err(ApiError::BadRequest(format!(
            "resource {spec:?}: expected cluster, user:NAME, image:NAME, tenant:NAME, vm:TENANT/NAME or node:ID"
        ))),
    }
}
