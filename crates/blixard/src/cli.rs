//! The client commands: find the node, call it with a credential, print the answer.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use blixard_core::{EndpointKey, MemberRole, MemberStatus, NodeId};
use blixard_net::api::{
    LeaveCluster, MetaGet, MetaSet, PolicyGet, PolicySet, PolicyTest, StatusRequest, TokenCreate,
    UserAdd, UserList, UserRemove,
};
use blixard_net::client::ApiClient;
use blixard_net::ticket::JoinTicket;
use blixard_net::{endpoint, keys, member_addr, EndpointAddr};

use crate::output::{self, Format};
use blixard_node::datadir::{self, NodeInfo};
use blixard_node::exit::{self, Failure};

#[derive(Clone)]
pub struct Context {
    pub data_dir: PathBuf,
    pub node: Option<String>,
    pub key: Option<PathBuf>,
    pub output: Format,
    pub timeout: Duration,
}

/// Where the CLI should send its request.
async fn target(ctx: &Context) -> Result<EndpointAddr, Failure> {
    match &ctx.node {
        // A member by id (`n2` or `2`): ask the local node where it is.
        Some(node) if node.parse::<NodeId>().is_ok() => {
            let id: NodeId = node.parse().map_err(|e| Failure::new(exit::USAGE, e))?;
            let local = Context {
                node: None,
                ..ctx.clone()
            };
            let (client, to) = client_to(&local, local_target(ctx)?).await?;
            let status = client.call(&to, StatusRequest { stale: true }).await;
            client.endpoint().close().await;
            let status = status?;
            let member = status.members.iter().find(|m| m.id == id).ok_or_else(|| {
                Failure::new(
                    exit::USAGE,
                    format!("--node {node}: node {id} is not a member"),
                )
            })?;
            member_addr(&member.endpoint, &member.addrs)
                .ok_or_else(|| Failure::new(exit::UNREACHABLE, format!("node {id} has no address")))
        }
        Some(node) => parse_target(node),
        None => local_target(ctx),
    }
}

/// The node whose data dir the CLI uses.
fn local_target(ctx: &Context) -> Result<EndpointAddr, Failure> {
    let path = datadir::node_info(&ctx.data_dir);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Failure::new(
            exit::UNREACHABLE,
            format!(
                "no running node found in {} ({}: {e}); start one with `blixard node run`, or pass --node",
                ctx.data_dir.display(),
                path.display()
            ),
        )
    })?;
    let info: NodeInfo = serde_json::from_str(&text).map_err(|e| {
        Failure::new(
            exit::DATA_DIR,
            format!("{} is damaged: {e}", path.display()),
        )
    })?;
    // A node listening on 0.0.0.0 is reachable locally on loopback.
    let addrs: Vec<SocketAddr> = info
        .addrs
        .iter()
        .map(|a| {
            if a.ip().is_unspecified() {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), a.port())
            } else {
                *a
            }
        })
        .collect();
    member_addr(&info.endpoint_id, &addrs).ok_or_else(|| {
        Failure::new(
            exit::DATA_DIR,
            format!("{} holds an invalid endpoint id", path.display()),
        )
    })
}

/// Parses `--node`: a join ticket, or ENDPOINT_ID@HOST:PORT.
pub fn parse_target(s: &str) -> Result<EndpointAddr, Failure> {
    if s.starts_with("blixard1") {
        let ticket: JoinTicket = s.parse().map_err(|e| Failure::new(exit::USAGE, e))?;
        return ticket
            .members
            .iter()
            .find_map(|(k, a)| member_addr(k, a))
            .ok_or_else(|| Failure::new(exit::USAGE, "the ticket lists no members"));
    }
    let (id, addr) = s.split_once('@').ok_or_else(|| {
        Failure::new(
            exit::USAGE,
            format!("--node {s:?}: expected a join ticket or ENDPOINT_ID@HOST:PORT"),
        )
    })?;
    let key: EndpointKey = id.parse().map_err(|e| Failure::new(exit::USAGE, e))?;
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| Failure::new(exit::USAGE, format!("--node {s:?}: {e}")))?;
    member_addr(&key, &[addr])
        .ok_or_else(|| Failure::new(exit::USAGE, format!("--node {s:?}: invalid endpoint id")))
}

/// The credential the CLI calls with: `--key`; else the node's admin credential when this
/// user can read it; else the user's own key, created on first use.
fn credential(ctx: &Context) -> Result<(PathBuf, blixard_net::SecretKey), Failure> {
    let refuse = |e: keys::KeyError| Failure::new(exit::UNAUTHORIZED, e);
    if let Some(path) = &ctx.key {
        return keys::load(path).map(|k| (path.clone(), k)).map_err(refuse);
    }
    let admin = datadir::admin_key(&ctx.data_dir);
    if std::fs::File::open(&admin).is_ok() {
        return keys::load(&admin).map(|k| (admin, k)).map_err(refuse);
    }
    let home = std::env::var_os("HOME").ok_or_else(|| {
        Failure::new(
            exit::UNAUTHORIZED,
            "no credential: HOME is not set; pass --credential",
        )
    })?;
    let dir = PathBuf::from(home).join(".config/blixard");
    std::fs::create_dir_all(&dir).map_err(|e| {
        Failure::new(
            exit::UNAUTHORIZED,
            format!("cannot create {}: {e}", dir.display()),
        )
    })?;
    let path = dir.join("key");
    keys::load_or_create(&path)
        .map(|k| (path, k))
        .map_err(refuse)
}

pub fn whoami(ctx: &Context) -> Result<(), Failure> {
    let (path, key) = credential(ctx)?;
    let id = blixard_net::key_of(&key.public());
    if ctx.output == Format::Json {
        return output::json(&serde_json::json!({"key": id.to_string(), "file": path}))
            .map_err(|e| Failure::new(exit::ERROR, e));
    }
    out!("{id}");
    eprintln!("(credential {})", path.display());
    Ok(())
}

pub async fn client(ctx: &Context) -> Result<(ApiClient, EndpointAddr), Failure> {
    let to = target(ctx).await?;
    client_to(ctx, to).await
}

async fn client_to(ctx: &Context, to: EndpointAddr) -> Result<(ApiClient, EndpointAddr), Failure> {
    let (_, secret) = credential(ctx)?;
    let listen = SocketAddr::from(([0, 0, 0, 0], 0));
    let ep = endpoint::bind(secret, listen, None, vec![])
        .await
        .map_err(|e| Failure::new(exit::ERROR, e))?;
    Ok((ApiClient::new(ep, None, ctx.timeout), to))
}

fn short(key: &EndpointKey) -> String {
    key.to_string().chars().take(10).collect()
}

pub async fn status(ctx: &Context, stale: bool) -> Result<(), Failure> {
    let (client, to) = client(ctx).await?;
    let s = client.call(&to, StatusRequest { stale }).await?;
    client.endpoint().close().await;
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
    out!();
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
                output::labels(&m.labels),
            ]
        })
        .collect();
    output::table(
        &["ID", "NAME", "ROLE", "ADDRESS", "ENDPOINT", "LABELS"],
        &rows,
    );
    Ok(())
}

/// Parses a number with an optional unit suffix; `factor` gives each unit's multiplier
/// (`None` for an unknown unit, which is refused like an overflow, with `bad`).
pub fn parse_scaled(
    s: &str,
    bad: impl Fn() -> Failure,
    factor: impl Fn(&str) -> Option<u64>,
) -> Result<u64, Failure> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| bad())?;
    factor(unit).and_then(|f| n.checked_mul(f)).ok_or_else(bad)
}

/// Parses 30s, 10m, 2h, 1d or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, Failure> {
    let bad = || {
        Failure::new(
            exit::USAGE,
            format!("invalid duration {s:?}: use e.g. 30s, 10m, 2h"),
        )
    };
    let secs = parse_scaled(s, bad, |unit| match unit {
        "" | "s" => Some(1),
        "m" => Some(60),
        "h" => Some(3600),
        "d" => Some(86400),
        _ => None,
    })?;
    Ok(Duration::from_secs(secs))
}

pub async fn token_create(ctx: &Context, ttl: &str) -> Result<(), Failure> {
    let ttl = parse_duration(ttl)?;
    let (client, to) = client(ctx).await?;
    let t = client
        .call(
            &to,
            TokenCreate {
                ttl_secs: ttl.as_secs(),
            },
        )
        .await?;
    client.endpoint().close().await;
    if ctx.output == Format::Json {
        return output::json(&t).map_err(|e| Failure::new(exit::ERROR, e));
    }
    out!("{}", t.ticket);
    Ok(())
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
    let (client, to) = client(ctx).await?;
    let r = client
        .call(
            &to,
            blixard_net::api::AdminSetKey {
                node: info.node_id,
                key: new_key,
            },
        )
        .await;
    client.endpoint().close().await;
    if let Err(e) = r {
        let _ = std::fs::remove_file(&fresh);
        return Err(e.into());
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
    eprintln!(
        "admin credential of node n{} rotated to {new_key}",
        info.node_id
    );
    Ok(())
}

pub async fn leave(ctx: &Context, node: &str) -> Result<(), Failure> {
    let node: NodeId = node.parse().map_err(|e| Failure::new(exit::USAGE, e))?;
    let (client, to) = client(ctx).await?;
    let left = client.call(&to, LeaveCluster { node }).await?;
    client.endpoint().close().await;
    eprintln!("node n{} removed from the cluster", left.node);
    Ok(())
}

pub async fn meta_set(ctx: &Context, key: String, value: Option<String>) -> Result<(), Failure> {
    let (client, to) = client(ctx).await?;
    client.call(&to, MetaSet { key, value }).await?;
    client.endpoint().close().await;
    Ok(())
}

pub async fn meta_get(ctx: &Context, key: Option<String>, stale: bool) -> Result<(), Failure> {
    let (client, to) = client(ctx).await?;
    let m = client.call(&to, MetaGet { key, stale }).await?;
    client.endpoint().close().await;
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
    let (client, to) = client(ctx).await?;
    let r = client
        .call(
            &to,
            UserAdd {
                name: name.clone(),
                key,
                roles,
                tenant,
            },
        )
        .await;
    client.endpoint().close().await;
    r?;
    eprintln!("user {name} added");
    Ok(())
}

pub async fn user_list(ctx: &Context, stale: bool) -> Result<(), Failure> {
    let (client, to) = client(ctx).await?;
    let r = client.call(&to, UserList { stale }).await;
    client.endpoint().close().await;
    let users = r?.users;
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
    let (client, to) = client(ctx).await?;
    let r = client
        .call(
            &to,
            blixard_net::api::UserSetKey {
                name: name.clone(),
                key,
            },
        )
        .await;
    client.endpoint().close().await;
    r?;
    eprintln!("user {name} now has key {key}; the old key is no longer accepted");
    Ok(())
}

pub async fn user_rm(ctx: &Context, name: String) -> Result<(), Failure> {
    let (client, to) = client(ctx).await?;
    let r = client.call(&to, UserRemove { name: name.clone() }).await;
    client.endpoint().close().await;
    r?;
    eprintln!("user {name} removed");
    Ok(())
}

pub async fn policy_show(ctx: &Context) -> Result<(), Failure> {
    let (client, to) = client(ctx).await?;
    let r = client.call(&to, PolicyGet {}).await;
    client.endpoint().close().await;
    let p = r?;
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
    let r = client.call(&to, PolicySet { text }).await;
    client.endpoint().close().await;
    r?;
    eprintln!("policies replaced");
    Ok(())
}

pub async fn policy_test(
    ctx: &Context,
    principal: String,
    action: String,
    resource: String,
) -> Result<(), Failure> {
    let (client, to) = client(ctx).await?;
    let r = client
        .call(
            &to,
            PolicyTest {
                principal,
                action: action.clone(),
                resource: resource.clone(),
            },
        )
        .await;
    client.endpoint().close().await;
    let v = r?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_targets_parse() {
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5y").is_err());
        let id = blixard_net::key_of(&blixard_net::SecretKey::generate().public());
        let addr = parse_target(&format!("{id}@127.0.0.1:7001")).unwrap();
        assert_eq!(addr.ip_addrs().count(), 1);
        assert!(parse_target(&format!("{id}@nowhere")).is_err());
        assert!(parse_target("127.0.0.1:7001").is_err());
    }
}
