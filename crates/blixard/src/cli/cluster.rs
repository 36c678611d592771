//! The client commands: find the node, call it with a credential, print the answer.

use std::time::Duration;

use blixard_core::{EndpointKey, MemberRole, MemberStatus, NodeId};
use blixard_net::api::{
    LearnerTokenCreate, LeaveCluster, MetaGet, MetaSet, PolicyGet, PolicySet, PolicyTest, RoleSet,
    StatusRequest, TokenCreate, TokenListRequest, TokenRevoke, UserAdd, UserList, UserRemove,
};
use blixard_net::keys;
use serde_json::json;

use super::format::{self as output, Format};
use super::parse::parse_duration;
use super::{applied, call, client, Context};
use blixard_node::datadir::{self, NodeInfo};
use blixard_node::exit::{self, Failure};

fn short(key: &EndpointKey) -> String {
    key.to_string().chars().take(10).collect()
}

pub async fn status(ctx: &Context, stale: bool) -> Result<(), Failure> {
    let s = call(ctx, StatusRequest { stale }).await?;
    if ctx.output == Format::Json {
        return output::json(&s).map_err(|e| Failure::new(exit::ERROR, e));
    }
    let leader = s
        .raft
        .leader
        .map(|l| format!("n{l}"))
        .unwrap_or_else(|| "none".into());
    out!("cluster  {} ({})", s.name, s.cluster_id);
    out!(
        "node     n{} ({}), leader {leader}, term {}, commit {}, applied {}{}",
        s.node,
        s.raft.role,
        s.raft.term,
        s.raft.commit,
        s.raft.applied,
        if s.stale { " (stale read)" } else { "" }
    );
    if let Some(c) = &s.raft.state_check {
        out!(
            "state    digest {:016x} at check entry {}",
            c.digest,
            c.index
        );
    }
    if let Some(alarm) = &s.raft.alarm {
        out!("ALARM    {alarm}");
    }
    if let Some(v) = &s.versions {
        out!(
            "version  cluster {}; this node runs blixard {} (log {})",
            v.cluster,
            v.release,
            v.log
        );
    }
    out!();
    // What each member runs, as the answering node knows it.
    let version_of = |id: NodeId| -> String {
        let Some(v) = &s.versions else {
            return "?".into();
        };
        if id == s.node {
            return format!("{} (log {})", v.release, v.log);
        }
        match v
            .members
            .iter()
            .find(|(m, _)| *m == id)
            .and_then(|(_, said)| said.as_ref())
        {
            Some(m) => format!(
                "{} (log {})",
                m.release.as_deref().unwrap_or("older"),
                m.log
            ),
            None => "?".into(),
        }
    };
    let rows: Vec<Vec<String>> = s
        .members
        .iter()
        .map(|m| {
            let role = match (m.status, m.role) {
                (MemberStatus::Joining, _) => "joining",
                (_, MemberRole::Voter) => "voter",
                (_, MemberRole::Learner) => "learner",
            };
            let leader = if Some(m.id.0) == s.raft.leader {
                "*"
            } else {
                ""
            };
            vec![
                format!("n{}{leader}", m.id),
                m.name.clone(),
                role.to_string(),
                m.addrs
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                short(&m.endpoint),
                version_of(m.id),
                output::labels(&m.labels),
            ]
        })
        .collect();
    output::table(
        &[
            "ID", "NAME", "ROLE", "ADDRESS", "ENDPOINT", "VERSION", "LABELS",
        ],
        &rows,
    );
    Ok(())
}

/// Parses a number with an optional unit suffix; `factor` gives each unit's multiplier
/// (`None` for an unknown unit, which is refused like an overflow, with `bad`).
pub async fn token_create(ctx: &Context, ttl: &str, learner: bool) -> Result<(), Failure> {
    let ttl_secs = parse_duration(ttl)?.as_secs();
    // A plain token keeps the request kind every release knows.
    let t = if learner {
        call(ctx, LearnerTokenCreate { ttl_secs }).await?
    } else {
        call(ctx, TokenCreate { ttl_secs }).await?
    };
    if ctx.output == Format::Json {
        return output::json(&t).map_err(|e| Failure::new(exit::ERROR, e));
    }
    out!("{}", t.ticket);
    Ok(())
}

pub async fn token_list(ctx: &Context, stale: bool) -> Result<(), Failure> {
    let tokens = call(ctx, TokenListRequest { stale }).await?.tokens;
    if ctx.output == Format::Json {
        return output::json(&tokens).map_err(|e| Failure::new(exit::ERROR, e));
    }
    let now = blixard_node::cluster::now_ms();
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            let state = match t.used_by {
                Some(node) => format!("used by {node}"),
                None if t.expires_at_ms <= now => "expired".into(),
                None => "valid".into(),
            };
            let expires = if t.expires_at_ms > now {
                format!("in {}", output::duration_ms(t.expires_at_ms - now))
            } else {
                format!("{} ago", output::duration_ms(now - t.expires_at_ms))
            };
            vec![
                t.id.chars().take(16).collect(),
                format!(
                    "{} ago",
                    output::duration_ms(now.saturating_sub(t.created_at_ms))
                ),
                expires,
                state,
            ]
        })
        .collect();
    output::table(&["ID", "CREATED", "EXPIRES", "STATE"], &rows);
    Ok(())
}

pub async fn token_revoke(ctx: &Context, id: &str) -> Result<(), Failure> {
    let revoked = call(ctx, TokenRevoke { id: id.to_string() }).await?;
    let text = format!(
        "join token {} revoked; its ticket no longer admits a node",
        revoked.id
    );
    applied(ctx, json!({ "id": revoked.id, "revoked": true }), text)
}

/// Rotates the local node's admin credential: a new key is written beside the old one,
/// the cluster switches to it, then it replaces `admin.key`. Interrupted, the old key
/// file stays in place and `admin.key.new` says what the cluster may already expect.
pub async fn rotate_admin_key(ctx: &Context) -> Result<(), Failure> {
    if ctx.node.is_some() || ctx.key.is_some() {
        return Err(Failure::new(
            exit::USAGE,
            "rotate-admin-key rotates the local node's admin.key; run it without --node/--credential on that node's host",
        ));
    }
    let info_path = datadir::node_info(&ctx.data_dir);
    let info: NodeInfo = std::fs::read_to_string(&info_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .ok_or_else(|| {
            Failure::new(
                exit::UNREACHABLE,
                format!("no running node found in {}", ctx.data_dir.display()),
            )
        })?;
    let current = datadir::admin_key(&ctx.data_dir);
    let fresh = current.with_extension("key.new");
    let _ = std::fs::remove_file(&fresh);
    let key = keys::create(&fresh).map_err(|e| Failure::new(exit::DATA_DIR, e))?;
    let new_key = blixard_net::key_of(&key.public());
    let r = call(
        ctx,
        blixard_net::api::AdminSetKey {
            node: info.node_id,
            key: new_key,
        },
    )
    .await;
    if let Err(e) = r {
        let _ = std::fs::remove_file(&fresh);
        return Err(e);
    }
    std::fs::rename(&fresh, &current).map_err(|e| {
        Failure::new(
            exit::DATA_DIR,
            format!(
                "the cluster now expects the key in {}, but it could not replace {}: {e}",
                fresh.display(),
                current.display()
            ),
        )
    })?;
    let text = format!(
        "admin credential of node n{} rotated to {new_key}",
        info.node_id
    );
    let result = json!({ "node": info.node_id, "key": new_key.to_string() });
    applied(ctx, result, text)
}

pub async fn leave(ctx: &Context, node: &str) -> Result<(), Failure> {
    let node: NodeId = node.parse().map_err(|e| Failure::new(exit::USAGE, e))?;
    let left = call(ctx, LeaveCluster { node }).await?;
    let text = format!("node n{} removed from the cluster", left.node);
    applied(ctx, json!({ "node": left.node, "removed": true }), text)
}

/// `cluster promote` / `cluster demote`.
pub async fn set_role(ctx: &Context, node: &str, role: MemberRole) -> Result<(), Failure> {
    let node: NodeId = node.parse().map_err(|e| Failure::new(exit::USAGE, e))?;
    let done = call(ctx, RoleSet { node, role }).await?;
    let role = done.role.as_str();
    let text = format!("node n{} is now a {role}", done.node);
    applied(ctx, json!({ "node": done.node, "role": role }), text)
}

pub async fn meta_set(ctx: &Context, key: String, value: Option<String>) -> Result<(), Failure> {
    let (client, to) = client(ctx).await?;
    let request = MetaSet { key, value };
    client.call(&to, request.clone()).await?;
    client.endpoint().close().await;
    let text = match &request.value {
        Some(v) => format!("{} = {v}", request.key),
        None => format!("{} removed", request.key),
    };
    applied(
        ctx,
        json!({ "key": request.key, "value": request.value }),
        text,
    )
}

pub async fn meta_get(ctx: &Context, key: Option<String>, stale: bool) -> Result<(), Failure> {
    let m = call(ctx, MetaGet { key, stale }).await?;
    if ctx.output == Format::Json {
        let map: std::collections::BTreeMap<_, _> = m.entries.into_iter().collect();
        return output::json(&map).map_err(|e| Failure::new(exit::ERROR, e));
    }
    let rows: Vec<Vec<String>> = m.entries.into_iter().map(|(k, v)| vec![k, v]).collect();
    output::table(&["KEY", "VALUE"], &rows);
    Ok(())
}

pub async fn user_add(
    ctx: &Context,
    name: String,
    key: &str,
    roles: Vec<String>,
    tenant: Option<String>,
) -> Result<(), Failure> {
    let key: EndpointKey = key.parse().map_err(|e| Failure::new(exit::USAGE, e))?;
    call(
        ctx,
        UserAdd {
            name: name.clone(),
            key,
            roles: roles.clone(),
            tenant: tenant.clone(),
        },
    )
    .await?;
    let result = json!({ "name": name, "key": key.to_string(), "roles": roles, "tenant": tenant });
    applied(ctx, result, format!("user {name} added"))
}

pub async fn user_list(ctx: &Context, stale: bool) -> Result<(), Failure> {
    let users = call(ctx, UserList { stale }).await?.users;
    if ctx.output == Format::Json {
        return output::json(&users).map_err(|e| Failure::new(exit::ERROR, e));
    }
    let rows: Vec<Vec<String>> = users
        .iter()
        .map(|u| {
            vec![
                u.name.clone(),
                u.roles.join(","),
                u.tenant.clone().unwrap_or_else(|| "-".into()),
                short(&u.key),
            ]
        })
        .collect();
    output::table(&["NAME", "ROLES", "TENANT", "KEY"], &rows);
    Ok(())
}

pub async fn user_set_key(ctx: &Context, name: String, key: &str) -> Result<(), Failure> {
    let key: EndpointKey = key.parse().map_err(|e| Failure::new(exit::USAGE, e))?;
    call(
        ctx,
        blixard_net::api::UserSetKey {
            name: name.clone(),
            key,
        },
    )
    .await?;
    let text = format!("user {name} now has key {key}; the old key is no longer accepted");
    applied(ctx, json!({ "name": name, "key": key.to_string() }), text)
}

pub async fn user_rm(ctx: &Context, name: String) -> Result<(), Failure> {
    call(ctx, UserRemove { name: name.clone() }).await?;
    let text = format!("user {name} removed");
    applied(ctx, json!({ "name": name, "removed": true }), text)
}

pub async fn policy_show(ctx: &Context) -> Result<(), Failure> {
    let p = call(ctx, PolicyGet {}).await?;
    if ctx.output == Format::Json {
        return output::json(&p).map_err(|e| Failure::new(exit::ERROR, e));
    }
    if p.default {
        eprintln!("(the built-in default policies)");
    }
    print!("{}", p.text);
    Ok(())
}

pub async fn policy_set(ctx: &Context, file: &std::path::Path) -> Result<(), Failure> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Failure::new(exit::USAGE, format!("cannot read {}: {e}", file.display())))?;
    let (client, to) = client(ctx).await?;
    let bytes = text.len();
    let r = client.call(&to, PolicySet { text }).await;
    client.endpoint().close().await;
    r?;
    applied(
        ctx,
        json!({ "replaced": true, "bytes": bytes }),
        "policies replaced",
    )
}

pub async fn policy_test(
    ctx: &Context,
    principal: String,
    action: String,
    resource: String,
) -> Result<(), Failure> {
    let v = call(
        ctx,
        PolicyTest {
            principal,
            action: action.clone(),
            resource: resource.clone(),
        },
    )
    .await?;
    if ctx.output == Format::Json {
        return output::json(&v).map_err(|e| Failure::new(exit::ERROR, e));
    }
    let verdict = if v.allowed { "ALLOW" } else { "DENY" };
    out!("{verdict}: {} {action} on {resource}", v.principal);
    if !v.reasons.is_empty() {
        out!("decided by: {}", v.reasons.join(", "));
    }
    for e in &v.errors {
        out!("error: {e}");
    }
    Ok(())
}

pub async fn audit_tail(ctx: &Context, lines: usize, follow: bool) -> Result<(), Failure> {
    use std::io::{Read, Seek, SeekFrom};
    let path = blixard_node::audit::path(&ctx.data_dir);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Failure::new(
            exit::DATA_DIR,
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let all: Vec<&str> = text.lines().collect();
    for line in &all[all.len().saturating_sub(lines)..] {
        out!("{line}");
    }
    if !follow {
        return Ok(());
    }
    let mut offset = text.len() as u64;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok(mut f) = std::fs::File::open(&path) else {
            continue;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < offset {
            offset = 0; // rotated
        }
        if len > offset && f.seek(SeekFrom::Start(offset)).is_ok() {
            let mut more = String::new();
            if f.read_to_string(&mut more).is_ok() {
                print!("{more}");
                offset += more.len() as u64;
            }
        }
    }
}
